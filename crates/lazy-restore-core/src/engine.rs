//! The engine: one thread running one epoll loop over the CRIU socket and every task's
//! userfaultfd, executing a transfer [`Policy`](crate::policy::Policy).
//!
//! Faults go first: the faulting page plus the policy's readahead window (clipped to the
//! faulting page's range and to pages still pending), copied straight from the page source;
//! a multi-run window is installed with DONTWAKE and woken once. After the restore-finished
//! word, the policy's prefetch list is installed in order, then the remaining pages in chunks
//! sized, ordered and spread over tasks as the policy says — either in this loop, one chunk per
//! turn after draining ready events (CRIU's way), or on a copier thread ([`crate::copier`]), so
//! a fault never waits for a chunk.
//!
//! The caller gets an [`EngineHandle`] (stats, finish-fast, abort, wait) and batched events;
//! never a callback per fault.

use crate::copier::{self, Copier, CopierHandle, CopyKind, CopyLog, CopyRecord, Job, JobError};
use crate::error::EngineError;
use crate::guardian::{GuardianLink, Watch};
use crate::handoff::{self, Accepted, Handoff, Message};
use crate::plan::{self, EngineConfig};
use crate::policy::{BackgroundOrder, ChunkSizer, CopyThread, Policy, ReadaheadWindow, TaskOrder};
use crate::ranges::{PageSpan, RangeMap, RangeSeed};
use crate::source::{FileSource, PageSource, SourceError};
use crate::sys::{self, Epoll};
use crate::telemetry::{
    CpuTime, EngineEvent, FaultTrace, LatencyHistogram, Peer, Phase, Report, Series, Snapshot,
    TaskStats, Timeline, Totals, TracedFault, FAULT_TRACE_MAX,
};
use crate::tree::{self, HostProc};
use crate::uffd::{CopyError, Event, Uffd, PAGE_SIZE};
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The event callback: called on the engine thread, batched (see [`EngineEvent`]).
pub type EventSink = Box<dyn FnMut(EngineEvent) + Send>;

const TOKEN_LISTENER: u64 = 0;
const TOKEN_CONN: u64 = 1;
const TOKEN_WAKE: u64 = 2;
const TOKEN_COPIER: u64 = 3;
const TOKEN_TASK_BASE: u64 = 16;

/// How long to wait before retrying a fault or chunk that got EAGAIN (mm changing).
const EAGAIN_BACKOFF: Duration = Duration::from_micros(100);

/// State shared between the engine thread and its handle.
#[derive(Debug)]
struct Shared {
    abort: Mutex<Option<String>>,
    abort_flag: AtomicBool,
    finish_fast: AtomicBool,
    snapshot: Mutex<Snapshot>,
    ended: Mutex<bool>,
    ended_cv: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; the data (a snapshot, a reason) is fine.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts engines.
#[derive(Debug)]
pub struct Engine;

impl Engine {
    /// Page size, plan and policy checks; the bytes each file must hold.
    fn check(config: &EngineConfig) -> Result<Vec<u64>, EngineError> {
        let page = sys::page_size();
        if page != PAGE_SIZE {
            return Err(EngineError::UnsupportedPageSize { size: page });
        }
        let needed = plan::validate(config)?;
        config.policy.validate().map_err(EngineError::Policy)?;
        Ok(needed)
    }

    /// Validates the plan, opens the page files, binds and listens on the socket (so the caller
    /// can announce readiness when this returns), then serves on a thread of its own.
    pub fn start(config: EngineConfig, on_event: EventSink) -> Result<EngineHandle, EngineError> {
        let needed = Self::check(&config)?;
        let mut source = FileSource::open(&config.files).map_err(EngineError::Source)?;
        for (i, &n) in needed.iter().enumerate() {
            source.check_len(i as u32, n).map_err(EngineError::Source)?;
        }
        if config.map_page_files {
            source.map_files();
        }
        Self::start_checked(config, Arc::new(source), on_event)
    }

    /// Like [`Engine::start`], with pages from `source` (a remote page server, say) instead
    /// of `config.files`: the plan's file index and offset are whatever `source` understands.
    pub fn start_with_source(
        config: EngineConfig,
        source: Arc<dyn PageSource + Sync>,
        on_event: EventSink,
    ) -> Result<EngineHandle, EngineError> {
        Self::check(&config)?;
        Self::start_checked(config, source, on_event)
    }

    /// Starts on a config that passed [`Engine::check`].
    fn start_checked(
        config: EngineConfig,
        source: Arc<dyn PageSource + Sync>,
        on_event: EventSink,
    ) -> Result<EngineHandle, EngineError> {
        // Before the socket listens: once criu restore can connect, every uffd we receive
        // must get a second holder that outlives this process.
        let guardian = match (&config.guardian, config.kill_on_fatal) {
            (Some(path), true) => Some(GuardianLink::spawn(path)?),
            _ => None,
        };
        let listener = handoff::listen(&config.socket_path)?;
        let io_err = |what| move |source| EngineError::Io { what, source };
        let epoll = Epoll::new().map_err(io_err("creating the epoll instance"))?;
        let (wake_tx, wake_rx) = UnixStream::pair().map_err(io_err("creating the wake-up pair"))?;
        wake_tx
            .set_nonblocking(true)
            .map_err(io_err("setting up the wake-up pair"))?;
        wake_rx
            .set_nonblocking(true)
            .map_err(io_err("setting up the wake-up pair"))?;
        epoll
            .add(listener.as_fd(), TOKEN_LISTENER)
            .map_err(io_err("watching the socket"))?;
        epoll
            .add(wake_rx.as_fd(), TOKEN_WAKE)
            .map_err(io_err("watching the wake-up pair"))?;
        let copier = if config.policy.background.thread == CopyThread::Copier {
            let (poke_tx, poke_rx) =
                UnixStream::pair().map_err(io_err("creating the copier's wake-up pair"))?;
            for s in [&poke_tx, &poke_rx] {
                s.set_nonblocking(true)
                    .map_err(io_err("setting up the copier's wake-up pair"))?;
            }
            epoll
                .add(poke_rx.as_fd(), TOKEN_COPIER)
                .map_err(io_err("watching the copier"))?;
            let c = Copier::start(
                Arc::clone(&source),
                poke_tx,
                config.copier_ioctl_bytes,
                config.copy_log.clone(),
            )
            .map_err(io_err("spawning the copier thread"))?;
            Some((c, poke_rx))
        } else {
            None
        };
        let shared = Arc::new(Shared {
            abort: Mutex::new(None),
            abort_flag: AtomicBool::new(false),
            finish_fast: AtomicBool::new(false),
            snapshot: Mutex::new(Snapshot {
                policy: config.policy.name.clone(),
                ..Snapshot::empty()
            }),
            ended: Mutex::new(false),
            ended_cv: Condvar::new(),
        });
        let mut fault_loop = FaultLoop::new(
            config,
            source,
            listener,
            epoll,
            wake_rx,
            Arc::clone(&shared),
            on_event,
        );
        fault_loop.guardian = guardian;
        if let Some((c, rx)) = copier {
            fault_loop.copier_handle = Some(c.handle());
            fault_loop.copier = Some(c);
            fault_loop.copier_rx = Some(rx);
        }
        let guard = EndedGuard(Arc::clone(&shared));
        let thread = std::thread::Builder::new()
            .name("lazy-restore-engine".into())
            .spawn(move || {
                let _ended = guard;
                fault_loop.run()
            })
            .map_err(io_err("spawning the engine thread"))?;
        Ok(EngineHandle {
            control: EngineControl {
                shared,
                wake: Arc::new(wake_tx),
            },
            thread: Some(thread),
        })
    }
}

/// Control of a running engine. Dropping a handle whose engine still runs aborts it.
#[derive(Debug)]
pub struct EngineHandle {
    control: EngineControl,
    thread: Option<JoinHandle<Result<Report, EngineError>>>,
}

impl EngineHandle {
    /// The latest published numbers (refreshed at every progress tick, phase change, task
    /// completion and at the end). Cheap; callable from any thread.
    pub fn stats(&self) -> Snapshot {
        self.control.stats()
    }

    /// Asks the engine to copy everything that remains at full speed, then end.
    pub fn finish_fast(&self) {
        self.control.finish_fast();
    }

    /// Stops the engine: if pages are still outstanding the served tree is killed (when the
    /// config says so). Returns after the engine thread has ended.
    pub fn abort(&mut self, reason: String) {
        self.control.request_abort(reason);
        if let Some(t) = self.thread.take() {
            // The result is dropped: the caller asked to stop.
            let _ = t.join();
        }
    }

    /// Waits for the engine to end and returns its report or error.
    pub fn wait(mut self) -> Result<Report, EngineError> {
        match self.thread.take() {
            Some(t) => join(t),
            None => Err(EngineError::Aborted {
                reason: "the engine was already stopped".into(),
            }),
        }
    }

    /// True when the engine thread has ended (a `wait` would not block).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// A cloneable control for other threads (stats, finish-fast, abort requests), usable
    /// while another thread blocks in [`EngineHandle::wait`].
    pub fn control(&self) -> EngineControl {
        self.control.clone()
    }
}

/// Non-blocking control of an engine, cloneable and usable from any thread.
#[derive(Debug, Clone)]
pub struct EngineControl {
    shared: Arc<Shared>,
    wake: Arc<UnixStream>,
}

impl EngineControl {
    /// See [`EngineHandle::stats`].
    pub fn stats(&self) -> Snapshot {
        lock(&self.shared.snapshot).clone()
    }

    /// See [`EngineHandle::finish_fast`].
    pub fn finish_fast(&self) {
        self.shared.finish_fast.store(true, Ordering::SeqCst);
        self.poke();
    }

    /// Asks the engine to stop (killing the served tree if pages are outstanding and the config
    /// says so) without waiting for it. The first reason given wins.
    pub fn request_abort(&self, reason: String) {
        let mut slot = lock(&self.shared.abort);
        if slot.is_none() {
            *slot = Some(reason);
        }
        drop(slot);
        self.shared.abort_flag.store(true, Ordering::SeqCst);
        self.poke();
    }

    /// True once the engine thread has done all its work (uffds closed, tree killed if it had
    /// to be, end event emitted).
    pub fn has_ended(&self) -> bool {
        *lock(&self.shared.ended)
    }

    /// Blocks until [`EngineControl::has_ended`].
    pub fn wait_ended(&self) {
        let mut ended = lock(&self.shared.ended);
        while !*ended {
            ended = self
                .shared
                .ended_cv
                .wait(ended)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    fn poke(&self) {
        // A full pipe already means "wake up"; nothing else can go wrong that matters here.
        let _ = (&*self.wake).write(&[1]);
    }
}

/// Marks the engine ended when dropped, even if the engine thread unwinds.
struct EndedGuard(Arc<Shared>);

impl Drop for EndedGuard {
    fn drop(&mut self) {
        *lock(&self.0.ended) = true;
        self.0.ended_cv.notify_all();
    }
}

fn join(t: JoinHandle<Result<Report, EngineError>>) -> Result<Report, EngineError> {
    t.join().unwrap_or_else(|p| {
        Err(EngineError::Panicked {
            message: panic_message(p.as_ref()),
        })
    })
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.abort("engine handle dropped".into());
        }
    }
}

/// One served task: a task of the plan or a child forked from one.
struct Task {
    stats: TaskStats,
    /// This task's fault service latency (the engine's `latency` counts every task).
    latency: LatencyHistogram,
    uffd: Option<Uffd>,
    ranges: RangeMap,
    host: Option<HostProc>,
    /// Background copying paused until then (EAGAIN).
    backoff_until: Option<Instant>,
    /// A received task (uffd or zombie) — plan tasks start unreceived.
    received: bool,
    /// Fault readahead state (adaptive window).
    readahead: ReadaheadWindow,
    /// Background chunk size state.
    chunk: ChunkSizer,
    /// Where the next background chunk starts looking (round-robin over ranges, near-faults).
    cursor: u64,
    /// Prefetch runs still to install, in order (run-time addresses, each inside one range).
    prefetch: VecDeque<PageSpan>,
    /// Jobs of this task queued or running in the copier, and their pages not accounted yet.
    jobs: u32,
    inflight: u64,
    /// The loop's own record of what it handed the copier (job id, runs), so a fault on such
    /// a page is served without asking the copier (whose lock the fault path never takes).
    flying: Vec<(u64, VecDeque<PageSpan>)>,
    /// First-need order (policy `record_faults`).
    trace: Vec<TracedFault>,
    trace_truncated: u64,
}

impl Task {
    /// Its numbers as reported (with its fault latency summary).
    fn report(&self) -> TaskStats {
        let mut s = self.stats.clone();
        s.fault_latency = self.latency.summary();
        s
    }

    fn new(stats: TaskStats, ranges: RangeMap, policy: &Policy) -> Self {
        Self {
            stats,
            latency: LatencyHistogram::default(),
            uffd: None,
            ranges,
            host: None,
            backoff_until: None,
            received: false,
            readahead: ReadaheadWindow::default(),
            chunk: ChunkSizer::new(&policy.background),
            cursor: 0,
            prefetch: VecDeque::new(),
            jobs: 0,
            inflight: 0,
            flying: Vec::new(),
            trace: Vec::new(),
            trace_truncated: 0,
        }
    }

    fn has_background_work(&self, now: Instant) -> bool {
        self.uffd.is_some()
            && self.ranges.pending_pages() > 0
            && self.backoff_until.is_none_or(|t| now >= t)
    }
}

/// What one [`FaultLoop::install`] did.
#[derive(Debug, Default, Clone, Copy)]
struct Installed {
    /// Pages copied.
    pages: u64,
    /// Pages found already present (EEXIST).
    present: u64,
    /// Pages whose mapping is gone (ENOENT).
    dropped: u64,
    /// Stopped on EAGAIN before the end.
    again: bool,
    /// The task exited (ESRCH).
    gone: bool,
}

/// A fault whose COPY/ZEROPAGE returned EAGAIN, waiting to be retried.
struct Retry {
    task: usize,
    page: u64,
    read_at: Instant,
}

/// What became of the page a caller asked about (the faulting page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Special {
    /// Not reached (EAGAIN first) or not in this run.
    Untouched,
    /// Copied by this call.
    Installed,
    /// Already there (EEXIST) or gone (ENOENT): only a wake-up is owed.
    Present,
}

/// Most jobs queued or running in the copier: one running, one ready behind it. Four gave
/// about the same bulk rate but a never-idle copier and worse fault tails beside it (sporadic
/// faults p99 5-8 ms instead of ~2 ms on this 2-vCPU VM).
const COPIER_JOBS: u32 = 2;

/// Most runs in one copier job (a chunk over pages that faults left scattered).
const JOB_MAX_SPANS: usize = 512;

/// Moves queued spans inside run-time `[from, from+len)` to `to` (an mremap), splitting any
/// that straddle the edge.
fn remap_spans(q: &mut VecDeque<PageSpan>, from: u64, to: u64, len: u64) {
    if q.is_empty() || len == 0 {
        return;
    }
    let end = from.saturating_add(len);
    let mut out = VecDeque::with_capacity(q.len());
    for s in q.drain(..) {
        let (lo, hi) = (s.runtime, s.runtime + s.bytes());
        if hi <= from || lo >= end {
            out.push_back(s);
            continue;
        }
        let piece = |a: u64, b: u64, moved: bool| PageSpan {
            runtime: if moved { to + (a - from) } else { a },
            image: s.image + (a - lo),
            file: s.file,
            offset: s.offset + (a - lo),
            pages: (b - a) / PAGE_SIZE,
        };
        if lo < from {
            out.push_back(piece(lo, from, false));
        }
        out.push_back(piece(lo.max(from), hi.min(end), true));
        if hi > end {
            out.push_back(piece(end, hi, false));
        }
    }
    *q = out;
}

/// What happened to one fill attempt.
enum Fill {
    Done,
    Again,
    Gone,
}

/// The engine loop and all its state. Lives on the engine thread.
struct FaultLoop {
    policy: Policy,
    allowed_uids: Vec<u32>,
    kill_on_fatal: bool,
    progress_interval: Duration,
    plan_index: HashMap<i32, usize>,
    tasks: Vec<Task>,
    children_of: HashMap<i32, u32>,
    source: Arc<dyn PageSource + Sync>,
    epoll: Epoll,
    listener: Option<UnixListener>,
    handoff: Option<Handoff>,
    wake: UnixStream,
    shared: Arc<Shared>,
    on_event: EventSink,
    start: Instant,
    phase: Phase,
    timeline: Timeline,
    latency: LatencyHistogram,
    per_cpu: Vec<u64>,
    peer: Option<Peer>,
    retries: Vec<Retry>,
    rr: usize,
    /// pread buffer for a fault's window (unused with mapped page files).
    page_buf: Vec<u8>,
    /// pread buffer for an in-loop chunk (allocated on first use).
    chunk_buf: Vec<u8>,
    /// Scratch: the pending runs of a readahead window.
    runs: Vec<PageSpan>,
    events: Vec<Event>,
    /// The copier thread (policy `background.thread = copier`) and its wake-up socket.
    copier: Option<Copier>,
    copier_handle: Option<CopierHandle>,
    copier_rx: Option<UnixStream>,
    /// Jobs queued or running in the copier, all tasks; how many of them are prefetch.
    jobs: u32,
    next_job: u64,
    /// Per job in flight: pages faults took from it, and how many of those the loop copied.
    taken: HashMap<u64, (u64, u64)>,
    prefetch_jobs: u32,
    /// Prefetch pages were given (so `prefetch_done_us` will be set).
    prefetch_planned: bool,
    series: Series,
    copy_log: Option<CopyLog>,
    /// The next snapshot is the report: it carries the fault traces.
    final_report: bool,
    dirty: bool,
    last_progress: Instant,
    /// The guardian holding a second reference to every uffd (None: no guardian).
    guardian: Option<GuardianLink>,
    /// A send to the guardian failed: stop trying (each try could block), warn once.
    guardian_lost: bool,
}

impl FaultLoop {
    fn new(
        cfg: EngineConfig,
        source: Arc<dyn PageSource + Sync>,
        listener: UnixListener,
        epoll: Epoll,
        wake: UnixStream,
        shared: Arc<Shared>,
        on_event: EventSink,
    ) -> Self {
        let policy = cfg.policy;
        let mut plan_index = HashMap::new();
        let tasks: Vec<Task> = cfg
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| {
                plan_index.insert(t.pid, i);
                let ranges = RangeMap::new(t.ranges.iter().map(|r| RangeSeed {
                    start: r.start,
                    pages: r.pages,
                    file: r.file,
                    offset: r.offset,
                }));
                let stats = TaskStats {
                    image_pid: t.pid,
                    pages_planned: ranges.pending_pages(),
                    pages_pending: ranges.pending_pages(),
                    ..Default::default()
                };
                Task::new(stats, ranges, &policy)
            })
            .collect();
        let now = Instant::now();
        let window_pages = u64::from(policy.readahead.max_pages.max(1));
        let prefetch_planned = policy.prefetch.iter().any(|p| !p.ranges.is_empty());
        Self {
            allowed_uids: cfg.allowed_uids,
            kill_on_fatal: cfg.kill_on_fatal,
            progress_interval: cfg.progress_interval,
            plan_index,
            tasks,
            children_of: HashMap::new(),
            source,
            epoll,
            listener: Some(listener),
            handoff: None,
            wake,
            shared,
            on_event,
            start: now,
            phase: Phase::Handoff,
            timeline: Timeline::default(),
            latency: LatencyHistogram::default(),
            per_cpu: Vec::new(),
            peer: None,
            retries: Vec::new(),
            rr: 0,
            page_buf: vec![0; (window_pages * PAGE_SIZE) as usize],
            chunk_buf: Vec::new(),
            runs: Vec::new(),
            events: Vec::new(),
            dirty: false,
            last_progress: now,
            guardian: None,
            guardian_lost: false,
            copier: None,
            copier_handle: None,
            copier_rx: None,
            jobs: 0,
            next_job: 1,
            taken: HashMap::new(),
            prefetch_jobs: 0,
            prefetch_planned,
            series: Series::default(),
            copy_log: cfg.copy_log,
            final_report: false,
            policy,
        }
    }

    fn us(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn emit(&mut self, ev: EngineEvent) {
        (self.on_event)(ev);
    }

    /// Runs to the end, handling fatal errors (kill the tree) and publishing the last snapshot.
    fn run(mut self) -> Result<Report, EngineError> {
        let result = panic::catch_unwind(AssertUnwindSafe(|| self.serve())).unwrap_or_else(|p| {
            Err(EngineError::Panicked {
                message: panic_message(p.as_ref()),
            })
        });
        // The copier stops after its current piece; whatever it finished is accounted for.
        if let Some(mut c) = self.copier.take() {
            c.stop();
        }
        let result = match result.and_then(|()| self.on_copier()) {
            Ok(()) => {
                self.timeline.done_us = Some(self.us());
                Ok(())
            }
            Err(e) => {
                if let Some(h) = self.handoff.take() {
                    h.drain();
                }
                Err(self.fail(e))
            }
        };
        if let Err(e) = self.source.finish(result.is_ok()) {
            let at_us = self.us();
            let message = format!("the transfer is complete, but ending the page source's session failed: {e}");
            self.emit(EngineEvent::Warning { at_us, message });
        }
        self.check_done();
        self.set_phase(Phase::Done);
        // Before our uffds close: DONE lets the guardian go; with pages still missing (a
        // fatal error, an abort) it kills the tree — again, if `fail` already did.
        self.end_guardian();
        // Close every uffd: the kernel resolves any later fault itself.
        for t in &mut self.tasks {
            t.uffd = None;
        }
        // One last cumulative progress event, and the snapshot the report is made of.
        let (at_us, bytes) = (self.us(), self.bytes_installed());
        self.series.sample(at_us, bytes, true);
        self.final_report = true;
        self.progress();
        let snap = lock(&self.shared.snapshot).clone();
        let at_us = self.us();
        let end = match &result {
            Ok(()) => EngineEvent::End {
                at_us,
                error: None,
                code: None,
            },
            Err(e) => EngineEvent::End {
                at_us,
                error: Some(e.to_string()),
                code: Some(e.code()),
            },
        };
        // The callback may panic too; it must not turn a result into a lost thread.
        let _ = panic::catch_unwind(AssertUnwindSafe(|| self.emit(end)));
        result.map(|()| snap)
    }

    /// A fatal error: if any task could be running on memory we did not fill, kill the tree.
    fn fail(&mut self, cause: EngineError) -> EngineError {
        if !self.kill_on_fatal || !self.outstanding() {
            return cause;
        }
        let roots: Vec<HostProc> = self
            .tasks
            .iter()
            .filter(|t| t.received)
            .filter_map(|t| t.host)
            .collect();
        let killed = tree::kill_tree(&roots);
        EngineError::TreeKilled {
            cause: Box::new(cause),
            killed,
        }
    }

    /// True while a live task still has pages we never filled (pending, or handed to the
    /// copier and not reported done).
    fn outstanding(&self) -> bool {
        self.tasks
            .iter()
            .any(|t| t.uffd.is_some() && (t.ranges.pending_pages() > 0 || t.jobs > 0))
    }

    // ---- guardian ------------------------------------------------------------------------

    /// Hands the guardian a reference to a uffd we just got.
    fn guard(&mut self, watch: Watch, uffd: BorrowedFd<'_>) {
        let result = match (self.guardian.as_mut(), self.guardian_lost) {
            (Some(g), false) => g.watch(watch, uffd),
            _ => return,
        };
        if let Err(e) = result {
            let what = format!("taking task {}'s userfaultfd", watch.image_pid);
            self.guardian_failed(&what, e);
        }
    }

    /// A failed send: the transfer itself is fine, so it goes on, but unprotected.
    fn guardian_failed(&mut self, what: &str, e: std::io::Error) {
        self.guardian_lost = true;
        let at_us = self.us();
        let message = format!(
            "the guardian failed while {what} ({e}); if this daemon dies before every page is in, the restored processes will read zero pages"
        );
        self.emit(EngineEvent::Warning { at_us, message });
    }

    fn end_guardian(&mut self) {
        let Some(g) = self.guardian.take() else {
            return;
        };
        let complete = !self.outstanding();
        if let (Err(e), true) = (g.finish(complete), complete) {
            let at_us = self.us();
            let message = format!(
                "could not tell the guardian that every page is in ({e}); it may kill the restored tree"
            );
            self.emit(EngineEvent::Warning { at_us, message });
        }
    }

    fn serve(&mut self) -> Result<(), EngineError> {
        let mut ready = Vec::with_capacity(64);
        loop {
            if self.shared.abort_flag.load(Ordering::SeqCst) {
                let reason = lock(&self.shared.abort)
                    .clone()
                    .unwrap_or_else(|| "abort requested".into());
                return Err(EngineError::Aborted { reason });
            }
            if self.shared.finish_fast.load(Ordering::Relaxed)
                && self.timeline.finish_fast_us.is_none()
            {
                // There is no throttle to lift yet: background copying already runs flat out.
                self.timeline.finish_fast_us = Some(self.us());
                self.dirty = true;
            }
            let timeout = self.timeout();
            ready.clear();
            self.epoll
                .wait(&mut ready, 64, timeout)
                .map_err(|source| EngineError::Io {
                    what: "waiting in epoll",
                    source,
                })?;
            // Whatever was flat while we slept ends here, before anything changes.
            let (at_us, bytes) = (self.us(), self.bytes_installed());
            self.series.mark_flat_until(at_us, bytes);
            for &token in &ready {
                match token {
                    TOKEN_LISTENER => self.on_listener()?,
                    TOKEN_CONN => self.on_conn()?,
                    TOKEN_WAKE => self.drain_wake(),
                    TOKEN_COPIER => self.on_copier()?,
                    t => self.on_uffd((t - TOKEN_TASK_BASE) as usize)?,
                }
            }
            self.retry_faults()?;
            if self.phase == Phase::Background {
                if self.copier_handle.is_some() {
                    self.feed_copier();
                } else {
                    self.background_step()?;
                }
                self.check_prefetch_done();
            }
            self.check_done();
            if self.phase == Phase::Background
                && self.jobs == 0
                && self.tasks.iter().all(|t| t.ranges.pending_pages() == 0)
            {
                return Ok(());
            }
            let (at_us, bytes) = (self.us(), self.bytes_installed());
            self.series.sample(at_us, bytes, false);
            if self.dirty && self.last_progress.elapsed() >= self.progress_interval {
                self.progress();
            }
        }
    }

    /// Bytes installed so far, all tasks.
    fn bytes_installed(&self) -> u64 {
        self.tasks.iter().map(|t| t.stats.bytes_copied).sum()
    }

    fn timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        if self.phase == Phase::Background
            && self.copier_handle.is_none()
            && {
                let held = self.background_held();
                self.tasks
                    .iter()
                    .any(|t| t.has_background_work(now) && (!held || !t.prefetch.is_empty()))
            }
        {
            return Some(Duration::ZERO);
        }
        let mut t: Option<Duration> = None;
        let mut at_most = |d: Duration| t = Some(t.map_or(d, |x| x.min(d)));
        if !self.retries.is_empty() {
            at_most(EAGAIN_BACKOFF);
        }
        if self.phase == Phase::Background {
            if let Some(left) = self.background_hold_left() {
                at_most(left);
            }
        }
        if self.phase == Phase::Background {
            for task in &self.tasks {
                if let (Some(until), true) = (
                    task.backoff_until,
                    task.uffd.is_some() && task.ranges.pending_pages() > 0,
                ) {
                    at_most(until.saturating_duration_since(now));
                }
            }
        }
        if self.dirty {
            at_most(
                self.progress_interval
                    .saturating_sub(self.last_progress.elapsed()),
            );
        }
        t
    }

    fn drain_wake(&mut self) {
        let mut buf = [0u8; 64];
        while matches!((&self.wake).read(&mut buf), Ok(n) if n > 0) {}
    }

    // ---- hand-off ------------------------------------------------------------------------

    fn on_listener(&mut self) -> Result<(), EngineError> {
        let expected = self.tasks.len();
        loop {
            let Some(listener) = &self.listener else {
                return Ok(());
            };
            match handoff::accept(listener, &self.allowed_uids, expected)? {
                Accepted::None => return Ok(()),
                Accepted::Refused(cred) => {
                    let message = format!(
                        "refused a connection to the lazy-pages socket from pid {} uid {} (allowed uids: {:?})",
                        cred.pid, cred.uid, self.allowed_uids
                    );
                    let at_us = self.us();
                    self.emit(EngineEvent::Warning { at_us, message });
                }
                Accepted::Peer(h, cred) => {
                    self.epoll
                        .add(h.as_fd(), TOKEN_CONN)
                        .map_err(|source| EngineError::Io {
                            what: "watching the connection",
                            source,
                        })?;
                    if let Some(l) = self.listener.take() {
                        // One restore per engine, like CRIU: stop listening.
                        let _ = self.epoll.delete(l.as_fd());
                    }
                    self.handoff = Some(h);
                    let peer = Peer {
                        pid: cred.pid,
                        uid: cred.uid,
                        gid: cred.gid,
                    };
                    self.peer = Some(peer);
                    let at_us = self.us();
                    self.timeline.connect_us = Some(at_us);
                    self.emit(EngineEvent::Connected { at_us, peer });
                    self.publish();
                    return Ok(());
                }
            }
        }
    }

    fn on_conn(&mut self) -> Result<(), EngineError> {
        let Some(h) = self.handoff.as_mut() else {
            return Ok(());
        };
        let mut msgs = Vec::new();
        let plan_index = &self.plan_index;
        let result = h.poll(&|pid| plan_index.contains_key(&pid), &mut msgs);
        // Serve what arrived before any error, so those tasks are known (and killable).
        for m in msgs {
            self.on_message(m)?;
        }
        result?;
        if self.handoff.as_ref().is_some_and(|h| h.is_done()) {
            if let Some(h) = self.handoff.take() {
                let _ = self.epoll.delete(h.as_fd());
            }
        }
        Ok(())
    }

    fn on_message(&mut self, m: Message) -> Result<(), EngineError> {
        let at_us = self.us();
        match m {
            Message::Task { pid, uffd } => {
                let idx = self.plan_index[&pid];
                let uffd = Uffd::new(uffd).map_err(|source| EngineError::UffdRead {
                    pid,
                    child: 0,
                    source,
                })?;
                self.epoll
                    .add(uffd.as_fd(), TOKEN_TASK_BASE + idx as u64)
                    .map_err(|source| EngineError::Io {
                        what: "watching a userfaultfd",
                        source,
                    })?;
                let peer_pid = self.peer.map(|p| p.pid);
                let host = tree::resolve(peer_pid, pid);
                let watch = Watch {
                    image_pid: pid,
                    child_index: 0,
                    host,
                    peer_pid,
                };
                self.guard(watch, uffd.as_fd());
                let task = &mut self.tasks[idx];
                task.uffd = Some(uffd);
                task.received = true;
                task.host = host;
                task.stats.host_pid = host.map(|h| h.pid);
                self.emit(EngineEvent::TaskReceived {
                    at_us,
                    pid,
                    zombie: false,
                });
            }
            Message::Zombie { pid } => {
                let idx = self.plan_index[&pid];
                let task = &mut self.tasks[idx];
                task.received = true;
                task.stats.zombie = true;
                task.stats.exited = true;
                let orphaned = task.ranges.clear_all();
                task.stats.pages_orphaned += orphaned;
                self.emit(EngineEvent::TaskReceived {
                    at_us,
                    pid,
                    zombie: true,
                });
            }
            Message::Finished => {
                self.timeline.finished_us = Some(at_us);
                self.build_prefetch();
                self.set_phase(Phase::Background);
                return Ok(());
            }
        }
        self.dirty = true;
        if self
            .tasks
            .iter()
            .filter(|t| t.stats.child_index == 0)
            .all(|t| t.received)
        {
            self.timeline.all_uffds_us = Some(at_us);
            self.set_phase(Phase::FaultsOnly);
        }
        Ok(())
    }

    fn set_phase(&mut self, phase: Phase) {
        if self.phase == phase {
            return;
        }
        self.phase = phase;
        let at_us = self.us();
        self.emit(EngineEvent::Phase { at_us, phase });
        self.publish();
    }

    // ---- uffd events ---------------------------------------------------------------------

    /// The copier's handle when task `idx` has a job queued or running: its userfaultfd must
    /// then be read under the copier's lock (see [`crate::copier`]).
    fn held_copier(&self, idx: usize) -> Option<CopierHandle> {
        self.copier_handle
            .as_ref()
            .filter(|_| self.tasks.get(idx).is_some_and(|t| t.jobs > 0))
            .cloned()
    }

    fn on_uffd(&mut self, idx: usize) -> Result<(), EngineError> {
        let mut events = std::mem::take(&mut self.events);
        let result = match self.held_copier(idx) {
            None => self.drain_uffd(idx, &mut events, None),
            Some(handle) => self.drain_uffd_beside_copier(idx, &mut events, &handle),
        };
        events.clear();
        self.events = events;
        result
    }

    /// Task `idx` has copier jobs in flight: read its queued faults without the copier's lock
    /// (never more messages than faults are queued, so no event is consumed), serve them, and
    /// only then read what is left (events) under the lock. See [`crate::copier`].
    fn drain_uffd_beside_copier(
        &mut self,
        idx: usize,
        events: &mut Vec<Event>,
        handle: &CopierHandle,
    ) -> Result<(), EngineError> {
        loop {
            let Some(uffd) = self.tasks.get_mut(idx).and_then(|t| t.uffd.as_mut()) else {
                return Ok(());
            };
            let Ok(k) = uffd.pending_faults() else {
                break;
            };
            if k == 0 {
                break;
            }
            events.clear();
            let n = uffd.read_at_most(events, k as usize).map_err(|source| {
                let s = &self.tasks[idx].stats;
                EngineError::UffdRead {
                    pid: s.image_pid,
                    child: s.child_index,
                    source,
                }
            })?;
            if n == 0 {
                break;
            }
            let read_at = Instant::now();
            self.dirty = true;
            for ev in events.drain(..) {
                if matches!(ev, Event::PageFault { .. }) {
                    self.handle_event(idx, ev, read_at, None)?;
                } else {
                    // Cannot happen (see above); if it ever does, handle it under the lock.
                    let mut hold = handle.hold();
                    self.handle_event(idx, ev, read_at, Some(&mut hold))?;
                }
            }
        }
        let readable = self.tasks[idx]
            .uffd
            .as_ref()
            .is_some_and(|u| sys::wait_readable(u.as_fd(), Some(Duration::ZERO)).unwrap_or(true));
        if readable {
            let mut hold = handle.hold();
            self.drain_uffd(idx, events, Some(&mut hold))?;
        }
        Ok(())
    }

    fn drain_uffd(
        &mut self,
        idx: usize,
        events: &mut Vec<Event>,
        mut slot: Option<&mut copier::Slot>,
    ) -> Result<(), EngineError> {
        // With the copier, background never waits for this loop: always drain.
        let drain_all = self.policy.background.drain_before_chunk || self.copier_handle.is_some();
        loop {
            let Some(uffd) = self.tasks.get_mut(idx).and_then(|t| t.uffd.as_mut()) else {
                return Ok(());
            };
            events.clear();
            let n = match uffd.read_events(events) {
                Ok(n) => n,
                Err(source) => {
                    let s = &self.tasks[idx].stats;
                    return Err(EngineError::UffdRead {
                        pid: s.image_pid,
                        child: s.child_index,
                        source,
                    });
                }
            };
            if n == 0 {
                return Ok(());
            }
            let read_at = Instant::now();
            self.dirty = true;
            for ev in events.drain(..) {
                self.handle_event(idx, ev, read_at, slot.as_deref_mut())?;
            }
            if !drain_all {
                return Ok(());
            }
        }
    }

    /// Drops copier pages of task `idx` in run-time `[start, end)` (the task dropped them).
    fn cut_dropped(&mut self, idx: usize, slot: Option<&mut copier::Slot>, start: u64, end: u64) {
        for (_, spans) in &mut self.tasks[idx].flying {
            copier::cut_spans(spans, start, end);
        }
        let Some(slot) = slot else {
            return;
        };
        let pages: u64 = slot.cut(idx, start, end).iter().map(|s| s.pages).sum();
        let t = &mut self.tasks[idx];
        t.inflight -= pages;
        t.stats.pages_dropped += pages;
    }

    fn handle_event(
        &mut self,
        idx: usize,
        ev: Event,
        read_at: Instant,
        mut slot: Option<&mut copier::Slot>,
    ) -> Result<(), EngineError> {
        if self.tasks[idx].uffd.is_none() {
            // The task exited while this batch was being handled; a FORK fd still needs closing,
            // which dropping `ev` does.
            return Ok(());
        }
        match ev {
            Event::PageFault { addr, .. } => {
                let at = self.us();
                let s = &mut self.tasks[idx].stats;
                s.faults += 1;
                s.first_fault_us.get_or_insert(at);
                self.serve_fault(idx, addr & !(PAGE_SIZE - 1), read_at, slot)
            }
            Event::Fork { child } => {
                self.on_fork(idx, child, slot);
                Ok(())
            }
            Event::Remap { from, to, len } => {
                let t = &mut self.tasks[idx];
                t.stats.pages_dropped += t.ranges.remap(from, to, len);
                remap_spans(&mut t.prefetch, from, to, len);
                // Copier pages: those at the destination were replaced; those moved must be
                // copied at their new place (a piece copied before the move moved with it and
                // then reads EEXIST: counted present).
                self.cut_dropped(idx, slot.as_deref_mut(), to, to.saturating_add(len));
                if let Some(slot) = slot {
                    let t = &mut self.tasks[idx];
                    for (_, spans) in &mut t.flying {
                        copier::cut_spans(spans, from, from.saturating_add(len));
                    }
                    for mut piece in slot.cut(idx, from, from.saturating_add(len)) {
                        t.inflight -= piece.pages;
                        piece.runtime = to + (piece.runtime - from);
                        t.ranges.insert_pending(piece);
                    }
                }
                // A queued retry of a moved page now finds nothing pending at its old address:
                // the ZEROPAGE there fails with ENOENT and wakes the waiting thread, which
                // faults again wherever the page lives now.
                Ok(())
            }
            Event::Remove { start, end } => {
                self.cut_dropped(idx, slot, start, end);
                let t = &mut self.tasks[idx];
                t.stats.pages_dropped += t.ranges.clear(start, end);
                let res = t
                    .uffd
                    .as_ref()
                    .map(|u| u.unregister(start, end.saturating_sub(start)));
                match res {
                    Some(Err(CopyError::Gone)) => self.task_exited(idx),
                    Some(Err(e)) => {
                        let (pid, at_us) = (t.stats.image_pid, self.us());
                        let message = format!(
                            "task {pid}: UFFDIO_UNREGISTER of removed range {start:#x}..{end:#x} failed: {e}"
                        );
                        self.emit(EngineEvent::Warning { at_us, message });
                    }
                    _ => {}
                }
                Ok(())
            }
            Event::Unmap { start, end } => {
                self.cut_dropped(idx, slot, start, end);
                let t = &mut self.tasks[idx];
                t.stats.pages_dropped += t.ranges.clear(start, end);
                Ok(())
            }
            Event::Unknown { code } => {
                let (pid, at_us) = (self.tasks[idx].stats.image_pid, self.us());
                let message = format!("task {pid}: ignored unknown userfaultfd event {code:#x}");
                self.emit(EngineEvent::Warning { at_us, message });
                Ok(())
            }
        }
    }

    fn on_fork(
        &mut self,
        parent: usize,
        child: Option<std::os::fd::OwnedFd>,
        slot: Option<&mut copier::Slot>,
    ) {
        let at_us = self.us();
        let (image_pid, parent_index) = (
            self.tasks[parent].stats.image_pid,
            self.tasks[parent].stats.child_index,
        );
        let Some(fd) = child else {
            let message = format!("task {image_pid}: FORK event without a usable userfaultfd; the child is not served");
            self.emit(EngineEvent::Warning { at_us, message });
            return;
        };
        let idx = self.tasks.len();
        let uffd = match Uffd::new(fd) {
            Ok(u) => u,
            Err(e) => {
                let message =
                    format!("task {image_pid}: cannot use the forked child's userfaultfd: {e}");
                self.emit(EngineEvent::Warning { at_us, message });
                return;
            }
        };
        if let Err(e) = self.epoll.add(uffd.as_fd(), TOKEN_TASK_BASE + idx as u64) {
            let message =
                format!("task {image_pid}: cannot watch the forked child's userfaultfd: {e}");
            self.emit(EngineEvent::Warning { at_us, message });
            return;
        }
        let counter = self.children_of.entry(image_pid).or_insert(0);
        *counter += 1;
        let child_index = *counter;
        let watch = Watch {
            image_pid,
            child_index,
            host: None,
            peer_pid: self.peer.map(|p| p.pid),
        };
        self.guard(watch, uffd.as_fd());
        // What the parent still misses, plus what the copier had not finished for it (as CRIU
        // re-requests in-flight ranges for a child).
        let mut ranges = self.tasks[parent].ranges.clone();
        if let Some(slot) = slot {
            for s in slot.spans_of(parent) {
                ranges.insert_pending(s);
            }
        }
        let stats = TaskStats {
            image_pid,
            child_index,
            pages_planned: ranges.pending_pages(),
            pages_pending: ranges.pending_pages(),
            ..Default::default()
        };
        let mut task = Task::new(stats, ranges, &self.policy);
        task.uffd = Some(uffd);
        task.received = true;
        self.tasks.push(task);
        self.emit(EngineEvent::TaskForked {
            at_us,
            image_pid,
            parent_index,
            child_index,
        });
    }

    fn task_exited(&mut self, idx: usize) {
        let t = &mut self.tasks[idx];
        if let Some(u) = t.uffd.take() {
            let _ = self.epoll.delete(u.as_fd());
        }
        t.stats.exited = true;
        t.stats.pages_orphaned += t.ranges.clear_all();
        t.prefetch.clear();
        self.retries.retain(|r| r.task != idx);
        self.dirty = true;
    }

    fn note_served(&mut self, idx: usize, read_at: Instant) {
        let took = read_at.elapsed();
        self.latency.record(took);
        self.tasks[idx].latency.record(took);
        if let Some(cpu) = sys::current_cpu() {
            let cpu = cpu as usize;
            if self.per_cpu.len() <= cpu {
                self.per_cpu.resize(cpu + 1, 0);
            }
            self.per_cpu[cpu] += 1;
        }
    }

    fn record_fault(&mut self, idx: usize, image: u64) {
        if !self.policy.record_faults {
            return;
        }
        let at_us = self.us();
        let t = &mut self.tasks[idx];
        if t.trace.len() < FAULT_TRACE_MAX {
            t.trace.push(TracedFault { addr: image, at_us });
        } else {
            t.trace_truncated += 1;
        }
    }

    /// Resolves one fault on `page` (page aligned): COPY (with the readahead window) if
    /// pending; COPY of that page if the copier has it queued; else ZEROPAGE.
    fn serve_fault(
        &mut self,
        idx: usize,
        page: u64,
        read_at: Instant,
        slot: Option<&mut copier::Slot>,
    ) -> Result<(), EngineError> {
        let _ = slot;
        let outcome = if let Some(span) = self.tasks[idx].ranges.pending_page(page) {
            self.copy_fault(idx, span)?
        } else if let Some((job, span)) = self.take_flying(idx, page) {
            // Handed to the copier, maybe not copied yet: the fault does not wait for it.
            self.copy_flying(idx, job, span)?
        } else {
            self.zero_fault(idx, page)?
        };
        match outcome {
            Fill::Done => self.note_served(idx, read_at),
            Fill::Again => {
                self.tasks[idx].stats.eagain_retries += 1;
                self.retries.push(Retry {
                    task: idx,
                    page,
                    read_at,
                });
            }
            Fill::Gone => self.task_exited(idx),
        }
        Ok(())
    }

    /// Removes `page` from what the loop handed the copier; returns its job and span.
    fn take_flying(&mut self, idx: usize, page: u64) -> Option<(u64, PageSpan)> {
        let t = &mut self.tasks[idx];
        for (job, spans) in &mut t.flying {
            let hit = spans
                .iter()
                .any(|s| s.runtime <= page && page < s.runtime + s.bytes());
            if hit {
                let span = copier::cut_spans(spans, page, page + PAGE_SIZE).pop()?;
                t.inflight -= 1;
                self.taken.entry(*job).or_default().0 += 1;
                return Some((*job, span));
            }
        }
        None
    }

    /// A fault on a page the copier holds: copy that page from the source right away (the
    /// copier then finds it present, or it got there first and we only wake).
    fn copy_flying(&mut self, idx: usize, job: u64, span: PageSpan) -> Result<Fill, EngineError> {
        let (inst, fate) = self.install(idx, span, false, CopyKind::Fault, Some(span.runtime))?;
        if inst.gone {
            return Ok(Fill::Gone);
        }
        match fate {
            Special::Installed => {
                self.taken.entry(job).or_default().1 += 1;
                self.record_fault(idx, span.image);
                Ok(Fill::Done)
            }
            Special::Present => {
                // The copier got there first, but the page was needed before it was there.
                self.record_fault(idx, span.image);
                let woke = self.tasks[idx]
                    .uffd
                    .as_ref()
                    .map(|u| u.wake(span.runtime, PAGE_SIZE));
                Ok(match woke {
                    Some(Err(CopyError::Gone)) => Fill::Gone,
                    _ => Fill::Done,
                })
            }
            Special::Untouched => {
                // EAGAIN: make it pending again so the retry copies it.
                self.tasks[idx].ranges.insert_pending(span);
                Ok(Fill::Again)
            }
        }
    }

    fn uffd_error(
        &self,
        idx: usize,
        op: &'static str,
        addr: u64,
        len: u64,
        source: CopyError,
    ) -> EngineError {
        let s = &self.tasks[idx].stats;
        EngineError::Uffd {
            pid: s.image_pid,
            child: s.child_index,
            op,
            addr,
            len,
            source,
        }
    }

    fn page_read_error(&self, idx: usize, image_addr: u64, source: SourceError) -> EngineError {
        EngineError::PageRead {
            pid: self.tasks[idx].stats.image_pid,
            image_addr,
            source,
        }
    }

    /// Copies the pending run `run` of task `idx` (one range, contiguous in the file) with as
    /// few UFFDIO_COPYs as it takes, clearing what it filled (or found present, or found
    /// unmapped) from the pending set. `special`: a page whose fate the caller needs (the
    /// faulting page) — reported in the result.
    fn install(
        &mut self,
        idx: usize,
        run: PageSpan,
        dontwake: bool,
        kind: CopyKind,
        special: Option<u64>,
    ) -> Result<(Installed, Special), EngineError> {
        let mut out = Installed::default();
        let mut fate = Special::Untouched;
        let bytes = run.bytes();
        let mapped = self.source.mapped(run.file, run.offset, bytes);
        let in_window = matches!(kind, CopyKind::Fault | CopyKind::Readahead);
        if mapped.is_none() {
            let buf = if in_window && bytes as usize <= self.page_buf.len() {
                &mut self.page_buf
            } else {
                if self.chunk_buf.len() < bytes as usize {
                    self.chunk_buf.resize(bytes as usize, 0);
                }
                &mut self.chunk_buf
            };
            let dst = &mut buf[..bytes as usize];
            let read = if in_window {
                self.source.read_urgent(run.file, run.offset, dst)
            } else {
                self.source.read(run.file, run.offset, dst)
            };
            if let Err(e) = read {
                return Err(self.page_read_error(idx, run.image, e));
            }
        }
        let mut done = 0u64;
        while done < run.pages {
            let dst = run.runtime + done * PAGE_SIZE;
            let end = run.runtime + bytes;
            let len = end - dst;
            let t = &mut self.tasks[idx];
            let Some(uffd) = t.uffd.as_ref() else {
                out.gone = true;
                break;
            };
            let result = match mapped {
                Some(addr) => uffd.copy_from(dst, addr + done * PAGE_SIZE, len, dontwake),
                None => {
                    let buf = if in_window && bytes as usize <= self.page_buf.len() {
                        &self.page_buf
                    } else {
                        &self.chunk_buf
                    };
                    uffd.copy(
                        dst,
                        &buf[(done * PAGE_SIZE) as usize..bytes as usize],
                        dontwake,
                    )
                }
            };
            match result {
                Ok(n) => {
                    let n = n as u64 / PAGE_SIZE;
                    if n == 0 {
                        out.again = true;
                        break;
                    }
                    if mapped.is_some() {
                        let off = run.offset + done * PAGE_SIZE;
                        if let Err(e) = self.source.check_mapped(run.file, off, n * PAGE_SIZE) {
                            return Err(self.page_read_error(idx, run.image + done * PAGE_SIZE, e));
                        }
                    }
                    let t = &mut self.tasks[idx];
                    t.ranges.clear(dst, dst + n * PAGE_SIZE);
                    out.pages += n;
                    if special.is_some_and(|p| p >= dst && p < dst + n * PAGE_SIZE) {
                        fate = Special::Installed;
                    }
                    copier::log(
                        &self.copy_log,
                        CopyRecord {
                            task: idx,
                            kind,
                            runtime: dst,
                            pages: n,
                        },
                    );
                    done += n;
                }
                Err(CopyError::Exists) => {
                    out.present += t.ranges.clear(dst, dst + PAGE_SIZE);
                    if special == Some(dst) {
                        fate = Special::Present;
                    }
                    done += 1;
                }
                Err(CopyError::Again) => {
                    out.again = true;
                    break;
                }
                Err(CopyError::Gone) => {
                    out.gone = true;
                    break;
                }
                Err(CopyError::NoMapping) => {
                    // Nothing registered there any more: nobody can ever read these pages.
                    out.dropped += t.ranges.clear(dst, end);
                    if special.is_some_and(|p| p >= dst && p < end) {
                        fate = Special::Present;
                    }
                    break;
                }
                Err(CopyError::Fault) if mapped.is_some() => {
                    let off = run.offset + done * PAGE_SIZE;
                    if let Err(e) = self.source.check_mapped(run.file, off, len) {
                        return Err(self.page_read_error(idx, run.image + done * PAGE_SIZE, e));
                    }
                    return Err(self.uffd_error(idx, "UFFDIO_COPY", dst, len, CopyError::Fault));
                }
                Err(e) => return Err(self.uffd_error(idx, "UFFDIO_COPY", dst, len, e)),
            }
        }
        // Counters, by what installed the pages.
        let t = &mut self.tasks[idx];
        let s = &mut t.stats;
        s.bytes_copied += out.pages * PAGE_SIZE;
        s.pages_present += out.present;
        s.pages_dropped += out.dropped;
        let faulting = u64::from(fate == Special::Installed);
        match kind {
            CopyKind::Fault | CopyKind::Readahead => {
                s.pages_fault += faulting;
                s.pages_readahead += out.pages - faulting;
            }
            CopyKind::Prefetch => s.pages_prefetch += out.pages,
            CopyKind::Background => s.pages_background += out.pages,
        }
        Ok((out, fate))
    }

    /// A fault on pending page `span`: the page and its readahead window, one wake-up.
    fn copy_fault(&mut self, idx: usize, span: PageSpan) -> Result<Fill, EngineError> {
        let ra = self.policy.readahead;
        let near = self.policy.background.order == BackgroundOrder::NearFaults;
        let mut runs = std::mem::take(&mut self.runs);
        let t = &mut self.tasks[idx];
        t.chunk.on_fault();
        let win = t.readahead.on_fault(&ra, span.runtime / PAGE_SIZE);
        if win.pages <= 1 {
            runs.clear();
            runs.push(span);
        } else {
            let (ws, we) = (win.start * PAGE_SIZE, win.end() * PAGE_SIZE);
            t.ranges.pending_runs_in(span.runtime, ws, we, &mut runs);
        }
        if near {
            t.cursor = runs
                .last()
                .map_or(span.runtime + PAGE_SIZE, |r| r.runtime + r.bytes());
        }
        // One run: one COPY, which wakes its range. Several: DONTWAKE each, one WAKE after.
        let several = runs.len() > 1;
        let (mut lo, mut hi) = (span.runtime, span.runtime + PAGE_SIZE);
        let (mut fate, mut again, mut gone) = (Special::Untouched, false, false);
        let mut result = Ok(());
        for run in runs.iter().copied() {
            let holds = run.runtime <= span.runtime && span.runtime < run.runtime + run.bytes();
            let kind = if holds {
                CopyKind::Fault
            } else {
                CopyKind::Readahead
            };
            match self.install(idx, run, several, kind, holds.then_some(span.runtime)) {
                Ok((inst, f)) => {
                    if holds {
                        fate = f;
                        again |= inst.again;
                    }
                    lo = lo.min(run.runtime);
                    hi = hi.max(run.runtime + run.bytes());
                    if inst.gone {
                        gone = true;
                        break;
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.runs = runs;
        result?;
        if gone {
            return Ok(Fill::Gone);
        }
        if fate == Special::Installed {
            self.record_fault(idx, span.image);
        }
        // The faulting page's own COPY woke it unless it was DONTWAKE or not ours to copy.
        if several || fate != Special::Installed {
            let woke = self.tasks[idx].uffd.as_ref().map(|u| u.wake(lo, hi - lo));
            if let Some(Err(CopyError::Gone)) = woke {
                return Ok(Fill::Gone);
            }
        }
        if fate == Special::Untouched && again {
            return Ok(Fill::Again);
        }
        Ok(Fill::Done)
    }

    fn zero_fault(&mut self, idx: usize, page: u64) -> Result<Fill, EngineError> {
        let t = &mut self.tasks[idx];
        let Some(uffd) = t.uffd.as_ref() else {
            return Ok(Fill::Gone);
        };
        match uffd.zeropage(page, PAGE_SIZE, false) {
            Ok(n) if n as u64 >= PAGE_SIZE => {
                t.stats.pages_zero += 1;
                Ok(Fill::Done)
            }
            Ok(_) | Err(CopyError::Again) => Ok(Fill::Again),
            Err(CopyError::Exists) | Err(CopyError::NoMapping) => {
                match uffd.wake(page, PAGE_SIZE) {
                    Err(CopyError::Gone) => Ok(Fill::Gone),
                    _ => Ok(Fill::Done),
                }
            }
            Err(CopyError::Gone) => Ok(Fill::Gone),
            Err(e) => Err(self.uffd_error(idx, "UFFDIO_ZEROPAGE", page, PAGE_SIZE, e)),
        }
    }

    fn retry_faults(&mut self) -> Result<(), EngineError> {
        if self.retries.is_empty() {
            return Ok(());
        }
        for r in std::mem::take(&mut self.retries) {
            if self.tasks[r.task].uffd.is_some() {
                self.serve_fault(r.task, r.page, r.read_at, None)?;
            }
        }
        Ok(())
    }

    // ---- prefetch and background ---------------------------------------------------------

    /// Turns the policy's prefetch lists (image addresses, per pstree pid) into per-task runs
    /// at run-time addresses, each inside one range, in the given order.
    fn build_prefetch(&mut self) {
        let plans = std::mem::take(&mut self.policy.prefetch);
        let mut out = Vec::new();
        for p in &plans {
            let Some(&idx) = self.plan_index.get(&p.pid) else {
                continue;
            };
            let t = &mut self.tasks[idx];
            for r in &p.ranges {
                t.ranges.image_runs(r.start, r.pages, &mut out);
                t.prefetch.extend(out.drain(..));
            }
        }
    }

    fn check_prefetch_done(&mut self) {
        if !self.prefetch_planned
            || self.timeline.prefetch_done_us.is_some()
            || self.prefetch_jobs > 0
        {
            return;
        }
        // Drop leading entries with nothing pending (they are dropped lazily otherwise).
        for t in &mut self.tasks {
            while let Some(front) = t.prefetch.front().copied() {
                let mut runs = Vec::new();
                let end = front.runtime + front.bytes();
                t.ranges
                    .pending_runs_in(front.runtime, front.runtime, end, &mut runs);
                if !runs.is_empty() && t.uffd.is_some() {
                    break;
                }
                t.prefetch.pop_front();
            }
        }
        if self.tasks.iter().all(|t| t.prefetch.is_empty()) {
            self.timeline.prefetch_done_us = Some(self.us());
            self.dirty = true;
        }
    }

    /// The next pages to copy outside fault service: the first pending run of the prefetch
    /// lists (tasks in list order), else a background chunk chosen by the policy.
    fn next_work(&mut self) -> Option<(usize, PageSpan, CopyKind)> {
        let max_pages = (self.policy.background.max_chunk_bytes / PAGE_SIZE).max(1);
        for idx in 0..self.tasks.len() {
            if let Some(span) = self.take_prefetch(idx, max_pages) {
                return Some((idx, span, CopyKind::Prefetch));
            }
        }
        let now = Instant::now();
        if self.background_held() {
            return None;
        }
        let n = self.tasks.len();
        let idx = match self.policy.background.tasks {
            TaskOrder::OneAfterAnother => (0..n).find(|&i| self.tasks[i].has_background_work(now)),
            TaskOrder::Interleaved => (0..n)
                .map(|k| (self.rr + k) % n)
                .find(|&i| self.tasks[i].has_background_work(now)),
        }?;
        self.rr = (idx + 1) % n;
        self.tasks[idx].backoff_until = None;
        let span = self.take_background(idx, None)?;
        Some((idx, span, CopyKind::Background))
    }

    /// Time left before background chunks may start (`Background::start_delay` after the
    /// finished word), unless a finish-fast request lifted the hold.
    fn background_hold_left(&self) -> Option<Duration> {
        let delay = self.policy.background.start_delay;
        if delay.is_zero() || self.shared.finish_fast.load(Ordering::Relaxed) {
            return None;
        }
        let fin = Duration::from_micros(self.timeline.finished_us?);
        let now = Duration::from_micros(self.us());
        (fin + delay).checked_sub(now).filter(|d| !d.is_zero())
    }

    fn background_held(&self) -> bool {
        self.background_hold_left().is_some()
    }

    /// The first pending run (at most `max_pages`) of task `idx`'s prefetch list.
    fn take_prefetch(&mut self, idx: usize, max_pages: u64) -> Option<PageSpan> {
        let mut runs = std::mem::take(&mut self.runs);
        let t = &mut self.tasks[idx];
        let mut found = None;
        if t.has_background_work(Instant::now()) {
            while let Some(front) = t.prefetch.front_mut() {
                let end = front.runtime + front.bytes();
                t.ranges
                    .pending_runs_in(front.runtime, front.runtime, end, &mut runs);
                let Some(first) = runs.first().copied() else {
                    t.prefetch.pop_front();
                    continue;
                };
                // Skip what is no longer pending at the front of the entry.
                let skip = (first.runtime - front.runtime) / PAGE_SIZE;
                front.runtime = first.runtime;
                front.image += skip * PAGE_SIZE;
                front.offset += skip * PAGE_SIZE;
                front.pages -= skip;
                let mut chunk = first;
                chunk.pages = chunk.pages.min(max_pages.max(1));
                found = Some(chunk);
                break;
            }
        }
        self.runs = runs;
        found
    }

    /// Task `idx`'s next background chunk, in the policy's order: the chunk sizer's size
    /// (which then grows), or at most `limit` pages without touching the sizer.
    fn take_background(&mut self, idx: usize, limit: Option<u64>) -> Option<PageSpan> {
        let order = self.policy.background.order;
        let t = &mut self.tasks[idx];
        let pages = limit.unwrap_or_else(|| t.chunk.peek()).max(1);
        let span = match order {
            BackgroundOrder::LowestAddress => t.ranges.next_chunk(pages),
            BackgroundOrder::RoundRobin | BackgroundOrder::NearFaults => {
                t.ranges.next_chunk_from(t.cursor, pages)
            }
        }?;
        if limit.is_none() {
            t.chunk.take();
        }
        t.cursor = match order {
            BackgroundOrder::RoundRobin => t.ranges.next_range_start(span.runtime).unwrap_or(0),
            _ => span.runtime + span.bytes(),
        };
        Some(span)
    }

    /// In-loop copying (policy `thread = loop`): one prefetch or background chunk.
    fn background_step(&mut self) -> Result<(), EngineError> {
        let Some((idx, span, kind)) = self.next_work() else {
            return Ok(());
        };
        self.dirty = true;
        let (inst, _) = self.install(idx, span, false, kind, None)?;
        if inst.gone {
            self.task_exited(idx);
        } else if inst.again {
            let t = &mut self.tasks[idx];
            t.stats.eagain_retries += 1;
            t.backoff_until = Some(Instant::now() + EAGAIN_BACKOFF);
        }
        Ok(())
    }

    /// Copier thread (policy `thread = copier`): keeps two jobs queued or running.
    fn feed_copier(&mut self) {
        let Some(handle) = self.copier_handle.clone() else {
            return;
        };
        while self.jobs < COPIER_JOBS {
            let Some((idx, span, kind)) = self.next_work() else {
                return;
            };
            let Some(fd) = self.tasks[idx].uffd.as_ref().map(Uffd::shared_fd) else {
                return;
            };
            // A job is a whole chunk even where the pending pages are scattered (faults
            // left holes): one hand-over per chunk, not per run.
            let target = match kind {
                CopyKind::Prefetch => self.policy.background.max_chunk_bytes / PAGE_SIZE,
                _ => span.pages.max(self.tasks[idx].chunk.peek()),
            };
            let mut spans = VecDeque::new();
            let mut next = Some(span);
            let mut total = 0;
            while let Some(span) = next {
                // Handed over: no longer pending here, so faults and chunks skip it.
                self.tasks[idx]
                    .ranges
                    .clear(span.runtime, span.runtime + span.bytes());
                total += span.pages;
                spans.push_back(span);
                if total >= target || spans.len() >= JOB_MAX_SPANS {
                    break;
                }
                next = match kind {
                    CopyKind::Prefetch => self.take_prefetch(idx, target - total),
                    _ => self.take_background(idx, Some(target - total)),
                };
            }
            let id = self.next_job;
            self.next_job += 1;
            let t = &mut self.tasks[idx];
            t.inflight += total;
            t.jobs += 1;
            t.flying.push((id, spans.clone()));
            self.jobs += 1;
            if kind == CopyKind::Prefetch {
                self.prefetch_jobs += 1;
            }
            self.dirty = true;
            handle.submit(Job::new(id, idx, kind, fd, spans));
        }
    }

    /// Accounts for jobs the copier finished.
    fn on_copier(&mut self) -> Result<(), EngineError> {
        if let Some(rx) = &self.copier_rx {
            let mut buf = [0u8; 64];
            while matches!((&*rx).read(&mut buf), Ok(n) if n > 0) {}
        }
        let Some(handle) = self.copier_handle.clone() else {
            return Ok(());
        };
        for job in handle.take_done() {
            let idx = job.task;
            self.jobs -= 1;
            if job.kind == CopyKind::Prefetch {
                self.prefetch_jobs -= 1;
            }
            self.dirty = true;
            let rest = job.remaining();
            // Pages faults took from this job: the copier found those the loop copied present.
            let (taken, taken_copied) = self.taken.remove(&job.id).unwrap_or_default();
            let t = &mut self.tasks[idx];
            t.jobs -= 1;
            t.flying.retain(|(id, _)| *id != job.id);
            t.inflight -= (job.installed + job.exists + job.dropped + rest).saturating_sub(taken);
            let s = &mut t.stats;
            match job.kind {
                CopyKind::Prefetch => s.pages_prefetch += job.installed,
                _ => s.pages_background += job.installed,
            }
            s.bytes_copied += job.installed * PAGE_SIZE;
            s.pages_present += job.exists.saturating_sub(taken_copied);
            s.pages_dropped += job.dropped;
            s.eagain_retries += job.eagain;
            if !job.gone {
                // Not copied (an error stopped the job): still missing, so still outstanding.
                for s in &job.spans {
                    t.ranges.insert_pending(*s);
                }
            }
            match job.error {
                Some(JobError::Source { image_addr, source }) => {
                    return Err(self.page_read_error(idx, image_addr, source));
                }
                Some(JobError::Uffd { addr, len, source }) => {
                    return Err(self.uffd_error(idx, "UFFDIO_COPY", addr, len, source));
                }
                None => {}
            }
            if job.gone {
                // Pages faults took from this job were installed (and counted) by the fault
                // path; those the copier did not meet as present are still in `rest`.
                let taken_in_rest = taken.saturating_sub(job.exists).min(rest);
                self.tasks[idx].stats.pages_orphaned += rest - taken_in_rest;
                self.task_exited(idx);
            }
        }
        Ok(())
    }

    // ---- reporting -----------------------------------------------------------------------

    fn check_done(&mut self) {
        let at_us = self.us();
        let mut finished = Vec::new();
        for t in &mut self.tasks {
            t.stats.pages_pending = t.ranges.pending_pages() + t.inflight;
            if t.received && t.stats.done_us.is_none() && t.stats.pages_pending == 0 && t.jobs == 0
            {
                t.stats.done_us = Some(at_us);
                finished.push(t.report());
            }
        }
        if !finished.is_empty() {
            for task in finished {
                self.emit(EngineEvent::TaskDone { at_us, task });
            }
            self.publish();
        }
    }

    fn progress(&mut self) {
        let snap = self.snapshot();
        self.last_progress = Instant::now();
        self.dirty = false;
        let ev = EngineEvent::Progress {
            at_us: snap.elapsed_us,
            phase: snap.phase,
            totals: snap.totals.clone(),
            tasks: snap.tasks.clone(),
        };
        // Only for the guardian's message if this process dies; never blocks.
        let pending = snap.totals.pages_pending;
        if let (Some(g), false) = (self.guardian.as_mut(), self.guardian_lost) {
            if let Err(e) = g.pending(pending) {
                self.guardian_failed("taking a progress report", e);
            }
        }
        *lock(&self.shared.snapshot) = snap;
        self.emit(ev);
    }

    fn publish(&mut self) {
        let snap = self.snapshot();
        *lock(&self.shared.snapshot) = snap;
    }

    fn snapshot(&mut self) -> Snapshot {
        for t in &mut self.tasks {
            t.stats.pages_pending = t.ranges.pending_pages() + t.inflight;
        }
        let fault_traces = if self.final_report && self.policy.record_faults {
            self.tasks
                .iter()
                .map(|t| FaultTrace {
                    image_pid: t.stats.image_pid,
                    child_index: t.stats.child_index,
                    faults: t.trace.clone(),
                    truncated: t.trace_truncated,
                })
                .collect()
        } else {
            Vec::new()
        };
        let tasks: Vec<TaskStats> = self.tasks.iter().map(Task::report).collect();
        let (mut user_us, mut sys_us) = sys::thread_cpu_time_us();
        if let Some(c) = &self.copier_handle {
            let (u, s) = c.cpu_time_us();
            user_us += u;
            sys_us += s;
        }
        Snapshot {
            phase: self.phase,
            elapsed_us: self.us(),
            totals: Totals::of(&tasks),
            tasks,
            timeline: self.timeline.clone(),
            fault_latency: self.latency.summary(),
            faults_per_cpu: self.per_cpu.clone(),
            cpu_time: CpuTime { user_us, sys_us },
            peer: self.peer,
            policy: self.policy.name.clone(),
            series: self.series.points().to_vec(),
            fault_traces,
            source: self.source.stats(),
        }
    }
}
