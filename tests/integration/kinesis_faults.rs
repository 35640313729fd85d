//! Kinesis as the service behaves, not as the emulator does: each test puts
//! the service-behaviour proxy (`common::kinesis_proxy`) between the node
//! and kinesalite, which then enforces the record limit, refuses records
//! one by one, expires shards, throttles and drops answers as AWS does.
//!
//! - a record over the limit is a bad line, refused before anything is
//!   sent; a body stored in part says exactly which lines are stored;
//! - a reshard whose parent has expired goes on reading, running and after
//!   a restart;
//! - HTTP ingest spreads a body over every shard;
//! - refused records are kept once across restarts;
//! - the oracle over Kinesis with faults injected at random (seeded).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::Client;
use lambdaflow::stream::kinesis::KinesisProducer;
use serde_json::Value;

use crate::common::kinesis_proxy::{Faults, KinesisProxy, Random};
use crate::common::{self, Site};
use crate::kinesis::{
    AWS_ENV, Kinesalite, Puts, client, positions, put, site_at, wait_active, wait_settled,
};
use crate::oracle::{self, Sent, make, ndjson};

/// Waits until the view counts `n` orders; returns the last count seen.
fn wait_orders(url: &str, n: u64, within: Duration) -> u64 {
    let t = Instant::now();
    loop {
        let got = common::orders(url);
        if got == n || t.elapsed() > within {
            return got;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `n` events of the paper's shape as NDJSON lines, numbered from `from`.
fn lines(from: i64, n: i64) -> Vec<String> {
    (from..from + n)
        .map(|i| {
            let body = ndjson(&[make(i)]);
            String::from_utf8(body).unwrap().trim_end().to_string()
        })
        .collect()
}

fn post(url: &str, lines: &[String]) -> (u16, Value) {
    let mut body = lines.join("\n").into_bytes();
    body.push(b'\n');
    common::post_events(url, body).expect("the node answers")
}

#[test]
fn a_line_over_the_record_limit_is_refused_before_anything_is_sent() {
    let k = Kinesalite::start();
    k.create_stream("events", 1);
    let proxy = KinesisProxy::start(&k.endpoint, Faults::default());
    let site = site_at(&proxy.endpoint, "events");
    let server = site.serve(AWS_ENV);
    // 600 lines; line 551 is a valid event of 1.2 MB (Kinesis takes 1 MiB).
    let mut body = lines(0, 600);
    body[550] = common::event(95126, &"x".repeat(1_200_000), 16, "2014-11-01 19:35:41.158");
    let (status, reply) = post(&server.url, &body);
    assert_eq!(
        (
            status,
            reply["accepted"].as_u64(),
            reply["rejected"].as_u64()
        ),
        (200, Some(599), Some(1)),
        "the 599 lines that fit are stored, the one over the limit refused as a bad line: {reply}"
    );
    assert_eq!(reply["errors"][0]["line"], 551, "{reply}");
    assert!(
        reply["errors"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("1 MiB per record")),
        "the reason names the stream's record limit: {reply}"
    );
    assert_eq!(
        wait_orders(&server.url, 599, Duration::from_secs(30)),
        599,
        "every stored line is counted once"
    );
    // Sent again (a client that resends on any doubt): no call fails, so
    // nothing is stored without the client knowing.
    let (status, reply) = post(&server.url, &body);
    assert_eq!((status, reply["accepted"].as_u64()), (200, Some(599)));
    assert_eq!(
        wait_orders(&server.url, 1198, Duration::from_secs(30)),
        1198
    );
    server.stop();
    let dead = lambdaflow::stream::DeadLetters::read_all(site.data.join("deadletter")).unwrap();
    assert_eq!(
        dead.len(),
        2,
        "the oversized line kept, once per request: {}",
        dead.len()
    );
}

#[test]
fn a_body_stored_in_part_says_which_lines_and_a_resend_of_those_is_exact() {
    let k = Kinesalite::start();
    k.create_stream("events", 1);
    let proxy = KinesisProxy::start(&k.endpoint, Faults::default());
    let site = site_at(&proxy.endpoint, "events");
    let server = site.serve(AWS_ENV);
    // The first PutRecords call (500 records) is stored; from the second
    // on, the shard refuses every record (over its write budget) for good.
    proxy.set(|f| f.refuse_puts_after = Some(1));
    let body = lines(0, 600);
    let (status, reply) = post(&server.url, &body);
    assert_eq!(
        (status, reply["accepted"].as_u64()),
        (207, Some(500)),
        "part stored: 207 with the stored count: {reply}"
    );
    let spans = reply["not_stored"].as_array().expect("not_stored lines");
    assert_eq!(
        (spans.len(), &spans[0]["first"], &spans[0]["last"]),
        (1, &Value::from(501), &Value::from(600)),
        "exactly lines 501–600 are not stored: {reply}"
    );
    assert!(
        spans[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("ProvisionedThroughputExceeded")),
        "with the service's reason: {reply}"
    );
    assert_eq!(wait_orders(&server.url, 500, Duration::from_secs(30)), 500);
    // Nothing stored at all: 503, safe to resend whole.
    let (status, reply) = post(&server.url, &lines(600, 10));
    assert_eq!(status, 503, "nothing stored is a 503: {reply}");
    // The budget is back: the lines not stored, sent again, complete it.
    proxy.set(|f| f.refuse_puts_after = None);
    let (status, reply) = post(&server.url, &body[500..]);
    assert_eq!(
        (status, reply["accepted"].as_u64()),
        (200, Some(100)),
        "{reply}"
    );
    assert_eq!(
        wait_orders(&server.url, 600, Duration::from_secs(30)),
        600,
        "each of the 600 events counted once"
    );
    server.stop();
}

#[test]
fn produce_over_http_resends_only_the_lines_not_stored() {
    let k = Kinesalite::start();
    k.create_stream("events", 1);
    let proxy = KinesisProxy::start(&k.endpoint, Faults::default());
    let site = site_at(&proxy.endpoint, "events");
    let server = site.serve(AWS_ENV);
    // A shard over its write budget for a while: the first body's first
    // call (500 records) is stored, its second call (100) refused for good
    // (207), then every call for a while (503); then the budget is back.
    proxy.set(|f| f.refuse_puts_after = Some(1));
    let clear = {
        let faults = proxy.faults.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(25));
            faults.lock().unwrap().refuse_puts_after = None;
        })
    };
    let out = std::process::Command::new(common::BIN)
        .args([
            "produce",
            "--url",
            &server.url,
            "--events",
            "1800",
            "--batch",
            "600",
            "--seed",
            "3",
        ])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    clear.join().unwrap();
    assert!(out.status.success(), "produce succeeds: {text}");
    assert!(
        proxy.counts.records_refused.load(Ordering::Relaxed) >= 100,
        "the proxy refused records"
    );
    assert_eq!(
        wait_orders(&server.url, 1800, Duration::from_secs(60)),
        1800,
        "1,800 events sent, 1,800 counted (nothing doubled by resends): {text}"
    );
    server.stop();
}

/// Splits `shard` at the middle of its hash range; returns the children.
fn split(c: &Client, stream: &str, shard: &str) -> Vec<String> {
    common::rt().block_on(async {
        let d = c.list_shards().stream_name(stream).send().await.unwrap();
        let s0 = d.shards().iter().find(|s| s.shard_id() == shard).unwrap();
        let range = s0.hash_key_range().unwrap();
        let lo: u128 = range.starting_hash_key().parse().unwrap();
        let hi: u128 = range.ending_hash_key().parse().unwrap();
        c.split_shard()
            .stream_name(stream)
            .shard_to_split(shard)
            .new_starting_hash_key((lo + (hi - lo) / 2).to_string())
            .send()
            .await
            .expect("split");
        wait_active(c, stream).await;
        let d = c.list_shards().stream_name(stream).send().await.unwrap();
        let mut children: Vec<_> = d
            .shards()
            .iter()
            .filter(|s| s.parent_shard_id() == Some(shard))
            .map(|s| {
                (
                    s.hash_key_range()
                        .unwrap()
                        .starting_hash_key()
                        .parse::<u128>()
                        .unwrap(),
                    s.shard_id().to_string(),
                )
            })
            .collect();
        children.sort();
        children.into_iter().map(|(_, id)| id).collect()
    })
}

fn merge(c: &Client, stream: &str, a: &str, b: &str) -> String {
    common::rt().block_on(async {
        c.merge_shards()
            .stream_name(stream)
            .shard_to_merge(a)
            .adjacent_shard_to_merge(b)
            .send()
            .await
            .expect("merge");
        wait_active(c, stream).await;
        let d = c.list_shards().stream_name(stream).send().await.unwrap();
        d.shards()
            .iter()
            .find(|s| s.parent_shard_id() == Some(a) || s.adjacent_parent_shard_id() == Some(a))
            .expect("the merged shard")
            .shard_id()
            .to_string()
    })
}

/// 1 shard → split (100 events) → the parent expires → the children
/// merged → 50 events into the merged shard. AWS leaves the expired parent
/// out of ListShards (the shard count stays 3), and answers
/// `ResourceNotFound` for it; every event is counted, running and after a
/// restart, and `status` notes the expiry.
#[test]
fn a_reshard_after_the_parent_expired_is_read_running_and_after_a_restart() {
    let k = Kinesalite::start();
    k.create_stream("events", 1);
    let proxy = KinesisProxy::start(&k.endpoint, Faults::default());
    let site = site_at(&proxy.endpoint, "events");
    let server = site.serve(AWS_ENV);
    let c = k.client();
    let producer = KinesisProducer::with_client(k.client(), "events");
    let parent = common::rt()
        .block_on(lambdaflow::stream::kinesis::list_shards(&c, "events"))
        .unwrap()[0]
        .shard
        .clone();
    let children = split(&c, "events", &parent);
    let mut puts: Puts = Vec::new();
    for r in 0..10 {
        let events: Vec<Sent> = (0..10).map(|i| make(r * 10 + i)).collect();
        puts.extend(put(&producer, &format!("k{r}"), &events, &[]));
    }
    assert_eq!(
        wait_orders(&server.url, 100, Duration::from_secs(30)),
        100,
        "the split's children are read"
    );
    // Past the stream's retention: the parent is gone from the list.
    proxy.set(|f| {
        f.expired.insert(parent.clone());
    });
    let merged = merge(&c, "events", &children[0], &children[1]);
    let events: Vec<Sent> = (100..150).map(make).collect();
    puts.extend(put(&producer, "k-merged", &events, &[]));
    assert!(
        puts.iter().filter(|p| p.0 == merged).count() == 50,
        "the last 50 went to the merged shard"
    );
    assert_eq!(
        wait_orders(&server.url, 150, Duration::from_secs(30)),
        150,
        "the merged shard is registered by its id and read: {}",
        server.status()
    );
    server.stop();

    // A restart a day later: the expired parent answers ResourceNotFound.
    let server = site.serve(AWS_ENV);
    assert_eq!(
        wait_orders(&server.url, 150, Duration::from_secs(30)),
        150,
        "after a restart every event is counted: {}",
        server.status()
    );
    let (known, counts) = positions(&site, "events", &puts);
    wait_settled(&server, &counts, Duration::from_secs(60));
    // The parent's partition was empty, so the counts settle before its
    // reader has asked for it: the note comes when it has.
    let t = Instant::now();
    loop {
        let status = server.status();
        if status.to_string().contains("has expired") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "status notes the expired shard within 30 s: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    oracle::assert_settled_exact(server, &site.data, &known, true);
}

/// HTTP ingest into a 4-shard stream: every shard takes a share (the
/// partition key's MD5 of "0".."3" would put everything on one).
#[test]
fn http_ingest_spreads_events_over_every_shard() {
    let k = Kinesalite::start();
    k.create_stream("events", 4);
    let site = site_at(&k.endpoint, "events");
    let server = site.serve(AWS_ENV);
    for r in 0..40 {
        let (status, reply) = post(&server.url, &lines(r * 50, 50));
        assert_eq!(status, 200, "{reply}");
    }
    assert_eq!(
        wait_orders(&server.url, 2000, Duration::from_secs(30)),
        2000
    );
    let status = server.status();
    let per_shard: Vec<u64> = status["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["realtime"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(per_shard.len(), 4, "{status}");
    assert!(
        per_shard.iter().all(|&n| n >= 250),
        "each of 4 shards takes at least an eighth of 2,000 events: {per_shard:?}"
    );
    server.stop();
}

/// Refused records (not events) are kept in the dead-letter store once,
/// however often the node restarts before a batch run covers them.
#[test]
fn refused_records_are_kept_once_across_restarts() {
    let k = Kinesalite::start();
    k.create_stream("events", 1);
    // Nothing archived: the restarts re-read every record.
    let site = Site::new(&format!(
        "[speed]\ninterval = \"10ms\"\n[archive]\nchunk_age = \"1h\"\n[batch]\npause = \"1h\"\n[stream]\nkinesis = {{ stream = \"events\", region = \"us-east-1\", endpoint = \"{}\", poll = \"200ms\" }}\n",
        k.endpoint
    ));
    let producer = KinesisProducer::with_client(k.client(), "events");
    let events: Vec<Sent> = (0..20).map(make).collect();
    put(
        &producer,
        "a",
        &events,
        &["not json", "{\"zipcode\": \"x\"}", "[]"],
    );
    for round in 0..3 {
        let server = site.serve(AWS_ENV);
        assert_eq!(
            wait_orders(&server.url, 20, Duration::from_secs(30)),
            20,
            "round {round}"
        );
        server.stop();
        let dead = lambdaflow::stream::DeadLetters::read_all(site.data.join("deadletter")).unwrap();
        assert_eq!(
            dead.len(),
            3,
            "after start {}: the 3 refused records kept once, not once per start",
            round + 1
        );
    }
}

/// The oracle over Kinesis with the service's faults injected at random
/// (seeded; `LAMBDAFLOW_FAULT_SEED` picks the seed): throttled and refused
/// records on PutRecords, throttled, expired-iterator, failing and dropped
/// reads. Every answer equals the view SQL over the events below its
/// positions, and every event acknowledged is stored once.
#[test]
fn the_oracle_over_kinesis_holds_with_the_services_faults_at_random() {
    let seed = common::fault_seed("LAMBDAFLOW_FAULT_SEED");
    let k = Kinesalite::start();
    k.create_stream("events", 2);
    let proxy = KinesisProxy::start(
        &k.endpoint,
        Faults {
            random: Some(Random::new(seed)),
            ..Faults::default()
        },
    );
    let site = site_at(&proxy.endpoint, "events");
    let server = site.serve(AWS_ENV);
    let url = server.url.clone();
    let puts: Arc<Mutex<Puts>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let answers: Arc<Mutex<Vec<oracle::Got>>> = Arc::default();
    let readers = oracle::view_readers(&url, &answers, &done);
    let producers: Vec<_> = (0..2i64)
        .map(|t| {
            let (puts, endpoint) = (puts.clone(), proxy.endpoint.clone());
            std::thread::spawn(move || {
                let producer = KinesisProducer::with_client(client(&endpoint), "events");
                for r in 0..40i64 {
                    let events: Vec<Sent> = (0..50).map(|i| make((r * 2 + t) * 50 + i)).collect();
                    let got = put(&producer, &format!("key-{t}-{}", r % 5), &events, &[]);
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
    assert_eq!(
        known.len(),
        2 * 40 * 50,
        "every event acknowledged (seed {seed})"
    );
    wait_settled(&server, &counts, Duration::from_secs(180));
    answers
        .lock()
        .unwrap()
        .extend(oracle::settled_answers(&server.url));
    done.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    let faults = proxy.counts.faults.load(Ordering::Relaxed);
    let refused = proxy.counts.records_refused.load(Ordering::Relaxed);
    // The faults are drawn per call, and the calls depend on timing: this
    // only checks that the proxy was in the path (a seed in CI drew 9
    // faulty calls of ≈ 100, against 16 expected).
    assert!(
        faults >= 3 && refused > 10,
        "the proxy injected faults (seed {seed}): {faults} calls, {refused} records"
    );
    let answers = answers.lock().unwrap().clone();
    let checked = oracle::verify_positions(&answers, &known, false);
    eprintln!(
        "seed {seed}: {faults} faulty calls, {refused} refused records, {checked} answers checked"
    );
    oracle::assert_settled_exact(server, &site.data, &known, true);
}

/// `produce --kinesis` into a stream that does not exist: every event
/// fails, and the headline says so (not "sent 1,000 events … events/s").
#[test]
fn produce_into_kinesis_that_fails_every_event_says_so() {
    let k = Kinesalite::start();
    let out = std::process::Command::new(common::BIN)
        .args([
            "produce",
            "--events",
            "1000",
            "--kinesis",
            "no-such-stream",
            "--region",
            "us-east-1",
            "--endpoint",
            &k.endpoint,
        ])
        .envs(AWS_ENV.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "produce fails: {stdout}");
    let headline = stdout.lines().next().unwrap_or_default();
    assert!(
        headline.starts_with("FAILED: 1,000 of 1,000 events not stored"),
        "the headline says nothing was stored: {stdout}"
    );
    assert!(stdout.contains("ResourceNotFound"), "and why: {stdout}");
}

/// A refused record the dead-letter store cannot take (its disk is full)
/// is not skipped: the shard waits, `status` says why, and once there is
/// room the record is kept and the shard reads on — nothing lost.
#[test]
fn a_refused_record_the_dead_letter_store_cannot_take_stops_its_shard_until_it_can() {
    let k = Kinesalite::start();
    k.create_stream("events", 1);
    let site = site_at(&k.endpoint, "events");
    let _disk = crate::faults::Tmpfs::mount(&site.data.join("deadletter"), "100m");
    let filler = site.data.join("deadletter").join("filler");
    crate::faults::fill(&filler);
    let server = site.serve(AWS_ENV);
    let producer = KinesisProducer::with_client(k.client(), "events");
    let events: Vec<Sent> = (0..20).map(make).collect();
    let mut puts = put(&producer, "a", &events, &["not json"]);
    let t = Instant::now();
    loop {
        let status = server.status();
        let problems = status["health"]["problems"].to_string();
        if problems.contains("dead-letter") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "status says the shard waits for the dead-letter store: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        common::orders(&server.url) < 20,
        "records past the one that cannot be kept are not read yet"
    );
    std::fs::remove_file(&filler).unwrap();
    puts.extend(put(
        &producer,
        "a",
        &(20..30).map(make).collect::<Vec<_>>(),
        &[],
    ));
    assert_eq!(
        wait_orders(&server.url, 30, Duration::from_secs(60)),
        30,
        "once there is room every event is counted"
    );
    let (known, counts) = positions(&site, "events", &puts);
    wait_settled(&server, &counts, Duration::from_secs(60));
    server.stop();
    let dead = lambdaflow::stream::DeadLetters::read_all(site.data.join("deadletter")).unwrap();
    assert_eq!(dead.len(), 1, "the refused record kept once");
    oracle::assert_master_holds(&site.data, &known);
}

/// A view added while events flow on Kinesis: its realtime states start at
/// its own run's H, above which the node must still hold every record —
/// records are released at a publish, not at a commit. The build is never
/// refused for a record "not on this node any more", and answers stay exact.
#[test]
fn a_view_added_while_events_flow_on_kinesis_is_built_first_time() {
    let k = Kinesalite::start();
    k.create_stream("events", 2);
    let site = site_at(&k.endpoint, "events");
    let server = site.serve(AWS_ENV);
    let url = server.url.clone();
    let puts: Arc<Mutex<Puts>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (puts, stop, endpoint) = (puts.clone(), stop.clone(), k.endpoint.clone());
        std::thread::spawn(move || {
            let producer = KinesisProducer::with_client(client(&endpoint), "events");
            let mut r = 0i64;
            while !stop.load(Ordering::Relaxed) && r < 400 {
                let events: Vec<Sent> = (0..100).map(|i| make(r * 100 + i)).collect();
                puts.lock()
                    .unwrap()
                    .extend(put(&producer, &format!("k{}", r % 7), &events, &[]));
                r += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let watch = {
        let (url, stop) = (url.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let s = common::get_json(&format!("{url}/v1/status"));
                let text = s["health"].to_string() + &s["view_changes"].to_string();
                if text.contains("any more on this node") {
                    seen.push(text);
                }
                std::thread::sleep(Duration::from_millis(30));
            }
            seen
        })
    };
    let (status, added) = crate::live_views::request(
        "POST",
        &format!("{url}/v1/views"),
        Some(serde_json::json!({"name": "by_price_band", "sql": crate::live_views::ADDED})),
    );
    assert_eq!(status, 202, "{added}");
    crate::live_views::wait_published(&url, Duration::from_secs(90));
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    producer.join().unwrap();
    let refusals = watch.join().unwrap();
    assert!(
        refusals.is_empty(),
        "the build never lacks a record above its H: {:?}",
        refusals.first()
    );
    let puts = puts.lock().unwrap().clone();
    let (known, counts) = positions(&site, "events", &puts);
    wait_settled(&server, &counts, Duration::from_secs(120));
    oracle::assert_settled_exact(server, &site.data, &known, true);
}

/// PutRecords stored, its answer lost (a timeout after the write): the
/// node does not send the call again behind the client's back (the SDK's
/// own retries would store each record up to three times and call it
/// stored once). The reply says the lines are in doubt, and the stream
/// holds each record once.
#[test]
fn a_put_whose_answer_was_lost_is_in_doubt_and_stored_once() {
    let k = Kinesalite::start();
    k.create_stream("events", 1);
    let proxy = KinesisProxy::start(&k.endpoint, Faults::default());
    let site = site_at(&proxy.endpoint, "events");
    let server = site.serve(AWS_ENV);
    proxy.set(|f| f.drop_put_answers = true);
    let (status, reply) = post(&server.url, &lines(0, 10));
    assert_eq!(status, 503, "nothing confirmed stored: {reply}");
    let doubt = &reply["report"]["in_doubt"];
    assert_eq!(
        (&doubt[0]["first"], &doubt[0]["last"]),
        (&Value::from(1), &Value::from(10)),
        "the reply names the lines in doubt: {reply}"
    );
    proxy.set(|f| f.drop_put_answers = false);
    // The one call that reached the stream stored each record once.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        wait_orders(&server.url, 10, Duration::from_secs(30)),
        10,
        "each record in the stream once, not once per retry"
    );
    server.stop();
}
