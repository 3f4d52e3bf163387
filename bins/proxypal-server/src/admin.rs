//! The admin endpoints: `/health`, `/stats`, `/metrics`.

use http::{Response, StatusCode};
use proxypal_gateway::ProxyBody;
use proxypal_gateway::keypool::KeyStatus;
use proxypal_gateway::openai::json_response;
use serde_json::{Value, json};

use crate::app::App;

/// `GET /health`: always 200 while the server runs; `status` says whether
/// requests can be served now (`ok`), only some keys can (`degraded`), or none
/// (`unavailable`).
pub fn health(app: &App) -> Response<ProxyBody> {
    let snapshot: Vec<_> = app.gateway().providers().iter().flat_map(|p| p.keys().snapshot()).collect();
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
    let gateway = app.gateway();
    let reports = gateway.key_reports();
    let mut totals = json!({"requests": 0u64, "successes": 0u64, "errors": 0u64, "rate_limited": 0u64});
    let mut states = [0usize; 3];
    let keys: Vec<Value> = reports
        .iter()
        .map(|report| {
            let k = &report.snapshot;
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
                "permits_available": report.permits_available,
                "account": report.account,
                "blocked_ms": report.blocked_for.as_millis() as u64,
                "limits": report.limits.iter().map(limit_json).collect::<Vec<_>>(),
            })
        })
        .collect();
    totals["keys"] = json!(reports.len());
    totals["ready"] = json!(states[0]);
    totals["cooling_down"] = json!(states[1]);
    totals["disabled"] = json!(states[2]);
    json!({
        "uptime_seconds": app.started().elapsed().as_secs(),
        "dev_mode": app.dev(),
        "queue_depth": gateway.queue_depth(),
        "in_flight": gateway.in_flight(),
        "reloads": gateway.reloads(),
        "keys": keys,
        "totals": totals,
        "history": app.history().to_json(),
    })
}

/// One limit of a key as `/stats` shows it.
fn limit_json(l: &proxypal_gateway::limiter::LimitReport) -> Value {
    json!({
        "kind": l.kind.as_str(),
        "period_seconds": l.period.map(|p| p.as_secs()),
        "reset": l.reset,
        "limit": l.limit,
        "used": l.used,
        "remaining": l.remaining,
        "resets_in_ms": l.resets_in.as_millis() as u64,
        "source": l.source.as_str(),
        "scope": match l.scope {
            proxypal_gateway::limiter::Scope::Key => "key",
            proxypal_gateway::limiter::Scope::Account => "account",
        },
    })
}

/// `GET /stats`.
pub fn stats(app: &App) -> Response<ProxyBody> {
    json_response(StatusCode::OK, &stats_json(app))
}

/// `GET /metrics`: the OpenMetrics text format.
pub fn metrics(app: &App) -> Response<ProxyBody> {
    app.gateway().refresh_gauges();
    let mut text = String::with_capacity(8 * 1024);
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, app.registry());
    let mut resp = Response::new(proxypal_gateway::full(text));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}
