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
