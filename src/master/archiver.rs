//! The archiver: commits each chunk the speed layer closes to the master
//! dataset, reading its events back from the stream.
//!
//! ```text
//!  speed layer ──ChunkRange{p, [start,end), events}──▶ queue ──▶ read [start,end) from the source
//!                                                               ──▶ Parquet + Delta commit
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
use crate::stream::source::{ChunkRange, Source, SourceError, read_exact};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Master(#[from] MasterError),
}

/// Commits one closed chunk (idempotent: a chunk already in the table is skipped).
pub async fn archive_chunk(
    master: &MasterDataset,
    source: &dyn Source,
    c: ChunkRange,
) -> Result<CommitOutcome, ArchiveError> {
    let batches = read_exact(source, c.partition, c.start, c.end).await?;
    let token = source.resume_token(c.partition, c.end);
    let outcome = master.commit_chunk(c, batches, token).await?;
    source.archived(c.partition, c.end);
    Ok(outcome)
}

/// The archive queue: commits each partition's closed chunks in the order
/// they closed (contiguous ones queued together as one, up to `max_events`), taking the partitions in turn (after a restart the speed
/// layer replays one partition's backlog before the next; first-come order
/// would starve the later partitions while the first is archived). Retries
/// with backoff — the log keeps the events until they are archived and
/// published, so a failure delays the batch layer but loses nothing.
pub async fn run_queue(
    master: Arc<MasterDataset>,
    source: Arc<dyn Source>,
    mut chunks: mpsc::UnboundedReceiver<ChunkRange>,
    max_events: u64,
    health: Arc<crate::health::Health>,
    mut stop: watch::Receiver<bool>,
) {
    let mut pending: Vec<VecDeque<ChunkRange>> = Vec::new();
    let mut turn = 0usize;
    let mut open = true;
    let queue = |pending: &mut Vec<VecDeque<ChunkRange>>, c: ChunkRange| {
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
        let mut c = pending[p].pop_front().expect("a chunk");
        // Behind: contiguous chunks of a partition go into one file and one
        // commit. The master's boundaries are then a subset of the speed
        // layer's, which keeps the handoff exact (H is still a boundary of
        // every realtime chunk list), and a backlog costs fewer commits and
        // fewer files rather than more.
        while let Some(next) = pending[p].front()
            && c.precedes(next)
            && c.events + next.events <= max_events
        {
            c = ChunkRange::new(c.partition, c.start, next.end, c.events + next.events)
                .expect("contiguous ranges");
            pending[p].pop_front();
        }
        let mut backoff = Duration::from_millis(100);
        let component = format!("archive/p{}", c.partition);
        loop {
            match archive_chunk(&master, source.as_ref(), c).await {
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
