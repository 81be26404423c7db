//! `free-roam dev make-tiny-model DIR`: a PaliGemma of the real architecture but tiny, with
//! random weights, so tests and benchmarks run the in-process engine without downloads.
//!
//! It writes what a Hugging Face checkpoint holds: config.json (`model_type: paligemma`),
//! tokenizer.json (byte-level BPE with PaliGemma's special tokens) and model.safetensors
//! with the checkpoint's tensor names, produced by building the model itself over a VarMap.
//! The service then loads it by exactly the code path used for real weights.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::paligemma;
use serde_json::json;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// Special tokens, first in the vocabulary as in PaliGemma's tokenizer.
const SPECIAL: [&str; 4] = ["<pad>", "<eos>", "<bos>", "<image>"];

/// Writes the tiny model; `image_size` sets the vision input (and so the preprocessing cost).
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
        "vision_config": {
            "model_type": "siglip_vision_model",
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
    let device = Device::Cpu;
    // Not every device can seed its generator; random weights need not repeat.
    let _ = device.set_seed(seed);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    paligemma::Model::new(&cfg, vb)?;
    answer_in_letters(&varmap, &vocab)?;
    varmap.save(dir.join("model.safetensors"))?;
    Ok(())
}

/// Random weights rank `<eos>` or a whitespace byte first about as often as not, and an
/// empty (or trimmed-away) answer leaves the decoding loop and the detokenizer untried. The
/// output head is tied to the token embedding, so zeroing every row but the ASCII letters' and
/// digits' gives all other tokens logit 0 while some letter's is positive: greedy answers run
/// to MAX_NEW_TOKENS and come back as (meaningless) text.
fn answer_in_letters(varmap: &VarMap, vocab: &HashMap<String, u32>) -> anyhow::Result<()> {
    const EMBEDDING: &str = "language_model.model.embed_tokens.weight";
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("weights lock poisoned"))?;
    let embedding = data
        .get(EMBEDDING)
        .ok_or_else(|| anyhow::anyhow!("the model has no {EMBEDDING}"))?;
    let mut keep = vec![0f32; vocab.len()];
    for (token, &id) in vocab {
        if token.len() == 1 && token.chars().all(|c| c.is_ascii_alphanumeric()) {
            keep[id as usize] = 1.0;
        }
    }
    let keep = candle_core::Tensor::from_vec(keep, (vocab.len(), 1), embedding.device())?;
    embedding.set(&embedding.as_tensor().broadcast_mul(&keep)?)?;
    Ok(())
}
