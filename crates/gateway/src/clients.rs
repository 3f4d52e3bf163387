//! Named clients: who sent a request (by its token, compared in constant
//! time), which public models it may use, its own quota in the quota engine,
//! and its share of the pool when clients compete for permits.
//!
//! Operator tokens (`client_tokens`) keep their meaning: an anonymous
//! client with no quota of its own that may read everything.

use std::sync::Arc;
use std::time::Duration;

use proxypal_keypool::Secret;
use proxypal_limiter::{Cause, KeyBudget, Limits, Permit, QuotaEngine, Wait};

use crate::admission::Client;
use crate::fair::Waiter;
use crate::keyset::{Engine, SharedClock};

/// One named client, as configured.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// Its name: in stats, the ledger, logs and webhooks.
    pub name: String,
    /// The token it presents (`Authorization: Bearer <token>`).
    pub token: Secret,
    /// Its own quota: the quota engine's window fields (empty: none).
    pub limits: Limits,
    /// Public model names it may use, as globs (`*` any run of characters,
    /// `?` one); empty: every model.
    pub models: Vec<String>,
    /// Its share of the pool when clients compete (default 1).
    pub weight: u32,
    /// May read everyone's usage and use the operator endpoints.
    pub admin: bool,
}

impl ClientConfig {
    /// A client called `name` presenting `token`: no quota, every model,
    /// weight 1, not an admin.
    pub fn new(name: impl Into<String>, token: Secret) -> Self {
        Self {
            name: name.into(),
            token,
            limits: Limits::default(),
            models: Vec::new(),
            weight: 1,
            admin: false,
        }
    }

    /// The same client with its own quota.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The same client allowed only these public models (globs).
    pub fn with_models(mut self, models: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.models = models.into_iter().map(Into::into).collect();
        self
    }

    /// The same client with `weight`.
    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// The same client as an admin.
    pub fn as_admin(mut self) -> Self {
        self.admin = true;
        self
    }
}

/// Whether `name` matches `pattern`: `*` is any run of characters (also
/// none), `?` any one character, everything else itself.
///
/// ```
/// use proxypal_gateway::glob_match;
/// assert!(glob_match("meta/*", "meta/llama-3.3-70b-instruct"));
/// assert!(glob_match("claude-*-haiku*", "claude-3-5-haiku-20241022"));
/// assert!(!glob_match("llama-70b", "llama-70b-fast"));
/// ```
pub fn glob_match(pattern: &str, name: &str) -> bool {
    // Over bytes, without allocating (it runs per request for allow-lists and
    // glob aliases); `?` and a `*` retry step over one whole UTF-8 character.
    // Iterative matching with one backtrack point (the last `*`): linear in practice.
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let width = |b: u8| match b {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    };
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(b'?') => {
                pi += 1;
                ni += width(n[ni]);
            }
            Some(&c) if c == n[ni] => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    let next = sn + width(n[sn]);
                    pi = sp + 1;
                    ni = next;
                    star = Some((sp, next));
                }
                None => return false,
            },
        }
    }
    p.get(pi..).is_some_and(|rest| rest.iter().all(|&c| c == b'*'))
}

/// A named client in the running gateway.
#[derive(Debug)]
pub(crate) struct Named {
    pub(crate) name: Arc<str>,
    pub(crate) models: Box<[String]>,
    pub(crate) admin: bool,
    /// Its lane in the queue.
    pub(crate) waiter: Waiter,
    /// Whether its quota has any window (else no permit is taken).
    pub(crate) limited: bool,
    /// Its limits as configured (for the 429's words).
    pub(crate) limits: Limits,
    /// Its budget's id in a quota shared with other replicas (a hash of its
    /// name: names are free text, Redis keys are not).
    pub(crate) shared_id: Arc<str>,
    /// Requests refused by its own quota so far.
    pub(crate) refused: std::sync::atomic::AtomicU64,
}

/// Every client token and named client of one configuration generation.
pub(crate) struct ClientSet {
    operators: Vec<Box<[u8]>>,
    tokens: Vec<Box<[u8]>>,
    named: Box<[Named]>,
    /// One budget per named client, by position.
    quotas: Arc<Engine>,
    anonymous: Waiter,
}

impl std::fmt::Debug for ClientSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSet")
            .field("operator_tokens", &self.operators.len())
            .field("clients", &self.named.iter().map(|n| &*n.name).collect::<Vec<_>>())
            .finish()
    }
}

/// Why a named client's request is refused before it reaches the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The model is not on its list.
    Model { client: Arc<str>, model: String },
    /// Its own quota is spent until `wait` from now.
    Quota { client: Arc<str>, wait: Duration, limit: String },
}

impl Refusal {
    /// The client refused.
    pub(crate) fn client(&self) -> &str {
        match self {
            Refusal::Model { client, .. } | Refusal::Quota { client, .. } => client,
        }
    }
}

/// A client limit that failed to compile: the client's position and why.
#[derive(Debug)]
pub(crate) struct ClientLimitError {
    pub(crate) index: usize,
    pub(crate) error: proxypal_limiter::LimitError,
}

impl ClientSet {
    /// The clients of `operators` (tokens of anonymous operators) and
    /// `clients`; `previous` carries the windows of clients that stay (by name).
    pub(crate) fn new(
        operators: &[Secret],
        clients: &[ClientConfig],
        clock: SharedClock,
        previous: Option<&ClientSet>,
    ) -> Result<Self, ClientLimitError> {
        let mut budgets = Vec::with_capacity(clients.len());
        let mut named = Vec::with_capacity(clients.len());
        for (index, c) in clients.iter().enumerate() {
            let own = if c.limits.is_empty() {
                None
            } else {
                Some(c.limits.compile().map_err(|error| ClientLimitError { index, error })?)
            };
            let limited = own.as_ref().is_some_and(|s| !s.is_unlimited());
            let was = previous.and_then(|p| p.named.iter().position(|n| *n.name == *c.name));
            budgets.push(KeyBudget { own, account: None, previous: was });
            let name: Arc<str> = Arc::from(c.name.as_str());
            named.push(Named {
                waiter: Waiter { lane: Arc::clone(&name), weight: c.weight.max(1) },
                name,
                models: c.models.clone().into(),
                admin: c.admin,
                limited,
                limits: c.limits.clone(),
                shared_id: Arc::from(crate::replicas::client_id(&c.name)),
                refused: std::sync::atomic::AtomicU64::new(
                    previous
                        .and_then(|p| p.named.iter().find(|n| *n.name == *c.name))
                        .map_or(0, |n| n.refused.load(std::sync::atomic::Ordering::Relaxed)),
                ),
            });
        }
        let quotas = match previous {
            Some(p) => p.quotas.reshape(budgets),
            None => QuotaEngine::new(budgets, clock),
        };
        Ok(Self {
            operators: operators.iter().map(|t| t.expose().as_bytes().into()).collect(),
            tokens: clients.iter().map(|c| c.token.expose().as_bytes().into()).collect(),
            named: named.into(),
            quotas: Arc::new(quotas),
            anonymous: Waiter::anonymous(),
        })
    }

    /// Whether tokens are required at all.
    pub(crate) fn required(&self) -> bool {
        !self.operators.is_empty() || !self.tokens.is_empty()
    }

    /// The client behind `presented`, or `None` if it matches no token.
    /// Every token is compared fully, whatever matches, so timing tells
    /// nothing about which token or which prefix was right.
    pub(crate) fn identify(&self, presented: &[u8]) -> Option<Client> {
        if !self.required() {
            return Some(Client::Open);
        }
        let mut found = None;
        for (i, token) in self.operators.iter().enumerate() {
            if crate::admission::constant_time_eq(token, presented) {
                found = Some(Client::Token(i));
            }
        }
        for (i, token) in self.tokens.iter().enumerate() {
            if crate::admission::constant_time_eq(token, presented) {
                found = Some(Client::Named(i));
            }
        }
        found
    }

    /// The client named by `headers` (`Authorization: Bearer <token>`), or
    /// `None` when a token is required and missing or wrong.
    pub(crate) fn authenticate(&self, headers: &http::HeaderMap) -> Option<Client> {
        if !self.required() {
            return Some(Client::Open); // without a header lookup
        }
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or_default();
        self.identify(presented)
    }

    /// The named client `client` is, if it is one.
    pub(crate) fn named(&self, client: Client) -> Option<&Named> {
        match client {
            Client::Named(i) => self.named.get(i),
            _ => None,
        }
    }

    /// Every named client, in configuration order.
    pub(crate) fn all(&self) -> &[Named] {
        &self.named
    }

    /// The quota engine of the named clients (budget `i` is client `i`'s).
    pub(crate) fn quotas(&self) -> &Arc<Engine> {
        &self.quotas
    }

    /// Counts a request of `client` refused by its own quota.
    pub(crate) fn refused(&self, client: Client) {
        if let Some(named) = self.named(client) {
            named.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Where `client` waits in a queue.
    pub(crate) fn waiter(&self, client: Client) -> &Waiter {
        self.named(client).map_or(&self.anonymous, |n| &n.waiter)
    }

    /// Whether `client` may ask for `model` (`None`: the body names none).
    pub(crate) fn check_model(&self, client: Client, model: Option<&str>) -> Result<(), Refusal> {
        let Some(named) = self.named(client) else { return Ok(()) };
        if named.models.is_empty() {
            return Ok(());
        }
        match model {
            Some(m) if named.models.iter().any(|p| glob_match(p, m)) => Ok(()),
            _ => {
                Err(Refusal::Model { client: Arc::clone(&named.name), model: model.unwrap_or("").to_owned() })
            }
        }
    }

    /// Takes a request (reserving `tokens`) from `client`'s own quota
    /// (an empty [`ClientPermit`] when it has none); `Err` when it is spent.
    pub(crate) fn admit(&self, client: Client, tokens: u64) -> Result<ClientPermit, Refusal> {
        let Some(index) = self.limited(client) else { return Ok(ClientPermit(None)) };
        self.take(index, tokens).map_err(|w| self.over_quota(index, w.wait))
    }

    /// The position of `client`'s own budget, when it is a named client
    /// with a quota.
    pub(crate) fn limited(&self, client: Client) -> Option<usize> {
        let Client::Named(index) = client else { return None };
        self.named.get(index).filter(|n| n.limited).map(|_| index)
    }

    /// Takes a request of limited client `index` from the local engine (its
    /// whole budget, or this replica's share of it while the quota shared
    /// with other replicas is out of reach); `Err` says how long until it
    /// could, and why not now.
    pub(crate) fn take(&self, index: usize, tokens: u64) -> Result<ClientPermit, Wait> {
        if let Some(permit) = self.quotas.try_acquire(index, tokens) {
            return Ok(ClientPermit(Some(permit)));
        }
        Err(self
            .quotas
            .wait(index, tokens)
            .unwrap_or(Wait { wait: Duration::from_secs(1), cause: Cause::None }))
    }

    /// [`take`](Self::take) for a request the shared quota admitted: the
    /// request windows are charged unchecked (so the local view and `/stats`
    /// hold what this replica sent); what only this replica counts (token
    /// reservations in flight, concurrency, a shaper) is checked as usual.
    pub(crate) fn take_admitted(&self, index: usize, tokens: u64) -> Result<ClientPermit, Wait> {
        if let Some(permit) = self.quotas.try_acquire_admitted(index, tokens) {
            return Ok(ClientPermit(Some(permit)));
        }
        Err(self
            .quotas
            .local_wait(index, tokens)
            .unwrap_or(Wait { wait: Duration::from_secs(1), cause: Cause::None }))
    }

    /// Client `index`'s refusal: its quota is spent for `wait`.
    pub(crate) fn over_quota(&self, index: usize, wait: Duration) -> Refusal {
        match self.named.get(index) {
            Some(named) => Refusal::Quota {
                client: Arc::clone(&named.name),
                wait,
                limit: describe(&named.limits, Cause::None),
            },
            // Positions come from this set: never reached.
            None => Refusal::Quota { client: Arc::from(""), wait, limit: String::new() },
        }
    }

    /// Whether any named client has a quota of its own.
    pub(crate) fn any_limited(&self) -> bool {
        self.named.iter().any(|n| n.limited)
    }
}

/// What a request took from its client's own quota (nothing when the
/// client has none); settled with the answer's usage when it ends.
#[derive(Debug)]
pub(crate) struct ClientPermit(pub(crate) Option<Permit<SharedClock>>);

/// The limit behind `cause`, in the configuration's words.
fn describe(limits: &Limits, cause: Cause) -> String {
    let _ = cause;
    let mut parts = Vec::new();
    let fields = [
        ("requests_per_minute", limits.requests_per_minute),
        ("requests_per_day", limits.requests_per_day),
        ("tokens_per_minute", limits.tokens_per_minute),
        ("tokens_per_day", limits.tokens_per_day),
        ("max_concurrent", limits.max_concurrent.map(u64::from)),
    ];
    for (field, value) in fields {
        if let Some(v) = value {
            parts.push(format!("{field}: {v}"));
        }
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_whole_names() {
        #[rustfmt::skip]
        let table = [
            ("*", "anything", true), ("*", "", true), ("meta/*", "meta/llama", true),
            ("meta/*", "nvidia/meta/x", false), ("llama-?b", "llama-7b", true), ("llama-?b", "llama-70b", false),
            ("claude-*-haiku*", "claude-haiku-4-5", false), ("claude-*haiku*", "claude-haiku-4-5", true),
            ("a*b*c", "aXXbYYc", true), ("a*b*c", "aXXbYY", false), ("exact", "exact", true), ("exact", "exactly", false),
            // `?` is one character, not one byte.
            ("a?c", "aéc", true), ("a?c", "aééc", false), ("?-model", "模-model", true), ("*é", "café", true),
            ("模型-*", "模型-large", true), ("*型", "模型", true), ("*?", "", false), ("", "", true), ("", "x", false),
        ];
        for (pattern, name, want) in table {
            assert_eq!(glob_match(pattern, name), want, "{pattern} ~ {name}");
        }
    }

    fn set(clients: &[ClientConfig]) -> ClientSet {
        let clock: SharedClock = Arc::new(proxypal_limiter::SystemClock::new());
        ClientSet::new(&[Secret::new("operator-token")], clients, clock, None).unwrap()
    }

    #[test]
    fn tokens_name_operators_and_clients() {
        let clients = set(&[
            ClientConfig::new("alice", Secret::new("pp-alice")),
            ClientConfig::new("bob", Secret::new("pp-bob")),
        ]);
        assert_eq!(clients.identify(b"operator-token"), Some(Client::Token(0)));
        assert_eq!(clients.identify(b"pp-bob"), Some(Client::Named(1)));
        assert_eq!(clients.identify(b"pp-bo"), None);
        assert_eq!(clients.identify(b""), None);
        assert_eq!(&*clients.waiter(Client::Named(0)).lane, "alice");
        assert_eq!(&*clients.waiter(Client::Token(0)).lane, "", "operators queue anonymously");
    }

    #[test]
    fn a_model_list_allows_only_its_globs() {
        let clients =
            set(&[ClientConfig::new("alice", Secret::new("pp-alice")).with_models(["llama-70b", "meta/*"])]);
        let alice = Client::Named(0);
        assert!(clients.check_model(alice, Some("llama-70b")).is_ok());
        assert!(clients.check_model(alice, Some("meta/llama-3.1-8b-instruct")).is_ok());
        assert!(clients.check_model(alice, Some("mistral/x")).is_err());
        assert!(clients.check_model(alice, None).is_err(), "no model named: not on the list");
        assert!(clients.check_model(Client::Token(0), Some("mistral/x")).is_ok(), "operators are not listed");
    }

    #[test]
    fn a_client_quota_refuses_with_the_wait_and_its_limit() {
        let limits = Limits { requests_per_minute: Some(2), ..Limits::default() };
        let clients = set(&[ClientConfig::new("alice", Secret::new("pp-alice")).with_limits(limits)]);
        let alice = Client::Named(0);
        assert!(clients.admit(alice, 0).unwrap().0.is_some());
        assert!(clients.admit(alice, 0).unwrap().0.is_some());
        match clients.admit(alice, 0) {
            Err(Refusal::Quota { client, wait, limit }) => {
                assert_eq!(&*client, "alice");
                assert!(wait > Duration::from_secs(50), "{wait:?}");
                assert_eq!(limit, "requests_per_minute: 2");
            }
            other => panic!("{other:?}"),
        }
        assert!(clients.admit(Client::Token(0), 0).unwrap().0.is_none(), "operators have no quota");
    }
}
