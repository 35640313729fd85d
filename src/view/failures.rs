//! Rows a view fails on: which events each view left out, and why.
//!
//! ```text
//!  speed layer (micro-batch) ─┐  states_excluding()   ┌─▶ data/deadletter/views/<view>.ndjson
//!  batch layer (master files) ┴─ failing rows ───────▶ ├─▶ /v1/status `views_excluded`, health
//!                                 (partition, offset)   └─▶ lambdaflow_view_excluded_events_total
//! ```
//!
//! Both layers find the same rows (the failure is a function of the row), so
//! a row is recorded once per process however often it is recomputed: the
//! batch layer meets every failing row of history again at each run, and the
//! speed layer meets the rows above H again after a restart. The file of a
//! view stops growing at [`MAX_FILE_BYTES`]; rows past it are still counted.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

/// A view's file of failing rows is not written past this size.
pub const MAX_FILE_BYTES: u64 = 16 << 20;
/// Rows remembered per view to record each once (past it, only counted).
const MAX_REMEMBERED: usize = 1 << 20;

/// One failing row of one view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FailedRow {
    pub view: String,
    pub partition: u32,
    pub offset: u64,
    pub error: String,
}

/// What `/v1/status` shows of one view's failing rows.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct ViewExcluded {
    /// Distinct rows left out so far (this process).
    pub events: u64,
    /// The most recently found one.
    pub last: Option<FailedRow>,
    /// Where they are listed.
    pub file: String,
}

#[derive(Debug, Default)]
struct PerView {
    seen: BTreeSet<(u32, u64)>,
    summary: ViewExcluded,
    bytes: u64,
}

/// The registry of every view's failing rows.
#[derive(Debug)]
pub struct ViewFailures {
    dir: PathBuf,
    views: Mutex<BTreeMap<String, PerView>>,
}

impl ViewFailures {
    /// Records go to `dir/<view>.ndjson` (created when the first arrives).
    pub fn new(dir: impl AsRef<Path>) -> ViewFailures {
        ViewFailures {
            dir: dir.as_ref().to_path_buf(),
            views: Mutex::default(),
        }
    }

    /// Records failing rows; returns how many were new. Never fails: a file
    /// that cannot be written is logged, the rows are still counted (they
    /// are a report, not data — the events themselves are in the log and
    /// the master dataset).
    pub fn record(&self, rows: &[FailedRow]) -> usize {
        if rows.is_empty() {
            return 0;
        }
        let mut views = self.views.lock().expect("failures lock");
        let mut new = 0;
        let mut lines: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for r in rows {
            let v = views.entry(r.view.clone()).or_default();
            let key = (r.partition, r.offset);
            let fresh = if v.seen.len() < MAX_REMEMBERED {
                v.seen.insert(key)
            } else {
                !v.seen.contains(&key) // full: counted, possibly again
            };
            if !fresh {
                continue;
            }
            new += 1;
            v.summary.events += 1;
            v.summary.last = Some(r.clone());
            let path = self.path_of(&r.view);
            v.summary.file = path.display().to_string();
            let mut line = serde_json::to_vec(r).expect("rows serialize");
            line.push(b'\n');
            if v.bytes + line.len() as u64 <= MAX_FILE_BYTES {
                v.bytes += line.len() as u64;
                lines.entry(r.view.clone()).or_default().extend(line);
            }
        }
        drop(views);
        for (view, bytes) in lines {
            let path = self.path_of(&view);
            let written = std::fs::create_dir_all(&self.dir).and_then(|()| {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)?;
                f.write_all(&bytes)
            });
            if let Err(e) = written {
                tracing::warn!(view, file = %path.display(), error = %e, "could not list a view's failing rows");
            }
        }
        new
    }

    fn path_of(&self, view: &str) -> PathBuf {
        self.dir.join(format!("{view}.ndjson"))
    }

    /// Every view that left rows out, by name.
    pub fn report(&self) -> BTreeMap<String, ViewExcluded> {
        self.views
            .lock()
            .expect("failures lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.summary.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_is_recorded_once_however_often_it_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let f = ViewFailures::new(dir.path());
        let row = |o| FailedRow {
            view: "v".into(),
            partition: 0,
            offset: o,
            error: "Divide by zero error".into(),
        };
        assert_eq!(f.record(&[row(3), row(9)]), 2);
        assert_eq!(
            f.record(&[row(3), row(9), row(12)]),
            1,
            "a batch run meets rows the speed layer already recorded"
        );
        let r = f.report();
        assert_eq!(r["v"].events, 3);
        assert_eq!(r["v"].last.as_ref().unwrap().offset, 12);
        let text = std::fs::read_to_string(dir.path().join("v.ndjson")).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(text.contains(r#""offset":3"#) && text.contains("Divide by zero"));
    }
}
