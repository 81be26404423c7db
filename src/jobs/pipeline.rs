//! One job's pipeline: source → decode and sample → the model's batcher → the writer that
//! stores each answer in order.
//!
//! The writer is the only stage that touches the store for results: it awaits answers in the
//! order frames were sampled (so `seq` follows media time), moves the job's alert state with
//! each stored result (the store saves it and the events it fires in the same transaction),
//! acknowledges Redis entries after
//! their result is stored, and saves the job's progress (last HLS segment, decoder and
//! sampler state) once everything before that point is stored, so a restart resumes there.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use url::Url;

use super::dispatch::{Done, Work};
use super::publish::ResultStream;
use crate::answers::alerts::{AlertTracker, Verdict};
use crate::batch::{Batcher, LaneHandle, WhenFull};
use crate::config::Settings;
use crate::domain::{JobId, JobStatus, Source};
use crate::ingest::hls::fetch::Fetcher;
use crate::ingest::hls::{HlsEvent, HlsLimits, HlsSource};
use crate::ingest::redis::{Acker, RedisSource, RedisSourceConfig};
use crate::media::decode::{
    DecodeError, DecodeLimits, DecodeState, Sampled, SegmentBytes, SegmentDecoder, SegmentOutcome,
};
use crate::media::gate::GateSpec;
use crate::media::sampler::Sampler;
use crate::media::shape::Shaper;
use crate::media::workers::MediaWorkers;
use crate::media::{EvidenceSpec, Frame, FrameSpec, Still};
use crate::retry::Backoff;
use crate::stats::LatencyWindow;
use crate::stats::Stats;
use crate::store::{Appended, JobRecord, Lease, NewResult, Saved, Store, StoreError};

/// How a pipeline ended.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// The source ended (a VOD was read whole).
    Completed,
    Failed(String),
    /// Cancelled or shut down; the job's stored state is left for whoever comes next.
    Stopped,
}

/// How a job whose source ran as its own task ended: the pipeline's own failure first, then
/// the source's; `at_end` when the source ended by itself.
pub(super) fn source_ended<E: std::fmt::Display>(
    failure: Option<String>,
    source: Result<Result<(), E>, tokio::task::JoinError>,
    at_end: Outcome,
    kind: &str,
) -> Outcome {
    match (failure, source) {
        (Some(f), _) => Outcome::Failed(f),
        (None, Ok(Ok(()))) => at_end,
        (None, Ok(Err(e))) => Outcome::Failed(e.to_string()),
        (None, Err(_)) => Outcome::Failed(format!("the {kind} source crashed")),
    }
}

/// What a restart needs, saved in `jobs.progress`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    /// The last HLS media sequence whose results are all stored.
    pub hls_last_seq: Option<u64>,
    pub decode: Option<DecodeState>,
    pub sampler: Option<Sampler>,
    /// A file job: where the next piece of the file starts (microseconds of its timestamps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_position: Option<i64>,
    /// An RTSP job: where its timeline goes on after a restart (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtsp_next_ms: Option<i64>,
}

/// Where a sampled frame came from: what makes its result recognisable when work is
/// repeated (`results.source_key`), and what is acknowledged once it is stored.
#[derive(Debug, Clone)]
pub(super) enum Whence {
    /// Video: its presentation time.
    Media,
    /// A Redis entry, acknowledged after its result is stored.
    Entry(String),
    /// The evidence frame of result `seq` of job `job` (a replay).
    Replay { job: Arc<str>, seq: i64 },
}

impl Whence {
    fn source_key(&self, pts_ms: i64) -> String {
        match self {
            Whence::Media => format!("pts:{pts_ms}"),
            Whence::Entry(id) => format!("redis:{id}"),
            Whence::Replay { seq, .. } => format!("replay:{seq}"),
        }
    }
}

/// What the writer receives, in sampling order.
pub(super) enum Pending {
    Frame {
        pts_ms: i64,
        /// A clip's last frame.
        pts_end_ms: Option<i64>,
        captured_at: Option<f64>,
        reply: oneshot::Receiver<Done>,
        from: Whence,
    },
    /// A picture (or clip) the change gate held back: its result repeats the newest answer.
    Repeat {
        pts_ms: i64,
        pts_end_ms: Option<i64>,
        captured_at: Option<f64>,
        from: Whence,
    },
    /// Acknowledge a Redis entry that produced no frame (skipped by the sampler, invalid).
    Ack(String),
    /// Everything before this is stored: save the progress.
    Checkpoint(Progress),
}

pub struct Pipeline {
    pub job: JobRecord,
    /// This replica's hold on the job: every write carries it.
    pub lease: Lease,
    /// RESULTS_STREAM, when set: stored results are published there too.
    pub publish: Option<Arc<ResultStream>>,
    pub job_id: JobId,
    pub source: Source,
    pub model: String,
    /// How the model wants its frames; they are shaped so in the decode thread.
    pub spec: FrameSpec,
    /// The evidence JPEG made beside each frame, when evidence is kept.
    pub evidence: Option<EvidenceSpec>,
    pub store: Store,
    pub settings: Arc<Settings>,
    pub stats: Arc<Stats>,
    pub batcher: Arc<Batcher<Work>>,
    pub fetcher: Fetcher,
    /// Where decoding and shaping run, shared with every other job.
    pub media: MediaWorkers,
    pub cancel: CancellationToken,
    /// The clip being gathered (clip jobs).
    pub gathering: std::sync::Mutex<Gathering>,
}

/// A clip job's samples since its last clip was sent: its frames, the slots they fill
/// (a sample that could not be shaped fills one too), whether any changed, and the first
/// sample's time.
#[derive(Default)]
pub struct Gathering {
    frames: Vec<Frame>,
    slots: u32,
    changed: bool,
    first: Option<(i64, Option<f64>)>,
    unusable: Option<String>,
}

impl Pipeline {
    pub async fn run(self) -> Outcome {
        let progress: Progress =
            serde_json::from_value(self.job.progress.clone()).unwrap_or_default();
        // Alerts go on from the state the newest stored result left (events fire once).
        let alert_state = match self.store.alert_state(self.job_id.as_str()).await {
            Ok(state) => state,
            Err(e) => {
                tracing::error!(job_id = %self.job_id, error = %e, "cannot read the job's alert state; leaving the job for a later claim");
                return Outcome::Stopped;
            }
        };
        let lane = self.batcher.lane(
            self.job.priority.weight(),
            self.settings.pipeline.job_queue_frames,
            WhenFull::Block,
        );
        let (pending_tx, pending_rx) =
            mpsc::channel(self.settings.pipeline.job_queue_frames * 2 + 64);
        let (acker, source_ended) = match self.source.clone() {
            Source::Hls(url) => (None, self.hls(url, progress, &lane, pending_tx).boxed()),
            Source::Redis { server, key } => match self.redis_source(server, key) {
                Ok(source) => {
                    let acker = source.acker();
                    (
                        Some(acker),
                        self.redis(source, progress, &lane, pending_tx).boxed(),
                    )
                }
                Err(e) => return Outcome::Failed(format!("invalid Redis stream reference: {e}")),
            },
            Source::Rtsp(url) => (None, self.rtsp(url, progress, &lane, pending_tx).boxed()),
            Source::File(location) => (
                None,
                self.file(location, progress, &lane, pending_tx).boxed(),
            ),
            Source::Replay { job_id, from, to } => (
                None,
                self.replay(job_id.into(), from, to, &lane, pending_tx)
                    .boxed(),
            ),
        };
        // Percentiles go on from the results an earlier run stored.
        let latency = match self
            .store
            .recent_latencies(self.job_id.as_str(), LatencyWindow::CAPACITY as i64)
            .await
        {
            Ok(recent) => LatencyWindow::from_json(recent.iter().rev()),
            Err(e) => {
                tracing::warn!(job_id = %self.job_id, error = %e, "cannot read earlier latencies");
                LatencyWindow::default()
            }
        };
        let writer = Writer {
            lease: self.lease.clone(),
            publish: self.publish.clone(),
            latency: std::sync::Mutex::new(latency),
            store: self.store.clone(),
            job_id: self.job_id.clone(),
            model: self.model.clone(),
            stats: self.stats.clone(),
            acker,
            cancel: self.cancel.clone(),
        };
        let (ended, ()) = tokio::join!(source_ended, writer.run(pending_rx, alert_state));
        writer.save_stats(&self.stats.snapshot(), None).await;
        if self.cancel.is_cancelled() {
            // Cancelled by its user the job is over: its consumer group goes too. Stopped by a
            // shutdown it resumes later and needs the group's pending entries.
            if let Some(acker) = &writer.acker {
                let cancelled = self.store.get_job(self.job_id.as_str()).await;
                if matches!(cancelled, Ok(Some(ref j)) if j.status == JobStatus::Cancelled) {
                    acker.destroy_group().await;
                }
            }
            return Outcome::Stopped;
        }
        ended
    }

    /// Fetch and decode loop for HLS; returns when the source ends, fails or is cancelled.
    async fn hls(
        &self,
        url: Url,
        progress: Progress,
        lane: &LaneHandle<Work>,
        pending: mpsc::Sender<Pending>,
    ) -> Outcome {
        let p = &self.settings.pipeline;
        let source = HlsSource {
            url,
            fetcher: self.fetcher.clone(),
            limits: HlsLimits {
                max_input_height: p.max_input_height,
                max_playlist_bytes: p.max_playlist_bytes,
                max_segment_bytes: p.max_segment_bytes,
                stall_target_durations: p.stall_target_durations,
            },
            from_beginning: self.job.from_beginning,
            resume_after: progress.hls_last_seq,
        };
        let stop = self.cancel.child_token();
        // One segment fetched ahead of the one decoding: enough to overlap fetch and decode,
        // and each segment held costs the memory of its bytes.
        let (tx, mut rx) = mpsc::channel(1);
        let source_task = tokio::spawn(source.run(tx, self.stats.clone(), stop.clone()));
        let mut decode = progress.decode.unwrap_or_default();
        let mut sampler = progress.sampler.unwrap_or_else(|| self.new_sampler());
        let mut decoder =
            Some(SegmentDecoder::new(self.decode_limits(), self.spec).with_evidence(self.evidence));
        let mut failure = None;
        while let Some(event) = tokio::select! { _ = stop.cancelled() => None, e = rx.recv() => e }
        {
            match event {
                HlsEvent::Started { live } => lane.set_when_full(if live {
                    WhenFull::DropOldest
                } else {
                    WhenFull::Block
                }),
                HlsEvent::Failed {
                    seq,
                    duration_ms,
                    error,
                } => {
                    tracing::warn!(job_id = %self.job_id, seq, %error, "segment skipped");
                    Stats::add(&self.stats.segments_failed, 1);
                    decode.timeline.skip_segment(duration_ms);
                }
                HlsEvent::Segment(seg) => {
                    let seq = seg.seq;
                    let duration_ms = seg.duration_ms;
                    let (mut st, mut sm) = (decode.clone(), sampler.clone());
                    let Some(mut dec) = decoder.take() else {
                        break;
                    };
                    let started = std::time::Instant::now();
                    let span = tracing::Span::current();
                    let joined = self
                        .media
                        .run(move || {
                            let _g = span.enter();
                            let segment = SegmentBytes {
                                bytes: seg.bytes,
                                duration_ms: seg.duration_ms,
                                discontinuity: seg.discontinuity,
                            };
                            let r = dec.decode(segment, &mut st, &mut sm);
                            (r, st, sm, dec)
                        })
                        .await;
                    metrics::histogram!("free_roam_stage_seconds", "stage" => "decode", "model" => "").record(started.elapsed().as_secs_f64());
                    let Ok((result, st, sm, dec)) = joined else {
                        failure = Some("the decoder crashed".to_owned());
                        break;
                    };
                    decoder = Some(dec);
                    match result {
                        Ok(out) => {
                            decode = st;
                            sampler = sm;
                            self.deliver(out, lane, &pending, &stop).await;
                            let checkpoint = Progress {
                                hls_last_seq: Some(seq),
                                decode: Some(decode.clone()),
                                sampler: Some(sampler.clone()),
                                ..Progress::default()
                            };
                            if !self.checkpoint(checkpoint, &pending).await {
                                break;
                            }
                        }
                        Err(e @ DecodeError::FrameTooLarge { .. }) => {
                            failure = Some(e.to_string());
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(job_id = %self.job_id, seq, error = %e, "segment not decodable; skipped");
                            Stats::add(&self.stats.segments_failed, 1);
                            decode.timeline.skip_segment(duration_ms);
                        }
                    }
                }
            }
        }
        drop(pending);
        stop.cancel();
        source_ended(failure, source_task.await, Outcome::Completed, "HLS")
    }

    /// The decoder's limits, as the settings say.
    pub(super) fn decode_limits(&self) -> DecodeLimits {
        let p = &self.settings.pipeline;
        DecodeLimits {
            max_frame_pixels: p.max_frame_pixels,
            deadline: p.segment_decode_timeout,
            fast: p.fast_decode,
        }
    }

    /// Counts what a decoded segment (or piece of a file) gave and sends its frames on, each
    /// to the model or, when it could not be shaped, as its slot's error result. False when
    /// the job is stopping.
    pub(super) async fn deliver(
        &self,
        out: SegmentOutcome,
        lane: &LaneHandle<Work>,
        pending: &mpsc::Sender<Pending>,
        stop: &CancellationToken,
    ) -> bool {
        Stats::add(&self.stats.frames_decoded, out.frames_decoded);
        Stats::add(&self.stats.corrupt_packets, out.corrupt);
        Stats::add(&self.stats.frames_sampled, out.frames.len() as u64);
        if out.timed_out {
            Stats::add(&self.stats.segments_timed_out, 1);
        }
        for sampled in out.frames {
            let sent = match (sampled, self.job.clip) {
                (Sampled::Frame { frame, .. }, None) => {
                    self.submit(lane, vec![frame], Whence::Media, pending, stop)
                        .await
                }
                (Sampled::Frame { frame, change }, Some(clip)) => {
                    let slot = Slot::Frame(frame, change.sends());
                    self.gather(slot, clip.frames, lane, pending, stop).await
                }
                (
                    Sampled::Unchanged {
                        pts_ms,
                        captured_at,
                        ..
                    },
                    _,
                ) => {
                    Stats::add(&self.stats.frames_gated, 1);
                    self.repeat(pts_ms, None, captured_at, pending).await
                }
                (Sampled::Unusable(unshaped), clip) => {
                    tracing::warn!(job_id = %self.job_id, pts_ms = unshaped.pts_ms, why = %unshaped.why, "sampled frame not usable");
                    match clip {
                        None => {
                            self.refuse(unshaped.pts_ms, unshaped.why, Whence::Media, pending)
                                .await
                        }
                        Some(clip) => {
                            self.gather(Slot::Unusable(unshaped), clip.frames, lane, pending, stop)
                                .await
                        }
                    }
                }
            };
            if !sent {
                return false;
            }
        }
        true
    }

    /// A sampler for a job starting afresh: the job's fps, clips and change gate.
    pub(super) fn new_sampler(&self) -> Sampler {
        let mut sampler = Sampler::new(self.job.fps);
        if let Some(clip) = self.job.clip {
            sampler = sampler.with_clips(clip.frames, clip.stride_s.map(|s| s * 1000.0));
        }
        if let Some(gate) = self.job.gate {
            sampler = sampler.with_gate(GateSpec {
                threshold: gate.threshold,
                max_interval_s: gate.max_interval_s,
            });
        }
        sampler
    }

    /// Saves `progress` once everything before it is stored, unless a clip is being gathered
    /// there (a resumed job could not gather it again: it waits for a checkpoint between
    /// clips). False once the writer is gone.
    pub(super) async fn checkpoint(
        &self,
        progress: Progress,
        pending: &mpsc::Sender<Pending>,
    ) -> bool {
        if progress.sampler.as_ref().is_some_and(Sampler::in_clip) {
            return true;
        }
        pending.send(Pending::Checkpoint(progress)).await.is_ok()
    }

    /// Adds a sample to the clip being gathered; a full clip goes to the model when any of
    /// its pictures changed (or the job has no gate), else its result repeats the newest
    /// answer. False when the job is stopping.
    async fn gather(
        &self,
        slot: Slot,
        frames: u32,
        lane: &LaneHandle<Work>,
        pending: &mpsc::Sender<Pending>,
        stop: &CancellationToken,
    ) -> bool {
        let full = {
            let mut g = self
                .gathering
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match slot {
                Slot::Frame(frame, changed) => {
                    g.first.get_or_insert((frame.pts_ms, frame.captured_at));
                    g.changed |= changed;
                    g.frames.push(frame);
                }
                Slot::Unusable(u) => {
                    g.first.get_or_insert((u.pts_ms, None));
                    g.unusable = Some(u.why);
                }
            }
            g.slots += 1;
            (g.slots >= frames).then(|| std::mem::take(&mut *g))
        };
        let Some(clip) = full else { return true };
        let (pts_ms, captured_at) = clip.first.unwrap_or_default();
        if clip.frames.is_empty() {
            let why = format!(
                "no picture of this clip could be used: {}",
                clip.unusable.unwrap_or_default()
            );
            return self.refuse(pts_ms, why, Whence::Media, pending).await;
        }
        if clip.changed || self.job.gate.is_none() {
            return self
                .submit(lane, clip.frames, Whence::Media, pending, stop)
                .await;
        }
        Stats::add(&self.stats.frames_gated, clip.frames.len() as u64);
        let end = clip.frames.last().map(|f| f.pts_ms);
        self.repeat(pts_ms, end, captured_at, pending).await
    }

    /// Tells the writer a gated picture (or clip) is in its place in the order; false once
    /// the writer is gone.
    async fn repeat(
        &self,
        pts_ms: i64,
        pts_end_ms: Option<i64>,
        captured_at: Option<f64>,
        pending: &mpsc::Sender<Pending>,
    ) -> bool {
        pending
            .send(Pending::Repeat {
                pts_ms,
                pts_end_ms,
                captured_at,
                from: Whence::Media,
            })
            .await
            .is_ok()
    }

    fn redis_source(&self, server: Url, key: String) -> Result<RedisSource, redis::RedisError> {
        RedisSource::new(RedisSourceConfig {
            server,
            key,
            group: format!("free-roam:{}", self.job_id),
            consumer: "free-roam".to_owned(),
            from_beginning: self.job.from_beginning,
            block: self.settings.pipeline.redis_block,
            batch: self.settings.max_batch_size.max(8),
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5), u32::MAX),
        })
    }

    /// Read, sample and decode loop for a Redis stream; runs until cancelled.
    async fn redis(
        &self,
        source: RedisSource,
        progress: Progress,
        lane: &LaneHandle<Work>,
        pending: mpsc::Sender<Pending>,
    ) -> Outcome {
        let stop = self.cancel.child_token();
        let (tx, mut rx) = mpsc::channel(self.settings.max_batch_size * 2);
        let source_task = tokio::spawn(source.run(tx, self.stats.clone(), stop.clone()));
        let mut sampler = progress.sampler.unwrap_or_else(|| self.new_sampler());
        let max_pixels = self.settings.pipeline.max_frame_pixels;
        let mut shaper = Some(Shaper::new(self.spec).with_evidence(self.evidence));
        while let Some(entry) = tokio::select! { _ = stop.cancelled() => None, e = rx.recv() => e }
        {
            let Some(bytes) = entry.frame else {
                Stats::add(&self.stats.entries_invalid, 1);
                tracing::warn!(job_id = %self.job_id, id = %entry.id, "entry has no `frame` field; skipped");
                if pending.send(Pending::Ack(entry.id)).await.is_err() {
                    break;
                }
                continue;
            };
            // Sample before decoding: frames the sampler skips are never decoded.
            if !sampler.offer(entry.ts_ms as f64) {
                if pending.send(Pending::Ack(entry.id)).await.is_err() {
                    break;
                }
                continue;
            }
            let ts = entry.ts_ms;
            let Some(mut sh) = shaper.take() else { break };
            // The gate (when the job has one) judges the picture in the same blocking call.
            let mut gate = sampler.take_gate();
            let shaped = self
                .media
                .run(move || {
                    let frame = Still::probe(&bytes, max_pixels).and_then(|still| {
                        if let Some(gate) = gate.as_mut() {
                            let thumb = still.thumbnail(&mut sh)?;
                            if !gate.judge(thumb, ts).sends() {
                                return Ok(None);
                            }
                        }
                        still.shape(&mut sh, ts).map(Some)
                    });
                    sh.release();
                    (frame, sh, gate)
                })
                .await;
            let shaped = match shaped {
                Ok((frame, sh, gate)) => {
                    shaper = Some(sh);
                    sampler.put_gate(gate);
                    frame
                }
                Err(_) => return Outcome::Failed("the image decoder crashed".into()),
            };
            let shaped = match shaped {
                Ok(Some(frame)) => Ok(frame),
                Err(why) => Err(why),
                // Unchanged: its result repeats the newest answer.
                Ok(None) => {
                    Stats::add(&self.stats.frames_sampled, 1);
                    Stats::add(&self.stats.frames_gated, 1);
                    let repeat = Pending::Repeat {
                        pts_ms: ts,
                        pts_end_ms: None,
                        captured_at: None,
                        from: Whence::Entry(entry.id),
                    };
                    let checkpoint = Progress {
                        sampler: Some(sampler.clone()),
                        ..Progress::default()
                    };
                    if pending.send(repeat).await.is_err()
                        || pending.send(Pending::Checkpoint(checkpoint)).await.is_err()
                    {
                        break;
                    }
                    continue;
                }
            };
            match shaped {
                Ok(frame) => {
                    Stats::add(&self.stats.frames_sampled, 1);
                    if !self
                        .submit(lane, vec![frame], Whence::Entry(entry.id), &pending, &stop)
                        .await
                    {
                        break;
                    }
                    let checkpoint = Progress {
                        sampler: Some(sampler.clone()),
                        ..Progress::default()
                    };
                    if pending.send(Pending::Checkpoint(checkpoint)).await.is_err() {
                        break;
                    }
                }
                Err(why) => {
                    // The frame took its sampling slot: its result is this error, stored in
                    // order like any other, and the entry is acknowledged after it.
                    Stats::add(&self.stats.entries_invalid, 1);
                    tracing::warn!(job_id = %self.job_id, id = %entry.id, %why, "entry frame not usable");
                    let why = format!("entry {}: {why}", entry.id);
                    if !self
                        .refuse(ts, why, Whence::Entry(entry.id), &pending)
                        .await
                    {
                        break;
                    }
                }
            }
        }
        drop(pending);
        stop.cancel();
        let _ = source_task.await;
        Outcome::Stopped
    }

    /// Asks again about the evidence frames of results `from..=to` of `job`, in order, each
    /// at its original `pts_ms`. Results are stored in order, one per frame, so a resumed
    /// replay starts after the ones it has.
    async fn replay(
        &self,
        job: Arc<str>,
        from: i64,
        to: i64,
        lane: &LaneHandle<Work>,
        pending: mpsc::Sender<Pending>,
    ) -> Outcome {
        let stop = self.cancel.child_token();
        let mut shaper = Some(Shaper::new(self.spec).with_evidence(self.evidence));
        let max_pixels = self.settings.pipeline.max_frame_pixels;
        for seq in from + self.job.results_count..=to {
            if stop.is_cancelled() {
                return Outcome::Stopped;
            }
            Stats::add(&self.stats.entries_read, 1);
            let whence = Whence::Replay {
                job: job.clone(),
                seq,
            };
            let (pts_ms, jpeg) = match self.store.replay_frame(&job, seq).await {
                Ok(Some((pts, Some(jpeg)))) => (pts, jpeg),
                Ok(Some((pts, None))) => {
                    let why = format!("result {seq} of job {job} has no frame kept (EVIDENCE off then, or expired)");
                    if !self.refuse(pts, why, whence, &pending).await {
                        return Outcome::Stopped;
                    }
                    continue;
                }
                Ok(None) => {
                    let why = format!("job {job} has no result {seq} (deleted by retention?)");
                    if !self.refuse(0, why, whence, &pending).await {
                        return Outcome::Stopped;
                    }
                    continue;
                }
                Err(e) => return Outcome::Failed(format!("cannot read the frames to replay: {e}")),
            };
            Stats::add(&self.stats.frames_sampled, 1);
            let Some(mut sh) = shaper.take() else { break };
            let shaped = self
                .media
                .run(move || {
                    let frame =
                        Still::probe(&jpeg, max_pixels).and_then(|s| s.shape(&mut sh, pts_ms));
                    sh.release();
                    (frame, sh)
                })
                .await;
            let Ok((frame, sh)) = shaped else {
                return Outcome::Failed("the frame shaper crashed".into());
            };
            shaper = Some(sh);
            let sent = match frame {
                Ok(frame) => {
                    self.submit(lane, vec![frame], whence, &pending, &stop)
                        .await
                }
                Err(why) => self.refuse(pts_ms, why, whence, &pending).await,
            };
            if !sent {
                return Outcome::Stopped;
            }
        }
        drop(pending);
        Outcome::Completed
    }

    /// Gives a sampled frame that never reached the model its error result, in its place in
    /// the order (batch size 0); false once the writer is gone.
    pub(super) async fn refuse(
        &self,
        pts_ms: i64,
        why: String,
        from: Whence,
        pending: &mpsc::Sender<Pending>,
    ) -> bool {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Done::refused(why));
        pending
            .send(Pending::Frame {
                pts_ms,
                pts_end_ms: None,
                captured_at: None,
                reply: rx,
                from,
            })
            .await
            .is_ok()
    }

    /// Queues a frame (or a clip's frames, in time order) for the model and tells the writer
    /// to expect its answer. A full live lane drops its oldest work (its frames counted);
    /// returns false once the pipeline is stopping.
    pub(super) async fn submit(
        &self,
        lane: &LaneHandle<Work>,
        mut frames: Vec<Frame>,
        from: Whence,
        pending: &mpsc::Sender<Pending>,
        stop: &CancellationToken,
    ) -> bool {
        let Some(first) = frames.first() else {
            return true;
        };
        let (tx, rx) = oneshot::channel();
        let (pts_ms, captured_at) = (first.pts_ms, first.captured_at);
        let pts_end_ms = (frames.len() > 1).then(|| frames[frames.len() - 1].pts_ms);
        // A clip keeps its first picture's evidence.
        let evidence = frames[0].evidence.take();
        for f in &mut frames[1..] {
            f.evidence = None;
        }
        let work = Work {
            job_id: self.job_id.clone(),
            frames: frames.into_iter().map(Arc::new).collect(),
            reply: tx,
            stop: self.cancel.clone(),
            evidence,
        };
        let dropped = tokio::select! {
            _ = stop.cancelled() => return false,
            d = lane.push(work) => d,
        };
        if let Some(dropped) = dropped {
            Stats::add(&self.stats.frames_dropped, dropped.frames.len() as u64);
        }
        tokio::select! {
            _ = stop.cancelled() => false,
            r = pending.send(Pending::Frame { pts_ms, pts_end_ms, captured_at, reply: rx, from }) => r.is_ok(),
        }
    }
}

/// One sample for a clip being gathered.
enum Slot {
    /// A shaped picture and whether the gate let it through.
    Frame(Frame, bool),
    Unusable(crate::media::decode::Unshaped),
}

/// Stores answers in order, acknowledges Redis entries, saves progress, stats and latency
/// percentiles.
struct Writer {
    lease: Lease,
    publish: Option<Arc<ResultStream>>,
    latency: std::sync::Mutex<LatencyWindow>,
    store: Store,
    job_id: JobId,
    model: String,
    stats: Arc<Stats>,
    acker: Option<Acker>,
    cancel: CancellationToken,
}

impl Writer {
    /// `alerts`: the job's alert state after its newest stored result.
    async fn run(&self, mut rx: mpsc::Receiver<Pending>, mut alerts: AlertTracker) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut exported = self.stats.snapshot();
        // The newest answer the model gave, which gated results repeat (read from the
        // store when not known here: after a restart, or past repeated work).
        let mut last: Option<Answered> = None;
        loop {
            let item = tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {
                    exported = self.save_stats(&exported, None).await;
                    continue;
                }
                item = rx.recv() => match item { Some(i) => i, None => return },
            };
            match item {
                Pending::Repeat {
                    pts_ms,
                    pts_end_ms,
                    captured_at,
                    from,
                } => {
                    if last.is_none() {
                        last = self.last_answer().await;
                    }
                    let result = repeated(
                        last.as_ref(),
                        &from,
                        pts_ms,
                        pts_end_ms,
                        captured_at,
                        &self.model,
                    );
                    match self.append(&result, &mut alerts).await {
                        Some(Appended::New { .. }) => {
                            let calls =
                                1 + result.alerts.as_ref().map_or(0, |(s, _)| s.rules.len());
                            Stats::add(&self.stats.model_calls_saved, calls as u64);
                            metrics::counter!("free_roam_model_calls_saved_total", "job_id" => self.job_id.to_string())
                                .increment(calls as u64);
                            self.stored(&result, None);
                        }
                        Some(Appended::Duplicate) => {}
                        None => return,
                    }
                    if !self.acked(from).await {
                        return;
                    }
                }
                Pending::Frame {
                    pts_ms,
                    pts_end_ms,
                    captured_at,
                    reply,
                    from,
                } => {
                    let done = tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        d = reply => d,
                    };
                    // An error here means the frame was dropped from a full live lane.
                    let Ok(done) = done else { continue };
                    if let Some((_, answers)) = &done.alerts {
                        Stats::add(&self.stats.alert_calls, answers.len() as u64);
                        let odd = answers.iter().filter(|a| a.answer == Verdict::Unparseable);
                        Stats::add(&self.stats.alert_unparseable, odd.count() as u64);
                    }
                    let l = done.latency;
                    let phases = [l.queue, l.preprocess, l.inference, l.total];
                    let result = NewResult {
                        // Where in the source this frame came from: what makes a result
                        // repeated after a crash or a takeover recognisable.
                        source_key: from.source_key(pts_ms),
                        replay_of: match &from {
                            Whence::Replay { job, seq } => Some((job.to_string(), *seq)),
                            _ => None,
                        },
                        pts_ms,
                        pts_end_ms,
                        repeats_seq: None,
                        captured_at,
                        prompt_scope: done.prompt_scope,
                        prompt_version: done.prompt_version,
                        model: if done.model.is_empty() {
                            self.model.clone()
                        } else {
                            done.model
                        },
                        output: done.output,
                        batch_size: done.batch_size as i64,
                        latency: json!(done.latency),
                        alerts: done.alerts,
                        evidence: done.evidence,
                    };
                    match self.append(&result, &mut alerts).await {
                        Some(Appended::New { seq, .. }) => {
                            self.stored(&result, Some(phases));
                            if result.batch_size > 0 {
                                last = Some(Answered::of(seq, &result));
                            }
                        }
                        // Stored by an earlier run of this job: acknowledged, not counted.
                        // What a later repeat repeats is read back from the store.
                        Some(Appended::Duplicate) => last = None,
                        None => return,
                    }
                    if !self.acked(from).await {
                        return;
                    }
                }
                Pending::Ack(id) => {
                    if let Some(acker) = &self.acker {
                        if !acker.ack(&id, &self.cancel).await {
                            return;
                        }
                    }
                }
                Pending::Checkpoint(progress) => {
                    exported = self.save_stats(&exported, Some(progress)).await;
                }
            }
        }
    }

    /// Acknowledges a Redis entry whose result is stored; false once the pipeline stops.
    async fn acked(&self, from: Whence) -> bool {
        match (&self.acker, from) {
            (Some(acker), Whence::Entry(id)) => acker.ack(&id, &self.cancel).await,
            _ => true,
        }
    }

    /// Stores a result and publishes it with the alert events it fired (RESULTS_STREAM);
    /// `None` when the pipeline stops first.
    async fn append(&self, result: &NewResult, alerts: &mut AlertTracker) -> Option<Appended> {
        // Kept to publish the events this result fires (RESULTS_STREAM only).
        let before = self
            .publish
            .as_ref()
            .and(result.alerts.as_ref())
            .map(|_| alerts.clone());
        let appended = self.store_result(result, alerts).await?;
        if let (Appended::New { seq, frame }, Some(stream)) = (appended, &self.publish) {
            // The events the store logged with this result: the same transition again,
            // from the state before it.
            let events = match (before, &result.alerts) {
                (Some(mut before), Some((set, answers))) => {
                    before.apply(seq, result.pts_ms, &set.rules, answers)
                }
                _ => Vec::new(),
            };
            if !stream
                .publish(self.job_id.as_str(), seq, frame, result, &events)
                .await
            {
                Stats::add(&self.stats.results_stream_failures, 1);
            }
        }
        Some(appended)
    }

    /// Counts a stored result (and its latency, for answers the model gave).
    fn stored(&self, result: &NewResult, phases: Option<[f64; 4]>) {
        if let (Some(phases), Ok(mut w)) = (phases, self.latency.lock()) {
            w.push(phases);
        }
        Stats::add(
            if result.output.is_err() {
                &self.stats.errors
            } else {
                &self.stats.results
            },
            1,
        );
        self.stats.last_pts_ms.store(
            result.pts_end_ms.unwrap_or(result.pts_ms),
            Ordering::Relaxed,
        );
    }

    /// The newest answer the model gave this job, from the store; `None` if it has none
    /// (or it cannot be read now: the repeat then says so).
    async fn last_answer(&self) -> Option<Answered> {
        let record = match self.store.last_answer(self.job_id.as_str()).await {
            Ok(r) => r?,
            Err(e) => {
                tracing::warn!(job_id = %self.job_id, error = %e, "cannot read the answer a gated result repeats");
                return None;
            }
        };
        // Its alert answers move the alert state again only under the rule set they came from.
        let version = record.alerts.first().map(|a| a.version);
        let set = match version {
            None => None,
            Some(v) => match self.store.effective_alerts(&self.job_id).await {
                Ok(Some(set)) if set.version == v => Some(Arc::new(set)),
                _ => None,
            },
        };
        Some(Answered {
            seq: record.seq,
            output: match (record.output, record.error) {
                (Some(o), _) => Ok(o),
                (None, e) => Err(e.unwrap_or_default()),
            },
            alerts: set.map(|s| (s, record.alerts)),
            prompt_scope: record.prompt_scope,
            prompt_version: record.prompt_version,
            model: record.model,
        })
    }

    /// Stores a result, retrying while the database is away; `None` if cancelled first or
    /// fenced (another replica owns the job now: this pipeline stops).
    async fn store_result(
        &self,
        result: &NewResult,
        alerts: &mut AlertTracker,
    ) -> Option<Appended> {
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5), u32::MAX);
        let mut failures = 0;
        loop {
            match self
                .store
                .append_result(self.job_id.as_str(), &self.lease, result, alerts)
                .await
            {
                Ok(appended) => return Some(appended),
                Err(StoreError::Fenced) => {
                    self.fenced();
                    return None;
                }
                Err(e) => {
                    failures += 1;
                    tracing::error!(job_id = %self.job_id, error = %e, "cannot store a result; retrying");
                    tokio::select! {
                        _ = self.cancel.cancelled() => return None,
                        _ = tokio::time::sleep(backoff.delay(failures.min(8), None)) => {}
                    }
                }
            }
        }
    }

    /// The lease has passed to another claim: stop, writing nothing more.
    fn fenced(&self) {
        if !self.cancel.is_cancelled() {
            tracing::warn!(job_id = %self.job_id, token = self.lease.token, "lease lost to another claim; stopping");
            self.cancel.cancel();
        }
    }

    async fn save_stats(
        &self,
        exported: &crate::stats::StatsSnapshot,
        progress: Option<Progress>,
    ) -> crate::stats::StatsSnapshot {
        let now = self.stats.snapshot();
        Stats::export_delta(exported, &now);
        let stats = json!(now);
        let latency = self
            .latency
            .lock()
            .map(|w| w.percentiles())
            .unwrap_or_default();
        let record = Saved {
            frames_processed: frames_processed(&now),
            stats: &stats,
            latency: &latency,
        };
        let progress = progress.map(|p| serde_json::to_value(p).unwrap_or_default());
        let saved = self
            .store
            .save_progress(
                self.job_id.as_str(),
                &self.lease,
                &record,
                progress.as_ref(),
            )
            .await;
        match saved {
            Ok(()) => {}
            Err(StoreError::Fenced) => self.fenced(),
            Err(e) => tracing::warn!(job_id = %self.job_id, error = %e, "cannot save job progress"),
        }
        now
    }
}

/// The newest answer the model gave a job: what a gated result repeats.
#[derive(Clone)]
struct Answered {
    seq: i64,
    output: Result<crate::answers::Output, String>,
    alerts: Option<(
        Arc<crate::store::AlertSetVersion>,
        Vec<crate::answers::alerts::AlertAnswer>,
    )>,
    prompt_scope: String,
    prompt_version: i64,
    model: String,
}

impl Answered {
    fn of(seq: i64, r: &NewResult) -> Self {
        Self {
            seq,
            output: r.output.clone(),
            alerts: r.alerts.clone(),
            prompt_scope: r.prompt_scope.clone(),
            prompt_version: r.prompt_version,
            model: r.model.clone(),
        }
    }
}

/// The result of a gated picture (or clip) at `pts_ms`, from `from`: the answer of `last`
/// again, with its seq in `repeats_seq`; an error when the job has no answer to repeat.
fn repeated(
    last: Option<&Answered>,
    from: &Whence,
    pts_ms: i64,
    pts_end_ms: Option<i64>,
    captured_at: Option<f64>,
    model: &str,
) -> NewResult {
    let base = NewResult {
        source_key: from.source_key(pts_ms),
        replay_of: None,
        pts_ms,
        pts_end_ms,
        repeats_seq: None,
        captured_at,
        prompt_scope: String::new(),
        prompt_version: 0,
        model: model.to_owned(),
        output: Err("unchanged since a picture the model gave no answer about (it was dropped from a full queue); not asked".into()),
        batch_size: 0,
        latency: json!(super::dispatch::Latency::default()),
        alerts: None,
        evidence: None,
    };
    match last {
        None => base,
        Some(a) => NewResult {
            repeats_seq: Some(a.seq),
            prompt_scope: a.prompt_scope.clone(),
            prompt_version: a.prompt_version,
            model: a.model.clone(),
            output: a.output.clone(),
            alerts: a.alerts.clone(),
            ..base
        },
    }
}

/// Frames the pipeline has taken from its source: decoded video frames, or entries read
/// (Redis entries, a replay's stored frames).
fn frames_processed(s: &crate::stats::StatsSnapshot) -> i64 {
    (s.frames_decoded + s.entries_read) as i64
}
