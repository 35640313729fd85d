//! Rollup by age: the paper's "adjust the granularity of the data in function
//! of its age". A view with a time-bucket GROUP BY column (e.g.
//! `date_trunc('minute', timestamp)`) may declare coarser buckets for older
//! groups:
//!
//! ```toml
//! rollup = [{ after = "1d", bucket = "1h" }, { after = "30d", bucket = "1d" }]
//! ```
//!
//! What a reader sees, exactly: a group whose bucket start is at least `after`
//! older than the rollup time has its bucket column floored to a multiple of
//! `bucket` (since the Unix epoch, UTC), and groups that then share all their
//! keys are merged, their aggregates combined as if the SQL had grouped by the
//! coarser bucket. The rollup time is the batch view's time: the batch layer
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
use crate::config::RollupConfig;

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

    /// The bucket start of `value_ms` as of `as_of_ms` (milliseconds).
    pub fn rebucket_ms(&self, value_ms: i64, as_of_ms: i64) -> i64 {
        let age = as_of_ms.saturating_sub(value_ms);
        match self.tiers.iter().rev().find(|t| age >= t.after_ms) {
            Some(t) => value_ms.div_euclid(t.bucket_ms) * t.bucket_ms,
            None => value_ms,
        }
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
