//! The HTTP API: what producers and dashboards talk to.
//!
//! ```text
//!  POST /v1/events   NDJSON in → {accepted, rejected, offsets, errors}
//!  GET  /v1/status   the log's partitions, ingest counters, dead letters
//! ```
//!
//! Errors answer with JSON `{"error": …, "hint": …}` and a status that tells a
//! client what to do: 400 fix the request, 413 split it, 503 retry after
//! `Retry-After`, 507 the server's disk is full.

mod events;

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
        }
    }
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/events", post(events::post_events))
        .route("/v1/status", get(status))
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
                log,
            }
        })
        .collect();
    Json(Status {
        master,
        batch,
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
