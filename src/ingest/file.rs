//! Files as sources: a local path allowed only under MEDIA_ROOT, and an HTTP resource read
//! with Range requests through the HLS fetcher (so timeouts, retries and the SSRF guard are
//! the same). Both are `Read + Seek` for the decoder thread, which needs to seek (an MP4
//! whose index, `moov`, sits at the end is read from there first).

use std::collections::VecDeque;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use url::Url;

use super::hls::fetch::{FetchError, Fetcher};
use super::hls::playlist::{ByteRange, Resource};

/// Bytes asked for per Range request.
const BLOCK: u64 = 1 << 20;
/// Blocks kept: the demuxer reads the index (often at the end), then the media in order.
const BLOCKS_KEPT: usize = 4;

/// The file `path` names, if it is a regular file under `root` once every symlink and `..`
/// is resolved; otherwise why not, for the user.
pub fn resolve_local(root: Option<&Path>, path: &Path) -> Result<PathBuf, String> {
    let root = root.ok_or(
        "local files are not enabled: set MEDIA_ROOT to the directory jobs may read files from",
    )?;
    let root = root
        .canonicalize()
        .map_err(|e| format!("MEDIA_ROOT ({}) cannot be read: {e}", root.display()))?;
    let found = path
        .canonicalize()
        .map_err(|_| format!("no readable file at {}", path.display()))?;
    if !found.starts_with(&root) {
        return Err(format!("{} is outside MEDIA_ROOT", path.display()));
    }
    if !found.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    Ok(found)
}

/// An HTTP resource read in [`BLOCK`]s with Range requests, for a blocking thread. A server
/// that ignores Range sends the whole file on the first request: it is kept whole if it fits
/// `limit`, refused otherwise.
pub struct RangeReader {
    url: Url,
    fetcher: Fetcher,
    runtime: tokio::runtime::Handle,
    cancel: CancellationToken,
    limit: usize,
    len: u64,
    pos: u64,
    /// Recently read blocks, newest last: (offset, bytes).
    blocks: VecDeque<(u64, Arc<Vec<u8>>)>,
    /// The first error that stopped reading: ffmpeg sees only "I/O error", the job says this.
    failure: Arc<Mutex<Option<String>>>,
}

impl RangeReader {
    /// Asks for the first block, which says how large the file is.
    pub async fn open(
        url: Url,
        fetcher: Fetcher,
        limit: usize,
        cancel: CancellationToken,
    ) -> Result<Self, FetchError> {
        let first = fetcher
            .fetch_sized(&range(&url, 0, BLOCK), limit, &cancel)
            .await?;
        let (len, block) = if first.ranged {
            (first.total.unwrap_or(first.body.len() as u64), first.body)
        } else {
            // The whole file came (the range was ignored): keep it all, fetch nothing more.
            let whole = fetcher
                .fetch(
                    &Resource {
                        url: url.clone(),
                        range: None,
                    },
                    limit,
                    &cancel,
                )
                .await?;
            (whole.len() as u64, whole)
        };
        Ok(Self {
            url,
            fetcher,
            runtime: tokio::runtime::Handle::current(),
            cancel,
            limit,
            len,
            pos: 0,
            blocks: VecDeque::from([(0, Arc::new(block))]),
            failure: Arc::default(),
        })
    }

    /// Where the reason reading stopped is left.
    pub fn failure(&self) -> Arc<Mutex<Option<String>>> {
        self.failure.clone()
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn block_at(&mut self, offset: u64) -> io::Result<Arc<Vec<u8>>> {
        if let Some(i) = self.blocks.iter().position(|(o, _)| *o == offset) {
            let hit = self.blocks.remove(i).expect("found above");
            self.blocks.push_back(hit.clone());
            return Ok(hit.1);
        }
        let length = BLOCK.min(self.len - offset);
        let fetched = self.runtime.block_on(self.fetcher.fetch_sized(
            &range(&self.url, offset, length),
            self.limit,
            &self.cancel,
        ));
        let body = match fetched {
            Ok(f) if f.body.len() as u64 == length => Arc::new(f.body),
            Ok(f) => {
                return Err(self.fail(format!(
                    "{} sent {} bytes for a range of {length} at {offset}",
                    crate::domain::redacted_url(self.url.as_str()),
                    f.body.len()
                )))
            }
            Err(e) => return Err(self.fail(e.to_string())),
        };
        if self.blocks.len() >= BLOCKS_KEPT {
            self.blocks.pop_front();
        }
        self.blocks.push_back((offset, body.clone()));
        Ok(body)
    }

    fn fail(&self, why: String) -> io::Error {
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        failure.get_or_insert_with(|| why.clone());
        io::Error::other(why)
    }
}

fn range(url: &Url, offset: u64, length: u64) -> Resource {
    Resource {
        url: url.clone(),
        range: Some(ByteRange { offset, length }),
    }
}

impl Read for RangeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.len || buf.is_empty() {
            return Ok(0);
        }
        let start = self.pos / BLOCK * BLOCK;
        // A whole file kept from a server without Range support is one block at 0.
        let block = match self.blocks.front() {
            Some((0, b)) if b.len() as u64 == self.len => b.clone(),
            _ => self.block_at(start)?,
        };
        let base = if block.len() as u64 == self.len {
            0
        } else {
            start
        };
        let at = (self.pos - base) as usize;
        let n = buf.len().min(block.len() - at);
        buf[..n].copy_from_slice(&block[at..at + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for RangeReader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = target.ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_files_only_under_media_root() {
        let root = tempfile::tempdir().unwrap();
        let inside = root.path().join("clips");
        std::fs::create_dir(&inside).unwrap();
        std::fs::write(inside.join("a.mp4"), b"x").unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("b.mp4"), b"x").unwrap();
        let ok = resolve_local(Some(root.path()), &inside.join("a.mp4")).unwrap();
        assert!(ok.ends_with("clips/a.mp4"));
        let err = resolve_local(None, &inside.join("a.mp4")).unwrap_err();
        assert!(err.contains("MEDIA_ROOT"), "{err}");
        let err = resolve_local(Some(root.path()), &outside.path().join("b.mp4")).unwrap_err();
        assert!(err.contains("outside MEDIA_ROOT"), "{err}");
        // Through `..` and through a symlink: still outside.
        // Both temporary directories are siblings: clips/../../<outside>/b.mp4.
        let dotted = inside
            .join("../..")
            .join(outside.path().file_name().unwrap())
            .join("b.mp4");
        assert!(resolve_local(Some(root.path()), &dotted)
            .unwrap_err()
            .contains("outside"));
        std::os::unix::fs::symlink(outside.path().join("b.mp4"), inside.join("link.mp4")).unwrap();
        assert!(resolve_local(Some(root.path()), &inside.join("link.mp4"))
            .unwrap_err()
            .contains("outside"));
        assert!(resolve_local(Some(root.path()), &inside)
            .unwrap_err()
            .contains("not a regular file"));
        assert!(resolve_local(Some(root.path()), &inside.join("none.mp4"))
            .unwrap_err()
            .contains("no readable file"));
    }
}
