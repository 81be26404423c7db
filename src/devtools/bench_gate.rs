//! `free-roam dev bench-gate`: what change gating saves and costs, in two parts.
//!
//! 1. **The threshold** (a part's figure, the gate alone): 1280x720 clips made with the
//!    ffmpeg CLI (a still textured scene under flickering light, with sensor noise and heavy
//!    compression, at two strengths; a person-sized figure walking in; a small far-away one)
//!    are decoded by the service's own decoder with a gate that never lets anything through,
//!    so every sample's score is its change against the first picture. The still clips'
//!    highest score is what noise, flicker and artefacts reach; the figures' scores are what
//!    an event reaches. The default threshold must sit between them. Also the gate's CPU per
//!    sample (thumbnail and comparison) on a decoded 720p picture.
//! 2. **The whole service** (the release binary as a child process, the stand-in model server,
//!    an HLS origin on loopback): a generated minute of a still scene with two short events
//!    (a figure walking in, staying, walking out), read at 2 fps once without and once with
//!    `gate: {mode: "change"}`: model calls per minute each way, whether each event's first
//!    sample was answered by the model, and the service's CPU for each run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use super::bench_service::{Rig, Service};
use crate::media::decode::{DecodeLimits, DecodeState, Sampled, SegmentBytes, SegmentDecoder};
use crate::media::gate::{GateSpec, DEFAULT_THRESHOLD};
use crate::media::sampler::Sampler;
use crate::media::shape::{Shaper, Source};
use crate::media::{Encoding, FrameSize, FrameSpec};

/// A dark figure drawn into the scene: its size, where it is (`x` an ffmpeg expression of
/// `t`) and when it shows.
struct Figure {
    w: u32,
    h: u32,
    x: String,
    y: u32,
    enable: String,
}

/// A clip of the threshold table: its name, what it shows, its light, noise, compression and
/// figure.
struct Case {
    name: &'static str,
    what: &'static str,
    flicker: f64,
    noise: u32,
    crf: u32,
    figure: Option<Figure>,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "still",
            what: "still scene, light flickering ±3%, sensor noise (σ≈10), x264 CRF 32",
            flicker: 0.03,
            noise: 10,
            crf: 32,
            figure: None,
        },
        Case {
            name: "still-harsh",
            what: "still scene, brightness swinging ±8% (±20 levels), sensor noise (σ≈20), x264 CRF 40",
            flicker: 0.08,
            noise: 20,
            crf: 40,
            figure: None,
        },
        Case {
            name: "person",
            what: "a person-sized figure (100x260, 2.8% of the picture) walks in from the left at 4 s",
            flicker: 0.03,
            noise: 10,
            crf: 32,
            figure: Some(Figure {
                w: 100,
                h: 260,
                x: "-100+(t-4)*200".into(),
                y: 300,
                enable: "gte(t,4)".into(),
            }),
        },
        Case {
            name: "far",
            what: "a far figure (40x100, 0.43% of the picture) appears mid-picture at 4 s",
            flicker: 0.03,
            noise: 10,
            crf: 32,
            figure: Some(Figure {
                w: 40,
                h: 100,
                x: "620".into(),
                y: 380,
                enable: "gte(t,4)".into(),
            }),
        },
    ]
}

const SIZE: (u32, u32) = (1280, 720);

/// The still scene's filter graph (`seconds` long, 30 fps) with `figures` drawn in it.
fn scene_filter(seconds: f64, flicker: f64, noise: u32, figures: &[Figure]) -> String {
    let (w, h) = SIZE;
    let mut graph = format!(
        "color=c=gray:s={w}x{h}:r=30:d={seconds},\
         geq=lum='128+50*sin(X/37)*cos(Y/29)+20*sin(X/7)':cb=128:cr=128[s0]"
    );
    for (i, f) in figures.iter().enumerate() {
        graph.push_str(&format!(
            ";color=c=0x383838:s={}x{}:r=30:d={seconds}[f{i}];\
             [s{i}][f{i}]overlay=x='{}':y={}:eval=frame:enable='{}'[s{}]",
            f.w,
            f.h,
            f.x,
            f.y,
            f.enable,
            i + 1
        ));
    }
    graph.push_str(&format!(
        ";[s{}]eq=brightness='{flicker}*sin(2*PI*t/4)':eval=frame,noise=alls={noise}:allf=t,format=yuv420p",
        figures.len()
    ));
    graph
}

/// An MPEG-TS HLS rendition of `filter` in `dir` (2 s segments), made once.
fn make_hls(dir: &Path, filter: &str, crf: u32) -> anyhow::Result<Vec<(PathBuf, f64)>> {
    std::fs::create_dir_all(dir)?;
    let playlist = dir.join("index.m3u8");
    if !playlist.exists() {
        let status = Command::new("ffmpeg")
            .current_dir(dir)
            .args([
                "-hide_banner",
                "-loglevel",
                "error",
                "-y",
                "-f",
                "lavfi",
                "-i",
            ])
            .arg(filter)
            .args([
                "-c:v",
                "libx264",
                "-preset",
                "veryfast",
                "-crf",
                &crf.to_string(),
            ])
            .args(["-g", "60", "-keyint_min", "60", "-sc_threshold", "0"])
            .args(["-f", "hls", "-hls_time", "2", "-hls_playlist_type", "vod"])
            .args(["-hls_segment_filename", "seg%03d.ts", "index.m3u8"])
            .status()
            .context("running the ffmpeg CLI")?;
        if !status.success() {
            bail!("ffmpeg could not make {}", dir.display());
        }
    }
    super::playlist_segments(dir)
}

/// Every 2 fps sample's score against the clip's first picture: (pts_ms, share changed).
fn scores(segments: &[(PathBuf, f64)]) -> anyhow::Result<Vec<(i64, f64)>> {
    let limits = DecodeLimits {
        max_frame_pixels: 1 << 26,
        deadline: Duration::from_secs(60),
        fast: false,
    };
    let spec = FrameSpec {
        size: FrameSize::LongestSide(768),
        encoding: Encoding::Jpeg { quality: 85 },
    };
    let mut decoder = SegmentDecoder::new(limits, spec);
    let mut state = DecodeState::default();
    // A gate that lets nothing through after the first picture: each score is against it.
    let mut sampler = Sampler::new(2.0).with_gate(GateSpec {
        threshold: 1.0 + f64::EPSILON,
        max_interval_s: 1e9,
    });
    let mut out = Vec::new();
    for (path, ms) in segments {
        let segment = SegmentBytes {
            bytes: std::fs::read(path)?,
            duration_ms: *ms,
            discontinuity: false,
        };
        for s in decoder.decode(segment, &mut state, &mut sampler)?.frames {
            match s {
                Sampled::Frame { frame, .. } => out.push((frame.pts_ms, 0.0)),
                Sampled::Unchanged { pts_ms, score, .. } => out.push((pts_ms, score)),
                Sampled::Unusable(u) => bail!("sample at {} ms unusable: {}", u.pts_ms, u.why),
            }
        }
    }
    Ok(out)
}

/// The gate's own CPU per sample on a decoded 720p picture: thumbnail and comparison.
fn gate_cost() -> anyhow::Result<f64> {
    use ffmpeg_next::format::Pixel;
    use ffmpeg_next::frame;
    crate::media::decode::init();
    let mut picture = frame::Video::new(Pixel::YUV420P, SIZE.0, SIZE.1);
    for plane in 0..3 {
        for (i, b) in picture.data_mut(plane).iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
    }
    let mut shaper = Shaper::new(FrameSpec {
        size: FrameSize::AsDecoded,
        encoding: Encoding::Rgb,
    });
    let mut gate = crate::media::gate::Gate::new(GateSpec {
        threshold: DEFAULT_THRESHOLD,
        max_interval_s: 30.0,
    });
    let rounds = 2000;
    let started = crate::devtools::cpu(libc::RUSAGE_SELF);
    for i in 0..rounds {
        let thumb = shaper
            .thumbnail(&Source::video(&picture))
            .map_err(anyhow::Error::msg)?;
        std::hint::black_box(gate.judge(thumb, i * 500));
    }
    let spent = crate::devtools::cpu(libc::RUSAGE_SELF) - started;
    Ok(spent.as_secs_f64() * 1e6 / rounds as f64)
}

/// Serves the files of one directory (the minute's HLS rendition).
async fn file(
    State(dir): State<Arc<PathBuf>>,
    UrlPath(name): UrlPath<String>,
) -> impl IntoResponse {
    if name.contains('/') || name.contains("..") {
        return StatusCode::NOT_FOUND.into_response();
    }
    match tokio::fs::read(dir.join(&name)).await {
        Ok(bytes) => bytes.into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The events of the generated minute: (first second the figure shows, last second).
const EVENTS: [(f64, f64); 2] = [(15.0, 21.0), (40.0, 45.0)];

/// One job over the minute: (results, model requests, service CPU seconds).
async fn whole_run(
    service: &Service,
    rig: &Rig,
    url: &str,
    gate: bool,
) -> anyhow::Result<(Vec<Value>, u64, f64)> {
    let mut body = json!({"stream_ref": url, "fps": 2.0});
    if gate {
        body["gate"] = json!({"mode": "change"});
    }
    let asked_before = rig.model_requests();
    let cpu_before = service.cpu()?;
    let job = service.start_job_with(&body).await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let st = service.status(&job).await?;
        match st["status"].as_str() {
            Some("completed") => break,
            Some("failed" | "cancelled") => bail!("the job ended: {st}"),
            _ if Instant::now() > deadline => bail!("the job did not finish: {st}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let cpu = (service.cpu()? - cpu_before).as_secs_f64();
    Ok((
        service.results(&job).await?,
        rig.model_requests() - asked_before,
        cpu,
    ))
}

pub async fn bench_gate(dir: &Path) -> anyhow::Result<String> {
    let mut md = format!(
        "### Change gating: the threshold (a part's figure: the gate alone)\n\n\
         Each 1280x720 clip made with the ffmpeg CLI is decoded by `SegmentDecoder` at 2 fps; \
         every sample's score is the share of its 64x36 thumbnail's cells that differ by more \
         than 12 grey levels from the first picture's after brightness matching. Default \
         threshold: {DEFAULT_THRESHOLD}.\n\n\
         | clip | what it shows | highest score while nothing happens | first score with the figure in view | lowest score with it in view |\n\
         | --- | --- | --- | --- | --- |\n"
    );
    for case in cases() {
        let filter = scene_filter(12.0, case.flicker, case.noise, case.figure.as_slice());
        let segments = make_hls(&dir.join(format!("gate-{}", case.name)), &filter, case.crf)?;
        let scores = scores(&segments)?;
        let quiet = scores
            .iter()
            .filter(|(t, _)| case.figure.is_none() || *t < 4000)
            .map(|s| s.1)
            .fold(0.0, f64::max);
        let (first, full) = match case.figure {
            None => ("–".to_owned(), "–".to_owned()),
            Some(_) => {
                let event: Vec<f64> = scores
                    .iter()
                    .filter(|(t, _)| *t >= 4000)
                    .map(|s| s.1)
                    .collect();
                let seen: Vec<f64> = event.into_iter().filter(|s| *s > 0.0).collect();
                let first = seen.first().copied().unwrap_or(0.0);
                let lowest = seen.iter().copied().fold(f64::INFINITY, f64::min);
                (format!("{first:.4}"), format!("{lowest:.4}"))
            }
        };
        md.push_str(&format!(
            "| {} | {} | {quiet:.4} | {first} | {full} |\n",
            case.name, case.what
        ));
    }
    md.push_str(&format!(
        "\nThe gate's own CPU per sample on a decoded 1280x720 picture (swscale area thumbnail \
         and comparison): {:.0} µs.\n",
        gate_cost()?
    ));

    // The whole service.
    let minute = dir.join("gate-minute");
    // Walks in from the left for 2 s, stands, walks back out in the last 2 s.
    let walk = |(from, to): (f64, f64)| Figure {
        w: 100,
        h: 260,
        x: format!(
            "if(lt(t,{from}+2),-100+(t-{from})*350,if(gt(t,{to}-2),600+({to}-2-t)*350,600))"
        ),
        y: 300,
        enable: format!("between(t,{from},{to})"),
    };
    let figures = [walk(EVENTS[0]), walk(EVENTS[1])];
    make_hls(&minute, &scene_filter(60.0, 0.03, 10, &figures), 32)?;
    let origin = super::bench_service::serve(
        Router::new()
            .route("/minute/{name}", get(file))
            .with_state(Arc::new(minute.clone())),
    )
    .await?;
    let rig = Rig::start(dir).await?;
    let service = Service::start_with(dir, rig.model_addr, 4, &[]).await?;
    let url = format!("http://{origin}/minute/index.m3u8");
    md.push_str(
        "\n### Change gating: the whole service\n\n\
         The release binary (`free-roam dev bench-gate`) reads a generated minute of a still \
         1280x720 scene (flicker ±3%, sensor noise, CRF 32) in which a person-sized figure \
         walks in, stays and walks out twice (15-21 s, 40-45 s), at 2 fps, from an HLS origin \
         on loopback, asking the stand-in model server; once without a gate and once with \
         `gate: {mode: \"change\"}` (defaults).\n\n\
         | run | results | model calls per minute | events answered at their first sample (event start → first answer) | service CPU |\n\
         | --- | --- | --- | --- | --- |\n",
    );
    let mut calls = Vec::new();
    let mut asked_at = String::new();
    for gate in [false, true] {
        let (results, asked, cpu) = whole_run(&service, &rig, &url, gate).await?;
        let answered: Vec<i64> = results
            .iter()
            .filter(|r| r.get("repeats_seq").is_none())
            .filter_map(|r| r["pts_ms"].as_i64())
            .collect();
        // Each event's first sample: the first one after the figure starts walking in
        // (samples land on the 2 fps grid, a few frames late where B-frames are skipped).
        let firsts: Vec<i64> = EVENTS
            .iter()
            .filter_map(|(from, _)| {
                results
                    .iter()
                    .filter_map(|r| r["pts_ms"].as_i64())
                    .find(|&t| t as f64 > from * 1000.0)
            })
            .collect();
        let on_time = firsts.iter().filter(|t| answered.contains(t)).count();
        let delays: Vec<String> = EVENTS
            .iter()
            .map(|(from, _)| {
                let start = from * 1000.0;
                answered
                    .iter()
                    .find(|&&t| t as f64 > start)
                    .map_or("never".into(), |t| format!("{:.0} ms", *t as f64 - start))
            })
            .collect();
        calls.push(asked);
        if gate {
            asked_at = answered
                .iter()
                .map(|t| format!("{:.1}", *t as f64 / 1000.0))
                .collect::<Vec<_>>()
                .join(", ");
        }
        md.push_str(&format!(
            "| {} | {} | {asked} | {on_time} of {} ({}) | {cpu:.2} s |\n",
            if gate { "gated" } else { "every sample" },
            results.len(),
            EVENTS.len(),
            delays.join(", "),
        ));
    }
    md.push_str(&format!(
        "\nModel calls with the gate: {:.1}x fewer. The gated run asked about the samples at \
         (s): {asked_at}.\n",
        calls[0] as f64 / calls[1].max(1) as f64
    ));
    Ok(md)
}
