//! RTSP cameras with `retina` (a pure-Rust RTSP client made for IP cameras; `rtsps://` through
//! [`super::rtsps`]'s TLS tunnel): the first H.264 or H.265 video stream, TCP-interleaved by
//! default, its access units timed from the RTP
//! timestamps (retina unwraps them) on one timeline across reconnections. Cameras fail and
//! jobs don't: after an end, an error or a stall (no frame for RTSP_STALL_SECS) the source
//! reconnects with capped, jittered backoff, and gives up only after RTSP_GIVE_UP_SECS without
//! a successful connection, or at once when the camera refuses the credentials. The URL's
//! password is sent to the camera and shown nowhere. RTCP sender reports tie the camera's RTP
//! clock to its wall clock: each is passed on as a [`WallClock`], from which every frame's
//! `captured_at` follows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use retina::client::{
    Credentials, PlayOptions, SessionOptions, SetupOptions, TcpTransportOptions, Transport,
    UdpTransportOptions,
};
use retina::codec::{CodecItem, ParametersRef};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::rtsps::TunnelError;
use super::ssrf::NetworkPolicy;
use crate::config::RtspSettings;
use crate::domain::redacted_url;
use crate::media::units::{Unit, UnitCodec, UnitParams};
use crate::retry::Backoff;
use crate::stats::Stats;

/// What the source sends the pipeline.
#[derive(Debug)]
pub enum RtspEvent {
    /// A session began (`new_session`) or the parameters changed: decoding starts again at
    /// the next keyframe with these.
    Connected {
        params: Arc<UnitParams>,
        new_session: bool,
    },
    Unit(Unit),
    /// A sender report of this session: its frames' wall clock.
    Clock(WallClock),
}

/// Where a session's timeline meets the camera's wall clock (RFC 3550 §6.4.1: a sender
/// report pairs an RTP timestamp with the NTP time it stands for).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WallClock {
    /// The report's RTP time on the job's timeline.
    pub pts_ms: i64,
    /// The same instant by the camera's clock, in Unix seconds.
    pub unix: f64,
}

impl WallClock {
    /// When the frame at `pts_ms` (same session) was taken, by the camera's clock.
    pub fn at(&self, pts_ms: i64) -> f64 {
        self.unix + (pts_ms - self.pts_ms) as f64 / 1000.0
    }
}

/// Seconds from the NTP epoch (1900) to the Unix epoch (1970).
const NTP_TO_UNIX_SECS: u64 = 2_208_988_800;

/// An NTP timestamp (32.32 fixed point seconds since 1900) in Unix seconds; `None` for a
/// clock that was evidently never set (before 2001), as some cameras send.
fn ntp_to_unix(ntp: u64) -> Option<f64> {
    let secs = (ntp >> 32).checked_sub(NTP_TO_UNIX_SECS)?;
    let unix = secs as f64 + (ntp & 0xFFFF_FFFF) as f64 / 4_294_967_296.0;
    (unix >= 978_307_200.0).then_some(unix)
}

#[derive(Debug, thiserror::Error)]
pub enum RtspError {
    #[error("the camera refused the credentials: {0}")]
    Unauthorized(String),
    #[error("no successful connection to {url} for {secs} s: {last}")]
    GaveUp {
        url: String,
        secs: u64,
        last: String,
    },
    #[error("{0}")]
    Refused(String),
}

pub struct RtspSource {
    pub url: Url,
    pub settings: RtspSettings,
    pub policy: NetworkPolicy,
    /// Where the first session's timeline starts (a resumed job goes on after its results).
    pub start_ms: i64,
}

/// How a session ended.
enum Ended {
    Stopped,
    Lost(String),
}

impl RtspSource {
    /// Connects, reads and reconnects until `stop`, or until it gives up.
    pub async fn run(
        self,
        tx: mpsc::Sender<RtspEvent>,
        stats: Arc<Stats>,
        stop: CancellationToken,
    ) -> Result<(), RtspError> {
        self.policy
            .check_url(&self.url)
            .map_err(|r| RtspError::Refused(r.to_string()))?;
        let shown = redacted_url(self.url.as_str());
        let backoff = Backoff::new(
            Duration::from_millis(500),
            Duration::from_secs(10),
            u32::MAX,
        );
        let mut timeline = Timeline {
            next_base_ms: self.start_ms,
            last: None,
        };
        let mut connected_at = Instant::now();
        let mut attempt = 0;
        stats.set_source_state("connecting");
        loop {
            let ended = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                e = self.session(&tx, &stats, &mut timeline, &mut connected_at) => e,
            };
            let why = match ended {
                Ok(Ended::Stopped) => return Ok(()),
                Ok(Ended::Lost(why)) => why,
                Err(e) => return Err(e),
            };
            if connected_at.elapsed() >= self.settings.give_up {
                return Err(RtspError::GaveUp {
                    url: shown,
                    secs: self.settings.give_up.as_secs(),
                    last: why,
                });
            }
            attempt += 1;
            Stats::add(&stats.reconnects, 1);
            stats.set_source_state("reconnecting");
            tracing::warn!(url = %shown, reason = %why, attempt, "RTSP source lost; reconnecting");
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff.delay(attempt.min(20), None)) => {}
            }
        }
    }

    /// One RTSP session: DESCRIBE, SETUP of the video stream, PLAY, frames until it ends.
    /// `connected_at` moves to now once frames flow.
    async fn session(
        &self,
        tx: &mpsc::Sender<RtspEvent>,
        stats: &Stats,
        timeline: &mut Timeline,
        connected_at: &mut Instant,
    ) -> Result<Ended, RtspError> {
        let stall = self.settings.stall;
        let (url, creds) = split_credentials(&self.url);
        // Resolved and checked at every connection: the camera's name may move. rtsps://
        // goes through a TLS tunnel that lives as long as this session.
        let tls = url.scheme() == "rtsps";
        let _tunnel;
        let url = if tls {
            let ca = self.settings.tls_ca_file.as_deref();
            match super::rtsps::open(&url, &self.policy, ca, stall).await {
                Ok(tunnel) => {
                    let plain = tunnel.url.clone();
                    _tunnel = tunnel;
                    plain
                }
                Err(TunnelError::Lost(why)) => return Ok(Ended::Lost(why)),
                Err(e) => {
                    return Err(RtspError::Refused(without_password(
                        &e.to_string(),
                        &self.url,
                    )))
                }
            }
        } else {
            match self.policy.pinned(&url).await {
                Ok(url) => url,
                Err(Some(refused)) => return Err(RtspError::Refused(refused.to_string())),
                Err(None) => {
                    let host = url.host_str().unwrap_or_default().to_owned();
                    return Ok(Ended::Lost(format!("{host} does not resolve")));
                }
            }
        };
        let options = SessionOptions::default()
            .creds(creds)
            .user_agent(format!("free-roam/{}", env!("CARGO_PKG_VERSION")));
        let lost = |what: &str, e: &dyn std::fmt::Display| {
            let text = e.to_string();
            if text.contains("401") {
                Err(RtspError::Unauthorized(without_password(&text, &self.url)))
            } else {
                Ok(Ended::Lost(format!(
                    "{what}: {}",
                    without_password(&text, &self.url)
                )))
            }
        };
        let mut session = match tokio::time::timeout(
            stall,
            retina::client::Session::describe(url, options),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return lost("DESCRIBE failed", &e),
            Err(_) => return Ok(Ended::Lost("DESCRIBE timed out".into())),
        };
        let Some((index, codec)) = session.streams().iter().enumerate().find_map(|(i, s)| {
            let codec = match (s.media(), s.encoding_name().to_ascii_lowercase().as_str()) {
                ("video", "h264") => UnitCodec::H264,
                ("video", "h265") => UnitCodec::H265,
                _ => return None,
            };
            Some((i, codec))
        }) else {
            return Ok(Ended::Lost(
                "the camera offers no H.264 or H.265 video stream".into(),
            ));
        };
        // Over TLS, RTP can only come interleaved on the tunnel.
        let transport = if self.settings.udp && !tls {
            Transport::Udp(UdpTransportOptions::default())
        } else {
            Transport::Tcp(TcpTransportOptions::default())
        };
        let setup = session.setup(index, SetupOptions::default().transport(transport));
        match tokio::time::timeout(stall, setup).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return lost("SETUP failed", &e),
            Err(_) => return Ok(Ended::Lost("SETUP timed out".into())),
        }
        let playing = match tokio::time::timeout(stall, session.play(PlayOptions::default())).await
        {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return lost("PLAY failed", &e),
            Err(_) => return Ok(Ended::Lost("PLAY timed out".into())),
        };
        let mut demuxed = match playing.demuxed() {
            Ok(d) => Box::pin(d),
            Err(e) => return lost("cannot read the stream", &e),
        };
        let mut params: Option<Arc<UnitParams>> = None;
        let base = timeline.begin();
        loop {
            let item = match tokio::time::timeout(stall, demuxed.next()).await {
                Err(_) => {
                    stats.set_source_state("stalled");
                    return Ok(Ended::Lost(format!("no frame for {} s", stall.as_secs())));
                }
                Ok(None) => return Ok(Ended::Lost("the camera ended the stream".into())),
                Ok(Some(Err(e))) => return lost("stream error", &e),
                Ok(Some(Ok(item))) => item,
            };
            let frame = match item {
                CodecItem::VideoFrame(frame) => frame,
                CodecItem::Rtcp(rtcp) if rtcp.stream_id() == index => {
                    let report = rtcp
                        .pkts()
                        .next()
                        .and_then(|p| p.as_sender_report().ok().flatten());
                    let clock = match (rtcp.rtp_timestamp(), report) {
                        (Some(ts), Some(sr)) => {
                            ntp_to_unix(sr.ntp_timestamp().0).map(|unix| WallClock {
                                pts_ms: base
                                    + ts.elapsed() * 1000 / i64::from(ts.clock_rate().get()),
                                unix,
                            })
                        }
                        _ => None,
                    };
                    if let Some(clock) = clock {
                        if tx.send(RtspEvent::Clock(clock)).await.is_err() {
                            return Ok(Ended::Stopped);
                        }
                    }
                    continue;
                }
                _ => continue,
            };
            if frame.stream_id() != index {
                continue;
            }
            let new_session = params.is_none();
            if new_session || frame.has_new_parameters() {
                let Some(ParametersRef::Video(v)) = demuxed.streams()[index].parameters() else {
                    continue;
                };
                let (width, height) = v.pixel_dimensions();
                let p = Arc::new(UnitParams {
                    codec,
                    extra_data: v.extra_data().to_vec(),
                    width,
                    height,
                });
                params = Some(p.clone());
                let connected = RtspEvent::Connected {
                    params: p,
                    new_session,
                };
                if tx.send(connected).await.is_err() {
                    return Ok(Ended::Stopped);
                }
                if stats.source_state() != "live" {
                    stats.set_source_state("live");
                    *connected_at = Instant::now();
                }
            }
            let ts = frame.timestamp();
            let pts_ms = base + ts.elapsed() * 1000 / i64::from(ts.clock_rate().get());
            timeline.saw(pts_ms);
            let unit = Unit {
                key: frame.is_random_access_point(),
                pts_ms,
                data: frame.into_data(),
            };
            if tx.send(RtspEvent::Unit(unit)).await.is_err() {
                return Ok(Ended::Stopped);
            }
            *connected_at = Instant::now();
        }
    }
}

/// The job's timeline across sessions: each session's RTP time starts again, so it is
/// placed after the last frame by the wall-clock time the gap lasted.
struct Timeline {
    next_base_ms: i64,
    last: Option<(i64, Instant)>,
}

impl Timeline {
    fn begin(&mut self) -> i64 {
        if let Some((pts, at)) = self.last {
            self.next_base_ms = pts + (at.elapsed().as_millis() as i64).max(1);
        }
        self.next_base_ms
    }

    fn saw(&mut self, pts_ms: i64) {
        self.last = Some((pts_ms, Instant::now()));
    }
}

/// The URL without its userinfo, and the credentials it carried (percent-decoded).
fn split_credentials(url: &Url) -> (Url, Option<Credentials>) {
    let mut bare = url.clone();
    let _ = bare.set_username("");
    let _ = bare.set_password(None);
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let creds = (!url.username().is_empty()).then(|| Credentials {
        username: decode(url.username()),
        password: decode(url.password().unwrap_or("")),
    });
    (bare, creds)
}

/// `text` with the URL's password (as written and decoded) replaced, in case a library put
/// it in a message.
fn without_password(text: &str, url: &Url) -> String {
    let Some(password) = url.password().filter(|p| !p.is_empty()) else {
        return text.to_owned();
    };
    let decoded = percent_encoding::percent_decode_str(password)
        .decode_utf8_lossy()
        .into_owned();
    text.replace(password, "***").replace(&decoded, "***")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sender_report_times_become_unix_seconds() {
        // 2026-11-30T00:00:00.5Z: 1795996800 s after 1970, plus 70 years of NTP epoch.
        let ntp = ((1_795_996_800u64 + NTP_TO_UNIX_SECS) << 32) | 0x8000_0000;
        assert_eq!(ntp_to_unix(ntp), Some(1_795_996_800.5));
        // A camera whose clock was never set (NTP 0, or 1970) dates nothing.
        assert_eq!(ntp_to_unix(0), None);
        assert_eq!(ntp_to_unix(NTP_TO_UNIX_SECS << 32), None);
        let clock = WallClock {
            pts_ms: 4_000,
            unix: 1_795_996_800.5,
        };
        assert_eq!(clock.at(4_500), 1_795_996_801.0);
        assert_eq!(clock.at(3_000), 1_795_996_799.5);
    }

    #[test]
    fn credentials_leave_the_url_and_are_hidden_in_messages() {
        let url = Url::parse("rtsp://admin:p%40ss@cam.local:554/live").unwrap();
        let (bare, creds) = split_credentials(&url);
        assert_eq!(bare.as_str(), "rtsp://cam.local:554/live");
        let creds = creds.unwrap();
        assert_eq!(
            (creds.username.as_str(), creds.password.as_str()),
            ("admin", "p@ss")
        );
        assert_eq!(
            without_password("401 for admin:p@ss and p%40ss", &url),
            "401 for admin:*** and ***"
        );
    }

    #[test]
    fn sessions_follow_each_other_on_one_timeline() {
        let mut t = Timeline {
            next_base_ms: 5000,
            last: None,
        };
        assert_eq!(t.begin(), 5000);
        t.saw(9000);
        let next = t.begin();
        assert!(next > 9000, "{next}");
    }
}
