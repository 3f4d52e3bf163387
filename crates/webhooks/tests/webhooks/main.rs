//! Integration tests: real sockets on 127.0.0.1, a real hyper receiver, no mocks.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod dedup;
mod delivery;
mod filtering;
mod queue;
mod retries;
mod support;
