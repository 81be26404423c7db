//! Dispatch: one batcher per model, and the loop that cuts batches, looks up each job's
//! prompt and alert rules in force at that moment, calls the backend (one request per frame
//! for the prompt and one per alert question, all in the same batch), checks structured
//! answers against the prompt's `response_format`, and hands every answer back to the job
//! that asked, with its queue, preprocess and inference times.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::answers::alerts::AlertAnswer;
use crate::answers::structured::ResponseFormat;
use crate::answers::Output;
use crate::batch::{Batcher, Queued};
use crate::domain::JobId;
use crate::media::Frame;
use crate::store::{AlertSetVersion, PromptVersion, Store};
use crate::vlm::{Backend, InferOutput, InferRequest};

/// One sampled frame (or a clip's frames, in time order) waiting for the model.
pub struct Work {
    pub job_id: JobId,
    pub frames: Vec<Arc<Frame>>,
    pub reply: oneshot::Sender<Done>,
    /// The job's pipeline token: cancelled when it stops.
    pub stop: tokio_util::sync::CancellationToken,
    /// The frame's evidence JPEG, never sent to the model: it waits here, so a frame dropped
    /// from a full lane frees it at once, and comes back with the answer in [`Done`].
    pub evidence: Option<Vec<u8>>,
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
    pub output: Result<Output, String>,
    /// The answers to the job's alert questions, and the rule set they came from (`None`:
    /// no rule set was in force, or the frame never reached the model).
    pub alerts: Option<(Arc<AlertSetVersion>, Vec<AlertAnswer>)>,
    pub prompt_scope: String,
    pub prompt_version: i64,
    pub model: String,
    pub batch_size: usize,
    pub latency: Latency,
    /// The evidence JPEG the frame's [`Work`] carried.
    pub evidence: Option<Vec<u8>>,
}

impl Done {
    /// The result of a frame refused before the model saw it (batch size 0, no prompt used).
    pub fn refused(why: String) -> Self {
        Self {
            output: Err(why),
            alerts: None,
            prompt_scope: String::new(),
            prompt_version: 0,
            model: String::new(),
            batch_size: 0,
            latency: Latency::default(),
            evidence: None,
        }
    }
}

/// What a job's frames are asked in one batch: the prompt in force (with its compiled
/// `response_format`) and the alert rules in force.
#[derive(Clone)]
struct Asking {
    prompt: PromptVersion,
    format: Option<ResponseFormat>,
    alerts: Option<Arc<AlertSetVersion>>,
}

/// Compiled `response_format`s by their text, so a schema is compiled once, not per batch.
#[derive(Default)]
struct Formats(Mutex<HashMap<String, ResponseFormat>>);

impl Formats {
    /// A stored schema compiled; it was checked when set, so a failure means a corrupt row.
    fn get(&self, text: &str) -> Result<ResponseFormat, String> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = map.get(text) {
            return Ok(f.clone());
        }
        let f = ResponseFormat::from_stored(text)
            .map_err(|e| format!("the prompt's response_format cannot be used: {e}"))?;
        if map.len() >= 256 {
            map.clear();
        }
        map.insert(text.to_owned(), f.clone());
        Ok(f)
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
            formats: Formats::default(),
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
    formats: Formats,
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
        // What each job is asked now: an update applies to every batch cut after it.
        let mut asking: HashMap<JobId, Result<Asking, String>> = HashMap::new();
        for q in &batch {
            if !asking.contains_key(&q.item.job_id) {
                let a = self.asking(&q.item.job_id).await;
                asking.insert(q.item.job_id.clone(), a);
            }
        }
        // Per frame: its prompt request, then one request per alert question.
        let mut asked = Vec::new();
        let mut requests = Vec::new();
        let mut refused = Vec::new();
        for q in batch {
            match &asking[&q.item.job_id] {
                Ok(a) => {
                    requests.push(InferRequest {
                        frames: q.item.frames.clone(),
                        prompt: a.prompt.prompt.clone(),
                        response_format: a.format.as_ref().map(ResponseFormat::shared_schema),
                        stop: q.item.stop.clone(),
                    });
                    for rule in a.alerts.iter().flat_map(|s| &s.rules) {
                        requests.push(InferRequest {
                            frames: q.item.frames.clone(),
                            prompt: rule.prompt(),
                            response_format: None,
                            stop: q.item.stop.clone(),
                        });
                    }
                    asked.push((q, a.clone()));
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
        let mut outputs = outputs.into_iter();
        for (q, a) in asked {
            let Some(out) = outputs.next() else { break };
            let rules = a.alerts.as_ref().map_or(&[][..], |s| &s.rules[..]);
            let answers: Vec<AlertAnswer> = rules
                .iter()
                .zip(outputs.by_ref())
                .map(|(rule, reply)| {
                    let version = a.alerts.as_ref().map_or(0, |s| s.version);
                    AlertAnswer::from_reply(rule, version, &reply.output)
                })
                .collect();
            let latency = Latency {
                queue: queue_of(&q),
                preprocess: out.preprocess_ms,
                inference: out.inference_ms,
                total: q.enqueued.elapsed().as_secs_f64() * 1000.0,
            };
            self.record(&latency);
            let _ = q.item.reply.send(Done {
                output: answer(out, a.format.as_ref()),
                alerts: a.alerts.map(|set| (set, answers)),
                prompt_scope: a.prompt.scope.name().to_owned(),
                prompt_version: a.prompt.version,
                model: self.model.clone(),
                batch_size: size,
                latency,
                evidence: q.item.evidence,
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
                model: self.model.clone(),
                batch_size: size,
                latency,
                evidence: q.item.evidence,
                ..Done::refused(why)
            });
        }
    }

    fn record(&self, latency: &Latency) {
        for (stage, ms) in [
            ("queue", latency.queue),
            ("preprocess", latency.preprocess),
            ("inference", latency.inference),
            ("total", latency.total),
        ] {
            metrics::histogram!("free_roam_stage_seconds", "stage" => stage, "model" => self.model.clone())
                .record(ms / 1000.0);
        }
    }

    /// The prompt (with its compiled schema) and alert rules in force for `job_id`, or why
    /// its frames cannot be asked.
    async fn asking(&self, job_id: &JobId) -> Result<Asking, String> {
        let read = async {
            let prompt = self.store.effective_prompt(job_id).await?;
            let alerts = self.store.effective_alerts(job_id).await?;
            Ok::<_, crate::store::StoreError>((prompt, alerts))
        };
        let (prompt, alerts) = read.await.map_err(|e| {
            tracing::error!(error = %e, "cannot read the prompt or alert rules");
            "prompt unavailable: database error".to_owned()
        })?;
        let prompt = prompt.ok_or_else(|| "no prompt is set".to_owned())?;
        let format = prompt
            .response_format
            .as_deref()
            .map(|text| self.formats.get(text))
            .transpose()?;
        Ok(Asking {
            prompt,
            format,
            alerts: alerts.map(Arc::new),
        })
    }
}

/// The answer as it is stored: text, or with a `response_format` the JSON value that
/// satisfies it (else the frame's error says why).
fn answer(out: InferOutput, format: Option<&ResponseFormat>) -> Result<Output, String> {
    let text = out.output?;
    match format {
        None => Ok(Output::Text(text)),
        Some(f) => f.check(&text).map(Output::Json),
    }
}
