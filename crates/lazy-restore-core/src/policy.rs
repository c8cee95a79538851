//! How pages are moved: the transfer [`Policy`] (fault readahead, background chunking and
//! order, copier thread, working-set prefetch, fault recording) and the two small state
//! machines the engine drives with it, [`ReadaheadWindow`] and [`ChunkSizer`].
//!
//! Everything here is pure logic; the engine applies it. [`Policy::criu`] reproduces CRIU
//! 4.1.1's `criu lazy-pages` (docs/criu-lazy-pages.md §5) so a comparison isolates policy from
//! engine; [`Policy::default`] is lazy-restore's own, chosen by measurement (see its doc).

use crate::uffd::PAGE_SIZE;
use std::fmt;

/// How many pages a fault installs besides the faulting one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadaheadMode {
    /// Exactly the faulting page (CRIU).
    Off,
    /// Always a window of `max_pages`.
    Fixed,
    /// Per task: double the window (up to `max_pages`) while faults follow the previous
    /// window, halve it (down to `min_pages`) when they do not.
    Adaptive,
}

impl ReadaheadMode {
    /// The name used in configs and reports: "off" | "fixed" | "adaptive".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Fixed => "fixed",
            Self::Adaptive => "adaptive",
        }
    }

    /// Parses [`ReadaheadMode::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "off" => Self::Off,
            "fixed" => Self::Fixed,
            "adaptive" => Self::Adaptive,
            _ => return None,
        })
    }
}

/// Fault readahead: the faulting page plus a window, clipped by the engine to the faulting
/// page's range and to pages still pending, installed with one wake-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Readahead {
    pub mode: ReadaheadMode,
    /// Smallest window in pages, the faulting page included (adaptive starts here).
    pub min_pages: u32,
    /// Largest window in pages, the faulting page included.
    pub max_pages: u32,
    /// Window = the window-sized aligned block holding the fault (else it starts at the fault).
    pub align: bool,
}

impl Readahead {
    /// No readahead: one page per fault.
    pub const OFF: Readahead = Readahead {
        mode: ReadaheadMode::Off,
        min_pages: 1,
        max_pages: 1,
        align: false,
    };
}

/// Which pending pages of a task the background copies next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackgroundOrder {
    /// The lowest-addressed pending run (CRIU).
    LowestAddress,
    /// One chunk per range (VMA piece) in turn, cycling through the task's ranges.
    RoundRobin,
    /// Continue right after the task's latest fault window; lowest address when nothing is
    /// pending there.
    NearFaults,
}

impl BackgroundOrder {
    /// "lowest-address" | "round-robin" | "near-faults".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LowestAddress => "lowest-address",
            Self::RoundRobin => "round-robin",
            Self::NearFaults => "near-faults",
        }
    }

    /// Parses [`BackgroundOrder::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "lowest-address" => Self::LowestAddress,
            "round-robin" => Self::RoundRobin,
            "near-faults" => Self::NearFaults,
            _ => return None,
        })
    }
}

/// How the background moves between tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskOrder {
    /// Finish the first task of the list that has work, then the next (CRIU, local mode).
    OneAfterAnother,
    /// One chunk per task in turn.
    Interleaved,
}

impl TaskOrder {
    /// "one-after-another" | "interleaved".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OneAfterAnother => "one-after-another",
            Self::Interleaved => "interleaved",
        }
    }

    /// Parses [`TaskOrder::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "one-after-another" => Self::OneAfterAnother,
            "interleaved" => Self::Interleaved,
            _ => return None,
        })
    }
}

/// Where background chunks are copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyThread {
    /// In the fault loop, one chunk per loop turn (CRIU).
    Loop,
    /// In a copier thread of its own; the fault loop never copies a chunk.
    Copier,
}

impl CopyThread {
    /// "loop" | "copier".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loop => "loop",
            Self::Copier => "copier",
        }
    }

    /// Parses [`CopyThread::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "loop" => Self::Loop,
            "copier" => Self::Copier,
            _ => return None,
        })
    }
}

/// The background copy of pages nobody faulted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Background {
    /// First chunk of a task, and the size a fault resets it to (bytes).
    pub start_chunk_bytes: u64,
    /// Added after every chunk (bytes; 0 = fixed size).
    pub grow_bytes: u64,
    /// Cap (bytes).
    pub max_chunk_bytes: u64,
    /// A fault of a task resets its chunk size to `start_chunk_bytes`.
    pub reset_on_fault: bool,
    pub order: BackgroundOrder,
    pub tasks: TaskOrder,
    pub thread: CopyThread,
    /// Loop thread only: handle every ready event (until none is left) before each chunk.
    /// When false, each ready userfaultfd gets one read (up to 64 messages) per chunk, so a
    /// fault storm cannot starve the background.
    pub drain_before_chunk: bool,
    /// Background chunks (not prefetch) start this long after the restore-finished word (0:
    /// at once). A recording run holds the background so that the process's own faults, not
    /// pages the background happened to install first, show what it needs.
    pub start_delay: std::time::Duration,
}

/// A run of pages to prefetch: image address (page aligned) and length in pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefetchRange {
    pub start: u64,
    pub pages: u64,
}

/// The working set of one pstree pid, in the order its pages should be installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefetchPlan {
    pub pid: i32,
    pub ranges: Vec<PrefetchRange>,
}

/// The whole transfer policy. See the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Reported back in the report.
    pub name: String,
    pub readahead: Readahead,
    pub background: Background,
    /// Pages to install first once the restore has finished, before any background chunk.
    /// Scheduling priority: faults (with their readahead) > prefetch > background.
    pub prefetch: Vec<PrefetchPlan>,
    /// Record, per task, the image address and time of every fault served from the source.
    pub record_faults: bool,
}

/// Default readahead window bounds, pages (see [`Policy::default`]).
pub const DEFAULT_READAHEAD_MIN_PAGES: u32 = 4;
/// See [`DEFAULT_READAHEAD_MIN_PAGES`].
pub const DEFAULT_READAHEAD_MAX_PAGES: u32 = 64;
/// Default background chunk (one copier job), bytes (see [`Policy::default`]).
pub const DEFAULT_BACKGROUND_CHUNK_BYTES: u64 = 4 * 1024 * 1024;

impl Policy {
    /// CRIU 4.1.1's `criu lazy-pages` policy (docs §5): one page per fault, chunks of 64 KiB
    /// growing by 64 KiB to 4 MiB and reset by every fault, lowest address first, tasks one
    /// after another, copied in the event loop after draining every ready event.
    pub fn criu() -> Self {
        Self {
            name: "criu".into(),
            readahead: Readahead::OFF,
            background: Background {
                start_chunk_bytes: 64 * 1024,
                grow_bytes: 64 * 1024,
                max_chunk_bytes: 4 * 1024 * 1024,
                reset_on_fault: true,
                order: BackgroundOrder::LowestAddress,
                tasks: TaskOrder::OneAfterAnother,
                thread: CopyThread::Loop,
                drain_before_chunk: true,
                start_delay: std::time::Duration::ZERO,
            },
            prefetch: Vec::new(),
            record_faults: false,
        }
    }

    /// A fixed background chunk of `bytes` (what the old `chunk_bytes` option meant).
    pub fn with_fixed_chunk(mut self, bytes: u64) -> Self {
        self.background.start_chunk_bytes = bytes;
        self.background.max_chunk_bytes = bytes;
        self.background.grow_bytes = 0;
        self
    }

    /// Checks the numbers; the engine refuses a policy that fails.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let r = &self.readahead;
        if r.min_pages == 0 || r.max_pages < r.min_pages {
            return Err(PolicyError::Readahead {
                min: r.min_pages,
                max: r.max_pages,
            });
        }
        if r.max_pages > MAX_READAHEAD_PAGES {
            return Err(PolicyError::ReadaheadTooLarge { max: r.max_pages });
        }
        let b = &self.background;
        if b.start_chunk_bytes < PAGE_SIZE || b.max_chunk_bytes < b.start_chunk_bytes {
            return Err(PolicyError::Chunk {
                start: b.start_chunk_bytes,
                max: b.max_chunk_bytes,
            });
        }
        if b.max_chunk_bytes > MAX_CHUNK_BYTES {
            return Err(PolicyError::ChunkTooLarge {
                max: b.max_chunk_bytes,
            });
        }
        for p in &self.prefetch {
            for r in &p.ranges {
                if r.start % PAGE_SIZE != 0 {
                    return Err(PolicyError::PrefetchUnaligned {
                        pid: p.pid,
                        start: r.start,
                    });
                }
                if r.pages
                    .checked_mul(PAGE_SIZE)
                    .and_then(|b| r.start.checked_add(b))
                    .is_none()
                {
                    return Err(PolicyError::PrefetchOverflow {
                        pid: p.pid,
                        start: r.start,
                    });
                }
            }
        }
        Ok(())
    }
}

impl Default for Policy {
    /// lazy-restore's own policy ("default"), chosen by measurement on the 2-vCPU test VM
    /// (`engine_tests::measure_policies`; numbers in the commit that set it):
    /// - readahead adaptive 4..64 pages, aligned: a sequential scan of 256 MiB 5.0 s -> 0.20 s
    ///   (1028 faults instead of 65536); 20000 random touches 1.29 s -> 0.92 s, +9 µs p50 per
    ///   random fault. 4..16 scanned in 0.49 s, 2..256 in 0.15 s at 440 µs p50 per fault.
    /// - background on a copier thread in 4 MiB jobs (one 4 MiB ioctl each): sporadic faults
    ///   during the transfer wait p50 15 µs (no background: 13) instead of 108 µs when the loop
    ///   copies 256 KiB chunks. 16 MiB jobs moved 2 GiB faster (3.05-3.14 GB/s median against
    ///   2.75-2.95) but a never-idle copier tripled the p99 of those faults (7-9 ms vs 2.6-3 ms
    ///   on this 2-vCPU VM): faults first.
    /// - near-faults: a scanner racing the background finished 512 MiB in 200-235 ms instead
    ///   of 340-427 ms with lowest-address; the whole transfer took the same time.
    /// - tasks interleaved; drainBeforeChunk false (only matters if `thread` is set to loop:
    ///   a fault storm then cannot starve the background).
    fn default() -> Self {
        Self {
            name: "default".into(),
            readahead: Readahead {
                mode: ReadaheadMode::Adaptive,
                min_pages: DEFAULT_READAHEAD_MIN_PAGES,
                max_pages: DEFAULT_READAHEAD_MAX_PAGES,
                align: true,
            },
            background: Background {
                start_chunk_bytes: DEFAULT_BACKGROUND_CHUNK_BYTES,
                grow_bytes: 0,
                max_chunk_bytes: DEFAULT_BACKGROUND_CHUNK_BYTES,
                reset_on_fault: false,
                order: BackgroundOrder::NearFaults,
                tasks: TaskOrder::Interleaved,
                thread: CopyThread::Copier,
                drain_before_chunk: false,
                start_delay: std::time::Duration::ZERO,
            },
            prefetch: Vec::new(),
            record_faults: false,
        }
    }
}

/// Largest readahead window accepted, pages (4 MiB).
pub const MAX_READAHEAD_PAGES: u32 = 1024;
/// Largest background chunk accepted, bytes (64 MiB).
pub const MAX_CHUNK_BYTES: u64 = 64 * 1024 * 1024;

/// Why a policy was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyError {
    /// Readahead window bounds {min}..{max} pages are not 1 <= min <= max.
    Readahead { min: u32, max: u32 },
    /// Readahead window of {max} pages is larger than 1024 pages.
    ReadaheadTooLarge { max: u32 },
    /// Background chunk bounds {start}..{max} bytes are not one page <= start <= max.
    Chunk { start: u64, max: u64 },
    /// Background chunk of {max} bytes is larger than 64 MiB.
    ChunkTooLarge { max: u64 },
    /// Prefetch range of pid {pid} at {start:#x} is not page aligned.
    PrefetchUnaligned { pid: i32, start: u64 },
    /// Prefetch range of pid {pid} at {start:#x} overflows the address space.
    PrefetchOverflow { pid: i32, start: u64 },
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Readahead { min, max } => write!(
                f,
                "readahead window bounds {min}..{max} pages are not 1 <= minPages <= maxPages"
            ),
            Self::ReadaheadTooLarge { max } => write!(
                f,
                "readahead window of {max} pages is larger than {MAX_READAHEAD_PAGES} pages"
            ),
            Self::Chunk { start, max } => write!(
                f,
                "background chunk bounds {start}..{max} bytes are not {PAGE_SIZE} <= startChunkBytes <= maxChunkBytes"
            ),
            Self::ChunkTooLarge { max } => write!(
                f,
                "background chunk of {max} bytes is larger than {MAX_CHUNK_BYTES} bytes"
            ),
            Self::PrefetchUnaligned { pid, start } => {
                write!(f, "prefetch range of pid {pid} at {start:#x} is not page aligned")
            }
            Self::PrefetchOverflow { pid, start } => {
                write!(f, "prefetch range of pid {pid} at {start:#x} overflows the address space")
            }
        }
    }
}

impl std::error::Error for PolicyError {}

/// One task's readahead state. Works in page numbers (address / [`PAGE_SIZE`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadaheadWindow {
    /// Current adaptive window, pages (0 = not started: `min_pages`).
    window: u64,
    /// The previous window `[start, end)`, page numbers.
    last: Option<(u64, u64)>,
}

/// The pages a fault asks for: `[start, start + pages)` in page numbers; always holds the
/// faulting page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: u64,
    pub pages: u64,
}

impl Window {
    /// One past the last page.
    pub fn end(&self) -> u64 {
        self.start + self.pages
    }
}

impl ReadaheadWindow {
    /// The current adaptive window size in pages (for tests and reports).
    pub fn size(&self, cfg: &Readahead) -> u64 {
        if self.window == 0 {
            u64::from(cfg.min_pages.max(1))
        } else {
            self.window
        }
    }

    /// The window for a fault on page number `page`, updating the adaptive state. A fault is
    /// sequential when it lands in the window-sized block right after the previous window
    /// (or, with alignment, when that block is the next aligned block).
    pub fn on_fault(&mut self, cfg: &Readahead, page: u64) -> Window {
        let pages = match cfg.mode {
            ReadaheadMode::Off => 1,
            ReadaheadMode::Fixed => u64::from(cfg.max_pages.max(1)),
            ReadaheadMode::Adaptive => {
                let min = u64::from(cfg.min_pages.max(1));
                let max = u64::from(cfg.max_pages).max(min);
                let cur = self.size(cfg).clamp(min, max);
                let sequential = self
                    .last
                    .is_some_and(|(_, end)| page >= end && page < end + cur);
                let next = if self.last.is_none() {
                    cur
                } else if sequential {
                    (cur * 2).min(max)
                } else {
                    (cur / 2).max(min)
                };
                self.window = next;
                next
            }
        };
        let start = if cfg.align && pages > 1 {
            page - page % pages
        } else {
            page
        };
        let w = Window { start, pages };
        self.last = Some((w.start, w.end()));
        w
    }
}

/// One task's background chunk size: starts at `start`, grows by `grow` after each chunk up to
/// `max`, and (if the policy says so) is reset by a fault. In pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkSizer {
    next: u64,
    start: u64,
    grow: u64,
    max: u64,
    reset_on_fault: bool,
}

impl ChunkSizer {
    /// From the policy's byte sizes (rounded down to pages, at least one page).
    pub fn new(b: &Background) -> Self {
        let pages = |bytes: u64| (bytes / PAGE_SIZE).max(1);
        let start = pages(b.start_chunk_bytes);
        Self {
            next: start,
            start,
            grow: b.grow_bytes / PAGE_SIZE,
            max: pages(b.max_chunk_bytes).max(start),
            reset_on_fault: b.reset_on_fault,
        }
    }

    /// The size of the next chunk, pages (does not change the state).
    pub fn peek(&self) -> u64 {
        self.next
    }

    /// Takes the size for a chunk about to be copied and grows the next one.
    pub fn take(&mut self) -> u64 {
        let n = self.next;
        self.next = (self.next + self.grow).min(self.max);
        n
    }

    /// A fault of the task: back to the start size if the policy resets on faults.
    pub fn on_fault(&mut self) {
        if self.reset_on_fault {
            self.next = self.start;
        }
    }

    /// The largest chunk this sizer can ever return, pages.
    pub fn max_pages(&self) -> u64 {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ra(mode: ReadaheadMode, min: u32, max: u32, align: bool) -> Readahead {
        Readahead {
            mode,
            min_pages: min,
            max_pages: max,
            align,
        }
    }

    #[test]
    fn off_and_fixed_windows() {
        let mut w = ReadaheadWindow::default();
        let off = Readahead::OFF;
        assert_eq!(
            w.on_fault(&off, 37),
            Window {
                start: 37,
                pages: 1
            }
        );
        let fixed = ra(ReadaheadMode::Fixed, 1, 16, true);
        assert_eq!(
            w.on_fault(&fixed, 37),
            Window {
                start: 32,
                pages: 16
            }
        );
        assert_eq!(
            w.on_fault(&fixed, 48),
            Window {
                start: 48,
                pages: 16
            }
        );
        let unaligned = ra(ReadaheadMode::Fixed, 1, 16, false);
        assert_eq!(
            w.on_fault(&unaligned, 37),
            Window {
                start: 37,
                pages: 16
            }
        );
    }

    #[test]
    fn adaptive_grows_on_sequential_faults_up_to_max() {
        let cfg = ra(ReadaheadMode::Adaptive, 2, 16, false);
        let mut w = ReadaheadWindow::default();
        // A sequential toucher faults on the first page after each window.
        let mut page = 100;
        let mut sizes = Vec::new();
        for _ in 0..6 {
            let win = w.on_fault(&cfg, page);
            assert_eq!(win.start, page);
            sizes.push(win.pages);
            page = win.end();
        }
        assert_eq!(sizes, [2, 4, 8, 16, 16, 16]);
    }

    #[test]
    fn adaptive_shrinks_on_random_faults_down_to_min() {
        let cfg = ra(ReadaheadMode::Adaptive, 2, 32, true);
        let mut w = ReadaheadWindow::default();
        let mut page = 0;
        for _ in 0..5 {
            page = w.on_fault(&cfg, page).end();
        }
        assert_eq!(w.size(&cfg), 32);
        let sizes: Vec<u64> = [10_000u64, 50, 90_000, 7, 123_456, 999]
            .iter()
            .map(|&p| {
                let win = w.on_fault(&cfg, p);
                assert!(win.start <= p && p < win.end(), "window holds the fault");
                assert_eq!(win.start % win.pages, 0, "aligned");
                win.pages
            })
            .collect();
        assert_eq!(sizes, [16, 8, 4, 2, 2, 2]);
    }

    #[test]
    fn adaptive_aligned_windows_follow_a_sequential_scan() {
        let cfg = ra(ReadaheadMode::Adaptive, 4, 16, true);
        let mut w = ReadaheadWindow::default();
        // Fault in the middle of a block: the aligned window covers the block.
        assert_eq!(w.on_fault(&cfg, 6), Window { start: 4, pages: 4 });
        // Next fault right after: sequential, window doubles and re-aligns.
        assert_eq!(w.on_fault(&cfg, 8), Window { start: 8, pages: 8 });
        assert_eq!(
            w.on_fault(&cfg, 16),
            Window {
                start: 16,
                pages: 16
            }
        );
        assert_eq!(
            w.on_fault(&cfg, 32),
            Window {
                start: 32,
                pages: 16
            }
        );
    }

    #[test]
    fn chunk_sizer_follows_criu() {
        let mut c = ChunkSizer::new(&Policy::criu().background);
        let sizes: Vec<u64> = (0..4).map(|_| c.take()).collect();
        assert_eq!(sizes, [16, 32, 48, 64]);
        c.on_fault();
        assert_eq!(c.take(), 16, "a fault resets to 64 KiB");
        for _ in 0..100 {
            c.take();
        }
        assert_eq!(c.take(), 1024, "capped at 4 MiB");
        let mut d = ChunkSizer::new(&Policy::default().background);
        d.on_fault();
        assert_eq!((d.take(), d.take()), (1024, 1024), "default: fixed 4 MiB");
    }

    #[test]
    fn validation_refuses_bad_numbers() {
        assert_eq!(Policy::criu().validate(), Ok(()));
        assert_eq!(Policy::default().validate(), Ok(()));
        let mut p = Policy::default();
        p.readahead.min_pages = 0;
        assert!(matches!(p.validate(), Err(PolicyError::Readahead { .. })));
        let mut p = Policy::default();
        p.readahead.max_pages = 5000;
        assert!(matches!(
            p.validate(),
            Err(PolicyError::ReadaheadTooLarge { .. })
        ));
        let p = Policy::default().with_fixed_chunk(100);
        assert!(matches!(p.validate(), Err(PolicyError::Chunk { .. })));
        let mut p = Policy::default();
        p.prefetch.push(PrefetchPlan {
            pid: 3,
            ranges: vec![PrefetchRange {
                start: 0x1001,
                pages: 1,
            }],
        });
        let e = p.validate().unwrap_err();
        assert!(e.to_string().contains("pid 3"), "{e}");
    }

    #[test]
    fn names_round_trip() {
        for m in [
            ReadaheadMode::Off,
            ReadaheadMode::Fixed,
            ReadaheadMode::Adaptive,
        ] {
            assert_eq!(ReadaheadMode::parse(m.as_str()), Some(m));
        }
        for o in [
            BackgroundOrder::LowestAddress,
            BackgroundOrder::RoundRobin,
            BackgroundOrder::NearFaults,
        ] {
            assert_eq!(BackgroundOrder::parse(o.as_str()), Some(o));
        }
        for t in [TaskOrder::OneAfterAnother, TaskOrder::Interleaved] {
            assert_eq!(TaskOrder::parse(t.as_str()), Some(t));
        }
        for t in [CopyThread::Loop, CopyThread::Copier] {
            assert_eq!(CopyThread::parse(t.as_str()), Some(t));
        }
        assert_eq!(ReadaheadMode::parse("bogus"), None);
    }
}
