//! `bench batch --shapes`: a full recompute of views of different shapes,
//! side by side with DuckDB over the same Parquet files in the same run —
//! a handful of groups, ~100K groups, ~1M groups, a time bucket with
//! avg/min/max, approx_distinct.
//!
//! ```text
//!  for each shape:  lambdaflow rebuild VIEW (a child process; the view's own
//!                   time as rebuild reports it: scan, states, rollup,
//!                   finalize, states + TSV written), best of 3
//!                   DuckDB: the same query (its own spelling) in 3 fresh
//!                   processes: the best first run (cold, like each rebuild
//!                   child) and the best of each process's 3 runs (warm)
//! ```

use std::path::Path;
use std::process::Command;

use crate::config::ViewConfig;
use crate::human::group;

/// A shape: the view lambdaflow computes, and the same query for DuckDB.
pub struct Shape {
    pub name: &'static str,
    pub what: &'static str,
    pub sql: &'static str,
    /// `{src}` is DuckDB's scan of the files.
    pub duckdb: &'static str,
}

pub const SHAPES: &[Shape] = &[
    Shape {
        name: "shape_few",
        what: "a handful of groups (product): count, sum",
        sql: "SELECT ProductName, count(*) AS n, sum(price) AS revenue FROM events GROUP BY ProductName",
        duckdb: "SELECT ProductName, count(*) AS n, sum(price) AS revenue FROM {src} GROUP BY ProductName",
    },
    Shape {
        name: "shape_100k",
        what: "~100K groups (zipcode): count, sum",
        sql: "SELECT zipcode, count(*) AS n, sum(price) AS revenue FROM events GROUP BY zipcode",
        duckdb: "SELECT zipcode, count(*) AS n, sum(price) AS revenue FROM {src} GROUP BY zipcode",
    },
    Shape {
        name: "shape_1m",
        what: "~1M groups (zipcode × product): count, sum",
        sql: "SELECT zipcode, ProductName, count(*) AS n, sum(price) AS revenue FROM events GROUP BY zipcode, ProductName",
        duckdb: "SELECT zipcode, ProductName, count(*) AS n, sum(price) AS revenue FROM {src} GROUP BY zipcode, ProductName",
    },
    Shape {
        name: "shape_minute",
        what: "a time bucket (minute × product): avg, min, max",
        sql: "SELECT date_trunc('minute', timestamp) AS minute, ProductName, avg(price) AS avg_price, min(price) AS low, max(price) AS high FROM events GROUP BY date_trunc('minute', timestamp), ProductName",
        duckdb: "SELECT date_trunc('minute', timestamp) AS minute, ProductName, avg(price) AS avg_price, min(price) AS low, max(price) AS high FROM {src} GROUP BY date_trunc('minute', timestamp), ProductName",
    },
    Shape {
        name: "shape_distinct",
        what: "approx_distinct (zipcodes per product)",
        sql: "SELECT ProductName, approx_distinct(zipcode) AS zipcodes FROM events GROUP BY ProductName",
        duckdb: "SELECT ProductName, approx_count_distinct(zipcode) AS zipcodes FROM {src} GROUP BY ProductName",
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

/// Measures every shape, both engines, and prints the table.
pub fn run(exe: &Path, config: &Path, data: &Path, events: u64) -> anyhow::Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/duckdb_query.py");
    let glob = format!("{}/master/*.parquet", data.display());
    println!();
    println!(
        "full recompute by shape, {} events, {threads} threads each (`lambdaflow rebuild VIEW`, best of 3 child processes: the view's time as it reports it; DuckDB {}: the same query, best first run of 3 fresh processes, and best warm run):",
        group(events),
        duckdb_version()
    );
    println!();
    println!("| shape | groups | lambdaflow | DuckDB, first run | ÷ | DuckDB, warm | ÷ |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for s in SHAPES {
        let mut best = f64::MAX;
        let mut groups = String::from("?");
        for _ in 0..3 {
            let (_, out) = super::rebuild(exe, config, Some(s.name))?;
            if let Some((_, secs)) = super::view_seconds(&out)
                .into_iter()
                .find(|(n, _)| n == s.name)
            {
                best = best.min(secs);
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
        let (mut cold, mut warm) = (None::<f64>, None::<f64>);
        for _ in 0..3 {
            let duck = Command::new("python3")
                .arg(&script)
                .arg(&glob)
                .arg(threads.to_string())
                .arg(s.duckdb)
                .output();
            match duck {
                Ok(o) if o.status.success() => {
                    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
                    let min = |a: Option<f64>, b: Option<f64>| match (a, b) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    cold = min(cold, v["first_s"].as_f64());
                    warm = min(warm, v["best_s"].as_f64());
                }
                Ok(o) => {
                    eprintln!(
                        "DuckDB failed on {}: {}",
                        s.name,
                        String::from_utf8_lossy(&o.stderr)
                    );
                    break;
                }
                Err(e) => {
                    eprintln!("DuckDB comparison skipped: {e} (pip install duckdb)");
                    break;
                }
            }
        }
        let secs = |d: Option<f64>| d.map_or("–".into(), |d| format!("{d:.3} s"));
        let ratio = |d: Option<f64>| d.map_or("–".into(), |d| format!("{:.2}", best / d));
        println!(
            "| {} | {groups} | {best:.3} s | {} | {} | {} | {} |",
            s.what,
            secs(cold),
            ratio(cold),
            secs(warm),
            ratio(warm),
        );
    }
    Ok(())
}

fn duckdb_version() -> String {
    Command::new("python3")
        .args(["-c", "import duckdb; print(duckdb.__version__)"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into())
}
