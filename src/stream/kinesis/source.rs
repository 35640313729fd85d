//! The Kinesis stream as a [`Source`]: one poller per shard on this node, the shard list followed for splits and merges.

use super::*;

pub(super) struct ShardState {
    /// The records read and not yet archived, with their sequence numbers.
    cache: ReadAhead,
    finished: bool,
    throttled: bool,
    started: bool,
    /// How far behind the shard's tip the poller is, as GetRecords says.
    millis_behind: i64,
    /// Records below this were written to the dead-letter store already.
    dead_mark: u64,
}

impl ShardState {
    fn new() -> ShardState {
        ShardState {
            cache: ReadAhead::at(0, None),
            finished: false,
            throttled: false,
            started: false,
            millis_behind: 0,
            dead_mark: 0,
        }
    }
}

pub(super) struct Shard {
    partition: u32,
    entry: ShardEntry,
    state: Mutex<ShardState>,
    head: watch::Sender<u64>,
}

/// A Kinesis stream as a [`Source`].
pub struct KinesisSource {
    config: KinesisConfig,
    client: Client,
    storage: Storage,
    decoder: Decoder,
    dead: Arc<DeadLetters>,
    shards: RwLock<Vec<Arc<Shard>>>,
    health: Option<Arc<Health>>,
    stopped: AtomicBool,
}

impl KinesisSource {
    /// The stream as registered under `storage`; nothing is read until
    /// [`KinesisSource::resume`].
    pub async fn open(
        config: KinesisConfig,
        storage: Storage,
        decoder: Decoder,
        dead: Arc<DeadLetters>,
        health: Option<Arc<Health>>,
    ) -> Result<Arc<KinesisSource>, KinesisError> {
        let client = config.reader_client().await;
        // The readers' client does not retry by itself; a passing failure
        // (a 500, a throttled call) must not stop the node from starting.
        // Five more tries, 0.4 s to 6.4 s apart, while it cannot connect.
        use backon::Retryable;
        let listed = (|| list_shards(&client, &config.stream))
            .retry(
                backon::ExponentialBuilder::new()
                    .with_min_delay(Duration::from_millis(400))
                    .with_max_delay(Duration::from_millis(6400))
                    .with_max_times(5),
            )
            .when(|e| matches!(e, KinesisError::Connect { .. }))
            .await?;
        let registry = Registry::extend(&storage, &config.stream, &listed).await?;
        let source = Arc::new(KinesisSource {
            config,
            client,
            storage,
            decoder,
            dead,
            shards: RwLock::new(Vec::new()),
            health,
            stopped: AtomicBool::new(false),
        });
        source.add_shards(&registry);
        Ok(source)
    }

    fn add_shards(&self, registry: &Registry) {
        let mut shards = self.shards.write().expect("kinesis shards");
        for (p, entry) in registry.shards.iter().enumerate().skip(shards.len()) {
            let mut state = ShardState::new();
            state.dead_mark = self.dead.stream_mark(&self.dead_key(), p as u32);
            // A retired partition is final where it is, never polled.
            (state.finished, state.started) = (entry.retired, entry.retired);
            shards.push(Arc::new(Shard {
                partition: p as u32,
                entry: entry.clone(),
                state: Mutex::new(state),
                head: watch::channel(0).0,
            }));
        }
    }

    /// This stream's key in the dead-letter store's marks.
    fn dead_key(&self) -> String {
        format!("kinesis/{}", self.config.stream)
    }

    fn shard(&self, p: u32) -> Result<Arc<Shard>, SourceError> {
        self.shards
            .read()
            .expect("kinesis shards")
            .get(p as usize)
            .cloned()
            .ok_or_else(|| SourceError::NoSuchPartition {
                partition: p,
                partitions: self.partitions(),
            })
    }

    /// Starts reading each partition at `from[p]` (the published H), after
    /// the record whose sequence number is `tokens[p]` (the resume token the
    /// chunk ending at H keeps; none at 0). Partitions beyond `from` start
    /// at 0. Then follows the shard list for splits and merges.
    pub fn resume(
        self: &Arc<Self>,
        from: &Coverage,
        tokens: &[Option<String>],
    ) -> Result<(), KinesisError> {
        let shards = self.shards.read().expect("kinesis shards").clone();
        for s in &shards {
            let p = s.partition as usize;
            let at = from.get(s.partition);
            let seq = tokens.get(p).cloned().flatten();
            if at > 0 && seq.is_none() && !s.entry.retired {
                return Err(KinesisError::NoResumeToken {
                    shard: s.entry.shard.clone(),
                    partition: s.partition,
                    position: at,
                    hint: "the master dataset's chunk that ends there keeps no sequence number (it was not written from this Kinesis stream); use the data directory of this stream".into(),
                });
            }
            let mut st = s.state.lock().expect("shard state");
            st.cache = ReadAhead::at(at, seq);
            st.dead_mark = at.max(self.dead.stream_mark(&self.dead_key(), s.partition));
            s.head.send_replace(at);
        }
        for s in shards {
            self.start_poller(s);
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(follow_shards(weak));
        Ok(())
    }

    fn start_poller(self: &Arc<Self>, shard: Arc<Shard>) {
        {
            let mut st = shard.state.lock().expect("shard state");
            if st.started {
                return;
            }
            st.started = true;
        }
        tokio::spawn(poll_shard(Arc::downgrade(self), shard));
    }

    /// Whether every parent of `shard` that this node reads is read to its end.
    fn parents_done(&self, shard: &Shard) -> bool {
        let shards = self.shards.read().expect("kinesis shards");
        shard.entry.parents.iter().all(|parent| {
            shards
                .iter()
                .find(|s| !s.entry.retired && &s.entry.shard == parent)
                .is_none_or(|s| s.state.lock().expect("shard state").finished)
        })
    }

    /// Whether `shard`, which Kinesis says does not exist, has expired: the
    /// stream is there but no longer lists it (AWS drops a closed shard once
    /// its records are past retention, and answers `ResourceNotFound` for
    /// it). Then its partition ends where this node read it to, as KCL
    /// ends it, with a note: records past `at`, if it had any, are gone.
    async fn expired(&self, shard: &Shard, at: u64) -> bool {
        let Ok(listed) = list_shards(&self.client, &self.config.stream).await else {
            return false; // the stream itself is gone or unreachable
        };
        if listed.iter().any(|l| l.shard == shard.entry.shard) {
            return false;
        }
        finish(shard, at);
        let note = format!(
            "shard {} has expired (past the stream's retention, no longer listed); its partition ends at position {at}, where this node had read it to: records after it, if it had any, could not be read",
            shard.entry.shard
        );
        tracing::warn!(shard = %shard.entry.shard, partition = shard.partition, at, "a Kinesis shard has expired; its partition ends");
        if let Some(h) = &self.health {
            h.clear(&format!("stream/p{}", shard.partition));
            h.recovered(&format!("stream/p{}", shard.partition), &note);
        }
        true
    }

    fn report_read(&self, shard: &Shard, detail: String) {
        self.report(
            shard.partition,
            &KinesisError::Read {
                shard: shard.entry.shard.clone(),
                partition: shard.partition,
                detail,
            },
        );
    }

    fn report(&self, p: u32, e: &KinesisError) {
        if let Some(h) = &self.health {
            let n = h.report_error(&format!("stream/p{p}"), e);
            if n.is_power_of_two() {
                tracing::warn!(partition = p, error = %e, "reading a Kinesis shard failed; retrying");
            }
        }
    }

    fn clear(&self, p: u32) {
        if let Some(h) = &self.health {
            h.clear(&format!("stream/p{p}"));
        }
    }

    /// Stops the pollers (they end at their next call).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }
}

impl Drop for KinesisSource {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads the shard list every [`LIST_EVERY`]: new shards (children of a
/// split or a merge) become partitions and are read.
pub(super) async fn follow_shards(source: Weak<KinesisSource>) {
    loop {
        tokio::time::sleep(LIST_EVERY).await;
        let Some(s) = source.upgrade() else { return };
        if s.stopped.load(Ordering::Relaxed) {
            return;
        }
        let listed = match list_shards(&s.client, &s.config.stream).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(stream = %s.config.stream, error = %e, "listing the Kinesis shards failed");
                continue;
            }
        };
        // New shards by id, not by count: expired shards leave the list
        // (AWS drops them once past retention), so a merge after an expiry
        // can leave the count as it was.
        let known = {
            let shards = s.shards.read().expect("kinesis shards");
            if listed.iter().all(|l| {
                shards
                    .iter()
                    .any(|r| !r.entry.retired && r.entry.shard == l.shard)
            }) {
                continue;
            }
            shards.len()
        };
        match Registry::extend(&s.storage, &s.config.stream, &listed).await {
            Ok(registry) if registry.shards.len() > known => {
                s.add_shards(&registry);
                let shards = s.shards.read().expect("kinesis shards").clone();
                for shard in shards.into_iter().skip(known) {
                    tracing::info!(shard = %shard.entry.shard, partition = shard.partition, parents = ?shard.entry.parents, "a new Kinesis shard");
                    s.start_poller(shard);
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(stream = %s.config.stream, error = %e, "registering new Kinesis shards failed")
            }
        }
    }
}

/// The one reader of a shard on this node: GetRecords at most every
/// `poll`, into the cache; backs off when throttled.
pub(super) async fn poll_shard(source: Weak<KinesisSource>, shard: Arc<Shard>) {
    let p = shard.partition;
    let mut iterator: Option<String> = None;
    let mut backoff = Duration::from_millis(500);
    let mut last_call = Instant::now() - MIN_POLL;
    loop {
        let Some(s) = source.upgrade() else { return };
        if s.stopped.load(Ordering::Relaxed) {
            return;
        }
        let poll = s.config.poll.max(MIN_POLL);
        // Children are read once their parents are read to the end (the
        // order Kinesis keeps for a key across a reshard).
        if !s.parents_done(&shard) {
            drop(s);
            tokio::time::sleep(poll).await;
            continue;
        }
        let (full, at, after) = {
            let st = shard.state.lock().expect("shard state");
            // The sequence number of the record before the head.
            (
                st.cache.bytes >= MAX_CACHED_BYTES,
                st.cache.head,
                st.cache.head_token(),
            )
        };
        if full {
            drop(s);
            tokio::time::sleep(poll).await;
            continue;
        }
        let it = match &iterator {
            Some(it) => it.clone(),
            None => {
                let req = s
                    .client
                    .get_shard_iterator()
                    .stream_name(&s.config.stream)
                    .shard_id(&shard.entry.shard);
                let req = match &after {
                    Some(seq) => req
                        .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                        .starting_sequence_number(seq),
                    None => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
                };
                match req.send().await {
                    Ok(r) => match r.shard_iterator() {
                        Some(it) => it.to_string(),
                        None => {
                            finish(&shard, at);
                            return;
                        }
                    },
                    Err(e) => {
                        // Re-created stream: the partition stops, `health` says what to do.
                        if not_this_stream(
                            s.health.as_deref(),
                            &s.config.stream,
                            p,
                            &shard.entry.shard,
                            e.code(),
                            e.message(),
                        ) {
                            return;
                        }
                        let code = e.code().map(str::to_string);
                        if code.as_deref() == Some("ResourceNotFoundException")
                            && s.expired(&shard, at).await
                        {
                            return;
                        }
                        let throttled = code.as_deref() == Some("LimitExceededException");
                        shard.state.lock().expect("shard state").throttled = throttled;
                        s.report_read(&shard, aws_detail(e));
                        drop(s);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        continue;
                    }
                }
            }
        };
        // The budget: at most one call per `poll` from this node.
        let wait = poll.saturating_sub(last_call.elapsed());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        last_call = Instant::now();
        let resp = s
            .client
            .get_records()
            .shard_iterator(&it)
            .limit(GET_LIMIT)
            .send()
            .await;
        let out = match resp {
            Ok(out) => out,
            Err(e) => {
                let code = e
                    .as_service_error()
                    .and_then(|x| x.code())
                    .map(str::to_string);
                match code.as_deref() {
                    Some("ProvisionedThroughputExceededException") => {
                        // Over the shard's budget (shared with other readers).
                        let first = !std::mem::replace(
                            &mut shard.state.lock().expect("shard state").throttled,
                            true,
                        );
                        if first {
                            tracing::info!(shard = %shard.entry.shard, partition = p, "GetRecords throttled; backing off");
                        }
                    }
                    Some("ExpiredIteratorException") => {
                        iterator = None;
                        continue;
                    }
                    Some("ResourceNotFoundException") if s.expired(&shard, at).await => {
                        return;
                    }
                    _ => {
                        iterator = None;
                        s.report_read(&shard, aws_detail(e));
                    }
                }
                drop(s);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        let records = out.records();
        if !records.is_empty() {
            let mark = shard.state.lock().expect("shard state").dead_mark;
            let raw: Vec<RawRecord<'_>> = records
                .iter()
                .enumerate()
                .map(|(i, r)| RawRecord {
                    position: at + i as u64,
                    time_ms: r
                        .approximate_arrival_timestamp()
                        .and_then(|t| t.to_millis().ok())
                        .unwrap_or_else(|| chrono::Utc::now().timestamp_millis()),
                    value: Some(r.data().as_ref()),
                })
                .collect();
            let end = at + records.len() as u64;
            let batch = match decode_records(&s.decoder, &s.dead, &s.dead_key(), p, raw, end, mark)
            {
                Ok(batch) => batch,
                Err(e) => {
                    // Refused records that cannot be kept are not skipped:
                    // the shard waits, and reads them again.
                    iterator = None;
                    s.report_read(
                        &shard,
                        format!(
                            "refused records cannot be kept in the dead-letter store ({}); the shard waits until they can",
                            crate::error::chain(&e)
                        ),
                    );
                    drop(s);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            let fetch = Fetch {
                first: at,
                end,
                tokens: records.iter().map(|r| r.sequence_number().into()).collect(),
                batch,
            };
            let mut st = shard.state.lock().expect("shard state");
            st.cache.push(fetch);
            st.dead_mark = st.dead_mark.max(end);
            st.throttled = false;
            st.millis_behind = out.millis_behind_latest().unwrap_or(0);
            drop(st);
            shard.head.send_replace(end);
        } else {
            let mut st = shard.state.lock().expect("shard state");
            st.throttled = false;
            st.millis_behind = out.millis_behind_latest().unwrap_or(0);
        }
        backoff = Duration::from_millis(500);
        s.clear(p);
        match out.next_shard_iterator() {
            Some(next) => iterator = Some(next.to_string()),
            None => {
                // A closed shard read to its end: its partition is final.
                let end = shard.state.lock().expect("shard state").cache.head;
                finish(&shard, end);
                tracing::info!(shard = %shard.entry.shard, partition = p, end, "a Kinesis shard ended (split or merged)");
                return;
            }
        }
    }
}

pub(super) fn finish(shard: &Shard, end: u64) {
    shard.state.lock().expect("shard state").finished = true;
    // Wakes readers waiting for records: there will be none.
    shard.head.send_replace(end);
}

#[async_trait::async_trait]
impl Source for KinesisSource {
    fn describe(&self) -> String {
        format!("Kinesis stream `{}`", self.config.stream)
    }

    fn stop(&self) {
        KinesisSource::stop(self);
    }

    fn resumes_by_token(&self) -> bool {
        true
    }

    fn resume(
        self: Arc<Self>,
        from: &Coverage,
        tokens: &[Option<String>],
    ) -> Result<(), SourceError> {
        KinesisSource::resume(&self, from, tokens).map_err(SourceError::from)
    }

    fn partitions(&self) -> u32 {
        self.shards.read().expect("kinesis shards").len() as u32
    }

    fn end(&self, p: u32) -> Result<u64, SourceError> {
        Ok(self.shard(p)?.state.lock().expect("shard state").cache.head)
    }

    fn start(&self, p: u32) -> Result<u64, SourceError> {
        Ok(self.shard(p)?.state.lock().expect("shard state").cache.base)
    }

    fn finished(&self, p: u32) -> bool {
        self.shard(p)
            .is_ok_and(|s| s.state.lock().expect("shard state").finished)
    }

    async fn read(
        &self,
        p: u32,
        from: u64,
        until: u64,
        max_events: usize,
    ) -> Result<Vec<SourceBatch>, SourceError> {
        let shard = self.shard(p)?;
        let st = shard.state.lock().expect("shard state");
        if from >= st.cache.head {
            return Ok(Vec::new());
        }
        st.cache.cached(from, until, max_events).ok_or_else(|| {
            KinesisError::Released {
                shard: shard.entry.shard.clone(),
                partition: p,
                position: from,
                hint: format!(
                    "this node keeps the records of the shard from position {} on (what the master dataset does not hold yet); older ones are read from the master dataset",
                    st.cache.base
                ),
            }
            .into()
        })
    }

    async fn wait(&self, p: u32, from: u64, timeout: Duration) {
        let Ok(shard) = self.shard(p) else {
            tokio::time::sleep(timeout).await;
            return;
        };
        let mut sub = shard.head.subscribe();
        let _ = tokio::time::timeout(timeout, async {
            loop {
                if *sub.borrow_and_update() > from
                    || shard.state.lock().expect("shard state").finished
                {
                    return;
                }
                if sub.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    fn resume_token(&self, p: u32, position: u64) -> Option<String> {
        let shard = self.shard(p).ok()?;
        let st = shard.state.lock().expect("shard state");
        st.cache.token_at(position)
    }

    fn archived(&self, p: u32, end: u64) {
        if let Ok(shard) = self.shard(p) {
            shard.state.lock().expect("shard state").cache.release(end);
        }
    }

    fn info(&self, p: u32) -> Option<PartitionInfo> {
        let shard = self.shard(p).ok()?;
        let st = shard.state.lock().expect("shard state");
        Some(PartitionInfo {
            id: shard.entry.shard.clone(),
            state: if st.finished {
                PartitionState::Closed
            } else if st.throttled {
                PartitionState::Throttled
            } else {
                PartitionState::Open
            },
            behind_ms: Some(st.millis_behind),
        })
    }
}

// ---------------------------------------------------------------------------
// The producer

/// Whether a Kinesis error says that a sequence number is not of this
/// stream (it was deleted and created again); if so, reports partition `p`
/// stopped in `health` with what to do, and the caller stops reading it.
pub fn not_this_stream(
    health: Option<&Health>,
    stream: &str,
    p: u32,
    shard: &str,
    code: Option<&str>,
    message: Option<&str>,
) -> bool {
    let Some(message) = message else { return false };
    if code != Some("InvalidArgumentException")
        || !message.contains("did not come from this stream")
    {
        return false;
    }
    let e = KinesisError::NotThisStream {
        stream: stream.into(),
        partition: p,
        shard: shard.into(),
        detail: message.into(),
    };
    tracing::error!(partition = p, error = %e, "a Kinesis partition stopped");
    if let Some(h) = health {
        h.report_error(&format!("stream/p{p}"), &e);
    }
    true
}
