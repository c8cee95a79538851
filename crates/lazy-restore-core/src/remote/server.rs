//! lazy-restore's page server: serves the lazy pages of a local image set over TCP to any
//! number of clients at once.
//!
//! One accept thread; one thread per urgent connection (read a GET, answer it, repeat: a fault
//! never waits behind anything); two per bulk connection (a reader that turns STREAM / SKIP /
//! CANCEL frames into commands, and a writer that pushes chunks and checks for new commands
//! between chunks). A malformed frame closes that connection with a logged reason; nothing a
//! peer sends can make the server allocate more than one frame or panic.

use crate::remote::intervals::IntervalSet;
use crate::remote::protocol::{
    read_frame, write_frame, Frame, MissingCode, PageRun, ProtocolError, Role, StreamMode,
    FEATURE_LZ4, MAX_PAGES, PAGE, VERSION,
};
use crate::remote::store::{split_run, PageStore};
use crate::remote::URGENT_SOCKET_PRIORITY;
use std::os::fd::AsFd;
use std::collections::{HashMap, VecDeque};
use std::io::{self, BufReader, BufWriter, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Where log lines of the server go (called from server threads).
pub type ServerLog = Arc<dyn Fn(&str) + Send + Sync>;

/// How to run a page server.
#[derive(Clone)]
pub struct ServerConfig {
    /// Address to bind (numeric IPv4/IPv6); 127.0.0.1 unless the user says otherwise.
    pub address: String,
    /// 0 = kernel-chosen.
    pub port: u16,
    /// Clients must present this token in their HELLO.
    pub token: Option<Vec<u8>>,
    /// Offer lz4 for bulk chunks.
    pub allow_lz4: bool,
    pub log: ServerLog,
}

impl std::fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("address", &self.address)
            .field("port", &self.port)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("allow_lz4", &self.allow_lz4)
            .finish()
    }
}

/// Counters of a running server.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub connections: AtomicU64,
    pub refused: AtomicU64,
    pub bad_frames: AtomicU64,
    pub pages_urgent: AtomicU64,
    pub pages_bulk: AtomicU64,
    /// Bytes of page data put on the wire (after compression).
    pub bytes_sent: AtomicU64,
}

/// A plain copy of [`ServerStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerCounters {
    pub connections: u64,
    pub refused: u64,
    pub bad_frames: u64,
    pub pages_urgent: u64,
    pub pages_bulk: u64,
    pub bytes_sent: u64,
}

struct Shared {
    store: PageStore,
    token: Option<Vec<u8>>,
    allow_lz4: bool,
    log: ServerLog,
    stop: AtomicBool,
    conns: Mutex<HashMap<u64, TcpStream>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    next_conn: AtomicU64,
    stats: ServerStats,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running page server. Dropping it closes it.
pub struct PageServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for PageServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageServer").field("addr", &self.addr).finish()
    }
}

impl PageServer {
    /// Binds and starts accepting; returns once the socket listens.
    pub fn start(config: ServerConfig, store: PageStore) -> io::Result<Self> {
        let listener = TcpListener::bind((config.address.as_str(), config.port))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store,
            token: config.token,
            allow_lz4: config.allow_lz4,
            log: config.log,
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            next_conn: AtomicU64::new(1),
            stats: ServerStats::default(),
        });
        let s = Arc::clone(&shared);
        let accept = std::thread::Builder::new()
            .name("lr-ps-accept".into())
            .spawn(move || accept_loop(listener, s))?;
        Ok(Self {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// The bound address (with the kernel-chosen port when 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Counters so far.
    pub fn counters(&self) -> ServerCounters {
        let s = &self.shared.stats;
        ServerCounters {
            connections: s.connections.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
            bad_frames: s.bad_frames.load(Ordering::Relaxed),
            pages_urgent: s.pages_urgent.load(Ordering::Relaxed),
            pages_bulk: s.pages_bulk.load(Ordering::Relaxed),
            bytes_sent: s.bytes_sent.load(Ordering::Relaxed),
        }
    }

    /// Drops every connection abruptly (tests: a source that vanishes mid-transfer) but keeps
    /// listening.
    pub fn drop_connections(&self) {
        for (_, c) in lock(&self.shared.conns).drain() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Stops listening, closes every connection and joins every thread.
    pub fn close(&mut self) {
        if self.shared.stop.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the accept loop with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(if wake.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        self.drop_connections();
        let threads: Vec<_> = lock(&self.shared.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.close();
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) => {
                if shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                (shared.log)(&format!("accept failed: {e}"));
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Ok(c) = stream.try_clone() {
            lock(&shared.conns).insert(id, c);
        }
        shared.stats.connections.fetch_add(1, Ordering::Relaxed);
        let s = Arc::clone(&shared);
        let t = std::thread::Builder::new()
            .name(format!("lr-ps-conn-{id}"))
            .spawn(move || {
                let why = serve_connection(&s, stream, peer);
                if let Err(reason) = why {
                    (s.log)(&format!("connection {id} from {peer}: closed: {reason}"));
                }
                lock(&s.conns).remove(&id);
            });
        match t {
            Ok(t) => {
                let mut threads = lock(&shared.threads);
                threads.retain(|t| !t.is_finished());
                threads.push(t);
            }
            Err(e) => (shared.log)(&format!("cannot start a thread for {peer}: {e}")),
        }
    }
}

fn proto(shared: &Shared, e: ProtocolError) -> String {
    if matches!(
        e,
        ProtocolError::BadLength { .. }
            | ProtocolError::UnknownKind { .. }
            | ProtocolError::BadBody { .. }
    ) {
        shared.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
        format!("malformed frame: {e}")
    } else {
        e.to_string()
    }
}

/// Handshake, then the urgent or bulk loop. `Err` = why the connection ended abnormally.
fn serve_connection(shared: &Shared, stream: TcpStream, peer: SocketAddr) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::with_capacity(64 * 1024, stream.try_clone().map_err(|e| e.to_string())?);
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let hello = read_frame(&mut reader).map_err(|e| proto(shared, e))?;
    let Frame::Hello {
        version,
        role,
        features,
        token,
    } = hello
    else {
        return Err(proto(
            shared,
            ProtocolError::Unexpected {
                expected: "HELLO",
                got: hello.name(),
            },
        ));
    };
    let refuse = |w: &mut TcpStream, reason: String| {
        shared.stats.refused.fetch_add(1, Ordering::Relaxed);
        let _ = write_frame(w, &Frame::Refused { reason: reason.clone() });
        Err(format!("refused: {reason}"))
    };
    if version != VERSION {
        return refuse(
            &mut writer,
            format!("protocol version {version} is not supported; this server speaks version {VERSION}"),
        );
    }
    if let Some(want) = &shared.token {
        if token.is_empty() {
            return refuse(&mut writer, "this server requires a token".into());
        }
        if !same_token(want, &token) {
            return refuse(&mut writer, "wrong token".into());
        }
    }
    let features = features & if shared.allow_lz4 { FEATURE_LZ4 } else { 0 };
    write_frame(
        &mut writer,
        &Frame::Welcome {
            version: VERSION,
            features,
            max_pages: MAX_PAGES,
        },
    )
    .map_err(|e| e.to_string())?;
    let _ = stream.set_read_timeout(None);
    let _ = peer;
    if role == Role::Urgent {
        // Interactive priority: a `prio` qdisc on the link (scripts/netns-link.sh) sends these
        // replies ahead of queued bulk packets. Harmless where there is none.
        let _ = crate::sys::set_socket_priority(stream.as_fd(), URGENT_SOCKET_PRIORITY);
    }
    match role {
        Role::Urgent => urgent_loop(shared, reader, writer),
        Role::Bulk => bulk_loop(shared, reader, writer, stream, features & FEATURE_LZ4 != 0),
    }
}

/// Compares without an early exit on the first differing byte.
fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn urgent_loop(
    shared: &Shared,
    mut reader: BufReader<TcpStream>,
    mut writer: TcpStream,
) -> Result<(), String> {
    let mut buf = Vec::new();
    loop {
        let f = match read_frame(&mut reader) {
            Ok(f) => f,
            Err(ProtocolError::Eof) => return Ok(()),
            Err(e) => return Err(proto(shared, e)),
        };
        let reply = match f {
            Frame::Get { id, run } => {
                if run.pages == 0 || run.pages > MAX_PAGES {
                    Frame::Missing {
                        id,
                        code: MissingCode::TooMany,
                        run,
                        reason: format!("a GET asks for 1..={MAX_PAGES} pages, not {}", run.pages),
                    }
                } else {
                    buf.resize(run.pages as usize * PAGE, 0);
                    match shared.store.read(run, &mut buf) {
                        Ok(()) => {
                            shared.stats.pages_urgent.fetch_add(u64::from(run.pages), Ordering::Relaxed);
                            shared.stats.bytes_sent.fetch_add(buf.len() as u64, Ordering::Relaxed);
                            Frame::Pages {
                                id,
                                run,
                                data: std::mem::take(&mut buf),
                            }
                        }
                        Err((code, reason)) => Frame::Missing { id, code, run, reason },
                    }
                }
            }
            Frame::Bye => return Ok(()),
            other => {
                return Err(proto(
                    shared,
                    ProtocolError::Unexpected {
                        expected: "GET or BYE on an urgent connection",
                        got: other.name(),
                    },
                ))
            }
        };
        write_frame(&mut writer, &reply).map_err(|e| e.to_string())?;
        if let Frame::Pages { data, .. } = reply {
            buf = data;
        }
    }
}

enum Cmd {
    Frame(Frame),
    Closed(Option<String>),
}

struct Stream {
    id: u32,
    queue: VecDeque<PageRun>,
    sent_here: IntervalSet,
    pages: u64,
}

fn bulk_loop(
    shared: &Shared,
    mut reader: BufReader<TcpStream>,
    writer: TcpStream,
    stream: TcpStream,
    lz4: bool,
) -> Result<(), String> {
    let (tx, rx) = mpsc::channel::<Cmd>();
    let reader_thread = std::thread::Builder::new()
        .name("lr-ps-bulk-rd".into())
        .spawn(move || loop {
            match read_frame(&mut reader) {
                Ok(f) => {
                    let bye = f == Frame::Bye;
                    if tx.send(Cmd::Frame(f)).is_err() || bye {
                        return;
                    }
                }
                Err(ProtocolError::Eof) => {
                    let _ = tx.send(Cmd::Closed(None));
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Cmd::Closed(Some(e.to_string())));
                    return;
                }
            }
        })
        .map_err(|e| e.to_string())?;
    let mut w = BufWriter::with_capacity(256 * 1024, writer);
    let r = bulk_writer(shared, &rx, &mut w, lz4);
    let _ = w.flush();
    let _ = stream.shutdown(Shutdown::Both);
    let _ = reader_thread.join();
    r
}

fn bulk_writer(
    shared: &Shared,
    rx: &Receiver<Cmd>,
    w: &mut BufWriter<TcpStream>,
    lz4: bool,
) -> Result<(), String> {
    let mut streams: VecDeque<Stream> = VecDeque::new();
    let mut skip = IntervalSet::new();
    let mut buf = Vec::new();
    let page = PAGE as u64;
    loop {
        // Commands first: a SKIP or CANCEL takes effect before the next chunk.
        loop {
            let cmd = if streams.is_empty() {
                w.flush().map_err(|e| e.to_string())?;
                match rx.recv() {
                    Ok(c) => c,
                    Err(_) => return Ok(()),
                }
            } else {
                match rx.try_recv() {
                    Ok(c) => c,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return Ok(()),
                }
            };
            match cmd {
                Cmd::Closed(None) | Cmd::Frame(Frame::Bye) => return Ok(()),
                Cmd::Closed(Some(e)) => {
                    shared.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                    return Err(format!("malformed frame: {e}"));
                }
                Cmd::Frame(Frame::Stream {
                    id,
                    mode,
                    chunk_pages,
                    runs,
                }) => {
                    let chunk = chunk_pages.clamp(1, MAX_PAGES);
                    let mut queue = Vec::new();
                    if mode != StreamMode::All {
                        for r in runs {
                            split_run(r, chunk, &mut queue);
                        }
                    }
                    if mode != StreamMode::List {
                        queue.extend(shared.store.all_runs(chunk));
                    }
                    streams.push_back(Stream {
                        id,
                        queue: queue.into(),
                        sent_here: IntervalSet::new(),
                        pages: 0,
                    });
                }
                Cmd::Frame(Frame::Skip { runs }) => {
                    for r in runs {
                        skip.insert(r.pid, r.addr, r.addr.saturating_add(u64::from(r.pages) * page));
                    }
                }
                Cmd::Frame(Frame::Cancel { id }) => {
                    if let Some(i) = streams.iter().position(|s| s.id == id) {
                        let s = streams.remove(i).unwrap_or_else(|| unreachable_stream(id));
                        write_frame(
                            w,
                            &Frame::End {
                                id,
                                cancelled: true,
                                pages: s.pages,
                            },
                        )
                        .map_err(|e| e.to_string())?;
                    }
                }
                Cmd::Frame(other) => {
                    shared.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
                    return Err(format!(
                        "malformed frame: {} is not expected on a bulk connection",
                        other.name()
                    ));
                }
            }
        }
        // One chunk of the first stream.
        let Some(s) = streams.front_mut() else { continue };
        let Some(run) = s.queue.pop_front() else {
            let s = streams.pop_front().unwrap_or_else(|| unreachable_stream(0));
            write_frame(
                w,
                &Frame::End {
                    id: s.id,
                    cancelled: false,
                    pages: s.pages,
                },
            )
            .map_err(|e| e.to_string())?;
            continue;
        };
        let (a, b) = (run.addr, run.addr.saturating_add(u64::from(run.pages) * page));
        let mut x = a;
        let piece = loop {
            let Some((g0, g1)) = skip.first_gap(run.pid, x, b) else { break None };
            match s.sent_here.first_gap(run.pid, g0, g1) {
                Some(p) => break Some(p),
                None => x = g1,
            }
        };
        let Some((p0, p1)) = piece else { continue };
        if p1 < b {
            s.queue.push_front(PageRun {
                pid: run.pid,
                addr: p1,
                pages: ((b - p1) / page) as u32,
            });
        }
        let run = PageRun {
            pid: run.pid,
            addr: p0,
            pages: ((p1 - p0) / page) as u32,
        };
        s.sent_here.insert(run.pid, p0, p1);
        buf.resize(run.pages as usize * PAGE, 0);
        let frame = match shared.store.read(run, &mut buf) {
            Ok(()) => {
                s.pages += u64::from(run.pages);
                shared.stats.pages_bulk.fetch_add(u64::from(run.pages), Ordering::Relaxed);
                let packed = if lz4 { Some(lz4_flex::block::compress(&buf)) } else { None };
                let (encoding, data) = match packed {
                    Some(p) if p.len() < buf.len() => (FEATURE_LZ4, p),
                    _ => (0, buf.clone()),
                };
                shared.stats.bytes_sent.fetch_add(data.len() as u64, Ordering::Relaxed);
                Frame::Chunk {
                    id: s.id,
                    run,
                    encoding,
                    data,
                }
            }
            Err((code, reason)) => Frame::Missing {
                id: s.id,
                code,
                run,
                reason,
            },
        };
        write_frame(w, &frame).map_err(|e| e.to_string())?;
    }
}

#[cold]
fn unreachable_stream(id: u32) -> Stream {
    // position()/front_mut() just found it; an empty stream keeps the loop going regardless.
    Stream {
        id,
        queue: VecDeque::new(),
        sent_here: IntervalSet::new(),
        pages: 0,
    }
}
