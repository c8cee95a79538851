//! Measurements for docs/page-server-protocol.md (loopback and through scripts/netns-link.sh).
//!
//! ```text
//! remote_bench net-server ADDR:PORT            # raw TCP: ping-pong echo and a download source
//! remote_bench net-client ADDR:PORT            # RTT (1-byte ping-pong) and download throughput
//! remote_bench ps-serve FILE ADDR:PORT         # our page server; FILE = the pages of pid 1 at 0x10000000
//! remote_bench ps-client ADDR:PORT PAGES       # fault GET latency, bulk throughput raw and lz4
//! remote_bench ps-all ADDR:PORT [TOKEN]        # stream everything; pages per pid (any server)
//! ```

#![allow(clippy::print_stdout)] // a measuring tool: printing its numbers is the point

use lazy_restore_core::plan::{RangePlan, TaskPlan};
use lazy_restore_core::remote::client::{BulkClient, BulkEvent, ClientOptions, UrgentClient};
use lazy_restore_core::remote::protocol::{StreamMode, PAGE};
use lazy_restore_core::remote::server::{PageServer, ServerConfig};
use lazy_restore_core::remote::store::PageStore;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BASE: u64 = 0x1000_0000;

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    v[((v.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1e6
}

fn net_server(addr: &str) {
    let l = TcpListener::bind(addr).expect("bind");
    for c in l.incoming() {
        let Ok(mut c) = c else { continue };
        std::thread::spawn(move || {
            let _ = c.set_nodelay(true);
            let mut mode = [0u8; 1];
            if c.read_exact(&mut mode).is_err() {
                return;
            }
            if mode[0] == b'P' {
                let mut b = [0u8; 1];
                while c.read_exact(&mut b).is_ok() && c.write_all(&b).is_ok() {}
            } else {
                let mut n = [0u8; 8];
                if c.read_exact(&mut n).is_err() {
                    return;
                }
                let mut left = u64::from_le_bytes(n);
                let buf = vec![0x5au8; 256 * 1024];
                while left > 0 {
                    let k = left.min(buf.len() as u64) as usize;
                    if c.write_all(&buf[..k]).is_err() {
                        return;
                    }
                    left -= k as u64;
                }
            }
        });
    }
}

fn net_client(addr: &str) {
    let mut c = TcpStream::connect(addr).expect("connect");
    c.set_nodelay(true).ok();
    c.write_all(b"P").unwrap();
    let mut rtts = Vec::new();
    let mut b = [7u8; 1];
    for _ in 0..2000 {
        let t = Instant::now();
        c.write_all(&b).unwrap();
        c.read_exact(&mut b).unwrap();
        rtts.push(t.elapsed());
    }
    println!(
        "tcp ping-pong RTT: p50 {:.0} µs, p99 {:.0} µs ({} round trips)",
        pct(&mut rtts, 0.5),
        pct(&mut rtts, 0.99),
        rtts.len()
    );
    let total: u64 = 512 << 20;
    let mut c = TcpStream::connect(addr).expect("connect");
    let t = Instant::now();
    c.write_all(b"B").unwrap();
    c.write_all(&total.to_le_bytes()).unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < total {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "EOF");
        got += n as u64;
    }
    let s = t.elapsed().as_secs_f64();
    println!("tcp download: {} MiB in {:.3} s = {:.0} MiB/s", total >> 20, s, (total >> 20) as f64 / s);
}

fn ps_serve(file: &str, addr: &str) {
    let len = std::fs::metadata(file).expect("pages file").len();
    let pages = len / PAGE as u64;
    let tasks = vec![TaskPlan { pid: 1, ranges: vec![RangePlan { start: BASE, pages, file: 0, offset: 0 }] }];
    let store = PageStore::open(tasks, &[file.into()]).expect("store");
    let (host, port) = addr.rsplit_once(':').expect("ADDR:PORT");
    let cfg = ServerConfig {
        address: host.into(),
        port: port.parse().expect("port"),
        token: None,
        allow_lz4: true,
        log: Arc::new(|m: &str| eprintln!("page server: {m}")),
    };
    let s = PageServer::start(cfg, store).expect("start");
    eprintln!("serving {pages} pages of {file} as pid 1 at {BASE:#x} on {}", s.local_addr());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn ps_client(addr: &str, pages: u64) {
    let mut o = ClientOptions::new(addr);
    o.chunk_pages = 64;
    let u = UrgentClient::connect(o.clone()).expect("urgent");
    let mut lat = Vec::new();
    let mut buf = vec![0u8; PAGE];
    let mut x: u64 = 0x9E37_79B9;
    for _ in 0..2000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let t = Instant::now();
        u.fetch(1, BASE + (x % pages) * PAGE as u64, &mut buf).expect("fetch");
        lat.push(t.elapsed());
    }
    println!("fault GET (1 page): p50 {:.0} µs, p99 {:.0} µs", pct(&mut lat, 0.5), pct(&mut lat, 0.99));
    // Faults while a bulk stream saturates the link: the urgent connection is not queued behind it.
    {
        let mut ob = o.clone();
        ob.lz4 = false;
        let bulk = std::thread::spawn(move || {
            let mut b = BulkClient::connect(ob).expect("bulk");
            let id = b.stream(StreamMode::All, vec![]).expect("stream");
            loop {
                match b.next_event().expect("next") {
                    BulkEvent::End { id: i, .. } if i == id => break,
                    _ => {}
                }
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        let mut lat = Vec::new();
        while !bulk.is_finished() && lat.len() < 2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let t = Instant::now();
            u.fetch(1, BASE + (x % pages) * PAGE as u64, &mut buf).expect("fetch");
            lat.push(t.elapsed());
        }
        let _ = bulk.join();
        if !lat.is_empty() {
            println!(
                "fault GET during a bulk stream: p50 {:.0} µs, p99 {:.0} µs ({} faults)",
                pct(&mut lat, 0.5),
                pct(&mut lat, 0.99),
                lat.len()
            );
        }
    }
    for lz4 in [false, true] {
        let mut o = o.clone();
        o.lz4 = lz4;
        let mut b = BulkClient::connect(o).expect("bulk");
        let t = Instant::now();
        let id = b.stream(StreamMode::All, vec![]).expect("stream");
        let mut n = 0u64;
        loop {
            match b.next_event().expect("next") {
                BulkEvent::Chunk { data, .. } => n += data.len() as u64,
                BulkEvent::End { id: i, .. } if i == id => break,
                _ => {}
            }
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "bulk stream lz4={}: {} MiB in {:.3} s = {:.0} MiB/s of pages; wire {:.1}% of raw",
            if b.compressed() { "yes" } else { "no" },
            n >> 20,
            s,
            (n as f64 / 1048576.0) / s,
            100.0 * b.wire_bytes as f64 / b.raw_bytes.max(1) as f64
        );
    }
}

fn ps_all(addr: &str, token: Option<&String>) {
    let mut o = ClientOptions::new(addr);
    o.token = token.map(|t| t.as_bytes().to_vec());
    o.lz4 = true;
    let mut b = match BulkClient::connect(o) {
        Ok(b) => b,
        Err(e) => {
            println!("error [{}]: {e}", e.code());
            std::process::exit(1);
        }
    };
    let id = b.stream(StreamMode::All, vec![]).expect("stream");
    let mut per: std::collections::BTreeMap<i32, u64> = Default::default();
    loop {
        match b.next_event().expect("next") {
            BulkEvent::Chunk { run, .. } => *per.entry(run.pid).or_default() += u64::from(run.pages),
            BulkEvent::End { id: i, .. } if i == id => break,
            other => println!("{other:?}"),
        }
    }
    for (pid, n) in per {
        println!("pid {pid}: {n} pages");
    }
    println!("wire {:.1}% of raw (lz4 {})", 100.0 * b.wire_bytes as f64 / b.raw_bytes.max(1) as f64, b.compressed());
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    match a.get(1).map(String::as_str) {
        Some("net-server") if a.len() == 3 => net_server(&a[2]),
        Some("net-client") if a.len() == 3 => net_client(&a[2]),
        Some("ps-serve") if a.len() == 4 => ps_serve(&a[2], &a[3]),
        Some("ps-all") if a.len() == 3 || a.len() == 4 => ps_all(&a[2], a.get(3)),
        Some("ps-client") if a.len() == 4 => ps_client(&a[2], a[3].parse().expect("PAGES")),
        _ => {
            eprintln!("usage: see the header of crates/lazy-restore-core/examples/remote_bench.rs");
            std::process::exit(2);
        }
    }
}
