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
    let mut body = json!({"status": status, "keys_usable": usable, "keys_total": total});
    if let Some(link) = app.gateway().shared_quota() {
        body["quota"] = shared_json(&link.report());
        if link.mode() != proxypal_gateway::replicas::Mode::Shared && status == "ok" {
            body["status"] = json!("degraded");
        }
    }
    json_response(StatusCode::OK, &body)
}

/// The shared quota's state: `{"mode": "shared"|"degraded"|"local", …}`.
fn shared_json(report: &proxypal_gateway::replicas::SharedReport) -> Value {
    json!({
        "mode": report.mode.as_str(),
        "replicas": report.replicas,
        "degraded_seconds": report.degraded_for.as_secs_f64(),
        "transitions": report.transitions,
        "redis": report.redis,
    })
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
                "provider": report.provider,
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
        "queue_by_client": gateway.queued_by_client().into_iter()
            .map(|(c, n)| (if c.is_empty() { "(anonymous)".to_owned() } else { c }, json!(n)))
            .collect::<serde_json::Map<String, Value>>(),
        "clients": gateway.client_reports().iter().map(client_json).collect::<Vec<_>>(),
        "in_flight": gateway.in_flight(),
        "quota": gateway.shared_quota().map_or_else(|| json!({"mode": "local"}), |l| shared_json(&l.report())),
        "reloads": gateway.reloads(),
        "ledger": app.ledger().map(|l| json!(l.stats())),
        "cache": gateway.cache().map(|c| {
            let mut stats = json!(c.stats());
            stats["backend"] = json!(c.backend());
            stats["ready"] = json!(c.is_ready());
            stats
        }),
        "keys": keys,
        "totals": totals,
        "providers": providers_json(&reports, gateway),
        "aliases": gateway.alias_reports().iter().map(alias_json).collect::<Vec<_>>(),
        "history": app.history().to_json(),
    })
}

/// Per provider: where it is, its preset, its keys by state, its totals and
/// its models catalog.
fn providers_json(
    reports: &[proxypal_gateway::KeyReport],
    gateway: &proxypal_gateway::Gateway,
) -> Vec<Value> {
    let catalogs = gateway.catalog_reports();
    gateway
        .providers()
        .iter()
        .map(|p| {
            let mine = reports.iter().filter(|r| r.provider == p.name());
            let mut totals = [0u64; 4];
            let mut states = [0usize; 3];
            for r in mine {
                let c = &r.snapshot.counters;
                for (t, n) in totals.iter_mut().zip([c.requests, c.successes, c.errors, c.rate_limited]) {
                    *t += n;
                }
                states[match r.snapshot.status {
                    KeyStatus::Ready => 0,
                    KeyStatus::CoolingDown { .. } => 1,
                    KeyStatus::Disabled => 2,
                }] += 1;
            }
            let catalog = catalogs.iter().find(|c| c.provider == p.name());
            json!({
                "name": p.name(),
                "preset": p.preset(),
                "base_url": p.base_url().to_string(),
                "auth": if p.without_auth() { "none" } else { "bearer" },
                "keys": states.iter().sum::<usize>(),
                "ready": states[0],
                "cooling_down": states[1],
                "disabled": states[2],
                "requests": totals[0],
                "successes": totals[1],
                "errors": totals[2],
                "rate_limited": totals[3],
                "models_listed": catalog.map(|c| c.models),
                "models_age_seconds": catalog.and_then(|c| c.age).map(|a| a.as_secs()),
                "models_error": catalog.and_then(|c| c.error.clone()),
            })
        })
        .collect()
}

/// An alias and its targets' state, as `/stats` shows it.
/// One named client: settings, its own quota's windows, waiting requests.
fn client_json(c: &proxypal_gateway::ClientReport) -> Value {
    json!({
        "name": c.name,
        "weight": c.weight,
        "admin": c.admin,
        "models": c.models,
        "limits": c.limits.iter().map(limit_json).collect::<Vec<_>>(),
        "queued": c.queued,
        "refused": c.refused,
    })
}

fn alias_json(alias: &proxypal_gateway::AliasReport) -> Value {
    json!({
        "name": alias.name,
        "targets": alias.targets.iter().map(|t| json!({
            "provider": t.provider,
            "model": t.model,
            "tier": t.tier,
            "weight": t.weight,
            // null: nothing limits it
            "room": (t.room != u64::MAX).then_some(t.room),
            "keys_ready": t.keys_ready,
            "missing_from_catalog": t.missing_from_catalog,
        })).collect::<Vec<_>>(),
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
    app.refresh_ledger_metrics();
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
