//! Storage of the master dataset and the batch views, through `object_store`,
//! so a local directory and an `s3://bucket/prefix` root are one code path.
//!
//! ```text
//!  root (file:///…/data  |  s3://bucket/prefix)
//!    master/      the Delta Lake table (see `master`)
//!    views/       batch views and the CURRENT pointer (see `batch`)
//! ```
//!
//! The log and the dead-letter store are local files (they need fsync and
//! appends); everything a batch layer or another engine reads goes through here.
//!
//! What several writers may race on is written with a condition: created
//! only if absent ([`Storage::create`]), replaced only if unchanged since it
//! was read ([`Storage::replace`], If-Match on the ETag). S3 enforces both;
//! a local root has no ETags, so there the caller's file lock serializes the
//! writers and a replace is an atomic rename.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use url::Url;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("invalid storage root {root}: {reason}")]
    BadRoot { root: String, reason: String },
    #[error("an S3 root is configured unsafely: {setting}={value}: {reason}")]
    Unsafe {
        setting: &'static str,
        value: Box<str>,
        reason: &'static str,
    },
    /// A file lambdaflow keeps under the root holds what it cannot parse.
    #[error("{path} cannot be read: {reason}")]
    Unreadable {
        path: String,
        reason: String,
        hint: &'static str,
    },
    #[error("storage: could not {op} {path}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: object_store::Error,
    },
}

crate::explained!(StorageError);

impl crate::error::Explain for StorageError {
    fn hint(&self) -> Option<String> {
        match self {
            StorageError::Unsafe { setting, .. } => Some(format!(
                "unset {setting}; S3 (and moto, MinIO, R2) support conditional writes"
            )),
            StorageError::Unreadable { hint, .. } => Some(hint.to_string()),
            _ => None,
        }
    }
}

/// Wraps an object-store error with what was being done, and where.
fn io(op: &'static str, path: &ObjectPath) -> impl FnOnce(object_store::Error) -> StorageError {
    let path = path.to_string();
    move |source| StorageError::Io { op, path, source }
}

/// A storage root: an object store and the prefix lambdaflow owns in it.
#[derive(Debug, Clone)]
pub struct Storage {
    url: Url,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
}

/// The version of an object as last read, for a conditional replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version(Option<object_store::UpdateVersion>);

impl Version {
    /// The object did not exist when read: a replace creates it.
    pub fn absent() -> Version {
        Version(None)
    }
}

/// Whether a conditional write took place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swap {
    Done,
    /// Another writer changed (or created) the object first.
    Lost,
}

/// Environment settings that would let two writers both believe they
/// committed: lambdaflow refuses to start with them.
const UNSAFE_ENV: [(&str, &str, &str); 3] = [
    (
        "AWS_CONDITIONAL_PUT",
        "disabled",
        "conditional writes are what make Delta commits and publishes safe between writers",
    ),
    (
        "AWS_S3_ALLOW_UNSAFE_RENAME",
        "true",
        "an unsafe rename lets two writers commit the same Delta version",
    ),
    (
        "AWS_S3_LOCKING_PROVIDER",
        "",
        "lambdaflow commits through S3's conditional writes, not an external lock",
    ),
];

/// How long S3 calls may take and how often they are retried before the
/// caller hears of a failure: the caller's own loop retries on (with backoff,
/// reported in `health`), so an outage shows within seconds, not minutes.
fn s3_retry() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: std::time::Duration::from_millis(100),
            max_backoff: std::time::Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 4,
        retry_timeout: std::time::Duration::from_secs(5),
    }
}

impl Storage {
    /// A root given as a local path or an `s3://bucket/prefix` URL.
    /// Credentials, region and endpoint come from the usual AWS environment
    /// (`AWS_ACCESS_KEY_ID`, `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`
    /// for a local emulator), as the AWS tools read them.
    pub fn open(root: &Path) -> Result<Storage, StorageError> {
        match root.to_str() {
            Some(r) if r.starts_with("s3://") => Storage::s3(r),
            _ => Storage::local(root),
        }
    }

    /// An S3 root, `s3://bucket/prefix`, configured by the environment.
    pub fn s3(root: &str) -> Result<Storage, StorageError> {
        Storage::s3_with(root, &[])
    }

    /// An S3 root configured by the environment and then `options`
    /// (`object_store`'s keys: `aws_endpoint`, `aws_allow_http`, …): for a
    /// process that talks to several stores, such as a test.
    pub fn s3_with(root: &str, options: &[(&str, &str)]) -> Result<Storage, StorageError> {
        let bad = |reason: String| StorageError::BadRoot {
            root: root.to_string(),
            reason,
        };
        for (key, value, reason) in UNSAFE_ENV {
            let set = std::env::var(key)
                .ok()
                .or_else(|| std::env::var(key.to_ascii_lowercase()).ok());
            if let Some(v) = set
                && (value.is_empty() || v.eq_ignore_ascii_case(value))
            {
                return Err(StorageError::Unsafe {
                    setting: key,
                    value: v.into(),
                    reason,
                });
            }
        }
        let url = Url::parse(root).map_err(|e| bad(e.to_string()))?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err(bad("names no bucket (s3://bucket/prefix)".into()));
        }
        use object_store::ClientConfigKey as C;
        use object_store::aws::AmazonS3ConfigKey as K;
        let mut builder = object_store::aws::AmazonS3Builder::from_env()
            .with_url(root)
            .with_retry(s3_retry());
        // Bounded calls (unless the environment says otherwise), so a store
        // that stops answering is a failure to retry, not a hang.
        for (key, env, value) in [
            (C::ConnectTimeout, "AWS_CONNECT_TIMEOUT", "3s"),
            (C::Timeout, "AWS_TIMEOUT", "30s"),
        ] {
            if std::env::var_os(env).is_none() {
                builder = builder.with_config(K::Client(key), value);
            }
        }
        for (k, v) in options {
            let key: K = k
                .parse()
                .map_err(|e: object_store::Error| bad(e.to_string()))?;
            builder = builder.with_config(key, *v);
        }
        let store = builder.build().map_err(|e| bad(e.to_string()))?;
        let prefix = ObjectPath::from_url_path(url.path()).map_err(|e| bad(e.to_string()))?;
        // Delta reads and writes the table through this same client (see
        // `master`), so it sees the same endpoint and credentials.
        let mut url = url;
        if !url.path().ends_with('/') {
            url.set_path(&format!("{}/", url.path()));
        }
        Ok(Storage {
            url,
            store: Arc::new(store),
            prefix,
        })
    }

    /// An in-memory root, for tests of what races on storage.
    pub fn memory() -> Storage {
        Storage {
            url: Url::parse("memory:///").expect("a URL"),
            store: Arc::new(object_store::memory::InMemory::new()),
            prefix: ObjectPath::default(),
        }
    }

    /// Whether the store itself enforces conditional replaces (S3 does; a
    /// local root relies on the caller's file lock).
    pub fn compares_versions(&self) -> bool {
        self.url.scheme() != "file"
    }

    /// A short name of the root for messages: the path, or the URL.
    pub fn describe(&self) -> String {
        match self.url.to_file_path() {
            Ok(p) if self.url.scheme() == "file" => p.display().to_string(),
            _ => self.url.to_string(),
        }
    }

    /// A local directory (created if missing).
    pub fn local(dir: &Path) -> Result<Storage, StorageError> {
        let bad = |reason: String| StorageError::BadRoot {
            root: dir.display().to_string(),
            reason,
        };
        std::fs::create_dir_all(dir).map_err(|e| bad(e.to_string()))?;
        let abs = std::fs::canonicalize(dir).map_err(|e| bad(e.to_string()))?;
        let url =
            Url::from_directory_path(&abs).map_err(|()| bad("not an absolute path".into()))?;
        let prefix = ObjectPath::from_url_path(url.path()).map_err(|e| bad(e.to_string()))?;
        Ok(Storage {
            url,
            store: Arc::new(LocalFileSystem::new()),
            prefix,
        })
    }

    /// The root as a URL (ends with `/`).
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// URL of a directory under the root (ends with `/`).
    pub fn dir_url(&self, rel: &str) -> Url {
        self.url
            .join(&format!("{}/", rel.trim_matches('/')))
            .expect("relative paths join")
    }

    /// `scheme://authority`, how DataFusion names the store.
    pub fn store_url(&self) -> String {
        format!(
            "{}://{}",
            self.url.scheme(),
            &self.url[url::Position::BeforeHost..url::Position::AfterPort]
        )
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The object path of `rel` under the root.
    pub fn path(&self, rel: &str) -> ObjectPath {
        let mut p = self.prefix.clone();
        for part in rel.split('/').filter(|s| !s.is_empty()) {
            p = p.join(part);
        }
        p
    }

    pub async fn put(&self, rel: &str, bytes: Bytes) -> Result<(), StorageError> {
        self.put_at(&self.path(rel), bytes).await
    }

    /// Writes the object at `path` (a full object path, as Delta lists files),
    /// durably: on a local root the file and the directories above it are
    /// fsynced before this returns (`object_store`'s local store does not),
    /// because the log may delete its copy of the events once a published
    /// run names this file.
    pub async fn put_at(&self, path: &ObjectPath, bytes: Bytes) -> Result<(), StorageError> {
        self.store
            .put(path, PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(io("write", path))?;
        self.sync_at(path).await
    }

    /// Writes `rel` only if no object is there (a conditional put on S3, a
    /// no-replace link on a local root), durably; `Ok(false)` when another
    /// writer was first. What every node agrees on is created this way.
    ///
    /// A write whose answer was lost (S3 timed out or failed after writing,
    /// the connection closed before the reply) is retried by the client, and
    /// the retry of a conditional write is refused (`412`) although this
    /// writer wrote the object; so a refusal, or a failure that may have
    /// written, is settled by reading the object back: it is this writer's
    /// when it holds exactly these bytes.
    pub async fn create(&self, rel: &str, bytes: Bytes) -> Result<bool, StorageError> {
        let path = self.path(rel);
        let mut attempt = 1;
        loop {
            let opts = object_store::PutOptions {
                mode: object_store::PutMode::Create,
                ..Default::default()
            };
            match self
                .store
                .put_opts(&path, PutPayload::from(bytes.clone()), opts)
                .await
            {
                Ok(_) => {
                    self.sync_at(&path).await?;
                    return Ok(true);
                }
                Err(object_store::Error::AlreadyExists { .. }) => {
                    return self.holds(&path, &bytes).await;
                }
                Err(source) if may_have_written(&source) => {
                    if self.holds(&path, &bytes).await.unwrap_or(false) {
                        tracing::info!(path = %path, error = %source, "a create whose answer was lost had written the object");
                        return Ok(true);
                    }
                    // Safe to send again: a copy that lands late makes the
                    // retry's refusal this writer's own bytes.
                    if attempt >= UNKNOWN_OUTCOME_ATTEMPTS {
                        return Err(io("create", &path)(source));
                    }
                    tracing::debug!(path = %path, error = %source, "a create failed with its outcome unknown; sending it again");
                    attempt += 1;
                }
                Err(source) => return Err(io("create", &path)(source)),
            }
        }
    }

    /// Whether the object at `path` holds exactly `bytes` (a write of them
    /// landed, whatever its answer said).
    async fn holds(&self, path: &ObjectPath, bytes: &Bytes) -> Result<bool, StorageError> {
        match self.store.get(path).await {
            Ok(r) => Ok(r.bytes().await.map_err(io("read", path))? == *bytes),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(source) => Err(io("read", path)(source)),
        }
    }

    /// Reads `rel` with its version, for a later [`Storage::replace`].
    pub async fn get_versioned(&self, rel: &str) -> Result<(Option<Bytes>, Version), StorageError> {
        let path = self.path(rel);
        match self.store.get(&path).await {
            Ok(r) => {
                let version = object_store::UpdateVersion {
                    e_tag: r.meta.e_tag.clone(),
                    version: r.meta.version.clone(),
                };
                let bytes = r.bytes().await.map_err(io("read", &path))?;
                Ok((Some(bytes), Version(Some(version))))
            }
            Err(object_store::Error::NotFound { .. }) => Ok((None, Version(None))),
            Err(source) => Err(io("read", &path)(source)),
        }
    }

    /// The version of `rel` now, without its bytes.
    pub async fn version(&self, rel: &str) -> Result<Version, StorageError> {
        let path = self.path(rel);
        match self.store.head(&path).await {
            Ok(meta) => Ok(Version(Some(object_store::UpdateVersion {
                e_tag: meta.e_tag,
                version: meta.version,
            }))),
            Err(object_store::Error::NotFound { .. }) => Ok(Version(None)),
            Err(source) => Err(io("read", &path)(source)),
        }
    }

    /// Replaces `rel` only if it is still at `seen` (created only if it was
    /// absent): a compare-and-swap on stores that compare versions. A local
    /// root replaces it whole by an atomic rename, serialized by the
    /// caller's lock.
    pub async fn replace(
        &self,
        rel: &str,
        bytes: Bytes,
        seen: &Version,
    ) -> Result<Swap, StorageError> {
        if !self.compares_versions() {
            self.put(rel, bytes).await?;
            return Ok(Swap::Done);
        }
        let path = self.path(rel);
        let mode = match &seen.0 {
            None => object_store::PutMode::Create,
            Some(v) => object_store::PutMode::Update(v.clone()),
        };
        // As in `create`: a retry of this very write, refused because the
        // write had landed, is told apart by reading the object back.
        let mut attempt = 1;
        loop {
            let opts = object_store::PutOptions {
                mode: mode.clone(),
                ..Default::default()
            };
            match self
                .store
                .put_opts(&path, PutPayload::from(bytes.clone()), opts)
                .await
            {
                Ok(_) => return Ok(Swap::Done),
                Err(
                    object_store::Error::AlreadyExists { .. }
                    | object_store::Error::Precondition { .. },
                ) => {
                    return Ok(if self.holds(&path, &bytes).await? {
                        Swap::Done
                    } else {
                        Swap::Lost
                    });
                }
                Err(source) if may_have_written(&source) => {
                    if self.holds(&path, &bytes).await.unwrap_or(false) {
                        tracing::info!(path = %path, error = %source, "a replace whose answer was lost had written the object");
                        return Ok(Swap::Done);
                    }
                    if attempt >= UNKNOWN_OUTCOME_ATTEMPTS {
                        return Err(io("replace", &path)(source));
                    }
                    tracing::debug!(path = %path, error = %source, "a replace failed with its outcome unknown; sending it again");
                    attempt += 1;
                }
                Err(source) => return Err(io("replace", &path)(source)),
            }
        }
    }

    /// Names of the objects directly under `rel` (none if it does not exist).
    pub async fn list_files(&self, rel: &str) -> Result<Vec<String>, StorageError> {
        let path = self.path(rel);
        match self.store.list_with_delimiter(Some(&path)).await {
            Ok(listed) => Ok(listed
                .objects
                .iter()
                .filter_map(|o| o.location.filename().map(str::to_string))
                .collect()),
            Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
            Err(source) => Err(io("list", &path)(source)),
        }
    }

    /// Makes an object written by someone else (Delta's commit files) as
    /// durable as [`Storage::put_at`] makes its own. A no-op for object stores,
    /// where a completed write is durable.
    pub async fn sync(&self, rel: &str) -> Result<(), StorageError> {
        self.sync_at(&self.path(rel)).await
    }

    async fn sync_at(&self, path: &ObjectPath) -> Result<(), StorageError> {
        if self.url.scheme() != "file" {
            return Ok(());
        }
        let Ok(root) = self.url.to_file_path() else {
            return Ok(());
        };
        let file = std::path::PathBuf::from(format!("/{path}"));
        let failed = |source: std::io::Error| StorageError::Io {
            op: "fsync",
            path: path.to_string(),
            source: object_store::Error::Generic {
                store: "LocalFileSystem",
                source: Box::new(source),
            },
        };
        tokio::task::spawn_blocking(move || sync_file_and_parents(&file, &root))
            .await
            .map_err(|e| failed(std::io::Error::other(e)))?
            .map_err(failed)
    }

    /// Reads the object at `path`, which must exist.
    pub async fn read_at(&self, path: &ObjectPath) -> Result<Bytes, StorageError> {
        match self.store.get(path).await {
            Ok(r) => r.bytes().await.map_err(io("read", path)),
            Err(source) => Err(io("read", path)(source)),
        }
    }

    /// Reads `rel`; `Ok(None)` when it does not exist.
    pub async fn get(&self, rel: &str) -> Result<Option<Bytes>, StorageError> {
        let path = self.path(rel);
        match self.store.get(&path).await {
            Ok(r) => r.bytes().await.map(Some).map_err(io("read", &path)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => Err(io("read", &path)(source)),
        }
    }

    /// Deletes `rel`; a missing object is not an error.
    pub async fn delete(&self, rel: &str) -> Result<(), StorageError> {
        let path = self.path(rel);
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(io("delete", &path)(source)),
        }
    }

    /// Names of the immediate children (directories) of `rel`.
    pub async fn list_dirs(&self, rel: &str) -> Result<Vec<String>, StorageError> {
        let path = self.path(rel);
        let listed = self
            .store
            .list_with_delimiter(Some(&path))
            .await
            .map_err(io("list", &path))?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect())
    }

    /// Deletes every object under `rel`.
    pub async fn delete_dir(&self, rel: &str) -> Result<(), StorageError> {
        use futures::TryStreamExt;
        let path = self.path(rel);
        let objects: Vec<_> = self
            .store
            .list(Some(&path))
            .try_collect()
            .await
            .map_err(io("list", &path))?;
        for o in objects {
            match self.store.delete(&o.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(source) => return Err(io("delete", &o.location)(source)),
            }
        }
        if let Some(local) = self.local_path(rel) {
            // Local stores leave empty directories behind.
            let _ = std::fs::remove_dir_all(local);
        }
        Ok(())
    }

    /// The local filesystem path of `rel`, for a local root.
    pub fn local_path(&self, rel: &str) -> Option<std::path::PathBuf> {
        (self.url.scheme() == "file")
            .then(|| self.url.to_file_path().ok())
            .flatten()
            .map(|root| root.join(rel))
    }
}

/// How many times a conditional write whose outcome is unknown (and that
/// did not land) is sent in all. Sending it again is safe: the condition
/// refuses a copy after one that landed, and the refusal is then recognized
/// as this writer's own bytes.
const UNKNOWN_OUTCOME_ATTEMPTS: u32 = 3;

/// Whether a failed write may still have been done: anything but the
/// store's clear refusals (a timeout, a connection closed before the answer,
/// a 5xx after the retries) leaves the outcome unknown.
fn may_have_written(e: &object_store::Error) -> bool {
    !matches!(
        e,
        object_store::Error::NotFound { .. }
            | object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. }
            | object_store::Error::NotImplemented { .. }
            | object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }
            | object_store::Error::InvalidPath { .. }
            | object_store::Error::UnknownConfigurationKey { .. }
    )
}

/// This process's id among the writers of a storage root: random, fixed for
/// the process's life. Files several writers may race to write carry it in
/// their names, so no writer ever overwrites another's.
pub fn writer_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        format!("{:08x}", h.finish() as u32)
    })
}

/// fsyncs `file`, then each directory from its parent up to `root`: a new
/// file's name is durable only once its directory is, and a new directory's
/// once its parent is.
fn sync_file_and_parents(file: &Path, root: &Path) -> std::io::Result<()> {
    std::fs::File::open(file)?.sync_all()?;
    crate::failpoint::trace("sync", file);
    let mut dir = file.parent();
    while let Some(d) = dir {
        std::fs::File::open(d)?.sync_all()?;
        crate::failpoint::trace("sync", d);
        if d == root || !d.starts_with(root) {
            break;
        }
        dir = d.parent();
    }
    Ok(())
}
