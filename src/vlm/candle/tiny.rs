//! `free-roam dev make-tiny-model DIR`: a PaliGemma of the real architecture but tiny, with
//! random weights, so tests and benchmarks run the in-process engine without downloads.
//!
//! It writes what a Hugging Face checkpoint holds: config.json (`model_type: paligemma`),
//! tokenizer.json (byte-level BPE with PaliGemma's special tokens) and model.safetensors
//! with the checkpoint's tensor names, produced by building the model itself over a seeded
//! weight source. The service then loads it by exactly the code path used for real weights.
//!
//! Weights are a function of the seed alone: each tensor is drawn from its own ChaCha8
//! stream (seeded by the seed and the tensor's name) with the initialisation candle asks
//! for. The golden fixtures in `tests/fixtures/paligemma/` were made by the reference
//! implementation from the model one seed gives; the test suite rebuilds that model.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use candle_transformers::models::paligemma;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// Special tokens, first in the vocabulary as in PaliGemma's tokenizer.
const SPECIAL: [&str; 4] = ["<pad>", "<eos>", "<bos>", "<image>"];

/// Writes the tiny model; `image_size` sets the vision input (and so the preprocessing cost);
/// `seed` the weights.
pub fn make_tiny_model(dir: &Path, image_size: usize, seed: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    // Tokenizer: the 256 byte-level symbols after the special tokens.
    let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
    alphabet.sort_unstable();
    let mut vocab: HashMap<String, u32> = SPECIAL
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    for (i, c) in alphabet.iter().enumerate() {
        vocab.insert(c.to_string(), (SPECIAL.len() + i) as u32);
    }
    let vocab_size = vocab.len();
    let bpe: BPE =
        serde_json::from_str(&json!({"type": "BPE", "vocab": vocab, "merges": []}).to_string())?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer
        .add_special_tokens(SPECIAL.map(|t| AddedToken::from(t, true)))
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    tokenizer
        .save(dir.join("tokenizer.json"), true)
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;

    let config = json!({
        "model_type": "paligemma",
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "projection_dim": 64,
        "image_token_index": 3,
        "vision_config": {
            "model_type": "siglip_vision_model", "vision_use_head": false,
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_channels": 3, "image_size": image_size, "patch_size": 14,
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6
        },
        "text_config": {
            "model_type": "gemma",
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 1, "head_dim": 16, "vocab_size": vocab_size,
            "hidden_act": "gelu_pytorch_tanh", "attention_bias": false, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "max_position_embeddings": 2048
        }
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config)?)?;

    let cfg: paligemma::Config = serde_json::from_value(config)?;
    let weights = Seeded::new(seed);
    let vb = VarBuilder::from_backend(Box::new(&weights), DType::F32, Device::Cpu);
    paligemma::Model::new(&cfg, vb)?;
    let mut tensors = weights.into_tensors()?;
    answer_in_letters(&mut tensors, &vocab)?;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    Ok(())
}

/// A weight source that draws each tensor the model asks for from a generator seeded by
/// `seed` and the tensor's name, and keeps what it drew.
struct Seeded {
    seed: u64,
    drawn: Mutex<HashMap<String, Tensor>>,
}

impl Seeded {
    fn new(seed: u64) -> Self {
        Self {
            seed,
            drawn: Mutex::new(HashMap::new()),
        }
    }

    fn into_tensors(self) -> anyhow::Result<HashMap<String, Tensor>> {
        self.drawn
            .into_inner()
            .map_err(|_| anyhow::anyhow!("weights lock poisoned"))
    }

    fn rng(&self, name: &str) -> ChaCha8Rng {
        // FNV-1a of the name: stable across Rust versions, unlike the std hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        ChaCha8Rng::seed_from_u64(self.seed ^ h)
    }
}

/// Uniform in [0, 1) from the top 53 bits, spelled out so the values never depend on a
/// library's conversion.
fn unit(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Standard normal by Box–Muller.
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1 = 1.0 - unit(rng);
    let u2 = unit(rng);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

impl SimpleBackend for &Seeded {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let n = shape.elem_count();
        let mut rng = self.rng(name);
        let uniform = |rng: &mut ChaCha8Rng, lo: f64, up: f64| lo + (up - lo) * unit(rng);
        let values: Vec<f32> = match init {
            Init::Const(c) => vec![c as f32; n],
            Init::Uniform { lo, up } => (0..n).map(|_| uniform(&mut rng, lo, up) as f32).collect(),
            Init::Randn { mean, stdev } => (0..n)
                .map(|_| (mean + stdev * normal(&mut rng)) as f32)
                .collect(),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let std = non_linearity.gain() / (fan.for_shape(&shape) as f64).sqrt();
                match dist {
                    NormalOrUniform::Uniform => {
                        let bound = 3f64.sqrt() * std;
                        (0..n)
                            .map(|_| uniform(&mut rng, -bound, bound) as f32)
                            .collect()
                    }
                    NormalOrUniform::Normal => {
                        (0..n).map(|_| (std * normal(&mut rng)) as f32).collect()
                    }
                }
            }
        };
        let tensor = Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)?;
        self.drawn
            .lock()
            .map_err(|_| candle_core::Error::Msg("weights lock poisoned".into()))?
            .insert(name.to_owned(), tensor.clone());
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "{name}: the tiny model's weights are drawn with a shape"
        )))
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// Random weights rank `<eos>` or a whitespace byte first about as often as not, and an
/// empty (or trimmed-away) answer leaves the decoding loop and the detokenizer untried. The
/// output head is tied to the token embedding, so zeroing every row but the ASCII letters' and
/// digits' gives all other tokens logit 0 while some letter's is positive: greedy answers run
/// to MAX_NEW_TOKENS and come back as (meaningless) text.
fn answer_in_letters(
    tensors: &mut HashMap<String, Tensor>,
    vocab: &HashMap<String, u32>,
) -> anyhow::Result<()> {
    const EMBEDDING: &str = "language_model.model.embed_tokens.weight";
    let embedding = tensors
        .get_mut(EMBEDDING)
        .ok_or_else(|| anyhow::anyhow!("the model has no {EMBEDDING}"))?;
    let mut keep = vec![0f32; vocab.len()];
    for (token, &id) in vocab {
        if token.len() == 1 && token.chars().all(|c| c.is_ascii_alphanumeric()) {
            keep[id as usize] = 1.0;
        }
    }
    let keep = Tensor::from_vec(keep, (vocab.len(), 1), embedding.device())?;
    *embedding = embedding.broadcast_mul(&keep)?;
    Ok(())
}
