//! PaliGemma (SigLIP vision tower + Gemma decoder) from candle-transformers, run in process.
//!
//! Preprocessing is PaliGemma's own: resize to the vision tower's square input (bicubic),
//! scale to [-1, 1] (mean 0.5, std 0.5), channels first. The prompt template is the
//! processor's: image tokens (fed as embeddings), then `<bos>`, the prompt and `\n`.
//! Decoding is greedy by default (temperature > 0 samples), with a KV cache, and stops at
//! `<eos>` or `max_new_tokens`. Frames that share a prompt run as one batched forward pass.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::generation::LogitsProcessor;
use candle_transformers::models::paligemma;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::media::Frame;

/// How answers are generated.
#[derive(Debug, Clone)]
pub struct Generation {
    pub max_new_tokens: usize,
    /// 0 is greedy.
    pub temperature: f64,
    pub seed: u64,
}

/// The files of one model.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub weights: Vec<PathBuf>,
}

impl ModelFiles {
    /// Finds config.json, tokenizer.json and the safetensors (sharded through
    /// model.safetensors.index.json, or every *.safetensors) in a directory.
    pub fn in_dir(dir: &Path) -> Result<Self, String> {
        let how = "a model directory holds config.json, tokenizer.json and *.safetensors \
                   (e.g. `huggingface-cli download google/paligemma-3b-mix-224 --local-dir DIR`)";
        if !dir.is_dir() {
            return Err(format!(
                "MODEL_PATH={} is not a directory; {how}",
                dir.display()
            ));
        }
        let need = |name: &str| {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(format!(
                    "{} is missing from MODEL_PATH={}; {how}",
                    name,
                    dir.display()
                ))
            }
        };
        let config = need("config.json")?;
        let tokenizer = need("tokenizer.json")?;
        let index = dir.join("model.safetensors.index.json");
        let weights = if index.is_file() {
            let v: Value = serde_json::from_slice(
                &std::fs::read(&index).map_err(|e| format!("{}: {e}", index.display()))?,
            )
            .map_err(|e| format!("{} is not JSON: {e}", index.display()))?;
            let mut shards: Vec<String> = v["weight_map"]
                .as_object()
                .ok_or_else(|| format!("{} has no weight_map", index.display()))?
                .values()
                .filter_map(|f| f.as_str().map(str::to_owned))
                .collect();
            shards.sort();
            shards.dedup();
            shards
                .iter()
                .map(|s| need(s))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            let mut w: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| format!("cannot read MODEL_PATH={}: {e}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            w.sort();
            w
        };
        if weights.is_empty() {
            return Err(format!(
                "no *.safetensors weights in MODEL_PATH={}; {how}",
                dir.display()
            ));
        }
        Ok(Self {
            config,
            tokenizer,
            weights,
        })
    }

    /// Bytes of weights on disk: what the model cache counts.
    pub fn weight_bytes(&self) -> u64 {
        self.weights
            .iter()
            .filter_map(|w| std::fs::metadata(w).ok())
            .map(|m| m.len())
            .sum()
    }

    /// `model_type` as config.json states it.
    pub fn model_type(&self) -> Result<String, String> {
        let v = self.config_json()?;
        v["model_type"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{} has no model_type", self.config.display()))
    }

    fn config_json(&self) -> Result<Value, String> {
        let bytes =
            std::fs::read(&self.config).map_err(|e| format!("{}: {e}", self.config.display()))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is not JSON: {e}", self.config.display()))
    }
}

/// Hugging Face PaliGemma configs leave many fields at their defaults; candle wants them all.
fn paligemma_config(mut v: Value) -> Result<paligemma::Config, String> {
    fn fill(obj: &mut Value, defaults: &[(&str, Value)]) {
        if let Some(map) = obj.as_object_mut() {
            for (k, d) in defaults {
                map.entry(k.to_string()).or_insert_with(|| d.clone());
            }
        }
    }
    use serde_json::json;
    if v.get("projection_dim").is_none() {
        v["projection_dim"] = json!(2048);
    }
    fill(
        &mut v["vision_config"],
        &[
            ("hidden_size", json!(1152)),
            ("intermediate_size", json!(4304)),
            ("num_hidden_layers", json!(27)),
            ("num_attention_heads", json!(16)),
            ("num_channels", json!(3)),
            ("image_size", json!(224)),
            ("patch_size", json!(14)),
            ("hidden_act", json!("gelu_pytorch_tanh")),
            ("layer_norm_eps", json!(1e-6)),
        ],
    );
    fill(
        &mut v["text_config"],
        &[
            ("attention_bias", json!(false)),
            ("head_dim", json!(256)),
            ("hidden_act", json!("gelu_pytorch_tanh")),
            ("hidden_size", json!(2048)),
            ("intermediate_size", json!(16384)),
            ("num_attention_heads", json!(8)),
            ("num_hidden_layers", json!(18)),
            ("num_key_value_heads", json!(1)),
            ("rms_norm_eps", json!(1e-6)),
            ("rope_theta", json!(10000.0)),
            ("vocab_size", json!(257216)),
            ("max_position_embeddings", json!(8192)),
        ],
    );
    serde_json::from_value(v)
        .map_err(|e| format!("config.json is not a valid PaliGemma config: {e}"))
}

pub struct PaliGemma {
    model: Mutex<paligemma::Model>,
    tokenizer: Tokenizer,
    device: Device,
    dtype: DType,
    image_size: usize,
    bos: u32,
    eos: u32,
}

impl PaliGemma {
    /// Loads by checkpoint names from safetensors (memory-mapped).
    pub fn load(files: &ModelFiles, device: &Device) -> Result<Self, String> {
        let cfg = paligemma_config(files.config_json()?)?;
        let tokenizer = Tokenizer::from_file(&files.tokenizer)
            .map_err(|e| format!("{}: {e}", files.tokenizer.display()))?;
        let token = |t: &str| {
            tokenizer
                .token_to_id(t)
                .ok_or_else(|| format!("{} has no {t} token", files.tokenizer.display()))
        };
        let (bos, eos) = (token("<bos>")?, token("<eos>")?);
        let dtype = if device.is_cuda() {
            DType::BF16
        } else {
            DType::F32
        };
        // SAFETY: the weight files are not modified while mapped (they are ours to read).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files.weights, dtype, device) }
            .map_err(|e| format!("cannot read the weights: {e}"))?;
        let model = paligemma::Model::new(&cfg, vb)
            .map_err(|e| format!("config.json does not match the weights: {e}"))?;
        Ok(Self {
            model: Mutex::new(model),
            tokenizer,
            device: device.clone(),
            dtype,
            image_size: cfg.vision_config.image_size,
            bos,
            eos,
        })
    }

    /// PaliGemma's image preprocessing for a batch: [B, 3, S, S] in [-1, 1].
    pub fn preprocess(&self, frames: &[Arc<Frame>]) -> Result<Tensor, String> {
        let s = self.image_size as u32;
        let mut data = Vec::with_capacity(frames.len() * 3 * (s * s) as usize);
        for f in frames {
            let rgb = f.to_rgb()?;
            // Pipelines hand frames over at the input size already (shaped in the decode
            // thread); anything else is resized here with PIL's filter.
            let resized;
            let pixels: &[u8] = if (f.width, f.height) == (s, s) {
                &rgb
            } else {
                let img = image::RgbImage::from_raw(f.width, f.height, rgb.into_owned())
                    .ok_or("frame buffer has the wrong size")?;
                resized =
                    image::imageops::resize(&img, s, s, image::imageops::FilterType::CatmullRom);
                resized.as_raw()
            };
            if pixels.len() != (s * s * 3) as usize {
                return Err("frame buffer has the wrong size".into());
            }
            for c in 0..3 {
                data.extend(
                    pixels
                        .chunks_exact(3)
                        .map(|p| f32::from(p[c]) / 127.5 - 1.0),
                );
            }
        }
        Tensor::from_vec(
            data,
            (frames.len(), 3, s as usize, s as usize),
            &self.device,
        )
        .and_then(|t| t.to_dtype(self.dtype))
        .map_err(|e| e.to_string())
    }

    /// The square input size of the vision tower, in pixels.
    pub fn image_size(&self) -> u32 {
        self.image_size as u32
    }

    /// Answers `prompt` about every frame (already preprocessed) in one batched pass.
    pub fn generate(
        &self,
        pixels: &Tensor,
        prompt: &str,
        gen: &Generation,
    ) -> Result<Vec<String>, String> {
        let err = |e: candle_core::Error| e.to_string();
        let batch = pixels.dim(0).map_err(err)?;
        let encoded = self
            .tokenizer
            .encode(format!("{prompt}\n"), false)
            .map_err(|e| e.to_string())?;
        let mut ids = vec![self.bos];
        ids.extend_from_slice(encoded.get_ids());
        let row = Tensor::new(ids.as_slice(), &self.device).map_err(err)?;
        let input = row
            .unsqueeze(0)
            .and_then(|r| r.repeat((batch, 1)))
            .map_err(err)?;
        let temperature = (gen.temperature > 0.0).then_some(gen.temperature);
        let mut samplers: Vec<LogitsProcessor> = (0..batch)
            .map(|i| LogitsProcessor::new(gen.seed + i as u64, temperature, None))
            .collect();
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); batch];
        let mut done = vec![false; batch];
        let mut model = self
            .model
            .lock()
            .map_err(|_| "the model is poisoned by an earlier panic".to_owned())?;
        let mut logits = model.setup(pixels, &input).map_err(err)?;
        for _ in 0..gen.max_new_tokens {
            let rows = logits
                .squeeze(1)
                .and_then(|l| l.to_dtype(DType::F32))
                .map_err(err)?;
            let mut next = Vec::with_capacity(batch);
            for (i, sampler) in samplers.iter_mut().enumerate() {
                let row = rows.get(i).map_err(err)?;
                let t = sampler.sample(&row).map_err(err)?;
                if !done[i] {
                    if t == self.eos {
                        done[i] = true;
                    } else {
                        out[i].push(t);
                    }
                }
                next.push(t);
            }
            if done.iter().all(|d| *d) {
                break;
            }
            let next = Tensor::new(next.as_slice(), &self.device)
                .and_then(|t| t.unsqueeze(1))
                .map_err(err)?;
            logits = model.forward(&next).map_err(err)?;
        }
        model.clear_kv_cache();
        drop(model);
        out.iter()
            .map(|ids| {
                self.tokenizer
                    .decode(ids, true)
                    .map(|s| s.trim().to_owned())
                    .map_err(|e| e.to_string())
            })
            .collect()
    }
}
