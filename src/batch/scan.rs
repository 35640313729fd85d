//! The batch layer's leaf: a Parquet scan of master-dataset files, with a row
//! counter for progress bars.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::record_batch::RecordBatch;
use datafusion::common::Result;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::StreamExt;

use datafusion::common::ScalarValue;
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::expressions::{BinaryExpr, Column, Literal};
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;

use crate::master::{DUPLICATE_COLUMN, DataFile};
use crate::schema::EventSchema;

/// A scan of `files` yielding the columns of `schema` (a view's input: the
/// event fields, and `_partition`/`_offset` for views that need them) in
/// `projection`, typed as it says (the files' UTC-microsecond timestamps are
/// cast back).
///
/// Over a `keyed` table (`[schema] key`), the rows whose `_duplicate` is
/// true are left out (a filter on the column, read beside the projection
/// and projected away): the batch layer counts what the speed layer
/// counted. Files written before the key was set read it as null and keep
/// every row.
pub fn parquet_leaf(
    store_url: &str,
    schema: &arrow::datatypes::SchemaRef,
    files: &[DataFile],
    projection: Option<&Vec<usize>>,
    keyed: bool,
) -> Result<Arc<dyn ExecutionPlan>> {
    parquet_leaf_groups(store_url, schema, &[files.to_vec()], projection, keyed)
}

/// [`parquet_leaf`] with one output partition per group of files.
pub fn parquet_leaf_groups(
    store_url: &str,
    schema: &arrow::datatypes::SchemaRef,
    groups: &[Vec<DataFile>],
    projection: Option<&Vec<usize>>,
    keyed: bool,
) -> Result<Arc<dyn ExecutionPlan>> {
    if !keyed {
        return plain_leaf(store_url, schema, groups, projection);
    }
    let n = schema.fields().len();
    let mut fields = schema.fields().to_vec();
    fields.push(Arc::new(arrow::datatypes::Field::new(
        DUPLICATE_COLUMN,
        arrow::datatypes::DataType::Boolean,
        true,
    )));
    let table = Arc::new(arrow::datatypes::Schema::new(fields));
    let wanted: Vec<usize> = projection.cloned().unwrap_or_else(|| (0..n).collect());
    let mut read = wanted.clone();
    read.push(n);
    let scan = plain_leaf(store_url, &table, groups, Some(&read))?;
    let dup = Arc::new(Column::new(DUPLICATE_COLUMN, wanted.len()));
    let not_dup = Arc::new(BinaryExpr::new(
        dup,
        Operator::IsDistinctFrom,
        Arc::new(Literal::new(ScalarValue::Boolean(Some(true)))),
    ));
    let filter = Arc::new(FilterExec::try_new(not_dup, scan)?);
    let out = filter.schema();
    let exprs: Vec<(Arc<dyn PhysicalExpr>, String)> = (0..wanted.len())
        .map(|i| {
            let name = out.field(i).name().clone();
            (
                Arc::new(Column::new(&name, i)) as Arc<dyn PhysicalExpr>,
                name,
            )
        })
        .collect();
    Ok(Arc::new(ProjectionExec::try_new(exprs, filter)?))
}

fn plain_leaf(
    store_url: &str,
    schema: &arrow::datatypes::SchemaRef,
    groups: &[Vec<DataFile>],
    projection: Option<&Vec<usize>>,
) -> Result<Arc<dyn ExecutionPlan>> {
    let source = Arc::new(ParquetSource::new(schema.clone()));
    let groups = groups
        .iter()
        .map(|files| {
            FileGroup::new(
                files
                    .iter()
                    .map(|f| PartitionedFile::new(f.location.to_string(), f.size))
                    .collect(),
            )
        })
        .collect();
    let config = FileScanConfigBuilder::new(ObjectStoreUrl::parse(store_url)?, source)
        .with_file_groups(groups)
        .with_projection_indices(projection.cloned())?
        .build();
    Ok(DataSourceExec::from_data_source(config))
}

/// `files` in at most `k` groups of about equal bytes (the biggest file to
/// the lightest group, in turn): one scan task per group.
pub fn balance(files: &[DataFile], k: usize) -> Vec<Vec<DataFile>> {
    let k = k.min(files.len()).max(1);
    let mut groups: Vec<(u64, Vec<DataFile>)> = vec![(0, Vec::new()); k];
    let mut files = files.to_vec();
    files.sort_by_key(|f| std::cmp::Reverse(f.size));
    for f in files {
        let g = groups.iter_mut().min_by_key(|g| g.0).expect("k ≥ 1");
        g.0 += f.size;
        g.1.push(f);
    }
    groups.into_iter().map(|(_, g)| g).collect()
}

/// Passes batches through, adding their rows to a counter.
#[derive(Debug)]
pub struct CountingExec {
    input: Arc<dyn ExecutionPlan>,
    rows: Arc<AtomicU64>,
}

impl CountingExec {
    pub fn new(input: Arc<dyn ExecutionPlan>, rows: Arc<AtomicU64>) -> CountingExec {
        CountingExec { input, rows }
    }
}

impl DisplayAs for CountingExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "CountingExec")
    }
}

impl ExecutionPlan for CountingExec {
    fn name(&self) -> &str {
        "CountingExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(CountingExec {
            input: children.swap_remove(0),
            rows: self.rows.clone(),
        }))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let rows = self.rows.clone();
        let stream = self.input.execute(partition, context)?;
        let schema = stream.schema();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            schema,
            stream.map(move |b| {
                if let Ok(b) = &b {
                    rows.fetch_add(b.num_rows() as u64, Ordering::Relaxed);
                }
                b
            }),
        )))
    }
}

/// Every event of one master-dataset file, typed as the event schema says,
/// followed by its `_partition` and `_offset` columns: what the batch layer
/// needs to name the rows a view fails on.
pub async fn read_with_offsets(
    store_url: &str,
    ctx: &Arc<TaskContext>,
    events: &EventSchema,
    file: &DataFile,
    keyed: bool,
) -> Result<Vec<RecordBatch>> {
    let schema = crate::view::input::with_offsets_schema(events.arrow());
    let plan = parquet_leaf(store_url, &schema, std::slice::from_ref(file), None, keyed)?;
    datafusion::physical_plan::collect(plan, ctx.clone()).await
}
