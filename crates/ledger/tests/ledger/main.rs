//! The ledger against real databases: SQLite files, and PostgreSQL servers
//! of the tests' own (`proxypal_ledger::testing::Postgres`), stopped and
//! restarted mid-run. Every wait is bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod config;
mod postgres;
mod sqlite;
