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
    let escape = |s: &str| {
        s.replace('\\', "\\\\")
            .replace('\t', "\\t")
            .replace('\n', "\\n")
            .replace('\r', "\\r")
    };
    let mut out = schema
        .fields()
        .iter()
        .map(|f| escape(f.name()))
        .collect::<Vec<_>>()
        .join("\t");
    out.push('\n');
    let opts = FormatOptions::default();
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
                    let _ = write!(out, "{}", escape(&f.value(i).to_string()));
                }
            }
            out.push('\n');
        }
    }
    out
}
