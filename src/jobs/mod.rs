//! The job manager: admits jobs, and (with the pipeline stage) spawns, supervises and cancels
//! one pipeline per job.
//!
//! The API talks to this handle and to the store, never to ingest or decoder internals.

use std::sync::Arc;

use crate::config::Settings;
use crate::domain::{Fps, JobId, Priority, PromptText, StreamRef};
use crate::store::{CancelOutcome, CreateJobError, JobRecord, NewJob, Store, StoreError};

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

#[derive(Clone)]
pub struct JobManager {
    store: Store,
    settings: Arc<Settings>,
}

impl JobManager {
    pub fn new(store: Store, settings: Arc<Settings>) -> Self {
        Self { store, settings }
    }

    /// Admits a job as `pending`.
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
        let limit = self.settings.max_concurrent_streams;
        match self.store.create_job(&new, limit).await {
            Ok(job) => Ok(job),
            Err(CreateJobError::Conflict) => Err(StartError::Conflict(job_id.to_string())),
            Err(CreateJobError::TooManyActive { active }) => {
                Err(StartError::AtCapacity { active, limit })
            }
            Err(CreateJobError::Store(e)) => Err(e.into()),
        }
    }

    /// Cancels a pending or running job.
    pub async fn cancel(&self, job_id: &str) -> Result<CancelOutcome, StoreError> {
        self.store.cancel_job(job_id).await
    }

    /// Stops every pipeline; jobs keep their stored state for the next start.
    pub async fn shutdown(&self) {}
}
