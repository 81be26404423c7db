//! `/api/v1/inference/*`: start, status, results, cancel and list jobs (the seed's paths).

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody, Json, Path, Query};
use super::AppState;
use crate::answers::structured::ResponseFormat;
use crate::answers::Output;
use crate::domain::{
    ChangeGate, Clip, FileLocation, Fps, Invalid, JobId, JobStatus, Priority, PromptText, Source,
    SourceType, StreamRef,
};
use crate::jobs::{StartError, StartJob};
use crate::store::{CancelOutcome, JobRecord, PromptVersion, ResultRecord};

/// Body of `POST /api/v1/inference/start`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// HLS playlist URL, `redis://host:port[/db]/<key>`, or a bare Redis stream key.
    #[schema(max_length = 2048, example = "https://example.com/live/stream.m3u8")]
    pub stream_ref: String,
    /// The job's own prompt (version 1 of its scope); without it the job follows the global prompt.
    #[schema(max_length = 8192)]
    pub prompt: Option<String>,
    /// Frames per second of media time to sample, 0.1 to 60 (default DEFAULT_FPS).
    #[schema(minimum = 0.1, maximum = 60.0)]
    pub fps: Option<f64>,
    /// Client-chosen id (1-128 of letters, digits, `.`, `_`, `-`); 409 if taken.
    pub job_id: Option<String>,
    /// Model to use; the configured default when absent.
    pub model: Option<String>,
    pub priority: Option<Priority>,
    /// Live HLS: start at the first segment instead of the live edge; Redis: read the whole stream.
    pub from_beginning: Option<bool>,
    /// Also send this job's events to a URL, signed per Standard Webhooks 1.0.
    pub webhook: Option<WebhookRequest>,
    /// A JSON Schema the answers to `prompt` must satisfy (needs `prompt`; at most
    /// MAX_SCHEMA_BYTES): valid answers are stored as JSON values in `output`.
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<Value>,
    /// The job's own alert rules (version 1 of its alert scope; without them the job follows
    /// the global rules): yes/no questions asked about every sampled frame.
    pub alerts: Option<Vec<super::alerts::AlertRuleRequest>>,
    /// How long this job's results and evidence frames are kept, instead of
    /// RESULTS_RETENTION and EVIDENCE_RETENTION.
    pub retention: Option<RetentionRequest>,
    /// Change gating (every source but a replay): a sampled picture goes to the model only when it
    /// changed enough since the last one sent; the others get a result repeating that answer
    /// (`repeats_seq`). Off when absent.
    pub gate: Option<GateRequest>,
    /// Ask about several consecutive samples at once (video sources): one request with
    /// `frames` images in time order; the result covers `pts_ms` to `pts_end_ms`.
    pub clip: Option<ClipRequest>,
}

/// `start`'s `gate`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GateRequest {
    /// `change`, the one mode.
    #[schema(example = "change")]
    pub mode: String,
    /// Share of the picture (above 0, at most 1) that must change, after matching overall
    /// brightness, for the model to see it (default 0.003: see README, "Change gating").
    pub threshold: Option<f64>,
    /// A picture is sent at least this often, changed or not, in media seconds (default 30).
    pub max_interval_s: Option<f64>,
}

/// `start`'s `clip`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClipRequest {
    /// Consecutive samples per request, 2 to 32 (and at most what the model takes).
    pub frames: u32,
    /// Media seconds from one clip's start to the next (default: the clip's own length,
    /// frames / fps, so clips tile the stream); longer leaves samples out between clips.
    pub stride_s: Option<f64>,
}

/// A job's own retention: durations such as `7d`, `24h`, `90m`, or `off` (kept for ever).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionRequest {
    #[schema(example = "30d")]
    pub results: Option<String>,
    #[schema(example = "2h")]
    pub evidence: Option<String>,
}

impl RetentionRequest {
    /// Seconds per kind: `Some(0)` keeps for ever, `None` follows the settings.
    fn parse(self) -> Result<crate::store::JobRetention, Invalid> {
        let secs = |field: &'static str, v: Option<String>| -> Result<Option<i64>, Invalid> {
            v.map(|v| {
                crate::config::parse_retention(&v)
                    .map(|d| d.map_or(0, |d| d.as_secs() as i64))
                    .map_err(|m| Invalid::new(field, format!("retention.{field}: {m}")))
            })
            .transpose()
        };
        Ok(crate::store::JobRetention {
            results_s: secs("results", self.results)?,
            evidence_s: secs("evidence", self.evidence)?,
        })
    }
}

/// A job's own webhook, as `start` takes it. The secret is never shown again.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    /// `http://` or `https://` URL that gets a POST per event; the SSRF guard applies
    /// (ALLOW_PRIVATE_NETWORKS, NETWORK_ALLOWLIST).
    #[schema(max_length = 2048, example = "https://example.com/hooks/free-roam")]
    pub url: String,
    /// `whsec_` + base64 of 24 to 64 random bytes; WEBHOOK_SECRET when absent.
    #[schema(example = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")]
    pub secret: Option<String>,
    /// Which events to send: `result`, `status`, `alert` (default all).
    pub events: Option<Vec<crate::webhook::EventKind>>,
}

impl std::fmt::Debug for WebhookRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookRequest")
            .field("url", &crate::domain::redacted_url(&self.url))
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

impl WebhookRequest {
    fn into_webhook(self, state: &AppState) -> Result<crate::webhook::Webhook, Invalid> {
        use crate::webhook::{EventKind, Secret, Webhook};
        let url = Webhook::check_url("webhook.url", &self.url)?;
        state
            .settings
            .pipeline
            .network_policy()
            .check_url(&url)
            .map_err(|r| Invalid::new("webhook.url", r.to_string()))?;
        let secret = match self.secret.as_deref() {
            Some(s) => Secret::parse("webhook.secret", s)?,
            None => state.settings.webhook_secret.clone().ok_or_else(|| {
                Invalid::new(
                    "webhook.secret",
                    "webhook.secret is required (whsec_...) unless WEBHOOK_SECRET is set",
                )
            })?,
        };
        let events = match self.events {
            None => EventKind::ALL.to_vec(),
            Some(list) => EventKind::parse_list("webhook.events", list.iter().map(|k| k.as_str()))?,
        };
        Ok(Webhook {
            url: url.to_string(),
            secret,
            events,
        })
    }
}

/// One webhook endpoint of a job and how delivery to it goes.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookStatus {
    /// `job` (its own webhook) or `global` (WEBHOOK_URL).
    pub endpoint: String,
    /// The URL (a password in it is hidden).
    pub url: String,
    pub events: Vec<crate::webhook::EventKind>,
    /// Messages waiting to be delivered (being tried, or waiting for their turn).
    pub pending: i64,
    pub delivered: i64,
    /// Given up after WEBHOOK_MAX_AGE_SECS: listed at /api/v1/webhooks/deliveries?state=dead.
    pub dead: i64,
    /// Not sent because the endpoint answered 410 Gone.
    pub cancelled: i64,
    /// Attempts that did not deliver (errors, timeouts, non-2xx answers).
    pub failed_attempts: i64,
    pub last_error: Option<String>,
    pub last_attempt_at: Option<f64>,
    /// The endpoint answered 410 Gone: nothing more is sent to it.
    pub gone: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct StartResponse {
    pub job_id: String,
    pub status: JobStatus,
    pub message: String,
}

/// A job as `status` and `jobs` report it: the seed's fields plus ours.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    pub job_id: String,
    pub status: JobStatus,
    pub stream_ref: String,
    /// The prompt the job uses now.
    pub prompt: Option<String>,
    /// The JSON Schema of that prompt version, if it has one.
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<Value>,
    pub fps: f64,
    /// Epoch seconds.
    pub created_at: f64,
    pub started_at: Option<f64>,
    pub completed_at: Option<f64>,
    pub frames_processed: i64,
    pub results_count: i64,
    pub error: Option<String>,
    pub source_type: SourceType,
    pub model: String,
    pub priority: Priority,
    pub from_beginning: bool,
    /// Version of the prompt the job uses now, within `prompt_scope`.
    pub prompt_version: Option<i64>,
    /// `job` (its own prompt) or `global`.
    pub prompt_scope: Option<String>,
    /// p50/p95/p99 of each phase (queue, preprocess, inference, total) over the newest 1000 results, ms.
    #[schema(value_type = Object)]
    pub latency_ms: Value,
    /// Models the backend holds in memory now: `[{name, bytes}]`.
    #[schema(value_type = Object)]
    pub models_loaded: Value,
    /// Pipeline counters (segments, frames, drops, errors, lag...): live from the replica
    /// that answers when it runs the job, else as its owner saved them (every second).
    #[schema(value_type = Object)]
    pub stats: Value,
    /// The replica running the job (REPLICA_ID, HOSTNAME or a random id); null when none
    /// holds it (waiting to be claimed, or finished and never run).
    pub owner: Option<String>,
    /// Where the job's events are sent (its own webhook, WEBHOOK_URL) and how delivery goes.
    pub webhooks: Vec<WebhookStatus>,
    /// The job's change gate, with its defaults filled in (absent: none).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub gate: Option<ChangeGate>,
    /// The job's clips (absent: one frame per request).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub clip: Option<Clip>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ResultsQuery {
    /// Return results with `seq` greater than this (a previous `next_after`).
    pub after: Option<i64>,
    /// At most this many results, 1 to 1000 (default 100).
    pub limit: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ResultView {
    /// 0, 1, 2 ... contiguous per job.
    pub seq: i64,
    /// Presentation time of the frame, milliseconds from the start of the media the job read.
    pub pts_ms: i64,
    pub prompt_version: i64,
    pub prompt_scope: String,
    pub model: String,
    /// The model's answer: text, or (under a prompt with `response_format`) the JSON value
    /// that satisfied it; null when `error` is set.
    pub output: Option<Value>,
    pub error: Option<String>,
    /// The frame's answers to the job's alert questions (absent when it had none).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<crate::answers::alerts::AlertAnswer>,
    /// Frames in the model call that answered; 0 when the frame was refused before reaching
    /// the model (an undecodable Redis entry: `error` says which entry and why).
    pub batch_size: i64,
    pub created_at: f64,
    /// When the frame was taken by the source's own clock (Unix seconds): an RTSP camera's,
    /// from its RTCP sender reports. Absent where the source does not say.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub captured_at: Option<f64>,
    /// A clip's result: presentation time of its last frame (`pts_ms` is its first's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pts_end_ms: Option<i64>,
    /// A gated result: the picture had not changed enough since the one(s) of result
    /// `repeats_seq` for the model to be asked again; `output` (or `error`) and `alerts` are
    /// that result's. Absent when the model answered this frame. A sampled frame with no
    /// result at all was not seen (dropped from a full live queue: stats.frames_dropped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repeats_seq: Option<i64>,
    /// Milliseconds spent per phase: queue, preprocess, inference, total.
    #[schema(value_type = Object)]
    pub latency_ms: Value,
    /// The frame the model was asked about (JPEG), while it is kept (EVIDENCE,
    /// EVIDENCE_RETENTION).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frame_url: Option<String>,
    /// A replay's result: the result whose frame was asked about again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay_of: Option<ReplayOf>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReplayOf {
    pub job_id: String,
    pub seq: i64,
}

/// Body of `POST /api/v1/inference/replay`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// The job whose stored frames are asked about again.
    pub job_id: String,
    /// First and last result (inclusive) whose frames are replayed; at most MAX_REPLAY_FRAMES.
    pub from_seq: i64,
    pub to_seq: i64,
    /// The new job's own prompt.
    #[schema(max_length = 8192)]
    pub prompt: String,
    /// Model to use; the configured default when absent.
    pub model: Option<String>,
    /// The new job's id (as `start` takes it); a new UUID when absent.
    pub replay_job_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ResultsResponse {
    pub job_id: String,
    pub status: JobStatus,
    pub results: Vec<ResultView>,
    pub total_results: i64,
    /// Pass as `after` to get the next results; unchanged when there are none yet.
    pub next_after: Option<i64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobsQuery {
    /// Only jobs in this status.
    pub status: Option<String>,
    /// At most this many jobs, 1 to 1000 (default 50).
    pub limit: Option<i64>,
    /// A previous `next_after`: continue after it (newest first).
    pub after: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobsResponse {
    pub jobs: Vec<JobView>,
    /// Jobs matching the filter, over all pages.
    pub total: i64,
    /// Pass as `after` for the next page; null on the last page.
    pub next_after: Option<i64>,
}

pub(super) fn limit(value: Option<i64>, default: i64) -> Result<i64, ApiError> {
    match value {
        None => Ok(default),
        Some(n) if (1..=1000).contains(&n) => Ok(n),
        Some(_) => Err(Invalid::new("limit", "limit must be from 1 to 1000").into()),
    }
}

impl StartRequest {
    fn into_job(self, state: &AppState) -> Result<StartJob, Invalid> {
        let settings = &state.settings;
        let stream_ref =
            StreamRef::parse(&self.stream_ref, &settings.redis_host, settings.redis_port)?;
        // A local file is checked now (MEDIA_ROOT, no way out of it, exists), and again when
        // the pipeline opens it.
        if let Source::File(FileLocation::Local(path)) = stream_ref.source() {
            crate::ingest::file::resolve_local(settings.pipeline.media_root.as_deref(), path)
                .map_err(|why| Invalid::new("stream_ref", why))?;
        }
        let prompt = self
            .prompt
            .as_deref()
            .map(|p| PromptText::parse(p, settings.max_prompt_bytes))
            .transpose()?;
        let response_format = match (&self.response_format, &prompt) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(Invalid::new(
                    "response_format",
                    "response_format belongs to the job's own prompt: give prompt too",
                ))
            }
            (Some(f), Some(_)) => Some(
                ResponseFormat::parse(f, settings.max_schema_bytes)?
                    .schema()
                    .to_string(),
            ),
        };
        let alerts = self
            .alerts
            .map(|a| super::alerts::parse_rules(a, settings))
            .transpose()?;
        let fps = Fps::parse(self.fps.unwrap_or(settings.default_fps))?;
        let video = !matches!(
            stream_ref.source(),
            Source::Redis { .. } | Source::Replay { .. }
        );
        let gate = self
            .gate
            .map(|g| {
                ChangeGate::parse(
                    &g.mode,
                    g.threshold,
                    g.max_interval_s,
                    crate::media::gate::DEFAULT_THRESHOLD,
                    crate::media::gate::DEFAULT_MAX_INTERVAL_S,
                )
            })
            .transpose()?;
        let clip = self
            .clip
            .map(|c| Clip::parse(c.frames, c.stride_s, fps))
            .transpose()?;
        if clip.is_some() && !video {
            return Err(Invalid::new(
                "clip",
                "clip works on video sources (HLS, RTSP, files); Redis entries are asked about one by one",
            ));
        }
        let job_id = self.job_id.as_deref().map(JobId::parse).transpose()?;
        let model = match self.model {
            Some(m) if m.trim().is_empty() || m.len() > 256 => {
                return Err(Invalid::new("model", "model must be 1-256 characters"))
            }
            other => other,
        };
        Ok(StartJob {
            job_id,
            stream_ref,
            prompt,
            response_format,
            alerts,
            fps,
            model,
            priority: self.priority.unwrap_or_default(),
            from_beginning: self.from_beginning.unwrap_or(false),
            webhook: self.webhook.map(|w| w.into_webhook(state)).transpose()?,
            retention: self
                .retention
                .map(RetentionRequest::parse)
                .transpose()?
                .unwrap_or_default(),
            gate,
            clip,
        })
    }
}

/// Refuses a clip longer than the job's model takes in one request.
fn check_clip(state: &AppState, req: &StartJob) -> Result<(), Invalid> {
    let (Some(clip), Some(backend)) = (req.clip, state.models.backend()) else {
        return Ok(());
    };
    let model = req
        .model
        .clone()
        .unwrap_or_else(|| state.models.default_name().to_owned());
    let max = backend.max_images(&model);
    if clip.frames as usize > max {
        return Err(Invalid::new(
            "clip.frames",
            format!(
                "model {model} takes at most {max} image{} per request; clip.frames={} asks for more{}",
                if max == 1 { "" } else { "s" },
                clip.frames,
                if max == 1 { "" } else { " (OPENAI_MAX_IMAGES)" },
            ),
        ));
    }
    Ok(())
}

/// Each webhook endpoint of `job` with its delivery counts (one query, only when it has one).
async fn webhook_status(state: &AppState, job: &JobRecord) -> Result<Vec<WebhookStatus>, ApiError> {
    let mut endpoints: Vec<(&str, &str, &[crate::webhook::EventKind])> = Vec::new();
    if let Some(own) = &job.webhook {
        endpoints.push(("job", &own.url, &own.events));
    }
    if let Some(global) = &state.settings.webhooks.global {
        endpoints.push(("global", &global.url, &global.events));
    }
    if endpoints.is_empty() {
        return Ok(Vec::new());
    }
    let summary = state.store.delivery_summary(&job.job_id).await?;
    Ok(endpoints
        .into_iter()
        .map(|(endpoint, url, events)| {
            let s = summary
                .iter()
                .find(|s| s.endpoint == endpoint && s.url == url)
                .cloned()
                .unwrap_or_default();
            WebhookStatus {
                endpoint: endpoint.to_owned(),
                url: crate::domain::redacted_url(url),
                events: events.to_vec(),
                pending: s.pending,
                delivered: s.delivered,
                dead: s.dead,
                cancelled: s.cancelled,
                failed_attempts: s.failed_attempts,
                last_error: s.last_error,
                last_attempt_at: s.last_attempt_at,
                gone: s.gone,
            }
        })
        .collect())
}

/// The API's view of `job`, which uses `prompt` now.
pub(super) async fn job_view(
    state: &AppState,
    job: JobRecord,
    prompt: Option<PromptVersion>,
) -> Result<JobView, ApiError> {
    let webhooks = webhook_status(state, &job).await?;
    let stats = match state.jobs.live_stats(&job.job_id) {
        Some(live) => serde_json::to_value(live).unwrap_or(job.stats),
        None => job.stats,
    };
    let models_loaded: Vec<Value> = state
        .models
        .loaded()
        .into_iter()
        .map(|(name, bytes)| serde_json::json!({"name": name, "bytes": bytes}))
        .collect();
    Ok(JobView {
        latency_ms: job.latency,
        models_loaded: Value::Array(models_loaded),
        prompt: prompt.as_ref().map(|p| p.prompt.clone()),
        response_format: prompt
            .as_ref()
            .and_then(|p| super::prompt::schema_value(p.response_format.as_deref())),
        prompt_version: prompt.as_ref().map(|p| p.version),
        prompt_scope: prompt
            .as_ref()
            .map(|p: &PromptVersion| p.scope.name().to_owned()),
        job_id: job.job_id,
        status: job.status,
        // A password in the reference (rtsp://, redis://, http:// userinfo) is never shown.
        stream_ref: crate::domain::redacted_url(&job.stream_ref),
        fps: job.fps,
        created_at: job.created_at,
        started_at: job.started_at,
        completed_at: job.completed_at,
        frames_processed: job.frames_processed,
        results_count: job.results_count,
        error: job.error,
        source_type: SourceType::from_stored(&job.source_type),
        model: job
            .model
            .unwrap_or_else(|| state.models.default_name().to_owned()),
        priority: job.priority,
        from_beginning: job.from_beginning,
        stats,
        owner: job.owner,
        webhooks,
        gate: job.gate,
        clip: job.clip,
    })
}

/// A result as the API shows it; `frames_from`: the first seq whose evidence frame is kept.
pub(super) fn result_view(job_id: &str, r: &ResultRecord, frames_from: i64) -> ResultView {
    ResultView {
        frame_url: (r.evidence && r.seq >= frames_from)
            .then(|| crate::store::frame_url(job_id, r.seq)),
        replay_of: r.replay_of.as_ref().map(|(job_id, seq)| ReplayOf {
            job_id: job_id.clone(),
            seq: *seq,
        }),
        seq: r.seq,
        pts_ms: r.pts_ms,
        prompt_version: r.prompt_version,
        prompt_scope: r.prompt_scope.clone(),
        model: r.model.clone(),
        output: r.output.as_ref().map(|o| match o {
            Output::Text(t) => Value::String(t.clone()),
            Output::Json(v) => v.clone(),
        }),
        error: r.error.clone(),
        alerts: r.alerts.clone(),
        batch_size: r.batch_size,
        created_at: r.created_at,
        captured_at: r.captured_at,
        pts_end_ms: r.pts_end_ms,
        repeats_seq: r.repeats_seq,
        latency_ms: r.latency.clone(),
    }
}

/// Start inference on a stream. The job is stored as `pending` and picked up by a pipeline.
#[utoipa::path(post, path = "/api/v1/inference/start", tag = "inference",
    request_body = StartRequest,
    responses(
        (status = 202, description = "Job accepted", body = StartResponse),
        (status = 400, description = "Malformed JSON", body = ErrorBody),
        (status = 409, description = "job_id already taken", body = ErrorBody),
        (status = 413, description = "Body over MAX_BODY_BYTES", body = ErrorBody),
        (status = 422, description = "Invalid field (stream_ref form, fps range, prompt size, unknown field)", body = ErrorBody),
        (status = 429, description = "MAX_CONCURRENT_STREAMS jobs already active (code too_many_active_jobs), or rate limited", body = ErrorBody),
    ))]
pub async fn start(
    State(state): State<AppState>,
    Json(body): Json<StartRequest>,
) -> Result<(StatusCode, Json<StartResponse>), ApiError> {
    let req = body.into_job(&state)?;
    check_clip(&state, &req)?;
    admit(&state, req, "Inference job started").await
}

/// Admits a job and answers 202 with `message`, or says why it was refused.
async fn admit(
    state: &AppState,
    req: StartJob,
    message: &str,
) -> Result<(StatusCode, Json<StartResponse>), ApiError> {
    let job = state.jobs.start(req).await.map_err(|e| match e {
        StartError::Conflict(_) => ApiError::Conflict(e.to_string()),
        StartError::AtCapacity { .. } => ApiError::TooManyRequests {
            message: e.to_string(),
            retry_after_secs: 5,
            code: "too_many_active_jobs",
        },
        StartError::Store(e) => e.into(),
    })?;
    Ok((
        StatusCode::ACCEPTED,
        Json(StartResponse {
            job_id: job.job_id,
            status: job.status,
            message: message.to_owned(),
        }),
    ))
}

/// Ask the model again about stored evidence frames of a job, with a new prompt: a new job
/// (its `stream_ref` is `replay://<job_id>/<from>-<to>`) whose results name the originals
/// in `replay_of`, at their original `pts_ms`. Compare prompts on the same frames.
#[utoipa::path(post, path = "/api/v1/inference/replay", tag = "inference",
    request_body = ReplayRequest,
    responses(
        (status = 202, description = "Replay job accepted", body = StartResponse),
        (status = 404, description = "Unknown job", body = ErrorBody),
        (status = 409, description = "replay_job_id already taken", body = ErrorBody),
        (status = 422, description = "Range empty, past the job's results, or over MAX_REPLAY_FRAMES; invalid prompt", body = ErrorBody),
    ))]
pub async fn replay(
    State(state): State<AppState>,
    Json(body): Json<ReplayRequest>,
) -> Result<(StatusCode, Json<StartResponse>), ApiError> {
    let settings = &state.settings;
    let source = JobId::parse(&body.job_id).map_err(ApiError::from)?;
    let job = state
        .store
        .job_brief(source.as_str())
        .await?
        .ok_or_else(|| ApiError::job_not_found(source.as_str()))?;
    let max = settings.evidence.max_replay_frames;
    let (from, to) = (body.from_seq, body.to_seq);
    if from < 0 || to < from {
        return Err(Invalid::new(
            "to_seq",
            "from_seq must be 0 or more and to_seq at least from_seq",
        )
        .into());
    }
    if to - from + 1 > max {
        return Err(Invalid::new(
            "to_seq",
            format!(
                "a replay covers at most {max} frames (MAX_REPLAY_FRAMES); this asks for {}",
                to - from + 1
            ),
        )
        .into());
    }
    if to >= job.results_count {
        return Err(Invalid::new(
            "to_seq",
            format!(
                "job {} has {} results (seqs 0 to {})",
                source,
                job.results_count,
                job.results_count - 1
            ),
        )
        .into());
    }
    let prompt = PromptText::parse(&body.prompt, settings.max_prompt_bytes)?;
    let req = StartJob {
        job_id: body
            .replay_job_id
            .as_deref()
            .map(JobId::parse)
            .transpose()?,
        stream_ref: crate::domain::StreamRef::replay(&source, from, to),
        prompt: Some(prompt),
        response_format: None,
        alerts: None,
        fps: Fps::parse(settings.default_fps)?,
        model: body.model,
        priority: Default::default(),
        from_beginning: true,
        webhook: None,
        retention: Default::default(),
        gate: None,
        clip: None,
    };
    admit(&state, req, "Replay job started").await
}

/// A job's status, counters and current prompt.
#[utoipa::path(get, path = "/api/v1/inference/status/{job_id}", tag = "inference",
    params(("job_id" = String, Path, description = "Job id")),
    responses((status = 200, body = JobView), (status = 404, description = "Unknown job", body = ErrorBody)))]
pub async fn status(
    State(state): State<AppState>,
    Path(job_id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    // An id that cannot be a job's is simply not found.
    let found = match JobId::parse(&job_id) {
        Ok(id) => state.store.job_with_prompt(&id).await?,
        Err(_) => None,
    };
    let (job, prompt) = found.ok_or_else(|| ApiError::job_not_found(&job_id))?;
    Ok(Json(job_view(&state, job, prompt).await?))
}

/// A job's results in `seq` order. Poll with `after=next_after` to get each result exactly once.
#[utoipa::path(get, path = "/api/v1/inference/results/{job_id}", tag = "inference",
    params(("job_id" = String, Path, description = "Job id"), ResultsQuery),
    responses((status = 200, body = ResultsResponse), (status = 404, description = "Unknown job", body = ErrorBody),
        (status = 422, description = "limit or after out of range", body = ErrorBody)))]
pub async fn results(
    State(state): State<AppState>,
    Path(job_id): Path<String>,
    Query(q): Query<ResultsQuery>,
) -> Result<Json<ResultsResponse>, ApiError> {
    let limit = limit(q.limit, 100)?;
    if q.after.is_some_and(|a| a < 0) {
        return Err(Invalid::new("after", "after must be a seq (0 or more)").into());
    }
    let job = state
        .store
        .job_brief(&job_id)
        .await?
        .ok_or_else(|| ApiError::job_not_found(&job_id))?;
    let results = state.store.results(&job_id, &job, q.after, limit).await?;
    let next_after = results.last().map(|r| r.seq).or(q.after);
    let results = results
        .iter()
        .map(|r| result_view(&job_id, r, job.evidence_kept_from))
        .collect();
    Ok(Json(ResultsResponse {
        job_id,
        status: job.status,
        total_results: job.results_count,
        results,
        next_after,
    }))
}

/// The frame result `seq` of a job was answered about (JPEG, at most EVIDENCE_MAX_SIDE on
/// its longest side), while it is kept.
#[utoipa::path(get, path = "/api/v1/inference/results/{job_id}/{seq}/frame", tag = "inference",
    params(("job_id" = String, Path, description = "Job id"), ("seq" = i64, Path, description = "The result's seq")),
    responses((status = 200, description = "The frame", content_type = "image/jpeg"),
        (status = 304, description = "Not modified (If-None-Match)"),
        (status = 404, description = "Unknown job or result, no frame kept, or expired", body = ErrorBody),
        (status = 503, description = "The evidence store (EVIDENCE=directory or s3) cannot be read now", body = ErrorBody)))]
pub async fn frame(
    State(state): State<AppState>,
    Path((job_id, seq)): Path<(String, i64)>,
    headers: axum::http::HeaderMap,
) -> Result<axum::response::Response, ApiError> {
    use axum::http::header;
    use axum::response::IntoResponse;
    let missing = || {
        ApiError::NotFound(format!(
            "no frame for result {seq} of job {job_id:?}: unknown, not kept (EVIDENCE) or expired (EVIDENCE_RETENTION)"
        ))
    };
    if JobId::parse(&job_id).is_err() || seq < 0 {
        return Err(missing());
    }
    // A result's frame never changes: its identity is the job's and the seq.
    let brief = state.store.job_brief(&job_id).await?.ok_or_else(missing)?;
    let etag = format!("\"{}-{seq}\"", brief.list_seq);
    let jpeg = state.store.frame(&job_id, seq).await?.ok_or_else(missing)?;
    let cache = (header::CACHE_CONTROL, "private, max-age=86400, immutable");
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return Ok((
            StatusCode::NOT_MODIFIED,
            [cache, (header::ETAG, etag.as_str())],
        )
            .into_response());
    }
    Ok((
        [
            (header::CONTENT_TYPE, "image/jpeg"),
            cache,
            (header::ETAG, etag.as_str()),
        ],
        jpeg,
    )
        .into_response())
}

/// Cancel a pending or running job; its stored results stay.
#[utoipa::path(delete, path = "/api/v1/inference/cancel/{job_id}", tag = "inference",
    params(("job_id" = String, Path, description = "Job id")),
    responses((status = 200, body = StartResponse), (status = 404, description = "Unknown job", body = ErrorBody),
        (status = 409, description = "Job already finished", body = ErrorBody)))]
pub async fn cancel(
    State(state): State<AppState>,
    Path(job_id): Path<String>,
) -> Result<Json<StartResponse>, ApiError> {
    match state.jobs.cancel(&job_id).await? {
        CancelOutcome::Cancelled(job) => Ok(Json(StartResponse {
            job_id: job.job_id,
            status: JobStatus::Cancelled,
            message: "Job cancelled".to_owned(),
        })),
        CancelOutcome::NotFound => Err(ApiError::job_not_found(&job_id)),
        CancelOutcome::AlreadyFinished(status) => Err(ApiError::Conflict(format!(
            "job {job_id:?} already finished with status {}",
            status.as_str()
        ))),
    }
}

/// Jobs, newest first, optionally filtered by status.
#[utoipa::path(get, path = "/api/v1/inference/jobs", tag = "inference",
    params(JobsQuery),
    responses((status = 200, body = JobsResponse), (status = 422, description = "Unknown status or limit out of range", body = ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    Query(q): Query<JobsQuery>,
) -> Result<Json<JobsResponse>, ApiError> {
    let limit = limit(q.limit, 50)?;
    let status = match q.status.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(JobStatus::parse(s).ok_or_else(|| {
            Invalid::new(
                "status",
                "status must be pending, running, completed, failed or cancelled",
            )
        })?),
    };
    let (jobs, total) = state.store.list_jobs(status, limit, q.after).await?;
    let next_after = if jobs.len() as i64 == limit {
        jobs.last().map(|j| j.list_seq)
    } else {
        None
    };
    let mut views = Vec::with_capacity(jobs.len());
    for job in jobs {
        let id = JobId::parse(&job.job_id).map_err(|e| ApiError::Internal(e.into()))?;
        let prompt = state.store.effective_prompt(&id).await?;
        views.push(job_view(&state, job, prompt).await?);
    }
    Ok(Json(JobsResponse {
        jobs: views,
        total,
        next_after,
    }))
}
