use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::key::nanos;
use crate::{Clock, Key, KeySnapshot, KeySpec, MonotonicClock, Outcome};

/// Why a key set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// A secret was empty or only whitespace.
    #[error("key #{index}: the secret is empty")]
    EmptySecret {
        /// Position of the key in the given list.
        index: usize,
    },
    /// A secret holds characters that cannot go into an HTTP header.
    #[error("key #{index} ({label}): the secret contains whitespace or control characters")]
    InvalidSecret {
        /// Position of the key in the given list.
        index: usize,
        /// The masked secret.
        label: String,
    },
    /// The same secret appears twice.
    #[error("key #{index} ({label}) is a duplicate of key #{first}")]
    Duplicate {
        /// Position of the repeated key.
        index: usize,
        /// Position of its first occurrence.
        first: usize,
        /// The masked secret.
        label: String,
    },
}

/// How long keys rest after failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CooldownPolicy {
    /// Rest after a rate limit that came without a `Retry-After` (NVIDIA sends
    /// none). Default 60 s: the reported window is a rolling minute, so a key
    /// that hit it is safe again at most a minute later.
    pub rate_limited: Duration,
    /// Rest after the first transient failure; doubles per consecutive failure.
    /// Default 2 s.
    pub failure_base: Duration,
    /// The longest rest for transient failures. Default 60 s.
    pub failure_max: Duration,
}

impl Default for CooldownPolicy {
    fn default() -> Self {
        Self {
            rate_limited: Duration::from_secs(60),
            failure_base: Duration::from_secs(2),
            failure_max: Duration::from_secs(60),
        }
    }
}

impl CooldownPolicy {
    /// The rest after the `streak`-th consecutive transient failure (0-based):
    /// `failure_base × 2^streak`, at most `failure_max`.
    pub fn failure_cooldown(&self, streak: u32) -> Duration {
        self.failure_base
            .saturating_mul(1u32.checked_shl(streak.min(31)).unwrap_or(u32::MAX))
            .min(self.failure_max)
    }
}

/// One key set and what was built with it.
struct Generation<A> {
    keys: Box<[Arc<Key>]>,
    attachment: A,
}

/// A candidate offered to the accept predicate of [`KeyPool::select_with`].
#[derive(Debug)]
pub struct Candidate<'a, A> {
    /// The key's position in the current key set.
    pub index: usize,
    /// The key.
    pub key: &'a Key,
    /// The attachment built with the current key set (e.g. a rate limiter
    /// indexed by position).
    pub attachment: &'a A,
}

/// A selected key. Holding it keeps the key alive even if a reload removes it.
#[derive(Debug, Clone)]
pub struct Selected {
    index: usize,
    key: Arc<Key>,
}

impl Selected {
    /// The key's position in the key set it was selected from.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The key.
    pub fn key(&self) -> &Key {
        &self.key
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// For each key of the new set, its index in the old set if it was kept.
    pub previous_index: Vec<Option<usize>>,
    /// Keys that are new.
    pub added: usize,
    /// Keys that stayed (their counters and cooldowns carried over).
    pub kept: usize,
    /// Keys that are gone.
    pub removed: usize,
}

/// A pool of API keys with round-robin selection, failover and hot reload.
///
/// # Selecting
///
/// [`select_with`](Self::select_with) starts at a shared cursor and offers keys
/// in order to a predicate, skipping keys that are cooling down or disabled; the
/// first key the predicate accepts is returned. With every key usable this is one
/// `fetch_add`, one load and the predicate: O(1), lock-free, allocation-free.
///
/// # Attachments
///
/// `A` is data built together with each key set, indexed like it — typically a
/// rate limiter with one slot per key. It is swapped atomically with the keys on
/// reload, so a predicate never sees a key paired with another key's limiter.
/// Pools that need nothing use `A = ()`.
///
/// # Reloading
///
/// [`reload`](Self::reload) publishes a new key set while selections go on.
/// Keys are matched by secret: those that stay keep their counters and
/// cooldowns (a reload does re-enable disabled keys); removed keys are no longer
/// offered from the moment the call returns.
pub struct KeyPool<A = ()> {
    current: ArcSwap<Generation<A>>,
    cursor: AtomicUsize,
    reloads: AtomicU64,
    policy: CooldownPolicy,
    clock: Arc<dyn Clock>,
}

impl KeyPool<()> {
    /// A pool over `keys` with the default cooldown policy and the real clock.
    ///
    /// # Errors
    /// An empty, malformed or duplicate secret (the error names its position).
    pub fn new(keys: impl IntoIterator<Item = KeySpec>) -> Result<Self, PoolError> {
        KeyPool::builder().build(keys, |_| ())
    }

    /// A builder for a pool with a custom policy, clock or attachment (the
    /// attachment type is chosen by [`KeyPoolBuilder::build`]).
    pub fn builder() -> KeyPoolBuilder {
        KeyPoolBuilder { policy: CooldownPolicy::default(), clock: Arc::new(MonotonicClock::new()) }
    }
}

/// Builds a [`KeyPool`] with a chosen policy and clock.
#[derive(Debug, Clone)]
pub struct KeyPoolBuilder {
    policy: CooldownPolicy,
    clock: Arc<dyn Clock>,
}

impl KeyPoolBuilder {
    /// Sets the cooldown policy.
    pub fn policy(mut self, policy: CooldownPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets the clock (e.g. a [`ManualClock`](crate::ManualClock) in tests).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Builds the pool; `attach` builds the attachment for the key set (see
    /// [`KeyPool`]), given the keys in order.
    ///
    /// # Errors
    /// An empty, malformed or duplicate secret (the error names its position).
    pub fn build<A>(
        self,
        keys: impl IntoIterator<Item = KeySpec>,
        attach: impl FnOnce(&[Arc<Key>]) -> A,
    ) -> Result<KeyPool<A>, PoolError> {
        let specs = validate(keys)?;
        let keys: Box<[Arc<Key>]> =
            specs.into_iter().map(|s| Arc::new(Key::new(s, Arc::default()))).collect();
        let attachment = attach(&keys);
        Ok(KeyPool {
            current: ArcSwap::from_pointee(Generation { keys, attachment }),
            cursor: AtomicUsize::new(0),
            reloads: AtomicU64::new(0),
            policy: self.policy,
            clock: self.clock,
        })
    }
}

/// Checks a key set as [`KeyPoolBuilder::build`] and [`KeyPool::reload`]
/// would (no empty, whitespace or duplicate secret), without building
/// anything: to refuse a reload of several pools before any of them swaps.
///
/// # Errors
/// The first key that would be refused.
pub fn check_keys<'a>(keys: impl IntoIterator<Item = &'a KeySpec>) -> Result<(), PoolError> {
    validate(keys.into_iter().cloned()).map(drop)
}

fn validate(keys: impl IntoIterator<Item = KeySpec>) -> Result<Vec<KeySpec>, PoolError> {
    let specs: Vec<KeySpec> = keys.into_iter().collect();
    let mut seen: HashMap<&str, usize> = HashMap::with_capacity(specs.len());
    for (index, spec) in specs.iter().enumerate() {
        let secret = spec.secret.expose();
        if secret.trim().is_empty() {
            return Err(PoolError::EmptySecret { index });
        }
        if secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(PoolError::InvalidSecret { index, label: spec.secret.masked() });
        }
        if let Some(&first) = seen.get(secret) {
            return Err(PoolError::Duplicate { index, first, label: spec.secret.masked() });
        }
        seen.insert(secret, index);
    }
    Ok(specs)
}

impl<A> KeyPool<A> {
    /// Number of keys in the current set.
    pub fn len(&self) -> usize {
        self.current.load().keys.len()
    }

    /// `true` when the current set has no keys.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cooldown policy.
    pub fn policy(&self) -> &CooldownPolicy {
        &self.policy
    }

    /// How many times the key set was replaced.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    fn now_ns(&self) -> u64 {
        nanos(self.clock.now())
    }

    /// Selects the next usable key that `accept` agrees to.
    ///
    /// Keys are offered in round-robin order from a shared cursor; keys cooling
    /// down or disabled are skipped without asking `accept`. Each key is offered
    /// at most once per call, so the search is bounded by the pool size. The
    /// chosen key's `requests` counter is incremented (it counts attempts).
    ///
    /// `accept` should test cheap conditions first and consume a rate-limit
    /// permit last: a permit taken for a key that is then not used is lost.
    ///
    /// Returns `None` when no key is usable or accepted.
    #[inline]
    pub fn select_with(&self, mut accept: impl FnMut(&Candidate<'_, A>) -> bool) -> Option<Selected> {
        let generation = self.current.load();
        let keys = &generation.keys;
        let n = keys.len();
        if n == 0 {
            return None;
        }
        let ticket = self.cursor.fetch_add(1, Ordering::Relaxed);
        let start = ticket % n;
        let mut now = None;
        let mut clock = || *now.get_or_insert_with(|| self.now_ns());
        for step in 0..n {
            let mut index = start + step;
            if index >= n {
                index -= n;
            }
            let key = &keys[index];
            if !key.state.usable(&mut clock) {
                continue;
            }
            if !accept(&Candidate { index, key, attachment: &generation.attachment }) {
                continue;
            }
            if step > 0 {
                // We skipped `step` keys: move the cursor past the chosen one so the
                // next caller does not land on the same key (best effort: if another
                // caller moved the cursor meanwhile, leave it).
                let _ = self.cursor.compare_exchange(
                    ticket.wrapping_add(1),
                    ticket.wrapping_add(1 + step),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            key.state.requests.fetch_add(1, Ordering::Relaxed);
            return Some(Selected { index, key: Arc::clone(key) });
        }
        None
    }

    /// Selects the key at `index` if it is usable and `accept` agrees,
    /// without moving the round-robin cursor: for a choice made elsewhere
    /// among candidates offered in round-robin order (a shared admission).
    /// The key's `requests` counter is incremented.
    pub fn select_at(
        &self,
        index: usize,
        accept: impl FnOnce(&Candidate<'_, A>) -> bool,
    ) -> Option<Selected> {
        let generation = self.current.load();
        let key = generation.keys.get(index)?;
        let now = self.now_ns();
        if !key.state.usable(&mut || now) {
            return None;
        }
        if !accept(&Candidate { index, key, attachment: &generation.attachment }) {
            return None;
        }
        key.state.requests.fetch_add(1, Ordering::Relaxed);
        Some(Selected { index, key: Arc::clone(key) })
    }

    /// The state of a selected key now (after [`report`](Self::report): the
    /// cooldown or disable the outcome caused).
    pub fn status_of(&self, key: &Selected) -> crate::KeyStatus {
        key.key.state.status(self.now_ns())
    }

    /// [`select_with`](Self::select_with) with a predicate that accepts every usable key.
    pub fn select(&self) -> Option<Selected> {
        self.select_with(|_| true)
    }

    /// Records what happened with a selected key (see [`Outcome`]).
    pub fn report(&self, key: &Selected, outcome: Outcome) {
        key.key.state.record(outcome, self.now_ns(), &self.policy);
    }

    /// Makes the key at `index` usable again now (clears a cooldown or a
    /// disable). Returns `false` if there is no such key.
    pub fn enable(&self, index: usize) -> bool {
        match self.current.load().keys.get(index) {
            Some(key) => {
                key.state.enable();
                true
            }
            None => false,
        }
    }

    /// Puts the key at `index` back into a state saved earlier (after a
    /// restart): a cooldown for its `remaining` time with its reason, or
    /// disabled. A cooldown never shortens one already running. Returns
    /// `false` if there is no such key.
    pub fn restore(&self, index: usize, status: crate::KeyStatus) -> bool {
        let Some(key) = self.current.load().keys.get(index).cloned() else { return false };
        key.state.restore(status, self.now_ns());
        true
    }

    /// Time until the first key that is cooling down becomes usable: `Some(ZERO)`
    /// if a key is usable now, `None` if every key is disabled (or there are none).
    pub fn time_to_usable(&self) -> Option<Duration> {
        let now = self.now_ns();
        self.current
            .load()
            .keys
            .iter()
            .filter_map(|k| match k.state.status(now) {
                crate::KeyStatus::Ready => Some(Duration::ZERO),
                crate::KeyStatus::CoolingDown { remaining, .. } => Some(remaining),
                crate::KeyStatus::Disabled => None,
            })
            .min()
    }

    /// Time until some key could be selected, given `extra` — the time each
    /// candidate needs beyond its cooldown (e.g. until its rate limiter has a
    /// permit), or `None` to leave a candidate out. Disabled keys are left out.
    /// Returns `None` when no key is left. Used to decide how long a queued
    /// request sleeps; O(keys).
    pub fn time_to_selectable(
        &self,
        mut extra: impl FnMut(&Candidate<'_, A>) -> Option<Duration>,
    ) -> Option<Duration> {
        let now = self.now_ns();
        let generation = self.current.load();
        generation
            .keys
            .iter()
            .enumerate()
            .filter_map(|(index, key)| {
                let cooldown = match key.state.status(now) {
                    crate::KeyStatus::Ready => Duration::ZERO,
                    crate::KeyStatus::CoolingDown { remaining, .. } => remaining,
                    crate::KeyStatus::Disabled => return None,
                };
                let more = extra(&Candidate { index, key, attachment: &generation.attachment })?;
                Some(cooldown.max(more))
            })
            .min()
    }

    /// Every key's state and counters, in pool order. Contains no secrets.
    pub fn snapshot(&self) -> Vec<KeySnapshot> {
        let now = self.now_ns();
        self.current
            .load()
            .keys
            .iter()
            .enumerate()
            .map(|(index, k)| KeySnapshot {
                index,
                label: k.label().to_owned(),
                name: k.name().map(str::to_owned),
                status: k.state.status(now),
                counters: k.state.counters(),
                rate: k.rate(),
            })
            .collect()
    }

    /// Runs `f` with the current keys and attachment (e.g. to read a limiter's
    /// remaining capacity for stats). Do not hold on to them: call again instead.
    pub fn with_current<R>(&self, f: impl FnOnce(&[Arc<Key>], &A) -> R) -> R {
        let generation = self.current.load();
        f(&generation.keys, &generation.attachment)
    }

    /// Replaces the key set while selections go on.
    ///
    /// Keys whose secret is in both sets keep their counters, cooldowns and
    /// disabled state ([`enable`](Self::enable) clears it); their name and rate override come
    /// from the new spec. `attach` builds the new attachment; it gets the new
    /// keys and, for each, its index in the old set (so a limiter can carry the
    /// state of keys that stay).
    ///
    /// # Errors
    /// The new set is validated like in [`KeyPool::new`]; on error the old set
    /// keeps serving.
    pub fn reload(
        &self,
        keys: impl IntoIterator<Item = KeySpec>,
        attach: impl FnOnce(&[Arc<Key>], &[Option<usize>]) -> A,
    ) -> Result<ReloadReport, PoolError> {
        let specs = validate(keys)?;
        let old = self.current.load_full();
        let by_secret: HashMap<&str, usize> =
            old.keys.iter().enumerate().map(|(i, k)| (k.secret().expose(), i)).collect();
        let mut previous_index = Vec::with_capacity(specs.len());
        let keys: Box<[Arc<Key>]> = specs
            .into_iter()
            .map(|spec| {
                let prev = by_secret.get(spec.secret.expose()).copied();
                previous_index.push(prev);
                let state = match prev {
                    Some(i) => Arc::clone(&old.keys[i].state),
                    None => Arc::default(),
                };
                Arc::new(Key::new(spec, state))
            })
            .collect();
        let attachment = attach(&keys, &previous_index);
        let kept = previous_index.iter().filter(|p| p.is_some()).count();
        let report =
            ReloadReport { added: keys.len() - kept, kept, removed: old.keys.len() - kept, previous_index };
        self.current.store(Arc::new(Generation { keys, attachment }));
        self.reloads.fetch_add(1, Ordering::Relaxed);
        Ok(report)
    }
}

impl<A> fmt::Debug for KeyPool<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let generation = self.current.load();
        f.debug_struct("KeyPool")
            .field("keys", &generation.keys)
            .field("policy", &self.policy)
            .field("reloads", &self.reloads())
            .finish_non_exhaustive()
    }
}
