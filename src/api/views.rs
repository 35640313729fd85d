//! Reads: `GET /v1/views`, `GET /v1/views/{name}`, `POST /v1/sql`, `GET /metrics`.
//! Every answer carries its freshness: the batch coverage H, the realtime
//! high-water marks R, and their ages.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use arrow::record_batch::RecordBatch;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{ApiError, ApiState};
use crate::node::Layers;
use crate::serving::ServingError;
use crate::serving::query::{self, QueryError};

fn layers(state: &ApiState) -> Result<&Arc<Layers>, ApiError> {
    state.layers.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "views are not served by this node",
        )
    })
}

fn serving_error(e: ServingError) -> ApiError {
    let status = match e {
        ServingError::NoSuchView { .. } => StatusCode::NOT_FOUND,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::new(status, e.to_string())
}

fn columns(schema: &arrow::datatypes::Schema) -> Value {
    Value::Array(
        schema
            .fields()
            .iter()
            .map(|f| json!({ "name": f.name(), "type": f.data_type().to_string() }))
            .collect(),
    )
}

/// Batches as JSON objects, one per row.
pub fn rows_json(batches: &[RecordBatch]) -> Result<Value, ApiError> {
    let mut w = arrow::json::ArrayWriter::new(Vec::new());
    let refs: Vec<&RecordBatch> = batches.iter().filter(|b| b.num_rows() > 0).collect();
    w.write_batches(&refs)
        .and_then(|()| w.finish())
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("could not encode rows: {e}"),
            )
        })?;
    let buf = w.into_inner();
    if buf.is_empty() {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_slice(&buf).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("could not encode rows: {e}"),
        )
    })
}

pub(super) async fn list_views(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<Value>, ApiError> {
    let l = layers(&state)?;
    let mut out = Vec::new();
    for (i, v) in l.serving.views().iter().enumerate() {
        let a = l.serving.answer(i).await.map_err(serving_error)?;
        out.push(json!({
            "name": v.name(),
            "sql": v.sql(),
            "kind": format!("{:?}", v.kind()).to_lowercase(),
            "columns": columns(v.output_schema()),
            "rows": a.rows.iter().map(|b| b.num_rows()).sum::<usize>(),
            "freshness": a.freshness,
        }));
    }
    Ok(Json(json!({ "views": out })))
}

/// `GET /v1/views/{name}?COL=VAL&limit=N`: the merged rows, filtered.
pub(super) async fn get_view(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let began = Instant::now();
    let l = layers(&state)?;
    let i = l.serving.view_index(&name).map_err(serving_error)?;
    let view = &l.serving.views()[i];
    let limit = match params.get("limit") {
        Some(s) => Some(s.parse::<usize>().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("limit must be a non-negative integer, got {s:?}"),
            )
        })?),
        None => None,
    };
    let mut filters: Vec<(&String, &String)> = params
        .iter()
        .filter(|(k, _)| k.as_str() != "limit")
        .collect();
    filters.sort();
    let schema = view.output_schema();
    for (col, _) in &filters {
        if schema.index_of(col).is_err() {
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            let hint = crate::schema::suggest(col, names.iter().copied())
                .map(|s| format!("did you mean `{s}`?"))
                .unwrap_or_else(|| format!("the columns of `{name}` are: {}", names.join(", ")));
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("view `{name}` has no column `{col}`\nhint: {hint}"),
            ));
        }
    }
    // A filter on a group key reads just that group (fresh, no full merge);
    // the other filters then apply to its rows.
    let key = filters
        .iter()
        .position(|(col, _)| view.key_column(col).is_some());
    let (answer, total) = match key {
        Some(k) => {
            let (col, val) = filters.remove(k);
            let c = view.key_column(col).expect("a key column");
            let a = l.serving.point(i, c, val).await.map_err(serving_error)?;
            (Arc::new(a), None)
        }
        None => {
            let a = l.serving.answer(i).await.map_err(serving_error)?;
            let total: usize = a.rows.iter().map(|b| b.num_rows()).sum();
            (a, Some(total))
        }
    };
    // Filters: an index lookup per column, intersected.
    let selected: Option<Vec<(usize, usize)>> = filters.iter().fold(None, |acc, (col, val)| {
        let hits = answer.lookup(col, val).unwrap_or_default();
        Some(match acc {
            None => hits,
            Some(prev) => prev.into_iter().filter(|x| hits.contains(x)).collect(),
        })
    });
    let rows: Vec<RecordBatch> = match selected {
        None => answer.rows.clone(),
        Some(mut hits) => {
            hits.sort_unstable();
            let mut out = Vec::with_capacity(hits.len());
            for (b, r) in hits {
                out.push(answer.rows[b].slice(r, 1));
            }
            out
        }
    };
    let rows = match limit {
        Some(n) => {
            let mut kept = Vec::new();
            let mut left = n;
            for b in rows {
                if left == 0 {
                    break;
                }
                let k = b.num_rows().min(left);
                kept.push(b.slice(0, k));
                left -= k;
            }
            kept
        }
        None => rows,
    };
    let body = json!({
        "view": name,
        "columns": columns(schema),
        "rows": rows_json(&rows)?,
        "total_rows": total,
        "freshness": answer.freshness,
    });
    state.query_latency.observe(began.elapsed());
    Ok(Json(body))
}

/// `POST /v1/sql`: a JSON body `{"sql": "…"}` or the SQL as plain text.
pub(super) async fn post_sql(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<Value>, ApiError> {
    let began = Instant::now();
    let l = layers(&state)?;
    let body = super::read_body(
        &state,
        body,
        super::MAX_SQL_BODY,
        "a query over the views is short; send one SELECT",
    )
    .await?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let sql = if is_json {
        let v: Value = serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}\nhint: send {{\"sql\": \"SELECT …\"}}"),
            )
        })?;
        v["sql"]
            .as_str()
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "the JSON body has no string field `sql`",
                )
            })?
            .to_string()
    } else {
        String::from_utf8(body.to_vec())
            .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "the SQL is not UTF-8"))?
    };
    if sql.trim().is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "empty query\nhint: send one SELECT over the views",
        ));
    }
    let answer = query::run(&l.serving, &sql, query::SqlLimits::default())
        .await
        .map_err(|e| {
            let status = match &e {
                QueryError::NotAQuery { .. } => StatusCode::FORBIDDEN,
                QueryError::Sql { .. } => StatusCode::BAD_REQUEST,
                QueryError::Timeout { .. } => StatusCode::REQUEST_TIMEOUT,
                QueryError::Serving(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            ApiError::new(status, e.to_string())
        })?;
    let schema = answer
        .rows
        .first()
        .map(|b| b.schema())
        .unwrap_or_else(|| Arc::new(arrow::datatypes::Schema::empty()));
    let body = json!({
        "columns": columns(&schema),
        "rows": rows_json(&answer.rows)?,
        "truncated": answer.truncated,
        "freshness": answer.freshness,
    });
    state.sql_latency.observe(began.elapsed());
    Ok(Json(body))
}

/// `GET /metrics`: Prometheus text.
pub(super) async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    use crate::metrics::sample;
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = String::new();
    let c = &state.ingest.counters;
    sample(
        &mut out,
        "lambdaflow_ingest_requests_total",
        "counter",
        "Ingest requests received.",
        &[(String::new(), c.requests.load(Relaxed) as f64)],
    );
    sample(
        &mut out,
        "lambdaflow_events_accepted_total",
        "counter",
        "Events accepted and durable in the log.",
        &[(String::new(), c.accepted.load(Relaxed) as f64)],
    );
    sample(
        &mut out,
        "lambdaflow_events_rejected_total",
        "counter",
        "Lines refused and kept in the dead-letter store.",
        &[(String::new(), c.rejected.load(Relaxed) as f64)],
    );
    let dead = state.ingest.dead_letters();
    sample(
        &mut out,
        "lambdaflow_dead_letters_dropped_total",
        "counter",
        "Refused lines not kept in the dead-letter store: past their request's share of it.",
        &[(String::new(), dead.counters.dropped.load(Relaxed) as f64)],
    );
    sample(
        &mut out,
        "lambdaflow_dead_letter_store_bytes",
        "gauge",
        "Bytes in the dead-letter store.",
        &[(String::new(), dead.bytes() as f64)],
    );
    sample(
        &mut out,
        "lambdaflow_dead_letter_files_removed_total",
        "counter",
        "Oldest dead-letter files removed to keep the store under ingest.dead_letter_max.",
        &[(
            String::new(),
            dead.counters.removed_files.load(Relaxed) as f64,
        )],
    );
    if let Some(conns) = state.connections.as_ref().map(|c| c.report()) {
        sample(
            &mut out,
            "lambdaflow_http_connections",
            "gauge",
            "Open HTTP connections.",
            &[(String::new(), conns.open as f64)],
        );
        sample(
            &mut out,
            "lambdaflow_http_connections_refused_total",
            "counter",
            "Connections closed at accept: every slot, or the address's share, in use.",
            &[(String::new(), conns.refused as f64)],
        );
        sample(
            &mut out,
            "lambdaflow_http_connections_idle_closed_total",
            "counter",
            "Connections closed because no request began before their deadline.",
            &[(String::new(), conns.idle_closed as f64)],
        );
    }
    let log = state.ingest.log().stats();
    let per = |f: &dyn Fn(usize, &crate::stream::log::PartitionStats) -> Option<f64>| -> Vec<(String, f64)> {
        log.iter()
            .enumerate()
            .filter_map(|(p, s)| f(p, s).map(|v| (format!("partition=\"{p}\""), v)))
            .collect()
    };
    sample(
        &mut out,
        "lambdaflow_log_end_offset",
        "gauge",
        "One past the last durable offset.",
        &per(&|_, s| Some(s.end as f64)),
    );
    if let Some(l) = &state.layers {
        let snap = l.serving.snapshot();
        let h = snap.h();
        let archived = l.master.coverage().h;
        sample(
            &mut out,
            "lambdaflow_realtime_offset",
            "gauge",
            "Realtime high-water mark R: events below it are in answers.",
            &per(&|p, _| snap.realtime_end.get(p).map(|&v| v as f64)),
        );
        sample(
            &mut out,
            "lambdaflow_archived_offset",
            "gauge",
            "End of the last chunk committed to the master dataset.",
            &per(&|p, _| archived.get(p).map(|&v| v as f64)),
        );
        sample(
            &mut out,
            "lambdaflow_batch_offset",
            "gauge",
            "Published batch coverage H.",
            &per(&|p, _| h.get(p).map(|&v| v as f64)),
        );
        sample(
            &mut out,
            "lambdaflow_speed_lag_events",
            "gauge",
            "Durable events not yet in the realtime view.",
            &per(&|p, s| {
                snap.realtime_end
                    .get(p)
                    .map(|&r| s.end.saturating_sub(r) as f64)
            }),
        );
        sample(
            &mut out,
            "lambdaflow_batch_lag_events",
            "gauge",
            "Durable events not yet in a batch view.",
            &per(&|p, s| h.get(p).map(|&v| s.end.saturating_sub(v) as f64)),
        );
        sample(
            &mut out,
            "lambdaflow_speed_events_total",
            "counter",
            "Events through the view plans of the speed layer.",
            &[(String::new(), l.speed.events.load(Relaxed) as f64)],
        );
        l.speed.micro.render(
            "lambdaflow_micro_batch_duration_seconds",
            "Time to turn one micro-batch into states for every view.",
            "",
            &mut out,
        );
        let excluded: Vec<(String, f64)> = l
            .batch
            .failures()
            .report()
            .into_iter()
            .map(|(v, x)| (format!("view=\"{v}\""), x.events as f64))
            .collect();
        if !excluded.is_empty() {
            sample(
                &mut out,
                "lambdaflow_view_excluded_events_total",
                "counter",
                "Events left out of a view because its expressions fail on them.",
                &excluded,
            );
        }
        let b = l.batch_status.lock().expect("status lock").clone();
        sample(
            &mut out,
            "lambdaflow_batch_runs_total",
            "counter",
            "Batch runs published.",
            &[(String::new(), b.runs as f64)],
        );
        if let Some(r) = &b.published {
            sample(
                &mut out,
                "lambdaflow_batch_run_duration_seconds",
                "gauge",
                "Duration of the published batch run.",
                &[(String::new(), r.duration_ms as f64 / 1000.0)],
            );
        }
    }
    state.query_latency.render(
        "lambdaflow_query_duration_seconds",
        "Latency of GET /v1/views/{name}.",
        "",
        &mut out,
    );
    state.sql_latency.render(
        "lambdaflow_sql_duration_seconds",
        "Latency of POST /v1/sql.",
        "",
        &mut out,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
