//! Decodes access units from a packetised source (an RTSP camera's H.264 or H.265 frames)
//! with the segment decoder: the codec's parameter sets become the decoder's extradata, and
//! each group of pictures (a keyframe and the frames up to the next) is decoded as one chunk,
//! sampled and shaped exactly as an HLS segment is. Runs on a blocking thread.

use std::time::Instant;

use ffmpeg::{codec, Packet};
use ffmpeg_next as ffmpeg;

use super::decode::{Chunk, DecodeError, DecodeLimits, DecodeState, SegmentDecoder, VideoStream};
use super::sampler::Sampler;
use super::{EvidenceSpec, FrameSpec};
use crate::media::decode::SegmentOutcome;

/// The video codecs an access unit may be in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitCodec {
    H264,
    H265,
}

/// What a decoder needs before the first unit: the codec and its parameter sets in the
/// ISO-BMFF form (`avcC` / `hvcC`), as RTSP clients give them from the SDP or in-band.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitParams {
    pub codec: UnitCodec,
    pub extra_data: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

/// One access unit: length-prefixed NAL units, its time on the job's timeline in ms.
#[derive(Debug)]
pub struct Unit {
    pub data: Vec<u8>,
    pub pts_ms: i64,
    pub key: bool,
}

/// A job's decoder of access units.
pub struct UnitDecoder {
    decoder: SegmentDecoder,
    limits: DecodeLimits,
}

impl UnitDecoder {
    pub fn new(limits: DecodeLimits, spec: FrameSpec, evidence: Option<EvidenceSpec>) -> Self {
        Self {
            decoder: SegmentDecoder::new(limits.clone(), spec).with_evidence(evidence),
            limits,
        }
    }

    /// Decodes one group of pictures (its first unit should be a keyframe); `next_pts_ms` is
    /// where the next group starts, when known; `discontinuity` after a reconnection.
    pub fn decode(
        &mut self,
        params: &UnitParams,
        units: Vec<Unit>,
        next_pts_ms: Option<i64>,
        discontinuity: bool,
        state: &mut DecodeState,
        sampler: &mut Sampler,
    ) -> Result<SegmentOutcome, DecodeError> {
        let start = units.iter().map(|u| u.pts_ms).min();
        let packets = units
            .into_iter()
            .map(|u| {
                let mut p = Packet::copy(&u.data);
                p.set_pts(Some(u.pts_ms));
                if u.key {
                    p.set_flags(codec::packet::Flags::KEY);
                }
                p
            })
            .collect();
        let video = VideoStream {
            index: 0,
            tick_ms: 1.0,
            parameters: parameters(params),
        };
        let chunk = Chunk {
            packets,
            duration_ms: next_pts_ms.zip(start).map(|(n, s)| (n - s) as f64),
            discontinuity,
        };
        let deadline = Instant::now() + self.limits.deadline;
        let out = self.decoder.decode_packets(
            &video,
            chunk,
            deadline,
            state,
            sampler,
            SegmentOutcome::default(),
        );
        self.decoder.ready_for_next();
        out
    }
}

/// ffmpeg's codec parameters for `p`: the codec, its size and its parameter sets.
fn parameters(p: &UnitParams) -> codec::Parameters {
    let mut parameters = codec::Parameters::new();
    parameters.set_medium(ffmpeg::media::Type::Video);
    parameters.set_id(match p.codec {
        UnitCodec::H264 => codec::Id::H264,
        UnitCodec::H265 => codec::Id::HEVC,
    });
    // SAFETY: fields of parameters we own; extradata is allocated with av_malloc (padded with
    // zeroes as libavcodec requires) and freed by avcodec_parameters_free with them.
    unsafe {
        let raw = parameters.as_mut_ptr();
        (*raw).width = p.width as i32;
        (*raw).height = p.height as i32;
        let len = p.extra_data.len();
        let pad = ffmpeg::ffi::AV_INPUT_BUFFER_PADDING_SIZE as usize;
        let buf = ffmpeg::ffi::av_mallocz(len + pad) as *mut u8;
        if !buf.is_null() {
            std::ptr::copy_nonoverlapping(p.extra_data.as_ptr(), buf, len);
            (*raw).extradata = buf;
            (*raw).extradata_size = len as i32;
        }
    }
    parameters
}
