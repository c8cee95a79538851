//! [`EngineError`]: why an engine did not start or did not finish. Each variant has a stable
//! [`code`](EngineError::code) (what the binding puts on the JS error) and a message that says
//! which pid, address, file and offset were involved.

use crate::guardian::GuardianError;
use crate::handoff::HandoffError;
use crate::plan::PlanError;
use crate::policy::PolicyError;
use crate::source::SourceError;
use crate::uffd::CopyError;
use std::fmt;
use std::io;

/// Why the engine failed.
#[derive(Debug)]
pub enum EngineError {
    /// Invalid plan: {0}
    Plan(PlanError),
    /// Invalid policy: {0}
    Policy(PolicyError),
    /// This host's page size {size} is not the 4096 bytes lazy-restore serves in
    UnsupportedPageSize { size: u64 },
    /// Page files could not be used: {0}
    Source(SourceError),
    /// Reading page data for task {pid} at image address {image_addr:#x} failed: {source}
    PageRead {
        pid: i32,
        image_addr: u64,
        source: SourceError,
    },
    /// The CRIU socket hand-off failed: {0}
    Handoff(HandoffError),
    /// {op} for task {pid} at {addr:#x} (+{len} bytes) failed: {source}
    Uffd {
        pid: i32,
        child: u32,
        op: &'static str,
        addr: u64,
        len: u64,
        source: CopyError,
    },
    /// Reading events of task {pid}'s userfaultfd failed: {source}
    UffdRead {
        pid: i32,
        child: u32,
        source: io::Error,
    },
    /// Engine setup or event loop I/O failed while {what}: {source}
    Io {
        what: &'static str,
        source: io::Error,
    },
    /// Aborted: {reason}
    Aborted { reason: String },
    /// The engine thread panicked: {message}
    Panicked { message: String },
    /// {0}
    Guardian(GuardianError),
    /// {cause}; the served tree was killed (pids {killed:?}) so it never runs on unrestored memory
    TreeKilled {
        cause: Box<EngineError>,
        killed: Vec<i32>,
    },
}

impl EngineError {
    /// A stable, upper-case identifier of the failure (for JS `error.code`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Plan(_) => "PLAN_INVALID",
            Self::Policy(_) => "POLICY_INVALID",
            Self::UnsupportedPageSize { .. } => "UNSUPPORTED_PAGE_SIZE",
            Self::Source(e) | Self::PageRead { source: e, .. } => match e {
                SourceError::Open { .. } => "SOURCE_OPEN",
                SourceError::TooShort { .. } => "SOURCE_TOO_SHORT",
                SourceError::ShortRead { .. } => "SOURCE_SHORT_READ",
                SourceError::Read { .. } => "SOURCE_READ",
                SourceError::UnknownFile { .. } => "SOURCE_UNKNOWN_FILE",
                SourceError::Remote(r) => r.code(),
            },
            Self::Handoff(e) => match e {
                HandoffError::Listen { .. } => "HANDOFF_LISTEN",
                HandoffError::Io { .. } => "HANDOFF_IO",
                HandoffError::EofBeforePids { .. } => "HANDOFF_EOF_BEFORE_PIDS",
                HandoffError::UnknownPid { .. } => "HANDOFF_UNKNOWN_PID",
                HandoffError::DuplicatePid { .. } => "HANDOFF_DUPLICATE_PID",
                HandoffError::NoFd { .. } => "HANDOFF_NO_FD",
                HandoffError::BadWord { .. } => "HANDOFF_BAD_WORD",
                HandoffError::EofBeforeFinished => "HANDOFF_EOF_BEFORE_FINISHED",
            },
            Self::Uffd { .. } => "UFFD_IOCTL",
            Self::UffdRead { .. } => "UFFD_READ",
            Self::Io { .. } => "ENGINE_IO",
            Self::Aborted { .. } => "ABORTED",
            Self::Panicked { .. } => "PANICKED",
            Self::Guardian(_) => "GUARDIAN_START",
            Self::TreeKilled { cause, .. } => cause.code(),
        }
    }

    /// The underlying error (unwraps [`EngineError::TreeKilled`]).
    pub fn cause(&self) -> &EngineError {
        match self {
            Self::TreeKilled { cause, .. } => cause.cause(),
            other => other,
        }
    }

    /// Host pids killed because of this error (empty when none were).
    pub fn killed(&self) -> &[i32] {
        match self {
            Self::TreeKilled { killed, .. } => killed,
            _ => &[],
        }
    }
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Plan(e) => write!(f, "invalid plan: {e}"),
            Self::Policy(e) => write!(f, "invalid policy: {e}"),
            Self::UnsupportedPageSize { size } => {
                write!(
                    f,
                    "this host's page size {size} is not the 4096 bytes lazy-restore serves in"
                )
            }
            Self::Source(e) => write!(f, "page files cannot be used: {e}"),
            Self::PageRead {
                pid,
                image_addr,
                source,
            } => {
                write!(f, "reading page data for task {pid} at image address {image_addr:#x} failed: {source}")
            }
            Self::Handoff(e) => write!(f, "{e}"),
            Self::Uffd {
                pid,
                child,
                op,
                addr,
                len,
                source,
            } => {
                write!(f, "{op} for task {pid}")?;
                if *child > 0 {
                    write!(f, " (forked child #{child})")?;
                }
                write!(f, " at {addr:#x} (+{len} bytes) failed: {source}")
            }
            Self::UffdRead { pid, child, source } => {
                write!(f, "reading events from the userfaultfd of task {pid}")?;
                if *child > 0 {
                    write!(f, " (forked child #{child})")?;
                }
                write!(f, " failed: {source}")
            }
            Self::Io { what, source } => write!(f, "engine I/O failed while {what}: {source}"),
            Self::Aborted { reason } => write!(f, "aborted: {reason}"),
            Self::Panicked { message } => write!(f, "the engine thread panicked: {message}"),
            Self::Guardian(e) => write!(f, "{e}"),
            Self::TreeKilled { cause, killed } => {
                write!(f, "{cause}; killed the served tree (pids {killed:?}) so it never runs on unrestored memory")
            }
        }
    }
}

impl std::error::Error for EngineError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Plan(e) => Some(e),
            Self::Policy(e) => Some(e),
            Self::Source(e) | Self::PageRead { source: e, .. } => Some(e),
            Self::Handoff(e) => Some(e),
            Self::Guardian(e) => Some(e),
            Self::UffdRead { source, .. } | Self::Io { source, .. } => Some(source),
            Self::TreeKilled { cause, .. } => Some(cause.as_ref()),
            _ => None,
        }
    }
}

impl From<PlanError> for EngineError {
    fn from(e: PlanError) -> Self {
        Self::Plan(e)
    }
}

impl From<GuardianError> for EngineError {
    fn from(e: GuardianError) -> Self {
        Self::Guardian(e)
    }
}

impl From<HandoffError> for EngineError {
    fn from(e: HandoffError) -> Self {
        Self::Handoff(e)
    }
}
