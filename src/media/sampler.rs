//! Chooses frames by presentation time: one per `1/fps` of media time, starting at the first
//! frame, never by frame count. Pure logic; its state is small and serialisable so a resumed
//! job samples on the same grid.

use serde::{Deserialize, Serialize};

/// A frame this close before a target still counts as reaching it (timestamp rounding).
const TOLERANCE_MS: f64 = 0.5;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampler {
    interval_ms: f64,
    /// Media time the next kept frame must reach; `None` until the first frame.
    next_target_ms: Option<f64>,
}

impl Sampler {
    pub fn new(fps: f64) -> Self {
        Self {
            interval_ms: 1000.0 / fps,
            next_target_ms: None,
        }
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
    fn state_round_trips() {
        let mut s = Sampler::new(2.0);
        s.offer(0.0);
        let copy: Sampler = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(copy, s);
        assert!(!copy.wants(400.0));
        assert!(copy.wants(500.0));
    }
}
