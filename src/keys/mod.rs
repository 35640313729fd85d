//! Event keys: which events are duplicates (`[schema] key`).
//!
//! With `key = { field = "event_id", within = "7d" }` an event is a
//! **duplicate** when an earlier event of its partition had the same key
//! within the horizon. Time is the partition's *clock*, the greatest stream
//! time of its events so far, so a record stamped out of order cannot move
//! it back:
//!
//! ```text
//!  c(o)     = max(stream time of p's events at offsets ≤ o)
//!  dup(o)  ⇔ ∃ o' < o in p:  key(o') = key(o)  ∧  c(o') ≥ c(o) − within
//! ```
//!
//! Every occurrence is "seen", duplicates too: a key sent every day is a
//! duplicate every day under a horizon of a week. The decision is a
//! function of the partition's records alone, so every node that reads a
//! partition decides the same, and so does a rebuild from the master
//! dataset. Duplicates are found **per partition**: the stream must be
//! partitioned by the key (HTTP ingest does it; Kafka and Kinesis producers
//! key their records by it).
//!
//! The index of keys seen ([`KeyIndex`], one per partition):
//!
//! ```text
//!          offsets:  ───── cold (< edge) ─────┬──── tail (edge ..) ────▶ next
//!  tail:   every occurrence since the edge, in memory (hash → latest offset, clock)
//!  cold:   fingerprints.rs  one 8-byte slot per key within the horizon (the filter)
//!          runs.rs          sorted runs on disk, grouped by epoch (within / 8) of
//!                           their keys' latest clock; an expired epoch is deleted whole
//! ```
//!
//! The edge moves up to the published batch coverage (everything below it is
//! in the master dataset, so the runs are a cache of it); a speed layer that
//! reads a stretch again (realigned on another node's chunks) rewinds the
//! tail, never the cold part.

pub mod fingerprints;
pub mod placement;
pub mod runs;

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Int32Type, Int64Type};
use serde::{Deserialize, Serialize};

use fingerprints::Fingerprints;
use runs::{Entry, Run};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key index: cannot use {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key index: run {path} is damaged ({why})")]
    BadRun { path: PathBuf, why: String },
    #[error(
        "key index of partition {partition}: offset {offset} is below {edge}, which it has moved past"
    )]
    Behind {
        partition: u32,
        offset: u64,
        edge: u64,
    },
    #[error("event keys: a key of type {0} cannot be hashed")]
    Type(DataType),
}

/// How keys are hashed: SipHash-2-4 with a 128-bit output, under a secret
/// of the node's. Keys are told apart by the hash alone: two of 100 M
/// collide with odds of 10⁻²³, and a producer that does not know the secret
/// cannot make two collide on purpose. The secret is the node's own (its
/// index is its own cache): an index made under another one is rebuilt.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyHasher {
    secret: [u8; 16],
}

impl std::fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyHasher({})", self.id())
    }
}

impl KeyHasher {
    pub fn new(secret: [u8; 16]) -> KeyHasher {
        KeyHasher { secret }
    }

    /// The secret under `dir` (`SECRET`), made on first use.
    pub fn load_or_create(dir: &Path) -> Result<KeyHasher, KeyError> {
        let path = dir.join("SECRET");
        let io = |source| KeyError::Io {
            path: path.clone(),
            source,
        };
        if let Ok(b) = std::fs::read(&path)
            && let Ok(secret) = <[u8; 16]>::try_from(b.as_slice())
        {
            return Ok(KeyHasher { secret });
        }
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut secret = [0u8; 16];
        use std::io::Read;
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut secret))
            .map_err(io)?;
        let tmp = dir.join("SECRET.tmp");
        std::fs::write(&tmp, secret).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(KeyHasher { secret })
    }

    /// A name for the secret (not the secret): what an index was made under.
    pub fn id(&self) -> String {
        blake3::hash(&self.secret).to_hex()[..16].to_string()
    }

    pub(crate) fn hash(&self, tag: u8, bytes: &[u8]) -> u128 {
        use siphasher::sip128::Hasher128;
        use std::hash::Hasher;
        let mut h = siphasher::sip128::SipHasher24::new_with_key(&self.secret);
        h.write_u8(tag);
        h.write(bytes);
        h.finish128().as_u128()
    }

    /// Each row's key hash; `None` for a null key (never a duplicate).
    pub fn column(&self, col: &ArrayRef) -> Result<Vec<Option<u128>>, KeyError> {
        fn each<A: Array>(a: &A, f: impl Fn(usize) -> u128) -> Vec<Option<u128>> {
            (0..a.len())
                .map(|i| (!a.is_null(i)).then(|| f(i)))
                .collect()
        }
        // Strings hash their bytes (tag 0), integers their value as 8 bytes (tag 1).
        Ok(match col.data_type() {
            DataType::Utf8 => {
                let a = col.as_string::<i32>();
                each(a, |i| self.hash(0, a.value(i).as_bytes()))
            }
            DataType::LargeUtf8 => {
                let a = col.as_string::<i64>();
                each(a, |i| self.hash(0, a.value(i).as_bytes()))
            }
            DataType::Utf8View => {
                let a = col.as_string_view();
                each(a, |i| self.hash(0, a.value(i).as_bytes()))
            }
            DataType::Int32 => {
                let a = col.as_primitive::<Int32Type>();
                each(a, |i| self.hash(1, &i64::from(a.value(i)).to_le_bytes()))
            }
            DataType::Int64 => {
                let a = col.as_primitive::<Int64Type>();
                each(a, |i| self.hash(1, &a.value(i).to_le_bytes()))
            }
            t => return Err(KeyError::Type(t.clone())),
        })
    }
}

/// The key types `[schema] key` accepts.
pub fn hashable(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Int32
            | DataType::Int64
    )
}

/// The rule's parameters (`[schema] key`).
pub use crate::schema::EventKey as KeyRule;

fn within_ms(rule: &KeyRule) -> i64 {
    rule.within.as_millis().clamp(1, i64::MAX as u128) as i64
}

/// The length of an epoch: an eighth of the horizon, at least a second.
fn epoch_ms(rule: &KeyRule) -> i64 {
    (within_ms(rule) / 8).max(1_000)
}

/// A hasher for keys that are hashes already: their low 64 bits.
#[derive(Default, Clone, Copy)]
struct Prehashed;

struct PrehashedHasher(u64);

impl Hasher for PrehashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

impl BuildHasher for Prehashed {
    type Hasher = PrehashedHasher;
    fn build_hasher(&self) -> PrehashedHasher {
        PrehashedHasher(0)
    }
}

/// One occurrence above the edge.
#[derive(Debug, Clone, Copy)]
struct Seen {
    offset: u64,
    hash: u128,
    clock: i64,
}

/// What the index keeps beside its runs, to reopen without the master dataset.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    partition: u32,
    /// What the keys are of: the key field's name and type.
    key: String,
    within_ms: i64,
    epoch_ms: i64,
    edge: u64,
    edge_clock: i64,
    next_run: u64,
    runs: Vec<ManifestRun>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ManifestRun {
    epoch: i64,
    name: String,
    count: u64,
}

/// A `latest` entry's memory: the hash, the offset and clock, a control
/// byte, and the free share of the table.
const LATEST_ENTRY_BYTES: usize = 40;

/// Entries a tail's buffers may keep beyond 8 × what they hold before they
/// give the memory back (a burst's peak is not kept for good).
const TAIL_SLACK: usize = 1 << 20;

const MANIFEST: &str = "MANIFEST.json";
const FORMAT: u32 = 1;

/// One partition's event keys, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyStats {
    /// Duplicates found since the process started (each counted by no view).
    pub duplicates: u64,
    /// Sampled keys (one in [`placement::SAMPLE`]) that came again in this
    /// partition after another partition had them within the horizon:
    /// duplicates the rule cannot find, so the stream is not keyed by the
    /// event key (see [`placement`]).
    #[serde(default)]
    pub strays: u64,
    pub index: IndexSize,
}

/// Sizes, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexSize {
    /// Keys within the horizon below the edge (one slot each).
    pub keys: u64,
    /// Occurrences above the edge, in memory.
    pub tail: u64,
    pub runs: u64,
    pub disk_bytes: u64,
    pub memory_bytes: u64,
}

/// The keys seen in one partition (see the module doc).
#[derive(Debug)]
pub struct KeyIndex {
    dir: PathBuf,
    partition: u32,
    key: String,
    within_ms: i64,
    epoch_ms: i64,
    /// Offsets below it are in the runs.
    edge: u64,
    /// The clock after the last occurrence below the edge.
    edge_clock: i64,
    /// Where the next occurrence may be (one past the last decided).
    next: u64,
    /// The clock after the last occurrence decided.
    clock: i64,
    tail: Vec<Seen>,
    latest: HashMap<u128, (u64, i64), Prehashed>,
    filter: Fingerprints,
    epochs: BTreeMap<i64, Vec<Run>>,
    next_run: u64,
}

impl KeyIndex {
    /// Opens partition `partition`'s index under `dir` (made if missing),
    /// of the keys `key` names (the field's name and type). What does not
    /// check out — another key or horizon, a damaged run — is thrown away:
    /// the index then starts empty at offset 0, and the caller feeds it the
    /// master dataset ([`KeyIndex::edge`] says from where).
    pub fn open(
        dir: &Path,
        partition: u32,
        rule: &KeyRule,
        key: &str,
    ) -> Result<KeyIndex, KeyError> {
        KeyIndex::open_noting(dir, partition, rule, key, &mut |_, _| {})
    }

    /// [`KeyIndex::open`], handing `note` each key it reads back from its
    /// runs, with its latest clock there.
    pub fn open_noting(
        dir: &Path,
        partition: u32,
        rule: &KeyRule,
        key: &str,
        note: &mut dyn FnMut(u128, i64),
    ) -> Result<KeyIndex, KeyError> {
        let dir = dir.join(format!("p{partition:04}"));
        std::fs::create_dir_all(&dir).map_err(|source| KeyError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut index = KeyIndex {
            dir: dir.clone(),
            partition,
            key: key.to_string(),
            within_ms: within_ms(rule),
            epoch_ms: epoch_ms(rule),
            edge: 0,
            edge_clock: i64::MIN,
            next: 0,
            clock: i64::MIN,
            tail: Vec::new(),
            latest: HashMap::with_hasher(Prehashed),
            filter: Fingerprints::default(),
            epochs: BTreeMap::new(),
            next_run: 0,
        };
        match index.load(note) {
            Ok(true) => {}
            Ok(false) => index.wipe()?,
            Err(e) => {
                tracing::warn!(partition, error = %crate::error::chain(&e), "the key index is rebuilt from the master dataset");
                index.wipe()?;
            }
        }
        Ok(index)
    }

    /// Reads the manifest and its runs; false when there is none or it is
    /// another rule's.
    fn load(&mut self, note: &mut dyn FnMut(u128, i64)) -> Result<bool, KeyError> {
        let path = self.dir.join(MANIFEST);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(source) => return Err(KeyError::Io { path, source }),
        };
        let Ok(m) = serde_json::from_slice::<Manifest>(&text) else {
            return Ok(false);
        };
        if m.format != FORMAT
            || m.partition != self.partition
            || m.key != self.key
            || m.within_ms != self.within_ms
            || m.epoch_ms != self.epoch_ms
        {
            return Ok(false);
        }
        for r in &m.runs {
            let epoch = fingerprints::short(r.epoch);
            let filter = &mut self.filter;
            let run = Run::open(&self.dir.join(&r.name), |e| {
                filter.insert(e.hash, epoch);
                note(e.hash, e.clock);
            })?;
            if run.count() != r.count {
                return Err(KeyError::BadRun {
                    path: run.path().to_path_buf(),
                    why: format!("{} entries, the manifest says {}", run.count(), r.count),
                });
            }
            self.epochs.entry(r.epoch).or_default().push(run);
        }
        self.edge = m.edge;
        self.edge_clock = m.edge_clock;
        self.next = m.edge;
        self.clock = m.edge_clock;
        self.next_run = m.next_run;
        // What a crash left between writing a run and naming it (or
        // between a merge and deleting its parts) is no one's.
        let named: std::collections::HashSet<&str> =
            m.runs.iter().map(|r| r.name.as_str()).collect();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name != MANIFEST && !named.contains(name.as_ref()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Ok(true)
    }

    /// Empties the index and its directory.
    fn wipe(&mut self) -> Result<(), KeyError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| KeyError::Io { path, source }
        };
        for e in std::fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let e = e.map_err(io(&self.dir))?;
            std::fs::remove_file(e.path()).map_err(io(&e.path()))?;
        }
        self.edge = 0;
        self.edge_clock = i64::MIN;
        self.next = 0;
        self.clock = i64::MIN;
        self.tail.clear();
        self.latest.clear();
        self.filter = Fingerprints::default();
        self.epochs.clear();
        Ok(())
    }

    /// The partition's clock (ms): the greatest stream time decided yet.
    pub fn clock(&self) -> i64 {
        self.clock
    }

    /// Offsets below it are in the runs (the master dataset's, up to the
    /// published coverage).
    pub fn edge(&self) -> u64 {
        self.edge
    }

    /// One past the last occurrence decided.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// Decides the occurrence of `hash` at `offset` with stream time `time_ms`
    /// (offsets rise), and records it: true when it is a duplicate.
    /// Fetches what deciding `hash` will read (see
    /// [`Fingerprints::prefetch`]): call it a few keys ahead.
    #[inline]
    pub fn prefetch(&self, hash: u128) {
        self.filter.prefetch(hash);
    }

    pub fn decide(&mut self, offset: u64, hash: u128, time_ms: i64) -> Result<bool, KeyError> {
        if offset < self.next {
            return Err(KeyError::Behind {
                partition: self.partition,
                offset,
                edge: self.next,
            });
        }
        let clock = self.clock.max(time_ms);
        self.clock = clock;
        let since = clock.saturating_sub(self.within_ms);
        // One probe of the filter, which holds the tail's keys too: a key
        // never seen (the common case) costs nothing more.
        let epoch = fingerprints::short(clock.div_euclid(self.epoch_ms));
        let dup = match self.filter.upsert(hash, epoch) {
            None => false,
            Some(before) => match self.latest.get(&hash) {
                Some(&(_, c)) => c >= since,
                // An occurrence in the tail is later than any below the edge.
                None => self.cold(hash, before)?.is_some_and(|c| c >= since),
            },
        };
        self.tail.push(Seen {
            offset,
            hash,
            clock,
        });
        self.latest.insert(hash, (offset, clock));
        self.next = offset + 1;
        Ok(dup)
    }

    /// The clock of `hash`'s latest occurrence below the edge, if it is
    /// within the horizon's epochs; the filter said `epoch`. A slot left by
    /// a rewound occurrence, or shared with another key, finds nothing
    /// there and sends the search through every epoch: a hit is only ever
    /// confirmed by the runs.
    fn cold(&self, hash: u128, epoch: u16) -> Result<Option<i64>, KeyError> {
        // Most likely in the epoch the filter names, newest run first; a
        // fingerprint two keys share sends the search through every epoch.
        let named = self
            .epochs
            .iter()
            .rev()
            .filter(|(e, _)| fingerprints::short(**e) == epoch);
        let others = self
            .epochs
            .iter()
            .rev()
            .filter(|(e, _)| fingerprints::short(**e) != epoch);
        for (_, runs) in named.chain(others) {
            for r in runs.iter().rev() {
                if let Some(c) = r.get(hash)? {
                    return Ok(Some(c));
                }
            }
        }
        Ok(None)
    }

    /// Moves on to `offset` with nothing decided in between (positions
    /// without a record, or records without a key).
    pub fn advance_to(&mut self, offset: u64) {
        self.next = self.next.max(offset);
    }

    /// Goes back to `offset` (at or above the edge): occurrences from it on
    /// are forgotten, to be decided again.
    pub fn rewind(&mut self, offset: u64) -> Result<(), KeyError> {
        if offset < self.edge {
            return Err(KeyError::Behind {
                partition: self.partition,
                offset,
                edge: self.edge,
            });
        }
        if offset >= self.next {
            return Ok(());
        }
        let keep = self.tail.partition_point(|s| s.offset < offset);
        self.tail.truncate(keep);
        self.latest.clear();
        for s in &self.tail {
            self.latest.insert(s.hash, (s.offset, s.clock));
        }
        self.clock = self.tail.last().map_or(self.edge_clock, |s| s.clock);
        self.next = offset;
        Ok(())
    }

    /// Moves the occurrences below `offset` (at most [`KeyIndex::next`]) to
    /// the runs: the published coverage reached it. Epochs past the
    /// horizon are deleted.
    pub fn settle(&mut self, offset: u64) -> Result<(), KeyError> {
        let offset = offset.min(self.next);
        if offset <= self.edge {
            return Ok(());
        }
        let n = self.tail.partition_point(|s| s.offset < offset);
        if let Some(last) = n.checked_sub(1).map(|i| &self.tail[i]) {
            self.edge_clock = last.clock;
        }
        // Each key once, at its latest occurrence among those moved (so a
        // run never holds a key's older epoch): sorted by key, the latest
        // clock kept (clocks only grow with the offset).
        let mut last: Vec<Entry> = self
            .tail
            .drain(..n)
            .map(|s| Entry {
                hash: s.hash,
                clock: s.clock,
            })
            .collect();
        last.sort_unstable_by_key(|e| e.hash);
        last.dedup_by(|later, kept| {
            let same = later.hash == kept.hash;
            if same {
                kept.clock = kept.clock.max(later.clock);
            }
            same
        });
        self.edge = offset;
        // A key whose latest occurrence moved is found in the runs now.
        self.latest.retain(|_, &mut (at, _)| at >= offset);
        if self.tail.capacity() > 8 * self.tail.len() + TAIL_SLACK {
            self.tail.shrink_to(2 * self.tail.len());
        }
        if self.latest.capacity() > 8 * self.latest.len() + TAIL_SLACK {
            self.latest.shrink_to(2 * self.latest.len());
        }
        // By the epoch of its clock; one whose epoch has passed the horizon
        // already is not written, and its slot goes (unless the tail has
        // it again).
        let since = self.edge_clock.saturating_sub(self.within_ms);
        // The epochs past the horizon go first; a key moved now keeps its slot.
        self.expire(&last)?;
        let mut by_epoch: BTreeMap<i64, Vec<Entry>> = BTreeMap::new();
        for Entry { hash, clock } in last {
            let epoch = clock.div_euclid(self.epoch_ms);
            if (epoch + 1).saturating_mul(self.epoch_ms) <= since {
                if !self.latest.contains_key(&hash) {
                    self.filter.remove_if(hash, fingerprints::short(epoch));
                }
                continue;
            }
            // In key order, as `last` is: a run's order.
            by_epoch
                .entry(epoch)
                .or_default()
                .push(Entry { hash, clock });
        }
        for (epoch, entries) in by_epoch {
            debug_assert!(entries.is_sorted());
            let name = self.run_name(epoch);
            // The filter has these keys since they were decided.
            let run = Run::write(&self.dir.join(&name), &entries)?;
            self.epochs.entry(epoch).or_default().push(run);
            self.compact(epoch)?;
        }
        self.save()
    }

    fn run_name(&mut self, epoch: i64) -> String {
        self.next_run += 1;
        format!("e{epoch}-{:012}.run", self.next_run)
    }

    /// Keeps an epoch's runs few: the newest two merge while the newer is
    /// at least half the older (each key is merged O(log n) times).
    fn compact(&mut self, epoch: i64) -> Result<(), KeyError> {
        loop {
            let runs = self.epochs.get(&epoch).expect("the epoch has runs");
            let n = runs.len();
            if n < 2 || runs[n - 1].count() * 2 < runs[n - 2].count() {
                return Ok(());
            }
            let name = self.run_name(epoch);
            let runs = self.epochs.get_mut(&epoch).expect("the epoch has runs");
            let pair: Vec<Run> = runs.drain(n - 2..).collect();
            let merged = Run::merge(&pair, &self.dir.join(&name))?;
            runs.push(merged);
            // The manifest names the merged run before the parts go.
            self.save()?;
            for r in pair {
                let _ = std::fs::remove_file(r.path());
            }
        }
    }

    /// Deletes the epochs whose every key's latest clock is past the
    /// horizon, and their keys' slots — but for keys occurring again in
    /// the tail or in `moving` (about to be written to a later epoch's
    /// run). That is what keeps 16 bits of epoch enough: a slot holds either
    /// a key's epoch within the horizon of the edge (runs are written and
    /// expired together, at most `within / epoch + 1` epochs apart), or one
    /// of the tail's, and the tail's keys are never removed here.
    fn expire(&mut self, moving: &[Entry]) -> Result<(), KeyError> {
        let since = self.edge_clock.saturating_sub(self.within_ms);
        while let Some((&epoch, _)) = self.epochs.first_key_value() {
            let end = (epoch + 1).saturating_mul(self.epoch_ms);
            if end > since {
                return Ok(());
            }
            let runs = self.epochs.remove(&epoch).expect("first epoch");
            // A key the tail holds again keeps its slot (whatever its
            // epoch's last 16 bits are).
            let e16 = fingerprints::short(epoch);
            for r in &runs {
                let (filter, tail) = (&mut self.filter, &self.latest);
                r.scan(|e| {
                    if !tail.contains_key(&e.hash)
                        && moving.binary_search_by_key(&e.hash, |m| m.hash).is_err()
                    {
                        filter.remove_if(e.hash, e16)
                    }
                })?;
            }
            self.save()?;
            for r in runs {
                let _ = std::fs::remove_file(r.path());
            }
        }
        Ok(())
    }

    fn save(&self) -> Result<(), KeyError> {
        let m = Manifest {
            format: FORMAT,
            partition: self.partition,
            key: self.key.clone(),
            within_ms: self.within_ms,
            epoch_ms: self.epoch_ms,
            edge: self.edge,
            edge_clock: self.edge_clock,
            next_run: self.next_run,
            runs: self
                .epochs
                .iter()
                .flat_map(|(&epoch, runs)| {
                    runs.iter().map(move |r| ManifestRun {
                        epoch,
                        name: r
                            .path()
                            .file_name()
                            .and_then(|n| n.to_str())
                            .unwrap_or_default()
                            .to_string(),
                        count: r.count(),
                    })
                })
                .collect(),
        };
        let path = self.dir.join(MANIFEST);
        let tmp = self.dir.join("MANIFEST.tmp");
        let io = |p: &Path| {
            let path = p.to_path_buf();
            move |source| KeyError::Io { path, source }
        };
        std::fs::write(&tmp, serde_json::to_vec(&m).expect("a manifest serializes"))
            .map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))
    }

    /// Memory of what lies above the edge (the tail and its map): it grows
    /// with the realtime window, and counts against ingest's bound on it.
    pub fn window_bytes(&self) -> u64 {
        (self.tail.len() * std::mem::size_of::<Seen>() + self.latest.len() * LATEST_ENTRY_BYTES)
            as u64
    }

    /// Its sizes now.
    pub fn size(&self) -> IndexSize {
        let runs: Vec<&Run> = self.epochs.values().flatten().collect();
        IndexSize {
            keys: self.filter.len() as u64,
            tail: self.tail.len() as u64,
            runs: runs.len() as u64,
            disk_bytes: runs.iter().map(|r| 20 + 24 * r.count()).sum(),
            memory_bytes: (self.filter.bytes()
                + runs.iter().map(|r| r.memory()).sum::<usize>()
                + self.tail.capacity() * std::mem::size_of::<Seen>()
                + self.latest.capacity() * LATEST_ENTRY_BYTES) as u64,
        }
    }
}

#[cfg(test)]
mod tests;

/// One event of the master dataset, as the key index reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyRow {
    pub offset: u64,
    /// `None`: a null key (a file another engine wrote).
    pub hash: Option<u128>,
    pub time_ms: i64,
}

/// Where an index that is behind reads the events it lacks: the master
/// dataset (everything below the published coverage is in it).
#[async_trait::async_trait]
pub trait History: Send + Sync {
    /// The duplicates the master dataset records among partition `p`'s
    /// committed events in `[start, end)` (none where it records none).
    async fn recorded(&self, p: u32, start: u64, end: u64) -> Result<Vec<u64>, String>;

    /// Partition `p`'s events in `[from, to)`, in offset order, their keys
    /// hashed by `hasher`.
    async fn keys(
        &self,
        p: u32,
        from: u64,
        to: u64,
        hasher: &KeyHasher,
    ) -> Result<Vec<KeyRow>, String>;
}

/// The duplicates found above the published coverage, per partition: the
/// speed layer records them as it decides, the archiver writes them in
/// `_duplicate`, a view built meanwhile leaves them out.
#[derive(Debug, Default)]
pub struct Duplicates {
    parts: std::sync::Mutex<Vec<std::collections::BTreeSet<u64>>>,
    /// Per partition, duplicates found since the process started.
    found: std::sync::Mutex<Vec<u64>>,
}

impl Duplicates {
    /// Records the duplicates at `offsets` of partition `p` (deciding a
    /// stretch again records the same ones: they are counted once).
    pub fn record(&self, p: u32, offsets: &[u64]) {
        if offsets.is_empty() {
            return;
        }
        let p = p as usize;
        let mut parts = self.parts.lock().expect("duplicates lock");
        if parts.len() <= p {
            parts.resize_with(p + 1, Default::default);
        }
        let new = offsets.iter().filter(|&&o| parts[p].insert(o)).count() as u64;
        drop(parts);
        let mut found = self.found.lock().expect("duplicates lock");
        if found.len() <= p {
            found.resize(p + 1, 0);
        }
        found[p] += new;
    }

    /// The duplicates of partition `p` in `[start, end)`, in order.
    pub fn within(&self, p: u32, start: u64, end: u64) -> Vec<u64> {
        let parts = self.parts.lock().expect("duplicates lock");
        parts
            .get(p as usize)
            .map(|s| s.range(start..end).copied().collect())
            .unwrap_or_default()
    }

    /// Records duplicates decided before (the master dataset's, for a
    /// committed chunk read again), without counting them as found.
    pub fn record_known(&self, p: u32, offsets: &[u64]) {
        let p = p as usize;
        let mut parts = self.parts.lock().expect("duplicates lock");
        if parts.len() <= p {
            parts.resize_with(p + 1, Default::default);
        }
        parts[p].extend(offsets.iter().copied());
    }

    /// Forgets those below `h` (published: the master dataset has them).
    pub fn forget_below(&self, p: u32, h: u64) {
        let mut parts = self.parts.lock().expect("duplicates lock");
        if let Some(s) = parts.get_mut(p as usize) {
            *s = s.split_off(&h);
        }
    }

    /// Per partition, the duplicates found since the process started.
    pub fn found(&self) -> Vec<u64> {
        self.found.lock().expect("duplicates lock").clone()
    }
}
