//! Ingest end to end over HTTP against a real `lambdaflow serve` process:
//! good lines, every kind of bad line, empty and oversized bodies; afterwards
//! the log holds exactly the accepted events and the dead-letter store exactly
//! the refused lines.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use arrow::array::AsArray;
use arrow::datatypes::{Int64Type, TimestampMillisecondType};
use lambdaflow::stream::{DeadLetters, Log, LogOptions};
use serde_json::Value;

use crate::common::{BIN, Site, event};

fn post(url: &str, body: Vec<u8>) -> (u16, Option<String>, Value) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let resp = reqwest::Client::new()
            .post(format!("{url}/v1/events"))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let retry = resp
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let json = resp.json::<Value>().await.unwrap_or(Value::Null);
        (status, retry, json)
    })
}

/// (zipcode, product, price, event time ms) of every event in the log.
fn log_events(data: &Path) -> BTreeMap<(u32, u64), (i64, String, i64, i64)> {
    let log = Log::open(data.join("log"), LogOptions::default()).unwrap();
    let mut out = BTreeMap::new();
    for p in 0..log.partitions() {
        let end = log.end_offset(p).unwrap();
        let mut next = 0;
        while next < end {
            for b in log.read(p, next, 10_000).unwrap() {
                let z = b.batch.column(0).as_primitive::<Int64Type>();
                let n = b.batch.column(1).as_string::<i32>();
                let pr = b.batch.column(2).as_primitive::<Int64Type>();
                let t = b.batch.column(3).as_primitive::<TimestampMillisecondType>();
                for i in 0..b.batch.num_rows() {
                    out.insert(
                        (p, b.first_offset + i as u64),
                        (z.value(i), n.value(i).to_string(), pr.value(i), t.value(i)),
                    );
                }
                next = b.first_offset + b.batch.num_rows() as u64;
            }
        }
    }
    out
}

#[test]
fn ingest_over_http_keeps_exactly_the_good_lines_and_dead_letters_the_rest() {
    let site = Site::new("[ingest]\nmax_body = \"64KiB\"\n");
    let server = site.serve(&[]);
    let url = server.url.clone();

    // 1. A clean body.
    let good: Vec<String> = (0..100)
        .map(|i| {
            event(
                10_000 + i,
                &format!("product{}", i % 5),
                i,
                "2014-11-01 19:35:41.158",
            )
        })
        .collect();
    let (status, _, reply) = post(&url, (good.join("\n") + "\n").into_bytes());
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["accepted"], 100, "{reply}");
    assert_eq!(reply["rejected"], 0, "{reply}");
    let range = &reply["offsets"][0];
    assert_eq!(
        range["last"].as_u64().unwrap() - range["first"].as_u64().unwrap(),
        99,
        "{reply}"
    );

    // 2. A mixed body: every kind of bad line between good ones.
    let ok = |i: i64| event(20_000 + i, "product9", 7, "2014-11-01 00:00:00.000");
    let mut lines: Vec<Vec<u8>> = vec![
        ok(1).into_bytes(),                            // 1
        br#"{"zipcode":1,"ProductName":"x""#.to_vec(), // 2 malformed JSON
        br#"{"zipcode":1,"ProductName":"x","timestamp":"2014-11-01 00:00:00.000"}"#.to_vec(), // 3 missing price
        event(1, "x", 0, "2014-11-01 00:00:00.000")
            .replace("\"price\":0", "\"price\":\"abc\"")
            .into_bytes(), // 4 wrong type
        event(1, "x", 1, "2014-13-01 00:00:00.000").into_bytes(), // 5 bad timestamp
        event(1, "x", 1, "2014-11-01 00:00:00.000")
            .replace('}', ",\"color\":\"red\"}")
            .into_bytes(), // 6 unknown field
        b"{\"zipcode\":1,\"ProductName\":\"\xc3\x28\",\"price\":1}".to_vec(), // 7 invalid UTF-8
        Vec::new(),                                               // 8 empty line: skipped
        b"   ".to_vec(),                                          // 9 blank line: skipped
        ok(2).into_bytes(),                                       // 10
        b"null".to_vec(),                                         // 11 not an object
        event(1, "x", 1, "2014-11-01 00:00:00.000")
            .replace("\"price\":1", "\"price\":1e400")
            .into_bytes(), // 12 number out of range
        b"\x00\x00".to_vec(),                                     // 13 NUL bytes
        ok(3).into_bytes(),                                       // 14
    ];
    let body = lines.iter_mut().fold(Vec::new(), |mut acc, l| {
        acc.extend_from_slice(l);
        acc.push(b'\n');
        acc
    });
    let (status, _, reply) = post(&url, body);
    assert_eq!(status, 200, "some lines were accepted: {reply}");
    assert_eq!(reply["accepted"], 3, "{reply}");
    assert_eq!(reply["rejected"], 9, "{reply}");
    let errors: Vec<(u64, String)> = reply["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["line"].as_u64().unwrap(),
                e["message"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let lines_refused: Vec<u64> = errors.iter().map(|e| e.0).collect();
    assert_eq!(lines_refused, [2, 3, 4, 5, 6, 7, 11, 12, 13], "{reply}");
    let expect = [
        (2, "line 2: malformed JSON"),
        (3, "line 3: field `price`: missing"),
        (
            4,
            "line 4: field `price`: expected int64, got string \"abc\"",
        ),
        (5, "line 5: field `timestamp`: expected a timestamp like"),
        (6, "line 6: field `color`: unknown field"),
        (7, "line 7: invalid UTF-8"),
        (11, "line 11: expected a JSON object, got null"),
        (12, "line 12: malformed JSON: number out of range"),
        (13, "line 13: malformed JSON"),
    ];
    for ((line, msg), (want_line, want)) in errors.iter().zip(expect) {
        assert_eq!(*line, want_line);
        assert!(
            msg.starts_with(want),
            "line {line}: message {msg:?} should start with {want:?}"
        );
    }

    // 3. Every line bad: 422, nothing stored but the dead letters.
    let (status, _, reply) = post(&url, b"{\"nope\":1}\n".to_vec());
    assert_eq!(status, 422, "{reply}");
    assert_eq!(reply["rejected"], 1);

    // 4. An empty body: 400 with a hint.
    let (status, _, reply) = post(&url, Vec::new());
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("empty"),
        "{reply}"
    );
    assert!(reply["hint"].is_string(), "{reply}");

    // 5. An oversized body: 413 with the limit named, nothing stored.
    let big: String = (0..2000)
        .map(|i| event(30_000 + i, "product1", 1, "2014-11-01 00:00:00.000") + "\n")
        .collect();
    assert!(big.len() > 64 * 1024);
    let (status, _, reply) = post(&url, big.into_bytes());
    assert_eq!(status, 413, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("64.0 KiB"),
        "{reply}"
    );

    // 6. The producer itself, as a user runs it.
    let out = Command::new(BIN)
        .args([
            "produce", "--url", &url, "--events", "5000", "--seed", "3", "--batch", "500",
            "--quiet",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "produce failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("accepted 5,000 · rejected 0 · failed 0"),
        "{stdout}"
    );

    let status: Value = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            reqwest::get(format!("{url}/v1/status"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap()
        });
    assert_eq!(status["ingest"]["accepted"], 5103, "{status}");
    assert_eq!(status["ingest"]["rejected"], 10, "{status}");

    // After a clean stop: the log holds exactly the accepted events…
    server.stop();
    let data = site.data.clone();
    let events = log_events(&data);
    assert_eq!(
        events.len(),
        100 + 3 + 5000,
        "exactly the accepted events: nothing of the 413 body, no refused line"
    );
    let zips: std::collections::BTreeSet<i64> = events.values().map(|e| e.0).collect();
    for i in 0..100 {
        assert!(
            zips.contains(&(10_000 + i)),
            "good event {i} of request 1 is in the log"
        );
    }
    for i in 1..=3 {
        assert!(
            zips.contains(&(20_000 + i)),
            "good line of the mixed request is in the log"
        );
    }
    assert!(!zips.contains(&1), "no refused line is in the log");

    // …and the dead-letter store exactly the refused lines, byte for byte.
    let dead = DeadLetters::read_all(data.join("deadletter")).unwrap();
    assert_eq!(dead.len(), 10, "{dead:#?}");
    for (d, (line, _)) in dead.iter().zip(&errors) {
        assert_eq!(d.line, *line);
        assert_eq!(
            d.raw_bytes(),
            lines[*line as usize - 1],
            "raw line {line} kept exactly"
        );
        assert!(!d.reason.is_empty());
    }
    assert_eq!(
        dead[2].field.as_deref(),
        Some("price"),
        "line 4 names its field"
    );
    assert!(
        dead[5].raw_base64.is_some(),
        "line 7 (not UTF-8) is kept as base64"
    );
    assert_eq!(dead[9].raw.as_deref(), Some("{\"nope\":1}"));
}

#[test]
fn keyed_partitioning_puts_one_key_on_one_partition() {
    let site = Site::new("[stream]\npartitions = 3\nkey = \"ProductName\"\n");
    let server = site.serve(&[]);
    let body: String = (0..300)
        .map(|i| {
            event(
                10_000 + i,
                &format!("product{}", i % 10),
                1,
                "2014-11-01 00:00:00.000",
            ) + "\n"
        })
        .collect();
    let (status, _, reply) = post(&server.url, body.into_bytes());
    assert_eq!(status, 200, "{reply}");
    assert!(
        reply["offsets"].as_array().unwrap().len() > 1,
        "spread over partitions: {reply}"
    );
    server.stop();
    let data = site.data.clone();
    let events = {
        let log = Log::open(
            data.join("log"),
            LogOptions {
                partitions: 3,
                ..LogOptions::default()
            },
        )
        .unwrap();
        let mut by_product: BTreeMap<String, std::collections::BTreeSet<u32>> = BTreeMap::new();
        for p in 0..3 {
            for b in log.read(p, 0, usize::MAX).unwrap() {
                let n = b.batch.column(1).as_string::<i32>();
                for i in 0..b.batch.num_rows() {
                    by_product
                        .entry(n.value(i).to_string())
                        .or_default()
                        .insert(p);
                }
            }
        }
        by_product
    };
    assert_eq!(events.len(), 10);
    for (product, parts) in events {
        assert_eq!(parts.len(), 1, "{product} landed on partitions {parts:?}");
    }
}

#[test]
fn a_bad_config_fails_at_startup_naming_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[stream]\npartitons = 2\n").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml"), "names the file: {err}");
    assert!(err.contains("partitons"), "names the key: {err}");
    assert!(err.contains("unknown field"), "says why: {err}");
}

fn post_as(url: &str, body: &[u8], producer: &str, seq: &str) -> (u16, Value) {
    crate::common::post_events_as(url, body.to_vec(), producer, seq).unwrap()
}

/// Issue 34, item 1: a numbered request sent again is answered with its
/// original reply and stores nothing; a changed body under its number is
/// refused (409), a number below the producer's window too (422); a request
/// split over partitions by key is recognised whole; status and metrics
/// count each.
#[test]
fn a_numbered_request_sent_again_is_answered_as_it_was_and_stored_once() {
    let site = Site::new(
        "[stream]\npartitions = 3\nkey = \"ProductName\"\n[ingest.idempotence]\nwindow = 4\n",
    );
    let server = site.serve(&[]);
    let body: String = (0..30)
        .map(|i| {
            event(
                10_000 + i,
                &format!("product{}", i % 5),
                1,
                "2014-11-01 00:00:00.000",
            ) + "\n"
        })
        .chain(["not json\n".to_string()])
        .collect();
    let (status, first) = post_as(&server.url, body.as_bytes(), "shop-1", "0");
    assert_eq!(status, 200, "{first}");
    assert!(
        first["offsets"].as_array().unwrap().len() > 1,
        "the request is split over partitions by key: {first}"
    );
    let (status, again) = post_as(&server.url, body.as_bytes(), "shop-1", "0");
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["resent"], "stored", "{again}");
    for k in ["accepted", "rejected", "offsets", "errors"] {
        assert_eq!(
            again[k], first[k],
            "the re-sent request's `{k}` is the original's"
        );
    }
    let (status, changed) = post_as(&server.url, b"{\"x\":1}\n", "shop-1", "0");
    assert_eq!(
        (status, &changed["code"]),
        (409, &Value::from("changed-request")),
        "{changed}"
    );
    for seq in 1..=5 {
        let line = event(20_000 + seq, "product1", 1, "2014-11-01 00:00:00.000") + "\n";
        let (status, r) = post_as(&server.url, line.as_bytes(), "shop-1", &seq.to_string());
        assert_eq!(status, 200, "{r}");
    }
    // Sequences 2..=5 are remembered (window 4): 0 and 1 are too old.
    let (status, old) = post_as(&server.url, body.as_bytes(), "shop-1", "0");
    assert_eq!(
        (status, &old["code"]),
        (422, &Value::from("sequence-too-old")),
        "a sequence below the window is refused, never stored again: {old}"
    );
    let (status, bad) = post_as(&server.url, body.as_bytes(), "shop 1", "x");
    assert_eq!(
        (status, &bad["code"]),
        (400, &Value::from("bad-request-id")),
        "{bad}"
    );

    let s = server.status();
    let idem = &s["ingest"]["idempotence"];
    assert_eq!(idem["recognised"], 1, "{idem}");
    assert_eq!(idem["changed"], 1, "{idem}");
    assert_eq!(idem["too_old"], 1, "{idem}");
    assert_eq!(
        s["ingest"]["accepted"], 35,
        "30 + 5 events stored, once: {}",
        s["ingest"]
    );
    let metrics = crate::common::rt().block_on(async {
        reqwest::get(format!("{}/metrics", server.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    assert!(
        metrics.contains("lambdaflow_requests_resent_recognised_total 1"),
        "{metrics}"
    );
    server.stop();
}

/// `lambdaflow produce` numbers its requests: a run under an earlier run's
/// producer name with the same events is recognised whole, nothing stored
/// twice, and its summary says so.
#[test]
fn produce_run_again_under_its_name_stores_nothing_twice() {
    let site = Site::new("");
    let server = site.serve(&[]);
    let run = || {
        let out = Command::new(BIN)
            .args([
                "produce",
                "--url",
                &server.url,
                "--events",
                "5000",
                "--batch",
                "500",
            ])
            .args(["--seed", "7", "--producer", "replay-1", "--quiet"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let first = run();
    assert!(first.contains("re-sent requests recognised 0"), "{first}");
    let second = run();
    assert!(
        second.contains("re-sent requests recognised 10"),
        "the second run's 10 requests are the first run's: {second}"
    );
    assert_eq!(
        server.status()["ingest"]["accepted"],
        5000,
        "the events are stored once"
    );
    server.stop();
}

/// Red team (issue 34): a client that sends a numbered request and goes
/// away before the reply (a timeout, a reset), then sends it again. The
/// first request must run to its end (its events may be queued to the log
/// already) and be recorded, so the retry is recognised: every request is
/// stored once. Before the fix the handler was cancelled with the client and
/// forgot a request whose events were stored (9 of 30 stored twice).
#[test]
fn a_request_whose_client_went_away_is_recognised_when_sent_again() {
    use std::io::Write;
    let site = Site::new("");
    let server = site.serve(&[]);
    let addr = server.url.trim_start_matches("http://").to_string();
    let (trials, events) = (60u64, 1_000i64);
    for t in 0..trials {
        let body: String = (0..events)
            .map(|i| event(i + 1, "product1", 1, "2014-11-01 00:00:00.000") + "\n")
            .collect();
        let seq = t.to_string();
        let mut sock = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            sock,
            "POST /v1/events HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\nlambdaflow-producer: gone\r\nlambdaflow-sequence: {seq}\r\n\r\n",
            body.len()
        )
        .unwrap();
        sock.write_all(body.as_bytes()).unwrap();
        std::thread::sleep(std::time::Duration::from_micros(200 * (t % 10)));
        drop(sock);
        let (status, reply) = post_as(&server.url, body.as_bytes(), "gone", &seq);
        assert_eq!(status, 200, "{reply}");
    }
    let s = server.status();
    let stored: u64 = s["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["end"].as_u64().unwrap())
        .sum();
    assert_eq!(
        stored,
        trials * events as u64,
        "each of the {trials} requests stored once (recognised: {})",
        s["ingest"]["idempotence"]
    );
    server.stop();
}
