//! The archiver: cuts each log partition into chunks and commits them to the
//! master dataset.
//!
//! ```text
//!  log p:  |── committed (H[p]) ──|── open chunk ──────────▶ log end
//!                                 start        closes at chunk_events events,
//!                                              or chunk_age after it opened
//! ```
//!
//! [`Chunker`] decides where chunks end; it is separate from the loop so the
//! speed layer can own the same decisions (its realtime states are kept per
//! chunk, and both sides must agree on every boundary).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{CommitOutcome, MasterDataset, MasterError};
use crate::stream::{Log, LogBatch, LogError};

/// Where chunks close, per partition.
#[derive(Debug, Clone)]
pub struct Chunker {
    chunk_events: u64,
    chunk_age: Duration,
    parts: Vec<Open>,
}

#[derive(Debug, Clone, Copy)]
struct Open {
    /// Start of the open chunk (the committed end).
    start: u64,
    /// When the open chunk first held an event.
    since: Option<Instant>,
}

impl Chunker {
    /// Chunks start at the committed coverage `h`.
    pub fn new(h: &[u64], chunk_events: u64, chunk_age: Duration) -> Chunker {
        Chunker {
            chunk_events: chunk_events.max(1),
            chunk_age,
            parts: h.iter().map(|&start| Open { start, since: None }).collect(),
        }
    }

    pub fn start(&self, p: u32) -> u64 {
        self.parts[p as usize].start
    }

    /// The chunk of partition `p` to close now, given the durable log end:
    /// a full chunk, or what has waited `chunk_age`.
    pub fn due(&mut self, p: u32, log_end: u64, now: Instant) -> Option<(u64, u64)> {
        let o = &mut self.parts[p as usize];
        if log_end <= o.start {
            o.since = None;
            return None;
        }
        let since = *o.since.get_or_insert(now);
        let waiting = log_end - o.start;
        if waiting >= self.chunk_events {
            return Some((o.start, o.start + self.chunk_events));
        }
        if now.duration_since(since) >= self.chunk_age {
            return Some((o.start, log_end));
        }
        None
    }

    /// Records that `[start, end)` of `p` is committed.
    pub fn committed(&mut self, p: u32, end: u64) {
        let o = &mut self.parts[p as usize];
        o.start = end;
        o.since = None;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Master(#[from] MasterError),
}

/// Reads exactly `[start, end)` of partition `p` from the log.
pub fn read_range(log: &Log, p: u32, start: u64, end: u64) -> Result<Vec<LogBatch>, LogError> {
    let mut out = Vec::new();
    let mut next = start;
    while next < end {
        for mut b in log.read(p, next, (end - next) as usize)? {
            let rows = b.batch.num_rows() as u64;
            if b.first_offset + rows > end {
                let keep = (end - b.first_offset) as usize;
                b.batch = b.batch.slice(0, keep);
            }
            next = b.first_offset + b.batch.num_rows() as u64;
            out.push(b);
            if next >= end {
                break;
            }
        }
    }
    Ok(out)
}

/// Commits every chunk that is due; returns how many events were archived.
pub async fn archive_due(
    master: &MasterDataset,
    log: &Log,
    chunker: &mut Chunker,
) -> Result<u64, ArchiveError> {
    let mut archived = 0;
    for p in 0..log.partitions() {
        loop {
            let end = log.end_offset(p)?;
            let Some((start, stop)) = chunker.due(p, end, Instant::now()) else {
                break;
            };
            let batches = read_range(log, p, start, stop)?;
            match master.commit_chunk(p, start, batches).await? {
                CommitOutcome::Committed { version } => {
                    tracing::debug!(
                        partition = p,
                        start,
                        end = stop,
                        version,
                        "archived a chunk"
                    );
                    archived += stop - start;
                }
                CommitOutcome::AlreadyCommitted => {
                    tracing::info!(
                        partition = p,
                        start,
                        end = stop,
                        "chunk was already archived"
                    );
                }
            }
            chunker.committed(p, stop);
        }
    }
    Ok(archived)
}

/// The archiver loop: until `stop` turns true, commits chunks as they fall due.
pub async fn run(
    master: Arc<MasterDataset>,
    log: Arc<Log>,
    chunk_events: u64,
    chunk_age: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut chunker = Chunker::new(&master.coverage().h, chunk_events, chunk_age);
    let tick = (chunk_age / 4).clamp(Duration::from_millis(5), Duration::from_millis(200));
    let mut backoff = Duration::from_millis(100);
    loop {
        match archive_due(&master, &log, &mut chunker).await {
            Ok(_) => backoff = Duration::from_millis(100),
            Err(e) => {
                // Nothing is lost: the log keeps the events until they are archived.
                tracing::error!(error = %e, retry_in = ?backoff, "archiving failed; will retry");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                // Re-read the coverage: a commit may have landed before the error.
                if let Ok(cov) = master.refresh().await {
                    chunker = Chunker::new(&cov.h, chunk_events, chunk_age);
                }
            }
        }
        if *stop.borrow() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_close_by_size_then_by_age() {
        let t0 = Instant::now();
        let mut c = Chunker::new(&[0, 10], 100, Duration::from_secs(10));
        assert_eq!(c.due(0, 0, t0), None, "nothing to archive");
        assert_eq!(
            c.due(0, 250, t0),
            Some((0, 100)),
            "a full chunk closes at once"
        );
        c.committed(0, 100);
        assert_eq!(c.due(0, 250, t0), Some((100, 200)));
        c.committed(0, 200);
        assert_eq!(c.due(0, 250, t0), None, "50 events, not old yet");
        assert_eq!(c.due(0, 260, t0 + Duration::from_secs(9)), None);
        assert_eq!(
            c.due(0, 260, t0 + Duration::from_secs(10)),
            Some((200, 260)),
            "the open chunk closes when it is chunk_age old"
        );
        assert_eq!(c.start(1), 10, "partitions start at their coverage");
    }
}
