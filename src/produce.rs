//! `lambdaflow produce`: the paper's event producer (its KinesisProducer).
//!
//! Generates the paper's events —
//! `{"zipcode":95126,"ProductName":"product2","price":16,"timestamp":"2014-11-01 19:35:41.158"}`
//! — or reads an NDJSON file, and sends them to `POST /v1/events` in batches
//! over several concurrent connections, at full speed or at a set rate, with a
//! progress bar and a throughput summary.
//!
//! Event `i` is a pure function of `(seed, i)`: with `--seed`, the events are
//! the same whatever the batch size, concurrency or rate, and their event
//! times start at `--start` (default: the paper's 2014-11-01 00:00:00.000) one
//! millisecond apart. Without `--seed`, each event's time is the moment it was
//! generated, like a live producer. `--late F` moves a fraction F of events
//! one to six hours into the past (late data, which the handoff must count).
//!
//! Delivery is exactly once to a server on the embedded log: each request
//! carries this run's producer name and its batch number
//! (`Lambdaflow-Producer`, `Lambdaflow-Sequence`), a request that fails with
//! 429/503/507 or a lost connection is retried with backoff, and a retry of a
//! request the server had stored is answered with its original offsets,
//! nothing stored twice (`stream::requests`). A server that cannot recognise
//! re-sent requests (a Kafka or Kinesis node) says so; the run goes on
//! without the headers, at least once, and the summary says so.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{Datelike, NaiveDateTime, Timelike};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;

use crate::schema::PAPER_TIME_FORMAT;

#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("could not read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid --start {value:?}: expected a time like \"2014-11-01 00:00:00.000\"")]
    BadStart { value: String },
    #[error("invalid option: {0}")]
    BadOption(String),
    #[error("could not set up the HTTP client: {0}")]
    Setup(String),
    #[error("could not set up the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("{0}")]
    Stream(#[from] crate::stream::SourceError),
}

/// What to produce and where to send it.
#[derive(Debug, Clone)]
pub struct ProduceOptions {
    /// Server base URL (`http://127.0.0.1:8080`) or the full events URL.
    pub url: String,
    pub events: u64,
    /// Events per second; `None` sends as fast as the server takes them.
    pub rate: Option<u64>,
    pub seed: Option<u64>,
    /// Events per request.
    pub batch: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Send this NDJSON file instead of generated events.
    pub file: Option<PathBuf>,
    /// Write generated events here (`-` for stdout) instead of sending them.
    pub output: Option<PathBuf>,
    /// First event time, with `--seed` (paper format).
    pub start: Option<String>,
    /// Distinct product names (`product0`…).
    pub products: u32,
    /// Distinct zipcodes (`10000`, `10001`, …).
    pub zipcodes: u64,
    /// Fraction of events that arrive one to six hours late.
    pub late: f64,
    pub progress: bool,
    /// Retries of one request before its events count as failed.
    pub max_retries: u32,
    /// Send straight to this Kafka topic (one record per event, acks=all)
    /// instead of to a server.
    pub kafka: Option<crate::stream::kafka::KafkaConfig>,
    /// Send straight to this Kinesis stream (PutRecords, failed records
    /// retried) instead of to a server.
    pub kinesis: Option<crate::stream::kinesis::KinesisConfig>,
    /// Number the requests so the server recognises a re-sent one.
    pub idempotent: bool,
    /// With `kafka` or `kinesis`: each record is keyed by this field of its
    /// event (`[schema] key`), so a key's events, sent again, meet in one
    /// partition and are found as duplicates.
    pub key: Option<String>,
    /// The producer's name (default: one of its own for each run). A run
    /// under the name of an earlier one with the same events and batch
    /// size is recognised as a re-send of it: nothing is stored twice.
    pub producer_name: Option<String>,
}

impl Default for ProduceOptions {
    fn default() -> Self {
        ProduceOptions {
            url: "http://127.0.0.1:8080".into(),
            events: 10_000,
            rate: None,
            seed: None,
            batch: 1000,
            concurrency: 4,
            file: None,
            output: None,
            start: None,
            products: 10,
            zipcodes: 90_000,
            late: 0.0,
            progress: true,
            kafka: None,
            kinesis: None,
            max_retries: 10,
            idempotent: true,
            producer_name: None,
            key: None,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub events: u64,
    pub accepted: u64,
    pub rejected: u64,
    /// Events of requests that failed for good.
    pub failed: u64,
    /// Events sent without an answer (a timeout): they may be stored; not
    /// sent again, so none is counted twice on their account.
    pub in_doubt: u64,
    pub requests: u64,
    pub retries: u64,
    /// Re-sent requests the server recognised as stored before.
    pub recognised: u64,
    /// Why requests went without their identity (the server cannot
    /// recognise re-sent requests): at least once, not exactly once.
    pub unnumbered: Option<String>,
    pub elapsed: Duration,
    /// The first error a request failed with for good, if any.
    pub first_error: Option<String>,
}

impl Summary {
    pub fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.failed == 0 && self.in_doubt == 0 {
            writeln!(
                f,
                "sent {} events in {:.2} s: {} events/s",
                group(self.events),
                self.elapsed.as_secs_f64(),
                group(self.events_per_sec() as u64)
            )?;
        } else {
            // A rate of events that were not stored would be a lie.
            writeln!(
                f,
                "FAILED: {} of {} events not stored, {} in doubt (sent without an answer: they may be stored), {} stored, in {:.2} s",
                group(self.failed),
                group(self.events),
                group(self.in_doubt),
                group(self.accepted),
                self.elapsed.as_secs_f64(),
            )?;
        }
        write!(
            f,
            "  accepted {} · rejected {} · failed {} · in doubt {} · requests {} · retries {} · re-sent requests recognised {}",
            group(self.accepted),
            group(self.rejected),
            group(self.failed),
            group(self.in_doubt),
            group(self.requests),
            group(self.retries),
            group(self.recognised)
        )?;
        if let Some(why) = &self.unnumbered {
            write!(
                f,
                "\n  at least once: requests were sent without their identity ({why})"
            )?;
        }
        if let Some(e) = &self.first_error {
            write!(f, "\n  first failure: {e}")?;
        }
        Ok(())
    }
}

pub use crate::human::group;

/// The paper's event generator. Event `i` depends only on the seed and `i`.
#[derive(Debug, Clone)]
pub struct Generator {
    seed: u64,
    /// With a seed: the first event time; event `i` is `start + i` ms.
    start_ms: Option<i64>,
    products: u32,
    zipcodes: u64,
    /// `late` as a threshold on 24 random bits.
    late_threshold: u64,
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Generator {
    /// `start_ms: None` stamps each event with the time it is generated.
    pub fn new(seed: u64, start_ms: Option<i64>, products: u32, late: f64) -> Generator {
        Generator {
            seed,
            start_ms,
            products: products.max(1),
            zipcodes: 90_000,
            late_threshold: (late.clamp(0.0, 1.0) * f64::from(1u32 << 24)) as u64,
        }
    }

    /// The same generator with `n` distinct zipcodes (default 90,000: 10000–99999).
    pub fn with_zipcodes(mut self, n: u64) -> Generator {
        self.zipcodes = n.max(1);
        self
    }

    /// Appends events `[first, first + n)` as NDJSON lines to `out`.
    pub fn write(&self, first: u64, n: u64, out: &mut Vec<u8>) {
        let mut now_ms = 0;
        if self.start_ms.is_none() {
            now_ms = chrono::Utc::now().timestamp_millis();
        }
        let mut ib = itoa::Buffer::new();
        for i in first..first + n {
            let h1 = splitmix64(self.seed ^ splitmix64(i));
            let h2 = splitmix64(h1);
            let zipcode = 10_000 + h1 % self.zipcodes;
            let product = (h1 >> 24) % u64::from(self.products);
            let price = 1 + (h1 >> 48) % 100;
            let mut ts = match self.start_ms {
                Some(s) => s + i as i64,
                None => now_ms,
            };
            if (h2 & 0xFF_FFFF) < self.late_threshold {
                // One to six hours late.
                ts -= 3_600_000 + ((h2 >> 24) % (5 * 3_600_000)) as i64;
            }
            out.extend_from_slice(b"{\"zipcode\":");
            out.extend_from_slice(ib.format(zipcode).as_bytes());
            out.extend_from_slice(b",\"ProductName\":\"product");
            out.extend_from_slice(ib.format(product).as_bytes());
            out.extend_from_slice(b"\",\"price\":");
            out.extend_from_slice(ib.format(price).as_bytes());
            out.extend_from_slice(b",\"timestamp\":\"");
            write_paper_time(ts, out);
            out.extend_from_slice(b"\"}\n");
        }
    }
}

/// Writes `ms` since the epoch as `2014-11-01 19:35:41.158`.
fn write_paper_time(ms: i64, out: &mut Vec<u8>) {
    let t = chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .naive_utc();
    put_digits(out, t.year().clamp(0, 9999) as u32, 4);
    out.push(b'-');
    put_digits(out, t.month(), 2);
    out.push(b'-');
    put_digits(out, t.day(), 2);
    out.push(b' ');
    put_digits(out, t.hour(), 2);
    out.push(b':');
    put_digits(out, t.minute(), 2);
    out.push(b':');
    put_digits(out, t.second(), 2);
    out.push(b'.');
    put_digits(out, t.nanosecond() / 1_000_000 % 1000, 3);
}

fn put_digits(out: &mut Vec<u8>, v: u32, width: usize) {
    let mut digits = [b'0'; 4];
    let mut v = v;
    for d in digits[..width].iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
    out.extend_from_slice(&digits[..width]);
}

/// The paper's date, the default start of seeded event times.
pub const PAPER_START: &str = "2014-11-01 00:00:00.000";

fn parse_start(s: &str) -> Result<i64, ProduceError> {
    NaiveDateTime::parse_from_str(s, PAPER_TIME_FORMAT)
        .map(|t| t.and_utc().timestamp_millis())
        .map_err(|_| ProduceError::BadStart { value: s.into() })
}

/// Where batches come from.
enum Source {
    Generated(Generator),
    /// An NDJSON file, read a batch of lines at a time.
    File(std::sync::Mutex<std::io::BufReader<std::fs::File>>),
}

#[derive(Deserialize, Default)]
struct Reply {
    #[serde(default)]
    accepted: u64,
    #[serde(default)]
    rejected: u64,
    #[serde(default)]
    not_stored: Vec<Span>,
    #[serde(default)]
    in_doubt: Vec<Span>,
    /// With a 503 from a Kafka or Kinesis node: what became of each line.
    #[serde(default)]
    report: Option<Box<Reply>>,
    /// A re-sent request the server had stored (`stored`, `completed`).
    #[serde(default)]
    resent: Option<String>,
    /// The error's stable name.
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    hint: Option<String>,
}

/// Lines `first..=last` of a body, as a reply names them.
#[derive(Debug, Default, Deserialize)]
struct Span {
    first: u64,
    last: u64,
    #[serde(default)]
    reason: String,
}

/// Why one request did not store all its lines.
struct Unsent {
    why: String,
    /// Lines not stored: failed if this was the last try.
    lines: u64,
    /// Whether to try again (a 429, 503, 507, a partial store, no answer).
    retry: bool,
    /// The pause the server asked for (its Retry-After, or 1 s after a 207).
    wait: Option<Duration>,
    /// After a 207: only the lines not stored, and how many.
    rest: Option<(Bytes, u64)>,
}

/// The lines of `body` (1-based, blank ones counted) within `spans`, as a
/// new body, and how many there are.
fn pick_lines(body: &Bytes, spans: &[&Span]) -> (Bytes, u64) {
    let mut out = Vec::new();
    let mut count = 0;
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
        let no = i as u64 + 1;
        if spans.iter().any(|s| (s.first..=s.last).contains(&no)) {
            out.extend_from_slice(line);
            out.push(b'\n');
            count += 1;
        }
    }
    (out.into(), count)
}

/// Runs the producer and returns what it did.
pub async fn run(opts: ProduceOptions) -> Result<Summary, ProduceError> {
    if opts.batch == 0 || opts.concurrency == 0 {
        return Err(ProduceError::BadOption(
            "--batch and --concurrency must be at least 1".into(),
        ));
    }
    if opts.rate == Some(0) {
        return Err(ProduceError::BadOption("--rate must be at least 1".into()));
    }
    let seed = opts.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        splitmix64(t.as_nanos() as u64 ^ u64::from(std::process::id()))
    });
    let start_ms = match (&opts.start, opts.seed) {
        (Some(s), _) => Some(parse_start(s)?),
        (None, Some(_)) => Some(parse_start(PAPER_START)?),
        (None, None) => None,
    };
    let generator =
        Generator::new(seed, start_ms, opts.products, opts.late).with_zipcodes(opts.zipcodes);

    if let Some(out) = &opts.output {
        return write_events(&generator, &opts, out);
    }

    let source = match &opts.file {
        Some(path) => {
            let f = std::fs::File::open(path).map_err(|source| ProduceError::Read {
                path: path.clone(),
                source,
            })?;
            Source::File(std::sync::Mutex::new(std::io::BufReader::with_capacity(
                1 << 20,
                f,
            )))
        }
        None => Source::Generated(generator),
    };
    let url = if opts.url.trim_end_matches('/').ends_with("/v1/events") {
        opts.url.clone()
    } else {
        format!("{}/v1/events", opts.url.trim_end_matches('/'))
    };
    let client = crate::frontend::client::builder()
        .map_err(ProduceError::Setup)?
        .pool_max_idle_per_host(opts.concurrency)
        .tcp_nodelay(true)
        .build()
        .map_err(ProduceError::Client)?;

    let bar = if opts.progress {
        let len = if opts.file.is_some() {
            None
        } else {
            Some(opts.events)
        };
        let bar = ProgressBar::with_draw_target(len, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{bar:30}] {human_pos}/{human_len} events · {per_sec} · eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar
    } else {
        ProgressBar::hidden()
    };

    let stream = crate::stream::StreamConfig {
        kafka: opts.kafka.clone(),
        kinesis: opts.kinesis.clone(),
        ..Default::default()
    };
    let producer = crate::stream::producer(&stream).await?;
    if let Some(p) = &producer {
        // Unreachable brokers fail the run at once, with what happened,
        // rather than every send after the delivery timeout.
        p.check().await?;
    }
    let shared = Arc::new(Shared {
        source,
        producer,
        url,
        client,
        opts: opts.clone(),
        next_batch: AtomicU64::new(0),
        t0: tokio::time::Instant::now(),
        bar: bar.clone(),
        stats: Stats::default(),
        first_error: std::sync::Mutex::new(None),
        name: opts.idempotent.then(|| {
            opts.producer_name.clone().unwrap_or_else(|| {
                // Unique to this run: process and time.
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                format!(
                    "produce-{}-{:016x}",
                    std::process::id(),
                    splitmix64(t.as_nanos() as u64 ^ u64::from(std::process::id()))
                )
            })
        }),
        unnumbered: std::sync::OnceLock::new(),
    });
    let began = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..opts.concurrency {
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move { shared.worker().await }));
    }
    for t in tasks {
        let _ = t.await;
    }
    bar.finish_and_clear();
    let s = &shared.stats;
    Ok(Summary {
        events: s.events.load(Ordering::Relaxed),
        accepted: s.accepted.load(Ordering::Relaxed),
        rejected: s.rejected.load(Ordering::Relaxed),
        failed: s.failed.load(Ordering::Relaxed),
        in_doubt: s.in_doubt.load(Ordering::Relaxed),
        requests: s.requests.load(Ordering::Relaxed),
        retries: s.retries.load(Ordering::Relaxed),
        recognised: s.recognised.load(Ordering::Relaxed),
        unnumbered: shared.unnumbered.get().cloned(),
        elapsed: began.elapsed(),
        first_error: shared.first_error.lock().expect("lock").clone(),
    })
}

fn write_events(
    gen_: &Generator,
    opts: &ProduceOptions,
    out: &PathBuf,
) -> Result<Summary, ProduceError> {
    let began = Instant::now();
    let werr = |source| ProduceError::Write {
        path: out.clone(),
        source,
    };
    let mut sink: Box<dyn Write> = if out.as_os_str() == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::fs::File::create(out).map_err(werr)?)
    };
    let mut buf = Vec::with_capacity(1 << 20);
    let mut done = 0;
    while done < opts.events {
        let n = (opts.events - done).min(8192);
        buf.clear();
        gen_.write(done, n, &mut buf);
        sink.write_all(&buf).map_err(werr)?;
        done += n;
    }
    sink.flush().map_err(werr)?;
    Ok(Summary {
        events: done,
        elapsed: began.elapsed(),
        ..Summary::default()
    })
}

#[derive(Default)]
struct Stats {
    events: AtomicU64,
    accepted: AtomicU64,
    rejected: AtomicU64,
    failed: AtomicU64,
    in_doubt: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
    recognised: AtomicU64,
}

struct Shared {
    source: Source,
    /// Where events go instead of `url` (a Kafka topic, a Kinesis stream).
    producer: Option<Arc<dyn crate::stream::Producer>>,
    url: String,
    client: reqwest::Client,
    opts: ProduceOptions,
    next_batch: AtomicU64,
    t0: tokio::time::Instant,
    bar: ProgressBar,
    stats: Stats,
    first_error: std::sync::Mutex<Option<String>>,
    /// The name requests carry (`None`: sent without identity).
    name: Option<String>,
    /// Set when the server said it cannot recognise re-sent requests.
    unnumbered: std::sync::OnceLock<String>,
}

impl Shared {
    /// Takes the next batch: its number, body and event count.
    fn next(&self) -> Option<(u64, Bytes, u64)> {
        let k = self.next_batch.fetch_add(1, Ordering::Relaxed);
        let batch = self.opts.batch as u64;
        match &self.source {
            Source::Generated(g) => {
                let first = k * batch;
                if first >= self.opts.events {
                    return None;
                }
                let n = batch.min(self.opts.events - first);
                let mut buf = Vec::with_capacity(n as usize * 100);
                g.write(first, n, &mut buf);
                Some((k, buf.into(), n))
            }
            Source::File(reader) => {
                let mut r = reader.lock().expect("file lock");
                let mut buf = Vec::new();
                let mut n = 0;
                while n < batch {
                    let before = buf.len();
                    match r.read_until(b'\n', &mut buf) {
                        Ok(0) => break,
                        Ok(_) => {
                            if !buf[before..].iter().all(u8::is_ascii_whitespace) {
                                n += 1;
                            }
                        }
                        Err(e) => {
                            self.fail(&format!("reading the file failed: {e}"), 0);
                            return None;
                        }
                    }
                }
                if buf.is_empty() {
                    None
                } else {
                    if !buf.ends_with(b"\n") {
                        buf.push(b'\n');
                    }
                    Some((k, buf.into(), n))
                }
            }
        }
    }

    /// Counts each record's outcome: stored, failed, or in doubt.
    fn count<T>(&self, deliveries: Vec<crate::stream::source::Delivery<T>>) {
        use crate::stream::source::Delivery;
        let mut stored = 0;
        for d in deliveries {
            match d {
                Delivery::Stored(_) => stored += 1,
                Delivery::NotStored(why) => self.fail(&why, 1),
                Delivery::InDoubt(why) => self.doubt(&why, 1),
            }
        }
        self.stats.accepted.fetch_add(stored, Ordering::Relaxed);
    }

    /// Events sent without an answer: counted apart, not sent again.
    fn doubt(&self, why: &str, events: u64) {
        self.stats.in_doubt.fetch_add(events, Ordering::Relaxed);
        let mut first = self.first_error.lock().expect("lock");
        if first.is_none() {
            *first = Some(why.to_string());
        }
    }

    fn fail(&self, why: &str, events: u64) {
        self.stats.failed.fetch_add(events, Ordering::Relaxed);
        let mut first = self.first_error.lock().expect("lock");
        if first.is_none() {
            *first = Some(why.to_string());
        }
    }

    async fn worker(&self) {
        while let Some((k, body, n)) = self.next() {
            if let Some(rate) = self.opts.rate {
                let due =
                    Duration::from_secs_f64((k * self.opts.batch as u64) as f64 / rate as f64);
                tokio::time::sleep_until(self.t0 + due).await;
            }
            self.send(k, body, n).await;
            self.stats.events.fetch_add(n, Ordering::Relaxed);
            self.bar.inc(n);
        }
    }

    /// Sends one batch's lines as records of the stream, one event each,
    /// keyed by `--key` if given (see [`key_text`]),
    /// where the stream chooses (Kinesis: each under its own partition
    /// key, spread over the shards, as the paper's producer does). The
    /// producer retries what the stream refuses for a while (librdkafka
    /// within its delivery timeout; Kinesis's refused records with
    /// backoff), so a failure here is final.
    async fn send_records(&self, producer: &dyn crate::stream::Producer, body: Bytes, n: u64) {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let mut records = Vec::with_capacity(n as usize);
        let mut start = 0;
        while start < body.len() {
            let end = memchr::memchr(b'\n', &body[start..]).map_or(body.len(), |i| start + i);
            if !body[start..end].iter().all(u8::is_ascii_whitespace) {
                let data = body.slice(start..end);
                let text_key = match self.opts.key.as_deref() {
                    None => None,
                    Some(field) => match key_text(&data, field) {
                        Some(k) => Some(k),
                        // Sent unkeyed, its copies would land anywhere:
                        // not sent, and said so.
                        None => {
                            self.fail(
                                &format!(
                                    "a line without `{field}` (a string or a number) was not sent: --key needs it to place the record"
                                ),
                                1,
                            );
                            start = end + 1;
                            continue;
                        }
                    },
                };
                records.push(crate::stream::Outgoing {
                    partition: None,
                    key: None,
                    text_key,
                    data,
                });
            }
            start = end + 1;
        }
        // Each record's own outcome: a failure of some is not a failure of all.
        self.count(producer.send_each(records).await);
    }

    async fn send(&self, seq: u64, body: Bytes, n: u64) {
        if let Some(producer) = &self.producer {
            return self.send_records(producer.as_ref(), body, n).await;
        }
        // What the next try sends: the whole body, then only the lines a
        // 207 said were not stored. Each try reads it once and sets it
        // before the pause (never held across a send).
        use backon::Retryable;
        let next = std::sync::Mutex::new((body, n));
        let sent = (|| async {
            let (body, n) = next.lock().expect("next lines").clone();
            let tried = self.try_send(seq, body, n).await;
            if let Err(Unsent {
                rest: Some(rest), ..
            }) = &tried
            {
                *next.lock().expect("next lines") = rest.clone();
            }
            tried
        })
        // 100 ms doubling to 3.2 s, at most `max_retries` times; the server's
        // Retry-After (at most 10 s) when it sends one, 1 s after a 207.
        .retry(
            backon::ExponentialBuilder::new()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_millis(3200))
                .with_max_times(self.opts.max_retries as usize),
        )
        .when(|u| u.retry)
        .adjust(|u, backoff| backoff.map(|b| u.wait.unwrap_or(b)))
        .notify(|_, _| {
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
        })
        .await;
        if let Err(u) = sent {
            self.fail(&u.why, u.lines);
        }
    }

    /// One request with `n` lines. `Err` says why not all were stored,
    /// whether to try again, and what to send then.
    async fn try_send(&self, seq: u64, body: Bytes, n: u64) -> Result<(), Unsent> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let mut req = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson");
        if let Some(name) = &self.name
            && self.unnumbered.get().is_none()
        {
            req = req
                .header(crate::stream::requests::PRODUCER_HEADER, name.as_str())
                .header(crate::stream::requests::SEQUENCE_HEADER, seq.to_string());
        }
        let sent = req.body(body.clone()).send().await;
        let (retry, why, wait) = match sent {
            Ok(resp) => {
                let status = resp.status();
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(Duration::from_secs);
                let text = resp.bytes().await.unwrap_or_default();
                let mut reply: Reply = serde_json::from_slice(&text).unwrap_or_default();
                if reply.code.as_deref() == Some("sequence-too-old") {
                    // Stored or not, the server can no longer tell: in doubt,
                    // never "not stored" (sending it again could double it).
                    self.doubt(
                        &format!(
                            "request {seq} is older than the server's window of remembered requests: it may be stored (a re-run under an earlier run's --producer name recognises at most its last ingest.idempotence.window requests)"
                        ),
                        n,
                    );
                    return Ok(());
                }
                if reply.code.as_deref() == Some("changed-request") {
                    return Err(Unsent {
                        why: format!(
                            "HTTP 409: request {seq} of producer `{}` was stored with another body: a run under an earlier run's --producer name must send the same events (--seed or --file) with the same --batch",
                            self.name.as_deref().unwrap_or_default()
                        ),
                        lines: n,
                        retry: false,
                        wait: None,
                        rest: None,
                    });
                }
                if reply.code.as_deref() == Some("idempotence-unsupported")
                    && self.opts.producer_name.is_some()
                {
                    // A re-run under a name sent unnumbered would store
                    // the events of the run it repeats a second time.
                    return Err(Unsent {
                        why: format!(
                            "{} (--producer was given: sending unnumbered could store a repeated run's events twice; drop --producer to send at least once)",
                            reply.error.unwrap_or_default()
                        ),
                        lines: n,
                        retry: false,
                        wait: None,
                        rest: None,
                    });
                }
                if reply.code.as_deref() == Some("idempotence-unsupported") {
                    // Sent again at once, without the identity.
                    let _ = self.unnumbered.set(reply.error.clone().unwrap_or_default());
                    return Err(Unsent {
                        why: reply.error.unwrap_or_default(),
                        lines: n,
                        retry: true,
                        wait: Some(Duration::ZERO),
                        rest: None,
                    });
                }
                if reply.resent.is_some() {
                    self.stats.recognised.fetch_add(1, Ordering::Relaxed);
                }
                // A 503 that lists lines in doubt: as a 207 with nothing stored.
                let reply = match reply.report.take() {
                    Some(r) if status.as_u16() == 503 && !r.in_doubt.is_empty() => Reply {
                        not_stored: r.not_stored,
                        in_doubt: r.in_doubt,
                        rejected: r.rejected,
                        ..reply
                    },
                    _ => reply,
                };
                let status = if status.as_u16() == 503 && !reply.in_doubt.is_empty() {
                    reqwest::StatusCode::MULTI_STATUS
                } else {
                    status
                };
                if status.as_u16() == 207 {
                    // Part stored: count it, and send exactly the lines
                    // the stream did not store (or did not confirm) again.
                    self.stats
                        .accepted
                        .fetch_add(reply.accepted, Ordering::Relaxed);
                    self.stats
                        .rejected
                        .fetch_add(reply.rejected, Ordering::Relaxed);
                    // Lines in doubt may be stored: counted, not resent.
                    let doubt: u64 = reply.in_doubt.iter().map(|s| s.last + 1 - s.first).sum();
                    if let Some(s) = reply.in_doubt.first() {
                        self.doubt(&format!("HTTP 207: lines in doubt: {}", s.reason), doubt);
                    }
                    let again: Vec<&Span> = reply.not_stored.iter().collect();
                    let why = again
                        .first()
                        .map(|s| format!("HTTP 207: lines not stored: {}", s.reason))
                        .unwrap_or_default();
                    let (rest, count) = pick_lines(&body, &again);
                    if count == 0 {
                        return Ok(());
                    }
                    return Err(Unsent {
                        why,
                        lines: count,
                        retry: true,
                        wait: Some(retry_after.unwrap_or(Duration::from_secs(1))),
                        rest: Some((rest, count)),
                    });
                }
                if status.is_success() || (status.as_u16() == 422 && reply.code.is_none()) {
                    self.stats
                        .accepted
                        .fetch_add(reply.accepted, Ordering::Relaxed);
                    self.stats
                        .rejected
                        .fetch_add(reply.rejected, Ordering::Relaxed);
                    return Ok(());
                }
                let why = format!(
                    "HTTP {status}: {}{}",
                    reply
                        .error
                        .unwrap_or_else(|| String::from_utf8_lossy(&text).into_owned()),
                    reply
                        .hint
                        .map(|h| format!(" (hint: {h})"))
                        .unwrap_or_default()
                );
                let retry = matches!(status.as_u16(), 429 | 503 | 507);
                (retry, why, retry_after)
            }
            Err(e) => (true, format!("request failed: {e}"), None),
        };
        Err(Unsent {
            why,
            lines: n,
            retry,
            wait: wait.map(|w| w.min(Duration::from_secs(10))),
            rest: None,
        })
    }
}

/// The text of `field` in one NDJSON line: a string as is, a number as
/// written (the bytes HTTP ingest places a key by); none if the line is
/// not an object with it.
fn key_text(line: &[u8], field: &str) -> Option<Bytes> {
    let v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(line).ok()?;
    match v.get(field)? {
        serde_json::Value::String(s) => Some(Bytes::from(s.clone().into_bytes())),
        serde_json::Value::Number(n) => Some(Bytes::from(n.to_string().into_bytes())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_events_are_the_papers_shape_and_deterministic() {
        let g = Generator::new(7, Some(parse_start(PAPER_START).unwrap()), 10, 0.0);
        let mut a = Vec::new();
        g.write(0, 1000, &mut a);
        let mut b = Vec::new();
        g.write(0, 400, &mut b);
        g.write(400, 600, &mut b);
        assert_eq!(a, b, "events depend on (seed, index) only, not on batching");
        let first = std::str::from_utf8(&a).unwrap().lines().next().unwrap();
        let v: serde_json::Value = serde_json::from_str(first).unwrap();
        assert!(
            (10_000..100_000).contains(&v["zipcode"].as_i64().unwrap()),
            "{first}"
        );
        assert!(
            v["ProductName"].as_str().unwrap().starts_with("product"),
            "{first}"
        );
        assert!((1..=100).contains(&v["price"].as_i64().unwrap()), "{first}");
        assert_eq!(v["timestamp"], "2014-11-01 00:00:00.000", "{first}");
    }

    #[test]
    fn late_events_are_hours_in_the_past() {
        let start = parse_start(PAPER_START).unwrap();
        let g = Generator::new(1, Some(start), 10, 0.5);
        let mut out = Vec::new();
        g.write(0, 2000, &mut out);
        let late = std::str::from_utf8(&out)
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"2014-10-31 "))
            .count();
        assert!(
            (800..1200).contains(&late),
            "about half are late, got {late}"
        );
    }

    #[test]
    fn generated_events_decode_with_the_paper_schema() {
        use crate::schema::EventSchema;
        use crate::stream::{Decoder, Partitioning};
        let g = Generator::new(3, None, 10, 0.1);
        let mut out = Vec::new();
        g.write(0, 5000, &mut out);
        let d =
            Decoder::new(Arc::new(EventSchema::paper()), Partitioning::RoundRobin).decode(&out, 0);
        assert_eq!(d.accepted, 5000, "{:?}", d.rejects.first());
    }

    #[test]
    fn groups_thousands() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(1234567), "1,234,567");
    }
}
