//! A Kinesis service-behaviour proxy: an HTTP/1.1 proxy in front of
//! kinesalite that does what AWS's documentation says the service does and
//! the emulator does not, on demand or at random (seeded).
//!
//! ```text
//!  node / producer ──HTTP (awsJson1.1)──▶ proxy ──▶ kinesalite
//!                                          │ expired shards: left out of ListShards,
//!                                          │   ResourceNotFoundException for GetShardIterator
//!                                          │ PutRecords: a record over 1 MiB fails the whole call
//!                                          │   (ValidationException); records refused one by one
//!                                          │   (FailedRecordCount > 0, not forwarded)
//!                                          │ GetRecords: ProvisionedThroughputExceeded,
//!                                          │   ExpiredIteratorException, 500 InternalFailure
//!                                          └ a call forwarded, then the connection dropped
//!                                            without an answer (a timeout after the write)
//! ```
//!
//! kinesalite checks no request signature, so the proxy may rewrite a
//! PutRecords body (the records it refuses are not forwarded).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use serde_json::Value;

/// AWS's per-record limit: data and partition key together.
pub const RECORD_LIMIT: usize = 1 << 20;

/// What the proxy does to the calls it sees.
#[derive(Debug, Clone)]
pub struct Faults {
    /// Shards past retention: absent from ListShards, `ResourceNotFound`.
    pub expired: BTreeSet<String>,
    /// Refuse a PutRecords call whole when a record is over this.
    pub record_limit: Option<usize>,
    /// Answer every GetRecords with `ProvisionedThroughputExceeded`.
    pub throttle_get_records: bool,
    /// After this many PutRecords calls, refuse every record of every call
    /// (`ProvisionedThroughputExceeded`, one by one, as a shard over its
    /// write budget does).
    pub refuse_puts_after: Option<u64>,
    /// PutRecords calls seen.
    pub puts_seen: u64,
    /// Forward every PutRecords, then drop its answer with the connection
    /// (a timeout after the write, as a client sees it).
    pub drop_put_answers: bool,
    /// With a seed: faults at random, each call with these probabilities
    /// (per mille).
    pub random: Option<Random>,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            expired: BTreeSet::new(),
            record_limit: Some(RECORD_LIMIT),
            throttle_get_records: false,
            refuse_puts_after: None,
            puts_seen: 0,
            drop_put_answers: false,
            random: None,
        }
    }
}

/// Seeded random faults, in per mille of the calls each applies to.
#[derive(Debug, Clone)]
pub struct Random {
    pub state: u64,
    /// A PutRecords record refused (`ProvisionedThroughputExceeded` or
    /// `InternalFailure`), not forwarded.
    pub put_record_refused: u32,
    /// A whole PutRecords call throttled.
    pub put_throttled: u32,
    /// GetRecords throttled.
    pub get_throttled: u32,
    /// GetRecords: the iterator has expired.
    pub get_expired_iterator: u32,
    /// GetRecords or ListShards: 500 InternalFailure.
    pub internal: u32,
    /// A read call (GetRecords, ListShards, GetShardIterator) forwarded and
    /// its answer dropped with the connection.
    pub read_dropped: u32,
}

impl Random {
    pub fn new(seed: u64) -> Random {
        Random {
            state: seed,
            put_record_refused: 50,
            put_throttled: 30,
            get_throttled: 80,
            get_expired_iterator: 30,
            internal: 30,
            read_dropped: 20,
        }
    }

    /// SplitMix64.
    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn hit(&mut self, per_mille: u32) -> bool {
        per_mille > 0 && self.next() % 1000 < per_mille as u64
    }
}

/// What the proxy did, counted.
#[derive(Debug, Default)]
pub struct Counts {
    pub calls: AtomicU64,
    pub get_records: AtomicU64,
    pub faults: AtomicU64,
    pub records_refused: AtomicU64,
}

/// A running proxy; it stops with the test process.
pub struct KinesisProxy {
    pub endpoint: String,
    pub faults: Arc<Mutex<Faults>>,
    pub counts: Arc<Counts>,
}

impl KinesisProxy {
    /// A proxy to `upstream` (`http://127.0.0.1:PORT`) on a free port.
    pub fn start(upstream: &str, faults: Faults) -> KinesisProxy {
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let faults = Arc::new(Mutex::new(faults));
        let counts = Arc::new(Counts::default());
        let (f, c) = (faults.clone(), counts.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (upstream, f, c) = (upstream.clone(), f.clone(), c.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &upstream, &f, &c);
                });
            }
        });
        KinesisProxy {
            endpoint: format!("http://{addr}"),
            faults,
            counts,
        }
    }

    pub fn set(&self, change: impl FnOnce(&mut Faults)) {
        change(&mut self.faults.lock().unwrap());
    }
}

fn read_message(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(Some((head, body)))
}

/// The head with its Content-Length set to `len`.
fn with_length(head: &str, len: usize) -> String {
    let mut out = String::new();
    for line in head.split_inclusive("\r\n") {
        if line
            .split_once(':')
            .is_some_and(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        {
            out.push_str(&format!("Content-Length: {len}\r\n"));
        } else {
            out.push_str(line);
        }
    }
    out
}

fn error_reply(to: &mut TcpStream, status: &str, kind: &str, message: &str) -> std::io::Result<()> {
    let body = serde_json::json!({ "__type": kind, "message": message }).to_string();
    write!(
        to,
        "HTTP/1.1 {status}\r\nContent-Type: application/x-amz-json-1.1\r\nx-amzn-RequestId: lambdaflow-proxy\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

enum Plan {
    Forward,
    /// Answer with this error without forwarding.
    Error(&'static str, &'static str, String),
    /// Forward, then drop the connection without the answer.
    DropAnswer,
}

fn serve(
    client: TcpStream,
    upstream: &str,
    faults: &Mutex<Faults>,
    counts: &Counts,
) -> std::io::Result<()> {
    let mut from_client = BufReader::new(client.try_clone()?);
    let mut to_client = client;
    while let Some((head, mut body)) = read_message(&mut from_client)? {
        // A connection upstream per call: kinesalite closes idle ones, and
        // the proxy must not pass that on as a call without an answer.
        let up = TcpStream::connect(upstream)?;
        let mut from_up = BufReader::new(up.try_clone()?);
        let mut to_up = up;
        counts.calls.fetch_add(1, Ordering::Relaxed);
        let target = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("x-amz-target")
                    .then(|| v.trim().trim_start_matches("Kinesis_20131202.").to_string())
            })
            .unwrap_or_default();
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        // Records refused one by one: their indexes in the original call.
        let mut refused: Vec<(usize, &'static str)> = Vec::new();
        let plan = {
            let mut f = faults.lock().unwrap();
            plan(&target, &request, &mut f, &mut refused)
        };
        if target == "GetRecords" {
            counts.get_records.fetch_add(1, Ordering::Relaxed);
        }
        match plan {
            Plan::Error(status, kind, message) => {
                counts.faults.fetch_add(1, Ordering::Relaxed);
                error_reply(&mut to_client, status, kind, &message)?;
                continue;
            }
            Plan::DropAnswer => {
                counts.faults.fetch_add(1, Ordering::Relaxed);
                to_up.write_all(head.as_bytes())?;
                to_up.write_all(&body)?;
                let _ = read_message(&mut from_up)?;
                let _ = to_client.shutdown(Shutdown::Both);
                return Ok(());
            }
            Plan::Forward => {}
        }
        if !refused.is_empty() {
            counts
                .records_refused
                .fetch_add(refused.len() as u64, Ordering::Relaxed);
            let mut req = request.clone();
            let records = req["Records"].as_array_mut().expect("records");
            for &(i, _) in refused.iter().rev() {
                records.remove(i);
            }
            if records.is_empty() {
                // Nothing to forward: answer for every record here.
                let results: Vec<Value> = refused.iter().map(|(_, k)| refused_entry(k)).collect();
                let body = serde_json::json!({
                    "FailedRecordCount": results.len(),
                    "Records": results,
                })
                .to_string();
                write!(
                    to_client,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\nx-amzn-RequestId: lambdaflow-proxy\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )?;
                continue;
            }
            body = serde_json::to_vec(&req).unwrap();
        }
        to_up.write_all(with_length(&head, body.len()).as_bytes())?;
        to_up.write_all(&body)?;
        let Some((resp_head, mut resp_body)) = read_message(&mut from_up)? else {
            return Ok(());
        };
        let mut resp_head = resp_head;
        if target == "ListShards" || !refused.is_empty() {
            let mut resp: Value = serde_json::from_slice(&resp_body).unwrap_or(Value::Null);
            if target == "ListShards"
                && let Some(shards) = resp["Shards"].as_array_mut()
            {
                let f = faults.lock().unwrap();
                shards.retain(|s| {
                    !s["ShardId"]
                        .as_str()
                        .is_some_and(|id| f.expired.contains(id))
                });
            }
            if !refused.is_empty()
                && let Some(results) = resp["Records"].as_array_mut()
            {
                for &(i, kind) in &refused {
                    results.insert(i.min(results.len()), refused_entry(kind));
                }
                let failed = results
                    .iter()
                    .filter(|r| r.get("ErrorCode").is_some())
                    .count();
                resp["FailedRecordCount"] = failed.into();
            }
            resp_body = serde_json::to_vec(&resp).unwrap();
            resp_head = with_length(&resp_head, resp_body.len());
        }
        to_client.write_all(resp_head.as_bytes())?;
        to_client.write_all(&resp_body)?;
    }
    Ok(())
}

fn refused_entry(kind: &str) -> Value {
    serde_json::json!({
        "ErrorCode": kind,
        "ErrorMessage": match kind {
            "InternalFailure" => "Internal service failure.",
            _ => "Rate exceeded for shard shardId-000000000000 in stream events under account 000000000000.",
        },
    })
}

/// What to do with one call.
fn plan(
    target: &str,
    request: &Value,
    f: &mut Faults,
    refused: &mut Vec<(usize, &'static str)>,
) -> Plan {
    match target {
        "GetShardIterator" => {
            if let Some(id) = request["ShardId"].as_str()
                && f.expired.contains(id)
            {
                return Plan::Error(
                    "400 Bad Request",
                    "ResourceNotFoundException",
                    format!(
                        "Shard {id} in stream {} under account 000000000000 does not exist",
                        request["StreamName"].as_str().unwrap_or("?")
                    ),
                );
            }
        }
        "PutRecords" => {
            if let Some(limit) = f.record_limit
                && let Some(records) = request["Records"].as_array()
            {
                for (i, r) in records.iter().enumerate() {
                    let data = r["Data"].as_str().unwrap_or("");
                    let len = base64::engine::general_purpose::STANDARD
                        .decode(data)
                        .map_or(data.len() * 3 / 4, |d| d.len());
                    let key = r["PartitionKey"].as_str().map_or(0, str::len);
                    if len + key > limit {
                        return Plan::Error(
                            "400 Bad Request",
                            "ValidationException",
                            format!(
                                "1 validation error detected: Value at 'records.{}.member.data' failed to satisfy constraint: Member must have length less than or equal to {limit}",
                                i + 1
                            ),
                        );
                    }
                }
            }
        }
        _ => {}
    }
    if target == "GetRecords" && f.throttle_get_records {
        return throttled();
    }
    if target == "PutRecords" && f.drop_put_answers {
        return Plan::DropAnswer;
    }
    if target == "PutRecords" {
        f.puts_seen += 1;
        if f.refuse_puts_after.is_some_and(|n| f.puts_seen > n) {
            let n = request["Records"].as_array().map_or(0, Vec::len);
            refused.extend((0..n).map(|i| (i, "ProvisionedThroughputExceededException")));
            return Plan::Forward;
        }
    }
    let Some(r) = f.random.as_mut() else {
        return Plan::Forward;
    };
    match target {
        "PutRecords" => {
            if r.hit(r.put_throttled) {
                return throttled();
            }
            let n = request["Records"].as_array().map_or(0, Vec::len);
            for i in 0..n {
                if r.hit(r.put_record_refused) {
                    let kind = if r.next() % 4 == 0 {
                        "InternalFailure"
                    } else {
                        "ProvisionedThroughputExceededException"
                    };
                    refused.push((i, kind));
                }
            }
            Plan::Forward
        }
        "GetRecords" => {
            if r.hit(r.get_throttled) {
                throttled()
            } else if r.hit(r.get_expired_iterator) {
                Plan::Error(
                    "400 Bad Request",
                    "ExpiredIteratorException",
                    "Iterator expired. The iterator was created at time X while right now it is Y which is further in the future than the tolerated delay of 300000 milliseconds.".into(),
                )
            } else if r.hit(r.internal) {
                internal()
            } else if r.hit(r.read_dropped) {
                Plan::DropAnswer
            } else {
                Plan::Forward
            }
        }
        "ListShards" | "GetShardIterator" => {
            if r.hit(r.internal) {
                internal()
            } else if r.hit(r.read_dropped) {
                Plan::DropAnswer
            } else {
                Plan::Forward
            }
        }
        _ => Plan::Forward,
    }
}

fn throttled() -> Plan {
    Plan::Error(
        "400 Bad Request",
        "ProvisionedThroughputExceededException",
        "Rate exceeded for shard shardId-000000000000 in stream events under account 000000000000."
            .into(),
    )
}

fn internal() -> Plan {
    Plan::Error(
        "500 Internal Server Error",
        "InternalFailure",
        "Internal service failure.".into(),
    )
}
