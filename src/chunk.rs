//! The handoff, in one file: the product's argument that an answer counts
//! every event once.
//!
//! ```text
//!  partition p:  0 ─────────────── H[p] ───────────── R[p] ──▶ stream end
//!                │ batch view (master │ realtime chunks,     │
//!                │ dataset's chunks)  │ contiguous from H[p] │
//!                └── Coverage H ──────┴── ChunkRange … ──────┘
//! ```
//!
//! - A [`ChunkRange`] is positions `[start, end)` of one partition and the
//!   events they hold; it is the unit the speed layer keeps states by and
//!   the archiver commits as one master-dataset file.
//! - A [`Coverage`] is, per partition, one past the last position a side
//!   holds: the master dataset's and a batch run's H, the speed layer's
//!   start, an incremental run's `from`. A partition it has not seen is at 0.
//! - The rules that make the two sides meet without a gap or an overlap are
//!   pure functions here: [`next_commit`] (a master-dataset commit extends H
//!   exactly), [`drop_committed`] (the archiver forgets what H holds),
//!   [`align`] (the realtime side starts at H) and [`check_contiguous`] (an
//!   answer's chunks run from H to R without a hole). Their laws are
//!   property tests below.
//! - [`PARTITION_COLUMN`] and [`OFFSET_COLUMN`] name where an event's
//!   position is kept in the master dataset and in a view's input.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// The master dataset's column with an event's partition.
pub const PARTITION_COLUMN: &str = "_partition";
/// The master dataset's column with an event's position in its partition.
pub const OFFSET_COLUMN: &str = "_offset";

/// Positions `[start, end)` of one partition and the events they hold: the
/// unit the speed layer keeps realtime states by and the archiver commits as
/// one master-dataset file.
///
/// Invariant (checked by [`ChunkRange::new`]): `start ≤ end` and
/// `events ≤ end − start`, with equality on a dense source (the embedded
/// log, Kinesis ordinals). A partition's committed chunks are contiguous
/// from 0, so its coverage is one number: the end of the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkRange {
    partition: u32,
    start: u64,
    end: u64,
    events: u64,
}

impl ChunkRange {
    /// A range; `None` if it breaks the invariant.
    pub fn new(partition: u32, start: u64, end: u64, events: u64) -> Option<ChunkRange> {
        (start <= end && events <= end - start).then_some(ChunkRange {
            partition,
            start,
            end,
            events,
        })
    }

    /// A range of a dense source: every position holds one event.
    pub fn dense(partition: u32, start: u64, end: u64) -> ChunkRange {
        assert!(
            start <= end,
            "a chunk range [{start}, {end}) must not be reversed"
        );
        ChunkRange {
            partition,
            start,
            end,
            events: end - start,
        }
    }

    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The first position of the range.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// One past the last position of the range.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// How many events the range holds (`end − start` on a dense source).
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Whether the range holds no position.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn contains(&self, position: u64) -> bool {
        (self.start..self.end).contains(&position)
    }

    /// Whether `next` starts where this one ends (contiguity).
    pub fn precedes(&self, next: &ChunkRange) -> bool {
        self.partition == next.partition && self.end == next.start
    }
}

impl std::fmt::Display for ChunkRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "partition {} [{}, {}) ({} events)",
            self.partition, self.start, self.end, self.events
        )
    }
}

/// Per partition, one past the last position a side holds (H of the master
/// dataset or of a batch run, R of the realtime side, where a speed layer
/// starts). A partition beyond the ones listed is at 0: nothing of it is
/// held yet. Serialized as the plain list of ends.
#[derive(Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Coverage(Vec<u64>);

/// As the plain list of ends (`[4, 0, 9]`), in logs and messages alike.
impl std::fmt::Debug for Coverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.0).finish()
    }
}

impl Coverage {
    /// Nothing held, of any partition.
    pub fn empty() -> Coverage {
        Coverage(Vec::new())
    }

    /// Coverage from per-partition ends (partition `p` at `ends[p]`).
    pub fn from_ends(ends: Vec<u64>) -> Coverage {
        Coverage(ends)
    }

    /// Partitions `0..n` at 0.
    pub fn zeros(n: u32) -> Coverage {
        Coverage(vec![0; n as usize])
    }

    /// Where partition `p` is covered up to; 0 for a partition not seen yet.
    pub fn get(&self, p: u32) -> u64 {
        self.0.get(p as usize).copied().unwrap_or(0)
    }

    /// Where partition `p` is covered up to, if it is listed (a status
    /// shows an unlisted partition as unknown rather than 0).
    pub fn listed(&self, p: u32) -> Option<u64> {
        self.0.get(p as usize).copied()
    }

    /// Sets partition `p`'s end, listing the partitions before it at 0.
    pub fn set(&mut self, p: u32, end: u64) {
        self.widen(p + 1);
        self.0[p as usize] = end;
    }

    /// Raises partition `p`'s end to `end` if it is lower.
    pub fn raise(&mut self, p: u32, end: u64) {
        if self.get(p) < end {
            self.set(p, end);
        }
    }

    /// Lists partitions `0..n` (new ones at 0); never forgets one.
    pub fn widen(&mut self, n: u32) {
        if self.0.len() < n as usize {
            self.0.resize(n as usize, 0);
        }
    }

    /// This coverage listing at least partitions `0..n`.
    pub fn widened(mut self, n: u32) -> Coverage {
        self.widen(n);
        self
    }

    /// How many partitions are listed (those beyond are at 0).
    pub fn partitions(&self) -> u32 {
        self.0.len() as u32
    }

    /// `(partition, end)` for every listed partition.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (u32, u64)> + '_ {
        self.0.iter().enumerate().map(|(p, e)| (p as u32, *e))
    }

    /// The ends, partition by partition.
    pub fn ends(&self) -> &[u64] {
        &self.0
    }

    /// The ends, owned.
    pub fn into_ends(self) -> Vec<u64> {
        self.0
    }

    /// Whether every partition is covered at least as far as in `other`.
    pub fn covers(&self, other: &Coverage) -> bool {
        other.iter().all(|(p, e)| self.get(p) >= e)
    }

    /// Positions held in all, summed over partitions.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

impl std::fmt::Display for Coverage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Compares with plain per-partition ends, listed alike.
impl PartialEq<Vec<u64>> for Coverage {
    fn eq(&self, other: &Vec<u64>) -> bool {
        &self.0 == other
    }
}

impl FromIterator<u64> for Coverage {
    fn from_iter<I: IntoIterator<Item = u64>>(iter: I) -> Coverage {
        Coverage(iter.into_iter().collect())
    }
}

/// Something that covers a [`ChunkRange`] (a realtime chunk's states, a
/// queued chunk).
pub trait Ranged {
    fn range(&self) -> ChunkRange;
}

impl Ranged for ChunkRange {
    fn range(&self) -> ChunkRange {
        *self
    }
}

impl<T: Ranged> Ranged for std::sync::Arc<T> {
    fn range(&self) -> ChunkRange {
        (**self).range()
    }
}

/// What committing `range` does to a partition covered up to `committed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// The range extends the coverage exactly: commit it.
    Extends,
    /// The coverage already holds all of it (committed by another driver,
    /// or queued twice): skip it.
    Held,
    /// It would leave a hole or overlap part of what is held: refuse it.
    Gap,
}

/// The commit rule: a partition's chunks are contiguous from 0, so a chunk
/// is committed only where the coverage ends.
pub fn next_commit(committed: u64, range: &ChunkRange) -> Commit {
    if committed >= range.end {
        Commit::Held
    } else if committed == range.start {
        Commit::Extends
    } else {
        Commit::Gap
    }
}

/// Drops the queued chunks (one queue per partition) that `h` already holds.
pub fn drop_committed<T: Ranged>(pending: &mut [VecDeque<T>], h: &Coverage) {
    for (p, q) in pending.iter_mut().enumerate() {
        let covered = h.get(p as u32);
        while q.front().is_some_and(|c| c.range().end <= covered) {
            q.pop_front();
        }
    }
}

/// Aligns one partition's realtime chunks (ordered by start) on the batch
/// side's coverage `h`: the chunks it holds are left out, and the rest is
/// kept only if it starts exactly at `h`. A chunk across `h` (this node cut
/// the stream elsewhere than the node whose chunks the run archived) cannot
/// be split: none is kept then, and the partition is exact up to `h` alone.
/// Returns the chunks and the end R they reach.
pub fn align<T: Ranged>(chunks: Vec<T>, end: u64, h: u64) -> (Vec<T>, u64) {
    let above: Vec<T> = chunks.into_iter().filter(|c| c.range().end > h).collect();
    match above.first() {
        Some(c) if c.range().start != h => (Vec::new(), h),
        _ => (above, end.max(h)),
    }
}

/// The handoff invariant for partition `p`: its realtime chunks start at
/// `h`, are contiguous, and end at the realtime mark `end`. A violation
/// means an answer would count events twice or miss them.
pub fn check_contiguous<T: Ranged>(p: u32, h: u64, chunks: &[T], end: u64) -> Result<(), String> {
    let mut at = h;
    for c in chunks {
        let r = c.range();
        if r.start != at || r.partition != p {
            return Err(format!(
                "partition {p}: realtime chunk {r} does not start where the previous side ends, at {at}"
            ));
        }
        at = r.end;
    }
    if at != end {
        return Err(format!(
            "partition {p}: chunks end at {at}, the realtime high-water mark is {end}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_range_keeps_its_invariant() {
        assert!(ChunkRange::new(0, 5, 3, 0).is_none(), "reversed");
        assert!(
            ChunkRange::new(0, 0, 3, 4).is_none(),
            "more events than positions"
        );
        let gappy = ChunkRange::new(1, 10, 20, 7).expect("a range with gaps");
        assert!(gappy.contains(10) && !gappy.contains(20));
        assert!(gappy.precedes(&ChunkRange::dense(1, 20, 25)));
        assert!(!gappy.precedes(&ChunkRange::dense(2, 20, 25)));
    }

    #[test]
    fn an_unseen_partition_is_covered_up_to_zero() {
        let mut h = Coverage::from_ends(vec![4]);
        assert_eq!(h.get(3), 0, "a partition beyond the listed ones is at 0");
        h.set(2, 9);
        assert_eq!(h.ends(), &[4, 0, 9], "setting p lists the ones before at 0");
        assert_eq!(
            serde_json::to_string(&h).unwrap(),
            "[4,0,9]",
            "serialized as the plain list"
        );
        assert_eq!(
            format!("{h:?} {h}"),
            "[4, 0, 9] [4, 0, 9]",
            "messages and logs show H as the list they always showed, not the type's name"
        );
    }

    /// Cuts `[0, n)` into contiguous ranges at the given points.
    fn cut(p: u32, n: u64, mut points: Vec<u64>) -> Vec<ChunkRange> {
        points.retain(|x| *x > 0 && *x < n);
        points.sort_unstable();
        points.dedup();
        let mut out = Vec::new();
        let mut at = 0;
        for x in points.into_iter().chain([n]) {
            out.push(ChunkRange::dense(p, at, x));
            at = x;
        }
        out
    }

    proptest! {
        /// Committing a partition's chunks in any order, each by the rule,
        /// ends with coverage at the last end, each chunk committed once.
        #[test]
        fn commits_by_the_rule_extend_coverage_exactly(
            n in 1u64..200, points in prop::collection::vec(0u64..200, 0..8),
            order in prop::collection::vec(0usize..100, 0..30),
        ) {
            let chunks = cut(0, n, points);
            let mut committed = 0u64;
            let mut held = 0u64;
            // Offer chunks in an arbitrary order, repeated, then in order.
            let offers = order.iter().map(|i| chunks[i % chunks.len()]).chain(chunks.iter().copied());
            for c in offers {
                match next_commit(committed, &c) {
                    Commit::Extends => { committed = c.end(); held += c.events(); }
                    Commit::Held => prop_assert!(c.end() <= committed),
                    Commit::Gap => prop_assert!(c.start() != committed && c.end() > committed),
                }
            }
            prop_assert_eq!(committed, n);
            prop_assert_eq!(held, n, "every position committed exactly once");
        }

        /// After aligning on any H, the chunks pass the contiguity check
        /// and cover exactly `[H, R)` — or nothing, with R = H.
        #[test]
        fn aligned_chunks_are_contiguous_from_h(
            n in 1u64..200, points in prop::collection::vec(0u64..200, 0..8), h in 0u64..250,
        ) {
            let chunks = cut(3, n, points);
            let (kept, end) = align(chunks, n, h);
            prop_assert!(check_contiguous(3, h, &kept, end).is_ok());
            prop_assert!(end >= h);
            let events: u64 = kept.iter().map(|c| c.events()).sum();
            prop_assert_eq!(events, end - h, "the realtime side counts [H, R) once");
        }

        /// Dropping committed chunks keeps exactly those ending above H.
        #[test]
        fn drop_committed_keeps_what_h_lacks(
            n in 1u64..200, points in prop::collection::vec(0u64..200, 0..8), h in 0u64..250,
        ) {
            let chunks = cut(0, n, points);
            let mut q = vec![chunks.iter().copied().collect::<VecDeque<_>>()];
            drop_committed(&mut q, &Coverage::from_ends(vec![h]));
            let want: Vec<ChunkRange> = chunks.into_iter().filter(|c| c.end() > h).collect();
            prop_assert_eq!(q[0].iter().copied().collect::<Vec<_>>(), want);
        }
    }
}
