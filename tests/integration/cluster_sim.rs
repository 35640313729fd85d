//! The seeded cluster simulation: three `serve` nodes on one S3 root (moto,
//! each node behind its own fault proxy), on Kafka (tansu) or on the
//! embedded log, while a seeded schedule does to them what an operator's
//! bad day does:
//!
//! ```text
//!  pause    kill -STOP a node for 1–4 s, then -CONT
//!  cut      a node's path to S3 cut for 2–6 s (its proxy answers nothing)
//!  kill     kill -9 a node, started again 1–3 s later
//!  view     a view added, dropped, or changed to an equal SQL, on the driver
//!  compact  another engine (Python deltalake) compacts the Delta table
//! ```
//!
//! Producers send all the while and readers query every node; every answer
//! must equal the view SQL over the events below the offsets it names, and
//! in the end every acknowledged event is in the master dataset exactly once
//! (a request whose answer was lost to a kill may be there, whole, once).
//! `LAMBDAFLOW_CLUSTER_SEED` repeats a run's schedule.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::s3_proxy::{Fault, Matcher, S3Proxy};
use crate::common::{self, Server, Site};
use crate::kafka::Tansu;
use crate::oracle::{self, Got, Sent, make, ndjson};
use crate::s3::Moto;

/// How long the faults go on.
const FAULTS_FOR: Duration = Duration::from_secs(40);

/// splitmix64: the schedule, the same for the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stream {
    Kafka,
    Embedded,
}

/// One node: its site (config, local files), its proxy to S3, and the
/// process while it runs.
struct Node {
    site: Site,
    proxy: S3Proxy,
    server: Mutex<Option<Server>>,
    /// The URL readers and producers use; `None` while it is down.
    url: Mutex<Option<String>>,
    /// A start is under way (a node on the embedded log may wait out a lease).
    starting: AtomicBool,
    /// The run is over (or failed): no start, not even a delayed one.
    retired: AtomicBool,
}

impl Node {
    fn start(self: &Arc<Self>) {
        if self.starting.swap(true, Ordering::SeqCst) {
            return;
        }
        let node = self.clone();
        std::thread::spawn(move || {
            for _ in 0..10 {
                if node.retired.load(Ordering::SeqCst) {
                    break;
                }
                // A standby on the embedded log is refused while another
                // node holds the lease: it tries again.
                if let Ok(s) = node
                    .site
                    .try_serve(&[("RUST_LOG", "warn")], std::process::Stdio::inherit())
                {
                    *node.url.lock().unwrap() = Some(s.url.clone());
                    *node.server.lock().unwrap() = Some(s);
                    if node.retired.load(Ordering::SeqCst) {
                        node.kill();
                    }
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            node.starting.store(false, Ordering::SeqCst);
        });
    }

    fn pid(&self) -> Option<u32> {
        self.server.lock().unwrap().as_ref().map(|s| s.child.id())
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
        }
    }

    fn kill(&self) {
        *self.url.lock().unwrap() = None;
        if let Some(mut s) = self.server.lock().unwrap().take() {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
    }

    fn url(&self) -> Option<String> {
        self.url.lock().unwrap().clone()
    }
}

/// Owns the nodes for the run: when it ends, passed or failed, every node
/// is retired and killed. Without it a failed assertion left the nodes
/// running (the readers' threads hold them), and their log on the test's
/// stderr kept CI waiting until its timeout.
struct Cluster(Vec<Arc<Node>>);

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &self.0 {
            n.retired.store(true, Ordering::SeqCst);
            n.signal("-CONT");
            n.kill();
        }
    }
}

fn config(stream: Stream, brokers: &str) -> String {
    let mut c = format!("{}lease = \"2s\"\npoll = \"200ms\"\n", oracle::CONFIG);
    if stream == Stream::Kafka {
        c.push_str(&format!(
            "[stream]\nkafka = {{ brokers = \"{brokers}\", topic = \"events\" }}\n"
        ));
    }
    c
}

/// The node that holds the driver lease now, if one answers.
fn driver(nodes: &[Arc<Node>]) -> Option<String> {
    nodes.iter().filter_map(|n| n.url()).find(|u| {
        common::get_json_opt(&format!("{u}/v1/status"))
            .is_some_and(|s| s["cluster"]["lease"]["held"] == true)
    })
}

/// Compacts the master dataset with another engine (Python deltalake, its
/// own S3 client, conditional puts as lambdaflow's commits use them).
fn compact(moto: &Moto, root: &str) -> String {
    let script = r#"
import sys
from deltalake import DeltaTable
opts = {"AWS_ENDPOINT_URL": sys.argv[2], "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1", "conditional_put": "etag"}
t = DeltaTable(sys.argv[1], storage_options=opts)
print(t.optimize.compact())
"#;
    let out = Command::new(std::env::var("LAMBDAFLOW_PYTHON").unwrap_or("python3".into()))
        .args(["-c", script, &format!("{root}/master"), &moto.endpoint])
        .output()
        .expect("python runs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or_default()
    )
}

const EQUAL_SQL: &str = "SELECT ProductName, count(*) AS orders, sum(price) AS revenue FROM events WHERE price >= 0 GROUP BY ProductName";
const ADDED_SQL: &str =
    "SELECT price / 10 AS band, count(*) AS orders FROM events GROUP BY price / 10";

fn simulate(stream: Stream) {
    let seed = common::fault_seed("LAMBDAFLOW_CLUSTER_SEED");
    let mut rng = Rng(seed);
    let moto = Moto::start();
    let root = moto.bucket("sim");
    let tansu = (stream == Stream::Kafka).then(|| {
        let t = Tansu::start();
        t.create_topic("events", 2);
        t
    });
    let config = config(stream, tansu.as_ref().map_or("", |t| t.brokers.as_str()));
    let nodes: Vec<Arc<Node>> = (0..3)
        .map(|_| {
            let proxy = S3Proxy::start(&moto.endpoint);
            let site = Site::remote(&root, moto.storage(&root), proxy.env(moto.env()), &config);
            Arc::new(Node {
                site,
                proxy,
                server: Mutex::new(None),
                url: Mutex::new(None),
                starting: AtomicBool::new(false),
                retired: AtomicBool::new(false),
            })
        })
        .collect();
    let _cluster = Cluster(nodes.clone());
    for n in &nodes {
        n.start();
        std::thread::sleep(Duration::from_millis(300));
    }
    let t = Instant::now();
    while driver(&nodes).is_none() {
        assert!(t.elapsed() < Duration::from_secs(30), "a node drives");
        std::thread::sleep(Duration::from_millis(100));
    }

    // What was acknowledged, at its position; what a lost answer left in doubt.
    let known: Arc<Mutex<BTreeMap<(u32, u64), Sent>>> = Arc::default();
    let in_doubt: Arc<Mutex<Vec<Vec<Sent>>>> = Arc::default();
    let producing = Arc::new(AtomicBool::new(true));
    let producer = {
        let (known, in_doubt, producing, nodes) = (
            known.clone(),
            in_doubt.clone(),
            producing.clone(),
            nodes.clone(),
        );
        let kafka = tansu.as_ref().map(|t| t.config("events"));
        let mut prng = Rng(seed ^ 0x5eed);
        std::thread::spawn(move || {
            let producer =
                kafka.map(|c| lambdaflow::stream::kafka::KafkaProducer::new(&c).unwrap());
            let mut r = 0i64;
            while producing.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(25));
                let events: Vec<Sent> = (0..50).map(|i| make(r * 50 + i)).collect();
                r += 1;
                let acked: Vec<(u32, u64)> = match &producer {
                    Some(p) => {
                        let part = (r % 2) as u32;
                        crate::kafka::send(p, part, &events, &[])
                            .into_iter()
                            .map(|o| (part, o))
                            .collect()
                    }
                    None => {
                        let Some(url) = nodes[prng.below(3) as usize].url() else {
                            continue;
                        };
                        match common::post_events(&url, ndjson(&events)) {
                            Ok((200, reply)) => {
                                let range = &reply["offsets"][0];
                                let (p, first) = (
                                    range["partition"].as_u64().unwrap() as u32,
                                    range["first"].as_u64().unwrap(),
                                );
                                (0..events.len() as u64).map(|i| (p, first + i)).collect()
                            }
                            // Refused (a node that may not acknowledge): not sent.
                            Ok(_) => Vec::new(),
                            Err(_) => {
                                in_doubt.lock().unwrap().push(events);
                                continue;
                            }
                        }
                    }
                };
                let mut k = known.lock().unwrap();
                for (at, e) in acked.into_iter().zip(events) {
                    if let Some(was) = k.insert(at, e.clone()) {
                        panic!(
                            "position {at:?} was acknowledged twice: for zipcode {} and for zipcode {}",
                            was.zipcode, e.zipcode
                        );
                    }
                }
                drop(k);
            }
        })
    };
    // One reader per node and view, following the node through restarts.
    let answers: Arc<Mutex<Vec<Got>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for n in &nodes {
        for view in ["sales_by_product", "sales_by_zipcode", "sales_per_minute"] {
            let (n, answers, done) = (n.clone(), answers.clone(), done.clone());
            readers.push(std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    if let Some(url) = n.url()
                        && let Some(g) = oracle::query(&url, view)
                    {
                        answers.lock().unwrap().push(g);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }));
        }
    }

    // The schedule.
    let original_sql = lambdaflow::config::Config::default()
        .views
        .into_iter()
        .find(|v| v.name == "sales_by_product")
        .expect("the paper's views")
        .sql;
    let start = Instant::now();
    let mut log = Vec::new();
    let mut changed = false;
    let mut added = false;
    while start.elapsed() < FAULTS_FOR {
        std::thread::sleep(rng.millis(1_000, 3_000));
        let i = rng.below(3) as usize;
        let node = nodes[i].clone();
        let at = start.elapsed().as_secs_f64();
        match rng.below(5) {
            0 => {
                let d = rng.millis(1_000, 4_000);
                log.push(format!("{at:.1}s pause node {i} for {d:?}"));
                node.signal("-STOP");
                std::thread::spawn(move || {
                    std::thread::sleep(d);
                    node.signal("-CONT");
                });
            }
            1 => {
                let d = rng.millis(2_000, 6_000);
                log.push(format!("{at:.1}s cut node {i} from S3 for {d:?}"));
                node.proxy
                    .inject(Matcher::any(), Fault::Unreachable, 1_000_000);
                std::thread::spawn(move || {
                    std::thread::sleep(d);
                    node.proxy.heal();
                });
            }
            2 => {
                let d = rng.millis(1_000, 3_000);
                log.push(format!("{at:.1}s kill -9 node {i}, start it {d:?} later"));
                node.kill();
                std::thread::spawn(move || {
                    std::thread::sleep(d);
                    node.start();
                });
            }
            3 => {
                let Some(url) = driver(&nodes) else { continue };
                let (method, body, what) = match rng.below(2) {
                    0 => {
                        changed = !changed;
                        let sql = if changed {
                            EQUAL_SQL.to_string()
                        } else {
                            original_sql.clone()
                        };
                        (
                            "POST",
                            Some(json!({"name": "sales_by_product", "sql": sql})),
                            "change sales_by_product",
                        )
                    }
                    _ if !added => {
                        added = true;
                        (
                            "POST",
                            Some(json!({"name": "by_price_band", "sql": ADDED_SQL})),
                            "add by_price_band",
                        )
                    }
                    _ => {
                        added = false;
                        ("DELETE", None, "drop by_price_band")
                    }
                };
                let target = if method == "DELETE" {
                    format!("{url}/v1/views/by_price_band")
                } else {
                    format!("{url}/v1/views")
                };
                let (status, reply) = crate::live_views::request(method, &target, body);
                log.push(format!("{at:.1}s {what} on {url}: {status} {reply}"));
            }
            _ => {
                let out = compact(&moto, &root);
                log.push(format!("{at:.1}s compact: {out}"));
            }
        }
    }
    // Heal: every node running, reachable, unpaused.
    for n in &nodes {
        n.proxy.heal();
        n.signal("-CONT");
    }
    std::thread::sleep(Duration::from_secs(1));
    for n in &nodes {
        if n.url().is_none() {
            n.start();
        }
    }
    eprintln!("schedule (seed {seed}):\n  {}", log.join("\n  "));
    std::thread::sleep(Duration::from_secs(2));
    producing.store(false, Ordering::Relaxed);
    producer.join().unwrap();

    // Every running node settles on what was acknowledged.
    let storage = moto.storage(&root);
    let t = Instant::now();
    let (rows, final_known) = loop {
        let known = known.lock().unwrap().clone();
        let mut last = BTreeMap::new();
        for &(p, o) in known.keys() {
            last.insert(p, o);
        }
        let settled = nodes.iter().filter_map(|n| n.url()).all(|u| {
            common::get_json_opt(&format!("{u}/v1/status")).is_some_and(|s| {
                s["partitions"].as_array().is_some_and(|parts| {
                    last.iter().all(|(&p, &o)| {
                        let part = &parts[p as usize];
                        let (a, pb, r) = (
                            part["archived"].as_u64().unwrap_or(0),
                            part["published"].as_u64().unwrap_or(0),
                            part["realtime"].as_u64().unwrap_or(0),
                        );
                        a == pb && pb == r && r > o
                    })
                })
            })
        });
        // Every node serves the one published run, with nothing wrong.
        let runs: Vec<Option<u64>> = nodes
            .iter()
            .filter_map(|n| n.url())
            .filter_map(|u| common::get_json_opt(&format!("{u}/v1/status")))
            .map(|s| {
                let clear = s["health"]["problems"]
                    .as_array()
                    .is_none_or(|a| a.is_empty());
                s["batch"]["published"]["run"].as_u64().filter(|_| clear)
            })
            .collect();
        // On the embedded log one node runs (it must drive; the others are
        // refused at startup while it holds the lease); on Kafka all three.
        let running = nodes.iter().filter(|n| n.url().is_some()).count();
        let want = if stream == Stream::Kafka { 3 } else { 1 };
        let agreed = runs.len() == running && runs.iter().all(|r| r.is_some() && *r == runs[0]);
        if settled && agreed && running >= want {
            let rows = common::master_events_in(&storage, 2).0;
            break (rows, known);
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the cluster settles within 120 s of the faults' end: every node archived, published and serving one run, health clear (seed {seed}); status: {}",
            nodes
                .iter()
                .filter_map(|n| n.url())
                .filter_map(|u| common::get_json_opt(&format!("{u}/v1/status")))
                .map(|s| format!(
                    "run {} {} {}",
                    s["batch"]["published"]["run"], s["partitions"], s["health"]
                ))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // The master dataset: every acknowledged event once, at its place; a
    // request whose answer was lost either whole or not at all.
    let mut known = final_known;
    for (at, e) in &known {
        assert_eq!(
            rows.get(at),
            Some(&e.zipcode),
            "acknowledged event {at:?} (zipcode {}) is in the master dataset once, where it was acknowledged (seed {seed})",
            e.zipcode
        );
    }
    let by_zip: BTreeMap<i64, (u32, u64)> = rows.iter().map(|(at, z)| (*z, *at)).collect();
    assert_eq!(
        by_zip.len(),
        rows.len(),
        "no event is in the master dataset twice (seed {seed})"
    );
    for req in in_doubt.lock().unwrap().iter() {
        let landed = req
            .iter()
            .filter(|e| by_zip.contains_key(&e.zipcode))
            .count();
        assert!(
            landed == 0 || landed == req.len(),
            "a request whose answer was lost is in the master dataset whole or not at all: {landed} of {} (seed {seed})",
            req.len()
        );
        for e in req {
            if let Some(at) = by_zip.get(&e.zipcode) {
                known.insert(*at, e.clone());
            }
        }
    }
    assert_eq!(
        rows.len(),
        known.len(),
        "the master dataset holds nothing but acknowledged (or in-doubt) events (seed {seed})"
    );
    for n in &nodes {
        if let Some(u) = n.url() {
            answers.lock().unwrap().extend(oracle::settled_answers(&u));
        }
    }
    done.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    let answers = answers.lock().unwrap().clone();
    let checked = oracle::verify_positions(&answers, &known, stream == Stream::Embedded);
    eprintln!(
        "seed {seed}: {} events acknowledged, {} answers, {checked} checked against the oracle",
        known.len(),
        answers.len()
    );
    assert!(checked > 10, "readers got answers through the faults");
    for n in &nodes {
        n.kill();
    }
}

#[test]
fn a_seeded_cluster_on_kafka_with_pauses_cuts_kills_view_changes_and_compactions_is_exact() {
    simulate(Stream::Kafka);
}

#[test]
fn a_seeded_cluster_on_the_embedded_log_with_pauses_cuts_kills_view_changes_and_compactions_is_exact()
 {
    simulate(Stream::Embedded);
}
