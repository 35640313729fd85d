//! The HTTP API: what producers and dashboards talk to.
//!
//! ```text
//!  POST /v1/events        NDJSON in → {accepted, rejected, offsets, errors}
//!  GET  /v1/views         names, columns, freshness
//!  GET  /v1/views/{name}  merged rows (?COL=VAL filters, &limit=N) + freshness
//!  POST /v1/sql           read-only SQL over the views (each view is a table)
//!  GET  /v1/status        every layer's watermarks, lag and last run
//!  GET  /metrics          Prometheus text
//!  POST /v1/batch/run     start a batch cycle now (instead of after the pause)
//! ```
//!
//! Errors answer with JSON `{"error": …, "hint": …}` and a status that tells a
//! client what to do: 400 fix the request, 413 split it, 503 retry after
//! `Retry-After`, 507 the server's disk is full.

mod events;
mod views;

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::node::{BatchStatus, Layers};
use crate::stream::Ingest;

/// What the handlers share.
pub struct ApiState {
    pub ingest: Arc<Ingest>,
    /// The master dataset and batch layer, when the node runs them.
    pub layers: Option<Arc<Layers>>,
    /// Largest accepted request body, in bytes.
    pub max_body: usize,
    /// Bodies being received or decoded at once; beyond it requests get 503.
    pub in_flight: Arc<Semaphore>,
    pub query_latency: crate::metrics::Histogram,
    pub sql_latency: crate::metrics::Histogram,
}

impl ApiState {
    pub fn new(
        ingest: Arc<Ingest>,
        max_body: usize,
        max_in_flight: usize,
        layers: Option<Arc<Layers>>,
    ) -> ApiState {
        ApiState {
            ingest,
            layers,
            max_body,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            query_latency: Default::default(),
            sql_latency: Default::default(),
        }
    }
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/events", post(events::post_events))
        .route("/v1/status", get(status))
        .route("/v1/views", get(views::list_views))
        .route("/v1/views/{name}", get(views::get_view))
        .route("/v1/sql", post(views::post_sql))
        .route("/metrics", get(views::metrics))
        .route("/v1/batch/run", post(run_batch))
        .with_state(state)
}

/// An error answer: status, message, optional hint and `Retry-After`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub retry_after: Option<u32>,
    /// Extra JSON fields (e.g. what of the request was stored anyway).
    pub detail: Option<serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            retry_after: None,
            detail: None,
        }
    }

    pub fn retry_after(mut self, secs: u32) -> ApiError {
        self.retry_after = Some(secs);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Library errors put their hint on a line of its own; JSON gets a field.
        let (error, hint) = match self.message.split_once("\nhint: ") {
            Some((e, h)) => (e.to_string(), Some(h.to_string())),
            None => (self.message, None),
        };
        let mut body = serde_json::json!({ "error": error });
        if let Some(h) = hint {
            body["hint"] = h.into();
        }
        if let Some(serde_json::Value::Object(extra)) = self.detail {
            for (k, v) in extra {
                body[k] = v;
            }
        }
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

#[derive(Serialize)]
struct Status {
    partitions: Vec<PartitionStatus>,
    ingest: IngestStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    master: Option<crate::master::Coverage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    batch: Option<BatchStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    speed: Option<SpeedStatus>,
}

#[derive(Serialize)]
struct SpeedStatus {
    micro_batches: u64,
    events: u64,
    chunks_closed: u64,
    mean_micro_batch_us: Option<u64>,
    realtime_age_ms: i64,
}

/// One partition across the layers: log extent, archived and published coverage.
#[derive(Serialize)]
struct PartitionStatus {
    #[serde(flatten)]
    log: crate::stream::log::PartitionStats,
    /// End of the last chunk in the master dataset.
    #[serde(skip_serializing_if = "Option::is_none")]
    archived: Option<u64>,
    /// `H[p]` of the published batch run.
    #[serde(skip_serializing_if = "Option::is_none")]
    published: Option<u64>,
    /// `R[p]`: events below it are in realtime answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    realtime: Option<u64>,
}

#[derive(Serialize)]
struct IngestStatus {
    requests: u64,
    accepted: u64,
    rejected: u64,
    bytes: u64,
    dead_letters_written: u64,
}

async fn status(
    axum::extract::State(state): axum::extract::State<Arc<ApiState>>,
) -> Json<impl Serialize> {
    use std::sync::atomic::Ordering::Relaxed;
    let c = &state.ingest.counters;
    let master = state.layers.as_ref().map(|l| l.master.coverage());
    let batch = state
        .layers
        .as_ref()
        .map(|l| l.batch_status.lock().expect("status lock").clone());
    let snap = state.layers.as_ref().map(|l| l.serving.snapshot());
    let speed = state.layers.as_ref().map(|l| {
        let now = chrono::Utc::now().timestamp_millis();
        SpeedStatus {
            micro_batches: l.speed.micro.count(),
            events: l.speed.events.load(Relaxed),
            chunks_closed: l.speed.chunks_closed.load(Relaxed),
            mean_micro_batch_us: l.speed.micro.mean().map(|d| d.as_micros() as u64),
            realtime_age_ms: snap
                .as_ref()
                .and_then(|s| s.realtime_at_ms.iter().copied().max())
                .filter(|&t| t > 0)
                .map_or(0, |t| now - t),
        }
    });
    let partitions = state
        .ingest
        .log()
        .stats()
        .into_iter()
        .map(|log| {
            let p = log.partition as usize;
            PartitionStatus {
                archived: master.as_ref().and_then(|m| m.h.get(p).copied()),
                published: batch
                    .as_ref()
                    .and_then(|b| b.published.as_ref())
                    .and_then(|r| r.h.get(p).copied()),
                realtime: snap.as_ref().and_then(|s| s.realtime_end.get(p).copied()),
                log,
            }
        })
        .collect();
    Json(Status {
        master,
        batch,
        speed,
        partitions,
        ingest: IngestStatus {
            requests: c.requests.load(Relaxed),
            accepted: c.accepted.load(Relaxed),
            rejected: c.rejected.load(Relaxed),
            bytes: c.bytes.load(Relaxed),
            dead_letters_written: state.ingest.dead_letters().written(),
        },
    })
}

/// `POST /v1/batch/run`: wakes the batch loop (a run starts if the master
/// dataset moved since the published run).
async fn run_batch(
    axum::extract::State(state): axum::extract::State<Arc<ApiState>>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let l = state.layers.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node runs no batch layer",
        )
    })?;
    l.batch_now.notify_one();
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "queued": true })),
    ))
}
