//! proxypal-upstream's integration tests, in one test binary (one link, one
//! process): each former `tests/*.rs` file is a module here. Run one area with
//! a filter, e.g. `cargo test -p proxypal-upstream --test integration tls::`.
//! Every test serves on its own 127.0.0.1 port 0 and touches no process-wide
//! state, so they share the process.

// Test code: a panic is the failure report. (`allow-unwrap-in-tests` covers only `#[test]` fns,
// not the helpers and server closures here.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

// Shared helpers.
mod support;

mod pool;
mod tls;
mod upstream;
