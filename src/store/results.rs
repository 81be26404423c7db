//! Results: appended with contiguous seqs (with the alert state and events they move, in
//! the same transaction), read in pages (from memory when cached), and the newest latencies.

use serde_json::Value;
use sqlx::Row;

use super::*;
use crate::answers::alerts::AlertTracker;

impl Store {
    /// Stores one result with the job's next `seq` and bumps its `results_count`, atomically,
    /// under the pipeline's lease ([`StoreError::Fenced`] once it has passed on). A result
    /// whose `source_key` the job already has is not stored again: [`Appended::Duplicate`].
    ///
    /// `alerts` is the job's alert state before this result; the result's alert answers move
    /// it (saved, and its events logged and queued, in the same transaction), and it is
    /// updated here only once that commits — a duplicate or a failure leaves it as it was.
    pub async fn append_result(
        &self,
        job_id: &str,
        lease: &Lease,
        result: &NewResult,
        alerts: &mut AlertTracker,
    ) -> Result<Appended, StoreError> {
        let mut tx = self.begin_write().await?;
        // On PostgreSQL the row lock orders this against a claim of the job: a claim either
        // waits for this result or fences it.
        let lock = match self.dialect {
            Dialect::Postgres => " FOR UPDATE",
            Dialect::Sqlite => "",
        };
        let sql = format!(
            "SELECT results_count, webhook FROM jobs WHERE job_id = $1 AND owner = $2 AND lease_token = $3{lock}"
        );
        let Some(row) = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(job_id)
            .bind(lease.owner.as_ref())
            .bind(lease.token)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Err(StoreError::Fenced);
        };
        let seq: i64 = row.try_get(0)?;
        let webhook: Option<String> = row.try_get(1)?;
        let created_at = now_secs();
        let (output, format, error) = match &result.output {
            Ok(o) => (Some(o.to_stored()), o.format(), None),
            Err(e) => (None, None, Some(e.as_str())),
        };
        let answers = result
            .alerts
            .as_ref()
            .map(|(_, a)| a)
            .filter(|a| !a.is_empty());
        let keeps = result.evidence.is_some() && self.evidence.keeps();
        let inserted = sqlx::query(
            "INSERT INTO results (job_id, seq, pts_ms, prompt_scope, prompt_version, model, output, error, batch_size, latency, created_at, source_key, output_format, alerts, evidence, replay_job, replay_seq, captured_at, pts_end_ms, repeats_seq) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20) \
             ON CONFLICT (job_id, source_key) DO NOTHING",
        )
        .bind(job_id)
        .bind(seq)
        .bind(result.pts_ms)
        .bind(&result.prompt_scope)
        .bind(result.prompt_version)
        .bind(&result.model)
        .bind(output.as_deref())
        .bind(error)
        .bind(result.batch_size)
        .bind(result.latency.to_string())
        .bind(created_at)
        .bind(&result.source_key)
        .bind(format)
        .bind(answers.map(|a| serde_json::to_string(a).expect("alert answers serialise")))
        .bind(i64::from(keeps))
        .bind(result.replay_of.as_ref().map(|(j, _)| j.as_str()))
        .bind(result.replay_of.as_ref().map(|(_, s)| *s))
        .bind(result.captured_at)
        .bind(result.pts_end_ms)
        .bind(result.repeats_seq)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            tx.rollback().await?;
            return Ok(Appended::Duplicate);
        }
        let mut kept = false;
        if let (true, Some(jpeg)) = (keeps, &result.evidence) {
            kept = self
                .keep_frame(&mut tx, job_id, seq, jpeg, created_at)
                .await?;
            if !kept {
                sqlx::query("UPDATE results SET evidence = 0 WHERE job_id = $1 AND seq = $2")
                    .bind(job_id)
                    .bind(seq)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        sqlx::query("UPDATE jobs SET results_count = results_count + 1 WHERE job_id = $1")
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        let mut data = serde_json::json!({
            "job_id": job_id,
            "seq": seq,
            "pts_ms": result.pts_ms,
            "prompt_version": result.prompt_version,
            "prompt_scope": result.prompt_scope,
            "model": result.model,
            "output": result.output.as_ref().ok(),
            "error": error,
            "batch_size": result.batch_size,
            "created_at": created_at,
            "latency_ms": result.latency,
        });
        if let Some(answers) = answers {
            // As the results API shows it: present only when the frame was asked questions.
            data["alerts"] = serde_json::to_value(answers).expect("alert answers serialise");
        }
        if kept {
            data["frame_url"] = frame_url(job_id, seq).into();
        }
        if let Some(at) = result.captured_at {
            data["captured_at"] = at.into();
        }
        if let Some(end) = result.pts_end_ms {
            data["pts_end_ms"] = end.into();
        }
        if let Some(repeats) = result.repeats_seq {
            data["repeats_seq"] = repeats.into();
        }
        if let Some((job, seq)) = &result.replay_of {
            data["replay_of"] = serde_json::json!({"job_id": job, "seq": seq});
        }
        self.queue_webhooks(
            &mut tx,
            job_id,
            webhook.as_deref(),
            crate::webhook::EventKind::Result,
            "result",
            data,
            created_at,
        )
        .await?;
        let moved = self
            .alerts_answered(&mut tx, job_id, webhook.as_deref(), seq, result, alerts)
            .await?;
        if self.dialect == Dialect::Postgres {
            // Other replicas' result streams hear of it when (and only if) it commits, in
            // the same transaction rather than one more per result.
            sqlx::query(super::NOTIFY_CHANGES)
                .bind(job_id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        if let Some(moved) = moved {
            *alerts = moved;
        }
        self.changed_here(job_id);
        Ok(Appended::New { seq, frame: kept })
    }

    /// Results of `job` with `seq > after`, in seq order, at most `limit`. Seqs below the
    /// job's `results_count` are contiguous and immutable: a page within them is served from
    /// memory when every row is there; a page past them is empty without a query.
    pub async fn results(
        &self,
        job_id: &str,
        job: &JobBrief,
        after: Option<i64>,
        limit: i64,
    ) -> Result<Vec<Arc<ResultRecord>>, StoreError> {
        // Below `results_kept_from` retention deleted them (maybe on another replica): not
        // asked for, and never served from the cache.
        let first = after.map_or(0, |a| a + 1).max(job.results_kept_from);
        let end = first.saturating_add(limit).min(job.results_count);
        if end <= first {
            return Ok(Vec::new());
        }
        let cached: Option<Vec<Arc<ResultRecord>>> = (first..end)
            .map(|seq| self.results_cache.get(&(job.list_seq, seq)))
            .collect();
        if let Some(page) = cached {
            return Ok(page);
        }
        let sql = format!(
            "SELECT {RESULT_COLUMNS} FROM results WHERE job_id = $1 AND seq > $2 ORDER BY seq"
        );
        let rows = sqlx::query(limited(&sql, limit))
            .bind(job_id)
            .bind(first - 1)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let record = Arc::new(record_from_row(r)?);
                self.results_cache
                    .insert((job.list_seq, record.seq), record.clone());
                Ok(record)
            })
            .collect()
    }

    /// The job's newest result the model answered (not a gated repeat, not a frame refused
    /// before the model saw it): what a gated picture's result repeats after a restart.
    pub async fn last_answer(&self, job_id: &str) -> Result<Option<ResultRecord>, StoreError> {
        let sql = format!(
            "SELECT {RESULT_COLUMNS} FROM results WHERE job_id = $1 AND batch_size > 0 AND repeats_seq IS NULL ORDER BY seq DESC LIMIT 1"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(record_from_row).transpose()
    }

    /// The `latency` of a job's newest results (at most `limit`), for percentiles.
    pub async fn recent_latencies(
        &self,
        job_id: &str,
        limit: i64,
    ) -> Result<Vec<Value>, StoreError> {
        let rows = sqlx::query(limited(
            "SELECT latency FROM results WHERE job_id = $1 ORDER BY seq DESC",
            limit,
        ))
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let text: String = r.try_get(0)?;
                serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .collect()
    }
}

/// The columns [`record_from_row`] reads, in its order.
const RESULT_COLUMNS: &str = "seq, pts_ms, prompt_scope, prompt_version, model, output, error, batch_size, latency, created_at, output_format, alerts, evidence, replay_job, replay_seq, captured_at, pts_end_ms, repeats_seq";

fn record_from_row(r: &sqlx::any::AnyRow) -> Result<ResultRecord, StoreError> {
    let latency: String = r.try_get(8)?;
    let format: Option<String> = r.try_get(10)?;
    let alerts: Option<String> = r.try_get(11)?;
    let output: Option<String> = r.try_get(5)?;
    Ok(ResultRecord {
        seq: r.try_get(0)?,
        pts_ms: r.try_get(1)?,
        prompt_scope: r.try_get(2)?,
        prompt_version: r.try_get(3)?,
        model: r.try_get(4)?,
        output: output
            .map(|o| Output::from_stored(o, format.as_deref()))
            .transpose()
            .map_err(StoreError::Corrupt)?,
        alerts: alerts
            .map(|a| serde_json::from_str(&a))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("alert answers: {e}")))?
            .unwrap_or_default(),
        error: r.try_get(6)?,
        batch_size: r.try_get(7)?,
        latency: serde_json::from_str(&latency).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        created_at: r.try_get(9)?,
        captured_at: r.try_get(15)?,
        pts_end_ms: r.try_get(16)?,
        repeats_seq: r.try_get(17)?,
        evidence: r.try_get::<i64, _>(12)? != 0,
        replay_of: match (r.try_get::<Option<String>, _>(13)?, r.try_get(14)?) {
            (Some(job), Some(seq)) => Some((job, seq)),
            _ => None,
        },
        encoded: Default::default(),
    })
}
