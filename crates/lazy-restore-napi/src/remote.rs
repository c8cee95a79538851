//! Remote pages for Node: `startPageServer(config, onLog?)` → a handle with `close()`, and the
//! remote page sources an engine can read from. Conversion only; the logic is in
//! `lazy_restore_core::remote`.

use crate::{num, task_plans, u64_of, NativeTaskPlan};
use lazy_restore_core::remote::server::{PageServer, ServerConfig};
use lazy_restore_core::remote::store::PageStore;
use lazy_restore_core::PageSource;
use napi::threadsafe_function::{ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi_derive::napi;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// What the page server serves and where it listens.
#[napi(object)]
pub struct NativePageServerConfig {
    /// Numeric address to bind; default 127.0.0.1.
    pub address: Option<String>,
    /// 0 = kernel-chosen (read `port` on the handle).
    pub port: u32,
    /// Clients must send this token.
    pub token: Option<String>,
    /// Offer lz4 for bulk chunks (clients still choose); default true.
    pub lz4: Option<bool>,
    /// Per pstree pid, the lazy ranges and where their bytes are (the serve plan).
    pub tasks: Vec<NativeTaskPlan>,
    pub files: Vec<String>,
}

/// Counters of a running page server.
#[napi(object)]
pub struct NativePageServerStats {
    pub connections: i64,
    pub refused: i64,
    pub bad_frames: i64,
    pub pages_urgent: i64,
    pub pages_bulk: i64,
    pub bytes_sent: i64,
}

/// A running page server.
#[napi]
pub struct NativePageServer {
    inner: Mutex<Option<PageServer>>,
    address: String,
    port: u32,
}

/// Opens the page files and starts listening; throws with the reason (bad plan, bind failure).
#[napi]
pub fn start_page_server(
    config: NativePageServerConfig,
    on_log: Option<ThreadsafeFunction<String>>,
) -> napi::Result<NativePageServer> {
    let tasks = task_plans(&config.tasks).map_err(napi::Error::from_reason)?;
    let files: Vec<PathBuf> = config.files.iter().map(PathBuf::from).collect();
    let store = PageStore::open(tasks, &files).map_err(|e| napi::Error::from_reason(e.to_string()))?;
    let log: Arc<dyn Fn(&str) + Send + Sync> = match on_log {
        Some(f) => Arc::new(move |m: &str| {
            let _ = f.call(Ok(m.to_string()), ThreadsafeFunctionCallMode::NonBlocking);
        }),
        None => Arc::new(|_: &str| {}),
    };
    let port = u16::try_from(config.port)
        .map_err(|_| napi::Error::from_reason(format!("port {} is not 0..65535", config.port)))?;
    let cfg = ServerConfig {
        address: config.address.unwrap_or_else(|| "127.0.0.1".into()),
        port,
        token: config.token.map(String::into_bytes),
        allow_lz4: config.lz4.unwrap_or(true),
        log,
    };
    let what = format!("{}:{}", cfg.address, port);
    let server = PageServer::start(cfg, store)
        .map_err(|e| napi::Error::from_reason(format!("cannot listen on {what}: {e}")))?;
    let addr = server.local_addr();
    Ok(NativePageServer {
        inner: Mutex::new(Some(server)),
        address: addr.ip().to_string(),
        port: u32::from(addr.port()),
    })
}

#[napi]
impl NativePageServer {
    /// The bound address.
    #[napi(getter)]
    pub fn address(&self) -> String {
        self.address.clone()
    }

    /// The bound port (the kernel's choice when 0 was asked).
    #[napi(getter)]
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Counters so far (zeros once closed).
    #[napi]
    pub fn stats(&self) -> NativePageServerStats {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let c = g.as_ref().map(PageServer::counters).unwrap_or_default();
        NativePageServerStats {
            connections: num(c.connections),
            refused: num(c.refused),
            bad_frames: num(c.bad_frames),
            pages_urgent: num(c.pages_urgent),
            pages_bulk: num(c.pages_bulk),
            bytes_sent: num(c.bytes_sent),
        }
    }

    /// Stops listening and closes every connection. Idempotent.
    #[napi]
    pub fn close(&self) {
        let s = self.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut s) = s {
            s.close();
        }
    }
}

/// Where an engine's pages come from when they are not in local files.
#[napi(object)]
pub struct NativeRemoteSource {
    /// 'lazy': `lazy-restore page-server`; 'criu': a CRIU page server (`criu dump --lazy-pages`).
    #[napi(ts_type = "'lazy' | 'criu'")]
    pub kind: String,
    /// host:port
    pub address: String,
    /// 'lazy': the shared token.
    pub token: Option<String>,
    /// 'lazy': ask for lz4-compressed bulk chunks.
    pub lz4: Option<bool>,
    /// 'lazy': how long one outage may last before the restore fails (default 10 s).
    pub grace_ms: Option<u32>,
    /// 'criu': the 32-byte header of CRIU 4.2 instead of 4.1's 24 bytes.
    pub criu42: Option<bool>,
    /// 'criu': background GET size in pages (default 32; at most 8 in flight).
    pub piece_pages: Option<u32>,
    /// The pstree pid of each task index.
    pub pids: Vec<i32>,
    /// 'criu': per task, the pages the source holds lazily (the only ones we may ask for).
    pub lazy: Option<Vec<NativeLazyTask>>,
}

/// A task's lazily held pages: parallel arrays of start addresses and page counts.
#[napi(object)]
pub struct NativeLazyTask {
    pub pid: i32,
    pub starts: Vec<napi::bindgen_prelude::BigInt>,
    pub pages: Vec<u32>,
}

/// Connects the source; on failure the error code ('REMOTE_*' or 'PLAN_INVALID') and message.
pub fn connect_source(
    r: NativeRemoteSource,
) -> Result<Arc<dyn PageSource + Sync>, (&'static str, String)> {
    use lazy_restore_core::remote::client::{ClientOptions, LazySource};
    use lazy_restore_core::remote::criu::{CriuClient, CriuSource, HeaderLayout, LazyTask};
    let fail = |e: lazy_restore_core::remote::RemoteError| (e.code(), e.to_string());
    match r.kind.as_str() {
        "lazy" => {
            let mut o = ClientOptions::new(r.address);
            o.token = r.token.map(String::into_bytes);
            o.lz4 = r.lz4.unwrap_or(false);
            if let Some(ms) = r.grace_ms {
                o.grace = std::time::Duration::from_millis(u64::from(ms));
            }
            Ok(Arc::new(LazySource::connect(o, r.pids).map_err(fail)?))
        }
        "criu" => {
            let mut lazy = Vec::new();
            for t in r.lazy.unwrap_or_default() {
                if t.starts.len() != t.pages.len() {
                    return Err(("PLAN_INVALID", format!("task {}: {} starts but {} page counts", t.pid, t.starts.len(), t.pages.len())));
                }
                let ranges = t
                    .starts
                    .iter()
                    .zip(&t.pages)
                    .map(|(s, &n)| u64_of(s, "start", t.pid).map(|a| (a, u64::from(n))))
                    .collect::<Result<Vec<_>, String>>()
                    .map_err(|e| ("PLAN_INVALID", e))?;
                lazy.push(LazyTask { pid: t.pid, ranges });
            }
            let layout = if r.criu42.unwrap_or(false) { HeaderLayout::Criu42 } else { HeaderLayout::Criu41 };
            let client = CriuClient::connect(&r.address, layout, lazy).map_err(fail)?;
            let mut src = CriuSource::new(client, r.pids);
            if let Some(p) = r.piece_pages {
                src = src.with_pieces(u64::from(p), u64::from(p).max(1) * 4096 * 8);
            }
            Ok(Arc::new(src))
        }
        other => Err(("PLAN_INVALID", format!("unknown remote source kind '{other}' (expected 'lazy' or 'criu')"))),
    }
}
