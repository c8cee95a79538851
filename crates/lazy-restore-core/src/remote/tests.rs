//! Remote sources against an in-process page server and a fake CRIU page server.

use super::client::{BulkClient, BulkEvent, ClientOptions, LazySource, UrgentClient};
use super::criu::{CriuClient, CriuSource, HeaderLayout, LazyTask, PsIov, PS_IOV_CLOSE, PS_IOV_GET, PS_REPLY};
use super::protocol::{self, Frame, PageRun, Role, StreamMode, MAX_FRAME, PAGE, VERSION};
use super::server::{PageServer, ServerConfig};
use super::store::PageStore;
use super::RemoteError;
use crate::plan::{RangePlan, TaskPlan};
use crate::source::PageSource;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The bytes of page `addr` of task `pid` in the fixture.
fn page_bytes(pid: i32, addr: u64) -> Vec<u8> {
    let mut p = vec![(addr >> 12) as u8 ^ pid as u8; PAGE];
    p[..8].copy_from_slice(&addr.to_le_bytes());
    p[8..12].copy_from_slice(&pid.to_le_bytes());
    p
}

struct Fixture {
    dir: PathBuf,
    tasks: Vec<TaskPlan>,
    files: Vec<PathBuf>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// pid 10: 8 pages at 0x10000, 300 pages at 0x400000; pid 11: 4 pages at 0x10000.
fn fixture(name: &str) -> Fixture {
    fixture_with(name, 0)
}

/// The fixture, plus `extra` pages of pid 12 at 0x1000000 (to outgrow socket buffers).
fn fixture_with(name: &str, extra: u64) -> Fixture {
    let dir = std::env::temp_dir().join(format!("lr-remote-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut layout = vec![(10, 0x10000u64, 8u64), (10, 0x400000, 300), (11, 0x10000, 4)];
    if extra > 0 {
        layout.push((12, 0x1000000, extra));
    }
    let mut data = Vec::new();
    let mut tasks: Vec<TaskPlan> = Vec::new();
    for (pid, start, pages) in layout {
        let offset = data.len() as u64;
        for i in 0..pages {
            data.extend_from_slice(&page_bytes(pid, start + i * PAGE as u64));
        }
        let r = RangePlan { start, pages, file: 0, offset };
        match tasks.iter_mut().find(|t| t.pid == pid) {
            Some(t) => t.ranges.push(r),
            None => tasks.push(TaskPlan { pid, ranges: vec![r] }),
        }
    }
    let f = dir.join("pages-1.img");
    std::fs::write(&f, data).unwrap();
    Fixture { dir, tasks, files: vec![f] }
}

fn logs() -> (Arc<Mutex<Vec<String>>>, super::server::ServerLog) {
    let l = Arc::new(Mutex::new(Vec::new()));
    let l2 = Arc::clone(&l);
    (l, Arc::new(move |m: &str| l2.lock().unwrap().push(m.to_string())))
}

fn server(fx: &Fixture, token: Option<&str>, port: u16) -> (PageServer, Arc<Mutex<Vec<String>>>) {
    let (l, log) = logs();
    let store = PageStore::open(fx.tasks.clone(), &fx.files).unwrap();
    let cfg = ServerConfig {
        address: "127.0.0.1".into(),
        port,
        token: token.map(|t| t.as_bytes().to_vec()),
        allow_lz4: true,
        log,
    };
    (PageServer::start(cfg, store).unwrap(), l)
}

fn opts(s: &PageServer) -> ClientOptions {
    let mut o = ClientOptions::new(s.local_addr().to_string());
    o.grace = Duration::from_secs(3);
    o
}

fn check(pid: i32, addr: u64, buf: &[u8]) {
    for (i, p) in buf.chunks(PAGE).enumerate() {
        assert!(p == page_bytes(pid, addr + (i * PAGE) as u64), "pid {pid} page {:#x}", addr + (i * PAGE) as u64);
    }
}

#[test]
fn urgent_fetches_pages_and_reports_missing_ones() {
    let fx = fixture("urgent");
    let (s, _) = server(&fx, None, 0);
    let u = UrgentClient::connect(opts(&s)).unwrap();
    let mut b = vec![0u8; 3 * PAGE];
    u.fetch(10, 0x11000, &mut b).unwrap();
    check(10, 0x11000, &b);
    // Larger than one GET: split.
    let mut big = vec![0u8; 300 * PAGE];
    u.fetch(10, 0x400000, &mut big).unwrap();
    check(10, 0x400000, &big);
    let mut one = vec![0u8; PAGE];
    u.fetch(11, 0x13000, &mut one).unwrap();
    check(11, 0x13000, &one);
    // Not held: past the range end, unknown pid. The connection survives both.
    let e = u.fetch(10, 0x17000, &mut b).unwrap_err();
    assert!(matches!(e, RemoteError::Missing { .. }), "{e}");
    let e = u.fetch(99, 0x10000, &mut one).unwrap_err();
    assert!(e.to_string().contains("99"), "{e}");
    u.fetch(10, 0x10000, &mut one).unwrap();
    check(10, 0x10000, &one);
    assert_eq!(s.counters().pages_urgent, 3 + 300 + 1 + 1);
}

fn drain(b: &mut BulkClient, id: u32) -> Vec<(PageRun, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        match b.next_event().unwrap() {
            BulkEvent::Chunk { id: i, run, data } if i == id => out.push((run, data)),
            BulkEvent::End { id: i, .. } if i == id => return out,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn bulk_streams_everything_in_address_order_with_and_without_lz4() {
    let fx = fixture("bulk");
    let (s, _) = server(&fx, None, 0);
    for lz4 in [false, true] {
        let mut o = opts(&s);
        o.lz4 = lz4;
        o.chunk_pages = 64;
        let mut b = BulkClient::connect(o).unwrap();
        assert_eq!(b.compressed(), lz4);
        let id = b.stream(StreamMode::All, vec![]).unwrap();
        let chunks = drain(&mut b, id);
        let order: Vec<(i32, u64)> = chunks.iter().map(|(r, _)| (r.pid, r.addr)).collect();
        let mut sorted = order.clone();
        sorted.sort_by_key(|&(p, a)| (p, a));
        assert_eq!(order, sorted);
        let pages: u64 = chunks.iter().map(|(r, _)| u64::from(r.pages)).sum();
        assert_eq!(pages, 312);
        assert!(chunks.iter().all(|(r, _)| r.pages <= 64));
        for (r, d) in &chunks {
            check(r.pid, r.addr, d);
        }
        if lz4 {
            assert!(b.wire_bytes < b.raw_bytes / 4, "{} vs {}", b.wire_bytes, b.raw_bytes);
        } else {
            assert_eq!(b.wire_bytes, b.raw_bytes);
        }
    }
}

#[test]
fn bulk_profile_first_then_rest_skip_and_cancel() {
    let fx = fixture("profile");
    let (s, _) = server(&fx, None, 0);
    let mut b = BulkClient::connect(opts(&s)).unwrap();
    // We already have pid 10's first range and part of the big one.
    b.skip(vec![PageRun { pid: 10, addr: 0x10000, pages: 8 }, PageRun { pid: 10, addr: 0x400000, pages: 100 }])
        .unwrap();
    let profile = vec![PageRun { pid: 11, addr: 0x12000, pages: 2 }, PageRun { pid: 10, addr: 0x480000, pages: 4 }];
    let id = b.stream(StreamMode::ListThenAll, profile).unwrap();
    let chunks = drain(&mut b, id);
    let first: Vec<(i32, u64, u32)> = chunks.iter().take(2).map(|(r, _)| (r.pid, r.addr, r.pages)).collect();
    assert_eq!(first, vec![(11, 0x12000, 2), (10, 0x480000, 4)]);
    let total: u64 = chunks.iter().map(|(r, _)| u64::from(r.pages)).sum();
    // 312 lazy pages - 108 skipped; the profile's pages are sent once.
    assert_eq!(total, 312 - 108);
    for (r, d) in &chunks {
        check(r.pid, r.addr, d);
        assert!(!(r.pid == 10 && r.addr < 0x400000 + 100 * PAGE as u64 && r.addr >= 0x400000));
    }
    // Cancel: END says cancelled, and the connection is still good afterwards.
    let id = b.stream(StreamMode::All, vec![]).unwrap();
    b.cancel(id).unwrap();
    loop {
        match b.next_event().unwrap() {
            BulkEvent::End { id: i, .. } if i == id => break,
            BulkEvent::Chunk { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    // Cancelled (or already finished: everything was skipped or sent): either way it ended,
    // and the connection still serves.
    let id = b.stream(StreamMode::List, vec![PageRun { pid: 11, addr: 0x10000, pages: 4 }]).unwrap();
    let c = drain(&mut b, id);
    assert_eq!(c.len(), 1);
    check(11, 0x10000, &c[0].1);
}

#[test]
fn lazy_source_streams_prepared_jobs_and_serves_faults_on_the_urgent_connection() {
    let fx = fixture("prepared");
    let (s, _) = server(&fx, None, 0);
    let src = LazySource::connect(opts(&s), vec![10, 11]).unwrap();
    // Two jobs announced before any read: both streams start at once.
    src.prepare(1, &[(0, 0x400000, 100 * PAGE as u64), (0, 0x10000, 8 * PAGE as u64)]);
    src.prepare(2, &[(0, 0x400000 + 100 * PAGE as u64, 200 * PAGE as u64)]);
    src.prepare(2, &[(1, 0x10000, 4 * PAGE as u64)]); // a repeated key is ignored
    // The copier reads in pieces that do not line up with the server's chunks.
    let mut a = vec![0u8; 40 * PAGE];
    src.read(0, 0x400000 + 30 * PAGE as u64, &mut a).unwrap();
    check(10, 0x400000 + 30 * PAGE as u64, &a);
    let mut b = vec![0u8; 30 * PAGE];
    src.read(0, 0x400000, &mut b).unwrap();
    check(10, 0x400000, &b);
    let mut c = vec![0u8; 230 * PAGE];
    src.read(0, 0x400000 + 70 * PAGE as u64, &mut c).unwrap();
    check(10, 0x400000 + 70 * PAGE as u64, &c);
    let mut d = vec![0u8; 8 * PAGE];
    src.read(0, 0x10000, &mut d).unwrap();
    check(10, 0x10000, &d);
    // A fault: the urgent connection, even for more pages than the small-read limit.
    let mut e = vec![0u8; 4 * PAGE];
    src.read_urgent(1, 0x10000, &mut e).unwrap();
    check(11, 0x10000, &e);
    let mut f = vec![0u8; 16 * PAGE];
    src.read_urgent(0, 0x400000, &mut f).unwrap();
    check(10, 0x400000, &f);
    let n = s.counters();
    assert_eq!(n.pages_bulk, 308, "the two prepared streams, nothing more: {n:?}");
    assert_eq!(n.pages_urgent, 20, "{n:?}");
}

#[test]
fn handshake_refusals_say_why() {
    let fx = fixture("token");
    let (s, log) = server(&fx, Some("s3cret"), 0);
    let mut o = opts(&s);
    let e = UrgentClient::connect(o.clone()).err().unwrap();
    assert!(matches!(&e, RemoteError::Refused { reason, .. } if reason.contains("requires a token")), "{e}");
    o.token = Some(b"nope".to_vec());
    let e = UrgentClient::connect(o.clone()).err().unwrap();
    assert!(matches!(&e, RemoteError::Refused { reason, .. } if reason.contains("wrong token")), "{e}");
    o.token = Some(b"s3cret".to_vec());
    let u = UrgentClient::connect(o).unwrap();
    let mut b = vec![0u8; PAGE];
    u.fetch(11, 0x10000, &mut b).unwrap();
    // A future version is refused with the version we speak.
    let mut t = TcpStream::connect(s.local_addr()).unwrap();
    let hello = Frame::Hello { version: VERSION + 1, role: Role::Urgent, features: 0, token: b"s3cret".to_vec() };
    protocol::write_frame(&mut t, &hello).unwrap();
    match protocol::read_frame(&mut t).unwrap() {
        Frame::Refused { reason } => assert!(reason.contains("version 2 is not supported"), "{reason}"),
        f => panic!("{f:?}"),
    }
    assert_eq!(s.counters().refused, 3);
    assert!(log.lock().unwrap().iter().any(|l| l.contains("wrong token")));
}

#[test]
fn malformed_frames_close_the_connection_with_a_logged_reason() {
    let fx = fixture("malformed");
    let (s, log) = server(&fx, None, 0);
    let cases: Vec<Vec<u8>> = vec![
        u32::MAX.to_le_bytes().to_vec(),                  // absurd length, before any HELLO
        vec![5, 0, 0, 0, 0x77, 1, 2, 3, 4],               // unknown kind
        vec![3, 0, 0, 0, 0x01, b'L', b'Z'],               // truncated HELLO body
    ];
    for bytes in cases {
        let mut t = TcpStream::connect(s.local_addr()).unwrap();
        t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        t.write_all(&bytes).unwrap();
        let mut rest = Vec::new();
        let _ = t.read_to_end(&mut rest); // the server closes
    }
    // After a good handshake: a GET with a lying length.
    let mut t = TcpStream::connect(s.local_addr()).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    protocol::write_frame(&mut t, &Frame::Hello { version: VERSION, role: Role::Urgent, features: 0, token: vec![] })
        .unwrap();
    assert!(matches!(protocol::read_frame(&mut t).unwrap(), Frame::Welcome { .. }));
    t.write_all(&(MAX_FRAME + 1).to_le_bytes()).unwrap();
    let mut rest = Vec::new();
    let _ = t.read_to_end(&mut rest);
    let deadline = Instant::now() + Duration::from_secs(5);
    while log.lock().unwrap().len() < 4 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let l = log.lock().unwrap().clone();
    assert_eq!(l.iter().filter(|m| m.contains("malformed frame")).count(), 4, "{l:?}");
    assert_eq!(s.counters().bad_frames, 4);
    // Still serving.
    let u = UrgentClient::connect(opts(&s)).unwrap();
    let mut b = vec![0u8; PAGE];
    u.fetch(10, 0x10000, &mut b).unwrap();
}

#[test]
fn clients_resume_after_the_server_drops_them_and_fail_typed_after_the_grace() {
    // 32 MiB more than any socket buffer holds: the drop lands mid-stream.
    let fx = fixture_with("resume", 8192);
    let (mut s, _) = server(&fx, None, 0);
    let port = s.local_addr().port();
    let mut o = opts(&s);
    o.chunk_pages = 8;
    o.grace = Duration::from_secs(5);
    let src = LazySource::connect(o.clone(), vec![10, 11]).unwrap();
    let mut b = BulkClient::connect(o.clone()).unwrap();
    let id = b.stream(StreamMode::All, vec![]).unwrap();
    let mut pages = 0u64;
    let mut seen = super::intervals::IntervalSet::new();
    let mut dropped = false;
    loop {
        match b.next_event().unwrap() {
            BulkEvent::Chunk { run, data, .. } => {
                check(run.pid, run.addr, &data);
                seen.insert(run.pid, run.addr, run.addr + data.len() as u64);
                pages += u64::from(run.pages);
                if pages >= 40 && !dropped {
                    s.drop_connections();
                    dropped = true;
                }
            }
            BulkEvent::End { id: i, .. } if i == id => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(dropped && b.reconnects >= 1);
    assert_eq!(seen.bytes(), (312 + 8192) * PAGE as u64, "every page once the stream resumed");
    // The PageSource survives a drop too (urgent and bulk).
    s.drop_connections();
    let mut buf = vec![0u8; 2 * PAGE];
    src.read(0, 0x10000, &mut buf).unwrap();
    check(10, 0x10000, &buf);
    // A server that is gone for good, then restarted within the grace: resumed.
    s.close();
    drop(s);
    let fx2 = fixture("resume2");
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        let s = server(&fx2, None, port).0;
        std::thread::sleep(Duration::from_secs(3));
        drop(s);
        drop(fx2);
    });
    let mut big = vec![0u8; 64 * PAGE];
    src.read(0, 0x400000, &mut big).unwrap();
    check(10, 0x400000, &big);
    t.join().unwrap();
    // Gone for longer than the grace: a typed error.
    let mut o2 = o;
    o2.grace = Duration::from_millis(600);
    let u = UrgentClient::connect(o2.clone()).err().unwrap();
    assert!(matches!(u, RemoteError::Unavailable { .. }), "{u}");
    let started = Instant::now();
    let e = src.read(1, 0x10000, &mut buf).unwrap_err();
    assert!(e.to_string().contains("grace period over"), "{e}");
    assert!(started.elapsed() >= Duration::from_secs(4), "{:?}", started.elapsed());
}

// ---- a fake CRIU page server ----------------------------------------------------------------

struct FakeCriu {
    addr: String,
    thread: std::thread::JoinHandle<Vec<PsIov>>,
}

/// Serves the fixture like CRIU's dump-side server: clamps replies to `clamp` pages, drops the
/// session on an address it does not hold, answers CLOSE with int32 0.
fn fake_criu(fx: &Fixture, layout: HeaderLayout, clamp: u64) -> FakeCriu {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let store = PageStore::open(fx.tasks.clone(), &fx.files).unwrap();
    let thread = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut seen = Vec::new();
        let mut h = vec![0u8; layout.header_len()];
        loop {
            if s.read_exact(&mut h).is_err() {
                return seen;
            }
            let req = layout.decode(&h);
            seen.push(req);
            match req.cmd {
                PS_IOV_GET => {
                    let n = req.nr_pages.min(clamp);
                    let run = PageRun { pid: req.dst_id as i32, addr: req.vaddr, pages: n as u32 };
                    let mut data = vec![0u8; n as usize * PAGE];
                    if store.read(run, &mut data).is_err() {
                        return seen; // "no iovs found": the session ends
                    }
                    let rep = PsIov { cmd: PS_REPLY, nr_pages: n, vaddr: req.vaddr, dst_id: req.dst_id };
                    s.write_all(&layout.encode(&rep)).unwrap();
                    s.write_all(&data).unwrap();
                }
                PS_IOV_CLOSE => {
                    s.write_all(&0i32.to_le_bytes()).unwrap();
                    let mut rest = Vec::new();
                    let _ = s.read_to_end(&mut rest);
                    return seen;
                }
                _ => return seen,
            }
        }
    });
    FakeCriu { addr, thread }
}

fn lazy_of(fx: &Fixture) -> Vec<LazyTask> {
    fx.tasks
        .iter()
        .map(|t| LazyTask { pid: t.pid, ranges: t.ranges.iter().map(|r| (r.start, r.pages)).collect() })
        .collect()
}

#[test]
fn criu_41_client_continues_clamped_replies_and_closes_only_when_complete() {
    for layout in [HeaderLayout::Criu41, HeaderLayout::Criu42] {
        let fx = fixture(&format!("criu{}", layout.header_len()));
        let fake = fake_criu(&fx, layout, 100);
        let c = CriuClient::connect(&fake.addr, layout, lazy_of(&fx)).unwrap();
        let src = CriuSource::new(c, vec![10, 11]).with_pieces(1024, 1024 * PAGE as u64);
        // Never asks for what the source does not hold lazily.
        let mut b = vec![0u8; 2 * PAGE];
        let e = src.read(0, 0x17000, &mut b).unwrap_err();
        assert!(e.to_string().contains("not a lazy page"), "{e}");
        let mut big = vec![0u8; 300 * PAGE];
        src.read(0, 0x400000, &mut big).unwrap();
        check(10, 0x400000, &big);
        let mut small = vec![0u8; 8 * PAGE];
        src.read(0, 0x10000, &mut small).unwrap();
        check(10, 0x10000, &small);
        assert_eq!(src.missing_pages(), 4);
        let mut last = vec![0u8; 4 * PAGE];
        src.read(1, 0x10000, &mut last).unwrap();
        check(11, 0x10000, &last);
        assert_eq!(src.missing_pages(), 0);
        // Pages may be asked for again (a forked child): no CLOSE until the engine is done.
        src.read(1, 0x10000, &mut last).unwrap();
        src.finish(true).unwrap();
        let seen = fake.thread.join().unwrap();
        // 300 pages clamped at 100: three GETs of 300, 200, 100; then 8, 4, CLOSE.
        let gets: Vec<(u64, u64)> = seen.iter().filter(|h| h.cmd == PS_IOV_GET).map(|h| (h.vaddr, h.nr_pages)).collect();
        assert_eq!(
            gets,
            vec![(0x400000, 300), (0x400000 + 100 * 4096, 200), (0x400000 + 200 * 4096, 100), (0x10000, 8), (0x10000, 4), (0x10000, 4)]
        );
        assert!(seen.iter().all(|h| h.cmd != PS_IOV_GET || h.dst_id == 10 || h.dst_id == 11));
        assert_eq!(seen.last().map(|h| h.cmd), Some(PS_IOV_CLOSE));
    }
}

#[test]
fn criu_source_pipelines_background_under_a_cap_and_sends_a_fault_at_once() {
    let fx = fixture("criu-pipe");
    let fake = fake_criu(&fx, HeaderLayout::Criu41, 1024);
    let c = CriuClient::connect(&fake.addr, HeaderLayout::Criu41, lazy_of(&fx)).unwrap();
    // Pieces of 16 pages, at most 64 background pages in flight.
    let src = CriuSource::new(c, vec![10, 11]).with_pieces(16, 64 * PAGE as u64);
    // A job of 300 pages announced; the copier reads its first 40 pages.
    src.prepare(1, &[(0, 0x400000, 300 * PAGE as u64)]);
    let mut a = vec![0u8; 40 * PAGE];
    src.read(0, 0x400000, &mut a).unwrap();
    check(10, 0x400000, &a);
    // A fault elsewhere while background pieces are in flight: its GET goes out at once.
    let mut f = vec![0u8; 8 * PAGE];
    src.read_urgent(0, 0x10000, &mut f).unwrap();
    check(10, 0x10000, &f);
    // The rest of the job, in reads that do not line up with the pieces.
    let mut b = vec![0u8; 100 * PAGE];
    src.read(0, 0x400000 + 40 * PAGE as u64, &mut b).unwrap();
    check(10, 0x400000 + 40 * PAGE as u64, &b);
    let mut c2 = vec![0u8; 160 * PAGE];
    src.read(0, 0x400000 + 140 * PAGE as u64, &mut c2).unwrap();
    check(10, 0x400000 + 140 * PAGE as u64, &c2);
    assert!(src.max_background_in_flight() <= 64, "{} pages in flight", src.max_background_in_flight());
    assert!(src.max_background_in_flight() >= 32, "not pipelined: {}", src.max_background_in_flight());
    src.finish(true).unwrap();
    let seen = fake.thread.join().unwrap();
    let gets: Vec<(u64, u64)> = seen.iter().filter(|h| h.cmd == PS_IOV_GET).map(|h| (h.vaddr, h.nr_pages)).collect();
    // Every page asked for exactly once (the finish fetched pid 11's 4 pages).
    assert_eq!(gets.iter().map(|g| g.1).sum::<u64>(), 312, "{gets:?}");
    // The fault's GET went out right behind the (at most 64 pages of) background in flight.
    let fault_at = gets.iter().position(|&g| g == (0x10000, 8)).expect("fault GET");
    let before: u64 = gets[..fault_at].iter().map(|g| g.1).sum();
    assert!(before <= 40 + 64, "{before} background pages were asked before the fault: {gets:?}");
    assert!(gets.iter().all(|&(_, n)| n <= 16 || n == 8));
    assert_eq!(seen.last().map(|h| h.cmd), Some(PS_IOV_CLOSE));
}

#[test]
fn criu_source_finish_fetches_what_was_never_needed_then_closes_only_if_complete() {
    // A complete restore whose process never touched some pages: fetch them, then CLOSE (so
    // the source tasks are killed, not resumed beside the restored ones).
    let fx = fixture("criu-finish");
    let fake = fake_criu(&fx, HeaderLayout::Criu41, 1024);
    let c = CriuClient::connect(&fake.addr, HeaderLayout::Criu41, lazy_of(&fx)).unwrap();
    let src = CriuSource::new(c, vec![10, 11]);
    let mut b = vec![0u8; 8 * PAGE];
    src.read_urgent(0, 0x10000, &mut b).unwrap();
    src.finish(true).unwrap();
    assert_eq!(src.missing_pages(), 0);
    let seen = fake.thread.join().unwrap();
    let got: u64 = seen.iter().filter(|h| h.cmd == PS_IOV_GET).map(|h| h.nr_pages).sum();
    assert_eq!(got, 312);
    assert_eq!(seen.last().map(|h| h.cmd), Some(PS_IOV_CLOSE));
    // A failed restore: nothing more is asked, no CLOSE.
    let fx = fixture("criu-finish-fail");
    let fake = fake_criu(&fx, HeaderLayout::Criu41, 1024);
    let c = CriuClient::connect(&fake.addr, HeaderLayout::Criu41, lazy_of(&fx)).unwrap();
    let src = CriuSource::new(c, vec![10, 11]);
    src.read_urgent(0, 0x10000, &mut b).unwrap();
    src.finish(false).unwrap();
    drop(src);
    let seen = fake.thread.join().unwrap();
    assert!(seen.iter().all(|h| h.cmd == PS_IOV_GET) && seen.len() == 1, "{seen:?}");
}

#[test]
fn criu_client_never_closes_an_incomplete_session_and_reports_a_dropped_one() {
    let fx = fixture("criu-drop");
    let fake = fake_criu(&fx, HeaderLayout::Criu41, 1024);
    // The client believes 0x20000 is lazy; the server does not hold it and drops the session.
    let mut lazy = lazy_of(&fx);
    lazy[1].ranges.push((0x20000, 1));
    let mut c = CriuClient::connect(&fake.addr, HeaderLayout::Criu41, lazy).unwrap();
    let mut b = vec![0u8; PAGE];
    c.get(11, 0x10000, &mut b).unwrap();
    let e = c.close().unwrap_err();
    assert!(matches!(e, RemoteError::Incomplete { missing: 312 }), "{e}");
    let e = c.get(11, 0x20000, &mut b).unwrap_err();
    assert!(matches!(e, RemoteError::Unavailable { .. }), "{e}");
    let seen = fake.thread.join().unwrap();
    assert!(seen.iter().all(|h| h.cmd == PS_IOV_GET));
}
