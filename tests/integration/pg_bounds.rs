//! The Postgres endpoint against clients that try to take it down (issue
//! 31): silent and idle connections, one address taking every slot,
//! messages of hundreds of megabytes, thousands of prepared statements,
//! floods of `SET` beside ingest, cancelled queries; and a session as
//! poolers expect it (`statement_timeout`, 25P02, `DISCARD ALL`, …).
//!
//! Clients: psql, psycopg (through small Python scripts), and raw sockets
//! where a test needs the bytes a driver would not send.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::{self, Server};
use crate::pg::{driver, psql, python, serve_with_pg};

const TOKEN: &str = "pg-bounds-query-token-5d21";

/// Runs a Python `script` (with psycopg) given `input` as JSON on stdin;
/// its last line of stdout, as JSON.
fn py(script: &str, input: Value) -> Value {
    let mut child = Command::new(python())
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs (LAMBDAFLOW_PYTHON has psycopg)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("null")).unwrap()
}

/// Opens `n` TCP connections to `addr` from the source address `from`
/// that send nothing.
fn silent_sockets(addr: &str, from: &str, n: usize) -> Vec<TcpStream> {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    common::rt().block_on(async {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(format!("{from}:0").parse().unwrap()).unwrap();
            let s = s.connect(addr).await.unwrap().into_std().unwrap();
            s.set_nonblocking(false).unwrap();
            out.push(s);
        }
        out
    })
}

/// How long until the server closes `s` (EOF or reset), at most `within`.
fn closed_after(s: &mut TcpStream, within: Duration) -> Option<Duration> {
    s.set_read_timeout(Some(within)).unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(t.elapsed()),
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return None;
            }
            Err(_) => return Some(t.elapsed()),
        }
    }
}

/// A Postgres 3.0 startup message (no SSLRequest first).
fn startup_message() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend(196_608u32.to_be_bytes());
    for s in ["user", "bounds", "database", "lambdaflow", ""] {
        body.extend(s.as_bytes());
        body.push(0);
    }
    let mut m = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    m.extend(body);
    m
}

/// Reads backend messages until one of type `until` (or the end): their
/// types and bodies.
fn read_until(s: &mut TcpStream, until: u8) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let mut head = [0u8; 5];
        if s.read_exact(&mut head).is_err() {
            return out;
        }
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        if s.read_exact(&mut body).is_err() {
            return out;
        }
        out.push((head[0], body));
        if head[0] == until {
            return out;
        }
    }
}

/// An ErrorResponse's fields: S(everity), C(ode), M(essage), H(int), …
fn fields(body: &[u8]) -> HashMap<char, String> {
    body.split(|b| *b == 0)
        .filter(|f| !f.is_empty())
        .map(|f| (f[0] as char, String::from_utf8_lossy(&f[1..]).into_owned()))
        .collect()
}

/// Logged in over a raw socket (no tokens, no TLS), ready for a query.
fn logged_in(pg: &str) -> TcpStream {
    let mut s = TcpStream::connect(pg).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&startup_message()).unwrap();
    let got = read_until(&mut s, b'Z');
    assert_eq!(
        got.last().map(|m| m.0),
        Some(b'Z'),
        "login answered {got:?}"
    );
    s
}

fn pg_status(server: &Server, token: Option<&str>) -> Value {
    match token {
        Some(t) => server.status_with_token(t)["pg"].clone(),
        None => server.status()["pg"].clone(),
    }
}

#[test]
fn silent_sockets_lock_no_token_holder_out_and_a_refusal_says_why() {
    assert!(
        lambdaflow::frontend::conn::raise_fd_limit() > 2000,
        "the test needs 2,000 open files"
    );
    // The default limits: 256 connections, a quarter per address, 10 s
    // to log in.
    let (_site, server, pg) = serve_with_pg(&format!(
        "[auth]\ntokens = [{{ token = \"{TOKEN}\", scopes = [\"query\"] }}]\n"
    ));
    let dsn = format!("postgres://analyst:{TOKEN}@{pg}/lambdaflow");
    let t0 = Instant::now();
    let mut silent = silent_sockets(&pg, "127.0.0.2", 256);
    let t = Instant::now();
    loop {
        let s = pg_status(&server, Some(TOKEN));
        if s["connections"].as_u64().unwrap_or(0) + s["refused"].as_u64().unwrap_or(0) >= 256 {
            eprintln!("after 256 silent sockets from 127.0.0.2: {s}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "accepts: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A client with a token, from another address, is in at once.
    let t = Instant::now();
    let one = psql(&dsn, "SELECT 1").unwrap_or_else(|e| {
        panic!("256 silent sockets from 127.0.0.2 must not lock a token holder out: {e}")
    });
    assert_eq!(one.trim(), "1");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "logged in after {:?}",
        t.elapsed()
    );

    // One address's share used up: psql shows the refusal itself, not
    // "server sent an error response during SSL exchange".
    let _mine = silent_sockets(&pg, "127.0.0.1", 64);
    // Until the server has taken all 64 (a fixed pause lost this race on a
    // loaded machine: the psql below got in before the last of them).
    let t = Instant::now();
    loop {
        let s = pg_status(&server, Some(TOKEN));
        let seen = s["connections"].as_u64().unwrap_or(0) + s["refused"].as_u64().unwrap_or(0);
        if seen >= 256 + 64 || t.elapsed() > Duration::from_secs(20) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let refused = psql(&dsn, "SELECT 1").expect_err("127.0.0.1 holds its whole share");
    assert!(
        refused.contains("too many connections from 127.0.0.1") && !refused.contains("SSL"),
        "psql must print the refusal: {refused}"
    );

    // The silent ones are closed at the startup deadline (10 s), not held
    // for a minute.
    let within = Duration::from_secs(20).saturating_sub(t0.elapsed());
    let closed = closed_after(&mut silent[0], within);
    assert!(
        closed.is_some(),
        "a silent socket is closed within 10 s of its accept (+ margin); open after {:?}",
        t0.elapsed()
    );
    let s = pg_status(&server, Some(TOKEN));
    eprintln!(
        "silent socket closed {:?} after connecting; {s}",
        t0.elapsed()
    );
    assert!(s["startup_closed"].as_u64().unwrap() >= 1, "{s}");
}

#[test]
fn connections_that_do_not_log_in_or_stay_idle_are_closed_at_their_deadlines() {
    let (_site, _server, pg) = serve_with_pg("startup_timeout = \"1s\"\nidle_timeout = \"2s\"\n");
    // Nothing sent at all.
    let mut silent = TcpStream::connect(&pg).unwrap();
    let took = closed_after(&mut silent, Duration::from_secs(8));
    assert!(
        took.is_some_and(|t| t < Duration::from_secs(4)),
        "a silent socket is closed by startup_timeout (1 s): {took:?}"
    );
    // Half a startup message.
    let mut half = TcpStream::connect(&pg).unwrap();
    half.write_all(&startup_message()[..6]).unwrap();
    let took = closed_after(&mut half, Duration::from_secs(8));
    assert!(
        took.is_some_and(|t| t < Duration::from_secs(4)),
        "half a startup is closed by startup_timeout (1 s): {took:?}"
    );
    // Logged in, then idle: FATAL 57P05, then closed.
    let mut idle = logged_in(&pg);
    let t = Instant::now();
    let got = read_until(&mut idle, b'E');
    let took = t.elapsed();
    let (kind, body) = got.last().expect("a message before the close");
    assert_eq!(*kind, b'E', "{got:?}");
    let f = fields(body);
    assert_eq!(f[&'C'], "57P05", "{f:?}");
    assert_eq!(f[&'S'], "FATAL", "{f:?}");
    assert!(f[&'M'].contains("idle-session timeout"), "{f:?}");
    assert!(
        took > Duration::from_millis(1500) && took < Duration::from_secs(6),
        "closed by idle_timeout (2 s) after {took:?}"
    );
    // A connection in use is not idle.
    let mut busy = logged_in(&pg);
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(800));
        let q = b"SELECT 1\0";
        let mut m = vec![b'Q'];
        m.extend(((q.len() + 4) as u32).to_be_bytes());
        m.extend(q);
        busy.write_all(&m).unwrap();
        let got = read_until(&mut busy, b'Z');
        assert!(
            got.iter().any(|m| m.0 == b'D'),
            "a connection used every 0.8 s stays open: {got:?}"
        );
    }
}

#[test]
fn a_message_of_200_mb_is_refused_at_its_header_and_prepared_statements_are_bounded() {
    let (_site, server, pg) = serve_with_pg("");
    std::thread::sleep(Duration::from_secs(1));
    let idle_rss = server.rss();

    // A raw client: a Query message announcing 200 MB is refused at its
    // header, before its body is read.
    let mut s = logged_in(&pg);
    let len: u32 = 200_000_005;
    let mut m = vec![b'Q'];
    m.extend(len.to_be_bytes());
    m.extend(b"SELECT '");
    s.write_all(&m).unwrap();
    let got = read_until(&mut s, b'Z');
    let (kind, body) = got
        .iter()
        .find(|m| m.0 == b'E')
        .expect("an error before the body is sent");
    assert_eq!(*kind, b'E', "{got:?}");
    let f = fields(body);
    assert_eq!(
        (f[&'S'].as_str(), f[&'C'].as_str()),
        ("ERROR", "54000"),
        "{f:?}"
    );
    assert!(
        f[&'M'].contains("200000005 bytes is over the limit"),
        "{f:?}"
    );
    drop(s);
    // One of 2 MB sent whole: refused, dropped as it arrives, and the
    // session goes on.
    let mut s = logged_in(&pg);
    let mut m = vec![b'Q'];
    m.extend(2_000_005u32.to_be_bytes());
    m.extend(std::iter::repeat_n(b' ', 2_000_000));
    m.push(0);
    m.extend([b'Q', 0, 0, 0, 13]);
    m.extend(b"SELECT 1\0");
    s.write_all(&m).unwrap();
    let first = read_until(&mut s, b'Z');
    let second = read_until(&mut s, b'Z');
    assert!(
        first.iter().any(|m| m.0 == b'E') && second.iter().any(|m| m.0 == b'D'),
        "a refused message, then the next query answered: {first:?} {second:?}"
    );

    // psycopg sending it whole.
    let r = py(
        r#"
import json, sys, psycopg
p = json.load(sys.stdin)
c = psycopg.connect(p["dsn"], autocommit=True)
try:
    c.execute("SELECT length('" + "x" * 200_000_000 + "')")
    out = {"ok": True}
except psycopg.Error as e:
    out = {"error": str(e)}
out["then"] = c.execute("SELECT 1").fetchone()[0]
print(json.dumps(out))
"#,
        json!({ "dsn": format!("postgres://analyst@{pg}/lambdaflow") }),
    );
    let peak = server.peak_rss();
    eprintln!(
        "200 MB query: {r}; server RSS idle {} MiB, peak {} MiB",
        idle_rss >> 20,
        peak >> 20
    );
    assert!(
        r["error"]
            .as_str()
            .is_some_and(|e| e.contains("is over the limit of 1114112 bytes")),
        "a 200 MB statement is refused: {r}"
    );
    assert_eq!(r["then"], 1, "the connection goes on: {r}");
    assert!(
        peak < idle_rss + (100 << 20),
        "a 200 MB message is never read whole: RSS idle {} MiB, peak {} MiB",
        idle_rss >> 20,
        peak >> 20
    );

    // 1,000 named prepared statements, then a clear refusal; DEALLOCATE
    // ALL makes room again; memory comes back after the connection closes.
    let before = server.rss();
    let r = py(
        r#"
import json, sys, psycopg
from psycopg import pq
p = json.load(sys.stdin)
c = psycopg.connect(p["dsn"], autocommit=True)
ok, first_error = 0, None
for i in range(1200):
    r = c.pgconn.prepare(f"s{i}".encode(), b"SELECT ProductName, orders FROM sales_by_product WHERE orders > $1 AND revenue < $1 + 1000")
    if r.status == pq.ExecStatus.COMMAND_OK:
        ok += 1
    elif first_error is None:
        first_error = {"at": i, "message": r.error_message.decode(), "sqlstate": r.error_field(pq.DiagnosticField.SQLSTATE).decode()}
c.execute("DEALLOCATE ALL")
r = c.pgconn.prepare(b"again", b"SELECT 1")
print(json.dumps({"ok": ok, "first_error": first_error, "after_deallocate": r.status == pq.ExecStatus.COMMAND_OK}))
"#,
        json!({ "dsn": format!("postgres://analyst@{pg}/lambdaflow") }),
    );
    assert_eq!(r["ok"], 1000, "1,000 prepared statements at most: {r}");
    assert_eq!(r["first_error"]["at"], 1000, "{r}");
    assert_eq!(r["first_error"]["sqlstate"], "54000", "{r}");
    assert!(
        r["first_error"]["message"]
            .as_str()
            .unwrap()
            .contains("too many prepared statements"),
        "{r}"
    );
    assert_eq!(
        r["after_deallocate"], true,
        "DEALLOCATE ALL makes room: {r}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let after = server.rss();
    eprintln!(
        "1,200 Parse messages: RSS {} MiB before, {} MiB after the connection closed",
        before >> 20,
        after >> 20
    );
    assert!(
        after < before + (64 << 20),
        "prepared statements are freed with their connection: {} → {} MiB",
        before >> 20,
        after >> 20
    );
}

/// One connection per entry of `sizes`, each sending messages of that many
/// `SET`s (one Query message each, as libpq's PQexec sends it) for `secs`
/// seconds: each message's time, outcome and error.
const SET_FLOOD: &str = r#"
import json, sys, threading, time, psycopg
p = json.load(sys.stdin)
end = time.time() + p["secs"]
res = []
def run(n):
    msg = ("SET application_name = 'x';" * n).encode()
    while time.time() < end:
        try:
            with psycopg.connect(p["dsn"], autocommit=True) as c:
                t = time.time()
                r = c.pgconn.exec_(msg)
                res.append([round(time.time() - t, 3), psycopg.pq.ExecStatus(r.status).name, (r.error_message or b"").decode()[:200]])
        except Exception as e:
            res.append([0, "exception", str(e)[:200]])
ts = [threading.Thread(target=run, args=(n,)) for n in p["sizes"]]
for t in ts: t.start()
for t in ts: t.join()
print(json.dumps(res))
"#;

/// One Query message of `sql` (PQexec): seconds taken, status, error.
const ONE_MESSAGE: &str = r#"
import json, sys, time, psycopg
p = json.load(sys.stdin)
t = time.time()
try:
    with psycopg.connect(p["dsn"], autocommit=True) as c:
        t = time.time()
        r = c.pgconn.exec_(p["sql"].encode())
        print(json.dumps({"took": time.time() - t, "status": psycopg.pq.ExecStatus(r.status).name, "error": (r.error_message or b"").decode()[:300]}))
except Exception as e:
    print(json.dumps({"took": time.time() - t, "status": "exception", "error": str(e)[:300]}))
"#;

#[test]
fn floods_of_set_leave_acknowledgements_alone_and_a_huge_in_list_is_answered_in_time() {
    let (_site, server, pg) = serve_with_pg("");
    let url = server.url.clone();
    let dsn = format!("postgres://analyst@{pg}/lambdaflow");
    // The issue's two connections sending 200,000 SETs in one message (5.4
    // MB: over the message bound, refused at its header), and one sending
    // 37,000 (1 MB, under the bound and the guard's 200,000 tokens: parsed
    // and answered on the query pool).
    let sizes = [200_000, 200_000, 37_000];
    let stop = AtomicBool::new(false);
    let alone = std::thread::scope(|s| {
        let h = s.spawn(|| crate::hostile::ack_latencies(&url, &stop, 0));
        std::thread::sleep(Duration::from_secs(5));
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap()
    });
    let stop = AtomicBool::new(false);
    let (beside, floods) = std::thread::scope(|s| {
        let h = s.spawn(|| crate::hostile::ack_latencies(&url, &stop, 1_000_000));
        let floods = py(SET_FLOOD, json!({ "dsn": dsn, "sizes": sizes, "secs": 15 }));
        stop.store(true, Ordering::Relaxed);
        (h.join().unwrap(), floods)
    });
    let (a, b) = (
        crate::hostile::p99(alone.clone()),
        crate::hostile::p99(beside.clone()),
    );
    let floods = floods.as_array().unwrap().clone();
    eprintln!(
        "ingest ack p99 {a:?} alone ({} requests), {b:?} beside connections sending messages of {sizes:?} SETs ({} requests); {} messages: {:?}",
        alone.len(),
        beside.len(),
        floods.len(),
        floods.iter().take(4).collect::<Vec<_>>()
    );
    assert!(
        !floods.is_empty()
            && floods
                .iter()
                .all(|f| f[1] == "COMMAND_OK" || f[1] == "FATAL_ERROR"),
        "every message of SETs is answered, done or refused: {floods:?}"
    );
    let max = beside.iter().max().unwrap();
    eprintln!("slowest acknowledgement beside the floods: {max:?}");
    assert!(
        b < a * 2 + Duration::from_millis(100),
        "ingest acknowledgement p99 stays within 2× of its value alone (+100 ms for a busy 2-core machine): {a:?} alone, {b:?} beside the SET floods"
    );

    // 1.5M items in an IN list (11 MB of SQL): answered, error or result,
    // well within the 10 s deadline.
    let list: Vec<String> = (0..1_500_000).map(|i| i.to_string()).collect();
    let sql = format!(
        "SELECT count(*) FROM sales_by_product WHERE orders IN ({})",
        list.join(",")
    );
    let r = py(ONE_MESSAGE, json!({ "dsn": dsn, "sql": sql }));
    eprintln!("1.5M-item IN list: {r}");
    assert!(
        r["took"].as_f64().unwrap() < 10.0,
        "a 1.5M-item IN list is answered within the 10 s deadline: {r}"
    );
    // The endpoint still answers.
    assert_eq!(psql(&dsn, "SELECT 1").unwrap().trim(), "1");
}

#[test]
fn a_session_behaves_as_poolers_and_drivers_expect() {
    let (_site, _server, pg) = serve_with_pg("");
    let dsn = format!("postgres://analyst@{pg}/lambdaflow");
    let forever = "SELECT count(*) FROM generate_series(1, 1000000000000)";
    for simple in [true, false] {
        let t = Instant::now();
        let got = driver(
            &dsn,
            json!([
                // statement_timeout within the server's 10 s.
                { "sql": "SET statement_timeout = '500ms'", "simple": simple },
                { "sql": forever, "simple": simple },
                { "sql": "SHOW statement_timeout", "simple": simple },
                { "sql": "SET statement_timeout = 0", "simple": simple },
                // A failed transaction block: 25P02 until ROLLBACK.
                { "sql": "BEGIN", "simple": simple },
                { "sql": "SELECT * FROM no_such_view", "simple": simple },
                { "sql": "SELECT 1 AS one", "simple": simple },
                { "sql": "ROLLBACK", "simple": simple },
                { "sql": "SELECT 1 AS one", "simple": simple },
                // What PgBouncer and pgpool send between clients.
                { "sql": "DISCARD ALL", "simple": simple },
                { "sql": "RESET ALL", "simple": simple },
                { "sql": "DEALLOCATE ALL", "simple": simple },
                { "sql": "DEALLOCATE no_such_statement", "simple": simple },
                { "sql": "SHOW ALL", "simple": simple },
                { "sql": "EXPLAIN ANALYZE SELECT count(*) FROM sales_by_product", "simple": simple },
            ]),
        );
        let took = t.elapsed();
        let what = if simple { "simple" } else { "extended" };
        eprintln!("{what}: {took:?}: {got:?}");
        assert_eq!(
            got[1]["error"]["sqlstate"], "57014",
            "{what}: SET statement_timeout = '500ms' stops the query: {}",
            got[1]
        );
        assert!(
            took < Duration::from_secs(8),
            "{what}: the query was stopped at 500 ms, not at the server's 10 s: {took:?}"
        );
        assert_eq!(got[2]["rows"], json!([["500ms"]]), "{what}: {}", got[2]);
        assert!(got[5]["error"].is_object(), "{what}: {}", got[5]);
        assert_eq!(
            got[6]["error"]["sqlstate"], "25P02",
            "{what}: a statement after an error inside BEGIN: {}",
            got[6]
        );
        assert!(got[7]["error"].is_null(), "{what}: ROLLBACK: {}", got[7]);
        assert_eq!(
            got[8]["rows"],
            json!([[1]]),
            "{what}: after ROLLBACK: {}",
            got[8]
        );
        for (i, s) in [
            (9, "DISCARD ALL"),
            (10, "RESET ALL"),
            (11, "DEALLOCATE ALL"),
        ] {
            assert!(got[i]["error"].is_null(), "{what}: {s}: {}", got[i]);
        }
        assert_eq!(got[12]["error"]["sqlstate"], "26000", "{what}: {}", got[12]);
        assert_eq!(
            got[13]["columns"],
            json!(["name", "setting", "description"]),
            "{what}: SHOW ALL: {}",
            got[13]
        );
        let settings = got[13]["rows"].as_array().unwrap();
        assert!(
            settings.iter().any(|r| r[0] == "statement_timeout")
                && settings.iter().any(|r| r[0] == "server_version"),
            "{what}: SHOW ALL lists the settings: {}",
            got[13]
        );
        let explain = &got[14];
        assert!(
            explain["rows"].as_array().is_some_and(|r| !r.is_empty())
                || !explain["error"]["message"]
                    .as_str()
                    .unwrap_or("Internal error")
                    .contains("Internal error"),
            "{what}: EXPLAIN ANALYZE answers, or says clearly why not: {explain}"
        );
    }
}

#[test]
fn a_cancelled_query_stops_and_frees_its_slot() {
    let (_site, server, pg) = serve_with_pg("");
    let dsn = format!("postgres://analyst@{pg}/lambdaflow");
    // As many endless queries as the pool runs at once (4), each cancelled
    // after a second, as psql's Ctrl-C or psycopg's cancel() does.
    let r = py(
        r#"
import json, sys, threading, time, psycopg
p = json.load(sys.stdin)
conns = [psycopg.connect(p["dsn"], autocommit=True) for _ in range(4)]
out = [None] * 4
def run(i):
    try:
        conns[i].execute("SELECT count(*) FROM generate_series(1, 1000000000000)")
        out[i] = "finished"
    except psycopg.Error as e:
        out[i] = e.sqlstate
ts = [threading.Thread(target=run, args=(i,)) for i in range(4)]
for t in ts: t.start()
time.sleep(1.5)
for c in conns: c.cancel()
for t in ts: t.join(30)
t0 = time.time()
try:
    with psycopg.connect(p["dsn"], autocommit=True) as c:
        one = c.execute("SELECT 1").fetchone()[0]
except psycopg.Error as e:
    one = f"{e.sqlstate}: {e}"
print(json.dumps({"cancelled": out, "next": one, "next_took": time.time() - t0}))
"#,
        json!({ "dsn": dsn }),
    );
    eprintln!("cancel: {r}");
    assert_eq!(
        r["cancelled"],
        json!(["57014", "57014", "57014", "57014"]),
        "each cancel() stops its query: {r}"
    );
    assert_eq!(r["next"], 1, "{r}");
    assert!(
        r["next_took"].as_f64().unwrap() < 1.5,
        "the cancelled queries' slots are free: the next query waits for none ({r})"
    );
    // And they no longer burn CPU.
    let cpu = |pid: u32| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let pid = server.child.id();
    std::thread::sleep(Duration::from_secs(1));
    let (c0, t) = (cpu(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(3));
    let ticks = cpu(pid) - c0;
    let secs = ticks as f64 / 100.0 / t.elapsed().as_secs_f64();
    eprintln!("server CPU after the cancels: {secs:.2} cores");
    assert!(
        secs < 0.5,
        "cancelled queries stop: the server uses {secs:.2} cores 1 s after the cancels"
    );
}

#[test]
fn prepared_statements_of_all_connections_share_one_budget() {
    // ~34 KiB a statement as estimated: about 120 fit in 4 MiB.
    let (_site, _server, pg) = serve_with_pg("max_prepared_bytes = \"4MiB\"\n");
    let r = py(
        r#"
import json, sys, time, psycopg
from psycopg import pq
p = json.load(sys.stdin)
sql = b"SELECT ProductName, orders FROM sales_by_product WHERE orders > $1 AND revenue < $1 + 1000"
def fill(c, prefix):
    ok, err = 0, None
    for i in range(100):
        r = c.pgconn.prepare(f"{prefix}{i}".encode(), sql)
        if r.status == pq.ExecStatus.COMMAND_OK:
            ok += 1
        elif err is None:
            err = {"message": r.error_message.decode(), "sqlstate": r.error_field(pq.DiagnosticField.SQLSTATE).decode()}
    return ok, err
a = psycopg.connect(p["dsn"], autocommit=True)
b = psycopg.connect(p["dsn"], autocommit=True)
ok_a, _ = fill(a, "a")
ok_b, err_b = fill(b, "b")
a.close()
time.sleep(0.5)
after = b.pgconn.prepare(b"after", sql).status == pq.ExecStatus.COMMAND_OK
print(json.dumps({"a": ok_a, "b": ok_b, "error": err_b, "after_close": after}))
"#,
        json!({ "dsn": format!("postgres://analyst@{pg}/lambdaflow") }),
    );
    eprintln!("budget: {r}");
    assert_eq!(r["a"], 100, "the first connection's 100 fit: {r}");
    let b = r["b"].as_u64().unwrap();
    assert!(
        (1..100).contains(&b),
        "the second connection fills the rest of the budget, then is refused: {r}"
    );
    assert_eq!(r["error"]["sqlstate"], "54000", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("hold their budget of 4.0 MiB"),
        "{r}"
    );
    assert_eq!(
        r["after_close"], true,
        "a closed connection's statements leave the budget: {r}"
    );
}
