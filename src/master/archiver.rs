//! The archiver: cuts each log partition into chunks and commits them to the
//! master dataset.
//!
//! ```text
//!  speed layer ──ClosedChunk{p, start, end}──▶ queue ──▶ read [start,end) from the log
//!                                                        ──▶ Parquet + Delta commit
//! ```
//!
//! The speed layer decides where chunks end (its realtime states are kept per
//! chunk, and both sides must agree on every boundary) and queues each closed
//! chunk here.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::{CommitOutcome, MasterDataset, MasterError};
use crate::stream::{Log, LogBatch, LogError};

/// A chunk the speed layer closed, to commit to the master dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClosedChunk {
    pub partition: u32,
    pub start: u64,
    pub end: u64,
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
        let read = log.read(p, next, (end - next) as usize)?;
        if read.is_empty() {
            // The log ends inside the range: asking again would spin forever.
            return Err(LogError::OutOfRange {
                partition: p,
                offset: end - 1,
                end: log.end_offset(p)?,
            });
        }
        for mut b in read {
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

/// Commits one closed chunk (idempotent: a chunk already in the table is skipped).
pub async fn archive_chunk(
    master: &MasterDataset,
    log: &Log,
    c: ClosedChunk,
) -> Result<CommitOutcome, ArchiveError> {
    let batches = read_range(log, c.partition, c.start, c.end)?;
    Ok(master.commit_chunk(c.partition, c.start, batches).await?)
}

/// The archive queue: commits each partition's closed chunks in the order
/// they closed, taking the partitions in turn (after a restart the speed
/// layer replays one partition's backlog before the next; first-come order
/// would starve the later partitions while the first is archived). Retries
/// with backoff — the log keeps the events until they are archived and
/// published, so a failure delays the batch layer but loses nothing.
pub async fn run_queue(
    master: Arc<MasterDataset>,
    log: Arc<Log>,
    mut chunks: mpsc::UnboundedReceiver<ClosedChunk>,
    health: Arc<crate::health::Health>,
    mut stop: watch::Receiver<bool>,
) {
    let mut pending: Vec<VecDeque<ClosedChunk>> = Vec::new();
    let mut turn = 0usize;
    let mut open = true;
    let queue = |pending: &mut Vec<VecDeque<ClosedChunk>>, c: ClosedChunk| {
        let p = c.partition as usize;
        if pending.len() <= p {
            pending.resize_with(p + 1, VecDeque::new);
        }
        pending[p].push_back(c);
    };
    loop {
        if *stop.borrow() {
            break; // what is left is re-closed from the log at the next start
        }
        if pending.iter().all(VecDeque::is_empty) {
            if !open {
                break;
            }
            tokio::select! {
                c = chunks.recv() => match c {
                    Some(c) => queue(&mut pending, c),
                    None => { open = false; continue; }
                },
                _ = stop.changed() => break,
            }
        }
        while let Ok(c) = chunks.try_recv() {
            queue(&mut pending, c);
        }
        let n = pending.len();
        let Some(p) = (0..n)
            .map(|i| (turn + i) % n)
            .find(|&p| !pending[p].is_empty())
        else {
            continue;
        };
        turn = p + 1;
        let c = pending[p].pop_front().expect("a chunk");
        let mut backoff = Duration::from_millis(100);
        let component = format!("archive/p{}", c.partition);
        loop {
            match archive_chunk(&master, &log, c).await {
                Ok(outcome) => {
                    health.clear(&component);
                    if let CommitOutcome::Committed { version } = outcome {
                        tracing::debug!(
                            partition = c.partition,
                            start = c.start,
                            end = c.end,
                            version,
                            "archived a chunk"
                        );
                    }
                    break;
                }
                Err(e) => {
                    health.report(&component, &e);
                    tracing::error!(partition = c.partition, start = c.start, end = c.end, error = %e, retry_in = ?backoff, "archiving a chunk failed; will retry");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    let _ = master.refresh().await;
                }
            }
        }
    }
}
