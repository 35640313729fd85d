//! Hostile clients against a real `serve`: bodies of bad lines, bodies far
//! over the limit (declared and chunked), clients that trickle headers or
//! bodies, and producers far faster than the machine. None may crash or stall
//! a layer; each gets a clear error; every refused line is a dead letter.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{Site, event, post_events};
use lambdaflow::stream::DeadLetters;

const LIMITS: &str =
    "[ingest]\nmax_body = \"1 MiB\"\n[http]\nheader_timeout = \"1s\"\nbody_timeout = \"2s\"\n";

fn host(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

/// Sends `head` then up to `body_len` bytes of body from `chunk`, stopping
/// when the server stops reading; returns the server's reply (status line first).
fn raw_post(url: &str, head: &str, body_len: usize, chunked: bool) -> String {
    let mut s = TcpStream::connect(host(url)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let line = (event(1, "Laptop", 1, "2014-11-01 10:00:00.000") + "\n").repeat(100);
        let mut sent = 0;
        while sent < body_len {
            let r = if chunked {
                w.write_all(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes())
            } else {
                w.write_all(&line.as_bytes()[..line.len().min(body_len - sent)])
            };
            if r.is_err() {
                break; // the server answered and closed: it need not read the rest
            }
            sent += line.len();
        }
        sent
    });
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                reply.extend_from_slice(&buf[..n]);
                if reply.windows(4).any(|w| w == b"\r\n\r\n") && reply.ends_with(b"}") {
                    break;
                }
            }
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
    let sent = writer.join().unwrap();
    assert!(
        sent < 100 << 20 || chunked,
        "the server read a whole 100 MB body it had refused"
    );
    String::from_utf8_lossy(&reply).into_owned()
}

#[test]
fn bad_lines_get_reasons_and_dead_letters_and_huge_bodies_get_413() {
    let site = Site::new(LIMITS);
    let server = site.serve(&[]);
    let good = event(90210, "Laptop", 700, "2014-11-01 10:00:00.000");
    let mut lines: Vec<Vec<u8>> = vec![
        good.clone().into_bytes(),
        format!("{{\"zipcode\":{}", "[".repeat(50_000)).into_bytes(),
        "{\"zipcode\":99999999999999999999999,\"ProductName\":\"a\",\"price\":1,\"timestamp\":\"2014-11-01 10:00:00.000\"}".into(),
        "{\"zipcode\":1,\"ProductName\":\"a\",\"price\":1e400,\"timestamp\":\"2014-11-01 10:00:00.000\"}".into(),
        b"{\"zipcode\":1,\"ProductName\":\"\xff\xfe\",\"price\":1,\"timestamp\":\"2014-11-01 10:00:00.000\"}".to_vec(),
        b"{\"zipcode\":1,\"ProductName\":\"a\0b\",\"price\":1,\"timestamp\":\"2014-11-01 10:00:00.000\"}".to_vec(),
        b"\0\0\0\0".to_vec(),
        format!("{{\"zipcode\":1,\"ProductName\":\"{}\",\"price\":\"1\"}}", "y".repeat(600_000)).into_bytes(),
        good.into_bytes(),
    ];
    let body = lines.join(&b'\n');
    let (status, reply) = post_events(&server.url, body).unwrap();
    assert_eq!(status, 200, "a body with some good lines is a 200: {reply}");
    assert_eq!(reply["accepted"], 2, "{reply}");
    assert_eq!(reply["rejected"], 7, "{reply}");
    let errors: Vec<String> = reply["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.to_string())
        .collect();
    for (i, want) in [
        (2, "expected int64"),
        (3, "in range"),
        (4, "out of range"),
        (5, "UTF-8"),
        (6, "malformed JSON"),
        (7, "malformed JSON"),
        (8, "price"),
    ] {
        let e = errors
            .iter()
            .find(|e| e.contains(&format!("\"line\":{i},")) || e.contains(&format!("line {i}:")))
            .unwrap_or_else(|| panic!("no error for line {i}: {errors:?}"));
        assert!(e.contains(want), "line {i} should say {want:?}: {e}");
    }
    // Every refused line is in the dead-letter store, byte for byte.
    let dead = DeadLetters::read_all(site.data.join("deadletter")).unwrap();
    lines.remove(8);
    lines.remove(0);
    let mut kept: Vec<Vec<u8>> = dead.iter().map(|d| d.raw_bytes()).collect();
    kept.sort();
    lines.sort();
    assert_eq!(
        kept, lines,
        "the dead letters are exactly the refused lines"
    );

    // 100 MB declared: refused before the body is read.
    let reply = raw_post(
        &server.url,
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n\r\n",
        100 << 20,
        false,
    );
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(
        reply.contains("larger than the limit of 1.0 MiB"),
        "{reply}"
    );
    // 100 MB chunked (no length up front): refused once the limit is crossed.
    let reply = raw_post(
        &server.url,
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        100 << 20,
        true,
    );
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    // A 100 MB SQL text too.
    let reply = raw_post(
        &server.url,
        "POST /v1/sql HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        100 << 20,
        true,
    );
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");

    let s = server.status();
    assert_eq!(s["ingest"]["accepted"], 2, "{s}");
    eprintln!(
        "peak RSS after the hostile bodies: {} MiB",
        server.peak_rss() >> 20
    );
    server.stop();
}

#[test]
fn slow_clients_are_cut_off_while_others_are_served() {
    let site = Site::new(LIMITS);
    let server = site.serve(&[]);
    // Slow-loris: half a request head, then silence.
    let lorises: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut s = TcpStream::connect(host(&server.url)).unwrap();
            s.write_all(b"POST /v1/events HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            s
        })
        .collect();
    // A body promised and trickled.
    let mut trickle = TcpStream::connect(host(&server.url)).unwrap();
    trickle
        .write_all(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"zip")
        .unwrap();
    trickle
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();

    // Meanwhile everyone else is served.
    let s = server.status();
    assert!(s["partitions"].is_array(), "{s}");
    let (status, _) = post_events(
        &server.url,
        event(1, "Laptop", 1, "2014-11-01 10:00:00.000").into_bytes(),
    )
    .unwrap();
    assert_eq!(status, 200);

    // The trickled body gets a 408 that says why.
    let mut reply = String::new();
    let _ = trickle.read_to_string(&mut reply);
    assert!(
        reply.starts_with("HTTP/1.1 408"),
        "a body that does not arrive gets 408, got {reply:?}"
    );
    assert!(reply.contains("body_timeout"), "{reply}");
    // Each slow-loris connection is closed by the server (EOF, or a 408 first).
    for mut s in lorises {
        let mut buf = Vec::new();
        let r = s.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        assert!(
            r.is_ok() && (buf.is_empty() || text.starts_with("HTTP/1.1 408")),
            "the server must close a connection that never finishes its headers: {r:?} {text:?}"
        );
    }
    // Nothing was stored from the cut-off requests, and nothing dead-lettered.
    let s = server.status();
    assert_eq!(s["ingest"]["accepted"], 1, "{s}");
    assert_eq!(s["ingest"]["dead_letters_written"], 0, "{s}");
    server.stop();
}

#[test]
fn overload_gets_503_with_retry_after_and_reads_stay_responsive() {
    // A tiny write queue: producers are far faster than fsync can drain it.
    let site = Site::new(
        "[ingest]\nmax_pending = \"64 KiB\"\npending_wait = \"1ms\"\n[archive]\nchunk_age = \"200ms\"\n[batch]\npause = \"300ms\"\n",
    );
    let server = site.serve(&[]);
    let url = server.url.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let statuses = Arc::new(Mutex::new(std::collections::BTreeMap::<u16, u64>::new()));
    let without_retry_after = Arc::new(AtomicU64::new(0));
    let producers: Vec<_> = (0..12)
        .map(|t| {
            let (url, stop, acked, statuses, wra) = (
                url.clone(),
                stop.clone(),
                acked.clone(),
                statuses.clone(),
                without_retry_after.clone(),
            );
            std::thread::spawn(move || {
                let rt = common::rt();
                let client = reqwest::Client::new();
                let body: String = (0..5000)
                    .map(|i| {
                        event(
                            t * 100_000 + i,
                            "Laptop",
                            i % 100,
                            "2014-11-01 10:00:00.000",
                        ) + "\n"
                    })
                    .collect();
                while !stop.load(Ordering::Relaxed) {
                    let r = rt.block_on(
                        client
                            .post(format!("{url}/v1/events"))
                            .body(body.clone())
                            .send(),
                    );
                    let Ok(r) = r else { continue };
                    let code = r.status().as_u16();
                    if code == 503 && r.headers().get("retry-after").is_none() {
                        wra.fetch_add(1, Ordering::Relaxed);
                    }
                    if code == 200 {
                        let v: serde_json::Value = rt.block_on(r.json()).unwrap();
                        acked.fetch_add(v["accepted"].as_u64().unwrap(), Ordering::Relaxed);
                    }
                    *statuses.lock().unwrap().entry(code).or_default() += 1;
                }
            })
        })
        .collect();
    // Reads during the flood: every one must be answered.
    let t = Instant::now();
    let mut reads = 0;
    let mut slowest = Duration::ZERO;
    let client = reqwest::Client::new();
    let rt = common::rt();
    while t.elapsed() < Duration::from_secs(6) {
        for path in ["/v1/status", "/v1/views/sales_by_product"] {
            let began = Instant::now();
            let code = rt.block_on(async {
                client
                    .get(format!("{url}{path}"))
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            });
            assert_eq!(code.ok(), Some(200), "{path} must answer during overload");
            slowest = slowest.max(began.elapsed());
            reads += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    for p in producers {
        p.join().unwrap();
    }
    let statuses = statuses.lock().unwrap().clone();
    eprintln!(
        "overload: replies {statuses:?}; {reads} reads, slowest {slowest:?}; peak RSS {} MiB",
        server.peak_rss() >> 20
    );
    assert!(
        statuses.get(&503).copied().unwrap_or(0) > 0,
        "producers far faster than the log must get 503s: {statuses:?}"
    );
    assert!(
        statuses.keys().all(|c| *c == 200 || *c == 503),
        "overload answers 200 or 503, nothing else: {statuses:?}"
    );
    assert_eq!(
        without_retry_after.load(Ordering::Relaxed),
        0,
        "every 503 carries Retry-After"
    );
    // What was acknowledged is stored, once.
    let s = server.wait_settled(Duration::from_secs(120));
    let acked = acked.load(Ordering::Relaxed);
    assert_eq!(s["ingest"]["accepted"], acked, "{s}");
    let (rows, _) = common::master_events(&site.data);
    assert_eq!(
        rows.len() as u64,
        acked,
        "the master dataset holds every acknowledged event"
    );
    server.stop();
}

/// Raises this test process's own open-files limit: it holds thousands of
/// sockets.
fn raise_nofile() -> u64 {
    lambdaflow::frontend::conn::raise_fd_limit()
}

/// Opens `n` TCP connections to `addr` from the source address `from` that
/// send nothing.
async fn idle_sockets(addr: &str, from: &str, n: usize) -> Vec<tokio::net::TcpStream> {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(format!("{from}:0").parse().unwrap()).unwrap();
        out.push(s.connect(addr).await.unwrap());
    }
    out
}

#[test]
fn thousands_of_idle_sockets_from_one_address_lock_no_one_out() {
    assert!(raise_nofile() > 9000, "the test needs 9,000 open files");
    // Long deadlines: the idle sockets stay open while the real client comes.
    let site = Site::new("[http]\nheader_timeout = \"60s\"\nidle_timeout = \"60s\"\n");
    let server = site.serve(&[]);
    let addr = host(&server.url);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let idle = rt.block_on(idle_sockets(&addr, "127.0.0.2", 4200));
    // Every one of them has reached the server's accept loop.
    let t = Instant::now();
    let s = loop {
        let s = server.status();
        let c = &s["connections"];
        if c["open"].as_u64().unwrap_or(0) + c["refused"].as_u64().unwrap_or(0) > 4200 {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "accepts: {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let c = &s["connections"];
    eprintln!("after 4,200 idle sockets from 127.0.0.2: {c}");
    assert!(
        c["open"].as_u64().unwrap() <= c["per_address"].as_u64().unwrap() + 1,
        "one address holds at most its share: {c}"
    );
    // A producer and a reader from another address are answered at once.
    let t = Instant::now();
    let (code, _) = post_events(
        &server.url,
        event(1, "Laptop", 1, "2014-11-01 10:00:00.000").into_bytes(),
    )
    .expect("a producer is answered while 4,200 idle sockets are open");
    assert_eq!(code, 200);
    let s = server.status();
    let took = t.elapsed();
    assert_eq!(s["ingest"]["accepted"], 1, "{s}");
    assert!(took < Duration::from_secs(1), "answered in {took:?}");
    drop(idle);
    server.stop();
}

#[test]
fn idle_and_half_open_connections_are_closed_by_their_deadlines() {
    let site = Site::new("[http]\nheader_timeout = \"1s\"\nidle_timeout = \"2s\"\n");
    let server = site.serve(&[]);
    let addr = host(&server.url);
    // Closed by the server within `within` (EOF or reset), and what it sent.
    let closed_within = |mut s: TcpStream, within: Duration, what: &str| {
        s.set_read_timeout(Some(within + Duration::from_secs(5)))
            .unwrap();
        let t = Instant::now();
        let mut buf = Vec::new();
        let r = s.read_to_end(&mut buf);
        let took = t.elapsed();
        assert!(
            !matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
            "{what}: still open after {took:?}"
        );
        assert!(
            took < within + Duration::from_secs(2),
            "{what}: closed after {took:?}"
        );
        buf
    };
    // Nothing sent at all (waits in protocol detection without a deadline).
    let silent = TcpStream::connect(&addr).unwrap();
    // Half an HTTP/2 preface.
    let mut half_h2 = TcpStream::connect(&addr).unwrap();
    half_h2.write_all(b"PRI * HTTP/2.0\r\n").unwrap();
    // A whole preface and SETTINGS, then nothing: an HTTP/2 connection
    // that never sends a request.
    let mut h2 = TcpStream::connect(&addr).unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .unwrap();
    closed_within(silent, Duration::from_secs(1), "a silent socket");
    closed_within(half_h2, Duration::from_secs(1), "half an HTTP/2 preface");
    closed_within(h2, Duration::from_secs(1), "HTTP/2 without a request");
    // HTTP/1 keep-alive after one request: closed idle_timeout later.
    let mut keep = TcpStream::connect(&addr).unwrap();
    keep.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let reply = closed_within(keep, Duration::from_secs(2), "an idle HTTP/1 keep-alive");
    assert!(
        reply.starts_with(b"HTTP/1.1 200"),
        "the request was answered first"
    );
    // An HTTP/2 client that stays connected after its request.
    let idle_closed = common::rt().block_on(async {
        let client = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap();
        let r = client
            .get(format!("{}/v1/status", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        drop(r);
        tokio::time::sleep(Duration::from_secs(4)).await;
        client
    });
    let s = server.status();
    eprintln!("connections: {}", s["connections"]);
    // The HTTP/1 keep-alive may have gone by hyper's own header timeout;
    // the other four by the deadlines. Only the status request's own
    // connection is open: the HTTP/2 client's was closed, idle.
    assert!(
        s["connections"]["idle_closed"].as_u64().unwrap() >= 4,
        "connections closed by their deadline: {s}"
    );
    assert_eq!(s["connections"]["open"], 1, "{s}");
    drop(idle_closed);
    server.stop();
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn sixty_megabytes_of_bad_lines_cost_bounded_memory_reply_and_disk() {
    let site = Site::new(
        "[ingest]\nmax_body = \"64 MiB\"\ndead_letter_max = \"32 MiB\"\n[http]\nbody_timeout = \"5m\"\n",
    );
    let server = site.serve(&[]);
    let _ = server.status();
    let idle_rss = server.rss();
    // A good producer, before and while the bad body is decoded.
    let url = server.url.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let phase = Arc::new(AtomicU64::new(0));
    let acks = Arc::new(Mutex::new([0u64; 3]));
    let producer = {
        let (stop, phase, acks) = (stop.clone(), phase.clone(), acks.clone());
        std::thread::spawn(move || {
            let body = (0..100)
                .map(|i| event(i, "Laptop", 1, "2014-11-01 10:00:00.000"))
                .collect::<Vec<_>>()
                .join("\n");
            while !stop.load(Ordering::Relaxed) {
                let (code, _) = post_events(&url, body.clone().into_bytes()).unwrap();
                assert_eq!(code, 200, "the good producer is refused");
                acks.lock().unwrap()[phase.load(Ordering::Relaxed) as usize] += 100;
            }
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    let bad = "1\n".repeat(30_000_000);
    phase.store(1, Ordering::Relaxed);
    let t = Instant::now();
    let (code, reply) = post_events(&server.url, bad.into_bytes()).unwrap();
    let took = t.elapsed();
    phase.store(2, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    producer.join().unwrap();
    let [before, during, _] = *acks.lock().unwrap();

    let reply_len = reply.to_string().len();
    assert_eq!(code, 422, "nothing accepted: 422");
    assert_eq!(reply["rejected"], 30_000_000u64, "every line counted");
    assert_eq!(
        reply["errors"].as_array().unwrap().len(),
        100,
        "the first 100 listed"
    );
    assert_eq!(reply["errors_omitted"], 30_000_000u64 - 100);
    assert!(reply_len < 1 << 20, "reply of {reply_len} bytes");
    let dropped = reply["dead_letters_dropped"].as_u64().unwrap();
    assert!(
        dropped > 0 && dropped < 30_000_000,
        "the first lines are kept, the rest past the body's share counted: {reply_len}"
    );
    let peak = server.peak_rss();
    let disk = dir_bytes(&site.data.join("deadletter"));
    let s = server.status();
    eprintln!(
        "60 MB of bad lines: answered in {took:?}, reply {reply_len} bytes, {dropped} dead letters dropped; \
         idle RSS {} MiB, peak {} MiB; dead-letter store {} MiB ({} files removed); \
         good producer: {:.0} events/s before, {:.0} during",
        idle_rss >> 20,
        peak >> 20,
        disk >> 20,
        s["ingest"]["dead_letter_files_removed"],
        before as f64 / 3.0,
        during as f64 / took.as_secs_f64(),
    );
    assert!(
        peak < idle_rss + (256 << 20),
        "peak RSS {} MiB, idle {} MiB",
        peak >> 20,
        idle_rss >> 20
    );
    assert!(
        disk <= (33 << 20),
        "the store stays under its limit: {disk} bytes"
    );
    assert!(
        s["ingest"]["dead_letter_files_removed"].as_u64().unwrap() > 0,
        "{s}"
    );
    let warnings = s["health"]["warnings"].to_string();
    assert!(
        warnings.contains("deadletter/removed") && warnings.contains("deadletter/dropped"),
        "health warns of both limits: {warnings}"
    );
    assert!(during > 0, "the good producer was answered meanwhile");
    server.stop();
}

/// `POST /v1/sql`: status, `Retry-After`, reply length and JSON.
fn sql(url: &str, q: &str) -> (u16, bool, usize, serde_json::Value) {
    common::rt().block_on(async {
        let resp = reqwest::Client::new()
            .post(format!("{url}/v1/sql"))
            .body(q.to_string())
            .send()
            .await
            .unwrap_or_else(|e| panic!("{q}: no answer: {e}"));
        let status = resp.status().as_u16();
        let retry = resp.headers().contains_key("retry-after");
        let text = resp.text().await.unwrap();
        (
            status,
            retry,
            text.len(),
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    })
}

/// Acknowledgement latencies of one producer sending 100 events a request
/// until `stop`.
pub(crate) fn ack_latencies(url: &str, stop: &AtomicBool, from: i64) -> Vec<Duration> {
    let rt = common::rt();
    let client = reqwest::Client::new();
    let mut out = Vec::new();
    let mut n = from;
    while !stop.load(Ordering::Relaxed) {
        let body = common::exact::body_of(n, n + 100);
        n += 100;
        let t = Instant::now();
        let code = rt.block_on(async {
            client
                .post(format!("{url}/v1/events"))
                .body(body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        });
        assert_eq!(code, 200, "the producer is refused");
        out.push(t.elapsed());
    }
    out
}

/// A refusal says why, and a 503 says when to retry.
pub(crate) fn assert_refusal_clear(q: &str, code: u16, retry: bool, reply: &serde_json::Value) {
    if code >= 400 {
        let e = reply["error"].as_str().unwrap_or("");
        assert!(!e.is_empty(), "{q}: a refusal says why: {reply}");
    }
    if code == 503 {
        assert!(retry, "{q}: 503 carries Retry-After");
    }
}

pub(crate) fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

#[test]
fn heavy_queries_get_clear_refusals_and_leave_acknowledgements_alone() {
    let site = Site::new("[archive]\nchunk_age = \"200ms\"\n[batch]\npause = \"500ms\"\n");
    let server = site.serve(&[]);
    common::exact::send(&server.url, 0, 20_000);
    server.wait_settled(Duration::from_secs(60));
    let idle_rss = server.rss();
    let url = server.url.clone();

    // The producer alone.
    let stop = AtomicBool::new(false);
    let alone = std::thread::scope(|s| {
        let h = s.spawn(|| ack_latencies(&url, &stop, 1_000_000));
        std::thread::sleep(Duration::from_secs(5));
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap()
    });

    // The same producer beside clients that send the worst they can.
    let battery: &[(&str, &[u16])] = &[
        // A wide reply: cut at the byte limit, not built whole.
        // (or stopped at the deadline on a slow, busy machine)
        (
            "SELECT repeat('x', 200000) AS w FROM generate_series(1, 100000)",
            &[200, 408],
        ),
        // One value of 100 MB: refused before it is built.
        ("SELECT repeat('x', 100000000) AS w", &[400]),
        ("SELECT lpad('x', 500000000, 'y') AS w", &[400]),
        // A hash table far over 256 MiB, and no spill to disk.
        (
            "SELECT v % 50000000 AS k, count(*) FROM generate_series(1, 30000000) t(v) GROUP BY 1",
            &[422, 408],
        ),
        // CPU for minutes: stopped at the deadline.
        (
            "SELECT count(*) FROM generate_series(1, 100000000000)",
            &[408],
        ),
        // A view merged once however often it is named.
        (
            "SELECT count(*) FROM sales_by_product a, sales_by_product b, sales_by_product c, sales_by_product d",
            &[200, 408, 422],
        ),
        (
            "SELECT * FROM sales_by_product UNION ALL SELECT * FROM sales_by_product UNION ALL SELECT * FROM sales_by_product",
            &[200, 408],
        ),
        ("DROP TABLE sales_by_product", &[403]),
        ("SELECT * FROM no_such_view", &[400]),
    ];
    let stop = AtomicBool::new(false);
    let answers = Mutex::new(Vec::new());
    let beside = std::thread::scope(|s| {
        let h = s.spawn(|| ack_latencies(&url, &stop, 2_000_000));
        for c in 0..3 {
            let (url, stop, answers) = (&url, &stop, &answers);
            s.spawn(move || {
                let mut i = c;
                while !stop.load(Ordering::Relaxed) {
                    let (q, want) = battery[i % battery.len()];
                    i += 1;
                    let (code, retry, len, reply) = sql(url, q);
                    answers
                        .lock()
                        .unwrap()
                        .push((q, want, code, retry, len, reply));
                }
            });
        }
        std::thread::sleep(Duration::from_secs(30));
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap()
    });
    // A burst: more slow queries at once than run and queue.
    let burst: Vec<(u16, bool)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..80)
            .map(|_| {
                let url = &url;
                s.spawn(move || {
                    let (code, retry, _, _) =
                        sql(url, "SELECT count(*) FROM generate_series(1, 100000000000)");
                    (code, retry)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let answers = answers.into_inner().unwrap();
    for (q, want, code, retry, len, reply) in &answers {
        assert!(
            want.contains(code) || *code == 503,
            "{q}: expected {want:?}, got {code}: {reply}"
        );
        assert_refusal_clear(q, *code, *retry, reply);
        assert!(*len < 20 << 20, "{q}: a reply of {len} bytes");
        if q.starts_with("SELECT repeat('x', 200000)") && *code == 200 {
            assert_eq!(reply["truncated"], true, "the wide reply is cut");
        }
    }
    let refused = burst.iter().filter(|(c, _)| *c == 503).count();
    assert!(
        burst.iter().all(|(c, r)| (*c == 503 && *r) || *c == 408),
        "a burst gets 408 at the deadline or 503 with Retry-After: {burst:?}"
    );
    assert!(refused > 0, "more than fit are refused at once: {burst:?}");
    let peak = server.peak_rss();
    let (a, b) = (p99(alone.clone()), p99(beside.clone()));
    let mut codes = std::collections::BTreeMap::<u16, usize>::new();
    for (_, _, code, ..) in &answers {
        *codes.entry(*code).or_default() += 1;
    }
    eprintln!(
        "heavy queries: {} answered ({codes:?}); burst of 80: {refused} refused with 503; \
         producer ack p99 {a:?} alone ({} requests), {b:?} beside the queries ({} requests), ×{:.2}; \
         server RSS idle {} MiB, peak {} MiB",
        answers.len(),
        alone.len(),
        beside.len(),
        b.as_secs_f64() / a.as_secs_f64(),
        idle_rss >> 20,
        peak >> 20
    );
    assert!(
        peak < idle_rss + (2 << 30),
        "server memory stays bounded: peak {} MiB",
        peak >> 20
    );
    server.stop();
}
