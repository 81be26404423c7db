//! Sources: where a job's media comes from. HLS over HTTP (playlists, segments, the SSRF
//! guard) and Redis streams of encoded frames. Which one a job uses is decided from its
//! stream reference in [`crate::domain::StreamRef`].

pub mod hls;
pub mod redis;
pub mod ssrf;
