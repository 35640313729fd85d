//! A seeded, in-process simulation of a node: the layers opened by
//! [`node::assemble`] on a manual clock, driven step by step in an order a
//! seed chooses, with the handoff invariant and the oracle checked after
//! every step.
//!
//! ```text
//!  seed ─▶ schedule: ingest · micro-batch · clock · archive · batch cycle ·
//!                    crash (drop + reopen) · faults (log lost, views lost,
//!                    last frame damaged, a failed roll's leftover)
//!  after each step:  snapshot.check()  and  answer == view over the acked
//!                    events below the answer's offsets R[p]
//!  at the end:       settle: everything consumed, archived, published
//! ```
//!
//! Runs `LAMBDAFLOW_SIM_SCHEDULES` schedules (default 1,000; the views are
//! compiled once per thread, so a schedule costs what its steps read and
//! write) from a random base seed; a failure names its seed, and `LAMBDAFLOW_SIM_SEED=<seed>`
//! replays exactly that schedule.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::clock::{Clock, ManualClock};
use crate::cluster::driver;
use crate::config::{Config, ViewConfig};
use crate::master::archiver;
use crate::node::{Assembled, assemble_over, open_batch_with};
use crate::view::View;
use crate::view::oracle::{Cell, rows};

/// splitmix64: small, seedable, good enough to pick steps.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const BASE_MS: i64 = 1_414_800_000_000;
const PRODUCTS: i64 = 3;

/// One event the simulation sent: its fields, and its stream time (the
/// manual clock when it was appended).
#[derive(Debug, Clone, Copy)]
struct Event {
    zip: i64,
    product: i64,
    price: i64,
    ts: i64,
    at: i64,
}

/// The horizon of a keyed schedule's `zipcode` key: short, so that the
/// clock steps pass it now and then.
const KEY_WITHIN_MS: i64 = 3_000;

/// The events of `acked` below `r` (per partition) that are not duplicates:
/// the rule of `crate::keys`, read naively — in each partition, in offset
/// order, an event whose zipcode an earlier one had within the horizon of
/// the partition's clock is left out.
fn first_occurrences(acked: &BTreeMap<(u32, u64), Event>, r: &[u64]) -> Vec<Event> {
    let mut out = Vec::new();
    let mut seen: BTreeMap<(u32, i64), i64> = BTreeMap::new();
    let mut clock: BTreeMap<u32, i64> = BTreeMap::new();
    for (&(p, o), e) in acked {
        if o >= r[p as usize] {
            continue;
        }
        let c = clock.entry(p).or_insert(i64::MIN);
        *c = (*c).max(e.at);
        let dup = seen
            .get(&(p, e.zip))
            .is_some_and(|&last| last >= *c - KEY_WITHIN_MS);
        seen.insert((p, e.zip), *c);
        if !dup {
            out.push(*e);
        }
    }
    out
}

fn views() -> Vec<ViewConfig> {
    let v = |name: &str, sql: &str| ViewConfig {
        name: name.into(),
        sql: sql.into(),
        rollup: Vec::new(),
    };
    vec![
        v(
            "by_product",
            "SELECT ProductName, count(*) AS n, sum(price) AS s FROM events GROUP BY ProductName",
        ),
        // Fails on price = 0: those events are left out of this view only.
        v(
            "inverse",
            "SELECT ProductName, sum(100 / price) AS inv FROM events GROUP BY ProductName",
        ),
        // Timestamps repeat: only (partition, offset) orders the ties.
        v(
            "first_last",
            "SELECT ProductName, first_value(zipcode ORDER BY timestamp) AS f, last_value(zipcode ORDER BY timestamp) AS l FROM events GROUP BY ProductName",
        ),
    ]
}

/// What each view must answer over `events`, in (partition, offset) order:
/// per view, product → its cells as text.
fn expected(events: &[Event]) -> Vec<BTreeMap<String, Vec<String>>> {
    let mut by = BTreeMap::new();
    let mut inv = BTreeMap::new();
    // Per product: (timestamp, zipcode) of the first and of the last event.
    type FirstLast = ((i64, i64), (i64, i64));
    let mut fl: BTreeMap<String, FirstLast> = BTreeMap::new();
    for e in events {
        let p = format!("product{}", e.product);
        let x = by.entry(p.clone()).or_insert((0i64, 0i64));
        x.0 += 1;
        x.1 += e.price;
        if e.price != 0 {
            *inv.entry(p.clone()).or_insert(0i64) += 100 / e.price;
        }
        // Strict comparisons: among equal timestamps the earliest (p, o) is
        // first and the latest is last.
        fl.entry(p)
            .and_modify(|(f, l)| {
                if e.ts < f.0 {
                    *f = (e.ts, e.zip);
                }
                if e.ts >= l.0 {
                    *l = (e.ts, e.zip);
                }
            })
            .or_insert(((e.ts, e.zip), (e.ts, e.zip)));
    }
    vec![
        by.into_iter()
            .map(|(k, (n, s))| (k, vec![n.to_string(), s.to_string()]))
            .collect(),
        inv.into_iter()
            .map(|(k, v)| (k, vec![v.to_string()]))
            .collect(),
        fl.into_iter()
            .map(|(k, (f, l))| (k, vec![f.1.to_string(), l.1.to_string()]))
            .collect(),
    ]
}

struct World {
    _dir: tempfile::TempDir,
    config: Config,
    /// Compiled once per thread: a pure function of the config.
    views: Vec<Arc<View>>,
    clock: Arc<ManualClock>,
    node: Option<Assembled>,
    /// Acknowledged events by (partition, offset).
    acked: BTreeMap<(u32, u64), Event>,
    next: i64,
    /// `[schema] key = zipcode`: producers send some zipcodes again.
    keyed: bool,
    rng: Rng,
    trail: Vec<String>,
    checked_version: Option<(usize, u64)>,
    opens: usize,
}

impl World {
    async fn new(seed: u64, compiled: Vec<Arc<View>>) -> World {
        // In memory where there is a tmpfs: the simulation checks the order
        // of the layers' steps, not the disk, and fsyncs there cost nothing.
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .expect("a temporary directory");
        let mut config = Config {
            data: dir.path().join("data"),
            views: self::views(),
            ..Config::default()
        };
        config.stream.partitions = 2;
        // Tiny segments (below what a config file may set): rolls and retention
        // happen every few steps.
        config.stream.segment_bytes = bytesize::ByteSize::b(512);
        config.archive.chunk_events = 20;
        config.archive.chunk_age = Duration::from_secs(1);
        // Half the schedules find duplicates by an event key.
        let keyed = seed % 2 == 1;
        if keyed {
            config.schema.key = Some(crate::config::EventKeyConfig {
                field: "zipcode".into(),
                within: Duration::from_millis(KEY_WITHIN_MS as u64),
            });
        }
        let clock = ManualClock::new(BASE_MS + 86_400_000);
        let mut w = World {
            _dir: dir,
            config,
            clock,
            views: compiled,
            node: None,
            acked: BTreeMap::new(),
            next: 0,
            keyed,
            rng: Rng(seed),
            trail: Vec::new(),
            checked_version: None,
            opens: 0,
        };
        w.open().await;
        w
    }

    fn node(&mut self) -> &mut Assembled {
        self.node.as_mut().expect("an open node")
    }

    async fn open(&mut self) {
        self.node = None; // drop first: the log's lock is released
        let batch = open_batch_with(&self.config, self.views.clone())
            .await
            .unwrap_or_else(|e| panic!("the batch layer must open: {e}"));
        let n = assemble_over(self.config.clone(), self.clock.clone(), batch)
            .await
            .unwrap_or_else(|e| panic!("the node must open: {e}"));
        self.node = Some(n);
        self.opens += 1;
        self.checked_version = None;
    }

    async fn ingest(&mut self) {
        let n = 1 + self.rng.below(30) as i64;
        let mut body = String::new();
        let mut sent = Vec::new();
        for _ in 0..n {
            let k = self.next;
            self.next += 1;
            // Keyed: a third of the events reuse an earlier zipcode (a
            // duplicate, or a key seen again past the horizon).
            let zip = if self.keyed && self.rng.below(3) == 0 {
                10_000 + self.rng.below(k as u64 + 1) as i64
            } else {
                10_000 + k
            };
            let e = Event {
                zip,
                product: k % PRODUCTS,
                price: (k * 7) % 11, // 0 now and then
                ts: BASE_MS + (k / 4) * 1000,
                at: self.clock.unix_ms(),
            };
            let ts = chrono::DateTime::from_timestamp_millis(e.ts)
                .expect("a time")
                .format("%Y-%m-%d %H:%M:%S%.3f");
            body.push_str(&format!(
                "{{\"zipcode\":{},\"ProductName\":\"product{}\",\"price\":{},\"timestamp\":\"{ts}\"}}\n",
                e.zip, e.product, e.price
            ));
            sent.push(e);
        }
        // Keyed, events go to their key's partition: one request each, so
        // each reply names its one event's place.
        let requests: Vec<(String, Vec<Event>)> = if self.keyed {
            body.lines()
                .zip(sent)
                .map(|(l, e)| (format!("{l}\n"), vec![e]))
                .collect()
        } else {
            vec![(body, sent)]
        };
        for (body, sent) in requests {
            let report = self
                .node()
                .ingest
                .ingest(Bytes::from(body))
                .await
                .unwrap_or_else(|f| panic!("ingest failed: {}", f.error));
            let mut it = sent.into_iter();
            for r in report.offsets {
                for o in r.first..=r.last {
                    let e = it.next().expect("one event per offset");
                    if let Some(old) = self.acked.insert((r.partition, o), e) {
                        panic!(
                            "offset {o} of partition {} was given twice: to zipcode {} and now to {}",
                            r.partition, old.zip, e.zip
                        );
                    }
                }
            }
        }
    }

    async fn archive(&mut self, max: usize) {
        let node = self.node();
        let duplicates = node.speed.dedup.as_ref().map(|d| d.duplicates.clone());
        for _ in 0..max {
            let Ok(c) = node.archive.try_recv() else {
                return;
            };
            archiver::archive_chunk(
                node.batch.master(),
                node.log.as_ref(),
                c,
                duplicates.as_deref(),
            )
            .await
            .unwrap_or_else(|e| panic!("archiving {c:?} failed: {e}"));
        }
    }

    async fn cycle(&mut self) {
        let node = self.node();
        driver::cycle(
            &node.batch,
            node.source.as_ref(),
            &node.serving,
            &node.config.local_dir(),
            &node.status,
            &node.health,
        )
        .await
        .unwrap_or_else(|e| panic!("a batch cycle failed: {e}"));
    }

    fn archived(&mut self) -> Vec<u64> {
        self.node().batch.master().coverage().h.into_ends()
    }

    /// Events lost with a log that is gone: the acknowledged events the master
    /// dataset does not hold.
    fn forget_unarchived(&mut self) {
        let h = self.archived();
        self.acked.retain(|&(p, o), _| o < h[p as usize]);
    }

    async fn fault(&mut self) {
        let data = self.config.data.clone();
        match self.rng.below(4) {
            0 => {
                self.trail
                    .push("fault: the log directory is deleted".into());
                self.forget_unarchived();
                self.node = None;
                std::fs::remove_dir_all(data.join("log")).expect("remove the log");
                self.open().await;
            }
            1 => {
                self.trail
                    .push("fault: the views directory is deleted".into());
                self.node = None;
                let _ = std::fs::remove_dir_all(data.join("views"));
                self.open().await;
            }
            2 => {
                // Only a partition wholly archived: its events are safe in the
                // master dataset, and the damage must not cost an offset.
                let p = self.rng.below(2) as u32;
                let (end, start) = {
                    let log = &self.node().log;
                    (
                        log.end_offset(p).expect("p"),
                        log.start_offset(p).expect("p"),
                    )
                };
                if self.archived()[p as usize] != end || end == start {
                    return;
                }
                self.node = None;
                let dir = data.join(format!("log/p{p}"));
                let active = std::fs::read_dir(&dir)
                    .expect("p dir")
                    .filter_map(|e| e.ok()?.path().to_str().map(str::to_string))
                    .filter(|n| n.ends_with(".log"))
                    .max()
                    .expect("a segment");
                let mut bytes = std::fs::read(&active).expect("segment");
                if bytes.is_empty() {
                    self.open().await;
                    return;
                }
                let mut pos = 0usize;
                let mut last = 0usize;
                while pos + 8 <= bytes.len() {
                    last = pos;
                    let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().expect("4"));
                    pos += 8 + len as usize;
                }
                let at = last + (pos.min(bytes.len()) - last) / 2;
                bytes[at] ^= 0x55;
                std::fs::write(&active, bytes).expect("write segment");
                self.trail
                    .push(format!("fault: a byte of p{p}'s last frame is flipped"));
                self.open().await;
            }
            _ => {
                // What a roll that failed after creating its file leaves: the
                // next segment, empty, where the full active one ends.
                let p = self.rng.below(2) as u32;
                let end = self.node().log.end_offset(p).expect("p");
                let dir = data.join(format!("log/p{p}"));
                let active_len = std::fs::read_dir(&dir)
                    .expect("p dir")
                    .filter_map(|e| e.ok()?.path().to_str().map(str::to_string))
                    .filter(|n| n.ends_with(".log"))
                    .max()
                    .and_then(|a| std::fs::metadata(a).ok())
                    .map_or(0, |m| m.len());
                let path = dir.join(format!("{end:020}.log"));
                if active_len >= self.config.stream.segment_bytes.as_u64() && !path.exists() {
                    std::fs::File::create(&path).expect("create");
                    self.trail
                        .push(format!("fault: an empty segment {end} is left in p{p}"));
                }
            }
        }
    }

    /// The invariant and the oracle, over the current snapshot.
    async fn check(&mut self) {
        let opens = self.opens;
        let node = self.node.as_ref().expect("an open node");
        let snap = node.serving.snapshot();
        if self.checked_version == Some((opens, snap.version)) {
            return;
        }
        snap.check()
            .unwrap_or_else(|e| panic!("the handoff invariant broke: {e}"));
        let below: Vec<Event> = if self.keyed {
            first_occurrences(&self.acked, &snap.realtime_end)
        } else {
            self.acked
                .iter()
                .filter(|((p, o), _)| *o < snap.realtime_end[*p as usize])
                .map(|(_, e)| *e)
                .collect()
        };
        let want = expected(&below);
        for (i, want) in want.iter().enumerate() {
            let answer = node
                .serving
                .compute(i, &snap)
                .await
                .unwrap_or_else(|e| panic!("view {i} does not answer: {e}"));
            let got: BTreeMap<String, Vec<String>> = rows(&answer.rows)
                .into_iter()
                .map(|r| {
                    let text = |c: &Cell| match c {
                        Cell::Text(t) => t.clone(),
                        c => format!("{c:?}"),
                    };
                    (text(&r[0]), r[1..].iter().map(text).collect())
                })
                .collect();
            assert_eq!(
                &got,
                want,
                "view `{}` over R = {:?} (H = {:?}) differs from the view over the acknowledged events below R",
                node.serving.views()[i].name(),
                snap.realtime_end,
                snap.h()
            );
        }
        self.checked_version = Some((opens, snap.version));
    }

    /// Liveness: with time and the loops' work, everything acknowledged is
    /// consumed, archived and published.
    async fn settle(&mut self) {
        // Twice: a cycle's retention and a chunk closed by age can each leave
        // one more step for the other.
        for _ in 0..2 {
            while self.node().speed.round().await.expect("a round") {}
            self.clock.advance(Duration::from_secs(2));
            self.node().speed.round().await.expect("a round");
            self.archive(usize::MAX).await;
            self.cycle().await;
        }
        self.check().await;
        let node = self.node();
        let snap = node.serving.snapshot();
        for p in 0..2u32 {
            let end = node.log.end_offset(p).expect("p");
            assert_eq!(
                (snap.realtime_end[p as usize], snap.h().get(p)),
                (end, end),
                "partition {p} must be consumed and published to its end {end}; health: {:?}",
                node.health.report_all()
            );
        }
        // Every offset below H holds exactly one acknowledged event (the
        // offsets of events lost with a deleted log, never archived, are
        // given to new events: nothing else holds them).
        assert_eq!(
            snap.h().total() as usize,
            self.acked.len(),
            "the published coverage counts every acknowledged event once"
        );
    }
}

/// The simulation's views, compiled.
async fn compiled() -> Vec<Arc<View>> {
    let schema = Config::default()
        .event_schema()
        .expect("the default schema");
    crate::view::compile_all(&views(), &schema)
        .await
        .expect("the simulation's views compile")
}

async fn schedule(seed: u64, steps: usize, views: Vec<Arc<View>>) {
    let mut w = World::new(seed, views).await;
    let outcome = {
        let w = &mut w;
        std::panic::AssertUnwindSafe(async move {
            for _ in 0..steps {
                let roll = w.rng.below(100);
                match roll {
                    0..30 => {
                        w.trail.push("ingest".into());
                        w.ingest().await
                    }
                    30..55 => {
                        w.trail.push("micro-batch".into());
                        w.node().speed.round().await.expect("a round");
                    }
                    55..63 => {
                        let ms = w.rng.below(1500);
                        w.trail.push(format!("clock +{ms} ms"));
                        w.clock.advance(Duration::from_millis(ms));
                    }
                    63..78 => {
                        let n = 1 + w.rng.below(3) as usize;
                        w.trail.push(format!("archive {n}"));
                        w.archive(n).await
                    }
                    78..88 => {
                        w.trail.push("batch cycle".into());
                        w.cycle().await
                    }
                    88..95 => {
                        w.trail.push("crash and reopen".into());
                        w.open().await
                    }
                    _ => w.fault().await,
                }
                w.check().await;
            }
            w.trail.push("settle".into());
            w.settle().await;
        })
    };
    if let Err(e) = futures::FutureExt::catch_unwind(outcome).await {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!(
            "simulation seed {seed} failed (replay: LAMBDAFLOW_SIM_SEED={seed}): {msg}\nsteps: {}",
            w.trail.join(" → ")
        );
    }
}

const STEPS: usize = 30;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

#[test]
fn seeded_schedules_keep_the_handoff_exact_and_lose_nothing() {
    if let Some(seed) = std::env::var("LAMBDAFLOW_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        let rt = runtime();
        rt.block_on(async { schedule(seed, STEPS, compiled().await).await });
        return;
    }
    let n: u64 = std::env::var("LAMBDAFLOW_SIM_SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000);
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let t = std::time::Instant::now();
    // Schedules are independent: one thread per core, each its own runtime.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let workers: Vec<_> = (0..threads)
        .map(|k| {
            std::thread::spawn(move || {
                let rt = runtime();
                let views = rt.block_on(compiled());
                for i in (k..n).step_by(threads as usize) {
                    rt.block_on(schedule(base.wrapping_add(i), STEPS, views.clone()));
                }
            })
        })
        .collect();
    let mut failed = None;
    for w in workers {
        if let Err(e) = w.join() {
            failed.get_or_insert(e);
        }
    }
    if let Some(e) = failed {
        std::panic::resume_unwind(e);
    }
    eprintln!(
        "simulation: {n} schedules of {STEPS} steps from seed {base} in {:.1} s",
        t.elapsed().as_secs_f64()
    );
}
