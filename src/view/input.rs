//! The leaf of a view's plan: a placeholder at planning time, swapped for the
//! data of each run (a micro-batch, a set of states, or a Parquet scan).
//!
//! A view is planned once, against [`EventsTable`], whose scan yields an
//! [`InputExec`] with no data but with the projection the planner chose. To run
//! the plan over some batches, the placeholder is replaced by an `InputExec`
//! holding them (same projection); the rest of the plan is untouched. That is
//! what makes the batch and speed layers run *the same plan*.

use std::fmt;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, Result, project_schema};
use datafusion::datasource::TableType;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};

/// The table `events` as the planner sees it: schema only.
#[derive(Debug)]
pub struct EventsTable {
    schema: SchemaRef,
}

impl EventsTable {
    pub fn new(schema: SchemaRef) -> EventsTable {
        EventsTable { schema }
    }
}

#[async_trait]
impl TableProvider for EventsTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        // Filters are not pushed down (the default), so they stay in the plan
        // above the leaf, whatever the leaf is; a limit is only a hint.
        Ok(Arc::new(InputExec::placeholder(
            self.schema.clone(),
            projection.cloned(),
        )?))
    }
}

/// A leaf that yields given batches, projected; without batches, a placeholder.
#[derive(Debug, Clone)]
pub struct InputExec {
    /// Schema of the batches given (before projection).
    schema: SchemaRef,
    projection: Option<Vec<usize>>,
    props: Arc<PlanProperties>,
    data: Option<Arc<Vec<RecordBatch>>>,
}

impl InputExec {
    pub fn placeholder(schema: SchemaRef, projection: Option<Vec<usize>>) -> Result<InputExec> {
        let projected = project_schema(&schema, projection.as_ref())?;
        let props = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(projected),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Ok(InputExec {
            schema,
            projection,
            props,
            data: None,
        })
    }

    /// The same leaf, now holding `batches` (of the unprojected schema).
    pub fn with_data(&self, batches: Arc<Vec<RecordBatch>>) -> InputExec {
        InputExec {
            data: Some(batches),
            ..self.clone()
        }
    }

    pub fn projection(&self) -> Option<&Vec<usize>> {
        self.projection.as_ref()
    }

    pub fn input_schema(&self) -> &SchemaRef {
        &self.schema
    }
}

impl DisplayAs for InputExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        match &self.data {
            Some(d) => write!(f, "InputExec: {} batches", d.len()),
            None => write!(f, "InputExec: placeholder"),
        }
    }
}

impl ExecutionPlan for InputExec {
    fn name(&self) -> &str {
        "InputExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.props
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        Vec::new()
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let Some(data) = &self.data else {
            return Err(DataFusionError::Internal(
                "a view plan ran without its input: the placeholder leaf was not replaced".into(),
            ));
        };
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "InputExec has one partition, asked for {partition}"
            )));
        }
        let projected = self.props.eq_properties.schema().clone();
        let batches: Vec<Result<RecordBatch>> = data
            .iter()
            .map(|b| match &self.projection {
                Some(p) => b.project(p).map_err(DataFusionError::from),
                None => Ok(b.clone()),
            })
            .collect();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            projected,
            futures::stream::iter(batches),
        )))
    }
}

/// The event schema with `_partition` (int32) and `_offset` (int64) after
/// the event fields, as the master dataset's files hold them.
pub fn with_offsets_schema(events: &SchemaRef) -> SchemaRef {
    use arrow::datatypes::{DataType, Field, Schema};
    let mut fields: Vec<Field> = events.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(
        crate::chunk::PARTITION_COLUMN,
        DataType::Int32,
        false,
    ));
    fields.push(Field::new(
        crate::chunk::OFFSET_COLUMN,
        DataType::Int64,
        false,
    ));
    Arc::new(Schema::new(fields))
}

/// Events of one partition, from `first_offset` on, with their `_partition`
/// and `_offset` columns added (for a view that [`needs_offsets`]).
///
/// [`needs_offsets`]: super::View::needs_offsets
pub fn with_offsets(batch: &RecordBatch, partition: u32, first_offset: u64) -> Result<RecordBatch> {
    use arrow::array::{Int32Array, Int64Array};
    let n = batch.num_rows();
    add_columns(
        batch,
        Int32Array::from(vec![partition as i32; n]),
        Int64Array::from_iter_values((0..n as i64).map(|i| first_offset as i64 + i)),
    )
}

/// Events of one partition at the given positions (one per row), with
/// their `_partition` and `_offset` columns added.
pub fn with_positions(
    batch: &RecordBatch,
    partition: u32,
    positions: &[u64],
) -> Result<RecordBatch> {
    use arrow::array::{Int32Array, Int64Array};
    add_columns(
        batch,
        Int32Array::from(vec![partition as i32; batch.num_rows()]),
        Int64Array::from_iter_values(positions.iter().map(|&o| o as i64)),
    )
}

fn add_columns(
    batch: &RecordBatch,
    partitions: arrow::array::Int32Array,
    offsets: arrow::array::Int64Array,
) -> Result<RecordBatch> {
    let mut cols = batch.columns().to_vec();
    cols.push(Arc::new(partitions));
    cols.push(Arc::new(offsets));
    Ok(RecordBatch::try_new(
        with_offsets_schema(&batch.schema()),
        cols,
    )?)
}
