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
use crate::chunk::Coverage;
use crate::health::Health;
use crate::storage::Storage;

mod producer;
mod registry;
mod source;

pub use producer::*;
pub use registry::*;
pub use source::*;

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
    #[error(
        "partition {partition} (shard {shard}) stopped: Kinesis stream `{stream}` is not the stream the master dataset was written from ({detail})\nhint: it was deleted and created again; stop the node and run `lambdaflow accept-loss --stream`: what the master dataset holds stays counted, the old shards' partitions end at their archived positions, and the new stream's shards become new partitions (records of the old stream not archived yet went with it)"
    )]
    NotThisStream {
        stream: String,
        partition: u32,
        shard: String,
        detail: String,
    },
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
        SourceError::backend(e)
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

/// Opens a Kinesis stream as the stream: its shards (numbered by the
/// registry under the storage root) as the source, and a producer for
/// `POST /v1/events`.
pub(in crate::stream) async fn open(
    config: &KinesisConfig,
    cx: crate::stream::Context,
) -> Result<crate::stream::Opened, SourceError> {
    let source = KinesisSource::open(
        config.clone(),
        cx.storage,
        Decoder::new(cx.schema, crate::stream::Partitioning::RoundRobin),
        cx.dead,
        Some(cx.health),
    )
    .await?;
    Ok(crate::stream::Opened {
        source,
        producer: Some(Arc::new(KinesisProducer::new(config).await)),
    })
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
