//! Model backends: the one place a vision-language model plugs in.
//!
//! [`Models`] owns the configured backend and its readiness (not configured, loading, ready,
//! failed: why). Probes read readiness from here; the batcher calls backends through the
//! [`Backend`] trait. Nothing here touches SQL or HTTP routing.

#[cfg(feature = "candle")]
pub mod candle;
pub mod openai;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::{ModelType, Settings};
use crate::media::{Frame, FrameSpec};

/// One frame (or a clip's frames, in time order) and the prompt to answer about it.
#[derive(Debug, Clone)]
pub struct InferRequest {
    pub frames: Vec<Arc<Frame>>,
    pub prompt: String,
    /// A JSON Schema the answer must satisfy (the prompt version's `response_format`): a
    /// backend that can constrain its output to it says so to the model; every answer is
    /// checked against it after the backend returns, whatever the backend did.
    pub response_format: Option<Arc<serde_json::Value>>,
    /// Cancelled when the frame's job stops (cancelled, its lease lost, shutdown): a backend
    /// does not send a frame whose job has stopped while it waited for its turn.
    pub stop: CancellationToken,
}

/// The answer for one request, or why there is none, with the time spent on it.
#[derive(Debug, Clone)]
pub struct InferOutput {
    pub output: Result<String, String>,
    pub preprocess_ms: f64,
    pub inference_ms: f64,
}

/// A vision-language model. The one place a new model plugs in: it takes a batch of
/// (frame, prompt) pairs and returns one output or one error per pair, in order.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Runs a batch on `model` (the job's model name, or the default).
    async fn infer(&self, model: &str, batch: Vec<InferRequest>) -> Vec<InferOutput>;

    /// What frames for `model` should look like (size, JPEG or RGB): the pipeline shapes them
    /// so once, in its decode thread. `Err` says why `model` cannot be used.
    async fn frame_spec(&self, model: &str) -> Result<FrameSpec, String>;

    /// Whether the backend can answer now; `Ok` carries a short description.
    async fn check(&self) -> Result<String, String>;

    /// Models held in memory now, with their weight bytes.
    fn models_loaded(&self) -> Vec<(String, u64)> {
        Vec::new()
    }

    /// The most pictures `model` takes in one request: a clip job needs this many for its
    /// clip's frames (`start` refuses a longer clip with 422).
    fn max_images(&self, _model: &str) -> usize {
        1
    }

    /// Batches this backend can usefully run at once.
    fn concurrent_batches(&self) -> usize {
        1
    }
}

/// Whether the model backend can take frames now, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "detail", rename_all = "snake_case")]
pub enum Readiness {
    NotConfigured(String),
    Loading(String),
    Ready(String),
    Failed(String),
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        matches!(self, Readiness::Ready(_))
    }

    pub fn detail(&self) -> &str {
        match self {
            Readiness::NotConfigured(s)
            | Readiness::Loading(s)
            | Readiness::Ready(s)
            | Readiness::Failed(s) => s,
        }
    }
}

/// The in-process engine for MODEL_PATH / MODEL_ID: (default model name, readiness).
#[cfg(feature = "candle")]
fn in_process(settings: &Settings, backend: &mut Option<Arc<dyn Backend>>) -> (String, Readiness) {
    match candle::CandleBackend::from_settings(settings) {
        Ok(b) => {
            let name = b.default_name().to_owned();
            *backend = Some(Arc::new(b));
            (
                name.clone(),
                Readiness::Loading(format!("loading model {name} and running a warmup batch")),
            )
        }
        Err(e) => ("none".to_owned(), Readiness::Failed(e)),
    }
}

#[cfg(not(feature = "candle"))]
fn in_process(_: &Settings, _: &mut Option<Arc<dyn Backend>>) -> (String, Readiness) {
    (
        "none".to_owned(),
        Readiness::Failed("MODEL_PATH/MODEL_ID need the in-process engine: build with the `candle` feature (on by default)".into()),
    )
}

/// The configured model backend and its readiness.
#[derive(Clone)]
pub struct Models {
    default_name: String,
    readiness: Arc<RwLock<Readiness>>,
    backend: Option<Arc<dyn Backend>>,
}

pub const NOT_CONFIGURED: &str = "no model configured: set MODEL_TYPE=openai with OPENAI_BASE_URL \
     (and OPENAI_MODEL) to use an OpenAI-compatible server, or MODEL_PATH to a local model directory";

impl Models {
    pub fn from_settings(settings: &Settings) -> Self {
        let mut backend: Option<Arc<dyn Backend>> = None;
        let (name, readiness) = match (settings.model_type, &settings.model_path) {
            (ModelType::OpenAi, _) => match openai::OpenAiBackend::new(&settings.openai) {
                Ok(b) => {
                    backend = Some(Arc::new(b));
                    (
                        settings.openai.model.clone(),
                        Readiness::Loading(format!(
                            "checking the OpenAI-compatible server at {}",
                            settings.openai.base_url
                        )),
                    )
                }
                Err(e) => (settings.openai.model.clone(), Readiness::Failed(e)),
            },
            (ModelType::Auto, _)
                if settings.model_path.is_none() && settings.model_id.is_none() =>
            {
                (
                    "none".to_owned(),
                    Readiness::NotConfigured(NOT_CONFIGURED.to_owned()),
                )
            }
            (ModelType::Auto, _) => in_process(settings, &mut backend),
        };
        Self {
            default_name: name,
            readiness: Arc::new(RwLock::new(readiness)),
            backend,
        }
    }

    /// The backend, if one is configured.
    pub fn backend(&self) -> Option<Arc<dyn Backend>> {
        self.backend.clone()
    }

    /// Checks the backend now and then, keeping readiness current, until `stop`.
    pub async fn watch(self, every: Duration, stop: tokio_util::sync::CancellationToken) {
        let Some(backend) = self.backend.clone() else {
            return;
        };
        loop {
            let readiness = match tokio::time::timeout(Duration::from_secs(5), backend.check())
                .await
            {
                Ok(Ok(what)) => Readiness::Ready(what),
                Ok(Err(why)) => Readiness::Failed(why),
                Err(_) => Readiness::Failed("the model backend did not answer within 5 s".into()),
            };
            if std::mem::discriminant(&readiness) != std::mem::discriminant(&self.readiness()) {
                tracing::info!(?readiness, "model backend readiness changed");
            }
            self.set_readiness(readiness);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Waits until the backend is ready; `Err` says why it never will be.
    pub async fn wait_ready(
        &self,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Result<Arc<dyn Backend>, String> {
        loop {
            match (self.readiness(), &self.backend) {
                (Readiness::Ready(_), Some(b)) => return Ok(b.clone()),
                (Readiness::NotConfigured(why), _) => return Err(why),
                (_, None) => return Err(self.readiness().detail().to_owned()),
                _ => {}
            }
            tokio::select! {
                _ = stop.cancelled() => return Err("stopped".into()),
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// Models the backend holds in memory now, with their weight bytes.
    pub fn loaded(&self) -> Vec<(String, u64)> {
        self.backend
            .as_ref()
            .map(|b| b.models_loaded())
            .unwrap_or_default()
    }

    /// The model a job uses when it names none.
    pub fn default_name(&self) -> &str {
        &self.default_name
    }

    pub fn readiness(&self) -> Readiness {
        self.readiness
            .read()
            .map(|r| r.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn set_readiness(&self, readiness: Readiness) {
        match self.readiness.write() {
            Ok(mut r) => *r = readiness,
            Err(p) => *p.into_inner() = readiness,
        }
    }
}
