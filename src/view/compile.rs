//! View SQL → three physical plans that share their expressions:
//!
//! ```text
//!   events ─▶ [filter/project] ─▶ Aggregate(Partial)        states plan
//!   states ─▶ Aggregate(PartialReduce)                      reduce plan
//!   states ─▶ Aggregate(Final) ─▶ [HAVING, SELECT, ORDER BY, LIMIT]   final plan
//! ```
//!
//! The SQL is planned once by DataFusion, as it would run it; the plan's
//! aggregation is then cut at its state boundary. A view without aggregation
//! has no state but its rows: its states plan is the filter/projection, its
//! states merge by union, and its final plan is whatever ORDER BY/LIMIT sat on
//! top. Constructs that cannot be split this way are refused here, naming the
//! construct and why.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::execution::TaskContext;
use datafusion::logical_expr::{Expr, LogicalPlan, Volatility};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::limit::{GlobalLimitExec, LocalLimitExec};
use datafusion::physical_plan::repartition::RepartitionExec;
use datafusion::physical_plan::sorts::sort::SortExec;
use datafusion::physical_plan::sorts::sort_preserving_merge::SortPreservingMergeExec;
use datafusion::prelude::{SessionConfig, SessionContext};

use super::input::{EventsTable, InputExec};
use super::rollup::Rollup;
use super::{View, ViewError, ViewKind};
use crate::schema::EventSchema;
use crate::view::ViewConfig;

/// Version of the state layout lambdaflow writes; part of every view's fingerprint.
pub const STATE_FORMAT: u32 = 1;

/// A DataFusion session configured the way views are planned and run:
/// identifiers as written (`ProductName`, not `productname`), one partition
/// (lambdaflow parallelizes across partitions and views itself), and no
/// rewrite that would stack aggregations.
pub fn session(schema: &EventSchema) -> Result<SessionContext, ViewError> {
    session_over(schema.arrow().clone())
}

/// A view session whose table `events` has the columns of `schema`.
fn session_over(schema: SchemaRef) -> Result<SessionContext, ViewError> {
    let mut cfg = SessionConfig::new()
        .with_target_partitions(1)
        .with_batch_size(8192);
    {
        let o = cfg.options_mut();
        o.sql_parser.enable_ident_normalization = false;
        // Batch (Parquet) and speed (memory) inputs must have one string type.
        o.execution.parquet.schema_force_view_types = false;
        // States must be grouped: never fall back to passing rows through.
        o.execution.skip_partial_aggregation_probe_rows_threshold = usize::MAX;
    }
    let ctx = SessionContext::new_with_config(cfg);
    // `count(DISTINCT x)` would become two stacked aggregations, whose outer
    // states do not merge (a value seen in two layers would count twice).
    ctx.remove_optimizer_rule("single_distinct_aggregation_to_group_by");
    ctx.register_table("events", Arc::new(EventsTable::new(schema)))
        .map_err(|e| ViewError::Internal(e.into()))?;
    Ok(ctx)
}

/// Plans one view.
pub async fn compile(def: &ViewConfig, schema: &EventSchema) -> Result<View, ViewError> {
    // Before anything else: a name the storage layout cannot hold would be
    // accepted now and stop every later batch run from publishing.
    super::check_name(&def.name)?;
    let name = def.name.clone();
    // Parsing and planning recurse on the expression tree: a deep one (a
    // 2,000-term OR) overflowed the stack and aborted the process. The
    // bounds of `POST /v1/sql` (a linear scan, no recursion) come first.
    crate::view::guard::check_on(&def.sql, crate::view::guard::Surface::Http).map_err(|e| {
        ViewError::Plan {
            view: name.clone(),
            message: e.to_string(),
            hint: crate::error::Explain::hint(&e),
        }
    })?;
    // Ordered aggregates break ties by (partition, offset); such a view reads
    // those two columns besides the events'.
    let tie_broken = tie_break(&def.sql);
    let input_schema = match &tie_broken {
        Some(_) => super::input::with_offsets_schema(schema.arrow()),
        None => schema.arrow().clone(),
    };
    let sql = tie_broken.as_deref().unwrap_or(&def.sql);
    let ctx = session_over(input_schema.clone())?;
    let state = ctx.state();
    let logical = state
        .create_logical_plan(sql)
        .await
        .map_err(|e| ViewError::plan(&name, &e, schema))?;
    check_logical(&name, &logical)?;
    let physical = state
        .create_physical_plan(&logical)
        .await
        .map_err(|e| ViewError::plan(&name, &e, schema))?;

    let Split {
        kind,
        states: states_plan,
        reduce: reduce_plan,
        finalize: final_plan,
        group_columns,
    } = split(&name, &physical, &collect_aggregates(&physical))?;
    let state_schema = states_plan.schema();
    let output_schema = final_plan.schema();
    let final_plan_for_keys = final_plan.clone();
    let every_group_a_row = keeps_every_row(&final_plan);
    let leaf = find_leaf(&states_plan).ok_or_else(|| {
        ViewError::unsupported(
            &name,
            "a query that does not read `events`",
            "a view summarizes the event stream; this query has no input to summarize",
            Some("write `... FROM events`"),
        )
    })?;
    let rollup = if def.rollup.is_empty() {
        None
    } else {
        Some(Rollup::new(
            &name,
            &def.rollup,
            &state_schema,
            group_columns,
            kind,
        )?)
    };
    let fingerprint = fingerprint(&logical, def, &input_schema, leaf.projection());
    let mut view = View {
        name: name.clone(),
        sql: def.sql.clone(),
        def: def.clone(),
        kind,
        leaf_projection: leaf.projection().cloned(),
        events_schema: input_schema,
        needs_offsets: tie_broken.is_some(),
        states_plan,
        reduce_plan,
        final_plan,
        state_schema,
        output_schema,
        rollup,
        fingerprint,
        key_columns: if kind == ViewKind::Aggregate {
            key_columns(&final_plan_for_keys, group_columns)
        } else {
            Default::default()
        },
        group_columns,
        every_group_a_row,
        direct: super::direct::Direct::of(&final_plan_for_keys),
        task_ctx: ctx.task_ctx(),
        scan_views: None,
    };
    // Run once on nothing: a plan that cannot run fails at startup, not on the first event.
    let empty = view.states(Vec::new()).await?;
    view.finalize(vec![empty]).await?;
    view.scan_views = string_view_states(&view, sql).await;
    Ok(view)
}

/// The view's states plan over `events` whose string columns are
/// `Utf8View`, its states cast back to the view's state schema; `None` when
/// the view reads no string column, or does not plan the same way over
/// views (it then scans strings as the speed layer has them).
///
/// Why: the batch layer's scan decodes Parquet's dictionary pages straight
/// into views (no copy of each row's bytes), and grouping compares a short
/// string's view (length and up to 12 bytes inline) instead of hashing and
/// comparing its bytes. The speed layer's states and every later plan keep
/// `Utf8`: the cast at the end makes the two layers' states one type.
async fn string_view_states(view: &View, sql: &str) -> Option<(SchemaRef, Arc<dyn ExecutionPlan>)> {
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_expr::PhysicalExpr;
    use datafusion::physical_expr::expressions::{CastExpr, Column};
    use datafusion::physical_plan::projection::ProjectionExec;
    let input = &view.events_schema;
    let read = match &view.leaf_projection {
        Some(p) => p.clone(),
        None => (0..input.fields().len()).collect(),
    };
    if !read
        .iter()
        .any(|&i| input.field(i).data_type() == &DataType::Utf8)
    {
        return None;
    }
    let viewed: SchemaRef = Arc::new(Schema::new_with_metadata(
        input
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Utf8 => Arc::new(Field::clone(f).with_data_type(DataType::Utf8View)),
                _ => f.clone(),
            })
            .collect::<Vec<_>>(),
        input.metadata().clone(),
    ));
    let ctx = session_over(viewed.clone()).ok()?;
    let state = ctx.state();
    let logical = state.create_logical_plan(sql).await.ok()?;
    let physical = state.create_physical_plan(&logical).await.ok()?;
    let aggregates = collect_aggregates(&physical);
    if !states_ignore_string_type(&aggregates) {
        return None;
    }
    let split = split(&view.name, &physical, &aggregates).ok()?;
    if split.kind != view.kind
        || find_leaf(&split.states)?.projection() != view.leaf_projection.as_ref()
    {
        return None;
    }
    let states = split.states.schema();
    let want = &view.state_schema;
    if states.fields().len() != want.fields().len() {
        return None;
    }
    let mut exprs: Vec<(Arc<dyn PhysicalExpr>, String)> = Vec::with_capacity(want.fields().len());
    for (i, (got, to)) in states.fields().iter().zip(want.fields()).enumerate() {
        if got.name() != to.name() {
            return None;
        }
        let column: Arc<dyn PhysicalExpr> = Arc::new(Column::new(got.name(), i));
        let expr: Arc<dyn PhysicalExpr> = if got.data_type() == to.data_type() {
            column
        } else if arrow::compute::can_cast_types(got.data_type(), to.data_type()) {
            Arc::new(CastExpr::new(column, to.data_type().clone(), None))
        } else {
            return None;
        };
        exprs.push((expr, to.name().clone()));
    }
    let plan: Arc<dyn ExecutionPlan> = Arc::new(ProjectionExec::try_new(exprs, split.states).ok()?);
    // It must run, and on nothing give what the plan over `Utf8` gives
    // (one row of zero counts for a view without groups).
    let empty = with_input(&plan, Arc::new(Vec::new())).ok()?;
    let out = datafusion::physical_plan::collect(empty, view.task_ctx.clone())
        .await
        .ok()?;
    let out = arrow::compute::concat_batches(&plan.schema(), &out).ok()?;
    let expected = view.states(Vec::new()).await.ok()?;
    if out.columns() != expected.columns() {
        return None;
    }
    Some((viewed, plan))
}

/// Appends `_partition, _offset` to the ORDER BY of every ordered aggregate
/// (`first_value(x ORDER BY timestamp)`, `array_agg(x ORDER BY t)`); `None`
/// when the view has none. `WITHIN GROUP (ORDER BY v)` (percentiles) is left
/// alone: it orders by the aggregated value itself, so equal keys are equal
/// values and no choice between events is made (DataFusion also allows one
/// key there).
///
/// Why: events with equal ordering keys are common (timestamps in
/// milliseconds). Which of them such an aggregate picks then depends on the
/// order states are merged in, and the batch layer merges in another order
/// than a read that merges batch and realtime states: an answer could flip
/// when a batch run is installed. With the offset as the last key no two
/// events tie, and every layer picks the same one.
fn tie_break(sql: &str) -> Option<String> {
    use datafusion::sql::sqlparser::ast::{
        Expr, FunctionArgumentClause, FunctionArguments, Ident, OrderByExpr, visit_expressions_mut,
    };
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::parser::Parser;
    use std::ops::ControlFlow;
    let mut statements = Parser::parse_sql(&GenericDialect {}, sql).ok()?;
    let keys = || {
        [crate::chunk::PARTITION_COLUMN, crate::chunk::OFFSET_COLUMN]
            .map(|c| OrderByExpr::from(Ident::with_quote('"', c)))
    };
    let mut changed = false;
    let _ = visit_expressions_mut(&mut statements, |e| {
        if let Expr::Function(f) = e
            && let FunctionArguments::List(list) = &mut f.args
        {
            for clause in &mut list.clauses {
                if let FunctionArgumentClause::OrderBy(order) = clause {
                    order.extend(keys());
                    changed = true;
                }
            }
        }
        ControlFlow::<()>::Continue(())
    });
    changed.then(|| {
        statements
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    })
}

/// A stable hash of everything that shapes a view's states. The SQL enters
/// as its logical plan, not as text with its whitespace collapsed: the plan
/// ignores layout but keeps every literal exactly (`'a  b'` and `'a b'` are
/// different views), and the DataFusion version that prints it is hashed too.
///
/// Of the event schema, only the fields the view reads enter (`read`, the
/// projection of its scan; all of them when it has none), with their types
/// and nullability: adding a field the view does not read leaves its states,
/// and so its fingerprint, as they are (no rebuild, and earlier runs still
/// answer `?as_of=`). The plan is printed without its nodes' schemas, which
/// would name every field of `events`.
fn fingerprint(
    logical: &LogicalPlan,
    def: &ViewConfig,
    input: &SchemaRef,
    read: Option<&Vec<usize>>,
) -> String {
    let mut text = format!(
        "lambdaflow-states-v{STATE_FORMAT}\ndatafusion-{}\n{}\n",
        datafusion::DATAFUSION_VERSION,
        logical.display_indent()
    );
    for r in &def.rollup {
        text.push_str(&format!("rollup {:?} {}\n", r.after, r.bucket));
    }
    let all: Vec<usize>;
    let read = match read {
        Some(r) => r,
        None => {
            all = (0..input.fields().len()).collect();
            &all
        }
    };
    for &i in read {
        let f = input.field(i);
        text.push_str(&format!(
            "reads {} {} {}\n",
            f.name(),
            f.data_type(),
            f.is_nullable()
        ));
    }
    // FNV-1a, 64 bits: stable across Rust versions, unlike `DefaultHasher`.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Refuses what cannot be computed as mergeable states.
fn check_logical(view: &str, plan: &LogicalPlan) -> Result<(), ViewError> {
    match plan {
        LogicalPlan::Ddl(_)
        | LogicalPlan::Dml(_)
        | LogicalPlan::Copy(_)
        | LogicalPlan::Statement(_)
        | LogicalPlan::Explain(_)
        | LogicalPlan::Analyze(_) => {
            return Err(ViewError::unsupported(
                view,
                "a statement that is not a query",
                "a view is one SELECT over the table `events`",
                None,
            ));
        }
        _ => {}
    }
    let mut aggregates = 0;
    let mut err: Option<ViewError> = None;
    plan.apply(|node| {
        let refusal = match node {
            LogicalPlan::Window(w) => Some(ViewError::unsupported(
                view,
                &format!("window function `{}`", first_expr(&w.window_expr)),
                "a window function's value for one row depends on other rows, which may sit on the other side of the batch/realtime split, so its states cannot be merged",
                Some("query the view with a window function instead (POST /v1/sql)"),
            )),
            LogicalPlan::Join(_) => Some(ViewError::unsupported(
                view,
                "a join",
                "joining the stream with itself pairs events that may sit on different sides of the batch/realtime split, so per-side results cannot be merged",
                None,
            )),
            LogicalPlan::Union(_) | LogicalPlan::Distinct(datafusion::logical_expr::Distinct::On(_)) => {
                Some(ViewError::unsupported(
                    view,
                    if matches!(node, LogicalPlan::Union(_)) { "UNION / INTERSECT / EXCEPT" } else { "DISTINCT ON" },
                    "set operations over the stream cannot be computed per side and merged",
                    Some("declare one view per query"),
                ))
            }
            LogicalPlan::Subquery(_) | LogicalPlan::SubqueryAlias(_)
                if !matches!(node, LogicalPlan::SubqueryAlias(a) if is_events_scan(&a.input)) =>
            {
                Some(ViewError::unsupported(
                    view,
                    "a subquery",
                    "a query over the result of another query cannot be merged from per-side results",
                    Some("write the view as one SELECT over events"),
                ))
            }
            LogicalPlan::Aggregate(_) => {
                aggregates += 1;
                (aggregates > 1).then(|| {
                    ViewError::unsupported(
                        view,
                        "an aggregation over another aggregation",
                        "the outer aggregation's states are computed from already-final inner values, so merging them across the batch/realtime split would count groups twice",
                        Some("declare the inner aggregation as the view, and aggregate it further with POST /v1/sql"),
                    )
                })
            }
            LogicalPlan::Limit(l) if !has_sort_below(&l.input) => Some(ViewError::unsupported(
                view,
                "LIMIT without ORDER BY",
                "it would keep arbitrary rows, which differ between the batch and realtime layers",
                Some("add an ORDER BY that decides which rows the LIMIT keeps"),
            )),
            _ => None,
        };
        if refusal.is_none() {
            for e in node.expressions() {
                if let Some(r) = check_expr(view, &e) {
                    err = Some(r);
                    return Ok(TreeNodeRecursion::Stop);
                }
            }
        }
        match refusal {
            Some(r) => {
                err = Some(r);
                Ok(TreeNodeRecursion::Stop)
            }
            None => Ok(TreeNodeRecursion::Continue),
        }
    })
    .map_err(|e| ViewError::Internal(e.into()))?;
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn is_events_scan(plan: &LogicalPlan) -> bool {
    matches!(plan, LogicalPlan::TableScan(_))
}

/// `row_number() OVER (…)`: the window function without its frame noise.
fn first_expr(exprs: &[Expr]) -> String {
    let full = exprs
        .first()
        .map_or_else(String::new, |e| e.schema_name().to_string());
    let cut = [
        " PARTITION BY",
        " ORDER BY",
        " ROWS ",
        " RANGE ",
        " GROUPS ",
    ]
    .iter()
    .filter_map(|k| full.find(k))
    .min();
    match cut {
        Some(i) => format!("{} OVER (…)", &full[..i]),
        None => full,
    }
}

fn has_sort_below(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::Sort(_) => true,
        LogicalPlan::Projection(p) => has_sort_below(&p.input),
        LogicalPlan::SubqueryAlias(a) => has_sort_below(&a.input),
        _ => false,
    }
}

/// Refuses expressions whose value is not a function of the events alone.
fn check_expr(view: &str, expr: &Expr) -> Option<ViewError> {
    let mut found = None;
    let _ = expr.apply(|e| {
        let r = match e {
            Expr::ScalarFunction(f)
                if f.func.signature().volatility != Volatility::Immutable =>
            {
                Some(ViewError::unsupported(
                    view,
                    &format!("`{}()`", f.func.name()),
                    "its value depends on when or where the query runs (it is not a function of the events), so the batch and realtime layers would compute different things",
                    Some("filter by event time when you query the view instead"),
                ))
            }
            Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_) | Expr::SetComparison(_) => {
                Some(ViewError::unsupported(
                    view,
                    "a subquery",
                    "a query over the result of another query cannot be merged from per-side results",
                    Some("write the view as one SELECT over events"),
                ))
            }
            Expr::AggregateFunction(a)
                if matches!(a.func.name(), "first_value" | "last_value" | "nth_value")
                    && a.params.order_by.is_empty() =>
            {
                Some(ViewError::unsupported(
                    view,
                    &format!("`{}` without ORDER BY", a.func.name()),
                    "without an order it picks an arbitrary event, which differs between the batch and realtime layers",
                    Some(&format!(
                        "write `{}(x ORDER BY <event time>)`",
                        a.func.name()
                    )),
                ))
            }
            _ => None,
        };
        match r {
            Some(r) => {
                found = Some(r);
                Ok(TreeNodeRecursion::Stop)
            }
            None => Ok(TreeNodeRecursion::Continue),
        }
    });
    found
}

/// Whether every aggregate of `aggregates` that takes a string keeps the
/// same state for it as `Utf8View` as for `Utf8`: the batch layer's states
/// (over views) and the speed layer's (over strings) merge into one answer.
/// An aggregate's state may hold the values (count, min, max, first_value,
/// array_agg, `count(DISTINCT)` …), which cast back exactly, or something
/// computed from them that depends on their type: `approx_distinct` hashes
/// a view otherwise than a string, so its HLL registers of one value differ
/// between the layers, and merged they counted values seen on both sides
/// twice (found by the red team: 20 where 10 were distinct). Only the
/// aggregates known to hold values are allowed over strings.
fn states_ignore_string_type(aggregates: &[Arc<dyn ExecutionPlan>]) -> bool {
    use arrow::datatypes::DataType;
    const HOLD_VALUES: &[&str] = &[
        "count",
        "min",
        "max",
        "first_value",
        "last_value",
        "nth_value",
        "array_agg",
        "string_agg",
    ];
    aggregates.iter().all(|node| {
        let Some(agg) = node.downcast_ref::<AggregateExec>() else {
            return true;
        };
        // The aggregation over the events (a later one reads states).
        if !matches!(
            agg.mode(),
            AggregateMode::Partial | AggregateMode::Single | AggregateMode::SinglePartitioned
        ) {
            return true;
        }
        let input = agg.input().schema();
        agg.aggr_expr().iter().all(|a| {
            let strings = a.expressions().iter().any(|e| {
                matches!(
                    e.data_type(&input),
                    Ok(DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8) | Err(_)
                )
            });
            !strings || HOLD_VALUES.contains(&a.fun().name())
        })
    })
}

/// A planned view cut into states, reduce and finalize: by its
/// aggregations (`aggregates`, from [`collect_aggregates`]), or as a union
/// view when it has none.
fn split(
    view: &str,
    physical: &Arc<dyn ExecutionPlan>,
    aggregates: &[Arc<dyn ExecutionPlan>],
) -> Result<Split, ViewError> {
    if aggregates.is_empty() {
        split_union(view, physical)
    } else {
        split_aggregate(view, physical, aggregates)
    }
}

/// Whether finalizing with `final_plan` gives one row per state row and
/// cannot fail once the states exist: it holds only nodes that keep every
/// row (the final aggregation over the states, projections of columns,
/// sorts without a fetch, the moving of partitions) — no HAVING, no LIMIT,
/// no `unnest` or anything else that drops or makes rows, and no
/// expression over the aggregates (`sum(a) / count(*)` may divide by zero:
/// such a view is finalized in every run, so its failure does not depend
/// on its size).
fn keeps_every_row(final_plan: &Arc<dyn ExecutionPlan>) -> bool {
    use datafusion::physical_expr::expressions::Column;
    use datafusion::physical_plan::projection::ProjectionExec;
    let mut keeps = true;
    let _ = final_plan.apply(|node| {
        let columns = |p: &ProjectionExec| p.expr().iter().all(|e| e.expr.is::<Column>());
        let keeps_rows = node.is::<InputExec>()
            || node.is::<AggregateExec>()
            || node.downcast_ref::<ProjectionExec>().is_some_and(columns)
            || node.is::<SortExec>()
            || node.is::<SortPreservingMergeExec>()
            || is_plumbing(node);
        if !keeps_rows || node.fetch().is_some() {
            keeps = false;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    keeps
}

/// Every `AggregateExec`, top first.
fn collect_aggregates(plan: &Arc<dyn ExecutionPlan>) -> Vec<Arc<dyn ExecutionPlan>> {
    let mut out = Vec::new();
    let _ = plan.apply(|node| {
        if node.is::<AggregateExec>() {
            out.push(node.clone());
        }
        Ok(TreeNodeRecursion::Continue)
    });
    out
}

fn find_leaf(plan: &Arc<dyn ExecutionPlan>) -> Option<InputExec> {
    let mut leaf = None;
    let _ = plan.apply(|node| {
        if let Some(i) = node.downcast_ref::<InputExec>() {
            leaf = Some(i.clone());
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    leaf
}

/// Replaces the node `target` (by identity) in `plan` with `with`.
fn replace_node(
    plan: &Arc<dyn ExecutionPlan>,
    target: &Arc<dyn ExecutionPlan>,
    with: Arc<dyn ExecutionPlan>,
) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
    plan.clone()
        .transform_down(|node| {
            if Arc::ptr_eq(&node, target) {
                Ok(Transformed::new(
                    with.clone(),
                    true,
                    TreeNodeRecursion::Jump,
                ))
            } else {
                Ok(Transformed::no(node))
            }
        })
        .map(|t| t.data)
}

/// A view's plan cut at its state boundary.
struct Split {
    kind: ViewKind,
    states: Arc<dyn ExecutionPlan>,
    reduce: Option<Arc<dyn ExecutionPlan>>,
    finalize: Arc<dyn ExecutionPlan>,
    /// Leading state columns that are group keys.
    group_columns: usize,
}

/// Nodes that only move, order or cut rows: what may sit between two halves
/// of one aggregation, or above a union view's rows.
fn is_plumbing(node: &Arc<dyn ExecutionPlan>) -> bool {
    node.is::<CoalescePartitionsExec>() || node.is::<RepartitionExec>()
}

fn is_post_merge(node: &Arc<dyn ExecutionPlan>) -> bool {
    node.is::<SortExec>()
        || node.is::<SortPreservingMergeExec>()
        || node.is::<GlobalLimitExec>()
        || node.is::<LocalLimitExec>()
        || is_plumbing(node)
}

fn split_aggregate(
    view: &str,
    physical: &Arc<dyn ExecutionPlan>,
    aggregates: &[Arc<dyn ExecutionPlan>],
) -> Result<Split, ViewError> {
    let top_node = &aggregates[0];
    let top = top_node
        .downcast_ref::<AggregateExec>()
        .expect("collected as AggregateExec");
    // The raw-input half: the Partial under a Final, or the Single itself.
    let (first_node, used) = match top.mode() {
        AggregateMode::Single | AggregateMode::SinglePartitioned => (top_node.clone(), 1),
        AggregateMode::Final | AggregateMode::FinalPartitioned => {
            let mut below = top.input().clone();
            while is_plumbing(&below) {
                below = below.children()[0].clone();
            }
            let is_partial = below
                .downcast_ref::<AggregateExec>()
                .is_some_and(|p| *p.mode() == AggregateMode::Partial);
            if !is_partial {
                return Err(stacked(view));
            }
            (below, 2)
        }
        _ => return Err(stacked(view)),
    };
    if aggregates.len() > used {
        return Err(stacked(view));
    }
    let first = first_node
        .downcast_ref::<AggregateExec>()
        .expect("checked above");
    let input_schema = first.input_schema();
    let aggr = first.aggr_expr().to_vec();
    let group_by = first.group_expr().clone();
    let none = vec![None; aggr.len()];
    let df = |e: datafusion::error::DataFusionError| ViewError::Internal(e.into());

    let partial = Arc::new(
        AggregateExec::try_new(
            AggregateMode::Partial,
            group_by.clone(),
            aggr.clone(),
            first.filter_expr().to_vec(),
            first.input().clone(),
            input_schema.clone(),
        )
        .map_err(df)?,
    );
    let state_schema = partial.schema();
    let states_leaf = || -> Result<Arc<dyn ExecutionPlan>, ViewError> {
        Ok(Arc::new(
            InputExec::placeholder(state_schema.clone(), None).map_err(df)?,
        ))
    };
    let reduce = Arc::new(
        AggregateExec::try_new(
            AggregateMode::PartialReduce,
            group_by.as_final(),
            aggr.clone(),
            none.clone(),
            states_leaf()?,
            input_schema.clone(),
        )
        .map_err(df)?,
    );
    let final_agg: Arc<dyn ExecutionPlan> = Arc::new(
        AggregateExec::try_new(
            AggregateMode::Final,
            group_by.as_final(),
            aggr,
            none,
            states_leaf()?,
            input_schema,
        )
        .map_err(df)?,
    );
    if final_agg.schema().fields().len() != top_node.schema().fields().len() {
        return Err(ViewError::Internal(
            format!(
                "view `{view}`: the rebuilt final aggregation has {} columns, the planned one {}",
                final_agg.schema().fields().len(),
                top_node.schema().fields().len()
            )
            .into(),
        ));
    }
    let final_plan = replace_node(physical, top_node, final_agg).map_err(df)?;
    Ok(Split {
        kind: ViewKind::Aggregate,
        states: partial,
        reduce: Some(reduce),
        finalize: final_plan,
        group_columns: group_by.num_group_exprs(),
    })
}

fn stacked(view: &str) -> ViewError {
    ViewError::unsupported(
        view,
        "an aggregation that DataFusion plans as stacked aggregations",
        "the outer aggregation's states would be computed from already-merged inner values, and merging them again across the batch/realtime split would count twice",
        Some("simplify the aggregate (e.g. one DISTINCT aggregate per view)"),
    )
}

fn split_union(view: &str, physical: &Arc<dyn ExecutionPlan>) -> Result<Split, ViewError> {
    // Walk down through ORDER BY / LIMIT: they apply after the union of all sides.
    let mut boundary = physical.clone();
    while is_post_merge(&boundary) {
        boundary = boundary.children()[0].clone();
    }
    let states_schema: SchemaRef = boundary.schema();
    let leaf: Arc<dyn ExecutionPlan> = Arc::new(
        InputExec::placeholder(states_schema, None).map_err(|e| ViewError::Internal(e.into()))?,
    );
    let final_plan =
        replace_node(physical, &boundary, leaf).map_err(|e| ViewError::Internal(e.into()))?;
    let _ = view;
    let group_columns = boundary.schema().fields().len();
    Ok(Split {
        kind: ViewKind::Union,
        states: boundary,
        reduce: None,
        finalize: final_plan,
        group_columns,
    })
}

/// Output columns that are group keys, mapped to their state column: a
/// filter on such a column may be applied to the states before the merge
/// (one group in, one group out). None when a LIMIT sits on top, because a
/// LIMIT does not commute with a filter.
fn key_columns(
    final_plan: &Arc<dyn ExecutionPlan>,
    group_columns: usize,
) -> std::collections::HashMap<String, usize> {
    use datafusion::physical_expr::expressions::Column;
    use datafusion::physical_plan::filter::FilterExec;
    use datafusion::physical_plan::projection::ProjectionExec;
    let mut out = std::collections::HashMap::new();
    let mut node = final_plan.clone();
    loop {
        if node.fetch().is_some() || node.is::<GlobalLimitExec>() || node.is::<LocalLimitExec>() {
            return out;
        }
        if node.is::<SortExec>()
            || node.is::<SortPreservingMergeExec>()
            || is_plumbing(&node)
            || node.is::<FilterExec>()
        {
            node = node.children()[0].clone();
            continue;
        }
        break;
    }
    let projection = node
        .downcast_ref::<ProjectionExec>()
        .map(|p| p.expr().to_vec());
    let mut below = match &projection {
        Some(_) => node.children()[0].clone(),
        None => node.clone(),
    };
    while below.is::<FilterExec>() {
        below = below.children()[0].clone();
    }
    if !below.is::<AggregateExec>() {
        return out;
    }
    match projection {
        Some(exprs) => {
            for pe in exprs {
                if let Some(c) = pe.expr.downcast_ref::<Column>()
                    && c.index() < group_columns
                {
                    out.insert(pe.alias.clone(), c.index());
                }
            }
        }
        None => {
            for (i, f) in below
                .schema()
                .fields()
                .iter()
                .enumerate()
                .take(group_columns)
            {
                out.insert(f.name().clone(), i);
            }
        }
    }
    out
}

/// Runs `plan` with its placeholder leaf replaced by `data`.
pub(super) fn with_input(
    plan: &Arc<dyn ExecutionPlan>,
    data: Arc<Vec<arrow::record_batch::RecordBatch>>,
) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
    let replaced = plan
        .clone()
        .transform_up(|node| match node.downcast_ref::<InputExec>() {
            Some(leaf) => Ok(Transformed::yes(
                Arc::new(leaf.with_data(data.clone())) as Arc<dyn ExecutionPlan>
            )),
            None => Ok(Transformed::no(node)),
        })?
        .data;
    // Fresh execution state (e.g. a TopK's dynamic filter) for every run.
    datafusion::physical_plan::execution_plan::reset_plan_states(replaced)
}

/// See [`super::View::distributed_states_plan`].
pub(super) fn distributed(
    states: &Arc<dyn ExecutionPlan>,
    reduce: Option<&Arc<dyn ExecutionPlan>>,
    leaf: Arc<dyn ExecutionPlan>,
    reducers: usize,
) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
    use datafusion::physical_plan::Partitioning;
    let partial = with_leaf(states, leaf)?;
    let Some(reduce) = reduce else {
        // Rows merge by union: gathering them is the whole merge.
        return Ok(Arc::new(CoalescePartitionsExec::new(partial)));
    };
    let keys = reduce
        .downcast_ref::<AggregateExec>()
        .ok_or_else(|| {
            datafusion::error::DataFusionError::Internal(
                "a view's reduce plan is not an aggregation".into(),
            )
        })?
        .group_expr()
        .input_exprs();
    if keys.is_empty() {
        // One group: its states meet in one partition.
        return with_leaf(reduce, Arc::new(CoalescePartitionsExec::new(partial)));
    }
    let shuffled = Arc::new(RepartitionExec::try_new(
        partial,
        Partitioning::Hash(keys, reducers.max(1)),
    )?);
    Ok(Arc::new(CoalescePartitionsExec::new(with_leaf(
        reduce, shuffled,
    )?)))
}

/// See [`super::View::shuffled_states_plan`]: `states` over `leaf`, with
/// the rows hash-partitioned by the aggregation's group keys into `k`
/// partitions just below it. `None` when the states have no such keys (a
/// union view, one group, grouping sets: a group of a grouping set spans
/// keys that land in different partitions, an ordered aggregate).
pub(super) fn shuffled(
    states: &Arc<dyn ExecutionPlan>,
    leaf: Arc<dyn ExecutionPlan>,
    k: usize,
) -> datafusion::error::Result<Option<Arc<dyn ExecutionPlan>>> {
    use datafusion::physical_plan::Partitioning;
    let plan = with_leaf(states, leaf)?;
    let Some(node) = collect_aggregates(&plan).pop() else {
        return Ok(None);
    };
    let agg = node
        .downcast_ref::<AggregateExec>()
        .expect("collected as AggregateExec");
    let keys = agg.group_expr();
    // An ordered aggregate reads its input sorted: a shuffle would interleave it.
    let ordered = node.required_input_ordering().iter().any(Option::is_some);
    if keys.is_empty() || !keys.is_single() || ordered || *agg.mode() != AggregateMode::Partial {
        return Ok(None);
    }
    let shuffled = Arc::new(RepartitionExec::try_new(
        agg.input().clone(),
        Partitioning::Hash(keys.input_exprs(), k.max(1)),
    )?);
    let over: Arc<dyn ExecutionPlan> = Arc::new(AggregateExec::try_new(
        AggregateMode::Partial,
        keys.clone(),
        agg.aggr_expr().to_vec(),
        agg.filter_expr().to_vec(),
        shuffled,
        agg.input_schema(),
    )?);
    replace_node(&plan, &node, over).map(Some)
}

/// Runs `plan` with its placeholder leaf replaced by another leaf (a scan).
pub(super) fn with_leaf(
    plan: &Arc<dyn ExecutionPlan>,
    leaf: Arc<dyn ExecutionPlan>,
) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
    let replaced = plan
        .clone()
        .transform_up(|node| {
            if node.is::<InputExec>() {
                Ok(Transformed::yes(leaf.clone()))
            } else {
                Ok(Transformed::no(node))
            }
        })?
        .data;
    datafusion::physical_plan::execution_plan::reset_plan_states(replaced)
}

pub(super) type Task = Arc<TaskContext>;
