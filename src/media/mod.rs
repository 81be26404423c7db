//! Media: decoding fetched bytes with ffmpeg-next and choosing frames by presentation time.
//!
//! [`sampler`] is pure logic (which frame to keep); [`timeline`] maps stream timestamps onto
//! the job's media time across segments and discontinuities; [`decode`] runs ffmpeg on a
//! blocking thread over bytes the service fetched itself (ffmpeg never opens a URL) with the
//! demuxers limited to MPEG-TS and MP4/fMP4.

pub mod decode;
pub mod sampler;
pub mod timeline;

/// One sampled picture, RGB24, tightly packed (`width * 3` bytes per row).
#[derive(Clone)]
pub struct Frame {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
    /// Milliseconds from the start of the media the job read.
    pub pts_ms: i64,
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame")
            .field("width", &self.width)
            .field("height", &self.height)
            .field("pts_ms", &self.pts_ms)
            .finish()
    }
}

impl Frame {
    /// Decodes an encoded still (JPEG, PNG or WebP), as Redis entries carry them.
    pub fn from_encoded(bytes: &[u8], pts_ms: i64, max_pixels: u64) -> Result<Self, String> {
        let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| format!("unreadable image: {e}"))?;
        match reader.format() {
            Some(image::ImageFormat::Jpeg | image::ImageFormat::Png | image::ImageFormat::WebP) => {
            }
            _ => return Err("frame is not a JPEG, PNG or WebP image".into()),
        }
        let (w, h) = reader
            .into_dimensions()
            .map_err(|e| format!("unreadable image: {e}"))?;
        if u64::from(w) * u64::from(h) > max_pixels {
            return Err(format!(
                "frame is {w}x{h}, over MAX_FRAME_PIXELS={max_pixels}"
            ));
        }
        let img = image::load_from_memory(bytes).map_err(|e| format!("undecodable image: {e}"))?;
        let rgb = img.to_rgb8();
        Ok(Self {
            width: rgb.width(),
            height: rgb.height(),
            rgb: rgb.into_raw(),
            pts_ms,
        })
    }

    /// Encodes as JPEG (what the OpenAI-compatible backend sends).
    pub fn to_jpeg(&self, quality: u8) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(self.rgb.len() / 8);
        let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
        enc.encode(
            &self.rgb,
            self.width,
            self.height,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| format!("jpeg encoding failed: {e}"))?;
        Ok(out)
    }

    /// Mean of all RGB samples, 0-255: a cheap content fingerprint used in tests and logs.
    pub fn mean_brightness(&self) -> f64 {
        if self.rgb.is_empty() {
            return 0.0;
        }
        self.rgb.iter().map(|&b| u64::from(b)).sum::<u64>() as f64 / self.rgb.len() as f64
    }
}
