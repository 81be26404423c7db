//! Domain types: what a job, a stream reference, an fps or a prompt may be.
//!
//! Request bodies become these types at the API edge (`parse`), so an invalid value cannot
//! exist past a handler. No I/O lives here; every other module may depend on this one.

use std::fmt;
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};
use url::Url;

/// Why a value was refused; `param` names the request field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Invalid {
    pub param: &'static str,
    pub message: String,
}

impl Invalid {
    pub fn new(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param,
            message: message.into(),
        }
    }
}

/// A URL without the password of its user info, for responses, logs and messages.
pub fn redacted_url(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => raw.to_owned(),
    }
}

/// A job's id: client-chosen (1-128 of `A-Z a-z 0-9 . _ -`) or a generated UUID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct JobId(String);

impl JobId {
    pub const MAX_LEN: usize = 128;

    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(Invalid::new(
                "job_id",
                "job_id must be 1-128 characters of letters, digits, '.', '_' or '-'",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a job's frames come from, decided from the text of `stream_ref` alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An `http(s)://` URL that should answer with an HLS playlist (master or media).
    Hls(Url),
    /// A Redis stream: the server URL (without the key) and the stream key.
    Redis { server: Url, key: String },
    /// The evidence frames of results `from..=to` of another job, asked about again
    /// (`POST /api/v1/inference/replay`; never a `start` form).
    Replay { job_id: String, from: i64, to: i64 },
    /// A whole video file, read once from start to end like a VOD.
    File(FileLocation),
    /// An `rtsp://` or `rtsps://` camera or server (credentials in the URL's userinfo).
    Rtsp(Url),
}

/// Where a file job's file is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileLocation {
    /// An `http(s)://` URL whose path ends in a video file's extension, read with Range
    /// requests.
    Http(Url),
    /// A `file:///` path; usable only under MEDIA_ROOT (checked where the setting is known).
    Local(std::path::PathBuf),
}

/// Path endings that make an `http(s)://` URL a file rather than an HLS playlist.
pub const FILE_EXTENSIONS: [&str; 6] = ["mp4", "m4v", "mov", "mkv", "webm", "ts"];

impl Source {
    pub fn kind(&self) -> SourceType {
        match self {
            Source::Hls(_) => SourceType::Hls,
            Source::Redis { .. } => SourceType::Redis,
            Source::Replay { .. } => SourceType::Replay,
            Source::File(_) => SourceType::File,
            Source::Rtsp(_) => SourceType::Rtsp,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SourceType {
    Hls,
    Redis,
    Replay,
    File,
    Rtsp,
}

impl SourceType {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceType::Hls => "hls",
            SourceType::Redis => "redis",
            SourceType::Replay => "replay",
            SourceType::File => "file",
            SourceType::Rtsp => "rtsp",
        }
    }

    const ALL: [SourceType; 5] = [
        SourceType::Hls,
        SourceType::Redis,
        SourceType::Replay,
        SourceType::File,
        SourceType::Rtsp,
    ];

    /// The kind a stored job names ([`SourceType::as_str`]); HLS for anything else (the
    /// oldest rows, written before the column named more than HLS).
    pub fn from_stored(s: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .unwrap_or(SourceType::Hls)
    }
}

/// The stream reference a user posted, checked and classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRef {
    raw: String,
    source: Source,
}

const STREAM_REF_FORMS: &str = "stream_ref must be an http(s):// HLS playlist URL, \
     an rtsp:// or rtsps:// camera URL (rtsp://user:password@host:port/path), \
     an http(s):// URL of a video file (ending in .mp4, .m4v, .mov, .mkv, .webm or .ts), \
     file:///<path> of a file under MEDIA_ROOT, \
     redis://[user:pass@]host:port[/db]/<stream-key>, or a bare Redis stream key \
     (letters, digits and : _ - . / { })";

impl StreamRef {
    pub const MAX_LEN: usize = 2048;

    /// Parses `raw`; bare keys use the configured Redis host and port.
    pub fn parse(raw: &str, redis_host: &str, redis_port: u16) -> Result<Self, Invalid> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(Invalid::new("stream_ref", "stream_ref must not be empty"));
        }
        if raw.len() > Self::MAX_LEN {
            return Err(Invalid::new(
                "stream_ref",
                format!("stream_ref is longer than {} characters", Self::MAX_LEN),
            ));
        }
        let source = if raw.contains("://") {
            let url = Url::parse(raw).map_err(|e| {
                Invalid::new(
                    "stream_ref",
                    format!("stream_ref is not a valid URL ({e}); {STREAM_REF_FORMS}"),
                )
            })?;
            match url.scheme() {
                "http" | "https" if url.host_str().is_some() => {
                    if is_file_path(url.path()) {
                        Source::File(FileLocation::Http(url))
                    } else {
                        Source::Hls(url)
                    }
                }
                "file" => {
                    let path = url
                        .to_file_path()
                        .ok()
                        .filter(|_| url.host_str().is_none_or(str::is_empty))
                        .ok_or_else(|| {
                            Invalid::new(
                                "stream_ref",
                                "a file stream_ref must be file:///<absolute path> (no host)",
                            )
                        })?;
                    Source::File(FileLocation::Local(path))
                }
                "redis" | "rediss" => Self::redis_url(url)?,
                "rtsp" | "rtsps" if url.host_str().is_some_and(|h| !h.is_empty()) => {
                    Source::Rtsp(url)
                }
                _ => return Err(Invalid::new("stream_ref", STREAM_REF_FORMS)),
            }
        } else if is_stream_key(raw) {
            let server = Url::parse(&format!(
                "redis://{}:{}/",
                bracket_v6(redis_host),
                redis_port
            ))
            .map_err(|_| {
                Invalid::new(
                    "stream_ref",
                    "REDIS_HOST/REDIS_PORT do not form a valid Redis URL",
                )
            })?;
            Source::Redis {
                server,
                key: raw.to_owned(),
            }
        } else {
            return Err(Invalid::new("stream_ref", STREAM_REF_FORMS));
        };
        Ok(Self {
            raw: raw.to_owned(),
            source,
        })
    }

    /// A replay of results `from..=to` of `job_id` (stored as `replay://<job_id>/<from>-<to>`).
    pub fn replay(job_id: &JobId, from: i64, to: i64) -> Self {
        Self {
            raw: format!("replay://{job_id}/{from}-{to}"),
            source: Source::Replay {
                job_id: job_id.to_string(),
                from,
                to,
            },
        }
    }

    /// A stored job's reference: what [`StreamRef::parse`] takes, or a replay's.
    pub fn parse_stored(raw: &str, redis_host: &str, redis_port: u16) -> Result<Self, Invalid> {
        let Some(rest) = raw.strip_prefix("replay://") else {
            return Self::parse(raw, redis_host, redis_port);
        };
        let bad = || Invalid::new("stream_ref", format!("not a replay reference: {raw}"));
        let (job, range) = rest.rsplit_once('/').ok_or_else(bad)?;
        let (from, to) = range.split_once('-').ok_or_else(bad)?;
        let job = JobId::parse(job).map_err(|_| bad())?;
        Ok(Self::replay(
            &job,
            from.parse().map_err(|_| bad())?,
            to.parse().map_err(|_| bad())?,
        ))
    }

    /// `redis://host:port/db/key` or `redis://host:port/key`: the last path segment is the key.
    fn redis_url(url: Url) -> Result<Source, Invalid> {
        let segments: Vec<&str> = url.path().trim_start_matches('/').split('/').collect();
        let (db, key) = match segments.as_slice() {
            [key] => (None, *key),
            [db, key] => (Some(*db), *key),
            _ => return Err(Invalid::new("stream_ref", STREAM_REF_FORMS)),
        };
        let key = percent_decode(key);
        if key.is_empty() || !is_stream_key(&key) {
            return Err(Invalid::new(
                "stream_ref",
                format!("Redis URL has no valid stream key; {STREAM_REF_FORMS}"),
            ));
        }
        if let Some(db) = db {
            if db.parse::<u32>().is_err() {
                return Err(Invalid::new(
                    "stream_ref",
                    "the Redis database in stream_ref must be a number",
                ));
            }
        }
        let mut server = url.clone();
        server.set_path(&db.map(|d| format!("/{d}")).unwrap_or_default());
        server.set_query(None);
        server.set_fragment(None);
        Ok(Source::Redis { server, key })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    pub fn source(&self) -> &Source {
        &self.source
    }
}

/// A URL path naming a video file by its extension (case-insensitive).
fn is_file_path(path: &str) -> bool {
    path.rsplit_once('.').is_some_and(|(_, ext)| {
        FILE_EXTENSIONS
            .iter()
            .any(|known| ext.eq_ignore_ascii_case(known))
    })
}

fn is_stream_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 512
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-' | b'.' | b'/' | b'{' | b'}')
        })
}

fn bracket_v6(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("k={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Frames sampled per second of media time.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Fps(f64);

impl Fps {
    pub const RANGE: RangeInclusive<f64> = 0.1..=60.0;

    pub fn parse(v: f64) -> Result<Self, Invalid> {
        if v.is_finite() && Self::RANGE.contains(&v) {
            Ok(Self(v))
        } else {
            Err(Invalid::new("fps", "fps must be a number from 0.1 to 60"))
        }
    }

    pub fn get(self) -> f64 {
        self.0
    }

    /// Media time between two sampled frames, in milliseconds.
    pub fn interval_ms(self) -> f64 {
        1000.0 / self.0
    }
}

/// A job's change gate (`start`'s `gate`): a sampled picture goes to the model only when
/// at least `threshold` of it changed since the last one sent, or `max_interval_s` of media
/// time has passed since then.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChangeGate {
    pub threshold: f64,
    pub max_interval_s: f64,
}

impl ChangeGate {
    /// `mode` must be `change`; `threshold` a share of the picture in (0, 1];
    /// `max_interval_s` from 1 to 86400.
    pub fn parse(
        mode: &str,
        threshold: Option<f64>,
        max_interval_s: Option<f64>,
        default_threshold: f64,
        default_max_interval_s: f64,
    ) -> Result<Self, Invalid> {
        if mode != "change" {
            return Err(Invalid::new(
                "gate.mode",
                format!("gate.mode {mode:?} is not known; the one mode is \"change\""),
            ));
        }
        let threshold = threshold.unwrap_or(default_threshold);
        if !(threshold.is_finite() && threshold > 0.0 && threshold <= 1.0) {
            return Err(Invalid::new(
                "gate.threshold",
                "gate.threshold must be a share of the picture above 0 and at most 1 (0.01 = 1%)",
            ));
        }
        let max_interval_s = max_interval_s.unwrap_or(default_max_interval_s);
        if !(max_interval_s.is_finite() && (1.0..=86_400.0).contains(&max_interval_s)) {
            return Err(Invalid::new(
                "gate.max_interval_s",
                "gate.max_interval_s must be from 1 to 86400 seconds",
            ));
        }
        Ok(Self {
            threshold,
            max_interval_s,
        })
    }
}

/// A job's clips (`start`'s `clip`): `frames` consecutive samples asked about in one
/// request, a clip starting every `stride_s` media seconds (default: back to back).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Clip {
    pub frames: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stride_s: Option<f64>,
}

impl Clip {
    pub const MAX_FRAMES: u32 = 32;

    /// `frames` from 2 to [`Clip::MAX_FRAMES`]; `stride_s` at least the clip's own length at
    /// `fps` (clips do not overlap) and at most an hour.
    pub fn parse(frames: u32, stride_s: Option<f64>, fps: Fps) -> Result<Self, Invalid> {
        if !(2..=Self::MAX_FRAMES).contains(&frames) {
            return Err(Invalid::new(
                "clip.frames",
                format!("clip.frames must be from 2 to {}", Self::MAX_FRAMES),
            ));
        }
        if let Some(stride) = stride_s {
            let length = f64::from(frames) * fps.interval_ms() / 1000.0;
            if !(stride.is_finite() && stride + 1e-9 >= length && stride <= 3600.0) {
                return Err(Invalid::new(
                    "clip.stride_s",
                    format!("clip.stride_s must be from the clip's length ({length} s: {frames} frames at {} fps) to 3600 seconds", fps.get()),
                ));
            }
        }
        Ok(Self { frames, stride_s })
    }
}

/// A prompt's text: not blank, at most `max_bytes` of UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptText(String);

impl PromptText {
    pub fn parse(s: &str, max_bytes: usize) -> Result<Self, Invalid> {
        if s.trim().is_empty() {
            return Err(Invalid::new("prompt", "prompt must not be empty"));
        }
        if s.len() > max_bytes {
            return Err(Invalid::new(
                "prompt",
                format!("prompt is {} bytes; the limit is {max_bytes}", s.len()),
            ));
        }
        if s.chars().any(|c| c == '\0') {
            return Err(Invalid::new(
                "prompt",
                "prompt must not contain NUL characters",
            ));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// How the batcher weighs a job's frames against other jobs'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "low" => Some(Priority::Low),
            "normal" => Some(Priority::Normal),
            "high" => Some(Priority::High),
            _ => None,
        }
    }

    /// Share of batch slots relative to other priorities.
    pub fn weight(self) -> u32 {
        match self {
            Priority::Low => 1,
            Priority::Normal => 2,
            Priority::High => 4,
        }
    }
}

/// A job's lifecycle state, the seed's five names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Pending,
        JobStatus::Running,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Running => "running",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Pending and running jobs count against MAX_CONCURRENT_STREAMS and can be cancelled.
    pub fn is_active(self) -> bool {
        matches!(self, JobStatus::Pending | JobStatus::Running)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<StreamRef, Invalid> {
        StreamRef::parse(s, "localhost", 6379)
    }

    #[test]
    fn detects_hls_urls() {
        let r = parse("https://example.com/live/stream.m3u8").unwrap();
        assert_eq!(r.source().kind(), SourceType::Hls);
        let r = parse("http://127.0.0.1:8080/master").unwrap();
        assert_eq!(r.source().kind(), SourceType::Hls);
    }

    #[test]
    fn detects_files_by_extension_and_scheme() {
        for url in [
            "https://example.com/clips/a.mp4",
            "http://127.0.0.1:8080/b.MKV?token=1",
            "https://example.com/c.mov",
            "https://example.com/d.ts",
        ] {
            let r = parse(url).unwrap();
            assert_eq!(r.source().kind(), SourceType::File, "{url}");
            assert!(matches!(r.source(), Source::File(FileLocation::Http(_))));
        }
        let r = parse("file:///media/cams/front.mp4").unwrap();
        assert_eq!(
            r.source(),
            &Source::File(FileLocation::Local("/media/cams/front.mp4".into()))
        );
        // The URL parser removes dot segments: what is checked against MEDIA_ROOT is the
        // path they lead to.
        let r = parse("file:///media/../etc/passwd").unwrap();
        assert_eq!(
            r.source(),
            &Source::File(FileLocation::Local("/etc/passwd".into()))
        );
        assert!(parse("https://example.com/live.m3u8/x")
            .is_ok_and(|r| r.source().kind() == SourceType::Hls));
    }

    #[test]
    fn source_types_read_back_as_stored() {
        for k in SourceType::ALL {
            assert_eq!(SourceType::from_stored(k.as_str()), k);
        }
        assert_eq!(SourceType::from_stored("unknown"), SourceType::Hls);
    }

    #[test]
    fn detects_rtsp_cameras() {
        let r = parse("rtsp://admin:s3cret@10.0.0.7:554/Streaming/Channels/101").unwrap();
        assert_eq!(r.source().kind(), SourceType::Rtsp);
        assert!(parse("rtsps://cam.example.com/live").is_ok());
        assert_eq!(
            redacted_url(r.as_str()),
            "rtsp://admin:***@10.0.0.7:554/Streaming/Channels/101"
        );
    }

    #[test]
    fn detects_redis_forms() {
        let r = parse("video_frames").unwrap();
        assert_eq!(
            r.source(),
            &Source::Redis {
                server: Url::parse("redis://localhost:6379/").unwrap(),
                key: "video_frames".into()
            }
        );
        let r = parse("redis://user:pw@cache:6380/2/cams:front").unwrap();
        match r.source() {
            Source::Redis { server, key } => {
                assert_eq!(key, "cams:front");
                assert_eq!(server.as_str(), "redis://user:pw@cache:6380/2");
            }
            other => panic!("{other:?}"),
        }
        let r = parse("redis://cache:6380/frames").unwrap();
        assert!(matches!(r.source(), Source::Redis { key, .. } if key == "frames"));
    }

    #[test]
    fn refuses_other_forms_naming_the_accepted_ones() {
        for bad in [
            "ftp://x/y.m3u8",
            "file://host/etc/passwd",
            "rtsp:///no-host",
            "has space",
            "",
            "redis://host:1/",
            "redis://h/a/b/c",
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.param, "stream_ref", "{bad}");
        }
        assert!(parse("ftp://x").unwrap_err().message.contains("http(s)://"));
        assert!(parse(&"a".repeat(2049)).is_err());
    }

    #[test]
    fn fps_bounds() {
        assert!(Fps::parse(0.1).is_ok());
        assert!(Fps::parse(60.0).is_ok());
        assert!(Fps::parse(0.09).is_err());
        assert!(Fps::parse(60.5).is_err());
        assert!(Fps::parse(f64::NAN).is_err());
    }

    #[test]
    fn job_ids_and_prompts() {
        assert!(JobId::parse("cam-1.front_2").is_ok());
        assert!(JobId::parse("../etc").is_err());
        assert!(JobId::parse(&"x".repeat(129)).is_err());
        assert!(PromptText::parse("  ", 10).is_err());
        assert!(PromptText::parse("hello", 4).is_err());
        assert!(PromptText::parse("hello", 5).is_ok());
    }
}
