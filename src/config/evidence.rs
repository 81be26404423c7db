//! Evidence and retention settings: where the frame behind each answer is kept, at what
//! size, and how long results, frames and finished jobs are kept (`EVIDENCE*`,
//! `*_RETENTION`). Split from the loader because both are read by the store and the sweeper
//! alone.

use std::path::PathBuf;
use std::time::Duration;

use super::source::Source;
use super::ConfigError;

/// Where evidence frames are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvidenceStore {
    /// Not kept (`EVIDENCE=off`).
    Off,
    /// In the database, beside the results (every replica reads it; the default).
    Database,
    /// Files under a directory every replica mounts (`EVIDENCE=directory`, `EVIDENCE_DIR`).
    Directory(PathBuf),
    /// Objects in an S3-compatible bucket (`EVIDENCE=s3`).
    S3(S3Bucket),
}

/// Where in an S3-compatible store evidence frames go, and how to reach it.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Bucket {
    pub bucket: String,
    /// Key prefix without slashes at either end; empty for none.
    pub prefix: String,
    /// An S3-compatible server's URL (path-style requests); `None`: AWS.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Static credentials; `None`: the environment's (web identity, container or instance
    /// role).
    pub credentials: Option<(String, String)>,
    /// Every non-empty `AWS_*` setting, for the client's credential chain, lowest precedence.
    pub aws: Vec<(String, String)>,
}

impl std::fmt::Debug for S3Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Bucket")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|(id, _)| (id, "***")),
            )
            .field("aws", &self.aws.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct EvidenceSettings {
    pub store: EvidenceStore,
    /// Longest side of a kept frame, in pixels.
    pub max_side: u32,
    pub jpeg_quality: u8,
    /// Most frames one replay may cover.
    pub max_replay_frames: i64,
}

/// How long things are kept; `None` keeps them for ever.
#[derive(Debug, Clone)]
pub struct RetentionSettings {
    pub results: Option<Duration>,
    pub evidence: Option<Duration>,
    /// Finished jobs (completed, failed, cancelled), counted from when they finished, with
    /// everything they hold.
    pub finished_jobs: Option<Duration>,
    /// How often the sweeper looks.
    pub sweep_interval: Duration,
    /// Rows one sweeper statement deletes at most (the pipelines' writes go between them).
    pub sweep_batch: usize,
}

/// A retention setting's value: a duration such as `7d`, `24h`, `90m`, or `off`.
pub fn parse_retention(value: &str) -> Result<Option<Duration>, String> {
    let value = value.trim();
    if value.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    match humantime::parse_duration(value) {
        Ok(d) if d >= Duration::from_secs(1) => Ok(Some(d)),
        Ok(_) => Err("expected at least 1s, or off".into()),
        Err(_) => Err("expected a duration such as 7d, 24h or 90m, or off".into()),
    }
}

impl Source {
    pub(super) fn evidence(&self) -> Result<EvidenceSettings, ConfigError> {
        let store = match self.raw("EVIDENCE").to_ascii_lowercase().as_str() {
            "off" | "false" | "0" => EvidenceStore::Off,
            "database" | "db" => EvidenceStore::Database,
            "directory" | "dir" => {
                let dir = self.raw("EVIDENCE_DIR");
                if dir.is_empty() {
                    return Err(self.invalid(
                        "EVIDENCE_DIR",
                        "must name a directory when EVIDENCE=directory",
                    ));
                }
                EvidenceStore::Directory(PathBuf::from(dir))
            }
            "s3" => EvidenceStore::S3(self.s3_bucket()?),
            _ => return Err(self.invalid("EVIDENCE", "expected database, directory, s3 or off")),
        };
        Ok(EvidenceSettings {
            store,
            max_side: self.ranged("EVIDENCE_MAX_SIDE", "pixels from 16 to 4096", |v: &u32| {
                (16..=4096).contains(v)
            })?,
            jpeg_quality: self.ranged(
                "EVIDENCE_JPEG_QUALITY",
                "a whole number from 1 to 100",
                |v: &u8| (1..=100).contains(v),
            )?,
            max_replay_frames: self.ranged(
                "MAX_REPLAY_FRAMES",
                "a whole number from 1 to 100000",
                |v: &i64| (1..=100_000).contains(v),
            )?,
        })
    }

    fn s3_bucket(&self) -> Result<S3Bucket, ConfigError> {
        let raw = self.raw("EVIDENCE_S3_URL");
        let url = url::Url::parse(&raw).ok().filter(|u| {
            u.scheme() == "s3" && u.host_str().is_some_and(|h| !h.is_empty()) && u.query().is_none()
        });
        let Some(url) = url else {
            return Err(self.invalid(
                "EVIDENCE_S3_URL",
                "must be s3://BUCKET or s3://BUCKET/PREFIX when EVIDENCE=s3",
            ));
        };
        let endpoint = self.raw("EVIDENCE_S3_ENDPOINT");
        let endpoint = if endpoint.is_empty() {
            None
        } else {
            match url::Url::parse(&endpoint) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
                    Some(endpoint.trim_end_matches('/').to_string())
                }
                _ => {
                    return Err(self.invalid(
                        "EVIDENCE_S3_ENDPOINT",
                        "must be an http:// or https:// URL, e.g. http://minio:9000",
                    ))
                }
            }
        };
        let nonempty = |name| Some(self.raw(name)).filter(|v| !v.is_empty());
        let credentials =
            match (
                nonempty("AWS_ACCESS_KEY_ID"),
                nonempty("AWS_SECRET_ACCESS_KEY"),
            ) {
                (Some(id), Some(secret)) => Some((id, secret)),
                (None, None) => None,
                _ => return Err(self.invalid(
                    "AWS_SECRET_ACCESS_KEY",
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY go together: set both or neither",
                )),
            };
        Ok(S3Bucket {
            bucket: url.host_str().unwrap_or_default().to_string(),
            prefix: url.path().trim_matches('/').to_string(),
            endpoint,
            region: nonempty("AWS_REGION"),
            credentials,
            aws: {
                let mut aws: Vec<(String, String)> = self
                    .0
                    .iter()
                    .filter(|(k, v)| k.starts_with(super::source::AWS) && !v.trim().is_empty())
                    .map(|(k, v)| (k.clone(), v.trim().to_string()))
                    .collect();
                aws.sort();
                aws
            },
        })
    }

    pub(super) fn retention(&self) -> Result<RetentionSettings, ConfigError> {
        let duration = |name: &'static str| {
            parse_retention(&self.raw(name)).map_err(|m| self.invalid(name, &m))
        };
        Ok(RetentionSettings {
            results: duration("RESULTS_RETENTION")?,
            evidence: duration("EVIDENCE_RETENTION")?,
            finished_jobs: duration("JOB_RETENTION")?,
            sweep_interval: Duration::from_secs(self.ranged(
                "RETENTION_SWEEP_SECS",
                "seconds from 1 to 86400",
                |v: &u64| (1..=86_400).contains(v),
            )?),
            sweep_batch: self.ranged(
                "RETENTION_SWEEP_BATCH",
                "a whole number from 1 to 100000",
                |v: &usize| (1..=100_000).contains(v),
            )?,
        })
    }
}
