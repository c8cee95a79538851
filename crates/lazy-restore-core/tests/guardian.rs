//! `lazy-restore-guardian`, the real binary, driven the way the engine drives it. A forked
//! child plays a restored task: it registers an anonymous region with its own userfaultfd,
//! hands the uffd to the test, closes its copy and reads a page nobody filled (so it blocks in
//! the kernel). The test plays the daemon through the public [`GuardianLink`] — WATCH, then
//! DONE, ABORT, or just closing the socket, which is what the guardian sees when the daemon
//! is SIGKILLed. The last test runs a real [`Engine`] with a guardian and checks that a forked
//! child's uffd reaches the guardian too.
//!
//! The restored-task side needs fork, mmap and the userfaultfd ioctls, which the library
//! does not export; they are in `raw` below, the only unsafe code here. Every wait is bounded.

use lazy_restore_core::guardian::{GuardianLink, Watch, EXIT_KILLED, EXIT_USAGE};
use lazy_restore_core::tree::HostProc;
use lazy_restore_core::uffd::Uffd;
use lazy_restore_core::{Engine, EngineConfig, RangePlan, TaskPlan};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const PAGE: usize = 4096;

fn guardian_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_lazy-restore-guardian"))
}

/// Forking while another test thread holds a uffd would copy it into the child: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

mod raw {
    //! fork/mmap/userfaultfd for the child that plays the restored task. After `fork` in a
    //! multi-threaded test process the child may only make async-signal-safe calls: raw
    //! syscalls on ints and stack buffers, no allocation, no locks, then `_exit`.
    use std::io;
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};
    use std::time::{Duration, Instant};

    const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
    const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
    /// `UFFD_FEATURE_EVENT_FORK`: a fork in the child gives the reader a uffd for the grandchild.
    pub const FEATURE_EVENT_FORK: u64 = 1 << 1;

    /// An anonymous private mapping of `len` bytes, never unmapped (tests are short-lived).
    pub fn map_anon(len: usize) -> u64 {
        // SAFETY: a fresh anonymous mapping at a kernel-chosen address aliases nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap: {}", io::Error::last_os_error());
        p as u64
    }

    /// fork(2): the child runs `f` (async-signal-safe work only) and `_exit`s with its value.
    pub fn fork(f: impl FnOnce() -> i32) -> i32 {
        // SAFETY: the child only runs `f`, which by contract makes async-signal-safe calls,
        // then `_exit`s without unwinding or running destructors.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let code = f();
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(code) };
        }
        pid
    }

    /// In the child: a uffd with `features`, `[addr, addr+len)` registered for missing pages.
    pub fn uffd_register(addr: u64, len: u64, features: u64) -> Result<RawFd, i32> {
        // SAFETY: plain syscall with an int argument.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_userfaultfd,
                (libc::O_CLOEXEC | libc::O_NONBLOCK) as libc::c_long,
            )
        } as RawFd;
        if fd < 0 {
            return Err(10);
        }
        let mut api = [0xAAu64, features, 0];
        // SAFETY: UFFDIO_API reads and writes 24 bytes, our stack array.
        if unsafe { libc::ioctl(fd, UFFDIO_API, api.as_mut_ptr()) } < 0 {
            return Err(11);
        }
        let mut reg = [addr, len, 1 /* MODE_MISSING */, 0u64];
        // SAFETY: UFFDIO_REGISTER reads and writes 32 bytes, our stack array.
        if unsafe { libc::ioctl(fd, UFFDIO_REGISTER, reg.as_mut_ptr()) } < 0 {
            return Err(12);
        }
        Ok(fd)
    }

    /// Sends `data` with `fd` attached (SCM_RIGHTS); async-signal-safe.
    pub fn send_fd(sock: RawFd, data: &[u8], fd: RawFd) -> bool {
        let mut control = [0u64; 4];
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        // SAFETY: msghdr is plain data; the control buffer (32 bytes) holds one cmsghdr and one
        // int, filled below; the kernel only reads `data` and `control`, alive for the call.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(4) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(4) as _;
            libc::CMSG_DATA(cmsg).cast::<RawFd>().write_unaligned(fd);
            libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) == data.len() as isize
        }
    }

    /// Receives one byte and the descriptor sent with it (blocking, bounded by the socket's
    /// read timeout).
    pub fn recv_fd(sock: RawFd) -> io::Result<OwnedFd> {
        let mut byte = [0u8; 1];
        let mut control = [0u64; 4];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        // SAFETY: as in `send_fd`; the kernel writes into `byte` and `control`, both on our
        // stack, within the lengths given; the one descriptor it installs becomes ours.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            if libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) < 1 {
                return Err(io::Error::last_os_error());
            }
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            if cmsg.is_null() || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
                return Err(io::Error::other("no descriptor came with the byte"));
            }
            Ok(OwnedFd::from_raw_fd(
                libc::CMSG_DATA(cmsg).cast::<RawFd>().read_unaligned(),
            ))
        }
    }

    /// Reads one byte at `addr` (a missing page blocks here until someone resolves it).
    pub fn read_byte(addr: u64) -> u8 {
        // SAFETY: `addr` lies in a live private mapping of this process (the caller's region).
        unsafe { std::ptr::read_volatile(addr as *const u8) }
    }

    pub fn write(fd: RawFd, data: &[u8]) {
        // SAFETY: the kernel reads `data`, alive for the call.
        unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    }

    pub fn close(fd: RawFd) {
        // SAFETY: the caller owns `fd` and never uses it again.
        unsafe { libc::close(fd) };
    }

    pub fn kill(pid: i32, sig: i32) {
        // SAFETY: plain syscall with int arguments.
        unsafe { libc::kill(pid, sig) };
    }

    pub fn getpid() -> i32 {
        // SAFETY: no arguments.
        unsafe { libc::getpid() }
    }

    pub fn sleep(ms: u64) {
        let ts = libc::timespec {
            tv_sec: (ms / 1000) as libc::time_t,
            tv_nsec: ((ms % 1000) * 1_000_000) as libc::c_long,
        };
        // SAFETY: nanosleep reads the timespec on our stack; the remainder pointer may be null.
        unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
    }

    pub fn pause_forever() -> ! {
        loop {
            // SAFETY: no arguments; returns only when a handled signal arrives.
            unsafe { libc::pause() };
        }
    }

    /// waitpid(pid) for up to `timeout`: the raw status, or None if it is still running.
    pub fn wait_for(pid: i32, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut status = 0;
            // SAFETY: `status` lives on our stack.
            let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if rc == pid {
                return Some(status);
            }
            assert!(rc == 0, "waitpid {pid}: {}", io::Error::last_os_error());
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Reaps `pid` if it is our child and ends within `timeout`; errors (already reaped) are fine.
    pub fn reap_quietly(pid: i32, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut status = 0;
            // SAFETY: `status` lives on our stack.
            let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if rc != 0 || Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn killed_by(status: i32) -> Option<i32> {
        libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status))
    }

    pub fn exit_code(status: i32) -> Option<i32> {
        libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status))
    }
}

/// Child exit codes.
const READ_ZERO: i32 = 40;
const READ_DATA: i32 = 41;

/// A forked "restored task": one page registered with its own uffd, which the test now holds.
struct Task {
    pid: i32,
    addr: u64,
    uffd: Option<OwnedFd>,
    /// Receives what the task reports (the byte it read; pids of its descendants).
    reports: UnixStream,
}

impl Task {
    /// `before_touch` runs in the child after it handed over its uffd and closed its copy,
    /// right before it reads its missing page (async-signal-safe code only).
    fn start(features: u64, before_touch: fn(report: i32)) -> Task {
        let addr = raw::map_anon(PAGE);
        let (theirs, ours) = UnixStream::pair().expect("socketpair");
        let sock = theirs.as_raw_fd();
        let pid = raw::fork(move || {
            let uffd = match raw::uffd_register(addr, PAGE as u64, features) {
                Ok(fd) => fd,
                Err(code) => return code,
            };
            if !raw::send_fd(sock, &[0], uffd) {
                return 13;
            }
            // Like a restored task: from now on only the "daemon" holds the uffd.
            raw::close(uffd);
            before_touch(sock);
            let b = raw::read_byte(addr);
            raw::write(sock, &[b]);
            if b == 0 {
                READ_ZERO
            } else {
                READ_DATA
            }
        });
        drop(theirs);
        ours.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let uffd = raw::recv_fd(ours.as_raw_fd()).expect("the child's uffd");
        Task {
            pid,
            addr,
            uffd: Some(uffd),
            reports: ours,
        }
    }

    fn watch(&self) -> Watch {
        Watch {
            image_pid: self.pid,
            child_index: 0,
            host: HostProc::of(self.pid),
            peer_pid: None,
        }
    }

    /// True while one of its threads sleeps on a missing page.
    fn blocked(&self) -> bool {
        wchan(self.pid) == "handle_userfault"
    }

    fn wait_blocked(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.blocked() {
            assert!(
                Instant::now() < deadline,
                "the task never blocked on its missing page"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        // A failed test must not leave the child behind.
        let _ = lazy_restore_core::tree::kill_tree(
            &HostProc::of(self.pid).into_iter().collect::<Vec<_>>(),
        );
        raw::reap_quietly(self.pid, Duration::from_secs(5));
    }
}

/// SIGKILLs, on drop, processes a test created but cannot reap (its task's descendants), so
/// a failing assertion never leaves them behind (holding the test's stdout, among others).
struct KillOnDrop(Vec<HostProc>);

impl KillOnDrop {
    fn add(&mut self, pid: i32) {
        self.0.extend(HostProc::of(pid));
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = lazy_restore_core::tree::kill_tree(&self.0);
    }
}

fn wchan(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default()
}

/// State letter of a process that is not our child ('Z' once dead but unreaped), None if gone.
fn state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

fn wait_dead(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if matches!(state(pid), None | Some('Z')) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn spawn_guardian() -> (GuardianLink, std::process::ChildStderr) {
    let mut g =
        GuardianLink::spawn_with(guardian_bin(), Stdio::piped()).expect("start the guardian");
    let err = g.take_stderr().expect("piped stderr");
    (g, err)
}

fn read_all(mut r: impl Read) -> String {
    let mut s = String::new();
    let _ = r.read_to_string(&mut s);
    s
}

#[test]
fn the_daemon_dying_gets_the_watched_task_killed_not_zero_filled() {
    let _s = serial();
    let mut task = Task::start(0, |_| {});
    let (mut g, err) = spawn_guardian();
    let uffd = task.uffd.take().expect("uffd");
    g.watch(task.watch(), uffd.as_fd()).expect("WATCH");
    g.pending(1).expect("PENDING");
    task.wait_blocked();
    // The "daemon" dies: its uffd copy and the socket close together.
    drop(uffd);
    let t0 = Instant::now();
    let status = g.close(Duration::from_secs(5)).expect("the guardian exits");
    assert_eq!(status.code(), Some(EXIT_KILLED));
    let child = raw::wait_for(task.pid, Duration::from_secs(5)).expect("the task dies");
    assert_eq!(
        raw::killed_by(child),
        Some(libc::SIGKILL),
        "status {child:#x}"
    );
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let line = read_all(err);
    assert!(
        line.starts_with("lazy-restore-guardian: the lazy-restore daemon (pid ")
            && line.contains("died with 1 pages still missing")
            && line.contains(&format!(
                "killed pids {} so they never run on zero pages",
                task.pid
            )),
        "{line:?}"
    );
    assert_eq!(line.lines().count(), 1, "one line: {line:?}");
    // It never got to report a byte: it died blocked.
    let mut b = [0u8; 1];
    assert!(matches!((&task.reports).read(&mut b), Ok(0) | Err(_)));
}

#[test]
fn done_lets_go_without_killing() {
    let _s = serial();
    let mut task = Task::start(0, |_| {});
    let (mut g, err) = spawn_guardian();
    let uffd = Uffd::new(task.uffd.take().expect("uffd")).expect("uffd");
    g.watch(task.watch(), uffd.as_fd()).expect("WATCH");
    task.wait_blocked();
    // Every page in, then DONE: what a successful transfer looks like.
    uffd.copy(task.addr, &[0x5a; PAGE], false)
        .expect("UFFDIO_COPY");
    let status = g
        .finish(true)
        .expect("DONE delivered")
        .expect("the guardian exits");
    assert!(status.success(), "{status}");
    let child = raw::wait_for(task.pid, Duration::from_secs(5)).expect("the task ends");
    assert_eq!(raw::exit_code(child), Some(READ_DATA), "status {child:#x}");
    let mut b = [0u8; 1];
    (&task.reports).read_exact(&mut b).expect("its report");
    assert_eq!(b[0], 0x5a);
    assert_eq!(read_all(err), "", "a successful end is silent");
}

/// The mechanism itself: with the "daemon's" copy closed, the guardian's reference alone keeps
/// the faulting thread waiting; only when the guardian lets go (DONE, sent here on purpose
/// with the page still missing) does the kernel release the uffd — and then the thread reads
/// a zero page, the very corruption the guardian exists to prevent.
#[test]
fn the_guardians_reference_alone_keeps_a_faulting_thread_blocked() {
    let _s = serial();
    let mut task = Task::start(0, |_| {});
    let (mut g, _err) = spawn_guardian();
    g.watch(task.watch(), task.uffd.as_ref().expect("uffd").as_fd())
        .expect("WATCH");
    task.wait_blocked();
    task.uffd = None;
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        task.blocked(),
        "still waiting on its page, wchan {}",
        wchan(task.pid)
    );
    assert_eq!(
        raw::wait_for(task.pid, Duration::ZERO),
        None,
        "still running"
    );
    let status = g.finish(true).expect("DONE").expect("the guardian exits");
    assert!(status.success());
    let child = raw::wait_for(task.pid, Duration::from_secs(5)).expect("the task ends");
    assert_eq!(raw::exit_code(child), Some(READ_ZERO), "status {child:#x}");
}

#[test]
fn abort_kills_and_says_why() {
    let _s = serial();
    let mut task = Task::start(0, |_| {});
    let (mut g, err) = spawn_guardian();
    g.watch(task.watch(), task.uffd.as_ref().expect("uffd").as_fd())
        .expect("WATCH");
    let status = g.finish(false).expect("ABORT").expect("the guardian exits");
    assert_eq!(status.code(), Some(EXIT_KILLED));
    let child = raw::wait_for(task.pid, Duration::from_secs(5)).expect("the task dies");
    assert_eq!(raw::killed_by(child), Some(libc::SIGKILL));
    let line = read_all(err);
    assert!(
        line.contains("stopped on an error with pages still missing"),
        "{line:?}"
    );
    task.uffd = None;
}

#[test]
fn with_nothing_watched_it_exits_quietly_and_idles_without_spinning() {
    let _s = serial();
    let (g, err) = spawn_guardian();
    let pid = g.pid() as i32;
    // Its own session: a Ctrl-C or hangup of the daemon's terminal cannot reach it.
    let sid = |p: i32| {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).expect("stat");
        let f: Vec<String> = stat[stat.rfind(')').expect(")") + 2..]
            .split(' ')
            .map(String::from)
            .collect();
        f[3].parse::<i32>().expect("session")
    };
    assert_eq!(sid(pid), pid, "session leader");
    assert_ne!(sid(pid), sid(std::process::id() as i32));
    // Signals aimed at a service or terminal do not end it (only the socket does).
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        raw::kill(pid, sig);
    }
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        state(pid).map(|c| c != 'Z'),
        Some(true),
        "survived SIGINT/SIGTERM/SIGHUP"
    );
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let f: Vec<u64> = stat[stat.rfind(')').expect(")") + 2..]
        .split(' ')
        .skip(11)
        .take(2)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    assert!(
        f[0] + f[1] < 10,
        "{} ticks of CPU while idle: it spins",
        f[0] + f[1]
    );
    let status = g.close(Duration::from_secs(5)).expect("exits");
    assert!(status.success(), "{status}");
    assert_eq!(read_all(err), "");

    let (g, err) = spawn_guardian();
    let status = g.finish(true).expect("DONE").expect("exits");
    assert!(status.success());
    assert_eq!(read_all(err), "");
}

/// A child forked after restore is found as a descendant; one that was reparented away from
/// the tree (its parent exited) more than a refresh before the daemon died is remembered.
#[test]
fn descendants_die_too_even_after_being_reparented() {
    let _s = serial();
    let mut task = Task::start(0, |report| {
        // child -> middle -> orphan; the middle exits after a second, so the orphan is
        // reparented away from the watched task long before the "daemon" dies.
        raw::fork(move || {
            raw::fork(move || {
                let me = raw::getpid();
                raw::write(report, &me.to_ne_bytes());
                raw::pause_forever()
            });
            raw::sleep(1000);
            0
        });
        let sibling = raw::fork(|| raw::pause_forever());
        raw::write(report, &sibling.to_ne_bytes());
    });
    let (mut g, err) = spawn_guardian();
    g.watch(task.watch(), task.uffd.as_ref().expect("uffd").as_fd())
        .expect("WATCH");
    let mut pids = [0u8; 8];
    (&task.reports)
        .read_exact(&mut pids)
        .expect("descendant pids");
    let a = i32::from_ne_bytes(pids[0..4].try_into().expect("4"));
    let b = i32::from_ne_bytes(pids[4..8].try_into().expect("4"));
    let mut leftovers = KillOnDrop(Vec::new());
    leftovers.add(a);
    leftovers.add(b);
    task.wait_blocked();
    std::thread::sleep(Duration::from_millis(2000));
    for p in [a, b] {
        assert_eq!(
            state(p).map(|c| c != 'Z'),
            Some(true),
            "{p} alive before the kill"
        );
    }
    let status = g.close(Duration::from_secs(5)).expect("exits");
    assert_eq!(status.code(), Some(EXIT_KILLED));
    assert!(
        raw::killed_by(raw::wait_for(task.pid, Duration::from_secs(5)).expect("dies"))
            == Some(libc::SIGKILL)
    );
    for p in [a, b] {
        assert!(
            wait_dead(p, Duration::from_secs(5)),
            "descendant {p} still alive"
        );
    }
    let line = read_all(err);
    for p in [task.pid, a, b] {
        assert!(
            line.split(' ').any(|w| w == p.to_string()),
            "{p} not in {line:?}"
        );
    }
    task.uffd = None;
}

#[test]
fn a_wrong_binary_or_a_hand_start_is_refused_clearly() {
    // Serial too: the engine test finds its guardian among this process's children.
    let _s = serial();
    let e = GuardianLink::spawn(Path::new("/nonexistent/lazy-restore-guardian"))
        .expect_err("no such file");
    assert!(
        e.to_string()
            .contains("cannot start the guardian /nonexistent"),
        "{e}"
    );
    let e = GuardianLink::spawn(Path::new("/bin/true")).expect_err("not a guardian");
    assert!(e.to_string().contains("exited before saying hello"), "{e}");
    let out = std::process::Command::new(guardian_bin())
        .stdin(Stdio::null())
        .output()
        .expect("run by hand");
    assert_eq!(out.status.code(), Some(EXIT_USAGE));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(
        msg.contains("fd 3 is not the lazy-restore engine's socket"),
        "{msg}"
    );
}

// ---- a real engine with a guardian ---------------------------------------------------------

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn uffds_held_by(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().contains("userfaultfd"))
                })
                .count()
        })
        .unwrap_or(0)
}

fn guardians_of_this_process() -> Vec<u32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
            stat.contains("(lazy-restore-gu)")
                && stat[stat.rfind(')').unwrap_or(0) + 2..].split(' ').nth(1) == Some(me.as_str())
        })
        .collect()
}

/// The engine hands the guardian the uffd of a hand-off task and, after a fork, the child's
/// uffd from UFFD_EVENT_FORK; an abort with pages missing gets both killed.
#[test]
fn the_engine_hands_over_every_uffd_including_forked_childrens() {
    let _s = serial();
    let dir =
        TempDir(std::env::temp_dir().join(format!("lr-guardian-engine-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let pages = dir.0.join("pages-1.img");
    std::fs::write(&pages, vec![0x77u8; PAGE]).expect("pages file");
    // The task forks once it has handed over its uffd (with EVENT_FORK, the fork waits until
    // the engine has read the event), then waits without touching its page — the engine
    // serves faults in every phase — and the engine is never told that the restore finished,
    // so nothing is copied in the background: the page stays missing.
    let mut task = Task::start(raw::FEATURE_EVENT_FORK, |report| {
        raw::sleep(300);
        let kid = raw::fork(|| raw::pause_forever());
        raw::write(report, &kid.to_ne_bytes());
        raw::pause_forever()
    });
    let mut cfg = EngineConfig::new(
        dir.0.join("lazy-pages.socket"),
        vec![TaskPlan {
            pid: task.pid,
            ranges: vec![RangePlan {
                start: task.addr,
                pages: 1,
                file: 0,
                offset: 0,
            }],
        }],
        vec![pages],
    );
    cfg.guardian = Some(guardian_bin().to_path_buf());
    let before = guardians_of_this_process();
    let mut h = Engine::start(cfg, Box::new(|_| {})).expect("engine with a guardian");
    let guardian = guardians_of_this_process()
        .into_iter()
        .find(|p| !before.contains(p))
        .expect("the engine started a guardian");
    let mut criu = UnixStream::connect(dir.0.join("lazy-pages.socket")).expect("connect");
    criu.write_all(&task.pid.to_ne_bytes()).expect("pid");
    let uffd = task.uffd.take().expect("uffd");
    assert!(raw::send_fd(criu.as_raw_fd(), &[0], uffd.as_raw_fd()));
    drop(uffd);
    let mut kid = [0u8; 4];
    (&task.reports)
        .read_exact(&mut kid)
        .expect("the forked child's pid");
    let kid = i32::from_ne_bytes(kid);
    let mut leftovers = KillOnDrop(Vec::new());
    leftovers.add(kid);
    let deadline = Instant::now() + Duration::from_secs(5);
    while uffds_held_by(guardian) < 2 {
        assert!(
            Instant::now() < deadline,
            "the guardian holds {} uffds, expected the task's and its fork's",
            uffds_held_by(guardian)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    h.abort("test over".into());
    let child = raw::wait_for(task.pid, Duration::from_secs(5)).expect("the task dies");
    assert_eq!(raw::killed_by(child), Some(libc::SIGKILL));
    assert!(
        wait_dead(kid, Duration::from_secs(5)),
        "the forked child {kid} still alive"
    );
    assert!(
        wait_dead(guardian as i32, Duration::from_secs(5)),
        "the guardian ended"
    );
    drop(criu);
}
