//! The driver lease: which node of a cluster archives and runs the batch
//! layer — and, on the embedded log, which node may acknowledge events. One
//! object on the storage root, taken and renewed by compare-and-swap on its
//! version (S3's If-Match / If-None-Match).
//!
//! ```text
//!  every node, every lease/3:   read driver/lease.json (record, ETag)
//!    mine                ──▶ renew: replace If-Match {term, acked marks, expires}
//!    another's, changing ──▶ not held (serve, follow its publishes)
//!    another's, the same bytes for ttl + margin by this node's monotonic clock
//!    (or absent, or released)
//!        embedded log: marks beyond the archived coverage, of another log?
//!                        ──▶ refuse the takeover (only that log holds those events)
//!        otherwise     ──▶ replace If-Match {holder: me, term + 1}
//!  the holder is valid for ttl − margin after its last successful renewal
//!  *started*, by its own monotonic clock: a renewal that hangs extends nothing
//! ```
//!
//! For Kafka and Kinesis the lease only gates archiving and the batch layer:
//! an overlap of two drivers loses nothing (Delta's transaction check
//! rejects the second commit of a partition's chunk, publishes are compare-
//! and-swap), so it is for efficiency there. On the embedded log it is for
//! safety: each node's log is its own, and two nodes handing out the same
//! offsets would archive one's events and silently drop the other's. So, on
//! a shared root with the embedded log:
//!
//! - **Acks are fenced.** Before appending a request's events, the holder
//!   checks its validity and makes sure the record's `acked` marks (per
//!   partition, an upper bound of every offset its log holds) cover them,
//!   raising them by compare-and-swap if not ([`Lease::reserve`]). A node
//!   that is not a valid holder answers 503 and stores nothing.
//! - **Takeover waits out the worst case.** A record must be seen unchanged
//!   for ttl + margin on the taker's own monotonic clock; the old holder
//!   stopped acknowledging ttl − margin after its last renewal started, and
//!   that renewal started before the taker could first see its result. An
//!   unreadable record is treated as held by an unknown holder the same way.
//!   No wall clocks of two machines are compared.
//! - **Acknowledged events are never given up.** A taker whose log is not
//!   the record's refuses the lease while the record's marks are beyond
//!   the master dataset's coverage: those offsets hold events only the old
//!   holder's log has. The old holder, once back, renews (the record is
//!   still its own) and archives them; if it is gone for good, an operator
//!   decides (the refusal says how). A taker's log starts at the archived
//!   coverage, so once the marks are archived no offset is handed out twice.
//! - **Commits carry the term.** Every master-dataset commit on a shared
//!   root carries the application transaction `lambdaflow-term` = the
//!   lease term, and is refused when the table already holds a higher one
//!   (see `master::commit_chunks`): Delta serializes commits that carry the
//!   same application id, so no stale holder commits after a newer one did.
//!
//! A local root has one machine and no ETags: its lease is always held, and
//! the batch lock file serializes the processes on it.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::clock::SharedClock;
use crate::master::MasterDataset;
use crate::storage::{Storage, StorageError, Swap};
use crate::stream::Log;

/// Where the lease lives under the root.
pub const LEASE: &str = "driver/lease.json";

/// Why this node could not read or renew the lease.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error(
        "the driver lease {path} was not read and renewed within {} (a third of the lease): the store is slow to answer or keeps failing",
        humantime::format_duration(*waited)
    )]
    Unanswered { path: String, waited: Duration },
    #[error("{0}")]
    Master(#[from] crate::master::MasterError),
}

/// Why this node may not acknowledge events now (it answers 503).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fenced {
    #[error("this node has not taken the driver lease of the shared root")]
    NotTaken,
    #[error(
        "{node} holds the driver lease (term {term}); only the holder acknowledges events of the embedded log"
    )]
    Held { node: String, term: u64 },
    #[error(
        "the driver lease was last renewed {} ago (a renewal keeps it valid for {}): the store did not answer or this process was paused",
        humantime::format_duration(*age),
        humantime::format_duration(*valid)
    )]
    Lapsed { age: Duration, valid: Duration },
    #[error("could not record the events' offsets in the driver lease: {0}")]
    Unrecorded(String),
    #[error("this node does not take the driver lease: {0}")]
    Refused(String),
}

/// What the lease object holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The holding process (its writer id).
    pub holder: String,
    /// Where it serves, for people reading `status`.
    pub node: String,
    /// Incremented at each change of holder.
    pub term: u64,
    /// Until when it holds by the holder's wall clock (ms since the epoch),
    /// for people; 0 once released. Takers go by their own monotonic clock.
    pub expires_ms: i64,
    /// The holder's embedded log (its `node-id`), if it is the stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    /// Per partition, an upper bound of the offsets the holder's log holds
    /// (every acknowledged event is below it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub acked: Vec<u64>,
    /// Incremented at every write of the record: a renewal always changes
    /// it, whatever the holder's wall clock says, so a taker sees it live.
    #[serde(default)]
    pub seq: u64,
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
    /// Why this node may not acknowledge events now (embedded log only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced: Option<String>,
    /// Why this node did not take a lease it could otherwise take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// What the lease fences on the embedded log.
struct Attached {
    master: Arc<MasterDataset>,
    /// The embedded log when it is the stream, and its identity.
    log: Option<(Arc<Log>, String)>,
}

#[derive(Debug, Default)]
struct State {
    record: Option<LeaseRecord>,
    /// When the last successful renewal started (monotonic).
    renewed_at: Option<Duration>,
    /// Another holder's record as last read, and when it was first read so.
    observed: Option<(Bytes, Duration)>,
    /// Per partition, the offsets reserved by requests (≥ the log's end).
    reserved: Vec<u64>,
    /// Requests between their reservation and their append.
    in_flight: u64,
    /// Per partition, the events reserved since the last write of the
    /// record: the marks run ahead of the reservations by twice that, so a
    /// steady stream of requests rarely waits for a write, and an idle
    /// node's marks are exact.
    recent: Vec<u64>,
    /// The marks the record holds, as far as this node's writes go.
    mark: Vec<u64>,
    /// Why a takeover was refused.
    refused: Option<String>,
    /// Something `run` reports to health (a lapse survived, a loss).
    note: Option<Note>,
}

#[derive(Debug, Clone)]
enum Note {
    Recovered(String),
    Lost(String),
}

/// This node's side of the driver lease.
pub struct Lease {
    storage: Option<Storage>,
    me: String,
    node: String,
    ttl: Duration,
    clock: SharedClock,
    held: watch::Sender<bool>,
    state: Mutex<State>,
    /// Serializes this node's writes of the record (renewals, raises).
    write: tokio::sync::Mutex<()>,
    attached: OnceLock<Attached>,
}

/// A request's reservation of offsets, held from before its append until
/// after it (so a renewal does not lower the marks below it).
pub struct Reservation<'a> {
    lease: Option<&'a Lease>,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(l) = self.lease {
            l.state.lock().expect("lease lock").in_flight -= 1;
        }
    }
}

fn covers(mark: &[u64], target: &[u64]) -> bool {
    target
        .iter()
        .enumerate()
        .all(|(p, &t)| mark.get(p).copied().unwrap_or(0) >= t)
}

/// The lease fences the embedded log's acknowledgements (see
/// [`Lease::reserve`]).
#[async_trait::async_trait]
impl crate::stream::ingest::Fence for Lease {
    async fn reserve<'a>(
        &'a self,
        counts: &[(u32, u64)],
    ) -> Result<Box<dyn Send + 'a>, crate::stream::ingest::FenceError> {
        Ok(Box::new(Lease::reserve(self, counts).await?))
    }

    fn term(&self) -> u64 {
        if !self.is_held() {
            return 0;
        }
        let s = self.state.lock().expect("lease lock");
        s.record.as_ref().map_or(0, |r| r.term)
    }
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
            state: Mutex::default(),
            write: tokio::sync::Mutex::new(()),
            attached: OnceLock::new(),
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
            state: Mutex::default(),
            write: tokio::sync::Mutex::new(()),
            attached: OnceLock::new(),
        })
    }

    /// Fences the master dataset's commits with this lease's term, and, with
    /// the embedded log as the stream (`log`, and its identity), this
    /// node's acknowledgements. Before the first [`Lease::try_acquire`].
    pub fn attach(&self, master: Arc<MasterDataset>, log: Option<(Arc<Log>, String)>) {
        let _ = self.attached.set(Attached { master, log });
    }

    /// The safety margin: a holder stops a margin before the ttl, a taker
    /// waits a margin past it.
    pub fn margin(&self) -> Duration {
        self.ttl / 4
    }

    /// Whether this node may drive now: it holds the lease and its last
    /// renewal is recent enough ([`Lease::valid`]).
    pub fn is_held(&self) -> bool {
        *self.held.borrow() && self.until_lapse() != Some(Duration::ZERO)
    }

    /// How long this holder stays valid without another renewal (`None`:
    /// a local root, or never renewed).
    fn until_lapse(&self) -> Option<Duration> {
        self.storage.as_ref()?;
        let at = self.state.lock().expect("lease lock").renewed_at?;
        let age = self.clock.elapsed().saturating_sub(at);
        Some((self.ttl - self.margin()).saturating_sub(age))
    }

    /// Steps down once the validity has passed, saying so.
    fn step_down_if_lapsed(&self, health: &crate::health::Health) {
        if *self.held.borrow() && self.until_lapse() == Some(Duration::ZERO) {
            tracing::warn!("stepping down as the driver: the lease could not be renewed");
            if self.embedded().is_some() {
                health.report(
                    "lease",
                    &"the driver lease could not be renewed in time: ingest answers 503 until it is",
                );
            }
            self.held.send_replace(false);
        }
    }

    /// A sleep until the validity passes (forever when not held).
    async fn lapse(&self) {
        match self.until_lapse() {
            Some(d) if *self.held.borrow() => tokio::time::sleep(d).await,
            _ => std::future::pending().await,
        }
    }

    /// Changes of [`Lease::is_held`].
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.held.subscribe()
    }

    fn embedded(&self) -> Option<&(Arc<Log>, String)> {
        self.attached.get().and_then(|a| a.log.as_ref())
    }

    /// Whether this node is a valid holder now, by its own monotonic clock:
    /// it holds the lease and its last successful renewal started less than
    /// ttl − margin ago.
    pub fn valid(&self) -> Result<(), Fenced> {
        if self.storage.is_none() {
            return Ok(());
        }
        let s = self.state.lock().expect("lease lock");
        // Not taken for a reason of this node's (its log behind the
        // archive, another log's events unarchived): that, not a holder
        // whose lease may have expired long ago.
        if let Some(why) = &s.refused
            && !*self.held.borrow()
        {
            return Err(Fenced::Refused(why.clone()));
        }
        if let Some(r) = &s.record
            && r.holder != self.me
        {
            return Err(Fenced::Held {
                node: r.node.clone(),
                term: r.term,
            });
        }
        let Some(at) = s.renewed_at else {
            return Err(Fenced::NotTaken);
        };
        let age = self.clock.elapsed().saturating_sub(at);
        let valid = self.ttl - self.margin();
        if age >= valid {
            return Err(Fenced::Lapsed { age, valid });
        }
        if !*self.held.borrow() {
            return Err(Fenced::NotTaken);
        }
        Ok(())
    }

    pub fn status(&self) -> LeaseStatus {
        let fenced = self
            .embedded()
            .and_then(|_| self.valid().err())
            .map(|e| e.to_string());
        let held = self.is_held();
        let s = self.state.lock().expect("lease lock");
        let r = s.record.as_ref();
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
            held,
            fenced,
            refused: s.refused.clone(),
        }
    }

    /// The marks to record now: the reservations, or the log's ends when no
    /// request is between its reservation and its append (an append that
    /// failed leaves a reservation above the end). Lowers `mark` first, so a
    /// request reserving meanwhile raises again rather than trust it.
    fn marks_now(&self, s: &mut State) -> Vec<u64> {
        let Some((log, _)) = self.embedded() else {
            return Vec::new();
        };
        let n = log.partitions() as usize;
        s.reserved.resize(n.max(s.reserved.len()), 0);
        for p in 0..n {
            let end = log.end_offset(p as u32).unwrap_or(0);
            s.reserved[p] = if s.in_flight == 0 {
                end
            } else {
                s.reserved[p].max(end)
            };
        }
        s.recent.resize(n.max(s.recent.len()), 0);
        let marks: Vec<u64> = s
            .reserved
            .iter()
            .zip(&s.recent)
            .map(|(&r, &recent)| r + 2 * recent)
            .collect();
        s.recent.iter_mut().for_each(|r| *r = 0);
        for (m, &r) in s.mark.iter_mut().zip(&marks) {
            *m = (*m).min(r);
        }
        marks
    }

    /// Takes the lease if it is free, renews it if it is ours. `Ok(true)`
    /// when this node holds it afterwards. See the module doc for the rules.
    pub async fn try_acquire(&self) -> Result<bool, LeaseError> {
        let Some(storage) = &self.storage else {
            return Ok(true);
        };
        let _w = self.write.lock().await;
        let started = self.clock.elapsed();
        let (bytes, version) = storage.get_versioned(LEASE).await?;
        let read_at = self.clock.elapsed();
        let current: Option<LeaseRecord> =
            bytes.as_ref().and_then(|b| serde_json::from_slice(b).ok());
        let mine = current.as_ref().is_some_and(|r| r.holder == self.me);
        let was_mine = self
            .state
            .lock()
            .expect("lease lock")
            .record
            .as_ref()
            .is_some_and(|r| r.holder == self.me);
        if !mine {
            if was_mine {
                self.lost(current.as_ref()).await;
            }
            let free = match (&bytes, &current) {
                (None, _) => true,
                (Some(_), Some(r)) if r.expires_ms == 0 => true,
                (Some(b), _) => {
                    let mut s = self.state.lock().expect("lease lock");
                    match &s.observed {
                        Some((seen, since)) if seen == b => {
                            read_at.saturating_sub(*since) >= self.ttl + self.margin()
                        }
                        _ => {
                            s.observed = Some((b.clone(), read_at));
                            s.refused = None;
                            false
                        }
                    }
                }
            };
            if !free {
                self.set_seen(current, false);
                return Ok(false);
            }
            // An unreadable record hides its holder's marks: on the embedded
            // log, that holder may have acknowledged events only its log
            // holds, and a term this node cannot exceed. Not taken over; an
            // operator who knows decides (a process of its own, as its last
            // holder, writes over it).
            if bytes.is_some() && current.is_none() && !was_mine && self.embedded().is_some() {
                let path = self
                    .storage
                    .as_ref()
                    .map_or_else(|| LEASE.to_string(), |s| s.path(LEASE).to_string());
                let why = format!(
                    "the driver lease record {path} is unreadable: whatever its holder acknowledged and has not archived is unknown, so this node does not take over and hand those offsets out again. If the node that held it can run, restart it on its data directory after deleting {path}; if its disk is lost for good, delete {path} to accept losing what it held"
                );
                tracing::warn!(reason = %why, "not taking the driver lease");
                let mut s = self.state.lock().expect("lease lock");
                s.refused = Some(why);
                drop(s);
                self.set_seen(None, false);
                return Ok(false);
            }
            if let Some(r) = &current
                && let Some(why) = self.unarchived(r).await?
            {
                tracing::warn!(reason = %why, "not taking the driver lease");
                let mut s = self.state.lock().expect("lease lock");
                s.refused = Some(why);
                drop(s);
                self.set_seen(current, false);
                return Ok(false);
            }
        }
        // A log that ends below what the master dataset holds (another
        // node drove and archived since this one last did) would give those
        // offsets out again: not taken until a restart opens the log at the
        // archived coverage.
        if !mine
            && let Some(a) = self.attached.get()
            && let Some((log, _)) = &a.log
        {
            let cov = a.master.refresh().await?;
            let behind = (0..log.partitions()).find_map(|p| {
                let end = log.end_offset(p).unwrap_or(0);
                let held = cov.h.get(p);
                (end < held).then_some((p, end, held))
            });
            if let Some((p, end, held)) = behind {
                let why = format!(
                    "this node's log of partition {p} ends at offset {end}, below the {held} the master dataset holds (another node drove and archived since): taking the lease would give those offsets out again. Restart this node: its log then starts at the archived coverage"
                );
                tracing::warn!(reason = %why, "not taking the driver lease");
                self.state.lock().expect("lease lock").refused = Some(why);
                self.set_seen(current, false);
                return Ok(false);
            }
        }
        let table_term = match self.attached.get() {
            Some(a) if !mine => a.master.table_term().await?,
            _ => 0,
        };
        let term = match &current {
            Some(r) if mine => r.term,
            Some(r) => r.term.max(table_term) + 1,
            None => table_term + 1,
        };
        let acked = self.marks_now(&mut self.state.lock().expect("lease lock"));
        let next = LeaseRecord {
            holder: self.me.clone(),
            node: self.node.clone(),
            term,
            expires_ms: self.clock.unix_ms() + self.ttl.as_millis() as i64,
            log: self.embedded().map(|(_, id)| id.clone()),
            acked: acked.clone(),
            seq: current.as_ref().map_or(0, |r| r.seq + 1),
        };
        let json = serde_json::to_vec(&next).expect("a lease serializes");
        match storage.replace(LEASE, Bytes::from(json), &version).await? {
            Swap::Done => {
                if !mine {
                    tracing::info!(term, node = %self.node, "took the driver lease");
                }
                if let Some(a) = self.attached.get() {
                    a.master.set_term(term);
                }
                let mut s = self.state.lock().expect("lease lock");
                let valid = self.ttl - self.margin();
                if let Some(prev) = s.renewed_at
                    && mine
                    && started.saturating_sub(prev) >= valid
                    && self.embedded().is_some()
                {
                    s.note = Some(Note::Recovered(format!(
                        "the driver lease was not renewed for {} (the store did not answer or this process was paused); ingest answered 503 meanwhile, and no other node took the lease: this node's acknowledged events stay its own to archive",
                        humantime::format_duration(Duration::from_millis(
                            started.saturating_sub(prev).as_millis() as u64
                        ))
                    )));
                }
                s.renewed_at = Some(started);
                s.mark = acked;
                s.observed = None;
                s.refused = None;
                drop(s);
                self.set_seen(Some(next), true);
                Ok(true)
            }
            Swap::Lost => {
                self.set_seen(current, false);
                Ok(false)
            }
        }
    }

    /// Why the record's holder may have acknowledged events this node
    /// cannot see, or `None`: its log is another one, and its marks are
    /// beyond the master dataset's coverage.
    async fn unarchived(&self, r: &LeaseRecord) -> Result<Option<String>, LeaseError> {
        let Some(a) = self.attached.get() else {
            return Ok(None);
        };
        let Some((_, mine)) = &a.log else {
            return Ok(None);
        };
        if r.log.as_ref() == Some(mine) || r.acked.is_empty() {
            return Ok(None);
        }
        let h = a.master.refresh().await?.h;
        let behind: Vec<String> = r
            .acked
            .iter()
            .enumerate()
            .filter_map(|(p, &m)| {
                let archived = h.get(p as u32);
                (m > archived).then(|| format!("partition {p} [{archived}, {m})"))
            })
            .collect();
        if behind.is_empty() {
            return Ok(None);
        }
        Ok(Some(format!(
            "{} (term {}) may hold acknowledged events not archived yet, in its own log only: {}; this node waits for them to be archived rather than hand those offsets out again. Restart that node on its own data directory (it renews the lease and archives them); if its disk is lost for good, delete {} to accept losing them",
            r.node,
            r.term,
            behind.join(", "),
            self.storage
                .as_ref()
                .map_or_else(|| LEASE.to_string(), |s| s.path(LEASE).to_string()),
        )))
    }

    /// This node held the lease and finds another holder: say so, loudly if
    /// its log holds events beyond the master dataset's coverage.
    async fn lost(&self, to: Option<&LeaseRecord>) {
        let who = to.map_or_else(
            || "the record is gone or unreadable".to_string(),
            |r| format!("{} holds it (term {})", r.node, r.term),
        );
        let mut note = None;
        if let Some(a) = self.attached.get()
            && let Some((log, _)) = &a.log
            && let Ok(cov) = a.master.refresh().await
        {
            let behind: Vec<String> = (0..log.partitions())
                .filter_map(|p| {
                    let end = log.end_offset(p).ok()?;
                    let archived = cov.h.get(p);
                    (end > archived).then(|| format!("partition {p} [{archived}, {end})"))
                })
                .collect();
            if !behind.is_empty() {
                note = Some(Note::Lost(format!(
                    "this node lost the driver lease ({who}) while its log holds events not archived: {}; it cannot archive them under another node's term. Stop the other node, then restart this one on its data directory so it takes the lease and archives them",
                    behind.join(", ")
                )));
            }
        }
        tracing::warn!(%who, "lost the driver lease");
        self.state.lock().expect("lease lock").note = note;
    }

    /// Reserves offsets for a request's events (`(partition, count)`)
    /// before they are appended to the embedded log: checks that this node
    /// is a valid holder, and that the record's marks cover the reserved
    /// offsets, raising them by compare-and-swap if not. Hold the
    /// reservation until the append has returned.
    pub async fn reserve(&self, counts: &[(u32, u64)]) -> Result<Reservation<'_>, Fenced> {
        let Some((log, _)) = self.embedded() else {
            return Ok(Reservation { lease: None });
        };
        self.valid()?;
        let target = {
            let mut s = self.state.lock().expect("lease lock");
            s.in_flight += 1;
            for &(p, n) in counts {
                let p = p as usize;
                if s.reserved.len() <= p {
                    s.reserved.resize(p + 1, 0);
                }
                let end = log.end_offset(p as u32).unwrap_or(0);
                s.reserved[p] = s.reserved[p].max(end) + n;
                if s.recent.len() <= p {
                    s.recent.resize(p + 1, 0);
                }
                s.recent[p] += n;
            }
            s.reserved.clone()
        };
        let reservation = Reservation { lease: Some(self) };
        if self.covered(&target) {
            return Ok(reservation);
        }
        let every = self.ttl / 3;
        match tokio::time::timeout(every, self.raise(&target)).await {
            Ok(Ok(())) => Ok(reservation),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Fenced::Unrecorded(format!(
                "the store did not answer within {}",
                humantime::format_duration(every)
            ))),
        }
    }

    fn covered(&self, target: &[u64]) -> bool {
        covers(&self.state.lock().expect("lease lock").mark, target)
    }

    /// Records marks covering `target` in the record (this node's own).
    async fn raise(&self, target: &[u64]) -> Result<(), Fenced> {
        let storage = self.storage.as_ref().expect("a shared lease");
        let _w = self.write.lock().await;
        if self.covered(target) {
            return Ok(());
        }
        self.valid()?;
        let started = self.clock.elapsed();
        let unrecorded = |e: StorageError| Fenced::Unrecorded(crate::error::chain(&e));
        let (bytes, version) = storage.get_versioned(LEASE).await.map_err(unrecorded)?;
        let current: Option<LeaseRecord> =
            bytes.as_ref().and_then(|b| serde_json::from_slice(b).ok());
        let Some(mut next) = current.filter(|r| r.holder == self.me) else {
            self.held.send_replace(false);
            return Err(Fenced::NotTaken);
        };
        let acked = self.marks_now(&mut self.state.lock().expect("lease lock"));
        next.acked = acked.clone();
        next.seq += 1;
        next.expires_ms = self.clock.unix_ms() + self.ttl.as_millis() as i64;
        let json = serde_json::to_vec(&next).expect("a lease serializes");
        match storage
            .replace(LEASE, Bytes::from(json), &version)
            .await
            .map_err(unrecorded)?
        {
            Swap::Done => {
                let mut s = self.state.lock().expect("lease lock");
                s.mark = acked;
                s.renewed_at = Some(started);
                s.record = Some(next);
                Ok(())
            }
            Swap::Lost => {
                self.held.send_replace(false);
                Err(Fenced::NotTaken)
            }
        }
    }

    /// Gives the lease up (at shutdown), so another node takes over at once
    /// (on the embedded log, once the marks it leaves are archived).
    pub async fn release(&self) {
        let Some(storage) = &self.storage else { return };
        if !self.is_held() {
            return;
        }
        self.held.send_replace(false);
        let _w = self.write.lock().await;
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
        // Exact marks: what the log holds, so a taker waits only for them.
        if let Some((log, _)) = self.embedded() {
            r.acked = (0..log.partitions())
                .map(|p| log.end_offset(p).unwrap_or(0))
                .collect();
        }
        let json = serde_json::to_vec(&r).expect("a lease serializes");
        let _ = storage.replace(LEASE, Bytes::from(json), &version).await;
    }

    fn set_seen(&self, record: Option<LeaseRecord>, held: bool) {
        self.state.lock().expect("lease lock").record = record;
        self.held
            .send_if_modified(|h| std::mem::replace(h, held) != held);
    }

    /// Keeps trying to take the lease, and renewing it while held, until
    /// `stop`. A holder stops acting once its validity (ttl − margin from
    /// the start of its last successful renewal) has passed.
    pub async fn run(
        self: Arc<Self>,
        health: Arc<crate::health::Health>,
        mut stop: watch::Receiver<bool>,
    ) {
        if self.storage.is_none() {
            return;
        }
        let every = self.ttl / 3;
        loop {
            // A renewal is bounded by the time between two; validity counts
            // from its start whatever it takes.
            let renewal = tokio::time::timeout(every, self.try_acquire());
            tokio::pin!(renewal);
            let attempt = loop {
                tokio::select! {
                    r = &mut renewal => break match r {
                        Ok(r) => r,
                        Err(_) => Err(LeaseError::Unanswered {
                            path: storage_path(&self.storage),
                            waited: every,
                        }),
                    },
                    _ = self.lapse() => self.step_down_if_lapsed(&health),
                }
            };
            let refused = self.state.lock().expect("lease lock").refused.clone();
            let note = self.state.lock().expect("lease lock").note.take();
            match note {
                Some(Note::Recovered(what)) => {
                    tracing::warn!("{what}");
                    health.recovered("lease", &what);
                }
                Some(Note::Lost(what)) => {
                    tracing::error!("{what}");
                    health.report("lease/unarchived", &what);
                }
                None => {}
            }
            match attempt {
                Ok(_) => match refused {
                    Some(why) => {
                        health.report("lease", &why);
                    }
                    None => health.clear("lease"),
                },
                Err(e) => {
                    health.report_error("lease", &e);
                    tracing::warn!(error = %crate::error::chain(&e), "could not read or renew the driver lease");
                }
            }
            self.step_down_if_lapsed(&health);
            if self.is_held() {
                // Holding the lease again, this node archives its own
                // events: what was said when it lost them no longer holds.
                health.clear("lease/unarchived");
            }
            let pause = tokio::time::sleep(every);
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = &mut pause => break,
                    _ = self.lapse() => self.step_down_if_lapsed(&health),
                    _ = stop.changed() => {
                        self.release().await;
                        return;
                    }
                }
            }
        }
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

    fn node(storage: &Storage, i: usize, ttl: Duration, clock: SharedClock) -> Arc<Lease> {
        let mut l = Lease::shared(storage.clone(), format!("node{i}"), ttl, clock);
        // Each node is its own process: its own writer id.
        Arc::get_mut(&mut l).unwrap().me = format!("w{i}");
        l
    }

    /// Racing nodes on one store: at any moment at most one believes it
    /// holds the lease, and after the holder stops renewing, another takes
    /// it once it has seen the record unchanged for ttl + margin (and not
    /// before).
    #[tokio::test]
    async fn one_holder_at_a_time_and_a_takeover_after_expiry() {
        let storage = Storage::memory();
        let manual = ManualClock::new(1_800_000_000_000);
        let clock: SharedClock = manual.clone();
        let ttl = Duration::from_secs(10);
        let nodes: Vec<_> = (0..4)
            .map(|i| node(&storage, i, ttl, clock.clone()))
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
        for &i in &others {
            assert!(!nodes[i].try_acquire().await.unwrap());
        }
        manual.advance(Duration::from_secs(12));
        for &i in &others {
            assert!(
                !nodes[i].try_acquire().await.unwrap(),
                "node {i} saw the record unchanged for 12 s, less than ttl + margin (12.5 s): it must not take it"
            );
        }
        manual.advance(Duration::from_millis(500));
        let took = nodes[others[0]].try_acquire().await.unwrap();
        assert!(took, "a record unchanged for ttl + margin is taken");
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

    /// A holder is valid for ttl − margin after its last successful renewal
    /// *started*, by its own monotonic clock — not by the wall clock, and
    /// not by when the renewal's answer came.
    #[tokio::test]
    async fn validity_counts_from_the_last_renewal_start_on_the_monotonic_clock() {
        let storage = Storage::memory();
        let manual = ManualClock::new(1_800_000_000_000);
        let ttl = Duration::from_secs(8);
        let a = node(&storage, 0, ttl, manual.clone());
        assert_eq!(a.valid(), Err(Fenced::NotTaken), "not taken yet");
        assert!(a.try_acquire().await.unwrap());
        assert_eq!(a.valid(), Ok(()), "valid right after taking it");
        manual.advance(ttl - a.margin() - Duration::from_millis(1));
        assert_eq!(a.valid(), Ok(()), "valid until ttl − margin");
        manual.advance(Duration::from_millis(1));
        assert!(
            matches!(a.valid(), Err(Fenced::Lapsed { .. })),
            "at ttl − margin after the renewal started, the holder must stop acknowledging: {:?}",
            a.valid()
        );
        assert!(
            a.try_acquire().await.unwrap(),
            "its record is still its own"
        );
        assert_eq!(a.valid(), Ok(()), "a renewal makes it valid again");
        let b = node(&storage, 1, ttl, manual.clone());
        assert!(!b.try_acquire().await.unwrap());
        assert!(
            matches!(b.valid(), Err(Fenced::Held { .. })),
            "another node holds it: {:?}",
            b.valid()
        );
    }

    /// Takeover is by the taker's own monotonic clock: a holder whose wall
    /// clock runs behind (its record's `expires_ms` long past by the
    /// taker's) is still waited out for ttl + margin from the moment the
    /// taker first saw its record.
    #[tokio::test]
    async fn takeover_ignores_wall_clocks_and_waits_a_full_ttl_from_first_sight() {
        let storage = Storage::memory();
        let ttl = Duration::from_secs(10);
        // A's wall clock is an hour behind B's.
        let a_clock = ManualClock::new(1_800_000_000_000 - 3_600_000);
        let b_clock = ManualClock::new(1_800_000_000_000);
        let a = node(&storage, 0, ttl, a_clock.clone());
        let b = node(&storage, 1, ttl, b_clock.clone());
        assert!(a.try_acquire().await.unwrap());
        assert!(
            !b.try_acquire().await.unwrap(),
            "A renewed just now: B must not take the lease, whatever A's record says of its expiry"
        );
        b_clock.advance(ttl);
        assert!(!b.try_acquire().await.unwrap(), "not before ttl + margin");
        // A renews: B starts over.
        assert!(a.try_acquire().await.unwrap());
        b_clock.advance(ttl + ttl / 4);
        assert!(
            !b.try_acquire().await.unwrap(),
            "a changed record is a live holder: B starts its wait again"
        );
        b_clock.advance(ttl + ttl / 4);
        assert!(
            b.try_acquire().await.unwrap(),
            "unchanged for ttl + margin: taken"
        );
        assert!(!a.try_acquire().await.unwrap(), "A lost it");
        assert!(matches!(a.valid(), Err(Fenced::Held { .. })));
    }

    /// An unreadable record is held by an unknown holder: replaced only
    /// after it has stayed unchanged for ttl + margin.
    #[tokio::test]
    async fn an_unreadable_record_is_waited_out_before_it_is_replaced() {
        let storage = Storage::memory();
        let manual = ManualClock::new(1_800_000_000_000);
        let ttl = Duration::from_secs(10);
        storage
            .put(LEASE, Bytes::from_static(b"{\"holder\": \"torn"))
            .await
            .unwrap();
        let b = node(&storage, 1, ttl, manual.clone());
        assert!(
            !b.try_acquire().await.unwrap(),
            "an unreadable record may be a live holder's: not replaced at once"
        );
        manual.advance(ttl);
        assert!(!b.try_acquire().await.unwrap());
        manual.advance(ttl / 4);
        assert!(
            b.try_acquire().await.unwrap(),
            "replaced after ttl + margin"
        );
    }

    /// A one-partition master dataset on `storage` and an embedded log in a
    /// temporary directory (kept alive by the returned guard).
    async fn embedded_parts(
        storage: &Storage,
    ) -> (Arc<MasterDataset>, Arc<Log>, tempfile::TempDir) {
        let schema = Arc::new(crate::schema::EventSchema::paper());
        let master = Arc::new(MasterDataset::open(storage, schema, 1).await.unwrap());
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(
            Log::open(
                dir.path(),
                crate::stream::LogOptions {
                    partitions: 1,
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        (master, log, dir)
    }

    /// On the embedded log, an unreadable record is never taken over by
    /// another process: its holder's acknowledged marks and term are
    /// unknown (a taker could reuse both, and lose its events). Deleting it
    /// is the operator's decision, and then the lease is free.
    #[tokio::test]
    async fn an_unreadable_record_on_the_embedded_log_is_refused_until_deleted() {
        let storage = Storage::memory();
        let manual = ManualClock::new(1_800_000_000_000);
        let ttl = Duration::from_secs(10);
        let (master, log, _dir) = embedded_parts(&storage).await;
        storage
            .put(LEASE, Bytes::from_static(b"not json"))
            .await
            .unwrap();
        let b = node(&storage, 1, ttl, manual.clone());
        b.attach(master.clone(), Some((log.clone(), "log-of-node1".into())));
        assert!(!b.try_acquire().await.unwrap());
        manual.advance(ttl + ttl / 4);
        assert!(
            !b.try_acquire().await.unwrap(),
            "an unreadable record's holder may hold acknowledged events only its log has: not taken over"
        );
        let refused = b.status().refused.unwrap_or_default();
        assert!(
            refused.contains("unreadable") && refused.contains("delete"),
            "the refusal says why and what to do: {refused}"
        );
        storage.delete(LEASE).await.unwrap();
        assert!(
            b.try_acquire().await.unwrap(),
            "a deleted record is the operator's decision: the lease is free"
        );
    }

    /// On the embedded log, a taker whose log is not the old holder's does
    /// not take the lease while the old holder's marks are beyond the master
    /// dataset's coverage (its log alone holds those events), and says why;
    /// once the marks are archived — or with the old holder's own log — it
    /// does.
    #[tokio::test]
    async fn a_taker_refuses_while_the_old_holders_marks_are_not_archived() {
        let storage = Storage::memory();
        let manual = ManualClock::new(1_800_000_000_000);
        let ttl = Duration::from_secs(10);
        let (master, log, _dir) = embedded_parts(&storage).await;
        let old = LeaseRecord {
            holder: "w0".into(),
            node: "node0".into(),
            term: 3,
            expires_ms: 1,
            log: Some("log-of-node0".into()),
            acked: vec![150],
            seq: 7,
        };
        storage
            .put(LEASE, Bytes::from(serde_json::to_vec(&old).unwrap()))
            .await
            .unwrap();
        let b = node(&storage, 1, ttl, manual.clone());
        b.attach(master.clone(), Some((log.clone(), "log-of-node1".into())));
        assert!(!b.try_acquire().await.unwrap());
        manual.advance(ttl + ttl / 4);
        assert!(
            !b.try_acquire().await.unwrap(),
            "node0 may have acknowledged offsets [0, 150) only its log holds: node1 must not take over and hand them out again"
        );
        let refused = b.status().refused.unwrap_or_default();
        assert!(
            refused.contains("partition 0 [0, 150)") && refused.contains("Restart that node"),
            "the refusal says which events and what to do: {refused}"
        );
        // node0 comes back on its own directory (a new process, its log).
        let again = node(&storage, 2, ttl, manual.clone());
        again.attach(master.clone(), Some((log.clone(), "log-of-node0".into())));
        assert!(!again.try_acquire().await.unwrap());
        manual.advance(ttl + ttl / 4);
        assert!(
            again.try_acquire().await.unwrap(),
            "the old holder's own log holds the events: it takes the lease to archive them"
        );
        assert_eq!(again.status().term, 4, "a new term");
        assert_eq!(again.valid(), Ok(()));
    }
}
