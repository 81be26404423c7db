//! Chooses frames by presentation time: one per `1/fps` of media time, starting at the first
//! frame, never by frame count. With clips, `frames` consecutive samples make one clip and
//! the next clip starts `stride` after the first frame of the one before. Pure logic; its
//! state (with the job's change gate, [`super::gate`]) is small and serialisable so a resumed
//! job samples on the same grid and compares against the same picture.

use serde::{Deserialize, Serialize};

use super::gate::{Gate, GateSpec};

/// A frame this close before a target still counts as reaching it (timestamp rounding).
const TOLERANCE_MS: f64 = 0.5;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampler {
    interval_ms: f64,
    /// Media time the next kept frame must reach; `None` until the first frame.
    next_target_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    clip: Option<ClipGrid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gate: Option<Gate>,
}

/// Where clips of `frames` samples start: every `stride_ms` from the first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ClipGrid {
    frames: u32,
    stride_ms: f64,
    /// Samples kept of the clip being gathered, and when its first was.
    taken: u32,
    start_ms: f64,
}

impl Sampler {
    pub fn new(fps: f64) -> Self {
        Self {
            interval_ms: 1000.0 / fps,
            next_target_ms: None,
            clip: None,
            gate: None,
        }
    }

    /// Keeps clips of `frames` samples, each starting `stride_ms` after the one before
    /// (at least the clip's own length: clips never overlap).
    pub fn with_clips(mut self, frames: u32, stride_ms: Option<f64>) -> Self {
        let length = f64::from(frames) * self.interval_ms;
        self.clip = Some(ClipGrid {
            frames: frames.max(1),
            stride_ms: stride_ms.unwrap_or(length).max(length),
            taken: 0,
            start_ms: 0.0,
        });
        self
    }

    /// Judges every kept frame with a change gate.
    pub fn with_gate(mut self, spec: GateSpec) -> Self {
        self.gate = Some(Gate::new(spec));
        self
    }

    /// The job's change gate, if it has one.
    pub fn gate_mut(&mut self) -> Option<&mut Gate> {
        self.gate.as_mut()
    }

    /// Takes the gate out (to judge pictures on another thread); [`Sampler::put_gate`] puts
    /// it back.
    pub fn take_gate(&mut self) -> Option<Gate> {
        self.gate.take()
    }

    pub fn put_gate(&mut self, gate: Option<Gate>) {
        self.gate = gate;
    }

    /// Whether samples are gathered into clips.
    pub fn clips(&self) -> bool {
        self.clip.is_some()
    }

    /// Whether a clip is being gathered (some of its samples kept, not all).
    pub fn in_clip(&self) -> bool {
        self.clip.as_ref().is_some_and(|c| c.taken > 0)
    }

    pub fn interval_ms(&self) -> f64 {
        self.interval_ms
    }

    /// The media time the next kept frame must reach; `None` means any frame is kept.
    pub fn next_target_ms(&self) -> Option<f64> {
        self.next_target_ms
    }

    /// Whether a frame at `t_ms` would be kept, without keeping it.
    pub fn wants(&self, t_ms: f64) -> bool {
        self.next_target_ms
            .is_none_or(|target| t_ms + TOLERANCE_MS >= target)
    }

    /// Offers a frame at media time `t_ms` (frames come in presentation order); returns
    /// whether to keep it. Targets stay on the grid `first + k * interval`.
    pub fn offer(&mut self, t_ms: f64) -> bool {
        if !self.wants(t_ms) {
            return false;
        }
        let mut target = self.next_target_ms.unwrap_or(t_ms);
        while target <= t_ms + TOLERANCE_MS {
            target += self.interval_ms;
        }
        if let Some(clip) = self.clip.as_mut() {
            if clip.taken == 0 {
                clip.start_ms = t_ms;
            }
            clip.taken += 1;
            if clip.taken == clip.frames {
                clip.taken = 0;
                let next = clip.start_ms + clip.stride_ms;
                while target + TOLERANCE_MS < next {
                    target += self.interval_ms;
                }
            }
        }
        self.next_target_ms = Some(target);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(fps: f64, frame_ms: impl Iterator<Item = f64>) -> Vec<f64> {
        let mut s = Sampler::new(fps);
        frame_ms.filter(|t| s.offer(*t)).collect()
    }

    #[test]
    fn thirty_fps_at_two_fps_keeps_every_fifteenth_frame() {
        let frames = (0..90).map(|i| i as f64 * 1000.0 / 30.0);
        assert_eq!(
            kept(2.0, frames),
            vec![0.0, 500.0, 1000.0, 1500.0, 2000.0, 2500.0]
        );
    }

    #[test]
    fn grid_starts_at_the_first_frame_not_zero() {
        let frames = (0..60).map(|i| 1234.0 + i as f64 * 40.0);
        let k = kept(1.0, frames);
        assert_eq!(k[0], 1234.0);
        assert_eq!(k[1], 2234.0);
    }

    #[test]
    fn variable_frame_rate_and_gaps_pick_the_first_frame_at_or_after_each_target() {
        let frames = [0.0, 100.0, 480.0, 510.0, 2600.0, 2990.0, 3010.0].into_iter();
        // Targets 0, 500, (gap) 2600 -> next grid point after 2600 is 3000.
        assert_eq!(kept(2.0, frames), vec![0.0, 510.0, 2600.0, 3010.0]);
    }

    #[test]
    fn fractional_fps() {
        let frames = (0..300).map(|i| i as f64 * 100.0);
        assert_eq!(kept(0.1, frames), vec![0.0, 10_000.0, 20_000.0]);
    }

    #[test]
    fn clips_gather_consecutive_samples_and_start_a_stride_apart() {
        let frames = (0..300).map(|i| i as f64 * 100.0);
        let mut s = Sampler::new(2.0).with_clips(3, Some(5000.0));
        let mut kept = Vec::new();
        for t in frames {
            if s.offer(t) {
                kept.push((t, s.in_clip()));
            }
        }
        let times: Vec<f64> = kept.iter().map(|k| k.0).take(7).collect();
        assert_eq!(
            times,
            [0.0, 500.0, 1000.0, 5000.0, 5500.0, 6000.0, 10_000.0]
        );
        // Open after the first and second of each clip, closed after the third.
        assert!(kept[0].1 && kept[1].1 && !kept[2].1);
        // Without a stride, clips follow each other on the sampling grid.
        let mut s = Sampler::new(2.0).with_clips(3, None);
        let tiled: Vec<f64> = (0..40)
            .map(|i| i as f64 * 100.0)
            .filter(|t| s.offer(*t))
            .collect();
        assert_eq!(
            tiled,
            [0.0, 500.0, 1000.0, 1500.0, 2000.0, 2500.0, 3000.0, 3500.0]
        );
    }

    #[test]
    fn state_round_trips() {
        let mut s = Sampler::new(2.0);
        s.offer(0.0);
        let copy: Sampler = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(copy, s);
        assert!(!copy.wants(400.0));
        assert!(copy.wants(500.0));
    }
}
