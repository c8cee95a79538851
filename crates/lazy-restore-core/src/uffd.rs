//! A safe handle on one restored task's userfaultfd: read its events without blocking, and
//! resolve faults with COPY / ZEROPAGE / WAKE, or stop tracking a range with UNREGISTER.
//!
//! Semantics follow `userfaultfd(2)` and `ioctl_userfaultfd(2)`; message layout from
//! `linux/userfaultfd.h` (32-byte `uffd_msg`, event code at byte 0, payload at byte 8).

use crate::sys;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

/// The page size lazy-restore serves in. CRIU uses the runtime page size; the engine refuses
/// to start on a host whose page size differs.
pub const PAGE_SIZE: u64 = 4096;

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;

/// Messages read per `read(2)`.
const BATCH: usize = 64;

/// One message read from a userfaultfd.
#[derive(Debug)]
pub enum Event {
    /// A thread touched a missing page at `addr` (not page aligned).
    PageFault { addr: u64, flags: u64 },
    /// The task forked; the child's new uffd is already in our fd table.
    Fork { child: Option<OwnedFd> },
    /// `mremap` moved `[from, from+len)` to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// `madvise(MADV_DONTNEED/REMOVE)` dropped `[start, end)`.
    Remove { start: u64, end: u64 },
    /// `munmap` (or an mremap shrink) removed `[start, end)`.
    Unmap { start: u64, end: u64 },
    /// An event this daemon did not ask for.
    Unknown { code: u8 },
}

/// Why a UFFDIO_COPY / ZEROPAGE / WAKE / UNREGISTER did nothing.
#[derive(Debug)]
pub enum CopyError {
    /// EEXIST: the page is already populated (a raced fault or copy).
    Exists,
    /// EAGAIN: the mm is changing (fork, mremap, …); try again shortly.
    Again,
    /// ESRCH / ENOSPC (and ENOMEM from UNREGISTER): the task's mm is gone, it exited.
    Gone,
    /// ENOENT: no registered mapping there any more.
    NoMapping,
    /// EFAULT: the source could not be read (a mapped page file truncated under us).
    Fault,
    /// Anything else.
    Other(io::Error),
}

impl fmt::Display for CopyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exists => f.write_str("page already present (EEXIST)"),
            Self::Again => f.write_str("address space changing (EAGAIN)"),
            Self::Gone => f.write_str("task exited (ESRCH)"),
            Self::NoMapping => f.write_str("no registered mapping (ENOENT)"),
            Self::Fault => f.write_str("source unreadable (EFAULT)"),
            Self::Other(e) => write!(f, "{e}"),
        }
    }
}

impl CopyError {
    pub(crate) fn from_io(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::EEXIST) => Self::Exists,
            Some(libc::EAGAIN) => Self::Again,
            Some(libc::ESRCH) | Some(libc::ENOSPC) => Self::Gone,
            Some(libc::ENOENT) => Self::NoMapping,
            Some(libc::EFAULT) => Self::Fault,
            _ => Self::Other(e),
        }
    }
}

/// A restored task's userfaultfd, owned by the daemon.
#[derive(Debug)]
pub struct Uffd {
    /// Shared with the copier thread, which only copies into it.
    fd: Arc<OwnedFd>,
    /// `/proc/self/fdinfo/<fd>`, opened on first use of [`Uffd::pending_faults`].
    fdinfo: Option<std::fs::File>,
    buf: Box<[u8; sys::UFFD_MSG_SIZE * BATCH]>,
}

impl Uffd {
    /// Takes ownership of a received uffd and makes sure it is non-blocking.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        sys::set_nonblocking(fd.as_fd())?;
        Ok(Self {
            fd: Arc::new(fd),
            fdinfo: None,
            buf: Box::new([0; sys::UFFD_MSG_SIZE * BATCH]),
        })
    }

    /// The descriptor, for a copier thread (copies only; events stay with this handle).
    pub fn shared_fd(&self) -> Arc<OwnedFd> {
        Arc::clone(&self.fd)
    }

    /// Reads every message available right now (up to one batch) into `out`. Returns the
    /// number of messages read; 0 when none is ready (EAGAIN) or the uffd reports EOF.
    pub fn read_events(&mut self, out: &mut Vec<Event>) -> io::Result<usize> {
        self.read_at_most(out, BATCH)
    }

    /// Like [`Uffd::read_events`], reading at most `max` messages.
    pub fn read_at_most(&mut self, out: &mut Vec<Event>, max: usize) -> io::Result<usize> {
        let len = max.clamp(1, BATCH) * sys::UFFD_MSG_SIZE;
        let n = match sys::read(self.fd.as_fd(), &mut self.buf[..len]) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => return Ok(0),
            Err(e) => return Err(e),
        };
        let msgs = n / sys::UFFD_MSG_SIZE;
        for msg in self.buf[..msgs * sys::UFFD_MSG_SIZE].chunks_exact(sys::UFFD_MSG_SIZE) {
            out.push(parse(msg));
        }
        Ok(msgs)
    }

    /// Page faults queued and not read yet: the `pending` line of the uffd's fdinfo (the
    /// kernel counts its fault_pending queue there; events are not counted). `read(2)`
    /// returns queued faults before any event, so reading at most this many messages reads
    /// faults only, as long as nobody else wakes a queued fault in between — which is why the
    /// copier thread copies with DONTWAKE.
    pub fn pending_faults(&mut self) -> io::Result<u64> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::FileExt;
        if self.fdinfo.is_none() {
            let path = format!("/proc/self/fdinfo/{}", self.fd.as_raw_fd());
            self.fdinfo = Some(std::fs::File::open(path)?);
        }
        let mut buf = [0u8; 256];
        let n = match &self.fdinfo {
            Some(f) => f.read_at(&mut buf, 0)?,
            None => 0,
        };
        parse_pending(&buf[..n]).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "no `pending:` line in the uffd's fdinfo",
            )
        })
    }

    /// UFFDIO_COPY `src` to `dst`; returns bytes copied, which may be short of `src.len()`
    /// (call again for the rest to learn why it stopped).
    pub fn copy(&self, dst: u64, src: &[u8], dontwake: bool) -> Result<usize, CopyError> {
        let mode = if dontwake { sys::MODE_DONTWAKE } else { 0 };
        sys::uffdio_copy(self.fd.as_fd(), dst, src, mode).map_err(CopyError::from_io)
    }

    /// UFFDIO_COPY of `len` bytes at address `src` of this process (e.g. a page-file mapping,
    /// which only the kernel reads) to `dst`; same result convention as [`Uffd::copy`].
    pub fn copy_from(
        &self,
        dst: u64,
        src: u64,
        len: u64,
        dontwake: bool,
    ) -> Result<usize, CopyError> {
        copy_from(self.fd.as_fd(), dst, src, len, dontwake)
    }

    /// UFFDIO_ZEROPAGE of `[start, start+len)`; returns bytes filled (may be short).
    pub fn zeropage(&self, start: u64, len: u64, dontwake: bool) -> Result<usize, CopyError> {
        let mode = if dontwake { sys::MODE_DONTWAKE } else { 0 };
        sys::uffdio_zeropage(self.fd.as_fd(), start, len, mode).map_err(CopyError::from_io)
    }

    /// UFFDIO_WAKE the threads waiting on `[start, start+len)`.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), CopyError> {
        sys::uffdio_wake(self.fd.as_fd(), start, len).map_err(CopyError::from_io)
    }

    /// UFFDIO_UNREGISTER `[start, start+len)`, so later faults there are the kernel's own.
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), CopyError> {
        sys::uffdio_unregister(self.fd.as_fd(), start, len).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOMEM) => CopyError::Gone,
            _ => CopyError::from_io(e),
        })
    }
}

/// [`Uffd::copy_from`] on a bare descriptor (the copier thread's).
pub fn copy_from(
    fd: BorrowedFd<'_>,
    dst: u64,
    src: u64,
    len: u64,
    dontwake: bool,
) -> Result<usize, CopyError> {
    let mode = if dontwake { sys::MODE_DONTWAKE } else { 0 };
    sys::uffdio_copy_raw(fd, dst, src, len, mode).map_err(CopyError::from_io)
}

/// [`Uffd::copy`] on a bare descriptor (the copier thread's).
pub fn copy(fd: BorrowedFd<'_>, dst: u64, src: &[u8], dontwake: bool) -> Result<usize, CopyError> {
    let mode = if dontwake { sys::MODE_DONTWAKE } else { 0 };
    sys::uffdio_copy(fd, dst, src, mode).map_err(CopyError::from_io)
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn parse_pending(fdinfo: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(fdinfo).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("pending:"))
        .and_then(|v| v.trim().parse().ok())
}

fn u64_at(msg: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&msg[off..off + 8]);
    u64::from_ne_bytes(b)
}

fn parse(msg: &[u8]) -> Event {
    match msg[0] {
        EVENT_PAGEFAULT => Event::PageFault {
            flags: u64_at(msg, 8),
            addr: u64_at(msg, 16),
        },
        EVENT_FORK => {
            let mut b = [0u8; 4];
            b.copy_from_slice(&msg[8..12]);
            Event::Fork {
                child: sys::adopt_fd(u32::from_ne_bytes(b) as i32),
            }
        }
        EVENT_REMAP => Event::Remap {
            from: u64_at(msg, 8),
            to: u64_at(msg, 16),
            len: u64_at(msg, 24),
        },
        EVENT_REMOVE => Event::Remove {
            start: u64_at(msg, 8),
            end: u64_at(msg, 16),
        },
        EVENT_UNMAP => Event::Unmap {
            start: u64_at(msg, 8),
            end: u64_at(msg, 16),
        },
        code => Event::Unknown { code },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_pending_faults_from_fdinfo() {
        let info = b"pos:\t0\nflags:\t02004000\nmnt_id:\t15\nino:\t1057\npending:\t3\ntotal:\t5\nAPI:\taa:4e:...\n";
        assert_eq!(parse_pending(info), Some(3));
        assert_eq!(parse_pending(b"total:\t5\n"), None);
        let fd = sys::userfaultfd(libc::O_CLOEXEC | libc::O_NONBLOCK).expect("userfaultfd");
        sys::uffdio_api(&fd, 0).expect("api");
        let mut u = Uffd::new(fd).expect("uffd");
        assert_eq!(u.pending_faults().expect("fdinfo"), 0);
    }

    #[test]
    fn parses_each_event_layout() {
        let mut m = [0u8; 32];
        m[0] = EVENT_PAGEFAULT;
        m[8..16].copy_from_slice(&1u64.to_ne_bytes());
        m[16..24].copy_from_slice(&0x7f00_1234u64.to_ne_bytes());
        assert!(matches!(
            parse(&m),
            Event::PageFault {
                addr: 0x7f00_1234,
                flags: 1
            }
        ));
        let mut m = [0u8; 32];
        m[0] = EVENT_REMAP;
        m[8..16].copy_from_slice(&0x1000u64.to_ne_bytes());
        m[16..24].copy_from_slice(&0x9000u64.to_ne_bytes());
        m[24..32].copy_from_slice(&0x2000u64.to_ne_bytes());
        assert!(matches!(
            parse(&m),
            Event::Remap {
                from: 0x1000,
                to: 0x9000,
                len: 0x2000
            }
        ));
        m[0] = EVENT_UNMAP;
        assert!(matches!(
            parse(&m),
            Event::Unmap {
                start: 0x1000,
                end: 0x9000
            }
        ));
        m[0] = EVENT_REMOVE;
        assert!(matches!(
            parse(&m),
            Event::Remove {
                start: 0x1000,
                end: 0x9000
            }
        ));
        m[0] = 0x77;
        assert!(matches!(parse(&m), Event::Unknown { code: 0x77 }));
    }
}
