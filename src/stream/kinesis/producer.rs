//! The Kinesis producer: PutRecords without the SDK's own retries, refused records sent again, what became of each.

use super::*;

/// Where a record went: its shard and sequence number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    pub shard: String,
    pub sequence: String,
}

/// One record to put: its partition key, optionally the hash key that
/// places it (overriding the partition key's MD5), and its data.
#[derive(Debug, Clone)]
pub struct PutRecord {
    pub key: String,
    pub hash_key: Option<u128>,
    pub data: Bytes,
}

impl PutRecord {
    /// The bytes Kinesis counts against its record limit: data and key.
    fn size(&self) -> usize {
        self.data.len() + self.key.len()
    }
}

/// The largest record Kinesis takes (data and partition key together) on a
/// stream that keeps the default maximum record size.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// The hash key that puts records of a key hash `h` (32 bits, uniform) at
/// the same place of the 128-bit hash range every time, spread over the
/// whole range whatever the shard layout.
pub fn spread_hash_key(h: u32) -> u128 {
    // Scale the 32-bit hash to the top of the range; fill the low bits
    // from the hash too, so no two hashes collide on a boundary.
    ((h as u128) << 96) | ((h as u128) << 64) | (h as u128)
}

/// `PutRecords` into the stream, the failed records retried.
pub struct KinesisProducer {
    client: Client,
    stream: String,
    /// Spreads unkeyed records of `POST /v1/events` over the hash range.
    next: std::sync::atomic::AtomicU32,
    /// The next partition key of records sent without a partition.
    next_key: std::sync::atomic::AtomicU64,
    /// How long failed records are retried before they are reported.
    retry_for: Duration,
}

/// Why a whole PutRecords call failed, and whether its records may be stored.
pub(super) enum CallFailure {
    /// Throttled: try again.
    Retry(String),
    /// Refused (a service error) or never sent (no connection).
    NotStored(String),
    /// Sent without an answer.
    InDoubt(String),
}

pub(super) fn classify<E, R>(e: aws_sdk_kinesis::error::SdkError<E, R>) -> CallFailure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    use aws_sdk_kinesis::error::SdkError;
    let throttled = matches!(
        e.code(),
        Some(
            "ProvisionedThroughputExceededException"
                | "LimitExceededException"
                | "KMSThrottlingException"
                | "ThrottlingException"
        )
    );
    let refused_connection = {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        let mut refused = false;
        while let Some(c) = cause {
            if let Some(io) = c.downcast_ref::<std::io::Error>()
                && matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                )
            {
                refused = true;
            }
            cause = c.source();
        }
        refused
    };
    let service = matches!(
        e,
        SdkError::ServiceError(_) | SdkError::ConstructionFailure(_)
    );
    let detail = aws_detail(e);
    if throttled {
        CallFailure::Retry(detail)
    } else if service || refused_connection {
        CallFailure::NotStored(detail)
    } else {
        CallFailure::InDoubt(detail)
    }
}

impl KinesisProducer {
    /// A producer whose client does not retry by itself: a call the SDK
    /// sent again after a timeout or a lost connection would store its
    /// records twice, and report them stored once. This producer retries
    /// only what Kinesis refused (throttled calls, refused records), and
    /// reports a call without an answer as in doubt.
    pub async fn new(config: &KinesisConfig) -> KinesisProducer {
        KinesisProducer::with_client(config.reader_client().await, &config.stream)
    }

    /// A producer on a client built elsewhere (explicit credentials, say).
    pub fn with_client(client: Client, stream: &str) -> KinesisProducer {
        KinesisProducer {
            client,
            stream: stream.into(),
            next: std::sync::atomic::AtomicU32::new(0),
            next_key: std::sync::atomic::AtomicU64::new(0),
            retry_for: Duration::from_secs(20),
        }
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Sends `(partition key, data)` records and returns where each one
    /// went, in order, once all are stored; the first failure otherwise
    /// (some records may be stored then: [`KinesisProducer::send_each`]
    /// says which).
    pub async fn send(&self, records: &[(String, Bytes)]) -> Result<Vec<Put>, KinesisError> {
        let records: Vec<PutRecord> = records
            .iter()
            .map(|(key, data)| PutRecord {
                key: key.clone(),
                hash_key: None,
                data: data.clone(),
            })
            .collect();
        self.send_each(&records)
            .await
            .into_iter()
            .map(|d| match d {
                Delivery::Stored(p) => Ok(p),
                Delivery::NotStored(detail) | Delivery::InDoubt(detail) => Err(KinesisError::Put {
                    stream: self.stream.clone(),
                    detail,
                }),
            })
            .collect()
    }

    /// Sends records in calls of at most 500 records and 5 MiB; records a
    /// call refuses (throttled, an internal failure) are sent again with
    /// backoff for a while. Returns what became of each record, in order.
    /// After a call fails whole for good, the records after it are not sent.
    pub async fn send_each(&self, records: &[PutRecord]) -> Vec<Delivery<Put>> {
        let mut out: Vec<Option<Delivery<Put>>> = vec![None; records.len()];
        let mut start = 0;
        let deadline = Instant::now() + self.retry_for;
        while start < records.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < records.len()
                && end - start < PUT_RECORDS
                && (end == start || bytes + records[end].size() <= PUT_BYTES)
            {
                bytes += records[end].size();
                end += 1;
            }
            let failed = self
                .put_all(&records[start..end], &mut out[start..end], deadline)
                .await;
            start = end;
            if let Some(why) = failed {
                for o in &mut out[start..] {
                    *o = Some(Delivery::NotStored(format!(
                        "not sent: an earlier PutRecords call of the request failed ({why})"
                    )));
                }
                break;
            }
        }
        out.into_iter()
            .map(|d| d.expect("every record has an outcome"))
            .collect()
    }

    /// One call's records until each is stored or failed; `Some(why)` when
    /// the call failed as a whole (the records after it should not be sent).
    async fn put_all(
        &self,
        records: &[PutRecord],
        out: &mut [Option<Delivery<Put>>],
        deadline: Instant,
    ) -> Option<String> {
        // 50 ms doubling to 2 s. The schedule is backon's; the loop is kept:
        // whether a try is the last depends on its next delay and the
        // deadline (a refused record is final only then), and each try
        // sends only the records still pending.
        let mut delays = backon::BackoffBuilder::build(
            backon::ExponentialBuilder::new()
                .with_min_delay(Duration::from_millis(50))
                .with_max_delay(Duration::from_secs(2))
                .without_max_times(),
        );
        let mut backoff = delays.next().expect("the schedule has no end");
        loop {
            let pending: Vec<usize> = (0..records.len()).filter(|&i| out[i].is_none()).collect();
            if pending.is_empty() {
                return None;
            }
            let entries = pending
                .iter()
                .map(|&i| {
                    PutRecordsRequestEntry::builder()
                        .partition_key(&records[i].key)
                        .set_explicit_hash_key(records[i].hash_key.map(|h| h.to_string()))
                        .data(Blob::new(records[i].data.to_vec()))
                        .build()
                        .expect("key and data are set")
                })
                .collect::<Vec<_>>();
            let last_try = Instant::now() + backoff >= deadline;
            match self
                .client
                .put_records()
                .stream_name(&self.stream)
                .set_records(Some(entries))
                .send()
                .await
            {
                Ok(resp) => {
                    for (r, &i) in resp.records().iter().zip(&pending) {
                        match (r.shard_id(), r.sequence_number()) {
                            (Some(shard), Some(seq)) if r.error_code().is_none() => {
                                out[i] = Some(Delivery::Stored(Put {
                                    shard: shard.to_string(),
                                    sequence: seq.to_string(),
                                }));
                            }
                            // Kinesis did not store this one (it says so per record).
                            _ if last_try => {
                                out[i] = Some(Delivery::NotStored(format!(
                                    "{}: {}",
                                    r.error_code().unwrap_or("no sequence number"),
                                    r.error_message().unwrap_or("")
                                )))
                            }
                            _ => {}
                        }
                    }
                    if resp.records().len() < pending.len() {
                        // An answer without a result for some records: theirs is unknown.
                        for &i in &pending[resp.records().len()..] {
                            out[i] = Some(Delivery::InDoubt(
                                "PutRecords answered without a result for the record".into(),
                            ));
                        }
                    }
                }
                Err(e) => {
                    let fail = |out: &mut [Option<Delivery<Put>>],
                                d: &dyn Fn() -> Delivery<Put>| {
                        for &i in &pending {
                            out[i] = Some(d());
                        }
                    };
                    match classify(e) {
                        CallFailure::Retry(why) if last_try => {
                            fail(out, &|| Delivery::NotStored(why.clone()));
                            return Some(why);
                        }
                        CallFailure::Retry(_) => {}
                        CallFailure::NotStored(why) => {
                            fail(out, &|| Delivery::NotStored(why.clone()));
                            return Some(why);
                        }
                        CallFailure::InDoubt(why) => {
                            fail(out, &|| Delivery::InDoubt(why.clone()));
                            return Some(why);
                        }
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = delays.next().expect("the schedule has no end");
        }
    }
}

/// Kinesis as a [`Producer`]: a record with a partition is sent under it as
/// its partition key, with an explicit hash key — its event key's MD5 (what
/// Kinesis makes of that key as a partition key), or one spread over the
/// whole hash range, so every shard takes its share
/// whatever the shard layout; a record without one gets the next of a
/// counter as its key (the paper's producer).
#[async_trait::async_trait]
impl crate::stream::producer::Producer for KinesisProducer {
    fn describe(&self) -> String {
        format!("Kinesis stream `{}`", self.stream)
    }

    fn max_record(&self) -> (usize, &'static str) {
        // The partition key counts too (a few digits).
        (
            MAX_RECORD_BYTES - 16,
            "Kinesis (1 MiB per record, its partition key included)",
        )
    }

    async fn send_each(
        &self,
        records: Vec<crate::stream::producer::Outgoing>,
    ) -> Vec<Delivery<crate::stream::producer::Placed>> {
        use std::sync::atomic::Ordering;
        let base = self.next.fetch_add(records.len() as u32, Ordering::Relaxed);
        let records: Vec<PutRecord> =
            records
                .into_iter()
                .enumerate()
                .map(|(i, r)| match r.partition {
                    Some(p) => PutRecord {
                        key: p.to_string(),
                        // A keyed record's hash key is the one Kinesis gives a
                        // partition key of the event key's text (its MD5), so
                        // any producer keyed by it puts the key on the same shard.
                        hash_key: Some(r.key.unwrap_or_else(|| {
                            spread_hash_key(spread(base.wrapping_add(i as u32)))
                        })),
                        data: r.data,
                    },
                    // Under its event key as partition key; a key longer than
                    // Kinesis takes (256 characters) goes by the hash key that
                    // partition key would have had (its MD5).
                    None => match r.text_key.as_deref().map(String::from_utf8_lossy) {
                        // Counted as Kinesis counts (UTF-16 units, as Java).
                        Some(k) if !k.is_empty() && k.encode_utf16().count() <= 256 => PutRecord {
                            key: k.into_owned(),
                            hash_key: None,
                            data: r.data,
                        },
                        Some(k) => PutRecord {
                            key: self.next_key.fetch_add(1, Ordering::Relaxed).to_string(),
                            hash_key: Some({
                                use md5::Digest;
                                u128::from_be_bytes(md5::Md5::digest(k.as_bytes()).into())
                            }),
                            data: r.data,
                        },
                        None => PutRecord {
                            key: self.next_key.fetch_add(1, Ordering::Relaxed).to_string(),
                            hash_key: None,
                            data: r.data,
                        },
                    },
                })
                .collect();
        KinesisProducer::send_each(self, &records)
            .await
            .into_iter()
            .map(|d| match d {
                Delivery::Stored(put) => {
                    Delivery::Stored(crate::stream::producer::Placed::Sequence {
                        shard: put.shard,
                        sequence: put.sequence,
                    })
                }
                Delivery::NotStored(why) => Delivery::NotStored(why),
                Delivery::InDoubt(why) => Delivery::InDoubt(why),
            })
            .collect()
    }
}

/// A 32-bit value spread uniformly from a counter (SplitMix64's finalizer):
/// consecutive unkeyed events land far apart in the hash range.
pub(super) fn spread(n: u32) -> u32 {
    let mut z = (n as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as u32
}
