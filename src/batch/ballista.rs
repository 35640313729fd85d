//! The batch layer on an Apache DataFusion Ballista cluster: the client that
//! submits each view's states plan as a physical plan, and the stock
//! scheduler and executor that `lambdaflow ballista scheduler|executor` start.
//!
//! ```text
//!  batch layer ──ExecuteQuery(physical plan)──▶ scheduler ──tasks──▶ executors
//!       │          GetJobStatus (50 ms)            │                  │ read the master
//!       │◀──────── partition locations ────────────┘                  │ dataset's files
//!       └──────────── Arrow Flight: the states ◀──────────────────────┘ from the root
//! ```
//!
//! The plan holds only DataFusion's built-in nodes (Parquet scan, filter,
//! projection, aggregate, repartition, coalesce), so a stock Ballista 55
//! cluster decodes and runs it: no codec of ours is needed on the cluster.
//! [`Cluster::check`] proves that at startup by round-tripping each view's
//! plan through the wire format against a stock session.
//!
//! Failures: a lost executor is Ballista's to retry. A job that fails anyway,
//! or a scheduler that cannot be reached, fails the run; the batch driver
//! reports it in `health` and publishes nothing, and the next run starts
//! afresh. A job that fails on the view's own expressions (a cast of a bad
//! value) is the one case the run survives: the batch layer then finds the
//! rows file by file, here, exactly as the local engine does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use ballista_core::client::BallistaClient;
use ballista_core::serde::BallistaPhysicalExtensionCodec;
use ballista_core::serde::protobuf::execute_query_params::Query;
use ballista_core::serde::protobuf::scheduler_grpc_client::SchedulerGrpcClient;
use ballista_core::serde::protobuf::{
    CancelJobParams, ExecuteQueryParams, GetJobMetricsParams, GetJobStatusParams, KeyValuePair,
    PartitionLocation, SuccessfulJob, execute_query_result, job_status, operator_metric,
};
use ballista_core::utils::{GrpcClientConfig, create_grpc_client_endpoint};
use datafusion::physical_plan::ExecutionPlan;
use datafusion_proto::physical_plan::AsExecutionPlan;
use datafusion_proto::protobuf::PhysicalPlanNode;
use futures::TryStreamExt;
use tonic::transport::Channel;

use super::engine::EngineError;
use super::scan;
use crate::config::BatchConfig;
use crate::master::DataFile;
use crate::runs::Compute;
use crate::view::View;

/// Parquet bytes per scan task. Each task emits its own partial states
/// (up to one row per group), which the shuffle then moves: fewer, larger
/// tasks move fewer states, while enough of them keep every executor busy.
const TASK_BYTES: u64 = 64 * 1024 * 1024;
/// At most this many scan tasks per view.
const MAX_SCAN_TASKS: usize = 4096;
/// Hash partitions of the shuffle between the two stages.
const REDUCERS: usize = 8;
/// How often the job's status is asked for while it runs.
const POLL: Duration = Duration::from_millis(50);
/// gRPC messages (plans, states batches) up to this size.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// A Ballista cluster, reached through its scheduler.
#[derive(Debug)]
pub struct Cluster {
    /// As configured: `df://host:port`.
    scheduler: String,
    /// The scheduler's gRPC endpoint: `http://host:port`.
    url: String,
    /// One Ballista session per process: the scheduler keeps its settings.
    session_id: String,
}

impl Cluster {
    pub fn new(config: &BatchConfig) -> Result<Cluster, EngineError> {
        let url = config
            .scheduler_url()
            .map_err(|e| EngineError::Config(e.into()))?;
        Ok(Cluster {
            scheduler: config.scheduler.clone().unwrap_or_default(),
            url,
            session_id: format!("lambdaflow-{}", crate::storage::writer_id()),
        })
    }

    pub fn scheduler(&self) -> &str {
        &self.scheduler
    }

    /// The plan a view's run submits, over `files`.
    fn plan(
        view: &View,
        store_url: &str,
        files: &[DataFile],
        keyed: bool,
    ) -> Result<Arc<dyn ExecutionPlan>, EngineError> {
        let refused = |detail: String| EngineError::Refused {
            view: view.name().to_string(),
            detail,
        };
        let groups = scan::balance(files, scan_tasks(files));
        let leaf = scan::parquet_leaf_groups(
            store_url,
            view.events_schema(),
            &groups,
            view.leaf_projection(),
            keyed,
        )
        .map_err(|e| refused(e.to_string()))?;
        view.distributed_states_plan(leaf, REDUCERS.min(groups.len()))
            .map_err(|e| refused(crate::error::chain(&e)))
    }

    fn encode(view: &str, plan: Arc<dyn ExecutionPlan>) -> Result<Vec<u8>, EngineError> {
        let refused = |detail: String| EngineError::Refused {
            view: view.to_string(),
            detail,
        };
        let node = PhysicalPlanNode::try_from_physical_plan(
            plan,
            &BallistaPhysicalExtensionCodec::default(),
        )
        .map_err(|e| refused(format!("its plan has no wire form: {e}")))?;
        let mut buf = Vec::new();
        node.try_encode(&mut buf)
            .map_err(|e| refused(format!("its plan has no wire form: {e}")))?;
        Ok(buf)
    }

    /// Refuses a view whose plan a stock scheduler could not decode (see
    /// [`check_plan`]), before any run.
    pub fn check(&self, view: &View, store_url: &str) -> Result<(), EngineError> {
        let probe = DataFile {
            location: "lambdaflow-check/probe.parquet".into(),
            size: 1,
            records: None,
            chunks: Vec::new(),
        };
        // Keyed: the plan with the filter of duplicates, a superset of the other.
        check_plan(view.name(), Self::plan(view, store_url, &[probe], true)?)
    }

    async fn connect(&self) -> Result<SchedulerGrpcClient<Channel>, EngineError> {
        let unreachable = |detail: String| EngineError::Unreachable {
            scheduler: self.scheduler.clone(),
            detail,
        };
        let endpoint = create_grpc_client_endpoint(self.url.clone(), Some(&grpc_config()))
            .map_err(|e| unreachable(e.to_string()))?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| unreachable(crate::error::chain(&e)))?;
        Ok(SchedulerGrpcClient::new(channel)
            .max_encoding_message_size(MAX_MESSAGE)
            .max_decoding_message_size(MAX_MESSAGE))
    }

    /// The states of `view` over `files`, computed by the cluster. Each
    /// stage's time is added to `compute`.
    pub async fn states(
        &self,
        view: &View,
        store_url: &str,
        files: &[DataFile],
        keyed: bool,
        compute: &mut Compute,
    ) -> Result<RecordBatch, EngineError> {
        let t = Instant::now();
        let plan = Self::plan(view, store_url, files, keyed)?;
        let schema = plan.schema();
        let bytes = Self::encode(view.name(), plan)?;
        let mut settings: Vec<KeyValuePair> = view
            .task_ctx()
            .session_config()
            .options()
            .entries()
            .into_iter()
            .filter_map(|e| {
                e.value.map(|value| KeyValuePair {
                    key: e.key,
                    value: Some(value),
                })
            })
            // Views plan with one partition (lambdaflow splits the work
            // itself). Sent along, it made the whole of stage 1 one task on
            // one executor, measured here: the job ran at one core's speed.
            .filter(|kv| kv.key != "datafusion.execution.target_partitions")
            .collect();
        settings.push(KeyValuePair {
            key: "ballista.job.name".into(),
            value: Some(format!("lambdaflow view {}", view.name())),
        });
        // One task per file group: groups are sized by bytes already
        // (TASK_BYTES), and a lost executor then loses one group's work.
        settings.push(KeyValuePair {
            key: "ballista.scheduler.max_partitions_per_task".into(),
            value: Some("1".into()),
        });
        compute.add("plan", t.elapsed());

        let t = Instant::now();
        let mut scheduler = self.connect().await?;
        let mut request = tonic::Request::new(ExecuteQueryParams {
            query: Some(Query::PhysicalPlan(bytes)),
            settings,
            session_id: self.session_id.clone(),
            // Unique per request: the scheduler maps replies by it.
            operation_id: format!(
                "{}-{}-{}",
                self.session_id,
                view.name(),
                chrono::Utc::now().timestamp_micros()
            ),
        });
        ballista_core::version::insert_version_header(request.metadata_mut());
        let rejected = |detail: String| EngineError::Rejected {
            scheduler: self.scheduler.clone(),
            view: view.name().to_string(),
            detail,
        };
        let reply = scheduler
            .execute_query(request)
            .await
            .map_err(|s| rejected(status_text(&s)))?
            .into_inner();
        let job = match reply.result {
            Some(execute_query_result::Result::Success(s)) => s.job_id,
            Some(execute_query_result::Result::Failure(f)) => {
                return Err(rejected(format!("{f:?}")));
            }
            None => return Err(rejected("an empty reply".into())),
        };
        let done = self
            .wait(&mut scheduler, view, &job, t, compute)
            .await
            .inspect_err(|_| {
                // Never leave a job of ours running after we gave up on it.
                let mut s = scheduler.clone();
                let job = job.clone();
                tokio::spawn(async move {
                    let _ = s.cancel_job(CancelJobParams { job_id: job }).await;
                });
            })?;

        let t = Instant::now();
        let mut batches = Vec::new();
        for location in done.partition_location {
            batches.extend(self.fetch(view, location).await?);
        }
        compute.add("fetch (Flight)", t.elapsed());
        self.stage_times(&mut scheduler, &job, compute).await;
        arrow::compute::concat_batches(&schema, &batches).map_err(|e| EngineError::Fetch {
            view: view.name().to_string(),
            executor: "(all)".into(),
            detail: e.to_string(),
        })
    }

    /// Polls the job to its end; queued and running time go to `compute`.
    async fn wait(
        &self,
        scheduler: &mut SchedulerGrpcClient<Channel>,
        view: &View,
        job: &str,
        submitted: Instant,
        compute: &mut Compute,
    ) -> Result<SuccessfulJob, EngineError> {
        let mut running_since: Option<Instant> = None;
        loop {
            let status = scheduler
                .get_job_status(GetJobStatusParams {
                    job_id: job.to_string(),
                })
                .await
                .map_err(|s| EngineError::Unreachable {
                    scheduler: self.scheduler.clone(),
                    detail: format!("while job {job} ran: {}", status_text(&s)),
                })?
                .into_inner()
                .status
                .and_then(|s| s.status);
            match status {
                None | Some(job_status::Status::Queued(_)) => {}
                Some(job_status::Status::Running(_)) => {
                    if running_since.is_none() {
                        compute.add("queued", submitted.elapsed());
                        running_since = Some(Instant::now());
                    }
                }
                Some(job_status::Status::Failed(f)) => {
                    return Err(EngineError::JobFailed {
                        job: job.to_string(),
                        view: view.name().to_string(),
                        detail: f.error,
                    });
                }
                Some(job_status::Status::Successful(s)) => {
                    match running_since {
                        Some(r) => compute.add("cluster", r.elapsed()),
                        None => compute.add("cluster", submitted.elapsed()),
                    }
                    return Ok(s);
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Reads one result partition from the executor that holds it.
    async fn fetch(
        &self,
        view: &View,
        location: PartitionLocation,
    ) -> Result<Vec<RecordBatch>, EngineError> {
        let layout = location.layout();
        let meta = location.executor_meta.unwrap_or_default();
        let failed = |detail: String| EngineError::Fetch {
            view: view.name().to_string(),
            executor: format!("{} ({}:{})", meta.id, meta.host, meta.port),
            detail,
        };
        let id = location
            .partition_id
            .ok_or_else(|| failed("the scheduler named no partition".into()))?;
        let config = grpc_config();
        let mut client = BallistaClient::try_new(
            &meta.host,
            meta.port as u16,
            MAX_MESSAGE,
            false,
            None,
            config.io_retries_times,
            config.io_retry_wait_time_ms,
            0,
            0,
        )
        .await
        .map_err(|e| failed(e.to_string()))?;
        let stream = client
            .fetch_partition(&meta.id, &id.into(), location.file_id, layout, true)
            .await
            .map_err(|e| failed(e.to_string()))?;
        stream
            .try_collect()
            .await
            .map_err(|e| failed(e.to_string()))
    }

    /// Adds each cluster stage's wall time (first task start to last task
    /// end) to `compute`, as `stage N: <its operators>`. Best effort: a
    /// scheduler that cannot say leaves them out.
    async fn stage_times(
        &self,
        scheduler: &mut SchedulerGrpcClient<Channel>,
        job: &str,
        compute: &mut Compute,
    ) {
        let Ok(metrics) = scheduler
            .get_job_metrics(GetJobMetricsParams {
                job_id: job.to_string(),
            })
            .await
        else {
            return;
        };
        for stage in metrics.into_inner().stages {
            let (mut start, mut end) = (i64::MAX, i64::MIN);
            for m in stage.operators.iter().flat_map(|o| &o.metrics) {
                match m.metric {
                    Some(operator_metric::Metric::StartTimestamp(t)) => start = start.min(t),
                    Some(operator_metric::Metric::EndTimestamp(t)) => end = end.max(t),
                    _ => {}
                }
            }
            // In data-flow order, without the shuffle's own plumbing:
            // "stage 1: DataSource→Aggregate(Partial)".
            let ops: Vec<String> = stage
                .operators
                .iter()
                .rev()
                .map(|o| {
                    let name = o.operator_type.trim_end_matches("Exec");
                    match o.operator_desc.split("mode=").nth(1) {
                        Some(mode) if name == "Aggregate" => {
                            let mode = mode.split([',', ' ']).next().unwrap_or("");
                            format!("{name}({mode})")
                        }
                        _ => name.to_string(),
                    }
                })
                .filter(|o| {
                    !matches!(
                        o.as_str(),
                        "ShuffleWriter"
                            | "SortShuffleWriter"
                            | "ShuffleReader"
                            | "UnresolvedShuffle"
                            | "Cooperative"
                            | "CoalesceBatches"
                    )
                })
                .collect();
            let name = format!("stage {}: {}", stage.stage_id, ops.join("→"));
            let took = if end >= start {
                Duration::from_nanos((end - start) as u64)
            } else {
                Duration::ZERO
            };
            compute.add(&name, took);
        }
    }
}

/// How many scan tasks a view's job over `files` gets: one per
/// [`TASK_BYTES`] of Parquet, at least two (two executors both work) and at
/// most one per file.
fn scan_tasks(files: &[DataFile]) -> usize {
    let bytes: u64 = files.iter().map(|f| f.size).sum();
    let by_size = bytes.div_ceil(TASK_BYTES) as usize;
    by_size.clamp(2, MAX_SCAN_TASKS).min(files.len()).max(1)
}

/// Refuses a plan a stock Ballista scheduler could not decode: the plan goes
/// through the wire format and back against a stock Ballista session
/// (DataFusion's built-in functions, Ballista's codec). A node of ours (a
/// progress counter, say) has no wire form; a function only this process
/// knows has no decoder on the cluster.
pub fn check_plan(view: &str, plan: Arc<dyn ExecutionPlan>) -> Result<(), EngineError> {
    let bytes = Cluster::encode(view, plan)?;
    let refused = |detail: String| EngineError::Refused {
        view: view.to_string(),
        detail,
    };
    // What the stock scheduler binary decodes with: DataFusion's and
    // Ballista's functions, local files and S3.
    let stock =
        ballista_core::object_store::state_with_s3_support().map_err(|e| refused(e.to_string()))?;
    let task_ctx = datafusion::execution::TaskContext::from(&stock);
    PhysicalPlanNode::try_decode(&bytes)
        .and_then(|n| {
            n.try_into_physical_plan(&task_ctx, &BallistaPhysicalExtensionCodec::default())
        })
        .map_err(|e| {
            refused(format!(
                "a stock Ballista scheduler cannot decode its plan: {e}"
            ))
        })?;
    Ok(())
}

/// Whether a failed job failed on the view's own expressions (deterministic:
/// the same rows fail anywhere) rather than on the cluster (executors lost
/// beyond Ballista's retries, shuffle files gone). Ballista reports only
/// text: a task's execution error fails its stage at once, with that error
/// as the reason; the cluster's own failures fail a stage after its retries,
/// "Stage N has failed K times".
pub fn failed_on_data(error: &EngineError) -> bool {
    match error {
        EngineError::JobFailed { detail, .. } => {
            detail.contains("failed due to stage")
                && !detail.contains("times, most recent failure reason")
                && !detail.to_lowercase().contains("executor")
        }
        _ => false,
    }
}

fn grpc_config() -> GrpcClientConfig {
    GrpcClientConfig {
        connect_timeout_seconds: 5,
        timeout_seconds: 60,
        tcp_keepalive_seconds: 30,
        http2_keepalive_interval_seconds: 30,
        use_tls: false,
        max_message_size: MAX_MESSAGE,
        io_retries_times: 3,
        io_retry_wait_time_ms: 200,
        initial_connection_window_size: 0,
        initial_stream_window_size: 0,
    }
}

/// A gRPC status as one line: its code and message.
fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

/// `lambdaflow ballista scheduler`: Ballista's stock scheduler, configured as
/// its own binary configures itself (S3 through the AWS environment).
pub async fn run_scheduler(
    bind: std::net::SocketAddr,
    external_host: Option<String>,
    executor_timeout: Duration,
) -> Result<(), EngineError> {
    use ballista_core::object_store::{
        session_config_with_s3_support, session_state_with_s3_support,
    };
    use ballista_scheduler::cluster::BallistaCluster;
    use ballista_scheduler::config::SchedulerConfig;
    let start = |e: ballista_core::error::BallistaError| EngineError::Start {
        role: "scheduler",
        detail: e.to_string(),
    };
    let timeout = executor_timeout.as_secs().max(2);
    let config = SchedulerConfig {
        bind_host: bind.ip().to_string(),
        bind_port: bind.port(),
        external_host: external_host.unwrap_or_else(|| bind.ip().to_string()),
        executor_timeout_seconds: timeout,
        expire_dead_executor_interval_seconds: (timeout / 3).max(1),
        no_executors_grace_period_seconds: timeout,
        // Ballista's default (`bias`) fills one executor's slots before the
        // next; its docs recommend round-robin for a single scheduler.
        task_distribution: ballista_scheduler::config::TaskDistributionPolicy::RoundRobin,
        ..SchedulerConfig::default()
    }
    .with_override_config_producer(Arc::new(session_config_with_s3_support))
    .with_override_session_builder(Arc::new(session_state_with_s3_support));
    let cluster = BallistaCluster::new_from_config(&config)
        .await
        .map_err(start)?;
    ballista_scheduler::scheduler_process::start_server(cluster, bind, Arc::new(config))
        .await
        .map_err(start)
}

/// What `lambdaflow ballista executor` runs.
#[derive(Debug, Clone)]
pub struct ExecutorArgs {
    pub scheduler: String,
    pub bind: std::net::SocketAddr,
    pub grpc_port: u16,
    pub external_host: Option<String>,
    pub concurrent_tasks: usize,
    pub work_dir: Option<std::path::PathBuf>,
    pub heartbeat: Duration,
}

/// `lambdaflow ballista executor`: Ballista's stock executor, configured as
/// its own binary configures itself (S3 through the AWS environment).
pub async fn run_executor(args: ExecutorArgs) -> Result<(), EngineError> {
    use ballista_core::object_store::{
        runtime_env_with_s3_support, session_config_with_s3_support,
    };
    use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
    let batch = BatchConfig {
        scheduler: Some(args.scheduler.clone()),
        ..BatchConfig::default()
    };
    let url = url::Url::parse(
        &batch
            .scheduler_url()
            .map_err(|e| EngineError::Config(e.into()))?,
    )
    .map_err(|e| EngineError::Config(e.into()))?;
    let config = ExecutorProcessConfig {
        bind_host: args.bind.ip().to_string(),
        external_host: Some(
            args.external_host
                .unwrap_or_else(|| args.bind.ip().to_string()),
        ),
        port: args.bind.port(),
        grpc_port: args.grpc_port,
        scheduler_host: url.host_str().unwrap_or("localhost").to_string(),
        scheduler_port: url.port().unwrap_or(50050),
        scheduler_connect_timeout_seconds: 30,
        vcores: args.concurrent_tasks.max(1),
        work_dir: args.work_dir.map(|d| d.to_string_lossy().into_owned()),
        executor_heartbeat_interval_seconds: args.heartbeat.as_secs().max(1),
        print_thread_info: false,
        override_config_producer: Some(Arc::new(session_config_with_s3_support)),
        override_runtime_producer: Some(Arc::new(runtime_env_with_s3_support)),
        ..ExecutorProcessConfig::default()
    };
    start_executor_process(Arc::new(config))
        .await
        .map_err(|e| EngineError::Start {
            role: "executor",
            detail: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::physical_plan::displayable;

    fn cluster() -> Cluster {
        Cluster::new(&BatchConfig {
            engine: crate::config::EngineKind::Ballista,
            scheduler: Some("df://127.0.0.1:50050".into()),
            ..BatchConfig::default()
        })
        .unwrap()
    }

    async fn view(sql: &str) -> View {
        let def = crate::config::ViewConfig {
            name: "v".into(),
            sql: sql.into(),
            rollup: Vec::new(),
        };
        crate::view::compile(&def, &crate::schema::EventSchema::paper())
            .await
            .unwrap()
    }

    fn files(n: usize) -> Vec<DataFile> {
        (0..n)
            .map(|i| DataFile {
                location: format!("data/master/part-{i}.parquet").into(),
                size: 1000 + i as u64,
                records: None,
                chunks: Vec::new(),
            })
            .collect()
    }

    #[tokio::test]
    async fn every_default_view_runs_on_a_stock_cluster() {
        let c = cluster();
        for def in crate::config::Config::default().views {
            let v = crate::view::compile(&def, &crate::schema::EventSchema::paper())
                .await
                .unwrap();
            c.check(&v, "file:///")
                .unwrap_or_else(|e| panic!("{}: {}", def.name, crate::error::Report::of(&e)));
        }
    }

    #[tokio::test]
    async fn the_plan_shuffles_by_the_group_keys_between_partial_and_reduce() {
        let grouped =
            view("SELECT ProductName, count(*) AS n FROM events GROUP BY ProductName").await;
        let plan = Cluster::plan(&grouped, "file:///", &files(5), false).unwrap();
        let text = displayable(plan.as_ref()).indent(false).to_string();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        assert!(lines[0].starts_with("CoalescePartitionsExec"), "{text}");
        assert!(
            lines[1].starts_with("AggregateExec: mode=PartialReduce"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("RepartitionExec: partitioning=Hash([ProductName@0]"),
            "the shuffle must be by the group key, so each group meets in one reducer:\n{text}"
        );
        assert!(
            lines[3].starts_with("AggregateExec: mode=Partial"),
            "{text}"
        );
        assert!(
            text.contains("file_groups={2 groups"),
            "one scan task per file:\n{text}"
        );

        let global = view("SELECT count(*) AS n, sum(price) AS s FROM events").await;
        let text = displayable(
            Cluster::plan(&global, "file:///", &files(3), false)
                .unwrap()
                .as_ref(),
        )
        .indent(false)
        .to_string();
        assert!(
            !text.contains("RepartitionExec"),
            "one group needs no shuffle:\n{text}"
        );
        assert!(
            text.starts_with("AggregateExec: mode=PartialReduce"),
            "{text}"
        );

        let rows = view("SELECT zipcode, price FROM events WHERE price > 95").await;
        let text = displayable(
            Cluster::plan(&rows, "file:///", &files(3), false)
                .unwrap()
                .as_ref(),
        )
        .indent(false)
        .to_string();
        assert!(
            text.starts_with("CoalescePartitionsExec") && !text.contains("Aggregate"),
            "rows merge by union: gathered, not reduced:\n{text}"
        );
    }

    #[test]
    fn one_scan_task_per_64_mib_at_least_two_at_most_one_per_file() {
        let sized = |n: usize, size: u64| -> Vec<DataFile> {
            (0..n)
                .map(|i| DataFile {
                    location: format!("f{i}").into(),
                    size,
                    records: None,
                    chunks: Vec::new(),
                })
                .collect()
        };
        // 100M events: 100 files of 8.3 MiB.
        assert_eq!(scan_tasks(&sized(100, 8_700_000)), 13);
        assert_eq!(scan_tasks(&sized(5, 1000)), 2, "two executors both work");
        assert_eq!(scan_tasks(&sized(1, 1 << 40)), 1, "a file is not split");
        assert_eq!(scan_tasks(&sized(10_000, 1 << 27)), MAX_SCAN_TASKS);
    }

    #[tokio::test]
    async fn a_node_of_ours_in_the_plan_is_refused_with_a_reason() {
        let v = view("SELECT ProductName, count(*) AS n FROM events GROUP BY ProductName").await;
        let leaf = scan::parquet_leaf(
            "file:///",
            v.events_schema(),
            &files(1),
            v.leaf_projection(),
            false,
        )
        .unwrap();
        // The local engine's progress counter exists only in this process.
        let counted = Arc::new(scan::CountingExec::new(leaf, Default::default()));
        let plan = v.distributed_states_plan(counted, 2).unwrap();
        let e = check_plan("v", plan).unwrap_err();
        let report = crate::error::Report::of(&e);
        assert_eq!(
            report.message,
            "view `v` cannot run on a stock Ballista cluster"
        );
        let detail = report.detail.unwrap();
        assert!(
            detail.contains("CountingExec"),
            "the detail names the node: {detail}"
        );
        assert!(report.hint.unwrap().contains("engine = \"local\""));
    }

    #[tokio::test]
    async fn a_function_the_cluster_does_not_know_is_refused_with_a_reason() {
        use datafusion::arrow::datatypes::DataType;
        use datafusion::logical_expr::{ColumnarValue, Volatility, create_udf};
        let ctx = datafusion::prelude::SessionContext::new();
        ctx.register_udf(create_udf(
            "lambdaflow_only",
            vec![DataType::Int64],
            DataType::Int64,
            Volatility::Immutable,
            Arc::new(|args: &[ColumnarValue]| Ok(args[0].clone())),
        ));
        let plan = ctx
            .sql("SELECT lambdaflow_only(a) AS b FROM (VALUES (1), (2)) t(a)")
            .await
            .unwrap()
            .create_physical_plan()
            .await
            .unwrap();
        let e = check_plan("v", plan).unwrap_err();
        let detail = crate::error::Report::of(&e).detail.unwrap();
        assert!(
            detail.contains("cannot decode") && detail.contains("lambdaflow_only"),
            "the detail names the function: {detail}"
        );
    }

    #[test]
    fn only_a_stage_failing_on_its_own_rows_counts_as_the_views_error() {
        let failed = |detail: &str| EngineError::JobFailed {
            job: "j".into(),
            view: "v".into(),
            detail: detail.into(),
        };
        assert!(failed_on_data(&failed(
            "Job failed due to stage 1 failed: Arrow error: Cast error: Cannot cast string 'x' to value of Int64 type\n"
        )));
        assert!(!failed_on_data(&failed(
            "Job failed due to stage 2 failed: Stage 2 has failed 4 times, most recent failure reason: FetchPartitionError\n"
        )));
        assert!(!failed_on_data(&EngineError::Unreachable {
            scheduler: "df://x".into(),
            detail: "refused".into()
        }));
    }
}
