//! The crash loop: `serve` as a child process, concurrent producers that
//! retry with backoff, and a kill at a random moment — a plain SIGKILL while
//! events stream in, or a failpoint that aborts the process inside a
//! micro-batch, between a chunk's Parquet write and its Delta commit, before
//! and after a batch publish, or half-way through log retention.
//!
//! After every restart the server must answer for exactly the events it says
//! it covers, and keep every acknowledged offset; at the end every
//! acknowledged event is in the master dataset at the offset it was
//! acknowledged at, every event ever sent is there exactly once (the
//! producers number their requests and retry until acknowledged; a retry of
//! a request stored before its reply was lost is recognised), and the
//! published views equal the view SQL over the master dataset.
//!
//! `LAMBDAFLOW_CRASH_KILLS=500 cargo test --release --test integration crash_loop:: -- --nocapture`
//! runs a longer loop (default: 50 kills).

use crate::common;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::exact::body_of;
use crate::common::{Server, Site, get_json};

/// Tiny segments and chunks: rolls, retention and archive commits happen
/// within a process's short life. The bound on unpublished events keeps a
/// long loop linear: a process lives 0.03–4 s, too short for a batch run over
/// a master dataset of thousands of one-chunk files to publish, and without
/// it each restart replays a realtime window that grows with every kill
/// (1,000 kills: quadratic). Ingest then answers 503 until the batch layer
/// publishes — backpressure under kills, which this loop checks too.
pub(crate) const CONFIG: &str = "[stream]\nsegment_bytes = \"16 KiB\"\n[speed]\ninterval = \"10ms\"\n[archive]\nchunk_events = 1000\nchunk_age = \"100ms\"\n[batch]\npause = \"150ms\"\n[ingest]\nmax_unpublished = 200000\n";

const FAILPOINTS: [&str; 7] = [
    "ingest-after-append",
    "archive-after-parquet",
    "archive-after-commit",
    "batch-before-publish",
    "batch-after-publish",
    "log-retention",
    "speed-micro-batch",
];

/// What the producers know: acknowledged offsets, how often each event was
/// sent, and the requests still to be (re)sent.
#[derive(Default)]
struct Ledger {
    acked: BTreeMap<(u32, u64), i64>,
    sends: BTreeMap<i64, u32>,
    /// Requests `[from, to)` not yet acknowledged (refused, or in doubt).
    retry: Vec<(i64, i64)>,
    in_doubt: u64,
    /// Re-sent requests the server answered as stored before.
    recognised: u64,
}

/// A tiny deterministic generator (the test must be repeatable per seed).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Starts `serve`; `None` if it died before listening (a failpoint during
/// the replay at startup — a kill like any other).
fn start(site: &Site, failpoint: Option<&str>) -> Option<Server> {
    let stderr = match std::env::var("LAMBDAFLOW_CRASH_DEBUG") {
        Ok(f) if f.len() > 1 => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(f)
                .unwrap(),
        ),
        _ => Stdio::null(),
    };
    let mut env = vec![("RUST_LOG", "error")];
    if let Some(f) = failpoint {
        env.push(("LAMBDAFLOW_FAILPOINTS", f));
    }
    match site.try_serve(&env, stderr) {
        Ok(server) => Some(server),
        Err(status) => {
            assert!(
                failpoint.is_some() && !status.success(),
                "serve failed to start without a failpoint: {status}"
            );
            None
        }
    }
}

/// One producer: sends requests of 50 events until told to stop or the server
/// is gone; refused and in-doubt requests go back on the retry list.
fn produce(url: String, ledger: Arc<Mutex<Ledger>>, next: Arc<Mutex<i64>>, stop: Arc<AtomicBool>) {
    let rt = common::rt();
    let client = reqwest::Client::new();
    let mut backoff = Duration::from_millis(5);
    while !stop.load(Ordering::Relaxed) {
        let (from, to) = {
            let mut l = ledger.lock().unwrap();
            match l.retry.pop() {
                Some(r) => r,
                None => {
                    let mut n = next.lock().unwrap();
                    *n += 50;
                    (*n - 50, *n)
                }
            }
        };
        {
            let mut l = ledger.lock().unwrap();
            for k in from..to {
                *l.sends.entry(10_000 + k).or_default() += 1;
            }
        }
        let reply = rt.block_on(async {
            // One producer identity; a request's number is its range's, the
            // same on every retry.
            let r = client
                .post(format!("{url}/v1/events"))
                .header("Lambdaflow-Producer", "crash-loop")
                .header("Lambdaflow-Sequence", (from / 50).to_string())
                .body(body_of(from, to))
                .timeout(Duration::from_secs(20))
                .send()
                .await?;
            let status = r.status().as_u16();
            let v: serde_json::Value = r.json().await?;
            Ok::<_, reqwest::Error>((status, v))
        });
        let mut l = ledger.lock().unwrap();
        match reply {
            Ok((200, v)) => {
                if v["resent"].is_string() {
                    l.recognised += 1;
                }
                let r = &v["offsets"][0];
                let (p, first) = (
                    r["partition"].as_u64().unwrap() as u32,
                    r["first"].as_u64().unwrap(),
                );
                for k in from..to {
                    let prev = l.acked.insert((p, first + (k - from) as u64), 10_000 + k);
                    assert!(
                        prev.is_none(),
                        "offset {p}:{} acknowledged twice",
                        first + (k - from) as u64
                    );
                }
                backoff = Duration::from_millis(5);
                drop(l);
                // A steady stream, not a flood: the overload test floods.
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok((503 | 507, _)) => {
                // Refused, not stored: send again after a pause.
                l.retry.push((from, to));
                drop(l);
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            Ok((status, v)) => panic!("unexpected HTTP {status}: {v}"),
            Err(_) => {
                // The server died: the request may or may not be stored.
                l.in_doubt += 1;
                l.retry.push((from, to));
                return;
            }
        }
    }
}

/// After a restart: the log still holds every acknowledged offset, and a
/// whole-view answer counts exactly the events below the offsets it reports.
///
/// Returns false when the server died meanwhile (a failpoint armed for this
/// cycle can fire before the check is done).
fn check_after_restart(server: &Server, ledger: &Ledger, cycle: usize) -> bool {
    let get = |path: &str| {
        common::rt().block_on(async {
            reqwest::get(format!("{}{path}", server.url))
                .await
                .ok()?
                .json::<serde_json::Value>()
                .await
                .ok()
        })
    };
    let Some(s) = get("/v1/status") else {
        return false;
    };
    if std::env::var("LAMBDAFLOW_CRASH_DEBUG").is_ok() {
        let parts: Vec<String> = s["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                format!(
                    "p{} end {} archived {} published {}",
                    p["partition"], p["end"], p["archived"], p["published"]
                )
            })
            .collect();
        eprintln!("cycle {cycle}: {parts:?} {}", s["health"]);
    }
    for p in s["partitions"].as_array().unwrap() {
        let part = p["partition"].as_u64().unwrap() as u32;
        let max_acked = ledger
            .acked
            .range((part, 0)..(part, u64::MAX))
            .next_back()
            .map_or(0, |((_, o), _)| o + 1);
        assert!(
            p["end"].as_u64().unwrap() >= max_acked,
            "cycle {cycle}: partition {part} lost acknowledged offsets (end {}, acknowledged up to {max_acked})",
            p["end"]
        );
    }
    let Some(v) = get("/v1/views/sales_by_product") else {
        return false;
    };
    let (orders, covered) = common::orders_and_covered(&v);
    assert_eq!(
        orders, covered,
        "cycle {cycle}: an answer must count exactly the events below its offsets: {v}"
    );
    true
}

#[test]
fn every_acknowledged_event_survives_50_kills_exactly_once() {
    let kills: usize = std::env::var("LAMBDAFLOW_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let seed: u64 = std::env::var("LAMBDAFLOW_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_1a3b_da7a);
    crash_loop_on(&Site::new(CONFIG), kills, seed);
}

/// The crash loop on `site` (a local data directory, or an S3 root).
pub(crate) fn crash_loop_on(site: &Site, kills: usize, seed: u64) {
    eprintln!("crash loop: {kills} kills, seed {seed}");
    let mut rng = Rng(seed);
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let next = Arc::new(Mutex::new(0i64));
    let mut by_kind: BTreeMap<String, u32> = BTreeMap::new();
    let began = Instant::now();
    let mut checked = 0;
    for cycle in 0..kills {
        let failpoint =
            (rng.below(3) == 0).then(|| FAILPOINTS[rng.below(FAILPOINTS.len() as u64) as usize]);
        let Some(mut server) = start(site, failpoint) else {
            *by_kind
                .entry(format!("{} (at startup)", failpoint.unwrap()))
                .or_default() += 1;
            continue;
        };
        if check_after_restart(&server, &ledger.lock().unwrap(), cycle) {
            checked += 1;
        }
        if cycle % 10 == 9 {
            eprintln!(
                "crash loop: {} kills, {:.0} s",
                cycle + 1,
                began.elapsed().as_secs_f64()
            );
        }
        let stop = Arc::new(AtomicBool::new(false));
        let producers: Vec<_> = (0..3)
            .map(|_| {
                let (url, l, n, s) = (
                    server.url.clone(),
                    ledger.clone(),
                    next.clone(),
                    stop.clone(),
                );
                std::thread::spawn(move || produce(url, l, n, s))
            })
            .collect();
        let kind = match failpoint {
            None => {
                std::thread::sleep(Duration::from_millis(30 + rng.below(600)));
                server.child.kill().unwrap();
                "SIGKILL".to_string()
            }
            Some(f) => {
                // Wait for the failpoint; SIGKILL if the run never reaches it.
                let t = Instant::now();
                let mut hit = false;
                while t.elapsed() < Duration::from_secs(4) {
                    if server.child.try_wait().unwrap().is_some() {
                        hit = true;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                if !hit {
                    let _ = server.child.kill();
                }
                if hit {
                    f.to_string()
                } else {
                    format!("SIGKILL ({f} not reached)")
                }
            }
        };
        let _ = server.child.wait();
        stop.store(true, Ordering::Relaxed);
        for p in producers {
            p.join().expect("a producer panicked");
        }
        *by_kind.entry(kind).or_default() += 1;
    }

    // The end: a clean server; producers re-send what is still unacknowledged.
    let server = start(site, None).unwrap();
    assert!(check_after_restart(&server, &ledger.lock().unwrap(), kills));
    loop {
        let retry = std::mem::take(&mut ledger.lock().unwrap().retry);
        if retry.is_empty() {
            break;
        }
        ledger.lock().unwrap().retry = retry;
        let stop = Arc::new(AtomicBool::new(false));
        let (url, l, n, s) = (
            server.url.clone(),
            ledger.clone(),
            next.clone(),
            stop.clone(),
        );
        let t = std::thread::spawn(move || {
            // Stop as soon as the retry list is drained, or when the producer
            // gave up on a request (it put it back on the list): the outer
            // loop sends it again. Waiting for the list alone hung the
            // 1,000-kill run after its last kill.
            let watcher = {
                let (l, s) = (l.clone(), s.clone());
                std::thread::spawn(move || {
                    while !s.load(Ordering::Relaxed) && !l.lock().unwrap().retry.is_empty() {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    s.store(true, Ordering::Relaxed);
                })
            };
            produce(url, l, n, s.clone());
            s.store(true, Ordering::Relaxed);
            watcher.join().unwrap();
        });
        t.join().unwrap();
    }
    let s = server.wait_settled(Duration::from_secs(180));
    let answer = get_json(&format!("{}/v1/views/sales_by_product", server.url));
    server.stop();

    let ledger = ledger.lock().unwrap();
    let (rows, events) = match &site.storage {
        None => common::master_events(&site.data),
        Some(s) => common::master_events_in(s, 2),
    };
    for (k, z) in &ledger.acked {
        assert_eq!(
            rows.get(k),
            Some(z),
            "acknowledged event {k:?} (zipcode {z}) must be in the master dataset at its offset"
        );
    }
    let mut stored: BTreeMap<i64, u32> = BTreeMap::new();
    for z in rows.values() {
        *stored.entry(*z).or_default() += 1;
    }
    for (z, sent) in &ledger.sends {
        let n = stored.get(z).copied().unwrap_or(0);
        assert!(
            n >= 1,
            "event {z} was sent until acknowledged, but is not stored"
        );
        assert_eq!(
            n, 1,
            "event {z} is stored {n} times (sent {sent} times): a re-sent request must be recognised, never stored twice"
        );
    }
    assert_eq!(
        stored.len(),
        ledger.sends.len(),
        "the master dataset holds only events that were sent"
    );
    let duplicates: u32 = stored.values().map(|n| n - 1).sum();
    common::exact::assert_views_equal_sql_in(site.storage.as_ref(), &site.data, &events);
    let (orders, _) = common::orders_and_covered(&answer);
    assert_eq!(
        orders,
        rows.len() as u64,
        "the served answer counts every stored event once: {answer}"
    );
    eprintln!(
        "crash loop: {kills} kills in {:.0} s {by_kind:?}; {checked} restarts checked; {} events acknowledged, {} requests in doubt, {} re-sent requests recognised as stored, {} events stored twice; final H {}",
        began.elapsed().as_secs_f64(),
        ledger.acked.len(),
        ledger.in_doubt,
        ledger.recognised,
        duplicates,
        s["batch"]["published"]["h"]
    );
}
