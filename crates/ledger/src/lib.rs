//! ProxyPal's usage ledger: one [`Record`] per finished proxied request,
//! written in batches off the request path to SQLite (embedded, the
//! default) or PostgreSQL (several replicas sharing one ledger), pruned by
//! retention, and aggregated for `GET /usage`.
//!
//! - **The request path never waits.** [`Ledger::record`] pushes into a
//!   bounded buffer and returns; when the buffer is full the record is
//!   dropped, counted in [`LedgerStats::dropped`] and warned about (at most
//!   once per 10 s).
//! - **One writer** takes up to [`LedgerConfig::batch`] records per
//!   transaction, whenever a batch fills up and every
//!   [`LedgerConfig::flush_every`], on a dedicated thread with its own
//!   runtime that owns the connection (SQLite's or PostgreSQL's): the
//!   database's work never occupies a thread that serves requests.
//! - **The database may go away.** Records stay buffered, the writer retries
//!   with backoff (100 ms doubling to 5 s) and reconnects, logging one
//!   warning per outage and one line when it is back. A batch being written
//!   when the connection fails is kept and written once.
//! - **Retention** runs at start and hourly, in bounded chunks.
//! - **Rows hold integers.** Names (client, model, provider, upstream
//!   model, key, error) are stored once in `proxypal_ledger_names` and rows
//!   hold their ids; the writer remembers the ids it has seen, and
//!   `/usage` joins the names back.
//! - **A batch is one database row.** Its records are packed into one page
//!   of `proxypal_ledger_pages` (a JSON array of integer arrays, with the
//!   page's time span), so the database's work per request is a few
//!   dozen bytes, not a row with 16 values. The view `proxypal_ledger`
//!   unpacks the pages into one row per record, and `proxypal_ledger_named`
//!   shows those rows with their names, for people and tools reading the
//!   database with plain SQL.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use proxypal_ledger::{Bucket, Ledger, LedgerConfig, Record, UsageQuery};
//!
//! let ledger = Ledger::start(LedgerConfig::sqlite("/var/lib/proxypal/ledger.db")).await?;
//! ledger.record(Record {
//!     at_ms: 1_796_130_000_000,
//!     client: "alice".into(),
//!     model: "llama-3.3-70b".into(),
//!     status: 200,
//!     total_tokens: Some(1_234),
//!     ..Record::default()
//! });
//! let rows = ledger
//!     .usage(&UsageQuery {
//!         from_ms: 1_796_083_200_000,
//!         to_ms: 1_796_169_600_000,
//!         group_by: "client,model".parse()?,
//!         bucket: Bucket::Hour,
//!         client: None,
//!     })
//!     .await?;
//! println!("{}", proxypal_ledger::to_csv(&rows));
//! ledger.shutdown().await?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod error;
mod names;
mod pages;
mod postgres;
mod query;
mod redact;
mod sqlite;
#[cfg(feature = "testing")]
pub mod testing;
mod writer;

use std::borrow::Cow;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

pub use error::{LedgerError, ParseError};
pub use query::{Bucket, GroupBy, UsageQuery, UsageRow, to_csv};

use writer::{Command, Settings, Shared, Writer};

/// One finished proxied request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// When the request finished, unix ms.
    pub at_ms: i64,
    /// The client's name (the caller decides what anonymous requests use).
    pub client: Arc<str>,
    /// The public model name the client asked for.
    pub model: Arc<str>,
    /// The provider that served (or last tried) it.
    pub provider: Arc<str>,
    /// The provider's name for the model.
    pub upstream_model: Arc<str>,
    /// The key's name or masked label, never a secret (the caller guarantees it).
    pub key: Arc<str>,
    /// The HTTP status returned to the client.
    pub status: u16,
    /// Upstream attempts made (failovers included).
    pub attempts: u8,
    /// Latency to the first response byte, if one came.
    pub ttfb_ms: Option<u32>,
    /// Latency to the end of the response.
    pub total_ms: u32,
    /// Whether the response was streamed (SSE).
    pub stream: bool,
    /// Prompt tokens, when the upstream reported them.
    pub prompt_tokens: Option<u64>,
    /// Completion tokens, when reported.
    pub completion_tokens: Option<u64>,
    /// Total tokens, when reported.
    pub total_tokens: Option<u64>,
    /// The error class when it failed, e.g. `rate_limited`, `upstream_error`.
    pub error: Option<Cow<'static, str>>,
    /// Served from the response cache (reserved; stored, `false` for now).
    pub cache_hit: bool,
}

/// Where the ledger lives.
#[derive(Clone, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file (created if missing), written by one process.
    Sqlite {
        /// The database file; `:memory:` for a ledger that dies with the process.
        path: PathBuf,
    },
    /// A PostgreSQL database, which several replicas can share.
    Postgres {
        /// `postgres://user:password@host:port/db` or libpq key=value form
        /// (no TLS). `Debug` masks the password.
        url: String,
    },
}

impl Backend {
    /// `sqlite` or `postgres`, as in [`LedgerStats::backend`].
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sqlite { .. } => "sqlite",
            Self::Postgres { .. } => "postgres",
        }
    }

    /// The path, or the URL with any password masked: safe to log.
    pub fn target(&self) -> String {
        match self {
            Self::Sqlite { path } => path.display().to_string(),
            Self::Postgres { url } => redact::redact(url),
        }
    }
}

impl fmt::Debug for Backend {
    /// The PostgreSQL URL is shown with its password masked.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite { path } => f.debug_struct("Sqlite").field("path", path).finish(),
            Self::Postgres { url } => f.debug_struct("Postgres").field("url", &redact::redact(url)).finish(),
        }
    }
}

/// How the ledger stores, batches and keeps records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerConfig {
    /// Where.
    pub backend: Backend,
    /// Records older than this are deleted (at start, then hourly).
    pub retention: Duration,
    /// Records per transaction, at most.
    pub batch: usize,
    /// Records accepted and not yet written, at most (the memory bound
    /// while the database is slow or down); beyond it records are dropped.
    pub buffer: usize,
    /// The longest a record waits in the buffer while the database is up.
    pub flush_every: Duration,
}

impl LedgerConfig {
    /// Default [`retention`](Self::retention): 90 days.
    pub const DEFAULT_RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);
    /// Default [`batch`](Self::batch): 2048. A commit costs the database
    /// about the same whatever its size (PostgreSQL's server spent ~270 µs
    /// of CPU per commit, flushing its WAL), so at a busy proxy's rate
    /// bigger batches cost less per record: PostgreSQL's server CPU per
    /// record was 0.77–0.90 µs with 512, 0.43 µs with 2048
    /// (`examples/write_cost`). A batch is one page of ~70 bytes a record.
    pub const DEFAULT_BATCH: usize = 2048;
    /// Default [`buffer`](Self::buffer).
    pub const DEFAULT_BUFFER: usize = 65_536;
    /// Default [`flush_every`](Self::flush_every).
    pub const DEFAULT_FLUSH_EVERY: Duration = Duration::from_secs(1);

    /// `backend` with the defaults.
    pub fn new(backend: Backend) -> Self {
        Self {
            backend,
            retention: Self::DEFAULT_RETENTION,
            batch: Self::DEFAULT_BATCH,
            buffer: Self::DEFAULT_BUFFER,
            flush_every: Self::DEFAULT_FLUSH_EVERY,
        }
    }

    /// A SQLite file with the defaults.
    pub fn sqlite(path: impl Into<PathBuf>) -> Self {
        Self::new(Backend::Sqlite { path: path.into() })
    }

    /// A PostgreSQL URL with the defaults.
    pub fn postgres(url: impl Into<String>) -> Self {
        Self::new(Backend::Postgres { url: url.into() })
    }

    /// Checks the numbers; the error names the field.
    pub fn validate(&self) -> Result<(), LedgerError> {
        let problem = |field, problem: &str| Err(LedgerError::Config { field, problem: problem.to_owned() });
        if self.batch == 0 {
            return problem("batch", "must be at least 1");
        }
        if self.buffer == 0 {
            return problem("buffer", "must be at least 1");
        }
        if self.flush_every.is_zero() {
            return problem("flush_every", "must be more than zero");
        }
        if self.retention.is_zero() {
            return problem("retention", "must be more than zero");
        }
        Ok(())
    }
}

/// Counters for `/stats`: a snapshot, each value read atomically.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LedgerStats {
    /// `sqlite` or `postgres`.
    pub backend: &'static str,
    /// Records accepted and not yet written (buffered or being written).
    pub pending: u64,
    /// Records written.
    pub written: u64,
    /// Transactions that wrote them.
    pub batches: u64,
    /// Records dropped: the buffer was full, they came after shutdown, or
    /// shutdown could not write them in time.
    pub dropped: u64,
    /// Records the database refused as data (discarded, logged as errors);
    /// nothing the ledger writes is expected to get here.
    pub rejected: u64,
    /// Failed attempts to connect or write a batch.
    pub write_failures: u64,
    /// Whether the last connect or write succeeded.
    pub up: bool,
}

/// The ledger handle: cheap to clone (an `Arc` inside), `Send + Sync`.
///
/// The writer stops on [`shutdown`](Self::shutdown) or when the last handle
/// is dropped (then it still writes what is buffered, within 5 s).
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    /// Path or masked URL.
    target: String,
}

impl fmt::Debug for Ledger {
    /// Backend, target (password masked) and counters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger")
            .field("backend", &self.inner.shared.backend)
            .field("target", &self.inner.target)
            .field("stats", &self.stats())
            .finish()
    }
}

/// # Starting and stopping
impl Ledger {
    /// Opens (creating) the database, applies migrations and starts the
    /// writer, whose first job is a retention pass.
    ///
    /// Errors if the config is invalid or the database cannot be opened or
    /// reached now; the server decides whether that is fatal. Later outages
    /// are not errors: records are buffered and the writer reconnects.
    ///
    /// The writer runs on a thread of its own (with its own single-threaded
    /// runtime), for either backend: SQLite's calls block only it, and
    /// encoding and sending PostgreSQL's batches never occupies a thread
    /// that serves requests.
    pub async fn start(config: LedgerConfig) -> Result<Self, LedgerError> {
        config.validate()?;
        let backend = config.backend.name();
        let target = config.backend.target();
        let shared = Arc::new(Shared::new(backend, config.buffer, config.batch));
        let settings =
            Settings { batch: config.batch, flush_every: config.flush_every, retention: config.retention };
        let (commands, receiver) = mpsc::unbounded_channel();
        let writer_shared = Arc::clone(&shared);
        let started = match config.backend {
            Backend::Sqlite { path } => {
                spawn_writer(backend, writer_shared, settings, receiver, || async move {
                    sqlite::SqliteStore::open(&path)
                })?
            }
            Backend::Postgres { url } => {
                let store = postgres::PgStore::new(&url)?;
                spawn_writer(backend, writer_shared, settings, receiver, || async move {
                    let mut store = store;
                    writer::Store::connect(&mut store).await.map_err(|e| e.error)?;
                    Ok(store)
                })?
            }
        };
        started.await.map_err(|_| LedgerError::Closed { backend })??;
        tracing::info!(backend, %target, "ledger: started");
        Ok(Self { inner: Arc::new(Inner { shared, commands, target }) })
    }

    /// Stops accepting records, writes what is buffered (trying for up to
    /// 5 s while the database is down) and stops the writer. Records that
    /// could not be written are counted as dropped and reported as
    /// [`LedgerError::Lost`]. Calling it again returns [`LedgerError::Closed`].
    pub async fn shutdown(&self) -> Result<(), LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Shutdown { reply })?;
        // The writer bounds its own wait; this bounds a writer stuck in a
        // long query (each PostgreSQL operation is bounded too).
        let bound = writer::SHUTDOWN_WAIT + Duration::from_secs(20);
        match tokio::time::timeout(bound, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.closed()),
            Err(_) => Err(LedgerError::Timeout {
                backend: self.inner.shared.backend,
                target: self.inner.target.clone(),
                operation: "shut down",
                after: bound,
            }),
        }
    }

    /// [`shutdown`](Self::shutdown), consuming this handle.
    pub async fn close(self) -> Result<(), LedgerError> {
        self.shutdown().await
    }
}

/// # Recording
impl Ledger {
    /// Queues `record` for writing. Never blocks or awaits: a push into the
    /// bounded buffer. When the buffer is full (or the ledger is shut down)
    /// the record is dropped and counted, with a warning at most every 10 s.
    pub fn record(&self, record: Record) {
        self.inner.shared.push(record);
    }

    /// Waits until every record recorded before this call is written.
    /// Errors at once if the database is unreachable now (the records stay
    /// buffered and are written when it is back).
    pub async fn flush(&self) -> Result<(), LedgerError> {
        let target = self.inner.shared.accepted();
        let (reply, answer) = oneshot::channel();
        self.send(Command::Flush { target, reply })?;
        answer.await.map_err(|_| self.closed())?
    }

    /// The counters, now.
    pub fn stats(&self) -> LedgerStats {
        self.inner.shared.stats()
    }
}

/// Starts the writer thread: `open` makes the store there (a store opened
/// or connected on that thread, its connection task on that runtime), then
/// the [`Writer`] runs until shutdown. The receiver answers once the store
/// is open, or with why it could not be.
fn spawn_writer<S, F, Fut>(
    backend: &'static str,
    shared: Arc<Shared>,
    settings: Settings,
    receiver: mpsc::UnboundedReceiver<Command>,
    open: F,
) -> Result<oneshot::Receiver<Result<(), LedgerError>>, LedgerError>
where
    S: writer::Store + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<S, LedgerError>>,
{
    let (ready, started) = oneshot::channel();
    let spawn_error = move |source| LedgerError::Spawn { backend, source };
    std::thread::Builder::new()
        .name("proxypal-ledger".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready.send(Err(spawn_error(e)));
                    return;
                }
            };
            runtime.block_on(async move {
                match open().await {
                    Ok(store) => {
                        let _ = ready.send(Ok(()));
                        Writer::new(store, shared, settings).run(receiver).await;
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                    }
                }
            });
        })
        .map_err(spawn_error)?;
    Ok(started)
}

/// # Reading and housekeeping
impl Ledger {
    /// Aggregates per `query`, after a best-effort [`flush`](Self::flush)
    /// (so a client sees its last request). Rows are ordered by bucket, then
    /// by the grouped columns (byte order). Without grouping or bucket the
    /// answer is one total row, zeros included.
    ///
    /// Runs on the writer, between batches: a long aggregation delays
    /// writes (records wait in the buffer), it never blocks `record`.
    pub async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>, LedgerError> {
        if let Err(e) = self.flush().await {
            tracing::debug!(error = %e, "ledger: flush before usage failed");
        }
        let (reply, answer) = oneshot::channel();
        self.send(Command::Usage { query: query.clone(), reply })?;
        answer.await.map_err(|_| self.closed())?
    }

    /// Runs a whole retention pass now (it also runs at start and hourly):
    /// deletes records older than now − [`LedgerConfig::retention`] and
    /// returns how many went.
    pub async fn prune_now(&self) -> Result<u64, LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Prune { reply })?;
        answer.await.map_err(|_| self.closed())?
    }

    fn send(&self, command: Command) -> Result<(), LedgerError> {
        self.inner.commands.send(command).map_err(|_| self.closed())
    }

    fn closed(&self) -> LedgerError {
        LedgerError::Closed { backend: self.inner.shared.backend }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_send_sync_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<Ledger>();
    }

    #[test]
    fn config_debug_masks_the_password() {
        let config = LedgerConfig::postgres("postgres://u:secretpw@host/db");
        let debug = format!("{config:?}");
        assert!(!debug.contains("secretpw"), "{debug}");
        assert!(debug.contains("postgres://u:***@host/db"), "{debug}");
        let conninfo = LedgerConfig::postgres("host=h user=u password=secretpw");
        assert!(!format!("{conninfo:?}").contains("secretpw"));
    }

    #[test]
    fn validate_names_the_field() {
        let mut config = LedgerConfig::sqlite(":memory:");
        assert!(config.validate().is_ok());
        config.batch = 0;
        assert_eq!(config.validate().unwrap_err().to_string(), "ledger config: `batch` must be at least 1");
    }
}
