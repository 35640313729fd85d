//! The serving layer: one consistent snapshot of batch views and realtime
//! chunks, swapped atomically, merged per read.
//!
//! ```text
//!  Snapshot { batch: run R with coverage H,        realtime: per partition p,
//!             states of every view }                chunks [start, end) with start ≥ H[p],
//!                                                   contiguous up to the high-water mark R[p]
//!  read(view) = finalize( batch states ⊕ rollup(realtime chunk states) )
//! ```
//!
//! Writers (the speed loop after each micro-batch, the batch loop after each
//! publish) build a new snapshot under one lock and store it with one atomic
//! pointer swap; readers load the pointer and never see half of a change.
//! When a batch run is installed, chunks with `end ≤ H[p]` leave the snapshot
//! in the same swap that brings the run in: each chunk is on exactly one side
//! at every instant. The merged rows of a view are computed once per snapshot
//! version and shared by every reader of that version.

pub mod bounded;
pub mod index;
pub mod pool;
pub mod query;

use crate::clock::{SharedClock, SystemClock};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use arrow::record_batch::RecordBatch;
use serde::Serialize;

use crate::chunk::{self, ChunkRange, Coverage};
use crate::runs::{Manifest, RunStore, RunsError};
use crate::view::{View, ViewError};
use index::{KeyIndex, KeyProbe};

/// One realtime chunk of one partition: states per view of the events of its range.
#[derive(Debug, Clone)]
pub struct RealtimeChunk {
    pub range: ChunkRange,
    /// Closed chunks no longer grow (they are, or are being, archived).
    pub closed: bool,
    /// Per view (in view order): state batches whose merge is the chunk's states.
    pub states: Vec<Vec<RecordBatch>>,
    /// Key indexes of large state batches, by (view, batch, column), built in
    /// the background after the first point read that needs one; shared by
    /// the versions of a growing chunk whose batches did not change.
    pub indexes: ChunkIndexes,
}

impl chunk::Ranged for RealtimeChunk {
    fn range(&self) -> ChunkRange {
        self.range
    }
}

/// Key indexes of one chunk's state batches (`None`: being built).
pub type ChunkIndexes = Arc<Mutex<HashMap<(usize, usize, usize), Option<Arc<KeyIndex>>>>>;

/// A state batch a point read finds unindexed is indexed on the read path
/// up to this many rows; a larger one is scanned while it is indexed in the
/// background.
const INDEX_ROWS: usize = 4096;

impl RealtimeChunk {
    /// Indexes every state batch of view `i` by column `col` that is not
    /// indexed yet. The versions of a growing chunk share their indexes, so
    /// each batch is indexed once.
    fn index(&self, i: usize, col: usize) {
        let Some(states) = self.states.get(i) else {
            return;
        };
        let mut all = self.indexes.lock().expect("chunk index lock");
        for (j, s) in states.iter().enumerate() {
            if col < s.num_columns()
                && !all.contains_key(&(i, j, col))
                && let Ok(x) = KeyIndex::build(s, col)
            {
                all.insert((i, j, col), Some(Arc::new(x)));
            }
        }
    }

    /// Per state batch of view `i` (by number): the rows whose column `col`
    /// equals the key of `probe`, for the batches that have any.
    fn matching(
        &self,
        i: usize,
        col: usize,
        probe: &KeyProbe,
    ) -> Result<Vec<(usize, Vec<u32>)>, arrow::error::ArrowError> {
        let mut out = Vec::new();
        let Some(states) = self.states.get(i) else {
            return Ok(out);
        };
        let mut all = self.indexes.lock().expect("chunk index lock");
        for (j, s) in states.iter().enumerate() {
            let rows = match all.get(&(i, j, col)) {
                Some(Some(index)) => index.lookup(probe),
                // Being built in the background: scan meanwhile.
                Some(None) => scan(s, col, probe)?,
                // Not indexed (the first reads of a column, before the speed
                // layer's next install indexes it): a small batch is indexed
                // now, a large one off the read path.
                None if s.num_rows() <= INDEX_ROWS => {
                    let index = Arc::new(KeyIndex::build(s, col)?);
                    let rows = index.lookup(probe);
                    all.insert((i, j, col), Some(index));
                    rows
                }
                None => {
                    all.insert((i, j, col), None);
                    let batch = s.clone();
                    let indexes = self.indexes.clone();
                    tokio::task::spawn_blocking(move || {
                        if let Ok(x) = KeyIndex::build(&batch, col) {
                            indexes
                                .lock()
                                .expect("chunk index lock")
                                .insert((i, j, col), Some(Arc::new(x)));
                        }
                    });
                    scan(s, col, probe)?
                }
            };
            if !rows.is_empty() {
                out.push((j, rows));
            }
        }
        Ok(out)
    }
}

/// Row numbers of `s` whose column `col` equals the key of `probe`, by a
/// scan. A null key's slot holds a value (0, "", false) that its equality
/// mask marks null, not false: those rows are not the key's.
fn scan(
    s: &RecordBatch,
    col: usize,
    probe: &KeyProbe,
) -> Result<Vec<u32>, arrow::error::ArrowError> {
    let mask = arrow::compute::kernels::cmp::eq(
        &index::canonical(s.column(col)),
        &arrow::array::Scalar::new(probe.key.clone()),
    )?;
    let mask = match arrow::array::Array::nulls(&mask) {
        Some(_) => arrow::compute::prep_null_mask_filter(&mask),
        None => mask,
    };
    Ok(mask.values().set_indices().map(|r| r as u32).collect())
}

/// The published batch run, loaded.
#[derive(Debug)]
pub struct BatchSide {
    pub manifest: Manifest,
    /// Per view (in view order): the run's states.
    pub states: Vec<RecordBatch>,
    /// Per (view, state column): key → rows, for point reads.
    key_indexes: Mutex<HashMap<(usize, usize), Arc<KeyIndex>>>,
}

impl BatchSide {
    pub fn new(manifest: Manifest, states: Vec<RecordBatch>) -> BatchSide {
        BatchSide {
            manifest,
            states,
            key_indexes: Mutex::new(HashMap::new()),
        }
    }

    /// Loads a published run's states, every file verified by its checksum.
    /// Key indexes are built on a point read's first need; those in `warm`
    /// (the ones the previous run was read by) are built now, so readers by
    /// key do not pay for them after every publish and nobody pays for an
    /// index no one reads.
    pub async fn load(
        runs: &RunStore,
        manifest: Manifest,
        views: &[Arc<View>],
        live: &[usize],
        warm: &[(usize, usize)],
    ) -> Result<BatchSide, RunsError> {
        let mut states = Vec::with_capacity(views.len());
        for (i, v) in views.iter().enumerate() {
            states.push(if live.contains(&i) {
                runs.read_states(&manifest, v).await?
            } else {
                RecordBatch::new_empty(v.state_schema().clone())
            });
        }
        let side = BatchSide::new(manifest, states);
        for &(view, col) in warm {
            if view < side.states.len() && col < side.states[view].num_columns() {
                let _ = side.key_index(view, col);
            }
        }
        Ok(side)
    }

    /// The (view, column) pairs a point read has indexed.
    pub fn indexed(&self) -> Vec<(usize, usize)> {
        self.key_indexes
            .lock()
            .expect("index lock")
            .keys()
            .copied()
            .collect()
    }

    fn key_index(
        &self,
        view: usize,
        col: usize,
    ) -> Result<Arc<KeyIndex>, arrow::error::ArrowError> {
        if let Some(i) = self
            .key_indexes
            .lock()
            .expect("index lock")
            .get(&(view, col))
        {
            return Ok(i.clone());
        }
        let built = Arc::new(KeyIndex::build(&self.states[view], col)?);
        self.key_indexes
            .lock()
            .expect("index lock")
            .insert((view, col), built.clone());
        Ok(built)
    }
}

/// A new set of views and the batch run that computed them, from the
/// driver to the speed layer, to install in serving in one swap
/// ([`Serving::adopt`]): the message that lets the driver change views
/// without knowing the speed layer (`node.rs` wires the channel). The speed layer first computes the states of the
/// views it does not have yet for every chunk it holds (reading the chunks'
/// records from the stream again), so that the handoff is exact for them
/// from their first answer.
pub struct Adopt {
    /// Every view by index ([`Serving::plan_views`]).
    pub views: Vec<Arc<View>>,
    /// Those served, in order.
    pub live: Vec<usize>,
    pub side: Arc<BatchSide>,
    /// Told when serving has the new views, or why not.
    pub done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// What a reader sees: immutable, replaced whole.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Increases with every change.
    pub version: u64,
    pub batch: Option<Arc<BatchSide>>,
    /// Per partition, ordered by start: exactly the chunks with start ≥ H[p].
    pub realtime: Vec<Vec<Arc<RealtimeChunk>>>,
    /// Per partition: the realtime high-water mark R[p] (events below it are in the answer).
    pub realtime_end: Vec<u64>,
    /// Per partition: when R[p] last advanced (ms since the epoch).
    pub realtime_at_ms: Vec<i64>,
    /// The views served, in order, as indexes into [`Serving::views`].
    pub live: Arc<Vec<usize>>,
}

impl Snapshot {
    /// Batch coverage H, one entry per partition the snapshot knows (zeros
    /// before the first run, and for partitions the stream gained after it).
    pub fn h(&self) -> Coverage {
        let h = match &self.batch {
            Some(b) => b.manifest.h.clone(),
            None => Coverage::empty(),
        };
        h.widened(self.realtime_end.len() as u32)
    }

    /// Installs the realtime chunks of some partitions, each aligned on the
    /// snapshot's H (chunks it covers left out); `now` is when R moved.
    fn install(&mut self, parts: Vec<(u32, Vec<Arc<RealtimeChunk>>, u64)>, now: i64) {
        if let Some(max) = parts.iter().map(|(p, ..)| *p as usize + 1).max() {
            self.grow(max);
        }
        let h = self.h();
        for (p, chunks, end) in parts {
            let p = p as usize;
            let (chunks, end) = chunk::align(chunks, end, h.get(p as u32));
            self.realtime[p] = chunks;
            if end != self.realtime_end[p] {
                self.realtime_at_ms[p] = now;
            }
            self.realtime_end[p] = end;
        }
    }

    /// Makes room for partitions `0..n` (a topic gained partitions, a
    /// Kinesis shard split): a new partition starts empty at 0.
    fn grow(&mut self, n: usize) {
        if self.realtime.len() < n {
            self.realtime.resize_with(n, Vec::new);
            self.realtime_end.resize(n, 0);
            self.realtime_at_ms.resize(n, 0);
        }
    }

    /// Checks the handoff invariant: per partition, the chunks start at H[p]
    /// and are contiguous up to R[p]. A violation means an answer would count
    /// events twice or miss them, so it is reported, never served.
    pub fn check(&self) -> Result<(), String> {
        let h = self.h();
        for (p, chunks) in self.realtime.iter().enumerate() {
            chunk::check_contiguous(p as u32, h.get(p as u32), chunks, self.realtime_end[p])?;
        }
        Ok(())
    }
}

/// Which events an answer holds and how fresh they are.
#[derive(Debug, Clone, Serialize)]
pub struct Freshness {
    /// The batch run merged in, if any.
    pub run: Option<u64>,
    /// The version of the view answered: its fingerprint (SQL, rollup,
    /// schema and engine). An answer is exact for this version.
    pub fingerprint: String,
    /// A past run's batch view alone (`?as_of=`): no realtime part.
    pub time_travel: bool,
    /// The master dataset version the batch run read.
    pub table_version: Option<i64>,
    /// Batch coverage H[p].
    pub h: Coverage,
    /// Realtime high-water marks R[p]: the answer is the view over every
    /// event of partition p with offset < R[p].
    pub realtime: Coverage,
    /// When the batch run read the master dataset (ms since the epoch).
    pub batch_as_of_ms: Option<i64>,
    pub batch_age_ms: Option<i64>,
    /// Time since the realtime high-water mark last advanced.
    pub realtime_age_ms: i64,
    pub snapshot: u64,
}

/// Displayed value → (batch, row) positions, for one column.
type ColumnIndex = HashMap<String, Vec<(usize, usize)>>;

/// A view's merged rows for one snapshot version.
#[derive(Debug)]
pub struct Answer {
    pub rows: Vec<RecordBatch>,
    pub freshness: Freshness,
    /// When this answer was computed.
    pub computed_at: std::time::Instant,
    /// Per column, built on the first lookup of that column.
    index: Mutex<HashMap<String, Arc<ColumnIndex>>>,
}

impl Answer {
    /// Rows whose column `col` displays as `value`: (batch, row) pairs;
    /// `None` if there is no such column. A filter's value goes through
    /// [`filter_text`] first, so it compares as the column's type.
    pub fn lookup(&self, col: &str, value: &str) -> Option<Vec<(usize, usize)>> {
        let index = {
            let mut all = self.index.lock().expect("index lock");
            match all.get(col) {
                Some(i) => i.clone(),
                None => {
                    let i = Arc::new(build_index(&self.rows, col)?);
                    all.insert(col.to_string(), i.clone());
                    i
                }
            }
        };
        Some(index.get(value).cloned().unwrap_or_default())
    }
}

fn build_index(rows: &[RecordBatch], col: &str) -> Option<ColumnIndex> {
    use arrow::util::display::{ArrayFormatter, FormatOptions};
    let mut out: ColumnIndex = HashMap::new();
    let opts = FormatOptions::default();
    for (bi, b) in rows.iter().enumerate() {
        let ci = b.schema().index_of(col).ok()?;
        let fmt = ArrayFormatter::try_new(b.column(ci).as_ref(), &opts).ok()?;
        for r in 0..b.num_rows() {
            out.entry(fmt.value(r).to_string())
                .or_default()
                .push((bi, r));
        }
    }
    Some(out)
}

/// A `?COL=VAL` filter's value as [`Answer::lookup`] finds it: the text
/// cast to the column's type (as a key lookup, [`Serving::point`], casts it),
/// then displayed as the column's values are. One meaning on every path
/// (key or not, now or time travel): `zipcode=090404` finds the zipcode
/// 90404, `minute=2014-11-01 19:35:00` the minute `2014-11-01T19:35:00`. A
/// value that does not cast is [`ServingError::BadFilter`].
pub fn filter_text(
    column: &str,
    value: &str,
    ty: &arrow::datatypes::DataType,
) -> Result<String, ServingError> {
    use arrow::array::{Array, ArrayRef, StringArray};
    use arrow::compute::{CastOptions, cast_with_options};
    use arrow::util::display::{ArrayFormatter, FormatOptions};
    let bad = || ServingError::BadFilter {
        column: column.to_string(),
        value: value.to_string(),
        ty: ty.to_string(),
    };
    let text: ArrayRef = Arc::new(StringArray::from(vec![value]));
    let opts = CastOptions {
        safe: false,
        ..CastOptions::default()
    };
    let typed = cast_with_options(&text, ty, &opts).map_err(|_| bad())?;
    if typed.is_null(0) {
        return Err(bad());
    }
    let fmt =
        ArrayFormatter::try_new(typed.as_ref(), &FormatOptions::default()).map_err(|_| bad())?;
    Ok(fmt.value(0).to_string())
}

impl Freshness {
    /// The same, naming the version of `view` answered.
    fn of(mut self, view: &View) -> Freshness {
        self.fingerprint = view.fingerprint().to_string();
        self
    }
}

/// Which events an answer over `snap` holds.
pub(crate) fn freshness(snap: &Snapshot) -> Freshness {
    let now = chrono::Utc::now().timestamp_millis();
    let as_of = snap.batch.as_ref().map(|b| b.manifest.as_of_ms);
    Freshness {
        run: snap.batch.as_ref().map(|b| b.manifest.run),
        fingerprint: String::new(),
        time_travel: false,
        table_version: snap.batch.as_ref().map(|b| b.manifest.table_version),
        h: snap.h(),
        realtime: Coverage::from_ends(snap.realtime_end.clone()),
        batch_as_of_ms: as_of,
        batch_age_ms: as_of.map(|t| now - t),
        realtime_age_ms: snap
            .realtime_at_ms
            .iter()
            .copied()
            .max()
            .filter(|&t| t > 0)
            .map_or(0, |t| now - t),
        snapshot: snap.version,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("no view named `{name}`; the views are: {known}")]
    NoSuchView { name: String, known: String },
    #[error("{0}")]
    View(#[from] ViewError),
    #[error("view `{view}` cannot be served right now: {detail}")]
    Inconsistent { view: String, detail: String },
    /// A `?COL=VAL` filter whose value is not one of the column's type.
    #[error("the filter {column}={value:?}: not a value of the column's type {ty}")]
    BadFilter {
        column: String,
        value: String,
        ty: String,
    },
}

crate::explained!(ServingError);

impl crate::error::Explain for ServingError {
    fn hint(&self) -> Option<String> {
        match self {
            ServingError::BadFilter { ty, .. } => Some(format!(
                "a filter compares values as the column's type ({ty}); write the value as SQL would cast it"
            )),
            _ => None,
        }
    }

    fn sqlstate(&self) -> &'static str {
        match self {
            // undefined_table
            ServingError::NoSuchView { .. } => "42P01",
            // invalid_text_representation
            ServingError::BadFilter { .. } => "22P02",
            _ => "XX000",
        }
    }
}

/// A read may get the previous version's answer while the current one is
/// computed, if that answer is younger than this (it reports its own offsets).
pub const MAX_STALE: Duration = Duration::from_millis(250);

/// Per view: the latest answer and whether a newer one is being computed.
struct Cached {
    answer: ArcSwap<Option<Arc<Answer>>>,
    computing: AtomicBool,
    /// Serializes computations, so concurrent readers wait for one.
    compute: tokio::sync::Mutex<()>,
}

/// The serving layer of a node.
pub struct Serving {
    /// Every view this node has served, by index. Indexes are never reused:
    /// a changed view's new version gets a new one and a dropped view's
    /// stays, retired, so an index a reader resolved keeps its meaning (it
    /// resolves to the view's current version, see [`Serving::resolve`]).
    /// Which are served is each snapshot's `live`.
    views: ArcSwap<Vec<Arc<View>>>,
    current: ArcSwap<Snapshot>,
    /// Serializes writers; readers never take it.
    writer: Mutex<()>,
    /// Per view index.
    cache: ArcSwap<Vec<Arc<Cached>>>,
    /// The key columns point reads have read by, as (view, state column):
    /// every realtime state batch is indexed by them when the speed layer
    /// installs it, and every published run when it is loaded — off the
    /// read path, and for no column nobody reads by.
    keyed: ArcSwap<Vec<(usize, usize)>>,
    clock: SharedClock,
}

fn new_cached() -> Arc<Cached> {
    Arc::new(Cached {
        answer: ArcSwap::from_pointee(None),
        computing: AtomicBool::new(false),
        compute: tokio::sync::Mutex::new(()),
    })
}

impl Serving {
    pub fn new(views: Vec<Arc<View>>, partitions: u32) -> Serving {
        let cache = views.iter().map(|_| new_cached()).collect();
        let snapshot = Snapshot {
            realtime: vec![Vec::new(); partitions as usize],
            realtime_end: vec![0; partitions as usize],
            realtime_at_ms: vec![0; partitions as usize],
            live: Arc::new((0..views.len()).collect()),
            ..Snapshot::default()
        };
        Serving {
            views: ArcSwap::from_pointee(views),
            current: ArcSwap::from_pointee(snapshot),
            writer: Mutex::new(()),
            cache: ArcSwap::from_pointee(cache),
            keyed: ArcSwap::from_pointee(Vec::new()),
            clock: SystemClock::shared(),
        }
    }

    /// The same, reading time from `clock`.
    pub fn with_clock(views: Vec<Arc<View>>, partitions: u32, clock: SharedClock) -> Serving {
        Serving {
            clock,
            ..Serving::new(views, partitions)
        }
    }

    /// Every view by index, retired ones included (see [`Serving::live`]).
    pub fn views(&self) -> Arc<Vec<Arc<View>>> {
        self.views.load_full()
    }

    /// The views served now, in order, with their indexes.
    pub fn live(&self) -> Vec<(usize, Arc<View>)> {
        // The snapshot first: `adopt` stores the views before a snapshot
        // names them, so views loaded after a snapshot cover its `live`.
        let snap = self.snapshot();
        let views = self.views();
        snap.live.iter().map(|&i| (i, views[i].clone())).collect()
    }

    /// The index of the view served as `name` now.
    pub fn view_index(&self, name: &str) -> Result<usize, ServingError> {
        self.index_in(&self.snapshot(), name)
    }

    fn index_in(&self, snap: &Snapshot, name: &str) -> Result<usize, ServingError> {
        let views = self.views();
        snap.live
            .iter()
            .copied()
            .find(|&i| views[i].name() == name)
            .ok_or_else(|| {
                let live: Vec<Arc<View>> = snap.live.iter().map(|&i| views[i].clone()).collect();
                ServingError::NoSuchView {
                    name: name.to_string(),
                    known: crate::view::names(&live),
                }
            })
    }

    /// The index `i` stands for in `snap`: itself while served, else the
    /// index of the version of its view served there (it changed since the
    /// reader resolved it), or no such view (it was dropped).
    pub fn resolve(&self, snap: &Snapshot, i: usize) -> Result<usize, ServingError> {
        if snap.live.contains(&i) {
            return Ok(i);
        }
        let name = self.views()[i].name().to_string();
        self.index_in(snap, &name)
    }

    /// The indexes `views` (a new list of view definitions, compiled) take:
    /// an unchanged view (same name and fingerprint as one served now) keeps
    /// its index, any other gets a new one. Returns every view by index and
    /// the new live list, for [`Serving::adopt`].
    pub fn plan_views(&self, views: &[Arc<View>]) -> (Vec<Arc<View>>, Vec<usize>) {
        let snap = self.snapshot();
        let mut all = self.views().as_ref().clone();
        let mut live = Vec::with_capacity(views.len());
        for v in views {
            match snap
                .live
                .iter()
                .copied()
                .find(|&i| all[i].name() == v.name() && all[i].fingerprint() == v.fingerprint())
            {
                Some(i) => live.push(i),
                None => {
                    all.push(v.clone());
                    live.push(all.len() - 1);
                }
            }
        }
        (all, live)
    }

    /// Installs a new set of views in one swap, with the batch run that
    /// computed them and the speed layer's chunks holding their states:
    /// readers see the old views with the old run, or the new with the new,
    /// never a mix. `all` must extend [`Serving::views`].
    pub fn adopt(
        &self,
        all: Vec<Arc<View>>,
        live: Vec<usize>,
        side: Option<Arc<BatchSide>>,
        parts: Vec<(u32, Vec<Arc<RealtimeChunk>>, u64)>,
    ) {
        {
            let _w = self.writer.lock().expect("serving writer lock");
            let mut cache = self.cache.load_full().as_ref().clone();
            cache.resize_with(all.len(), new_cached);
            self.cache.store(Arc::new(cache));
            self.views.store(Arc::new(all));
        }
        let now = self.clock.unix_ms();
        self.update(|cur| {
            let mut next = cur.clone();
            next.live = Arc::new(live);
            if let Some(side) = side {
                next.grow(side.manifest.h.partitions() as usize);
                next.batch = Some(side);
            }
            next.install(parts, now);
            next
        });
    }

    /// Loads a published run's states for the views served now (retired
    /// views get empty states), warming the key indexes the current run's
    /// readers built.
    pub async fn load_side(
        &self,
        runs: &RunStore,
        manifest: Manifest,
    ) -> Result<BatchSide, RunsError> {
        let snap = self.snapshot();
        let mut warm = snap.batch.as_ref().map(|b| b.indexed()).unwrap_or_default();
        for k in self.keyed.load().iter() {
            if !warm.contains(k) {
                warm.push(*k);
            }
        }
        BatchSide::load(runs, manifest, &self.views(), &snap.live, &warm).await
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Builds and installs a new snapshot from the current one.
    fn update(&self, f: impl FnOnce(&Snapshot) -> Snapshot) -> Arc<Snapshot> {
        let _w = self.writer.lock().expect("serving writer lock");
        let cur = self.current.load_full();
        let mut next = f(&cur);
        next.version = cur.version + 1;
        let next = Arc::new(next);
        self.current.store(next.clone());
        next
    }

    /// Installs the realtime chunks of some partitions (from the speed layer).
    /// Chunks already covered by the installed batch run are left out.
    pub fn set_realtime(&self, parts: Vec<(u32, Vec<Arc<RealtimeChunk>>, u64)>) {
        // New state batches are indexed for point reads before readers see
        // them (each once: a growing chunk's versions share their indexes).
        let keyed = self.keyed.load();
        for (_, chunks, _) in &parts {
            for c in chunks {
                for &(i, col) in keyed.iter() {
                    c.index(i, col);
                }
            }
        }
        let now = self.clock.unix_ms();
        self.update(|cur| {
            let mut next = cur.clone();
            next.install(parts, now);
            next
        });
    }

    /// Installs a published batch run; realtime chunks it covers leave in the same swap.
    /// A node that did not cut the chunks the run covers (another node
    /// drove) may find H inside one of its chunks: that partition is then
    /// served up to H only, until its speed layer re-reads from H.
    pub fn set_batch(&self, side: Arc<BatchSide>) {
        self.update(|cur| {
            let mut next = cur.clone();
            next.grow(side.manifest.h.partitions() as usize);
            let h = side.manifest.h.clone();
            for (p, hp) in h.iter() {
                let p = p as usize;
                let (chunks, end) = chunk::align(
                    std::mem::take(&mut next.realtime[p]),
                    next.realtime_end[p],
                    hp,
                );
                next.realtime[p] = chunks;
                next.realtime_end[p] = end;
            }
            next.batch = Some(side);
            next
        });
    }

    /// The merged rows of view `i` for the current snapshot, computed once
    /// per version and shared. While a newer version is being computed, a
    /// reader gets the previous answer if it is younger than [`MAX_STALE`]
    /// (every answer names the offsets it covers, so it is exact for those).
    pub async fn answer(self: &Arc<Self>, i: usize) -> Result<Arc<Answer>, ServingError> {
        let snap = self.snapshot();
        let i = self.resolve(&snap, i)?;
        let cached = self.cache.load()[i].clone();
        if let Some(a) = cached.answer.load().as_ref()
            && (a.freshness.snapshot == snap.version
                || (a.computed_at.elapsed() < MAX_STALE
                    && cached.computing.load(Ordering::Acquire)))
        {
            return Ok(a.clone());
        }
        // Someone recent enough is served; otherwise compute (or wait for the computation).
        let young = cached
            .answer
            .load()
            .as_ref()
            .as_ref()
            .filter(|a| a.computed_at.elapsed() < MAX_STALE)
            .cloned();
        if let Some(a) = young {
            if !cached.computing.swap(true, Ordering::AcqRel) {
                let this = self.clone();
                tokio::spawn(async move {
                    let _ = this.refresh(i).await;
                });
            }
            return Ok(a);
        }
        self.refresh(i).await
    }

    /// View `i` at a given snapshot: the cached answer if it is of that
    /// snapshot, else computed.
    pub async fn answer_at(&self, i: usize, snap: &Snapshot) -> Result<Arc<Answer>, ServingError> {
        let i = self.resolve(snap, i)?;
        if let Some(a) = self.cache.load()[i].answer.load().as_ref()
            && a.freshness.snapshot == snap.version
        {
            return Ok(a.clone());
        }
        Ok(Arc::new(self.compute(i, snap).await?))
    }

    /// Computes view `i` for the current snapshot and caches it.
    async fn refresh(&self, i: usize) -> Result<Arc<Answer>, ServingError> {
        let i = self.resolve(&self.snapshot(), i)?;
        let cached = self.cache.load()[i].clone();
        let _one = cached.compute.lock().await;
        let snap = self.snapshot();
        if !snap.live.contains(&i) {
            // The view changed while this waited: its new version, uncached.
            let j = self.resolve(&snap, i)?;
            return self.compute(j, &snap).await.map(Arc::new);
        }
        if let Some(a) = cached.answer.load().as_ref()
            && a.freshness.snapshot == snap.version
        {
            cached.computing.store(false, Ordering::Release);
            return Ok(a.clone());
        }
        cached.computing.store(true, Ordering::Release);
        let result = self.compute(i, &snap).await.map(Arc::new);
        if let Ok(a) = &result {
            cached.answer.store(Arc::new(Some(a.clone())));
        }
        cached.computing.store(false, Ordering::Release);
        result
    }

    /// Merges and finalizes view `i` over a snapshot (no cache).
    pub async fn compute(&self, i: usize, snap: &Snapshot) -> Result<Answer, ServingError> {
        let i = self.resolve(snap, i)?;
        let views = self.views();
        let view = &views[i];
        snap.check().map_err(|detail| ServingError::Inconsistent {
            view: view.name().to_string(),
            detail,
        })?;
        let mut parts = Vec::new();
        let as_of = snap.batch.as_ref().map(|b| b.manifest.as_of_ms);
        if let Some(b) = &snap.batch
            && let Some(s) = b.states.get(i)
        {
            parts.push(s.clone());
        }
        for chunks in &snap.realtime {
            for c in chunks {
                for s in c.states.get(i).into_iter().flatten() {
                    parts.push(match (view.rollup(), as_of) {
                        // Realtime groups roll up with the batch run's time, like the batch side.
                        (Some(_), Some(t)) => view.roll_up(s.clone(), t).await?,
                        _ => s.clone(),
                    });
                }
            }
        }
        let rows = view.finalize(parts).await?;
        Ok(Answer {
            rows,
            freshness: freshness(snap).of(view),
            computed_at: std::time::Instant::now(),
            index: Mutex::new(HashMap::new()),
        })
    }

    /// View `i` as a past published run holds it (time travel): the run's
    /// states alone, finalized; its freshness names the run, its table
    /// version and `H`, which is also how far the answer reaches.
    pub async fn past(
        &self,
        i: usize,
        manifest: &Manifest,
        states: RecordBatch,
    ) -> Result<Answer, ServingError> {
        let views = self.views();
        let view = &views[i];
        let rows = view.finalize(vec![states]).await?;
        let now = chrono::Utc::now().timestamp_millis();
        Ok(Answer {
            rows,
            freshness: Freshness {
                run: Some(manifest.run),
                fingerprint: view.fingerprint().to_string(),
                time_travel: true,
                table_version: Some(manifest.table_version),
                h: manifest.h.clone(),
                realtime: manifest.h.clone(),
                batch_as_of_ms: Some(manifest.as_of_ms),
                batch_age_ms: Some(now - manifest.as_of_ms),
                realtime_age_ms: now - manifest.published_ms(),
                snapshot: 0,
            },
            computed_at: std::time::Instant::now(),
            index: Mutex::new(HashMap::new()),
        })
    }

    /// Whether a point read of view `i` by state column `col` is cheap now:
    /// the published run's key index is built (the first read after a
    /// publish may have to sort the run's states to build it).
    pub fn point_is_cheap(&self, i: usize, col: usize) -> bool {
        let snap = self.snapshot();
        if !snap.live.contains(&i) {
            return false;
        }
        match &snap.batch {
            None => true,
            Some(b) => b
                .key_indexes
                .lock()
                .expect("index lock")
                .contains_key(&(i, col)),
        }
    }

    /// A point read: the rows of view `i` whose key column (state column
    /// `col`, see [`View::key_column`]) equals `value`, merged from just the
    /// matching groups of the current snapshot — no full merge, always fresh.
    pub async fn point(&self, i: usize, col: usize, value: &str) -> Result<Answer, ServingError> {
        use arrow::array::{Array, ArrayRef, StringArray, UInt32Array};
        use arrow::compute::{cast, take_record_batch};
        let snap = self.snapshot();
        let views = self.views();
        let (i, col) = match self.resolve(&snap, i)? {
            j if j == i => (i, col),
            // The view changed since the reader planned the read: the
            // same key column of its new version.
            j => {
                let name = views[i].state_schema().field(col).name().clone();
                let c = views[j]
                    .key_column(&name)
                    .ok_or_else(|| ServingError::Inconsistent {
                        view: views[j].name().to_string(),
                        detail: format!("its new version has no group column `{name}`"),
                    })?;
                (j, c)
            }
        };
        let view = &views[i];
        if !self.keyed.load().contains(&(i, col)) {
            self.keyed.rcu(|k| {
                let mut k = k.as_ref().clone();
                if !k.contains(&(i, col)) {
                    k.push((i, col));
                }
                k
            });
        }
        if !self.keyed.load().contains(&(i, col)) {
            self.keyed.rcu(|k| {
                let mut k = k.as_ref().clone();
                if !k.contains(&(i, col)) {
                    k.push((i, col));
                }
                k
            });
        }
        snap.check().map_err(|detail| ServingError::Inconsistent {
            view: view.name().to_string(),
            detail,
        })?;
        let exec = |e: arrow::error::ArrowError| {
            ServingError::View(ViewError::Exec {
                view: view.name().to_string(),
                source: e.into(),
            })
        };
        let ty = view.state_schema().field(col).data_type().clone();
        let text: ArrayRef = Arc::new(StringArray::from(vec![value]));
        // A value that is not of the key's type matches no group.
        let key = cast(&text, &ty).ok().filter(|k| k.null_count() == 0);
        let mut parts = Vec::new();
        if let Some(key) = &key {
            let probe = KeyProbe::new(key).map_err(exec)?;
            let as_of = snap.batch.as_ref().map(|b| b.manifest.as_of_ms);
            let roll = view.rollup().is_some() && as_of.is_some();
            // Every matching state row, by (source batch, row), gathered
            // at the end into one batch: one allocation per column, and
            // the final aggregation runs over one batch, not one per chunk.
            let mut sources: Vec<&RecordBatch> = Vec::new();
            let mut picks: Vec<(usize, usize)> = Vec::new();
            if let Some(b) = &snap.batch {
                let rows = b.key_index(i, col).map_err(exec)?.lookup(&probe);
                if !rows.is_empty() {
                    sources.push(&b.states[i]);
                    picks.extend(rows.iter().map(|&r| (0, r as usize)));
                }
            }
            for chunks in &snap.realtime {
                for c in chunks {
                    for (j, rows) in c.matching(i, col, &probe).map_err(exec)? {
                        let states = &c.states[i][j];
                        if roll {
                            // Realtime groups roll up with the batch run's time.
                            let hit = take_record_batch(states, &UInt32Array::from(rows))
                                .map_err(exec)?;
                            parts.push(view.roll_up(hit, as_of.expect("a run")).await?);
                        } else {
                            let at = sources.len();
                            sources.push(states);
                            picks.extend(rows.iter().map(|&r| (at, r as usize)));
                        }
                    }
                }
            }
            if !picks.is_empty() {
                parts
                    .push(arrow::compute::interleave_record_batch(&sources, &picks).map_err(exec)?);
            }
        }
        let rows = view.finalize_few(parts).await?;
        Ok(Answer {
            rows,
            freshness: freshness(&snap).of(view),
            computed_at: std::time::Instant::now(),
            index: Mutex::new(HashMap::new()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ViewConfig;
    use crate::schema::EventSchema;
    use arrow::array::{Int64Array, StringArray, TimestampMillisecondArray};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// A run's manifest: run `run` at coverage `h`, of `events` events.
    fn manifest(run: u64, h: Coverage, events: u64) -> Manifest {
        Manifest {
            info: crate::runs::RunInfo {
                run,
                table_version: run as i64,
                h,
                events,
                as_of_ms: 0,
                started_ms: 0,
                duration_ms: 0,
                engine: String::new(),
                compute: Default::default(),
                kinds: Default::default(),
                previous: None,
            },
            views: Default::default(),
            definitions: Default::default(),
        }
    }

    fn events(n: usize) -> RecordBatch {
        RecordBatch::try_new(
            EventSchema::paper().arrow().clone(),
            vec![
                Arc::new(Int64Array::from_iter_values(
                    (0..n as i64).map(|i| 10_000 + i % 7),
                )),
                Arc::new(StringArray::from_iter_values(
                    (0..n).map(|i| format!("product{}", i % 3)),
                )),
                Arc::new(Int64Array::from_iter_values((0..n as i64).map(|i| i % 10))),
                Arc::new(TimestampMillisecondArray::from_iter_values(
                    (0..n as i64).map(|i| 1_414_800_000_000 + i),
                )),
            ],
        )
        .unwrap()
    }

    /// Readers during swaps never see half a change: every answer counts
    /// exactly the events below its high-water marks, while one writer
    /// appends realtime chunks and another installs batch runs that cover
    /// some of them.
    #[test]
    fn readers_never_see_a_half_swapped_snapshot() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let view = Arc::new(
            rt.block_on(crate::view::compile(
                &ViewConfig {
                    name: "n".into(),
                    sql: "SELECT count(*) AS n FROM events".into(),
                    rollup: Vec::new(),
                },
                &EventSchema::paper(),
            ))
            .unwrap(),
        );
        let serving = Arc::new(Serving::new(vec![view.clone()], 2));
        let chunk = 10usize;
        let one_chunk_states = rt.block_on(view.states(vec![events(chunk)])).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        // The realtime writer: per partition, chunks of 10 events from H up.
        let hwm: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let writer = {
            let (serving, stop, hwm, s) = (
                serving.clone(),
                stop.clone(),
                hwm.clone(),
                one_chunk_states.clone(),
            );
            std::thread::spawn(move || {
                let mut end = [0u64; 2];
                while !stop.load(Ordering::Relaxed) {
                    let h = serving.snapshot().h();
                    let mut parts = Vec::new();
                    for p in 0..2 {
                        end[p] += chunk as u64;
                        let mut chunks = Vec::new();
                        let mut at = h.get(p as u32);
                        while at < end[p] {
                            chunks.push(Arc::new(RealtimeChunk {
                                range: ChunkRange::dense(p as u32, at, at + chunk as u64),
                                closed: true,
                                states: vec![vec![s.clone()]],
                                indexes: Default::default(),
                            }));
                            at += chunk as u64;
                        }
                        parts.push((p as u32, chunks, end[p]));
                        hwm[p].store(end[p], Ordering::Relaxed);
                    }
                    serving.set_realtime(parts);
                }
            })
        };
        // The batch writer: installs runs covering whole chunks below the marks.
        let batcher = {
            let (serving, stop, hwm, view) =
                (serving.clone(), stop.clone(), hwm.clone(), view.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let mut run = 0;
                while !stop.load(Ordering::Relaxed) {
                    let h: Coverage = (0..2)
                        .map(|p| hwm[p].load(Ordering::Relaxed) / 2 / 10 * 10)
                        .collect();
                    let total = h.total() as usize;
                    let states = rt.block_on(view.states(vec![events(total)])).unwrap();
                    run += 1;
                    serving.set_batch(Arc::new(BatchSide::new(
                        manifest(run, h, total as u64),
                        vec![states],
                    )));
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            })
        };
        let mut checked = 0;
        let began = std::time::Instant::now();
        while began.elapsed() < std::time::Duration::from_millis(1500) {
            let snap = serving.snapshot();
            let a = rt
                .block_on(serving.compute(0, &snap))
                .expect("a consistent snapshot");
            let n = a.rows[0]
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .value(0) as u64;
            let covered: u64 = a.freshness.realtime.total();
            assert_eq!(
                n, covered,
                "the answer counts exactly the events below its marks {:?} (H {:?})",
                a.freshness.realtime, a.freshness.h
            );
            checked += 1;
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        batcher.join().unwrap();
        assert!(checked > 50, "only {checked} reads");
    }

    /// Events with `zips` distinct zipcodes from `first`, for point reads.
    fn spread(n: usize, zips: i64, first: i64) -> RecordBatch {
        RecordBatch::try_new(
            EventSchema::paper().arrow().clone(),
            vec![
                Arc::new(Int64Array::from_iter_values(
                    (0..n as i64).map(|i| 10_000 + (first + i * 7) % zips),
                )),
                Arc::new(StringArray::from_iter_values(
                    (0..n).map(|i| format!("product{}", i % 5)),
                )),
                Arc::new(Int64Array::from_iter_values(
                    (0..n as i64).map(|i| (i + first) % 10),
                )),
                Arc::new(TimestampMillisecondArray::from_iter_values(
                    (0..n as i64).map(|i| 1_414_800_000_000 + i),
                )),
            ],
        )
        .unwrap()
    }

    /// The rows of an answer whose column `col` displays as `value`, sorted.
    fn rows_of(rows: &[RecordBatch], col: &str, value: &str) -> Vec<String> {
        let mut out = Vec::new();
        for b in rows {
            let c = b.schema().index_of(col).unwrap();
            for r in 0..b.num_rows() {
                let cells: Vec<String> = b
                    .columns()
                    .iter()
                    .map(|a| arrow::util::display::array_value_to_string(a, r).unwrap())
                    .collect();
                if cells[c] == value {
                    out.push(cells.join("|"));
                }
            }
        }
        out.sort();
        out
    }

    /// Panics, briefly, unless `got` and `want` hold the same rows.
    fn same_rows(what: &str, got: &[String], want: &[String]) {
        if got != want {
            let first = got.iter().zip(want).position(|(g, w)| g != w);
            panic!(
                "{what}: {} rows where the full answer has {}; first difference at {first:?}: {:?} vs {:?}",
                got.len(),
                want.len(),
                first.map(|i| &got[i]),
                first.map(|i| &want[i]),
            );
        }
    }

    /// A point read's rows are the full answer's rows of its key, whether
    /// the state batches it probes are indexed already (installed after
    /// the column was read by), indexed on the read path (small), or being
    /// indexed in the background (large, scanned meanwhile); for an int64
    /// key that is a whole group and for a string key shared by groups.
    #[test]
    fn a_point_read_is_the_full_answers_rows_of_its_key_at_every_stage_of_indexing() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let compile = |name: &str, sql: &str| {
            Arc::new(
                rt.block_on(crate::view::compile(
                    &ViewConfig {
                        name: name.into(),
                        sql: sql.into(),
                        rollup: Vec::new(),
                    },
                    &EventSchema::paper(),
                ))
                .unwrap(),
            )
        };
        let views = vec![
            compile(
                "by_zip",
                "SELECT zipcode, count(*) AS n, sum(price) AS s FROM events GROUP BY zipcode",
            ),
            compile(
                "by_product_zip",
                "SELECT ProductName, zipcode, count(*) AS n FROM events GROUP BY ProductName, zipcode",
            ),
        ];
        let serving = Serving::new(views.clone(), 2);
        let states = |events: RecordBatch| -> Vec<RecordBatch> {
            views
                .iter()
                .map(|v| rt.block_on(v.states(vec![events.clone()])).unwrap())
                .collect()
        };
        serving.set_batch(Arc::new(BatchSide::new(
            manifest(1, [0u64, 0].into_iter().collect(), 0),
            states(spread(3_000, 2_000, 0)),
        )));
        // Partition 0: a closed chunk of one large batch (12,000 zipcodes);
        // partition 1: a growing chunk of three small batches.
        let large = states(spread(40_000, 12_000, 1));
        let small: Vec<Vec<RecordBatch>> = (0..3).map(|k| states(spread(300, 400, k))).collect();
        let chunks = |with_small: usize| {
            vec![
                (
                    0,
                    vec![Arc::new(RealtimeChunk {
                        range: ChunkRange::dense(0, 0, 40_000),
                        closed: true,
                        states: large.iter().map(|s| vec![s.clone()]).collect(),
                        indexes: Default::default(),
                    })],
                    40_000,
                ),
                (
                    1,
                    vec![Arc::new(RealtimeChunk {
                        range: ChunkRange::dense(1, 0, 300 * with_small as u64),
                        closed: false,
                        states: (0..views.len())
                            .map(|i| small[..with_small].iter().map(|s| s[i].clone()).collect())
                            .collect(),
                        indexes: Default::default(),
                    })],
                    300 * with_small as u64,
                ),
            ]
        };
        let check = |stage: &str| {
            let full = rt
                .block_on(serving.compute(0, &serving.snapshot()))
                .unwrap();
            let full2 = rt
                .block_on(serving.compute(1, &serving.snapshot()))
                .unwrap();
            for zip in [
                10_000, 10_001, 10_399, 10_400, 11_999, 21_999, 22_000, 9_999,
            ] {
                let z = zip.to_string();
                let point = rt.block_on(serving.point(0, 0, &z)).unwrap();
                same_rows(
                    &format!("{stage}: the point read of zipcode {z}"),
                    &rows_of(&point.rows, "zipcode", &z),
                    &rows_of(&full.rows, "zipcode", &z),
                );
                assert_eq!(
                    point.rows.iter().map(|b| b.num_rows()).sum::<usize>(),
                    rows_of(&full.rows, "zipcode", &z).len(),
                    "{stage}: no other rows"
                );
            }
            let key = views[1].key_column("ProductName").unwrap();
            for product in ["product0", "product4", "product5", ""] {
                let point = rt.block_on(serving.point(1, key, product)).unwrap();
                let want = rows_of(&full2.rows, "ProductName", product);
                same_rows(
                    &format!("{stage}: the point read of {product:?}"),
                    &rows_of(&point.rows, "ProductName", product),
                    &want,
                );
                assert_eq!(
                    point.rows.iter().map(|b| b.num_rows()).sum::<usize>(),
                    want.len(),
                    "{stage}: no other rows"
                );
            }
        };
        serving.set_realtime(chunks(2));
        check("nothing indexed yet");
        // The large batch is indexed in the background: wait for it.
        std::thread::sleep(Duration::from_millis(300));
        check("indexed by the reads");
        // The columns are now read by: an install indexes the new batch.
        serving.set_realtime(chunks(3));
        let snap = serving.snapshot();
        let growing = &snap.realtime[1][0];
        assert_eq!(
            growing.indexes.lock().unwrap().len(),
            6,
            "each view's 3 batches indexed by its key column at install"
        );
        check("indexed at install");
    }

    /// A null key's slot holds a value (0 for an int64): a read of that
    /// value that scans a batch (one over `INDEX_ROWS` rows, before its
    /// background index is built) must not take the null group for it.
    #[test]
    fn a_scanned_batch_gives_no_null_group_for_the_value_in_its_slot() {
        use arrow::datatypes::{DataType, Field, Schema};
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let n = 2 * INDEX_ROWS;
        let keys = Int64Array::from_iter((0..n as i64).map(|i| (i % 2 == 1).then_some(1000 + i)));
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, true)]));
        let states = RecordBatch::try_new(schema, vec![Arc::new(keys)]).unwrap();
        let chunk = RealtimeChunk {
            range: ChunkRange::dense(0, 0, n as u64),
            closed: true,
            states: vec![vec![states]],
            indexes: Default::default(),
        };
        let probe = |v: i64| {
            KeyProbe::new(&(Arc::new(Int64Array::from(vec![v])) as arrow::array::ArrayRef)).unwrap()
        };
        let _rt = rt.enter();
        assert!(
            chunk.matching(0, 0, &probe(0)).unwrap().is_empty(),
            "the scan (first read of a large batch) finds no row for 0"
        );
        assert_eq!(
            chunk.matching(0, 0, &probe(1001)).unwrap(),
            vec![(0, vec![1])],
            "and finds the row of a real key"
        );
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            chunk.matching(0, 0, &probe(0)).unwrap().is_empty(),
            "nor does the index built meanwhile"
        );
    }
}
