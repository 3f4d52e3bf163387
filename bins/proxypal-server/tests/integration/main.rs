//! proxypal-server's integration tests, in one test binary (one link, one
//! process): each former `tests/*.rs` file is a module here. Run one area
//! with a filter, e.g. `cargo test -p proxypal-server --test integration hardening::`.
//!
//! They share the process, so no test may change process-wide state that
//! another test sees: none sets environment variables (`Config` tests pass
//! env layers explicitly) or installs signal handlers (signals go to the
//! compiled binary, spawned as a child); everything binds port 0 on 127.0.0.1.
//! Two process-wide hooks are installed once and tolerate the other tests:
//! `proxy` installs a global tracing subscriber capturing every test's logs
//! (it only looks for its own keys), and `hardening` a panic hook counting
//! panics in the whole process (no passing test panics).
//!
//! `tests/load.rs` stays a binary of its own: it measures the resident memory
//! of its process, which no other test may share.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on bad setup

// Shared helpers.
mod common;
mod hardening_support;

mod anthropic;
mod cache;
mod clients;
mod config;
mod dashboard;
mod hardening;
mod ledger;
mod observability;
mod persistence;
mod providers;
mod proxy;
mod quota;
mod replicas;
mod webhooks;
mod windows;
mod workers;
