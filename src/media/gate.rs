//! Change gating: whether a sampled picture differs enough from the last one the model saw
//! to be worth asking about again.
//!
//! Each sampled picture gets a signature, a small grey thumbnail (at most [`THUMB_SIDE`]
//! pixels on its longest side) that swscale makes by area averaging in the decode thread
//! ([`super::shape::Shaper::thumbnail`]): each of its cells averages a few hundred pixels of
//! a 720p picture, so sensor noise and compression artefacts average out while anything the
//! size of a person moves whole cells. Two signatures are compared after matching their
//! overall brightness: the new thumbnail is fitted to the old one as `gain * old + offset` by
//! least squares (a light flickering, a camera's auto-exposure or a cloud move every cell
//! alike; an object covering a few percent of the picture barely moves the fit); the change
//! is the fraction of cells that still differ from the fit by more than [`CELL_STEP`] grey
//! levels. Pure logic over bytes; the state is small and serialisable
//! and travels with the sampler in a job's checkpoints, so a resumed job compares against
//! the picture the model last saw.

use base64::Engine;
use serde::{Deserialize, Serialize};

/// The thumbnail's longest side, in pixels: 64x36 cells for a 16:9 picture.
pub const THUMB_SIDE: u32 = 64;
/// How far (grey levels of 255) a cell must move, after brightness matching, to count as
/// changed.
pub const CELL_STEP: f32 = 12.0;
/// The default share of cells that must change (see README, "Change gating", for the
/// measurements it comes from).
pub const DEFAULT_THRESHOLD: f64 = 0.003;
/// The default longest wait between two pictures sent, changed or not.
pub const DEFAULT_MAX_INTERVAL_S: f64 = 30.0;

/// A job's gate as `start` gave it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GateSpec {
    /// Share of the picture (0-1] that must change for the model to see it.
    pub threshold: f64,
    /// A picture is sent at least this often (media seconds), changed or not.
    pub max_interval_s: f64,
}

/// What the gate made of one sampled picture.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Change {
    /// Nothing to compare with (the first picture, a new size) or `max_interval_s` since the
    /// last one sent: it goes to the model.
    New,
    /// Changed by this share of the picture: it goes to the model.
    Changed(f64),
    /// Changed by only this share since the picture sent at `since_ms`.
    Unchanged { score: f64, since_ms: i64 },
}

impl Change {
    pub fn sends(&self) -> bool {
        !matches!(self, Change::Unchanged { .. })
    }
}

/// A grey thumbnail, row after row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thumb {
    pub width: u32,
    pub height: u32,
    #[serde(with = "b64")]
    pub cells: Vec<u8>,
}

/// The gate of one job: its spec and the signature of the last picture it let through.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    pub spec: GateSpec,
    /// The last picture sent and its media time.
    reference: Option<(Thumb, i64)>,
}

impl Gate {
    pub fn new(spec: GateSpec) -> Self {
        Self {
            spec,
            reference: None,
        }
    }

    /// The thumbnail size for a `width` x `height` picture.
    pub fn thumb_size(width: u32, height: u32) -> (u32, u32) {
        let long = width.max(height).max(1);
        let scale = |side: u32| {
            ((u64::from(side) * u64::from(THUMB_SIDE)).div_ceil(u64::from(long)) as u32).max(1)
        };
        if long <= THUMB_SIDE {
            (width.max(1), height.max(1))
        } else {
            (scale(width), scale(height))
        }
    }

    /// Judges the picture at `pts_ms` by its thumbnail; a picture that goes to the model
    /// becomes the one the next are compared with.
    pub fn judge(&mut self, thumb: Thumb, pts_ms: i64) -> Change {
        let change = match &self.reference {
            Some((_, at))
                if (pts_ms - at) as f64 >= self.spec.max_interval_s * 1000.0 || pts_ms < *at =>
            {
                Change::New
            }
            Some((before, at)) => match difference(before, &thumb) {
                Some(score) if score < self.spec.threshold => Change::Unchanged {
                    score,
                    since_ms: *at,
                },
                Some(score) => Change::Changed(score),
                None => Change::New,
            },
            None => Change::New,
        };
        if change.sends() {
            self.reference = Some((thumb, pts_ms));
        }
        change
    }
}

/// The share of cells of `b` that differ by more than [`CELL_STEP`] from `a` brought to
/// `b`'s brightness (`gain * a + offset`, fitted by least squares, the gain kept within
/// 0.5-2); `None` when the two are not the same size.
pub fn difference(a: &Thumb, b: &Thumb) -> Option<f64> {
    if (a.width, a.height) != (b.width, b.height) || a.cells.len() != b.cells.len() {
        return None;
    }
    let n = a.cells.len();
    if n == 0 {
        return Some(0.0);
    }
    let pairs = || {
        a.cells
            .iter()
            .zip(&b.cells)
            .map(|(&x, &y)| (f32::from(x), f32::from(y)))
    };
    // Fitted on every cell, then again on the cells that fit (so an object that covers part
    // of the picture does not pull the fit towards itself).
    let (gain, offset) = fit(pairs(), |_, _| true);
    let (gain, offset) = fit(pairs(), |x, y| (x * gain + offset - y).abs() <= CELL_STEP);
    let changed = pairs()
        .filter(|&(x, y)| (x * gain + offset - y).abs() > CELL_STEP)
        .count();
    Some(changed as f64 / n as f64)
}

/// Least-squares `y = gain * x + offset` over the pairs `keep` accepts (gain within 0.5-2;
/// 1 where `x` has no contrast to fit a gain to); (1, 0) when it accepts none.
fn fit(
    pairs: impl Iterator<Item = (f32, f32)> + Clone,
    keep: impl Fn(f32, f32) -> bool,
) -> (f32, f32) {
    let kept = || pairs.clone().filter(|&(x, y)| keep(x, y));
    let n = kept().count();
    if n == 0 {
        return (1.0, 0.0);
    }
    let (sx, sy) = kept().fold((0.0f64, 0.0f64), |(sx, sy), (x, y)| {
        (sx + f64::from(x), sy + f64::from(y))
    });
    let (mx, my) = (sx / n as f64, sy / n as f64);
    let (var, cov) = kept().fold((0.0f64, 0.0f64), |(var, cov), (x, y)| {
        let dx = f64::from(x) - mx;
        (var + dx * dx, cov + dx * (f64::from(y) - my))
    });
    let gain = if var < n as f64 {
        1.0
    } else {
        (cov / var).clamp(0.5, 2.0)
    };
    (gain as f32, (my - gain * mx) as f32)
}

/// Thumbnail cells as base64 in checkpoints (a 64x36 one is 3 KB of text, not 9 KB of numbers).
mod b64 {
    use super::*;

    pub fn serialize<S: serde::Serializer>(cells: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(cells))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(v: u8) -> Thumb {
        Thumb {
            width: 64,
            height: 36,
            cells: vec![v; 64 * 36],
        }
    }

    fn spec() -> GateSpec {
        GateSpec {
            threshold: DEFAULT_THRESHOLD,
            max_interval_s: 30.0,
        }
    }

    #[test]
    fn thumbnails_keep_the_aspect_ratio() {
        assert_eq!(Gate::thumb_size(1280, 720), (64, 36));
        assert_eq!(Gate::thumb_size(720, 1280), (36, 64));
        assert_eq!(Gate::thumb_size(1919, 1079), (64, 36));
        assert_eq!(Gate::thumb_size(40, 30), (40, 30));
    }

    #[test]
    fn brightness_changing_everywhere_alike_is_not_a_change() {
        let mut a = flat(100);
        a.cells[..64 * 18].fill(40);
        for (gain, offset) in [(1.3, 0.0), (1.0, 25.0), (0.8, 20.0), (1.0, -30.0)] {
            let b = Thumb {
                cells: a
                    .cells
                    .iter()
                    .map(|&v| (f32::from(v) * gain + offset).round() as u8)
                    .collect(),
                ..a.clone()
            };
            assert_eq!(difference(&a, &b), Some(0.0), "{gain} {offset}");
        }
    }

    #[test]
    fn a_region_changing_counts_its_share_of_cells() {
        let a = flat(100);
        let mut b = a.clone();
        // A 10x10-cell object: 100 of 2304 cells.
        for row in 10..20 {
            b.cells[row * 64 + 20..row * 64 + 30].fill(200);
        }
        let d = difference(&a, &b).unwrap();
        assert!((d - 100.0 / 2304.0).abs() < 0.005, "{d}");
    }

    #[test]
    fn the_gate_sends_changes_and_at_least_every_max_interval() {
        let mut gate = Gate::new(spec());
        assert_eq!(gate.judge(flat(100), 0), Change::New);
        assert!(matches!(
            gate.judge(flat(101), 500),
            Change::Unchanged { since_ms: 0, .. }
        ));
        let mut moved = flat(100);
        moved.cells[..200].fill(250);
        assert!(matches!(
            gate.judge(moved.clone(), 1000),
            Change::Changed(_)
        ));
        // Compared with the picture sent at 1000 ms now.
        assert!(matches!(
            gate.judge(moved.clone(), 1500),
            Change::Unchanged { since_ms: 1000, .. }
        ));
        assert_eq!(gate.judge(moved, 31_000), Change::New);
        // A picture of another size cannot be compared: it is sent.
        let small = Thumb {
            width: 32,
            height: 18,
            cells: vec![100; 32 * 18],
        };
        assert_eq!(gate.judge(small, 31_500), Change::New);
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut gate = Gate::new(spec());
        gate.judge(flat(7), 1234);
        let text = serde_json::to_string(&gate).unwrap();
        assert!(text.len() < 4000, "{}", text.len());
        let back: Gate = serde_json::from_str(&text).unwrap();
        assert_eq!(back, gate);
    }
}
