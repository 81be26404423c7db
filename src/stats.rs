//! A job's live counters, shared by its pipeline stages and read by status and metrics.
//!
//! Plain atomics: stages bump them without locks; the pipeline saves a snapshot to the
//! store as it goes, so status works across restarts and replicas.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        /// Counters of one job's pipeline.
        #[derive(Debug, Default)]
        pub struct Stats {
            $(pub $name: AtomicU64,)*
            /// Media time of the newest stored result, -1 before the first.
            pub last_pts_ms: AtomicI64,
            /// Media time of the newest segment end the source has listed, -1 if unknown.
            pub listed_ms: AtomicI64,
            /// `connected`, `reconnecting: ...` and so on, for sources with a connection.
            pub source_state: Mutex<String>,
        }

        /// A snapshot of [`Stats`], as status shows it and the store keeps it.
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        pub struct StatsSnapshot {
            $(#[serde(default)] pub $name: u64,)*
            pub last_pts_ms: Option<i64>,
            /// How far the newest result is behind the newest listed media, live HLS only.
            pub live_lag_ms: Option<i64>,
            #[serde(default, skip_serializing_if = "String::is_empty")]
            pub source_state: String,
        }

        impl Stats {
            pub fn snapshot(&self) -> StatsSnapshot {
                let last = self.last_pts_ms.load(Ordering::Relaxed);
                let listed = self.listed_ms.load(Ordering::Relaxed);
                StatsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                    last_pts_ms: (last >= 0).then_some(last),
                    live_lag_ms: (last >= 0 && listed >= 0).then(|| (listed - last).max(0)),
                    source_state: self.source_state.lock().map(|s| s.clone()).unwrap_or_default(),
                }
            }

            /// Continues from a saved snapshot (a resumed job).
            pub fn restore(snapshot: &StatsSnapshot) -> Self {
                let s = Self::new();
                $(s.$name.store(snapshot.$name, Ordering::Relaxed);)*
                s.last_pts_ms.store(snapshot.last_pts_ms.unwrap_or(-1), Ordering::Relaxed);
                s
            }

            /// Adds this job's change since `before` to the process-wide Prometheus counters.
            pub fn export_delta(before: &StatsSnapshot, now: &StatsSnapshot) {
                $(metrics::counter!(concat!("free_roam_pipeline_", stringify!($name), "_total"))
                    .increment(now.$name.saturating_sub(before.$name));)*
            }
        }
    };
}

counters!(
    segments_fetched,
    segments_failed,
    segments_missed,
    segments_timed_out,
    frames_decoded,
    frames_sampled,
    frames_dropped,
    corrupt_packets,
    entries_read,
    entries_invalid,
    results,
    errors,
    reconnects,
    results_stream_failures,
    alert_calls,
    alert_unparseable,
    frames_gated,
    model_calls_saved,
);

impl Stats {
    pub fn new() -> Self {
        let s = Self::default();
        s.last_pts_ms.store(-1, Ordering::Relaxed);
        s.listed_ms.store(-1, Ordering::Relaxed);
        s
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn source_state(&self) -> String {
        self.source_state
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    pub fn set_source_state(&self, state: impl Into<String>) {
        if let Ok(mut s) = self.source_state.lock() {
            *s = state.into();
        }
    }
}

/// The latency of a job's newest results (at most [`LatencyWindow::CAPACITY`]), kept by its
/// writer so that status reads p50/p95/p99 saved with the job instead of scanning results.
#[derive(Debug, Default)]
pub struct LatencyWindow {
    phases: std::collections::VecDeque<[f64; 4]>,
}

impl LatencyWindow {
    pub const CAPACITY: usize = 1000;
    const PHASES: [&'static str; 4] = ["queue", "preprocess", "inference", "total"];

    /// A window holding `latencies` (JSON objects with the phases in ms), oldest first.
    pub fn from_json<'a>(latencies: impl IntoIterator<Item = &'a serde_json::Value>) -> Self {
        let mut w = Self::default();
        for l in latencies {
            let v = Self::PHASES.map(|p| l[p].as_f64().unwrap_or(f64::NAN));
            w.push(v);
        }
        w
    }

    /// Adds one result's [queue, preprocess, inference, total] in ms.
    pub fn push(&mut self, phases: [f64; 4]) {
        if self.phases.len() == Self::CAPACITY {
            self.phases.pop_front();
        }
        self.phases.push_back(phases);
    }

    /// p50/p95/p99 per phase (nearest rank), as status shows them.
    pub fn percentiles(&self) -> serde_json::Value {
        let mut out = serde_json::Map::new();
        for (i, phase) in Self::PHASES.iter().enumerate() {
            let mut v: Vec<f64> = self
                .phases
                .iter()
                .map(|p| p[i])
                .filter(|x| x.is_finite())
                .collect();
            if v.is_empty() {
                continue;
            }
            v.sort_by(f64::total_cmp);
            let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
            out.insert(
                (*phase).to_owned(),
                serde_json::json!({"p50": at(0.50), "p95": at(0.95), "p99": at(0.99)}),
            );
        }
        serde_json::Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_over_the_newest_results() {
        let mut w = LatencyWindow::default();
        for i in 1..=(LatencyWindow::CAPACITY + 100) {
            let ms = i as f64;
            w.push([ms, 0.0, ms * 2.0, ms * 3.0]);
        }
        let p = w.percentiles();
        // The oldest 100 were pushed out: the window is 101..=1100.
        assert_eq!(p["queue"]["p50"], 600.0);
        assert_eq!(p["queue"]["p99"], 1090.0);
        assert_eq!(p["inference"]["p95"], 2100.0);
        assert_eq!(p["total"]["p50"], 1800.0);
        assert!(LatencyWindow::default()
            .percentiles()
            .as_object()
            .unwrap()
            .is_empty());
    }
}
