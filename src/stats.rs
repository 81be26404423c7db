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

    pub fn set_source_state(&self, state: impl Into<String>) {
        if let Ok(mut s) = self.source_state.lock() {
            *s = state.into();
        }
    }
}
