//! The speed layer decides which events are duplicates (`[schema] key`),
//! as it reads them, once: views count what it keeps, and the archiver
//! writes its decisions in the master dataset's `_duplicate` column, so
//! the batch layer leaves out the same events.
//!
//! ```text
//!  read p [next, …) ──▶ KeyIndex p: decide each record ──▶ duplicates left out of the states
//!                                       │ offsets of duplicates
//!                                       ▼
//!                                  Duplicates ──▶ archiver: `_duplicate` of the chunk's file
//!  published H[p] ──▶ KeyIndex::settle(H): the tail below H to the runs on disk
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use crate::keys::placement::{Placement, Stray};
use crate::keys::{Duplicates, History, KeyError, KeyHasher, KeyIndex, KeyRule};
use crate::stream::source::SourceBatch;

/// Offsets of the master dataset read at once while the index catches up.
const FEED_WINDOW: u64 = 1 << 20;

/// How many keys ahead a decision fetches the filter's slot.
const PREFETCH: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    #[error("{0}")]
    Index(#[from] KeyError),
    #[error(
        "event keys of partition {partition}: cannot read [{from}, {to}) of the master dataset"
    )]
    History {
        partition: u32,
        from: u64,
        to: u64,
        detail: String,
    },
    #[error("event keys: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

/// The key index of every partition, and where the decisions go.
pub struct Dedup {
    rule: KeyRule,
    field: String,
    /// The key field's name and type, and the secret's name: an index of
    /// another key, or hashed under another secret, is rebuilt.
    key: String,
    hasher: KeyHasher,
    dir: PathBuf,
    indexes: Vec<Option<KeyIndex>>,
    pub duplicates: Arc<Duplicates>,
    history: Arc<dyn History>,
    /// Where sampled keys were seen: a check that the stream is keyed by
    /// the event key.
    placement: Placement,
    /// Strays already reported to health.
    strays_reported: u64,
}

impl Dedup {
    /// Indexes kept under `dir` (local: a cache of the master dataset);
    /// `key` names what they index (the field, its type, the dataset).
    pub fn new(
        rule: KeyRule,
        field: &str,
        key: String,
        dir: PathBuf,
        history: Arc<dyn History>,
    ) -> Result<Dedup, KeyError> {
        let hasher = KeyHasher::load_or_create(&dir)?;
        Ok(Dedup {
            rule,
            field: field.to_string(),
            key: format!("{key}:{}", hasher.id()),
            hasher,
            dir,
            indexes: Vec::new(),
            duplicates: Arc::new(Duplicates::default()),
            history,
            placement: Placement::new(rule.within.as_millis().min(i64::MAX as u128) as i64),
            strays_reported: 0,
        })
    }

    /// Throws partition `p`'s index away (a run that cannot be read, say):
    /// the next [`Dedup::align`] rebuilds it from the master dataset.
    fn discard(&mut self, p: u32, e: &KeyError) {
        tracing::warn!(partition = p, error = %crate::error::chain(e), "the key index is rebuilt from the master dataset");
        if let Some(slot) = self.indexes.get_mut(p as usize) {
            *slot = None;
        }
        let _ = std::fs::remove_dir_all(self.dir.join(format!("p{p:04}")));
    }

    fn index(&mut self, p: u32) -> Result<&mut KeyIndex, KeyError> {
        let i = p as usize;
        if self.indexes.len() <= i {
            self.indexes.resize_with(i + 1, || None);
        }
        if self.indexes[i].is_none() {
            // The keys it reads back are where they were: a stray after a
            // restart is found as one before it.
            let placement = &mut self.placement;
            self.indexes[i] = Some(KeyIndex::open_noting(
                &self.dir,
                p,
                &self.rule,
                &self.key,
                &mut |h, clock| {
                    placement.note(p, h, None, clock);
                },
            )?);
        }
        Ok(self.indexes[i].as_mut().expect("opened"))
    }

    /// Brings partition `p`'s index to `next`, where the speed layer reads
    /// on, with the published coverage at `hp`: a stretch read again is
    /// forgotten, a stretch the index lacks is read from the master dataset
    /// (which has what lies below `hp`), and what lies below `hp` goes to
    /// the runs. False when the index cannot stand at `next` (it lacks
    /// events above `hp`): the speed layer reads on from `hp` then.
    pub async fn align(&mut self, p: u32, hp: u64, next: u64) -> Result<bool, DedupError> {
        let r = self.align_index(p, hp, next).await;
        if let Err(DedupError::Index(e)) = &r {
            self.discard(p, e);
        }
        r
    }

    async fn align_index(&mut self, p: u32, hp: u64, next: u64) -> Result<bool, DedupError> {
        self.duplicates.forget_below(p, hp);
        let index = self.index(p)?;
        if index.edge() > hp.min(next) {
            // The coverage went back (an older table restored): start over.
            tracing::warn!(
                partition = p,
                edge = index.edge(),
                h = hp,
                "the key index is ahead of the master dataset; rebuilding it"
            );
            let (dir, rule) = (self.dir.clone(), self.rule);
            let pdir = dir.join(format!("p{p:04}"));
            std::fs::remove_dir_all(&pdir).map_err(|source| KeyError::Io { path: pdir, source })?;
            self.indexes[p as usize] = Some(KeyIndex::open(&dir, p, &rule, &self.key)?);
        }
        let index = self.index(p)?;
        if index.next() > next {
            index.rewind(next)?;
        }
        let from = index.next();
        if from < next {
            // Only the master dataset has these (below the published
            // coverage): read in windows, each settled to the runs, so a
            // new node's memory does not grow with the history.
            let to = next.min(hp);
            let mut at = from;
            let mut fed = 0u64;
            while at < to {
                let until = to.min(at.saturating_add(FEED_WINDOW));
                let rows = self
                    .history
                    .keys(p, at, until, &self.hasher)
                    .await
                    .map_err(|detail| DedupError::History {
                        partition: p,
                        from: at,
                        to: until,
                        detail,
                    })?;
                self.index(p)?;
                let (Some(Some(index)), placement) =
                    (self.indexes.get_mut(p as usize), &mut self.placement)
                else {
                    unreachable!("opened above")
                };
                for r in rows.into_iter().filter(|r| (at..until).contains(&r.offset)) {
                    if let Some(h) = r.hash {
                        placement.note(p, h, Some(r.offset), r.time_ms);
                        index.decide(r.offset, h, r.time_ms)?;
                        fed += 1;
                    }
                }
                index.advance_to(until);
                index.settle(until)?;
                at = until;
            }
            if to > from {
                tracing::info!(
                    partition = p,
                    from,
                    to,
                    keys = fed,
                    "the key index caught up from the master dataset"
                );
            }
            self.index(p)?.advance_to(to);
        }
        let index = self.index(p)?;
        index.settle(hp)?;
        Ok(index.next() == next)
    }

    /// Decides every record of `take` (partition `p`, read in order from
    /// where the index is): the records that are not duplicates.
    pub fn decide(&mut self, p: u32, take: &[SourceBatch]) -> Result<Vec<SourceBatch>, DedupError> {
        let r = self.decide_all(p, take);
        if let Err(DedupError::Index(e)) = &r {
            self.discard(p, e);
        }
        r
    }

    fn decide_all(&mut self, p: u32, take: &[SourceBatch]) -> Result<Vec<SourceBatch>, DedupError> {
        let (field, hasher) = (self.rule.field, self.hasher);
        let mut out = Vec::with_capacity(take.len());
        let mut dups = Vec::new();
        self.index(p)?;
        let (Some(Some(index)), placement) =
            (self.indexes.get_mut(p as usize), &mut self.placement)
        else {
            unreachable!("opened above")
        };
        for b in take {
            let hashes = hasher.column(b.batch.column(field))?;
            let mut keep = Vec::with_capacity(b.rows());
            for h in hashes.iter().take(PREFETCH).flatten() {
                index.prefetch(*h);
            }
            for r in 0..hashes.len() {
                if let Some(Some(ahead)) = hashes.get(r + PREFETCH) {
                    index.prefetch(*ahead);
                }
                let dup = match hashes[r] {
                    Some(h) => {
                        let (at, time) = (b.position(r), b.time_ms(r));
                        placement.note(p, h, Some(at), time);
                        index.decide(at, h, time)?
                    }
                    None => false,
                };
                if dup {
                    dups.push(b.position(r));
                }
                keep.push(!dup);
            }
            out.push(b.keep(&keep)?);
        }
        self.duplicates.record(p, &dups);
        Ok(out)
    }

    /// The records of `take` that are not duplicates, as decided before (a
    /// view built meanwhile reads a chunk again).
    pub fn decided(&self, p: u32, take: &[SourceBatch]) -> Result<Vec<SourceBatch>, DedupError> {
        let (Some(first), Some(end)) = (
            take.iter().find(|b| b.rows() > 0).map(|b| b.position(0)),
            take.iter().rev().find_map(SourceBatch::last_record_end),
        ) else {
            return Ok(take.to_vec());
        };
        without(take, &self.duplicates.within(p, first, end))
    }

    /// Records `take` (partition `p`, read in order from where the index
    /// is) in the index without using its decisions: a committed chunk read
    /// again keeps the decisions the master dataset recorded for it
    /// (`known`, in order), made maybe under another rule.
    pub fn feed(&mut self, p: u32, take: &[SourceBatch], known: &[u64]) -> Result<(), DedupError> {
        let r = self.feed_all(p, take);
        if let Err(DedupError::Index(e)) = &r {
            self.discard(p, e);
        }
        self.duplicates.record_known(p, known);
        r
    }

    fn feed_all(&mut self, p: u32, take: &[SourceBatch]) -> Result<(), DedupError> {
        let (field, hasher) = (self.rule.field, self.hasher);
        self.index(p)?;
        let (Some(Some(index)), placement) =
            (self.indexes.get_mut(p as usize), &mut self.placement)
        else {
            unreachable!("opened above")
        };
        for b in take {
            for (r, h) in hasher
                .column(b.batch.column(field))?
                .into_iter()
                .enumerate()
            {
                if let Some(h) = h {
                    let (at, time) = (b.position(r), b.time_ms(r));
                    placement.note(p, h, Some(at), time);
                    index.decide(at, h, time)?;
                }
            }
        }
        Ok(())
    }

    /// When strays were found since the last call: how many in all, and
    /// the latest (for health: the stream is not keyed by the event key).
    pub fn new_strays(&mut self) -> Option<(u64, Stray)> {
        let n = self.placement.total();
        if n == self.strays_reported {
            return None;
        }
        self.strays_reported = n;
        self.placement.latest().map(|s| (n, s.clone()))
    }

    /// The key field's name.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// Each open partition's clock (ms): the greatest stream time decided.
    pub fn clocks(&self) -> Vec<(u32, i64)> {
        self.indexes
            .iter()
            .enumerate()
            .filter_map(|(p, i)| Some((p as u32, i.as_ref()?.clock())))
            .collect()
    }

    /// Memory of every partition's tail (what the realtime window holds).
    pub fn window_bytes(&self) -> u64 {
        self.indexes
            .iter()
            .flatten()
            .map(KeyIndex::window_bytes)
            .sum()
    }

    /// Per partition: duplicates found, and the index's sizes.
    pub fn stats(&self) -> Vec<crate::keys::KeyStats> {
        let found = self.duplicates.found();
        let n = found.len().max(self.indexes.len());
        (0..n)
            .map(|p| crate::keys::KeyStats {
                duplicates: found.get(p).copied().unwrap_or(0),
                strays: self.placement.found(p as u32),
                index: self
                    .indexes
                    .get(p)
                    .and_then(Option::as_ref)
                    .map(KeyIndex::size)
                    .unwrap_or_default(),
            })
            .collect()
    }
}

/// The records of `take` but those at `dups` (sorted).
pub fn without(take: &[SourceBatch], dups: &[u64]) -> Result<Vec<SourceBatch>, DedupError> {
    take.iter()
        .map(|b| {
            if dups.is_empty() {
                return Ok(b.clone());
            }
            let keep: Vec<bool> = (0..b.rows())
                .map(|r| dups.binary_search(&b.position(r)).is_err())
                .collect();
            Ok(b.keep(&keep)?)
        })
        .collect()
}
