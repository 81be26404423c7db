//! Media: decoding fetched bytes with ffmpeg-next and choosing frames by presentation time.
//!
//! [`sampler`] is pure logic (which frame to keep); [`timeline`] maps stream timestamps onto
//! the job's media time across segments and discontinuities; [`decode`] runs ffmpeg on a
//! blocking thread over bytes the service fetched itself (ffmpeg never opens a URL) with the
//! demuxers limited to MPEG-TS and MP4/fMP4. [`shape`] turns each kept picture into what the
//! model backend asked for ([`FrameSpec`]: size, JPEG or RGB) in the same thread, with
//! swscale and [`jpeg`] (libjpeg-turbo), so queues hold only that. [`file`] cuts a whole
//! file (local, or read over HTTP with Range requests) into keyframe-aligned pieces that go
//! through the same decoder. [`gate`] judges whether a sampled picture changed enough since
//! the last one the model saw (a small thumbnail made by the same scaler). [`workers`] runs
//! all of it on blocking threads, no more at once than there are cores.

pub mod decode;
pub mod file;
pub mod gate;
pub mod jpeg;
pub mod resample;
pub mod sampler;
pub mod shape;
pub mod timeline;
pub mod units;
pub mod workers;

/// How big the pictures a backend takes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameSize {
    /// As the source has them.
    AsDecoded,
    /// Scaled down (never up) so that neither side exceeds this, keeping the aspect ratio.
    LongestSide(u32),
    /// Exactly this size (a model's fixed input).
    Exact { width: u32, height: u32 },
}

/// How the pictures a backend takes are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// JPEG at this quality (1-100), as remote model servers take them.
    Jpeg { quality: u8 },
    /// Packed 8-bit RGB, as an in-process model takes them.
    Rgb,
}

/// What a model backend wants each frame to be: the pipeline shapes frames to this once, in
/// the decode thread, and queues only that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSpec {
    pub size: FrameSize,
    pub encoding: Encoding,
}

/// A sampled picture's pixels, as its backend asked for them.
#[derive(Clone)]
pub enum Picture {
    Jpeg(Vec<u8>),
    /// Packed RGB24, `width * 3` bytes per row.
    Rgb(Vec<u8>),
}

/// One sampled picture, shaped for its model backend.
#[derive(Clone)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    pub picture: Picture,
    /// Milliseconds from the start of the media the job read.
    pub pts_ms: i64,
    /// The same picture as a JPEG to keep beside its answer (see [`EvidenceSpec`]), when
    /// the job keeps evidence. Taken off before the frame is queued for the model.
    pub evidence: Option<Vec<u8>>,
    /// The source's wall clock when the picture was taken, in Unix seconds: an RTSP
    /// camera's, from its RTCP sender reports; `None` where the source does not say.
    pub captured_at: Option<f64>,
}

/// What the frame kept beside each answer is: a JPEG no larger than `max_side`. Made in the
/// decode thread with the picture for the model (or is that same JPEG when it fits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvidenceSpec {
    pub max_side: u32,
    pub quality: u8,
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("bytes", &self.bytes())
            .field("pts_ms", &self.pts_ms)
            .finish()
    }
}

impl Frame {
    /// Bytes the picture holds (what a queued frame costs in memory).
    pub fn bytes(&self) -> usize {
        match &self.picture {
            Picture::Jpeg(b) | Picture::Rgb(b) => b.len(),
        }
    }

    /// The picture as packed RGB24, decoding a JPEG if needed.
    pub fn to_rgb(&self) -> Result<std::borrow::Cow<'_, [u8]>, String> {
        match &self.picture {
            Picture::Rgb(b) => Ok(std::borrow::Cow::Borrowed(b)),
            Picture::Jpeg(b) => Ok(std::borrow::Cow::Owned(
                image::load_from_memory(b)
                    .map_err(|e| format!("undecodable frame: {e}"))?
                    .to_rgb8()
                    .into_raw(),
            )),
        }
    }

    /// The picture as JPEG, encoding packed RGB if needed.
    pub fn to_jpeg(&self, quality: u8) -> Result<std::borrow::Cow<'_, [u8]>, String> {
        match &self.picture {
            Picture::Jpeg(b) => Ok(std::borrow::Cow::Borrowed(b)),
            Picture::Rgb(rgb) => {
                let mut shaper = shape::Shaper::new(FrameSpec {
                    size: FrameSize::AsDecoded,
                    encoding: Encoding::Jpeg { quality },
                });
                let f = shaper.shape(
                    &shape::Source::rgb(rgb, self.width, self.height),
                    self.pts_ms,
                )?;
                match f.picture {
                    Picture::Jpeg(j) => Ok(std::borrow::Cow::Owned(j)),
                    Picture::Rgb(_) => Err("jpeg encoding gave no JPEG".into()),
                }
            }
        }
    }
}

/// An encoded still (JPEG, PNG or WebP), as Redis entries carry them.
pub struct Still<'a> {
    pub bytes: &'a [u8],
    pub format: image::ImageFormat,
    pub width: u32,
    pub height: u32,
    /// Its pixels once decoded (a gated job's thumbnail and its frame share one decode).
    decoded: std::cell::OnceCell<image::RgbImage>,
}

impl<'a> Still<'a> {
    /// Reads the header: format and size; refuses other formats and pictures over `max_pixels`.
    pub fn probe(bytes: &'a [u8], max_pixels: u64) -> Result<Self, String> {
        let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| format!("unreadable image: {e}"))?;
        let format = match reader.format() {
            Some(
                f @ (image::ImageFormat::Jpeg | image::ImageFormat::Png | image::ImageFormat::WebP),
            ) => f,
            _ => return Err("frame is not a JPEG, PNG or WebP image".into()),
        };
        let (width, height) = reader
            .into_dimensions()
            .map_err(|e| format!("unreadable image: {e}"))?;
        if u64::from(width) * u64::from(height) > max_pixels {
            return Err(format!(
                "frame is {width}x{height}, over MAX_FRAME_PIXELS={max_pixels}"
            ));
        }
        Ok(Self {
            bytes,
            format,
            width,
            height,
            decoded: std::cell::OnceCell::new(),
        })
    }

    /// The frame `shaper` makes of this still. A JPEG that already has the size asked for
    /// goes on as it came (no decode, no re-encode); anything else is decoded and shaped.
    pub fn shape(&self, shaper: &mut shape::Shaper, pts_ms: i64) -> Result<Frame, String> {
        let spec = shaper.spec();
        let size = shape::target_size(spec.size, self.width, self.height);
        if self.format == image::ImageFormat::Jpeg
            && matches!(spec.encoding, Encoding::Jpeg { .. })
            && size == (self.width, self.height)
        {
            let evidence = match shaper.evidence_spec() {
                None => None,
                Some(e) if self.width.max(self.height) <= e.max_side => Some(self.bytes.to_vec()),
                Some(_) => {
                    let rgb = self.decode()?;
                    Some(shaper.evidence(&shape::Source::rgb(
                        rgb.as_raw(),
                        rgb.width(),
                        rgb.height(),
                    ))?)
                }
            };
            return Ok(Frame {
                width: self.width,
                height: self.height,
                picture: Picture::Jpeg(self.bytes.to_vec()),
                pts_ms,
                evidence,
                captured_at: None,
            });
        }
        let rgb = self.decode()?;
        shaper.shape(
            &shape::Source::rgb(rgb.as_raw(), rgb.width(), rgb.height()),
            pts_ms,
        )
    }

    /// The change gate's signature of this still (decoded whatever its format).
    pub fn thumbnail(&self, shaper: &mut shape::Shaper) -> Result<gate::Thumb, String> {
        let rgb = self.decode()?;
        shaper.thumbnail(&shape::Source::rgb(rgb.as_raw(), rgb.width(), rgb.height()))
    }

    /// The still's pixels, decoded on first use.
    fn decode(&self) -> Result<&image::RgbImage, String> {
        if let Some(rgb) = self.decoded.get() {
            return Ok(rgb);
        }
        let rgb = image::load_from_memory_with_format(self.bytes, self.format)
            .map_err(|e| format!("undecodable image: {e}"))?
            .to_rgb8();
        Ok(self.decoded.get_or_init(|| rgb))
    }
}
