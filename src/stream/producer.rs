//! The seam between lambdaflow and a stream it writes to: `POST
//! /v1/events` on a node that consumes an external stream produces the
//! accepted lines there, and `lambdaflow produce --kafka|--kinesis` sends
//! the paper's events there.
//!
//! ```text
//!  accepted lines ─▶ Producer::send_each([Outgoing]) ─▶ Kafka topic / Kinesis stream
//!                      ◀── one Delivery<Placed> per record, in order:
//!                          stored (where) · not stored (safe to resend) · in doubt
//! ```

use bytes::Bytes;

use super::source::Delivery;

/// Where the stream stored one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placed {
    /// A partition and an offset (Kafka).
    Offset { partition: u32, offset: u64 },
    /// A shard and a sequence number (Kinesis).
    Sequence { shard: String, sequence: String },
}

/// One record to send.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The partition lambdaflow chose for it (by key or in turn); `None`
    /// lets the stream choose (the paper's producer).
    pub partition: Option<u32>,
    /// The hash of its partitioning key, if the events are keyed: records
    /// with one key stay together in a stream that partitions by hash
    /// (Kinesis: the explicit hash key, see `decode::KeyPlacement::Md5`).
    pub key: Option<u128>,
    /// The event key's text, for a record sent without a partition (the
    /// stream places it as any producer keyed by it: a Kafka record's key
    /// with the murmur2 partitioner, a Kinesis record's partition key).
    pub text_key: Option<Bytes>,
    /// One event, a JSON object.
    pub data: Bytes,
}

/// A stream lambdaflow sends records to.
#[async_trait::async_trait]
pub trait Producer: Send + Sync + 'static {
    /// The stream, for messages ("Kafka topic `t`").
    fn describe(&self) -> String;

    /// The longest event the stream takes as one record, and whose limit.
    fn max_record(&self) -> (usize, &'static str);

    /// Sends every record and says what became of each, in order. A
    /// record is reported stored only once the stream acknowledged it.
    async fn send_each(&self, records: Vec<Outgoing>) -> Vec<Delivery<Placed>>;

    /// Whether the stream can be reached, asked once before a long run so
    /// that a wrong address fails at once rather than at every send.
    async fn check(&self) -> Result<(), super::SourceError> {
        Ok(())
    }
}
