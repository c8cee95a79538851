//! lazy-restore core: the engine behind `lazy-restore serve`.
//!
//! Owns everything on the hot path — the userfaultfd fault loop, page sources, the CRIU
//! socket hand-off — and knows nothing of Node. The napi crate only converts types.

pub mod probe;
mod sys;

/// The version of this crate, for `lazy-restore --version` and bug reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
