//! PaliGemma (SigLIP vision tower + Gemma decoder), run in process as its reference
//! implementation (transformers' `PaliGemmaForConditionalGeneration`) runs it.
//!
//! The forward pass is assembled here from candle-transformers' parts, not taken whole from
//! its `paligemma::Model`, which L2-normalises every image token: the reference divides the
//! projected image features by √hidden_size so that Gemma's embedding scale (× √hidden_size,
//! applied to the whole sequence) leaves them as projected. Attention over the prefix (image
//! tokens, `<bos>`, prompt, `\n`) is bidirectional, as the reference's prefix-LM mask is;
//! decoding is causal over the KV cache. `tests/api/reference.rs` holds it to fixtures the
//! reference produced.
//!
//! Preprocessing is PaliGemma's own: the vision tower's square input, scaled to [-1, 1]
//! (mean 0.5, std 0.5), channels first. Pipelines hand frames over at that size already
//! (resized in the decode thread with a bicubic that reduces like PIL's); other sizes are
//! resized here. Decoding is greedy by default (temperature > 0 samples) and stops at
//! `<eos>` or `max_new_tokens`. Frames that share a prompt run as one batched forward pass.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, Module, VarBuilder};
use candle_transformers::generation::LogitsProcessor;
use candle_transformers::models::{gemma, paligemma, siglip};
use serde_json::Value;
use tokenizers::Tokenizer;

use super::files::ModelFiles;
use crate::media::shape::{Shaper, Source};
use crate::media::{Encoding, Frame, FrameSize, FrameSpec};

/// How answers are generated.
#[derive(Debug, Clone)]
pub struct Generation {
    pub max_new_tokens: usize,
    /// 0 is greedy.
    pub temperature: f64,
    pub seed: u64,
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
    let cfg: paligemma::Config = serde_json::from_value(v)
        .map_err(|e| format!("config.json is not a valid PaliGemma config: {e}"))?;
    validate(&cfg)?;
    Ok(cfg)
}

/// What the reference refuses to build (or could not run), named by field.
fn validate(cfg: &paligemma::Config) -> Result<(), String> {
    let (v, t) = (&cfg.vision_config, &cfg.text_config);
    let bad = |why: String| Err(format!("config.json: {why}"));
    if cfg.projection_dim != t.hidden_size {
        return bad(format!(
            "projection_dim ({}, 2048 when absent) must equal text_config.hidden_size ({}): \
             the projected image tokens are the decoder's input",
            cfg.projection_dim, t.hidden_size
        ));
    }
    if v.patch_size == 0 || v.image_size % v.patch_size != 0 {
        return bad(format!(
            "vision_config.image_size ({}) is not a multiple of vision_config.patch_size ({})",
            v.image_size, v.patch_size
        ));
    }
    if v.num_attention_heads == 0 || v.hidden_size % v.num_attention_heads != 0 {
        return bad(format!(
            "vision_config.hidden_size ({}) does not divide into \
             vision_config.num_attention_heads ({})",
            v.hidden_size, v.num_attention_heads
        ));
    }
    if t.num_key_value_heads == 0 || t.num_attention_heads % t.num_key_value_heads != 0 {
        return bad(format!(
            "text_config.num_attention_heads ({}) is not a multiple of \
             text_config.num_key_value_heads ({})",
            t.num_attention_heads, t.num_key_value_heads
        ));
    }
    Ok(())
}

/// The forward pass: SigLIP, the linear projector, Gemma.
struct Model {
    vision: siglip::VisionModel,
    projector: Linear,
    language: gemma::Model,
    /// 1/√(text hidden size): the reference's scaling of the projected image features.
    image_scale: f64,
    /// Positions filled in the KV cache.
    pos: usize,
}

impl Model {
    /// Built by checkpoint names, as transformers saves them.
    fn new(cfg: &paligemma::Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let vision = siglip::VisionModel::new(
            &cfg.vision_config,
            false,
            vb.pp("vision_tower.vision_model"),
        )?;
        let projector = candle_nn::linear(
            cfg.vision_config.hidden_size,
            cfg.projection_dim,
            vb.pp("multi_modal_projector.linear"),
        )?;
        let language = gemma::Model::new(false, &cfg.text_config, vb.pp("language_model"))?;
        Ok(Self {
            vision,
            projector,
            language,
            image_scale: 1.0 / (cfg.text_config.hidden_size as f64).sqrt(),
            pos: 0,
        })
    }

    /// Runs the prefix (image tokens then `ids`) with full attention, filling the KV cache;
    /// the logits for the token after it, [B, 1, vocab].
    fn prefill(&mut self, pixels: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.language.clear_kv_cache();
        let image = (self.vision.forward(pixels)?.apply(&self.projector)? * self.image_scale)?;
        let text = self.language.embed_tokens().forward(ids)?;
        let embeds = Tensor::cat(&[image, text], 1)?;
        self.pos = embeds.dim(1)?;
        // No mask: every prefix position sees every other, as in the reference's prefix-LM.
        self.language.forward_embeds(&embeds, None, 0)
    }

    /// One decoding step for each row: [B, 1] ids in, [B, 1, vocab] logits out.
    fn step(&mut self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let pos = self.pos;
        self.pos += ids.dim(1)?;
        self.language.forward(ids, pos)
    }

    fn clear(&mut self) {
        self.pos = 0;
        self.language.clear_kv_cache();
    }
}

pub struct PaliGemma {
    model: Mutex<Model>,
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
        let model = Model::new(&cfg, vb)
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
            // thread); anything else goes through the same scaler here.
            let resized;
            let pixels: &[u8] = if (f.width, f.height) == (s, s) {
                &rgb
            } else {
                let spec = FrameSpec {
                    size: FrameSize::Exact {
                        width: s,
                        height: s,
                    },
                    encoding: Encoding::Rgb,
                };
                resized = Shaper::new(spec)
                    .shape(&Source::rgb(&rgb, f.width, f.height), f.pts_ms)?
                    .to_rgb()?
                    .into_owned();
                &resized
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

    /// The prompt's token ids as the reference processor lays them out after the image
    /// tokens: `<bos>`, the prompt, `\n`.
    pub fn prompt_ids(&self, prompt: &str) -> Result<Vec<u32>, String> {
        let encoded = self
            .tokenizer
            .encode(format!("{prompt}\n"), false)
            .map_err(|e| e.to_string())?;
        let mut ids = vec![self.bos];
        ids.extend_from_slice(encoded.get_ids());
        Ok(ids)
    }

    /// Answers `prompt` about every frame (already preprocessed) in one batched pass.
    pub fn generate(
        &self,
        pixels: &Tensor,
        prompt: &str,
        gen: &Generation,
    ) -> Result<Vec<String>, String> {
        self.decode(pixels, prompt, gen, |_| {})?
            .iter()
            .map(|ids| {
                self.tokenizer
                    .decode(ids, true)
                    .map(|s| s.trim().to_owned())
                    .map_err(|e| e.to_string())
            })
            .collect()
    }

    /// The token ids `generate` turns into text, per frame, without `<eos>`. `observe` sees
    /// each step's logits, [B, vocab] in f32, before they are sampled: what golden tests
    /// compare with the reference.
    pub fn decode(
        &self,
        pixels: &Tensor,
        prompt: &str,
        gen: &Generation,
        mut observe: impl FnMut(&Tensor),
    ) -> Result<Vec<Vec<u32>>, String> {
        let err = |e: candle_core::Error| e.to_string();
        let batch = pixels.dim(0).map_err(err)?;
        let ids = self.prompt_ids(prompt)?;
        let input = Tensor::new(ids.as_slice(), &self.device)
            .and_then(|r| r.unsqueeze(0))
            .and_then(|r| r.repeat((batch, 1)))
            .map_err(err)?;
        let temperature = (gen.temperature > 0.0).then_some(gen.temperature);
        let mut samplers: Vec<LogitsProcessor> = (0..batch)
            .map(|i| LogitsProcessor::new(gen.seed + i as u64, temperature, None))
            .collect();
        let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); batch];
        let mut done = vec![false; batch];
        let mut model = self
            .model
            .lock()
            .map_err(|_| "the model is poisoned by an earlier panic".to_owned())?;
        let result = (|| {
            let mut logits = model.prefill(pixels, &input).map_err(err)?;
            for _ in 0..gen.max_new_tokens {
                let rows = logits
                    .squeeze(1)
                    .and_then(|l| l.to_dtype(DType::F32))
                    .map_err(err)?;
                observe(&rows);
                let mut next = Vec::with_capacity(batch);
                for (i, sampler) in samplers.iter_mut().enumerate() {
                    let t = sampler.sample(&rows.get(i).map_err(err)?).map_err(err)?;
                    if !done[i] {
                        if t == self.eos {
                            done[i] = true;
                        } else {
                            tokens[i].push(t);
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
                logits = model.step(&next).map_err(err)?;
            }
            Ok(tokens)
        })();
        model.clear();
        result
    }
}
