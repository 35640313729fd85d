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
use crate::chunk::{self, ChunkRange};
use crate::stream::source::{Source, SourceError, read_exact};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{0}")]
    Source(#[from] SourceError),
    #[error("{0}")]
    Master(#[from] MasterError),
}

/// Commits one closed chunk (idempotent: a chunk already in the table is skipped).
pub async fn archive_chunk(
    master: &MasterDataset,
    source: &dyn Source,
    c: ChunkRange,
    duplicates: Option<&crate::keys::Duplicates>,
) -> Result<CommitOutcome, ArchiveError> {
    archive_chunks(
        master,
        source,
        &[Commit {
            range: c,
            count_from_read: false,
        }],
        duplicates,
    )
    .await
}

/// The archive queue: commits the partitions' closed chunks in the order
/// each partition closed them — one merged run of contiguous chunks per
/// partition (up to `max_events`), several partitions in one Delta commit —
/// while this node holds the driver lease (`driving`). Retries with backoff:
/// the stream keeps the events until they are archived and published, so a
/// failure delays the batch layer but loses nothing.
///
/// A node that does not drive keeps its closed chunks queued and drops those
/// the driver has committed (it re-reads the table's coverage), so when it
/// takes the lease over it commits exactly what the old driver had not.
#[allow(clippy::too_many_arguments)]
pub async fn run_queue(
    master: Arc<MasterDataset>,
    source: Arc<dyn Source>,
    mut chunks: mpsc::UnboundedReceiver<ChunkRange>,
    max_events: u64,
    health: Arc<crate::health::Health>,
    duplicates: Option<Arc<crate::keys::Duplicates>>,
    mut driving: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut pending: Vec<VecDeque<ChunkRange>> = Vec::new();
    let mut open = true;
    let mut backoff = Duration::from_millis(100);
    let queue = |pending: &mut Vec<VecDeque<ChunkRange>>, c: ChunkRange| {
        let p = c.partition() as usize;
        if pending.len() <= p {
            pending.resize_with(p + 1, VecDeque::new);
        }
        pending[p].push_back(c);
    };
    loop {
        if *stop.borrow() {
            break; // what is left is re-closed from the stream at the next start
        }
        let idle = pending.iter().all(VecDeque::is_empty);
        if idle && !open {
            break;
        }
        let held = *driving.borrow();
        if idle || !held {
            // Wait for a chunk, a change of role, or (not driving) the
            // moment to look at what the driver committed.
            tokio::select! {
                c = chunks.recv(), if open => match c {
                    Some(c) => queue(&mut pending, c),
                    None => open = false,
                },
                _ = driving.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(2)), if !held && !idle => {
                    if let Ok(cov) = master.refresh().await {
                        chunk::drop_committed(&mut pending, &cov.h);
                    }
                }
                _ = stop.changed() => break,
            }
            continue;
        }
        while let Ok(c) = chunks.try_recv() {
            queue(&mut pending, c);
        }
        // Each partition's head, merged with the contiguous chunks behind
        // it: the master's boundaries are then a subset of the speed layer's,
        // which keeps the handoff exact (H is still a boundary of every
        // realtime chunk list), and a backlog costs fewer commits and files.
        let coverage = master.coverage().h;
        chunk::drop_committed(&mut pending, &coverage);
        let round: Vec<Commit> = pending
            .iter()
            .filter_map(|q| {
                let mut it = q.iter();
                let mut c = *it.next()?;
                // A chunk across the coverage (the chunks before it were cut
                // by another driver) is committed from the coverage on, with
                // as many events as its range holds there.
                let covered = coverage.get(c.partition());
                if c.start() < covered {
                    let rest =
                        ChunkRange::new(c.partition(), covered, c.end(), 0).expect("a range");
                    return Some(Commit {
                        range: rest,
                        count_from_read: true,
                    });
                }
                for next in it {
                    if !(c.precedes(next) && c.events() + next.events() <= max_events) {
                        break;
                    }
                    c = ChunkRange::new(
                        c.partition(),
                        c.start(),
                        next.end(),
                        c.events() + next.events(),
                    )
                    .expect("contiguous ranges");
                }
                Some(Commit {
                    range: c,
                    count_from_read: false,
                })
            })
            .collect();
        match archive_chunks(&master, source.as_ref(), &round, duplicates.as_deref()).await {
            Ok(outcome) => {
                health.clear("archive");
                backoff = Duration::from_millis(100);
                if let CommitOutcome::Committed { version } = outcome {
                    tracing::debug!(chunks = ?round, version, "archived");
                }
                for Commit { range: c, .. } in &round {
                    let q = &mut pending[c.partition() as usize];
                    while q.front().is_some_and(|f| f.end() <= c.end()) {
                        q.pop_front();
                    }
                }
            }
            Err(e) => {
                if *driving.borrow() {
                    health.report_error("archive", &e);
                } else {
                    // Lost the lease while committing: the new driver archives.
                    health.handed_over("archive", "another node drives now");
                }
                tracing::error!(chunks = ?round, error = %crate::error::chain(&e), retry_in = ?backoff, "archiving failed; will retry");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                // Another driver may have committed some (a failover's overlap).
                let _ = master.refresh().await;
            }
        }
    }
}

/// A range to commit, and whether its event count is what reading it finds
/// (the part above the coverage of a chunk another driver cut elsewhere).
#[derive(Debug, Clone, Copy)]
pub struct Commit {
    pub range: ChunkRange,
    pub count_from_read: bool,
}

/// Reads chunks (one per partition) back from the stream and commits them
/// in one Delta commit, with the duplicates the speed layer found in them.
pub async fn archive_chunks(
    master: &MasterDataset,
    source: &dyn Source,
    chunks: &[Commit],
    duplicates: Option<&crate::keys::Duplicates>,
) -> Result<CommitOutcome, ArchiveError> {
    let mut data = Vec::with_capacity(chunks.len());
    for &Commit {
        range: c,
        count_from_read,
    } in chunks
    {
        let batches = read_exact(source, c.partition(), c.start(), c.end()).await?;
        let range = if count_from_read {
            let n = batches.iter().map(|b| b.rows() as u64).sum();
            ChunkRange::new(c.partition(), c.start(), c.end(), n).expect("a read range")
        } else {
            c
        };
        data.push(super::ChunkData {
            range,
            duplicates: duplicates
                .map(|d| d.within(c.partition(), c.start(), c.end()))
                .unwrap_or_default(),
            batches,
            resume: source.resume_token(c.partition(), c.end()),
        });
    }
    // The stream releases records at publishes (the speed layer tells
    // it), not at commits: a view built meanwhile still reads them.
    master.commit_chunks(data).await.map_err(Into::into)
}
