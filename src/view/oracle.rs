//! The independent answer: a view's SQL run directly by DataFusion over all
//! the events at once, and a comparison of result sets that knows floats.
//!
//! Tests hold every merged answer to this oracle: `merge(states(parts))`,
//! finalized, must equal `run_sql(all events)`.

use std::sync::Arc;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float32Type, Float64Type};
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::datasource::MemTable;
use datafusion::error::Result;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::schema::EventSchema;

/// Runs `sql` over `events` with a plain DataFusion session (its default
/// optimizer and parallelism), only reading identifiers as written.
pub async fn run_sql(
    schema: &EventSchema,
    sql: &str,
    events: Vec<RecordBatch>,
) -> Result<Vec<RecordBatch>> {
    let mut cfg = SessionConfig::new();
    cfg.options_mut().sql_parser.enable_ident_normalization = false;
    let ctx = SessionContext::new_with_config(cfg);
    let table = MemTable::try_new(schema.arrow().clone(), vec![events])?;
    ctx.register_table("events", Arc::new(table))?;
    ctx.sql(sql).await?.collect().await
}

/// One value of a result row.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Float(f64),
    Text(String),
}

impl Cell {
    fn key(&self) -> String {
        match self {
            Cell::Null => "\u{0}".into(),
            // Rounded, so float noise does not reorder rows.
            Cell::Float(f) => format!("{f:.6e}"),
            Cell::Text(t) => t.clone(),
        }
    }
}

/// Rows of a result, each cell as text except floats.
pub fn rows(batches: &[RecordBatch]) -> Vec<Vec<Cell>> {
    let opts = FormatOptions::default().with_null("NULL");
    let mut out = Vec::new();
    for b in batches {
        let cols: Vec<_> = b
            .columns()
            .iter()
            .map(|c| {
                (
                    c,
                    ArrayFormatter::try_new(c.as_ref(), &opts).expect("formattable"),
                )
            })
            .collect();
        for i in 0..b.num_rows() {
            out.push(
                cols.iter()
                    .map(|(c, f)| {
                        if c.is_null(i) {
                            return Cell::Null;
                        }
                        match c.data_type() {
                            DataType::Float64 => {
                                Cell::Float(c.as_primitive::<Float64Type>().value(i))
                            }
                            DataType::Float32 => {
                                Cell::Float(f64::from(c.as_primitive::<Float32Type>().value(i)))
                            }
                            _ => Cell::Text(f.value(i).to_string()),
                        }
                    })
                    .collect(),
            );
        }
    }
    out
}

/// Compares two result sets: cell by cell, floats within `rel_tol` relative
/// error; `ordered` compares in order, otherwise as multisets. The error
/// explains the first difference.
pub fn same_rows(
    got: &[RecordBatch],
    want: &[RecordBatch],
    ordered: bool,
    rel_tol: f64,
) -> std::result::Result<(), String> {
    let mut a = rows(got);
    let mut b = rows(want);
    if a.len() != b.len() {
        return Err(format!(
            "{} rows, expected {}\n got: {:?}\nwant: {:?}",
            a.len(),
            b.len(),
            a.iter().take(5).collect::<Vec<_>>(),
            b.iter().take(5).collect::<Vec<_>>()
        ));
    }
    if !ordered {
        let key = |r: &Vec<Cell>| r.iter().map(Cell::key).collect::<Vec<_>>();
        a.sort_by_key(key);
        b.sort_by_key(key);
    }
    for (i, (ra, rb)) in a.iter().zip(&b).enumerate() {
        if ra.len() != rb.len() {
            return Err(format!(
                "row {i}: {} columns, expected {}",
                ra.len(),
                rb.len()
            ));
        }
        for (j, (ca, cb)) in ra.iter().zip(rb).enumerate() {
            let ok = match (ca, cb) {
                (Cell::Float(x), Cell::Float(y)) => {
                    x == y || (x - y).abs() <= rel_tol * x.abs().max(y.abs()).max(1e-300)
                }
                _ => ca == cb,
            };
            if !ok {
                return Err(format!(
                    "row {i}, column {j}: got {ca:?}, expected {cb:?}\n got row: {ra:?}\nwant row: {rb:?}"
                ));
            }
        }
    }
    Ok(())
}
