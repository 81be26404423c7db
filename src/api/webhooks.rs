//! `/api/v1/webhooks/deliveries`: the webhook outbox as users see it — every message with its
//! delivery state, filterable (dead ones above all), and a dead message sent again on request.
//! Secrets never appear here; URLs are shown without passwords.

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody, Json, Path, Query};
use super::AppState;
use crate::domain::Invalid;
use crate::store::{Delivery, Resend};

const STATES: [&str; 4] = ["pending", "delivered", "dead", "cancelled"];

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeliveriesQuery {
    /// Only deliveries in this state: pending, delivered, dead or cancelled (410 Gone).
    pub state: Option<String>,
    /// Only this job's.
    pub job_id: Option<String>,
    /// At most this many, 1 to 1000 (default 100).
    pub limit: Option<i64>,
    /// A previous page's `next_before`: older deliveries than it (newest first).
    pub before: Option<i64>,
}

/// One webhook message to one endpoint.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryView {
    /// The `webhook-id` header: the same on every attempt (receivers deduplicate on it).
    pub id: String,
    pub job_id: String,
    /// `job` (the job's own webhook) or `global` (WEBHOOK_URL).
    pub endpoint: String,
    pub url: String,
    /// The event type: `result` or `status`.
    #[serde(rename = "type")]
    pub kind: String,
    /// pending, delivered, dead or cancelled.
    pub state: String,
    pub attempts: i64,
    pub created_at: f64,
    /// When it was last queued (created, or sent again): WEBHOOK_MAX_AGE_SECS counts from here.
    pub queued_at: f64,
    /// When the next attempt is due (pending only).
    pub next_attempt_at: Option<f64>,
    pub last_attempt_at: Option<f64>,
    /// HTTP status of the last answer, if there was one.
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub delivered_at: Option<f64>,
    /// The body sent: `{type, timestamp, data}`.
    #[schema(value_type = Object)]
    pub payload: Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveriesResponse {
    pub deliveries: Vec<DeliveryView>,
    /// Pass as `before` for the next (older) page; null on the last page.
    pub next_before: Option<i64>,
}

fn view(d: Delivery) -> DeliveryView {
    DeliveryView {
        payload: serde_json::from_str(&d.payload).unwrap_or(Value::Null),
        next_attempt_at: (d.state == "pending").then_some(d.next_attempt_at),
        id: d.msg_id,
        job_id: d.job_id,
        endpoint: d.endpoint.as_str().to_owned(),
        url: crate::domain::redacted_url(&d.url),
        kind: d.kind,
        state: d.state,
        attempts: d.attempts,
        created_at: d.created_at,
        queued_at: d.queued_at,
        last_attempt_at: d.last_attempt_at,
        last_status: d.last_status,
        last_error: d.last_error,
        delivered_at: d.delivered_at,
    }
}

/// Webhook deliveries, newest first: each message to each endpoint with its state, attempts
/// and last error.
#[utoipa::path(get, path = "/api/v1/webhooks/deliveries", tag = "webhooks",
    params(DeliveriesQuery),
    responses((status = 200, body = DeliveriesResponse),
        (status = 422, description = "Unknown state, or limit out of range", body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<DeliveriesQuery>,
) -> Result<Json<DeliveriesResponse>, ApiError> {
    let limit = match q.limit {
        None => 100,
        Some(n) if (1..=1000).contains(&n) => n,
        Some(_) => return Err(Invalid::new("limit", "limit must be from 1 to 1000").into()),
    };
    let wanted = q.state.as_deref().filter(|s| !s.is_empty());
    if let Some(s) = wanted {
        if !STATES.contains(&s) {
            return Err(Invalid::new(
                "state",
                "state must be pending, delivered, dead or cancelled",
            )
            .into());
        }
    }
    let rows = state
        .store
        .deliveries(wanted, q.job_id.as_deref(), q.before, limit)
        .await?;
    let next_before = if rows.len() as i64 == limit {
        rows.last().map(|d| d.id)
    } else {
        None
    };
    Ok(Json(DeliveriesResponse {
        deliveries: rows.into_iter().map(view).collect(),
        next_before,
    }))
}

/// Send a dead delivery again: it is pending at once, before the job's newer messages to
/// the same endpoint, with a fresh WEBHOOK_MAX_AGE_SECS.
#[utoipa::path(post, path = "/api/v1/webhooks/deliveries/{id}/resend", tag = "webhooks",
    params(("id" = String, Path, description = "The delivery's id (its webhook-id)")),
    responses((status = 202, body = DeliveryView),
        (status = 404, description = "Unknown delivery", body = ErrorBody),
        (status = 409, description = "Not dead (pending or delivered), or the endpoint answered 410 Gone", body = ErrorBody)))]
pub async fn resend(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<DeliveryView>), ApiError> {
    match state.store.resend_delivery(&id).await? {
        Resend::Queued(d) => Ok((StatusCode::ACCEPTED, Json(view(*d)))),
        Resend::NotFound => Err(ApiError::NotFound(format!("delivery {id:?} not found"))),
        Resend::NotDead(s) => Err(ApiError::Conflict(format!(
            "delivery {id:?} is {s}: only dead deliveries are sent again"
        ))),
        Resend::Gone => Err(ApiError::Conflict(format!(
            "delivery {id:?} goes to an endpoint that answered 410 Gone; nothing more is sent to it"
        ))),
    }
}
