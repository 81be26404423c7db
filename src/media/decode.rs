//! Decodes a job's fetched HLS segments with ffmpeg-next and returns the sampled frames.
//!
//! Runs on a blocking thread. The bytes come from memory through a custom AVIO context, so
//! ffmpeg never opens a URL, and `format_whitelist` limits demuxing to MPEG-TS and MP4/fMP4;
//! no stream-info probe runs (it would decode the segment's first frames a second time).
//! It decodes no more than sampling needs: whole GOPs that hold no sample target are never
//! sent to the decoder, a GOP stops being fed once its remaining frames are not wanted (for a
//! segment's last GOP: once the next target lies past its latest frame), non-reference frames
//! are skipped when the sampling interval is several frames long, all B-frames too when it is
//! longer still and the stream's P-frames are found not to reference them, and only keyframes
//! are decoded when the interval is at least the keyframe interval. One [`SegmentDecoder`] per
//! job keeps the opened decoder and the frame shaper from segment to segment.

use std::collections::HashMap;
use std::hash::Hasher;
use std::io::Cursor;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant};

use ffmpeg::codec::discard::Discard;
use ffmpeg::{codec, format, frame, media, Dictionary, Packet};
use ffmpeg_next as ffmpeg;
use serde::{Deserialize, Serialize};

use super::gate::{Change, Gate};
use super::sampler::Sampler;
use super::shape::{Shaper, Source};
use super::timeline::Timeline;
use super::{Frame, FrameSpec};

/// The demuxers HLS carries: MPEG-TS and ISO-BMFF (fMP4/CMAF).
const DEMUXERS: &str = "mpegts,mov,mp4,m4a,3gp,3g2,mj2";

/// Initialises ffmpeg once and keeps its own logging quiet (errors are counted instead).
pub fn init() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let _ = ffmpeg::init();
        ffmpeg::util::log::set_level(ffmpeg::util::log::Level::Fatal);
    });
}

#[derive(Debug, Clone)]
pub struct DecodeLimits {
    pub max_frame_pixels: u64,
    pub deadline: Duration,
    /// Skip the in-loop deblocking filter (FAST_DECODE): less CPU, slightly blockier frames.
    pub fast: bool,
}

/// Per-job decoding state carried from segment to segment (and saved for resume).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DecodeState {
    pub timeline: Timeline,
    /// Longest gap seen between keyframes, in media ms.
    pub keyframe_gap_ms: Option<f64>,
    last_keyframe_ms: Option<f64>,
}

/// One fetched segment as the decoder takes it.
#[derive(Debug)]
pub struct SegmentBytes {
    /// For fMP4, the init section followed by the segment.
    pub bytes: Vec<u8>,
    /// Its playlist duration.
    pub duration_ms: f64,
    /// The playlist marks a discontinuity before it.
    pub discontinuity: bool,
}

/// A sampled picture the shaper could not turn into a frame (its slot gets an error result).
#[derive(Debug)]
pub struct Unshaped {
    pub pts_ms: i64,
    pub why: String,
}

/// One sampled picture, as the decode thread leaves it.
#[derive(Debug)]
pub enum Sampled {
    /// Shaped for the backend; `change` is what the job's gate made of it (`New` without a
    /// gate). A clip job's unchanged pictures are shaped too: its clip may still be sent.
    Frame { frame: Frame, change: Change },
    /// The gate found it unchanged (`score`: the share of it that changed) since the
    /// picture sent at `since_ms`: not shaped. `captured_at` as [`Frame::captured_at`].
    Unchanged {
        pts_ms: i64,
        since_ms: i64,
        score: f64,
        captured_at: Option<f64>,
    },
    /// The shaper could not turn it into a frame (its slot gets an error result).
    Unusable(Unshaped),
}

impl Sampled {
    pub fn pts_ms(&self) -> i64 {
        match self {
            Sampled::Frame { frame, .. } => frame.pts_ms,
            Sampled::Unchanged { pts_ms, .. } => *pts_ms,
            Sampled::Unusable(u) => u.pts_ms,
        }
    }
}

/// What a segment gave.
#[derive(Debug, Default)]
pub struct SegmentOutcome {
    /// Sampled pictures in media-time order.
    pub frames: Vec<Sampled>,
    pub frames_decoded: u64,
    /// Packets the demuxer or decoder refused as corrupt.
    pub corrupt: u64,
    /// The segment ran past its decode deadline and was abandoned there.
    pub timed_out: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("segment is not readable MPEG-TS or MP4: {0}")]
    Unreadable(String),
    #[error("segment has no video stream")]
    NoVideo,
    #[error("video frames are {width}x{height}, over MAX_FRAME_PIXELS={max}")]
    FrameTooLarge { width: u32, height: u32, max: u64 },
}

/// Decodes a job's segments one after another. The open decoder, its frame pools and the
/// colour converter are reused from segment to segment while the stream's codec parameters stay
/// the same (opening an H.264 decoder and faulting in its buffers again for every segment cost
/// about a tenth of the decode time); nothing here needs saving: a resumed job opens a new one.
pub struct SegmentDecoder {
    limits: DecodeLimits,
    open: Option<OpenDecoder>,
    sink: Sink,
    b_frames: BFrames,
    /// Segments decoded since B-frames were last checked.
    since_check: u32,
    /// Segments between this job's checks: [`B_FRAMES_RECHECK`] plus a share of it that
    /// differs from job to job, so that jobs started together do not all check at once.
    recheck_after: u32,
}

/// Whether a stream's B-frames can be left undecoded when no sample needs them. Reference
/// B-frames (x264's b-pyramid) are skipped only when its P-frames are found not to use them:
/// while checking, a segment is decoded with them (the job's decoder, whose frames are the
/// samples) and, by a second decoder fed the same packets, without them, and every picture
/// the second gives is compared bit for bit with the first's at the same time
/// ([`BCheck`]). Checked again after a new decoder is opened and every
/// [`B_FRAMES_RECHECK`] segments or somewhat more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BFrames {
    Unchecked,
    Skippable,
    Needed,
}

/// Segments between two checks of whether B-frames are needed.
const B_FRAMES_RECHECK: u32 = 30;
/// Segments between the B-frame checks of the process's `nth` decoder: any 30 consecutive
/// decoders (jobs started together) get 30 different periods spread over 30..60 segments.
fn recheck_period(nth: u32) -> u32 {
    B_FRAMES_RECHECK + nth % B_FRAMES_RECHECK * 11 % B_FRAMES_RECHECK
}

/// Frames per sampling interval from which B-frames are left out when they can be: a sample
/// then lands at most a few frames after its target, a small part of the interval.
const B_FRAMES_SKIP_INTERVAL: f64 = 8.0;

struct OpenDecoder {
    decoder: ffmpeg::decoder::Video,
    params: StreamParams,
}

/// What must match for an open decoder to go on with the next segment.
#[derive(Debug, PartialEq)]
struct StreamParams {
    codec: codec::Id,
    width: i32,
    height: i32,
    extradata: Vec<u8>,
}

impl StreamParams {
    fn of(parameters: &codec::Parameters) -> Self {
        // SAFETY: reads plain fields of the AVCodecParameters the stream owns; extradata is
        // `extradata_size` bytes when not null.
        unsafe {
            let p = &*parameters.as_ptr();
            let extradata = if p.extradata.is_null() || p.extradata_size <= 0 {
                Vec::new()
            } else {
                std::slice::from_raw_parts(p.extradata, p.extradata_size as usize).to_vec()
            };
            Self {
                codec: parameters.id(),
                width: p.width,
                height: p.height,
                extradata,
            }
        }
    }

    /// Whether a decoder opened for `self` can go on with a segment whose container says
    /// `next`. MPEG-TS says nothing before its packets are read (no size, no extradata): the
    /// parameter sets come in-band, and the open decoder handles a change among them itself.
    fn continues(&self, next: &StreamParams) -> bool {
        self.codec == next.codec && (self == next || (next.width == 0 && next.extradata.is_empty()))
    }
}

impl SegmentDecoder {
    /// A decoder whose sampled frames are shaped as `spec` says.
    pub fn new(limits: DecodeLimits, spec: FrameSpec) -> Self {
        init();
        static OPENED: AtomicU32 = AtomicU32::new(0);
        Self {
            sink: Sink::new(limits.max_frame_pixels, spec),
            limits,
            open: None,
            b_frames: BFrames::Unchecked,
            since_check: 0,
            recheck_after: recheck_period(OPENED.fetch_add(1, Ordering::Relaxed)),
        }
    }

    /// Also makes each frame's evidence JPEG, as `evidence` says.
    pub fn with_evidence(mut self, evidence: Option<super::EvidenceSpec>) -> Self {
        self.sink.shaper.keep_evidence(evidence);
        self
    }

    /// Decodes one segment and returns the frames `sampler` keeps, with `pts_ms` on the job's
    /// media timeline.
    pub fn decode(
        &mut self,
        segment: SegmentBytes,
        state: &mut DecodeState,
        sampler: &mut Sampler,
    ) -> Result<SegmentOutcome, DecodeError> {
        let result = self.run(segment, state, sampler);
        self.ready_for_next();
        result
    }

    /// Ready for the next segment or piece, whatever became of this one. Flushing keeps the
    /// parameter sets the decoder has seen: streams that send them only at the start
    /// (open-GOP encodes whose keyframes are not IDR) still decode after a corrupt segment.
    /// The shaper's workspace goes back to the pool until the next one.
    pub(super) fn ready_for_next(&mut self) {
        if let Some(open) = self.open.as_mut() {
            open.decoder.flush();
        }
        self.sink.shaper.release();
    }

    fn run(
        &mut self,
        segment: SegmentBytes,
        state: &mut DecodeState,
        sampler: &mut Sampler,
    ) -> Result<SegmentOutcome, DecodeError> {
        let SegmentBytes {
            bytes,
            duration_ms,
            discontinuity,
        } = segment;
        let deadline = Instant::now() + self.limits.deadline;
        let mut input = open_segment(bytes, deadline)?;
        let video = VideoStream::best(&input)?;
        let mut out = SegmentOutcome::default();
        let mut packets = Vec::new();
        loop {
            let mut packet = Packet::empty();
            match packet.read(&mut input) {
                Ok(()) if packet.stream() == video.index => packets.push(packet),
                Ok(()) => {}
                Err(ffmpeg::Error::Eof) => break,
                Err(ffmpeg::Error::InvalidData) => out.corrupt += 1,
                Err(ffmpeg::Error::Exit) => {
                    out.timed_out = true;
                    break;
                }
                Err(_) => {
                    out.corrupt += 1;
                    break;
                }
            }
        }
        let chunk = Chunk {
            packets,
            duration_ms: Some(duration_ms),
            discontinuity,
        };
        self.decode_packets(&video, chunk, deadline, state, sampler, out)
    }

    /// Decodes a run of one video stream's packets (a segment, or a piece of a file cut at a
    /// keyframe) into the frames `sampler` keeps; `out` may already count what demuxing found.
    pub(super) fn decode_packets(
        &mut self,
        video: &VideoStream,
        chunk: Chunk,
        deadline: Instant,
        state: &mut DecodeState,
        sampler: &mut Sampler,
        mut out: SegmentOutcome,
    ) -> Result<SegmentOutcome, DecodeError> {
        let Chunk {
            packets,
            duration_ms,
            discontinuity,
        } = chunk;
        let limits = &self.limits;
        let tick_ms = video.tick_ms;
        let parameters = video.parameters.clone();
        let raw_ms = |p: &Packet| p.pts().or(p.dts()).map(|t| t as f64 * tick_ms);
        let Some(raw_start) = packets.iter().filter_map(raw_ms).reduce(f64::min) else {
            return Err(DecodeError::Unreadable("no video packets".into()));
        };
        let duration_ms = duration_ms.unwrap_or_else(|| {
            let last = packets
                .iter()
                .filter_map(raw_ms)
                .reduce(f64::max)
                .unwrap_or(raw_start);
            last - raw_start + typical_frame_ms(&packets, tick_ms).unwrap_or(0.0)
        });
        let tolerance = duration_ms.max(1000.0);
        state
            .timeline
            .begin_segment(raw_start, duration_ms, discontinuity, tolerance);
        let timeline = state.timeline.clone();
        let media_ms = |p: &Packet| raw_ms(p).map(|t| timeline.media_ms(t));

        // GOPs in decode order, each starting at a keyframe (the first may start without one).
        let mut starts: Vec<usize> = vec![0];
        starts.extend(
            packets
                .iter()
                .enumerate()
                .skip(1)
                .filter(|(_, p)| p.is_key())
                .map(|(i, _)| i),
        );
        for p in packets.iter().filter(|p| p.is_key()) {
            if let Some(t) = media_ms(p) {
                if let Some(last) = state.last_keyframe_ms.filter(|l| t > *l) {
                    state.keyframe_gap_ms =
                        Some(state.keyframe_gap_ms.unwrap_or(0.0).max(t - last));
                }
                state.last_keyframe_ms = Some(t);
            }
        }
        let frame_ms = typical_frame_ms(&packets, tick_ms);
        let keyframes_only = state
            .keyframe_gap_ms
            .is_some_and(|gap| sampler.interval_ms() >= gap);

        let params = StreamParams::of(&parameters);
        if discontinuity
            || self
                .open
                .as_ref()
                .is_some_and(|o| !o.params.continues(&params))
        {
            self.open = None;
        }
        if self.open.is_none() || self.since_check >= self.recheck_after {
            self.b_frames = BFrames::Unchecked;
        }
        let frames_per_sample = frame_ms.map_or(0.0, |f| sampler.interval_ms() / f);
        let skip_b = !keyframes_only && frames_per_sample >= B_FRAMES_SKIP_INTERVAL;
        // Checking decodes this chunk with the B-frames (below: NonReference) and without.
        let mut check = (skip_b && self.b_frames == BFrames::Unchecked)
            .then(|| BCheck::open(&parameters, limits));
        self.since_check += 1;
        let open = match self.open.take() {
            Some(open) => open,
            None => OpenDecoder {
                decoder: open_decoder(parameters, limits)?,
                params,
            },
        };
        let decoder = &mut self.open.insert(open).decoder;
        decoder.skip_frame(if keyframes_only {
            Discard::NonKey
        } else if skip_b && self.b_frames == BFrames::Skippable {
            Discard::Bidirectional
        } else if frames_per_sample >= 3.0 {
            Discard::NonReference
        } else {
            Discard::Default
        });

        let sink = &mut self.sink;
        sink.hashes = check.as_ref().map(|_| HashMap::new());
        'gops: for (g, &start) in starts.iter().enumerate() {
            let end = starts.get(g + 1).copied().unwrap_or(packets.len());
            // Where this GOP's usefulness ends: the next keyframe, or for the segment's last
            // GOP just after its latest frame (the next keyframe is in the next segment).
            let next_key_ms = match starts.get(g + 1) {
                Some(&i) => media_ms(&packets[i]),
                None => packets[start..end]
                    .iter()
                    .filter_map(media_ms)
                    .reduce(f64::max)
                    .map(|last| last + 1.0),
            };
            let gop = if keyframes_only {
                // Only the keyframe is decoded: worth it if it reaches the next target.
                let key_ms = media_ms(&packets[start]);
                if !key_ms.is_some_and(|t| sampler.wants(t)) {
                    continue;
                }
                start..start + 1
            } else {
                start..end
            };
            if past_next_key(sampler, next_key_ms) {
                continue;
            }
            for packet in &packets[gop] {
                if Instant::now() > deadline {
                    out.timed_out = true;
                    break 'gops;
                }
                if let Some(check) = check.as_mut() {
                    check.feed(packet);
                }
                if decoder.send_packet(packet).is_err() {
                    out.corrupt += 1;
                    continue;
                }
                sink.drain(decoder, &timeline, tick_ms, sampler, &mut out)?;
                if past_next_key(sampler, next_key_ms) {
                    break;
                }
            }
        }
        if !out.timed_out && decoder.send_eof().is_ok() {
            sink.drain(decoder, &timeline, tick_ms, sampler, &mut out)?;
        }
        let with = sink.hashes.take();
        // A chunk cut short leaves the question open for the next one.
        if let (Some(check), Some(with), false) = (check, with, out.timed_out) {
            self.b_frames = match check.finish() {
                Some(without) if b_frames_unused(&without, &with) => BFrames::Skippable,
                _ => BFrames::Needed,
            };
            self.since_check = 0;
        }
        Ok(out)
    }
}

/// Opens a segment's demuxer over its bytes, without `avformat_find_stream_info`: that probe
/// decodes a segment's first frames (the costly keyframe at least) only to learn what the
/// decoder learns anyway from the in-band parameter sets (MPEG-TS) or already has from the
/// init section (fMP4), and buffers the segment's packets a second time. Demuxing stops
/// at `deadline`.
fn open_segment(bytes: Vec<u8>, deadline: Instant) -> Result<format::context::Input, DecodeError> {
    let unreadable = |e: ffmpeg::Error| DecodeError::Unreadable(e.to_string());
    let mut io =
        format::context::StreamIo::from_read_seek(Cursor::new(bytes)).map_err(unreadable)?;
    let mut options = Dictionary::new();
    options.set("format_whitelist", DEMUXERS);
    let interrupt = ffmpeg::util::interrupt::new(Box::new(move || Instant::now() > deadline));
    // SAFETY: the same steps as ffmpeg-next's `input_from_stream_with_interrupt` minus the
    // probe: a context we allocate, given our AVIO context (owned by the returned Input with
    // it, and freed with it) and the interrupt (whose guard the Input keeps alive); on
    // failure avformat_open_input frees the context itself.
    unsafe {
        let mut ctx = ffmpeg::ffi::avformat_alloc_context();
        if ctx.is_null() {
            return Err(DecodeError::Unreadable("out of memory".into()));
        }
        (*ctx).interrupt_callback = interrupt.interrupt;
        (*ctx).pb = io.as_mut_ptr();
        (*ctx).flags |= ffmpeg::ffi::AVFMT_FLAG_CUSTOM_IO;
        let mut opts = options.disown();
        let opened = ffmpeg::ffi::avformat_open_input(
            &mut ctx,
            std::ptr::null(),
            std::ptr::null(),
            &mut opts,
        );
        Dictionary::own(opts);
        if opened < 0 {
            return Err(unreadable(ffmpeg::Error::from(opened)));
        }
        Ok(format::context::Input::wrap_with_custom_io_and_interrupt(
            ctx,
            io,
            interrupt.guard,
        ))
    }
}

/// The video stream a demuxer reads: where its packets are, their time base, its codec.
pub(super) struct VideoStream {
    pub index: usize,
    pub tick_ms: f64,
    pub parameters: codec::Parameters,
}

impl VideoStream {
    /// The input's best video stream.
    pub fn best(input: &format::context::Input) -> Result<Self, DecodeError> {
        let stream = input
            .streams()
            .best(media::Type::Video)
            .ok_or(DecodeError::NoVideo)?;
        let tb = stream.time_base();
        Ok(Self {
            index: stream.index(),
            tick_ms: f64::from(tb.numerator()) * 1000.0 / f64::from(tb.denominator().max(1)),
            parameters: stream.parameters(),
        })
    }
}

/// Packets of one video stream in decode order, starting at a keyframe where the source
/// allows, with how long they last (a segment's playlist duration; unknown: their span).
pub(super) struct Chunk {
    pub packets: Vec<Packet>,
    pub duration_ms: Option<f64>,
    pub discontinuity: bool,
}

/// Opens a single-threaded video decoder for a stream (one thread per stream: streams run in
/// parallel, and frame threading only adds CPU).
fn open_decoder(
    parameters: codec::Parameters,
    limits: &DecodeLimits,
) -> Result<ffmpeg::decoder::Video, DecodeError> {
    let mut ctx = codec::context::Context::from_parameters(parameters)
        .map_err(|e| DecodeError::Unreadable(e.to_string()))?;
    ctx.set_threading(codec::threading::Config::count(1));
    let mut decoder = ctx
        .decoder()
        .video()
        .map_err(|e| DecodeError::Unreadable(e.to_string()))?;
    check_size(decoder.width(), decoder.height(), limits.max_frame_pixels)?;
    if limits.fast {
        // SAFETY: a plain field of the codec context we own, set before the first packet.
        unsafe { (*decoder.as_mut_ptr()).skip_loop_filter = ffmpeg::ffi::AVDiscard::AVDISCARD_ALL };
    }
    Ok(decoder)
}

/// The second decoder of a B-frame check: fed the packets the job's decoder is fed, it leaves
/// every B-frame out and keeps a hash of each picture it gives, by timestamp. No decoder
/// when none opens: the check then says the B-frames are needed.
struct BCheck {
    decoder: Option<ffmpeg::decoder::Video>,
    frame: frame::Video,
    hashes: HashMap<i64, u64>,
}

impl BCheck {
    fn open(parameters: &codec::Parameters, limits: &DecodeLimits) -> Self {
        let decoder = open_decoder(parameters.clone(), limits).ok().map(|mut d| {
            d.skip_frame(Discard::Bidirectional);
            d
        });
        Self {
            decoder,
            frame: frame::Video::empty(),
            hashes: HashMap::new(),
        }
    }

    fn feed(&mut self, packet: &Packet) {
        if self
            .decoder
            .as_mut()
            .is_some_and(|d| d.send_packet(packet).is_ok())
        {
            self.take();
        }
    }

    fn take(&mut self) {
        let Some(decoder) = self.decoder.as_mut() else {
            return;
        };
        while decoder.receive_frame(&mut self.frame).is_ok() {
            if let Some(t) = self.frame.timestamp().or(self.frame.pts()) {
                self.hashes.insert(t, picture_hash(&self.frame));
            }
        }
    }

    /// The hashes of every picture, the decoder drained; `None` without a decoder.
    fn finish(mut self) -> Option<HashMap<i64, u64>> {
        let decoder = self.decoder.as_mut()?;
        if decoder.send_eof().is_ok() {
            self.take();
        }
        Some(self.hashes)
    }
}

/// Whether every picture decoded without B-frames (`without`) is, bit for bit, the picture
/// decoded with them at the same time (`with`, which need hold only the I- and P-pictures):
/// then the P-frames do not reference B-frames, which can be skipped.
fn b_frames_unused(without: &HashMap<i64, u64>, with: &HashMap<i64, u64>) -> bool {
    !without.is_empty() && without.iter().all(|(t, h)| with.get(t) == Some(h))
}

/// A hash of a decoded picture's visible samples (row padding left out).
fn picture_hash(frame: &frame::Video) -> u64 {
    let mut hash = std::hash::DefaultHasher::new();
    for plane in 0..frame.planes() {
        // SAFETY: a pure function of the pixel format, the width and the plane index.
        let line = unsafe {
            ffmpeg::ffi::av_image_get_linesize(
                frame.format().into(),
                frame.width() as i32,
                plane as i32,
            )
        };
        let (Ok(line), stride, data) = (
            usize::try_from(line),
            frame.stride(plane),
            frame.data(plane),
        ) else {
            continue;
        };
        for row in 0..frame.plane_height(plane) as usize {
            if let Some(bytes) = data.get(row * stride..row * stride + line) {
                hash.write(bytes);
            }
        }
    }
    hash.finish()
}

/// The next target is at or after the next keyframe: nothing more of this GOP is wanted.
fn past_next_key(sampler: &Sampler, next_key_ms: Option<f64>) -> bool {
    matches!((sampler.next_target_ms(), next_key_ms), (Some(target), Some(key)) if target >= key)
}

/// Median gap between consecutive presentation times, in ms.
fn typical_frame_ms(packets: &[Packet], tick_ms: f64) -> Option<f64> {
    let mut pts: Vec<i64> = packets.iter().filter_map(|p| p.pts()).collect();
    pts.sort_unstable();
    let mut gaps: Vec<i64> = pts
        .windows(2)
        .map(|w| w[1] - w[0])
        .filter(|g| *g > 0)
        .collect();
    gaps.sort_unstable();
    gaps.get(gaps.len() / 2).map(|g| *g as f64 * tick_ms)
}

fn check_size(width: u32, height: u32, max: u64) -> Result<(), DecodeError> {
    if u64::from(width) * u64::from(height) > max {
        return Err(DecodeError::FrameTooLarge { width, height, max });
    }
    Ok(())
}

/// Receives decoded frames, offers them to the sampler and shapes the kept ones for the
/// model backend (the shaper keeps its scaler and encoder from frame to frame).
struct Sink {
    shaper: Shaper,
    max_pixels: u64,
    decoded: frame::Video,
    /// While B-frames are checked: a hash of each decoded I- and P-picture, by timestamp.
    hashes: Option<HashMap<i64, u64>>,
}

impl Sink {
    fn new(max_pixels: u64, spec: FrameSpec) -> Self {
        Self {
            shaper: Shaper::new(spec),
            max_pixels,
            decoded: frame::Video::empty(),
            hashes: None,
        }
    }

    fn drain(
        &mut self,
        decoder: &mut ffmpeg::decoder::Video,
        timeline: &Timeline,
        tick_ms: f64,
        sampler: &mut Sampler,
        out: &mut SegmentOutcome,
    ) -> Result<(), DecodeError> {
        loop {
            match decoder.receive_frame(&mut self.decoded) {
                Ok(()) => {}
                Err(ffmpeg::Error::Eof) => return Ok(()),
                Err(ffmpeg::Error::Other { errno }) if errno == ffmpeg::util::error::EAGAIN => {
                    return Ok(())
                }
                Err(_) => {
                    out.corrupt += 1;
                    return Ok(());
                }
            }
            out.frames_decoded += 1;
            let Some(raw) = self.decoded.timestamp().or(self.decoded.pts()) else {
                continue;
            };
            if let Some(hashes) = self.hashes.as_mut() {
                if self.decoded.kind() != ffmpeg::picture::Type::B {
                    hashes.insert(raw, picture_hash(&self.decoded));
                }
            }
            let t = timeline.media_ms(raw as f64 * tick_ms);
            if sampler.offer(t) {
                check_size(self.decoded.width(), self.decoded.height(), self.max_pixels)?;
                let pts_ms = t.round() as i64;
                let clips = sampler.clips();
                out.frames
                    .push(self.sample(sampler.gate_mut(), clips, pts_ms));
            }
        }
    }
}

impl Sink {
    /// The decoded picture at `pts_ms`, judged by `gate` and shaped unless the gate finds it
    /// unchanged (in a clip job, `clips`, it is shaped anyway: its clip may still be sent).
    fn sample(&mut self, gate: Option<&mut Gate>, clips: bool, pts_ms: i64) -> Sampled {
        let src = Source::video(&self.decoded);
        let change = match gate {
            None => Change::New,
            Some(gate) => match self.shaper.thumbnail(&src) {
                Ok(thumb) => gate.judge(thumb, pts_ms),
                Err(why) => return Sampled::Unusable(Unshaped { pts_ms, why }),
            },
        };
        if let (Change::Unchanged { since_ms, score }, false) = (change, clips) {
            return Sampled::Unchanged {
                pts_ms,
                since_ms,
                score,
                captured_at: None,
            };
        }
        match self.shaper.shape(&src, pts_ms) {
            Ok(frame) => Sampled::Frame { frame, change },
            Err(why) => Sampled::Unusable(Unshaped { pts_ms, why }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::{Encoding, FrameSize};

    /// A 2 s 320x180 30 fps MPEG-TS segment made by the ffmpeg CLI with `codec`.
    fn segment(codec: &[&str]) -> SegmentBytes {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clip.ts");
        let status = std::process::Command::new("ffmpeg")
            .args(["-v", "error", "-y", "-f", "lavfi"])
            .args(["-i", "testsrc2=s=320x180:r=30:d=2"])
            .args(codec)
            .args(["-f", "mpegts"])
            .arg(&path)
            .status()
            .expect("the ffmpeg CLI is installed");
        assert!(status.success());
        SegmentBytes {
            bytes: std::fs::read(&path).unwrap(),
            duration_ms: 2000.0,
            discontinuity: false,
        }
    }

    /// Decodes `segment` sampled at 2 fps (15 frames apart: B-frames are worth leaving out)
    /// and says what the decoder found of its B-frames, and the samples' times.
    fn decode_at_2fps(segment: SegmentBytes) -> (BFrames, Vec<i64>) {
        let limits = DecodeLimits {
            max_frame_pixels: 1 << 30,
            deadline: Duration::from_secs(30),
            fast: false,
        };
        let spec = FrameSpec {
            size: FrameSize::LongestSide(64),
            encoding: Encoding::Jpeg { quality: 80 },
        };
        let mut decoder = SegmentDecoder::new(limits, spec);
        let mut sampler = Sampler::new(2.0);
        let out = decoder
            .decode(segment, &mut DecodeState::default(), &mut sampler)
            .unwrap();
        (
            decoder.b_frames,
            out.frames.iter().map(Sampled::pts_ms).collect(),
        )
    }

    /// One sample per 500 ms target, each at most two frames (of 33 ms) after it: frames
    /// nothing references are not decoded, so a sample may land on the next one decoded.
    fn assert_on_the_grid(samples: &[i64]) {
        assert_eq!(samples.len(), 4, "{samples:?}");
        for (k, pts) in samples.iter().enumerate() {
            let late = pts - 500 * k as i64;
            assert!((0..=67).contains(&late), "{samples:?}");
        }
    }

    #[test]
    fn b_frames_are_left_out_only_where_p_frames_do_not_use_them() {
        // x264's b-pyramid: reference B-frames serve only other B-frames.
        let x264 = segment(&["-c:v", "libx264", "-preset", "veryfast", "-bf", "3"]);
        let (found, samples) = decode_at_2fps(x264);
        assert_eq!(found, BFrames::Skippable);
        assert_on_the_grid(&samples);
        // x265's P-frames do reference B-frames: leaving them out would change the pictures.
        let x265 = segment(&[
            "-c:v",
            "libx265",
            "-preset",
            "veryfast",
            "-x265-params",
            "log-level=error",
        ]);
        let (found, samples) = decode_at_2fps(x265);
        assert_eq!(found, BFrames::Needed);
        assert_on_the_grid(&samples);
    }

    #[test]
    fn jobs_started_together_recheck_b_frames_at_different_segments() {
        for first in [0, 7, 1000] {
            let periods: std::collections::HashSet<u32> = (0..B_FRAMES_RECHECK)
                .map(|k| recheck_period(first + k))
                .collect();
            assert_eq!(periods.len(), B_FRAMES_RECHECK as usize);
            assert!(periods
                .iter()
                .all(|p| (B_FRAMES_RECHECK..2 * B_FRAMES_RECHECK).contains(p)));
        }
    }
}
