//! Shapes a decoded picture into what the model backend asked for ([`FrameSpec`]), in the
//! thread that decoded it, from whatever the decoder gave (4:2:0, 4:2:2, 4:4:4, 10-bit, full
//! or limited range, odd sizes; or packed RGB from a still image):
//!
//! - JPEG for a remote model: one swscale pass scales and converts straight into full-range
//!   4:2:0 planes that libjpeg-turbo encodes without an RGB round trip. Bilinear, which
//!   swscale widens with the scale factor when reducing (filtered, not aliased).
//! - RGB for an in-process model: swscale converts at the picture's own size (no scaling),
//!   then [`super::resample`] resizes exactly as Pillow does, because that is what the
//!   model's reference processor does (tests/api/reference.rs holds it to that).
//!
//! The colour matrix follows the picture's own tag (BT.709, BT.601, BT.2020...; untagged is
//! BT.601, as ffmpeg assumes); JPEG output is JFIF's full-range BT.601.

use std::ptr;
use std::sync::{Mutex, PoisonError};

use ffmpeg::ffi;
use ffmpeg::format::Pixel;
use ffmpeg::frame;
use ffmpeg_next as ffmpeg;

use super::gate::{Gate, Thumb};
use super::jpeg::{JpegEncoder, Yuv420};
use super::resample;
use super::{Encoding, EvidenceSpec, Frame, FrameSize, FrameSpec, Picture};

/// A picture swscale can read: up to four planes with their strides.
pub struct Source<'a> {
    pub format: Pixel,
    pub width: u32,
    pub height: u32,
    pub planes: [&'a [u8]; 4],
    pub strides: [usize; 4],
    pub colorspace: ffi::AVColorSpace,
    pub full_range: bool,
}

impl<'a> Source<'a> {
    /// A decoded video frame.
    pub fn video(f: &'a frame::Video) -> Self {
        let n = f.planes().min(4);
        let mut planes: [&[u8]; 4] = [&[]; 4];
        let mut strides = [0usize; 4];
        for i in 0..n {
            planes[i] = f.data(i);
            strides[i] = f.stride(i);
        }
        // SAFETY: plain fields of the frame we borrow.
        let (colorspace, range) = unsafe {
            let p = &*f.as_ptr();
            (p.colorspace, p.color_range)
        };
        let format = f.format();
        Self {
            format,
            width: f.width(),
            height: f.height(),
            planes,
            strides,
            colorspace,
            full_range: range == ffi::AVColorRange::AVCOL_RANGE_JPEG
                || matches!(
                    format,
                    Pixel::YUVJ420P | Pixel::YUVJ422P | Pixel::YUVJ444P | Pixel::YUVJ440P
                ),
        }
    }

    /// Packed RGB24 rows (a decoded still image).
    pub fn rgb(rgb: &'a [u8], width: u32, height: u32) -> Self {
        Self {
            format: Pixel::RGB24,
            width,
            height,
            planes: [rgb, &[], &[], &[]],
            strides: [width as usize * 3, 0, 0, 0],
            colorspace: ffi::AVColorSpace::AVCOL_SPC_RGB,
            full_range: true,
        }
    }
}

/// The size `spec` asks for, for a `width`x`height` picture. Never upscales for a longest
/// side; keeps the aspect ratio (rounded, at least 1 pixel).
pub fn target_size(size: FrameSize, width: u32, height: u32) -> (u32, u32) {
    match size {
        FrameSize::AsDecoded => (width, height),
        FrameSize::Exact { width, height } => (width, height),
        FrameSize::LongestSide(n) => {
            let longest = width.max(height);
            if n == 0 || longest <= n {
                return (width, height);
            }
            let scale = f64::from(n) / f64::from(longest);
            let side = |v: u32| ((f64::from(v) * scale).round() as u32).clamp(1, n);
            (side(width), side(height))
        }
    }
}

#[derive(Debug, PartialEq, Clone, Copy)]
struct Key {
    src: Pixel,
    sw: u32,
    sh: u32,
    dst: Pixel,
    dw: u32,
    dh: u32,
    colorspace: ffi::AVColorSpace,
    full_range: bool,
}

/// An swscale context made for one [`Key`].
struct Sws {
    ctx: *mut ffi::SwsContext,
    key: Key,
}

// SAFETY: an SwsContext holds no thread-local state; the owning Shaper moves between blocking
// threads but is never shared.
unsafe impl Send for Sws {}

impl Drop for Sws {
    fn drop(&mut self) {
        // SAFETY: the context came from sws_getContext and is freed once.
        unsafe { ffi::sws_freeContext(self.ctx) };
    }
}

impl Sws {
    fn new(key: Key) -> Result<Self, String> {
        // RGB (an in-process model's input, converted at its own size and resized after):
        // accurate rounding and chroma interpolated to every pixel. A JPEG for a remote
        // model: bilinear, which swscale widens when reducing (filtered, not aliased).
        let param = [0.0f64, 0.5];
        let flags = if key.dst == Pixel::RGB24 {
            ffi::SWS_BICUBIC | ffi::SWS_ACCURATE_RND | ffi::SWS_FULL_CHR_H_INT
        } else if key.dst == Pixel::GRAY8 {
            // A change gate's thumbnail: each cell the mean of the pixels it covers.
            ffi::SWS_AREA
        } else {
            ffi::SWS_BILINEAR
        };
        // SAFETY: plain constructor; null means the conversion is not supported.
        let ctx = unsafe {
            ffi::sws_getContext(
                key.sw as i32,
                key.sh as i32,
                key.src.into(),
                key.dw as i32,
                key.dh as i32,
                key.dst.into(),
                flags,
                ptr::null_mut(),
                ptr::null_mut(),
                param.as_ptr(),
            )
        };
        if ctx.is_null() {
            return Err(format!(
                "cannot convert {:?} {}x{} to {:?} {}x{}",
                key.src, key.sw, key.sh, key.dst, key.dw, key.dh
            ));
        }
        let sws = Self { ctx, key };
        let matrix = match key.colorspace {
            ffi::AVColorSpace::AVCOL_SPC_BT709 => ffi::SWS_CS_ITU709,
            ffi::AVColorSpace::AVCOL_SPC_FCC => ffi::SWS_CS_FCC,
            ffi::AVColorSpace::AVCOL_SPC_SMPTE240M => ffi::SWS_CS_SMPTE240M,
            ffi::AVColorSpace::AVCOL_SPC_BT2020_NCL | ffi::AVColorSpace::AVCOL_SPC_BT2020_CL => {
                ffi::SWS_CS_BT2020
            }
            _ => ffi::SWS_CS_ITU601,
        };
        let yuv_out = key.dst != Pixel::RGB24;
        // SAFETY: the tables are static inside libswscale; the context is ours.
        unsafe {
            ffi::sws_setColorspaceDetails(
                sws.ctx,
                ffi::sws_getCoefficients(matrix),
                i32::from(key.full_range),
                ffi::sws_getCoefficients(ffi::SWS_CS_ITU601),
                i32::from(yuv_out),
                0,
                1 << 16,
                1 << 16,
            );
        }
        Ok(sws)
    }
}

/// Reusable planes of the picture being produced, with 32-byte aligned rows.
#[derive(Default)]
struct Planes {
    data: [Vec<u8>; 3],
    strides: [usize; 3],
}

impl Planes {
    fn fit(&mut self, sizes: [(usize, usize); 3]) {
        for (i, (row, rows)) in sizes.into_iter().enumerate() {
            let stride = row.next_multiple_of(32);
            self.strides[i] = stride;
            // Room for swscale's vectorised writes past the last row's end.
            self.data[i].resize(stride * rows + 64, 0);
        }
    }
}

/// Turns decoded pictures into [`Frame`]s as a [`FrameSpec`] says. One per job; it borrows a
/// [`Workspace`] while it shapes and gives it back with [`Shaper::release`].
pub struct Shaper {
    spec: FrameSpec,
    work: Option<Workspace>,
    /// The evidence JPEG's own shaper (its own workspace, so the two sizes do not rebuild one
    /// swscale context in turn), when the job keeps evidence.
    evidence: Option<(EvidenceSpec, Box<Shaper>)>,
    /// The change gate's thumbnail workspace, when the job is gated.
    thumb: Option<Workspace>,
}

/// What shaping works in: a swscale context, the output planes, a JPEG encoder and a padded
/// copy of a packed source. A job holds one only while it shapes (a segment's frames, a Redis
/// entry); in between it waits in [`IDLE`] for whichever job shapes next. A host with 64
/// streams then keeps about as many as decode at once (one or two per core), not 64 of each
/// size: behind a stalled model that was ~2.5 MiB a stream for the model's and the
/// evidence's scalers and planes.
#[derive(Default)]
struct Workspace {
    sws: Option<Sws>,
    planes: Planes,
    jpeg: Option<JpegEncoder>,
    /// A copy of a borrowed packed picture with room past its end for swscale's vectorised
    /// reads (decoded frames from ffmpeg carry that padding already).
    padded: Vec<u8>,
}

/// Workspaces no shaper holds, most recently given back last.
static IDLE: Mutex<Vec<Workspace>> = Mutex::new(Vec::new());
/// Idle workspaces kept at most; more are freed when given back.
const MAX_IDLE: usize = 16;

impl Workspace {
    /// An idle workspace, preferring one whose scaler is made for `key`; a new one if none
    /// is idle.
    fn take(key: &Key) -> Self {
        let mut idle = IDLE.lock().unwrap_or_else(PoisonError::into_inner);
        let at = idle
            .iter()
            .rposition(|w| w.sws.as_ref().is_some_and(|s| s.key == *key))
            .or_else(|| idle.len().checked_sub(1));
        at.map(|i| idle.swap_remove(i)).unwrap_or_default()
    }

    fn give_back(self) {
        let mut idle = IDLE.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(self);
        }
    }
}

/// Bytes swscale may read past the end of a packed picture's last row.
const READ_PADDING: usize = 64;

impl Shaper {
    pub fn new(spec: FrameSpec) -> Self {
        Self {
            spec,
            work: None,
            evidence: None,
            thumb: None,
        }
    }

    /// Also makes each frame's evidence JPEG, as `evidence` says.
    pub fn with_evidence(mut self, evidence: Option<EvidenceSpec>) -> Self {
        self.keep_evidence(evidence);
        self
    }

    /// Makes each frame's evidence JPEG from now on, as `evidence` says (none: no more).
    pub fn keep_evidence(&mut self, evidence: Option<EvidenceSpec>) {
        self.evidence = evidence.map(|e| {
            let spec = FrameSpec {
                size: FrameSize::LongestSide(e.max_side),
                encoding: Encoding::Jpeg { quality: e.quality },
            };
            (e, Box::new(Shaper::new(spec)))
        });
    }

    pub fn spec(&self) -> FrameSpec {
        self.spec
    }

    pub fn evidence_spec(&self) -> Option<EvidenceSpec> {
        self.evidence.as_ref().map(|(e, _)| *e)
    }

    /// The evidence JPEG of `src` alone.
    pub fn evidence(&mut self, src: &Source<'_>) -> Result<Vec<u8>, String> {
        let Some((_, shaper)) = self.evidence.as_mut() else {
            return Err("this job keeps no evidence".into());
        };
        match shaper.shape(src, 0)?.picture {
            Picture::Jpeg(j) => Ok(j),
            Picture::Rgb(_) => Err("evidence encoding gave no JPEG".into()),
        }
    }

    /// Shapes one picture; `pts_ms` is carried over.
    pub fn shape(&mut self, src: &Source<'_>, pts_ms: i64) -> Result<Frame, String> {
        if src.width == 0 || src.height == 0 {
            return Err("picture has no pixels".into());
        }
        let (dw, dh) = target_size(self.spec.size, src.width, src.height);
        let picture = match self.spec.encoding {
            Encoding::Rgb => {
                let (sw, sh) = (src.width as usize, src.height as usize);
                let rgb = if src.format == Pixel::RGB24 {
                    packed_rows(src.planes[0], src.strides[0], sw * 3, sh)?
                } else {
                    let p = &self
                        .convert(src, Pixel::RGB24, src.width, src.height)?
                        .planes;
                    packed_rows(&p.data[0], p.strides[0], sw * 3, sh)?
                };
                if (dw, dh) == (src.width, src.height) {
                    Picture::Rgb(rgb)
                } else {
                    Picture::Rgb(resample::resize_rgb_bicubic(
                        &rgb,
                        sw,
                        sh,
                        dw as usize,
                        dh as usize,
                    )?)
                }
            }
            Encoding::Jpeg { quality } => {
                // The JPEG-range twin: swscale then never takes its plain-copy path, which
                // would skip the range conversion.
                let Workspace {
                    planes: p, jpeg, ..
                } = self.convert(src, Pixel::YUVJ420P, dw, dh)?;
                let encoder = match jpeg {
                    Some(e) => {
                        e.set_quality(quality);
                        e
                    }
                    None => jpeg.insert(JpegEncoder::new(quality)?),
                };
                Picture::Jpeg(encoder.encode(&Yuv420 {
                    width: dw as usize,
                    height: dh as usize,
                    planes: [&p.data[0], &p.data[1], &p.data[2]],
                    strides: p.strides,
                })?)
            }
        };
        // The model's JPEG is the evidence too when it is small enough and as good; a
        // smaller one is scaled from the model's planes (a fraction of the decoded
        // picture's pixels to read); an RGB model's is made from the decoded picture.
        let evidence = match (self.evidence.as_mut(), &picture) {
            (None, _) => None,
            (Some((e, _)), Picture::Jpeg(j))
                if dw.max(dh) <= e.max_side
                    && matches!(self.spec.encoding, Encoding::Jpeg { quality } if quality >= e.quality) =>
            {
                Some(j.clone())
            }
            (Some((_, shaper)), Picture::Jpeg(_)) => {
                let Some(Workspace { planes: p, .. }) = self.work.as_ref() else {
                    return Err("no planes to make the evidence from".into());
                };
                let scaled = Source {
                    format: Pixel::YUVJ420P,
                    width: dw,
                    height: dh,
                    planes: [&p.data[0], &p.data[1], &p.data[2], &[]],
                    strides: [p.strides[0], p.strides[1], p.strides[2], 0],
                    colorspace: ffi::AVColorSpace::AVCOL_SPC_BT470BG,
                    full_range: true,
                };
                match shaper.shape(&scaled, 0)?.picture {
                    Picture::Jpeg(j) => Some(j),
                    Picture::Rgb(_) => return Err("evidence encoding gave no JPEG".into()),
                }
            }
            (Some(_), Picture::Rgb(_)) => Some(self.evidence(src)?),
        };
        Ok(Frame {
            width: dw,
            height: dh,
            picture,
            pts_ms,
            evidence,
            captured_at: None,
        })
    }

    /// The change gate's signature of `src`: a grey thumbnail of the size
    /// [`Gate::thumb_size`] gives, each cell the mean of the pixels it covers.
    pub fn thumbnail(&mut self, src: &Source<'_>) -> Result<Thumb, String> {
        if src.width == 0 || src.height == 0 {
            return Err("picture has no pixels".into());
        }
        let (w, h) = Gate::thumb_size(src.width, src.height);
        let p = &convert(&mut self.thumb, src, Pixel::GRAY8, w, h)?.planes;
        Ok(Thumb {
            width: w,
            height: h,
            cells: packed_rows(&p.data[0], p.strides[0], w as usize, h as usize)?,
        })
    }

    /// Gives the workspace back for any job to use until this shaper shapes again (which
    /// takes one back, most likely the same). Call it when a run of frames is done.
    pub fn release(&mut self) {
        for work in [self.work.take(), self.thumb.take()].into_iter().flatten() {
            work.give_back();
        }
        if let Some((_, shaper)) = self.evidence.as_mut() {
            shaper.release();
        }
    }

    /// swscale from `src` into the workspace's planes as `dst` at `dw` x `dh`.
    fn convert(
        &mut self,
        src: &Source<'_>,
        dst: Pixel,
        dw: u32,
        dh: u32,
    ) -> Result<&mut Workspace, String> {
        convert(&mut self.work, src, dst, dw, dh)
    }
}

/// swscale from `src` into the planes of `work` (one taken from the pool if it holds none)
/// as `dst` at `dw` x `dh`.
fn convert<'w>(
    work: &'w mut Option<Workspace>,
    src: &Source<'_>,
    dst: Pixel,
    dw: u32,
    dh: u32,
) -> Result<&'w mut Workspace, String> {
    let key = Key {
        src: src.format,
        sw: src.width,
        sh: src.height,
        dst,
        dw,
        dh,
        colorspace: src.colorspace,
        full_range: src.full_range,
    };
    let ws = work.get_or_insert_with(|| Workspace::take(&key));
    if ws.sws.as_ref().is_none_or(|s| s.key != key) {
        ws.sws = None;
        ws.sws = Some(Sws::new(key)?);
    }
    let (w, h) = (dw as usize, dh as usize);
    let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
    match dst {
        Pixel::RGB24 => ws.planes.fit([(w * 3, h), (0, 0), (0, 0)]),
        Pixel::GRAY8 => ws.planes.fit([(w, h), (0, 0), (0, 0)]),
        _ => ws.planes.fit([(w, h), (cw, ch), (cw, ch)]),
    }
    ws.scale(src)?;
    Ok(ws)
}

impl Drop for Shaper {
    fn drop(&mut self) {
        self.release();
    }
}

impl Workspace {
    /// swscale from `src` into the planes, which [`Shaper::convert`] sized.
    fn scale(&mut self, src: &Source<'_>) -> Result<(), String> {
        // What swscale will read, checked against the borrowed slices: rows of each plane of
        // this format at these strides.
        check_source(src)?;
        let mut src_ptrs: [*const u8; 4] = src.planes.map(<[u8]>::as_ptr);
        if src.format == Pixel::RGB24 {
            self.padded.clear();
            self.padded.extend_from_slice(src.planes[0]);
            self.padded.resize(src.planes[0].len() + READ_PADDING, 0);
            src_ptrs[0] = self.padded.as_ptr();
        }
        let src_strides: [i32; 4] = src.strides.map(|s| s as i32);
        let mut dst_ptrs: [*mut u8; 4] = [ptr::null_mut(); 4];
        let mut dst_strides = [0i32; 4];
        for i in 0..3 {
            if self.planes.strides[i] > 0 {
                dst_ptrs[i] = self.planes.data[i].as_mut_ptr();
                dst_strides[i] = self.planes.strides[i] as i32;
            }
        }
        let Some(sws) = self.sws.as_ref() else {
            return Err("no scaler".into());
        };
        // SAFETY: the source planes were checked to hold the picture's rows at their strides,
        // the destination planes were sized for the output at theirs.
        let rows = unsafe {
            ffi::sws_scale(
                sws.ctx,
                src_ptrs.as_ptr(),
                src_strides.as_ptr(),
                0,
                src.height as i32,
                dst_ptrs.as_ptr(),
                dst_strides.as_ptr(),
            )
        };
        if rows <= 0 {
            return Err(format!("swscale failed ({rows})"));
        }
        Ok(())
    }
}

/// `rows` rows of `row` bytes from a plane `stride` bytes apart, packed.
fn packed_rows(plane: &[u8], stride: usize, row: usize, rows: usize) -> Result<Vec<u8>, String> {
    if stride < row || plane.len() < stride * (rows - 1) + row {
        return Err("RGB picture is short".into());
    }
    let mut out = Vec::with_capacity(row * rows);
    for r in plane.chunks(stride).take(rows) {
        out.extend_from_slice(&r[..row]);
    }
    Ok(out)
}

/// Checks that each plane `format` has holds its rows at the stride given.
fn check_source(src: &Source<'_>) -> Result<(), String> {
    let format: ffi::AVPixelFormat = src.format.into();
    // SAFETY: av_pix_fmt_desc_get returns a static descriptor or null.
    let desc = unsafe { ffi::av_pix_fmt_desc_get(format) };
    if desc.is_null() {
        return Err(format!("unknown pixel format {:?}", src.format));
    }
    // SAFETY: non-null static descriptor.
    let desc = unsafe { &*desc };
    let planes = (0..usize::from(desc.nb_components))
        .map(|c| desc.comp[c].plane as usize)
        .max()
        .map_or(0, |p| p + 1);
    for p in 0..planes.min(4) {
        let chroma = p == 1 || p == 2;
        let rows = if chroma {
            (src.height as usize).div_ceil(1 << desc.log2_chroma_h)
        } else {
            src.height as usize
        };
        let stride = src.strides[p];
        if stride == 0 || src.planes[p].len() < stride * rows {
            return Err(format!(
                "{:?} {}x{}: plane {p} is short",
                src.format, src.width, src.height
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_side_keeps_aspect_and_never_upscales() {
        let s = |n| FrameSize::LongestSide(n);
        assert_eq!(target_size(s(768), 1280, 720), (768, 432));
        assert_eq!(target_size(s(768), 720, 1280), (432, 768));
        assert_eq!(target_size(s(768), 640, 360), (640, 360));
        assert_eq!(target_size(s(0), 1280, 720), (1280, 720));
        assert_eq!(target_size(s(2), 1000, 1), (2, 1));
        assert_eq!(
            target_size(
                FrameSize::Exact {
                    width: 224,
                    height: 224
                },
                1280,
                720
            ),
            (224, 224)
        );
    }

    fn gray_rgb(w: u32, h: u32, v: u8) -> Vec<u8> {
        vec![v; (w * h * 3) as usize]
    }

    #[test]
    fn rgb_to_exact_rgb_keeps_a_flat_colour() {
        let mut shaper = Shaper::new(FrameSpec {
            size: FrameSize::Exact {
                width: 16,
                height: 16,
            },
            encoding: Encoding::Rgb,
        });
        let rgb = gray_rgb(37, 21, 200);
        let f = shaper.shape(&Source::rgb(&rgb, 37, 21), 5).unwrap();
        assert_eq!((f.width, f.height, f.pts_ms), (16, 16, 5));
        let Picture::Rgb(px) = &f.picture else {
            panic!()
        };
        assert_eq!(px.len(), 16 * 16 * 3);
        assert!(px.iter().all(|&v| (i32::from(v) - 200).abs() <= 1));
    }

    #[test]
    fn rgb_to_jpeg_bounded_by_the_longest_side() {
        let mut shaper = Shaper::new(FrameSpec {
            size: FrameSize::LongestSide(64),
            encoding: Encoding::Jpeg { quality: 90 },
        });
        let rgb = gray_rgb(201, 99, 60);
        let f = shaper.shape(&Source::rgb(&rgb, 201, 99), 0).unwrap();
        assert_eq!((f.width, f.height), (64, 32));
        let Picture::Jpeg(j) = &f.picture else {
            panic!()
        };
        let img = image::load_from_memory(j).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (64, 32));
        assert!(img
            .pixels()
            .all(|p| p.0.iter().all(|&v| (i32::from(v) - 60).abs() <= 2)));
    }

    #[test]
    fn a_workspace_given_back_serves_another_spec_as_that_spec_says() {
        // Noise, so that JPEG quality shows in the size.
        let mut x = 12345u32;
        let rgb: Vec<u8> = (0..320 * 240 * 3)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect();
        let jpeg_of = |spec: FrameSpec| {
            let mut shaper = Shaper::new(spec);
            let f = shaper.shape(&Source::rgb(&rgb, 320, 240), 0).unwrap();
            shaper.release();
            let Picture::Jpeg(j) = f.picture else {
                panic!()
            };
            (f.width, f.height, j.len())
        };
        let fine = jpeg_of(FrameSpec {
            size: FrameSize::LongestSide(200),
            encoding: Encoding::Jpeg { quality: 95 },
        });
        // Most likely the same workspace, with another size and quality.
        let coarse = jpeg_of(FrameSpec {
            size: FrameSize::LongestSide(160),
            encoding: Encoding::Jpeg { quality: 20 },
        });
        let fine_again = jpeg_of(FrameSpec {
            size: FrameSize::LongestSide(200),
            encoding: Encoding::Jpeg { quality: 95 },
        });
        assert_eq!((fine.0, fine.1), (200, 150));
        assert_eq!((coarse.0, coarse.1), (160, 120));
        assert!(coarse.2 * 3 < fine.2, "{coarse:?} vs {fine:?}");
        assert_eq!(fine_again, fine);
    }

    #[test]
    fn short_source_is_refused_not_read() {
        let mut shaper = Shaper::new(FrameSpec {
            size: FrameSize::AsDecoded,
            encoding: Encoding::Rgb,
        });
        let rgb = vec![0u8; 10];
        let err = shaper.shape(&Source::rgb(&rgb, 8, 8), 0).unwrap_err();
        assert!(err.contains("short"), "{err}");
    }
}

#[cfg(test)]
mod range_tests {
    use super::*;

    /// A 4:2:0 picture of one luma value and neutral chroma.
    fn flat_yuv(format: Pixel, w: u32, h: u32, y: u8) -> frame::Video {
        crate::media::decode::init();
        let mut f = frame::Video::new(format, w, h);
        for (plane, v) in [(0, y), (1, 128), (2, 128)] {
            f.data_mut(plane).fill(v);
        }
        f
    }

    fn mean_rgb_of(frame: &Frame) -> f64 {
        let rgb = frame.to_rgb().unwrap();
        rgb.iter().map(|&v| f64::from(v)).sum::<f64>() / rgb.len() as f64
    }

    #[test]
    fn a_bt709_stream_is_converted_with_its_own_matrix() {
        // Y=126, Cb=Cr=128 is mid-grey in any matrix; pure chroma tells the matrices apart:
        // limited-range BT.709 red (Y 63, Cb 102, Cr 240) must come out red, not orange-pink.
        for encoding in [Encoding::Jpeg { quality: 95 }, Encoding::Rgb] {
            let mut shaper = Shaper::new(FrameSpec {
                size: FrameSize::LongestSide(32),
                encoding,
            });
            let mut red = flat_yuv(Pixel::YUV420P, 64, 64, 63);
            red.data_mut(1).fill(102);
            red.data_mut(2).fill(240);
            red.set_color_space(ffmpeg::color::Space::BT709);
            let out = shaper.shape(&Source::video(&red), 0).unwrap();
            let rgb = out.to_rgb().unwrap();
            let px = &rgb[(16 * 32 + 16) * 3..(16 * 32 + 16) * 3 + 3];
            assert!(
                px[0] > 240 && px[1] < 20 && px[2] < 20,
                "{encoding:?}: BT.709 red came out {px:?}"
            );
        }
    }

    #[test]
    fn limited_range_black_and_white_become_full_range() {
        for size in [FrameSize::AsDecoded, FrameSize::LongestSide(32)] {
            for encoding in [Encoding::Jpeg { quality: 95 }, Encoding::Rgb] {
                let mut shaper = Shaper::new(FrameSpec { size, encoding });
                let black = shaper
                    .shape(&Source::video(&flat_yuv(Pixel::YUV420P, 64, 64, 16)), 0)
                    .unwrap();
                let white = shaper
                    .shape(&Source::video(&flat_yuv(Pixel::YUV420P, 64, 64, 235)), 0)
                    .unwrap();
                let (b, w) = (mean_rgb_of(&black), mean_rgb_of(&white));
                assert!(
                    b < 2.0 && w > 253.0,
                    "{size:?} {encoding:?}: black {b}, white {w}"
                );
                // Full-range input stays as it is.
                let full = shaper
                    .shape(&Source::video(&flat_yuv(Pixel::YUVJ420P, 64, 64, 16)), 0)
                    .unwrap();
                let v = mean_rgb_of(&full);
                assert!((v - 16.0).abs() < 2.0, "{size:?} {encoding:?}: {v}");
            }
        }
    }
}
