//! Where page bytes come from. [`PageSource`] is the seam (local files today, a remote page
//! server later); [`FileSource`] reads CRIU's raw `pages-<id>.img` files.
//!
//! Files are read with `pread` into the caller's buffer, or — when [`FileSource::map_files`]
//! was called — mapped read-only and handed to UFFDIO_COPY as a source address
//! ([`PageSource::mapped`]), which saves the copy into a buffer (bulk copy 3.0-3.3 GiB/s instead
//! of 2.1-2.9 in `benches/bulk_copy.rs`). The mapping is never read from user space: only the
//! kernel's `copy_from_user` reads it, which turns a page past a truncated end into EFAULT
//! instead of a SIGBUS in the daemon; and after every such copy [`PageSource::check_mapped`]
//! compares the file size with the bytes used (a truncation updates the size before it drops
//! the pages, so a copy that could have seen a cut file is always caught). Either way a file
//! truncated under us is an error naming the file and offset.

use crate::sys::{self, FileMapping};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Errors of a page source.
#[derive(Debug)]
pub enum SourceError {
    /// Cannot open pages file {path}: {source}
    Open { path: PathBuf, source: io::Error },
    /// Pages file {path} is {len} bytes but the plan needs {needed}
    TooShort {
        path: PathBuf,
        len: u64,
        needed: u64,
    },
    /// Short read from {path} at offset {offset}: wanted {wanted} bytes, got {got}
    ShortRead {
        path: PathBuf,
        offset: u64,
        wanted: usize,
        got: usize,
    },
    /// Cannot read {path} at offset {offset}: {source}
    Read {
        path: PathBuf,
        offset: u64,
        source: io::Error,
    },
    /// No file with index {file}
    UnknownFile { file: u32 },
    /// Remote page source: {0}
    Remote(crate::remote::RemoteError),
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open { path, source } => write!(f, "cannot open pages file {}: {source}", path.display()),
            Self::TooShort { path, len, needed } => {
                write!(f, "pages file {} is {len} bytes but the plan needs {needed}", path.display())
            }
            Self::ShortRead { path, offset, wanted, got } => write!(
                f,
                "short read from {} at offset {offset}: wanted {wanted} bytes, got {got} (file truncated?)",
                path.display()
            ),
            Self::Read { path, offset, source } => {
                write!(f, "cannot read {} at offset {offset}: {source}", path.display())
            }
            Self::UnknownFile { file } => write!(f, "no pages file with index {file}"),
            Self::Remote(e) => write!(f, "remote page source: {e}"),
        }
    }
}

impl std::error::Error for SourceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Open { source, .. } | Self::Read { source, .. } => Some(source),
            Self::Remote(e) => Some(e),
            _ => None,
        }
    }
}

/// What a remote page source did, for the report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceStats {
    /// Which server, e.g. "lazy-restore page-server 10.0.0.1:7070".
    pub name: String,
    /// Requests for faults (and their readahead windows).
    pub urgent_requests: u64,
    /// Background requests (bulk streams, or CRIU GETs for the background).
    pub bulk_requests: u64,
    /// Page bytes received.
    pub page_bytes: u64,
    /// Bytes those pages took on the wire (less with lz4).
    pub wire_bytes: u64,
    /// Connections lost and re-established.
    pub reconnects: u64,
}

/// Counters a remote source updates as it goes; read without locks (the engine thread takes a
/// snapshot while the copier may be blocked on the network holding the source's locks).
#[derive(Debug, Default)]
pub struct SourceCounters {
    pub urgent_requests: std::sync::atomic::AtomicU64,
    pub bulk_requests: std::sync::atomic::AtomicU64,
    pub page_bytes: std::sync::atomic::AtomicU64,
    pub wire_bytes: std::sync::atomic::AtomicU64,
    pub reconnects: std::sync::atomic::AtomicU64,
}

impl SourceCounters {
    /// Adds `n` to one counter.
    pub fn add(c: &std::sync::atomic::AtomicU64, n: u64) {
        c.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// A copy, named.
    pub fn stats(&self, name: &str) -> SourceStats {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        SourceStats {
            name: name.to_string(),
            urgent_requests: get(&self.urgent_requests),
            bulk_requests: get(&self.bulk_requests),
            page_bytes: get(&self.page_bytes),
            wire_bytes: get(&self.wire_bytes),
            reconnects: get(&self.reconnects),
        }
    }
}

/// Something that can produce the bytes of lazy pages.
pub trait PageSource: Send {
    /// Fills all of `buf` with the bytes at `offset` of file `file`; anything less is an error.
    fn read(&self, file: u32, offset: u64, buf: &mut [u8]) -> Result<(), SourceError>;

    /// Like [`PageSource::read`], for a fault (and its readahead): a remote source answers it
    /// ahead of any background traffic. Local sources have no queue to jump.
    fn read_urgent(&self, file: u32, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.read(file, offset, buf)
    }

    /// The copier is about to read these spans `(file, offset, bytes)`, in this order: a
    /// remote source may start streaming them now, so the reads that follow find the bytes
    /// already on their way. `key` identifies the job (increasing; a repeated key is ignored).
    fn prepare(&self, _key: u64, _spans: &[(u32, u64, u64)]) {}

    /// The engine has ended: `complete` when every page it was responsible for is in (or no
    /// longer needed). A session-based source ends its session here (CRIU's page server is
    /// told CLOSE only after a complete transfer; otherwise it resumes the source tasks). An
    /// error is reported as a warning: the restore itself is done.
    fn finish(&self, _complete: bool) -> Result<(), SourceError> {
        Ok(())
    }

    /// What a remote source did so far (None for local files). Must not block: the engine
    /// thread calls it for every progress report.
    fn stats(&self) -> Option<SourceStats> {
        None
    }

    /// The address in this process where bytes `[offset, offset+len)` of file `file` are
    /// mapped, to be used only as a UFFDIO_COPY source (never read from user space). `None`:
    /// use [`PageSource::read`].
    fn mapped(&self, _file: u32, _offset: u64, _len: u64) -> Option<u64> {
        None
    }

    /// After a copy from [`PageSource::mapped`] memory: an error if the file no longer holds
    /// all of `[offset, offset+len)` (it was truncated under us, and the copy may have
    /// installed bytes past its new end).
    fn check_mapped(&self, _file: u32, _offset: u64, _len: u64) -> Result<(), SourceError> {
        Ok(())
    }
}

/// Raw page files on local disk, addressed by index.
#[derive(Debug)]
pub struct FileSource {
    files: Vec<(PathBuf, File)>,
    /// Read-only mappings, per file, once [`FileSource::map_files`] succeeded.
    maps: Vec<Option<FileMapping>>,
}

impl FileSource {
    /// Opens every file read-only.
    pub fn open(paths: &[PathBuf]) -> Result<Self, SourceError> {
        let files = paths
            .iter()
            .map(|p| {
                File::open(p)
                    .map(|f| (p.clone(), f))
                    .map_err(|source| SourceError::Open {
                        path: p.clone(),
                        source,
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            files,
            maps: Vec::new(),
        })
    }

    /// Maps every non-empty file read-only for zero-copy UFFDIO_COPY (see the module doc) and
    /// asks for sequential readahead on it. A file that cannot be mapped stays on `pread`.
    pub fn map_files(&mut self) {
        self.maps = self
            .files
            .iter()
            .map(|(_, f)| {
                let len = f.metadata().ok()?.len();
                let m = FileMapping::map(f.as_fd(), len).ok()?;
                // Advice only: the kernel reads ahead on its own if it refuses.
                let _ = sys::fadvise(f.as_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
                Some(m)
            })
            .collect();
    }

    /// True when file `file` is served from a mapping.
    pub fn is_mapped(&self, file: u32) -> bool {
        self.maps.get(file as usize).is_some_and(Option::is_some)
    }

    /// Checks that file `file` holds at least `needed` bytes.
    pub fn check_len(&self, file: u32, needed: u64) -> Result<(), SourceError> {
        let (path, f) = self
            .files
            .get(file as usize)
            .ok_or(SourceError::UnknownFile { file })?;
        let len = f
            .metadata()
            .map_err(|source| SourceError::Read {
                path: path.clone(),
                offset: 0,
                source,
            })?
            .len();
        if len < needed {
            return Err(SourceError::TooShort {
                path: path.clone(),
                len,
                needed,
            });
        }
        Ok(())
    }

    /// Path of file `file`.
    pub fn path(&self, file: u32) -> Option<&Path> {
        self.files.get(file as usize).map(|(p, _)| p.as_path())
    }
}

impl PageSource for FileSource {
    fn mapped(&self, file: u32, offset: u64, len: u64) -> Option<u64> {
        let m = self.maps.get(file as usize)?.as_ref()?;
        (offset.checked_add(len)? <= m.len()).then(|| m.addr_of(offset))
    }

    fn check_mapped(&self, file: u32, offset: u64, len: u64) -> Result<(), SourceError> {
        let (path, f) = self
            .files
            .get(file as usize)
            .ok_or(SourceError::UnknownFile { file })?;
        let size = sys::file_size(f.as_fd()).map_err(|source| SourceError::Read {
            path: path.clone(),
            offset,
            source,
        })?;
        if size < offset + len {
            return Err(SourceError::ShortRead {
                path: path.clone(),
                offset,
                wanted: len as usize,
                got: size.saturating_sub(offset) as usize,
            });
        }
        Ok(())
    }

    fn read(&self, file: u32, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let (path, f) = self
            .files
            .get(file as usize)
            .ok_or(SourceError::UnknownFile { file })?;
        let mut got = 0;
        while got < buf.len() {
            match f.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => {
                    return Err(SourceError::ShortRead {
                        path: path.clone(),
                        offset,
                        wanted: buf.len(),
                        got,
                    });
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(SourceError::Read {
                        path: path.clone(),
                        offset: offset + got as u64,
                        source,
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_read_names_file_and_offset() {
        let dir = std::env::temp_dir().join(format!("lr-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pages-1.img");
        std::fs::write(&path, vec![7u8; 6000]).unwrap();
        let src = FileSource::open(std::slice::from_ref(&path)).unwrap();
        let mut buf = vec![0u8; 4096];
        src.read(0, 0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        let err = src.read(0, 4096, &mut buf).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                SourceError::ShortRead {
                    offset: 4096,
                    got: 1904,
                    ..
                }
            ),
            "{msg}"
        );
        assert!(msg.contains("pages-1.img") && msg.contains("4096"), "{msg}");
        assert!(matches!(
            src.check_len(0, 8192),
            Err(SourceError::TooShort { len: 6000, .. })
        ));
        assert!(matches!(
            src.read(3, 0, &mut buf),
            Err(SourceError::UnknownFile { file: 3 })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
