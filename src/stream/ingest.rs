//! Ingest: one request body in, accepted events durable in the log, refused
//! lines durable in the dead-letter store, and a report of both.
//!
//! Order matters for "nothing lost, nothing twice": refused lines are stored
//! first, then accepted events are appended. If the dead-letter store fails
//! (say, a full disk) nothing was appended and the client can resend the whole
//! body; if the log refuses for overload, it refuses the whole body.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use bytes::Bytes;
use serde::Serialize;

use super::deadletter::{DeadLetter, DeadLetterError, DeadLetters};
use super::decode::{Accepted, Decoded, Decoder};
use super::log::{Log, LogError};
use super::producer::{Outgoing, Placed, Producer};
use super::requests::{Begin, Claim, Ledger, Part, RequestId, Tag};
use super::source::Delivery;

/// Bodies larger than this are decoded on the blocking pool, not a runtime worker.
const INLINE_DECODE_BYTES: usize = 256 << 10;
/// The reply lists the first errors of a body; the rest are counted.
pub const MAX_REPORTED_ERRORS: usize = 100;
/// A body may write dead letters of this many times its own size (at least
/// `MIN_DEAD_LETTER_SHARE`); refused lines past it are counted, not kept.
/// A record is about 100 bytes more than its line, so a body of short bad
/// lines would otherwise write fifty times its size.
const DEAD_LETTER_SHARE: u64 = 2;
const MIN_DEAD_LETTER_SHARE: u64 = 1 << 20;
/// Dead letters are written in pieces of this size while a body is decoded.
const DEAD_LETTER_FLUSH: usize = 1 << 20;

/// What became of one request's lines.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IngestReport {
    pub accepted: u64,
    pub rejected: u64,
    /// Offsets given to the accepted events, per partition (inclusive).
    pub offsets: Vec<OffsetRange>,
    /// On a Kinesis node: per shard, the first and last sequence number of
    /// the accepted events (their ordinals are known once read).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sequences: Vec<SequenceRange>,
    /// The first refused lines (at most `MAX_REPORTED_ERRORS`), in order.
    pub errors: Vec<LineError>,
    /// Refused lines not listed in `errors`.
    #[serde(skip_serializing_if = "is_zero")]
    pub errors_omitted: u64,
    /// Refused lines not kept in the dead-letter store: past this body's
    /// share of it.
    #[serde(skip_serializing_if = "is_zero")]
    pub dead_letters_dropped: u64,
    /// Valid lines the stream did not store (it refused them, or they were
    /// not sent after a failure): resending exactly these cannot count an
    /// event twice. Only on a node that produces into Kafka or Kinesis.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_stored: Vec<LineSpan>,
    /// Valid lines sent without an answer (a timeout, a lost connection):
    /// they may or may not be stored.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub in_doubt: Vec<LineSpan>,
    /// A re-sent request of a producer: `stored` when it was stored before
    /// and nothing was stored now (the offsets are the original ones),
    /// `completed` when it was stored in part before and the rest now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resent: Option<&'static str>,
}

/// Consecutive lines `first..=last` of a body that share one outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineSpan {
    pub first: u64,
    pub last: u64,
    pub lines: u64,
    pub reason: String,
}

impl IngestReport {
    /// Lines not stored, counted.
    pub fn not_stored_lines(&self) -> u64 {
        self.not_stored.iter().map(|s| s.lines).sum()
    }

    /// Lines in doubt, counted.
    pub fn in_doubt_lines(&self) -> u64 {
        self.in_doubt.iter().map(|s| s.lines).sum()
    }

    /// Where line `line` went if the stream stored it; else it is listed
    /// under `not_stored` or `in_doubt` with why.
    fn stored<T>(&mut self, d: Delivery<T>, line: u64) -> Option<T> {
        match d {
            Delivery::Stored(at) => Some(at),
            Delivery::NotStored(why) => {
                push_span(&mut self.not_stored, line, &why);
                None
            }
            Delivery::InDoubt(why) => {
                push_span(&mut self.in_doubt, line, &why);
                None
            }
        }
    }
}

/// Appends line `line` to `spans`, joining the last span when it is the
/// line after it with the same reason.
fn push_span(spans: &mut Vec<LineSpan>, line: u64, reason: &str) {
    if let Some(last) = spans.last_mut()
        && last.last + 1 == line
        && last.reason == reason
    {
        last.last = line;
        last.lines += 1;
        return;
    }
    spans.push(LineSpan {
        first: line,
        last: line,
        lines: 1,
        reason: reason.into(),
    });
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The refused lines of one body, as the decoder finds them: the first
/// errors for the reply, a count of all, and their dead letters written in
/// pieces within the body's share of the store — so memory stays a small
/// multiple of the body however many lines it refuses.
struct Refusals {
    store: Arc<DeadLetters>,
    body: Bytes,
    received: String,
    errors: Vec<LineError>,
    rejected: u64,
    buf: Vec<u8>,
    buffered: u64,
    /// Dead-letter bytes this body may still write.
    budget: u64,
    dropped: u64,
    /// Off the async runtime: pieces may be written as they fill.
    may_write: bool,
    /// A request stored before, decoded again for its reply: nothing is
    /// written or counted in the store.
    dry: bool,
    wrote: bool,
    error: Option<DeadLetterError>,
}

impl Refusals {
    fn new(store: Arc<DeadLetters>, body: Bytes, may_write: bool) -> Refusals {
        let budget = (body.len() as u64 * DEAD_LETTER_SHARE).max(MIN_DEAD_LETTER_SHARE);
        Refusals {
            store,
            body,
            received: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            errors: Vec::new(),
            rejected: 0,
            buf: Vec::new(),
            buffered: 0,
            budget,
            dropped: 0,
            may_write,
            dry: false,
            wrote: false,
            error: None,
        }
    }

    fn push(&mut self, r: super::decode::Reject) {
        self.rejected += 1;
        if self.errors.len() < MAX_REPORTED_ERRORS {
            if !self.dry {
                self.store.remember(r.to_string());
            }
            self.errors.push(LineError {
                line: r.line,
                field: r.field.clone(),
                reason: r.reason.clone(),
                message: r.to_string(),
            });
        }
        if self.dry {
            return;
        }
        if self.error.is_some() || self.budget == 0 {
            self.dropped += u64::from(self.error.is_none());
            return;
        }
        let before = self.buf.len();
        DeadLetter::new(&self.received, r.line, r.field, r.reason, &self.body[r.raw])
            .encode_into(&mut self.buf);
        let n = (self.buf.len() - before) as u64;
        if n > self.budget {
            // The share is used up: keep the first lines, count the rest.
            self.buf.truncate(before);
            self.budget = 0;
            self.dropped += 1;
            return;
        }
        self.budget -= n;
        self.buffered += 1;
        if self.may_write && self.buf.len() >= DEAD_LETTER_FLUSH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.buf.is_empty() || self.error.is_some() {
            return;
        }
        match self.store.append(&self.buf, self.buffered) {
            Ok(()) => self.wrote = true,
            Err(e) => self.error = Some(e),
        }
        self.buf.clear();
        self.buffered = 0;
    }

    /// Writes what is left and makes it durable. Blocking.
    fn finish(mut self) -> Result<Refused, DeadLetterError> {
        if self.dry {
            return Ok(Refused {
                errors: self.errors,
                rejected: self.rejected,
                dropped: 0,
            });
        }
        self.flush();
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.wrote {
            self.store.sync()?;
        }
        self.store
            .dropped(self.dropped, "past their request's share of the store");
        Ok(Refused {
            errors: self.errors,
            rejected: self.rejected,
            dropped: self.dropped,
        })
    }
}

/// The refused lines of a body, once their dead letters are durable.
struct Refused {
    errors: Vec<LineError>,
    rejected: u64,
    dropped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OffsetRange {
    pub partition: u32,
    pub first: u64,
    pub last: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SequenceRange {
    pub shard: String,
    pub first: String,
    pub last: String,
}

/// Kinesis sequence numbers are decimal integers of any length.
fn seq_key(s: &str) -> (usize, &str) {
    (s.len(), s)
}

#[derive(Debug, Clone, Serialize)]
pub struct LineError {
    pub line: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub reason: String,
    /// The whole message: "line 7: field `price`: expected int64, got string \"abc\"".
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the request body is empty")]
    EmptyBody,
    #[error("{0}")]
    Log(#[from] LogError),
    #[error("{0}")]
    DeadLetter(#[from] DeadLetterError),
    #[error(
        "the realtime window is full: {events} events are not in a published batch view yet (limit {max_events}) and their realtime states (with the key index's keys above the batch) take {memory} (limit {max_memory})"
    )]
    Backlogged {
        events: u64,
        max_events: u64,
        memory: bytesize::ByteSize,
        max_memory: bytesize::ByteSize,
    },
    #[error("decoding was interrupted: {0}")]
    Internal(String),
    /// The external stream failed.
    #[error("{0}")]
    Stream(#[from] super::SourceError),
    /// The external stream confirmed none of the body's valid lines (it
    /// refused them, or did not answer: `in_doubt` in the report).
    #[error("{stream} confirmed none of the {lines} valid lines: {detail}")]
    NotStored {
        stream: String,
        lines: u64,
        detail: String,
    },
    /// On a shared root, only the driver lease's valid holder acknowledges
    /// events of the embedded log; nothing of the request was stored.
    #[error("not acknowledged")]
    NotDriving(#[source] FenceError),
    /// A producer's request identity refused, or the ledger failed.
    #[error("{0}")]
    Request(#[from] super::requests::RequestError),
    /// This node consumes an external stream; its producers send there.
    #[error(
        "this node consumes {stream}; send events to it directly (`lambdaflow produce --help` lists the streams it sends to)"
    )]
    External { stream: String },
}

crate::explained!(IngestError);

impl crate::error::Explain for IngestError {
    fn hint(&self) -> Option<String> {
        match self {
            IngestError::EmptyBody => Some("send one JSON event per line (NDJSON)".into()),
            IngestError::Backlogged { .. } => Some(
                "the batch layer has not published what the window holds yet (see `lambdaflow status`; a full window closes its open chunk so the next run can take it); retry after it has"
                    .into(),
            ),
            IngestError::NotDriving(_) => Some(
                "retry; `lambdaflow status` shows the lease holder (with the embedded log, send events to the node that drives)"
                    .into(),
            ),
            _ => None,
        }
    }
}

/// The realtime window — events the log holds that no published batch run
/// covers yet, and the memory of their realtime states — against its bounds.
/// The speed layer measures it every round; ingest refuses new events (503)
/// while it is over, so a batch layer that cannot publish (an unrepairable
/// master file, say) slows producers down instead of filling memory and disk.
#[derive(Debug)]
pub struct Backlog {
    pub max_events: u64,
    pub max_memory: u64,
    events: AtomicU64,
    memory: AtomicU64,
}

impl Backlog {
    pub fn new(max_events: u64, max_memory: u64) -> Backlog {
        Backlog {
            max_events,
            max_memory,
            events: AtomicU64::new(0),
            memory: AtomicU64::new(0),
        }
    }

    /// Records the window's size now.
    pub fn measure(&self, events: u64, memory: u64) {
        self.events.store(events, Ordering::Relaxed);
        self.memory.store(memory, Ordering::Relaxed);
    }

    /// Whether the window's memory, `grown` bytes more than measured, is
    /// at its bound: the speed layer reads nothing more then (a stream's
    /// producers cannot be answered 503; the stream holds their records
    /// until the batch layer publishes).
    pub fn memory_full_with(&self, grown: u64) -> bool {
        self.memory.load(Ordering::Relaxed).saturating_add(grown) >= self.max_memory
    }

    /// `Err` while the window is over either bound.
    pub fn check(&self) -> Result<(), IngestError> {
        let events = self.events.load(Ordering::Relaxed);
        let memory = self.memory.load(Ordering::Relaxed);
        if events >= self.max_events || memory >= self.max_memory {
            return Err(IngestError::Backlogged {
                events,
                max_events: self.max_events,
                memory: bytesize::ByteSize::b(memory),
                max_memory: bytesize::ByteSize::b(self.max_memory),
            });
        }
        Ok(())
    }
}

impl Default for Backlog {
    fn default() -> Self {
        Backlog::new(u64::MAX, u64::MAX)
    }
}

impl IngestError {
    /// True when nothing of the request was stored and it can be resent whole.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            IngestError::Log(
                LogError::Overloaded { .. }
                    | LogError::NoSpace { .. }
                    | LogError::OutOfFiles { .. }
            ) | IngestError::DeadLetter(DeadLetterError::NoSpace { .. })
                | IngestError::Backlogged { .. }
                | IngestError::NotStored { .. }
                | IngestError::NotDriving(_)
        )
    }
}

/// A failed ingest and what of it was stored anyway.
#[derive(Debug)]
pub struct IngestFailure {
    pub error: IngestError,
    /// Events already durable before the failure (empty for retryable errors).
    pub partial: IngestReport,
}

/// Counters since start.
#[derive(Debug, Default)]
pub struct IngestCounters {
    pub requests: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub bytes: AtomicU64,
}

/// Decodes `body`, handing refused lines to `refusals`; with `collect`,
/// also each accepted line's byte range and partition (to produce them into
/// an external stream as they were sent).
fn decode_into(
    decoder: &Decoder,
    body: &[u8],
    partition: u32,
    refusals: &mut Refusals,
    collect: bool,
) -> (Decoded, Vec<Accepted>) {
    let mut lines = Vec::new();
    let decoded = decoder.decode_each(body, partition, &mut |r| refusals.push(r), &mut |a| {
        if collect {
            lines.push(a)
        }
    });
    (decoded, lines)
}

/// Decoder, log and dead-letter store, wired together.
pub struct Ingest {
    decoder: Decoder,
    log: Arc<Log>,
    dead: Arc<DeadLetters>,
    next_partition: AtomicU32,
    pub counters: IngestCounters,
    /// The realtime window's bounds (none unless a node sets them).
    pub backlog: Arc<Backlog>,
    /// Where a failing log write is reported (`health.problems["ingest"]`).
    health: Option<Arc<crate::health::Health>>,
    /// Whether the last log write failed (so success clears it only once).
    failing: std::sync::atomic::AtomicBool,
    /// The external stream this node consumes, if any: `POST /v1/events`
    /// produces the accepted lines into it instead of the embedded log.
    pub producer: Option<Arc<dyn Producer>>,
    /// On a shared root with the embedded log, what fences
    /// acknowledgements (the cluster's driver lease).
    pub fence: std::sync::OnceLock<Arc<dyn Fence>>,
    /// Which producers' requests are stored (the embedded log only).
    pub ledger: Option<Arc<Ledger>>,
}

/// Why a [`Fence`] refused to let events be acknowledged (the fence's own
/// error: who holds the lease, how long ago it was renewed).
pub type FenceError = Box<dyn std::error::Error + Send + Sync>;

/// What lets a node acknowledge events of the embedded log on a shared
/// root: only the driver lease's valid holder may (`cluster::lease`
/// implements it). A reservation holds until the guard it returns drops,
/// after the events are stored.
#[async_trait::async_trait]
pub trait Fence: Send + Sync {
    async fn reserve<'a>(&'a self, counts: &[(u32, u64)])
    -> Result<Box<dyn Send + 'a>, FenceError>;

    /// The lease term this node holds (0 when it holds none): the request
    /// ledger merges the newest snapshot when it rises.
    fn term(&self) -> u64;
}

impl Ingest {
    pub fn new(decoder: Decoder, log: Arc<Log>, dead: Arc<DeadLetters>) -> Ingest {
        Ingest {
            decoder,
            log,
            dead,
            next_partition: AtomicU32::new(0),
            counters: IngestCounters::default(),
            backlog: Arc::new(Backlog::default()),
            health: None,
            failing: std::sync::atomic::AtomicBool::new(false),
            producer: None,
            fence: std::sync::OnceLock::new(),
            ledger: None,
        }
    }

    /// Reports failing log writes (out of descriptors, disk full, I/O) as the
    /// `ingest` problem until a write succeeds again.
    pub fn with_health(mut self, health: Arc<crate::health::Health>) -> Ingest {
        self.health = Some(health);
        self
    }

    fn log_result(&self, error: Option<&LogError>) {
        let Some(health) = &self.health else { return };
        match error {
            // Load shedding and shutdown are not a failing log.
            Some(LogError::Overloaded { .. } | LogError::Closed) => {}
            Some(e) => {
                self.failing.store(true, Ordering::Relaxed);
                health.report_error("ingest", e);
            }
            None => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    health.clear("ingest");
                }
            }
        }
    }

    pub fn log(&self) -> &Arc<Log> {
        &self.log
    }

    /// Produces accepted lines into `producer` instead of the embedded log;
    /// a line over the stream's record limit is refused as a bad line
    /// before anything is sent.
    pub fn set_producer(&mut self, producer: Arc<dyn Producer>) {
        let (bytes, what) = producer.max_record();
        self.decoder = self.decoder.clone().with_max_line(bytes, what);
        self.producer = Some(producer);
    }

    pub fn dead_letters(&self) -> &Arc<DeadLetters> {
        &self.dead
    }

    /// Decodes, stores and reports one NDJSON body.
    pub async fn ingest(&self, body: Bytes) -> Result<IngestReport, IngestFailure> {
        self.ingest_request(body, None).await
    }

    /// Decodes, stores and reports one NDJSON body; with a producer's
    /// request identity, a request stored before is answered as it was
    /// (`stream::requests`).
    pub async fn ingest_request(
        &self,
        body: Bytes,
        id: Option<RequestId>,
    ) -> Result<IngestReport, IngestFailure> {
        let fail = |error: IngestError| IngestFailure {
            error,
            partial: IngestReport::default(),
        };
        if body.is_empty() {
            return Err(fail(IngestError::EmptyBody));
        }
        // A producer's request: stored before, whole or in part, or new.
        let mut claim: Option<(Claim, Vec<Part>, Tag)> = None;
        if let Some(id) = id {
            let ledger = match (&self.producer, &self.ledger) {
                (None, Some(ledger)) => ledger,
                (producer, _) => {
                    return Err(fail(IngestError::Request(
                        super::requests::RequestError::Unsupported {
                            stream: producer
                                .as_ref()
                                .map_or("an external stream".into(), |p| p.describe()),
                        },
                    )));
                }
            };
            if let Some(fence) = self.fence.get() {
                // A node that took the driver lease over learns what the
                // old driver stored before it acknowledges anything.
                let term = fence.term();
                if term > ledger.term() {
                    ledger.load(term).await.map_err(|e| fail(e.into()))?;
                }
            }
            let digest = super::requests::digest(&body);
            match ledger
                .begin(&id, digest)
                .await
                .map_err(|e| fail(e.into()))?
            {
                Begin::Stored(parts) => return self.replay(&body, &id, &parts).await,
                Begin::Resume(c, have) => {
                    claim = Some((
                        c,
                        have,
                        Tag {
                            id,
                            digest,
                            parts: 0,
                        },
                    ));
                }
                Begin::New(c) => {
                    claim = Some((
                        c,
                        Vec::new(),
                        Tag {
                            id,
                            digest,
                            parts: 0,
                        },
                    ))
                }
            }
        }
        self.backlog.check().map_err(fail)?;
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        let partition = match &claim {
            // A re-sent request must split as it did the first time.
            Some((_, _, tag)) => self.partition_of(&tag.id),
            None => self.next_partition.fetch_add(1, Ordering::Relaxed) % self.log.partitions(),
        };
        let internal = |e: tokio::task::JoinError| fail(IngestError::Internal(e.to_string()));
        // Producing into an external stream sends the accepted lines as
        // they are; the embedded log takes the decoded columns.
        let collect = self.producer.is_some();
        // The part of a request stored before has had its lines refused.
        let dry = claim.as_ref().is_some_and(|(_, have, _)| !have.is_empty());
        let (decoded, refused, lines) = if body.len() <= INLINE_DECODE_BYTES {
            let mut refusals = Refusals::new(self.dead.clone(), body.clone(), false);
            refusals.dry = dry;
            let (decoded, lines) =
                decode_into(&self.decoder, &body, partition, &mut refusals, collect);
            let refused = if refusals.rejected > 0 && !dry {
                tokio::task::spawn_blocking(move || refusals.finish())
                    .await
                    .map_err(internal)?
            } else {
                refusals.finish()
            };
            (decoded, refused, lines)
        } else {
            let (decoder, dead, body) = (self.decoder.clone(), self.dead.clone(), body.clone());
            tokio::task::spawn_blocking(move || {
                let mut refusals = Refusals::new(dead, body.clone(), true);
                refusals.dry = dry;
                let (decoded, lines) =
                    decode_into(&decoder, &body, partition, &mut refusals, collect);
                (decoded, refusals.finish(), lines)
            })
            .await
            .map_err(internal)?
        };
        let refused = refused.map_err(|e| fail(e.into()))?;
        let Decoded {
            mut batches,
            accepted,
            ..
        } = decoded;
        self.counters
            .rejected
            .fetch_add(refused.rejected, Ordering::Relaxed);
        let mut report = IngestReport {
            rejected: refused.rejected,
            errors_omitted: refused.rejected - refused.errors.len() as u64,
            errors: refused.errors,
            dead_letters_dropped: refused.dropped,
            ..IngestReport::default()
        };
        if let Some(producer) = &self.producer {
            drop(batches);
            return self.produce(producer.as_ref(), &body, lines, report).await;
        }
        // A request stored in part before: only its other partitions now.
        let mut tag = None;
        if let Some((_, have, t)) = &mut claim {
            t.parts = batches.len() as u16;
            batches.retain(|(p, _)| !have.iter().any(|h| h.partition == *p));
            for h in have.iter() {
                report.accepted += h.count;
                report.offsets.push(h.range());
            }
            if !have.is_empty() {
                report.resent = Some("completed");
            }
            tag = Some(t.encode());
        }
        let mut stored = Vec::new();
        if accepted > 0 && !batches.is_empty() {
            // Fenced: reserved under the driver lease before anything is stored.
            let counts: Vec<(u32, u64)> = batches
                .iter()
                .map(|(p, b)| (*p, b.num_rows() as u64))
                .collect();
            let _reservation = match self.fence.get() {
                Some(lease) => Some(
                    lease
                        .reserve(&counts)
                        .await
                        .map_err(|e| fail(IngestError::NotDriving(e)))?,
                ),
                None => None,
            };
            let acks = match self.log.append_all(batches, tag.as_deref()).await {
                Ok(acks) => acks,
                Err(e) => {
                    self.log_result(Some(&e));
                    return Err(fail(e.into()));
                }
            };
            // Stored, not answered: the producer's retry is in doubt.
            crate::failpoint::hit("ingest-after-append");
            let mut first_error = None;
            for ack in acks {
                match ack {
                    Ok(a) => {
                        report.accepted += a.count;
                        report.offsets.push(OffsetRange {
                            partition: a.partition,
                            first: a.first,
                            last: a.first + a.count - 1,
                        });
                        stored.push(Part {
                            partition: a.partition,
                            first: a.first,
                            count: a.count,
                        });
                    }
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            report.offsets.sort_by_key(|o| o.partition);
            if let Some((c, _, t)) = claim.take() {
                c.stored(&stored, t.parts);
            }
            self.counters
                .accepted
                .fetch_add(stored.iter().map(|p| p.count).sum(), Ordering::Relaxed);
            self.log_result(first_error.as_ref());
            if let Some(e) = first_error {
                return Err(IngestFailure {
                    error: e.into(),
                    partial: report,
                });
            }
        }
        Ok(report)
    }

    /// The partition a producer's request goes to (lines without a key):
    /// a function of its identity, so a re-sent request splits as the
    /// first one did.
    fn partition_of(&self, id: &RequestId) -> u32 {
        let mut h = blake3::Hasher::new();
        h.update(id.producer.as_bytes());
        h.update(&id.sequence.to_le_bytes());
        let b = h.finalize();
        let n = u64::from_le_bytes(b.as_bytes()[..8].try_into().expect("8 bytes"));
        (n % u64::from(self.log.partitions())) as u32
    }

    /// The reply to a request stored before: its lines decoded again for
    /// the refused ones (nothing written), its original offsets.
    async fn replay(
        &self,
        body: &Bytes,
        id: &RequestId,
        parts: &[Part],
    ) -> Result<IngestReport, IngestFailure> {
        let (decoder, dead, body) = (self.decoder.clone(), self.dead.clone(), body.clone());
        let partition = self.partition_of(id);
        let refused = tokio::task::spawn_blocking(move || {
            let mut refusals = Refusals::new(dead, body.clone(), false);
            refusals.dry = true;
            let _ = decode_into(&decoder, &body, partition, &mut refusals, false);
            refusals.finish()
        })
        .await
        .map_err(|e| IngestFailure {
            error: IngestError::Internal(e.to_string()),
            partial: IngestReport::default(),
        })?
        .expect("a dry decode writes nothing");
        Ok(IngestReport {
            accepted: parts.iter().map(|p| p.count).sum(),
            rejected: refused.rejected,
            offsets: parts.iter().map(Part::range).collect(),
            errors_omitted: refused.rejected - refused.errors.len() as u64,
            errors: refused.errors,
            resent: Some("stored"),
            ..IngestReport::default()
        })
    }

    /// Sends the accepted lines of a body to the external stream, each to
    /// its partition, and replies once the stream has answered for every
    /// one (`acks = all` on Kafka): the report says exactly which lines are
    /// stored, which are not (safe to resend) and which are in doubt.
    async fn produce(
        &self,
        producer: &dyn Producer,
        body: &Bytes,
        lines: Vec<Accepted>,
        mut report: IngestReport,
    ) -> Result<IngestReport, IngestFailure> {
        if lines.is_empty() {
            return Ok(report);
        }
        let records = lines
            .iter()
            .map(|a| Outgoing {
                partition: Some(a.partition),
                key: a.key,
                text_key: None,
                data: body.slice(a.range.clone()),
            })
            .collect();
        let puts = producer.send_each(records).await;
        // Per partition (shard), the first and last position of this body's
        // events (another producer's records may lie between them).
        let mut offsets: std::collections::BTreeMap<u32, OffsetRange> = Default::default();
        let mut sequences: std::collections::BTreeMap<String, SequenceRange> = Default::default();
        for (put, a) in puts.into_iter().zip(&lines) {
            let Some(put) = report.stored(put, a.line) else {
                continue;
            };
            match put {
                Placed::Offset {
                    partition: p,
                    offset: o,
                } => {
                    let r = offsets.entry(p).or_insert(OffsetRange {
                        partition: p,
                        first: o,
                        last: o,
                    });
                    r.first = r.first.min(o);
                    r.last = r.last.max(o);
                }
                Placed::Sequence { shard, sequence } => {
                    let r = sequences
                        .entry(shard.clone())
                        .or_insert_with(|| SequenceRange {
                            shard,
                            first: sequence.clone(),
                            last: sequence.clone(),
                        });
                    if seq_key(&sequence) < seq_key(&r.first) {
                        r.first = sequence.clone();
                    }
                    if seq_key(&sequence) > seq_key(&r.last) {
                        r.last = sequence;
                    }
                }
            }
            report.accepted += 1;
        }
        report.offsets = offsets.into_values().collect();
        report.sequences = sequences.into_values().collect();
        self.counters
            .accepted
            .fetch_add(report.accepted, Ordering::Relaxed);
        if report.accepted == 0 {
            // Nothing confirmed stored: the whole body is sent again (lines
            // in doubt — sent, no answer — as after a lost connection).
            let why = report
                .not_stored
                .iter()
                .chain(&report.in_doubt)
                .next()
                .map(|s| s.reason.clone())
                .unwrap_or_default();
            return Err(IngestFailure {
                error: IngestError::NotStored {
                    stream: producer.describe(),
                    lines: report.not_stored_lines() + report.in_doubt_lines(),
                    detail: why,
                },
                partial: report,
            });
        }
        Ok(report)
    }
}
