//! Turns the layered raw values into validated [`Settings`]: parsing, ranges, and error
//! messages that name the variable.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use super::*;

/// The merged configuration, read one named variable at a time.
/// Not a setting of ours but the environment's: Kubernetes sets it to the pod name, the
/// replica id when REPLICA_ID is empty.
pub(super) const HOSTNAME: &str = "HOSTNAME";
/// The AWS SDKs' own settings (`AWS_WEB_IDENTITY_TOKEN_FILE`, `AWS_ROLE_ARN`,
/// `AWS_DEFAULT_REGION`...), kept for the evidence bucket's client beside the few we name.
pub(super) const AWS: &str = "AWS_";

pub(super) struct Source(pub(super) HashMap<String, String>);

impl Source {
    /// A file of PEM certificates named by `name`, checked to hold one; empty: none.
    fn ca_file(&self, name: &'static str) -> Result<Option<PathBuf>, ConfigError> {
        let raw = self.raw(name);
        if raw.is_empty() {
            return Ok(None);
        }
        match std::fs::read_to_string(&raw) {
            Ok(text) if text.contains("-----BEGIN CERTIFICATE-----") => {
                Ok(Some(PathBuf::from(raw)))
            }
            Ok(_) => Err(self.invalid(name, "the file holds no PEM certificate")),
            Err(e) => Err(self.invalid(name, &format!("cannot read it: {e}"))),
        }
    }

    pub(super) fn raw(&self, name: &'static str) -> String {
        self.0
            .get(name)
            .map(String::as_str)
            .unwrap_or_else(|| default_of(name))
            .trim()
            .to_owned()
    }

    fn parse<T: FromStr>(&self, name: &'static str, what: &str) -> Result<T, ConfigError> {
        let value = self.raw(name);
        value.parse().map_err(|_| ConfigError::Invalid {
            name,
            value: value.clone(),
            message: format!("expected {what}"),
        })
    }

    pub(super) fn ranged<T>(
        &self,
        name: &'static str,
        what: &str,
        ok: impl Fn(&T) -> bool,
    ) -> Result<T, ConfigError>
    where
        T: FromStr,
    {
        let v: T = self.parse(name, what)?;
        if ok(&v) {
            Ok(v)
        } else {
            Err(ConfigError::Invalid {
                name,
                value: self.raw(name),
                message: format!("expected {what}"),
            })
        }
    }

    fn flag(&self, name: &'static str) -> Result<bool, ConfigError> {
        match self.raw(name).to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" | "" => Ok(false),
            _ => Err(self.invalid(name, "expected true or false")),
        }
    }

    fn list(&self, name: &'static str) -> Vec<String> {
        self.raw(name)
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    pub(super) fn invalid(&self, name: &'static str, message: &str) -> ConfigError {
        ConfigError::Invalid {
            name,
            value: self.raw(name),
            message: message.to_owned(),
        }
    }

    /// RESULTS_STREAM as a Redis server and key, in the forms a Redis stream_ref takes.
    fn results_stream(&self) -> Result<Option<(url::Url, String)>, ConfigError> {
        let raw = self.raw("RESULTS_STREAM");
        if raw.is_empty() {
            return Ok(None);
        }
        let port: u16 = self.parse("REDIS_PORT", "a port number")?;
        let invalid = |message: String| ConfigError::Invalid {
            name: "RESULTS_STREAM",
            value: raw.clone(),
            message,
        };
        let parsed = crate::domain::StreamRef::parse(&raw, &self.raw("REDIS_HOST"), port)
            .map_err(|e| invalid(e.message.replace("stream_ref", "RESULTS_STREAM")))?;
        match parsed.source() {
            crate::domain::Source::Redis { server, key } => Ok(Some((server.clone(), key.clone()))),
            _ => Err(invalid(
                "expected a Redis stream key or redis://host:port[/db]/key".into(),
            )),
        }
    }

    /// WEBHOOK_SECRET, checked as a Standard Webhooks secret.
    fn webhook_secret(&self) -> Result<Option<crate::webhook::Secret>, ConfigError> {
        let raw = self.raw("WEBHOOK_SECRET");
        if raw.is_empty() {
            return Ok(None);
        }
        crate::webhook::Secret::parse("WEBHOOK_SECRET", &raw)
            .map(Some)
            .map_err(|e| self.invalid_secret(e.message))
    }

    /// Like `invalid`, without echoing the value (a secret).
    fn invalid_secret(&self, message: String) -> ConfigError {
        ConfigError::Invalid {
            name: "WEBHOOK_SECRET",
            value: "(hidden)".into(),
            message,
        }
    }

    fn webhooks(
        &self,
        secret: Option<&crate::webhook::Secret>,
    ) -> Result<crate::webhook::deliver::WebhookSettings, ConfigError> {
        use crate::webhook::{deliver::GlobalEndpoint, EventKind, Webhook};
        let url = self.raw("WEBHOOK_URL");
        let events = EventKind::parse_list("WEBHOOK_EVENTS", self.raw("WEBHOOK_EVENTS").split(','))
            .map_err(|e| self.invalid("WEBHOOK_EVENTS", &e.message))?;
        let global = if url.is_empty() {
            None
        } else {
            let url = Webhook::check_url("WEBHOOK_URL", &url)
                .map_err(|e| self.invalid("WEBHOOK_URL", &e.message))?;
            let secret = secret.cloned().ok_or_else(|| {
                self.invalid_secret(
                    "WEBHOOK_URL is set: WEBHOOK_SECRET must be too (whsec_...)".into(),
                )
            })?;
            Some(GlobalEndpoint {
                url: url.to_string(),
                secret,
                events,
            })
        };
        Ok(crate::webhook::deliver::WebhookSettings {
            global,
            max_age: Duration::from_secs(self.ranged(
                "WEBHOOK_MAX_AGE_SECS",
                "seconds from 1 to 2592000 (30 days)",
                |v: &u64| (1..=2_592_000).contains(v),
            )?),
            max_backoff: Duration::from_secs(self.ranged(
                "WEBHOOK_MAX_BACKOFF_SECS",
                "seconds from 1 to 86400",
                |v: &u64| (1..=86_400).contains(v),
            )?),
            timeout: Duration::from_secs(self.ranged(
                "WEBHOOK_TIMEOUT_SECS",
                "seconds from 1 to 300",
                |v: &u64| (1..=300).contains(v),
            )?),
            concurrency: self.ranged(
                "WEBHOOK_CONCURRENCY",
                "a whole number from 1 to 10000",
                |v: &usize| (1..=10_000).contains(v),
            )?,
        })
    }

    pub(super) fn settings(&self) -> Result<Settings, ConfigError> {
        let webhook_secret = self.webhook_secret()?;
        let max_concurrent_streams = self.ranged(
            "MAX_CONCURRENT_STREAMS",
            "a whole number from 1 to 100000",
            |v: &usize| (1..=100_000).contains(v),
        )?;
        let model_type = match self.raw("MODEL_TYPE").to_ascii_lowercase().as_str() {
            "auto" | "" => ModelType::Auto,
            "openai" => ModelType::OpenAi,
            _ => return Err(self.invalid("MODEL_TYPE", "expected auto or openai")),
        };
        let device = match self.raw("DEVICE").to_ascii_lowercase().as_str() {
            "auto" | "" => Device::Auto,
            "cpu" => Device::Cpu,
            "cuda" => Device::Cuda,
            _ => return Err(self.invalid("DEVICE", "expected auto, cpu or cuda")),
        };
        let log_format = match self.raw("LOG_FORMAT").to_ascii_lowercase().as_str() {
            "json" => LogFormat::Json,
            "text" => LogFormat::Text,
            _ => return Err(self.invalid("LOG_FORMAT", "expected json or text")),
        };
        let log_level = log_filter(&self.raw("LOG_LEVEL")).ok_or_else(|| {
            self.invalid(
                "LOG_LEVEL",
                "expected DEBUG, INFO, WARNING, ERROR, CRITICAL or a tracing filter",
            )
        })?;
        let database_url = self.raw("DATABASE_URL");
        if !(database_url.starts_with("sqlite:")
            || database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://"))
        {
            return Err(self.invalid("DATABASE_URL", "expected sqlite://PATH or postgres://..."));
        }
        let openai_base_url = self.raw("OPENAI_BASE_URL");
        if !openai_base_url.is_empty() {
            let parsed = url::Url::parse(&openai_base_url)
                .map_err(|_| self.invalid("OPENAI_BASE_URL", "expected an http(s) URL"))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(self.invalid("OPENAI_BASE_URL", "expected an http(s) URL"));
            }
        }
        if model_type == ModelType::OpenAi && openai_base_url.is_empty() {
            return Err(self.invalid("OPENAI_BASE_URL", "must be set when MODEL_TYPE=openai"));
        }
        let model_path = self.raw("MODEL_PATH");
        let cors_origins = self.list("CORS_ORIGINS");
        for origin in &cors_origins {
            if origin != "*" && http::HeaderValue::from_str(origin).is_err() {
                return Err(self.invalid(
                    "CORS_ORIGINS",
                    "expected comma-separated origins such as https://app.example.com, or *",
                ));
            }
        }
        let nonzero = |v: &u32| *v > 0;
        Ok(Settings {
            host: self.raw("HOST"),
            port: self.parse("PORT", "a port number 0-65535")?,
            database_url,
            db_max_connections: self.ranged(
                "DB_MAX_CONNECTIONS",
                "a whole number from 1 to 1000",
                |v: &u32| (1..=1000).contains(v),
            )?,
            model_path: (!model_path.is_empty()).then(|| PathBuf::from(model_path)),
            model_id: Some(self.raw("MODEL_ID")).filter(|m| !m.is_empty()),
            model_revision: self.raw("MODEL_REVISION"),
            extra_models: self
                .list("EXTRA_MODELS")
                .iter()
                .map(|pair| match pair.split_once('=') {
                    Some((n, d)) if !n.trim().is_empty() && !d.trim().is_empty() => {
                        Ok((n.trim().to_owned(), PathBuf::from(d.trim())))
                    }
                    _ => Err(self.invalid("EXTRA_MODELS", "expected name=/dir,name2=/dir2")),
                })
                .collect::<Result<_, _>>()?,
            model_cache_bytes: self
                .ranged("MODEL_CACHE_BYTES", "bytes above 0", |v: &u64| *v > 0)?,
            max_new_tokens: self.ranged(
                "MAX_NEW_TOKENS",
                "a whole number from 1 to 4096",
                |v: &usize| (1..=4096).contains(v),
            )?,
            temperature: self.ranged("TEMPERATURE", "a number from 0 to 2", |v: &f64| {
                (0.0..=2.0).contains(v)
            })?,
            model_type,
            device,
            openai: OpenAiSettings {
                base_url: openai_base_url,
                model: self.raw("OPENAI_MODEL"),
                api_key: Some(self.raw("OPENAI_API_KEY")).filter(|k| !k.is_empty()),
                max_concurrency: self.ranged(
                    "OPENAI_MAX_CONCURRENCY",
                    "a whole number from 1 to 1024",
                    |v: &usize| (1..=1024).contains(v),
                )?,
                timeout: Duration::from_secs(self.ranged(
                    "OPENAI_TIMEOUT_SECS",
                    "seconds from 1 to 3600",
                    |v: &u64| (1..=3600).contains(v),
                )?),
                max_retries: self.ranged(
                    "OPENAI_MAX_RETRIES",
                    "a whole number from 0 to 20",
                    |v: &u32| *v <= 20,
                )?,
                max_tokens: self.ranged(
                    "OPENAI_MAX_TOKENS",
                    "a whole number from 1 to 32768",
                    |v: &u32| (1..=32768).contains(v),
                )?,
                temperature: self.ranged(
                    "OPENAI_TEMPERATURE",
                    "a number from 0 to 2",
                    |v: &f64| (0.0..=2.0).contains(v),
                )?,
                frame_max_side: self.ranged(
                    "FRAME_MAX_SIDE",
                    "0 or pixels from 16 to 16384",
                    |v: &u32| *v == 0 || (16..=16384).contains(v),
                )?,
                max_images: self.ranged(
                    "OPENAI_MAX_IMAGES",
                    "a whole number from 1 to 32",
                    |v: &u32| (1..=32).contains(v),
                )?,
                jpeg_quality: self.ranged(
                    "JPEG_QUALITY",
                    "a whole number from 1 to 100",
                    |v: &u8| (1..=100).contains(v),
                )?,
            },
            pipeline: PipelineSettings {
                rtsp: crate::config::RtspSettings {
                    udp: match self.raw("RTSP_TRANSPORT").to_ascii_lowercase().as_str() {
                        "tcp" => false,
                        "udp" => true,
                        _ => return Err(self.invalid("RTSP_TRANSPORT", "expected tcp or udp")),
                    },
                    stall: Duration::from_secs(self.ranged(
                        "RTSP_STALL_SECS",
                        "seconds from 1 to 3600",
                        |v: &u64| (1..=3600).contains(v),
                    )?),
                    give_up: Duration::from_secs(self.ranged(
                        "RTSP_GIVE_UP_SECS",
                        "seconds from 1 to 604800",
                        |v: &u64| (1..=604_800).contains(v),
                    )?),
                    tls_ca_file: self.ca_file("RTSP_TLS_CA_FILE")?,
                },
                media_root: Some(self.raw("MEDIA_ROOT"))
                    .filter(|r| !r.is_empty())
                    .map(std::path::PathBuf::from),
                max_input_height: self.ranged(
                    "MAX_INPUT_HEIGHT",
                    "pixels from 1 to 100000",
                    |v: &u64| (1..=100_000).contains(v),
                )?,
                max_frame_pixels: self.ranged(
                    "MAX_FRAME_PIXELS",
                    "a whole number above 0",
                    |v: &u64| *v > 0,
                )?,
                job_queue_frames: self.ranged(
                    "JOB_QUEUE_FRAMES",
                    "a whole number from 1 to 10000",
                    |v: &usize| (1..=10_000).contains(v),
                )?,
                fetch_timeout: Duration::from_secs(self.ranged(
                    "HLS_FETCH_TIMEOUT_SECS",
                    "seconds from 1 to 600",
                    |v: &u64| (1..=600).contains(v),
                )?),
                fetch_retries: self.ranged(
                    "HLS_FETCH_RETRIES",
                    "a whole number from 0 to 20",
                    |v: &u32| *v <= 20,
                )?,
                stall_target_durations: self.ranged(
                    "HLS_STALL_TARGET_DURATIONS",
                    "a whole number from 1 to 1000",
                    |v: &u32| (1..=1000).contains(v),
                )?,
                max_playlist_bytes: self.ranged(
                    "MAX_PLAYLIST_BYTES",
                    "bytes from 1024 up",
                    |v: &usize| *v >= 1024,
                )?,
                max_segment_bytes: self.ranged(
                    "MAX_SEGMENT_BYTES",
                    "bytes from 1024 up",
                    |v: &usize| *v >= 1024,
                )?,
                segment_decode_timeout: Duration::from_secs(self.ranged(
                    "SEGMENT_DECODE_TIMEOUT_SECS",
                    "seconds from 1 to 3600",
                    |v: &u64| (1..=3600).contains(v),
                )?),
                fast_decode: self.flag("FAST_DECODE")?,
                decode_threads: self.ranged(
                    "DECODE_THREADS",
                    "a whole number from 0 to 1024",
                    |v: &usize| *v <= 1024,
                )?,
                allow_private_networks: self.flag("ALLOW_PRIVATE_NETWORKS")?,
                network_allowlist: self.list("NETWORK_ALLOWLIST"),
                redis_block: Duration::from_millis(self.ranged(
                    "REDIS_BLOCK_MS",
                    "milliseconds from 10 to 60000",
                    |v: &u64| (10..=60_000).contains(v),
                )?),
            },
            default_fps: self.ranged("DEFAULT_FPS", "a number from 0.1 to 60", |v: &f64| {
                crate::domain::Fps::RANGE.contains(v)
            })?,
            max_batch_size: self.ranged(
                "MAX_BATCH_SIZE",
                "a whole number from 1 to 256",
                |v: &usize| (1..=256).contains(v),
            )?,
            max_batch_wait: Duration::from_millis(self.ranged(
                "MAX_BATCH_WAIT_MS",
                "milliseconds from 0 to 60000",
                |v: &u64| *v <= 60_000,
            )?),
            default_prompt: {
                let p = self.raw("DEFAULT_PROMPT");
                if p.is_empty() {
                    return Err(self.invalid("DEFAULT_PROMPT", "must not be empty"));
                }
                p
            },
            max_prompt_bytes: self.ranged(
                "MAX_PROMPT_BYTES",
                "bytes from 1 to 1048576",
                |v: &usize| (1..=1_048_576).contains(v),
            )?,
            max_schema_bytes: self.ranged(
                "MAX_SCHEMA_BYTES",
                "bytes from 2 to 1048576",
                |v: &usize| (2..=1_048_576).contains(v),
            )?,
            max_alerts: self.ranged("MAX_ALERTS", "a whole number from 0 to 64", |v: &usize| {
                *v <= 64
            })?,
            redis_host: self.raw("REDIS_HOST"),
            redis_port: self.parse("REDIS_PORT", "a port number")?,
            max_concurrent_streams,
            max_active_jobs: if self.raw("MAX_ACTIVE_JOBS").is_empty() {
                max_concurrent_streams
            } else {
                self.ranged(
                    "MAX_ACTIVE_JOBS",
                    "a whole number from 1 to 10000000",
                    |v: &usize| (1..=10_000_000).contains(v),
                )?
            },
            replica_id: match self.raw("REPLICA_ID") {
                id if !id.is_empty() => id,
                _ => match self.0.get(HOSTNAME).map(|h| h.trim()) {
                    Some(h) if !h.is_empty() => h.to_owned(),
                    _ => format!(
                        "replica-{}",
                        &uuid::Uuid::new_v4().simple().to_string()[..12]
                    ),
                },
            },
            lease_ttl: Duration::from_secs(self.ranged(
                "LEASE_TTL_SECS",
                "seconds from 3 to 3600",
                |v: &u64| (3..=3600).contains(v),
            )?),
            log_level,
            log_format,
            rate_limit: RateLimitSettings {
                enabled: self.flag("RATE_LIMIT_ENABLED")?,
                read_per_minute: self.ranged(
                    "RATE_LIMIT_READ_PER_MINUTE",
                    "a whole number above 0",
                    nonzero,
                )?,
                read_burst: self.ranged(
                    "RATE_LIMIT_READ_BURST",
                    "a whole number above 0",
                    nonzero,
                )?,
                write_per_minute: self.ranged(
                    "RATE_LIMIT_WRITE_PER_MINUTE",
                    "a whole number above 0",
                    nonzero,
                )?,
                write_burst: self.ranged(
                    "RATE_LIMIT_WRITE_BURST",
                    "a whole number above 0",
                    nonzero,
                )?,
                trust_proxy: self.flag("TRUST_PROXY")?,
            },
            cors_origins,
            api_keys: self.list("API_KEYS"),
            max_body_bytes: self.ranged(
                "MAX_BODY_BYTES",
                "bytes from 1024 to 1073741824",
                |v: &usize| (1024..=1 << 30).contains(v),
            )?,
            results_stream: self.results_stream()?,
            webhooks: self.webhooks(webhook_secret.as_ref())?,
            webhook_secret,
            results_stream_maxlen: self.ranged(
                "RESULTS_STREAM_MAXLEN",
                "a whole number from 1 to 1000000000",
                |v: &usize| (1..=1_000_000_000).contains(v),
            )?,
            max_sse_streams: self.ranged(
                "MAX_SSE_STREAMS",
                "a whole number from 1 to 1000000",
                |v: &usize| (1..=1_000_000).contains(v),
            )?,
            request_timeout: Duration::from_secs(self.ranged(
                "REQUEST_TIMEOUT_SECS",
                "seconds from 1 to 3600",
                |v: &u64| (1..=3600).contains(v),
            )?),
            shutdown_timeout: Duration::from_secs(self.ranged(
                "SHUTDOWN_TIMEOUT_SECS",
                "seconds from 1 to 3600",
                |v: &u64| (1..=3600).contains(v),
            )?),
            evidence: self.evidence()?,
            retention: self.retention()?,
        })
    }
}

/// Maps the seed's Python log levels onto a tracing filter; passes tracing filters through.
pub(super) fn log_filter(level: &str) -> Option<String> {
    let mapped = match level.to_ascii_uppercase().as_str() {
        "DEBUG" => "debug",
        "INFO" | "" => "info",
        "WARNING" | "WARN" => "warn",
        "ERROR" | "CRITICAL" => "error",
        "TRACE" => "trace",
        _ => {
            return tracing_subscriber::EnvFilter::try_new(level)
                .ok()
                .map(|_| level.to_owned())
        }
    };
    Some(mapped.to_owned())
}
