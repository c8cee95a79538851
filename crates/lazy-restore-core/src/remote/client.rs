//! Client of lazy-restore's page server: an [`UrgentClient`] for faults, a [`BulkClient`] for
//! background streams, and [`LazySource`], the [`PageSource`] the engine reads through.
//!
//! Both clients survive a server that goes away: an I/O error starts an outage; the client
//! reconnects (50 ms → 500 ms backoff) and resumes — the urgent client re-sends the request, the
//! bulk client re-sends its unfinished streams and SKIPs what it already has — until the grace
//! period of that outage is over, then fails with [`RemoteError::Unavailable`]. A refusal
//! (token, version) is never retried.

use crate::remote::intervals::{copy_overlaps, IntervalSet};
use crate::remote::protocol::{
    read_frame, write_frame, Frame, PageRun, ProtocolError, Role, StreamMode, FEATURE_LZ4,
    MAX_PAGES, MAX_RUNS, PAGE, VERSION,
};
use crate::remote::RemoteError;
use crate::source::{PageSource, SourceCounters, SourceError, SourceStats};
use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How to reach a page server.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// host:port
    pub addr: String,
    pub token: Option<Vec<u8>>,
    /// Ask for lz4-compressed bulk chunks.
    pub lz4: bool,
    /// How long one outage may last before the source fails.
    pub grace: Duration,
    pub connect_timeout: Duration,
    /// A reply that takes longer than this counts as a lost connection.
    pub io_timeout: Duration,
    /// Pages per bulk chunk asked of the server.
    pub chunk_pages: u32,
}

impl ClientOptions {
    /// Defaults: no token, no compression, 10 s grace, 2 s connect, 10 s I/O, 64-page chunks.
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            token: None,
            lz4: false,
            grace: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            io_timeout: Duration::from_secs(10),
            chunk_pages: 64,
        }
    }
}

enum Fail {
    /// Worth reconnecting.
    Retry(String),
    /// Not worth it.
    Fatal(RemoteError),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn io_fail(e: ProtocolError, addr: &str) -> Fail {
    match e {
        ProtocolError::Io(_) | ProtocolError::Eof => Fail::Retry(e.to_string()),
        other => Fail::Fatal(RemoteError::Protocol {
            addr: addr.to_string(),
            what: other.to_string(),
        }),
    }
}

/// One handshake. Returns the stream and the features the server granted.
fn handshake(o: &ClientOptions, role: Role) -> Result<(TcpStream, u8), Fail> {
    let addrs: Vec<_> = o
        .addr
        .to_socket_addrs()
        .map_err(|e| Fail::Fatal(RemoteError::Protocol { addr: o.addr.clone(), what: format!("bad address: {e}") }))?
        .collect();
    let mut last = String::from("no address");
    let mut stream = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, o.connect_timeout) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e.to_string(),
        }
    }
    let mut s = stream.ok_or(Fail::Retry(format!("connect: {last}")))?;
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(o.io_timeout));
    if role == Role::Urgent {
        let _ = crate::sys::set_socket_priority(s.as_fd(), crate::remote::URGENT_SOCKET_PRIORITY);
    }
    let hello = Frame::Hello {
        version: VERSION,
        role,
        features: if o.lz4 { FEATURE_LZ4 } else { 0 },
        token: o.token.clone().unwrap_or_default(),
    };
    write_frame(&mut s, &hello).map_err(|e| io_fail(e, &o.addr))?;
    match read_frame(&mut s).map_err(|e| io_fail(e, &o.addr))? {
        Frame::Welcome { features, .. } => Ok((s, features)),
        Frame::Refused { reason } => Err(Fail::Fatal(RemoteError::Refused { addr: o.addr.clone(), reason })),
        other => Err(Fail::Fatal(RemoteError::Protocol {
            addr: o.addr.clone(),
            what: format!("expected WELCOME or REFUSED, got {}", other.name()),
        })),
    }
}

/// Tracks one outage: when it began, the backoff, the last error.
struct Outage {
    since: Option<Instant>,
    delay: Duration,
}

impl Outage {
    fn new() -> Self {
        Self { since: None, delay: Duration::from_millis(50) }
    }
    fn clear(&mut self) {
        self.since = None;
        self.delay = Duration::from_millis(50);
    }
    /// Waits before the next attempt, or returns the final error once the grace is over.
    fn wait(&mut self, o: &ClientOptions, last: String) -> Result<(), RemoteError> {
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() >= o.grace {
            return Err(RemoteError::Unavailable { addr: o.addr.clone(), grace: o.grace, last });
        }
        std::thread::sleep(self.delay.min(o.grace.saturating_sub(since.elapsed())));
        self.delay = (self.delay * 2).min(Duration::from_millis(500));
        Ok(())
    }
}

struct UrgentConn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

/// The fault connection: one GET, one reply.
pub struct UrgentClient {
    opts: ClientOptions,
    conn: Mutex<(Option<UrgentConn>, u32)>,
}

impl UrgentClient {
    /// Connects (within the grace period).
    pub fn connect(opts: ClientOptions) -> Result<Self, RemoteError> {
        let c = Self { opts, conn: Mutex::new((None, 0)) };
        {
            let mut g = lock(&c.conn);
            g.0 = Some(c.reconnect()?);
        }
        Ok(c)
    }

    fn reconnect(&self) -> Result<UrgentConn, RemoteError> {
        let mut outage = Outage::new();
        loop {
            match handshake(&self.opts, Role::Urgent) {
                Ok((s, _)) => {
                    let writer = s.try_clone().map_err(|e| RemoteError::Protocol {
                        addr: self.opts.addr.clone(),
                        what: e.to_string(),
                    })?;
                    return Ok(UrgentConn { reader: BufReader::new(s), writer });
                }
                Err(Fail::Fatal(e)) => return Err(e),
                Err(Fail::Retry(last)) => outage.wait(&self.opts, last)?,
            }
        }
    }

    /// Fetches `buf.len() / 4096` pages of task `pid` at image address `addr` (any number of
    /// pages: split into GETs of at most 256).
    pub fn fetch(&self, pid: i32, addr: u64, buf: &mut [u8]) -> Result<(), RemoteError> {
        for (i, piece) in buf.chunks_mut(MAX_PAGES as usize * PAGE).enumerate() {
            let a = addr + (i * MAX_PAGES as usize * PAGE) as u64;
            self.fetch_one(PageRun { pid, addr: a, pages: (piece.len() / PAGE) as u32 }, piece)?;
        }
        Ok(())
    }

    fn fetch_one(&self, run: PageRun, buf: &mut [u8]) -> Result<(), RemoteError> {
        let mut g = lock(&self.conn);
        let mut outage = Outage::new();
        loop {
            if g.0.is_none() {
                match handshake(&self.opts, Role::Urgent) {
                    Ok((s, _)) => {
                        if let Ok(writer) = s.try_clone() {
                            g.0 = Some(UrgentConn { reader: BufReader::new(s), writer });
                        }
                    }
                    Err(Fail::Fatal(e)) => return Err(e),
                    Err(Fail::Retry(last)) => {
                        outage.wait(&self.opts, last)?;
                        continue;
                    }
                }
            }
            g.1 = g.1.wrapping_add(1);
            let id = g.1;
            let Some(c) = g.0.as_mut() else { continue };
            match exchange(c, id, run, buf, &self.opts.addr) {
                Ok(()) => return Ok(()),
                Err(Fail::Fatal(e)) => return Err(e),
                Err(Fail::Retry(last)) => {
                    g.0 = None;
                    outage.wait(&self.opts, last)?;
                }
            }
        }
    }
}

fn exchange(c: &mut UrgentConn, id: u32, run: PageRun, buf: &mut [u8], addr: &str) -> Result<(), Fail> {
    write_frame(&mut c.writer, &Frame::Get { id, run }).map_err(|e| io_fail(e, addr))?;
    match read_frame(&mut c.reader).map_err(|e| io_fail(e, addr))? {
        Frame::Pages { id: rid, run: rrun, data } if rid == id && rrun == run && data.len() == buf.len() => {
            buf.copy_from_slice(&data);
            Ok(())
        }
        Frame::Missing { id: rid, code, run, reason } if rid == id => {
            Err(Fail::Fatal(RemoteError::Missing { run, code, reason }))
        }
        other => Err(Fail::Fatal(RemoteError::Protocol {
            addr: addr.to_string(),
            what: format!("a GET for {} pages at {:#x} got {}", run.pages, run.addr, other.name()),
        })),
    }
}

/// What a bulk connection delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BulkEvent {
    /// Page bytes (already decompressed).
    Chunk { id: u32, run: PageRun, data: Vec<u8> },
    /// The server could not send a run (the stream goes on).
    Missing { id: u32, run: PageRun, reason: String },
    /// A stream ended (every page sent, skipped, or it was cancelled).
    End { id: u32, cancelled: bool },
}

struct StreamState {
    mode: StreamMode,
    runs: Vec<PageRun>,
    received: IntervalSet,
}

/// The background connection: ask for streams, receive chunks, skip, cancel.
pub struct BulkClient {
    opts: ClientOptions,
    reader: Option<BufReader<TcpStream>>,
    writer: Option<BufWriter<TcpStream>>,
    lz4: bool,
    next_id: u32,
    streams: BTreeMap<u32, StreamState>,
    skipped: IntervalSet,
    /// Compressed bytes received / raw bytes they stand for (for measurements).
    pub wire_bytes: u64,
    pub raw_bytes: u64,
    pub reconnects: u64,
}

impl BulkClient {
    /// Connects (within the grace period).
    pub fn connect(opts: ClientOptions) -> Result<Self, RemoteError> {
        let mut c = Self {
            opts,
            reader: None,
            writer: None,
            lz4: false,
            next_id: 0,
            streams: BTreeMap::new(),
            skipped: IntervalSet::new(),
            wire_bytes: 0,
            raw_bytes: 0,
            reconnects: 0,
        };
        c.reconnect(&mut Outage::new(), None)?;
        Ok(c)
    }

    /// True when the server agreed to lz4 chunks.
    pub fn compressed(&self) -> bool {
        self.lz4
    }

    fn reconnect(&mut self, outage: &mut Outage, mut last: Option<String>) -> Result<(), RemoteError> {
        loop {
            if let Some(l) = last.take() {
                outage.wait(&self.opts, l)?;
            }
            match handshake(&self.opts, Role::Bulk) {
                Ok((s, features)) => {
                    let w = s.try_clone().map_err(|e| RemoteError::Protocol {
                        addr: self.opts.addr.clone(),
                        what: e.to_string(),
                    })?;
                    let _ = s.set_read_timeout(Some(self.opts.io_timeout));
                    self.reader = Some(BufReader::with_capacity(256 * 1024, s));
                    self.writer = Some(BufWriter::new(w));
                    self.lz4 = features & FEATURE_LZ4 != 0;
                    // Resume: every unfinished stream again, minus what we already have.
                    let mut frames = Vec::new();
                    let mut have = self.skipped.clone();
                    for (&id, st) in &self.streams {
                        frames.push(Frame::Stream {
                            id,
                            mode: st.mode,
                            chunk_pages: self.opts.chunk_pages,
                            runs: st.runs.clone(),
                        });
                        for (pid, a, b) in st.received.iter() {
                            have.insert(pid, a, b);
                        }
                    }
                    let have: Vec<PageRun> = have
                        .iter()
                        .flat_map(|(pid, a, b)| {
                            let mut v = Vec::new();
                            let run = PageRun { pid, addr: a, pages: ((b - a) / PAGE as u64).min(u64::from(u32::MAX)) as u32 };
                            crate::remote::store::split_run(run, u32::MAX, &mut v);
                            v
                        })
                        .collect();
                    for runs in have.chunks(MAX_RUNS) {
                        frames.push(Frame::Skip { runs: runs.to_vec() });
                    }
                    match self.send_all(&frames) {
                        Ok(()) => {
                            outage.clear();
                            return Ok(());
                        }
                        Err(Fail::Fatal(e)) => return Err(e),
                        Err(Fail::Retry(l)) => last = Some(l),
                    }
                }
                Err(Fail::Fatal(e)) => return Err(e),
                Err(Fail::Retry(l)) => last = Some(l),
            }
            self.reconnects += 1;
        }
    }

    fn send_all(&mut self, frames: &[Frame]) -> Result<(), Fail> {
        let addr = self.opts.addr.clone();
        let w = self.writer.as_mut().ok_or(Fail::Retry("not connected".into()))?;
        for f in frames {
            write_frame(w, f).map_err(|e| io_fail(e, &addr))?;
        }
        w.flush().map_err(|e| Fail::Retry(e.to_string()))
    }

    fn send(&mut self, frames: Vec<Frame>) -> Result<(), RemoteError> {
        match self.send_all(&frames) {
            Ok(()) => Ok(()),
            Err(Fail::Fatal(e)) => Err(e),
            // The stream state is recorded: a reconnect re-sends it.
            Err(Fail::Retry(l)) => self.reconnect(&mut Outage::new(), Some(l)),
        }
    }

    /// Starts a stream; returns its id. `runs` (at most [`MAX_RUNS`]) are ignored for
    /// [`StreamMode::All`].
    pub fn stream(&mut self, mode: StreamMode, runs: Vec<PageRun>) -> Result<u32, RemoteError> {
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        let runs: Vec<PageRun> = runs.into_iter().take(MAX_RUNS).collect();
        self.streams.insert(id, StreamState { mode, runs: runs.clone(), received: IntervalSet::new() });
        self.send(vec![Frame::Stream { id, mode, chunk_pages: self.opts.chunk_pages, runs }])?;
        Ok(id)
    }

    /// Tells the server not to send these pages (the client has them).
    pub fn skip(&mut self, runs: Vec<PageRun>) -> Result<(), RemoteError> {
        for r in &runs {
            self.skipped.insert(r.pid, r.addr, r.addr + u64::from(r.pages) * PAGE as u64);
        }
        let frames = runs.chunks(MAX_RUNS).map(|c| Frame::Skip { runs: c.to_vec() }).collect();
        self.send(frames)
    }

    /// Cancels a stream (an END with `cancelled` follows).
    pub fn cancel(&mut self, id: u32) -> Result<(), RemoteError> {
        self.send(vec![Frame::Cancel { id }])
    }

    /// The next event; reconnects and resumes within the grace period.
    pub fn next_event(&mut self) -> Result<BulkEvent, RemoteError> {
        let mut outage = Outage::new();
        loop {
            let addr = self.opts.addr.clone();
            let r = match self.reader.as_mut() {
                Some(r) => read_frame(r).map_err(|e| io_fail(e, &addr)),
                None => Err(Fail::Retry("not connected".into())),
            };
            match r {
                Ok(f) => {
                    outage.clear();
                    if let Some(ev) = self.event(f)? {
                        return Ok(ev);
                    }
                }
                Err(Fail::Fatal(e)) => return Err(e),
                Err(Fail::Retry(last)) => {
                    self.reader = None;
                    self.writer = None;
                    self.reconnects += 1;
                    self.reconnect(&mut outage, Some(last))?;
                }
            }
        }
    }

    fn event(&mut self, f: Frame) -> Result<Option<BulkEvent>, RemoteError> {
        let bad = |what: String| RemoteError::Protocol { addr: self.opts.addr.clone(), what };
        match f {
            Frame::Chunk { id, run, encoding, data } => {
                let raw = run.pages as usize * PAGE;
                self.wire_bytes += data.len() as u64;
                self.raw_bytes += raw as u64;
                let data = match encoding {
                    0 => data,
                    FEATURE_LZ4 if self.lz4 => {
                        let mut out = vec![0u8; raw];
                        match lz4_flex::block::decompress_into(&data, &mut out) {
                            Ok(n) if n == raw => out,
                            Ok(n) => return Err(bad(format!("lz4 chunk at {:#x} gave {n} bytes, not {raw}", run.addr))),
                            Err(e) => return Err(bad(format!("lz4 chunk at {:#x}: {e}", run.addr))),
                        }
                    }
                    e => return Err(bad(format!("chunk encoding {e} was not negotiated"))),
                };
                let Some(st) = self.streams.get_mut(&id) else {
                    // A chunk of a stream we cancelled: drop it.
                    return Ok(None);
                };
                st.received.insert(run.pid, run.addr, run.addr + raw as u64);
                Ok(Some(BulkEvent::Chunk { id, run, data }))
            }
            Frame::Missing { id, run, reason, .. } => Ok(Some(BulkEvent::Missing { id, run, reason })),
            Frame::End { id, cancelled, .. } => {
                self.streams.remove(&id);
                Ok(Some(BulkEvent::End { id, cancelled }))
            }
            other => Err(bad(format!("{} on a bulk connection", other.name()))),
        }
    }

    /// Ends politely.
    pub fn bye(&mut self) {
        let _ = self.send_all(&[Frame::Bye]);
    }
}

/// A [`PageSource`] over lazy-restore's page server. Plans address it with file index = task
/// index (into `pids`) and offset = image address.
///
/// Faults and their readahead ([`PageSource::read_urgent`]) go over the urgent connection,
/// one GET each, never queued behind bulk bytes. The copier's jobs are announced with [`PageSource::prepare`] and become bulk
/// streams at once, so the server keeps the bulk connection full while the copier installs
/// the previous job; its reads then take the bytes from what has arrived (waiting for the rest).
pub struct LazySource {
    pids: Vec<i32>,
    urgent: UrgentClient,
    bulk: Mutex<BulkState>,
    name: String,
    counters: Arc<SourceCounters>,
}

struct BulkState {
    client: BulkClient,
    /// Chunks that arrived before their read: (pid, image address) → (stream id, bytes).
    stash: BTreeMap<(i32, u64), (u32, Vec<u8>)>,
    /// Streams started for prepared jobs, oldest first (at most [`KEEP_STREAMS`]).
    recent: std::collections::VecDeque<u32>,
    /// Streams not ended yet.
    open: std::collections::BTreeSet<u32>,
    last_key: u64,
    /// A failure while starting a prepared stream, for the next read to return.
    failed: Option<RemoteError>,
    counters: Arc<SourceCounters>,
}

/// Streams whose chunks are kept (and not cancelled): the job being copied, the next one, one
/// more for a job the loop ended early, and a stream a read started for itself. At most one
/// 4 MiB job each.
const KEEP_STREAMS: usize = 4;

/// Largest chunk the server sends, in bytes: how far below a read a chunk may start.
const MAX_CHUNK: u64 = MAX_PAGES as u64 * PAGE as u64;

impl BulkState {
    /// Copies what the stash holds of `[addr, addr + buf.len())` into `buf`, noting it in `got`.
    fn take(&self, pid: i32, addr: u64, buf: &mut [u8], got: &mut IntervalSet) {
        let end = addr + buf.len() as u64;
        let chunks = self.stash.range((pid, addr.saturating_sub(MAX_CHUNK))..(pid, end));
        copy_overlaps(pid, addr, buf, got, chunks.map(|(&(_, a), (_, d))| (a, d.as_slice())));
    }

    fn start(&mut self, runs: Vec<PageRun>) -> Result<u32, RemoteError> {
        let id = self.client.stream(StreamMode::List, runs)?;
        SourceCounters::add(&self.counters.bulk_requests, 1);
        self.open.insert(id);
        self.recent.push_back(id);
        while self.recent.len() > KEEP_STREAMS {
            let Some(old) = self.recent.pop_front() else { break };
            self.stash.retain(|_, (sid, _)| *sid != old);
            if self.open.remove(&old) {
                self.client.cancel(old)?;
            }
        }
        Ok(id)
    }

    /// One event off the bulk connection into the stash.
    fn pump(&mut self) -> Result<(), RemoteError> {
        let (wire, reconnects) = (self.client.wire_bytes, self.client.reconnects);
        let ev = self.client.next_event();
        SourceCounters::add(&self.counters.wire_bytes, self.client.wire_bytes - wire);
        SourceCounters::add(&self.counters.reconnects, self.client.reconnects - reconnects);
        match ev? {
            BulkEvent::Chunk { id, run, data } => {
                SourceCounters::add(&self.counters.page_bytes, data.len() as u64);
                if self.recent.contains(&id) {
                    self.stash.insert((run.pid, run.addr), (id, data));
                }
            }
            BulkEvent::Missing { run, reason, .. } => {
                return Err(RemoteError::Missing {
                    run,
                    code: crate::remote::protocol::MissingCode::NotHeld,
                    reason,
                })
            }
            BulkEvent::End { id, .. } => {
                self.open.remove(&id);
            }
        }
        Ok(())
    }
}

impl LazySource {
    /// Opens both connections.
    pub fn connect(opts: ClientOptions, pids: Vec<i32>) -> Result<Self, RemoteError> {
        let counters = Arc::new(SourceCounters::default());
        let name = format!("lazy-restore page-server {}", opts.addr);
        Ok(Self {
            pids,
            urgent: UrgentClient::connect(opts.clone())?,
            bulk: Mutex::new(BulkState {
                client: BulkClient::connect(opts)?,
                stash: BTreeMap::new(),
                recent: std::collections::VecDeque::new(),
                open: std::collections::BTreeSet::new(),
                last_key: 0,
                failed: None,
                counters: Arc::clone(&counters),
            }),
            name,
            counters,
        })
    }

    /// Fetches over the urgent connection, counted.
    fn fetch_urgent(&self, pid: i32, addr: u64, buf: &mut [u8]) -> Result<(), RemoteError> {
        self.urgent.fetch(pid, addr, buf)?;
        let gets = buf.len().div_ceil(MAX_PAGES as usize * PAGE) as u64;
        SourceCounters::add(&self.counters.urgent_requests, gets);
        SourceCounters::add(&self.counters.page_bytes, buf.len() as u64);
        SourceCounters::add(&self.counters.wire_bytes, buf.len() as u64);
        Ok(())
    }

    /// Reads by pid directly, from the bulk streams (a stream of its own when no prepared
    /// stream brings these pages). Chunks stay in the stash after a read until their stream
    /// ages out: the copier reads a span again when the loop changed its job meanwhile (a
    /// fault took a page of it), and that must not fetch the span again.
    pub fn read_pid(&self, pid: i32, addr: u64, buf: &mut [u8]) -> Result<(), RemoteError> {
        let end = addr + buf.len() as u64;
        let mut got = IntervalSet::new();
        let mut st = lock(&self.bulk);
        if let Some(e) = st.failed.take() {
            return Err(e);
        }
        let mut own_stream = false;
        loop {
            st.take(pid, addr, buf, &mut got);
            if got.first_gap(pid, addr, end).is_none() {
                return Ok(());
            }
            if st.open.is_empty() {
                if own_stream {
                    break;
                }
                own_stream = true;
                let mut runs = Vec::new();
                let mut x = addr;
                while let Some((a, b)) = got.first_gap(pid, x, end) {
                    runs.push(PageRun { pid, addr: a, pages: ((b - a) / PAGE as u64) as u32 });
                    x = b;
                }
                st.start(runs)?;
            }
            st.pump()?;
        }
        drop(st);
        // Pages skipped on the bulk connection (a resume after a reconnect) come over the
        // urgent one.
        let mut x = addr;
        while let Some((a, b)) = got.first_gap(pid, x, end) {
            self.fetch_urgent(pid, a, &mut buf[(a - addr) as usize..(b - addr) as usize])?;
            x = b;
        }
        Ok(())
    }

    fn pid(&self, file: u32) -> Result<i32, SourceError> {
        self.pids
            .get(file as usize)
            .copied()
            .ok_or(SourceError::Remote(RemoteError::UnknownTask { file }))
    }

    /// Bulk bytes received on the wire and the raw bytes they stand for, and reconnects.
    pub fn bulk_counters(&self) -> (u64, u64, u64) {
        let st = lock(&self.bulk);
        (st.client.wire_bytes, st.client.raw_bytes, st.client.reconnects)
    }
}

impl PageSource for LazySource {
    fn read(&self, file: u32, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.read_pid(self.pid(file)?, offset, buf).map_err(SourceError::Remote)
    }

    fn read_urgent(&self, file: u32, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.fetch_urgent(self.pid(file)?, offset, buf).map_err(SourceError::Remote)
    }

    fn stats(&self) -> Option<SourceStats> {
        Some(self.counters.stats(&self.name))
    }

    fn prepare(&self, key: u64, spans: &[(u32, u64, u64)]) {
        let mut st = lock(&self.bulk);
        if key <= st.last_key || st.failed.is_some() {
            return;
        }
        st.last_key = key;
        let mut runs: Vec<PageRun> = Vec::with_capacity(spans.len());
        for &(file, offset, bytes) in spans {
            let Some(&pid) = self.pids.get(file as usize) else { continue };
            let pages = (bytes / PAGE as u64) as u32;
            match runs.last_mut() {
                Some(r) if r.pid == pid && r.addr + u64::from(r.pages) * PAGE as u64 == offset => r.pages += pages,
                _ => runs.push(PageRun { pid, addr: offset, pages }),
            }
        }
        if runs.is_empty() {
            return;
        }
        if let Err(e) = st.start(runs) {
            st.failed = Some(e);
        }
    }
}

impl Drop for LazySource {
    fn drop(&mut self) {
        lock(&self.bulk).client.bye();
    }
}
