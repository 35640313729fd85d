//! Which events each file of the table holds, whoever wrote it.
//!
//! ```text
//!  named chunk files  part-p…-start-end-crc-writer.parquet ─▶ [start, end) of p
//!  other files        their (_partition, _offset) rows, as runs ─┐
//!                                                                ├─▶ a rewrite (a compaction):
//!  [0, H[p]) − named ranges = what rewrites must hold ───────────┘   the ranges it holds
//!                                                                    otherwise: foreign
//! ```
//!
//! Another engine may compact the table (its files replace lambdaflow's
//! chunk files, rows unchanged) or append rows of its own. A file lambdaflow
//! did not name is a *rewrite* when its rows are exactly inside the offsets
//! the named files no longer hold, below the coverage, none twice; any other
//! file is *foreign*: left out of batch runs (so views stay exact) and
//! reported. The rows of an unnamed file are read once (two columns) and
//! kept as runs of consecutive offsets under the root, beside the table.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkRange;

/// The rows of a file as runs of consecutive offsets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRows {
    pub rows: u64,
    /// `(partition, start, end)`: every offset of `[start, end)` once.
    pub runs: Vec<(u32, u64, u64)>,
    /// Rows whose (partition, offset) the file holds more than once.
    pub duplicates: u64,
}

impl FileRows {
    /// From (partition, offset) pairs in any order.
    pub fn of(mut pairs: Vec<(u32, u64)>) -> FileRows {
        let rows = pairs.len() as u64;
        pairs.sort_unstable();
        let before = pairs.len();
        pairs.dedup();
        let duplicates = (before - pairs.len()) as u64;
        let mut runs: Vec<(u32, u64, u64)> = Vec::new();
        for (p, o) in pairs {
            match runs.last_mut() {
                Some((q, _, e)) if *q == p && *e == o => *e = o + 1,
                _ => runs.push((p, o, o + 1)),
            }
        }
        FileRows {
            rows,
            runs,
            duplicates,
        }
    }
}

/// A file of the table, as the classification sees it.
pub struct Candidate {
    /// From its lambdaflow name.
    pub named: Option<(u32, u64, u64)>,
    /// Its rows, for a file without a lambdaflow name (`None`: unreadable).
    pub rows: Option<FileRows>,
    pub records: Option<u64>,
}

/// What each file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// Lambdaflow's events: these ranges.
    Chunks(Vec<ChunkRange>),
    /// Not lambdaflow's (why).
    Foreign(String),
}

/// The classification of a table version's files (in the order given;
/// unnamed files should come oldest first: of two holding the same event,
/// the older keeps it). Also returns the ranges below the coverage no file
/// holds.
pub fn classify(h: &[u64], files: &[Candidate]) -> (Vec<Held>, Vec<ChunkRange>) {
    let parts = h.len();
    let mut held: Vec<Option<Held>> = vec![None; files.len()];
    // Named chunk files first: their ranges, the first of a duplicate wins.
    let mut named: Vec<BTreeMap<u64, u64>> = vec![BTreeMap::new(); parts];
    for (i, f) in files.iter().enumerate() {
        let Some((p, s, e)) = f.named else { continue };
        let why = if p as usize >= parts || e > h[p as usize] {
            Some(format!(
                "its name says partition {p}, offsets {s}..{e}, beyond the table's coverage"
            ))
        } else if overlaps(&named[p as usize], s, e) {
            Some(format!(
                "its name says partition {p}, offsets {s}..{e}, which another file holds"
            ))
        } else {
            None
        };
        held[i] = Some(match why {
            Some(w) => Held::Foreign(w),
            None => {
                named[p as usize].insert(s, e);
                let events = f.records.unwrap_or(e - s).min(e - s);
                Held::Chunks(ChunkRange::new(p, s, e, events).into_iter().collect())
            }
        });
    }
    // What rewrites must hold: [0, H[p]) without the named ranges.
    let uncovered: Vec<Vec<(u64, u64)>> = (0..parts)
        .map(|p| {
            let mut out = Vec::new();
            let mut at = 0;
            for (&s, &e) in &named[p] {
                if s > at {
                    out.push((at, s));
                }
                at = at.max(e);
            }
            if h[p] > at {
                out.push((at, h[p]));
            }
            out
        })
        .collect();
    // Unnamed files: inside the uncovered ranges, none twice.
    let mut taken: Vec<BTreeMap<u64, (u64, usize)>> = vec![BTreeMap::new(); parts];
    for (i, f) in files.iter().enumerate() {
        if f.named.is_some() {
            continue;
        }
        let Some(rows) = &f.rows else {
            held[i] = Some(Held::Foreign(
                "its _partition and _offset columns cannot be read (or it is missing)".into(),
            ));
            continue;
        };
        let why = if rows.duplicates > 0 {
            Some(format!("it holds {} events twice", rows.duplicates))
        } else {
            rows.runs.iter().find_map(|&(p, s, e)| {
                let inside = uncovered
                    .get(p as usize)
                    .is_some_and(|u| u.iter().any(|&(a, b)| a <= s && e <= b));
                let clash = |t: &BTreeMap<u64, (u64, usize)>| {
                    t.range(..e).next_back().is_some_and(|(_, &(end, _))| end > s)
                };
                if !inside {
                    Some(format!(
                        "it holds partition {p}'s offsets {s}..{e}, which lambdaflow's chunk files hold or the coverage does not reach"
                    ))
                } else if clash(&taken[p as usize]) {
                    Some(format!(
                        "it holds partition {p}'s offsets {s}..{e}, which an older rewrite holds"
                    ))
                } else {
                    None
                }
            })
        };
        match why {
            Some(w) => held[i] = Some(Held::Foreign(w)),
            None => {
                for &(p, s, e) in &rows.runs {
                    taken[p as usize].insert(s, (e, i));
                }
                held[i] = Some(Held::Chunks(Vec::new()));
            }
        }
    }
    // Each uncovered range split among the rewrites holding its events: a
    // file's range runs from its first event to the next file's.
    let mut lost = Vec::new();
    for (p, ranges) in uncovered.iter().enumerate() {
        for &(a, b) in ranges {
            let runs: Vec<(u64, u64, usize)> = taken[p]
                .range(a..b)
                .map(|(&s, &(e, i))| (s, e, i))
                .collect();
            if runs.is_empty() {
                lost.extend(ChunkRange::new(p as u32, a, b, 0));
                continue;
            }
            // Groups of consecutive runs of one file.
            let mut groups: Vec<(u64, u64, usize)> = Vec::new(); // (first start, events, file)
            for (s, e, i) in runs {
                match groups.last_mut() {
                    Some((_, n, j)) if *j == i => *n += e - s,
                    _ => groups.push((s, e - s, i)),
                }
            }
            for k in 0..groups.len() {
                let start = if k == 0 { a } else { groups[k].0 };
                let end = groups.get(k + 1).map_or(b, |g| g.0);
                let (_, events, i) = groups[k];
                if let Some(Held::Chunks(c)) = &mut held[i] {
                    c.extend(ChunkRange::new(p as u32, start, end, events));
                }
            }
        }
    }
    let held = held
        .into_iter()
        .map(|h| h.unwrap_or_else(|| Held::Foreign("unclassified".into())))
        .collect();
    (held, lost)
}

fn overlaps(m: &BTreeMap<u64, u64>, s: u64, e: u64) -> bool {
    m.range(..e).next_back().is_some_and(|(_, &end)| end > s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(p: u32, s: u64, e: u64) -> Candidate {
        Candidate {
            named: Some((p, s, e)),
            rows: None,
            records: Some(e - s),
        }
    }

    fn unnamed(pairs: Vec<(u32, u64)>) -> Candidate {
        let rows = FileRows::of(pairs);
        Candidate {
            named: None,
            records: Some(rows.rows),
            rows: Some(rows),
        }
    }

    #[test]
    fn a_compaction_holds_the_ranges_of_the_files_it_replaced() {
        // [0,10) and [10,20) of p0, [0,5) of p1 compacted into one file; [20,30) named.
        let mut pairs: Vec<(u32, u64)> = (0..20).map(|o| (0, o)).collect();
        pairs.extend((0..5).map(|o| (1, o)));
        let (held, lost) = classify(&[30, 5], &[unnamed(pairs), named(0, 20, 30)]);
        assert!(lost.is_empty(), "{lost:?}");
        assert_eq!(
            held[0],
            Held::Chunks(vec![
                ChunkRange::new(0, 0, 20, 20).unwrap(),
                ChunkRange::new(1, 0, 5, 5).unwrap()
            ])
        );
        assert_eq!(
            held[1],
            Held::Chunks(vec![ChunkRange::new(0, 20, 30, 10).unwrap()])
        );
    }

    #[test]
    fn rows_appended_by_another_engine_are_foreign() {
        // Duplicates of named rows, rows past the coverage, rows twice in a file.
        let dup = unnamed((0..5).map(|o| (0, o)).collect());
        let past = unnamed(vec![(0, 10)]);
        let twice = unnamed(vec![(0, 3), (0, 3)]);
        let (held, lost) = classify(&[10], &[named(0, 0, 10), dup, past, twice]);
        assert!(lost.is_empty());
        for (i, h) in held.iter().enumerate().skip(1) {
            assert!(matches!(h, Held::Foreign(_)), "file {i}: {h:?}");
        }
    }

    #[test]
    fn interleaved_rewrites_split_the_uncovered_range_and_a_copy_is_foreign() {
        let a = unnamed((0..10).chain(20..30).map(|o| (0, o)).collect());
        let b = unnamed((10..20).map(|o| (0, o)).collect());
        let copy = unnamed((10..20).map(|o| (0, o)).collect());
        let (held, lost) = classify(&[30], &[a, b, copy]);
        assert!(lost.is_empty());
        assert_eq!(
            held[0],
            Held::Chunks(vec![
                ChunkRange::new(0, 0, 10, 10).unwrap(),
                ChunkRange::new(0, 20, 30, 10).unwrap()
            ])
        );
        assert_eq!(
            held[1],
            Held::Chunks(vec![ChunkRange::new(0, 10, 20, 10).unwrap()])
        );
        assert!(matches!(held[2], Held::Foreign(_)));
        // Nothing holds [0,10): lost.
        let (_, lost) = classify(&[20], &[named(0, 10, 20)]);
        assert_eq!(lost, vec![ChunkRange::new(0, 0, 10, 0).unwrap()]);
    }
}
