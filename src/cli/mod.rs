//! The `lambdaflow` command line: parses arguments, sets up logging, and
//! calls into the layers. Errors become one readable message and exit code 1.

pub mod demo;
mod status;
mod table;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use crate::produce::ProduceOptions;

#[derive(Debug, Parser)]
#[command(
    name = "lambdaflow",
    version,
    about = "The Lambda Architecture — batch, serving and speed layers over one immutable master dataset — in one program",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run every layer in one process: the ingest API on the embedded log.
    Serve(ServeArgs),
    /// Send the paper's events (or an NDJSON file) to a running server.
    Produce(ProduceArgs),
    /// Recompute batch views from the master dataset from scratch, and publish them.
    Rebuild(RebuildArgs),
    /// Each layer's watermark, lag and last run, from a running server.
    Status(StatusArgs),
    /// Accept a loss the node stopped at (the node stopped): a Kafka
    /// partition whose retention removed events before they were archived
    /// (`--partition P`), or a stream that is not the one the master
    /// dataset was written from — a Kinesis stream deleted and created
    /// again, or another stream configured (`--stream`).
    AcceptLoss(AcceptLossArgs),
    /// A view's merged rows (batch ⊕ realtime), from a running server.
    Query(QueryArgs),
    /// Read-only SQL over the views (each view is a table), on a running server.
    Sql(SqlArgs),
    /// The one-command tour: a temporary server, 10,000 of the paper's events, what they became.
    Demo(DemoArgs),
    /// Measure: `bench ingest` (durable HTTP ingest), `bench views` (view plans).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Ballista's stock scheduler or executor, for `[batch] engine = "ballista"`.
    #[cfg(feature = "ballista")]
    Ballista {
        #[command(subcommand)]
        role: BallistaCommand,
    },
}

/// The two processes of a Ballista cluster: the library code of Ballista's
/// own `ballista-scheduler` and `ballista-executor` binaries, built into
/// lambdaflow so that one build (and one DataFusion) serves all three.
#[cfg(feature = "ballista")]
#[derive(Debug, Subcommand)]
pub enum BallistaCommand {
    /// The scheduler: plans jobs into stages and hands tasks to executors.
    Scheduler {
        /// gRPC address clients and executors connect to (`df://` this).
        #[arg(long, default_value = "127.0.0.1:50050")]
        bind: SocketAddr,
        /// Host name executors and clients reach this scheduler by (default: the bind address).
        #[arg(long)]
        external_host: Option<String>,
        /// An executor silent this long is dead: its tasks run elsewhere.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        executor_timeout: std::time::Duration,
    },
    /// An executor: runs tasks, keeps shuffle files, serves them over Arrow Flight.
    Executor {
        /// The scheduler, `df://host:port`.
        #[arg(long, default_value = "df://127.0.0.1:50050")]
        scheduler: String,
        /// Arrow Flight address (shuffle and results).
        #[arg(long, default_value = "127.0.0.1:50051")]
        bind: SocketAddr,
        /// Port of the executor's gRPC service (on the same host).
        #[arg(long, default_value_t = 50052)]
        grpc_port: u16,
        /// Host name others reach this executor by (default: the bind address).
        #[arg(long)]
        external_host: Option<String>,
        /// Tasks run at once (default: the cores).
        #[arg(long)]
        concurrent_tasks: Option<usize>,
        /// Where shuffle files go (default: a temporary directory).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// How often it tells the scheduler it is alive.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        heartbeat: std::time::Duration,
    },
}

/// Where the configuration comes from; flags override the file.
#[derive(Debug, Args, Clone)]
pub struct ConfigArgs {
    /// TOML configuration file (default: the paper's schema and views).
    #[arg(long, short = 'c', env = "LAMBDAFLOW_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (overrides `data` in the file).
    #[arg(long, env = "LAMBDAFLOW_DATA")]
    pub data: Option<PathBuf>,
    /// Address to listen on (overrides `listen` in the file).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
}

impl ConfigArgs {
    pub fn load(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(self.config.as_deref())?;
        if let Some(d) = &self.data {
            config.data = d.clone();
        }
        if let Some(l) = self.listen {
            config.listen = l;
        }
        config.check(self.config.as_deref())?;
        Ok(config)
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Server to send to.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Number of events to generate (the paper sends 10,000).
    #[arg(long, short = 'n', default_value_t = 10_000)]
    pub events: u64,
    /// Events per second (default: as fast as the server acknowledges).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Seed: the same seed gives the same events, starting at --start.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Events per request.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Send this NDJSON file instead of generated events.
    #[arg(long, conflicts_with_all = ["seed", "output"])]
    pub file: Option<PathBuf>,
    /// Write the generated events to this file (`-`: stdout) instead of sending them.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Event time of the first event with --seed, e.g. "2014-11-01 00:00:00.000".
    #[arg(long)]
    pub start: Option<String>,
    /// Number of distinct products (product0, product1, …).
    #[arg(long, default_value_t = 10)]
    pub products: u32,
    /// Number of distinct zipcodes (10000, 10001, …).
    #[arg(long, default_value_t = 90_000)]
    pub zipcodes: u64,
    /// Fraction of events (0–1) whose event time is one to six hours late.
    #[arg(long, default_value_t = 0.0)]
    pub late: f64,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Send straight to Kafka at these bootstrap servers (with --topic), as
    /// the paper's producer writes to its stream, instead of to a server.
    #[arg(long, requires = "topic", value_name = "BROKERS")]
    pub kafka: Option<String>,
    /// The Kafka topic, with --kafka.
    #[arg(long, requires = "kafka")]
    pub topic: Option<String>,
    /// Send straight to this Kinesis stream (PutRecords), as the paper's
    /// KinesisProducer does; credentials from the usual AWS chain.
    #[arg(long, value_name = "STREAM", conflicts_with = "kafka")]
    pub kinesis: Option<String>,
    /// The AWS region of --kinesis (default: the usual AWS chain).
    #[arg(long, requires = "kinesis")]
    pub region: Option<String>,
    /// With --kafka or --kinesis: key each record by this field of its
    /// event, the server's `[schema] key` (a Kafka record's key with the
    /// Java client's murmur2 partitioner, a Kinesis partition key), so a
    /// file sent again meets its first copy and is counted once.
    #[arg(long, value_name = "FIELD")]
    pub key: Option<String>,
    /// Another Kinesis endpoint than AWS's (an emulator), with --kinesis.
    #[arg(long, requires = "kinesis", value_name = "URL")]
    pub endpoint: Option<String>,
    /// The producer's name, sent with each request with its number so the
    /// server recognises a re-sent one (default: a new name each run). A
    /// run under an earlier run's name, with its events and --batch, is
    /// recognised as a re-send of it: nothing is stored twice.
    #[arg(long, value_name = "NAME", conflicts_with = "no_idempotence")]
    pub producer: Option<String>,
    /// Send requests without a producer name and number (at least once:
    /// a request re-sent after a lost reply may be stored twice).
    #[arg(long)]
    pub no_idempotence: bool,
}

impl ProduceArgs {
    pub fn options(&self) -> ProduceOptions {
        ProduceOptions {
            url: self.url.clone(),
            events: self.events,
            rate: self.rate,
            seed: self.seed,
            batch: self.batch,
            concurrency: self.concurrency,
            file: self.file.clone(),
            output: self.output.clone(),
            start: self.start.clone(),
            products: self.products,
            zipcodes: self.zipcodes,
            late: self.late,
            progress: !self.quiet,
            kafka: self
                .kafka
                .clone()
                .map(|brokers| crate::stream::kafka::KafkaConfig {
                    brokers,
                    topic: self.topic.clone().unwrap_or_default(),
                    // Keyed records go where Java clients put them.
                    options: [("partitioner".to_string(), "murmur2_random".to_string())].into(),
                }),
            kinesis: self
                .kinesis
                .clone()
                .map(|stream| crate::stream::kinesis::KinesisConfig {
                    stream,
                    region: self.region.clone(),
                    endpoint: self.endpoint.clone(),
                    poll: std::time::Duration::from_millis(250),
                }),
            idempotent: !self.no_idempotence,
            producer_name: self.producer.clone(),
            key: self.key.clone(),
            ..ProduceOptions::default()
        }
    }
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("what").required(true).args(["partition", "stream"]))]
pub struct AcceptLossArgs {
    /// The stopped Kafka partition (`status` → `health` names it).
    #[arg(long)]
    pub partition: Option<u32>,
    /// Record the configured stream in place of the one the master dataset
    /// was written from. What the master dataset holds stays counted;
    /// events the old stream held that were not archived are given up.
    /// Kinesis (a stream deleted and created again, or another stream): the
    /// partitions numbered so far end at their archived positions and the
    /// stream's shards become new partitions after them, read from their
    /// first record. Kafka: each partition p is read from the archived
    /// coverage H[p] on (the topic's records below it are never counted).
    /// Leaving the embedded log: its directory is moved aside.
    #[arg(long)]
    pub stream: bool,
    /// Accept: without it, only say what is missing.
    #[arg(long)]
    pub yes: bool,
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Args)]
pub struct RebuildArgs {
    /// Only this view (at the published run's coverage); default: every view.
    pub view: Option<String>,
    /// One run as the batch loop does it instead: each view incrementally
    /// from the published run where it can be (see `[batch] full_every`).
    #[arg(long, conflicts_with = "view")]
    pub incremental: bool,
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Server to ask.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The view.
    pub view: String,
    /// Keep rows where COL equals VAL (repeatable).
    #[arg(long = "where", value_name = "COL=VAL")]
    pub filters: Vec<String>,
    /// At most this many rows.
    #[arg(long)]
    pub limit: Option<usize>,
    /// A past published run's batch view: a run number, or an RFC 3339
    /// time (the run published last at or before it).
    #[arg(long, value_name = "RUN|TIME")]
    pub as_of: Option<String>,
    /// Server to ask.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
}

#[derive(Debug, Args)]
pub struct SqlArgs {
    /// The query, e.g. "SELECT * FROM sales_by_product ORDER BY revenue DESC LIMIT 3".
    pub sql: String,
    /// Server to ask.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Events to produce.
    #[arg(long, short = 'n', default_value_t = 10_000)]
    pub events: u64,
    /// Exit after the tour instead of serving until Ctrl-C.
    #[arg(long)]
    pub exit: bool,
    /// Address to listen on (default 127.0.0.1:8080, or any free port if taken).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Durable ingest over HTTP with `produce` as the load, and the decoder alone.
    Ingest(crate::bench::IngestBenchArgs),
    /// View plans: states per second, micro-batch cost, merge + finalize, state sizes.
    Views(crate::bench::ViewsBenchArgs),
    /// Archive rate into Delta, batch recompute per view, and DuckDB over the same files.
    Batch(crate::bench::BatchBenchArgs),
    /// Freshness, speed-layer throughput, query latency and memory of a real server.
    Serve(crate::bench::ServeBenchArgs),
    /// Point reads against this machine's ceiling, and the Postgres wire beside HTTP.
    Reads(crate::bench::ReadsBenchArgs),
    /// Steady load for N minutes: RSS, open files, disk and lag every minute.
    Soak(crate::bench::SoakBenchArgs),
    /// Consumption from a Kafka topic into views, and freshness over Kafka.
    Kafka(crate::bench::KafkaBenchArgs),
    /// Consumption from a Kinesis stream (an emulator) into views, and freshness over it.
    Kinesis(crate::bench::KinesisBenchArgs),
    /// Event keys: the key index (memory, disk, ns per event), ingest with keys on and off, ClickHouse beside.
    Keys(crate::bench::KeysBenchArgs),
}

fn init_tracing(default: &str) {
    // The Delta kernel narrates every snapshot at INFO; keep it for RUST_LOG users.
    let quiet =
        format!("{default},buoyant_kernel=warn,buoyant_kernel_engine=warn,deltalake_core=warn");
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(quiet));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")
}

/// Runs the command line; the binary's `main` is only this.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // What failed, then why (each cause once), then the first
            // detail and hint the chain gives.
            eprintln!(
                "error: {}",
                crate::error::Report::of(AsRef::<dyn std::error::Error + Send + Sync>::as_ref(&e))
            );
            ExitCode::FAILURE
        }
    }
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => {
            init_tracing("info");
            let config = args.config.load()?;
            let again = args.config.clone();
            let reload: crate::frontend::serve::Reload = Box::new(move || {
                again.load().map_err(|e| {
                    crate::error::chain(AsRef::<dyn std::error::Error + Send + Sync>::as_ref(&e))
                })
            });
            runtime()?.block_on(crate::frontend::serve::run_reloading(config, Some(reload)))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Produce(args) => {
            init_tracing("warn");
            let summary = runtime()?.block_on(crate::produce::run(args.options()))?;
            if args.output.is_some() {
                eprintln!(
                    "wrote {} events in {:.2} s",
                    crate::human::group(summary.events),
                    summary.elapsed.as_secs_f64()
                );
                return Ok(ExitCode::SUCCESS);
            }
            println!("{summary}");
            Ok(if summary.failed > 0 || summary.in_doubt > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Rebuild(args) => {
            init_tracing("warn");
            let config = args.config.load()?;
            runtime()?.block_on(rebuild(config, args.view, args.incremental))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::AcceptLoss(args) => {
            init_tracing("warn");
            let config = args.config.load()?;
            match args.partition {
                Some(p) => runtime()?.block_on(accept_loss(config, p, args.yes)),
                None => runtime()?.block_on(accept_stream(config, args.yes)),
            }
        }
        Command::Status(args) => {
            init_tracing("warn");
            runtime()?.block_on(status(&args.url))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Query(args) => {
            init_tracing("warn");
            runtime()?.block_on(query(args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sql(args) => {
            init_tracing("warn");
            runtime()?.block_on(sql(args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => {
            init_tracing("warn");
            runtime()?.block_on(crate::cli::demo::run(args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { what } => {
            init_tracing("warn");
            match what {
                BenchCommand::Ingest(args) => crate::bench::ingest(args)?,
                BenchCommand::Views(args) => crate::bench::views(args)?,
                BenchCommand::Batch(args) => crate::bench::batch(args)?,
                BenchCommand::Serve(args) => crate::bench::serve(args)?,
                BenchCommand::Soak(args) => crate::bench::soak(args)?,
                BenchCommand::Reads(args) => crate::bench::reads(args)?,
                BenchCommand::Kafka(args) => crate::bench::kafka(args)?,
                BenchCommand::Kinesis(args) => crate::bench::kinesis(args)?,
                BenchCommand::Keys(args) => crate::bench::keys(args)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "ballista")]
        Command::Ballista { role } => {
            init_tracing("info");
            // Ballista's own binaries run with deep stacks: plans recurse.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_stack_size(32 * 1024 * 1024)
                .build()
                .context("could not start the async runtime")?;
            use crate::batch::ballista;
            match role {
                BallistaCommand::Scheduler {
                    bind,
                    external_host,
                    executor_timeout,
                } => rt.block_on(ballista::run_scheduler(
                    bind,
                    external_host,
                    executor_timeout,
                ))?,
                BallistaCommand::Executor {
                    scheduler,
                    bind,
                    grpc_port,
                    external_host,
                    concurrent_tasks,
                    work_dir,
                    heartbeat,
                } => rt.block_on(ballista::run_executor(ballista::ExecutorArgs {
                    scheduler,
                    bind,
                    grpc_port,
                    external_host,
                    concurrent_tasks: concurrent_tasks.unwrap_or_else(|| {
                        std::thread::available_parallelism().map_or(1, |n| n.get())
                    }),
                    work_dir,
                    heartbeat,
                }))?,
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `lambdaflow accept-loss --partition P [--yes]`: on a stopped node whose
/// Kafka topic lost events of `P` to retention before they were archived.
async fn accept_loss(mut config: Config, p: u32, yes: bool) -> anyhow::Result<ExitCode> {
    let Some(kafka) = config.stream.kafka.clone() else {
        anyhow::bail!(
            "accept-loss is for a Kafka topic whose retention removed events before they were archived; this node's stream ({}) cannot lose events that way",
            if config.stream.kinesis.is_some() {
                "a Kinesis stream, whose positions retention cannot show; for a Kinesis stream deleted and created again, use `accept-loss --stream`"
            } else {
                "the embedded log, which keeps every event until it is archived"
            }
        );
    };
    crate::node::resolve_stream(&mut config).await?;
    if p >= config.stream.partitions {
        anyhow::bail!(
            "Kafka topic `{}` has no partition {p} (it has {})",
            kafka.topic,
            config.stream.partitions
        );
    }
    // Holding the log's lock proves no node runs on this data directory
    // (a running one would go on reading below the new coverage).
    let log_dir = config.local_dir().join("log");
    let _log = crate::stream::Log::open(
        &log_dir,
        crate::stream::LogOptions {
            partitions: crate::stream::Log::partitions_in(&log_dir)?
                .unwrap_or(config.stream.partitions),
            ..Default::default()
        },
    )
    .context("stop `lambdaflow serve` on this data directory first")?;
    let batch = crate::node::open_batch(&config).await?;
    let k = kafka.clone();
    let start =
        tokio::task::spawn_blocking(move || crate::stream::kafka::earliest_offset(&k, p)).await??;
    let archived = batch.master().coverage().h.get(p);
    if start <= archived {
        println!(
            "partition {p} of Kafka topic `{}` lost nothing: the topic holds it from offset {start}, the master dataset up to {archived}",
            kafka.topic
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "partition {p} of Kafka topic `{}`: offsets {archived} to {start} were removed by the topic's retention before they were archived; every view will go without them for good",
        kafka.topic
    );
    if !yes {
        println!("run again with --yes to accept the loss and go on from offset {start}");
        return Ok(ExitCode::from(2));
    }
    match crate::cluster::driver::accept_loss(&batch, &config.local_dir(), p, start).await? {
        Some(loss) => println!(
            "accepted: partition {p} goes on from offset {}; run {} published; recorded in {}",
            loss.to,
            loss.run,
            config
                .local_dir()
                .join(crate::cluster::driver::LOSSES)
                .display()
        ),
        None => println!("nothing to accept any more"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `lambdaflow accept-loss --stream [--yes]`: on a stopped node whose
/// configured stream is not the one its master dataset was written from.
async fn accept_stream(mut config: Config, yes: bool) -> anyhow::Result<ExitCode> {
    use crate::cluster::identity;
    // Holding the log's lock proves no node runs on this data directory.
    let log_dir = config.local_dir().join("log");
    let log = crate::stream::Log::open(
        &log_dir,
        crate::stream::LogOptions {
            partitions: crate::stream::Log::partitions_in(&log_dir)?
                .unwrap_or(config.stream.partitions),
            ..Default::default()
        },
    )
    .context("stop `lambdaflow serve` on this data directory first")?;
    let storage = config.storage()?;
    let recorded = identity::load(&storage).await?;
    let configured = identity::configured(&config).await?;
    if let Some(r) = &recorded
        && r.identity.same_as(&configured)
    {
        println!(
            "nothing to accept: the master dataset was written from {}, the configured stream",
            r.identity
        );
        return Ok(ExitCode::SUCCESS);
    }
    // Every partition the root has numbered: the master dataset's, the
    // log's, the Kinesis registry's (the configured stream may have fewer).
    crate::node::apply_saved_views(&mut config).await?;
    let views = crate::view::compile_all(&config.views, &config.event_schema()?).await?;
    let mut partitions = log.stats().len() as u32;
    if let Some(k) = &config.stream.kinesis
        && let Some(reg) = crate::stream::kinesis::Registry::load(&storage, &k.stream).await?
    {
        partitions = partitions.max(reg.shards.len() as u32);
    }
    if let Some(k) = &config.stream.kafka {
        let k = k.clone();
        let n = tokio::task::spawn_blocking(move || crate::stream::kafka::partition_count(&k))
            .await??;
        partitions = partitions.max(n);
    }
    // The master dataset's: opening it with too few says one it holds.
    let schema = std::sync::Arc::new(config.event_schema()?);
    let mut probe = 1;
    loop {
        match crate::master::MasterDataset::open(&storage, schema.clone(), probe).await {
            Err(crate::master::MasterError::PartitionMismatch { found, .. }) => probe = found + 1,
            Err(e) => return Err(e.into()),
            Ok(_) => break,
        }
    }
    partitions = partitions.max(probe);
    // The embedded log's count is the config's; an external stream's is
    // what the root numbered.
    if !config.stream.external() {
        partitions = partitions.max(config.stream.partitions);
    }
    config.stream.partitions = partitions.max(1);
    let batch = crate::node::open_batch_with(&config, views).await?;
    let archived = batch.master().coverage().h;
    let unarchived: u64 = log
        .stats()
        .iter()
        .map(|s| s.end.saturating_sub(archived.get(s.partition)))
        .sum();
    let was = recorded
        .as_ref()
        .map_or("no recorded stream".to_string(), |r| r.identity.to_string());
    println!(
        "the master dataset under {} was written from {was}; the configuration names {configured}",
        storage.describe()
    );
    println!(
        "archived and kept: {} events over {} partitions (coverage {archived:?})",
        crate::human::group(batch.master().snapshot().await?.events()),
        archived.partitions()
    );
    if unarchived > 0 && config.stream.external() {
        println!(
            "given up: {} events of the embedded log that are not archived ({} is moved aside)",
            crate::human::group(unarchived),
            log_dir.display()
        );
    }
    println!(
        "given up: whatever {was} held that was not archived; from now on {}",
        configured.accepting_means()
    );
    if !yes {
        println!("run again with --yes to accept, or use a new storage root for {configured}");
        return Ok(ExitCode::from(2));
    }
    // Publish what is archived, so every partition's published H is its
    // archived end: the old stream is read no more.
    {
        let _lock = crate::node::batch_lock(&config.local_dir()).await?;
        batch.run(None).await?;
    }
    drop(log);
    let (r, moved) =
        identity::accept(&config, &storage, recorded.as_ref(), configured, partitions).await?;
    println!(
        "accepted: {} is recorded as the stream of {} (generation {})",
        r.identity,
        storage.describe(),
        r.generation
    );
    if let Some(k) = &config.stream.kinesis
        && let Some(reg) = crate::stream::kinesis::Registry::load(&storage, &k.stream).await?
    {
        let new: Vec<String> = reg
            .shards
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.retired)
            .map(|(p, s)| format!("{} → partition {p}", s.shard))
            .collect();
        println!("the stream's shards: {}", new.join(", "));
    }
    if let Some(to) = moved {
        println!("the embedded log was moved to {}", to.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `lambdaflow rebuild [VIEW]`, with a progress bar.
async fn rebuild(config: Config, view: Option<String>, incremental: bool) -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::Ordering::Relaxed;
    let batch = crate::node::open_batch(&config).await?;
    eprintln!("waiting for the batch lock of {}…", config.data.display());
    let _lock = crate::node::batch_lock(&config.local_dir()).await?;
    let progress = Arc::new(crate::batch::Progress::default());
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:30}] {human_pos}/{human_len} events · {per_sec} · eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let ticker = {
        let (bar, progress) = (bar.clone(), progress.clone());
        tokio::spawn(async move {
            loop {
                bar.set_length(progress.total.load(Relaxed));
                bar.set_position(progress.done.load(Relaxed));
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })
    };
    let result = if incremental {
        batch.run(Some(progress)).await
    } else {
        batch.rebuild(view.as_deref(), Some(progress)).await
    };
    ticker.abort();
    bar.finish_and_clear();
    let m = result?;
    let peak = crate::bench::peak_rss_bytes(std::process::id());
    println!(
        "published run {}: master dataset version {}, H = {:?}, {} events, {:.2} s",
        m.run,
        m.table_version,
        m.h,
        crate::human::group(m.events),
        m.duration_ms as f64 / 1000.0
    );
    if let Some(b) = peak {
        println!("  peak memory (VmHWM): {}", bytesize::ByteSize::b(b));
    }
    for (name, e) in &m.views {
        println!(
            "  {name}: {} groups, {} rows{}",
            crate::human::group(e.groups),
            crate::human::group(e.rows),
            if e.run == m.run {
                format!(
                    ", {} over {} events, {:.3} s",
                    e.lineage.kind,
                    crate::human::group(e.lineage.events),
                    e.duration_ms as f64 / 1000.0
                )
            } else {
                format!(" (kept from run {})", e.run)
            }
        );
    }
    let c = &m.compute;
    println!(
        "  computed by {}{}: {}",
        c.engine,
        c.scheduler
            .as_deref()
            .map(|s| format!(" at {s}"))
            .unwrap_or_default(),
        c.summary()
    );
    Ok(())
}

/// `lambdaflow status`: asks a running server and prints its layers.
async fn status(url: &str) -> anyhow::Result<()> {
    let url = format!("{}/v1/status", url.trim_end_matches('/'));
    let resp = client()?
        .get(&url)
        .send()
        .await
        .with_context(|| format!("could not reach {url}; is `lambdaflow serve` running?"))?;
    let s: crate::frontend::status::Status = serde_json::from_value(reply_json(resp).await?)
        .context("the server's status is not in the shape this version reads")?;
    print!(
        "{}",
        status::render(&s, chrono::Utc::now().timestamp_millis())
    );
    Ok(())
}

/// An HTTP client with `LAMBDAFLOW_TOKEN` and `LAMBDAFLOW_CA_CERT` applied.
fn client() -> anyhow::Result<reqwest::Client> {
    crate::frontend::client::client().map_err(anyhow::Error::msg)
}

/// Fails with the server's own error message (and hint) for a non-2xx reply.
async fn reply_json(resp: reqwest::Response) -> anyhow::Result<serde_json::Value> {
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.context("the reply is not JSON")?;
    if !status.is_success() {
        let mut msg = body["error"]
            .as_str()
            .unwrap_or("request failed")
            .to_string();
        if let Some(h) = body["hint"].as_str() {
            msg.push_str(&format!("\nhint: {h}"));
        }
        anyhow::bail!("{msg} (HTTP {status})");
    }
    Ok(body)
}

/// `lambdaflow query VIEW --where COL=VAL`.
async fn query(args: QueryArgs) -> anyhow::Result<()> {
    let mut url = reqwest::Url::parse(&format!(
        "{}/v1/views/{}",
        args.url.trim_end_matches('/'),
        args.view
    ))
    .context("invalid --url")?;
    {
        let mut q = url.query_pairs_mut();
        for f in &args.filters {
            let (k, v) = f
                .split_once('=')
                .with_context(|| format!("--where {f:?}: expected COL=VAL"))?;
            q.append_pair(k, v);
        }
        if let Some(n) = args.limit {
            q.append_pair("limit", &n.to_string());
        }
        if let Some(t) = &args.as_of {
            q.append_pair("as_of", t);
        }
    }
    let resp = client()?
        .get(url.clone())
        .send()
        .await
        .with_context(|| format!("could not reach {url}; is `lambdaflow serve` running?"))?;
    let body = reply_json(resp).await?;
    print!("{}", render_table(&body));
    if let Some(next) = body["next_offset"].as_u64() {
        println!(
            "(first {next} of {} rows: raise --limit, or add --where filters)",
            body["matched_rows"]
        );
    }
    println!("{}", render_freshness(&body["freshness"]));
    Ok(())
}

/// `lambdaflow sql "SELECT …"`.
async fn sql(args: SqlArgs) -> anyhow::Result<()> {
    let url = format!("{}/v1/sql", args.url.trim_end_matches('/'));
    let resp = client()?
        .post(&url)
        .json(&serde_json::json!({ "sql": args.sql }))
        .send()
        .await
        .with_context(|| format!("could not reach {url}; is `lambdaflow serve` running?"))?;
    let body = reply_json(resp).await?;
    print!("{}", render_table(&body));
    if body["truncated"].as_bool() == Some(true) {
        println!("(truncated: add a LIMIT or aggregate more)");
    }
    println!("{}", render_freshness(&body["freshness"]));
    Ok(())
}

/// A reply's `columns` and `rows` as an aligned text table.
pub fn render_table(body: &serde_json::Value) -> String {
    let cols: Vec<&str> = body["columns"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    let rows = body["rows"].as_array().map_or(&[][..], Vec::as_slice);
    let mut t = table::separated(cols.iter().copied());
    for r in rows {
        t.add_row(cols.iter().map(|c| match &r[*c] {
            serde_json::Value::Null => "NULL".to_string(),
            serde_json::Value::String(s) => s.clone(),
            v => v.to_string(),
        }));
    }
    let mut out = table::lines(&t);
    out.push_str(&format!(
        "({} row{})\n",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    ));
    out
}

/// "batch run 3 (H = [..], 1.2 s old) ⊕ realtime up to [..] (0.1 s old)".
pub fn render_freshness(f: &serde_json::Value) -> String {
    let secs = |v: &serde_json::Value| {
        v.as_f64()
            .map_or("?".to_string(), |ms| format!("{:.1} s", ms / 1000.0))
    };
    if f["time_travel"].as_bool() == Some(true) {
        let at = f["batch_as_of_ms"]
            .as_i64()
            .and_then(chrono::DateTime::from_timestamp_millis)
            .map_or("?".into(), |t| {
                t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            });
        return format!(
            "batch run {} alone (as of {at}: table version {}, H = {})",
            f["run"], f["table_version"], f["h"]
        );
    }
    let batch = match f["run"].as_u64() {
        Some(r) => format!(
            "batch run {r} (H = {}, {} old)",
            f["h"],
            secs(&f["batch_age_ms"])
        ),
        None => "no batch run yet".to_string(),
    };
    format!(
        "{batch} ⊕ realtime up to {} ({} since it last moved)",
        f["realtime"],
        secs(&f["realtime_age_ms"])
    )
}
