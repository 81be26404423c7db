//! Leases: which replica runs which job, until when, under which fencing token.
//!
//! The pattern of River, Oban and pg-boss, on the jobs table itself: a replica claims
//! runnable jobs (pending or running, and unowned, or whose lease expired) up to its
//! capacity — `FOR UPDATE SKIP LOCKED` on PostgreSQL so replicas claiming at once take
//! different jobs, SQLite's single writer otherwise — and every claim raises the job's
//! `lease_token`. Pipelines write only under their token (see `append_result`,
//! `save_progress`, `mark_running`, `finish_job`), so a replica that was paused or cut off
//! past its lease writes nothing once another has claimed the job.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;

use super::*;

/// A replica's hold on one job; every write its pipeline makes carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub owner: Arc<str>,
    pub token: i64,
}

/// Which jobs a claim may take besides unowned and expired ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    /// Nothing else; never this owner's own (a lease of ours that ran out while the database
    /// was away is renewed, not claimed again under a new token that would fence our own
    /// pipeline).
    Expired,
    /// Also jobs this owner held before it restarted (same replica id, lease not run out).
    OwnFromBefore,
    /// Every active job: only when nothing else can be running them (SQLite's one process).
    All,
}

impl Store {
    /// Claims up to `n` runnable jobs for `owner`, oldest first, each with a fresh lease of
    /// `ttl` and a new fencing token.
    pub async fn claim_jobs(
        &self,
        owner: &Arc<str>,
        n: usize,
        ttl: Duration,
        takeover: Takeover,
    ) -> Result<Vec<(JobRecord, Lease)>, StoreError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let now = now_secs();
        let mut tx = self.begin_write().await?;
        let lock = match self.dialect {
            Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
            Dialect::Sqlite => "",
        };
        let sql = format!(
            "SELECT job_id FROM jobs WHERE status IN ('pending', 'running') \
             AND (owner IS NULL OR (lease_expires_at < $1 AND owner <> $3) \
                  OR ($2 = 1 AND owner = $3) OR $4 = 1) \
             ORDER BY list_seq LIMIT {n}{lock}"
        );
        let ids: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(now)
            .bind(i64::from(takeover == Takeover::OwnFromBefore))
            .bind(owner.as_ref())
            .bind(i64::from(takeover == Takeover::All))
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        for id in &ids {
            sqlx::query(
                "UPDATE jobs SET owner = $2, lease_expires_at = $3, lease_token = lease_token + 1 \
                 WHERE job_id = $1",
            )
            .bind(id)
            .bind(owner.as_ref())
            .bind(now + ttl.as_secs_f64())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        let mut claimed = Vec::with_capacity(ids.len());
        for id in &ids {
            if let Some(job) = self.get_job(id).await? {
                let lease = Lease {
                    owner: owner.clone(),
                    token: job.lease_token,
                };
                claimed.push((job, lease));
            }
        }
        Ok(claimed)
    }

    /// Extends every lease `owner` holds on an active job by `ttl`.
    pub async fn renew_leases(&self, owner: &str, ttl: Duration) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE jobs SET lease_expires_at = $2 \
             WHERE owner = $1 AND status IN ('pending', 'running')",
        )
        .bind(owner)
        .bind(now_secs() + ttl.as_secs_f64())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// The leases `owner` still holds on active jobs: (job id, token). A job this replica
    /// runs that is missing here was cancelled, finished, or claimed by another.
    pub async fn held_leases(&self, owner: &str) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT job_id, lease_token FROM jobs \
             WHERE owner = $1 AND status IN ('pending', 'running')",
        )
        .bind(owner)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// Gives a job up so another replica may claim it at once (not after the TTL).
    pub async fn release_lease(&self, job_id: &str, lease: &Lease) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE jobs SET owner = NULL, lease_expires_at = NULL \
             WHERE job_id = $1 AND owner = $2 AND lease_token = $3",
        )
        .bind(job_id)
        .bind(lease.owner.as_ref())
        .bind(lease.token)
        .execute(&self.writer)
        .await?;
        Ok(())
    }
}
