//! The job manager: admits jobs, spawns and supervises one pipeline per job, cancels them,
//! resumes unfinished jobs at start, and stops them all at shutdown.
//!
//! The API talks to this handle and to the store, never to ingest or decoder internals.

pub mod dispatch;
pub mod pipeline;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::domain::{Fps, JobId, JobStatus, Priority, PromptText, StreamRef};
use crate::ingest::hls::fetch::{FetchSettings, Fetcher};
use crate::ingest::ssrf::NetworkPolicy;
use crate::retry::Backoff;
use crate::stats::{Stats, StatsSnapshot};
use crate::store::{CancelOutcome, CreateJobError, JobRecord, NewJob, Store, StoreError};
use crate::vlm::Models;
use dispatch::Dispatchers;
use pipeline::{Outcome, Pipeline};

/// A job request that has passed every check of the API edge.
#[derive(Debug, Clone)]
pub struct StartJob {
    pub job_id: Option<JobId>,
    pub stream_ref: StreamRef,
    pub prompt: Option<PromptText>,
    pub fps: Fps,
    pub model: Option<String>,
    pub priority: Priority,
    pub from_beginning: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("job_id {0:?} is already taken")]
    Conflict(String),
    #[error("{active} jobs are already pending or running (MAX_CONCURRENT_STREAMS={limit}); cancel one or retry later")]
    AtCapacity { active: i64, limit: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
}

struct Running {
    cancel: CancellationToken,
    stats: Arc<Stats>,
    redis: bool,
}

struct Inner {
    store: Store,
    settings: Arc<Settings>,
    models: Models,
    fetcher: Fetcher,
    dispatchers: Dispatchers,
    running: Mutex<HashMap<String, Running>>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

#[derive(Clone)]
pub struct JobManager {
    inner: Arc<Inner>,
}

impl JobManager {
    pub fn new(store: Store, settings: Arc<Settings>, models: Models) -> anyhow::Result<Self> {
        let p = &settings.pipeline;
        let fetcher = Fetcher::new(
            NetworkPolicy {
                allow_private: p.allow_private_networks,
                allowlist: p.network_allowlist.clone(),
            },
            FetchSettings {
                timeout: p.fetch_timeout,
                backoff: Backoff::new(
                    std::time::Duration::from_millis(200),
                    std::time::Duration::from_secs(5),
                    p.fetch_retries + 1,
                ),
                max_redirects: 5,
            },
        )?;
        let tracker = TaskTracker::new();
        let shutdown = CancellationToken::new();
        let dispatchers = Dispatchers::new(
            store.clone(),
            settings.max_batch_size,
            settings.max_batch_wait,
            tracker.clone(),
            shutdown.clone(),
        );
        Ok(Self {
            inner: Arc::new(Inner {
                store,
                settings,
                models,
                fetcher,
                dispatchers,
                running: Mutex::default(),
                tracker,
                shutdown,
            }),
        })
    }

    /// Admits a job as `pending` and starts its pipeline.
    pub async fn start(&self, req: StartJob) -> Result<JobRecord, StartError> {
        let job_id = req.job_id.unwrap_or_else(JobId::generate);
        let new = NewJob {
            job_id: job_id.clone(),
            stream_ref: req.stream_ref.as_str().to_owned(),
            source_type: req.stream_ref.source().kind(),
            fps: req.fps.get(),
            model: req.model,
            priority: req.priority,
            from_beginning: req.from_beginning,
            prompt: req.prompt.map(PromptText::into_string),
        };
        let limit = self.inner.settings.max_concurrent_streams;
        let job = match self.inner.store.create_job(&new, limit).await {
            Ok(job) => job,
            Err(CreateJobError::Conflict) => return Err(StartError::Conflict(job_id.to_string())),
            Err(CreateJobError::TooManyActive { active }) => {
                return Err(StartError::AtCapacity { active, limit })
            }
            Err(CreateJobError::Store(e)) => return Err(e.into()),
        };
        self.spawn(job.clone());
        Ok(job)
    }

    /// Starts pipelines for every job left pending or running by an earlier process.
    pub async fn resume(&self) -> Result<usize, StoreError> {
        let jobs = self
            .inner
            .store
            .jobs_with_status(&[JobStatus::Pending, JobStatus::Running])
            .await?;
        let n = jobs.len();
        for job in jobs {
            tracing::info!(job_id = %job.job_id, "resuming job");
            self.spawn(job);
        }
        Ok(n)
    }

    fn spawn(&self, job: JobRecord) {
        let inner = self.inner.clone();
        let cancel = inner.shutdown.child_token();
        let saved: StatsSnapshot = serde_json::from_value(job.stats.clone()).unwrap_or_default();
        let stats = Arc::new(Stats::restore(&saved));
        {
            let mut running = inner.running.lock().unwrap_or_else(|p| p.into_inner());
            if running.contains_key(&job.job_id) {
                return;
            }
            running.insert(
                job.job_id.clone(),
                Running {
                    cancel: cancel.clone(),
                    stats: stats.clone(),
                    redis: job.source_type == "redis",
                },
            );
        }
        let id = job.job_id.clone();
        let span = tracing::info_span!("job", job_id = %id);
        self.inner.tracker.spawn(tracing::Instrument::instrument(
            async move {
                inner.supervise(job, cancel, stats).await;
                inner
                    .running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            },
            span,
        ));
    }

    /// Cancels a pending or running job; its pipeline stops within a second.
    pub async fn cancel(&self, job_id: &str) -> Result<CancelOutcome, StoreError> {
        let outcome = self.inner.store.cancel_job(job_id).await?;
        if let CancelOutcome::Cancelled(_) = &outcome {
            if let Some(r) = self
                .inner
                .running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(job_id)
            {
                r.cancel.cancel();
            }
        }
        Ok(outcome)
    }

    /// Live counters of a job running in this process.
    pub fn live_stats(&self, job_id: &str) -> Option<StatsSnapshot> {
        self.inner
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(job_id)
            .map(|r| r.stats.snapshot())
    }

    /// Redis as the running Redis jobs see it: (jobs reading Redis, of which reconnecting);
    /// `None` when no job here reads Redis.
    pub fn redis_health(&self) -> Option<(usize, usize)> {
        let running = self.inner.running.lock().unwrap_or_else(|p| p.into_inner());
        let redis: Vec<&Running> = running.values().filter(|r| r.redis).collect();
        if redis.is_empty() {
            return None;
        }
        let reconnecting = redis
            .iter()
            .filter(|r| r.stats.snapshot().source_state.starts_with("reconnecting"))
            .count();
        Some((redis.len(), reconnecting))
    }

    /// Stops every pipeline and waits for them; jobs keep their stored state for the next start.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }
}

impl Inner {
    async fn supervise(&self, job: JobRecord, cancel: CancellationToken, stats: Arc<Stats>) {
        let job_id = match JobId::parse(&job.job_id) {
            Ok(id) => id,
            Err(e) => {
                return self
                    .finish(&job.job_id, JobStatus::Failed, Some(&e.to_string()))
                    .await
            }
        };
        let source = match StreamRef::parse(
            &job.stream_ref,
            &self.settings.redis_host,
            self.settings.redis_port,
        ) {
            Ok(r) => r.source().clone(),
            Err(e) => {
                return self
                    .finish(&job.job_id, JobStatus::Failed, Some(&e.message))
                    .await
            }
        };
        stats.set_source_state("waiting for the model backend");
        let backend = match self.models.wait_ready(&cancel).await {
            Ok(b) => b,
            Err(_) if cancel.is_cancelled() => return,
            Err(why) => {
                return self
                    .finish(&job.job_id, JobStatus::Failed, Some(&why))
                    .await
            }
        };
        let model = job
            .model
            .clone()
            .unwrap_or_else(|| self.models.default_name().to_owned());
        // How the model wants its frames; a model it cannot name or load fails the job here.
        let spec = tokio::select! {
            _ = cancel.cancelled() => return,
            s = backend.frame_spec(&model) => s,
        };
        let spec = match spec {
            Ok(spec) => spec,
            Err(why) => {
                return self
                    .finish(&job.job_id, JobStatus::Failed, Some(&why))
                    .await
            }
        };
        stats.set_source_state("");
        match self.store.mark_running(&job.job_id).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::error!(error = %e, "cannot mark the job running");
                return;
            }
        }
        let batcher = self.dispatchers.batcher(&model, backend);
        let pipeline = Pipeline {
            job: job.clone(),
            job_id,
            source,
            model,
            spec,
            store: self.store.clone(),
            settings: self.settings.clone(),
            stats,
            batcher,
            fetcher: self.fetcher.clone(),
            cancel,
        };
        match pipeline.run().await {
            Outcome::Completed => self.finish(&job.job_id, JobStatus::Completed, None).await,
            Outcome::Failed(why) => {
                tracing::warn!(reason = %why, "job failed");
                self.finish(&job.job_id, JobStatus::Failed, Some(&why))
                    .await
            }
            Outcome::Stopped => {}
        }
    }

    async fn finish(&self, job_id: &str, status: JobStatus, error: Option<&str>) {
        if let Err(e) = self.store.finish_job(job_id, status, error).await {
            tracing::error!(job_id, error = %e, "cannot record how the job ended");
        }
    }
}
