//! Read-only SQL over the views: each view is a table holding its merged rows,
//! all taken from one snapshot, so a query joining two views sees one instant.
//! Anything but a query is refused; memory and time are bounded.

use std::sync::Arc;
use std::time::Duration;

use arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SQLOptions, SessionConfig, SessionContext};

use super::{Answer, Freshness, Serving, ServingError};

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

/// Runs `sql` over every view's merged rows of the current snapshot.
pub async fn run(
    serving: &Arc<Serving>,
    sql: &str,
    limits: SqlLimits,
) -> Result<SqlAnswer, QueryError> {
    let snap = serving.snapshot();
    let mut answers: Vec<Arc<Answer>> = Vec::with_capacity(serving.views().len());
    for i in 0..serving.views().len() {
        let a = serving.answer(i).await?;
        // One instant for every table: recompute if the cache moved on.
        let a = if a.freshness.snapshot == snap.version {
            a
        } else {
            Arc::new(serving.compute(i, &snap).await?)
        };
        answers.push(a);
    }
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_limit(limits.memory_bytes, 1.0)
        .build_arc()
        .map_err(|e| QueryError::Sql {
            message: e.to_string(),
        })?;
    let mut cfg = SessionConfig::new();
    cfg.options_mut().sql_parser.enable_ident_normalization = false;
    let ctx = SessionContext::new_with_config_rt(cfg, runtime);
    for (view, a) in serving.views().iter().zip(&answers) {
        let table =
            MemTable::try_new(view.output_schema().clone(), vec![a.rows.clone()]).map_err(|e| {
                QueryError::Sql {
                    message: e.to_string(),
                }
            })?;
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
    let freshness = answers
        .first()
        .map(|a| a.freshness.clone())
        .unwrap_or_else(|| Freshness {
            run: None,
            h: snap.h(),
            realtime: snap.realtime_end.clone(),
            batch_as_of_ms: None,
            batch_age_ms: None,
            realtime_age_ms: 0,
            snapshot: snap.version,
        });
    Ok(SqlAnswer {
        rows,
        truncated,
        freshness,
    })
}
