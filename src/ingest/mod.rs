//! Sources: where a job's media comes from. HLS over HTTP (playlists, segments, the SSRF
//! guard), Redis streams of encoded frames, RTSP cameras (retina, with reconnection), and
//! whole files (local under MEDIA_ROOT, or
//! over HTTP with Range requests). Which one a job uses is decided from its
//! stream reference in [`crate::domain::StreamRef`].

pub mod file;
pub mod hls;
pub mod redis;
pub mod rtsp;
pub mod rtsps;
pub mod ssrf;
