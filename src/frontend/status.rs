//! The node's state as `GET /v1/status` serves it and `lambdaflow status`
//! reads it: one serializable type for both ends.
//!
//! ```text
//!  layers, ingest, lease, health ──▶ http::status builds Status ──JSON──▶ client
//!                                   cli::status deserializes Status ──▶ text
//! ```
//!
//! Sections whose source types deserialize are those types (the lease, the
//! batch status, health, connections); the others (log figures, shards,
//! view changes, refused lines) are copied into the plain structs here,
//! field for field, so the JSON is the same as the source types write.
//! Every section is optional on the way in: an older server's reply reads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `GET /v1/status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    /// The stream the layers consume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<String>,
    /// The stream the master dataset was written from, as recorded under
    /// the storage root (kind, topic or stream, creation time), and how.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_identity: Option<crate::cluster::identity::Recorded>,
    /// The storage root and which node drives (archives and runs batches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
    #[serde(default)]
    pub partitions: Vec<PartitionStatus>,
    #[serde(default)]
    pub ingest: IngestStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master: Option<crate::master::TableCoverage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<crate::cluster::driver::BatchStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed: Option<SpeedStatus>,
    /// Failures being retried now, and repairs made since startup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<crate::health::HealthReport>,
    /// Views changed while serving: pending, building (with the build's
    /// progress), and the last ones done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view_changes: Option<ViewChangesStatus>,
    /// Per view, the events left out because its expressions fail on them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub views_excluded: Option<BTreeMap<String, crate::view::failures::ViewExcluded>>,
    /// Open connections and the limits in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<crate::frontend::conn::ConnReport>,
    /// The heap: allocated by the program, resident by the allocator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<crate::memory::MemoryReport>,
    /// The Postgres endpoint: connections, logins refused, queries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pg: Option<crate::frontend::pg::PgCounters>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SpeedStatus {
    pub micro_batches: u64,
    pub events: u64,
    pub chunks_closed: u64,
    pub mean_micro_batch_us: Option<u64>,
    pub realtime_age_ms: i64,
}

/// One partition across the layers: log extent, archived and published coverage.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PartitionStatus {
    pub partition: u32,
    /// The embedded log's figures (on a node that consumes an external
    /// stream, its partitions are the stream's and the log is unused).
    #[serde(flatten, default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogStats>,
    /// What the stream calls it (a Kinesis shard) and how it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<Shard>,
    /// End of the last chunk in the master dataset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archived: Option<u64>,
    /// `H[p]` of the published batch run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub published: Option<u64>,
    /// `R[p]`: events below it are in realtime answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub realtime: Option<u64>,
    /// One past the last position of the stream the layers consume (the
    /// embedded log's `end`, or the Kafka partition's), and how far the
    /// speed layer is behind it (positions; Kafka's may include gaps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_end: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
    /// The same in time: now minus the stream time of the last record
    /// consumed, while records wait; 0 when caught up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_ms: Option<i64>,
    /// With `[schema] key`: duplicates found, and the index of keys seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<crate::keys::KeyStats>,
}

impl PartitionStatus {
    /// The end of what the layers consume; older servers report only the log's.
    pub fn end(&self) -> Option<u64> {
        self.stream_end.or(self.log.as_ref().map(|l| l.end))
    }
}

/// [`crate::stream::log::PartitionStats`] but its partition (which
/// [`PartitionStatus`] names).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogStats {
    /// The lowest offset still in the log.
    pub start: u64,
    /// One past the last durable offset.
    pub end: u64,
    pub segments: usize,
    pub bytes: u64,
    pub fsyncs: u64,
    pub frames: u64,
}

impl From<crate::stream::log::PartitionStats> for LogStats {
    fn from(s: crate::stream::log::PartitionStats) -> LogStats {
        LogStats {
            start: s.start,
            end: s.end,
            segments: s.segments,
            bytes: s.bytes,
            fsyncs: s.fsyncs,
            frames: s.frames,
        }
    }
}

/// The stream's name for a partition (a Kinesis shard id) and its state.
pub use crate::stream::source::{PartitionInfo as Shard, PartitionState as ShardState};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IngestStatus {
    pub requests: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub bytes: u64,
    pub dead_letters_written: u64,
    /// Refused lines not kept: past their request's share of the store.
    pub dead_letters_dropped: u64,
    /// The dead-letter store's size, and the oldest files removed to keep it
    /// under `ingest.dead_letter_max`.
    pub dead_letter_bytes: u64,
    pub dead_letter_files_removed: u64,
    /// The latest refused lines with their reasons, newest first.
    #[serde(default)]
    pub dead_letters_recent: Vec<RecentReject>,
    /// Producers' numbered requests (`Lambdaflow-Producer`): none on a node
    /// that cannot recognise re-sent requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotence: Option<IdempotenceStatus>,
}

/// The request ledger: numbered requests, and the re-sent ones recognised.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdempotenceStatus {
    /// Requests that carried a producer and a sequence.
    pub identified: u64,
    /// Re-sent requests answered with their original offsets, nothing stored.
    pub recognised: u64,
    /// Re-sent requests stored in part before, completed.
    pub completed: u64,
    /// Refused: another body under a stored sequence (409), a sequence
    /// below its producer's window (422).
    pub changed: u64,
    pub too_old: u64,
    /// Producers with requests remembered now, and at most.
    pub producers: u64,
    /// Producers whose requests were dropped to make room for another:
    /// their older numbers get 422.
    #[serde(default)]
    pub retired: u64,
    pub max_producers: u64,
    pub window: u64,
}

/// A refused line, as the dashboard lists it.
pub use crate::stream::deadletter::RecentReject;

/// Views changed while serving, and the build in progress.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ViewChangesStatus {
    pub changes: Vec<ViewChange>,
    /// Events the build in progress has read, of those it reads.
    pub build_events_done: u64,
    pub build_events_total: u64,
}

/// [`crate::batch::changes::ChangeStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewChange {
    pub view: String,
    /// `add`, `change` or `drop`.
    pub change: String,
    /// The new version's fingerprint (not for a drop).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    pub requested_ms: i64,
    /// `waiting` (for the batch loop), `building`, `published`, `failed`,
    /// `cancelled` (an add dropped before it was built).
    pub state: String,
    /// The run that published it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl From<crate::batch::changes::ChangeStatus> for ViewChange {
    fn from(c: crate::batch::changes::ChangeStatus) -> ViewChange {
        ViewChange {
            view: c.view,
            change: c.change.to_string(),
            fingerprint: c.fingerprint,
            requested_ms: c.requested_ms,
            state: c.state.to_string(),
            run: c.run,
            error: c.error,
        }
    }
}

/// The cluster as this node sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The storage root of the master dataset and the views.
    pub root: String,
    /// The driver lease: holder, term, expiry, and whether this node holds it.
    pub lease: crate::cluster::lease::LeaseStatus,
}
