//! `GET /`: the live dashboard, one page built into the binary.
//!
//! ```text
//!  browser ── GET / ──▶ this page (HTML, CSS, JS and its SVG charts inline)
//!     └── every second: GET /v1/views, /v1/views/{name}, /v1/status
//!         (Authorization: Bearer <the query token, kept in sessionStorage>)
//! ```
//!
//! No build step and no network: the page fetches nothing but this API,
//! and its Content-Security-Policy says so to the browser.

use axum::http::header;
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("dashboard.html");

pub(super) async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; connect-src 'self'; img-src 'self' data:; \
                 style-src 'unsafe-inline'; script-src 'unsafe-inline'; base-uri 'none'; \
                 form-action 'none'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        PAGE,
    )
        .into_response()
}
