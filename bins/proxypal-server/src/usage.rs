//! The usage ledger in the server: where it lives (`ledger:`), how the
//! gateway's finished requests become its rows, `GET /usage`, and its
//! health in `/stats` and `/metrics`.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::header::CONTENT_TYPE;
use http::{HeaderValue, Response, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proxypal_gateway::openai::error_response;
use proxypal_gateway::usage::{Finished, UsageSink};
use proxypal_gateway::{Caller, ProxyBody};
use proxypal_ledger::{Backend, Bucket, GroupBy, Ledger, LedgerConfig, Record, UsageQuery};

use crate::config::{Config, LedgerBackend};

/// The client name recorded for requests of operators (`auth.tokens`) and
/// of an open proxy.
pub const ANONYMOUS: &str = "-";

/// The ledger `config` asks for, given the state file in use (`None`: no
/// ledger — switched off, or SQLite with neither a path nor a state file).
pub fn ledger_config(config: &Config, state: Option<&Path>) -> Option<LedgerConfig> {
    let l = &config.ledger;
    if !l.enabled {
        return None;
    }
    let backend = match l.backend {
        LedgerBackend::Postgres => Backend::Postgres { url: l.url.as_ref()?.expose().to_owned() },
        _ => Backend::Sqlite { path: l.path.clone().or_else(|| state.map(sibling))? },
    };
    let mut ledger = LedgerConfig::new(backend);
    ledger.retention = l.retention;
    ledger.buffer = l.buffer;
    Some(ledger)
}

/// `state.db` → `state-ledger.db`: the ledger beside the quota state (a
/// file of its own: the state store holds its file exclusively).
fn sibling(state: &Path) -> PathBuf {
    let stem = state.file_stem().map_or_else(|| "proxypal".into(), |s| s.to_string_lossy().into_owned());
    let name = match state.extension() {
        Some(ext) => format!("{stem}-ledger.{}", ext.to_string_lossy()),
        None => format!("{stem}-ledger"),
    };
    state.with_file_name(name)
}

/// The gateway's finished requests, written to the ledger.
#[derive(Debug)]
pub struct LedgerSink {
    ledger: Ledger,
    /// [`ANONYMOUS`] and the empty name, shared by every record that needs
    /// them (no allocation per request).
    anonymous: Arc<str>,
    empty: Arc<str>,
}

impl LedgerSink {
    /// Records into `ledger`.
    pub fn new(ledger: Ledger) -> Self {
        Self { ledger, anonymous: Arc::from(ANONYMOUS), empty: Arc::from("") }
    }
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl UsageSink for LedgerSink {
    fn finished(&self, r: Finished) {
        let at_ms =
            r.at.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let usage = r.usage.unwrap_or_default();
        self.ledger.record(Record {
            at_ms,
            client: r.client.unwrap_or_else(|| Arc::clone(&self.anonymous)),
            model: r.model,
            provider: r.provider.unwrap_or_else(|| Arc::clone(&self.empty)),
            upstream_model: r.upstream_model.unwrap_or_else(|| Arc::clone(&self.empty)),
            key: r.key.unwrap_or_else(|| Arc::clone(&self.empty)),
            status: r.status,
            attempts: r.attempts,
            ttfb_ms: r.first_byte.map(millis),
            total_ms: millis(r.total),
            stream: r.stream,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            total_tokens: usage.total_tokens,
            error: r.error.map(Cow::Borrowed),
            cache_hit: r.cache_hit,
        });
    }
}

/// The ledger's health as metrics (set at scrape time from its counters).
#[derive(Debug, Default)]
pub struct LedgerMetrics {
    pending: Gauge,
    up: Gauge,
    written: Counter,
    dropped: Counter,
    failures: Counter,
    /// What the counters were last set from: written, dropped, failures.
    seen: Mutex<[u64; 3]>,
}

impl LedgerMetrics {
    /// Registers `ledger_*` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register("ledger_pending", "Usage records waiting to be written", m.pending.clone());
        registry.register("ledger_up", "1 while the ledger's database takes writes", m.up.clone());
        registry.register("ledger_written", "Usage records written", m.written.clone());
        registry.register(
            "ledger_dropped",
            "Usage records lost: the buffer was full (the database was away too long)",
            m.dropped.clone(),
        );
        registry.register(
            "ledger_write_failures",
            "Failed writes to the ledger's database",
            m.failures.clone(),
        );
        m
    }

    /// Sets them from `ledger`'s counters.
    pub fn refresh(&self, ledger: &Ledger) {
        let s = ledger.stats();
        self.pending.set(i64::try_from(s.pending).unwrap_or(i64::MAX));
        self.up.set(i64::from(s.up));
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = [s.written, s.dropped, s.write_failures];
        for ((counter, before), after) in
            [&self.written, &self.dropped, &self.failures].iter().zip(*seen).zip(now)
        {
            counter.inc_by(after.saturating_sub(before));
        }
        *seen = now;
    }
}

/// A time given as RFC 3339 (`2026-12-01T10:00:00Z`), a date
/// (`2026-12-01`, midnight UTC) or Unix seconds; as Unix ms.
fn parse_time(value: &str) -> Option<i64> {
    if let Ok(secs) = value.parse::<i64>() {
        return secs.checked_mul(1000);
    }
    if let Ok(ts) = value.parse::<jiff::Timestamp>() {
        return Some(ts.as_millisecond());
    }
    let date: jiff::civil::Date = value.parse().ok()?;
    jiff::tz::TimeZone::UTC
        .to_timestamp(date.to_datetime(jiff::civil::Time::midnight()))
        .ok()
        .map(|t| t.as_millisecond())
}

fn bad_request(param: &str, message: impl std::fmt::Display) -> Response<ProxyBody> {
    error_response(StatusCode::BAD_REQUEST, "invalid_parameter", format!("{param}: {message}"))
}

/// `GET /usage?from=…&to=…&group_by=client,model,provider,key&bucket=hour|day|none&format=json|csv`:
/// the ledger's rows aggregated. Operators see every client's rows; any
/// other client only its own. Defaults: the last 24 h, by client and model,
/// per day, JSON.
pub async fn usage(ledger: Option<&Ledger>, caller: &Caller, query: Option<&str>) -> Response<ProxyBody> {
    let Some(ledger) = ledger else {
        return error_response(
            StatusCode::NOT_FOUND,
            "ledger_disabled",
            "no usage ledger: set ledger.enabled (with a state file or ledger.path), or ledger.backend: postgres",
        );
    };
    let now = jiff::Timestamp::now().as_millisecond();
    let mut q = UsageQuery {
        from_ms: now - 86_400_000,
        to_ms: now + 1,
        group_by: GroupBy { client: true, model: true, ..GroupBy::NONE },
        bucket: Bucket::Day,
        client: None,
    };
    let mut csv = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = crate::front::percent_decode(value);
        match name {
            "from" => match parse_time(&value) {
                Some(t) => q.from_ms = t,
                None => return bad_request("from", "an RFC 3339 time, a date (YYYY-MM-DD) or Unix seconds"),
            },
            "to" => match parse_time(&value) {
                Some(t) => q.to_ms = t,
                None => return bad_request("to", "an RFC 3339 time, a date (YYYY-MM-DD) or Unix seconds"),
            },
            "group_by" => match value.parse() {
                Ok(g) => q.group_by = g,
                Err(e) => return bad_request("group_by", e),
            },
            "bucket" => match value.parse() {
                Ok(b) => q.bucket = b,
                Err(e) => return bad_request("bucket", e),
            },
            "format" => match value.as_str() {
                "json" => csv = false,
                "csv" => csv = true,
                _ => return bad_request("format", "json or csv"),
            },
            other => return bad_request(other, "unknown parameter (from, to, group_by, bucket, format)"),
        }
    }
    if q.from_ms >= q.to_ms {
        return bad_request("from", "must be before `to`");
    }
    if !caller.operator {
        q.client = Some(caller.name.clone().unwrap_or_else(|| ANONYMOUS.to_owned()));
    }
    let rows = match ledger.usage(&q).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(error = %e, "GET /usage: the ledger cannot be read");
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "ledger_unavailable",
                format!("the usage ledger cannot be read now: {e}"),
            );
        }
    };
    if csv {
        let mut resp = Response::new(proxypal_gateway::full(proxypal_ledger::to_csv(&rows)));
        resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/csv; charset=utf-8"));
        return resp;
    }
    proxypal_gateway::openai::json_response(StatusCode::OK, &serde_json::json!({"rows": rows}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_in_three_forms() {
        assert_eq!(parse_time("1796083200"), Some(1_796_083_200_000));
        assert_eq!(parse_time("2026-12-01T00:00:00Z"), Some(1_796_083_200_000));
        assert_eq!(parse_time("2026-12-01"), Some(1_796_083_200_000));
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn the_ledger_sits_beside_the_state_file() {
        assert_eq!(sibling(Path::new("/var/lib/pp/state.db")), Path::new("/var/lib/pp/state-ledger.db"));
        assert_eq!(sibling(Path::new("state")), Path::new("state-ledger"));
    }
}
