//! The `lazy-pages.socket` hand-off with `criu restore --lazy-pages` (criu-lazy-pages.md §2):
//! accept one credential-checked connection, then read, in any order, one message per task —
//! an int32 pid (host order) and, for a live task, one data byte carrying its uffd via
//! `SCM_RIGHTS` (a negative pid is a zombie, nothing follows) — then the 4-byte
//! restore-finished word. Every read is a non-blocking `recvmsg` of exactly what the next
//! field needs, so the byte carrying a descriptor is never read by accident.

use crate::sys::{self, PeerCred};
use std::collections::HashSet;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// The restore-finished word, `"FTSR"` on the wire.
pub const FINISHED_WORD: u32 = 0x5253_5446;

/// Errors of the hand-off. All are fatal for the restore.
#[derive(Debug)]
pub enum HandoffError {
    /// Cannot listen on {path}: {source}
    Listen { path: PathBuf, source: io::Error },
    /// Socket I/O error while {what}: {source}
    Io {
        what: &'static str,
        source: io::Error,
    },
    /// Restore ended before sending all {expected} tasks: got {got}
    EofBeforePids { expected: usize, got: usize },
    /// Restore sent pid {pid}, which is not in the plan
    UnknownPid { pid: i32 },
    /// Restore sent pid {pid} twice
    DuplicatePid { pid: i32 },
    /// Restore sent pid {pid} without a userfaultfd attached
    NoFd { pid: i32 },
    /// Expected the restore-finished word 0x52535446, got {word:#010x}
    BadWord { word: u32 },
    /// criu restore failed or was killed before it finished
    EofBeforeFinished,
}

impl fmt::Display for HandoffError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Listen { path, source } => write!(f, "cannot listen on {}: {source}", path.display()),
            Self::Io { what, source } => write!(f, "lazy-pages socket error while {what}: {source}"),
            Self::EofBeforePids { expected, got } => {
                write!(f, "restore ended before sending all {expected} tasks: got {got}")
            }
            Self::UnknownPid { pid } => write!(f, "restore sent pid {pid}, which is not in the plan (pstree.img)"),
            Self::DuplicatePid { pid } => write!(f, "restore sent pid {pid} twice"),
            Self::NoFd { pid } => write!(f, "restore sent pid {pid} without a userfaultfd attached"),
            Self::BadWord { word } => write!(
                f,
                "expected the restore-finished word {FINISHED_WORD:#010x} after all tasks, got {word:#010x}"
            ),
            Self::EofBeforeFinished => f.write_str(
                "criu restore failed or was killed before it finished (socket closed before the restore-finished word)",
            ),
        }
    }
}

impl std::error::Error for HandoffError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Listen { source, .. } | Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Binds `path` (after unlinking a stale socket there) with mode 0600 and listens.
pub fn listen(path: &Path) -> Result<UnixListener, HandoffError> {
    let err = |source| HandoffError::Listen {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    // CRIU uses a backlog of 10; one connection is all we ever accept.
    let fd = sys::unix_listen(path, 10).map_err(err)?;
    Ok(UnixListener::from(fd))
}

/// The result of one accept attempt.
#[derive(Debug)]
pub enum Accepted {
    /// A peer with an allowed uid.
    Peer(Handoff, PeerCred),
    /// A peer that was refused (closed) because of its uid.
    Refused(PeerCred),
    /// Nobody is waiting.
    None,
}

/// Accepts one pending connection, checking SO_PEERCRED against `allowed_uids`.
pub fn accept(
    listener: &UnixListener,
    allowed_uids: &[u32],
    expected: usize,
) -> Result<Accepted, HandoffError> {
    let stream = match listener.accept() {
        Ok((s, _)) => s,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Accepted::None),
        Err(source) => {
            return Err(HandoffError::Io {
                what: "accepting",
                source,
            })
        }
    };
    let cred = sys::peer_cred(stream.as_fd()).map_err(|source| HandoffError::Io {
        what: "reading SO_PEERCRED",
        source,
    })?;
    if !allowed_uids.contains(&cred.uid) {
        return Ok(Accepted::Refused(cred));
    }
    stream
        .set_nonblocking(true)
        .map_err(|source| HandoffError::Io {
            what: "setting O_NONBLOCK",
            source,
        })?;
    Ok(Accepted::Peer(Handoff::new(stream, expected), cred))
}

/// One message of the hand-off.
#[derive(Debug)]
pub enum Message {
    /// A live task and its userfaultfd.
    Task { pid: i32, uffd: OwnedFd },
    /// A zombie (it sent `-pid`).
    Zombie { pid: i32 },
    /// The restore-finished word: all tasks are in place and about to be resumed.
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Pid,
    Fd { pid: i32 },
    Finished,
    Done,
}

/// The reading side of an accepted connection.
#[derive(Debug)]
pub struct Handoff {
    stream: UnixStream,
    expected: usize,
    seen: HashSet<i32>,
    want: Want,
    word: [u8; 4],
    have: usize,
}

impl Handoff {
    fn new(stream: UnixStream, expected: usize) -> Self {
        Self {
            stream,
            expected,
            seen: HashSet::new(),
            want: Want::Pid,
            word: [0; 4],
            have: 0,
        }
    }

    /// Tasks announced so far.
    pub fn received(&self) -> usize {
        self.seen.len()
    }

    /// True once the finished word has been read.
    pub fn is_done(&self) -> bool {
        self.want == Want::Done
    }

    /// Reads everything available now into `out`, validating pids with `known`. Returns when
    /// the socket would block or the finished word was read.
    pub fn poll(
        &mut self,
        known: &dyn Fn(i32) -> bool,
        out: &mut Vec<Message>,
    ) -> Result<(), HandoffError> {
        loop {
            match self.want {
                Want::Done => return Ok(()),
                Want::Pid | Want::Finished => {
                    let mut buf = [0u8; 4];
                    let want = 4 - self.have;
                    let got = match self.recv(&mut buf[..want])? {
                        Some(r) => r,
                        None => return Ok(()),
                    };
                    if got.len == 0 {
                        return Err(if self.want == Want::Pid {
                            HandoffError::EofBeforePids {
                                expected: self.expected,
                                got: self.seen.len(),
                            }
                        } else {
                            HandoffError::EofBeforeFinished
                        });
                    }
                    // Descriptors on a pid or word are not part of the protocol; `got.fds`
                    // drops (closes) them.
                    self.word[self.have..self.have + got.len].copy_from_slice(&buf[..got.len]);
                    self.have += got.len;
                    if self.have < 4 {
                        continue;
                    }
                    self.have = 0;
                    let value = self.word;
                    if self.want == Want::Finished {
                        let word = u32::from_ne_bytes(value);
                        if word != FINISHED_WORD {
                            return Err(HandoffError::BadWord { word });
                        }
                        self.want = Want::Done;
                        out.push(Message::Finished);
                        return Ok(());
                    }
                    let raw = i32::from_ne_bytes(value);
                    let pid = raw.checked_abs().unwrap_or(0);
                    if pid == 0 || !known(pid) {
                        return Err(HandoffError::UnknownPid { pid: raw });
                    }
                    if !self.seen.insert(pid) {
                        return Err(HandoffError::DuplicatePid { pid });
                    }
                    if raw < 0 {
                        out.push(Message::Zombie { pid });
                        self.after_task();
                    } else {
                        self.want = Want::Fd { pid };
                    }
                }
                Want::Fd { pid } => {
                    let mut byte = [0u8; 1];
                    let got = match self.recv(&mut byte)? {
                        Some(r) => r,
                        None => return Ok(()),
                    };
                    if got.len == 0 {
                        // The task's pid counted as seen, but without its uffd it is not received.
                        return Err(HandoffError::EofBeforePids {
                            expected: self.expected,
                            got: self.seen.len() - 1,
                        });
                    }
                    let Some(uffd) = got.fds.into_iter().next() else {
                        return Err(HandoffError::NoFd { pid });
                    };
                    out.push(Message::Task { pid, uffd });
                    self.after_task();
                }
            }
        }
    }

    /// Reads and discards whatever the peer already sent (at most 64 KiB), so that closing
    /// after an error gives the peer a clean EOF instead of a connection reset.
    pub fn drain(&self) {
        let mut buf = [0u8; 4096];
        for _ in 0..16 {
            match self.recv(&mut buf) {
                Ok(Some(r)) if r.len > 0 => {}
                _ => return,
            }
        }
    }

    fn after_task(&mut self) {
        self.want = if self.seen.len() >= self.expected {
            Want::Finished
        } else {
            Want::Pid
        };
    }

    fn recv(&self, buf: &mut [u8]) -> Result<Option<sys::Received>, HandoffError> {
        loop {
            match sys::recv_with_fds(self.stream.as_fd(), buf) {
                Ok(r) => return Ok(Some(r)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(HandoffError::Io {
                        what: "reading the hand-off",
                        source,
                    })
                }
            }
        }
    }
}

impl AsFd for Handoff {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}
