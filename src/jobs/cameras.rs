//! An RTSP job's pipeline: the camera's access units (from `ingest::rtsp`, which reconnects)
//! grouped from keyframe to keyframe, each group decoded on a blocking thread like an HLS
//! segment and its frames sent on; live, so a full lane drops its oldest frame. A checkpoint
//! after each group keeps the timeline: a resumed job's results follow the stored ones. The
//! camera's sender reports date each frame (`captured_at`) by the camera's own clock.

use std::sync::Arc;

use tokio::sync::mpsc;
use url::Url;

use super::dispatch::Work;
use super::pipeline::{source_ended, Outcome, Pending, Pipeline, Progress};
use crate::batch::{LaneHandle, WhenFull};
use crate::ingest::rtsp::{RtspEvent, RtspSource, WallClock};
use crate::media::decode::{DecodeError, DecodeState, Sampled};
use crate::media::sampler::Sampler;
use crate::media::units::{Unit, UnitDecoder, UnitParams};
use crate::stats::Stats;

impl Pipeline {
    /// Reads the camera until the job is cancelled, or the source gives up.
    pub(super) async fn rtsp(
        &self,
        url: Url,
        progress: Progress,
        lane: &LaneHandle<Work>,
        pending: mpsc::Sender<Pending>,
    ) -> Outcome {
        lane.set_when_full(WhenFull::DropOldest);
        let stop = self.cancel.child_token();
        let source = RtspSource {
            url,
            settings: self.settings.pipeline.rtsp.clone(),
            policy: self.settings.pipeline.network_policy(),
            start_ms: progress.rtsp_next_ms.unwrap_or(0),
        };
        let (tx, mut rx) = mpsc::channel(256);
        let source_task = tokio::spawn(source.run(tx, self.stats.clone(), stop.clone()));
        let mut state = Group {
            decoder: Some(UnitDecoder::new(
                self.decode_limits(),
                self.spec,
                self.evidence,
            )),
            decode: progress.decode.unwrap_or_default(),
            sampler: progress.sampler.unwrap_or_else(|| self.new_sampler()),
            params: None,
            units: Vec::new(),
            bytes: 0,
            discontinuity: false,
        };
        let mut failure = None;
        let max_group_bytes = self.settings.pipeline.max_segment_bytes;
        // This session's wall clock, from its latest sender report.
        let mut clock: Option<WallClock> = None;
        while let Some(event) = tokio::select! { _ = stop.cancelled() => None, e = rx.recv() => e }
        {
            // The clock of the group decoded now: a new session's comes with its reports.
            let dating = clock;
            let ready = match event {
                RtspEvent::Connected {
                    params,
                    new_session,
                } => {
                    // A new session (or new parameter sets): what was gathered is decoded with
                    // the old ones, then decoding starts again at the next keyframe.
                    let done = state.take(None);
                    if new_session {
                        clock = None;
                    }
                    state.discontinuity |= state.params.as_ref() != Some(&params);
                    state.params = Some(params);
                    done
                }
                RtspEvent::Clock(c) => {
                    clock = Some(c);
                    None
                }
                RtspEvent::Unit(unit) => {
                    if unit.key {
                        let done = state.take(Some(unit.pts_ms));
                        state.push(unit);
                        done
                    } else if state.units.is_empty() {
                        // Nothing decodes before the first keyframe.
                        None
                    } else if state.bytes + unit.data.len() > max_group_bytes {
                        // A camera that stops sending keyframes must not fill memory: what
                        // was gathered is dropped, and decoding waits for the next one.
                        tracing::warn!(job_id = %self.job_id, bytes = state.bytes, "no keyframe within MAX_SEGMENT_BYTES of video; frames dropped until the next keyframe");
                        Stats::add(&self.stats.segments_failed, 1);
                        state.units.clear();
                        state.bytes = 0;
                        None
                    } else {
                        state.push(unit);
                        None
                    }
                }
            };
            let Some((params, units, next, discontinuity)) = ready else {
                continue;
            };
            match state
                .decode(&self.media, params, units, next, discontinuity)
                .await
            {
                Ok(Some(mut out)) => {
                    for sampled in &mut out.frames {
                        match sampled {
                            Sampled::Frame { frame, .. } => {
                                frame.captured_at = dating.map(|c| c.at(frame.pts_ms));
                            }
                            Sampled::Unchanged {
                                pts_ms,
                                captured_at,
                                ..
                            } => *captured_at = dating.map(|c| c.at(*pts_ms)),
                            Sampled::Unusable(_) => {}
                        }
                    }
                    if !self.deliver(out, lane, &pending, &stop).await {
                        break;
                    }
                    let checkpoint = Progress {
                        decode: Some(state.decode.clone()),
                        sampler: Some(state.sampler.clone()),
                        rtsp_next_ms: next.map(|n| n + 1),
                        ..Progress::default()
                    };
                    if !self.checkpoint(checkpoint, &pending).await {
                        break;
                    }
                }
                Ok(None) => {}
                Err(e @ DecodeError::FrameTooLarge { .. }) => {
                    failure = Some(e.to_string());
                    break;
                }
                Err(_) if state.decoder.is_none() => {
                    failure = Some("the decoder crashed".to_owned());
                    break;
                }
                Err(e) => {
                    tracing::warn!(job_id = %self.job_id, error = %e, "camera frames not decodable; skipped");
                    Stats::add(&self.stats.segments_failed, 1);
                }
            }
        }
        drop(pending);
        stop.cancel();
        // A camera has no end of its own: the source returns Ok only when stopped.
        source_ended(failure, source_task.await, Outcome::Stopped, "RTSP")
    }
}

/// A camera job's decoding state: the group of pictures being gathered and the decoder.
struct Group {
    decoder: Option<UnitDecoder>,
    decode: DecodeState,
    sampler: Sampler,
    params: Option<Arc<UnitParams>>,
    units: Vec<Unit>,
    /// Bytes of `units`.
    bytes: usize,
    discontinuity: bool,
}

type Ready = (Arc<UnitParams>, Vec<Unit>, Option<i64>, bool);

impl Group {
    /// The gathered group, to decode, if there is one (and parameters for it).
    fn take(&mut self, next: Option<i64>) -> Option<Ready> {
        if self.units.is_empty() {
            return None;
        }
        let units = std::mem::take(&mut self.units);
        self.bytes = 0;
        let params = self.params.clone()?;
        let discontinuity = std::mem::take(&mut self.discontinuity);
        Some((params, units, next, discontinuity))
    }

    fn push(&mut self, unit: Unit) {
        self.bytes += unit.data.len();
        self.units.push(unit);
    }

    async fn decode(
        &mut self,
        media: &crate::media::workers::MediaWorkers,
        params: Arc<UnitParams>,
        units: Vec<Unit>,
        next: Option<i64>,
        discontinuity: bool,
    ) -> Result<Option<crate::media::decode::SegmentOutcome>, DecodeError> {
        let Some(mut decoder) = self.decoder.take() else {
            return Ok(None);
        };
        let (mut st, mut sm) = (self.decode.clone(), self.sampler.clone());
        let span = tracing::Span::current();
        let joined = media
            .run(move || {
                let _g = span.enter();
                let r = decoder.decode(&params, units, next, discontinuity, &mut st, &mut sm);
                (r, st, sm, decoder)
            })
            .await;
        let Ok((result, st, sm, decoder)) = joined else {
            return Err(DecodeError::Unreadable("the decoder crashed".into()));
        };
        self.decoder = Some(decoder);
        if result.is_ok() {
            self.decode = st;
            self.sampler = sm;
        }
        result.map(Some)
    }
}
