//! Event keys end to end (issue 34, item 2): a producer that sends some
//! events again — whole requests, single lines, changed bodies under the
//! same key — and a server killed and restarted, its key index deleted;
//! every answer, realtime and batch, counts each key's first occurrence
//! once, and the master dataset keeps every event, its duplicates marked.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{Server, Site, get_json, post_events};

const CONFIG: &str = r#"
[schema]
event_time = "timestamp"
key = { field = "id", within = "1h" }
fields = [
  { name = "id",          type = "utf8" },
  { name = "ProductName", type = "utf8" },
  { name = "price",       type = "int64" },
  { name = "timestamp",   type = "timestamp_ms", format = "epoch_ms" },
]

[archive]
chunk_events = 300
chunk_age = "500ms"

[batch]
pause = "300ms"

[[views]]
name = "sales"
sql = "SELECT ProductName, count(*) AS orders, sum(price) AS revenue FROM events GROUP BY ProductName"
"#;

/// The embedded log's stream section.
const EMBEDDED: &str = "[stream]\npartitions = 2\n";

/// One event as sent.
#[derive(Debug, Clone)]
struct Sent {
    id: String,
    product: String,
    price: i64,
}

impl Sent {
    fn line(&self) -> String {
        format!(
            r#"{{"id":"{}","ProductName":"{}","price":{},"timestamp":1700000000000}}"#,
            self.id, self.product, self.price
        )
    }
}

/// A producer that keeps what it sent, in order, and what the view should say.
#[derive(Default)]
struct Producer {
    sent: Vec<Sent>,
}

impl Producer {
    fn post(&mut self, url: &str, events: &[Sent]) {
        let body: String = events.iter().map(|e| e.line() + "\n").collect();
        let (status, reply) = post_events(url, body.into_bytes()).unwrap();
        assert_eq!(status, 200, "a request of good events is stored: {reply}");
        assert_eq!(
            reply["accepted"].as_u64(),
            Some(events.len() as u64),
            "{reply}"
        );
        self.sent.extend(events.iter().cloned());
    }

    /// Per product, (orders, revenue) over each key's first occurrence.
    fn expected(&self) -> BTreeMap<String, (u64, i64)> {
        let mut first: HashMap<&str, &Sent> = HashMap::new();
        for e in &self.sent {
            first.entry(&e.id).or_insert(e);
        }
        let mut out = BTreeMap::new();
        for e in first.values() {
            let r = out.entry(e.product.clone()).or_insert((0, 0));
            r.0 += 1;
            r.1 += e.price;
        }
        out
    }
}

/// The view's rows, once its answer covers `events` records (duplicates
/// included: they have offsets too).
fn answer_covering(url: &str, events: u64) -> (BTreeMap<String, (u64, i64)>, Value) {
    let t = Instant::now();
    loop {
        let a = get_json(&format!("{url}/v1/views/sales"));
        let covered: u64 = a["freshness"]["realtime"]
            .as_array()
            .expect("freshness.realtime")
            .iter()
            .map(|x| x.as_u64().unwrap())
            .sum();
        if covered >= events {
            assert_eq!(covered, events, "no more events than were sent: {a}");
            let rows = a["rows"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        r["ProductName"].as_str().unwrap().to_string(),
                        (
                            r["orders"].as_u64().unwrap(),
                            r["revenue"].as_i64().unwrap(),
                        ),
                    )
                })
                .collect();
            return (rows, a);
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the answer never covered the {events} events sent: {a}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A deterministic mix: new events, 10 % sent again (single lines, and
/// every fifth round a whole earlier request), some again with another
/// price under the same key (the first occurrence counts).
fn round(r: usize, producer: &Producer, requests: &mut Vec<Vec<Sent>>) -> Vec<Sent> {
    let mut out: Vec<Sent> = (0..90)
        .map(|i| Sent {
            id: format!("e{r}-{i}"),
            product: format!("product{}", (r * 7 + i) % 5),
            price: ((r * 13 + i) % 50) as i64 + 1,
        })
        .collect();
    if !producer.sent.is_empty() {
        for i in 0..10 {
            let mut again = producer.sent[(r * 31 + i * 17) % producer.sent.len()].clone();
            if i % 3 == 0 {
                again.price += 1000; // changed body, same key: a duplicate all the same
            }
            out.push(again);
        }
    }
    requests.push(out.clone());
    if r % 5 == 4 {
        // A whole earlier request, re-sent as an at-least-once producer does.
        out.extend(requests[r / 2].iter().cloned());
    }
    out
}

fn check(server: &Server, producer: &Producer, when: &str) {
    let (rows, a) = answer_covering(&server.url, producer.sent.len() as u64);
    assert_eq!(
        rows,
        producer.expected(),
        "{when}: the view must count each key's first occurrence once: {a}"
    );
}

#[test]
fn duplicates_are_counted_by_no_view_through_restarts_and_a_lost_index() {
    let site = Site::new(&format!("{CONFIG}{EMBEDDED}"));
    let (all, marked, dups) = run_with_duplicates(&site);
    assert_eq!(all, marked.0, "every event sent is in the master dataset");
    assert_eq!(
        marked.1, dups,
        "exactly the later occurrences of a key are marked `_duplicate`"
    );
}

/// The same over Kafka (tansu): lambdaflow's HTTP ingest keys the records
/// by the event key, so a key's duplicates share its partition.
#[test]
fn over_kafka_duplicates_are_counted_by_no_view() {
    let tansu = crate::kafka::Tansu::start();
    tansu.create_topic("events", 2);
    let site = Site::new(&format!(
        "{CONFIG}[stream]\nkafka = {{ brokers = \"{}\", topic = \"events\" }}\n",
        tansu.brokers
    ));
    let (all, marked, dups) = run_with_duplicates(&site);
    assert_eq!(
        (all, marked.1),
        (marked.0, dups),
        "every event kept, exactly the duplicates marked"
    );
}

/// The same over Kinesis (kinesalite).
#[test]
fn over_kinesis_duplicates_are_counted_by_no_view() {
    let k = crate::kinesis::Kinesalite::start();
    k.create_stream("events", 2);
    let mut site = Site::new(&format!(
        "{CONFIG}[stream]\nkinesis = {{ stream = \"events\", region = \"us-east-1\", endpoint = \"{}\", poll = \"200ms\" }}\n",
        k.endpoint
    ));
    site.env = crate::kinesis::AWS_ENV
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let (all, marked, dups) = run_with_duplicates(&site);
    assert_eq!(
        (all, marked.1),
        (marked.0, dups),
        "every event kept, exactly the duplicates marked"
    );
}

/// Sends rounds with duplicates through kills, restarts and a lost index,
/// checking every answer; the events sent, the master dataset's (rows,
/// marked duplicates), and the duplicates sent.
fn run_with_duplicates(site: &Site) -> (usize, (usize, usize), usize) {
    let mut producer = Producer::default();
    let mut requests = Vec::new();
    let mut server = site.serve(&[]);
    for r in 0..6 {
        let events = round(r, &producer, &mut requests);
        producer.post(&server.url, &events);
    }
    check(&server, &producer, "realtime, first run");
    server.wait_settled(Duration::from_secs(60));
    check(&server, &producer, "batch, first run");

    // kill -9 mid-stream, then duplicates of events from before the kill.
    for r in 6..9 {
        let events = round(r, &producer, &mut requests);
        producer.post(&server.url, &events);
    }
    drop(server);
    server = site.serve(&[]);
    for r in 9..12 {
        let events = round(r, &producer, &mut requests);
        producer.post(&server.url, &events);
    }
    check(&server, &producer, "after a kill -9 and restart");

    // The index is a cache: deleted, it is rebuilt from the master dataset.
    server.wait_settled(Duration::from_secs(60));
    drop(server);
    std::fs::remove_dir_all(site.data.join("keys"))
        .expect("the node keeps its key index under keys/");
    server = site.serve(&[]);
    for r in 12..15 {
        let events = round(r, &producer, &mut requests);
        producer.post(&server.url, &events);
    }
    check(&server, &producer, "realtime, after the index was rebuilt");

    // Deleted under a running node: a run it cannot read is rebuilt too.
    server.wait_settled(Duration::from_secs(60));
    // The node may write a run between the listing and the removal: the
    // directory is then not empty yet, and the removal goes again.
    let mut tries = 0;
    while let Err(e) = std::fs::remove_dir_all(site.data.join("keys")) {
        tries += 1;
        assert!(
            tries < 50 && e.kind() == std::io::ErrorKind::DirectoryNotEmpty,
            "cannot delete the key index: {e}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for r in 15..18 {
        let events = round(r, &producer, &mut requests);
        producer.post(&server.url, &events);
    }
    check(
        &server,
        &producer,
        "realtime, the index deleted while serving",
    );
    server.wait_settled(Duration::from_secs(60));
    check(&server, &producer, "batch, at the end");

    // The master dataset keeps everything that arrived and marks the duplicates.
    let dups: usize = producer.sent.len() - {
        let mut ids: Vec<&str> = producer.sent.iter().map(|e| e.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    };
    assert!(dups > 100, "the run sent duplicates ({dups})");
    (producer.sent.len(), master_duplicates(&site.data), dups)
}

/// Rows of the master dataset, and how many are marked duplicates.
pub(crate) fn master_duplicates(data: &std::path::Path) -> (usize, usize) {
    use arrow::array::AsArray;
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let uris: Vec<String> = crate::common::rt().block_on(async {
        let url = deltalake::ensure_table_uri(data.join("master").to_str().unwrap()).unwrap();
        let table = deltalake::open_table(url).await.unwrap();
        table.get_file_uris().unwrap().collect()
    });
    let (mut all, mut marked) = (0, 0);
    for uri in uris {
        let path = url::Url::parse(&uri)
            .ok()
            .and_then(|u| u.to_file_path().ok())
            .unwrap_or_else(|| uri.clone().into());
        let bytes = bytes::Bytes::from(std::fs::read(path).unwrap());
        for b in ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap()
            .build()
            .unwrap()
        {
            let b = b.unwrap();
            all += b.num_rows();
            let d = b
                .column_by_name("_duplicate")
                .expect("a keyed master dataset has `_duplicate`")
                .as_boolean();
            marked += d.true_count();
        }
    }
    (all, marked)
}

/// A key seen again after the horizon counts again; seen again within it, not.
#[test]
fn a_key_counts_again_once_the_horizon_has_passed() {
    let site = Site::new(&format!(
        "{}{EMBEDDED}",
        CONFIG.replace("within = \"1h\"", "within = \"2s\"")
    ));
    let server = site.serve(&[]);
    let mut producer = Producer::default();
    let a = Sent {
        id: "a".into(),
        product: "p".into(),
        price: 1,
    };
    producer.post(&server.url, std::slice::from_ref(&a));
    producer.post(&server.url, std::slice::from_ref(&a));
    std::thread::sleep(Duration::from_millis(2_600));
    producer.post(&server.url, std::slice::from_ref(&a));
    producer.post(&server.url, std::slice::from_ref(&a));
    let want: BTreeMap<String, (u64, i64)> = [("p".to_string(), (2, 2))].into();
    let (rows, answer) = answer_covering(&server.url, 4);
    assert_eq!(
        rows, want,
        "within 2 s a key counts once; 2.6 s later it counts again: {answer}"
    );
    server.wait_settled(Duration::from_secs(60));
    let (rows, answer) = answer_covering(&server.url, 4);
    assert_eq!(
        rows, want,
        "the batch layer decides as the speed layer did: {answer}"
    );
    let status = server.status();
    let found: u64 = status["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p["keys"]["duplicates"]
                .as_u64()
                .expect("each partition reports its duplicates")
        })
        .sum();
    assert_eq!(found, 2, "status counts the 2 duplicates found: {status}");
    let metrics = crate::common::get_text(&format!("{}/metrics", server.url));
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("lambdaflow_duplicates_found_total{") && l.ends_with(" 2")),
        "/metrics counts them per partition: {}",
        metrics
            .lines()
            .filter(|l| l.contains("duplicates"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// An event without its key is refused with the line and the reason; a
/// key that may be null is refused at startup.
#[test]
fn an_event_without_its_key_is_refused_and_a_nullable_key_is_a_config_error() {
    let site = Site::new(&format!("{CONFIG}{EMBEDDED}"));
    let server = site.serve(&[]);
    let body = "{\"ProductName\":\"p\",\"price\":1,\"timestamp\":1700000000000}\n".to_string()
        + "{\"id\":null,\"ProductName\":\"p\",\"price\":1,\"timestamp\":1700000000000}\n";
    let (status, reply) = post_events(&server.url, body.into_bytes()).unwrap();
    assert_eq!(reply["accepted"].as_u64(), Some(0), "{status}: {reply}");
    let errors = reply["errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 2, "both lines refused: {reply}");
    assert!(
        errors
            .iter()
            .all(|e| e["field"] == "id" && e["message"].as_str().is_some()),
        "each refusal names the key field and why: {reply}"
    );
    drop(server);

    let bad = Site::new(&format!(
        "{}{EMBEDDED}",
        CONFIG.replace(
            "{ name = \"id\",          type = \"utf8\" }",
            "{ name = \"id\",          type = \"utf8\", nullable = true }",
        )
    ));
    let out = std::process::Command::new(crate::common::BIN)
        .args(["serve", "--config"])
        .arg(&bad.config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a nullable key is refused");
    assert!(
        err.contains("schema.key.field") && err.contains("null"),
        "the error names the key and why: {err}"
    );
}

/// A node's view answer once it has consumed everything its stream holds
/// (the stream's end unchanged for a second): the number of records, and
/// the rows.
fn answer_at_end(url: &str) -> (u64, BTreeMap<String, (u64, i64)>) {
    let t = Instant::now();
    let mut last = (u64::MAX, Instant::now());
    loop {
        let s = crate::common::get_json(&format!("{url}/v1/status"));
        let parts = s["partitions"].as_array().cloned().unwrap_or_default();
        let end: u64 = parts
            .iter()
            .map(|p| p["stream_end"].as_u64().unwrap_or(0))
            .sum();
        let consumed = parts.iter().all(|p| p["realtime"] == p["stream_end"]);
        if end != last.0 {
            last = (end, Instant::now());
        } else if consumed && last.1.elapsed() > Duration::from_secs(1) {
            return (end, answer_covering(url, end).0);
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "{url} never consumed its stream: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// On a cluster (Kafka, an S3 root, two nodes): a request sent to the
/// driver, which is killed as it answers, is sent again to the other node;
/// whatever the first attempt stored is a duplicate of the retry, and both
/// nodes' answers, realtime and batch, count each key once.
#[test]
fn on_a_cluster_a_retry_at_another_node_after_a_kill_counts_once() {
    let moto = crate::s3::Moto::start();
    let root = moto.bucket("keys");
    let tansu = crate::kafka::Tansu::start();
    tansu.create_topic("events", 2);
    let config = format!(
        "{}[stream]\nkafka = {{ brokers = \"{}\", topic = \"events\" }}\n",
        CONFIG.replace(
            "pause = \"300ms\"\n",
            "pause = \"300ms\"\nlease = \"2s\"\npoll = \"200ms\"\n"
        ),
        tansu.brokers
    );
    let sites: Vec<Site> = (0..2).map(|_| moto.site(&root, &config)).collect();
    let a = sites[0].serve(&[]);
    let t = Instant::now();
    while a.status()["cluster"]["lease"]["held"] != true {
        assert!(t.elapsed() < Duration::from_secs(15), "A takes the lease");
        std::thread::sleep(Duration::from_millis(50));
    }
    let b = sites[1].serve(&[]);
    let mut producer = Producer::default();
    let mut requests = Vec::new();
    for r in 0..4 {
        let events = round(r, &producer, &mut requests);
        producer.post(if r % 2 == 0 { &a.url } else { &b.url }, &events);
    }
    // The driver dies while it answers a request; the retry goes to B.
    let events = round(4, &producer, &mut requests);
    let body: String = events.iter().map(|e| e.line() + "\n").collect();
    let url = a.url.clone();
    let first = std::thread::spawn(move || crate::common::post_events(&url, body.into_bytes()));
    std::thread::sleep(Duration::from_millis(5));
    drop(a);
    let _ = first.join();
    producer.post(&b.url, &events);
    for r in 5..8 {
        let events = round(r, &producer, &mut requests);
        producer.post(&b.url, &events);
    }
    let a = sites[0].serve(&[]);
    for r in 8..10 {
        let events = round(r, &producer, &mut requests);
        producer.post(&a.url, &events);
    }
    let want = producer.expected();
    for (name, node) in [("A", &a), ("B", &b)] {
        let (records, rows) = answer_at_end(&node.url);
        assert!(records >= producer.sent.len() as u64);
        assert_eq!(rows, want, "node {name}, realtime: each key counted once");
    }
    b.wait_settled(Duration::from_secs(90));
    a.wait_settled(Duration::from_secs(90));
    for (name, node) in [("A", &a), ("B", &b)] {
        let (_, rows) = answer_at_end(&node.url);
        assert_eq!(rows, want, "node {name}, batch: each key counted once");
    }
    // The master dataset: every record, the later occurrences marked.
    let storage = moto.storage(&root);
    let (rows, marked) = crate::common::rt().block_on(async {
        use arrow::array::AsArray;
        use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let schema = lambdaflow::config::Config::parse(&config)
            .unwrap()
            .event_schema()
            .unwrap();
        let master =
            lambdaflow::master::MasterDataset::open(&storage, std::sync::Arc::new(schema), 2)
                .await
                .unwrap();
        let (mut rows, mut marked) = (0usize, 0usize);
        for f in master.snapshot().await.unwrap().files {
            let bytes = storage.read_at(&f.location).await.unwrap();
            for b in ParquetRecordBatchReaderBuilder::try_new(bytes)
                .unwrap()
                .build()
                .unwrap()
            {
                let b = b.unwrap();
                rows += b.num_rows();
                marked += b
                    .column_by_name("_duplicate")
                    .unwrap()
                    .as_boolean()
                    .true_count();
            }
        }
        (rows, marked)
    });
    let unique: usize = want.values().map(|(n, _)| *n as usize).sum();
    assert_eq!(
        rows - marked,
        unique,
        "of {rows} records in the master dataset, all but the first occurrences are marked"
    );
}

/// With the batch layer on a Ballista cluster, its runs leave the
/// duplicates out as the local engine's do.
#[cfg(feature = "ballista")]
#[test]
fn a_ballista_batch_layer_leaves_the_duplicates_out() {
    let cluster = crate::ballista::Cluster::start(2);
    let site = Site::new(&format!(
        "{}{EMBEDDED}",
        CONFIG.replace(
            "pause = \"300ms\"\n",
            &format!(
                "pause = \"300ms\"\nengine = \"ballista\"\nscheduler = \"{}\"\n",
                cluster.url
            )
        )
    ));
    let server = site.serve(&[]);
    let mut producer = Producer::default();
    let mut requests = Vec::new();
    for r in 0..6 {
        let events = round(r, &producer, &mut requests);
        producer.post(&server.url, &events);
    }
    server.wait_settled(Duration::from_secs(90));
    check(&server, &producer, "batch on Ballista");
    let current: Value =
        serde_json::from_slice(&std::fs::read(site.data.join("views/CURRENT")).unwrap()).unwrap();
    assert_eq!(
        current["compute"]["engine"], "ballista",
        "the published run was computed by the cluster: {current}"
    );
}

/// The key rule changed (turned on, turned off) while chunks are archived
/// but not yet in a published run: the realtime answer over them keeps the
/// decisions the master dataset recorded, so the answer for the same
/// offsets does not change when the batch layer publishes them.
#[test]
fn a_changed_key_rule_does_not_change_an_answer_at_the_next_publish() {
    for (before, after) in [(true, false), (false, true)] {
        let config = |keyed: bool| {
            let c = CONFIG.replace("pause = \"300ms\"", "pause = \"1h\"");
            let c = if keyed {
                c
            } else {
                c.replace("key = { field = \"id\", within = \"1h\" }\n", "")
            };
            format!("{c}{EMBEDDED}")
        };
        let site = Site::new(&config(before));
        let server = site.serve(&[]);
        let mut producer = Producer::default();
        let mut requests = Vec::new();
        for r in 0..4 {
            let events = round(r, &producer, &mut requests);
            producer.post(&server.url, &events);
        }
        // Archived, not published.
        let t = Instant::now();
        loop {
            let s = server.status();
            let parts = s["partitions"].as_array().unwrap().clone();
            if parts.iter().all(|p| p["archived"] == p["end"]) {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "archived: {s}");
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(server);
        std::fs::write(&site.config, {
            let text = std::fs::read_to_string(&site.config).unwrap();
            let data_line = text.lines().take(2).collect::<Vec<_>>().join("\n");
            format!("{data_line}\n{}", config(after))
        })
        .unwrap();
        let server = site.serve(&[]);
        let records = producer.sent.len() as u64;
        let (at_first, a) = answer_covering(&server.url, records);
        crate::common::post_events(&server.url, Vec::new()).ok();
        let _ = crate::common::rt().block_on(
            reqwest::Client::new()
                .post(format!("{}/v1/batch/run", server.url))
                .send(),
        );
        server.wait_settled(Duration::from_secs(60));
        let (published, b) = answer_covering(&server.url, records);
        assert_eq!(
            published, at_first,
            "key {before} → {after}: the answer over the same offsets changed at the publish: before {a}, after {b}"
        );
        let want = if before {
            producer.expected()
        } else {
            let mut all = BTreeMap::new();
            for e in &producer.sent {
                let r = all.entry(e.product.clone()).or_insert((0u64, 0i64));
                r.0 += 1;
                r.1 += e.price;
            }
            all
        };
        assert_eq!(
            published, want,
            "key {before} → {after}: the events archived keep the decisions made when they were archived"
        );
    }
}

/// The key index is a cache of one master dataset: an index directory
/// copied from another dataset made with the same config (a node's local
/// directory reused for a new storage root, a restore from the wrong
/// backup) is rebuilt, not trusted — its keys are not this dataset's.
#[test]
fn an_index_copied_from_another_dataset_is_rebuilt_not_trusted() {
    let config = format!("{CONFIG}{EMBEDDED}");
    let (a, b) = (Site::new(&config), Site::new(&config));
    let batch = |prefix: &str| -> Vec<Sent> {
        (0..400)
            .map(|i| Sent {
                id: format!("{prefix}{i}"),
                product: format!("product{}", i % 4),
                price: 1 + i % 7,
            })
            .collect()
    };
    // Dataset A has keys a0..a399; dataset B the same number of others, so
    // both indexes stand at the same offsets.
    let mut in_a = Producer::default();
    let server = a.serve(&[]);
    in_a.post(&server.url, &batch("a"));
    server.wait_settled(Duration::from_secs(60));
    wait_index_on_disk(&server);
    server.stop();
    // B has twice as many (others): its coverage is past A's index's edge.
    let mut in_b = Producer::default();
    let server = b.serve(&[]);
    in_b.post(&server.url, &batch("b"));
    in_b.post(&server.url, &batch("c"));
    server.wait_settled(Duration::from_secs(60));
    server.stop();

    // B's node gets A's index (its secret too).
    std::fs::remove_dir_all(b.data.join("keys")).unwrap();
    copy_dir(&a.data.join("keys"), &b.data.join("keys"));
    let server = b.serve(&[]);
    // A's keys are new to B: each counts.
    in_b.post(&server.url, &batch("a"));
    let (rows, answer) = answer_covering(&server.url, 1200);
    assert_eq!(
        rows,
        in_b.expected(),
        "B counts A's keys once each: an index of another dataset is not B's: {answer}"
    );
    server.stop();
}

/// Waits until every partition's index has its keys in runs on disk.
fn wait_index_on_disk(server: &Server) {
    let t = Instant::now();
    loop {
        let s = server.status();
        let parts = s["partitions"].as_array().cloned().unwrap_or_default();
        if !parts.is_empty()
            && parts
                .iter()
                .all(|p| p["keys"]["index"]["runs"].as_u64().unwrap_or(0) > 0)
        {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the index never wrote its runs: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// The key index holds every key above the published batch in memory (its
/// tail): that memory counts against `max_realtime_memory`, so a batch
/// layer that does not publish slows keyed ingest down (503) instead of
/// filling the node's memory.
#[test]
fn the_key_index_tail_counts_against_the_realtime_memory_bound() {
    let site = Site::new(&format!(
        "{}{EMBEDDED}[ingest]\nmax_realtime_memory = \"1MiB\"\n",
        // One open chunk per partition: the states stay a few KiB.
        CONFIG
            .replace("pause = \"300ms\"", "pause = \"1h\"")
            .replace("chunk_events = 300", "chunk_events = 1000000")
            .replace("chunk_age = \"500ms\"", "chunk_age = \"1h\"")
    ));
    let server = site.serve(&[]);
    let mut sent = 0u64;
    let mut refused = None;
    for r in 0..100 {
        let events: Vec<Sent> = (0..1000)
            .map(|i| Sent {
                id: format!("k{r}-{i}"),
                product: format!("product{}", i % 3),
                price: 1,
            })
            .collect();
        let body: String = events.iter().map(|e| e.line() + "\n").collect();
        let (status, reply) = post_events(&server.url, body.into_bytes()).unwrap();
        if status == 503 {
            refused = Some(reply);
            break;
        }
        assert_eq!(status, 200, "{reply}");
        sent += 1000;
        // Let the speed layer measure the window.
        std::thread::sleep(Duration::from_millis(60));
    }
    let reply = refused.unwrap_or_else(|| {
        panic!("100,000 keys above an unpublished batch (three groups' states) were all accepted under a 1 MiB bound")
    });
    assert!(
        (10_000..=40_000).contains(&sent),
        "refused once the keys' memory passed 1 MiB (~72 bytes a key), not before or long after: {sent} accepted"
    );
    assert!(
        reply["error"]
            .as_str()
            .is_some_and(|e| e.contains("realtime window is full") && e.contains("key index")),
        "the refusal says why: {reply}"
    );
    server.stop();
}
