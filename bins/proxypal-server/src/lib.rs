//! ProxyPal's server: configuration (and, soon, the HTTP front end that spreads
//! OpenAI-compatible requests over a pool of upstream API keys).
//!
//! The binary (`src/main.rs`) stays thin: it loads a [`config::Config`],
//! validates it before binding any socket, and hands it to the library.
//!
//! ```no_run
//! # fn example() -> Result<(), proxypal_server::config::ConfigError> {
//! use std::path::Path;
//! use proxypal_server::config::Config;
//!
//! let config = Config::load(Some(Path::new("/etc/proxypal/proxypal.yaml")))?;
//! println!("{}", config.summary());
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod config;
