//! Persistence: jobs, prompt versions and results, in SQLite (embedded default) or PostgreSQL.
//!
//! One code path serves both databases: sqlx's `Any` driver with runtime-checked queries
//! (`$N` placeholders work on both), and one migration folder per backend with the same
//! numbering (`migrations/sqlite`, `migrations/postgres`). Everything a restart needs lives
//! here, never only in memory: a job's status, counters, stats and resume progress.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Row};

use crate::domain::{JobId, JobStatus, Priority, SourceType};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
}

/// Which SQL dialect the pool speaks; only transaction start and locking differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// Seconds since the Unix epoch, as the seed reports times.
pub fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A prompt's scope: the global prompt, or one job's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptScope {
    Global,
    Job(JobId),
}

impl PromptScope {
    fn key(&self) -> String {
        match self {
            PromptScope::Global => "global".to_owned(),
            PromptScope::Job(id) => format!("job:{id}"),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            PromptScope::Global => "global",
            PromptScope::Job(_) => "job",
        }
    }

    pub fn job_id(&self) -> Option<&JobId> {
        match self {
            PromptScope::Global => None,
            PromptScope::Job(id) => Some(id),
        }
    }
}

/// One immutable prompt version.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptVersion {
    pub scope: PromptScope,
    pub version: i64,
    pub prompt: String,
    /// When this version was written.
    pub created_at: f64,
    /// When the scope's first version was written.
    pub scope_created_at: f64,
}

/// What the API gives to create a job.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub job_id: JobId,
    pub stream_ref: String,
    pub source_type: SourceType,
    pub fps: f64,
    pub model: Option<String>,
    pub priority: Priority,
    pub from_beginning: bool,
    pub prompt: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub list_seq: i64,
    pub job_id: String,
    pub status: JobStatus,
    pub stream_ref: String,
    pub source_type: String,
    pub fps: f64,
    pub model: Option<String>,
    pub priority: Priority,
    pub from_beginning: bool,
    pub created_at: f64,
    pub started_at: Option<f64>,
    pub completed_at: Option<f64>,
    pub frames_processed: i64,
    pub results_count: i64,
    pub error: Option<String>,
    pub stats: Value,
    pub progress: Value,
    /// p50/p95/p99 per latency phase over the newest results, as the pipeline last saved it.
    pub latency: Value,
}

#[derive(Debug)]
pub enum CreateJobError {
    /// The job id is taken.
    Conflict,
    /// MAX_CONCURRENT_STREAMS jobs are already pending or running.
    TooManyActive {
        active: i64,
    },
    Store(StoreError),
}

impl From<sqlx::Error> for CreateJobError {
    fn from(e: sqlx::Error) -> Self {
        CreateJobError::Store(e.into())
    }
}

#[derive(Debug)]
pub enum CancelOutcome {
    Cancelled(Box<JobRecord>),
    NotFound,
    AlreadyFinished(JobStatus),
}

/// One stored model answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRecord {
    pub seq: i64,
    pub pts_ms: i64,
    pub prompt_scope: String,
    pub prompt_version: i64,
    pub model: String,
    pub output: Option<String>,
    pub error: Option<String>,
    pub batch_size: i64,
    pub latency: Value,
    pub created_at: f64,
}

/// A result the pipeline is about to store; `seq` is assigned by the store.
#[derive(Debug, Clone)]
pub struct NewResult {
    pub pts_ms: i64,
    pub prompt_scope: String,
    pub prompt_version: i64,
    pub model: String,
    pub output: Result<String, String>,
    pub batch_size: i64,
    pub latency: Value,
}

/// `SELECT <every job column> FROM jobs <rest>`, as one literal.
macro_rules! select_jobs {
    ($rest:literal) => {
        concat!(
            "SELECT list_seq, job_id, status, stream_ref, source_type, fps, model, priority, from_beginning, ",
            "created_at, started_at, completed_at, frames_processed, results_count, error, stats, progress, latency FROM jobs ",
            $rest
        )
    };
}

/// Stored results never change, so rows read once are served from memory: keyed by the
/// job's `list_seq` and the result's `seq`, bounded by an estimate of their bytes.
type ResultCache = quick_cache::sync::Cache<(i64, i64), Arc<ResultRecord>, ResultWeight>;

/// Bytes of result rows kept in memory for polling.
const RESULT_CACHE_BYTES: u64 = 32 << 20;

#[derive(Clone)]
struct ResultWeight;

impl quick_cache::Weighter<(i64, i64), Arc<ResultRecord>> for ResultWeight {
    fn weight(&self, _: &(i64, i64), r: &Arc<ResultRecord>) -> u64 {
        let text = r.output.as_ref().map_or(0, String::len) + r.error.as_ref().map_or(0, String::len);
        (256 + text + r.model.len() + r.prompt_scope.len()) as u64
    }
}

/// A job as a results page needs it.
#[derive(Debug, Clone)]
pub struct JobBrief {
    pub list_seq: i64,
    pub status: JobStatus,
    pub results_count: i64,
}

/// What a job's pipeline saves as it goes, besides its resume progress.
pub struct Saved<'a> {
    pub frames_processed: i64,
    pub stats: &'a Value,
    pub latency: &'a Value,
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
    /// Serialises job admission within one process; PostgreSQL also takes an advisory lock so
    /// replicas sharing a database agree on MAX_CONCURRENT_STREAMS.
    admission: Arc<tokio::sync::Mutex<()>>,
    results_cache: Arc<ResultCache>,
}

impl Store {
    /// Connects (creating a SQLite file and its folder if needed); does not migrate.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let dialect = if url.starts_with("sqlite:") {
            if let Some(dir) = sqlite_dir(url) {
                std::fs::create_dir_all(&dir).map_err(|e| {
                    StoreError::Corrupt(format!(
                        "cannot create database folder {}: {e}",
                        dir.display()
                    ))
                })?;
            }
            Dialect::Sqlite
        } else {
            Dialect::Postgres
        };
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect(url)
            .await?;
        Ok(Self {
            pool,
            dialect,
            admission: Default::default(),
            results_cache: Arc::new(ResultCache::with_weighter(
                100_000,
                RESULT_CACHE_BYTES,
                ResultWeight,
            )),
        })
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    fn migrator(&self) -> &'static Migrator {
        match self.dialect {
            Dialect::Sqlite => &SQLITE_MIGRATIONS,
            Dialect::Postgres => &POSTGRES_MIGRATIONS,
        }
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.migrator().run(&self.pool).await?;
        Ok(())
    }

    /// The database answers a query.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Every migration this build knows of is applied.
    pub async fn migrations_applied(&self) -> Result<bool, StoreError> {
        let rows = sqlx::query("SELECT version FROM _sqlx_migrations WHERE success = TRUE")
            .fetch_all(&self.pool)
            .await?;
        let applied: Vec<i64> = rows
            .iter()
            .map(|r| r.try_get::<i64, _>(0))
            .collect::<Result<_, _>>()?;
        Ok(self.migrator().iter().all(|m| applied.contains(&m.version)))
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.dialect {
            // IMMEDIATE takes the write lock up front, so a read-then-write transaction waits
            // for other writers instead of failing with "database is locked".
            Dialect::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Dialect::Postgres => self.pool.begin().await,
        }
    }

    // ---- jobs ----

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
        sqlx::query(
            "INSERT INTO jobs (job_id, status, stream_ref, source_type, fps, model, priority, from_beginning, created_at) \
             VALUES ($1, 'pending', $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(job.job_id.as_str())
        .bind(&job.stream_ref)
        .bind(job.source_type.as_str())
        .bind(job.fps)
        .bind(job.model.clone())
        .bind(job.priority.as_str())
        .bind(i64::from(job.from_beginning))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if let Some(prompt) = &job.prompt {
            sqlx::query("INSERT INTO prompt_versions (scope_key, version, prompt, created_at) VALUES ($1, 1, $2, $3)")
                .bind(PromptScope::Job(job.job_id.clone()).key())
                .bind(prompt)
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

    /// Jobs in one of `statuses`, oldest first: what a job manager resumes at start.
    pub async fn jobs_with_status(
        &self,
        statuses: &[JobStatus],
    ) -> Result<Vec<JobRecord>, StoreError> {
        let mut out = Vec::new();
        for status in statuses {
            let rows = sqlx::query(select_jobs!("WHERE status = $1 ORDER BY list_seq"))
                .bind(status.as_str())
                .fetch_all(&self.pool)
                .await?;
            for row in &rows {
                out.push(job_from_row(row)?);
            }
        }
        out.sort_by_key(|j| j.list_seq);
        Ok(out)
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
        let updated = sqlx::query(
            "UPDATE jobs SET status = 'cancelled', completed_at = $2 WHERE job_id = $1 AND status IN ('pending', 'running')",
        )
        .bind(job_id)
        .bind(now_secs())
        .execute(&self.pool)
        .await?
        .rows_affected();
        let job = self.get_job(job_id).await?;
        Ok(match (updated, job) {
            (_, None) => CancelOutcome::NotFound,
            (1, Some(job)) => CancelOutcome::Cancelled(Box::new(job)),
            (_, Some(job)) => CancelOutcome::AlreadyFinished(job.status),
        })
    }

    /// Marks an active job running (first start only sets `started_at`).
    pub async fn mark_running(&self, job_id: &str) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE jobs SET status = 'running', started_at = COALESCE(started_at, $2) \
             WHERE job_id = $1 AND status IN ('pending', 'running')",
        )
        .bind(job_id)
        .bind(now_secs())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Ends an active job as completed or failed; a job cancelled meanwhile stays cancelled.
    pub async fn finish_job(
        &self,
        job_id: &str,
        status: JobStatus,
        error: Option<&str>,
    ) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE jobs SET status = $2, error = $3, completed_at = $4 \
             WHERE job_id = $1 AND status IN ('pending', 'running')",
        )
        .bind(job_id)
        .bind(status.as_str())
        .bind(error)
        .bind(now_secs())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Saves a job's counters and resume progress (last segment, pending entries...).
    pub async fn save_progress(
        &self,
        job_id: &str,
        saved: &Saved<'_>,
        progress: &Value,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE jobs SET frames_processed = $2, stats = $3, latency = $4, progress = $5 WHERE job_id = $1",
        )
        .bind(job_id)
        .bind(saved.frames_processed)
        .bind(saved.stats.to_string())
        .bind(saved.latency.to_string())
        .bind(progress.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn save_stats(&self, job_id: &str, saved: &Saved<'_>) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE jobs SET frames_processed = $2, stats = $3, latency = $4 WHERE job_id = $1",
        )
        .bind(job_id)
        .bind(saved.frames_processed)
        .bind(saved.stats.to_string())
        .bind(saved.latency.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A job's status and result count: all a results page needs of the job.
    pub async fn job_brief(&self, job_id: &str) -> Result<Option<JobBrief>, StoreError> {
        let row = sqlx::query("SELECT list_seq, status, results_count FROM jobs WHERE job_id = $1")
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
            })
        })
        .transpose()
    }

    // ---- prompts ----

    /// Appends the next version in `scope`; versions rise by one and are never rewritten.
    pub async fn append_prompt(
        &self,
        scope: &PromptScope,
        prompt: &str,
    ) -> Result<PromptVersion, StoreError> {
        let key = scope.key();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let inserted = sqlx::query(
                "INSERT INTO prompt_versions (scope_key, version, prompt, created_at) \
                 SELECT $1, COALESCE(MAX(version), 0) + 1, $2, $3 FROM prompt_versions WHERE scope_key = $1",
            )
            .bind(&key)
            .bind(prompt)
            .bind(now_secs())
            .execute(&self.pool)
            .await;
            match inserted {
                Ok(_) => break,
                // Two writers picked the same next version (PostgreSQL, concurrent updates):
                // the primary key refused one; it tries again with the new maximum.
                Err(sqlx::Error::Database(e)) if e.is_unique_violation() && attempt < 10 => {
                    continue
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.current_prompt(scope)
            .await?
            .ok_or_else(|| StoreError::Corrupt("prompt vanished after insert".into()))
    }

    /// The newest version in `scope`, if the scope has any.
    pub async fn current_prompt(
        &self,
        scope: &PromptScope,
    ) -> Result<Option<PromptVersion>, StoreError> {
        Ok(self.prompt_history(scope, 1).await?.0.into_iter().next())
    }

    /// Newest first, at most `limit`, and how many versions the scope holds.
    pub async fn prompt_history(
        &self,
        scope: &PromptScope,
        limit: i64,
    ) -> Result<(Vec<PromptVersion>, i64), StoreError> {
        let key = scope.key();
        let rows = sqlx::query(limited(
            "SELECT version, prompt, created_at, \
             (SELECT MIN(created_at) FROM prompt_versions p2 WHERE p2.scope_key = $1) \
             FROM prompt_versions WHERE scope_key = $1 ORDER BY version DESC",
            limit,
        ))
        .bind(&key)
        .fetch_all(&self.pool)
        .await?;
        let total: i64 = sqlx::query("SELECT COUNT(*) FROM prompt_versions WHERE scope_key = $1")
            .bind(&key)
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?;
        let versions = rows
            .iter()
            .map(|r| {
                Ok(PromptVersion {
                    scope: scope.clone(),
                    version: r.try_get(0)?,
                    prompt: r.try_get(1)?,
                    created_at: r.try_get(2)?,
                    scope_created_at: r.try_get(3)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
        Ok((versions, total))
    }

    /// The prompt a job uses now: its own newest version, else the newest global one.
    pub async fn effective_prompt(
        &self,
        job_id: &JobId,
    ) -> Result<Option<PromptVersion>, StoreError> {
        // One query: the job's newest version if it has any, else the global newest.
        let own = PromptScope::Job(job_id.clone()).key();
        let row = sqlx::query(
            "SELECT p.scope_key, p.version, p.prompt, p.created_at, \
             (SELECT MIN(created_at) FROM prompt_versions p2 WHERE p2.scope_key = p.scope_key) \
             FROM prompt_versions p WHERE p.scope_key IN ($1, 'global') \
             ORDER BY CASE WHEN p.scope_key = 'global' THEN 1 ELSE 0 END, p.version DESC LIMIT 1",
        )
        .bind(&own)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let key: String = r.try_get(0)?;
            Ok(PromptVersion {
                scope: if key == own {
                    PromptScope::Job(job_id.clone())
                } else {
                    PromptScope::Global
                },
                version: r.try_get(1)?,
                prompt: r.try_get(2)?,
                created_at: r.try_get(3)?,
                scope_created_at: r.try_get(4)?,
            })
        })
        .transpose()
    }

    /// Writes global version 1 from DEFAULT_PROMPT if the global scope is empty.
    pub async fn ensure_global_prompt(&self, default_prompt: &str) -> Result<(), StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO prompt_versions (scope_key, version, prompt, created_at) \
             SELECT 'global', 1, $1, $2 WHERE NOT EXISTS (SELECT 1 FROM prompt_versions WHERE scope_key = 'global')",
        )
        .bind(default_prompt)
        .bind(now_secs())
        .execute(&self.pool)
        .await;
        match inserted {
            Ok(_) => Ok(()),
            // Another replica wrote it first.
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    // ---- results ----

    /// Stores one result with the job's next `seq` and bumps its `results_count`, atomically.
    /// Results of a job are written by its one pipeline, so seqs are contiguous.
    pub async fn append_result(&self, job_id: &str, result: &NewResult) -> Result<i64, StoreError> {
        let mut tx = self.begin_write().await?;
        let seq: i64 = sqlx::query("SELECT results_count FROM jobs WHERE job_id = $1")
            .bind(job_id)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        let (output, error) = match &result.output {
            Ok(o) => (Some(o.as_str()), None),
            Err(e) => (None, Some(e.as_str())),
        };
        sqlx::query(
            "INSERT INTO results (job_id, seq, pts_ms, prompt_scope, prompt_version, model, output, error, batch_size, latency, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(job_id)
        .bind(seq)
        .bind(result.pts_ms)
        .bind(&result.prompt_scope)
        .bind(result.prompt_version)
        .bind(&result.model)
        .bind(output)
        .bind(error)
        .bind(result.batch_size)
        .bind(result.latency.to_string())
        .bind(now_secs())
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE jobs SET results_count = results_count + 1 WHERE job_id = $1")
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(seq)
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
        let first = after.map_or(0, |a| a + 1);
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
        let rows = sqlx::query(limited(
            "SELECT seq, pts_ms, prompt_scope, prompt_version, model, output, error, batch_size, latency, created_at \
             FROM results WHERE job_id = $1 AND seq > $2 ORDER BY seq",
            limit,
        ))
        .bind(job_id)
        .bind(first - 1)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let latency: String = r.try_get(8)?;
                let record = Arc::new(ResultRecord {
                    seq: r.try_get(0)?,
                    pts_ms: r.try_get(1)?,
                    prompt_scope: r.try_get(2)?,
                    prompt_version: r.try_get(3)?,
                    model: r.try_get(4)?,
                    output: r.try_get(5)?,
                    error: r.try_get(6)?,
                    batch_size: r.try_get(7)?,
                    latency: serde_json::from_str(&latency)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    created_at: r.try_get(9)?,
                });
                self.results_cache
                    .insert((job.list_seq, record.seq), record.clone());
                Ok(record)
            })
            .collect()
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

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// `sql` with a `LIMIT` written as a literal. SQLite re-prepares a statement whose `LIMIT` is a
/// bound parameter every time it is bound (its planner treats the value as a constant), so a
/// bound limit costs a parse per query; an integer literal keeps one cached statement per
/// limit value. The limit is an `i64`, never text from a request.
fn limited(sql: &str, limit: i64) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(format!("{sql} LIMIT {}", limit.max(0)))
}

fn sqlite_dir(url: &str) -> Option<std::path::PathBuf> {
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let path = path.split('?').next()?;
    if path.is_empty() || path == ":memory:" {
        return None;
    }
    std::path::Path::new(path)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| p.to_owned())
}

fn job_from_row(r: &AnyRow) -> Result<JobRecord, StoreError> {
    let status: String = r.try_get("status")?;
    let priority: String = r.try_get("priority")?;
    let stats: String = r.try_get("stats")?;
    let progress: String = r.try_get("progress")?;
    let latency: String = r.try_get("latency")?;
    Ok(JobRecord {
        list_seq: r.try_get("list_seq")?,
        job_id: r.try_get("job_id")?,
        status: JobStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("job status {status:?}")))?,
        stream_ref: r.try_get("stream_ref")?,
        source_type: r.try_get("source_type")?,
        fps: r.try_get("fps")?,
        model: r.try_get("model")?,
        priority: Priority::parse(&priority)
            .ok_or_else(|| StoreError::Corrupt(format!("job priority {priority:?}")))?,
        from_beginning: r.try_get::<i64, _>("from_beginning")? != 0,
        created_at: r.try_get("created_at")?,
        started_at: r.try_get("started_at")?,
        completed_at: r.try_get("completed_at")?,
        frames_processed: r.try_get("frames_processed")?,
        results_count: r.try_get("results_count")?,
        error: r.try_get("error")?,
        stats: serde_json::from_str(&stats).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        progress: serde_json::from_str(&progress)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
        latency: serde_json::from_str(&latency).map_err(|e| StoreError::Corrupt(e.to_string()))?,
    })
}
