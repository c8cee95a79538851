//! What the engine measures and reports: per-task page counters, the fault service latency
//! histogram, faults served per CPU, and the plain structs handed to the caller (progress
//! events, [`Snapshot`], [`Report`]). All times are microseconds since the engine started.

use std::time::Duration;

/// Where the engine is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Listening, or reading pid/uffd messages; faults of tasks already received are served.
    Handoff,
    /// Every uffd is here; waiting for the restore-finished word; faults only.
    FaultsOnly,
    /// Restore finished: faults first, remaining pages copied in the background.
    Background,
    /// Nothing left to fill (or the engine stopped).
    Done,
}

impl Phase {
    /// The name used in events and reports: "handoff" | "faults-only" | "background" | "done".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Handoff => "handoff",
            Self::FaultsOnly => "faults-only",
            Self::Background => "background",
            Self::Done => "done",
        }
    }
}

/// Counters of one served task (a task of the plan, or a child it forked after restore).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskStats {
    /// The pid in the images (for a forked child: its parent's image pid).
    pub image_pid: i32,
    /// 0 for a task of the plan; 1, 2, … for children forked (transitively) from it.
    pub child_index: u32,
    /// The host pid we would kill on a fatal error, when we could resolve it.
    pub host_pid: Option<i32>,
    /// The task announced itself as a zombie (no memory to serve).
    pub zombie: bool,
    /// Lazy pages to fill at the start (for a child: what its parent had pending at fork).
    pub pages_planned: u64,
    /// Pages filled because a thread faulted on them.
    pub pages_fault: u64,
    /// Pages filled by the background copier.
    pub pages_background: u64,
    /// Pages installed with a fault's readahead window (besides the faulting page).
    pub pages_readahead: u64,
    /// Pages installed from the policy's prefetch list (working-set replay).
    pub pages_prefetch: u64,
    /// Faults on pages outside the pending set, answered with a zero page.
    pub pages_zero: u64,
    /// Pending pages found already present (EEXIST) and counted as done.
    pub pages_present: u64,
    /// Pending pages the task unmapped, removed (MADV_DONTNEED) or overwrote by mremap.
    pub pages_dropped: u64,
    /// Pending pages abandoned because the task exited.
    pub pages_orphaned: u64,
    /// Pages still pending now.
    pub pages_pending: u64,
    /// Bytes written into the task with UFFDIO_COPY.
    pub bytes_copied: u64,
    /// Page-fault messages received.
    pub faults: u64,
    /// COPY/ZEROPAGE attempts that returned EAGAIN and were retried.
    pub eagain_retries: u64,
    /// The task exited (ESRCH) while being served.
    pub exited: bool,
    /// First fault, µs since engine start.
    pub first_fault_us: Option<u64>,
    /// When nothing was left pending for this task, µs since engine start.
    pub done_us: Option<u64>,
    /// This task's fault service latency (read of the fault message to its wake).
    pub fault_latency: LatencySummary,
}

/// Sums over all tasks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub tasks: u32,
    pub tasks_done: u32,
    pub tasks_exited: u32,
    pub pages_planned: u64,
    pub pages_fault: u64,
    pub pages_background: u64,
    pub pages_readahead: u64,
    pub pages_prefetch: u64,
    pub pages_zero: u64,
    pub pages_present: u64,
    pub pages_dropped: u64,
    pub pages_orphaned: u64,
    pub pages_pending: u64,
    pub bytes_copied: u64,
    pub faults: u64,
    pub eagain_retries: u64,
}

impl Totals {
    /// Adds up `tasks`.
    pub fn of(tasks: &[TaskStats]) -> Self {
        let mut t = Totals {
            tasks: tasks.len() as u32,
            ..Default::default()
        };
        for s in tasks {
            t.tasks_done += u32::from(s.done_us.is_some());
            t.tasks_exited += u32::from(s.exited);
            t.pages_planned += s.pages_planned;
            t.pages_fault += s.pages_fault;
            t.pages_background += s.pages_background;
            t.pages_readahead += s.pages_readahead;
            t.pages_prefetch += s.pages_prefetch;
            t.pages_zero += s.pages_zero;
            t.pages_present += s.pages_present;
            t.pages_dropped += s.pages_dropped;
            t.pages_orphaned += s.pages_orphaned;
            t.pages_pending += s.pages_pending;
            t.bytes_copied += s.bytes_copied;
            t.faults += s.faults;
            t.eagain_retries += s.eagain_retries;
        }
        t
    }
}

/// Milestones, µs since engine start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timeline {
    /// `criu restore` connected (an accepted peer).
    pub connect_us: Option<u64>,
    /// The last pid/uffd message arrived.
    pub all_uffds_us: Option<u64>,
    /// The restore-finished word arrived.
    pub finished_us: Option<u64>,
    /// Nothing left pending.
    pub done_us: Option<u64>,
    /// `finish_fast` was requested.
    pub finish_fast_us: Option<u64>,
    /// Every prefetch page of every task was installed (or is no longer needed). `None`
    /// without a prefetch list.
    pub prefetch_done_us: Option<u64>,
}

/// One point of the bytes-over-time series: cumulative bytes installed at `at_us`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeriesPoint {
    pub at_us: u64,
    pub bytes: u64,
}

/// Most points a [`Series`] keeps; past that it drops every other point and samples half as
/// often, so its length stays bounded however long the run.
pub const SERIES_MAX_POINTS: usize = 2000;

/// Cumulative bytes installed, sampled about every `interval_us` (10 ms to start with).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Series {
    points: Vec<SeriesPoint>,
    interval_us: u64,
}

impl Default for Series {
    fn default() -> Self {
        Self {
            points: Vec::new(),
            interval_us: 10_000,
        }
    }
}

impl Series {
    /// Records `bytes` at `at_us` if the last point is at least one interval old (or `force`).
    pub fn sample(&mut self, at_us: u64, bytes: u64, force: bool) {
        if let Some(last) = self.points.last_mut() {
            if last.bytes == bytes && !force {
                // Flat: move nothing, the next change records where the flat part ended.
                return;
            }
            if at_us < last.at_us + self.interval_us && !force {
                return;
            }
            if last.at_us == at_us {
                last.bytes = bytes;
                return;
            }
        }
        self.points.push(SeriesPoint { at_us, bytes });
        if self.points.len() > SERIES_MAX_POINTS {
            let mut i = 0;
            // Keep the first and the newest point, every other one between.
            let last = self.points.len() - 1;
            self.points.retain(|_| {
                i += 1;
                (i - 1) % 2 == 0 || i - 1 == last
            });
            self.interval_us *= 2;
        }
    }

    /// Records the end of a flat stretch: `bytes` (unchanged) just before a change at `at_us`.
    pub fn mark_flat_until(&mut self, at_us: u64, bytes: u64) {
        if let Some(last) = self.points.last() {
            if last.bytes == bytes && at_us >= last.at_us + self.interval_us {
                self.points.push(SeriesPoint { at_us, bytes });
            }
        }
    }

    /// The points, oldest first.
    pub fn points(&self) -> &[SeriesPoint] {
        &self.points
    }
}

/// One fault served from the page source: the faulting page's image address and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TracedFault {
    pub addr: u64,
    pub at_us: u64,
}

/// Most entries a task's fault trace keeps; later faults are only counted.
pub const FAULT_TRACE_MAX: usize = 1 << 20;

/// The first-need order of one task's pages (faults only), when the policy records faults.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultTrace {
    pub image_pid: i32,
    pub child_index: u32,
    pub faults: Vec<TracedFault>,
    /// Faults not kept because the trace was full.
    pub truncated: u64,
}

/// Fault service latency distribution, summarised.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencySummary {
    /// Faults measured.
    pub count: u64,
    /// Percentiles in µs: the upper bound of the eighth of a power of two holding that rank,
    /// capped at the maximum seen (so they overstate by at most 12.5%).
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    /// Exact maximum, µs.
    pub max_us: u64,
    /// Mean, µs.
    pub mean_us: u64,
    /// `buckets[0]` counts < 1 µs; `buckets[i]` counts [2^(i-1), 2^i) µs. Trailing empty
    /// buckets are trimmed.
    pub buckets: Vec<u64>,
}

const BUCKETS: usize = 40;

/// Sub-buckets per power of two for percentiles: a percentile is the upper bound of its
/// sub-bucket, so it overstates by at most 1/8 (the reported buckets stay powers of two).
const SUB: usize = 8;

/// Power-of-two microsecond histogram (with finer sub-buckets for the percentiles).
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    buckets: [u64; BUCKETS],
    fine: Vec<u64>,
    count: u64,
    sum_ns: u128,
    max_ns: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: [0; BUCKETS],
            fine: vec![0; BUCKETS * SUB],
            count: 0,
            sum_ns: 0,
            max_ns: 0,
        }
    }
}

/// Fine bucket of `us` µs: bucket i of the powers of two ([2^(i-1), 2^i)) split in SUB equal
/// parts; below 8 µs one bucket per µs.
fn fine_index(us: u64) -> usize {
    if us < SUB as u64 {
        return us as usize;
    }
    let i = (u64::BITS - us.leading_zeros()) as usize; // us in [2^(i-1), 2^i)
    let lo = 1u64 << (i - 1);
    let part = ((us - lo) * SUB as u64 / lo) as usize;
    (i * SUB + part).min(BUCKETS * SUB - 1)
}

/// Upper bound (µs, exclusive) of fine bucket `k`.
fn fine_upper(k: usize) -> u64 {
    if k < SUB {
        return k as u64 + 1;
    }
    let (i, part) = (k / SUB, k % SUB);
    let lo = 1u64 << (i - 1);
    lo + lo * (part as u64 + 1) / SUB as u64
}

impl LatencyHistogram {
    /// Records one latency.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let us = ns / 1000;
        let idx = ((u64::BITS - us.leading_zeros()) as usize).min(BUCKETS - 1);
        self.buckets[idx] += 1;
        self.fine[fine_index(us)] += 1;
        self.count += 1;
        self.sum_ns += u128::from(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.count
    }

    fn percentile_us(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((p * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        let max_us = self.max_ns.div_ceil(1000);
        for (k, &n) in self.fine.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return fine_upper(k).min(max_us);
            }
        }
        max_us
    }

    /// The summary reported to callers.
    pub fn summary(&self) -> LatencySummary {
        let last = self
            .buckets
            .iter()
            .rposition(|&n| n > 0)
            .map_or(0, |i| i + 1);
        LatencySummary {
            count: self.count,
            p50_us: self.percentile_us(0.50),
            p90_us: self.percentile_us(0.90),
            p99_us: self.percentile_us(0.99),
            max_us: self.max_ns.div_ceil(1000),
            mean_us: if self.count == 0 {
                0
            } else {
                (self.sum_ns / u128::from(self.count) / 1000) as u64
            },
            buckets: self.buckets[..last].to_vec(),
        }
    }
}

/// CPU time the engine thread used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTime {
    pub user_us: u64,
    pub sys_us: u64,
}

/// The connecting `criu restore` process (SO_PEERCRED).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// Everything measured, as of one moment. Returned by `EngineHandle::stats`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub phase: Phase,
    /// µs since engine start when this snapshot was taken.
    pub elapsed_us: u64,
    pub totals: Totals,
    pub tasks: Vec<TaskStats>,
    pub timeline: Timeline,
    pub fault_latency: LatencySummary,
    /// `faults_per_cpu[c]` = faults served while the engine thread ran on CPU `c`.
    pub faults_per_cpu: Vec<u64>,
    pub cpu_time: CpuTime,
    pub peer: Option<Peer>,
    /// The policy's name.
    pub policy: String,
    /// Cumulative bytes installed over time (bounded length).
    pub series: Vec<SeriesPoint>,
    /// Per task fault traces (policy `record_faults`); only in the final report, empty in
    /// progress snapshots.
    pub fault_traces: Vec<FaultTrace>,
    /// A remote page source's account (None for local page files).
    pub source: Option<crate::source::SourceStats>,
}

impl Snapshot {
    /// An empty snapshot (before anything happened).
    pub fn empty() -> Self {
        Self {
            phase: Phase::Handoff,
            elapsed_us: 0,
            totals: Totals::default(),
            tasks: Vec::new(),
            timeline: Timeline::default(),
            fault_latency: LatencySummary::default(),
            faults_per_cpu: Vec::new(),
            cpu_time: CpuTime::default(),
            peer: None,
            policy: String::new(),
            series: Vec::new(),
            fault_traces: Vec::new(),
            source: None,
        }
    }
}

/// The final account of a successful run. Same fields as a [`Snapshot`] taken at the end.
pub type Report = Snapshot;

/// What the engine tells its caller, from its own thread. Progress is batched: at most one
/// `Progress` per progress interval, and only when something changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineEvent {
    /// `criu restore` connected and passed the credential check.
    Connected { at_us: u64, peer: Peer },
    /// A task's message arrived (`zombie`: negative pid, no uffd).
    TaskReceived { at_us: u64, pid: i32, zombie: bool },
    /// A served task forked; the child is served as (`image_pid`, `child_index`).
    TaskForked {
        at_us: u64,
        image_pid: i32,
        parent_index: u32,
        child_index: u32,
    },
    /// The phase changed.
    Phase { at_us: u64, phase: Phase },
    /// Cumulative counters.
    Progress {
        at_us: u64,
        phase: Phase,
        totals: Totals,
        tasks: Vec<TaskStats>,
    },
    /// A task has nothing left pending (filled, dropped, or it exited).
    TaskDone { at_us: u64, task: TaskStats },
    /// Something odd that did not stop the engine.
    Warning { at_us: u64, message: String },
    /// The engine stopped: `error` is `None` on success, else the error text and its code.
    End {
        at_us: u64,
        error: Option<String>,
        code: Option<&'static str>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_percentiles() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.summary().p99_us, 0);
        for _ in 0..90 {
            h.record(Duration::from_micros(6)); // bucket 3: [4, 8)
        }
        for _ in 0..9 {
            h.record(Duration::from_micros(40)); // bucket 6: [32, 64)
        }
        h.record(Duration::from_millis(3)); // 3000 µs: bucket 12
        h.record(Duration::from_nanos(300)); // bucket 0
        let s = h.summary();
        assert_eq!(s.count, 101);
        assert_eq!(s.buckets.len(), 13);
        assert_eq!(
            (s.buckets[0], s.buckets[3], s.buckets[6], s.buckets[12]),
            (1, 90, 9, 1)
        );
        // Percentiles come from eighths of a power of two (1 µs steps below 8 µs).
        assert_eq!(s.p50_us, 7);
        assert_eq!(s.p90_us, 7, "rank 91 of 101 is the last 6 µs sample");
        assert_eq!(s.p99_us, 44, "40 µs lies in [40, 44)");
        assert_eq!(s.max_us, 3000);
        assert!(s.mean_us >= 38 && s.mean_us <= 40, "{}", s.mean_us);
        let mut h = LatencyHistogram::default();
        h.record(Duration::from_micros(5));
        assert_eq!(h.summary().p50_us, 5, "capped at the max");
        // One round trip of the emulated link: reported within 1/8, not as the 2048 µs bucket.
        let mut h = LatencyHistogram::default();
        for us in [1250u64, 1250, 1250, 5000] {
            h.record(Duration::from_micros(us));
        }
        let s = h.summary();
        assert_eq!((s.p50_us, s.buckets[11]), (1280, 3));
        for us in [1u64, 7, 8, 9, 100, 1023, 1024, 1279, 1280, 4095, 1 << 20] {
            let k = fine_index(us);
            assert!(fine_upper(k) > us && fine_upper(k) as f64 <= (us as f64 + 1.0) * 1.125 + 1.0, "{us} -> {}", fine_upper(k));
        }
    }

    #[test]
    fn series_samples_every_interval_and_stays_bounded() {
        let mut s = Series::default();
        s.sample(0, 0, true);
        s.sample(5_000, 100, false); // too soon
        s.sample(12_000, 200, false);
        s.sample(30_000, 200, false); // flat: nothing
        s.mark_flat_until(90_000, 200);
        s.sample(100_000, 300, false);
        let p: Vec<(u64, u64)> = s.points().iter().map(|p| (p.at_us, p.bytes)).collect();
        assert_eq!(p, [(0, 0), (12_000, 200), (90_000, 200), (100_000, 300)]);
        for i in 0..100_000u64 {
            s.sample(100_000 + i * 10_000, i + 400, false);
        }
        assert!(
            s.points().len() <= SERIES_MAX_POINTS,
            "{}",
            s.points().len()
        );
        assert!(s.points().len() > SERIES_MAX_POINTS / 4);
        let last = s.points().last().copied().unwrap_or_default();
        assert!(last.bytes >= 100_000, "the newest point is kept: {last:?}");
        assert!(s.points().windows(2).all(|w| w[0].at_us < w[1].at_us));
    }

    #[test]
    fn totals_add_up() {
        let a = TaskStats {
            pages_planned: 10,
            pages_fault: 3,
            done_us: Some(5),
            ..Default::default()
        };
        let b = TaskStats {
            pages_planned: 4,
            exited: true,
            pages_orphaned: 4,
            ..Default::default()
        };
        let t = Totals::of(&[a, b]);
        assert_eq!(
            (
                t.tasks,
                t.tasks_done,
                t.tasks_exited,
                t.pages_planned,
                t.pages_orphaned
            ),
            (2, 1, 1, 14, 4)
        );
    }
}
