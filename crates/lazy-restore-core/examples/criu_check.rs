//! Cross-check of the two remote clients against two independent servers: fetches the given
//! lazy ranges from a CRIU page server (`criu page-server --lazy-pages`, or a `criu dump
//! --lazy-pages`) and from `lazy-restore page-server` on the same images, compares the bytes,
//! then ends the CRIU session with CLOSE (only once every page has arrived).
//!
//! `criu_check CRIU_ADDR OUR_ADDR PID START:PAGES[,START:PAGES...] [--criu-42]`

#![allow(clippy::print_stdout)] // a measuring tool: printing its numbers is the point

use lazy_restore_core::remote::client::{ClientOptions, UrgentClient};
use lazy_restore_core::remote::criu::{CriuClient, HeaderLayout, LazyTask};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 5 {
        eprintln!("usage: criu_check CRIU_ADDR OUR_ADDR PID START:PAGES[,...] [--criu-42]");
        std::process::exit(2);
    }
    let layout = if a.iter().any(|x| x == "--criu-42") { HeaderLayout::Criu42 } else { HeaderLayout::Criu41 };
    let pid: i32 = a[3].parse().expect("pid");
    let ranges: Vec<(u64, u64)> = a[4]
        .split(',')
        .map(|r| {
            let (s, n) = r.split_once(':').expect("START:PAGES");
            (u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex start"), n.parse().expect("pages"))
        })
        .collect();
    let mut criu = CriuClient::connect(&a[1], layout, vec![LazyTask { pid, ranges: ranges.clone() }]).expect("criu");
    let ours = UrgentClient::connect(ClientOptions::new(a[2].clone())).expect("ours");
    let (mut pages, mut differ) = (0u64, 0u64);
    for (start, n) in ranges {
        let mut x = vec![0u8; n as usize * 4096];
        let mut y = vec![0u8; n as usize * 4096];
        criu.get(pid, start, &mut x).unwrap_or_else(|e| panic!("criu {start:#x}: {e}"));
        ours.fetch(pid, start, &mut y).unwrap_or_else(|e| panic!("ours {start:#x}: {e}"));
        differ += x.chunks(4096).zip(y.chunks(4096)).filter(|(p, q)| p != q).count() as u64;
        pages += n;
    }
    let closed = criu.close();
    println!("{pages} pages from both servers, {differ} differ; CRIU session CLOSE: {closed:?}");
    if differ > 0 || closed.is_err() {
        std::process::exit(1);
    }
}
