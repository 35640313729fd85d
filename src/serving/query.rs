//! Read-only SQL over the views: each view is a table holding its merged rows,
//! all taken from one snapshot, so a query joining two views sees one instant.
//! Anything but a query is refused; memory and time are bounded.

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::DataFusionError;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};

use super::{Freshness, Serving, ServingError, Snapshot};

/// Bounds of one SQL query.
#[derive(Debug, Clone, Copy)]
pub struct SqlLimits {
    pub memory_bytes: usize,
    pub timeout: Duration,
    pub max_rows: usize,
}

impl Default for SqlLimits {
    fn default() -> Self {
        SqlLimits {
            memory_bytes: 256 << 20,
            timeout: Duration::from_secs(10),
            max_rows: 10_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(
        "only queries are allowed here: {detail}\nhint: views are read-only; send one SELECT (or WITH … SELECT)"
    )]
    NotAQuery { detail: String },
    #[error("{message}")]
    Sql { message: String },
    #[error(
        "the query ran longer than {secs} s and was stopped\nhint: filter or aggregate more, or query a smaller view"
    )]
    Timeout { secs: u64 },
    #[error(transparent)]
    Serving(#[from] ServingError),
}

/// The rows of a query and the freshness of the views it read.
#[derive(Debug)]
pub struct SqlAnswer {
    pub rows: Vec<RecordBatch>,
    pub truncated: bool,
    pub freshness: Freshness,
}

/// A view as a table of one snapshot: its rows are merged only if the query
/// reads it.
struct ViewTable {
    serving: Arc<Serving>,
    index: usize,
    snap: Arc<Snapshot>,
    schema: SchemaRef,
}

impl std::fmt::Debug for ViewTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ViewTable({}, snapshot {})",
            self.index, self.snap.version
        )
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
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        let a = self
            .serving
            .answer_at(self.index, &self.snap)
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(MemorySourceConfig::try_new_exec(
            std::slice::from_ref(&a.rows),
            self.schema.clone(),
            projection.cloned(),
        )?)
    }
}

/// Runs `sql` over the views' merged rows, all of one snapshot.
pub async fn run(
    serving: &Arc<Serving>,
    sql: &str,
    limits: SqlLimits,
) -> Result<SqlAnswer, QueryError> {
    let snap = serving.snapshot();
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_limit(limits.memory_bytes, 1.0)
        .build_arc()
        .map_err(|e| QueryError::Sql {
            message: e.to_string(),
        })?;
    let mut cfg = SessionConfig::new();
    cfg.options_mut().sql_parser.enable_ident_normalization = false;
    let ctx = SessionContext::new_with_config_rt(cfg, runtime);
    for (index, view) in serving.views().iter().enumerate() {
        let table = ViewTable {
            serving: serving.clone(),
            index,
            snap: snap.clone(),
            schema: view.output_schema().clone(),
        };
        ctx.register_table(view.name(), Arc::new(table))
            .map_err(|e| QueryError::Sql {
                message: e.to_string(),
            })?;
    }
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let df = ctx.sql_with_options(sql, options).await.map_err(|e| {
        let message = e.strip_backtrace();
        if message.contains("not supported")
            && (message.contains("DDL") || message.contains("DML") || message.contains("Statement"))
        {
            QueryError::NotAQuery { detail: message }
        } else {
            QueryError::Sql { message }
        }
    })?;
    let df = df
        .limit(0, Some(limits.max_rows + 1))
        .map_err(|e| QueryError::Sql {
            message: e.strip_backtrace(),
        })?;
    let rows = tokio::time::timeout(limits.timeout, df.collect())
        .await
        .map_err(|_| QueryError::Timeout {
            secs: limits.timeout.as_secs(),
        })?
        .map_err(|e| QueryError::Sql {
            message: e.strip_backtrace(),
        })?;
    let total: usize = rows.iter().map(|b| b.num_rows()).sum();
    let (rows, truncated) = if total > limits.max_rows {
        let mut kept = Vec::new();
        let mut left = limits.max_rows;
        for b in rows {
            if left == 0 {
                break;
            }
            let n = b.num_rows().min(left);
            kept.push(b.slice(0, n));
            left -= n;
        }
        (kept, true)
    } else {
        (rows, false)
    };
    let freshness = super::freshness(&snap);
    Ok(SqlAnswer {
        rows,
        truncated,
        freshness,
    })
}
