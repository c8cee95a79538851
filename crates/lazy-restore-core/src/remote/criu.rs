//! Client of CRIU's own page server (`criu dump --lazy-pages --address A --port P`, or
//! `criu page-server --lazy-pages`): one TCP stream per session, GET / reply / CLOSE
//! (shared/docs/criu-lazy-pages.md §4).
//!
//! * Header: 4.1.1 = 24 bytes {cmd u32, nr_pages u32, vaddr u64, dst_id u64}; 4.2 = 32 bytes
//!   {cmd u32, pad u32, nr_pages u64, vaddr u64, dst_id u64}. Nothing negotiates it: the user
//!   says which ([`HeaderLayout`]).
//! * GET = cmd 7, dst_id = pstree pid; reply = cmd 0x00040006 with the same vaddr and dst_id and
//!   m ≤ n pages of raw bytes. A shorter reply is fine: ask again for the rest.
//! * The server drops the whole session when asked for an address it does not hold lazily, so
//!   this client refuses, before sending, any page outside the PE_LAZY (not PE_PRESENT) ranges
//!   it was given.
//! * CLOSE (0x1023) makes the dump side kill the source tasks whatever was fetched, so it is
//!   sent only once every lazy page has arrived; otherwise the socket is just dropped and the
//!   source resumes its tasks.
//! * One connection, no reconnect: CRIU's server accepts a single session.

use crate::remote::intervals::IntervalSet;
use crate::remote::RemoteError;
use crate::source::{PageSource, SourceError};
use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// PS_IOV_GET.
pub const PS_IOV_GET: u32 = 7;
/// PS_IOV_CLOSE.
pub const PS_IOV_CLOSE: u32 = 0x1023;
/// The reply to a GET: PS_IOV_ADD_F | PE_PRESENT << 16.
pub const PS_REPLY: u32 = 0x0004_0006;
const PAGE: u64 = 4096;

/// Which CRIU's header layout the server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderLayout {
    /// CRIU ≤ 4.1.1: 24 bytes.
    Criu41,
    /// CRIU 4.2+: 32 bytes (nr_pages u64).
    Criu42,
}

/// One `page_server_iov`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PsIov {
    pub cmd: u32,
    pub nr_pages: u64,
    pub vaddr: u64,
    pub dst_id: u64,
}

impl HeaderLayout {
    /// Header size in bytes.
    pub fn header_len(self) -> usize {
        match self {
            Self::Criu41 => 24,
            Self::Criu42 => 32,
        }
    }

    /// Encodes a header.
    pub fn encode(self, h: &PsIov) -> Vec<u8> {
        let mut b = Vec::with_capacity(32);
        b.extend_from_slice(&h.cmd.to_le_bytes());
        match self {
            Self::Criu41 => b.extend_from_slice(&(h.nr_pages.min(u64::from(u32::MAX)) as u32).to_le_bytes()),
            Self::Criu42 => {
                b.extend_from_slice(&[0; 4]);
                b.extend_from_slice(&h.nr_pages.to_le_bytes());
            }
        }
        b.extend_from_slice(&h.vaddr.to_le_bytes());
        b.extend_from_slice(&h.dst_id.to_le_bytes());
        b
    }

    /// Decodes a header of [`header_len`](Self::header_len) bytes.
    pub fn decode(self, b: &[u8]) -> PsIov {
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        match self {
            Self::Criu41 => PsIov { cmd: u32_at(0), nr_pages: u64::from(u32_at(4)), vaddr: u64_at(8), dst_id: u64_at(16) },
            Self::Criu42 => PsIov { cmd: u32_at(0), nr_pages: u64_at(8), vaddr: u64_at(16), dst_id: u64_at(24) },
        }
    }
}

/// A task's lazy ranges on the source: (image address, pages), sorted, disjoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyTask {
    pub pid: i32,
    pub ranges: Vec<(u64, u64)>,
}

/// How long a CRIU page server may take to answer or accept bytes before it counts as gone.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A session with a CRIU page server.
pub struct CriuClient {
    addr: String,
    layout: HeaderLayout,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    lazy: HashMap<i32, Vec<(u64, u64)>>,
    total_pages: u64,
    got: IntervalSet,
    broken: bool,
    closed: bool,
}

impl CriuClient {
    /// Connects. `lazy` lists every page the source holds lazily (what the client may ask for
    /// and must fetch before CLOSE).
    pub fn connect(addr: &str, layout: HeaderLayout, lazy: Vec<LazyTask>) -> Result<Self, RemoteError> {
        let s = TcpStream::connect(addr).map_err(|e| RemoteError::Unavailable {
            addr: addr.to_string(),
            grace: Duration::ZERO,
            last: format!("connect: {e}"),
        })?;
        let _ = s.set_nodelay(true);
        // CRIU's server allows no reconnect: a reply this late means the source is gone, and
        // failing (the tree is killed) beats a restored process hung forever.
        let _ = s.set_read_timeout(Some(IO_TIMEOUT));
        let _ = s.set_write_timeout(Some(IO_TIMEOUT));
        let writer = s.try_clone().map_err(|e| RemoteError::Protocol { addr: addr.to_string(), what: e.to_string() })?;
        let total_pages = lazy.iter().flat_map(|t| &t.ranges).map(|r| r.1).sum();
        Ok(Self {
            addr: addr.to_string(),
            layout,
            reader: BufReader::with_capacity(256 * 1024, s),
            writer,
            lazy: lazy.into_iter().map(|t| (t.pid, t.ranges)).collect(),
            total_pages,
            got: IntervalSet::new(),
            broken: false,
            closed: false,
        })
    }

    fn holds(&self, pid: i32, addr: u64, pages: u64) -> bool {
        let Some(rs) = self.lazy.get(&pid) else { return false };
        let end = addr + pages * PAGE;
        let i = rs.partition_point(|&(s, n)| s + n * PAGE <= addr);
        rs.get(i).is_some_and(|&(s, n)| s <= addr && end <= s + n * PAGE)
    }

    fn lost(&mut self, what: String) -> RemoteError {
        self.broken = true;
        RemoteError::Unavailable { addr: self.addr.clone(), grace: Duration::ZERO, last: what }
    }

    /// Fetches `buf.len() / 4096` pages of `pid` at image address `addr`, asking again for the
    /// rest whenever a reply brings fewer pages than asked.
    pub fn get(&mut self, pid: i32, addr: u64, buf: &mut [u8]) -> Result<(), RemoteError> {
        let pages = (buf.len() as u64) / PAGE;
        if !self.holds(pid, addr, pages) {
            return Err(RemoteError::NotLazy { pid, addr, pages });
        }
        if self.broken || self.closed {
            return Err(RemoteError::Unavailable {
                addr: self.addr.clone(),
                grace: Duration::ZERO,
                last: "the session already ended".into(),
            });
        }
        let hl = self.layout.header_len();
        let mut done = 0u64;
        while done < pages {
            let vaddr = addr + done * PAGE;
            let ask = pages - done;
            let req = self.layout.encode(&PsIov { cmd: PS_IOV_GET, nr_pages: ask, vaddr, dst_id: pid as u64 });
            if let Err(e) = self.writer.write_all(&req) {
                return Err(self.lost(format!("sending GET: {e}")));
            }
            let mut h = [0u8; 32];
            if let Err(e) = self.reader.read_exact(&mut h[..hl]) {
                return Err(self.lost(format!("reading the reply to GET {vaddr:#x}: {e}")));
            }
            let r = self.layout.decode(&h[..hl]);
            if r.cmd != PS_REPLY || r.vaddr != vaddr || r.dst_id != pid as u64 || r.nr_pages == 0 || r.nr_pages > ask {
                self.broken = true;
                return Err(RemoteError::Protocol {
                    addr: self.addr.clone(),
                    what: format!(
                        "GET {ask} pages at {vaddr:#x} of {pid} got header cmd {:#x} nr {} vaddr {:#x} id {}",
                        r.cmd, r.nr_pages, r.vaddr, r.dst_id
                    ),
                });
            }
            let from = (done * PAGE) as usize;
            let to = from + (r.nr_pages * PAGE) as usize;
            if let Err(e) = self.reader.read_exact(&mut buf[from..to]) {
                return Err(self.lost(format!("reading {} pages at {vaddr:#x}: {e}", r.nr_pages)));
            }
            self.got.insert(pid, vaddr, vaddr + r.nr_pages * PAGE);
            done += r.nr_pages;
        }
        Ok(())
    }

    /// Fetches (and discards) every lazy page not fetched yet, then CLOSEs: a migration whose
    /// process never needed some pages (it unmapped them, or exited) still ends with CLOSE, so
    /// the source tasks are killed instead of resumed next to the restored ones.
    pub fn drain_and_close(&mut self) -> Result<(), RemoteError> {
        let mut gaps = Vec::new();
        for (&pid, ranges) in &self.lazy {
            for &(start, n) in ranges {
                let end = start + n * PAGE;
                let mut x = start;
                while let Some((a, b)) = self.got.first_gap(pid, x, end) {
                    gaps.push((pid, a, b));
                    x = b;
                }
            }
        }
        let mut buf = vec![0u8; 256 * PAGE as usize];
        for (pid, a, b) in gaps {
            let mut x = a;
            while x < b {
                let len = (b - x).min(buf.len() as u64) as usize;
                self.get(pid, x, &mut buf[..len])?;
                x += len as u64;
            }
        }
        self.close()
    }

    /// Lazy pages not fetched yet.
    pub fn missing_pages(&self) -> u64 {
        self.total_pages.saturating_sub(self.got.bytes() / PAGE)
    }

    /// Ends the session with CLOSE if every lazy page arrived (expects the int32 0 reply);
    /// otherwise returns [`RemoteError::Incomplete`] and sends nothing.
    pub fn close(&mut self) -> Result<(), RemoteError> {
        if self.closed {
            return Ok(());
        }
        let missing = self.missing_pages();
        if missing > 0 {
            return Err(RemoteError::Incomplete { missing });
        }
        self.closed = true;
        let req = self.layout.encode(&PsIov { cmd: PS_IOV_CLOSE, nr_pages: 0, vaddr: 0, dst_id: 0 });
        self.writer.write_all(&req).map_err(|e| self.lost(format!("sending CLOSE: {e}")))?;
        let mut st = [0u8; 4];
        self.reader.read_exact(&mut st).map_err(|e| self.lost(format!("reading the CLOSE reply: {e}")))?;
        let status = i32::from_le_bytes(st);
        // The server waits for us to close first (so that it does not sit in TIME_WAIT).
        let _ = self.writer.shutdown(std::net::Shutdown::Both);
        if status != 0 {
            return Err(RemoteError::Protocol { addr: self.addr.clone(), what: format!("CLOSE answered {status}") });
        }
        Ok(())
    }
}

/// A [`PageSource`] over a CRIU page server: file index = task index into `pids`, offset =
/// image address. The session is CLOSEd when the engine ends complete ([`PageSource::finish`]).
///
/// CRIU's protocol has one FIFO stream, so faults come first by policy: a background read is
/// sent as GETs of one "piece" at a time, and before each piece the copier lets any waiting
/// fault go first, so a fault waits for at most one piece in flight, not a 4 MiB chunk. The
/// piece starts at about one bandwidth-delay product (32 pages: 1 Gbit/s x 1 ms), doubles
/// after every piece during which no fault was served (up to 256 pages, so a quiet transfer
/// pays one round trip per MiB, not per 128 KiB), and drops back when faults come.
pub struct CriuSource {
    pids: Vec<i32>,
    client: Mutex<CriuClient>,
    /// Faults waiting for the connection.
    urgent_waiting: AtomicUsize,
    /// Faults served so far (a change means "faults are coming": shrink the pieces).
    urgent_served: AtomicUsize,
    /// `urgent_served` when the last piece was sent.
    served_seen: AtomicUsize,
    min_piece: usize,
    max_piece: usize,
    piece: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Smallest background piece: 32 pages (128 KiB), about 1 Gbit/s x 1 ms.
pub const DEFAULT_PIECE_PAGES: usize = 32;
/// Largest background piece: 256 pages (1 MiB).
pub const MAX_PIECE_PAGES: usize = 256;

impl CriuSource {
    /// Wraps a connected client.
    pub fn new(client: CriuClient, pids: Vec<i32>) -> Self {
        Self {
            pids,
            client: Mutex::new(client),
            urgent_waiting: AtomicUsize::new(0),
            urgent_served: AtomicUsize::new(0),
            served_seen: AtomicUsize::new(0),
            min_piece: DEFAULT_PIECE_PAGES,
            max_piece: MAX_PIECE_PAGES,
            piece: AtomicUsize::new(DEFAULT_PIECE_PAGES),
        }
    }

    /// A fixed background piece of `pages` (at least 1): no growing.
    pub fn with_piece_pages(mut self, pages: usize) -> Self {
        self.min_piece = pages.max(1);
        self.max_piece = self.min_piece;
        self.piece = AtomicUsize::new(self.min_piece);
        self
    }

    /// Pages not fetched yet.
    pub fn missing_pages(&self) -> u64 {
        lock(&self.client).missing_pages()
    }

    fn pid(&self, file: u32) -> Result<i32, SourceError> {
        self.pids
            .get(file as usize)
            .copied()
            .ok_or(SourceError::Remote(RemoteError::UnknownTask { file }))
    }

    fn get(c: &mut CriuClient, pid: i32, addr: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        // No CLOSE once every page has come: a child forked after the restore needs its own
        // copy of pages the parent already got (CRIU's server tees them: asking again works).
        // The session ends in `finish`.
        c.get(pid, addr, buf).map_err(SourceError::Remote)
    }
}

impl PageSource for CriuSource {
    fn read(&self, file: u32, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let pid = self.pid(file)?;
        let mut done = 0usize;
        while done < buf.len() {
            // Faults first: let every waiting fault take the connection before this piece.
            while self.urgent_waiting.load(Ordering::Acquire) > 0 {
                std::thread::yield_now();
            }
            // A fault served since the last piece (during it, or between two reads): start
            // small again.
            let served = self.urgent_served.load(Ordering::Acquire);
            let mut pages = self.piece.load(Ordering::Relaxed);
            if self.served_seen.swap(served, Ordering::AcqRel) != served {
                pages = self.min_piece;
            }
            let end = (done + pages * PAGE as usize).min(buf.len());
            {
                let mut c = lock(&self.client);
                Self::get(&mut c, pid, offset + done as u64, &mut buf[done..end])?;
            }
            done = end;
            self.piece.store((pages * 2).min(self.max_piece), Ordering::Relaxed);
        }
        Ok(())
    }

    fn finish(&self, complete: bool) -> Result<(), SourceError> {
        // Incomplete (the tree was killed): no CLOSE, so the source resumes its tasks.
        if !complete {
            return Ok(());
        }
        lock(&self.client).drain_and_close().map_err(SourceError::Remote)
    }

    fn read_urgent(&self, file: u32, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let pid = self.pid(file)?;
        self.urgent_waiting.fetch_add(1, Ordering::AcqRel);
        let mut c = lock(&self.client);
        self.urgent_waiting.fetch_sub(1, Ordering::AcqRel);
        self.urgent_served.fetch_add(1, Ordering::AcqRel);
        Self::get(&mut c, pid, offset, buf)
    }
}
