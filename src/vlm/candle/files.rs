//! The files of one in-process model: where config.json, tokenizer.json and the safetensors
//! shards of a checkpoint are, found the way a Hugging Face download lays them out. Every
//! architecture loads from these, so they live apart from any one model.

use std::path::{Path, PathBuf};

use serde_json::Value;

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

    pub fn config_json(&self) -> Result<Value, String> {
        let bytes =
            std::fs::read(&self.config).map_err(|e| format!("{}: {e}", self.config.display()))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is not JSON: {e}", self.config.display()))
    }
}
