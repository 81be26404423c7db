//! A file job's pipeline: the file (local under MEDIA_ROOT, or over HTTP with Range
//! requests) decoded piece by piece on one blocking thread, each piece's frames sent on like an
//! HLS segment's, a checkpoint after each piece; `completed` at the end of the file. A resumed
//! job seeks to the piece after the last one whose results were all stored.

use tokio::sync::mpsc;

use super::dispatch::Work;
use super::pipeline::{Outcome, Pending, Pipeline, Progress};
use crate::batch::LaneHandle;
use crate::domain::FileLocation;
use crate::ingest::file::{resolve_local, RangeReader};
use crate::media::decode::{DecodeError, SegmentOutcome};
use crate::media::file::{FileDecoder, Position};
use crate::media::sampler::Sampler;
use crate::stats::Stats;

/// The position saved after a file's last piece.
const END: Position = Position::MAX;

/// What the decoding thread sends: a piece and the progress after it, or why it stopped.
enum Piece {
    Decoded {
        out: SegmentOutcome,
        progress: Box<Progress>,
    },
    Failed(String),
}

impl Pipeline {
    /// Reads the file once, start to end; returns when it ends, fails or is cancelled.
    pub(super) async fn file(
        &self,
        location: FileLocation,
        progress: Progress,
        lane: &LaneHandle<Work>,
        pending: mpsc::Sender<Pending>,
    ) -> Outcome {
        let p = &self.settings.pipeline;
        let stop = self.cancel.child_token();
        let limits = self.decode_limits();
        let (spec, evidence) = (self.spec, self.evidence);
        let resume = progress.file_position;
        if resume == Some(END) {
            // Every piece's results were stored before a restart: nothing is left to read.
            return Outcome::Completed;
        }
        let mut st = progress.decode.unwrap_or_default();
        let mut sm = progress.sampler.unwrap_or_else(|| self.new_sampler());
        // The reader, opened here (an HTTP file's first request says its size); what stopped
        // an HTTP read is kept for the job's error, since ffmpeg only sees "I/O error".
        let (open, failure): (
            Box<dyn FnOnce() -> Result<FileDecoder, DecodeError> + Send>,
            _,
        ) = match location {
            FileLocation::Local(path) => {
                let path = match resolve_local(p.media_root.as_deref(), &path) {
                    Ok(path) => path,
                    Err(why) => return Outcome::Failed(why),
                };
                let file = match std::fs::File::open(&path) {
                    Ok(f) => f,
                    Err(e) => {
                        return Outcome::Failed(format!("cannot open {}: {e}", path.display()))
                    }
                };
                let cancelled = stop.clone();
                (
                    Box::new(move || {
                        FileDecoder::open(file, limits, spec, evidence, move || {
                            cancelled.is_cancelled()
                        })
                    }),
                    None,
                )
            }
            FileLocation::Http(url) => {
                let reader =
                    RangeReader::open(url, self.fetcher.clone(), p.max_segment_bytes, stop.clone())
                        .await;
                let reader = match reader {
                    Ok(r) => r,
                    Err(e) => return Outcome::Failed(format!("cannot read the file: {e}")),
                };
                let failure = reader.failure();
                let cancelled = stop.clone();
                (
                    Box::new(move || {
                        FileDecoder::open(reader, limits, spec, evidence, move || {
                            cancelled.is_cancelled()
                        })
                    }),
                    Some(failure),
                )
            }
        };
        self.stats.set_source_state("reading");
        let (tx, mut rx) = mpsc::channel::<Piece>(1);
        let span = tracing::Span::current();
        let reading = tokio::task::spawn_blocking(move || {
            let _g = span.enter();
            let mut decoder = match open() {
                Ok(d) => d,
                Err(e) => {
                    let _ =
                        tx.blocking_send(Piece::Failed(format!("not a readable video file: {e}")));
                    return;
                }
            };
            if let Some(at) = resume {
                if let Err(e) = decoder.seek(at) {
                    let _ = tx.blocking_send(Piece::Failed(e.to_string()));
                    return;
                }
            }
            loop {
                let piece = match decoder.next(&mut st, &mut sm) {
                    Ok(Some((out, next))) => Piece::Decoded {
                        out,
                        progress: Box::new(progress_after(&st, &sm, next)),
                    },
                    Ok(None) => return,
                    Err(e) => Piece::Failed(e.to_string()),
                };
                let failed = matches!(piece, Piece::Failed(_));
                if tx.blocking_send(piece).is_err() || failed {
                    return;
                }
            }
        });
        let mut failed = None;
        while let Some(piece) = tokio::select! { _ = stop.cancelled() => None, p = rx.recv() => p }
        {
            match piece {
                Piece::Decoded { out, progress } => {
                    Stats::add(&self.stats.segments_fetched, 1);
                    if !self.deliver(out, lane, &pending, &stop).await {
                        break;
                    }
                    if !self.checkpoint(*progress, &pending).await {
                        break;
                    }
                }
                Piece::Failed(why) => {
                    failed = Some(why);
                    break;
                }
            }
        }
        drop(pending);
        stop.cancel();
        drop(rx);
        if reading.await.is_err() {
            return Outcome::Failed("the file decoder crashed".into());
        }
        if self.cancel.is_cancelled() {
            return Outcome::Stopped;
        }
        // An HTTP read that gave up says why; ffmpeg would only have seen the end of the data.
        let reader_failure = failure.and_then(|f| f.lock().ok().and_then(|f| f.clone()));
        match failed.or(reader_failure) {
            Some(why) => Outcome::Failed(why),
            None => {
                self.stats.set_source_state("ended");
                Outcome::Completed
            }
        }
    }
}

/// The checkpoint after a piece: the states to go on with and where the next piece starts
/// (at the end of the file there is none: a resumed job reads nothing more).
fn progress_after(
    decode: &crate::media::decode::DecodeState,
    sampler: &Sampler,
    next: Option<Position>,
) -> Progress {
    Progress {
        decode: Some(decode.clone()),
        sampler: Some(sampler.clone()),
        file_position: Some(next.unwrap_or(END)),
        ..Progress::default()
    }
}
