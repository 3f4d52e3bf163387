//! The shared backend: several replicas write one PostgreSQL ledger.
//!
//! A batch is one transaction: claim the batch's id in
//! `proxypal_ledger_batches` (`ON CONFLICT DO NOTHING`), then one
//! multi-row `INSERT … SELECT * FROM UNNEST($1::BIGINT[], …)` (one prepared
//! statement for any batch size, no parameter-count limit). If the
//! connection drops while `COMMIT` is in flight the outcome is unknown; the
//! writer keeps the batch and retries it, and the retry finds its id
//! already claimed when the first commit did land, so a batch is written
//! exactly once. The ids are kept as long as the records (same retention).
//!
//! Every round trip is bounded ([`OP_TIMEOUT`]): a server that stops
//! answering without closing the socket is treated like one that is gone
//! (the connection is dropped and re-made).

use std::borrow::Cow;
use std::time::Duration;

use tokio::time::timeout;
use tokio_postgres::{Client, Config, NoTls, Statement};
use tracing::debug;

use crate::error::LedgerError;
use crate::query::{Dialect, UsageQuery, UsageRow, usage_row, usage_sql};
use crate::redact::redact;
use crate::writer::{Batch, Failure, Store, StoreError};

/// Connecting, if the URL sets no `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Any one operation (connect and migrate, a batch, a prune chunk, a query).
const OP_TIMEOUT: Duration = Duration::from_secs(15);
/// The advisory lock migrations hold ("proxyldg"): replicas starting at
/// once migrate one after the other.
const MIGRATION_LOCK: i64 = 0x7072_6f78_796c_6467;

/// Schema versions, applied in order, each once.
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    "CREATE TABLE IF NOT EXISTS proxypal_ledger (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
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
        cache_hit BOOLEAN NOT NULL DEFAULT FALSE
    );
    -- One index, by time: every query is a time range; a client's rows are
    -- filtered within it. A second index (client, at_ms) cost a third of
    -- the writer's time per row (benches/ledger.sh).
    CREATE INDEX IF NOT EXISTS proxypal_ledger_at ON proxypal_ledger (at_ms);
    CREATE TABLE IF NOT EXISTS proxypal_ledger_batches (
        id TEXT PRIMARY KEY,
        at_ms BIGINT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS proxypal_ledger_batches_at ON proxypal_ledger_batches (at_ms);",
)];

const CLAIM: &str =
    "INSERT INTO proxypal_ledger_batches (id, at_ms) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING";

const INSERT: &str = "INSERT INTO proxypal_ledger (at_ms, client, model, provider, upstream_model, key_label, \
    status, attempts, ttfb_ms, total_ms, stream, prompt_tokens, completion_tokens, total_tokens, error, cache_hit) \
    SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], \
    $7::INTEGER[], $8::INTEGER[], $9::BIGINT[], $10::BIGINT[], $11::BOOLEAN[], $12::BIGINT[], $13::BIGINT[], \
    $14::BIGINT[], $15::TEXT[], $16::BOOLEAN[])";

pub(crate) struct PgStore {
    config: Config,
    /// The URL with the password masked, for errors and logs.
    target: String,
    conn: Option<Connected>,
}

struct Connected {
    client: Client,
    claim: Statement,
    insert: Statement,
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
        Ok(Self { config, target, conn: None })
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
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(target = %task_target, error = %crate::error::chain(&e), "ledger: PostgreSQL connection ended");
            }
        });
        migrate(&mut client, target).await?;
        let claim = client.prepare(CLAIM).await.map_err(err("prepare statements"))?;
        let insert = client.prepare(INSERT).await.map_err(err("prepare statements"))?;
        Ok(Connected { client, claim, insert })
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

async fn write_batch(conn: &mut Connected, batch: &Batch) -> Result<(), tokio_postgres::Error> {
    let records = &batch.records;
    let tx = conn.client.transaction().await?;
    let claimed = tx.execute(&conn.claim, &[&batch.id, &jiff::Timestamp::now().as_millisecond()]).await?;
    if claimed == 0 {
        // An earlier attempt committed although we never heard back.
        debug!(batch = %batch.id, "ledger: batch already written; not writing it twice");
        return tx.rollback().await;
    }
    let column = |f: fn(&crate::Record) -> Cow<'_, str>| records.iter().map(f).collect::<Vec<_>>();
    let at_ms: Vec<i64> = records.iter().map(|r| r.at_ms).collect();
    let client = column(|r| text(&r.client));
    let model = column(|r| text(&r.model));
    let provider = column(|r| text(&r.provider));
    let upstream_model = column(|r| text(&r.upstream_model));
    let key = column(|r| text(&r.key));
    let status: Vec<i32> = records.iter().map(|r| i32::from(r.status)).collect();
    let attempts: Vec<i32> = records.iter().map(|r| i32::from(r.attempts)).collect();
    let ttfb_ms: Vec<Option<i64>> = records.iter().map(|r| r.ttfb_ms.map(i64::from)).collect();
    let total_ms: Vec<i64> = records.iter().map(|r| i64::from(r.total_ms)).collect();
    let stream: Vec<bool> = records.iter().map(|r| r.stream).collect();
    let prompt: Vec<Option<i64>> = records.iter().map(|r| r.prompt_tokens.map(clamp)).collect();
    let completion: Vec<Option<i64>> = records.iter().map(|r| r.completion_tokens.map(clamp)).collect();
    let total: Vec<Option<i64>> = records.iter().map(|r| r.total_tokens.map(clamp)).collect();
    let error: Vec<Option<Cow<'_, str>>> = records.iter().map(|r| r.error.as_deref().map(text)).collect();
    let cache_hit: Vec<bool> = records.iter().map(|r| r.cache_hit).collect();
    tx.execute(
        &conn.insert,
        &[
            &at_ms,
            &client,
            &model,
            &provider,
            &upstream_model,
            &key,
            &status,
            &attempts,
            &ttfb_ms,
            &total_ms,
            &stream,
            &prompt,
            &completion,
            &total,
            &error,
            &cache_hit,
        ],
    )
    .await?;
    tx.commit().await
}

impl Store for PgStore {
    const BACKEND: &'static str = "postgres";
    const DISPLAY: &'static str = "PostgreSQL";

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
        match timeout(OP_TIMEOUT, write_batch(conn, batch)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                let failure = self.classify(&e);
                Err(StoreError { failure, error: LedgerError::postgres(&self.target, "write a batch", e) })
            }
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
                    "DELETE FROM proxypal_ledger WHERE id IN \
                     (SELECT id FROM proxypal_ledger WHERE at_ms < $1 ORDER BY at_ms LIMIT $2)",
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
