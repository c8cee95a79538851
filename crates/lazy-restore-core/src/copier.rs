//! The copier thread (policy `background.thread = copier`): bulk UFFDIO_COPY of prefetch and
//! background chunks, so the fault loop never copies a chunk and a fault never waits for one.
//!
//! The fault loop picks the pages (they stop being pending when handed over) and queues a
//! [`Job`]; the copier copies it in pieces of at most [`COPIER_IOCTL_BYTES`] and hands it back
//! with its counts through the loop's epoll (a byte on a socket pair).
//!
//! **Faults never wait; events wait for one piece.** Reading a REMOVE, REMAP or UNMAP event
//! completes it: the task goes on at once (zaps the pages, moves them). A COPY already running
//! in the copier at that moment could then install old bytes into a page the task just
//! dropped or moved in. So every copier ioctl runs under the slot lock, and the loop reads
//! *events* of a task that has a job in flight only while it holds that lock
//! ([`CopierHandle::hold`]), then fixes the jobs (cuts dropped pages, re-pends moved ones)
//! before letting go. *Faults* are read without the lock: the loop reads at most as many
//! messages as the kernel says faults are queued (`Uffd::pending_faults`; `read(2)` returns
//! queued faults before events, and the copier copies with DONTWAKE so it never dequeues a
//! fault behind the loop's back). A fault on a page the copier has not reached yet is served
//! by the loop itself from the source (whoever copies second gets EEXIST; the bytes are the
//! same), so no fault ever waits for a piece, a chunk or a `pread`.

use crate::ranges::PageSpan;
use crate::source::{PageSource, SourceError};
use crate::uffd::{self, CopyError, PAGE_SIZE};
use std::collections::VecDeque;
use std::io::Write;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Largest single UFFDIO_COPY of the copier: what a REMOVE/REMAP/UNMAP/FORK event of the
/// same task may wait for (faults never wait for it; CRIU makes everything wait for its 4 MiB
/// chunks). 4 MiB, ~1.3 ms: fewer, bigger ioctls are faster here — 2 GiB of the default
/// policy ran 3.05 [2.79-3.24] GB/s with 4 MiB pieces, 2.74-2.83 with 1 MiB (measure_policies
/// "default"; prefaulting the source with MADV_POPULATE_READ did not help).
pub const COPIER_IOCTL_BYTES: u64 = 4 * 1024 * 1024;

/// What installed a page (for the copy log and the per-kind counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    /// The faulting page itself.
    Fault,
    /// A page of a fault's readahead window.
    Readahead,
    /// A page of the policy's prefetch list.
    Prefetch,
    /// A background chunk.
    Background,
}

/// One successful install, for tests that check order and sizes (see `EngineConfig::copy_log`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyRecord {
    /// Index of the served task (plan order, then forked children).
    pub task: usize,
    pub kind: CopyKind,
    /// Run-time address of the first page.
    pub runtime: u64,
    pub pages: u64,
}

/// A shared log of installs, oldest first.
pub type CopyLog = Arc<Mutex<Vec<CopyRecord>>>;

pub(crate) fn log(log: &Option<CopyLog>, rec: CopyRecord) {
    if let Some(l) = log {
        l.lock().unwrap_or_else(|p| p.into_inner()).push(rec);
    }
}

/// Why a job stopped with an error (the loop turns it into an `EngineError`).
#[derive(Debug)]
pub(crate) enum JobError {
    Source {
        image_addr: u64,
        source: SourceError,
    },
    Uffd {
        addr: u64,
        len: u64,
        source: CopyError,
    },
}

/// Pages of one task for the copier, and what became of them.
#[derive(Debug)]
pub(crate) struct Job {
    /// Unique per engine (the loop's bookkeeping refers to it).
    pub id: u64,
    pub task: usize,
    pub kind: CopyKind,
    pub fd: Arc<OwnedFd>,
    /// Still to copy, run-time addresses, in order.
    pub spans: VecDeque<PageSpan>,
    pub installed: u64,
    pub exists: u64,
    pub dropped: u64,
    pub eagain: u64,
    pub gone: bool,
    pub error: Option<JobError>,
    /// Mapped bytes used, per file: (file, end offset, image address there), checked against
    /// the file size once the job is done (see `PageSource::check_mapped`).
    mapped_ends: Vec<(u32, u64, u64)>,
}

impl Job {
    pub fn new(
        id: u64,
        task: usize,
        kind: CopyKind,
        fd: Arc<OwnedFd>,
        spans: VecDeque<PageSpan>,
    ) -> Self {
        Self {
            id,
            task,
            kind,
            fd,
            spans,
            installed: 0,
            exists: 0,
            dropped: 0,
            eagain: 0,
            gone: false,
            error: None,
            mapped_ends: Vec::new(),
        }
    }

    fn note_mapped(&mut self, file: u32, end: u64, image: u64) {
        match self.mapped_ends.iter_mut().find(|(f, _, _)| *f == file) {
            Some(e) if e.1 < end => *e = (file, end, image),
            Some(_) => {}
            None => self.mapped_ends.push((file, end, image)),
        }
    }

    /// After the last copy: the files still hold every mapped byte the job used.
    fn check_mapped(&mut self, source: &dyn PageSource) {
        if self.error.is_some() {
            return;
        }
        for &(file, end, image) in &self.mapped_ends {
            if let Err(source) = source.check_mapped(file, 0, end) {
                self.error = Some(JobError::Source {
                    image_addr: image,
                    source,
                });
                return;
            }
        }
    }

    /// Pages not copied (nor dropped) yet.
    pub fn remaining(&self) -> u64 {
        self.spans.iter().map(|s| s.pages).sum()
    }

    fn advance(&mut self, pages: u64) {
        let Some(s) = self.spans.front_mut() else {
            return;
        };
        let pages = pages.min(s.pages);
        s.runtime += pages * PAGE_SIZE;
        s.image += pages * PAGE_SIZE;
        s.offset += pages * PAGE_SIZE;
        s.pages -= pages;
        if s.pages == 0 {
            self.spans.pop_front();
        }
    }

    /// Removes run-time `[start, end)` from the job; returns the removed pieces.
    fn cut(&mut self, start: u64, end: u64) -> Vec<PageSpan> {
        cut_spans(&mut self.spans, start, end)
    }
}

/// Removes run-time `[start, end)` from `spans`; returns the removed pieces.
pub(crate) fn cut_spans(spans: &mut VecDeque<PageSpan>, start: u64, end: u64) -> Vec<PageSpan> {
    let mut cut = Vec::new();
    let mut kept = VecDeque::with_capacity(spans.len());
    for s in spans.drain(..) {
        let (lo, hi) = (s.runtime, s.runtime + s.pages * PAGE_SIZE);
        if hi <= start || lo >= end {
            kept.push_back(s);
            continue;
        }
        let piece = |from: u64, to: u64| PageSpan {
            runtime: from,
            image: s.image + (from - lo),
            file: s.file,
            offset: s.offset + (from - lo),
            pages: (to - from) / PAGE_SIZE,
        };
        if lo < start {
            kept.push_back(piece(lo, start));
        }
        cut.push(piece(lo.max(start), hi.min(end)));
        if hi > end {
            kept.push_back(piece(end, hi));
        }
    }
    *spans = kept;
    cut
}

/// The queue shared by the loop and the copier; every copier ioctl runs while it is locked.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    active: Option<Job>,
    queued: VecDeque<Job>,
    done: Vec<Job>,
    stop: bool,
}

impl Slot {
    /// Cuts run-time `[start, end)` out of every job of `task`; returns the pieces.
    pub fn cut(&mut self, task: usize, start: u64, end: u64) -> Vec<PageSpan> {
        let mut out = Vec::new();
        for j in self.active.iter_mut().chain(self.queued.iter_mut()) {
            if j.task == task {
                out.extend(j.cut(start, end));
            }
        }
        out
    }

    /// Every page still to copy for `task` (a fork must fetch them again for the child).
    pub fn spans_of(&self, task: usize) -> Vec<PageSpan> {
        self.active
            .iter()
            .chain(self.queued.iter())
            .filter(|j| j.task == task)
            .flat_map(|j| j.spans.iter().copied())
            .collect()
    }
}

#[derive(Debug)]
struct Shared {
    slot: Mutex<Slot>,
    cv: Condvar,
    /// The loop is waiting for the slot: the copier steps aside after its current piece.
    loop_wants: AtomicBool,
    poke: UnixStream,
    ioctl_pages: u64,
    /// The copier thread's own CPU time (user, sys µs) as of its last finished job, so the
    /// report's daemon CPU covers the thread that does most of the copying.
    cpu_us: [AtomicU64; 2],
}

fn lock(m: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A cloneable handle on the copier's queue, for the fault loop.
#[derive(Debug, Clone)]
pub(crate) struct CopierHandle(Arc<Shared>);

/// The slot, locked by the loop. No copier ioctl runs while it lives.
pub(crate) struct Hold<'a> {
    guard: MutexGuard<'a, Slot>,
    flag: &'a AtomicBool,
}

impl Deref for Hold<'_> {
    type Target = Slot;
    fn deref(&self) -> &Slot {
        &self.guard
    }
}

impl DerefMut for Hold<'_> {
    fn deref_mut(&mut self) -> &mut Slot {
        &mut self.guard
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.flag.store(false, Ordering::SeqCst);
    }
}

/// Measurement counters (process-wide): holds the loop took, and ns it waited for them.
pub(crate) static HOLDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
pub(crate) static HOLD_WAIT_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl CopierHandle {
    /// The copier thread's CPU time (user, sys µs) as of its last finished job.
    pub fn cpu_time_us(&self) -> (u64, u64) {
        (
            self.0.cpu_us[0].load(Ordering::Relaxed),
            self.0.cpu_us[1].load(Ordering::Relaxed),
        )
    }

    /// Locks the slot (waiting at most for the copier's current piece).
    pub fn hold(&self) -> Hold<'_> {
        self.0.loop_wants.store(true, Ordering::SeqCst);
        let t = std::time::Instant::now();
        let guard = lock(&self.0.slot);
        HOLDS.fetch_add(1, Ordering::Relaxed);
        HOLD_WAIT_NS.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Hold {
            guard,
            flag: &self.0.loop_wants,
        }
    }

    /// Queues a job.
    pub fn submit(&self, job: Job) {
        lock(&self.0.slot).queued.push_back(job);
        self.0.cv.notify_one();
    }

    /// Jobs the copier finished since the last call.
    pub fn take_done(&self) -> Vec<Job> {
        std::mem::take(&mut lock(&self.0.slot).done)
    }
}

/// The copier thread. Stopped (after its current piece) and joined on drop.
#[derive(Debug)]
pub(crate) struct Copier {
    handle: CopierHandle,
    thread: Option<JoinHandle<()>>,
}

impl Copier {
    /// Starts the thread. `poke` is written one byte whenever a job is done.
    pub fn start(
        source: Arc<dyn PageSource + Sync>,
        poke: UnixStream,
        ioctl_bytes: u64,
        copy_log: Option<CopyLog>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot::default()),
            cv: Condvar::new(),
            loop_wants: AtomicBool::new(false),
            poke,
            ioctl_pages: (ioctl_bytes / PAGE_SIZE).max(1),
            cpu_us: [AtomicU64::new(0), AtomicU64::new(0)],
        });
        let sh = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("lazy-restore-copier".into())
            // Normal priority: nice 19 and SCHED_IDLE made no measurable difference to fault
            // latency here, and would let a CPU-bound restored tree starve the transfer.
            // (A 100 µs EEVDF slice or a sched_yield after each piece did not shorten the fault
            // tails beside a busy copier either: measure_policies "sparse".)
            .spawn(move || run(&sh, &*source, &copy_log))?;
        Ok(Self {
            handle: CopierHandle(shared),
            thread: Some(thread),
        })
    }

    pub fn handle(&self) -> CopierHandle {
        self.handle.clone()
    }

    /// Stops the thread after its current piece and waits for it.
    pub fn stop(&mut self) {
        lock(&self.handle.0.slot).stop = true;
        self.handle.0.cv.notify_one();
        if let Some(t) = self.thread.take() {
            // A panic in the copier already failed its job; nothing more to report here.
            let _ = t.join();
        }
    }
}

impl Drop for Copier {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What `buf` holds: `len` bytes of file `file` from `offset`.
#[derive(Debug, Clone, Copy)]
struct Held {
    file: u32,
    offset: u64,
    len: u64,
}

impl Held {
    fn covers(&self, file: u32, offset: u64, len: u64) -> bool {
        self.file == file && self.offset <= offset && offset + len <= self.offset + self.len
    }
}

fn run(sh: &Shared, source: &dyn PageSource, copy_log: &Option<CopyLog>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut held: Option<Held> = None;
    // Jobs up to this id were announced to the source (`PageSource::prepare`).
    let mut prepared = 0u64;
    let mut g = lock(&sh.slot);
    loop {
        if g.stop {
            return;
        }
        if g.active.is_none() {
            g.active = g.queued.pop_front();
        }
        // Announce the running job and the next one, so a remote source streams the next
        // job's pages while this one is copied (no round trip between jobs). Outside the
        // lock: a remote source may wait for its connection, and the loop must not wait.
        let announce: Vec<(u64, Vec<(u32, u64, u64)>)> = g
            .active
            .iter()
            .chain(g.queued.front())
            .filter(|job| job.id > prepared)
            .map(|job| (job.id, job.spans.iter().map(|s| (s.file, s.offset, s.bytes())).collect()))
            .collect();
        if !announce.is_empty() {
            drop(g);
            for (id, spans) in &announce {
                prepared = prepared.max(*id);
                source.prepare(*id, spans);
            }
            g = lock(&sh.slot);
            continue;
        }
        let Some(job) = g.active.as_mut() else {
            g = sh.cv.wait(g).unwrap_or_else(|p| p.into_inner());
            continue;
        };
        let front = job.spans.front().copied();
        let Some(span) = front.filter(|_| job.error.is_none() && !job.gone) else {
            if let Some(mut done) = g.active.take() {
                done.check_mapped(source);
                g.done.push(done);
                let (user, sys) = crate::sys::thread_cpu_time_us();
                sh.cpu_us[0].store(user, Ordering::Relaxed);
                sh.cpu_us[1].store(sys, Ordering::Relaxed);
            }
            // A full socket already means "wake up".
            let _ = (&sh.poke).write(&[1]);
            continue;
        };
        let pages = span.pages.min(sh.ioctl_pages);
        let len = pages * PAGE_SIZE;
        let fd = Arc::clone(&job.fd);
        let mapped = source.mapped(span.file, span.offset, len);
        let result = match mapped {
            // DONTWAKE: a thread faulting in this piece stays queued until the loop reads its
            // fault (and wakes it); so the loop's count of queued faults never shrinks behind
            // its back (see `Uffd::pending_faults`).
            Some(addr) => uffd::copy_from(fd.as_fd(), span.runtime, addr, len, true),
            // Bytes already read for an earlier piece (a copy that stopped at a page a fault
            // had installed, a job the loop changed meanwhile): image bytes never change, so
            // they are copied from the buffer, not read again (a remote source would fetch
            // them again over the network).
            None if held.is_some_and(|h| h.covers(span.file, span.offset, len)) => {
                let at = (span.offset - held.map_or(0, |h| h.offset)) as usize;
                uffd::copy(fd.as_fd(), span.runtime, &buf[at..at + len as usize], true)
            }
            None => {
                // Read outside the lock, then make sure the loop did not change the job.
                drop(g);
                held = None;
                buf.resize(len as usize, 0);
                let read = source.read(span.file, span.offset, &mut buf);
                if read.is_ok() {
                    held = Some(Held { file: span.file, offset: span.offset, len });
                }
                g = lock(&sh.slot);
                let Some(job) = g.active.as_mut() else {
                    continue;
                };
                if job
                    .spans
                    .front()
                    .is_none_or(|s| s.runtime != span.runtime || s.pages < pages)
                {
                    continue;
                }
                if let Err(source) = read {
                    job.error = Some(JobError::Source {
                        image_addr: span.image,
                        source,
                    });
                    continue;
                }
                uffd::copy(fd.as_fd(), span.runtime, &buf[..len as usize], true)
            }
        };
        let Some(job) = g.active.as_mut() else {
            continue;
        };
        match result {
            Ok(n) => {
                let done = n as u64 / PAGE_SIZE;
                if mapped.is_some() {
                    job.note_mapped(span.file, span.offset + done * PAGE_SIZE, span.image);
                }
                job.installed += done;
                job.advance(done);
                log(
                    copy_log,
                    CopyRecord {
                        task: job.task,
                        kind: job.kind,
                        runtime: span.runtime,
                        pages: done,
                    },
                );
            }
            Err(CopyError::Exists) => {
                job.exists += 1;
                job.advance(1);
            }
            Err(CopyError::Again) => {
                // The mm is changing; its event is waiting for the loop. Step aside.
                job.eagain += 1;
                drop(g);
                std::thread::sleep(Duration::from_micros(100));
                g = lock(&sh.slot);
                continue;
            }
            Err(CopyError::NoMapping) => {
                job.dropped += span.pages;
                job.advance(span.pages);
            }
            Err(CopyError::Gone) => job.gone = true,
            Err(e) => {
                let error = match (mapped, &e) {
                    (Some(_), CopyError::Fault) => source
                        .check_mapped(span.file, span.offset, len)
                        .err()
                        .map(|source| JobError::Source {
                            image_addr: span.image,
                            source,
                        }),
                    _ => None,
                };
                job.error = Some(error.unwrap_or(JobError::Uffd {
                    addr: span.runtime,
                    len,
                    source: e,
                }));
            }
        }
        // Let a waiting loop in before the next piece.
        drop(g);
        while sh.loop_wants.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        g = lock(&sh.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn span(runtime: u64, pages: u64) -> PageSpan {
        PageSpan {
            runtime,
            image: runtime + 0x100_0000,
            file: 0,
            offset: runtime - 0x1000,
            pages,
        }
    }

    #[test]
    fn cutting_splits_spans_and_keeps_file_positions() {
        let fd =
            Arc::new(crate::sys::userfaultfd(libc::O_CLOEXEC).expect("userfaultfd (needs root)"));
        let mut j = Job::new(
            1,
            0,
            CopyKind::Background,
            fd,
            VecDeque::from([span(0x1000, 8), span(0x20000, 4)]),
        );
        let cut = j.cut(0x1000 + 2 * P, 0x1000 + 4 * P);
        assert_eq!(cut.len(), 1);
        assert_eq!((cut[0].runtime, cut[0].pages), (0x1000 + 2 * P, 2));
        assert_eq!(cut[0].offset, 2 * P);
        assert_eq!(cut[0].image, 0x100_1000 + 2 * P);
        let left: Vec<(u64, u64)> = j.spans.iter().map(|s| (s.runtime, s.pages)).collect();
        assert_eq!(left, [(0x1000, 2), (0x1000 + 4 * P, 4), (0x20000, 4)]);
        assert_eq!(j.remaining(), 10);
        j.advance(1);
        assert_eq!(
            j.spans.front().map(|s| (s.runtime, s.offset)),
            Some((0x2000, P))
        );
        assert!(j.cut(0x9000_0000, 0x9000_1000).is_empty());
    }
}
