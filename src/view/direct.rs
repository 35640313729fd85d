//! Finalizing a few groups' states without running the final plan: what a
//! point read merges (one key's rows from the published run and each
//! realtime state batch, a handful) is finalized by the aggregates'
//! accumulators and the expressions above them, called directly.
//!
//! ```text
//!  final plan:   Projection ─ Filter (HAVING) ─ … ─ Aggregate(Final) ─ InputExec(states)
//!  direct:       states ─group─▶ GroupsAccumulator::merge_batch ─evaluate─▶ rows ─▶ each
//!                Filter / Projection above, evaluated on the batch
//! ```
//!
//! The accumulators are the plan's own (`AggregateFunctionExpr`), so the
//! values are those the plan computes; running the plan costs more than
//! the work for a few rows (building the plan's streams, its hash table
//! and metrics). Only plans made of the final aggregation and projections
//! and filters above it take this path: sorts, limits, windows and
//! grouping sets finalize through the plan ([`Direct::of`] says `None`).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, AsArray, UInt32Array};
use arrow::compute::{concat_batches, filter_record_batch, take};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, SortField};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::EmitTo;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode, aggregate_expressions};
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::scalar::ScalarValue;

use super::input::InputExec;

/// A view's final plan, taken apart for [`Direct::run`].
#[derive(Debug)]
pub(super) struct Direct {
    /// The final aggregation (its accumulators and group expressions).
    aggregate: Arc<dyn ExecutionPlan>,
    /// Per aggregate: the state columns it merges.
    arguments: Vec<Vec<Arc<dyn PhysicalExpr>>>,
    /// What lies above the aggregation, bottom first.
    above: Vec<Step>,
}

#[derive(Debug)]
enum Step {
    Project {
        exprs: Vec<Arc<dyn PhysicalExpr>>,
        schema: SchemaRef,
    },
    Filter {
        predicate: Arc<dyn PhysicalExpr>,
        projection: Option<Vec<usize>>,
    },
}

impl Direct {
    /// The direct path of `final_plan`, if it has one: a chain of
    /// projections and filters (without a fetch) down to a final aggregation with groups over the states' leaf, whose aggregates
    /// need no input order.
    pub(super) fn of(final_plan: &Arc<dyn ExecutionPlan>) -> Option<Direct> {
        let mut above = Vec::new();
        let mut node = final_plan.clone();
        loop {
            if node.fetch().is_some() {
                return None;
            }
            if let Some(agg) = node.downcast_ref::<AggregateExec>() {
                let groups = agg.group_expr();
                let plain = *agg.mode() == AggregateMode::Final
                    && !groups.expr().is_empty()
                    && !groups.has_grouping_set()
                    && agg.limit_options().is_none()
                    && agg.input().is::<InputExec>()
                    && agg.aggr_expr().iter().all(|a| a.order_bys().is_empty());
                if !plain {
                    return None;
                }
                let arguments =
                    aggregate_expressions(agg.aggr_expr(), agg.mode(), groups.num_group_exprs())
                        .ok()?;
                above.reverse();
                return Some(Direct {
                    aggregate: node.clone(),
                    arguments,
                    above,
                });
            }
            if let Some(p) = node.downcast_ref::<ProjectionExec>() {
                above.push(Step::Project {
                    exprs: p.expr().iter().map(|e| e.expr.clone()).collect(),
                    schema: p.schema(),
                });
            } else if let Some(f) = node.downcast_ref::<FilterExec>() {
                above.push(Step::Filter {
                    predicate: f.predicate().clone(),
                    projection: f.projection().as_ref().map(|p| p.to_vec()),
                });
            } else {
                return None;
            }
            let children = node.children();
            if children.len() != 1 {
                return None;
            }
            node = children[0].clone();
        }
    }

    /// The view's rows of the groups in `parts` (state batches of the
    /// view's state schema): what the final plan gives for them.
    pub(super) fn run(&self, parts: &[RecordBatch]) -> Result<RecordBatch> {
        let agg = self
            .aggregate
            .downcast_ref::<AggregateExec>()
            .expect("an aggregation");
        let states = concat_batches(&agg.input().schema(), parts)?;
        let n = states.num_rows();
        let keys = agg
            .group_expr()
            .expr()
            .iter()
            .map(|(e, _)| e.evaluate(&states)?.into_array(n))
            .collect::<Result<Vec<ArrayRef>>>()?;
        // Each row's group, numbered by first appearance (nulls group
        // together, as in the plan's hash table).
        let converter = RowConverter::new(
            keys.iter()
                .map(|k| SortField::new(k.data_type().clone()))
                .collect(),
        )?;
        let rows = converter.convert_columns(&keys)?;
        let mut seen: HashMap<&[u8], usize> = HashMap::with_capacity(n);
        let mut firsts: Vec<u32> = Vec::new();
        let mut group_of: Vec<usize> = Vec::with_capacity(n);
        for r in 0..n {
            let g = *seen.entry(rows.row(r).data()).or_insert_with(|| {
                firsts.push(r as u32);
                firsts.len() - 1
            });
            group_of.push(g);
        }
        let groups = firsts.len();
        let firsts = UInt32Array::from(firsts);
        let mut columns = keys
            .iter()
            .map(|k| take(k, &firsts, None).map_err(DataFusionError::from))
            .collect::<Result<Vec<ArrayRef>>>()?;
        for (a, args) in agg.aggr_expr().iter().zip(&self.arguments) {
            let values = args
                .iter()
                .map(|e| e.evaluate(&states)?.into_array(n))
                .collect::<Result<Vec<ArrayRef>>>()?;
            columns.push(if a.groups_accumulator_supported() {
                let mut acc = a.create_groups_accumulator()?;
                acc.merge_batch(&values, &group_of, groups)?;
                acc.evaluate(EmitTo::All)?
            } else {
                let mut out = Vec::with_capacity(groups);
                for g in 0..groups {
                    let mine = UInt32Array::from_iter_values(
                        (0..n as u32).filter(|&r| group_of[r as usize] == g),
                    );
                    let values = values
                        .iter()
                        .map(|v| take(v, &mine, None).map_err(DataFusionError::from))
                        .collect::<Result<Vec<ArrayRef>>>()?;
                    let mut acc = a.create_accumulator()?;
                    acc.merge_batch(&values)?;
                    out.push(acc.evaluate()?);
                }
                if out.is_empty() {
                    arrow::array::new_empty_array(a.field().data_type())
                } else {
                    ScalarValue::iter_to_array(out)?
                }
            });
        }
        let mut batch = RecordBatch::try_new(agg.schema(), columns)?;
        for step in &self.above {
            batch = match step {
                Step::Project { exprs, schema } => {
                    let n = batch.num_rows();
                    let columns = exprs
                        .iter()
                        .map(|e| e.evaluate(&batch)?.into_array(n))
                        .collect::<Result<Vec<ArrayRef>>>()?;
                    RecordBatch::try_new(schema.clone(), columns)?
                }
                Step::Filter {
                    predicate,
                    projection,
                } => {
                    let mask = predicate.evaluate(&batch)?.into_array(batch.num_rows())?;
                    let kept = filter_record_batch(&batch, mask.as_boolean())?;
                    match projection {
                        Some(p) => kept.project(p)?,
                        None => kept,
                    }
                }
            };
        }
        Ok(batch)
    }
}
