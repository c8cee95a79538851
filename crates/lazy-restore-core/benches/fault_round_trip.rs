//! Fault round trip with an in-process userfaultfd: a toucher (the bench thread) reads one
//! missing page of a registered region; a minimal server thread answers with UFFDIO_COPY.
//! Time is taken in the toucher around the load, so it is the whole round trip (fault →
//! message → read → copy → wake → resume): the floor the engine's fault service is judged by.
//!
//! Variants: `read` (server blocks in read(2), the fastest wait), `epoll` (the engine's way:
//! epoll_wait, then a non-blocking read of up to 64 messages), and `epoll+ra16` (the answer
//! is the aligned 16-page block holding the fault, one COPY; the toucher touches one page per
//! block so every touch faults). Besides criterion's estimate of the mean, per-fault
//! p50/p90/p99 are printed (criterion's statistics are over sample means).
//!
//! `cargo bench -p lazy-restore-core --bench fault_round_trip` (needs root for userfaultfd).

use criterion::{criterion_group, criterion_main, Criterion};
use lazy_restore_core::testkit::{self, Region};
use lazy_restore_core::uffd::{Event, Uffd};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const P: usize = 4096;
/// Region size: 64 MiB; recycled with MADV_DONTNEED when every page was touched.
const PAGES: usize = 16 * 1024;

#[derive(Clone, Copy, PartialEq)]
enum Wait {
    Read,
    Epoll,
}

/// A running server. Never stopped: a server blocked in read(2) cannot be woken without a
/// fault, so each variant's server is left to the process exit.
struct Server {
    region: Arc<Region>,
}

fn uffd_for(region: &Region, nonblock: bool) -> OwnedFd {
    let flags = libc::O_CLOEXEC | if nonblock { libc::O_NONBLOCK } else { 0 };
    let fd = testkit::userfaultfd(flags).expect("userfaultfd (run as root)");
    // No events: MADV_DONTNEED then just makes pages missing again.
    testkit::uffdio_api(&fd, 0).expect("UFFDIO_API");
    testkit::uffdio_register(
        fd.as_fd(),
        region.addr(),
        region.len() as u64,
        testkit::REGISTER_MODE_MISSING,
    )
    .expect("UFFDIO_REGISTER");
    fd
}

/// Starts a server answering each fault with `block` pages (aligned) from a pattern buffer.
fn serve(wait: Wait, block: usize) -> Server {
    let region = Arc::new(Region::map(PAGES * P).expect("mmap"));
    let fd = uffd_for(&region, wait == Wait::Epoll);
    let (base, len) = (region.addr(), region.len() as u64);
    let src: Vec<u8> = (0..block * P).map(|i| (i % 251) as u8).collect();
    std::thread::spawn(move || {
        let answer = |fd: &OwnedFd, addr: u64| {
            let bytes = (block * P) as u64;
            let start = (base + (addr - base) / bytes * bytes).min(base + len - bytes);
            // EEXIST (a page of the block is already there) is fine: wake and go on.
            if testkit::uffdio_copy(fd.as_fd(), start, &src, 0).is_err() {
                let _ = testkit::uffdio_copy(fd.as_fd(), addr & !4095, &src[..P], 0);
            }
        };
        match wait {
            Wait::Read => {
                let mut f = File::from(fd.try_clone().expect("dup"));
                let mut msg = [0u8; 32];
                loop {
                    if f.read_exact(&mut msg).is_err() {
                        return;
                    }
                    if msg[0] == 0x12 {
                        let addr = u64::from_ne_bytes(msg[16..24].try_into().unwrap_or([0; 8]));
                        answer(&fd, addr);
                    }
                }
            }
            Wait::Epoll => {
                let raw = fd.try_clone().expect("dup");
                let mut u = Uffd::new(fd).expect("uffd");
                let ep = testkit::Epoll::new().expect("epoll");
                ep.add(u.as_fd(), 1).expect("epoll add");
                let (mut ready, mut events) = (Vec::new(), Vec::new());
                loop {
                    ready.clear();
                    ep.wait(&mut ready, 8, None).expect("epoll wait");
                    events.clear();
                    u.read_events(&mut events).expect("read");
                    for e in events.drain(..) {
                        if let Event::PageFault { addr, .. } = e {
                            answer(&raw, addr);
                        }
                    }
                }
            }
        }
    });
    Server { region }
}

/// A fixed pseudo-random permutation of `0..n` (xorshift, no rand crate).
fn permutation(n: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

fn percentiles(ns: &mut [u32]) -> String {
    if ns.is_empty() {
        return "no samples".into();
    }
    ns.sort_unstable();
    let at = |p: f64| ns[((p * ns.len() as f64) as usize).min(ns.len() - 1)] as f64 / 1000.0;
    format!(
        "{} faults: p50 {:.1} µs, p90 {:.1}, p99 {:.1}, max {:.1}",
        ns.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        ns[ns.len() - 1] as f64 / 1000.0
    )
}

fn bench_variant(c: &mut Criterion, name: &str, wait: Wait, block: usize) {
    let server = serve(wait, block);
    let order: Vec<usize> = permutation(PAGES / block)
        .into_iter()
        .map(|b| b * block + (b * 7) % block)
        .collect();
    let mut next = 0usize;
    let samples = Arc::new(Mutex::new(Vec::<u32>::new()));
    let s2 = Arc::clone(&samples);
    let region = Arc::clone(&server.region);
    c.bench_function(name, move |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut local = Vec::with_capacity(iters as usize);
            let mut buf = [0u8; 8];
            for _ in 0..iters {
                if next == order.len() {
                    region.dontneed(0, PAGES * P).expect("MADV_DONTNEED");
                    next = 0;
                }
                let off = order[next] * P;
                next += 1;
                let t = Instant::now();
                region.read(off, &mut buf);
                let d = t.elapsed();
                std::hint::black_box(&buf);
                total += d;
                local.push(u32::try_from(d.as_nanos()).unwrap_or(u32::MAX));
            }
            s2.lock().unwrap_or_else(|p| p.into_inner()).extend(local);
            total
        })
    });
    let mut ns = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    eprintln!("{name}: {}", percentiles(&mut ns));
}

fn fault_round_trip(c: &mut Criterion) {
    bench_variant(c, "fault_round_trip/read", Wait::Read, 1);
    bench_variant(c, "fault_round_trip/epoll", Wait::Epoll, 1);
    bench_variant(c, "fault_round_trip/epoll+ra16", Wait::Epoll, 16);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    targets = fault_round_trip
}
criterion_main!(benches);
