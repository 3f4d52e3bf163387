//! The embedded backend: one SQLite file in WAL mode, owned by the writer's
//! thread. Each batch is one `BEGIN IMMEDIATE` transaction: the names the
//! writer has not seen yet go into the dictionary first (see `names.rs`),
//! then the batch's records as one page (see `pages.rs`). A failed commit
//! rolls back, so a retried batch is never written twice (short of an I/O
//! error that leaves the outcome unknown).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior, params};

use crate::error::LedgerError;
use crate::names::NameIds;
use crate::pages::{self, Page};
use crate::query::{Aggregation, Clients, UsageQuery, UsageRow};
use crate::writer::{Batch, Failure, Pruned, Store, StoreError};

/// How long a statement waits for another process holding the file's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema versions, applied in order, each once.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        "-- Every name a record carries (client, model, provider, upstream
    -- model, key, error), once; rows hold the ids (see names.rs).
    CREATE TABLE IF NOT EXISTS proxypal_ledger_names (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE
    );
    CREATE TABLE IF NOT EXISTS proxypal_ledger (
        id INTEGER PRIMARY KEY,
        at_ms BIGINT NOT NULL,
        client_id INTEGER NOT NULL,
        model_id INTEGER NOT NULL,
        provider_id INTEGER NOT NULL,
        upstream_model_id INTEGER NOT NULL,
        key_id INTEGER NOT NULL,
        status INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        ttfb_ms BIGINT,
        total_ms BIGINT NOT NULL,
        stream BOOLEAN NOT NULL,
        prompt_tokens BIGINT,
        completion_tokens BIGINT,
        total_tokens BIGINT,
        error_id INTEGER,
        cache_hit BOOLEAN NOT NULL DEFAULT 0
    );
    -- Version 1 had an index by time (at_ms); version 2 replaces it.
    CREATE INDEX IF NOT EXISTS proxypal_ledger_at ON proxypal_ledger (at_ms);
    -- The rows with their names, for people and tools reading the file.
    CREATE VIEW IF NOT EXISTS proxypal_ledger_named AS
    SELECT l.at_ms, c.name AS client, m.name AS model, p.name AS provider,
        u.name AS upstream_model, k.name AS key_label, l.status, l.attempts, l.ttfb_ms,
        l.total_ms, l.stream, l.prompt_tokens, l.completion_tokens, l.total_tokens,
        e.name AS error, l.cache_hit
    FROM proxypal_ledger l
    JOIN proxypal_ledger_names c ON c.id = l.client_id
    JOIN proxypal_ledger_names m ON m.id = l.model_id
    JOIN proxypal_ledger_names p ON p.id = l.provider_id
    JOIN proxypal_ledger_names u ON u.id = l.upstream_model_id
    JOIN proxypal_ledger_names k ON k.id = l.key_id
    LEFT JOIN proxypal_ledger_names e ON e.id = l.error_id;
",
    ),
    (
        2,
        "-- No time index: rows are found by the row ids of each hour instead.
    -- Rows are appended in nearly time order, so an hour's rows sit in one
    -- short run of ids; one span row per hour (updated once per batch)
    -- replaces an index entry per row, which was 19 % of the writer's
    -- instructions per row (examples/write_cost.rs under callgrind).
    DROP INDEX IF EXISTS proxypal_ledger_at;
    CREATE TABLE IF NOT EXISTS proxypal_ledger_spans (
        hour INTEGER PRIMARY KEY,     -- at_ms / 3600000
        first_id INTEGER NOT NULL,    -- the least and greatest row id of
        last_id INTEGER NOT NULL      -- a row of that hour
    );
    INSERT INTO proxypal_ledger_spans (hour, first_id, last_id)
    SELECT at_ms / 3600000, MIN(id), MAX(id) FROM proxypal_ledger GROUP BY 1
    ON CONFLICT (hour) DO NOTHING;
",
    ),
    (
        3,
        "-- Records packed into pages, one row per batch (see pages.rs): a
    -- page is one insert, where a row per record cost SQLite ~5k
    -- instructions each (16 values through the VDBE and the B-tree). The
    -- view proxypal_ledger unpacks them, with the columns of the table it
    -- replaces.
    CREATE TABLE proxypal_ledger_pages (
        id INTEGER PRIMARY KEY,
        first_ms BIGINT NOT NULL,     -- the least and greatest at_ms of
        last_ms BIGINT NOT NULL,      -- the page's records
        rows INTEGER NOT NULL,        -- how many records
        data TEXT NOT NULL            -- a JSON array of records, each an array of
                                      -- the view's columns in order (null: none)
    );
    -- /usage: the pages that meet a range; retention: the pages that
    -- start before the cutoff.
    CREATE INDEX proxypal_ledger_pages_last ON proxypal_ledger_pages (last_ms, first_ms);
    CREATE INDEX proxypal_ledger_pages_first ON proxypal_ledger_pages (first_ms);
    INSERT INTO proxypal_ledger_pages (first_ms, last_ms, rows, data)
    SELECT MIN(at_ms), MAX(at_ms), COUNT(*), json_group_array(json_array(at_ms, client_id, model_id,
        provider_id, upstream_model_id, key_id, status, attempts, ttfb_ms, total_ms, stream,
        prompt_tokens, completion_tokens, total_tokens, error_id, cache_hit))
    FROM proxypal_ledger GROUP BY (id - 1) / 512 ORDER BY MIN(id);
    DROP VIEW proxypal_ledger_named;
    DROP TABLE proxypal_ledger;
    DROP TABLE proxypal_ledger_spans;
    CREATE VIEW proxypal_ledger AS
    SELECT r.value ->> 0 AS at_ms, r.value ->> 1 AS client_id, r.value ->> 2 AS model_id,
        r.value ->> 3 AS provider_id, r.value ->> 4 AS upstream_model_id, r.value ->> 5 AS key_id,
        r.value ->> 6 AS status, r.value ->> 7 AS attempts, r.value ->> 8 AS ttfb_ms,
        r.value ->> 9 AS total_ms, r.value ->> 10 AS stream, r.value ->> 11 AS prompt_tokens,
        r.value ->> 12 AS completion_tokens, r.value ->> 13 AS total_tokens,
        r.value ->> 14 AS error_id, r.value ->> 15 AS cache_hit
    FROM proxypal_ledger_pages p, json_each(p.data) r;
    CREATE VIEW proxypal_ledger_named AS
    SELECT l.at_ms, c.name AS client, m.name AS model, p.name AS provider,
        u.name AS upstream_model, k.name AS key_label, l.status, l.attempts, l.ttfb_ms,
        l.total_ms, l.stream, l.prompt_tokens, l.completion_tokens, l.total_tokens,
        e.name AS error, l.cache_hit
    FROM proxypal_ledger l
    JOIN proxypal_ledger_names c ON c.id = l.client_id
    JOIN proxypal_ledger_names m ON m.id = l.model_id
    JOIN proxypal_ledger_names p ON p.id = l.provider_id
    JOIN proxypal_ledger_names u ON u.id = l.upstream_model_id
    JOIN proxypal_ledger_names k ON k.id = l.key_id
    LEFT JOIN proxypal_ledger_names e ON e.id = l.error_id;
",
    ),
];

/// Adds a name to the dictionary unless it is there.
const INSERT_NAME: &str =
    "INSERT INTO proxypal_ledger_names (name) VALUES (?1) ON CONFLICT (name) DO NOTHING";
const NAME_ID: &str = "SELECT id FROM proxypal_ledger_names WHERE name = ?1";
const NAME_OF: &str = "SELECT name FROM proxypal_ledger_names WHERE id = ?1";
/// The pages that can hold a record in `[?1, ?2)` (`last_ms` is indexed).
const PAGES_IN: &str = "SELECT id, data FROM proxypal_ledger_pages WHERE last_ms >= ?1 AND first_ms < ?2";
const INSERT_PAGE: &str =
    "INSERT INTO proxypal_ledger_pages (first_ms, last_ms, rows, data) VALUES (?1, ?2, ?3, ?4)";

pub(crate) struct SqliteStore {
    conn: Connection,
    path: String,
    names: NameIds,
    /// The batch being written (its buffer reused).
    page: Page,
}

impl SqliteStore {
    /// Opens (creating) the file, sets WAL and applies migrations.
    pub(crate) fn open(path: &Path) -> Result<Self, LedgerError> {
        let shown = path.display().to_string();
        let shown = shown.as_str();
        let err = |operation| move |e| LedgerError::sqlite(shown, operation, e);
        let conn = Connection::open(path).map_err(err("open"))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(err("set busy_timeout"))?;
        // WAL: readers (other tools, backups) never block the writer. An
        // in-memory database answers "memory", which is fine.
        let _mode: String =
            conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)).map_err(err("enable WAL"))?;
        // NORMAL in WAL: a power cut can lose the last transactions, never corrupt.
        conn.execute_batch("PRAGMA synchronous = NORMAL").map_err(err("set synchronous"))?;
        let mut store =
            Self { conn, path: shown.to_owned(), names: NameIds::default(), page: Page::default() };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> Result<(), LedgerError> {
        let path = self.path.clone();
        let path = path.as_str();
        let err = |operation| move |e| LedgerError::sqlite(path, operation, e);
        // IMMEDIATE takes the write lock first: two processes opening one
        // file at once apply each migration once.
        let tx =
            self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err("migrate"))?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS proxypal_ledger_migrations (
                version INTEGER PRIMARY KEY,
                applied_at_ms BIGINT NOT NULL
            )",
        )
        .map_err(err("migrate"))?;
        let current: i64 = tx
            .query_row("SELECT COALESCE(MAX(version), 0) FROM proxypal_ledger_migrations", [], |row| {
                row.get(0)
            })
            .map_err(err("migrate"))?;
        for (version, sql) in MIGRATIONS.iter().filter(|(version, _)| *version > current) {
            if *version == 3 {
                tracing::info!(path = %self.path, "ledger: packing stored rows into pages (schema 3; a large ledger takes a while)");
            }
            tx.execute_batch(sql).map_err(err("migrate"))?;
            tx.execute(
                "INSERT INTO proxypal_ledger_migrations (version, applied_at_ms) VALUES (?1, ?2)",
                params![version, jiff::Timestamp::now().as_millisecond()],
            )
            .map_err(err("migrate"))?;
            tracing::info!(path = %self.path, version, "ledger: SQLite schema migrated");
        }
        tx.commit().map_err(err("migrate"))
    }

    fn write_batch(&mut self, batch: &Batch) -> rusqlite::Result<()> {
        if batch.records.is_empty() {
            return Ok(());
        }
        let mut lookup = self.names.lookup(&batch.records);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let new_ids = if lookup.unknown.is_empty() {
            Vec::new()
        } else {
            let mut insert = tx.prepare_cached(INSERT_NAME)?;
            let mut select = tx.prepare_cached(NAME_ID)?;
            lookup.resolve(|name| {
                insert.execute([name])?;
                select.query_row([name], |row| row.get::<_, i64>(0))
            })?
        };
        self.page.fill(&batch.records, &lookup.rows);
        let page = &self.page;
        tx.prepare_cached(INSERT_PAGE)?.execute(params![
            page.first_ms,
            page.last_ms,
            page.rows,
            page.text()
        ])?;
        tx.commit()?;
        self.names.learn(&lookup.unknown, &new_ids);
        Ok(())
    }
}

/// Data errors cannot succeed on retry; everything else (busy, I/O, full
/// disk) may.
fn failure(e: &rusqlite::Error) -> Failure {
    match e.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation | ErrorCode::TooBig | ErrorCode::TypeMismatch) => {
            Failure::Rejected
        }
        _ if matches!(e, rusqlite::Error::ToSqlConversionFailure(_)) => Failure::Rejected,
        _ => Failure::Transient,
    }
}

impl Store for SqliteStore {
    const BACKEND: &'static str = "sqlite";
    const DISPLAY: &'static str = "SQLite";

    fn is_connected(&self) -> bool {
        true
    }

    async fn connect(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn write(&mut self, batch: &Batch) -> Result<(), StoreError> {
        self.write_batch(batch).map_err(|e| StoreError {
            failure: failure(&e),
            error: LedgerError::sqlite(&self.path, "write a batch", e),
        })
    }

    async fn prune(&mut self, cutoff_ms: i64, limit: u32) -> Result<Pruned, LedgerError> {
        let path = self.path.clone();
        let path = path.as_str();
        let err = |e| LedgerError::sqlite(path, "delete records past retention", e);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        let mut pruned = Pruned::default();
        {
            // Whole pages first, oldest first.
            let mut whole = tx
                .prepare_cached(
                    "DELETE FROM proxypal_ledger_pages WHERE id IN (SELECT id FROM proxypal_ledger_pages \
                     WHERE last_ms < ?1 ORDER BY last_ms LIMIT ?2) RETURNING rows",
                )
                .map_err(err)?;
            let mut rows = whole.query(params![cutoff_ms, limit]).map_err(err)?;
            while let Some(row) = rows.next().map_err(err)? {
                pruned.records += row.get::<_, u64>(0).map_err(err)?;
                pruned.pages += 1;
            }
        }
        if pruned.pages < limit {
            // Then the pages holding records from both sides of the cutoff
            // (usually none or one): rewritten without the old ones.
            let straddling: Vec<(i64, String)> = tx
                // Every page that ended before the cutoff is gone (fewer
                // than `limit` were left), so these straddle it.
                .prepare_cached("SELECT id, data FROM proxypal_ledger_pages WHERE first_ms < ?1")
                .and_then(|mut select| {
                    select.query_map([cutoff_ms], |row| Ok((row.get(0)?, row.get(1)?)))?.collect()
                })
                .map_err(err)?;
            for (id, data) in straddling {
                let trimmed = pages::trim(&data, cutoff_ms).map_err(|e| LedgerError::Inconsistent {
                    backend: Self::BACKEND,
                    target: self.path.clone(),
                    operation: "delete records past retention",
                    detail: format!("page {id} of proxypal_ledger_pages does not hold records: {e}"),
                })?;
                let page = &trimmed.page;
                tx.execute(
                    "UPDATE proxypal_ledger_pages SET first_ms = ?2, last_ms = ?3, rows = ?4, data = ?5 \
                     WHERE id = ?1",
                    params![id, page.first_ms, page.last_ms, page.rows, page.text()],
                )
                .map_err(err)?;
                pruned.records += trimmed.removed;
            }
        }
        tx.commit().map_err(err)?;
        Ok(pruned)
    }

    async fn usage(&mut self, query: &UsageQuery) -> Result<Vec<UsageRow>, LedgerError> {
        let path = self.path.as_str();
        let err = |e| LedgerError::sqlite(path, "aggregate usage", e);
        let clients = match &query.client {
            None => Clients::All,
            Some(name) => match self
                .conn
                .prepare_cached(NAME_ID)
                .and_then(|mut select| select.query_row([name], |row| row.get::<_, i64>(0)).optional())
            {
                Ok(Some(id)) => Clients::Id(id),
                Ok(None) => Clients::Nobody,
                Err(e) => return Err(err(e)),
            },
        };
        let mut aggregation = Aggregation::new(query, clients);
        if clients != Clients::Nobody {
            let mut select = self.conn.prepare_cached(PAGES_IN).map_err(err)?;
            let mut rows = select.query(params![query.from_ms, query.to_ms]).map_err(err)?;
            while let Some(row) = rows.next().map_err(err)? {
                let id: i64 = row.get(0).map_err(err)?;
                let data = row.get_ref(1).and_then(|data| Ok(data.as_str()?)).map_err(err)?;
                aggregation.add_page(data).map_err(|e| LedgerError::Inconsistent {
                    backend: Self::BACKEND,
                    target: self.path.clone(),
                    operation: "aggregate usage",
                    detail: format!("page {id} of proxypal_ledger_pages: {e}"),
                })?;
            }
        }
        let mut names = HashMap::new();
        let mut select = self.conn.prepare_cached(NAME_OF).map_err(err)?;
        for id in aggregation.ids() {
            if let Some(name) =
                select.query_row([id], |row| row.get::<_, String>(0)).optional().map_err(err)?
            {
                names.insert(id, name);
            }
        }
        Ok(aggregation.rows(&names))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ledger written by schema version 2 (one SQL row per record) reads
    /// the same after version 3 packs it into pages.
    #[test]
    fn version_3_packs_the_rows_of_version_2_without_losing_one() {
        let dir = std::env::temp_dir().join(format!("proxypal-ledger-v2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ledger.db");
        let named = "SELECT at_ms, client, model, provider, upstream_model, key_label, status, attempts, \
            ttfb_ms, total_ms, stream, prompt_tokens, completion_tokens, total_tokens, error, cache_hit \
            FROM proxypal_ledger_named ORDER BY at_ms";
        type Row = (i64, String, String, String, String, String, i64, i64, Option<i64>, i64, bool);
        type Rest = (Option<i64>, Option<i64>, Option<i64>, Option<String>, bool);
        let read = |conn: &Connection| -> Vec<(Row, Rest)> {
            conn.prepare(named)
                .unwrap()
                .query_map([], |r| {
                    Ok((
                        (
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                            r.get(6)?,
                            r.get(7)?,
                            r.get(8)?,
                            r.get(9)?,
                            r.get(10)?,
                        ),
                        (r.get(11)?, r.get(12)?, r.get(13)?, r.get(14)?, r.get(15)?),
                    ))
                })
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        let before = {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE proxypal_ledger_migrations (version INTEGER PRIMARY KEY, applied_at_ms BIGINT NOT NULL);
                 INSERT INTO proxypal_ledger_migrations VALUES (1, 0), (2, 0);",
            )
            .unwrap();
            for (_, sql) in &MIGRATIONS[..2] {
                conn.execute_batch(sql).unwrap();
            }
            conn.execute_batch(
                "INSERT INTO proxypal_ledger_names (id, name) VALUES (1, 'alice'), (2, 'bob'), (3, 'llama'),
                     (4, 'nvidia'), (5, 'meta/llama'), (6, 'k0'), (7, 'upstream_429');",
            )
            .unwrap();
            // 1,100 rows: two full pages of 512 and a part one; NULLs,
            // errors and both booleans among them.
            let mut insert = conn
                .prepare(
                    "INSERT INTO proxypal_ledger (at_ms, client_id, model_id, provider_id, upstream_model_id, \
                     key_id, status, attempts, ttfb_ms, total_ms, stream, prompt_tokens, completion_tokens, \
                     total_tokens, error_id, cache_hit) VALUES (?1, ?2, 3, 4, 5, 6, ?3, 1, ?4, ?5, ?6, ?7, ?8, \
                     ?9, ?10, ?11)",
                )
                .unwrap();
            for i in 0..1_100i64 {
                let failed = i % 7 == 0;
                insert
                    .execute(params![
                        1_796_130_000_000 + i * 997,
                        1 + i % 2,
                        if failed { 429 } else { 200 },
                        (i % 3 != 0).then_some(i),
                        i + 5,
                        i % 2 == 0,
                        (!failed).then_some(i * 3),
                        (!failed).then_some(i),
                        (!failed).then_some(i * 4),
                        failed.then_some(7),
                        i % 5 == 0,
                    ])
                    .unwrap();
            }
            drop(insert);
            read(&conn)
        };
        assert_eq!(before.len(), 1_100);

        let store = SqliteStore::open(&path).unwrap();
        let pages: (i64, i64) = store
            .conn
            .query_row("SELECT COUNT(*), SUM(rows) FROM proxypal_ledger_pages", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!(pages, (3, 1_100));
        assert_eq!(read(&store.conn), before);
        let version: i64 = store
            .conn
            .query_row("SELECT MAX(version) FROM proxypal_ledger_migrations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 3);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
