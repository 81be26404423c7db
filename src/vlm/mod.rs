//! Model backends: the one place a vision-language model plugs in.
//!
//! [`Models`] owns the configured backend and its readiness (not configured, loading, ready,
//! failed: why). Probes read readiness from here; the batcher calls backends through the
//! [`Backend`] trait. Nothing here touches SQL or HTTP routing.

use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::config::{ModelType, Settings};

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

/// The configured model backend and its readiness.
#[derive(Clone)]
pub struct Models {
    default_name: String,
    readiness: Arc<RwLock<Readiness>>,
}

pub const NOT_CONFIGURED: &str = "no model configured: set MODEL_TYPE=openai with OPENAI_BASE_URL \
     (and OPENAI_MODEL) to use an OpenAI-compatible server, or MODEL_PATH to a local model directory";

impl Models {
    pub fn from_settings(settings: &Settings) -> Self {
        let (name, readiness) = match (settings.model_type, &settings.model_path) {
            (ModelType::OpenAi, _) => (
                settings.openai.model.clone(),
                Readiness::Loading(format!(
                    "checking the OpenAI-compatible server at {}",
                    settings.openai.base_url
                )),
            ),
            (ModelType::Auto, Some(path)) => (
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "local".into()),
                Readiness::Failed(format!(
                    "MODEL_PATH={} is set, but this build has no in-process model engine yet; \
                     use MODEL_TYPE=openai with OPENAI_BASE_URL",
                    path.display()
                )),
            ),
            (ModelType::Auto, None) => (
                "none".to_owned(),
                Readiness::NotConfigured(NOT_CONFIGURED.to_owned()),
            ),
        };
        Self {
            default_name: name,
            readiness: Arc::new(RwLock::new(readiness)),
        }
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
