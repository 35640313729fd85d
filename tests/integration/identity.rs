//! The stream's identity, recorded with the master dataset: a data
//! directory is never read from another stream than the one it was written
//! from without the operator saying so (issue 30, cases 3 and 8).
//!
//! - The embedded log with acknowledged events not archived yet, then the
//!   same directory on Kinesis: refused, `accept-loss --stream` gives them up.
//! - The embedded log archived and published, then a Kafka topic (librdkafka's
//!   mock cluster): refused; accepted, each partition is read from H[p].
//! - A Kinesis stream deleted and created again under its name: refused at
//!   startup; `accept-loss --stream` keeps what was archived, the new
//!   stream's shard becomes a new partition; while running, the partitions
//!   stop with a `health` problem naming the fix.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lambdaflow::stream::kafka::{KafkaConfig, KafkaProducer};
use lambdaflow::stream::kinesis::KinesisProducer;
use serde_json::Value;

use crate::common::{self, Site};
use crate::kinesis::Kinesalite;
use crate::oracle::{self, Sent, make, ndjson};

const AWS_ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "lambdaflow-test"),
    ("AWS_SECRET_ACCESS_KEY", "lambdaflow-test"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
    ("RUST_LOG", "warn"),
];

/// The site's config file with `extra` in place of what followed
/// `data` and `listen`.
fn reconfigure(site: &Site, extra: &str) {
    std::fs::write(
        &site.config,
        format!(
            "data = {:?}\nlisten = \"127.0.0.1:0\"\n{extra}",
            site.data.display().to_string()
        ),
    )
    .unwrap();
}

fn kinesis_config(endpoint: &str, stream: &str) -> String {
    format!(
        "{}[stream]\nkinesis = {{ stream = \"{stream}\", region = \"us-east-1\", endpoint = \"{endpoint}\", poll = \"200ms\" }}\n",
        oracle::CONFIG
    )
}

/// Starts `serve`, which must refuse to start: what it said on stderr.
fn refused(site: &Site, env: &[(&str, &str)], why: &str) -> String {
    let log = site.dir.path().join("refused.log");
    let stderr = Stdio::from(std::fs::File::create(&log).unwrap());
    match site.try_serve(env, stderr) {
        Ok(server) => {
            let status = server.status();
            panic!("{why}: the node started instead, status {status}")
        }
        Err(status) => assert!(!status.success(), "{why}: exited with {status}"),
    }
    std::fs::read_to_string(&log).unwrap()
}

/// `lambdaflow accept-loss --stream [--yes]`: exit code and stdout+stderr.
fn accept_stream(site: &Site, env: &[(&str, &str)], yes: bool) -> (Option<i32>, String) {
    let mut c = Command::new(common::BIN);
    c.args(["accept-loss", "--stream", "--config"])
        .arg(&site.config);
    if yes {
        c.arg("--yes");
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Waits until the view counts `n` orders and says so stays (three reads).
fn wait_orders(server: &common::Server, n: u64, within: Duration, what: &str) {
    let t = Instant::now();
    let mut same = 0;
    loop {
        let got = common::orders(&server.url);
        same = if got == n { same + 1 } else { 0 };
        if same == 3 {
            return;
        }
        assert!(
            t.elapsed() < within,
            "{what}: the view counts {got} orders, expected {n}; status {}",
            server.status()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn post(url: &str, events: &[Sent]) {
    let (code, reply) = common::post_events(url, ndjson(events)).unwrap();
    assert_eq!(code, 200, "the events are acknowledged: {reply}");
}

fn kinesis_put(k: &Kinesalite, stream: &str, events: &[Sent]) {
    let producer = KinesisProducer::with_client(k.client(), stream);
    let body = ndjson(events);
    let records: Vec<(String, Bytes)> = body
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
        .map(|(i, l)| (format!("k{i}"), Bytes::copy_from_slice(l)))
        .collect();
    common::rt()
        .block_on(producer.send(&records))
        .expect("kinesalite stores the records");
}

/// Deletes `stream` and creates it again (a new creation timestamp).
fn recreate(k: &Kinesalite, stream: &str, shards: i32) {
    let c = k.client();
    common::rt().block_on(async {
        c.delete_stream()
            .stream_name(stream)
            .send()
            .await
            .expect("delete the stream");
        let t = Instant::now();
        while c
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .is_ok()
        {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the stream is deleted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Creation timestamps are the service's clock: a new one differs.
        // kinesalite's are whole seconds (AWS's are finer), so the new
        // stream is created in the next second.
        tokio::time::sleep(Duration::from_millis(1_100)).await;
    });
    k.create_stream(stream, shards);
}

/// Waits until partition `p` is archived, published and realtime at `n`.
fn wait_partition(server: &common::Server, p: usize, n: u64, within: Duration) -> Value {
    let t = Instant::now();
    loop {
        let s = server.status();
        let part = &s["partitions"][p];
        if ["archived", "published", "realtime"]
            .iter()
            .all(|k| part[*k].as_u64() == Some(n))
        {
            return s;
        }
        assert!(
            t.elapsed() < within,
            "partition {p} not settled at {n} within {within:?}: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn unarchived_events_of_the_embedded_log_refuse_a_switch_to_kinesis_until_the_loss_is_accepted() {
    let k = Kinesalite::start();
    k.create_stream("events", 1);
    // A chunk closes only after an hour: nothing is archived.
    let embedded = "[speed]\ninterval = \"10ms\"\n[archive]\nchunk_events = 1000000\nchunk_age = \"1h\"\n[batch]\npause = \"250ms\"\n";
    let site = Site::new(embedded);
    let server = site.serve(&[]);
    let events: Vec<Sent> = (0..1000).map(make).collect();
    for c in events.chunks(100) {
        post(&server.url, c);
    }
    wait_orders(
        &server,
        1000,
        Duration::from_secs(30),
        "on the embedded log",
    );
    server.stop();

    reconfigure(&site, &kinesis_config(&k.endpoint, "events"));
    let said = refused(
        &site,
        AWS_ENV,
        "1,000 acknowledged events sit unarchived in the embedded log; a node on Kinesis would never read them",
    );
    assert!(
        said.contains("1000 events acknowledged on the embedded log")
            && said.contains("not archived")
            && said.contains("accept-loss --stream"),
        "the refusal says what would be lost and what to do: {said}"
    );

    // Back on the embedded log, nothing was lost.
    reconfigure(&site, embedded);
    let server = site.serve(&[]);
    wait_orders(
        &server,
        1000,
        Duration::from_secs(30),
        "back on the embedded log",
    );
    assert_eq!(
        server.status()["stream_identity"]["identity"]["kind"],
        "embedded",
        "status shows the recorded stream: {}",
        server.status()
    );
    server.stop();

    // The operator gives the events up explicitly.
    reconfigure(&site, &kinesis_config(&k.endpoint, "events"));
    let (code, said) = accept_stream(&site, AWS_ENV, false);
    assert_eq!(
        code,
        Some(2),
        "without --yes it only says what is lost: {said}"
    );
    assert!(
        said.contains("1,000 events of the embedded log") && said.contains("--yes"),
        "it names the events given up: {said}"
    );
    let (code, said) = accept_stream(&site, AWS_ENV, true);
    assert_eq!(code, Some(0), "accepted: {said}");
    assert!(
        std::fs::read_dir(&site.data).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("log-abandoned-")),
        "the embedded log is moved aside, not deleted: {said}"
    );
    let server = site.serve(AWS_ENV);
    kinesis_put(&k, "events", &(5000..5010).map(make).collect::<Vec<_>>());
    wait_orders(
        &server,
        10,
        Duration::from_secs(60),
        "the accepted loss: only the stream's events",
    );
    let s = server.status();
    assert_eq!(
        (
            s["stream_identity"]["identity"]["kind"].as_str(),
            s["stream_identity"]["identity"]["stream"].as_str()
        ),
        (Some("kinesis"), Some("events")),
        "status shows the recorded stream: {s}"
    );
    server.stop();
}

#[test]
fn an_archived_embedded_data_directory_is_refused_on_a_kafka_topic_unless_accepted() {
    let site = Site::new(oracle::CONFIG);
    let server = site.serve(&[]);
    let events: Vec<Sent> = (0..1000).map(make).collect();
    for c in events.chunks(100) {
        post(&server.url, c);
    }
    server.wait_settled(Duration::from_secs(60));
    wait_orders(
        &server,
        1000,
        Duration::from_secs(30),
        "on the embedded log",
    );
    let h: Vec<u64> = server.status()["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["published"].as_u64().unwrap())
        .collect();
    server.stop();

    // A topic of 1,600 records, 800 per partition.
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    mock.create_topic("events", 2, 1).unwrap();
    let brokers = mock.bootstrap_servers();
    let producer = KafkaProducer::new(&KafkaConfig {
        brokers: brokers.clone(),
        topic: "events".into(),
        options: Default::default(),
    })
    .unwrap();
    for p in 0..2u32 {
        let records: Vec<Sent> = (0..800)
            .map(|i| make(10_000 + p as i64 * 1000 + i))
            .collect();
        crate::kafka::send(&producer, p, &records, &[]);
    }
    let kafka = format!(
        "{}[stream]\nkafka = {{ brokers = \"{brokers}\", topic = \"events\" }}\n",
        oracle::CONFIG
    );
    reconfigure(&site, &kafka);
    let said = refused(
        &site,
        &[],
        "the published H is in embedded offsets; taken as Kafka offsets it would skip records and count others",
    );
    assert!(
        said.contains("written from the embedded log")
            && said.contains("Kafka topic `events`")
            && said.contains("new storage root")
            && said.contains("accept-loss --stream"),
        "the refusal says what happened and the ways on: {said}"
    );

    let (code, said) = accept_stream(&site, &[], true);
    assert_eq!(code, Some(0), "accepted: {said}");
    let server = site.serve(&[]);
    let above: u64 = h.iter().map(|&h| 800u64.saturating_sub(h)).sum();
    wait_orders(
        &server,
        1000 + above,
        Duration::from_secs(60),
        "accepted: the archived events, then each Kafka partition from H[p] on",
    );
    assert_eq!(
        server.status()["stream_identity"]["identity"]["topic"],
        "events",
        "status shows the recorded stream"
    );
    server.stop();
}

#[test]
fn a_kinesis_stream_created_again_is_refused_at_startup_and_accept_loss_goes_on_exactly() {
    let k = Kinesalite::start();
    k.create_stream("events", 1);
    let site = Site::new(&kinesis_config(&k.endpoint, "events"));
    let server = site.serve(AWS_ENV);
    let first = server.status()["stream_identity"]["identity"].clone();
    kinesis_put(&k, "events", &(0..300).map(make).collect::<Vec<_>>());
    wait_partition(&server, 0, 300, Duration::from_secs(60));
    server.stop();

    recreate(&k, "events", 1);
    kinesis_put(&k, "events", &(1000..1200).map(make).collect::<Vec<_>>());
    let said = refused(
        &site,
        AWS_ENV,
        "the recorded sequence numbers are not of the stream created again",
    );
    assert!(
        said.contains("deleted and created again") && said.contains("accept-loss --stream"),
        "the refusal says what happened and what to do: {said}"
    );

    assert!(
        first["created_ms"].as_i64().is_some() && first["stream"] == "events",
        "status showed the recorded stream and its creation time: {first}"
    );
    let (code, said) = accept_stream(&site, AWS_ENV, false);
    assert_eq!(
        code,
        Some(2),
        "without --yes it only says what it would do: {said}"
    );
    let (code, said) = accept_stream(&site, AWS_ENV, true);
    assert_eq!(code, Some(0), "accepted: {said}");
    assert!(
        said.contains("shardId-000000000000 → partition 1"),
        "the new stream's shard is a new partition: {said}"
    );

    let server = site.serve(AWS_ENV);
    let s = wait_partition(&server, 1, 200, Duration::from_secs(60));
    assert_eq!(
        (
            s["partitions"][0]["published"].as_u64(),
            s["partitions"][0]["shard"]["state"].as_str()
        ),
        (Some(300), Some("closed")),
        "the old stream's partition keeps its 300 events and is final: {s}"
    );
    wait_orders(
        &server,
        500,
        Duration::from_secs(30),
        "300 archived from the old stream + 200 of the new one",
    );
    let now = &s["stream_identity"]["identity"];
    assert!(
        now["created_ms"] != first["created_ms"] && s["stream_identity"]["generation"] == 2,
        "the new stream is recorded in place of the old: {s}"
    );
    server.stop();
    // Restarted, it stays exact.
    let server = site.serve(AWS_ENV);
    wait_orders(&server, 500, Duration::from_secs(30), "after a restart");
    server.stop();
}

#[test]
fn a_kinesis_stream_created_again_while_read_stops_its_partitions_with_what_to_do() {
    let k = Kinesalite::start();
    k.create_stream("events", 1);
    let site = Site::new(&kinesis_config(&k.endpoint, "events"));
    let server = site.serve(AWS_ENV);
    kinesis_put(&k, "events", &(0..100).map(make).collect::<Vec<_>>());
    wait_partition(&server, 0, 100, Duration::from_secs(60));

    recreate(&k, "events", 1);
    let t = Instant::now();
    let problem = loop {
        let s = server.status();
        let found = s["health"]["problems"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["component"] == "stream/p0")
            .map(|p| p["error"].as_str().unwrap().to_string());
        if let Some(p) = found
            && p.contains("accept-loss --stream")
        {
            break p;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "partition 0 must stop with a problem naming the fix: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        problem.contains("Kinesis stream `events`") && problem.contains("created again"),
        "the problem says what happened: {problem}"
    );
    // Records of the new stream are not read as the old partition's.
    // (kinesalite lets an iterator of the deleted stream read on in the new
    // one, which AWS does not: the records are put once the stop is seen.)
    kinesis_put(&k, "events", &(1000..1050).map(make).collect::<Vec<_>>());
    std::thread::sleep(Duration::from_secs(2));
    let s = server.status();
    assert_eq!(
        s["partitions"][0]["realtime"].as_u64(),
        Some(100),
        "nothing of the new stream is read as the old partition's: {s}"
    );
    assert_eq!(
        common::orders(&server.url),
        100,
        "the old stream's events stay counted"
    );
    server.stop();
}
