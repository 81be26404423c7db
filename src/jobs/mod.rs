//! The job manager: admits jobs, claims runnable jobs for this replica (leases in the store),
//! spawns and supervises one pipeline per claimed job, renews its leases, stops a pipeline
//! whose job was cancelled or taken over, and at shutdown stops them all and releases their
//! leases so another replica resumes them at once.
//!
//! Admission is cluster-wide (MAX_ACTIVE_JOBS pending or running in the database); running is
//! per replica (MAX_CONCURRENT_STREAMS claimed here). A job is started only by a claim, never
//! directly by the request that created it, so one path serves one process and many.
//!
//! The API talks to this handle and to the store, never to ingest or decoder internals.

mod cameras;
pub mod dispatch;
mod files;
pub mod pipeline;
pub mod publish;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::domain::{Fps, JobId, JobStatus, Priority, PromptText, StreamRef};
use crate::ingest::hls::fetch::{FetchSettings, Fetcher};
use crate::retry::Backoff;
use crate::stats::{Stats, StatsSnapshot};
use crate::store::{
    CancelOutcome, CreateJobError, Dialect, JobRecord, Lease, NewJob, Store, StoreError, Takeover,
};
use crate::vlm::Models;
use dispatch::Dispatchers;
use pipeline::{Outcome, Pipeline};

/// A job request that has passed every check of the API edge.
#[derive(Debug, Clone)]
pub struct StartJob {
    pub job_id: Option<JobId>,
    pub stream_ref: StreamRef,
    pub prompt: Option<PromptText>,
    /// The JSON Schema of the job's own prompt (checked), as JSON text.
    pub response_format: Option<String>,
    /// The job's own alert rules (checked).
    pub alerts: Option<Vec<crate::answers::alerts::AlertRule>>,
    pub fps: Fps,
    pub model: Option<String>,
    pub priority: Priority,
    pub from_beginning: bool,
    /// Where the job's events are also sent.
    pub webhook: Option<crate::webhook::Webhook>,
    pub retention: crate::store::JobRetention,
    pub gate: Option<crate::domain::ChangeGate>,
    pub clip: Option<crate::domain::Clip>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("job_id {0:?} is already taken")]
    Conflict(String),
    #[error("{active} jobs are already pending or running across the service (MAX_ACTIVE_JOBS={limit}; unset, it is MAX_CONCURRENT_STREAMS); cancel one or retry later")]
    AtCapacity { active: i64, limit: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How often the claim loop looks for runnable jobs and for jobs it lost, when nothing wakes
/// it sooner: what bounds how fast another replica picks up a job or a remote cancel.
const CLAIM_EVERY: Duration = Duration::from_millis(500);

/// Counts a leasing statement (`free_roam_lease_queries_total{kind}`): what coordination
/// costs the database, apart from the work of the jobs themselves.
fn lease_query(kind: &'static str) {
    metrics::counter!("free_roam_lease_queries_total", "kind" => kind).increment(1);
}

struct Running {
    cancel: CancellationToken,
    stats: Arc<Stats>,
    redis: bool,
    lease: Lease,
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
    /// This replica's id: the owner its leases carry.
    replica: Arc<str>,
    /// Wakes the claim loop (a job was created or a pipeline ended here).
    wake: tokio::sync::Notify,
    /// RESULTS_STREAM, when set.
    publish: Option<Arc<publish::ResultStream>>,
    /// Where every job's decoding runs (DECODE_THREADS at once).
    media: crate::media::workers::MediaWorkers,
}

#[derive(Clone)]
pub struct JobManager {
    inner: Arc<Inner>,
}

impl JobManager {
    pub fn new(store: Store, settings: Arc<Settings>, models: Models) -> anyhow::Result<Self> {
        let p = &settings.pipeline;
        let fetcher = Fetcher::new(
            p.network_policy(),
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
        let replica: Arc<str> = Arc::from(settings.replica_id.as_str());
        let publish = match &settings.results_stream {
            Some((server, key)) => Some(publish::ResultStream::new(
                server,
                key.clone(),
                settings.results_stream_maxlen,
            )?),
            None => None,
        };
        let media = crate::media::workers::MediaWorkers::new(p.decode_threads);
        Ok(Self {
            inner: Arc::new(Inner {
                media,
                store,
                settings,
                models,
                fetcher,
                dispatchers,
                running: Mutex::default(),
                tracker,
                shutdown,
                replica,
                wake: tokio::sync::Notify::new(),
                publish,
            }),
        })
    }

    /// This replica's id (the owner of the leases it takes).
    pub fn replica_id(&self) -> &str {
        &self.inner.replica
    }

    /// Admits a job as `pending`; a replica with room claims it (this one within
    /// milliseconds when it has room, any other within a second).
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
            response_format: req.response_format,
            alerts: req.alerts,
            webhook: req.webhook,
            retention: req.retention,
            gate: req.gate,
            clip: req.clip,
        };
        let limit = self.inner.settings.max_active_jobs;
        let job = match self.inner.store.create_job(&new, limit).await {
            Ok(job) => job,
            Err(CreateJobError::Conflict) => return Err(StartError::Conflict(job_id.to_string())),
            Err(CreateJobError::TooManyActive { active }) => {
                return Err(StartError::AtCapacity { active, limit })
            }
            Err(CreateJobError::Store(e)) => return Err(e.into()),
        };
        self.inner.wake.notify_one();
        Ok(job)
    }

    /// Starts claiming: jobs left by an earlier run of this replica (on SQLite, every active
    /// job: no other process can hold the file), then, until shutdown, pending jobs and
    /// jobs whose lease expired, up to MAX_CONCURRENT_STREAMS here. Also renews this
    /// replica's leases and stops pipelines whose job was cancelled or claimed elsewhere.
    pub fn start_claiming(&self) {
        let inner = self.inner.clone();
        self.inner
            .tracker
            .spawn(async move { inner.claim_loop().await });
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

    /// Jobs running here by their source's state (`live`, `stalled`, `reconnecting`,
    /// `connecting`, `reading`, `waiting`...: the state's first word), for `/metrics`.
    pub fn source_states(&self) -> std::collections::BTreeMap<String, usize> {
        let running = self.inner.running.lock().unwrap_or_else(|p| p.into_inner());
        let mut states = std::collections::BTreeMap::new();
        for r in running.values() {
            let state = r.stats.source_state();
            let word = state
                .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                .next()
                .filter(|w| !w.is_empty())
                .unwrap_or("none");
            *states.entry(word.to_owned()).or_insert(0) += 1;
        }
        states
    }

    /// Stops every pipeline and waits for them; jobs keep their stored state for the next start.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tracker.close();
        self.inner.tracker.wait().await;
    }
}

impl Inner {
    async fn claim_loop(self: Arc<Self>) {
        let ttl = self.settings.lease_ttl;
        let renew_every = ttl / 3;
        let mut takeover = match self.store.dialect() {
            Dialect::Sqlite => Takeover::All,
            Dialect::Postgres => Takeover::OwnFromBefore,
        };
        let mut renewed = Instant::now();
        let mut failing = false;
        // A job this replica runs that was cancelled (or finished) through another replica
        // stops at once, not at the next tick.
        let mut status_changes = self.store.status_changes();
        loop {
            let step = async {
                if renewed.elapsed() >= renew_every {
                    lease_query("renew");
                    self.store.renew_leases(&self.replica, ttl).await?;
                    renewed = Instant::now();
                }
                self.stop_lost().await?;
                let room = self
                    .settings
                    .max_concurrent_streams
                    .saturating_sub(self.running_count());
                if room > 0 && !self.shutdown.is_cancelled() {
                    lease_query("claim");
                    let claimed = self
                        .store
                        .claim_jobs(&self.replica, room, ttl, takeover)
                        .await?;
                    takeover = Takeover::Expired;
                    for (job, lease) in claimed {
                        tracing::info!(job_id = %job.job_id, token = lease.token, "claimed job");
                        self.clone().spawn(job, lease);
                    }
                }
                Ok::<(), StoreError>(())
            };
            let outcome = step.await;
            // Leases not renewed for a whole TTL have run out: another replica may own these
            // jobs by now. Stop them (their writes would be fenced anyway); whoever holds a
            // job when the database answers again resumes it from its saved progress.
            if outcome.is_err() && renewed.elapsed() >= ttl {
                self.stop_all_running("leases could not be renewed for LEASE_TTL_SECS");
            }
            match outcome {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("claiming jobs again");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::error!(error = %e, "cannot claim or renew jobs; retrying");
                }
                Err(_) => {}
            }
            let tick = tokio::time::sleep(CLAIM_EVERY);
            tokio::pin!(tick);
            loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = self.wake.notified() => break,
                    _ = &mut tick => break,
                    changed = status_changes.recv() => match changed {
                        Ok(job_id) if self.is_running(&job_id) => break,
                        Ok(_) => {}
                        // Missed some: one of them may be ours.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            tick.as_mut().await;
                            break;
                        }
                    },
                }
            }
        }
    }

    fn stop_all_running(&self, why: &str) {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        for (id, r) in running.iter() {
            if !r.cancel.is_cancelled() {
                tracing::warn!(job_id = %id, reason = why, "stopping the job");
                r.cancel.cancel();
            }
        }
    }

    fn is_running(&self, job_id: &str) -> bool {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(job_id)
    }

    fn running_count(&self) -> usize {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Stops the pipelines of jobs this replica no longer holds: cancelled or finished by a
    /// call to another replica, or claimed by another after this one's lease ran out.
    async fn stop_lost(&self) -> Result<(), StoreError> {
        lease_query("held");
        let held: HashMap<String, i64> = self
            .store
            .held_leases(&self.replica)
            .await?
            .into_iter()
            .collect();
        let orphans: Vec<(String, i64)> = {
            let running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            for (id, r) in running.iter() {
                if held.get(id) != Some(&r.lease.token) && !r.cancel.is_cancelled() {
                    tracing::info!(job_id = %id, "job cancelled, finished or taken over elsewhere; stopping");
                    r.cancel.cancel();
                }
            }
            held.into_iter()
                .filter(|(id, _)| !running.contains_key(id))
                .collect()
        };
        // Held here but not running here (a release that failed): give them up.
        for (id, token) in orphans {
            let lease = Lease {
                owner: self.replica.clone(),
                token,
            };
            lease_query("release");
            self.store.release_lease(&id, &lease).await?;
        }
        Ok(())
    }

    fn spawn(self: Arc<Self>, job: JobRecord, lease: Lease) {
        let inner = self;
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
                    lease: lease.clone(),
                },
            );
        }
        let id = job.job_id.clone();
        let span = tracing::info_span!("job", job_id = %id);
        let tracker = inner.tracker.clone();
        tracker.spawn(tracing::Instrument::instrument(
            async move {
                let stopped = inner.supervise(job, &lease, cancel, stats).await;
                if stopped {
                    lease_query("release");
                    // Stopped, not ended: give the job up so another replica (or this one,
                    // after a restart) resumes it at once rather than after the TTL.
                    if let Err(e) = inner.store.release_lease(&id, &lease).await {
                        tracing::warn!(error = %e, "cannot release the lease; it runs out instead");
                    }
                }
                inner
                    .running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                inner.wake.notify_one();
            },
            span,
        ));
    }

    /// Runs a claimed job to its end; true when it stopped without ending (shutdown, cancel,
    /// lease lost), so its lease should be released.
    async fn supervise(
        &self,
        job: JobRecord,
        lease: &Lease,
        cancel: CancellationToken,
        stats: Arc<Stats>,
    ) -> bool {
        let job_id = match JobId::parse(&job.job_id) {
            Ok(id) => id,
            Err(e) => {
                return self
                    .finish(&job.job_id, lease, JobStatus::Failed, Some(&e.to_string()))
                    .await
            }
        };
        let source = match StreamRef::parse_stored(
            &job.stream_ref,
            &self.settings.redis_host,
            self.settings.redis_port,
        ) {
            Ok(r) => r.source().clone(),
            Err(e) => {
                return self
                    .finish(&job.job_id, lease, JobStatus::Failed, Some(&e.message))
                    .await
            }
        };
        stats.set_source_state("waiting for the model backend");
        let backend = match self.models.wait_ready(&cancel).await {
            Ok(b) => b,
            Err(_) if cancel.is_cancelled() => return true,
            Err(why) => {
                return self
                    .finish(&job.job_id, lease, JobStatus::Failed, Some(&why))
                    .await
            }
        };
        let model = job
            .model
            .clone()
            .unwrap_or_else(|| self.models.default_name().to_owned());
        // How the model wants its frames; a model it cannot name or load fails the job here.
        let spec = tokio::select! {
            _ = cancel.cancelled() => return true,
            s = backend.frame_spec(&model) => s,
        };
        let spec = match spec {
            Ok(spec) => spec,
            Err(why) => {
                return self
                    .finish(&job.job_id, lease, JobStatus::Failed, Some(&why))
                    .await
            }
        };
        stats.set_source_state("");
        match self.store.mark_running(&job.job_id, lease).await {
            Ok(true) => {}
            // Cancelled, or claimed by another replica, meanwhile.
            Ok(false) => return true,
            Err(e) => {
                tracing::error!(error = %e, "cannot mark the job running");
                return true;
            }
        }
        let batcher = self.dispatchers.batcher(&model, backend);
        let pipeline = Pipeline {
            job: job.clone(),
            lease: lease.clone(),
            publish: self.publish.clone(),
            job_id,
            source,
            model,
            spec,
            evidence: match self.settings.evidence.store {
                crate::config::EvidenceStore::Off => None,
                _ => Some(crate::media::EvidenceSpec {
                    max_side: self.settings.evidence.max_side,
                    quality: self.settings.evidence.jpeg_quality,
                }),
            },
            store: self.store.clone(),
            settings: self.settings.clone(),
            stats,
            batcher,
            fetcher: self.fetcher.clone(),
            media: self.media.clone(),
            cancel,
            gathering: Default::default(),
        };
        match pipeline.run().await {
            Outcome::Completed => {
                self.finish(&job.job_id, lease, JobStatus::Completed, None)
                    .await
            }
            Outcome::Failed(why) => {
                tracing::warn!(reason = %why, "job failed");
                self.finish(&job.job_id, lease, JobStatus::Failed, Some(&why))
                    .await
            }
            Outcome::Stopped => true,
        }
    }

    /// Records how the job ended; false (nothing to release) unless the write failed.
    async fn finish(
        &self,
        job_id: &str,
        lease: &Lease,
        status: JobStatus,
        error: Option<&str>,
    ) -> bool {
        match self.store.finish_job(job_id, lease, status, error).await {
            Ok(_) => false,
            Err(e) => {
                tracing::error!(job_id, error = %e, "cannot record how the job ended");
                true
            }
        }
    }
}
