//! The dashboard at `/`: a small front-end (one HTML page, one script, one stylesheet, all
//! embedded in the binary) that talks to the same public API as any other client.
//!
//! Why a front-end and not server-rendered templates: every view it shows (jobs, a job's live
//! results over SSE, frames, prompt versions, alert events, health) already exists as a JSON
//! route, so the page adds no server logic of its own, needs no build step, and stays as
//! simple to change as the API. It builds the DOM with `textContent` only, never markup from
//! data, and the Content-Security-Policy below forbids inline script and any other origin, so
//! a prompt or an answer holding markup is shown as text.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::AppState;

const INDEX: &str = include_str!("../../assets/dashboard/index.html");
const SCRIPT: &str = include_str!("../../assets/dashboard/app.js");
const STYLE: &str = include_str!("../../assets/dashboard/app.css");
const ICON: &str = include_str!("../../assets/dashboard/icon.svg");

/// Scripts, styles, frames and API calls from this origin only; frames arrive as blobs
/// (fetched with the API key), never from elsewhere; no inline script or style attributes.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; \
     connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

/// The page's routes: `/`, its assets under `/ui/`, and `/ui/config.json` (what the page
/// needs before it has a key). No auth: they hold no data.
pub fn routes() -> Router<AppState> {
    ASSETS
        .iter()
        .fold(Router::new(), |router, &(path, content_type, body)| {
            // Hashed once, when the router is built: the assets never change in a binary.
            let etag = HeaderValue::from_str(&format!(
                "\"{}-{:016x}\"",
                env!("CARGO_PKG_VERSION"),
                fnv(body)
            ))
            .unwrap_or_else(|_| HeaderValue::from_static("\"0\""));
            router.route(
                path,
                get(move |h: HeaderMap| async move { asset(&h, content_type, body, etag) }),
            )
        })
        .route("/ui/config.json", get(config))
}

/// Path, content type and body of each embedded file.
const ASSETS: [(&str, &str, &str); 4] = [
    ("/", "text/html; charset=utf-8", INDEX),
    ("/ui/app.js", "text/javascript; charset=utf-8", SCRIPT),
    ("/ui/app.css", "text/css; charset=utf-8", STYLE),
    ("/ui/icon.svg", "image/svg+xml", ICON),
];

/// An embedded asset with the page's security headers. `no-cache` with an ETag: the browser
/// revalidates (a 304), so a new binary's page is never mixed with an old script.
fn asset(
    request: &HeaderMap,
    content_type: &'static str,
    body: &'static str,
    etag: HeaderValue,
) -> Response {
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim().as_bytes() == etag.as_bytes()));
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (header::ETAG, etag),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (
            HeaderName::from_static("x-frame-options"),
            HeaderValue::from_static("DENY"),
        ),
    ];
    if fresh {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    (headers, body).into_response()
}

/// FNV-1a of an asset, for its ETag.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[derive(Serialize)]
struct PageConfig {
    /// API_KEYS is set: the page asks for a key before calling the API.
    auth_required: bool,
    version: &'static str,
    default_fps: f64,
}

async fn config(State(state): State<AppState>) -> Response {
    let mut r = Json(PageConfig {
        auth_required: !state.settings.api_keys.is_empty(),
        version: env!("CARGO_PKG_VERSION"),
        default_fps: state.settings.default_fps,
    })
    .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
