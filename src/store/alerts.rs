//! Alert rule sets (append-only versions per scope, like prompts), the set in force for a job,
//! a job's saved alert state, and its alert events (entries of the job event log whose type
//! is `alert.started` or `alert.ended`, written with the result that fired them).

use sqlx::Row;

use super::prompts::insert_next_version;
use super::push::{event_from_row, Tx};
use super::*;
use crate::answers::alerts::{AlertEvent, AlertTracker};
use crate::webhook::EventKind;

impl Store {
    /// Appends the next version of `scope`'s alert rules.
    pub async fn append_alerts(
        &self,
        scope: &PromptScope,
        rules: &[AlertRule],
    ) -> Result<AlertSetVersion, StoreError> {
        let key = scope.key();
        let text = serde_json::to_string(rules).expect("alert rules serialise");
        insert_next_version(|| {
            sqlx::query(
                "INSERT INTO alert_versions (scope_key, version, alerts, created_at) \
                 SELECT $1, COALESCE(MAX(version), 0) + 1, $2, $3 FROM alert_versions WHERE scope_key = $1",
            )
            .bind(&key)
            .bind(&text)
            .bind(now_secs())
            .execute(&self.writer)
        })
        .await?;
        self.current_alerts(scope)
            .await?
            .ok_or_else(|| StoreError::Corrupt("alert set vanished after insert".into()))
    }

    /// The newest version of `scope`'s rules, if it has any.
    pub async fn current_alerts(
        &self,
        scope: &PromptScope,
    ) -> Result<Option<AlertSetVersion>, StoreError> {
        Ok(self.alert_history(scope, 1).await?.0.into_iter().next())
    }

    /// Newest first, at most `limit`, and how many versions the scope holds.
    pub async fn alert_history(
        &self,
        scope: &PromptScope,
        limit: i64,
    ) -> Result<(Vec<AlertSetVersion>, i64), StoreError> {
        let key = scope.key();
        let rows = sqlx::query(limited(
            "SELECT version, alerts, created_at FROM alert_versions WHERE scope_key = $1 ORDER BY version DESC",
            limit,
        ))
        .bind(&key)
        .fetch_all(&self.pool)
        .await?;
        let total = self.count_versions("alert_versions", &key).await?;
        let versions = rows
            .iter()
            .map(|r| alert_set_from_row(r, scope.clone(), 0))
            .collect::<Result<_, _>>()?;
        Ok((versions, total))
    }

    /// The alert rules a job uses now: its own newest set, else the newest global one.
    pub async fn effective_alerts(
        &self,
        job_id: &JobId,
    ) -> Result<Option<AlertSetVersion>, StoreError> {
        let own = PromptScope::Job(job_id.clone()).key();
        let row = sqlx::query(
            "SELECT scope_key, version, alerts, created_at FROM alert_versions \
             WHERE scope_key IN ($1, 'global') \
             ORDER BY CASE WHEN scope_key = 'global' THEN 1 ELSE 0 END, version DESC LIMIT 1",
        )
        .bind(&own)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let key: String = r.try_get(0)?;
            let scope = if key == own {
                PromptScope::Job(job_id.clone())
            } else {
                PromptScope::Global
            };
            alert_set_from_row(&r, scope, 1)
        })
        .transpose()
    }

    /// The job's alert state after its newest stored result (empty before the first).
    pub async fn alert_state(&self, job_id: &str) -> Result<AlertTracker, StoreError> {
        let row = sqlx::query("SELECT alert_state FROM jobs WHERE job_id = $1")
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await?;
        let text: Option<String> = match row {
            Some(r) => r.try_get(0)?,
            None => None,
        };
        text.map_or(Ok(AlertTracker::default()), |t| {
            serde_json::from_str(&t).map_err(|e| StoreError::Corrupt(format!("alert state: {e}")))
        })
    }

    /// A job's alert events with `id > after`, oldest first, at most `limit`.
    pub async fn alert_events(
        &self,
        job_id: &str,
        after: i64,
        limit: i64,
    ) -> Result<Vec<JobEvent>, StoreError> {
        let rows = sqlx::query(limited(
            "SELECT id, job_id, type, data, created_at FROM job_events \
             WHERE job_id = $1 AND id > $2 AND type IN ('alert.started', 'alert.ended') ORDER BY id",
            limit,
        ))
        .bind(job_id)
        .bind(after)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_from_row).collect()
    }

    /// Inside the transaction storing result `seq`: applies its alert answers to `state`
    /// (the job's state before it), saves the new state, and logs and queues the events it
    /// fires. Returns the new state, to be kept once the transaction commits.
    pub(super) async fn alerts_answered(
        &self,
        tx: &mut Tx,
        job_id: &str,
        job_webhook: Option<&str>,
        seq: i64,
        result: &NewResult,
        state: &AlertTracker,
    ) -> Result<Option<AlertTracker>, StoreError> {
        let Some((set, answers)) = &result.alerts else {
            return Ok(None);
        };
        let mut next = state.clone();
        let events = next.apply(seq, result.pts_ms, &set.rules, answers);
        if next == *state {
            return Ok(None);
        }
        sqlx::query("UPDATE jobs SET alert_state = $2 WHERE job_id = $1")
            .bind(job_id)
            .bind(serde_json::to_string(&next).expect("alert state serialises"))
            .execute(&mut **tx)
            .await?;
        for event in &events {
            self.alert_fired(tx, job_id, job_webhook, event).await?;
        }
        Ok(Some(next))
    }

    async fn alert_fired(
        &self,
        tx: &mut Tx,
        job_id: &str,
        job_webhook: Option<&str>,
        event: &AlertEvent,
    ) -> Result<(), StoreError> {
        let at = now_secs();
        let mut data = serde_json::to_value(event).expect("an alert event serialises");
        data["job_id"] = job_id.into();
        let kind = event.change.event_type();
        self.log_event(tx, job_id, kind, &data, at).await?;
        self.queue_webhooks(tx, job_id, job_webhook, EventKind::Alert, kind, data, at)
            .await
    }
}

fn alert_set_from_row(
    r: &AnyRow,
    scope: PromptScope,
    first: usize,
) -> Result<AlertSetVersion, StoreError> {
    let text: String = r.try_get(first + 1)?;
    Ok(AlertSetVersion {
        scope,
        version: r.try_get(first)?,
        rules: serde_json::from_str(&text)
            .map_err(|e| StoreError::Corrupt(format!("alert rules: {e}")))?,
        created_at: r.try_get(first + 2)?,
    })
}
