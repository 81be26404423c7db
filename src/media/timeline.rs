//! Maps a stream's own timestamps onto the job's media time: milliseconds from the start of
//! the media the job read, container start offsets removed, continuing across segments,
//! discontinuities and timestamp wraps. Pure logic, serialisable for resume.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    /// Added to a raw timestamp (ms) to get media time; `None` before the first segment.
    offset_ms: Option<f64>,
    /// Where the next segment should start on the media timeline.
    expected_next_ms: f64,
}

impl Timeline {
    /// Starts a segment whose earliest raw timestamp is `raw_start_ms` and whose playlist
    /// duration is `duration_ms`; returns the segment's start on the media timeline.
    ///
    /// The mapping is re-anchored (the segment starts where the previous one ended) at a
    /// discontinuity, or when the raw timestamps jump further than `tolerance_ms` from where
    /// the segment was expected (a missing discontinuity tag, an MPEG-TS timestamp wrap).
    pub fn begin_segment(
        &mut self,
        raw_start_ms: f64,
        duration_ms: f64,
        discontinuity: bool,
        tolerance_ms: f64,
    ) -> f64 {
        let offset = match self.offset_ms {
            None => -raw_start_ms,
            Some(offset) => {
                let mapped = raw_start_ms + offset;
                if discontinuity || (mapped - self.expected_next_ms).abs() > tolerance_ms {
                    self.expected_next_ms - raw_start_ms
                } else {
                    offset
                }
            }
        };
        self.offset_ms = Some(offset);
        let start = raw_start_ms + offset;
        self.expected_next_ms = start + duration_ms;
        start
    }

    /// A segment of `duration_ms` was skipped (failed or abandoned): the next one starts later.
    pub fn skip_segment(&mut self, duration_ms: f64) {
        if self.offset_ms.is_some() {
            self.expected_next_ms += duration_ms;
        }
    }

    /// Media time of a raw timestamp in the current segment.
    pub fn media_ms(&self, raw_ms: f64) -> f64 {
        raw_ms + self.offset_ms.unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_the_container_start_offset_and_continues() {
        let mut t = Timeline::default();
        assert_eq!(t.begin_segment(1400.0, 2000.0, false, 1000.0), 0.0);
        assert_eq!(t.media_ms(1900.0), 500.0);
        assert_eq!(t.begin_segment(3400.0, 2000.0, false, 1000.0), 2000.0);
        assert_eq!(t.media_ms(3400.0 + 40.0), 2040.0);
    }

    #[test]
    fn discontinuity_and_jumps_continue_where_the_last_segment_ended() {
        let mut t = Timeline::default();
        t.begin_segment(10_000.0, 2000.0, false, 1000.0);
        // A new encoder restarts its clock at 0: tagged discontinuity.
        assert_eq!(t.begin_segment(0.0, 2000.0, true, 1000.0), 2000.0);
        assert_eq!(t.media_ms(500.0), 2500.0);
        // An untagged wrap is caught by the tolerance.
        assert_eq!(t.begin_segment(95_000_000.0, 2000.0, false, 1000.0), 4000.0);
        // Small jitter within tolerance keeps the mapping.
        assert_eq!(t.begin_segment(95_002_100.0, 2000.0, false, 1000.0), 6100.0);
    }
}
