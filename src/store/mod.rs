//! Persistence: jobs, prompt versions and results, in SQLite (embedded default) or PostgreSQL.
//!
//! One code path serves both databases: sqlx's `Any` driver with runtime-checked queries
//! (`$N` placeholders work on both), and one migration folder per backend with the same
//! numbering (`migrations/sqlite`, `migrations/postgres`). Everything a restart needs lives
//! here, never only in memory: a job's status, counters, stats and resume progress.
//!
//! This file holds the types, the pool and migrations; the queries live by table:
//! [`jobs`], [`leases`] (which replica runs which job), [`prompts`], [`alerts`] (rule sets,
//! alert state and events), [`results`] and [`push`] (the job event log and the webhook
//! outbox), each an `impl Store` block.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Row};

use crate::answers::alerts::{AlertAnswer, AlertRule};
use crate::answers::Output;
use crate::domain::{ChangeGate, Clip, JobId, JobStatus, Priority, SourceType};

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
    /// The evidence store (a directory or a bucket) failed.
    #[error("evidence store: {0}")]
    Evidence(String),
    /// Another process has the SQLite database open.
    #[error("{0}")]
    InUse(String),
    /// A pipeline's write refused: its lease was superseded by another claim (or the job was
    /// released), so another replica owns the job now.
    #[error(
        "the job's lease has passed to another claim; this replica writes nothing more for it"
    )]
    Fenced,
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
    /// The JSON Schema answers under this version must satisfy (as JSON text), if any.
    pub response_format: Option<String>,
    /// When this version was written.
    pub created_at: f64,
    /// When the scope's first version was written.
    pub scope_created_at: f64,
}

/// One immutable version of a scope's alert rules (an empty set turns alerts off there).
#[derive(Debug, Clone, PartialEq)]
pub struct AlertSetVersion {
    pub scope: PromptScope,
    pub version: i64,
    pub rules: Vec<AlertRule>,
    pub created_at: f64,
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
    /// The JSON Schema of the job's own prompt (only with `prompt`).
    pub response_format: Option<String>,
    /// The job's own alert rules (version 1 of its alert scope).
    pub alerts: Option<Vec<AlertRule>>,
    /// Where the job's events are also sent (Standard Webhooks).
    pub webhook: Option<crate::webhook::Webhook>,
    pub retention: JobRetention,
    /// Change gating: pictures too like the last one sent are not sent.
    pub gate: Option<ChangeGate>,
    /// Several consecutive samples asked about at once.
    pub clip: Option<Clip>,
}

/// A job's own retention, in seconds: `None` follows the settings, `Some(0)` keeps for ever.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobRetention {
    pub results_s: Option<i64>,
    pub evidence_s: Option<i64>,
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
    /// The replica holding the job's lease (it runs the job), if any.
    pub owner: Option<String>,
    /// The fencing token of the job's newest claim.
    pub lease_token: i64,
    /// The job's own webhook, secret included: never shown as it is.
    pub webhook: Option<crate::webhook::Webhook>,
    pub gate: Option<ChangeGate>,
    pub clip: Option<Clip>,
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
    pub output: Option<Output>,
    pub error: Option<String>,
    pub batch_size: i64,
    pub latency: Value,
    pub created_at: f64,
    /// The camera's wall clock when the frame was taken (Unix seconds), where it says.
    pub captured_at: Option<f64>,
    /// A clip's result: the media time of its last frame (`pts_ms` is its first's).
    pub pts_end_ms: Option<i64>,
    /// A gated result: unchanged since the picture(s) of this result, whose answer it repeats.
    pub repeats_seq: Option<i64>,
    /// The frame's answers to the job's alert questions (empty when it had none).
    pub alerts: Vec<AlertAnswer>,
    /// Whether the frame the model was asked about was kept (EVIDENCE).
    pub evidence: bool,
    /// A replay's result: the job and seq of the result it asked about again.
    pub replay_of: Option<(String, i64)>,
    /// The row as the API encodes it (JSON), kept with the cached row by the first stream
    /// that encodes it: a thousand result streams on one job encode each result once.
    pub encoded: std::sync::OnceLock<String>,
}

/// A result the pipeline is about to store; `seq` is assigned by the store.
#[derive(Debug, Clone)]
pub struct NewResult {
    /// The position in the source this answers (`pts:<ms>` for video, `redis:<entry id>`):
    /// unique per job, so work repeated after a crash or takeover is not stored twice.
    pub source_key: String,
    pub pts_ms: i64,
    /// The camera's wall clock when the frame was taken (Unix seconds), where it says.
    pub captured_at: Option<f64>,
    /// A clip's result: the media time of its last frame.
    pub pts_end_ms: Option<i64>,
    /// A gated result: the seq of the result whose answer it repeats.
    pub repeats_seq: Option<i64>,
    pub prompt_scope: String,
    pub prompt_version: i64,
    pub model: String,
    pub output: Result<Output, String>,
    pub batch_size: i64,
    pub latency: Value,
    /// The frame's answers to its alert questions, and the rule set they were asked from
    /// (`None`: no alert set was in force, nothing to apply to the job's alert state).
    pub alerts: Option<(Arc<AlertSetVersion>, Vec<AlertAnswer>)>,
    /// The frame the model was asked about, as a JPEG to keep (EVIDENCE), if kept.
    pub evidence: Option<Vec<u8>>,
    /// A replay's result: the job and seq of the result whose frame was asked about again.
    pub replay_of: Option<(String, i64)>,
}

/// What storing a result did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored with this seq; `frame`: its evidence frame was kept too.
    New { seq: i64, frame: bool },
    /// The job already has a result for this position in the source (work repeated after a
    /// crash or a takeover): nothing stored.
    Duplicate,
}

/// Every job column, named with its table (so joins may use them), as one literal.
macro_rules! job_columns {
    () => {
        concat!(
            "jobs.list_seq, jobs.job_id, jobs.status, jobs.stream_ref, jobs.source_type, jobs.fps, ",
            "jobs.model, jobs.priority, jobs.from_beginning, jobs.created_at, jobs.started_at, ",
            "jobs.completed_at, jobs.frames_processed, jobs.results_count, jobs.error, jobs.stats, ",
            "jobs.progress, jobs.latency, jobs.owner, jobs.lease_token, jobs.webhook, jobs.gate, jobs.clip"
        )
    };
}

/// `SELECT <every job column> FROM jobs <rest>`, as one literal.
macro_rules! select_jobs {
    ($rest:literal) => {
        concat!("SELECT ", job_columns!(), " FROM jobs ", $rest)
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
        let text =
            r.output.as_ref().map_or(0, Output::size) + r.error.as_ref().map_or(0, String::len);
        (256 + text + 64 * r.alerts.len() + r.model.len() + r.prompt_scope.len()) as u64
    }
}

/// A job as a results page needs it.
#[derive(Debug, Clone)]
pub struct JobBrief {
    pub list_seq: i64,
    pub status: JobStatus,
    pub results_count: i64,
    /// Results below this seq were deleted by retention.
    pub results_kept_from: i64,
    /// Evidence frames below this seq were deleted by retention.
    pub evidence_kept_from: i64,
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
    /// Where writes go. PostgreSQL: the same pool. SQLite: a pool of one connection, so the
    /// process's writers queue for it in order instead of meeting SQLite's write lock, whose
    /// busy handler makes a blocked writer sleep and retry (up to 100 ms a time, unfairly):
    /// with dozens of live jobs writing, that left some results seconds behind.
    writer: AnyPool,
    dialect: Dialect,
    /// Serialises job admission within one process; PostgreSQL also takes an advisory lock so
    /// replicas sharing a database agree on MAX_CONCURRENT_STREAMS.
    admission: Arc<tokio::sync::Mutex<()>>,
    results_cache: Arc<ResultCache>,
    /// SQLite: an exclusive lock on `<database>.lock`, held while this process runs (the
    /// kernel drops it when the process ends, however it ends).
    _file_lock: Option<Arc<std::fs::File>>,
    /// Wakes followers (SSE streams) when a job gains a result or changes status: the id of
    /// the job. Writes here send it; on PostgreSQL so does every replica's (LISTEN/NOTIFY).
    changes: tokio::sync::broadcast::Sender<Arc<str>>,
    /// The subset of `changes` that are status changes (cancelled, finished, running), so the
    /// job manager can stop a pipeline cancelled through another replica at once without
    /// waking for every result.
    status_changes: tokio::sync::broadcast::Sender<Arc<str>>,
    /// WEBHOOK_URL, for which every job's messages are queued too.
    global_webhook: Option<Arc<GlobalWebhook>>,
    /// Set when this process queued a webhook message: the sender looks at the outbox at
    /// once after a change only then (and every second anyway).
    outbox_queued: Arc<std::sync::atomic::AtomicBool>,
    /// Where evidence frames are kept (EVIDENCE).
    evidence: Arc<evidence::Frames>,
}

/// PostgreSQL NOTIFY channels between replicas, each carrying a job id: a result was stored
/// (the result streams follow it), or the job's status changed (every follower, and the
/// replica running the job, which stops it if it was cancelled elsewhere).
const CHANGES_CHANNEL: &str = "free_roam_changes";
const STATUS_CHANNEL: &str = "free_roam_status";
const NOTIFY_CHANGES: &str = "SELECT pg_notify('free_roam_changes', $1)";
const NOTIFY_STATUS: &str = "SELECT pg_notify('free_roam_status', $1)";

impl Store {
    /// Connects (creating a SQLite file and its folder if needed); does not migrate.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let mut file_lock = None;
        let dialect = if url.starts_with("sqlite:") {
            if let Some(dir) = sqlite_dir(url) {
                std::fs::create_dir_all(&dir).map_err(|e| {
                    StoreError::Corrupt(format!(
                        "cannot create database folder {}: {e}",
                        dir.display()
                    ))
                })?;
            }
            if let Some(file) = sqlite_file(url) {
                file_lock = Some(Arc::new(lock_sqlite(&file)?));
            }
            Dialect::Sqlite
        } else {
            Dialect::Postgres
        };
        let sqlite = dialect == Dialect::Sqlite;
        let options = |connections: u32, wait_secs: u64| {
            AnyPoolOptions::new()
                .max_connections(connections)
                .acquire_timeout(std::time::Duration::from_secs(wait_secs))
                .after_connect(move |conn, _| {
                    Box::pin(async move {
                        if sqlite {
                            // Write-ahead logging: readers never wait for the writer, and a commit
                            // is one append. NORMAL syncs at checkpoints: a process crash (kill -9)
                            // loses nothing committed; only a power loss may lose the newest
                            // commits, never consistency. SQLite's defaults (a rollback journal,
                            // FULL) cost several fsyncs per commit.
                            sqlx::Executor::execute(&mut *conn, "PRAGMA journal_mode = WAL")
                                .await?;
                            sqlx::Executor::execute(&mut *conn, "PRAGMA synchronous = NORMAL")
                                .await?;
                        } else {
                            // A replica frozen mid-transaction (SIGSTOP, a VM paused, a GC-like
                            // stall) would keep its row locks for as long as it stays frozen, and
                            // every other replica's claim of that job would wait on them. Our
                            // transactions never sit idle for seconds, so PostgreSQL ends such a
                            // session after 5 s: its locks go, its lease runs out, and another
                            // replica takes the job over (the frozen one's writes are fenced).
                            sqlx::Executor::execute(
                                &mut *conn,
                                "SET idle_in_transaction_session_timeout = '5s'",
                            )
                            .await?;
                        }
                        Ok(())
                    })
                })
        };
        // `sqlite://PATH` is created on first start, as the setting says, also when the URL
        // does not ask for it with `mode=rwc` (SQLite's default is to open existing files only).
        let created;
        let url = if sqlite && !url.contains("mode=") && file_lock.is_some() {
            created = format!("{url}{}mode=rwc", if url.contains('?') { '&' } else { '?' });
            created.as_str()
        } else {
            url
        };
        let pool = options(max_connections, 5).connect(url).await?;
        let writer = if sqlite && file_lock.is_some() {
            options(1, 30).connect(url).await?
        } else {
            pool.clone()
        };
        Ok(Self {
            pool,
            writer,
            dialect,
            admission: Default::default(),
            results_cache: Arc::new(ResultCache::with_weighter(
                100_000,
                RESULT_CACHE_BYTES,
                ResultWeight,
            )),
            _file_lock: file_lock,
            changes: tokio::sync::broadcast::channel(4096).0,
            status_changes: tokio::sync::broadcast::channel(256).0,
            global_webhook: None,
            outbox_queued: Default::default(),
            evidence: Arc::new(evidence::Frames::Off),
        })
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Job ids as their results or status change (a wake-up: read the store for what).
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<Arc<str>> {
        self.changes.subscribe()
    }

    /// Job ids as their status changes, here or (PostgreSQL) on any replica.
    pub fn status_changes(&self) -> tokio::sync::broadcast::Receiver<Arc<str>> {
        self.status_changes.subscribe()
    }

    /// Tells followers here that `job_id` changed.
    fn changed_here(&self, job_id: &str) {
        let _ = self.changes.send(Arc::from(job_id));
    }

    /// Tells followers here, and on PostgreSQL every replica, that `job_id`'s status changed.
    async fn changed(&self, job_id: &str) {
        self.changed_here(job_id);
        let _ = self.status_changes.send(Arc::from(job_id));
        if self.dialect == Dialect::Postgres {
            let notified = sqlx::query(NOTIFY_STATUS)
                .bind(job_id)
                .execute(&self.pool)
                .await;
            if let Err(e) = notified {
                tracing::debug!(error = %e, "cannot notify other replicas");
            }
        }
    }

    /// On PostgreSQL: forwards other replicas' change notifications to [`Store::changes`]
    /// until `stop`; reconnects after errors. Nothing to do on SQLite (one process).
    pub fn follow_other_replicas(&self, url: &str, stop: tokio_util::sync::CancellationToken) {
        if self.dialect != Dialect::Postgres {
            return;
        }
        let url = url.to_owned();
        let changes = self.changes.clone();
        let status_changes = self.status_changes.clone();
        tokio::spawn(async move {
            loop {
                let listened = async {
                    let mut listener = sqlx::postgres::PgListener::connect(&url).await?;
                    listener
                        .listen_all([CHANGES_CHANNEL, STATUS_CHANNEL])
                        .await?;
                    loop {
                        let n = listener.recv().await?;
                        let job_id: Arc<str> = Arc::from(n.payload());
                        if n.channel() == STATUS_CHANNEL {
                            let _ = status_changes.send(job_id.clone());
                        }
                        let _ = changes.send(job_id);
                    }
                    #[allow(unreachable_code)]
                    Ok::<(), sqlx::Error>(())
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = listened => {
                        if let Err(e) = r {
                            tracing::warn!(error = %e, "LISTEN for other replicas' changes failed; retrying");
                        }
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
            }
        });
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
            Dialect::Sqlite => self.writer.begin_with("BEGIN IMMEDIATE").await,
            Dialect::Postgres => self.writer.begin().await,
        }
    }
    pub async fn close(&self) {
        self.writer.close().await;
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
    sqlite_file(url)?
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(|p| p.to_owned())
}

/// The database file a `sqlite:` URL names (none for an in-memory database).
fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let path = path.split('?').next()?;
    if path.is_empty() || path.starts_with(":memory:") {
        return None;
    }
    Some(std::path::PathBuf::from(path))
}

/// SQLite runs one replica: a second process on the same file would run the same jobs. The
/// lock file says so at start instead of letting two processes race.
fn lock_sqlite(db: &std::path::Path) -> Result<std::fs::File, StoreError> {
    let mut name = db.as_os_str().to_owned();
    name.push(".lock");
    let path = std::path::PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StoreError::InUse(format!("cannot open {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InUse(format!(
            "another free-roam process is using the SQLite database {} (it holds {}). \
             SQLite runs one replica; for several, give them one PostgreSQL DATABASE_URL",
            db.display(),
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::InUse(format!(
            "cannot lock {}: {e}",
            path.display()
        ))),
    }
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
        owner: r.try_get("owner")?,
        lease_token: r.try_get("lease_token")?,
        webhook: push::parse_webhook(r.try_get::<Option<String>, _>("webhook")?.as_deref())?,
        gate: parse_json_column(r, "gate")?,
        clip: parse_json_column(r, "clip")?,
    })
}

/// A nullable JSON column as `T`.
fn parse_json_column<T: serde::de::DeserializeOwned>(
    r: &AnyRow,
    column: &str,
) -> Result<Option<T>, StoreError> {
    r.try_get::<Option<String>, _>(column)?
        .map(|text| {
            serde_json::from_str(&text)
                .map_err(|e| StoreError::Corrupt(format!("jobs.{column}: {e}")))
        })
        .transpose()
}

// After `select_jobs!`, which they use (macros are in scope from their definition on).
mod alerts;
mod evidence;
pub use evidence::{frame_url, sweep_forever, Swept};
mod jobs;
mod leases;
mod prompts;
mod push;
mod results;

pub use leases::{Lease, Takeover};
pub use push::{Delivery, EndpointKind, EndpointSummary, GlobalWebhook, JobEvent, Resend};

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sqlite_file_is_created_without_mode_rwc_in_the_url() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("new/free-roam.db");
        let store = Store::connect(&format!("sqlite://{}", file.display()), 2)
            .await
            .expect("the file is created");
        store.migrate().await.unwrap();
        assert!(file.is_file());
    }
}
