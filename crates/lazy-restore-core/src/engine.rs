//! The engine: one thread running one epoll loop over the CRIU socket and every task's
//! userfaultfd. Faults are served first, one page each, straight from the page source; after
//! the restore-finished word the remaining pages are copied lowest address first, task by task,
//! one chunk per loop turn, with a zero-timeout poll between chunks so a fault never waits
//! behind more than one chunk.
//!
//! The caller gets an [`EngineHandle`] (stats, finish-fast, abort, wait) and batched events;
//! never a callback per fault.

use crate::error::EngineError;
use crate::guardian::{GuardianLink, Watch};
use crate::handoff::{self, Accepted, Handoff, Message};
use crate::plan::{self, EngineConfig};
use crate::ranges::{PageSpan, RangeMap, RangeSeed};
use crate::source::{FileSource, PageSource};
use crate::sys::{self, Epoll};
use crate::telemetry::{
    CpuTime, EngineEvent, LatencyHistogram, Peer, Phase, Report, Snapshot, TaskStats, Timeline,
    Totals,
};
use crate::tree::{self, HostProc};
use crate::uffd::{CopyError, Event, Uffd, PAGE_SIZE};
use std::collections::HashMap;
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
    /// Validates the plan, opens the page files, binds and listens on the socket (so the caller
    /// can announce readiness when this returns), then serves on a thread of its own.
    pub fn start(config: EngineConfig, on_event: EventSink) -> Result<EngineHandle, EngineError> {
        let page = sys::page_size();
        if page != PAGE_SIZE {
            return Err(EngineError::UnsupportedPageSize { size: page });
        }
        let needed = plan::validate(&config)?;
        let source = FileSource::open(&config.files).map_err(EngineError::Source)?;
        for (i, &n) in needed.iter().enumerate() {
            source.check_len(i as u32, n).map_err(EngineError::Source)?;
        }
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
        let shared = Arc::new(Shared {
            abort: Mutex::new(None),
            abort_flag: AtomicBool::new(false),
            finish_fast: AtomicBool::new(false),
            snapshot: Mutex::new(Snapshot::empty()),
            ended: Mutex::new(false),
            ended_cv: Condvar::new(),
        });
        let mut fault_loop = FaultLoop::new(
            config,
            Box::new(source),
            listener,
            epoll,
            wake_rx,
            Arc::clone(&shared),
            on_event,
        );
        fault_loop.guardian = guardian;
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
    uffd: Option<Uffd>,
    ranges: RangeMap,
    host: Option<HostProc>,
    /// Background copying paused until then (EAGAIN).
    backoff_until: Option<Instant>,
    /// A received task (uffd or zombie) — plan tasks start unreceived.
    received: bool,
}

impl Task {
    fn has_background_work(&self, now: Instant) -> bool {
        self.uffd.is_some()
            && self.ranges.pending_pages() > 0
            && self.backoff_until.is_none_or(|t| now >= t)
    }
}

/// A fault whose COPY/ZEROPAGE returned EAGAIN, waiting to be retried.
struct Retry {
    task: usize,
    page: u64,
    read_at: Instant,
}

/// What happened to one fill attempt.
enum Fill {
    Done,
    Again,
    Gone,
}

/// The engine loop and all its state. Lives on the engine thread.
struct FaultLoop {
    chunk_pages: u64,
    allowed_uids: Vec<u32>,
    kill_on_fatal: bool,
    progress_interval: Duration,
    plan_index: HashMap<i32, usize>,
    tasks: Vec<Task>,
    children_of: HashMap<i32, u32>,
    source: Box<dyn PageSource>,
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
    page_buf: Vec<u8>,
    chunk_buf: Vec<u8>,
    events: Vec<Event>,
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
        source: Box<dyn PageSource>,
        listener: UnixListener,
        epoll: Epoll,
        wake: UnixStream,
        shared: Arc<Shared>,
        on_event: EventSink,
    ) -> Self {
        let chunk_pages = (cfg.chunk_bytes as u64 / PAGE_SIZE).max(1);
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
                Task {
                    stats,
                    uffd: None,
                    ranges,
                    host: None,
                    backoff_until: None,
                    received: false,
                }
            })
            .collect();
        let now = Instant::now();
        Self {
            chunk_pages,
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
            page_buf: vec![0; PAGE_SIZE as usize],
            chunk_buf: vec![0; (chunk_pages * PAGE_SIZE) as usize],
            events: Vec::new(),
            dirty: false,
            last_progress: now,
            guardian: None,
            guardian_lost: false,
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
        let result = match result {
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

    /// True while a live task still has pages we never filled.
    fn outstanding(&self) -> bool {
        self.tasks
            .iter()
            .any(|t| t.uffd.is_some() && t.ranges.pending_pages() > 0)
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
            for &token in &ready {
                match token {
                    TOKEN_LISTENER => self.on_listener()?,
                    TOKEN_CONN => self.on_conn()?,
                    TOKEN_WAKE => self.drain_wake(),
                    t => self.on_uffd((t - TOKEN_TASK_BASE) as usize)?,
                }
            }
            self.retry_faults()?;
            if self.phase == Phase::Background {
                self.background_step()?;
            }
            self.check_done();
            if self.phase == Phase::Background
                && self.tasks.iter().all(|t| t.ranges.pending_pages() == 0)
            {
                return Ok(());
            }
            if self.dirty && self.last_progress.elapsed() >= self.progress_interval {
                self.progress();
            }
        }
    }

    fn timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        if self.phase == Phase::Background && self.tasks.iter().any(|t| t.has_background_work(now))
        {
            return Some(Duration::ZERO);
        }
        let mut t: Option<Duration> = None;
        let mut at_most = |d: Duration| t = Some(t.map_or(d, |x| x.min(d)));
        if !self.retries.is_empty() {
            at_most(EAGAIN_BACKOFF);
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

    fn on_uffd(&mut self, idx: usize) -> Result<(), EngineError> {
        let mut events = std::mem::take(&mut self.events);
        let result = self.drain_uffd(idx, &mut events);
        events.clear();
        self.events = events;
        result
    }

    fn drain_uffd(&mut self, idx: usize, events: &mut Vec<Event>) -> Result<(), EngineError> {
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
                self.handle_event(idx, ev, read_at)?;
            }
        }
    }

    fn handle_event(&mut self, idx: usize, ev: Event, read_at: Instant) -> Result<(), EngineError> {
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
                self.serve_fault(idx, addr & !(PAGE_SIZE - 1), read_at)
            }
            Event::Fork { child } => {
                self.on_fork(idx, child);
                Ok(())
            }
            Event::Remap { from, to, len } => {
                let t = &mut self.tasks[idx];
                t.stats.pages_dropped += t.ranges.remap(from, to, len);
                // A queued retry of a moved page now finds nothing pending at its old address:
                // the ZEROPAGE there fails with ENOENT and wakes the waiting thread, which
                // faults again wherever the page lives now.
                Ok(())
            }
            Event::Remove { start, end } => {
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

    fn on_fork(&mut self, parent: usize, child: Option<std::os::fd::OwnedFd>) {
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
        let ranges = self.tasks[parent].ranges.clone();
        let stats = TaskStats {
            image_pid,
            child_index,
            pages_planned: ranges.pending_pages(),
            pages_pending: ranges.pending_pages(),
            ..Default::default()
        };
        self.tasks.push(Task {
            stats,
            uffd: Some(uffd),
            ranges,
            host: None,
            backoff_until: None,
            received: true,
        });
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
        self.retries.retain(|r| r.task != idx);
        self.dirty = true;
    }

    fn note_served(&mut self, read_at: Instant) {
        self.latency.record(read_at.elapsed());
        if let Some(cpu) = sys::current_cpu() {
            let cpu = cpu as usize;
            if self.per_cpu.len() <= cpu {
                self.per_cpu.resize(cpu + 1, 0);
            }
            self.per_cpu[cpu] += 1;
        }
    }

    /// Resolves one fault on `page` (page aligned): COPY if pending, else ZEROPAGE.
    fn serve_fault(&mut self, idx: usize, page: u64, read_at: Instant) -> Result<(), EngineError> {
        let outcome = match self.tasks[idx].ranges.pending_page(page) {
            Some(span) => self.copy_fault(idx, span)?,
            None => self.zero_fault(idx, page)?,
        };
        match outcome {
            Fill::Done => self.note_served(read_at),
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

    fn copy_fault(&mut self, idx: usize, span: PageSpan) -> Result<Fill, EngineError> {
        let pid = self.tasks[idx].stats.image_pid;
        self.source
            .read(span.file, span.offset, &mut self.page_buf)
            .map_err(|source| EngineError::PageRead {
                pid,
                image_addr: span.image,
                source,
            })?;
        let t = &mut self.tasks[idx];
        let Some(uffd) = t.uffd.as_ref() else {
            return Ok(Fill::Gone);
        };
        match uffd.copy(span.runtime, &self.page_buf, false) {
            Ok(n) if n as u64 >= PAGE_SIZE => {
                t.ranges.clear(span.runtime, span.runtime + PAGE_SIZE);
                t.stats.pages_fault += 1;
                t.stats.bytes_copied += PAGE_SIZE;
                Ok(Fill::Done)
            }
            Ok(_) | Err(CopyError::Again) => Ok(Fill::Again),
            Err(CopyError::Exists) => {
                // Already there (a raced copy): wake whoever waits and call the page done.
                let woke = uffd.wake(span.runtime, PAGE_SIZE);
                t.stats.pages_present += t.ranges.clear(span.runtime, span.runtime + PAGE_SIZE);
                match woke {
                    Err(CopyError::Gone) => Ok(Fill::Gone),
                    _ => Ok(Fill::Done),
                }
            }
            Err(CopyError::Gone) => Ok(Fill::Gone),
            Err(CopyError::NoMapping) => {
                // The mapping went away under us (its UNMAP or REMAP event is on the way); let
                // a waiting thread fault again on whatever is there now.
                t.stats.pages_dropped += t.ranges.clear(span.runtime, span.runtime + PAGE_SIZE);
                match uffd.wake(span.runtime, PAGE_SIZE) {
                    Err(CopyError::Gone) => Ok(Fill::Gone),
                    _ => Ok(Fill::Done),
                }
            }
            Err(e) => Err(self.uffd_error(idx, "UFFDIO_COPY", span.runtime, PAGE_SIZE, e)),
        }
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
                self.serve_fault(r.task, r.page, r.read_at)?;
            }
        }
        Ok(())
    }

    // ---- background ----------------------------------------------------------------------

    /// Copies one chunk for the next task (round robin) that has background work.
    fn background_step(&mut self) -> Result<(), EngineError> {
        let now = Instant::now();
        let n = self.tasks.len();
        let Some(idx) = (0..n)
            .map(|k| (self.rr + k) % n)
            .find(|&i| self.tasks[i].has_background_work(now))
        else {
            return Ok(());
        };
        self.rr = (idx + 1) % n;
        self.tasks[idx].backoff_until = None;
        let Some(span) = self.tasks[idx].ranges.next_chunk(self.chunk_pages) else {
            return Ok(());
        };
        let bytes = span.bytes() as usize;
        let pid = self.tasks[idx].stats.image_pid;
        self.source
            .read(span.file, span.offset, &mut self.chunk_buf[..bytes])
            .map_err(|source| EngineError::PageRead {
                pid,
                image_addr: span.image,
                source,
            })?;
        self.dirty = true;
        let mut done = 0usize;
        while done < bytes {
            let t = &mut self.tasks[idx];
            let Some(uffd) = t.uffd.as_ref() else {
                return Ok(());
            };
            let dst = span.runtime + done as u64;
            match uffd.copy(dst, &self.chunk_buf[done..bytes], false) {
                Ok(n) => {
                    let n = n - n % PAGE_SIZE as usize;
                    if n == 0 {
                        t.backoff_until = Some(Instant::now() + EAGAIN_BACKOFF);
                        return Ok(());
                    }
                    t.ranges.clear(dst, dst + n as u64);
                    t.stats.pages_background += n as u64 / PAGE_SIZE;
                    t.stats.bytes_copied += n as u64;
                    done += n;
                }
                Err(CopyError::Exists) => {
                    t.stats.pages_present += t.ranges.clear(dst, dst + PAGE_SIZE);
                    done += PAGE_SIZE as usize;
                }
                Err(CopyError::Again) => {
                    t.stats.eagain_retries += 1;
                    t.backoff_until = Some(Instant::now() + EAGAIN_BACKOFF);
                    return Ok(());
                }
                Err(CopyError::Gone) => {
                    self.task_exited(idx);
                    return Ok(());
                }
                Err(CopyError::NoMapping) => {
                    // Nothing registered there any more: nobody can ever read these pages.
                    t.stats.pages_dropped += t.ranges.clear(dst, span.runtime + bytes as u64);
                    return Ok(());
                }
                Err(e) => {
                    return Err(self.uffd_error(idx, "UFFDIO_COPY", dst, (bytes - done) as u64, e))
                }
            }
        }
        Ok(())
    }

    // ---- reporting -----------------------------------------------------------------------

    fn check_done(&mut self) {
        let at_us = self.us();
        let mut finished = Vec::new();
        for t in &mut self.tasks {
            t.stats.pages_pending = t.ranges.pending_pages();
            if t.received && t.stats.done_us.is_none() && t.ranges.pending_pages() == 0 {
                t.stats.done_us = Some(at_us);
                finished.push(t.stats.clone());
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
            t.stats.pages_pending = t.ranges.pending_pages();
        }
        let tasks: Vec<TaskStats> = self.tasks.iter().map(|t| t.stats.clone()).collect();
        let (user_us, sys_us) = sys::thread_cpu_time_us();
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
        }
    }
}
