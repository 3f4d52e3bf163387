//! `GET /v1/models`: every alias, the default provider's catalog and (when
//! asked) every other provider's as `provider/id`. Catalogs are fetched in
//! the background and kept for `routing.models_ttl`, so a client listing
//! models never spends a request of the quota and never waits for an upstream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use proxypal_upstream::{RequestParts, Upstream};
use serde_json::{Value, json};

use crate::body::ProxyBody;
use crate::config::Settings;
use crate::provider::{Clients, Provider};

/// How long after a failed fetch the next one is tried.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);
/// The most of a catalog read.
const MAX_CATALOG: usize = 8 * 1024 * 1024;
/// How long fetching a catalog may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the very first listing waits for the default provider's first
/// fetch (later listings never wait: they get the cached catalog).
const FIRST_LIST_WAIT: Duration = Duration::from_secs(2);

/// Whether a fetch that started at `tried` may still be running: a task that
/// was cancelled or panicked never clears `refreshing`, so a mark older than
/// any fetch can take does not count.
fn fetching(e: &Entry, now: tokio::time::Instant) -> bool {
    e.refreshing && e.tried.is_some_and(|at| now.duration_since(at) < FETCH_TIMEOUT + Duration::from_secs(5))
}

/// One provider's catalog.
#[derive(Debug, Default, Clone)]
struct Entry {
    /// The models' entries as the provider listed them.
    models: Arc<[Value]>,
    /// When they were fetched.
    fetched: Option<tokio::time::Instant>,
    /// When a fetch last started.
    tried: Option<tokio::time::Instant>,
    refreshing: bool,
    /// Why the last fetch failed.
    error: Option<String>,
}

/// What `/stats` shows of a provider's catalog.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CatalogReport {
    /// The provider.
    pub provider: String,
    /// Models listed (none until the first fetch).
    pub models: usize,
    /// Time since the last successful fetch.
    pub age: Option<Duration>,
    /// Why the last fetch failed, if it did.
    pub error: Option<String>,
}

/// The catalogs of every provider, by name.
#[derive(Debug)]
pub(crate) struct Catalogs {
    entries: Mutex<HashMap<Arc<str>, Entry>>,
    /// Woken whenever a fetch ends.
    stored: tokio::sync::Notify,
    /// `created` of the aliases (when the gateway was built, Unix seconds).
    created: u64,
}

impl Catalogs {
    pub(crate) fn new() -> Self {
        let created =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self { entries: Mutex::new(HashMap::new()), stored: tokio::sync::Notify::new(), created }
    }

    fn entry(&self, provider: &str) -> Entry {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.get(provider).cloned().unwrap_or_default()
    }

    /// The models list from what is cached; starts a background fetch of
    /// every catalog that is stale. Only a listing that finds the default
    /// provider's catalog never fetched waits for it, at most
    /// [`FIRST_LIST_WAIT`].
    pub(crate) async fn list(
        self: &Arc<Self>,
        settings: &Arc<Settings>,
        clients: &Clients,
    ) -> Response<ProxyBody> {
        self.refresh_in_background(settings, clients);
        if let Some(default) = settings.providers.get(settings.routes.default) {
            let deadline = tokio::time::Instant::now() + FIRST_LIST_WAIT;
            loop {
                let stored = self.stored.notified();
                let entry = self.entry(default.name());
                if entry.fetched.is_some() || !fetching(&entry, tokio::time::Instant::now()) {
                    break;
                }
                if tokio::time::timeout_at(deadline, stored).await.is_err() {
                    break;
                }
            }
        }
        let mut data: Vec<Value> = Vec::new();
        let mut ids = std::collections::HashSet::new();
        // A glob alias (`claude-*`) is a rule, not a model a client can pick from a list.
        let mut aliases: Vec<&str> =
            settings.routes.aliases().map(|a| &*a.name).filter(|n| !crate::route::is_pattern(n)).collect();
        aliases.sort_unstable();
        for name in aliases {
            ids.insert(name.to_owned());
            data.push(
                json!({"id": name, "object": "model", "created": self.created, "owned_by": "proxypal"}),
            );
        }
        for (i, provider) in settings.providers.iter().enumerate() {
            let default = i == settings.routes.default;
            if !default && !settings.list_provider_models {
                continue;
            }
            for model in self.entry(provider.name()).models.iter() {
                let Some(id) = model.get("id").and_then(Value::as_str) else { continue };
                let id = if default { id.to_owned() } else { format!("{}/{id}", provider.name()) };
                if !ids.insert(id.clone()) {
                    continue;
                }
                let mut model = model.clone();
                model["id"] = Value::String(id);
                data.push(model);
            }
        }
        crate::openai::json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
    }

    /// Which catalogs are due: never fetched, or older than the TTL, and
    /// not being fetched, and not failed a moment ago. Marks them as being fetched.
    fn due(&self, settings: &Settings) -> Vec<Arc<Provider>> {
        let now = tokio::time::Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let mut due = Vec::new();
        for provider in settings.providers.iter() {
            let entry = entries.entry(Arc::clone(provider.name_arc())).or_default();
            let fresh = entry.fetched.is_some_and(|at| now.duration_since(at) < settings.models_ttl);
            let backing_off = entry.error.is_some()
                && entry.tried.is_some_and(|at| now.duration_since(at) < RETRY_AFTER_FAILURE);
            if !fresh && !backing_off && !fetching(entry, now) {
                entry.refreshing = true;
                entry.tried = Some(now);
                due.push(Arc::clone(provider));
            }
        }
        due
    }

    /// Fetches every catalog that is due, in spawned tasks (the caller does
    /// not wait).
    pub(crate) fn refresh_in_background(self: &Arc<Self>, settings: &Arc<Settings>, clients: &Clients) {
        for provider in self.due(settings) {
            let client = clients.get(&provider);
            let (catalogs, settings) = (Arc::clone(self), Arc::clone(settings));
            tokio::spawn(async move {
                let got = fetch(&provider, &client).await;
                catalogs.store(&provider, got, &settings);
            });
        }
    }

    /// Fetches every catalog that is due, and waits for them.
    pub(crate) async fn refresh(&self, settings: &Settings, clients: &Clients) {
        for provider in self.due(settings) {
            let got = fetch(&provider, &clients.get(&provider)).await;
            self.store(&provider, got, settings);
        }
    }

    fn store(&self, provider: &Provider, got: Result<Vec<Value>, String>, settings: &Settings) {
        let mut missing = Vec::new();
        if let Ok(models) = &got {
            let listed: std::collections::HashSet<&str> =
                models.iter().filter_map(|m| m.get("id").and_then(Value::as_str)).collect();
            for alias in settings.routes.aliases() {
                for target in alias.targets.iter() {
                    let ours =
                        settings.providers.get(target.provider).is_some_and(|p| p.name() == provider.name());
                    if let Some(model) = target.model.as_deref().filter(|m| ours && !listed.contains(*m)) {
                        missing.push(format!("{} → {}/{model}", alias.name, provider.name()));
                    }
                }
            }
        }
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = entries.entry(Arc::clone(provider.name_arc())).or_default();
        entry.refreshing = false;
        match got {
            Ok(models) => {
                tracing::debug!(provider = provider.name(), models = models.len(), "models catalog fetched");
                entry.models = models.into();
                entry.fetched = Some(tokio::time::Instant::now());
                entry.error = None;
            }
            Err(error) => {
                tracing::warn!(provider = provider.name(), %error, "cannot fetch the models catalog; keeping the last one");
                entry.error = Some(error);
            }
        }
        drop(entries);
        self.stored.notify_waiters();
        let default =
            settings.providers.get(settings.routes.default).is_some_and(|p| p.name() == provider.name());
        if default {
            self.warn_about_namespaces(provider, settings);
        }
        for target in missing {
            tracing::warn!(target = %target, "an alias target is not in its provider's models catalog");
        }
    }

    /// Logs a provider named like a namespace of the default provider's
    /// catalog: `<name>/…` then pins that provider instead of reaching the
    /// default (refused at load for NVIDIA's known namespaces; a warning for
    /// the rest, so that a running configuration is never refused on reload
    /// by what a catalog happens to list).
    fn warn_about_namespaces(&self, default: &Provider, settings: &Settings) {
        for other in settings.providers.iter().filter(|p| p.name() != default.name()) {
            let n = self.namespace_size(default, other.name());
            if n > 0 {
                tracing::warn!(
                    provider = other.name(),
                    default = default.name(),
                    models = n,
                    "the default provider lists models named \"{}/…\": requests for them go to provider {:?} instead; rename it",
                    other.name(),
                    other.name()
                );
            }
        }
    }

    /// Each provider's catalog state.
    pub(crate) fn reports(&self, settings: &Settings) -> Vec<CatalogReport> {
        let now = tokio::time::Instant::now();
        settings
            .providers
            .iter()
            .map(|p| {
                let e = self.entry(p.name());
                CatalogReport {
                    provider: p.name().to_owned(),
                    models: e.models.len(),
                    age: e.fetched.map(|at| now.duration_since(at)),
                    error: e.error,
                }
            })
            .collect()
    }

    /// How many models of `provider`'s catalog are named `<namespace>/…`.
    fn namespace_size(&self, provider: &Provider, namespace: &str) -> usize {
        let e = self.entry(provider.name());
        e.models
            .iter()
            .filter_map(|m| m.get("id").and_then(Value::as_str))
            .filter(|id| id.split_once('/').is_some_and(|(ns, _)| ns == namespace))
            .count()
    }

    /// Whether `provider`'s cached catalog lists `model`.
    pub(crate) fn lists(&self, provider: &str, model: &str) -> bool {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(provider)
            .is_some_and(|e| e.models.iter().any(|m| m.get("id").and_then(Value::as_str) == Some(model)))
    }

    /// Whether `provider`'s catalog was fetched and lacks `model`.
    pub(crate) fn lacks(&self, provider: &str, model: &str) -> bool {
        let e = self.entry(provider);
        e.fetched.is_some() && !e.models.iter().any(|m| m.get("id").and_then(Value::as_str) == Some(model))
    }
}

/// `GET <base>/models` with the provider's next usable key. Listing models
/// is not inference: no permit is taken from the key's request windows
/// (providers count chat, completion and embedding requests), so the
/// catalog costs the quota nothing.
async fn fetch(provider: &Provider, client: &Upstream) -> Result<Vec<Value>, String> {
    // Chosen without `select` (which would count a request on the key's stats),
    // and not a key the upstream blocked (a spent day).
    let auth = provider.keys.with_current(|_, r| {
        let snapshot = provider.keys.snapshot();
        let ready = snapshot.iter().find(|k| {
            k.status == proxypal_keypool::KeyStatus::Ready && r.quotas.blocked_for(k.index).is_zero()
        })?;
        r.auth.get(ready.index).cloned()
    });
    let Some(auth) = auth else {
        return Err("no usable key to fetch it with now".to_owned());
    };
    let parts = RequestParts::new(Method::GET, "/models", HeaderMap::new());
    let sent = tokio::time::timeout(FETCH_TIMEOUT, async {
        let resp = client.send(&parts, Bytes::new(), &auth).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_CATALOG).collect().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((status, body.to_bytes()))
    })
    .await
    .map_err(|_| format!("no answer within {FETCH_TIMEOUT:?}"))?;
    let (status, body) = sent?;
    if !status.is_success() {
        return Err(format!("the upstream answered {status}"));
    }
    let doc: Value = serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"))?;
    match doc.get("data") {
        Some(Value::Array(models)) => Ok(models.clone()),
        _ => Err("no `data` list in the answer".to_owned()),
    }
}
