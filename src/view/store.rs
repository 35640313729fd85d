//! States as Parquet: how the batch layer stores batch views.
//!
//! The file carries the Arrow schema (Parquet's `ARROW:schema` metadata), so
//! binary and list state columns — HLL registers, t-digest centroids,
//! DISTINCT value sets — come back with their exact types. Reading checks the
//! stored schema against the view's: states of another view, SQL or engine
//! are refused, never merged.

use bytes::Bytes;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;

use arrow::array::Array;
use arrow::compute::concat_batches;
use arrow::record_batch::RecordBatch;

use super::{View, ViewError};

/// Key of the file metadata entry holding the view's fingerprint.
pub const FINGERPRINT_KEY: &str = "lambdaflow.view.fingerprint";

impl View {
    /// Encodes states as one Parquet file, tagged with the view's fingerprint.
    pub fn states_to_parquet(&self, states: &RecordBatch) -> Result<Vec<u8>, ViewError> {
        let err = |e: datafusion::parquet::errors::ParquetError| ViewError::Parquet {
            view: self.name().to_string(),
            op: "write",
            detail: e.to_string(),
        };
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(
                ZstdLevel::try_new(1).expect("valid level"),
            ))
            .set_key_value_metadata(Some(vec![
                datafusion::parquet::file::metadata::KeyValue::new(
                    FINGERPRINT_KEY.to_string(),
                    self.fingerprint().to_string(),
                ),
            ]))
            .build();
        let mut buf = Vec::new();
        let mut w = ArrowWriter::try_new(&mut buf, self.state_schema().clone(), Some(props))
            .map_err(err)?;
        w.write(states).map_err(err)?;
        w.close().map_err(err)?;
        Ok(buf)
    }

    /// Decodes states written by [`View::states_to_parquet`] for this view.
    pub fn states_from_parquet(&self, bytes: Bytes) -> Result<RecordBatch, ViewError> {
        let err = |e: datafusion::parquet::errors::ParquetError| ViewError::Parquet {
            view: self.name().to_string(),
            op: "read",
            detail: e.to_string(),
        };
        let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(err)?;
        let stored = builder
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .and_then(|kv| kv.iter().find(|k| k.key == FINGERPRINT_KEY))
            .and_then(|k| k.value.clone());
        if stored.as_deref() != Some(self.fingerprint()) {
            return Err(ViewError::StateMismatch {
                view: self.name().to_string(),
                detail: format!(
                    "written for fingerprint {}, the view's is {}",
                    stored.as_deref().unwrap_or("(none)"),
                    self.fingerprint()
                ),
            });
        }
        let schema = builder.schema().clone();
        if schema.fields() != self.state_schema().fields() {
            return Err(ViewError::StateMismatch {
                view: self.name().to_string(),
                detail: format!(
                    "stored columns {:?} differ from the view's {:?}",
                    schema.fields().iter().map(|f| f.name()).collect::<Vec<_>>(),
                    self.state_schema()
                        .fields()
                        .iter()
                        .map(|f| f.name())
                        .collect::<Vec<_>>()
                ),
            });
        }
        let reader = builder.build().map_err(err)?;
        let mut batches = Vec::new();
        for b in reader {
            let b = b.map_err(|e| ViewError::Parquet {
                view: self.name().to_string(),
                op: "read",
                detail: e.to_string(),
            })?;
            // Same fields; adopt the view's schema object (metadata may differ).
            batches.push(
                RecordBatch::try_new(self.state_schema().clone(), b.columns().to_vec()).map_err(
                    |e| ViewError::StateMismatch {
                        view: self.name().to_string(),
                        detail: e.to_string(),
                    },
                )?,
            );
        }
        concat_batches(self.state_schema(), &batches).map_err(|e| ViewError::Parquet {
            view: self.name().to_string(),
            op: "read",
            detail: e.to_string(),
        })
    }
}

/// Finalized rows as TSV, the paper's batch-view format: a header line of
/// column names, then one line per row. Tabs, newlines and backslashes inside
/// values are escaped (`\t`, `\n`, `\\`); NULL is empty.
pub fn to_tsv(schema: &arrow::datatypes::Schema, batches: &[RecordBatch]) -> String {
    use arrow::util::display::{ArrayFormatter, FormatOptions};
    use std::fmt::Write;
    // Appends `s` escaped; most values need no escaping and are copied whole.
    fn push_escaped(out: &mut String, s: &str) {
        if !s
            .bytes()
            .any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r'))
        {
            out.push_str(s);
            return;
        }
        for c in s.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                c => out.push(c),
            }
        }
    }
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let mut out = String::with_capacity(64 + rows * 16 * schema.fields().len());
    for (j, f) in schema.fields().iter().enumerate() {
        if j > 0 {
            out.push('\t');
        }
        push_escaped(&mut out, f.name());
    }
    out.push('\n');
    let opts = FormatOptions::default();
    // One cell's text, reused: formatting allocates nothing per cell.
    let mut cell = String::new();
    for b in batches {
        let fmts: Vec<_> = b
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts).expect("every Arrow type formats"))
            .collect();
        for i in 0..b.num_rows() {
            for (j, f) in fmts.iter().enumerate() {
                if j > 0 {
                    out.push('\t');
                }
                if !b.column(j).is_null(i) {
                    cell.clear();
                    let _ = write!(cell, "{}", f.value(i));
                    push_escaped(&mut out, &cell);
                }
            }
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    #[test]
    fn tsv_escapes_what_would_break_its_rows_and_leaves_nulls_empty() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("name\tx", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ]));
        let b = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec![
                    Some("plain"),
                    Some("a\tb\nc\\d\re"),
                    None,
                ])),
                Arc::new(Int64Array::from(vec![Some(1), None, Some(-3)])),
            ],
        )
        .unwrap();
        assert_eq!(
            to_tsv(&schema, &[b]),
            "name\\tx\tn\nplain\t1\na\\tb\\nc\\\\d\\re\t\n\t-3\n"
        );
    }
}
