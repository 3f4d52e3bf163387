//! What writing a row costs: records `N` synthetic requests through
//! [`Ledger`] and waits until they are written.
//!
//! ```text
//! cargo build --profile bench -p proxypal-ledger --example write_cost
//! # SQLite: the writer thread's instructions (callgrind.out.<pid>-02) / N
//! valgrind --tool=callgrind --separate-threads=yes \
//!     target/release/examples/write_cost sqlite /tmp/ledger.db 200000
//! # PostgreSQL: the server's CPU per row, from /proc (DROPS the ledger's tables first)
//! target/release/examples/write_cost postgres postgres://postgres@127.0.0.1:5432/test 200000
//! ```
//!
//! The records look like a busy proxy's: a handful of clients and models,
//! 100 keys, one failure in twenty, in random order. A fourth argument,
//! `uniform`, makes them look like `benches/ledger.sh`'s load instead: one
//! client and one model over 100 keys in turn. `BATCH=n` sets the records
//! per batch.
//!
//! For PostgreSQL the server's CPU is the sum of `utime + stime` over every
//! `postgres` process in `/proc` (the backend, the WAL writer, the
//! checkpointer, …) from the first record to the end of the flush; run it
//! on a quiet server.

use std::borrow::Cow;
use std::error::Error;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proxypal_ledger::{Ledger, LedgerConfig, Record};

const CLIENTS: [&str; 6] = ["alice", "bob", "carol", "dave", "ci-runner", "anonymous"];
const MODELS: [(&str, &str, &str); 4] = [
    ("llama-3.3-70b", "nvidia", "meta/llama-3.3-70b-instruct"),
    ("gpt-4o", "openai", "gpt-4o-2024-08-06"),
    ("deepseek-r1", "nvidia", "deepseek-ai/deepseek-r1"),
    ("mixtral-8x22b", "nvidia", "mistralai/mixtral-8x22b-instruct-v0.1"),
];

/// Every name a record can carry, made once and shared, as the proxy does
/// (`Arc<str>`: a record clones a pointer, the writer frees nothing).
struct Names {
    clients: Vec<Arc<str>>,
    models: Vec<[Arc<str>; 3]>,
    /// Per model's provider, 100 keys.
    keys: Vec<Vec<Arc<str>>>,
}

impl Names {
    fn new() -> Self {
        Self {
            clients: CLIENTS.iter().map(|&c| Arc::from(c)).collect(),
            models: MODELS.iter().map(|&(m, p, u)| [m, p, u].map(Arc::from)).collect(),
            keys: MODELS
                .iter()
                .map(|&(_, provider, _)| {
                    (0..100u64)
                        .map(|key| Arc::from(format!("{provider}-key-{key:02} (nvapi-…{:04x})", key * 331)))
                        .collect()
                })
                .collect(),
        }
    }
}

/// The `i`th synthetic record (deterministic).
fn record(names: &Names, base: i64, i: u64, uniform: bool) -> Record {
    // A cheap mix so the columns do not move in lockstep.
    let h = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
    let m = if uniform { 0 } else { (h % 4) as usize };
    let [model, provider, upstream_model] = names.models[m].clone();
    let client = Arc::clone(&names.clients[if uniform { 0 } else { ((h >> 3) % 6) as usize }]);
    let key = if uniform { i % 100 } else { (h >> 7) % 100 };
    let failed = h % 20 == 7;
    let stream = !h.is_multiple_of(3);
    Record {
        at_ms: base + (i as i64) * 7,
        client,
        model,
        provider,
        upstream_model,
        key: Arc::clone(&names.keys[m][key as usize]),
        status: if failed { 429 } else { 200 },
        attempts: 1 + u8::from(failed),
        ttfb_ms: (!failed).then_some((h % 900) as u32 + 20),
        total_ms: (h % 5_000) as u32 + 40,
        stream,
        prompt_tokens: (!failed).then_some(h % 4_000 + 10),
        completion_tokens: (!failed).then_some(h % 1_000 + 1),
        total_tokens: (!failed).then_some(h % 4_000 + h % 1_000 + 11),
        error: failed.then_some(Cow::Borrowed("rate_limited")),
        cache_hit: false,
    }
}

/// Clock ticks of CPU (user + system) used so far by every `postgres` process.
fn postgres_cpu_ticks() -> Result<u64, Box<dyn Error>> {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc")? {
        let path = entry?.path();
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else { continue };
        // pid (comm) state ppid … ; comm may hold spaces, so split after the last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else { continue };
        if !head.ends_with("(postgres") {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After "comm": state is field 3 of stat(5), so utime (14) and stime (15) are at 11 and 12.
        let (Some(utime), Some(stime)) = (fields.get(11), fields.get(12)) else { continue };
        total += utime.parse::<u64>()? + stime.parse::<u64>()?;
    }
    Ok(total)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let (backend, target, n, uniform) = match args.as_slice() {
        [_, backend, target, n] => (backend, target, n, false),
        [_, backend, target, n, names] if names == "uniform" => (backend, target, n, true),
        _ => return Err("usage: write_cost (sqlite PATH | postgres URL) N [uniform]".into()),
    };
    let n: u64 = n.parse()?;
    let mut config = match backend.as_str() {
        "sqlite" => {
            let _ = std::fs::remove_file(target);
            let _ = std::fs::remove_file(format!("{target}-wal"));
            let _ = std::fs::remove_file(format!("{target}-shm"));
            LedgerConfig::sqlite(target)
        }
        "postgres" => {
            let (client, connection) = tokio_postgres::connect(target, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            client
                .batch_execute(concat!(include_str!("../../../benches/ledger-reset.sql"), "; CHECKPOINT"))
                .await?;
            LedgerConfig::postgres(target.as_str())
        }
        other => return Err(format!("unknown backend {other:?}").into()),
    };
    // Room for every record: this measures writing, not dropping.
    config.buffer = usize::try_from(n)? + 1;
    config.flush_every = Duration::from_millis(50);
    // Records per batch (one transaction, one page), default LedgerConfig's.
    if let Ok(batch) = std::env::var("BATCH") {
        config.batch = batch.parse()?;
    }
    let ledger = Ledger::start(config).await?;
    let base = jiff::Timestamp::now().as_millisecond() - 3_600_000;
    let names = Names::new();
    // Warm up (statements prepared, names seen) outside the measurement.
    ledger.record(record(&names, base, 0, uniform));
    ledger.flush().await?;

    let cpu_before = if backend == "postgres" { postgres_cpu_ticks()? } else { 0 };
    let started = Instant::now();
    for i in 1..=n {
        ledger.record(record(&names, base, i, uniform));
        if i % 4_096 == 0 {
            // Let the writer run now and then, as a real proxy's would.
            tokio::task::yield_now().await;
        }
    }
    ledger.flush().await?;
    let elapsed = started.elapsed();
    let stats = ledger.stats();
    println!("{n} records in {elapsed:.2?}; {stats:?}");
    if backend == "postgres" {
        let ticks = postgres_cpu_ticks()? - cpu_before;
        // USER_HZ is 100 on Linux (getconf CLK_TCK).
        let seconds = ticks as f64 / 100.0;
        println!("postgres processes: {seconds:.2} s CPU, {:.2} µs per row", seconds * 1e6 / n as f64);
    }
    ledger.shutdown().await?;
    if stats.written != n + 1 || stats.dropped != 0 {
        return Err(format!("expected {} written, none dropped: {stats:?}", n + 1).into());
    }
    Ok(())
}
