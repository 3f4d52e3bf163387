//! The embedded backend: one SQLite file in WAL mode, owned by the writer's
//! thread. Each batch is one `BEGIN IMMEDIATE` transaction: the names the
//! writer has not seen yet go into the dictionary first (see `names.rs`),
//! then the rows, [`ROWS_PER_INSERT`] to a cached prepared statement, every
//! value bound directly (integers only). A failed commit rolls back, so a
//! retried batch is never written twice (short of an I/O error that leaves
//! the outcome unknown).

use std::path::Path;
use std::time::Duration;

use rusqlite::{CachedStatement, Connection, ErrorCode, TransactionBehavior, params};

use crate::Record;
use crate::error::LedgerError;
use crate::names::{NameIds, RowIds};
use crate::query::{Dialect, HOUR_MS, UsageQuery, UsageRow, usage_row, usage_sql};
use crate::writer::{Batch, Failure, Store, StoreError};

/// How long a statement waits for another process holding the file's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Rows per INSERT statement. SQLite's fixed cost per statement (opening
/// the table and index cursors, finding the last rowid, halting) was most
/// of a row's cost with one row per statement: the writer's instructions
/// per row were 11.8k with one, 8.5k with 32, 8.4k with 64 or 128
/// (`examples/write_cost.rs` under callgrind). 64 × 16 parameters stays far
/// below SQLite's limit (32,766).
const ROWS_PER_INSERT: usize = 64;

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
];

/// The row's columns, in [`Bound::row`]'s order.
const COLUMNS: &str = "at_ms, client_id, model_id, provider_id, upstream_model_id, key_id, status, attempts, \
    ttfb_ms, total_ms, stream, prompt_tokens, completion_tokens, total_tokens, error_id, cache_hit";
/// Values per row.
const VALUES: usize = 16;

/// An INSERT of `rows` rows (anonymous `?`s are numbered left to right).
fn insert_sql(rows: usize) -> String {
    let row = format!("({})", vec!["?"; VALUES].join(", "));
    format!("INSERT INTO proxypal_ledger ({COLUMNS}) VALUES {}", vec![row; rows].join(", "))
}

/// Adds a name to the dictionary unless it is there.
const INSERT_NAME: &str =
    "INSERT INTO proxypal_ledger_names (name) VALUES (?1) ON CONFLICT (name) DO NOTHING";
const NAME_ID: &str = "SELECT id FROM proxypal_ledger_names WHERE name = ?1";
/// Widens an hour's span of row ids to cover a batch's rows of that hour.
const ADD_SPAN: &str = "INSERT INTO proxypal_ledger_spans (hour, first_id, last_id) VALUES (?1, ?2, ?3) \
    ON CONFLICT (hour) DO UPDATE SET first_id = MIN(first_id, excluded.first_id), \
    last_id = MAX(last_id, excluded.last_id)";

pub(crate) struct SqliteStore {
    conn: Connection,
    path: String,
    names: NameIds,
    /// [`insert_sql`] for one row and for [`ROWS_PER_INSERT`] rows.
    insert_one: String,
    insert_many: String,
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
        let mut store = Self {
            conn,
            path: shown.to_owned(),
            names: NameIds::default(),
            insert_one: insert_sql(1),
            insert_many: insert_sql(ROWS_PER_INSERT),
        };
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
        {
            let mut spans = Spans::default();
            let mut rows = batch.records.iter().zip(&lookup.rows);
            let mut many = Bound::new(tx.prepare_cached(&self.insert_many)?, ROWS_PER_INSERT);
            for chunk in batch.records.chunks_exact(ROWS_PER_INSERT) {
                for (n, (record, ids)) in rows.by_ref().take(ROWS_PER_INSERT).enumerate() {
                    many.row(n, record, ids)?;
                }
                many.statement.raw_execute()?;
                spans.add(chunk, tx.last_insert_rowid());
            }
            let mut one = Bound::new(tx.prepare_cached(&self.insert_one)?, 1);
            for (record, ids) in rows {
                one.row(0, record, ids)?;
                one.statement.raw_execute()?;
                spans.add(std::slice::from_ref(record), tx.last_insert_rowid());
            }
            let mut add = tx.prepare_cached(ADD_SPAN)?;
            for &(hour, first, last) in &spans.0 {
                add.execute(params![hour, first, last])?;
            }
        }
        tx.commit()?;
        self.names.learn(&lookup.unknown, &new_ids);
        Ok(())
    }
}

/// A batch's rows by hour: `(hour, first id, last id)`, usually one entry.
#[derive(Default)]
struct Spans(Vec<(i64, i64, i64)>);

impl Spans {
    /// Adds `rows`, just inserted by one statement whose last row got
    /// `last_id`. One statement's rows get consecutive ids: a new row's id
    /// is one more than the table's largest (SQLite's rule while that is
    /// below `i64::MAX`), and the writer holds the write lock.
    fn add(&mut self, rows: &[Record], last_id: i64) {
        let first_id = last_id - (rows.len() as i64 - 1);
        for (record, id) in rows.iter().zip(first_id..) {
            let hour = record.at_ms / HOUR_MS;
            match self.0.iter_mut().find(|(h, _, _)| *h == hour) {
                Some((_, first, last)) => {
                    *first = (*first).min(id);
                    *last = (*last).max(id);
                }
                None => self.0.push((hour, id, id)),
            }
        }
    }
}

/// A prepared INSERT and what each of its parameters holds now.
///
/// SQLite keeps a statement's bindings across executions, and most of a
/// row's values repeat from one execution to the next in the same slot
/// (the client, model, provider, status, attempts, flags; often the token
/// counts): a parameter already holding the value is not bound again.
/// Binding was a fifth of the writer's instructions per row (`rusqlite`'s
/// conversion, then `sqlite3_bind_int64` releasing the old value). The
/// record starts empty (rusqlite clears a cached statement's bindings when
/// it goes back to the cache), so nothing is assumed about a statement it
/// did not bind.
struct Bound<'conn> {
    statement: CachedStatement<'conn>,
    /// Per parameter (0-based): `None` until bound here, then the value
    /// (`Some(None)` is SQL `NULL`).
    held: Vec<Option<Option<i64>>>,
}

impl<'conn> Bound<'conn> {
    fn new(statement: CachedStatement<'conn>, rows: usize) -> Self {
        Self { statement, held: vec![None; rows * VALUES] }
    }

    /// Binds `r` as row `n` of the statement (0-based), in [`COLUMNS`] order.
    fn row(&mut self, n: usize, r: &Record, ids: &RowIds) -> rusqlite::Result<()> {
        let [client, model, provider, upstream_model, key, error] = *ids;
        let values: [Option<i64>; VALUES] = [
            Some(r.at_ms),
            Some(client),
            Some(model),
            Some(provider),
            Some(upstream_model),
            Some(key),
            Some(i64::from(r.status)),
            Some(i64::from(r.attempts)),
            r.ttfb_ms.map(i64::from),
            Some(i64::from(r.total_ms)),
            Some(i64::from(r.stream)),
            r.prompt_tokens.map(clamp),
            r.completion_tokens.map(clamp),
            r.total_tokens.map(clamp),
            (error != 0).then_some(error),
            Some(i64::from(r.cache_hit)),
        ];
        let offset = n * VALUES;
        for (i, value) in values.into_iter().enumerate() {
            let slot = &mut self.held[offset + i];
            if *slot != Some(value) {
                // Parameters are 1-based.
                self.statement.raw_bind_parameter(offset + i + 1, value)?;
                *slot = Some(value);
            }
        }
        Ok(())
    }
}

/// Token counts beyond `i64::MAX` cannot happen; saturate rather than fail a batch.
fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
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

    async fn prune(&mut self, cutoff_ms: i64, limit: u32) -> Result<u64, LedgerError> {
        // Whole hours: the rows of every hour that ended by the cutoff, found
        // by their spans' ids (the first ids come first in a rowid scan).
        let hour = cutoff_ms.div_euclid(HOUR_MS);
        let err = |e| LedgerError::sqlite(&self.path, "delete records past retention", e);
        let deleted = self
            .conn
            .execute(
                "DELETE FROM proxypal_ledger WHERE id IN (SELECT id FROM proxypal_ledger \
                 WHERE id <= (SELECT MAX(last_id) FROM proxypal_ledger_spans WHERE hour < ?1) \
                 AND at_ms < ?1 * 3600000 LIMIT ?2)",
                params![hour, limit],
            )
            .map_err(err)?;
        if deleted < limit as usize {
            // Those hours hold no row now.
            self.conn
                .execute("DELETE FROM proxypal_ledger_spans WHERE hour < ?1", params![hour])
                .map_err(err)?;
        }
        Ok(deleted as u64)
    }

    async fn usage(&mut self, query: &UsageQuery) -> Result<Vec<UsageRow>, LedgerError> {
        let sql = usage_sql(query, Dialect::Sqlite);
        let err = |e| LedgerError::sqlite(&self.path, "aggregate usage", e);
        let mut statement = self.conn.prepare(&sql).map_err(err)?;
        let to_row =
            |row: &rusqlite::Row<'_>| usage_row(query, |i| row.get::<_, i64>(i), |i| row.get::<_, String>(i));
        let rows = match &query.client {
            Some(client) => statement.query_map(params![query.from_ms, query.to_ms, client], to_row),
            None => statement.query_map(params![query.from_ms, query.to_ms], to_row),
        }
        .map_err(err)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(err)
    }
}
