//! Webhooks as the Standard Webhooks 1.0 specification defines them: where a job's events go
//! (`Webhook`: URL, `whsec_` secret, event kinds), the message envelope, and the signature
//! (`webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`).
//!
//! This file is pure (parsing, signing); [`deliver`] is the worker that sends the messages the
//! store's outbox holds. The store uses these types to decide which endpoints a result or a
//! status change is queued for, in the same transaction that stores it.

pub mod deliver;

use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::Invalid;

/// Kinds of events a webhook may subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A stored model answer: `data` is the result as `/results` shows it, with `job_id`.
    Result,
    /// A job's status changed: `data` is `{job_id, status, error, results_count}`.
    Status,
    /// One of the job's alerts started or ended: messages of type `alert.started` and
    /// `alert.ended`, `data` as `GET /api/v1/inference/alerts/{job_id}` lists it.
    Alert,
}

impl EventKind {
    pub const ALL: [EventKind; 3] = [EventKind::Result, EventKind::Status, EventKind::Alert];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Result => "result",
            EventKind::Status => "status",
            EventKind::Alert => "alert",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s.trim())
    }

    /// Parses a list, naming `param` in the error.
    pub fn parse_list<'a>(
        param: &'static str,
        items: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<Self>, Invalid> {
        let mut kinds = Vec::new();
        for item in items {
            let kind = Self::parse(item).ok_or_else(|| {
                Invalid::new(
                    param,
                    format!("unknown event {item:?}; events are result, status and alert"),
                )
            })?;
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        if kinds.is_empty() {
            return Err(Invalid::new(
                param,
                "name at least one event: result, status, alert",
            ));
        }
        Ok(kinds)
    }
}

/// A signing secret: `whsec_` followed by the base64 of 24 to 64 random bytes, as the
/// specification recommends. Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Secret {
    text: String,
    key: Vec<u8>,
}

impl Secret {
    pub const PREFIX: &'static str = "whsec_";

    pub fn parse(param: &'static str, text: &str) -> Result<Self, Invalid> {
        let text = text.trim();
        let Some(encoded) = text.strip_prefix(Self::PREFIX) else {
            return Err(Invalid::new(
                param,
                "a webhook secret is whsec_ followed by base64 (Standard Webhooks)",
            ));
        };
        let key = B64
            .decode(encoded)
            .map_err(|_| Invalid::new(param, "the part after whsec_ must be standard base64"))?;
        if !(24..=64).contains(&key.len()) {
            return Err(Invalid::new(
                param,
                format!(
                    "a webhook secret holds 24 to 64 bytes (this one {}); make one with: echo whsec_$(head -c 32 /dev/urandom | base64)",
                    key.len()
                ),
            ));
        }
        Ok(Self {
            text: text.to_owned(),
            key,
        })
    }

    /// `v1,<base64 HMAC-SHA256 over "{id}.{timestamp}.{body}">`: the `webhook-signature` value.
    pub fn sign(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&self.key)
            .expect("HMAC takes a key of any length");
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
    }
}

impl TryFrom<String> for Secret {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        Secret::parse("secret", &s).map_err(|e| e.message)
    }
}

impl From<Secret> for String {
    fn from(s: Secret) -> String {
        s.text
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where a job's events go: stored with the job (secret included, so every replica can sign),
/// never shown by the API beyond its URL and events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Webhook {
    pub url: String,
    pub secret: Secret,
    pub events: Vec<EventKind>,
}

impl Webhook {
    /// Checks a URL as a webhook target: http or https, a host, no more than 2048 bytes.
    /// Whether the host may be reached (the SSRF guard) is checked when it is sent to.
    pub fn check_url(param: &'static str, raw: &str) -> Result<url::Url, Invalid> {
        if raw.len() > 2048 {
            return Err(Invalid::new(param, "a webhook URL is at most 2048 bytes"));
        }
        let url = url::Url::parse(raw.trim())
            .map_err(|e| Invalid::new(param, format!("not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(Invalid::new(
                param,
                "a webhook URL is http:// or https:// with a host",
            ));
        }
        Ok(url)
    }

    pub fn wants(&self, kind: EventKind) -> bool {
        self.events.contains(&kind)
    }
}

/// The JSON body of a message: `{"type", "timestamp" (RFC 3339), "data"}`, the envelope the
/// specification suggests.
pub fn envelope(kind: &str, at_secs: f64, data: Value) -> Value {
    serde_json::json!({"type": kind, "timestamp": rfc3339(at_secs), "data": data})
}

/// Epoch seconds as an RFC 3339 UTC time with milliseconds.
pub fn rfc3339(at_secs: f64) -> String {
    let millis = (at_secs * 1000.0).round() as i64;
    chrono::DateTime::from_timestamp_millis(millis)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example in the Standard Webhooks specification and its reference libraries' tests.
    #[test]
    fn signs_as_the_specification_example() {
        let secret = Secret::parse("secret", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn secrets_are_checked_and_never_shown() {
        assert!(Secret::parse("s", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err());
        assert!(Secret::parse("s", "whsec_not base64!").is_err());
        assert!(Secret::parse("s", "whsec_c2hvcnQ=").is_err(), "too short");
        let s = Secret::parse("s", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(format!("{s:?}"), "Secret(***)");
        let hook = Webhook {
            url: "https://user:pw@example.com/h".into(),
            secret: s,
            events: vec![EventKind::Result],
        };
        assert!(!format!("{hook:?}").contains("MfKQ"));
        assert_eq!(
            crate::domain::redacted_url(&hook.url),
            "https://user:***@example.com/h"
        );
    }

    #[test]
    fn events_and_urls() {
        assert_eq!(
            EventKind::parse_list("events", ["status", "result", "status"]).unwrap(),
            vec![EventKind::Status, EventKind::Result]
        );
        assert!(EventKind::parse_list("events", ["alerts"]).is_err());
        assert!(EventKind::parse_list("events", []).is_err());
        assert!(Webhook::check_url("url", "ftp://x/y").is_err());
        assert!(Webhook::check_url("url", "https://example.com/hook").is_ok());
        assert_eq!(rfc3339(1614265330.5), "2021-02-25T15:02:10.500Z");
    }
}
