//! Where page bytes come from. [`PageSource`] is the seam (local files today, a remote page
//! server later); [`FileSource`] reads CRIU's raw `pages-<id>.img` files.
//!
//! Files are read with `pread` into the caller's buffer, never mmapped: a file truncated or
//! replaced under us then gives an error naming the file and offset instead of a SIGBUS in
//! the daemon.

use std::fmt;
use std::fs::File;
use std::io;
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

/// Something that can produce the bytes of lazy pages.
pub trait PageSource: Send {
    /// Fills all of `buf` with the bytes at `offset` of file `file`; anything less is an error.
    fn read(&self, file: u32, offset: u64, buf: &mut [u8]) -> Result<(), SourceError>;
}

/// Raw page files on local disk, addressed by index.
#[derive(Debug)]
pub struct FileSource {
    files: Vec<(PathBuf, File)>,
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
        Ok(Self { files })
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
