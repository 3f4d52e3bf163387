//! Table tests of the translation, as the gateway will use it: request,
//! response and stream event translation, and a recorded Claude Code-style
//! request translated without loss.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod claude_code;
mod request;
mod response;
mod stream;
