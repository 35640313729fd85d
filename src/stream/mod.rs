//! The stream layer: getting events in, durably, and handing them to every
//! other layer in order (the paper's Kinesis stream).
//!
//! ```text
//!  NDJSON body ─▶ decode ──accepted──▶ log (partition p, offset o, fsynced) ─▶ readers
//!                   │            └────▶ or a Producer (Kafka, Kinesis)
//!                   └─rejected─▶ dead-letter store (line, field, reason, raw line)
//!
//!  stream::open(config) ─▶ Opened { source: dyn Source, producer: dyn Producer }
//!                          one arm per backend folder: log/ · kafka/ · kinesis/
//! ```
//!
//! The seams (backend-neutral; none names a backend):
//! - [`source`]: [`Source`], what every consumer reads a stream through, and
//!   [`SourceError`], a backend's error or one of the kinds the layers act
//!   on (damage at an offset, a partition that does not exist).
//! - [`producer`]: [`Producer`], what `POST /v1/events` and `lambdaflow
//!   produce` write to an external stream through.
//! - [`decode`]: NDJSON → typed Arrow columns, validated against the schema.
//! - [`deadletter`]: every refused line with its reason.
//! - [`ingest`]: decode, the dead-letter store and the embedded log's
//!   append (or a producer), as `POST /v1/events` uses them.
//!
//! The backends, one folder each with its config, source, producer and
//! tests; a new stream is a folder, an arm in [`open`], [`producer`] and
//! [`partitions`], and a field of [`StreamConfig`]:
//! - [`log`]: the embedded partitioned log: segments of CRC-checked frames,
//!   group commit, crash recovery, reads from any offset, retention.
//! - [`kafka`]: a Kafka topic.
//! - [`kinesis`]: a Kinesis stream (shard registry, pollers, producer).

pub(crate) mod cache;
pub mod deadletter;
pub mod decode;
pub mod ingest;
pub mod kafka;
pub mod kinesis;
pub mod log;
pub mod producer;
pub mod requests;
pub mod source;

pub use deadletter::{DeadLetter, DeadLetters};
pub use decode::{Decoded, Decoder, Partitioning, Reject};
pub use ingest::{Ingest, IngestError, IngestReport};
pub use log::{AppendAck, Log, LogBatch, LogError, LogOptions};
pub use producer::{Outgoing, Placed, Producer};
pub use source::{Source, SourceBatch, SourceError};

use std::path::PathBuf;
use std::sync::Arc;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

use crate::health::Health;
use crate::schema::EventSchema;
use crate::storage::Storage;

/// The stream: the embedded log's partitions and how events are spread on them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// Field whose value's hash picks the partition; absent: round-robin by request.
    #[serde(default)]
    pub key: Option<String>,
    /// A log segment file is closed once it reaches this size.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: ByteSize,
    /// Consume a Kafka topic instead of the embedded log: its partitions are
    /// the partitions (`partitions` is then the topic's), each record one
    /// event.
    #[serde(default)]
    pub kafka: Option<kafka::KafkaConfig>,
    /// Consume a Kinesis stream instead: its shards are the partitions
    /// (numbered by a registry under the data root), each record one event.
    #[serde(default)]
    pub kinesis: Option<kinesis::KinesisConfig>,
    /// The node's local directory: the embedded log, the dead-letter store,
    /// the batch lock. Defaults to `data` when that is a local directory,
    /// else to `./lambdaflow-local` under the working directory.
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

impl StreamConfig {
    /// Whether the layers consume an external stream rather than the
    /// embedded log (which is then never written).
    pub fn external(&self) -> bool {
        self.kafka.is_some() || self.kinesis.is_some()
    }
}

fn default_partitions() -> u32 {
    2
}

fn default_segment_bytes() -> ByteSize {
    ByteSize::mib(128)
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            partitions: default_partitions(),
            key: None,
            segment_bytes: default_segment_bytes(),
            kafka: None,
            kinesis: None,
            dir: None,
        }
    }
}

/// A stream opened for the layers.
pub struct Opened {
    /// What the speed layer, the archiver and replay read.
    pub source: Arc<dyn Source>,
    /// Where `POST /v1/events` sends the accepted lines; `None`: the
    /// embedded log takes them itself.
    pub producer: Option<Arc<dyn Producer>>,
}

/// What opening a stream may need besides its section of the config.
pub struct Context {
    /// The node's embedded log: the stream itself when no other is configured.
    pub log: Arc<Log>,
    /// The storage root (Kinesis keeps its shard registry there).
    pub storage: Storage,
    pub schema: Arc<EventSchema>,
    /// Where records that are not events go, with why.
    pub dead: Arc<DeadLetters>,
    pub health: Arc<Health>,
}

/// Opens the configured stream: the one place that chooses a backend.
/// Each backend's folder has its config, source, producer and tests.
pub async fn open(config: &StreamConfig, cx: Context) -> Result<Opened, SourceError> {
    if let Some(k) = &config.kafka {
        return kafka::open(k, cx).await;
    }
    if let Some(k) = &config.kinesis {
        return kinesis::open(k, cx).await;
    }
    Ok(Opened {
        source: cx.log,
        producer: None,
    })
}

/// A producer of the configured external stream (`lambdaflow produce`);
/// `None` for the embedded log, which takes events over HTTP.
pub async fn producer(config: &StreamConfig) -> Result<Option<Arc<dyn Producer>>, SourceError> {
    if let Some(k) = &config.kafka {
        return Ok(Some(Arc::new(kafka::KafkaProducer::new(k)?)));
    }
    if let Some(k) = &config.kinesis {
        return Ok(Some(Arc::new(kinesis::KinesisProducer::new(k).await)));
    }
    Ok(None)
}

/// How many partitions the configured external stream has, as the stream
/// decides (a Kafka topic's; the shards a Kinesis registry holds, every
/// shard it ever had); `None` for the embedded log, whose count is the
/// config's.
pub async fn partitions(
    config: &StreamConfig,
    storage: &Storage,
) -> Result<Option<u32>, SourceError> {
    if let Some(k) = &config.kafka {
        let k = k.clone();
        return tokio::task::spawn_blocking(move || kafka::partition_count(&k))
            .await
            .map_err(|e| SourceError::backend(std::io::Error::other(e.to_string())))?
            .map(Some)
            .map_err(SourceError::from);
    }
    if let Some(k) = &config.kinesis {
        return Ok(Some(kinesis::resolve(storage, k).await?.shards.len() as u32));
    }
    Ok(None)
}
