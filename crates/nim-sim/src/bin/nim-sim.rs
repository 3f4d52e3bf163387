//! `nim-sim`: run the simulated NVIDIA NIM server standalone (benchmarks,
//! manual testing). Prints `listening on ADDR` to stderr and runs until
//! SIGINT/SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use proxypal_nim_sim::{SimConfig, SimDialect, SimRateLimit, SimServer};

/// A simulated NVIDIA NIM (build.nvidia.com) OpenAI-compatible API server.
#[derive(Debug, Parser)]
#[command(name = "nim-sim", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18000")]
    listen: SocketAddr,
    /// Accepted keys, comma separated (empty: accept any key).
    #[arg(long, value_delimiter = ',')]
    keys: Vec<String>,
    /// Keys answered with 403, comma separated.
    #[arg(long, value_delimiter = ',')]
    forbidden_keys: Vec<String>,
    /// Benchmark mode: no delays, no rate limit, no recording (other flags
    /// still override).
    #[arg(long)]
    fast: bool,
    /// Per-key token bucket refill rate (requests per minute).
    #[arg(long, conflicts_with = "window_limit")]
    rpm: Option<u32>,
    /// Token bucket capacity (default: the --rpm value).
    #[arg(long, requires = "rpm")]
    burst: Option<u32>,
    /// Per-key exact rolling-window limit (requests per --window).
    #[arg(long)]
    window_limit: Option<u32>,
    /// Rolling window length, e.g. 60s, 1500ms, 2m.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    window: Duration,
    /// Extra per-account fixed-window cap (requests per --fixed-period,
    /// reset at every multiple of the period since start).
    #[arg(long)]
    fixed_limit: Option<u64>,
    /// Fixed-window period, e.g. 1440m (a day), 60s.
    #[arg(long, default_value = "1440m", value_parser = parse_duration)]
    fixed_period: Duration,
    /// Per-account token limit (total tokens per --token-window).
    #[arg(long)]
    token_limit: Option<u64>,
    /// Token limit rolling window, e.g. 60s.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    token_window: Duration,
    /// Fixed `completion_tokens` of every chat completion.
    #[arg(long)]
    completion_tokens: Option<u64>,
    /// Per-account maximum of requests in flight (open streams included).
    #[arg(long)]
    max_concurrent: Option<usize>,
    /// Send OpenAI-style `x-ratelimit-*` headers on POST answers.
    #[arg(long)]
    limit_headers: bool,
    /// Milliseconds between accepting a request and answering it.
    #[arg(long)]
    processing_delay_ms: Option<u64>,
    /// Send `Retry-After` on 429 (e.g. 5s); NVIDIA sends none.
    #[arg(long, value_parser = parse_duration)]
    retry_after: Option<Duration>,
    /// Content chunks per streamed completion.
    #[arg(long)]
    chunks: Option<usize>,
    /// Milliseconds between streamed chunks.
    #[arg(long)]
    chunk_interval_ms: Option<u64>,
    /// Milliseconds before the first streamed chunk.
    #[arg(long)]
    first_chunk_delay_ms: Option<u64>,
    /// Milliseconds before response headers.
    #[arg(long)]
    response_delay_ms: Option<u64>,
    /// Which provider to play: how limits are announced and 429s worded
    /// (nvidia, groq, cerebras, openrouter, gemini).
    #[arg(long, default_value = "nvidia", value_parser = parse_dialect)]
    dialect: SimDialect,
    /// Serve requests without a key (a local server without auth).
    #[arg(long)]
    anonymous: bool,
}

fn parse_dialect(s: &str) -> Result<SimDialect, String> {
    Ok(match s {
        "nvidia" => SimDialect::Nvidia,
        "groq" => SimDialect::Groq,
        "cerebras" => SimDialect::Cerebras,
        "openrouter" => SimDialect::OpenRouter,
        "gemini" => SimDialect::Gemini,
        other => {
            return Err(format!("unknown dialect {other:?}: nvidia, groq, cerebras, openrouter or gemini"));
        }
    })
}

/// Parses `150ms`, `2s`, `1m`, or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}: expected e.g. 60s, 1500ms, 2m"))?;
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        other => Err(format!("unknown duration unit {other:?} (use ms, s or m)")),
    }
}

fn config(args: &Args) -> SimConfig {
    let mut cfg = if args.fast { SimConfig::fast() } else { SimConfig::default() };
    cfg.keys.clone_from(&args.keys);
    cfg.forbidden_keys.clone_from(&args.forbidden_keys);
    if let Some(per_minute) = args.rpm {
        cfg.rate_limit =
            Some(SimRateLimit::TokenBucket { per_minute, burst: args.burst.unwrap_or(per_minute) });
    }
    if let Some(limit) = args.window_limit {
        cfg.rate_limit = Some(SimRateLimit::RollingWindow { limit, window: args.window });
    }
    if let Some(limit) = args.fixed_limit {
        cfg.extra_limits.push(SimRateLimit::FixedWindow { limit, period: args.fixed_period });
    }
    cfg.token_limit = args.token_limit.map(|limit| (limit, args.token_window));
    cfg.completion_tokens = args.completion_tokens;
    cfg.max_concurrent = args.max_concurrent;
    cfg.limit_headers = args.limit_headers;
    cfg.dialect = args.dialect;
    cfg.anonymous = args.anonymous;
    if let Some(ms) = args.processing_delay_ms {
        cfg.processing_delay = Duration::from_millis(ms);
    }
    cfg.retry_after = args.retry_after;
    if let Some(n) = args.chunks {
        cfg.stream_chunks = n;
    }
    if let Some(ms) = args.chunk_interval_ms {
        cfg.chunk_interval = Duration::from_millis(ms);
    }
    if let Some(ms) = args.first_chunk_delay_ms {
        cfg.first_chunk_delay = Duration::from_millis(ms);
    }
    if let Some(ms) = args.response_delay_ms {
        cfg.response_delay = Duration::from_millis(ms);
    }
    cfg
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let handle = match SimServer::start_on(args.listen, config(&args)) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("nim-sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("listening on {}", handle.addr());
    wait_for_signal().await;
    let stats = handle.stats();
    eprintln!(
        "nim-sim: shutting down after {} requests ({} ok, {} rate limited)",
        stats.total_requests,
        stats.total_ok(),
        stats.total_rate_limited()
    );
    handle.shutdown().await;
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn flags_map_to_config() {
        let args = Args::parse_from([
            "nim-sim",
            "--keys",
            "a,b",
            "--window-limit",
            "40",
            "--window",
            "61s",
            "--chunks",
            "3",
        ]);
        let cfg = config(&args);
        assert_eq!(cfg.keys, vec!["a", "b"]);
        assert_eq!(
            cfg.rate_limit,
            Some(SimRateLimit::RollingWindow { limit: 40, window: Duration::from_secs(61) })
        );
        assert_eq!(cfg.stream_chunks, 3);
        let args =
            Args::parse_from(["nim-sim", "--fast", "--rpm", "40", "--dialect", "gemini", "--anonymous"]);
        assert_eq!(config(&args).dialect, SimDialect::Gemini);
        assert!(config(&args).anonymous);
        assert!(Args::try_parse_from(["nim-sim", "--dialect", "bedrock"]).is_err());
        let cfg = config(&args);
        assert_eq!(cfg.rate_limit, Some(SimRateLimit::TokenBucket { per_minute: 40, burst: 40 }));
        assert!(!cfg.record_accepts);
        assert!(cfg.extra_limits.is_empty());
        assert_eq!((cfg.token_limit, cfg.max_concurrent, cfg.limit_headers), (None, None, false));
    }

    #[test]
    fn limit_mode_flags_map_to_config() {
        let args = Args::parse_from([
            "nim-sim",
            "--fixed-limit",
            "1000",
            "--token-limit",
            "6000",
            "--token-window",
            "30s",
            "--completion-tokens",
            "50",
            "--max-concurrent",
            "4",
            "--limit-headers",
            "--processing-delay-ms",
            "25",
        ]);
        let cfg = config(&args);
        assert_eq!(
            cfg.extra_limits,
            vec![SimRateLimit::FixedWindow { limit: 1000, period: Duration::from_secs(86_400) }]
        );
        assert_eq!(cfg.token_limit, Some((6000, Duration::from_secs(30))));
        assert_eq!(cfg.completion_tokens, Some(50));
        assert_eq!(cfg.max_concurrent, Some(4));
        assert!(cfg.limit_headers);
        assert_eq!(cfg.processing_delay, Duration::from_millis(25));
    }
}
