//! The HTTP API: what producers and dashboards talk to.
//!
//! ```text
//!  POST /v1/events        NDJSON in → {accepted, rejected, offsets, errors}
//!  GET  /v1/views         names, columns, freshness
//!  GET  /v1/views/{name}  merged rows (?COL=VAL filters, &limit=N) + freshness
//!  POST /v1/sql           read-only SQL over the views (each view is a table)
//!  GET  /v1/status        every layer's watermarks, lag and last run
//!  GET  /metrics          Prometheus text
//!  GET  /                 the live dashboard (one page, no outside fetches)
//!  GET  /healthz          liveness: "ok" (no token)
//!  POST /v1/batch/run     start a batch cycle now (instead of after the pause)
//! ```
//!
//! Errors answer with JSON `{"error": …, "hint": …}` and a status that tells a
//! client what to do: 400 fix the request, 413 split it, 503 retry after
//! `Retry-After`, 507 the server's disk is full. Routing's own answers are in
//! the same shape (404, 405, and 414/431 for a request head over the limits
//! below hyper's), and no error shows a path of the server's disk.
//!
//! Every body is read by [`read_body`], within a size limit suited to its
//! route and `http.body_timeout`; no extractor reads one.

use crate::frontend::auth;

mod dashboard;
mod events;
mod metrics;
mod views;

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::sync::Semaphore;

use crate::frontend::status::{
    ClusterStatus, IngestStatus, PartitionStatus, SpeedStatus, Status, ViewChangesStatus,
};
use crate::node::Layers;
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
    /// Who may do what (empty: everyone, on loopback only).
    pub auth: auth::Auth,
    /// A request body must arrive within this time (408 otherwise).
    pub body_timeout: Duration,
    /// The listener's connections, when served by `serve`.
    pub connections: Option<Arc<crate::frontend::conn::Admission>>,
    /// Where reads run (view reads and SQL): off the runtime that
    /// acknowledges ingest.
    pub queries: Arc<crate::serving::pool::QueryPool>,
    /// The Postgres endpoint's counters, when it runs.
    pub pg: Option<Arc<crate::frontend::pg::PgCounters>>,
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
            auth: auth::Auth::default(),
            body_timeout: Duration::from_secs(60),
            connections: None,
            queries: Arc::new(
                crate::serving::pool::QueryPool::new(Default::default())
                    .expect("the query runtime starts"),
            ),
            pg: None,
        }
    }

    pub fn with_connections(mut self, c: Arc<crate::frontend::conn::Admission>) -> ApiState {
        self.connections = Some(c);
        self
    }

    pub fn with_auth(mut self, auth: auth::Auth) -> ApiState {
        self.auth = auth;
        self
    }

    pub fn with_body_timeout(mut self, t: Duration) -> ApiState {
        self.body_timeout = t;
        self
    }
}

/// Reads a whole request body: at most `limit` bytes (413) within
/// `state.body_timeout` (408), so neither a huge body nor a client that
/// trickles one byte a minute can hold memory or a request slot for long.
pub(crate) async fn read_body(
    state: &ApiState,
    body: axum::body::Body,
    limit: usize,
    what: &str,
) -> Result<bytes::Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is larger than the limit of {}",
                bytesize::ByteSize::b(limit as u64)
            ),
        )
        .hint(what)
    };
    match tokio::time::timeout(state.body_timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {}",
                humantime::format_duration(state.body_timeout)
            ),
        )
        .hint("send the body as fast as the network allows, or raise http.body_timeout")),
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => {
            let limited = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            Err(if limited {
                too_large()
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("could not read the request body: {e}"),
                )
            })
        }
    }
}

/// Largest SQL request body.
pub const MAX_SQL_BODY: usize = 1 << 20;

/// Largest view definition (`POST /v1/views`): a name and one SELECT.
pub const MAX_VIEW_BODY: usize = 1 << 20;

/// Longest request target (path and query) answered; longer gets 414.
/// (hyper itself refuses targets of 64 KiB and more, with no body.)
pub const MAX_URI_BYTES: usize = 16 << 10;

/// Most request headers answered; more gets 431. hyper refuses past
/// [`HYPER_MAX_HEADERS`] (with no body), so between the two the answer is
/// the API's own, in its JSON shape.
pub const MAX_HEADERS: usize = 100;

/// The header count at which hyper stops parsing (see [`MAX_HEADERS`]).
pub const HYPER_MAX_HEADERS: usize = 256;

/// Most bytes of request headers (names and values) answered; more gets 431.
pub const MAX_HEADER_BYTES: usize = 64 << 10;

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/events", post(events::post_events))
        .route("/v1/status", get(status))
        .route("/v1/views", get(views::list_views).post(views::put_view))
        .route(
            "/v1/views/{name}",
            get(views::get_view).delete(views::drop_view),
        )
        .route(
            "/v1/views/{name}/change",
            axum::routing::delete(views::revert_view),
        )
        .route("/v1/sql", post(views::post_sql))
        .route("/metrics", get(views::metrics))
        .route("/v1/batch/run", post(run_batch))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_token,
        ))
        // The page holds no data (it asks the API, with the token the user
        // gives it), so it needs none to load.
        .route("/", get(dashboard::page))
        .route("/healthz", get(healthz))
        // Bodies are bounded by each handler (`read_body`), not by axum's default.
        .layer(axum::extract::DefaultBodyLimit::disable())
        // Every error in the documented shape, routing's own too.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            hide_local_paths,
        ))
        .layer(axum::middleware::from_fn(head_limits))
        .with_state(state)
}

/// An extractor's refusal (a path segment that is not UTF-8, say) in the
/// documented error shape.
pub(crate) fn rejection(r: impl std::fmt::Display + IntoResponse) -> ApiError {
    let text = r.to_string();
    let status = r.into_response().status();
    ApiError::new(status, text)
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {}", shorten(uri.path(), 200)),
    )
    .hint("the endpoints are /v1/events, /v1/views, /v1/views/{name}, /v1/sql, /v1/status, /v1/batch/run, /metrics, /healthz and /")
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", shorten(uri.path(), 200)),
    )
    .hint("the `Allow` header lists the methods it takes")
}

/// At most `max` bytes of `s` (on a character boundary), marked if cut.
fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let cut = (0..=max)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}…", &s[..cut])
}

/// Refuses a request whose target or headers are too large (414, 431) in
/// the documented error shape, before any handler sees it.
async fn head_limits(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target > MAX_URI_BYTES {
        return ApiError::new(
            StatusCode::URI_TOO_LONG,
            format!("the request target is {target} bytes long; the limit is {MAX_URI_BYTES}"),
        )
        .hint("send long queries as POST /v1/sql")
        .into_response();
    }
    let headers = req.headers();
    let bytes: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!(
                "the request has {} headers of {bytes} bytes; the limits are {MAX_HEADERS} headers and {MAX_HEADER_BYTES} bytes",
                headers.len()
            ),
        )
        .hint("send fewer or shorter headers")
        .into_response();
    }
    next.run(req).await
}

/// Server-local paths (the storage root, when it is a directory) never
/// reach a client in an error: they are replaced by `<data>`. Only error
/// replies are read (already whole in memory).
async fn hide_local_paths(
    axum::extract::State(state): axum::extract::State<Arc<ApiState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let resp = next.run(req).await;
    if !(resp.status().is_client_error() || resp.status().is_server_error()) {
        return resp;
    }
    let Some(root) = state.layers.as_ref().and_then(|l| {
        let url = l.master.storage().url();
        (url.scheme() == "file")
            .then(|| url.to_file_path().ok())
            .flatten()
            .map(|p| p.display().to_string().trim_end_matches('/').to_string())
            .filter(|p| p.len() > 1)
    }) else {
        return resp;
    };
    let (parts, body) = resp.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return (parts.status, "the error reply could not be read\n").into_response();
    };
    let text = String::from_utf8_lossy(&bytes);
    if !text.contains(root.as_str()) {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    }
    let mut parts = parts;
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(
        parts,
        axum::body::Body::from(text.replace(root.as_str(), "<data>")),
    )
}

/// An error answer: status, the error (message, detail, hint) and
/// `Retry-After`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// Boxed: an error travels in every handler's `Result`.
    pub report: Box<crate::error::Report>,
    pub retry_after: Option<u32>,
    /// Extra JSON fields (e.g. what of the request was stored anyway).
    pub extra: Option<serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError::report(status, crate::error::Report::new(message))
    }

    /// An error of a layer, with its detail and hint.
    pub fn report(status: StatusCode, report: crate::error::Report) -> ApiError {
        ApiError {
            status,
            report: Box::new(report),
            retry_after: None,
            extra: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> ApiError {
        self.report.hint = Some(hint.into());
        self
    }

    pub fn retry_after(mut self, secs: u32) -> ApiError {
        self.retry_after = Some(secs);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let report = *self.report;
        let mut body = serde_json::json!({ "error": report.message });
        if let Some(d) = report.detail {
            body["detail"] = d.into();
        }
        if let Some(h) = report.hint {
            body["hint"] = h.into();
        }
        if let Some(serde_json::Value::Object(extra)) = self.extra {
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

async fn status(axum::extract::State(state): axum::extract::State<Arc<ApiState>>) -> Json<Status> {
    use std::sync::atomic::Ordering::Relaxed;
    let c = &state.ingest.counters;
    let dead = state.ingest.dead_letters();
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
    let source = state.layers.as_ref().map(|l| l.source.clone());
    let lag = |p: usize, partition: u32| -> Option<u64> {
        let end = source.as_ref()?.end(partition).ok()?;
        let r = snap.as_ref()?.realtime_end.get(p).copied()?;
        Some(end.saturating_sub(r))
    };
    // A node that produces into an external stream consumes it: its
    // partitions are the stream's, and its log is unused.
    let external = state.ingest.producer.is_some();
    let logs = if external {
        Vec::new()
    } else {
        state.ingest.log().stats()
    };
    let count = match &source {
        Some(s) if external => s.partitions() as usize,
        _ => logs.len(),
    };
    let mut logs = logs.into_iter();
    let keys = state
        .layers
        .as_ref()
        .and_then(|l| l.speed.keys.lock().expect("speed metrics").clone());
    let partitions = (0..count)
        .map(|p| {
            let log = logs.next();
            let partition = log.as_ref().map_or(p as u32, |l| l.partition);
            PartitionStatus {
                partition,
                shard: source.as_ref().and_then(|s| s.info(partition)),
                log: log.map(Into::into),
                archived: master.as_ref().and_then(|m| m.h.listed(p as u32)),
                published: batch
                    .as_ref()
                    .and_then(|b| b.published.as_ref())
                    .and_then(|r| r.h.listed(p as u32)),
                realtime: snap.as_ref().and_then(|s| s.realtime_end.get(p).copied()),
                stream_end: source.as_ref().and_then(|s| s.end(partition).ok()),
                lag: lag(p, partition),
                lag_ms: lag(p, partition).and_then(|waiting| {
                    let l = state.layers.as_ref()?;
                    Some(
                        l.speed
                            .lag_ms(p, waiting, chrono::Utc::now().timestamp_millis()),
                    )
                }),
                keys: keys.as_ref().map(|k| k.get(p).copied().unwrap_or_default()),
            }
        })
        .collect();
    Json(Status {
        stream: source.as_ref().map(|s| s.describe()),
        stream_identity: state
            .layers
            .as_ref()
            .and_then(|l| l.stream_identity.clone()),
        cluster: state.layers.as_ref().map(|l| ClusterStatus {
            root: l.master.storage().describe(),
            lease: l.lease.status(),
        }),
        health: state.layers.as_ref().map(|l| l.health.report_all()),
        view_changes: state.layers.as_ref().map(|l| {
            let p = l.changes.progress.lock().expect("progress lock").clone();
            ViewChangesStatus {
                changes: l.changes.status().into_iter().map(Into::into).collect(),
                build_events_done: p.done.load(Relaxed),
                build_events_total: p.total.load(Relaxed),
            }
        }),
        views_excluded: state.layers.as_ref().map(|l| l.batch.failures().report()),
        master,
        batch,
        speed,
        partitions,
        connections: state.connections.as_ref().map(|c| c.report()),
        memory: crate::memory::report(),
        pg: state.pg.as_deref().cloned(),
        ingest: IngestStatus {
            requests: c.requests.load(Relaxed),
            accepted: c.accepted.load(Relaxed),
            rejected: c.rejected.load(Relaxed),
            bytes: c.bytes.load(Relaxed),
            dead_letters_written: state.ingest.dead_letters().written(),
            dead_letters_dropped: dead.counters.dropped.load(Relaxed),
            dead_letter_bytes: dead.bytes(),
            dead_letter_files_removed: dead.counters.removed_files.load(Relaxed),
            dead_letters_recent: dead.recent(),
            idempotence: state.ingest.ledger.as_ref().map(|l| {
                let c = &l.counters;
                crate::frontend::status::IdempotenceStatus {
                    identified: c.identified.load(Relaxed),
                    recognised: c.recognised.load(Relaxed),
                    completed: c.completed.load(Relaxed),
                    changed: c.changed.load(Relaxed),
                    too_old: c.too_old.load(Relaxed),
                    producers: l.producers() as u64,
                    retired: c.retired.load(Relaxed),
                    max_producers: l.bounds().max_producers as u64,
                    window: l.bounds().window as u64,
                }
            }),
        },
    })
}

/// `GET /healthz`: the process answers (a liveness probe for load
/// balancers and orchestrators; it says nothing about the layers, which
/// `/v1/status` does). No token needed, and it costs next to nothing: the
/// read benchmark's ceiling.
async fn healthz() -> &'static str {
    "ok\n"
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
/// The HTTP face of [`auth`]: the route's scope, the bearer token, 401 or 403.
async fn require_token(
    axum::extract::State(state): axum::extract::State<Arc<ApiState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !state.auth.enabled() {
        return next.run(req).await;
    }
    let need = auth::scope_of(req.method(), req.uri().path());
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| auth::bearer(v.as_bytes()));
    let Some(presented) = presented else {
        return unauthorized(auth::Denied::Missing);
    };
    match state.auth.check(presented, need) {
        Err(e @ auth::Denied::Scope(_)) => {
            ApiError::report(StatusCode::FORBIDDEN, crate::error::Report::of(&e)).into_response()
        }
        Err(e) => unauthorized(e),
        Ok(()) => next.run(req).await,
    }
}

fn unauthorized(e: auth::Denied) -> Response {
    let mut resp =
        ApiError::report(StatusCode::UNAUTHORIZED, crate::error::Report::of(&e)).into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"lambdaflow\""),
    );
    resp
}
