//! The HLS source: loads the playlist (choosing a variant from a master), then hands each
//! media segment, once, in media-sequence order, to the decoder stage.
//!
//! VOD (EXT-X-ENDLIST) is read whole. Live playlists start at the live edge (the newest
//! segment) unless `from_beginning`, and reload per RFC 8216 §6.3.4: after the target
//! duration when the playlist changed, after half of it when it did not. The first reload
//! waits a random part of a target duration more: reloads keep the phase they start with,
//! and jobs started (or resumed) together would otherwise find their new segments in the
//! same instant every target duration and decode them all at once. A playlist that adds
//! nothing, or cannot be fetched, for `stall_target_durations` target durations ends the job.
//!
//! Reloads wake on time to a fraction of a millisecond ([`wake_at`]). The RFC lets a reload
//! come no sooner than a target duration after the last began, so whatever a wake is late
//! moves every later reload too: against an origin listing a segment every target duration,
//! tokio's millisecond timer (about 1.2 ms late a wake) moved the reload phase ~1 ms per
//! segment until a reload came after the next listing and found two segments at once, the
//! newest results then two segments behind the live edge.

pub mod fetch;
pub mod playlist;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use url::Url;

use self::fetch::{FetchError, Fetcher};
use self::playlist::{Playlist, Resource, Segment};
use crate::stats::Stats;

#[derive(Debug, Clone)]
pub struct HlsLimits {
    pub max_input_height: u64,
    pub max_playlist_bytes: usize,
    pub max_segment_bytes: usize,
    pub stall_target_durations: u32,
}

/// A fetched segment, ready to demux: for fMP4 the init section comes first.
#[derive(Debug)]
pub struct SegmentData {
    pub seq: u64,
    pub bytes: Vec<u8>,
    pub duration_ms: f64,
    pub discontinuity: bool,
}

/// What the source hands to the decoder stage.
#[derive(Debug)]
pub enum HlsEvent {
    /// The playlist was read: `live` unless it carries EXT-X-ENDLIST.
    Started {
        live: bool,
    },
    Segment(SegmentData),
    /// The segment could not be fetched after retries; it is skipped.
    Failed {
        seq: u64,
        duration_ms: f64,
        error: String,
    },
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum HlsError {
    #[error("{0}")]
    Fetch(#[from] FetchError),
    #[error("{0}")]
    Playlist(#[from] playlist::PlaylistError),
    #[error("the variant playlist is a master playlist again")]
    NestedMaster,
    #[error("live playlist stalled: no new segment for {0:.0} s")]
    Stalled(f64),
    #[error("playlist unavailable for {secs:.0} s: {last_error}")]
    Vanished { secs: f64, last_error: String },
}

/// How much later than the RFC's earliest a live job's first reload comes: uniformly random
/// within one target duration, so that the phases of jobs started together spread out.
fn reload_phase(target_duration_ms: f64) -> Duration {
    use rand::Rng;
    let ms = target_duration_ms.max(0.0) as u64;
    Duration::from_millis(rand::rng().random_range(0..=ms))
}

/// Waits until `due` and wakes within a fraction of a millisecond of it, never before: tokio's
/// timer wheel counts whole milliseconds and wakes about 1.2 ms late on average, so the last
/// stretch is slept on a blocking thread (the kernel's high-resolution timer, ~0.1 ms).
async fn wake_at(due: Instant) {
    const LAST_STRETCH: Duration = Duration::from_millis(2);
    if let Some(coarse) = due.checked_sub(LAST_STRETCH) {
        tokio::time::sleep_until(coarse).await;
    }
    let rest = due.saturating_duration_since(Instant::now());
    if !rest.is_zero() {
        // Detached if the caller gives up (cancellation): it ends within LAST_STRETCH anyway.
        let _ = tokio::task::spawn_blocking(move || std::thread::sleep(rest)).await;
    }
    // Never early, also where tokio's clock is not the wall clock (paused in tests).
    if Instant::now() < due {
        tokio::time::sleep_until(due).await;
    }
}

pub struct HlsSource {
    pub url: Url,
    pub fetcher: Fetcher,
    pub limits: HlsLimits,
    pub from_beginning: bool,
    /// Resume: the last media sequence already handed on by an earlier run.
    pub resume_after: Option<u64>,
}

impl HlsSource {
    /// Runs until the VOD ends (Ok), a fatal error, or cancellation (Ok).
    pub async fn run(
        self,
        tx: mpsc::Sender<HlsEvent>,
        stats: Arc<Stats>,
        cancel: CancellationToken,
    ) -> Result<(), HlsError> {
        // RFC 8216 §6.3.4 times reloads from when the last load *began*: fetching and handing
        // on segments in between must not push the next reload later (that drifted reloads
        // behind the live edge until one found two new segments at once).
        let mut load_began = tokio::time::Instant::now();
        let (media_url, mut playlist) = match self.load(&self.url, &cancel).await? {
            Playlist::Media(m) => (self.url.clone(), m),
            Playlist::Master(variants) => {
                let chosen = playlist::choose_variant(&variants, self.limits.max_input_height)
                    .ok_or(HlsError::NestedMaster)?
                    .clone();
                tracing::info!(variant = %chosen.url, bandwidth = chosen.bandwidth, height = ?chosen.height, "chose HLS variant");
                load_began = tokio::time::Instant::now();
                match self.load(&chosen.url, &cancel).await? {
                    Playlist::Media(m) => (chosen.url, m),
                    Playlist::Master(_) => return Err(HlsError::NestedMaster),
                }
            }
        };
        let first = playlist.segments.first().map(|s| s.seq).unwrap_or(0);
        let mut next_seq = match self.resume_after {
            Some(done) => done + 1,
            None if playlist.ended || self.from_beginning => first,
            None => playlist.last_seq().unwrap_or(first),
        };
        if tx
            .send(HlsEvent::Started {
                live: !playlist.ended,
            })
            .await
            .is_err()
        {
            return Ok(());
        }
        let mut init_cache: Option<(Resource, Vec<u8>)> = None;
        let mut listed_ms = 0.0;
        let mut first_reload = true;
        let mut last_change = Instant::now();
        loop {
            if let Some(oldest) = playlist.segments.first().map(|s| s.seq) {
                if next_seq < oldest {
                    // Segments left the playlist before we got to them.
                    Stats::add(&stats.segments_missed, oldest - next_seq);
                    next_seq = oldest;
                }
            }
            let start = next_seq;
            for segment in playlist.segments.iter().filter(|s| s.seq >= start) {
                listed_ms += segment.duration_ms;
                // Lag behind the live edge means nothing for a VOD.
                if !playlist.ended {
                    stats.listed_ms.store(listed_ms as i64, Ordering::Relaxed);
                }
                let event = match self.fetch_segment(segment, &mut init_cache, &cancel).await {
                    Ok(bytes) => {
                        Stats::add(&stats.segments_fetched, 1);
                        HlsEvent::Segment(SegmentData {
                            seq: segment.seq,
                            bytes,
                            duration_ms: segment.duration_ms,
                            discontinuity: segment.discontinuity,
                        })
                    }
                    Err(FetchError::Cancelled) => return Ok(()),
                    Err(e @ FetchError::Refused(_)) => return Err(e.into()),
                    Err(e) => HlsEvent::Failed {
                        seq: segment.seq,
                        duration_ms: segment.duration_ms,
                        error: e.to_string(),
                    },
                };
                next_seq = segment.seq + 1;
                if tx.send(event).await.is_err() {
                    return Ok(());
                }
            }
            if playlist.ended {
                return Ok(());
            }
            // RFC 8216 §6.3.4 reload timing; stall and vanish detection.
            let mut due = load_began + Duration::from_millis(playlist.target_duration_ms as u64);
            if std::mem::take(&mut first_reload) {
                due += reload_phase(playlist.target_duration_ms);
            }
            let stall_limit = Duration::from_millis(
                (playlist.target_duration_ms * f64::from(self.limits.stall_target_durations))
                    as u64,
            );
            let mut failing_since: Option<(Instant, String)> = None;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = wake_at(due) => {}
                }
                load_began = tokio::time::Instant::now();
                let half = Duration::from_millis((playlist.target_duration_ms / 2.0) as u64);
                match self.load(&media_url, &cancel).await {
                    Ok(Playlist::Media(m)) => {
                        if m.last_seq() != playlist.last_seq() || m.ended != playlist.ended {
                            last_change = Instant::now();
                            playlist = m;
                            break;
                        }
                        playlist = m;
                        if last_change.elapsed() > stall_limit {
                            return Err(HlsError::Stalled(last_change.elapsed().as_secs_f64()));
                        }
                        due = load_began + half;
                    }
                    Ok(Playlist::Master(_)) => return Err(HlsError::NestedMaster),
                    Err(HlsError::Fetch(FetchError::Cancelled)) => return Ok(()),
                    Err(e @ HlsError::Fetch(FetchError::Refused(_))) => return Err(e),
                    Err(e) => {
                        let since =
                            failing_since.get_or_insert_with(|| (Instant::now(), String::new()));
                        since.1 = e.to_string();
                        if since.0.elapsed() > stall_limit || last_change.elapsed() > stall_limit {
                            return Err(HlsError::Vanished {
                                secs: last_change.elapsed().as_secs_f64(),
                                last_error: since.1.clone(),
                            });
                        }
                        due = load_began + half;
                    }
                }
            }
        }
    }

    async fn load(&self, url: &Url, cancel: &CancellationToken) -> Result<Playlist, HlsError> {
        let resource = Resource {
            url: url.clone(),
            range: None,
        };
        let bytes = self
            .fetcher
            .fetch(&resource, self.limits.max_playlist_bytes, cancel)
            .await?;
        Ok(playlist::parse(&bytes, url)?)
    }

    async fn fetch_segment(
        &self,
        segment: &Segment,
        init_cache: &mut Option<(Resource, Vec<u8>)>,
        cancel: &CancellationToken,
    ) -> Result<Vec<u8>, FetchError> {
        let limit = self.limits.max_segment_bytes;
        let mut bytes = Vec::new();
        if let Some(init) = &segment.init {
            if init_cache.as_ref().is_none_or(|(r, _)| r != init) {
                let data = self.fetcher.fetch(init, limit, cancel).await?;
                *init_cache = Some((init.clone(), data));
            }
            if let Some((_, data)) = init_cache {
                bytes.extend_from_slice(data);
            }
        }
        bytes.extend(self.fetcher.fetch(&segment.resource, limit, cancel).await?);
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reloads_spread_over_one_target_duration() {
        let phases: Vec<Duration> = (0..64).map(|_| reload_phase(2000.0)).collect();
        assert!(phases.iter().all(|p| *p <= Duration::from_secs(2)));
        let early = phases
            .iter()
            .filter(|p| **p < Duration::from_secs(1))
            .count();
        // Half in each half, give or take: all 64 in one half has odds of 2^-63.
        assert!((1..64).contains(&early), "{phases:?}");
    }
}
