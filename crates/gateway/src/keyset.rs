//! One generation of keys: the keys themselves (in the [`KeyPool`]) and what is
//! built with them and indexed like them — a rate-limit slot, the prebuilt
//! `Authorization` value and the metric handles per key. Built together and
//! swapped together on reload, so an index never pairs one key with another
//! key's limiter or header.

use std::sync::Arc;

use http::HeaderValue;
use proxypal_keypool::{Key, KeyPool, KeyPoolBuilder, KeySpec, RateOverride, ReloadReport};
use proxypal_limiter::{GovernorLimiter, KeyQuota, RateLimit};

use crate::metrics::{KeyMetrics, Metrics};

/// Why a key set (so a gateway) could not be built, or a reload was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The key set was refused (empty, malformed or duplicate secret).
    #[error("keys: {0}")]
    Keys(#[from] proxypal_keypool::PoolError),
    /// A key cannot go into an HTTP header.
    #[error("keys[{index}]: {source}")]
    KeyHeader {
        /// Position of the key.
        index: usize,
        /// What is wrong (never contains the key).
        source: proxypal_upstream::InvalidKey,
    },
    /// A key's rate limit is invalid.
    #[error("{field}: {source}")]
    Quota {
        /// Where, e.g. `keys[2]`.
        field: String,
        /// What is wrong.
        source: proxypal_limiter::QuotaError,
    },
}

/// What each key set carries besides the keys, by key index: a limiter
/// slot, the prebuilt `Authorization` value and metric handles (private to
/// the gateway: the pool's attachment, opaque to readers of
/// [`Gateway::keys`](crate::Gateway::keys)).
pub struct KeyResources {
    /// One rate-limit slot per key.
    pub(crate) limiter: Arc<dyn RateLimit>,
    /// `Authorization: Bearer <key>` per key, built once (sensitive header values).
    pub(crate) auth: Box<[HeaderValue]>,
    /// Metric handles per key, resolved once per key set.
    pub(crate) metrics: Box<[Arc<KeyMetrics>]>,
}

impl std::fmt::Debug for KeyResources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyResources").field("limiter", &self.limiter).finish_non_exhaustive()
    }
}

impl KeyResources {
    /// Resources that match no key, for the error path of building them: the
    /// pool is dropped (on build) or never swapped in (reload checks first).
    fn unusable() -> Self {
        Self { limiter: Arc::new(GovernorLimiter::new([])), auth: Box::new([]), metrics: Box::new([]) }
    }
}

/// A key's effective quota: its own `requests_per_minute`/`burst` where set,
/// else `default`'s, with `default`'s margin.
pub(crate) fn quota(rate: RateOverride, index: usize, default: KeyQuota) -> Result<KeyQuota, BuildError> {
    KeyQuota::new(
        rate.requests_per_minute.unwrap_or(default.requests_per_minute()),
        rate.burst.unwrap_or(default.burst()),
    )
    .and_then(|q| q.with_margin(default.margin()))
    .map_err(|source| BuildError::Quota { field: format!("keys[{index}]"), source })
}

/// Checks what [`resources`] would refuse, before anything is swapped.
fn check(specs: &[KeySpec], default: KeyQuota) -> Result<(), BuildError> {
    for (index, spec) in specs.iter().enumerate() {
        quota(spec.rate, index, default)?;
        proxypal_upstream::bearer(spec.secret.expose())
            .map_err(|source| BuildError::KeyHeader { index, source })?;
    }
    Ok(())
}

fn resources(
    metrics: &Metrics,
    keys: &[Arc<Key>],
    default: KeyQuota,
    limiter: impl FnOnce(&[(Option<usize>, KeyQuota)]) -> Arc<dyn RateLimit>,
    previous: &[Option<usize>],
) -> Result<KeyResources, BuildError> {
    let mut layout = Vec::with_capacity(keys.len());
    let mut auth = Vec::with_capacity(keys.len());
    for (index, key) in keys.iter().enumerate() {
        layout.push((previous.get(index).copied().flatten(), quota(key.rate(), index, default)?));
        auth.push(
            proxypal_upstream::bearer(key.secret().expose())
                .map_err(|source| BuildError::KeyHeader { index, source })?,
        );
    }
    let key_metrics = keys.iter().map(|k| metrics.for_key(k.label())).collect();
    Ok(KeyResources { limiter: limiter(&layout), auth: auth.into_boxed_slice(), metrics: key_metrics })
}

/// Builds the pool over `specs` (with `builder`'s policy and clock) and a
/// fresh limiter from `limiter`, given each key's quota in order.
pub(crate) fn build(
    builder: KeyPoolBuilder,
    specs: Vec<KeySpec>,
    default: KeyQuota,
    metrics: &Metrics,
    limiter: impl FnOnce(Vec<KeyQuota>) -> Arc<dyn RateLimit>,
) -> Result<KeyPool<KeyResources>, BuildError> {
    let mut built = Ok(());
    let pool = builder.build(specs, |keys| {
        let fresh = |layout: &[(Option<usize>, KeyQuota)]| limiter(layout.iter().map(|(_, q)| *q).collect());
        resources(metrics, keys, default, fresh, &[]).unwrap_or_else(|e| {
            built = Err(e);
            KeyResources::unusable()
        })
    })?;
    built?;
    Ok(pool)
}

/// Swaps in a new key set: keys that stay keep their counters, cooldowns and
/// spent permits (the limiter is reshaped, not rebuilt).
pub(crate) fn reload(
    pool: &KeyPool<KeyResources>,
    specs: Vec<KeySpec>,
    default: KeyQuota,
    metrics: &Metrics,
) -> Result<ReloadReport, BuildError> {
    // Every quota and header first: once the pool swaps, there is no going back.
    check(&specs, default)?;
    let mut built = Ok(());
    let report = pool.reload(specs, |keys, previous| {
        let reshape = |layout: &[(Option<usize>, KeyQuota)]| -> Arc<dyn RateLimit> {
            pool.with_current(|_, old| old.limiter.reshaped(layout))
        };
        resources(metrics, keys, default, reshape, previous).unwrap_or_else(|e| {
            built = Err(e);
            KeyResources::unusable()
        })
    })?;
    built?; // unreachable after `check`, kept so an error is never dropped
    Ok(report)
}
