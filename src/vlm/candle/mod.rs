//! The in-process model engine (cargo feature `candle`): models from candle-transformers,
//! loaded from a local directory or a pinned Hugging Face hub revision, kept in an LRU model
//! cache bounded by weight bytes, warmed up before readiness says yes.
//!
//! Forward passes run on blocking threads, never on the async workers.

pub mod cache;
pub mod files;
pub mod paligemma;
pub mod tiny;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;

use self::cache::{InUse, Lru};
use self::files::ModelFiles;
use self::paligemma::{Generation, PaliGemma};
use super::{Backend, InferOutput, InferRequest};
use crate::config::{Device as DeviceSetting, Settings};
use crate::media::{Encoding, Frame, FrameSize, FrameSpec, Picture};

/// Where a model's files come from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    Dir(PathBuf),
    Hub { id: String, revision: String },
}

impl ModelSource {
    /// The files, fetching from the hub into its cache if needed.
    async fn files(&self) -> Result<ModelFiles, String> {
        match self {
            ModelSource::Dir(dir) => ModelFiles::in_dir(dir),
            ModelSource::Hub { id, revision } => {
                let unreachable = |e: hf_hub::api::tokio::ApiError| {
                    format!(
                        "cannot fetch MODEL_ID={id} at revision {revision} from the Hugging Face hub ({e}); \
                         download the files elsewhere and set MODEL_PATH to their directory"
                    )
                };
                let api = hf_hub::api::tokio::ApiBuilder::from_env()
                    .build()
                    .map_err(unreachable)?;
                let repo = api.repo(hf_hub::Repo::with_revision(
                    id.clone(),
                    hf_hub::RepoType::Model,
                    revision.clone(),
                ));
                let config = repo.get("config.json").await.map_err(unreachable)?;
                let tokenizer = repo.get("tokenizer.json").await.map_err(unreachable)?;
                let weights = match repo.get("model.safetensors.index.json").await {
                    Ok(index) => {
                        let v: serde_json::Value = serde_json::from_slice(
                            &std::fs::read(&index).map_err(|e| e.to_string())?,
                        )
                        .map_err(|e| format!("model.safetensors.index.json: {e}"))?;
                        let mut shards: Vec<String> = v["weight_map"]
                            .as_object()
                            .map(|m| {
                                m.values()
                                    .filter_map(|s| s.as_str().map(str::to_owned))
                                    .collect()
                            })
                            .unwrap_or_default();
                        shards.sort();
                        shards.dedup();
                        let mut paths = Vec::new();
                        for s in shards {
                            paths.push(repo.get(&s).await.map_err(unreachable)?);
                        }
                        paths
                    }
                    Err(_) => vec![repo.get("model.safetensors").await.map_err(unreachable)?],
                };
                Ok(ModelFiles {
                    config,
                    tokenizer,
                    weights,
                })
            }
        }
    }
}

/// A loaded model of a supported architecture.
pub enum Engine {
    PaliGemma(PaliGemma),
}

impl Engine {
    /// The frames this model takes: its vision tower's input size, as RGB.
    fn frame_spec(&self) -> FrameSpec {
        let Engine::PaliGemma(m) = self;
        let side = m.image_size();
        FrameSpec {
            size: FrameSize::Exact {
                width: side,
                height: side,
            },
            encoding: Encoding::Rgb,
        }
    }

    fn load(files: &ModelFiles, device: &Device) -> Result<Self, String> {
        match files.model_type()?.as_str() {
            "paligemma" => Ok(Engine::PaliGemma(PaliGemma::load(files, device)?)),
            other => Err(format!(
                "model_type {other:?} in config.json is not supported (supported: paligemma)"
            )),
        }
    }

    /// Runs a batch: frames sharing a prompt go through one batched forward pass.
    fn run(&self, batch: &[InferRequest], gen: &Generation) -> Vec<InferOutput> {
        let Engine::PaliGemma(m) = self;
        let mut outputs: Vec<Option<InferOutput>> = vec![None; batch.len()];
        let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, r) in batch.iter().enumerate() {
            if r.frames.len() != 1 {
                // `start` refuses clips for one-image models; nothing else sends several.
                outputs[i] = Some(failed(format!(
                    "this model takes one image per request, not {}",
                    r.frames.len()
                )));
                continue;
            }
            match groups.iter_mut().find(|(p, _)| *p == r.prompt) {
                Some((_, idx)) => idx.push(i),
                None => groups.push((&r.prompt, vec![i])),
            }
        }
        for (prompt, idx) in groups {
            let started = Instant::now();
            let frames: Vec<Arc<Frame>> = idx.iter().map(|&i| batch[i].frames[0].clone()).collect();
            let pixels = m.preprocess(&frames);
            let preprocess_ms = started.elapsed().as_secs_f64() * 1000.0;
            let started = Instant::now();
            let answers = pixels.and_then(|p| m.generate(&p, prompt, gen));
            let inference_ms = started.elapsed().as_secs_f64() * 1000.0;
            for (k, &i) in idx.iter().enumerate() {
                let output = match &answers {
                    Ok(a) => Ok(a[k].clone()),
                    Err(e) => Err(format!("model failed: {e}")),
                };
                outputs[i] = Some(InferOutput {
                    output,
                    preprocess_ms,
                    inference_ms,
                });
            }
        }
        outputs
            .into_iter()
            .map(|o| o.unwrap_or_else(|| failed("no output".into())))
            .collect()
    }
}

fn failed(why: String) -> InferOutput {
    InferOutput {
        output: Err(why),
        preprocess_ms: 0.0,
        inference_ms: 0.0,
    }
}

/// The candle backend: named models, loaded on demand into the LRU cache.
pub struct CandleBackend {
    default: String,
    sources: HashMap<String, ModelSource>,
    cache: tokio::sync::Mutex<Lru<Engine>>,
    device: Device,
    generation: Generation,
    warmed: std::sync::atomic::AtomicBool,
}

impl CandleBackend {
    /// The default model (MODEL_PATH or MODEL_ID) and EXTRA_MODELS, none loaded yet.
    pub fn from_settings(s: &Settings) -> Result<Self, String> {
        let device = match s.device {
            DeviceSetting::Cpu => Device::Cpu,
            DeviceSetting::Cuda => Device::new_cuda(0)
                .map_err(|e| format!("DEVICE=cuda: {e} (build with --features cuda)"))?,
            DeviceSetting::Auto => Device::cuda_if_available(0).unwrap_or(Device::Cpu),
        };
        let (default, source) = match (&s.model_path, &s.model_id) {
            (Some(dir), _) => (default_name(dir), ModelSource::Dir(dir.clone())),
            (None, Some(id)) => (
                id.clone(),
                ModelSource::Hub {
                    id: id.clone(),
                    revision: s.model_revision.clone(),
                },
            ),
            (None, None) => return Err(super::NOT_CONFIGURED.to_owned()),
        };
        let mut sources: HashMap<String, ModelSource> = s
            .extra_models
            .iter()
            .map(|(name, dir)| (name.clone(), ModelSource::Dir(dir.clone())))
            .collect();
        sources.insert(default.clone(), source);
        Ok(Self {
            default,
            sources,
            cache: tokio::sync::Mutex::new(Lru::new(s.model_cache_bytes)),
            device,
            generation: Generation {
                max_new_tokens: s.max_new_tokens,
                temperature: s.temperature,
                seed: 299792458,
            },
            warmed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn default_name(&self) -> &str {
        &self.default
    }

    /// The model named `name`, loading it (and evicting idle models) if needed.
    async fn model(&self, name: &str) -> Result<InUse<Engine>, String> {
        let source = self
            .sources
            .get(name)
            .ok_or_else(|| format!("unknown model {name:?}; known: {}", self.known()))?
            .clone();
        // Held across the load: two jobs asking for the same model load it once.
        let mut cache = self.cache.lock().await;
        if let Some(m) = cache.get(name) {
            return Ok(m);
        }
        let files = source.files().await?;
        let bytes = files.weight_bytes();
        let evicted = cache.make_room(name, bytes).map_err(|e| e.to_string())?;
        for e in evicted {
            tracing::info!(model = %e, "evicted from the model cache");
        }
        let device = self.device.clone();
        let started = Instant::now();
        let engine = tokio::task::spawn_blocking(move || Engine::load(&files, &device))
            .await
            .map_err(|_| "model loading panicked".to_owned())??;
        tracing::info!(model = name, bytes, took = ?started.elapsed(), "model loaded");
        Ok(cache.insert(name, bytes, Arc::new(engine)))
    }

    fn known(&self) -> String {
        let mut names: Vec<&str> = self.sources.keys().map(String::as_str).collect();
        names.sort_unstable();
        names.join(", ")
    }

    /// Names and weight bytes of the models loaded now.
    pub async fn loaded(&self) -> Vec<(String, u64)> {
        self.cache.lock().await.loaded()
    }

    async fn run(&self, model: &str, batch: Vec<InferRequest>) -> Result<Vec<InferOutput>, String> {
        let engine = self.model(model).await?;
        let generation = self.generation.clone();
        tokio::task::spawn_blocking(move || engine.value.run(&batch, &generation))
            .await
            .map_err(|_| "the model crashed".to_owned())
    }
}

fn default_name(dir: &std::path::Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "local".into())
}

#[async_trait::async_trait]
impl Backend for CandleBackend {
    async fn infer(&self, model: &str, batch: Vec<InferRequest>) -> Vec<InferOutput> {
        let n = batch.len();
        match self.run(model, batch).await {
            Ok(out) => out,
            Err(why) => (0..n).map(|_| failed(why.clone())).collect(),
        }
    }

    /// The model's input size as RGB; loads the model if needed (a job needs it anyway).
    async fn frame_spec(&self, model: &str) -> Result<FrameSpec, String> {
        Ok(self.model(model).await?.value.frame_spec())
    }

    /// Loads the default model and runs one warmup batch (the first call does the work).
    async fn check(&self) -> Result<String, String> {
        if self.warmed.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(format!("model {} warmed up", self.default));
        }
        let started = Instant::now();
        let frame = Arc::new(Frame {
            width: 64,
            height: 64,
            picture: Picture::Rgb(vec![128; 64 * 64 * 3]),
            pts_ms: 0,
            evidence: None,
            captured_at: None,
        });
        let out = self
            .run(
                &self.default,
                vec![InferRequest {
                    frames: vec![frame],
                    prompt: "warmup".into(),
                    response_format: None,
                    stop: tokio_util::sync::CancellationToken::new(),
                }],
            )
            .await?;
        if let Some(Err(e)) = out.first().map(|o| &o.output) {
            return Err(format!("warmup batch failed: {e}"));
        }
        self.warmed
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(format!(
            "model {} loaded; warmup batch took {:.0} ms",
            self.default,
            started.elapsed().as_secs_f64() * 1000.0
        ))
    }

    fn models_loaded(&self) -> Vec<(String, u64)> {
        self.cache
            .try_lock()
            .map(|c| c.loaded())
            .unwrap_or_default()
    }
}
