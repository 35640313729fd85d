//! The request ledger: which producers' requests are stored, and where —
//! what makes `POST /v1/events` idempotent.
//!
//! ```text
//!  POST /v1/events  Lambdaflow-Producer: P  Lambdaflow-Sequence: S
//!        │ begin(P, S, digest of the body)
//!        ├─ stored before ─────────▶ the original reply (same offsets), nothing stored
//!        ├─ same S, other body ────▶ 409
//!        ├─ S below P's window ────▶ 422 too old (never stored twice)
//!        ├─ S in flight ───────────▶ waits for it, then one of the above
//!        └─ new ──▶ every frame of the request carries the tag {P, S, digest, parts}
//!                   in the log, in the same fsync as its events
//!
//!  rebuilt at startup:   ingest/requests/t<term>.json (the snapshot) + the tags the log still holds
//!  snapshot written:     before each master-dataset commit, covering every tag below its coverage
//! ```
//!
//! What the ledger knows is exactly what survived of the events: a tag is
//! durable with its frame, and the snapshot is written before the commit
//! that lets the log drop the frame (retention deletes only below a
//! published, hence committed, coverage). A node that takes the driver lease
//! over merges the newest term's snapshot before it acknowledges anything
//! (the embedded log on a shared root: the old driver's acknowledged events
//! are archived before another node may acknowledge, so their tags are in
//! it). Each term writes its own snapshot file, so a paused old driver
//! cannot overwrite the new one's.
//!
//! Bounds: per producer, the `window` most recent sequences stored (a
//! sequence below them is refused as too old rather than stored again);
//! producers not seen for `forget_after` are forgotten; at most
//! `max_producers` are known at once (a new one beyond is refused, 503).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::ingest::OffsetRange;
use super::log::{FrameTag, Log, LogError};
use crate::storage::{Storage, StorageError};

/// The request header that names a producer.
pub const PRODUCER_HEADER: &str = "lambdaflow-producer";
/// The request header that numbers a producer's requests.
pub const SEQUENCE_HEADER: &str = "lambdaflow-sequence";
/// A producer's name is 1 to this many visible ASCII characters.
pub const MAX_PRODUCER_LEN: usize = 128;
/// Where the snapshots live under the storage root.
pub const SNAPSHOT_DIR: &str = "ingest/requests";
const TAG_VERSION: u8 = 1;
const SNAPSHOT_FORMAT: u32 = 1;
/// Retired producers (their floor only) kept per place of `max_producers`.
const RETIRED_PER_PLACE: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("`{header}` is not valid: {reason}")]
    BadHeader {
        header: &'static str,
        reason: String,
    },
    #[error("`{0}` needs `{1}` beside it")]
    HalfHeaders(&'static str, &'static str),
    #[error(
        "request {sequence} of producer `{producer}` was stored with another body than the one sent now"
    )]
    Changed { producer: String, sequence: u64 },
    #[error(
        "request {sequence} of producer `{producer}` is too old to tell whether it was stored: only sequences from {floor} on are remembered"
    )]
    TooOld {
        producer: String,
        sequence: u64,
        floor: u64,
    },
    #[error("{known} producers have requests in flight (the limit); producer `{producer}` is new")]
    TooManyProducers { producer: String, known: usize },
    #[error("this node produces into {stream}, where re-sent requests cannot be recognised yet")]
    Unsupported { stream: String },
    #[error("the request ledger snapshot {path} is unreadable")]
    Snapshot {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the request ledger snapshot {path} is of format {format}; this version reads format 1"
    )]
    SnapshotFormat { path: String, format: u32 },
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Log(#[from] LogError),
    #[error("reading the log's request tags was interrupted: {0}")]
    Internal(String),
}

crate::explained!(RequestError);

impl RequestError {
    /// A stable name for clients (the `code` of the HTTP reply).
    pub fn code(&self) -> &'static str {
        match self {
            RequestError::BadHeader { .. } | RequestError::HalfHeaders(..) => "bad-request-id",
            RequestError::Changed { .. } => "changed-request",
            RequestError::TooOld { .. } => "sequence-too-old",
            RequestError::TooManyProducers { .. } => "too-many-producers",
            RequestError::Unsupported { .. } => "idempotence-unsupported",
            _ => "ledger-failed",
        }
    }
}

impl crate::error::Explain for RequestError {
    fn hint(&self) -> Option<String> {
        match self {
            RequestError::BadHeader { .. } | RequestError::HalfHeaders(..) => Some(format!(
                "send both `Lambdaflow-Producer: <name of 1 to {MAX_PRODUCER_LEN} visible ASCII characters>` and `Lambdaflow-Sequence: <integer>`, or neither"
            )),
            RequestError::Changed { .. } => Some(
                "a re-sent request must carry the body it was first sent with; number a new body with a new sequence"
                    .into(),
            ),
            RequestError::TooOld { .. } => Some(
                "the producer re-sent a request after many newer ones (raise ingest.idempotence.window), or reused a sequence; check the events below its last offsets before sending it again under a new sequence"
                    .into(),
            ),
            RequestError::TooManyProducers { .. } => Some(
                "retry shortly, or raise ingest.idempotence.max_producers"
                    .into(),
            ),
            RequestError::Unsupported { .. } => Some(
                "send to a node on the embedded log, or without the Lambdaflow-Producer and Lambdaflow-Sequence headers (at least once: a request re-sent after a lost reply may be stored twice)"
                    .into(),
            ),
            RequestError::Snapshot { .. } => Some(
                "restore it from a backup, or move it aside and restart: a request re-sent whose events the log no longer holds may then be stored again"
                    .into(),
            ),
            RequestError::SnapshotFormat { .. } => Some(
                "it was written by a newer lambdaflow: run that version, or move the file aside and restart (a re-sent request whose events the log no longer holds may then be stored again)"
                    .into(),
            ),
            _ => None,
        }
    }
}

/// A producer's request: who sent it and its number.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId {
    pub producer: String,
    pub sequence: u64,
}

impl RequestId {
    /// From the two headers' values; `Ok(None)` when neither is there.
    pub fn from_headers(
        producer: Option<&[u8]>,
        sequence: Option<&[u8]>,
    ) -> Result<Option<RequestId>, RequestError> {
        let (producer, sequence) = match (producer, sequence) {
            (None, None) => return Ok(None),
            (Some(p), Some(s)) => (p, s),
            (Some(_), None) => {
                return Err(RequestError::HalfHeaders(
                    "Lambdaflow-Producer",
                    "Lambdaflow-Sequence",
                ));
            }
            (None, Some(_)) => {
                return Err(RequestError::HalfHeaders(
                    "Lambdaflow-Sequence",
                    "Lambdaflow-Producer",
                ));
            }
        };
        let bad = |header, reason: &str| RequestError::BadHeader {
            header,
            reason: reason.into(),
        };
        if producer.is_empty() || producer.len() > MAX_PRODUCER_LEN {
            return Err(bad(
                "Lambdaflow-Producer",
                &format!("{} bytes long", producer.len()),
            ));
        }
        if !producer.iter().all(|b| (0x21..=0x7e).contains(b)) {
            return Err(bad(
                "Lambdaflow-Producer",
                "only visible ASCII characters are allowed",
            ));
        }
        let sequence = std::str::from_utf8(sequence)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| bad("Lambdaflow-Sequence", "not an integer from 0 to 2^64 - 1"))?;
        Ok(Some(RequestId {
            producer: String::from_utf8(producer.to_vec()).expect("ASCII"),
            sequence,
        }))
    }
}

/// The first 16 bytes of the body's BLAKE3 hash: a re-sent request is the
/// same request only with the same bytes.
pub type Digest = [u8; 16];

pub fn digest(body: &[u8]) -> Digest {
    let mut d = [0u8; 16];
    d.copy_from_slice(&blake3::hash(body).as_bytes()[..16]);
    d
}

/// What every frame of a request carries: its identity, its body's digest
/// and how many frames (one per partition) it was split into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    pub id: RequestId,
    pub digest: Digest,
    pub parts: u16,
}

impl Tag {
    /// `[ver u8][len u8][producer][sequence u64][digest 16][parts u16]`.
    pub fn encode(&self) -> Vec<u8> {
        let p = self.id.producer.as_bytes();
        let mut b = Vec::with_capacity(2 + p.len() + 8 + 16 + 2);
        b.push(TAG_VERSION);
        b.push(p.len() as u8);
        b.extend_from_slice(p);
        b.extend_from_slice(&self.id.sequence.to_le_bytes());
        b.extend_from_slice(&self.digest);
        b.extend_from_slice(&self.parts.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Tag> {
        if *b.first()? != TAG_VERSION {
            return None;
        }
        let n = usize::from(*b.get(1)?);
        let producer = std::str::from_utf8(b.get(2..2 + n)?).ok()?.to_string();
        let rest = b.get(2 + n..)?;
        if rest.len() != 8 + 16 + 2 {
            return None;
        }
        Some(Tag {
            id: RequestId {
                producer,
                sequence: u64::from_le_bytes(rest[..8].try_into().ok()?),
            },
            digest: rest[8..24].try_into().ok()?,
            parts: u16::from_le_bytes(rest[24..26].try_into().ok()?),
        })
    }
}

/// The ledger's bounds (`[ingest.idempotence]`).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub window: usize,
    pub forget_after: Duration,
    pub max_producers: usize,
}

impl From<&crate::config::IdempotenceConfig> for Bounds {
    fn from(c: &crate::config::IdempotenceConfig) -> Bounds {
        Bounds {
            window: c.window.max(1),
            forget_after: c.forget_after,
            max_producers: c.max_producers.max(1),
        }
    }
}

/// One stored part of a request: its events at offsets
/// `[first, first + count)` of `partition`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub partition: u32,
    pub first: u64,
    pub count: u64,
}

impl Part {
    pub fn range(&self) -> OffsetRange {
        OffsetRange {
            partition: self.partition,
            first: self.first,
            last: self.first + self.count - 1,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    #[serde(with = "hex16")]
    digest: Digest,
    /// Frames the request was split into; 0 until one is stored.
    expected: u16,
    parts: Vec<Part>,
    /// A request handling it now; the others wait for it.
    #[serde(skip)]
    busy: Option<Arc<watch::Sender<()>>>,
}

impl Entry {
    fn complete(&self) -> bool {
        self.expected > 0 && self.parts.len() >= usize::from(self.expected)
    }

    fn add(&mut self, part: Part, expected: u16) {
        self.expected = self.expected.max(expected);
        if !self
            .parts
            .iter()
            .any(|p| p.partition == part.partition && p.first == part.first)
        {
            self.parts.push(part);
            self.parts.sort_by_key(|p| p.partition);
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Producer {
    /// When a request of it was last stored (milliseconds since the epoch).
    last_ms: i64,
    /// Sequences below this are no longer remembered.
    floor: u64,
    entries: BTreeMap<u64, Entry>,
}

impl Producer {
    /// Keeps the `window` highest sequences (none in flight is dropped).
    fn trim(&mut self, window: usize) {
        while self.entries.len() > window {
            let (&seq, e) = self.entries.first_key_value().expect("non-empty");
            if e.busy.is_some() {
                break;
            }
            self.entries.pop_first();
            self.floor = self.floor.max(seq + 1);
        }
    }
}

/// What the ledger knows: producers by name.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Known {
    producers: HashMap<String, Producer>,
}

impl Known {
    fn absorb(&mut self, t: &FrameTag, ingest_ms: i64) {
        let Some(tag) = Tag::decode(&t.tag) else {
            tracing::warn!(
                partition = t.partition,
                offset = t.base,
                "a log frame's request tag is unreadable; left out"
            );
            return;
        };
        let p = self.producers.entry(tag.id.producer).or_default();
        // A frame stamped by a clock running ahead must not keep its
        // producer for ever.
        p.last_ms = p.last_ms.max(ingest_ms.min(now_ms()));
        if tag.id.sequence < p.floor {
            return;
        }
        let e = p.entries.entry(tag.id.sequence).or_insert(Entry {
            digest: tag.digest,
            expected: 0,
            parts: Vec::new(),
            busy: None,
        });
        e.add(
            Part {
                partition: t.partition,
                first: t.base,
                count: u64::from(t.count),
            },
            tag.parts,
        );
    }

    fn merge(&mut self, other: Known) {
        let now = now_ms();
        for (name, o) in other.producers {
            let p = self.producers.entry(name).or_default();
            p.last_ms = p.last_ms.max(o.last_ms.min(now));
            p.floor = p.floor.max(o.floor);
            for (seq, e) in o.entries {
                let mine = p.entries.entry(seq).or_insert_with(|| Entry {
                    busy: None,
                    parts: Vec::new(),
                    ..e.clone()
                });
                for part in e.parts {
                    mine.add(part, e.expected);
                }
            }
            let floor = p.floor;
            p.entries.retain(|&s, e| s >= floor || e.busy.is_some());
        }
    }

    /// Producers with requests remembered (a producer whose requests were
    /// dropped to make room keeps only its floor).
    fn active(&self) -> usize {
        self.producers
            .values()
            .filter(|p| !p.entries.is_empty())
            .count()
    }

    /// Drops the requests of the producer seen least recently (none in
    /// flight), keeping its floor: its numbers up to its last one are then
    /// refused as too old (422), never stored again. Whether one was.
    fn retire_idlest(&mut self) -> bool {
        let idlest = self
            .producers
            .iter()
            .filter(|(_, p)| !p.entries.is_empty() && p.entries.values().all(|e| e.busy.is_none()))
            .min_by_key(|(_, p)| p.last_ms)
            .map(|(name, _)| name.clone());
        let Some(name) = idlest else { return false };
        let p = self.producers.get_mut(&name).expect("listed");
        if let Some((&last, _)) = p.entries.last_key_value() {
            p.floor = p.floor.max(last + 1);
        }
        p.entries.clear();
        tracing::info!(producer = %name, floor = p.floor, "dropped the requests of the idlest producer to make room for another; its older numbers get 422");
        true
    }

    /// Forgets producers unseen for `forget_after`, keeps at most
    /// `max_producers` with requests (retiring the idlest) and at most
    /// `RETIRED_PER_PLACE` times as many retired ones (forgetting the
    /// oldest). How many were retired.
    fn trim(&mut self, bounds: &Bounds, now_ms: i64) -> u64 {
        let ttl = bounds.forget_after.as_millis() as i64;
        self.producers.retain(|_, p| {
            p.trim(bounds.window);
            p.last_ms >= now_ms.saturating_sub(ttl) || p.entries.values().any(|e| e.busy.is_some())
        });
        let mut retired = 0;
        while self.active() > bounds.max_producers && self.retire_idlest() {
            retired += 1;
        }
        let max_retired = bounds.max_producers.saturating_mul(RETIRED_PER_PLACE);
        let excess = (self.producers.len() - self.active()).saturating_sub(max_retired);
        if excess > 0 {
            let mut old: Vec<(i64, String)> = self
                .producers
                .iter()
                .filter(|(_, p)| p.entries.is_empty())
                .map(|(n, p)| (p.last_ms, n.clone()))
                .collect();
            old.sort();
            for (_, name) in old.into_iter().take(excess) {
                self.producers.remove(&name);
            }
        }
        retired
    }
}

/// The snapshot on the storage root: what the ledger knew of the tags below
/// `covers[p]` of each partition.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Snapshot {
    format: u32,
    term: u64,
    covers: Vec<u64>,
    known: Known,
}

/// Counters since start, for status and metrics.
#[derive(Debug, Default)]
pub struct RequestCounters {
    /// Requests that carried a producer and a sequence.
    pub identified: AtomicU64,
    /// Re-sent requests answered from the ledger, nothing stored again.
    pub recognised: AtomicU64,
    /// Re-sent requests found stored in part, whose missing parts were stored.
    pub completed: AtomicU64,
    pub changed: AtomicU64,
    pub too_old: AtomicU64,
    /// Producers whose requests were dropped to make room for another
    /// (`max_producers` reached): their older numbers get 422.
    pub retired: AtomicU64,
}

/// The ledger of one node's ingest over the embedded log.
pub struct Ledger {
    known: Mutex<Known>,
    bounds: Bounds,
    log: Arc<Log>,
    storage: Storage,
    /// The last snapshot written or read; the next one builds on it.
    snapshot: tokio::sync::Mutex<Snapshot>,
    /// The driver lease term whose snapshot was merged last.
    term: AtomicU64,
    pub counters: RequestCounters,
}

/// What [`Ledger::begin`] found for a request.
pub enum Begin {
    /// Not stored before: store it, then [`Claim::stored`].
    New(Claim),
    /// Stored in part before (a crash between its partitions' frames):
    /// store the parts not listed, then [`Claim::stored`].
    Resume(Claim, Vec<Part>),
    /// Stored whole before: these parts, nothing to store.
    Stored(Vec<Part>),
}

/// A request being handled; dropped without [`Claim::stored`], it is
/// forgotten (or left as the part stored before) and a waiting retry goes on.
pub struct Claim {
    ledger: Arc<Ledger>,
    id: RequestId,
    done: bool,
}

impl Claim {
    /// Records the parts now durable (all `expected` of them, or fewer
    /// after a partial failure).
    pub fn stored(mut self, parts: &[Part], expected: u16) {
        self.done = true;
        let now = now_ms();
        let mut known = self.ledger.known.lock().expect("ledger lock");
        let window = self.ledger.bounds.window;
        let p = known.producers.entry(self.id.producer.clone()).or_default();
        p.last_ms = p.last_ms.max(now);
        if let Some(e) = p.entries.get_mut(&self.id.sequence) {
            for &part in parts {
                e.add(part, expected);
            }
            e.busy = None;
        }
        p.entries
            .retain(|_, e| e.expected > 0 || e.busy.is_some() || !e.parts.is_empty());
        p.trim(window);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut known = self.ledger.known.lock().expect("ledger lock");
        if let Some(p) = known.producers.get_mut(&self.id.producer)
            && let Some(e) = p.entries.get_mut(&self.id.sequence)
        {
            e.busy = None;
            if e.parts.is_empty() {
                p.entries.remove(&self.id.sequence);
            }
        }
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn snapshot_path(term: u64) -> String {
    format!("{SNAPSHOT_DIR}/t{term:012}.json")
}

impl Ledger {
    pub fn new(log: Arc<Log>, storage: Storage, bounds: Bounds) -> Ledger {
        Ledger {
            known: Mutex::default(),
            bounds,
            log,
            storage,
            snapshot: tokio::sync::Mutex::new(Snapshot::default()),
            term: AtomicU64::new(0),
            counters: RequestCounters::default(),
        }
    }

    pub fn bounds(&self) -> Bounds {
        self.bounds
    }

    /// Producers known now.
    /// Producers with requests remembered now.
    pub fn producers(&self) -> usize {
        self.known.lock().expect("ledger lock").active()
    }

    /// The term whose snapshot was merged last.
    pub fn term(&self) -> u64 {
        self.term.load(Ordering::Acquire)
    }

    /// Reads the newest snapshot on the storage root (of the highest term)
    /// and the tags the log holds above it, and merges them into what the
    /// ledger knows: at startup, and when this node takes the driver lease
    /// (term `term`) before it acknowledges anything under it.
    pub async fn load(&self, term: u64) -> Result<(), RequestError> {
        let mut snap = self.snapshot.lock().await;
        let mut files = self.storage.list_files(SNAPSHOT_DIR).await?;
        files.sort();
        let mut read = Snapshot::default();
        if let Some(last) = files.iter().rev().find(|f| f.ends_with(".json")) {
            let rel = format!("{SNAPSHOT_DIR}/{last}");
            if let Some(bytes) = self.storage.get(&rel).await? {
                read = serde_json::from_slice(&bytes).map_err(|source| RequestError::Snapshot {
                    path: rel.clone(),
                    source,
                })?;
                if read.format != SNAPSHOT_FORMAT {
                    return Err(RequestError::SnapshotFormat {
                        path: rel,
                        format: read.format,
                    });
                }
            }
        }
        // What this node's snapshot already held, with the other's on top
        // (a copy: a failure below leaves the snapshot as it was).
        let mut merged = snap.clone();
        merged.known.merge(read.known);
        let partitions = self.log.partitions() as usize;
        merged.covers.resize(partitions.max(merged.covers.len()), 0);
        for (p, c) in read.covers.iter().enumerate() {
            if p < merged.covers.len() {
                merged.covers[p] = merged.covers[p].max(*c);
            }
        }
        merged.format = SNAPSHOT_FORMAT;
        merged.term = merged.term.max(term).max(read.term);
        // The log's tags above the snapshot.
        let mut from_log = Known::default();
        for p in 0..self.log.partitions() {
            let from = merged.covers.get(p as usize).copied().unwrap_or(0);
            for (t, ms) in self.tags(p, from, u64::MAX).await? {
                from_log.absorb(&t, ms);
            }
        }
        let mut known = self.known.lock().expect("ledger lock");
        known.merge(merged.known.clone());
        known.merge(from_log);
        let retired = known.trim(&self.bounds, now_ms());
        self.counters.retired.fetch_add(retired, Ordering::Relaxed);
        let (producers, entries) = (
            known.producers.len(),
            known
                .producers
                .values()
                .map(|p| p.entries.len())
                .sum::<usize>(),
        );
        drop(known);
        *snap = merged;
        self.term.store(term, Ordering::Release);
        tracing::info!(term, producers, requests = entries, "request ledger loaded");
        Ok(())
    }

    /// The tags of partition `p` in `[from, to)`, with their frames' ingest
    /// times (read off the async runtime).
    async fn tags(&self, p: u32, from: u64, to: u64) -> Result<Vec<(FrameTag, i64)>, RequestError> {
        let log = self.log.clone();
        tokio::task::spawn_blocking(move || log.tags(p, from, to))
            .await
            .map_err(|e| RequestError::Internal(e.to_string()))?
            .map(|tags| tags.into_iter().map(|t| (t.clone(), t.ingest_ms)).collect())
            .map_err(Into::into)
    }

    /// Writes the snapshot covering every tag below `upto` (the coverage a
    /// commit to the master dataset is about to reach), if a tag was added;
    /// called before the commit, so the log never drops a tag the snapshot
    /// lacks.
    pub async fn persist(&self, upto: &[(u32, u64)]) -> Result<(), RequestError> {
        let mut held = self.snapshot.lock().await;
        // Built on a copy and kept only once written: a failed write is
        // written again by the commit's retry, never skipped as done.
        let mut snap = held.clone();
        let mut added = false;
        let term = self.term();
        for &(p, to) in upto {
            let p_ = p as usize;
            if snap.covers.len() <= p_ {
                snap.covers.resize(p_ + 1, 0);
            }
            let from = snap.covers[p_];
            if to <= from {
                continue;
            }
            for (t, ms) in self.tags(p, from, to).await? {
                snap.known.absorb(&t, ms);
                added = true;
            }
            snap.covers[p_] = to;
        }
        if !added && snap.term == term {
            *held = snap;
            return Ok(());
        }
        snap.format = SNAPSHOT_FORMAT;
        snap.term = term;
        snap.known.trim(&self.bounds, now_ms());
        let bytes = serde_json::to_vec(&snap).expect("a snapshot serializes");
        self.storage
            .put(&snapshot_path(term), bytes::Bytes::from(bytes))
            .await?;
        *held = snap;
        // Older terms' snapshots are superseded by this one.
        for f in self.storage.list_files(SNAPSHOT_DIR).await? {
            if f.ends_with(".json") && f < format!("t{term:012}.json") {
                let _ = self.storage.delete(&format!("{SNAPSHOT_DIR}/{f}")).await;
            }
        }
        Ok(())
    }

    /// Looks request `id` with body digest `digest` up: stored before
    /// (whole or in part), new, or refused. A request in flight under the
    /// same identity is waited for.
    pub async fn begin(
        self: &Arc<Self>,
        id: &RequestId,
        digest: Digest,
    ) -> Result<Begin, RequestError> {
        self.counters.identified.fetch_add(1, Ordering::Relaxed);
        loop {
            let mut wait = {
                let mut known = self.known.lock().expect("ledger lock");
                let has_place = known
                    .producers
                    .get(&id.producer)
                    .is_some_and(|p| !p.entries.is_empty());
                if !has_place && known.active() >= self.bounds.max_producers {
                    let retired = known.trim(&self.bounds, now_ms());
                    self.counters.retired.fetch_add(retired, Ordering::Relaxed);
                    if known.active() >= self.bounds.max_producers {
                        if !known.retire_idlest() {
                            return Err(RequestError::TooManyProducers {
                                producer: id.producer.clone(),
                                known: known.active(),
                            });
                        }
                        self.counters.retired.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let p = known.producers.entry(id.producer.clone()).or_default();
                let claim = |ledger: &Arc<Ledger>| Claim {
                    ledger: ledger.clone(),
                    id: id.clone(),
                    done: false,
                };
                match p.entries.get_mut(&id.sequence) {
                    Some(e) if e.digest != digest => {
                        self.counters.changed.fetch_add(1, Ordering::Relaxed);
                        return Err(RequestError::Changed {
                            producer: id.producer.clone(),
                            sequence: id.sequence,
                        });
                    }
                    Some(e) if e.busy.is_some() => e.busy.as_ref().expect("busy").subscribe(),
                    Some(e) if e.complete() => {
                        self.counters.recognised.fetch_add(1, Ordering::Relaxed);
                        return Ok(Begin::Stored(e.parts.clone()));
                    }
                    Some(e) => {
                        e.busy = Some(Arc::new(watch::channel(()).0));
                        self.counters.completed.fetch_add(1, Ordering::Relaxed);
                        return Ok(Begin::Resume(claim(self), e.parts.clone()));
                    }
                    None if id.sequence < p.floor => {
                        self.counters.too_old.fetch_add(1, Ordering::Relaxed);
                        return Err(RequestError::TooOld {
                            producer: id.producer.clone(),
                            sequence: id.sequence,
                            floor: p.floor,
                        });
                    }
                    None => {
                        p.entries.insert(
                            id.sequence,
                            Entry {
                                digest,
                                expected: 0,
                                parts: Vec::new(),
                                busy: Some(Arc::new(watch::channel(()).0)),
                            },
                        );
                        return Ok(Begin::New(claim(self)));
                    }
                }
            };
            // The sender is dropped when the request in flight ends.
            let _ = wait.changed().await;
        }
    }
}

mod hex16 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(32);
        for b in d {
            out.push_str(&format!("{b:02x}"));
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 16], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 16];
        if s.len() != 32 {
            return Err(serde::de::Error::custom("a digest is 32 hex digits"));
        }
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(serde::de::Error::custom)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::log::LogOptions;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::record_batch::RecordBatch;

    fn batch(n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from_iter_values(0..n))]).unwrap()
    }

    fn id(producer: &str, sequence: u64) -> RequestId {
        RequestId {
            producer: producer.into(),
            sequence,
        }
    }

    struct Setup {
        _dir: tempfile::TempDir,
        data: std::path::PathBuf,
        storage: Storage,
    }

    impl Setup {
        fn new() -> Setup {
            let dir = tempfile::tempdir().unwrap();
            let data = dir.path().to_path_buf();
            let storage = Storage::local(&data).unwrap();
            Setup {
                _dir: dir,
                data,
                storage,
            }
        }

        fn log(&self) -> Arc<Log> {
            Arc::new(
                Log::open(
                    self.data.join("log"),
                    LogOptions {
                        segment_bytes: 512,
                        ..LogOptions::default()
                    },
                )
                .unwrap(),
            )
        }

        async fn ledger(&self, log: &Arc<Log>, window: usize) -> Arc<Ledger> {
            let l = Arc::new(Ledger::new(
                log.clone(),
                self.storage.clone(),
                Bounds {
                    window,
                    forget_after: Duration::from_secs(86_400),
                    max_producers: 3,
                },
            ));
            l.load(0).await.unwrap();
            l
        }
    }

    /// Stores a request of `events` events in `partitions` (one frame each)
    /// as ingest does: begin, append with the tag, record.
    async fn store(
        ledger: &Arc<Ledger>,
        log: &Log,
        rid: &RequestId,
        body: &[u8],
        partitions: &[u32],
    ) -> Result<Vec<Part>, RequestError> {
        let d = digest(body);
        let (claim, have) = match ledger.begin(rid, d).await? {
            Begin::Stored(parts) => return Ok(parts),
            Begin::New(c) => (c, vec![]),
            Begin::Resume(c, have) => (c, have),
        };
        let tag = Tag {
            id: rid.clone(),
            digest: d,
            parts: partitions.len() as u16,
        };
        let batches = partitions
            .iter()
            .filter(|p| !have.iter().any(|h| h.partition == **p))
            .map(|&p| (p, batch(3)))
            .collect();
        let acks = log.append_all(batches, Some(&tag.encode())).await.unwrap();
        let mut parts: Vec<Part> = acks
            .into_iter()
            .map(|a| {
                let a = a.unwrap();
                Part {
                    partition: a.partition,
                    first: a.first,
                    count: a.count,
                }
            })
            .collect();
        claim.stored(&parts, tag.parts);
        parts.extend(have);
        parts.sort_by_key(|p| p.partition);
        Ok(parts)
    }

    #[test]
    fn a_tag_reads_back_as_written_and_garbage_reads_as_none() {
        let t = Tag {
            id: id("producer-1", u64::MAX - 3),
            digest: digest(b"body"),
            parts: 2,
        };
        assert_eq!(Tag::decode(&t.encode()), Some(t.clone()));
        let enc = t.encode();
        for cut in 0..enc.len() {
            assert_eq!(Tag::decode(&enc[..cut]), None, "a tag cut at {cut} bytes");
        }
        assert_eq!(Tag::decode(b"\x02abc"), None, "an unknown tag version");
    }

    #[test]
    fn headers_are_both_or_neither_and_checked() {
        let ok = RequestId::from_headers(Some(b"p-1"), Some(b"42")).unwrap();
        assert_eq!(ok, Some(id("p-1", 42)));
        assert_eq!(RequestId::from_headers(None, None).unwrap(), None);
        for (p, s) in [
            (Some(&b"p"[..]), None),
            (None, Some(&b"1"[..])),
            (Some(b""), Some(b"1")),
            (Some(b"a b"), Some(b"1")),
            (Some(b"p"), Some(b"-1")),
            (Some(b"p"), Some(b"18446744073709551616")),
        ] {
            assert!(
                RequestId::from_headers(p, s).is_err(),
                "{p:?} {s:?} must be refused"
            );
        }
        let long = vec![b'x'; MAX_PRODUCER_LEN + 1];
        assert!(RequestId::from_headers(Some(&long), Some(b"1")).is_err());
    }

    #[tokio::test]
    async fn a_resent_request_gets_its_offsets_and_a_changed_one_is_refused() {
        let s = Setup::new();
        let log = s.log();
        let ledger = s.ledger(&log, 8).await;
        let first = store(&ledger, &log, &id("a", 1), b"one", &[0])
            .await
            .unwrap();
        let again = store(&ledger, &log, &id("a", 1), b"one", &[0])
            .await
            .unwrap();
        assert_eq!(
            first, again,
            "the re-sent request must answer with its offsets"
        );
        assert_eq!(log.end_offset(0).unwrap(), 3, "nothing stored twice");
        assert_eq!(ledger.counters.recognised.load(Ordering::Relaxed), 1);
        let changed = store(&ledger, &log, &id("a", 1), b"two", &[0]).await;
        assert!(
            matches!(changed, Err(RequestError::Changed { .. })),
            "same sequence, another body: {changed:?}"
        );
        // Another producer's sequence 1 is its own.
        store(&ledger, &log, &id("b", 1), b"one", &[0])
            .await
            .unwrap();
        assert_eq!(log.end_offset(0).unwrap(), 6);
    }

    #[tokio::test]
    async fn a_sequence_below_the_window_is_too_old_not_stored_again() {
        let s = Setup::new();
        let log = s.log();
        let ledger = s.ledger(&log, 4).await;
        for seq in 0..10 {
            store(
                &ledger,
                &log,
                &id("a", seq),
                format!("{seq}").as_bytes(),
                &[1],
            )
            .await
            .unwrap();
        }
        let end = log.end_offset(1).unwrap();
        // 6..10 remembered; 5 and below too old.
        let old = store(&ledger, &log, &id("a", 5), b"5", &[1]).await;
        assert!(
            matches!(old, Err(RequestError::TooOld { floor: 6, .. })),
            "{old:?}"
        );
        store(&ledger, &log, &id("a", 6), b"6", &[1]).await.unwrap();
        assert_eq!(
            log.end_offset(1).unwrap(),
            end,
            "6 is remembered: nothing stored"
        );
        // A new producer beyond the limit of 3 takes the idlest one's place.
        store(&ledger, &log, &id("b", 0), b"b", &[1]).await.unwrap();
        store(&ledger, &log, &id("c", 0), b"c", &[1]).await.unwrap();
        store(&ledger, &log, &id("d", 0), b"d", &[1]).await.unwrap();
        assert_eq!(ledger.producers(), 3);
    }

    #[tokio::test]
    async fn the_log_rebuilds_the_ledger_after_a_restart() {
        let s = Setup::new();
        let log = s.log();
        let ledger = s.ledger(&log, 8).await;
        let first = store(&ledger, &log, &id("a", 7), b"x", &[0, 1])
            .await
            .unwrap();
        drop(ledger);
        log.shutdown();
        drop(log);
        let log = s.log();
        let ledger = s.ledger(&log, 8).await;
        let again = store(&ledger, &log, &id("a", 7), b"x", &[0, 1])
            .await
            .unwrap();
        assert_eq!(first, again, "the tags in the log say where it was stored");
        assert_eq!(
            (log.end_offset(0).unwrap(), log.end_offset(1).unwrap()),
            (3, 3)
        );
    }

    #[tokio::test]
    async fn a_request_stored_in_part_stores_only_the_rest() {
        let s = Setup::new();
        let log = s.log();
        let ledger = s.ledger(&log, 8).await;
        // A crash after partition 0's frame, before partition 1's: only
        // the first frame of the two is in the log.
        let rid = id("a", 3);
        let tag = Tag {
            id: rid.clone(),
            digest: digest(b"x"),
            parts: 2,
        };
        log.append_all(vec![(0, batch(3))], Some(&tag.encode()))
            .await
            .unwrap();
        let ledger2 = {
            drop(ledger);
            s.ledger(&log, 8).await
        };
        let parts = store(&ledger2, &log, &rid, b"x", &[0, 1]).await.unwrap();
        assert_eq!(parts.len(), 2, "{parts:?}");
        assert_eq!(
            (log.end_offset(0).unwrap(), log.end_offset(1).unwrap()),
            (3, 3),
            "partition 0 was not written again"
        );
        assert_eq!(ledger2.counters.completed.load(Ordering::Relaxed), 1);
        let again = store(&ledger2, &log, &rid, b"x", &[0, 1]).await.unwrap();
        assert_eq!(parts, again);
    }

    #[tokio::test]
    async fn the_snapshot_keeps_what_retention_drops_from_the_log() {
        let s = Setup::new();
        let log = s.log();
        let ledger = s.ledger(&log, 64).await;
        let mut stored = Vec::new();
        for seq in 0..20 {
            stored.push(
                store(
                    &ledger,
                    &log,
                    &id("a", seq),
                    format!("{seq}").as_bytes(),
                    &[0],
                )
                .await
                .unwrap(),
            );
        }
        let end = log.end_offset(0).unwrap();
        // What a commit up to `end` does first, then retention below it.
        ledger.persist(&[(0, end)]).await.unwrap();
        let start = log.delete_below(0, end).unwrap();
        assert!(
            start > 0,
            "retention must have dropped segments for this test"
        );
        drop(ledger);
        let ledger = s.ledger(&log, 64).await;
        for seq in 0..20 {
            let again = store(
                &ledger,
                &log,
                &id("a", seq),
                format!("{seq}").as_bytes(),
                &[0],
            )
            .await
            .unwrap();
            assert_eq!(again, stored[seq as usize], "sequence {seq}");
        }
        assert_eq!(log.end_offset(0).unwrap(), end, "nothing stored twice");
        // Without the snapshot, the requests whose frames are gone are new.
        for f in s.storage.list_files(SNAPSHOT_DIR).await.unwrap() {
            s.storage
                .delete(&format!("{SNAPSHOT_DIR}/{f}"))
                .await
                .unwrap();
        }
        let bare = s.ledger(&log, 64).await;
        assert!(
            matches!(
                bare.begin(&id("a", 0), digest(b"0")).await.unwrap(),
                Begin::New(_)
            ),
            "the test must depend on the snapshot"
        );
    }

    #[tokio::test]
    async fn a_snapshot_write_that_failed_is_written_by_the_retry() {
        let s = Setup::new();
        let log = s.log();
        let ledger = s.ledger(&log, 64).await;
        for seq in 0..20 {
            store(
                &ledger,
                &log,
                &id("a", seq),
                format!("{seq}").as_bytes(),
                &[0],
            )
            .await
            .unwrap();
        }
        let end = log.end_offset(0).unwrap();
        // The store refuses the write: a file where the directory goes.
        let dir = s.data.join(SNAPSHOT_DIR);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        std::fs::write(&dir, b"in the way").unwrap();
        assert!(ledger.persist(&[(0, end)]).await.is_err());
        std::fs::remove_file(&dir).unwrap();
        // The commit's retry asks for the same coverage: it must write.
        ledger.persist(&[(0, end)]).await.unwrap();
        log.delete_below(0, end).unwrap();
        drop(ledger);
        let ledger = s.ledger(&log, 64).await;
        assert!(
            matches!(
                ledger.begin(&id("a", 3), digest(b"3")).await.unwrap(),
                Begin::Stored(_)
            ),
            "the retried write holds the tags the log dropped"
        );
    }

    #[tokio::test]
    async fn a_full_table_retires_the_idlest_producer_whose_old_numbers_then_get_422() {
        let s = Setup::new();
        let log = s.log();
        let ledger = s.ledger(&log, 8).await;
        for name in ["a", "b", "c"] {
            store(&ledger, &log, &id(name, 0), b"x", &[0])
                .await
                .unwrap();
            store(&ledger, &log, &id(name, 1), b"y", &[0])
                .await
                .unwrap();
        }
        ledger
            .known
            .lock()
            .unwrap()
            .producers
            .get_mut("b")
            .unwrap()
            .last_ms -= 60_000;
        let end = log.end_offset(0).unwrap();
        store(&ledger, &log, &id("d", 0), b"x", &[0]).await.unwrap();
        assert_eq!(ledger.counters.retired.load(Ordering::Relaxed), 1);
        assert_eq!(ledger.producers(), 3, "at most 3 with requests remembered");
        // b's re-send is refused as too old, never stored again; its next
        // number is stored.
        let old = store(&ledger, &log, &id("b", 1), b"y", &[0]).await;
        assert!(
            matches!(old, Err(RequestError::TooOld { floor: 2, .. })),
            "{old:?}"
        );
        assert_eq!(
            log.end_offset(0).unwrap(),
            end + 3,
            "only d's request stored"
        );
        // The limit holds across a restart: the snapshot keeps b retired.
        ledger
            .persist(&[(0, log.end_offset(0).unwrap())])
            .await
            .unwrap();
        drop(ledger);
        let ledger = s.ledger(&log, 8).await;
        assert!(
            ledger.producers() <= 3,
            "{} producers after a restart",
            ledger.producers()
        );
        // Which producer is retired after the restart may differ (the
        // snapshot knows the frames' times); b's number is never stored twice.
        let end = log.end_offset(0).unwrap();
        let _ = store(&ledger, &log, &id("b", 0), b"x", &[0]).await;
        assert_eq!(
            log.end_offset(0).unwrap(),
            end,
            "b's number 0 is not stored again"
        );
    }

    #[tokio::test]
    async fn a_retry_while_the_first_is_in_flight_waits_for_its_outcome() {
        let s = Setup::new();
        let log = s.log();
        let ledger = s.ledger(&log, 8).await;
        let rid = id("a", 1);
        let d = digest(b"x");
        let Begin::New(claim) = ledger.begin(&rid, d).await.unwrap() else {
            panic!("new")
        };
        let waiter = {
            let (ledger, rid) = (ledger.clone(), rid.clone());
            tokio::spawn(async move { ledger.begin(&rid, d).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "the retry waits for the first");
        let part = Part {
            partition: 0,
            first: 0,
            count: 1,
        };
        claim.stored(&[part], 1);
        match waiter.await.unwrap().unwrap() {
            Begin::Stored(parts) => assert_eq!(parts, vec![part]),
            _ => panic!("the retry must find the first one's parts"),
        }
        // A first attempt that failed leaves nothing: the retry is new.
        let Begin::New(claim) = ledger.begin(&id("a", 2), d).await.unwrap() else {
            panic!("new")
        };
        drop(claim);
        assert!(matches!(
            ledger.begin(&id("a", 2), d).await.unwrap(),
            Begin::New(_)
        ));
    }
}
