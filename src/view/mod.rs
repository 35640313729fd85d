//! Views: business logic written once, in SQL, run by every layer.
//!
//! A view is one SQL query over the table `events`. It is planned once; the
//! same plan computes **aggregate states** over a micro-batch (speed layer) or
//! over Parquet files (batch layer); states from any number of runs merge, group
//! by group, and the merge is finalized into the view's rows:
//!
//! ```text
//!  events (micro-batch | Parquet) ──states()──▶ states ─┐
//!  events (another part)          ──states()──▶ states ─┼─merge()──▶ states ──finalize()──▶ rows
//!  batch view (stored Parquet)    ──────────────────────┘      (rollup() by age first, optionally)
//! ```
//!
//! States are DataFusion's own partial aggregation — each accumulator's
//! `state()` — so every aggregate with a state merges exactly through its
//! `merge_batch`, with no per-function code here. HAVING, ORDER BY and LIMIT
//! belong to the final step. A view without aggregation keeps its rows as its
//! "states" and merges by union.
//!
//! Module layout: [`compile`] plans and splits; [`input`] is the swappable leaf;
//! [`rollup`] coarsens old time buckets; [`store`] writes states to Parquet;
//! `direct` finalizes a point read's few groups without the final plan.

pub mod compile;
mod direct;
pub mod failures;
pub mod guard;
pub mod input;
pub mod oracle;
pub mod rollup;
pub mod store;

use std::sync::Arc;

use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::error::DataFusionError;
use datafusion::physical_plan::ExecutionPlan;

pub use compile::{STATE_FORMAT, compile};
pub use rollup::Rollup;

use crate::schema::EventSchema;
use serde::{Deserialize, Serialize};

/// `[[views]]`: a view is one SQL query over the table `events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewConfig {
    pub name: String,
    pub sql: String,
    /// Coarser time buckets for older data (applied by the batch layer).
    #[serde(default)]
    pub rollup: Vec<RollupConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollupConfig {
    #[serde(with = "humantime_serde")]
    pub after: std::time::Duration,
    pub bucket: String,
}

/// Errors of the view layer, each naming its view.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("view `{view}`: {message}")]
    Plan {
        view: String,
        message: String,
        hint: Option<String>,
    },
    #[error("view `{view}` cannot use {construct}: {why}")]
    Unsupported {
        view: String,
        construct: String,
        why: String,
        hint: Option<String>,
    },
    #[error("view `{view}`: invalid rollup: {reason}")]
    Rollup { view: String, reason: String },
    #[error("view `{view}`: running the view failed")]
    Exec {
        view: String,
        #[source]
        source: DataFusionError,
    },
    #[error("view `{view}`: stored states do not match the view: {detail}")]
    StateMismatch { view: String, detail: String },
    #[error("view `{view}`: could not {op} states as Parquet: {detail}")]
    Parquet {
        view: String,
        op: &'static str,
        detail: String,
    },
    /// A name the storage layout cannot hold (see [`check_name`]).
    #[error("`{shown}` is not a valid view name: {reason}")]
    Name {
        /// The name as given, shortened if long.
        shown: String,
        reason: String,
        hint: String,
    },
    #[error("internal error in the view layer")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

crate::explained!(ViewError);

impl crate::error::Explain for ViewError {
    fn hint(&self) -> Option<String> {
        match self {
            ViewError::Plan { hint, .. } | ViewError::Unsupported { hint, .. } => hint.clone(),
            ViewError::Name { hint, .. } => Some(hint.clone()),
            ViewError::StateMismatch { .. } => Some(
                "the view's SQL or the engine changed since they were written; rebuild them".into(),
            ),
            _ => None,
        }
    }

    fn sqlstate(&self) -> &'static str {
        match self {
            // feature_not_supported
            ViewError::Unsupported { .. } => "0A000",
            // syntax_error_or_access_rule_violation
            ViewError::Plan { .. } | ViewError::Rollup { .. } => "42000",
            // invalid_name
            ViewError::Name { .. } => "42602",
            _ => "XX000",
        }
    }
}

impl ViewError {
    pub(crate) fn unsupported(
        view: &str,
        construct: &str,
        why: &str,
        hint: Option<&str>,
    ) -> ViewError {
        ViewError::Unsupported {
            view: view.to_string(),
            construct: construct.to_string(),
            why: why.to_string(),
            hint: hint.map(str::to_string),
        }
    }

    /// A planning error, with a "did you mean" when a column name is off.
    pub(crate) fn plan(view: &str, e: &DataFusionError, schema: &EventSchema) -> ViewError {
        let message = e.strip_backtrace().trim().to_string();
        let hint = unknown_column(&message).and_then(|bad| {
            schema
                .suggest(&bad)
                .map(|s| {
                    if s.chars().any(|c| c.is_ascii_uppercase()) {
                        format!(
                            "did you mean `{s}`? names are case-sensitive, written as in the schema"
                        )
                    } else {
                        format!("did you mean `{s}`?")
                    }
                })
                .or_else(|| {
                    let names: Vec<_> = schema.fields().iter().map(|f| f.name.as_str()).collect();
                    Some(format!("the columns of `events` are: {}", names.join(", ")))
                })
        });
        ViewError::Plan {
            view: view.to_string(),
            message,
            hint,
        }
    }

    fn exec(view: &str, e: DataFusionError) -> ViewError {
        ViewError::Exec {
            view: view.to_string(),
            source: e,
        }
    }
}

/// The unknown name in DataFusion's "No field named X." message.
fn unknown_column(message: &str) -> Option<String> {
    let rest = message.split("No field named ").nth(1)?;
    let name = rest.split(['.', ' ']).next()?.trim_matches('"');
    let name = match rest.split_once('.') {
        // `events.x`: the qualifier is not the name.
        Some(("events", tail)) => tail.split(['.', ' ']).next()?.trim_matches('"'),
        _ => name,
    };
    (!name.is_empty()).then(|| name.to_string())
}

/// A row a view's expressions fail on: left out of that view (only), in
/// every layer. See [`View::states_excluding`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Excluded {
    /// Index of the batch, and of the row within it, in the input given.
    pub batch: usize,
    pub row: usize,
    pub error: String,
}

/// How a view's states merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewKind {
    /// GROUP BY / aggregates: states are per-group accumulator states.
    Aggregate,
    /// Filter/projection only: states are the rows; they merge by union.
    Union,
}

/// A compiled view. Cheap to share; every method takes `&self`.
#[derive(Debug)]
pub struct View {
    name: String,
    sql: String,
    /// The definition it was compiled from (published with each run, so
    /// that every node of a cluster serves the published views).
    def: ViewConfig,
    kind: ViewKind,
    events_schema: SchemaRef,
    leaf_projection: Option<Vec<usize>>,
    states_plan: Arc<dyn ExecutionPlan>,
    reduce_plan: Option<Arc<dyn ExecutionPlan>>,
    final_plan: Arc<dyn ExecutionPlan>,
    state_schema: SchemaRef,
    output_schema: SchemaRef,
    rollup: Option<Rollup>,
    fingerprint: String,
    key_columns: std::collections::HashMap<String, usize>,
    group_columns: usize,
    /// Whether finalizing keeps one row per group (no HAVING, no LIMIT).
    every_group_a_row: bool,
    /// The final plan taken apart, to finalize a few groups without it.
    direct: Option<direct::Direct>,
    task_ctx: compile::Task,
    /// Whether the view reads `_partition` and `_offset` (see [`View::needs_offsets`]).
    needs_offsets: bool,
    /// The schema a batch scan reads (string columns as `Utf8View`) and the
    /// states plan over it (see [`View::scan_schema`]).
    scan_views: Option<(SchemaRef, Arc<dyn ExecutionPlan>)>,
}

impl View {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the view's plans run (with the stores they may read).
    pub fn task_ctx(&self) -> &Arc<datafusion::execution::TaskContext> {
        &self.task_ctx
    }

    /// Lets the view's plans read files of `store` (the storage root of the
    /// master dataset), under the URL `scheme://authority` that scans name.
    pub fn register_store(&self, url: &url::Url, store: Arc<dyn object_store::ObjectStore>) {
        self.task_ctx
            .runtime_env()
            .register_object_store(url, store);
    }

    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// The definition the view was compiled from.
    pub fn def(&self) -> &ViewConfig {
        &self.def
    }

    pub fn kind(&self) -> ViewKind {
        self.kind
    }

    /// Schema of the states: group columns, then each aggregate's state columns.
    pub fn state_schema(&self) -> &SchemaRef {
        &self.state_schema
    }

    /// Schema of the view's rows.
    pub fn output_schema(&self) -> &SchemaRef {
        &self.output_schema
    }

    /// Hash of the SQL's plan, the rollup, the fields the view reads (names
    /// and types), the engine version and the state format:
    /// states stored under another fingerprint must not be merged with these.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The state column of output column `name`, if it is a group key whose
    /// filter may be applied to states before the merge (see `serving`).
    pub fn key_column(&self, name: &str) -> Option<usize> {
        let c = *self.key_columns.get(name)?;
        // A rolled-up column's stored values are not the reader's buckets yet.
        match &self.rollup {
            Some(r) if r.column() == c => None,
            _ => Some(c),
        }
    }

    /// The output columns that are group keys, in output order.
    pub fn key_names(&self) -> Vec<&str> {
        self.output_schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .filter(|n| self.key_columns.contains_key(*n))
            .collect()
    }

    /// The output columns that are group keys, with their state columns.
    pub fn key_columns(&self) -> impl Iterator<Item = (&str, usize)> {
        self.key_columns.iter().map(|(k, v)| (k.as_str(), *v))
    }

    /// How many leading state columns are group keys (all, for a union view).
    pub fn group_columns(&self) -> usize {
        self.group_columns
    }

    /// Columns of `events` the view reads (indices into the events schema).
    pub fn leaf_projection(&self) -> Option<&Vec<usize>> {
        self.leaf_projection.as_ref()
    }

    pub fn rollup(&self) -> Option<&Rollup> {
        self.rollup.as_ref()
    }

    /// States of some events (batches of the `events` schema).
    pub async fn states(&self, events: Vec<RecordBatch>) -> Result<RecordBatch, ViewError> {
        let plan = compile::with_input(&self.states_plan, Arc::new(events))
            .map_err(|e| ViewError::exec(&self.name, e))?;
        self.collect_one(plan, &self.state_schema).await
    }

    /// States of some events, leaving out every row on which the view's
    /// expressions fail (`100 / price` with `price = 0`, a failing `CAST`).
    ///
    /// Such a failure is a function of the row alone, so both layers leave
    /// out the same rows, whatever micro-batches or files they come in, and
    /// merged answers stay exact over the rows the view accepts. The happy
    /// path is one run; a failing input is bisected until each failing row is
    /// found alone (≈ 2·k·log₂(n/k) runs for k failing rows among n). Returns
    /// the states and the failing rows, as (batch index, row in that batch,
    /// error). An input that fails while both its halves succeed has no
    /// failing row (an aggregate-level failure): that error is returned.
    pub async fn states_excluding(
        &self,
        events: Vec<RecordBatch>,
    ) -> Result<(RecordBatch, Vec<Excluded>), ViewError> {
        let first = match self.states(events.clone()).await {
            Ok(s) => return Ok((s, Vec::new())),
            Err(e) => e,
        };
        // Rows are numbered across the batches; a range is sliced back out.
        let mut starts = Vec::with_capacity(events.len() + 1);
        let mut n = 0usize;
        for b in &events {
            starts.push(n);
            n += b.num_rows();
        }
        starts.push(n);
        let slice = |lo: usize, hi: usize| -> Vec<RecordBatch> {
            let mut out = Vec::new();
            for (i, b) in events.iter().enumerate() {
                let (s, e) = (starts[i], starts[i + 1]);
                let (a, z) = (lo.max(s), hi.min(e));
                if a < z {
                    out.push(b.slice(a - s, z - a));
                }
            }
            out
        };
        let locate = |row: usize| -> (usize, usize) {
            let i = starts.partition_point(|&s| s <= row) - 1;
            (i, row - starts[i])
        };
        let mut good = Vec::new();
        let mut excluded = Vec::new();
        let mut failing = vec![(0usize, n, first)];
        while let Some((lo, hi, error)) = failing.pop() {
            if hi - lo == 1 {
                let (batch, row) = locate(lo);
                excluded.push(Excluded {
                    batch,
                    row,
                    error: crate::error::chain(&error),
                });
                continue;
            }
            let mid = lo + (hi - lo) / 2;
            let mut halves_ok = 0;
            for (a, b) in [(lo, mid), (mid, hi)] {
                match self.states(slice(a, b)).await {
                    Ok(s) => {
                        good.push(s);
                        halves_ok += 1;
                    }
                    Err(e) => failing.push((a, b, e)),
                }
            }
            if halves_ok == 2 {
                return Err(error);
            }
        }
        excluded.sort_by_key(|e| (e.batch, e.row));
        let states = match good.len() {
            0 => self.states(Vec::new()).await?,
            1 => good.pop().expect("one"),
            _ => self.merge(good).await?,
        };
        Ok((states, excluded))
    }

    /// The states plan over another leaf (e.g. a Parquet scan of the master
    /// dataset). The leaf must produce the columns of `leaf_projection()`.
    pub fn states_plan_over(
        &self,
        leaf: Arc<dyn ExecutionPlan>,
    ) -> Result<Arc<dyn ExecutionPlan>, ViewError> {
        compile::with_leaf(&self.states_plan, leaf).map_err(|e| ViewError::exec(&self.name, e))
    }

    /// The states of the whole master dataset as one plan of DataFusion's
    /// built-in nodes, for a distributed engine: `leaf` (a scan of one
    /// partition per file group) → the states plan → hash repartition by the
    /// group keys into `reducers` partitions → `PartialReduce` → one partition.
    /// Every group's partial states meet in one reducer, so what comes out is
    /// what [`View::merge`] of the per-group states would give.
    pub fn distributed_states_plan(
        &self,
        leaf: Arc<dyn ExecutionPlan>,
        reducers: usize,
    ) -> Result<Arc<dyn ExecutionPlan>, ViewError> {
        compile::distributed(&self.states_plan, self.reduce_plan.as_ref(), leaf, reducers)
            .map_err(|e| ViewError::exec(&self.name, e))
    }

    /// Whether [`View::finalize`] gives one row per state row (the view has
    /// no HAVING and no LIMIT): then a view's row count is its group count.
    pub fn every_group_a_row(&self) -> bool {
        self.every_group_a_row
    }

    /// The schema a batch scan of the master dataset should read the view's
    /// columns as: [`View::events_schema`], or with its string columns as
    /// `Utf8View` when the view plans over those (see
    /// [`View::scan_states_plan_over`]).
    pub fn scan_schema(&self) -> &SchemaRef {
        self.scan_views
            .as_ref()
            .map_or(&self.events_schema, |(schema, _)| schema)
    }

    /// The states plan over a scan of [`View::scan_schema`]'s columns (in
    /// `leaf_projection()`): over string views, the states cast back to
    /// the view's state schema, equal to what [`View::states_plan_over`]
    /// computes over `Utf8`.
    pub fn scan_states_plan_over(
        &self,
        leaf: Arc<dyn ExecutionPlan>,
    ) -> Result<Arc<dyn ExecutionPlan>, ViewError> {
        match &self.scan_views {
            Some((_, plan)) => {
                compile::with_leaf(plan, leaf).map_err(|e| ViewError::exec(&self.name, e))
            }
            None => self.states_plan_over(leaf),
        }
    }

    /// [`View::scan_states_plan_over`] a leaf of several partitions, with
    /// the events hash-partitioned by the view's group keys into `k`
    /// partitions before they are aggregated: each partition's states hold
    /// groups no other partition holds, so running the plan gives merged
    /// states without a merge, and each core's hash table holds its share
    /// of the groups. `None` for a view without plain group keys.
    pub fn shuffled_states_plan(
        &self,
        leaf: Arc<dyn ExecutionPlan>,
        k: usize,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>, ViewError> {
        let states = match &self.scan_views {
            Some((_, plan)) => plan,
            None => &self.states_plan,
        };
        compile::shuffled(states, leaf, k).map_err(|e| ViewError::exec(&self.name, e))
    }

    /// Runs a plan made by [`View::states_plan_over`] and collects its states.
    pub async fn run_states_plan(
        &self,
        plan: Arc<dyn ExecutionPlan>,
    ) -> Result<RecordBatch, ViewError> {
        let states = self.collect_one(plan, &self.state_schema).await?;
        // A plan over string views casts its states back: the batch then
        // carries the state schema itself, as every merge expects.
        if states.schema() == self.state_schema {
            return Ok(states);
        }
        RecordBatch::try_new(self.state_schema.clone(), states.columns().to_vec())
            .map_err(|e| ViewError::exec(&self.name, e.into()))
    }

    /// Merges any number of state sets into one.
    pub async fn merge(&self, parts: Vec<RecordBatch>) -> Result<RecordBatch, ViewError> {
        match &self.reduce_plan {
            Some(reduce) => {
                let plan = compile::with_input(reduce, Arc::new(parts))
                    .map_err(|e| ViewError::exec(&self.name, e))?;
                self.collect_one(plan, &self.state_schema).await
            }
            None => concat_batches(&self.state_schema, &parts)
                .map_err(|e| ViewError::exec(&self.name, e.into())),
        }
    }

    /// Merges state sets and finalizes them into the view's rows (HAVING,
    /// ORDER BY and LIMIT applied after the merge).
    pub async fn finalize(&self, parts: Vec<RecordBatch>) -> Result<Vec<RecordBatch>, ViewError> {
        let plan = compile::with_input(&self.final_plan, Arc::new(parts))
            .map_err(|e| ViewError::exec(&self.name, e))?;
        datafusion::physical_plan::collect(plan, self.task_ctx.clone())
            .await
            .map_err(|e| ViewError::exec(&self.name, e))
    }

    /// Finalizes a few groups' states (a point read's): by the aggregates'
    /// accumulators and the expressions above them when the final plan is
    /// made of those alone (see [`direct`]), else through the plan. A
    /// failure on the direct path (an expression over the aggregates
    /// dividing by zero, say) is left to the plan, which reports it as any
    /// read does.
    pub async fn finalize_few(
        &self,
        parts: Vec<RecordBatch>,
    ) -> Result<Vec<RecordBatch>, ViewError> {
        if let Some(d) = &self.direct
            && let Ok(rows) = d.run(&parts)
        {
            return Ok(vec![rows]);
        }
        self.finalize(parts).await
    }

    /// Coarsens old time buckets as of `as_of_ms` (see [`rollup`]) and merges
    /// the groups that now coincide. Without a rollup, returns the states.
    pub async fn roll_up(
        &self,
        states: RecordBatch,
        as_of_ms: i64,
    ) -> Result<RecordBatch, ViewError> {
        match &self.rollup {
            None => Ok(states),
            Some(r) => {
                let (rebucketed, changed) = r
                    .apply(&states, as_of_ms)
                    .map_err(|e| ViewError::exec(&self.name, e.into()))?;
                if changed == 0 {
                    Ok(rebucketed)
                } else {
                    self.merge(vec![rebucketed]).await
                }
            }
        }
    }

    async fn collect_one(
        &self,
        plan: Arc<dyn ExecutionPlan>,
        schema: &SchemaRef,
    ) -> Result<RecordBatch, ViewError> {
        let batches = datafusion::physical_plan::collect(plan, self.task_ctx.clone())
            .await
            .map_err(|e| ViewError::exec(&self.name, e))?;
        if batches.len() == 1 {
            return Ok(batches.into_iter().next().expect("one batch"));
        }
        concat_batches(schema, &batches).map_err(|e| ViewError::exec(&self.name, e.into()))
    }

    /// The schema of `events` this view was planned against: the event
    /// fields, then `_partition` and `_offset` when it needs them.
    pub fn events_schema(&self) -> &SchemaRef {
        &self.events_schema
    }

    /// Whether the batches given to [`View::states`] must carry each event's
    /// `_partition` and `_offset` (see [`input::with_offsets`]): the view has
    /// ordered aggregates, whose ties are broken by them.
    pub fn needs_offsets(&self) -> bool {
        self.needs_offsets
    }
}

/// "a, b, c": the names of some views, for error messages.
pub fn names(views: &[Arc<View>]) -> String {
    views
        .iter()
        .map(|v| v.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Longest view name, in bytes: a Postgres identifier's limit (a name is a
/// table over the Postgres wire too), far below any file-name limit.
pub const MAX_NAME_BYTES: usize = 63;

/// Names the storage layout uses under `views/` (see the batch layer):
/// a view's files live in `views/<name>/`, so a view of one of these names
/// would collide with the published pointer (`views/CURRENT`) or the run
/// manifests (`views/runs/`). (`views/CHANGES.json` cannot collide: a name
/// has no `.`.) Compared ignoring case (a case-insensitive file system, as on
/// macOS, holds `views/current/` and `views/CURRENT` in one entry).
pub const RESERVED_NAMES: &[&str] = &["CURRENT", "runs"];

/// Names the SQL surfaces give the table of events and their catalogs: a
/// view of one of these names would hide them, or be hidden.
pub const SQL_NAMES: &[&str] = &["events", "information_schema", "pg_catalog", "public"];

/// Whether `name` can name a view: an identifier (letters, digits and `_`,
/// not starting with a digit) of at most [`MAX_NAME_BYTES`], and none of the
/// [`RESERVED_NAMES`]. Every way of defining a view goes through here: the
/// config file, `POST /v1/views`, a reload, and the changes saved by an
/// older version (see [`compile`]).
pub fn check_name(name: &str) -> Result<(), ViewError> {
    let shown = if name.len() > MAX_NAME_BYTES {
        let cut = (0..=MAX_NAME_BYTES)
            .rev()
            .find(|&i| name.is_char_boundary(i))
            .unwrap_or(0);
        format!("{}…", &name[..cut])
    } else {
        name.to_string()
    };
    let bad = |reason: String, hint: &str| {
        Err(ViewError::Name {
            shown: shown.clone(),
            reason,
            hint: hint.to_string(),
        })
    };
    let mut chars = name.chars();
    let identifier = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !identifier {
        return bad(
            "letters, digits and `_`, not starting with a digit".into(),
            "name the view like a SQL identifier, e.g. `sales_by_zipcode`",
        );
    }
    if name.len() > MAX_NAME_BYTES {
        return bad(
            format!(
                "{} bytes long; a view name is at most {MAX_NAME_BYTES}",
                name.len()
            ),
            "use a shorter name",
        );
    }
    if let Some(r) = RESERVED_NAMES.iter().find(|r| r.eq_ignore_ascii_case(name)) {
        return bad(
            format!("`{r}` is reserved by the storage layout of the batch views"),
            &format!(
                "the reserved names are {}; pick another",
                RESERVED_NAMES.join(", ")
            ),
        );
    }
    if let Some(r) = SQL_NAMES.iter().find(|r| r.eq_ignore_ascii_case(name)) {
        return bad(
            format!("`{r}` names a table or schema of the SQL surfaces"),
            &format!("{} are taken; pick another", SQL_NAMES.join(", ")),
        );
    }
    Ok(())
}

/// Compiles every configured view; the first error stops startup.
pub async fn compile_all(
    views: &[ViewConfig],
    schema: &EventSchema,
) -> Result<Vec<Arc<View>>, ViewError> {
    let mut out = Vec::with_capacity(views.len());
    for v in views {
        out.push(Arc::new(compile(v, schema).await?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
