//! The shared backend: several replicas write one PostgreSQL ledger.
//!
//! A batch is one transaction: claim the batch's id in
//! `proxypal_ledger_batches` (`ON CONFLICT DO NOTHING`), give the names the
//! writer has not seen yet their ids (see `names.rs`), then stream the rows
//! with `COPY … FROM STDIN (FORMAT binary)`: no statement per row or per
//! batch for the server to plan, no arrays to take apart, and the heap
//! filled a page at a time (one WAL record per page, not per row). If the
//! connection drops while `COMMIT` is in flight the outcome is unknown; the
//! writer keeps the batch and retries it, and the retry finds its id
//! already claimed when the first commit did land, so a batch is written
//! exactly once. The ids are kept as long as the records (same retention).
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
use std::pin::pin;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::SinkExt;
use tokio::time::timeout;
use tokio_postgres::{Client, Config, NoTls, Statement};
use tracing::debug;

use crate::Record;
use crate::error::LedgerError;
use crate::names::{NameIds, RowIds};
use crate::query::{Dialect, UsageQuery, UsageRow, usage_row, usage_sql};
use crate::redact::redact;
use crate::writer::{Batch, Failure, Store, StoreError};

/// Connecting, if the URL sets no `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Any one operation (connect and migrate, a batch, a prune chunk, a query).
const OP_TIMEOUT: Duration = Duration::from_secs(15);
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
];

const CLAIM: &str =
    "INSERT INTO proxypal_ledger_batches (id, at_ms) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING";

/// Adds the names not in the dictionary yet (in name order: see the module
/// docs); a concurrent insert of the same name waits for the other
/// transaction, then does nothing.
const ADD_NAMES: &str = "INSERT INTO proxypal_ledger_names (name) \
    SELECT name FROM UNNEST($1::TEXT[]) AS new (name) \
    WHERE NOT EXISTS (SELECT 1 FROM proxypal_ledger_names known WHERE known.name = new.name) \
    ORDER BY name ON CONFLICT (name) DO NOTHING";
const NAME_IDS: &str = "SELECT name, id FROM proxypal_ledger_names WHERE name = ANY($1::TEXT[])";

const COPY: &str = "COPY proxypal_ledger (at_ms, client_id, model_id, provider_id, upstream_model_id, key_id, \
    status, attempts, ttfb_ms, total_ms, stream, prompt_tokens, completion_tokens, total_tokens, error_id, \
    cache_hit) FROM STDIN (FORMAT binary)";

pub(crate) struct PgStore {
    config: Config,
    /// The URL with the password masked, for errors and logs.
    target: String,
    conn: Option<Connected>,
    /// Name ids learned on this connection (forgotten on a new one).
    names: NameIds,
}

struct Connected {
    client: Client,
    /// The connection's task: it sends `Terminate` and ends once `client`
    /// is dropped.
    task: tokio::task::JoinHandle<()>,
    claim: Statement,
    add_names: Statement,
    name_ids: Statement,
    copy: Statement,
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
        Ok(Self { config, target, conn: None, names: NameIds::default() })
    }

    fn timeout(&self, operation: &'static str) -> LedgerError {
        LedgerError::Timeout {
            backend: Self::BACKEND,
            target: self.target.clone(),
            operation,
            after: OP_TIMEOUT,
        }
    }

    /// A new connection, migrated, with the statements prepared.
    async fn open(&self) -> Result<Connected, LedgerError> {
        let target = self.target.as_str();
        let err = |operation| move |e| LedgerError::postgres(target, operation, e);
        let (mut client, connection) = self.config.connect(NoTls).await.map_err(err("connect"))?;
        let task_target = self.target.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(target = %task_target, error = %crate::error::chain(&e), "ledger: PostgreSQL connection ended");
            }
        });
        migrate(&mut client, target).await?;
        let prepare = async |sql| client.prepare(sql).await.map_err(err("prepare statements"));
        let claim = prepare(CLAIM).await?;
        let add_names = prepare(ADD_NAMES).await?;
        let name_ids = prepare(NAME_IDS).await?;
        let copy = prepare(COPY).await?;
        Ok(Connected { client, task, claim, add_names, name_ids, copy })
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

/// Token counts beyond `i64::MAX` cannot happen; saturate rather than fail a batch.
fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Writes `batch` in one transaction; `names` learns the new ids once the
/// commit is known to have happened.
async fn write_batch(conn: &mut Connected, names: &mut NameIds, batch: &Batch) -> Result<(), Error> {
    let records = &batch.records;
    let tx = conn.client.transaction().await?;
    let claimed = tx.execute(&conn.claim, &[&batch.id, &jiff::Timestamp::now().as_millisecond()]).await?;
    if claimed == 0 {
        // An earlier attempt committed although we never heard back.
        debug!(batch = %batch.id, "ledger: batch already written; not writing it twice");
        tx.rollback().await?;
        return Ok(());
    }
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
    let sink = tx.copy_in::<_, Bytes>(&conn.copy).await?;
    let mut sink = pin!(sink);
    let size = COPY_HEADER.len() + records.len() * COPY_ROW_BYTES + 2;
    let mut rows = BytesMut::with_capacity(size.min(COPY_CHUNK + COPY_ROW_BYTES));
    rows.put_slice(COPY_HEADER);
    for (r, ids) in records.iter().zip(&lookup.rows) {
        copy_row(&mut rows, r, ids);
        if rows.len() >= COPY_CHUNK {
            // A message each: a huge `batch` stays far below PostgreSQL's
            // 1 GB message limit.
            sink.send(rows.split().freeze()).await?;
        }
    }
    rows.put_i16(-1); // the trailer
    sink.send(rows.freeze()).await?;
    sink.as_mut().finish().await?;
    tx.commit().await?;
    names.learn(&lookup.unknown, &new_ids);
    Ok(())
}

/// The start of a binary COPY stream: the signature, no flags, no header
/// extension (PostgreSQL's "COPY" page, "Binary Format").
const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The COPY data sent per message (batches of the default 512 rows go in one).
const COPY_CHUNK: usize = 1 << 20;
/// The most one [`copy_row`] writes: the field count, a length per field,
/// six 8-byte and eight 4-byte values and two booleans.
const COPY_ROW_BYTES: usize = 2 + 16 * 4 + 6 * 8 + 8 * 4 + 2;

/// Appends `r` as one binary COPY tuple in [`COPY`]'s column order, each
/// value in its column's type (`BIGINT`, `INTEGER`, `BOOLEAN`).
///
/// Written by hand rather than through `BinaryCopyInWriter`: its per-value
/// `dyn ToSql` dispatch, type check and length patching made the proxy's
/// CPU per request higher with the PostgreSQL ledger than with SQLite's
/// whole insert (benches/ledger.sh). Every value here is an integer or a
/// boolean of a fixed type.
fn copy_row(buf: &mut BytesMut, r: &Record, ids: &RowIds) {
    fn int4(buf: &mut BytesMut, v: i32) {
        buf.put_i32(4);
        buf.put_i32(v);
    }
    fn int8(buf: &mut BytesMut, v: i64) {
        buf.put_i32(8);
        buf.put_i64(v);
    }
    fn int8_or_null(buf: &mut BytesMut, v: Option<i64>) {
        match v {
            Some(v) => int8(buf, v),
            None => buf.put_i32(-1),
        }
    }
    fn boolean(buf: &mut BytesMut, v: bool) {
        buf.put_i32(1);
        buf.put_u8(u8::from(v));
    }
    // Ids come from INTEGER columns, so they fit; 0 is "no error".
    let [client, model, provider, upstream_model, key, error] = ids.map(|id| id as i32);
    buf.put_i16(16);
    int8(buf, r.at_ms);
    for id in [client, model, provider, upstream_model, key] {
        int4(buf, id);
    }
    int4(buf, i32::from(r.status));
    int4(buf, i32::from(r.attempts));
    int8_or_null(buf, r.ttfb_ms.map(i64::from));
    int8(buf, i64::from(r.total_ms));
    boolean(buf, r.stream);
    int8_or_null(buf, r.prompt_tokens.map(clamp));
    int8_or_null(buf, r.completion_tokens.map(clamp));
    int8_or_null(buf, r.total_tokens.map(clamp));
    match error {
        0 => buf.put_i32(-1),
        id => int4(buf, id),
    }
    boolean(buf, r.cache_hit);
}

/// What can go wrong writing a batch.
#[derive(Debug)]
enum Error {
    Postgres(tokio_postgres::Error),
    /// A name the dictionary should now hold was not there: the database
    /// answered something impossible; the batch cannot be written.
    Missing(String),
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
        match timeout(OP_TIMEOUT, self.open()).await {
            Ok(Ok(conn)) => {
                self.conn = Some(conn);
                // The server may have come back from a backup or a reset:
                // ids are learned afresh from what this one holds.
                self.names = NameIds::default();
                Ok(())
            }
            Ok(Err(e)) => Err(StoreError::transient(e)),
            Err(_) => Err(StoreError::transient(self.timeout("connect"))),
        }
    }

    async fn write(&mut self, batch: &Batch) -> Result<(), StoreError> {
        self.connect().await?;
        let Some(conn) = self.conn.as_mut() else {
            return Err(StoreError::transient(self.timeout("connect")));
        };
        match timeout(OP_TIMEOUT, write_batch(conn, &mut self.names, batch)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Error::Postgres(e))) => {
                let failure = self.classify(&e);
                Err(StoreError { failure, error: LedgerError::postgres(&self.target, "write a batch", e) })
            }
            Ok(Err(Error::Missing(name))) => Err(StoreError {
                failure: Failure::Rejected,
                error: LedgerError::Inconsistent {
                    backend: Self::BACKEND,
                    target: self.target.clone(),
                    operation: "write a batch",
                    detail: format!(
                        "the name {name:?} has no id in proxypal_ledger_names after it was added"
                    ),
                },
            }),
            Err(_) => {
                self.conn = None; // commit status unknown: the batch id settles it on retry
                Err(StoreError::transient(self.timeout("write a batch")))
            }
        }
    }

    async fn prune(&mut self, cutoff_ms: i64, limit: u32) -> Result<u64, LedgerError> {
        self.connect().await.map_err(|e| e.error)?;
        let Some(conn) = self.conn.as_ref() else {
            return Err(self.timeout("connect"));
        };
        let limit = i64::from(limit);
        let work = async {
            let deleted = conn
                .client
                .execute(
                    // ctids are stable within the statement (no one updates
                    // rows; the snapshot keeps a concurrently deleted row's
                    // slot from being reused).
                    // Any `limit` rows past the cutoff (no ORDER BY: a BRIN
                    // index finds them, it does not sort them); the pass
                    // repeats until none is left.
                    "DELETE FROM proxypal_ledger WHERE ctid = ANY (ARRAY \
                     (SELECT ctid FROM proxypal_ledger WHERE at_ms < $1 LIMIT $2))",
                    &[&cutoff_ms, &limit],
                )
                .await?;
            conn.client
                .execute(
                    "DELETE FROM proxypal_ledger_batches WHERE id IN \
                     (SELECT id FROM proxypal_ledger_batches WHERE at_ms < $1 LIMIT $2)",
                    &[&cutoff_ms, &limit],
                )
                .await?;
            Ok::<_, tokio_postgres::Error>(deleted)
        };
        match timeout(OP_TIMEOUT, work).await {
            Ok(Ok(deleted)) => Ok(deleted),
            Ok(Err(e)) => {
                self.classify(&e);
                Err(LedgerError::postgres(&self.target, "delete records past retention", e))
            }
            Err(_) => {
                self.conn = None;
                Err(self.timeout("delete records past retention"))
            }
        }
    }

    async fn usage(&mut self, query: &UsageQuery) -> Result<Vec<UsageRow>, LedgerError> {
        self.connect().await.map_err(|e| e.error)?;
        let Some(conn) = self.conn.as_ref() else {
            return Err(self.timeout("connect"));
        };
        let sql = usage_sql(query, Dialect::Postgres);
        let result = match &query.client {
            Some(client) => {
                timeout(OP_TIMEOUT, conn.client.query(&sql, &[&query.from_ms, &query.to_ms, client])).await
            }
            None => timeout(OP_TIMEOUT, conn.client.query(&sql, &[&query.from_ms, &query.to_ms])).await,
        };
        let rows = match result {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                self.classify(&e);
                return Err(LedgerError::postgres(&self.target, "aggregate usage", e));
            }
            Err(_) => {
                self.conn = None;
                return Err(self.timeout("aggregate usage"));
            }
        };
        rows.iter()
            .map(|row| usage_row(query, |i| row.try_get::<_, i64>(i), |i| row.try_get::<_, String>(i)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| LedgerError::postgres(&self.target, "read usage rows", e))
    }
}
