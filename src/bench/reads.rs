//! `bench reads`: point reads against this machine's ceiling, and the
//! Postgres wire beside HTTP.
//!
//! ```text
//!  core 0: lambdaflow serve (taskset)      core 1: this process — the load
//!                                                  generator (and producer)
//!  ceiling:     N clients × GET /healthz            (a constant answer)
//!  point reads: N clients × GET /v1/views/sales_by_zipcode?zipcode=…
//!  → point reads as a fraction of the ceiling's rate, p99 as a multiple
//!    of its p99; idle, then while ingesting
//!  Postgres wire vs HTTP, one client: a key lookup, a whole view
//! ```
//!
//! With two machines unavailable, the ceiling says what this machine's
//! network stack, HTTP server and load generator allow at all; the point
//! read's share of it is what lambdaflow itself costs.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{bench_site, pcts, spawn_server_on};
use crate::produce::{self, ProduceOptions, group};

#[derive(Debug, clap::Args)]
pub struct ReadsBenchArgs {
    /// Events of history loaded before measuring.
    #[arg(long, default_value_t = 2_000_000)]
    pub history: u64,
    /// Distinct zipcodes (groups of sales_by_zipcode).
    #[arg(long, default_value_t = 100_000)]
    pub zipcodes: u64,
    /// Ingest rate during the "while ingesting" phase (events/s; 0 skips it).
    #[arg(long, default_value_t = 100_000)]
    pub rate: u64,
    /// Seconds of each measured phase.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Concurrent HTTP clients of the load generator.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Queries of each Postgres-wire and HTTP latency measure.
    #[arg(long, default_value_t = 3_000)]
    pub queries: usize,
    /// Do not pin the server and the load generator to separate cores.
    #[arg(long)]
    pub no_pin: bool,
}

/// Pins this process (and the threads it starts after) to `cpu`.
fn pin_self(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls only read it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// Rate, p50 and p99 (ms) of `clients` loops GETting `path(k)` for `secs`.
async fn load(
    client: &reqwest::Client,
    base: &str,
    clients: usize,
    secs: u64,
    path: impl Fn(u64) -> String + Clone + Send + 'static,
) -> (f64, f64, f64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let began = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (client, base, path) = (client.clone(), base.to_string(), path.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut k = c as u64 + 1;
            while Instant::now() < deadline {
                k = k
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let t = Instant::now();
                let ok = match client.get(format!("{base}{}", path(k >> 33))).send().await {
                    Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                    _ => false,
                };
                if ok {
                    out.push(t.elapsed().as_secs_f64() * 1000.0);
                }
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    let rate = all.len() as f64 / began.elapsed().as_secs_f64();
    let (p50, p99, _) = pcts(all);
    (rate, p50, p99)
}

fn line(what: &str, (rate, p50, p99): (f64, f64, f64)) {
    println!("| {what} | {} | {p50:.2} | {p99:.2} |", group(rate as u64));
}

pub fn reads(args: ReadsBenchArgs) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pin = !args.no_pin && cores >= 2;
    let pg_port = super::free_port()?;
    let (_tmp, _data, config) = bench_site(
        "reads",
        None,
        &format!("[pg]\nlisten = \"127.0.0.1:{pg_port}\"\n"),
    )?;
    let (_server, url) = spawn_server_on(&config, pin.then_some(0))?;
    if pin && !pin_self(1) {
        bail!("could not pin the load generator to core 1");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;

    println!("## bench reads");
    println!();
    println!(
        "server on core 0, load generator on core 1: {}; {} clients, {} s per phase",
        if pin {
            "pinned (taskset)"
        } else {
            "not pinned"
        },
        args.clients,
        args.seconds
    );

    // History: a published batch run over `zipcodes` groups.
    rt.block_on(produce::run(ProduceOptions {
        url: url.clone(),
        events: args.history,
        seed: Some(11),
        zipcodes: args.zipcodes,
        concurrency: 4,
        progress: false,
        ..ProduceOptions::default()
    }))?;
    let t = Instant::now();
    loop {
        let st: serde_json::Value = rt.block_on(async {
            client
                .get(format!("{url}/v1/status"))
                .send()
                .await?
                .json()
                .await
        })?;
        let parts = st["partitions"].as_array().cloned().unwrap_or_default();
        if parts.iter().all(|p| p["published"] == p["end"]) {
            break;
        }
        if parts.iter().all(|p| p["archived"] == p["end"]) {
            let _ = rt.block_on(client.post(format!("{url}/v1/batch/run")).send());
        }
        if t.elapsed() > Duration::from_secs(1800) {
            bail!("the history was not published within 30 minutes: {st}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "history: {} events, {} groups in sales_by_zipcode, published",
        group(args.history),
        group(args.zipcodes)
    );
    println!();

    let zipcodes = args.zipcodes;
    let point = move |k: u64| {
        format!(
            "/v1/views/sales_by_zipcode?zipcode={}",
            10_000 + k % zipcodes
        )
    };
    let ceiling = |_: u64| "/healthz".to_string();
    let phases: Vec<(&str, u64)> = if args.rate > 0 {
        vec![("idle", 0), ("ingesting", args.rate)]
    } else {
        vec![("idle", 0)]
    };
    println!("| phase | requests/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|");
    let mut ratios = Vec::new();
    for (name, rate) in phases {
        let (c, p) = rt.block_on(async {
            let secs = 2 * args.seconds + 4;
            let bg = (rate > 0).then(|| {
                tokio::spawn(produce::run(ProduceOptions {
                    url: url.clone(),
                    events: rate * secs,
                    rate: Some(rate),
                    seed: Some(12),
                    zipcodes,
                    batch: (rate / 100).clamp(1, 1000) as usize,
                    concurrency: 4,
                    progress: false,
                    ..ProduceOptions::default()
                }))
            });
            if bg.is_some() {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            let c = load(&client, &url, args.clients, args.seconds, ceiling).await;
            let p = load(&client, &url, args.clients, args.seconds, point).await;
            if let Some(bg) = bg {
                bg.abort();
            }
            (c, p)
        });
        line(&format!("{name}: ceiling, GET /healthz"), c);
        line(
            &format!("{name}: point read, GET /v1/views/sales_by_zipcode?zipcode=…"),
            p,
        );
        ratios.push((name, p.0 / c.0, p.2 / c.2));
    }
    println!();
    for (name, rate, p99) in &ratios {
        println!(
            "{name}: point reads at {:.2} of the ceiling's rate, p99 {:.1}× the ceiling's (target: ≥ 0.8, ≤ 2×)",
            rate, p99
        );
    }
    println!();

    // The Postgres wire beside HTTP, one client, sequential queries.
    let pg = rt.block_on(pg_vs_http(&url, pg_port, &client, args.queries, zipcodes))?;
    println!("| query, one client | Postgres wire p50 / p99 ms | HTTP p50 / p99 ms |");
    println!("|---|---|---|");
    for (what, pg, http) in pg {
        println!(
            "| {what} | {:.2} / {:.2} | {:.2} / {:.2} |",
            pg.0, pg.1, http.0, http.1
        );
    }
    Ok(())
}

type Pair = (f64, f64);

async fn pg_vs_http(
    url: &str,
    pg_port: u16,
    client: &reqwest::Client,
    n: usize,
    zipcodes: u64,
) -> anyhow::Result<Vec<(&'static str, Pair, Pair)>> {
    let (pg, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={pg_port} user=bench dbname=lambdaflow"),
        tokio_postgres::NoTls,
    )
    .await
    .context("connecting over the Postgres wire")?;
    tokio::spawn(conn);
    let lookup = pg
        .prepare("SELECT * FROM sales_by_zipcode WHERE zipcode = $1")
        .await?;
    let time = |v: Vec<f64>| {
        let (p50, p99, _) = pcts(v);
        (p50, p99)
    };
    let (mut a, mut b) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for k in 0..n as u64 {
        let zip = (10_000 + (k * 7919) % zipcodes) as i64;
        let t = Instant::now();
        let rows = pg.query(&lookup, &[&zip]).await?;
        a.push(t.elapsed().as_secs_f64() * 1000.0);
        if k == 0 && rows.len() != 1 {
            bail!("zipcode {zip}: {} rows over the Postgres wire", rows.len());
        }
        let t = Instant::now();
        client
            .get(format!("{url}/v1/views/sales_by_zipcode?zipcode={zip}"))
            .send()
            .await?
            .bytes()
            .await?;
        b.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let point = ("key lookup, sales_by_zipcode", time(a), time(b));
    let whole = n.min(300);
    let (mut a, mut b) = (Vec::with_capacity(whole), Vec::with_capacity(whole));
    for _ in 0..whole {
        let t = Instant::now();
        pg.query("SELECT * FROM sales_by_product", &[]).await?;
        a.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        client
            .post(format!("{url}/v1/sql"))
            .body("SELECT * FROM sales_by_product")
            .send()
            .await?
            .bytes()
            .await?;
        b.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let small = ("whole view, sales_by_product (SQL)", time(a), time(b));
    let (mut a, mut b) = (Vec::with_capacity(whole), Vec::with_capacity(whole));
    for _ in 0..whole / 10 {
        let t = Instant::now();
        pg.query("SELECT * FROM sales_by_zipcode LIMIT 10000", &[])
            .await?;
        a.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        client
            .post(format!("{url}/v1/sql"))
            .body("SELECT * FROM sales_by_zipcode LIMIT 10000")
            .send()
            .await?
            .bytes()
            .await?;
        b.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let big = ("10,000 rows of sales_by_zipcode (SQL)", time(a), time(b));
    Ok(vec![point, small, big])
}
