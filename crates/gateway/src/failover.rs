//! The attempt loop: lease a key, send, [classify](crate::classify), then
//! deliver or fail over to another key — before the client sees anything.
//!
//! One [`Attempts`] record per request carries what the stages share: the
//! keys tried, the last failure (the answer if every attempt fails), the time
//! spent outside the proxy, and the key that served the request.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use proxypal_keypool::KeyPool;
use proxypal_limiter::QuotaClock;
use proxypal_upstream::{RequestParts, UpstreamBody, UpstreamError};

use crate::admission::{Admission, Slot};
use crate::body::{BoxError, Guarded, ProxyBody};
use crate::classify::{Action, Verdict, classify, classify_transport, judged_by_body, needs_body};
use crate::config::Settings;
use crate::dialect::Dialect;
use crate::keyset::KeyResources;
use crate::lease::{Lease, LeaseQueue, NoKey, Source, Tried};
use crate::metrics::{AttemptResult, KeyMetrics, Metrics, StreamGuard};
use crate::provider::{Clients, Provider};
use crate::replicas::{Refused, SharedQuota};
use crate::reply::{self, UpstreamAnswer};
use crate::route::{Route, Target};

/// The most of an upstream error body read to judge and rewrite it.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// How long reading an upstream error body may take.
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an attempt failed, kept to answer the client if every attempt fails.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The upstream answered with an error worth failing over for.
    Upstream { answer: UpstreamAnswer, result: AttemptResult },
    /// No answer: refused, reset, timed out.
    Transport(UpstreamError),
}

impl Failure {
    /// The metrics label of the failed attempt.
    fn result(&self) -> AttemptResult {
        match self {
            Failure::Upstream { result, .. } => *result,
            Failure::Transport(_) => AttemptResult::TransportError,
        }
    }

    fn key_rejected(&self) -> bool {
        self.result() == AttemptResult::KeyRejected
    }
}

/// What a request that could not be served is answered with.
#[derive(Debug)]
pub(crate) enum GiveUp {
    /// No key could be leased (and no attempt failed in a way worth reporting).
    NoKey(NoKey),
    /// The keys tried were rejected by the upstream (status of the last).
    KeysRejected(StatusCode),
    /// The upstream's last error, passed back.
    Upstream(UpstreamAnswer),
    /// The last attempt got no answer.
    Transport(UpstreamError),
}

impl GiveUp {
    fn into_response(self) -> Response<ProxyBody> {
        match self {
            GiveUp::NoKey(no_key) => reply::no_key(no_key),
            GiveUp::KeysRejected(status) => reply::keys_rejected(status),
            GiveUp::Upstream(answer) => reply::upstream_error(answer),
            GiveUp::Transport(e) => reply::transport(&e),
        }
    }
}

/// One request's attempts so far.
#[derive(Debug)]
pub(crate) struct Attempts {
    tried: Tried,
    max: usize,
    last: Option<Failure>,
    /// Time not spent in the proxy itself: queueing and waiting for upstream headers.
    elsewhere: Duration,
    /// The key of the last attempt (its counters count the request).
    served_by: Option<Arc<KeyMetrics>>,
    /// The provider and target of the last attempt.
    last_target: Option<(usize, usize)>,
    /// Providers skipped for the rest of the request (failing as a whole), by bit.
    skip_providers: u64,
    /// Targets skipped (a model-level failure), by bit.
    skip_targets: u64,
    /// Server errors and timeouts per provider in this request.
    provider_faults: [u8; crate::config::MAX_PROVIDERS],
    /// For the usage ledger (filled only when a sink is set): who asked for
    /// which model, the key of the last attempt, why it failed, and whether
    /// the answer's body records it when it ends.
    ledger: Option<LedgerNotes>,
    /// What the response cache said (`x-proxypal-cache`), if it was asked.
    cache_label: Option<&'static str>,
    /// Where a complete 200 answer is to be stored.
    cache: Option<crate::cache::Pending>,
}

/// What the usage record of a request needs beyond the attempts.
#[derive(Debug, Default)]
struct LedgerNotes {
    client: Option<Arc<str>>,
    model: Arc<str>,
    key: Option<Arc<str>>,
    error: Option<&'static str>,
    /// The answer's body records the request when it ends.
    tapped: bool,
    /// Answered from the response cache.
    cache_hit: bool,
}

/// Server errors (or timeouts) from one provider after which a request
/// skips it: a provider failing as a whole should not burn every key.
const PROVIDER_FAULTS: u8 = 2;

impl Attempts {
    /// A record for a request that may make `max` attempts (1..=[`MAX_ATTEMPTS`](crate::lease::MAX_ATTEMPTS)).
    pub(crate) fn new(max: usize) -> Self {
        Self {
            tried: Tried::default(),
            max: max.clamp(1, crate::lease::MAX_ATTEMPTS),
            last: None,
            elsewhere: Duration::ZERO,
            served_by: None,
            last_target: None,
            skip_providers: 0,
            skip_targets: 0,
            provider_faults: [0; crate::config::MAX_PROVIDERS],
            ledger: None,
            cache_label: None,
            cache: None,
        }
    }

    /// Notes why the request failed, for the ledger.
    fn error(&mut self, class: &'static str) {
        if let Some(notes) = self.ledger.as_mut() {
            notes.error = Some(class);
        }
    }

    /// How many attempts were made.
    pub(crate) fn made(&self) -> usize {
        self.tried.len()
    }

    /// Skips `provider` for the rest of the request — only while another
    /// provider of `route` is still in play: when it is the last, its other
    /// keys are all there is (as with a single provider).
    fn skip_provider(&mut self, route: &Route, provider: usize) {
        let bit = |p: usize| 1u64 << p; // p < MAX_PROVIDERS <= 64 (asserted in `route`)
        let others = route
            .targets()
            .iter()
            .any(|t| t.provider != provider && self.skip_providers & bit(t.provider) == 0);
        if others {
            self.skip_providers |= bit(provider);
        }
    }

    /// Counts a server error or timeout of `provider`; after
    /// [`PROVIDER_FAULTS`] of them the provider is skipped (see [`skip_provider`](Self::skip_provider)).
    fn provider_fault(&mut self, route: &Route, provider: usize) {
        let Some(n) = self.provider_faults.get_mut(provider) else { return };
        *n = n.saturating_add(1);
        if *n >= PROVIDER_FAULTS {
            self.skip_provider(route, provider);
        }
    }

    /// Sets how many attempts the request may make (1..=[`MAX_ATTEMPTS`](crate::lease::MAX_ATTEMPTS)).
    pub(crate) fn limit(&mut self, max: usize) {
        self.max = max.clamp(1, crate::lease::MAX_ATTEMPTS);
    }

    /// Whether another attempt may be made.
    pub(crate) fn may_try(&self) -> bool {
        self.tried.len() < self.max
    }

    /// Counts time spent waiting elsewhere (the queue, the upstream).
    pub(crate) fn waited(&mut self, took: Duration) {
        self.elsewhere += took;
    }

    /// Starts an attempt with `lease`: records the key and, if this is a
    /// retry, why (in `metrics`).
    pub(crate) fn begin(&mut self, lease: &Lease, metrics: &Metrics) {
        if let Some(previous) = &self.last {
            metrics.retry(previous.result());
        }
        self.tried.push(lease.provider, lease.selected.index());
        if let Some(notes) = self.ledger.as_mut() {
            notes.key = Some(Arc::clone(lease.selected.key().shown()));
        }
        self.served_by = Some(Arc::clone(&lease.metrics));
        self.last_target = Some((lease.provider, lease.target));
    }

    /// Records a failed attempt.
    pub(crate) fn failed(&mut self, failure: Failure) {
        self.last = Some(failure);
    }

    /// The answer when no key can be leased (`no_key`): the last attempt's
    /// failure if there was one — unless the key it tried was just disabled
    /// and that disabled the last key.
    pub(crate) fn give_up(&mut self, no_key: NoKey) -> GiveUp {
        match self.last.take() {
            Some(f) if f.key_rejected() && no_key == NoKey::AllDisabled => GiveUp::NoKey(no_key),
            Some(f) => f.into(),
            None => GiveUp::NoKey(no_key),
        }
    }

    /// The answer when every attempt was used: the last failure; "all keys
    /// disabled" when it disabled the last usable key of `keys` (the pools
    /// the request could use).
    pub(crate) fn exhausted<'k>(
        &mut self,
        mut keys: impl Iterator<Item = &'k KeyPool<KeyResources>>,
    ) -> GiveUp {
        match self.last.take() {
            Some(f) if f.key_rejected() && keys.all(|k| k.time_to_usable().is_none()) => {
                GiveUp::NoKey(NoKey::AllDisabled)
            }
            Some(f) => f.into(),
            None => GiveUp::NoKey(NoKey::NoKeys),
        }
    }
}

impl From<Failure> for GiveUp {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Upstream { answer, result: AttemptResult::KeyRejected } => {
                GiveUp::KeysRejected(answer.status)
            }
            Failure::Upstream { answer, .. } => GiveUp::Upstream(answer),
            Failure::Transport(e) => GiveUp::Transport(e),
        }
    }
}

/// A request extension: ask a streaming answer for usage wherever the
/// serving provider takes `stream_options` (`stream_usage`), and pass the
/// usage chunk on rather than take it out. The Messages API sets it: its
/// translator reads the chunk, the client never sees it as such.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeepUsage;

/// What the attempt loop uses of the gateway's shared state (and the
/// worker's upstream client), borrowed for one request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shared<'a> {
    pub(crate) queue: &'a LeaseQueue,
    pub(crate) admission: &'a Admission,
    pub(crate) settings: &'a ArcSwap<Settings>,
    pub(crate) metrics: &'a Metrics,
    /// The worker's upstream clients.
    pub(crate) clients: &'a Clients,
    pub(crate) catalogs: &'a Arc<crate::catalog::Catalogs>,
    /// The quota shared with other replicas, if configured.
    pub(crate) replicas: Option<&'a SharedQuota>,
    /// Where finished requests are recorded, if anywhere.
    pub(crate) sink: Option<&'a Arc<dyn crate::usage::UsageSink>>,
    /// The response cache, if any.
    pub(crate) cache: Option<&'a Arc<crate::cache::ResponseCache>>,
}

/// A route's targets not skipped, with the keys not yet tried: where a
/// request leases from (see [`Source`]).
struct RouteSource<'a> {
    route: &'a Route,
    providers: &'a [Arc<Provider>],
    attempts: &'a Attempts,
    tokens: u64,
}

impl RouteSource<'_> {
    /// Whether target `at` (of provider `provider`) may be tried.
    fn eligible(&self, at: usize, provider: usize) -> bool {
        let bit = |set: u64, i: usize| set & 1u64.checked_shl(i as u32).unwrap_or(0) != 0;
        !bit(self.attempts.skip_providers, provider) && !bit(self.attempts.skip_targets, at)
    }

    /// Calls `f` on every target that may be tried (each provider once).
    fn each(&self, mut f: impl FnMut(&Provider, usize)) {
        let mut seen = 0u64;
        for (at, t) in self.route.targets().iter().enumerate() {
            let bit = 1u64.checked_shl(t.provider as u32).unwrap_or(0);
            if self.eligible(at, t.provider) && seen & bit == 0 {
                seen |= bit;
                if let Some(p) = self.providers.get(t.provider) {
                    f(p, t.provider);
                }
            }
        }
    }
}

impl RouteSource<'_> {
    /// One shared admission per eligible provider of the route, in target
    /// order, until one admits.
    async fn admit_shared(&self, link: &SharedQuota) -> Result<Lease, Refused> {
        let mut seen = 0u64;
        let mut refused = Refused::Nothing;
        // The alias's own order (lowest tier first, weighted round robin
        // within it), a target taken only after the one before said no.
        for (at, t) in self.route.in_order() {
            let bit = 1u64.checked_shl(t.provider as u32).unwrap_or(0);
            if !self.eligible(at, t.provider) || seen & bit != 0 {
                continue;
            }
            seen |= bit;
            let Some(provider) = self.providers.get(t.provider) else { continue };
            match link.admit(provider, t.provider, &self.attempts.tried, self.tokens).await {
                Ok(mut lease) => {
                    lease.target = at;
                    return Ok(lease);
                }
                Err(Refused::Unavailable) => return Err(Refused::Unavailable),
                Err(Refused::Wait(w)) => {
                    refused = match refused {
                        Refused::Wait(v) => Refused::Wait(v.min(w)),
                        _ => Refused::Wait(w),
                    }
                }
                Err(Refused::Disabled) if refused == Refused::Nothing => refused = Refused::Disabled,
                Err(_) => {}
            }
        }
        Err(refused)
    }
}

/// Leases through the shared quota, first come first served in `queue`
/// until `deadline`; `None` when Redis cannot be asked (lease locally).
async fn shared_lease(
    queue: &LeaseQueue,
    link: &SharedQuota,
    source: &RouteSource<'_>,
    who: &crate::lease::Waiter,
    deadline: tokio::time::Instant,
) -> Option<Result<Lease, NoKey>> {
    if queue.depth() == 0 {
        match source.admit_shared(link).await {
            Ok(lease) => return Some(Ok(lease)),
            Err(Refused::Unavailable) => return None,
            Err(_) => {}
        }
    }
    let _queued = queue.enter();
    let Some(_turn) = queue.turn(who, deadline).await else {
        return Some(Err(NoKey::QueueTimeout { wait: Duration::ZERO, cause: proxypal_limiter::Cause::None }));
    };
    loop {
        let wait = match source.admit_shared(link).await {
            Ok(lease) => return Some(Ok(lease)),
            Err(Refused::Unavailable) => return None,
            Err(Refused::Wait(w)) => w,
            Err(Refused::Disabled) => return Some(Err(NoKey::AllDisabled)),
            // Only this replica's limits (or tries) hold every key back.
            Err(Refused::Nothing) => match source.time_to_lease_locally() {
                Err(no_key) => return Some(Err(no_key)),
                Ok(w) => w.max(proxypal_limiter::POLL),
            },
        };
        if tokio::time::Instant::now() + wait > deadline {
            let cause = proxypal_limiter::Cause::None;
            return Some(Err(NoKey::QueueTimeout { wait, cause }));
        }
        tokio::time::sleep(wait.min(crate::lease::RECHECK)).await;
    }
}

impl RouteSource<'_> {
    /// [`Source::time_to_lease`] by what only this replica counts (request
    /// windows are Redis's in shared mode).
    fn time_to_lease_locally(&self) -> Result<Duration, NoKey> {
        let mut best: Result<Duration, NoKey> = Err(NoKey::NoKeys);
        self.each(|p, i| {
            let wait = crate::lease::time_to_lease_with(&p.keys, i, &self.attempts.tried, self.tokens, true);
            best = match (best, wait) {
                (Ok(a), Ok(b)) => Ok(a.min(b)),
                (Ok(a), Err(_)) | (Err(_), Ok(a)) => Ok(a),
                (Err(NoKey::AllTried), Err(_)) | (Err(_), Err(NoKey::AllTried)) => Err(NoKey::AllTried),
                (Err(a), Err(_)) => Err(a),
            };
        });
        best
    }
}

impl Source for RouteSource<'_> {
    fn try_lease(&self) -> Option<Lease> {
        self.route.find(|at, t| {
            if !self.eligible(at, t.provider) {
                return None;
            }
            let provider = self.providers.get(t.provider)?;
            let mut lease =
                crate::lease::try_lease(&provider.keys, t.provider, &self.attempts.tried, self.tokens)?;
            lease.target = at;
            Some(lease)
        })
    }

    fn time_to_lease(&self) -> Result<Duration, NoKey> {
        let mut best: Result<Duration, NoKey> = Err(NoKey::NoKeys);
        self.each(|p, i| {
            let wait = crate::lease::time_to_lease(&p.keys, i, &self.attempts.tried, self.tokens);
            best = match (best, wait) {
                (Ok(a), Ok(b)) => Ok(a.min(b)),
                (Ok(a), Err(_)) | (Err(_), Ok(a)) => Ok(a),
                // The most hopeful reason: keys left untried beat disabled keys beat none.
                (Err(NoKey::AllTried), Err(_)) | (Err(_), Err(NoKey::AllTried)) => Err(NoKey::AllTried),
                (Err(NoKey::AllDisabled), Err(_)) | (Err(_), Err(NoKey::AllDisabled)) => {
                    Err(NoKey::AllDisabled)
                }
                (Err(a), Err(_)) => Err(a),
            };
        });
        if best == Err(NoKey::NoKeys) && self.attempts.made() > 0 {
            // Every target was skipped or tried.
            return Err(NoKey::AllTried);
        }
        best
    }

    fn holding_back(&self) -> (Duration, proxypal_limiter::Cause) {
        let mut soonest = (Duration::MAX, proxypal_limiter::Cause::None);
        self.each(|p, i| {
            let w = crate::lease::holding_back(&p.keys, i, &self.attempts.tried, self.tokens);
            if w.0 < soonest.0 {
                soonest = w;
            }
        });
        soonest
    }
}

/// The path and query after `/v1` (`/v1/chat/completions?x` → `/chat/completions?x`),
/// or `None` for a path outside `/v1`.
fn rest_of_path(uri: &http::Uri) -> Option<String> {
    let path = uri.path();
    if path != "/v1" && !path.starts_with("/v1/") {
        return None;
    }
    Some(uri.path_and_query().map_or("", |pq| pq.as_str()).get(3..).unwrap_or("").to_owned())
}

/// `x-proxypal-route`: who served the request (`<provider>/<upstream model>`).
pub const ROUTE: http::HeaderName = http::HeaderName::from_static("x-proxypal-route");
/// `x-proxypal-attempts`: how many upstream attempts the request made.
pub const ATTEMPTS: http::HeaderName = http::HeaderName::from_static("x-proxypal-attempts");

/// Serves one request under `/v1` (see [`Handle::handle`](crate::Handle::handle)):
/// admission, then the attempts. Records the request in the metrics of the
/// key that served it (or of no key) and the proxy's own share of its time.
pub(crate) async fn forward<B>(gw: Shared<'_>, req: Request<B>) -> Response<ProxyBody>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let Some(rest) = rest_of_path(req.uri()) else {
        return reply::not_found(req.uri().path());
    };
    let Some(slot) = gw.admission.admit() else {
        return reply::overloaded();
    };
    // An owned `Arc`, not an `arc_swap` guard: the request keeps it across `.await`s.
    let settings = gw.settings.load_full();
    let started = tokio::time::Instant::now();
    let mut attempts = Attempts::new(1);
    let mut served = None;
    let mut resp = run(gw, &settings, req, rest, slot, &mut attempts, &mut served, started).await;
    if let (Some(pending), Some(cache)) = (attempts.cache.take(), gw.cache) {
        if resp.status() == StatusCode::OK {
            let kind = resp.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
            let kind = kind.unwrap_or("application/json").to_owned();
            resp = resp
                .map(|body| crate::cache::Recording::new(body, Arc::clone(cache), pending, &kind).boxed());
        }
    }
    let headers = resp.headers_mut();
    if let Some(label) = attempts.cache_label {
        headers.insert(crate::cache::CACHE_HEADER, http::HeaderValue::from_static(label));
    }
    if let Some(route) = served {
        headers.insert(ROUTE, route);
    }
    headers.insert(ATTEMPTS, attempts_header(attempts.made()));
    // Not for a client that failed to authenticate: the pool's size is not its business.
    if resp.status() != StatusCode::UNAUTHORIZED {
        let provider = attempts.last_target.map_or(settings.routes.default, |(p, _)| p);
        if let Some(p) = settings.providers.get(provider) {
            crate::quota::pool_headers(&p.keys, &p.pool_headers).apply(resp.headers_mut());
        }
    }
    if let (Some(sink), Some(notes)) = (gw.sink, attempts.ledger.take()) {
        if !notes.tapped {
            let status = resp.status();
            sink.finished(record(&settings, &attempts, notes, status, started));
        }
    }
    let metrics = gw.metrics;
    if attempts.cache_label != Some("hit") {
        attempts.served_by.as_ref().unwrap_or(metrics.no_key()).request(resp.status());
    }
    metrics.overhead(started.elapsed().saturating_sub(attempts.elsewhere));
    resp
}

/// The usage record of a request answered by the gateway itself or with an
/// upstream error (no body to wait for).
fn record(
    settings: &Settings,
    attempts: &Attempts,
    notes: LedgerNotes,
    status: StatusCode,
    started: tokio::time::Instant,
) -> crate::usage::Finished {
    let target = attempts.last_target.and_then(|(p, _)| settings.providers.get(p));
    let error = notes.error.or_else(|| {
        let class = match status.as_u16() {
            200..=399 => return None,
            429 => "rate_limited",
            401 => "unauthorized",
            413 => "too_large",
            400..=499 => "client_error",
            503 => "unavailable",
            _ => "upstream_error",
        };
        Some(attempts.last.as_ref().map_or(class, |f| f.result().as_str()))
    });
    crate::usage::Finished {
        at: std::time::SystemTime::now(),
        client: notes.client,
        model: notes.model,
        provider: target.map(|p| Arc::clone(p.name_arc())),
        upstream_model: None,
        key: notes.key,
        status: status.as_u16(),
        attempts: u8::try_from(attempts.made()).unwrap_or(u8::MAX),
        first_byte: None,
        total: started.elapsed(),
        stream: false,
        usage: notes.cache_hit.then(crate::usage::Usage::zero),
        error,
        complete: true,
        // A hit spent no upstream tokens.
        cache_hit: notes.cache_hit,
    }
}

/// `x-proxypal-attempts: n`, without formatting or allocating (at most
/// [`MAX_ATTEMPTS`](crate::lease::MAX_ATTEMPTS) attempts).
fn attempts_header(n: usize) -> http::HeaderValue {
    const VALUES: [&str; 11] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10"];
    match VALUES.get(n) {
        Some(v) => http::HeaderValue::from_static(v),
        None => http::HeaderValue::from(n),
    }
}

/// The body as target `target` (at `at` in the route) of its provider takes
/// it: its model (spliced in where the client's was, `model_at`), without
/// the fields the provider rejects. The last one made is kept, so attempts
/// on one target rewrite once.
fn body_for(
    body: &Bytes,
    model_at: Option<&std::ops::Range<usize>>,
    target: &Target,
    provider: &Provider,
    last: &mut Option<(usize, Bytes)>,
    at: usize,
) -> Bytes {
    if target.model.is_none() && provider.strip.is_empty() {
        return body.clone();
    }
    if let Some((_, made)) = last.as_ref().filter(|(t, _)| *t == at) {
        return made.clone();
    }
    let made = match (model_at, target.model_json.as_deref()) {
        (Some(span), Some(json)) if provider.strip.is_empty() => {
            crate::json::splice(body, span.clone(), json)
        }
        _ => crate::json::rewrite(body, target.model.as_deref(), &provider.strip)
            .unwrap_or_else(|| body.clone()),
    };
    *last = Some((at, made.clone()));
    made
}

#[allow(clippy::too_many_arguments)] // the request's pieces, borrowed from `forward`
async fn run<B>(
    gw: Shared<'_>,
    settings: &Arc<Settings>,
    req: Request<B>,
    rest: String,
    slot: Slot,
    attempts: &mut Attempts,
    served: &mut Option<http::HeaderValue>,
    started: tokio::time::Instant,
) -> Response<ProxyBody>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let (mut head, body) = req.into_parts();
    let keep_usage = head.extensions.get::<KeepUsage>().is_some();
    // The client's token is never forwarded: the upstream client sets Authorization to the key.
    let Some(client) = settings.tokens.authenticate(&head.headers) else {
        return reply::unauthorized(
            "missing or invalid client token: send Authorization: Bearer <token> (your ProxyPal token, not an NVIDIA key)",
        );
    };
    head.headers.remove(AUTHORIZATION);
    if gw.sink.is_some() {
        let client = settings.tokens.named(client).map(|n| Arc::clone(&n.name));
        attempts.ledger = Some(LedgerNotes { client, ..LedgerNotes::default() });
    }
    if head.method == http::Method::GET && (rest == "/models" || rest.starts_with("/models?")) {
        return Box::pin(gw.catalogs.list(settings, gw.clients)).await;
    }
    let body = match read_body(body, &head.headers, settings.max_body_bytes).await {
        Ok(body) => body,
        Err(resp) => return resp,
    };
    let providers = &settings.providers[..];
    let named = crate::json::model_span(&body);
    let listed = |provider: &str, model: &str| gw.catalogs.lists(provider, model);
    if let Some(notes) = attempts.ledger.as_mut() {
        notes.model = named.as_ref().map(|(_, m)| crate::usage::shared_name(m)).unwrap_or_default();
    }
    if let Err(refused) = settings.tokens.check_model(client, named.as_ref().map(|(_, m)| &**m)) {
        attempts.error("model_not_allowed");
        gw.metrics.client_refused(refused.client(), "model_not_allowed");
        return reply::refused(refused);
    }
    let route = settings.routes.resolve(named.as_ref().map(|(_, m)| &**m), providers, &listed);
    // The response cache, before the client's quota or a key is spent.
    if let Some(cache) = gw.cache.filter(|_| head.method == http::Method::POST) {
        let name = settings.tokens.named(client).map(|n| &*n.name);
        let control = head.headers.get(http::header::CACHE_CONTROL).and_then(|v| v.to_str().ok());
        let model = named.as_ref().map_or("", |(_, m)| &**m);
        match cache.lookup(&rest, &body, model, name, control).await {
            Some(crate::cache::Lookup::Hit(entry)) => {
                attempts.cache_label = Some("hit");
                if let Some(notes) = attempts.ledger.as_mut() {
                    notes.cache_hit = true;
                }
                return crate::cache::hit_response(&entry);
            }
            Some(crate::cache::Lookup::Miss(pending)) => {
                attempts.cache_label = Some(pending.label);
                attempts.cache = Some(pending);
            }
            Some(crate::cache::Lookup::Bypass) => attempts.cache_label = Some("bypass"),
            None => {}
        }
    }
    let model_at = named.map(|(span, _)| span);
    // Only token windows need the estimate, a look into the body, and the
    // answer's `usage` uncompressed.
    let counts_tokens = route
        .targets()
        .iter()
        .filter_map(|t| providers.get(t.provider))
        .any(|p| p.keys.with_current(|_, r| r.quotas.counts_tokens()));
    let client_tokens = settings.tokens.quotas().counts_tokens();
    // The answer's `usage` is read (uncompressed) for token windows and the ledger.
    let reads_usage = counts_tokens || client_tokens || gw.sink.is_some();
    // The answer is read (for `usage`) or stored (replayed as it came):
    // uncompressed. Token windows and the cache insist on it. For the ledger
    // alone, only a client that accepts a compressed answer has its
    // `Accept-Encoding` replaced: a request without one is answered
    // uncompressed already (RFC 9110 would let a server choose; servers
    // compress when asked), and leaving the head alone spares rewriting it
    // and sending a header on every request (~500 instructions per request,
    // benches/profile.sh). Should an upstream compress unasked, the record
    // just lacks its token counts.
    let must_be_plain = counts_tokens || client_tokens || attempts.cache.is_some();
    let asks_compressed =
        || head.headers.get_all(http::header::ACCEPT_ENCODING).iter().any(|v| v.as_bytes() != b"identity");
    if must_be_plain || (reads_usage && asks_compressed()) {
        head.headers.insert(http::header::ACCEPT_ENCODING, http::HeaderValue::from_static("identity"));
    }
    // For the failover log lines: they carry the id themselves, so the per-request span can
    // stay at debug level (free when debug is off).
    let request_id = head.headers.get(crate::admission::REQUEST_ID).cloned();
    let id = request_id.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("-");
    let parts = RequestParts::new(head.method, rest, head.headers);
    let deadline = deadline_after(settings.queue_timeout);
    attempts.limit(settings.max_attempts);

    let Shared { metrics, clients, .. } = gw;
    // An alias waits in its own queue, a provider's requests in the provider's.
    let queue = match &route {
        Route::Alias(alias) => &alias.queue,
        Route::Direct(target) => match providers.get(target.provider) {
            Some(p) => &*p.queue,
            None => gw.queue,
        },
    };
    let tokens = if counts_tokens || client_tokens { crate::quota::estimate_tokens(&body) } else { 0 };
    // The client's own quota first: its limit, not the pool's, answers (one
    // budget for every replica when quotas are shared).
    let admitted = match (gw.replicas, settings.tokens.limited(client)) {
        (Some(link), Some(index)) => link.admit_client(&settings.tokens, index, tokens, deadline).await,
        _ => settings.tokens.admit(client, tokens),
    };
    let client_permit = match admitted {
        Ok(permit) => permit,
        Err(refused) => {
            attempts.error("client_quota");
            gw.metrics.client_refused(refused.client(), "client_quota");
            settings.tokens.refused(client);
            return reply::refused(refused);
        }
    };
    let who = settings.tokens.waiter(client);
    let mut rewritten = None;
    while attempts.may_try() {
        let queued_at = tokio::time::Instant::now();
        let source = RouteSource { route: &route, providers, attempts, tokens };
        let shared = match gw.replicas {
            Some(link) if link.mode() == crate::replicas::Mode::Shared => {
                shared_lease(queue, link, &source, who, deadline).await
            }
            _ => None,
        };
        let local = shared.is_none();
        let leased = match shared {
            Some(leased) => leased,
            None => {
                let leased = queue.lease_as(&source, who, deadline).await;
                match (&leased, gw.replicas) {
                    // Redis came back while this request waited on the local
                    // share (closed in shared mode): lease through Redis.
                    (Err(NoKey::QueueTimeout { .. }), Some(link))
                        if link.mode() == crate::replicas::Mode::Shared =>
                    {
                        shared_lease(queue, link, &source, who, deadline).await.unwrap_or(leased)
                    }
                    _ => leased,
                }
            }
        };
        let queued = queued_at.elapsed();
        attempts.waited(queued);
        metrics.queue_wait(queued);
        let lease = match leased {
            Ok(lease) => lease,
            Err(no_key) => {
                let mut give_up = attempts.give_up(no_key);
                if let GiveUp::Upstream(answer) = &mut give_up {
                    retry_after_for(answer, &route, providers, tokens);
                }
                return give_up.into_response();
            }
        };
        let (Some(provider), Some(target)) =
            (providers.get(lease.provider), route.targets().get(lease.target))
        else {
            // A lease names a provider and target of this route: it came from them.
            return attempts.exhausted(std::iter::empty()).into_response();
        };
        if let (true, Some(link)) = (local, gw.replicas) {
            link.sent_locally(provider, &lease);
        }
        attempts.begin(&lease, metrics);
        *served = Some(target.route.clone());
        let label = lease.selected.key().label();
        tracing::Span::current().record("key", label);
        let sent_at = tokio::time::Instant::now();
        let upstream = clients.get(provider);
        let mut sent = body_for(&body, model_at.as_ref(), target, provider, &mut rewritten, lease.target);
        // Usage for a stream whose client did not ask for it, where the
        // provider is known to take the field: the extra chunk is taken out,
        // unless the caller keeps it (a translated stream reads it).
        let mut asked_usage = false;
        if (reads_usage || keep_usage) && provider.stream_usage {
            if let Some(with) = crate::json::with_stream_usage(&sent) {
                sent = with;
                asked_usage = !keep_usage;
            }
        }
        let answer = upstream.send(&parts, sent, &lease.auth).await;
        let took = sent_at.elapsed();
        attempts.waited(took);
        metrics.upstream_latency(took);
        let resp = match answer {
            Ok(resp) => resp,
            Err(e) => {
                let verdict = classify_transport(&e);
                // Refused or unreachable: the provider is down, not the key.
                if matches!(e, UpstreamError::Connect { .. }) {
                    attempts.skip_provider(&route, lease.provider);
                } else {
                    attempts.provider_fault(&route, lease.provider);
                }
                tracing::warn!(id, provider = provider.name(), key = label, error = %e, "upstream attempt failed; failing over");
                judged(provider, gw.replicas, &lease, verdict);
                attempts.failed(Failure::Transport(e));
                // Dropped: the reservation counts (the upstream may have done the work).
                drop(lease.permit);
                continue;
            }
        };
        let status = resp.status();
        if learn(&lease, provider.dialect, resp.headers()) {
            if let Some(link) = gw.replicas {
                link.learned(provider, &lease);
            }
        }
        if !needs_body(status) {
            judged(provider, gw.replicas, &lease, classify(status, resp.headers(), &[]));
            let record = match (gw.sink, attempts.ledger.as_mut()) {
                (Some(sink), Some(notes)) => {
                    notes.tapped = true;
                    let upstream_model = target.model.clone().or_else(|| Some(Arc::clone(&notes.model)));
                    let finished = crate::usage::Finished {
                        at: std::time::SystemTime::now(),
                        client: notes.client.clone(),
                        model: std::mem::take(&mut notes.model),
                        provider: Some(Arc::clone(provider.name_arc())),
                        upstream_model,
                        key: notes.key.take(),
                        status: status.as_u16(),
                        attempts: u8::try_from(attempts.made()).unwrap_or(u8::MAX),
                        first_byte: None,
                        total: Duration::ZERO,
                        stream: false,
                        usage: None,
                        error: None,
                        complete: false,
                        cache_hit: false,
                    };
                    Some((finished, Arc::clone(sink), started))
                }
                _ => None,
            };
            let settle = crate::usage::Settle { key: Some(lease.permit), client: client_permit.0, record };
            return stream(metrics, resp, slot, settle, reads_usage, asked_usage);
        }
        // A verdict that does not depend on the body is reported before the body is read.
        let by_body = judged_by_body(status)
            || (status == StatusCode::TOO_MANY_REQUESTS && provider.dialect.explains_429());
        let early = (!by_body).then(|| classify(status, resp.headers(), &[]));
        if let Some(verdict) = early {
            judged(provider, gw.replicas, &lease, verdict);
            if verdict.action == Action::FailOver {
                log_failover(id, provider.name(), label, status, verdict);
            }
        }
        let answer = Box::pin(read_answer(resp)).await;
        let verdict = early.unwrap_or_else(|| {
            let verdict = classify_with(provider.dialect, &lease, status, &answer);
            if let (Some(link), StatusCode::TOO_MANY_REQUESTS) = (gw.replicas, status) {
                link.learned(provider, &lease);
            }
            judged(provider, gw.replicas, &lease, verdict);
            if verdict.action == Action::FailOver {
                log_failover(id, provider.name(), label, status, verdict);
            }
            verdict
        });
        // An error answer used no tokens.
        lease.permit.finish(Some(0));
        match verdict.action {
            // A model failing at one provider: another target may serve the alias.
            Action::Deliver if verdict.result == AttemptResult::ModelError && route.targets().len() > 1 => {
                attempts.skip_targets |= 1u64.checked_shl(lease.target as u32).unwrap_or(0);
                log_failover(id, provider.name(), label, status, verdict);
                attempts.failed(Failure::Upstream { answer, result: verdict.result });
            }
            Action::Deliver => {
                let mut answer = answer;
                retry_after_for(&mut answer, &route, providers, tokens);
                return reply::upstream_error(answer);
            }
            Action::FailOver => {
                if verdict.result == AttemptResult::ServerError {
                    attempts.provider_fault(&route, lease.provider);
                }
                attempts.failed(Failure::Upstream { answer, result: verdict.result });
            }
        }
    }
    let pools = route.targets().iter().filter_map(|t| providers.get(t.provider)).map(|p| &*p.keys);
    let mut give_up = attempts.exhausted(pools);
    if let GiveUp::Upstream(answer) = &mut give_up {
        retry_after_for(answer, &route, providers, tokens);
    }
    give_up.into_response()
}

/// An upstream 429 passed back without `Retry-After` (NVIDIA's is bare):
/// says when a key of `route` is free again, as ProxyPal's own 429s do.
fn retry_after_for(answer: &mut UpstreamAnswer, route: &Route, providers: &[Arc<Provider>], tokens: u64) {
    if answer.status != StatusCode::TOO_MANY_REQUESTS
        || answer.headers.contains_key(http::header::RETRY_AFTER)
    {
        return;
    }
    let none = crate::lease::Tried::default();
    let soonest = route
        .targets()
        .iter()
        .filter_map(|t| providers.get(t.provider).map(|p| (t.provider, p)))
        .filter_map(|(i, p)| crate::lease::time_to_lease(&p.keys, i, &none, tokens).ok())
        .min();
    if let Some(wait) = soonest {
        answer.headers.insert(http::header::RETRY_AFTER, reply::retry_after_secs(wait).into());
    }
}

/// [`classify`] of an answer whose body was read, with what the provider's
/// dialect says about a 429: when to try again, whether the day is spent.
fn classify_with(dialect: Dialect, lease: &Lease, status: StatusCode, answer: &UpstreamAnswer) -> Verdict {
    let mut verdict = classify(status, &answer.headers, &answer.body);
    if status != StatusCode::TOO_MANY_REQUESTS {
        return verdict;
    }
    let now_ms = lease.quotas.clock().now() / 1_000_000;
    let explained = dialect.rate_limited(&answer.headers, &answer.body, now_ms);
    let index = lease.selected.index();
    for announced in &explained.announced {
        lease.quotas.learn(index, announced);
    }
    if let Some(wait) = explained.retry_after {
        if explained.exhausted == crate::dialect::Exhausted::Day && !explained.upstream_busy {
            // A spent day: the key's budget is blocked until the upstream's reset.
            lease.quotas.block(index, wait);
        }
        verdict.outcome = proxypal_keypool::Outcome::RateLimited { retry_after: Some(wait) };
    }
    verdict
}

/// Feeds what the upstream announced about its limits (`x-ratelimit-*`) to
/// the key's budget. Free when the answer announces nothing.
fn learn(lease: &Lease, dialect: Dialect, headers: &http::HeaderMap) -> bool {
    if !headers.keys().any(|name| name.as_str().starts_with("x-ratelimit-")) {
        return false;
    }
    let index = lease.selected.index();
    let now_ms = lease.quotas.clock().now() / 1_000_000;
    let mut any = false;
    for announced in dialect.announced(headers, now_ms) {
        lease.quotas.learn(index, &announced);
        any = true;
    }
    any
}

/// The instant `timeout` from now; a timeout too large for the clock (a
/// `Duration::MAX` from an embedder) means about thirty years, not a panic.
fn deadline_after(timeout: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(timeout).unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 24 * 3600))
}

/// Reports the verdict on a key to the pool and to the key's metrics.
///
/// A bare 429 (no `Retry-After`) rests the key for the configured cooldown,
/// unless the key's own request windows are full and say when they free up:
/// then for that long, within the cooldown.
fn judged(provider: &Provider, replicas: Option<&SharedQuota>, lease: &Lease, verdict: Verdict) {
    let keys = &provider.keys;
    let mut outcome = verdict.outcome;
    if let proxypal_keypool::Outcome::RateLimited { retry_after: None } = outcome {
        // The request windows only: not the shaper's next slot, nor a
        // concurrency cap the request itself still holds.
        let log = lease.quotas.window_wait(lease.selected.index());
        if !log.is_zero() {
            let cooldown = keys.policy().rate_limited;
            outcome = proxypal_keypool::Outcome::RateLimited { retry_after: Some(log.min(cooldown)) };
        }
    }
    keys.report(&lease.selected, outcome);
    lease.metrics.attempt(verdict.result);
    if let Some(link) = replicas {
        if !matches!(outcome, proxypal_keypool::Outcome::Success) {
            link.judged(provider, lease);
        }
    }
}

fn log_failover(id: &str, provider: &str, key: &str, status: StatusCode, verdict: Verdict) {
    let status = status.as_u16();
    match verdict.outcome {
        proxypal_keypool::Outcome::RateLimited { retry_after } => {
            tracing::info!(id, provider, key, retry_after = ?retry_after, "upstream rate limited the key; failing over");
        }
        proxypal_keypool::Outcome::AuthFailed => {
            tracing::warn!(id, provider, key, status, "upstream rejected the key; disabling it");
        }
        _ if verdict.result == AttemptResult::ModelError => {
            tracing::warn!(
                id,
                provider,
                key,
                status,
                "the model failed at this provider; trying the next target"
            );
        }
        _ => tracing::warn!(id, provider, key, status, "upstream error; failing over"),
    }
}

/// Buffers the client's body (bounded) so it can be replayed on another key.
async fn read_body<B>(body: B, headers: &http::HeaderMap, max: usize) -> Result<Bytes, Response<ProxyBody>>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    let declared =
        headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(reply::too_large(max));
    }
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            Err(reply::too_large(max))
        }
        Err(e) => {
            tracing::debug!(error = %e, "client body read failed");
            Err(reply::unreadable_body())
        }
    }
}

/// Reads an upstream error answer (bounded in size and time). Callers box this future: error
/// answers are the exception, and unboxed it would enlarge every request's future (moved on
/// each `.await` nesting).
async fn read_answer(resp: Response<UpstreamBody>) -> UpstreamAnswer {
    let (head, body) = resp.into_parts();
    let collect = Limited::new(body, MAX_ERROR_BODY).collect();
    let body = match tokio::time::timeout(ERROR_BODY_TIMEOUT, collect).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        _ => Bytes::new(),
    };
    UpstreamAnswer { status: head.status, headers: head.headers, body }
}

/// Streams a successful answer to the client frame by frame; the body holds
/// the in-flight slot (and, for SSE, the open-streams gauge) until it ends,
/// and the quota permits — read for `usage` (`reads_usage`) when token
/// windows count it or the ledger records it. `asked_usage`: ProxyPal added
/// `stream_options.include_usage`, so the usage-only chunk is taken out.
fn stream(
    metrics: &Metrics,
    resp: Response<UpstreamBody>,
    slot: Slot,
    mut settle: crate::usage::Settle,
    reads_usage: bool,
    asked_usage: bool,
) -> Response<ProxyBody> {
    let streaming =
        resp.headers().get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let stream = streaming.then(|| StreamGuard::new(metrics.open_streams()));
    if reads_usage {
        if let Some((record, _, _)) = settle.record.as_mut() {
            record.stream = streaming;
        }
        return resp.map(|body| {
            let mut tapped = crate::usage::Tap::new(body.map_err(Into::into), streaming, settle);
            if asked_usage {
                tapped = tapped.stripping_usage();
            }
            Guarded::new(tapped, (slot, stream)).boxed()
        });
    }
    resp.map(|body| Guarded::new(body.map_err(Into::into), (slot, stream, settle)).boxed())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::HeaderMap;
    use proxypal_keypool::Outcome;

    use super::*;
    use crate::lease::tests::gateway;
    use crate::lease::try_lease;
    use proxypal_limiter::Cause;

    fn answer(status: u16) -> UpstreamAnswer {
        UpstreamAnswer {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
        }
    }

    fn upstream_failure(status: u16, result: AttemptResult) -> Failure {
        Failure::Upstream { answer: answer(status), result }
    }

    fn timeout() -> Failure {
        Failure::Transport(UpstreamError::ResponseTimeout {
            uri: http::Uri::from_static("http://127.0.0.1:9/v1/chat/completions"),
            after: Duration::from_secs(1),
        })
    }

    fn kind(give_up: &GiveUp) -> String {
        match give_up {
            GiveUp::NoKey(no_key) => format!("{no_key:?}"),
            GiveUp::KeysRejected(status) => format!("KeysRejected({})", status.as_u16()),
            GiveUp::Upstream(a) => format!("Upstream({})", a.status.as_u16()),
            GiveUp::Transport(_) => "Transport".to_owned(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_record_keys_retries_and_time_elsewhere() {
        let gw = gateway(4, 60_000); // one permit each, and time stands still
        let metrics = gw.metrics();
        let mut attempts = Attempts::new(1);
        attempts.limit(99);
        assert_eq!(attempts.max, crate::lease::MAX_ATTEMPTS, "clamped to what the stack array holds");
        attempts.limit(2);
        assert!(attempts.may_try());

        let first = try_lease(&gw.test_keys(), 0, &attempts.tried, 0).unwrap();
        attempts.begin(&first, metrics);
        attempts.waited(Duration::from_millis(5));
        attempts.failed(upstream_failure(429, AttemptResult::RateLimited));
        assert!(attempts.may_try());

        let second = try_lease(&gw.test_keys(), 0, &attempts.tried, 0).unwrap();
        assert_ne!(second.selected.index(), first.selected.index(), "a tried key is not leased again");
        attempts.begin(&second, metrics);
        attempts.waited(Duration::from_millis(7));
        assert!(!attempts.may_try(), "two attempts were allowed");
        assert_eq!(
            attempts.tried.of(0).collect::<Vec<_>>(),
            [first.selected.index(), second.selected.index()]
        );
        assert_eq!(attempts.elsewhere, Duration::from_millis(12));
        assert!(Arc::ptr_eq(attempts.served_by.as_ref().unwrap(), &second.metrics), "the last key serves");

        let mut registry = prometheus_client::registry::Registry::default();
        let counted = Metrics::register(&mut registry);
        let mut again = Attempts::new(3);
        again.begin(&try_lease(&gw.test_keys(), 0, &Tried::default(), 0).unwrap(), &counted);
        again.failed(timeout());
        again.begin(&try_lease(&gw.test_keys(), 0, &again.tried, 0).unwrap(), &counted);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains(r#"retries_total{reason="transport_error"} 1"#), "{text}");
        assert!(!text.contains(r#"retries_total{reason="rate_limited"}"#), "{text}");
    }

    #[test]
    fn giving_up_answers_with_the_last_failure_unless_it_disabled_the_last_key() {
        #[rustfmt::skip]
        let table: Vec<(Option<Failure>, NoKey, &str)> = vec![
            (None, NoKey::QueueTimeout { wait: Duration::from_secs(2), cause: Cause::None }, "QueueTimeout { wait: 2s, cause: None }"),
            (None, NoKey::AllDisabled, "AllDisabled"),
            (None, NoKey::NoKeys, "NoKeys"),
            (Some(upstream_failure(429, AttemptResult::RateLimited)), NoKey::QueueTimeout { wait: Duration::ZERO, cause: Cause::None }, "Upstream(429)"),
            (Some(upstream_failure(502, AttemptResult::ServerError)), NoKey::AllTried, "Upstream(502)"),
            (Some(timeout()), NoKey::AllTried, "Transport"),
            (Some(upstream_failure(401, AttemptResult::KeyRejected)), NoKey::AllTried, "KeysRejected(401)"),
            // The rejected key was the last usable one: say so, not "bad gateway".
            (Some(upstream_failure(403, AttemptResult::KeyRejected)), NoKey::AllDisabled, "AllDisabled"),
        ];
        for (last, no_key, want) in table {
            let mut attempts = Attempts::new(3);
            let described = format!("{last:?} / {no_key:?}");
            if let Some(last) = last {
                attempts.failed(last);
            }
            assert_eq!(kind(&attempts.give_up(no_key)), want, "{described}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn exhausted_attempts_answer_with_the_last_failure() {
        let gw = gateway(2, 60_000);
        let mut attempts = Attempts::new(2);
        assert_eq!(kind(&attempts.exhausted(std::iter::once(&*gw.test_keys()))), "NoKeys");
        attempts.failed(upstream_failure(503, AttemptResult::ServerError));
        assert_eq!(kind(&attempts.exhausted(std::iter::once(&*gw.test_keys()))), "Upstream(503)");
        // A rejected key while another key is still usable: the upstream's rejection.
        let one = &gw.test_keys().select_with(|c| c.index == 0).unwrap();
        gw.test_keys().report(one, Outcome::AuthFailed);
        attempts.failed(upstream_failure(401, AttemptResult::KeyRejected));
        assert_eq!(kind(&attempts.exhausted(std::iter::once(&*gw.test_keys()))), "KeysRejected(401)");
        // ... and once no key is usable any more: all keys disabled.
        let two = &gw.test_keys().select_with(|c| c.index == 1).unwrap();
        gw.test_keys().report(two, Outcome::AuthFailed);
        attempts.failed(upstream_failure(401, AttemptResult::KeyRejected));
        assert_eq!(kind(&attempts.exhausted(std::iter::once(&*gw.test_keys()))), "AllDisabled");
    }
}
