//! The embedded log: lambdaflow's own durable, partitioned stream (the
//! Kinesis role in the paper).
//!
//! ```text
//!  data/log/
//!    meta.json                 {"format":1,"partitions":2}
//!    p0/00000000000000000000.log     segment: frames, base offset in the name
//!    p0/00000000000000000000.index   sparse offset index, written when sealed
//!    p0/00000000000001048576.log     the active segment (appended, fsynced)
//!    p1/…
//!
//!  frame = [len u32][crc32c u32][ver u8][base u64][count u32][ingest_ms i64]([tag_len u16][tag])[Arrow IPC stream]
//!           └ len and crc cover everything after the crc ┘          └ version 2 only ┘
//! ```
//!
//! A version 2 frame carries a tag: the identity of the request whose
//! events it holds (`stream::requests`), so a producer's re-sent request is
//! recognised by exactly what survives of its events, in the same fsync.
//!
//! ```text
//! ```
//!
//! Each partition has one writer thread. Appends queue to it; it writes every
//! queued frame, fsyncs once and only then acknowledges them all (group
//! commit): an acknowledged event survives `kill -9` and power loss, and many
//! concurrent requests share one fsync. Offsets are dense per partition: a
//! frame of `count` events holds offsets `[base, base + count)`.
//!
//! Readers see only fsynced frames, read from any retained offset, and check
//! each frame's CRC. On open, the active segment is scanned and a torn tail (a
//! frame cut or garbled by a crash before its fsync, so never acknowledged) is
//! cut off at the first bad frame; the bytes cut are kept aside in a
//! `.truncated-*` file, never just destroyed. Retention deletes whole sealed
//! segments below an offset, never the active one.

use crate::clock::{SharedClock, SystemClock};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Cursor, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrow::error::ArrowError;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};

mod source;

const FORMAT: u32 = 1;
const FRAME_VERSION: u8 = 1;
/// A frame with a tag (see the module doc).
const FRAME_VERSION_TAGGED: u8 = 2;
/// `len` and `crc`.
const FRAME_PREFIX: usize = 8;
/// `ver`, `base`, `count`, `ingest_ms`.
const FRAME_FIXED: usize = 1 + 8 + 4 + 8;
const FRAME_HEAD: usize = FRAME_PREFIX + FRAME_FIXED;
/// One group commit writes at most this much before it fsyncs.
const MAX_GROUP_BYTES: usize = 64 << 20;
const INDEX_MAGIC: &[u8; 4] = b"LFIX";

/// Errors of the embedded log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log I/O failed: could not {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the log in {} is in use by another process", dir.display())]
    Locked { dir: PathBuf },
    #[error(
        "the log in {} has {found} partitions, but the configuration asks for {configured}",
        dir.display()
    )]
    PartitionMismatch {
        dir: PathBuf,
        found: u32,
        configured: u32,
    },
    #[error("the log in {} is not a lambdaflow log: {detail}", dir.display())]
    BadMeta { dir: PathBuf, detail: String },
    #[error("no partition {partition}: the log has {partitions} partitions")]
    NoSuchPartition { partition: u32, partitions: u32 },
    #[error(
        "offset {offset} of partition {partition} is no longer in the log: retention removed everything below {start}"
    )]
    Trimmed {
        partition: u32,
        offset: u64,
        start: u64,
    },
    #[error("offset {offset} of partition {partition} is beyond the log's end ({end})")]
    OutOfRange {
        partition: u32,
        offset: u64,
        end: u64,
    },
    #[error(
        "corrupt log frame in {} at byte {position}: {detail}\ndetail: partition {partition}, offsets {first_offset}..{until} cannot be read; they are not served or archived, and the partition's later events wait behind them\nhint: restore the segment file from a backup; nothing is skipped until it reads back",
        segment.display()
    )]
    Corrupt {
        partition: u32,
        segment: PathBuf,
        position: u64,
        first_offset: u64,
        /// The first offset known to be readable again (next index entry, next segment, or the end).
        until: u64,
        detail: String,
    },
    #[error(
        "the log cannot keep up: {pending} of queued writes waiting for fsync (limit {limit})\nhint: retry after a short pause"
    )]
    Overloaded {
        pending: bytesize::ByteSize,
        limit: bytesize::ByteSize,
    },
    #[error("the disk holding the log is full: {detail}")]
    NoSpace { detail: String },
    #[error(
        "the process has run out of file descriptors: {detail}\nhint: raise the open-files limit (`ulimit -n`), or lower http.max_connections; nothing was stored, retry"
    )]
    OutOfFiles { detail: String },
    #[error("could not encode events for the log")]
    Encode(#[source] ArrowError),
    #[error("the log is shut down")]
    Closed,
}

crate::explained!(LogError);

impl crate::error::Explain for LogError {
    fn hint(&self) -> Option<String> {
        match self {
            LogError::Locked { .. } => Some(
                "stop the other lambdaflow using this directory, or give this node its own: `--data` (or `data`) for a local root; `dir` when `data` is an S3 root shared by several nodes".into(),
            ),
            LogError::PartitionMismatch { found, .. } => Some(format!(
                "the partition count of an existing log cannot change; set stream.partitions = {found} or use a new data directory"
            )),
            _ => None,
        }
    }
}

impl LogError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> LogError {
        if source.raw_os_error() == Some(28) {
            // ENOSPC: callers answer it differently (507, keep reads going).
            return LogError::NoSpace {
                detail: format!("could not {op} {}: {source}", path.display()),
            };
        }
        if matches!(source.raw_os_error(), Some(23 | 24)) {
            // EMFILE / ENFILE: a resource the process gets back, not damage.
            return LogError::OutOfFiles {
                detail: format!("could not {op} {}: {source}", path.display()),
            };
        }
        LogError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// A copy for the many waiters of one failed group commit.
    fn duplicate(&self) -> LogError {
        match self {
            LogError::Io { op, path, source } => LogError::Io {
                op,
                path: path.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            LogError::NoSpace { detail } => LogError::NoSpace {
                detail: detail.clone(),
            },
            LogError::OutOfFiles { detail } => LogError::OutOfFiles {
                detail: detail.clone(),
            },
            other => LogError::Io {
                op: "write",
                path: PathBuf::new(),
                source: io::Error::other(other.to_string()),
            },
        }
    }
}

/// Tuning of the embedded log.
#[derive(Debug, Clone)]
pub struct LogOptions {
    pub partitions: u32,
    /// A segment is sealed and a new one started once it reaches this size.
    pub segment_bytes: u64,
    /// An index entry is kept at least every this many bytes of a segment.
    pub index_interval_bytes: u64,
    /// Encoded events queued for fsync, at most; appends beyond wait, then fail.
    pub max_pending_bytes: u64,
    /// How long an append waits for room in the queue before `Overloaded`.
    pub pending_wait: Duration,
    /// Per partition, the offset below which every event is already safe in
    /// the master dataset (its archived coverage). A log that ends below it
    /// lost events it once held — deleted, restored from an older backup, or
    /// damaged at its tail — and must not hand those offsets out again: it
    /// restarts at the floor (see [`LogRecovery`]). Empty: no floor.
    pub floors: Vec<u64>,
    /// Stamps each frame's ingest time (the stream time chunks are cut on).
    pub clock: SharedClock,
    /// The event schema frames are read as: a frame written before the
    /// schema gained a field reads it as null ([`crate::schema::conform`]).
    pub events: Option<arrow::datatypes::SchemaRef>,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            partitions: 2,
            segment_bytes: 128 << 20,
            index_interval_bytes: 64 << 10,
            max_pending_bytes: 256 << 20,
            pending_wait: Duration::from_millis(500),
            floors: Vec::new(),
            clock: SystemClock::shared(),
            events: None,
        }
    }
}

/// What opening a partition did because its log ended below the floor (the
/// archived coverage): the offsets `[log_end, floor)` belong to events the
/// master dataset already holds, so the log restarts at `floor` rather than
/// give them out again.
#[derive(Debug, Clone, Serialize)]
pub struct LogRecovery {
    pub partition: u32,
    /// Where the log ended when it was opened (after any cut).
    pub log_end: u64,
    /// The archived coverage: the log's new start and end.
    pub floor: u64,
    /// Set when the end was cut below the floor: the tail was damaged after
    /// it had been acknowledged and archived, not torn by a crash.
    pub damage: Option<String>,
    /// Where the superseded segments were moved (never deleted).
    pub moved_to: Option<PathBuf>,
}

impl std::fmt::Display for LogRecovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self {
            partition: p,
            log_end,
            floor,
            ..
        } = self;
        match &self.damage {
            Some(d) => write!(
                f,
                "the log of partition {p} was damaged below what the master dataset holds ({d}); it ended at {log_end} but offsets up to {floor} are archived"
            )?,
            None => write!(
                f,
                "the log of partition {p} ended at {log_end} but the master dataset holds offsets up to {floor} (the log was deleted or restored from an older copy)"
            )?,
        }
        write!(
            f,
            "; the log restarts at offset {floor}, so no offset is given out twice"
        )?;
        if let Some(dir) = &self.moved_to {
            write!(f, "; its old segments were moved to {}", dir.display())?;
        }
        Ok(())
    }
}

/// Where an appended batch landed: offsets `[first, first + count)` of `partition`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AppendAck {
    pub partition: u32,
    pub first: u64,
    pub count: u64,
}

/// A tagged frame: offsets `[base, base + count)` of `partition`, and the
/// tag it was appended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameTag {
    pub partition: u32,
    pub base: u64,
    pub count: u32,
    /// When the log's writer accepted the frame (milliseconds since the epoch).
    pub ingest_ms: i64,
    pub tag: Vec<u8>,
}

/// Events read back from the log, starting exactly at `first_offset`.
#[derive(Debug, Clone)]
pub struct LogBatch {
    pub partition: u32,
    pub first_offset: u64,
    /// When the log's writer accepted the frame (milliseconds since the epoch).
    pub ingest_time_ms: i64,
    pub batch: RecordBatch,
}

/// A partition's extent and counters, for status and benchmarks.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionStats {
    pub partition: u32,
    /// The lowest offset still in the log.
    pub start: u64,
    /// One past the last durable offset.
    pub end: u64,
    pub segments: usize,
    pub bytes: u64,
    pub fsyncs: u64,
    pub frames: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    format: u32,
    partitions: u32,
}

/// The embedded log. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct Log {
    dir: PathBuf,
    partitions: Vec<Arc<Partition>>,
    pending: Arc<Semaphore>,
    pending_units: u32,
    pending_wait: Duration,
    recoveries: Vec<LogRecovery>,
    events: Option<arrow::datatypes::SchemaRef>,
    _lock: File,
}

struct Partition {
    id: u32,
    dir: PathBuf,
    segments: RwLock<Vec<Arc<Segment>>>,
    /// One past the last durable offset; readers watch it to wait for data.
    end: watch::Sender<u64>,
    sender: Mutex<Option<mpsc::Sender<Append>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    fsyncs: AtomicU64,
    frames: AtomicU64,
}

struct Segment {
    base: u64,
    path: PathBuf,
    /// The active segment's read handle. A sealed segment holds none and is
    /// opened by each read: a descriptor per segment would grow with the
    /// log's history (a backlog of small segments ran a process out of
    /// descriptors) while an `open` costs microseconds per read.
    held: Mutex<Option<Arc<File>>>,
    /// Durable length in bytes; frames below it are complete and fsynced.
    len: AtomicU64,
    /// Sparse index: `(frame base offset, byte position)`, ascending.
    index: RwLock<Vec<(u64, u64)>>,
}

struct Append {
    payload: Vec<u8>,
    tag: Option<Arc<[u8]>>,
    count: u32,
    ack: oneshot::Sender<Result<AppendAck, LogError>>,
    _permit: Arc<OwnedSemaphorePermit>,
}

impl Segment {
    /// A handle to read from: the held one while active, else a new one.
    fn reader(&self) -> io::Result<Arc<File>> {
        if let Some(f) = self.held.lock().expect("segment lock").as_ref() {
            return Ok(f.clone());
        }
        File::open(&self.path).map(Arc::new)
    }
}

fn segment_path(dir: &Path, base: u64, ext: &str) -> PathBuf {
    dir.join(format!("{base:020}.{ext}"))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| LogError::io("fsync directory", dir, e))
}

impl Log {
    /// Opens (or creates) the log in `dir`, recovering from any crash.
    pub fn open(dir: impl AsRef<Path>, opts: LogOptions) -> Result<Log, LogError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| LogError::io("create directory", &dir, e))?;
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| LogError::io("open", &lock_path, e))?;
        // A lock just released may still be held for a moment: by a process
        // that is exiting, or by a child forked elsewhere in this process
        // that has not reached its exec (the lock belongs to the open file,
        // which the child shares until then). Wait a little before refusing.
        let mut tries = 0;
        while lock.try_lock().is_err() {
            tries += 1;
            if tries == 40 {
                return Err(LogError::Locked { dir });
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        let meta_path = dir.join("meta.json");
        match fs::read(&meta_path) {
            Ok(bytes) => {
                let meta: Meta = serde_json::from_slice(&bytes).map_err(|e| LogError::BadMeta {
                    dir: dir.clone(),
                    detail: format!("meta.json: {e}"),
                })?;
                if meta.format != FORMAT {
                    return Err(LogError::BadMeta {
                        dir,
                        detail: format!(
                            "format {} is not supported (expected {FORMAT})",
                            meta.format
                        ),
                    });
                }
                if meta.partitions != opts.partitions {
                    return Err(LogError::PartitionMismatch {
                        dir,
                        found: meta.partitions,
                        configured: opts.partitions,
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let meta = Meta {
                    format: FORMAT,
                    partitions: opts.partitions,
                };
                let tmp = dir.join("meta.json.tmp");
                let mut f = File::create(&tmp).map_err(|e| LogError::io("create", &tmp, e))?;
                f.write_all(&serde_json::to_vec(&meta).expect("meta serializes"))
                    .and_then(|()| f.sync_all())
                    .map_err(|e| LogError::io("write", &tmp, e))?;
                fs::rename(&tmp, &meta_path).map_err(|e| LogError::io("rename", &tmp, e))?;
                sync_dir(&dir)?;
            }
            Err(e) => return Err(LogError::io("read", &meta_path, e)),
        }

        let mut partitions = Vec::with_capacity(opts.partitions as usize);
        let mut recoveries = Vec::new();
        for id in 0..opts.partitions {
            let floor = opts.floors.get(id as usize).copied().unwrap_or(0);
            let (part, recovery) = Partition::open(id, dir.join(format!("p{id}")), &opts, floor)?;
            partitions.push(part);
            recoveries.extend(recovery);
        }
        let units =
            u32::try_from(opts.max_pending_bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX >> 3);
        Ok(Log {
            dir,
            partitions,
            pending: Arc::new(Semaphore::new(units as usize)),
            pending_units: units,
            pending_wait: opts.pending_wait,
            recoveries,
            events: opts.events,
            _lock: lock,
        })
    }

    /// The event schema reads conform to, if set.
    pub fn events_schema(&self) -> Option<&arrow::datatypes::SchemaRef> {
        self.events.as_ref()
    }

    /// The partition count of the log in `dir`, if there is one (commands
    /// that open a data directory without the log check theirs against it).
    pub fn partitions_in(dir: impl AsRef<Path>) -> Result<Option<u32>, LogError> {
        let dir = dir.as_ref();
        let path = dir.join("meta.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<Meta>(&bytes)
                .map(|m| Some(m.partitions))
                .map_err(|e| LogError::BadMeta {
                    dir: dir.to_path_buf(),
                    detail: format!("meta.json: {e}"),
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(LogError::io("read", &path, e)),
        }
    }

    /// Partitions restarted at their floor when the log was opened.
    pub fn recoveries(&self) -> &[LogRecovery] {
        &self.recoveries
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn partitions(&self) -> u32 {
        self.partitions.len() as u32
    }

    fn partition(&self, p: u32) -> Result<&Arc<Partition>, LogError> {
        self.partitions
            .get(p as usize)
            .ok_or(LogError::NoSuchPartition {
                partition: p,
                partitions: self.partitions(),
            })
    }

    /// Appends one batch to partition `p`; resolves once it is fsynced.
    pub async fn append(&self, p: u32, batch: &RecordBatch) -> Result<AppendAck, LogError> {
        let mut acks = self.append_all(vec![(p, batch.clone())], None).await?;
        acks.pop().expect("one ack per batch")
    }

    /// Appends several batches (e.g. one request's events, split by
    /// partition). Room in the write queue is taken for all of them or none,
    /// so an overloaded log refuses a request whole; each batch then gets its
    /// own result, resolved once it is fsynced. With a `tag` (at most
    /// `u16::MAX` bytes), every frame carries it ([`Log::tags`] reads it back).
    pub async fn append_all(
        &self,
        batches: Vec<(u32, RecordBatch)>,
        tag: Option<&[u8]>,
    ) -> Result<Vec<Result<AppendAck, LogError>>, LogError> {
        let tag: Option<Arc<[u8]>> = tag.map(Arc::from);
        if tag
            .as_ref()
            .is_some_and(|t| t.len() > usize::from(u16::MAX))
        {
            return Err(LogError::Encode(ArrowError::InvalidArgumentError(
                "a frame tag is longer than 65,535 bytes".into(),
            )));
        }
        let mut encoded = Vec::with_capacity(batches.len());
        let mut bytes = 0usize;
        for (p, batch) in &batches {
            self.partition(*p)?;
            let payload = encode_batch(batch)?;
            bytes += payload.len() + FRAME_HEAD + tag.as_ref().map_or(0, |t| 2 + t.len());
            encoded.push((*p, payload, batch.num_rows() as u32));
        }
        let units = u32::try_from(bytes.div_ceil(1024).max(1))
            .unwrap_or(u32::MAX)
            .min(self.pending_units);
        let permit = match tokio::time::timeout(
            self.pending_wait,
            self.pending.clone().acquire_many_owned(units),
        )
        .await
        {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(LogError::Closed),
            Err(_) => {
                let limit = u64::from(self.pending_units) * 1024;
                let free = self.pending.available_permits() as u64 * 1024;
                return Err(LogError::Overloaded {
                    pending: bytesize::ByteSize::b(limit.saturating_sub(free)),
                    limit: bytesize::ByteSize::b(limit),
                });
            }
        };
        // Every frame of the request holds the permit; the queue's room is given
        // back when the last of them has been written.
        let permit = Arc::new(permit);
        let mut waiting = Vec::with_capacity(encoded.len());
        for (p, payload, count) in encoded {
            let own = permit.clone();
            let (tx, rx) = oneshot::channel();
            let part = self.partition(p)?;
            let sent = part.sender.lock().expect("sender lock").as_ref().map(|s| {
                s.send(Append {
                    payload,
                    tag: tag.clone(),
                    count,
                    ack: tx,
                    _permit: own,
                })
            });
            waiting.push(match sent {
                Some(Ok(())) => Some(rx),
                _ => None,
            });
        }
        let mut acks = Vec::with_capacity(waiting.len());
        for rx in waiting {
            acks.push(match rx {
                Some(rx) => rx.await.unwrap_or(Err(LogError::Closed)),
                None => Err(LogError::Closed),
            });
        }
        Ok(acks)
    }

    /// One past the last durable offset of partition `p`.
    pub fn end_offset(&self, p: u32) -> Result<u64, LogError> {
        Ok(*self.partition(p)?.end.borrow())
    }

    /// The lowest offset of partition `p` still in the log.
    pub fn start_offset(&self, p: u32) -> Result<u64, LogError> {
        let part = self.partition(p)?;
        let segs = part.segments.read().expect("segments lock");
        Ok(segs.first().map_or(0, |s| s.base))
    }

    /// A receiver of partition `p`'s durable end, to wait for new events.
    pub fn subscribe(&self, p: u32) -> Result<watch::Receiver<u64>, LogError> {
        Ok(self.partition(p)?.end.subscribe())
    }

    /// Reads durable events of partition `p` from offset `from`: whole frames
    /// until at least `max_events` events (or the end) are returned. The first
    /// batch starts exactly at `from`; batches are contiguous.
    pub fn read(&self, p: u32, from: u64, max_events: usize) -> Result<Vec<LogBatch>, LogError> {
        let part = self.partition(p)?;
        let end = *part.end.borrow();
        if from > end {
            return Err(LogError::OutOfRange {
                partition: p,
                offset: from,
                end,
            });
        }
        let segments = part.segments.read().expect("segments lock").clone();
        let start = segments.first().map_or(0, |s| s.base);
        if from < start {
            return Err(LogError::Trimmed {
                partition: p,
                offset: from,
                start,
            });
        }
        let mut out = Vec::new();
        if from == end {
            return Ok(out);
        }
        let first_seg = segments.partition_point(|s| s.base <= from) - 1;
        let mut next = from;
        let mut got = 0usize;
        // Where reading is known to work again after a corrupt frame at `pos`.
        let until = |k: usize, pos: u64| -> u64 {
            let index = segments[k].index.read().expect("index lock");
            index
                .iter()
                .find(|&&(_, at)| at > pos)
                .map(|&(o, _)| o)
                .or_else(|| segments.get(k + 1).map(|s| s.base))
                .unwrap_or(end)
        };
        for (k, seg) in segments.iter().enumerate().skip(first_seg) {
            let len = seg.len.load(Ordering::Acquire);
            let mut pos = {
                let index = seg.index.read().expect("index lock");
                let i = index.partition_point(|&(o, _)| o <= next);
                if i == 0 { 0 } else { index[i - 1].1 }
            };
            if pos >= len {
                continue;
            }
            let file = match seg.reader() {
                Ok(f) => f,
                Err(e) => {
                    let start = part
                        .segments
                        .read()
                        .expect("segments lock")
                        .first()
                        .map_or(0, |s| s.base);
                    // Retention deleted it after the segment list was copied:
                    // what was read so far is contiguous, the rest is gone. A
                    // segment still listed but missing is damage, not a trim.
                    if e.kind() != io::ErrorKind::NotFound || start <= seg.base {
                        return Err(LogError::io("open", &seg.path, e));
                    }
                    if !out.is_empty() {
                        break;
                    }
                    return Err(LogError::Trimmed {
                        partition: p,
                        offset: next,
                        start,
                    });
                }
            };
            while pos < len && got < max_events {
                let head = read_head(&file, pos, len).map_err(|detail| LogError::Corrupt {
                    partition: p,
                    segment: seg.path.clone(),
                    position: pos,
                    first_offset: next,
                    until: until(k, pos),
                    detail,
                })?;
                let frame_end = pos + FRAME_PREFIX as u64 + u64::from(head.len);
                if head.base + u64::from(head.count) <= next {
                    pos = frame_end;
                    continue;
                }
                let frame = read_frame(&file, pos, &head).map_err(|detail| LogError::Corrupt {
                    partition: p,
                    segment: seg.path.clone(),
                    position: pos,
                    first_offset: head.base,
                    until: until(k, pos),
                    detail,
                })?;
                if head.base > next {
                    return Err(LogError::Corrupt {
                        partition: p,
                        segment: seg.path.clone(),
                        position: pos,
                        first_offset: next,
                        until: head.base,
                        detail: format!("offsets jump from {next} to {}", head.base),
                    });
                }
                let skip = (next - head.base) as usize;
                let batch = frame.batch.slice(skip, frame.batch.num_rows() - skip);
                got += batch.num_rows();
                next += batch.num_rows() as u64;
                out.push(LogBatch {
                    partition: p,
                    first_offset: head.base + skip as u64,
                    ingest_time_ms: head.ingest_ms,
                    batch,
                });
                pos = frame_end;
            }
            if got >= max_events || next >= end {
                break;
            }
        }
        Ok(out)
    }

    /// The tags of partition `p`'s frames that hold offsets in
    /// `[from, to)` (from the log's start when `from` is below it), each
    /// frame checked against its checksum: what [`Log::append_all`] was given,
    /// for exactly the frames that are durable.
    pub fn tags(&self, p: u32, from: u64, to: u64) -> Result<Vec<FrameTag>, LogError> {
        let part = self.partition(p)?;
        let end = (*part.end.borrow()).min(to);
        let segments = part.segments.read().expect("segments lock").clone();
        let from = from.max(segments.first().map_or(0, |s| s.base));
        let mut out = Vec::new();
        if from >= end {
            return Ok(out);
        }
        let first_seg = segments.partition_point(|s| s.base <= from).max(1) - 1;
        for seg in segments.iter().skip(first_seg) {
            if seg.base >= end {
                break;
            }
            let len = seg.len.load(Ordering::Acquire);
            let mut pos = {
                let index = seg.index.read().expect("index lock");
                let i = index.partition_point(|&(o, _)| o <= from);
                if i == 0 { 0 } else { index[i - 1].1 }
            };
            let file = match seg.reader() {
                Ok(f) => f,
                // Deleted by retention after the list was copied: below the
                // start, where no tag is asked for.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(LogError::io("open", &seg.path, e)),
            };
            while pos < len {
                // A damaged frame's tag is lost with its events (reads of
                // them fail loudly); the tags after it still count.
                let damaged = |pos: u64, why: String| {
                    tracing::warn!(partition = p, segment = %seg.path.display(), position = pos, error = %why, "a damaged log frame's request tag is left out");
                    let index = seg.index.read().expect("index lock");
                    index.iter().find(|&&(_, at)| at > pos).map(|&(_, at)| at)
                };
                let head = match read_head(&file, pos, len) {
                    Ok(h) => h,
                    Err(why) => match damaged(pos, why) {
                        Some(next) => {
                            pos = next;
                            continue;
                        }
                        None => break,
                    },
                };
                let frame_end = pos + FRAME_PREFIX as u64 + u64::from(head.len);
                if head.base >= end {
                    break;
                }
                if head.tagged && head.base + u64::from(head.count) > from {
                    let mut body = vec![0u8; head.len as usize];
                    file.read_exact_at(&mut body, pos + FRAME_PREFIX as u64)
                        .map_err(|e| LogError::io("read", &seg.path, e))?;
                    let crc = crc32c::crc32c(&body);
                    let tag = if crc != head.crc {
                        Err(format!(
                            "checksum mismatch (stored {:08x}, computed {crc:08x})",
                            head.crc
                        ))
                    } else {
                        split_tag(&body, &head).map(|(t, _)| t.unwrap_or_default().to_vec())
                    };
                    match tag {
                        Ok(tag) => out.push(FrameTag {
                            partition: p,
                            base: head.base,
                            count: head.count,
                            ingest_ms: head.ingest_ms,
                            tag,
                        }),
                        Err(why) => {
                            match damaged(pos, why) {
                                Some(next) => pos = next,
                                None => break,
                            }
                            continue;
                        }
                    }
                }
                pos = frame_end;
            }
        }
        Ok(out)
    }

    /// Deletes the sealed segments of partition `p` that lie wholly below
    /// `offset`. Returns the partition's new start offset.
    pub fn delete_below(&self, p: u32, offset: u64) -> Result<u64, LogError> {
        let part = self.partition(p)?;
        let mut segs = part.segments.write().expect("segments lock");
        while segs.len() > 1 && segs[1].base <= offset {
            let seg = segs.remove(0);
            // Readers holding the segment keep reading the unlinked file.
            for path in [seg.path.clone(), segment_path(&part.dir, seg.base, "index")] {
                match fs::remove_file(&path) {
                    Ok(()) => crate::failpoint::trace("unlink", &path),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(LogError::io("delete", &path, e)),
                }
                // A crash here leaves an index without its segment.
                crate::failpoint::hit("log-retention");
            }
            tracing::info!(partition = p, segment = %seg.path.display(), below = offset, "retention deleted a log segment");
        }
        let start = segs.first().map_or(0, |s| s.base);
        drop(segs);
        sync_dir(&part.dir)?;
        Ok(start)
    }

    pub fn stats(&self) -> Vec<PartitionStats> {
        self.partitions
            .iter()
            .map(|part| {
                let segs = part.segments.read().expect("segments lock");
                PartitionStats {
                    partition: part.id,
                    start: segs.first().map_or(0, |s| s.base),
                    end: *part.end.borrow(),
                    segments: segs.len(),
                    bytes: segs.iter().map(|s| s.len.load(Ordering::Acquire)).sum(),
                    fsyncs: part.fsyncs.load(Ordering::Relaxed),
                    frames: part.frames.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Stops the writers after they have written and acknowledged what was queued.
    pub fn shutdown(&self) {
        for part in &self.partitions {
            part.sender.lock().expect("sender lock").take();
        }
        for part in &self.partitions {
            if let Some(h) = part.writer.lock().expect("writer lock").take() {
                let _ = h.join();
            }
        }
        self.pending.close();
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Encodes a batch as a self-describing Arrow IPC stream (schema + batch).
fn encode_batch(batch: &RecordBatch) -> Result<Vec<u8>, LogError> {
    let mut buf = Vec::with_capacity(batch.get_array_memory_size() + 1024);
    let mut w = StreamWriter::try_new(&mut buf, &batch.schema()).map_err(LogError::Encode)?;
    w.write(batch).map_err(LogError::Encode)?;
    w.finish().map_err(LogError::Encode)?;
    drop(w);
    Ok(buf)
}

struct Head {
    len: u32,
    crc: u32,
    /// A version 2 frame: a tag precedes the payload.
    tagged: bool,
    base: u64,
    count: u32,
    ingest_ms: i64,
}

fn parse_head(b: &[u8; FRAME_HEAD]) -> Result<Head, String> {
    let len = u32::from_le_bytes(b[0..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
    if (len as usize) < FRAME_FIXED {
        return Err(format!("frame length {len} is shorter than a frame header"));
    }
    if b[8] != FRAME_VERSION && b[8] != FRAME_VERSION_TAGGED {
        return Err(format!("unknown frame version {}", b[8]));
    }
    Ok(Head {
        len,
        crc,
        tagged: b[8] == FRAME_VERSION_TAGGED,
        base: u64::from_le_bytes(b[9..17].try_into().expect("8 bytes")),
        count: u32::from_le_bytes(b[17..21].try_into().expect("4 bytes")),
        ingest_ms: i64::from_le_bytes(b[21..29].try_into().expect("8 bytes")),
    })
}

fn read_head(file: &File, pos: u64, limit: u64) -> Result<Head, String> {
    if pos + FRAME_HEAD as u64 > limit {
        return Err("frame header runs past the durable end".into());
    }
    let mut b = [0u8; FRAME_HEAD];
    file.read_exact_at(&mut b, pos)
        .map_err(|e| format!("read failed: {e}"))?;
    let head = parse_head(&b)?;
    if pos + FRAME_PREFIX as u64 + u64::from(head.len) > limit {
        return Err(format!(
            "frame of {} bytes runs past the durable end",
            head.len
        ));
    }
    Ok(head)
}

struct Frame {
    batch: RecordBatch,
}

/// Where the payload of a checked frame body starts, and its tag.
fn split_tag<'a>(body: &'a [u8], head: &Head) -> Result<(Option<&'a [u8]>, usize), String> {
    if !head.tagged {
        return Ok((None, FRAME_FIXED));
    }
    let short = || "frame tag runs past the frame".to_string();
    let n = body.get(FRAME_FIXED..FRAME_FIXED + 2).ok_or_else(short)?;
    let n = usize::from(u16::from_le_bytes([n[0], n[1]]));
    let start = FRAME_FIXED + 2;
    let tag = body.get(start..start + n).ok_or_else(short)?;
    Ok((Some(tag), start + n))
}

fn read_frame(file: &File, pos: u64, head: &Head) -> Result<Frame, String> {
    let mut body = vec![0u8; head.len as usize];
    file.read_exact_at(&mut body, pos + FRAME_PREFIX as u64)
        .map_err(|e| format!("read failed: {e}"))?;
    decode_body(&body, head)
}

fn decode_body(body: &[u8], head: &Head) -> Result<Frame, String> {
    let crc = crc32c::crc32c(body);
    if crc != head.crc {
        return Err(format!(
            "checksum mismatch (stored {:08x}, computed {crc:08x})",
            head.crc
        ));
    }
    let (_, payload) = split_tag(body, head)?;
    let mut reader = StreamReader::try_new(Cursor::new(&body[payload..]), None)
        .map_err(|e| format!("bad Arrow IPC payload: {e}"))?;
    let batch = match reader.next() {
        Some(Ok(b)) => b,
        Some(Err(e)) => return Err(format!("bad Arrow IPC payload: {e}")),
        None => return Err("frame holds no batch".into()),
    };
    if batch.num_rows() != head.count as usize {
        return Err(format!(
            "frame header says {} events, payload holds {}",
            head.count,
            batch.num_rows()
        ));
    }
    Ok(Frame { batch })
}

/// What a full scan of a segment found.
struct Scan {
    /// Length of the valid prefix.
    valid_len: u64,
    /// One past the last offset in the valid prefix.
    end: u64,
    index: Vec<(u64, u64)>,
    /// The first bad frame with nothing good after it: position and why.
    bad: Option<(u64, String)>,
    /// Damage in the middle: (position, first offset, first readable offset after, why).
    corrupt: Vec<(u64, u64, u64, String)>,
}

/// Reads a whole segment, checking every frame's CRC and offsets.
/// Scans a segment from its start. A bad frame followed by good ones is
/// damage in the middle, not a torn tail: the scan resumes at the next
/// good frame, and the unreadable range is reported in `corrupt` (and left
/// in the file, so reads of it fail loudly instead of skipping it).
fn scan_segment(path: &Path, base: u64, interval: u64) -> Result<Scan, LogError> {
    let mut scan = scan_from(path, 0, base, interval)?;
    while let Some((pos, why)) = scan.bad.clone() {
        let Some((q, qbase)) = resync(path, pos + 1, scan.end)? else {
            break; // nothing good after it: a torn tail
        };
        let rest = scan_from(path, q, qbase, interval)?;
        scan.corrupt.push((pos, scan.end, qbase, why));
        scan.index.push((qbase, q));
        scan.index.extend(rest.index);
        scan.end = rest.end;
        scan.valid_len = rest.valid_len;
        scan.bad = rest.bad;
    }
    Ok(scan)
}

/// The first position at or after `from` where a whole frame with a valid
/// checksum starts, at an offset at or above `end` (a frame's bytes can
/// hold something frame-like; its checksum and offsets cannot be faked by chance).
fn resync(path: &Path, from: u64, end: u64) -> Result<Option<(u64, u64)>, LogError> {
    let bytes = fs::read(path).map_err(|e| LogError::io("read", path, e))?;
    let mut i = from as usize;
    while i + FRAME_HEAD <= bytes.len() {
        let hb: &[u8; FRAME_HEAD] = bytes[i..i + FRAME_HEAD].try_into().expect("head");
        if let Ok(head) = parse_head(hb) {
            let body_end = i + FRAME_PREFIX + head.len as usize;
            if head.base >= end
                && body_end <= bytes.len()
                && decode_body(&bytes[i + FRAME_PREFIX..body_end], &head).is_ok()
            {
                return Ok(Some((i as u64, head.base)));
            }
        }
        i += 1;
    }
    Ok(None)
}

fn scan_from(path: &Path, start: u64, base: u64, interval: u64) -> Result<Scan, LogError> {
    let mut f = File::open(path).map_err(|e| LogError::io("open", path, e))?;
    let file_len = f
        .metadata()
        .map_err(|e| LogError::io("stat", path, e))?
        .len();
    f.seek(io::SeekFrom::Start(start))
        .map_err(|e| LogError::io("seek", path, e))?;
    let mut r = io::BufReader::with_capacity(1 << 20, &mut f);
    let mut scan = Scan {
        valid_len: start,
        end: base,
        index: Vec::new(),
        bad: None,
        corrupt: Vec::new(),
    };
    let mut last_indexed: Option<u64> = None;
    let mut body = Vec::new();
    while scan.valid_len < file_len {
        let pos = scan.valid_len;
        let fail = |why: String| Some((pos, why));
        if file_len - pos < FRAME_HEAD as u64 {
            scan.bad = fail(format!(
                "{} trailing bytes, too short for a frame",
                file_len - pos
            ));
            break;
        }
        let mut hb = [0u8; FRAME_HEAD];
        r.read_exact(&mut hb)
            .map_err(|e| LogError::io("read", path, e))?;
        let head = match parse_head(&hb) {
            Ok(h) => h,
            Err(why) => {
                scan.bad = fail(why);
                break;
            }
        };
        let frame_len = FRAME_PREFIX as u64 + u64::from(head.len);
        if pos + frame_len > file_len {
            scan.bad = fail(format!(
                "frame of {frame_len} bytes is cut off: only {} bytes remain",
                file_len - pos
            ));
            break;
        }
        body.clear();
        body.extend_from_slice(&hb[FRAME_PREFIX..]);
        body.resize(head.len as usize, 0);
        r.read_exact(&mut body[FRAME_FIXED..])
            .map_err(|e| LogError::io("read", path, e))?;
        if let Err(why) = decode_body(&body, &head) {
            scan.bad = fail(why);
            break;
        }
        if head.base != scan.end {
            scan.bad = fail(format!(
                "frame starts at offset {}, expected {}",
                head.base, scan.end
            ));
            break;
        }
        if last_indexed.is_none_or(|l| pos - l >= interval) {
            scan.index.push((head.base, pos));
            last_indexed = Some(pos);
        }
        scan.end = head.base + u64::from(head.count);
        scan.valid_len = pos + frame_len;
    }
    Ok(scan)
}

fn write_index(dir: &Path, seg: &Segment, end: u64) -> Result<(), LogError> {
    let index = seg.index.read().expect("index lock");
    let mut buf = Vec::with_capacity(32 + index.len() * 16);
    buf.extend_from_slice(INDEX_MAGIC);
    buf.extend_from_slice(&seg.len.load(Ordering::Acquire).to_le_bytes());
    buf.extend_from_slice(&end.to_le_bytes());
    buf.extend_from_slice(&(index.len() as u64).to_le_bytes());
    for (o, p) in index.iter() {
        buf.extend_from_slice(&o.to_le_bytes());
        buf.extend_from_slice(&p.to_le_bytes());
    }
    let crc = crc32c::crc32c(&buf);
    buf.extend_from_slice(&crc.to_le_bytes());
    let path = segment_path(dir, seg.base, "index");
    let tmp = path.with_extension("index.tmp");
    let mut f = File::create(&tmp).map_err(|e| LogError::io("create", &tmp, e))?;
    f.write_all(&buf)
        .and_then(|()| f.sync_data())
        .map_err(|e| LogError::io("write", &tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| LogError::io("rename", &tmp, e))?;
    Ok(())
}

/// A sealed segment's index, if present, intact and matching the segment's length.
fn load_index(path: &Path, seg_len: u64) -> Option<(u64, Vec<(u64, u64)>)> {
    let buf = fs::read(path).ok()?;
    if buf.len() < 32 || &buf[..4] != INDEX_MAGIC {
        return None;
    }
    let (body, crc) = buf.split_at(buf.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    let u = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
    let (len, end, n) = (u(4), u(12), u(20) as usize);
    if len != seg_len || body.len() != 28 + n * 16 {
        return None;
    }
    Some((
        end,
        (0..n).map(|i| (u(28 + i * 16), u(36 + i * 16))).collect(),
    ))
}

impl Partition {
    /// Opens partition `id`, restarting it at `floor` if its log ends below
    /// (see [`LogRecovery`]).
    fn open(
        id: u32,
        dir: PathBuf,
        opts: &LogOptions,
        floor: u64,
    ) -> Result<(Arc<Partition>, Option<LogRecovery>), LogError> {
        fs::create_dir_all(&dir).map_err(|e| LogError::io("create directory", &dir, e))?;
        let mut bases: Vec<u64> = fs::read_dir(&dir)
            .map_err(|e| LogError::io("list", &dir, e))?
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.strip_suffix(".log")?.parse().ok()
            })
            .collect();
        bases.sort_unstable();
        // Retention deletes a segment, then its index: a crash between the two
        // leaves an index below the first segment, which is only litter.
        if let Some(&first) = bases.first() {
            for e in fs::read_dir(&dir).map_err(|e| LogError::io("list", &dir, e))? {
                let Ok(e) = e else { continue };
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(b) = name
                    .strip_suffix(".index")
                    .and_then(|b| b.parse::<u64>().ok())
                    && b < first
                {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        // A new log starts at the floor: a log lost whole gives out no offset
        // the master dataset already holds.
        let lost_whole = bases.is_empty() && floor > 0;
        if bases.is_empty() {
            let path = segment_path(&dir, floor, "log");
            File::create(&path).map_err(|e| LogError::io("create", &path, e))?;
            sync_dir(&dir)?;
            bases.push(floor);
        }
        let mut segments = Vec::with_capacity(bases.len());
        let mut expected = bases[0];
        // A tail cut on open: (offset it was cut at, why).
        let mut cut: Option<(u64, String)> = None;
        for (i, &base) in bases.iter().enumerate() {
            let path = segment_path(&dir, base, "log");
            let last = i + 1 == bases.len();
            if base != expected {
                return Err(LogError::Corrupt {
                    partition: id,
                    segment: path,
                    position: 0,
                    first_offset: expected,
                    until: base,
                    detail: format!(
                        "segment starts at offset {base} but the previous one ends at {expected}: offsets [{expected}, {base}) are missing"
                    ),
                });
            }
            let file = OpenOptions::new()
                .read(true)
                .open(&path)
                .map_err(|e| LogError::io("open", &path, e))?;
            let file_len = file
                .metadata()
                .map_err(|e| LogError::io("stat", &path, e))?
                .len();
            let loaded = if last {
                None
            } else {
                load_index(&segment_path(&dir, base, "index"), file_len)
            };
            let (end, index, len) = match loaded {
                Some((end, index)) => (end, index, file_len),
                None => {
                    let scan = scan_segment(&path, base, opts.index_interval_bytes)?;
                    for (pos, first, until, why) in &scan.corrupt {
                        tracing::error!(
                            partition = id,
                            segment = %path.display(),
                            position = pos,
                            offsets = %format!("{first}..{until}"),
                            why,
                            "corrupt log frame in the middle of a segment: these offsets cannot be read until the segment is restored"
                        );
                    }
                    if let Some((pos, why)) = &scan.bad {
                        if !last {
                            return Err(LogError::Corrupt {
                                partition: id,
                                segment: path,
                                position: *pos,
                                first_offset: scan.end,
                                until: bases[i + 1],
                                detail: why.clone(),
                            });
                        }
                        truncate_tail(id, &path, *pos, file_len, scan.end, why)?;
                        cut = Some((scan.end, format!("byte {pos} of {}: {why}", path.display())));
                    }
                    (scan.end, scan.index, scan.valid_len)
                }
            };
            expected = end;
            segments.push(Arc::new(Segment {
                base,
                path,
                held: Mutex::new(last.then(|| Arc::new(file))),
                len: AtomicU64::new(len),
                index: RwLock::new(index),
            }));
        }
        let mut recovery = lost_whole.then_some(LogRecovery {
            partition: id,
            log_end: 0,
            floor,
            damage: None,
            moved_to: None,
        });
        if let Some(r) = &recovery {
            tracing::warn!(partition = id, "{r}");
        }
        if expected < floor {
            // Every offset below the floor is archived; the log must not hand
            // out [expected, floor) again. A cut below the floor is damage to
            // acknowledged, archived events — not a torn, unacknowledged write.
            let log_end = expected;
            let damage = cut
                .filter(|&(at, _)| at < floor)
                .map(|(at, why)| format!("frames from offset {at} unreadable at {why}"));
            drop(segments);
            let moved_to = move_segments_aside(&dir)?;
            let path = segment_path(&dir, floor, "log");
            File::create(&path).map_err(|e| LogError::io("create", &path, e))?;
            sync_dir(&dir)?;
            let file = File::open(&path).map_err(|e| LogError::io("open", &path, e))?;
            segments = vec![Arc::new(Segment {
                base: floor,
                path,
                held: Mutex::new(Some(Arc::new(file))),
                len: AtomicU64::new(0),
                index: RwLock::new(Vec::new()),
            })];
            expected = floor;
            let r = LogRecovery {
                partition: id,
                log_end,
                floor,
                damage,
                moved_to,
            };
            tracing::warn!(partition = id, "{r}");
            recovery = Some(r);
        }
        let active = segments.last().expect("at least one segment").clone();
        let (end_tx, _) = watch::channel(expected);
        let part = Arc::new(Partition {
            id,
            dir,
            segments: RwLock::new(segments),
            end: end_tx,
            sender: Mutex::new(None),
            writer: Mutex::new(None),
            fsyncs: AtomicU64::new(0),
            frames: AtomicU64::new(0),
        });
        let file = OpenOptions::new()
            .write(true)
            .open(&active.path)
            .map_err(|e| LogError::io("open for writing", &active.path, e))?;
        let pos = active.len.load(Ordering::Acquire);
        let last_indexed = active
            .index
            .read()
            .expect("index lock")
            .last()
            .map(|&(_, p)| p);
        let mut writer = Writer {
            part: part.clone(),
            file,
            active,
            next: expected,
            pos,
            last_indexed,
            segment_bytes: opts.segment_bytes,
            interval: opts.index_interval_bytes,
            clock: opts.clock.clone(),
            last_ms: i64::MIN,
        };
        let (tx, rx) = mpsc::channel::<Append>();
        let handle = std::thread::Builder::new()
            .name(format!("log-writer-p{id}"))
            .spawn(move || writer.run(rx))
            .map_err(|e| LogError::io("start writer thread for", &part.dir, e))?;
        *part.sender.lock().expect("sender lock") = Some(tx);
        *part.writer.lock().expect("writer lock") = Some(handle);
        Ok((part, recovery))
    }
}

/// Moves a partition's segment and index files into a `superseded-<ms>`
/// folder beside them (kept for an operator, never read again); returns it,
/// or `None` if there was nothing to move.
fn move_segments_aside(dir: &Path) -> Result<Option<PathBuf>, LogError> {
    let files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| LogError::io("list", dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|x| x == "log" || x == "index" || x == "tmp")
        })
        .collect();
    if files.is_empty() {
        return Ok(None);
    }
    let aside = dir.join(format!("superseded-{}", now_ms()));
    fs::create_dir_all(&aside).map_err(|e| LogError::io("create directory", &aside, e))?;
    for f in files {
        let to = aside.join(f.file_name().expect("a file name"));
        fs::rename(&f, &to).map_err(|e| LogError::io("move aside", &f, e))?;
    }
    sync_dir(&aside)?;
    sync_dir(dir)?;
    Ok(Some(aside))
}

/// Cuts a torn tail off the active segment, keeping the cut bytes aside.
fn truncate_tail(
    partition: u32,
    path: &Path,
    pos: u64,
    file_len: u64,
    end: u64,
    why: &str,
) -> Result<(), LogError> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| LogError::io("open", path, e))?;
    let mut tail = Vec::with_capacity((file_len - pos) as usize);
    f.seek(SeekFrom::Start(pos))
        .and_then(|_| f.read_to_end(&mut tail))
        .map_err(|e| LogError::io("read", path, e))?;
    if tail.iter().any(|&b| b != 0) {
        let aside = path.with_extension(format!("log.truncated-{}", now_ms()));
        fs::write(&aside, &tail).map_err(|e| LogError::io("write", &aside, e))?;
        tracing::warn!(
            partition,
            segment = %path.display(),
            position = pos,
            bytes = tail.len(),
            next_offset = end,
            kept_in = %aside.display(),
            "log tail after the last complete frame was cut off ({why}); it was never acknowledged"
        );
    }
    f.set_len(pos)
        .and_then(|()| f.sync_all())
        .map_err(|e| LogError::io("truncate", path, e))?;
    Ok(())
}

/// The single writer of one partition.
struct Writer {
    part: Arc<Partition>,
    file: File,
    active: Arc<Segment>,
    next: u64,
    pos: u64,
    last_indexed: Option<u64>,
    segment_bytes: u64,
    interval: u64,
    clock: SharedClock,
    /// The latest ingest time stamped: times never go backwards within a
    /// partition, even if the wall clock does.
    last_ms: i64,
}

impl Writer {
    fn run(&mut self, rx: mpsc::Receiver<Append>) {
        let mut group: Vec<Append> = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        while let Ok(first) = rx.recv() {
            group.push(first);
            let mut bytes = group[0].payload.len();
            while bytes < MAX_GROUP_BYTES {
                match rx.try_recv() {
                    Ok(a) => {
                        bytes += a.payload.len();
                        group.push(a);
                    }
                    Err(_) => break,
                }
            }
            let result = self.commit(&group, &mut buf);
            match result {
                Ok(firsts) => {
                    for (a, first) in group.drain(..).zip(firsts) {
                        let _ = a.ack.send(Ok(AppendAck {
                            partition: self.part.id,
                            first,
                            count: u64::from(a.count),
                        }));
                    }
                }
                Err(e) => {
                    tracing::error!(partition = self.part.id, error = %e, "log append failed");
                    for a in group.drain(..) {
                        let _ = a.ack.send(Err(e.duplicate()));
                    }
                }
            }
        }
    }

    /// Writes a group of frames and fsyncs; returns each frame's first offset.
    fn commit(&mut self, group: &[Append], buf: &mut Vec<u8>) -> Result<Vec<u64>, LogError> {
        if self.pos >= self.segment_bytes {
            self.roll()?;
        }
        let ingest_ms = self.clock.unix_ms().max(self.last_ms);
        self.last_ms = ingest_ms;
        buf.clear();
        let mut firsts = Vec::with_capacity(group.len());
        let mut frames = Vec::with_capacity(group.len());
        let mut next = self.next;
        for a in group {
            let at = self.pos + buf.len() as u64;
            let tag_len = a.tag.as_ref().map_or(0, |t| 2 + t.len());
            let body_len = FRAME_FIXED + tag_len + a.payload.len();
            buf.extend_from_slice(&(body_len as u32).to_le_bytes());
            buf.extend_from_slice(&[0; 4]);
            let body_start = buf.len();
            buf.push(if a.tag.is_some() {
                FRAME_VERSION_TAGGED
            } else {
                FRAME_VERSION
            });
            buf.extend_from_slice(&next.to_le_bytes());
            buf.extend_from_slice(&a.count.to_le_bytes());
            buf.extend_from_slice(&ingest_ms.to_le_bytes());
            if let Some(t) = &a.tag {
                buf.extend_from_slice(&(t.len() as u16).to_le_bytes());
                buf.extend_from_slice(t);
            }
            buf.extend_from_slice(&a.payload);
            let crc = crc32c::crc32c(&buf[body_start..]);
            buf[body_start - 4..body_start].copy_from_slice(&crc.to_le_bytes());
            firsts.push(next);
            frames.push((next, at));
            next += u64::from(a.count);
        }
        let written = self
            .file
            .write_all_at(buf, self.pos)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Leave no partial frame behind: the next group starts clean.
            let _ = self.file.set_len(self.pos);
            return Err(LogError::io("append to", &self.active.path, e));
        }
        self.part.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.part
            .frames
            .fetch_add(group.len() as u64, Ordering::Relaxed);
        {
            let mut index = self.active.index.write().expect("index lock");
            for (offset, at) in frames {
                if self.last_indexed.is_none_or(|l| at - l >= self.interval) {
                    index.push((offset, at));
                    self.last_indexed = Some(at);
                }
            }
        }
        self.pos += buf.len() as u64;
        self.next = next;
        self.active.len.store(self.pos, Ordering::Release);
        self.part.end.send_replace(next);
        Ok(firsts)
    }

    /// Seals the active segment (writing its index) and starts a new one.
    fn roll(&mut self) -> Result<(), LogError> {
        write_index(&self.part.dir, &self.active, self.next)?;
        let path = segment_path(&self.part.dir, self.next, "log");
        // Not `create_new`: a roll that failed after creating the file (out of
        // file descriptors, say) left it behind, empty, and every later roll
        // would fail on it. An empty file of this name is that one; a
        // non-empty one is not ours to overwrite.
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| LogError::io("create", &path, e))?;
        let len = file
            .metadata()
            .map_err(|e| LogError::io("stat", &path, e))?
            .len();
        if len != 0 {
            return Err(LogError::io(
                "create",
                &path,
                io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("a {len}-byte file is already there"),
                ),
            ));
        }
        sync_dir(&self.part.dir)?;
        let read = File::open(&path).map_err(|e| LogError::io("open", &path, e))?;
        let seg = Arc::new(Segment {
            base: self.next,
            path,
            held: Mutex::new(Some(Arc::new(read))),
            len: AtomicU64::new(0),
            index: RwLock::new(Vec::new()),
        });
        self.part
            .segments
            .write()
            .expect("segments lock")
            .push(seg.clone());
        self.file = file;
        // Sealed: readers open it when they need it (see `Segment::held`).
        self.active.held.lock().expect("segment lock").take();
        self.active = seg;
        self.pos = 0;
        self.last_indexed = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_descriptors_is_its_own_error_not_damage() {
        // Ingest answers it with 503 and a `health` problem, not 500.
        for errno in [23, 24] {
            let e = LogError::io(
                "create",
                Path::new("p0/x.log"),
                io::Error::from_raw_os_error(errno),
            );
            assert!(
                matches!(&e, LogError::OutOfFiles { detail } if detail.contains("p0/x.log")),
                "errno {errno} must read as out of descriptors, got {e:?}"
            );
            assert!(matches!(e.duplicate(), LogError::OutOfFiles { .. }));
        }
    }
}
