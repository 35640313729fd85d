//! Records a partition's reader fetched and decoded ahead of the layers,
//! kept until the master dataset holds them: the speed layer reads the head,
//! the archiver re-reads closed chunks behind it, and neither goes back to
//! the stream for them.
//!
//! ```text
//!  stream ─▶ reader thread/task ─decode─▶ [base ·· fetch ·· fetch ·· head)
//!                                           ▲ archived(end) releases   ▲ speed layer reads here
//! ```
//!
//! Positions may have gaps (Kafka's, refused records): a fetch covers
//! `[first, end)` and lists the positions of its events.

use std::collections::VecDeque;
use std::sync::Arc;

use super::source::{Positions, SourceBatch, StreamTimes};

/// One read of the stream, decoded: the events at positions in `[first, end)`.
pub(crate) struct Fetch {
    pub first: u64,
    pub end: u64,
    /// Each position's token (Kinesis: every record's sequence number,
    /// refused ones too); empty where the stream needs none (Kafka).
    pub tokens: Vec<Box<str>>,
    pub batch: SourceBatch,
}

/// The cache of one partition: contiguous fetches from `base` to `head`.
pub(crate) struct ReadAhead {
    pub base: u64,
    /// The token of the position just before `base` (empty: none).
    base_token: String,
    fetches: VecDeque<Fetch>,
    pub head: u64,
    /// The memory of the cached batches.
    pub bytes: usize,
}

impl ReadAhead {
    /// An empty cache that the next fetch extends from `position`.
    pub fn at(position: u64, token: Option<String>) -> ReadAhead {
        ReadAhead {
            base: position,
            base_token: token.unwrap_or_default(),
            fetches: VecDeque::new(),
            head: position,
            bytes: 0,
        }
    }

    /// The token of the last record fetched (empty: none yet).
    pub fn head_token(&self) -> Option<String> {
        match self.fetches.back() {
            Some(f) => f.tokens.last().map(|t| t.to_string()),
            None => Some(self.base_token.clone()),
        }
        .filter(|t| !t.is_empty())
    }

    /// Appends a fetch; it starts at the head.
    pub fn push(&mut self, fetch: Fetch) {
        debug_assert_eq!(fetch.first, self.head, "fetches are contiguous");
        self.bytes += fetch.batch.batch.get_array_memory_size();
        self.head = fetch.end;
        self.fetches.push_back(fetch);
    }

    /// The cached events at `[from, until)`, at most about `max` of them;
    /// `None` when `from` lies outside the cache (released, or beyond the head).
    pub fn cached(&self, from: u64, until: u64, max: usize) -> Option<Vec<SourceBatch>> {
        if from < self.base || from > self.head {
            return None;
        }
        let until = until.min(self.head);
        if from >= until {
            return Some(Vec::new());
        }
        let mut out = Vec::new();
        let mut left = max.max(1);
        let mut next = from;
        let i = self.fetches.partition_point(|f| f.end <= from);
        for f in self.fetches.iter().skip(i) {
            if f.first >= until || left == 0 {
                break;
            }
            if let Some(b) = clip(f, next, until, left) {
                left -= b.rows();
                next = b.end();
                out.push(b);
            }
        }
        Some(out)
    }

    /// The token of the position just before `position`, if still cached.
    pub fn token_at(&self, position: u64) -> Option<String> {
        if position == self.base {
            return Some(self.base_token.clone()).filter(|s| !s.is_empty());
        }
        let i = self.fetches.partition_point(|f| f.end < position);
        let f = self.fetches.get(i)?;
        if !(f.first < position && position <= f.end) {
            return None;
        }
        f.tokens
            .get((position - 1 - f.first) as usize)
            .map(|t| t.to_string())
    }

    /// Drops the fetches wholly below `end` (the master dataset holds them).
    pub fn release(&mut self, end: u64) {
        while let Some(f) = self.fetches.front()
            && f.end <= end
        {
            let f = self.fetches.pop_front().expect("a fetch");
            self.bytes -= f.batch.batch.get_array_memory_size();
            self.base = f.end;
            self.base_token = f.tokens.last().map(|s| s.to_string()).unwrap_or_default();
        }
    }
}

/// The events of `f` at positions `[from, until)`, at most `max`; `None`
/// when it has none there and the read gains nothing.
fn clip(f: &Fetch, from: u64, until: u64, max: usize) -> Option<SourceBatch> {
    let b = &f.batch;
    let n = b.rows();
    let positions: Vec<u64> = (0..n).map(|r| b.position(r)).collect();
    let lo = positions.partition_point(|&x| x < from);
    let hi_all = positions.partition_point(|&x| x < until);
    let hi = hi_all.min(lo + max);
    let end = if hi < hi_all {
        positions[hi - 1] + 1
    } else {
        until.min(f.end)
    };
    if hi == lo && end <= from {
        return None;
    }
    let at: Arc<[u64]> = positions[lo..hi].into();
    let times: Arc<[i64]> = (lo..hi).map(|r| b.time_ms(r)).collect();
    Some(SourceBatch {
        partition: b.partition,
        batch: b.batch.slice(lo, hi - lo),
        positions: Positions::Listed { at, end },
        times: StreamTimes::Each(times),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fetch of records at `first..first + n`, those at `refused`
    /// positions refused (gaps), each record's token `s<pos>`.
    fn fetch(first: u64, n: u64, refused: &[u64]) -> Fetch {
        use arrow::array::Int64Array;
        use arrow::datatypes::{DataType, Field, Schema};
        let kept: Vec<u64> = (first..first + n)
            .filter(|p| !refused.contains(p))
            .collect();
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let col = Int64Array::from_iter_values(kept.iter().map(|&p| p as i64));
        let batch = arrow::record_batch::RecordBatch::try_new(schema, vec![Arc::new(col)])
            .expect("a batch");
        Fetch {
            first,
            end: first + n,
            tokens: (first..first + n).map(|p| format!("s{p}").into()).collect(),
            batch: SourceBatch {
                partition: 0,
                batch,
                times: StreamTimes::Each(kept.iter().map(|&p| p as i64).collect()),
                positions: Positions::Listed {
                    at: kept.into(),
                    end: first + n,
                },
            },
        }
    }

    fn positions(batches: &[SourceBatch]) -> (Vec<u64>, u64) {
        let at = batches.iter().flat_map(|b| b.position_column()).collect();
        (at, batches.last().map_or(0, SourceBatch::end))
    }

    #[test]
    fn the_cache_serves_any_range_with_its_gaps_and_forgets_what_is_archived() {
        let mut c = ReadAhead::at(0, None);
        c.push(fetch(0, 10, &[3]));
        c.push(fetch(10, 5, &[14]));
        c.push(fetch(15, 5, &[]));
        assert_eq!(
            positions(&c.cached(2, 12, 100).expect("cached")),
            (vec![2, 4, 5, 6, 7, 8, 9, 10, 11], 12),
            "a range across fetches, over the refused record at 3"
        );
        assert_eq!(
            positions(&c.cached(5, 20, 3).expect("cached")),
            (vec![5, 6, 7], 8),
            "at most `max` records; the read ends after the last one"
        );
        assert_eq!(
            positions(&c.cached(14, 15, 10).expect("cached")),
            (vec![], 15),
            "a range of refused records only still moves the reader on"
        );
        assert_eq!(
            positions(&c.cached(20, 30, 10).expect("cached")).0,
            Vec::<u64>::new()
        );
        assert!(
            c.cached(21, 30, 10).is_none(),
            "beyond the head: not cached"
        );
        assert_eq!(c.token_at(0), None, "the start has no token");
        assert_eq!(c.token_at(12).as_deref(), Some("s11"));
        assert_eq!(
            c.token_at(15).as_deref(),
            Some("s14"),
            "a refused record's too"
        );
        c.release(12);
        assert_eq!(c.base, 10, "a fetch partly archived stays");
        assert_eq!(
            c.token_at(10).as_deref(),
            Some("s9"),
            "the base keeps its token"
        );
        assert!(c.cached(9, 12, 10).is_none(), "below the cache: released");
        c.release(20);
        assert_eq!((c.base, c.token_at(20).as_deref()), (20, Some("s19")));
        assert_eq!(c.head_token().as_deref(), Some("s19"));
        assert_eq!(c.bytes, 0, "nothing cached after all is archived");
    }
}
