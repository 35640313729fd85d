//! The speed layer: the paper's Spark Streaming job. It consumes each
//! partition of the stream (any [`Source`]) in micro-batches, runs every
//! view's states plan on them (the same plan as the batch layer), and keeps
//! the states **per chunk** — the chunks the master dataset is cut into,
//! because this loop is what cuts them:
//!
//! ```text
//!  source p:  ···|── chunk [s1,e1) closed ──|── chunk [e1, …) open ──▶ R[p] (consumed)
//!                 └─▶ archive queue ─▶ master dataset commit (Txn version = e1)
//!  every micro-batch: states ⊕ into the open chunk; snapshot swapped into serving
//! ```
//!
//! Where a chunk ends is a function of the records alone, so any node that
//! consumes a partition cuts the same chunks: a chunk ends after
//! `chunk_events` events, or before the first record whose stream time falls
//! in a later `chunk_age` bucket than the chunk's first record. One cut
//! depends on time rather than data: an open chunk whose bucket has passed on
//! the clock with no later record to end it closes where it is (an idle
//! partition's events still reach the master dataset).
//!
//! On restart the loop replays the stream from the published batch coverage
//! H, reproducing the boundaries of chunks already committed after H (read
//! from the master dataset), so batch and realtime always meet at a chunk
//! boundary.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use tokio::sync::{mpsc, watch};

use crate::chunk::{ChunkRange, Coverage};
use crate::clock::{SharedClock, SystemClock};
use crate::health::Health;
use crate::metrics::Histogram;
use crate::serving::{Adopt, RealtimeChunk, Serving};
use crate::stream::ingest::Backlog;
use crate::stream::source::{Source, SourceBatch, SourceError, StreamTimes};
use crate::view::failures::{FailedRow, ViewFailures};
use crate::view::{View, ViewError};

pub mod keys;
pub use keys::{Dedup, DedupError};

/// How far a partition's key clock may run ahead of the wall clock before
/// health says so.
const CLOCK_AHEAD_MS: i64 = 3_600_000;

/// A micro-batch reads at most this many events (bounds memory during replays).
const MAX_MICRO_EVENTS: u64 = 1 << 20;

/// [`MAX_MICRO_EVENTS`] with event keys: 64 Ki keys are ~4.5 MiB of the
/// window, what it may pass its memory bound by per partition.
const MAX_KEYED_MICRO_EVENTS: u64 = 1 << 16;
/// A chunk's states for one view are compacted when this many batches pile up.
const COMPACT_AT: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SpeedError {
    #[error("{0}")]
    Source(#[from] SourceError),
    #[error("{0}")]
    View(#[from] ViewError),
    #[error("{0}")]
    Keys(#[from] DedupError),
}

/// Counters for status and metrics.
#[derive(Debug, Default)]
pub struct SpeedMetrics {
    pub events: AtomicU64,
    pub chunks_closed: AtomicU64,
    /// Micro-batch durations (one observation per partition micro-batch).
    pub micro: Histogram,
    /// Per partition, the stream time (ms since the epoch) of the last
    /// record consumed: how far behind the speed layer is in time, while
    /// records wait (0 before the first).
    pub last_record_ms: std::sync::Mutex<Vec<i64>>,
    /// With `[schema] key`: per partition, duplicates found and the key index's sizes.
    pub keys: std::sync::Mutex<Option<Vec<crate::keys::KeyStats>>>,
}

impl SpeedMetrics {
    /// How far behind partition `p` is in time: `now` minus the stream time
    /// of its last consumed record, when `waiting` records are not consumed
    /// yet; 0 when it is caught up.
    pub fn lag_ms(&self, p: usize, waiting: u64, now_ms: i64) -> i64 {
        if waiting == 0 {
            return 0;
        }
        let last = self
            .last_record_ms
            .lock()
            .expect("speed metrics")
            .get(p)
            .copied()
            .unwrap_or(0);
        if last == 0 { 0 } else { (now_ms - last).max(0) }
    }
}

impl SpeedMetrics {
    fn observe(&self, took: Duration, events: u64) {
        self.events.fetch_add(events, Ordering::Relaxed);
        self.micro.observe(took);
    }
}

struct Part {
    /// Where the next read starts: one past the last position consumed, or
    /// H. Records a source skipped (refused to the dead-letter store) may
    /// lie between the open chunk's end and here.
    next: u64,
    /// Where the next chunk starts: the end of the last closed one, or H.
    /// A chunk ends right after its last record, so skipped records after
    /// it open the next chunk, and boundaries depend on the records alone.
    edge: u64,
    chunks: Vec<Arc<RealtimeChunk>>,
    /// The open chunk's `chunk_age` bucket: its first record's stream time
    /// divided by `chunk_age`.
    bucket: Option<i64>,
    /// Chunks already committed ahead of `next` (replay): their boundaries
    /// are kept whatever the records' times say.
    replay: VecDeque<ChunkRange>,
}

impl Part {
    /// A partition consumed from `next`, with the chunks already committed
    /// at or after it to reproduce.
    fn at(next: u64, mut committed: Vec<ChunkRange>) -> Part {
        committed.sort_unstable();
        committed.retain(|r| r.start() >= next);
        Part {
            next,
            edge: next,
            chunks: Vec::new(),
            bucket: None,
            replay: committed.into(),
        }
    }
}

/// How much of a micro-batch's records go into the open chunk.
struct Cut {
    /// The records that join the open chunk.
    take: Vec<SourceBatch>,
    /// Whether the open chunk is complete after them.
    closes: bool,
    /// The open chunk's bucket after them.
    bucket: Option<i64>,
}

/// When micro-batches run and where chunks close.
#[derive(Debug, Clone, Copy)]
pub struct SpeedOptions {
    /// At most one micro-batch per interval.
    pub interval: Duration,
    pub chunk_events: u64,
    pub chunk_age: Duration,
}

/// Merges each view's state batches into one.
async fn compact(
    views: &[Arc<View>],
    states: Vec<Vec<RecordBatch>>,
) -> Result<Vec<Vec<RecordBatch>>, ViewError> {
    let mut out = Vec::with_capacity(states.len());
    for (v, s) in views.iter().zip(states) {
        out.push(if s.len() > 1 {
            vec![v.merge(s).await?]
        } else {
            s
        });
    }
    Ok(out)
}

/// How far a record's stream time may lie before its chunk's bucket and
/// still join the chunk: at least one bucket, and at least this long.
/// Producers' clocks differ (Kafka's record time is the producer's), so
/// records a little out of order join the chunk in hand; a record far
/// earlier than the chunk's bucket means the chunk was opened by one stamped
/// far ahead, and it starts a chunk of its own.
const EARLIER_SLACK_MS: i64 = 60_000;

/// [`EARLIER_SLACK_MS`] in buckets of `age_ms`, at least one.
fn earlier_slack(age_ms: i64) -> i64 {
    (EARLIER_SLACK_MS + age_ms - 1).div_euclid(age_ms).max(1)
}

/// Whether a record of bucket `t` joins a chunk of bucket `chunk`: not one
/// of a later bucket, nor one more than [`earlier_slack`] buckets earlier.
/// A record stamped far in the future thus forms a chunk of its own (the
/// next record of the present closes it) instead of taking in every record
/// after it, which would stay unarchived until the clock reached its bucket.
fn joins_bucket(chunk: Option<i64>, t: i64, slack: i64) -> bool {
    chunk.is_none_or(|cb| t <= cb && t >= cb.saturating_sub(slack))
}

/// The records of `read` that join the open chunk, which has room for
/// `room` more events and whose bucket is `bucket` (`None` while empty): a
/// chunk ends when it is full, or before the first record of a later bucket
/// or of a bucket far earlier ([`joins_bucket`]).
fn cut(read: Vec<SourceBatch>, mut room: u64, mut bucket: Option<i64>, age_ms: i64) -> Cut {
    let slack = earlier_slack(age_ms);
    let mut take = Vec::with_capacity(read.len());
    for b in read {
        let n = b.rows();
        let joins = match &b.times {
            StreamTimes::All(t) => {
                let t = t.div_euclid(age_ms);
                if !joins_bucket(bucket, t, slack) {
                    0
                } else {
                    bucket.get_or_insert(t);
                    n.min(room as usize)
                }
            }
            StreamTimes::Each(_) => {
                let mut k = 0;
                while k < n && (k as u64) < room {
                    let t = b.time_ms(k).div_euclid(age_ms);
                    if !joins_bucket(bucket, t, slack) {
                        break;
                    }
                    bucket.get_or_insert(t);
                    k += 1;
                }
                k
            }
        };
        room -= joins as u64;
        if joins == n {
            take.push(b);
            if room == 0 {
                break;
            }
            continue;
        }
        if joins > 0 {
            take.push(b.slice(0, joins));
        }
        return Cut {
            take,
            closes: true,
            bucket,
        };
    }
    Cut {
        take,
        closes: room == 0,
        bucket,
    }
}

/// The rows of `take` (partition `p`) a view failed on, by position.
fn failed_rows(
    v: &View,
    p: u32,
    take: &[SourceBatch],
    bad: Vec<crate::view::Excluded>,
) -> Vec<FailedRow> {
    bad.into_iter()
        .map(|x| FailedRow {
            view: v.name().to_string(),
            partition: p,
            offset: take[x.batch].position(x.row),
            error: x.error,
        })
        .collect()
}

/// The speed layer of a node.
pub struct SpeedLayer {
    source: Arc<dyn Source>,
    /// Every view by index (as [`Serving::views`]); states are computed for
    /// the `live` ones only.
    views: Vec<Arc<View>>,
    live: Vec<usize>,
    changes: Option<mpsc::UnboundedReceiver<Adopt>>,
    serving: Arc<Serving>,
    archive: mpsc::UnboundedSender<ChunkRange>,
    interval: Duration,
    chunk_events: u64,
    chunk_age: Duration,
    parts: Vec<Part>,
    pub metrics: Arc<SpeedMetrics>,
    /// Where failing partitions are reported.
    pub health: Arc<Health>,
    /// Where the rows a view fails on are recorded.
    pub failures: Arc<ViewFailures>,
    /// The realtime window's size, measured every round for ingest's bound.
    pub backlog: Arc<Backlog>,
    /// When an idle open chunk's bucket has passed.
    pub clock: SharedClock,
    /// With `[schema] key`: which events are duplicates (left out of the states).
    pub dedup: Option<Dedup>,
    /// Over a master dataset that records duplicates (`_duplicate`): where
    /// a committed chunk read again finds the decisions made for it, which
    /// stand whatever the key rule is now.
    pub recorded: Option<Arc<dyn crate::keys::History>>,
    /// The decisions of the committed chunk being read again (partition,
    /// start, end): its micro-batches share one read of them.
    recorded_chunk: Option<((u32, u64, u64), Vec<u64>)>,
    /// The key index's tail as the window was last measured.
    keys_measured: u64,
}

impl SpeedLayer {
    /// Starts at coverage `h`; `committed[p]` are the committed chunks of p at or after h[p].
    pub fn new(
        source: Arc<dyn Source>,
        serving: Arc<Serving>,
        archive: mpsc::UnboundedSender<ChunkRange>,
        options: SpeedOptions,
        h: &Coverage,
        committed: Vec<Vec<ChunkRange>>,
    ) -> SpeedLayer {
        let views = serving.views().as_ref().clone();
        let live = serving.snapshot().live.as_ref().clone();
        let SpeedOptions {
            interval,
            chunk_events,
            chunk_age,
        } = options;
        let parts = h
            .iter()
            .zip(committed)
            .map(|((_, next), c)| Part::at(next, c))
            .collect();
        SpeedLayer {
            source,
            views,
            live,
            changes: None,
            serving,
            archive,
            interval,
            chunk_events: chunk_events.max(1),
            chunk_age: chunk_age.max(Duration::from_millis(1)),
            parts,
            metrics: Arc::new(SpeedMetrics::default()),
            health: Arc::new(Health::default()),
            failures: Arc::new(ViewFailures::new(std::env::temp_dir())),
            backlog: Arc::new(Backlog::default()),
            clock: SystemClock::shared(),
            dedup: None,
            recorded: None,
            recorded_chunk: None,
            keys_measured: 0,
        }
    }

    /// Where view changes reach the loop (see [`Adopt`]).
    pub fn changes(&mut self) -> mpsc::UnboundedSender<Adopt> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.changes = Some(rx);
        tx
    }

    /// Adopts a new set of views: the states of views new to it for every
    /// chunk the new run does not cover, from the chunks' records; then
    /// serving gets the views, the run and the chunks in one swap.
    async fn adopt(
        &mut self,
        views: Vec<Arc<View>>,
        live: Vec<usize>,
        side: Arc<crate::serving::BatchSide>,
    ) -> Result<(), SpeedError> {
        let h = side.manifest.h.clone();
        let mut parts = Vec::with_capacity(self.parts.len());
        let mut all = Vec::with_capacity(self.parts.len());
        for p in 0..self.parts.len() {
            let hp = h.get(p as u32);
            let mut chunks = Vec::new();
            for c in self.parts[p].chunks.iter().filter(|c| c.range.end() > hp) {
                let mut states = Vec::with_capacity(views.len());
                let mut records: Option<Vec<SourceBatch>> = None;
                for (i, v) in views.iter().enumerate() {
                    if !live.contains(&i) {
                        states.push(Vec::new());
                    } else if self.live.contains(&i) {
                        states.push(c.states.get(i).cloned().unwrap_or_default());
                    } else {
                        if records.is_none() && c.range.end() > c.range.start() {
                            records = Some(
                                crate::stream::source::read_exact(
                                    self.source.as_ref(),
                                    p as u32,
                                    c.range.start(),
                                    c.range.end(),
                                )
                                .await?,
                            );
                        }
                        let take = records.as_deref().unwrap_or_default();
                        let kept;
                        let take = match &self.dedup {
                            Some(d) => {
                                kept = d.decided(p as u32, take)?;
                                &kept[..]
                            }
                            None => take,
                        };
                        states.push(if take.is_empty() {
                            Vec::new()
                        } else {
                            vec![self.view_states(v, p as u32, take).await?]
                        });
                    }
                }
                chunks.push(Arc::new(RealtimeChunk {
                    range: c.range,
                    closed: c.closed,
                    states,
                    indexes: Default::default(),
                }));
            }
            all.push(chunks);
        }
        for (p, chunks) in all.into_iter().enumerate() {
            let part = &mut self.parts[p];
            let end = chunks.last().map_or(part.next, |c| c.range.end());
            part.chunks = chunks.clone();
            parts.push((p as u32, chunks, end));
        }
        self.views = views.clone();
        self.live = live.clone();
        self.serving.adopt(views, live, Some(side), parts);
        Ok(())
    }

    /// Handles the view changes waiting, if any.
    async fn take_changes(&mut self) {
        let Some(rx) = self.changes.as_mut() else {
            return;
        };
        let mut pending = Vec::new();
        while let Ok(a) = rx.try_recv() {
            pending.push(a);
        }
        for Adopt {
            views,
            live,
            side,
            done,
        } in pending
        {
            let r = self.adopt(views, live, side).await;
            if let Err(e) = &r {
                tracing::error!(error = %crate::error::chain(e), "the speed layer could not compute the new views' states");
            }
            let _ = done.send(r.map_err(|e| crate::error::chain(&e)));
        }
    }

    /// Consumes everything in the log now (the replay before serving).
    pub async fn catch_up(&mut self) -> Result<(), SpeedError> {
        loop {
            let moved = self.round().await?;
            if !moved {
                return Ok(());
            }
        }
    }

    /// One micro-batch round over every partition; true if any event was consumed.
    ///
    /// A partition that fails (a corrupt log frame, say) is reported and
    /// retried next round; it does not hold the others back, and it never
    /// skips: its high-water mark stays below the events it cannot read.
    pub async fn round(&mut self) -> Result<bool, SpeedError> {
        // Partitions the stream gained (a topic's new partitions, a Kinesis
        // shard's children) start empty at 0: nothing of them is archived.
        let known = self.source.partitions() as usize;
        while self.parts.len() < known {
            tracing::info!(partition = self.parts.len(), source = %self.source.describe(), "consuming a new partition");
            self.parts.push(Part::at(0, Vec::new()));
        }
        let h = self.serving.snapshot().h();
        let mut moved = false;
        let mut changed = Vec::new();
        for p in 0..self.parts.len() {
            let hp = h.get(p as u32);
            let before = self.parts[p].next;
            let component = format!("speed/p{p}");
            let aged = match self.advance(p, hp).await {
                Ok(aged) => {
                    self.health.clear(&component);
                    aged
                }
                Err(e) => {
                    let n = self.health.report_error(&component, &e);
                    if n.is_power_of_two() {
                        tracing::error!(partition = p, failures = n, error = %e, "speed layer cannot consume a partition; retrying");
                    }
                    false
                }
            };
            // What was consumed before a failure is served all the same.
            let consumed = self.parts[p].next != before;
            moved |= consumed;
            if consumed || aged {
                let part = &self.parts[p];
                let end = part.chunks.last().map_or(part.next, |c| c.range.end());
                changed.push((p as u32, part.chunks.clone(), end));
            }
        }
        if !changed.is_empty() {
            crate::failpoint::hit("speed-micro-batch");
            self.serving.set_realtime(changed);
        }
        self.measure_window(&h);
        if let Some(d) = &mut self.dedup {
            if let Some((n, stray)) = d.new_strays() {
                let sample = crate::keys::placement::SAMPLE;
                self.health.warn(
                    "event keys",
                    &format!(
                        "{n} of the keys checked (one in {sample}) came to another partition \
                         than their earlier occurrence within the horizon: about {} duplicates \
                         were counted again. The latest: {stray}. Duplicates are found per \
                         partition: every producer must key each record by the event key `{}` \
                         as README's \"Partitioning\" says (a Kafka record's key with the Java \
                         client's partitioner, a Kinesis record's partition key), and the \
                         topic's partitions or the stream's shards must not change within the \
                         horizon",
                        n * sample,
                        d.field()
                    ),
                );
            }
            // A record stamped far in the future moves its partition's clock
            // there: keys are forgotten by that clock, so none is until then.
            let now = self.clock.unix_ms();
            for (p, clock) in d.clocks() {
                let component = format!("event keys/p{p}");
                if clock > now.saturating_add(CLOCK_AHEAD_MS) {
                    self.health.warn(
                        &component,
                        &format!(
                            "partition {p}'s clock for event keys is {}, {} ahead of now: a record \
                             was stamped in the future. A key is remembered for `within` of this \
                             clock, so none is forgotten until then (the index grows with every \
                             key, and a key sent again after `within` is still a duplicate). Kafka \
                             brokers refuse such records with `log.message.timestamp.after.max.ms`",
                            chrono::DateTime::from_timestamp_millis(clock)
                                .map_or(clock.to_string(), |t| t.to_rfc3339()),
                            humantime::format_duration(std::time::Duration::from_secs(
                                (clock.saturating_sub(now) / 1000) as u64
                            ))
                        ),
                    );
                } else {
                    self.health.unwarn(&component);
                }
            }
            *self.metrics.keys.lock().expect("speed metrics") = Some(d.stats());
        }
        Ok(moved)
    }

    /// Whether the realtime window is at its memory bound now: the states
    /// as last measured, and the key index's tail as it is (what grows
    /// fastest within a round).
    fn window_full(&self) -> bool {
        let keys = self.dedup.as_ref().map_or(0, Dedup::window_bytes);
        self.backlog
            .memory_full_with(keys.saturating_sub(self.keys_measured))
    }

    /// Measures the realtime window — events in the log above the published
    /// H, and the memory of the realtime states and of the key index's
    /// tail (which holds every key above H) — for ingest's bound, and
    /// reports when it is over (the batch layer is not keeping up).
    fn measure_window(&mut self, h: &Coverage) {
        let events: u64 = (0..self.parts.len())
            .map(|p| {
                let end = self.source.end(p as u32).unwrap_or(0);
                end.saturating_sub(h.get(p as u32))
            })
            .sum();
        let memory: u64 = self
            .parts
            .iter()
            .flat_map(|part| part.chunks.iter())
            .flat_map(|c| c.states.iter().flatten())
            .map(|b| b.get_array_memory_size() as u64)
            .sum::<u64>();
        let keys = self.dedup.as_ref().map_or(0, Dedup::window_bytes);
        self.keys_measured = keys;
        self.backlog.measure(events, memory + keys);
        match self.backlog.check() {
            Ok(()) => self.health.clear("backlog"),
            Err(e) => {
                if self.health.report("backlog", &e) == 1 {
                    tracing::warn!(error = %e, "ingest is refused until the batch layer publishes");
                }
            }
        }
    }

    /// Consumes what partition `p` has, in micro-batches, closing chunks;
    /// true if the open chunk was closed because its bucket passed.
    async fn advance(&mut self, p: usize, hp: u64) -> Result<bool, SpeedError> {
        let end = self.source.end(p as u32)?;
        let age_ms = self.chunk_age.as_millis().max(1) as i64;
        // Chunks the installed batch run covers are no longer needed.
        let part = &mut self.parts[p];
        part.chunks.retain(|c| c.range.end() > hp);
        // The stream may drop what a published run covers — not what is
        // only committed: a view built meanwhile starts its realtime states
        // at its own run's H, and reads the stream above it.
        self.source.archived(p as u32, hp);
        // H inside a chunk, or ahead of what was read: the run archived
        // another node's chunks (a cluster's driver, or the one before a
        // failover). Read on from H, so the chunks line up with it again.
        let misaligned = match part.chunks.first() {
            Some(c) => c.range.start() != hp,
            None => part.edge < hp,
        };
        if misaligned {
            tracing::debug!(
                partition = p,
                h = hp,
                next = part.next,
                "realigning on the published H"
            );
            *part = Part::at(hp, Vec::new());
        }
        if let Some(d) = self.dedup.as_mut()
            && !d.align(p as u32, hp, self.parts[p].next).await?
        {
            // The index lacks events above H (rebuilt meanwhile): read on from H.
            self.parts[p] = Part::at(hp, Vec::new());
            d.align(p as u32, hp, hp).await?;
        }
        // The realtime window at its memory bound: nothing more is read (the
        // stream keeps it) until the batch layer publishes; the open chunk
        // closes now, so that the batch layer can take it.
        let mut full = self.window_full();
        while !full && self.parts[p].next < end {
            let t = Instant::now();
            let part = &mut self.parts[p];
            let (open, replaying) = Self::open_chunk(part, p as u32, self.views.len());
            let until = replaying.map_or(end, |r| r.end().min(end));
            // With event keys each event read adds to the window's memory
            // (its key, until the batch layer publishes): smaller reads let
            // the bound stop a backlog between them.
            let most = if self.dedup.is_some() {
                MAX_KEYED_MICRO_EVENTS
            } else {
                MAX_MICRO_EVENTS
            };
            let room = if replaying.is_some() {
                most
            } else {
                (self.chunk_events - open.range.events()).min(most)
            };
            let read = match self
                .source
                .read(p as u32, part.next, until, room as usize)
                .await
            {
                // Damage ahead: serve what precedes it; the next read stops at it
                // again and reports it (never skipping past).
                Err(SourceError::Damaged { offset, .. })
                    if offset > part.next && offset < until =>
                {
                    self.source
                        .read(p as u32, part.next, offset, room as usize)
                        .await?
                }
                r => r?,
            };
            if read.is_empty() {
                break; // nothing readable yet (positions without records ahead)
            }
            // A replayed chunk keeps its committed end; no bucket is needed
            // (an idle chunk closes by time only once the replay is done).
            let Cut {
                take,
                closes,
                bucket,
            } = match replaying {
                Some(r) => {
                    let last = read.last().map_or(part.next, SourceBatch::end);
                    Cut {
                        take: read,
                        closes: last >= r.end(),
                        bucket: None,
                    }
                }
                None => cut(
                    read,
                    self.chunk_events - open.range.events(),
                    part.bucket,
                    age_ms,
                ),
            };
            part.bucket = bucket;
            let taken: u64 = take.iter().map(|b| b.rows() as u64).sum();
            // The chunk ends after its last record; the reader goes on from
            // the end of what it read (skipped records included).
            let new_end = take
                .iter()
                .rev()
                .find_map(SourceBatch::last_record_end)
                .unwrap_or(open.range.end());
            let read_to = take.last().map_or(part.next, SourceBatch::end);
            // Duplicates are decided once, here, and counted by no view; a
            // committed chunk read again keeps the master dataset's decisions.
            let counted = match (replaying, &self.recorded) {
                (Some(r), Some(history)) if taken > 0 => {
                    // Read once per chunk, not per micro-batch (on S3 each
                    // read is a LIST of the partition's lists).
                    let id = (p as u32, r.start(), r.end());
                    let known = match &self.recorded_chunk {
                        Some((at, known)) if *at == id => known.clone(),
                        _ => {
                            let known = history
                                .recorded(p as u32, r.start(), r.end())
                                .await
                                .map_err(|detail| DedupError::History {
                                    partition: p as u32,
                                    from: r.start(),
                                    to: r.end(),
                                    detail,
                                })?;
                            self.recorded_chunk = Some((id, known.clone()));
                            known
                        }
                    };
                    if let Some(d) = self.dedup.as_mut() {
                        d.feed(p as u32, &take, &known)?;
                    }
                    Some(keys::without(&take, &known)?)
                }
                _ => match self.dedup.as_mut() {
                    Some(d) if taken > 0 => Some(d.decide(p as u32, &take)?),
                    _ => None,
                },
            };
            let mut states = if taken == 0 {
                open.states.clone()
            } else {
                self.states_of(p as u32, &open, counted.as_deref().unwrap_or(&take))
                    .await?
            };
            // Batches only appended keep their point-read indexes; a compaction drops them.
            let mut indexes = open.indexes.clone();
            for (i, v) in self.views.iter().enumerate() {
                if states[i].len() >= COMPACT_AT {
                    let merged = v.merge(std::mem::take(&mut states[i])).await?;
                    states[i].push(merged);
                    indexes = Default::default();
                }
            }
            if closes {
                // A closed chunk no longer grows: one state batch per view reads fastest.
                states = compact(&self.views, states).await?;
                indexes = Default::default();
            }
            let range = ChunkRange::new(
                p as u32,
                open.range.start(),
                new_end,
                open.range.events() + taken,
            )
            .expect("records are read in order, one position each");
            let part = &mut self.parts[p];
            *part.chunks.last_mut().expect("open chunk") = Arc::new(RealtimeChunk {
                range,
                closed: closes,
                states,
                indexes,
            });
            self.metrics.observe(t.elapsed(), taken);
            if let Some(b) = take.iter().rev().find(|b| b.rows() > 0) {
                let mut last = self.metrics.last_record_ms.lock().expect("speed metrics");
                if last.len() <= p {
                    last.resize(p + 1, 0);
                }
                last[p] = b.time_ms(b.rows() - 1);
            }
            part.next = read_to;
            if closes {
                Self::close(part, &self.archive, &self.metrics);
            }
            // Checked after every micro-batch: a backlog read after a
            // publish (or at startup) must not pass the bound in one round.
            full = self.window_full();
        }
        // An idle open chunk (not a replayed one) whose bucket has passed on
        // the clock closes where it is: no later record will end it. So does
        // one whose bucket lies further ahead of the clock than a record may
        // lie before it (stamped far in the future: a record of the present
        // would start a new chunk anyway). Nor will a record end one after a
        // partition's last record (a closed Kinesis shard): its end is a
        // boundary every node cuts. A full window closes it too (above).
        let finished = self.parts[p].next >= end && self.source.finished(p as u32);
        let part = &mut self.parts[p];
        let now_bucket = self.clock.unix_ms().div_euclid(age_ms);
        if let (Some(bucket), Some(last)) = (part.bucket, part.chunks.last())
            && !last.closed
            && part.replay.is_empty()
            && last.range.events() > 0
            && (!joins_bucket(Some(bucket), now_bucket, earlier_slack(age_ms)) || finished || full)
        {
            let mut c = (**last).clone();
            c.closed = true;
            c.states = compact(&self.views, c.states).await?;
            c.indexes = Default::default();
            *part.chunks.last_mut().expect("open chunk") = Arc::new(c);
            Self::close(part, &self.archive, &self.metrics);
            return Ok(true);
        }
        Ok(false)
    }

    /// Every view's states of the open chunk with `take` added: a row a
    /// view fails on is left out of that view alone (the batch layer leaves
    /// out the same rows) and recorded; the partition goes on.
    async fn states_of(
        &self,
        p: u32,
        open: &RealtimeChunk,
        take: &[SourceBatch],
    ) -> Result<Vec<Vec<RecordBatch>>, SpeedError> {
        let batches: Vec<RecordBatch> = take.iter().map(|b| b.batch.clone()).collect();
        // Views with ordered aggregates also read each event's (partition, offset).
        let keyed: Vec<RecordBatch> = if self.views.iter().any(|v| v.needs_offsets()) {
            take.iter()
                .map(|b| crate::view::input::with_positions(&b.batch, p, &b.position_column()))
                .collect::<Result<_, _>>()
                .map_err(|e| SpeedError::View(ViewError::Internal(e.into())))?
        } else {
            Vec::new()
        };
        let mut states = open.states.clone();
        for (i, v) in self.views.iter().enumerate() {
            if !self.live.contains(&i) {
                continue;
            }
            let input = if v.needs_offsets() { &keyed } else { &batches };
            let (s, bad) = v.states_excluding(input.clone()).await?;
            if !bad.is_empty() {
                let rows = failed_rows(v, p, take, bad);
                if self.failures.record(&rows) > 0 {
                    let first = &rows[0];
                    let seen = &self.failures.report()[v.name()];
                    self.health.report(
                        &format!("view/{}", v.name()),
                        &format!(
                            "{} events left out of the view: its expressions fail on them (latest: partition {} offset {}: {}); they are listed in {}",
                            seen.events, first.partition, first.offset, first.error, seen.file,
                        ),
                    );
                }
            }
            states[i].push(s);
        }
        Ok(states)
    }

    /// One view's states of some records (rows it fails on left out and
    /// recorded, as [`SpeedLayer::states_of`] does).
    async fn view_states(
        &self,
        v: &Arc<View>,
        p: u32,
        take: &[SourceBatch],
    ) -> Result<RecordBatch, SpeedError> {
        let input: Vec<RecordBatch> = if v.needs_offsets() {
            take.iter()
                .map(|b| crate::view::input::with_positions(&b.batch, p, &b.position_column()))
                .collect::<Result<_, _>>()
                .map_err(|e| SpeedError::View(ViewError::Internal(e.into())))?
        } else {
            take.iter().map(|b| b.batch.clone()).collect()
        };
        let (s, bad) = v.states_excluding(input).await?;
        if !bad.is_empty() {
            self.failures.record(&failed_rows(v, p, take, bad));
        }
        Ok(s)
    }

    /// Ensures the last chunk is open; returns it and, when replaying, the
    /// committed chunk it must reproduce.
    fn open_chunk(
        part: &mut Part,
        p: u32,
        views: usize,
    ) -> (Arc<RealtimeChunk>, Option<ChunkRange>) {
        if part.chunks.last().is_none_or(|c| c.closed) {
            // Chunks are contiguous: the next one starts where the last ended.
            part.chunks.push(Arc::new(RealtimeChunk {
                range: ChunkRange::new(p, part.edge, part.edge, 0).expect("an empty range"),
                closed: false,
                states: vec![Vec::new(); views],
                indexes: Default::default(),
            }));
            part.bucket = None;
        }
        let open = part.chunks.last().expect("open chunk").clone();
        // Replaying: the boundary is the committed chunk's.
        while part
            .replay
            .front()
            .is_some_and(|r| r.start() < open.range.start())
        {
            part.replay.pop_front();
        }
        let replaying = part
            .replay
            .front()
            .filter(|r| r.start() == open.range.start())
            .copied();
        (open, replaying)
    }

    fn close(part: &mut Part, archive: &mpsc::UnboundedSender<ChunkRange>, metrics: &SpeedMetrics) {
        let range = part.chunks.last().expect("closed chunk").range;
        part.bucket = None;
        part.edge = range.end();
        metrics.chunks_closed.fetch_add(1, Ordering::Relaxed);
        if part
            .replay
            .front()
            .is_some_and(|r| r.start() == range.start() && r.end() == range.end())
        {
            // Committed before the restart: nothing to archive.
            part.replay.pop_front();
            return;
        }
        let _ = archive.send(range);
    }

    /// The loop: a micro-batch at most every `interval`, as soon as events arrive.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let age_tick =
            (self.chunk_age / 4).clamp(Duration::from_millis(5), Duration::from_millis(250));
        loop {
            if *stop.borrow() {
                break;
            }
            let began = Instant::now();
            self.take_changes().await;
            if let Err(e) = self.round().await {
                tracing::error!(error = %e, "speed layer round failed; retrying");
            }
            // Wait for new events (or a chunk to age), but not sooner than `interval`.
            let pending = (0..self.parts.len()).any(|p| {
                self.source
                    .end(p as u32)
                    .is_ok_and(|e| e > self.parts[p].next)
            });
            if !pending {
                let source = &self.source;
                let waits = futures::future::select_all(
                    self.parts
                        .iter()
                        .enumerate()
                        .map(|(p, part)| source.wait(p as u32, part.next, age_tick)),
                );
                tokio::select! {
                    _ = waits => {}
                    _ = stop.changed() => {}
                }
            }
            let next = began + self.interval;
            tokio::select! {
                _ = tokio::time::sleep_until(next.into()) => {}
                _ = stop.changed() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use proptest::prelude::*;

    /// Records at `positions` with stream times `times`, as one batch of a
    /// read that went over everything below `end` (skipped records between).
    fn records(positions: &[u64], times: &[i64], end: u64) -> SourceBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let col = Int64Array::from_iter_values(positions.iter().map(|&p| p as i64));
        SourceBatch {
            partition: 0,
            batch: RecordBatch::try_new(schema, vec![Arc::new(col)]).expect("a batch"),
            positions: crate::stream::source::Positions::Listed {
                at: positions.into(),
                end,
            },
            times: StreamTimes::Each(times.into()),
        }
    }

    /// Cuts a partition's records into chunks the way [`SpeedLayer::advance`]
    /// does, with the reads split at `splits` (how many records each read
    /// returns): the chunk ranges.
    fn chunks(
        positions: &[u64],
        times: &[i64],
        splits: &[usize],
        size: u64,
        age_ms: i64,
    ) -> Vec<ChunkRange> {
        let mut out = Vec::new();
        let (mut at, mut start, mut events, mut bucket) = (0usize, 0u64, 0u64, None);
        let mut end = 0u64;
        let mut split = splits.iter().cycle();
        while at < positions.len() {
            let n = (*split.next().expect("cycle")).clamp(1, positions.len() - at);
            // The read went over the positions up to the next record (the
            // gaps could be records it skipped), as the Kafka source's do.
            let read_end = positions
                .get(at + n)
                .copied()
                .unwrap_or(positions[at + n - 1] + 1);
            let read = vec![records(
                &positions[at..at + n],
                &times[at..at + n],
                read_end,
            )];
            let Cut {
                take,
                closes,
                bucket: after,
            } = cut(read, size - events, bucket, age_ms);
            bucket = after;
            let taken: usize = take.iter().map(|b| b.rows()).sum();
            events += taken as u64;
            at += taken;
            // As the speed layer does: the chunk ends after its last record.
            end = take
                .iter()
                .rev()
                .find_map(SourceBatch::last_record_end)
                .unwrap_or(end);
            if closes {
                out.push(ChunkRange::new(0, start, end, events).expect("a range"));
                (start, events, bucket) = (end, 0, None);
            }
        }
        if events > 0 {
            out.push(ChunkRange::new(0, start, end, events).expect("a range"));
        }
        out
    }

    #[test]
    fn a_chunk_ends_when_full_or_before_a_later_bucket() {
        // Positions with gaps (as Kafka's), times in 1 s buckets.
        let positions = [0, 1, 3, 4, 5, 9, 10, 11];
        let times = [0, 100, 900, 1_000, 1_500, 1_200, 2_500, 2_600];
        let got = chunks(&positions, &times, &[8], 3, 1_000);
        let want = vec![
            // 0, 100, 900 fill the chunk (3 events).
            ChunkRange::new(0, 0, 4, 3).unwrap(),
            // 1_000, 1_500, then 1_200 (earlier, same chunk: times need not climb).
            ChunkRange::new(0, 4, 10, 3).unwrap(),
            // bucket 2.
            ChunkRange::new(0, 10, 12, 2).unwrap(),
        ];
        assert_eq!(got, want, "chunks of a gappy partition");
    }

    #[test]
    fn a_record_stamped_far_ahead_forms_a_chunk_of_its_own() {
        // 2100-01-01, then records of the present, 1 s buckets: they must
        // not join the future record's chunk, which would stay open (and
        // unarchived) until the clock reached its bucket (issue 30, case 10).
        let future = 4_102_444_800_000;
        let now = 1_800_000_000_000;
        let positions: Vec<u64> = (0..200).collect();
        let times: Vec<i64> = std::iter::once(future)
            .chain((1..200).map(|i| now + i))
            .collect();
        for splits in [&[200][..], &[1], &[7, 3]] {
            assert_eq!(
                chunks(&positions, &times, splits, 1_000, 1_000),
                vec![
                    ChunkRange::new(0, 0, 1, 1).unwrap(),
                    ChunkRange::new(0, 1, 200, 199).unwrap(),
                ],
                "the future record alone, then the present ones (reads split as {splits:?})"
            );
        }
        // Out of order by less than a minute (producers' clocks differ):
        // one chunk per bucket as ever, the earlier records joining.
        let times = [5_500, 5_900, 4_200, 5_100, 6_000, 1_000];
        assert_eq!(
            chunks(&[0, 1, 2, 3, 4, 5], &times, &[6], 1_000, 1_000),
            vec![
                ChunkRange::new(0, 0, 4, 4).unwrap(),
                ChunkRange::new(0, 4, 6, 2).unwrap(),
            ],
            "records up to a minute earlier than their chunk's bucket join it"
        );
    }

    proptest! {
        /// Any node consuming a partition cuts the same chunks, however its
        /// reads happen to split the records (times that wander, and some
        /// that jump hours ahead or back).
        #[test]
        fn chunk_boundaries_depend_only_on_the_records(
            gaps in prop::collection::vec(1u64..4, 1..200),
            steps in prop::collection::vec(
                prop_oneof![8 => -300i64..700, 1 => -10_000_000i64..10_000_000],
                1..200,
            ),
            splits_a in prop::collection::vec(1usize..40, 1..10),
            splits_b in prop::collection::vec(1usize..40, 1..10),
            size in 1u64..30,
        ) {
            let n = gaps.len().min(steps.len());
            let positions: Vec<u64> = gaps[..n].iter().scan(0, |p, g| { *p += g; Some(*p) }).collect();
            let times: Vec<i64> = steps[..n].iter().scan(0, |t, s| { *t += s; Some(*t) }).collect();
            let a = chunks(&positions, &times, &splits_a, size, 1_000);
            let b = chunks(&positions, &times, &splits_b, size, 1_000);
            prop_assert_eq!(&a, &b, "reads split as {:?} and {:?} cut differently", splits_a, splits_b);
            let total: u64 = a.iter().map(|c| c.events()).sum();
            prop_assert_eq!(total, n as u64, "every record is in one chunk");
            for w in a.windows(2) {
                prop_assert!(w[0].precedes(&w[1]), "contiguous: {} then {}", w[0], w[1]);
            }
        }
    }
}
