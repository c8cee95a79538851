//! Remote lazy pages: pages that live on another host's page server.
//!
//! * [`protocol`], [`server`], [`store`]: lazy-restore's own page server and its wire format
//!   (docs/page-server-protocol.md): a version/token handshake, length-checked frames, an
//!   *urgent* connection for faults and a *bulk* connection that streams chunks.
//! * [`client`]: the client of that server ([`client::LazySource`] is a [`PageSource`]).
//! * [`criu`]: a client of CRIU's own page server (`criu dump --lazy-pages`, `criu
//!   page-server --lazy-pages`), 4.1.1's 24-byte header or 4.2's 32-byte one.
//!
//! Both clients plug into the engine through [`PageSource`] with a plan whose file index is
//! the task's index and whose offset is the image address ([`RemoteSource`] addressing).
//!
//! [`PageSource`]: crate::source::PageSource

pub mod client;
pub mod criu;
pub mod intervals;
pub mod protocol;
pub mod server;
pub mod store;

#[cfg(test)]
mod tests;

use protocol::{MissingCode, PageRun};
use std::fmt;
use std::time::Duration;

/// `SO_PRIORITY` of urgent connections (both ends): TC_PRIO_INTERACTIVE, band 0 of a default
/// `prio` qdisc.
pub const URGENT_SOCKET_PRIORITY: i32 = 6;

/// Why a remote source failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteError {
    /// Page server {addr} refused us: {reason}
    Refused { addr: String, reason: String },
    /// Page server {addr} unreachable for {grace:?} (grace period over); last error: {last}
    Unavailable {
        addr: String,
        grace: Duration,
        last: String,
    },
    /// Page server {addr} broke the protocol: {what}
    Protocol { addr: String, what: String },
    /// The server does not have task {run.pid}'s pages at {run.addr:#x}: {reason}
    Missing {
        run: PageRun,
        code: MissingCode,
        reason: String,
    },
    /// Task {pid}: {addr:#x} (+{pages} pages) is not a lazy page of the source; never asked
    NotLazy { pid: i32, addr: u64, pages: u64 },
    /// No task with index {file} in this remote source
    UnknownTask { file: u32 },
    /// Session ended with {missing} lazy pages never fetched
    Incomplete { missing: u64 },
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Refused { addr, reason } => write!(f, "page server {addr} refused us: {reason}"),
            Self::Unavailable { addr, grace, last } => write!(
                f,
                "page server {addr} unreachable for {:.1}s (grace period over); last error: {last}",
                grace.as_secs_f64()
            ),
            Self::Protocol { addr, what } => write!(f, "page server {addr} broke the protocol: {what}"),
            Self::Missing { run, code, reason } => write!(
                f,
                "the page server does not have task {}'s {} pages at {:#x} ({code:?}): {reason}",
                run.pid, run.pages, run.addr
            ),
            Self::NotLazy { pid, addr, pages } => write!(
                f,
                "task {pid}: {addr:#x} (+{pages} pages) is not a lazy page of the remote source; not requested"
            ),
            Self::UnknownTask { file } => write!(f, "no task with index {file} in this remote source"),
            Self::Incomplete { missing } => {
                write!(f, "session ended with {missing} lazy pages never fetched")
            }
        }
    }
}

impl std::error::Error for RemoteError {}

impl RemoteError {
    /// A stable identifier for JS `error.code`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Refused { .. } => "REMOTE_REFUSED",
            Self::Unavailable { .. } => "REMOTE_UNAVAILABLE",
            Self::Protocol { .. } => "REMOTE_PROTOCOL",
            Self::Missing { .. } => "REMOTE_MISSING",
            Self::NotLazy { .. } => "REMOTE_NOT_LAZY",
            Self::UnknownTask { .. } => "REMOTE_UNKNOWN_TASK",
            Self::Incomplete { .. } => "REMOTE_INCOMPLETE",
        }
    }
}
