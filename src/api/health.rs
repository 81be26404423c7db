//! Kubernetes probes and the Prometheus scrape endpoint. These routes bypass auth and limits.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct ComponentHealth {
    /// `ok`, `error`, `not_configured`, `loading` or `failed`.
    pub status: String,
    pub detail: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthResponse {
    /// `healthy` or `unhealthy`.
    pub status: String,
    pub version: String,
    pub uptime_secs: f64,
    pub draining: bool,
    #[schema(value_type = Object)]
    pub components: std::collections::BTreeMap<String, ComponentHealth>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReadyResponse {
    /// `ready` or `not_ready`.
    pub status: String,
    /// Why the service is not ready; empty when ready.
    pub reasons: Vec<String>,
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

async fn database(state: &AppState) -> ComponentHealth {
    match tokio::time::timeout(PROBE_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => ComponentHealth {
            status: "ok".into(),
            detail: format!("{:?} answers", state.store.dialect()).to_lowercase(),
        },
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "database health check failed");
            ComponentHealth {
                status: "error".into(),
                detail: "database does not answer".into(),
            }
        }
        Err(_) => ComponentHealth {
            status: "error".into(),
            detail: "database did not answer within 2 s".into(),
        },
    }
}

fn model(state: &AppState) -> ComponentHealth {
    let r = state.models.readiness();
    let status = match &r {
        crate::vlm::Readiness::Ready(_) => "ok",
        crate::vlm::Readiness::NotConfigured(_) => "not_configured",
        crate::vlm::Readiness::Loading(_) => "loading",
        crate::vlm::Readiness::Failed(_) => "failed",
    };
    ComponentHealth {
        status: status.into(),
        detail: r.detail().to_owned(),
    }
}

/// Health of each component; 503 when any is not ok.
#[utoipa::path(get, path = "/health", tag = "health",
    responses((status = 200, body = HealthResponse), (status = 503, description = "A component is unhealthy", body = HealthResponse)))]
pub async fn health(State(state): State<AppState>) -> Response {
    let mut components = std::collections::BTreeMap::new();
    components.insert("database".to_owned(), database(&state).await);
    components.insert("model".to_owned(), model(&state));
    if let Some((jobs, reconnecting)) = state.jobs.redis_health() {
        let (status, detail) = if reconnecting == 0 {
            (
                "ok",
                format!("{jobs} job(s) reading Redis streams, all connected"),
            )
        } else {
            (
                "error",
                format!("{reconnecting} of {jobs} job(s) reading Redis streams are reconnecting"),
            )
        };
        components.insert(
            "redis".to_owned(),
            ComponentHealth {
                status: status.into(),
                detail,
            },
        );
    }
    let healthy = components.values().all(|c| c.status == "ok");
    let body = HealthResponse {
        status: if healthy { "healthy" } else { "unhealthy" }.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_secs: state.started.elapsed().as_secs_f64(),
        draining: state.draining.load(Ordering::Relaxed),
        components,
    };
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

/// 200 only when the database answers, migrations are applied, the model is ready and the
/// service is not draining.
#[utoipa::path(get, path = "/health/ready", tag = "health",
    responses((status = 200, body = ReadyResponse), (status = 503, description = "Not ready; reasons say why", body = ReadyResponse)))]
pub async fn ready(State(state): State<AppState>) -> Response {
    let mut reasons = Vec::new();
    if state.draining.load(Ordering::Relaxed) {
        reasons.push("draining: the service is shutting down".to_owned());
    }
    match tokio::time::timeout(PROBE_TIMEOUT, state.store.migrations_applied()).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            reasons.push("database migrations are not applied: run `free-roam migrate`".to_owned())
        }
        Ok(Err(_)) | Err(_) => reasons.push("database does not answer".to_owned()),
    }
    let readiness = state.models.readiness();
    if !readiness.is_ready() {
        reasons.push(format!("model: {}", readiness.detail()));
    }
    let ready = reasons.is_empty();
    let body = ReadyResponse {
        status: if ready { "ready" } else { "not_ready" }.into(),
        reasons,
    };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

/// 200 while the process serves requests; checks no dependency.
#[utoipa::path(get, path = "/health/live", tag = "health", responses((status = 200, description = "Alive")))]
pub async fn live() -> Response {
    axum::Json(serde_json::json!({"status": "alive"})).into_response()
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "health", responses((status = 200, description = "Prometheus metrics", content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    if let Ok(counts) = state.store.count_by_status().await {
        for (status, n) in counts {
            metrics::gauge!("free_roam_jobs", "status" => status.as_str()).set(n as f64);
        }
    }
    // Jobs running here by source state; a state no job is in any more reads 0.
    static SEEN: std::sync::Mutex<std::collections::BTreeSet<String>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let states = state.jobs.source_states();
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    seen.extend(states.keys().cloned());
    for s in seen.iter() {
        let n = states.get(s).copied().unwrap_or(0);
        metrics::gauge!("free_roam_source_state_jobs", "state" => s.clone()).set(n as f64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
