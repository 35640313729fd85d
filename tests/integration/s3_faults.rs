//! S3 as the service behaves, not as moto does: every test here goes
//! through the fault proxy (`common::s3_proxy`) in front of moto, which
//! answers `503 SlowDown` and `500 InternalError`, loses the answer of a
//! request it did (a 500 after the write, a closed connection, no answer at
//! all), and resets an upload half way.
//!
//! ```text
//!  storage   create / replace whose answer was lost: the writer knows it wrote
//!  lease     a renewal whose answer was lost keeps the lease; one that hangs
//!            steps the holder down before its record expires
//!  node      each fault on each writer (Delta commits, run manifests,
//!            CURRENT, the lease): nothing lost or doubled, every run kept
//!            whole; faults that last show in `health` and clear
//!  seeded    faults at random (LAMBDAFLOW_S3_FAULT_SEED) while a producer
//!            sends and readers query: every answer exact
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lambdaflow::cluster::lease::Lease;
use lambdaflow::storage::{Storage, Swap};
use serde_json::Value;

use crate::common::s3_proxy::{Fault, Matcher, S3Proxy};
use crate::common::{self, Site};
use crate::oracle::{self, Sent, make, ndjson};
use crate::s3::Moto;

/// The faults that do the request and lose its answer.
const LOST_ANSWERS: [Fault; 3] = [
    Fault::InternalErrorAfterWrite,
    Fault::WrittenThenDropped,
    Fault::WrittenThenHung,
];

/// moto, a bucket, the proxy in front, a client through the proxy (hung
/// requests cost it `timeout`) and one straight to moto.
fn setup(bucket: &str, timeout: &str) -> (Moto, S3Proxy, String, Storage, Storage) {
    let moto = Moto::start();
    let root = moto.bucket(bucket);
    let proxy = S3Proxy::start(&moto.endpoint);
    let through = proxy.storage(&root, timeout);
    let direct = moto.storage(&root);
    (moto, proxy, root, through, direct)
}

/// A create whose write landed but whose answer was lost (a 500 after the
/// write, the connection closed, no answer): the client's retry is refused
/// with 412, yet this writer wrote the object, and `create` must say so —
/// or a batch run discards the files its own manifest names. Faults that do
/// nothing (503, 500, a reset upload) are retried by the client. A create
/// another writer made first is still refused.
#[test]
fn a_create_whose_answer_was_lost_is_known_as_this_writers() {
    let (_moto, proxy, _root, through, direct) = setup("create", "1s");
    common::rt().block_on(async {
        for (i, fault) in Fault::ALL.into_iter().enumerate() {
            let rel = format!("claims/{i}.json");
            let mine = Bytes::from(format!("{{\"writer\":\"me\",\"fault\":\"{fault:?}\"}}"));
            proxy.inject(Matcher::new("PUT", &rel), fault, 1);
            let created = through.create(&rel, mine.clone()).await;
            assert_eq!(proxy.pending(), 0, "the proxy did {fault:?} to the create");
            assert!(
                matches!(created, Ok(true)),
                "{fault:?}: the object holds this writer's bytes, so its create succeeded; got {created:?}"
            );
            assert_eq!(direct.get(&rel).await.unwrap(), Some(mine));
            let theirs = Bytes::from_static(b"{\"writer\":\"another\"}");
            assert!(
                !through.create(&rel, theirs).await.unwrap(),
                "{fault:?}: a second writer's create of other bytes is refused"
            );
        }
    });
}

/// A compare-and-swap (If-Match) whose write landed but whose answer was
/// lost is done, not lost: its retry's 412 is against its own write. One
/// that another writer beat is still lost.
#[test]
fn a_replace_whose_answer_was_lost_is_known_as_done() {
    let (_moto, proxy, _root, through, direct) = setup("replace", "1s");
    common::rt().block_on(async {
        let rel = "pointer";
        through
            .create(rel, Bytes::from_static(b"v0"))
            .await
            .unwrap();
        for (i, fault) in Fault::ALL.into_iter().enumerate() {
            let (_, seen) = through.get_versioned(rel).await.unwrap();
            let mine = Bytes::from(format!("v{} after {fault:?}", i + 1));
            proxy.inject(Matcher::new("PUT", rel), fault, 1);
            let swapped = through.replace(rel, mine.clone(), &seen).await;
            assert_eq!(proxy.pending(), 0, "the proxy did {fault:?} to the replace");
            assert!(
                matches!(swapped, Ok(Swap::Done)),
                "{fault:?}: the pointer holds this writer's bytes, so its swap is done; got {swapped:?}"
            );
            assert_eq!(direct.get(rel).await.unwrap(), Some(mine));
            assert_eq!(
                through
                    .replace(rel, Bytes::from_static(b"stale"), &seen)
                    .await
                    .unwrap(),
                Swap::Lost,
                "{fault:?}: a swap from the version before is lost"
            );
        }
    });
}

/// The driver renews its lease and the answer is lost (the write landed):
/// the node still holds the lease — it must not step down because its own
/// renewal's retry was refused.
#[test]
fn a_lease_renewal_whose_answer_was_lost_keeps_the_lease() {
    let (_moto, proxy, _root, through, _direct) = setup("lease", "1s");
    common::rt().block_on(async {
        let lease = Lease::shared(
            through,
            "node".into(),
            Duration::from_secs(10),
            lambdaflow::clock::SystemClock::shared(),
        );
        for fault in LOST_ANSWERS {
            proxy.inject(Matcher::new("PUT", "driver/lease.json"), fault, 1);
            let held = lease.try_acquire().await;
            assert_eq!(
                proxy.pending(),
                0,
                "the proxy did {fault:?} to the lease write"
            );
            assert!(
                matches!(held, Ok(true)) && lease.is_held(),
                "{fault:?}: the lease record names this node, so it holds the lease; got {held:?}"
            );
        }
    });
}

/// The store stops answering the holder's renewals (requests hang, the
/// client's timeout is 30 s, the default): the holder must stop acting
/// before its lease record expires, when another node may take it.
#[test]
fn a_lease_renewal_that_hangs_steps_the_holder_down_before_its_record_expires() {
    let (_moto, proxy, _root, through, direct) = setup("hang", "30s");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ttl = Duration::from_secs(3);
        let lease = Lease::shared(
            through,
            "node".into(),
            ttl,
            lambdaflow::clock::SystemClock::shared(),
        );
        let health = Arc::new(lambdaflow::health::Health::default());
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let running = tokio::spawn(lease.clone().run(health.clone(), stop));
        let t = Instant::now();
        while !lease.is_held() {
            assert!(t.elapsed() < Duration::from_secs(20), "the lease is taken");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // From now on no request gets an answer.
        proxy.inject(Matcher::any(), Fault::WrittenThenHung, 1_000);
        // The record as last written, read past the proxy: when it expires.
        let expires_ms = |bytes: Bytes| -> i64 {
            serde_json::from_slice::<Value>(&bytes).unwrap()["expires_ms"]
                .as_i64()
                .unwrap()
        };
        let mut expiry = expires_ms(direct.get("driver/lease.json").await.unwrap().unwrap());
        let t = Instant::now();
        loop {
            // A renewal that landed before its answer was lost moves the expiry.
            let now_ms = chrono::Utc::now().timestamp_millis();
            let latest = expires_ms(direct.get("driver/lease.json").await.unwrap().unwrap());
            if latest > expiry {
                expiry = latest;
            } else if now_ms > expiry {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the lease record expires"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            !lease.is_held(),
            "the lease record expired at {expiry} ms and another node may take it: a holder whose renewals hang must have stepped down by then"
        );
        let problems = health.report_all().problems;
        assert!(
            problems.iter().any(|p| p.component == "lease"),
            "health says the lease cannot be renewed: {problems:?}"
        );
        proxy.heal();
        stop_tx.send(true).unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(60), running).await;
    });
}

/// Every run manifest kept under `views/runs/` names files that exist: a
/// kept run answers (`?as_of=`) for the events below its H.
fn assert_runs_whole(storage: &Storage) {
    common::rt().block_on(async {
        let files = storage.list_files("views/runs").await.unwrap();
        assert!(!files.is_empty(), "runs were published");
        for f in files {
            let bytes = storage
                .get(&format!("views/runs/{f}"))
                .await
                .unwrap()
                .unwrap();
            let m: Value = serde_json::from_slice(&bytes).unwrap();
            for (view, e) in m["views"].as_object().unwrap() {
                for part in ["states", "tsv"] {
                    // A view past `[batch] tsv_max_rows` has no TSV.
                    let Some(path) = e[part]["path"].as_str() else {
                        assert_eq!(part, "tsv", "run manifest {f}: view {view} names its states");
                        continue;
                    };
                    assert!(
                        storage.get(path).await.unwrap().is_some(),
                        "run manifest {f} names {path} (view {view}), which is gone: a kept run must stay readable"
                    );
                }
            }
        }
    });
}

/// The config of a node whose lease is renewed every second.
fn config() -> String {
    format!("{}lease = \"3s\"\n", oracle::CONFIG)
}

/// POSTs `events`, sending them again (up to 50 times, 200 ms apart) while
/// the node refuses them for the driver lease: acknowledging needs the
/// lease's marks to cover the events (fencing), a lease write that fails
/// refuses the request whole and stores nothing.
fn post_through_lease_refusals(url: &str, events: &[Sent]) -> (u16, Value) {
    let mut tries = 0;
    loop {
        let (status, reply) = common::post_events(url, ndjson(events)).expect("server up");
        if status == 503 && reply.to_string().contains("lease") && tries < 50 {
            tries += 1;
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        return (status, reply);
    }
}

/// Sends `requests` requests of 50 events from `k` on; all must be acknowledged.
fn send(url: &str, k: &mut i64, requests: usize, known: &mut BTreeMap<(u32, u64), Sent>) {
    for _ in 0..requests {
        let events: Vec<Sent> = (0..50).map(|i| make(*k + i)).collect();
        *k += 50;
        let (status, reply) = post_through_lease_refusals(url, &events);
        assert_eq!(
            status, 200,
            "ingest depends on S3 only for the driver lease's marks: {reply}"
        );
        let r = &reply["offsets"][0];
        let (p, first) = (
            r["partition"].as_u64().unwrap() as u32,
            r["first"].as_u64().unwrap(),
        );
        for (i, e) in events.into_iter().enumerate() {
            known.insert((p, first + i as u64), e);
        }
    }
}

/// Sends one request of 50 events: acknowledged, or refused with 503
/// because this node's driver lease is not valid (nothing stored).
fn send_fenced(url: &str, k: &mut i64, known: &mut BTreeMap<(u32, u64), Sent>) {
    let events: Vec<Sent> = (0..50).map(|i| make(*k + i)).collect();
    *k += 50;
    let (status, reply) = common::post_events(url, ndjson(&events)).expect("server up");
    if status == 503 {
        assert!(
            reply.to_string().contains("lease"),
            "a refusal while the lease cannot be renewed says so: {reply}"
        );
        return;
    }
    assert_eq!(
        status, 200,
        "acknowledged or refused for the lease: {reply}"
    );
    let r = &reply["offsets"][0];
    let (p, first) = (
        r["partition"].as_u64().unwrap() as u32,
        r["first"].as_u64().unwrap(),
    );
    for (i, e) in events.into_iter().enumerate() {
        known.insert((p, first + i as u64), e);
    }
}

/// A node whose root is on moto through the proxy; the site's own storage
/// goes straight to moto (for the checks).
fn site_through(moto: &Moto, proxy: &S3Proxy, root: &str, config: &str) -> Site {
    Site::remote(root, moto.storage(root), proxy.env(moto.env()), config)
}

/// Each fault, once, on each request that writes S3 — a Delta commit
/// (`_delta_log/N.json`, If-None-Match), a run manifest (`views/runs/`,
/// If-None-Match), `views/CURRENT` (If-Match) and the driver lease (If-Match)
/// — while events arrive: the layers go on; in the end every acknowledged
/// event is in the Delta table once, every answer is exact, and every kept
/// run names files that exist.
#[test]
fn each_s3_fault_on_each_writer_loses_nothing_doubles_nothing() {
    let moto = Moto::start();
    let root = moto.bucket("each");
    let proxy = S3Proxy::start(&moto.endpoint);
    let site = site_through(&moto, &proxy, &root, &config());
    let server = site.serve(&[]);
    let (mut known, mut k) = (BTreeMap::new(), 0i64);
    send(&server.url, &mut k, 4, &mut known);
    server.wait_settled(Duration::from_secs(60));
    for writes in [
        "_delta_log/",
        "views/runs/",
        "views/CURRENT",
        "driver/lease.json",
    ] {
        for fault in Fault::ALL {
            proxy.inject(Matcher::new("PUT", writes), fault, 1);
            let t = Instant::now();
            while proxy.pending() > 0 {
                send(&server.url, &mut k, 1, &mut known);
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "a PUT of {writes} came within 60 s (to get {fault:?})"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            send(&server.url, &mut k, 1, &mut known);
            server.wait_settled(Duration::from_secs(60));
        }
    }
    eprintln!("faults done: {:?}", proxy.tally());
    let storage = site.storage.as_ref().unwrap();
    oracle::verify_positions(&oracle::settled_answers(&server.url), &known, true);
    let s = server.status();
    assert!(
        s["health"]["problems"]
            .as_array()
            .is_none_or(|a| a.is_empty()),
        "no problem is left once the faults stop: {}",
        s["health"]
    );
    server.stop();
    oracle::assert_rows_are(&common::master_events_in(storage, 2).0, &known);
    assert_runs_whole(storage);
}

/// S3 refusing one writer's requests for a while (503 SlowDown on every
/// PUT of it): `health` names the failing layer while it lasts, reads go
/// on, ingest too (but for the lease: an embedded-log node acknowledges
/// only under a valid lease, and answers 503 saying so), and once S3 answers again the problem clears and nothing is
/// lost or doubled.
#[test]
fn lasting_s3_faults_show_in_health_and_clear() {
    let moto = Moto::start();
    let root = moto.bucket("lasting");
    let proxy = S3Proxy::start(&moto.endpoint);
    let site = site_through(&moto, &proxy, &root, &config());
    let server = site.serve(&[]);
    let (mut known, mut k) = (BTreeMap::new(), 0i64);
    send(&server.url, &mut k, 4, &mut known);
    server.wait_settled(Duration::from_secs(60));
    for (writes, component) in [
        ("master/", "archive"),
        ("views/", "batch"),
        ("driver/lease.json", "lease"),
    ] {
        proxy.inject(Matcher::new("PUT", writes), Fault::SlowDown, 1_000_000);
        let t = Instant::now();
        let problem = loop {
            if component == "lease" {
                // An embedded-log node acknowledges only under a valid
                // lease (see `fencing`): once it cannot renew, 503 with why.
                send_fenced(&server.url, &mut k, &mut known);
            } else {
                send(&server.url, &mut k, 1, &mut known);
            }
            assert!(
                oracle::query(&server.url, "sales_by_product").is_some(),
                "reads go on while S3 refuses {writes}"
            );
            let s = server.status();
            if let Some(p) = s["health"]["problems"]
                .as_array()
                .and_then(|a| a.iter().find(|p| p["component"] == component))
            {
                break p.clone();
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "while every PUT of {writes} gets 503 SlowDown, health names `{component}` within 60 s: {}",
                s["health"]
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        // The lease's renewal is bounded by a third of the lease, shorter
        // than the client's own retries of a 503: it says so instead.
        let error = problem["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("503") || error.contains("SlowDown") || error.contains("keeps failing"),
            "the `{component}` problem says what S3 answered: {problem}"
        );
        eprintln!("{writes}: {problem}");
        proxy.heal();
        let t = Instant::now();
        loop {
            let s = server.status();
            let settled = s["partitions"]
                .as_array()
                .unwrap()
                .iter()
                .all(|p| p["archived"] == p["end"] && p["published"] == p["end"]);
            let clear = s["health"]["problems"]
                .as_array()
                .is_none_or(|a| a.is_empty());
            if settled && clear {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(90),
                "once S3 answers {writes} again, everything is archived and published and the problem clears: {s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let storage = site.storage.as_ref().unwrap();
    oracle::verify_positions(&oracle::settled_answers(&server.url), &known, true);
    server.stop();
    oracle::assert_rows_are(&common::master_events_in(storage, 2).0, &known);
    assert_runs_whole(storage);
}

/// Prints the seed if the test fails (panics) while it lives.
struct SeedOnFailure(u64);

impl Drop for SeedOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "the S3 fault run failed with seed {}: LAMBDAFLOW_S3_FAULT_SEED={} replays its faults",
                self.0, self.0
            );
        }
    }
}

/// The oracle test with S3 misbehaving at random: one request in 12 to S3
/// gets a fault drawn from the whole menu (seeded), while three producers
/// send for about 30 s over HTTP to an embedded-log node on `s3://…` and readers query
/// every view. Every answer equals the view SQL over the events below its
/// offsets; runs keep publishing; once the faults stop everything settles,
/// the Delta table holds every acknowledged event once, every kept run is
/// whole, and `health` is clear.
#[test]
fn a_seeded_run_with_random_s3_faults_is_exact() {
    // About 30 s of sending: a batch run under faults takes seconds.
    const ROUNDS: i64 = 150;
    let seed = common::fault_seed("LAMBDAFLOW_S3_FAULT_SEED");
    let _report = SeedOnFailure(seed);
    let moto = Moto::start();
    let root = moto.bucket("seeded");
    let proxy = S3Proxy::start(&moto.endpoint);
    let site = site_through(&moto, &proxy, &root, &config());
    let server = site.serve(&[]);
    proxy.random(seed, Matcher::any(), 80, &Fault::ALL);
    let url = server.url.clone();
    let known: Arc<Mutex<BTreeMap<(u32, u64), Sent>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..3i64)
        .map(|t| {
            let (url, known) = (url.clone(), known.clone());
            std::thread::spawn(move || {
                for r in 0..ROUNDS {
                    let events: Vec<Sent> = (0..50).map(|i| make((r * 3 + t) * 50 + i)).collect();
                    let (status, reply) = post_through_lease_refusals(&url, &events);
                    assert_eq!(
                        status, 200,
                        "ingest depends on S3 only for the driver lease's marks: {reply}"
                    );
                    let range = &reply["offsets"][0];
                    let (p, first) = (
                        range["partition"].as_u64().unwrap() as u32,
                        range["first"].as_u64().unwrap(),
                    );
                    let mut k = known.lock().unwrap();
                    for (i, e) in events.into_iter().enumerate() {
                        k.insert((p, first + i as u64), e);
                    }
                    drop(k);
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        })
        .collect();
    let answers: Arc<Mutex<Vec<oracle::Got>>> = Arc::default();
    let readers = oracle::view_readers(&url, &answers, &done);
    for p in producers {
        p.join().unwrap();
    }
    // Faults on while the backlog is archived and published, then off.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let tally = proxy.tally();
    proxy.heal();
    let settled = server.wait_settled(Duration::from_secs(120));
    for view in ["sales_by_product", "sales_by_zipcode", "sales_per_minute"] {
        answers
            .lock()
            .unwrap()
            .push(oracle::query(&url, view).unwrap());
    }
    done.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    eprintln!(
        "seed {seed}: faults {tally:?}, {} requests passed",
        proxy.passed()
    );
    let injected: usize = tally.values().sum();
    assert!(
        injected >= 20,
        "seed {seed}: the run injected only {injected} faults ({tally:?})"
    );
    let answers = answers.lock().unwrap().clone();
    let runs: std::collections::BTreeSet<u64> = answers.iter().filter_map(|a| a.run).collect();
    assert!(
        runs.len() >= 3,
        "seed {seed}: batch runs kept publishing under faults, answers saw runs {runs:?} (settled: {})",
        settled["batch"]
    );
    let known = known.lock().unwrap().clone();
    assert_eq!(
        known.len(),
        3 * ROUNDS as usize * 50,
        "every request was acknowledged"
    );
    let checked = oracle::verify_positions(&answers, &known, true);
    assert!(checked > 50, "only {checked} distinct answers were checked");
    let t = Instant::now();
    loop {
        let s = server.status();
        if s["health"]["problems"]
            .as_array()
            .is_none_or(|a| a.is_empty())
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "seed {seed}: the problems clear once the faults stop: {}",
            s["health"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    server.stop();
    let storage = site.storage.as_ref().unwrap();
    oracle::assert_rows_are(&common::master_events_in(storage, 2).0, &known);
    assert_runs_whole(storage);
    eprintln!("seed {seed}: {checked} distinct answers exact over runs {runs:?}");
}

/// A publish whose `CURRENT` write landed but whose answer was lost, and
/// whose read-backs failed too (S3 partitioned from the node right after
/// the write): the run is published — `CURRENT` names it — and the driver
/// must know it (serve it, report no failure), not log that "the previous
/// run stays published" and go on serving the older one. Later publishes
/// that really fail leave it published and say so.
#[test]
fn a_publish_whose_answer_was_lost_is_read_back_before_it_is_reported() {
    let moto = Moto::start();
    let root = moto.bucket("lostpublish");
    let proxy = S3Proxy::start(&moto.endpoint);
    let site = site_through(&moto, &proxy, &root, &config());
    // Each run waits between its claim and its publish: time to arm the
    // faults for exactly that `CURRENT` write.
    let server = site.serve(&[("LAMBDAFLOW_FAILPOINTS", "batch-before-publish=sleep:3000")]);
    let (mut known, mut k) = (BTreeMap::new(), 0i64);
    send(&server.url, &mut k, 4, &mut known);
    server.wait_settled(Duration::from_secs(60));
    let storage = site.storage.as_ref().unwrap().clone();
    let runs = |s: &Storage| -> Vec<u64> {
        let mut r: Vec<u64> = common::rt()
            .block_on(s.list_files("views/runs"))
            .unwrap()
            .iter()
            .filter_map(|f| f.strip_suffix(".json")?.parse().ok())
            .collect();
        r.sort_unstable();
        r
    };
    let before = *runs(&storage).last().unwrap();
    send(&server.url, &mut k, 2, &mut known);
    let t = Instant::now();
    let claimed = loop {
        if let Some(&r) = runs(&storage).last().filter(|&&r| r > before) {
            break r;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "a run was claimed");
        std::thread::sleep(Duration::from_millis(50));
    };
    // The write lands and its answer is lost; every read of CURRENT for
    // the next moments fails, and so does every later write of it.
    proxy.inject(
        Matcher::new("PUT", "views/CURRENT"),
        Fault::WrittenThenDropped,
        1,
    );
    proxy.inject(Matcher::new("GET", "views/CURRENT"), Fault::SlowDown, 15);
    proxy.inject(
        Matcher::new("PUT", "views/CURRENT"),
        Fault::SlowDown,
        1_000_000,
    );
    let t = Instant::now();
    loop {
        let s = server.status();
        if s["batch"]["published"]["run"].as_u64() == Some(claimed) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "CURRENT names run {claimed} (its write landed): the driver serves it within 30 s: {}",
            s["batch"]["published"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let current: Value = serde_json::from_slice(
        &common::rt()
            .block_on(storage.get("views/CURRENT"))
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(current["run"].as_u64(), Some(claimed), "{current}");
    proxy.heal();
    send(&server.url, &mut k, 2, &mut known);
    server.wait_settled(Duration::from_secs(90));
    oracle::verify_positions(&oracle::settled_answers(&server.url), &known, true);
    server.stop();
    oracle::assert_rows_are(&common::master_events_in(&storage, 2).0, &known);
    assert_runs_whole(&storage);
}
