//! Job rows: admission under MAX_CONCURRENT_STREAMS, lifecycle, stats and resume progress.

use serde_json::Value;
use sqlx::Row;

use super::*;

impl Store {
    /// Inserts a pending job (and its own prompt as version 1 of its scope) unless the id is
    /// taken or `max_active` jobs are already pending or running.
    pub async fn create_job(
        &self,
        job: &NewJob,
        max_active: usize,
    ) -> Result<JobRecord, CreateJobError> {
        let _guard = self.admission.lock().await;
        let mut tx = self.begin_write().await?;
        if self.dialect == Dialect::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock(7265746)")
                .execute(&mut *tx)
                .await?;
        }
        let active: i64 =
            sqlx::query("SELECT COUNT(*) FROM jobs WHERE status IN ('pending', 'running')")
                .fetch_one(&mut *tx)
                .await?
                .try_get(0)?;
        if active >= max_active as i64 {
            return Err(CreateJobError::TooManyActive { active });
        }
        let exists = sqlx::query("SELECT 1 FROM jobs WHERE job_id = $1")
            .bind(job.job_id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_some() {
            return Err(CreateJobError::Conflict);
        }
        let now = now_secs();
        let webhook = job
            .webhook
            .as_ref()
            .map(|w| serde_json::to_string(w).expect("a webhook serialises"));
        sqlx::query(
            "INSERT INTO jobs (job_id, status, stream_ref, source_type, fps, model, priority, from_beginning, created_at, webhook, results_retention_s, evidence_retention_s, gate, clip) \
             VALUES ($1, 'pending', $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        )
        .bind(job.job_id.as_str())
        .bind(&job.stream_ref)
        .bind(job.source_type.as_str())
        .bind(job.fps)
        .bind(job.model.clone())
        .bind(job.priority.as_str())
        .bind(i64::from(job.from_beginning))
        .bind(now)
        .bind(webhook.as_deref())
        .bind(job.retention.results_s)
        .bind(job.retention.evidence_s)
        .bind(job.gate.map(|g| serde_json::to_string(&g).expect("a gate serialises")))
        .bind(job.clip.map(|c| serde_json::to_string(&c).expect("a clip serialises")))
        .execute(&mut *tx)
        .await?;
        self.status_changed(
            &mut tx,
            job.job_id.as_str(),
            JobStatus::Pending,
            None,
            0,
            webhook.as_deref(),
        )
        .await
        .map_err(CreateJobError::Store)?;
        let scope = PromptScope::Job(job.job_id.clone()).key();
        if let Some(prompt) = &job.prompt {
            sqlx::query("INSERT INTO prompt_versions (scope_key, version, prompt, response_format, created_at) VALUES ($1, 1, $2, $3, $4)")
                .bind(&scope)
                .bind(prompt)
                .bind(job.response_format.as_deref())
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        if let Some(rules) = &job.alerts {
            sqlx::query("INSERT INTO alert_versions (scope_key, version, alerts, created_at) VALUES ($1, 1, $2, $3)")
                .bind(&scope)
                .bind(serde_json::to_string(rules).expect("alert rules serialise"))
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        self.get_job(job.job_id.as_str())
            .await
            .map_err(CreateJobError::Store)?
            .ok_or_else(|| {
                CreateJobError::Store(StoreError::Corrupt("job vanished after insert".into()))
            })
    }

    pub async fn get_job(&self, job_id: &str) -> Result<Option<JobRecord>, StoreError> {
        let row = sqlx::query(select_jobs!("WHERE job_id = $1"))
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| job_from_row(&r)).transpose()
    }

    /// Jobs newest first; `after` is a `next_after` cursor from an earlier page.
    pub async fn list_jobs(
        &self,
        status: Option<JobStatus>,
        limit: i64,
        after: Option<i64>,
    ) -> Result<(Vec<JobRecord>, i64), StoreError> {
        let status = status.map(|s| s.as_str());
        let rows = sqlx::query(limited(
            select_jobs!(
                "WHERE ($1 IS NULL OR status = $1) AND ($2 IS NULL OR list_seq < $2) ORDER BY list_seq DESC"
            ),
            limit,
        ))
        .bind(status)
        .bind(after)
        .fetch_all(&self.pool)
        .await?;
        let total: i64 = sqlx::query("SELECT COUNT(*) FROM jobs WHERE ($1 IS NULL OR status = $1)")
            .bind(status)
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        let jobs = rows.iter().map(job_from_row).collect::<Result<_, _>>()?;
        Ok((jobs, total))
    }

    pub async fn count_by_status(&self) -> Result<Vec<(JobStatus, i64)>, StoreError> {
        let rows = sqlx::query("SELECT status, COUNT(*) FROM jobs GROUP BY status")
            .fetch_all(&self.pool)
            .await?;
        let mut counts: Vec<(JobStatus, i64)> = JobStatus::ALL.iter().map(|s| (*s, 0)).collect();
        for row in rows {
            let status: String = row.try_get(0)?;
            let n: i64 = row.try_get(1)?;
            if let Some(slot) = counts.iter_mut().find(|(s, _)| s.as_str() == status) {
                slot.1 = n;
            }
        }
        Ok(counts)
    }

    /// Moves an active job to `cancelled`; finished jobs are left as they are.
    pub async fn cancel_job(&self, job_id: &str) -> Result<CancelOutcome, StoreError> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "UPDATE jobs SET status = 'cancelled', completed_at = $2 WHERE job_id = $1 AND status IN ('pending', 'running') \
             RETURNING results_count, webhook",
        )
        .bind(job_id)
        .bind(now_secs())
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = &row {
            let webhook: Option<String> = row.try_get(1)?;
            self.status_changed(
                &mut tx,
                job_id,
                JobStatus::Cancelled,
                None,
                row.try_get(0)?,
                webhook.as_deref(),
            )
            .await?;
        }
        tx.commit().await?;
        if row.is_some() {
            self.changed(job_id).await;
        }
        let job = self.get_job(job_id).await?;
        Ok(match (row.is_some(), job) {
            (_, None) => CancelOutcome::NotFound,
            (true, Some(job)) => CancelOutcome::Cancelled(Box::new(job)),
            (false, Some(job)) => CancelOutcome::AlreadyFinished(job.status),
        })
    }

    /// Marks an active job running (first start only sets `started_at`), under its lease.
    pub async fn mark_running(&self, job_id: &str, lease: &Lease) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let lock = match self.dialect {
            Dialect::Postgres => " FOR UPDATE",
            Dialect::Sqlite => "",
        };
        let sql = format!(
            "SELECT status, results_count, webhook FROM jobs \
             WHERE job_id = $1 AND status IN ('pending', 'running') AND owner = $2 AND lease_token = $3{lock}"
        );
        let Some(row) = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(job_id)
            .bind(lease.owner.as_ref())
            .bind(lease.token)
            .fetch_optional(&mut *tx)
            .await?
        else {
            return Ok(false);
        };
        let was: String = row.try_get(0)?;
        sqlx::query("UPDATE jobs SET status = 'running', started_at = COALESCE(started_at, $2) WHERE job_id = $1")
            .bind(job_id)
            .bind(now_secs())
            .execute(&mut *tx)
            .await?;
        if was != JobStatus::Running.as_str() {
            let webhook: Option<String> = row.try_get(2)?;
            self.status_changed(
                &mut tx,
                job_id,
                JobStatus::Running,
                None,
                row.try_get(1)?,
                webhook.as_deref(),
            )
            .await?;
        }
        tx.commit().await?;
        self.changed(job_id).await;
        Ok(true)
    }

    /// Ends an active job as completed or failed, under its lease; a job cancelled (or taken
    /// over) meanwhile is left as it is.
    pub async fn finish_job(
        &self,
        job_id: &str,
        lease: &Lease,
        status: JobStatus,
        error: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query(
            "UPDATE jobs SET status = $2, error = $3, completed_at = $4 \
             WHERE job_id = $1 AND status IN ('pending', 'running') AND owner = $5 AND lease_token = $6 \
             RETURNING results_count, webhook",
        )
        .bind(job_id)
        .bind(status.as_str())
        .bind(error)
        .bind(now_secs())
        .bind(lease.owner.as_ref())
        .bind(lease.token)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            return Ok(false);
        };
        let webhook: Option<String> = row.try_get(1)?;
        self.status_changed(
            &mut tx,
            job_id,
            status,
            error,
            row.try_get(0)?,
            webhook.as_deref(),
        )
        .await?;
        tx.commit().await?;
        self.changed(job_id).await;
        Ok(true)
    }

    /// Saves a job's counters and latency percentiles, and its resume progress (last segment,
    /// decoder and sampler state) when given; without it the saved progress stays. Refused
    /// ([`StoreError::Fenced`]) once the lease has passed on.
    pub async fn save_progress(
        &self,
        job_id: &str,
        lease: &Lease,
        saved: &Saved<'_>,
        progress: Option<&Value>,
    ) -> Result<(), StoreError> {
        let n = sqlx::query(
            "UPDATE jobs SET frames_processed = $2, stats = $3, latency = $4, \
             progress = COALESCE($5, progress) WHERE job_id = $1 AND owner = $6 AND lease_token = $7",
        )
        .bind(job_id)
        .bind(saved.frames_processed)
        .bind(saved.stats.to_string())
        .bind(saved.latency.to_string())
        .bind(progress.map(Value::to_string))
        .bind(lease.owner.as_ref())
        .bind(lease.token)
        .execute(&self.writer)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(StoreError::Fenced);
        }
        Ok(())
    }

    /// A job's status and result count: all a results page needs of the job.
    pub async fn job_brief(&self, job_id: &str) -> Result<Option<JobBrief>, StoreError> {
        let row = sqlx::query(
            "SELECT list_seq, status, results_count, results_kept_from, evidence_kept_from FROM jobs WHERE job_id = $1",
        )
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let status: String = r.try_get(1)?;
            Ok(JobBrief {
                list_seq: r.try_get(0)?,
                status: JobStatus::parse(&status)
                    .ok_or_else(|| StoreError::Corrupt(format!("job status {status:?}")))?,
                results_count: r.try_get(2)?,
                results_kept_from: r.try_get(3)?,
                evidence_kept_from: r.try_get(4)?,
            })
        })
        .transpose()
    }
}
