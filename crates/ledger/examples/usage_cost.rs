//! How long `/usage` takes over a ledger that already holds records
//! (written by `write_cost`, say):
//!
//! ```text
//! cargo build --profile bench -p proxypal-ledger --example write_cost --example usage_cost
//! target/release/examples/write_cost sqlite /tmp/ledger.db 1000000
//! target/release/examples/usage_cost sqlite /tmp/ledger.db
//! ```
//!
//! Runs three aggregations over every record (a total; per client and
//! model by hour; per key by day), each three times, and prints the best
//! time of each with the number of records it counted.

use std::error::Error;
use std::time::{Duration, Instant};

use proxypal_ledger::{Bucket, GroupBy, Ledger, LedgerConfig, UsageQuery};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let config = match args.as_slice() {
        [_, backend, path] if backend == "sqlite" => LedgerConfig::sqlite(path),
        [_, backend, url] if backend == "postgres" => LedgerConfig::postgres(url.as_str()),
        _ => return Err("usage: usage_cost (sqlite PATH | postgres URL)".into()),
    };
    let ledger = Ledger::start(config).await?;
    for (group_by, bucket) in [
        (GroupBy::NONE, Bucket::None),
        ("client,model".parse()?, Bucket::Hour),
        ("key".parse()?, Bucket::Day),
    ] {
        let query = UsageQuery { from_ms: 0, to_ms: i64::MAX, group_by, bucket, client: None };
        let mut best = Duration::MAX;
        let mut counted = 0;
        for _ in 0..3 {
            let started = Instant::now();
            let rows = ledger.usage(&query).await?;
            best = best.min(started.elapsed());
            counted = rows.iter().map(|row| row.requests).sum::<u64>();
            if rows.is_empty() {
                break;
            }
        }
        let (group_by, bucket) = (group_by.to_string(), bucket.to_string());
        println!("group_by={group_by:<12} bucket={bucket:<5} {counted} records in {best:.2?}");
    }
    ledger.shutdown().await?;
    Ok(())
}
