//! Rollup by age: the paper's "adjust the granularity of the data in function
//! of its age". A view with a time-bucket GROUP BY column (e.g.
//! `date_trunc('minute', timestamp)`) may declare coarser buckets for older
//! groups:
//!
//! ```toml
//! rollup = [{ after = "1d", bucket = "1h" }, { after = "30d", bucket = "1d" }]
//! ```
//!
//! What a reader sees, exactly: a group whose time falls in a coarse bucket
//! (a multiple of `bucket` since the Unix epoch, UTC) that *ended* at least
//! `after` before the rollup time has its bucket column floored to that
//! bucket's start, and groups that then share all their keys are merged,
//! their aggregates combined as if the SQL had grouped by the coarser bucket.
//! The oldest tier that applies wins. Judging the coarse bucket's end rather
//! than the group's own time means a coarse row is never partial (no hour row
//! beside minute rows of the same hour), and it makes rolling up twice the
//! same as rolling up once at the later time —
//! `rebucket(rebucket(v, t1), t2) = rebucket(v, t2)` for `t1 ≤ t2` — which an
//! incremental batch run relies on: it rolls up states that an earlier run
//! already rolled up. The rollup time is the batch view's time: the batch layer
//! applies the rollup when it recomputes, and the serving layer applies the
//! same rollup, with the same time, to realtime states before it merges them,
//! so a late event for a rolled-up period lands in the coarse row. Between two
//! batch runs the boundary does not move.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, ArrayRef, AsArray, PrimitiveArray};
use arrow::datatypes::{
    ArrowTimestampType, DataType, SchemaRef, TimeUnit, TimestampMicrosecondType,
    TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType,
};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;

use super::{ViewError, ViewKind};
use crate::view::RollupConfig;

/// One tier: groups older than `after` get buckets of `bucket`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    pub after_ms: i64,
    pub bucket_ms: i64,
}

/// A view's rollup: which state column is the time bucket, and the tiers.
#[derive(Debug, Clone)]
pub struct Rollup {
    column: usize,
    unit: TimeUnit,
    tiers: Vec<Tier>,
}

fn parse(view: &str, what: &str, s: &str) -> Result<Duration, ViewError> {
    humantime::parse_duration(s).map_err(|e| ViewError::Rollup {
        view: view.to_string(),
        reason: format!("`{what} = \"{s}\"`: {e} (write e.g. \"1h\", \"1day\", \"30days\")"),
    })
}

impl Rollup {
    /// Checks the tiers and finds the time-bucket column among the group columns.
    pub fn new(
        view: &str,
        config: &[RollupConfig],
        state_schema: &SchemaRef,
        group_columns: usize,
        kind: ViewKind,
    ) -> Result<Rollup, ViewError> {
        let err = |reason: String| ViewError::Rollup {
            view: view.to_string(),
            reason,
        };
        if kind != ViewKind::Aggregate {
            return Err(err(
                "only a view with GROUP BY can roll up: it merges groups, and this view has none"
                    .into(),
            ));
        }
        let candidates: Vec<(usize, TimeUnit)> = state_schema.fields()[..group_columns]
            .iter()
            .enumerate()
            .filter_map(|(i, f)| match f.data_type() {
                DataType::Timestamp(unit, _) => Some((i, *unit)),
                _ => None,
            })
            .collect();
        let (column, unit) = match candidates.as_slice() {
            [one] => *one,
            [] => {
                return Err(err(
                    "the view has no timestamp GROUP BY column to coarsen (group by e.g. date_trunc('minute', timestamp))".into(),
                ));
            }
            more => {
                return Err(err(format!(
                    "the view groups by {} timestamp columns; rollup needs exactly one",
                    more.len()
                )));
            }
        };
        let mut tiers = Vec::with_capacity(config.len());
        for (i, c) in config.iter().enumerate() {
            let bucket = parse(view, "bucket", &c.bucket)?;
            let tier = Tier {
                after_ms: c.after.as_millis() as i64,
                bucket_ms: bucket.as_millis() as i64,
            };
            if tier.bucket_ms <= 0 {
                return Err(err(format!(
                    "rollup[{i}]: the bucket must be at least 1 ms"
                )));
            }
            if let Some(prev) = tiers.last() {
                let prev: &Tier = prev;
                if tier.after_ms <= prev.after_ms || tier.bucket_ms <= prev.bucket_ms {
                    return Err(err(format!(
                        "rollup[{i}]: tiers must be in order of age, each older and coarser than the one before"
                    )));
                }
                if tier.bucket_ms % prev.bucket_ms != 0 {
                    return Err(err(format!(
                        "rollup[{i}]: bucket {} is not a multiple of the previous tier's {}, so its rows would not nest",
                        c.bucket,
                        humantime::format_duration(Duration::from_millis(prev.bucket_ms as u64))
                    )));
                }
            }
            tiers.push(tier);
        }
        Ok(Rollup {
            column,
            unit,
            tiers,
        })
    }

    pub fn column(&self) -> usize {
        self.column
    }

    pub fn tiers(&self) -> &[Tier] {
        &self.tiers
    }

    /// The bucket start of `value_ms` as of `as_of_ms` (milliseconds): the
    /// start of the oldest tier's bucket around it that ended at least that
    /// tier's `after` ago, or the value itself.
    ///
    /// Why rolling up again later changes nothing it should not: tiers nest
    /// (each bucket a multiple of the one before), so for a tier at least as
    /// coarse as the one a value was rolled into, the value and its rolled
    /// start lie in the same coarse bucket and that tier applies to both or
    /// neither; the tier it was rolled into still applies (time only grows);
    /// and finer tiers never win over it.
    pub fn rebucket_ms(&self, value_ms: i64, as_of_ms: i64) -> i64 {
        for t in self.tiers.iter().rev() {
            let start = value_ms.div_euclid(t.bucket_ms) * t.bucket_ms;
            if as_of_ms.saturating_sub(start.saturating_add(t.bucket_ms)) >= t.after_ms {
                return start;
            }
        }
        value_ms
    }

    /// Rewrites the time-bucket column; returns the states and how many changed.
    pub fn apply(
        &self,
        states: &RecordBatch,
        as_of_ms: i64,
    ) -> Result<(RecordBatch, usize), ArrowError> {
        let col = states.column(self.column);
        let (new, changed) = match self.unit {
            TimeUnit::Second => self.rewrite::<TimestampSecondType>(col, as_of_ms, 1_000, 1),
            TimeUnit::Millisecond => self.rewrite::<TimestampMillisecondType>(col, as_of_ms, 1, 1),
            TimeUnit::Microsecond => {
                self.rewrite::<TimestampMicrosecondType>(col, as_of_ms, 1, 1_000)
            }
            TimeUnit::Nanosecond => {
                self.rewrite::<TimestampNanosecondType>(col, as_of_ms, 1, 1_000_000)
            }
        };
        if changed == 0 {
            return Ok((states.clone(), 0));
        }
        let mut columns = states.columns().to_vec();
        columns[self.column] = new;
        Ok((RecordBatch::try_new(states.schema(), columns)?, changed))
    }

    /// `unit = ms * mul / div` converts between the column's unit and ms.
    fn rewrite<T: ArrowTimestampType>(
        &self,
        col: &ArrayRef,
        as_of_ms: i64,
        to_ms_mul: i64,
        to_ms_div: i64,
    ) -> (ArrayRef, usize) {
        let arr = col.as_primitive::<T>();
        let mut changed = 0;
        let out: PrimitiveArray<T> = arr
            .iter()
            .map(|v| {
                v.map(|v| {
                    let ms = (v * to_ms_mul).div_euclid(to_ms_div);
                    let new_ms = self.rebucket_ms(ms, as_of_ms);
                    if new_ms == ms {
                        v
                    } else {
                        changed += 1;
                        new_ms * to_ms_div / to_ms_mul
                    }
                })
            })
            .collect::<PrimitiveArray<T>>()
            .with_data_type(arr.data_type().clone());
        (Arc::new(out) as ArrayRef, changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hour_day() -> Rollup {
        Rollup {
            column: 0,
            unit: TimeUnit::Millisecond,
            tiers: vec![
                Tier {
                    after_ms: 3_600_000,
                    bucket_ms: 3_600_000,
                },
                Tier {
                    after_ms: 86_400_000,
                    bucket_ms: 86_400_000,
                },
            ],
        }
    }

    #[test]
    fn a_coarse_bucket_rolls_up_only_once_it_has_ended_long_enough_ago() {
        let r = hour_day();
        let day = 86_400_000;
        // 10:30 on day 0, as of 11:59: its hour ended 59 min ago, not 1 h.
        assert_eq!(
            r.rebucket_ms(10 * 3_600_000 + 1_800_000, 11 * 3_600_000 + 3_540_000),
            10 * 3_600_000 + 1_800_000
        );
        // As of 12:00 it rolls into the 10:00 hour.
        assert_eq!(
            r.rebucket_ms(10 * 3_600_000 + 1_800_000, 12 * 3_600_000),
            10 * 3_600_000
        );
        // Day 0 ended 1 day before day 2 starts: the day tier wins.
        assert_eq!(r.rebucket_ms(10 * 3_600_000, 2 * day), 0);
        assert_eq!(r.rebucket_ms(10 * 3_600_000, 2 * day - 1), 10 * 3_600_000);
    }

    #[test]
    fn rolling_up_twice_is_rolling_up_once_at_the_later_time() {
        // The law incremental batch runs rest on, over every pair of times
        // around the tier boundaries of a few values (a small LCG walk).
        let r = hour_day();
        let mut x: u64 = 7;
        let mut next = |n: i64| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((x >> 33) as i64).rem_euclid(n)
        };
        for _ in 0..20_000 {
            let v = next(3 * 86_400_000) / 60_000 * 60_000;
            let t1 = v + next(3 * 86_400_000);
            let t2 = t1 + next(2 * 86_400_000);
            let once = r.rebucket_ms(v, t2);
            let twice = r.rebucket_ms(r.rebucket_ms(v, t1), t2);
            assert_eq!(once, twice, "value {v}, rolled up at {t1}, then at {t2}");
        }
    }
}
