//! HLS playlists: parsing with m3u8-rs, the validation it skips, and variant selection.
//!
//! m3u8-rs accepts some malformed input silently, so every duration, URI and tag the
//! pipeline relies on is checked here, and the result is a small typed playlist with
//! absolute URLs, media sequence numbers, and the EXT-X-MAP/byte range carried forward to
//! every segment they apply to.

use std::collections::HashMap;

use url::Url;

/// A part of a resource: `length` bytes from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ByteRange {
    pub offset: u64,
    pub length: u64,
}

/// A resource to fetch: a URL and maybe a byte range of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Resource {
    pub url: Url,
    pub range: Option<ByteRange>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    /// Media sequence number (EXT-X-MEDIA-SEQUENCE + position).
    pub seq: u64,
    pub resource: Resource,
    pub duration_ms: f64,
    pub discontinuity: bool,
    /// EXT-X-MAP in force (fMP4 init section).
    pub init: Option<Resource>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MediaPlaylist {
    pub target_duration_ms: f64,
    pub segments: Vec<Segment>,
    /// EXT-X-ENDLIST: nothing will be added (VOD or an ended event).
    pub ended: bool,
}

impl MediaPlaylist {
    pub fn last_seq(&self) -> Option<u64> {
        self.segments.last().map(|s| s.seq)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    pub url: Url,
    pub bandwidth: u64,
    pub height: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Playlist {
    Master(Vec<Variant>),
    Media(MediaPlaylist),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid HLS playlist: {0}")]
pub struct PlaylistError(pub String);

fn invalid(msg: impl Into<String>) -> PlaylistError {
    PlaylistError(msg.into())
}

/// Longest target duration accepted; real streams use 1-10 s.
const MAX_TARGET_DURATION_S: u64 = 120;

/// Parses and validates a playlist fetched from `base`.
pub fn parse(bytes: &[u8], base: &Url) -> Result<Playlist, PlaylistError> {
    let text = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let start = text
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(text.len());
    if !text[start..].starts_with(b"#EXTM3U") {
        return Err(invalid("it does not start with #EXTM3U"));
    }
    if std::str::from_utf8(text).is_err() {
        return Err(invalid("it is not UTF-8 text"));
    }
    let parsed = m3u8_rs::parse_playlist_res(text)
        .map_err(|e| invalid(format!("unparseable ({})", short(&format!("{e:?}")))))?;
    match parsed {
        m3u8_rs::Playlist::MasterPlaylist(m) => {
            let mut variants = Vec::new();
            for v in m.variants.iter().filter(|v| !v.is_i_frame) {
                variants.push(Variant {
                    url: join(base, &v.uri)?,
                    bandwidth: v.bandwidth,
                    height: v.resolution.map(|r| r.height),
                });
            }
            if variants.is_empty() {
                return Err(invalid("master playlist lists no variant streams"));
            }
            Ok(Playlist::Master(variants))
        }
        m3u8_rs::Playlist::MediaPlaylist(m) => media(m, base).map(Playlist::Media),
    }
}

fn media(m: m3u8_rs::MediaPlaylist, base: &Url) -> Result<MediaPlaylist, PlaylistError> {
    if m.target_duration == 0 || m.target_duration > MAX_TARGET_DURATION_S {
        return Err(invalid(format!(
            "EXT-X-TARGETDURATION is {} (expected 1 to {MAX_TARGET_DURATION_S} seconds)",
            m.target_duration
        )));
    }
    if m.i_frames_only {
        return Err(invalid("I-frame-only playlists carry no full video"));
    }
    let target_ms = m.target_duration as f64 * 1000.0;
    let mut init: Option<Resource> = None;
    let mut next_offset: HashMap<Url, u64> = HashMap::new();
    let mut segments = Vec::with_capacity(m.segments.len());
    for (i, s) in m.segments.iter().enumerate() {
        let seq = m.media_sequence + i as u64;
        let d = f64::from(s.duration);
        // Segments may overrun the target slightly in the wild; far beyond it is an error.
        if !d.is_finite() || d <= 0.0 || d * 1000.0 > target_ms * 3.0 {
            return Err(invalid(format!(
                "segment {seq} has EXTINF duration {} (target duration {} s)",
                s.duration, m.target_duration
            )));
        }
        if let Some(key) = &s.key {
            if !matches!(key.method, m3u8_rs::KeyMethod::None) {
                return Err(invalid(format!(
                    "segment {seq} is encrypted ({}); encrypted HLS is not supported",
                    key.method
                )));
            }
        }
        if let Some(map) = &s.map {
            let url = join(base, &map.uri)?;
            let range = map.byte_range.as_ref().map(|r| ByteRange {
                offset: r.offset.unwrap_or(0),
                length: r.length,
            });
            init = Some(Resource { url, range });
        }
        let url = join(base, &s.uri)?;
        let range = match &s.byte_range {
            None => None,
            Some(r) => {
                let offset = r
                    .offset
                    .or_else(|| next_offset.get(&url).copied())
                    .unwrap_or(0);
                next_offset.insert(url.clone(), offset + r.length);
                Some(ByteRange {
                    offset,
                    length: r.length,
                })
            }
        };
        segments.push(Segment {
            seq,
            resource: Resource { url, range },
            duration_ms: d * 1000.0,
            discontinuity: s.discontinuity,
            init: init.clone(),
        });
    }
    Ok(MediaPlaylist {
        target_duration_ms: target_ms,
        segments,
        ended: m.end_list,
    })
}

fn join(base: &Url, uri: &str) -> Result<Url, PlaylistError> {
    let url = base
        .join(uri.trim())
        .map_err(|_| invalid(format!("URI {:?} is not valid", short(uri))))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(format!("URI {:?} is not http(s)", short(uri))));
    }
    Ok(url)
}

fn short(s: &str) -> String {
    s.chars().take(80).collect()
}

/// The documented rule: the highest BANDWIDTH among variants whose RESOLUTION height is at
/// most `max_height` (variants without RESOLUTION count as fitting); if none fits, the
/// variant with the smallest height.
pub fn choose_variant(variants: &[Variant], max_height: u64) -> Option<&Variant> {
    variants
        .iter()
        .filter(|v| v.height.is_none_or(|h| h <= max_height))
        .max_by_key(|v| v.bandwidth)
        .or_else(|| variants.iter().min_by_key(|v| v.height.unwrap_or(u64::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Url {
        Url::parse("http://origin.example/live/index.m3u8").unwrap()
    }

    #[test]
    fn media_playlist_with_map_byterange_and_discontinuity() {
        let text = "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:41\n\
            #EXT-X-MAP:URI=\"init.mp4\"\n#EXTINF:2.0,\nseg41.m4s\n#EXTINF:2.0,\nseg42.m4s\n\
            #EXT-X-DISCONTINUITY\n#EXTINF:1.5,\n#EXT-X-BYTERANGE:1000@0\nall.ts\n#EXTINF:1.5,\n#EXT-X-BYTERANGE:500\nall.ts\n";
        let Playlist::Media(m) = parse(text.as_bytes(), &base()).unwrap() else {
            panic!()
        };
        assert_eq!(m.target_duration_ms, 2000.0);
        assert!(!m.ended);
        let seqs: Vec<u64> = m.segments.iter().map(|s| s.seq).collect();
        assert_eq!(seqs, vec![41, 42, 43, 44]);
        assert_eq!(
            m.segments[1].init.as_ref().unwrap().url.as_str(),
            "http://origin.example/live/init.mp4"
        );
        assert!(m.segments[2].discontinuity && !m.segments[1].discontinuity);
        assert_eq!(
            m.segments[3].resource.range,
            Some(ByteRange {
                offset: 1000,
                length: 500
            })
        );
    }

    #[test]
    fn refuses_what_m3u8_rs_lets_through() {
        for bad in [
            "not a playlist",
            "#EXTM3U\n#EXT-X-TARGETDURATION:0\n#EXTINF:2,\na.ts\n",
            "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:-1,\na.ts\n",
            "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:60,\na.ts\n",
            "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\nftp://x/a.ts\n",
            "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-KEY:METHOD=AES-128,URI=\"k\"\n#EXTINF:2,\na.ts\n",
        ] {
            assert!(parse(bad.as_bytes(), &base()).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn variant_rule() {
        let text = "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=800000,RESOLUTION=640x360\nlow.m3u8\n\
            #EXT-X-STREAM-INF:BANDWIDTH=2500000,RESOLUTION=1280x720\nmid.m3u8\n\
            #EXT-X-STREAM-INF:BANDWIDTH=6000000,RESOLUTION=1920x1080\nhigh.m3u8\n";
        let Playlist::Master(v) = parse(text.as_bytes(), &base()).unwrap() else {
            panic!()
        };
        assert!(choose_variant(&v, 720)
            .unwrap()
            .url
            .as_str()
            .ends_with("mid.m3u8"));
        assert!(choose_variant(&v, 2160)
            .unwrap()
            .url
            .as_str()
            .ends_with("high.m3u8"));
        assert!(
            choose_variant(&v, 240)
                .unwrap()
                .url
                .as_str()
                .ends_with("low.m3u8"),
            "none fits: smallest"
        );
    }
}
