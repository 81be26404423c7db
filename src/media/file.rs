//! Decodes a whole media file (MP4/MOV, Matroska/WebM, MPEG-TS) read through a seekable
//! reader: a local file, or an HTTP resource read with Range requests. The file is cut at
//! keyframes into pieces of about [`PIECE_MS`] of media and each piece goes through the same
//! decoder, sampler and shaper as an HLS segment, so a file's frames are timed, skipped and
//! shaped exactly as a stream's. Runs on a blocking thread; ffmpeg never opens a path or URL
//! itself, and `format_whitelist` limits what it will demux.

use std::io::{Read, Seek};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ffmpeg::{format, Dictionary, Packet};
use ffmpeg_next as ffmpeg;

use super::decode::{
    Chunk, DecodeError, DecodeLimits, DecodeState, SegmentDecoder, SegmentOutcome, VideoStream,
};
use super::sampler::Sampler;
use super::{EvidenceSpec, FrameSpec};

/// The containers a file may be in.
const DEMUXERS: &str = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm,mpegts";

/// About how much media each piece holds (it ends at the first keyframe after this).
pub const PIECE_MS: f64 = 2000.0;

/// A file being decoded piece by piece.
pub struct FileDecoder {
    input: format::context::Input,
    video: VideoStream,
    decoder: SegmentDecoder,
    /// The keyframe that begins the next piece, read while ending this one.
    held: Option<Packet>,
    ended: bool,
    /// The running piece's deadline, in ms after `epoch`, read by ffmpeg's interrupt callback.
    deadline_ms: Arc<AtomicU64>,
    epoch: Instant,
    limits: DecodeLimits,
}

/// Where a piece starts, in microseconds of the file's own timestamps: a resumed job seeks
/// there.
pub type Position = i64;

impl FileDecoder {
    /// Opens `reader`'s container and finds its video stream (the first attempt to read
    /// gives up after DecodeLimits::deadline, or at once when `stop` says so).
    pub fn open<R: Read + Seek + Send + 'static>(
        reader: R,
        limits: DecodeLimits,
        spec: FrameSpec,
        evidence: Option<EvidenceSpec>,
        stop: impl Fn() -> bool + Send + 'static,
    ) -> Result<Self, DecodeError> {
        let epoch = Instant::now();
        let deadline_ms = Arc::new(AtomicU64::new(limits.deadline.as_millis() as u64));
        let io = format::context::StreamIo::from_read_seek(reader)
            .map_err(|e| DecodeError::Unreadable(e.to_string()))?;
        let mut options = Dictionary::new();
        options.set("format_whitelist", DEMUXERS);
        let deadline = deadline_ms.clone();
        let input = format::input_from_stream_with_interrupt(io, None, Some(options), move || {
            stop() || epoch.elapsed().as_millis() as u64 > deadline.load(Ordering::Relaxed)
        })
        .map_err(|e| DecodeError::Unreadable(e.to_string()))?;
        let video = VideoStream::best(&input)?;
        Ok(Self {
            input,
            video,
            decoder: SegmentDecoder::new(limits.clone(), spec).with_evidence(evidence),
            held: None,
            ended: false,
            deadline_ms,
            epoch,
            limits,
        })
    }

    /// Continues from `position` (a piece's start a checkpoint saved): the demuxer seeks to
    /// the keyframe there.
    pub fn seek(&mut self, position: Position) -> Result<(), DecodeError> {
        self.arm();
        self.input
            .seek(position, ..position + 1)
            .map_err(|e| DecodeError::Unreadable(format!("cannot seek to {position} us: {e}")))
    }

    /// Decodes the next piece: its sampled frames and where the piece after it starts
    /// (`None` at the end of the file). `Ok(None)` once the file is read whole.
    pub fn next(
        &mut self,
        state: &mut DecodeState,
        sampler: &mut Sampler,
    ) -> Result<Option<(SegmentOutcome, Option<Position>)>, DecodeError> {
        if self.ended && self.held.is_none() {
            return Ok(None);
        }
        self.arm();
        let deadline = Instant::now() + self.limits.deadline;
        let mut out = SegmentOutcome::default();
        let mut packets: Vec<Packet> = self.held.take().into_iter().collect();
        let tick_ms = self.video.tick_ms;
        let ms = |p: &Packet| p.pts().or(p.dts()).map(|t| t as f64 * tick_ms);
        let mut first_ms = packets.first().and_then(ms);
        while !self.ended {
            let mut packet = Packet::empty();
            match packet.read(&mut self.input) {
                Ok(()) if packet.stream() == self.video.index => {
                    let t = ms(&packet);
                    if packet.is_key()
                        && !packets.is_empty()
                        && matches!((first_ms, t), (Some(a), Some(b)) if b - a >= PIECE_MS)
                    {
                        self.held = Some(packet);
                        break;
                    }
                    if first_ms.is_none() {
                        first_ms = t;
                    }
                    packets.push(packet);
                }
                Ok(()) => {}
                Err(ffmpeg::Error::Eof) => self.ended = true,
                Err(ffmpeg::Error::InvalidData) => out.corrupt += 1,
                Err(ffmpeg::Error::Exit) => {
                    return Err(DecodeError::Unreadable(
                        "reading the file timed out or was stopped".into(),
                    ))
                }
                Err(e) => {
                    out.corrupt += 1;
                    tracing::debug!(error = %e, "file read error; ending there");
                    self.ended = true;
                }
            }
        }
        if packets.is_empty() {
            return Ok(None);
        }
        // A piece lasts until the keyframe that begins the next one.
        let next_ms = self.held.as_ref().and_then(ms);
        let start_ms = packets.iter().filter_map(ms).reduce(f64::min);
        let chunk = Chunk {
            packets,
            duration_ms: next_ms.zip(start_ms).map(|(n, s)| n - s),
            discontinuity: false,
        };
        let out = self
            .decoder
            .decode_packets(&self.video, chunk, deadline, state, sampler, out);
        self.decoder.ready_for_next();
        let out = out?;
        let next = next_ms.map(|t| (t * 1000.0).round() as Position);
        Ok(Some((out, next)))
    }

    /// Gives the next read or seek its own DecodeLimits::deadline.
    fn arm(&self) {
        let until = self.epoch.elapsed() + self.limits.deadline;
        self.deadline_ms
            .store(until.as_millis() as u64, Ordering::Relaxed);
    }
}
