//! The seam between a stream and the layers that consume it: the speed
//! layer, the archiver and restart replay read events only through
//! [`Source`], whether they come from the embedded log, a Kafka topic or a
//! Kinesis stream.
//!
//! ```text
//!  embedded log ─┐
//!  Kafka topic  ─┼─ Source: partitions · end(p) · read(p, [from, until)) ─▶ speed layer ─▶ chunks
//!  Kinesis      ─┘          each record: its position and its stream time        └─▶ archiver
//! ```
//!
//! A position is ordered within its partition but need not be dense: Kafka
//! leaves gaps (transaction markers, aborted records). So a chunk is a
//! [`ChunkRange`] — a range of positions *with its event count* — and
//! nothing downstream computes a count from `end - start`.

use std::sync::Arc;
use std::time::Duration;

use arrow::record_batch::RecordBatch;
use serde::Serialize;

use super::Decoder;
use super::deadletter::{DeadLetter, DeadLetters};

impl SourceError {
    /// A backend's error, as is.
    pub fn backend(e: impl std::error::Error + Send + Sync + 'static) -> SourceError {
        SourceError::Backend(Box::new(e))
    }
}

/// Where each record of a [`SourceBatch`] sits in its partition.
#[derive(Debug, Clone)]
pub enum Positions {
    /// Records at `first, first + 1, …` (the embedded log, Kinesis).
    Dense { first: u64 },
    /// One position per record, increasing (Kafka, with its gaps), and one
    /// past the last position the read went over: records it skipped (a
    /// record refused to the dead-letter store, say) lie below `end` too, so
    /// a read of nothing but such records still moves the reader on.
    Listed { at: Arc<[u64]>, end: u64 },
}

/// When each record of a [`SourceBatch`] entered the stream (ms since the
/// epoch): the embedded log's ingest time, Kafka's record timestamp,
/// Kinesis' arrival time. Chunk boundaries are cut on it.
#[derive(Debug, Clone)]
pub enum StreamTimes {
    /// Every record of the batch (one log frame).
    All(i64),
    Each(Arc<[i64]>),
}

/// 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999Z, in ms since the epoch.
pub const MIN_STREAM_MS: i64 = -62_135_596_800_000;
pub const MAX_STREAM_MS: i64 = 253_402_300_799_999;

/// Records read from one partition: consecutive records of the stream (no
/// record of the partition lies between two of them).
#[derive(Debug, Clone)]
pub struct SourceBatch {
    pub partition: u32,
    pub batch: RecordBatch,
    pub positions: Positions,
    pub times: StreamTimes,
}

impl SourceBatch {
    /// A batch of the embedded log: dense positions, one time.
    pub fn dense(partition: u32, first: u64, time_ms: i64, batch: RecordBatch) -> SourceBatch {
        SourceBatch {
            partition,
            batch,
            positions: Positions::Dense { first },
            times: StreamTimes::All(time_ms),
        }
    }

    pub fn rows(&self) -> usize {
        self.batch.num_rows()
    }

    /// The position of record `row`.
    pub fn position(&self, row: usize) -> u64 {
        match &self.positions {
            Positions::Dense { first } => first + row as u64,
            Positions::Listed { at, .. } => at[row],
        }
    }

    /// One past the last position this batch went over: the last record's
    /// position + 1, or beyond it over records the read skipped.
    pub fn end(&self) -> u64 {
        match &self.positions {
            Positions::Dense { first } => first + self.rows() as u64,
            Positions::Listed { end, .. } => *end,
        }
    }

    /// One past the position of the last record, if there is one.
    pub fn last_record_end(&self) -> Option<u64> {
        self.rows()
            .checked_sub(1)
            .map(|last| self.position(last) + 1)
    }

    /// The stream time of record `row`, within years 1 to 9999: what a
    /// Delta timestamp (µs) and the engines that read it can hold. A Kafka
    /// producer sets its records' times, and one of 10¹⁶ ms would wrap the
    /// master dataset's `_ingest_time` (and decide event keys differently
    /// there than here).
    pub fn time_ms(&self, row: usize) -> i64 {
        let t = match &self.times {
            StreamTimes::All(t) => *t,
            StreamTimes::Each(t) => t[row],
        };
        t.clamp(MIN_STREAM_MS, MAX_STREAM_MS)
    }

    /// Records `[offset, offset + len)` of this batch.
    pub fn slice(&self, offset: usize, len: usize) -> SourceBatch {
        SourceBatch {
            partition: self.partition,
            batch: self.batch.slice(offset, len),
            positions: match &self.positions {
                Positions::Dense { first } => Positions::Dense {
                    first: first + offset as u64,
                },
                // A prefix ends after its last record; the whole keeps its end.
                Positions::Listed { at, end } => Positions::Listed {
                    at: at[offset..offset + len].into(),
                    end: if offset + len == at.len() {
                        *end
                    } else if len > 0 {
                        at[offset + len - 1] + 1
                    } else {
                        at[offset]
                    },
                },
            },
            times: match &self.times {
                StreamTimes::All(t) => StreamTimes::All(*t),
                StreamTimes::Each(t) => StreamTimes::Each(t[offset..offset + len].into()),
            },
        }
    }

    /// The records whose `keep` is true, at their positions (a batch with
    /// gaps, as Kafka's are); it still ends where this one does.
    pub fn keep(&self, keep: &[bool]) -> Result<SourceBatch, arrow::error::ArrowError> {
        if keep.iter().all(|&k| k) {
            return Ok(self.clone());
        }
        let mask = arrow::array::BooleanArray::from(keep.to_vec());
        let batch = arrow::compute::filter_record_batch(&self.batch, &mask)?;
        let rows = (0..self.rows()).filter(|&r| keep[r]);
        Ok(SourceBatch {
            partition: self.partition,
            batch,
            positions: Positions::Listed {
                at: rows.clone().map(|r| self.position(r)).collect(),
                end: self.end(),
            },
            times: match &self.times {
                StreamTimes::All(t) => StreamTimes::All(*t),
                StreamTimes::Each(t) => StreamTimes::Each(rows.map(|r| t[r]).collect()),
            },
        })
    }

    /// Each record's position, as a column (for `_offset`).
    pub fn position_column(&self) -> Vec<u64> {
        (0..self.rows()).map(|r| self.position(r)).collect()
    }
}

/// What became of one record sent to an external stream (Kafka, Kinesis):
/// both services answer per record, so a request that fails in part can
/// say exactly which of its events are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery<T> {
    /// The stream acknowledged it; where it went.
    Stored(T),
    /// The stream refused it, or it was never sent: resending it cannot
    /// count it twice.
    NotStored(String),
    /// Sent without an answer (a timeout, a connection lost mid-call): it
    /// may be stored.
    InDoubt(String),
}

/// One record of an external stream as it arrived: its position, its
/// stream time and its value (one event, a JSON object).
#[derive(Debug, Clone, Copy)]
pub struct RawRecord<'a> {
    pub position: u64,
    pub time_ms: i64,
    pub value: Option<&'a [u8]>,
}

/// Decodes records of partition `p` — consecutive, ending before `end` —
/// into one batch. A refused record goes to the dead-letter store with its
/// partition, position and reason, unless it lies below `mark` (refused
/// before: a re-read must not keep it twice), and becomes a gap.
///
/// `Err` when the refused records cannot be kept (a full disk): nothing is
/// skipped then; the caller reads the same records again later.
pub fn decode_records<'a>(
    decoder: &Decoder,
    dead: &DeadLetters,
    stream: &str,
    p: u32,
    records: impl IntoIterator<Item = RawRecord<'a>>,
    end: u64,
    mark: u64,
) -> Result<SourceBatch, super::deadletter::DeadLetterError> {
    let records: Vec<RawRecord<'a>> = records.into_iter().collect();
    let mut body = Vec::with_capacity(
        records
            .iter()
            .map(|r| r.value.map_or(0, |b| b.len() + 1))
            .sum(),
    );
    let mut lines: Vec<(u64, i64)> = Vec::with_capacity(records.len());
    let mut refused: Vec<DeadLetter> = Vec::new();
    let received = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    for r in &records {
        match r.value {
            Some(b) if !b.iter().all(u8::is_ascii_whitespace) => {
                // One record, one line: a newline outside a JSON string is
                // whitespace, and inside one it is invalid anyway.
                body.extend(
                    b.iter()
                        .map(|&c| if c == b'\n' || c == b'\r' { b' ' } else { c }),
                );
                body.push(b'\n');
                lines.push((r.position, r.time_ms));
            }
            raw if r.position >= mark => refused.push(
                DeadLetter::new(
                    &received,
                    1,
                    None,
                    "the record has no value (a tombstone or a blank record)".into(),
                    raw.unwrap_or_default(),
                )
                .at(p, r.position),
            ),
            _ => {}
        }
    }
    let mut rejected = vec![false; lines.len()];
    let decoded = decoder.decode_with(&body, p, &mut |reject| {
        let i = reject.line as usize - 1;
        rejected[i] = true;
        let (position, _) = lines[i];
        if position >= mark {
            refused.push(
                DeadLetter::new(&received, 1, reject.field, reject.reason, &body[reject.raw])
                    .at(p, position),
            );
        }
    });
    if !refused.is_empty() {
        refused.sort_by_key(|d| d.offset);
        dead.write_stream(stream, p, &refused, end)?;
    }
    let kept: Vec<(u64, i64)> = lines
        .iter()
        .zip(&rejected)
        .filter(|(_, r)| !**r)
        .map(|(l, _)| *l)
        .collect();
    let batch = decoded
        .batches
        .into_iter()
        .next()
        .map(|(_, b)| b)
        .unwrap_or_else(|| RecordBatch::new_empty(decoder.schema().arrow().clone()));
    debug_assert_eq!(batch.num_rows(), kept.len());
    Ok(SourceBatch {
        partition: p,
        batch,
        positions: Positions::Listed {
            at: kept.iter().map(|k| k.0).collect(),
            end,
        },
        times: StreamTimes::Each(kept.iter().map(|k| k.1).collect()),
    })
}

/// A stream's failure, as the layers see it: the backend's own error, or
/// one of the few kinds a layer acts on. A backend converts its errors
/// (`impl From<ItsError> for SourceError`), choosing the kind.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// What the backend reported (its own error, with its hint).
    #[error("{0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Records of `partition` from `offset` on cannot be read: the stream
    /// is damaged there (a torn or corrupt frame). What precedes `offset`
    /// is readable, and the speed layer serves it.
    #[error("{error}")]
    Damaged {
        partition: u32,
        offset: u64,
        #[source]
        error: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("no partition {partition}: the stream has {partitions} partitions")]
    NoSuchPartition { partition: u32, partitions: u32 },
    /// The stream ends inside a range that must be read whole (a chunk to
    /// archive or replay): asking again would spin.
    #[error("partition {partition} ends at {end}, inside the range [{start}, {until}) to read")]
    EndsInside {
        partition: u32,
        start: u64,
        until: u64,
        end: u64,
    },
    /// Events stored under an older schema cannot be read under this one.
    #[error(
        "events of partition {partition} from offset {offset} do not fit the event schema: {detail}"
    )]
    Conform {
        partition: u32,
        offset: u64,
        detail: String,
    },
}

/// A partitioned, ordered stream of events that can be read again from any
/// retained position.
#[async_trait::async_trait]
pub trait Source: Send + Sync + 'static {
    /// What the stream is, for logs and `status` ("embedded log", "Kafka topic `t`").
    fn describe(&self) -> String;

    /// How many partitions there are now (a topic may gain some).
    fn partitions(&self) -> u32;

    /// One past the last position readable now.
    fn end(&self, p: u32) -> Result<u64, SourceError>;

    /// The lowest position still readable (retention removes what is below).
    fn start(&self, p: u32) -> Result<u64, SourceError>;

    /// Records of `p` at positions in `[from, until)`, in order, about
    /// `max_events` of them at most; none if nothing is readable yet. The
    /// first returned record is the first of the partition at or after `from`.
    async fn read(
        &self,
        p: u32,
        from: u64,
        until: u64,
        max_events: usize,
    ) -> Result<Vec<SourceBatch>, SourceError>;

    /// Resolves when partition `p` may have records at or after `from`, or
    /// after `timeout`.
    async fn wait(&self, p: u32, from: u64, timeout: Duration);

    /// Whether partition `p` has ended for good: no record will ever follow
    /// `end(p)` (a Kinesis shard closed by a split or a merge).
    fn finished(&self, _p: u32) -> bool {
        false
    }

    /// What the stream needs, beyond a position, to read on from
    /// `position` after a restart (a Kinesis sequence number): the chunk of
    /// the master dataset that ends at `position` keeps it.
    fn resume_token(&self, _p: u32, _position: u64) -> Option<String> {
        None
    }

    /// A published batch run covers partition `p` below `end`: the source
    /// need not keep those records for this node any more. (Committed is
    /// not enough: a view built meanwhile reads from its run's H on.)
    fn archived(&self, _p: u32, _end: u64) {}

    /// Retention: the driver published a run whose master dataset holds
    /// partition `p` below `end`. A stream whose retention is lambdaflow's
    /// own (the embedded log) deletes what is below and returns the
    /// partition's new start; a service that keeps its own retention
    /// (Kafka, Kinesis) keeps its records: `None`.
    fn release_below(&self, _p: u32, _end: u64) -> Result<Option<u64>, SourceError> {
        Ok(None)
    }

    /// Stops reading for good (the stream is not the one the master dataset
    /// was written from any more); reads then find nothing new.
    fn stop(&self) {}

    /// Whether, after a restart, the stream resumes at H only with the
    /// resume tokens the master dataset's chunks keep ([`Source::resume`]).
    fn resumes_by_token(&self) -> bool {
        false
    }

    /// Starts reading each partition at `from[p]` (the published H), after
    /// the record `tokens[p]` names (the resume token the chunk ending at H
    /// keeps).
    fn resume(
        self: Arc<Self>,
        _from: &crate::chunk::Coverage,
        _tokens: &[Option<String>],
    ) -> Result<(), SourceError> {
        Ok(())
    }

    /// What the stream calls partition `p` and how it is (a Kinesis shard:
    /// its id; open, closed or throttled).
    fn info(&self, _p: u32) -> Option<PartitionInfo> {
        None
    }

    /// Whether the stream deletes only what the master dataset holds (the
    /// embedded log), so a start above the archived coverage is damage, not
    /// an upstream retention that outran the archiver.
    fn keeps_unarchived(&self) -> bool {
        false
    }
}

/// A partition as the stream names it, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct PartitionInfo {
    /// The stream's name for it (a Kinesis shard id).
    pub id: String,
    pub state: PartitionState,
    /// How far behind the stream's tip the reader is, as the stream says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub behind_ms: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionState {
    Open,
    /// Ended for good (a split or merged shard): its partition is final.
    Closed,
    /// Over the stream's read budget; the reader backs off.
    Throttled,
}

impl PartitionState {
    pub fn as_str(self) -> &'static str {
        match self {
            PartitionState::Open => "open",
            PartitionState::Closed => "closed",
            PartitionState::Throttled => "throttled",
        }
    }
}

/// Reads every record of partition `p` at positions `[start, end)` (to
/// archive a chunk, or rewrite its file): the stream must hold them all.
pub async fn read_exact(
    source: &dyn Source,
    p: u32,
    start: u64,
    end: u64,
) -> Result<Vec<SourceBatch>, SourceError> {
    let mut out = Vec::new();
    let mut next = start;
    while next < end {
        let read = source
            .read(p, next, end, (end - next).min(1 << 20) as usize)
            .await?;
        let Some(last) = read.last() else {
            return Err(SourceError::EndsInside {
                partition: p,
                start,
                until: end,
                end: source.end(p)?,
            });
        };
        next = last.end();
        out.extend(read);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_time_past_year_9999_is_held_at_its_end() {
        let b = SourceBatch {
            partition: 0,
            batch: RecordBatch::new_empty(Arc::new(arrow::datatypes::Schema::empty())),
            positions: Positions::Dense { first: 0 },
            times: StreamTimes::Each(
                vec![10_000_000_000_000_000, -10_000_000_000_000_000, 5].into(),
            ),
        };
        assert_eq!(
            b.time_ms(0),
            MAX_STREAM_MS,
            "10¹⁶ ms would wrap `_ingest_time` (µs)"
        );
        assert_eq!(b.time_ms(1), MIN_STREAM_MS);
        assert_eq!(b.time_ms(2), 5);
    }
}
