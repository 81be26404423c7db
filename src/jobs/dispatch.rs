//! Dispatch: one batcher per model, and the loop that cuts batches, looks up each job's
//! prompt in force at that moment, calls the backend, and hands every answer back to the
//! job that asked, with its queue, preprocess and inference times.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::batch::{Batcher, Queued};
use crate::domain::JobId;
use crate::media::Frame;
use crate::store::{PromptVersion, Store};
use crate::vlm::{Backend, InferRequest};

/// One sampled frame waiting for the model.
pub struct Work {
    pub job_id: JobId,
    pub frame: Arc<Frame>,
    pub reply: oneshot::Sender<Done>,
    /// The job's pipeline token: cancelled when it stops.
    pub stop: tokio_util::sync::CancellationToken,
}

/// Time spent per phase, in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Latency {
    pub queue: f64,
    pub preprocess: f64,
    pub inference: f64,
    pub total: f64,
}

/// The model's answer for one frame.
#[derive(Debug)]
pub struct Done {
    pub output: Result<String, String>,
    pub prompt_scope: String,
    pub prompt_version: i64,
    pub model: String,
    pub batch_size: usize,
    pub latency: Latency,
}

impl Done {
    /// The result of a frame refused before the model saw it (batch size 0, no prompt used).
    pub fn refused(why: String) -> Self {
        Self {
            output: Err(why),
            prompt_scope: String::new(),
            prompt_version: 0,
            model: String::new(),
            batch_size: 0,
            latency: Latency::default(),
        }
    }
}

/// The batchers of all models, each with its dispatch loop.
pub struct Dispatchers {
    store: Store,
    max_batch: usize,
    max_wait: Duration,
    batchers: Mutex<HashMap<String, Arc<Batcher<Work>>>>,
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Dispatchers {
    pub fn new(
        store: Store,
        max_batch: usize,
        max_wait: Duration,
        tracker: TaskTracker,
        stop: CancellationToken,
    ) -> Self {
        Self {
            store,
            max_batch,
            max_wait,
            batchers: Mutex::default(),
            tracker,
            stop,
        }
    }

    /// The batcher shared by every job on `model`, started on first use.
    pub fn batcher(&self, model: &str, backend: Arc<dyn Backend>) -> Arc<Batcher<Work>> {
        let mut map = self.batchers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = map.get(model) {
            return b.clone();
        }
        let batcher = Batcher::new();
        map.insert(model.to_owned(), batcher.clone());
        let dispatch = Dispatch {
            model: model.to_owned(),
            batcher: batcher.clone(),
            backend,
            store: self.store.clone(),
            max_batch: self.max_batch,
            max_wait: self.max_wait,
        };
        self.tracker.spawn(dispatch.run(self.stop.clone()));
        batcher
    }
}

struct Dispatch {
    model: String,
    batcher: Arc<Batcher<Work>>,
    backend: Arc<dyn Backend>,
    store: Store,
    max_batch: usize,
    max_wait: Duration,
}

impl Dispatch {
    async fn run(self, stop: CancellationToken) {
        let me = Arc::new(self);
        let slots = Arc::new(Semaphore::new(me.backend.concurrent_batches()));
        loop {
            let permit = tokio::select! {
                _ = stop.cancelled() => return,
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            };
            let batch = tokio::select! {
                _ = stop.cancelled() => return,
                b = me.batcher.next_batch(me.max_batch, me.max_wait) => b,
            };
            let me = me.clone();
            tokio::spawn(async move {
                me.run_batch(batch).await;
                drop(permit);
            });
        }
    }

    async fn run_batch(&self, mut batch: Vec<Queued<Work>>) {
        // Frames of a job that stopped (cancelled, lease lost) after they were queued: nobody
        // waits for their answer, so the model is not asked.
        batch.retain(|q| !q.item.reply.is_closed() && !q.item.stop.is_cancelled());
        if batch.is_empty() {
            return;
        }
        let formed = Instant::now();
        let size = batch.len();
        // The prompt in force now, per job: an update applies to every batch cut after it.
        let mut prompts: HashMap<JobId, Result<PromptVersion, String>> = HashMap::new();
        for q in &batch {
            if !prompts.contains_key(&q.item.job_id) {
                let p = match self.store.effective_prompt(&q.item.job_id).await {
                    Ok(Some(p)) => Ok(p),
                    Ok(None) => Err("no prompt is set".to_owned()),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the prompt");
                        Err("prompt unavailable: database error".to_owned())
                    }
                };
                prompts.insert(q.item.job_id.clone(), p);
            }
        }
        let mut asked = Vec::new();
        let mut requests = Vec::new();
        let mut refused = Vec::new();
        for q in batch {
            match &prompts[&q.item.job_id] {
                Ok(p) => {
                    requests.push(InferRequest {
                        frame: q.item.frame.clone(),
                        prompt: p.prompt.clone(),
                        stop: q.item.stop.clone(),
                    });
                    asked.push((q, p.clone()));
                }
                Err(why) => refused.push((q, why.clone())),
            }
        }
        let outputs = if requests.is_empty() {
            Vec::new()
        } else {
            self.backend.infer(&self.model, requests).await
        };
        metrics::histogram!("free_roam_batch_size", "model" => self.model.clone())
            .record(size as f64);
        let queue_of = |q: &Queued<Work>| (formed - q.enqueued).as_secs_f64() * 1000.0;
        for ((q, prompt), out) in asked.into_iter().zip(outputs) {
            let latency = Latency {
                queue: queue_of(&q),
                preprocess: out.preprocess_ms,
                inference: out.inference_ms,
                total: q.enqueued.elapsed().as_secs_f64() * 1000.0,
            };
            for (stage, ms) in [
                ("queue", latency.queue),
                ("preprocess", latency.preprocess),
                ("inference", latency.inference),
                ("total", latency.total),
            ] {
                metrics::histogram!("free_roam_stage_seconds", "stage" => stage, "model" => self.model.clone()).record(ms / 1000.0);
            }
            let _ = q.item.reply.send(Done {
                output: out.output,
                prompt_scope: prompt.scope.name().to_owned(),
                prompt_version: prompt.version,
                model: self.model.clone(),
                batch_size: size,
                latency,
            });
        }
        for (q, why) in refused {
            let latency = Latency {
                queue: queue_of(&q),
                preprocess: 0.0,
                inference: 0.0,
                total: q.enqueued.elapsed().as_secs_f64() * 1000.0,
            };
            let _ = q.item.reply.send(Done {
                output: Err(why),
                prompt_scope: String::new(),
                prompt_version: 0,
                model: self.model.clone(),
                batch_size: size,
                latency,
            });
        }
    }
}
