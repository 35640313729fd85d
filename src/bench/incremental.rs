//! `bench batch --incremental`: what an incremental run costs against a
//! full recompute over the same master dataset, side by side, and how long
//! a view added while serving takes to its first exact answer.
//!
//! ```text
//!  N events, a full run published ─▶ +M new events (one chunk)
//!    ├─ lambdaflow rebuild --incremental   (the batch loop's run: reads the M)
//!    └─ lambdaflow rebuild                 (from scratch: reads N + M)
//!  lambdaflow serve ─▶ POST /v1/views ─▶ poll until its answer counts N + M
//! ```

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::chunk::ChunkRange;
use crate::human::group;
use crate::master::MasterDataset;
use crate::stream::SourceBatch;

/// `rebuild` prints its peak memory as `peak memory (VmHWM): 1.2 GiB`.
fn peak(out: &str) -> String {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("peak memory (VmHWM): "))
        .unwrap_or("?")
        .to_string()
}

/// Commits events `[index, index + n)` of a generated stream spread as
/// `spread` says to partition `p` of the master dataset as one chunk; the
/// seconds the commit took (encode, write, commit).
pub fn commit_events(
    master: &MasterDataset,
    rt: &tokio::runtime::Runtime,
    p: u32,
    n: u64,
    index: u64,
    spread: super::Spread,
) -> anyhow::Result<f64> {
    let start = master.coverage().h.get(p);
    let mut first = start;
    let batches: Vec<SourceBatch> = super::spread_batches(index, n, 8192, spread)
        .into_iter()
        .map(|b| {
            let at = first;
            first += b.num_rows() as u64;
            SourceBatch::dense(p, at, chrono::Utc::now().timestamp_millis(), b)
        })
        .collect();
    let t = Instant::now();
    rt.block_on(master.commit_chunk(ChunkRange::dense(p, start, first), batches, None))?;
    Ok(t.elapsed().as_secs_f64())
}

pub fn run(
    exe: &Path,
    config: &Path,
    master: &MasterDataset,
    rt: &tokio::runtime::Runtime,
    added: u64,
    spread: super::Spread,
) -> anyhow::Result<()> {
    let before: u64 = rt.block_on(master.refresh())?.h.total();
    commit_events(master, rt, 0, added, before, spread)?;
    let total = before + added;
    let (inc_s, inc_out) = super::rebuild_with(exe, config, &["--incremental"])?;
    let (full_s, full_out) = super::rebuild_with(exe, config, &[])?;
    println!();
    println!(
        "an incremental run against a full recompute: {} events of history, {} new (one chunk), every view (`lambdaflow rebuild --incremental` and `lambdaflow rebuild`, child processes, wall time and peak RSS):",
        group(before),
        group(added)
    );
    println!();
    println!("| run | wall | peak memory | events read |");
    println!("|---|---:|---:|---:|");
    let read = |out: &str| -> u64 {
        out.lines()
            .filter_map(|l| {
                l.split(" over ")
                    .nth(1)?
                    .split(" events")
                    .next()
                    .map(|n| n.replace(',', ""))
            })
            .filter_map(|n| n.parse::<u64>().ok())
            .sum()
    };
    println!(
        "| incremental | {inc_s:.2} s | {} | {} |",
        peak(&inc_out),
        group(read(&inc_out))
    );
    println!(
        "| full | {full_s:.2} s | {} | {} |",
        peak(&full_out),
        group(read(&full_out))
    );
    println!();
    println!(
        "incremental is {:.1}× faster (wall, process start included)",
        full_s / inc_s
    );
    println!("```");
    print!("{inc_out}");
    println!("```");
    live_view(exe, config, total)
}

/// `serve` over the bench's data, a view added with `POST /v1/views`, and
/// the time until its answer counts every event.
fn live_view(exe: &Path, config: &Path, total: u64) -> anyhow::Result<()> {
    let port = super::free_port()?;
    let mut child = Command::new(exe)
        .args(["serve", "--config"])
        .arg(config)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("serve's stdout")?).read_line(&mut line)?;
    let url = format!("http://127.0.0.1:{port}");
    let result = (|| -> anyhow::Result<f64> {
        let rt = tokio::runtime::Runtime::new()?;
        rt.block_on(async {
            let c = reqwest::Client::new();
            // A name of its own: an added view is saved with the data.
            let name = format!("added_{}", chrono::Utc::now().timestamp_millis());
            let view = serde_json::json!({
                "name": name,
                "sql": "SELECT zipcode % 1000 AS z, count(*) AS n FROM events GROUP BY zipcode % 1000",
            });
            let t = Instant::now();
            let r = c.post(format!("{url}/v1/views")).json(&view).send().await?;
            if r.status().as_u16() != 202 {
                bail!("POST /v1/views: {} {}", r.status(), r.text().await?);
            }
            loop {
                let r = c
                    .get(format!("{url}/v1/views/{name}?limit=100000"))
                    .send()
                    .await?;
                if r.status().is_success() {
                    let a: serde_json::Value = r.json().await?;
                    let n: u64 = a["rows"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|r| r["n"].as_u64())
                        .sum();
                    if n == total {
                        let secs = t.elapsed().as_secs_f64();
                        // Dropped again: the bench's data keeps its views.
                        c.delete(format!("{url}/v1/views/{name}")).send().await?;
                        return Ok(secs);
                    }
                }
                if t.elapsed() > Duration::from_secs(3600) {
                    bail!("the added view never answered");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    })();
    let steady = result.as_ref().ok().map(|_| in_the_loop(exe, &url, total));
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    let secs = result?;
    println!();
    println!(
        "a view added while serving (`POST /v1/views`, {} events of history) to its first exact answer: {secs:.2} s",
        group(total)
    );
    match steady {
        Some(Ok(line)) => println!("{line}"),
        Some(Err(e)) => println!(
            "the batch loop's incremental run was not measured: {}",
            crate::error::chain(AsRef::<dyn std::error::Error + Send + Sync>::as_ref(&e))
        ),
        None => {}
    }
    Ok(())
}

/// The batch loop's own incremental run inside `serve` (files already
/// verified by this process, as in steady state): 1M events produced over
/// HTTP, archived, and the run that publishes them, as `status` reports it.
fn in_the_loop(exe: &Path, url: &str, history: u64) -> anyhow::Result<String> {
    let added = 1_000_000u64;
    let out = Command::new(exe)
        .args(["produce", "--url", url, "-n", &added.to_string()])
        .output()?;
    if !out.status.success() {
        bail!("produce failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let c = reqwest::Client::new();
        let t = Instant::now();
        loop {
            let _ = c.post(format!("{url}/v1/batch/run")).send().await;
            let s: serde_json::Value = c.get(format!("{url}/v1/status")).send().await?.json().await?;
            let runs = s["batch"]["recent"].as_array().cloned().unwrap_or_default();
            if let Some(r) = runs.iter().find(|r| r["events"].as_u64() == Some(history + added)) {
                let stages: Vec<String> = r["compute"]["stages"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|x| format!("{} {} ms", x["stage"].as_str().unwrap_or("?"), x["ms"]))
                    .collect();
                return Ok(format!(
                    "the batch loop's run inside `serve` that made the last of {} events produced over HTTP (onto {} of history) published: {:.2} s ({} incremental, {} full view(s); read {} events: {})",
                    group(added),
                    group(history),
                    r["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0,
                    r["kinds"]["incremental"],
                    r["kinds"]["full"],
                    group(r["kinds"]["events_read"].as_u64().unwrap_or(0)),
                    stages.join(", ")
                ));
            }
            if t.elapsed() > Duration::from_secs(600) {
                bail!("no run published the produced events");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}
