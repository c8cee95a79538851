//! The only place with `unsafe`: thin wrappers over the userfaultfd ABI and the few libc
//! calls around it. Everything above this module is safe Rust.
//!
//! Layouts and ioctl numbers are those of `linux/userfaultfd.h` on x86_64 (and every 64-bit
//! Linux arch: the structs have no arch-dependent padding).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub const UFFD_API: u64 = 0xAA;
pub const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
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
    let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
    // SAFETY: UFFDIO_API reads and writes exactly one `UffdioApi` (24 bytes, repr(C)), which
    // lives on our stack for the duration of the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api as *mut UffdioApi) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(api)
}
