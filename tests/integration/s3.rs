//! The master dataset and the views on S3, against a real S3 server: moto
//! (`moto_server`), which enforces conditional writes (If-None-Match,
//! If-Match) as S3 does. `scripts/test` installs it; these tests start one
//! per test on a free port of 127.0.0.1.
//!
//! ```text
//!  single node  embedded log, root s3://…: the oracle, the crash loop,
//!               an independent reader (Python deltalake), a 10 s outage
//!  cluster      three nodes on one Kafka topic (tansu) and one root; the
//!               driver killed while archiving, its successor while publishing
//!  race         two drivers publishing at once: one wins, nothing half-published
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lambdaflow::storage::Storage;
use serde_json::Value;

use crate::common::{self, Site};
use crate::kafka::Tansu;
use crate::oracle::{self, Sent, make, ndjson};

/// A moto S3 server on a free port of 127.0.0.1, killed on drop.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

/// `LAMBDAFLOW_MOTO`, or where scripts/test installs it, or the PATH.
fn moto_bin() -> String {
    std::env::var("LAMBDAFLOW_MOTO").unwrap_or_else(|_| {
        let cached = std::env::var("HOME").unwrap_or_default() + "/.cache/moto/bin/moto_server";
        if std::path::Path::new(&cached).exists() {
            cached
        } else {
            "moto_server".into()
        }
    })
}

impl Moto {
    pub fn start() -> Moto {
        let bin = moto_bin();
        // The port is free when chosen, not when moto binds it: another
        // test's server may take it first (moto then exits, and the port
        // answers for someone else). Try again on another port.
        for _ in 0..5 {
            let port = common::free_port();
            let mut child = Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start the S3 server `{bin}` ({e}): run the tests with `scripts/test`, which installs moto, or set LAMBDAFLOW_MOTO")
                });
            let addr = format!("127.0.0.1:{port}");
            common::wait_listening(&addr, Duration::from_secs(60), "moto");
            std::thread::sleep(Duration::from_millis(200));
            if child.try_wait().ok().flatten().is_none() {
                return Moto {
                    child,
                    endpoint: format!("http://{addr}"),
                };
            }
        }
        panic!("moto could not bind a free port in 5 tries")
    }

    /// Creates a bucket; returns `s3://bucket/lambdaflow`.
    pub fn bucket(&self, name: &str) -> String {
        let url = format!("{}/{name}", self.endpoint);
        let status = common::rt()
            .block_on(reqwest::Client::new().put(&url).send())
            .expect("moto answers")
            .status();
        assert!(status.is_success(), "create bucket {name}: {status}");
        format!("s3://{name}/lambdaflow")
    }

    /// What a `serve` child needs to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            // Fail fast while the server is paused, so the outage shows.
            ("AWS_TIMEOUT", "1s"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// The root, opened in this process (the environment left alone).
    pub fn storage(&self, root: &str) -> Storage {
        Storage::s3_with(
            root,
            &[
                ("aws_endpoint", &self.endpoint),
                ("aws_allow_http", "true"),
                ("aws_access_key_id", "test"),
                ("aws_secret_access_key", "test"),
                ("aws_region", "us-east-1"),
            ],
        )
        .unwrap()
    }

    pub fn site(&self, root: &str, extra_config: &str) -> Site {
        Site::remote(root, self.storage(root), self.env(), extra_config)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The master dataset on `storage` holds each of `known` once, where it was
/// sent, and nothing else.
fn assert_master_holds(storage: &Storage, known: &BTreeMap<(u32, u64), Sent>) {
    oracle::assert_rows_are(&common::master_events_in(storage, 2).0, known);
}

/// Reads the table with the deltalake Python package: (partition, offset) → zipcode.
fn read_with_python(moto: &Moto, root: &str) -> BTreeMap<(u32, u64), i64> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/read_delta.py");
    let out = Command::new(std::env::var("LAMBDAFLOW_PYTHON").unwrap_or("python3".into()))
        .arg(script)
        .arg(format!("{root}/master"))
        .arg(&moto.endpoint)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "the deltalake Python reader failed (scripts/test installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut rows = BTreeMap::new();
    for l in String::from_utf8(out.stdout).unwrap().lines() {
        let mut it = l.split(' ').map(|x| x.parse::<i64>().unwrap());
        let (p, o, z) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        assert!(
            rows.insert((p as u32, o as u64), z).is_none(),
            "the Python reader sees event ({p}, {o}) twice"
        );
    }
    rows
}

/// The oracle test with the root on S3; then the table, read by another
/// engine (Python deltalake, its own S3 client), holds exactly the
/// acknowledged events.
#[test]
fn on_an_s3_root_every_answer_is_exact_and_another_engine_reads_every_event() {
    let moto = Moto::start();
    let root = moto.bucket("oracle");
    let site = moto.site(&root, oracle::CONFIG);
    let known = oracle::every_answer_is_exact_on(&site);
    let storage = site.storage.as_ref().unwrap();
    assert_master_holds(storage, &known);
    let python = read_with_python(&moto, &root);
    assert_eq!(
        python.len(),
        known.len(),
        "Python deltalake reads every event once"
    );
    for (at, e) in &known {
        assert_eq!(
            python.get(at),
            Some(&e.zipcode),
            "event {at:?} as Python deltalake reads it"
        );
    }
}

#[test]
fn on_an_s3_root_every_acknowledged_event_survives_kills_exactly_once() {
    let moto = Moto::start();
    let root = moto.bucket("crashes");
    let site = moto.site(&root, crate::crash_loop::CONFIG);
    crate::crash_loop::crash_loop_on(&site, 12, 0x5eed_0053);
}

/// Settings that would let two writers both commit are refused at startup
/// with the reason.
#[test]
fn an_unsafe_s3_configuration_is_refused() {
    let moto = Moto::start();
    let root = moto.bucket("unsafe");
    let site = moto.site(&root, "");
    for (key, value) in [
        ("AWS_S3_ALLOW_UNSAFE_RENAME", "true"),
        ("AWS_CONDITIONAL_PUT", "disabled"),
    ] {
        let out = Command::new(common::BIN)
            .args(["serve", "--config"])
            .arg(&site.config)
            .envs(site.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(key, value)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(key) && err.contains("configured unsafely"),
            "{key}={value} must be refused, naming the setting: {err}"
        );
    }
}

/// moto paused for 10 s while events arrive: reads go on, the outage shows
/// in `health`, and afterwards archiving resumes with nothing lost or
/// counted twice. Ingest goes on while the driver lease's marks cover it;
/// once this node cannot prove it holds the lease, it refuses (503, the
/// lease named, nothing stored) rather than acknowledge events another
/// node could hand the same offsets to (fencing), and accepts again after.
#[test]
fn an_s3_outage_of_10_s_delays_archiving_and_loses_nothing() {
    let moto = Moto::start();
    let root = moto.bucket("outage");
    let site = moto.site(&root, oracle::CONFIG);
    let server = site.serve(&[]);
    let mut known = BTreeMap::new();
    let mut k = 0i64;
    let mut refused = 0u32;
    let mut send = |url: &str, n: usize, known: &mut BTreeMap<(u32, u64), Sent>| {
        for _ in 0..n {
            let events: Vec<Sent> = (0..50).map(|i| make(k + i)).collect();
            k += 50;
            let (status, reply) = common::post_events(url, ndjson(&events)).expect("server up");
            if status == 503 {
                assert!(
                    reply.to_string().contains("lease"),
                    "a refusal during the outage is for the driver lease: {reply}"
                );
                refused += 1;
                continue;
            }
            assert_eq!(
                status, 200,
                "acknowledged, or refused for the lease: {reply}"
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
    };
    send(&server.url, 20, &mut known);
    server.wait_settled(Duration::from_secs(60));
    moto.signal("-STOP");
    let paused = Instant::now();
    let mut seen_problem = None;
    let (mut answered, mut reads) = (0, 0);
    while paused.elapsed() < Duration::from_secs(10) {
        send(&server.url, 2, &mut known);
        reads += 1;
        if oracle::query(&server.url, "sales_by_product").is_some() {
            answered += 1;
        }
        let s = server.status();
        if let Some(p) = s["health"]["problems"].as_array().and_then(|a| a.first()) {
            seen_problem.get_or_insert_with(|| p.clone());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    moto.signal("-CONT");
    // Acknowledged again once the lease is renewed.
    let t = Instant::now();
    let before = known.len();
    while known.len() == before {
        send(&server.url, 1, &mut known);
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "ingest is acknowledged again within 30 s of S3 answering"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("{refused} requests refused for the lease during the outage");
    let problem = seen_problem.expect("the outage shows in health within 10 s");
    assert!(
        answered == reads && reads >= 2,
        "every read during the outage is answered: {answered} of {reads}"
    );
    eprintln!("during the outage: {problem}");
    server.wait_settled(Duration::from_secs(120));
    let s = server.status();
    assert!(
        s["health"]["problems"]
            .as_array()
            .is_none_or(|a| a.is_empty()),
        "the problems clear once S3 answers again: {}",
        s["health"]
    );
    oracle::verify_positions(&oracle::settled_answers(&server.url), &known, true);
    server.stop();
    assert_master_holds(site.storage.as_ref().unwrap(), &known);
}

/// Two drivers (two `lambdaflow rebuild` processes on one root) held at the
/// same step so that they publish at once: exactly one wins; the loser says
/// so and removes its files; CURRENT names a whole run.
#[test]
fn two_drivers_racing_a_publish_one_wins_and_nothing_is_half_published() {
    let moto = Moto::start();
    let root = moto.bucket("race");
    let site = moto.site(&root, oracle::CONFIG);
    let server = site.serve(&[]);
    for r in 0..10i64 {
        let events: Vec<Sent> = (0..100).map(|i| make(r * 100 + i)).collect();
        common::post_events(&server.url, ndjson(&events)).unwrap();
    }
    server.wait_settled(Duration::from_secs(60));
    server.stop();
    let storage = site.storage.as_ref().unwrap();
    let racers: Vec<_> = (0..2)
        .map(|i| {
            // Each racer its own local directory, as on its own machine.
            let local = site.dir.path().join(format!("racer{i}"));
            let config = std::fs::read_to_string(&site.config).unwrap().replace(
                &site.data.display().to_string(),
                &local.display().to_string(),
            );
            let path = site.dir.path().join(format!("racer{i}.toml"));
            std::fs::write(&path, config).unwrap();
            Command::new(common::BIN)
                .args(["rebuild", "--config"])
                .arg(&path)
                .envs(site.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .env("LAMBDAFLOW_FAILPOINTS", "batch-before-claim=sleep:1500")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = racers
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let won: Vec<bool> = outs.iter().map(|o| o.status.success()).collect();
    assert_eq!(
        won.iter().filter(|w| **w).count(),
        1,
        "exactly one racer publishes: {:?}",
        outs.iter()
            .map(|o| String::from_utf8_lossy(&o.stderr).to_string())
            .collect::<Vec<_>>()
    );
    let loser = &outs[won.iter().position(|w| !w).unwrap()];
    let err = String::from_utf8_lossy(&loser.stderr);
    assert!(
        err.contains("was not published") && err.contains("another driver"),
        "the loser says it lost the race: {err}"
    );
    // CURRENT is whole, and no directory of the loser's run is left.
    common::rt().block_on(async {
        let current: Value =
            serde_json::from_slice(&storage.get("views/CURRENT").await.unwrap().unwrap()).unwrap();
        let run = current["run"].as_u64().unwrap();
        for (view, e) in current["views"].as_object().unwrap() {
            for f in ["states", "tsv"] {
                // A view past `[batch] tsv_max_rows` has no TSV.
                let Some(path) = e[f]["path"].as_str() else {
                    assert_eq!(f, "tsv", "view {view} names its states");
                    continue;
                };
                let bytes = storage
                    .get(path)
                    .await
                    .unwrap()
                    .unwrap_or_else(|| panic!("{path} of view {view} exists"));
                assert_eq!(
                    bytes.len() as u64,
                    e[f]["bytes"].as_u64().unwrap(),
                    "{path} is whole"
                );
            }
            let dirs = storage.list_dirs(&format!("views/{view}")).await.unwrap();
            let of_run: Vec<_> = dirs
                .iter()
                .filter(|d| d.starts_with(&format!("{run:012}")))
                .collect();
            assert_eq!(
                of_run.len(),
                1,
                "view {view}: only the winner's files of run {run} remain: {dirs:?}"
            );
        }
    });
    let server = site.serve(&[]);
    let answers = oracle::settled_answers(&server.url);
    server.stop();
    assert!(
        answers
            .iter()
            .all(|a| a.realtime.iter().sum::<u64>() == 1000)
    );
}

pub(crate) fn cluster_config(brokers: &str) -> String {
    format!(
        "{}lease = \"2s\"\npoll = \"200ms\"\n[stream]\nkafka = {{ brokers = \"{brokers}\", topic = \"events\" }}\n",
        oracle::CONFIG
    )
}

/// Waits until some node among `servers` drives; returns its index.
fn driver_of(servers: &[Option<common::Server>], within: Duration) -> usize {
    let t = Instant::now();
    loop {
        for (i, s) in servers.iter().enumerate() {
            if let Some(s) = s
                && let Some(st) = common::get_json_opt(&format!("{}/v1/status", s.url))
                && st["cluster"]["lease"]["held"] == true
            {
                return i;
            }
        }
        assert!(
            t.elapsed() < within,
            "no node took the driver lease within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Three nodes on one Kafka topic and one S3 root, queried all the time.
/// The driver is killed as it archives (after writing a chunk file, before
/// its Delta commit), its successor as it publishes (after claiming the run,
/// before CURRENT): each time another node takes over; every acknowledged
/// event is in the Delta table once, and every node's every answer is exact.
#[test]
fn a_cluster_of_three_nodes_survives_its_driver_dying_twice_exactly() {
    let moto = Moto::start();
    let root = moto.bucket("cluster");
    let tansu = Tansu::start();
    tansu.create_topic("events", 2);
    let config = cluster_config(&tansu.brokers);
    let sites: Vec<Site> = (0..3).map(|_| moto.site(&root, &config)).collect();
    let mut servers: Vec<Option<common::Server>> = vec![None, None, None];
    // Node 0 drives first, and dies at its first archive commit.
    servers[0] = Some(sites[0].serve(&[("LAMBDAFLOW_FAILPOINTS", "archive-after-parquet")]));
    assert_eq!(driver_of(&servers, Duration::from_secs(10)), 0);
    // Node 1 dies at its first publish, once it drives.
    servers[1] = Some(sites[1].serve(&[("LAMBDAFLOW_FAILPOINTS", "batch-before-publish")]));

    let known: Arc<Mutex<BTreeMap<(u32, u64), Sent>>> = Arc::default();
    let producing = Arc::new(AtomicBool::new(true));
    let producer = {
        let (known, config, producing) = (known.clone(), tansu.config("events"), producing.clone());
        std::thread::spawn(move || {
            let producer = lambdaflow::stream::kafka::KafkaProducer::new(&config).unwrap();
            let mut r = 0i64;
            while producing.load(Ordering::Relaxed) {
                let events: Vec<Sent> = (0..50).map(|i| make(r * 50 + i)).collect();
                let p = (r % 2) as u32;
                let offsets = crate::kafka::send(&producer, p, &events, &[]);
                let mut k = known.lock().unwrap();
                for (o, e) in offsets.into_iter().zip(events) {
                    k.insert((p, o), e);
                }
                drop(k);
                r += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let answers: Arc<Mutex<Vec<oracle::Got>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let mut readers = oracle::view_readers(&servers[1].as_ref().unwrap().url, &answers, &done);

    // Node 0 dies archiving; node 1 takes over and dies publishing.
    let t = Instant::now();
    servers[0]
        .take()
        .unwrap()
        .wait_for_crash(Duration::from_secs(30));
    let first_death = t.elapsed();
    assert_eq!(
        driver_of(&servers, Duration::from_secs(15)),
        1,
        "node 1 takes over"
    );
    let takeover = t.elapsed();
    servers[2] = Some(sites[2].serve(&[]));
    readers.extend(oracle::view_readers(
        &servers[2].as_ref().unwrap().url,
        &answers,
        &done,
    ));
    servers[1]
        .take()
        .unwrap()
        .wait_for_crash(Duration::from_secs(30));
    let second_death = Instant::now();
    assert_eq!(
        driver_of(&servers, Duration::from_secs(15)),
        2,
        "node 2 takes over"
    );
    eprintln!(
        "driver 0 died at {first_death:?}, node 1 drove at {takeover:?}; node 2 drove {:?} after node 1 died",
        second_death.elapsed()
    );
    // The dead come back as followers.
    servers[0] = Some(sites[0].serve(&[]));
    servers[1] = Some(sites[1].serve(&[]));
    for s in [0, 1] {
        readers.extend(oracle::view_readers(
            &servers[s].as_ref().unwrap().url,
            &answers,
            &done,
        ));
    }
    std::thread::sleep(Duration::from_secs(2));
    producing.store(false, Ordering::Relaxed);
    producer.join().unwrap();
    let known = known.lock().unwrap().clone();
    let mut last = BTreeMap::new();
    for &(p, o) in known.keys() {
        last.insert(p, o);
    }
    let t = Instant::now();
    for s in servers.iter().flatten() {
        crate::kafka::wait_settled(s, &last, Duration::from_secs(120));
        eprintln!("{} settled at {:?}", s.url, t.elapsed());
        for view in ["sales_by_product", "sales_by_zipcode", "sales_per_minute"] {
            answers
                .lock()
                .unwrap()
                .push(oracle::query(&s.url, view).unwrap());
        }
    }
    done.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    eprintln!("readers done at {:?}", t.elapsed());
    let holders: Vec<bool> = servers
        .iter()
        .flatten()
        .map(|s| s.status()["cluster"]["lease"]["held"] == true)
        .collect();
    for s in servers.into_iter().flatten() {
        s.stop();
    }
    eprintln!("stopped at {:?}", t.elapsed());
    assert_master_holds(sites[0].storage.as_ref().unwrap(), &known);
    eprintln!("master checked at {:?}", t.elapsed());
    let answers = answers.lock().unwrap().clone();
    let runs: BTreeSet<u64> = answers.iter().filter_map(|a| a.run).collect();
    let checked = oracle::verify_positions(&answers, &known, false);
    eprintln!("answers checked at {:?}", t.elapsed());
    eprintln!("{checked} distinct answers of 3 nodes checked over runs {runs:?}");
    assert!(checked > 20, "only {checked} distinct answers were checked");
    assert_eq!(
        holders.iter().filter(|h| **h).count(),
        1,
        "one driver at the end: {holders:?}"
    );
}
