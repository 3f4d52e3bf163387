//! The embedded backend, on files of the tests' own.

use std::time::{Duration, Instant};

use proxypal_ledger::{Bucket, GroupBy, Ledger, LedgerConfig, LedgerError, UsageQuery, to_csv};

use proxypal_ledger::Record;

use crate::common::{
    HOUR_MS, NAMED_COLUMNS, TempDir, as_stored, base_hour, bounded, check_aggregation, record, reference,
    traffic, varied, wait_for,
};

const LIMIT: Duration = Duration::from_secs(30);

/// A config that writes only when a batch fills up or on `flush`.
fn manual(path: &std::path::Path, batch: usize) -> LedgerConfig {
    LedgerConfig { batch, flush_every: Duration::from_secs(3600), ..LedgerConfig::sqlite(path) }
}

fn count(path: &std::path::Path) -> i64 {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row("SELECT COUNT(*) FROM proxypal_ledger", [], |row| row.get(0)).unwrap()
}

#[tokio::test]
async fn sqlite_writes_full_batches_as_they_fill_and_the_rest_on_flush() {
    bounded(LIMIT, async {
        let dir = TempDir::new("batches");
        let ledger = Ledger::start(manual(&dir.file("ledger.db"), 10)).await.unwrap();
        let base = base_hour();
        for i in 0..35 {
            ledger.record(record(base + i, "alice", "gpt-4o", 200, Some((1, 1))));
        }
        // Three full batches go without a flush.
        wait_for("three full batches written", LIMIT, async || ledger.stats().written == 30).await;
        assert_eq!(ledger.stats().pending, 5);
        ledger.flush().await.unwrap();
        let stats = ledger.stats();
        assert_eq!((stats.written, stats.batches, stats.pending, stats.dropped), (35, 4, 0, 0), "{stats:?}");
        assert!(stats.up);
        assert_eq!(stats.backend, "sqlite");
        assert_eq!(count(&dir.file("ledger.db")), 35);
        ledger.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn sqlite_flushes_on_its_own_every_flush_every() {
    bounded(LIMIT, async {
        let dir = TempDir::new("tick");
        let config =
            LedgerConfig { flush_every: Duration::from_millis(50), ..LedgerConfig::sqlite(dir.file("l.db")) };
        let ledger = Ledger::start(config).await.unwrap();
        ledger.record(record(base_hour(), "alice", "gpt-4o", 200, None));
        wait_for("the tick writes a partial batch", LIMIT, async || ledger.stats().written == 1).await;
        ledger.close().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn sqlite_usage_by_client_and_model_per_hour_matches_the_records() {
    bounded(LIMIT, async {
        let dir = TempDir::new("usage");
        let ledger = Ledger::start(manual(&dir.file("ledger.db"), 4)).await.unwrap();
        let base = base_hour();
        for r in traffic(base) {
            ledger.record(r);
        }
        // `usage` flushes first: no explicit flush here.
        check_aggregation(&ledger, base).await;
        ledger.shutdown().await.unwrap();
    })
    .await;
}

/// Every row, read back through the view that joins the names.
fn read_back(path: &std::path::Path) -> Vec<Record> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut statement =
        conn.prepare(&format!("SELECT {NAMED_COLUMNS} FROM proxypal_ledger_named ORDER BY at_ms")).unwrap();
    statement
        .query_map([], |row| {
            Ok(Record {
                at_ms: row.get(0)?,
                client: row.get::<_, String>(1)?.into(),
                model: row.get::<_, String>(2)?.into(),
                provider: row.get::<_, String>(3)?.into(),
                upstream_model: row.get::<_, String>(4)?.into(),
                key: row.get::<_, String>(5)?.into(),
                status: row.get(6)?,
                attempts: row.get(7)?,
                ttfb_ms: row.get(8)?,
                total_ms: row.get(9)?,
                stream: row.get(10)?,
                prompt_tokens: row.get::<_, Option<i64>>(11)?.map(|n| n as u64),
                completion_tokens: row.get::<_, Option<i64>>(12)?.map(|n| n as u64),
                total_tokens: row.get::<_, Option<i64>>(13)?.map(|n| n as u64),
                error: row.get(14)?,
                cache_hit: row.get(15)?,
            })
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test]
async fn sqlite_rows_hold_name_ids_and_read_back_exactly() {
    bounded(LIMIT, async {
        let dir = TempDir::new("names");
        let path = dir.file("ledger.db");
        // 300 records: batches of 256 (four 64-row statements) and 44 (single rows).
        let base = base_hour();
        let records = varied(base, 300);
        assert_eq!(records[13].total_tokens, Some(u64::MAX));
        let ledger = Ledger::start(manual(&path, 256)).await.unwrap();
        for r in &records {
            ledger.record(r.clone());
        }
        ledger.flush().await.unwrap();
        assert_eq!(read_back(&path), as_stored(&records));
        // Each name once in the dictionary, whichever columns use it.
        let conn = rusqlite::Connection::open(&path).unwrap();
        let (names, distinct): (i64, i64) = conn
            .query_row("SELECT COUNT(*), COUNT(DISTINCT name) FROM proxypal_ledger_names", [], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .unwrap();
        // 4 clients, 3 models, 2 providers, 3 upstream models, 7 keys, 1 + 60 errors.
        assert_eq!((names, distinct), (80, 80));

        // A new ledger on the same file knows none of the ids: it finds them.
        ledger.shutdown().await.unwrap();
        let ledger = Ledger::start(manual(&path, 256)).await.unwrap();
        let more = varied(base + 1, 70);
        for r in &more {
            ledger.record(r.clone());
        }
        let everything = UsageQuery {
            from_ms: base + 14_000,
            to_ms: i64::MAX,
            group_by: "client,model,provider,key".parse().unwrap(),
            bucket: Bucket::Hour,
            client: None,
        };
        let all: Vec<Record> = records.iter().chain(&more).cloned().collect();
        assert_eq!(ledger.usage(&everything).await.unwrap(), reference(&as_stored(&all), &everything));
        let names: i64 =
            conn.query_row("SELECT COUNT(*) FROM proxypal_ledger_names", [], |row| row.get(0)).unwrap();
        assert_eq!(names, 80, "no name added twice");
        ledger.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn sqlite_usage_as_csv_has_the_header_and_quotes() {
    bounded(LIMIT, async {
        let dir = TempDir::new("csv");
        let ledger = Ledger::start(LedgerConfig::sqlite(dir.file("ledger.db"))).await.unwrap();
        let base = base_hour();
        ledger.record(record(base + 2 * HOUR_MS + 1, "carol, \"the\" admin", "gpt-4o", 200, Some((3, 4))));
        ledger.record(record(base + 2 * HOUR_MS + 2, "dave", "gpt-4o", 502, None));
        let query = UsageQuery {
            from_ms: base,
            to_ms: base + 3 * HOUR_MS,
            group_by: "client".parse().unwrap(),
            bucket: Bucket::Hour,
            client: None,
        };
        let csv = to_csv(&ledger.usage(&query).await.unwrap());
        let hour = jiff::Timestamp::from_millisecond(base + 2 * HOUR_MS).unwrap();
        assert_eq!(
            csv,
            format!(
                "bucket,client,model,provider,key,requests,errors,prompt_tokens,completion_tokens,total_tokens\r\n\
                 {hour},\"carol, \"\"the\"\" admin\",,,,1,0,3,4,7\r\n\
                 {hour},dave,,,,1,1,0,0,0\r\n"
            )
        );
        ledger.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn sqlite_retention_prunes_old_rows_on_demand_and_at_start() {
    bounded(LIMIT, async {
        let dir = TempDir::new("retention");
        let path = dir.file("ledger.db");
        let now = jiff::Timestamp::now().as_millisecond();
        let day = 24 * HOUR_MS;
        let everything = UsageQuery {
            from_ms: 0,
            to_ms: now + day,
            group_by: GroupBy::NONE,
            bucket: Bucket::None,
            client: None,
        };

        // Default retention (90 days) keeps a 2-day-old record.
        let ledger = Ledger::start(LedgerConfig::sqlite(&path)).await.unwrap();
        ledger.record(record(now - 2 * day, "alice", "gpt-4o", 200, None));
        ledger.record(record(now - 3 * day, "alice", "gpt-4o", 200, None));
        ledger.record(record(now - HOUR_MS, "alice", "gpt-4o", 200, None));
        ledger.flush().await.unwrap();
        assert_eq!(ledger.prune_now().await.unwrap(), 0);
        assert_eq!(ledger.usage(&everything).await.unwrap()[0].requests, 3);
        ledger.shutdown().await.unwrap();

        // Reopened with 2.5 days: the pass at start deletes the 3-day-old one.
        let config =
            LedgerConfig { retention: Duration::from_secs(60 * 3600), ..LedgerConfig::sqlite(&path) };
        let ledger = Ledger::start(config).await.unwrap();
        wait_for("the retention pass at start", LIMIT, async || count(&path) == 2).await;

        // A 1-day retention, on demand: only the recent one stays.
        ledger.shutdown().await.unwrap();
        let config =
            LedgerConfig { retention: Duration::from_secs(24 * 3600), ..LedgerConfig::sqlite(&path) };
        let ledger = Ledger::start(config).await.unwrap();
        assert_eq!(ledger.prune_now().await.unwrap() + ledger.prune_now().await.unwrap(), 1);
        assert_eq!(ledger.usage(&everything).await.unwrap()[0].requests, 1);
        assert_eq!(count(&path), 1);
        ledger.shutdown().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn sqlite_reopen_keeps_rows_and_migrates_once() {
    bounded(LIMIT, async {
        let dir = TempDir::new("reopen");
        let path = dir.file("ledger.db");
        for round in 1..=3 {
            let ledger = Ledger::start(LedgerConfig::sqlite(&path)).await.unwrap();
            ledger.record(record(base_hour(), "alice", "gpt-4o", 200, None));
            ledger.close().await.unwrap();
            assert_eq!(count(&path), round);
        }
        let conn = rusqlite::Connection::open(&path).unwrap();
        let versions: Vec<i64> = conn
            .prepare("SELECT version FROM proxypal_ledger_migrations")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(versions, vec![1, 2, 3]);
    })
    .await;
}

#[tokio::test]
async fn sqlite_shutdown_writes_what_is_buffered_then_refuses_records() {
    bounded(LIMIT, async {
        let dir = TempDir::new("shutdown");
        let path = dir.file("ledger.db");
        let ledger = Ledger::start(manual(&path, 512)).await.unwrap();
        let other_handle = ledger.clone();
        let started = Instant::now();
        for i in 0..7 {
            ledger.record(record(base_hour() + i, "alice", "gpt-4o", 200, None));
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        ledger.shutdown().await.unwrap();
        assert_eq!(count(&path), 7);
        other_handle.record(record(base_hour(), "late", "gpt-4o", 200, None));
        let stats = other_handle.stats();
        assert_eq!((stats.written, stats.dropped, stats.pending), (7, 1, 0), "{stats:?}");
        assert!(matches!(other_handle.flush().await, Err(LedgerError::Closed { backend: "sqlite" })));
        assert!(matches!(other_handle.shutdown().await, Err(LedgerError::Closed { .. })));
    })
    .await;
}

#[tokio::test]
async fn sqlite_an_unopenable_file_is_an_error_at_start() {
    bounded(LIMIT, async {
        let dir = TempDir::new("unopenable");
        let path = dir.file("missing-dir/ledger.db");
        let error = Ledger::start(LedgerConfig::sqlite(&path)).await.unwrap_err();
        assert!(matches!(error, LedgerError::Sqlite { operation: "open", .. }), "{error:?}");
        assert!(error.to_string().contains("missing-dir/ledger.db"), "{error}");
    })
    .await;
}

/// A time range is read from the pages whose time span meets it
/// (`proxypal_ledger_pages.first_ms` and `last_ms`). Records written far
/// out of time order, across hour boundaries and batches, must all still be
/// found, and none outside the range.
#[tokio::test]
async fn sqlite_time_ranges_find_rows_written_out_of_time_order() {
    bounded(LIMIT, async {
        let dir = TempDir::new("disorder");
        let path = dir.file("ledger.db");
        let ledger = Ledger::start(manual(&path, 64)).await.unwrap();
        let base = base_hour() - 3 * HOUR_MS;
        // 400 records over 6 hours in a scrambled order (a stride coprime to 400).
        let spread: Vec<Record> = (0..400i64)
            .map(|i| {
                let j = (i * 137) % 400;
                record(
                    base + j * (6 * HOUR_MS / 400) - 7,
                    ["alice", "bob"][(j % 2) as usize],
                    "llama",
                    200,
                    Some((1, j as u64)),
                )
            })
            .collect();
        for r in &spread {
            ledger.record(r.clone());
        }
        ledger.flush().await.unwrap();
        for (from, to) in [
            (base - 7, base + 6 * HOUR_MS),
            (base, base + HOUR_MS),
            (base + HOUR_MS - 10, base + HOUR_MS + 10),
            (base + 2 * HOUR_MS + 1_234, base + 4 * HOUR_MS + 99_999),
            (base + 5 * HOUR_MS, i64::MAX),
            (i64::MIN, base + 30 * 60_000),
        ] {
            let query = UsageQuery {
                from_ms: from,
                to_ms: to,
                group_by: "client".parse().unwrap(),
                bucket: Bucket::Hour,
                client: None,
            };
            assert_eq!(ledger.usage(&query).await.unwrap(), reference(&spread, &query), "[{from}, {to})");
        }
        ledger.shutdown().await.unwrap();
    })
    .await;
}

/// `push` wakes the writer only as the queue reaches one batch; records
/// that arrive while a batch is being written must still go out as full
/// batches without waiting for the next tick. Four threads push as fast as
/// they can; every full batch must be written with no flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_full_batches_that_fill_while_writing_are_written_without_a_tick() {
    bounded(LIMIT, async {
        let dir = TempDir::new("busy");
        let ledger = Ledger::start(manual(&dir.file("ledger.db"), 10)).await.unwrap();
        let base = base_hour();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let ledger = ledger.clone();
                std::thread::spawn(move || {
                    for i in 0..2_500 {
                        ledger.record(record(base + t * 10_000 + i, "alice", "gpt-4o", 200, Some((1, 1))));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        wait_for("every full batch written, no flush", Duration::from_secs(20), async || {
            ledger.stats().written == 10_000
        })
        .await;
        ledger.shutdown().await.unwrap();
    })
    .await;
}

/// Retention deletes whole pages in chunks (`PRUNE_CHUNK`, 64 pages): a
/// pass over more old pages than two chunks takes them all, and keeps the
/// recent one.
#[tokio::test]
async fn sqlite_retention_takes_every_old_page_in_chunks() {
    bounded(LIMIT, async {
        let dir = TempDir::new("retention-chunks");
        let path = dir.file("ledger.db");
        let config = LedgerConfig { retention: Duration::from_secs(24 * 3600), ..manual(&path, 1) };
        let ledger = Ledger::start(config).await.unwrap();
        assert_eq!(ledger.prune_now().await.unwrap(), 0);
        let now = jiff::Timestamp::now().as_millisecond();
        // A page per record (batches of one): 150 old ones, then a recent one.
        for i in 0..150 {
            ledger.record(record(now - 2 * 24 * HOUR_MS + i, "alice", "gpt-4o", 200, None));
        }
        ledger.record(record(now - 1_000, "alice", "gpt-4o", 200, None));
        ledger.flush().await.unwrap();
        let pages = |path: &std::path::Path| -> i64 {
            let conn = rusqlite::Connection::open(path).unwrap();
            conn.query_row("SELECT COUNT(*) FROM proxypal_ledger_pages", [], |row| row.get(0)).unwrap()
        };
        assert_eq!(pages(&path), 151);
        assert_eq!(ledger.prune_now().await.unwrap(), 150);
        assert_eq!((pages(&path), count(&path)), (1, 1));
        ledger.shutdown().await.unwrap();
    })
    .await;
}
