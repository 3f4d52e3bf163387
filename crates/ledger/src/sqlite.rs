//! The embedded backend: one SQLite file in WAL mode, owned by the writer's
//! thread. Each batch is one `BEGIN IMMEDIATE` transaction over a cached
//! prepared INSERT; a failed commit rolls back, so a retried batch is never
//! written twice (short of an I/O error that leaves the outcome unknown).

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, TransactionBehavior, params};

use crate::error::LedgerError;
use crate::query::{Dialect, UsageQuery, UsageRow, usage_row, usage_sql};
use crate::writer::{Batch, Failure, Store, StoreError};

/// How long a statement waits for another process holding the file's lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema versions, applied in order, each once.
const MIGRATIONS: &[(i64, &str)] = &[(
    1,
    "CREATE TABLE IF NOT EXISTS proxypal_ledger (
        id INTEGER PRIMARY KEY,
        at_ms BIGINT NOT NULL,
        client TEXT NOT NULL,
        model TEXT NOT NULL,
        provider TEXT NOT NULL,
        upstream_model TEXT NOT NULL,
        key_label TEXT NOT NULL,
        status INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        ttfb_ms BIGINT,
        total_ms BIGINT NOT NULL,
        stream BOOLEAN NOT NULL,
        prompt_tokens BIGINT,
        completion_tokens BIGINT,
        total_tokens BIGINT,
        error TEXT,
        cache_hit BOOLEAN NOT NULL DEFAULT 0
    );
    -- One index, by time: every query is a time range; a client's rows are
    -- filtered within it. A second index (client, at_ms) cost a third of
    -- the writer's time per row (benches/ledger.sh).
    CREATE INDEX IF NOT EXISTS proxypal_ledger_at ON proxypal_ledger (at_ms);
",
)];

const INSERT: &str = "INSERT INTO proxypal_ledger (at_ms, client, model, provider, upstream_model, key_label, \
    status, attempts, ttfb_ms, total_ms, stream, prompt_tokens, completion_tokens, total_tokens, error, cache_hit) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)";

pub(crate) struct SqliteStore {
    conn: Connection,
    path: String,
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
        let mut store = Self { conn, path: shown.to_owned() };
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
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut insert = tx.prepare_cached(INSERT)?;
            for r in &batch.records {
                insert.execute(params![
                    r.at_ms,
                    r.client,
                    r.model,
                    r.provider,
                    r.upstream_model,
                    r.key,
                    r.status,
                    r.attempts,
                    r.ttfb_ms,
                    r.total_ms,
                    r.stream,
                    r.prompt_tokens.map(clamp),
                    r.completion_tokens.map(clamp),
                    r.total_tokens.map(clamp),
                    r.error,
                    r.cache_hit,
                ])?;
            }
        }
        tx.commit()
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
        let deleted = self
            .conn
            .execute(
                "DELETE FROM proxypal_ledger WHERE id IN \
                 (SELECT id FROM proxypal_ledger WHERE at_ms < ?1 ORDER BY at_ms LIMIT ?2)",
                params![cutoff_ms, limit],
            )
            .map_err(|e| LedgerError::sqlite(&self.path, "delete records past retention", e))?;
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
