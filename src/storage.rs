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
    #[error("storage: could not {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: object_store::Error,
    },
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

impl Storage {
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
    pub async fn create(&self, rel: &str, bytes: Bytes) -> Result<bool, StorageError> {
        let path = self.path(rel);
        let opts = object_store::PutOptions {
            mode: object_store::PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from(bytes), opts)
            .await
        {
            Ok(_) => {
                self.sync_at(&path).await?;
                Ok(true)
            }
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(source) => Err(io("create", &path)(source)),
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
