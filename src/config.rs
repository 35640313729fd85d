//! Configuration: one TOML file, every key optional, typos fail loudly.
//!
//! With no file, lambdaflow runs the paper's workload: its event schema and its
//! views. Command-line flags override the file. A wrong file fails at startup
//! with the file, the key and the reason — never at the first event.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use crate::schema::{
    EventField, EventSchema, FieldType, PAPER_TIME_FORMAT, TimeFormat, UnknownFields,
};

/// Errors loading or checking a configuration.
/// A view's and the stream's sections are their layers' own types.
pub use crate::stream::StreamConfig;
pub use crate::view::{RollupConfig, ViewConfig};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}:\n{message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config{}: key `{key}`: {reason}",
        path.as_ref().map(|p| format!(" file {}", p.display())).unwrap_or_default())]
    Invalid {
        path: Option<PathBuf>,
        key: String,
        reason: String,
        hint: Option<String>,
    },
}

crate::explained!(ConfigError);

impl crate::error::Explain for ConfigError {
    fn hint(&self) -> Option<String> {
        match self {
            ConfigError::Invalid { hint, .. } => hint.clone(),
            _ => None,
        }
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Root of the master dataset and the batch views: a local directory
    /// (which then also holds the log and the dead-letter store) or
    /// `s3://bucket/prefix` (they stay in `stream.dir`).
    #[serde(default = "default_data")]
    pub data: PathBuf,
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default)]
    pub stream: StreamConfig,
    #[serde(default)]
    pub ingest: IngestConfig,
    #[serde(default)]
    pub speed: SpeedConfig,
    #[serde(default)]
    pub archive: ArchiveConfig,
    #[serde(default)]
    pub batch: BatchConfig,
    #[serde(default)]
    pub schema: SchemaConfig,
    #[serde(default = "default_views")]
    pub views: Vec<ViewConfig>,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub pg: PgConfig,
}

/// `[pg]`: the Postgres wire protocol over the views, off unless `listen`
/// is set. Clients give a token with scope `query` as the password (any
/// user name) when `[auth]` has tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgConfig {
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// TLS for Postgres clients (default: `[http.tls]`, if set).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Open Postgres connections at once; more are refused (53300).
    #[serde(default = "default_pg_connections")]
    pub max_connections: usize,
    /// Open connections at once from one IP address (default: a quarter of
    /// `max_connections`), so one peer cannot take every slot. Behind a
    /// proxy or pooler every client shares its address: raise it.
    #[serde(default)]
    pub max_connections_per_address: Option<usize>,
    /// A connection must have logged in (TLS, startup, password) within
    /// this time of its accept, or it is closed.
    #[serde(default = "default_pg_startup_timeout", with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// A logged-in connection that sends nothing for this long is closed
    /// (FATAL 57P05, as Postgres's `idle_session_timeout`); a query running
    /// or a reply being sent does not count as idle.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Prepared statements on one connection, and open portals, at most
    /// each; more are refused (54000) until some are closed.
    #[serde(default = "default_pg_prepared")]
    pub max_prepared: usize,
    /// What the prepared statements and portals of all connections may
    /// hold together, estimated from their messages (a planned statement
    /// costs 32 KiB and 16 bytes per byte of SQL, a portal its parameters);
    /// past it a Parse or Bind is refused (54000) until some are closed.
    #[serde(default = "default_pg_prepared_bytes")]
    pub max_prepared_bytes: ByteSize,
}

fn default_pg_prepared_bytes() -> ByteSize {
    ByteSize::mib(512)
}

fn default_pg_connections() -> usize {
    256
}

fn default_pg_startup_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_pg_prepared() -> usize {
    1000
}

impl Default for PgConfig {
    fn default() -> Self {
        PgConfig {
            listen: None,
            tls: None,
            max_connections: default_pg_connections(),
            max_connections_per_address: None,
            startup_timeout: default_pg_startup_timeout(),
            idle_timeout: default_idle_timeout(),
            max_prepared: default_pg_prepared(),
            max_prepared_bytes: default_pg_prepared_bytes(),
        }
    }
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// `POST /v1/events`, `POST /v1/batch/run`.
    Ingest,
    /// Every read: views, SQL, status, metrics.
    Query,
    /// Changing what is served: `POST /v1/views`, `DELETE /v1/views/{name}`.
    Admin,
}

/// `[auth]`: bearer tokens. With none, the API is open — and then it may
/// only listen on a loopback address.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
}

/// One token: its value (or the environment variable holding it) and scopes.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// The token itself (prefer `env`, so it is not in the file).
    #[serde(default, skip_serializing)]
    pub token: Option<String>,
    /// Name of an environment variable holding the token.
    #[serde(default)]
    pub env: Option<String>,
    pub scopes: Vec<Scope>,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a token.
        f.debug_struct("TokenConfig")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("env", &self.env)
            .field("scopes", &self.scopes)
            .finish()
    }
}

impl TokenConfig {
    /// The token's value: from the file or from its environment variable.
    pub fn value(&self) -> Option<String> {
        match (&self.token, &self.env) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(e)) => std::env::var(e).ok(),
            (None, None) => None,
        }
    }
}

/// `[http]`: the listener's limits and TLS.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// A client must send its request headers within this time.
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// …and its body within this time (408 otherwise).
    #[serde(default = "default_body_timeout", with = "humantime_serde")]
    pub body_timeout: Duration,
    /// A connection with no request in flight is closed after this time
    /// (HTTP/1 keep-alive and HTTP/2 alike; HTTP/2 peers are also pinged).
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Open connections at once. Lowered at start to what the process's
    /// file-descriptor limit leaves room for (the log says what was set).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Open connections at once from one IP address (default: a quarter of
    /// `max_connections`), so one peer cannot take every slot. Behind a
    /// proxy every client shares its address: raise it to `max_connections`.
    #[serde(default)]
    pub max_connections_per_address: Option<usize>,
    /// Serve HTTPS with this certificate chain and key (PEM files).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_body_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_max_connections() -> usize {
    4096
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_timeout: default_header_timeout(),
            body_timeout: default_body_timeout(),
            idle_timeout: default_idle_timeout(),
            max_connections: default_max_connections(),
            max_connections_per_address: None,
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn default_data() -> PathBuf {
    PathBuf::from("./data")
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:8080".parse().expect("valid address")
}

/// Limits on `POST /v1/events`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// Bodies larger than this are refused with 413.
    #[serde(default = "default_max_body")]
    pub max_body: ByteSize,
    /// Encoded events waiting for the log's fsync; beyond it requests get 503.
    #[serde(default = "default_max_pending")]
    pub max_pending: ByteSize,
    /// How long a request may wait for room in the log before it gets 503.
    #[serde(default = "default_pending_wait", with = "humantime_serde")]
    pub pending_wait: Duration,
    /// Events in the log that no published batch run covers yet, at most;
    /// beyond it ingest answers 503 until the batch layer catches up.
    #[serde(default = "default_max_unpublished")]
    pub max_unpublished: u64,
    /// Memory of the realtime states, at most; beyond it ingest answers 503.
    #[serde(default = "default_max_realtime_memory")]
    pub max_realtime_memory: ByteSize,
    /// The dead-letter store's files together, at most; beyond it the
    /// oldest files are removed (a `health` warning and a metric say so).
    #[serde(default = "default_dead_letter_max")]
    pub dead_letter_max: ByteSize,
    /// What is remembered of producers' requests (`Lambdaflow-Producer`,
    /// `Lambdaflow-Sequence`) to recognise a re-sent one.
    #[serde(default)]
    pub idempotence: IdempotenceConfig,
}

/// `[ingest.idempotence]`: the request ledger's bounds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotenceConfig {
    /// Per producer, the most recent sequences remembered; an older one is
    /// refused (422) rather than stored again. At least the producer's
    /// requests in flight.
    #[serde(default = "default_idem_window")]
    pub window: usize,
    /// A producer not seen for this long is forgotten.
    #[serde(default = "default_forget_after", with = "humantime_serde")]
    pub forget_after: Duration,
    /// Producers remembered at once; a new one beyond forgets the idlest
    /// (unseen for an hour or more), else it is refused (503).
    #[serde(default = "default_max_producers")]
    pub max_producers: usize,
}

impl Default for IdempotenceConfig {
    fn default() -> Self {
        IdempotenceConfig {
            window: default_idem_window(),
            forget_after: default_forget_after(),
            max_producers: default_max_producers(),
        }
    }
}

fn default_idem_window() -> usize {
    256
}

fn default_forget_after() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

fn default_max_producers() -> usize {
    1_000
}

fn default_dead_letter_max() -> ByteSize {
    ByteSize::gib(1)
}

fn default_max_unpublished() -> u64 {
    1_000_000_000
}

fn default_max_realtime_memory() -> ByteSize {
    ByteSize::gib(4)
}

fn default_max_body() -> ByteSize {
    ByteSize::mib(64)
}

fn default_max_pending() -> ByteSize {
    ByteSize::mib(256)
}

fn default_pending_wait() -> Duration {
    Duration::from_millis(500)
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_body: default_max_body(),
            max_pending: default_max_pending(),
            pending_wait: default_pending_wait(),
            max_unpublished: default_max_unpublished(),
            max_realtime_memory: default_max_realtime_memory(),
            dead_letter_max: default_dead_letter_max(),
            idempotence: IdempotenceConfig::default(),
        }
    }
}

/// The speed layer's micro-batches.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeedConfig {
    #[serde(default = "default_speed_interval", with = "humantime_serde")]
    pub interval: Duration,
}

fn default_speed_interval() -> Duration {
    Duration::from_millis(50)
}

impl Default for SpeedConfig {
    fn default() -> Self {
        SpeedConfig {
            interval: default_speed_interval(),
        }
    }
}

/// How the stream is cut into chunks of the master dataset. Boundaries are
/// a function of the records, so every consumer cuts the same chunks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveConfig {
    /// A chunk ends after this many events.
    #[serde(default = "default_chunk_events")]
    pub chunk_events: u64,
    /// A chunk ends before the first record whose stream time falls in a
    /// later bucket of this length than its first record's, or in one more
    /// than a minute (and at least one bucket) earlier: a record stamped far
    /// in the future forms a chunk of its own. An idle chunk closes once its
    /// bucket has passed on the clock, or lies further ahead of it than that.
    #[serde(default = "default_chunk_age", with = "humantime_serde")]
    pub chunk_age: Duration,
}

fn default_chunk_events() -> u64 {
    1_000_000
}

fn default_chunk_age() -> Duration {
    Duration::from_secs(10)
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            chunk_events: default_chunk_events(),
            chunk_age: default_chunk_age(),
        }
    }
}

/// The batch layer's loop.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    #[serde(default = "default_batch_pause", with = "humantime_serde")]
    pub pause: Duration,
    /// On an `s3://` root, how long the driver lease lasts unless renewed:
    /// when its holder dies, another node takes over within this time.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: Duration,
    /// How often a node that does not drive looks for a new publish.
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll: Duration,
    /// Where each view's states are computed: `local` (this process), or
    /// `ballista` (an Apache DataFusion Ballista cluster, at `scheduler`).
    #[serde(default)]
    pub engine: EngineKind,
    /// The Ballista scheduler, `df://host:port` (port 50050 if left out).
    #[serde(default)]
    pub scheduler: Option<String>,
    /// A view is recomputed from scratch after this many incremental runs
    /// in a row (0: never by count; see `full_every_time`).
    #[serde(default)]
    pub full_every: u32,
    /// …and when its last full recompute started this long ago: the paper's
    /// guarantee that every batch view is, at least this often, a function
    /// of the whole master dataset alone.
    #[serde(default = "default_full_every_time", with = "humantime_serde")]
    pub full_every_time: Duration,
    /// Published runs kept for time travel (`?as_of=`) besides the current
    /// one: a run goes once it is beyond the last `keep_runs` *and* older
    /// than `keep_for`.
    #[serde(default = "default_keep_runs")]
    pub keep_runs: usize,
    #[serde(default = "default_keep_for", with = "humantime_serde")]
    pub keep_for: Duration,
    /// A view whose last run had at least this many groups is computed with
    /// its events split among the cores by group key, each core holding
    /// its own share of the groups, instead of every core aggregating its
    /// own files into all of them and one core merging the results.
    #[serde(default = "default_shuffle_above_groups")]
    pub shuffle_above_groups: u64,
    /// A view with more groups than this writes no `rows.tsv` (its states
    /// are what every reader uses; the TSV is the paper's file for people
    /// and scripts, a third of a large view's run). 0: never written.
    #[serde(default = "default_tsv_max_rows")]
    pub tsv_max_rows: u64,
}

/// `[batch] engine`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    #[default]
    Local,
    Ballista,
}

impl BatchConfig {
    /// The scheduler's gRPC address (`http://host:port`) from `scheduler`.
    pub fn scheduler_url(&self) -> Result<String, String> {
        let s = self
            .scheduler
            .as_deref()
            .ok_or_else(|| "`engine = \"ballista\"` needs `scheduler`".to_string())?;
        let url = url::Url::parse(s).map_err(|e| format!("`{s}` is not a URL: {e}"))?;
        if url.scheme() != "df" {
            return Err(format!("`{s}` is not a df:// URL"));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("`{s}` names no host"))?;
        Ok(format!("http://{host}:{}", url.port().unwrap_or(50050)))
    }
}

fn default_batch_pause() -> Duration {
    Duration::from_secs(60)
}

fn default_full_every_time() -> Duration {
    Duration::from_secs(86_400)
}

fn default_keep_runs() -> usize {
    10
}

fn default_shuffle_above_groups() -> u64 {
    200_000
}

fn default_tsv_max_rows() -> u64 {
    100_000
}

fn default_keep_for() -> Duration {
    Duration::from_secs(3600)
}

fn default_lease() -> Duration {
    Duration::from_secs(10)
}

fn default_poll() -> Duration {
    Duration::from_secs(1)
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            pause: default_batch_pause(),
            lease: default_lease(),
            poll: default_poll(),
            engine: EngineKind::Local,
            scheduler: None,
            full_every: 0,
            full_every_time: default_full_every_time(),
            keep_runs: default_keep_runs(),
            keep_for: default_keep_for(),
            shuffle_above_groups: default_shuffle_above_groups(),
            tsv_max_rows: default_tsv_max_rows(),
        }
    }
}

/// `[schema]`: the event fields and which one is the event time.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaConfig {
    pub event_time: String,
    pub fields: Vec<FieldConfig>,
    /// `reject` (default) or `drop` events' fields that are not in `fields`.
    #[serde(default)]
    pub unknown_fields: UnknownFields,
    /// The events' key: an event whose key its partition saw within the
    /// horizon is a duplicate, counted by no view (`crate::keys`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<EventKeyConfig>,
}

/// `[schema] key = { field = "event_id", within = "7d" }`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EventKeyConfig {
    /// A field of the schema that may not be null: a string or an integer.
    pub field: String,
    /// How long a key is remembered, in the partition's stream time.
    #[serde(with = "humantime_serde", default = "default_key_within")]
    pub within: Duration,
}

fn default_key_within() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

impl Default for SchemaConfig {
    fn default() -> Self {
        let f = |name: &str, ty| FieldConfig {
            name: name.into(),
            ty,
            format: None,
            nullable: false,
        };
        SchemaConfig {
            event_time: "timestamp".into(),
            fields: vec![
                f("zipcode", FieldType::Int64),
                f("ProductName", FieldType::Utf8),
                f("price", FieldType::Int64),
                FieldConfig {
                    format: Some(PAPER_TIME_FORMAT.into()),
                    ..f("timestamp", FieldType::TimestampMs)
                },
            ],
            unknown_fields: UnknownFields::Reject,
            key: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldConfig {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: FieldType,
    /// For timestamps: a chrono format, or `rfc3339`, `epoch_s`, `epoch_ms`, `epoch_us`.
    #[serde(default)]
    pub format: Option<String>,
    /// A nullable field may be missing or `null` in an event.
    #[serde(default)]
    pub nullable: bool,
}

/// The paper's views: sales per product, per zipcode, and per minute per product.
fn default_views() -> Vec<ViewConfig> {
    let v = |name: &str, sql: &str| ViewConfig {
        name: name.into(),
        sql: sql.into(),
        rollup: Vec::new(),
    };
    vec![
        v(
            "sales_by_product",
            "SELECT ProductName, count(*) AS orders, sum(price) AS revenue \
             FROM events GROUP BY ProductName",
        ),
        v(
            "sales_by_zipcode",
            "SELECT zipcode, count(*) AS orders, sum(price) AS revenue \
             FROM events GROUP BY zipcode",
        ),
        v(
            "sales_per_minute",
            "SELECT date_trunc('minute', timestamp) AS minute, ProductName, \
             count(*) AS orders, sum(price) AS revenue, avg(price) AS avg_price, \
             approx_distinct(zipcode) AS zipcodes \
             FROM events GROUP BY date_trunc('minute', timestamp), ProductName",
        ),
    ]
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data: default_data(),
            listen: default_listen(),
            stream: StreamConfig::default(),
            ingest: IngestConfig::default(),
            speed: SpeedConfig::default(),
            archive: ArchiveConfig::default(),
            batch: BatchConfig::default(),
            schema: SchemaConfig::default(),
            views: default_views(),
            auth: AuthConfig::default(),
            http: HttpConfig::default(),
            pg: PgConfig::default(),
        }
    }
}

impl Config {
    /// Loads `path`, or the paper's defaults with no path, and checks it.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            let config = Config::default();
            config.check(None)?;
            return Ok(config);
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        config.check(Some(path))?;
        Ok(config)
    }

    /// Whether the master dataset and the views live on an object store
    /// (`s3://…`) rather than in a local directory.
    pub fn data_is_remote(&self) -> bool {
        self.data.to_str().is_some_and(|d| d.starts_with("s3://"))
    }

    /// The storage root of the master dataset and the batch views.
    pub fn storage(&self) -> Result<crate::storage::Storage, crate::storage::StorageError> {
        crate::storage::Storage::open(&self.data)
    }

    /// The node's own directory: the log, the dead-letter store, the locks.
    pub fn local_dir(&self) -> PathBuf {
        match &self.stream.dir {
            Some(d) => d.clone(),
            None if self.data_is_remote() => PathBuf::from("./lambdaflow-local"),
            None => self.data.clone(),
        }
    }

    /// Parses TOML text; the error names the line, the key and the reason.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    /// Checks what types alone cannot: names, references, ranges.
    pub fn check(&self, path: Option<&Path>) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: String, hint: Option<String>| ConfigError::Invalid {
            path: path.map(Path::to_path_buf),
            key: key.to_string(),
            reason,
            hint,
        };
        if let Some(rest) = self.data.to_str().and_then(|d| d.strip_prefix("s3://"))
            && rest.split('/').next().is_none_or(str::is_empty)
        {
            return Err(invalid(
                "data",
                format!("`{}` names no bucket", self.data.display()),
                Some("write it as \"s3://bucket/prefix\"".into()),
            ));
        }
        if self.data.to_string_lossy().contains("://") && !self.data_is_remote() {
            return Err(invalid(
                "data",
                format!(
                    "`{}` is not a storage root lambdaflow knows",
                    self.data.display()
                ),
                Some("use a local directory such as \"./data\", or \"s3://bucket/prefix\"".into()),
            ));
        }
        if self.batch.lease < Duration::from_secs(2) {
            return Err(invalid(
                "batch.lease",
                format!(
                    "must be at least 2s, got {}",
                    humantime::format_duration(self.batch.lease)
                ),
                Some("the holder renews it three times per lease; shorter leases flap on a slow store".into()),
            ));
        }
        match (self.batch.engine, &self.batch.scheduler) {
            (EngineKind::Ballista, _) => {
                if let Err(reason) = self.batch.scheduler_url() {
                    return Err(invalid(
                        "batch.scheduler",
                        reason,
                        Some("write it as scheduler = \"df://host:50050\"".into()),
                    ));
                }
                if !cfg!(feature = "ballista") {
                    return Err(invalid(
                        "batch.engine",
                        "this lambdaflow was built without Ballista".into(),
                        Some("build it with `cargo build --release --features ballista`".into()),
                    ));
                }
            }
            (EngineKind::Local, Some(_)) => {
                return Err(invalid(
                    "batch.scheduler",
                    "is set, but `engine` is `local`: nothing would use it".into(),
                    Some(
                        "set engine = \"ballista\" to compute batch runs on that scheduler".into(),
                    ),
                ));
            }
            (EngineKind::Local, None) => {}
        }
        if self.stream.kafka.is_some() && self.stream.kinesis.is_some() {
            return Err(invalid(
                "stream",
                "set `kafka` or `kinesis`, not both: a node consumes one stream".into(),
                None,
            ));
        }
        if let Some(k) = &self.stream.kinesis
            && k.stream.is_empty()
        {
            return Err(invalid(
                "stream.kinesis.stream",
                "must name the stream".into(),
                None,
            ));
        }
        if self.stream.partitions == 0 || self.stream.partitions > 1024 {
            return Err(invalid(
                "stream.partitions",
                format!("must be between 1 and 1024, got {}", self.stream.partitions),
                None,
            ));
        }
        if self.stream.segment_bytes.as_u64() < 4096 {
            return Err(invalid(
                "stream.segment_bytes",
                format!("must be at least 4 KiB, got {}", self.stream.segment_bytes),
                None,
            ));
        }
        if self.ingest.max_body.as_u64() == 0 || self.ingest.max_pending.as_u64() == 0 {
            return Err(invalid(
                "ingest",
                "max_body and max_pending must be positive".into(),
                None,
            ));
        }
        if self.http.max_connections == 0 || self.http.max_connections_per_address == Some(0) {
            return Err(invalid(
                "http",
                "max_connections and max_connections_per_address must be positive".into(),
                None,
            ));
        }
        if self.http.idle_timeout.is_zero() || self.http.header_timeout.is_zero() {
            return Err(invalid(
                "http",
                "header_timeout and idle_timeout must be positive".into(),
                None,
            ));
        }
        if self.pg.idle_timeout.is_zero() || self.pg.startup_timeout.is_zero() {
            return Err(invalid(
                "pg",
                "startup_timeout and idle_timeout must be positive".into(),
                None,
            ));
        }
        if self.speed.interval.is_zero() {
            return Err(invalid("speed.interval", "must be positive".into(), None));
        }
        if self.archive.chunk_events == 0 {
            return Err(invalid(
                "archive.chunk_events",
                "must be positive".into(),
                None,
            ));
        }
        let schema = self.event_schema_unchecked(path)?;
        if let Some(key) = &self.stream.key
            && schema.index_of(key).is_none()
        {
            return Err(invalid(
                "stream.key",
                format!("no field named `{key}` in the schema"),
                schema.suggest(key).map(|s| format!("did you mean `{s}`?")),
            ));
        }
        if let Some(k) = &self.schema.key {
            let Some(i) = schema.index_of(&k.field) else {
                return Err(invalid(
                    "schema.key.field",
                    format!("no field named `{}` in the schema", k.field),
                    schema
                        .suggest(&k.field)
                        .map(|s| format!("did you mean `{s}`?")),
                ));
            };
            let f = &schema.fields()[i];
            if f.nullable {
                return Err(invalid(
                    "schema.key.field",
                    format!(
                        "`{}` may be null, and an event without a key cannot be told from another",
                        k.field
                    ),
                    Some(format!(
                        "make `{}` not nullable: events without it are then refused with the line and reason",
                        k.field
                    )),
                ));
            }
            if !crate::keys::hashable(&f.ty.arrow()) {
                return Err(invalid(
                    "schema.key.field",
                    format!(
                        "`{}` is a {:?} field; a key is a string or an integer",
                        k.field, f.ty
                    ),
                    None,
                ));
            }
            if k.within < Duration::from_secs(1) {
                return Err(invalid(
                    "schema.key.within",
                    "must be at least 1s".into(),
                    None,
                ));
            }
            if let Some(s) = &self.stream.key
                && *s != k.field
            {
                return Err(invalid(
                    "stream.key",
                    format!(
                        "partitions by `{s}`, but duplicates are found per partition by `{}`",
                        k.field
                    ),
                    Some(format!(
                        "leave stream.key out (the stream is then partitioned by `{}`) or set it to the same field",
                        k.field
                    )),
                ));
            }
        }
        for (i, t) in self.auth.tokens.iter().enumerate() {
            let key = format!("auth.tokens[{i}]");
            match (&t.token, &t.env) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(invalid(
                        &key,
                        "give exactly one of `token` and `env`".into(),
                        Some("env = \"NAME\" keeps the token out of the file".into()),
                    ));
                }
                (None, Some(e)) if std::env::var(e).is_err() => {
                    return Err(invalid(
                        &format!("{key}.env"),
                        format!("the environment variable `{e}` is not set"),
                        None,
                    ));
                }
                _ => {}
            }
            if t.value().is_some_and(|v| v.len() < 16) {
                return Err(invalid(
                    &key,
                    "a token must be at least 16 characters".into(),
                    Some("generate one with `openssl rand -hex 24`".into()),
                ));
            }
            if t.scopes.is_empty() {
                return Err(invalid(
                    &format!("{key}.scopes"),
                    "a token needs at least one scope: \"ingest\", \"query\"".into(),
                    None,
                ));
            }
        }
        if !self.listen.ip().is_loopback() && self.auth.tokens.is_empty() {
            return Err(invalid(
                "listen",
                format!(
                    "{} is not a loopback address, and no access tokens are configured",
                    self.listen
                ),
                Some("add [auth] tokens (with scopes \"ingest\" and \"query\"), or listen on 127.0.0.1".into()),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, v) in self.views.iter().enumerate() {
            if let Err(e) = crate::view::check_name(&v.name) {
                return Err(invalid(
                    &format!("views[{i}].name"),
                    e.to_string(),
                    crate::error::Explain::hint(&e),
                ));
            }
            if !names.insert(v.name.to_ascii_lowercase()) {
                return Err(invalid(
                    &format!("views[{i}].name"),
                    format!("view `{}` is declared twice", v.name),
                    Some("view names differing only in case are one name to SQL (unquoted identifiers are read in lower case)".into()),
                ));
            }
            if v.sql.trim().is_empty() {
                return Err(invalid(&format!("views[{i}].sql"), "is empty".into(), None));
            }
        }
        Ok(())
    }

    /// The validated event schema.
    pub fn event_schema(&self) -> Result<EventSchema, ConfigError> {
        self.event_schema_unchecked(None)
    }

    fn event_schema_unchecked(&self, path: Option<&Path>) -> Result<EventSchema, ConfigError> {
        let invalid = |key: String, reason: String, hint: Option<String>| ConfigError::Invalid {
            path: path.map(Path::to_path_buf),
            key,
            reason,
            hint,
        };
        let s = &self.schema;
        if s.fields.is_empty() {
            return Err(invalid(
                "schema.fields".into(),
                "the schema has no fields".into(),
                None,
            ));
        }
        let mut fields: Vec<EventField> = Vec::with_capacity(s.fields.len());
        for (i, f) in s.fields.iter().enumerate() {
            let key = format!("schema.fields[{i}]");
            if f.name.is_empty() || f.name.starts_with('_') {
                return Err(invalid(
                    format!("{key}.name"),
                    format!(
                        "`{}` is not allowed: names must be non-empty and not start with `_` (reserved for `_partition`, `_offset`, `_ingest_time`)",
                        f.name
                    ),
                    None,
                ));
            }
            if fields.iter().any(|g| g.name == f.name) {
                return Err(invalid(
                    format!("{key}.name"),
                    format!("field `{}` is declared twice", f.name),
                    None,
                ));
            }
            let time_format = match (&f.format, f.ty.is_timestamp()) {
                (Some(fmt), true) => {
                    let tf = TimeFormat::parse(fmt);
                    if let TimeFormat::Strftime { .. } = tf
                        && tf.example().is_empty()
                    {
                        return Err(invalid(
                            format!("{key}.format"),
                            format!("`{fmt}` is not a valid chrono time format"),
                            Some(format!(
                                "the paper's format is \"{PAPER_TIME_FORMAT}\"; \"rfc3339\", \"epoch_s\", \"epoch_ms\" and \"epoch_us\" are also accepted"
                            )),
                        ));
                    }
                    Some(tf)
                }
                (None, true) => Some(TimeFormat::Rfc3339),
                (Some(_), false) => {
                    return Err(invalid(
                        format!("{key}.format"),
                        format!(
                            "`format` only applies to timestamp fields; `{}` is {}",
                            f.name, f.ty
                        ),
                        None,
                    ));
                }
                (None, false) => None,
            };
            fields.push(EventField {
                name: f.name.clone(),
                ty: f.ty,
                nullable: f.nullable,
                time_format,
            });
        }
        let Some(event_time) = fields.iter().position(|f| f.name == s.event_time) else {
            let hint =
                crate::schema::suggest(&s.event_time, fields.iter().map(|f| f.name.as_str()))
                    .map(|n| format!("did you mean `{n}`?"));
            return Err(invalid(
                "schema.event_time".into(),
                format!("no field named `{}` in schema.fields", s.event_time),
                hint,
            ));
        };
        let et = &fields[event_time];
        if !et.ty.is_timestamp() {
            return Err(invalid(
                "schema.event_time".into(),
                format!(
                    "field `{}` is {}, but the event time must be a timestamp",
                    et.name, et.ty
                ),
                Some("declare it with type = \"timestamp_ms\" and its `format`".into()),
            ));
        }
        if et.nullable {
            return Err(invalid(
                "schema.event_time".into(),
                format!(
                    "field `{}` is nullable, but every event needs an event time",
                    et.name
                ),
                None,
            ));
        }
        let mut schema = EventSchema::new(fields, event_time);
        schema.set_unknown_fields(s.unknown_fields);
        schema.set_key(s.key.as_ref().and_then(|k| {
            Some(crate::schema::EventKey {
                field: schema.index_of(&k.field)?,
                within: k.within,
            })
        }));
        Ok(schema)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_papers_workload() {
        let c = Config::load(None).expect("defaults are valid");
        let s = c.event_schema().unwrap();
        let names: Vec<_> = s.fields().iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["zipcode", "ProductName", "price", "timestamp"]);
        assert_eq!(s.event_time().name, "timestamp");
        assert_eq!(c.stream.partitions, 2);
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.views.len(), 3);
    }

    #[test]
    fn the_designs_example_file_parses() {
        let text = r#"
data = "./data"
listen = "127.0.0.1:8080"

[stream]
partitions = 2

[speed]
interval = "100ms"

[archive]
chunk_events = 1_000_000
chunk_age = "10s"

[batch]
pause = "1m"

[schema]
event_time = "timestamp"
fields = [
  { name = "zipcode",     type = "int64" },
  { name = "ProductName", type = "utf8" },
  { name = "price",       type = "int64" },
  { name = "timestamp",   type = "timestamp_ms", format = "%Y-%m-%d %H:%M:%S%.3f" },
]

[[views]]
name = "sales_by_product"
sql = "SELECT ProductName, count(*) AS orders, sum(price) AS revenue FROM events GROUP BY ProductName"
"#;
        let c = Config::parse(text).expect("the design's example must parse");
        c.check(None).expect("and be valid");
        assert_eq!(c.speed.interval, Duration::from_millis(100));
        assert_eq!(c.batch.pause, Duration::from_secs(60));
        assert_eq!(c.views.len(), 1);
        assert_eq!(
            c.event_schema().unwrap().event_time().time_format,
            Some(TimeFormat::Paper)
        );
    }

    #[test]
    fn the_example_file_is_valid_and_equals_the_defaults() {
        let mut c = Config::parse(include_str!("../examples/lambdaflow.toml"))
            .expect("examples/lambdaflow.toml must parse");
        c.check(None).expect("and be valid");
        for v in &mut c.views {
            v.sql = v.sql.split_whitespace().collect::<Vec<_>>().join(" ");
        }
        let d = Config::default();
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::to_value(&d).unwrap(),
            "the example documents the defaults; keep them equal"
        );
    }

    #[test]
    fn a_typo_in_a_key_names_the_key_and_line() {
        let err = Config::parse("[stream]\npartitons = 4\n").unwrap_err();
        assert!(
            err.contains("partitons"),
            "error must name the bad key: {err}"
        );
        assert!(err.contains("line 2"), "error must name the line: {err}");
    }

    #[test]
    fn a_bad_type_lists_the_valid_ones() {
        let err = Config::parse(
            "[schema]\nevent_time = \"t\"\nfields = [{ name = \"t\", type = \"datetime\" }]\n",
        )
        .unwrap_err();
        assert!(err.contains("unknown field type `datetime`"), "{err}");
        assert!(err.contains("timestamp_ms"), "{err}");
    }

    #[test]
    fn event_time_must_exist_and_be_a_timestamp() {
        let mut c = Config::default();
        c.schema.event_time = "timestmap".into();
        let err = crate::error::Report::of(&c.check(None).unwrap_err()).to_string();
        assert!(err.contains("schema.event_time"), "{err}");
        assert!(err.contains("did you mean `timestamp`"), "{err}");

        c.schema.event_time = "price".into();
        let err = c.check(None).unwrap_err().to_string();
        assert!(err.contains("must be a timestamp"), "{err}");
    }

    #[test]
    fn a_missing_file_names_the_file() {
        let err = Config::load(Some(Path::new("/nonexistent/lambdaflow.toml"))).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/lambdaflow.toml"),
            "{err}"
        );
    }
}
