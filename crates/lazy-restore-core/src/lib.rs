//! lazy-restore core: the engine behind `lazy-restore serve`.
//!
//! Owns everything on the hot path — the userfaultfd fault loop, page sources, the CRIU
//! socket hand-off — and knows nothing of Node. The napi crate only converts types.
//!
//! Where things are: [`handoff`] talks to `criu restore`; [`engine`] is the loop that serves
//! faults and copies in the background ([`copier`]: its copier thread); [`guardian`] outlives it and kills the tree if it dies mid-transfer; [`ranges`] knows what is still pending; [`source`]
//! reads page bytes; [`policy`] says how pages move (readahead, background, prefetch); [`uffd`] wraps the userfaultfd ioctls; [`telemetry`] holds what is
//! measured and reported; [`tree`] finds and kills the restored process tree.

pub mod copier;
pub mod engine;
pub mod error;
pub mod guardian;
pub mod handoff;
pub mod plan;
pub mod policy;
pub mod probe;
pub mod ranges;
pub mod remote;
pub mod source;
mod sys;
pub mod telemetry;
pub mod tree;
pub mod uffd;

#[cfg(test)]
mod engine_tests;

/// Helpers for benchmarks and tests that play the restored task in their own process. Not
/// part of the API.
#[doc(hidden)]
pub mod testkit {
    pub use crate::sys::testmem::{fork_run, wait_child, Region};
    pub use crate::sys::{
        fadvise, file_size, uffdio_api, uffdio_copy, uffdio_copy_raw, uffdio_register, userfaultfd,
        Epoll, FileMapping, MADV_POPULATE_READ, MODE_DONTWAKE, REGISTER_MODE_MISSING,
    };
}

pub use copier::{CopyKind, CopyLog, CopyRecord};
pub use engine::{Engine, EngineControl, EngineHandle, EventSink};
pub use error::EngineError;
pub use plan::{EngineConfig, PlanError, RangePlan, TaskPlan};
pub use policy::{
    Background, BackgroundOrder, CopyThread, Policy, PolicyError, PrefetchPlan, PrefetchRange,
    Readahead, ReadaheadMode, TaskOrder,
};
pub use source::{FileSource, PageSource, SourceCounters, SourceError, SourceStats};
pub use telemetry::{
    CpuTime, EngineEvent, FaultTrace, LatencySummary, Peer, Phase, Report, SeriesPoint, Snapshot,
    TaskStats, Timeline, Totals, TracedFault,
};

/// The version of this crate, for `lazy-restore --version` and bug reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
