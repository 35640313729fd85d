//! The stream layer: getting events in, durably, and handing them to every
//! other layer in order (the paper's Kinesis stream).
//!
//! ```text
//!  NDJSON body ─▶ decode ──accepted──▶ log (partition p, offset o, fsynced) ─▶ readers
//!                   │
//!                   └─rejected─▶ dead-letter store (line, field, reason, raw line)
//! ```
//!
//! - [`decode`]: NDJSON → typed Arrow columns, validated against the schema.
//! - [`log`]: the embedded partitioned log: segments of CRC-checked frames,
//!   group commit, crash recovery, reads from any offset, retention.
//! - [`deadletter`]: every refused line with its reason.
//! - [`ingest`]: the three together, as `POST /v1/events` uses them.
//! - [`kafka`]: a Kafka topic as the stream (consumer and producer).
//! - [`kinesis`]: a Kinesis stream as the stream (shard registry, pollers,
//!   producer).
//! - [`source`]: the seam every consumer reads a stream through (the
//!   embedded log here; Kafka and Kinesis behind the same trait), and the
//!   chunk range type the handoff is made of.

pub(crate) mod cache;
pub mod deadletter;
pub mod decode;
pub mod ingest;
pub mod kafka;
pub mod kinesis;
pub mod log;
pub mod source;

pub use deadletter::{DeadLetter, DeadLetters};
pub use decode::{Decoded, Decoder, Partitioning, Reject};
pub use ingest::{Ingest, IngestError, IngestReport};
pub use log::{AppendAck, Log, LogBatch, LogError, LogOptions};
pub use source::{Source, SourceBatch, SourceError};
