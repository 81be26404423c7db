//! Typed settings, layered: built-in defaults < optional file (`FREE_ROAM_CONFIG`) < `.env`
//! < the process environment.
//!
//! Every variable lives in one table, [`VARIABLES`], with its default and one line of
//! meaning. The loader, the error messages and `.env.example` (checked by a test) all come
//! from that table, so they cannot drift apart. Names are the Python Free-Roam service's
//! (MODEL_PATH, DEFAULT_FPS, REDIS_HOST, ...) so its users can switch without edits.
//!
//! The table is in [`variables`]; parsing and validation in `source`; this file holds the
//! typed settings and where their values come from.

mod evidence;
mod source;
mod variables;

pub use evidence::{parse_retention, EvidenceSettings, EvidenceStore, RetentionSettings, S3Bucket};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[cfg(test)]
use source::log_filter;
use source::Source;
pub use variables::{default_of, Variable, VARIABLES};

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
    /// Most images one request may carry (a clip's frames).
    pub max_images: u32,
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
    /// DECODE_THREADS: media work at once (0: one per core).
    pub decode_threads: usize,
    pub allow_private_networks: bool,
    pub network_allowlist: Vec<String>,
    pub redis_block: Duration,
    /// MEDIA_ROOT: the only directory local files are read from (`None`: none are).
    pub media_root: Option<std::path::PathBuf>,
    pub rtsp: RtspSettings,
}

/// How RTSP sources connect and when they give up.
#[derive(Debug, Clone)]
pub struct RtspSettings {
    /// RTSP_TRANSPORT=udp (else TCP-interleaved).
    pub udp: bool,
    /// No frame for this long: reconnect.
    pub stall: Duration,
    /// No successful connection for this long: the job fails.
    pub give_up: Duration,
    /// PEM certificates trusted for `rtsps://` cameras beside the system's roots.
    pub tls_ca_file: Option<std::path::PathBuf>,
}

impl PipelineSettings {
    /// Where the service may connect to (streams, webhooks): the SSRF guard's policy.
    pub fn network_policy(&self) -> crate::ingest::ssrf::NetworkPolicy {
        crate::ingest::ssrf::NetworkPolicy {
            allow_private: self.allow_private_networks,
            allowlist: self.network_allowlist.clone(),
        }
    }
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
    /// Largest `response_format` schema, in bytes of compact JSON.
    pub max_schema_bytes: usize,
    /// Most alert rules per scope.
    pub max_alerts: usize,
    pub redis_host: String,
    pub redis_port: u16,
    /// Jobs this replica runs at once.
    pub max_concurrent_streams: usize,
    /// Jobs pending or running across the cluster before 429.
    pub max_active_jobs: usize,
    /// This replica's id: REPLICA_ID, else HOSTNAME, else random.
    pub replica_id: String,
    pub lease_ttl: Duration,
    pub log_level: String,
    pub log_format: LogFormat,
    pub rate_limit: RateLimitSettings,
    pub cors_origins: Vec<String>,
    pub api_keys: Vec<String>,
    pub max_body_bytes: usize,
    pub max_sse_streams: usize,
    /// Where results are also published (a Redis server and stream key), if anywhere.
    pub results_stream: Option<(url::Url, String)>,
    pub results_stream_maxlen: usize,
    /// WEBHOOK_*: the global endpoint and how every webhook is sent.
    pub webhooks: crate::webhook::deliver::WebhookSettings,
    /// WEBHOOK_SECRET: also signs job webhooks given without a secret.
    pub webhook_secret: Option<crate::webhook::Secret>,
    pub request_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// EVIDENCE*: the frame behind each answer.
    pub evidence: EvidenceSettings,
    /// *_RETENTION: how long results, frames and finished jobs are kept.
    pub retention: RetentionSettings,
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
                if values.contains_key(&k) || k.starts_with(source::AWS) {
                    values.insert(k, v);
                }
            }
        }
        for (k, v) in env {
            if values.contains_key(&k) || k == source::HOSTNAME || k.starts_with(source::AWS) {
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
/// Settings that are secrets: on Kubernetes they come from a Secret, never the ConfigMap.
pub const SECRET_VARIABLES: &[&str] = &[
    "DATABASE_URL",
    "API_KEYS",
    "OPENAI_API_KEY",
    "WEBHOOK_SECRET",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
];

/// Renders `deploy/settings.env`, the env file kustomize turns into the ConfigMap: every
/// variable but the secrets, at its default (unquoted: kustomize keeps quotes as written).
pub fn k8s_settings() -> String {
    let mut out = String::from(
        "# free-roam settings for Kubernetes (kustomize's configMapGenerator reads this file).\n\
         # Made by `free-roam dev k8s-settings`; DATABASE_URL, API_KEYS, OPENAI_API_KEY,\n\
         # WEBHOOK_SECRET and the AWS keys are in the Secret. REPLICA_ID stays empty: each pod is named by its HOSTNAME.\n",
    );
    for var in VARIABLES {
        if SECRET_VARIABLES.contains(&var.name) {
            continue;
        }
        out.push_str(&format!(
            "# {}\n{}={}\n",
            var.meaning, var.name, var.default
        ));
    }
    out
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
        let err = Settings::from_sources(None, None, env(&[("DECODE_THREADS", "-1")])).unwrap_err();
        assert!(err.to_string().starts_with("DECODE_THREADS:"), "{err}");
        let err = Settings::from_sources(None, None, env(&[("LOG_FORMAT", "xml")])).unwrap_err();
        assert!(err.to_string().starts_with("LOG_FORMAT:"), "{err}");
        let err = Settings::from_sources(None, None, env(&[("MODEL_TYPE", "openai")])).unwrap_err();
        assert!(err.to_string().starts_with("OPENAI_BASE_URL:"), "{err}");
    }

    #[test]
    fn an_s3_evidence_bucket_is_read_and_checked() {
        let s = Settings::from_sources(
            None,
            None,
            env(&[
                ("EVIDENCE", "s3"),
                ("EVIDENCE_S3_URL", "s3://frames/site-a/cams/"),
                ("EVIDENCE_S3_ENDPOINT", "http://127.0.0.1:9000/"),
                ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
                ("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-secret"),
            ]),
        )
        .unwrap();
        let EvidenceStore::S3(b) = &s.evidence.store else {
            panic!("{:?}", s.evidence.store)
        };
        assert_eq!(
            (b.bucket.as_str(), b.prefix.as_str()),
            ("frames", "site-a/cams")
        );
        assert_eq!(b.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(b.region, None);
        assert!(!format!("{s:?}").contains("wJalrXUtnFEMI-secret"));
        for (pairs, name) in [
            (vec![("EVIDENCE", "s3")], "EVIDENCE_S3_URL"),
            (
                vec![("EVIDENCE", "s3"), ("EVIDENCE_S3_URL", "https://frames/x")],
                "EVIDENCE_S3_URL",
            ),
            (
                vec![("EVIDENCE", "s3"), ("EVIDENCE_S3_URL", "s3://")],
                "EVIDENCE_S3_URL",
            ),
            (
                vec![
                    ("EVIDENCE", "s3"),
                    ("EVIDENCE_S3_URL", "s3://b"),
                    ("EVIDENCE_S3_ENDPOINT", "minio:9000"),
                ],
                "EVIDENCE_S3_ENDPOINT",
            ),
            (
                vec![
                    ("EVIDENCE", "s3"),
                    ("EVIDENCE_S3_URL", "s3://b"),
                    ("AWS_ACCESS_KEY_ID", "id"),
                ],
                "AWS_SECRET_ACCESS_KEY",
            ),
            (vec![("EVIDENCE", "bucket")], "EVIDENCE"),
        ] {
            let err = Settings::from_sources(None, None, env(&pairs)).unwrap_err();
            assert!(
                err.to_string().starts_with(&format!("{name}:")),
                "{pairs:?}: {err}"
            );
        }
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

    /// deploy/settings.env is what `k8s_settings` renders now.
    #[test]
    fn kubernetes_settings_match_the_settings() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/settings.env"))
                .unwrap();
        assert_eq!(
            text,
            k8s_settings(),
            "deploy/settings.env is stale; regenerate it with `free-roam dev k8s-settings > deploy/settings.env`"
        );
        for secret in SECRET_VARIABLES {
            assert!(
                !text.contains(&format!("\n{secret}=")),
                "{secret} stays out of the ConfigMap"
            );
        }
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
