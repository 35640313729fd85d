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
use crate::stream::{DeadLetters, Decoder, Ingest, Log, LogError, LogOptions, Partitioning};
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
        "the master dataset holds partition {partition} up to offset {archived}, but the log ends at {log_end}\nhint: the log was deleted or replaced; restore it, or use a new data directory"
    )]
    LogBehind {
        partition: u32,
        archived: u64,
        log_end: u64,
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
    let storage = Storage::local(&config.data)?;
    let master = Arc::new(MasterDataset::open(&storage, schema, config.stream.partitions).await?);
    Ok(Arc::new(BatchLayer::new(storage, master, views)))
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
        let log = Arc::new(Log::open(
            config.data.join("log"),
            LogOptions {
                partitions: config.stream.partitions,
                segment_bytes: config.stream.segment_bytes.as_u64(),
                max_pending_bytes: config.ingest.max_pending.as_u64(),
                pending_wait: config.ingest.pending_wait,
                ..LogOptions::default()
            },
        )?);
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
        let ingest = Arc::new(Ingest::new(
            Decoder::new(schema, partitioning),
            log.clone(),
            Arc::new(dead),
        ));

        let batch = open_batch(&config).await?;
        let master = batch.master().clone();
        let cov = master.coverage();
        tracing::info!(version = cov.version, h = ?cov.h, "master dataset open");
        for (p, &h) in cov.h.iter().enumerate() {
            let end = log.end_offset(p as u32)?;
            if h > end {
                tracing::warn!(
                    partition = p,
                    archived = h,
                    log_end = end,
                    "the master dataset covers more than the log holds"
                );
            }
        }

        let status = Arc::new(Mutex::new(BatchStatus::default()));
        let node_health = Arc::new(Health::default());
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
                    // Only now, with a published run covering them, may the log forget events.
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
