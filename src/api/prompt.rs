//! `/api/v1/prompt/*`: append, read and list prompt versions, global or per job. A version
//! may carry a `response_format` (JSON Schema) that every answer under it must satisfy.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody, Json, Query};
use super::AppState;
use crate::answers::structured::ResponseFormat;
use crate::domain::{JobId, PromptText};
use crate::store::{PromptScope, PromptVersion};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdatePromptRequest {
    /// The new prompt text (at most MAX_PROMPT_BYTES).
    pub prompt: String,
    /// A JSON Schema every answer under this version must satisfy (at most MAX_SCHEMA_BYTES):
    /// valid answers are stored as JSON values in `output`, others as the frame's error.
    /// Without it the new version takes free-text answers.
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<Value>,
    /// Apply to this job only; without it the global prompt changes.
    pub job_id: Option<String>,
    /// Accepted for compatibility with the seed; history is always kept (versions are immutable).
    pub preserve_previous: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PromptView {
    pub prompt: String,
    /// The JSON Schema answers under this version must satisfy; null for free text.
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<Value>,
    /// Rises by 1 within a scope.
    pub version: i64,
    /// `global` or `job`.
    pub scope: String,
    pub job_id: Option<String>,
    /// When this version was written (epoch seconds).
    pub timestamp: f64,
    /// When the scope's first version was written.
    pub created_at: f64,
    /// When this version was written.
    pub updated_at: f64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PromptQuery {
    /// A job's prompt instead of the global one.
    pub job_id: Option<String>,
    /// History only: at most this many versions, newest first (default 10, at most 1000).
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PromptHistory {
    pub history: Vec<PromptView>,
    /// Versions in the scope.
    pub total: i64,
}

fn view(p: PromptVersion, job_id: Option<&str>) -> PromptView {
    PromptView {
        response_format: schema_value(p.response_format.as_deref()),
        prompt: p.prompt,
        version: p.version,
        scope: p.scope.name().to_owned(),
        job_id: job_id.map(str::to_owned),
        timestamp: p.created_at,
        created_at: p.scope_created_at,
        updated_at: p.created_at,
    }
}

/// A stored `response_format` as JSON (it was checked when set).
pub(super) fn schema_value(stored: Option<&str>) -> Option<Value> {
    stored.and_then(|s| serde_json::from_str(s).ok())
}

/// The scope a `job_id` names; 404 if the job does not exist.
pub(super) async fn scope(state: &AppState, job_id: Option<&str>) -> Result<PromptScope, ApiError> {
    match job_id {
        None => Ok(PromptScope::Global),
        Some(id) => {
            let parsed = JobId::parse(id).map_err(|_| ApiError::job_not_found(id))?;
            state
                .store
                .get_job(id)
                .await?
                .ok_or_else(|| ApiError::job_not_found(id))?;
            Ok(PromptScope::Job(parsed))
        }
    }
}

/// Append a new prompt version. Running jobs use it for every frame sent to the model after this.
#[utoipa::path(post, path = "/api/v1/prompt/update", tag = "prompt",
    request_body = UpdatePromptRequest,
    responses((status = 200, body = PromptView), (status = 404, description = "Unknown job", body = ErrorBody),
        (status = 413, description = "Body over MAX_BODY_BYTES", body = ErrorBody),
        (status = 422, description = "Empty or oversized prompt, invalid or oversized response_format, unknown field", body = ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    Json(body): Json<UpdatePromptRequest>,
) -> Result<Json<PromptView>, ApiError> {
    let text = PromptText::parse(&body.prompt, state.settings.max_prompt_bytes)?;
    let format = body
        .response_format
        .as_ref()
        .map(|f| ResponseFormat::parse(f, state.settings.max_schema_bytes))
        .transpose()?;
    let scope = scope(&state, body.job_id.as_deref()).await?;
    let stored = format.as_ref().map(|f| f.schema().to_string());
    let version = state
        .store
        .append_prompt(&scope, text.as_str(), stored.as_deref())
        .await?;
    tracing::info!(
        scope = scope.name(),
        job_id = body.job_id.as_deref(),
        version = version.version,
        "prompt updated"
    );
    Ok(Json(view(version, body.job_id.as_deref())))
}

/// The prompt in force: a job's own newest version, else the global one.
#[utoipa::path(get, path = "/api/v1/prompt/current", tag = "prompt", params(PromptQuery),
    responses((status = 200, body = PromptView), (status = 404, description = "Unknown job or no prompt", body = ErrorBody)))]
pub async fn current(
    State(state): State<AppState>,
    Query(q): Query<PromptQuery>,
) -> Result<Json<PromptView>, ApiError> {
    let prompt = match scope(&state, q.job_id.as_deref()).await? {
        PromptScope::Job(id) => state.store.effective_prompt(&id).await?,
        PromptScope::Global => state.store.current_prompt(&PromptScope::Global).await?,
    };
    let prompt = prompt.ok_or_else(|| ApiError::NotFound("no prompt has been set".into()))?;
    Ok(Json(view(prompt, q.job_id.as_deref())))
}

/// Versions of one scope, newest first.
#[utoipa::path(get, path = "/api/v1/prompt/history", tag = "prompt", params(PromptQuery),
    responses((status = 200, body = PromptHistory), (status = 404, description = "Unknown job", body = ErrorBody),
        (status = 422, description = "limit out of range", body = ErrorBody)))]
pub async fn history(
    State(state): State<AppState>,
    Query(q): Query<PromptQuery>,
) -> Result<Json<PromptHistory>, ApiError> {
    let limit = super::inference::limit(q.limit, 10)?;
    let scope = scope(&state, q.job_id.as_deref()).await?;
    let (versions, total) = state.store.prompt_history(&scope, limit).await?;
    Ok(Json(PromptHistory {
        history: versions
            .into_iter()
            .map(|v| view(v, q.job_id.as_deref()))
            .collect(),
        total,
    }))
}
