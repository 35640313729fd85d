//! Fencing for the embedded log on a shared S3 root (issue 32, item 1): two
//! nodes, each with its own log, one root on moto. Node A acknowledges
//! events it has not archived yet, then is paused (`kill -STOP`) or cut off
//! from S3 for longer than the lease, while node B starts. Whatever happens,
//! every event any node acknowledged ends up in the Delta table exactly
//! once, and A's health says what happened.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::s3_proxy::{Fault, Matcher, S3Proxy};
use crate::common::{self, Server, Site};
use crate::oracle::{make, ndjson};
use crate::s3::Moto;

/// A lease of 2 s; chunks that stay open for seconds, so A's events are
/// acknowledged and not archived when it stops.
const CONFIG: &str = "[speed]\ninterval = \"10ms\"\n[archive]\nchunk_events = 200\nchunk_age = \"6s\"\n[batch]\npause = \"250ms\"\nlease = \"2s\"\npoll = \"200ms\"\n";

/// What the test sent and how each request was answered.
#[derive(Default)]
struct Sent {
    next: i64,
    /// zipcode → the node that acknowledged it.
    acked: BTreeMap<i64, &'static str>,
    /// (node, status, reply) of every request not acknowledged.
    refused: Vec<(&'static str, u16, String)>,
}

impl Sent {
    /// Sends `requests` requests of 50 events to `url`.
    fn send(&mut self, node: &'static str, url: &str, requests: usize) {
        for _ in 0..requests {
            let events: Vec<_> = (0..50).map(|i| make(self.next + i)).collect();
            self.next += 50;
            match common::post_events(url, ndjson(&events)) {
                Ok((200, _)) => {
                    for e in &events {
                        self.acked.insert(e.zipcode, node);
                    }
                }
                Ok((status, reply)) => self.refused.push((node, status, reply.to_string())),
                Err(e) => self.refused.push((node, 0, e)),
            }
        }
    }

    fn acked_by(&self, node: &str) -> usize {
        self.acked.values().filter(|n| **n == node).count()
    }
}

/// Waits until the driver lease record's marks add up to `events` (its
/// holder's log ends, with no headroom for acknowledgements to come).
fn wait_marks_at(moto: &Moto, root: &str, events: u64) {
    let storage = moto.storage(root);
    let t = Instant::now();
    loop {
        let record = common::rt()
            .block_on(storage.get(lambdaflow::cluster::lease::LEASE))
            .unwrap()
            .map(|b| serde_json::from_slice::<Value>(&b).unwrap());
        let marks: u64 = record
            .as_ref()
            .and_then(|r| r["acked"].as_array())
            .map_or(u64::MAX, |a| a.iter().filter_map(Value::as_u64).sum());
        if marks == events {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "a quiet renewal brings the lease's marks back to the log's ends ({events} events): {record:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn signal(server: &Server, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

fn wait_driving(server: &Server) {
    let t = Instant::now();
    while server.status()["cluster"]["lease"]["held"] != true {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "node A takes the driver lease of a new root"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts B on the root; `None` when it refused to start (its log in `log`).
fn start_b(site: &Site, log: &std::path::Path) -> Option<Server> {
    site.try_serve(
        &[("RUST_LOG", "warn")],
        Stdio::from(std::fs::File::create(log).unwrap()),
    )
    .ok()
}

/// Waits until every acknowledged event is in the master dataset, then
/// checks each is there exactly once (a (partition, offset) twice fails in
/// `master_events_in`).
fn assert_every_ack_archived_once(moto: &Moto, root: &str, sent: &Sent) {
    let storage = moto.storage(root);
    let t = Instant::now();
    loop {
        let (rows, _) = common::master_events_in(&storage, 2);
        let mut count: BTreeMap<i64, usize> = BTreeMap::new();
        for z in rows.values() {
            *count.entry(*z).or_default() += 1;
        }
        let missing: Vec<_> = sent
            .acked
            .iter()
            .filter(|(z, _)| !count.contains_key(z))
            .collect();
        let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
        assert!(
            twice.is_empty(),
            "an event is in the master dataset once: {twice:?}"
        );
        if missing.is_empty() {
            let foreign: Vec<_> = count
                .keys()
                .filter(|z| !sent.acked.contains_key(z))
                .collect();
            // A refused request stored nothing: it is not in the table either.
            assert!(
                foreign.is_empty(),
                "only acknowledged events are in the master dataset; also found {foreign:?} (refused: {:?})",
                sent.refused
            );
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "every acknowledged event reaches the master dataset: {} of {} missing ({} of A's, {} of B's), e.g. {:?}; the table holds {} rows",
            missing.len(),
            sent.acked.len(),
            missing.iter().filter(|(_, n)| **n == "A").count(),
            missing.iter().filter(|(_, n)| **n == "B").count(),
            missing.first(),
            rows.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A's health: its problems and repairs about the lease.
fn lease_health(server: &Server) -> Vec<String> {
    let s: Value = server.status();
    let h = &s["health"];
    let mut out = Vec::new();
    for kind in ["problems", "recovered"] {
        for p in h[kind].as_array().into_iter().flatten() {
            if p["component"].as_str().unwrap_or("").starts_with("lease") {
                out.push(format!(
                    "{kind}: {}",
                    p["what"].as_str().or(p["error"].as_str()).unwrap_or("")
                ));
            }
        }
    }
    out
}

/// A acknowledges 150 events, is paused for longer than the lease, B starts
/// with its own log: B must not hand A's offsets out again (it refuses to
/// take over, saying why), A resumes and archives what it acknowledged.
#[test]
fn a_paused_holder_keeps_its_acknowledged_events() {
    let moto = Moto::start();
    let root = moto.bucket("fence-pause");
    let site_a = moto.site(&root, CONFIG);
    let site_b = moto.site(&root, CONFIG);
    let a = site_a.serve(&[]);
    wait_driving(&a);
    let mut sent = Sent::default();
    sent.send("A", &a.url, 3);
    assert_eq!(
        sent.acked_by("A"),
        150,
        "A acknowledges: {:?}",
        sent.refused
    );

    signal(&a, "-STOP");
    std::thread::sleep(Duration::from_secs(3));
    let b_log = site_b.dir.path().join("b.log");
    let b = start_b(&site_b, &b_log);
    if let Some(b) = &b {
        sent.send("B", &b.url, 9);
    }
    signal(&a, "-CONT");
    let b_said = std::fs::read_to_string(&b_log).unwrap_or_default();
    std::thread::sleep(Duration::from_millis(1500));
    sent.send("A", &a.url, 2);

    assert_every_ack_archived_once(&moto, &root, &sent);
    assert!(
        b.is_some() || b_said.contains("acknowledged events not archived"),
        "B, refused the lease, says why: {b_said}"
    );
    let health = lease_health(&a);
    assert!(
        health.iter().any(|h| h.contains("not renewed for")),
        "A's health says its lease lapsed while it was paused and that no other node took it: {health:?}"
    );
}

/// A's path to S3 is cut for twice the lease (the process runs): A must
/// stop acknowledging once its lease is no longer valid by its own clock
/// (503 with a reason), B must not take over A's unarchived offsets, and
/// after the cut every acknowledged event is archived exactly once.
#[test]
fn a_holder_cut_off_from_s3_stops_acknowledging_and_loses_nothing() {
    let moto = Moto::start();
    let root = moto.bucket("fence-cut");
    let proxy = S3Proxy::start(&moto.endpoint);
    let site_a = Site::remote(&root, moto.storage(&root), proxy.env(moto.env()), CONFIG);
    let site_b = moto.site(&root, CONFIG);
    let a = site_a.serve(&[]);
    wait_driving(&a);
    let mut sent = Sent::default();
    sent.send("A", &a.url, 3);
    assert_eq!(
        sent.acked_by("A"),
        150,
        "A acknowledges: {:?}",
        sent.refused
    );

    let cut = Instant::now();
    proxy.inject(Matcher::any(), Fault::InternalError, 1_000_000);
    std::thread::sleep(Duration::from_millis(500));
    let b_log = site_b.dir.path().join("b.log");
    let b = start_b(&site_b, &b_log);
    if let Some(b) = &b {
        sent.send("B", &b.url, 9);
    }
    // Past A's validity (1.5 s after its last renewal started), still cut.
    while cut.elapsed() < Duration::from_millis(2500) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = sent.refused.len();
    sent.send("A", &a.url, 1);
    let during = sent.refused[before..].to_vec();
    while cut.elapsed() < Duration::from_secs(4) {
        std::thread::sleep(Duration::from_millis(50));
    }
    proxy.heal();
    let b_said = std::fs::read_to_string(&b_log).unwrap_or_default();
    std::thread::sleep(Duration::from_millis(2000));
    sent.send("A", &a.url, 2);

    assert_every_ack_archived_once(&moto, &root, &sent);
    assert!(
        during.len() == 1 && during[0].1 == 503 && during[0].2.contains("lease"),
        "A, cut off from S3 past its lease's validity, refuses ingest with 503 and the reason: {during:?}"
    );
    assert!(
        b.is_some() || b_said.contains("acknowledged events not archived"),
        "B, refused the lease, says why: {b_said}"
    );
    let health = lease_health(&a);
    assert!(
        !health.is_empty(),
        "A's health tells of the lease it could not renew: {health:?}"
    );
}

/// Issue 34: the driver stores a producer's request and is killed before it
/// replies; it restarts, archives the request's events and dies; the
/// producer's retry reaches the node that drives next (with a log of its
/// own, started once the lease expired). The retry must be answered with
/// the original offsets, and nothing stored twice.
#[test]
fn a_retry_at_the_next_driver_of_a_request_the_last_one_stored_is_recognised() {
    let config = "[speed]\ninterval = \"10ms\"\n[archive]\nchunk_events = 200\nchunk_age = \"300ms\"\n[batch]\npause = \"250ms\"\nlease = \"2s\"\npoll = \"200ms\"\n";
    let moto = Moto::start();
    let root = moto.bucket("fence-retry");
    let site_a = moto.site(&root, config);
    let site_b = moto.site(&root, config);
    let a_log = site_a.dir.path().join("a.log");
    let mut a = site_a
        .try_serve(
            &[("LAMBDAFLOW_FAILPOINTS", "ingest-after-append")],
            Stdio::from(std::fs::File::create(&a_log).unwrap()),
        )
        .unwrap_or_else(|s| {
            panic!(
                "A starts ({s}): {}",
                std::fs::read_to_string(&a_log).unwrap_or_default()
            )
        });
    wait_driving(&a);
    let events: Vec<_> = (0..50).map(make).collect();
    let first = common::post_events_as(&a.url, ndjson(&events), "shop-1", "7");
    assert!(
        first.is_err(),
        "A dies at the failpoint before it replies: {first:?}"
    );
    let _ = a.child.wait();

    // A restarts on its own log and archives the request's events.
    let mut a = site_a.serve(&[]);
    let storage = moto.storage(&root);
    let t = Instant::now();
    let stored = loop {
        let (rows, _) = common::master_events_in(&storage, 2);
        if rows.len() == 50 {
            break rows;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "A archives the 50 events it stored before it died: {} archived",
            rows.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    a.child.kill().unwrap();
    let _ = a.child.wait();
    // B, with a log of its own, starts once A's lease has expired.
    let b_log = site_b.dir.path().join("b.log");
    let t = Instant::now();
    let b = loop {
        if let Some(b) = start_b(&site_b, &b_log) {
            break b;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "B starts once A's lease expired: {}",
            std::fs::read_to_string(&b_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    wait_driving(&b);

    let (status, reply) = common::post_events_as(&b.url, ndjson(&events), "shop-1", "7").unwrap();
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply["resent"], "stored",
        "B recognises the retry of a request A stored: {reply}"
    );
    let at = &reply["offsets"][0];
    let (p, first) = (
        at["partition"].as_u64().unwrap() as u32,
        at["first"].as_u64().unwrap(),
    );
    assert_eq!(
        stored.get(&(p, first)),
        Some(&events[0].zipcode),
        "the reply names the offsets the events were stored at: {reply}"
    );
    // A new request of the same producer is stored; nothing twice.
    let more: Vec<_> = (50..60).map(make).collect();
    let (status, reply) = common::post_events_as(&b.url, ndjson(&more), "shop-1", "8").unwrap();
    assert_eq!(status, 200, "{reply}");
    let mut sent = Sent::default();
    for e in events.iter().chain(&more) {
        sent.acked.insert(e.zipcode, "A");
    }
    assert_every_ack_archived_once(&moto, &root, &sent);
    b.stop();
}

/// Red team (issue 34): B drives, is paused past its lease; A takes over
/// (B had archived everything), acknowledges and archives; B resumes and A
/// dies. B's log ends below what A archived: taking the lease back, B gave
/// A's offsets out again — every event B then acknowledged was lost (the
/// archiver held those offsets committed). B must not take the lease back
/// until a restart opens its log at the archived coverage.
#[test]
fn a_node_whose_log_is_behind_the_archive_does_not_take_the_lease_back() {
    let config = "[speed]\ninterval = \"10ms\"\n[archive]\nchunk_events = 200\nchunk_age = \"300ms\"\n[batch]\npause = \"250ms\"\nlease = \"2s\"\npoll = \"200ms\"\n";
    let moto = Moto::start();
    let root = moto.bucket("fence-retake");
    let site_a = moto.site(&root, config);
    let site_b = moto.site(&root, config);
    let mut sent = Sent::default();
    let mut b = site_b.serve(&[]);
    wait_driving(&b);
    sent.send("B", &b.url, 2);
    assert_every_ack_archived_once(&moto, &root, &sent);
    // Renewals in a quiet period bring B's marks back to its log's end
    // (they run ahead of a steady rate): then A may take over.
    std::thread::sleep(Duration::from_secs(3));

    signal(&b, "-STOP");
    let a_log = site_a.dir.path().join("a.log");
    let t = Instant::now();
    let mut a = loop {
        if let Some(a) = start_b(&site_a, &a_log) {
            break a;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "A starts once B's lease expired: {}",
            std::fs::read_to_string(&a_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    wait_driving(&a);
    sent.send("A", &a.url, 2);
    assert_every_ack_archived_once(&moto, &root, &sent);
    // A's marks run ahead of its log while it ingests (room for the next
    // renewal's acknowledgements); killed then, its record would say it may
    // hold events beyond the archive, and B rightly waits for them. Killed
    // once a quiet renewal brought them back to what it archived, it holds
    // nothing B cannot see.
    wait_marks_at(&moto, &root, sent.acked.len() as u64);

    signal(&b, "-CONT");
    a.child.kill().unwrap();
    let _ = a.child.wait();
    std::thread::sleep(Duration::from_secs(4));
    sent.send("B", &b.url, 3);
    let lease = b.status()["cluster"]["lease"].to_string();
    assert!(
        sent.refused.iter().any(|(n, status, why)| *n == "B"
            && *status == 503
            && why.contains("Restart this node")),
        "B's 503 says it must be restarted, not which node held the lease: {:?}",
        sent.refused
    );
    // Restarted, B's log starts at the archived coverage and B drives.
    b.child.kill().unwrap();
    let _ = b.child.wait();
    let b = site_b.serve(&[]);
    wait_driving(&b);
    sent.send("B", &b.url, 2);
    assert_every_ack_archived_once(&moto, &root, &sent);
    assert!(
        sent.acked_by("B") == 200,
        "B acknowledged only after its restart (2 + 2 requests of 50): {} (lease before the restart: {lease}; refused: {:?})",
        sent.acked_by("B"),
        sent.refused
    );
    b.stop();
}
