//! The HTTP surface: the Free-Roam REST API (seed paths), probes, metrics and OpenAPI docs.
//!
//! Handlers parse request bodies into domain types and talk to the job manager and the
//! store; they never reach into ingest or decoder internals. Layering, outermost first:
//! request id, trace, CORS, metrics, timeout; `/api` routes add rate limits and API-key auth.

pub mod alerts;
pub mod dashboard;
pub mod error;
pub mod health;
pub mod inference;
pub mod middleware;
pub mod prompt;
pub mod stream;
pub mod webhooks;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::routing::{delete, get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_redoc::{Redoc, Servable};
use utoipa_swagger_ui::SwaggerUi;

use crate::config::Settings;
use crate::jobs::JobManager;
use crate::store::Store;
use crate::vlm::Models;
use error::ApiError;

/// Everything a handler may use, behind one `Arc`: handlers and middleware clone the state
/// for every request, and one reference count is cheaper than one per field.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The state's fields (see [`AppState`]).
pub struct Shared {
    pub settings: Arc<Settings>,
    pub store: Store,
    pub jobs: JobManager,
    pub models: Models,
    pub metrics: PrometheusHandle,
    pub rate_limits: Arc<middleware::RateLimits>,
    pub draining: Arc<AtomicBool>,
    pub started: Instant,
    /// Open result streams, bounded by MAX_SSE_STREAMS.
    pub sse_streams: Arc<tokio::sync::Semaphore>,
    /// One store reader per followed job, shared by its result streams.
    pub feeds: stream::Feeds,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "free-roam", description = "Watches video streams with vision-language models. \
        Compatible with the Free-Roam inference service's API."),
    paths(
        inference::start, inference::replay, inference::status, inference::results, inference::frame, stream::results_stream, inference::cancel, inference::list,
        stream::events_stream, webhooks::list, webhooks::resend,
        prompt::update, prompt::current, prompt::history,
        alerts::update, alerts::current, alerts::history, alerts::events,
        health::health, health::ready, health::live, health::metrics,
    ),
    components(schemas(error::ErrorBody, error::ErrorDetail)),
    modifiers(&BearerAuth, &CommonErrors),
    tags((name = "inference", description = "Jobs and their results"),
         (name = "prompt", description = "Versioned prompts, global or per job"),
         (name = "alerts", description = "Yes/no alert rules, versioned like prompts, and the events they fire"),
         (name = "webhooks", description = "Webhook deliveries (Standard Webhooks 1.0): state, dead messages, resend"),
         (name = "health", description = "Probes and metrics; no auth, no rate limit")),
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "api_key",
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
        }
    }
}

/// The answers every `/api` operation can give besides its own, documented on each: what the
/// layers in front of the handlers (body limit, JSON extraction, API keys, rate limits,
/// request timeout) answer, all with the error body.
struct CommonErrors;

impl utoipa::Modify for CommonErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        let every = [
            (
                "400",
                "Malformed request: a query string or body that does not parse",
            ),
            ("401", "API key missing or wrong (when API_KEYS is set)"),
            (
                "429",
                "Rate limited (RATE_LIMIT_*); Retry-After says when to retry",
            ),
            ("503", "The request took longer than REQUEST_TIMEOUT_SECS"),
        ];
        let with_body = [
            ("413", "Body larger than MAX_BODY_BYTES"),
            ("415", "Body is not application/json"),
            (
                "422",
                "A field is missing or out of range; the error names it",
            ),
        ];
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !path.starts_with("/api/") {
                continue;
            }
            let ops = [
                (&mut item.get, false),
                (&mut item.delete, false),
                (&mut item.post, true),
                (&mut item.put, true),
            ];
            for (op, body) in ops {
                let Some(op) = op.as_mut() else { continue };
                let extra = every.iter().chain(if body { &with_body[..] } else { &[] });
                for (code, description) in extra {
                    op.responses
                        .responses
                        .entry((*code).to_owned())
                        .or_insert_with(|| error(description).into());
                }
            }
        }
    }
}

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Redoc's script, embedded (npm's redoc 2.5.4 bundle): `/redoc` loads nothing from a CDN.
/// The bundle's one remote URL, the "API docs by Redocly" logo, is pointed at our own icon.
async fn redoc_script() -> impl axum::response::IntoResponse {
    use axum::http::header;
    static SCRIPT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        include_str!("../../assets/vendor/redoc.standalone.js")
            .replace("https://cdn.redoc.ly/redoc/logo-mini.svg", "/ui/icon.svg")
    });
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        SCRIPT.as_str(),
    )
}

/// The whole service's router.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/v1/inference/start", post(inference::start))
        .route("/api/v1/inference/status/{job_id}", get(inference::status))
        .route("/api/v1/inference/replay", post(inference::replay))
        .route(
            "/api/v1/inference/results/{job_id}",
            get(inference::results),
        )
        .route(
            "/api/v1/inference/results/{job_id}/{seq}/frame",
            get(inference::frame),
        )
        .route(
            "/api/v1/inference/results/{job_id}/stream",
            get(stream::results_stream),
        )
        .route(
            "/api/v1/inference/cancel/{job_id}",
            delete(inference::cancel),
        )
        .route("/api/v1/inference/jobs", get(inference::list))
        .route("/api/v1/events", get(stream::events_stream))
        .route("/api/v1/webhooks/deliveries", get(webhooks::list))
        .route(
            "/api/v1/webhooks/deliveries/{id}/resend",
            post(webhooks::resend),
        )
        .route("/api/v1/prompt/update", post(prompt::update))
        .route("/api/v1/prompt/current", get(prompt::current))
        .route("/api/v1/prompt/history", get(prompt::history))
        .route("/api/v1/alerts/update", post(alerts::update))
        .route("/api/v1/alerts/current", get(alerts::current))
        .route("/api/v1/alerts/history", get(alerts::history))
        .route("/api/v1/inference/alerts/{job_id}", get(alerts::events))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::require_api_key,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            middleware::rate_limit,
        ));

    let probes = Router::new()
        .route("/health", get(health::health))
        .route("/health/ready", get(health::ready))
        .route("/health/live", get(health::live))
        .route("/metrics", get(health::metrics));

    let openapi = ApiDoc::openapi();
    Router::new()
        .merge(api)
        .merge(probes)
        .merge(dashboard::routes())
        .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi.clone()))
        .merge(Redoc::with_url("/redoc", openapi).custom_html(include_str!("../../assets/redoc.html")))
        .route("/redoc/redoc.standalone.js", get(redoc_script))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed("method not allowed on this route".into()) })
        .layer(axum::middleware::from_fn_with_state(state.clone(), middleware::timeout))
        .layer(axum::middleware::from_fn(middleware::track))
        .layer(DefaultBodyLimit::max(state.settings.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(state.clone(), middleware::reject_oversized))
        .layer(cors(&state.settings))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID.clone()))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
            let request_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
            tracing::info_span!("request", method = %req.method(), uri = %req.uri().path(), request_id)
        }))
        .layer(SetRequestIdLayer::new(REQUEST_ID.clone(), MakeRequestUuid))
        .with_state(state)
}

fn cors(settings: &Settings) -> CorsLayer {
    let origins = &settings.cors_origins;
    if origins.is_empty() {
        return CorsLayer::new();
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            REQUEST_ID.clone(),
        ])
        .expose_headers([REQUEST_ID.clone(), header::RETRY_AFTER])
}
