//! Typed settings, layered: built-in defaults < optional file (`FREE_ROAM_CONFIG`) < `.env`
//! < the process environment.
//!
//! Every variable lives in one table, [`VARIABLES`], with its default and one line of
//! meaning. The loader, the error messages and `.env.example` (checked by a test) all come
//! from that table, so they cannot drift apart. Names are the Python Free-Roam service's
//! (MODEL_PATH, DEFAULT_FPS, REDIS_HOST, ...) so its users can switch without edits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// One configuration variable: its environment name, default and meaning.
#[derive(Debug, Clone, Copy)]
pub struct Variable {
    pub name: &'static str,
    pub default: &'static str,
    pub meaning: &'static str,
}

macro_rules! variables {
    ($($name:literal = $default:literal : $meaning:literal;)*) => {
        /// Every setting the service reads, in the order `.env.example` lists them.
        pub const VARIABLES: &[Variable] = &[
            $(Variable { name: $name, default: $default, meaning: $meaning },)*
        ];
    };
}

variables! {
    "HOST" = "0.0.0.0" : "Address the HTTP server binds to.";
    "PORT" = "8000" : "TCP port of the HTTP server (0 picks a free port).";
    "DATABASE_URL" = "sqlite://data/free-roam.db?mode=rwc" : "sqlite://PATH (embedded, created on first start) or postgres://USER@HOST:PORT/DB.";
    "DB_MAX_CONNECTIONS" = "10" : "Size of the database connection pool.";
    "MODEL_PATH" = "" : "Local model directory (config.json, tokenizer.json, *.safetensors); empty for none.";
    "MODEL_ID" = "" : "Hugging Face model id to fetch when MODEL_PATH is empty, e.g. google/paligemma-3b-mix-224 (needs internet).";
    "MODEL_REVISION" = "main" : "Hub revision to fetch; pin a commit hash for repeatable deployments.";
    "EXTRA_MODELS" = "" : "More local models jobs may name: name=/dir,name2=/dir2 (the default model is MODEL_PATH's folder name).";
    "MODEL_CACHE_BYTES" = "8589934592" : "Weight bytes of in-process models kept loaded at once; least recently used idle models are evicted.";
    "MAX_NEW_TOKENS" = "32" : "Longest answer the in-process model generates per frame.";
    "TEMPERATURE" = "0" : "In-process sampling temperature; 0 is greedy decoding.";
    "MODEL_TYPE" = "auto" : "Model backend: auto (from MODEL_PATH's config.json) or openai (a remote OpenAI-compatible server).";
    "DEVICE" = "auto" : "Device for in-process models: auto, cpu or cuda.";
    "OPENAI_BASE_URL" = "" : "Base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8001/v1 (MODEL_TYPE=openai).";
    "OPENAI_MODEL" = "" : "Model name sent to the OpenAI-compatible server.";
    "OPENAI_API_KEY" = "" : "Bearer token for the OpenAI-compatible server; empty for none.";
    "OPENAI_MAX_CONCURRENCY" = "4" : "Requests in flight at once to the OpenAI-compatible server.";
    "OPENAI_TIMEOUT_SECS" = "60" : "Timeout of one request to the OpenAI-compatible server.";
    "OPENAI_MAX_RETRIES" = "3" : "Retries of a request that timed out or got 429/5xx (Retry-After is honoured).";
    "OPENAI_MAX_TOKENS" = "256" : "max_tokens sent with each request.";
    "OPENAI_TEMPERATURE" = "0" : "temperature sent with each request (0 is greedy).";
    "FRAME_MAX_SIDE" = "768" : "Frames sent to an OpenAI-compatible server are scaled down so neither side exceeds this many pixels (0 = as decoded).";
    "JPEG_QUALITY" = "85" : "JPEG quality (1-100) of frames sent to an OpenAI-compatible server.";
    "DEFAULT_FPS" = "2.0" : "Frames sampled per second of media when a job gives no fps (0.1 to 60).";
    "MAX_BATCH_SIZE" = "8" : "Largest batch of frames sent to the model at once.";
    "MAX_BATCH_WAIT_MS" = "50" : "Longest a frame waits for its batch to fill before the batch is sent.";
    "DEFAULT_PROMPT" = "Describe what is happening in this frame." : "Global prompt version 1, used until a global prompt is posted.";
    "MAX_PROMPT_BYTES" = "8192" : "Largest prompt accepted, in bytes of UTF-8.";
    "MAX_INPUT_HEIGHT" = "720" : "HLS master playlists: the highest-bandwidth variant at most this tall is chosen.";
    "MAX_FRAME_PIXELS" = "8294400" : "Frames with more pixels than this (default 3840x2160) fail the job.";
    "JOB_QUEUE_FRAMES" = "16" : "Frames a job may have waiting for the model; live HLS drops the oldest beyond it, VOD and Redis wait.";
    "HLS_FETCH_TIMEOUT_SECS" = "10" : "Timeout of one playlist or segment request.";
    "HLS_FETCH_RETRIES" = "3" : "Retries of a failed playlist or segment request (capped, jittered backoff).";
    "HLS_STALL_TARGET_DURATIONS" = "6" : "A live playlist that adds nothing (or cannot be fetched) for this many target durations fails the job.";
    "MAX_PLAYLIST_BYTES" = "1048576" : "Largest playlist accepted.";
    "MAX_SEGMENT_BYTES" = "52428800" : "Largest segment (or init section) accepted.";
    "FAST_DECODE" = "false" : "Skip H.264/HEVC deblocking when decoding: about a fifth less CPU, slightly blockier frames.";
    "SEGMENT_DECODE_TIMEOUT_SECS" = "30" : "A segment still decoding after this long is abandoned and counted.";
    "ALLOW_PRIVATE_NETWORKS" = "false" : "Allow HLS URLs that resolve to loopback, private, link-local or metadata addresses.";
    "NETWORK_ALLOWLIST" = "" : "Comma-separated hosts exempt from the private-address check.";
    "REDIS_BLOCK_MS" = "1000" : "How long one XREADGROUP waits for new entries.";
    "REDIS_HOST" = "localhost" : "Redis host for bare stream keys (the seed's form of stream_ref).";
    "REDIS_PORT" = "6379" : "Redis port for bare stream keys.";
    "MAX_CONCURRENT_STREAMS" = "10" : "Most jobs pending or running at once; more are refused with 429.";
    "LOG_LEVEL" = "INFO" : "DEBUG, INFO, WARNING, ERROR or CRITICAL, or a tracing filter such as free_roam=debug.";
    "LOG_FORMAT" = "json" : "json or text.";
    "RATE_LIMIT_ENABLED" = "true" : "Apply per-client rate limits to /api routes.";
    "RATE_LIMIT_READ_PER_MINUTE" = "600" : "Read calls (GET) per client per minute.";
    "RATE_LIMIT_READ_BURST" = "60" : "Read calls a client may make at once before the per-minute rate applies.";
    "RATE_LIMIT_WRITE_PER_MINUTE" = "60" : "Mutating calls (POST, DELETE) per client per minute.";
    "RATE_LIMIT_WRITE_BURST" = "10" : "Mutating calls a client may make at once.";
    "TRUST_PROXY" = "false" : "Key clients by the first X-Forwarded-For address (only behind a trusted proxy).";
    "CORS_ORIGINS" = "" : "Comma-separated origins allowed by CORS, or * for any; empty disables CORS.";
    "API_KEYS" = "" : "Comma-separated API keys; when set every /api route needs Authorization: Bearer KEY.";
    "MAX_BODY_BYTES" = "1048576" : "Largest request body accepted; larger gets 413.";
    "REQUEST_TIMEOUT_SECS" = "30" : "A request still running after this many seconds gets 503.";
    "SHUTDOWN_TIMEOUT_SECS" = "20" : "How long shutdown waits for requests and pipelines to finish.";
}

/// Looks up the default of a variable in [`VARIABLES`].
pub fn default_of(name: &str) -> &'static str {
    VARIABLES
        .iter()
        .find(|v| v.name == name)
        .map(|v| v.default)
        .unwrap_or("")
}

/// Settings that failed to load or validate; the message names the variable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name}: {message} (got {value:?})")]
    Invalid {
        name: &'static str,
        value: String,
        message: String,
    },
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error(".env file: {0}")]
    DotEnv(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    Auto,
    OpenAi,
}

/// The OpenAI-compatible backend's settings.
#[derive(Debug, Clone)]
pub struct OpenAiSettings {
    pub base_url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub max_concurrency: usize,
    pub timeout: Duration,
    pub max_retries: u32,
    pub max_tokens: u32,
    pub temperature: f64,
    /// Longest side of the frames sent; 0 sends them as decoded.
    pub frame_max_side: u32,
    pub jpeg_quality: u8,
}

/// How pipelines fetch, decode and queue.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    pub max_input_height: u64,
    pub max_frame_pixels: u64,
    pub job_queue_frames: usize,
    pub fetch_timeout: Duration,
    pub fetch_retries: u32,
    pub stall_target_durations: u32,
    pub max_playlist_bytes: usize,
    pub max_segment_bytes: usize,
    pub segment_decode_timeout: Duration,
    pub fast_decode: bool,
    pub allow_private_networks: bool,
    pub network_allowlist: Vec<String>,
    pub redis_block: Duration,
}

#[derive(Debug, Clone)]
pub struct RateLimitSettings {
    pub enabled: bool,
    pub read_per_minute: u32,
    pub read_burst: u32,
    pub write_per_minute: u32,
    pub write_burst: u32,
    pub trust_proxy: bool,
}

/// Validated settings. Nothing outside this module reads the environment.
#[derive(Debug, Clone)]
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub database_url: String,
    pub db_max_connections: u32,
    pub model_path: Option<PathBuf>,
    pub model_id: Option<String>,
    pub model_revision: String,
    pub extra_models: Vec<(String, PathBuf)>,
    pub model_cache_bytes: u64,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub model_type: ModelType,
    pub device: Device,
    pub openai: OpenAiSettings,
    pub pipeline: PipelineSettings,
    pub default_fps: f64,
    pub max_batch_size: usize,
    pub max_batch_wait: Duration,
    pub default_prompt: String,
    pub max_prompt_bytes: usize,
    pub redis_host: String,
    pub redis_port: u16,
    pub max_concurrent_streams: usize,
    pub log_level: String,
    pub log_format: LogFormat,
    pub rate_limit: RateLimitSettings,
    pub cors_origins: Vec<String>,
    pub api_keys: Vec<String>,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub shutdown_timeout: Duration,
}

impl Settings {
    /// Loads from the real sources: `FREE_ROAM_CONFIG` file, `./.env`, the process environment.
    pub fn load() -> Result<Self, ConfigError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        let dotenv = Path::new(".env");
        Self::from_sources(
            env.get("FREE_ROAM_CONFIG").map(PathBuf::from).as_deref(),
            dotenv.exists().then_some(dotenv),
            env,
        )
    }

    /// Only the defaults: what a fresh checkout with no environment runs with.
    pub fn defaults() -> Result<Self, ConfigError> {
        Self::from_sources(None, None, HashMap::new())
    }

    /// Builds settings from explicit sources, lowest precedence first. Tests use this so they
    /// never touch the process environment.
    pub fn from_sources(
        file: Option<&Path>,
        dotenv: Option<&Path>,
        env: HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        let mut values: HashMap<String, String> = VARIABLES
            .iter()
            .map(|v| (v.name.to_owned(), v.default.to_owned()))
            .collect();
        if let Some(path) = file {
            for (key, value) in read_file(path)? {
                values.insert(key, value);
            }
        }
        // `.env` values are overridden by the real environment, never the other way round.
        if let Some(path) = dotenv {
            for item in
                dotenvy::from_path_iter(path).map_err(|e| ConfigError::DotEnv(e.to_string()))?
            {
                let (k, v) = item.map_err(|e| ConfigError::DotEnv(e.to_string()))?;
                if values.contains_key(&k) {
                    values.insert(k, v);
                }
            }
        }
        for (k, v) in env {
            if values.contains_key(&k) {
                values.insert(k, v);
            }
        }
        Source(values).settings()
    }
}

/// Reads a settings file (TOML, YAML or JSON, by extension) with the `config` crate. Keys are
/// the variable names in any case; an unknown key is an error, so typos do not pass silently.
fn read_file(path: &Path) -> Result<Vec<(String, String)>, ConfigError> {
    let err = |message: String| ConfigError::File {
        path: path.to_owned(),
        message,
    };
    if !path.exists() {
        return Err(err("does not exist (set by FREE_ROAM_CONFIG)".into()));
    }
    let table: HashMap<String, config::Value> = config::Config::builder()
        .add_source(config::File::from(path))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| err(e.to_string()))?;
    let mut out = Vec::new();
    for (key, value) in table {
        let name = key.to_ascii_uppercase();
        if !VARIABLES.iter().any(|v| v.name == name) {
            return Err(err(format!(
                "unknown setting {key:?}; see .env.example for the names"
            )));
        }
        let value = value
            .into_string()
            .map_err(|e| err(format!("{name}: {e}")))?;
        out.push((name, value));
    }
    Ok(out)
}

/// The merged configuration, read one named variable at a time.
struct Source(HashMap<String, String>);

impl Source {
    fn raw(&self, name: &'static str) -> String {
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

    fn ranged<T>(
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

    fn invalid(&self, name: &'static str, message: &str) -> ConfigError {
        ConfigError::Invalid {
            name,
            value: self.raw(name),
            message: message.to_owned(),
        }
    }

    fn settings(&self) -> Result<Settings, ConfigError> {
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
                jpeg_quality: self.ranged(
                    "JPEG_QUALITY",
                    "a whole number from 1 to 100",
                    |v: &u8| (1..=100).contains(v),
                )?,
            },
            pipeline: PipelineSettings {
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
            redis_host: self.raw("REDIS_HOST"),
            redis_port: self.parse("REDIS_PORT", "a port number")?,
            max_concurrent_streams: self.ranged(
                "MAX_CONCURRENT_STREAMS",
                "a whole number from 1 to 100000",
                |v: &usize| (1..=100_000).contains(v),
            )?,
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
        })
    }
}

/// Maps the seed's Python log levels onto a tracing filter; passes tracing filters through.
fn log_filter(level: &str) -> Option<String> {
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

/// Renders `.env.example` from [`VARIABLES`].
pub fn env_example() -> String {
    let mut out = String::from("# free-roam settings: every variable, its default and its meaning.\n# Precedence: defaults < FREE_ROAM_CONFIG file < .env < process environment.\n");
    for var in VARIABLES {
        out.push_str(&format!(
            "\n# {}\n{}=\"{}\"\n",
            var.meaning, var.name, var.default
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_and_validate() {
        let s = Settings::defaults().unwrap();
        assert_eq!(s.port, 8000);
        assert_eq!(s.default_fps, 2.0);
        assert_eq!(s.max_batch_size, 8);
        assert_eq!(s.max_concurrent_streams, 10);
        assert_eq!(s.max_body_bytes, 1 << 20);
        assert_eq!(s.log_format, LogFormat::Json);
        assert!(s.database_url.starts_with("sqlite:"));
    }

    #[test]
    fn bad_value_names_the_variable() {
        let err = Settings::from_sources(None, None, env(&[("DEFAULT_FPS", "fast")])).unwrap_err();
        assert!(err.to_string().starts_with("DEFAULT_FPS:"), "{err}");
        let err = Settings::from_sources(None, None, env(&[("DEFAULT_FPS", "61")])).unwrap_err();
        assert!(err.to_string().starts_with("DEFAULT_FPS:"), "{err}");
        let err = Settings::from_sources(None, None, env(&[("LOG_FORMAT", "xml")])).unwrap_err();
        assert!(err.to_string().starts_with("LOG_FORMAT:"), "{err}");
        let err = Settings::from_sources(None, None, env(&[("MODEL_TYPE", "openai")])).unwrap_err();
        assert!(err.to_string().starts_with("OPENAI_BASE_URL:"), "{err}");
    }

    #[test]
    fn layers_in_order_file_then_dotenv_then_env() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("free-roam.toml");
        std::fs::write(
            &file,
            "PORT = 7000\nMAX_BATCH_SIZE = 3\nREDIS_PORT = 6000\n",
        )
        .unwrap();
        let dotenv = dir.path().join(".env");
        std::fs::write(&dotenv, "MAX_BATCH_SIZE=4\nREDIS_PORT=6001\n").unwrap();
        let s = Settings::from_sources(Some(&file), Some(&dotenv), env(&[("REDIS_PORT", "6002")]))
            .unwrap();
        assert_eq!(s.port, 7000, "file beats defaults");
        assert_eq!(s.max_batch_size, 4, ".env beats file");
        assert_eq!(s.redis_port, 6002, "environment beats .env");
    }

    #[test]
    fn seed_log_levels_map_to_filters() {
        assert_eq!(log_filter("WARNING").as_deref(), Some("warn"));
        assert_eq!(log_filter("CRITICAL").as_deref(), Some("error"));
        assert_eq!(
            log_filter("free_roam=debug").as_deref(),
            Some("free_roam=debug")
        );
    }

    /// `.env.example` must list exactly the variables of [`VARIABLES`] with their defaults.
    #[test]
    fn env_example_matches_the_settings() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.env.example")).unwrap();
        let listed: Vec<(String, String)> = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && l.contains('='))
            .map(|l| {
                let (k, v) = l.split_once('=').unwrap();
                (k.trim().to_owned(), v.trim().trim_matches('"').to_owned())
            })
            .collect();
        let expected: Vec<(String, String)> = VARIABLES
            .iter()
            .map(|v| (v.name.to_owned(), v.default.to_owned()))
            .collect();
        assert_eq!(listed, expected, ".env.example disagrees with config::VARIABLES; regenerate it with `free-roam dev env-example > .env.example`");
        for var in VARIABLES {
            assert!(
                text.contains(var.meaning),
                "{} has no meaning line in .env.example",
                var.name
            );
        }
    }
}
