//! Helpers for the hardening and load tests: the proxy in process or as the
//! compiled binary, the simulated NVIDIA upstream, a real HTTP client and raw
//! sockets, all on 127.0.0.1. Shared by the integration binary and `tests/load.rs`
//! (which declares `common` beside it, as `crate::common`).
#![allow(dead_code)] // each test binary uses a different part

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use proxypal_nim_sim::SimHandle;
use proxypal_server::config::Config;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Runs `f`, failing the test if it takes longer than `limit`.
pub async fn within<F: Future>(limit: Duration, f: F) -> F::Output {
    tokio::time::timeout(limit, f).await.unwrap_or_else(|_| panic!("test took longer than {limit:?}"))
}

// The client, the response type and the key label are the ones the proxy tests use.
use crate::common;
#[allow(unused_imports)] // each test binary uses a different part
pub use crate::common::{HttpClient, Reply, http_client, masked, send};

/// A proxy config in front of `sim` with `keys`: the proxy tests' config
/// (127.0.0.1 port 0, a 5 s queue, a 2 s shutdown grace) with limits that
/// never bind and short cooldowns, so a test can reuse a key that failed a
/// moment ago.
pub fn proxy_config(sim: &SimHandle, keys: &[String]) -> Config {
    let mut config = common::proxy_config(sim, keys);
    config.state.path = None;
    config.rate_limit.requests_per_minute = Some(600_000);
    config.retry.failure_cooldown = Duration::from_millis(20);
    config.retry.max_failure_cooldown = Duration::from_millis(40);
    config
}

/// The JSON of a small chat completion request.
pub fn chat_json(stream: bool) -> String {
    json!({
        "model": "meta/llama-3.1-8b-instruct",
        "messages": [{"role": "user", "content": "Hello"}],
        "stream": stream,
    })
    .to_string()
}

/// A chat completion request to the proxy at `addr`.
pub fn chat_request(addr: SocketAddr, stream: bool) -> Request<Full<Bytes>> {
    common::chat_request(addr, stream, &[])
}

/// A GET request.
pub fn get_request(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}{path}")).body(Full::new(Bytes::new())).unwrap()
}

/// What a raw socket got back.
#[derive(Debug)]
pub struct RawReply {
    /// Every byte read until the server closed, `limit` passed, or a read failed.
    pub bytes: Vec<u8>,
    /// The server closed the connection (EOF or reset) within the limit.
    pub closed: bool,
}

impl RawReply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The status code of the response head, if one came.
    pub fn status(&self) -> Option<u16> {
        let text = self.text();
        let line = text.lines().next()?;
        line.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
    }
}

/// Writes `request` on a fresh connection to `addr` (a failed write, e.g.
/// because the server already closed, is not an error) and reads whatever
/// comes back until the server closes or `limit` passes.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8], limit: Duration) -> RawReply {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let _ = conn.write_all(request).await;
    read_until_close(&mut conn, limit).await
}

/// Reads from `conn` until EOF/reset or `limit`.
pub async fn read_until_close(conn: &mut TcpStream, limit: Duration) -> RawReply {
    let deadline = tokio::time::Instant::now() + limit;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return RawReply { bytes, closed: false },
            Ok(Ok(0)) | Ok(Err(_)) => return RawReply { bytes, closed: true },
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads from `conn` until a whole response head (`\r\n\r\n`) has arrived;
/// `None` if the connection ended or `limit` passed first.
pub async fn read_head(conn: &mut TcpStream, limit: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(String::from_utf8_lossy(&bytes[..end]).into_owned());
        }
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => bytes.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
}

/// SSE `data:` payloads in `text`.
pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n").filter_map(|e| e.trim().strip_prefix("data: ").map(str::to_owned)).collect()
}

/// Reads a streaming body frame by frame: the payload and, if the body ended
/// with an error, its text. Each frame is stamped with its arrival time.
pub async fn read_stream(
    resp: http::Response<hyper::body::Incoming>,
) -> (Vec<(Instant, Bytes)>, Option<String>) {
    let mut body = resp.into_body();
    let mut frames = Vec::new();
    loop {
        match body.frame().await {
            None => return (frames, None),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    frames.push((Instant::now(), data));
                }
            }
            Some(Err(e)) => return (frames, Some(e.to_string())),
        }
    }
}

/// The concatenated text of `frames`.
pub fn frames_text(frames: &[(Instant, Bytes)]) -> String {
    frames.iter().map(|(_, b)| String::from_utf8_lossy(b).into_owned()).collect()
}

/// This process's resident set size in KiB (`VmRSS` of `/proc/self/status`).
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

// ------------------------------------------------------------- the binary

/// A port that was free a moment ago: bind port 0, read it, release it.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("proxypal-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Replaces `path`'s content atomically (write a sibling, rename over), as
/// careful editors and config management tools do.
pub fn replace_file(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The compiled `proxypal-server` running with `--config PATH`, its stderr
/// collected. Killed (by its own pid) on drop if it is still running.
pub struct Binary {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Binary {
    /// Starts the binary and waits until `/health` answers on `addr`.
    pub async fn start(config: &Path, addr: SocketAddr) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_proxypal-server"));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PROXYPAL_") {
                cmd.env_remove(&name);
            }
        }
        let child = cmd
            .arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut bin = Self { child, addr, log: Arc::default(), reader: None };
        let stderr = bin.child.stderr.take().unwrap();
        let log = Arc::clone(&bin.log);
        bin.reader = Some(std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        }));
        let http = http_client();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Ok(resp)) =
                tokio::time::timeout(Duration::from_secs(1), http.request(get_request(addr, "/health"))).await
            {
                if resp.status() == StatusCode::OK {
                    break;
                }
            }
            assert!(bin.child.try_wait().unwrap().is_none(), "the server exited: {}", bin.log());
            assert!(Instant::now() < deadline, "the server did not answer /health: {}", bin.log());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bin
    }

    /// Everything the server wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits (bounded) until the log contains `needle`.
    pub async fn wait_log(&self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.log().contains(needle)
    }

    /// Sends `signal` (`TERM`, `INT`, `HUP`) with `kill`.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let ok = Command::new("kill").arg(format!("-{signal}")).arg(&pid).status().unwrap();
        assert!(ok.success(), "kill -{signal} {pid} failed");
    }

    /// Waits up to `limit` for the process to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
