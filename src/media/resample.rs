//! Pillow's resampling of 8-bit RGB, reproduced exactly, so an in-process model sees the
//! pixels its reference processor would make (transformers' PIL image processors resize with
//! `PIL.Image.resize(..., BICUBIC)`).
//!
//! The algorithm is Pillow's `ImagingResample` for 8-bit images: a separable convolution,
//! horizontal pass then vertical, each output pixel a weighted sum over the input pixels
//! under the filter stretched by the reduction factor (antialiasing), weights normalised to
//! sum to one and rounded to 22-bit fixed point, sums rounded and clamped to 8 bits after
//! each pass. swscale's bicubic (the JPEG path's scaler) differs from it by up to 6 levels
//! on detailed pictures, and `fast_image_resize`'s Catmull-Rom by up to 27 at the borders
//! (both measured against Pillow on the test card in tests/fixtures/paligemma), which is why
//! this is written out here rather than taken from a crate.

/// Pillow's fixed-point precision for 8-bit images: 32 bits less 8 for the value less 2.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic filter (Keys, a = -0.5) and its support.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}
const BICUBIC_SUPPORT: f64 = 2.0;

/// For each output position: the first input index and its fixed-point weights.
struct Coefficients {
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
    /// Weights per output position (the longest window; shorter ones are zero-padded).
    stride: usize,
}

fn coefficients(in_size: usize, out_size: usize) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = BICUBIC_SUPPORT * filter_scale;
    let stride = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * stride];
    let mut k = vec![0f64; stride];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filter_scale;
        // Pillow truncates toward zero after adding 0.5 (both ends are non-negative here).
        let xmin = ((center - support + 0.5).max(0.0)) as usize;
        let xmax = ((center + support + 0.5) as usize).min(in_size);
        let n = xmax - xmin;
        let mut total = 0.0;
        for (x, w) in k.iter_mut().enumerate().take(n) {
            *w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            total += *w;
        }
        let row = &mut weights[xx * stride..(xx + 1) * stride];
        for x in 0..n {
            let w = if total != 0.0 { k[x] / total } else { k[x] };
            let fixed = w * f64::from(1u32 << PRECISION_BITS);
            row[x] = if fixed < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coefficients {
        bounds,
        weights,
        stride,
    }
}

fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Sums are 32-bit as in Pillow: 255 times the largest total of absolute bicubic weights
/// (under 1.3 in 22-bit fixed point) stays below 2^31.
const ROUND: i32 = 1 << (PRECISION_BITS - 1);

/// Resizes packed RGB (`width` x `height`, rows of `width * 3` bytes) to `out_w` x `out_h`
/// with Pillow's bicubic, as `Image.resize((out_w, out_h), Image.BICUBIC)` does.
pub fn resize_rgb_bicubic(
    rgb: &[u8],
    width: usize,
    height: usize,
    out_w: usize,
    out_h: usize,
) -> Result<Vec<u8>, String> {
    if rgb.len() != width * height * 3 {
        return Err(format!(
            "RGB buffer of {} bytes is not {width}x{height}",
            rgb.len()
        ));
    }
    if width == 0 || height == 0 || out_w == 0 || out_h == 0 {
        return Err("cannot resize a picture with no pixels".into());
    }
    // Horizontal pass (skipped, as Pillow skips it, when the width stays).
    let horizontal = if out_w == width {
        rgb.to_vec()
    } else {
        let c = coefficients(width, out_w);
        let mut out = vec![0u8; out_w * height * 3];
        for y in 0..height {
            let src = &rgb[y * width * 3..(y + 1) * width * 3];
            let dst = &mut out[y * out_w * 3..(y + 1) * out_w * 3];
            for (xx, &(xmin, n)) in c.bounds.iter().enumerate() {
                let k = &c.weights[xx * c.stride..xx * c.stride + n];
                let (mut r, mut g, mut b) = (ROUND, ROUND, ROUND);
                for (i, &w) in k.iter().enumerate() {
                    let p = &src[(xmin + i) * 3..(xmin + i) * 3 + 3];
                    r += i32::from(p[0]) * w;
                    g += i32::from(p[1]) * w;
                    b += i32::from(p[2]) * w;
                }
                dst[xx * 3] = clip8(r);
                dst[xx * 3 + 1] = clip8(g);
                dst[xx * 3 + 2] = clip8(b);
            }
        }
        out
    };
    if out_h == height {
        return Ok(horizontal);
    }
    // Vertical pass.
    let c = coefficients(height, out_h);
    let row_len = out_w * 3;
    let mut out = vec![0u8; row_len * out_h];
    let mut acc = vec![0i32; row_len];
    for (yy, &(ymin, n)) in c.bounds.iter().enumerate() {
        let k = &c.weights[yy * c.stride..yy * c.stride + n];
        acc.fill(ROUND);
        for (i, &w) in k.iter().enumerate() {
            let src = &horizontal[(ymin + i) * row_len..(ymin + i + 1) * row_len];
            for (a, &p) in acc.iter_mut().zip(src) {
                *a += i32::from(p) * w;
            }
        }
        for (o, &a) in out[yy * row_len..(yy + 1) * row_len].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(320, 56), (56, 224), (1280, 224), (7, 3)] {
            let c = coefficients(i, o);
            for (xx, &(_, n)) in c.bounds.iter().enumerate() {
                let sum: i64 = c.weights[xx * c.stride..xx * c.stride + n]
                    .iter()
                    .map(|&w| i64::from(w))
                    .sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= n as i64,
                    "{i}->{o} at {xx}: {sum}"
                );
            }
        }
    }

    #[test]
    fn flat_stays_flat_and_sizes_are_checked() {
        let flat = vec![77u8; 40 * 30 * 3];
        let out = resize_rgb_bicubic(&flat, 40, 30, 13, 56).unwrap();
        assert_eq!(out.len(), 13 * 56 * 3);
        assert!(out.iter().all(|&p| p == 77));
        assert!(resize_rgb_bicubic(&flat, 41, 30, 13, 56).is_err());
        assert!(resize_rgb_bicubic(&flat, 40, 30, 0, 56).is_err());
    }
}
