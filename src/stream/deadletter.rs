//! The dead-letter store: every line ingest refused, with why, kept on disk.
//!
//! Files are NDJSON under `data/deadletter/`, one record per refused line:
//!
//! ```text
//! {"received":"2026-11-27T15:00:00.123Z","line":7,"field":"price",
//!  "reason":"expected int64, got string \"abc\"","raw":"{\"zipcode\":…}"}
//! ```
//!
//! `raw` holds the line as sent; a line that is not UTF-8 is kept byte for
//! byte in `raw_base64` instead. Records are fsynced before the request that
//! carried them is answered, like accepted events.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use serde::{Deserialize, Serialize};

/// A new file is started past this size (or a quarter of the store's limit).
const ROLL_BYTES: u64 = 64 << 20;

/// (free bytes for unprivileged writers, total bytes) of the disk holding `dir`.
fn disk_space(dir: &Path) -> Option<(u64, u64)> {
    let st = rustix::fs::statvfs(dir).ok()?;
    Some((
        st.f_bavail.saturating_mul(st.f_frsize),
        st.f_blocks.saturating_mul(st.f_frsize),
    ))
}

fn free_bytes(dir: &Path) -> Option<u64> {
    disk_space(dir).map(|(free, _)| free)
}

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("dead-letter store I/O failed: could not {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the disk holding the dead-letter store is full: {detail}")]
    NoSpace { detail: String },
    #[error("unreadable dead-letter record in {} line {line}: {detail}", path.display())]
    BadRecord {
        path: PathBuf,
        line: usize,
        detail: String,
    },
}

impl DeadLetterError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> DeadLetterError {
        if source.raw_os_error() == Some(28) {
            return DeadLetterError::NoSpace {
                detail: format!("could not {op} {}: {source}", path.display()),
            };
        }
        DeadLetterError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// One refused line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetter {
    /// When the line was received (RFC 3339, UTC).
    pub received: String,
    /// 1-based line number within its request body.
    pub line: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub reason: String,
    /// The line as sent, when it is UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<String>,
    /// The line as sent, base64, when it is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_base64: Option<String>,
    /// Where the record sits in an external stream (Kafka partition and
    /// offset); absent for a line of a `POST /v1/events` body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl DeadLetter {
    pub fn new(
        received: &str,
        line: u64,
        field: Option<String>,
        reason: String,
        raw: &[u8],
    ) -> Self {
        let (raw, raw_base64) = match std::str::from_utf8(raw) {
            Ok(s) => (Some(s.to_string()), None),
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(raw)),
            ),
        };
        DeadLetter {
            received: received.to_string(),
            line,
            field,
            reason,
            raw,
            raw_base64,
            partition: None,
            offset: None,
        }
    }

    /// The record at `offset` of stream partition `partition`.
    pub fn at(mut self, partition: u32, offset: u64) -> Self {
        self.partition = Some(partition);
        self.offset = Some(offset);
        self
    }

    /// Appends the record as one NDJSON line.
    pub fn encode_into(&self, buf: &mut Vec<u8>) {
        serde_json::to_writer(&mut *buf, self).expect("dead letters serialize");
        buf.push(b'\n');
    }

    /// The raw bytes of the refused line.
    pub fn raw_bytes(&self) -> Vec<u8> {
        match (&self.raw, &self.raw_base64) {
            (Some(s), _) => s.as_bytes().to_vec(),
            (None, Some(b)) => base64::engine::general_purpose::STANDARD
                .decode(b)
                .unwrap_or_default(),
            (None, None) => Vec::new(),
        }
    }
}

struct Current {
    file: File,
    path: PathBuf,
    len: u64,
}

/// How big the store may grow.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetterLimits {
    /// The store's files together, at most; beyond it the oldest files are
    /// removed (a flood of bad input keeps the newest evidence).
    pub max_bytes: u64,
    /// Free space the store never takes on its disk (the log's room): a
    /// write that would leave less fails with `NoSpace`, and the request
    /// that carried the lines gets 507, not half-kept.
    pub reserve_free: u64,
}

impl DeadLetterLimits {
    /// `max_bytes`, and a reserve of 64 MiB or 5% of the disk holding `dir`,
    /// whichever is less.
    pub fn for_disk(dir: &Path, max_bytes: u64) -> DeadLetterLimits {
        let total = disk_space(dir).map_or(u64::MAX, |(_, total)| total);
        DeadLetterLimits {
            max_bytes,
            reserve_free: (64 << 20).min(total / 20),
        }
    }
}

impl Default for DeadLetterLimits {
    fn default() -> Self {
        DeadLetterLimits {
            max_bytes: 1 << 30,
            reserve_free: 64 << 20,
        }
    }
}

/// What the limits did since start.
#[derive(Debug, Default)]
pub struct DeadLetterCounters {
    /// Records written.
    pub written: AtomicU64,
    /// Refused lines not kept: over their request's share of the store.
    pub dropped: AtomicU64,
    /// Old files removed to stay under `max_bytes`, and their bytes.
    pub removed_files: AtomicU64,
    pub removed_bytes: AtomicU64,
}

/// The dead-letter store of one data directory.
pub struct DeadLetters {
    dir: PathBuf,
    limits: DeadLetterLimits,
    /// The open file, and the bytes of every file in the store.
    current: Mutex<(Option<Current>, u64)>,
    pub counters: DeadLetterCounters,
    /// Where limits reached are reported.
    health: Option<std::sync::Arc<crate::health::Health>>,
    /// The latest refusals, newest last, for the dashboard.
    recent: Mutex<std::collections::VecDeque<RecentReject>>,
    /// Per stream and partition, the position below which its refused
    /// records are in the store (`marks.json`): a re-read after a restart
    /// does not keep them twice.
    marks: Mutex<StreamMarks>,
}

/// `marks.json`: stream (as it describes itself) → partition → position.
type StreamMarks = std::collections::BTreeMap<String, std::collections::BTreeMap<u32, u64>>;

const MARKS: &str = "marks.json";

/// A refused line, as the dashboard lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RecentReject {
    pub at_ms: i64,
    /// "line 7: field `price`: expected int64, got string \"abc\"".
    pub message: String,
}

/// Refusals remembered for the dashboard.
const RECENT: usize = 20;

impl DeadLetters {
    pub fn open(dir: impl AsRef<Path>) -> Result<DeadLetters, DeadLetterError> {
        Self::open_with(dir, DeadLetterLimits::default())
    }

    pub fn open_with(
        dir: impl AsRef<Path>,
        limits: DeadLetterLimits,
    ) -> Result<DeadLetters, DeadLetterError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| DeadLetterError::io("create directory", &dir, e))?;
        let total = Self::files(&dir)?
            .iter()
            .filter_map(|p| fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        let marks_path = dir.join(MARKS);
        let marks = match fs::read(&marks_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| DeadLetterError::BadRecord {
                path: marks_path.clone(),
                line: 1,
                detail: e.to_string(),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => StreamMarks::new(),
            Err(e) => return Err(DeadLetterError::io("read", &marks_path, e)),
        };
        Ok(DeadLetters {
            dir,
            limits,
            current: Mutex::new((None, total)),
            counters: DeadLetterCounters::default(),
            health: None,
            recent: Mutex::new(std::collections::VecDeque::with_capacity(RECENT)),
            marks: Mutex::new(marks),
        })
    }

    /// Reports limits reached to `health` (`deadletter` warnings).
    pub fn with_health(mut self, health: std::sync::Arc<crate::health::Health>) -> DeadLetters {
        self.health = Some(health);
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn limits(&self) -> DeadLetterLimits {
        self.limits
    }

    /// Records written by this process.
    pub fn written(&self) -> u64 {
        self.counters.written.load(Ordering::Relaxed)
    }

    /// Bytes in the store now.
    pub fn bytes(&self) -> u64 {
        self.current.lock().expect("dead-letter lock").1
    }

    /// Remembers a refusal for [`DeadLetters::recent`] (the last few).
    pub fn remember(&self, message: String) {
        let mut recent = self.recent.lock().expect("dead-letter lock");
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(RecentReject {
            at_ms: chrono::Utc::now().timestamp_millis(),
            message,
        });
    }

    /// The latest refusals, newest first.
    pub fn recent(&self) -> Vec<RecentReject> {
        let recent = self.recent.lock().expect("dead-letter lock");
        recent.iter().rev().cloned().collect()
    }

    /// Counts refused lines that were not kept, and says so in `health`.
    pub fn dropped(&self, lines: u64, why: &str) {
        if lines == 0 {
            return;
        }
        let total = self.counters.dropped.fetch_add(lines, Ordering::Relaxed) + lines;
        if let Some(h) = &self.health {
            h.warn(
                "deadletter/dropped",
                &format!("{total} refused lines not kept since start (latest: {lines}, {why})"),
            );
        }
    }

    /// The position of partition `p` of `stream` below which its refused
    /// records are in the store already (0: none recorded).
    pub fn stream_mark(&self, stream: &str, p: u32) -> u64 {
        self.marks
            .lock()
            .expect("dead-letter marks")
            .get(stream)
            .and_then(|m| m.get(&p))
            .copied()
            .unwrap_or(0)
    }

    /// Writes refused records of partition `p` of `stream`, read up to
    /// position `end`, and then records `end` as its mark (durably: a
    /// restart re-reads them without keeping them again). Blocking.
    pub fn write_stream(
        &self,
        stream: &str,
        p: u32,
        records: &[DeadLetter],
        end: u64,
    ) -> Result<(), DeadLetterError> {
        self.write(records)?;
        let mut marks = self.marks.lock().expect("dead-letter marks");
        let mark = marks
            .entry(stream.to_string())
            .or_default()
            .entry(p)
            .or_insert(0);
        if *mark >= end {
            return Ok(());
        }
        *mark = end;
        let body = serde_json::to_vec(&*marks).expect("marks serialize");
        let path = self.dir.join(MARKS);
        let tmp = self.dir.join("marks.json.tmp");
        let written = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(&self.dir)?.sync_all()
        })();
        written.map_err(|e| DeadLetterError::io("write", &path, e))
    }

    /// Appends records and fsyncs them. Blocking: call off the async runtime.
    pub fn write(&self, records: &[DeadLetter]) -> Result<(), DeadLetterError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for r in records {
            r.encode_into(&mut buf);
        }
        for r in records.iter().rev().take(RECENT).rev() {
            self.remember(match &r.field {
                Some(f) => format!("line {}: field `{f}`: {}", r.line, r.reason),
                None => format!("line {}: {}", r.line, r.reason),
            });
        }
        self.append(&buf, records.len() as u64)?;
        self.sync()
    }

    /// Appends encoded records (whole lines) without fsync; old files are
    /// removed first if the store would pass `max_bytes`. Blocking.
    pub fn append(&self, buf: &[u8], records: u64) -> Result<(), DeadLetterError> {
        if buf.is_empty() {
            return Ok(());
        }
        let need = buf.len() as u64;
        let free = free_bytes(&self.dir).unwrap_or(u64::MAX);
        if free < need.saturating_add(self.limits.reserve_free) {
            return Err(DeadLetterError::NoSpace {
                detail: format!(
                    "{} free on the disk of {}, and dead letters leave {} of it to the log",
                    bytesize::ByteSize::b(free),
                    self.dir.display(),
                    bytesize::ByteSize::b(self.limits.reserve_free)
                ),
            });
        }
        let mut guard = self.current.lock().expect("dead-letter lock");
        let (cur, total) = &mut *guard;
        let roll = self.limits.max_bytes.clamp(1, ROLL_BYTES * 4) / 4;
        if cur.as_ref().is_none_or(|c| c.len >= roll) {
            if let Some(c) = cur.take() {
                c.file
                    .sync_data()
                    .map_err(|e| DeadLetterError::io("fsync", &c.path, e))?;
            }
            let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
            let path = self
                .dir
                .join(format!("deadletter-{stamp}-{}.ndjson", std::process::id()));
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| DeadLetterError::io("create", &path, e))?;
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| DeadLetterError::io("fsync directory", &self.dir, e))?;
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            *cur = Some(Current { file, path, len });
        }
        if *total + need > self.limits.max_bytes {
            let current = cur.as_ref().map(|c| c.path.clone());
            *total -= self.evict(*total + need - self.limits.max_bytes, current.as_deref())?;
        }
        let c = cur.as_mut().expect("current file");
        if let Err(e) = c.file.write_all(buf) {
            // A partial record would poison the file for readers: cut it off.
            let _ = c.file.set_len(c.len);
            return Err(DeadLetterError::io("append to", &c.path, e));
        }
        c.len += need;
        *total += need;
        self.counters.written.fetch_add(records, Ordering::Relaxed);
        Ok(())
    }

    /// Makes every appended record durable.
    pub fn sync(&self) -> Result<(), DeadLetterError> {
        let guard = self.current.lock().expect("dead-letter lock");
        if let Some(c) = &guard.0 {
            c.file
                .sync_data()
                .map_err(|e| DeadLetterError::io("fsync", &c.path, e))?;
        }
        Ok(())
    }

    /// Removes the oldest files (never `keep`) until `want` bytes are
    /// freed or none is left; returns the bytes freed.
    fn evict(&self, want: u64, keep: Option<&Path>) -> Result<u64, DeadLetterError> {
        let (mut freed, mut files) = (0, 0);
        for path in Self::files(&self.dir)? {
            if freed >= want {
                break;
            }
            if Some(path.as_path()) == keep {
                continue;
            }
            let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            fs::remove_file(&path).map_err(|e| DeadLetterError::io("remove", &path, e))?;
            freed += len;
            files += 1;
        }
        let c = &self.counters;
        let all_files = c.removed_files.fetch_add(files, Ordering::Relaxed) + files;
        let all_bytes = c.removed_bytes.fetch_add(freed, Ordering::Relaxed) + freed;
        tracing::warn!(
            files,
            bytes = freed,
            "dead-letter store at its limit: oldest files removed"
        );
        if let Some(h) = &self.health {
            h.warn(
                "deadletter/removed",
                &format!(
                    "the dead-letter store reached its limit of {}: {all_files} oldest files ({}) removed since start",
                    bytesize::ByteSize::b(self.limits.max_bytes),
                    bytesize::ByteSize::b(all_bytes)
                ),
            );
        }
        Ok(freed)
    }

    /// The store's files, oldest first (names start with their time).
    fn files(dir: &Path) -> Result<Vec<PathBuf>, DeadLetterError> {
        let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "ndjson"))
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(DeadLetterError::io("list", dir, e)),
        };
        files.sort();
        Ok(files)
    }

    /// Every record in the store, oldest file first.
    pub fn read_all(dir: impl AsRef<Path>) -> Result<Vec<DeadLetter>, DeadLetterError> {
        let mut out = Vec::new();
        for path in Self::files(dir.as_ref())? {
            let f = File::open(&path).map_err(|e| DeadLetterError::io("open", &path, e))?;
            for (i, line) in io::BufReader::new(f).lines().enumerate() {
                let line = line.map_err(|e| DeadLetterError::io("read", &path, e))?;
                let rec = serde_json::from_str(&line).map_err(|e| DeadLetterError::BadRecord {
                    path: path.clone(),
                    line: i + 1,
                    detail: e.to_string(),
                })?;
                out.push(rec);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_including_non_utf8_lines() {
        let dir = tempfile::tempdir().unwrap();
        let store = DeadLetters::open(dir.path()).unwrap();
        let recs = vec![
            DeadLetter::new(
                "t",
                1,
                Some("price".into()),
                "bad".into(),
                b"{\"price\":\"x\"}",
            ),
            DeadLetter::new("t", 2, None, "not utf-8".into(), b"\xff\xfe\x00"),
        ];
        store.write(&recs).unwrap();
        let back = DeadLetters::read_all(dir.path()).unwrap();
        assert_eq!(back, recs);
        assert_eq!(
            back[1].raw_bytes(),
            b"\xff\xfe\x00",
            "raw bytes kept exactly"
        );
        assert_eq!(store.written(), 2);
    }

    #[test]
    fn the_store_removes_its_oldest_files_to_stay_under_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let limits = DeadLetterLimits {
            max_bytes: 4000,
            reserve_free: 0,
        };
        let health = std::sync::Arc::new(crate::health::Health::default());
        let store = DeadLetters::open_with(dir.path(), limits)
            .unwrap()
            .with_health(health.clone());
        for i in 0..100 {
            let rec = DeadLetter::new("t", i, None, "bad".into(), &[b'x'; 100]);
            store.write(&[rec]).unwrap();
        }
        let on_disk: u64 = DeadLetters::files(dir.path())
            .unwrap()
            .iter()
            .map(|p| fs::metadata(p).unwrap().len())
            .sum();
        assert_eq!(on_disk, store.bytes(), "the store counts what is on disk");
        assert!(on_disk <= 4000, "{on_disk} bytes kept, limit 4000");
        let kept = DeadLetters::read_all(dir.path()).unwrap();
        assert_eq!(kept.last().unwrap().line, 99, "the newest records are kept");
        assert!(store.counters.removed_files.load(Ordering::Relaxed) > 0);
        assert!(
            health.report_all().warnings[0]
                .error
                .contains("reached its limit"),
            "{:?}",
            health.report_all()
        );
        // Reopened, it knows its size.
        let again = DeadLetters::open_with(dir.path(), limits).unwrap();
        assert_eq!(again.bytes(), on_disk);
    }
}
