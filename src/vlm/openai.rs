//! Backend `openai`: any OpenAI-compatible chat-completions server (vLLM, Ollama, llama.cpp
//! server, OpenAI). One request per frame: the prompt as text and the frame as a JPEG
//! data-URI `image_url`; a clip's frames go in one request, in time order, each image after
//! a text part giving its time offset from the first (as Frigate labels its frames); a prompt's `response_format` goes as OpenAI's `json_schema`
//! response format. Frames arrive already encoded, at most FRAME_MAX_SIDE on their
//! longest side (the pipeline shaped them in its decode thread); here they are only
//! base64-encoded. Timeouts, 429 and 5xx are retried with backoff honouring
//! Retry-After; other failures become that frame's error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::header::RETRY_AFTER;
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use url::Url;

use super::{Backend, InferOutput, InferRequest};
use crate::config::OpenAiSettings;
use crate::media::{Encoding, FrameSize, FrameSpec};
use crate::retry::Backoff;

pub struct OpenAiBackend {
    client: reqwest::Client,
    completions: Url,
    models: Url,
    api_key: Option<String>,
    permits: Arc<Semaphore>,
    max_concurrency: usize,
    backoff: Backoff,
    max_tokens: u32,
    temperature: f64,
    spec: FrameSpec,
    jpeg_quality: u8,
    max_images: usize,
}

enum Attempt {
    Retry {
        why: String,
        after: Option<Duration>,
    },
    Fail(String),
}

impl OpenAiBackend {
    pub fn new(s: &OpenAiSettings) -> Result<Self, String> {
        let mut base =
            Url::parse(&s.base_url).map_err(|e| format!("OPENAI_BASE_URL is not a URL: {e}"))?;
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let join = |p: &str| base.join(p).map_err(|e| format!("OPENAI_BASE_URL: {e}"));
        let client = reqwest::Client::builder()
            .timeout(s.timeout)
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Self {
            client,
            completions: join("chat/completions")?,
            models: join("models")?,
            api_key: s.api_key.clone(),
            permits: Arc::new(Semaphore::new(s.max_concurrency)),
            max_concurrency: s.max_concurrency,
            backoff: Backoff::new(
                Duration::from_millis(250),
                Duration::from_secs(10),
                s.max_retries + 1,
            ),
            max_tokens: s.max_tokens,
            temperature: s.temperature,
            spec: FrameSpec {
                size: match s.frame_max_side {
                    0 => FrameSize::AsDecoded,
                    n => FrameSize::LongestSide(n),
                },
                encoding: Encoding::Jpeg {
                    quality: s.jpeg_quality,
                },
            },
            jpeg_quality: s.jpeg_quality,
            max_images: s.max_images as usize,
        })
    }

    fn request(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(k) => req.bearer_auth(k),
            None => req,
        }
    }

    async fn one(&self, model: &str, request: InferRequest) -> InferOutput {
        let started = Instant::now();
        // Frames come shaped as JPEG; anything else (never in a pipeline) is encoded here.
        let mut content = vec![json!({"type": "text", "text": request.prompt})];
        let clip = request.frames.len() > 1;
        let first_ms = request.frames.first().map_or(0, |f| f.pts_ms);
        for (i, frame) in request.frames.iter().enumerate() {
            let jpeg = match frame.to_jpeg(self.jpeg_quality) {
                Ok(j) => j,
                Err(e) => return failed(e, 0.0, 0.0),
            };
            if clip {
                let offset = (frame.pts_ms - first_ms) as f64 / 1000.0;
                content.push(json!({
                    "type": "text",
                    "text": format!("Frame {} of {} at +{offset:.1} s:", i + 1, request.frames.len()),
                }));
            }
            let url = format!(
                "data:image/jpeg;base64,{}",
                base64::engine::general_purpose::STANDARD.encode(&jpeg)
            );
            content.push(json!({"type": "image_url", "image_url": {"url": url}}));
        }
        let preprocess_ms = started.elapsed().as_secs_f64() * 1000.0;
        let mut body = json!({
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        });
        if let Some(schema) = &request.response_format {
            // Structured outputs as OpenAI defines them; vLLM and Ollama's OpenAI-compatible
            // endpoints take the same field.
            body["response_format"] = json!({
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema},
            });
        }
        let Ok(_permit) = self.permits.acquire().await else {
            return failed("backend is shutting down".into(), preprocess_ms, 0.0);
        };
        if request.stop.is_cancelled() {
            return failed(
                "not sent: the job stopped while the frame waited".into(),
                preprocess_ms,
                0.0,
            );
        }
        let infer_started = Instant::now();
        let mut attempt = 0;
        let output = loop {
            match self.send(&body).await {
                Ok(text) => break Ok(text),
                Err(Attempt::Retry { why, after }) if self.backoff.allows(attempt + 1) => {
                    attempt += 1;
                    let wait = self.backoff.delay(attempt, after);
                    tracing::debug!(%why, attempt, ?wait, "model request failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(Attempt::Retry { why, .. }) => {
                    break Err(format!("{why} (after {} attempts)", attempt + 1))
                }
                Err(Attempt::Fail(why)) => break Err(why),
            }
        };
        InferOutput {
            output,
            preprocess_ms,
            inference_ms: infer_started.elapsed().as_secs_f64() * 1000.0,
        }
    }

    async fn send(&self, body: &Value) -> Result<String, Attempt> {
        let resp = self
            .request(self.client.post(self.completions.clone()).json(body))
            .send()
            .await
            .map_err(|e| Attempt::Retry {
                why: if e.is_timeout() {
                    "model server timed out".into()
                } else {
                    "model server unreachable".into()
                },
                after: None,
            })?;
        let status = resp.status();
        if status.as_u16() == 429 || status.is_server_error() || status.as_u16() == 408 {
            let after = resp
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map(Duration::from_secs_f64);
            return Err(Attempt::Retry {
                why: format!("model server answered HTTP {}", status.as_u16()),
                after,
            });
        }
        let text = resp.text().await.map_err(|_| Attempt::Retry {
            why: "model server closed the response early".into(),
            after: None,
        })?;
        if !status.is_success() {
            let detail: String = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or_default()
                .chars()
                .take(300)
                .collect();
            return Err(Attempt::Fail(format!(
                "model server refused the request: HTTP {} {detail}",
                status.as_u16()
            )));
        }
        let v: Value = serde_json::from_str(&text)
            .map_err(|_| Attempt::Fail("model server answered with invalid JSON".into()))?;
        match &v["choices"][0]["message"]["content"] {
            Value::String(s) => Ok(s.clone()),
            // Some servers answer with content parts.
            Value::Array(parts) => Ok(parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join("")),
            _ => Err(Attempt::Fail(
                "model server answer has no choices[0].message.content".into(),
            )),
        }
    }
}

fn failed(why: String, preprocess_ms: f64, inference_ms: f64) -> InferOutput {
    InferOutput {
        output: Err(why),
        preprocess_ms,
        inference_ms,
    }
}

#[async_trait::async_trait]
impl Backend for OpenAiBackend {
    async fn infer(&self, model: &str, batch: Vec<InferRequest>) -> Vec<InferOutput> {
        futures::future::join_all(batch.into_iter().map(|r| self.one(model, r))).await
    }

    async fn frame_spec(&self, _model: &str) -> Result<FrameSpec, String> {
        Ok(self.spec)
    }

    async fn check(&self) -> Result<String, String> {
        let resp = self
            .request(
                self.client
                    .get(self.models.clone())
                    .timeout(Duration::from_secs(3)),
            )
            .send()
            .await
            .map_err(|_| {
                format!(
                    "OpenAI-compatible server at {} does not answer",
                    self.models
                )
            })?;
        match resp.status().as_u16() {
            200..=299 => Ok(format!(
                "OpenAI-compatible server at {} answers",
                self.models
            )),
            401 | 403 => Err("OpenAI-compatible server refused OPENAI_API_KEY".into()),
            s => Err(format!(
                "OpenAI-compatible server answered HTTP {s} to GET {}",
                self.models
            )),
        }
    }

    fn concurrent_batches(&self) -> usize {
        self.max_concurrency.max(1)
    }

    fn max_images(&self, _model: &str) -> usize {
        self.max_images
    }
}
