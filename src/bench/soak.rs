//! `lambdaflow bench soak`: a real server under steady load for N minutes,
//! with periodic batch runs and log retention, reporting once a minute what
//! would grow without bound if something leaked: resident memory, open file
//! descriptors, disk use of the data directory, and each layer's lag.
//!
//! ```text
//!  produce (steady rate) ──▶ serve (child) ──▶ every --every: RSS, fds, disk, lag
//!                                 └── batch runs every --batch-pause; retention
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use super::{bench_site, rss, spawn_server};
use crate::produce::{self, ProduceOptions, group};

#[derive(Debug, Args, Clone)]
pub struct SoakBenchArgs {
    /// How long to run.
    #[arg(long, default_value_t = 10)]
    pub minutes: u64,
    /// Steady ingest rate (events/s).
    #[arg(long, default_value_t = 20_000)]
    pub rate: u64,
    /// Pause between batch runs.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub batch_pause: Duration,
    /// Log segment size (retention deletes whole segments).
    #[arg(long, default_value = "16 MiB")]
    pub segment_bytes: bytesize::ByteSize,
    /// Only the views whose group count is bounded (sales_by_product,
    /// sales_by_zipcode): a per-minute view gains groups as time passes, so
    /// its memory grows by design; without it, any growth is a leak.
    #[arg(long)]
    pub bounded_views: bool,
    /// Seconds between reports.
    #[arg(long, default_value_t = 60)]
    pub every: u64,
    /// Data directory (default: a temporary directory).
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
}

const BOUNDED_VIEWS: &str = r#"
[[views]]
name = "sales_by_product"
sql = "SELECT ProductName, count(*) AS orders, sum(price) AS revenue FROM events GROUP BY ProductName"

[[views]]
name = "sales_by_zipcode"
sql = "SELECT zipcode, count(*) AS orders, sum(price) AS revenue FROM events GROUP BY zipcode"
"#;

/// Bytes under `dir`, recursively.
fn disk_use(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_use(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

struct Sample {
    minute: f64,
    rss: u64,
    /// Heap the server holds (jemalloc `stats.allocated`), 0 if not reported.
    heap: u64,
    fds: usize,
    /// The log and the batch views must plateau; the master dataset grows
    /// with the events by design (it is the immutable record of them all).
    log: u64,
    master: u64,
    views: u64,
    accepted: u64,
    not_archived: u64,
    not_published: u64,
    not_realtime: u64,
    runs: u64,
    problems: usize,
}

pub fn soak(args: SoakBenchArgs) -> anyhow::Result<()> {
    let (_tmp, data, config_path) = bench_site(
        "soak",
        args.data.as_deref(),
        &format!(
            "segment_bytes = \"{}\"\n[batch]\npause = \"{}\"\n{}",
            args.segment_bytes,
            humantime::format_duration(args.batch_pause),
            if args.bounded_views {
                BOUNDED_VIEWS
            } else {
                ""
            }
        ),
    )?;
    let (server, url) = spawn_server(&config_path)?;
    let pid = server.child.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let total = args.rate * args.minutes * 60;
    println!("## bench soak");
    println!();
    println!(
        "{} minutes at {} events/s ({} events), {}, batch pause {}, segments of {}, data {}",
        args.minutes,
        group(args.rate),
        group(total),
        if args.bounded_views {
            "views sales_by_product and sales_by_zipcode"
        } else {
            "the default views"
        },
        humantime::format_duration(args.batch_pause),
        args.segment_bytes,
        data.display()
    );
    println!();
    let producer = {
        let url = url.clone();
        rt.spawn(produce::run(ProduceOptions {
            url,
            events: total,
            rate: Some(args.rate),
            // Events stamped with the time they are sent, as in production:
            // a fixed seed would stamp them 1 ms apart, 20× faster than the
            // clock at 20,000 events/s, and per-minute views would grow 20×
            // faster than they ever do.
            seed: None,
            concurrency: 4,
            batch: 1000,
            late: 0.05,
            progress: false,
            ..ProduceOptions::default()
        }))
    };
    let client = reqwest::Client::new();
    let began = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    println!(
        "| minute | RSS | heap | open fds | log disk | master disk | views disk | accepted | not archived | not in batch | not realtime | batch runs | problems |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut next = Duration::from_secs(args.every);
    loop {
        let done = producer.is_finished();
        if !done && began.elapsed() < next {
            std::thread::sleep(
                next.saturating_sub(began.elapsed())
                    .min(Duration::from_secs(1)),
            );
            continue;
        }
        next += Duration::from_secs(args.every);
        let st: serde_json::Value = rt.block_on(async {
            client
                .get(format!("{url}/v1/status"))
                .send()
                .await?
                .json()
                .await
        })?;
        let parts = st["partitions"].as_array().cloned().unwrap_or_default();
        let lag = |key: &str| -> u64 {
            parts
                .iter()
                .map(|p| {
                    p["end"]
                        .as_u64()
                        .unwrap_or(0)
                        .saturating_sub(p[key].as_u64().unwrap_or(0))
                })
                .sum()
        };
        let s = Sample {
            minute: began.elapsed().as_secs_f64() / 60.0,
            rss: rss(pid).0.unwrap_or(0),
            heap: st["memory"]["allocated"].as_u64().unwrap_or(0),
            fds: open_fds(pid).unwrap_or(0),
            log: disk_use(&data.join("log")),
            master: disk_use(&data.join("master")),
            views: disk_use(&data.join("views")),
            accepted: st["ingest"]["accepted"].as_u64().unwrap_or(0),
            not_archived: lag("archived"),
            not_published: lag("published"),
            not_realtime: lag("realtime"),
            runs: st["batch"]["runs"].as_u64().unwrap_or(0),
            problems: st["health"]["problems"].as_array().map_or(0, Vec::len),
        };
        println!(
            "| {:.1} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            s.minute,
            bytesize::ByteSize::b(s.rss),
            bytesize::ByteSize::b(s.heap),
            s.fds,
            bytesize::ByteSize::b(s.log),
            bytesize::ByteSize::b(s.master),
            bytesize::ByteSize::b(s.views),
            group(s.accepted),
            group(s.not_archived),
            group(s.not_published),
            group(s.not_realtime),
            s.runs,
            s.problems
        );
        samples.push(s);
        if done {
            break;
        }
    }
    let summary = rt
        .block_on(producer)
        .context("the producer task failed")??;
    let (_, peak) = rss(pid);
    drop(server);
    println!();
    println!(
        "producer: {} events sent, {} acknowledged; server peak RSS {}",
        group(summary.events),
        group(summary.accepted),
        bytesize::ByteSize::b(peak.unwrap_or(0))
    );
    // Plateau: compare the second half's growth with the first half's.
    if samples.len() >= 4 {
        let half = samples.len() / 2;
        let (a, b, c) = (&samples[0], &samples[half], &samples[samples.len() - 1]);
        let growth = |f: fn(&Sample) -> u64| (f(b) as i64 - f(a) as i64, f(c) as i64 - f(b) as i64);
        let (r1, r2) = growth(|s| s.rss);
        let (l1, l2) = growth(|s| s.log + s.views);
        let (f1, f2) = growth(|s| s.fds as u64);
        let mib = |b: i64| b as f64 / (1 << 20) as f64;
        println!(
            "growth, first half → second half: RSS {:+.1} → {:+.1} MiB, log + views {:+.1} → {:+.1} MiB, open fds {f1:+} → {f2:+}",
            mib(r1),
            mib(r2),
            mib(l1),
            mib(l2)
        );
        let tail = &samples[half..];
        println!(
            "slope over the second half (minutes {:.0}–{:.0}, least squares): RSS {:+.2} MiB/min, heap {:+.2} MiB/min",
            tail[0].minute,
            c.minute,
            slope(tail, |s| s.rss),
            slope(tail, |s| s.heap)
        );
        println!(
            "master dataset: {} for {} events (grows with the events by design)",
            bytesize::ByteSize::b(c.master),
            group(c.accepted)
        );
    }
    Ok(())
}

/// Least-squares slope of `f` (bytes) over the samples, in MiB per minute:
/// end points alone swing with where a batch run is.
fn slope(samples: &[Sample], f: fn(&Sample) -> u64) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mx = samples.iter().map(|s| s.minute).sum::<f64>() / n;
    let my = samples.iter().map(|s| f(s) as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for s in samples {
        num += (s.minute - mx) * (f(s) as f64 - my);
        den += (s.minute - mx) * (s.minute - mx);
    }
    if den == 0.0 {
        0.0
    } else {
        num / den / (1 << 20) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_is_mib_per_minute_and_ignores_a_swing() {
        let at = |minute: f64, mib: f64| Sample {
            minute,
            rss: (mib * (1 << 20) as f64) as u64,
            heap: 0,
            fds: 0,
            log: 0,
            master: 0,
            views: 0,
            accepted: 0,
            not_archived: 0,
            not_published: 0,
            not_realtime: 0,
            runs: 0,
            problems: 0,
        };
        let line: Vec<Sample> = (0..10)
            .map(|m| at(m as f64, 100.0 + 2.0 * m as f64))
            .collect();
        assert!((slope(&line, |s| s.rss) - 2.0).abs() < 1e-6);
        let flat: Vec<Sample> = (0..10)
            .map(|m| at(m as f64, if m % 2 == 0 { 100.0 } else { 160.0 }))
            .collect();
        assert!(
            slope(&flat, |s| s.rss).abs() < 2.0,
            "a 60 MiB swing is not a trend"
        );
    }
}
