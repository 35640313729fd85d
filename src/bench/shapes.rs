//! `bench batch --shapes`: a full recompute of views of five shapes, side
//! by side with DuckDB and ClickHouse (chDB, in process) over the same
//! Parquet files in the same run: 100 groups, 100K groups, 1M groups, a
//! time bucket with five aggregates, approx_distinct.
//!
//! ```text
//!  for each shape:  lambdaflow rebuild VIEW: a child process, best of 3 —
//!                   its wall time (start, open the table, scan, states,
//!                   finalize, write, publish) and the view's own time as
//!                   rebuild reports it
//!                   DuckDB, chDB: the same query (each engine's spelling)
//!                   in 3 fresh processes — the best first run (a fresh
//!                   process, like each rebuild child) and the best of each
//!                   process's 3 runs (warm, like the batch loop in `serve`)
//! ```
//!
//! The data the issue measured: `--products 100 --zipcodes 1000
//! --every-ms 25` (100 products, 1,000 zipcodes, 70 hours of events).

use std::path::Path;
use std::process::Command;

use crate::config::ViewConfig;
use crate::human::group;

/// A shape: the view lambdaflow computes, and the same query for the peers.
pub struct Shape {
    pub name: &'static str,
    pub what: &'static str,
    pub sql: &'static str,
    /// `{src}` is DuckDB's scan of the files.
    pub duckdb: &'static str,
    /// `{src}` is chDB's scan of the files.
    pub chdb: &'static str,
}

pub const SHAPES: &[Shape] = &[
    Shape {
        name: "shape_product",
        what: "`ProductName` count, sum",
        sql: "SELECT ProductName, count(*) AS n, sum(price) AS revenue FROM events GROUP BY ProductName",
        duckdb: "SELECT ProductName, count(*) AS n, sum(price) AS revenue FROM {src} GROUP BY ProductName",
        chdb: "SELECT ProductName, count(*) AS n, sum(price) AS revenue FROM {src} GROUP BY ProductName",
    },
    Shape {
        name: "shape_zip_product",
        what: "`zipcode, ProductName` count, sum",
        sql: "SELECT zipcode, ProductName, count(*) AS n, sum(price) AS revenue FROM events GROUP BY zipcode, ProductName",
        duckdb: "SELECT zipcode, ProductName, count(*) AS n, sum(price) AS revenue FROM {src} GROUP BY zipcode, ProductName",
        chdb: "SELECT zipcode, ProductName, count(*) AS n, sum(price) AS revenue FROM {src} GROUP BY zipcode, ProductName",
    },
    Shape {
        name: "shape_zip_product_band",
        what: "`zipcode, ProductName, price % 10` count, sum",
        sql: "SELECT zipcode, ProductName, price % 10 AS band, count(*) AS n, sum(price) AS revenue FROM events GROUP BY zipcode, ProductName, price % 10",
        duckdb: "SELECT zipcode, ProductName, price % 10 AS band, count(*) AS n, sum(price) AS revenue FROM {src} GROUP BY zipcode, ProductName, price % 10",
        chdb: "SELECT zipcode, ProductName, price % 10 AS band, count(*) AS n, sum(price) AS revenue FROM {src} GROUP BY zipcode, ProductName, band",
    },
    Shape {
        name: "shape_minute",
        what: "minute × `ProductName` count, sum, avg, min, max",
        sql: "SELECT date_trunc('minute', timestamp) AS minute, ProductName, count(*) AS n, sum(price) AS revenue, avg(price) AS avg_price, min(price) AS low, max(price) AS high FROM events GROUP BY date_trunc('minute', timestamp), ProductName",
        duckdb: "SELECT date_trunc('minute', timestamp) AS minute, ProductName, count(*) AS n, sum(price) AS revenue, avg(price) AS avg_price, min(price) AS low, max(price) AS high FROM {src} GROUP BY date_trunc('minute', timestamp), ProductName",
        chdb: "SELECT date_trunc('minute', timestamp) AS minute, ProductName, count(*) AS n, sum(price) AS revenue, avg(price) AS avg_price, min(price) AS low, max(price) AS high FROM {src} GROUP BY minute, ProductName",
    },
    Shape {
        name: "shape_distinct",
        what: "`ProductName`, approx distinct zipcodes",
        sql: "SELECT ProductName, approx_distinct(zipcode) AS zipcodes FROM events GROUP BY ProductName",
        duckdb: "SELECT ProductName, approx_count_distinct(zipcode) AS zipcodes FROM {src} GROUP BY ProductName",
        chdb: "SELECT ProductName, uniq(zipcode) AS zipcodes FROM {src} GROUP BY ProductName",
    },
];

/// The shapes as views, for the bench's config.
pub fn views() -> Vec<ViewConfig> {
    SHAPES
        .iter()
        .map(|s| ViewConfig {
            name: s.name.into(),
            sql: s.sql.into(),
            rollup: Vec::new(),
        })
        .collect()
}

/// A peer's figures for one shape: the best first run of a fresh process,
/// and the best warm run.
#[derive(Debug, Default, Clone, Copy)]
struct Peer {
    first: Option<f64>,
    warm: Option<f64>,
}

/// The Python that has the peers installed: `LAMBDAFLOW_PYTHON`, the test
/// command's environment, or `python3`.
fn python() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("LAMBDAFLOW_PYTHON") {
        return p.into();
    }
    if let Some(home) = std::env::var_os("HOME") {
        let venv = Path::new(&home).join(".cache/lambdaflow-py/bin/python");
        if venv.exists() {
            return venv;
        }
    }
    "python3".into()
}

/// `script` (DuckDB's or chDB's) over `glob` in 3 fresh processes.
fn peer(script: &str, glob: &str, threads: usize, sql: &str) -> Peer {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("bench")
        .join(script);
    let mut p = Peer::default();
    let min = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    for _ in 0..3 {
        match Command::new(python())
            .arg(&script)
            .arg(glob)
            .arg(threads.to_string())
            .arg(sql)
            .output()
        {
            Ok(o) if o.status.success() => {
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&o.stdout) else {
                    break;
                };
                p.first = min(p.first, v["first_s"].as_f64());
                p.warm = min(p.warm, v["best_s"].as_f64());
            }
            Ok(o) => {
                eprintln!(
                    "{} failed: {}",
                    script.display(),
                    String::from_utf8_lossy(&o.stderr)
                );
                break;
            }
            Err(e) => {
                eprintln!("{} skipped: {e}", script.display());
                break;
            }
        }
    }
    p
}

/// A Python module's version, or `?`.
fn version(module: &str) -> String {
    Command::new(python())
        .args([
            "-c",
            &format!("import {module}; print({module}.__version__)"),
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into())
}

/// Measures every shape, all three engines, and prints the table.
pub fn run(
    exe: &Path,
    config: &Path,
    data: &Path,
    events: u64,
    no_peers: bool,
) -> anyhow::Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let glob = format!("{}/master/*.parquet", data.display());
    println!();
    println!(
        "full recompute by shape, {} events, {threads} threads each: lambdaflow `rebuild VIEW` best of 3 child processes (wall, and the view's own time as it reports it); DuckDB {} and chDB {}: the same query, best first run of 3 fresh processes, and best warm run:",
        group(events),
        version("duckdb"),
        version("chdb"),
    );
    println!();
    println!(
        "| shape | groups | lambdaflow process | its view | DuckDB first | DuckDB warm | chDB first | chDB warm | process ÷ DuckDB first | process ÷ chDB first | view ÷ DuckDB warm | view ÷ chDB warm |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in SHAPES {
        let (mut wall, mut view) = (f64::MAX, f64::MAX);
        let mut groups = String::from("?");
        for _ in 0..3 {
            let (secs, out) = super::rebuild(exe, config, Some(s.name))?;
            wall = wall.min(secs);
            if let Some((_, secs)) = super::view_seconds(&out)
                .into_iter()
                .find(|(n, _)| n == s.name)
            {
                view = view.min(secs);
            }
            if let Some(l) = out
                .lines()
                .find(|l| l.trim().starts_with(&format!("{}:", s.name)))
            {
                groups = l
                    .split(": ")
                    .nth(1)
                    .and_then(|r| r.split(" groups").next())
                    .unwrap_or("?")
                    .to_string();
            }
        }
        let (duck, ch) = if no_peers {
            (Peer::default(), Peer::default())
        } else {
            (
                peer("duckdb_query.py", &glob, threads, s.duckdb),
                peer("chdb_query.py", &glob, threads, s.chdb),
            )
        };
        let secs = |d: Option<f64>| d.map_or("–".into(), |d| format!("{d:.3} s"));
        let ratio = |a: f64, d: Option<f64>| d.map_or("–".into(), |d| format!("{:.2}", a / d));
        println!(
            "| {} | {groups} | {wall:.3} s | {view:.3} s | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.what,
            secs(duck.first),
            secs(duck.warm),
            secs(ch.first),
            secs(ch.warm),
            ratio(wall, duck.first),
            ratio(wall, ch.first),
            ratio(view, duck.warm),
            ratio(view, ch.warm),
        );
    }
    Ok(())
}
