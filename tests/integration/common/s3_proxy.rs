//! An S3 fault proxy: a small HTTP/1.1 proxy on 127.0.0.1 in front of moto
//! that reproduces what S3 does and moto does not, on demand (scripted, for
//! one kind of request) or at random (seeded).
//!
//! ```text
//!  lambdaflow ──HTTP──▶ S3Proxy ──HTTP──▶ moto
//!                         │ per request: pass, or one Fault:
//!                         │  SlowDown             503 + S3's XML, nothing forwarded
//!                         │  InternalError        500 + S3's XML, nothing forwarded
//!                         │  InternalErrorAfterWrite  forwarded (moto wrote it), then 500
//!                         │  WrittenThenDropped   forwarded, then the connection closed, no answer
//!                         │  WrittenThenHung      forwarded, then no answer until the client gives up
//!                         │  ResetMidUpload       half the body read, then RST; nothing forwarded
//!                         │  Unreachable          the head read, then no answer until the client
//!                         │                       gives up; nothing forwarded (a partition)
//! ```
//!
//! The last three are S3's "the request timed out after the object was
//! written": the client retries, and a conditional write's retry
//! (`If-None-Match: *`, `If-Match`) gets `412 PreconditionFailed` although
//! this very writer wrote the object.
//!
//! One request per connection: every answer carries `Connection: close`, so
//! the client never reuses a connection the proxy is about to break.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the proxy does to one request instead of passing it through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fault {
    /// `503 SlowDown`, as S3 answers a request rate over its limits.
    SlowDown,
    /// `500 InternalError`, nothing done.
    InternalError,
    /// The request is done (forwarded to moto), then `500 InternalError`:
    /// S3's "the outcome is unknown, retry".
    InternalErrorAfterWrite,
    /// The request is done, then the connection closes without an answer.
    WrittenThenDropped,
    /// The request is done, then no answer at all until the client's own
    /// timeout closes the connection.
    WrittenThenHung,
    /// The connection is reset after half the request body; nothing forwarded.
    ResetMidUpload,
    /// Nothing forwarded and no answer until the client's own timeout: the
    /// node is cut off from S3 (a partition), not refused by it. Not in
    /// [`Fault::ALL`], whose faults are S3's own.
    Unreachable,
}

impl Fault {
    pub const ALL: [Fault; 6] = [
        Fault::SlowDown,
        Fault::InternalError,
        Fault::InternalErrorAfterWrite,
        Fault::WrittenThenDropped,
        Fault::WrittenThenHung,
        Fault::ResetMidUpload,
    ];

    /// Whether the fault can be done to this request (a reset mid-upload
    /// needs a body).
    fn applies(self, req: &Request) -> bool {
        match self {
            Fault::ResetMidUpload => req.declared_len() >= 2,
            _ => true,
        }
    }
}

/// Which requests a rule or the random faults apply to.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    /// `PUT`, `GET`, …; any when `None`.
    pub method: Option<&'static str>,
    /// A substring of the request target (path and query).
    pub path: Option<String>,
    /// Only conditional writes (`If-None-Match` or `If-Match`).
    pub conditional: bool,
}

impl Matcher {
    /// `method` requests whose target contains `path`.
    pub fn new(method: &'static str, path: &str) -> Matcher {
        Matcher {
            method: Some(method),
            path: Some(path.to_string()),
            conditional: false,
        }
    }

    /// Every request.
    pub fn any() -> Matcher {
        Matcher::default()
    }

    fn matches(&self, req: &Request) -> bool {
        self.method.is_none_or(|m| m == req.method)
            && self.path.as_ref().is_none_or(|p| req.target.contains(p))
            && (!self.conditional || req.conditional())
    }
}

/// One fault done to one request: what the test can report.
#[derive(Debug, Clone)]
pub struct Injected {
    pub method: String,
    pub target: String,
    pub fault: Fault,
    /// What moto answered, for the faults that forwarded the request.
    pub upstream_status: Option<u16>,
}

struct Rule {
    matcher: Matcher,
    fault: Fault,
    /// How many more requests it applies to.
    left: usize,
}

struct Random {
    state: u64,
    matcher: Matcher,
    /// Out of 1,000 matching requests, how many get a fault.
    per_mille: u64,
    menu: Vec<Fault>,
}

impl Random {
    /// splitmix64: a seeded sequence, the same for the same seed.
    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[derive(Default)]
struct State {
    rules: Vec<Rule>,
    random: Option<Random>,
    injected: Vec<Injected>,
    passed: u64,
    /// (method, target) of each request that passed.
    log: Vec<(String, String)>,
}

impl State {
    fn decide(&mut self, req: &Request) -> Option<Fault> {
        if let Some(rule) = self
            .rules
            .iter_mut()
            .find(|r| r.left > 0 && r.matcher.matches(req) && r.fault.applies(req))
        {
            rule.left -= 1;
            return Some(rule.fault);
        }
        let random = self.random.as_mut()?;
        if !random.matcher.matches(req) || random.next() % 1000 >= random.per_mille {
            return None;
        }
        let applicable: Vec<Fault> = random
            .menu
            .iter()
            .copied()
            .filter(|f| f.applies(req))
            .collect();
        if applicable.is_empty() {
            return None;
        }
        let i = (random.next() % applicable.len() as u64) as usize;
        Some(applicable[i])
    }
}

/// The proxy; stops accepting on drop.
pub struct S3Proxy {
    /// `http://127.0.0.1:<port>`: the endpoint to give lambdaflow.
    pub endpoint: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    addr: String,
}

/// How long a hung request is held at most, should the client never give up.
const HANG_AT_MOST: Duration = Duration::from_secs(120);

impl S3Proxy {
    /// A proxy in front of `upstream` (`http://127.0.0.1:<port>`).
    pub fn start(upstream: &str) -> S3Proxy {
        let upstream = upstream
            .strip_prefix("http://")
            .expect("an http:// endpoint")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state: Arc<Mutex<State>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (state, upstream) = (state.clone(), upstream.clone());
                    std::thread::spawn(move || {
                        let _ = serve(conn, &upstream, &state);
                    });
                }
            });
        }
        S3Proxy {
            endpoint: format!("http://{addr}"),
            state,
            stop,
            addr,
        }
    }

    /// The next `times` requests that `matcher` matches get `fault`.
    pub fn inject(&self, matcher: Matcher, fault: Fault, times: usize) {
        self.state.lock().unwrap().rules.push(Rule {
            matcher,
            fault,
            left: times,
        });
    }

    /// From now on, `per_mille` of the requests `matcher` matches get a
    /// fault drawn from `menu`, in an order fixed by `seed`.
    pub fn random(&self, seed: u64, matcher: Matcher, per_mille: u64, menu: &[Fault]) {
        self.state.lock().unwrap().random = Some(Random {
            state: seed,
            matcher,
            per_mille,
            menu: menu.to_vec(),
        });
    }

    /// No more faults (scripted or random): every request passes.
    pub fn heal(&self) {
        let mut s = self.state.lock().unwrap();
        s.rules.clear();
        s.random = None;
    }

    /// Scripted faults not yet done.
    pub fn pending(&self) -> usize {
        self.state
            .lock()
            .unwrap()
            .rules
            .iter()
            .map(|r| r.left)
            .sum()
    }

    /// Every fault done so far, in order.
    pub fn injected(&self) -> Vec<Injected> {
        self.state.lock().unwrap().injected.clone()
    }

    /// How many requests passed untouched.
    pub fn passed(&self) -> u64 {
        self.state.lock().unwrap().passed
    }

    /// Requests that passed untouched with `method` and a target containing `path`.
    pub fn passed_matching(&self, method: &str, path: &str) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .log
            .iter()
            .filter(|(m, t)| m == method && t.contains(path))
            .map(|(_, t)| t.clone())
            .collect()
    }

    /// Faults done so far, by kind.
    pub fn tally(&self) -> std::collections::BTreeMap<Fault, usize> {
        let mut t = std::collections::BTreeMap::new();
        for i in self.state.lock().unwrap().injected.iter() {
            *t.entry(i.fault).or_default() += 1;
        }
        t
    }

    /// What a `serve` child needs to reach moto through this proxy (moto's
    /// own `env`, the endpoint replaced).
    pub fn env(&self, direct: Vec<(String, String)>) -> Vec<(String, String)> {
        direct
            .into_iter()
            .map(|(k, v)| {
                if k == "AWS_ENDPOINT_URL" {
                    (k, self.endpoint.clone())
                } else {
                    (k, v)
                }
            })
            .collect()
    }

    /// Options of [`lambdaflow::storage::Storage::s3_with`] for a client in
    /// this process that goes through the proxy, with a client timeout of
    /// `timeout` (what a hung request costs).
    pub fn storage(&self, root: &str, timeout: &str) -> lambdaflow::storage::Storage {
        lambdaflow::storage::Storage::s3_with(
            root,
            &[
                ("aws_endpoint", &self.endpoint),
                ("aws_allow_http", "true"),
                ("aws_access_key_id", "test"),
                ("aws_secret_access_key", "test"),
                ("aws_region", "us-east-1"),
                ("timeout", timeout),
            ],
        )
        .unwrap()
    }
}

impl Drop for S3Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so that it sees `stop`.
        let _ = TcpStream::connect(&self.addr);
    }
}

/// A request as read from the client: its head (kept as sent) and body.
struct Request {
    method: String,
    target: String,
    /// Header lines of the head, without the request line and the blank line.
    headers: Vec<(String, String)>,
    request_line: String,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body's length as the head declares it (chunked: unknown, 0).
    fn declared_len(&self) -> usize {
        self.header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn conditional(&self) -> bool {
        self.header("if-none-match").is_some() || self.header("if-match").is_some()
    }

    /// The head as forwarded: the client's headers, `Connection: close`.
    fn head(&self) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.request_line);
        for (k, v) in &self.headers {
            if k.eq_ignore_ascii_case("connection") || k.eq_ignore_ascii_case("keep-alive") {
                continue;
            }
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("Connection: close\r\n\r\n");
        out.into_bytes()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads more into `buf`; an error at EOF.
fn fill(conn: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 16 * 1024];
    let n = conn.read(&mut chunk)?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Reads the head; returns it and what was read past it.
fn read_head(conn: &mut TcpStream) -> std::io::Result<(Request, Vec<u8>)> {
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        fill(conn, &mut buf)?;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let rest = buf[end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok((
        Request {
            method,
            target,
            headers,
            request_line,
            body: Vec::new(),
        },
        rest,
    ))
}

/// Reads the rest of the body (Content-Length or chunked) into `req.body`,
/// kept as sent.
fn read_body(conn: &mut TcpStream, req: &mut Request, mut buf: Vec<u8>) -> std::io::Result<()> {
    let chunked = req
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        // Walk the chunks to find the end; forward the bytes as they came.
        let mut at = 0;
        loop {
            let line_end = loop {
                if let Some(i) = find(&buf[at..], b"\r\n") {
                    break at + i;
                }
                fill(conn, &mut buf)?;
            };
            let size_text = String::from_utf8_lossy(&buf[at..line_end]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            if size == 0 {
                // Trailers, then a blank line.
                let end = loop {
                    if let Some(i) = find(&buf[line_end..], b"\r\n\r\n") {
                        break line_end + i + 4;
                    }
                    fill(conn, &mut buf)?;
                };
                buf.truncate(end);
                break;
            }
            let next = line_end + 2 + size + 2;
            while buf.len() < next {
                fill(conn, &mut buf)?;
            }
            at = next;
        }
    } else {
        let len: usize = req
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < len {
            fill(conn, &mut buf)?;
        }
        buf.truncate(len);
    }
    req.body = buf;
    Ok(())
}

/// Sends the request to moto and reads its whole answer (moto closes the
/// connection after it: `Connection: close`).
fn forward(upstream: &str, req: &Request) -> std::io::Result<Vec<u8>> {
    let mut up = TcpStream::connect(upstream)?;
    up.set_read_timeout(Some(Duration::from_secs(60)))?;
    up.write_all(&req.head())?;
    up.write_all(&req.body)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    Ok(answer)
}

fn status_of(answer: &[u8]) -> Option<u16> {
    let line_end = find(answer, b"\r\n")?;
    std::str::from_utf8(&answer[..line_end])
        .ok()?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

/// moto's answer with `Connection: close` (and no other connection header).
fn closing(answer: Vec<u8>) -> Vec<u8> {
    let Some(end) = find(&answer, b"\r\n\r\n") else {
        return answer;
    };
    let head = String::from_utf8_lossy(&answer[..end]).to_string();
    let mut out = String::new();
    for (i, line) in head.split("\r\n").enumerate() {
        let name = line.split(':').next().unwrap_or_default().trim();
        if i > 0
            && (name.eq_ignore_ascii_case("connection") || name.eq_ignore_ascii_case("keep-alive"))
        {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&answer[end + 4..]);
    bytes
}

/// An S3 error answer: the status, and the XML body S3 sends with it.
fn s3_error(status: u16, reason: &str, code: &str, message: &str, req: &Request) -> Vec<u8> {
    let resource = req.target.split('?').next().unwrap_or_default();
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><Resource>{resource}</Resource><RequestId>FAULTPROXY0000001</RequestId><HostId>lambdaflow-test-fault-proxy</HostId></Error>"
    );
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nx-amz-request-id: FAULTPROXY0000001\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn slow_down(req: &Request) -> Vec<u8> {
    s3_error(
        503,
        "Slow Down",
        "SlowDown",
        "Please reduce your request rate.",
        req,
    )
}

fn internal_error(req: &Request) -> Vec<u8> {
    s3_error(
        500,
        "Internal Server Error",
        "InternalError",
        "We encountered an internal error. Please try again.",
        req,
    )
}

/// Closes with a TCP reset rather than a FIN: what a peer that went away
/// mid-upload looks like.
fn reset(conn: TcpStream) {
    let _ = socket_linger_zero(&conn);
    drop(conn);
}

fn socket_linger_zero(conn: &TcpStream) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a properly sized `linger`.
    let rc = unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn serve(mut conn: TcpStream, upstream: &str, state: &Mutex<State>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    let (mut req, mut rest) = read_head(&mut conn)?;
    let fault = state.lock().unwrap().decide(&req);
    let record = |req: &Request, fault: Fault, upstream_status: Option<u16>| {
        state.lock().unwrap().injected.push(Injected {
            method: req.method.clone(),
            target: req.target.clone(),
            fault,
            upstream_status,
        });
    };
    if fault == Some(Fault::ResetMidUpload) {
        // Half the body, then a reset; nothing reaches moto.
        let half = req.declared_len() / 2;
        while rest.len() < half {
            fill(&mut conn, &mut rest)?;
        }
        record(&req, Fault::ResetMidUpload, None);
        reset(conn);
        return Ok(());
    }
    read_body(&mut conn, &mut req, rest)?;
    match fault {
        None => {
            let answer = forward(upstream, &req)?;
            let mut st = state.lock().unwrap();
            st.passed += 1;
            st.log.push((req.method.clone(), req.target.clone()));
            drop(st);
            conn.write_all(&closing(answer))?;
        }
        Some(f @ Fault::SlowDown) => {
            record(&req, f, None);
            conn.write_all(&slow_down(&req))?;
        }
        Some(f @ Fault::InternalError) => {
            record(&req, f, None);
            conn.write_all(&internal_error(&req))?;
        }
        Some(f @ Fault::InternalErrorAfterWrite) => {
            let answer = forward(upstream, &req)?;
            record(&req, f, status_of(&answer));
            conn.write_all(&internal_error(&req))?;
        }
        Some(f @ Fault::WrittenThenDropped) => {
            let answer = forward(upstream, &req)?;
            record(&req, f, status_of(&answer));
            // A FIN with no answer: "connection closed before message completed".
        }
        Some(f @ Fault::WrittenThenHung) => {
            let answer = forward(upstream, &req)?;
            record(&req, f, status_of(&answer));
            // Nothing until the client closes (its timeout), bounded.
            conn.set_read_timeout(Some(HANG_AT_MOST))?;
            let mut sink = [0u8; 1024];
            while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
        }
        Some(f @ Fault::Unreachable) => {
            record(&req, f, None);
            conn.set_read_timeout(Some(HANG_AT_MOST))?;
            let mut sink = [0u8; 1024];
            while matches!(conn.read(&mut sink), Ok(n) if n > 0) {}
        }
        Some(Fault::ResetMidUpload) => unreachable!("handled above"),
    }
    let _ = conn.shutdown(Shutdown::Both);
    Ok(())
}
