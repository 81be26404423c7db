//! Structured answers: a prompt version's `response_format`, a JSON Schema checked when it is
//! set (a valid schema, within MAX_SCHEMA_BYTES, no references outside itself) and against
//! every answer given under it.
//!
//! Validation is the `jsonschema` crate's, built without its remote-reference resolvers: a
//! schema cannot make the service fetch anything. An answer is read as JSON after removing a
//! Markdown code fence around it (models often add one); a valid answer is kept as the JSON
//! value, an invalid one becomes the frame's error with the validation message and the raw
//! answer.

use std::sync::Arc;

use serde_json::Value;

use crate::domain::Invalid;

/// How much of an answer that does not validate is kept in the frame's error.
const MAX_RAW_CHARS: usize = 1000;
/// Validation errors named in a frame's error.
const MAX_ERRORS: usize = 3;

/// A compiled `response_format`, cheap to clone.
#[derive(Clone)]
pub struct ResponseFormat {
    schema: Arc<Value>,
    validator: Arc<jsonschema::Validator>,
}

impl std::fmt::Debug for ResponseFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ResponseFormat").field(&self.schema).finish()
    }
}

impl PartialEq for ResponseFormat {
    fn eq(&self, other: &Self) -> bool {
        self.schema == other.schema
    }
}

impl ResponseFormat {
    /// A schema as a request gives it, refused with the reason under `response_format`.
    pub fn parse(schema: &Value, max_bytes: usize) -> Result<Self, Invalid> {
        let refuse = |why: String| Invalid::new("response_format", why);
        if !schema.is_object() {
            return Err(refuse(
                "response_format must be a JSON Schema object".into(),
            ));
        }
        let size = schema.to_string().len();
        if size > max_bytes {
            return Err(refuse(format!(
                "response_format is {size} bytes; the limit is MAX_SCHEMA_BYTES={max_bytes}"
            )));
        }
        Self::compile(schema.clone())
            .map_err(|why| refuse(format!("response_format is not a valid JSON Schema: {why}")))
    }

    /// A schema as the store keeps it (checked when it was set).
    pub fn from_stored(text: &str) -> Result<Self, String> {
        let schema: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        Self::compile(schema)
    }

    fn compile(schema: Value) -> Result<Self, String> {
        jsonschema::meta::validate(&schema).map_err(|e| located(&e))?;
        let validator = jsonschema::validator_for(&schema).map_err(|e| e.to_string())?;
        Ok(Self {
            schema: Arc::new(schema),
            validator: Arc::new(validator),
        })
    }

    pub fn schema(&self) -> &Value {
        &self.schema
    }

    /// The schema, shared (a backend sends it with every request under this version).
    pub fn shared_schema(&self) -> Arc<Value> {
        self.schema.clone()
    }

    /// The answer as a JSON value that satisfies the schema, or why not (with the raw answer).
    pub fn check(&self, answer: &str) -> Result<Value, String> {
        let raw = || answer.chars().take(MAX_RAW_CHARS).collect::<String>();
        let value: Value = serde_json::from_str(unfenced(answer)).map_err(|e| {
            format!(
                "answer is not JSON ({e}), so it does not match response_format; raw answer: {}",
                raw()
            )
        })?;
        let errors: Vec<String> = self
            .validator
            .iter_errors(&value)
            .take(MAX_ERRORS)
            .map(|e| located(&e))
            .collect();
        if errors.is_empty() {
            Ok(value)
        } else {
            Err(format!(
                "answer does not match response_format: {}; raw answer: {}",
                errors.join("; "),
                raw()
            ))
        }
    }
}

/// A validation error with where in the document it is.
fn located(e: &jsonschema::ValidationError<'_>) -> String {
    let at = e.instance_path().to_string();
    if at.is_empty() {
        e.to_string()
    } else {
        format!("{e} at {at}")
    }
}

/// The text inside a Markdown code fence (```json … ```), or the text itself.
fn unfenced(answer: &str) -> &str {
    let t = answer.trim();
    let Some(inner) = t.strip_prefix("```") else {
        return t;
    };
    let Some(inner) = inner.strip_suffix("```") else {
        return t;
    };
    // Drop the info string (`json`) on the opening line.
    match inner.find('\n') {
        Some(i) => inner[i + 1..].trim(),
        None => inner.trim(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn counts() -> ResponseFormat {
        ResponseFormat::parse(
            &json!({
                "type": "object",
                "properties": {"people": {"type": "integer", "minimum": 0}, "vehicles": {"type": "integer"}},
                "required": ["people", "vehicles"],
                "additionalProperties": false
            }),
            4096,
        )
        .unwrap()
    }

    #[test]
    fn valid_answers_become_values() {
        let f = counts();
        assert_eq!(
            f.check(r#"{"people": 2, "vehicles": 0}"#).unwrap(),
            json!({"people": 2, "vehicles": 0})
        );
        assert_eq!(
            f.check("```json\n{\"people\": 1, \"vehicles\": 3}\n```")
                .unwrap(),
            json!({"people": 1, "vehicles": 3})
        );
    }

    #[test]
    fn invalid_answers_say_why_and_keep_the_raw_answer() {
        let f = counts();
        let e = f.check(r#"{"people": -1}"#).unwrap_err();
        assert!(e.contains("does not match response_format"), "{e}");
        assert!(e.contains("vehicles"), "names the missing property: {e}");
        assert!(e.contains("/people"), "names where: {e}");
        assert!(e.ends_with(r#"raw answer: {"people": -1}"#), "{e}");
        let e = f.check("two people").unwrap_err();
        assert!(
            e.contains("not JSON") && e.contains("raw answer: two people"),
            "{e}"
        );
    }

    #[test]
    fn schemas_are_checked_when_set() {
        let e = ResponseFormat::parse(&json!({"type": "nonsense"}), 4096).unwrap_err();
        assert_eq!(e.param, "response_format");
        assert!(e.message.contains("not a valid JSON Schema"), "{e}");
        assert!(ResponseFormat::parse(&json!("object"), 4096).is_err());
        let big = json!({"description": "x".repeat(5000)});
        let e = ResponseFormat::parse(&big, 4096).unwrap_err();
        assert!(e.message.contains("MAX_SCHEMA_BYTES=4096"), "{e}");
        // No fetching: a reference outside the schema is refused, not resolved.
        assert!(
            ResponseFormat::parse(&json!({"$ref": "http://127.0.0.1:9/schema.json"}), 4096)
                .is_err()
        );
        let stored = ResponseFormat::from_stored(&counts().schema().to_string()).unwrap();
        assert_eq!(stored, counts());
    }
}
