//! The embedded store that keeps quota state across restarts: SQLite (through
//! `rusqlite` with its bundled library, so no system SQLite is needed), one
//! file at `state.path`.
//!
//! A background thread saves the gateway's state every second in one
//! transaction — never on the request path, never more than about a second of
//! state lost in a crash — and once more at a clean shutdown, marked clean.
//! At start the saved state is put back; after a crash (no clean mark) the
//! quota engine errs on the safe side for what was lost, from the last save.
//! A save whose content did not change only updates the save time.
//!
//! Keys are stored by fingerprint only (`sha256:…`), never the key itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use proxypal_gateway::Gateway;
use proxypal_gateway::keypool::CooldownReason;
use proxypal_gateway::limiter::{QuotaClock, SavedBudget, SavedWindow, Unit};
use proxypal_gateway::state::{SavedKey, SavedState};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

/// What the store's `format` row says: anything else is not our file.
const FORMAT: &str = "proxypal-state";
/// The schema this build writes and reads.
const VERSION: i64 = 1;
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// How often the state is saved.
pub const SAVE_INTERVAL: Duration = Duration::from_secs(1);

/// Why the state store cannot be used. Each names the file and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The file exists but is not a ProxyPal state file (another program's
    /// database, or not a database at all).
    #[error(
        "state.path {path}: not a ProxyPal state file ({reason}); nothing was changed — move the file away or set state.path to another file"
    )]
    Foreign {
        /// The file.
        path: PathBuf,
        /// What was found.
        reason: String,
    },
    /// Another process (another ProxyPal) holds the file.
    #[error(
        "state.path {path}: in use by another process (another ProxyPal on the same file?); each replica needs a state file of its own"
    )]
    InUse {
        /// The file.
        path: PathBuf,
    },
    /// The file cannot be opened, read or written.
    #[error(
        "state.path {path}: {source}; check the path and its permissions, or set state.path to another file"
    )]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rusqlite::Error,
    },
}

/// The store: one SQLite connection (used by one thread at a time).
#[derive(Debug)]
pub struct StateStore {
    conn: Connection,
    path: PathBuf,
}

impl StateStore {
    /// Opens (or creates) the store at `path`.
    ///
    /// # Errors
    /// [`StateError::Foreign`] for a file that is not ours (left untouched),
    /// [`StateError::Io`] when it cannot be opened or written.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let io = |source| StateError::Io { path: path.to_owned(), source };
        let foreign = |reason: String| StateError::Foreign { path: path.to_owned(), reason };
        let existed = path.metadata().is_ok_and(|m| m.len() > 0);
        let conn = Connection::open(path).map_err(io)?;
        conn.busy_timeout(Duration::from_millis(500)).map_err(io)?;
        let in_use = |e: &rusqlite::Error| e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy);
        // Reading the schema is what fails on a file that is not a database.
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(|e| {
                if in_use(&e) {
                    StateError::InUse { path: path.to_owned() }
                } else {
                    foreign(format!("not an SQLite database: {e}"))
                }
            })?;
        if existed && !tables.iter().any(|t| t == "proxypal_meta") {
            return Err(foreign(format!("an SQLite database with other tables: {}", tables.join(", "))));
        }
        if tables.iter().any(|t| t == "proxypal_meta") {
            let format: Option<String> = conn
                .query_row("SELECT value FROM proxypal_meta WHERE name = 'format'", [], |r| r.get(0))
                .optional()
                .map_err(io)?;
            if format.as_deref() != Some(FORMAT) {
                return Err(foreign(format!("format {format:?}")));
            }
            let version: Option<String> = conn
                .query_row("SELECT value FROM proxypal_meta WHERE name = 'version'", [], |r| r.get(0))
                .optional()
                .map_err(io)?;
            if version.as_deref() != Some(&VERSION.to_string()) {
                return Err(foreign(format!(
                    "schema version {} (this build reads {VERSION}); a newer ProxyPal wrote it",
                    version.unwrap_or_default()
                )));
            }
        }
        // Tables and the format mark in one transaction: a kill in between
        // cannot leave a file that a later start takes for someone else's.
        // One writer: the first write takes an exclusive lock that this
        // connection keeps until the process ends, so a second process on the
        // same file is refused at its start instead of overwriting this one.
        conn.execute_batch("PRAGMA locking_mode = EXCLUSIVE;").map_err(io)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             BEGIN IMMEDIATE;
             CREATE TABLE IF NOT EXISTS proxypal_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS proxypal_budgets (
                 id TEXT PRIMARY KEY, blocked_until INTEGER NOT NULL, reserved INTEGER NOT NULL, windows TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS proxypal_keys (
                 id TEXT PRIMARY KEY, disabled INTEGER NOT NULL, cooling_until INTEGER, reason TEXT);",
        )
        .map_err(|e| if in_use(&e) { StateError::InUse { path: path.to_owned() } } else { io(e) })?;
        conn.execute(
            "INSERT OR IGNORE INTO proxypal_meta (name, value) VALUES ('format', ?1), ('version', ?2)",
            params![FORMAT, VERSION.to_string()],
        )
        .map_err(io)?;
        conn.execute_batch("COMMIT;").map_err(io)?;
        Ok(Self { conn, path: path.to_owned() })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved state and whether it was saved at a clean shutdown; `None`
    /// for a new store.
    ///
    /// # Errors
    /// The file cannot be read, or holds rows this build cannot read.
    pub fn load(&self) -> Result<Option<(SavedState, bool)>, StateError> {
        let io = |source| StateError::Io { path: self.path.clone(), source };
        let meta = |name: &str| -> Result<Option<String>, StateError> {
            self.conn
                .query_row("SELECT value FROM proxypal_meta WHERE name = ?1", [name], |r| r.get(0))
                .optional()
                .map_err(io)
        };
        let Some(saved_at) = meta("saved_at")?.and_then(|v| v.parse::<u64>().ok()) else { return Ok(None) };
        let clean = meta("clean")?.as_deref() == Some("1");
        let mut budgets = Vec::new();
        let mut stmt = self
            .conn
            .prepare("SELECT id, blocked_until, reserved, windows FROM proxypal_budgets")
            .map_err(io)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, String>(3)?))
            })
            .map_err(io)?;
        for row in rows {
            let (id, blocked_until, reserved, windows) = row.map_err(io)?;
            let windows = parse_windows(&windows).ok_or_else(|| StateError::Foreign {
                path: self.path.clone(),
                reason: format!("budget {id}: unreadable windows"),
            })?;
            budgets.push(SavedBudget {
                id,
                windows,
                blocked_until: to_u64(blocked_until),
                reserved: to_u64(reserved),
            });
        }
        let mut keys = Vec::new();
        let mut stmt =
            self.conn.prepare("SELECT id, disabled, cooling_until, reason FROM proxypal_keys").map_err(io)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, bool>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                ))
            })
            .map_err(io)?;
        for row in rows {
            let (id, disabled, until, reason) = row.map_err(io)?;
            let reason = match reason.as_deref() {
                Some("rate_limited") => CooldownReason::RateLimited,
                _ => CooldownReason::Failures,
            };
            keys.push(SavedKey { id, disabled, cooling: until.map(|u| (to_u64(u), reason)) });
        }
        Ok(Some((SavedState { saved_at, budgets, keys }, clean)))
    }

    /// Records that the stored state is still current at `saved_at` (one
    /// small write instead of the whole state).
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn touch(&mut self, saved_at: u64) -> Result<(), StateError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO proxypal_meta (name, value) VALUES ('saved_at', ?1), ('clean', '0')",
                [saved_at.to_string()],
            )
            .map(drop)
            .map_err(|source| StateError::Io { path: self.path.clone(), source })
    }

    /// Replaces the stored state with `state` in one transaction.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn save(&mut self, state: &SavedState, clean: bool) -> Result<(), StateError> {
        let path = self.path.clone();
        let io = |source| StateError::Io { path: path.clone(), source };
        let tx = self.conn.transaction().map_err(io)?;
        tx.execute("DELETE FROM proxypal_budgets", []).map_err(io)?;
        tx.execute("DELETE FROM proxypal_keys", []).map_err(io)?;
        {
            let mut insert = tx
                .prepare("INSERT INTO proxypal_budgets (id, blocked_until, reserved, windows) VALUES (?1, ?2, ?3, ?4)")
                .map_err(io)?;
            for b in &state.budgets {
                insert
                    .execute(params![
                        b.id,
                        to_i64(b.blocked_until),
                        to_i64(b.reserved),
                        windows_json(&b.windows)
                    ])
                    .map_err(io)?;
            }
            let mut insert = tx
                .prepare(
                    "INSERT INTO proxypal_keys (id, disabled, cooling_until, reason) VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(io)?;
            for k in &state.keys {
                let (until, reason) = match k.cooling {
                    Some((until, reason)) => (Some(to_i64(until)), Some(reason.as_str())),
                    None => (None, None),
                };
                insert.execute(params![k.id, k.disabled, until, reason]).map_err(io)?;
            }
        }
        tx.execute(
            "INSERT OR REPLACE INTO proxypal_meta (name, value) VALUES ('saved_at', ?1), ('clean', ?2)",
            params![state.saved_at.to_string(), if clean { "1" } else { "0" }],
        )
        .map_err(io)?;
        tx.commit().map_err(io)
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The windows as JSON, written by hand: it runs every second over every
/// entry of every log, and building `serde_json::Value`s cost several times
/// more (measured with callgrind).
fn windows_json(windows: &[SavedWindow]) -> String {
    use std::fmt::Write as _;
    let entries: usize = windows.iter().map(|w| w.entries.len()).sum();
    let mut out = String::with_capacity(64 * windows.len() + 24 * entries);
    out.push('[');
    for (i, w) in windows.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let period = u64::try_from(w.period.as_nanos()).unwrap_or(u64::MAX);
        // Writing to a String cannot fail.
        let _ = write!(
            out,
            r#"{{"unit":"{}","period_ns":{period},"fixed":{},"entries":["#,
            w.unit.as_str(),
            w.fixed
        );
        for (j, (at, amount)) in w.entries.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            let _ = write!(out, "[{at},{amount}]");
        }
        out.push_str("]}");
    }
    out.push(']');
    out
}

fn parse_windows(text: &str) -> Option<Vec<SavedWindow>> {
    let list: Vec<Value> = serde_json::from_str(text).ok()?;
    list.iter()
        .map(|w| {
            let unit = match w["unit"].as_str()? {
                "requests" => Unit::Requests,
                "tokens" => Unit::Tokens,
                _ => return None,
            };
            let entries = w["entries"]
                .as_array()?
                .iter()
                .map(|e| Some((e.get(0)?.as_u64()?, e.get(1)?.as_u64()?)))
                .collect::<Option<Vec<_>>>()?;
            Some(SavedWindow {
                unit,
                period: Duration::from_nanos(w["period_ns"].as_u64()?),
                fixed: w["fixed"].as_bool()?,
                entries,
            })
        })
        .collect()
}

/// The thread that saves the gateway's state every [`SAVE_INTERVAL`].
#[derive(Debug)]
pub struct Saver {
    stop: mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Saver {
    /// Starts saving `gateway`'s state into `store`.
    ///
    /// # Errors
    /// The thread cannot be started.
    pub fn start(gateway: Arc<Gateway>, mut store: StateStore) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new().name("proxypal-state".into()).spawn(move || {
            let mut failing = false;
            let mut last: Option<SavedState> = None;
            loop {
                let clean = match stopped.recv_timeout(SAVE_INTERVAL) {
                    Err(mpsc::RecvTimeoutError::Timeout) => false,
                    Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => true,
                };
                let state = gateway.save_state();
                // An idle proxy rewrites nothing but the time of the save: after a
                // crash that time says how long ago grants could still be made.
                let unchanged =
                    last.as_ref().is_some_and(|l| l.budgets == state.budgets && l.keys == state.keys);
                let saved = if unchanged && !clean && !failing {
                    store.touch(state.saved_at)
                } else {
                    store.save(&state, clean)
                };
                if saved.is_ok() && !unchanged {
                    last = Some(state);
                }
                match saved {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::warn!(path = %store.path().display(), "quota state is being saved again");
                    }
                    Ok(()) => {}
                    Err(e) if !failing => {
                        failing = true;
                        tracing::error!(error = %e, "cannot save the quota state; it will be lost on restart until this is fixed");
                    }
                    Err(_) => {}
                }
                if clean {
                    break;
                }
            }
        })?;
        Ok(Self { stop, thread: Some(thread) })
    }

    /// Saves once more, marked clean, and stops the thread (blocking).
    pub fn finish(mut self) {
        let _ = self.stop.send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Opens the store at `path` and puts its saved state back into `gateway`,
/// logging what it did.
///
/// # Errors
/// See [`StateStore::open`] and [`StateStore::load`].
pub fn restore(gateway: &Gateway, path: &Path) -> Result<StateStore, StateError> {
    let store = StateStore::open(path)?;
    match store.load()? {
        None => tracing::info!(path = %path.display(), "new quota state store"),
        Some((state, clean)) => {
            // Saved (or touched) every second: a crash came at most about a second
            // after the last save; two leave room for a slow write.
            let crashed_at = (!clean).then(|| state.saved_at.saturating_add(2 * nanos(SAVE_INTERVAL)));
            gateway.restore_state(&state, crashed_at);
            let now = gateway.quotas().clock().now();
            let age = Duration::from_nanos(now.saturating_sub(state.saved_at));
            if clean {
                tracing::info!(path = %path.display(), age = ?age, budgets = state.budgets.len(), "quota state restored");
            } else {
                tracing::warn!(
                    path = %path.display(), age = ?age, budgets = state.budgets.len(),
                    "quota state restored after an unclean stop: up to a second of grants may be lost, so windows count as spent where that could matter"
                );
            }
        }
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_round_trip_through_their_json() {
        let windows = vec![
            SavedWindow {
                unit: Unit::Requests,
                period: Duration::from_secs(60),
                fixed: false,
                entries: vec![(1, 1), (u64::MAX, 2)],
            },
            SavedWindow {
                unit: Unit::Tokens,
                period: Duration::from_secs(86_400),
                fixed: true,
                entries: vec![],
            },
        ];
        let text = windows_json(&windows);
        assert!(serde_json::from_str::<Value>(&text).is_ok(), "{text}");
        assert_eq!(parse_windows(&text), Some(windows));
        assert_eq!(parse_windows("[{\"unit\":\"bananas\"}]"), None);
    }

    #[test]
    fn a_second_process_on_the_same_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("proxypal-state-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.db");
        let mut first = StateStore::open(&path).unwrap();
        first.save(&SavedState::default(), false).unwrap();
        let second = StateStore::open(&path);
        assert!(matches!(second, Err(StateError::InUse { .. })), "{second:?}");
        let msg = second.unwrap_err().to_string();
        assert!(msg.contains("state.db") && msg.contains("another ProxyPal"), "{msg}");
        drop(first);
        assert!(StateStore::open(&path).is_ok(), "free again once the first is gone");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
