//! The wire format of lazy-restore's own page server (docs/page-server-protocol.md).
//!
//! Every message is a frame: `len: u32 LE` (bytes that follow, 1..=[`MAX_FRAME`]), then one
//! `kind` byte, then a body whose layout depends on the kind. All integers are little endian.
//! A length outside that bound, a body of the wrong size or an unknown kind is a
//! [`ProtocolError`]: the reader never allocates more than [`MAX_FRAME`] bytes because a peer
//! said so, and never panics on what it reads.

use std::fmt;
use std::io::{self, Read, Write};

/// First four bytes of a HELLO.
pub const MAGIC: [u8; 4] = *b"LZPS";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Page size of everything on the wire.
pub const PAGE: usize = 4096;
/// Most pages in one GET reply or one bulk chunk (1 MiB).
pub const MAX_PAGES: u32 = 256;
/// Largest frame (length field value) either side accepts: one full chunk plus headers.
pub const MAX_FRAME: u32 = MAX_PAGES * PAGE as u32 + 64;
/// Longest shared token.
pub const MAX_TOKEN: usize = 256;
/// Feature bit: bulk chunks may be lz4-compressed.
pub const FEATURE_LZ4: u8 = 1;

/// Why a frame could not be read or was not acceptable.
#[derive(Debug)]
pub enum ProtocolError {
    /// I/O on the connection failed: {0}
    Io(io::Error),
    /// The peer closed the connection
    Eof,
    /// Frame length {len} is outside 1..={MAX_FRAME}
    BadLength { len: u32 },
    /// Unknown frame kind {kind:#04x}
    UnknownKind { kind: u8 },
    /// Frame {kind} has a body of {len} bytes; {what}
    BadBody {
        kind: &'static str,
        len: usize,
        what: &'static str,
    },
    /// Expected {expected}, got {got}
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "I/O on the connection failed: {e}"),
            Self::Eof => f.write_str("the peer closed the connection"),
            Self::BadLength { len } => write!(f, "frame length {len} is outside 1..={MAX_FRAME}"),
            Self::UnknownKind { kind } => write!(f, "unknown frame kind {kind:#04x}"),
            Self::BadBody { kind, len, what } => {
                write!(f, "{kind} frame has a body of {len} bytes: {what}")
            }
            Self::Unexpected { expected, got } => write!(f, "expected {expected}, got {got}"),
        }
    }
}

impl std::error::Error for ProtocolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for ProtocolError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Self::Eof
        } else {
            Self::Io(e)
        }
    }
}

/// Which of a restore's two connections this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Fault requests: one small request, one reply, nothing queued in between.
    Urgent = 1,
    /// Background streams: the server pushes chunks.
    Bulk = 2,
}

/// What a bulk stream sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamMode {
    /// Exactly the listed ranges, in the order given.
    List = 0,
    /// Every lazy page the server holds, task by task, lowest address first.
    All = 1,
    /// The listed ranges first (a working-set profile), then everything else.
    ListThenAll = 2,
}

/// (pstree pid, image address, pages): the unit of every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageRun {
    pub pid: i32,
    pub addr: u64,
    pub pages: u32,
}

/// Why the server could not send some pages (MISSING frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissingCode {
    /// The server holds no task with that pid.
    UnknownPid = 1,
    /// Some of the pages are not lazy pages of that task on this server.
    NotHeld = 2,
    /// More pages than [`MAX_PAGES`] in one GET, or zero.
    TooMany = 3,
    /// Reading the image files failed on the server.
    ReadFailed = 4,
}

impl MissingCode {
    fn from_u16(v: u16) -> Self {
        match v {
            1 => Self::UnknownPid,
            2 => Self::NotHeld,
            3 => Self::TooMany,
            _ => Self::ReadFailed,
        }
    }
}

/// One frame, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello {
        version: u16,
        role: Role,
        features: u8,
        token: Vec<u8>,
    },
    Welcome {
        version: u16,
        features: u8,
        max_pages: u32,
    },
    Refused {
        reason: String,
    },
    Get {
        id: u32,
        run: PageRun,
    },
    Pages {
        id: u32,
        run: PageRun,
        data: Vec<u8>,
    },
    Missing {
        id: u32,
        code: MissingCode,
        run: PageRun,
        reason: String,
    },
    Stream {
        id: u32,
        mode: StreamMode,
        chunk_pages: u32,
        runs: Vec<PageRun>,
    },
    Chunk {
        id: u32,
        run: PageRun,
        /// 0 = raw; [`FEATURE_LZ4`] = lz4 block of `run.pages * PAGE` bytes.
        encoding: u8,
        data: Vec<u8>,
    },
    Skip {
        runs: Vec<PageRun>,
    },
    Cancel {
        id: u32,
    },
    End {
        id: u32,
        cancelled: bool,
        pages: u64,
    },
    Bye,
}

const K_HELLO: u8 = 0x01;
const K_WELCOME: u8 = 0x02;
const K_REFUSED: u8 = 0x03;
const K_GET: u8 = 0x10;
const K_PAGES: u8 = 0x11;
const K_MISSING: u8 = 0x12;
const K_STREAM: u8 = 0x20;
const K_CHUNK: u8 = 0x21;
const K_SKIP: u8 = 0x22;
const K_CANCEL: u8 = 0x23;
const K_END: u8 = 0x24;
const K_BYE: u8 = 0x30;

/// Most runs in one STREAM or SKIP frame.
pub const MAX_RUNS: usize = (MAX_FRAME as usize - 32) / 16;

impl Frame {
    /// The frame's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "HELLO",
            Self::Welcome { .. } => "WELCOME",
            Self::Refused { .. } => "REFUSED",
            Self::Get { .. } => "GET",
            Self::Pages { .. } => "PAGES",
            Self::Missing { .. } => "MISSING",
            Self::Stream { .. } => "STREAM",
            Self::Chunk { .. } => "CHUNK",
            Self::Skip { .. } => "SKIP",
            Self::Cancel { .. } => "CANCEL",
            Self::End { .. } => "END",
            Self::Bye => "BYE",
        }
    }

    /// Encodes the frame, length prefix included.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&[0, 0, 0, 0]);
        match self {
            Self::Hello {
                version,
                role,
                features,
                token,
            } => {
                b.push(K_HELLO);
                b.extend_from_slice(&MAGIC);
                b.extend_from_slice(&version.to_le_bytes());
                b.push(*role as u8);
                b.push(*features);
                let t = &token[..token.len().min(MAX_TOKEN)];
                b.extend_from_slice(&(t.len() as u16).to_le_bytes());
                b.extend_from_slice(t);
            }
            Self::Welcome {
                version,
                features,
                max_pages,
            } => {
                b.push(K_WELCOME);
                b.extend_from_slice(&version.to_le_bytes());
                b.push(*features);
                b.push(0);
                b.extend_from_slice(&max_pages.to_le_bytes());
            }
            Self::Refused { reason } => {
                b.push(K_REFUSED);
                b.extend_from_slice(&reason.as_bytes()[..reason.len().min(1024)]);
            }
            Self::Get { id, run } => {
                b.push(K_GET);
                b.extend_from_slice(&id.to_le_bytes());
                put_run(&mut b, run);
            }
            Self::Pages { id, run, data } => {
                b.push(K_PAGES);
                b.extend_from_slice(&id.to_le_bytes());
                put_run(&mut b, run);
                b.extend_from_slice(data);
            }
            Self::Missing {
                id,
                code,
                run,
                reason,
            } => {
                b.push(K_MISSING);
                b.extend_from_slice(&id.to_le_bytes());
                b.extend_from_slice(&(*code as u16).to_le_bytes());
                put_run(&mut b, run);
                b.extend_from_slice(&reason.as_bytes()[..reason.len().min(1024)]);
            }
            Self::Stream {
                id,
                mode,
                chunk_pages,
                runs,
            } => {
                b.push(K_STREAM);
                b.extend_from_slice(&id.to_le_bytes());
                b.push(*mode as u8);
                b.extend_from_slice(&[0, 0, 0]);
                b.extend_from_slice(&chunk_pages.to_le_bytes());
                put_runs(&mut b, runs);
            }
            Self::Chunk {
                id,
                run,
                encoding,
                data,
            } => {
                b.push(K_CHUNK);
                b.extend_from_slice(&id.to_le_bytes());
                put_run(&mut b, run);
                b.push(*encoding);
                b.extend_from_slice(data);
            }
            Self::Skip { runs } => {
                b.push(K_SKIP);
                put_runs(&mut b, runs);
            }
            Self::Cancel { id } => {
                b.push(K_CANCEL);
                b.extend_from_slice(&id.to_le_bytes());
            }
            Self::End {
                id,
                cancelled,
                pages,
            } => {
                b.push(K_END);
                b.extend_from_slice(&id.to_le_bytes());
                b.push(u8::from(*cancelled));
                b.extend_from_slice(&pages.to_le_bytes());
            }
            Self::Bye => b.push(K_BYE),
        }
        let len = (b.len() - 4) as u32;
        b[..4].copy_from_slice(&len.to_le_bytes());
        b
    }

    /// Decodes one frame body (`kind` byte first, length prefix already removed).
    pub fn decode(body: &[u8]) -> Result<Self, ProtocolError> {
        let (&kind, rest) = body
            .split_first()
            .ok_or(ProtocolError::BadLength { len: 0 })?;
        let mut r = Cursor {
            buf: rest,
            kind: kind_name(kind),
        };
        let f = match kind {
            K_HELLO => {
                let magic = r.take(4)?;
                if magic != MAGIC {
                    return Err(r.bad("magic is not LZPS"));
                }
                let version = r.u16()?;
                let role = match r.u8()? {
                    1 => Role::Urgent,
                    2 => Role::Bulk,
                    _ => return Err(r.bad("role is neither 1 (urgent) nor 2 (bulk)")),
                };
                let features = r.u8()?;
                let n = r.u16()? as usize;
                if n > MAX_TOKEN {
                    return Err(r.bad("token longer than 256 bytes"));
                }
                let token = r.take(n)?.to_vec();
                r.end()?;
                Self::Hello {
                    version,
                    role,
                    features,
                    token,
                }
            }
            K_WELCOME => {
                let version = r.u16()?;
                let features = r.u8()?;
                r.u8()?;
                let max_pages = r.u32()?;
                r.end()?;
                Self::Welcome {
                    version,
                    features,
                    max_pages,
                }
            }
            K_REFUSED => Self::Refused {
                reason: String::from_utf8_lossy(r.rest()).into_owned(),
            },
            K_GET => {
                let id = r.u32()?;
                let run = r.run()?;
                r.end()?;
                Self::Get { id, run }
            }
            K_PAGES => {
                let id = r.u32()?;
                let run = r.run()?;
                let data = r.rest().to_vec();
                if data.len() != run.pages as usize * PAGE {
                    return Err(r.bad("data is not pages × 4096 bytes"));
                }
                Self::Pages { id, run, data }
            }
            K_MISSING => {
                let id = r.u32()?;
                let code = MissingCode::from_u16(r.u16()?);
                let run = r.run()?;
                let reason = String::from_utf8_lossy(r.rest()).into_owned();
                Self::Missing {
                    id,
                    code,
                    run,
                    reason,
                }
            }
            K_STREAM => {
                let id = r.u32()?;
                let mode = match r.u8()? {
                    0 => StreamMode::List,
                    1 => StreamMode::All,
                    2 => StreamMode::ListThenAll,
                    _ => return Err(r.bad("unknown stream mode")),
                };
                r.take(3)?;
                let chunk_pages = r.u32()?;
                let runs = r.runs()?;
                Self::Stream {
                    id,
                    mode,
                    chunk_pages,
                    runs,
                }
            }
            K_CHUNK => {
                let id = r.u32()?;
                let run = r.run()?;
                let encoding = r.u8()?;
                let data = r.rest().to_vec();
                if run.pages == 0 || run.pages > MAX_PAGES {
                    return Err(r.bad("chunk of 0 or more than 256 pages"));
                }
                if encoding == 0 && data.len() != run.pages as usize * PAGE {
                    return Err(r.bad("raw chunk data is not pages × 4096 bytes"));
                }
                Self::Chunk {
                    id,
                    run,
                    encoding,
                    data,
                }
            }
            K_SKIP => Self::Skip { runs: r.runs()? },
            K_CANCEL => {
                let id = r.u32()?;
                r.end()?;
                Self::Cancel { id }
            }
            K_END => {
                let id = r.u32()?;
                let cancelled = r.u8()? != 0;
                let pages = r.u64()?;
                r.end()?;
                Self::End {
                    id,
                    cancelled,
                    pages,
                }
            }
            K_BYE => {
                r.end()?;
                Self::Bye
            }
            kind => return Err(ProtocolError::UnknownKind { kind }),
        };
        Ok(f)
    }
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        K_HELLO => "HELLO",
        K_WELCOME => "WELCOME",
        K_REFUSED => "REFUSED",
        K_GET => "GET",
        K_PAGES => "PAGES",
        K_MISSING => "MISSING",
        K_STREAM => "STREAM",
        K_CHUNK => "CHUNK",
        K_SKIP => "SKIP",
        K_CANCEL => "CANCEL",
        K_END => "END",
        K_BYE => "BYE",
        _ => "unknown",
    }
}

fn put_run(b: &mut Vec<u8>, r: &PageRun) {
    b.extend_from_slice(&r.pid.to_le_bytes());
    b.extend_from_slice(&r.addr.to_le_bytes());
    b.extend_from_slice(&r.pages.to_le_bytes());
}

fn put_runs(b: &mut Vec<u8>, runs: &[PageRun]) {
    let runs = &runs[..runs.len().min(MAX_RUNS)];
    b.extend_from_slice(&(runs.len() as u32).to_le_bytes());
    for r in runs {
        put_run(b, r);
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    kind: &'static str,
}

impl<'a> Cursor<'a> {
    fn bad(&self, what: &'static str) -> ProtocolError {
        ProtocolError::BadBody {
            kind: self.kind,
            len: self.buf.len(),
            what,
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(self.bad("body too short"));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        let mut a = [0u8; 2];
        a.copy_from_slice(self.take(2)?);
        Ok(u16::from_le_bytes(a))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn run(&mut self) -> Result<PageRun, ProtocolError> {
        Ok(PageRun {
            pid: self.u32()? as i32,
            addr: self.u64()?,
            pages: self.u32()?,
        })
    }
    fn runs(&mut self) -> Result<Vec<PageRun>, ProtocolError> {
        let n = self.u32()? as usize;
        if n > MAX_RUNS || self.buf.len() != n * 16 {
            return Err(self.bad("run count does not match the body"));
        }
        (0..n).map(|_| self.run()).collect()
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
    fn end(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(self.bad("trailing bytes"))
        }
    }
}

/// Reads one frame. The length is checked before anything is allocated.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, ProtocolError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len == 0 || len > MAX_FRAME {
        return Err(ProtocolError::BadLength { len });
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)?;
    Frame::decode(&body)
}

/// Writes one frame.
pub fn write_frame(w: &mut impl Write, f: &Frame) -> Result<(), ProtocolError> {
    w.write_all(&f.encode())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(f: Frame) {
        let bytes = f.encode();
        let got = read_frame(&mut &bytes[..]).unwrap();
        assert_eq!(got, f);
    }

    #[test]
    fn every_frame_roundtrips() {
        let run = PageRun {
            pid: 7,
            addr: 0x7f00_0000_1000,
            pages: 2,
        };
        roundtrip(Frame::Hello {
            version: VERSION,
            role: Role::Bulk,
            features: FEATURE_LZ4,
            token: b"secret".to_vec(),
        });
        roundtrip(Frame::Welcome {
            version: 1,
            features: 1,
            max_pages: MAX_PAGES,
        });
        roundtrip(Frame::Refused {
            reason: "bad token".into(),
        });
        roundtrip(Frame::Get { id: 3, run });
        roundtrip(Frame::Pages {
            id: 3,
            run,
            data: vec![9; 2 * PAGE],
        });
        roundtrip(Frame::Missing {
            id: 3,
            code: MissingCode::NotHeld,
            run,
            reason: "no".into(),
        });
        roundtrip(Frame::Stream {
            id: 1,
            mode: StreamMode::ListThenAll,
            chunk_pages: 64,
            runs: vec![run, run],
        });
        roundtrip(Frame::Chunk {
            id: 1,
            run,
            encoding: 0,
            data: vec![1; 2 * PAGE],
        });
        roundtrip(Frame::Skip { runs: vec![run] });
        roundtrip(Frame::Cancel { id: 1 });
        roundtrip(Frame::End {
            id: 1,
            cancelled: true,
            pages: 99,
        });
        roundtrip(Frame::Bye);
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        // Huge length: refused before allocating.
        let mut b = u32::MAX.to_le_bytes().to_vec();
        b.push(K_GET);
        assert!(matches!(
            read_frame(&mut &b[..]),
            Err(ProtocolError::BadLength { len: u32::MAX })
        ));
        assert!(matches!(
            read_frame(&mut &[0u8, 0, 0, 0][..]),
            Err(ProtocolError::BadLength { len: 0 })
        ));
        // Truncated stream.
        assert!(matches!(
            read_frame(&mut &[10u8, 0, 0, 0, K_GET][..]),
            Err(ProtocolError::Eof)
        ));
        // Unknown kind, short bodies, wrong magic, lying run counts.
        assert!(matches!(
            Frame::decode(&[0x77]),
            Err(ProtocolError::UnknownKind { kind: 0x77 })
        ));
        assert!(matches!(
            Frame::decode(&[K_GET, 1, 2]),
            Err(ProtocolError::BadBody { .. })
        ));
        assert!(matches!(
            Frame::decode(&[K_HELLO, b'X', b'X', b'X', b'X', 1, 0, 1, 0, 0, 0]),
            Err(ProtocolError::BadBody { .. })
        ));
        let mut skip = vec![K_SKIP];
        skip.extend_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            Frame::decode(&skip),
            Err(ProtocolError::BadBody { .. })
        ));
        // Pages whose data does not match the page count.
        let mut p = Frame::Pages {
            id: 1,
            run: PageRun {
                pid: 1,
                addr: 0,
                pages: 1,
            },
            data: vec![0; PAGE],
        }
        .encode();
        p.truncate(p.len() - 1);
        let len = (p.len() - 4) as u32;
        p[..4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            read_frame(&mut &p[..]),
            Err(ProtocolError::BadBody { .. })
        ));
        // Random bytes never panic.
        let mut x: u64 = 0x1234_5678;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let n = (x % 40) as usize;
            let body: Vec<u8> = (0..n).map(|i| (x >> (i % 8 * 8)) as u8 ^ i as u8).collect();
            let _ = Frame::decode(&body);
        }
    }
}
