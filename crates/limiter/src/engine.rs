//! The quota engine: budgets of windows, shared by the keys of an account,
//! checked and charged together.

use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use governor::nanos::Nanos;

use crate::clock::{QuotaClock, SystemClock, nanos};
use crate::limits::{BudgetSpec, Unit};
use crate::window::{Entry, Source, WindowState};
use crate::{GovernorLimiter, RateLimit};

/// The longest block an upstream's announcement may impose (a day window's
/// reset with room to spare; anything longer is a bad header).
pub const MAX_ANNOUNCED_RESET: Duration = Duration::from_secs(48 * 3600);

/// How often a request waiting on something only a finishing request can
/// free (a concurrency cap, token reservations) looks again.
pub const POLL: Duration = Duration::from_millis(20);

/// The engine's time, for governor (the shaper).
#[derive(Debug, Clone)]
struct ShaperClock<C>(C);

impl<C: QuotaClock + Clone> governor::clock::Clock for ShaperClock<C> {
    type Instant = Nanos;
    fn now(&self) -> Nanos {
        Nanos::from(self.0.now())
    }
}

/// One budget: windows, an optional concurrency cap and an optional GCRA
/// shaper, behind one lock so that a grant checks and charges all of them at
/// once.
struct Budget<C: QuotaClock + Clone> {
    /// The account's name; `None` for a key's own budget.
    account: Option<Arc<str>>,
    spec: BudgetSpec,
    clock: C,
    state: Mutex<State>,
    /// Requests in flight and tokens reserved: shared with the budget this one
    /// replaced on a reload, so permits taken before the reload settle here.
    running: Arc<Running>,
    shaper: Option<GovernorLimiter<ShaperClock<C>>>,
    /// Grants must come back (concurrency or token windows).
    needs_release: bool,
    /// The smallest token window's limit (`None`: no token window): the most
    /// one request may reserve here.
    token_cap: Option<u64>,
    /// The budget that replaced this one on a reload. Set while this one's
    /// lock is held, right after its state was copied: from then on grants
    /// and settlements that still reach this budget go to the successor, so
    /// nothing counted during a reload is lost.
    successor: std::sync::OnceLock<Arc<Budget<C>>>,
}

#[derive(Debug)]
struct State {
    windows: Box<[WindowState]>,
    /// No request before this instant (an upstream said so).
    blocked_until: u64,
}

/// What running requests hold. Changed under the budget's lock when taken;
/// given back without it (a decrement can only make room).
#[derive(Debug, Default)]
struct Running {
    in_flight: AtomicU32,
    /// Tokens reserved by requests still running.
    reserved: AtomicU64,
}

impl<C: QuotaClock + Clone> Budget<C> {
    /// A budget for `spec` that takes over `old` (copying its state; `old`
    /// then forwards to it), or a fresh one.
    fn replacing(
        spec: BudgetSpec,
        account: Option<Arc<str>>,
        clock: &C,
        old: Option<&Arc<Budget<C>>>,
    ) -> Arc<Self> {
        let old = old.map(Budget::latest);
        let guard = old.map(|o| o.lock());
        let new = Arc::new(Self::new(spec, account, clock, old.map(|o| &**o), guard.as_deref()));
        if let Some(o) = old {
            // Under `guard`: no grant can slip in between the copy and this.
            let _ = o.successor.set(Arc::clone(&new));
        }
        drop(guard);
        new
    }

    /// The budget that now does this one's work: itself, or the last of its
    /// successors.
    fn latest(self: &Arc<Self>) -> &Arc<Self> {
        let mut budget = self;
        while let Some(next) = budget.successor.get() {
            budget = next;
        }
        budget
    }

    fn new(
        spec: BudgetSpec,
        account: Option<Arc<str>>,
        clock: &C,
        old: Option<&Budget<C>>,
        old_state: Option<&State>,
    ) -> Self {
        let now = clock.now();
        let windows = spec
            .windows
            .iter()
            .map(|w| {
                // The old window that counted the same thing: same unit and period,
                // the same reset preferred (a budget may hold both kinds).
                let carried = old_state.and_then(|s| {
                    let same = |o: &&WindowState| o.window.unit == w.unit && o.window.period == w.period;
                    s.windows
                        .iter()
                        .filter(same)
                        .find(|o| o.window.reset == w.reset)
                        .or_else(|| s.windows.iter().find(same))
                });
                match carried {
                    Some(o) => WindowState::carried(w.clone(), o, now),
                    None => WindowState::new(w.clone(), now),
                }
            })
            .collect();
        let blocked_until = old_state.map_or(0, |s| s.blocked_until);
        let running = old.map_or_else(Arc::default, |o| Arc::clone(&o.running));
        let shaper = spec.shaper.map(|quota| {
            let limiter = GovernorLimiter::with_clock([quota], ShaperClock(clock.clone()));
            match old.and_then(|o| o.shaper.as_ref()) {
                Some(prev) => prev.reshape([(Some(0), quota)]),
                None => limiter,
            }
        });
        let token_cap = spec.windows.iter().filter(|w| w.unit == Unit::Tokens).map(|w| w.limit).min();
        let needs_release = spec.max_concurrent.is_some() || token_cap.is_some();
        let state = State { windows, blocked_until };
        Self {
            account,
            spec,
            clock: clock.clone(),
            state: Mutex::new(state),
            running,
            shaper,
            needs_release,
            token_cap,
            successor: std::sync::OnceLock::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counters that are still
        // consistent (every update is a single store): keep using them.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl State {
    fn refresh(&mut self, now: u64) {
        for w in self.windows.iter_mut() {
            w.refresh(now);
        }
    }

    /// Nanoseconds until this budget admits a request (0 = now), with the
    /// cause when it does not.
    fn wait(
        &self,
        now: u64,
        max_concurrent: Option<NonZeroU32>,
        running: &Running,
        share: ShareNow,
    ) -> (u64, Cause) {
        let mut worst = (0, Cause::None);
        if self.blocked_until > now {
            worst = (self.blocked_until - now, Cause::Announced);
        }
        if share.not_before == u64::MAX {
            // Closed until whoever coordinates the replicas opens it (a
            // heartbeat round under way): no moment is known, so look again
            // soon rather than answer with a wait of centuries.
            worst = worst.max_by_wait((nanos(POLL), Cause::Share));
        } else if share.not_before > now {
            worst = worst.max_by_wait((share.not_before - now, Cause::Share));
        }
        // A share of a concurrency cap too: ⌊max / N⌋, what the others keep
        // back for this replica (none when the cap is below the replica count).
        let cap = |m: NonZeroU32| u64::from(m.get()) / share.divisor;
        if max_concurrent.is_some_and(|m| u64::from(running.in_flight.load(Ordering::Acquire)) >= cap(m)) {
            worst = worst.max_by_wait((nanos(POLL), Cause::Concurrency));
        }
        for w in self.windows.iter() {
            if share.skip_requests && w.window.unit == Unit::Requests {
                continue;
            }
            let reserved = running.reserved.load(Ordering::Acquire);
            let wait = w.wait_for_room(now, reserved, share.divisor).unwrap_or(nanos(POLL));
            if wait > 0 {
                let cause = Cause::Window {
                    unit: w.window.unit,
                    limit: w.limit(),
                    period: w.window.period,
                    daily: !matches!(w.window.reset, crate::Reset::Rolling),
                };
                worst = worst.max_by_wait((wait, cause));
            }
        }
        worst
    }

    fn charge(&mut self, now: u64, tokens: u64, counts_in_flight: bool, running: &Running) {
        for w in self.windows.iter_mut() {
            if w.window.unit == Unit::Requests {
                w.record(now, 1);
            }
        }
        if tokens > 0 {
            let _ = running
                .reserved
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| Some(r.saturating_add(tokens)));
        }
        if counts_in_flight {
            running.in_flight.fetch_add(1, Ordering::AcqRel);
        }
    }
}

trait MaxByWait {
    fn max_by_wait(self, other: Self) -> Self;
}

impl MaxByWait for (u64, Cause) {
    fn max_by_wait(self, other: Self) -> Self {
        if other.0 > self.0 { other } else { self }
    }
}

/// Which limit a key is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Cause {
    /// Nothing: it has room.
    None,
    /// A window is full.
    Window {
        /// What it counts.
        unit: Unit,
        /// Its limit (the learned one if lower).
        limit: u64,
        /// Its period.
        period: Duration,
        /// Whether it resets at a fixed time of day (rather than rolling).
        daily: bool,
    },
    /// The GCRA shaper spaces requests out (`burst` below the window).
    Shaper,
    /// `max_concurrent` requests are in flight.
    Concurrency,
    /// The upstream announced that nothing more is allowed until a reset.
    Announced,
    /// This replica's [`Share`] of a quota it shares with others: spent, or
    /// not free yet (a replica that lost the shared state waits before it
    /// spends its share).
    Share,
}

/// The part of every window this engine may use while it cannot reach the
/// state it shares with other replicas: ⌊limit / divisor⌋ of each window,
/// and nothing before `not_before`. Set by whoever coordinates the replicas
/// (the gateway's Redis link); a fresh engine uses its whole budget.
/// Carried across [`QuotaEngine::reshape`], so a reload keeps it.
#[derive(Debug, Default)]
pub struct Share {
    divisor: AtomicU64,
    not_before: AtomicU64,
}

impl Share {
    /// Use ⌊limit / `divisor`⌋ of every window (0 or 1: the whole), and
    /// nothing before `not_before` (the engine clock's nanoseconds;
    /// `u64::MAX`: closed until set again, its wait reported as [`POLL`]).
    pub fn set(&self, divisor: u64, not_before: u64) {
        self.not_before.store(not_before, Ordering::Release);
        self.divisor.store(divisor, Ordering::Release);
    }

    /// The whole budget again.
    pub fn whole(&self) {
        self.set(1, 0);
    }

    /// The divisor (1: the whole budget) and the engine instant before which
    /// nothing is admitted.
    pub fn get(&self) -> (u64, u64) {
        (self.divisor.load(Ordering::Acquire).max(1), self.not_before.load(Ordering::Acquire))
    }
}

/// How one check applies the share.
#[derive(Debug, Clone, Copy)]
struct ShareNow {
    divisor: u64,
    not_before: u64,
    /// Request windows are decided elsewhere (the shared state admitted the
    /// request): check everything else.
    skip_requests: bool,
}

impl ShareNow {
    fn of(share: &Share, skip_requests: bool) -> Self {
        let (divisor, not_before) = if skip_requests { (1, 0) } else { share.get() };
        Self { divisor, not_before, skip_requests }
    }
}

/// How long until a key can take a request, and why not now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// Time from now (zero = now).
    pub wait: Duration,
    /// The limit that holds it back longest.
    pub cause: Cause,
}

/// What the engine needs to know about one key.
#[derive(Debug, Clone, Default)]
pub struct KeyBudget {
    /// The key's own budget (its limits when it has no account, its own
    /// extra limits when it has one).
    pub own: Option<BudgetSpec>,
    /// The account it shares a budget with: name and limits. Keys naming the
    /// same account share one budget (the first key's limits are used).
    pub account: Option<(Arc<str>, BudgetSpec)>,
    /// The key's index in the engine this one replaces, if it was there
    /// (see [`QuotaEngine::reshape`]).
    pub previous: Option<usize>,
}

struct KeySlot<C: QuotaClock + Clone> {
    own: Option<Arc<Budget<C>>>,
    account: Option<Arc<Budget<C>>>,
    /// The first key of its account (so sums count the account once).
    first_of_account: bool,
}

impl<C: QuotaClock + Clone> KeySlot<C> {
    /// The key's budgets as they count now (after any reload's successors).
    fn budgets(&self) -> impl Iterator<Item = &Arc<Budget<C>>> {
        self.own.iter().chain(self.account.iter()).map(Budget::latest)
    }
}

/// Budgets for a set of keys, indexed by key position: exact rolling and
/// daily windows of requests and tokens, concurrency caps, a GCRA shaper, and
/// accounts shared by several keys.
///
/// ```
/// use std::time::Duration;
/// use proxypal_limiter::{KeyBudget, Limits, ManualClock, QuotaEngine};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let clock = ManualClock::at("2026-11-30T12:00:00Z")?;
/// // 40 in any rolling minute, bursts allowed (NVIDIA's free tier).
/// let spec = Limits::nvidia_free_tier().compile()?;
/// let engine = QuotaEngine::new([KeyBudget { own: Some(spec), ..KeyBudget::default() }], clock.clone());
///
/// for _ in 0..40 {
///     engine.try_acquire(0, 0).ok_or("the whole burst goes at once")?.finish(None);
/// }
/// assert!(engine.try_acquire(0, 0).is_none(), "the 41st waits");
/// let wait = engine.wait(0, 0).ok_or("key 0 exists")?.wait;
/// assert_eq!(wait, Duration::from_millis(60_500)); // a minute plus the margin
/// clock.advance(wait);
/// assert!(engine.try_acquire(0, 0).is_some());
/// # Ok(()) }
/// ```
pub struct QuotaEngine<C: QuotaClock + Clone = SystemClock> {
    keys: Box<[KeySlot<C>]>,
    clock: C,
    counts_tokens: bool,
    share: Arc<Share>,
}

/// One request window of a key's budget, for a store shared by replicas
/// (see [`QuotaEngine::request_windows`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct WindowView<'a> {
    /// The account whose budget it is; `None` for the key's own.
    pub account: Option<&'a str>,
    /// What it counts.
    pub unit: Unit,
    /// The configured period.
    pub period: Duration,
    /// What a grant counts for: the period plus the margin (rolling), or the
    /// period (a daily reset).
    pub span: Duration,
    /// Its limit now (a learned lower one included).
    pub limit: u64,
    /// A calendar window: its next reset, on the engine's clock
    /// (nanoseconds); `None` for a rolling window.
    pub resets_at: Option<u64>,
    /// A calendar window: the reset that began it (nanoseconds); `None` for
    /// a rolling window.
    pub started_at: Option<u64>,
}

/// One kind of window summed over a pool (see [`QuotaEngine::pool_window`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolWindow {
    /// The limits added up.
    pub limit: u64,
    /// What remains, added up.
    pub remaining: u64,
    /// Until every window is empty again.
    pub reset: Duration,
}

impl<C: QuotaClock + Clone> fmt::Debug for QuotaEngine<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QuotaEngine").field("keys", &self.keys.len()).finish_non_exhaustive()
    }
}

impl QuotaEngine<SystemClock> {
    /// An engine on the real clock.
    pub fn system(keys: impl IntoIterator<Item = KeyBudget>) -> Self {
        Self::new(keys, SystemClock::new())
    }
}

impl<C: QuotaClock + Clone> QuotaEngine<C> {
    /// An engine over `keys`, in order, on `clock`.
    pub fn new(keys: impl IntoIterator<Item = KeyBudget>, clock: C) -> Self {
        Self::build(keys, clock, None)
    }

    /// An engine for a new key set that keeps this one's state: a key's own
    /// budget follows it from [`KeyBudget::previous`]; an account's budget
    /// follows its name. Windows that count the same unit over the same period
    /// keep their grants, so a reload never hands out a fresh window.
    pub fn reshape(&self, keys: impl IntoIterator<Item = KeyBudget>) -> Self {
        Self::build(keys, self.clock.clone(), Some(self))
    }

    fn build(keys: impl IntoIterator<Item = KeyBudget>, clock: C, old: Option<&Self>) -> Self {
        let mut accounts: HashMap<Arc<str>, Arc<Budget<C>>> = HashMap::new();
        let mut counts_tokens = false;
        let old_accounts: HashMap<&str, &Arc<Budget<C>>> = old
            .into_iter()
            .flat_map(|e| e.keys.iter())
            .filter_map(|k| k.account.as_ref())
            .filter_map(|b| b.account.as_deref().map(|n| (n, b)))
            .collect();
        let keys = keys
            .into_iter()
            .map(|k| {
                let previous = old.and_then(|o| k.previous.and_then(|i| o.keys.get(i)));
                let own = k.own.filter(|s| !s.is_unlimited()).map(|spec| {
                    match previous.and_then(|p| p.own.as_ref()) {
                        Some(o) if o.latest().spec == spec => Arc::clone(o.latest()),
                        old_own => Budget::replacing(spec, None, &clock, old_own),
                    }
                });
                let first_of_account =
                    k.account.as_ref().is_some_and(|(name, _)| !accounts.contains_key(name));
                let account = k.account.map(|(name, spec)| {
                    Arc::clone(accounts.entry(Arc::clone(&name)).or_insert_with(|| {
                        let old_budget = old_accounts.get(&*name).copied();
                        match old_budget {
                            Some(o) if o.latest().spec == spec => Arc::clone(o.latest()),
                            _ => Budget::replacing(spec, Some(name), &clock, old_budget),
                        }
                    }))
                });
                let slot = KeySlot { own, account, first_of_account };
                counts_tokens |=
                    slot.budgets().any(|b| b.spec.windows.iter().any(|w| w.unit == Unit::Tokens));
                slot
            })
            .collect();
        let share = old.map_or_else(Arc::default, |o| Arc::clone(&o.share));
        Self { keys, clock, counts_tokens, share }
    }

    /// Whether any budget has a token window (so requests need a token estimate).
    pub fn counts_tokens(&self) -> bool {
        self.counts_tokens
    }

    /// The part of its windows this engine may use (see [`Share`]); the same
    /// `Arc` across reloads.
    pub fn share(&self) -> &Arc<Share> {
        &self.share
    }

    /// Calls `f` with each request window of key `index`'s budgets as they
    /// count now (its own, then its account's): what a shared store must
    /// enforce for the key.
    pub fn request_windows(&self, index: usize, mut f: impl FnMut(WindowView<'_>)) {
        self.windows(index, |w| {
            if w.unit == Unit::Requests {
                f(w);
            }
        });
    }

    /// [`request_windows`](Self::request_windows) for every window, token
    /// windows included.
    pub fn windows(&self, index: usize, mut f: impl FnMut(WindowView<'_>)) {
        self.entries_with(index, false, |w, _| f(w));
    }

    /// Key `index`'s concurrency caps: `(account, max)` per budget that has one.
    pub fn concurrency(&self, index: usize, mut f: impl FnMut(Option<&str>, u32)) {
        let Some(slot) = self.keys.get(index) else { return };
        for budget in slot.budgets() {
            if let Some(max) = budget.spec.max_concurrent {
                f(budget.account.as_deref(), max.get());
            }
        }
    }

    /// Every window of key `index` with what it counts: `(at, amount)` per
    /// grant of a rolling log (engine clock nanoseconds), or one `(reset,
    /// used)` for a daily window. Reservations still running are not in
    /// them. To replay into a shared store that lost them.
    pub fn entries(&self, index: usize, f: impl FnMut(WindowView<'_>, Vec<(u64, u64)>)) {
        self.entries_with(index, true, f);
    }

    fn entries_with(
        &self,
        index: usize,
        with_entries: bool,
        mut f: impl FnMut(WindowView<'_>, Vec<(u64, u64)>),
    ) {
        let Some(slot) = self.keys.get(index) else { return };
        let now = self.clock.now();
        for budget in slot.budgets() {
            let mut state = budget.lock();
            state.refresh(now);
            for w in state.windows.iter() {
                let (resets_at, started_at) = match &w.window.reset {
                    crate::Reset::Rolling => (None, None),
                    crate::Reset::Daily(daily) => {
                        let next = daily.next_after(now);
                        // The reset before it: days are 23 to 25 hours long.
                        let before =
                            daily.next_after(next.saturating_sub(25 * 3_600_000_000_000 + 1_800_000_000_000));
                        (Some(next), Some(before.min(now)))
                    }
                };
                let view = WindowView {
                    account: budget.account.as_deref(),
                    unit: w.window.unit,
                    period: w.window.period,
                    span: Duration::from_nanos(w.window.span),
                    limit: w.limit(),
                    resets_at,
                    started_at,
                };
                let entries = if with_entries {
                    w.saved().0.into_iter().map(|e| (e.at, e.amount)).collect()
                } else {
                    Vec::new()
                };
                f(view, entries);
            }
        }
    }

    /// The `unit` windows of `period` summed over the keys `include` accepts
    /// (an account counted once, through its first key; a key in an account by
    /// the account's windows): the pool's limit, what remains, and the time
    /// until all of it is back. `None` when no such key has such a window.
    pub fn pool_window(
        &self,
        unit: Unit,
        period: Duration,
        include: impl Fn(usize) -> bool,
    ) -> Option<PoolWindow> {
        let now = self.clock.now();
        let mut sum: Option<PoolWindow> = None;
        for (index, slot) in self.keys.iter().enumerate() {
            let budget = match (&slot.account, &slot.own) {
                (Some(account), _) if slot.first_of_account => account,
                (Some(_), _) => continue,
                (None, Some(own)) => own,
                (None, None) => continue,
            };
            if !include(index) {
                continue;
            }
            let mut state = budget.lock();
            state.refresh(now);
            let reserved = budget.running.reserved.load(Ordering::Acquire);
            for w in state.windows.iter().filter(|w| w.window.unit == unit && w.window.period == period) {
                let used = if unit == Unit::Tokens { w.used().saturating_add(reserved) } else { w.used() };
                let total = sum.get_or_insert(PoolWindow { limit: 0, remaining: 0, reset: Duration::ZERO });
                total.limit = total.limit.saturating_add(w.limit());
                total.remaining = total.remaining.saturating_add(w.limit().saturating_sub(used));
                total.reset = total.reset.max(Duration::from_nanos(w.empty_in(now)));
            }
        }
        sum
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The engine's clock.
    pub fn clock(&self) -> &C {
        &self.clock
    }

    /// Takes a request for key `index` now, reserving `tokens` in its token
    /// windows, if every window of its budgets has room; `None` otherwise (or
    /// for an unknown index). The grant counts at once in request windows; the
    /// returned [`Permit`] settles tokens and the concurrency slot.
    pub fn try_acquire(&self, index: usize, tokens: u64) -> Option<Permit<C>> {
        self.acquire(index, tokens, ShareNow::of(&self.share, false))
    }

    /// [`try_acquire`](Self::try_acquire) for a request the shared state
    /// (another replica's view included) already admitted: request windows
    /// are charged without being checked; everything only this replica
    /// knows — the shaper, concurrency, token windows, announced blocks — is
    /// checked as usual.
    pub fn try_acquire_admitted(&self, index: usize, tokens: u64) -> Option<Permit<C>> {
        self.acquire(index, tokens, ShareNow::of(&self.share, true))
    }

    fn acquire(&self, index: usize, tokens: u64, share: ShareNow) -> Option<Permit<C>> {
        let slot = self.keys.get(index)?;
        let now = self.clock.now();
        // A budget replaced by a reload forwards to its successor (one atomic
        // load when it was not replaced).
        let mut own = slot.own.as_ref().map(Budget::latest).map(|b| (b, b.lock()));
        let mut account = slot.account.as_ref().map(Budget::latest).map(|b| (b, b.lock()));
        for (budget, state) in own.iter_mut().chain(account.iter_mut()) {
            state.refresh(now);
            if state.wait(now, budget.spec.max_concurrent, &budget.running, share).0 > 0 {
                return None;
            }
            if budget.shaper.as_ref().is_some_and(|s| s.time_to_permit(0) != Some(Duration::ZERO)) {
                return None;
            }
        }
        // The shapers last: a GCRA cell cannot be given back. The peek above may
        // be a few nanoseconds more generous than governor's own clock reading,
        // so the take decides. (With two shapers, a refusal by the second loses
        // the first's cell: the safe side.)
        for (budget, _) in own.iter().chain(account.iter()) {
            if budget.shaper.as_ref().is_some_and(|s| !s.take_permit(0)) {
                return None;
            }
        }
        let mut permit = Permit { budgets: [None, None], settled: false, on_settle: None };
        for (i, (budget, state)) in own.iter_mut().chain(account.iter_mut()).enumerate() {
            // Only a budget that counts tokens reserves them, and never more
            // than its smallest token window (a client's `max_tokens` is its own).
            let reserve = budget.token_cap.map_or(0, |cap| tokens.min(cap));
            state.charge(now, reserve, budget.spec.max_concurrent.is_some(), &budget.running);
            if budget.needs_release {
                if let Some(held) = permit.budgets.get_mut(i) {
                    *held = Some((Arc::clone(budget), reserve));
                }
            }
        }
        Some(permit)
    }

    /// How long until key `index` could take a request reserving `tokens`,
    /// and what holds it back; `None` for an unknown index.
    pub fn wait(&self, index: usize, tokens: u64) -> Option<Wait> {
        self.wait_with(index, tokens, ShareNow::of(&self.share, false))
    }

    /// [`wait`](Self::wait) leaving request windows out: what only this
    /// replica knows holds key `index` back (for a shared admission).
    pub fn local_wait(&self, index: usize, tokens: u64) -> Option<Wait> {
        self.wait_with(index, tokens, ShareNow::of(&self.share, true))
    }

    fn wait_with(&self, index: usize, tokens: u64, share: ShareNow) -> Option<Wait> {
        let _ = tokens; // a request is admitted while a token window has any room
        let slot = self.keys.get(index)?;
        let now = self.clock.now();
        let mut worst = (0, Cause::None);
        for budget in slot.budgets() {
            let mut state = budget.lock();
            state.refresh(now);
            worst = worst.max_by_wait(state.wait(now, budget.spec.max_concurrent, &budget.running, share));
            drop(state);
            if let Some(shaper) = &budget.shaper {
                let w = shaper.time_to_permit(0).map_or(0, nanos);
                worst = worst.max_by_wait((w, Cause::Shaper));
            }
        }
        Some(Wait { wait: Duration::from_nanos(worst.0), cause: worst.1 })
    }

    /// How long until the *request windows* of key `index` have room for one
    /// more (zero if they have room now): what the engine's own log says
    /// about when the key frees up, leaving out the shaper, concurrency,
    /// token reservations and announced blocks.
    pub fn window_wait(&self, index: usize) -> Duration {
        let Some(slot) = self.keys.get(index) else { return Duration::ZERO };
        let now = self.clock.now();
        let mut worst = 0;
        for budget in slot.budgets() {
            let mut state = budget.lock();
            state.refresh(now);
            for w in state.windows.iter().filter(|w| w.window.unit == Unit::Requests) {
                worst = worst.max(w.wait_for_room(now, 0, 1).unwrap_or(0));
            }
        }
        Duration::from_nanos(worst)
    }

    /// Records what an upstream announced for key `index` (its account's
    /// budget when it has one): a lower limit replaces the configured one for
    /// the matching window, and nothing remaining with a reset blocks the key
    /// until then.
    pub fn learn(&self, index: usize, announced: &Announced) {
        let Some(slot) = self.keys.get(index) else { return };
        let Some(budget) = slot.account.as_ref().or(slot.own.as_ref()).map(Budget::latest) else { return };
        let now = self.clock.now();
        let mut state = budget.lock();
        if let Some(limit) = announced.limit.filter(|l| *l > 0) {
            let mut matching = state.windows.iter_mut().filter(|w| {
                w.window.unit == announced.unit && announced.period.is_none_or(|p| p == w.window.period)
            });
            // Without a period the match must be unambiguous.
            if let (Some(w), None) = (matching.next(), matching.next()) {
                w.learn_limit(limit);
            }
        }
        if announced.remaining == Some(0) {
            if let Some(reset) = announced.reset {
                // A reset beyond two days is not a real window's: cap it.
                let reset = reset.min(MAX_ANNOUNCED_RESET);
                state.blocked_until = state.blocked_until.max(now.saturating_add(nanos(reset)));
            }
        }
    }

    /// Blocks key `index` (its account when it has one) for `wait`, e.g. after
    /// a `Retry-After`.
    pub fn block(&self, index: usize, wait: Duration) {
        self.learn(
            index,
            &Announced {
                unit: Unit::Requests,
                period: None,
                limit: None,
                remaining: Some(0),
                reset: Some(wait),
            },
        );
    }

    /// Clears what was learned for key `index`: announced blocks and limits.
    pub fn forget_learned(&self, index: usize) {
        let Some(slot) = self.keys.get(index) else { return };
        for budget in slot.budgets() {
            let mut state = budget.lock();
            state.blocked_until = 0;
            for w in state.windows.iter_mut() {
                w.forget_learned();
            }
        }
    }

    /// The account key `index` belongs to.
    pub fn account(&self, index: usize) -> Option<&str> {
        self.keys.get(index)?.account.as_ref()?.account.as_deref()
    }

    /// Every limit of key `index` with its use now (for stats); empty for an
    /// unknown index or an unlimited key.
    pub fn report(&self, index: usize) -> Vec<LimitReport> {
        let Some(slot) = self.keys.get(index) else { return Vec::new() };
        let now = self.clock.now();
        let mut out = Vec::new();
        for budget in slot.budgets() {
            let scope = if budget.account.is_some() { Scope::Account } else { Scope::Key };
            let mut state = budget.lock();
            state.refresh(now);
            for w in state.windows.iter() {
                let limit = w.limit();
                let used = match w.window.unit {
                    Unit::Requests => w.used(),
                    Unit::Tokens => w.used().saturating_add(budget.running.reserved.load(Ordering::Acquire)),
                };
                out.push(LimitReport {
                    kind: match w.window.unit {
                        Unit::Requests => LimitKind::Requests,
                        Unit::Tokens => LimitKind::Tokens,
                    },
                    period: Some(w.window.period),
                    reset: w.window.reset.to_string(),
                    limit,
                    used,
                    remaining: limit.saturating_sub(used),
                    resets_in: Duration::from_nanos(w.resets_in(now)),
                    source: w.source(),
                    scope,
                });
            }
            if let Some(max) = budget.spec.max_concurrent {
                let limit = u64::from(max.get());
                let used = u64::from(budget.running.in_flight.load(Ordering::Acquire));
                out.push(LimitReport {
                    kind: LimitKind::Concurrent,
                    period: None,
                    reset: "rolling".into(),
                    limit,
                    used,
                    remaining: limit.saturating_sub(used),
                    resets_in: Duration::ZERO,
                    source: Source::Configured,
                    scope,
                });
            }
        }
        out
    }

    /// Time until key `index`'s upstream-announced block ends (zero if none).
    pub fn blocked_for(&self, index: usize) -> Duration {
        let Some(slot) = self.keys.get(index) else { return Duration::ZERO };
        let now = self.clock.now();
        slot.budgets()
            .map(|b| b.lock().blocked_until.saturating_sub(now))
            .max()
            .map_or(Duration::ZERO, Duration::from_nanos)
    }

    /// Requests key `index` could send now back to back: the smallest room
    /// over its request windows (`u64::MAX` when none limits it).
    pub fn remaining_requests(&self, index: usize) -> u64 {
        let Some(slot) = self.keys.get(index) else { return 0 };
        let now = self.clock.now();
        let mut least = u64::MAX;
        for budget in slot.budgets() {
            let mut state = budget.lock();
            state.refresh(now);
            if state.blocked_until > now {
                return 0;
            }
            for w in state.windows.iter().filter(|w| w.window.unit == Unit::Requests) {
                least = least.min(w.limit().saturating_sub(w.used()));
            }
        }
        least
    }

    /// A snapshot of every budget's windows for saving: budgets are named
    /// by `key_id(index)` for a key's own budget and by account name.
    pub fn save(&self, key_id: impl Fn(usize) -> String) -> Vec<SavedBudget> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (index, slot) in self.keys.iter().enumerate() {
            for budget in slot.budgets() {
                let id = match &budget.account {
                    Some(name) => format!("account:{name}"),
                    None => format!("key:{}", key_id(index)),
                };
                if !seen.insert(id.clone()) {
                    continue;
                }
                let state = budget.lock();
                let windows = state
                    .windows
                    .iter()
                    .map(|w| {
                        let (entries, fixed) = w.saved();
                        SavedWindow {
                            unit: w.window.unit,
                            period: w.window.period,
                            fixed: fixed.is_some(),
                            entries: entries.into_iter().map(|e| (e.at, e.amount)).collect(),
                        }
                    })
                    .collect();
                // Reservations of requests still running count as spent: safe side.
                let reserved = budget.running.reserved.load(Ordering::Acquire);
                out.push(SavedBudget { id, windows, blocked_until: state.blocked_until, reserved });
            }
        }
        out
    }

    /// Restores budgets saved by [`save`](Self::save) (same naming); windows
    /// are matched by unit and period, and what does not match is dropped.
    ///
    /// `crashed_at`: for a state that was *not* written at a clean shutdown,
    /// the latest moment the process can have granted what the state lacks
    /// (the caller knows how often it saved). The engine then errs on the safe
    /// side: a rolling request window of an hour or less counts as full until
    /// one period after that moment; longer and token windows count the last
    /// second they recorded once more (an estimate of what was lost).
    pub fn restore(&self, saved: &[SavedBudget], key_id: impl Fn(usize) -> String, crashed_at: Option<u64>) {
        let now = self.clock.now();
        let by_id: HashMap<&str, &SavedBudget> = saved.iter().map(|b| (b.id.as_str(), b)).collect();
        let mut done = std::collections::HashSet::new();
        for (index, slot) in self.keys.iter().enumerate() {
            for budget in slot.budgets() {
                let id = match &budget.account {
                    Some(name) => format!("account:{name}"),
                    None => format!("key:{}", key_id(index)),
                };
                let Some(saved) = by_id.get(id.as_str()) else { continue };
                if !done.insert(id) {
                    continue;
                }
                let mut state = budget.lock();
                state.blocked_until = state.blocked_until.max(saved.blocked_until);
                for w in state.windows.iter_mut() {
                    let fixed = !matches!(w.window.reset, crate::Reset::Rolling);
                    let same = |s: &&SavedWindow| s.unit == w.window.unit && s.period == w.window.period;
                    let found = saved
                        .windows
                        .iter()
                        .filter(same)
                        .find(|s| s.fixed == fixed)
                        .or_else(|| saved.windows.iter().find(same));
                    if let Some(s) = found {
                        let mut entries: Vec<Entry> =
                            s.entries.iter().map(|&(at, amount)| Entry { at, amount }).collect();
                        if w.window.unit == Unit::Tokens && saved.reserved > 0 {
                            entries.push(Entry { at: now, amount: saved.reserved });
                        }
                        if let Some(at) = crashed_at {
                            let short = w.window.unit == Unit::Requests
                                && matches!(w.window.reset, crate::Reset::Rolling)
                                && w.window.period <= Duration::from_secs(3_600);
                            let lost = if short { w.limit() } else { last_second(saved, w.window.unit) };
                            // `at` is the latest moment the lost grants can have been
                            // made (never after now). A day counter matches its entry by
                            // its reset instant.
                            let when = match (short, s.entries.first()) {
                                (true, _) => at.min(now),
                                (false, Some(first)) if s.fixed => first.0,
                                _ => at.min(now),
                            };
                            entries.push(Entry { at: when, amount: lost });
                        }
                        w.restore(&entries, s.fixed, now);
                    }
                }
            }
        }
    }
}

/// What `saved` granted of `unit` in the last second it recorded (by its
/// rolling windows; each grant is in all of them: the largest sum), at least one.
fn last_second(saved: &SavedBudget, unit: Unit) -> u64 {
    saved
        .windows
        .iter()
        .filter(|w| w.unit == unit && !w.fixed)
        .map(|w| {
            let newest = w.entries.iter().map(|(t, _)| *t).max().unwrap_or(0);
            let since = newest.saturating_sub(1_000_000_000);
            w.entries.iter().filter(|(t, _)| *t >= since).map(|(_, a)| *a).sum::<u64>()
        })
        .max()
        .unwrap_or(0)
        .max(1)
}

/// What an upstream announced about one limit (see `x-ratelimit-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announced {
    /// Requests or tokens.
    pub unit: Unit,
    /// The period, when the dialect says it (`-minute`, `-day`).
    pub period: Option<Duration>,
    /// The limit.
    pub limit: Option<u64>,
    /// What is left.
    pub remaining: Option<u64>,
    /// Time until the limit is fully restored.
    pub reset: Option<Duration>,
}

/// A grant taken from [`QuotaEngine::try_acquire`]. Settle it with
/// [`finish`](Permit::finish) when the answer ends; dropping it counts every
/// reserved token as used (the safe side).
pub struct Permit<C: QuotaClock + Clone = SystemClock> {
    /// The budgets to give back to, with what this grant reserved in each.
    budgets: [Option<(Arc<Budget<C>>, u64)>; 2],
    settled: bool,
    /// Told the use when the permit settles (a shared store's reservation).
    on_settle: Option<Box<dyn FnOnce(Option<u64>) + Send + Sync>>,
}

impl<C: QuotaClock + Clone> fmt::Debug for Permit<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit").field("reserved", &self.reserved()).finish_non_exhaustive()
    }
}

impl<C: QuotaClock + Clone> Permit<C> {
    /// Tokens this grant reserved (the most in any of its budgets).
    pub fn reserved(&self) -> u64 {
        self.budgets.iter().flatten().map(|(_, r)| *r).max().unwrap_or(0)
    }

    /// Calls `f` with the reported use (`None`: none reported) when this
    /// permit settles, by [`finish`](Self::finish) or by being dropped: to
    /// settle the same grant in a store shared with other replicas.
    pub fn on_settle(&mut self, f: impl FnOnce(Option<u64>) + Send + Sync + 'static) {
        self.on_settle = Some(Box::new(f));
    }

    /// Ends the request: frees its concurrency slot and replaces its token
    /// reservation by `used_tokens`, the upstream's reported usage (`None`:
    /// keep the reservation as the use).
    pub fn finish(mut self, used_tokens: Option<u64>) {
        self.settle(used_tokens);
    }

    fn settle(&mut self, used_tokens: Option<u64>) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        if let Some(f) = self.on_settle.take() {
            f(used_tokens);
        }
        for (budget, reserved) in self.budgets.iter().flatten() {
            let reserved = *reserved;
            if budget.token_cap.is_some() {
                let used = used_tokens.unwrap_or(reserved);
                let now = budget.clock.now();
                // Into the budget that counts now, if a reload replaced this one.
                let mut state = budget.latest().lock();
                // Record the use before giving the reservation back, so that the
                // window never looks emptier than it is.
                for w in state.windows.iter_mut().filter(|w| w.window.unit == Unit::Tokens) {
                    w.record(now, used);
                }
                drop(state);
                // Never below zero: this permit added exactly this much.
                let _ = budget
                    .running
                    .reserved
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| Some(r.saturating_sub(reserved)));
            }
            if budget.spec.max_concurrent.is_some() {
                let _ = budget
                    .running
                    .in_flight
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_sub(1)));
            }
        }
    }
}

impl<C: QuotaClock + Clone> Drop for Permit<C> {
    fn drop(&mut self) {
        self.settle(None);
    }
}

/// What a limit counts, as shown in stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// Requests per period.
    Requests,
    /// Tokens per period.
    Tokens,
    /// Requests in flight.
    Concurrent,
}

impl LimitKind {
    /// `"requests"`, `"tokens"` or `"concurrent"`.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::Requests => "requests",
            LimitKind::Tokens => "tokens",
            LimitKind::Concurrent => "concurrent",
        }
    }
}

/// Whose budget a limit belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The key's own.
    Key,
    /// Its account's, shared with the account's other keys.
    Account,
}

/// One limit of a key, with its use now.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LimitReport {
    /// What it counts.
    pub kind: LimitKind,
    /// The period (`None` for a concurrency cap).
    pub period: Option<Duration>,
    /// `rolling` or `HH:MM zone`.
    pub reset: String,
    /// The limit in force (the learned one when lower).
    pub limit: u64,
    /// Counted now (tokens include reservations).
    pub used: u64,
    /// `limit − used`.
    pub remaining: u64,
    /// Until the window next gives something back.
    pub resets_in: Duration,
    /// Configured or learned.
    pub source: Source,
    /// The key's or its account's.
    pub scope: Scope,
}

/// One budget's state, saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedBudget {
    /// `key:<id>` or `account:<name>`.
    pub id: String,
    /// Its windows.
    pub windows: Vec<SavedWindow>,
    /// Blocked by the upstream until (Unix nanos).
    pub blocked_until: u64,
    /// Tokens reserved by requests in flight (restored as used).
    pub reserved: u64,
}

/// One window's state, saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedWindow {
    /// What it counts.
    pub unit: Unit,
    /// Its period.
    pub period: Duration,
    /// A daily window (one entry: reset instant, count) rather than a log.
    pub fixed: bool,
    /// `(Unix nanos, amount)` pairs, oldest first.
    pub entries: Vec<(u64, u64)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Limits, ManualClock, WindowSpec};
    use proptest::prelude::*;

    const SEC: u64 = 1_000_000_000;

    fn engine(limits: &[Limits], clock: &ManualClock) -> QuotaEngine<ManualClock> {
        let keys =
            limits.iter().map(|l| KeyBudget { own: Some(l.compile().unwrap()), ..KeyBudget::default() });
        QuotaEngine::new(keys, clock.clone())
    }

    fn rolling(n: u64, secs: u64) -> Limits {
        Limits {
            windows: Some(vec![WindowSpec {
                unit: Unit::Requests,
                limit: n,
                period: Duration::from_secs(secs),
                reset: crate::Reset::Rolling,
            }]),
            margin: Some(Duration::ZERO),
            ..Limits::default()
        }
    }

    /// The largest number of grants in any closed interval of length `span`.
    fn max_in_any_window(grants: &[u64], span: u64) -> usize {
        grants
            .iter()
            .enumerate()
            .map(|(i, &t)| grants[i..].iter().take_while(|&&g| g < t + span).count())
            .max()
            .unwrap_or(0)
    }

    proptest! {
        /// Whatever the arrival pattern, no interval of the period (+ margin)
        /// carries more than N grants — and a request is refused only when
        /// granting it would have broken that (nothing the window allows is held back).
        #[test]
        fn any_interval_of_the_period_carries_at_most_n(
            n in 1u64..30,
            gaps in proptest::collection::vec(0u64..3_000, 1..300),
            margin_ms in 0u64..1_000,
        ) {
            let clock = ManualClock::new(1_700_000_000 * SEC);
            let mut limits = rolling(n, 10);
            limits.margin = Some(Duration::from_millis(margin_ms));
            let e = engine(&[limits], &clock);
            let span = 10 * SEC + margin_ms * 1_000_000;
            let mut grants: Vec<u64> = Vec::new();
            for gap in gaps {
                clock.advance(Duration::from_millis(gap));
                let now = clock.now();
                let in_window = grants.iter().filter(|&&g| g + span > now).count() as u64;
                let granted = e.try_acquire(0, 0).is_some();
                prop_assert_eq!(granted, in_window < n, "at {} with {} in the window", now, in_window);
                if granted {
                    grants.push(now);
                } else {
                    let w = e.wait(0, 0).unwrap();
                    let oldest = grants.iter().filter(|&&g| g + span > now).nth((in_window + 1 - n) as usize - 1).copied().unwrap();
                    prop_assert_eq!(nanos(w.wait), oldest + span - now);
                }
            }
            prop_assert!(max_in_any_window(&grants, span) as u64 <= n);
        }

        /// Above the exact log's capacity the window may hold requests back a
        /// little, but never lets more than N into any interval.
        #[test]
        fn a_merged_log_stays_on_the_safe_side(gaps in proptest::collection::vec(0u64..40, 1..4_000)) {
            let clock = ManualClock::new(1_700_000_000 * SEC);
            let n = 3_000;
            let e = engine(&[rolling(n, 60)], &clock);
            let mut grants = Vec::new();
            for gap in gaps {
                clock.advance(Duration::from_millis(gap));
                if e.try_acquire(0, 0).is_some() {
                    grants.push(clock.now());
                }
            }
            prop_assert!(max_in_any_window(&grants, 60 * SEC) as u64 <= n);
        }
    }

    #[test]
    fn the_whole_burst_goes_at_once_and_refills_a_minute_plus_margin_later() {
        let clock = ManualClock::new(1_700_000_000 * SEC);
        let e = engine(&[Limits::nvidia_free_tier()], &clock);
        for i in 0..40 {
            assert!(e.try_acquire(0, 0).is_some(), "grant {i}");
        }
        let w = e.wait(0, 0).unwrap();
        assert_eq!(w.wait, Duration::from_millis(60_500));
        assert_eq!(
            w.cause,
            Cause::Window { unit: Unit::Requests, limit: 40, period: Duration::from_secs(60), daily: false }
        );
        clock.advance(Duration::from_millis(60_499));
        assert!(e.try_acquire(0, 0).is_none());
        clock.advance(Duration::from_millis(1));
        for _ in 0..40 {
            assert!(e.try_acquire(0, 0).is_some());
        }
        assert_eq!(e.remaining_requests(0), 0);
    }

    #[test]
    fn a_burst_below_the_window_shapes_with_gcra() {
        let clock = ManualClock::new(1_700_000_000 * SEC);
        let e = engine(&[Limits { burst: Some(10), ..Limits::nvidia_free_tier() }], &clock);
        for _ in 0..10 {
            assert!(e.try_acquire(0, 0).is_some());
        }
        let w = e.wait(0, 0).unwrap();
        assert_eq!(w.cause, Cause::Shaper);
        assert_eq!(w.wait, Duration::from_micros(1_512_500), "one every (60 s + margin) / 40");
        clock.advance(w.wait);
        assert!(e.try_acquire(0, 0).is_some());
        assert!(e.try_acquire(0, 0).is_none());
    }

    #[test]
    fn a_day_resets_at_midnight_in_the_zone_not_24_hours_later() {
        // 2026-03-08 is 23 hours long in Los Angeles.
        let clock = ManualClock::at("2026-03-08T07:30:00Z").unwrap(); // 23:30 PST on the 7th
        let la: crate::Reset = "00:00 America/Los_Angeles".parse().unwrap();
        let e =
            engine(&[Limits { requests_per_day: Some(2), day_reset: Some(la), ..Limits::default() }], &clock);
        assert!(e.try_acquire(0, 0).is_some() && e.try_acquire(0, 0).is_some());
        let w = e.wait(0, 0).unwrap();
        assert_eq!(w.wait, Duration::from_secs(30 * 60), "resets at 08:00Z, midnight PST");
        assert!(matches!(w.cause, Cause::Window { daily: true, limit: 2, .. }));
        clock.advance(w.wait);
        assert!(e.try_acquire(0, 0).is_some() && e.try_acquire(0, 0).is_some());
        // The next midnight is 23 h later (PDT from 02:00 on the 8th).
        assert_eq!(e.wait(0, 0).unwrap().wait, Duration::from_secs(23 * 3600));
        let report = e.report(0);
        assert_eq!(report[0].reset, "00:00 America/Los_Angeles");
        assert_eq!((report[0].limit, report[0].used, report[0].remaining), (2, 2, 0));
    }

    #[test]
    fn tokens_are_reserved_then_replaced_by_the_reported_usage() {
        let clock = ManualClock::new(1_700_000_000 * SEC);
        let e = engine(
            &[Limits { tokens_per_minute: Some(1_000), margin: Some(Duration::ZERO), ..Limits::default() }],
            &clock,
        );
        let a = e.try_acquire(0, 600).unwrap();
        let b = e.try_acquire(0, 300).unwrap();
        assert_eq!(e.report(0)[0].used, 900, "reservations count");
        let c = e.try_acquire(0, 500).unwrap(); // 900 < 1000: admitted while below the limit
        assert!(e.try_acquire(0, 1).is_none(), "1400 reserved ≥ 1000");
        assert_eq!(
            e.wait(0, 1).unwrap().cause,
            Cause::Window { unit: Unit::Tokens, limit: 1_000, period: Duration::from_secs(60), daily: false }
        );
        a.finish(Some(100)); // used 100 of the 600 reserved
        b.finish(Some(50));
        assert_eq!(e.report(0)[0].used, 650, "100 + 50 used, 500 still reserved");
        assert!(e.try_acquire(0, 10).is_some());
        drop(c); // no usage reported: the reservation counts as used
        assert_eq!(e.report(0)[0].used, 660);
        clock.advance(Duration::from_secs(60));
        assert_eq!(e.report(0)[0].used, 0);
    }

    #[test]
    fn keys_of_one_account_share_its_budget() {
        let clock = ManualClock::new(1_700_000_000 * SEC);
        let account = Limits { requests_per_minute: Some(3), ..Limits::default() }.compile().unwrap();
        let own = Limits { requests_per_minute: Some(1), ..Limits::default() }.compile().unwrap();
        let name: Arc<str> = "alice".into();
        let e = QuotaEngine::new(
            [
                KeyBudget { account: Some((Arc::clone(&name), account.clone())), ..KeyBudget::default() },
                KeyBudget { own: Some(own), account: Some((name, account)), ..KeyBudget::default() },
                KeyBudget::default(),
            ],
            clock.clone(),
        );
        assert_eq!(e.account(0), Some("alice"));
        assert!(e.try_acquire(1, 0).is_some());
        assert!(e.try_acquire(1, 0).is_none(), "key 1's own limit of one");
        assert!(e.try_acquire(0, 0).is_some() && e.try_acquire(0, 0).is_some());
        assert!(e.try_acquire(0, 0).is_none(), "the account's three are spent by both keys");
        for _ in 0..100 {
            assert!(e.try_acquire(2, 0).is_some(), "a key without limits is never held back");
        }
        let r = e.report(1);
        assert_eq!(
            r.iter().map(|l| (l.scope, l.used)).collect::<Vec<_>>(),
            [(Scope::Key, 1), (Scope::Account, 3)]
        );
    }

    #[test]
    fn max_concurrent_holds_requests_in_flight() {
        let clock = ManualClock::new(1_700_000_000 * SEC);
        let e = engine(&[Limits { max_concurrent: Some(2), ..Limits::default() }], &clock);
        let a = e.try_acquire(0, 0).unwrap();
        let _b = e.try_acquire(0, 0).unwrap();
        assert!(e.try_acquire(0, 0).is_none());
        assert_eq!(e.wait(0, 0).unwrap(), Wait { wait: POLL, cause: Cause::Concurrency });
        a.finish(None);
        assert!(e.try_acquire(0, 0).is_some());
    }

    #[test]
    fn announced_limits_and_resets_steer_the_key() {
        let clock = ManualClock::new(1_700_000_000 * SEC);
        let e = engine(&[Limits { requests_per_day: Some(1000), ..Limits::nvidia_free_tier() }], &clock);
        // Ambiguous without a period (two request windows): limit ignored.
        e.learn(
            0,
            &Announced { unit: Unit::Requests, period: None, limit: Some(5), remaining: None, reset: None },
        );
        assert!(e.report(0).iter().all(|l| l.source == Source::Configured));
        e.learn(
            0,
            &Announced {
                unit: Unit::Requests,
                period: Some(Duration::from_secs(86_400)),
                limit: Some(500),
                remaining: Some(0),
                reset: Some(Duration::from_secs(7)),
            },
        );
        let day = e.report(0).into_iter().find(|l| l.period == Some(Duration::from_secs(86_400))).unwrap();
        assert_eq!((day.limit, day.source), (500, Source::Learned));
        assert!(e.try_acquire(0, 0).is_none());
        assert_eq!(e.wait(0, 0).unwrap(), Wait { wait: Duration::from_secs(7), cause: Cause::Announced });
        assert_eq!(e.blocked_for(0), Duration::from_secs(7));
        clock.advance(Duration::from_secs(7));
        assert!(e.try_acquire(0, 0).is_some());
        e.block(0, Duration::from_secs(3));
        e.forget_learned(0);
        assert!(e.try_acquire(0, 0).is_some(), "a reset clears what was learned");
        assert!(e.report(0).iter().all(|l| l.source == Source::Configured));
    }

    #[test]
    fn a_reload_keeps_what_was_spent() {
        let clock = ManualClock::new(1_700_000_000 * SEC);
        let e = engine(&[rolling(3, 60)], &clock);
        for _ in 0..3 {
            e.try_acquire(0, 0).unwrap();
        }
        let spec = |n| rolling(n, 60).compile().unwrap();
        // The key moves to index 1 and its limit grows to 4; a new key arrives at 0.
        let r = e.reshape([
            KeyBudget { own: Some(spec(3)), ..KeyBudget::default() },
            KeyBudget { own: Some(spec(4)), previous: Some(0), ..KeyBudget::default() },
        ]);
        assert_eq!(r.remaining_requests(0), 3);
        assert_eq!(r.remaining_requests(1), 1, "three of four already spent");
    }

    #[test]
    fn saved_windows_come_back_after_a_restart() {
        let clock = ManualClock::at("2026-11-30T12:00:00Z").unwrap();
        let limits = Limits {
            requests_per_day: Some(100),
            day_reset: Some("00:00 UTC".parse().unwrap()),
            ..Limits::nvidia_free_tier()
        };
        let e = engine(std::slice::from_ref(&limits), &clock);
        for _ in 0..40 {
            e.try_acquire(0, 0).unwrap();
        }
        e.block(0, Duration::from_secs(90));
        let saved = e.save(|i| format!("k{i}"));
        clock.advance(Duration::from_secs(5));
        let fresh = engine(&[limits], &clock);
        fresh.restore(&saved, |i| format!("k{i}"), None);
        assert!(fresh.try_acquire(0, 0).is_none(), "no 41st request after the restart");
        let report = fresh.report(0);
        assert_eq!(report.iter().map(|l| l.used).collect::<Vec<_>>(), [40, 40]);
        assert_eq!(fresh.blocked_for(0), Duration::from_secs(85));
        // A saved day that has reset since is not restored.
        clock.set(ManualClock::at("2026-12-01T00:00:01Z").unwrap().now());
        let next_day = engine(
            &[Limits {
                requests_per_day: Some(100),
                day_reset: Some("00:00 UTC".parse().unwrap()),
                ..Limits::default()
            }],
            &clock,
        );
        next_day.restore(&saved, |i| format!("k{i}"), None);
        assert_eq!(next_day.report(0)[0].used, 0);
    }

    #[test]
    fn after_a_crash_the_restored_windows_err_on_the_safe_side() {
        let clock = ManualClock::at("2026-11-30T12:00:00Z").unwrap();
        let limits = Limits { requests_per_day: Some(100), ..Limits::nvidia_free_tier() };
        let e = engine(std::slice::from_ref(&limits), &clock);
        for _ in 0..5 {
            e.try_acquire(0, 0).unwrap();
        }
        let saved = e.save(|i| format!("k{i}"));
        let saved_at = clock.now();
        clock.advance(Duration::from_secs(5));
        let fresh = engine(std::slice::from_ref(&limits), &clock);
        // Saved every second: grants after `saved_at + 1 s` cannot have been made.
        let crashed_at = saved_at + SEC;
        fresh.restore(&saved, |i| format!("k{i}"), Some(crashed_at));
        // The minute counts as full until a minute (+ margin) after that moment;
        // the day adds the last recorded second once more.
        assert!(fresh.try_acquire(0, 0).is_none());
        assert_eq!(fresh.wait(0, 0).unwrap().wait, Duration::from_millis(60_500 - 4_000));
        // Restarted long after the crash: nothing to wait for.
        clock.advance(Duration::from_secs(3_600));
        let later = engine(&[limits], &clock);
        later.restore(&saved, |i| format!("k{i}"), Some(crashed_at));
        assert!(later.try_acquire(0, 0).is_some(), "an hour later the minute is long over");
        let day =
            fresh.report(0).into_iter().find(|l| l.period == Some(Duration::from_secs(86_400))).unwrap();
        assert_eq!(day.used, 10, "5 saved + the 5 of the last second again");
    }

    #[test]
    fn only_budgets_that_count_tokens_reserve_them_and_never_above_their_limit() {
        let clock = ManualClock::new(1_700_000_000 * SEC);
        let own = Limits { requests_per_minute: Some(100), ..Limits::default() }.compile().unwrap();
        let shared = Limits { tokens_per_minute: Some(1_000), ..Limits::default() }.compile().unwrap();
        let e = QuotaEngine::new(
            [KeyBudget { own: Some(own), account: Some(("acme".into(), shared)), ..KeyBudget::default() }],
            clock.clone(),
        );
        let permit = e.try_acquire(0, u64::MAX).unwrap();
        assert_eq!(permit.reserved(), 1_000, "clamped to the token window");
        let saved = e.save(|_| "k".into());
        let reserved: Vec<(String, u64)> = saved.iter().map(|b| (b.id.clone(), b.reserved)).collect();
        assert_eq!(reserved, [("key:k".to_owned(), 0), ("account:acme".to_owned(), 1_000)]);
        drop(permit);
        let saved = e.save(|_| "k".into());
        assert!(saved.iter().all(|b| b.reserved == 0), "{saved:?}");
        let tokens = e.report(0).into_iter().find(|l| l.kind == LimitKind::Tokens).unwrap();
        assert_eq!(tokens.used, 1_000, "the clamped reservation counted as used");
    }

    #[test]
    fn a_reload_that_changes_a_windows_reset_keeps_what_it_counted() {
        let clock = ManualClock::at("2026-11-30T12:00:00Z").unwrap();
        let rolling_day = Limits { requests_per_day: Some(5), ..Limits::default() };
        let e = engine(&[rolling_day], &clock);
        for _ in 0..5 {
            e.try_acquire(0, 0).unwrap();
        }
        let at_midnight = Limits {
            requests_per_day: Some(5),
            day_reset: Some("00:00 UTC".parse().unwrap()),
            ..Limits::default()
        };
        let r = e.reshape([KeyBudget {
            own: Some(at_midnight.compile().unwrap()),
            previous: Some(0),
            ..KeyBudget::default()
        }]);
        assert!(r.try_acquire(0, 0).is_none(), "no fresh day from a reload");
        assert_eq!(r.report(0)[0].used, 5);
    }

    #[test]
    fn an_absurd_announced_reset_is_capped() {
        let clock = ManualClock::new(1_700_000_000 * SEC);
        let e = engine(&[Limits::nvidia_free_tier()], &clock);
        e.block(0, Duration::from_secs(10 * 365 * 86_400));
        assert_eq!(e.blocked_for(0), MAX_ANNOUNCED_RESET);
    }

    #[test]
    fn grants_and_usage_during_a_reload_reach_the_budget_that_replaced_theirs() {
        let clock = ManualClock::new(1_700_000_000 * SEC);
        let before =
            Limits { requests_per_minute: Some(5), tokens_per_minute: Some(1_000), ..Limits::default() };
        let e = engine(std::slice::from_ref(&before), &clock);
        let permit = e.try_acquire(0, 100).unwrap();
        // The reload changes the budget (a concurrency cap): a new budget takes over.
        let after = Limits { max_concurrent: Some(10), ..before };
        let r = e.reshape([KeyBudget {
            own: Some(after.compile().unwrap()),
            previous: Some(0),
            ..KeyBudget::default()
        }]);
        // A request that still went through the old key set after the copy counts…
        assert!(e.try_acquire(0, 0).is_some());
        let requests = |x: &QuotaEngine<ManualClock>| {
            x.report(0).into_iter().find(|l| l.kind == LimitKind::Requests).unwrap().used
        };
        assert_eq!(requests(&r), 2, "the late grant reached the new budget");
        // …and so does the usage of a request that started before the reload.
        permit.finish(Some(40));
        let tokens = r.report(0).into_iter().find(|l| l.kind == LimitKind::Tokens).unwrap();
        assert_eq!(tokens.used, 40);
    }

    #[test]
    fn a_closed_share_refuses_and_asks_to_look_again_soon() {
        let clock = ManualClock::new(1_700_000_000 * SEC);
        let e = engine(&[Limits::nvidia_free_tier()], &clock);
        e.share().set(2, u64::MAX);
        assert!(e.try_acquire(0, 0).is_none());
        let w = e.wait(0, 0).unwrap();
        assert_eq!((w.wait, w.cause), (POLL, Cause::Share), "no moment known: not centuries");
        e.share().set(2, 0);
        assert!(e.try_acquire(0, 0).is_some());
    }

    #[test]
    fn a_share_takes_its_part_of_every_window_and_waits_until_it_is_free() {
        let clock = ManualClock::new(1_700_000_000 * SEC);
        let e = engine(&[Limits::nvidia_free_tier()], &clock);
        for _ in 0..5 {
            e.try_acquire(0, 0).unwrap();
        }
        // A third of 40 is 13, and not before two seconds from now.
        e.share().set(3, clock.now() + 2 * SEC);
        let w = e.wait(0, 0).unwrap();
        assert_eq!((w.wait, w.cause), (Duration::from_secs(2), Cause::Share));
        assert!(e.try_acquire(0, 0).is_none());
        clock.advance(Duration::from_secs(2));
        // The five taken before count against the share too.
        for i in 0..8 {
            assert!(e.try_acquire(0, 0).is_some(), "grant {i} of the share's 13");
        }
        assert!(e.try_acquire(0, 0).is_none(), "13 taken");
        // What the shared state admitted is charged without a check.
        assert!(e.try_acquire_admitted(0, 0).is_some());
        assert_eq!(e.local_wait(0, 0).unwrap().wait, Duration::ZERO);
        // A reload keeps the share; the whole budget comes back when told.
        let r = e.reshape([KeyBudget {
            own: Some(Limits::nvidia_free_tier().compile().unwrap()),
            previous: Some(0),
            ..KeyBudget::default()
        }]);
        assert!(Arc::ptr_eq(r.share(), e.share()));
        assert!(r.try_acquire(0, 0).is_none());
        r.share().whole();
        assert!(r.try_acquire(0, 0).is_some(), "15 of 40 used");
        // A share of zero never admits.
        r.share().set(41, 0);
        assert_eq!(
            r.wait(0, 0).unwrap().cause,
            Cause::Window { unit: Unit::Requests, limit: 40, period: Duration::from_secs(60), daily: false }
        );
        let mut seen = Vec::new();
        r.request_windows(0, |w| seen.push((w.account.is_some(), w.limit, w.span, w.resets_at)));
        assert_eq!(seen, [(false, 40, Duration::from_millis(60_500), None)]);
    }
}
