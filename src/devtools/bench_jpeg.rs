//! `free-roam dev bench-jpeg`: a part's figure. The JPEG encoders the service could use, side
//! by side on the same decoded 1280x720 picture, at full size and at the default
//! FRAME_MAX_SIDE (768x432): time per frame, bytes, and PSNR of the decoded JPEG against the
//! RGB the source stands for, so they are compared at equal quality. The service uses the
//! fastest (libjpeg-turbo from YUV planes); this is how that was chosen.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use ffmpeg::format::Pixel;
use ffmpeg::{codec, frame, Packet};
use ffmpeg_next as ffmpeg;

use crate::media::jpeg::{JpegEncoder, Yuv420};
use crate::media::shape::{Shaper, Source};
use crate::media::{Encoding, FrameSize, FrameSpec, Picture};

const ROUNDS: usize = 40;

/// One frame of ffmpeg's `testsrc2` at `w`x`h` as a decoder would hold it (full-range 4:2:0
/// planes), and the same picture as packed RGB (what every encoder is scored against).
fn picture(w: u32, h: u32) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let raw = |pix_fmt: &str| -> anyhow::Result<Vec<u8>> {
        let out = Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-f", "lavfi"])
            .args(["-i", &format!("testsrc2=s={w}x{h}:r=1:d=1,format=yuvj420p")])
            .args(["-frames:v", "1", "-pix_fmt", pix_fmt, "-f", "rawvideo", "-"])
            .output()
            .context("the ffmpeg CLI makes the test picture")?;
        if !out.status.success() {
            bail!("ffmpeg failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(out.stdout)
    };
    Ok((raw("rgb24")?, raw("yuvj420p")?))
}

/// Luma PSNR of a JPEG against the source's luma plane: every candidate stores JFIF YCbCr,
/// so their luma is compared as stored, without any decoder's chroma upsampling in the way.
fn psnr(luma: &[u8], jpeg: &[u8]) -> anyhow::Result<f64> {
    let yuv = turbojpeg::decompress_to_yuv(jpeg)?;
    let w = yuv.width;
    let stride = w.next_multiple_of(yuv.align);
    if luma.len() != w * yuv.height {
        bail!("decoded size differs");
    }
    let mut sum = 0.0;
    for y in 0..yuv.height {
        for x in 0..w {
            let d = f64::from(luma[y * w + x]) - f64::from(yuv.pixels[y * stride + x]);
            sum += d * d;
        }
    }
    let mse = sum / luma.len() as f64;
    Ok(10.0 * (255.0f64 * 255.0 / mse.max(1e-9)).log10())
}

struct Row {
    what: String,
    ms: f64,
    bytes: usize,
    psnr: f64,
}

fn timed(
    what: String,
    luma: &[u8],
    mut encode: impl FnMut() -> anyhow::Result<Vec<u8>>,
) -> anyhow::Result<Row> {
    let jpeg = encode()?;
    let started = Instant::now();
    for _ in 0..ROUNDS {
        encode()?;
    }
    Ok(Row {
        what,
        ms: started.elapsed().as_secs_f64() * 1000.0 / ROUNDS as f64,
        bytes: jpeg.len(),
        psnr: psnr(luma, &jpeg)?,
    })
}

/// A full-range 4:2:0 video frame holding tightly packed planes `yuv`.
fn yuv_frame(yuv: &[u8], w: u32, h: u32) -> frame::Video {
    let mut f = frame::Video::new(Pixel::YUVJ420P, w, h);
    let (wu, hu) = (w as usize, h as usize);
    let (cw, ch) = (wu.div_ceil(2), hu.div_ceil(2));
    let planes = [
        (0, wu, hu, 0),
        (1, cw, ch, wu * hu),
        (2, cw, ch, wu * hu + cw * ch),
    ];
    for (i, pw, ph, off) in planes {
        let stride = f.stride(i);
        let data = f.data_mut(i);
        for y in 0..ph {
            data[y * stride..y * stride + pw]
                .copy_from_slice(&yuv[off + y * pw..off + (y + 1) * pw]);
        }
    }
    f
}

fn mjpeg(yuv: &[u8], w: u32, h: u32, qscale: i32) -> anyhow::Result<Vec<u8>> {
    let codec = ffmpeg::encoder::find(codec::Id::MJPEG).context("no MJPEG encoder")?;
    let mut ctx = codec::context::Context::new_with_codec(codec)
        .encoder()
        .video()?;
    ctx.set_width(w);
    ctx.set_height(h);
    ctx.set_format(Pixel::YUVJ420P);
    ctx.set_time_base((1, 25));
    ctx.set_flags(codec::Flags::QSCALE);
    ctx.set_global_quality(qscale * ffmpeg::ffi::FF_QP2LAMBDA);
    let mut enc = ctx.open_as(codec)?;
    let mut f = yuv_frame(yuv, w, h);
    f.set_pts(Some(0));
    // MJPEG takes its quantiser from the frame (as the CLI's -q:v sets it).
    // SAFETY: a plain field of the frame we own.
    unsafe { (*f.as_mut_ptr()).quality = qscale * ffmpeg::ffi::FF_QP2LAMBDA };
    enc.send_frame(&f)?;
    enc.send_eof()?;
    let mut pkt = Packet::empty();
    enc.receive_packet(&mut pkt)?;
    Ok(pkt.data().unwrap_or_default().to_vec())
}

pub fn bench_jpeg() -> anyhow::Result<String> {
    crate::media::decode::init();
    let mut md = format!(
        "A part's figure: encoders alone on one 1280x720 `testsrc2` picture, {ROUNDS} rounds each, 1 thread; luma PSNR of each JPEG against the picture's own luma plane.\n\n| size | encoder | ms per frame | bytes | luma PSNR |\n| --- | --- | --- | --- | --- |\n"
    );
    for (w, h) in [(1280u32, 720u32), (768, 432)] {
        let (rgb, yuv) = picture(w, h)?;
        let (wu, hu) = (w as usize, h as usize);
        let (cw, ch) = (wu.div_ceil(2), hu.div_ceil(2));
        let luma = &yuv[..wu * hu];
        let mut rows = Vec::new();
        rows.push(timed("`image` 0.25 (pure Rust), q85".into(), luma, || {
            let mut out = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85).encode(
                &rgb,
                w,
                h,
                image::ExtendedColorType::Rgb8,
            )?;
            Ok(out)
        })?);
        let mut tj = turbojpeg::Compressor::new()?;
        tj.set_quality(85);
        tj.set_subsamp(turbojpeg::Subsamp::Sub2x2);
        rows.push(timed(
            "libjpeg-turbo 2.1, q85, from packed RGB".into(),
            luma,
            || {
                Ok(tj.compress_to_vec(turbojpeg::Image {
                    pixels: rgb.as_slice(),
                    width: wu,
                    pitch: wu * 3,
                    height: hu,
                    format: turbojpeg::PixelFormat::RGB,
                })?)
            },
        )?);
        let mut planes = JpegEncoder::new(85).map_err(anyhow::Error::msg)?;
        rows.push(timed(
            "libjpeg-turbo 2.1, q85, from 4:2:0 planes (**used**)".into(),
            luma,
            || {
                planes
                    .encode(&Yuv420 {
                        width: wu,
                        height: hu,
                        planes: [
                            &yuv[..wu * hu],
                            &yuv[wu * hu..wu * hu + cw * ch],
                            &yuv[wu * hu + cw * ch..],
                        ],
                        strides: [wu, cw, cw],
                    })
                    .map_err(anyhow::Error::msg)
            },
        )?);
        // libavcodec's MJPEG at the qscale whose quality is closest to the others'.
        for q in [2, 3, 4] {
            rows.push(timed(
                format!("libavcodec MJPEG (FFmpeg 5.1), qscale {q}, from 4:2:0 planes"),
                luma,
                || mjpeg(&yuv, w, h, q),
            )?);
        }
        for r in rows {
            md.push_str(&format!(
                "| {w}x{h} | {} | {:.2} | {} | {:.1} dB |\n",
                r.what, r.ms, r.bytes, r.psnr
            ));
        }
    }
    // What the pipeline adds before the encoder: swscale from the decoder's limited-range
    // 4:2:0 at 1280x720 to full-range 4:2:0 at 768x432.
    let (_, yuv) = picture(1280, 720)?;
    let mut shaper = Shaper::new(FrameSpec {
        size: FrameSize::LongestSide(768),
        encoding: Encoding::Jpeg { quality: 85 },
    });
    let f = yuv_frame(&yuv, 1280, 720);
    let started = Instant::now();
    let mut bytes = 0;
    for _ in 0..ROUNDS {
        let out = shaper
            .shape(&Source::video(&f), 0)
            .map_err(anyhow::Error::msg)?;
        if let Picture::Jpeg(j) = out.picture {
            bytes = j.len();
        }
    }
    md.push_str(&format!(
        "\nThe pipeline's whole shaping step (swscale 1280x720 → 768x432 bilinear, then libjpeg-turbo from the planes): {:.2} ms per frame, {bytes} bytes.\n",
        started.elapsed().as_secs_f64() * 1000.0 / ROUNDS as f64
    ));
    Ok(md)
}
