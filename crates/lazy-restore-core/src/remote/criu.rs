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

use crate::remote::intervals::{copy_overlaps, IntervalSet};
use crate::remote::RemoteError;
use crate::source::{PageSource, SourceCounters, SourceError, SourceStats};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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
    /// GETs sent and not answered yet, oldest first (the server answers in order).
    outstanding: VecDeque<Asked>,
    broken: bool,
    closed: bool,
}

/// One GET in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Asked {
    pid: i32,
    addr: u64,
    pages: u64,
    /// Asked for the background (the caller's tag, carried to the reply).
    background: bool,
}

/// A reply: `data` holds the pages of `pid` from image address `addr`.
#[derive(Debug)]
pub struct Reply {
    pub pid: i32,
    pub addr: u64,
    pub data: Vec<u8>,
    /// The tag the GET was sent with.
    pub background: bool,
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
            outstanding: VecDeque::new(),
            broken: false,
            closed: false,
        })
    }

    /// host:port of the server.
    pub fn addr(&self) -> &str {
        &self.addr
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

    fn ended(&self) -> Option<RemoteError> {
        (self.broken || self.closed).then(|| RemoteError::Unavailable {
            addr: self.addr.clone(),
            grace: Duration::ZERO,
            last: "the session already ended".into(),
        })
    }

    /// Sends a GET for `pages` pages of `pid` at `addr` without waiting for the reply (the
    /// server answers GETs in the order they were sent: [`CriuClient::recv`]). Refuses, before
    /// sending anything, pages the source does not hold lazily. `background` is a tag the
    /// reply carries back (and [`CriuClient::background_pages`] counts).
    pub fn send_get(&mut self, pid: i32, addr: u64, pages: u64, background: bool) -> Result<(), RemoteError> {
        if pages == 0 || !self.holds(pid, addr, pages) {
            return Err(RemoteError::NotLazy { pid, addr, pages });
        }
        if let Some(e) = self.ended() {
            return Err(e);
        }
        let req = self.layout.encode(&PsIov { cmd: PS_IOV_GET, nr_pages: pages, vaddr: addr, dst_id: pid as u64 });
        if let Err(e) = self.writer.write_all(&req) {
            return Err(self.lost(format!("sending GET: {e}")));
        }
        self.outstanding.push_back(Asked { pid, addr, pages, background });
        Ok(())
    }

    /// Pages asked for with the background tag and not answered yet.
    pub fn background_pages(&self) -> u64 {
        self.outstanding.iter().filter(|a| a.background).map(|a| a.pages).sum()
    }

    /// GETs in flight, and the pages they asked for.
    pub fn in_flight(&self) -> (usize, u64) {
        (self.outstanding.len(), self.outstanding.iter().map(|a| a.pages).sum())
    }

    /// True if a GET in flight asks for page `addr` of `pid`.
    pub fn asked(&self, pid: i32, addr: u64) -> bool {
        self.outstanding.iter().any(|a| a.pid == pid && a.addr <= addr && addr < a.addr + a.pages * PAGE)
    }

    /// Reads the reply to the oldest GET in flight. A reply with fewer pages than asked (the
    /// server stops at the end of one of its page pipes) is fine: the rest is asked for again
    /// at once, at the back of the queue.
    pub fn recv(&mut self) -> Result<Reply, RemoteError> {
        let Some(asked) = self.outstanding.pop_front() else {
            return Err(RemoteError::Protocol { addr: self.addr.clone(), what: "no GET in flight to read a reply for".into() });
        };
        let hl = self.layout.header_len();
        let Asked { pid, addr, pages, background } = asked;
        let mut h = [0u8; 32];
        if let Err(e) = self.reader.read_exact(&mut h[..hl]) {
            return Err(self.lost(format!("reading the reply to GET {addr:#x}: {e}")));
        }
        let r = self.layout.decode(&h[..hl]);
        if r.cmd != PS_REPLY || r.vaddr != addr || r.dst_id != pid as u64 || r.nr_pages == 0 || r.nr_pages > pages {
            self.broken = true;
            return Err(RemoteError::Protocol {
                addr: self.addr.clone(),
                what: format!(
                    "GET {pages} pages at {addr:#x} of {pid} got header cmd {:#x} nr {} vaddr {:#x} id {}",
                    r.cmd, r.nr_pages, r.vaddr, r.dst_id
                ),
            });
        }
        let mut data = vec![0u8; (r.nr_pages * PAGE) as usize];
        if let Err(e) = self.reader.read_exact(&mut data) {
            return Err(self.lost(format!("reading {} pages at {addr:#x}: {e}", r.nr_pages)));
        }
        self.got.insert(pid, addr, addr + r.nr_pages * PAGE);
        if r.nr_pages < pages {
            self.send_get(pid, addr + r.nr_pages * PAGE, pages - r.nr_pages, background)?;
        }
        Ok(Reply { pid, addr, data, background })
    }

    /// Fetches `buf.len() / 4096` pages of `pid` at image address `addr` and waits for them
    /// (no other GET may be in flight).
    pub fn get(&mut self, pid: i32, addr: u64, buf: &mut [u8]) -> Result<(), RemoteError> {
        if !self.outstanding.is_empty() {
            return Err(RemoteError::Protocol { addr: self.addr.clone(), what: "a blocking GET while pipelined GETs are in flight".into() });
        }
        let end = addr + buf.len() as u64;
        self.send_get(pid, addr, (buf.len() as u64) / PAGE, false)?;
        while !self.outstanding.is_empty() {
            let r = self.recv()?;
            let at = (r.addr - addr) as usize;
            buf[at..at + r.data.len()].copy_from_slice(&r.data);
            debug_assert!(r.addr + r.data.len() as u64 <= end);
        }
        Ok(())
    }

    /// Reads (and drops) the replies to every GET in flight.
    pub fn settle(&mut self) -> Result<(), RemoteError> {
        while !self.outstanding.is_empty() {
            self.recv()?;
        }
        Ok(())
    }

    /// Fetches (and discards) every lazy page not fetched yet, then CLOSEs: a migration whose
    /// process never needed some pages (it unmapped them, or exited) still ends with CLOSE, so
    /// the source tasks are killed instead of resumed next to the restored ones.
    pub fn drain_and_close(&mut self) -> Result<(), RemoteError> {
        self.settle()?;
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
/// CRIU's protocol has one FIFO stream, so faults come first by policy:
/// * a fault's GET is sent at once, whatever is in flight (it is answered after at most the
///   background bytes already asked for);
/// * background GETs are pipelined (the copier's jobs are announced with
///   [`PageSource::prepare`] and asked for ahead of its reads): two GETs of 512 KiB in flight
///   while no fault is near (about a bandwidth-delay product at 1 Gbit/s and a few ms: CRIU's
///   server costs ~110 µs per GET even on loopback, so fewer, larger GETs); while faults are
///   frequent (one in the last 10 ms) a single 128 KiB GET, so a fault waits behind one;
/// * before each step the copier lets any waiting fault take the connection.
pub struct CriuSource {
    pids: Vec<i32>,
    name: String,
    counters: Arc<SourceCounters>,
    session: Mutex<Session>,
    /// Faults waiting for the session.
    urgent_waiting: AtomicUsize,
    started: Instant,
    /// µs since `started` of the latest fault.
    last_fault_us: AtomicU64,
    cap_bytes: u64,
    piece_pages: u64,
}

struct Session {
    c: CriuClient,
    /// Replies not read by anyone yet: (pid, address) -> bytes.
    stash: BTreeMap<(i32, u64), Vec<u8>>,
    /// Background pieces announced and not asked for yet, in order, with their job key.
    plan: VecDeque<(u64, i32, u64, u64)>,
    /// The most background pages that were ever in flight at once.
    max_bg_pages: u64,
    stash_bytes: u64,
    counters: Arc<SourceCounters>,
    last_key: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Background bytes in flight at most when no fault is near: two GETs of 512 KiB (a 1 Gbit/s,
/// 1 ms link stays busy; CRIU's server costs ~110 µs per GET, so fewer, larger GETs).
pub const DEFAULT_CAP_BYTES: u64 = 1024 * 1024;
/// Background GET size in pages when no fault is near (a quarter of it while faults come).
pub const DEFAULT_PIECE_PAGES: u64 = 128;
/// A fault this recent means faults are frequent: smaller background pieces and cap.
const FAULTS_FREQUENT: Duration = Duration::from_millis(10);

/// Unread replies kept at most.
const STASH_MAX_BYTES: u64 = 64 << 20;

/// Largest chunk a reply brings, in bytes (how far below a read a stashed reply may start).
const MAX_REPLY: u64 = 1 << 30;

impl Session {
    fn send(&mut self, pid: i32, addr: u64, pages: u64, background: bool) -> Result<(), RemoteError> {
        self.c.send_get(pid, addr, pages, background)?;
        let c = &self.counters;
        SourceCounters::add(if background { &c.bulk_requests } else { &c.urgent_requests }, 1);
        if background {
            self.max_bg_pages = self.max_bg_pages.max(self.c.background_pages());
        }
        Ok(())
    }

    /// Reads one reply into the stash.
    fn recv(&mut self) -> Result<(), RemoteError> {
        let r = self.c.recv()?;
        SourceCounters::add(&self.counters.page_bytes, r.data.len() as u64);
        SourceCounters::add(&self.counters.wire_bytes, r.data.len() as u64 + self.c.layout.header_len() as u64);
        self.stash_bytes += r.data.len() as u64;
        self.stash.insert((r.pid, r.addr), r.data);
        // Replies nobody reads (a job whose pages were dropped meanwhile) must not pile up;
        // CRIU's server answers a page again if it is asked again.
        if self.stash_bytes > STASH_MAX_BYTES {
            self.stash.clear();
            self.stash_bytes = 0;
        }
        Ok(())
    }

    /// Copies what the stash holds of `[addr, addr + buf.len())`; notes it in `got`.
    fn take(&self, pid: i32, addr: u64, buf: &mut [u8], got: &mut IntervalSet) {
        let end = addr + buf.len() as u64;
        let chunks = self.stash.range((pid, addr.saturating_sub(MAX_REPLY))..(pid, end));
        copy_overlaps(pid, addr, buf, got, chunks.map(|(&(_, a), d)| (a, d.as_slice())));
    }

    fn stashed(&self, pid: i32, addr: u64) -> bool {
        self.stash
            .range((pid, addr.saturating_sub(MAX_REPLY))..=(pid, addr))
            .any(|(&(_, a), d)| addr < a + d.len() as u64)
    }

    /// Drops stashed replies wholly inside a range that was read.
    fn consume(&mut self, pid: i32, addr: u64, end: u64) {
        let used: Vec<(i32, u64)> = self
            .stash
            .range((pid, addr)..(pid, end))
            .filter(|(&(_, a), d)| a + d.len() as u64 <= end)
            .map(|(k, _)| *k)
            .collect();
        for k in used {
            if let Some(d) = self.stash.remove(&k) {
                self.stash_bytes -= d.len() as u64;
            }
        }
    }

    /// Asks for the gaps of `[addr, end)` that no GET in flight covers (in pieces).
    /// `budget`: background pages that may still be asked for (None: no limit, a fault).
    fn ask_gaps(
        &mut self,
        pid: i32,
        addr: u64,
        end: u64,
        got: &IntervalSet,
        piece: u64,
        background: bool,
        mut budget: Option<u64>,
    ) -> Result<(), RemoteError> {
        let mut x = addr;
        while let Some((a, b)) = got.first_gap(pid, x, end) {
            let mut p = a;
            while p < b {
                if budget == Some(0) {
                    return Ok(());
                }
                if self.c.asked(pid, p) {
                    p += PAGE;
                    continue;
                }
                // Up to the next page already asked for, at most one piece.
                let most = budget.map_or(piece, |b| b.min(piece));
                let mut q = p + PAGE;
                while q < b && q - p < most * PAGE && !self.c.asked(pid, q) {
                    q += PAGE;
                }
                let n = (q - p) / PAGE;
                self.send(pid, p, n, background)?;
                budget = budget.map(|b| b.saturating_sub(n));
                p = q;
            }
            x = b;
        }
        Ok(())
    }

    /// Background GETs of at most `piece` pages from the announced plan while under the cap.
    fn top_up(&mut self, piece: u64, cap_pages: u64) -> Result<(), RemoteError> {
        while let Some(&(key, pid, addr, pages)) = self.plan.front() {
            // Already asked for, or here (a read or a fault got to it first): skip that page.
            let n = if self.c.asked(pid, addr) || self.stashed(pid, addr) {
                1
            } else {
                let n = pages.min(piece).min(cap_pages.saturating_sub(self.c.background_pages()));
                if n == 0 {
                    break;
                }
                self.send(pid, addr, n, true)?;
                n
            };
            self.plan.pop_front();
            if pages > n {
                self.plan.push_front((key, pid, addr + n * PAGE, pages - n));
            }
        }
        Ok(())
    }
}

impl CriuSource {
    /// Wraps a connected client.
    pub fn new(client: CriuClient, pids: Vec<i32>) -> Self {
        let counters = Arc::new(SourceCounters::default());
        Self {
            pids,
            name: format!("CRIU page server {}", client.addr()),
            counters: Arc::clone(&counters),
            session: Mutex::new(Session {
                c: client,
                stash: BTreeMap::new(),
                plan: VecDeque::new(),
                max_bg_pages: 0,
                stash_bytes: 0,
                counters,
                last_key: 0,
            }),
            urgent_waiting: AtomicUsize::new(0),
            started: Instant::now(),
            last_fault_us: AtomicU64::new(u64::MAX),
            cap_bytes: DEFAULT_CAP_BYTES,
            piece_pages: DEFAULT_PIECE_PAGES,
        }
    }

    /// Background GET size in pages and background bytes in flight at most (both at least one
    /// page; the cap at least one piece).
    pub fn with_pieces(mut self, piece_pages: u64, cap_bytes: u64) -> Self {
        self.piece_pages = piece_pages.max(1);
        self.cap_bytes = cap_bytes.max(self.piece_pages * PAGE);
        self
    }

    /// Pages not fetched yet.
    pub fn missing_pages(&self) -> u64 {
        lock(&self.session).c.missing_pages()
    }

    /// The most background pages that were ever in flight at once.
    pub fn max_background_in_flight(&self) -> u64 {
        lock(&self.session).max_bg_pages
    }

    fn pid(&self, file: u32) -> Result<i32, SourceError> {
        self.pids
            .get(file as usize)
            .copied()
            .ok_or(SourceError::Remote(RemoteError::UnknownTask { file }))
    }

    /// (piece pages, cap pages) now: smaller while faults are frequent.
    fn sizes(&self) -> (u64, u64) {
        let last = self.last_fault_us.load(Ordering::Relaxed);
        let now = self.started.elapsed().as_micros() as u64;
        let cap = self.cap_bytes / PAGE;
        if last != u64::MAX && now.saturating_sub(last) < FAULTS_FREQUENT.as_micros() as u64 {
            // One small GET in flight: the server answers GETs one after another at a fixed
            // cost each (~110 µs on loopback), so a fault waits behind one, not a queue.
            let p = (self.piece_pages / 4).max(1);
            (p, p)
        } else {
            (self.piece_pages, cap.max(self.piece_pages))
        }
    }
}

impl PageSource for CriuSource {
    fn read(&self, file: u32, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let pid = self.pid(file)?;
        let end = offset + buf.len() as u64;
        let mut got = IntervalSet::new();
        loop {
            // Faults first: let every waiting fault take the session before each step.
            while self.urgent_waiting.load(Ordering::Acquire) > 0 {
                std::thread::yield_now();
            }
            let (piece, cap) = self.sizes();
            let mut s = lock(&self.session);
            s.take(pid, offset, buf, &mut got);
            if got.first_gap(pid, offset, end).is_none() {
                s.consume(pid, offset, end);
                return Ok(());
            }
            // This read first (within the cap), then the announced plan.
            let budget = cap.saturating_sub(s.c.background_pages());
            if budget > 0 {
                s.ask_gaps(pid, offset, end, &got, piece, true, Some(budget))
                    .map_err(SourceError::Remote)?;
            }
            s.top_up(piece, cap).map_err(SourceError::Remote)?;
            if s.c.in_flight().0 == 0 {
                return Err(SourceError::Remote(RemoteError::Protocol {
                    addr: String::new(),
                    what: format!("nothing in flight for {} pages at {offset:#x} of {pid}", buf.len() / PAGE as usize),
                }));
            }
            s.recv().map_err(SourceError::Remote)?;
        }
    }

    fn read_urgent(&self, file: u32, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let pid = self.pid(file)?;
        let end = offset + buf.len() as u64;
        self.last_fault_us.store(self.started.elapsed().as_micros() as u64, Ordering::Relaxed);
        self.urgent_waiting.fetch_add(1, Ordering::AcqRel);
        let mut s = lock(&self.session);
        self.urgent_waiting.fetch_sub(1, Ordering::AcqRel);
        let mut got = IntervalSet::new();
        s.take(pid, offset, buf, &mut got);
        // Sent at once, whole: behind at most the capped background bytes already in flight.
        s.ask_gaps(pid, offset, end, &got, u64::MAX / PAGE, false, None).map_err(SourceError::Remote)?;
        while got.first_gap(pid, offset, end).is_some() {
            s.recv().map_err(SourceError::Remote)?;
            s.take(pid, offset, buf, &mut got);
        }
        s.consume(pid, offset, end);
        Ok(())
    }

    fn prepare(&self, key: u64, spans: &[(u32, u64, u64)]) {
        let mut s = lock(&self.session);
        if key <= s.last_key {
            return;
        }
        s.last_key = key;
        // Jobs before the one being copied are over: what they still had planned is moot.
        s.plan.retain(|&(k, ..)| k + 1 >= key);
        for &(file, offset, bytes) in spans {
            let Some(&pid) = self.pids.get(file as usize) else { continue };
            if bytes >= PAGE {
                s.plan.push_back((key, pid, offset, bytes / PAGE));
            }
        }
    }

    fn stats(&self) -> Option<SourceStats> {
        Some(self.counters.stats(&self.name))
    }

    fn finish(&self, complete: bool) -> Result<(), SourceError> {
        // Incomplete (the tree was killed): no CLOSE, so the source resumes its tasks.
        if !complete {
            return Ok(());
        }
        let mut s = lock(&self.session);
        s.stash.clear();
        s.plan.clear();
        s.c.drain_and_close().map_err(SourceError::Remote)
    }
}
