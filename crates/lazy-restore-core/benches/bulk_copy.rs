//! Bulk UFFDIO_COPY throughput into a registered, empty region, by chunk size, from the two
//! sources the engine can use — `pread` of the page file into a reusable buffer then COPY
//! (what the engine did), and COPY straight from a read-only shared mapping of the file
//! (mapped afresh every iteration: the engine copies each page once, so its page tables are
//! always cold) — next to plain memcpy of the same bytes into fresh anonymous memory (pays a
//! page fault per page) and into prefaulted memory (the machine's copy bandwidth).
//!
//! 64 MiB per iteration from a page-cached file. `cargo bench -p lazy-restore-core --bench
//! bulk_copy` (needs root for userfaultfd). GB/s = criterion's "thrpt" in GiB/s × 1.074.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lazy_restore_core::testkit::{self, FileMapping, Region};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const P: usize = 4096;
const BYTES: usize = 64 << 20;
const CHUNKS: [usize; 5] = [4 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20];

struct Fixture {
    path: PathBuf,
    file: File,
    region: Region,
    uffd: OwnedFd,
}

impl Fixture {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("lr-bulk-copy-{}.img", std::process::id()));
        let data: Vec<u8> = (0..BYTES)
            .map(|i| (i / P % 251) as u8 ^ (i as u8))
            .collect();
        std::fs::write(&path, &data).expect("write the page file");
        let file = File::open(&path).expect("open the page file");
        // Warm the page cache: this measures copying, not the disk.
        let mut buf = vec![0u8; 1 << 20];
        for off in (0..BYTES).step_by(buf.len()) {
            file.read_exact_at(&mut buf, off as u64).expect("read");
        }
        let region = Region::map(BYTES).expect("mmap");
        let uffd = testkit::userfaultfd(libc::O_CLOEXEC | libc::O_NONBLOCK).expect("userfaultfd");
        testkit::uffdio_api(&uffd, 0).expect("UFFDIO_API");
        testkit::uffdio_register(
            uffd.as_fd(),
            region.addr(),
            BYTES as u64,
            testkit::REGISTER_MODE_MISSING,
        )
        .expect("UFFDIO_REGISTER");
        Self {
            path,
            file,
            region,
            uffd,
        }
    }

    /// Empties the region again (no REMOVE event is requested, so no handler is involved).
    fn reset(&self) {
        self.region.dontneed(0, BYTES).expect("MADV_DONTNEED");
    }

    fn copy_all(&self, chunk: usize, mut src_at: impl FnMut(usize, usize) -> u64) {
        let mut off = 0;
        while off < BYTES {
            let src = src_at(off, chunk);
            let n = testkit::uffdio_copy_raw(
                self.uffd.as_fd(),
                self.region.addr() + off as u64,
                src,
                chunk as u64,
                0,
            )
            .expect("UFFDIO_COPY");
            assert_eq!(n, chunk, "short copy");
            off += chunk;
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn bulk_copy(c: &mut Criterion) {
    let fx = Fixture::new();
    let mut g = c.benchmark_group("bulk_copy");
    g.throughput(Throughput::Bytes(BYTES as u64));
    for chunk in CHUNKS {
        let label = if chunk >= 1 << 20 {
            format!("{}M", chunk >> 20)
        } else {
            format!("{}K", chunk >> 10)
        };
        g.bench_with_input(
            BenchmarkId::new("pread+copy", &label),
            &chunk,
            |b, &chunk| {
                let mut buf = vec![0u8; chunk];
                b.iter_custom(|iters| {
                    let mut t = Duration::ZERO;
                    for _ in 0..iters {
                        fx.reset();
                        let start = Instant::now();
                        fx.copy_all(chunk, |off, len| {
                            fx.file
                                .read_exact_at(&mut buf[..len], off as u64)
                                .expect("pread");
                            buf.as_ptr() as u64
                        });
                        t += start.elapsed();
                    }
                    t
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("mmap-copy", &label),
            &chunk,
            |b, &chunk| {
                b.iter_custom(|iters| {
                    let mut t = Duration::ZERO;
                    for _ in 0..iters {
                        fx.reset();
                        let map =
                            FileMapping::map(fx.file.as_fd(), BYTES as u64).expect("mmap file");
                        let start = Instant::now();
                        fx.copy_all(chunk, |off, _| map.addr_of(off as u64));
                        t += start.elapsed();
                    }
                    t
                })
            },
        );
    }
    // The machine: memcpy of the same bytes (from anonymous memory).
    let src: Vec<u8> = (0..BYTES).map(|i| i as u8).collect();
    g.bench_function("memcpy/fresh-anon", |b| {
        b.iter_custom(|iters| {
            let mut t = Duration::ZERO;
            for _ in 0..iters {
                let dst = Region::map(BYTES).expect("mmap");
                let start = Instant::now();
                dst.write(0, &src);
                t += start.elapsed();
            }
            t
        })
    });
    let dst = Region::map(BYTES).expect("mmap");
    dst.write(0, &src);
    g.bench_function("memcpy/prefaulted", |b| {
        b.iter(|| dst.write(0, std::hint::black_box(&src)))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_millis(1500));
    targets = bulk_copy
}
criterion_main!(benches);
