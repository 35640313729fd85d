//! `POST /v1/events`: NDJSON in, a report of every line out.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{ApiError, ApiState, read_body};
use crate::stream::ingest::IngestFailure;
use crate::stream::requests::{PRODUCER_HEADER, RequestError, RequestId, SEQUENCE_HEADER};
use crate::stream::{IngestError, LogError};

pub(super) async fn post_events(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // Bound memory before reading a byte: bodies in flight × max_body.
    let _permit = state.in_flight.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many ingest requests in flight",
        )
        .hint("retry after a short pause, or send fewer, larger requests")
        .retry_after(1)
    })?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let hint = "split the events over several requests, or raise ingest.max_body";
    if declared.is_some_and(|n| n > state.max_body as u64) {
        // Refuse before reading a byte of it.
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is larger than the limit of {}",
                bytesize::ByteSize::b(state.max_body as u64)
            ),
        )
        .hint(hint));
    }
    let twice = [PRODUCER_HEADER, SEQUENCE_HEADER]
        .into_iter()
        .find(|h| headers.get_all(*h).iter().count() > 1);
    let id = match twice {
        Some(h) => Err(RequestError::BadHeader {
            header: if h == PRODUCER_HEADER {
                "Lambdaflow-Producer"
            } else {
                "Lambdaflow-Sequence"
            },
            reason: "sent more than once".into(),
        }),
        None => RequestId::from_headers(
            headers.get(PRODUCER_HEADER).map(|v| v.as_bytes()),
            headers.get(SEQUENCE_HEADER).map(|v| v.as_bytes()),
        ),
    }
    .map_err(|e| {
        let mut err = ApiError::report(StatusCode::BAD_REQUEST, crate::error::Report::of(&e));
        err.extra = Some(serde_json::json!({ "code": e.code() }));
        err
    })?;
    let bytes = read_body(&state, body, state.max_body, hint).await?;

    // Its own task: a client that goes away (a timeout, a reset) must not
    // cancel a request half-way — its events may be queued to the log
    // already, and the ledger must record what was stored, so that the
    // retry is recognised. The permit goes with it: the body is in memory
    // until the task ends.
    let ingest = state.ingest.clone();
    let done = tokio::spawn(async move {
        let _permit = _permit;
        ingest.ingest_request(bytes, id).await
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the ingest task failed: {e}"),
        )
    })?;
    match done {
        Ok(report) => {
            // Every line refused: the request as a whole did not do anything.
            // Part of the body stored, the rest not (or not known): 207, and
            // the report lists exactly which lines to send again.
            let partial = !report.not_stored.is_empty() || !report.in_doubt.is_empty();
            let status = if partial {
                StatusCode::MULTI_STATUS
            } else if report.accepted == 0 && report.rejected > 0 {
                StatusCode::UNPROCESSABLE_ENTITY
            } else {
                StatusCode::OK
            };
            let retry = !report.not_stored.is_empty();
            let mut resp = (status, Json(report)).into_response();
            if retry {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            }
            Ok(resp)
        }
        Err(IngestFailure { error, partial }) => {
            let status = match &error {
                IngestError::EmptyBody => StatusCode::BAD_REQUEST,
                IngestError::Log(
                    LogError::Overloaded { .. } | LogError::Closed | LogError::OutOfFiles { .. },
                )
                | IngestError::Backlogged { .. }
                | IngestError::NotStored { .. }
                | IngestError::NotDriving(_)
                | IngestError::Stream(_) => StatusCode::SERVICE_UNAVAILABLE,
                IngestError::Request(r) => match r {
                    RequestError::BadHeader { .. } | RequestError::HalfHeaders(..) => {
                        StatusCode::BAD_REQUEST
                    }
                    RequestError::Changed { .. } => StatusCode::CONFLICT,
                    RequestError::TooOld { .. } | RequestError::Unsupported { .. } => {
                        StatusCode::UNPROCESSABLE_ENTITY
                    }
                    _ => StatusCode::SERVICE_UNAVAILABLE,
                },
                IngestError::Log(LogError::NoSpace { .. })
                | IngestError::DeadLetter(crate::stream::deadletter::DeadLetterError::NoSpace {
                    ..
                }) => StatusCode::INSUFFICIENT_STORAGE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            // Overload is the client's to handle (it retries); logging every
            // 503 would flood the log exactly when the machine is busiest.
            if status == StatusCode::SERVICE_UNAVAILABLE {
                tracing::debug!(%status, error = %error, "ingest request refused");
            } else if status.is_server_error() {
                tracing::warn!(%status, error = %error, "ingest request failed");
            }
            let mut err = ApiError::report(status, crate::error::Report::of(&error));
            if matches!(error, IngestError::Backlogged { .. }) {
                err = err.retry_after(5);
            } else if status == StatusCode::SERVICE_UNAVAILABLE {
                err = err.retry_after(1);
            } else if status == StatusCode::INSUFFICIENT_STORAGE {
                err = err.retry_after(10);
            }
            if let IngestError::Request(r) = &error {
                err.extra = Some(serde_json::json!({ "code": r.code() }));
            } else if partial.accepted > 0 {
                err.extra = Some(serde_json::json!({ "stored_before_failure": partial }));
            } else if matches!(error, IngestError::NotStored { .. }) {
                // Nothing stored: the lines and why, and the refused ones.
                err.extra = Some(serde_json::json!({ "report": partial }));
            }
            Err(err)
        }
    }
}
