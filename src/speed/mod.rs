//! The speed layer: the paper's Spark Streaming job. It consumes each log
//! partition in micro-batches, runs every view's states plan on them (the same
//! plan as the batch layer), and keeps the states **per chunk** — the chunks
//! the master dataset is cut into, because this loop is what cuts them:
//!
//! ```text
//!  log p:  ···|── chunk [s1,e1) closed ──|── chunk [e1, …) open ──▶ R[p] (consumed)
//!              └─▶ archive queue ─▶ master dataset commit (Txn version = e1)
//!  every micro-batch: states ⊕ into the open chunk; snapshot swapped into serving
//! ```
//!
//! A chunk closes at `chunk_events` events or `chunk_age` after it opened.
//! On restart the loop replays the log from the published batch coverage H,
//! reproducing the boundaries of chunks already committed after H (read from
//! the master dataset), so batch and realtime always meet at a chunk boundary.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use tokio::sync::{mpsc, watch};

use crate::clock::{SharedClock, SystemClock};
use crate::health::Health;
use crate::master::archiver::{ClosedChunk, read_range};
use crate::metrics::Histogram;
use crate::serving::{RealtimeChunk, Serving};
use crate::stream::ingest::Backlog;
use crate::stream::{Log, LogError};
use crate::view::failures::{FailedRow, ViewFailures};
use crate::view::{View, ViewError};

/// A micro-batch reads at most this many events (bounds memory during replays).
const MAX_MICRO_EVENTS: u64 = 1 << 20;
/// A chunk's states for one view are compacted when this many batches pile up.
const COMPACT_AT: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SpeedError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    View(#[from] ViewError),
}

/// Counters for status and metrics.
#[derive(Debug, Default)]
pub struct SpeedMetrics {
    pub events: AtomicU64,
    pub chunks_closed: AtomicU64,
    /// Micro-batch durations (one observation per partition micro-batch).
    pub micro: Histogram,
}

impl SpeedMetrics {
    fn observe(&self, took: Duration, events: u64) {
        self.events.fetch_add(events, Ordering::Relaxed);
        self.micro.observe(took);
    }
}

struct Part {
    next: u64,
    chunks: Vec<Arc<RealtimeChunk>>,
    /// When the open chunk got its first event (on the layer's clock).
    open_since: Option<Duration>,
    /// Boundaries of chunks already committed ahead of `next` (replay).
    replay: VecDeque<(u64, u64)>,
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

/// The speed layer of a node.
pub struct SpeedLayer {
    log: Arc<Log>,
    views: Vec<Arc<View>>,
    serving: Arc<Serving>,
    archive: mpsc::UnboundedSender<ClosedChunk>,
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
    /// When chunks close by age.
    pub clock: SharedClock,
}

impl SpeedLayer {
    /// Starts at coverage `h`; `committed[p]` are the committed chunks of p at or after h[p].
    pub fn new(
        log: Arc<Log>,
        serving: Arc<Serving>,
        archive: mpsc::UnboundedSender<ClosedChunk>,
        options: SpeedOptions,
        h: &[u64],
        committed: Vec<Vec<(u64, u64)>>,
    ) -> SpeedLayer {
        let views = serving.views().to_vec();
        let SpeedOptions {
            interval,
            chunk_events,
            chunk_age,
        } = options;
        let parts = h
            .iter()
            .zip(committed)
            .map(|(&next, mut c)| {
                c.sort_unstable();
                c.retain(|&(s, _)| s >= next);
                Part {
                    next,
                    chunks: Vec::new(),
                    open_since: None,
                    replay: c.into(),
                }
            })
            .collect();
        SpeedLayer {
            log,
            views,
            serving,
            archive,
            interval,
            chunk_events: chunk_events.max(1),
            chunk_age,
            parts,
            metrics: Arc::new(SpeedMetrics::default()),
            health: Arc::new(Health::default()),
            failures: Arc::new(ViewFailures::new(std::env::temp_dir())),
            backlog: Arc::new(Backlog::default()),
            clock: SystemClock::shared(),
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
        let h = self.serving.snapshot().h();
        let mut moved = false;
        let mut changed = Vec::new();
        for (p, &hp) in h.iter().enumerate().take(self.parts.len()) {
            let before = self.parts[p].next;
            let component = format!("speed/p{p}");
            let aged = match self.advance(p, hp).await {
                Ok(aged) => {
                    self.health.clear(&component);
                    aged
                }
                Err(e) => {
                    let n = self.health.report(&component, &e);
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
                changed.push((p as u32, part.chunks.clone(), part.next));
            }
        }
        if !changed.is_empty() {
            crate::failpoint::hit("speed-micro-batch");
            self.serving.set_realtime(changed);
        }
        self.measure_window(&h);
        Ok(moved)
    }

    /// Measures the realtime window — events in the log above the published
    /// H, and the memory of the realtime states — for ingest's bound, and
    /// reports when it is over (the batch layer is not keeping up).
    fn measure_window(&self, h: &[u64]) {
        let events: u64 = (0..self.parts.len())
            .map(|p| {
                let end = self.log.end_offset(p as u32).unwrap_or(0);
                end.saturating_sub(h.get(p).copied().unwrap_or(0))
            })
            .sum();
        let memory: u64 = self
            .parts
            .iter()
            .flat_map(|part| part.chunks.iter())
            .flat_map(|c| c.states.iter().flatten())
            .map(|b| b.get_array_memory_size() as u64)
            .sum();
        self.backlog.measure(events, memory);
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
    /// true if the open chunk was closed by age.
    async fn advance(&mut self, p: usize, hp: u64) -> Result<bool, SpeedError> {
        let end = self.log.end_offset(p as u32)?;
        let part = &mut self.parts[p];
        // Chunks the installed batch run covers are no longer needed.
        part.chunks.retain(|c| c.end > hp);
        while part.next < end {
            let t = Instant::now();
            let (start, limit) =
                Self::open_chunk(part, p as u32, self.chunk_events, self.views.len());
            let mut upto = end.min(limit).min(part.next + MAX_MICRO_EVENTS);
            let read = match read_range(&self.log, p as u32, part.next, upto) {
                // Damage ahead: serve what precedes it; the next read stops at it
                // again and reports it (never skipping past).
                Err(LogError::Corrupt { first_offset, .. })
                    if first_offset > part.next && first_offset < upto =>
                {
                    upto = first_offset;
                    read_range(&self.log, p as u32, part.next, upto)?
                }
                r => r?,
            };
            let firsts: Vec<u64> = read.iter().map(|b| b.first_offset).collect();
            let batches: Vec<RecordBatch> = read.into_iter().map(|b| b.batch).collect();
            // Views with ordered aggregates also read each event's (partition, offset).
            let keyed: Vec<RecordBatch> = if self.views.iter().any(|v| v.needs_offsets()) {
                batches
                    .iter()
                    .zip(&firsts)
                    .map(|(b, &f)| crate::view::input::with_offsets(b, p as u32, f))
                    .collect::<Result<_, _>>()
                    .map_err(|e| SpeedError::View(ViewError::Internal(e.to_string())))?
            } else {
                Vec::new()
            };
            let open = part.chunks.last().expect("an open chunk").clone();
            let mut states = open.states.clone();
            // Batches only appended keep their point-read indexes; a compaction drops them.
            let mut indexes = open.indexes.clone();
            for (i, v) in self.views.iter().enumerate() {
                // A row the view fails on is left out of this view alone (the
                // batch layer leaves out the same rows); the partition goes on.
                let input = if v.needs_offsets() { &keyed } else { &batches };
                let (s, bad) = v.states_excluding(input.clone()).await?;
                if !bad.is_empty() {
                    let rows: Vec<FailedRow> = bad
                        .into_iter()
                        .map(|x| FailedRow {
                            view: v.name().to_string(),
                            partition: p as u32,
                            offset: firsts[x.batch] + x.row as u64,
                            error: x.error,
                        })
                        .collect();
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
                if states[i].len() >= COMPACT_AT {
                    let merged = v.merge(std::mem::take(&mut states[i])).await?;
                    states[i].push(merged);
                    indexes = Default::default();
                }
            }
            let closes = upto == limit;
            if closes {
                // A closed chunk no longer grows: one state batch per view reads fastest.
                states = compact(&self.views, states).await?;
                indexes = Default::default();
            }
            let chunk = Arc::new(RealtimeChunk {
                partition: p as u32,
                start,
                end: upto,
                closed: closes,
                states,
                indexes,
            });
            *part.chunks.last_mut().expect("open chunk") = chunk;
            self.metrics.observe(t.elapsed(), upto - part.next);
            part.next = upto;
            let now = self.clock.elapsed();
            part.open_since.get_or_insert(now);
            if closes {
                Self::close(part, p as u32, &self.archive, &self.metrics);
            }
        }
        // Age: an open chunk (not a replayed one) closes chunk_age after it opened.
        let replaying = part.replay.front().is_some();
        if let (Some(since), Some(last)) = (part.open_since, part.chunks.last())
            && !last.closed
            && !replaying
            && last.end > last.start
            && self.clock.elapsed().saturating_sub(since) >= self.chunk_age
        {
            let mut c = (**last).clone();
            c.closed = true;
            c.states = compact(&self.views, c.states).await?;
            c.indexes = Default::default();
            *part.chunks.last_mut().expect("open chunk") = Arc::new(c);
            Self::close(part, p as u32, &self.archive, &self.metrics);
            return Ok(true);
        }
        Ok(false)
    }

    /// Ensures the last chunk is open; returns its start and where it must end.
    fn open_chunk(part: &mut Part, p: u32, chunk_events: u64, views: usize) -> (u64, u64) {
        if part.chunks.last().is_none_or(|c| c.closed) {
            part.chunks.push(Arc::new(RealtimeChunk {
                partition: p,
                start: part.next,
                end: part.next,
                closed: false,
                states: vec![Vec::new(); views],
                indexes: Default::default(),
            }));
            part.open_since = None;
        }
        let start = part.chunks.last().expect("open chunk").start;
        // Replaying: the boundary is the committed chunk's.
        while part.replay.front().is_some_and(|&(s, _)| s < start) {
            part.replay.pop_front();
        }
        let limit = match part.replay.front() {
            Some(&(s, e)) if s == start => e,
            _ => start + chunk_events,
        };
        (start, limit)
    }

    fn close(
        part: &mut Part,
        p: u32,
        archive: &mpsc::UnboundedSender<ClosedChunk>,
        metrics: &SpeedMetrics,
    ) {
        let last = part.chunks.last().expect("closed chunk");
        let (start, end) = (last.start, last.end);
        part.open_since = None;
        metrics.chunks_closed.fetch_add(1, Ordering::Relaxed);
        if part.replay.front() == Some(&(start, end)) {
            // Committed before the restart: nothing to archive.
            part.replay.pop_front();
            return;
        }
        let _ = archive.send(ClosedChunk {
            partition: p,
            start,
            end,
        });
    }

    /// The loop: a micro-batch at most every `interval`, as soon as events arrive.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut subs: Vec<watch::Receiver<u64>> = (0..self.parts.len())
            .filter_map(|p| self.log.subscribe(p as u32).ok())
            .collect();
        let age_tick =
            (self.chunk_age / 4).clamp(Duration::from_millis(5), Duration::from_millis(250));
        loop {
            if *stop.borrow() {
                break;
            }
            let began = Instant::now();
            if let Err(e) = self.round().await {
                tracing::error!(error = %e, "speed layer round failed; retrying");
            }
            // Wait for new events (or a chunk to age), but not sooner than `interval`.
            let pending = (0..self.parts.len()).any(|p| {
                self.log
                    .end_offset(p as u32)
                    .is_ok_and(|e| e > self.parts[p].next)
            });
            if !pending {
                let changed =
                    futures::future::select_all(subs.iter_mut().map(|s| Box::pin(s.changed())));
                tokio::select! {
                    _ = changed => {}
                    _ = tokio::time::sleep(age_tick) => {}
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
