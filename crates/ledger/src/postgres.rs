//! The shared backend: several replicas write one PostgreSQL ledger.
//!
//! A batch is one transaction: give the names the writer has not seen yet
//! their ids (see `names.rs`), then insert the batch's records as one page
//! (see `pages.rs`) keyed by the batch's id (`ON CONFLICT DO NOTHING`). If
//! the connection drops while `COMMIT` is in flight the outcome is unknown;
//! the writer keeps the batch and retries it, and the retry finds its page
//! already there when the first commit did land, so a batch is written
//! exactly once.
//!
//! Replicas agree on name ids through `proxypal_ledger_names`' UNIQUE
//! name: each inserts the names it lacks (`ON CONFLICT DO NOTHING`, in
//! name order so two batches cannot wait on each other's names), then
//! reads the ids back in a new statement, which sees a concurrent
//! replica's committed insert.
//!
//! Every round trip is bounded ([`OP_TIMEOUT`]): a server that stops
//! answering without closing the socket is treated like one that is gone
//! (the connection is dropped and re-made).

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use tokio::time::timeout;
use tokio_postgres::{Client, Config, NoTls, Statement};
use tracing::debug;

use crate::error::LedgerError;
use crate::names::NameIds;
use crate::pages::{self, Page};
use crate::query::{Aggregation, Clients, UsageQuery, UsageRow};
use crate::redact::redact;
use crate::writer::{Batch, Failure, Pruned, Store, StoreError};

/// Connecting, if the URL sets no `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Any one operation (connect and migrate, a batch, a prune chunk, a query).
const OP_TIMEOUT: Duration = Duration::from_secs(15);
/// Applying migrations: schema version 3 rewrites every stored row, which
/// on a large ledger takes far longer than [`OP_TIMEOUT`]. Abandoning it
/// would not stop the server's statement, only make every retry wait
/// behind it.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long shutdown waits for the connection to close cleanly.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// The advisory lock migrations hold ("proxyldg"): replicas starting at
/// once migrate one after the other.
const MIGRATION_LOCK: i64 = 0x7072_6f78_796c_6467;

/// Schema versions, applied in order, each once.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "-- Every name a record carries (client, model, provider, upstream
    -- model, key, error), once; rows hold the ids (see names.rs).
    CREATE TABLE IF NOT EXISTS proxypal_ledger_names (
        id INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        name TEXT NOT NULL UNIQUE
    );
    -- No row id: its sequence and unique index were a third of the
    -- server's CPU per row (examples/write_cost.rs), and nothing reads it;
    -- retention deletes by ctid.
    CREATE TABLE IF NOT EXISTS proxypal_ledger (
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
        cache_hit BOOLEAN NOT NULL DEFAULT FALSE
    );
    -- One index, by time: every query is a time range; a client's rows are
    -- filtered within it. A second index (client, at_ms) cost a third of
    -- the writer's time per row (benches/ledger.sh).
    CREATE INDEX IF NOT EXISTS proxypal_ledger_at ON proxypal_ledger (at_ms);
    -- The rows with their names, for people and tools reading the ledger.
    CREATE OR REPLACE VIEW proxypal_ledger_named AS
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
    CREATE TABLE IF NOT EXISTS proxypal_ledger_batches (
        id TEXT PRIMARY KEY,
        at_ms BIGINT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS proxypal_ledger_batches_at ON proxypal_ledger_batches (at_ms);",
    ),
    (
        2,
        "-- The time index as BRIN, not a B-tree: rows arrive in time order
        -- (every replica writes \"now\"), so a block range summarises them
        -- as well as a B-tree finds them, and keeping it costs next to
        -- nothing per row. The server's CPU per row went from 3.1 to 2.5 µs
        -- (examples/write_cost.rs); the index is a few pages instead of
        -- 30 bytes a row.
        DROP INDEX IF EXISTS proxypal_ledger_at;
        CREATE INDEX IF NOT EXISTS proxypal_ledger_at_brin ON proxypal_ledger USING brin (at_ms);",
    ),
    (
        3,
        "-- Records packed into pages, one row per batch (see pages.rs): a
        -- page is one insert, where a row per record cost the server
        -- 3.7-4.2 us of CPU each (16 values through COPY's parser, the
        -- heap, WAL and the index). The page's key is the writer's batch
        -- id: a retried batch is written once. The view proxypal_ledger
        -- unpacks them, with the columns of the table it replaces.
        CREATE TABLE proxypal_ledger_pages (
            batch TEXT PRIMARY KEY,
            first_ms BIGINT NOT NULL,     -- the least and greatest at_ms of
            last_ms BIGINT NOT NULL,      -- the page's records
            rows INTEGER NOT NULL,        -- how many records
            data TEXT NOT NULL            -- a JSON array of records, each an array of
                                          -- the view's columns in order (null: none)
        );
        -- Replicas of an older version may still be writing rows: they
        -- wait here, and fail once the table is gone (their batches stay
        -- buffered and are counted as dropped if they never succeed), so
        -- no row committed before the copy below is left out of it.
        LOCK TABLE proxypal_ledger IN EXCLUSIVE MODE;
        -- /usage: the pages that meet a range; retention: the pages
        -- that start before the cutoff.
        CREATE INDEX proxypal_ledger_pages_last ON proxypal_ledger_pages (last_ms, first_ms);
        CREATE INDEX proxypal_ledger_pages_first ON proxypal_ledger_pages (first_ms);
        -- TOAST's default compression (pglz) cost the server 1.3 us per
        -- record, two thirds of its work (examples/write_cost.rs); lz4
        -- (PostgreSQL 14 and later, when built with it) keeps the same
        -- size for next to nothing. Without it, pages are stored
        -- uncompressed (about 65 bytes a record).
        DO $do$ BEGIN
            EXECUTE 'ALTER TABLE proxypal_ledger_pages ALTER COLUMN data SET COMPRESSION lz4';
        EXCEPTION WHEN OTHERS THEN
            EXECUTE 'ALTER TABLE proxypal_ledger_pages ALTER COLUMN data SET STORAGE EXTERNAL';
        END $do$;
        INSERT INTO proxypal_ledger_pages (batch, first_ms, last_ms, rows, data)
        SELECT 'v2-' || page, MIN(at_ms), MAX(at_ms), COUNT(*), json_agg(json_build_array(at_ms,
            client_id, model_id, provider_id, upstream_model_id, key_id, status, attempts, ttfb_ms,
            total_ms, stream::INTEGER, prompt_tokens, completion_tokens, total_tokens, error_id,
            cache_hit::INTEGER))::TEXT
        FROM (SELECT l.*, (ROW_NUMBER() OVER (ORDER BY at_ms) - 1) / 512 AS page
            FROM proxypal_ledger l) numbered
        GROUP BY page;
        DROP VIEW proxypal_ledger_named;
        DROP TABLE proxypal_ledger;
        DROP TABLE proxypal_ledger_batches;
        CREATE VIEW proxypal_ledger AS
        SELECT CAST(r ->> 0 AS BIGINT) AS at_ms, CAST(r ->> 1 AS INTEGER) AS client_id,
            CAST(r ->> 2 AS INTEGER) AS model_id, CAST(r ->> 3 AS INTEGER) AS provider_id,
            CAST(r ->> 4 AS INTEGER) AS upstream_model_id, CAST(r ->> 5 AS INTEGER) AS key_id,
            CAST(r ->> 6 AS INTEGER) AS status, CAST(r ->> 7 AS INTEGER) AS attempts,
            CAST(r ->> 8 AS BIGINT) AS ttfb_ms, CAST(r ->> 9 AS BIGINT) AS total_ms,
            CAST(r ->> 10 AS INTEGER) <> 0 AS stream, CAST(r ->> 11 AS BIGINT) AS prompt_tokens,
            CAST(r ->> 12 AS BIGINT) AS completion_tokens, CAST(r ->> 13 AS BIGINT) AS total_tokens,
            CAST(r ->> 14 AS INTEGER) AS error_id, CAST(r ->> 15 AS INTEGER) <> 0 AS cache_hit
        FROM proxypal_ledger_pages p CROSS JOIN LATERAL json_array_elements(p.data::json) r;
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
        LEFT JOIN proxypal_ledger_names e ON e.id = l.error_id;",
    ),
];

/// A batch's page; nothing if an earlier attempt at it committed.
const INSERT_PAGE: &str = "INSERT INTO proxypal_ledger_pages (batch, first_ms, last_ms, rows, data) \
    VALUES ($1, $2, $3, $4, $5) ON CONFLICT (batch) DO NOTHING";

/// Adds the names not in the dictionary yet (in name order: see the module
/// docs); a concurrent insert of the same name waits for the other
/// transaction, then does nothing.
const ADD_NAMES: &str = "INSERT INTO proxypal_ledger_names (name) \
    SELECT name FROM UNNEST($1::TEXT[]) AS new (name) \
    WHERE NOT EXISTS (SELECT 1 FROM proxypal_ledger_names known WHERE known.name = new.name) \
    ORDER BY name ON CONFLICT (name) DO NOTHING";
const NAME_IDS: &str = "SELECT name, id FROM proxypal_ledger_names WHERE name = ANY($1::TEXT[])";

pub(crate) struct PgStore {
    config: Config,
    /// The URL with the password masked, for errors and logs.
    target: String,
    conn: Option<Connected>,
    /// Name ids learned on this connection (forgotten on a new one).
    names: NameIds,
    /// The batch being written (its buffer reused).
    page: Page,
}

struct Connected {
    client: Client,
    /// The connection's task: it sends `Terminate` and ends once `client`
    /// is dropped.
    task: tokio::task::JoinHandle<()>,
    insert_page: Statement,
    add_names: Statement,
    name_ids: Statement,
}

impl PgStore {
    /// Parses `url` (URL or key=value form); connects later.
    pub(crate) fn new(url: &str) -> Result<Self, LedgerError> {
        let target = redact(url);
        let mut config: Config =
            url.parse().map_err(|e| LedgerError::postgres(&target, "parse the URL", e))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        Ok(Self { config, target, conn: None, names: NameIds::default(), page: Page::default() })
    }

    fn timeout(&self, operation: &'static str) -> LedgerError {
        self.timeout_after(operation, OP_TIMEOUT)
    }

    fn timeout_after(&self, operation: &'static str, after: Duration) -> LedgerError {
        LedgerError::Timeout { backend: Self::BACKEND, target: self.target.clone(), operation, after }
    }

    /// A new connection, migrated, with the statements prepared.
    async fn open(&self) -> Result<Connected, LedgerError> {
        let target = self.target.as_str();
        let err = |operation| move |e| LedgerError::postgres(target, operation, e);
        let (mut client, connection) = match timeout(OP_TIMEOUT, self.config.connect(NoTls)).await {
            Ok(connected) => connected.map_err(err("connect"))?,
            Err(_) => return Err(self.timeout("connect")),
        };
        let task_target = self.target.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(target = %task_target, error = %crate::error::chain(&e), "ledger: PostgreSQL connection ended");
            }
        });
        match timeout(MIGRATE_TIMEOUT, migrate(&mut client, target)).await {
            Ok(migrated) => migrated?,
            Err(_) => return Err(self.timeout_after("migrate", MIGRATE_TIMEOUT)),
        }
        let prepare = async || {
            let prepare = async |sql| client.prepare(sql).await.map_err(err("prepare statements"));
            Ok::<_, LedgerError>((
                prepare(INSERT_PAGE).await?,
                prepare(ADD_NAMES).await?,
                prepare(NAME_IDS).await?,
            ))
        };
        let (insert_page, add_names, name_ids) = match timeout(OP_TIMEOUT, prepare()).await {
            Ok(prepared) => prepared?,
            Err(_) => return Err(self.timeout("prepare statements")),
        };
        Ok(Connected { client, task, insert_page, add_names, name_ids })
    }

    /// `e`, from `operation`, as the writer sees it.
    fn failed(&mut self, e: Error, operation: &'static str) -> StoreError {
        let inconsistent = |detail| StoreError {
            failure: Failure::Rejected,
            error: LedgerError::Inconsistent {
                backend: Self::BACKEND,
                target: self.target.clone(),
                operation,
                detail,
            },
        };
        match e {
            Error::Postgres(e) => {
                let failure = self.classify(&e);
                StoreError { failure, error: LedgerError::postgres(&self.target, operation, e) }
            }
            Error::Missing(name) => inconsistent(format!(
                "the name {name:?} has no id in proxypal_ledger_names after it was added"
            )),
            Error::Page(batch, e) => inconsistent(format!(
                "the page of batch {batch:?} in proxypal_ledger_pages does not hold records: {e}"
            )),
        }
    }

    /// A failed operation on the connection: data errors keep it, anything
    /// else drops it so the next attempt reconnects (and re-migrates).
    fn classify(&mut self, e: &tokio_postgres::Error) -> Failure {
        let closed = self.conn.as_ref().is_none_or(|conn| conn.client.is_closed());
        let data = e.as_db_error().is_some_and(|db| {
            let code = db.code().code();
            code.starts_with("22") || code.starts_with("23")
        });
        if data && !closed {
            Failure::Rejected
        } else {
            self.conn = None;
            Failure::Transient
        }
    }
}

/// Applies what [`MIGRATIONS`] has and the database lacks, under a
/// transaction-level advisory lock (released at commit or rollback).
async fn migrate(client: &mut Client, target: &str) -> Result<(), LedgerError> {
    let err = |e| LedgerError::postgres(target, "migrate", e);
    let tx = client.transaction().await.map_err(err)?;
    tx.batch_execute(&format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")).await.map_err(err)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS proxypal_ledger_migrations (
            version INTEGER PRIMARY KEY,
            applied_at_ms BIGINT NOT NULL
        )",
    )
    .await
    .map_err(err)?;
    let current: i32 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM proxypal_ledger_migrations", &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(err)?;
    for (version, sql) in MIGRATIONS.iter().filter(|(version, _)| *version > current) {
        if *version == 3 {
            tracing::info!(%target, "ledger: packing stored rows into pages (schema 3; a large ledger takes a while)");
        }
        tx.batch_execute(sql).await.map_err(err)?;
        tx.execute(
            "INSERT INTO proxypal_ledger_migrations (version, applied_at_ms) VALUES ($1, $2)",
            &[version, &jiff::Timestamp::now().as_millisecond()],
        )
        .await
        .map_err(err)?;
        tracing::info!(%target, version, "ledger: PostgreSQL schema migrated");
    }
    tx.commit().await.map_err(err)
}

/// PostgreSQL text cannot hold NUL; a stray one must not poison a batch.
fn text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') { Cow::Owned(s.replace('\0', "\u{fffd}")) } else { Cow::Borrowed(s) }
}

/// Writes `batch` in one transaction; `names` learns the new ids once the
/// commit is known to have happened.
async fn write_batch(
    conn: &mut Connected,
    names: &mut NameIds,
    page: &mut Page,
    batch: &Batch,
) -> Result<(), Error> {
    let records = &batch.records;
    if records.is_empty() {
        return Ok(());
    }
    let tx = conn.client.transaction().await?;
    let mut lookup = names.lookup(records);
    let mut found: HashMap<String, i32> = HashMap::new();
    if !lookup.unknown.is_empty() {
        let unknown: Vec<Cow<'_, str>> = lookup.unknown.iter().map(|name| text(name)).collect();
        tx.execute(&conn.add_names, &[&unknown]).await?;
        for row in tx.query(&conn.name_ids, &[&unknown]).await? {
            found.insert(row.try_get(0)?, row.try_get(1)?);
        }
    }
    let new_ids = lookup.resolve(|name| match found.get(text(name).as_ref()) {
        Some(&id) => Ok(i64::from(id)),
        None => Err(Error::Missing(name.to_owned())),
    })?;
    page.fill(records, &lookup.rows);
    // A batch is far below 2^31 records (its buffer is memory).
    let rows = i32::try_from(page.rows).unwrap_or(i32::MAX);
    let written = tx
        .execute(&conn.insert_page, &[&batch.id, &page.first_ms, &page.last_ms, &rows, &page.text()])
        .await?;
    if written == 0 {
        // An earlier attempt committed although we never heard back.
        debug!(batch = %batch.id, "ledger: batch already written; not writing it twice");
        tx.rollback().await?;
        return Ok(());
    }
    tx.commit().await?;
    names.learn(&lookup.unknown, &new_ids);
    Ok(())
}

/// Pages fetched per round trip by [`usage`]: a few MB in memory at most
/// (a page of 2048 records is ~140 KB of text), however long the range.
const PAGES_PER_FETCH: i32 = 16;

/// Reads the pages that can hold `query`'s range through a portal, a
/// chunk at a time, and aggregates them (see [`Aggregation`]).
async fn usage(client: &mut Client, query: &UsageQuery) -> Result<Vec<UsageRow>, Error> {
    let tx = client.build_transaction().read_only(true).start().await?;
    let clients = match &query.client {
        None => Clients::All,
        Some(name) => {
            match tx.query_opt("SELECT id FROM proxypal_ledger_names WHERE name = $1", &[&text(name)]).await?
            {
                Some(row) => Clients::Id(i64::from(row.try_get::<_, i32>(0)?)),
                None => Clients::Nobody,
            }
        }
    };
    let mut aggregation = Aggregation::new(query, clients);
    if clients != Clients::Nobody {
        let portal = tx
            .bind(
                "SELECT batch, data FROM proxypal_ledger_pages WHERE last_ms >= $1 AND first_ms < $2",
                &[&query.from_ms, &query.to_ms],
            )
            .await?;
        loop {
            let pages = tx.query_portal(&portal, PAGES_PER_FETCH).await?;
            for page in &pages {
                let data: &str = page.try_get(1)?;
                if let Err(e) = aggregation.add_page(data) {
                    return Err(Error::Page(page.try_get(0)?, e));
                }
            }
            if pages.len() < PAGES_PER_FETCH as usize {
                break;
            }
        }
    }
    let ids: Vec<i32> = aggregation.ids().into_iter().filter_map(|id| i32::try_from(id).ok()).collect();
    let mut names = HashMap::new();
    for row in tx.query("SELECT id, name FROM proxypal_ledger_names WHERE id = ANY($1)", &[&ids]).await? {
        names.insert(i64::from(row.try_get::<_, i32>(0)?), row.try_get(1)?);
    }
    tx.commit().await?;
    Ok(aggregation.rows(&names))
}

/// Deletes up to `limit` whole pages older than `cutoff_ms`, then (unless
/// that many went) rewrites the pages straddling it without their old
/// records; one transaction.
async fn prune(client: &mut Client, cutoff_ms: i64, limit: u32) -> Result<Pruned, Error> {
    let tx = client.transaction().await?;
    let deleted = tx
        .query(
            "DELETE FROM proxypal_ledger_pages WHERE batch IN (SELECT batch FROM proxypal_ledger_pages \
             WHERE last_ms < $1 ORDER BY last_ms LIMIT $2) RETURNING rows",
            &[&cutoff_ms, &i64::from(limit)],
        )
        .await?;
    let mut pruned = Pruned::default();
    for row in &deleted {
        pruned.records += u64::try_from(row.try_get::<_, i32>(0)?).unwrap_or(0);
        pruned.pages += 1;
    }
    if pruned.pages < limit {
        // Locked: two replicas trimming one page take turns.
        let straddling = tx
            .query(
                // Every page that ended before the cutoff is gone (fewer
                // than `limit` were left), so these straddle it.
                "SELECT batch, data FROM proxypal_ledger_pages WHERE first_ms < $1 FOR UPDATE",
                &[&cutoff_ms],
            )
            .await?;
        for row in straddling {
            let (batch, data): (String, String) = (row.try_get(0)?, row.try_get(1)?);
            let trimmed = pages::trim(&data, cutoff_ms).map_err(|e| Error::Page(batch.clone(), e))?;
            let page = &trimmed.page;
            let rows = i32::try_from(page.rows).unwrap_or(i32::MAX);
            tx.execute(
                "UPDATE proxypal_ledger_pages SET first_ms = $2, last_ms = $3, rows = $4, data = $5 \
                 WHERE batch = $1",
                &[&batch, &page.first_ms, &page.last_ms, &rows, &page.text()],
            )
            .await?;
            pruned.records += trimmed.removed;
        }
    }
    tx.commit().await?;
    Ok(pruned)
}

/// What can go wrong writing a batch.
#[derive(Debug)]
enum Error {
    Postgres(tokio_postgres::Error),
    /// A name the dictionary should now hold was not there: the database
    /// answered something impossible; the batch cannot be written.
    Missing(String),
    /// A stored page (its batch id) that does not hold records.
    Page(String, pages::BadPage),
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Postgres(e)
    }
}

impl Store for PgStore {
    const BACKEND: &'static str = "postgres";
    const DISPLAY: &'static str = "PostgreSQL";

    async fn close(mut self) {
        if let Some(Connected { client, task, .. }) = self.conn.take() {
            drop(client);
            // `Terminate` is one small message: a server that stopped
            // answering does not hold up shutdown for longer than this.
            let _ = timeout(CLOSE_TIMEOUT, task).await;
        }
    }

    fn is_connected(&self) -> bool {
        self.conn.as_ref().is_some_and(|conn| !conn.client.is_closed())
    }

    async fn connect(&mut self) -> Result<(), StoreError> {
        if self.is_connected() {
            return Ok(());
        }
        self.conn = None;
        // Each step of `open` is bounded on its own (migrations longer).
        match self.open().await {
            Ok(conn) => {
                self.conn = Some(conn);
                // The server may have come back from a backup or a reset:
                // ids are learned afresh from what this one holds.
                self.names = NameIds::default();
                Ok(())
            }
            Err(e) => Err(StoreError::transient(e)),
        }
    }

    async fn write(&mut self, batch: &Batch) -> Result<(), StoreError> {
        self.connect().await?;
        let Some(conn) = self.conn.as_mut() else {
            return Err(StoreError::transient(self.timeout("connect")));
        };
        match timeout(OP_TIMEOUT, write_batch(conn, &mut self.names, &mut self.page, batch)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.failed(e, "write a batch")),
            Err(_) => {
                self.conn = None; // commit status unknown: the batch id settles it on retry
                Err(StoreError::transient(self.timeout("write a batch")))
            }
        }
    }

    async fn prune(&mut self, cutoff_ms: i64, limit: u32) -> Result<Pruned, LedgerError> {
        self.connect().await.map_err(|e| e.error)?;
        let Some(conn) = self.conn.as_mut() else {
            return Err(self.timeout("connect"));
        };
        match timeout(OP_TIMEOUT, prune(&mut conn.client, cutoff_ms, limit)).await {
            Ok(Ok(pruned)) => Ok(pruned),
            Ok(Err(e)) => Err(self.failed(e, "delete records past retention").error),
            Err(_) => {
                self.conn = None;
                Err(self.timeout("delete records past retention"))
            }
        }
    }

    async fn usage(&mut self, query: &UsageQuery) -> Result<Vec<UsageRow>, LedgerError> {
        self.connect().await.map_err(|e| e.error)?;
        let Some(conn) = self.conn.as_mut() else {
            return Err(self.timeout("connect"));
        };
        match timeout(OP_TIMEOUT, usage(&mut conn.client, query)).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => Err(self.failed(e, "aggregate usage").error),
            Err(_) => {
                self.conn = None;
                Err(self.timeout("aggregate usage"))
            }
        }
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;
    use crate::testing::Postgres;

    /// A ledger written by schema version 2 (one SQL row per record) reads
    /// the same after version 3 packs it into pages.
    #[tokio::test]
    async fn version_3_packs_the_rows_of_version_2_without_losing_one() {
        let Some(pg) = Postgres::new("postgres_version_3_migration") else { return };
        let (mut client, connection) = tokio_postgres::connect(&pg.url(), NoTls).await.unwrap();
        tokio::spawn(connection);
        let named = "SELECT at_ms, client, model, provider, upstream_model, key_label, status, attempts, \
            ttfb_ms, total_ms, stream, prompt_tokens, completion_tokens, total_tokens, error, cache_hit \
            FROM proxypal_ledger_named ORDER BY at_ms";
        let read = async |client: &Client| -> Vec<String> {
            // Each row as text: the view's column types must match the table's too.
            client
                .query(&format!("SELECT CAST(ROW(n.*) AS TEXT) FROM ({named}) n"), &[])
                .await
                .unwrap()
                .iter()
                .map(|row| row.get(0))
                .collect()
        };
        client
            .batch_execute(
                "CREATE TABLE proxypal_ledger_migrations (version INTEGER PRIMARY KEY, applied_at_ms BIGINT NOT NULL);
                 INSERT INTO proxypal_ledger_migrations VALUES (1, 0), (2, 0);",
            )
            .await
            .unwrap();
        for (_, sql) in &MIGRATIONS[..2] {
            client.batch_execute(sql).await.unwrap();
        }
        // 1,100 rows: two full pages of 512 and a part one; NULLs, errors
        // and both booleans among them.
        client
            .batch_execute(
                "INSERT INTO proxypal_ledger_names (name) VALUES ('alice'), ('bob'), ('llama'), ('nvidia'),
                     ('meta/llama'), ('k0'), ('upstream_429');
                 INSERT INTO proxypal_ledger SELECT 1796130000000 + i * 997, 1 + i % 2, 3, 4, 5, 6,
                     CASE WHEN i % 7 = 0 THEN 429 ELSE 200 END, 1,
                     CASE WHEN i % 3 <> 0 THEN i END, i + 5, i % 2 = 0,
                     CASE WHEN i % 7 <> 0 THEN i * 3 END, CASE WHEN i % 7 <> 0 THEN i END,
                     CASE WHEN i % 7 <> 0 THEN i * 4 END, CASE WHEN i % 7 = 0 THEN 7 END, i % 5 = 0
                 FROM generate_series(0, 1099) AS i;
                 INSERT INTO proxypal_ledger_batches VALUES ('old', 0);",
            )
            .await
            .unwrap();
        let before = read(&client).await;
        assert_eq!(before.len(), 1_100);
        assert!(before.iter().any(|row| row.contains("upstream_429")), "{:?}", &before[..2]);

        migrate(&mut client, "test").await.unwrap();
        let pages = client
            .query_one("SELECT COUNT(*), CAST(SUM(rows) AS BIGINT) FROM proxypal_ledger_pages", &[])
            .await
            .unwrap();
        assert_eq!((pages.get::<_, i64>(0), pages.get::<_, i64>(1)), (3, 1_100));
        assert_eq!(read(&client).await, before);
        let version: i32 = client
            .query_one("SELECT MAX(version) FROM proxypal_ledger_migrations", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(version, 3);
        // Pages are not compressed with pglz (two thirds of the server's
        // CPU per record): lz4 where the server has it, else none.
        let storage = client
            .query_one(
                "SELECT CAST(attcompression AS TEXT), CAST(attstorage AS TEXT) FROM pg_attribute \
                 WHERE attrelid = 'proxypal_ledger_pages'::regclass AND attname = 'data'",
                &[],
            )
            .await
            .unwrap();
        let (compression, storage): (String, String) = (storage.get(0), storage.get(1));
        assert!(compression == "l" || storage == "e", "compression {compression:?}, storage {storage:?}");
    }
}
