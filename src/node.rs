//! A node: every layer of one process, opened on one data directory, and the
//! background loops that drive them.
//!
//! ```text
//!  data/
//!    log/          the embedded stream                      (stream::log)
//!    deadletter/   refused lines, with reasons              (stream::deadletter)
//!    master/       the Delta Lake table of all events       (master)
//!    views/        batch views, runs, CURRENT               (batch)
//!    batch.lock    one batch writer at a time (serve, rebuild)
//!
//!  loops:  speed    ── log → realtime chunk states → serving snapshot; closes chunks
//!          archive  ── closed chunks → master dataset commits
//!          batch    ── master dataset → views, publish, swap into serving, then
//!                      log retention below H
//! ```

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::batch::{BatchError, BatchLayer, Progress, RunInfo};
use crate::config::{Config, ConfigError};
use crate::health::Health;
use crate::master::{MasterDataset, MasterError, archiver};
use crate::serving::{BatchSide, Serving};
use crate::speed::{SpeedError, SpeedLayer, SpeedMetrics, SpeedOptions};
use crate::storage::{Storage, StorageError};
use crate::stream::deadletter::DeadLetterError;
use crate::stream::ingest::Backlog;
use crate::stream::{DeadLetters, Decoder, Ingest, Log, LogError, LogOptions, Partitioning};
use crate::view::failures::ViewFailures;
use crate::view::{self, View, ViewError};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    DeadLetter(#[from] DeadLetterError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Master(#[from] MasterError),
    #[error(transparent)]
    View(#[from] ViewError),
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error(transparent)]
    Speed(#[from] SpeedError),
    #[error(
        "events of partition {partition} from offset {published} to {log_start} are in neither the master dataset nor the log\nhint: the log's segments below {log_start} were removed by hand, or the master dataset was restored from an older copy; restore them, or use a new data directory"
    )]
    LogBehind {
        partition: u32,
        published: u64,
        log_start: u64,
    },
    #[error("could not take the batch lock {}: {source}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The batch layer's state, for `/v1/status`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BatchStatus {
    pub published: Option<RunInfo>,
    /// When the run in progress started (ms since the epoch).
    pub running_since_ms: Option<i64>,
    pub runs: u64,
    pub last_error: Option<String>,
}

/// What the API reads of the layers.
pub struct Layers {
    pub master: Arc<MasterDataset>,
    pub batch: Arc<BatchLayer>,
    pub batch_status: Arc<Mutex<BatchStatus>>,
    pub serving: Arc<Serving>,
    pub speed: Arc<SpeedMetrics>,
    /// Wakes the batch loop for a run now (demo, tests).
    pub batch_now: Arc<tokio::sync::Notify>,
    /// Failures being retried, and repairs made.
    pub health: Arc<Health>,
}

/// The layers of one process.
pub struct Node {
    pub config: Config,
    pub ingest: Arc<Ingest>,
    pub views: Vec<Arc<View>>,
    layers: Arc<Layers>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// Holds the batch lock of a data directory while alive.
pub struct BatchLock {
    _file: std::fs::File,
}

/// Takes the data directory's batch lock (waiting for it).
pub async fn batch_lock(data: &std::path::Path) -> Result<BatchLock, NodeError> {
    let path = data.join("batch.lock");
    let p = path.clone();
    tokio::task::spawn_blocking(move || {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)?;
        f.lock()?;
        Ok(BatchLock { _file: f })
    })
    .await
    .map_err(|e| NodeError::Lock {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?
    .map_err(|source| NodeError::Lock { path, source })
}

/// Opens the master dataset, views and batch layer of a configuration
/// (without the log: `rebuild` uses this while a server may be running).
pub async fn open_batch(config: &Config) -> Result<Arc<BatchLayer>, NodeError> {
    let schema = Arc::new(config.event_schema()?);
    let views = view::compile_all(&config.views, &schema).await?;
    // Every command that opens a data directory checks its partition count:
    // a batch run with another count would publish an H of the wrong length.
    let log_dir = config.data.join("log");
    if let Some(found) = Log::partitions_in(&log_dir)?
        && found != config.stream.partitions
    {
        return Err(LogError::PartitionMismatch {
            dir: log_dir,
            found,
            configured: config.stream.partitions,
        }
        .into());
    }
    let storage = Storage::local(&config.data)?;
    let master = Arc::new(MasterDataset::open(&storage, schema, config.stream.partitions).await?);
    let failures = Arc::new(ViewFailures::new(config.data.join("deadletter/views")));
    Ok(Arc::new(BatchLayer::new(storage, master, views, failures)))
}

impl Node {
    /// Opens every layer, verifies the published batch views (rebuilding any
    /// that is missing or corrupt) and starts the background loops.
    pub async fn open(config: Config) -> Result<Node, NodeError> {
        let schema = Arc::new(config.event_schema()?);
        let partitioning = match &config.stream.key {
            Some(key) => Partitioning::Key {
                field: schema.index_of(key).expect("config checked the key field"),
                partitions: config.stream.partitions,
            },
            None => Partitioning::RoundRobin,
        };
        // The master dataset first: its archived coverage is the floor below
        // which the log may never hand out an offset again.
        let batch = open_batch(&config).await?;
        let master = batch.master().clone();
        let cov = master.coverage();
        tracing::info!(version = cov.version, h = ?cov.h, "master dataset open");
        let node_health = Arc::new(Health::default());
        let log = Arc::new(Log::open(
            config.data.join("log"),
            LogOptions {
                partitions: config.stream.partitions,
                segment_bytes: config.stream.segment_bytes.as_u64(),
                max_pending_bytes: config.ingest.max_pending.as_u64(),
                pending_wait: config.ingest.pending_wait,
                floors: cov.h.clone(),
                ..LogOptions::default()
            },
        )?);
        for r in log.recoveries() {
            node_health.recovered(&format!("log/p{}", r.partition), &r.to_string());
        }
        for s in log.stats() {
            tracing::info!(
                partition = s.partition,
                start = s.start,
                end = s.end,
                segments = s.segments,
                "log partition open"
            );
        }
        let dead = DeadLetters::open(config.data.join("deadletter"))?;
        let mut ingest = Ingest::new(
            Decoder::new(schema, partitioning),
            log.clone(),
            Arc::new(dead),
        );
        ingest.backlog = Arc::new(Backlog::new(
            config.ingest.max_unpublished,
            config.ingest.max_realtime_memory.as_u64(),
        ));
        let ingest = Arc::new(ingest);

        let status = Arc::new(Mutex::new(BatchStatus::default()));
        // Before serving: the published views must be whole, or be rebuilt.
        {
            let _lock = batch_lock(&config.data).await?;
            let health = batch.check().await?;
            if let Some(m) = &health.manifest {
                status.lock().expect("status lock").published = Some(m.info.clone());
            }
            if !health.is_ok() {
                for (view, problem) in &health.problems {
                    tracing::warn!(
                        view,
                        problem,
                        "published batch view unusable; rebuilding from the master dataset"
                    );
                    node_health.recovered(
                        "batch",
                        &format!(
                            "view `{view}`: {problem}; rebuilt from the master dataset at startup"
                        ),
                    );
                }
                let m = batch.run(None, None).await?;
                let mut s = status.lock().expect("status lock");
                s.published = Some(m.info.clone());
                s.runs += 1;
            }
            // The speed layer replays the log from the published H: if the log
            // no longer holds it (CURRENT removed or restored from an older
            // copy, or the log restarted at the archived coverage), publish a
            // run of the master dataset first, which covers the log's start.
            let published = batch.current().await?;
            let behind = |h: &[u64]| -> Result<Option<(u32, u64, u64)>, LogError> {
                for p in 0..config.stream.partitions {
                    let start = log.start_offset(p)?;
                    let hp = h.get(p as usize).copied().unwrap_or(0);
                    if hp < start {
                        return Ok(Some((p, hp, start)));
                    }
                }
                Ok(None)
            };
            let h = published.as_ref().map(|m| m.h.clone()).unwrap_or_default();
            if let Some((p, hp, start)) = behind(&h)? {
                tracing::warn!(
                    partition = p,
                    published = hp,
                    log_start = start,
                    "the published batch views end below the log's start; publishing a run of the master dataset before serving"
                );
                let m = batch.run(None, None).await?;
                node_health.recovered(
                    "batch",
                    &format!(
                        "the published batch views covered partition {p} up to {hp}, below the log's start {start}; published run {} from the master dataset (H = {:?}) before serving",
                        m.run, m.h
                    ),
                );
                let mut s = status.lock().expect("status lock");
                s.published = Some(m.info.clone());
                s.runs += 1;
                if let Some((partition, published, log_start)) = behind(&m.h)? {
                    return Err(NodeError::LogBehind {
                        partition,
                        published,
                        log_start,
                    });
                }
            }
        }

        let views = batch.views().to_vec();
        // Serving: the published run, then the speed layer's replay from its H.
        let serving = Arc::new(Serving::new(views.clone(), config.stream.partitions));
        let published = batch.current().await?;
        if let Some(m) = published.clone() {
            serving.set_batch(Arc::new(BatchSide::load(&batch, m).await?));
        }
        let h = published.as_ref().map_or_else(
            || vec![0; config.stream.partitions as usize],
            |m| m.h.clone(),
        );
        let snapshot = master.snapshot().await?;
        let committed = (0..config.stream.partitions)
            .map(|p| snapshot.chunks(p))
            .collect();
        let (archive_tx, archive_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut speed = SpeedLayer::new(
            log.clone(),
            serving.clone(),
            archive_tx,
            SpeedOptions {
                interval: config.speed.interval,
                chunk_events: config.archive.chunk_events,
                chunk_age: config.archive.chunk_age,
            },
            &h,
            committed,
        );
        speed.health = node_health.clone();
        speed.failures = batch.failures().clone();
        speed.backlog = ingest.backlog.clone();
        let t = std::time::Instant::now();
        speed.catch_up().await?;
        tracing::info!(from = ?h, to = ?serving.snapshot().realtime_end, took_ms = t.elapsed().as_millis() as u64, "speed layer caught up with the log");

        let batch_now = Arc::new(tokio::sync::Notify::new());
        let layers = Arc::new(Layers {
            master: master.clone(),
            batch: batch.clone(),
            batch_status: status.clone(),
            serving: serving.clone(),
            speed: speed.metrics.clone(),
            batch_now: batch_now.clone(),
            health: node_health.clone(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let tasks = vec![
            tokio::spawn(speed.run(stop_rx.clone())),
            tokio::spawn(archiver::run_queue(
                master.clone(),
                log.clone(),
                archive_rx,
                node_health.clone(),
                stop_rx.clone(),
            )),
            tokio::spawn(batch_loop(
                batch.clone(),
                log.clone(),
                serving,
                config.data.clone(),
                config.batch.pause,
                status,
                batch_now,
                node_health,
                stop_rx,
            )),
        ];
        Ok(Node {
            config,
            ingest,
            views,
            layers,
            stop,
            tasks: Mutex::new(tasks),
        })
    }

    pub fn data_dir(&self) -> PathBuf {
        self.config.data.clone()
    }

    pub fn layers(&self) -> Arc<Layers> {
        self.layers.clone()
    }

    /// Stops the loops, then the log, after what they hold is durable.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        let tasks: Vec<_> = std::mem::take(&mut *self.tasks.lock().expect("tasks lock"));
        for t in tasks {
            let _ = t.await;
        }
        self.ingest.log().shutdown();
    }
}

/// The batch loop: run when the master dataset has moved (or a rollup's
/// boundary may have), publish, then let the log drop what the run covers.
#[allow(clippy::too_many_arguments)]
async fn batch_loop(
    batch: Arc<BatchLayer>,
    log: Arc<Log>,
    serving: Arc<Serving>,
    data: PathBuf,
    pause: Duration,
    status: Arc<Mutex<BatchStatus>>,
    now: Arc<tokio::sync::Notify>,
    health: Arc<Health>,
    mut stop: watch::Receiver<bool>,
) {
    let has_rollup = batch.views().iter().any(|v| v.rollup().is_some());
    loop {
        if *stop.borrow() {
            break;
        }
        let published_version = status
            .lock()
            .expect("status lock")
            .published
            .as_ref()
            .map(|p| p.table_version);
        let latest = batch.master().refresh().await.map(|c| c.version);
        let due = match (&latest, published_version) {
            (Ok(v), Some(p)) => *v != p || has_rollup,
            (Ok(v), None) => *v >= 0,
            (Err(_), _) => false,
        };
        if due {
            status.lock().expect("status lock").running_since_ms =
                Some(chrono::Utc::now().timestamp_millis());
            let result = async {
                let _lock = batch_lock(&data).await?;
                let m = batch.run(None, None::<Arc<Progress>>).await?;
                // Swap the run into serving (realtime chunks it covers leave in the same swap).
                let side = BatchSide::load(&batch, m.clone()).await?;
                serving.set_batch(Arc::new(side));
                release_free_memory();
                Ok::<_, NodeError>(m)
            }
            .await;
            status.lock().expect("status lock").running_since_ms = None;
            match result {
                Ok(m) => {
                    {
                        let mut s = status.lock().expect("status lock");
                        s.published = Some(m.info.clone());
                        s.runs += 1;
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
                    // Only now, with a published run covering them (its files,
                    // manifest and the Delta commits it read fsynced), may the
                    // log forget events.
                    crate::failpoint::trace(
                        "retention",
                        std::path::Path::new(&format!(
                            "run={} version={} h={}",
                            m.run,
                            m.table_version,
                            m.h.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
                        )),
                    );
                    for (p, &h) in m.h.iter().enumerate() {
                        let component = format!("retention/p{p}");
                        match log.delete_below(p as u32, h) {
                            Ok(start) => {
                                health.clear(&component);
                                tracing::debug!(partition = p, start, "log retention")
                            }
                            Err(e) => {
                                health.report(&component, &e);
                                tracing::warn!(partition = p, error = %e, "log retention failed")
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "batch run failed; the previous run stays published");
                    status.lock().expect("status lock").last_error = Some(e.to_string());
                    health.report("batch", &e);
                    if let NodeError::Batch(BatchError::Master(
                        bad @ MasterError::Corrupt { path, .. },
                    )) = &e
                    {
                        match batch.master().repair(bad, &log).await {
                            Ok(true) => {
                                tracing::warn!(
                                    path,
                                    "rewrote a corrupt master dataset file from the log"
                                );
                                health.recovered(
                                    "master",
                                    &format!(
                                        "rewrote {path} from the log (its checksum matches again)"
                                    ),
                                );
                                now.notify_one();
                            }
                            Ok(false) => {}
                            Err(e) => {
                                tracing::warn!(path, error = %e, "could not repair a master dataset file")
                            }
                        }
                    }
                }
            }
        } else if let Err(e) = &latest {
            health.report("master", e);
            tracing::warn!(error = %e, "could not read the master dataset");
        }
        if latest.is_ok() {
            health.clear("master");
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = now.notified() => {}
            _ = stop.changed() => {}
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
