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

/// A new file is started past this size.
const ROLL_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("dead-letter store I/O failed: could not {op} {}: {source}", path.display())]
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
        }
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

/// The dead-letter store of one data directory.
pub struct DeadLetters {
    dir: PathBuf,
    current: Mutex<Option<Current>>,
    written: AtomicU64,
}

impl DeadLetters {
    pub fn open(dir: impl AsRef<Path>) -> Result<DeadLetters, DeadLetterError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| DeadLetterError::io("create directory", &dir, e))?;
        Ok(DeadLetters {
            dir,
            current: Mutex::new(None),
            written: AtomicU64::new(0),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records written by this process.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Appends records and fsyncs them. Blocking: call off the async runtime.
    pub fn write(&self, records: &[DeadLetter]) -> Result<(), DeadLetterError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for r in records {
            serde_json::to_writer(&mut buf, r).expect("dead letters serialize");
            buf.push(b'\n');
        }
        let mut cur = self.current.lock().expect("dead-letter lock");
        if cur.as_ref().is_none_or(|c| c.len >= ROLL_BYTES) {
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
        let c = cur.as_mut().expect("current file");
        if let Err(e) = c.file.write_all(&buf).and_then(|()| c.file.sync_data()) {
            // A partial record would poison the file for readers: cut it off.
            let _ = c.file.set_len(c.len);
            return Err(DeadLetterError::io("append to", &c.path, e));
        }
        c.len += buf.len() as u64;
        self.written
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Every record in the store, oldest file first.
    pub fn read_all(dir: impl AsRef<Path>) -> Result<Vec<DeadLetter>, DeadLetterError> {
        let dir = dir.as_ref();
        let mut files: Vec<PathBuf> = match fs::read_dir(dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "ndjson"))
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(DeadLetterError::io("list", dir, e)),
        };
        files.sort();
        let mut out = Vec::new();
        for path in files {
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
}
