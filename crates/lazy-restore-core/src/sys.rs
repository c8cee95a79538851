//! The only place with `unsafe`: thin wrappers over the userfaultfd ABI and the few libc
//! calls around it (epoll, `recvmsg`/`sendmsg` with `SCM_RIGHTS`, `SO_PEERCRED`, `kill`,
//! per-thread CPU accounting, and what the guardian needs: a seqpacket pair, spawning it in a
//! session of its own with its socket as fd 3, closing inherited fds, ignoring signals).
//! Everything above this module is safe Rust.
//!
//! Layouts and ioctl numbers are those of `linux/userfaultfd.h` on x86_64 (and every 64-bit
//! Linux arch: the structs have no arch-dependent padding). See `userfaultfd(2)` and
//! `ioctl_userfaultfd(2)` for the semantics these wrappers expose.

use std::ffi::CString;
use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

pub const UFFD_API: u64 = 0xAA;
pub const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
pub const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
pub const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
pub const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
pub const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
pub const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;

/// `UFFDIO_REGISTER_MODE_MISSING`.
#[cfg_attr(not(test), allow(dead_code))] // the restored task registers, not the daemon
pub const REGISTER_MODE_MISSING: u64 = 1;
/// `UFFDIO_COPY_MODE_DONTWAKE` / `UFFDIO_ZEROPAGE_MODE_DONTWAKE`.
pub const MODE_DONTWAKE: u64 = 1;

/// Size of one `struct uffd_msg`.
pub const UFFD_MSG_SIZE: usize = 32;

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

const _: () = assert!(size_of::<UffdioApi>() == 24);
const _: () = assert!(size_of::<UffdioRange>() == 16);
const _: () = assert!(size_of::<UffdioRegister>() == 32);
const _: () = assert!(size_of::<UffdioCopy>() == 40);
const _: () = assert!(size_of::<UffdioZeropage>() == 32);

fn cvt(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn cvt_size(rc: libc::ssize_t) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// Opens a userfaultfd through the `userfaultfd(2)` syscall.
pub fn userfaultfd(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: the syscall takes one int argument and returns a new fd or -1; no memory is
    // passed.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags as libc::c_long) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// UFFDIO_API handshake: asks for `features`, returns what the kernel granted.
pub fn uffdio_api(fd: &OwnedFd, features: u64) -> io::Result<UffdioApi> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes exactly one `UffdioApi` (24 bytes, repr(C)), which
    // lives on our stack for the duration of the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api as *mut UffdioApi) };
    cvt(rc)?;
    Ok(api)
}

/// UFFDIO_REGISTER of `[start, start+len)`; returns the ioctl bits the range supports.
#[cfg_attr(not(test), allow(dead_code))] // the restored task registers, not the daemon
pub fn uffdio_register(fd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> io::Result<u64> {
    let mut reg = UffdioRegister {
        range: UffdioRange { start, len },
        mode,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes one `UffdioRegister` (32 bytes) on our stack.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg as *mut _) };
    cvt(rc)?;
    Ok(reg.ioctls)
}

/// UFFDIO_UNREGISTER of `[start, start+len)`.
pub fn uffdio_unregister(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut range = UffdioRange { start, len };
    // SAFETY: UFFDIO_UNREGISTER only reads one `UffdioRange` (16 bytes) on our stack.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_UNREGISTER, &mut range as *mut _) };
    cvt(rc).map(drop)
}

/// UFFDIO_WAKE of `[start, start+len)`.
pub fn uffdio_wake(fd: BorrowedFd<'_>, start: u64, len: u64) -> io::Result<()> {
    let mut range = UffdioRange { start, len };
    // SAFETY: UFFDIO_WAKE only reads one `UffdioRange` (16 bytes) on our stack.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_WAKE, &mut range as *mut _) };
    cvt(rc).map(drop)
}

/// What a filling ioctl (COPY, ZEROPAGE) reported: `Ok(bytes)` when it filled something
/// (possibly less than asked), `Err` with the errno when it filled nothing.
fn fill_result(rc: libc::c_int, filled: i64, len: u64) -> io::Result<usize> {
    if rc == 0 {
        return Ok(len as usize);
    }
    let err = io::Error::last_os_error();
    if filled > 0 {
        // A partial fill is reported as -EAGAIN with the byte count in the out field; the
        // real reason it stopped shows up when the caller retries the rest.
        return Ok(filled as usize);
    }
    Err(err)
}

/// UFFDIO_COPY of `src` to `dst` in the uffd's mm. Returns the bytes copied (may be short:
/// the caller retries the rest to learn why), or the errno when nothing was copied.
pub fn uffdio_copy(fd: BorrowedFd<'_>, dst: u64, src: &[u8], mode: u64) -> io::Result<usize> {
    let mut copy = UffdioCopy {
        dst,
        src: src.as_ptr() as u64,
        len: src.len() as u64,
        mode,
        copy: 0,
    };
    // SAFETY: the kernel reads `len` bytes from `src`, a live slice borrowed for the call, and
    // writes only into the other process's registered range and the `copy` out field of the
    // struct on our stack.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_COPY, &mut copy as *mut _) };
    fill_result(rc, copy.copy, copy.len)
}

/// UFFDIO_COPY of `len` bytes at address `src` of this process to `dst` in the uffd's mm.
/// `src` is never dereferenced here: only the kernel reads it, with `copy_from_user`, so an
/// unreadable source (e.g. a file mapping past a truncated end) fails with EFAULT instead of
/// raising SIGBUS in the daemon. Same result convention as [`uffdio_copy`].
pub fn uffdio_copy_raw(
    fd: BorrowedFd<'_>,
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
) -> io::Result<usize> {
    let mut copy = UffdioCopy {
        dst,
        src,
        len,
        mode,
        copy: 0,
    };
    // SAFETY: the kernel validates `src` as a user address of this process and reads it with
    // fault handling (EFAULT on failure); it writes only into the uffd's registered range and
    // the `copy` out field of the struct on our stack. No Rust reference to `src` exists.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_COPY, &mut copy as *mut _) };
    fill_result(rc, copy.copy, copy.len)
}

/// UFFDIO_ZEROPAGE of `[start, start+len)`. Same result convention as [`uffdio_copy`].
pub fn uffdio_zeropage(fd: BorrowedFd<'_>, start: u64, len: u64, mode: u64) -> io::Result<usize> {
    let mut zp = UffdioZeropage {
        range: UffdioRange { start, len },
        mode,
        zeropage: 0,
    };
    // SAFETY: UFFDIO_ZEROPAGE reads and writes one `UffdioZeropage` (32 bytes) on our stack.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut zp as *mut _) };
    fill_result(rc, zp.zeropage, len)
}

/// `read(2)` into `buf`; for a uffd that yields whole 32-byte `uffd_msg`s.
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the kernel writes at most `buf.len()` bytes into the live, exclusively borrowed
    // buffer.
    let rc = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    cvt_size(rc)
}

/// Takes ownership of an fd number the kernel installed in our table on our behalf (the
/// `ufd` of a userfaultfd FORK message). Returns `None` for a negative number.
pub fn adopt_fd(raw: RawFd) -> Option<OwnedFd> {
    if raw < 0 {
        return None;
    }
    // SAFETY: the kernel created this descriptor for us while we read the FORK message; no
    // other owner exists, so wrapping it (and closing it on drop) is sound.
    Some(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Sets `O_NONBLOCK` on `fd`.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL take and return plain ints; no memory is passed.
    unsafe {
        let flags = cvt(libc::fcntl(fd.as_raw_fd(), libc::F_GETFL))?;
        if flags & libc::O_NONBLOCK == 0 {
            cvt(libc::fcntl(
                fd.as_raw_fd(),
                libc::F_SETFL,
                flags | libc::O_NONBLOCK,
            ))?;
        }
    }
    Ok(())
}

/// Creates a non-blocking, close-on-exec `AF_UNIX` stream socket bound to `path` with mode
/// 0600, listening with a backlog of `backlog`. The mode is set between bind and listen, so
/// nobody can connect while the socket is still open to everyone.
pub fn unix_listen(path: &Path, backlog: i32) -> io::Result<OwnedFd> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path is {} bytes, the limit is {}",
                bytes.len(),
                addr.sun_path.len() - 1
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let flags = libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
    // SAFETY: plain syscall with int arguments.
    let raw = cvt(unsafe { libc::socket(libc::AF_UNIX, flags, 0) })?;
    // SAFETY: `raw` is a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = (size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un on our stack and `len` does not exceed its size.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    })?;
    let cpath = CString::new(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "socket path contains NUL"))?;
    // SAFETY: `cpath` is a valid NUL-terminated string for the duration of the call.
    cvt(unsafe { libc::chmod(cpath.as_ptr(), 0o600) })?;
    // SAFETY: plain syscall on a descriptor we own.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    Ok(fd)
}

/// Credentials of the process at the other end of a connected UNIX socket (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// Reads `SO_PEERCRED` of a connected UNIX socket.
pub fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<PeerCred> {
    // SAFETY: ucred is plain old data.
    let mut cred: libc::ucred = unsafe { zeroed() };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `cred`, which lives on our stack.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// Room for this many descriptors in one control message; more than anyone should send.
const MAX_FDS: usize = 8;

/// What one `recvmsg` delivered.
#[derive(Debug)]
pub struct Received {
    /// Data bytes read into the buffer; 0 means end of stream.
    pub len: usize,
    /// Descriptors that came with them (`SCM_RIGHTS`), now owned by us, close-on-exec. If
    /// the control data did not fit (`MSG_CTRUNC`) the kernel closed the extra ones.
    pub fds: Vec<OwnedFd>,
}

/// One non-blocking `recvmsg` of at most `buf.len()` bytes that also collects any descriptors
/// passed with `SCM_RIGHTS`. Every read on the CRIU socket goes through here: a plain `read`
/// that crosses the byte carrying the descriptor would silently drop it.
pub fn recv_with_fds(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 16];
    const _: () = assert!(size_of::<[u64; 16]>() >= 64 + MAX_FDS * 4);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; zero is a valid initial value.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 16]>() as _;
    let flags = libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC;
    // SAFETY: `msg` points at `iov` (→ `buf`) and `control`, all alive and exclusively borrowed
    // for the call; the kernel writes within the lengths given.
    let len = cvt_size(unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, flags) })?;
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer the kernel just filled, bounded by
    // `msg.msg_controllen`; each SCM_RIGHTS payload is an array of ints the kernel installed
    // as new descriptors in our table, which we take ownership of exactly once.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                let header = libc::CMSG_LEN(0) as usize;
                let count =
                    ((*cmsg).cmsg_len as usize).saturating_sub(header) / size_of::<libc::c_int>();
                for i in 0..count {
                    let raw = data.add(i).read_unaligned();
                    if raw >= 0 {
                        fds.push(OwnedFd::from_raw_fd(raw));
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received { len, fds })
}

/// Sends `data` with one descriptor attached (`SCM_RIGHTS`), as CRIU's restored tasks do.
#[cfg(test)]
pub fn send_with_fd(sock: BorrowedFd<'_>, data: &[u8], fd: BorrowedFd<'_>) -> io::Result<usize> {
    send_msg(sock, data, Some(fd), false)
}

/// One `sendmsg` of `data` with `fd` (if any) attached as `SCM_RIGHTS` — the receiver gets its
/// own reference to the same open file. `MSG_NOSIGNAL`: a vanished peer is `EPIPE`, never a
/// SIGPIPE. `dontwait` makes a full socket buffer `EAGAIN` instead of blocking (or waiting
/// for `SO_SNDTIMEO`).
pub fn send_msg(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fd: Option<BorrowedFd<'_>>,
    dontwait: bool,
) -> io::Result<usize> {
    let mut control = [0u64; 4];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain old data; zero is a valid initial value.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE is a pure size computation.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<libc::c_int>() as u32) } as _;
        // SAFETY: the control buffer (32 bytes) holds one cmsghdr plus one int; we fill
        // exactly that.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::c_int>() as u32) as _;
            libc::CMSG_DATA(cmsg)
                .cast::<libc::c_int>()
                .write_unaligned(fd.as_raw_fd());
        }
    }
    let mut flags = libc::MSG_NOSIGNAL;
    if dontwait {
        flags |= libc::MSG_DONTWAIT;
    }
    // SAFETY: `msg` points at `iov` (→ `data`) and, when a descriptor is attached, at
    // `control`; the kernel only reads them, and all are alive for the call.
    cvt_size(unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, flags) })
}

/// A connected pair of close-on-exec `AF_UNIX` `SOCK_SEQPACKET` sockets: message boundaries
/// are kept (one record per `sendmsg`, its descriptors with it) and a peer that is gone reads
/// as a 0-byte message (EOF).
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as libc::c_int; 2];
    let kind = libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC;
    // SAFETY: the kernel writes two ints into `fds`, which lives on our stack.
    cvt(unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) })?;
    // SAFETY: both descriptors are new and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `SO_SNDTIMEO`: a blocking send on `sock` gives up with `EAGAIN` after `timeout`.
pub fn set_send_timeout(sock: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: the kernel reads one `timeval` from our stack.
    cvt(unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// `SO_PRIORITY` (0-6 without CAP_NET_ADMIN): the packet priority a `prio` qdisc sorts by.
pub fn set_socket_priority(sock: BorrowedFd<'_>, priority: libc::c_int) -> io::Result<()> {
    // SAFETY: the kernel reads one `c_int` from our stack.
    cvt(unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PRIORITY,
            (&priority as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// `SO_TYPE` of a socket (e.g. `SOCK_SEQPACKET`); an error for anything that is not one.
pub fn socket_type(sock: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    let mut kind: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `kind` on our stack.
    cvt(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut kind as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(kind)
}

/// Waits until `fd` is readable or its peer hung up (true), or `timeout` passed (false;
/// `None` waits forever). An interrupted wait counts as a timeout.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.map_or(-1, |d| d.as_millis().min(i32::MAX as u128) as libc::c_int);
    // SAFETY: the kernel reads and writes the one `pollfd` on our stack.
    match cvt(unsafe { libc::poll(&mut pfd, 1, ms) }) {
        Ok(n) => Ok(n > 0),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
        Err(e) => Err(e),
    }
}

/// Spawns `cmd` in a session of its own (`setsid`: no controlling terminal, so a Ctrl-C or a
/// hangup of our terminal never reaches it) with `fd` as its descriptor 3. `fd` itself may
/// be close-on-exec; the child's descriptor 3 is not.
pub fn spawn_with_fd3_in_new_session(
    cmd: &mut std::process::Command,
    fd: BorrowedFd<'_>,
) -> io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let raw = fd.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe syscalls (setsid, dup2, fcntl) on plain ints; it allocates nothing
    // (an `io::Error` from an errno is stored inline) and touches no lock. `raw` stays open
    // in the parent (the caller borrows it) until `spawn` returns, so it is valid in the
    // child.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if raw == 3 {
                // dup2 onto itself would leave close-on-exec set.
                if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(raw, 3) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Takes ownership of descriptor `raw`, which this process inherited at exec (the guardian's
/// socket, fd 3), after checking that it is open; marks it close-on-exec.
pub fn take_inherited_fd(raw: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD/F_SETFD take and return plain ints; no memory is passed.
    unsafe {
        cvt(libc::fcntl(raw, libc::F_GETFD))?;
        cvt(libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC))?;
    }
    // SAFETY: the descriptor is open (checked above) and, having been inherited at exec by a
    // process that has not opened anything under this number, has no other owner here.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Closes every descriptor from `lowest` up (`close_range(2)`, or one by one from
/// `/proc/self/fd` on kernels before 5.9). Call only before anything owns such descriptors.
pub fn close_fds_from(lowest: RawFd) {
    // SAFETY: plain syscall with int arguments; closing descriptors nobody in this process
    // owns yet (the caller's contract) cannot invalidate an `OwnedFd`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            lowest as libc::c_uint,
            libc::c_uint::MAX,
            0 as libc::c_uint,
        )
    };
    if rc == 0 {
        return;
    }
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd >= lowest)
        .collect();
    for fd in fds {
        // SAFETY: as above; the read_dir handle is closed by now, so a stale number is at
        // worst EBADF.
        unsafe { libc::close(fd) };
    }
}

/// Sets `sig` to be ignored (`SIG_IGN`).
pub fn ignore_signal(sig: libc::c_int) -> io::Result<()> {
    // SAFETY: installing SIG_IGN involves no handler code, so nothing can run in signal
    // context.
    if unsafe { libc::signal(sig, libc::SIG_IGN) } == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An epoll instance (`epoll(7)`), level-triggered.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    /// `epoll_create1(EPOLL_CLOEXEC)`.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall with an int argument.
        let raw = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `raw` is a new descriptor nobody else owns.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        })
    }

    /// Watches `fd` for readability, reporting `token`.
    pub fn add(&self, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: `ev` lives on our stack for the call; the kernel copies it.
        cvt(unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd.as_raw_fd(),
                &mut ev,
            )
        })
        .map(drop)
    }

    /// Stops watching `fd`.
    pub fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: as in `add`; the event argument is ignored for DEL but must be non-null on
        // old kernels.
        cvt(unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd.as_raw_fd(),
                &mut ev,
            )
        })
        .map(drop)
    }

    /// Waits for up to `timeout` (`None` = forever) and appends the tokens of ready fds to
    /// `out`. Uses `epoll_pwait2` for sub-millisecond timeouts. EINTR yields no tokens.
    pub fn wait(
        &self,
        out: &mut Vec<u64>,
        max: usize,
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
        let max = max.clamp(1, events.len());
        let ts = timeout.map(|d| libc::timespec {
            tv_sec: d.as_secs() as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        });
        let ts_ptr = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: the kernel writes at most `max` events into `events` (64 entries on our
        // stack) and reads the optional timespec; no sigmask is passed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_epoll_pwait2,
                self.fd.as_raw_fd() as libc::c_long,
                events.as_mut_ptr(),
                max as libc::c_long,
                ts_ptr,
                std::ptr::null::<libc::sigset_t>(),
                0 as libc::c_long,
            )
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                return Ok(());
            }
            return Err(err);
        }
        out.extend(events[..rc as usize].iter().map(|e| e.u64));
        Ok(())
    }
}

/// A read-only shared mapping of a whole file, for [`uffdio_copy_raw`] only: nothing in this
/// crate ever reads it from user space, so a file truncated under us shows up as EFAULT from
/// UFFDIO_COPY (the kernel's `copy_from_user` fixup), never as SIGBUS. Unmapped on drop.
#[derive(Debug)]
pub struct FileMapping {
    addr: usize,
    len: usize,
}

impl FileMapping {
    /// `mmap(PROT_READ, MAP_SHARED)` of the first `len` bytes of `fd` (`len` > 0).
    pub fn map(fd: BorrowedFd<'_>, len: u64) -> io::Result<Self> {
        let len = usize::try_from(len)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large to map"))?;
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty file"));
        }
        // SAFETY: a new read-only mapping at a kernel-chosen address aliases nothing of ours;
        // it is only ever passed to the kernel as an ioctl source address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            addr: p as usize,
            len,
        })
    }

    /// The address of file offset `offset` in this process (for [`uffdio_copy_raw`]).
    pub fn addr_of(&self, offset: u64) -> u64 {
        self.addr as u64 + offset
    }

    /// Mapped length in bytes.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// True for an empty mapping (never: `map` refuses length 0).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `madvise` over `[offset, offset+len)` (clamped to the mapping), page aligned outward.
    pub fn advise(&self, offset: u64, len: u64, advice: libc::c_int) -> io::Result<()> {
        let start = offset & !4095;
        let end = offset.saturating_add(len).min(self.len as u64);
        if start >= end {
            return Ok(());
        }
        // SAFETY: the range lies inside our mapping; advice only changes paging behaviour
        // (WILLNEED, SEQUENTIAL, POPULATE_READ never raise SIGBUS: they return errors).
        cvt(unsafe {
            libc::madvise(
                (self.addr as u64 + start) as *mut libc::c_void,
                (end - start) as usize,
                advice,
            )
        })
        .map(drop)
    }
}

impl Drop for FileMapping {
    fn drop(&mut self) {
        // SAFETY: we own this mapping and nothing refers to it after drop.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// `MADV_POPULATE_READ` (Linux 5.14): prefault page tables readable; errors instead of SIGBUS.
pub const MADV_POPULATE_READ: libc::c_int = 22;

/// `posix_fadvise(fd, offset, len, advice)`.
pub fn fadvise(fd: BorrowedFd<'_>, offset: u64, len: u64, advice: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall with integer arguments.
    let rc = unsafe {
        libc::posix_fadvise(
            fd.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            advice,
        )
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// `fstat(fd).st_size`.
pub fn file_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: stat is plain old data.
    let mut st: libc::stat = unsafe { zeroed() };
    // SAFETY: the kernel fills the `stat` on our stack.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st.st_size as u64)
}

/// The runtime page size (`sysconf(_SC_PAGESIZE)`).
pub fn page_size() -> u64 {
    // SAFETY: sysconf takes an int and returns a long; no memory is passed.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).unwrap_or(0)
}

/// `kill(pid, sig)`.
pub fn kill(pid: i32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall with int arguments.
    cvt(unsafe { libc::kill(pid, sig) }).map(drop)
}

/// Our own process id.
pub fn getpid() -> i32 {
    std::process::id() as i32
}

/// The CPU the calling thread is running on, if the kernel tells us.
pub fn current_cpu() -> Option<u32> {
    // SAFETY: no arguments; returns a CPU number or -1.
    let cpu = unsafe { libc::sched_getcpu() };
    u32::try_from(cpu).ok()
}

/// User and system CPU time of the calling thread, in microseconds (`RUSAGE_THREAD`).
pub fn thread_cpu_time_us() -> (u64, u64) {
    // SAFETY: rusage is plain old data.
    let mut ru: libc::rusage = unsafe { zeroed() };
    // SAFETY: the kernel fills the `rusage` on our stack.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return (0, 0);
    }
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    (us(ru.ru_utime), us(ru.ru_stime))
}

/// Memory helpers for tests and benchmarks that play the restored task inside their own
/// process: an anonymous private mapping registered with its own uffd, then touched, remapped,
/// unmapped.
pub mod testmem {
    use super::cvt;
    use std::io;

    /// An anonymous private mapping owned by a test (unmapped on drop). Parts the test unmapped
    /// or moved away are remembered, so dropping never unmaps an address range that another
    /// test's mapping has reused since.
    #[derive(Debug)]
    pub struct Region {
        addr: usize,
        len: usize,
        gone: std::sync::Mutex<Vec<(usize, usize)>>,
    }

    // SAFETY: the region is plain memory; tests coordinate which thread touches what, and all
    // accesses go through copies (`read`/`write`), never references held across threads.
    unsafe impl Send for Region {}
    // SAFETY: as above.
    unsafe impl Sync for Region {}

    impl Region {
        /// mmap(PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS) of `len` bytes.
        pub fn map(len: usize) -> io::Result<Self> {
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
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            Ok(Self {
                addr: p as usize,
                len,
                gone: std::sync::Mutex::new(Vec::new()),
            })
        }

        pub fn addr(&self) -> u64 {
            self.addr as u64
        }

        pub fn len(&self) -> usize {
            self.len
        }

        pub fn is_empty(&self) -> bool {
            self.len == 0
        }

        /// Copies `buf.len()` bytes out of the region at `off` (faults in missing pages).
        pub fn read(&self, off: usize, buf: &mut [u8]) {
            assert!(off + buf.len() <= self.len);
            // SAFETY: the source range lies inside our live mapping (asserted above); a missing
            // page blocks in the kernel until the uffd handler fills it.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (self.addr + off) as *const u8,
                    buf.as_mut_ptr(),
                    buf.len(),
                )
            }
        }

        /// Copies `buf` into the region at `off`.
        pub fn write(&self, off: usize, buf: &[u8]) {
            assert!(off + buf.len() <= self.len);
            // SAFETY: the destination lies inside our live, writable mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(buf.as_ptr(), (self.addr + off) as *mut u8, buf.len())
            }
        }

        /// Whether the page at `off` is resident (mincore), without touching it.
        pub fn resident(&self, off: usize) -> bool {
            let mut v = 0u8;
            // SAFETY: one page of our live mapping; the kernel writes one byte into `v`.
            let rc = unsafe {
                libc::mincore(
                    ((self.addr + off) & !4095) as *mut libc::c_void,
                    4096,
                    &mut v,
                )
            };
            rc == 0 && v & 1 == 1
        }

        /// madvise(MADV_DONTNEED) of part of the region.
        pub fn dontneed(&self, off: usize, len: usize) -> io::Result<()> {
            assert!(off + len <= self.len);
            // SAFETY: the range lies inside our mapping; dropping its pages is what the test wants.
            cvt(unsafe {
                libc::madvise(
                    (self.addr + off) as *mut libc::c_void,
                    len,
                    libc::MADV_DONTNEED,
                )
            })
            .map(drop)
        }

        /// munmap of part of the region (the bytes there must not be touched afterwards).
        pub fn unmap_part(&self, off: usize, len: usize) -> io::Result<()> {
            assert!(off + len <= self.len);
            // SAFETY: the range lies inside our mapping; the test never touches it again (Drop
            // unmapping an already unmapped range is harmless).
            cvt(unsafe { libc::munmap((self.addr + off) as *mut libc::c_void, len) })?;
            self.forget(off, len);
            Ok(())
        }

        fn forget(&self, off: usize, len: usize) {
            self.gone
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((off, len));
        }

        /// mremap(MREMAP_MAYMOVE|MREMAP_FIXED) of `[off, off+len)` onto `dst` at `dst_off`;
        /// the moved part of `self` becomes unmapped.
        pub fn move_part_to(
            &self,
            off: usize,
            len: usize,
            dst: &Region,
            dst_off: usize,
        ) -> io::Result<()> {
            assert!(off + len <= self.len && dst_off + len <= dst.len);
            // SAFETY: both ranges lie inside mappings owned by the test; the destination's old
            // pages are replaced, the source range becomes unmapped, as the test intends.
            let p = unsafe {
                libc::mremap(
                    (self.addr + off) as *mut libc::c_void,
                    len,
                    len,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    (dst.addr + dst_off) as *mut libc::c_void,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            self.forget(off, len);
            Ok(())
        }
    }

    impl Drop for Region {
        fn drop(&mut self) {
            let mut gone = std::mem::take(self.gone.get_mut().unwrap_or_else(|p| p.into_inner()));
            gone.sort_unstable();
            let mut at = 0;
            for (off, len) in gone.into_iter().chain([(self.len, 0)]) {
                if off > at {
                    // SAFETY: [at, off) is still ours (not unmapped or moved away by the test);
                    // nothing refers to it after drop.
                    unsafe { libc::munmap((self.addr + at) as *mut libc::c_void, off - at) };
                }
                at = at.max(off + len);
            }
        }
    }

    /// fork(2); the child runs `child` (which must not allocate or lock: the parent is
    /// multi-threaded) and exits with its return value. Returns the child's pid.
    pub fn fork_run(child: &dyn Fn() -> i32) -> io::Result<i32> {
        // SAFETY: the child only runs `child`, which by contract does async-signal-safe work,
        // then `_exit`s without unwinding or running destructors.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            let code = child();
            // SAFETY: terminates the child immediately.
            unsafe { libc::_exit(code) };
        }
        Ok(pid)
    }

    /// waitpid(pid) → exit code (or 128+signal).
    pub fn wait_child(pid: i32) -> io::Result<i32> {
        let mut status = 0;
        // SAFETY: `status` lives on our stack.
        cvt(unsafe { libc::waitpid(pid, &mut status, 0) })?;
        if libc::WIFEXITED(status) {
            Ok(libc::WEXITSTATUS(status))
        } else {
            Ok(128 + libc::WTERMSIG(status))
        }
    }
}
