//! The cluster's wing: who drives, and what the driver does.
//!
//! ```text
//!  nodes on one storage root ── lease.json (term, holder, acked marks) ── one driver
//!        │                                                                   │
//!        └─ followers: serve reads, forward nothing, watch CURRENT      archive · batch loop
//!                                                                           · retention · repair
//! ```
//!
//! [`lease`] is the driver lease (compare-and-swap on the storage root,
//! fencing of acknowledgements and commits); [`driver`] is what its holder
//! runs: startup checks, the archive and batch loops, retention and repair.
//! The driver hands new views to the rest of the node as a
//! [`crate::serving::Adopt`] message; `node.rs` wires it to the speed layer,
//! so the driver never names the speed layer.

pub mod driver;
pub mod identity;
pub mod lease;
use std::sync::Arc;

use crate::batch::{BatchError, BatchLayer};
use crate::clock::SharedClock;
use crate::config::{Config, ConfigError};
use crate::health::Health;
use crate::master::MasterDataset;
use crate::storage::StorageError;
use crate::stream::Log;
use lease::Lease;

/// Why this node could not take its place in the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("another node ({node}) holds the driver lease of {root}")]
    LeaseHeld { root: String, node: String },
    #[error("this node does not take the driver lease of {root}: {why}")]
    LeaseRefused { root: String, why: String },
    #[error("could not read or create this node's log identity {}", path.display())]
    NodeId {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Lease(#[from] lease::LeaseError),
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Batch(#[from] BatchError),
    #[error("{0}")]
    Engine(#[from] crate::batch::EngineError),
}

crate::explained!(ClusterError);

impl crate::error::Explain for ClusterError {
    fn hint(&self) -> Option<String> {
        match self {
            ClusterError::LeaseRefused { .. } => Some("start this node again once the other node's events are archived (`lambdaflow status` on it)".into()),
            ClusterError::LeaseHeld { .. } => Some("a node on the embedded log must drive; stop the other node, or use Kafka or Kinesis as the stream to run several nodes on one root".into()),
            _ => None,
        }
    }
}

/// A node that does not drive serves the published run's views, whatever
/// its own config and the saved changes say (a change being built on the
/// driver is not published yet; a follower cannot build it): it adopts the
/// driver's next publish of them ([`driver::published_views`]).
pub async fn follow_published_views(
    batch: &BatchLayer,
    health: &Health,
) -> Result<(), ClusterError> {
    let m = match batch.current().await {
        Ok(Some(m)) => m,
        // No run yet, or an unusable one: `prepare` says so.
        _ => return Ok(()),
    };
    let schema = batch.master().events_schema().clone();
    match driver::published_views(&m, &batch.views(), &schema).await {
        Ok(None) => {}
        Ok(Some(views)) => {
            let names: Vec<&str> = views.iter().map(|v| v.name()).collect();
            tracing::info!(run = m.run, views = ?names, "serving the published run's views (they differ from this node's config and saved changes)");
            batch.set_views(views)?;
        }
        Err(e) => {
            tracing::warn!(error = %crate::error::chain(&e), "the published run's views cannot be served as published; serving this node's own");
            health.report_error("follow", &e);
        }
    }
    Ok(())
}

/// The driver lease of the node's root: always held on a local root; on a
/// shared one, taken now if free. A node on the embedded log must drive
/// (its log is the only copy of its events until archived), so it waits for
/// a lease another process holds to expire, and refuses to start if it does not.
pub async fn take_lease(
    config: &Config,
    clock: &SharedClock,
    master: &Arc<MasterDataset>,
    log: &Arc<Log>,
) -> Result<Arc<Lease>, ClusterError> {
    if !config.data_is_remote() {
        return Ok(Lease::local(clock.clone()));
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "node".into());
    let lease = Lease::shared(
        config.storage()?,
        format!("{host}:{}", config.listen.port()),
        config.batch.lease,
        clock.clone(),
    );
    let embedded = if config.stream.external() {
        None
    } else {
        let dir = config.local_dir();
        let id = node_id(&dir).map_err(|source| ClusterError::NodeId {
            path: dir.join("node-id"),
            source,
        })?;
        Some((log.clone(), id))
    };
    lease.attach(master.clone(), embedded);
    // A taker waits until it has seen the record unchanged for the lease
    // and its margin (see `cluster::lease`), polling every third of it.
    let deadline = std::time::Instant::now() + config.batch.lease * 2;
    loop {
        if lease.try_acquire().await? || config.stream.external() {
            return Ok(lease);
        }
        let s = lease.status();
        if let Some(why) = s.refused {
            return Err(ClusterError::LeaseRefused {
                root: config.data.display().to_string(),
                why,
            });
        }
        if std::time::Instant::now() >= deadline {
            return Err(ClusterError::LeaseHeld {
                root: config.data.display().to_string(),
                node: s.node.unwrap_or_default(),
            });
        }
        tracing::info!("waiting for the driver lease: with the embedded log, this node must drive");
        tokio::time::sleep(config.batch.lease / 3).await;
    }
}

/// The identity of this node's embedded log: a random name kept in
/// `node-id` in its local directory, so a node restarted on its directory
/// is known as the one whose log holds the events its lease record names.
fn node_id(dir: &std::path::Path) -> std::io::Result<String> {
    let path = dir.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(dir)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let id = format!(
        "{:016x}-{}",
        crc32c::crc32c(format!("{nanos}{}", dir.display()).as_bytes()) as u128 ^ nanos,
        crate::storage::writer_id()
    );
    let tmp = dir.join("node-id.tmp");
    std::fs::write(&tmp, &id)?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all())?;
    std::fs::rename(&tmp, &path)?;
    Ok(id)
}
