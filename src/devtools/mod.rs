//! Developer tools behind `free-roam dev ...`: the benchmarks and the tiny-model maker.
//!
//! [`bench_service`] measures the service a user runs (the release binary, end to end) and
//! [`bench_push`] how fast its results are pushed (SSE, webhooks), [`bench_gate`] what change
//! gating saves (model calls, through the whole service) and where its threshold comes from;
//! the rest here measures parts: ingest alone, the in-process model alone.
//!
//! `free-roam dev bench-ingest` makes a 60 s 1280x720 30 fps H.264 HLS stream with the ffmpeg
//! CLI, then measures, in one run: the CPU time of the service's own decode-and-sample path
//! (`media::decode::SegmentDecoder` over every segment, as a pipeline runs it) at 2 fps;
//! the CPU time of the ffmpeg CLI doing the same sampling; and how many such streams decode
//! at once in real time on this machine. It prints Markdown for BENCHMARKS.md.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub mod bench_gate;
pub mod bench_jpeg;
pub mod bench_push;
pub mod bench_replicas;
pub mod bench_service;

use crate::media::decode::{DecodeLimits, DecodeState, SegmentBytes, SegmentDecoder};
use crate::media::sampler::Sampler;
use crate::media::{Encoding, FrameSize, FrameSpec};

/// What the OpenAI-compatible backend asks for by default (FRAME_MAX_SIDE, JPEG_QUALITY).
const DEFAULT_SPEC: FrameSpec = FrameSpec {
    size: FrameSize::LongestSide(768),
    encoding: Encoding::Jpeg { quality: 85 },
};

const SECONDS: u32 = 60;
const FPS: f64 = 2.0;
/// Runs of each single-stream measurement; the median is reported.
const ROUNDS: u32 = 5;

pub(crate) fn median(mut runs: Vec<Duration>) -> Duration {
    runs.sort_unstable();
    runs[runs.len() / 2]
}

/// CPU time (user + system) of this process, or of its waited-for children.
pub(crate) fn cpu(who: libc::c_int) -> Duration {
    // SAFETY: getrusage fills the struct it is given and reads nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut usage) };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

pub(crate) fn make_stream(dir: &Path) -> anyhow::Result<Vec<(PathBuf, f64)>> {
    let playlist = dir.join("index.m3u8");
    if !playlist.exists() {
        eprintln!(
            "making a {SECONDS} s 1280x720 30 fps H.264 HLS stream in {} ...",
            dir.display()
        );
        let status = Command::new("ffmpeg")
            .current_dir(dir)
            .args(["-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi"])
            .args(["-i", &format!("testsrc2=s=1280x720:r=30:d={SECONDS}")])
            .args([
                "-c:v",
                "libx264",
                "-preset",
                "veryfast",
                "-pix_fmt",
                "yuv420p",
                "-g",
                "60",
                "-sc_threshold",
                "0",
            ])
            .args([
                "-f",
                "hls",
                "-hls_time",
                "2",
                "-hls_playlist_type",
                "vod",
                "-hls_segment_filename",
                "seg%03d.ts",
                "index.m3u8",
            ])
            .status()
            .context("the ffmpeg CLI is needed to make the benchmark stream")?;
        if !status.success() {
            bail!("ffmpeg failed to make the benchmark stream");
        }
    }
    playlist_segments(dir)
}

/// The segments `dir/index.m3u8` lists: each file and its duration in ms.
pub(crate) fn playlist_segments(dir: &Path) -> anyhow::Result<Vec<(PathBuf, f64)>> {
    let text = std::fs::read_to_string(dir.join("index.m3u8"))?;
    let mut out = Vec::new();
    let mut duration = None;
    for line in text.lines() {
        if let Some(d) = line.strip_prefix("#EXTINF:") {
            duration = d.trim_end_matches(',').parse::<f64>().ok();
        } else if !line.starts_with('#') && !line.is_empty() {
            out.push((dir.join(line), duration.take().unwrap_or(2.0) * 1000.0));
        }
    }
    Ok(out)
}

/// Decodes and samples every segment once, as one job's pipeline does; returns frames kept.
/// The segments arrive owned, as the fetcher hands them over.
fn ingest(segments: Vec<(Vec<u8>, f64)>, fast: bool) -> anyhow::Result<Ingested> {
    let mut state = DecodeState::default();
    let mut sampler = Sampler::new(FPS);
    let mut decoder = SegmentDecoder::new(
        DecodeLimits {
            max_frame_pixels: 3840 * 2160,
            deadline: Duration::from_secs(30),
            fast,
        },
        DEFAULT_SPEC,
    );
    let mut done = Ingested::default();
    for (bytes, duration_ms) in segments {
        let segment = SegmentBytes {
            bytes,
            duration_ms,
            discontinuity: false,
        };
        let out = decoder.decode(segment, &mut state, &mut sampler)?;
        done.kept += out.frames.len();
        done.decoded += out.frames_decoded;
    }
    Ok(done)
}

#[derive(Default)]
struct Ingested {
    kept: usize,
    decoded: u64,
}

/// Runs the ingest benchmark; `measure_concurrency` adds the streams-at-once measurement.
pub fn bench_ingest(dir: &Path, measure_concurrency: bool) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)?;
    let files = make_stream(dir)?;
    let segments: Vec<(Vec<u8>, f64)> = files
        .iter()
        .map(|(p, d)| Ok((std::fs::read(p)?, *d)))
        .collect::<anyhow::Result<_>>()?;

    // Ours, on this thread: as configured by default, and with FAST_DECODE=true; then the
    // ffmpeg CLI doing the same sampling. Each is run ROUNDS times, interleaved, and the median
    // CPU time is reported (single runs vary by several percent on this machine).
    ingest(segments[..1].to_vec(), false)?; // warm caches
    let (mut ours, mut fast, mut cli) = (Vec::new(), Vec::new(), Vec::new());
    let mut done = Ingested::default();
    let mut ours_wall = Duration::ZERO;
    for _ in 0..ROUNDS {
        let owned = segments.clone();
        let before = cpu(libc::RUSAGE_SELF);
        let wall = Instant::now();
        done = ingest(owned, false)?;
        ours.push(cpu(libc::RUSAGE_SELF) - before);
        ours_wall += wall.elapsed() / ROUNDS;

        let owned = segments.clone();
        let before = cpu(libc::RUSAGE_SELF);
        ingest(owned, true)?;
        fast.push(cpu(libc::RUSAGE_SELF) - before);

        let before = cpu(libc::RUSAGE_CHILDREN);
        let status = Command::new("ffmpeg")
            .current_dir(dir)
            .args(["-hide_banner", "-loglevel", "error"])
            .args(["-threads", "1", "-i", "index.m3u8"])
            .args(["-vf", "fps=2", "-f", "rawvideo", "-pix_fmt", "rgb24"])
            .args(["-y", "/dev/null"])
            .status()?;
        if !status.success() {
            bail!("ffmpeg CLI run failed");
        }
        cli.push(cpu(libc::RUSAGE_CHILDREN) - before);
    }
    let (ours_cpu, fast_cpu, cli_cpu) = (median(ours), median(fast), median(cli));
    let kept = done.kept;

    // Streams at once: N threads each ingesting the whole stream; real time holds while all
    // N finish 60 s of media in under 60 s of wall time.
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut concurrency = Vec::new();
    let mut n = 8;
    while measure_concurrency && n < 1024 {
        let wall = Instant::now();
        let handles: Vec<_> = (0..n)
            .map(|_| {
                let segs = segments.clone();
                std::thread::spawn(move || ingest(segs, false).map(|_| ()))
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a benchmark thread panicked"))??;
        }
        let took = wall.elapsed();
        let realtime = took.as_secs_f64() / f64::from(SECONDS);
        eprintln!("{n} streams at once: {took:.1?} for {SECONDS} s of media each ({realtime:.2}x real time)");
        concurrency.push((n, took));
        if realtime > 1.0 || n >= 256 {
            break;
        }
        n = (n as f64 * 1.5).ceil() as usize;
    }
    let sustained = concurrency
        .iter()
        .filter(|(_, t)| t.as_secs_f64() < f64::from(SECONDS))
        .map(|(n, _)| *n)
        .max()
        .unwrap_or(0);

    let mut md = String::new();
    md.push_str(&format!(
        "Stream: {SECONDS} s, 1280x720, 30 fps, H.264 (x264 veryfast, GOP 2 s, B-frames), 2 s MPEG-TS segments; sampled at {FPS} fps; {cores} cores.\n\n"
    ));
    let decoded = done.decoded;
    let all = SECONDS * 30;
    md.push_str(&format!(
        "| path | CPU time (median of {ROUNDS}) | per second of media | frames decoded | frames kept |\n| --- | --- | --- | --- | --- |\n"
    ));
    let ms = |d: Duration| d.as_secs_f64() * 1000.0 / f64::from(SECONDS);
    md.push_str(&format!(
        "| free-roam ingest (SegmentDecoder, 1 thread) | {:.2} s | {:.1} ms | {decoded} | {kept} |\n",
        ours_cpu.as_secs_f64(),
        ms(ours_cpu)
    ));
    md.push_str(&format!(
        "| free-roam ingest with FAST_DECODE=true (no deblocking) | {:.2} s | {:.1} ms | {decoded} | {kept} |\n",
        fast_cpu.as_secs_f64(),
        ms(fast_cpu)
    ));
    md.push_str(&format!(
        "| `ffmpeg -threads 1 -i index.m3u8 -vf fps=2 -f rawvideo -pix_fmt rgb24 -y /dev/null` | {:.2} s | {:.1} ms | {all} | {} |\n\n",
        cli_cpu.as_secs_f64(),
        ms(cli_cpu),
        SECONDS as f64 * FPS
    ));
    md.push_str(&format!(
        "Ratio: free-roam uses **{:.2}x** the CLI's CPU per stream by default, **{:.2}x** with FAST_DECODE=true (wall time of our default run: {:.2} s).\n\n",
        ours_cpu.as_secs_f64() / cli_cpu.as_secs_f64().max(1e-9),
        fast_cpu.as_secs_f64() / cli_cpu.as_secs_f64().max(1e-9),
        ours_wall.as_secs_f64()
    ));
    if !measure_concurrency {
        return Ok(md);
    }
    md.push_str("| streams at once | wall time for 60 s of media each | real-time factor |\n| --- | --- | --- |\n");
    for (n, t) in &concurrency {
        md.push_str(&format!(
            "| {n} | {:.1} s | {:.2} |\n",
            t.as_secs_f64(),
            t.as_secs_f64() / f64::from(SECONDS)
        ));
    }
    md.push_str(&format!(
        "\nLargest count measured that keeps up with real time: **{sustained}** concurrent 720p30 streams at 2 fps.\n"
    ));
    Ok(md)
}

/// Frames per second of the in-process backend at batch sizes 1, 2, 4 and 8, and the time
/// the batcher adds per frame.
#[cfg(feature = "candle")]
pub async fn bench_model(dir: &Path) -> anyhow::Result<String> {
    use crate::batch::{Batcher, WhenFull};
    use crate::media::Frame;
    use crate::vlm::{Backend, InferRequest};
    use std::collections::HashMap;
    use std::sync::Arc;

    let mut env: HashMap<String, String> = HashMap::new();
    env.insert("MODEL_PATH".into(), dir.display().to_string());
    env.insert("DEVICE".into(), "cpu".into());
    let settings = crate::config::Settings::from_sources(None, None, env)?;
    let backend =
        crate::vlm::candle::CandleBackend::from_settings(&settings).map_err(anyhow::Error::msg)?;
    backend.check().await.map_err(anyhow::Error::msg)?;
    let model = backend.default_name().to_owned();
    // A 1280x720 picture shaped as the pipeline shapes it for this model.
    let spec = backend
        .frame_spec(&model)
        .await
        .map_err(anyhow::Error::msg)?;
    let rgb: Vec<u8> = (0..1280 * 720 * 3).map(|i| (i % 251) as u8).collect();
    let frame: Arc<Frame> = Arc::new(
        crate::media::shape::Shaper::new(spec)
            .shape(&crate::media::shape::Source::rgb(&rgb, 1280, 720), 0)
            .map_err(anyhow::Error::msg)?,
    );
    let mut md = format!(
        "Model: {} ({} max new tokens, greedy), CPU, {} cores.\n\n| batch size | frames/s | ms per batch | preprocess ms | inference ms | answer length (chars) |\n| --- | --- | --- | --- | --- | --- |\n",
        dir.display(),
        settings.max_new_tokens,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    for size in [1usize, 2, 4, 8] {
        let rounds = 5;
        let started = Instant::now();
        let (mut pre, mut inf, mut chars) = (0.0, 0.0, 0);
        for _ in 0..rounds {
            let batch: Vec<InferRequest> = (0..size)
                .map(|_| InferRequest {
                    frames: vec![frame.clone()],
                    prompt: "describe the scene".into(),
                    response_format: None,
                    stop: tokio_util::sync::CancellationToken::new(),
                })
                .collect();
            let out = backend.infer(&model, batch).await;
            if let Some(Err(e)) = out.iter().map(|o| o.output.clone()).find(|o| o.is_err()) {
                bail!("model failed: {e}");
            }
            pre += out[0].preprocess_ms;
            inf += out[0].inference_ms;
            // Shows how many decoding steps ran: the tiny model answers one letter per token.
            chars = out[0].output.as_ref().map_or(0, |a| a.chars().count());
        }
        let secs = started.elapsed().as_secs_f64();
        md.push_str(&format!(
            "| {size} | {:.1} | {:.0} | {:.1} | {:.1} | {chars} |\n",
            (size * rounds) as f64 / secs,
            secs * 1000.0 / rounds as f64,
            pre / rounds as f64,
            inf / rounds as f64
        ));
    }

    md.push_str(&shaping_cost(spec)?);

    // The batcher alone: full batches of 8, no waiting, 100 000 frames.
    let batcher = Batcher::<u64>::new();
    let lane = batcher.lane(2, 64, WhenFull::Block);
    let n = 100_000u64;
    let started = Instant::now();
    let mut taken = 0;
    for i in 0..n {
        lane.push(i).await;
        if lane.len() >= 8 {
            taken += batcher.next_batch(8, Duration::ZERO).await.len();
        }
    }
    let per_frame = started.elapsed().as_secs_f64() * 1e9 / n as f64;
    md.push_str(&format!(
        "\nBatcher overhead: {per_frame:.0} ns per frame (queue + batch cut, {taken} frames in full batches of 8), \
         excluding MAX_BATCH_WAIT_MS, which a partial batch waits by design.\n"
    ));
    Ok(md)
}

/// What the exact preprocessing costs per decoded 1280x720 frame: swscale to RGB at full
/// size then Pillow's bicubic (what the service does for an in-process model) against one
/// swscale bicubic pass that converts and scales at once (faster, not the reference's pixels).
#[cfg(feature = "candle")]
fn shaping_cost(spec: crate::media::FrameSpec) -> anyhow::Result<String> {
    use crate::media::shape::{Shaper, Source};
    use crate::media::FrameSize;
    use ffmpeg::ffi;
    use ffmpeg::software::scaling::{Context, Flags};
    use ffmpeg_next as ffmpeg;

    let FrameSize::Exact { width, height } = spec.size else {
        bail!("the model asks for no exact size");
    };
    let (w, h) = (1280usize, 720usize);
    let y: Vec<u8> = (0..w * h)
        .map(|i| ((i % w) * 255 / w) as u8 ^ ((i / w) % 7) as u8)
        .collect();
    let u: Vec<u8> = (0..w * h / 4).map(|i| (64 + i % 128) as u8).collect();
    let v: Vec<u8> = (0..w * h / 4).map(|i| (192 - i % 128) as u8).collect();
    let src = Source {
        format: ffmpeg::format::Pixel::YUV420P,
        width: w as u32,
        height: h as u32,
        planes: [&y, &u, &v, &[]],
        strides: [w, w / 2, w / 2, 0],
        colorspace: ffi::AVColorSpace::AVCOL_SPC_BT709,
        full_range: false,
    };
    let rounds = 50;
    let mut shaper = Shaper::new(spec);
    let started = Instant::now();
    for _ in 0..rounds {
        shaper.shape(&src, 0).map_err(anyhow::Error::msg)?;
    }
    let exact = started.elapsed().as_secs_f64() * 1000.0 / f64::from(rounds);

    let mut frame = ffmpeg::frame::Video::new(ffmpeg::format::Pixel::YUV420P, w as u32, h as u32);
    for (plane, data) in [&y, &u, &v].into_iter().enumerate() {
        let stride = frame.stride(plane);
        let row = if plane == 0 { w } else { w / 2 };
        for (r, chunk) in data.chunks(row).enumerate() {
            frame.data_mut(plane)[r * stride..r * stride + row].copy_from_slice(chunk);
        }
    }
    let mut one_pass = Context::get(
        ffmpeg::format::Pixel::YUV420P,
        w as u32,
        h as u32,
        ffmpeg::format::Pixel::RGB24,
        width,
        height,
        Flags::BICUBIC | Flags::ACCURATE_RND | Flags::FULL_CHR_H_INT,
    )?;
    let mut out = ffmpeg::frame::Video::empty();
    let started = Instant::now();
    for _ in 0..rounds {
        one_pass.run(&frame, &mut out)?;
    }
    let fast = started.elapsed().as_secs_f64() * 1000.0 / f64::from(rounds);
    Ok(format!(
        "\nShaping one decoded 1280x720 4:2:0 frame to {width}x{height} RGB (a part's figure): \
         {exact:.2} ms as the service does it (swscale to RGB, then Pillow's bicubic: the \
         reference's pixels), {fast:.2} ms in one swscale bicubic pass (up to 6 levels off on \
         detailed pictures).\n"
    ))
}
