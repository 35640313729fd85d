//! Which stream the master dataset was written from, recorded under the
//! storage root so that a node never takes one stream's positions for
//! another's.
//!
//! ```text
//!  root/stream/identity-00000001.json   {kind, topic | stream (+ ARN, creation time), how}
//!  root/stream/identity-00000002.json   … replaced by `lambdaflow accept-loss --stream`
//!
//!  startup:  recorded == configured? ──yes──▶ serve
//!              │ no record (a new root, or one from before identities)
//!              │     └─▶ record what the root implies (events in the embedded log: the
//!              │         embedded log; else the configured stream), then compare
//!              └─ differs ─▶ nothing held anywhere? re-record : refuse, saying what to do
//!  running (Kinesis):  the stream's creation time changes, or GetShardIterator says a
//!                      sequence number "did not come from this stream" ─▶ the partitions
//!                      stop, `health` names `accept-loss --stream`
//! ```
//!
//! Positions are only comparable within one stream: the embedded log's
//! offsets, a Kafka topic's offsets and a Kinesis stream's ordinals (per
//! shard, resumed by sequence number) are unrelated numbers, and a Kinesis
//! stream deleted and created again under the same name starts over. Each
//! record is created only if absent (one generation after another, as the
//! Kinesis shard registry is), so every node of a cluster agrees on it.

use std::sync::{Arc, Weak};
use std::time::Duration;

use aws_sdk_kinesis::error::ProvideErrorMetadata;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::health::Health;
use crate::master::{MasterDataset, MasterError};
use crate::storage::{Storage, StorageError};
use crate::stream::Source;
use crate::stream::kinesis::{KinesisConfig, KinesisError, Registry, ShardEntry};
use crate::stream::log::{Log, LogError};

/// Where the records live under the storage root.
const DIR: &str = "stream";
/// How often a running node checks that its Kinesis stream is the recorded one.
const WATCH_EVERY: Duration = Duration::from_secs(5);

/// A stream, as far as its positions go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StreamIdentity {
    /// The node's own log (`stream.dir`/log).
    Embedded,
    /// A Kafka topic. The brokers are kept to say where it was; a topic is
    /// the same topic whatever bootstrap servers reach it.
    Kafka { topic: String, brokers: String },
    /// A Kinesis stream, with what tells one stream of a name from another
    /// created later under it.
    Kinesis {
        stream: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        arn: Option<String>,
        /// `StreamCreationTimestamp`, ms since the epoch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        created_ms: Option<i64>,
    },
}

impl StreamIdentity {
    /// Whether positions of `self` are positions of `other`.
    pub fn same_as(&self, other: &StreamIdentity) -> bool {
        use StreamIdentity as S;
        match (self, other) {
            (S::Embedded, S::Embedded) => true,
            (S::Kafka { topic: a, .. }, S::Kafka { topic: b, .. }) => a == b,
            (
                S::Kinesis {
                    stream: a,
                    arn: arn_a,
                    created_ms: ca,
                },
                S::Kinesis {
                    stream: b,
                    arn: arn_b,
                    created_ms: cb,
                },
            ) => {
                fn agree<T: PartialEq>(x: &Option<T>, y: &Option<T>) -> bool {
                    x.is_none() || y.is_none() || x == y
                }
                a == b && agree(arn_a, arn_b) && agree(ca, cb)
            }
            _ => false,
        }
    }

    /// What a node that accepts this stream in place of the recorded one
    /// does with the positions the master dataset holds.
    pub fn accepting_means(&self) -> &'static str {
        match self {
            StreamIdentity::Embedded => {
                "the embedded log hands out positions from the archived coverage on, so new events are counted on top of what the master dataset holds"
            }
            StreamIdentity::Kafka { .. } => {
                "each Kafka partition p is read from the archived coverage H[p] on: the topic's records below H[p] are never counted (what the master dataset holds stays counted)"
            }
            StreamIdentity::Kinesis { .. } => {
                "the partitions written so far end at their archived positions and keep what the master dataset holds; the stream's shards become new partitions after them, read from their first record"
            }
        }
    }
}

fn time_of(ms: &i64) -> String {
    chrono::DateTime::from_timestamp_millis(*ms).map_or_else(
        || ms.to_string(),
        |t| t.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string(),
    )
}

impl std::fmt::Display for StreamIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamIdentity::Embedded => write!(f, "the embedded log"),
            StreamIdentity::Kafka { topic, brokers } => {
                write!(f, "Kafka topic `{topic}` (brokers {brokers})")
            }
            StreamIdentity::Kinesis {
                stream, created_ms, ..
            } => match created_ms {
                Some(t) => write!(f, "Kinesis stream `{stream}` created {}", time_of(t)),
                None => write!(f, "Kinesis stream `{stream}`"),
            },
        }
    }
}

/// One generation of the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    pub generation: u64,
    pub identity: StreamIdentity,
    /// When it was recorded (RFC 3339).
    pub at: String,
    /// Why: a new root, adopted on an existing one, or accepted in place of
    /// another stream.
    pub how: String,
    /// The identity it replaced, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced: Option<StreamIdentity>,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "{unarchived} events acknowledged on the embedded log in {} are not archived yet, but the configuration now names {configured} as the stream: a node started so would never read them",
        .dir.display()
    )]
    Unarchived {
        dir: std::path::PathBuf,
        unarchived: u64,
        configured: StreamIdentity,
    },
    #[error(
        "the master dataset under {root} was written from {recorded}, but the configuration names {configured}: positions of one stream are not positions of the other"
    )]
    Switched {
        root: String,
        recorded: StreamIdentity,
        configured: StreamIdentity,
    },
    #[error(
        "Kinesis stream `{stream}` was deleted and created again: the master dataset under {root} was written from the stream created {}, the stream of that name now was created {}; its sequence numbers do not continue the recorded ones",
        time_of(.recorded_ms),
        time_of(.now_ms)
    )]
    Recreated {
        root: String,
        stream: String,
        recorded_ms: i64,
        now_ms: i64,
    },
    #[error(
        "partition {partition} ({id}) stopped: {stream} is not the stream the master dataset was written from ({detail})\nhint: it was deleted and created again; stop the node and run `lambdaflow accept-loss --stream`: what the master dataset holds stays counted, the old partitions end at their archived positions, and the new stream's become new partitions (records of the old stream not archived yet went with it)"
    )]
    Stopped {
        stream: String,
        partition: u32,
        id: String,
        detail: String,
    },
    #[error("the stream identity record {path} cannot be {op}: {detail}")]
    Record {
        path: String,
        op: &'static str,
        detail: String,
    },
    #[error("cannot move the embedded log {} aside to {}", .from.display(), .to.display())]
    MoveLog {
        from: std::path::PathBuf,
        to: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot describe Kinesis stream `{stream}`: {detail}")]
    Describe { stream: String, detail: String },
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Master(#[from] MasterError),
    #[error("{0}")]
    Kinesis(#[from] KinesisError),
    #[error("{0}")]
    Log(#[from] LogError),
}

crate::explained!(IdentityError);

impl crate::error::Explain for IdentityError {
    fn hint(&self) -> Option<String> {
        match self {
            IdentityError::Unarchived { configured, .. } => Some(format!(
                "start the node again on the embedded log (without `[stream] kafka`/`kinesis`) until `lambdaflow status` shows every partition archived and published; the embedded log's positions are not {configured}'s, so then use a new storage root (`data`) for {configured}. Or give these events up: `lambdaflow accept-loss --stream` (the node stopped) records {configured} in place of the embedded log and moves the log aside; {}",
                configured.accepting_means()
            )),
            IdentityError::Switched {
                recorded,
                configured,
                ..
            } => Some(format!(
                "use a new storage root (`data`) for {configured}, or configure {recorded} again. To go on here anyway, run `lambdaflow accept-loss --stream` (the node stopped): {}",
                configured.accepting_means()
            )),
            IdentityError::Recreated { .. } => Some(
                "stop here and run `lambdaflow accept-loss --stream`: what the master dataset holds stays counted, the old stream's partitions end at their archived positions, and the new stream's shards become new partitions, read from their first record (records of the old stream not archived yet went with it); or use a new storage root"
                    .into(),
            ),
            _ => None,
        }
    }
}

fn record_name(generation: u64) -> String {
    format!("{DIR}/identity-{generation:08}.json")
}

/// The latest generation of the record under `storage`, if any.
pub async fn load(storage: &Storage) -> Result<Option<Recorded>, IdentityError> {
    let latest = storage
        .list_files(DIR)
        .await?
        .into_iter()
        .filter_map(|f| {
            f.strip_prefix("identity-")?
                .strip_suffix(".json")?
                .parse::<u64>()
                .ok()
        })
        .max();
    let Some(g) = latest else { return Ok(None) };
    let name = record_name(g);
    let bad = |detail: String| IdentityError::Record {
        path: format!("{}/{name}", storage.describe().trim_end_matches('/')),
        op: "read",
        detail,
    };
    let bytes = storage
        .get(&name)
        .await?
        .ok_or_else(|| bad("it vanished".into()))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| bad(e.to_string()))
}

/// Records `identity` as the generation after `after` (none: the first),
/// if no other writer recorded that generation first; then returns the
/// latest record, whoever wrote it.
pub async fn record(
    storage: &Storage,
    after: Option<&Recorded>,
    identity: StreamIdentity,
    how: String,
) -> Result<Recorded, IdentityError> {
    let rec = Recorded {
        generation: after.map_or(1, |r| r.generation + 1),
        identity,
        at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        how,
        replaced: after.map(|r| r.identity.clone()),
    };
    let body = serde_json::to_vec_pretty(&rec).expect("a record serializes");
    if storage
        .create(&record_name(rec.generation), Bytes::from(body))
        .await?
    {
        return Ok(rec);
    }
    Ok(load(storage)
        .await?
        .expect("a record another writer created"))
}

/// The identity of the stream `config` names (Kinesis: as the service
/// describes it now).
pub async fn configured(config: &Config) -> Result<StreamIdentity, IdentityError> {
    if let Some(k) = &config.stream.kafka {
        return Ok(StreamIdentity::Kafka {
            topic: k.topic.clone(),
            brokers: k.brokers.clone(),
        });
    }
    if let Some(k) = &config.stream.kinesis {
        return kinesis_identity(&k.client().await, &k.stream).await;
    }
    Ok(StreamIdentity::Embedded)
}

/// `DescribeStreamSummary`: the stream's ARN and creation time.
pub async fn kinesis_identity(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
) -> Result<StreamIdentity, IdentityError> {
    let resp = client
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await
        .map_err(|e| {
            let detail = match (e.code(), e.message()) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                _ => crate::error::chain(&e),
            };
            if e.code() == Some("ResourceNotFoundException") {
                IdentityError::Kinesis(KinesisError::NoStream {
                    stream: stream.into(),
                })
            } else {
                IdentityError::Describe {
                    stream: stream.into(),
                    detail,
                }
            }
        })?;
    let s = resp.stream_description_summary();
    Ok(StreamIdentity::Kinesis {
        stream: stream.into(),
        arn: s.map(|s| s.stream_arn().to_string()),
        created_ms: s.and_then(|s| s.stream_creation_timestamp().to_millis().ok()),
    })
}

/// What a root holds, for deciding whether a change of stream loses anything.
struct Held {
    /// Events in the embedded log above the archived coverage.
    unarchived: u64,
    /// Whether the embedded log holds or held any event.
    log_events: bool,
    /// Whether the master dataset holds any chunk.
    archived: bool,
}

async fn held(log: &Log, master: &MasterDataset) -> Result<Held, IdentityError> {
    let snapshot = master.snapshot().await?;
    let mut archived_end = snapshot.coverage.h.clone();
    for c in snapshot.files.iter().flat_map(|f| &f.chunks) {
        archived_end.raise(c.partition(), c.end());
    }
    let stats = log.stats();
    Ok(Held {
        unarchived: stats
            .iter()
            .map(|s| s.end.saturating_sub(archived_end.get(s.partition)))
            .sum(),
        log_events: stats.iter().any(|s| s.end > 0),
        archived: !snapshot.files.is_empty() || archived_end.iter().any(|(_, h)| h > 0),
    })
}

/// The startup check: the recorded identity if the configured stream is
/// it (recording one first on a root that has none), else why not.
pub async fn check(
    config: &Config,
    log: &Log,
    master: &MasterDataset,
    health: &Health,
) -> Result<Recorded, IdentityError> {
    let storage = master.storage();
    let configured = configured(config).await?;
    let mut recorded = load(storage).await?;
    if let Some(r) = &recorded
        && r.identity.same_as(&configured)
    {
        return Ok(r.clone());
    }
    let held = held(log, master).await?;
    if recorded.is_none() {
        // A new root, or one from before identities were recorded: the
        // embedded log holds events only if it was the stream (a node on
        // Kafka or Kinesis never writes it).
        let (identity, how) = if held.log_events {
            (
                StreamIdentity::Embedded,
                "adopted: the embedded log holds events of this root".to_string(),
            )
        } else if held.archived {
            (
                configured.clone(),
                format!(
                    "adopted: the master dataset was written before stream identities were recorded; taken to be the configured {configured}"
                ),
            )
        } else {
            (configured.clone(), "a new storage root".to_string())
        };
        let r = record(storage, None, identity, how).await?;
        if r.how.starts_with("adopted") {
            tracing::warn!(identity = %r.identity, how = %r.how, "recorded the stream identity of an existing storage root");
            health.recovered("stream/identity", &format!("{}: {}", r.identity, r.how));
        }
        if r.identity.same_as(&configured) {
            return Ok(r);
        }
        recorded = Some(r);
    }
    let recorded = recorded.expect("a record");
    if !held.archived && !held.log_events {
        // Nothing read from the recorded stream was kept: nothing to lose.
        let how = format!(
            "the root held no events of {}; the configured stream replaces it",
            recorded.identity
        );
        let r = record(storage, Some(&recorded), configured.clone(), how).await?;
        tracing::info!(from = %recorded.identity, to = %r.identity, "recorded the configured stream on a root that holds no events");
        return Ok(r);
    }
    let root = storage.describe();
    match (&recorded.identity, &configured) {
        (
            StreamIdentity::Kinesis {
                stream: a,
                created_ms: Some(was),
                ..
            },
            StreamIdentity::Kinesis {
                stream: b,
                created_ms: Some(now),
                ..
            },
        ) if a == b => Err(IdentityError::Recreated {
            root,
            stream: a.clone(),
            recorded_ms: *was,
            now_ms: *now,
        }),
        (StreamIdentity::Embedded, _) if held.unarchived > 0 => Err(IdentityError::Unarchived {
            dir: config.local_dir().join("log"),
            unarchived: held.unarchived,
            configured,
        }),
        _ => Err(IdentityError::Switched {
            root,
            recorded: recorded.identity.clone(),
            configured,
        }),
    }
}

/// What `lambdaflow accept-loss --stream` does once the node is stopped and
/// every archived chunk published: the configured stream is recorded in
/// place of the recorded one. Moving to Kinesis, every partition numbered
/// so far (`partitions`: the master dataset's) is retired in the stream's
/// shard registry, so the stream's shards become new partitions after
/// them. Moving off the embedded log, the log is moved aside (`log` →
/// `log-abandoned-<time>`). Returns the new record and where the log went.
pub async fn accept(
    config: &Config,
    storage: &Storage,
    recorded: Option<&Recorded>,
    configured: StreamIdentity,
    partitions: u32,
) -> Result<(Recorded, Option<std::path::PathBuf>), IdentityError> {
    if let Some(k) = &config.stream.kinesis {
        retire(storage, k, partitions).await?;
    }
    let mut moved = None;
    let log_dir = config.local_dir().join("log");
    if config.stream.external()
        && recorded.is_none_or(|r| r.identity == StreamIdentity::Embedded)
        && log_dir.exists()
    {
        let to = config.local_dir().join(format!(
            "log-abandoned-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
        ));
        std::fs::rename(&log_dir, &to).map_err(|source| IdentityError::MoveLog {
            from: log_dir.clone(),
            to: to.clone(),
            source,
        })?;
        moved = Some(to);
    }
    let how = format!(
        "accepted with `lambdaflow accept-loss --stream` in place of {}: {}",
        recorded.map_or_else(|| "nothing".to_string(), |r| r.identity.to_string()),
        configured.accepting_means()
    );
    let r = record(storage, recorded, configured.clone(), how).await?;
    if !r.identity.same_as(&configured) {
        return Err(IdentityError::Record {
            path: record_name(r.generation),
            op: "replaced",
            detail: "another process recorded another stream meanwhile; run accept-loss again"
                .into(),
        });
    }
    Ok((r, moved))
}

/// Retires every registered shard of `k`'s registry and pads it to
/// `partitions` entries, then registers the shards listed now after them.
async fn retire(
    storage: &Storage,
    k: &KinesisConfig,
    partitions: u32,
) -> Result<(), IdentityError> {
    let current = Registry::load(storage, &k.stream).await?;
    let mut next = current.clone().unwrap_or(Registry {
        stream: k.stream.clone(),
        generation: 0,
        shards: Vec::new(),
    });
    for s in &mut next.shards {
        s.retired = true;
    }
    while next.shards.len() < partitions as usize {
        next.shards.push(ShardEntry {
            shard: format!("retired-p{}", next.shards.len()),
            parents: Vec::new(),
            first_sequence: String::new(),
            retired: true,
        });
    }
    if current.as_ref() != Some(&next) {
        next.generation += 1;
        let body = serde_json::to_vec_pretty(&next).expect("a registry serializes");
        if !storage
            .create(
                &crate::stream::kinesis::registry_object(&k.stream, next.generation),
                Bytes::from(body),
            )
            .await?
        {
            return Err(IdentityError::Record {
                path: crate::stream::kinesis::registry_object(&k.stream, next.generation),
                op: "written",
                detail: "another node wrote the shard registry meanwhile: stop every node on this root and run accept-loss again".into(),
            });
        }
    }
    crate::stream::kinesis::resolve(storage, k).await?;
    Ok(())
}

/// Watches a running node's external stream: once the configured stream
/// is not the recorded one any more (a Kinesis stream deleted and created
/// again under its name), the source stops and every partition reports it
/// in `health`, until the node stops.
pub fn watch(
    source: Weak<dyn Source>,
    config: Config,
    recorded: StreamIdentity,
    health: Arc<Health>,
) {
    tokio::spawn(async move {
        // One client for the watch (a new one would fetch credentials anew).
        let kinesis = match &config.stream.kinesis {
            Some(k) => Some((k.client().await, k.stream.clone())),
            None => None,
        };
        loop {
            tokio::time::sleep(WATCH_EVERY).await;
            let Some(s) = source.upgrade() else { return };
            let now = match &kinesis {
                Some((client, stream)) => kinesis_identity(client, stream).await,
                None => configured(&config).await,
            };
            let Ok(now) = now else {
                continue; // deleted, unreachable: the readers say so
            };
            if now.same_as(&recorded) {
                continue;
            }
            s.stop();
            for p in 0..s.partitions() {
                let e = IdentityError::Stopped {
                    stream: now.to_string(),
                    partition: p,
                    id: s.info(p).map(|i| i.id).unwrap_or_default(),
                    detail: format!(
                        "it is {now} now, the master dataset was written from {recorded}"
                    ),
                };
                health.report_error(&format!("stream/p{p}"), &e);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinesis(created: Option<i64>) -> StreamIdentity {
        StreamIdentity::Kinesis {
            stream: "events".into(),
            arn: Some("arn:aws:kinesis:us-east-1:1:stream/events".into()),
            created_ms: created,
        }
    }

    #[test]
    fn a_stream_is_itself_and_no_other() {
        let kafka = |topic: &str, brokers: &str| StreamIdentity::Kafka {
            topic: topic.into(),
            brokers: brokers.into(),
        };
        assert!(
            kafka("t", "a:1").same_as(&kafka("t", "b:2")),
            "other bootstrap servers, same topic"
        );
        assert!(
            !kafka("t", "a:1").same_as(&kafka("u", "a:1")),
            "another topic"
        );
        assert!(!StreamIdentity::Embedded.same_as(&kafka("t", "a:1")));
        assert!(kinesis(Some(1)).same_as(&kinesis(Some(1))));
        assert!(
            !kinesis(Some(1)).same_as(&kinesis(Some(2))),
            "created again"
        );
        assert!(
            kinesis(None).same_as(&kinesis(Some(2))),
            "a creation time unknown to one side"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn nodes_racing_to_record_a_root_s_stream_agree_on_one() {
        let storage = Storage::memory();
        let writers: Vec<_> = (0..8i64)
            .map(|w| {
                let storage = storage.clone();
                tokio::spawn(async move {
                    record(
                        &storage,
                        None,
                        kinesis(Some(w)),
                        "a new storage root".into(),
                    )
                    .await
                })
            })
            .collect();
        let mut seen = Vec::new();
        for w in writers {
            seen.push(w.await.expect("a writer").expect("records"));
        }
        let latest = load(&storage).await.expect("load").expect("a record");
        assert_eq!(latest.generation, 1, "one first generation");
        assert!(
            seen.iter().all(|r| *r == latest),
            "every writer is told the one record: {seen:?}"
        );
        let next = record(
            &storage,
            Some(&latest),
            StreamIdentity::Embedded,
            "accepted".into(),
        )
        .await
        .expect("replace");
        assert_eq!(
            (next.generation, next.replaced.as_ref()),
            (2, Some(&latest.identity)),
            "a replacement is the next generation and names what it replaced"
        );
    }
}
