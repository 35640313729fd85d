//! The batch driver: the policies around batch runs — what must be published
//! before a node serves, one publish-and-retain cycle, the loop that repeats
//! it — and [`Driver`], the part of a node that archives and runs the batch
//! layer while the node holds the driver lease (see `lease`).
//!
//! ```text
//!  startup:  published views whole? ──no──▶ rebuild
//!            published H ≥ log start? ──no──▶ publish a run of the master dataset
//!  cycle:    lock ─▶ run (master @ v) ─▶ publish ─▶ swap into serving
//!                 ─▶ log retention below H   (only after the run's files are durable)
//!  loop:     holding the lease: cycle when the master dataset moved; on a
//!            corrupt master file, repair it from the log and go again
//!            not holding it:    poll CURRENT's version; load a new publish
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use super::lease::Lease;
use crate::batch::changes::ViewChanges;
use crate::batch::{BatchError, BatchLayer, Manifest, Progress, RunInfo};
use crate::chunk::{ChunkRange, Coverage};
use crate::health::Health;
use crate::master::{MasterError, Repair};
use crate::serving::{BatchSide, Serving};
use crate::stream::{LogError, Source, SourceError};

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{0}")]
    Batch(#[from] BatchError),
    #[error("{0}")]
    Log(#[from] LogError),
    #[error("{0}")]
    Source(#[from] SourceError),
    #[error("could not take the batch lock {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not record the accepted loss in {}", path.display())]
    Record {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "events of partition {partition} from offset {published} to {log_start} are in neither the master dataset nor the log\nhint: the log's segments below {log_start} were removed by hand, or the master dataset was restored from an older copy; restore them, or use a new data directory"
    )]
    LogBehind {
        partition: u32,
        published: u64,
        log_start: u64,
    },
    #[error("the speed layer could not adopt the changed views: {0}")]
    Adopt(String),
    #[error(
        "the published run computed view `{view}` for fingerprint {published}; compiled here its definition has fingerprint {here}\nhint: this node's event schema or version differs from the driver's in a field the view reads; restart it with the driver's config and version"
    )]
    Definition {
        view: String,
        published: String,
        here: String,
    },
}

/// A published run that cannot be read is the batch layer's error.
impl From<crate::runs::RunsError> for DriverError {
    fn from(e: crate::runs::RunsError) -> DriverError {
        DriverError::Batch(e.into())
    }
}

/// The views of published run `m` as this node serves them: each definition
/// the run publishes, the one of `current` of that name and fingerprint or
/// else compiled against `schema`. `None` when the run names no
/// definitions (a run of an older version) or they are `current`'s.
pub async fn published_views(
    m: &Manifest,
    current: &[Arc<crate::view::View>],
    schema: &crate::schema::EventSchema,
) -> Result<Option<Vec<Arc<crate::view::View>>>, DriverError> {
    if m.definitions.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(m.definitions.len());
    for def in &m.definitions {
        let Some(entry) = m.views.get(&def.name) else {
            continue;
        };
        let same = current
            .iter()
            .find(|v| v.name() == def.name && v.fingerprint() == entry.fingerprint);
        let v = match same {
            Some(v) => v.clone(),
            None => {
                let v = crate::view::compile(def, schema)
                    .await
                    .map_err(BatchError::from)?;
                if v.fingerprint() != entry.fingerprint {
                    return Err(DriverError::Definition {
                        view: def.name.clone(),
                        published: entry.fingerprint.clone(),
                        here: v.fingerprint().to_string(),
                    });
                }
                Arc::new(v)
            }
        };
        out.push(v);
    }
    let same = out.len() == current.len()
        && out
            .iter()
            .zip(current)
            .all(|(a, b)| a.name() == b.name() && a.fingerprint() == b.fingerprint());
    Ok((!same).then_some(out))
}

/// What [`accept_loss`] did: positions `[from, to)` of `partition` are
/// covered with no events, and run `run` published it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct AcceptedLoss {
    pub partition: u32,
    pub from: u64,
    pub to: u64,
    pub run: u64,
    /// When it was accepted (RFC 3339).
    pub at: String,
}

/// Where every accepted loss is recorded, one JSON object per line.
pub const LOSSES: &str = "stream/accepted-losses.ndjson";

/// Accepts that the stream no longer holds partition `p` below `stream_start`
/// (its retention removed events before they were archived): commits an
/// empty chunk `[archived, stream_start)` — the coverage moves past the gap,
/// idempotently, like any chunk — publishes a run, and records the loss in
/// [`LOSSES`]. `None` when nothing is missing. The caller makes sure no node
/// runs on `data` (it holds the log's lock).
pub async fn accept_loss(
    batch: &BatchLayer,
    data: &Path,
    p: u32,
    stream_start: u64,
) -> Result<Option<AcceptedLoss>, DriverError> {
    let _lock = batch_lock(data).await?;
    let master = batch.master();
    let archived = master.refresh().await.map_err(BatchError::from)?.h.get(p);
    if stream_start <= archived {
        return Ok(None);
    }
    let gap = ChunkRange::new(p, archived, stream_start, 0).expect("an empty range is valid");
    master
        .commit_chunk(gap, Vec::new(), None)
        .await
        .map_err(BatchError::from)?;
    let m = batch.run(None).await?;
    let loss = AcceptedLoss {
        partition: p,
        from: archived,
        to: stream_start,
        run: m.run,
        at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    };
    let path = data.join(LOSSES);
    let record = |source: std::io::Error| DriverError::Record {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(path.parent().expect("a parent")).map_err(record)?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(record)?;
    use std::io::Write;
    writeln!(f, "{}", serde_json::to_string(&loss).expect("serializes")).map_err(record)?;
    f.sync_all().map_err(record)?;
    Ok(Some(loss))
}

/// The batch layer's state, for `/v1/status`.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct BatchStatus {
    /// Where runs are computed: `local` or `ballista`.
    pub engine: String,
    /// The Ballista scheduler, with `ballista`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    pub published: Option<RunInfo>,
    /// The latest published runs, newest first (at most [`RECENT_RUNS`]).
    pub recent: std::collections::VecDeque<RunInfo>,
    /// When the run in progress started (ms since the epoch).
    pub running_since_ms: Option<i64>,
    pub runs: u64,
    pub last_error: Option<String>,
}

impl BatchStatus {
    fn published(&mut self, m: &Manifest) {
        self.published = Some(m.info.clone());
        if self.recent.front().map(|r| r.run) != Some(m.info.run) {
            self.recent.push_front(m.info.clone());
            self.recent.truncate(RECENT_RUNS);
        }
        self.runs += 1;
    }
}

/// Published runs `status` lists.
pub const RECENT_RUNS: usize = 10;

/// Holds the batch lock of a data directory while alive.
pub struct BatchLock {
    _file: std::fs::File,
}

/// Takes the data directory's batch lock (waiting for it).
pub async fn batch_lock(data: &Path) -> Result<BatchLock, DriverError> {
    let path = data.join("batch.lock");
    let p = path.clone();
    tokio::task::spawn_blocking(move || {
        // A node's local directory on an S3 root may not exist yet.
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)?;
        f.lock()?;
        Ok(BatchLock { _file: f })
    })
    .await
    .map_err(|e| DriverError::Lock {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?
    .map_err(|source| DriverError::Lock { path, source })
}

/// What must hold before a node serves: every view of the published run is
/// whole (else it is rebuilt), and the published H is at or above the log's
/// start in every partition — the speed layer replays the log from H. When
/// the log no longer holds H (`views/CURRENT` removed or restored from an
/// older copy, or the log restarted at the archived coverage), a run of the
/// master dataset is published first; it covers the log's start, since the
/// log deletes nothing the master dataset does not hold.
///
/// A node that does not hold the driver lease (`driving` false) repairs
/// nothing: it reports what it finds and serves what the driver publishes.
pub async fn prepare(
    batch: &BatchLayer,
    source: &dyn Source,
    data: &Path,
    status: &Mutex<BatchStatus>,
    health: &Health,
    driving: bool,
) -> Result<(), DriverError> {
    let _lock = batch_lock(data).await?;
    let check = batch.check().await?;
    if let Some(m) = &check.manifest {
        status.lock().expect("status lock").published = Some(m.info.clone());
    }
    if !driving {
        for (view, problem) in &check.problems {
            tracing::warn!(
                view,
                problem,
                "published batch view unusable; the driver rebuilds it"
            );
            health.report(&format!("view/{view}"), problem);
        }
        return Ok(());
    }
    if !check.is_ok() {
        for (view, problem) in &check.problems {
            tracing::warn!(
                view,
                problem,
                "published batch view unusable; rebuilding from the master dataset"
            );
            health.recovered(
                "batch",
                &format!("view `{view}`: {problem}; rebuilt from the master dataset at startup"),
            );
        }
        let m = run_before_serving(batch, health).await?;
        status.lock().expect("status lock").published(&m);
    }
    let behind = |h: &Coverage| -> Result<Option<(u32, u64, u64)>, SourceError> {
        for p in 0..source.partitions() {
            let start = source.start(p)?;
            let hp = h.get(p);
            if hp < start {
                return Ok(Some((p, hp, start)));
            }
        }
        Ok(None)
    };
    let h = batch.current().await?.map(|m| m.info.h).unwrap_or_default();
    if let Some((p, hp, start)) = behind(&h)? {
        tracing::warn!(
            partition = p,
            published = hp,
            log_start = start,
            "the published batch views end below the log's start; publishing a run of the master dataset before serving"
        );
        let m = run_before_serving(batch, health).await?;
        health.recovered(
            "batch",
            &format!(
                "the published batch views covered partition {p} up to {hp}, below the log's start {start}; published run {} from the master dataset (H = {:?}) before serving",
                m.run, m.h
            ),
        );
        status.lock().expect("status lock").published(&m);
        if let Some((partition, published, log_start)) = behind(&m.h)? {
            if !source.keeps_unarchived() {
                // An external stream's retention removed events before they
                // were archived: the speed layer stops that partition and
                // says so; the others serve.
                tracing::error!(
                    partition,
                    archived = published,
                    stream_start = log_start,
                    "events were removed from the stream before they were archived"
                );
                return Ok(());
            }
            return Err(DriverError::LogBehind {
                partition,
                published,
                log_start,
            });
        }
    }
    Ok(())
}

/// A run a node needs before it can serve at all. When the configured
/// cluster cannot compute it, this process does (both engines publish the
/// same states), and `health` says so: a node must not stay down because a
/// Ballista scheduler is.
async fn run_before_serving(batch: &BatchLayer, health: &Health) -> Result<Manifest, DriverError> {
    match batch.run(None).await {
        Err(BatchError::Engine(e)) => {
            let why = crate::error::chain(&e);
            tracing::warn!(error = %why, "the batch engine cannot compute the run needed before serving; computing it here");
            let m = batch
                .run_on(
                    &crate::batch::Engine::Local,
                    crate::batch::Recompute::Due,
                    None,
                )
                .await?;
            health.recovered(
                "batch",
                &format!(
                    "run {} was computed with the local engine before serving: {why}",
                    m.run
                ),
            );
            Ok(m)
        }
        r => Ok(r?),
    }
}

/// One cycle: run, publish, swap the run into serving, then let the log drop
/// what the run covers. Storage fsyncs every file before the publish names
/// it, so retention never outruns the durable copy.
pub async fn cycle(
    batch: &BatchLayer,
    source: &dyn Source,
    serving: &Serving,
    data: &Path,
    status: &Mutex<BatchStatus>,
    health: &Health,
) -> Result<Manifest, DriverError> {
    cycle_changing(batch, source, serving, data, status, health, None).await
}

/// Where a cycle with view changes sends them: the changes pending, and the
/// speed layer that adopts the new views ([`crate::serving::Adopt`]).
pub struct Changing<'a> {
    pub changes: &'a ViewChanges,
    pub speed: &'a tokio::sync::mpsc::UnboundedSender<crate::serving::Adopt>,
}

/// [`cycle`], applying the view changes pending first, if any: the run
/// computes the new views (in full) with the others, and the swap installs
/// them through the speed layer ([`crate::batch::changes`]).
pub async fn cycle_changing(
    batch: &BatchLayer,
    source: &dyn Source,
    serving: &Serving,
    data: &Path,
    status: &Mutex<BatchStatus>,
    health: &Health,
    changing: Option<Changing<'_>>,
) -> Result<Manifest, DriverError> {
    status.lock().expect("status lock").running_since_ms =
        Some(chrono::Utc::now().timestamp_millis());
    let result = async {
        let _lock = batch_lock(data).await?;
        let changing = changing.filter(|c| c.changes.pending());
        let Some(Changing { changes, speed }) = changing else {
            let m = batch.run(None::<Arc<Progress>>).await?;
            // The swap: realtime chunks the run covers leave in the same swap.
            let side = serving.load_side(batch.runs(), m.clone()).await?;
            serving.set_batch(Arc::new(side));
            release_free_memory();
            return Ok::<_, DriverError>(m);
        };
        let (taken, target) = changes.take(&batch.views());
        let names: Vec<&str> = taken.iter().map(|c| c.name()).collect();
        tracing::info!(views = ?names, "building changed views");
        let before = match batch.set_views(target) {
            Ok(b) => b,
            Err(e) => {
                changes.finish(Err((crate::error::chain(&e), false)));
                return Err(BatchError::Engine(e).into());
            }
        };
        crate::failpoint::hit("views-building");
        let progress = changes.progress.lock().expect("progress lock").clone();
        let swapped = async {
            let m = batch.run(Some(progress)).await?;
            crate::failpoint::hit("views-before-adopt");
            let (all, live) = serving.plan_views(&batch.views());
            let side = BatchSide::load(batch.runs(), m.clone(), &all, &live, &[]).await?;
            let (done, answer) = tokio::sync::oneshot::channel();
            let adopt = crate::serving::Adopt {
                views: all,
                live,
                side: Arc::new(side),
                done,
            };
            let gone = || DriverError::Adopt("the speed layer has stopped".into());
            speed.send(adopt).map_err(|_| gone())?;
            answer
                .await
                .map_err(|_| gone())?
                .map_err(DriverError::Adopt)?;
            Ok::<_, DriverError>(m)
        }
        .await;
        match &swapped {
            Ok(m) => {
                changes.finish(Ok(m.run));
                tracing::info!(run = m.run, views = ?names, "changed views are served");
            }
            Err(e) => {
                // Serving keeps the views it has; the next cycle tries again.
                batch.restore_views(before);
                changes.finish(Err((crate::error::chain(e), true)));
            }
        }
        release_free_memory();
        swapped
    }
    .await;
    status.lock().expect("status lock").running_since_ms = None;
    let m = result?;
    {
        let mut s = status.lock().expect("status lock");
        s.published(&m);
        s.last_error = None;
    }
    health.clear("batch");
    for (name, e) in &m.views {
        if e.excluded > 0 {
            health.report(
                &format!("view/{name}"),
                &format!(
                    "{} events of the master dataset are left out of the view: its expressions fail on them (listed in the dead-letter store's views/{name}.ndjson)",
                    e.excluded
                ),
            );
        }
    }
    crate::failpoint::trace(
        "retention",
        Path::new(&format!(
            "run={} version={} h={}",
            m.run,
            m.table_version,
            m.h.ends()
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        )),
    );
    // An external stream keeps its own retention (`None`).
    for (p, h) in m.h.iter() {
        let component = format!("retention/p{p}");
        match source.release_below(p, h) {
            Ok(None) => {}
            Ok(Some(start)) => {
                health.clear(&component);
                tracing::debug!(partition = p, start, "log retention")
            }
            Err(e) => {
                health.report_error(&component, &e);
                tracing::warn!(partition = p, error = %crate::error::chain(&e), "log retention failed")
            }
        }
    }
    Ok(m)
}

/// The part of a node that drives: the archiver and the batch loop (with
/// retention and repair), active while the node holds the driver lease.
/// `node.rs` builds it and calls [`Driver::start`].
pub struct Driver {
    pub batch: Arc<BatchLayer>,
    pub source: Arc<dyn Source>,
    pub serving: Arc<Serving>,
    /// The node's local directory (its batch lock).
    pub local_dir: PathBuf,
    /// Between batch runs.
    pub pause: Duration,
    /// Between looks at `CURRENT` while not driving.
    pub poll: Duration,
    /// A backlog merges into files of at most this many events.
    pub archive_events: u64,
    pub status: Arc<Mutex<BatchStatus>>,
    pub now: Arc<tokio::sync::Notify>,
    pub health: Arc<Health>,
    pub lease: Arc<Lease>,
    /// Views changed while serving, and the speed layer that adopts them.
    pub changes: Arc<ViewChanges>,
    pub speed: tokio::sync::mpsc::UnboundedSender<crate::serving::Adopt>,
    /// With `[schema] key`: the duplicates the speed layer found, for the archive.
    pub duplicates: Option<Arc<crate::keys::Duplicates>>,
}

impl Driver {
    /// Starts the lease keeper, the archive queue (fed by the speed layer's
    /// closed chunks) and the batch loop; all end at `stop`.
    pub fn start(
        self,
        chunks: tokio::sync::mpsc::UnboundedReceiver<ChunkRange>,
        stop: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        vec![
            tokio::spawn(self.lease.clone().run(self.health.clone(), stop.clone())),
            tokio::spawn(crate::master::archiver::run_queue(
                self.batch.master().clone(),
                self.source.clone(),
                chunks,
                self.archive_events,
                self.health.clone(),
                self.duplicates.clone(),
                self.lease.watch(),
                stop.clone(),
            )),
            tokio::spawn(self.run_loop(stop)),
        ]
    }

    /// The batch loop: holding the lease, a cycle when the master dataset
    /// has moved (or a rollup's boundary may have) — a failed cycle leaves
    /// the previous run published; not holding it, follow the driver's
    /// publishes.
    async fn run_loop(self, mut stop: watch::Receiver<bool>) {
        let mut role = self.lease.watch();
        let mut seen = None;
        let mut drove = false;
        loop {
            if *stop.borrow() {
                break;
            }
            let driving = self.lease.is_held();
            if driving && !drove {
                self.take_over_changes().await;
            }
            if drove && !driving {
                // Archiving and batch runs are the new driver's now: a
                // failure this node had at them is not left standing.
                for component in ["archive", "batch"] {
                    self.health
                        .handed_over(component, "another node drives now");
                }
            }
            drove = driving;
            if driving {
                // Views may change while serving.
                let has_rollup = self.batch.views().iter().any(|v| v.rollup().is_some());
                self.drive(has_rollup).await;
            } else {
                self.follow(&mut seen).await;
            }
            tokio::select! {
                _ = tokio::time::sleep(if driving { self.pause } else { self.poll }) => {}
                _ = self.now.notified(), if driving => {}
                _ = role.changed() => {}
                _ = stop.changed() => {}
            }
        }
    }

    async fn drive(&self, has_rollup: bool) {
        let (batch, health) = (&self.batch, &self.health);
        let published_version = self
            .status
            .lock()
            .expect("status lock")
            .published
            .as_ref()
            .map(|p| p.table_version);
        let latest = batch.master().refresh().await.map(|c| c.version);
        let due = match (&latest, published_version) {
            (Ok(v), Some(p)) => *v != p || has_rollup || self.changes.pending(),
            (Ok(v), None) => *v >= 0,
            (Err(_), _) => false,
        };
        if due
            && let Err(e) = cycle_changing(
                batch,
                self.source.as_ref(),
                &self.serving,
                &self.local_dir,
                &self.status,
                health,
                Some(Changing {
                    changes: &self.changes,
                    speed: &self.speed,
                }),
            )
            .await
        {
            self.status.lock().expect("status lock").last_error = Some(crate::error::chain(&e));
            if let DriverError::Batch(BatchError::LostRace { .. }) = &e {
                // Another driver's run is published: follow it.
                tracing::warn!(error = %crate::error::chain(&e), "another driver published first");
                return;
            }
            if let DriverError::Batch(BatchError::PublishUnknown { run, .. }) = &e {
                // Neither "published" nor "not": the next cycle reads CURRENT.
                tracing::error!(run, error = %crate::error::chain(&e), "batch run computed; whether it is published is unknown until views/CURRENT can be read");
                health.report_error("batch", &e);
                return;
            }
            tracing::error!(error = %crate::error::chain(&e), "batch run failed; the previous run stays published");
            health.report_error("batch", &e);
            if let DriverError::Batch(BatchError::Master(bad)) = &e {
                self.repair_master(bad).await;
            }
        } else if let Err(e) = &latest {
            health.report_error("master", e);
            tracing::warn!(error = %crate::error::chain(&e), "could not read the master dataset");
        }
        if latest.is_ok() {
            health.clear("master");
        }
        if latest.is_ok() {
            // Now and then, one verified file read again (damage done after
            // it was verified; `recheck` keeps the pace).
            if let Err(bad) = batch.master().recheck().await {
                tracing::error!(error = %crate::error::chain(&bad), "a master dataset file was damaged after it was verified");
                self.repair_master(&bad).await;
            }
        }
        let foreign = batch.master().foreign();
        if !foreign.is_empty() {
            let list: Vec<String> = foreign
                .iter()
                .map(|f| format!("{} ({} rows: {})", f.path, f.rows, f.why))
                .collect();
            health.warn(
                "master-foreign",
                &format!(
                    "left out of the batch views: {} file(s) lambdaflow did not write: {}",
                    foreign.len(),
                    list.join("; ")
                ),
            );
        }
    }

    /// Rewrites a corrupt or missing master dataset file from the stream
    /// while it holds its events; says how to restore it otherwise.
    async fn repair_master(&self, bad: &MasterError) {
        let health = &self.health;
        let batch = &self.batch;
        if matches!(
            bad,
            MasterError::Lost { .. } | MasterError::Missing { chunk: None, .. }
        ) {
            self.restore_master().await;
            return;
        }
        let (MasterError::Corrupt { path, .. } | MasterError::Missing { path, .. }) = bad else {
            return;
        };
        {
            let what = if matches!(bad, MasterError::Missing { .. }) {
                "missing"
            } else {
                "corrupt"
            };
            match batch.master().repair(bad, self.source.as_ref()).await {
                Ok(Repair::NotInTable) => {
                    tracing::info!(
                        path,
                        "a {what} master dataset file is no longer in the table (compacted away): nothing to repair"
                    );
                    self.now.notify_one();
                }
                Ok(Repair::Rewrote) => {
                    tracing::warn!(path, "rewrote a {what} master dataset file from the stream");
                    health.recovered(
                        "master",
                        &format!(
                            "rewrote {what} {path} from {} (its checksum matches again)",
                            self.source.describe()
                        ),
                    );
                    self.now.notify_one();
                }
                Ok(Repair::Cannot) => {
                    let range = match bad {
                        MasterError::Corrupt {
                            partition,
                            start,
                            end,
                            ..
                        } => Some((*partition, *start, *end)),
                        MasterError::Missing {
                            chunk: Some((p, s, e, _)),
                            ..
                        } => Some((*p, *s, *e)),
                        _ => None,
                    };
                    if let Some((partition, start, end)) = range {
                        let lost = MasterError::Unrepairable {
                            path: path.clone(),
                            what,
                            partition,
                            start,
                            end,
                        };
                        tracing::error!(error = %crate::error::Report::of(&lost), "a master dataset file cannot be rewritten from the log");
                        health.report("batch", &crate::error::Report::of(&lost));
                    } else {
                        health.report("batch", &crate::error::Report::of(bad));
                    }
                }
                Err(e) => {
                    tracing::warn!(path, error = %crate::error::chain(&e), "could not repair a master dataset file")
                }
            }
        }
    }

    /// Commits again from the log what the table's files no longer hold
    /// (a rewrite by another engine mixed lambdaflow's rows with its own, a
    /// compaction's file deleted by hand); says how to restore it from a
    /// backup when the log no longer holds it.
    async fn restore_master(&self) {
        let health = &self.health;
        match self.batch.master().restore(self.source.as_ref()).await {
            Ok(Some(r)) => {
                let ranges: Vec<String> = r.ranges.iter().map(|c| c.to_string()).collect();
                tracing::warn!(
                    version = r.version,
                    ranges = ?ranges,
                    removed = ?r.removed,
                    "committed again from the stream what the master dataset's files no longer held"
                );
                health.recovered(
                    "master",
                    &format!(
                        "committed {} again from {} (table version {}){}",
                        ranges.join(", "),
                        self.source.describe(),
                        r.version,
                        if r.removed.is_empty() {
                            String::new()
                        } else {
                            format!(
                                ", and removed from the table the files gone from storage: {}",
                                r.removed.join(", ")
                            )
                        }
                    ),
                );
                self.now.notify_one();
            }
            Ok(None) => {}
            Err(e @ (MasterError::Unrepairable { .. } | MasterError::LostForGood { .. })) => {
                tracing::error!(error = %crate::error::Report::of(&e), "the master dataset lost events the log no longer holds");
                health.report("batch", &crate::error::Report::of(&e));
            }
            Err(e) => {
                tracing::warn!(error = %crate::error::chain(&e), "could not commit again what the master dataset lost")
            }
        }
    }

    /// Loads the driver's new publish into serving, if `CURRENT` changed
    /// since `seen` (one small request per poll when nothing changed). When
    /// the run's views differ from those served (a view changed on the
    /// driver), this node adopts the run's definitions as the driver did:
    /// the batch layer computes them should it drive, the speed layer
    /// computes their realtime states, serving swaps them in with the run.
    async fn follow(&self, seen: &mut Option<crate::storage::Version>) {
        let result = async {
            let version = self.batch.current_version().await?;
            if seen.as_ref() == Some(&version) {
                return Ok(());
            }
            let Some(m) = self.batch.current().await? else {
                *seen = Some(version);
                return Ok(());
            };
            let serving_run = self
                .serving
                .snapshot()
                .batch
                .as_ref()
                .map(|b| b.manifest.run);
            if serving_run.is_none_or(|r| r < m.run) {
                let schema = self.batch.master().events_schema().clone();
                match published_views(&m, &self.batch.views(), &schema).await? {
                    None => {
                        let side = self.serving.load_side(self.batch.runs(), m.clone()).await?;
                        self.serving.set_batch(Arc::new(side));
                    }
                    Some(views) => self.adopt(&m, views).await?,
                }
                self.status.lock().expect("status lock").published(&m);
                // What the run covers will not be read again here.
                for (p, h) in m.h.iter() {
                    self.source.archived(p, h);
                }
                tracing::debug!(run = m.run, h = ?m.h, "loaded the driver's publish");
            }
            *seen = Some(version);
            Ok::<_, DriverError>(())
        }
        .await;
        match result {
            Ok(()) => self.health.clear("follow"),
            Err(e) => {
                tracing::warn!(error = %crate::error::chain(&e), "could not load the driver's publish");
                self.health.report_error("follow", &e);
            }
        }
    }

    /// Serves run `m` with its views `views` (changed on the driver): as
    /// a cycle with view changes swaps them in, through the speed layer.
    async fn adopt(
        &self,
        m: &Manifest,
        views: Vec<Arc<crate::view::View>>,
    ) -> Result<(), DriverError> {
        let names: Vec<&str> = views.iter().map(|v| v.name()).collect();
        tracing::info!(run = m.run, views = ?names, "adopting the views of the driver's publish");
        let before = self.batch.set_views(views).map_err(BatchError::from)?;
        let adopted = async {
            let (all, live) = self.serving.plan_views(&self.batch.views());
            let side = BatchSide::load(self.batch.runs(), m.clone(), &all, &live, &[]).await?;
            let (done, answer) = tokio::sync::oneshot::channel();
            let gone = || DriverError::Adopt("the speed layer has stopped".into());
            self.speed
                .send(crate::serving::Adopt {
                    views: all,
                    live,
                    side: Arc::new(side),
                    done,
                })
                .map_err(|_| gone())?;
            answer
                .await
                .map_err(|_| gone())?
                .map_err(DriverError::Adopt)
        }
        .await;
        if adopted.is_err() {
            self.batch.restore_views(before);
        }
        adopted
    }

    /// A node that starts driving (at startup, or taking over from another
    /// driver) builds what the config file and the saved changes
    /// (`views/CHANGES.json`) say: a change saved on the previous driver and
    /// not yet published is queued here, not lost (nor reverted).
    async fn take_over_changes(&self) {
        let result = async {
            let (saved, target) = self.changes.target().await?;
            let served: Vec<Arc<crate::view::View>> =
                self.serving.live().into_iter().map(|(_, v)| v).collect();
            let queued = self
                .changes
                .reconcile(&target, &served, &self.batch)
                .await?;
            Ok::<_, crate::batch::BatchError>((saved, queued))
        }
        .await;
        match result {
            Ok((saved, queued)) => {
                // A change is the saved one's, or this node's config file
                // differs from the published run (another node's file was
                // edited and reloaded there): say which.
                let mut from_file = Vec::new();
                for c in &queued {
                    if saved.put.iter().any(|p| p.name == c.view) || saved.dropped.contains(&c.view)
                    {
                        tracing::info!(view = %c.view, change = c.change, "driving: building a view change saved in views/CHANGES.json");
                    } else {
                        tracing::warn!(view = %c.view, change = c.change, "driving: building this node's config file's definition of the view, which the published run does not serve (a change reverted or dropped on the previous driver and not yet published, or a config file that differs between nodes)");
                        from_file.push(format!("`{}` ({})", c.view, c.change));
                    }
                }
                self.health.clear("view_changes/driver");
                if from_file.is_empty() {
                    self.health.clear("view_changes/config");
                } else {
                    self.health.warn(
                        "view_changes/config",
                        &format!(
                            "building this node's config file's definitions of views the published run serves otherwise: {}. Expected after a revert or drop made through the API on the previous driver and not yet published; otherwise the nodes' config files differ: give every node the same config file (a SIGHUP applies an edited file on its own node only), or change views through the API (saved for the whole cluster)",
                            from_file.join(", ")
                        ),
                    );
                }
            }
            Err(e) => {
                tracing::error!(error = %crate::error::chain(&e), "driving: the saved view changes cannot be applied");
                self.health.report_error("view_changes/driver", &e);
            }
        }
    }
}

/// Hands memory freed by dropped realtime chunks back to the OS: glibc keeps
/// freed heap in its arenas otherwise, and the process would keep the RSS of
/// its largest realtime window forever.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists; it has no
    // preconditions and may run at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
