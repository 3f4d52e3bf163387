//! Records, a reference aggregation, temp dirs and bounded waits.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use proxypal_ledger::{Bucket, GroupBy, Ledger, Record, UsageQuery, UsageRow};

pub const HOUR_MS: i64 = 3_600_000;

/// Runs `test` and fails it if it takes longer than `limit`.
pub async fn bounded<T>(limit: Duration, test: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, test).await.unwrap_or_else(|_| panic!("test did not finish within {limit:?}"))
}

/// Polls `ready` every 20 ms until it holds; panics after `limit` naming `what`.
pub async fn wait_for(what: &str, limit: Duration, mut ready: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !ready().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Start of the hour three hours ago: recent enough for any retention.
pub fn base_hour() -> i64 {
    let now = jiff::Timestamp::now().as_millisecond();
    now - now % HOUR_MS - 3 * HOUR_MS
}

pub fn record(at_ms: i64, client: &str, model: &str, status: u16, tokens: Option<(u64, u64)>) -> Record {
    Record {
        at_ms,
        client: client.into(),
        model: model.into(),
        provider: if model.starts_with("gpt") { "openai" } else { "nvidia" }.into(),
        upstream_model: format!("{model}-upstream").into(),
        key: format!("{client}-key").into(),
        status,
        attempts: 1,
        ttfb_ms: Some(12),
        total_ms: 34,
        stream: status == 200,
        prompt_tokens: tokens.map(|(p, _)| p),
        completion_tokens: tokens.map(|(_, c)| c),
        total_tokens: tokens.map(|(p, c)| p + c),
        error: (status >= 400).then(|| "upstream_error".into()),
        cache_hit: false,
    }
}

/// Three hours of mixed traffic: two clients, two models, errors, records
/// without token counts, and records on both sides of hour edges.
pub fn traffic(base: i64) -> Vec<Record> {
    vec![
        record(base, "alice", "gpt-4o", 200, Some((10, 5))),
        record(base + 59 * 60_000, "alice", "gpt-4o", 200, Some((10, 5))),
        record(base + 1_000, "alice", "llama", 500, None),
        record(base + 2_000, "bob", "gpt-4o", 429, Some((10, 0))),
        record(base + HOUR_MS - 1, "bob", "llama", 200, Some((7, 3))),
        record(base + HOUR_MS, "alice", "gpt-4o", 200, Some((1, 2))),
        record(base + HOUR_MS + 5, "bob", "llama", 200, Some((100, 200))),
        record(base + 2 * HOUR_MS - 1, "bob", "llama", 503, Some((1, 0))),
        record(base + 2 * HOUR_MS + 30_000, "carol, \"the\" admin", "gpt-4o", 200, Some((3, 4))),
    ]
}

/// `n` records that vary every column, `None`s included, over names that
/// repeat (clients, models, keys) and names seen once (`unique-<i>` errors):
/// enough to fill multi-row statements and leave a remainder.
pub fn varied(base: i64, n: u64) -> Vec<Record> {
    (0..n)
        .map(|i| {
            let model = ["gpt-4o", "llama", "deepseek-r1"][(i % 3) as usize];
            let mut r = record(
                base + i as i64 * 1_000,
                ["alice", "bob", "carol, \"the\" admin", ""][(i % 4) as usize],
                model,
                200,
                None,
            );
            r.key = format!("key-{}", i % 7).into();
            r.status = [200, 429, 500, 201][(i % 4) as usize];
            r.attempts = (i % 5) as u8;
            r.ttfb_ms = (i % 6 != 0).then_some(i as u32);
            r.total_ms = 10 * i as u32;
            r.stream = i % 2 == 0;
            r.prompt_tokens = (i % 3 != 0).then_some(i);
            r.completion_tokens = (i % 5 != 0).then_some(2 * i);
            // Record 13's is clamped to i64::MAX when stored (and would
            // overflow any sum: aggregate from record 14 on).
            r.total_tokens = (i % 7 != 0).then_some(if i == 13 { u64::MAX } else { 3 * i });
            r.error = match i % 10 {
                0..=5 => None,
                6 | 7 => Some("rate_limited".into()),
                _ => Some(format!("unique-{i}").into()),
            };
            r.cache_hit = i % 9 == 0;
            r
        })
        .collect()
}

/// What `varied` records read back as: tokens beyond `i64::MAX` saturate.
pub fn as_stored(records: &[Record]) -> Vec<Record> {
    let clamp = |n: Option<u64>| n.map(|n| n.min(i64::MAX as u64));
    records
        .iter()
        .map(|r| Record {
            prompt_tokens: clamp(r.prompt_tokens),
            completion_tokens: clamp(r.completion_tokens),
            total_tokens: clamp(r.total_tokens),
            ..r.clone()
        })
        .collect()
}

/// The columns of the `proxypal_ledger_named` view, in [`Record`] order.
pub const NAMED_COLUMNS: &str = "at_ms, client, model, provider, upstream_model, key_label, status, attempts, \
    ttfb_ms, total_ms, stream, prompt_tokens, completion_tokens, total_tokens, error, cache_hit";

/// What `usage` must answer, computed naively in memory.
pub fn reference(records: &[Record], query: &UsageQuery) -> Vec<UsageRow> {
    let size = match query.bucket {
        Bucket::Hour => Some(HOUR_MS),
        Bucket::Day => Some(24 * HOUR_MS),
        Bucket::None => None,
    };
    let g = query.group_by;
    let mut rows: BTreeMap<_, UsageRow> = BTreeMap::new();
    for r in records {
        if r.at_ms < query.from_ms
            || r.at_ms >= query.to_ms
            || query.client.as_ref().is_some_and(|c| **c != *r.client)
        {
            continue;
        }
        let bucket = size.map(|s| r.at_ms.div_euclid(s) * s);
        let pick = |on: bool, v: &str| on.then(|| v.to_owned());
        let key = (
            bucket,
            pick(g.client, &r.client),
            pick(g.model, &r.model),
            pick(g.provider, &r.provider),
            pick(g.key, &r.key),
        );
        let row = rows.entry(key.clone()).or_insert_with(|| UsageRow {
            bucket: bucket.map(|ms| jiff::Timestamp::from_millisecond(ms).unwrap().to_string()),
            client: key.1,
            model: key.2,
            provider: key.3,
            key: key.4,
            ..UsageRow::default()
        });
        row.requests += 1;
        row.errors += u64::from(r.status >= 400);
        row.prompt_tokens += r.prompt_tokens.unwrap_or(0);
        row.completion_tokens += r.completion_tokens.unwrap_or(0);
        row.total_tokens += r.total_tokens.unwrap_or(0);
    }
    rows.into_values().collect()
}

/// The aggregation checks both backends must pass: `ledger` holds exactly
/// `traffic(base)`.
pub async fn check_aggregation(ledger: &Ledger, base: i64) {
    let records = traffic(base);
    let by_hour = UsageQuery {
        from_ms: base,
        to_ms: base + 3 * HOUR_MS,
        group_by: "client,model".parse().unwrap(),
        bucket: Bucket::Hour,
        client: None,
    };
    let rows = ledger.usage(&by_hour).await.unwrap();
    assert_eq!(rows, reference(&records, &by_hour));
    // The reference itself, pinned on a few rows.
    let first = &rows[0];
    let hour0 = jiff::Timestamp::from_millisecond(base).unwrap().to_string();
    assert_eq!(first.bucket.as_deref(), Some(hour0.as_str()));
    assert!(hour0.ends_with(":00:00Z"), "{hour0}");
    assert_eq!(
        (first.client.as_deref(), first.model.as_deref(), first.provider.as_deref(), first.key.as_deref()),
        (Some("alice"), Some("gpt-4o"), None, None)
    );
    assert_eq!(
        (first.requests, first.errors, first.prompt_tokens, first.completion_tokens, first.total_tokens),
        (2, 0, 20, 10, 30)
    );
    assert_eq!(rows.len(), 7, "{rows:#?}");
    let bob_llama_hour1 = rows
        .iter()
        .find(|r| {
            r.client.as_deref() == Some("bob") && r.model.as_deref() == Some("llama") && r.requests == 2
        })
        .unwrap();
    assert_eq!((bob_llama_hour1.errors, bob_llama_hour1.total_tokens), (1, 301));

    // The range end is exclusive, the start inclusive.
    let first_hour = UsageQuery { to_ms: base + HOUR_MS, ..by_hour.clone() };
    assert_eq!(ledger.usage(&first_hour).await.unwrap(), reference(&records, &first_hour));

    // A client's own view.
    let bob = UsageQuery { client: Some("bob".into()), ..by_hour.clone() };
    let rows = ledger.usage(&bob).await.unwrap();
    assert!(!rows.is_empty() && rows.iter().all(|r| r.client.as_deref() == Some("bob")), "{rows:#?}");
    assert_eq!(rows, reference(&records, &bob));
    let bob_total = UsageQuery { group_by: GroupBy::NONE, bucket: Bucket::None, ..bob.clone() };
    let total = ledger.usage(&bob_total).await.unwrap();
    assert_eq!(total, reference(&records, &bob_total));
    assert_eq!((total[0].requests, total[0].errors, total[0].total_tokens), (4, 2, 321));
    // A client without records (no name id at all): nothing, or one zero total.
    let ghost = UsageQuery { client: Some("ghost".into()), ..by_hour.clone() };
    assert_eq!(ledger.usage(&ghost).await.unwrap(), vec![]);
    let ghost_total = UsageQuery { client: Some("ghost".into()), ..bob_total.clone() };
    assert_eq!(ledger.usage(&ghost_total).await.unwrap(), vec![UsageRow::default()]);

    // Other groupings and buckets.
    for (group, bucket) in
        [("provider,key", "day"), ("", "none"), ("key", "hour"), ("client,model,provider,key", "none")]
    {
        let query = UsageQuery {
            group_by: group.parse().unwrap(),
            bucket: bucket.parse().unwrap(),
            ..by_hour.clone()
        };
        assert_eq!(ledger.usage(&query).await.unwrap(), reference(&records, &query), "{group} per {bucket}");
    }

    // An empty range: no groups, or one zero total.
    let empty = UsageQuery { from_ms: base - 10 * HOUR_MS, to_ms: base - 9 * HOUR_MS, ..by_hour.clone() };
    assert_eq!(ledger.usage(&empty).await.unwrap(), vec![]);
    let empty_total = UsageQuery { group_by: GroupBy::NONE, bucket: Bucket::None, ..empty };
    assert_eq!(ledger.usage(&empty_total).await.unwrap(), vec![UsageRow::default()]);
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "proxypal-ledger-test-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
