//! The shared backend, on PostgreSQL servers of the tests' own.

use std::time::{Duration, Instant};

use proxypal_ledger::testing::Postgres;
use proxypal_ledger::{Bucket, GroupBy, Ledger, LedgerConfig, Record, UsageQuery};

use crate::common::{
    NAMED_COLUMNS, as_stored, base_hour, bounded, check_aggregation, record, reference, traffic, varied,
    wait_for,
};

const LIMIT: Duration = Duration::from_secs(120);

/// A direct connection, for checking what is in the database.
async fn connect(pg: &Postgres) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

async fn count(pg: &Postgres) -> i64 {
    connect(pg).await.query_one("SELECT COUNT(*) FROM proxypal_ledger", &[]).await.unwrap().get(0)
}

fn fast(pg: &Postgres) -> LedgerConfig {
    LedgerConfig { flush_every: Duration::from_millis(50), ..LedgerConfig::postgres(pg.url()) }
}

/// Flushes until it succeeds (the server is coming back).
async fn flush_when_back(ledger: &Ledger) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = ledger.flush().await {
        assert!(Instant::now() < deadline, "still failing after 30 s: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_usage_by_client_and_model_per_hour_matches_the_records() {
    let Some(pg) = Postgres::new("postgres_usage") else { return };
    bounded(LIMIT, async {
        // Only full batches and flushes write (no tick), so the batch count is exact.
        let config = LedgerConfig { batch: 4, flush_every: Duration::from_secs(3600), ..LedgerConfig::postgres(pg.url()) };
        let ledger = Ledger::start(config).await.unwrap();
        assert_eq!(ledger.stats().backend, "postgres");
        let base = base_hour();
        for r in traffic(base) {
            ledger.record(r);
        }
        check_aggregation(&ledger, base).await;
        let stats = ledger.stats();
        assert_eq!((stats.written, stats.batches), (9, 3), "{stats:?}");
        // Every column arrives intact (names through the view that joins them).
        let row = connect(&pg)
            .await
            .query_one(
                "SELECT client, provider, upstream_model, key_label, status, attempts, ttfb_ms, total_ms, stream, \
                 error, cache_hit FROM proxypal_ledger_named WHERE status = 429",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, &str>(0), "bob");
        assert_eq!(row.get::<_, &str>(1), "openai");
        assert_eq!(row.get::<_, &str>(2), "gpt-4o-upstream");
        assert_eq!(row.get::<_, &str>(3), "bob-key");
        assert_eq!((row.get::<_, i32>(4), row.get::<_, i32>(5)), (429, 1));
        assert_eq!((row.get::<_, Option<i64>>(6), row.get::<_, i64>(7)), (Some(12), 34));
        assert!(!row.get::<_, bool>(8));
        assert_eq!(row.get::<_, Option<&str>>(9), Some("upstream_error"));
        assert!(!row.get::<_, bool>(10));
        ledger.shutdown().await.unwrap();
    })
    .await;
}

/// Every row, read back through the view that joins the names.
async fn read_back(pg: &Postgres) -> Vec<Record> {
    let rows = connect(pg)
        .await
        .query(&format!("SELECT {NAMED_COLUMNS} FROM proxypal_ledger_named ORDER BY at_ms"), &[])
        .await
        .unwrap();
    rows.iter()
        .map(|row| Record {
            at_ms: row.get(0),
            client: row.get::<_, String>(1).into(),
            model: row.get::<_, String>(2).into(),
            provider: row.get::<_, String>(3).into(),
            upstream_model: row.get::<_, String>(4).into(),
            key: row.get::<_, String>(5).into(),
            status: row.get::<_, i32>(6) as u16,
            attempts: row.get::<_, i32>(7) as u8,
            ttfb_ms: row.get::<_, Option<i64>>(8).map(|n| n as u32),
            total_ms: row.get::<_, i64>(9) as u32,
            stream: row.get(10),
            prompt_tokens: row.get::<_, Option<i64>>(11).map(|n| n as u64),
            completion_tokens: row.get::<_, Option<i64>>(12).map(|n| n as u64),
            total_tokens: row.get::<_, Option<i64>>(13).map(|n| n as u64),
            error: row.get::<_, Option<String>>(14).map(Into::into),
            cache_hit: row.get(15),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_rows_hold_name_ids_and_read_back_exactly() {
    let Some(pg) = Postgres::new("postgres_names") else { return };
    bounded(LIMIT, async {
        let base = base_hour();
        let mut records = varied(base, 300);
        // PostgreSQL text cannot hold NUL: stored (and grouped) as U+FFFD.
        records[5].client = "nul\0client".into();
        let ledger = Ledger::start(LedgerConfig { batch: 256, ..fast(&pg) }).await.unwrap();
        for r in &records {
            ledger.record(r.clone());
        }
        ledger.flush().await.unwrap();
        let mut expected = as_stored(&records);
        expected[5].client = "nul\u{fffd}client".into();
        assert_eq!(read_back(&pg).await, expected);
        let client = connect(&pg).await;
        let names: i64 =
            client.query_one("SELECT COUNT(*) FROM proxypal_ledger_names", &[]).await.unwrap().get(0);
        // 4 + 1 clients, 3 models, 2 providers, 3 upstream models, 7 keys, 1 + 60 errors.
        assert_eq!(names, 81);
        let query = UsageQuery {
            from_ms: base + 14_000,
            to_ms: i64::MAX,
            group_by: "client,model,provider,key".parse().unwrap(),
            bucket: Bucket::Hour,
            client: None,
        };
        assert_eq!(ledger.usage(&query).await.unwrap(), reference(&expected, &query));
        ledger.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_batch_larger_than_one_copy_message_reads_back_exactly() {
    let Some(pg) = Postgres::new("postgres_big_batch") else { return };
    bounded(LIMIT, async {
        // 9,000 rows of up to 148 bytes: sent as two COPY messages of one batch.
        let records = varied(base_hour(), 9_000);
        // No timed flush: the 9,000th record fills the batch.
        let config = LedgerConfig { batch: 9_000, flush_every: Duration::from_secs(60), ..fast(&pg) };
        let ledger = Ledger::start(config).await.unwrap();
        for r in &records {
            ledger.record(r.clone());
        }
        ledger.flush().await.unwrap();
        assert_eq!(ledger.stats().batches, 1, "one batch, one transaction");
        assert_eq!(read_back(&pg).await, as_stored(&records));
        ledger.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_ledgers_adding_the_same_new_names_at_once_agree_on_their_ids() {
    let Some(pg) = Postgres::new("postgres_name_race") else { return };
    bounded(LIMIT, async {
        let (a, b) = tokio::join!(Ledger::start(fast(&pg)), Ledger::start(fast(&pg)));
        let (a, b) = (a.unwrap(), b.unwrap());
        let base = base_hour();
        let mut all = Vec::new();
        for round in 0..20_i64 {
            // Both see the same new names in the same round, in opposite orders.
            let names: Vec<String> = (0..8).map(|i| format!("client-{round}-{i}")).collect();
            for (n, name) in names.iter().enumerate() {
                let at = base + round * 100 + n as i64;
                let ra = record(at, name, "gpt-4o", 200, Some((1, 1)));
                let rb = record(at, &names[names.len() - 1 - n], "gpt-4o", 200, Some((2, 2)));
                a.record(ra.clone());
                b.record(rb.clone());
                all.extend([ra, rb]);
            }
            let (fa, fb) = tokio::join!(a.flush(), b.flush());
            fa.unwrap();
            fb.unwrap();
        }
        let client = connect(&pg).await;
        let (names, distinct): (i64, i64) = client
            .query_one("SELECT COUNT(*), COUNT(DISTINCT name) FROM proxypal_ledger_names", &[])
            .await
            .map(|row| (row.get(0), row.get(1)))
            .unwrap();
        // 160 clients and their keys, plus gpt-4o, openai, gpt-4o-upstream.
        assert_eq!((names, distinct), (323, 323));
        assert_eq!(count(&pg).await, all.len() as i64);
        let query = UsageQuery {
            from_ms: base,
            to_ms: base + 10_000,
            group_by: "client,key".parse().unwrap(),
            bucket: Bucket::None,
            client: None,
        };
        let rows = a.usage(&query).await.unwrap();
        assert_eq!(rows, reference(&all, &query));
        assert!(rows.iter().all(|r| r.requests == 2 && r.total_tokens == 6), "{rows:#?}");
        for ledger in [a, b] {
            ledger.close().await.unwrap();
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_ledgers_starting_at_once_migrate_once_and_share_rows() {
    let Some(pg) = Postgres::new("postgres_migrations") else { return };
    bounded(LIMIT, async {
        let (a, b) = tokio::join!(Ledger::start(fast(&pg)), Ledger::start(fast(&pg)));
        let (a, b) = (a.unwrap(), b.unwrap());
        let c = Ledger::start(fast(&pg)).await.unwrap(); // and once more, later
        let versions: Vec<i32> = connect(&pg)
            .await
            .query("SELECT version FROM proxypal_ledger_migrations", &[])
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert_eq!(versions, vec![1, 2, 3]);

        let base = base_hour();
        a.record(record(base, "alice", "gpt-4o", 200, Some((1, 1))));
        b.record(record(base + 1, "bob", "gpt-4o", 200, Some((2, 2))));
        c.record(record(base + 2, "bob", "gpt-4o", 500, None));
        for ledger in [&a, &b, &c] {
            ledger.flush().await.unwrap();
        }
        let query = UsageQuery {
            from_ms: base,
            to_ms: base + 10,
            group_by: GroupBy { client: true, ..GroupBy::NONE },
            bucket: Bucket::None,
            client: None,
        };
        let rows = a.usage(&query).await.unwrap();
        let summary: Vec<_> =
            rows.iter().map(|r| (r.client.clone().unwrap(), r.requests, r.errors, r.total_tokens)).collect();
        assert_eq!(summary, vec![("alice".to_owned(), 1, 0, 2), ("bob".to_owned(), 2, 1, 4)]);
        for ledger in [a, b, c] {
            ledger.close().await.unwrap();
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_mid_run_buffers_records_and_writes_them_when_back() {
    let Some(mut pg) = Postgres::new("postgres_outage") else { return };
    bounded(LIMIT, async {
        let ledger = Ledger::start(fast(&pg)).await.unwrap();
        let base = base_hour();
        for i in 0..10 {
            ledger.record(record(base + i, "alice", "gpt-4o", 200, Some((1, 1))));
        }
        ledger.flush().await.unwrap();
        assert_eq!(ledger.stats().written, 10);

        pg.stop();
        let started = Instant::now();
        for i in 0..100 {
            let one = Instant::now();
            ledger.record(record(base + 100 + i, "bob", "llama", 200, Some((2, 3))));
            assert!(one.elapsed() < Duration::from_millis(50), "record() took {:?}", one.elapsed());
            assert_eq!(ledger.stats().pending, i as u64 + 1);
        }
        assert!(started.elapsed() < Duration::from_millis(500), "100 records took {:?}", started.elapsed());
        assert!(ledger.flush().await.is_err(), "flush must fail while PostgreSQL is down");
        let stats = ledger.stats();
        assert!(!stats.up, "{stats:?}");
        assert_eq!((stats.pending, stats.written, stats.dropped), (100, 10, 0), "{stats:?}");
        assert!(stats.write_failures >= 1, "{stats:?}");
        // Still down a little later: the writer keeps retrying, nothing is lost.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(ledger.stats().pending, 100);

        pg.start();
        // The writer reconnects on its own; no flush needed for that.
        wait_for("the writer reconnects and writes the backlog", Duration::from_secs(30), async || {
            ledger.stats().written == 110
        })
        .await;
        flush_when_back(&ledger).await;
        let stats = ledger.stats();
        assert!(stats.up, "{stats:?}");
        assert_eq!(
            (stats.pending, stats.written, stats.dropped, stats.rejected),
            (0, 110, 0, 0),
            "{stats:?}"
        );
        assert_eq!(count(&pg).await, 110, "every record once");
        let total = ledger
            .usage(&UsageQuery {
                from_ms: base,
                to_ms: base + 1_000,
                group_by: GroupBy::NONE,
                bucket: Bucket::None,
                client: Some("bob".into()),
            })
            .await
            .unwrap();
        assert_eq!((total[0].requests, total[0].total_tokens), (100, 500));
        ledger.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_full_buffer_drops_and_counts_then_writes_the_rest() {
    let Some(mut pg) = Postgres::new("postgres_overflow") else { return };
    bounded(LIMIT, async {
        let config = LedgerConfig { buffer: 10, ..fast(&pg) };
        let ledger = Ledger::start(config).await.unwrap();
        pg.stop();
        let base = base_hour();
        for i in 0..25 {
            ledger.record(record(base + i, "alice", "gpt-4o", 200, None));
        }
        let stats = ledger.stats();
        assert_eq!((stats.pending, stats.dropped, stats.written), (10, 15, 0), "{stats:?}");

        pg.start();
        flush_when_back(&ledger).await;
        let stats = ledger.stats();
        assert_eq!((stats.pending, stats.dropped, stats.written), (0, 15, 10), "{stats:?}");
        let rows =
            connect(&pg).await.query("SELECT at_ms FROM proxypal_ledger ORDER BY at_ms", &[]).await.unwrap();
        let kept: Vec<i64> = rows.iter().map(|row| row.get::<_, i64>(0) - base).collect();
        assert_eq!(kept, (0..10).collect::<Vec<i64>>(), "the first ten are kept, later ones dropped");
        ledger.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_retention_prunes_old_rows() {
    let Some(pg) = Postgres::new("postgres_retention") else { return };
    bounded(LIMIT, async {
        let config = LedgerConfig { retention: Duration::from_secs(24 * 3600), ..fast(&pg) };
        let ledger = Ledger::start(config).await.unwrap();
        // A pass now: the next scheduled one is an hour away, so the count
        // below is this test's alone.
        assert_eq!(ledger.prune_now().await.unwrap(), 0);
        let now = jiff::Timestamp::now().as_millisecond();
        ledger.record(record(now - 2 * 86_400_000, "alice", "gpt-4o", 200, None));
        ledger.record(record(now - 1_000, "alice", "gpt-4o", 200, None));
        ledger.flush().await.unwrap();
        assert_eq!(ledger.prune_now().await.unwrap(), 1);
        assert_eq!(count(&pg).await, 1);
        ledger.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_shutdown_while_down_reports_the_lost_records() {
    let Some(mut pg) = Postgres::new("postgres_shutdown_down") else { return };
    bounded(LIMIT, async {
        let ledger = Ledger::start(fast(&pg)).await.unwrap();
        pg.stop();
        for i in 0..3 {
            ledger.record(record(base_hour() + i, "alice", "gpt-4o", 200, None));
        }
        let started = Instant::now();
        let error = ledger.shutdown().await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(10), "shutdown took {:?}", started.elapsed());
        assert!(matches!(error, proxypal_ledger::LedgerError::Lost { records: 3, .. }), "{error:?}");
        let stats = ledger.stats();
        assert_eq!((stats.pending, stats.dropped), (0, 3), "{stats:?}");
    })
    .await;
}

/// Retention deletes whole pages in chunks (`PRUNE_CHUNK`, 64 pages): a
/// pass over more old pages than two chunks takes them all, and keeps the
/// recent one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_retention_takes_every_old_page_in_chunks() {
    let Some(pg) = Postgres::new("postgres_retention_chunks") else { return };
    bounded(LIMIT, async {
        let config = LedgerConfig { retention: Duration::from_secs(24 * 3600), batch: 1, ..fast(&pg) };
        let ledger = Ledger::start(config).await.unwrap();
        assert_eq!(ledger.prune_now().await.unwrap(), 0);
        let now = jiff::Timestamp::now().as_millisecond();
        for i in 0..150 {
            ledger.record(record(now - 2 * 86_400_000 + i, "alice", "gpt-4o", 200, None));
        }
        ledger.record(record(now - 1_000, "alice", "gpt-4o", 200, None));
        ledger.flush().await.unwrap();
        let pages = async || -> i64 {
            connect(&pg)
                .await
                .query_one("SELECT COUNT(*) FROM proxypal_ledger_pages", &[])
                .await
                .unwrap()
                .get(0)
        };
        assert_eq!(pages().await, 151);
        assert_eq!(ledger.prune_now().await.unwrap(), 150);
        assert_eq!((pages().await, count(&pg).await), (1, 1));
        ledger.shutdown().await.unwrap();
    })
    .await;
}
