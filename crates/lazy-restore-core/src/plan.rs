//! What the engine is asked to serve ([`EngineConfig`]: tasks, their lazy ranges, the page
//! files) and the checks a plan must pass before anything is bound or started.

use crate::copier::CopyLog;
use crate::policy::Policy;
use crate::uffd::PAGE_SIZE;
use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Everything the engine needs to serve one `criu restore --lazy-pages`.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The `lazy-pages.socket` path; unlinked, then bound with mode 0600.
    pub socket_path: PathBuf,
    /// One entry per `pstree.img` entry (alive and zombie).
    pub tasks: Vec<TaskPlan>,
    /// Page files, referenced by index from [`RangePlan::file`].
    pub files: Vec<PathBuf>,
    /// How pages move: readahead, background chunks and thread, prefetch, fault recording.
    pub policy: Policy,
    /// Serve page files from read-only mappings (UFFDIO_COPY straight from the page cache;
    /// see [`crate::source`]) instead of `pread` into a buffer.
    pub map_page_files: bool,
    /// Uids allowed to connect (SO_PEERCRED).
    pub allowed_uids: Vec<u32>,
    /// On a fatal error, SIGKILL the served tree (production); tests that serve their own
    /// process turn this off.
    pub kill_on_fatal: bool,
    /// Minimum time between two progress events.
    pub progress_interval: Duration,
    /// The `lazy-restore-guardian` binary to start with the engine: it holds a reference to
    /// every served userfaultfd, so if this process dies mid-transfer the restored tasks stay
    /// blocked on their missing pages until it has killed them, instead of reading zeros
    /// (see [`crate::guardian`]). `None`: no guardian (in-process tests). Ignored when
    /// `kill_on_fatal` is off: a guardian's only action is to kill.
    pub guardian: Option<PathBuf>,
    /// Tests only: every install (task, kind, address, pages) is appended here.
    #[doc(hidden)]
    pub copy_log: Option<CopyLog>,
    /// Largest single UFFDIO_COPY of the copier thread (what a fault may wait for); exposed
    /// for measurements.
    #[doc(hidden)]
    pub copier_ioctl_bytes: u64,
}

impl EngineConfig {
    /// A config with the defaults: the default policy, mapped page files, uid 0 only, kill on
    /// fatal, 100 ms progress, no guardian.
    pub fn new(socket_path: PathBuf, tasks: Vec<TaskPlan>, files: Vec<PathBuf>) -> Self {
        Self {
            socket_path,
            tasks,
            files,
            policy: Policy::default(),
            map_page_files: true,
            allowed_uids: vec![0],
            kill_on_fatal: true,
            progress_interval: Duration::from_millis(100),
            guardian: None,
            copy_log: None,
            copier_ioctl_bytes: crate::copier::COPIER_IOCTL_BYTES,
        }
    }
}

/// One task of the restored tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskPlan {
    /// The pid in the images (what the task sends on the socket).
    pub pid: i32,
    /// Its lazy ranges, sorted by start, non-overlapping.
    pub ranges: Vec<RangePlan>,
}

/// A run of lazy pages whose bytes are contiguous in one file.
/// `start` = image (dump-time) address, page aligned; never spans two VMAs (the caller splits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangePlan {
    pub start: u64,
    pub pages: u64,
    pub file: u32,
    pub offset: u64,
}

/// Why a plan was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanError {
    /// The plan has no task.
    NoTasks,
    /// Task pid {pid} is not a positive pid.
    BadPid { pid: i32 },
    /// Task pid {pid} appears twice.
    DuplicatePid { pid: i32 },
    /// Task {pid}: range at {start:#x} is not page aligned (start or file offset {offset}).
    Unaligned { pid: i32, start: u64, offset: u64 },
    /// Task {pid}: range at {start:#x} starts before the previous one ends ({prev_end:#x}).
    Overlap { pid: i32, start: u64, prev_end: u64 },
    /// Task {pid}: range at {start:#x} overflows the address space.
    Overflow { pid: i32, start: u64 },
    /// Task {pid}: range at {start:#x} names file {file}, but only {files} are given.
    BadFile {
        pid: i32,
        start: u64,
        file: u32,
        files: usize,
    },
    /// The socket path is empty.
    NoSocketPath,
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoTasks => f.write_str("the plan has no task"),
            Self::BadPid { pid } => write!(f, "task pid {pid} is not a positive pid"),
            Self::DuplicatePid { pid } => write!(f, "task pid {pid} appears twice in the plan"),
            Self::Unaligned { pid, start, offset } => write!(
                f,
                "task {pid}: range at {start:#x} (file offset {offset}) is not aligned to {PAGE_SIZE}-byte pages"
            ),
            Self::Overlap { pid, start, prev_end } => write!(
                f,
                "task {pid}: range at {start:#x} starts before the previous range ends ({prev_end:#x}); ranges must be sorted and disjoint"
            ),
            Self::Overflow { pid, start } => write!(f, "task {pid}: range at {start:#x} overflows the address space"),
            Self::BadFile { pid, start, file, files } => write!(
                f,
                "task {pid}: range at {start:#x} names pages file #{file}, but only {files} file(s) are given"
            ),
            Self::NoSocketPath => f.write_str("the socket path is empty"),
        }
    }
}

impl std::error::Error for PlanError {}

/// Checks a plan; returns, per file index, the number of bytes the plan reads from it.
pub fn validate(cfg: &EngineConfig) -> Result<Vec<u64>, PlanError> {
    if cfg.socket_path.as_os_str().is_empty() {
        return Err(PlanError::NoSocketPath);
    }
    if cfg.tasks.is_empty() {
        return Err(PlanError::NoTasks);
    }
    let mut needed = vec![0u64; cfg.files.len()];
    let mut pids = HashSet::new();
    for t in &cfg.tasks {
        let pid = t.pid;
        if pid <= 0 {
            return Err(PlanError::BadPid { pid });
        }
        if !pids.insert(pid) {
            return Err(PlanError::DuplicatePid { pid });
        }
        let mut prev_end = 0u64;
        for r in &t.ranges {
            let start = r.start;
            if start % PAGE_SIZE != 0 || r.offset % PAGE_SIZE != 0 {
                return Err(PlanError::Unaligned {
                    pid,
                    start,
                    offset: r.offset,
                });
            }
            if start < prev_end {
                return Err(PlanError::Overlap {
                    pid,
                    start,
                    prev_end,
                });
            }
            let bytes = r
                .pages
                .checked_mul(PAGE_SIZE)
                .ok_or(PlanError::Overflow { pid, start })?;
            let end = start
                .checked_add(bytes)
                .ok_or(PlanError::Overflow { pid, start })?;
            let file_end = r
                .offset
                .checked_add(bytes)
                .ok_or(PlanError::Overflow { pid, start })?;
            let slot = needed.get_mut(r.file as usize).ok_or(PlanError::BadFile {
                pid,
                start,
                file: r.file,
                files: cfg.files.len(),
            })?;
            *slot = (*slot).max(file_end);
            prev_end = end;
        }
    }
    Ok(needed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(ranges: Vec<RangePlan>) -> EngineConfig {
        EngineConfig::new(
            "/tmp/x.sock".into(),
            vec![TaskPlan { pid: 7, ranges }],
            vec!["a".into()],
        )
    }

    #[test]
    fn accepts_a_good_plan_and_sizes_files() {
        let c = cfg(vec![
            RangePlan {
                start: 0x1000,
                pages: 2,
                file: 0,
                offset: 0,
            },
            RangePlan {
                start: 0x3000,
                pages: 1,
                file: 0,
                offset: 0x2000,
            },
        ]);
        assert_eq!(validate(&c).unwrap(), vec![0x3000]);
    }

    #[test]
    fn refuses_bad_plans() {
        let r = |start, pages, file, offset| RangePlan {
            start,
            pages,
            file,
            offset,
        };
        assert!(matches!(
            validate(&cfg(vec![r(0x1001, 1, 0, 0)])),
            Err(PlanError::Unaligned { .. })
        ));
        assert!(matches!(
            validate(&cfg(vec![r(0x1000, 1, 0, 5)])),
            Err(PlanError::Unaligned { .. })
        ));
        assert!(matches!(
            validate(&cfg(vec![r(0x2000, 2, 0, 0), r(0x3000, 1, 0, 0)])),
            Err(PlanError::Overlap {
                start: 0x3000,
                prev_end: 0x4000,
                ..
            })
        ));
        assert!(matches!(
            validate(&cfg(vec![r(0x1000, 1, 1, 0)])),
            Err(PlanError::BadFile { file: 1, .. })
        ));
        assert!(matches!(
            validate(&cfg(vec![r(0x1000, u64::MAX / 2, 0, 0)])),
            Err(PlanError::Overflow { .. })
        ));
        let mut c = cfg(vec![]);
        c.tasks.push(TaskPlan {
            pid: 7,
            ranges: vec![],
        });
        assert!(matches!(
            validate(&c),
            Err(PlanError::DuplicatePid { pid: 7 })
        ));
        c.tasks[1].pid = -3;
        assert!(matches!(validate(&c), Err(PlanError::BadPid { pid: -3 })));
    }
}
