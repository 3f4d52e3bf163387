//! SSE load client: opens N streaming chat-completion requests (C at a time)
//! against one http://HOST:PORT/PATH and prints one JSON line with the
//! distribution of time-to-first-byte, time-to-first-chunk (first `data: `
//! line of the body) and total time (until `data: [DONE]`), per stream.
//!
//! Usage: sse-load URL [-n N] [-c C] [--model M] [--timeout SECS]
//! Only loopback URLs are accepted (the benchmark must never leave the box).
//! Sends "Authorization: Bearer $BENCH_CLIENT_KEY" (default sk-bench-client).
//! Every stream has its own timeout, and the whole run stops by itself.
//! With `--interval-ms G` (the upstream's gap between events, first at once),
//! it also reports each event's lag: arrival − (first event's arrival + i·G),
//! p50/p99/max over all events of all good streams. Measured the same way
//! directly against the upstream, it is the upstream's own jitter; through a
//! proxy the difference is the proxy's per-chunk delay (coalescing shows as
//! lags of whole gaps).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

#[derive(Default, Clone, Debug)]
struct One {
    ok: bool,
    err: Option<String>,
    ttfb_ms: f64,
    ttfc_ms: f64,
    total_ms: f64,
    events: usize,
    lags_ms: Vec<f64>,
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if hay.len() < needle.len() {
        return None;
    }
    (from..=hay.len() - needle.len()).find(|&i| &hay[i..i + needle.len()] == needle)
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

#[allow(clippy::too_many_arguments)]
async fn one(host: Arc<String>, hostport: Arc<String>, path: Arc<String>, body: Arc<String>, key: Arc<String>, to: Duration, gap: Option<Duration>) -> One {
    let t0 = Instant::now();
    let mut r = One::default();
    let fut = async {
        let mut s = TcpStream::connect(hostport.as_str()).await.map_err(|e| format!("connect: {e}"))?;
        s.set_nodelay(true).ok();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\nAuthorization: Bearer {key}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
        let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
        let mut tmp = [0u8; 16 * 1024];
        let mut hdr_end: Option<usize> = None;
        let mut scan_from = 0usize;
        let mut ev_scan = 0usize; // where to look for the next `data:` (lag tracking)
        let mut ev_i = 0u32;
        let mut t_first: Option<Instant> = None;
        loop {
            let n = s.read(&mut tmp).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("eof before [DONE]".to_string());
            }
            if buf.is_empty() {
                r.ttfb_ms = t0.elapsed().as_secs_f64() * 1e3;
            }
            buf.extend_from_slice(&tmp[..n]);
            if hdr_end.is_none() {
                if let Some(p) = find(&buf, b"\r\n\r\n", 0) {
                    hdr_end = Some(p + 4);
                    scan_from = p + 4;
                    let status_ok = buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200");
                    if !status_ok {
                        let line = String::from_utf8_lossy(&buf[..buf.iter().position(|&b| b == b'\r').unwrap_or(buf.len()).min(80)]).to_string();
                        return Err(format!("status: {line}"));
                    }
                } else {
                    continue;
                }
            }
            if let Some(g) = gap {
                let now = Instant::now();
                ev_scan = ev_scan.max(hdr_end.unwrap());
                while let Some(p) = find(&buf, b"data:", ev_scan) {
                    let t0e = *t_first.get_or_insert(now);
                    let due = t0e + g * ev_i;
                    r.lags_ms.push(now.saturating_duration_since(due).as_secs_f64() * 1e3);
                    ev_i += 1;
                    ev_scan = p + 5;
                }
                ev_scan = ev_scan.max(buf.len().saturating_sub(4));
            }
            if r.ttfc_ms == 0.0 && find(&buf, b"data:", scan_from).is_some() {
                r.ttfc_ms = t0.elapsed().as_secs_f64() * 1e3;
            }
            if find(&buf, b"[DONE]", scan_from.saturating_sub(8).max(hdr_end.unwrap())).is_some() {
                r.total_ms = t0.elapsed().as_secs_f64() * 1e3;
                r.events = count(&buf[hdr_end.unwrap()..], b"data:");
                return Ok(());
            }
            scan_from = buf.len().saturating_sub(8).max(hdr_end.unwrap());
        }
    };
    match timeout(to, fut).await {
        Ok(Ok(())) => r.ok = true,
        Ok(Err(e)) => r.err = Some(e),
        Err(_) => r.err = Some("timeout".to_string()),
    }
    r
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let idx = ((p / 100.0) * (v.len() as f64 - 1.0)).round() as usize;
    v[idx.min(v.len() - 1)]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut url = None;
    let mut n = 1usize;
    let mut c = 1usize;
    let mut model = "meta/llama-3.1-8b-instruct".to_string();
    let mut to = 60u64;
    let mut gap: Option<Duration> = None;
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "-n" => { n = args[i + 1].parse().expect("-n"); i += 1; }
            "-c" => { c = args[i + 1].parse().expect("-c"); i += 1; }
            "--model" => { model = args[i + 1].clone(); i += 1; }
            "--timeout" => { to = args[i + 1].parse().expect("--timeout"); i += 1; }
            "--interval-ms" => { gap = Some(Duration::from_millis(args[i + 1].parse().expect("--interval-ms"))); i += 1; }
            u => url = Some(u.to_string()),
        }
        i += 1;
    }
    let url = url.expect("usage: sse-load http://127.0.0.1:PORT/v1/chat/completions [-n N] [-c C] [--model M] [--timeout S]");
    let rest = url.strip_prefix("http://").expect("only http:// URLs");
    let (hostport, path) = match rest.find('/') {
        Some(p) => (rest[..p].to_string(), rest[p..].to_string()),
        None => (rest.to_string(), "/".to_string()),
    };
    let host_only = hostport.rsplit_once(':').map(|(h, _)| h).unwrap_or(&hostport);
    assert!(
        host_only == "localhost" || host_only.starts_with("127.") || host_only == "[::1]",
        "refusing non-loopback target {hostport}"
    );
    let body = format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"stream":true}}"#
    );
    let c = c.max(1).min(n.max(1));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let wall0 = Instant::now();
    let results: Vec<One> = rt.block_on(async move {
        let next = Arc::new(AtomicUsize::new(0));
        let host = Arc::new(hostport.clone());
        let hostport = Arc::new(hostport);
        let path = Arc::new(path);
        let body = Arc::new(body);
        // Client key: the same one the harness gives every target (LiteLLM's master key).
        let key = Arc::new(std::env::var("BENCH_CLIENT_KEY").unwrap_or_else(|_| "sk-bench-client".to_string()));
        let mut handles = Vec::new();
        for _ in 0..c {
            let (next, host, hostport, path, body, key) = (next.clone(), host.clone(), hostport.clone(), path.clone(), body.clone(), key.clone());
            handles.push(tokio::spawn(async move {
                let mut out = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < n {
                    out.push(one(host.clone(), hostport.clone(), path.clone(), body.clone(), key.clone(), Duration::from_secs(to), gap).await);
                }
                out
            }));
        }
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.await.unwrap());
        }
        all
    });
    let wall_ms = wall0.elapsed().as_secs_f64() * 1e3;
    let ok: Vec<&One> = results.iter().filter(|r| r.ok).collect();
    let mut ttfb: Vec<f64> = ok.iter().map(|r| r.ttfb_ms).collect();
    let mut ttfc: Vec<f64> = ok.iter().map(|r| r.ttfc_ms).collect();
    let mut total: Vec<f64> = ok.iter().map(|r| r.total_ms).collect();
    let ev_min = ok.iter().map(|r| r.events).min().unwrap_or(0);
    let ev_max = ok.iter().map(|r| r.events).max().unwrap_or(0);
    let mut lags: Vec<f64> = ok.iter().flat_map(|r| r.lags_ms.iter().copied()).collect();
    let lag_json = if gap.is_some() && !lags.is_empty() {
        format!(
            ",\"lag_p50\":{:.3},\"lag_p99\":{:.3},\"lag_max\":{:.3},\"lag_over_1ms\":{}",
            pct(&mut lags, 50.0),
            pct(&mut lags, 99.0),
            pct(&mut lags, 100.0),
            lags.iter().filter(|&&l| l > 1.0).count()
        )
    } else {
        String::new()
    };
    let mut errs: Vec<String> = results.iter().filter_map(|r| r.err.clone()).collect();
    errs.sort();
    errs.dedup();
    let first_err = errs.first().cloned().unwrap_or_default().replace('"', "'");
    println!(
        "{{\"n\":{},\"concurrency\":{},\"ok\":{},\"errors\":{},\"first_error\":\"{}\",\"wall_ms\":{:.1},\"events_min\":{},\"events_max\":{},\
\"ttfb_p50\":{:.2},\"ttfb_p99\":{:.2},\"ttfc_p50\":{:.2},\"ttfc_p90\":{:.2},\"ttfc_p99\":{:.2},\"ttfc_max\":{:.2},\
\"total_p50\":{:.2},\"total_p90\":{:.2},\"total_p99\":{:.2},\"total_max\":{:.2}{}}}",
        n,
        c,
        ok.len(),
        results.len() - ok.len(),
        first_err,
        wall_ms,
        ev_min,
        ev_max,
        pct(&mut ttfb, 50.0),
        pct(&mut ttfb, 99.0),
        pct(&mut ttfc, 50.0),
        pct(&mut ttfc, 90.0),
        pct(&mut ttfc, 99.0),
        pct(&mut ttfc, 100.0),
        pct(&mut total, 50.0),
        pct(&mut total, 90.0),
        pct(&mut total, 99.0),
        pct(&mut total, 100.0),
        lag_json,
    );
}
