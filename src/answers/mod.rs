//! What a model's answer means beyond free text: yes/no verdicts of alert rules with the
//! debounced state that turns them into events ([`alerts`]), and structured answers checked
//! against a prompt version's JSON Schema ([`structured`]).
//!
//! Pure: parsing, checking and state transitions only. The dispatcher asks the questions and
//! checks answers, the writer runs the alert tracker, the store keeps rules, state and events.

pub mod alerts;
pub mod structured;

use serde::Serialize;
use serde_json::Value;

/// A model's answer as it is stored and shown: free text, or a JSON value that satisfied the
/// prompt's `response_format`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Output {
    Text(String),
    Json(Value),
}

impl Output {
    /// The `output_format` column: NULL for text, `json` for a checked JSON value.
    pub fn format(&self) -> Option<&'static str> {
        match self {
            Output::Text(_) => None,
            Output::Json(_) => Some("json"),
        }
    }

    /// The text the `output` column holds (compact JSON for a value).
    pub fn to_stored(&self) -> String {
        match self {
            Output::Text(t) => t.clone(),
            Output::Json(v) => v.to_string(),
        }
    }

    /// Reads the `output` and `output_format` columns back.
    pub fn from_stored(text: String, format: Option<&str>) -> Result<Self, String> {
        match format {
            None => Ok(Output::Text(text)),
            Some("json") => serde_json::from_str(&text)
                .map(Output::Json)
                .map_err(|e| format!("stored JSON output: {e}")),
            Some(other) => Err(format!("unknown output_format {other:?}")),
        }
    }

    /// Roughly how many bytes it holds (for cache weights).
    pub fn size(&self) -> usize {
        match self {
            Output::Text(t) => t.len(),
            Output::Json(v) => v.to_string().len(),
        }
    }
}
