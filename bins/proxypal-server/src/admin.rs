//! `/health` and `/stats`.

use http::{Response, StatusCode};
use proxypal_keypool::KeyStatus;
use serde_json::{Value, json};

use crate::app::App;
use crate::body::ProxyBody;
use crate::errors::json_response;

/// `GET /health`: always 200 while the server runs; `status` says whether
/// requests can be served now (`ok`), only some keys can (`degraded`), or none
/// (`unavailable`).
pub fn health(app: &App) -> Response<ProxyBody> {
    let snapshot = app.pool().snapshot();
    let total = snapshot.len();
    let usable = snapshot.iter().filter(|k| k.status == KeyStatus::Ready).count();
    let status = match (usable, total) {
        (0, _) => "unavailable",
        (u, t) if u < t => "degraded",
        _ => "ok",
    };
    json_response(StatusCode::OK, &json!({"status": status, "keys_usable": usable, "keys_total": total}))
}

/// The `/stats` document.
pub fn stats_json(app: &App) -> Value {
    let snapshot = app.pool().snapshot();
    let (remaining, quotas): (Vec<u32>, Vec<Value>) = app.pool().with_current(|keys, extras| {
        let remaining = (0..keys.len()).map(|i| extras.limiter.remaining(i)).collect();
        let quotas = keys
            .iter()
            .map(|k| json!({"requests_per_minute": k.rate().requests_per_minute, "burst": k.rate().burst}))
            .collect();
        (remaining, quotas)
    });
    let mut totals = json!({"requests": 0u64, "successes": 0u64, "errors": 0u64, "rate_limited": 0u64});
    let mut states = [0usize; 3];
    let keys: Vec<Value> = snapshot
        .iter()
        .map(|k| {
            let c = &k.counters;
            for (field, n) in [
                ("requests", c.requests),
                ("successes", c.successes),
                ("errors", c.errors),
                ("rate_limited", c.rate_limited),
            ] {
                totals[field] = json!(totals[field].as_u64().unwrap_or(0) + n);
            }
            let (cooldown_ms, reason) = match k.status {
                KeyStatus::CoolingDown { remaining, reason } => {
                    (Some(remaining.as_millis() as u64), Some(reason.as_str()))
                }
                _ => (None, None),
            };
            states[match k.status {
                KeyStatus::Ready => 0,
                KeyStatus::CoolingDown { .. } => 1,
                KeyStatus::Disabled => 2,
            }] += 1;
            json!({
                "key": k.label,
                "name": k.name,
                "state": k.status.as_str(),
                "cooldown_remaining_ms": cooldown_ms,
                "cooldown_reason": reason,
                "requests": c.requests,
                "successes": c.successes,
                "errors": c.errors,
                "rate_limited": c.rate_limited,
                "permits_available": remaining.get(k.index).copied().unwrap_or(0),
                "rate_override": quotas.get(k.index).cloned().unwrap_or(Value::Null),
            })
        })
        .collect();
    totals["keys"] = json!(snapshot.len());
    totals["ready"] = json!(states[0]);
    totals["cooling_down"] = json!(states[1]);
    totals["disabled"] = json!(states[2]);
    json!({
        "uptime_seconds": app.started().elapsed().as_secs(),
        "dev_mode": app.dev(),
        "queue_depth": app.queue_depth(),
        "in_flight": app.in_flight(),
        "reloads": app.pool().reloads(),
        "keys": keys,
        "totals": totals,
        "history": app.history().to_json(),
    })
}

/// `GET /stats`.
pub fn stats(app: &App) -> Response<ProxyBody> {
    json_response(StatusCode::OK, &stats_json(app))
}

/// `GET /metrics`: Prometheus text format.
pub fn metrics(app: &App) -> Response<ProxyBody> {
    let snapshot = app.pool().snapshot();
    let count = |f: fn(&KeyStatus) -> bool| snapshot.iter().filter(|k| f(&k.status)).count();
    let states = [
        ("ready", count(|s| *s == KeyStatus::Ready)),
        ("cooling_down", count(|s| matches!(s, KeyStatus::CoolingDown { .. }))),
        ("disabled", count(|s| *s == KeyStatus::Disabled)),
    ];
    let text = app.metrics().render(app.queue_depth(), app.in_flight(), states);
    let mut resp = Response::new(crate::body::full(text));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}
