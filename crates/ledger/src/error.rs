//! The ledger's errors: each names the backend, where it points (a SQLite
//! path, a PostgreSQL target with any password masked) and the operation.

use std::fmt::Write as _;
use std::time::Duration;

/// What went wrong in the ledger, and where.
///
/// PostgreSQL targets are always shown with the password masked
/// (`postgres://user:***@host/db`), and the underlying error's causes are
/// spelled out (tokio-postgres' own message is only "db error").
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// A [`LedgerConfig`](crate::LedgerConfig) field is out of range.
    #[error("ledger config: `{field}` {problem}")]
    Config {
        /// The field, e.g. `batch`.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A SQLite operation failed.
    #[error("ledger (SQLite {path}): {operation}: {detail}")]
    Sqlite {
        /// The database file.
        path: String,
        /// What the ledger was doing, e.g. "write a batch".
        operation: &'static str,
        /// The error with its causes.
        detail: String,
        /// The error.
        #[source]
        source: Box<rusqlite::Error>,
    },
    /// A PostgreSQL operation failed (including connecting, and a URL that
    /// does not parse).
    #[error("ledger (PostgreSQL {target}): {operation}: {detail}")]
    Postgres {
        /// Where the ledger connects, password masked.
        target: String,
        /// What the ledger was doing, e.g. "connect".
        operation: &'static str,
        /// The error with its causes (the server's message for a db error).
        detail: String,
        /// The error.
        #[source]
        source: Box<tokio_postgres::Error>,
    },
    /// The database answered something the ledger cannot use, e.g. a name
    /// it had just added to the dictionary has no id (someone deleted it).
    /// The batch concerned is discarded.
    #[error("ledger ({backend} {target}): {operation}: {detail}")]
    Inconsistent {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// Where, password masked.
        target: String,
        /// What the ledger was doing.
        operation: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// An operation did not finish in time (a database that accepts the
    /// connection and then answers nothing).
    #[error("ledger ({backend} {target}): {operation}: no answer within {after:?}")]
    Timeout {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// Where, password masked.
        target: String,
        /// What the ledger was doing.
        operation: &'static str,
        /// The bound that ran out.
        after: Duration,
    },
    /// The database is down (the writer is waiting to retry): what was
    /// asked needs it. Records stay buffered meanwhile.
    #[error(
        "ledger ({backend}): the database is unreachable ({cause}); {pending} records buffered, next retry in {retry_in:?}"
    )]
    Unavailable {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// The last failure, password masked.
        cause: String,
        /// Records accepted and not yet written.
        pending: u64,
        /// When the writer tries again.
        retry_in: Duration,
    },
    /// The writer thread or its runtime could not be started.
    #[error("ledger ({backend}): could not start the writer: {source}")]
    Spawn {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The writer has stopped ([`Ledger::shutdown`](crate::Ledger::shutdown)
    /// was called): nothing more is written or queried.
    #[error("ledger ({backend}): the writer has stopped")]
    Closed {
        /// `sqlite` or `postgres`.
        backend: &'static str,
    },
    /// Shutdown could not write everything in time: these records are lost
    /// (and counted in [`LedgerStats::dropped`](crate::LedgerStats::dropped)).
    #[error("ledger ({backend}): {records} records were not written before shutdown and are lost")]
    Lost {
        /// `sqlite` or `postgres`.
        backend: &'static str,
        /// How many.
        records: u64,
    },
}

/// A `group_by` or `bucket` value that is not one of the known names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} '{value}' (expected one of: {expected})")]
pub struct ParseError {
    /// `group_by` or `bucket`.
    pub what: &'static str,
    /// The name given.
    pub value: String,
    /// The names accepted, comma separated.
    pub expected: &'static str,
}

/// `error` followed by its causes, `: `-separated.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

impl LedgerError {
    pub(crate) fn sqlite(path: &str, operation: &'static str, source: rusqlite::Error) -> Self {
        Self::Sqlite { path: path.to_owned(), operation, detail: chain(&source), source: Box::new(source) }
    }

    pub(crate) fn postgres(target: &str, operation: &'static str, source: tokio_postgres::Error) -> Self {
        Self::Postgres {
            target: target.to_owned(),
            operation,
            detail: chain(&source),
            source: Box::new(source),
        }
    }
}
