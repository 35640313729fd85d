//! The batch layer: recompute every view from the whole master dataset, in a
//! loop, and publish each run with one atomic pointer swap (the paper's Spark
//! SQL job in its `while(true)` loop).
//!
//! ```text
//!  master dataset @ version v (coverage H)
//!     └─▶ each view's states plan over all files ─▶ rollup ─▶ states.parquet + rows.tsv
//!                                                        views/<view>/<run>/
//!  views/runs/<run>.json   the run's manifest: H, v, files, sizes, checksums
//!  views/CURRENT           the published manifest — replaced whole, atomically
//! ```
//!
//! A reader takes CURRENT, and gets every view of one run at one `H`, with
//! checksums to verify what it reads. A missing or corrupt file, a view whose
//! SQL changed, or states from another engine version (the view fingerprint)
//! make the published run unusable for that view: [`BatchLayer::check`] finds
//! it and the caller rebuilds from the master dataset before serving.

#[cfg(feature = "ballista")]
pub mod ballista;
pub mod changes;
pub mod engine;
pub mod history;
pub mod incremental;
pub mod scan;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use arrow::array::AsArray;
use arrow::datatypes::{Int32Type, Int64Type};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;

use crate::master::{MasterDataset, MasterError, MasterSnapshot};
use crate::runs::crc_hex;
pub use crate::runs::{
    Compute, FileEntry, Lineage, Manifest, RunInfo, RunKind, RunKinds, RunStore, RunsError,
    StageTime, ViewEntry,
};
use crate::storage::{Storage, StorageError, Swap, Version};
use crate::view::failures::{FailedRow, ViewFailures};
use crate::view::{View, ViewError, store::to_tsv};
pub use engine::{Engine, EngineError};
pub use history::AsOf;
pub use incremental::Policy;
use incremental::{Decide, Plan};

pub use crate::runs::CURRENT;

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("{0}")]
    Master(#[from] MasterError),
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error("{0}")]
    View(#[from] ViewError),
    #[error("{0}")]
    Engine(#[from] EngineError),
    #[error("batch view file {path} is corrupt: {detail}")]
    Corrupt { path: String, detail: String },
    #[error("no view named `{name}`; the views are: {known}")]
    NoSuchView { name: String, known: String },
    #[error("the published manifest {path} is unreadable: {detail}")]
    BadManifest { path: String, detail: String },
    #[error("a batch task failed")]
    Task(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("run {run} was not published: {reason}; its files are discarded")]
    LostRace { run: u64, reason: &'static str },
    /// `CURRENT` was being replaced when the store failed, and could not
    /// be read again: the run may or may not be the published one.
    #[error(
        "the outcome of publishing run {run} is unknown: `views/CURRENT` could not be read back after the replace failed"
    )]
    PublishUnknown {
        run: u64,
        #[source]
        source: StorageError,
    },
    #[error("no published run {as_of} is kept")]
    NoSuchRun { as_of: AsOf, kept: String },
    /// Time travel to a run from before the view was added (or after it
    /// was dropped and before it was added again).
    #[error("view `{view}` did not exist at run {run}{}", added_at(.added))]
    NotInRun {
        view: String,
        run: u64,
        /// The oldest kept run that holds the view.
        added: Option<u64>,
    },
}

impl From<RunsError> for BatchError {
    fn from(e: RunsError) -> BatchError {
        match e {
            RunsError::Corrupt { path, detail } => BatchError::Corrupt { path, detail },
            RunsError::BadManifest { path, detail } => BatchError::BadManifest { path, detail },
            RunsError::View(e) => BatchError::View(e),
            RunsError::Storage(e) => BatchError::Storage(e),
        }
    }
}

/// " (it was added at run M)", when a kept run says.
fn added_at(added: &Option<u64>) -> String {
    added.map_or_else(String::new, |a| format!(" (it was added at run {a})"))
}

crate::explained!(BatchError);

impl crate::error::Explain for BatchError {
    fn hint(&self) -> Option<String> {
        match self {
            BatchError::NoSuchRun { kept, .. } => Some(format!(
                "{kept}; `[batch] keep_runs` and `keep_for` say how many and how long"
            )),
            BatchError::NotInRun { added: Some(a), .. } => {
                Some(format!("ask for run {a} or a later one"))
            }
            BatchError::NotInRun { added: None, .. } => {
                Some("no kept run holds the view yet; its first run publishes it".into())
            }
            _ => None,
        }
    }
}

/// What is wrong with the published run, per view.
#[derive(Debug, Clone, Default)]
pub struct Health {
    pub manifest: Option<Manifest>,
    /// Views that cannot be served from the published run, with why.
    pub problems: Vec<(String, String)>,
}

impl Health {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Progress of a running batch job, for bars and status.
#[derive(Debug, Default)]
pub struct Progress {
    /// Events to read in all (sum over the views' scans).
    pub total: AtomicU64,
    /// Events read so far (the scans add to it as batches pass).
    pub done: Arc<AtomicU64>,
}

pub fn engine_version() -> String {
    format!(
        "lambdaflow {} / datafusion {} / states v{}",
        env!("CARGO_PKG_VERSION"),
        datafusion::DATAFUSION_VERSION,
        crate::view::STATE_FORMAT
    )
}

/// Which views a run recomputes, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recompute<'a> {
    /// The batch loop: every view, incrementally where it can be
    /// ([`incremental`]), at the latest table version.
    Due,
    /// `lambdaflow rebuild`: every view from scratch.
    All,
    /// `lambdaflow rebuild VIEW`: that view from scratch at the published
    /// run's table version (the run stays one `H`); the others are reused.
    One(&'a str),
}

/// The batch layer over one master dataset and one set of views.
pub struct BatchLayer {
    storage: Storage,
    master: Arc<MasterDataset>,
    /// The published runs (read through it; written here).
    runs: RunStore,
    /// Replaced whole when views change while serving.
    views: arc_swap::ArcSwap<Vec<Arc<View>>>,
    retention: history::Retention,
    /// Run manifests read back (retention, time travel): a run's manifest
    /// never changes once created, so each is read once per process.
    manifests: history::ManifestCache,
    policy: Policy,
    parallelism: usize,
    failures: Arc<ViewFailures>,
    engine: Engine,
}

impl BatchLayer {
    /// A batch layer; rows a view fails on are recorded in `failures`.
    pub fn new(
        storage: Storage,
        master: Arc<MasterDataset>,
        views: Vec<Arc<View>>,
        failures: Arc<ViewFailures>,
    ) -> BatchLayer {
        register_store(&storage, &views);
        BatchLayer {
            runs: RunStore::new(storage.clone(), master.clone()),
            storage,
            master,
            views: arc_swap::ArcSwap::from_pointee(views),
            retention: history::Retention::default(),
            manifests: Default::default(),
            policy: Policy::default(),
            parallelism: std::thread::available_parallelism().map_or(1, |n| n.get()),
            failures,
            engine: Engine::Local,
        }
    }

    /// Computes runs on `engine`, once it has accepted every view (a view it
    /// cannot run is refused here, before any run).
    pub fn with_engine(mut self, engine: Engine) -> Result<BatchLayer, EngineError> {
        engine.check(&self.views(), &self.storage.store_url())?;
        self.engine = engine;
        Ok(self)
    }

    /// When views are recomputed from scratch, and how long runs are kept.
    pub fn with_policy(mut self, policy: Policy, retention: history::Retention) -> BatchLayer {
        self.policy = policy;
        self.retention = retention;
        self
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Where both layers record the rows each view fails on.
    pub fn failures(&self) -> &Arc<ViewFailures> {
        &self.failures
    }

    /// The views runs compute now.
    pub fn views(&self) -> Arc<Vec<Arc<View>>> {
        self.views.load_full()
    }

    /// Computes `views` from the next run on (views changed while
    /// serving), once the engine accepts the new ones; returns the views
    /// before, to put back if the change is abandoned.
    ///
    /// A view equal to one computed now (its name and fingerprint) stays
    /// the object it is; only the others are checked and given the store.
    /// (A view compiled again is a new object with its own task context:
    /// kept as given, an equal one had no store, and every run on an object
    /// store failed "no suitable object store" after a node adopted a
    /// published run's views.)
    pub fn set_views(&self, views: Vec<Arc<View>>) -> Result<Arc<Vec<Arc<View>>>, EngineError> {
        let before = self.views();
        let mut new = Vec::new();
        let views: Vec<Arc<View>> = views
            .into_iter()
            .map(|v| {
                match before
                    .iter()
                    .find(|b| b.fingerprint() == v.fingerprint() && b.name() == v.name())
                {
                    Some(b) => b.clone(),
                    None => {
                        new.push(v.clone());
                        v
                    }
                }
            })
            .collect();
        self.check_views(&new)?;
        register_store(&self.storage, &new);
        self.views.store(Arc::new(views));
        Ok(before)
    }

    /// Refuses views the engine cannot run, as at startup.
    pub fn check_views(&self, views: &[Arc<View>]) -> Result<(), EngineError> {
        self.engine.check(views, &self.storage.store_url())
    }

    /// Puts back the views [`BatchLayer::set_views`] replaced.
    pub fn restore_views(&self, views: Arc<Vec<Arc<View>>>) {
        self.views.store(views);
    }

    pub fn master(&self) -> &Arc<MasterDataset> {
        &self.master
    }

    /// The published runs.
    pub fn runs(&self) -> &RunStore {
        &self.runs
    }

    /// The published manifest, if any.
    pub async fn current(&self) -> Result<Option<Manifest>, BatchError> {
        Ok(self.runs.current().await?)
    }

    /// The published manifest and the version of `CURRENT` it was read at.
    async fn current_versioned(&self) -> Result<(Option<Manifest>, Version), BatchError> {
        Ok(self.runs.current_versioned().await?)
    }

    /// The version of `CURRENT` now: a node that does not drive polls it to
    /// learn of a new publish.
    pub async fn current_version(&self) -> Result<Version, BatchError> {
        Ok(self.runs.current_version().await?)
    }

    fn parse_manifest(&self, bytes: &[u8]) -> Result<Manifest, String> {
        self.runs.parse_manifest(bytes)
    }

    async fn read_checked(&self, entry: &FileEntry) -> Result<Bytes, BatchError> {
        Ok(self.runs.read_checked(entry).await?)
    }

    /// The published states of `view`, verified: never corrupt rows.
    pub async fn read_states(
        &self,
        manifest: &Manifest,
        view: &View,
    ) -> Result<RecordBatch, BatchError> {
        Ok(self.runs.read_states(manifest, view).await?)
    }

    async fn read_entry_states(
        &self,
        entry: &ViewEntry,
        view: &View,
    ) -> Result<RecordBatch, BatchError> {
        Ok(self.runs.read_entry_states(entry, view).await?)
    }

    /// Checks that every view can be served from the published run.
    pub async fn check(&self) -> Result<Health, BatchError> {
        let manifest = match self.current().await {
            Ok(m) => m,
            Err(e @ BatchError::BadManifest { .. }) => {
                return Ok(Health {
                    manifest: None,
                    problems: vec![("*".into(), e.to_string())],
                });
            }
            Err(e) => return Err(e),
        };
        let mut health = Health {
            manifest: manifest.clone(),
            problems: Vec::new(),
        };
        let Some(m) = manifest else {
            return Ok(health);
        };
        for view in self.views().iter() {
            let problem = match self.read_states(&m, view).await {
                Ok(_) => match m.views.get(view.name()) {
                    Some(e) => match &e.tsv {
                        Some(tsv) => self.read_checked(tsv).await.err().map(|e| e.to_string()),
                        None => None,
                    },
                    None => Some("missing from the published run".into()),
                },
                Err(e) => Some(e.to_string()),
            };
            if let Some(p) = problem {
                health.problems.push((view.name().to_string(), p));
            }
        }
        Ok(health)
    }

    /// The batch loop's run: every view, incrementally where it can be.
    pub async fn run(&self, progress: Option<Arc<Progress>>) -> Result<Manifest, BatchError> {
        self.run_on(&self.engine, Recompute::Due, progress).await
    }

    /// `lambdaflow rebuild [VIEW]`: from scratch, all views or one.
    pub async fn rebuild(
        &self,
        only: Option<&str>,
        progress: Option<Arc<Progress>>,
    ) -> Result<Manifest, BatchError> {
        let what = only.map_or(Recompute::All, Recompute::One);
        self.run_on(&self.engine, what, progress).await
    }

    /// A run on `engine` rather than the configured one: a node that must
    /// repair its published views before it serves does it with the local
    /// engine when the cluster cannot be reached.
    pub async fn run_on(
        &self,
        engine: &Engine,
        what: Recompute<'_>,
        progress: Option<Arc<Progress>>,
    ) -> Result<Manifest, BatchError> {
        if let Recompute::One(name) = what
            && !self.views().iter().any(|v| v.name() == name)
        {
            return Err(BatchError::NoSuchView {
                name: name.into(),
                known: crate::view::names(&self.views()),
            });
        }
        let started = Instant::now();
        let started_ms = chrono::Utc::now().timestamp_millis();
        let (prev, seen) = self.current_versioned().await?;
        // Rebuilding one view keeps the published coverage, so the run stays one H.
        let (snapshot, as_of_ms) = match (what, &prev) {
            (Recompute::One(_), Some(p)) => {
                let old = self.master.snapshot_at(p.table_version).await?;
                // Another engine may have compacted and vacuumed the files of
                // the published version: then the view is rebuilt on the
                // latest one, and the others move on to it as a run would.
                let gone = self.master.absent(&old).await?;
                if gone.is_empty() {
                    (old, p.as_of_ms)
                } else {
                    tracing::info!(
                        files = gone.len(),
                        "files of the published table version were removed (a compaction and vacuum); rebuilding on the latest version"
                    );
                    (self.master.snapshot().await?, started_ms)
                }
            }
            _ => (self.master.snapshot().await?, started_ms),
        };
        // Every file of the snapshot, not only those this run reads: a
        // missing or damaged older file is found (and repaired from the
        // stream while it still holds it) before a run reads it. A file's
        // checksum is read once, ever; some verified ones again each run.
        self.master.verify(&snapshot).await?;
        let run = self.next_run(prev.as_ref()).await?;
        let progress = progress.unwrap_or_default();
        let version = engine_version();
        let decide = Decide {
            prev: prev.as_ref(),
            snapshot: &snapshot,
            policy: self.policy,
            engine_version: &version,
            now_ms: started_ms,
            rebuild: what == Recompute::All,
        };
        let mut views = BTreeMap::new();
        let mut todo = Vec::new();
        let defined = self.views();
        for v in defined.iter() {
            let plan = match what {
                Recompute::One(name) if name != v.name() => {
                    match prev.as_ref().and_then(|p| p.views.get(v.name())) {
                        Some(e) if e.fingerprint == v.fingerprint() => {
                            views.insert(v.name().to_string(), e.clone());
                            continue;
                        }
                        _ => decide.plan(v),
                    }
                }
                Recompute::One(_) => Plan::Full {
                    reason: "a rebuild of the view was asked for".into(),
                },
                _ => decide.plan(v),
            };
            let reads = match &plan {
                Plan::Full { .. } => snapshot.events(),
                Plan::Incremental { files, .. } => files.iter().filter_map(|f| f.records).sum(),
            };
            progress.total.fetch_add(reads, Ordering::Relaxed);
            todo.push((v, plan));
        }
        let mut compute = engine.compute();
        for (view, plan) in todo {
            let at = At {
                snapshot: &snapshot,
                run,
                as_of_ms,
                started_ms,
                prev: prev.as_ref(),
            };
            let entry = self
                .compute_view(engine, view, plan, at, &progress, &mut compute)
                .await?;
            views.insert(view.name().to_string(), entry);
        }
        let manifest = Manifest {
            info: RunInfo {
                run,
                table_version: snapshot.coverage.version,
                h: snapshot.coverage.h.clone(),
                events: snapshot.events(),
                as_of_ms,
                started_ms,
                duration_ms: started.elapsed().as_millis() as u64,
                engine: version,
                compute,
                kinds: RunKinds::of(run, &views),
                previous: Some(prev.as_ref().map_or(0, |p| p.run)),
            },
            views,
            definitions: defined.iter().map(|v| v.def().clone()).collect(),
        };
        let json = Bytes::from(serde_json::to_vec_pretty(&manifest).expect("manifests serialize"));
        // Two drivers (a failover's overlap) may both reach here. The run
        // number is claimed by creating its manifest; CURRENT is replaced
        // only if it is still what this run started from. A loser removes
        // what it wrote: nothing it computed is ever named by CURRENT.
        let run_path = history::run_path(run);
        crate::failpoint::hit("batch-before-claim");
        if !self.storage.create(&run_path, json.clone()).await? {
            self.discard(&manifest, None).await;
            return Err(BatchError::LostRace {
                run,
                reason: "another driver published a run of that number first",
            });
        }
        crate::failpoint::hit("batch-before-publish");
        let swapped = match self.storage.replace(CURRENT, json, &seen).await {
            Ok(swap) => swap,
            // The store failed after the request may have landed (a reply
            // lost, a timeout after the write): what CURRENT names now is
            // the outcome, so it is read back before anything is reported.
            Err(e) => {
                tracing::warn!(run, error = %crate::error::chain(&e), "replacing views/CURRENT failed: reading it back to learn the outcome");
                match self.read_back_current(run).await {
                    Ok(now) if now.as_ref() == Some(&manifest) => Swap::Done,
                    // Unchanged: this replace did not happen. The claim and
                    // the files stay (a write still in flight could land,
                    // and must name files that exist); the published chain
                    // passes over the claim, and retention removes it.
                    Ok(now) if now.as_ref().map(|m| m.run) == prev.as_ref().map(|m| m.run) => {
                        return Err(e.into());
                    }
                    Ok(_) => Swap::Lost,
                    Err(source) => return Err(BatchError::PublishUnknown { run, source }),
                }
            }
        };
        if swapped == Swap::Lost {
            // A request retried after a lost reply may have landed: only a
            // CURRENT that is not this run means another writer won.
            let (now, _) = self.current_versioned().await?;
            if now.as_ref() != Some(&manifest) {
                self.discard(&manifest, Some(&run_path)).await;
                return Err(BatchError::LostRace {
                    run,
                    reason: "another driver published since this run started",
                });
            }
        }
        crate::failpoint::hit("batch-after-publish");
        tracing::info!(
            run,
            table_version = manifest.table_version,
            h = ?manifest.h,
            events = manifest.events,
            duration_ms = manifest.duration_ms,
            "published a batch run"
        );
        if let Err(e) = self.remove_old_runs(&manifest).await {
            tracing::warn!(error = %e, "could not remove old batch runs");
        }
        Ok(manifest)
    }

    /// `CURRENT` read again after a failed replace, a few times over a few
    /// seconds: the store that just failed may still be failing.
    async fn read_back_current(&self, run: u64) -> Result<Option<Manifest>, StorageError> {
        let mut last = None;
        for wait in [0u64, 500, 1_000, 2_000, 4_000] {
            tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
            match self.current_versioned().await {
                Ok((m, _)) => return Ok(m),
                Err(BatchError::Storage(e)) => {
                    tracing::warn!(run, error = %crate::error::chain(&e), "could not read views/CURRENT back");
                    last = Some(e);
                }
                Err(e) => {
                    tracing::warn!(run, error = %crate::error::chain(&e), "views/CURRENT read back is unreadable");
                    return Ok(None);
                }
            }
        }
        Err(last.expect("at least one attempt"))
    }

    /// A run number above every run on storage.
    async fn next_run(&self, prev: Option<&Manifest>) -> Result<u64, BatchError> {
        let mut max = prev.map_or(0, |m| m.run);
        for v in self.views().iter() {
            for d in self
                .storage
                .list_dirs(&format!("views/{}", v.name()))
                .await?
            {
                if let Some(n) = run_of_dir(&d) {
                    max = max.max(n);
                }
            }
        }
        if let Some(&newest) = self.run_numbers().await?.first() {
            max = max.max(newest);
        }
        Ok(max + 1)
    }

    /// Removes the files of a run that lost the race to publish (those this
    /// writer computed; reused views belong to an earlier run).
    async fn discard(&self, lost: &Manifest, run_file: Option<&str>) {
        for (name, e) in &lost.views {
            if e.run != lost.run {
                continue;
            }
            let dir = e.states.path.rsplit_once('/').map_or("", |(d, _)| d);
            if let Err(err) = self.storage.delete_dir(dir).await {
                tracing::warn!(view = %name, error = %err, "could not remove the files of a run that lost the race");
            }
        }
        if let Some(f) = run_file
            && let Err(err) = self.storage.delete(f).await
        {
            tracing::warn!(error = %err, "could not remove the manifest of a run that lost the race");
        }
    }

    /// One view of a run: its states, full or incremental by `plan`, rolled
    /// up, finalized and written.
    async fn compute_view(
        &self,
        engine: &Engine,
        view: &Arc<View>,
        plan: Plan,
        at: At<'_>,
        progress: &Arc<Progress>,
        compute: &mut Compute,
    ) -> Result<ViewEntry, BatchError> {
        let t = Instant::now();
        let At {
            snapshot,
            run,
            started_ms,
            ..
        } = at;
        let reason = match plan {
            Plan::Full { reason } => reason,
            Plan::Incremental { base, from, files } => {
                match self.read_entry_states(&base, view).await {
                    Ok(published) => {
                        let added = MasterSnapshot {
                            coverage: snapshot.coverage.clone(),
                            files,
                            foreign: Vec::new(),
                            lost: Vec::new(),
                        };
                        let (states, excluded) = self
                            .compute_states(engine, view, &added, None, progress, compute)
                            .await?;
                        let merging = Instant::now();
                        let states = view.merge(vec![published, states]).await?;
                        compute.add("merge into the published states", merging.elapsed());
                        let lineage = Lineage::incremental(
                            &base,
                            from,
                            added.files.len() as u64,
                            added.events(),
                        );
                        return self
                            .write_view(
                                view,
                                states,
                                base.excluded + excluded,
                                lineage,
                                at,
                                t,
                                compute,
                            )
                            .await;
                    }
                    Err(e) => {
                        let reason = format!("the published states are unusable: {e}");
                        tracing::warn!(view = view.name(), %reason, "recomputing the view from scratch");
                        let read: u64 = files.iter().filter_map(|f| f.records).sum();
                        progress
                            .total
                            .fetch_add(snapshot.events().saturating_sub(read), Ordering::Relaxed);
                        reason
                    }
                }
            }
        };
        // The view's groups when it last ran: how its states are best computed.
        let groups = at
            .prev
            .and_then(|p| p.views.get(view.name()))
            .map(|e| e.groups);
        let (states, excluded) = self
            .compute_states(engine, view, snapshot, groups, progress, compute)
            .await?;
        let lineage = Lineage::full(
            reason,
            run,
            started_ms,
            snapshot.files.len() as u64,
            snapshot.events(),
        );
        self.write_view(view, states, excluded, lineage, at, t, compute)
            .await
    }

    /// Rolls up, finalizes and writes one view's states of a run.
    #[allow(clippy::too_many_arguments)]
    async fn write_view(
        &self,
        view: &Arc<View>,
        states: RecordBatch,
        excluded: u64,
        lineage: Lineage,
        at: At<'_>,
        t: Instant,
        compute: &mut Compute,
    ) -> Result<ViewEntry, BatchError> {
        let At {
            snapshot,
            run,
            as_of_ms,
            ..
        } = at;
        let finalizing = Instant::now();
        let states = view.roll_up(states, as_of_ms).await?;
        let groups = states.num_rows() as u64;
        // The paper's TSV for views a person reads whole; a larger view's
        // readers use its states, and its rows are only counted.
        let max = self.policy.tsv_max_rows;
        let tsv_wanted = max > 0 && groups <= max;
        // A view whose rows fail to finalize (an expression over its
        // aggregates dividing by zero on some group) publishes its states
        // with the reason, and no TSV: the run of every other view goes on,
        // and the speed layer's chunks below H can go (a failed run would
        // hold them, and every view's freshness, until the view changed).
        let (rows, unfinalized) = if tsv_wanted || !view.every_group_a_row() {
            match view.finalize(vec![states.clone()]).await {
                Ok(rows) => (Some(rows), None),
                Err(e) => {
                    let why = crate::error::chain(&e);
                    tracing::warn!(view = view.name(), error = %why, "the view's rows cannot be finalized; its states are published, and a read of the whole view reports this");
                    (None, Some(why))
                }
            }
        } else {
            (None, None)
        };
        let row_count = match (&rows, &unfinalized) {
            (Some(r), _) => r.iter().map(|b| b.num_rows() as u64).sum(),
            (None, Some(_)) => 0,
            (None, None) => groups,
        };
        compute.add("rollup+finalize", finalizing.elapsed());
        let writing = Instant::now();
        // The TSV's text and the states' Parquet are independent: both
        // cores encode, one each.
        let (tsv, parquet) = {
            let tsv = rows.filter(|_| tsv_wanted).map(|r| {
                let v = view.clone();
                tokio::task::spawn_blocking(move || to_tsv(v.output_schema(), &r))
            });
            let (v, s) = (view.clone(), states.clone());
            let parquet = tokio::task::spawn_blocking(move || v.states_to_parquet(&s));
            let task = |e: tokio::task::JoinError| BatchError::Task(e.into());
            let tsv = async move {
                match tsv {
                    Some(t) => t.await.map(Some),
                    None => Ok(None),
                }
            };
            let (tsv, parquet) = tokio::join!(tsv, parquet);
            (tsv.map_err(task)?, parquet.map_err(task)??)
        };
        // The writer's id in the directory: a run number two drivers race
        // for never has them write the same files.
        let dir = format!(
            "views/{}/{run:012}-{}",
            view.name(),
            crate::storage::writer_id()
        );
        let states_entry = FileEntry {
            path: format!("{dir}/states.parquet"),
            bytes: parquet.len() as u64,
            crc32c: crc_hex(&parquet),
        };
        let tsv_entry = tsv.as_ref().map(|tsv| FileEntry {
            path: format!("{dir}/rows.tsv"),
            bytes: tsv.len() as u64,
            crc32c: crc_hex(tsv.as_bytes()),
        });
        let put_tsv = async {
            match (&tsv_entry, tsv) {
                (Some(e), Some(tsv)) => self.storage.put(&e.path, Bytes::from(tsv)).await,
                _ => Ok(()),
            }
        };
        let (a, b) = tokio::join!(
            self.storage.put(&states_entry.path, Bytes::from(parquet)),
            put_tsv,
        );
        a?;
        b?;
        let entry = ViewEntry {
            fingerprint: view.fingerprint().to_string(),
            run,
            states: states_entry,
            tsv: tsv_entry,
            groups,
            rows: row_count,
            duration_ms: t.elapsed().as_millis() as u64,
            excluded,
            lineage,
            unfinalized,
        };
        let meta = serde_json::json!({
            "view": view.name(),
            "sql": view.sql(),
            "run": run,
            "table_version": snapshot.coverage.version,
            "h": snapshot.coverage.h,
            "entry": entry,
        });
        self.storage
            .put(&format!("{dir}/view.json"), Bytes::from(meta.to_string()))
            .await?;
        compute.add("write", writing.elapsed());
        Ok(entry)
    }

    /// States of one view over all files, on the batch layer's engine, and
    /// how many events were left out because the view fails on them.
    async fn compute_states(
        &self,
        engine: &Engine,
        view: &Arc<View>,
        snapshot: &MasterSnapshot,
        groups: Option<u64>,
        progress: &Arc<Progress>,
        compute: &mut Compute,
    ) -> Result<(RecordBatch, u64), BatchError> {
        if snapshot.files.is_empty() {
            return Ok((view.states(Vec::new()).await?, 0));
        }
        let (states, failed) = match engine {
            Engine::Local => {
                let t = Instant::now();
                let (states, failed, shuffled) =
                    self.local_states(view, snapshot, groups, progress).await?;
                let what = if shuffled {
                    "scan+shuffle+states"
                } else {
                    "scan+states"
                };
                compute.add(what, t.elapsed());
                (states, failed)
            }
            #[cfg(feature = "ballista")]
            Engine::Ballista(cluster) => {
                let store_url = self.storage.store_url();
                let out = match cluster
                    .states(
                        view,
                        &store_url,
                        &snapshot.files,
                        self.master.keyed(),
                        compute,
                    )
                    .await
                {
                    Ok(states) => (states, Vec::new()),
                    // The view fails on some events: the same rows fail
                    // anywhere, so find them here, file by file, as the
                    // local engine does.
                    Err(e) if ballista::failed_on_data(&e) => {
                        tracing::info!(view = view.name(), error = %crate::error::chain(&e), "the cluster's job failed on the view's own expressions; looking for the rows it fails on");
                        let t = Instant::now();
                        let events = self.master.events_schema().clone();
                        let out = states_file_by_file(
                            view,
                            &store_url,
                            &events,
                            &snapshot.files,
                            self.master.keyed(),
                        )
                        .await?;
                        compute.add("states of failing rows (local)", t.elapsed());
                        out
                    }
                    Err(e) => return Err(e.into()),
                };
                // The cluster reports no rows as it reads: the view's
                // events count as read once its states are back.
                progress
                    .done
                    .fetch_add(snapshot.events(), Ordering::Relaxed);
                out
            }
        };
        let excluded = failed.len() as u64;
        if !failed.is_empty() {
            let new = self.failures.record(&failed);
            tracing::warn!(
                view = view.name(),
                excluded,
                new,
                first = ?failed.first(),
                "the view fails on some events of the master dataset; they are left out of it"
            );
        }
        Ok((states, excluded))
    }

    /// The local engine: the files split among the cores, one task each,
    /// their states merged; the rows the view fails on, if any; and
    /// whether the events were shuffled by group key instead (a view that
    /// had `[batch] shuffle_above_groups` groups or more when it last ran:
    /// its `groups`).
    async fn local_states(
        &self,
        view: &Arc<View>,
        snapshot: &MasterSnapshot,
        groups: Option<u64>,
        progress: &Arc<Progress>,
    ) -> Result<(RecordBatch, Vec<FailedRow>, bool), BatchError> {
        let expected = groups;
        let groups = scan::balance(&snapshot.files, self.parallelism);
        let k = groups.len();
        let store_url = self.storage.store_url();
        let events = self.master.events_schema().clone();
        let keyed = self.master.keyed();
        if k > 1 && expected.is_some_and(|g| g >= self.policy.shuffle_above_groups) {
            let before = progress.done.load(Ordering::Relaxed);
            match self
                .shuffled_states(view, &store_url, &groups, keyed, progress)
                .await
            {
                Ok(Some(states)) => return Ok((states, Vec::new(), true)),
                Ok(None) => {}
                // Some rows fail the view: the per-core scans below find them.
                Err(e) => {
                    tracing::debug!(view = view.name(), error = %e, "a shuffled batch scan failed; scanning again file group by file group");
                    progress.done.store(before, Ordering::Relaxed);
                }
            }
        }
        let mut tasks = Vec::with_capacity(k);
        for group in groups {
            let view = view.clone();
            let store_url = store_url.clone();
            let events = events.clone();
            let progress = progress.clone();
            tasks.push(tokio::spawn(async move {
                let leaf = scan::parquet_leaf(
                    &store_url,
                    view.scan_schema(),
                    &group,
                    view.leaf_projection(),
                    keyed,
                )
                    .map_err(|e| ViewError::Exec {
                        view: view.name().to_string(),
                        source: e,
                    })?;
                let counted = Arc::new(scan::CountingExec::new(leaf, progress.done.clone()));
                let plan = view.scan_states_plan_over(counted)?;
                match view.run_states_plan(plan).await {
                    Ok(states) => Ok((states, Vec::new())),
                    // Some rows fail the view: find them file by file, as the
                    // speed layer does micro-batch by micro-batch.
                    Err(e) => {
                        tracing::debug!(view = view.name(), error = %e, "a batch scan failed; looking for the rows the view fails on");
                        states_file_by_file(&view, &store_url, &events, &group, keyed).await
                    }
                }
            }));
        }
        let mut parts = Vec::with_capacity(k);
        let mut failed = Vec::new();
        for t in tasks {
            let (states, rows) = t.await.map_err(|e| BatchError::Task(e.into()))??;
            parts.push(states);
            failed.extend(rows);
        }
        Ok((view.merge(parts).await?, failed, false))
    }
}

impl BatchLayer {
    /// A view's states over `groups` of files, one scan per group, the
    /// events shuffled among the cores by group key before they are
    /// aggregated (see [`View::shuffled_states_plan`]). `None` when the
    /// view cannot be computed so.
    async fn shuffled_states(
        &self,
        view: &Arc<View>,
        store_url: &str,
        groups: &[Vec<crate::master::DataFile>],
        keyed: bool,
        progress: &Arc<Progress>,
    ) -> Result<Option<RecordBatch>, ViewError> {
        let exec = |e| ViewError::Exec {
            view: view.name().to_string(),
            source: e,
        };
        let leaf = scan::parquet_leaf_groups(
            store_url,
            view.scan_schema(),
            groups,
            view.leaf_projection(),
            keyed,
        )
        .map_err(exec)?;
        let counted = Arc::new(scan::CountingExec::new(leaf, progress.done.clone()));
        let Some(plan) = view.shuffled_states_plan(counted, groups.len())? else {
            return Ok(None);
        };
        view.run_states_plan(plan).await.map(Some)
    }
}

/// Lets `views` read the master dataset on an object store (a local root
/// needs nothing).
fn register_store(storage: &Storage, views: &[Arc<View>]) {
    if storage.url().scheme() != "file" {
        let url = url::Url::parse(&storage.store_url()).expect("a store URL");
        for v in views {
            v.register_store(&url, storage.store().clone());
        }
    }
}

/// Where a run stands: what it reads and when.
#[derive(Clone, Copy)]
struct At<'a> {
    snapshot: &'a MasterSnapshot,
    run: u64,
    /// The rollup time.
    as_of_ms: i64,
    started_ms: i64,
    /// The published run it follows.
    prev: Option<&'a Manifest>,
}

/// The run number of a run's directory (`000000000042-<writer>`, or
/// `000000000042` as older versions named it).
fn run_of_dir(dir: &str) -> Option<u64> {
    dir.split('-').next()?.parse().ok()
}

/// A view's states over some files read whole, one file at a time, leaving
/// out the rows it fails on (named by partition and offset).
async fn states_file_by_file(
    view: &View,
    store_url: &str,
    events: &crate::schema::EventSchema,
    files: &[crate::master::DataFile],
    keyed: bool,
) -> Result<(RecordBatch, Vec<FailedRow>), ViewError> {
    let mut parts = Vec::with_capacity(files.len());
    let mut failed = Vec::new();
    for f in files {
        let read = scan::read_with_offsets(store_url, view.task_ctx(), events, f, keyed)
            .await
            .map_err(|e| ViewError::Exec {
                view: view.name().to_string(),
                source: e,
            })?;
        // The last two columns are `_partition` and `_offset`: kept for a
        // view that reads them, projected away for the others.
        let n = events.arrow().fields().len();
        let batches = if view.needs_offsets() {
            read.clone()
        } else {
            read.iter()
                .map(|b| b.project(&(0..n).collect::<Vec<_>>()))
                .collect::<Result<_, _>>()
                .map_err(|e| ViewError::Internal(e.into()))?
        };
        let (states, bad) = view.states_excluding(batches).await?;
        failed.extend(bad.into_iter().map(|x| {
            let b = &read[x.batch];
            FailedRow {
                view: view.name().to_string(),
                partition: b.column(n).as_primitive::<Int32Type>().value(x.row) as u32,
                offset: b.column(n + 1).as_primitive::<Int64Type>().value(x.row) as u64,
                error: x.error,
            }
        }));
        parts.push(states);
    }
    Ok((view.merge(parts).await?, failed))
}
