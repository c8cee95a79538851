//! A TCP forwarder that delays each direction by a fixed time while keeping byte order: the
//! "~1 ms RTT" part of scripts/netns-link.sh on kernels without netem.
//!
//! `delay_proxy LISTEN TARGET DELAY_US` — every accepted connection gets a connection to
//! TARGET; per direction a reader stamps each read with now + DELAY and a writer sends it when
//! that time has come (one FIFO per direction, so order is kept).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    let writer = std::thread::spawn(move || {
        for (due, data) in rx {
            // Sleep most of the way, spin the rest: a plain sleep overshoots by ~60-100 µs.
            let now = Instant::now();
            if due > now + Duration::from_micros(150) {
                std::thread::sleep(due - now - Duration::from_micros(150));
            }
            while Instant::now() < due {
                std::hint::spin_loop();
            }
            if to.write_all(&data).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.join();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: delay_proxy LISTEN_ADDR:PORT TARGET_ADDR:PORT DELAY_US");
        std::process::exit(2);
    }
    let delay = Duration::from_micros(args[3].parse().unwrap_or(500));
    let l = TcpListener::bind(&args[1]).unwrap_or_else(|e| {
        eprintln!("delay_proxy: cannot listen on {}: {e}", args[1]);
        std::process::exit(1)
    });
    eprintln!("delay_proxy: {} -> {} (+{:?} each way)", args[1], args[2], delay);
    for c in l.incoming() {
        let Ok(c) = c else { continue };
        let target = args[2].clone();
        std::thread::spawn(move || {
            let Ok(t) = TcpStream::connect(&target) else { return };
            let _ = c.set_nodelay(true);
            let _ = t.set_nodelay(true);
            let (c2, t2) = match (c.try_clone(), t.try_clone()) {
                (Ok(a), Ok(b)) => (a, b),
                _ => return,
            };
            let up = std::thread::spawn(move || pipe(c, t, delay));
            pipe(t2, c2, delay);
            let _ = up.join();
        });
    }
}
