//! JPEG encoding with libjpeg-turbo (Debian's `libturbojpeg0`, through the `turbojpeg` crate's
//! raw bindings), straight from full-range 4:2:0 planes: no RGB round trip.
//!
//! The crate's safe API of the version that links Debian's libturbojpeg 2.1 only compresses
//! packed pixels; compressing from planes (`tjCompressFromYUVPlanes`) needs the raw call, so
//! it is wrapped here, once, behind a safe type.

use std::ffi::CStr;

use turbojpeg::raw;

/// Three planes of a full-range (JFIF) YCbCr 4:2:0 picture.
pub struct Yuv420<'a> {
    pub width: usize,
    pub height: usize,
    pub planes: [&'a [u8]; 3],
    pub strides: [usize; 3],
}

/// A libjpeg-turbo compressor and its output buffer, reused from frame to frame. One thread
/// uses it at a time.
pub struct JpegEncoder {
    handle: raw::tjhandle,
    buf: Vec<u8>,
    quality: i32,
}

// SAFETY: a tjhandle holds no thread-local state; the encoder moves between threads but is
// never shared (no `Sync`).
unsafe impl Send for JpegEncoder {}

impl Drop for JpegEncoder {
    fn drop(&mut self) {
        // SAFETY: the handle came from tjInitCompress and is destroyed once.
        unsafe { raw::tjDestroy(self.handle) };
    }
}

impl JpegEncoder {
    /// An encoder at `quality` (1-100).
    pub fn new(quality: u8) -> Result<Self, String> {
        // SAFETY: plain constructor; null means failure.
        let handle = unsafe { raw::tjInitCompress() };
        if handle.is_null() {
            return Err("libjpeg-turbo: cannot create a compressor".into());
        }
        Ok(Self {
            handle,
            buf: Vec::new(),
            quality: i32::from(quality.clamp(1, 100)),
        })
    }

    /// Encodes at `quality` (1-100) from now on.
    pub fn set_quality(&mut self, quality: u8) {
        self.quality = i32::from(quality.clamp(1, 100));
    }

    /// Encodes a 4:2:0 picture; the planes must hold `tjPlaneHeight` rows of their stride.
    pub fn encode(&mut self, pic: &Yuv420<'_>) -> Result<Vec<u8>, String> {
        let (w, h) = (pic.width as i32, pic.height as i32);
        let (cw, ch) = (pic.width.div_ceil(2), pic.height.div_ceil(2));
        let needs = [
            (pic.strides[0], pic.width, pic.height),
            (pic.strides[1], cw, ch),
            (pic.strides[2], cw, ch),
        ];
        for (plane, (stride, pw, ph)) in pic.planes.iter().zip(needs) {
            if w <= 0 || h <= 0 || stride < pw || plane.len() < stride * (ph - 1) + pw {
                return Err(format!(
                    "jpeg: a {}x{} picture has a short plane",
                    pic.width, pic.height
                ));
            }
        }
        // SAFETY: pure function of its arguments.
        let bound = unsafe { raw::tjBufSize(w, h, raw::TJSAMP_TJSAMP_420 as i32) };
        if bound == u64::MAX as libc::c_ulong || bound == 0 {
            return Err(format!(
                "jpeg: {}x{} is out of range",
                pic.width, pic.height
            ));
        }
        // Room for the worst case, not written: turbojpeg writes only the few tens of KB a
        // picture needs, so the rest of the megabyte stays untouched (not resident) for as
        // long as the encoder lives, one per stream and size.
        self.buf.clear();
        self.buf.reserve(bound as usize);
        let mut planes = pic.planes.map(<[u8]>::as_ptr);
        let strides = pic.strides.map(|s| s as i32);
        let mut out = self.buf.as_mut_ptr();
        let mut size: libc::c_ulong = bound;
        // SAFETY: the planes were checked to hold the picture at their strides; the output
        // buffer's capacity is tjBufSize bytes and NOREALLOC forbids the library to replace it.
        let rc = unsafe {
            raw::tjCompressFromYUVPlanes(
                self.handle,
                planes.as_mut_ptr(),
                w,
                strides.as_ptr(),
                h,
                raw::TJSAMP_TJSAMP_420 as i32,
                &mut out,
                &mut size,
                self.quality,
                raw::TJFLAG_NOREALLOC as i32,
            )
        };
        if rc != 0 {
            // SAFETY: the library owns the message; it lives until the next call on the handle.
            let why = unsafe { CStr::from_ptr(raw::tjGetErrorStr2(self.handle)) };
            return Err(format!("jpeg encoding failed: {}", why.to_string_lossy()));
        }
        // SAFETY: NOREALLOC kept the library in this buffer's capacity (`bound` bytes), and
        // it wrote `size` of them.
        unsafe { self.buf.set_len((size as usize).min(bound as usize)) };
        Ok(self.buf.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_planes_that_decode_to_the_same_picture() {
        // A horizontal luma ramp with neutral chroma, odd sizes (chroma rounds up).
        let (w, h) = (33usize, 17usize);
        let y: Vec<u8> = (0..h).flat_map(|_| (0..w).map(|x| (x * 7) as u8)).collect();
        let c = vec![128u8; w.div_ceil(2) * h.div_ceil(2)];
        let mut enc = JpegEncoder::new(95).unwrap();
        let jpeg = enc
            .encode(&Yuv420 {
                width: w,
                height: h,
                planes: [&y, &c, &c],
                strides: [w, w.div_ceil(2), w.div_ceil(2)],
            })
            .unwrap();
        let img = image::load_from_memory(&jpeg).unwrap().to_luma8();
        assert_eq!((img.width() as usize, img.height() as usize), (w, h));
        for x in [0usize, 10, 32] {
            let got = f64::from(img.get_pixel(x as u32, 8).0[0]);
            assert!((got - (x * 7) as f64).abs() < 6.0, "x={x}: {got}");
        }
    }

    #[test]
    fn refuses_short_planes() {
        let y = vec![0u8; 10];
        let mut enc = JpegEncoder::new(85).unwrap();
        let err = enc
            .encode(&Yuv420 {
                width: 16,
                height: 16,
                planes: [&y, &y, &y],
                strides: [16, 8, 8],
            })
            .unwrap_err();
        assert!(err.contains("short plane"), "{err}");
    }
}
