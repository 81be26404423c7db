//! Alert rules and alert events: `/api/v1/alerts/*` appends, reads and lists versions of a
//! scope's rules (global or one job's, like prompts), and `GET /api/v1/inference/alerts/{job_id}`
//! lists a job's `alert.started` / `alert.ended` events with the rules and state in force.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody, Json, Path, Query};
use super::inference::limit;
use super::prompt::scope;
use super::AppState;
use crate::answers::alerts::{check_set, AlertRule};
use crate::config::Settings;
use crate::domain::{Invalid, JobId};
use crate::store::{AlertSetVersion, PromptScope};

/// One alert rule as a request gives it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertRuleRequest {
    /// 1-64 of letters, digits, `.`, `_`, `-`; unique within the set.
    #[schema(example = "person_at_gate")]
    pub name: String,
    /// A yes/no question asked about every sampled frame (at most MAX_PROMPT_BYTES).
    #[schema(example = "Is there a person at the gate?")]
    pub question: String,
    /// Answers in a row that start or end the alert (1 to 100, default 2): a single odd
    /// frame changes nothing.
    pub min_consecutive: Option<u32>,
}

/// Checks a request's rules: each one, their number (MAX_ALERTS) and unique names.
pub(super) fn parse_rules(
    rules: Vec<AlertRuleRequest>,
    settings: &Settings,
) -> Result<Vec<AlertRule>, Invalid> {
    let rules = rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            AlertRule::parse(
                i,
                &r.name,
                &r.question,
                r.min_consecutive,
                settings.max_prompt_bytes,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    check_set(&rules, settings.max_alerts)?;
    Ok(rules)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateAlertsRequest {
    /// The scope's whole new rule set (an empty list turns alerts off for the scope).
    pub alerts: Vec<AlertRuleRequest>,
    /// Apply to this job only; without it the global rules change.
    pub job_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AlertRuleView {
    pub name: String,
    pub question: String,
    pub min_consecutive: u32,
}

/// One version of a scope's alert rules.
#[derive(Debug, Serialize, ToSchema)]
pub struct AlertSetView {
    /// Rises by 1 within a scope; events name the version whose answers fired them.
    pub version: i64,
    /// `global` or `job`.
    pub scope: String,
    pub job_id: Option<String>,
    pub alerts: Vec<AlertRuleView>,
    /// When this version was written (epoch seconds).
    pub created_at: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AlertHistory {
    pub history: Vec<AlertSetView>,
    /// Versions in the scope.
    pub total: i64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AlertsQuery {
    /// A job's rules instead of the global ones.
    pub job_id: Option<String>,
    /// History only: at most this many versions, newest first (default 10, at most 1000).
    pub limit: Option<i64>,
}

fn view(s: AlertSetVersion) -> AlertSetView {
    AlertSetView {
        version: s.version,
        scope: s.scope.name().to_owned(),
        job_id: s.scope.job_id().map(|id| id.to_string()),
        alerts: s
            .rules
            .into_iter()
            .map(|r| AlertRuleView {
                name: r.name,
                question: r.question,
                min_consecutive: r.min_consecutive,
            })
            .collect(),
        created_at: s.created_at,
    }
}

/// Append a new version of a scope's alert rules. Running jobs ask the new questions about
/// every frame sent to the model after this; their alert state carries over by name.
#[utoipa::path(post, path = "/api/v1/alerts/update", tag = "alerts",
    request_body = UpdateAlertsRequest,
    responses((status = 200, body = AlertSetView), (status = 404, description = "Unknown job", body = ErrorBody),
        (status = 422, description = "Empty question, bad name, duplicate names, more than MAX_ALERTS, min_consecutive out of range", body = ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    Json(body): Json<UpdateAlertsRequest>,
) -> Result<Json<AlertSetView>, ApiError> {
    let rules = parse_rules(body.alerts, &state.settings)?;
    let scope = scope(&state, body.job_id.as_deref()).await?;
    let set = state.store.append_alerts(&scope, &rules).await?;
    tracing::info!(
        scope = scope.name(),
        job_id = body.job_id.as_deref(),
        version = set.version,
        alerts = rules.len(),
        "alert rules updated"
    );
    Ok(Json(view(set)))
}

/// The alert rules in force: a job's own newest set, else the global one.
#[utoipa::path(get, path = "/api/v1/alerts/current", tag = "alerts", params(AlertsQuery),
    responses((status = 200, body = AlertSetView), (status = 404, description = "Unknown job, or no rules set", body = ErrorBody)))]
pub async fn current(
    State(state): State<AppState>,
    Query(q): Query<AlertsQuery>,
) -> Result<Json<AlertSetView>, ApiError> {
    let set = match scope(&state, q.job_id.as_deref()).await? {
        PromptScope::Job(id) => state.store.effective_alerts(&id).await?,
        PromptScope::Global => state.store.current_alerts(&PromptScope::Global).await?,
    };
    let set = set.ok_or_else(|| ApiError::NotFound("no alert rules have been set".into()))?;
    Ok(Json(view(set)))
}

/// Versions of one scope's alert rules, newest first.
#[utoipa::path(get, path = "/api/v1/alerts/history", tag = "alerts", params(AlertsQuery),
    responses((status = 200, body = AlertHistory), (status = 404, description = "Unknown job", body = ErrorBody),
        (status = 422, description = "limit out of range", body = ErrorBody)))]
pub async fn history(
    State(state): State<AppState>,
    Query(q): Query<AlertsQuery>,
) -> Result<Json<AlertHistory>, ApiError> {
    let limit = limit(q.limit, 10)?;
    let scope = scope(&state, q.job_id.as_deref()).await?;
    let (versions, total) = state.store.alert_history(&scope, limit).await?;
    Ok(Json(AlertHistory {
        history: versions.into_iter().map(view).collect(),
        total,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AlertEventsQuery {
    /// Events with an id greater than this (a previous `next_after`).
    pub after: Option<i64>,
    /// At most this many events, 1 to 1000 (default 100).
    pub limit: Option<i64>,
}

/// One `alert.started` or `alert.ended` event.
#[derive(Debug, Serialize, ToSchema)]
pub struct AlertEventView {
    /// Rises with every event of the service (the job event log's id, as `/api/v1/events`).
    pub id: i64,
    /// `alert.started` or `alert.ended`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `{job_id, alert, alert_version, question, from_pts_ms, to_pts_ms, seqs,
    /// started_pts_ms?}`: the run of answers that made the change (their media times and
    /// result seqs) and, for `alert.ended`, when the episode began.
    #[schema(value_type = Object)]
    pub data: Value,
    /// When it was stored (epoch seconds).
    pub created_at: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AlertEventsResponse {
    pub job_id: String,
    /// The rules the job's frames are asked now, if any.
    pub rules: Option<AlertSetView>,
    /// Names of the job's alerts that are on now (started and not yet ended).
    pub active: Vec<String>,
    pub events: Vec<AlertEventView>,
    /// Pass as `after` to get the next events; unchanged when there are none yet.
    pub next_after: Option<i64>,
}

/// A job's alert events, oldest first: each change of an alert's state, once.
#[utoipa::path(get, path = "/api/v1/inference/alerts/{job_id}", tag = "alerts",
    params(("job_id" = String, Path, description = "Job id"), AlertEventsQuery),
    responses((status = 200, body = AlertEventsResponse), (status = 404, description = "Unknown job", body = ErrorBody),
        (status = 422, description = "limit or after out of range", body = ErrorBody)))]
pub async fn events(
    State(state): State<AppState>,
    Path(job_id): Path<String>,
    Query(q): Query<AlertEventsQuery>,
) -> Result<Json<AlertEventsResponse>, ApiError> {
    let limit = limit(q.limit, 100)?;
    if q.after.is_some_and(|a| a < 0) {
        return Err(Invalid::new("after", "after must be an event id (0 or more)").into());
    }
    let id = JobId::parse(&job_id).map_err(|_| ApiError::job_not_found(&job_id))?;
    state
        .store
        .job_brief(&job_id)
        .await?
        .ok_or_else(|| ApiError::job_not_found(&job_id))?;
    // Events first, then the state: `active` is then never older than the events listed
    // (read the other way round, a result stored between the two reads could list an
    // alert.started while `active` still said off).
    let events = state
        .store
        .alert_events(&job_id, q.after.unwrap_or(0), limit)
        .await?;
    let rules = state.store.effective_alerts(&id).await?;
    let tracker = state.store.alert_state(&job_id).await?;
    let active = rules
        .iter()
        .flat_map(|s| &s.rules)
        .filter(|r| tracker.is_on(&r.name))
        .map(|r| r.name.clone())
        .collect();
    let next_after = events.last().map(|e| e.id).or(q.after);
    Ok(Json(AlertEventsResponse {
        rules: rules.map(view),
        active,
        events: events
            .into_iter()
            .map(|e| AlertEventView {
                id: e.id,
                kind: e.kind,
                data: e.data,
                created_at: e.created_at,
            })
            .collect(),
        next_after,
        job_id,
    }))
}
