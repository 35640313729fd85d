//! `lambdaflow bench`: measurements reported in BENCHMARKS.md. Nothing here
//! asserts a timing; it measures and prints.
//!
//! `bench ingest` runs a real `lambdaflow serve` as a child process on a
//! temporary data directory, loads it with the producer (the same code as
//! `lambdaflow produce`) and reports acknowledged-and-fsynced events per
//! second, group-commit figures and the server's peak memory; it also times
//! the NDJSON decoder alone on one thread.

mod incremental;
mod kafka;
mod keys;
mod kinesis;
mod reads;
mod shapes;
mod soak;

pub use kafka::{KafkaBenchArgs, kafka};
pub use keys::{KeysBenchArgs, keys};
pub use kinesis::{KinesisBenchArgs, kinesis};
pub use reads::{ReadsBenchArgs, reads};

pub use soak::{SoakBenchArgs, soak};

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;

use crate::produce::{self, Generator, ProduceOptions, group};
use crate::schema::EventSchema;
use crate::stream::{Decoder, Partitioning};

#[derive(Debug, Args, Clone)]
pub struct IngestBenchArgs {
    /// Events sent over HTTP.
    #[arg(long, short = 'n', default_value_t = 2_000_000)]
    pub events: u64,
    /// Events per request.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Log partitions of the server.
    #[arg(long, default_value_t = 2)]
    pub partitions: u32,
    /// Events decoded in the decoder-only measurement.
    #[arg(long, default_value_t = 1_000_000)]
    pub decode_events: u64,
    /// Data directory for the server (default: a temporary directory).
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
}

#[derive(Debug, Args, Clone)]
pub struct ViewsBenchArgs {
    /// Events for the throughput measurement.
    #[arg(long, short = 'n', default_value_t = 5_000_000)]
    pub events: u64,
    /// Repetitions of the micro-batch and merge measurements.
    #[arg(long, default_value_t = 2000)]
    pub repeat: usize,
}

/// How generated events spread over products, zipcodes and time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spread {
    pub products: u64,
    pub zipcodes: u64,
    /// Milliseconds between consecutive events' timestamps.
    pub every_ms: i64,
}

impl Spread {
    /// The paper's: 10 products, `zipcodes` zipcodes, an event a millisecond.
    pub fn paper(zipcodes: u64) -> Spread {
        Spread {
            products: 10,
            zipcodes,
            every_ms: 1,
        }
    }
}

/// Paper events as Arrow batches of `batch` rows, built directly (not via JSON).
pub fn paper_batches(
    events: u64,
    batch: usize,
    zipcodes: u64,
) -> Vec<arrow::record_batch::RecordBatch> {
    spread_batches(0, events, batch, Spread::paper(zipcodes))
}

/// Events `[first, first + events)` of a generated stream spread as
/// `spread` says, as Arrow batches of `batch` rows.
pub fn spread_batches(
    first: u64,
    events: u64,
    batch: usize,
    spread: Spread,
) -> Vec<arrow::record_batch::RecordBatch> {
    use arrow::array::{Int64Array, StringArray, TimestampMillisecondArray};
    let schema = EventSchema::paper().arrow().clone();
    let products = spread.products.max(1);
    let zipcodes = spread.zipcodes.max(1);
    let names: Vec<String> = (0..products).map(|i| format!("product{i}")).collect();
    let mut out = Vec::new();
    let mut i = first;
    let end = first + events;
    while i < end {
        let n = (end - i).min(batch as u64);
        let idx = i..i + n;
        let h = |k: u64| k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 17;
        out.push(
            arrow::record_batch::RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(Int64Array::from_iter_values(
                        idx.clone().map(|k| 10_000 + (h(k) % zipcodes) as i64),
                    )),
                    Arc::new(StringArray::from_iter_values(
                        idx.clone()
                            .map(|k| names[((h(k) >> 20) % products) as usize].as_str()),
                    )),
                    Arc::new(Int64Array::from_iter_values(
                        idx.clone().map(|k| 1 + (h(k) >> 30) as i64 % 100),
                    )),
                    Arc::new(TimestampMillisecondArray::from_iter_values(
                        idx.map(|k| 1_414_800_000_000 + k as i64 * spread.every_ms),
                    )),
                ],
            )
            .expect("paper batch"),
        );
        i += n;
    }
    out
}

fn micros(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn views(args: ViewsBenchArgs) -> anyhow::Result<()> {
    use crate::config::{Config, ViewConfig};
    use crate::view::compile;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let schema = EventSchema::paper();
    let defs = Config::default().views;
    println!("## bench views");
    println!();
    println!("one thread (a current-thread runtime; view plans run in one partition)");
    println!();

    // 1. States per second over in-memory batches.
    let batches = paper_batches(args.events, 8192, 90_000);
    println!("| view | events | states/s (events/s) | state rows |");
    println!("|---|---|---|---|");
    for d in &defs {
        let view = rt.block_on(compile(d, &schema))?;
        let t = Instant::now();
        let states = rt.block_on(view.states(batches.clone()))?;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "| {} | {} | {} | {} |",
            d.name,
            group(args.events),
            group((args.events as f64 / secs) as u64),
            group(states.num_rows() as u64)
        );
    }
    println!();

    // 2. Fixed cost of one micro-batch of 1,000 events.
    let micro = paper_batches(1000, 1000, 90_000);
    println!("| view | micro-batch of 1,000 events: p50 | p99 | mean |");
    println!("|---|---|---|---|");
    for d in &defs {
        let view = rt.block_on(compile(d, &schema))?;
        let mut times = Vec::with_capacity(args.repeat);
        for _ in 0..args.repeat {
            let t = Instant::now();
            let s = rt.block_on(view.states(micro.clone()))?;
            times.push(micros(t.elapsed()));
            std::hint::black_box(s);
        }
        times.sort_by(f64::total_cmp);
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        println!(
            "| {} | {:.0} µs | {:.0} µs | {:.0} µs |",
            d.name,
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            mean
        );
    }
    println!();

    // 3. Merge + finalize: a 100,000-group batch view and 10 small realtime chunks.
    let by_zip = defs
        .iter()
        .find(|d| d.name == "sales_by_zipcode")
        .cloned()
        .expect("default view");
    let view = rt.block_on(compile(&by_zip, &schema))?;
    let history = paper_batches(2_000_000, 8192, 100_000);
    let batch_states = rt.block_on(view.states(history))?;
    let chunks: Vec<_> = (0..10)
        .map(|_| rt.block_on(view.states(paper_batches(1000, 1000, 100_000))))
        .collect::<Result<_, _>>()?;
    let mut parts = vec![batch_states.clone()];
    parts.extend(chunks);
    let runs = (args.repeat / 20).max(10);
    let mut fin = Vec::new();
    let mut merge = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let rows = rt.block_on(view.finalize(parts.clone()))?;
        fin.push(micros(t.elapsed()) / 1000.0);
        std::hint::black_box(rows);
        let t = Instant::now();
        let m = rt.block_on(view.merge(parts.clone()))?;
        merge.push(micros(t.elapsed()) / 1000.0);
        std::hint::black_box(m);
    }
    fin.sort_by(f64::total_cmp);
    merge.sort_by(f64::total_cmp);
    println!(
        "merge + finalize of a {}-group view with 10 chunks of 1,000 events: p50 {:.1} ms, p99 {:.1} ms (merge to states alone: p50 {:.1} ms)",
        group(batch_states.num_rows() as u64),
        percentile(&fin, 0.5),
        percentile(&fin, 0.99),
        percentile(&merge, 0.5)
    );
    println!();

    // 4. What approx_distinct costs: state size and time at 100,000 groups.
    let n = args.events.min(10_000_000);
    let data = paper_batches(n, 8192, 100_000);
    println!(
        "| aggregates per group (100,000 groups, {} events) | time | states in memory | states as Parquet |",
        group(n)
    );
    println!("|---|---|---|---|");
    for (label, sql) in [
        (
            "count, sum",
            "SELECT zipcode, count(*) AS n, sum(price) AS s FROM events GROUP BY zipcode",
        ),
        (
            "count, sum, approx_distinct",
            "SELECT zipcode, count(*) AS n, sum(price) AS s, approx_distinct(ProductName) AS p FROM events GROUP BY zipcode",
        ),
        (
            "count, sum, count(DISTINCT)",
            "SELECT zipcode, count(*) AS n, sum(price) AS s, count(DISTINCT ProductName) AS p FROM events GROUP BY zipcode",
        ),
    ] {
        let view = rt.block_on(compile(
            &ViewConfig {
                name: "b".into(),
                sql: sql.into(),
                rollup: Vec::new(),
            },
            &schema,
        ))?;
        let t = Instant::now();
        let states = rt.block_on(view.states(data.clone()))?;
        let secs = t.elapsed().as_secs_f64();
        let parquet = view.states_to_parquet(&states)?.len();
        println!(
            "| {label} | {:.2} s | {} | {} |",
            secs,
            bytesize::ByteSize::b(states.get_array_memory_size() as u64),
            bytesize::ByteSize::b(parquet as u64)
        );
    }
    Ok(())
}

#[derive(Debug, Args, Clone)]
pub struct BatchBenchArgs {
    /// Events in the master dataset.
    #[arg(long, short = 'n', default_value_t = 10_000_000)]
    pub events: u64,
    /// Events per chunk (one Parquet file each).
    #[arg(long, default_value_t = 1_000_000)]
    pub chunk: u64,
    /// Keep the data here (default: a temporary directory, removed after).
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
    /// Skip the DuckDB (and, with `--shapes`, chDB) comparison.
    #[arg(long)]
    pub no_duckdb: bool,
    /// `ballista`: also recompute every view on a Ballista cluster and set
    /// it beside the local engine (same files, same run).
    #[arg(long, default_value = "local", value_parser = ["local", "ballista"])]
    pub engine: String,
    /// Then add this many events and time an incremental run against a
    /// full recompute, and a view added while serving to its first answer.
    #[arg(long)]
    pub incremental: Option<u64>,
    /// Also recompute views of five shapes (100, 100K and 1M groups, a time
    /// bucket with five aggregates, approx_distinct) beside DuckDB and chDB
    /// (`pip install duckdb chdb`).
    #[arg(long)]
    pub shapes: bool,
    /// With `--engine ballista`: this scheduler (`df://host:port`), instead
    /// of a scheduler and two one-task executors started for the bench.
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Distinct products in the generated events.
    #[arg(long, default_value_t = 10)]
    pub products: u64,
    /// Distinct zipcodes in the generated events.
    #[arg(long, default_value_t = 90_000)]
    pub zipcodes: u64,
    /// Milliseconds between consecutive events' timestamps.
    #[arg(long, default_value_t = 1)]
    pub every_ms: i64,
}

impl BatchBenchArgs {
    fn spread(&self) -> Spread {
        Spread {
            products: self.products,
            zipcodes: self.zipcodes,
            every_ms: self.every_ms,
        }
    }
}

/// The GROUP BY measured against DuckDB.
pub const ZIP_PRODUCT_SQL: &str = "SELECT zipcode, ProductName, count(*) AS n, sum(price) AS revenue FROM events GROUP BY zipcode, ProductName";

/// Archive rate into Delta, batch recompute per view (in a `rebuild` child,
/// for its peak memory), and DuckDB over the same files.
pub fn batch(args: BatchBenchArgs) -> anyhow::Result<()> {
    use crate::master::MasterDataset;
    let tmp = tempfile::Builder::new()
        .prefix("lambdaflow-bench-batch-")
        .tempdir()?;
    let data = args.data.clone().unwrap_or_else(|| tmp.path().join("data"));
    println!("## bench batch");
    println!();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let schema = Arc::new(EventSchema::paper());
    // `--data s3://bucket/prefix`: the same run with the root on S3 (the
    // endpoint and credentials from the AWS environment).
    let storage = crate::storage::Storage::open(&data)?;
    let remote = storage.url().scheme() != "file";
    let master = rt.block_on(MasterDataset::open(&storage, schema.clone(), 2))?;
    let existing: u64 = master.coverage().h.total();
    if existing < args.events {
        let mut archive_secs = 0.0;
        let mut made = existing;
        let mut k = 0u64;
        let bar = indicatif::ProgressBar::new(args.events - existing);
        while made < args.events {
            let n = args.chunk.min(args.events - made);
            let p = (k % 2) as u32;
            archive_secs += incremental::commit_events(&master, &rt, p, n, made, args.spread())?;
            made += n;
            k += 1;
            bar.inc(n);
        }
        bar.finish_and_clear();
        println!(
            "archive into Delta ({} events, {}-event chunks, Parquet encode + write + commit, one thread): {} events/s",
            group(args.events - existing),
            group(args.chunk),
            group(((args.events - existing) as f64 / archive_secs) as u64)
        );
    }
    let size: u64 = rt.block_on(async {
        use futures::TryStreamExt;
        let objects: Vec<_> = storage
            .store()
            .list(Some(&storage.path(crate::master::TABLE_DIR)))
            .try_collect()
            .await?;
        Ok::<_, object_store::Error>(
            objects
                .iter()
                .filter(|o| o.location.extension() == Some("parquet"))
                .map(|o| o.size)
                .sum(),
        )
    })?;
    println!(
        "master dataset: {} events in {} ({:.1} bytes/event)",
        group(args.events),
        bytesize::ByteSize::b(size),
        size as f64 / args.events as f64
    );

    // The views, plus the GROUP BY compared with DuckDB.
    let config_path = if remote {
        tmp.path().join("bench-batch.toml")
    } else {
        data.join("bench-batch.toml")
    };
    // `serve` over the same config (`--incremental`) archives and runs
    // often; `rebuild` ignores both.
    let mut toml = format!(
        "data = {:?}\n[archive]\nchunk_age = \"2s\"\n[batch]\npause = \"1s\"\n[stream]\npartitions = 2\ndir = {:?}\n",
        data.display().to_string(),
        if remote {
            tmp.path().join("local")
        } else {
            data.clone()
        }
        .display()
        .to_string()
    );
    let mut views = crate::config::Config::default().views;
    views.push(crate::config::ViewConfig {
        name: "zip_product".into(),
        sql: ZIP_PRODUCT_SQL.into(),
        rollup: Vec::new(),
    });
    if args.shapes {
        views.extend(shapes::views());
    }
    for v in &views {
        toml.push_str(&format!(
            "[[views]]\nname = {:?}\nsql = {:?}\n",
            v.name, v.sql
        ));
    }
    std::fs::write(&config_path, toml)?;
    let exe = std::env::current_exe()?;
    let (secs, out) = rebuild(&exe, &config_path, None)?;
    println!();
    println!(
        "batch recompute of every view (`lambdaflow rebuild`, {:.2} s wall):",
        secs
    );
    println!("```");
    print!("{out}");
    println!("```");
    if args.engine == "ballista" {
        ballista_beside_local(&args, &exe, &config_path, &storage, &rt, secs, &out)?;
    }
    if args.shapes && !remote {
        return shapes::run(&exe, &config_path, &data, args.events, args.no_duckdb);
    }
    if let Some(added) = args.incremental {
        return incremental::run(&exe, &config_path, &master, &rt, added, args.spread());
    }
    let mut best = f64::MAX;
    for _ in 0..3 {
        let (_, out) = rebuild(&exe, &config_path, Some("zip_product"))?;
        if let Some((_, s)) = view_seconds(&out)
            .into_iter()
            .find(|(n, _)| n == "zip_product")
        {
            best = best.min(s);
        }
    }
    println!();
    println!(
        "zipcode × product count+sum over {} events: lambdaflow (DataFusion {}) best of 3 {:.3} s = {} events/s",
        group(args.events),
        datafusion::DATAFUSION_VERSION,
        best,
        group((args.events as f64 / best) as u64)
    );
    if !args.no_duckdb && !remote {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/duckdb_query.py");
        let glob = format!("{}/master/*.parquet", data.display());
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        match Command::new("python3")
            .arg(&script)
            .arg(&glob)
            .arg(threads.to_string())
            .arg(ZIP_PRODUCT_SQL.replace("FROM events", "FROM {src}"))
            .output()
        {
            Ok(out) if out.status.success() => {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
                let best = v["best_s"].as_f64().unwrap_or(f64::NAN);
                println!(
                    "same query in DuckDB {} ({} threads, same files): best of 3 {:.3} s = {} events/s",
                    v["version"].as_str().unwrap_or("?"),
                    threads,
                    best,
                    group((args.events as f64 / best) as u64)
                );
            }
            Ok(out) => println!(
                "DuckDB comparison skipped: {} (pip install duckdb)",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("failed")
            ),
            Err(e) => println!("DuckDB comparison skipped: {e}"),
        }
    }
    Ok(())
}

/// `lambdaflow rebuild [only] --config <config>` as a child process (for its
/// own peak memory): its wall time and what it printed.
fn rebuild(
    exe: &std::path::Path,
    config: &std::path::Path,
    only: Option<&str>,
) -> anyhow::Result<(f64, String)> {
    rebuild_with(exe, config, only.as_slice())
}

/// [`rebuild`] with these arguments (a view, or `--incremental`).
fn rebuild_with(
    exe: &std::path::Path,
    config: &std::path::Path,
    args: &[&str],
) -> anyhow::Result<(f64, String)> {
    let mut cmd = Command::new(exe);
    cmd.arg("rebuild").args(args);
    let t = Instant::now();
    let out = cmd.arg("--config").arg(config).output()?;
    let secs = t.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "rebuild failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((secs, stdout))
}

/// Each view's time from `rebuild`'s summary lines
/// ("  zip_product: N groups, M rows, S s").
fn view_seconds(out: &str) -> Vec<(String, f64)> {
    out.lines()
        .filter_map(|l| {
            let (name, rest) = l.trim().split_once(": ")?;
            let s = rest
                .rsplit(", ")
                .next()?
                .trim_end_matches(" s")
                .parse()
                .ok()?;
            Some((name.to_string(), s))
        })
        .collect()
}

/// A free TCP port on 127.0.0.1, for a server the bench starts.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The published run's engine record.
fn published_compute(
    storage: &crate::storage::Storage,
    rt: &tokio::runtime::Runtime,
) -> anyhow::Result<crate::batch::Compute> {
    let bytes = rt
        .block_on(storage.get(crate::batch::CURRENT))?
        .context("no published run")?;
    let m: crate::batch::Manifest = serde_json::from_slice(&bytes)?;
    Ok(m.info.compute)
}

/// A Ballista cluster of child processes of this executable, killed on drop.
struct BenchCluster {
    children: Vec<Child>,
    url: String,
}

impl BenchCluster {
    /// One scheduler and `executors` executors of one task each.
    fn start(
        exe: &std::path::Path,
        dir: &std::path::Path,
        executors: usize,
    ) -> anyhow::Result<BenchCluster> {
        let log = |name: &str| -> anyhow::Result<std::fs::File> {
            Ok(std::fs::File::create(dir.join(name))?)
        };
        let port = free_port()?;
        let url = format!("df://127.0.0.1:{port}");
        let mut children = vec![
            Command::new(exe)
                .args([
                    "ballista",
                    "scheduler",
                    "--bind",
                    &format!("127.0.0.1:{port}"),
                ])
                .stdout(log("scheduler.log")?)
                .stderr(log("scheduler.err")?)
                .spawn()?,
        ];
        wait_port(port)?;
        for i in 0..executors {
            let flight = free_port()?;
            let work = dir.join(format!("executor-{i}"));
            std::fs::create_dir_all(&work)?;
            children.push(
                Command::new(exe)
                    .args(["ballista", "executor", "--scheduler", &url])
                    .args(["--bind", &format!("127.0.0.1:{flight}")])
                    .args([
                        "--grpc-port",
                        &free_port()?.to_string(),
                        "--concurrent-tasks",
                        "1",
                    ])
                    .arg("--work-dir")
                    .arg(&work)
                    .stdout(log(&format!("executor-{i}.log"))?)
                    .stderr(log(&format!("executor-{i}.err"))?)
                    .spawn()?,
            );
            wait_port(flight)?;
        }
        Ok(BenchCluster { children, url })
    }
}

fn wait_port(port: u16) -> anyhow::Result<()> {
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t.elapsed() > std::time::Duration::from_secs(30) {
            bail!("nothing listens on 127.0.0.1:{port} after 30 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}

impl Drop for BenchCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `bench batch --engine ballista`: every view recomputed on the cluster,
/// beside the local engine's run over the same files, and where the
/// distributed path's time goes.
fn ballista_beside_local(
    args: &BatchBenchArgs,
    exe: &std::path::Path,
    config_path: &std::path::Path,
    storage: &crate::storage::Storage,
    rt: &tokio::runtime::Runtime,
    local_secs: f64,
    local_out: &str,
) -> anyhow::Result<()> {
    let local = &published_compute(storage, rt)?;
    let dir = tempfile::Builder::new()
        .prefix("lambdaflow-bench-ballista-")
        .tempdir()?;
    let started;
    let url = match &args.scheduler {
        Some(s) => {
            started = None;
            s.clone()
        }
        None => {
            let c = BenchCluster::start(exe, dir.path(), 2)?;
            let url = c.url.clone();
            started = Some(c);
            url
        }
    };
    let toml = std::fs::read_to_string(config_path)?;
    let ballista_config = dir.path().join("bench-batch-ballista.toml");
    // `[batch]` goes before the `[[views]]` tables.
    let (head, views) = toml.split_at(toml.find("[[views]]").unwrap_or(toml.len()));
    std::fs::write(
        &ballista_config,
        format!("{head}[batch]\nengine = \"ballista\"\nscheduler = {url:?}\n{views}"),
    )?;
    let (secs, stdout) = rebuild(exe, &ballista_config, None).context("on Ballista")?;
    let dist = published_compute(storage, rt)?;
    drop(started);
    println!();
    println!(
        "the same recompute on Ballista 55.0.0 at {url} ({}; `rebuild` with engine = \"ballista\", {:.2} s wall):",
        if args.scheduler.is_some() {
            "the given cluster"
        } else {
            "one scheduler and two executors of one task each, started for the bench"
        },
        secs
    );
    println!("```");
    print!("{stdout}");
    println!("```");
    println!();
    println!("| | local | ballista |");
    println!("|---|---:|---:|");
    println!("| `rebuild` wall (s) | {local_secs:.2} | {secs:.2} |");
    let lv = view_seconds(local_out);
    for (name, d) in view_seconds(&stdout) {
        if let Some((_, l)) = lv.iter().find(|(n, _)| *n == name) {
            println!("| {name} (s) | {l:.3} | {d:.3} |");
        }
    }
    println!(
        "| overhead ratio (ballista / local wall) | 1.00 | {:.2} |",
        secs / local_secs
    );
    println!();
    println!("where each engine's time went (summed over the views):");
    println!();
    println!("| stage | local (ms) | ballista (ms) |");
    println!("|---|---:|---:|");
    let mut names: Vec<&str> = local.stages.iter().map(|s| s.stage.as_str()).collect();
    for s in &dist.stages {
        if !names.contains(&s.stage.as_str()) {
            names.push(&s.stage);
        }
    }
    let ms = |c: &crate::batch::Compute, n: &str| {
        c.stages
            .iter()
            .find(|s| s.stage == n)
            .map_or("".to_string(), |s| group(s.ms))
    };
    for n in names {
        println!("| {n} | {} | {} |", ms(local, n), ms(&dist, n));
    }
    Ok(())
}

#[derive(Debug, Args, Clone)]
pub struct ServeBenchArgs {
    /// Events of history loaded before measuring.
    #[arg(long, default_value_t = 10_000_000)]
    pub history: u64,
    /// Distinct zipcodes (groups of sales_by_zipcode).
    #[arg(long, default_value_t = 100_000)]
    pub zipcodes: u64,
    /// Sustained ingest rate during the freshness and query phases (events/s).
    #[arg(long, default_value_t = 100_000)]
    pub rate: u64,
    /// Freshness probes.
    #[arg(long, default_value_t = 300)]
    pub probes: usize,
    /// Seconds of the query-latency phase.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Concurrent query clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Data directory (default: a temporary directory).
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
}

fn pcts(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    (percentile(&v, 0.5), percentile(&v, 0.99), v[v.len() - 1])
}

fn rss(pid: u32) -> (Option<u64>, Option<u64>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

/// Freshness, speed-layer throughput and query latency of a real server.
pub fn serve(args: ServeBenchArgs) -> anyhow::Result<()> {
    let (_tmp, _data, config_path) = bench_site("serve", args.data.as_deref(), "")?;
    let (server, url) = spawn_server(&config_path)?;
    let pid = server.child.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let status = |client: &reqwest::Client| {
        let (c, u) = (client.clone(), url.clone());
        async move {
            c.get(format!("{u}/v1/status"))
                .send()
                .await?
                .json::<serde_json::Value>()
                .await
        }
    };
    println!("## bench serve");
    println!();

    // 1. History.
    let t = Instant::now();
    let s = rt.block_on(produce::run(ProduceOptions {
        url: url.clone(),
        events: args.history,
        seed: Some(11),
        zipcodes: args.zipcodes,
        concurrency: 8,
        ..ProduceOptions::default()
    }))?;
    let ingest_secs = t.elapsed().as_secs_f64();
    let mut caught_up = None;
    let settled_after = loop {
        let st = rt.block_on(status(&client))?;
        let parts = st["partitions"].as_array().cloned().unwrap_or_default();
        if caught_up.is_none() && parts.iter().all(|p| p["realtime"] == p["end"]) {
            caught_up = Some(t.elapsed().as_secs_f64());
        }
        if parts.iter().all(|p| p["published"] == p["end"]) {
            break t.elapsed().as_secs_f64();
        }
        if parts.iter().all(|p| p["archived"] == p["end"]) {
            // Archived: run the batch cycle now rather than after the default pause.
            let _ = rt.block_on(client.post(format!("{url}/v1/batch/run")).send());
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        if t.elapsed() > std::time::Duration::from_secs(3600) {
            bail!("the history did not settle within an hour: {st}");
        }
    };
    let (now_rss, peak) = rss(pid);
    println!(
        "history: {} events ({} zipcodes) ingested in {:.1} s ({} events/s); speed layer caught up at {:.1} s; archived and published by the batch layer at {:.1} s",
        group(s.accepted),
        group(args.zipcodes),
        ingest_secs,
        group((s.accepted as f64 / ingest_secs) as u64),
        caught_up.unwrap_or(settled_after),
        settled_after
    );
    println!(
        "server memory with that history: RSS {}, peak {}",
        now_rss.map_or("?".into(), |b| bytesize::ByteSize::b(b).to_string()),
        peak.map_or("?".into(), |b| bytesize::ByteSize::b(b).to_string())
    );

    // A steady producer at `rate`, for the next phases.
    let load = |secs: f64| {
        produce::run(ProduceOptions {
            url: url.clone(),
            events: (args.rate as f64 * secs) as u64,
            rate: Some(args.rate),
            seed: Some(12),
            zipcodes: args.zipcodes,
            batch: (args.rate / 100).clamp(1, 1000) as usize,
            concurrency: 4,
            progress: false,
            ..ProduceOptions::default()
        })
    };

    // 2. Freshness: acknowledgement → first visibility in a query.
    let probe_secs = args.probes as f64 * 0.03 + 5.0;
    let fresh: Vec<f64> = rt.block_on(async {
        let bg = tokio::spawn(load(probe_secs));
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let mut out = Vec::with_capacity(args.probes);
        for k in 0..args.probes {
            let zip = 5_000_000 + k as i64;
            let body = format!(
                "{{\"zipcode\":{zip},\"ProductName\":\"probe\",\"price\":1,\"timestamp\":\"2014-11-01 00:00:00.000\"}}\n"
            );
            let r = client.post(format!("{url}/v1/events")).body(body).send().await;
            if !r.is_ok_and(|r| r.status().is_success()) {
                continue;
            }
            let acked = Instant::now();
            loop {
                let v: serde_json::Value = client
                    .get(format!("{url}/v1/views/sales_by_zipcode?zipcode={zip}"))
                    .send()
                    .await?
                    .json()
                    .await?;
                if v["rows"].as_array().is_some_and(|r| !r.is_empty()) {
                    out.push(acked.elapsed().as_secs_f64() * 1000.0);
                    break;
                }
                if acked.elapsed() > std::time::Duration::from_secs(10) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let _ = bg.await;
        Ok::<_, anyhow::Error>(out)
    })?;
    let (p50, p99, max) = pcts(fresh.clone());
    println!(
        "freshness at {} events/s sustained ({} probes): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (acknowledged → visible in GET /v1/views)",
        group(args.rate),
        fresh.len(),
        p50,
        p99,
        max
    );

    // 3. Query latency while ingesting.
    let (lat, sql_lat, elapsed) = rt.block_on(async {
        let bg = tokio::spawn(load(args.seconds as f64 + 3.0));
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let deadline = Instant::now() + std::time::Duration::from_secs(args.seconds);
        let began = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..args.clients {
            let (client, url) = (client.clone(), url.clone());
            let zipcodes = args.zipcodes;
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                let mut k = c as u64;
                while Instant::now() < deadline {
                    k = k.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let zip = 10_000 + (k >> 33) % zipcodes;
                    let t = Instant::now();
                    let ok = client
                        .get(format!("{url}/v1/views/sales_by_zipcode?zipcode={zip}"))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    if ok {
                        out.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                }
                out
            }));
        }
        let sql_task = {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let ok = client
                        .post(format!("{url}/v1/sql"))
                        .body("SELECT ProductName, orders FROM sales_by_product ORDER BY revenue DESC LIMIT 3")
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    if ok {
                        out.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                out
            })
        };
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap_or_default());
        }
        let sql = sql_task.await.unwrap_or_default();
        let elapsed = began.elapsed().as_secs_f64();
        let _ = bg.await;
        (all, sql, elapsed)
    });
    let n = lat.len();
    let (p50, p99, _) = pcts(lat);
    println!(
        "point reads of sales_by_zipcode ({} groups) while ingesting {} events/s, {} clients: {} queries/s, p50 {:.2} ms, p99 {:.2} ms",
        group(args.zipcodes),
        group(args.rate),
        args.clients,
        group((n as f64 / elapsed) as u64),
        p50,
        p99
    );
    let (p50, p99, _) = pcts(sql_lat.clone());
    println!(
        "SQL over the views (top 3 products, one client, {} queries): p50 {:.1} ms, p99 {:.1} ms",
        sql_lat.len(),
        p50,
        p99
    );

    // 4. The speed layer's own throughput: events through the view plans per second of micro-batch time.
    let st = rt.block_on(status(&client))?;
    let events = st["speed"]["events"].as_u64().unwrap_or(0);
    let micro = st["speed"]["micro_batches"].as_u64().unwrap_or(0);
    let mean_us = st["speed"]["mean_micro_batch_us"].as_u64().unwrap_or(0);
    let busy = (micro * mean_us) as f64 / 1e6;
    println!(
        "speed layer: {} events in {} micro-batches, {:.1} s of micro-batch time: {} events/s through the 3 views' plans (one core)",
        group(events),
        group(micro),
        busy,
        group((events as f64 / busy.max(1e-9)) as u64)
    );
    let (now_rss, peak) = rss(pid);
    println!(
        "server memory at the end: RSS {}, peak {}",
        now_rss.map_or("?".into(), |b| bytesize::ByteSize::b(b).to_string()),
        peak.map_or("?".into(), |b| bytesize::ByteSize::b(b).to_string())
    );
    drop(server);
    Ok(())
}

/// Decoder alone: events/s and MB/s on one thread.
pub fn decode_rate(events: u64, batch: usize) -> (f64, f64) {
    let generator = Generator::new(1, Some(1_414_800_000_000), 10, 0.0);
    let mut bodies = Vec::new();
    let mut done = 0;
    while done < events {
        let n = (events - done).min(batch as u64);
        let mut buf = Vec::with_capacity(n as usize * 100);
        generator.write(done, n, &mut buf);
        bodies.push(buf);
        done += n;
    }
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    let decoder = Decoder::new(Arc::new(EventSchema::paper()), Partitioning::RoundRobin);
    let t = Instant::now();
    let mut accepted = 0;
    for b in &bodies {
        accepted += decoder.decode(b, 0).accepted;
    }
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(accepted as u64, events, "generated events must all decode");
    (events as f64 / secs, bytes as f64 / secs / 1e6)
}

struct ServerChild {
    child: Child,
}

/// A data directory (`data`, or a temporary one kept alive by the returned
/// guard) and a config for it: loopback, any port, 2 partitions, plus `extra`.
fn bench_site(
    name: &str,
    data: Option<&std::path::Path>,
    extra: &str,
) -> anyhow::Result<(tempfile::TempDir, std::path::PathBuf, std::path::PathBuf)> {
    let tmp = tempfile::Builder::new()
        .prefix(&format!("lambdaflow-bench-{name}-"))
        .tempdir()?;
    let data = data.map_or_else(|| tmp.path().join("data"), |d| d.to_path_buf());
    std::fs::create_dir_all(&data)?;
    let config = data.join(format!("bench-{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "data = {:?}\nlisten = \"127.0.0.1:0\"\n[stream]\npartitions = 2\n{extra}",
            data.display().to_string()
        ),
    )?;
    Ok((tmp, data, config))
}

/// Starts `lambdaflow serve --config <config>` as a child process (killed on
/// drop) and returns it with the URL it printed.
fn spawn_server(config: &std::path::Path) -> anyhow::Result<(ServerChild, String)> {
    spawn_server_on(config, None)
}

/// [`spawn_server`], pinned to core `cpu` with `taskset` if given.
fn spawn_server_on(
    config: &std::path::Path,
    cpu: Option<usize>,
) -> anyhow::Result<(ServerChild, String)> {
    let exe = std::env::current_exe().context("cannot find the lambdaflow binary")?;
    let mut cmd = match cpu {
        Some(c) => {
            let mut t = Command::new("taskset");
            t.args(["-c", &c.to_string()]).arg(exe);
            t
        }
        None => Command::new(exe),
    };
    let mut child = cmd
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("could not start `lambdaflow serve`")?;
    let stdout = child.stdout.take().expect("piped stdout");
    let server = ServerChild { child };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let Some(url) = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .map(str::to_string)
    else {
        bail!("the server did not report its address (got {line:?})");
    };
    Ok((server, url))
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Peak resident memory of a process, from /proc (Linux).
pub fn peak_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn ingest(args: IngestBenchArgs) -> anyhow::Result<()> {
    println!("## bench ingest");
    println!();
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| c
                .lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string()))
            .unwrap_or_else(|| "unknown CPU".into())
    );

    let (eps, mbps) = decode_rate(args.decode_events, args.batch);
    println!(
        "decode only (1 thread, {} events of the paper, {}-event bodies): {} events/s, {:.0} MB/s",
        group(args.decode_events),
        args.batch,
        group(eps as u64),
        mbps
    );

    let tmp = tempfile::Builder::new()
        .prefix("lambdaflow-bench-")
        .tempdir()
        .context("could not create a temporary directory")?;
    let data = args.data.clone().unwrap_or_else(|| tmp.path().join("data"));
    let config_path = tmp.path().join("bench.toml");
    std::fs::write(
        &config_path,
        format!(
            "data = {:?}\nlisten = \"127.0.0.1:0\"\n[stream]\npartitions = {}\n",
            data.display().to_string(),
            args.partitions
        ),
    )?;
    let (server, url) = spawn_server(&config_path)?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let summary = rt.block_on(produce::run(ProduceOptions {
        url: url.clone(),
        events: args.events,
        seed: Some(7),
        batch: args.batch,
        concurrency: args.concurrency,
        ..ProduceOptions::default()
    }))?;
    let status: serde_json::Value = rt.block_on(async {
        reqwest::get(format!("{url}/v1/status"))
            .await?
            .json::<serde_json::Value>()
            .await
    })?;
    let peak = peak_rss_bytes(server.child.id());
    let (mut fsyncs, mut frames, mut bytes) = (0, 0, 0);
    for p in status["partitions"].as_array().into_iter().flatten() {
        fsyncs += p["fsyncs"].as_u64().unwrap_or(0);
        frames += p["frames"].as_u64().unwrap_or(0);
        bytes += p["bytes"].as_u64().unwrap_or(0);
    }
    drop(server);

    println!(
        "durable HTTP ingest, numbered requests (exactly once; {} events, {}-event requests, {} in flight, {} partitions): {} events/s acknowledged after fsync",
        group(summary.events),
        args.batch,
        args.concurrency,
        args.partitions,
        group(summary.events_per_sec() as u64),
    );
    println!(
        "  accepted {} · rejected {} · failed {} · {:.2} s",
        group(summary.accepted),
        group(summary.rejected),
        group(summary.failed),
        summary.elapsed.as_secs_f64()
    );
    println!(
        "  log: {} frames in {} fsyncs ({:.1} frames per fsync), {} on disk ({:.1} bytes/event)",
        group(frames),
        group(fsyncs),
        frames as f64 / fsyncs.max(1) as f64,
        bytesize::ByteSize::b(bytes),
        bytes as f64 / summary.accepted.max(1) as f64
    );
    match peak {
        Some(b) => println!("  server peak memory (VmHWM): {}", bytesize::ByteSize::b(b)),
        None => println!("  server peak memory: unavailable"),
    }
    if summary.failed > 0 {
        bail!(
            "{} events failed: {:?}",
            summary.failed,
            summary.first_error
        );
    }

    // The same without the requests' identity (`--no-idempotence`): what
    // exactly once from the producer costs, side by side in one run.
    let plain_data = tmp.path().join("data-unnumbered");
    let plain_config = tmp.path().join("bench-unnumbered.toml");
    std::fs::write(
        &plain_config,
        format!(
            "data = {:?}\nlisten = \"127.0.0.1:0\"\n[stream]\npartitions = {}\n",
            plain_data.display().to_string(),
            args.partitions
        ),
    )?;
    let (server, url) = spawn_server(&plain_config)?;
    let plain = rt.block_on(produce::run(ProduceOptions {
        url,
        events: args.events,
        seed: Some(7),
        batch: args.batch,
        concurrency: args.concurrency,
        idempotent: false,
        ..ProduceOptions::default()
    }))?;
    drop(server);
    println!(
        "the same with unnumbered requests (at least once): {} events/s; numbered / unnumbered = {:.2}",
        group(plain.events_per_sec() as u64),
        summary.events_per_sec() / plain.events_per_sec().max(1e-9)
    );
    Ok(())
}
