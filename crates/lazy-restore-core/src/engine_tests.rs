//! End-to-end tests of the engine against real userfaultfds. The test process plays both
//! parts: it is the "restored task" (an anonymous region registered with its own uffd) and
//! "criu restore" (it connects to the engine's socket, sends its pid and the uffd, then the
//! finished word). `kill_on_fatal` is off, since the served task is the test process itself.
//! Every wait is bounded, so a broken engine fails a test instead of hanging it.

use crate::handoff::{HandoffError, FINISHED_WORD};
use crate::source::SourceError;
use crate::sys::{self, testmem::Region};
use crate::uffd::{Event, PAGE_SIZE};
use crate::{
    Engine, EngineConfig, EngineError, EngineEvent, EngineHandle, Phase, RangePlan, Readahead,
    Report, TaskPlan,
};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

const P: usize = PAGE_SIZE as usize;
const FEATURES: u64 = 0x4e;

/// Fork duplicates every uffd in the process (each test's), so the fork test runs alone.
static FORK_LOCK: RwLock<()> = RwLock::new(());

fn shared_lock() -> std::sync::RwLockReadGuard<'static, ()> {
    FORK_LOCK.read().unwrap_or_else(|p| p.into_inner())
}

/// The expected 8-byte word `j` of file page `f`.
fn word(f: u64, j: usize) -> u64 {
    (f << 20 | j as u64 | 1 << 60).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn page_data(f: u64) -> Vec<u8> {
    (0..P / 8).flat_map(|j| word(f, j).to_ne_bytes()).collect()
}

fn check_page(buf: &[u8], f: u64) -> bool {
    buf.chunks_exact(8)
        .enumerate()
        .all(|(j, w)| u64::from_ne_bytes(w.try_into().unwrap_or([0; 8])) == word(f, j))
}

/// Runs `f` on a thread and fails the test if it does not finish within `secs`.
fn bounded<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(_) => panic!("timed out after {secs}s: {what}"),
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("lr-engine-{}-{n}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A registered region, a pages file, a config and an event log.
struct Setup {
    // Field order is drop order: the uffd must close before the region is unmapped, or the
    // munmap waits forever for someone to read its UNMAP event.
    uffd: Option<OwnedFd>,
    dir: TempDir,
    region: Arc<Region>,
    cfg: EngineConfig,
    events: Arc<Mutex<Vec<EngineEvent>>>,
    pages_path: PathBuf,
}

/// `region_pages` registered pages; the pages file holds `file_pages` pattern pages; `ranges`
/// are (first region page, pages, first file page). `prefill` pages are written with 0xAB
/// before registration (already present: EEXIST for the engine).
fn setup(
    name: &str,
    region_pages: usize,
    file_pages: u64,
    ranges: &[(usize, u64, u64)],
    prefill: &[usize],
) -> Setup {
    let dir = TempDir::new(name);
    let pages_path = dir.0.join("pages-1.img");
    let mut data = Vec::with_capacity(file_pages as usize * P);
    for f in 0..file_pages {
        data.extend(page_data(f));
    }
    std::fs::write(&pages_path, data).expect("write pages file");
    let region = Region::map(region_pages * P).expect("mmap");
    for &p in prefill {
        region.write(p * P, &[0xAB; P]);
    }
    let uffd =
        sys::userfaultfd(libc::O_CLOEXEC | libc::O_NONBLOCK).expect("userfaultfd (needs root)");
    sys::uffdio_api(&uffd, FEATURES).expect("UFFDIO_API 0x4e");
    sys::uffdio_register(
        uffd.as_fd(),
        region.addr(),
        region.len() as u64,
        sys::REGISTER_MODE_MISSING,
    )
    .expect("UFFDIO_REGISTER");
    let ranges = ranges
        .iter()
        .map(|&(first, pages, file_page)| RangePlan {
            start: region.addr() + (first * P) as u64,
            pages,
            file: 0,
            offset: file_page * PAGE_SIZE,
        })
        .collect();
    let mut cfg = EngineConfig::new(
        dir.0.join("lazy-pages.socket"),
        vec![TaskPlan {
            pid: sys::getpid(),
            ranges,
        }],
        vec![pages_path.clone()],
    );
    cfg.kill_on_fatal = false;
    cfg.progress_interval = Duration::from_millis(5);
    // The default policy (copier thread, 1 MiB chunks), but one page per fault so the tests
    // of the engine's mechanics can count pages exactly; readahead has tests of its own.
    cfg.policy.readahead = Readahead::OFF;
    Setup {
        dir,
        region: Arc::new(region),
        uffd: Some(uffd),
        cfg,
        events: Arc::default(),
        pages_path,
    }
}

impl Setup {
    fn start(&self) -> EngineHandle {
        let events = Arc::clone(&self.events);
        Engine::start(
            self.cfg.clone(),
            Box::new(move |e| events.lock().unwrap_or_else(|p| p.into_inner()).push(e)),
        )
        .expect("engine start")
    }

    fn socket(&self) -> &Path {
        &self.cfg.socket_path
    }

    /// Connects, sends our pid and uffd (and drops our copy, as a restored task does).
    fn handoff(&mut self) -> Criu {
        let mut c = Criu::connect(self.socket());
        let uffd = self.uffd.take().expect("uffd already sent");
        c.task(sys::getpid(), &uffd);
        c
    }

    /// Reads page `p` of the region on another thread (it may block on a fault).
    fn touch(&self, p: usize) -> Vec<u8> {
        let r = Arc::clone(&self.region);
        bounded(10, "touching a page", move || {
            let mut buf = vec![0u8; P];
            r.read(p * P, &mut buf);
            buf
        })
    }

    fn events(&self) -> Vec<EngineEvent> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The "criu restore" side of the socket.
struct Criu {
    s: UnixStream,
}

impl Criu {
    fn connect(path: &Path) -> Self {
        Self {
            s: UnixStream::connect(path).expect("connect to the engine socket"),
        }
    }

    fn int(&mut self, v: i32) {
        self.s.write_all(&v.to_ne_bytes()).expect("send int");
    }

    fn task(&mut self, pid: i32, uffd: &OwnedFd) {
        self.int(pid);
        sys::send_with_fd(self.s.as_fd(), &[0], uffd.as_fd()).expect("send uffd");
    }

    fn finished(&mut self) {
        self.s
            .write_all(&FINISHED_WORD.to_ne_bytes())
            .expect("send finished word");
    }
}

fn wait(h: EngineHandle) -> Result<Report, EngineError> {
    bounded(20, "engine wait", move || h.wait())
}

#[test]
fn faults_get_copies_holes_get_zeros_and_background_fills_the_rest() {
    let _l = shared_lock();
    // Pages 0..10 from file pages 0..10, a hole at 10..12, pages 12..64 from file pages 10..62.
    let mut s = setup("copy", 64, 62, &[(0, 10, 0), (12, 52, 10)], &[]);
    let h = s.start();
    let mut criu = s.handoff();
    // Before the finished word only faults are served.
    assert!(
        check_page(&s.touch(5), 5),
        "fault on page 5 must copy file page 5"
    );
    assert!(s.touch(11).iter().all(|&b| b == 0), "a hole reads as zeros");
    assert!(check_page(&s.touch(20), 18));
    std::thread::sleep(Duration::from_millis(20));
    let st = h.stats();
    assert_eq!(st.phase, Phase::FaultsOnly);
    assert_eq!(
        st.totals.pages_background, 0,
        "no background copy before the finished word"
    );
    criu.finished();
    let r = wait(h).expect("engine succeeds");
    let t = &r.tasks[0];
    assert_eq!((t.faults, t.pages_fault, t.pages_zero), (3, 2, 1));
    assert_eq!(t.pages_background, 62 - 2);
    assert_eq!(
        (t.pages_pending, t.pages_dropped, t.pages_present),
        (0, 0, 0)
    );
    assert_eq!(t.bytes_copied, 62 * PAGE_SIZE);
    assert!(t.done_us.is_some() && t.first_fault_us.is_some());
    assert_eq!(r.fault_latency.count, 3);
    assert!(r.fault_latency.max_us > 0);
    assert_eq!(r.faults_per_cpu.iter().sum::<u64>(), 3);
    assert!(r.timeline.connect_us <= r.timeline.all_uffds_us);
    assert!(r.timeline.all_uffds_us <= r.timeline.finished_us);
    assert!(r.timeline.finished_us <= r.timeline.done_us);
    assert_eq!(r.peer.map(|p| p.pid), Some(sys::getpid()));
    // Everything is in place now, without faults.
    let mut buf = vec![0u8; P];
    for p in 0..64 {
        s.region.read(p * P, &mut buf);
        match p {
            0..10 => assert!(check_page(&buf, p as u64), "page {p}"),
            10..12 => assert!(buf.iter().all(|&b| b == 0), "page {p}"),
            _ => assert!(check_page(&buf, p as u64 - 2), "page {p}"),
        }
    }
    let ev = s.events();
    let phases: Vec<Phase> = ev
        .iter()
        .filter_map(|e| {
            if let EngineEvent::Phase { phase, .. } = e {
                Some(*phase)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(phases, [Phase::FaultsOnly, Phase::Background, Phase::Done]);
    assert!(ev
        .iter()
        .any(|e| matches!(e, EngineEvent::Connected { .. })));
    assert!(ev.iter().any(|e| matches!(e, EngineEvent::TaskDone { .. })));
    assert!(ev.iter().any(|e| matches!(e, EngineEvent::Progress { .. })));
    assert!(matches!(
        ev.last(),
        Some(EngineEvent::End { error: None, .. })
    ));
}

#[test]
fn background_fills_everything_with_no_fault() {
    let _l = shared_lock();
    let mut s = setup("bg", 300, 300, &[(0, 300, 0)], &[]);
    s.cfg.policy = s.cfg.policy.clone().with_fixed_chunk(64 * 1024);
    let h = s.start();
    let mut criu = s.handoff();
    criu.finished();
    let r = wait(h).expect("engine succeeds");
    let t = &r.tasks[0];
    assert_eq!((t.faults, t.pages_background, t.pages_pending), (0, 300, 0));
    let mut buf = vec![0u8; P];
    for p in 0..300 {
        s.region.read(p * P, &mut buf);
        assert!(check_page(&buf, p as u64), "page {p}");
    }
    assert_eq!(r.fault_latency.count, 0);
}

#[test]
fn already_present_pages_count_as_done() {
    let _l = shared_lock();
    let mut s = setup("eexist", 16, 16, &[(0, 16, 0)], &[3, 9]);
    let h = s.start();
    let mut criu = s.handoff();
    criu.finished();
    let r = wait(h).expect("engine succeeds despite EEXIST");
    let t = &r.tasks[0];
    assert_eq!(
        (t.pages_present, t.pages_background, t.pages_pending),
        (2, 14, 0)
    );
    assert_eq!(s.touch(3), vec![0xAB; P], "a present page is left alone");
    assert!(check_page(&s.touch(4), 4));
}

#[test]
fn removed_pages_read_zero_and_are_dropped() {
    let _l = shared_lock();
    let mut s = setup("remove", 32, 32, &[(0, 32, 0)], &[]);
    let h = s.start();
    let mut criu = s.handoff();
    assert!(check_page(&s.touch(0), 0));
    let r = Arc::clone(&s.region);
    bounded(10, "madvise", move || r.dontneed(8 * P, 8 * P)).expect("MADV_DONTNEED");
    criu.finished();
    let r = wait(h).expect("engine finishes after REMOVE");
    let t = &r.tasks[0];
    assert_eq!(
        (t.pages_dropped, t.pages_fault, t.pages_background),
        (8, 1, 23)
    );
    for p in 8..16 {
        assert!(
            s.touch(p).iter().all(|&b| b == 0),
            "removed page {p} reads zero"
        );
    }
    assert!(check_page(&s.touch(16), 16));
}

#[test]
fn unmapped_pages_are_dropped() {
    let _l = shared_lock();
    let mut s = setup("unmap", 32, 32, &[(0, 32, 0)], &[]);
    let h = s.start();
    let mut criu = s.handoff();
    let r = Arc::clone(&s.region);
    bounded(10, "munmap", move || r.unmap_part(16 * P, 16 * P)).expect("munmap");
    criu.finished();
    let r = wait(h).expect("engine finishes after UNMAP");
    let t = &r.tasks[0];
    assert_eq!(
        (t.pages_dropped, t.pages_background, t.pages_pending),
        (16, 16, 0)
    );
    assert!(check_page(&s.touch(15), 15));
}

#[test]
fn remapped_pages_land_at_their_new_address() {
    let _l = shared_lock();
    let mut s = setup("remap", 32, 32, &[(0, 32, 0)], &[]);
    let dst = Arc::new(Region::map(16 * P).expect("mmap destination"));
    let h = s.start();
    let mut criu = s.handoff();
    let (src, d) = (Arc::clone(&s.region), Arc::clone(&dst));
    bounded(10, "mremap", move || {
        src.move_part_to(8 * P, 8 * P, &d, 4 * P)
    })
    .expect("mremap");
    // A fault at the new address is served from the page's image address.
    let d = Arc::clone(&dst);
    let page = bounded(10, "touch moved page", move || {
        let mut b = vec![0u8; P];
        d.read(6 * P, &mut b);
        b
    });
    assert!(check_page(&page, 10), "dst page 6 = src page 10");
    criu.finished();
    let r = wait(h).expect("engine finishes after REMAP");
    let t = &r.tasks[0];
    assert_eq!(
        (
            t.pages_dropped,
            t.pages_pending,
            t.pages_fault,
            t.pages_background
        ),
        (0, 0, 1, 31)
    );
    let mut buf = vec![0u8; P];
    for p in 0..8 {
        dst.read((4 + p) * P, &mut buf);
        assert!(check_page(&buf, 8 + p as u64), "moved page {p}");
    }
    assert!(check_page(&s.touch(7), 7));
    assert!(check_page(&s.touch(16), 16));
}

#[test]
fn forked_child_is_served_from_the_parents_pending_set() {
    let _l = FORK_LOCK.write().unwrap_or_else(|p| p.into_inner());
    let mut s = setup("fork", 16, 16, &[(0, 16, 0)], &[]);
    let h = s.start();
    let mut criu = s.handoff();
    assert!(check_page(&s.touch(1), 1));
    let region = Arc::clone(&s.region);
    let child = bounded(10, "fork", move || {
        // The child only reads memory and compares: no allocation, no locks.
        sys::testmem::fork_run(&|| {
            let mut buf = [0u8; P];
            for p in [1usize, 3] {
                region.read(p * P, &mut buf);
                for j in 0..P / 8 {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(&buf[j * 8..j * 8 + 8]);
                    if u64::from_ne_bytes(w) != word(p as u64, j) {
                        return 1;
                    }
                }
            }
            0
        })
    })
    .expect("fork");
    let code = bounded(10, "child exit", move || sys::testmem::wait_child(child)).expect("waitpid");
    assert_eq!(code, 0, "the child read the right bytes");
    criu.finished();
    let r = wait(h).expect("engine finishes with a forked child");
    assert_eq!(r.tasks.len(), 2);
    let c = &r.tasks[1];
    assert_eq!((c.image_pid, c.child_index), (sys::getpid(), 1));
    assert_eq!(
        c.pages_planned, 15,
        "the child inherits what was pending at fork"
    );
    assert_eq!(c.pages_fault, 1, "page 3 was faulted by the child");
    assert!(c.exited || c.pages_pending == 0);
    assert!(s
        .events()
        .iter()
        .any(|e| matches!(e, EngineEvent::TaskForked { child_index: 1, .. })));
    assert_eq!(r.tasks[0].pages_pending, 0);
    assert!(check_page(&s.touch(3), 3));
}

fn expect_handoff_error(r: Result<Report, EngineError>) -> HandoffError {
    match r {
        Err(EngineError::Handoff(e)) => e,
        other => panic!("expected a hand-off error, got {other:?}"),
    }
}

#[test]
fn unknown_pid_is_refused() {
    let _l = shared_lock();
    let s = setup("unknown", 4, 4, &[(0, 4, 0)], &[]);
    let h = s.start();
    let mut criu = Criu::connect(s.socket());
    criu.int(999_999);
    let e = expect_handoff_error(wait(h));
    assert!(
        matches!(e, HandoffError::UnknownPid { pid: 999_999 }),
        "{e}"
    );
}

#[test]
fn wrong_word_after_the_pids_is_refused() {
    let _l = shared_lock();
    let mut s = setup("badword", 4, 4, &[(0, 4, 0)], &[]);
    let h = s.start();
    let mut criu = s.handoff();
    criu.int(0x1234_5678);
    let r = wait(h);
    assert_eq!(r.as_ref().err().map(|e| e.code()), Some("HANDOFF_BAD_WORD"));
    let e = expect_handoff_error(r);
    assert!(matches!(e, HandoffError::BadWord { word: 0x1234_5678 }));
    assert!(e.to_string().contains("0x12345678"), "{e}");
}

#[test]
fn eof_before_all_pids_is_reported_with_counts() {
    let _l = shared_lock();
    let mut s = setup("eofpids", 4, 4, &[(0, 4, 0)], &[]);
    s.cfg.tasks.push(TaskPlan {
        pid: 999_998,
        ranges: vec![],
    });
    let h = s.start();
    let criu = s.handoff();
    drop(criu);
    let e = expect_handoff_error(wait(h));
    assert!(
        matches!(
            e,
            HandoffError::EofBeforePids {
                expected: 2,
                got: 1
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "restore ended before sending all 2 tasks: got 1"
    );
}

#[test]
fn eof_before_the_finished_word_means_restore_failed() {
    let _l = shared_lock();
    let mut s = setup("eoffin", 4, 4, &[(0, 4, 0)], &[]);
    let h = s.start();
    let criu = s.handoff();
    drop(criu);
    let e = expect_handoff_error(wait(h));
    assert!(matches!(e, HandoffError::EofBeforeFinished), "{e}");
    assert!(e
        .to_string()
        .contains("criu restore failed or was killed before it finished"));
}

#[test]
fn a_pid_without_fd_and_a_duplicate_pid_are_refused() {
    let _l = shared_lock();
    let s = setup("nofd", 4, 4, &[(0, 4, 0)], &[]);
    let h = s.start();
    let mut criu = Criu::connect(s.socket());
    criu.int(sys::getpid());
    criu.s.write_all(&[0]).expect("send the data byte alone");
    assert!(matches!(
        expect_handoff_error(wait(h)),
        HandoffError::NoFd { .. }
    ));

    let mut s = setup("dup", 4, 4, &[(0, 4, 0)], &[]);
    s.cfg.tasks.push(TaskPlan {
        pid: 999_997,
        ranges: vec![],
    });
    let h = s.start();
    let mut criu = s.handoff();
    criu.int(sys::getpid());
    let e = expect_handoff_error(wait(h));
    assert!(matches!(e, HandoffError::DuplicatePid { .. }), "{e}");
}

#[test]
fn zombies_need_no_fd_and_refused_peers_do_not_stop_listening() {
    let _l = shared_lock();
    let mut s = setup("zombie", 8, 8, &[(0, 8, 0)], &[]);
    s.cfg.tasks.insert(
        0,
        TaskPlan {
            pid: 999_996,
            ranges: vec![],
        },
    );
    let h = s.start();
    let mut criu = Criu::connect(s.socket());
    criu.int(-999_996);
    let uffd = s.uffd.take().expect("uffd");
    criu.task(sys::getpid(), &uffd);
    drop(uffd);
    criu.finished();
    let r = wait(h).expect("zombie + live task");
    assert!(r.tasks[0].zombie && r.tasks[0].exited);
    assert_eq!(r.tasks[1].pages_background, 8, "{:?}", r.tasks[1]);

    let mut s = setup("refused", 4, 4, &[(0, 4, 0)], &[]);
    s.cfg.allowed_uids = vec![4242];
    let mut h = s.start();
    let _refused = Criu::connect(s.socket());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !s
        .events()
        .iter()
        .any(|e| matches!(e, EngineEvent::Warning { .. }))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no warning for a refused peer"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!h.is_finished(), "still listening after a refused peer");
    let _again = Criu::connect(s.socket());
    bounded(10, "abort", move || h.abort("test over".into()));
    assert!(s.events().iter().any(|e| matches!(
        e,
        EngineEvent::End {
            code: Some("ABORTED"),
            ..
        }
    )));
}

#[test]
fn a_truncated_pages_file_is_a_source_error_naming_file_and_offset() {
    let _l = shared_lock();
    // pread: the first chunk's read comes up short at its start. Mapped: UFFDIO_COPY stops
    // with EFAULT at the first page wholly past the new end (page 5), never a SIGBUS.
    for (mapped, expect_offset) in [(false, 0u64), (true, 5 * PAGE_SIZE)] {
        let mut s = setup("trunc", 16, 16, &[(0, 16, 0)], &[]);
        s.cfg.map_page_files = mapped;
        let h = s.start();
        // Cut the file under the running engine, past page 4.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&s.pages_path)
            .and_then(|f| f.set_len(4 * PAGE_SIZE + 100))
            .expect("truncate");
        let mut criu = s.handoff();
        criu.finished();
        let r = wait(h);
        let e = r.expect_err("a short read must fail the engine");
        assert_eq!(e.code(), "SOURCE_SHORT_READ", "mapped {mapped}: {e}");
        match e.cause() {
            EngineError::PageRead {
                source: SourceError::ShortRead { path, offset, .. },
                ..
            } => {
                assert_eq!(path, &s.pages_path);
                assert_eq!(*offset, expect_offset, "mapped {mapped}");
            }
            other => panic!("expected a short read, got {other:?}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains("pages-1.img") && msg.contains(&format!("offset {expect_offset}")),
            "{msg}"
        );
        drop(s.dir);
    }
}

#[test]
fn a_file_too_short_for_the_plan_is_refused_at_start() {
    let _l = shared_lock();
    let mut s = setup("short", 4, 2, &[(0, 4, 0)], &[]);
    s.uffd = None;
    let e = Engine::start(s.cfg.clone(), Box::new(|_| {})).expect_err("start must fail");
    assert_eq!(e.code(), "SOURCE_TOO_SHORT");
    s.cfg.tasks[0].ranges[0].start += 1;
    let e = Engine::start(s.cfg.clone(), Box::new(|_| {})).expect_err("start must fail");
    assert_eq!(e.code(), "PLAN_INVALID");
}

#[test]
fn abort_stops_a_running_engine() {
    let _l = shared_lock();
    let mut s = setup("abort", 8, 8, &[(0, 8, 0)], &[]);
    let h = s.start();
    let _criu = s.handoff();
    std::thread::sleep(Duration::from_millis(10));
    h.finish_fast();
    let mut h = h;
    bounded(10, "abort", move || {
        h.abort("operator said stop".into());
        h
    });
    let ev = s.events();
    match ev.last() {
        Some(EngineEvent::End {
            error: Some(msg),
            code: Some("ABORTED"),
            ..
        }) => assert!(msg.contains("operator said stop")),
        other => panic!("expected an ABORTED end, got {other:?}"),
    }
}

#[test]
fn control_aborts_while_another_thread_waits() {
    let _l = shared_lock();
    let mut s = setup("control", 8, 8, &[(0, 8, 0)], &[]);
    let h = s.start();
    let control = h.control();
    let _criu = s.handoff();
    let waiter = std::thread::spawn(move || h.wait());
    std::thread::sleep(Duration::from_millis(10));
    assert!(!control.has_ended());
    assert_eq!(control.stats().phase, Phase::FaultsOnly);
    control.request_abort("first".into());
    control.request_abort("second".into());
    let c = control.clone();
    bounded(10, "wait_ended", move || c.wait_ended());
    assert!(control.has_ended());
    let r = bounded(10, "join", move || waiter.join().expect("waiter thread"));
    match r {
        Err(EngineError::Aborted { reason }) => assert_eq!(reason, "first"),
        other => panic!("expected Aborted, got {other:?}"),
    }
    assert_eq!(control.stats().phase, Phase::Done);
}

#[test]
fn junk_on_the_socket_fails_cleanly_and_the_peer_sees_eof_not_a_reset() {
    let _l = shared_lock();
    let s = setup("junk", 4, 4, &[(0, 4, 0)], &[]);
    let h = s.start();
    let mut criu = Criu::connect(s.socket());
    criu.s
        .write_all(b"this is not a pid message")
        .expect("send junk");
    let e = expect_handoff_error(wait(h));
    assert!(matches!(e, HandoffError::UnknownPid { .. }), "{e}");
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut criu.s, &mut buf);
    assert!(matches!(n, Ok(0)), "expected EOF, got {n:?}");
}

/// A real restored task in another process: a forked child registers the region with its own
/// uffd, hands the uffd to the test over a socketpair, then reads its memory.
#[test]
fn a_fatal_error_kills_the_served_task_and_reports_it() {
    let _l = FORK_LOCK.write().unwrap_or_else(|p| p.into_inner());
    let mut s = setup("kill", 16, 16, &[(0, 16, 0)], &[]);
    s.uffd = None; // the child makes its own
    s.cfg.kill_on_fatal = true;
    let (to_parent, from_child) = UnixStream::pair().expect("socketpair");
    let region = Arc::clone(&s.region);
    let child = sys::testmem::fork_run(&|| {
        // Syscalls only: the parent is multi-threaded.
        let Ok(uffd) = sys::userfaultfd(libc::O_CLOEXEC | libc::O_NONBLOCK) else {
            return 10;
        };
        if sys::uffdio_api(&uffd, FEATURES).is_err() {
            return 11;
        }
        let len = region.len() as u64;
        if sys::uffdio_register(uffd.as_fd(), region.addr(), len, sys::REGISTER_MODE_MISSING)
            .is_err()
        {
            return 12;
        }
        if sys::send_with_fd(to_parent.as_fd(), &[0], uffd.as_fd()).is_err() {
            return 13;
        }
        drop(uffd);
        let mut buf = [0u8; P];
        for p in 0..16 {
            region.read(p * P, &mut buf);
        }
        0 // read everything: the engine did not stop us
    })
    .expect("fork");
    drop(to_parent);
    from_child.set_nonblocking(true).expect("nonblocking");
    let uffd = bounded(10, "child's uffd", move || loop {
        match sys::recv_with_fds(from_child.as_fd(), &mut [0u8; 1]) {
            Ok(r) => break r.fds.into_iter().next(),
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    })
    .expect("the child sent its uffd");
    s.cfg.tasks[0].pid = child;
    let h = s.start();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&s.pages_path)
        .and_then(|f| f.set_len(2 * PAGE_SIZE))
        .expect("truncate");
    let mut criu = Criu::connect(s.socket());
    criu.task(child, &uffd);
    drop(uffd);
    criu.finished();
    let e = wait(h).expect_err("the short read is fatal");
    assert_eq!(e.code(), "SOURCE_SHORT_READ");
    assert_eq!(e.killed(), &[child], "{e}");
    assert!(e.to_string().contains("killed the served tree"), "{e}");
    let code = bounded(10, "child exit", move || sys::testmem::wait_child(child)).expect("waitpid");
    assert_eq!(
        code,
        128 + libc::SIGKILL,
        "the child must be killed, not run on zero pages"
    );
}

/// Not a check: prints fault latency (faults-only phase, sequential touches) and background
/// throughput for a 256 MiB region. `cargo test --release -- --ignored --nocapture measure`.
#[test]
#[ignore]
fn measure_fault_latency_and_background_throughput() {
    let _l = FORK_LOCK.write().unwrap_or_else(|p| p.into_inner());
    let pages = 65536usize;
    let mut s = setup("measure", pages, pages as u64, &[(0, pages as u64, 0)], &[]);
    let h = s.start();
    let mut criu = s.handoff();
    let r = Arc::clone(&s.region);
    let t0 = std::time::Instant::now();
    bounded(60, "touch", move || {
        let mut b = [0u8; 8];
        for p in 0..20_000 {
            r.read(p * 3 % pages * P, &mut b);
            std::hint::black_box(&b);
        }
    });
    let touch = t0.elapsed();
    criu.finished();
    let rep = wait(h).expect("engine");
    let l = &rep.fault_latency;
    let bg = rep.timeline.done_us.unwrap_or(0) - rep.timeline.finished_us.unwrap_or(0);
    let t = &rep.totals;
    eprintln!(
        "faults {} in {:?} ({:.1} µs each): p50 {} p90 {} p99 {} max {} mean {} µs; per cpu {:?}",
        l.count,
        touch,
        touch.as_secs_f64() * 1e6 / 20_000.0,
        l.p50_us,
        l.p90_us,
        l.p99_us,
        l.max_us,
        l.mean_us,
        rep.faults_per_cpu
    );
    eprintln!(
        "background {} pages in {} µs = {:.2} GB/s; engine cpu user {} sys {} µs",
        t.pages_background,
        bg,
        (t.pages_background * PAGE_SIZE) as f64 / bg.max(1) as f64 / 1000.0,
        rep.cpu_time.user_us,
        rep.cpu_time.sys_us
    );
}

// ---- policies ---------------------------------------------------------------------------

use crate::{
    BackgroundOrder, CopyKind, CopyLog, CopyRecord, CopyThread, Policy, PrefetchPlan,
    PrefetchRange, ReadaheadMode,
};

fn with_log(s: &mut Setup) -> CopyLog {
    let log = CopyLog::default();
    s.cfg.copy_log = Some(Arc::clone(&log));
    log
}

fn records(log: &CopyLog) -> Vec<CopyRecord> {
    log.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Region page of run-time address `a` in setup `s`.
fn page_of(s: &Setup, a: u64) -> u64 {
    (a - s.region.addr()) / PAGE_SIZE
}

/// A second task served from the same pages file: its own region and uffd, a made-up pid.
struct Extra {
    uffd: Option<OwnedFd>,
    region: Arc<Region>,
    pid: i32,
}

fn add_task(s: &mut Setup, pid: i32, pages: u64) -> Extra {
    let region = Region::map(pages as usize * P).expect("mmap");
    let uffd =
        sys::userfaultfd(libc::O_CLOEXEC | libc::O_NONBLOCK).expect("userfaultfd (needs root)");
    sys::uffdio_api(&uffd, FEATURES).expect("UFFDIO_API");
    sys::uffdio_register(
        uffd.as_fd(),
        region.addr(),
        region.len() as u64,
        sys::REGISTER_MODE_MISSING,
    )
    .expect("UFFDIO_REGISTER");
    s.cfg.tasks.push(TaskPlan {
        pid,
        ranges: vec![RangePlan {
            start: region.addr(),
            pages,
            file: 0,
            offset: 0,
        }],
    });
    Extra {
        uffd: Some(uffd),
        region: Arc::new(region),
        pid,
    }
}

fn criu_policy_setup(name: &str, pages: usize) -> Setup {
    let mut s = setup(name, pages, pages as u64, &[(0, pages as u64, 0)], &[]);
    s.cfg.policy = Policy::criu();
    s
}

#[test]
fn criu_policy_faults_take_one_page_and_chunks_grow_by_16_pages_then_reset() {
    let _l = shared_lock();
    // 64 MiB: the background needs a while, so a fault lands in the middle of it.
    let pages = 16_384;
    let mut s = criu_policy_setup("criu-chunks", pages);
    let log = with_log(&mut s);
    let h = s.start();
    let mut criu = s.handoff();
    assert!(check_page(&s.touch(pages / 2 + 3), (pages / 2 + 3) as u64));
    criu.finished();
    // Once the background has copied a few chunks, fault on the last page (copied last).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while records(&log)
        .iter()
        .filter(|r| r.kind == CopyKind::Background)
        .count()
        < 4
    {
        assert!(std::time::Instant::now() < deadline, "no background chunks");
        std::thread::yield_now();
    }
    assert!(check_page(&s.touch(pages - 1), pages as u64 - 1));
    let r = wait(h).expect("engine");
    let t = &r.tasks[0];
    assert_eq!((t.faults, t.pages_fault, t.pages_readahead), (2, 2, 0));
    assert_eq!(t.pages_background, pages as u64 - 2);
    assert_eq!(r.policy, "criu");
    let recs = records(&log);
    let faults: Vec<&CopyRecord> = recs.iter().filter(|r| r.kind == CopyKind::Fault).collect();
    assert!(faults.iter().all(|r| r.pages == 1), "one page per fault");
    // Chunk sizes: 16, 32, 48, ... pages, back to 16 right after the second fault.
    let second_fault = recs
        .iter()
        .position(|r| r.kind == CopyKind::Fault && page_of(&s, r.runtime) == pages as u64 - 1)
        .expect("the last page was faulted");
    let bg: Vec<u64> = recs[..second_fault]
        .iter()
        .filter(|r| r.kind == CopyKind::Background)
        .map(|r| r.pages)
        .collect();
    let expect: Vec<u64> = (1..=bg.len() as u64).map(|i| (16 * i).min(1024)).collect();
    assert_eq!(
        bg, expect,
        "16, 32, 48 … pages (the first fault was before the finished word)"
    );
    let after = recs[second_fault + 1..]
        .iter()
        .find(|r| r.kind == CopyKind::Background)
        .expect("background after the fault");
    assert_eq!(after.pages, 16, "a fault resets the chunk to 64 KiB");
    // Lowest address first: background records go up, except where a fault took a page.
    let addrs: Vec<u64> = recs
        .iter()
        .filter(|r| r.kind == CopyKind::Background)
        .map(|r| r.runtime)
        .collect();
    assert!(
        addrs.windows(2).all(|w| w[0] < w[1]),
        "lowest address first"
    );
}

#[test]
fn criu_policy_finishes_tasks_one_after_another_and_default_interleaves() {
    let _l = shared_lock();
    for (policy, interleaved) in [(Policy::criu(), false), (Policy::default(), true)] {
        let pages = 2048;
        let mut s = setup("tasks", pages, pages as u64, &[(0, pages as u64, 0)], &[]);
        s.cfg.policy = policy.with_fixed_chunk(64 * 1024);
        s.cfg.policy.readahead = Readahead::OFF;
        let log = with_log(&mut s);
        let mut extra = add_task(&mut s, 999_971, pages as u64);
        let h = s.start();
        let mut criu = s.handoff();
        let uffd = extra.uffd.take().expect("uffd");
        criu.task(extra.pid, &uffd);
        drop(uffd);
        criu.finished();
        let r = wait(h).expect("engine");
        assert_eq!(r.totals.pages_background, 2 * pages as u64);
        let order: Vec<usize> = records(&log)
            .iter()
            .filter(|r| r.kind == CopyKind::Background)
            .map(|r| r.task)
            .collect();
        let switches = order.windows(2).filter(|w| w[0] != w[1]).count();
        if interleaved {
            assert!(switches > 8, "tasks interleave: {switches} switches");
        } else {
            assert_eq!(switches, 1, "task 0 entirely, then task 1");
            assert_eq!(order[0], 0);
        }
        let mut buf = vec![0u8; P];
        for p in (0..pages).step_by(97) {
            extra.region.read(p * P, &mut buf);
            assert!(check_page(&buf, p as u64), "second task, page {p}");
        }
    }
}

/// Windows align to absolute addresses: a region of `pages` + 16 pages, and the first region
/// page whose address is 64 KiB aligned (the tests count pages from there).
fn readahead_setup(
    name: &str,
    pages: usize,
    mode: ReadaheadMode,
    min: u32,
    max: u32,
) -> (Setup, usize) {
    let n = pages + 16;
    let mut s = setup(name, n, n as u64, &[(0, n as u64, 0)], &[]);
    s.cfg.policy = Policy::default();
    s.cfg.policy.readahead = Readahead {
        mode,
        min_pages: min,
        max_pages: max,
        align: true,
    };
    let k = (16 - (s.region.addr() / PAGE_SIZE % 16) as usize) % 16;
    (s, k)
}

#[test]
fn readahead_installs_the_window_and_adapts_to_sequential_and_random_faults() {
    let _l = shared_lock();
    let (mut s, k) = readahead_setup("ra", 512, ReadaheadMode::Adaptive, 4, 16);
    let log = with_log(&mut s);
    let h = s.start();
    let mut criu = s.handoff();
    // A sequential scan: windows of 4, 8, 16, 16 pages (aligned), each fault the first page
    // after the previous window.
    for (fault, window) in [(6usize, 4..8usize), (8, 8..16), (16, 16..32), (32, 32..48)] {
        assert!(check_page(&s.touch(k + fault), (k + fault) as u64));
        for p in window {
            // Already there: no new fault.
            assert!(check_page(&s.touch(k + p), (k + p) as u64), "page {p}");
        }
    }
    // Random faults halve the window: 8, 4, 4.
    for fault in [300usize, 100, 200] {
        assert!(check_page(&s.touch(k + fault), (k + fault) as u64));
    }
    criu.finished();
    let r = wait(h).expect("engine");
    let t = &r.tasks[0];
    assert_eq!(
        t.faults, 7,
        "touching the rest of each window did not fault"
    );
    assert_eq!(t.pages_fault, 7);
    assert_eq!(t.pages_readahead, (4 + 8 + 16 + 16 + 8 + 4 + 4) - 7);
    assert_eq!(
        t.bytes_copied,
        (t.pages_fault + t.pages_readahead + t.pages_background) * PAGE_SIZE
    );
    assert_eq!(
        t.pages_fault + t.pages_readahead + t.pages_background,
        512 + 16
    );
    let windows: Vec<(u64, u64)> = records(&log)
        .iter()
        .filter(|r| matches!(r.kind, CopyKind::Fault | CopyKind::Readahead))
        .map(|r| (page_of(&s, r.runtime) - k as u64, r.pages))
        .collect();
    assert_eq!(
        windows,
        [
            (4, 4),
            (8, 8),
            (16, 16),
            (32, 16),
            (296, 8),
            (100, 4),
            (200, 4)
        ]
    );
    let mut buf = vec![0u8; P];
    for p in 0..512 + 16 {
        s.region.read(p * P, &mut buf);
        assert!(check_page(&buf, p as u64), "page {p}");
    }
}

#[test]
fn a_window_of_several_runs_is_woken_once_and_nobody_stays_blocked() {
    let _l = shared_lock();
    let (mut s, k) = readahead_setup("dontwake", 64, ReadaheadMode::Fixed, 16, 16);
    // Pages 8..10 are dropped (MADV_DONTNEED) first: the window [0, 16) is two runs, copied
    // with DONTWAKE and woken with one UFFDIO_WAKE.
    let log = with_log(&mut s);
    let h = s.start();
    let mut criu = s.handoff();
    let r = Arc::clone(&s.region);
    bounded(10, "madvise", move || r.dontneed((k + 8) * P, 3 * P)).expect("MADV_DONTNEED");
    // Eight threads fault inside the window at once; every one must come back.
    let region = Arc::clone(&s.region);
    let got = bounded(10, "eight touchers", move || {
        let threads: Vec<_> = [1usize, 2, 3, 6, 7, 12, 14, 15]
            .into_iter()
            .map(|p| {
                let (r, p) = (Arc::clone(&region), p + k);
                std::thread::spawn(move || {
                    let mut b = vec![0u8; P];
                    r.read(p * P, &mut b);
                    (p, check_page(&b, p as u64))
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("toucher"))
            .collect::<Vec<_>>()
    });
    assert!(got.iter().all(|&(_, ok)| ok), "{got:?}");
    criu.finished();
    let rep = wait(h).expect("engine");
    let t = &rep.tasks[0];
    assert_eq!(t.pages_dropped, 3);
    let runs: Vec<(u64, u64)> = records(&log)
        .iter()
        .filter(|r| matches!(r.kind, CopyKind::Fault | CopyKind::Readahead))
        .map(|r| (page_of(&s, r.runtime) - k as u64, r.pages))
        .collect();
    assert_eq!(
        runs,
        [(0, 8), (11, 5)],
        "two runs around the dropped pages, one window"
    );
    assert!(
        s.touch(k + 9).iter().all(|&b| b == 0),
        "dropped pages read zero"
    );
}

#[test]
fn prefetch_pages_come_first_in_their_order_before_any_background() {
    let _l = shared_lock();
    for thread in [CopyThread::Loop, CopyThread::Copier] {
        let pages = 1024u64;
        let mut s = setup("prefetch", pages as usize, pages, &[(0, pages, 0)], &[]);
        s.cfg.policy = Policy::default().with_fixed_chunk(64 * 1024);
        s.cfg.policy.background.thread = thread;
        let base = s.region.addr();
        let range = |page: u64, n: u64| PrefetchRange {
            start: base + page * PAGE_SIZE,
            pages: n,
        };
        s.cfg.policy.prefetch = vec![PrefetchPlan {
            pid: sys::getpid(),
            ranges: vec![range(700, 40), range(5, 3), range(300, 2)],
        }];
        let log = with_log(&mut s);
        let h = s.start();
        let mut criu = s.handoff();
        criu.finished();
        let r = wait(h).expect("engine");
        let t = &r.tasks[0];
        assert_eq!(
            (t.pages_prefetch, t.pages_background),
            (45, pages - 45),
            "{thread:?}"
        );
        let pre = r.timeline.prefetch_done_us.expect("prefetch done");
        assert!(r.timeline.finished_us <= Some(pre) && Some(pre) <= r.timeline.done_us);
        let recs = records(&log);
        let first_bg = recs
            .iter()
            .position(|r| r.kind == CopyKind::Background)
            .expect("background");
        let pre: Vec<(u64, u64)> = recs[..first_bg]
            .iter()
            .map(|r| {
                assert_eq!(r.kind, CopyKind::Prefetch);
                (page_of(&s, r.runtime), r.pages)
            })
            .collect();
        assert_eq!(
            pre,
            [(700, 16), (716, 16), (732, 8), (5, 3), (300, 2)],
            "{thread:?}"
        );
        assert!(recs[first_bg..]
            .iter()
            .all(|r| r.kind == CopyKind::Background));
        let mut buf = vec![0u8; P];
        for p in 0..pages as usize {
            s.region.read(p * P, &mut buf);
            assert!(check_page(&buf, p as u64), "page {p}");
        }
    }
}

#[test]
fn fault_traces_keep_first_need_order_in_image_addresses() {
    let _l = shared_lock();
    let mut s = setup("trace", 64, 64, &[(0, 64, 0)], &[]);
    s.cfg.policy.record_faults = true;
    let h = s.start();
    let mut criu = s.handoff();
    for p in [7usize, 3, 9, 3] {
        assert!(check_page(&s.touch(p), p as u64));
    }
    assert!(
        h.stats().fault_traces.is_empty(),
        "traces are for the report only"
    );
    criu.finished();
    let r = wait(h).expect("engine");
    assert_eq!(r.fault_traces.len(), 1);
    let tr = &r.fault_traces[0];
    let base = s.region.addr();
    let pages: Vec<u64> = tr
        .faults
        .iter()
        .map(|f| (f.addr - base) / PAGE_SIZE)
        .collect();
    assert_eq!(pages, [7, 3, 9], "each page once, in first-need order");
    assert!(tr.faults.windows(2).all(|w| w[0].at_us <= w[1].at_us));
    assert_eq!(tr.truncated, 0);
}

#[test]
fn faults_are_served_while_the_copier_runs_a_chunk_without_waiting_for_it() {
    let _l = shared_lock();
    // One 32 MiB job: the copier copies it in 256 KiB pieces.
    let pages = 8192u64;
    let mut s = setup("copier", pages as usize, pages, &[(0, pages, 0)], &[]);
    s.cfg.policy = Policy::default().with_fixed_chunk(32 << 20);
    s.cfg.policy.readahead = Readahead::OFF;
    let log = with_log(&mut s);
    let h = s.start();
    let mut criu = s.handoff();
    criu.finished();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while records(&log).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the copier never started"
        );
        std::thread::yield_now();
    }
    let last = pages as usize - 1;
    assert!(check_page(&s.touch(last), last as u64));
    let r = wait(h).expect("engine");
    let t = &r.tasks[0];
    assert_eq!((t.pages_fault, t.pages_background), (1, pages - 1));
    let recs = records(&log);
    let fault = recs
        .iter()
        .position(|r| r.kind == CopyKind::Fault)
        .expect("the fault was served from the source");
    assert!(
        recs[fault + 1..]
            .iter()
            .any(|r| r.kind == CopyKind::Background),
        "the job was still running when the fault was served"
    );
    assert!(
        !recs
            .iter()
            .filter(|r| r.kind == CopyKind::Background)
            .any(|r| page_of(&s, r.runtime) <= last as u64
                && (last as u64) < page_of(&s, r.runtime) + r.pages),
        "the faulted page was cut out of the copier's job"
    );
}

#[test]
fn pages_removed_while_the_copier_holds_them_read_zero() {
    let _l = shared_lock();
    let pages = 8192u64;
    let mut s = setup("copier-rm", pages as usize, pages, &[(0, pages, 0)], &[]);
    s.cfg.policy = Policy::default().with_fixed_chunk(32 << 20);
    let log = with_log(&mut s);
    let h = s.start();
    let mut criu = s.handoff();
    criu.finished();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while records(&log).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the copier never started"
        );
        std::thread::yield_now();
    }
    let r = Arc::clone(&s.region);
    let at = pages as usize - 512;
    bounded(10, "madvise", move || r.dontneed(at * P, 256 * P)).expect("MADV_DONTNEED");
    let rep = wait(h).expect("engine");
    let t = &rep.tasks[0];
    assert_eq!(
        t.pages_background + t.pages_dropped + t.pages_present,
        pages,
        "{t:?}"
    );
    let mut buf = vec![0u8; P];
    for p in 0..pages as usize {
        s.region.read(p * P, &mut buf);
        if (at..at + 256).contains(&p) {
            assert!(buf.iter().all(|&b| b == 0), "removed page {p} reads zero");
        } else {
            assert!(check_page(&buf, p as u64), "page {p}");
        }
    }
}

// ---- measurements (ignored; `cargo test --release -p lazy-restore-core --lib measure_policies
// -- --ignored --nocapture`) -------------------------------------------------------------

/// A page file shared by several measured engines (written once: 2 GiB takes a while).
struct BigFile {
    _dir: TempDir,
    path: PathBuf,
}

fn big_file(pages: u64) -> BigFile {
    let dir = TempDir::new("measure");
    let path = dir.0.join("pages-1.img");
    let mut f =
        std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&path).expect("create"));
    for p in 0..pages {
        // First and last word per page are enough to check placement.
        let mut page = [0u8; P];
        page[..8].copy_from_slice(&word(p, 0).to_ne_bytes());
        page[P - 8..].copy_from_slice(&word(p, P / 8 - 1).to_ne_bytes());
        f.write_all(&page).expect("write");
    }
    f.flush().expect("flush");
    drop(f);
    // Into the page cache: this measures the engine, not the disk.
    let data = std::fs::File::open(&path).expect("open");
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while std::os::unix::fs::FileExt::read_at(&data, &mut buf, off).unwrap_or(0) > 0 {
        off += buf.len() as u64;
    }
    BigFile { _dir: dir, path }
}

struct Served {
    region: Arc<Region>,
    criu: Criu,
    h: EngineHandle,
    _dir: TempDir,
}

/// Reads the file so it is in the page cache (this VM's DAMON pages out cold page cache).
fn warm(file: &BigFile) {
    let data = std::fs::File::open(&file.path).expect("open");
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while std::os::unix::fs::FileExt::read_at(&data, &mut buf, off).unwrap_or(0) > 0 {
        off += buf.len() as u64;
    }
}

fn serve_big(file: &BigFile, pages: u64, policy: Policy, mapped: bool) -> Served {
    serve_big_with(
        file,
        pages,
        policy,
        mapped,
        crate::copier::COPIER_IOCTL_BYTES,
    )
}

fn serve_big_with(file: &BigFile, pages: u64, policy: Policy, mapped: bool, ioctl: u64) -> Served {
    warm(file);
    let dir = TempDir::new("measure-sock");
    let region = Region::map(pages as usize * P).expect("mmap");
    let uffd = sys::userfaultfd(libc::O_CLOEXEC | libc::O_NONBLOCK).expect("userfaultfd");
    sys::uffdio_api(&uffd, FEATURES).expect("api");
    sys::uffdio_register(
        uffd.as_fd(),
        region.addr(),
        region.len() as u64,
        sys::REGISTER_MODE_MISSING,
    )
    .expect("register");
    let mut cfg = EngineConfig::new(
        dir.0.join("lazy-pages.socket"),
        vec![TaskPlan {
            pid: sys::getpid(),
            ranges: vec![RangePlan {
                start: region.addr(),
                pages,
                file: 0,
                offset: 0,
            }],
        }],
        vec![file.path.clone()],
    );
    cfg.kill_on_fatal = false;
    cfg.policy = policy;
    cfg.map_page_files = mapped;
    cfg.copier_ioctl_bytes = ioctl;
    let h = Engine::start(cfg, Box::new(|_| {})).expect("engine");
    let mut criu = Criu::connect(&dir.0.join("lazy-pages.socket"));
    criu.task(sys::getpid(), &uffd);
    drop(uffd);
    Served {
        region: Arc::new(region),
        criu,
        h,
        _dir: dir,
    }
}

fn pct(v: &mut [u64]) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_unstable();
    let at = |p: f64| v[((p * v.len() as f64) as usize).min(v.len() - 1)] as f64 / 1000.0;
    (at(0.5), at(0.99), v[v.len() - 1] as f64 / 1000.0)
}

/// Touches `n` pages (random or sequential) and returns per-touch ns.
fn toucher(
    region: &Arc<Region>,
    pages: u64,
    n: usize,
    seq: bool,
    stop: Option<Arc<std::sync::atomic::AtomicBool>>,
) -> Vec<u64> {
    toucher_gap(region, pages, n, seq, stop, None)
}

/// [`toucher`] with a pause between touches (sporadic faults instead of a storm).
fn toucher_gap(
    region: &Arc<Region>,
    pages: u64,
    n: usize,
    seq: bool,
    stop: Option<Arc<std::sync::atomic::AtomicBool>>,
    gap: Option<Duration>,
) -> Vec<u64> {
    let mut out = Vec::with_capacity(n);
    let mut x = 0x2545_F491_4F6C_DD1Du64 ^ pages;
    let mut b = [0u8; 8];
    for i in 0..n {
        if stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
            break;
        }
        let p = if seq {
            i as u64 % pages
        } else {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % pages
        };
        // Only touches that fault are timed (as in limits.md).
        let fault = !region.resident(p as usize * P);
        let t = std::time::Instant::now();
        region.read(p as usize * P, &mut b);
        if fault {
            out.push(t.elapsed().as_nanos() as u64);
        }
        if u64::from_ne_bytes(b) != word(p, 0) {
            panic!("page {p} has the wrong bytes");
        }
        if let Some(g) = gap {
            std::thread::sleep(g);
        }
    }
    out
}

#[test]
#[ignore]
fn measure_policies() {
    let _l = FORK_LOCK.write().unwrap_or_else(|p| p.into_inner());
    let which = std::env::var("MEASURE").unwrap_or_else(|_| "bulk,faults,readahead".into());
    let gib2 = 512 * 1024u64; // 2 GiB in pages
    let file = big_file(gib2);
    let variants = |base: Policy| {
        let mut v = Vec::new();
        v.push(("criu (loop, 64K..4M)", Policy::criu()));
        for (label, thread, chunk) in [
            ("loop 256K", CopyThread::Loop, 256u64 << 10),
            ("loop 1M", CopyThread::Loop, 1 << 20),
            ("copier 256K", CopyThread::Copier, 256 << 10),
            ("copier 1M", CopyThread::Copier, 1 << 20),
            ("copier 4M", CopyThread::Copier, 4 << 20),
            ("copier 16M", CopyThread::Copier, 16 << 20),
        ] {
            let mut p = base.clone().with_fixed_chunk(chunk);
            p.background.thread = thread;
            v.push((label, p));
        }
        v
    };
    let reps: usize = std::env::var("MEASURE_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    if which.contains("bulk") {
        eprintln!("\n== full transfer of 2 GiB, no faults: GB/s = bytes / (done - finished), median [min-max] of {reps}, runs interleaved");
        let mut rows: Vec<(String, Vec<f64>, Vec<u64>)> = Vec::new();
        for _ in 0..reps {
            let mut i = 0;
            for mapped in [false, true] {
                for (label, policy) in variants(Policy::default()) {
                    let mut sv = serve_big(&file, gib2, policy, mapped);
                    sv.criu.finished();
                    let r = bounded(120, "bulk", move || sv.h.wait()).expect("engine");
                    let us = r.timeline.done_us.unwrap_or(0) - r.timeline.finished_us.unwrap_or(0);
                    let gbs = (gib2 * PAGE_SIZE) as f64 / us.max(1) as f64 / 1000.0;
                    let name = format!("{label:<22} {}", if mapped { "mmap " } else { "pread" });
                    if rows.len() <= i {
                        rows.push((name, Vec::new(), Vec::new()));
                    }
                    rows[i].1.push(gbs);
                    rows[i]
                        .2
                        .push((r.cpu_time.user_us + r.cpu_time.sys_us) / 1000);
                    i += 1;
                }
            }
        }
        for (name, mut v, cpu) in rows {
            v.sort_by(|a, b| a.total_cmp(b));
            eprintln!(
                "{name} {:.2} [{:.2}-{:.2}] GB/s, engine-thread cpu ms {:?}",
                v[v.len() / 2],
                v[0],
                v[v.len() - 1],
                cpu
            );
        }
    }
    if which.contains("default") {
        eprintln!("\n== 2 GiB, no faults: the default policy vs criu, GB/s median [min-max] of {reps}, interleaved");
        let cases = [
            ("default, mapped files", Policy::default(), true),
            (
                "default, 4M jobs",
                Policy::default().with_fixed_chunk(4 << 20),
                true,
            ),
            ("default, pread", Policy::default(), false),
            ("criu, mapped files", Policy::criu(), true),
            ("criu, pread", Policy::criu(), false),
        ];
        let mut res = vec![Vec::new(); cases.len()];
        for _ in 0..reps {
            for (i, (_, policy, mapped)) in cases.iter().enumerate() {
                let mut sv = serve_big(&file, gib2, policy.clone(), *mapped);
                sv.criu.finished();
                let r = bounded(120, "bulk", move || sv.h.wait()).expect("engine");
                let us = r.timeline.done_us.unwrap_or(0) - r.timeline.finished_us.unwrap_or(0);
                res[i].push((gib2 * PAGE_SIZE) as f64 / us.max(1) as f64 / 1000.0);
            }
        }
        for (i, v) in res.iter_mut().enumerate() {
            v.sort_by(|a, b| a.total_cmp(b));
            eprintln!(
                "{:<24} {:.2} [{:.2}-{:.2}]",
                cases[i].0,
                v[v.len() / 2],
                v[0],
                v[v.len() - 1]
            );
        }
    }
    if which.contains("ioctl") {
        eprintln!("\n== 2 GiB, no faults, mmap: GB/s median [min-max] of {reps}, interleaved");
        let cases: [(&str, CopyThread, u64, u64); 6] = [
            ("loop, 256K chunks", CopyThread::Loop, 256 << 10, 0),
            ("loop, 1M chunks", CopyThread::Loop, 1 << 20, 0),
            (
                "copier, 4M jobs, 256K pieces",
                CopyThread::Copier,
                4 << 20,
                256 << 10,
            ),
            (
                "copier, 4M jobs, 1M pieces",
                CopyThread::Copier,
                4 << 20,
                1 << 20,
            ),
            (
                "copier, 4M jobs, 4M pieces",
                CopyThread::Copier,
                4 << 20,
                4 << 20,
            ),
            (
                "copier, 16M jobs, 1M pieces",
                CopyThread::Copier,
                16 << 20,
                1 << 20,
            ),
        ];
        let mut res = vec![Vec::new(); cases.len()];
        for _ in 0..reps {
            for (i, &(_, thread, chunk, piece)) in cases.iter().enumerate() {
                let mut p = Policy::default().with_fixed_chunk(chunk);
                p.background.thread = thread;
                let mut sv = serve_big_with(&file, gib2, p, true, piece.max(4096));
                sv.criu.finished();
                let r = bounded(120, "bulk", move || sv.h.wait()).expect("engine");
                let us = r.timeline.done_us.unwrap_or(0) - r.timeline.finished_us.unwrap_or(0);
                res[i].push((gib2 * PAGE_SIZE) as f64 / us.max(1) as f64 / 1000.0);
            }
        }
        for (i, v) in res.iter_mut().enumerate() {
            v.sort_by(|a, b| a.total_cmp(b));
            eprintln!(
                "{:<30} {:.2} [{:.2}-{:.2}]",
                cases[i].0,
                v[v.len() / 2],
                v[0],
                v[v.len() - 1]
            );
        }
    }
    if which.contains("copierfaults") {
        let pages = 256 * 1024u64; // 1 GiB
        eprintln!("\n== copier piece size with random faults until the background is done (1 GiB, 4 MiB jobs)");
        for _ in 0..reps {
            for ioctl in [64u64 << 10, 256 << 10, 1 << 20, 4 << 20] {
                let mut p = Policy::default().with_fixed_chunk(4 << 20);
                p.readahead = Readahead::OFF;
                let mut sv = serve_big_with(&file, pages, p, true, ioctl);
                sv.criu.finished();
                let region = Arc::clone(&sv.region);
                let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let s2 = Arc::clone(&stop);
                let t =
                    std::thread::spawn(move || toucher(&region, pages, 1_000_000, false, Some(s2)));
                let r = bounded(120, "bulk", move || sv.h.wait()).expect("engine");
                stop.store(true, Ordering::Relaxed);
                let mut lat = t.join().expect("toucher");
                let (p50, p99, max) = pct(&mut lat);
                let us = r.timeline.done_us.unwrap_or(0) - r.timeline.finished_us.unwrap_or(0);
                eprintln!(
                    "piece {:>5} KiB: faults {:>6} toucher p50 {p50:.1} p99 {p99:.1} max {max:.0} | bg {:.2} GB/s",
                    ioctl >> 10,
                    r.totals.faults,
                    (pages * PAGE_SIZE) as f64 / us.max(1) as f64 / 1000.0
                );
            }
        }
    }
    if which.contains("sparse") {
        eprintln!("\n== sporadic faults (one every ~300 µs) during a 2 GiB background: toucher µs p50 / p99 / max, of {reps} runs pooled");
        let cases: [(&str, CopyThread, u64, u64); 6] = [
            ("loop, 256K chunks", CopyThread::Loop, 256 << 10, 4096),
            (
                "copier, 4M jobs, 64K pieces",
                CopyThread::Copier,
                4 << 20,
                64 << 10,
            ),
            (
                "copier, 4M jobs, 256K pieces",
                CopyThread::Copier,
                4 << 20,
                256 << 10,
            ),
            (
                "copier, 4M jobs, 1M pieces",
                CopyThread::Copier,
                4 << 20,
                1 << 20,
            ),
            (
                "copier, 4M jobs, 4M pieces",
                CopyThread::Copier,
                4 << 20,
                4 << 20,
            ),
            (
                "copier, 16M jobs, 4M pieces",
                CopyThread::Copier,
                16 << 20,
                4 << 20,
            ),
        ];
        let mut lats = vec![Vec::new(); cases.len()];
        let mut bws = vec![Vec::new(); cases.len()];
        let mut idle = Vec::new();
        for _ in 0..reps {
            // Reference: the same sporadic toucher with nothing else running (faults only).
            let p = Policy {
                readahead: Readahead::OFF,
                ..Policy::default()
            };
            let sv = serve_big_with(&file, gib2, p, true, 1 << 20);
            let region = Arc::clone(&sv.region);
            idle.extend(toucher_gap(
                &region,
                gib2,
                700,
                false,
                None,
                Some(Duration::from_micros(300)),
            ));
            let mut h = sv.h;
            h.abort("measured".into());
            for (i, &(_, thread, chunk, piece)) in cases.iter().enumerate() {
                let mut p = Policy::default().with_fixed_chunk(chunk);
                p.background.thread = thread;
                p.readahead = Readahead::OFF;
                let mut sv = serve_big_with(&file, gib2, p, true, piece);
                sv.criu.finished();
                let region = Arc::clone(&sv.region);
                let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
                let s2 = Arc::clone(&stop);
                let t = std::thread::spawn(move || {
                    toucher_gap(
                        &region,
                        gib2,
                        1_000_000,
                        false,
                        Some(s2),
                        Some(Duration::from_micros(300)),
                    )
                });
                let r = bounded(120, "bulk", move || sv.h.wait()).expect("engine");
                stop.store(true, Ordering::Relaxed);
                lats[i].extend(t.join().expect("toucher"));
                eprintln!(
                    "  holds so far {} waited {} µs",
                    crate::copier::HOLDS.load(Ordering::Relaxed),
                    crate::copier::HOLD_WAIT_NS.load(Ordering::Relaxed) / 1000
                );
                let us = r.timeline.done_us.unwrap_or(0) - r.timeline.finished_us.unwrap_or(0);
                bws[i].push((gib2 * PAGE_SIZE) as f64 / us.max(1) as f64 / 1000.0);
                eprintln!(
                    "  run: {} engine read->wake p50<={} p90<={} p99<={} max {} µs, per-cpu {:?}",
                    cases[i].0,
                    r.fault_latency.p50_us,
                    r.fault_latency.p90_us,
                    r.fault_latency.p99_us,
                    r.fault_latency.max_us,
                    r.faults_per_cpu
                );
            }
        }
        let (p50, p99, max) = pct(&mut idle);
        eprintln!(
            "{:<30} {:>5} faults p50 {p50:.1} p99 {p99:.1} max {max:.0}",
            "no background (faults only)",
            idle.len()
        );
        for (i, lat) in lats.iter_mut().enumerate() {
            let (p50, p99, max) = pct(lat);
            let v = &mut bws[i];
            v.sort_by(|a, b| a.total_cmp(b));
            eprintln!(
                "{:<30} {:>5} faults p50 {p50:.1} p99 {p99:.1} max {max:.0} | bg {:.2} [{:.2}-{:.2}] GB/s",
                cases[i].0,
                lat.len(),
                v[v.len() / 2],
                v[0],
                v[v.len() - 1]
            );
        }
    }
    if which.contains("faults,") || which.ends_with("faults") && !which.ends_with("copierfaults") {
        let pages = 256 * 1024u64; // 1 GiB
        eprintln!(
            "\n== random faults, toucher-side round trip (µs p50 / p99 / max) and engine histogram"
        );
        // The floor: a minimal in-process server (epoll + read + one COPY per fault), same
        // toucher, same process, right before the engine runs.
        for _ in 0..2 {
            let region = Arc::new(Region::map(pages as usize * P).expect("mmap"));
            let fd = sys::userfaultfd(libc::O_CLOEXEC | libc::O_NONBLOCK).expect("userfaultfd");
            sys::uffdio_api(&fd, 0).expect("api");
            sys::uffdio_register(
                fd.as_fd(),
                region.addr(),
                region.len() as u64,
                sys::REGISTER_MODE_MISSING,
            )
            .expect("register");
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let s2 = Arc::clone(&stop);
            let base = region.addr();
            let server = std::thread::spawn(move || {
                let mut u = crate::uffd::Uffd::new(fd).expect("uffd");
                let ep = sys::Epoll::new().expect("epoll");
                ep.add(u.as_fd(), 1).expect("add");
                let (mut ready, mut evs) = (Vec::new(), Vec::new());
                while !s2.load(Ordering::Relaxed) {
                    ready.clear();
                    ep.wait(&mut ready, 8, Some(Duration::from_millis(20)))
                        .expect("wait");
                    evs.clear();
                    u.read_events(&mut evs).expect("read");
                    for e in evs.drain(..) {
                        if let Event::PageFault { addr, .. } = e {
                            let page = ((addr & !(PAGE_SIZE - 1)) - base) / PAGE_SIZE;
                            let mut data = [0u8; P];
                            data[..8].copy_from_slice(&word(page, 0).to_ne_bytes());
                            let _ = u.copy(addr & !(PAGE_SIZE - 1), &data, false);
                        }
                    }
                }
            });
            let r2 = Arc::clone(&region);
            let mut lat = bounded(60, "touch", move || {
                toucher(&r2, pages, 20_000, false, None)
            });
            stop.store(true, Ordering::Relaxed);
            let _ = server.join();
            let (p50, p99, max) = pct(&mut lat);
            eprintln!("minimal server (floor)               toucher p50 {p50:.1} p99 {p99:.1} max {max:.0}");
        }
        // Faults only (before the finished word).
        let no_readahead = Policy {
            readahead: Readahead::OFF,
            ..Policy::default()
        };
        for (label, policy) in [
            ("criu", Policy::criu()),
            ("default, readahead off", no_readahead),
        ] {
            let sv = serve_big(&file, pages, policy, true);
            let region = Arc::clone(&sv.region);
            let mut lat = bounded(60, "touch", move || {
                toucher(&region, pages, 20_000, false, None)
            });
            let (p50, p99, max) = pct(&mut lat);
            let st = sv.h.stats();
            let mut h = sv.h;
            h.abort("measured".into());
            eprintln!(
                "faults-only {label:<24} toucher p50 {p50:.1} p99 {p99:.1} max {max:.0} | engine p50<={} p99<={} per-cpu {:?}",
                st.fault_latency.p50_us, st.fault_latency.p99_us, st.faults_per_cpu
            );
        }
        // While the background runs: faults until it is done.
        for (label, policy) in variants(Policy::default()) {
            let mut policy = policy;
            policy.readahead = Readahead::OFF;
            let mut sv = serve_big(&file, pages, policy, true);
            sv.criu.finished();
            let region = Arc::clone(&sv.region);
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let s2 = Arc::clone(&stop);
            let t = std::thread::spawn(move || toucher(&region, pages, 1_000_000, false, Some(s2)));
            let r = bounded(120, "bulk", move || sv.h.wait()).expect("engine");
            stop.store(true, Ordering::Relaxed);
            let mut lat = t.join().expect("toucher");
            let (p50, p99, max) = pct(&mut lat);
            let us = r.timeline.done_us.unwrap_or(0) - r.timeline.finished_us.unwrap_or(0);
            eprintln!(
                "with bg {label:<22} faults {:>6} toucher p50 {p50:.1} p99 {p99:.1} max {max:.0} | engine p50<={} p99<={} | bg {:.2} GB/s",
                r.totals.faults,
                r.fault_latency.p50_us,
                r.fault_latency.p99_us,
                (pages * PAGE_SIZE) as f64 / us.max(1) as f64 / 1000.0
            );
        }
    }
    if which.contains("order") {
        let pages = 256 * 1024u64; // 1 GiB
        eprintln!("\n== background order with a sequential scanner during a 1 GiB background (copier, 4 MiB jobs)");
        for _ in 0..reps {
            for order in [BackgroundOrder::LowestAddress, BackgroundOrder::NearFaults] {
                let mut p = Policy::default().with_fixed_chunk(4 << 20);
                p.background.order = order;
                let mut sv = serve_big(&file, pages, p, true);
                sv.criu.finished();
                let region = Arc::clone(&sv.region);
                // The scanner starts in the middle, where the lowest-address copier arrives last.
                let t0 = std::time::Instant::now();
                let t = std::thread::spawn(move || {
                    let mut b = [0u8; 8];
                    for p in pages / 2..pages {
                        region.read(p as usize * P, &mut b);
                        std::hint::black_box(&b);
                    }
                    t0.elapsed()
                });
                let r = bounded(120, "bulk", move || sv.h.wait()).expect("engine");
                let scan = t.join().expect("scanner");
                let us = r.timeline.done_us.unwrap_or(0) - r.timeline.finished_us.unwrap_or(0);
                eprintln!(
                    "{:<16} scan of 512 MiB {:>6.1} ms, {:>5} faults ({} pages by readahead) | all done in {} ms",
                    order.as_str(),
                    scan.as_secs_f64() * 1000.0,
                    r.totals.faults,
                    r.totals.pages_readahead,
                    us / 1000
                );
            }
        }
    }
    if which.contains("readahead") {
        let pages = 64 * 1024u64; // 256 MiB
        eprintln!("\n== readahead, faults only: sequential scan of 256 MiB, then 20000 random touches of another region");
        for (label, mode, min, max) in [
            ("off", ReadaheadMode::Off, 1, 1),
            ("fixed 16", ReadaheadMode::Fixed, 16, 16),
            ("adaptive 1..16", ReadaheadMode::Adaptive, 1, 16),
            ("adaptive 4..16", ReadaheadMode::Adaptive, 4, 16),
            ("adaptive 4..32", ReadaheadMode::Adaptive, 4, 32),
            ("adaptive 4..64", ReadaheadMode::Adaptive, 4, 64),
            ("adaptive 1..64", ReadaheadMode::Adaptive, 1, 64),
            ("adaptive 2..256", ReadaheadMode::Adaptive, 2, 256),
        ] {
            let policy = Policy {
                readahead: Readahead {
                    mode,
                    min_pages: min,
                    max_pages: max,
                    align: true,
                },
                ..Policy::default()
            };
            for seq in [true, false] {
                let sv = serve_big(&file, pages, policy.clone(), true);
                let region = Arc::clone(&sv.region);
                let n = if seq { pages as usize } else { 20_000 };
                let t0 = std::time::Instant::now();
                let mut lat = bounded(120, "touch", move || toucher(&region, pages, n, seq, None));
                let wall = t0.elapsed();
                let st = sv.h.stats();
                let mut h = sv.h;
                h.abort("measured".into());
                let (p50, p99, _) = pct(&mut lat);
                eprintln!(
                    "{label:<16} {:<10} {:>6} faults, {:>7.1} ms, touch p50 {p50:.1} p99 {p99:.1} µs | engine p50<={} p99<={} | {:.0} MB/s touched",
                    if seq { "sequential" } else { "random" },
                    st.totals.faults,
                    wall.as_secs_f64() * 1000.0,
                    st.fault_latency.p50_us,
                    st.fault_latency.p99_us,
                    (n as u64 * PAGE_SIZE) as f64 / wall.as_secs_f64() / 1e6,
                );
            }
        }
    }
}

#[test]
fn round_robin_order_takes_one_chunk_per_range_in_turn() {
    let _l = shared_lock();
    let mut s = setup("rr", 200, 200, &[(0, 48, 0), (100, 48, 100)], &[]);
    let mut policy = Policy::criu().with_fixed_chunk(64 * 1024);
    policy.background.order = BackgroundOrder::RoundRobin;
    s.cfg.policy = policy;
    let log = with_log(&mut s);
    let h = s.start();
    let mut criu = s.handoff();
    criu.finished();
    let r = wait(h).expect("engine");
    assert_eq!(r.tasks[0].pages_background, 96);
    let starts: Vec<u64> = records(&log)
        .iter()
        .map(|r| page_of(&s, r.runtime))
        .collect();
    assert_eq!(starts, [0, 100, 16, 116, 32, 132]);
    let mut buf = vec![0u8; P];
    for p in (0..48).chain(100..148) {
        s.region.read(p * P, &mut buf);
        assert!(check_page(&buf, p as u64), "page {p}");
    }
}

#[test]
fn background_start_delay_holds_background_but_not_prefetch_and_finish_fast_lifts_it() {
    let _l = shared_lock();
    for thread in [CopyThread::Loop, CopyThread::Copier] {
        let pages = 256u64;
        let mut s = setup("start-delay", pages as usize, pages, &[(0, pages, 0)], &[]);
        s.cfg.policy.background.thread = thread;
        s.cfg.policy.background.start_delay = Duration::from_millis(300);
        let base = s.region.addr();
        s.cfg.policy.prefetch = vec![PrefetchPlan {
            pid: sys::getpid(),
            ranges: vec![PrefetchRange { start: base + 10 * PAGE_SIZE, pages: 5 }],
        }];
        let h = s.start();
        let mut criu = s.handoff();
        criu.finished();
        let r = wait(h).expect("engine");
        let fin = r.timeline.finished_us.expect("finished");
        let pre = r.timeline.prefetch_done_us.expect("prefetch done");
        let done = r.timeline.done_us.expect("done");
        assert!(pre - fin < 200_000, "{thread:?}: prefetch waited {} µs", pre - fin);
        assert!(done - fin >= 300_000, "{thread:?}: background began after {} µs", done - fin);
        assert_eq!((r.tasks[0].pages_prefetch, r.tasks[0].pages_background), (5, pages - 5));
        let mut buf = vec![0u8; P];
        for p in 0..pages as usize {
            s.region.read(p * P, &mut buf);
            assert!(check_page(&buf, p as u64), "page {p}");
        }
    }
    // A hold of a minute ends at once on finish_fast (the first SIGINT/SIGTERM of `serve`).
    let pages = 64u64;
    let mut s = setup("start-delay-ff", pages as usize, pages, &[(0, pages, 0)], &[]);
    s.cfg.policy.background.start_delay = Duration::from_secs(60);
    let h = s.start();
    let mut criu = s.handoff();
    criu.finished();
    std::thread::sleep(Duration::from_millis(100));
    let t = std::time::Instant::now();
    h.finish_fast();
    let r = wait(h).expect("engine");
    assert!(t.elapsed() < Duration::from_secs(10), "finish_fast did not lift the hold");
    assert_eq!(r.tasks[0].pages_background, pages);
}

/// Prefetch of a scattered working set (single pages, 5% of 512 MiB, in random order), no
/// faults: µs per page from the finished word to `prefetchDoneUs`. The replayed process chases
/// this rate when its access order matches the profile (`cargo test --release ... -- --ignored
/// measure_prefetch_scattered --nocapture`).
#[test]
#[ignore]
fn measure_prefetch_scattered() {
    let _l = shared_lock();
    let pages = 131072u64;
    for rep in 0..3 {
        let mut s = setup("prefetch-scattered", pages as usize, pages, &[(0, pages, 0)], &[]);
        s.cfg.policy = Policy::default();
        let base = s.region.addr();
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ rep;
        let mut seen = std::collections::HashSet::new();
        let mut ranges = Vec::new();
        while ranges.len() < (pages / 20) as usize {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let p = x % pages;
            if seen.insert(p) {
                ranges.push(PrefetchRange { start: base + p * PAGE_SIZE, pages: 1 });
            }
        }
        let n = ranges.len() as u64;
        s.cfg.policy.prefetch = vec![PrefetchPlan { pid: sys::getpid(), ranges }];
        let h = s.start();
        let mut criu = s.handoff();
        criu.finished();
        let r = wait(h).expect("engine");
        let fin = r.timeline.finished_us.expect("finished");
        let pre = r.timeline.prefetch_done_us.expect("prefetch done");
        let done = r.timeline.done_us.expect("done");
        println!(
            "prefetch {n} scattered pages: {:.2} µs/page ({} µs); then background {:.2} GB/s",
            (pre - fin) as f64 / n as f64,
            pre - fin,
            ((pages - n) * PAGE_SIZE) as f64 / ((done - pre) as f64 * 1e3)
        );
    }
}
