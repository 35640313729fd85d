//! Kinesis as the stream, against a real emulator: kinesalite 3.3.3 (Node.js,
//! in memory) started here on 127.0.0.1 through `scripts/kinesalite.js`.
//! `scripts/test` installs it and sets `LAMBDAFLOW_KINESALITE`; without it
//! these tests fail and say how to get it.
//!
//! A record's position is its ordinal in its shard, which a producer does
//! not learn (PutRecords gives a sequence number): the tests number each
//! shard's records by sequence number once all are sent, and map shards to
//! partitions through the registry the node wrote.
//!
//! Not staged by the emulator: what AWS does and kinesalite does not —
//! throttling, expired shards, the record limit, per-record refusals. Those
//! tests put the service-behaviour proxy (`common::kinesis_proxy`) between
//! the node and kinesalite (`kinesis_faults`).

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::Client;
use bytes::Bytes;
use lambdaflow::stream::kinesis::{KinesisProducer, Registry};
use serde_json::Value;

use crate::common::kinesis_proxy::{Faults, KinesisProxy};
use crate::common::{self, Site};
use crate::oracle::{self, Sent, make, ndjson};

pub(crate) const AWS_ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "lambdaflow-test"),
    ("AWS_SECRET_ACCESS_KEY", "lambdaflow-test"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

/// A kinesalite on a free port of 127.0.0.1, killed on drop.
pub struct Kinesalite {
    child: Child,
    pub endpoint: String,
}

impl Kinesalite {
    pub fn start() -> Kinesalite {
        let modules = std::env::var("LAMBDAFLOW_KINESALITE").unwrap_or_else(|_| {
            std::env::var("HOME").unwrap_or_default() + "/.cache/kinesalite/node_modules"
        });
        let port = common::free_port();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/kinesalite.js");
        let child = Command::new("node")
            .arg(script)
            .arg(port.to_string())
            .env("NODE_PATH", &modules)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start node ({e}): run the tests with `scripts/test`, which installs Node.js and kinesalite 3.3.3")
            });
        let addr = format!("127.0.0.1:{port}");
        common::wait_listening(
            &addr,
            Duration::from_secs(30),
            &format!("kinesalite (installed under {modules}? run `scripts/test`)"),
        );
        Kinesalite {
            child,
            endpoint: format!("http://{addr}"),
        }
    }

    pub fn client(&self) -> Client {
        client(&self.endpoint)
    }

    pub fn create_stream(&self, name: &str, shards: i32) {
        let c = self.client();
        common::rt().block_on(async {
            c.create_stream()
                .stream_name(name)
                .shard_count(shards)
                .send()
                .await
                .expect("create the stream");
            wait_active(&c, name).await;
        });
    }
}

impl Drop for Kinesalite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn client(endpoint: &str) -> Client {
    let conf = aws_sdk_kinesis::Config::builder()
        .behavior_version(aws_sdk_kinesis::config::BehaviorVersion::latest())
        .region(aws_sdk_kinesis::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_kinesis::config::Credentials::new(
            "lambdaflow-test",
            "lambdaflow-test",
            None,
            None,
            "test",
        ))
        .http_client(aws_smithy_http_client::Builder::new().build_http())
        .build();
    Client::from_conf(conf)
}

pub(crate) async fn wait_active(c: &Client, name: &str) {
    let t = Instant::now();
    loop {
        let d = c
            .describe_stream_summary()
            .stream_name(name)
            .send()
            .await
            .expect("describe the stream");
        let status = d
            .stream_description_summary()
            .map(|s| s.stream_status().as_str().to_string());
        if status.as_deref() == Some("ACTIVE") {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "stream {name} is {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) fn site_at(endpoint: &str, stream: &str) -> Site {
    Site::new(&format!(
        "{}[stream]\nkinesis = {{ stream = \"{stream}\", region = \"us-east-1\", endpoint = \"{endpoint}\", poll = \"200ms\" }}\n",
        oracle::CONFIG
    ))
}

/// Every record put: its shard, sequence number, and the event (none for a
/// record that is not one).
pub(crate) type Puts = Vec<(String, String, Option<Sent>)>;

/// Puts `events` under partition key `key`, with `bad` records that are not
/// events in the middle.
pub(crate) fn put(producer: &KinesisProducer, key: &str, events: &[Sent], bad: &[&str]) -> Puts {
    let body = ndjson(events);
    let mut records: Vec<(Option<Sent>, Bytes)> = body
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .zip(events)
        .map(|(l, e)| (Some(e.clone()), Bytes::copy_from_slice(l)))
        .collect();
    let at = records.len() / 2;
    for b in bad.iter().rev() {
        records.insert(at, (None, Bytes::copy_from_slice(b.as_bytes())));
    }
    let keyed: Vec<(String, Bytes)> = records
        .iter()
        .map(|(_, d)| (key.to_string(), d.clone()))
        .collect();
    let puts = common::rt()
        .block_on(producer.send(&keyed))
        .expect("kinesalite stores the records");
    puts.into_iter()
        .zip(records)
        .map(|(p, (e, _))| (p.shard, p.sequence, e))
        .collect()
}

/// Each event at (partition, ordinal): shards numbered by the node's
/// registry, records by sequence number. Also each partition's record count.
pub(crate) fn positions(
    site: &Site,
    stream: &str,
    puts: &Puts,
) -> (BTreeMap<(u32, u64), Sent>, BTreeMap<u32, u64>) {
    // The node registers new shards within seconds of their creation.
    let storage = lambdaflow::storage::Storage::local(&site.data).unwrap();
    let t = Instant::now();
    let registry = loop {
        let r = common::rt()
            .block_on(Registry::load(&storage, stream))
            .unwrap()
            .expect("the node registered the shards");
        if puts
            .iter()
            .all(|(shard, ..)| r.shards.iter().any(|s| &s.shard == shard))
            || t.elapsed() > Duration::from_secs(30)
        {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut by_shard: BTreeMap<&str, Vec<(&str, &Option<Sent>)>> = BTreeMap::new();
    for (shard, seq, e) in puts {
        by_shard.entry(shard).or_default().push((seq, e));
    }
    let mut known = BTreeMap::new();
    let mut counts = BTreeMap::new();
    for (shard, mut records) in by_shard {
        let p = registry
            .shards
            .iter()
            .position(|s| s.shard == shard)
            .unwrap_or_else(|| panic!("shard {shard} is not in the registry {registry:?}"))
            as u32;
        records.sort_by(|a, b| (a.0.len(), a.0).cmp(&(b.0.len(), b.0)));
        counts.insert(p, records.len() as u64);
        for (o, (_, e)) in records.into_iter().enumerate() {
            if let Some(e) = e {
                known.insert((p, o as u64), e.clone());
            }
        }
    }
    (known, counts)
}

/// Waits until each partition is archived, published and realtime up to
/// its record count.
pub(crate) fn wait_settled(
    server: &common::Server,
    counts: &BTreeMap<u32, u64>,
    within: Duration,
) -> Value {
    let t = Instant::now();
    loop {
        let s = server.status();
        let parts = s["partitions"].as_array().cloned().unwrap_or_default();
        let done = counts.iter().all(|(&p, &n)| {
            parts.get(p as usize).is_some_and(|part| {
                let (a, pb, r) = (
                    part["archived"].as_u64().unwrap_or(0),
                    part["published"].as_u64().unwrap_or(0),
                    part["realtime"].as_u64().unwrap_or(0),
                );
                a == n && pb == n && r == n
            })
        });
        if done {
            return s;
        }
        assert!(
            t.elapsed() < within,
            "not settled within {within:?}: record counts {counts:?}, status {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_answer_over_kinesis_equals_the_view_sql_over_the_events_below_its_positions() {
    let k = Kinesalite::start();
    k.create_stream("events", 2);
    let site = site_at(&k.endpoint, "events");
    let server = site.serve(AWS_ENV);
    let url = server.url.clone();
    let status = server.status();
    assert!(
        status["stream"]
            .as_str()
            .is_some_and(|s| s.contains("Kinesis stream `events`")),
        "status names the stream: {status}"
    );
    let puts: Arc<Mutex<Puts>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<Vec<oracle::Got>>> = Arc::default();
    let readers = oracle::view_readers(&url, &answers, &done);
    let producers: Vec<_> = (0..2i64)
        .map(|t| {
            let (puts, endpoint) = (puts.clone(), k.endpoint.clone());
            std::thread::spawn(move || {
                let producer = KinesisProducer::with_client(client(&endpoint), "events");
                for r in 0..60i64 {
                    let events: Vec<Sent> = (0..50).map(|i| make((r * 2 + t) * 50 + i)).collect();
                    let bad: &[&str] = if r % 7 == 3 {
                        &["not json", "{\"zipcode\": \"x\"}"]
                    } else {
                        &[]
                    };
                    let got = put(&producer, &format!("key-{t}-{}", r % 5), &events, bad);
                    puts.lock().unwrap().extend(got);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();
    for p in producers {
        p.join().unwrap();
    }
    let puts = puts.lock().unwrap().clone();
    let (known, counts) = positions(&site, "events", &puts);
    assert_eq!(known.len(), 2 * 60 * 50, "every event acknowledged");
    let settled = wait_settled(&server, &counts, Duration::from_secs(120));
    for &p in counts.keys() {
        let part = &settled["partitions"][p as usize];
        assert!(
            part["shard"]["id"]
                .as_str()
                .is_some_and(|s| s.starts_with("shardId-"))
                && part["shard"]["state"] == "open"
                && part["lag"] == 0,
            "status names each shard, open, with no lag once settled: {part}"
        );
    }
    let metrics = common::get_text(&format!("{url}/metrics"));
    assert!(
        metrics.contains("lambdaflow_stream_partition_info{partition=\"1\",shard=\"shardId-")
            && metrics.contains("lambdaflow_speed_lag_events{partition=\"0\"} 0"),
        "metrics name each shard and its lag: {metrics}"
    );
    answers
        .lock()
        .unwrap()
        .extend(oracle::settled_answers(&server.url));
    done.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    let answers = answers.lock().unwrap().clone();
    let runs: std::collections::BTreeSet<u64> = answers.iter().filter_map(|a| a.run).collect();
    assert!(
        runs.len() >= 3,
        "answers must span three batch publishes, saw {runs:?}"
    );
    let checked = oracle::verify_positions(&answers, &known, false);
    assert!(checked > 20, "only {checked} distinct answers were checked");
    eprintln!(
        "checked {checked} distinct answers over {} batch runs",
        runs.len()
    );
    server.stop();

    let dead = lambdaflow::stream::DeadLetters::read_all(site.data.join("deadletter")).unwrap();
    let refused: Vec<_> = dead.iter().filter(|d| d.offset.is_some()).collect();
    assert_eq!(
        refused.len(),
        2 * 9 * 2,
        "each refused record kept once: {refused:?}"
    );
    for d in &refused {
        let at = (d.partition.unwrap(), d.offset.unwrap());
        assert!(
            !known.contains_key(&at),
            "a dead letter at {at:?}, where an event is"
        );
    }
    oracle::assert_master_holds(&site.data, &known);
}

#[test]
fn kill_9_while_consuming_kinesis_then_restart_resumes_after_the_recorded_sequence_numbers() {
    let k = Kinesalite::start();
    k.create_stream("events", 2);
    let site = site_at(&k.endpoint, "events");
    let producer = KinesisProducer::with_client(k.client(), "events");
    let mut puts: Puts = Vec::new();
    let mut n = 0i64;
    let mut send_some = |rounds: i64, puts: &mut Puts| {
        for r in 0..rounds {
            let events: Vec<Sent> = (0..100).map(|i| make(n + i)).collect();
            n += 100;
            puts.extend(put(&producer, &format!("k{}", r % 4), &events, &[]));
        }
    };
    send_some(10, &mut puts);
    let server = site.serve(AWS_ENV);
    send_some(10, &mut puts);
    std::thread::sleep(Duration::from_millis(1500));
    drop(server); // kill -9
    send_some(10, &mut puts);
    let server = site.serve(AWS_ENV);
    send_some(5, &mut puts);
    let (known, counts) = positions(&site, "events", &puts);
    wait_settled(&server, &counts, Duration::from_secs(120));
    oracle::assert_settled_exact(server, &site.data, &known, true);
}

/// Splits shard 0 and then merges two open shards while producers write;
/// afterwards every parent's partition is final (its shard closed), the
/// children are partitions of their own from 0, and every answer and the
/// master dataset hold each event exactly once.
#[test]
fn a_shard_split_and_a_merge_during_ingest_lose_and_double_nothing() {
    let k = Kinesalite::start();
    k.create_stream("events", 2);
    let site = site_at(&k.endpoint, "events");
    let server = site.serve(AWS_ENV);
    let c = k.client();
    let producer = KinesisProducer::with_client(k.client(), "events");
    let mut puts: Puts = Vec::new();
    let mut n = 0i64;
    let mut send_some = |rounds: i64, puts: &mut Puts| {
        for r in 0..rounds {
            let events: Vec<Sent> = (0..100).map(|i| make(n + i)).collect();
            n += 100;
            puts.extend(put(&producer, &format!("key{r}"), &events, &[]));
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    send_some(10, &mut puts);
    let rt = common::rt();
    let shards = |c: &Client| {
        rt.block_on(lambdaflow::stream::kinesis::list_shards(c, "events"))
            .unwrap()
    };
    // Split shard 0 at the middle of its hash key range.
    let first = &shards(&c)[0].shard.clone();
    rt.block_on(async {
        let d = c.list_shards().stream_name("events").send().await.unwrap();
        let s0 = d.shards().iter().find(|s| s.shard_id() == first).unwrap();
        let range = s0.hash_key_range().unwrap();
        let lo: u128 = range.starting_hash_key().parse().unwrap();
        let hi: u128 = range.ending_hash_key().parse().unwrap();
        c.split_shard()
            .stream_name("events")
            .shard_to_split(first)
            .new_starting_hash_key((lo + (hi - lo) / 2).to_string())
            .send()
            .await
            .expect("split");
        wait_active(&c, "events").await;
    });
    send_some(10, &mut puts);
    // Merge the two children of the split (adjacent, both open).
    rt.block_on(async {
        let d = c.list_shards().stream_name("events").send().await.unwrap();
        let mut open: Vec<_> = d
            .shards()
            .iter()
            .filter(|s| s.parent_shard_id() == Some(first.as_str()))
            .collect();
        open.sort_by_key(|s| {
            s.hash_key_range()
                .unwrap()
                .starting_hash_key()
                .parse::<u128>()
                .unwrap()
        });
        assert_eq!(open.len(), 2, "the split made two children");
        c.merge_shards()
            .stream_name("events")
            .shard_to_merge(open[0].shard_id())
            .adjacent_shard_to_merge(open[1].shard_id())
            .send()
            .await
            .expect("merge");
        wait_active(&c, "events").await;
    });
    send_some(10, &mut puts);
    let (known, counts) = positions(&site, "events", &puts);
    let settled = wait_settled(&server, &counts, Duration::from_secs(120));
    let parts = settled["partitions"].as_array().unwrap();
    assert_eq!(
        parts.len(),
        5,
        "2 shards, 2 from the split, 1 from the merge: {settled}"
    );
    let closed: Vec<u64> = parts
        .iter()
        .filter(|p| p["shard"]["state"] == "closed")
        .map(|p| p["partition"].as_u64().unwrap())
        .collect();
    assert_eq!(
        closed,
        [0, 2, 3],
        "the split and merged shards are closed: {settled}"
    );
    oracle::assert_settled_exact(server, &site.data, &known, true);
}

/// GetRecords answered with `ProvisionedThroughputExceededException` (by
/// a proxy: no emulator enforces the budget) for a while: `status` says
/// the shards are throttled, the node backs off, and once the budget is back
/// it reads on with nothing lost.
#[test]
fn a_throttled_shard_is_shown_and_backed_off_and_nothing_is_lost() {
    let k = Kinesalite::start();
    k.create_stream("events", 1);
    let proxy = KinesisProxy::start(&k.endpoint, Faults::default());
    let site = site_at(&proxy.endpoint, "events");
    let server = site.serve(AWS_ENV);
    let producer = KinesisProducer::with_client(k.client(), "events");
    let mut puts = put(&producer, "a", &(0..500).map(make).collect::<Vec<_>>(), &[]);
    let (_, counts) = positions(&site, "events", &puts);
    wait_settled(&server, &counts, Duration::from_secs(60));

    proxy.set(|f| f.throttle_get_records = true);
    puts.extend(put(
        &producer,
        "a",
        &(500..1000).map(make).collect::<Vec<_>>(),
        &[],
    ));
    let t = Instant::now();
    let mut seen = false;
    while t.elapsed() < Duration::from_secs(20) && !seen {
        seen = server.status()["partitions"][0]["shard"]["state"] == "throttled";
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        seen,
        "status shows the shard throttled: {}",
        server.status()
    );
    let before = proxy.counts.get_records.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs(3));
    let during = proxy.counts.get_records.load(Ordering::Relaxed) - before;
    assert!(
        during <= 8,
        "a throttled shard is backed off: {during} GetRecords calls in 3 s"
    );
    proxy.set(|f| f.throttle_get_records = false);
    let (known, counts) = positions(&site, "events", &puts);
    wait_settled(&server, &counts, Duration::from_secs(60));
    // The records may have come in a call that passed just before the
    // throttling began: the first call to pass after it says `open`.
    let t = Instant::now();
    while server.status()["partitions"][0]["shard"]["state"] != "open" {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no longer throttled once calls pass: {}",
            server.status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let answers = oracle::settled_answers(&server.url);
    server.stop();
    oracle::verify_positions(&answers, &known, true);
}
