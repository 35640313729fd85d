//! The driver lease: which node of a cluster archives and runs the batch
//! layer. One object on the storage root, taken and renewed by compare-and-
//! swap on its version (S3's If-Match / If-None-Match), with an expiry.
//!
//! ```text
//!  every node, every lease/3:   read driver/lease.json (record, ETag)
//!    mine, or expired  ──▶ replace If-Match ETag {holder: me, expires: now+lease}
//!                              Done ─▶ held      Lost ─▶ another node was first
//!    another's, live   ──▶ not held (serve, follow its publishes)
//!  the holder stops acting a margin before its own expiry if it cannot renew
//! ```
//!
//! Two nodes may both act for a moment at a failover (clocks, a paused
//! process): that is harmless by construction — Delta commits are idempotent
//! per partition and conflict on the same partition, publishes are compare-
//! and-swap — so the lease is for efficiency, not for safety.
//!
//! A local root has one machine and no ETags: its lease is always held, and
//! the batch lock file serializes the processes on it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::clock::SharedClock;
use crate::storage::{Storage, StorageError, Swap, Version};

/// Where the lease lives under the root.
pub const LEASE: &str = "driver/lease.json";

/// Why this node could not read or renew the lease.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(
        "the driver lease {path} was not read and renewed within {} (a third of the lease): the store is slow to answer or keeps failing",
        humantime::format_duration(*waited)
    )]
    Unanswered { path: String, waited: Duration },
}

/// What the lease object holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseRecord {
    /// The holding process (its writer id).
    pub holder: String,
    /// Where it serves, for people reading `status`.
    pub node: String,
    /// Incremented at each change of holder.
    pub term: u64,
    /// Until when it holds (ms since the epoch), unless renewed.
    pub expires_ms: i64,
}

/// The lease as this node sees it, for `status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseStatus {
    /// `local` (a local root: always this node) or `lease`.
    pub kind: String,
    pub holder: Option<String>,
    pub node: Option<String>,
    pub term: u64,
    pub expires_ms: Option<i64>,
    /// Whether this node holds it.
    pub held: bool,
}

#[derive(Debug, Default)]
struct Seen {
    record: Option<LeaseRecord>,
    version: Option<Version>,
}

/// This node's side of the driver lease.
pub struct Lease {
    storage: Option<Storage>,
    me: String,
    node: String,
    ttl: Duration,
    clock: SharedClock,
    held: watch::Sender<bool>,
    seen: Mutex<Seen>,
}

impl Lease {
    /// The lease of a local root: always held by this process.
    pub fn local(clock: SharedClock) -> Arc<Lease> {
        let (held, _) = watch::channel(true);
        Arc::new(Lease {
            storage: None,
            me: crate::storage::writer_id().to_string(),
            node: String::new(),
            ttl: Duration::MAX,
            clock,
            held,
            seen: Mutex::default(),
        })
    }

    /// The lease on a shared root; `node` names this node in `status`.
    pub fn shared(storage: Storage, node: String, ttl: Duration, clock: SharedClock) -> Arc<Lease> {
        let (held, _) = watch::channel(false);
        Arc::new(Lease {
            storage: Some(storage),
            me: crate::storage::writer_id().to_string(),
            node,
            ttl,
            clock,
            held,
            seen: Mutex::default(),
        })
    }

    /// Whether this node may drive now.
    pub fn is_held(&self) -> bool {
        *self.held.borrow()
    }

    /// Changes of [`Lease::is_held`].
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.held.subscribe()
    }

    pub fn status(&self) -> LeaseStatus {
        let seen = self.seen.lock().expect("lease lock");
        let r = seen.record.as_ref();
        LeaseStatus {
            kind: if self.storage.is_some() {
                "lease"
            } else {
                "local"
            }
            .into(),
            holder: r.map(|r| r.holder.clone()),
            node: r.map(|r| r.node.clone()),
            term: r.map_or(0, |r| r.term),
            expires_ms: r.map(|r| r.expires_ms),
            held: self.is_held(),
        }
    }

    /// Takes the lease if it is free or expired, renews it if it is ours.
    /// `Ok(true)` when this node holds it afterwards.
    pub async fn try_acquire(&self) -> Result<bool, StorageError> {
        let Some(storage) = &self.storage else {
            return Ok(true);
        };
        let (bytes, version) = storage.get_versioned(LEASE).await?;
        // An unreadable record (a torn copy restored by hand) is replaced.
        let current: Option<LeaseRecord> = bytes.and_then(|b| serde_json::from_slice(&b).ok());
        let now = self.clock.unix_ms();
        let mine = current.as_ref().is_some_and(|r| r.holder == self.me);
        let free = current.as_ref().is_none_or(|r| r.expires_ms <= now);
        if !mine && !free {
            self.set_seen(current, Some(version), false);
            return Ok(false);
        }
        let term = match &current {
            Some(r) if mine => r.term,
            Some(r) => r.term + 1,
            None => 1,
        };
        let next = LeaseRecord {
            holder: self.me.clone(),
            node: self.node.clone(),
            term,
            expires_ms: now + self.ttl.as_millis() as i64,
        };
        let json = serde_json::to_vec(&next).expect("a lease serializes");
        match storage.replace(LEASE, Bytes::from(json), &version).await? {
            Swap::Done => {
                if !mine {
                    tracing::info!(term, node = %self.node, "took the driver lease");
                }
                self.set_seen(Some(next), None, true);
                Ok(true)
            }
            Swap::Lost => {
                self.set_seen(current, None, false);
                Ok(false)
            }
        }
    }

    /// Gives the lease up (at shutdown), so another node takes over at once.
    pub async fn release(&self) {
        let Some(storage) = &self.storage else { return };
        if !self.is_held() {
            return;
        }
        self.held.send_replace(false);
        let Ok((Some(bytes), version)) = storage.get_versioned(LEASE).await else {
            return;
        };
        let Ok(mut r) = serde_json::from_slice::<LeaseRecord>(&bytes) else {
            return;
        };
        if r.holder != self.me {
            return;
        }
        r.expires_ms = 0;
        let json = serde_json::to_vec(&r).expect("a lease serializes");
        let _ = storage.replace(LEASE, Bytes::from(json), &version).await;
    }

    fn set_seen(&self, record: Option<LeaseRecord>, version: Option<Version>, held: bool) {
        let mut seen = self.seen.lock().expect("lease lock");
        seen.record = record;
        seen.version = version;
        drop(seen);
        self.held
            .send_if_modified(|h| std::mem::replace(h, held) != held);
    }

    /// Keeps trying to take the lease, and renewing it while held, until
    /// `stop`. A holder that cannot renew stops acting a third of a lease
    /// before its record expires, so two holders overlap only by clock skew.
    pub async fn run(
        self: Arc<Self>,
        health: Arc<crate::health::Health>,
        mut stop: watch::Receiver<bool>,
    ) {
        if self.storage.is_none() {
            return;
        }
        let every = self.ttl / 3;
        let mut renewed_at = self.clock.elapsed();
        loop {
            // A renewal is bounded by the time between two: a store that
            // does not answer must not keep the holder acting past the
            // record's expiry, which counts from before the request.
            let started = self.clock.elapsed();
            let attempt = match tokio::time::timeout(every, self.try_acquire()).await {
                Ok(r) => r.map_err(LeaseError::from),
                Err(_) => Err(LeaseError::Unanswered {
                    path: storage_path(&self.storage),
                    waited: every,
                }),
            };
            match attempt {
                Ok(true) => {
                    renewed_at = started;
                    health.clear("lease");
                }
                Ok(false) => health.clear("lease"),
                Err(e) => {
                    health.report_error("lease", &e);
                    tracing::warn!(error = %crate::error::chain(&e), "could not read or renew the driver lease");
                    if self.is_held() && self.clock.elapsed() - renewed_at >= self.ttl - every {
                        tracing::warn!(
                            "stepping down as the driver: the lease could not be renewed"
                        );
                        self.held.send_replace(false);
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => break,
            }
        }
        self.release().await;
    }
}

/// Where the lease lives, for messages.
fn storage_path(storage: &Option<Storage>) -> String {
    storage
        .as_ref()
        .map_or_else(|| LEASE.to_string(), |s| s.path(LEASE).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    /// Racing nodes on one store: at any moment at most one believes it
    /// holds the lease, and after the holder stops renewing, another takes
    /// it once it expires (and not before).
    #[tokio::test]
    async fn one_holder_at_a_time_and_a_takeover_after_expiry() {
        let storage = Storage::memory();
        let manual = ManualClock::new(1_800_000_000_000);
        let clock: SharedClock = manual.clone();
        let ttl = Duration::from_secs(10);
        let nodes: Vec<_> = (0..4)
            .map(|i| {
                let mut l = Lease::shared(storage.clone(), format!("node{i}"), ttl, clock.clone());
                // Each node is its own process: its own writer id.
                Arc::get_mut(&mut l).unwrap().me = format!("w{i}");
                l
            })
            .collect();
        for _ in 0..5 {
            let got = futures::future::join_all(nodes.iter().map(|n| n.try_acquire())).await;
            let holders = got.iter().filter(|r| *r.as_ref().unwrap()).count();
            assert_eq!(
                holders, 1,
                "exactly one of four racing nodes holds the lease: {got:?}"
            );
        }
        let holder = nodes.iter().position(|n| n.is_held()).unwrap();
        let others: Vec<_> = (0..4).filter(|&i| i != holder).collect();
        manual.advance(Duration::from_secs(9));
        for &i in &others {
            assert!(
                !nodes[i].try_acquire().await.unwrap(),
                "the lease is live for 10 s: node {i} must not take it"
            );
        }
        manual.advance(Duration::from_secs(2));
        let took = nodes[others[0]].try_acquire().await.unwrap();
        assert!(took, "an expired lease is taken");
        assert_eq!(
            nodes[others[0]].status().term,
            2,
            "a new holder starts a new term"
        );
        assert!(
            !nodes[holder].try_acquire().await.unwrap(),
            "the old holder finds the lease taken and does not get it back"
        );
        assert!(!nodes[holder].is_held());
    }
}
