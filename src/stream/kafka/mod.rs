//! Kafka as the stream: a topic's partitions are the partitions, Kafka
//! offsets the positions, each record one event (a JSON object).
//!
//! ```text
//!  topic partition p ──assign(p, offset)──▶ cursor (a librdkafka consumer, read_committed)
//!                                              │ records buffered in order
//!                                              ▼
//!        read(p, [from, until)) ── decode each record ──▶ SourceBatch (listed offsets)
//!                                              └─ refused ─▶ dead-letter store (partition, offset, reason)
//! ```
//!
//! The checkpoint is lambdaflow's own (the master dataset's Delta txn and
//! the published H), so nothing is committed to a consumer group: reads are
//! `assign()`ed at the position a layer asks for. Offsets have gaps
//! (transaction markers, aborted records under `read_committed`), and a
//! record refused by validation is a gap too: it goes to the dead-letter
//! store once and the partition goes on past it.
//!
//! Each partition keeps a few cursors (consumers assigned to it): the speed
//! layer reads the head, the archiver re-reads closed chunks behind it, and a
//! read continues the cursor that stopped where it starts, so neither makes
//! the other seek.
//!
//! `auto.offset.reset = error`: a position below the earliest retained
//! offset is never silently moved forward — events removed upstream before
//! they were archived stop that partition with [`KafkaError::Lost`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError as ClientError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use super::cache::{Fetch, ReadAhead};
use super::deadletter::DeadLetters;
use super::decode::Decoder;
use super::source::{RawRecord, Source, SourceBatch, SourceError, decode_records};

mod producer;
mod source;

pub use producer::*;
pub use source::*;

/// `[stream] kafka = { brokers, topic, options }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port…]`.
    pub brokers: String,
    pub topic: String,
    /// librdkafka client properties, passed through as they are: SASL and
    /// TLS (`security.protocol`, `sasl.mechanism`, `sasl.username`,
    /// `ssl.ca.location`, …), timeouts, fetch sizes.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

impl KafkaConfig {
    /// The client configuration every consumer, producer and admin client
    /// of this topic starts from.
    pub fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers);
        for (k, v) in &self.options {
            c.set(k, v);
        }
        c
    }

    /// [`KafkaConfig::client`] with `defaults` for the properties the
    /// user's `options` leave unset.
    fn client_with(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut c = self.client();
        for (k, v) in defaults {
            if !self.options.contains_key(*k) {
                c.set(*k, *v);
            }
        }
        c
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum KafkaError {
    #[error("cannot reach Kafka at {brokers}")]
    Connect {
        brokers: String,
        #[source]
        source: ClientError,
    },
    #[error("Kafka topic `{topic}` does not exist at {brokers}")]
    NoTopic { topic: String, brokers: String },
    /// Compaction keeps only the last record of a key: the master dataset
    /// must hold every event, and offsets that vanish below H cannot be
    /// told from events lost.
    #[error(
        "Kafka topic `{topic}` is compacted (cleanup.policy = {policy}); lambdaflow needs every event, so it consumes only `delete` topics"
    )]
    Compacted { topic: String, policy: String },
    #[error("cannot read partition {partition} of Kafka topic `{topic}`")]
    Read {
        topic: String,
        partition: u32,
        #[source]
        source: ClientError,
    },
    #[error(
        "events of partition {partition} of Kafka topic `{topic}` from offset {from} to {start} were removed by the topic's retention before lambdaflow archived them; the partition is stopped at {from} (nothing is skipped silently)"
    )]
    Lost {
        topic: String,
        partition: u32,
        from: u64,
        start: u64,
    },
    /// The partition ends below what was consumed already: the topic was
    /// deleted and created again, or the broker lost acknowledged records.
    /// The partition stays stopped until the node restarts: its offsets no
    /// longer name the records the master dataset holds under them.
    #[error(
        "partition {partition} of Kafka topic `{topic}` went back to end at offset {end}, below offset {from} that lambdaflow consumed already: the topic was deleted and created again, or the broker lost records; the partition is stopped at {from} so that none of its records is skipped or counted twice (to go on: consume the new topic into a new data directory, or restore the lost records and restart)"
    )]
    Behind {
        topic: String,
        partition: u32,
        from: u64,
        end: u64,
    },
    /// Refused records that the dead-letter store cannot take (a full disk):
    /// the partition waits rather than skip them.
    #[error(
        "refused records of partition {partition} of Kafka topic `{topic}` cannot be kept in the dead-letter store ({detail}); the partition waits until they can"
    )]
    DeadLetters {
        topic: String,
        partition: u32,
        detail: String,
    },
    #[error("cannot send to Kafka topic `{topic}`")]
    Send {
        topic: String,
        #[source]
        source: ClientError,
    },
}

/// Records a cursor keeps ahead of the reads, at most.
impl From<KafkaError> for SourceError {
    fn from(e: KafkaError) -> Self {
        SourceError::backend(e)
    }
}

/// Opens a Kafka topic as the stream: its consumer as the source, and a
/// producer for `POST /v1/events`.
pub(in crate::stream) async fn open(
    config: &KafkaConfig,
    cx: crate::stream::Context,
) -> Result<crate::stream::Opened, SourceError> {
    let decoder = Decoder::new(cx.schema.clone(), crate::stream::Partitioning::RoundRobin);
    let (k, dead) = (config.clone(), cx.dead.clone());
    let source = tokio::task::spawn_blocking(move || KafkaSource::open(k, decoder, dead))
        .await
        .expect("the Kafka open task")?;
    Ok(crate::stream::Opened {
        source,
        producer: Some(Arc::new(KafkaProducer::new(config)?)),
    })
}

pub fn max_record_bytes(config: &KafkaConfig) -> usize {
    let limit = config
        .options
        .get("message.max.bytes")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1_000_000);
    limit.saturating_sub(512)
}

/// How many partitions the topic has (a metadata request).
/// The earliest offset partition `p` of the topic still holds (its low
/// watermark): below it, retention removed the records. Blocking.
pub fn earliest_offset(config: &KafkaConfig, p: u32) -> Result<u64, KafkaError> {
    let meta: BaseConsumer =
        consumer_config(config)
            .create()
            .map_err(|source| KafkaError::Connect {
                brokers: config.brokers.clone(),
                source,
            })?;
    let (low, _) = meta
        .fetch_watermarks(&config.topic, p as i32, REQUEST_TIMEOUT)
        .map_err(|source| KafkaError::Read {
            topic: config.topic.clone(),
            partition: p,
            source,
        })?;
    Ok(low.max(0) as u64)
}

pub fn partition_count(config: &KafkaConfig) -> Result<u32, KafkaError> {
    let meta: BaseConsumer =
        consumer_config(config)
            .create()
            .map_err(|source| KafkaError::Connect {
                brokers: config.brokers.clone(),
                source,
            })?;
    topic_partitions(&meta, config)
}
