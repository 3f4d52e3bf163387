//! One quota for several replicas: every request window, cooldown and
//! disabled key decided in Redis (see [`proxypal_shared`]), and a local
//! share of each window while Redis cannot be reached.
//!
//! # Modes
//! - **shared**: each attempt asks Redis once, offering the keys this replica
//!   would try in its round-robin order; Redis admits the first with room in
//!   every window of its budgets (its own and its account's) that no replica
//!   found cooling down or disabled. The local quota engine is charged too,
//!   unchecked, so it always holds what this replica sent.
//! - **degraded** (Redis unreachable, slower than `timeout`, or never
//!   reached): the local engine serves ⌊limit / N⌋ of every window, N the
//!   replicas counted from heartbeats (at least `replicas`), and only from
//!   one lease plus the longest window after the last heartbeat that Redis
//!   took: by then the others keep this replica's share back, and every
//!   window that holds one of its local sends began after they did. What it
//!   sends is written to Redis when it returns, with the cooldowns and
//!   disables it saw meanwhile.
//!
//! After a state loss (Redis restarted empty, `FLUSHALL`, `SCRIPT FLUSH` is
//! only a reload) each replica replays what its local engine holds, and
//! admissions wait until the replicas seen before have done so, or one
//! window has passed.
//!
//! Named clients' own quotas are budgets too, in a pool of their own
//! (`:clients`, one candidate per client, its name hashed): admitted in
//! Redis while shared (the local client engine charged unchecked), from
//! this replica's share while degraded, heartbeaten, replayed and written
//! back like a provider's keys.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proxypal_keypool::{KeyPool, KeyStatus};
use proxypal_limiter::WindowView;
use proxypal_shared::{Candidate, Kind, SharedBudgets, SharedError, Window};

use crate::clients::{ClientPermit, ClientSet, Refusal};
use crate::keyset::{KeyResources, SharedClock};
use crate::lease::{Lease, Tried};
use crate::provider::Provider;

pub use proxypal_shared::redacted;

/// How replicas share quotas through Redis (`shared:` in the server's config).
#[derive(Clone)]
#[non_exhaustive]
pub struct SharedQuotaConfig {
    /// `redis://host:port/db` or `rediss://…`.
    pub redis_url: String,
    /// The namespace of every Redis key (several deployments, one Redis).
    pub key_prefix: String,
    /// Deadline of each Redis call on the request path.
    pub timeout: Duration,
    /// Refuse to start until Redis answers (else start degraded).
    pub require_on_start: bool,
    /// The least number of replicas to count (0: from heartbeats alone). Set
    /// it to the deployment's replica count, so that a replica that starts
    /// while Redis is away takes no more than its share.
    pub replicas: u64,
    /// How long one heartbeat keeps a replica counted as live.
    pub lease: Duration,
    /// How often heartbeats are sent (and Redis is retried while degraded).
    pub heartbeat: Duration,
    /// The longest a replica serves its local share without Redis; the
    /// others keep its share back that long (plus a lease and a window).
    pub max_degraded: Duration,
    /// For `rediss://`: the CA certificate(s) (PEM) to trust instead of the
    /// system's roots.
    pub ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for SharedQuotaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedQuotaConfig")
            .field("redis_url", &proxypal_shared::redacted(&self.redis_url))
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("require_on_start", &self.require_on_start)
            .field("replicas", &self.replicas)
            .field("lease", &self.lease)
            .field("heartbeat", &self.heartbeat)
            .field("max_degraded", &self.max_degraded)
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "…"))
            .finish()
    }
}

impl SharedQuotaConfig {
    /// The defaults for Redis at `redis_url`: prefix `proxypal`, 50 ms
    /// deadline, a 3 s lease renewed every second, 15 minutes at most
    /// degraded.
    pub fn new(redis_url: impl Into<String>) -> Self {
        Self {
            redis_url: redis_url.into(),
            key_prefix: "proxypal".to_owned(),
            timeout: Duration::from_millis(50),
            require_on_start: false,
            replicas: 0,
            lease: Duration::from_secs(3),
            heartbeat: Duration::from_secs(1),
            max_degraded: Duration::from_secs(15 * 60),
            ca_pem: None,
        }
    }
}

/// Where a replica's quota decisions come from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// Redis decides.
    Shared,
    /// Redis is out of reach: the local share decides.
    Degraded,
}

impl Mode {
    /// `shared` or `degraded`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Shared => "shared",
            Mode::Degraded => "degraded",
        }
    }
}

/// Per pool, per key fingerprint: not before this engine instant.
type Hints = HashMap<Arc<str>, HashMap<Arc<str>, u64>>;

/// Keys offered to Redis per call: the next few in round-robin order (a
/// call with every key of a large pool would cost Redis its whole list each
/// time; a full chunk is skipped on the next call by its hints).
const CANDIDATES: usize = 4;

/// Keys looked at per attempt, at most (the rest wait for the next one:
/// the cursor moves on, and full keys are skipped by their hints).
const OFFERED: usize = 4 * CANDIDATES;

const SHARED: u8 = 1;
const DEGRADED: u8 = 2;

/// A send made from the local share, to be written to Redis on return.
struct Grant {
    pool: Arc<str>,
    id: Arc<str>,
    windows: Vec<OwnedWindow>,
    /// The engine clock's nanoseconds.
    at: u64,
    /// Tokens it reserved (counted as used: its use is not known here).
    tokens: u64,
}

/// How long a request holds a concurrency slot in Redis at most: a slot of
/// a replica that crashed mid-request comes back after this.
pub const CONCURRENCY_LEASE: Duration = Duration::from_secs(10 * 60);

/// A [`Window`] with owned names (for a grant kept until Redis returns).
#[derive(Debug, Clone)]
struct OwnedWindow {
    kind: Kind,
    budget: Option<String>,
    name: String,
    span: Duration,
    limit: u64,
    /// A calendar window's end, Unix microseconds.
    end_us: Option<u64>,
    /// A calendar window's start, Unix microseconds.
    start_us: u64,
}

impl OwnedWindow {
    /// Named by what it counts and its period: `r60000` (requests per
    /// rolling minute), `d86400` (requests per calendar day), `t…`/`td…`
    /// (tokens), so every replica names it alike.
    fn of(view: &WindowView<'_>) -> Self {
        let budget = view.account.map(account_id);
        let (kind, prefix) = match view.unit {
            proxypal_limiter::Unit::Tokens => (Kind::Tokens, "t"),
            _ => (Kind::Requests, ""),
        };
        let (name, end_us) = match view.resets_at {
            None => (format!("{prefix}r{}", view.period.as_millis()), None),
            Some(at) => (format!("{prefix}d{}", view.period.as_secs()), Some(at / 1_000)),
        };
        let start_us = view.started_at.map_or(0, |at| at / 1_000);
        Self { kind, budget, name, span: view.span, limit: view.limit, end_us, start_us }
    }

    /// A concurrency cap of `max` (of `account`'s budget, or the key's).
    fn concurrency(account: Option<&str>, max: u32) -> Self {
        Self {
            kind: Kind::Concurrency,
            budget: account.map(account_id),
            name: "c".to_owned(),
            span: CONCURRENCY_LEASE,
            limit: u64::from(max),
            end_us: None,
            start_us: 0,
        }
    }

    fn window(&self) -> Window<'_> {
        let w = match self.end_us {
            None => Window::new(&self.name, self.span, self.limit),
            Some(end) => Window::calendar(&self.name, self.start_us, end, self.limit),
        };
        let w = w.counting(self.kind);
        match &self.budget {
            Some(b) => w.of(b),
            None => w,
        }
    }
}

/// An account's name as it goes into Redis keys: hashed (names are free text).
fn account_id(name: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    let mut out = String::from("acct:");
    for byte in digest.as_ref().iter().take(8) {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// The pool of named clients' own budgets in Redis: one candidate per
/// client. Its name cannot be a provider's (those are letters, digits, `-`,
/// `_` and `.`), so the two never share keys.
pub(crate) const CLIENTS: &str = ":clients";

/// A named client's budget id in Redis: hashed (names are free text).
pub(crate) fn client_id(name: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, name.as_bytes());
    let mut out = String::from("client:");
    for byte in digest.as_ref().iter().take(8) {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A health change to write to Redis (now, or when it returns).
#[derive(Debug, Clone)]
enum Health {
    Cool { pool: Arc<str>, id: Arc<str>, for_: Duration },
    Disable { pool: Arc<str>, id: Arc<str> },
    Enable { pool: Arc<str>, id: Arc<str> },
    Learn { pool: Arc<str>, id: Arc<str>, window: OwnedWindow, limit: u64 },
}

#[derive(Default)]
struct Pending {
    health: Vec<Health>,
    grants: Vec<Grant>,
    /// The epoch each pool was last seen in.
    epochs: HashMap<Arc<str>, u64>,
    /// When the last "still degraded" warning was logged (engine ns).
    warned_at: u64,
    /// The learned limits already queued or written, by pool, owner and
    /// window: an answer that repeats one (Groq's headers, on every
    /// response) queues nothing.
    learned: HashMap<String, u64>,
}

/// One budget's entries to replay: (id, window, (Redis µs, amount) per entry).
type Log = (Arc<str>, OwnedWindow, Vec<(u64, u64)>);

/// A pool this replica heartbeats: a provider's keys, or the named clients.
#[derive(Clone, Copy)]
enum Pool<'a> {
    Keys(&'a Arc<Provider>),
    Clients(&'a ClientSet),
}

impl Pool<'_> {
    fn name(&self) -> &str {
        match self {
            Pool::Keys(p) => p.name(),
            Pool::Clients(_) => CLIENTS,
        }
    }
}

/// What a named client's admission in Redis decided.
enum ClientAdmission {
    /// Admitted, and charged to the local engine.
    Admitted(ClientPermit),
    /// Its quota is spent for this long.
    Full(Duration),
    /// Ask again after this long (a state loss being replayed, a calendar
    /// window recomputed).
    Again(Duration),
    /// Redis cannot be asked now: the local share decides.
    Unavailable,
}

/// Client `index`'s budget as Redis counts it: its id and windows.
fn client_budget(clients: &ClientSet, index: usize) -> Option<(Arc<str>, Vec<OwnedWindow>)> {
    let named = clients.all().get(index).filter(|n| n.limited)?;
    Some((Arc::clone(&named.shared_id), windows_of(clients.quotas(), index)))
}

/// Why a shared admission gave no lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Nothing has room now; look again after this long.
    Wait(Duration),
    /// Every candidate is disabled (by some replica).
    Disabled,
    /// No key was offered: every one is tried, cooling down here, disabled
    /// here, or held back by a limit only this replica counts.
    Nothing,
    /// Redis cannot be asked now: lease locally.
    Unavailable,
}

/// One replica's link to the quota it shares with others. Built by the
/// gateway from [`SharedQuotaConfig`]; [`run`](Self::run) keeps it going.
pub struct SharedQuota {
    config: SharedQuotaConfig,
    budgets: ArcSwapOption<SharedBudgets>,
    mode: AtomicU8,
    /// N: the replicas counted, whose ⌊limit / N⌋ this replica takes alone.
    replicas: AtomicU64,
    /// Engine clock (ns): the latest moment a heartbeat of this replica may
    /// have renewed its lease (after a reply; or a call's deadline when it
    /// timed out, since it may still run).
    renewed_at: AtomicU64,
    /// The N this replica's heartbeats record (what the others keep back).
    sent_replicas: AtomicU64,
    /// `offset_us` was measured.
    offset_known: std::sync::atomic::AtomicBool,
    degraded_since: AtomicU64,
    transitions: AtomicU64,
    /// Redis's clock minus the engine's, in microseconds, at the last contact.
    offset_us: AtomicI64,
    pending: Mutex<Pending>,
    /// Per pool, per key fingerprint: the engine instant before which Redis
    /// said the key has no room.
    hints: Mutex<Hints>,
    /// Every provider's [`Share`](proxypal_limiter::Share) with its longest
    /// request window, as of the last round: set at once when a call fails.
    shares: Mutex<Vec<(Arc<proxypal_limiter::Share>, Duration)>>,
    wake: tokio::sync::Notify,
    clock: SharedClock,
    gauges: Gauges,
}

/// `proxypal_shared_*` in `/metrics`.
#[derive(Debug, Default)]
struct Gauges {
    /// 1 while shared, 0 while degraded.
    shared: Gauge,
    replicas: Gauge,
    transitions: Counter,
    degraded_seconds: Gauge,
}

impl Gauges {
    fn register(registry: &mut Registry) -> Self {
        let g = Self::default();
        registry.register(
            "shared_up",
            "1 while quotas are shared through Redis, 0 while this replica serves its local share",
            g.shared.clone(),
        );
        registry.register("shared_replicas", "Replicas counted for the local share (N)", g.replicas.clone());
        registry.register(
            "shared_transitions",
            "Switches between shared and degraded mode",
            g.transitions.clone(),
        );
        registry.register(
            "shared_degraded_seconds",
            "How long this replica has been degraded (0 while shared)",
            g.degraded_seconds.clone(),
        );
        g
    }
}

impl std::fmt::Debug for SharedQuota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedQuota")
            .field("config", &self.config)
            .field("mode", &self.mode())
            .field("replicas", &self.replicas())
            .finish_non_exhaustive()
    }
}

/// A snapshot for `/stats` and `/health`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SharedReport {
    /// `shared` or `degraded`.
    pub mode: Mode,
    /// The replicas counted (N).
    pub replicas: u64,
    /// How long it has been degraded (zero when shared).
    pub degraded_for: Duration,
    /// Switches between the modes since start.
    pub transitions: u64,
    /// Where Redis is (without a password).
    pub redis: String,
}

impl SharedQuota {
    /// A link that starts degraded (nothing reached yet) on `clock`.
    pub(crate) fn new(config: SharedQuotaConfig, clock: SharedClock, registry: &mut Registry) -> Self {
        let now = clock.now();
        let replicas = config.replicas.max(1);
        Self {
            config,
            budgets: ArcSwapOption::empty(),
            mode: AtomicU8::new(DEGRADED),
            replicas: AtomicU64::new(replicas),
            // Never renewed: the cautious wait counts from start.
            renewed_at: AtomicU64::new(now),
            sent_replicas: AtomicU64::new(replicas),
            offset_known: std::sync::atomic::AtomicBool::new(false),
            degraded_since: AtomicU64::new(now),
            transitions: AtomicU64::new(0),
            offset_us: AtomicI64::new(0),
            pending: Mutex::new(Pending::default()),
            shares: Mutex::new(Vec::new()),
            hints: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
            clock,
            gauges: Gauges::register(registry),
        }
    }

    /// The mode now.
    pub fn mode(&self) -> Mode {
        if self.mode.load(Ordering::Acquire) == SHARED { Mode::Shared } else { Mode::Degraded }
    }

    /// The replicas counted (N).
    pub fn replicas(&self) -> u64 {
        self.replicas.load(Ordering::Relaxed)
    }

    /// The state for `/stats`, `/health` and metrics (updates the gauges).
    pub fn report(&self) -> SharedReport {
        let mode = self.mode();
        let degraded_for = match mode {
            Mode::Shared => Duration::ZERO,
            Mode::Degraded => Duration::from_nanos(
                self.clock.now().saturating_sub(self.degraded_since.load(Ordering::Relaxed)),
            ),
        };
        let transitions = self.transitions.load(Ordering::Relaxed);
        self.gauges.shared.set(i64::from(mode == Mode::Shared));
        self.gauges.replicas.set(i64::try_from(self.replicas()).unwrap_or(i64::MAX));
        self.gauges.degraded_seconds.set(i64::try_from(degraded_for.as_secs()).unwrap_or(i64::MAX));
        let counted = self.gauges.transitions.get();
        self.gauges.transitions.inc_by(transitions.saturating_sub(counted));
        SharedReport {
            mode,
            replicas: self.replicas(),
            degraded_for,
            transitions,
            redis: proxypal_shared::redacted(&self.config.redis_url),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SharedQuotaConfig {
        &self.config
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Plain data, every update a push or an insert: usable after a panic.
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The connection, when shared.
    fn budgets(&self) -> Option<Arc<SharedBudgets>> {
        if self.mode() == Mode::Shared { self.budgets.load_full() } else { None }
    }

    /// Asks Redis once for one of the candidate keys of `provider` (those
    /// this replica would try, in round-robin order, that only local limits
    /// do not hold back) and leases the one admitted.
    pub(crate) async fn admit(
        &self,
        provider: &Provider,
        index: usize,
        tried: &Tried,
        tokens: u64,
    ) -> Result<Lease, Refused> {
        let Some(budgets) = self.budgets() else { return Err(Refused::Unavailable) };
        let keys: &KeyPool<KeyResources> = &provider.keys;
        let now = self.clock.now();
        let mut offered: Vec<usize> = Vec::new();
        // Keys Redis said are full stay out until then (room only comes back
        // as entries expire, on Redis's schedule): at saturation, only the
        // head of the queue asks, and only when a key's hint runs out.
        let mut soonest_hint = u64::MAX;
        // The key set's identity, not the engine itself: nothing generic over
        // the clock may live across the `.await` (the future must be `Send`
        // for every lifetime, which `dyn QuotaClock` only is for `'static`).
        let mut generation: Option<usize> = None;
        {
            let hints = self.hints.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let pool_hints = hints.get(provider.name());
            let _ = keys.select_with(|c| {
                let quotas = &c.attachment.quotas;
                if offered.len() >= OFFERED || tried.contains(index, c.index) {
                    return false;
                }
                let hint = pool_hints
                    .and_then(|h| c.attachment.fingerprints.get(c.index).and_then(|id| h.get(id)))
                    .copied()
                    .unwrap_or(0);
                if hint > now {
                    soonest_hint = soonest_hint.min(hint);
                    return false;
                }
                if quotas.local_wait(c.index, tokens).is_some_and(|w| w.wait.is_zero()) {
                    offered.push(c.index);
                    generation.get_or_insert(Arc::as_ptr(quotas) as usize);
                }
                false
            });
        }
        let Some(generation) = generation else {
            return Err(if soonest_hint == u64::MAX {
                Refused::Nothing
            } else {
                Refused::Wait(Duration::from_nanos(soonest_hint - now))
            });
        };
        let mut refused = Refused::Disabled;
        for chunk in offered.chunks(CANDIDATES) {
            let picked = keys.with_current(|_, r| {
                (Arc::as_ptr(&r.quotas) as usize == generation).then(|| {
                    chunk.iter().map(|&i| (r.fingerprint(i), windows_of(&r.quotas, i))).collect::<Vec<_>>()
                })
            });
            let Some(picked) = picked else { return Err(Refused::Wait(Duration::ZERO)) };
            let views: Vec<Vec<Window<'_>>> =
                picked.iter().map(|(_, ws)| ws.iter().map(OwnedWindow::window).collect()).collect();
            let candidates: Vec<Candidate<'_>> =
                picked.iter().zip(&views).map(|((id, _), ws)| Candidate::new(id, ws)).collect();
            let admission = match budgets.admit_reserving(provider.name(), &candidates, tokens).await {
                Ok(a) => a,
                Err(SharedError::StaleCalendar { .. }) => {
                    // The clocks disagree about a reset, for a moment.
                    return Err(Refused::Wait(Duration::from_millis(5)));
                }
                Err(e) => {
                    self.lost(&e);
                    return Err(Refused::Unavailable);
                }
            };
            self.saw_epoch(provider.name(), admission.epoch);
            let Some(j) = admission.admitted else {
                if let Some(wait) = admission.wait {
                    // Each candidate's own wait is at least the shortest.
                    let until = self.clock.now().saturating_add(nanos(wait));
                    let mut hints = self.hints.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let pool = hints.entry(Arc::from(provider.name())).or_default();
                    for (id, _) in &picked {
                        pool.insert(Arc::clone(id), until);
                    }
                    refused = match refused {
                        Refused::Wait(w) => Refused::Wait(w.min(wait)),
                        _ => Refused::Wait(wait),
                    };
                }
                continue;
            };
            let Some(&chosen) = chunk.get(j) else { return Err(Refused::Nothing) };
            let mut found = None;
            let selected = keys.select_at(chosen, |c| {
                let quotas = &c.attachment.quotas;
                if Arc::as_ptr(quotas) as usize != generation {
                    return false; // a reload swapped the key set meanwhile
                }
                let Some(auth) = c.attachment.auth.get(c.index) else { return false };
                let Some(metrics) = c.attachment.metrics.get(c.index) else { return false };
                let Some(permit) = quotas.try_acquire_admitted(c.index, tokens) else { return false };
                found = Some((auth.clone(), Arc::clone(metrics), permit, Arc::clone(quotas)));
                true
            });
            // Admitted but not leasable here (a reload, a cooldown noticed since):
            // the admission is spent, look again at once.
            let (Some(selected), Some((auth, metrics, mut permit, engine))) = (selected, found) else {
                // Its token reservation and slot go back (nothing was sent).
                if let Some((id, windows)) = picked.get(j) {
                    let settled: Vec<OwnedWindow> =
                        windows.iter().filter(|w| w.kind != Kind::Requests).cloned().collect();
                    if !settled.is_empty() {
                        let pool = Arc::<str>::from(provider.name());
                        settle_later(
                            Arc::clone(&budgets),
                            pool,
                            Arc::clone(id),
                            settled,
                            admission.request,
                            tokens,
                            0,
                        );
                    }
                }
                return Err(Refused::Wait(Duration::ZERO));
            };
            // Token reservations and concurrency slots are settled in Redis
            // too, when the answer ends (off the request's path).
            if let Some((id, windows)) = picked.get(j) {
                let settled: Vec<OwnedWindow> =
                    windows.iter().filter(|w| w.kind != Kind::Requests).cloned().collect();
                if !settled.is_empty() {
                    let (budgets, pool, id) =
                        (Arc::clone(&budgets), Arc::<str>::from(provider.name()), Arc::clone(id));
                    let request = admission.request;
                    permit.on_settle(move |used| {
                        settle_later(budgets, pool, id, settled, request, tokens, used.unwrap_or(tokens));
                    });
                }
            }
            return Ok(Lease { selected, auth, provider: index, target: 0, metrics, permit, quotas: engine });
        }
        if let (Refused::Wait(w), true) = (refused, soonest_hint != u64::MAX) {
            refused = Refused::Wait(w.min(Duration::from_nanos(soonest_hint.saturating_sub(now))));
        }
        Err(refused)
    }

    /// Takes a request of named client `index` (of `clients`, reserving
    /// `tokens`) from its own quota: in Redis while shared, so one budget
    /// holds for every replica; from this replica's share of it (⌊limit / N⌋
    /// of each window, after the cautious start) while Redis is out of reach,
    /// written to Redis when it returns. Redis alone never fails a request:
    /// an error switches to the local share. Waits at most until `deadline`
    /// for a moment that passes (a state loss being replayed, a heartbeat
    /// round closing the share).
    pub(crate) async fn admit_client(
        &self,
        clients: &ClientSet,
        index: usize,
        tokens: u64,
        deadline: tokio::time::Instant,
    ) -> Result<ClientPermit, Refusal> {
        loop {
            if let Some(budgets) = self.budgets() {
                match self.admit_client_shared(&budgets, clients, index, tokens).await {
                    ClientAdmission::Admitted(permit) => return Ok(permit),
                    ClientAdmission::Full(wait) => return Err(clients.over_quota(index, wait)),
                    ClientAdmission::Again(wait) => {
                        if tokio::time::Instant::now() + wait > deadline {
                            return Err(clients.over_quota(index, wait));
                        }
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    ClientAdmission::Unavailable => {} // the local share decides
                }
            }
            let wait = match clients.take(index, tokens) {
                Ok(permit) => {
                    self.client_sent_locally(clients, index, &permit);
                    return Ok(permit);
                }
                Err(wait) => wait,
            };
            // Closed, not fenced: a heartbeat round is under way (or Redis is
            // back since the mode was read); open again in a moment.
            let closed = wait.cause == proxypal_limiter::Cause::Share
                && clients.quotas().share().get().1 == u64::MAX
                && !self.fenced();
            if !closed {
                return Err(clients.over_quota(index, wait.wait));
            }
            let poll = proxypal_limiter::POLL;
            if tokio::time::Instant::now() + poll > deadline {
                return Err(clients.over_quota(index, self.config.heartbeat));
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// One admission of client `index` in Redis, charged to the local engine
    /// too when admitted.
    async fn admit_client_shared(
        &self,
        budgets: &Arc<SharedBudgets>,
        clients: &ClientSet,
        index: usize,
        tokens: u64,
    ) -> ClientAdmission {
        // Owned before the call: nothing generic over the clock may live
        // across the `.await` (see `admit`).
        let Some((id, windows)) = client_budget(clients, index) else {
            return ClientAdmission::Admitted(ClientPermit(None));
        };
        let views: Vec<Window<'_>> = windows.iter().map(OwnedWindow::window).collect();
        let candidates = [Candidate::new(&id, &views)];
        let admission = match budgets.admit_reserving(CLIENTS, &candidates, tokens).await {
            Ok(a) => a,
            // The clocks disagree about a reset, for a moment.
            Err(SharedError::StaleCalendar { .. }) => {
                return ClientAdmission::Again(Duration::from_millis(5));
            }
            Err(e) => {
                self.lost(&e);
                return ClientAdmission::Unavailable;
            }
        };
        self.saw_epoch(CLIENTS, admission.epoch);
        if admission.admitted.is_none() {
            let wait = admission.wait.unwrap_or(Duration::from_secs(1));
            return if admission.recovering {
                ClientAdmission::Again(wait.max(Duration::from_millis(1))) // at most 25 ms
            } else {
                ClientAdmission::Full(wait)
            };
        }
        // Token reservations and concurrency slots settle in Redis too.
        let settled: Vec<OwnedWindow> = windows.into_iter().filter(|w| w.kind != Kind::Requests).collect();
        let pool = Arc::<str>::from(CLIENTS);
        match clients.take_admitted(index, tokens) {
            Ok(mut permit) => {
                if let (Some(p), false) = (permit.0.as_mut(), settled.is_empty()) {
                    let (budgets, request) = (Arc::clone(budgets), admission.request);
                    p.on_settle(move |used| {
                        settle_later(budgets, pool, id, settled, request, tokens, used.unwrap_or(tokens));
                    });
                }
                ClientAdmission::Admitted(permit)
            }
            Err(local) => {
                // Only this replica's count says no (its requests in flight):
                // what Redis reserved goes back, the request stays counted.
                if !settled.is_empty() {
                    settle_later(Arc::clone(budgets), pool, id, settled, admission.request, tokens, 0);
                }
                ClientAdmission::Full(local.wait)
            }
        }
    }

    /// Records a client's request taken from the local share, to be written
    /// to Redis when it returns.
    fn client_sent_locally(&self, clients: &ClientSet, index: usize, permit: &ClientPermit) {
        let Some(p) = &permit.0 else { return };
        let Some((id, windows)) = client_budget(clients, index) else { return };
        let grant =
            Grant { pool: Arc::from(CLIENTS), id, windows, at: self.clock.now(), tokens: p.reserved() };
        self.lock().grants.push(grant);
    }

    /// Past `max_degraded` without Redis: the local shares stay closed.
    fn fenced(&self) -> bool {
        self.mode() == Mode::Degraded
            && self.clock.now()
                >= self.degraded_since.load(Ordering::Relaxed).saturating_add(nanos(self.config.max_degraded))
    }

    /// Records a send made from the local share (degraded), to be written to
    /// Redis when it returns.
    pub(crate) fn sent_locally(&self, provider: &Provider, lease: &Lease) {
        let index = lease.selected.index();
        let id = provider.keys.with_current(|_, r| r.fingerprint(index));
        let grant = Grant {
            pool: Arc::from(provider.name()),
            id,
            windows: windows_of(&lease.quotas, index),
            at: self.clock.now(),
            tokens: lease.permit.reserved(),
        };
        self.lock().grants.push(grant);
    }

    /// What an attempt did to a key's health, for every replica: a cooldown
    /// or a disable the pool just applied.
    pub(crate) fn judged(&self, provider: &Provider, lease: &Lease) {
        let pool = Arc::<str>::from(provider.name());
        let id = || provider.keys.with_current(|_, r| r.fingerprint(lease.selected.index()));
        let change = match provider.keys.status_of(&lease.selected) {
            KeyStatus::CoolingDown { remaining, .. } => Health::Cool { pool, id: id(), for_: remaining },
            KeyStatus::Disabled => Health::Disable { pool, id: id() },
            _ => return,
        };
        self.lock().health.push(change);
        self.wake.notify_one();
    }

    /// What an answer taught the leased key's budget (`x-ratelimit-*`, a
    /// spent day): lower limits and announced blocks, for every replica. A
    /// block rests every key of the budget.
    pub(crate) fn learned(&self, provider: &Provider, lease: &Lease) {
        let index = lease.selected.index();
        let pool = Arc::<str>::from(provider.name());
        let mut changes = Vec::new();
        let mut blocked = false;
        provider.keys.with_current(|keys, r| {
            if !Arc::ptr_eq(&r.quotas, &lease.quotas) {
                return; // a reload since: the next answer teaches again
            }
            let id = r.fingerprint(index);
            let reports = r.quotas.report(index);
            let mut windows = Vec::new();
            r.quotas.windows(index, |w| windows.push(OwnedWindow::of(&w)));
            let reports = reports.iter().filter(|l| l.kind != proxypal_limiter::LimitKind::Concurrent);
            for (w, report) in windows.into_iter().zip(reports) {
                if report.source == proxypal_limiter::Source::Learned {
                    let limit = report.limit;
                    changes.push(Health::Learn {
                        pool: Arc::clone(&pool),
                        id: Arc::clone(&id),
                        window: w,
                        limit,
                    });
                }
            }
            let until = r.quotas.blocked_for(index);
            if !until.is_zero() {
                blocked = true;
                let account = r.quotas.account(index);
                for i in (0..keys.len())
                    .filter(|&i| i == index || (account.is_some() && r.quotas.account(i) == account))
                {
                    changes.push(Health::Cool { pool: Arc::clone(&pool), id: r.fingerprint(i), for_: until });
                }
            }
        });
        if changes.is_empty() {
            return;
        }
        let mut pending = self.lock();
        changes.retain(|change| match change {
            Health::Learn { pool, id, window, limit } => {
                let owner = window.budget.as_deref().unwrap_or(id);
                let key = format!("{pool}/{owner}/{}", window.name);
                pending.learned.insert(key, *limit) != Some(*limit)
            }
            _ => true,
        });
        pending.health.extend(changes);
        drop(pending);
        // A block is news for the others now; a lower limit can wait a round.
        if blocked {
            self.wake.notify_one();
        }
    }

    /// An operator re-enabled key `index` of `provider`: for every replica.
    pub fn enabled(&self, provider: &Provider, index: usize) {
        let id = provider.keys.with_current(|_, r| r.fingerprint(index));
        // A cooldown Redis reported is gone: offer the key again at once.
        if let Some(pool) =
            self.hints.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_mut(provider.name())
        {
            pool.remove(&id);
        }
        self.lock().health.push(Health::Enable { pool: Arc::from(provider.name()), id });
        self.wake.notify_one();
    }

    /// A call failed: degraded from now on (until a heartbeat gets through).
    fn lost(&self, error: &SharedError) {
        if self.mode() == Mode::Shared {
            // The local shares first, so no request leases locally from a
            // whole budget in between.
            self.degraded_since.store(self.clock.now(), Ordering::Relaxed);
            self.set_shares(false);
        }
        if self.mode.swap(DEGRADED, Ordering::AcqRel) == SHARED {
            let now = self.clock.now();
            self.transitions.fetch_add(1, Ordering::Relaxed);
            self.lock().warned_at = now;
            tracing::error!(
                redis = %proxypal_shared::redacted(&self.config.redis_url),
                error = %error,
                replicas = self.replicas(),
                "shared quota: Redis is out of reach; serving this replica's share of every window \
                 (1/{} of it) once the others have set it aside",
                self.replicas()
            );
        }
        self.wake.notify_one();
    }

    fn saw_epoch(&self, pool: &str, epoch: u64) {
        let known = self.lock().epochs.get(pool).copied();
        if known != Some(epoch) {
            // The state was lost: what was full may have room.
            self.hints.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(pool);
            self.wake.notify_one();
        }
    }

    /// Notes every provider's share and longest window, and sets the shares
    /// for the mode now.
    /// The named clients' engine is one more: its share is carried across
    /// reloads (see [`Share`](proxypal_limiter::Share)), so this generation's
    /// is every generation's.
    fn apply_shares(&self, providers: &[Arc<Provider>], clients: &ClientSet) {
        let mut shares: Vec<_> = providers
            .iter()
            .map(|p| (p.keys.with_current(|_, r| Arc::clone(r.quotas.share())), longest_span(&p.keys)))
            .collect();
        shares.push((Arc::clone(clients.quotas().share()), longest_of(clients.quotas())));
        *self.shares.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = shares;
        self.set_shares(self.mode() == Mode::Shared);
    }

    /// Shared: nothing through the local path (every lease goes through
    /// Redis; admissions it makes charge the engine unchecked). Degraded:
    /// ⌊limit / N⌋ of every window from one lease and one window after the
    /// latest renewal, and nothing past `max_degraded`.
    fn set_shares(&self, shared: bool) {
        let n = self.replicas();
        let renewed = self.renewed_at.load(Ordering::Relaxed);
        let since = self.degraded_since.load(Ordering::Relaxed);
        let fenced = self.clock.now() >= since.saturating_add(nanos(self.config.max_degraded));
        for (share, longest) in self.shares.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter() {
            if shared || fenced {
                share.set(n, u64::MAX);
            } else {
                share.set(n, renewed.saturating_add(nanos(self.config.lease + *longest)));
            }
        }
    }

    /// The first round, before serving: connects, renews, replays, and sets
    /// every share for the mode it ends in. `true` when shared.
    pub async fn first_contact(&self, gateway: &crate::Gateway) -> bool {
        let settings = gateway.settings();
        let (providers, clients) = (&settings.providers[..], &settings.tokens);
        self.apply_shares(providers, clients);
        self.tick(providers, clients).await;
        self.apply_shares(providers, clients);
        self.mode() == Mode::Shared
    }

    /// How long a lapsed replica's share stays kept back.
    fn reservation(&self, longest: Duration) -> Duration {
        self.config.lease + self.config.max_degraded + longest
    }

    /// Keeps the link going until `stop` resolves: connects (and reconnects),
    /// renews this replica's lease in every provider's pool, writes health
    /// changes, replays after a state loss or a degraded spell, switches
    /// modes and logs each switch. Leaves every pool on the way out.
    pub async fn run(
        self: Arc<Self>,
        gateway: std::sync::Weak<crate::Gateway>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stop);
        loop {
            let Some(gw) = gateway.upgrade() else { return };
            let settings = gw.settings();
            drop(gw);
            let (providers, clients) = (&settings.providers[..], &settings.tokens);
            self.tick(providers, clients).await;
            self.apply_shares(providers, clients);
            tokio::select! {
                () = &mut stop => break,
                () = tokio::time::sleep(self.config.heartbeat) => {}
                () = self.wake.notified() => {}
            }
        }
        if let (Some(budgets), Some(gw)) = (self.budgets.load_full(), gateway.upgrade()) {
            for p in gw.providers() {
                let _ = budgets.leave(p.name()).await;
            }
            let _ = budgets.leave(CLIENTS).await;
        }
    }

    /// Connects once (for `require_on_start`).
    ///
    /// # Errors
    /// Redis did not answer.
    pub async fn connect(&self) -> Result<(), SharedError> {
        if self.budgets.load().is_some() {
            return Ok(());
        }
        let mut config = proxypal_shared::SharedConfig::new(self.config.redis_url.clone());
        config.key_prefix = self.config.key_prefix.clone();
        config.timeout = self.config.timeout;
        config.ca_pem.clone_from(&self.config.ca_pem);
        let budgets = SharedBudgets::connect(config).await?;
        self.budgets.store(Some(Arc::new(budgets)));
        Ok(())
    }

    async fn tick(&self, providers: &[Arc<Provider>], clients: &ClientSet) {
        if let Err(e) = self.connect().await {
            self.still_degraded(&e);
            return;
        }
        let Some(budgets) = self.budgets.load_full() else { return };
        match self.beat(&budgets, providers, clients).await {
            Ok(()) => {
                if self.mode.swap(SHARED, Ordering::AcqRel) != SHARED {
                    let since = self.degraded_since.load(Ordering::Relaxed);
                    // Said only after a degraded spell that was announced (not
                    // at a start that reached Redis at once).
                    let announced = self.lock().warned_at != 0;
                    self.transitions.fetch_add(1, Ordering::Relaxed);
                    if announced {
                        tracing::warn!(
                            replicas = self.replicas(),
                            degraded_for = ?Duration::from_nanos(self.clock.now().saturating_sub(since)),
                            "shared quota: Redis answers again; quotas are shared again"
                        );
                    }
                }
            }
            Err(e) => {
                if self.mode() == Mode::Shared {
                    self.lost(&e);
                } else {
                    self.still_degraded(&e);
                }
            }
        }
    }

    fn still_degraded(&self, error: &SharedError) {
        let now = self.clock.now();
        let mut pending = self.lock();
        if pending.warned_at == 0 || now.saturating_sub(pending.warned_at) >= nanos(Duration::from_secs(30)) {
            pending.warned_at = now;
            drop(pending);
            tracing::warn!(
                redis = %proxypal_shared::redacted(&self.config.redis_url),
                error = %error,
                replicas = self.replicas(),
                degraded_for = ?Duration::from_nanos(now.saturating_sub(self.degraded_since.load(Ordering::Relaxed))),
                "shared quota: still degraded, serving this replica's share"
            );
        }
    }

    /// One heartbeat round: what a degraded spell owes Redis, every pool's
    /// lease, replays after a state loss, health both ways.
    async fn beat(
        &self,
        budgets: &SharedBudgets,
        providers: &[Arc<Provider>],
        clients: &ClientSet,
    ) -> Result<(), SharedError> {
        let degraded = self.mode() != Mode::Shared;
        if degraded {
            // Owed first: writing them does not make this replica live.
            self.replay_grants(budgets).await?;
            self.write_health(budgets).await?;
            // From its first heartbeat on the others count it as live and keep
            // nothing back for it: no local send until the round is through
            // (or, if it fails, until a cautious start after it).
            self.set_shares(true);
        }
        let longest = providers.iter().map(|p| longest_span(&p.keys)).max().unwrap_or_default();
        budgets.set_recovery_hold(longest);
        // The N this round's heartbeats record; the local share uses at least
        // it, so it never takes more than the others keep back.
        let sent = self.sent_replicas.load(Ordering::Relaxed).max(1);
        budgets.set_replicas(sent);
        let mut counted = self.config.replicas.max(1);
        let mut live = 1;
        let slack = self.config.timeout + Duration::from_millis(200);
        // Every provider's pool, and the named clients' when one has a quota.
        let clients = clients.any_limited().then_some(clients);
        let pools = providers.iter().map(Pool::Keys).chain(clients.map(Pool::Clients));
        for pool in pools {
            let attempt = self.clock.now();
            // Past this (Redis's clock), the script refuses to renew: a call
            // stuck in a frozen Redis cannot renew the lease later.
            let deadline = if self.offset_known.load(Ordering::Relaxed) {
                let local_us = i64::try_from(attempt / 1_000).unwrap_or(i64::MAX);
                let redis_us = local_us.saturating_add(self.offset_us.load(Ordering::Relaxed));
                u64::try_from(redis_us).unwrap_or(0).saturating_add(micros(slack))
            } else {
                0
            };
            let beat = budgets
                .heartbeat_until(pool.name(), self.config.lease, self.reservation(longest), deadline)
                .await;
            let m = match beat {
                Ok(m) => m,
                Err(e) => {
                    if matches!(e, SharedError::Timeout(_)) {
                        // It may yet run, until the deadline: a renewal that late.
                        let latest = attempt.saturating_add(nanos(slack));
                        self.renewed_at.fetch_max(latest, Ordering::Relaxed);
                    }
                    return Err(e);
                }
            };
            self.renewed_at.fetch_max(self.clock.now(), Ordering::Relaxed);
            counted = counted.max(m.live + m.suspects);
            live = live.max(m.live);
            self.offset_us.store(
                i64::try_from(m.now_us).unwrap_or(i64::MAX) - i64::try_from(attempt / 1_000).unwrap_or(0),
                Ordering::Relaxed,
            );
            self.offset_known.store(true, Ordering::Relaxed);
            let known = self.lock().epochs.get(pool.name()).copied();
            if known != Some(m.epoch) || !m.replayed {
                match pool {
                    Pool::Keys(p) => self.replay_all(budgets, p, m.epoch).await?,
                    Pool::Clients(c) => self.replay_clients(budgets, c, m.epoch).await?,
                }
            }
        }
        // Shares by the larger of what was recorded and what is counted now;
        // the next round records the count.
        self.replicas.store(counted.max(sent), Ordering::Relaxed);
        self.sent_replicas.store(counted, Ordering::Relaxed);
        // Replicas alive now replay after a state loss; vanished ones cannot.
        budgets.set_expected_replays(live);
        self.replay_grants(budgets).await?;
        self.write_health(budgets).await?;
        // After this replica's own changes are written, so an operator's
        // reset is not undone by the state it replaces.
        for p in providers {
            let health = budgets.health(p.name()).await?;
            self.mirror(p, &health);
        }
        self.renewed_at.fetch_max(self.clock.now(), Ordering::Relaxed);
        Ok(())
    }

    /// After a state loss (or on first contact): every send the local engine
    /// still counts, made before the epoch began, goes into the new state.
    async fn replay_all(
        &self,
        budgets: &SharedBudgets,
        provider: &Provider,
        epoch: u64,
    ) -> Result<(), SharedError> {
        let epoch_local_ns = self.epoch_local_ns(epoch);
        let logs = provider.keys.with_current(|keys, r| {
            self.logs_before(&r.quotas, (0..keys.len()).map(|i| (i, r.fingerprint(i))), epoch)
        });
        for (id, w, entries) in &logs {
            budgets.replay_entries(provider.name(), id, w.window(), entries).await?;
        }
        // Key health the state lost: what this replica knows goes back in.
        let pool = Arc::<str>::from(provider.name());
        let health: Vec<Health> = provider.keys.with_current(|_, r| {
            provider
                .keys
                .snapshot()
                .into_iter()
                .filter_map(|k| match k.status {
                    KeyStatus::Disabled => {
                        Some(Health::Disable { pool: Arc::clone(&pool), id: r.fingerprint(k.index) })
                    }
                    KeyStatus::CoolingDown { remaining, .. } => Some(Health::Cool {
                        pool: Arc::clone(&pool),
                        id: r.fingerprint(k.index),
                        for_: remaining,
                    }),
                    _ => None,
                })
                .collect()
        });
        {
            let mut pending = self.lock();
            pending.health.extend(health);
            // Learned limits went with the state: queue them again as answers repeat them.
            let prefix = format!("{pool}/");
            pending.learned.retain(|k, _| !k.starts_with(&prefix));
        }
        // Written before this replica counts as replayed: no admission in the
        // new epoch can pick a key it knows is disabled.
        self.write_health(budgets).await?;
        // The sends of a degraded spell are in the engine too: replayed now.
        // (those before it are in the engine's entries just replayed; those
        // after it are still owed).
        self.lock().grants.retain(|g| &*g.pool != provider.name() || g.at >= epoch_local_ns);
        budgets.replayed(provider.name(), epoch).await?;
        self.lock().epochs.insert(Arc::from(provider.name()), epoch);
        tracing::info!(
            pool = provider.name(),
            windows = logs.len(),
            "shared quota: replayed this replica's sends"
        );
        Ok(())
    }

    /// [`replay_all`](Self::replay_all) for the named clients' budgets.
    async fn replay_clients(
        &self,
        budgets: &SharedBudgets,
        clients: &ClientSet,
        epoch: u64,
    ) -> Result<(), SharedError> {
        let epoch_local_ns = self.epoch_local_ns(epoch);
        let ids = clients.all().iter().enumerate().filter(|(_, n)| n.limited);
        let logs = self.logs_before(clients.quotas(), ids.map(|(i, n)| (i, Arc::clone(&n.shared_id))), epoch);
        for (id, w, entries) in &logs {
            budgets.replay_entries(CLIENTS, id, w.window(), entries).await?;
        }
        self.lock().grants.retain(|g| &*g.pool != CLIENTS || g.at >= epoch_local_ns);
        budgets.replayed(CLIENTS, epoch).await?;
        self.lock().epochs.insert(Arc::from(CLIENTS), epoch);
        tracing::info!(windows = logs.len(), "shared quota: replayed this replica's client admissions");
        Ok(())
    }

    /// The epoch's start on the engine clock (nanoseconds).
    fn epoch_local_ns(&self, epoch: u64) -> u64 {
        let offset = self.offset_us.load(Ordering::Relaxed);
        u64::try_from((i64::try_from(epoch).unwrap_or(i64::MAX) - offset).max(0))
            .unwrap_or(0)
            .saturating_mul(1_000)
    }

    /// What `engine` counts for the budgets `ids` (position, Redis id) from
    /// before `epoch` began (a calendar window's count, if the state was lost
    /// within it), on Redis's clock: an account's windows once.
    fn logs_before(
        &self,
        engine: &crate::Engine,
        ids: impl Iterator<Item = (usize, Arc<str>)>,
        epoch: u64,
    ) -> Vec<Log> {
        let offset = self.offset_us.load(Ordering::Relaxed);
        let epoch_local_ns = self.epoch_local_ns(epoch);
        let mut logs: Vec<Log> = Vec::new();
        let mut done = std::collections::HashSet::new();
        for (i, id) in ids {
            engine.entries(i, |view, entries| {
                let w = OwnedWindow::of(&view);
                let owner = w.budget.clone().unwrap_or_else(|| id.to_string());
                if !done.insert((owner, w.name.clone())) {
                    return; // an account's window, replayed through its first key
                }
                let times: Vec<(u64, u64)> = entries
                    .iter()
                    .filter(|(at, _)| match w.end_us {
                        // A day's count, if the state was lost within that day.
                        Some(end) => epoch > end.saturating_sub(micros(w.span)),
                        None => *at < epoch_local_ns,
                    })
                    .map(|&(at, amount)| {
                        let us = i64::try_from(at / 1_000).unwrap_or(i64::MAX).saturating_add(offset);
                        (u64::try_from(us).unwrap_or(0), amount)
                    })
                    .collect();
                if !times.is_empty() {
                    logs.push((Arc::clone(&id), w, times));
                }
            });
        }
        logs
    }

    async fn replay_grants(&self, budgets: &SharedBudgets) -> Result<(), SharedError> {
        let grants = std::mem::take(&mut self.lock().grants);
        if grants.is_empty() {
            return Ok(());
        }
        let offset = self.offset_us.load(Ordering::Relaxed);
        let result = async {
            for g in &grants {
                let us = i64::try_from(g.at / 1_000).unwrap_or(i64::MAX).saturating_add(offset);
                let at = u64::try_from(us).unwrap_or(0);
                for w in &g.windows {
                    let amount = match w.kind {
                        Kind::Requests => 1,
                        Kind::Tokens => g.tokens,
                        _ => continue, // a slot in flight is not history
                    };
                    budgets.replay_entries(&g.pool, &g.id, w.window(), &[(at, amount)]).await?;
                }
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            // Not written (or not all): keep them for the next try. A window
            // written twice counts twice: the safe side.
            let mut pending = self.lock();
            let newer = std::mem::take(&mut pending.grants);
            pending.grants = grants;
            pending.grants.extend(newer);
        }
        result
    }

    async fn write_health(&self, budgets: &SharedBudgets) -> Result<(), SharedError> {
        let changes = std::mem::take(&mut self.lock().health);
        for (i, change) in changes.iter().enumerate() {
            let written = match change {
                Health::Cool { pool, id, for_ } => budgets.cool_down(pool, id, *for_).await,
                Health::Disable { pool, id } => budgets.disable(pool, id).await,
                Health::Enable { pool, id } => budgets.enable(pool, id).await,
                Health::Learn { pool, id, window, limit } => {
                    budgets.learn(pool, id, &window.window(), *limit).await
                }
            };
            if let Err(e) = written {
                let mut pending = self.lock();
                let newer = std::mem::take(&mut pending.health);
                pending.health = changes[i..].to_vec();
                pending.health.extend(newer);
                return Err(e);
            }
        }
        Ok(())
    }
}

impl SharedQuota {
    /// Applies the health every replica sees to this replica's pool, so it
    /// keeps skipping those keys when Redis goes away. Never shortens a
    /// cooldown, never re-enables a key, leaves alone a key whose reset is
    /// still to be written.
    fn mirror(&self, provider: &Provider, health: &proxypal_shared::Health) {
        let (resetting, disabling): (Vec<Arc<str>>, Vec<Arc<str>>) = {
            let pending = self.lock();
            let of = |f: &dyn Fn(&Health) -> Option<Arc<str>>| pending.health.iter().filter_map(f).collect();
            (
                of(&|h| match h {
                    Health::Enable { pool, id } if &**pool == provider.name() => Some(Arc::clone(id)),
                    _ => None,
                }),
                of(&|h| match h {
                    Health::Disable { pool, id } if &**pool == provider.name() => Some(Arc::clone(id)),
                    _ => None,
                }),
            )
        };
        let mut by_id: HashMap<Arc<str>, usize> =
            provider.keys.with_current(|keys, r| (0..keys.len()).map(|i| (r.fingerprint(i), i)).collect());
        // A key disabled here that Redis no longer disables was reset by an
        // operator (through any replica): usable again, unless this replica's
        // own disable is still to be written.
        let snapshot = provider.keys.snapshot();
        for k in snapshot.iter().filter(|k| k.status == KeyStatus::Disabled) {
            let Some(id) = by_id.iter().find(|(_, i)| **i == k.index).map(|(id, _)| Arc::clone(id)) else {
                continue;
            };
            if !health.disabled.iter().any(|d| d.as_str() == &*id) && !disabling.contains(&id) {
                provider.keys.enable(k.index);
            }
        }
        by_id.retain(|id, _| !resetting.contains(id));
        mirror(provider, health, &by_id);
    }
}

/// [`SharedQuota::mirror`] over the keys in `by_id`.
fn mirror(provider: &Provider, health: &proxypal_shared::Health, by_id: &HashMap<Arc<str>, usize>) {
    for id in &health.disabled {
        if let Some(&i) = by_id.get(id.as_str()) {
            provider.keys.restore(i, KeyStatus::Disabled);
        }
    }
    for (id, until) in &health.cooling {
        let remaining = Duration::from_micros(until.saturating_sub(health.now_us));
        if let (Some(&i), false) = (by_id.get(id.as_str()), remaining.is_zero()) {
            let reason = proxypal_keypool::CooldownReason::RateLimited;
            provider.keys.restore(i, KeyStatus::CoolingDown { remaining, reason });
        }
    }
}

/// Settles admission `request` in Redis off the request's path: its token
/// reservation becomes `used`, its concurrency slot is freed. Failing, the
/// reservation stays counted as used and the slot expires: the safe side.
fn settle_later(
    budgets: Arc<SharedBudgets>,
    pool: Arc<str>,
    id: Arc<str>,
    windows: Vec<OwnedWindow>,
    request: u64,
    reserved: u64,
    used: u64,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    runtime.spawn(async move {
        let views: Vec<Window<'_>> = windows.iter().map(OwnedWindow::window).collect();
        if let Err(e) = budgets.settle(&pool, &id, &views, request, reserved, used).await {
            tracing::debug!(error = %e, "shared quota: a settlement did not reach Redis");
        }
    });
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Key `index`'s windows (requests and tokens) and concurrency caps as
/// Redis counts them.
fn windows_of(engine: &crate::Engine, index: usize) -> Vec<OwnedWindow> {
    let mut out = Vec::new();
    engine.windows(index, |w| out.push(OwnedWindow::of(&w)));
    engine.concurrency(index, |account, max| out.push(OwnedWindow::concurrency(account, max)));
    out
}

/// The longest window (requests or tokens) of a pool's keys that can bind:
/// one whose limit the shorter windows of the same key and unit cannot let
/// the shared log reach (a minute of a million behind 60 per 6 s never fills) is left out,
/// so it does not stretch the cautious start.
fn longest_span(keys: &KeyPool<KeyResources>) -> Duration {
    keys.with_current(|_, r| longest_of(&r.quotas))
}

/// [`longest_span`] of one engine's budgets (a key set's, or the named
/// clients').
fn longest_of(engine: &crate::Engine) -> Duration {
    let mut longest = Duration::ZERO;
    for i in 0..engine.len() {
        for unit in [proxypal_limiter::Unit::Requests, proxypal_limiter::Unit::Tokens] {
            let mut windows: Vec<(Duration, u64)> = Vec::new();
            engine.windows(i, |w| {
                if w.unit == unit {
                    windows.push((w.span, w.limit));
                }
            });
            for &(span, limit) in &windows {
                if binds(span, limit, &windows) {
                    longest = longest.max(span);
                }
            }
        }
    }
    longest
}

/// Whether a window of `span` and `limit` can be reached, given the key's
/// other `windows`: a shorter one of limit `l` and span `s` lets at most
/// `l · (⌈span / s⌉ + 1)` through in `span`.
fn binds(span: Duration, limit: u64, windows: &[(Duration, u64)]) -> bool {
    windows.iter().filter(|(s, _)| *s < span && !s.is_zero()).all(|&(s, l)| {
        let spans = span.as_nanos().div_ceil(s.as_nanos()) + 1;
        u128::from(l).saturating_mul(spans) >= u128::from(limit)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_names_become_key_safe_ids_and_urls_hide_passwords() {
        let id = account_id("team a/{x}");
        assert!(id.starts_with("acct:") && id.len() == 21, "{id}");
        assert!(id[5..].chars().all(|c| c.is_ascii_hexdigit()));
        let config = SharedQuotaConfig::new("redis://:hunter2@10.0.0.5:6379/0");
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn client_budgets_have_key_safe_ids_in_a_pool_no_provider_can_be_named() {
        let id = client_id("Alice {ops}/team");
        assert!(id.starts_with("client:") && id.len() == 23, "{id}");
        assert!(id[7..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(id, client_id("alice {ops}/team"));
        // Providers are letters, digits, '-', '_' and '.'.
        assert!(CLIENTS.contains(':'));
    }

    /// Degraded: the named clients' engine serves ⌊limit / N⌋ of each window
    /// after the cautious start, like a key's, and keeps it across a reload.
    #[test]
    fn without_redis_a_clients_quota_is_cut_to_this_replicas_share() {
        use crate::admission::Client;
        use crate::clients::{ClientConfig, ClientSet};
        let manual = proxypal_limiter::ManualClock::new(1_000_000_000_000);
        let clock: SharedClock = Arc::new(manual.clone());
        let limits = proxypal_limiter::Limits { requests_per_minute: Some(4), ..Default::default() };
        let alice =
            [ClientConfig::new("alice", proxypal_keypool::Secret::new("pp-alice")).with_limits(limits)];
        let clients = ClientSet::new(&[], &alice, Arc::clone(&clock), None).unwrap();
        let mut config = SharedQuotaConfig::new("redis://127.0.0.1:1/0");
        config.replicas = 2;
        let link = SharedQuota::new(config, Arc::clone(&clock), &mut Registry::default());
        link.apply_shares(&[], &clients);
        let a = Client::Named(0);
        let refused = clients.admit(a, 0).expect_err("nothing before the cautious start");
        let Refusal::Quota { wait, .. } = refused else { panic!("{refused:?}") };
        assert_eq!(wait, Duration::from_millis(3_000 + 60_500), "a lease and alice's minute (with margin)");
        manual.advance(wait);
        // A reload builds a new set; the share carries over.
        let clients = ClientSet::new(&[], &alice, clock, Some(&clients)).unwrap();
        assert!(clients.admit(a, 0).is_ok() && clients.admit(a, 0).is_ok(), "two of four: half");
        assert!(clients.admit(a, 0).is_err(), "not a third");
        // Shared again: the local share closes (Redis decides; its admissions
        // charge the engine unchecked).
        link.set_shares(true);
        assert!(clients.take(0, 0).is_err());
        manual.advance(Duration::from_secs(61));
        assert!(clients.take_admitted(0, 0).is_ok());
    }

    #[test]
    fn a_window_the_shorter_ones_never_let_fill_does_not_stretch_the_cautious_start() {
        let six = (Duration::from_secs(6), 60);
        let minute = (Duration::from_secs(60), 1_000_000);
        assert!(!binds(minute.0, minute.1, &[six, minute]));
        assert!(binds(six.0, six.1, &[six, minute]));
        // 60 per 6 s can put 660 in a minute: a minute of 600 binds.
        assert!(binds(minute.0, 600, &[six, (minute.0, 600)]));
    }
}
