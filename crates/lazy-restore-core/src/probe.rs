//! What this kernel's userfaultfd offers: the feature bits and ioctls a lazy-pages daemon
//! depends on, probed the way a kernel-support check should be (open, UFFDIO_API with no
//! features requested, read back what the kernel reports).

use crate::sys;
use std::io;

/// Feature bits of `UFFDIO_API`, in bit order, with their kernel names.
pub const FEATURE_NAMES: &[(u64, &str)] = &[
    (1 << 0, "PAGEFAULT_FLAG_WP"),
    (1 << 1, "EVENT_FORK"),
    (1 << 2, "EVENT_REMAP"),
    (1 << 3, "EVENT_REMOVE"),
    (1 << 4, "MISSING_HUGETLBFS"),
    (1 << 5, "MISSING_SHMEM"),
    (1 << 6, "EVENT_UNMAP"),
    (1 << 7, "SIGBUS"),
    (1 << 8, "THREAD_ID"),
    (1 << 9, "MINOR_HUGETLBFS"),
    (1 << 10, "MINOR_SHMEM"),
    (1 << 11, "EXACT_ADDRESS"),
    (1 << 12, "WP_HUGETLBFS_SHMEM"),
    (1 << 13, "WP_UNPOPULATED"),
    (1 << 14, "POISON"),
    (1 << 15, "WP_ASYNC"),
    (1 << 16, "MOVE"),
];

/// The events CRIU asks for when it creates a restored task's uffd (0x4e); a daemon that
/// cannot rely on all four cannot follow fork, mremap, madvise or munmap.
pub const CRIU_FEATURES: u64 = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 6);

/// ioctl bits reported by UFFDIO_API (`_UFFDIO_*` numbers).
pub const API_IOCTL_NAMES: &[(u64, &str)] = &[
    (1 << 0x3f, "API"),
    (1 << 0x00, "REGISTER"),
    (1 << 0x01, "UNREGISTER"),
];

/// The outcome of a probe.
#[derive(Debug, Clone)]
pub struct Capabilities {
    /// Raw feature bits the kernel reports.
    pub features: u64,
    /// Raw ioctl bits of the UFFDIO_API answer.
    pub ioctls: u64,
    /// Names of the supported features.
    pub feature_names: Vec<&'static str>,
    /// Names of the ioctls the API answer offers.
    pub ioctl_names: Vec<&'static str>,
    /// True when every event CRIU's restore asks for is there.
    pub criu_noncoop: bool,
}

/// Opens a userfaultfd (non-blocking, close-on-exec) and asks the kernel what it supports.
pub fn probe() -> io::Result<Capabilities> {
    let fd = sys::userfaultfd(libc::O_CLOEXEC | libc::O_NONBLOCK)?;
    let api = sys::uffdio_api(&fd, 0)?;
    let pick = |bits: u64, table: &[(u64, &'static str)]| {
        table
            .iter()
            .filter(|(b, _)| bits & b != 0)
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
    };
    Ok(Capabilities {
        features: api.features,
        ioctls: api.ioctls,
        feature_names: pick(api.features, FEATURE_NAMES),
        ioctl_names: pick(api.ioctls, API_IOCTL_NAMES),
        criu_noncoop: api.features & CRIU_FEATURES == CRIU_FEATURES,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_reports_the_events_criu_needs() {
        let caps =
            probe().expect("userfaultfd probe (needs root or vm.unprivileged_userfaultfd=1)");
        assert!(
            caps.criu_noncoop,
            "features {:#x} lack fork/remap/remove/unmap",
            caps.features
        );
        assert!(caps.feature_names.contains(&"EVENT_FORK"));
        assert!(caps.ioctl_names.contains(&"REGISTER"));
    }
}
