//! `lambdaflow bench keys`: what event keys cost (issue 34).
//!
//! ```text
//!  index    the key index in process: N keys over 30 days of stream time,
//!           10 % re-sent within minutes; settled every 1 M (as publishes do):
//!           ns per decision, memory, disk
//!  ingest   two servers, the same events (10 % re-sent one by one, and every
//!           20th request sent twice) over HTTP: keys on and off, acknowledged
//!           and consumed by the speed layer
//!  peers    with `--chdb PYTHON`: the same events with retries into
//!           ClickHouse (chDB) with its insert deduplication on, and how many
//!           duplicates each counts
//! ```

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use crate::keys::{KeyIndex, KeyRule};
use crate::produce::group;

#[derive(Debug, Args, Clone)]
pub struct KeysBenchArgs {
    /// Keys through the index (100,000,000 is the issue's target; slow).
    #[arg(long, default_value_t = 10_000_000)]
    pub keys: u64,
    /// Events sent over HTTP to each server.
    #[arg(long, short = 'n', default_value_t = 2_000_000)]
    pub events: u64,
    /// Skip the in-process index measurement.
    #[arg(long)]
    pub no_index: bool,
    /// Skip the HTTP measurement.
    #[arg(long)]
    pub no_ingest: bool,
    /// A Python with the `chdb` package: ClickHouse's insert deduplication
    /// on the same events, side by side.
    #[arg(long)]
    pub chdb: Option<std::path::PathBuf>,
}

/// The `i`th event's key: 10 % of events repeat the key of one sent up to
/// 1,000 before (a retry), the others are new.
fn key_of(i: u64) -> u64 {
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    if i > 1_000 && (h >> 8).is_multiple_of(10) {
        key_of(i - 1 - (h >> 32) % 1_000)
    } else {
        i
    }
}

fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0)
        * 1024
}

fn index(args: &KeysBenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("lambdaflow-bench-keys-")
        .tempdir()?;
    let rule = KeyRule {
        field: 0,
        within: Duration::from_secs(30 * 24 * 3600),
    };
    let before = rss();
    let mut index = KeyIndex::open(dir.path(), 0, &rule, "k:int64")?;
    // The keys arrive evenly over 30 days of stream time.
    let step_ms = (30 * 24 * 3600 * 1000 / args.keys.max(1)).max(1) as i64;
    let t0 = 1_800_000_000_000i64;
    let hasher = crate::keys::KeyHasher::new([7; 16]);
    let (mut dups, mut decide_ns, mut settle_ns, mut hash_ns) = (0u64, 0u128, 0u128, 0u128);
    let mut peak = before;
    let t = Instant::now();
    // As the speed layer does: a micro-batch's keys hashed, then decided,
    // each fetching the filter's slot of the key 8 ahead.
    let mut block: Vec<u128> = Vec::with_capacity(1024);
    for i in 0..args.keys {
        if i % 1024 == 0 {
            let d = Instant::now();
            block.clear();
            block.extend(
                (i..(i + 1024).min(args.keys))
                    .map(|k| hasher.hash(0, format!("ev{}", key_of(k)).as_bytes())),
            );
            hash_ns += d.elapsed().as_nanos();
        }
        let d = Instant::now();
        let j = (i % 1024) as usize;
        if let Some(&ahead) = block.get(j + 8) {
            index.prefetch(ahead);
        }
        dups += u64::from(index.decide(i, block[j], t0 + i as i64 * step_ms)?);
        decide_ns += d.elapsed().as_nanos();
        if (i + 1) % 1_000_000 == 0 {
            let s = Instant::now();
            index.settle(i + 1)?;
            settle_ns += s.elapsed().as_nanos();
            peak = peak.max(rss());
            print!(
                "\r  {} keys, {} duplicates, {} in memory, {} on disk   ",
                group(i + 1),
                group(dups),
                bytesize::ByteSize::b(index.size().memory_bytes),
                bytesize::ByteSize::b(index.size().disk_bytes)
            );
            let _ = std::io::stdout().flush();
        }
    }
    index.settle(args.keys)?;
    println!();
    let size = index.size();
    println!(
        "key index, {} keys over 30 days (10 % re-sent within 1,000 events), settled every 1 M: {:.2} s",
        group(args.keys),
        t.elapsed().as_secs_f64()
    );
    println!(
        "  hash (SipHash-2-4-128 of an `ev<n>` key, with its formatting): {:.0} ns · decide: {:.0} ns per event · settle (runs written, merged): {:.1} ns per event",
        hash_ns as f64 / args.keys as f64,
        decide_ns as f64 / args.keys as f64,
        settle_ns as f64 / args.keys as f64
    );
    println!(
        "  duplicates found {} · keys held {} · runs {} · index memory {} · disk {} · process RSS grew {} (peak {})",
        group(dups),
        group(size.keys),
        size.runs,
        bytesize::ByteSize::b(size.memory_bytes),
        bytesize::ByteSize::b(size.disk_bytes),
        bytesize::ByteSize::b(rss().saturating_sub(before)),
        bytesize::ByteSize::b(peak)
    );
    // Reopening reads every run back into the filter (a restart).
    drop(index);
    let t = Instant::now();
    let index = KeyIndex::open(dir.path(), 0, &rule, "k:int64")?;
    println!(
        "  reopen (a restart reads the runs into the filter): {:.2} s, edge {}",
        t.elapsed().as_secs_f64(),
        group(index.edge())
    );
    Ok(())
}

const SCHEMA: &str = r#"
[schema]
event_time = "timestamp"
fields = [
  { name = "id",          type = "utf8" },
  { name = "ProductName", type = "utf8" },
  { name = "price",       type = "int64" },
  { name = "timestamp",   type = "timestamp_ms", format = "epoch_ms" },
]
[[views]]
name = "sales"
sql = "SELECT ProductName, count(*) AS orders, sum(price) AS revenue FROM events GROUP BY ProductName"
"#;

fn line(i: u64) -> String {
    let k = key_of(i);
    format!(
        "{{\"id\":\"ev{k}\",\"ProductName\":\"product{}\",\"price\":{},\"timestamp\":1700000000000}}\n",
        k % 100,
        k % 50 + 1
    )
}

/// Sends `events` to `url` (1,000 an request, 8 in flight); the time to
/// the last acknowledgement, and to the speed layer's consuming them.
async fn send(url: &str, events: u64) -> anyhow::Result<(f64, f64)> {
    let client = reqwest::Client::new();
    let t = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, next, url) = (client.clone(), next.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(1000, std::sync::atomic::Ordering::Relaxed);
                if from >= events {
                    return anyhow::Ok(());
                }
                let body: String = (from..(from + 1000).min(events)).map(line).collect();
                // Every 20th request is sent twice (a producer's retry of a
                // whole request), as the ClickHouse script does.
                let times = if (from / 1000) % 20 == 7 { 2 } else { 1 };
                for _ in 0..times {
                    let r = client
                        .post(format!("{url}/v1/events"))
                        .body(body.clone())
                        .send()
                        .await?;
                    if !r.status().is_success() {
                        bail!("{}: {}", r.status(), r.text().await.unwrap_or_default());
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let acked = t.elapsed().as_secs_f64();
    loop {
        let s: serde_json::Value = client
            .get(format!("{url}/v1/status"))
            .send()
            .await?
            .json()
            .await?;
        let parts = s["partitions"].as_array().cloned().unwrap_or_default();
        let done = parts.iter().all(|p| {
            let end = if p["end"].is_null() {
                &p["stream_end"]
            } else {
                &p["end"]
            };
            p["realtime"] == *end
        });
        if done {
            return Ok((acked, t.elapsed().as_secs_f64()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ingest(args: &KeysBenchArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut results = Vec::new();
    for (name, key) in [
        ("keys on", "key = { field = \"id\", within = \"7d\" }\n"),
        ("keys off", ""),
    ] {
        let schema = SCHEMA.replace("[schema]\n", &format!("[schema]\n{key}"));
        let (_tmp, _data, config) = super::bench_site(&name.replace(' ', "-"), None, &schema)?;
        // Both partition by the key (keys on does it by itself).
        let text = std::fs::read_to_string(&config)?.replace(
            "[stream]\npartitions = 2\n",
            "[stream]\npartitions = 2\nkey = \"id\"\n",
        );
        std::fs::write(&config, text)?;
        let (server, url) = super::spawn_server(&config)?;
        let (acked, consumed) = rt.block_on(send(&url, args.events))?;
        let answer: serde_json::Value = rt.block_on(async {
            reqwest::get(format!("{url}/v1/views/sales"))
                .await?
                .json::<serde_json::Value>()
                .await
        })?;
        let orders: u64 = answer["rows"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["orders"].as_u64())
            .sum();
        let peak = super::peak_rss_bytes(server.child.id());
        drop(server);
        println!(
            "ingest, {name}: {} events (10 % re-sent, every 20th request twice) acknowledged in {acked:.2} s ({} events/s), consumed by the speed layer in {consumed:.2} s ({} events/s); the view counts {} orders; server peak RSS {}",
            group(args.events),
            group((args.events as f64 / acked) as u64),
            group((args.events as f64 / consumed) as u64),
            group(orders),
            peak.map_or("?".into(), |b| bytesize::ByteSize::b(b).to_string())
        );
        results.push((acked, consumed, orders));
    }
    let unique = (0..args.events).filter(|&i| key_of(i) == i).count() as u64;
    let sent = args.events
        + (0..args.events.div_ceil(1000))
            .filter(|b| b % 20 == 7)
            .map(|b| (args.events - b * 1000).min(1000))
            .sum::<u64>();
    println!(
        "  keys on / off: acknowledged {:.2}×, consumed {:.2}×; {} records sent, {} unique keys; orders counted: keys on {}, keys off {}",
        results[1].0 / results[0].0,
        results[1].1 / results[0].1,
        group(sent),
        group(unique),
        group(results[0].2),
        group(results[1].2)
    );
    Ok(())
}

fn chdb(python: &std::path::Path, events: u64) -> anyhow::Result<()> {
    let script = std::env::current_dir()?.join("scripts/bench_keys_chdb.py");
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg(events.to_string())
        .output()
        .with_context(|| format!("could not run {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}

pub fn keys(args: KeysBenchArgs) -> anyhow::Result<()> {
    println!("## bench keys");
    println!();
    if !args.no_index {
        index(&args)?;
    }
    if !args.no_ingest {
        ingest(&args)?;
    }
    if let Some(python) = &args.chdb {
        chdb(python, args.events)?;
    }
    Ok(())
}
