//! Amazon Kinesis as the stream: each shard is a partition, a record's
//! position is its ordinal within the shard (dense, from 0), each record is
//! one event (a JSON object).
//!
//! ```text
//!  ListShards ─(every 2 s)─▶ registry: shard id ↔ partition (created with a conditional put)
//!  shard ─GetRecords (one poller per shard, ≤ 5 calls/s)─▶ decode ─▶ cache [base, head)
//!                                                                    │
//!        read(p, [from, until)) ◀── speed layer (head), archiver (closed chunks)
//!        archived(p, end) ──▶ the cache drops what the master dataset holds
//! ```
//!
//! Kinesis has no offsets to seek to, only sequence numbers, and GetRecords
//! has a budget of 5 calls and 2 MB per second per shard shared by every
//! reader. So one poller per shard reads it once, into a cache that both
//! the speed layer and the archiver read; the archiver's commits release it.
//! Each committed chunk keeps the sequence number of its last record (its
//! *resume token*), and a restart resumes `AFTER_SEQUENCE_NUMBER` of the
//! chunk that ends at the published H. The cache is bounded: a poller waits
//! while the master dataset is behind (the stream keeps the records).
//!
//! Resharding: a shard closed by a split or a merge ends (GetRecords gives no
//! next iterator); its partition is final, [`Source::finished`], and its last
//! chunk closes at its end. Its children are registered as new partitions,
//! read from their first record once their parents are read to the end.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::error::ProvideErrorMetadata;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ShardIteratorType};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::cache::{Fetch, ReadAhead};
use super::deadletter::DeadLetters;
use super::decode::Decoder;
use super::source::{
    Delivery, PartitionInfo, PartitionState, RawRecord, Source, SourceBatch, SourceError,
    decode_records,
};
use crate::health::Health;
use crate::storage::Storage;

/// GetRecords may be called 5 times a second per shard.
const MIN_POLL: Duration = Duration::from_millis(200);
/// How often the shard list is read for splits and merges.
const LIST_EVERY: Duration = Duration::from_secs(2);
/// A poller waits while the cache holds this much above the archived end.
const MAX_CACHED_BYTES: usize = 256 << 20;
/// At most this many records per GetRecords (the API's limit).
const GET_LIMIT: i32 = 10_000;
/// PutRecords takes at most 500 records, 5 MiB, per call.
const PUT_RECORDS: usize = 500;
const PUT_BYTES: usize = 5 << 20;

/// `[stream] kinesis = { stream, region, endpoint, poll }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KinesisConfig {
    pub stream: String,
    /// The AWS region; else the usual chain (`AWS_REGION`, the profile).
    #[serde(default)]
    pub region: Option<String>,
    /// Another endpoint than AWS's (an emulator, a VPC endpoint).
    #[serde(default)]
    pub endpoint: Option<String>,
    /// How often each shard is polled when it has nothing new (at least
    /// 200 ms: GetRecords' budget of 5 calls/s per shard is shared by every
    /// reader of the stream).
    #[serde(default = "default_poll", with = "humantime_serde")]
    pub poll: Duration,
}

fn default_poll() -> Duration {
    Duration::from_millis(250)
}

impl KinesisConfig {
    /// A client: credentials from the usual AWS chain (environment,
    /// profile, web identity, container or instance metadata); HTTPS with
    /// rustls and ring.
    pub async fn client(&self) -> Client {
        Client::new(&self.sdk_config().await)
    }

    /// A client for the shard readers and the producer: the SDK does not
    /// retry on its own, so a throttled call is seen at once (in `status`),
    /// the caller's backoff alone decides when to call again, and a put is
    /// never sent twice behind the caller's back.
    async fn reader_client(&self) -> Client {
        let conf = aws_sdk_kinesis::config::Builder::from(&self.sdk_config().await)
            .retry_config(aws_sdk_kinesis::config::retry::RetryConfig::disabled())
            .build();
        Client::from_conf(conf)
    }

    async fn sdk_config(&self) -> aws_config::SdkConfig {
        use aws_smithy_http_client::tls;
        // Idle connections are dropped before a server's keep-alive (5 s
        // and up) can close them under a call: a call on such a connection
        // fails without an answer, and a put would be in doubt.
        let http = aws_smithy_http_client::Builder::new()
            .pool_idle_timeout(Duration::from_secs(4))
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        // Bounded calls: a call that hangs (a service or a network that
        // stops answering) fails, and is reported, instead of holding an
        // ingest request or a shard reader for good.
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .operation_attempt_timeout(Duration::from_secs(20))
            .build();
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http)
            .timeout_config(timeouts);
        if let Some(r) = &self.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        if let Some(e) = &self.endpoint {
            loader = loader.endpoint_url(e);
        }
        loader.load().await
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum KinesisError {
    #[error("cannot reach Kinesis stream `{stream}`: {detail}")]
    Connect { stream: String, detail: String },
    #[error("Kinesis stream `{stream}` does not exist")]
    NoStream { stream: String },
    #[error("reading shard {shard} (partition {partition}) failed: {detail}")]
    Read {
        shard: String,
        partition: u32,
        detail: String,
    },
    #[error(
        "shard {shard} (partition {partition}) has no record at position {position} any more on this node\nhint: {hint}"
    )]
    Released {
        shard: String,
        partition: u32,
        position: u64,
        hint: String,
    },
    #[error(
        "cannot resume shard {shard} (partition {partition}) at position {position}\nhint: {hint}"
    )]
    NoResumeToken {
        shard: String,
        partition: u32,
        position: u64,
        hint: String,
    },
    #[error("the shard registry of Kinesis stream `{stream}` cannot be {op}: {detail}")]
    Registry {
        stream: String,
        op: &'static str,
        detail: String,
    },
    #[error("PutRecords to Kinesis stream `{stream}` failed: {detail}")]
    Put { stream: String, detail: String },
}

impl From<KinesisError> for SourceError {
    fn from(e: KinesisError) -> SourceError {
        SourceError::Kinesis(Box::new(e))
    }
}

/// What AWS said: its error code and message for a service error, else the
/// cause chain (a connection refused, a timeout), without the raw response.
fn aws_detail<E, R>(e: aws_sdk_kinesis::error::SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    match (e.code(), e.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_string(),
        _ => {
            let mut out = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                out = format!("{out}: {c}");
                cause = c.source();
            }
            out
        }
    }
}

// ---------------------------------------------------------------------------
// The shard registry

/// One registered shard; its partition is its index in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardEntry {
    pub shard: String,
    /// The shard(s) it was split or merged from.
    #[serde(default)]
    pub parents: Vec<String>,
    /// The sequence number its records start at.
    pub first_sequence: String,
    /// A partition of a stream this root no longer reads (deleted and
    /// created again, or replaced: `accept-loss --stream`): final at its
    /// archived end, never polled; its shard id may be registered again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retired: bool,
}

/// Which partition each shard is: a list only ever appended to, one object
/// per generation, each created only if absent — so every node that reads
/// the latest generation sees the same numbering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    pub stream: String,
    pub generation: u64,
    pub shards: Vec<ShardEntry>,
}

fn registry_dir(stream: &str) -> String {
    format!("stream/kinesis/{stream}")
}

/// The object of a registry generation, under the storage root.
pub(crate) fn registry_object(stream: &str, generation: u64) -> String {
    format!("{}/shards-{generation:08}.json", registry_dir(stream))
}

impl Registry {
    /// The latest generation under `storage`, if any.
    pub async fn load(storage: &Storage, stream: &str) -> Result<Option<Registry>, KinesisError> {
        let fail = |op, detail: String| KinesisError::Registry {
            stream: stream.into(),
            op,
            detail,
        };
        let dir = registry_dir(stream);
        let latest = storage
            .list_files(&dir)
            .await
            .map_err(|e| fail("listed", e.to_string()))?
            .into_iter()
            .filter_map(|f| {
                f.strip_prefix("shards-")?
                    .strip_suffix(".json")?
                    .parse::<u64>()
                    .ok()
            })
            .max();
        let Some(g) = latest else { return Ok(None) };
        let bytes = storage
            .get(&format!("{dir}/shards-{g:08}.json"))
            .await
            .map_err(|e| fail("read", e.to_string()))?
            .ok_or_else(|| fail("read", format!("generation {g} vanished")))?;
        let r: Registry =
            serde_json::from_slice(&bytes).map_err(|e| fail("read", e.to_string()))?;
        Ok(Some(r))
    }

    /// Registers the shards of `listed` not registered yet (parents before
    /// their children), racing other nodes fairly: a generation lost to
    /// another writer is read back and the rest added after it.
    pub async fn extend(
        storage: &Storage,
        stream: &str,
        listed: &[ShardEntry],
    ) -> Result<Registry, KinesisError> {
        loop {
            let current = Registry::load(storage, stream).await?.unwrap_or(Registry {
                stream: stream.into(),
                generation: 0,
                shards: Vec::new(),
            });
            let mut missing: Vec<&ShardEntry> = listed
                .iter()
                .filter(|s| {
                    !current
                        .shards
                        .iter()
                        .any(|c| !c.retired && c.shard == s.shard)
                })
                .collect();
            if missing.is_empty() && current.generation > 0 {
                return Ok(current);
            }
            // Shard ids grow with creation, so a parent sorts before its child.
            missing.sort_by(|a, b| (a.shard.len(), &a.shard).cmp(&(b.shard.len(), &b.shard)));
            let mut next = current.clone();
            next.generation += 1;
            next.shards.extend(missing.into_iter().cloned());
            let body = serde_json::to_vec_pretty(&next).expect("a registry serializes");
            let name = format!(
                "{}/shards-{:08}.json",
                registry_dir(stream),
                next.generation
            );
            match storage.create(&name, Bytes::from(body)).await {
                Ok(true) => return Ok(next),
                Ok(false) => continue, // another node was first: build on its list
                Err(e) => {
                    return Err(KinesisError::Registry {
                        stream: stream.into(),
                        op: "written",
                        detail: e.to_string(),
                    });
                }
            }
        }
    }
}

/// Every shard of the stream, open and closed (within retention).
pub async fn list_shards(client: &Client, stream: &str) -> Result<Vec<ShardEntry>, KinesisError> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let req = match &token {
            Some(t) => client.list_shards().next_token(t),
            None => client.list_shards().stream_name(stream),
        };
        let resp = req.send().await.map_err(|e| {
            if e.as_service_error().and_then(|s| s.code()) == Some("ResourceNotFoundException") {
                KinesisError::NoStream {
                    stream: stream.into(),
                }
            } else {
                KinesisError::Connect {
                    stream: stream.into(),
                    detail: aws_detail(e),
                }
            }
        })?;
        for s in resp.shards() {
            out.push(ShardEntry {
                shard: s.shard_id().to_string(),
                parents: s
                    .parent_shard_id()
                    .into_iter()
                    .chain(s.adjacent_parent_shard_id())
                    .map(str::to_string)
                    .collect(),
                first_sequence: s
                    .sequence_number_range()
                    .map(|r| r.starting_sequence_number().to_string())
                    .unwrap_or_default(),
                retired: false,
            });
        }
        match resp.next_token() {
            Some(t) => token = Some(t.to_string()),
            None => return Ok(out),
        }
    }
}

/// The registry of `config.stream` after registering every shard listed
/// now: what a node's partition count is at startup.
pub async fn resolve(storage: &Storage, config: &KinesisConfig) -> Result<Registry, KinesisError> {
    let client = config.client().await;
    let listed = list_shards(&client, &config.stream).await?;
    Registry::extend(storage, &config.stream, &listed).await
}

// ---------------------------------------------------------------------------
// The source

struct ShardState {
    /// The records read and not yet archived, with their sequence numbers.
    cache: ReadAhead,
    finished: bool,
    throttled: bool,
    started: bool,
    /// How far behind the shard's tip the poller is, as GetRecords says.
    millis_behind: i64,
    /// Records below this were written to the dead-letter store already.
    dead_mark: u64,
}

impl ShardState {
    fn new() -> ShardState {
        ShardState {
            cache: ReadAhead::at(0, None),
            finished: false,
            throttled: false,
            started: false,
            millis_behind: 0,
            dead_mark: 0,
        }
    }
}

struct Shard {
    partition: u32,
    entry: ShardEntry,
    state: Mutex<ShardState>,
    head: watch::Sender<u64>,
}

/// A Kinesis stream as a [`Source`].
pub struct KinesisSource {
    config: KinesisConfig,
    client: Client,
    storage: Storage,
    decoder: Decoder,
    dead: Arc<DeadLetters>,
    shards: RwLock<Vec<Arc<Shard>>>,
    health: Option<Arc<Health>>,
    stopped: AtomicBool,
}

impl KinesisSource {
    /// The stream as registered under `storage`; nothing is read until
    /// [`KinesisSource::resume`].
    pub async fn open(
        config: KinesisConfig,
        storage: Storage,
        decoder: Decoder,
        dead: Arc<DeadLetters>,
        health: Option<Arc<Health>>,
    ) -> Result<Arc<KinesisSource>, KinesisError> {
        let client = config.reader_client().await;
        // The readers' client does not retry by itself; a passing failure
        // (a 500, a throttled call) must not stop the node from starting.
        // Five more tries, 0.4 s to 6.4 s apart, while it cannot connect.
        use backon::Retryable;
        let listed = (|| list_shards(&client, &config.stream))
            .retry(
                backon::ExponentialBuilder::new()
                    .with_min_delay(Duration::from_millis(400))
                    .with_max_delay(Duration::from_millis(6400))
                    .with_max_times(5),
            )
            .when(|e| matches!(e, KinesisError::Connect { .. }))
            .await?;
        let registry = Registry::extend(&storage, &config.stream, &listed).await?;
        let source = Arc::new(KinesisSource {
            config,
            client,
            storage,
            decoder,
            dead,
            shards: RwLock::new(Vec::new()),
            health,
            stopped: AtomicBool::new(false),
        });
        source.add_shards(&registry);
        Ok(source)
    }

    fn add_shards(&self, registry: &Registry) {
        let mut shards = self.shards.write().expect("kinesis shards");
        for (p, entry) in registry.shards.iter().enumerate().skip(shards.len()) {
            let mut state = ShardState::new();
            state.dead_mark = self.dead.stream_mark(&self.dead_key(), p as u32);
            // A retired partition is final where it is, never polled.
            (state.finished, state.started) = (entry.retired, entry.retired);
            shards.push(Arc::new(Shard {
                partition: p as u32,
                entry: entry.clone(),
                state: Mutex::new(state),
                head: watch::channel(0).0,
            }));
        }
    }

    /// This stream's key in the dead-letter store's marks.
    fn dead_key(&self) -> String {
        format!("kinesis/{}", self.config.stream)
    }

    fn shard(&self, p: u32) -> Result<Arc<Shard>, SourceError> {
        self.shards
            .read()
            .expect("kinesis shards")
            .get(p as usize)
            .cloned()
            .ok_or_else(|| {
                SourceError::Log(super::LogError::NoSuchPartition {
                    partition: p,
                    partitions: self.partitions(),
                })
            })
    }

    /// Starts reading each partition at `from[p]` (the published H), after
    /// the record whose sequence number is `tokens[p]` (the resume token the
    /// chunk ending at H keeps; none at 0). Partitions beyond `from` start
    /// at 0. Then follows the shard list for splits and merges.
    pub fn resume(
        self: &Arc<Self>,
        from: &[u64],
        tokens: &[Option<String>],
    ) -> Result<(), KinesisError> {
        let shards = self.shards.read().expect("kinesis shards").clone();
        for s in &shards {
            let p = s.partition as usize;
            let at = from.get(p).copied().unwrap_or(0);
            let seq = tokens.get(p).cloned().flatten();
            if at > 0 && seq.is_none() && !s.entry.retired {
                return Err(KinesisError::NoResumeToken {
                    shard: s.entry.shard.clone(),
                    partition: s.partition,
                    position: at,
                    hint: "the master dataset's chunk that ends there keeps no sequence number (it was not written from this Kinesis stream); use the data directory of this stream".into(),
                });
            }
            let mut st = s.state.lock().expect("shard state");
            st.cache = ReadAhead::at(at, seq);
            st.dead_mark = at.max(self.dead.stream_mark(&self.dead_key(), s.partition));
            s.head.send_replace(at);
        }
        for s in shards {
            self.start_poller(s);
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(follow_shards(weak));
        Ok(())
    }

    fn start_poller(self: &Arc<Self>, shard: Arc<Shard>) {
        {
            let mut st = shard.state.lock().expect("shard state");
            if st.started {
                return;
            }
            st.started = true;
        }
        tokio::spawn(poll_shard(Arc::downgrade(self), shard));
    }

    /// Whether every parent of `shard` that this node reads is read to its end.
    fn parents_done(&self, shard: &Shard) -> bool {
        let shards = self.shards.read().expect("kinesis shards");
        shard.entry.parents.iter().all(|parent| {
            shards
                .iter()
                .find(|s| !s.entry.retired && &s.entry.shard == parent)
                .is_none_or(|s| s.state.lock().expect("shard state").finished)
        })
    }

    /// Whether `shard`, which Kinesis says does not exist, has expired: the
    /// stream is there but no longer lists it (AWS drops a closed shard once
    /// its records are past retention, and answers `ResourceNotFound` for
    /// it). Then its partition ends where this node read it to, as KCL
    /// ends it, with a note: records past `at`, if it had any, are gone.
    async fn expired(&self, shard: &Shard, at: u64) -> bool {
        let Ok(listed) = list_shards(&self.client, &self.config.stream).await else {
            return false; // the stream itself is gone or unreachable
        };
        if listed.iter().any(|l| l.shard == shard.entry.shard) {
            return false;
        }
        finish(shard, at);
        let note = format!(
            "shard {} has expired (past the stream's retention, no longer listed); its partition ends at position {at}, where this node had read it to: records after it, if it had any, could not be read",
            shard.entry.shard
        );
        tracing::warn!(shard = %shard.entry.shard, partition = shard.partition, at, "a Kinesis shard has expired; its partition ends");
        if let Some(h) = &self.health {
            h.clear(&format!("stream/p{}", shard.partition));
            h.recovered(&format!("stream/p{}", shard.partition), &note);
        }
        true
    }

    fn report_read(&self, shard: &Shard, detail: String) {
        self.report(
            shard.partition,
            &KinesisError::Read {
                shard: shard.entry.shard.clone(),
                partition: shard.partition,
                detail,
            },
        );
    }

    fn report(&self, p: u32, e: &KinesisError) {
        if let Some(h) = &self.health {
            let n = h.report_error(&format!("stream/p{p}"), e);
            if n.is_power_of_two() {
                tracing::warn!(partition = p, error = %e, "reading a Kinesis shard failed; retrying");
            }
        }
    }

    fn clear(&self, p: u32) {
        if let Some(h) = &self.health {
            h.clear(&format!("stream/p{p}"));
        }
    }

    /// Stops the pollers (they end at their next call).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }
}

impl Drop for KinesisSource {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads the shard list every [`LIST_EVERY`]: new shards (children of a
/// split or a merge) become partitions and are read.
async fn follow_shards(source: Weak<KinesisSource>) {
    loop {
        tokio::time::sleep(LIST_EVERY).await;
        let Some(s) = source.upgrade() else { return };
        if s.stopped.load(Ordering::Relaxed) {
            return;
        }
        let listed = match list_shards(&s.client, &s.config.stream).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(stream = %s.config.stream, error = %e, "listing the Kinesis shards failed");
                continue;
            }
        };
        // New shards by id, not by count: expired shards leave the list
        // (AWS drops them once past retention), so a merge after an expiry
        // can leave the count as it was.
        let known = {
            let shards = s.shards.read().expect("kinesis shards");
            if listed.iter().all(|l| {
                shards
                    .iter()
                    .any(|r| !r.entry.retired && r.entry.shard == l.shard)
            }) {
                continue;
            }
            shards.len()
        };
        match Registry::extend(&s.storage, &s.config.stream, &listed).await {
            Ok(registry) if registry.shards.len() > known => {
                s.add_shards(&registry);
                let shards = s.shards.read().expect("kinesis shards").clone();
                for shard in shards.into_iter().skip(known) {
                    tracing::info!(shard = %shard.entry.shard, partition = shard.partition, parents = ?shard.entry.parents, "a new Kinesis shard");
                    s.start_poller(shard);
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(stream = %s.config.stream, error = %e, "registering new Kinesis shards failed")
            }
        }
    }
}

/// The one reader of a shard on this node: GetRecords at most every
/// `poll`, into the cache; backs off when throttled.
async fn poll_shard(source: Weak<KinesisSource>, shard: Arc<Shard>) {
    let p = shard.partition;
    let mut iterator: Option<String> = None;
    let mut backoff = Duration::from_millis(500);
    let mut last_call = Instant::now() - MIN_POLL;
    loop {
        let Some(s) = source.upgrade() else { return };
        if s.stopped.load(Ordering::Relaxed) {
            return;
        }
        let poll = s.config.poll.max(MIN_POLL);
        // Children are read once their parents are read to the end (the
        // order Kinesis keeps for a key across a reshard).
        if !s.parents_done(&shard) {
            drop(s);
            tokio::time::sleep(poll).await;
            continue;
        }
        let (full, at, after) = {
            let st = shard.state.lock().expect("shard state");
            // The sequence number of the record before the head.
            (
                st.cache.bytes >= MAX_CACHED_BYTES,
                st.cache.head,
                st.cache.head_token(),
            )
        };
        if full {
            drop(s);
            tokio::time::sleep(poll).await;
            continue;
        }
        let it = match &iterator {
            Some(it) => it.clone(),
            None => {
                let req = s
                    .client
                    .get_shard_iterator()
                    .stream_name(&s.config.stream)
                    .shard_id(&shard.entry.shard);
                let req = match &after {
                    Some(seq) => req
                        .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                        .starting_sequence_number(seq),
                    None => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
                };
                match req.send().await {
                    Ok(r) => match r.shard_iterator() {
                        Some(it) => it.to_string(),
                        None => {
                            finish(&shard, at);
                            return;
                        }
                    },
                    Err(e) => {
                        // Re-created stream: the partition stops, `health` says what to do.
                        if super::identity::kinesis_not_this_stream(
                            s.health.as_deref(),
                            &s.config.stream,
                            p,
                            &shard.entry.shard,
                            e.code(),
                            e.message(),
                        ) {
                            return;
                        }
                        let code = e.code().map(str::to_string);
                        if code.as_deref() == Some("ResourceNotFoundException")
                            && s.expired(&shard, at).await
                        {
                            return;
                        }
                        let throttled = code.as_deref() == Some("LimitExceededException");
                        shard.state.lock().expect("shard state").throttled = throttled;
                        s.report_read(&shard, aws_detail(e));
                        drop(s);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        continue;
                    }
                }
            }
        };
        // The budget: at most one call per `poll` from this node.
        let wait = poll.saturating_sub(last_call.elapsed());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        last_call = Instant::now();
        let resp = s
            .client
            .get_records()
            .shard_iterator(&it)
            .limit(GET_LIMIT)
            .send()
            .await;
        let out = match resp {
            Ok(out) => out,
            Err(e) => {
                let code = e
                    .as_service_error()
                    .and_then(|x| x.code())
                    .map(str::to_string);
                match code.as_deref() {
                    Some("ProvisionedThroughputExceededException") => {
                        // Over the shard's budget (shared with other readers).
                        let first = !std::mem::replace(
                            &mut shard.state.lock().expect("shard state").throttled,
                            true,
                        );
                        if first {
                            tracing::info!(shard = %shard.entry.shard, partition = p, "GetRecords throttled; backing off");
                        }
                    }
                    Some("ExpiredIteratorException") => {
                        iterator = None;
                        continue;
                    }
                    Some("ResourceNotFoundException") if s.expired(&shard, at).await => {
                        return;
                    }
                    _ => {
                        iterator = None;
                        s.report_read(&shard, aws_detail(e));
                    }
                }
                drop(s);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        let records = out.records();
        if !records.is_empty() {
            let mark = shard.state.lock().expect("shard state").dead_mark;
            let raw: Vec<RawRecord<'_>> = records
                .iter()
                .enumerate()
                .map(|(i, r)| RawRecord {
                    position: at + i as u64,
                    time_ms: r
                        .approximate_arrival_timestamp()
                        .and_then(|t| t.to_millis().ok())
                        .unwrap_or_else(|| chrono::Utc::now().timestamp_millis()),
                    value: Some(r.data().as_ref()),
                })
                .collect();
            let end = at + records.len() as u64;
            let batch = match decode_records(&s.decoder, &s.dead, &s.dead_key(), p, raw, end, mark)
            {
                Ok(batch) => batch,
                Err(e) => {
                    // Refused records that cannot be kept are not skipped:
                    // the shard waits, and reads them again.
                    iterator = None;
                    s.report_read(
                        &shard,
                        format!(
                            "refused records cannot be kept in the dead-letter store ({}); the shard waits until they can",
                            crate::error::chain(&e)
                        ),
                    );
                    drop(s);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            let fetch = Fetch {
                first: at,
                end,
                tokens: records.iter().map(|r| r.sequence_number().into()).collect(),
                batch,
            };
            let mut st = shard.state.lock().expect("shard state");
            st.cache.push(fetch);
            st.dead_mark = st.dead_mark.max(end);
            st.throttled = false;
            st.millis_behind = out.millis_behind_latest().unwrap_or(0);
            drop(st);
            shard.head.send_replace(end);
        } else {
            let mut st = shard.state.lock().expect("shard state");
            st.throttled = false;
            st.millis_behind = out.millis_behind_latest().unwrap_or(0);
        }
        backoff = Duration::from_millis(500);
        s.clear(p);
        match out.next_shard_iterator() {
            Some(next) => iterator = Some(next.to_string()),
            None => {
                // A closed shard read to its end: its partition is final.
                let end = shard.state.lock().expect("shard state").cache.head;
                finish(&shard, end);
                tracing::info!(shard = %shard.entry.shard, partition = p, end, "a Kinesis shard ended (split or merged)");
                return;
            }
        }
    }
}

fn finish(shard: &Shard, end: u64) {
    shard.state.lock().expect("shard state").finished = true;
    // Wakes readers waiting for records: there will be none.
    shard.head.send_replace(end);
}

#[async_trait::async_trait]
impl Source for KinesisSource {
    fn describe(&self) -> String {
        format!("Kinesis stream `{}`", self.config.stream)
    }

    fn partitions(&self) -> u32 {
        self.shards.read().expect("kinesis shards").len() as u32
    }

    fn end(&self, p: u32) -> Result<u64, SourceError> {
        Ok(self.shard(p)?.state.lock().expect("shard state").cache.head)
    }

    fn start(&self, p: u32) -> Result<u64, SourceError> {
        Ok(self.shard(p)?.state.lock().expect("shard state").cache.base)
    }

    fn finished(&self, p: u32) -> bool {
        self.shard(p)
            .is_ok_and(|s| s.state.lock().expect("shard state").finished)
    }

    async fn read(
        &self,
        p: u32,
        from: u64,
        until: u64,
        max_events: usize,
    ) -> Result<Vec<SourceBatch>, SourceError> {
        let shard = self.shard(p)?;
        let st = shard.state.lock().expect("shard state");
        if from >= st.cache.head {
            return Ok(Vec::new());
        }
        st.cache.cached(from, until, max_events).ok_or_else(|| {
            KinesisError::Released {
                shard: shard.entry.shard.clone(),
                partition: p,
                position: from,
                hint: format!(
                    "this node keeps the records of the shard from position {} on (what the master dataset does not hold yet); older ones are read from the master dataset",
                    st.cache.base
                ),
            }
            .into()
        })
    }

    async fn wait(&self, p: u32, from: u64, timeout: Duration) {
        let Ok(shard) = self.shard(p) else {
            tokio::time::sleep(timeout).await;
            return;
        };
        let mut sub = shard.head.subscribe();
        let _ = tokio::time::timeout(timeout, async {
            loop {
                if *sub.borrow_and_update() > from
                    || shard.state.lock().expect("shard state").finished
                {
                    return;
                }
                if sub.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    fn resume_token(&self, p: u32, position: u64) -> Option<String> {
        let shard = self.shard(p).ok()?;
        let st = shard.state.lock().expect("shard state");
        st.cache.token_at(position)
    }

    fn archived(&self, p: u32, end: u64) {
        if let Ok(shard) = self.shard(p) {
            shard.state.lock().expect("shard state").cache.release(end);
        }
    }

    fn info(&self, p: u32) -> Option<PartitionInfo> {
        let shard = self.shard(p).ok()?;
        let st = shard.state.lock().expect("shard state");
        Some(PartitionInfo {
            id: shard.entry.shard.clone(),
            state: if st.finished {
                PartitionState::Closed
            } else if st.throttled {
                PartitionState::Throttled
            } else {
                PartitionState::Open
            },
            behind_ms: Some(st.millis_behind),
        })
    }
}

// ---------------------------------------------------------------------------
// The producer

/// Where a record went: its shard and sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    pub shard: String,
    pub sequence: String,
}

/// One record to put: its partition key, optionally the hash key that
/// places it (overriding the partition key's MD5), and its data.
#[derive(Debug, Clone)]
pub struct PutRecord {
    pub key: String,
    pub hash_key: Option<u128>,
    pub data: Bytes,
}

impl PutRecord {
    /// The bytes Kinesis counts against its record limit: data and key.
    fn size(&self) -> usize {
        self.data.len() + self.key.len()
    }
}

/// The largest record Kinesis takes (data and partition key together) on a
/// stream that keeps the default maximum record size.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// The hash key that puts records of a key hash `h` (32 bits, uniform) at
/// the same place of the 128-bit hash range every time, spread over the
/// whole range whatever the shard layout.
pub fn spread_hash_key(h: u32) -> u128 {
    // Scale the 32-bit hash to the top of the range; fill the low bits
    // from the hash too, so no two hashes collide on a boundary.
    ((h as u128) << 96) | ((h as u128) << 64) | (h as u128)
}

/// `PutRecords` into the stream, the failed records retried.
pub struct KinesisProducer {
    client: Client,
    stream: String,
    /// How long failed records are retried before they are reported.
    retry_for: Duration,
}

/// Why a whole PutRecords call failed, and whether its records may be stored.
enum CallFailure {
    /// Throttled: try again.
    Retry(String),
    /// Refused (a service error) or never sent (no connection).
    NotStored(String),
    /// Sent without an answer.
    InDoubt(String),
}

fn classify<E, R>(e: aws_sdk_kinesis::error::SdkError<E, R>) -> CallFailure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    use aws_sdk_kinesis::error::SdkError;
    let throttled = matches!(
        e.code(),
        Some(
            "ProvisionedThroughputExceededException"
                | "LimitExceededException"
                | "KMSThrottlingException"
                | "ThrottlingException"
        )
    );
    let refused_connection = {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        let mut refused = false;
        while let Some(c) = cause {
            if let Some(io) = c.downcast_ref::<std::io::Error>()
                && matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                )
            {
                refused = true;
            }
            cause = c.source();
        }
        refused
    };
    let service = matches!(
        e,
        SdkError::ServiceError(_) | SdkError::ConstructionFailure(_)
    );
    let detail = aws_detail(e);
    if throttled {
        CallFailure::Retry(detail)
    } else if service || refused_connection {
        CallFailure::NotStored(detail)
    } else {
        CallFailure::InDoubt(detail)
    }
}

impl KinesisProducer {
    /// A producer whose client does not retry by itself: a call the SDK
    /// sent again after a timeout or a lost connection would store its
    /// records twice, and report them stored once. This producer retries
    /// only what Kinesis refused (throttled calls, refused records), and
    /// reports a call without an answer as in doubt.
    pub async fn new(config: &KinesisConfig) -> KinesisProducer {
        KinesisProducer::with_client(config.reader_client().await, &config.stream)
    }

    /// A producer on a client built elsewhere (explicit credentials, say).
    pub fn with_client(client: Client, stream: &str) -> KinesisProducer {
        KinesisProducer {
            client,
            stream: stream.into(),
            retry_for: Duration::from_secs(20),
        }
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Sends `(partition key, data)` records and returns where each one
    /// went, in order, once all are stored; the first failure otherwise
    /// (some records may be stored then: [`KinesisProducer::send_each`]
    /// says which).
    pub async fn send(&self, records: &[(String, Bytes)]) -> Result<Vec<Put>, KinesisError> {
        let records: Vec<PutRecord> = records
            .iter()
            .map(|(key, data)| PutRecord {
                key: key.clone(),
                hash_key: None,
                data: data.clone(),
            })
            .collect();
        self.send_each(&records)
            .await
            .into_iter()
            .map(|d| match d {
                Delivery::Stored(p) => Ok(p),
                Delivery::NotStored(detail) | Delivery::InDoubt(detail) => Err(KinesisError::Put {
                    stream: self.stream.clone(),
                    detail,
                }),
            })
            .collect()
    }

    /// Sends records in calls of at most 500 records and 5 MiB; records a
    /// call refuses (throttled, an internal failure) are sent again with
    /// backoff for a while. Returns what became of each record, in order.
    /// After a call fails whole for good, the records after it are not sent.
    pub async fn send_each(&self, records: &[PutRecord]) -> Vec<Delivery<Put>> {
        let mut out: Vec<Option<Delivery<Put>>> = vec![None; records.len()];
        let mut start = 0;
        let deadline = Instant::now() + self.retry_for;
        while start < records.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < records.len()
                && end - start < PUT_RECORDS
                && (end == start || bytes + records[end].size() <= PUT_BYTES)
            {
                bytes += records[end].size();
                end += 1;
            }
            let failed = self
                .put_all(&records[start..end], &mut out[start..end], deadline)
                .await;
            start = end;
            if let Some(why) = failed {
                for o in &mut out[start..] {
                    *o = Some(Delivery::NotStored(format!(
                        "not sent: an earlier PutRecords call of the request failed ({why})"
                    )));
                }
                break;
            }
        }
        out.into_iter()
            .map(|d| d.expect("every record has an outcome"))
            .collect()
    }

    /// One call's records until each is stored or failed; `Some(why)` when
    /// the call failed as a whole (the records after it should not be sent).
    async fn put_all(
        &self,
        records: &[PutRecord],
        out: &mut [Option<Delivery<Put>>],
        deadline: Instant,
    ) -> Option<String> {
        // 50 ms doubling to 2 s. The schedule is backon's; the loop is kept:
        // whether a try is the last depends on its next delay and the
        // deadline (a refused record is final only then), and each try
        // sends only the records still pending.
        let mut delays = backon::BackoffBuilder::build(
            backon::ExponentialBuilder::new()
                .with_min_delay(Duration::from_millis(50))
                .with_max_delay(Duration::from_secs(2))
                .without_max_times(),
        );
        let mut backoff = delays.next().expect("the schedule has no end");
        loop {
            let pending: Vec<usize> = (0..records.len()).filter(|&i| out[i].is_none()).collect();
            if pending.is_empty() {
                return None;
            }
            let entries = pending
                .iter()
                .map(|&i| {
                    PutRecordsRequestEntry::builder()
                        .partition_key(&records[i].key)
                        .set_explicit_hash_key(records[i].hash_key.map(|h| h.to_string()))
                        .data(Blob::new(records[i].data.to_vec()))
                        .build()
                        .expect("key and data are set")
                })
                .collect::<Vec<_>>();
            let last_try = Instant::now() + backoff >= deadline;
            match self
                .client
                .put_records()
                .stream_name(&self.stream)
                .set_records(Some(entries))
                .send()
                .await
            {
                Ok(resp) => {
                    for (r, &i) in resp.records().iter().zip(&pending) {
                        match (r.shard_id(), r.sequence_number()) {
                            (Some(shard), Some(seq)) if r.error_code().is_none() => {
                                out[i] = Some(Delivery::Stored(Put {
                                    shard: shard.to_string(),
                                    sequence: seq.to_string(),
                                }));
                            }
                            // Kinesis did not store this one (it says so per record).
                            _ if last_try => {
                                out[i] = Some(Delivery::NotStored(format!(
                                    "{}: {}",
                                    r.error_code().unwrap_or("no sequence number"),
                                    r.error_message().unwrap_or("")
                                )))
                            }
                            _ => {}
                        }
                    }
                    if resp.records().len() < pending.len() {
                        // An answer without a result for some records: theirs is unknown.
                        for &i in &pending[resp.records().len()..] {
                            out[i] = Some(Delivery::InDoubt(
                                "PutRecords answered without a result for the record".into(),
                            ));
                        }
                    }
                }
                Err(e) => {
                    let fail = |out: &mut [Option<Delivery<Put>>],
                                d: &dyn Fn() -> Delivery<Put>| {
                        for &i in &pending {
                            out[i] = Some(d());
                        }
                    };
                    match classify(e) {
                        CallFailure::Retry(why) if last_try => {
                            fail(out, &|| Delivery::NotStored(why.clone()));
                            return Some(why);
                        }
                        CallFailure::Retry(_) => {}
                        CallFailure::NotStored(why) => {
                            fail(out, &|| Delivery::NotStored(why.clone()));
                            return Some(why);
                        }
                        CallFailure::InDoubt(why) => {
                            fail(out, &|| Delivery::InDoubt(why.clone()));
                            return Some(why);
                        }
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = delays.next().expect("the schedule has no end");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> ShardEntry {
        ShardEntry {
            shard: id.into(),
            parents: Vec::new(),
            first_sequence: "1".into(),
            retired: false,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn writers_racing_on_the_registry_agree_on_every_partition_number() {
        // A lost race is timing: race often.
        for _ in 0..20 {
            race_on_a_registry().await;
        }
    }

    async fn race_on_a_registry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = Storage::local(dir.path()).expect("storage");
        let id = |n: u32| format!("shardId-{n:012}");
        let first = Registry::extend(&storage, "s", &[entry(&id(0)), entry(&id(1))])
            .await
            .expect("first");
        assert_eq!((first.generation, first.shards.len()), (1, 2));
        // Eight nodes, each seeing some of the same new shards, at once.
        let writers: Vec<_> = (0..8u32)
            .map(|w| {
                let storage = storage.clone();
                let listed: Vec<ShardEntry> = (0..2 + w % 4).map(|n| entry(&id(n))).collect();
                tokio::spawn(async move { Registry::extend(&storage, "s", &listed).await })
            })
            .collect();
        let mut seen = Vec::new();
        for w in writers {
            seen.push(w.await.expect("a writer").expect("extends"));
        }
        let last = Registry::load(&storage, "s")
            .await
            .expect("load")
            .expect("a registry");
        let ids: Vec<&str> = last.shards.iter().map(|s| s.shard.as_str()).collect();
        assert_eq!(
            ids,
            (0..5).map(id).collect::<Vec<_>>(),
            "every shard once, parents first"
        );
        for r in seen {
            assert_eq!(
                r.shards[..],
                last.shards[..r.shards.len()],
                "what each writer was told is a prefix of the final registry"
            );
        }
        assert_eq!(
            Registry::extend(&storage, "s", &[entry(&id(3))])
                .await
                .expect("again"),
            last,
            "nothing new, nothing written"
        );
    }
}
