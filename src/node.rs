//! A node: every layer of one process, opened on one data directory, and the
//! background loops that drive them. This module wires; the policies live in
//! their layers (startup checks and the batch loop in `cluster::driver`, the
//! micro-batch loop in `speed`, the archive queue in `master::archiver`, the
//! driver lease in `cluster::lease`).
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

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::batch::{BatchError, BatchLayer};
use crate::chunk::{ChunkRange, Coverage};
use crate::clock::{SharedClock, SystemClock};
use crate::cluster::driver::{self, Driver, DriverError};
pub use crate::cluster::driver::{BatchLock, BatchStatus, batch_lock};
use crate::cluster::lease::Lease;
use crate::config::{Config, ConfigError};
use crate::health::Health;
use crate::master::{MasterDataset, MasterError};
use crate::serving::Serving;
use crate::speed::{SpeedError, SpeedLayer, SpeedMetrics, SpeedOptions};
use crate::storage::{Storage, StorageError};
use crate::stream::Source;
use crate::stream::deadletter::DeadLetterError;
use crate::stream::ingest::Backlog;
use crate::stream::{DeadLetters, Decoder, Ingest, Log, LogError, LogOptions, Partitioning};
use crate::view::failures::ViewFailures;
use crate::view::{self, View, ViewError};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Log(#[from] LogError),
    #[error("{0}")]
    DeadLetter(#[from] DeadLetterError),
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Master(#[from] MasterError),
    #[error("{0}")]
    View(#[from] ViewError),
    #[error("{0}")]
    Batch(#[from] BatchError),
    #[error("{0}")]
    Engine(#[from] crate::batch::EngineError),
    #[error("{0}")]
    Driver(#[from] DriverError),
    #[error("{0}")]
    Speed(#[from] SpeedError),
    #[error("{0}")]
    Source(#[from] crate::stream::SourceError),
    #[error("{0}")]
    Identity(#[from] crate::cluster::identity::IdentityError),
    #[error("{0}")]
    Lease(#[from] crate::cluster::lease::LeaseError),
    #[error("{0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("{0}")]
    Requests(#[from] crate::stream::requests::RequestError),
    #[error("{0}")]
    Keys(#[from] crate::keys::KeyError),
}

/// A published run that cannot be read is the batch layer's error.
impl From<crate::runs::RunsError> for NodeError {
    fn from(e: crate::runs::RunsError) -> NodeError {
        NodeError::Batch(e.into())
    }
}

/// Settles what the stream decides rather than the configuration: a Kafka
/// topic's partition count is the topic's; a Kinesis stream's is the number
/// of shards its registry holds (every shard it ever had).
pub async fn resolve_stream(config: &mut Config) -> Result<(), NodeError> {
    let storage = config.storage()?;
    if let Some(n) = crate::stream::partitions(&config.stream, &storage).await? {
        if n != config.stream.partitions {
            tracing::info!(stream = ?config.stream.kafka.as_ref().map(|k| &k.topic).or(config.stream.kinesis.as_ref().map(|k| &k.stream)), partitions = n, "partitions from the stream");
        }
        config.stream.partitions = n;
    }
    Ok(())
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
    /// The stream the layers consume.
    pub source: Arc<dyn Source>,
    /// Whether this node drives (archives and runs the batch layer).
    pub lease: Arc<Lease>,
    /// The views as SQL tables (`POST /v1/sql`, the Postgres wire).
    pub catalog: Arc<crate::serving::query::Catalog>,
    /// Views changed while serving.
    pub changes: Arc<crate::batch::changes::ViewChanges>,
    /// The node's event schema (views added while serving compile against it).
    pub schema: Arc<crate::schema::EventSchema>,
    /// The stream the master dataset was written from, as recorded.
    pub stream_identity: Option<crate::cluster::identity::Recorded>,
}

/// What a reload did: the view changes it queued, and the saved changes
/// that override entries of the file.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Reloaded {
    pub changes: Vec<crate::batch::changes::ChangeStatus>,
    pub overrides: Vec<crate::batch::changes::Override>,
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

/// Opens the master dataset, views and batch layer of a configuration
/// (without the log: `rebuild` uses this while a server may be running).
pub async fn open_batch(config: &Config) -> Result<Arc<BatchLayer>, NodeError> {
    let mut config = config.clone();
    apply_saved_views(&mut config).await?;
    let schema = config.event_schema()?;
    let views = view::compile_all(&config.views, &schema).await?;
    resolve_stream(&mut config).await?;
    open_batch_with(&config, views).await
}

/// The config's views with the changes made while serving applied
/// ([`crate::batch::changes`]): what the node served when it stopped.
pub async fn apply_saved_views(config: &mut Config) -> Result<(), NodeError> {
    let saved = crate::batch::changes::Saved::load(&config.storage()?).await?;
    let (saved, left_out) = saved.usable(&config.event_schema()?).await;
    for e in &left_out {
        tracing::error!(view = %e.view, why = %e.why, "a view change saved in views/CHANGES.json is left out: this node cannot apply it; `DELETE /v1/views/{}/change` forgets it", e.view);
    }
    if !saved.put.is_empty() || !saved.dropped.is_empty() {
        tracing::info!(put = saved.put.len(), dropped = ?saved.dropped, "applying the view changes made while serving");
        config.views = saved.apply(std::mem::take(&mut config.views));
    }
    Ok(())
}

/// [`open_batch`] with the views already compiled from `config.views`: a
/// simulation that reopens a node many times compiles them once (compiling
/// is a pure function of the config; a restart must redo what reads data).
pub async fn open_batch_with(
    config: &Config,
    views: Vec<Arc<view::View>>,
) -> Result<Arc<BatchLayer>, NodeError> {
    // Every command that opens a data directory checks its partition count:
    // a batch run with another count would publish an H of the wrong length.
    // (An external stream may gain partitions; its node's log is never written.)
    let log_dir = config.local_dir().join("log");
    if let Some(found) = Log::partitions_in(&log_dir)?
        && found != config.stream.partitions
        && !config.stream.external()
    {
        return Err(LogError::PartitionMismatch {
            dir: log_dir,
            found,
            configured: config.stream.partitions,
        }
        .into());
    }
    open_batch_in(config, config.storage()?, views).await
}

/// [`open_batch_with`] on a storage root opened by the caller (a process
/// that talks to several stores, such as a test).
pub async fn open_batch_in(
    config: &Config,
    storage: crate::storage::Storage,
    views: Vec<Arc<view::View>>,
) -> Result<Arc<BatchLayer>, NodeError> {
    let schema = Arc::new(config.event_schema()?);
    let master = Arc::new(MasterDataset::open(&storage, schema, config.stream.partitions).await?);
    let failures = Arc::new(ViewFailures::new(
        config.local_dir().join("deadletter/views"),
    ));
    let engine = crate::batch::Engine::from_config(&config.batch)?;
    Ok(Arc::new(
        BatchLayer::new(storage, master, views, failures)
            .with_policy(
                crate::batch::Policy::of(&config.batch),
                crate::batch::history::Retention {
                    keep_runs: config.batch.keep_runs,
                    keep_for: config.batch.keep_for,
                },
            )
            .with_engine(engine)?,
    ))
}

/// Every layer of a node, opened and checked, with nothing running yet: what
/// [`Node::open`] starts its loops on, and what a simulation drives by hand.
pub struct Assembled {
    pub config: Config,
    pub log: Arc<Log>,
    /// What the speed layer and the archiver read: the embedded log, or the
    /// external stream the node consumes.
    pub source: Arc<dyn Source>,
    pub ingest: Arc<Ingest>,
    pub batch: Arc<BatchLayer>,
    pub serving: Arc<Serving>,
    pub speed: SpeedLayer,
    /// Chunks the speed layer closed, for the archiver.
    pub archive: mpsc::UnboundedReceiver<ChunkRange>,
    pub status: Arc<Mutex<BatchStatus>>,
    pub health: Arc<Health>,
    pub lease: Arc<Lease>,
    /// The stream the master dataset was written from, as recorded.
    pub identity: crate::cluster::identity::Recorded,
}

/// Opens every layer on `config.data`: the master dataset first (its
/// archived coverage is the floor below which the log never hands out an
/// offset again), the log, the published batch views (made whole and
/// covering the log's start by [`driver::prepare`]), serving and the speed
/// layer, caught up with the log. Time comes from `clock`.
pub async fn assemble(mut config: Config, clock: SharedClock) -> Result<Assembled, NodeError> {
    resolve_stream(&mut config).await?;
    // The views changed while serving are applied by `open_batch`.
    let batch = open_batch(&config).await?;
    assemble_over(config, clock, batch).await
}

/// [`assemble`] over a batch layer just opened by [`open_batch_with`].
pub async fn assemble_over(
    config: Config,
    clock: SharedClock,
    batch: Arc<BatchLayer>,
) -> Result<Assembled, NodeError> {
    // Resolved once, for every layer below.
    let storage = config.storage()?;
    let schema = Arc::new(config.event_schema()?);
    // Duplicates are found per partition: events of one key share one.
    let key_field = config
        .stream
        .key
        .as_ref()
        .or(config.schema.key.as_ref().map(|k| &k.field));
    let partitioning = match key_field {
        Some(key) => Partitioning::Key {
            field: schema.index_of(key).expect("config checked the key field"),
            partitions: config.stream.partitions,
            // The stream's own placement, as its other producers keyed by
            // the event key place records.
            by: if config.stream.kafka.is_some() {
                crate::stream::decode::KeyPlacement::Murmur2
            } else if config.stream.kinesis.is_some() {
                crate::stream::decode::KeyPlacement::Md5
            } else {
                crate::stream::decode::KeyPlacement::Crc32c
            },
        },
        None => Partitioning::RoundRobin,
    };
    let master = batch.master().clone();
    let cov = master.coverage();
    tracing::info!(version = cov.version, h = ?cov.h, "master dataset open");
    let health = Arc::new(Health::default());
    warn_left_out_changes(&storage, &schema, &health).await?;
    let log = open_log(&config, &master, &clock, &schema, &health)?;
    // The stream must be the one the master dataset was written from,
    // before anything reads it (positions of one are not the other's).
    let identity = crate::cluster::identity::check(&config, &log, &master, &health).await?;
    tracing::info!(stream = %identity.identity, generation = identity.generation, "stream identity");
    let dead = open_dead_letters(&config, &health)?;
    let opened = crate::stream::open(
        &config.stream,
        crate::stream::Context {
            log: log.clone(),
            storage: storage.clone(),
            schema: schema.clone(),
            dead: dead.clone(),
            health: health.clone(),
        },
    )
    .await?;
    let source = opened.source;
    let mut ingest = Ingest::new(Decoder::new(schema, partitioning), log.clone(), dead)
        .with_health(health.clone());
    // POST /v1/events produces into the stream the node consumes.
    if let Some(producer) = opened.producer {
        ingest.set_producer(producer);
    }
    ingest.backlog = Arc::new(Backlog::new(
        config.ingest.max_unpublished,
        config.ingest.max_realtime_memory.as_u64(),
    ));
    if !config.stream.external() {
        ingest.ledger = Some(open_ledger(&config, &log, &storage, &master).await?);
    }
    let ingest = Arc::new(ingest);

    let lease = crate::cluster::take_lease(&config, &clock, &master, &log).await?;
    if config.data_is_remote() && !config.stream.external() {
        // Only a valid holder acknowledges events of the embedded log.
        let _ = ingest.fence.set(lease.clone());
    }
    if !lease.is_held() {
        crate::cluster::follow_published_views(&batch, &health).await?;
    }
    let status = Arc::new(Mutex::new(BatchStatus {
        engine: batch.engine().name().to_string(),
        scheduler: batch.engine().scheduler(),
        ..BatchStatus::default()
    }));
    driver::prepare(
        &batch,
        source.as_ref(),
        &config.local_dir(),
        &status,
        &health,
        lease.is_held(),
    )
    .await?;

    // Serving: the published run, then the speed layer's replay from its H.
    let (serving, h) = open_serving(&config, &batch, &clock).await?;
    if source.resumes_by_token() {
        // Kinesis resumes after the sequence number the chunk ending at H keeps.
        let tokens = master.resume_tokens(&h).await?;
        source.clone().resume(&h, &tokens)?;
    }
    if config.stream.external() {
        crate::cluster::identity::watch(
            Arc::downgrade(&source),
            config.clone(),
            identity.identity.clone(),
            health.clone(),
        );
    }
    let (speed, archive) = start_speed(
        &config, &source, &serving, &batch, &ingest, &health, clock, &h,
    )
    .await?;
    Ok(Assembled {
        config,
        log,
        source,
        ingest,
        batch,
        serving,
        speed,
        archive,
        status,
        health,
        lease,
        identity,
    })
}

/// Saved view changes this node cannot apply are left out
/// (`apply_saved_views`); status says so until they are reverted or saved
/// over.
async fn warn_left_out_changes(
    storage: &crate::storage::Storage,
    schema: &crate::schema::EventSchema,
    health: &Health,
) -> Result<(), NodeError> {
    let (_, refused) = crate::batch::changes::Saved::load(storage)
        .await?
        .usable(schema)
        .await;
    if !refused.is_empty() {
        let list: Vec<String> = refused.iter().map(ToString::to_string).collect();
        health.warn(
            "view_changes",
            &format!(
                "left out of the saved view changes (views/CHANGES.json): {}",
                list.join("; ")
            ),
        );
    }
    Ok(())
}

/// The node's embedded log, its floors at the archived coverage when it is
/// the stream; what recovery repaired goes to `health`.
fn open_log(
    config: &Config,
    master: &MasterDataset,
    clock: &SharedClock,
    schema: &crate::schema::EventSchema,
    health: &Health,
) -> Result<Arc<Log>, LogError> {
    let cov = master.coverage();
    let log_dir = config.local_dir().join("log");
    let log_partitions = match Log::partitions_in(&log_dir)? {
        Some(found) if config.stream.external() => found,
        _ => config.stream.partitions,
    };
    let log = Arc::new(Log::open(
        log_dir,
        LogOptions {
            partitions: log_partitions,
            segment_bytes: config.stream.segment_bytes.as_u64(),
            max_pending_bytes: config.ingest.max_pending.as_u64(),
            pending_wait: config.ingest.pending_wait,
            // The archived coverage is the embedded log's floor only when
            // it is the stream (a Kafka node's log is never written).
            floors: if !config.stream.external() {
                cov.h.ends().to_vec()
            } else {
                Vec::new()
            },
            clock: clock.clone(),
            events: Some(schema.arrow().clone()),
            ..LogOptions::default()
        },
    )?);
    for r in log.recoveries() {
        health.recovered(&format!("log/p{}", r.partition), &r.to_string());
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
    Ok(log)
}

/// The request ledger of the embedded log: loaded from the snapshot and the
/// log's tags before anything is acknowledged, and written before each
/// commit to the master dataset.
async fn open_ledger(
    config: &Config,
    log: &Arc<Log>,
    storage: &Storage,
    master: &Arc<crate::master::MasterDataset>,
) -> Result<Arc<crate::stream::requests::Ledger>, NodeError> {
    use crate::stream::requests::{Bounds, Ledger};
    let ledger = Arc::new(Ledger::new(
        log.clone(),
        storage.clone(),
        Bounds::from(&config.ingest.idempotence),
    ));
    ledger.load(0).await?;
    let weak = Arc::downgrade(&ledger);
    master.set_before_commit(Arc::new(move |upto| {
        let weak = weak.clone();
        Box::pin(async move {
            match weak.upgrade() {
                Some(l) => l.persist(&upto).await.map_err(|e| e.to_string()),
                None => Ok(()),
            }
        })
    }));
    Ok(ledger)
}

/// The dead-letter store, bounded by the disk it is on.
fn open_dead_letters(
    config: &Config,
    health: &Arc<Health>,
) -> Result<Arc<DeadLetters>, DeadLetterError> {
    let dead_dir = config.local_dir().join("deadletter");
    let dead = DeadLetters::open_with(
        &dead_dir,
        crate::stream::deadletter::DeadLetterLimits::for_disk(
            &config.local_dir(),
            config.ingest.dead_letter_max.as_u64(),
        ),
    )?
    .with_health(health.clone());
    let dead = Arc::new(dead);
    Ok(dead)
}

/// Serving with the published run's batch views, and the coverage H the
/// speed layer starts from (a run from before the stream gained partitions
/// covers none of them).
async fn open_serving(
    config: &Config,
    batch: &Arc<BatchLayer>,
    clock: &SharedClock,
) -> Result<(Arc<Serving>, Coverage), NodeError> {
    let views = batch.views().to_vec();
    let serving = Arc::new(Serving::with_clock(
        views,
        config.stream.partitions,
        clock.clone(),
    ));
    let published = batch.current().await?;
    if let Some(m) = published.clone() {
        serving.set_batch(Arc::new(serving.load_side(batch.runs(), m).await?));
    }
    // A run from before the stream gained partitions covers none of them.
    let h = published
        .as_ref()
        .map_or_else(Coverage::empty, |m| m.h.clone())
        .widened(config.stream.partitions);
    Ok((serving, h))
}

/// The speed layer from H, with the chunks committed above it, caught up
/// with the stream; and the channel of the chunks it closes, for the
/// archiver.
#[allow(clippy::too_many_arguments)]
async fn start_speed(
    config: &Config,
    source: &Arc<dyn Source>,
    serving: &Arc<Serving>,
    batch: &BatchLayer,
    ingest: &Ingest,
    health: &Arc<Health>,
    clock: SharedClock,
    h: &Coverage,
) -> Result<(SpeedLayer, mpsc::UnboundedReceiver<ChunkRange>), NodeError> {
    let master = batch.master();
    let snapshot = master.snapshot().await?;
    let committed = (0..config.stream.partitions)
        .map(|p| snapshot.chunks(p))
        .collect();
    let (archive_tx, archive) = mpsc::unbounded_channel();
    let mut speed = SpeedLayer::new(
        source.clone(),
        serving.clone(),
        archive_tx,
        SpeedOptions {
            interval: config.speed.interval,
            chunk_events: config.archive.chunk_events,
            chunk_age: config.archive.chunk_age,
        },
        h,
        committed,
    );
    speed.health = health.clone();
    speed.failures = batch.failures().clone();
    speed.backlog = ingest.backlog.clone();
    speed.clock = clock;
    if master.keyed() {
        speed.recorded = Some(master.clone());
    }
    if let Some(rule) = master.events_schema().key() {
        let history: Arc<dyn crate::keys::History> = master.clone();
        let f = &master.events_schema().fields()[rule.field];
        speed.dedup = Some(crate::speed::Dedup::new(
            rule,
            &f.name,
            // An index of another master dataset (a local directory reused
            // for a new storage root, or copied) is rebuilt.
            format!("{}:{:?}:table {}", f.name, f.ty, master.id()),
            config.local_dir().join("keys"),
            history,
        )?);
    }
    let t = std::time::Instant::now();
    speed.catch_up().await?;
    tracing::info!(from = ?h, to = ?serving.snapshot().realtime_end, took_ms = t.elapsed().as_millis() as u64, "speed layer caught up with the log");
    Ok((speed, archive))
}

impl Node {
    /// Opens every layer (see [`assemble`]) and starts the background loops.
    pub async fn open(config: Config) -> Result<Node, NodeError> {
        let Assembled {
            config,
            log: _,
            source,
            ingest,
            batch,
            serving,
            mut speed,
            archive,
            status,
            health,
            lease,
            identity,
        } = assemble(config, SystemClock::shared()).await?;
        let master = batch.master().clone();
        let views = batch.views().to_vec();
        let batch_now = Arc::new(tokio::sync::Notify::new());
        // `config.views` are the file's (the saved changes were applied to
        // a copy).
        let changes = Arc::new(crate::batch::changes::ViewChanges::new(
            config.storage()?,
            config.views.clone(),
            Arc::new(config.event_schema()?),
        ));
        let layers = Arc::new(Layers {
            master: master.clone(),
            batch: batch.clone(),
            batch_status: status.clone(),
            serving: serving.clone(),
            speed: speed.metrics.clone(),
            batch_now: batch_now.clone(),
            health: health.clone(),
            source: source.clone(),
            lease: lease.clone(),
            catalog: Arc::new(crate::serving::query::Catalog::new(
                &serving,
                crate::serving::query::CATALOG,
            )),
            changes: changes.clone(),
            schema: Arc::new(config.event_schema()?),
            stream_identity: Some(identity),
        });
        let (stop, stop_rx) = watch::channel(false);
        let adopt = speed.changes();
        let duplicates = speed.dedup.as_ref().map(|d| d.duplicates.clone());
        let mut tasks = vec![tokio::spawn(speed.run(stop_rx.clone()))];
        let driver = Driver {
            batch,
            source: source.clone(),
            serving,
            local_dir: config.local_dir(),
            pause: config.batch.pause,
            poll: config.batch.poll,
            // A backlog merges into files of at most a few chunks' worth.
            archive_events: config.archive.chunk_events.saturating_mul(4),
            status,
            now: batch_now,
            health,
            lease,
            changes,
            speed: adopt,
            duplicates,
        };
        tasks.extend(driver.start(archive, stop_rx));
        Ok(Node {
            config,
            ingest,
            views,
            layers,
            stop,
            tasks: Mutex::new(tasks),
        })
    }

    /// The storage root of the master dataset and the views, as given.
    pub fn data_dir(&self) -> PathBuf {
        self.config.data.clone()
    }

    pub fn layers(&self) -> Arc<Layers> {
        self.layers.clone()
    }

    /// A config reload (SIGHUP): the views become the file's (with the
    /// changes made while serving on top, as at startup), each new or
    /// changed one built in the background and swapped in, each one gone
    /// dropped ([`crate::batch::changes`]). A change saved through the API
    /// overrides the file's entry of its view: the reload says which
    /// ([`Reloaded::overrides`]); `DELETE /v1/views/{name}/change` returns
    /// a view to the file's definition. A changed schema needs a restart;
    /// the views are reloaded anyway if they compile.
    pub async fn reload(&self, config: Config) -> Result<Reloaded, NodeError> {
        let l = &self.layers;
        let schema = config.event_schema()?;
        if schema.arrow() != l.schema.arrow() {
            tracing::warn!(
                "the reloaded config changes the event schema: restart the node to apply it (fields can only be added, nullable)"
            );
        }
        // Compiled before anything is kept: a file that does not compile
        // changes nothing.
        for def in &config.views {
            view::compile(def, &l.schema).await?;
        }
        l.changes.set_file(config.views.clone());
        let (saved, target) = l
            .changes
            .target()
            .await
            .map_err(crate::batch::BatchError::from)?;
        // Saved changes this node cannot apply are left out, as at startup:
        // said again at each reload, and no longer once they are gone.
        let (_, left_out) = saved.clone().usable(&l.schema).await;
        if left_out.is_empty() {
            l.health.unwarn("view_changes");
        } else {
            for e in &left_out {
                tracing::error!(view = %e.view, why = %e.why, "a view change saved in views/CHANGES.json is left out: this node cannot apply it");
            }
            let list: Vec<String> = left_out.iter().map(ToString::to_string).collect();
            l.health.warn(
                "view_changes",
                &format!(
                    "left out of the saved view changes (views/CHANGES.json): {}",
                    list.join("; ")
                ),
            );
        }
        let overrides = saved.overrides(&config.views);
        for o in &overrides {
            tracing::warn!(view = %o.view, saved = o.saved, "{o}; `DELETE /v1/views/{}/change` returns it to the file's definition", o.view);
        }
        let served: Vec<Arc<View>> = l.serving.live().into_iter().map(|(_, v)| v).collect();
        let changes = l.changes.reconcile(&target, &served, &l.batch).await?;
        if !changes.is_empty() {
            l.batch_now.notify_one();
        }
        Ok(Reloaded { changes, overrides })
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
