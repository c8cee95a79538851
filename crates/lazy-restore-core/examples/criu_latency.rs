//! Round trip of single GETs against a CRIU page server (`criu dump --lazy-pages`): N random
//! GETs of K pages inside one lazy range, then the rest fetched and CLOSE.
//!
//! `criu_latency ADDR PID START:PAGES N K`

#![allow(clippy::print_stdout)] // a measuring tool: printing its numbers is the point

use lazy_restore_core::remote::criu::{CriuClient, HeaderLayout, LazyTask};
use std::time::Instant;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 6 {
        eprintln!("usage: criu_latency ADDR PID START:PAGES N K");
        std::process::exit(2);
    }
    let pid: i32 = a[2].parse().expect("pid");
    let (s, n) = a[3].split_once(':').expect("START:PAGES");
    let start = u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex start");
    let pages: u64 = n.parse().expect("pages");
    let count: usize = a[4].parse().expect("N");
    let k: u64 = a[5].parse().expect("K");
    let mut c = CriuClient::connect(&a[1], HeaderLayout::Criu41, vec![LazyTask { pid, ranges: vec![(start, pages)] }])
        .expect("connect");
    let mut buf = vec![0u8; k as usize * 4096];
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut lat = Vec::with_capacity(count);
    for _ in 0..count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let p = x % (pages - k);
        let t = Instant::now();
        c.get(pid, start + p * 4096, &mut buf).expect("get");
        lat.push(t.elapsed().as_micros() as u64);
    }
    lat.sort_unstable();
    let q = |f: f64| lat[((lat.len() as f64 * f) as usize).min(lat.len() - 1)];
    println!("{count} GETs of {k} pages: p50 {} µs, p90 {} µs, p99 {} µs, max {} µs", q(0.5), q(0.9), q(0.99), lat[lat.len() - 1]);
    let t = Instant::now();
    c.drain_and_close().expect("drain and close");
    println!("rest + CLOSE: {} ms", t.elapsed().as_millis());
}
