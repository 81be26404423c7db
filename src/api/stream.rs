//! Results pushed as they are stored: `GET /api/v1/inference/results/{job_id}/stream`, a
//! Server-Sent Events stream with the polling API's guarantee — every result once, in `seq`
//! order, resumable with `Last-Event-ID` (or `?after=`).
//!
//! The stream always reads the store from its cursor; notifications only wake it (a store
//! write here, or on PostgreSQL any replica's via LISTEN/NOTIFY, with a one-second re-read as
//! the floor). So catching up and following live are one loop with no gap and no repeat.
//! Events: `result` (id = seq, data = the result as `/results` shows it), `status` (the job's
//! status when it changes), `end` (after a finished job's last result), and `error` when the
//! stream is ended by the server (a client too slow for its buffer). A comment every 15 s
//! keeps idle connections open. Streams are capped by `MAX_SSE_STREAMS`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use utoipa::IntoParams;

use super::error::ApiError;
use super::inference::result_view;
use super::AppState;
use crate::domain::Invalid;

/// Events a client may have waiting before it counts as too slow.
const CLIENT_BUFFER: usize = 256;
/// How long a full buffer may stay full before the client is ended.
const SLOW_CLIENT_GRACE: Duration = Duration::from_secs(10);
/// The floor under notifications: the store is read again at least this often.
const REREAD: Duration = Duration::from_secs(1);
const KEEPALIVE: Duration = Duration::from_secs(15);
const PAGE: i64 = 100;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Start after this seq (`Last-Event-ID` takes precedence); from the first result if absent.
    pub after: Option<i64>,
}

/// Follow a job's results as Server-Sent Events.
#[utoipa::path(get, path = "/api/v1/inference/results/{job_id}/stream", tag = "inference",
    params(("job_id" = String, Path, description = "Job id"), StreamQuery,
        ("Last-Event-ID" = Option<i64>, Header, description = "The last seq received: resume after it")),
    responses(
        (status = 200, description = "text/event-stream: `result` (id = seq), `status`, `end`, `error` events", content_type = "text/event-stream", body = String),
        (status = 401, description = "API key required", body = super::error::ErrorBody),
        (status = 404, description = "Unknown job", body = super::error::ErrorBody),
        (status = 422, description = "after or Last-Event-ID is not a seq", body = super::error::ErrorBody),
        (status = 429, description = "Rate limited, or MAX_SSE_STREAMS streams are open", body = super::error::ErrorBody)))]
pub async fn results_stream(
    State(state): State<AppState>,
    Path(job_id): Path<String>,
    Query(q): Query<StreamQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let after = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .filter(|a| *a >= 0)
                .ok_or_else(|| Invalid::new("Last-Event-ID", "Last-Event-ID must be a seq"))?,
        ),
        None => q.after,
    };
    if after.is_some_and(|a| a < 0) {
        return Err(Invalid::new("after", "after must be a seq (0 or more)").into());
    }
    if state.store.job_brief(&job_id).await?.is_none() {
        return Err(ApiError::job_not_found(&job_id));
    }
    let permit =
        state
            .sse_streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::TooManyRequests {
                message: format!(
                    "{} result streams are open (MAX_SSE_STREAMS); retry later or poll /results",
                    state.settings.max_sse_streams
                ),
                retry_after_secs: 5,
                code: "too_many_streams",
            })?;
    let (tx, rx) = mpsc::channel::<Event>(CLIENT_BUFFER);
    tokio::spawn(follow(state.clone(), job_id, after, tx, permit));
    let events = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEPALIVE).text("keepalive"))
        .into_response())
}

/// Why a stream stopped early.
enum Ended {
    /// The client went away.
    Gone,
    /// The client did not read for SLOW_CLIENT_GRACE with its buffer full.
    Slow,
}

/// Queues `event`; a client whose buffer stays full is ended with a last `error` event,
/// which the one slot kept free for it carries.
async fn send(tx: &mpsc::Sender<Event>, event: Event) -> Result<(), Ended> {
    let waited = tokio::time::Instant::now();
    while tx.capacity() <= 1 {
        if tx.is_closed() {
            return Err(Ended::Gone);
        }
        if waited.elapsed() >= SLOW_CLIENT_GRACE {
            let last = Event::default().event("error").data(
                json!({"code": "slow_consumer", "detail": "the client read too slowly for its buffer; reconnect with Last-Event-ID to resume"})
                    .to_string(),
            );
            let _ = tx.try_send(last);
            return Err(Ended::Slow);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tx.send(event).await.map_err(|_| Ended::Gone)
}

async fn follow(
    state: AppState,
    job_id: String,
    mut after: Option<i64>,
    tx: mpsc::Sender<Event>,
    _permit: OwnedSemaphorePermit,
) {
    let mut changes = state.store.changes();
    let mut last_status = None;
    let me: Arc<str> = Arc::from(job_id.as_str());
    let ended = async {
        loop {
            let Ok(Some(job)) = state.store.job_brief(&job_id).await else {
                return Err(Ended::Gone);
            };
            if last_status != Some(job.status) {
                last_status = Some(job.status);
                let data = json!({"job_id": job_id, "status": job.status.as_str()});
                send(&tx, Event::default().event("status").data(data.to_string())).await?;
            }
            loop {
                let Ok(page) = state.store.results(&job_id, &job, after, PAGE).await else {
                    break;
                };
                if page.is_empty() {
                    break;
                }
                for r in &page {
                    let data = serde_json::to_string(&result_view(r)).unwrap_or_default();
                    let event = Event::default()
                        .event("result")
                        .id(r.seq.to_string())
                        .data(data);
                    send(&tx, event).await?;
                    after = Some(r.seq);
                }
            }
            let delivered = after.map_or(0, |a| a + 1);
            if !job.status.is_active() && delivered >= job.results_count {
                let data = json!({"job_id": job_id, "status": job.status.as_str(), "results": job.results_count});
                send(&tx, Event::default().event("end").data(data.to_string())).await?;
                return Ok(());
            }
            // Wait for this job to change (or the floor), or the client to leave.
            let deadline = tokio::time::sleep(REREAD);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = tx.closed() => return Err(Ended::Gone),
                    _ = &mut deadline => break,
                    c = changes.recv() => match c {
                        Ok(id) if id == me => break,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return Err(Ended::Gone),
                    },
                }
            }
        }
    };
    match ended.await {
        Ok(()) | Err(Ended::Gone) => {}
        Err(Ended::Slow) => tracing::info!(job_id, "result stream ended: the client was too slow"),
    }
}
