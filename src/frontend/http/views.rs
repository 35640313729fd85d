//! Reads: `GET /v1/views`, `GET /v1/views/{name}`, `POST /v1/sql`, `GET /metrics`.
//! Every answer carries its freshness: the batch coverage H, the realtime
//! high-water marks R, and their ages.

use std::sync::Arc;
use std::time::Instant;

use arrow::record_batch::RecordBatch;
use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{ApiError, ApiState};
use crate::error::Report;
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
        ServingError::BadFilter { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::report(status, Report::of(&e))
}

/// `POST /v1/views` with `{"name", "sql", "rollup"?}`: adds a view, or
/// changes the one of that name. It is compiled and checked as at startup
/// (the same refusals), saved, and built in the background from the master
/// dataset while the current version keeps answering; `202 Accepted`, and
/// `status` follows the build. The same definition again is `200`.
pub(super) async fn put_view(
    State(state): State<Arc<ApiState>>,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    use crate::batch::changes::Requested;
    let l = layers(&state)?.clone();
    if !l.lease.is_held() {
        return Err(not_driving(&l.lease));
    }
    let body = super::read_body(
        &state,
        body,
        super::MAX_VIEW_BODY,
        "a view definition is a name and one SELECT",
    )
    .await?;
    let def: crate::config::ViewConfig = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, format!("the view definition: {e}"))
            .hint(r#"send {"name": "…", "sql": "SELECT … FROM events GROUP BY …"} (and optionally "rollup": [{"after": "1d", "bucket": "1h"}])"#)
    })?;
    // The name is checked against the storage layout by `compile`, as for
    // every other way of defining a view.
    let view = crate::view::compile(&def, &l.schema)
        .await
        .map_err(|e| ApiError::report(StatusCode::BAD_REQUEST, Report::of(&e)))?;
    let view = Arc::new(view);
    l.batch
        .check_views(std::slice::from_ref(&view))
        .map_err(|e| ApiError::report(StatusCode::BAD_REQUEST, Report::of(&e)))?;
    let live: Vec<Arc<crate::view::View>> = l.serving.live().into_iter().map(|(_, v)| v).collect();
    let kind = crate::batch::changes::ViewChanges::diff(&live, &view);
    if kind.is_none() && !l.changes.pending() {
        return Ok(Json(json!({
            "view": def.name,
            "change": "none",
            "fingerprint": view.fingerprint(),
        }))
        .into_response());
    }
    if kind == Some("add")
        && let Some(other) = live
            .iter()
            .find(|v| v.name().eq_ignore_ascii_case(&def.name))
    {
        // To SQL, `Sales_By_Product` is `sales_by_product`: two such views
        // would answer for each other on `/v1/sql` and the Postgres wire.
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "view `{}` exists; a view `{}` would be the same name to SQL",
                other.name(),
                def.name
            ),
        )
        .hint("unquoted SQL identifiers are read in lower case: change the existing view under its own name, or pick a name that differs in more than case"));
    }
    // A view served as it is, with changes waiting: its definition is
    // requested again, after them.
    let kind = kind.unwrap_or("change");
    let status = l
        .changes
        .request(Requested::Put(def, view), kind)
        .await
        .map_err(|e| ApiError::report(StatusCode::INTERNAL_SERVER_ERROR, Report::of(&e)))?;
    l.batch_now.notify_one();
    Ok((StatusCode::ACCEPTED, Json(status)).into_response())
}

/// `DELETE /v1/views/{name}`: drops a view at the next batch cycle (it
/// answers until then); `202 Accepted`. A view added a moment ago and not
/// served yet is found too: an add still waiting for the batch loop is
/// cancelled (`200`, state `cancelled`), one being built is dropped right
/// after it (`202`).
pub(super) async fn drop_view(
    State(state): State<Arc<ApiState>>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(name) = name.map_err(super::rejection)?;
    let l = layers(&state)?.clone();
    if !l.lease.is_held() {
        return Err(not_driving(&l.lease));
    }
    let served = l.serving.view_index(&name);
    let status = l
        .changes
        .drop_view(&name, served.is_ok())
        .await
        .map_err(|e| ApiError::report(StatusCode::INTERNAL_SERVER_ERROR, Report::of(&e)))?;
    let Some(status) = status else {
        return Err(serving_error(served.expect_err("a view not served")));
    };
    if status.state == "cancelled" {
        return Ok(Json(status).into_response());
    }
    l.batch_now.notify_one();
    Ok((StatusCode::ACCEPTED, Json(status)).into_response())
}

/// `DELETE /v1/views/{name}/change`: returns a view changed, added or
/// dropped through the API to the config file's definition (or drops it,
/// when the file has none): its saved change is forgotten, and what differs
/// from the file is built as any change. A change to it still waiting is
/// cancelled; one being built is followed by the revert. `404` when no
/// change is saved.
pub(super) async fn revert_view(
    State(state): State<Arc<ApiState>>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(name) = name.map_err(super::rejection)?;
    let l = layers(&state)?.clone();
    if !l.lease.is_held() {
        return Err(not_driving(&l.lease));
    }
    let internal = |e: crate::storage::StorageError| {
        ApiError::report(StatusCode::INTERNAL_SERVER_ERROR, Report::of(&e))
    };
    let Some(cancelled) = l.changes.revert(&name).await.map_err(internal)? else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("view `{name}` has no change saved through the API"),
        )
        .hint("it is as the config file defines it (views/CHANGES.json holds the saved changes)"));
    };
    let (_, target) = l.changes.target().await.map_err(internal)?;
    // Compared with what serving will hold once the change being built (if
    // any) is published: the revert then follows it.
    let served: Vec<Arc<crate::view::View>> = l.changes.after_building(
        &l.serving
            .live()
            .into_iter()
            .map(|(_, v)| v)
            .collect::<Vec<_>>(),
    );
    let queued = l
        .changes
        .reconcile(&target, &served, &l.batch)
        .await
        .map_err(|e| ApiError::report(StatusCode::BAD_REQUEST, Report::of(&e)))?;
    let queued: Vec<_> = queued.into_iter().filter(|c| c.view == name).collect();
    if queued.is_empty() {
        return Ok(Json(json!({
            "view": name,
            "change": "none",
            "reverted": true,
            "cancelled": cancelled,
        }))
        .into_response());
    }
    l.batch_now.notify_one();
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "view": name, "reverted": true, "changes": queued, "cancelled": cancelled })),
    )
        .into_response())
}

fn not_driving(lease: &crate::cluster::lease::Lease) -> ApiError {
    let hint = match lease.status().node {
        Some(h) => format!("send view changes to the driving node, {h} (host:port; `status` shows the lease holder)"),
        None => "send view changes to the driving node (`status` shows the lease holder; none holds it now)".into(),
    };
    ApiError::new(
        StatusCode::CONFLICT,
        "this node does not drive the batch layer, which builds changed views",
    )
    .hint(hint)
}

/// A past run that cannot answer: not kept (404), or computed for another
/// version of the view (409).
fn past_error(e: crate::batch::BatchError) -> ApiError {
    use crate::batch::BatchError;
    let status = match &e {
        BatchError::NoSuchRun { .. } | BatchError::NotInRun { .. } => StatusCode::NOT_FOUND,
        BatchError::View(crate::view::ViewError::StateMismatch { .. }) => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::report(status, Report::of(&e))
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

pub(super) async fn list_views(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<Value>, ApiError> {
    let l = layers(&state)?;
    let mut out = Vec::new();
    for (i, v) in l.serving.live() {
        let a = match l.serving.answer(i).await {
            Ok(a) => a,
            // Dropped since the list was taken.
            Err(ServingError::NoSuchView { .. }) => continue,
            Err(e) => return Err(serving_error(e)),
        };
        out.push(json!({
            "name": v.name(),
            "sql": v.sql(),
            "kind": format!("{:?}", v.kind()).to_lowercase(),
            "columns": columns(v.output_schema()),
            "keys": v.key_names(),
            "rows": a.rows.iter().map(|b| b.num_rows()).sum::<usize>(),
            "freshness": a.freshness,
        }));
    }
    Ok(Json(json!({ "views": out })))
}

/// Rows of `GET /v1/views/{name}` without `limit`; page with `offset`.
pub const DEFAULT_VIEW_ROWS: usize = 10_000;

/// A JSON reply assembled from parts already encoded (the rows are the
/// bulk; they are not parsed back into a `Value` to be encoded again).
fn json_reply(parts: &[(&str, &[u8])]) -> Response {
    let mut out = Vec::with_capacity(parts.iter().map(|(_, v)| v.len() + 16).sum());
    out.push(b'{');
    for (i, (k, v)) in parts.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b"\":");
        out.extend_from_slice(v);
    }
    out.push(b'}');
    ([(header::CONTENT_TYPE, "application/json")], out).into_response()
}

fn json_bytes(v: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(v).expect("a reply part serializes")
}

fn pool_error(e: crate::serving::pool::PoolError) -> ApiError {
    use crate::serving::pool::PoolError;
    let r = Report::of(&e);
    match e {
        PoolError::Busy { .. } => {
            ApiError::report(StatusCode::SERVICE_UNAVAILABLE, r).retry_after(1)
        }
        PoolError::Timeout(_) => ApiError::report(StatusCode::REQUEST_TIMEOUT, r),
        PoolError::Panicked(_) => ApiError::report(StatusCode::INTERNAL_SERVER_ERROR, r),
    }
}

fn query_error(e: QueryError) -> ApiError {
    let status = match e {
        QueryError::Pool(p) => return pool_error(p),
        QueryError::NotAQuery { .. } => StatusCode::FORBIDDEN,
        QueryError::Sql { .. } | QueryError::Guard(_) => StatusCode::BAD_REQUEST,
        QueryError::Memory { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        QueryError::Serving(ServingError::NoSuchView { .. }) => StatusCode::NOT_FOUND,
        QueryError::Serving(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError::report(status, Report::of(&e))
}

/// The query string's parameters, each at most once: a repeated one
/// (`?ProductName=a&ProductName=b`) is refused, not silently narrowed to
/// its last value (to match several values, `POST /v1/sql` with `IN`).
fn params(query: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("`{k}` is given more than once"),
            )
            .hint(format!(
                "a filter takes one value; to match several, POST /v1/sql with `WHERE \"{k}\" IN (…)`"
            )));
        }
        out.push((k.into_owned(), v.into_owned()));
    }
    Ok(out)
}

fn param_usize(params: &[(String, String)], key: &str) -> Result<Option<usize>, ApiError> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, s)| {
            s.parse::<usize>().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("{key} must be a non-negative integer, got {s:?}"),
                )
            })
        })
        .transpose()
}

/// `GET /v1/views/{name}?COL=VAL&limit=N&offset=M`: the merged rows,
/// filtered, a page at a time (`limit` defaults to 10,000; `next_offset`
/// says where the next page starts, and is absent on the last page and for
/// `limit=0`, which asks for the counts alone). A filter's value is cast to
/// its column's type (a value that does not cast is a 400), the same on
/// every path: a key lookup, other columns, time travel (`as_of`).
pub(super) async fn get_view(
    State(state): State<Arc<ApiState>>,
    name: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let began = Instant::now();
    let Path(name) = name.map_err(super::rejection)?;
    let params = params(query.as_deref())?;
    let l = layers(&state)?.clone();
    let i = l.serving.view_index(&name).map_err(serving_error)?;
    let view = l.serving.views()[i].clone();
    let limit = param_usize(&params, "limit")?.unwrap_or(DEFAULT_VIEW_ROWS);
    let offset = param_usize(&params, "offset")?.unwrap_or(0);
    let as_of = params
        .iter()
        .find(|(k, _)| k == "as_of")
        .map(|(_, s)| s.parse::<crate::batch::AsOf>())
        .transpose()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("as_of: {e}")))?;
    let mut filters: Vec<(String, String)> = params
        .into_iter()
        .filter(|(k, _)| k != "limit" && k != "offset" && k != "as_of")
        .collect();
    filters.sort();
    let schema = view.output_schema().clone();
    for (col, val) in &mut filters {
        let Ok(field) = schema.field_with_name(col) else {
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            let hint = crate::schema::suggest(col, names.iter().copied())
                .map(|s| format!("did you mean `{s}`?"))
                .unwrap_or_else(|| format!("the columns of `{name}` are: {}", names.join(", ")));
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("view `{name}` has no column `{col}`"),
            )
            .hint(hint));
        };
        // From here on the value is the column's, as its rows display it.
        *val = crate::serving::filter_text(col, val, field.data_type()).map_err(serving_error)?;
    }
    let limits = query::SqlLimits {
        max_rows: limit,
        ..query::SqlLimits::default()
    };
    // A key lookup whose indexes are built is small, bounded work: it runs
    // here (see `QueryPool::run_here`); anything that merges a whole view
    // runs on the query runtime.
    let here = as_of.is_none()
        && filters
            .iter()
            .find_map(|(col, _)| view.key_column(col))
            .is_some_and(|c| l.serving.point_is_cheap(i, c));
    let work = async move {
        // A filter on a group key reads just that group (fresh, no full
        // merge); the other filters then apply to its rows.
        let key = filters
            .iter()
            .position(|(col, _)| view.key_column(col).is_some());
        let (answer, total) = match (as_of, key) {
            // Time travel: the past run's batch view alone.
            (Some(as_of), _) => {
                let (m, states) = l
                    .batch
                    .past_states(as_of, &view)
                    .await
                    .map_err(past_error)?;
                let a = l.serving.past(i, &m, states).await.map_err(serving_error)?;
                let total: usize = a.rows.iter().map(|b| b.num_rows()).sum();
                (Arc::new(a), Some(total))
            }
            (None, Some(k)) => {
                let (col, val) = filters.remove(k);
                let c = view.key_column(&col).expect("a key column");
                let a = l.serving.point(i, c, &val).await.map_err(serving_error)?;
                (Arc::new(a), None)
            }
            (None, None) => {
                let a = l.serving.answer(i).await.map_err(serving_error)?;
                let total: usize = a.rows.iter().map(|b| b.num_rows()).sum();
                (a, Some(total))
            }
        };
        // Filters: an index lookup per column, intersected (sorted, so each
        // intersection is a merge, not a scan per row).
        let mut selected: Option<Vec<(usize, usize)>> = None;
        for (col, val) in &filters {
            let mut hits = answer.lookup(col, val).unwrap_or_default();
            hits.sort_unstable();
            selected = Some(match selected {
                None => hits,
                Some(prev) => intersect_sorted(&prev, &hits),
            });
        }
        let rows: Vec<RecordBatch> = match selected {
            None => answer.rows.clone(),
            Some(hits) => hits
                .into_iter()
                .map(|(b, r)| answer.rows[b].slice(r, 1))
                .collect(),
        };
        let matched: usize = rows.iter().map(|b| b.num_rows()).sum();
        let mut reply = query::Reply::new(limits);
        let mut skip = offset;
        for b in &rows {
            if skip >= b.num_rows() {
                skip -= b.num_rows();
                continue;
            }
            if !reply
                .push(&b.slice(skip, b.num_rows() - skip))
                .map_err(query_error)?
            {
                break;
            }
            skip = 0;
        }
        let (rows_json, returned, _) = reply.finish().map_err(query_error)?;
        let next = offset + returned;
        if returned == 0 && limit > 0 && next < matched {
            // The next row alone is over the reply's byte bound: a pager
            // given `next_offset` = `offset` would ask for it forever.
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "row {offset} of the answer is larger than a reply may be ({})",
                    bytesize::ByteSize::b(limits.max_bytes as u64)
                ),
            )
            .hint("select fewer or smaller columns with POST /v1/sql"));
        }
        let mut parts: Vec<(&str, Vec<u8>)> = vec![
            ("view", json_bytes(&view.name())),
            ("columns", json_bytes(&columns(&schema))),
            ("rows", rows_json),
            ("total_rows", json_bytes(&total)),
            ("matched_rows", json_bytes(&matched)),
        ];
        // `limit=0` asks for the counts: no next page (a pager would get
        // the same offset back and never end).
        if next < matched && limit > 0 {
            parts.push(("next_offset", json_bytes(&next)));
        }
        parts.push(("freshness", json_bytes(&answer.freshness)));
        let parts: Vec<(&str, &[u8])> = parts.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        Ok::<_, ApiError>(json_reply(&parts))
    };
    let resp = if here {
        state.queries.run_here(limits.timeout, work).await
    } else {
        state.queries.run(limits.timeout, work).await
    }
    .map_err(pool_error)??;
    state.query_latency.observe(began.elapsed());
    Ok(resp)
}

/// The pairs in both sorted lists.
fn intersect_sorted(a: &[(usize, usize)], b: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out
}

/// `POST /v1/sql`: a JSON body `{"sql": "…"}` or the SQL as plain text.
pub(super) async fn post_sql(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
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
                format!("the body is not JSON: {e}"),
            )
            .hint("send {\"sql\": \"SELECT …\"}")
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
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "empty query")
            .hint("send one SELECT over the views"));
    }
    let answer = query::run(
        &l.serving,
        &l.catalog,
        &state.queries,
        &sql,
        query::SqlLimits::default(),
    )
    .await
    .map_err(query_error)?;
    let resp = json_reply(&[
        ("columns", &json_bytes(&columns(&answer.columns))),
        ("rows", &answer.rows_json),
        ("truncated", &json_bytes(&answer.truncated)),
        ("freshness", &json_bytes(&answer.freshness)),
    ]);
    state.sql_latency.observe(began.elapsed());
    Ok(resp)
}

/// `GET /metrics`: Prometheus text (0.0.4), from the layers' collectors.
pub(super) async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    match crate::metrics::encode(&super::metrics::registry(&state)) {
        Ok(text) => ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response(),
        Err(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the metrics could not be encoded",
        )
        .into_response(),
    }
}
