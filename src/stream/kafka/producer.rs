//! The Kafka producer: acks from every in-sync replica, what became of each record.

use super::*;

/// Sends events to a topic: an idempotent producer with `acks=all`, so a
/// send that returns is on every in-sync replica, once.
#[derive(Clone)]
pub struct KafkaProducer {
    producer: FutureProducer,
    brokers: String,
    topic: String,
    max_record: usize,
}

/// How long a record may take to be acknowledged, retries included, unless
/// the user's `options` say otherwise (`message.timeout.ms`). librdkafka's
/// default is 5 minutes: an HTTP request into a Kafka node whose broker is
/// down held its ingest slot that long, and `produce` seemed to hang.
pub(super) const DELIVERY_TIMEOUT_MS: &str = "15000";
/// How long one broker request may go unanswered (`socket.timeout.ms`,
/// `request.timeout.ms`), unless the user's `options` say otherwise.
pub(super) const BROKER_REQUEST_TIMEOUT_MS: &str = "10000";

impl KafkaProducer {
    /// A producer of the topic. Sends fail within
    /// [`DELIVERY_TIMEOUT_MS`] when the brokers cannot be reached (the
    /// user's `options` may set other timeouts); [`KafkaProducer::check`]
    /// says so at once.
    pub fn new(config: &KafkaConfig) -> Result<KafkaProducer, KafkaError> {
        let producer = config
            .client_with(&[
                ("acks", "all"),
                ("enable.idempotence", "true"),
                ("linger.ms", "5"),
                ("queue.buffering.max.messages", "1000000"),
                ("message.timeout.ms", DELIVERY_TIMEOUT_MS),
                ("socket.timeout.ms", BROKER_REQUEST_TIMEOUT_MS),
                ("request.timeout.ms", BROKER_REQUEST_TIMEOUT_MS),
            ])
            .create()
            .map_err(|source| KafkaError::Connect {
                brokers: config.brokers.clone(),
                source,
            })?;
        Ok(KafkaProducer {
            producer,
            brokers: config.brokers.clone(),
            topic: config.topic.clone(),
            max_record: max_record_bytes(config),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The longest event this producer sends as one record.
    pub fn max_record(&self) -> usize {
        self.max_record
    }

    /// Asks the brokers for the topic's metadata, waiting at most
    /// `timeout`: brokers that cannot be reached are a
    /// [`KafkaError::Connect`] now rather than failed sends after the
    /// delivery timeout. Blocking.
    pub fn check(&self, timeout: Duration) -> Result<(), KafkaError> {
        use rdkafka::producer::Producer;
        self.producer
            .client()
            .fetch_metadata(Some(&self.topic), timeout)
            .map(|_| ())
            .map_err(|source| KafkaError::Connect {
                brokers: self.brokers.clone(),
                source,
            })
    }

    /// Sends each record to its partition (`None`: the partitioner picks by
    /// key, or spreads keyless records) and waits for every acknowledgement;
    /// returns each record's (partition, offset), or the first failure (some
    /// records may be stored then: [`KafkaProducer::send_each`] says which).
    pub async fn send(
        &self,
        records: impl IntoIterator<Item = (Option<u32>, Option<&[u8]>, &[u8])>,
    ) -> Result<Vec<(u32, u64)>, KafkaError> {
        let mut out = Vec::new();
        for r in self.send_raw(records).await {
            out.push(r.map_err(|source| KafkaError::Send {
                topic: self.topic.clone(),
                source,
            })?);
        }
        Ok(out)
    }

    /// [`KafkaProducer::send`], with what became of each record: stored
    /// (partition, offset), refused by the broker (not stored), or in doubt
    /// (timed out: it may be stored).
    pub async fn send_each(
        &self,
        records: impl IntoIterator<Item = (Option<u32>, Option<&[u8]>, &[u8])>,
    ) -> Vec<crate::stream::source::Delivery<(u32, u64)>> {
        use crate::stream::source::Delivery;
        self.send_raw(records)
            .await
            .into_iter()
            .map(|r| match r {
                Ok(at) => Delivery::Stored(at),
                Err(e) => {
                    let why = KafkaError::Send {
                        topic: self.topic.clone(),
                        source: e.clone(),
                    };
                    let why = crate::error::chain(&why);
                    if refused_for_good(&e) {
                        Delivery::NotStored(why)
                    } else {
                        Delivery::InDoubt(why)
                    }
                }
            })
            .collect()
    }

    async fn send_raw(
        &self,
        records: impl IntoIterator<Item = (Option<u32>, Option<&[u8]>, &[u8])>,
    ) -> Vec<Result<(u32, u64), ClientError>> {
        let mut pending = Vec::new();
        for (partition, key, value) in records {
            let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic).payload(value);
            if let Some(k) = key {
                record = record.key(k);
            }
            if let Some(p) = partition {
                record = record.partition(p as i32);
            }
            pending.push(self.producer.send(record, Duration::from_secs(30)));
        }
        futures::future::join_all(pending)
            .await
            .into_iter()
            .map(|r| {
                r.map(|d| (d.partition as u32, d.offset as u64))
                    .map_err(|(e, _)| e)
            })
            .collect()
    }
}

/// Whether a failed send was refused by the broker or the client before
/// it could be stored (so resending cannot count it twice); a timeout or a
/// lost connection may have stored it.
pub(super) fn refused_for_good(e: &ClientError) -> bool {
    use RDKafkaErrorCode as C;
    match e {
        ClientError::MessageProduction(code) => matches!(
            code,
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidMessage
                | C::InvalidRecord
                | C::UnknownTopicOrPartition
                | C::UnknownTopic
                | C::UnknownPartition
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::InvalidRequiredAcks
                | C::InvalidTopic
                | C::UnsupportedForMessageFormat
                | C::PolicyViolation
                | C::QueueFull
                | C::BadMessage
        ),
        _ => false,
    }
}

/// Kafka as a [`crate::stream::Producer`]: each record to its partition
/// (or the partitioner's choice), acknowledged by every in-sync replica.
#[async_trait::async_trait]
impl crate::stream::producer::Producer for KafkaProducer {
    fn describe(&self) -> String {
        format!("Kafka topic `{}`", self.topic)
    }

    fn max_record(&self) -> (usize, &'static str) {
        (
            self.max_record,
            "Kafka (the producer's message.max.bytes, less a record's framing)",
        )
    }

    async fn send_each(
        &self,
        records: Vec<crate::stream::producer::Outgoing>,
    ) -> Vec<crate::stream::source::Delivery<crate::stream::producer::Placed>> {
        use crate::stream::source::Delivery;
        KafkaProducer::send_each(
            self,
            records
                .iter()
                .map(|r| (r.partition, r.text_key.as_deref(), &r.data[..])),
        )
        .await
        .into_iter()
        .map(|d| match d {
            Delivery::Stored((partition, offset)) => {
                Delivery::Stored(crate::stream::producer::Placed::Offset { partition, offset })
            }
            Delivery::NotStored(why) => Delivery::NotStored(why),
            Delivery::InDoubt(why) => Delivery::InDoubt(why),
        })
        .collect()
    }

    async fn check(&self) -> Result<(), SourceError> {
        let checking = self.clone();
        tokio::task::spawn_blocking(move || checking.check(CHECK_TIMEOUT))
            .await
            .map_err(|e| SourceError::backend(std::io::Error::other(e.to_string())))?
            .map_err(SourceError::from)
    }
}

/// The largest event a Kafka topic takes by default: librdkafka's
/// `message.max.bytes` (1,000,000) less room for a record's framing; the
/// user's `options` may set another.
/// How long [`Producer::check`](crate::stream::producer::Producer::check) waits for the brokers.
pub(super) const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
