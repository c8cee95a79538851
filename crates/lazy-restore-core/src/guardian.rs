//! The guardian: a tiny process that outlives the daemon, so that a restored process never
//! runs on memory that was never restored.
//!
//! Why it exists: a userfaultfd lives as long as some process holds a reference to it. If the
//! daemon is the only holder and dies (SIGKILL, OOM, crash) before every lazy page is in, the
//! kernel releases the uffd, unregisters its ranges and wakes every waiting thread: each page
//! not yet copied then reads as a fresh zero page (criu-lazy-pages.md §2.5) — silent
//! corruption or a crash. The engine's own fatal-error path cannot help when the daemon is
//! SIGKILLed. So the engine hands the guardian a second reference to every uffd it serves (the
//! hand-off tasks' and every forked child's). When the daemon dies the uffds stay alive, the
//! restored tasks stay blocked in the kernel on their missing pages, and the guardian — which
//! sees EOF on its socket — SIGKILLs the tree before it lets the uffds go.
//!
//! The link is one `AF_UNIX` `SOCK_SEQPACKET` socket (fd 3 in the guardian) carrying fixed
//! 40-byte [records](Record):
//!
//! | from | record | meaning |
//! |---|---|---|
//! | guardian | HELLO(protocol version) | once, at start; the engine waits for it |
//! | engine | WATCH(image pid, child index, host pid + starttime if known, criu restore pid) + the uffd (`SCM_RIGHTS`) | hold this uffd; kill this task if needed |
//! | engine | PENDING(pages) | pages still missing, at every progress tick (for the message) |
//! | engine | DONE | every page is in: close everything, exit 0 |
//! | engine | ABORT | the engine stops with pages missing (fatal error, abort): kill, exit 1 |
//! | kernel | EOF without DONE | the daemon died: kill, exit 1 |
//!
//! Killing reuses [`tree`]: starttime-checked identities, the tree frozen with SIGSTOP then
//! SIGKILLed, descendants found through `/proc/<pid>/task/*/children`. Forked children, whose
//! host pid the engine never learns, are found as descendants; the guardian also snapshots
//! the descendants of the watched tasks every [`REFRESH`] while the daemon lives, so a child
//! that was reparented away from the tree before the daemon died is still known.
//!
//! Two halves live here: [`GuardianLink`], the engine's end (spawns the guardian, sends
//! records), and [`run`], the guardian process's main (`lazy-restore-guardian`).

use crate::sys;
use crate::tree::{self, HostProc};
use std::collections::HashSet;
use std::fmt;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Version of the record protocol; the engine refuses a guardian that speaks another one
/// (a stale `lazy-restore-guardian` next to a rebuilt binding).
pub const PROTOCOL_VERSION: u64 = 1;

/// How often the guardian snapshots the descendants of the watched tasks.
pub const REFRESH: Duration = Duration::from_millis(500);

/// "LRGD": the first four bytes of every record.
const MAGIC: u32 = u32::from_le_bytes(*b"LRGD");
/// Bytes per record.
const RECORD_SIZE: usize = 40;
/// How long the engine waits for HELLO.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// A WATCH that cannot be sent in this time (guardian stuck) gives up instead of stalling the
/// fault loop any longer; the engine then warns that protection is lost.
const WATCH_TIMEOUT: Duration = Duration::from_secs(1);
/// DONE is sent once, at the end, and a lost DONE would get a healthy tree killed: wait long.
const DONE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the engine waits for the guardian to exit after DONE or ABORT (killing a tree
/// takes milliseconds).
const REAP_TIMEOUT: Duration = Duration::from_secs(2);

/// The exit status of the guardian after it killed the watched tree.
pub const EXIT_KILLED: i32 = 1;
/// The exit status when fd 3 is not the engine's socket (started by hand).
pub const EXIT_USAGE: i32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Hello = 1,
    Watch = 2,
    Pending = 3,
    Done = 4,
    Abort = 5,
}

impl Kind {
    fn of(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::Watch,
            3 => Self::Pending,
            4 => Self::Done,
            5 => Self::Abort,
            _ => return None,
        })
    }
}

/// One record of the link. Layout (native endian): magic u32 @0, kind u32 @4, image_pid i32 @8,
/// child_index u32 @12, host_pid i32 @16 (0 = unknown), peer_pid i32 @20 (0 = unknown),
/// starttime u64 @24, value u64 @32 (HELLO: protocol version; PENDING: pages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    kind: Kind,
    image_pid: i32,
    child_index: u32,
    host_pid: i32,
    peer_pid: i32,
    starttime: u64,
    value: u64,
}

impl Record {
    fn new(kind: Kind) -> Self {
        Self {
            kind,
            image_pid: 0,
            child_index: 0,
            host_pid: 0,
            peer_pid: 0,
            starttime: 0,
            value: 0,
        }
    }

    fn encode(&self) -> [u8; RECORD_SIZE] {
        let mut b = [0u8; RECORD_SIZE];
        b[0..4].copy_from_slice(&MAGIC.to_ne_bytes());
        b[4..8].copy_from_slice(&(self.kind as u32).to_ne_bytes());
        b[8..12].copy_from_slice(&self.image_pid.to_ne_bytes());
        b[12..16].copy_from_slice(&self.child_index.to_ne_bytes());
        b[16..20].copy_from_slice(&self.host_pid.to_ne_bytes());
        b[20..24].copy_from_slice(&self.peer_pid.to_ne_bytes());
        b[24..32].copy_from_slice(&self.starttime.to_ne_bytes());
        b[32..40].copy_from_slice(&self.value.to_ne_bytes());
        b
    }

    fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() != RECORD_SIZE {
            return Err(format!(
                "a record of {} bytes (expected {RECORD_SIZE})",
                b.len()
            ));
        }
        let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_ne_bytes(x)
        };
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(format!(
                "a record with magic {magic:#010x} (expected {MAGIC:#010x})"
            ));
        }
        let kind =
            Kind::of(u32_at(4)).ok_or_else(|| format!("a record of unknown kind {}", u32_at(4)))?;
        Ok(Self {
            kind,
            image_pid: u32_at(8) as i32,
            child_index: u32_at(12),
            host_pid: u32_at(16) as i32,
            peer_pid: u32_at(20) as i32,
            starttime: u64_at(24),
            value: u64_at(32),
        })
    }
}

// ---- the engine's end ---------------------------------------------------------------------

/// Why a guardian could not be started. Both are fatal for [`crate::Engine::start`]: the
/// caller asked for the protection, and nothing has been served yet.
#[derive(Debug)]
pub enum GuardianError {
    /// Cannot start the guardian {path}: {source}
    Spawn { path: PathBuf, source: io::Error },
    /// The guardian {path} did not start properly: {reason}
    Handshake { path: PathBuf, reason: String },
}

impl fmt::Display for GuardianError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Spawn { path, source } => {
                write!(f, "cannot start the guardian {}: {source}", path.display())
            }
            Self::Handshake { path, reason } => {
                write!(
                    f,
                    "the guardian {} did not start properly: {reason}",
                    path.display()
                )
            }
        }
    }
}

impl std::error::Error for GuardianError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Spawn { source, .. } => Some(source),
            Self::Handshake { .. } => None,
        }
    }
}

/// What the engine knows about a task whose uffd it hands over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watch {
    /// The pid in the images (a forked child's is its parent's).
    pub image_pid: i32,
    /// 0 for a hand-off task; 1, 2, … for children forked from it after restore.
    pub child_index: u32,
    /// The host process, when the engine resolved it (never for forked children).
    pub host: Option<HostProc>,
    /// The connected `criu restore` (SO_PEERCRED), so the guardian can resolve a host pid
    /// itself while restore still runs.
    pub peer_pid: Option<i32>,
}

/// The engine's end of the link to a running guardian. Dropping it without [`finish`]
/// closes the socket, which the guardian reads as "the daemon died" (it kills what it
/// watches): the fail-safe default.
///
/// [`finish`]: GuardianLink::finish
#[derive(Debug)]
pub struct GuardianLink {
    sock: Option<OwnedFd>,
    child: Child,
    path: PathBuf,
}

impl GuardianLink {
    /// Starts the guardian binary at `path` with our stderr, so its one line lands where the
    /// daemon's errors go, and waits for its HELLO.
    pub fn spawn(path: &Path) -> Result<Self, GuardianError> {
        // Not `Stdio::inherit()`: Node marks its stdio close-on-exec, so an inherited fd 2
        // would arrive closed. A dup is installed as the child's fd 2 without that flag.
        let stderr = io::stderr()
            .as_fd()
            .try_clone_to_owned()
            .map_or_else(|_| Stdio::null(), Stdio::from);
        Self::spawn_with(path, stderr)
    }

    /// [`GuardianLink::spawn`] with the guardian's stderr going to `stderr` (tests capture
    /// it with `Stdio::piped()` and [`GuardianLink::take_stderr`]).
    pub fn spawn_with(path: &Path, stderr: Stdio) -> Result<Self, GuardianError> {
        let spawn_err = |source| GuardianError::Spawn {
            path: path.to_path_buf(),
            source,
        };
        let (ours, theirs) = sys::seqpacket_pair().map_err(spawn_err)?;
        let mut cmd = Command::new(path);
        // cwd "/": a guardian must not keep a directory (a mount) busy for as long as it lives.
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .current_dir("/");
        let child =
            sys::spawn_with_fd3_in_new_session(&mut cmd, theirs.as_fd()).map_err(spawn_err)?;
        // Only the guardian may hold that end: if we kept it, the guardian's death would
        // never show here as EPIPE.
        drop(theirs);
        let mut link = Self {
            sock: Some(ours),
            child,
            path: path.to_path_buf(),
        };
        if let Err(reason) = link.hello() {
            // Ours to stop: it never said hello, so it holds nothing yet.
            let _ = link.child.kill();
            let _ = link.child.wait();
            link.sock = None;
            return Err(GuardianError::Handshake {
                path: path.to_path_buf(),
                reason,
            });
        }
        Ok(link)
    }

    fn hello(&mut self) -> Result<(), String> {
        let sock = self.sock.as_ref().ok_or("no socket")?;
        let ready = sys::wait_readable(sock.as_fd(), Some(HELLO_TIMEOUT))
            .map_err(|e| format!("waiting for its hello: {e}"))?;
        if !ready {
            return Err(format!(
                "no hello within {} s (is it really lazy-restore-guardian?)",
                HELLO_TIMEOUT.as_secs()
            ));
        }
        let mut buf = [0u8; RECORD_SIZE + 8];
        let got = sys::recv_with_fds(sock.as_fd(), &mut buf)
            .map_err(|e| format!("reading its hello: {e}"))?;
        if got.len == 0 {
            let status = self
                .child
                .wait()
                .map_or_else(|e| format!("unknown: {e}"), |s| s.to_string());
            return Err(format!("it exited before saying hello ({status})"));
        }
        let r = Record::decode(&buf[..got.len]).map_err(|e| format!("it sent {e}"))?;
        if r.kind != Kind::Hello {
            return Err(format!("it sent {:?} instead of a hello", r.kind));
        }
        if r.value != PROTOCOL_VERSION {
            return Err(format!(
                "it speaks protocol {}, this engine {PROTOCOL_VERSION}: rebuild both from the same source",
                r.value
            ));
        }
        sys::set_send_timeout(sock.as_fd(), WATCH_TIMEOUT)
            .map_err(|e| format!("setting a send timeout: {e}"))
    }

    /// The guardian's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The path it was started from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The guardian's stderr, when it was spawned with `Stdio::piped()`.
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.child.stderr.take()
    }

    /// Hands the guardian a reference to `uffd` (the receiver gets its own descriptor for the
    /// same open file) and what is known about its task. Blocks at most a second.
    pub fn watch(&mut self, task: Watch, uffd: BorrowedFd<'_>) -> io::Result<()> {
        let mut r = Record::new(Kind::Watch);
        r.image_pid = task.image_pid;
        r.child_index = task.child_index;
        if let Some(h) = task.host {
            r.host_pid = h.pid;
            r.starttime = h.starttime;
        }
        r.peer_pid = task.peer_pid.unwrap_or(0);
        self.send(&r, Some(uffd), false)
    }

    /// Tells the guardian how many pages are still missing. Never blocks: a full socket (a
    /// stuck guardian) just skips this informational record.
    pub fn pending(&mut self, pages: u64) -> io::Result<()> {
        let mut r = Record::new(Kind::Pending);
        r.value = pages;
        match self.send(&r, None, true) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            other => other,
        }
    }

    /// Ends the link: DONE when `complete` (every page is in; the guardian lets go and exits
    /// 0), else ABORT (the guardian kills the watched tree and exits 1). Then closes the socket
    /// and reaps the guardian (bounded). `Err` when the record could not be delivered — after
    /// a failed DONE the guardian, if alive, takes the closed socket for a dead daemon.
    pub fn finish(mut self, complete: bool) -> io::Result<Option<ExitStatus>> {
        let r = Record::new(if complete { Kind::Done } else { Kind::Abort });
        let sent = match self.sock.as_ref() {
            Some(s) => sys::set_send_timeout(s.as_fd(), DONE_TIMEOUT)
                .and_then(|()| self.send(&r, None, false)),
            None => Ok(()),
        };
        let status = self.close_and_reap(REAP_TIMEOUT);
        sent.map(|()| status)
    }

    /// Closes the socket without a word — exactly what the guardian sees when the daemon
    /// dies — and waits up to `wait` for the guardian to exit.
    pub fn close(mut self, wait: Duration) -> Option<ExitStatus> {
        self.close_and_reap(wait)
    }

    fn send(&self, r: &Record, fd: Option<BorrowedFd<'_>>, dontwait: bool) -> io::Result<()> {
        let sock = self.sock.as_ref().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotConnected, "the guardian link is closed")
        })?;
        let bytes = r.encode();
        loop {
            match sys::send_msg(sock.as_fd(), &bytes, fd, dontwait) {
                Ok(n) if n == bytes.len() => return Ok(()),
                Ok(n) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("sent {n} of {} bytes of a record", bytes.len()),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn close_and_reap(&mut self, wait: Duration) -> Option<ExitStatus> {
        self.sock = None;
        let deadline = Instant::now() + wait;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                // Still busy (or unwaitable): leave it; it exits on its own, and its zombie
                // goes when this process does.
                _ => return None,
            }
        }
    }
}

impl Drop for GuardianLink {
    fn drop(&mut self) {
        if self.sock.is_some() {
            self.close_and_reap(Duration::ZERO);
        }
    }
}

// ---- the guardian process -----------------------------------------------------------------

/// One uffd the guardian holds, and the task it belongs to.
struct Watched {
    image_pid: i32,
    child_index: u32,
    host: Option<HostProc>,
    peer_pid: Option<i32>,
    /// Never read: holding it is the whole point.
    _uffd: OwnedFd,
}

/// How the link ended.
enum Ending {
    /// DONE: every page is in.
    Done,
    /// Anything else: the watched tree must die.
    Kill(Cause),
}

/// Why the watched tree is killed.
enum Cause {
    /// ABORT: the engine stopped with pages missing.
    Aborted,
    /// EOF: the daemon is gone.
    Died,
    /// The socket failed; DONE can no longer arrive.
    Broken(io::Error),
}

struct Guardian {
    sock: OwnedFd,
    daemon_pid: u32,
    watched: Vec<Watched>,
    /// Descendants of watched tasks seen at the last refreshes (identity-checked).
    known: HashSet<HostProc>,
    /// Pages missing at the engine's last PENDING.
    pending: Option<u64>,
    last_refresh: Instant,
}

fn say(msg: &str) {
    // One write(2) for the whole line (stderr is unbuffered: `writeln!` would issue one per
    // piece, and a reader could see half a line). Nowhere to report a failed write to
    // stderr; the exit status still tells.
    let line = format!("lazy-restore-guardian: {msg}\n");
    let _ = io::stderr().lock().write_all(line.as_bytes());
}

/// The guardian process's main: expects the engine's socket as fd 3, says HELLO, then holds
/// every uffd it is sent until DONE (exit 0), or kills the watched tree on ABORT or EOF
/// (exit [`EXIT_KILLED`]; exit 0 when it was watching nothing). Returns the exit status.
pub fn run() -> i32 {
    // Anything else inherited from the daemon (pipes of whoever started it, a status fd)
    // must not be kept open for as long as we live.
    sys::close_fds_from(4);
    let sock = match sys::take_inherited_fd(3).and_then(|fd| {
        let kind = sys::socket_type(fd.as_fd())?;
        if kind == libc::SOCK_SEQPACKET {
            Ok(fd)
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a SOCK_SEQPACKET socket",
            ))
        }
    }) {
        Ok(s) => s,
        Err(e) => {
            say(&format!(
                "fd 3 is not the lazy-restore engine's socket ({e}); this program is started by the engine, not by hand"
            ));
            return EXIT_USAGE;
        }
    };
    // Our life is bound to the daemon's socket, not to signals: its terminal's Ctrl-C or
    // hangup must not reach us (we are in a session of our own anyway), and a SIGTERM sent
    // to the whole service makes the daemon finish the transfer at full speed — the very time
    // it must stay protected. SIGKILL still works.
    for sig in [libc::SIGINT, libc::SIGQUIT, libc::SIGHUP, libc::SIGTERM] {
        let _ = sys::ignore_signal(sig);
    }
    let mut g = Guardian {
        sock,
        daemon_pid: std::os::unix::process::parent_id(),
        watched: Vec::new(),
        known: HashSet::new(),
        pending: None,
        last_refresh: Instant::now(),
    };
    let mut hello = Record::new(Kind::Hello);
    hello.value = PROTOCOL_VERSION;
    hello.host_pid = sys::getpid();
    if let Err(e) = sys::send_msg(g.sock.as_fd(), &hello.encode(), None, false) {
        say(&format!("cannot greet the daemon: {e}"));
        return EXIT_USAGE;
    }
    g.serve()
}

impl Guardian {
    fn serve(&mut self) -> i32 {
        let mut buf = [0u8; RECORD_SIZE + 8];
        loop {
            if !self.watched.is_empty() && self.last_refresh.elapsed() >= REFRESH {
                self.refresh();
            }
            // Nothing watched, nothing to refresh: sleep until the daemon says something (a
            // timeout here would spin, as `last_refresh` only moves while watching).
            let wait = (!self.watched.is_empty())
                .then(|| REFRESH.saturating_sub(self.last_refresh.elapsed()));
            match sys::wait_readable(self.sock.as_fd(), wait) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => return self.end(Ending::Kill(Cause::Broken(e))),
            }
            let got = match sys::recv_with_fds(self.sock.as_fd(), &mut buf) {
                Ok(r) => r,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => return self.end(Ending::Kill(Cause::Broken(e))),
            };
            if got.len == 0 {
                return self.end(Ending::Kill(Cause::Died));
            }
            let r = match Record::decode(&buf[..got.len]) {
                Ok(r) => r,
                Err(e) => {
                    // A bug, not an attack (only the daemon holds the other end): say so and
                    // keep guarding.
                    say(&format!("ignored {e} from the daemon"));
                    continue;
                }
            };
            match r.kind {
                Kind::Watch => self.watch(r, got.fds),
                Kind::Pending => self.pending = Some(r.value),
                Kind::Done => return self.end(Ending::Done),
                Kind::Abort => return self.end(Ending::Kill(Cause::Aborted)),
                Kind::Hello => say("ignored a hello from the daemon"),
            }
        }
    }

    fn watch(&mut self, r: Record, fds: Vec<OwnedFd>) {
        // One descriptor per WATCH; extra ones are closed when `fds` drops.
        let Some(uffd) = fds.into_iter().next() else {
            say(&format!(
                "the daemon announced task {} without its userfaultfd; it cannot be held",
                r.image_pid
            ));
            return;
        };
        let first = self.watched.is_empty();
        self.watched.push(Watched {
            image_pid: r.image_pid,
            child_index: r.child_index,
            host: (r.host_pid > 0).then_some(HostProc {
                pid: r.host_pid,
                starttime: r.starttime,
            }),
            peer_pid: (r.peer_pid > 0).then_some(r.peer_pid),
            _uffd: uffd,
        });
        if first {
            self.last_refresh = Instant::now();
        }
    }

    /// Resolves hand-off tasks the engine could not, and remembers every live descendant of
    /// the watched tasks (forgetting those that are gone).
    fn refresh(&mut self) {
        for w in &mut self.watched {
            if w.host.is_none() && w.child_index == 0 {
                w.host = tree::resolve(w.peer_pid, w.image_pid);
            }
        }
        self.known.retain(|p| p.is_same());
        let roots: Vec<HostProc> = self.watched.iter().filter_map(|w| w.host).collect();
        for root in roots {
            self.known.extend(tree::descendants(&root));
        }
        // Stamped after the walk: a huge tree still gets a full REFRESH of rest in between.
        self.last_refresh = Instant::now();
    }

    fn end(&mut self, how: Ending) -> i32 {
        let cause = match how {
            Ending::Kill(cause) if !self.watched.is_empty() => cause,
            // Every page is in, or nothing was ever handed over: holding on is pointless.
            _ => return 0,
        };
        // A last look, then kill; the uffds close (on return) only once every task we could
        // find has SIGKILL pending, so none of them ever returns to user space on a zero page.
        self.refresh();
        let mut roots: Vec<HostProc> = self.watched.iter().filter_map(|w| w.host).collect();
        roots.extend(self.known.iter().copied());
        let killed = tree::kill_tree(&roots);
        let missing = match self.pending {
            Some(n) => format!("{n} pages still missing (at its last report)"),
            None => "pages still missing".to_string(),
        };
        let daemon = self.daemon_pid;
        let why = match cause {
            Cause::Died => format!("the lazy-restore daemon (pid {daemon}) died with {missing}"),
            Cause::Aborted => {
                format!("the lazy-restore daemon (pid {daemon}) stopped on an error with {missing}")
            }
            Cause::Broken(e) => format!(
                "lost the link to the lazy-restore daemon (pid {daemon}: {e}) with {missing}"
            ),
        };
        let what = if killed.is_empty() {
            "no restored process was left to kill".to_string()
        } else {
            let pids: Vec<String> = killed.iter().map(|p| p.to_string()).collect();
            format!(
                "killed pids {} so they never run on zero pages",
                pids.join(" ")
            )
        };
        let unresolved: Vec<String> = self
            .watched
            .iter()
            .filter(|w| w.host.is_none() && w.child_index == 0)
            .map(|w| w.image_pid.to_string())
            .collect();
        let mut line = format!("{why}: {what}");
        if !unresolved.is_empty() {
            line.push_str(&format!(
                "; could not find the host process of image pid(s) {}",
                unresolved.join(" ")
            ));
        }
        say(&line);
        EXIT_KILLED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_junk_is_refused() {
        let mut r = Record::new(Kind::Watch);
        r.image_pid = 1234;
        r.child_index = 2;
        r.host_pid = 98765;
        r.peer_pid = 555;
        r.starttime = 0x1234_5678_9abc;
        r.value = u64::MAX;
        let b = r.encode();
        assert_eq!(&b[0..4], b"LRGD");
        assert_eq!(Record::decode(&b), Ok(r));
        assert!(Record::decode(&b[..39]).unwrap_err().contains("39 bytes"));
        let mut bad = b;
        bad[0] = b'X';
        assert!(Record::decode(&bad).unwrap_err().contains("magic"));
        let mut bad = b;
        bad[4..8].copy_from_slice(&77u32.to_ne_bytes());
        assert!(Record::decode(&bad)
            .unwrap_err()
            .contains("unknown kind 77"));
    }
}
