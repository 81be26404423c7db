//! What is pushed to users, kept durably: the job event log (`job_events`, read by
//! `GET /api/v1/events`) and the webhook outbox (`webhook_deliveries`).
//!
//! Both are written inside the transaction that stores the result or changes the status they
//! tell of, so a crash can lose neither the change nor its message, and a rolled-back change
//! sends nothing. A job's messages are ordered by `id`: every transaction that queues one for a
//! job first writes (on PostgreSQL: locks) the job's row, so ids are taken in commit order per
//! job. Event-log writes take a transaction-level advisory lock on PostgreSQL for the same
//! reason across jobs (status changes are rare; results do not go through the log).

use serde_json::{json, Value};
use sqlx::Row;

use super::*;
use crate::webhook::{envelope, EventKind, Webhook};

/// WEBHOOK_URL as the store needs it to queue messages (the secret is the sender's business).
#[derive(Debug, Clone)]
pub struct GlobalWebhook {
    pub url: String,
    pub events: Vec<EventKind>,
}

/// Which webhook a message goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EndpointKind {
    /// The job's own (`webhook` at start).
    Job,
    /// WEBHOOK_URL.
    Global,
}

impl EndpointKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointKind::Job => "job",
            EndpointKind::Global => "global",
        }
    }

    fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "job" => Ok(EndpointKind::Job),
            "global" => Ok(EndpointKind::Global),
            _ => Err(StoreError::Corrupt(format!("webhook endpoint {s:?}"))),
        }
    }
}

/// One entry of the job event log.
#[derive(Debug, Clone)]
pub struct JobEvent {
    pub id: i64,
    pub job_id: String,
    pub kind: String,
    pub data: Value,
    pub created_at: f64,
}

/// One webhook message to one endpoint, and how its delivery went.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: i64,
    /// The `webhook-id` header: the same on every attempt.
    pub msg_id: String,
    pub job_id: String,
    pub endpoint: EndpointKind,
    pub url: String,
    pub kind: String,
    pub payload: String,
    /// pending, delivered, dead or cancelled.
    pub state: String,
    pub attempts: i64,
    pub created_at: f64,
    pub queued_at: f64,
    pub next_attempt_at: f64,
    pub last_attempt_at: Option<f64>,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub delivered_at: Option<f64>,
}

/// How one endpoint of a job is doing, for the job's status.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EndpointSummary {
    pub endpoint: &'static str,
    pub url: String,
    pub pending: i64,
    pub delivered: i64,
    pub dead: i64,
    pub cancelled: i64,
    /// Attempts that did not deliver (timeouts, refused connections, non-2xx answers).
    pub failed_attempts: i64,
    pub last_error: Option<String>,
    pub last_attempt_at: Option<f64>,
    /// The endpoint answered 410 Gone: nothing more goes to it.
    pub gone: bool,
}

/// What asking to send a delivery again did.
#[derive(Debug)]
pub enum Resend {
    Queued(Box<Delivery>),
    NotFound,
    /// Only dead deliveries are sent again; this one is in another state.
    NotDead(String),
    /// The endpoint answered 410 Gone.
    Gone,
}

const DELIVERY_COLUMNS: &str =
    "id, msg_id, job_id, endpoint, url, type, payload, state, attempts, created_at, \
     queued_at, next_attempt_at, last_attempt_at, last_status, last_error, delivered_at";

fn delivery_from_row(r: &AnyRow) -> Result<Delivery, StoreError> {
    let endpoint: String = r.try_get(3)?;
    Ok(Delivery {
        id: r.try_get(0)?,
        msg_id: r.try_get(1)?,
        job_id: r.try_get(2)?,
        endpoint: EndpointKind::parse(&endpoint)?,
        url: r.try_get(4)?,
        kind: r.try_get(5)?,
        payload: r.try_get(6)?,
        state: r.try_get(7)?,
        attempts: r.try_get(8)?,
        created_at: r.try_get(9)?,
        queued_at: r.try_get(10)?,
        next_attempt_at: r.try_get(11)?,
        last_attempt_at: r.try_get(12)?,
        last_status: r.try_get(13)?,
        last_error: r.try_get(14)?,
        delivered_at: r.try_get(15)?,
    })
}

/// A job's own webhook from its stored column.
pub(super) fn parse_webhook(stored: Option<&str>) -> Result<Option<Webhook>, StoreError> {
    stored
        .map(|s| serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("webhook: {e}"))))
        .transpose()
}

pub(super) type Tx = sqlx::Transaction<'static, sqlx::Any>;

/// A row of `SELECT id, job_id, type, data, created_at FROM job_events`.
pub(super) fn event_from_row(r: &AnyRow) -> Result<JobEvent, StoreError> {
    let data: String = r.try_get(3)?;
    Ok(JobEvent {
        id: r.try_get(0)?,
        job_id: r.try_get(1)?,
        kind: r.try_get(2)?,
        data: serde_json::from_str(&data).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        created_at: r.try_get(4)?,
    })
}

impl Store {
    /// Queues messages for WEBHOOK_URL too (set once at start).
    pub fn with_global_webhook(mut self, global: Option<GlobalWebhook>) -> Self {
        self.global_webhook = global.map(Arc::new);
        self
    }

    /// Inside `tx`: queues a message of type `msg_type` (an event of `kind`) carrying `data`
    /// for every endpoint of the job that wants `kind` (its own webhook, stored as
    /// `job_webhook`, and WEBHOOK_URL), unless the endpoint answered 410 Gone.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn queue_webhooks(
        &self,
        tx: &mut Tx,
        job_id: &str,
        job_webhook: Option<&str>,
        kind: EventKind,
        msg_type: &str,
        data: Value,
        at: f64,
    ) -> Result<(), StoreError> {
        let own = parse_webhook(job_webhook)?;
        let mut targets: Vec<(EndpointKind, &str)> = Vec::new();
        if let Some(hook) = own.as_ref().filter(|h| h.wants(kind)) {
            targets.push((EndpointKind::Job, &hook.url));
        }
        if let Some(global) = self
            .global_webhook
            .as_deref()
            .filter(|g| g.events.contains(&kind))
        {
            targets.push((EndpointKind::Global, &global.url));
        }
        if targets.is_empty() {
            return Ok(());
        }
        let body = envelope(msg_type, at, data).to_string();
        for (endpoint, url) in targets {
            sqlx::query(
                "INSERT INTO webhook_deliveries (msg_id, job_id, endpoint, url, type, payload, created_at, queued_at, next_attempt_at) \
                 SELECT $1, $2, $3, $4, $5, $6, $7, $7, $7 WHERE NOT EXISTS (SELECT 1 FROM webhook_gone WHERE url = $4)",
            )
            .bind(format!("msg_{}", uuid::Uuid::new_v4().simple()))
            .bind(job_id)
            .bind(endpoint.as_str())
            .bind(url)
            .bind(msg_type)
            .bind(&body)
            .bind(at)
            .execute(&mut **tx)
            .await?;
        }
        self.outbox_queued
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Whether a webhook message was queued here since the last call.
    pub fn take_outbox_hint(&self) -> bool {
        self.outbox_queued
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }

    /// Inside `tx`, after the job's row changed status: the event log entry and the webhook
    /// messages that tell of it.
    pub(super) async fn status_changed(
        &self,
        tx: &mut Tx,
        job_id: &str,
        status: JobStatus,
        error: Option<&str>,
        results_count: i64,
        job_webhook: Option<&str>,
    ) -> Result<(), StoreError> {
        let at = now_secs();
        let data = json!({
            "job_id": job_id,
            "status": status.as_str(),
            "error": error,
            "results_count": results_count,
        });
        self.log_event(tx, job_id, "status", &data, at).await?;
        self.queue_webhooks(
            tx,
            job_id,
            job_webhook,
            EventKind::Status,
            "status",
            data,
            at,
        )
        .await
    }

    /// Inside `tx`: appends an entry to the job event log.
    pub(super) async fn log_event(
        &self,
        tx: &mut Tx,
        job_id: &str,
        kind: &str,
        data: &Value,
        at: f64,
    ) -> Result<(), StoreError> {
        if self.dialect == Dialect::Postgres {
            // Event ids in commit order, so a reader following `id > cursor` misses none.
            sqlx::query("SELECT pg_advisory_xact_lock(7265747)")
                .execute(&mut **tx)
                .await?;
        }
        sqlx::query(
            "INSERT INTO job_events (job_id, type, data, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(job_id)
        .bind(kind)
        .bind(data.to_string())
        .bind(at)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Job events with `id > after`, oldest first, of one job or all, at most `limit`.
    pub async fn events(
        &self,
        after: i64,
        job_id: Option<&str>,
        limit: i64,
    ) -> Result<Vec<JobEvent>, StoreError> {
        let rows = sqlx::query(limited(
            "SELECT id, job_id, type, data, created_at FROM job_events \
             WHERE id > $1 AND ($2 IS NULL OR job_id = $2) ORDER BY id",
            limit,
        ))
        .bind(after)
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    /// A job's own webhook (with its secret, for signing).
    pub async fn job_webhook(&self, job_id: &str) -> Result<Option<Webhook>, StoreError> {
        let row = sqlx::query("SELECT webhook FROM jobs WHERE job_id = $1")
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => parse_webhook(r.try_get::<Option<String>, _>(0)?.as_deref()),
            None => Ok(None),
        }
    }

    /// The first pending message of each (job, endpoint) whose turn has come: due, not being
    /// sent by anyone, and with nothing older pending for the same job and endpoint.
    pub async fn due_deliveries(&self, limit: i64) -> Result<Vec<Delivery>, StoreError> {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries o \
             WHERE o.state = 'pending' AND o.next_attempt_at <= $1 \
             AND (o.locked_until IS NULL OR o.locked_until < $1) \
             AND NOT EXISTS (SELECT 1 FROM webhook_deliveries p WHERE p.job_id = o.job_id \
                 AND p.endpoint = o.endpoint AND p.state = 'pending' AND p.id < o.id) \
             ORDER BY o.id"
        );
        let rows = sqlx::query(limited(&sql, limit))
            .bind(now_secs())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(delivery_from_row).collect()
    }

    /// The oldest pending message of a job to one endpoint, due or not.
    pub async fn delivery_head(
        &self,
        job_id: &str,
        endpoint: EndpointKind,
    ) -> Result<Option<Delivery>, StoreError> {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries \
             WHERE job_id = $1 AND endpoint = $2 AND state = 'pending' ORDER BY id"
        );
        let row = sqlx::query(limited(&sql, 1))
            .bind(job_id)
            .bind(endpoint.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(delivery_from_row).transpose()
    }

    /// Takes a pending message for sending until `until` (epoch seconds); false when another
    /// sender has it or it is no longer pending.
    pub async fn lock_delivery(
        &self,
        id: i64,
        owner: &str,
        until: f64,
    ) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE webhook_deliveries SET locked_until = $3, locked_by = $2 \
             WHERE id = $1 AND state = 'pending' AND (locked_until IS NULL OR locked_until < $4)",
        )
        .bind(id)
        .bind(owner)
        .bind(until)
        .bind(now_secs())
        .execute(&self.writer)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Records a 2xx answer.
    pub async fn delivery_succeeded(&self, id: i64, status: u16) -> Result<(), StoreError> {
        let now = now_secs();
        sqlx::query(
            "UPDATE webhook_deliveries SET state = 'delivered', attempts = attempts + 1, last_attempt_at = $2, \
             last_status = $3, delivered_at = $2, locked_until = NULL, locked_by = NULL WHERE id = $1",
        )
        .bind(id)
        .bind(now)
        .bind(i64::from(status))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Records a failed attempt: tried again at `retry_at`, or dead when `None`.
    pub async fn delivery_failed(
        &self,
        id: i64,
        status: Option<u16>,
        error: &str,
        retry_at: Option<f64>,
    ) -> Result<(), StoreError> {
        let now = now_secs();
        sqlx::query(
            "UPDATE webhook_deliveries SET state = $5, attempts = attempts + 1, last_attempt_at = $2, \
             last_status = $3, last_error = $4, next_attempt_at = $6, locked_until = NULL, locked_by = NULL \
             WHERE id = $1",
        )
        .bind(id)
        .bind(now)
        .bind(status.map(i64::from))
        .bind(error)
        .bind(if retry_at.is_some() { "pending" } else { "dead" })
        .bind(retry_at.unwrap_or(now))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// An endpoint answered 410 Gone to message `id`: it gets nothing more. Its pending
    /// messages (of every job) are cancelled and none are queued for it from now on.
    pub async fn endpoint_gone(&self, id: i64, url: &str) -> Result<(), StoreError> {
        let now = now_secs();
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO webhook_gone (url, at) VALUES ($1, $2) ON CONFLICT (url) DO NOTHING",
        )
        .bind(url)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, last_attempt_at = $2, last_status = 410 \
             WHERE id = $1",
        )
        .bind(id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE webhook_deliveries SET state = 'cancelled', locked_until = NULL, locked_by = NULL, \
             last_error = 'the endpoint answered 410 Gone: nothing more is sent to it' \
             WHERE url = $1 AND state = 'pending'",
        )
        .bind(url)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Whether `url` answered 410 Gone.
    async fn endpoint_is_gone(&self, url: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query("SELECT 1 FROM webhook_gone WHERE url = $1")
            .bind(url)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }

    /// Deliveries newest first, filtered by state and job; `before` is a previous page's
    /// last id.
    pub async fn deliveries(
        &self,
        state: Option<&str>,
        job_id: Option<&str>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Delivery>, StoreError> {
        let sql = format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries \
             WHERE ($1 IS NULL OR state = $1) AND ($2 IS NULL OR job_id = $2) AND ($3 IS NULL OR id < $3) \
             ORDER BY id DESC"
        );
        let rows = sqlx::query(limited(&sql, limit))
            .bind(state)
            .bind(job_id)
            .bind(before)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(delivery_from_row).collect()
    }

    /// Sends a dead delivery again: pending from now, with a fresh WEBHOOK_MAX_AGE_SECS.
    pub async fn resend_delivery(&self, msg_id: &str) -> Result<Resend, StoreError> {
        let sql = format!("SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE msg_id = $1");
        let Some(row) = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(msg_id)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(Resend::NotFound);
        };
        let d = delivery_from_row(&row)?;
        if self.endpoint_is_gone(&d.url).await? {
            return Ok(Resend::Gone);
        }
        let now = now_secs();
        let n = sqlx::query(
            "UPDATE webhook_deliveries SET state = 'pending', queued_at = $2, next_attempt_at = $2 \
             WHERE msg_id = $1 AND state = 'dead'",
        )
        .bind(msg_id)
        .bind(now)
        .execute(&self.writer)
        .await?
        .rows_affected();
        if n == 0 {
            return Ok(Resend::NotDead(d.state));
        }
        self.changed_here(&d.job_id);
        Ok(Resend::Queued(Box::new(Delivery {
            state: "pending".into(),
            queued_at: now,
            next_attempt_at: now,
            ..d
        })))
    }

    /// Delivery counts per endpoint of a job, for its status; empty when it has none.
    pub async fn delivery_summary(&self, job_id: &str) -> Result<Vec<EndpointSummary>, StoreError> {
        let rows = sqlx::query(
            "SELECT endpoint, url, state, COUNT(*), CAST(SUM(attempts) AS BIGINT), MAX(last_attempt_at) FROM webhook_deliveries \
             WHERE job_id = $1 GROUP BY endpoint, url, state",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        let mut out: Vec<EndpointSummary> = Vec::new();
        for r in &rows {
            let endpoint = EndpointKind::parse(&r.try_get::<String, _>(0)?)?.as_str();
            let url: String = r.try_get(1)?;
            let state: String = r.try_get(2)?;
            let count: i64 = r.try_get(3)?;
            let attempts: i64 = r.try_get::<Option<i64>, _>(4)?.unwrap_or(0);
            let last: Option<f64> = r.try_get(5)?;
            let i = match out
                .iter()
                .position(|s| s.endpoint == endpoint && s.url == url)
            {
                Some(i) => i,
                None => {
                    out.push(EndpointSummary {
                        endpoint,
                        url: url.clone(),
                        ..Default::default()
                    });
                    out.len() - 1
                }
            };
            let s = &mut out[i];
            match state.as_str() {
                "pending" => s.pending += count,
                "delivered" => {
                    s.delivered += count;
                    // Each delivered message's last attempt succeeded.
                    s.failed_attempts -= count;
                }
                "dead" => s.dead += count,
                _ => s.cancelled += count,
            }
            s.failed_attempts += attempts;
            s.last_attempt_at = match (s.last_attempt_at, last) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
        }
        for s in &mut out {
            let last = sqlx::query(limited(
                "SELECT last_error FROM webhook_deliveries WHERE job_id = $1 AND url = $2 \
                 AND last_error IS NOT NULL ORDER BY last_attempt_at DESC",
                1,
            ))
            .bind(job_id)
            .bind(&s.url)
            .fetch_optional(&self.pool)
            .await?;
            s.last_error = last.map(|r| r.try_get(0)).transpose()?;
            s.gone = self.endpoint_is_gone(&s.url).await?;
        }
        Ok(out)
    }
}
