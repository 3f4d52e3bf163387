//! One generation of keys: the keys themselves (in the [`KeyPool`]) and what is
//! built with them and indexed like them — the quota engine's budgets, the
//! prebuilt `Authorization` value and the metric handles per key. Built
//! together and swapped together on reload, so an index never pairs one key
//! with another key's budget or header.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::HeaderValue;
use proxypal_keypool::{Key, KeyPool, KeyPoolBuilder, ReloadReport};
use proxypal_limiter::{BudgetSpec, KeyBudget, LimitError, Limits, QuotaClock, QuotaEngine, SystemClock};

use crate::config::{Auth, KeyConfig, ProviderConfig};
use crate::metrics::{KeyMetrics, Metrics};
use crate::preset::QuotaScope;

/// The clock the gateway's quota engine runs on (the system clock, or a
/// test's).
pub type SharedClock = Arc<dyn QuotaClock>;

/// The gateway's quota engine.
pub type Engine = QuotaEngine<SharedClock>;

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
    /// Limits that do not make a budget.
    #[error("{scope}.{source}")]
    Limits {
        /// Where: `limits`, `accounts.<name>` or `keys[<i>]`.
        scope: String,
        /// What is wrong, naming the field.
        source: LimitError,
    },
    /// A key's own limit allows more than its account's.
    #[error(
        "keys[{index}]: its {what} limit ({own}) is above account {account:?}'s ({shared}); a key cannot allow more than the account it shares"
    )]
    AboveAccount {
        /// Position of the key.
        index: usize,
        /// The account.
        account: String,
        /// Which window, e.g. `requests per 60s`.
        what: String,
        /// The key's limit.
        own: u64,
        /// The account's limit.
        shared: u64,
    },
    /// Something wrong in one provider of several.
    #[error("providers.{provider}.{source}")]
    Provider {
        /// The provider's name.
        provider: String,
        /// What is wrong in it.
        source: Box<BuildError>,
    },
    /// A provider's upstream client cannot be built (its base URL, its CA file).
    #[error("upstream: {0}")]
    Upstream(#[from] proxypal_upstream::UpstreamBuildError),
    /// Providers, aliases or routing that do not fit together.
    #[error("{field}: {reason}")]
    Routes {
        /// Where, e.g. `models.llama-70b.targets[1].provider`.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

impl BuildError {
    /// This error as one of provider `name`'s, out of `count` providers: a
    /// lone provider called `default` (a single-provider configuration) is
    /// not named, so its messages stay what they were.
    pub(crate) fn in_provider(self, name: &str, count: usize) -> Self {
        if count == 1 && name == crate::config::DEFAULT_PROVIDER {
            return self;
        }
        BuildError::Provider { provider: name.to_owned(), source: Box::new(self) }
    }
}

/// What each key set carries besides the keys, by key index: the quota
/// engine, the prebuilt `Authorization` value and metric handles (private to
/// the gateway: the pool's attachment, opaque to readers of
/// [`Provider::keys`](crate::Provider::keys)).
pub struct KeyResources {
    /// Budgets per key (and account).
    pub(crate) quotas: Arc<Engine>,
    /// `Authorization: Bearer <key>` per key, built once (sensitive header values).
    pub(crate) auth: Box<[HeaderValue]>,
    /// Metric handles per key, resolved once per key set.
    pub(crate) metrics: Box<[Arc<KeyMetrics>]>,
    /// Each key's [`fingerprint`](crate::state::fingerprint): its name in
    /// Redis and in saved state.
    pub(crate) fingerprints: Box<[Arc<str>]>,
}

impl KeyResources {
    /// Key `index`'s fingerprint (empty for an unknown index).
    pub(crate) fn fingerprint(&self, index: usize) -> Arc<str> {
        self.fingerprints.get(index).cloned().unwrap_or_else(|| Arc::from(""))
    }
}

impl std::fmt::Debug for KeyResources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyResources").field("quotas", &self.quotas).finish_non_exhaustive()
    }
}

impl KeyResources {
    /// Resources that match no key, for the error path of building them: the
    /// pool is dropped (on build) or never swapped in (reload checks first).
    fn unusable() -> Self {
        let clock: SharedClock = Arc::new(SystemClock::new());
        Self {
            quotas: Arc::new(QuotaEngine::new([], clock)),
            auth: Box::new([]),
            metrics: Box::new([]),
            fingerprints: Box::new([]),
        }
    }
}

/// The limits of one generation of one provider's keys, compiled and checked.
pub(crate) struct Plan {
    budgets: Vec<KeyBudget>,
    /// The keys the pool holds (for `auth: none`, one stand-in key).
    keys: Vec<KeyConfig>,
    auth: Auth,
}

/// The account name a provider's account has in the quota engine: as
/// configured in the provider `default` (so saved state stays valid),
/// `<provider>/<account>` in any other.
fn account_id(provider: &str, account: &str) -> String {
    if provider == crate::config::DEFAULT_PROVIDER {
        account.to_owned()
    } else {
        format!("{provider}/{account}")
    }
}

impl Plan {
    /// Compiles every key's budgets: `limits` under each account's fields,
    /// `limits` under a lone key's own fields, a shared key's own fields
    /// alone. With `quota_scope: account`, keys without an account share the
    /// provider's one budget.
    pub(crate) fn new(provider: &ProviderConfig) -> Result<Self, BuildError> {
        let limits = &provider.limits;
        let keys = match provider.auth {
            Auth::Bearer => provider.keys.clone(),
            // One stand-in key, so that the provider's limits still have a budget.
            Auth::None => {
                let mut spec = proxypal_keypool::KeySpec::new(format!("proxypal-no-auth:{}", provider.name));
                spec.name = Some(provider.name.clone());
                vec![KeyConfig::new(spec)]
            }
        };
        let compile = |limits: &Limits, scope: &dyn Fn() -> String| {
            limits.compile().map_err(|source| BuildError::Limits { scope: scope(), source })
        };
        compile(limits, &|| "limits".to_owned())?;
        let mut shared: BTreeMap<&str, (Arc<str>, BudgetSpec)> = BTreeMap::new();
        for (name, over) in &provider.accounts {
            let spec = compile(&limits.overlay(over), &|| format!("accounts.{name}"))?;
            shared.insert(name, (Arc::from(account_id(&provider.name, name)), spec));
        }
        // The provider-wide budget of `quota_scope: account`.
        let whole = match provider.quota_scope {
            // `<provider>/*`: apart from any configured account's name.
            QuotaScope::Account => Some((
                Arc::<str>::from(format!("{}/*", provider.name)),
                compile(limits, &|| "limits".to_owned())?,
            )),
            _ => None,
        };
        let mut budgets = Vec::with_capacity(keys.len());
        for (index, key) in keys.iter().enumerate() {
            let own_limits = key.own_limits();
            let scope = || format!("keys[{index}]");
            let account = match (&key.account, &whole) {
                (Some(name), _) => Some((
                    name.as_str(),
                    match shared.get(name.as_str()) {
                        Some(account) => account.clone(),
                        None => (
                            Arc::from(account_id(&provider.name, name)),
                            compile(limits, &|| "limits".to_owned())?,
                        ),
                    },
                )),
                (None, Some(whole)) => Some((provider.name.as_str(), whole.clone())),
                (None, None) => None,
            };
            let budget = match account {
                None => KeyBudget {
                    own: Some(compile(&limits.overlay(&own_limits), &scope)?),
                    ..KeyBudget::default()
                },
                Some((name, account)) => {
                    let own = if own_limits.is_empty() {
                        None
                    } else {
                        // The account's margin unless the key sets its own.
                        let mut with_margin = own_limits;
                        with_margin.margin = with_margin.margin.or(limits.margin);
                        let own = compile(&with_margin, &scope)?;
                        check_below(index, name, &own, &account.1)?;
                        Some(own)
                    };
                    KeyBudget { own, account: Some(account), ..KeyBudget::default() }
                }
            };
            budgets.push(budget);
        }
        check_headers(&keys, provider.auth)?;
        // What the pool would refuse, refused now: a reload of several providers
        // must not swap some pools and then fail on another.
        proxypal_keypool::check_keys(keys.iter().map(|k| &k.spec))?;
        Ok(Self { budgets, keys, auth: provider.auth })
    }
}

/// A key's own window may not allow more than its account's window of the
/// same unit and period (it would be a limit that never applies, and a sign
/// of a mistaken config).
fn check_below(index: usize, account: &str, own: &BudgetSpec, shared: &BudgetSpec) -> Result<(), BuildError> {
    for (unit, period, own_limit) in own.windows() {
        let above = shared.windows().find(|(u, p, limit)| *u == unit && *p == period && own_limit > *limit);
        if let Some((_, _, shared_limit)) = above {
            return Err(BuildError::AboveAccount {
                index,
                account: account.to_owned(),
                what: format!("{} per {}s", unit.as_str(), period.as_secs()),
                own: own_limit,
                shared: shared_limit,
            });
        }
    }
    Ok(())
}

/// The `Authorization` value of a key: `Bearer <key>`, or empty (none sent)
/// for a provider without auth.
fn auth_header(key: &str, auth: Auth) -> Result<HeaderValue, proxypal_upstream::InvalidKey> {
    match auth {
        Auth::Bearer => proxypal_upstream::bearer(key),
        Auth::None => Ok(HeaderValue::from_static("")),
    }
}

/// Checks what [`resources`] would refuse, before anything is swapped.
fn check_headers(keys: &[KeyConfig], auth: Auth) -> Result<(), BuildError> {
    for (index, key) in keys.iter().enumerate() {
        auth_header(key.spec.secret.expose(), auth)
            .map_err(|source| BuildError::KeyHeader { index, source })?;
    }
    Ok(())
}

fn resources(
    metrics: &Metrics,
    provider: &str,
    auth: Auth,
    keys: &[Arc<Key>],
    quotas: Arc<Engine>,
) -> Result<KeyResources, BuildError> {
    let mut headers = Vec::with_capacity(keys.len());
    for (index, key) in keys.iter().enumerate() {
        headers.push(
            auth_header(key.secret().expose(), auth)
                .map_err(|source| BuildError::KeyHeader { index, source })?,
        );
    }
    let key_metrics = keys.iter().map(|k| metrics.for_key(provider, k.label())).collect();
    let fingerprints =
        keys.iter().map(|k| Arc::from(crate::state::fingerprint(k.secret().expose()))).collect();
    Ok(KeyResources { quotas, auth: headers.into_boxed_slice(), metrics: key_metrics, fingerprints })
}

/// Builds provider `provider`'s pool over the plan's keys (with `builder`'s
/// policy and clock) and a fresh quota engine on `clock`.
pub(crate) fn build(
    builder: KeyPoolBuilder,
    provider: &str,
    plan: Plan,
    metrics: &Metrics,
    clock: SharedClock,
) -> Result<KeyPool<KeyResources>, BuildError> {
    let specs = plan.keys.into_iter().map(|k| k.spec).collect::<Vec<_>>();
    let mut built = Ok(());
    let engine = Arc::new(QuotaEngine::new(plan.budgets, clock));
    let auth = plan.auth;
    let pool = builder.build(specs, |keys| {
        resources(metrics, provider, auth, keys, engine).unwrap_or_else(|e| {
            built = Err(e);
            KeyResources::unusable()
        })
    })?;
    built?;
    Ok(pool)
}

/// Swaps in a new key set: keys that stay keep their counters, cooldowns and
/// spent windows (the engine is reshaped, not rebuilt). The plan checked
/// every header already: once the pool swaps, there is no going back.
pub(crate) fn reload(
    pool: &KeyPool<KeyResources>,
    provider: &str,
    plan: Plan,
    metrics: &Metrics,
) -> Result<ReloadReport, BuildError> {
    let specs = plan.keys.into_iter().map(|k| k.spec).collect::<Vec<_>>();
    let mut built = Ok(());
    let mut budgets = plan.budgets;
    let auth = plan.auth;
    let report = pool.reload(specs, |keys, previous| {
        for (budget, previous) in budgets.iter_mut().zip(previous) {
            budget.previous = *previous;
        }
        let engine = pool.with_current(|_, old| Arc::new(old.quotas.reshape(std::mem::take(&mut budgets))));
        resources(metrics, provider, auth, keys, engine).unwrap_or_else(|e| {
            built = Err(e);
            KeyResources::unusable()
        })
    })?;
    built?; // unreachable after the plan's header check, kept so an error is never dropped
    Ok(report)
}
