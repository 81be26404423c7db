//! Evidence and retention: the frame behind each answer, kept in the database, in a
//! directory every replica mounts or in an S3-compatible bucket (`EVIDENCE`), and the sweeps
//! that delete expired results, frames and finished jobs in bounded batches.
//!
//! A directory and a bucket are both reached through the `object_store` crate (Apache Arrow's,
//! made for exactly this: one API over local files, S3 and its compatibles, with atomic
//! writes, bulk deletes and retries), so they share every code path here.
//!
//! Each job records how far retention has reached (`results_kept_from`,
//! `evidence_kept_from`: every seq below is gone), so readers on any replica skip what another
//! replica's sweeper deleted without asking, and cached rows below it are never served.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt};
use sqlx::Row;

use super::*;
use crate::config::{EvidenceStore, RetentionSettings, S3Bucket};

/// Longest a frame's write may take: it happens inside the result's transaction, which holds
/// the job's row (PostgreSQL ends a transaction idle for 5 s). Past it the result is stored
/// without its frame.
const OBJECT_WRITE_BUDGET: Duration = Duration::from_secs(3);

/// Where evidence frames are, as the store reaches them.
pub(super) enum Frames {
    Off,
    /// The `evidence` table, in the result's own transaction.
    Database,
    /// One object per frame, `<prefix>/<job_id>/<seq>.jpg`, in a directory or a bucket.
    Objects {
        store: Arc<dyn ObjectStore>,
        prefix: Option<Key>,
    },
}

impl Frames {
    /// Builds what `EVIDENCE` says: creates the directory, configures the bucket's client
    /// (nothing is sent until a frame is).
    fn open(setting: EvidenceStore) -> Result<Self, StoreError> {
        let fail = |e: &dyn std::fmt::Display| StoreError::Evidence(e.to_string());
        Ok(match setting {
            EvidenceStore::Off => Frames::Off,
            EvidenceStore::Database => Frames::Database,
            EvidenceStore::Directory(dir) => {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| fail(&format!("cannot create {}: {e}", dir.display())))?;
                let local = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| fail(&e))?
                    .with_automatic_cleanup(true);
                Frames::Objects {
                    store: Arc::new(local),
                    prefix: None,
                }
            }
            EvidenceStore::S3(bucket) => Frames::Objects {
                prefix: (!bucket.prefix.is_empty())
                    .then(|| Key::parse(&bucket.prefix))
                    .transpose()
                    .map_err(|e| fail(&e))?,
                store: Arc::new(s3_client(&bucket).map_err(|e| fail(&e))?),
            },
        })
    }

    pub(super) fn keeps(&self) -> bool {
        !matches!(self, Frames::Off)
    }

    /// The key of a job's frames' "folder", or of one frame.
    fn key(prefix: &Option<Key>, job_id: &str, seq: Option<i64>) -> Key {
        let mut key = prefix.clone().unwrap_or_default().join(job_id);
        if let Some(seq) = seq {
            key = key.join(format!("{seq}.jpg"));
        }
        key
    }
}

/// An S3 client for `bucket`: the environment's AWS settings (`AWS_*`: web identity,
/// container or instance credentials, `AWS_DEFAULT_REGION`...), then the service's own. Short timeouts and few retries: a frame is written inside its result's
/// transaction, and the answer matters more than its picture.
fn s3_client(bucket: &S3Bucket) -> object_store::Result<object_store::aws::AmazonS3> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    let mut builder = AmazonS3Builder::new();
    for (name, value) in &bucket.aws {
        if let Ok(key) = name.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
            builder = builder.with_config(key, value);
        }
    }
    builder = builder.with_bucket_name(&bucket.bucket);
    if let Some(region) = &bucket.region {
        builder = builder.with_region(region);
    }
    if let Some((id, secret)) = &bucket.credentials {
        builder = builder
            .with_access_key_id(id)
            .with_secret_access_key(secret);
    }
    let mut client = object_store::ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(10));
    if let Some(endpoint) = &bucket.endpoint {
        builder = builder
            .with_endpoint(endpoint)
            .with_virtual_hosted_style_request(false);
        // Client options replace each other whole: plain HTTP is allowed here, with them.
        client = client.with_allow_http(endpoint.starts_with("http://"));
    }
    builder
        .with_client_options(client)
        .with_retry(object_store::RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_secs(10),
            ..Default::default()
        })
        .build()
}

/// What one sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub results: u64,
    pub frames: u64,
    pub jobs: u64,
}

/// Sweeps every `interval` until `stop`; a failed sweep is logged and tried again next time.
/// Every replica sweeps: deletes are idempotent and the kept-from marks only move forward.
pub async fn sweep_forever(
    store: Store,
    settings: RetentionSettings,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(settings.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.sweep(&settings, now_secs()).await {
            Ok(s) if s != Swept::default() => {
                tracing::info!(
                    results = s.results,
                    frames = s.frames,
                    jobs = s.jobs,
                    "retention sweep"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retention sweep failed; trying again later"),
        }
    }
}

/// What retention deletes in a job, oldest first.
#[derive(Debug, Clone, Copy)]
enum Kept {
    Results,
    Frames,
}

/// Where the API serves the evidence frame of result `seq` of `job_id`.
pub fn frame_url(job_id: &str, seq: i64) -> String {
    format!("/api/v1/inference/results/{job_id}/{seq}/frame")
}

impl Store {
    /// Keeps evidence frames where `store` says (the default keeps none). Fails when the
    /// directory cannot be made or the bucket's settings are unusable.
    pub fn with_evidence_store(mut self, store: EvidenceStore) -> Result<Self, StoreError> {
        self.evidence = Arc::new(Frames::open(store)?);
        Ok(self)
    }

    /// Inside the result's transaction: keeps its frame. In the database it commits with
    /// the result; as an object it is written before the commit (a result that then fails to
    /// commit leaves an object its seq's next result overwrites). True when it was kept.
    pub(super) async fn keep_frame(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        job_id: &str,
        seq: i64,
        jpeg: &[u8],
        created_at: f64,
    ) -> Result<bool, StoreError> {
        match &*self.evidence {
            Frames::Off => Ok(false),
            Frames::Database => {
                sqlx::query(
                    "INSERT INTO evidence (job_id, seq, created_at, jpeg) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (job_id, seq) DO UPDATE SET created_at = $3, jpeg = $4",
                )
                .bind(job_id)
                .bind(seq)
                .bind(created_at)
                .bind(jpeg.to_vec())
                .execute(&mut **tx)
                .await?;
                Ok(true)
            }
            Frames::Objects { store, prefix } => {
                let key = Frames::key(prefix, job_id, Some(seq));
                // Written whole (a file is renamed into place): no reader sees half a frame.
                let put = store.put(&key, jpeg.to_vec().into());
                let why = match tokio::time::timeout(OBJECT_WRITE_BUDGET, put).await {
                    Ok(Ok(_)) => return Ok(true),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no answer within {OBJECT_WRITE_BUDGET:?}"),
                };
                // The answer matters more than its picture: stored without it.
                metrics::counter!("free_roam_evidence_write_failures_total").increment(1);
                tracing::warn!(job_id, seq, key = %key, error = %why, "cannot write the evidence frame; the result is stored without it");
                Ok(false)
            }
        }
    }

    /// The `pts_ms` of result `seq` of `job_id` and its evidence frame (none when not kept or
    /// expired); `None` when there is no such result (never stored, or deleted).
    pub async fn replay_frame(
        &self,
        job_id: &str,
        seq: i64,
    ) -> Result<Option<(i64, Option<Vec<u8>>)>, StoreError> {
        let row = sqlx::query(
            "SELECT r.pts_ms, r.evidence, j.evidence_kept_from FROM results r JOIN jobs j ON j.job_id = r.job_id \
             WHERE r.job_id = $1 AND r.seq = $2",
        )
        .bind(job_id)
        .bind(seq)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let (pts, kept, from): (i64, i64, i64) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        if kept == 0 || seq < from {
            return Ok(Some((pts, None)));
        }
        Ok(Some((pts, self.kept_frame(job_id, seq).await?)))
    }

    /// The evidence frame of result `seq` of `job_id`, if it is kept and not expired.
    pub async fn frame(&self, job_id: &str, seq: i64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.replay_frame(job_id, seq).await?.and_then(|(_, f)| f))
    }

    /// Reads a frame the result says was kept, from where frames are kept.
    async fn kept_frame(&self, job_id: &str, seq: i64) -> Result<Option<Vec<u8>>, StoreError> {
        match &*self.evidence {
            Frames::Objects { store, prefix } => {
                let key = Frames::key(prefix, job_id, Some(seq));
                let read = async { store.get(&key).await?.bytes().await };
                match read.await {
                    Ok(bytes) => Ok(Some(bytes.to_vec())),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(StoreError::Evidence(e.to_string())),
                }
            }
            // Off now but kept earlier in the database: still served until it expires.
            Frames::Database | Frames::Off => {
                let row = sqlx::query("SELECT jpeg FROM evidence WHERE job_id = $1 AND seq = $2")
                    .bind(job_id)
                    .bind(seq)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(row.map(|r| r.try_get(0)).transpose()?)
            }
        }
    }

    /// One pass of retention: for each job, results and frames older than its retention (its
    /// own, else the settings'), oldest first, at most `batch` rows a statement; then
    /// finished jobs past JOB_RETENTION with everything they hold. `now` in Unix seconds.
    pub async fn sweep(&self, r: &RetentionSettings, now: f64) -> Result<Swept, StoreError> {
        let mut swept = Swept::default();
        let batch = r.sweep_batch as i64;
        let secs = |d: Option<std::time::Duration>| d.map(|d| d.as_secs() as i64);
        // Only jobs with something left to expire.
        let rows = sqlx::query(
            "SELECT job_id, results_retention_s, evidence_retention_s, results_kept_from, evidence_kept_from, results_count FROM jobs \
             WHERE results_kept_from < results_count OR evidence_kept_from < results_count",
        )
        .fetch_all(&self.pool)
        .await?;
        for row in rows {
            let job_id: String = row.try_get(0)?;
            let count: i64 = row.try_get(5)?;
            // A job's own 0 keeps for ever.
            let own = |v: Option<i64>, default| match v {
                Some(0) => None,
                Some(s) => Some(s),
                None => default,
            };
            let results_s = own(row.try_get(1)?, secs(r.results));
            let frames_s = own(row.try_get(2)?, secs(r.evidence));
            let (results_from, frames_from): (i64, i64) = (row.try_get(3)?, row.try_get(4)?);
            // Frames go with their results at the latest.
            let frames_s = match (frames_s, results_s) {
                (Some(f), Some(r)) => Some(f.min(r)),
                (f, r) => f.or(r),
            };
            if let Some(s) = frames_s {
                swept.frames += self
                    .sweep_prefix(
                        Kept::Frames,
                        &job_id,
                        frames_from,
                        count,
                        batch,
                        now - s as f64,
                    )
                    .await?;
            }
            if let Some(s) = results_s {
                swept.results += self
                    .sweep_prefix(
                        Kept::Results,
                        &job_id,
                        results_from,
                        count,
                        batch,
                        now - s as f64,
                    )
                    .await?;
            }
        }
        if let Some(d) = r.finished_jobs {
            loop {
                let old = sqlx::query(limited(
                    "SELECT job_id FROM jobs WHERE status IN ('completed', 'failed', 'cancelled') \
                     AND completed_at < $1 ORDER BY completed_at",
                    batch.min(100),
                ))
                .bind(now - d.as_secs_f64())
                .fetch_all(&self.pool)
                .await?;
                if old.is_empty() {
                    break;
                }
                for row in old {
                    let job_id: String = row.try_get(0)?;
                    self.delete_job(&job_id, batch).await?;
                    swept.jobs += 1;
                }
            }
        }
        Ok(swept)
    }

    /// The seq before which every result of `job_id` from `from` on (at most `batch` of them)
    /// was created before `cutoff`: results are stored in seq order, so that is a prefix.
    async fn expired_upto(
        &self,
        job_id: &str,
        from: i64,
        batch: i64,
        cutoff: f64,
    ) -> Result<i64, StoreError> {
        let rows = sqlx::query(limited(
            "SELECT seq, created_at FROM results WHERE job_id = $1 AND seq >= $2 ORDER BY seq",
            batch,
        ))
        .bind(job_id)
        .bind(from)
        .fetch_all(&self.pool)
        .await?;
        let mut upto = from;
        for r in rows {
            let (seq, at): (i64, f64) = (r.try_get(0)?, r.try_get(1)?);
            if at >= cutoff {
                break;
            }
            upto = seq + 1;
        }
        Ok(upto)
    }

    /// Deletes the job's `kind` rows from `from` on that were created before `cutoff` (a
    /// prefix in seq order, below `count`), `batch` at a time, each batch in its own short
    /// transaction that also moves the job's kept-from mark. Returns how many went.
    async fn sweep_prefix(
        &self,
        kind: Kept,
        job_id: &str,
        mut from: i64,
        count: i64,
        batch: i64,
        cutoff: f64,
    ) -> Result<u64, StoreError> {
        let (table, mark) = match kind {
            Kept::Results => ("results", "results_kept_from"),
            Kept::Frames => ("evidence", "evidence_kept_from"),
        };
        let mut n = 0;
        while from < count {
            let upto = self.expired_upto(job_id, from, batch, cutoff).await?;
            if upto == from {
                break;
            }
            if let (Kept::Frames, Frames::Objects { store, prefix }) = (kind, &*self.evidence) {
                let keys: Vec<_> = (from..upto)
                    .map(|seq| Ok(Frames::key(prefix, job_id, Some(seq))))
                    .collect();
                n += delete_objects(store, futures::stream::iter(keys).boxed()).await?;
            }
            let mut tx = self.begin_write().await?;
            let delete =
                format!("DELETE FROM {table} WHERE job_id = $1 AND seq >= $2 AND seq < $3");
            n += sqlx::query(sqlx::AssertSqlSafe(delete))
                .bind(job_id)
                .bind(from)
                .bind(upto)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            // Only forward: replicas sweeping at once agree.
            let mark = format!(
                "UPDATE jobs SET {mark} = CASE WHEN {mark} < $2 THEN $2 ELSE {mark} END WHERE job_id = $1"
            );
            sqlx::query(sqlx::AssertSqlSafe(mark))
                .bind(job_id)
                .bind(upto)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            from = upto;
        }
        Ok(n)
    }

    /// Deletes a finished job and everything it holds, results and frames in batches.
    async fn delete_job(&self, job_id: &str, batch: i64) -> Result<(), StoreError> {
        loop {
            let mut tx = self.begin_write().await?;
            let mut n = 0;
            for table in ["results", "evidence"] {
                let sql = format!(
                    "DELETE FROM {table} WHERE job_id = $1 AND seq IN (SELECT seq FROM {table} WHERE job_id = $1 ORDER BY seq LIMIT {batch})"
                );
                n += sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(job_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
            }
            tx.commit().await?;
            if n == 0 {
                break;
            }
        }
        if let Frames::Objects { store, prefix } = &*self.evidence {
            let folder = Frames::key(prefix, job_id, None);
            let keys = store
                .list(Some(&folder))
                .map_ok(|meta| meta.location)
                .boxed();
            delete_objects(store, keys).await?;
        }
        let scope = format!("job:{job_id}");
        let mut tx = self.begin_write().await?;
        for sql in [
            "DELETE FROM job_events WHERE job_id = $1",
            "DELETE FROM webhook_deliveries WHERE job_id = $1",
            "DELETE FROM jobs WHERE job_id = $1",
        ] {
            sqlx::query(sql).bind(job_id).execute(&mut *tx).await?;
        }
        for sql in [
            "DELETE FROM prompt_versions WHERE scope_key = $1",
            "DELETE FROM alert_versions WHERE scope_key = $1",
        ] {
            sqlx::query(sql).bind(&scope).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        tracing::info!(job_id, "finished job deleted by JOB_RETENTION");
        Ok(())
    }
}

/// Deletes the objects `keys` names (in bulk where the store can); one already gone counts
/// as deleted by someone else. Returns how many this call deleted.
async fn delete_objects(
    store: &Arc<dyn ObjectStore>,
    keys: futures::stream::BoxStream<'static, object_store::Result<Key>>,
) -> Result<u64, StoreError> {
    let mut deleted = store.delete_stream(keys);
    let mut n = 0;
    while let Some(outcome) = deleted.next().await {
        match outcome {
            Ok(_) => n += 1,
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(StoreError::Evidence(e.to_string())),
        }
    }
    Ok(n)
}
