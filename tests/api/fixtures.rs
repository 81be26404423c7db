//! Things outside the product, as real servers on 127.0.0.1: an HLS origin serving media the
//! tests make with the ffmpeg CLI, and an OpenAI-compatible model server that reports what it
//! received. Video brightness encodes media time, so a test can check which frame the model
//! saw against the result's `pts_ms`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use serde_json::{json, Value};

/// Brightness ramp of the test videos: luma = 16 + 30 * t (t in seconds), valid for 7 s.
pub const LUMA_PER_SECOND: f64 = 30.0;

/// Media time (ms) a test frame's mean RGB brightness stands for.
pub fn brightness_to_ms(brightness: f64) -> f64 {
    // Limited-range luma to full-range RGB: (Y - 16) * 255 / 219.
    brightness * 219.0 / 255.0 / LUMA_PER_SECOND * 1000.0
}

/// The model saw, for each result, the frame at that result's `pts_ms` (within `tolerance_ms`):
/// the fake model server answers with the brightness of the JPEG it received.
pub fn assert_right_frames(results: &[Value], tolerance_ms: f64) {
    for r in results {
        let answer: Value = serde_json::from_str(r["output"].as_str().expect("an output")).unwrap();
        let seen_ms = brightness_to_ms(answer["brightness"].as_f64().unwrap());
        let pts = r["pts_ms"].as_f64().unwrap();
        assert!(
            (seen_ms - pts).abs() <= tolerance_ms,
            "result {} at {pts} ms shows the frame of {seen_ms:.0} ms",
            r["seq"]
        );
    }
}

/// The `pts_ms` of each result, in order.
pub fn pts_of(results: &[Value]) -> Vec<i64> {
    results
        .iter()
        .map(|r| r["pts_ms"].as_i64().expect("pts_ms"))
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    Ts,
    Fmp4,
    /// MPEG-TS from an open-GOP encode: keyframes are non-IDR I-frames with leading B-frames,
    /// and the parameter sets (SPS/PPS) are only in the first segment.
    TsOpenGop,
}

/// Makes an HLS VOD rendition under `dir/name/`: `index.m3u8` and its segments.
pub fn make_hls(
    dir: &Path,
    name: &str,
    seconds: f64,
    width: u32,
    height: u32,
    container: Container,
    segment_s: f64,
) -> PathBuf {
    make_hls_as(
        dir, name, seconds, width, height, container, segment_s, "yuv420p",
    )
}

/// [`make_hls`] in another pixel format (`yuv444p`, `yuv420p10le`, `yuvj420p`...): the same
/// brightness ramp, converted to full range for the `yuvj` formats so it shows the same.
#[allow(clippy::too_many_arguments)]
pub fn make_hls_as(
    dir: &Path,
    name: &str,
    seconds: f64,
    width: u32,
    height: u32,
    container: Container,
    segment_s: f64,
    pix_fmt: &str,
) -> PathBuf {
    make_hls_lit(
        dir,
        name,
        seconds,
        (width, height),
        container,
        segment_s,
        pix_fmt,
        &format!("16+T*{LUMA_PER_SECOND}"),
    )
}

/// A 160x90 MPEG-TS VOD (1 s segments) whose luma follows `schedule`: `(until_s, luma)`
/// steps, the last one lasting to the end.
pub fn make_hls_schedule(dir: &Path, name: &str, seconds: f64, schedule: &[(f64, u8)]) -> PathBuf {
    let (_, last) = schedule.last().expect("a schedule");
    let lum = schedule
        .iter()
        .rev()
        .skip(1)
        .fold(last.to_string(), |rest, (until, luma)| {
            format!("if(lt(T,{until}),{luma},{rest})")
        });
    make_hls_lit(
        dir,
        name,
        seconds,
        (160, 90),
        Container::Ts,
        1.0,
        "yuv420p",
        &lum,
    )
}

/// [`make_hls_as`] with luma given as an ffmpeg `geq` expression of `T` (seconds).
#[allow(clippy::too_many_arguments)]
fn make_hls_lit(
    dir: &Path,
    name: &str,
    seconds: f64,
    (width, height): (u32, u32),
    container: Container,
    segment_s: f64,
    pix_fmt: &str,
    lum: &str,
) -> PathBuf {
    let range = if pix_fmt.starts_with("yuvj") {
        "full"
    } else {
        "tv"
    };
    let filter = format!(
        "color=c=black:s={width}x{height}:r=30:d={seconds},geq=lum='{lum}':cb=128:cr=128,\
         format=yuv444p,scale=out_range={range},format={pix_fmt}"
    );
    make_hls_filtered(dir, name, &filter, pix_fmt, container, segment_s, &[])
}

/// An HLS VOD under `dir/name/` of what the lavfi `filter` graph draws, encoded as every
/// test clip is (plus `x264` arguments such as `-crf 35`).
pub fn make_hls_filtered(
    dir: &Path,
    name: &str,
    filter: &str,
    pix_fmt: &str,
    container: Container,
    segment_s: f64,
    x264: &[&str],
) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    let mut cmd = x264_from_lavfi(filter, pix_fmt);
    cmd.args(x264);
    cmd.current_dir(&out)
        .args(if container == Container::TsOpenGop {
            &["-x264-params", "open-gop=1"][..]
        } else {
            &[]
        })
        .args([
            "-force_key_frames",
            &format!("expr:gte(t,n_forced*{segment_s})"),
        ])
        .args([
            "-f",
            "hls",
            "-hls_time",
            &segment_s.to_string(),
            "-hls_playlist_type",
            "vod",
        ]);
    match container {
        Container::Ts | Container::TsOpenGop => {
            cmd.args(["-hls_segment_filename", "seg%d.ts"]);
        }
        Container::Fmp4 => {
            cmd.args([
                "-hls_segment_type",
                "fmp4",
                "-hls_fmp4_init_filename",
                "init.mp4",
                "-hls_segment_filename",
                "seg%d.m4s",
            ]);
        }
    }
    let status = cmd
        .arg("index.m3u8")
        .status()
        .expect("the ffmpeg CLI is installed (scripts/test installs it)");
    assert!(status.success(), "ffmpeg failed to make test media");
    out
}

/// The segments of a rendition's playlist: (duration, uri).
pub fn segments_of(playlist: &Path) -> (String, Vec<(f64, String)>) {
    let text = std::fs::read_to_string(playlist).unwrap();
    let mut header = String::new();
    let mut segs = Vec::new();
    let mut pending: Option<f64> = None;
    for line in text.lines() {
        if let Some(d) = line.strip_prefix("#EXTINF:") {
            pending = d
                .trim_end_matches(',')
                .split(',')
                .next()
                .and_then(|d| d.parse().ok());
        } else if line.starts_with("#EXT-X-ENDLIST") || line.starts_with("#EXT-X-PLAYLIST-TYPE") {
        } else if line.starts_with('#') {
            if segs.is_empty() && pending.is_none() {
                header.push_str(line);
                header.push('\n');
            }
        } else if let Some(d) = pending.take() {
            segs.push((d, line.to_owned()));
        }
    }
    (header, segs)
}

/// A live playlist made from a VOD's segments, revealing one more every `every`.
#[derive(Clone)]
pub struct Live {
    pub header: String,
    pub segments: Vec<(f64, String)>,
    pub initial: usize,
    pub every: Duration,
    /// Stop growing after this many segments (a stalled origin).
    pub stall_at: Option<usize>,
    /// Add EXT-X-ENDLIST once every segment is shown.
    pub end: bool,
    pub started: Instant,
}

impl Live {
    fn shown(&self) -> usize {
        let grown = self.initial
            + (self.started.elapsed().as_millis() / self.every.as_millis().max(1)) as usize;
        grown
            .min(self.stall_at.unwrap_or(usize::MAX))
            .min(self.segments.len())
    }

    fn render(&self, shown: usize) -> String {
        let mut s = self.header.clone();
        for (d, uri) in &self.segments[..shown] {
            s.push_str(&format!("#EXTINF:{d:.6},\n{uri}\n"));
        }
        if self.end && shown == self.segments.len() {
            s.push_str("#EXT-X-ENDLIST\n");
        }
        s
    }
}

#[derive(Clone)]
pub enum Route {
    Status(u16),
    Bytes(Vec<u8>),
    Live(Live),
}

#[derive(Default)]
struct OriginState {
    root: PathBuf,
    routes: Mutex<HashMap<String, Route>>,
    log: Mutex<Vec<(Instant, String)>>,
    /// `Range` headers of the requests for files, in order.
    ranges: Mutex<Vec<String>>,
    /// Each load of a live playlist: when it came and how many segments it listed.
    live_loads: Mutex<Vec<(Instant, usize)>>,
}

/// An HLS origin on 127.0.0.1 serving files under a folder, with routes overridden per path.
#[derive(Clone)]
pub struct Origin {
    pub base: String,
    state: Arc<OriginState>,
}

impl Origin {
    pub async fn start(root: &Path) -> Self {
        let state = Arc::new(OriginState {
            root: root.to_owned(),
            ..Default::default()
        });
        let app = Router::new().fallback(serve).with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { base, state }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }

    pub fn route(&self, path: &str, route: Route) {
        self.state
            .routes
            .lock()
            .unwrap()
            .insert(format!("/{}", path.trim_start_matches('/')), route);
    }

    /// Paths requested so far.
    pub fn requested(&self) -> Vec<String> {
        self.state
            .log
            .lock()
            .unwrap()
            .iter()
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// The `Range` headers file requests carried, in order.
    pub fn ranges(&self) -> Vec<String> {
        self.state.ranges.lock().unwrap().clone()
    }

    /// Each load of a live playlist (any path) in order: when it came, segments it listed.
    pub fn live_loads(&self) -> Vec<(Instant, usize)> {
        self.state.live_loads.lock().unwrap().clone()
    }

    /// Requests made after `t`.
    pub fn requests_since(&self, t: Instant) -> usize {
        self.state
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at > t)
            .count()
    }
}

async fn serve(State(state): State<Arc<OriginState>>, uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path().to_owned();
    state
        .log
        .lock()
        .unwrap()
        .push((Instant::now(), path.clone()));
    let route = state.routes.lock().unwrap().get(&path).cloned();
    match route {
        Some(Route::Status(code)) => StatusCode::from_u16(code).unwrap().into_response(),
        Some(Route::Bytes(b)) => Body::from(b).into_response(),
        Some(Route::Live(live)) => {
            let shown = live.shown();
            state
                .live_loads
                .lock()
                .unwrap()
                .push((Instant::now(), shown));
            (
                [("content-type", "application/vnd.apple.mpegurl")],
                live.render(shown),
            )
                .into_response()
        }
        None => match std::fs::read(state.root.join(path.trim_start_matches('/'))) {
            Ok(bytes) => match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
                Some(range) => {
                    state.ranges.lock().unwrap().push(range.to_owned());
                    partial(bytes, range)
                }
                None => Body::from(bytes).into_response(),
            },
            Err(_) => StatusCode::NOT_FOUND.into_response(),
        },
    }
}

/// A 206 answer to `Range: bytes=a-b` (or `a-`), as RFC 9110 words it; 416 past the end.
fn partial(bytes: Vec<u8>, range: &str) -> Response {
    let len = bytes.len() as u64;
    let parsed = range.strip_prefix("bytes=").and_then(|r| r.split_once('-'));
    let Some((start, end)) = parsed.and_then(|(a, b)| {
        let a: u64 = a.parse().ok()?;
        let b: u64 = if b.is_empty() {
            len.saturating_sub(1)
        } else {
            b.parse().ok()?
        };
        Some((a, b.min(len.saturating_sub(1))))
    }) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    if start >= len || start > end {
        return (
            StatusCode::RANGE_NOT_SATISFIABLE,
            [(header::CONTENT_RANGE, format!("bytes */{len}"))],
        )
            .into_response();
    }
    (
        StatusCode::PARTIAL_CONTENT,
        [(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"))],
        Body::from(bytes[start as usize..=end as usize].to_vec()),
    )
        .into_response()
}

/// ffmpeg encoding a lavfi `filter` graph with x264 as every test clip is: B-frames
/// (B-B-P), a keyframe every 30 frames and no scene-cut keyframes, so sampled frames land on
/// the same pictures in every container.
fn x264_from_lavfi(filter: &str, pix_fmt: &str) -> Command {
    let mut cmd = Command::new("ffmpeg");
    cmd.args([
        "-hide_banner",
        "-loglevel",
        "error",
        "-y",
        "-f",
        "lavfi",
        "-i",
        filter,
    ])
    .args([
        "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", pix_fmt, "-bf", "2",
    ])
    .args(["-g", "30", "-keyint_min", "30", "-sc_threshold", "0"]);
    cmd
}

/// A `seconds`-long 320x180 file of the brightness ramp at `dir/name`, its container chosen
/// by the extension (an MP4 keeps ffmpeg's default: its index, `moov`, at the end).
pub fn make_file(dir: &Path, name: &str, seconds: f64) -> PathBuf {
    make_file_in(dir, name, seconds, "libx264", 1.0)
}

/// [`make_file`] encoded with `encoder` (`libx264`, or `libx265`: HEVC with B-frames), a
/// keyframe every `key_every` seconds.
pub fn make_file_in(
    dir: &Path,
    name: &str,
    seconds: f64,
    encoder: &str,
    key_every: f64,
) -> PathBuf {
    let out = dir.join(name);
    let filter = format!(
        "color=c=black:s=320x180:r=30:d={seconds},geq=lum='16+T*{LUMA_PER_SECOND}':cb=128:cr=128,format=yuv420p"
    );
    let mut cmd = x264_from_lavfi(&filter, "yuv420p");
    if encoder == "libx265" {
        cmd.args([
            "-c:v",
            "libx265",
            "-x265-params",
            "log-level=error:keyint=30:min-keyint=30:scenecut=0:bframes=2:open-gop=0",
            "-forced-idr",
            "1",
        ]);
    }
    let status = cmd
        .args([
            "-force_key_frames",
            &format!("expr:gte(t,n_forced*{key_every})"),
        ])
        .args(["-g", &((key_every * 30.0) as u32).to_string()])
        .arg(&out)
        .status()
        .expect("the ffmpeg CLI is installed (scripts/test installs it)");
    assert!(status.success(), "ffmpeg failed to make {name}");
    out
}

/// What the model server was asked.
#[derive(Debug, Clone)]
pub struct Asked {
    pub model: String,
    pub prompt: String,
    pub width: u32,
    pub height: u32,
    /// The JPEG as it arrived.
    pub jpeg: Vec<u8>,
    /// The request's `response_format`, if any.
    pub response_format: Option<Value>,
    /// Every image of the request in order (several for a clip): its mean brightness.
    pub brightness: Vec<f64>,
    /// The text parts between the images (a clip's frame labels).
    pub labels: Vec<String>,
}

#[derive(Default)]
struct ModelState {
    asked: Mutex<Vec<Asked>>,
    /// Answer HTTP 500 to this many requests first.
    fail_first: Mutex<usize>,
    /// Prompts answered with HTTP 400.
    refuse_prompt: Mutex<Option<String>>,
    delay: Mutex<Duration>,
}

/// How the service words an alert question (the question, then this).
pub const YES_NO: &str = "\nAnswer with one word: yes or no.";

/// An OpenAI-compatible chat-completions server that answers with what it saw:
/// `{"prompt": ..., "brightness": ...}` as the message content; an alert question (one
/// ending in [`YES_NO`]) about brightness gets `Yes.` or `No` from the picture, any other
/// `I cannot tell`.
#[derive(Clone)]
pub struct ModelServer {
    pub base: String,
    state: Arc<ModelState>,
}

impl ModelServer {
    pub async fn start() -> Self {
        let state = Arc::new(ModelState::default());
        let app = Router::new()
            .route(
                "/v1/models",
                get(|| async { Json(json!({"object": "list", "data": [{"id": "test-model"}]})) }),
            )
            .route("/v1/chat/completions", post(complete))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/v1", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { base, state }
    }

    pub fn asked(&self) -> Vec<Asked> {
        self.state.asked.lock().unwrap().clone()
    }

    pub fn fail_first(&self, n: usize) {
        *self.state.fail_first.lock().unwrap() = n;
    }

    pub fn refuse_prompt(&self, prompt: &str) {
        *self.state.refuse_prompt.lock().unwrap() = Some(prompt.to_owned());
    }

    pub fn set_delay(&self, d: Duration) {
        *self.state.delay.lock().unwrap() = d;
    }

    /// Settings pointing the service at this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("MODEL_TYPE", "openai".to_owned()),
            ("OPENAI_BASE_URL", self.base.clone()),
            ("OPENAI_MODEL", "test-model".to_owned()),
            ("ALLOW_PRIVATE_NETWORKS", "true".to_owned()),
        ]
    }
}

async fn complete(State(state): State<Arc<ModelState>>, Json(body): Json<Value>) -> Response {
    let delay = *state.delay.lock().unwrap();
    tokio::time::sleep(delay).await;
    {
        let mut fail = state.fail_first.lock().unwrap();
        if *fail > 0 {
            *fail -= 1;
            return (StatusCode::INTERNAL_SERVER_ERROR, "overloaded").into_response();
        }
    }
    let content = &body["messages"][0]["content"];
    let prompt = content[0]["text"].as_str().unwrap_or_default().to_owned();
    if state.refuse_prompt.lock().unwrap().as_deref() == Some(prompt.as_str()) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"message": "prompt not allowed"}})),
        )
            .into_response();
    }
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for part in content.as_array().into_iter().flatten().skip(1) {
        match part["image_url"]["url"].as_str() {
            Some(url) => {
                let b64 = url
                    .strip_prefix("data:image/jpeg;base64,")
                    .expect("a JPEG data URI");
                let jpeg = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap();
                let img = image::load_from_memory(&jpeg)
                    .expect("a decodable JPEG")
                    .to_rgb8();
                images.push((jpeg, img));
            }
            None => labels.push(part["text"].as_str().unwrap_or_default().to_owned()),
        }
    }
    let mean = |img: &image::RgbImage| {
        let raw = img.as_raw();
        raw.iter().map(|&b| f64::from(b)).sum::<f64>() / raw.len() as f64
    };
    let all: Vec<f64> = images.iter().map(|(_, img)| mean(img)).collect();
    let (jpeg, img) = images.into_iter().next().expect("an image in the request");
    let brightness = all[0];
    state.asked.lock().unwrap().push(Asked {
        model: body["model"].as_str().unwrap_or_default().to_owned(),
        prompt: prompt.clone(),
        width: img.width(),
        height: img.height(),
        jpeg,
        response_format: body.get("response_format").cloned(),
        brightness: all.clone(),
        labels,
    });
    let answer = match prompt.strip_suffix(YES_NO) {
        // An alert question: answered from the picture when it asks about brightness, and
        // with something neither yes nor no otherwise.
        Some(question) if question.contains("bright") => {
            if brightness > 128.0 { "Yes." } else { "No" }.to_owned()
        }
        Some(_) => "I cannot tell".to_owned(),
        None if all.len() > 1 => {
            json!({"prompt": prompt, "brightness": brightness, "clip": all}).to_string()
        }
        None => json!({"prompt": prompt, "brightness": brightness}).to_string(),
    };
    Json(json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]}))
        .into_response()
}

/// A JPEG of a flat grey picture whose brightness stands for `t_ms`.
pub fn jpeg_at(t_ms: i64, width: u32, height: u32) -> Vec<u8> {
    let luma = 16.0 + LUMA_PER_SECOND * t_ms as f64 / 1000.0;
    let v = ((luma - 16.0) * 255.0 / 219.0).round().clamp(0.0, 255.0) as u8;
    let img = image::RgbImage::from_pixel(width, height, image::Rgb([v, v, v]));
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95)
        .encode(img.as_raw(), width, height, image::ExtendedColorType::Rgb8)
        .unwrap();
    out
}

/// An origin serving a `seconds`-long rendition (1 s segments) under `live/`: as VOD at
/// `live/index.m3u8`, and as a live playlist growing by one segment every `every` at
/// `live/live.m3u8`.
pub async fn live_origin(
    dir: &Path,
    seconds: f64,
    initial: usize,
    every: Duration,
    stall_at: Option<usize>,
    end: bool,
) -> Origin {
    let rendition = make_hls(dir, "live", seconds, 160, 90, Container::Ts, 1.0);
    let (header, segments) = segments_of(&rendition.join("index.m3u8"));
    assert_eq!(segments.len(), seconds as usize, "one segment per second");
    let origin = Origin::start(dir).await;
    let live = Live {
        header,
        segments,
        initial,
        every,
        stall_at,
        end,
        started: Instant::now(),
    };
    origin.route("live/live.m3u8", Route::Live(live));
    origin
}

/// A connection to the Redis the tests use (127.0.0.1:6379; scripts/test starts one).
pub async fn local_redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open("redis://127.0.0.1:6379")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("Redis on 127.0.0.1:6379 (scripts/test starts one)")
}

/// How many entries of `key` the consumer group `group` still holds unacknowledged, after
/// waiting up to 5 s for it to reach 0.
pub async fn pending_after_wait(
    c: &mut redis::aio::MultiplexedConnection,
    key: &str,
    group: &str,
) -> i64 {
    use redis::AsyncCommands;
    let mut pending = -1;
    for _ in 0..50 {
        let summary: redis::streams::StreamPendingReply = c.xpending(key, group).await.unwrap();
        pending = summary.count() as i64;
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pending
}
