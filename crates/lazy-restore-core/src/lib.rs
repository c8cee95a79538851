//! lazy-restore core: the engine behind `lazy-restore serve`.
//!
//! Owns everything on the hot path — the userfaultfd fault loop, page sources, the CRIU
//! socket hand-off — and knows nothing of Node. The napi crate only converts types.
//!
//! Where things are: [`handoff`] talks to `criu restore`; [`engine`] is the loop that serves
//! faults and copies in the background; [`guardian`] outlives it and kills the tree if it dies mid-transfer; [`ranges`] knows what is still pending; [`source`]
//! reads page bytes; [`policy`] says how pages move (readahead, background, prefetch); [`uffd`] wraps the userfaultfd ioctls; [`telemetry`] holds what is
//! measured and reported; [`tree`] finds and kills the restored process tree.

pub mod engine;
pub mod error;
pub mod guardian;
pub mod handoff;
pub mod plan;
pub mod policy;
pub mod probe;
pub mod ranges;
pub mod source;
mod sys;
pub mod telemetry;
pub mod tree;
pub mod uffd;

#[cfg(test)]
mod engine_tests;

pub use engine::{Engine, EngineControl, EngineHandle, EventSink};
pub use error::EngineError;
pub use plan::{EngineConfig, PlanError, RangePlan, TaskPlan, DEFAULT_CHUNK_BYTES};
pub use policy::{
    Background, BackgroundOrder, CopyThread, Policy, PolicyError, PrefetchPlan, PrefetchRange,
    Readahead, ReadaheadMode, TaskOrder,
};
pub use source::{FileSource, PageSource, SourceError};
pub use telemetry::{
    CpuTime, EngineEvent, LatencySummary, Peer, Phase, Report, Snapshot, TaskStats, Timeline,
    Totals,
};

/// The version of this crate, for `lazy-restore --version` and bug reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
