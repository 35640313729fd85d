//! The Kafka consumer as a [`Source`]: cursors per partition, read-ahead, the topic's partitions refreshed.

use super::*;

pub(super) const READ_AHEAD: usize = 1 << 16;
/// Cursors per partition: the head, the archiver behind it, a replay.
pub(super) const CURSORS: usize = 3;
/// A cursor this close behind a read's start continues instead of seeking.
pub(super) const SKIP_AHEAD: u64 = 4096;
/// How far before a read's start a new cursor is assigned. A broker must
/// answer a fetch inside a record batch with that batch (the consumer skips
/// its first records); tansu 0.6.0 answers with the *next* batch, which
/// would silently skip the rest of the containing one. Starting up to a
/// batch earlier (librdkafka's `batch.num.messages` is 10,000 by default)
/// and dropping what precedes the start reads every record either way.
pub(super) const LOOKBACK: u64 = 10_000;
/// How long a read waits for records it knows are there (after a seek).
pub(super) const READ_WAIT: Duration = Duration::from_secs(5);
/// How long a read waits for a new cursor's first fetch.
pub(super) const FIRST_FETCH_WAIT: Duration = Duration::from_secs(2);
/// Records the reader thread decodes at once, at most.
pub(super) const AHEAD_RECORDS: usize = 16_384;
/// The reader thread waits while its partition's read-ahead holds this much.
pub(super) const MAX_AHEAD_BYTES: usize = 256 << 20;
/// How long metadata and watermark requests may take.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a read at `from` that finds nothing buffered waits for records,
/// the partition's fetches having reached `fetched` (one past the highest
/// offset fetched) and its broker reporting `_high`; `fresh` if its cursor
/// has not fetched yet. Records known to be there (fetched already, by this
/// cursor or another) are waited for, and so is a new cursor's first fetch
/// (a broker's end offset may lie below what it holds). A high watermark
/// alone proves nothing: it counts transaction markers, so a partition whose
/// last offsets are markers has one above its last record, and a read there
/// must not wait for records that will never come — each would hold up the
/// micro-batch of every other partition.
pub(super) fn read_wait(from: u64, fetched: u64, _high: u64, fresh: bool) -> Duration {
    if from < fetched {
        READ_WAIT
    } else if fresh {
        FIRST_FETCH_WAIT
    } else {
        Duration::ZERO
    }
}

/// What a [`KafkaSource::take`] got.
pub(super) enum Took {
    /// Records, and one past the last position read over.
    Records(Vec<Record>, u64),
    /// Nothing buffered; `fresh` if the cursor has not fetched yet.
    Nothing { fresh: bool },
}

pub(super) struct Record {
    offset: u64,
    time_ms: i64,
    payload: Option<Box<[u8]>>,
}

/// The context of a partition's consumers: librdkafka's errors are logged
/// as rdkafka logs them, except the end of a partition (`enable.partition.eof`),
/// which is news, not an error, and comes at every fetch that catches up.
pub(super) struct CursorContext;

impl rdkafka::ClientContext for CursorContext {
    fn error(&self, error: ClientError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::PartitionEOF) {
            tracing::error!(target: "rdkafka::client", "librdkafka: {error}: {reason}");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for CursorContext {}

/// A consumer assigned to one partition, and the records it fetched ahead.
pub(super) struct Cursor {
    consumer: BaseConsumer<CursorContext>,
    /// One past the last record handed out (or the assigned offset).
    next: u64,
    pending: VecDeque<Record>,
    used: Instant,
    /// Whether the consumer has handed out anything yet, or fetched to the
    /// partition's end: a new one's first fetch takes a round trip, which a
    /// read waits for.
    fetched: bool,
    /// Where the consumer was assigned, and the partition's `seen` then:
    /// the records below `known` existed before its first fetch, so it
    /// cannot reach the partition's end without handing out the last of
    /// them — unless the log went back.
    assigned: u64,
    known: u64,
    /// The highest offset the consumer handed out.
    last: Option<u64>,
}

#[derive(Default)]
pub(super) struct Partition {
    cursors: Mutex<Vec<Cursor>>,
    /// One past the highest offset fetched.
    seen: AtomicU64,
    /// The broker's low and high watermarks, refreshed in the background.
    low: AtomicU64,
    high: AtomicU64,
    /// Why the partition is stopped for good ([`KafkaError::Behind`]):
    /// every read and `end` answer it from then on.
    broken: Mutex<Option<KafkaError>>,
    /// Records below this were written to the dead-letter store already.
    dead_mark: AtomicU64,
    /// The last failure of a fetch, and when: `end` reports it while it is
    /// recent, so a partition that cannot be read is a `health` problem
    /// even when no read is asked of it (the error recurs at each retry;
    /// a passing one ages out).
    failed: Mutex<Option<(KafkaError, Instant)>>,
    /// What this partition's reader thread fetched and decoded ahead, from
    /// where the first read started (the speed layer's H), until archived.
    ahead: Mutex<Option<ReadAhead>>,
    /// Whether the reader thread has fetched anything yet.
    ahead_fetched: AtomicBool,
    /// Wakes reads waiting for the read-ahead to grow.
    grown: tokio::sync::Notify,
}

impl Partition {
    /// Stops the partition for good with `e` (the first reason stands).
    fn stop(&self, e: KafkaError) {
        let mut broken = self.broken.lock().expect("kafka partition");
        if broken.is_none() {
            tracing::error!(error = %e, "a Kafka partition is stopped");
            *broken = Some(e);
        }
    }

    /// Why the partition is stopped, if it is.
    fn broken(&self) -> Result<(), KafkaError> {
        match &*self.broken.lock().expect("kafka partition") {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

/// How long a fetch failure stands without recurring.
pub(super) const FAILURE_STANDS: Duration = Duration::from_secs(2);

/// A Kafka topic as a [`Source`].
pub struct KafkaSource {
    config: KafkaConfig,
    decoder: Decoder,
    dead: Arc<DeadLetters>,
    meta: BaseConsumer,
    /// One per partition of the topic; grows when the topic gains some.
    parts: std::sync::RwLock<Vec<Arc<Partition>>>,
    stopped: AtomicBool,
    /// Itself, for the reader threads it starts.
    me: Weak<KafkaSource>,
}

impl KafkaSource {
    /// Connects, checks the topic (it exists, it is not compacted), and
    /// starts refreshing its watermarks. Blocking: a few broker requests.
    pub fn open(
        config: KafkaConfig,
        decoder: Decoder,
        dead: Arc<DeadLetters>,
    ) -> Result<Arc<KafkaSource>, KafkaError> {
        let meta: BaseConsumer =
            consumer_config(&config)
                .create()
                .map_err(|source| KafkaError::Connect {
                    brokers: config.brokers.clone(),
                    source,
                })?;
        let n = topic_partitions(&meta, &config)?;
        check_not_compacted(&config)?;
        let source = Arc::new_cyclic(|me| KafkaSource {
            decoder,
            dead,
            meta,
            parts: std::sync::RwLock::new((0..n).map(|_| Arc::default()).collect()),
            stopped: AtomicBool::new(false),
            config,
            me: me.clone(),
        });
        source.refresh();
        let weak = Arc::downgrade(&source);
        std::thread::Builder::new()
            .name("kafka-watermarks".into())
            .spawn(move || refresh_loop(weak))
            .expect("spawn the watermark thread");
        Ok(source)
    }

    /// Stops the background refresh (the thread ends within a second).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// Partition `p` (the layers ask only for partitions they were told of).
    fn part(&self, p: u32) -> Arc<Partition> {
        self.parts.read().expect("kafka partitions")[p as usize].clone()
    }

    /// Refreshes every partition's watermarks and the partition count:
    /// partitions added to the topic are consumed from their start.
    fn refresh(&self) {
        let parts = self.parts.read().expect("kafka partitions").clone();
        for (p, part) in parts.iter().enumerate() {
            if let Ok((low, high)) =
                self.meta
                    .fetch_watermarks(&self.config.topic, p as i32, REQUEST_TIMEOUT)
            {
                let high = high.max(0) as u64;
                part.low.store(low.max(0) as u64, Ordering::Relaxed);
                let before = part.high.swap(high, Ordering::Relaxed);
                if let Some(e) = self.went_back(p as u32, before, high) {
                    part.stop(e);
                }
            }
        }
        if let Ok(n) = topic_partitions(&self.meta, &self.config) {
            let mut parts = self.parts.write().expect("kafka partitions");
            if n as usize > parts.len() {
                tracing::info!(topic = %self.config.topic, from = parts.len(), to = n, "the Kafka topic gained partitions; consuming them");
                parts.resize_with(n as usize, Arc::default);
            }
        }
    }

    /// Whether partition `p`'s high watermark, `before` at the last
    /// refresh and `high` now, says that its log went back below what was
    /// fetched: the topic was created again, or the broker lost records.
    /// A broker's end offset only grows (tansu's, the base offset of its
    /// last record batch, may lie below what was fetched, but it grows too),
    /// so a fall below the fetched records is the proof; a fetch past the
    /// new end would find nothing (tansu) or records that are not the ones
    /// those offsets named.
    fn went_back(&self, p: u32, before: u64, high: u64) -> Option<KafkaError> {
        let seen = self.part(p).seen.load(Ordering::Relaxed);
        (high < before && high < seen).then(|| KafkaError::Behind {
            topic: self.config.topic.clone(),
            partition: p,
            from: seen,
            end: high,
        })
    }

    fn read_error(&self, partition: u32, source: ClientError) -> KafkaError {
        KafkaError::Read {
            topic: self.config.topic.clone(),
            partition,
            source,
        }
    }

    /// A cursor of `p` that reads from `from` next: one that stopped at or
    /// just before it, else a new one (or the least recently used, moved).
    fn cursor_at<'a>(
        &self,
        p: u32,
        cursors: &'a mut Vec<Cursor>,
        from: u64,
    ) -> Result<&'a mut Cursor, KafkaError> {
        let near = cursors
            .iter()
            .enumerate()
            .filter(|(_, c)| c.next <= from && from - c.next <= SKIP_AHEAD)
            .max_by_key(|(_, c)| c.next)
            .map(|(i, _)| i);
        let i = match near {
            Some(i) => i,
            None => {
                let consumer: BaseConsumer<CursorContext> = consumer_config(&self.config)
                    .create_with_context(CursorContext)
                    .map_err(|e| self.read_error(p, e))?;
                let low = self.part(p).low.load(Ordering::Relaxed);
                let at = from.saturating_sub(LOOKBACK).max(low.min(from));
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&self.config.topic, p as i32, Offset::Offset(at as i64))
                    .map_err(|e| self.read_error(p, e))?;
                consumer.assign(&tpl).map_err(|e| self.read_error(p, e))?;
                let cursor = Cursor {
                    consumer,
                    next: from,
                    pending: VecDeque::new(),
                    used: Instant::now(),
                    fetched: false,
                    assigned: at,
                    known: self.part(p).seen.load(Ordering::Relaxed),
                    last: None,
                };
                if cursors.len() < CURSORS {
                    cursors.push(cursor);
                    cursors.len() - 1
                } else {
                    let lru = (0..cursors.len())
                        .min_by_key(|&i| cursors[i].used)
                        .expect("cursors");
                    cursors[lru] = cursor;
                    lru
                }
            }
        };
        let c = &mut cursors[i];
        c.used = Instant::now();
        // Records between where it stopped and `from` are not wanted.
        while c.pending.front().is_some_and(|r| r.offset < from) {
            c.pending.pop_front();
        }
        c.next = c.next.max(from);
        Ok(c)
    }

    /// Moves what the consumer has fetched into the cursor, without
    /// blocking, up to `READ_AHEAD` records.
    fn fill(&self, p: u32, c: &mut Cursor) -> Result<(), KafkaError> {
        let part = self.part(p);
        part.broken()?;
        let filled = self.fill_inner(p, c);
        match &filled {
            // A log that went back stays stopped: a new cursor would read
            // the new records below `from` as ones already consumed.
            Err(e @ KafkaError::Behind { .. }) => part.stop(e.clone()),
            Err(e) => {
                *part.failed.lock().expect("kafka failure") = Some((e.clone(), Instant::now()))
            }
            Ok(()) => {}
        }
        filled
    }

    fn fill_inner(&self, p: u32, c: &mut Cursor) -> Result<(), KafkaError> {
        let part = self.part(p);
        while c.pending.len() < READ_AHEAD {
            match c.consumer.poll(Duration::ZERO) {
                None => break,
                Some(Ok(m)) => {
                    let offset = m.offset().max(0) as u64;
                    if offset >= c.next {
                        *part.failed.lock().expect("kafka failure") = None;
                    }
                    part.seen.fetch_max(offset + 1, Ordering::Relaxed);
                    c.last = c.last.max(Some(offset));
                    if offset < c.next || c.pending.back().is_some_and(|r| r.offset >= offset) {
                        continue; // before the cursor's start, or seen twice
                    }
                    // A record at or past the start: the first fetch is in.
                    c.fetched = true;
                    c.pending.push_back(Record {
                        offset,
                        time_ms: m.timestamp().to_millis().unwrap_or(0),
                        payload: m.payload().map(Box::from),
                    });
                }
                // Everything up to the broker's end was handed out: the
                // fetch is in, though it held nothing past the start (a
                // partition that ends in transaction markers, say).
                Some(Err(ClientError::PartitionEOF(_))) => {
                    c.fetched = true;
                    // At the end without the records known before this
                    // consumer began: the log went back (a topic created
                    // again, a broker that lost its records — tansu
                    // answers a fetch past its end with nothing, so the
                    // head consumer sees no error).
                    let reached = c.last.map_or(c.assigned, |o| o + 1);
                    if c.assigned < c.known && reached < c.known {
                        return Err(KafkaError::Behind {
                            topic: self.config.topic.clone(),
                            partition: p,
                            from: c.known,
                            end: reached,
                        });
                    }
                    break;
                }
                Some(Err(e)) => {
                    // With `auto.offset.reset = error`, librdkafka reports a
                    // fetch outside the log as "no offset to reset to".
                    if matches!(
                        e.rdkafka_error_code(),
                        Some(
                            RDKafkaErrorCode::OffsetOutOfRange | RDKafkaErrorCode::AutoOffsetReset
                        )
                    ) {
                        let (low, high) = self
                            .meta
                            .fetch_watermarks(&self.config.topic, p as i32, REQUEST_TIMEOUT)
                            .map_err(|e| self.read_error(p, e))?;
                        let (low, high) = (low.max(0) as u64, high.max(0) as u64);
                        if low > c.next {
                            return Err(KafkaError::Lost {
                                topic: self.config.topic.clone(),
                                partition: p,
                                from: c.next,
                                start: low,
                            });
                        }
                        if high < c.next {
                            return Err(KafkaError::Behind {
                                topic: self.config.topic.clone(),
                                partition: p,
                                from: c.next,
                                end: high,
                            });
                        }
                    }
                    return Err(self.read_error(p, e));
                }
            }
        }
        Ok(())
    }

    /// Decodes records into one batch; refused ones go to the dead-letter
    /// store (once) and become gaps.
    /// `Err` when refused records cannot be kept: the partition's cursors
    /// are dropped, so the next read fetches the same records again.
    fn decode(&self, p: u32, records: Vec<Record>, end: u64) -> Result<SourceBatch, KafkaError> {
        let part = self.part(p);
        let dead_mark = &part.dead_mark;
        let batch = decode_records(
            &self.decoder,
            &self.dead,
            &format!("kafka/{}", self.config.topic),
            p,
            records.iter().map(|r| RawRecord {
                position: r.offset,
                time_ms: r.time_ms,
                value: r.payload.as_deref(),
            }),
            end,
            dead_mark.load(Ordering::Relaxed).max(
                self.dead
                    .stream_mark(&format!("kafka/{}", self.config.topic), p),
            ),
        );
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                part.cursors.lock().expect("kafka cursors").clear();
                let e = KafkaError::DeadLetters {
                    topic: self.config.topic.clone(),
                    partition: p,
                    detail: crate::error::chain(&e),
                };
                *part.failed.lock().expect("kafka failure") = Some((e.clone(), Instant::now()));
                return Err(e);
            }
        };
        dead_mark.fetch_max(end, Ordering::Relaxed);
        Ok(batch)
    }

    /// Takes up to `max` buffered records below `until` from the cursor at
    /// `from`, fetching (without blocking) first.
    fn take(&self, p: u32, from: u64, until: u64, max: usize) -> Result<Took, KafkaError> {
        let part = self.part(p);
        part.broken()?;
        let mut cursors = part.cursors.lock().expect("kafka cursors");
        let c = self.cursor_at(p, &mut cursors, from)?;
        let filled = self.fill(p, c);
        if let Err(e) = filled {
            // A failed consumer is replaced on the next read.
            let at = c.next;
            cursors.retain(|c| c.next != at);
            return Err(e);
        }
        if c.pending.front().is_some_and(|r| r.offset >= until) {
            // Nothing below `until`: the range is read (gaps up to it).
            c.next = until;
            return Ok(Took::Records(Vec::new(), until));
        }
        let n = c
            .pending
            .iter()
            .take(max.max(1))
            .take_while(|r| r.offset < until)
            .count();
        if n == 0 {
            return Ok(Took::Nothing { fresh: !c.fetched });
        }
        let records: Vec<Record> = c.pending.drain(..n).collect();
        let end = records.last().expect("records").offset + 1;
        c.next = end;
        Ok(Took::Records(records, end))
    }
}

pub(super) fn consumer_config(config: &KafkaConfig) -> ClientConfig {
    let group = format!("lambdaflow-{}", config.topic);
    let mut c = config.client_with(&[
        ("group.id", &group),
        ("enable.auto.offset.store", "false"),
        ("isolation.level", "read_committed"),
        ("fetch.wait.max.ms", "50"),
        ("queued.max.messages.kbytes", "16384"),
    ]);
    // Never move past a lost position, whatever the options say.
    c.set("auto.offset.reset", "error");
    // A fetch that reached the end tells so: a read there does not wait
    // for a first fetch that has come and held nothing.
    c.set("enable.partition.eof", "true");
    c.set("enable.auto.commit", "false");
    c
}

pub(super) fn topic_partitions(
    meta: &BaseConsumer,
    config: &KafkaConfig,
) -> Result<u32, KafkaError> {
    let md = meta
        .fetch_metadata(Some(&config.topic), REQUEST_TIMEOUT)
        .map_err(|source| KafkaError::Connect {
            brokers: config.brokers.clone(),
            source,
        })?;
    match md.topics().iter().find(|t| t.name() == config.topic) {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
            Ok(t.partitions().len() as u32)
        }
        _ => Err(KafkaError::NoTopic {
            topic: config.topic.clone(),
            brokers: config.brokers.clone(),
        }),
    }
}

/// Refuses a compacted topic. A broker that cannot describe topic configs
/// is let through with a warning (some Kafka-protocol brokers lack it).
pub(super) fn check_not_compacted(config: &KafkaConfig) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> =
        config
            .client()
            .create()
            .map_err(|source| KafkaError::Connect {
                brokers: config.brokers.clone(),
                source,
            })?;
    let resource = ResourceSpecifier::Topic(&config.topic);
    let opts = AdminOptions::new().request_timeout(Some(REQUEST_TIMEOUT));
    let described = futures::executor::block_on(admin.describe_configs([&resource], &opts));
    let policy = match described.as_deref() {
        Ok([Ok(r)]) => r
            .entries
            .iter()
            .find(|e| e.name == "cleanup.policy")
            .and_then(|e| e.value.clone()),
        other => {
            tracing::warn!(topic = %config.topic, answer = ?other.map(|r| r.len()), "the broker did not describe the topic's configuration; cannot check that it is not compacted");
            None
        }
    };
    match policy {
        Some(p) if p.contains("compact") => Err(KafkaError::Compacted {
            topic: config.topic.clone(),
            policy: p,
        }),
        _ => Ok(()),
    }
}

pub(super) fn refresh_loop(source: Weak<KafkaSource>) {
    loop {
        std::thread::sleep(Duration::from_millis(500));
        match source.upgrade() {
            Some(s) if !s.stopped.load(Ordering::Relaxed) => s.refresh(),
            _ => return,
        }
    }
}

#[async_trait::async_trait]
impl Source for KafkaSource {
    fn describe(&self) -> String {
        format!(
            "Kafka topic `{}` at {}",
            self.config.topic, self.config.brokers
        )
    }

    fn partitions(&self) -> u32 {
        self.parts.read().expect("kafka partitions").len() as u32
    }

    fn archived(&self, p: u32, end: u64) {
        if let Some(a) = self.part(p).ahead.lock().expect("read-ahead").as_mut() {
            a.release(end);
        }
    }

    fn end(&self, p: u32) -> Result<u64, SourceError> {
        let part = self.part(p);
        part.broken()?;
        if let Some((e, at)) = &*part.failed.lock().expect("kafka failure")
            && at.elapsed() < FAILURE_STANDS
        {
            return Err(e.clone().into());
        }
        // A broker's end offset is a hint (some report the start of the
        // last record batch); what was fetched is proof.
        Ok(part
            .seen
            .load(Ordering::Relaxed)
            .max(part.high.load(Ordering::Relaxed)))
    }

    fn start(&self, p: u32) -> Result<u64, SourceError> {
        let (low, _) = self
            .meta
            .fetch_watermarks(&self.config.topic, p as i32, REQUEST_TIMEOUT)
            .map_err(|e| self.read_error(p, e))?;
        Ok(low.max(0) as u64)
    }

    async fn read(
        &self,
        p: u32,
        from: u64,
        until: u64,
        max_events: usize,
    ) -> Result<Vec<SourceBatch>, SourceError> {
        if from >= until {
            return Ok(Vec::new());
        }
        // A new cursor's first fetch is waited for (a broker's end offset
        // may be below what it holds, so "nothing yet" is not "nothing");
        // so are records known to be there. Otherwise a read returns what
        // has arrived: a partition may end with offsets that hold no
        // record (transaction markers).
        if let Some(read) = self.read_ahead(p, from, until, max_events).await? {
            return Ok(read);
        }
        self.end(p)?;
        let part = self.part(p);
        let began = Instant::now();
        loop {
            let fresh = match self.take(p, from, until, max_events)? {
                Took::Records(records, end) => return Ok(vec![self.decode(p, records, end)?]),
                Took::Nothing { fresh } => fresh,
            };
            let limit = read_wait(
                from,
                part.seen.load(Ordering::Relaxed),
                part.high.load(Ordering::Relaxed),
                fresh,
            );
            if began.elapsed() >= limit {
                return Ok(Vec::new());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn wait(&self, p: u32, from: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let part = self.part(p);
        if part.ahead.lock().expect("read-ahead").is_some() {
            loop {
                let grown = part.grown.notified();
                let head = part
                    .ahead
                    .lock()
                    .expect("read-ahead")
                    .as_ref()
                    .map(|a| a.head);
                if head.is_none_or(|h| h > from) || Instant::now() >= deadline {
                    return;
                }
                let _ = tokio::time::timeout_at(deadline.into(), grown).await;
            }
        }
        loop {
            let ready = {
                let part = self.part(p);
                let mut cursors = part.cursors.lock().expect("kafka cursors");
                match self.cursor_at(p, &mut cursors, from) {
                    Ok(c) => match self.fill(p, c) {
                        Ok(()) => Some(!c.pending.is_empty()),
                        Err(_) => {
                            // Reported through `end`; a new consumer retries
                            // after this wait, not at once.
                            cursors.retain(|c| c.next != from);
                            None
                        }
                    },
                    Err(_) => None,
                }
            };
            match ready {
                Some(true) => return,
                None => {
                    tokio::time::sleep_until(deadline.into()).await;
                    return;
                }
                Some(false) if Instant::now() >= deadline => return,
                Some(false) => {}
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

impl KafkaSource {
    /// A read served from the partition's read-ahead: `None` when `from`
    /// lies outside it (a replay below what it holds), for the cursors to
    /// serve. The first read of a partition starts its reader thread there.
    async fn read_ahead(
        &self,
        p: u32,
        from: u64,
        until: u64,
        max: usize,
    ) -> Result<Option<Vec<SourceBatch>>, SourceError> {
        let part = self.part(p);
        {
            let mut ahead = part.ahead.lock().expect("read-ahead");
            if ahead.is_none() {
                *ahead = Some(ReadAhead::at(from, None));
                let me = self.me.clone();
                std::thread::Builder::new()
                    .name(format!("kafka-p{p}"))
                    .spawn(move || read_ahead_loop(me, p))
                    .expect("spawn a Kafka reader thread");
            }
        }
        // As the cursors do: records known to be there are waited for, and
        // so is the reader's first fetch.
        self.end(p)?;
        let began = Instant::now();
        loop {
            let grown = part.grown.notified();
            let got = part
                .ahead
                .lock()
                .expect("read-ahead")
                .as_ref()
                .and_then(|a| a.cached(from, until, max));
            match got {
                None => return Ok(None),
                Some(read) if !read.is_empty() || from >= until => return Ok(Some(read)),
                Some(_) => {}
            }
            let waited = began.elapsed();
            let limit = read_wait(
                from,
                part.seen.load(Ordering::Relaxed),
                part.high.load(Ordering::Relaxed),
                !part.ahead_fetched.load(Ordering::Relaxed),
            );
            if waited >= limit {
                return Ok(Some(Vec::new()));
            }
            // A failure reported meanwhile ends the wait with it.
            self.end(p)?;
            let _ =
                tokio::time::timeout((limit - waited).min(Duration::from_millis(50)), grown).await;
        }
    }
}

/// A partition's reader thread: takes what its cursor fetched from the
/// read-ahead's head on, decodes it (off the speed layer's thread, one
/// thread per partition) and appends it; waits while the read-ahead is full.
pub(super) fn read_ahead_loop(source: Weak<KafkaSource>, p: u32) {
    let mut idle = Duration::from_millis(1);
    loop {
        let Some(s) = source.upgrade() else { return };
        if s.stopped.load(Ordering::Relaxed) {
            return;
        }
        let part = s.part(p);
        let Some((head, full)) = part
            .ahead
            .lock()
            .expect("read-ahead")
            .as_ref()
            .map(|a| (a.head, a.bytes >= MAX_AHEAD_BYTES))
        else {
            return;
        };
        let pause = if full {
            Some(Duration::from_millis(5))
        } else {
            match s.take(p, head, u64::MAX, AHEAD_RECORDS) {
                Ok(Took::Records(records, end)) if !records.is_empty() => {
                    match s.decode(p, records, end) {
                        Err(_) => {
                            // The read-ahead starts again at its head.
                            Some(Duration::from_millis(500))
                        }
                        Ok(batch) => {
                            if let Some(a) = part.ahead.lock().expect("read-ahead").as_mut()
                                && a.head == head
                            {
                                a.push(Fetch {
                                    first: head,
                                    end,
                                    tokens: Vec::new(),
                                    batch,
                                });
                            }
                            part.ahead_fetched.store(true, Ordering::Relaxed);
                            part.grown.notify_waiters();
                            idle = Duration::from_millis(1);
                            None
                        }
                    }
                }
                Ok(took) => {
                    if let Took::Nothing { fresh: false } = took {
                        // Fetched to the end, with nothing past `head`.
                        part.ahead_fetched.store(true, Ordering::Relaxed);
                    }
                    // Nothing yet: poll again soon, less often while idle.
                    let wait = idle;
                    idle = (idle * 2).min(Duration::from_millis(20));
                    Some(wait)
                }
                // Recorded in `failed` (reported through `end`); retried.
                Err(_) => Some(Duration::from_millis(500)),
            }
        };
        drop(part);
        drop(s);
        if let Some(wait) = pause {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The last record of a partition at offset 9, a transaction marker at
    /// 10 (the high watermark, 11, counts it): a read at 10 by a cursor that
    /// has fetched must not wait for a record that will never come, or an
    /// idle transactional partition holds up every partition's micro-batch
    /// by `READ_WAIT` (issue 30, case 11). Neither tansu nor librdkafka's
    /// mock cluster writes markers, so the decision is tested alone.
    #[test]
    fn a_read_past_the_last_record_waits_only_for_records_known_to_be_there() {
        assert_eq!(
            read_wait(10, 10, 11, false),
            Duration::ZERO,
            "nothing fetched at or past offset 10, only the high watermark says 11: no wait"
        );
        assert_eq!(
            read_wait(10, 10, 11, true),
            FIRST_FETCH_WAIT,
            "a new cursor's first fetch is waited for"
        );
        assert_eq!(
            read_wait(5, 10, 11, false),
            READ_WAIT,
            "records fetched already (by any cursor) are waited for"
        );
        assert_eq!(
            read_wait(10, 10, 8, false),
            Duration::ZERO,
            "a broker whose end offset lies below what was fetched (tansu) is no reason to wait"
        );
    }

    /// A new cursor at a partition's end (a restart at H where only
    /// markers, or nothing, lie past the last record) learns that its first
    /// fetch came back with nothing, so reads there stop waiting
    /// `FIRST_FETCH_WAIT` for it. Against librdkafka's mock cluster.
    #[test]
    fn a_new_cursor_at_the_end_of_a_partition_learns_that_its_fetch_is_in() {
        use crate::stream::decode::Decoder;
        let mock = rdkafka::mocking::MockCluster::new(1).expect("a mock cluster");
        mock.create_topic("events", 1, 1).expect("a topic");
        let config = KafkaConfig {
            brokers: mock.bootstrap_servers(),
            topic: "events".into(),
            options: Default::default(),
        };
        let producer = KafkaProducer::new(&config).expect("a producer");
        let rt = tokio::runtime::Runtime::new().expect("a runtime");
        let acks = rt
            .block_on(producer.send((0..10).map(|_| (Some(0), None, &b"{}"[..]))))
            .expect("the mock acknowledges");
        assert_eq!(acks.last(), Some(&(0, 9)), "ten records at offsets 0 to 9");
        let dir = tempfile::tempdir().expect("a directory");
        let source = KafkaSource::open(
            config,
            Decoder::new(
                Arc::new(crate::schema::EventSchema::paper()),
                crate::stream::Partitioning::RoundRobin,
            ),
            Arc::new(DeadLetters::open(dir.path()).expect("dead letters")),
        )
        .expect("the source opens");
        let began = Instant::now();
        loop {
            match source
                .take(0, 10, u64::MAX, 100)
                .expect("partition 0 reads")
            {
                Took::Nothing { fresh: false } => break,
                Took::Nothing { fresh: true } => {}
                Took::Records(r, _) => panic!("no record at or past offset 10, got {}", r.len()),
            }
            assert!(
                began.elapsed() < Duration::from_secs(20),
                "a new cursor at the partition's end must learn that its fetch came back with nothing; until it does, every read there waits FIRST_FETCH_WAIT"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        source.stop();
    }
}
