//! Read-only SQL over the views: each view is a table holding its merged rows,
//! all taken from one snapshot, so a query joining two views sees one instant.
//! Anything but a query is refused.
//!
//! Everything a query does is inside its budget: it runs on the query pool
//! (its own runtime, a bounded number at once, a deadline — see [`pool`]),
//! the merged rows of each view it reads are counted once in its memory
//! pool, nothing spills to disk, every value a function builds is bounded
//! (see [`bounded`]), the statement's size and depth are checked before it
//! is parsed (see [`guard`]), and the reply is encoded there too, up to a
//! row and a byte limit.
//!
//! [`bounded`]: super::bounded
//! [`guard`]: super::guard
//!
//! [`pool`]: super::pool

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::DataFusionError;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};
use futures::StreamExt;

use super::pool::{PoolError, QueryPool};
use super::{Answer, Freshness, Serving, ServingError, Snapshot};

/// Bounds of one SQL query.
#[derive(Debug, Clone, Copy)]
pub struct SqlLimits {
    pub memory_bytes: usize,
    pub timeout: Duration,
    pub max_rows: usize,
    /// The rows of the reply, encoded as JSON, at most.
    pub max_bytes: usize,
}

impl Default for SqlLimits {
    fn default() -> Self {
        SqlLimits {
            memory_bytes: 256 << 20,
            timeout: Duration::from_secs(10),
            max_rows: 10_000,
            max_bytes: 16 << 20,
        }
    }
}

pub use super::bounded::MAX_VALUE_BYTES;
/// The database the views are in, as SQL and Postgres clients see it
/// (`lambdaflow.public.sales_by_zipcode`).
pub const CATALOG: &str = "lambdaflow";

/// Rows per batch inside a query: views are small, and a small batch keeps
/// a wide row's batch small too.
const BATCH_ROWS: usize = 256;
/// Rows encoded between checks of the reply's size.
const ENCODE_ROWS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("only queries are allowed here: {detail}")]
    NotAQuery { detail: String },
    #[error("{message}")]
    Sql {
        message: String,
        /// The SQLSTATE of the error's class (syntax, unknown table, …).
        sqlstate: &'static str,
    },
    #[error("the query needs more memory than its limit of {limit}: {detail}")]
    Memory {
        limit: bytesize::ByteSize,
        detail: String,
    },
    #[error("{0}")]
    Guard(#[from] crate::view::guard::GuardError),
    #[error("{0}")]
    Pool(#[from] PoolError),
    #[error("{0}")]
    Serving(#[from] ServingError),
}

crate::explained!(QueryError);

impl crate::error::Explain for QueryError {
    fn hint(&self) -> Option<String> {
        match self {
            QueryError::NotAQuery { .. } => {
                Some("views are read-only; send one SELECT (or WITH … SELECT)".into())
            }
            QueryError::Memory { .. } => {
                Some("filter or aggregate more, or select fewer columns".into())
            }
            _ => None,
        }
    }

    fn sqlstate(&self) -> &'static str {
        match self {
            // read_only_sql_transaction
            QueryError::NotAQuery { .. } => "25006",
            QueryError::Sql { sqlstate, .. } => sqlstate,
            // out_of_memory
            QueryError::Memory { .. } => "53200",
            // The cause's (found in the chain).
            _ => "XX000",
        }
    }
}

/// The SQLSTATE class of a DataFusion error: what a Postgres client
/// branches on.
fn sqlstate_of(e: &DataFusionError) -> &'static str {
    let text = e.to_string();
    match e.find_root() {
        // syntax_error
        DataFusionError::SQL(..) => "42601",
        // undefined_table, undefined_column
        DataFusionError::Plan(_) if text.contains("table") && text.contains("not found") => "42P01",
        DataFusionError::SchemaError(..) => "42703",
        // feature_not_supported
        DataFusionError::NotImplemented(_) => "0A000",
        // syntax_error_or_access_rule_violation
        DataFusionError::Plan(_) => "42000",
        // data_exception
        DataFusionError::Execution(_) | DataFusionError::ArrowError(..) => "22000",
        _ => "XX000",
    }
}

impl QueryError {
    /// An error of planning: a statement that is not a query is refused
    /// as such.
    pub fn from_planning(e: DataFusionError, limits: &SqlLimits) -> QueryError {
        let message = e.strip_backtrace();
        if message.contains("not supported")
            && (message.contains("DDL") || message.contains("DML") || message.contains("Statement"))
        {
            QueryError::NotAQuery { detail: message }
        } else {
            QueryError::from_df(e, limits)
        }
    }

    pub fn from_df(e: DataFusionError, limits: &SqlLimits) -> QueryError {
        let message = e.strip_backtrace();
        if matches!(e.find_root(), DataFusionError::ResourcesExhausted(_)) {
            return QueryError::Memory {
                limit: bytesize::ByteSize::b(limits.memory_bytes as u64),
                detail: message,
            };
        }
        if let DataFusionError::External(inner) = e.find_root()
            && let Some(s) = inner.downcast_ref::<ServingError>()
        {
            use crate::error::Explain;
            return QueryError::Sql {
                // With its causes: a view's error no longer repeats its
                // source in its own text.
                message: crate::error::chain(s),
                sqlstate: s.sqlstate(),
            };
        }
        QueryError::Sql {
            sqlstate: sqlstate_of(&e),
            message,
        }
    }
}

/// The reply of a query: its rows as a JSON array (encoded inside the
/// query's budget), and the freshness of the views it read.
#[derive(Debug)]
pub struct SqlAnswer {
    pub columns: SchemaRef,
    /// A JSON array of row objects.
    pub rows_json: Vec<u8>,
    pub rows: usize,
    pub truncated: bool,
    pub freshness: Freshness,
}

/// The merged rows of each view a query read, merged once however often
/// the query names the view, and counted in the query's memory pool.
#[derive(Default)]
struct Merged {
    answers: HashMap<usize, (Arc<Answer>, MemoryReservation)>,
}

/// The snapshot a query reads, pinned in its session's config: every view
/// it names is read from this one snapshot, and merged once.
struct Pinned {
    snap: Arc<Snapshot>,
    merged: tokio::sync::Mutex<Merged>,
}

/// A view as a table: its rows are those of the snapshot pinned in the
/// session that scans it ([`Catalog::session`]), merged only if the query
/// reads it. A session with no snapshot can plan over it, not run.
struct ViewTable {
    serving: Arc<Serving>,
    index: usize,
    schema: SchemaRef,
}

impl std::fmt::Debug for ViewTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ViewTable({})", self.index)
    }
}

#[async_trait::async_trait]
impl TableProvider for ViewTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        let pinned = state.config().get_extension::<Pinned>().ok_or_else(|| {
            DataFusionError::Internal("a view was scanned outside a query's session".into())
        })?;
        let mut merged = pinned.merged.lock().await;
        let a = match merged.answers.get(&self.index) {
            Some((a, _)) => a.clone(),
            None => {
                let a = self
                    .serving
                    .answer_at(self.index, &pinned.snap)
                    .await
                    .map_err(|e| DataFusionError::External(Box::new(e)))?;
                let bytes = held_bytes(&a.rows);
                let reservation = MemoryConsumer::new(format!("view {}", self.index))
                    .register(&state.runtime_env().memory_pool);
                reservation.try_grow(bytes)?;
                merged.answers.insert(self.index, (a.clone(), reservation));
                a
            }
        };
        drop(merged);
        Ok(MemorySourceConfig::try_new_exec(
            std::slice::from_ref(&a.rows),
            self.schema.clone(),
            projection.cloned(),
        )?)
    }
}

/// The memory `batches` hold, each allocation counted once: a view's
/// merged rows are slices of one aggregation's output, and each slice's
/// `get_array_memory_size` is the whole output's (red team: a 24 MB view
/// was charged 2.8 GB, and SQL over it refused).
pub(crate) fn held_bytes(batches: &[RecordBatch]) -> usize {
    fn walk(
        data: &arrow::array::ArrayData,
        seen: &mut std::collections::HashSet<usize>,
        total: &mut usize,
    ) {
        let buffers = data
            .buffers()
            .iter()
            .chain(data.nulls().map(|n| n.buffer()));
        for b in buffers {
            if seen.insert(b.data_ptr().as_ptr() as usize) {
                *total += b.capacity();
            }
        }
        for child in data.child_data() {
            walk(child, seen, total);
        }
    }
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    for b in batches {
        for c in b.columns() {
            walk(&c.to_data(), &mut seen, &mut total);
        }
    }
    total
}

/// The views as tables, planned once: a session per query is this
/// context's state with the query's snapshot and limits.
pub struct Catalog {
    base: SessionContext,
    /// View name → the index its table reads, as registered.
    tables: std::sync::Mutex<HashMap<String, usize>>,
}

impl Catalog {
    /// The views of `serving` as tables of `catalog.public`, with the
    /// bounded value builders.
    pub fn new(serving: &Arc<Serving>, catalog: &str) -> Catalog {
        let mut cfg = SessionConfig::new()
            .with_batch_size(BATCH_ROWS)
            .with_default_catalog_and_schema(catalog, "public")
            // What SQL clients introspect (Grafana lists tables from it).
            .with_information_schema(true);
        // Column names are as the views spell them (`ProductName`).
        cfg.options_mut().sql_parser.enable_ident_normalization = false;
        let base = SessionContext::new_with_config(cfg);
        super::bounded::install(&base);
        let catalog = Catalog {
            base,
            tables: Default::default(),
        };
        catalog.sync(serving);
        catalog
    }

    /// Brings the tables to the views served now: a new view's table is
    /// added, a changed view's replaced (same name, its new version and
    /// columns), a dropped view's removed.
    pub fn sync(&self, serving: &Arc<Serving>) {
        let mut tables = self.tables.lock().expect("catalog tables");
        let live = serving.live();
        for (index, view) in &live {
            if tables.get(view.name()) == Some(index) {
                continue;
            }
            let table = ViewTable {
                serving: serving.clone(),
                index: *index,
                schema: view.output_schema().clone(),
            };
            let _ = self.base.deregister_table(view.name());
            self.base
                .register_table(view.name(), Arc::new(table))
                .expect("view names are unique (checked when views are compiled)");
            tables.insert(view.name().to_string(), *index);
        }
        tables.retain(|name, _| {
            let keep = live.iter().any(|(_, v)| v.name() == name);
            if !keep {
                let _ = self.base.deregister_table(name.as_str());
            }
            keep
        });
    }

    /// A catalog planning in `ctx` (made from [`Catalog::context`], with
    /// more tables or functions).
    pub fn from_context(ctx: SessionContext) -> Catalog {
        Catalog {
            base: ctx,
            tables: Default::default(),
        }
    }

    /// The context to plan in (and to add tables or functions to, before
    /// the first query).
    pub fn context(&self) -> &SessionContext {
        &self.base
    }

    /// The session a query runs in: its memory limit, no spill, and the
    /// views as tables of `snap`.
    pub fn session(
        &self,
        snap: &Arc<Snapshot>,
        limits: &SqlLimits,
    ) -> Result<SessionContext, DataFusionError> {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(limits.memory_bytes, 1.0)
            .with_disk_manager_builder(
                DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
            )
            .build_arc()?;
        let state = self.base.state();
        // The catalog exists: building a state must not replace it with a
        // new, empty one (the catalog list is shared with the base).
        let config = state
            .config()
            .clone()
            .with_create_default_catalog_and_schema(false)
            .with_extension(Arc::new(Pinned {
                snap: snap.clone(),
                merged: tokio::sync::Mutex::new(Merged::default()),
            }));
        let state = SessionStateBuilder::new_from_existing(state)
            .with_config(config)
            .with_runtime_env(runtime)
            .build();
        Ok(SessionContext::new_with_state(state))
    }
}

/// What a query may be: no DDL, DML or statements.
pub fn read_only() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// Runs `sql` over the views' merged rows, all of one snapshot, on the
/// query pool and within `limits`.
pub async fn run(
    serving: &Arc<Serving>,
    catalog: &Arc<Catalog>,
    pool: &QueryPool,
    sql: &str,
    limits: SqlLimits,
) -> Result<SqlAnswer, QueryError> {
    let (serving, catalog, sql) = (serving.clone(), catalog.clone(), sql.to_string());
    pool.run(limits.timeout, async move {
        run_here(&serving, &catalog, &sql, limits).await
    })
    .await?
}

async fn run_here(
    serving: &Arc<Serving>,
    catalog: &Catalog,
    sql: &str,
    limits: SqlLimits,
) -> Result<SqlAnswer, QueryError> {
    // Size and depth first: everything after this recurses over the tree.
    crate::view::guard::check_on(sql, crate::view::guard::Surface::Http)?;
    // Views may have changed since the last query.
    catalog.sync(serving);
    let snap = serving.snapshot();
    let ctx = catalog
        .session(&snap, &limits)
        .map_err(|e| QueryError::from_df(e, &limits))?;
    let df = ctx
        .sql_with_options(sql, read_only())
        .await
        .map_err(|e| QueryError::from_planning(e, &limits))?;
    // EXPLAIN must stay the root of its plan; its rows are few.
    let explain = matches!(
        df.logical_plan(),
        datafusion::logical_expr::LogicalPlan::Explain(_)
            | datafusion::logical_expr::LogicalPlan::Analyze(_)
    );
    let df = if explain {
        df
    } else {
        df.limit(0, Some(limits.max_rows + 1))
            .map_err(|e| QueryError::from_df(e, &limits))?
    };
    let columns: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let mut stream = df
        .execute_stream()
        .await
        .map_err(|e| QueryError::from_df(e, &limits))?;
    let mut reply = Reply::new(limits);
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| QueryError::from_df(e, &limits))?;
        if !reply.push(&batch)? {
            break;
        }
    }
    let (rows_json, rows, truncated) = reply.finish()?;
    Ok(SqlAnswer {
        columns,
        rows_json,
        rows,
        truncated,
        freshness: super::freshness(&snap),
    })
}

/// A reply's rows, encoded as they stream in, up to the row and byte limits.
pub struct Reply {
    limits: SqlLimits,
    writer: arrow::json::ArrayWriter<Vec<u8>>,
    rows: usize,
    truncated: bool,
}

impl Reply {
    pub fn new(limits: SqlLimits) -> Reply {
        Reply {
            limits,
            writer: arrow::json::ArrayWriter::new(Vec::new()),
            rows: 0,
            truncated: false,
        }
    }

    /// Encodes `batch`; false once a limit is reached (the rest is dropped
    /// and the reply marked truncated). The rows encoded, with the closing
    /// `]`, stay within `max_bytes`: a block that crosses the bound is taken
    /// back and encoded again a row at a time, up to the last row that fits
    /// (a row over the bound alone is left out, and the reply truncated).
    pub fn push(&mut self, batch: &RecordBatch) -> Result<bool, QueryError> {
        let encode = |e: arrow::error::ArrowError| QueryError::Sql {
            message: format!("could not encode the rows: {e}"),
            sqlstate: "XX000",
        };
        // Drops what was encoded past `before`: the writer's rows are
        // `[` row (`,` row)*, so a cut at a row's end leaves a valid prefix
        // (and a cut to nothing, a new writer).
        let take_back = |w: &mut arrow::json::ArrayWriter<Vec<u8>>, before: usize| {
            if before == 0 {
                let mut buf = std::mem::take(w.get_mut());
                buf.clear();
                *w = arrow::json::ArrayWriter::new(buf);
            } else {
                w.get_mut().truncate(before);
            }
        };
        // The encoded rows and the closing `]` fit.
        let max = self.limits.max_bytes;
        let fits = |w: &arrow::json::ArrayWriter<Vec<u8>>| w.get_ref().len() < max;
        let mut at = 0;
        while at < batch.num_rows() {
            // Once truncated, no later (smaller) row may follow the gap.
            if self.truncated || self.rows >= self.limits.max_rows || !fits(&self.writer) {
                self.truncated = true;
                return Ok(false);
            }
            let n = ENCODE_ROWS
                .min(batch.num_rows() - at)
                .min(self.limits.max_rows - self.rows);
            let before = self.writer.get_ref().len();
            self.writer.write(&batch.slice(at, n)).map_err(encode)?;
            if !fits(&self.writer) {
                take_back(&mut self.writer, before);
                for r in at..at + n {
                    let before = self.writer.get_ref().len();
                    self.writer.write(&batch.slice(r, 1)).map_err(encode)?;
                    if !fits(&self.writer) {
                        take_back(&mut self.writer, before);
                        self.truncated = true;
                        return Ok(false);
                    }
                    self.rows += 1;
                }
            } else {
                self.rows += n;
            }
            at += n;
        }
        Ok(true)
    }

    /// The JSON array, its row count, and whether rows were left out.
    pub fn finish(mut self) -> Result<(Vec<u8>, usize, bool), QueryError> {
        self.writer.finish().map_err(|e| QueryError::Sql {
            message: format!("could not encode the rows: {e}"),
            sqlstate: "XX000",
        })?;
        let mut json = self.writer.into_inner();
        if json.is_empty() {
            json.extend_from_slice(b"[]");
        }
        Ok((json, self.rows, self.truncated))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};

    /// A view's merged rows are slices of one output: their memory is the
    /// output's once, not once per slice (red team: 2.8 GB charged for a
    /// 24 MB view, and its SQL refused).
    #[test]
    fn slices_of_one_batch_hold_its_memory_once() {
        let n = 1_000_000;
        let build = || {
            RecordBatch::try_from_iter([
                (
                    "k",
                    Arc::new(Int64Array::from_iter_values(0..n)) as arrow::array::ArrayRef,
                ),
                (
                    "s",
                    Arc::new(StringArray::from_iter_values(
                        (0..n).map(|i| format!("product{}", i % 97)),
                    )) as arrow::array::ArrayRef,
                ),
            ])
            .unwrap()
        };
        let whole = build();
        let slices: Vec<RecordBatch> = (0..n as usize)
            .step_by(8192)
            .map(|at| whole.slice(at, 8192.min(n as usize - at)))
            .collect();
        let once = held_bytes(std::slice::from_ref(&whole));
        assert_eq!(
            held_bytes(&slices),
            once,
            "{} slices hold the whole batch's buffers, counted once",
            slices.len()
        );
        let naive: usize = slices.iter().map(|b| b.get_array_memory_size()).sum();
        assert!(
            naive > 100 * once,
            "each slice reports the whole batch ({naive} bytes against {once})"
        );
        // Two batches that share nothing hold both.
        assert_eq!(held_bytes(&[whole, build()]), 2 * once);
    }
}
