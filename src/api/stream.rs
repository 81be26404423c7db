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
//!
//! `GET /api/v1/events` follows the job event log the same way (every job's status changes,
//! or one job's with `?job_id=`; `id` = the event's id in the log, so it resumes too).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use std::collections::HashMap;

use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use utoipa::IntoParams;

use super::error::ApiError;
use super::inference::result_view;
use super::AppState;
use crate::domain::{Invalid, JobStatus};
use crate::store::{JobBrief, Store};

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
    let after = cursor(&headers, q.after)?;
    if state.store.job_brief(&job_id).await?.is_none() {
        return Err(ApiError::job_not_found(&job_id));
    }
    let permit = stream_slot(&state)?;
    let (tx, rx) = mpsc::channel::<Event>(CLIENT_BUFFER);
    tokio::spawn(follow(state.clone(), job_id, after, tx, permit));
    Ok(sse_response(rx))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only this job's events.
    pub job_id: Option<String>,
    /// Start after this event id (`Last-Event-ID` takes precedence); from the first if absent.
    pub after: Option<i64>,
}

/// Follow job events (status changes; alert events later) of every job or one, as
/// Server-Sent Events.
#[utoipa::path(get, path = "/api/v1/events", tag = "inference",
    params(EventsQuery,
        ("Last-Event-ID" = Option<i64>, Header, description = "The last event id received: resume after it")),
    responses(
        (status = 200, description = "text/event-stream: `status` events (id = event id, data = {job_id, status, error, results_count, at}), `error` when ended by the server", content_type = "text/event-stream", body = String),
        (status = 404, description = "Unknown job", body = super::error::ErrorBody),
        (status = 422, description = "after or Last-Event-ID is not an event id", body = super::error::ErrorBody),
        (status = 429, description = "Rate limited, or MAX_SSE_STREAMS streams are open", body = super::error::ErrorBody)))]
pub async fn events_stream(
    State(state): State<AppState>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let after = cursor(&headers, q.after)?.unwrap_or(0);
    let job_id = q.job_id.filter(|j| !j.is_empty());
    if let Some(id) = &job_id {
        if state.store.job_brief(id).await?.is_none() {
            return Err(ApiError::job_not_found(id));
        }
    }
    let permit = stream_slot(&state)?;
    let (tx, rx) = mpsc::channel::<Event>(CLIENT_BUFFER);
    tokio::spawn(follow_events(state.clone(), job_id, after, tx, permit));
    Ok(sse_response(rx))
}

/// Sends the event log from `after` on, then follows it.
async fn follow_events(
    state: AppState,
    job_id: Option<String>,
    mut after: i64,
    tx: mpsc::Sender<Event>,
    _permit: OwnedSemaphorePermit,
) {
    let mut changes = state.store.changes();
    let job: Option<Arc<str>> = job_id.as_deref().map(Arc::from);
    let ended = async {
        loop {
            loop {
                let Ok(page) = state.store.events(after, job_id.as_deref(), PAGE).await else {
                    break;
                };
                if page.is_empty() {
                    break;
                }
                for e in &page {
                    let mut data = e.data.clone();
                    data["at"] = json!(e.created_at);
                    let event = Event::default()
                        .event(e.kind.as_str())
                        .id(e.id.to_string())
                        .data(data.to_string());
                    send(&tx, event).await?;
                    after = e.id;
                }
            }
            wait_for_change(&tx, &mut changes, job.as_ref()).await?;
        }
        #[allow(unreachable_code)]
        Ok::<(), Ended>(())
    };
    if let Err(Ended::Slow) = ended.await {
        tracing::info!("event stream ended: the client was too slow");
    }
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

/// Waits until `job` (any job when `None`) changes, the re-read floor passes, or the client
/// leaves.
async fn wait_for_change(
    tx: &mpsc::Sender<Event>,
    changes: &mut tokio::sync::broadcast::Receiver<Arc<str>>,
    job: Option<&Arc<str>>,
) -> Result<(), Ended> {
    let deadline = tokio::time::sleep(REREAD);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = tx.closed() => return Err(Ended::Gone),
            _ = &mut deadline => return Ok(()),
            c = changes.recv() => match c {
                Ok(id) if job.is_none_or(|j| *j == id) => return Ok(()),
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return Ok(()),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Err(Ended::Gone),
            },
        }
    }
}

/// The stream's starting point: `Last-Event-ID` if sent, else `?after=`; both must be
/// non-negative integers.
fn cursor(headers: &HeaderMap, after: Option<i64>) -> Result<Option<i64>, ApiError> {
    let after = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .filter(|a| *a >= 0)
                .ok_or_else(|| {
                    Invalid::new(
                        "Last-Event-ID",
                        "Last-Event-ID must be a non-negative integer",
                    )
                })?,
        ),
        None => after,
    };
    if after.is_some_and(|a| a < 0) {
        return Err(Invalid::new("after", "after must be 0 or more").into());
    }
    Ok(after)
}

/// A slot under MAX_SSE_STREAMS, or 429.
fn stream_slot(state: &AppState) -> Result<OwnedSemaphorePermit, ApiError> {
    state
        .sse_streams
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::TooManyRequests {
            message: format!(
                "{} event streams are open (MAX_SSE_STREAMS); retry later or poll",
                state.settings.max_sse_streams
            ),
            retry_after_secs: 5,
            code: "too_many_streams",
        })
}

/// The response that sends what `follow` queues on `rx`.
fn sse_response(rx: mpsc::Receiver<Event>) -> Response {
    let events = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEPALIVE).text("keepalive"))
        .into_response()
}

async fn follow(
    state: AppState,
    job_id: String,
    mut after: Option<i64>,
    tx: mpsc::Sender<Event>,
    _permit: OwnedSemaphorePermit,
) {
    let mut feed = state.feeds.subscribe(&state.store, &job_id);
    let mut last_status = None;
    let mut fresh = true;
    let ended = async {
        loop {
            // The job as the store says now (at first, or when the feed was replaced), else as
            // the job's shared feed last read it (it re-reads at least every REREAD itself):
            // one read per change, however many streams.
            let shared = feed.borrow_and_update().clone();
            let job = match shared.filter(|_| !fresh) {
                Some(job) => job,
                None => match state.store.job_brief(&job_id).await {
                    Ok(Some(job)) => job,
                    _ => return Err(Ended::Gone),
                },
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
                    let data = r.encoded.get_or_init(|| {
                        serde_json::to_string(&result_view(&job_id, r, job.evidence_kept_from))
                            .unwrap_or_default()
                    });
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
            tokio::select! {
                _ = tx.closed() => return Err(Ended::Gone),
                changed = feed.changed() => {
                    fresh = changed.is_err();
                    if fresh {
                        // The feed is gone (it ends with no streams left): follow a new one.
                        feed = state.feeds.subscribe(&state.store, &job_id);
                    }
                }
            }
        }
    };
    match ended.await {
        Ok(()) | Err(Ended::Gone) => {}
        Err(Ended::Slow) => tracing::info!(job_id, "result stream ended: the client was too slow"),
    }
}

/// One store reader per followed job, shared by all of its result streams: it reads the job
/// (and its new results, into the store's cache) once per change and publishes the job's
/// status and result count; each stream then reads its pages from the cache. A thousand
/// clients on one job cost one store read per result, not a thousand.
#[derive(Default)]
pub struct Feeds {
    live: Arc<std::sync::Mutex<HashMap<String, watch::Receiver<Option<JobBrief>>>>>,
}

impl Feeds {
    /// The job's feed, started if none runs.
    fn subscribe(&self, store: &Store, job_id: &str) -> watch::Receiver<Option<JobBrief>> {
        let mut live = self.live.lock().expect("not poisoned");
        if let Some(rx) = live.get(job_id).filter(|rx| rx.has_changed().is_ok()) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(None);
        live.insert(job_id.to_owned(), rx.clone());
        let store = store.clone();
        let job_id = job_id.to_owned();
        let registry = self.live.clone();
        tokio::spawn(async move {
            feed(&store, &job_id, tx).await;
            // Forget it, unless a new feed for the job has started meanwhile.
            let mut live = registry.lock().expect("not poisoned");
            if live
                .get(&job_id)
                .is_some_and(|rx| rx.has_changed().is_err())
            {
                live.remove(&job_id);
            }
        });
        rx
    }
}

/// Reads `job_id` when it changes (or every REREAD) while anyone follows it.
async fn feed(store: &Store, job_id: &str, tx: watch::Sender<Option<JobBrief>>) {
    let mut changes = store.changes();
    let me: Arc<str> = Arc::from(job_id);
    let mut published: Option<(JobStatus, i64)> = None;
    // The registry holds one receiver; with no stream left, the feed ends.
    while tx.receiver_count() > 1 {
        if let Ok(Some(job)) = store.job_brief(job_id).await {
            let now = (job.status, job.results_count);
            if published != Some(now) {
                // Warm the cache with the new rows before streams ask for them.
                let from = published.map_or(job.results_count, |(_, n)| n);
                let new = (job.results_count - from).clamp(0, PAGE);
                let _ = store
                    .results(job_id, &job, (from > 0).then(|| from - 1), new)
                    .await;
                published = Some(now);
                tx.send_replace(Some(job));
            }
        }
        let deadline = tokio::time::sleep(REREAD);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => break,
                c = changes.recv() => match c {
                    Ok(id) if id == me => break,
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }
}
