//! Incremental batch runs: which kind of run each view gets, and what an
//! incremental one reads.
//!
//! ```text
//!  published run r (coverage H_r)          master dataset now (coverage H)
//!  states_r ───────────────────┐           files with end ≤ H_r[p]: in states_r already
//!                              ├─ merge ─▶ rollup ─▶ states of run r+1 (coverage H)
//!  states(files with start ≥ H_r[p]) ──┘
//! ```
//!
//! States merge exactly (the merge laws the property tests prove), so the
//! published states merged with the states of the files added since are the
//! states of all the files; rolling up again at the later time is rolling up
//! once ([`crate::view::rollup`]). A view is recomputed from scratch instead
//! when it has no usable published states (new, changed — the fingerprint —
//! or another engine version), when the policy says so (`[batch] full_every`
//! runs or `full_every_time`: the paper's guarantee that a batch view is
//! regularly a function of the whole master dataset alone, whatever went
//! before), on `lambdaflow rebuild`, and whenever the files cannot be split
//! cleanly at the published coverage (a rewritten table, a file lambdaflow
//! did not name). Reading the published states is checked by their
//! checksums; a corrupt or missing file falls back to a full recompute too
//! (decided where they are read, [`super::BatchLayer`]).

use std::time::Duration;

use super::{Manifest, ViewEntry};
use crate::chunk::Coverage;
use crate::master::{DataFile, MasterSnapshot};
use crate::runs::{Lineage, RunKind};
use crate::view::View;

/// How a batch run computes its views: when a view must be recomputed from
/// scratch (`[batch] full_every`, `full_every_time`), and how a large one
/// is aggregated and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// After this many incremental runs in a row (0: never by count).
    pub full_every: u32,
    /// When the chain's full recompute started this long ago.
    pub full_every_time: Duration,
    /// `[batch] shuffle_above_groups`: a full recompute of a view whose
    /// last run had this many groups or more splits the events among the
    /// cores by group key.
    pub shuffle_above_groups: u64,
    /// `[batch] tsv_max_rows`: no `rows.tsv` for a view with more groups.
    pub tsv_max_rows: u64,
}

impl Policy {
    /// The policy a `[batch]` section asks for.
    pub fn of(c: &crate::config::BatchConfig) -> Policy {
        Policy {
            full_every: c.full_every,
            full_every_time: c.full_every_time,
            shuffle_above_groups: c.shuffle_above_groups,
            tsv_max_rows: c.tsv_max_rows,
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy::of(&crate::config::BatchConfig::default())
    }
}

/// What a view's next run does.
#[derive(Debug, Clone)]
pub enum Plan {
    Full {
        reason: String,
    },
    Incremental {
        /// The published entry whose states are the base.
        base: Box<ViewEntry>,
        /// The base's coverage.
        from: Coverage,
        /// The files added since: exactly the events `[from[p], h[p])`.
        files: Vec<DataFile>,
    },
}

/// Everything a run decides its views' plans from.
pub struct Decide<'a> {
    pub prev: Option<&'a Manifest>,
    pub snapshot: &'a MasterSnapshot,
    pub policy: Policy,
    pub engine_version: &'a str,
    pub now_ms: i64,
    /// `lambdaflow rebuild`: every view from scratch.
    pub rebuild: bool,
}

impl Decide<'_> {
    /// The plan for `view`.
    pub fn plan(&self, view: &View) -> Plan {
        let full = |reason: String| Plan::Full { reason };
        if self.rebuild {
            return full("a rebuild was asked for".into());
        }
        let Some(prev) = self.prev else {
            return full("no run is published yet".into());
        };
        let Some(base) = prev.views.get(view.name()) else {
            return full("the view is new".into());
        };
        if base.fingerprint != view.fingerprint() {
            return full(format!(
                "the view changed (fingerprint {} → {})",
                base.fingerprint,
                view.fingerprint()
            ));
        }
        if prev.engine != self.engine_version {
            return full(format!(
                "the engine changed ({} → {})",
                prev.engine, self.engine_version
            ));
        }
        let p = self.policy;
        if p.full_every > 0 && base.lineage.since_full >= p.full_every {
            return full(format!(
                "{} incremental runs since the last full one (full_every = {})",
                base.lineage.since_full, p.full_every
            ));
        }
        let age = self.now_ms.saturating_sub(base.lineage.full_started_ms);
        if age >= p.full_every_time.as_millis() as i64 {
            return full(if base.lineage.full_started_ms == 0 {
                "the published states do not say when they were last computed in full".into()
            } else {
                format!(
                    "the last full recompute started {} ago (full_every_time = {})",
                    humantime::format_duration(Duration::from_secs((age / 1000) as u64)),
                    humantime::format_duration(p.full_every_time)
                )
            });
        }
        match added_since(prev, self.snapshot) {
            Ok(files) => Plan::Incremental {
                base: Box::new(base.clone()),
                from: prev.h.clone(),
                files,
            },
            Err(why) => full(why),
        }
    }
}

/// The files of `snapshot` holding exactly the events a published run does
/// not: per partition, chunks at or after its coverage. Refuses (with why)
/// when the table cannot be split there: a file straddling the coverage or
/// not named by lambdaflow (rewritten by a tool), coverage that went back,
/// or older files that do not hold exactly the run's events.
pub fn added_since(prev: &Manifest, snapshot: &MasterSnapshot) -> Result<Vec<DataFile>, String> {
    let h = &snapshot.coverage.h;
    let at = |p: u32| prev.h.get(p);
    for (p, now) in h.iter() {
        if now < at(p) {
            return Err(format!(
                "partition {p}'s coverage went back from {} to {now}",
                at(p)
            ));
        }
    }
    let mut added = Vec::new();
    let mut old_events = 0u64;
    for f in &snapshot.files {
        if f.chunks.is_empty() {
            return Err(format!(
                "the master dataset holds {}, a file whose events are not known",
                f.location
            ));
        }
        // A file another engine rewrote holds any number of ranges: it is
        // old or added as a whole, or the table cannot be split.
        let newer = f.chunks.iter().all(|c| {
            let cut = at(c.partition());
            c.start() >= cut && c.end() > c.start()
        });
        let older = f.chunks.iter().all(|c| c.end() <= at(c.partition()));
        if newer {
            added.push(f.clone());
        } else if older {
            old_events += f
                .records
                .unwrap_or_else(|| f.chunks.iter().map(|c| c.events()).sum());
        } else {
            let c = f
                .chunks
                .iter()
                .find(|c| c.end() > at(c.partition()))
                .unwrap_or(&f.chunks[0]);
            return Err(format!(
                "{} holds events on both sides of the published coverage {} of partition {}",
                f.location,
                at(c.partition()),
                c.partition()
            ));
        }
    }
    if old_events != prev.events {
        return Err(format!(
            "the files below the published coverage hold {old_events} events, the published run read {}",
            prev.events
        ));
    }
    Ok(added)
}

impl Lineage {
    /// A full run's lineage.
    pub fn full(reason: String, run: u64, started_ms: i64, files: u64, events: u64) -> Lineage {
        Lineage {
            kind: RunKind::Full,
            reason: Some(reason),
            base_run: None,
            from: None,
            files,
            events,
            full_run: run,
            full_started_ms: started_ms,
            since_full: 0,
        }
    }

    /// The lineage of an incremental run on `base`.
    pub fn incremental(base: &ViewEntry, from: Coverage, files: u64, events: u64) -> Lineage {
        Lineage {
            kind: RunKind::Incremental,
            reason: None,
            base_run: Some(base.run),
            from: Some(from),
            files,
            events,
            full_run: base.lineage.full_run,
            full_started_ms: base.lineage.full_started_ms,
            since_full: base.lineage.since_full + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::RunInfo;
    use crate::master::TableCoverage;

    fn file(p: u32, s: u64, e: u64) -> DataFile {
        DataFile {
            location: object_store::path::Path::from(format!(
                "master/part-p{p:04}-{s:020}-{e:020}-00000000-w.parquet"
            )),
            size: 1,
            records: Some(e - s),
            chunks: vec![crate::chunk::ChunkRange::new(p, s, e, e - s).unwrap()],
        }
    }

    fn manifest(h: Vec<u64>, events: u64) -> Manifest {
        Manifest {
            info: RunInfo {
                run: 3,
                table_version: 1,
                h: Coverage::from_ends(h),
                events,
                as_of_ms: 0,
                started_ms: 0,
                duration_ms: 0,
                engine: String::new(),
                compute: Default::default(),
                kinds: Default::default(),
                previous: None,
            },
            views: Default::default(),
            definitions: Default::default(),
        }
    }

    fn snapshot(h: Vec<u64>, files: Vec<DataFile>) -> MasterSnapshot {
        MasterSnapshot {
            coverage: TableCoverage {
                version: 2,
                h: Coverage::from_ends(h),
            },
            files,
            foreign: Vec::new(),
            lost: Vec::new(),
        }
    }

    #[test]
    fn the_files_added_since_a_run_are_those_at_or_past_its_coverage() {
        let files = vec![
            file(0, 0, 10),
            file(0, 10, 25),
            file(1, 0, 7),
            file(1, 7, 9),
        ];
        let snap = snapshot(vec![25, 9], files);
        let added = added_since(&manifest(vec![10, 7], 17), &snap).unwrap();
        let names: Vec<String> = added.iter().map(|f| f.location.to_string()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names[0].contains("p0000-00000000000000000010"), "{names:?}");
        assert!(names[1].contains("p0001-00000000000000000007"), "{names:?}");
        // A partition the run did not know starts at 0.
        let snap = snapshot(vec![10, 7], vec![file(0, 0, 10), file(1, 0, 7)]);
        assert_eq!(
            added_since(&manifest(vec![10], 10), &snap).unwrap().len(),
            1
        );
    }

    #[test]
    fn a_table_that_cannot_be_split_at_the_coverage_is_refused_with_why() {
        // A compaction merged chunks across the coverage.
        let snap = snapshot(vec![25], vec![file(0, 0, 25)]);
        let e = added_since(&manifest(vec![10], 10), &snap).unwrap_err();
        assert!(e.contains("both sides"), "{e}");
        // The run's events are not what the older files hold.
        let snap = snapshot(vec![25], vec![file(0, 0, 10), file(0, 10, 25)]);
        let e = added_since(&manifest(vec![10], 12), &snap).unwrap_err();
        assert!(e.contains("hold 10 events"), "{e}");
        let e = added_since(&manifest(vec![30], 30), &snap).unwrap_err();
        assert!(e.contains("went back"), "{e}");
    }
}
