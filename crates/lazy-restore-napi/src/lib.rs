//! Node binding for lazy-restore-core. Conversion only: no logic lives here.
//!
//! The engine runs on its own thread; events reach JS through a non-blocking threadsafe
//! function (a slow JS side never blocks the engine), and joining happens on the libuv pool.
//! Errors become JS `Error`s whose `code` is the core's [`EngineError::code`] and whose
//! `killed` lists the host pids killed because of the failure.

use lazy_restore_core::{
    Background, BackgroundOrder, CopyThread, Engine, EngineConfig, EngineControl, EngineError,
    EngineEvent, EngineHandle, LatencySummary, Policy, PrefetchPlan, PrefetchRange, RangePlan, Readahead,
    ReadaheadMode, Report, Snapshot, TaskOrder, TaskPlan, TaskStats, Totals,
};
use napi::bindgen_prelude::{AsyncTask, BigInt};
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::{Env, JsValue, Task};
use napi_derive::napi;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

/// Our page server (`lazy-restore page-server`), kept apart from the engine binding.
mod remote;

/// The core crate's version.
#[napi]
pub fn core_version() -> String {
    lazy_restore_core::VERSION.to_string()
}

/// What this kernel's userfaultfd supports.
#[napi(object)]
pub struct UffdCapabilities {
    /// Feature bits as a hex string (they do not fit a JS number safely).
    pub features_hex: String,
    pub ioctls_hex: String,
    pub features: Vec<String>,
    pub ioctls: Vec<String>,
    /// True when fork, remap, remove and unmap events are all available.
    pub criu_noncoop: bool,
}

/// Probes userfaultfd. Throws with the OS error (e.g. EPERM without privilege).
#[napi]
pub fn probe_uffd() -> napi::Result<UffdCapabilities> {
    let caps = lazy_restore_core::probe::probe()
        .map_err(|e| napi::Error::from_reason(format!("userfaultfd probe failed: {e}")))?;
    Ok(UffdCapabilities {
        features_hex: format!("{:#x}", caps.features),
        ioctls_hex: format!("{:#x}", caps.ioctls),
        features: caps.feature_names.iter().map(|s| s.to_string()).collect(),
        ioctls: caps.ioctl_names.iter().map(|s| s.to_string()).collect(),
        criu_noncoop: caps.criu_noncoop,
    })
}

// ---- config (JS → Rust) -----------------------------------------------------------------

/// One lazy range: `start` is the image (dump-time) address, page aligned.
#[napi(object)]
pub struct NativeRangePlan {
    pub start: BigInt,
    pub pages: i64,
    /// Index into `NativeEngineConfig.files`.
    pub file: u32,
    /// Byte offset of the first page in that file.
    pub offset: BigInt,
}

/// One task of pstree.img and its lazy ranges (sorted, disjoint).
#[napi(object)]
pub struct NativeTaskPlan {
    pub pid: i32,
    pub ranges: Vec<NativeRangePlan>,
}

/// Fault readahead: the faulting page plus a window, clipped to the range and to pending
/// pages, installed with DONTWAKE and one wake-up.
#[napi(object)]
pub struct NativeReadahead {
    /// off: one page per fault; fixed: always maxPages; adaptive: per task, x2 (up to maxPages)
    /// when a fault follows the previous window, /2 (down to minPages) when not.
    #[napi(ts_type = "'off' | 'fixed' | 'adaptive'")]
    pub mode: String,
    pub min_pages: u32,
    pub max_pages: u32,
    /// The window is the window-sized aligned block holding the fault.
    pub align: bool,
}

/// Background copy of pages nobody faulted on (after the restore-finished word).
#[napi(object)]
pub struct NativeBackground {
    /// First chunk of a task and what a fault resets it to (criu: 64 KiB).
    pub start_chunk_bytes: u32,
    /// Added after each chunk (criu: 64 KiB; 0 = fixed size).
    pub grow_bytes: u32,
    /// Cap (criu: 4 MiB).
    pub max_chunk_bytes: u32,
    pub reset_on_fault: bool,
    #[napi(ts_type = "'lowest-address' | 'round-robin' | 'near-faults'")]
    pub order: String,
    #[napi(ts_type = "'one-after-another' | 'interleaved'")]
    pub tasks: String,
    /// loop: chunks copied between polls in the fault loop; copier: a thread of its own (a fault
    /// never waits for a chunk).
    #[napi(ts_type = "'loop' | 'copier'")]
    pub thread: String,
    /// Loop thread: handle every ready event before each chunk (criu). Otherwise one read per
    /// ready userfaultfd per chunk, so a fault storm cannot starve the background.
    pub drain_before_chunk: bool,
    /// Background chunks (not prefetch) start this many ms after the finished word (default 0).
    pub start_delay_ms: Option<u32>,
}

/// One run of the working set: image address (page aligned) and length in pages.
#[napi(object)]
pub struct NativePrefetchRange {
    pub start: BigInt,
    pub pages: i64,
}

/// The working set of one pstree pid, in install order.
#[napi(object)]
pub struct NativePrefetchTask {
    pub pid: i32,
    pub ranges: Vec<NativePrefetchRange>,
}

/// How pages move. Priority: faults (with their readahead) > prefetch > background.
#[napi(object)]
pub struct NativePolicy {
    /// Reported back as `report.policy`.
    pub name: String,
    pub readahead: NativeReadahead,
    pub background: NativeBackground,
    /// Pages to install first once the restore finished, in this order, per pstree pid.
    pub prefetch: Option<Vec<NativePrefetchTask>>,
    /// Record each task's first-need order (`report.tasks[i].faultTrace`).
    pub record_faults: Option<bool>,
}

fn to_policy(p: NativePolicy) -> Result<Policy, String> {
    let bad = |what: &str, v: &str| format!("policy '{}': unknown {what} '{v}'", p.name);
    let r = &p.readahead;
    let b = &p.background;
    let readahead = Readahead {
        mode: ReadaheadMode::parse(&r.mode).ok_or_else(|| bad("readahead.mode", &r.mode))?,
        min_pages: r.min_pages,
        max_pages: r.max_pages,
        align: r.align,
    };
    let background = Background {
        start_chunk_bytes: u64::from(b.start_chunk_bytes),
        grow_bytes: u64::from(b.grow_bytes),
        max_chunk_bytes: u64::from(b.max_chunk_bytes),
        reset_on_fault: b.reset_on_fault,
        order: BackgroundOrder::parse(&b.order).ok_or_else(|| bad("background.order", &b.order))?,
        tasks: TaskOrder::parse(&b.tasks).ok_or_else(|| bad("background.tasks", &b.tasks))?,
        thread: CopyThread::parse(&b.thread).ok_or_else(|| bad("background.thread", &b.thread))?,
        drain_before_chunk: b.drain_before_chunk,
        start_delay: Duration::from_millis(u64::from(b.start_delay_ms.unwrap_or(0))),
    };
    let prefetch = p
        .prefetch
        .iter()
        .flatten()
        .map(|t| {
            let pid = t.pid;
            let ranges = t
                .ranges
                .iter()
                .map(|r| {
                    let pages = u64::try_from(r.pages).map_err(|_| {
                        format!("prefetch of pid {pid}: page count {} is negative", r.pages)
                    })?;
                    Ok(PrefetchRange {
                        start: u64_of(&r.start, "prefetch start", pid)?,
                        pages,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok(PrefetchPlan { pid, ranges })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Policy {
        name: p.name,
        readahead,
        background,
        prefetch,
        record_faults: p.record_faults.unwrap_or(false),
    })
}

/// What the engine serves. Omitted options take the core's defaults (the `default` policy,
/// uid 0, kill on fatal, 100 ms progress).
#[napi(object)]
pub struct NativeEngineConfig {
    /// Path of `lazy-pages.socket` (unlinked, then bound with mode 0600).
    pub socket_path: String,
    pub tasks: Vec<NativeTaskPlan>,
    /// Page files referenced by `NativeRangePlan.file`.
    pub files: Vec<String>,
    /// A fixed background chunk size: overrides the policy's start/grow/max chunk sizes.
    pub chunk_bytes: Option<u32>,
    pub allowed_uids: Option<Vec<u32>>,
    pub kill_on_fatal: Option<bool>,
    pub progress_interval_ms: Option<u32>,
    /// Absolute path of `lazy-restore-guardian`: started with the engine, it holds every
    /// userfaultfd too, so a daemon that dies mid-transfer gets the restored tree killed
    /// instead of running on zero pages. Absent: no guardian. Ignored when killOnFatal is false.
    pub guardian_path: Option<String>,
    /// The transfer policy; absent: the core's `default` policy.
    pub policy: Option<NativePolicy>,
    /// Pages from a page server instead of `files`: plan ranges then name file = task index
    /// (into `remote.pids`) and offset = image address.
    pub remote: Option<remote::NativeRemoteSource>,
}

pub(crate) fn u64_of(b: &BigInt, what: &str, pid: i32) -> Result<u64, String> {
    let (negative, value, lossless) = b.get_u64();
    if negative || !lossless {
        return Err(format!(
            "task {pid}: range {what} must be a BigInt in 0..2^64"
        ));
    }
    Ok(value)
}

/// The plan's tasks, or what is wrong with them.
pub(crate) fn task_plans(tasks: &[NativeTaskPlan]) -> Result<Vec<TaskPlan>, String> {
    tasks
        .iter()
        .map(|t| {
            let pid = t.pid;
            let ranges = t
                .ranges
                .iter()
                .map(|r| {
                    let pages = u64::try_from(r.pages).map_err(|_| {
                        format!("task {pid}: range page count {} is negative", r.pages)
                    })?;
                    Ok(RangePlan {
                        start: u64_of(&r.start, "start", pid)?,
                        pages,
                        file: r.file,
                        offset: u64_of(&r.offset, "offset", pid)?,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok(TaskPlan { pid, ranges })
        })
        .collect()
}

/// A config, or the error code ('PLAN_INVALID' | 'POLICY_INVALID') and message.
fn to_config(c: NativeEngineConfig) -> Result<EngineConfig, (&'static str, String)> {
    let tasks = task_plans(&c.tasks).map_err(|m| ("PLAN_INVALID", m))?;
    let mut cfg = EngineConfig::new(
        PathBuf::from(c.socket_path),
        tasks,
        c.files.into_iter().map(PathBuf::from).collect(),
    );
    if let Some(p) = c.policy {
        cfg.policy = to_policy(p).map_err(|m| ("POLICY_INVALID", m))?;
    }
    if let Some(b) = c.chunk_bytes {
        cfg.policy = cfg.policy.with_fixed_chunk(u64::from(b));
    }
    if let Some(u) = c.allowed_uids {
        cfg.allowed_uids = u;
    }
    if let Some(k) = c.kill_on_fatal {
        cfg.kill_on_fatal = k;
    }
    if let Some(ms) = c.progress_interval_ms {
        cfg.progress_interval = Duration::from_millis(u64::from(ms));
    }
    cfg.guardian = c.guardian_path.map(PathBuf::from);
    Ok(cfg)
}

// ---- telemetry (Rust → JS) --------------------------------------------------------------

/// u64 counters and µs as JS numbers (exact up to 2^53).
pub(crate) fn num(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Counters of one served task (forked children keep their parent's image pid).
#[napi(object)]
#[derive(Clone)]
pub struct NativeTaskStats {
    pub image_pid: i32,
    /// 0 for a task of the plan, 1.. for children it forked after restore.
    pub child_index: u32,
    pub host_pid: Option<i32>,
    pub zombie: bool,
    pub pages_planned: i64,
    pub pages_fault: i64,
    pub pages_background: i64,
    /// Pages installed with a fault's readahead window (besides the faulting page).
    pub pages_readahead: i64,
    /// Pages installed from the policy's prefetch list.
    pub pages_prefetch: i64,
    pub pages_zero: i64,
    /// Pending pages found already present (EEXIST).
    pub pages_present: i64,
    /// Pending pages unmapped, removed (MADV_DONTNEED) or overwritten by mremap.
    pub pages_dropped: i64,
    /// Pending pages abandoned because the task exited.
    pub pages_orphaned: i64,
    pub pages_pending: i64,
    pub bytes_copied: i64,
    pub faults: i64,
    pub eagain_retries: i64,
    pub exited: bool,
    pub first_fault_us: Option<i64>,
    pub done_us: Option<i64>,
    /// This task's fault service latency.
    pub fault_latency: NativeLatency,
    /// Report only, when the policy records faults: image address and time of each fault
    /// served from the page source, in first-need order.
    pub fault_trace: Option<Vec<NativeTracedFault>>,
    /// Faults left out of `faultTrace` because it was full (1Mi entries).
    pub fault_trace_truncated: Option<i64>,
}

/// One recorded fault.
#[napi(object)]
#[derive(Clone)]
pub struct NativeTracedFault {
    /// Image address of the faulting page.
    pub addr: BigInt,
    /// µs since engine start.
    pub at_us: i64,
}

/// One point of the bytes-over-time series.
#[napi(object)]
pub struct NativeSeriesPoint {
    /// µs since engine start.
    pub at_us: i64,
    /// Cumulative bytes installed.
    pub bytes: i64,
}

impl From<&TaskStats> for NativeTaskStats {
    fn from(s: &TaskStats) -> Self {
        Self {
            image_pid: s.image_pid,
            child_index: s.child_index,
            host_pid: s.host_pid,
            zombie: s.zombie,
            pages_planned: num(s.pages_planned),
            pages_fault: num(s.pages_fault),
            pages_background: num(s.pages_background),
            pages_readahead: num(s.pages_readahead),
            pages_prefetch: num(s.pages_prefetch),
            pages_zero: num(s.pages_zero),
            pages_present: num(s.pages_present),
            pages_dropped: num(s.pages_dropped),
            pages_orphaned: num(s.pages_orphaned),
            pages_pending: num(s.pages_pending),
            bytes_copied: num(s.bytes_copied),
            faults: num(s.faults),
            eagain_retries: num(s.eagain_retries),
            exited: s.exited,
            first_fault_us: s.first_fault_us.map(num),
            done_us: s.done_us.map(num),
            fault_latency: (&s.fault_latency).into(),
            fault_trace: None,
            fault_trace_truncated: None,
        }
    }
}

/// Sums over all tasks.
#[napi(object)]
#[derive(Clone)]
pub struct NativeTotals {
    pub tasks: u32,
    pub tasks_done: u32,
    pub tasks_exited: u32,
    pub pages_planned: i64,
    pub pages_fault: i64,
    pub pages_background: i64,
    pub pages_readahead: i64,
    pub pages_prefetch: i64,
    pub pages_zero: i64,
    pub pages_present: i64,
    pub pages_dropped: i64,
    pub pages_orphaned: i64,
    pub pages_pending: i64,
    pub bytes_copied: i64,
    pub faults: i64,
    pub eagain_retries: i64,
}

impl From<&Totals> for NativeTotals {
    fn from(t: &Totals) -> Self {
        Self {
            tasks: t.tasks,
            tasks_done: t.tasks_done,
            tasks_exited: t.tasks_exited,
            pages_planned: num(t.pages_planned),
            pages_fault: num(t.pages_fault),
            pages_background: num(t.pages_background),
            pages_readahead: num(t.pages_readahead),
            pages_prefetch: num(t.pages_prefetch),
            pages_zero: num(t.pages_zero),
            pages_present: num(t.pages_present),
            pages_dropped: num(t.pages_dropped),
            pages_orphaned: num(t.pages_orphaned),
            pages_pending: num(t.pages_pending),
            bytes_copied: num(t.bytes_copied),
            faults: num(t.faults),
            eagain_retries: num(t.eagain_retries),
        }
    }
}

/// Milestones, µs since engine start.
#[napi(object)]
pub struct NativeTimeline {
    pub connect_us: Option<i64>,
    pub all_uffds_us: Option<i64>,
    pub finished_us: Option<i64>,
    pub done_us: Option<i64>,
    pub finish_fast_us: Option<i64>,
    /// Every prefetch page of every task installed (absent without a prefetch list).
    pub prefetch_done_us: Option<i64>,
}

/// Fault service latency (uffd message read → ioctl return). Percentiles are the upper bound
/// of their eighth of a power of two (at most 12.5% high), capped at the max.
#[napi(object)]
#[derive(Clone)]
pub struct NativeLatency {
    pub count: i64,
    pub p50_us: i64,
    pub p90_us: i64,
    pub p99_us: i64,
    pub max_us: i64,
    pub mean_us: i64,
    /// buckets[0]: < 1 µs; buckets[i]: [2^(i-1), 2^i) µs.
    pub buckets: Vec<i64>,
}

impl From<&LatencySummary> for NativeLatency {
    fn from(l: &LatencySummary) -> Self {
        Self {
            count: num(l.count),
            p50_us: num(l.p50_us),
            p90_us: num(l.p90_us),
            p99_us: num(l.p99_us),
            max_us: num(l.max_us),
            mean_us: num(l.mean_us),
            buckets: l.buckets.iter().copied().map(num).collect(),
        }
    }
}

/// Engine thread CPU time.
#[napi(object)]
pub struct NativeCpuTime {
    pub user_us: i64,
    pub sys_us: i64,
}

/// What a remote page source did.
#[napi(object)]
pub struct NativeSourceStats {
    /// e.g. "lazy-restore page-server 10.0.0.1:7070", "CRIU page server 10.0.0.1:27".
    pub name: String,
    /// Requests for faults and their readahead windows.
    pub urgent_requests: i64,
    /// Background requests (bulk streams, or CRIU GETs).
    pub bulk_requests: i64,
    /// Page bytes received.
    pub page_bytes: i64,
    /// What they took on the wire (less with lz4; CRIU: with headers).
    pub wire_bytes: i64,
    pub reconnects: i64,
}

/// The connecting `criu restore` (SO_PEERCRED).
#[napi(object)]
#[derive(Clone, Copy)]
pub struct NativePeer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

macro_rules! snapshot_object {
    ($doc:literal, $name:ident) => {
        #[doc = $doc]
        #[napi(object)]
        pub struct $name {
            #[napi(ts_type = "'handoff' | 'faults-only' | 'background' | 'done'")]
            pub phase: String,
            pub elapsed_us: i64,
            pub totals: NativeTotals,
            pub tasks: Vec<NativeTaskStats>,
            pub timeline: NativeTimeline,
            pub fault_latency: NativeLatency,
            /// Faults served per CPU index (the engine thread's CPU when it served them).
            pub faults_per_cpu: Vec<i64>,
            pub cpu_time: NativeCpuTime,
            pub peer: Option<NativePeer>,
            /// The policy's name.
            pub policy: String,
            /// Cumulative bytes installed, sampled about every 10 ms (at most 2000 points:
            /// thinned out as the run goes on).
            pub series: Vec<NativeSeriesPoint>,
            /// A remote page source's account (absent for local page files).
            pub source: Option<NativeSourceStats>,
        }

        impl From<&Snapshot> for $name {
            fn from(s: &Snapshot) -> Self {
                let l = &s.fault_latency;
                let t = &s.timeline;
                let mut tasks: Vec<NativeTaskStats> = s.tasks.iter().map(Into::into).collect();
                // Traces come in task order, one per task, only in the final report.
                for (t, tr) in tasks.iter_mut().zip(&s.fault_traces) {
                    t.fault_trace = Some(
                        tr.faults
                            .iter()
                            .map(|f| NativeTracedFault {
                                addr: BigInt::from(f.addr),
                                at_us: num(f.at_us),
                            })
                            .collect(),
                    );
                    t.fault_trace_truncated = Some(num(tr.truncated));
                }
                Self {
                    phase: s.phase.as_str().to_string(),
                    elapsed_us: num(s.elapsed_us),
                    totals: (&s.totals).into(),
                    tasks,
                    timeline: NativeTimeline {
                        connect_us: t.connect_us.map(num),
                        all_uffds_us: t.all_uffds_us.map(num),
                        finished_us: t.finished_us.map(num),
                        done_us: t.done_us.map(num),
                        finish_fast_us: t.finish_fast_us.map(num),
                        prefetch_done_us: t.prefetch_done_us.map(num),
                    },
                    fault_latency: l.into(),
                    faults_per_cpu: s.faults_per_cpu.iter().copied().map(num).collect(),
                    cpu_time: NativeCpuTime {
                        user_us: num(s.cpu_time.user_us),
                        sys_us: num(s.cpu_time.sys_us),
                    },
                    peer: s.peer.map(|p| NativePeer {
                        pid: p.pid,
                        uid: p.uid,
                        gid: p.gid,
                    }),
                    policy: s.policy.clone(),
                    series: s
                        .series
                        .iter()
                        .map(|p| NativeSeriesPoint {
                            at_us: num(p.at_us),
                            bytes: num(p.bytes),
                        })
                        .collect(),
                    source: s.source.as_ref().map(|x| NativeSourceStats {
                        name: x.name.clone(),
                        urgent_requests: num(x.urgent_requests),
                        bulk_requests: num(x.bulk_requests),
                        page_bytes: num(x.page_bytes),
                        wire_bytes: num(x.wire_bytes),
                        reconnects: num(x.reconnects),
                    }),
                }
            }
        }
    };
}

snapshot_object!(
    "Live numbers, as of the engine's last publication (every progress tick, phase change, task completion, and the end).",
    NativeSnapshot
);
snapshot_object!("The final account of a successful run.", NativeReport);

/// An engine event. `kind` says which fields are set:
/// connected (peer) · task-received (pid, zombie) · task-forked (imagePid, parentIndex,
/// childIndex) · phase (phase) · progress (phase, totals, tasks) · task-done (task) ·
/// warning (message) · end (error, code: both absent on success).
#[napi(object)]
pub struct NativeEvent {
    #[napi(
        ts_type = "'connected' | 'task-received' | 'task-forked' | 'phase' | 'progress' | 'task-done' | 'warning' | 'end'"
    )]
    pub kind: String,
    /// µs since engine start.
    pub at_us: i64,
    pub peer: Option<NativePeer>,
    pub pid: Option<i32>,
    pub zombie: Option<bool>,
    pub image_pid: Option<i32>,
    pub parent_index: Option<u32>,
    pub child_index: Option<u32>,
    #[napi(ts_type = "'handoff' | 'faults-only' | 'background' | 'done'")]
    pub phase: Option<String>,
    pub totals: Option<NativeTotals>,
    pub tasks: Option<Vec<NativeTaskStats>>,
    pub task: Option<NativeTaskStats>,
    pub message: Option<String>,
    pub error: Option<String>,
    pub code: Option<String>,
}

impl NativeEvent {
    fn new(kind: &str, at_us: u64) -> Self {
        Self {
            kind: kind.to_string(),
            at_us: num(at_us),
            peer: None,
            pid: None,
            zombie: None,
            image_pid: None,
            parent_index: None,
            child_index: None,
            phase: None,
            totals: None,
            tasks: None,
            task: None,
            message: None,
            error: None,
            code: None,
        }
    }
}

impl From<EngineEvent> for NativeEvent {
    fn from(e: EngineEvent) -> Self {
        match e {
            EngineEvent::Connected { at_us, peer } => NativeEvent {
                peer: Some(NativePeer {
                    pid: peer.pid,
                    uid: peer.uid,
                    gid: peer.gid,
                }),
                ..Self::new("connected", at_us)
            },
            EngineEvent::TaskReceived { at_us, pid, zombie } => NativeEvent {
                pid: Some(pid),
                zombie: Some(zombie),
                ..Self::new("task-received", at_us)
            },
            EngineEvent::TaskForked {
                at_us,
                image_pid,
                parent_index,
                child_index,
            } => NativeEvent {
                image_pid: Some(image_pid),
                parent_index: Some(parent_index),
                child_index: Some(child_index),
                ..Self::new("task-forked", at_us)
            },
            EngineEvent::Phase { at_us, phase } => NativeEvent {
                phase: Some(phase.as_str().to_string()),
                ..Self::new("phase", at_us)
            },
            EngineEvent::Progress {
                at_us,
                phase,
                totals,
                tasks,
            } => NativeEvent {
                phase: Some(phase.as_str().to_string()),
                totals: Some((&totals).into()),
                tasks: Some(tasks.iter().map(Into::into).collect()),
                ..Self::new("progress", at_us)
            },
            EngineEvent::TaskDone { at_us, task } => NativeEvent {
                task: Some((&task).into()),
                ..Self::new("task-done", at_us)
            },
            EngineEvent::Warning { at_us, message } => NativeEvent {
                message: Some(message),
                ..Self::new("warning", at_us)
            },
            EngineEvent::End { at_us, error, code } => NativeEvent {
                error,
                code: code.map(str::to_string),
                ..Self::new("end", at_us)
            },
        }
    }
}

// ---- errors -------------------------------------------------------------------------------

/// An engine failure in a form that can cross threads and become a JS error.
pub struct Failure {
    message: String,
    code: String,
    killed: Vec<i32>,
}

impl From<&EngineError> for Failure {
    fn from(e: &EngineError) -> Self {
        Self {
            message: e.to_string(),
            code: e.code().to_string(),
            killed: e.killed().to_vec(),
        }
    }
}

impl Failure {
    fn new(code: &str, message: String) -> Self {
        Self {
            message,
            code: code.to_string(),
            killed: Vec::new(),
        }
    }

    /// A JS `Error` with `code` and `killed` set, ready to throw or reject with.
    fn into_js(self, env: &Env) -> napi::Error {
        let build = || -> napi::Result<napi::Error> {
            let mut obj = env.create_error(napi::Error::from_reason(self.message.clone()))?;
            obj.set("code", self.code.as_str())?;
            obj.set("killed", self.killed.clone())?;
            Ok(napi::Error::from(obj.to_unknown()))
        };
        build().unwrap_or_else(|_| {
            napi::Error::from_reason(format!("{} [{}]", self.message, self.code))
        })
    }
}

// ---- the engine class ---------------------------------------------------------------------

/// A running lazy-pages engine. `start` binds the socket before it returns.
#[napi]
pub struct NativeEngine {
    control: EngineControl,
    handle: Mutex<Option<EngineHandle>>,
}

#[napi]
impl NativeEngine {
    /// Validates the plan, binds and listens on the socket, and starts serving on the engine's
    /// own thread. `onEvent` receives batched events (never one per fault). Throws an Error with
    /// `code` (e.g. 'PLAN_INVALID', 'SOURCE_OPEN', 'HANDOFF_LISTEN', 'GUARDIAN_START').
    #[napi(factory)]
    pub fn start(
        env: Env,
        mut config: NativeEngineConfig,
        on_event: ThreadsafeFunction<NativeEvent>,
    ) -> napi::Result<Self> {
        let remote_source = config.remote.take();
        let cfg = to_config(config).map_err(|(code, m)| Failure::new(code, m).into_js(&env))?;
        let sink = Box::new(move |e: EngineEvent| {
            // Non-blocking: if JS lags, events queue; the engine never waits for JS.
            let _ = on_event.call(
                Ok(NativeEvent::from(e)),
                ThreadsafeFunctionCallMode::NonBlocking,
            );
        });
        let handle = match remote_source {
            None => Engine::start(cfg, sink),
            Some(r) => {
                let source = remote::connect_source(r)
                    .map_err(|(code, m)| Failure::new(code, m).into_js(&env))?;
                Engine::start_with_source(cfg, source, sink)
            }
        }
        .map_err(|e| Failure::from(&e).into_js(&env))?;
        Ok(Self {
            control: handle.control(),
            handle: Mutex::new(Some(handle)),
        })
    }

    /// Live counters; cheap.
    #[napi]
    pub fn stats(&self) -> NativeSnapshot {
        (&self.control.stats()).into()
    }

    /// Copy everything that remains at full speed, then end.
    #[napi]
    pub fn finish_fast(&self) {
        self.control.finish_fast();
    }

    /// Stop now (does not wait): if pages are still missing, the restored tree is killed (when
    /// killOnFatal). `wait()` then rejects with code 'ABORTED'.
    #[napi]
    pub fn abort(&self, reason: String) {
        self.control.request_abort(reason);
    }

    /// Resolves with the report when every page is in; rejects with an Error whose `code` names
    /// the failure (e.g. 'HANDOFF_UNKNOWN_PID', 'SOURCE_SHORT_READ') and whose `killed` lists
    /// host pids killed because of it. Can be called once.
    #[napi(ts_return_type = "Promise<NativeReport>")]
    pub fn wait(&self) -> AsyncTask<WaitTask> {
        let handle = self.handle.lock().unwrap_or_else(|p| p.into_inner()).take();
        AsyncTask::new(WaitTask { handle })
    }

    /// Aborts if still running and resolves once the engine thread has ended.
    #[napi(ts_return_type = "Promise<void>")]
    pub fn close(&self) -> AsyncTask<CloseTask> {
        AsyncTask::new(CloseTask {
            control: self.control.clone(),
        })
    }
}

/// Joins the engine on the libuv pool.
pub struct WaitTask {
    handle: Option<EngineHandle>,
}

impl Task for WaitTask {
    type Output = Result<Report, Failure>;
    type JsValue = NativeReport;

    fn compute(&mut self) -> napi::Result<Self::Output> {
        Ok(match self.handle.take() {
            Some(h) => h.wait().map_err(|e| Failure::from(&e)),
            None => Err(Failure::new(
                "ALREADY_WAITED",
                "wait() was already called on this engine".into(),
            )),
        })
    }

    fn resolve(&mut self, env: Env, output: Self::Output) -> napi::Result<Self::JsValue> {
        match output {
            Ok(report) => Ok((&report).into()),
            Err(f) => Err(f.into_js(&env)),
        }
    }
}

/// Requests an abort (unless the engine already ended) and waits for the end on the libuv pool.
pub struct CloseTask {
    control: EngineControl,
}

impl Task for CloseTask {
    type Output = ();
    type JsValue = ();

    fn compute(&mut self) -> napi::Result<()> {
        if !self.control.has_ended() {
            self.control.request_abort("closed".into());
        }
        self.control.wait_ended();
        Ok(())
    }

    fn resolve(&mut self, _env: Env, _output: ()) -> napi::Result<()> {
        Ok(())
    }
}
