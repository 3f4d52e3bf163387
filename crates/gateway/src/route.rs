//! Where a request goes: its `model` resolved to targets (an alias's, a
//! pinned `provider/model`, or the default provider), and the order targets
//! are tried in — the lowest tier with room first, smooth weighted round
//! robin within a tier.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::HeaderValue;

use crate::config::{GatewayConfig, MAX_PROVIDERS, MAX_TARGETS};
use crate::keyset::BuildError;

/// Largest weight of one target (keeps a tier's schedule short).
pub const MAX_WEIGHT: u32 = 1000;

/// One provider model that serves a route.
#[derive(Debug)]
pub(crate) struct Target {
    /// The provider, by position in the generation's provider list.
    pub(crate) provider: usize,
    /// The model id to send (`None`: the client's `model` as it is).
    pub(crate) model: Option<Arc<str>>,
    /// `model` as a JSON string (quotes and escapes), made once.
    pub(crate) model_json: Option<Box<str>>,
    pub(crate) tier: u32,
    pub(crate) weight: u32,
    /// `x-proxypal-route`: `<provider>/<model>`.
    pub(crate) route: HeaderValue,
}

/// The targets of one tier and its smooth weighted round-robin schedule.
#[derive(Debug)]
struct Tier {
    /// Positions in [`Alias::targets`].
    targets: std::ops::Range<usize>,
    /// The order of smooth weighted round robin (nginx's): each target as
    /// often as its weight, spread out; a request starts at the next slot.
    schedule: Box<[u8]>,
    next: AtomicUsize,
}

/// A public model name and its targets, in tier order.
#[derive(Debug)]
pub(crate) struct Alias {
    pub(crate) name: Arc<str>,
    pub(crate) targets: Box<[Target]>,
    tiers: Box<[Tier]>,
}

/// Every alias, and where other names go.
#[derive(Debug)]
pub(crate) struct Routes {
    aliases: HashMap<Box<str>, Arc<Alias>>,
    providers: HashMap<Box<str>, usize>,
    /// The default provider's position.
    pub(crate) default: usize,
    /// Whether `provider/model` pins a provider (off for a single-provider
    /// configuration: every name goes to it as it is).
    pin: bool,
}

/// A request's route.
#[derive(Debug)]
pub(crate) enum Route {
    /// An alias: try its targets.
    Alias(Arc<Alias>),
    /// One provider, the model as the client named it or as pinned.
    Direct(Target),
}

impl Route {
    /// Its targets.
    pub(crate) fn targets(&self) -> &[Target] {
        match self {
            Route::Alias(alias) => &alias.targets,
            Route::Direct(target) => std::slice::from_ref(target),
        }
    }

    /// The targets in the order to try them for one lease: tier by tier,
    /// each tier from its next round-robin slot. Calls `f` with each
    /// target's position until it returns `Some`.
    pub(crate) fn find<T>(&self, mut f: impl FnMut(usize, &Target) -> Option<T>) -> Option<T> {
        match self {
            Route::Direct(target) => f(0, target),
            Route::Alias(alias) => {
                for tier in alias.tiers.iter() {
                    let len = tier.targets.len();
                    let first = if len == 1 {
                        0
                    } else {
                        let slot = tier.next.fetch_add(1, Ordering::Relaxed) % tier.schedule.len();
                        usize::from(tier.schedule[slot])
                    };
                    for k in 0..len {
                        let at = tier.targets.start + (first + k) % len;
                        if let Some(found) = f(at, &alias.targets[at]) {
                            return Some(found);
                        }
                    }
                }
                None
            }
        }
    }
}

/// Smooth weighted round robin over `weights`: the order in which a
/// sequence of picks visits them (each `weights[i]` times per cycle).
fn schedule(weights: &[u32]) -> Box<[u8]> {
    let total: i64 = weights.iter().map(|w| i64::from(*w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(weights) {
            *c += i64::from(*w);
        }
        let best = (0..weights.len()).max_by_key(|i| (current[*i], std::cmp::Reverse(*i))).unwrap_or(0);
        current[best] -= total;
        // At most MAX_TARGETS (64) targets: fits a byte.
        out.push(u8::try_from(best).unwrap_or(0));
    }
    out.into_boxed_slice()
}

/// `model` as a JSON string.
fn json_string(model: &str) -> Box<str> {
    serde_json::Value::String(model.to_owned()).to_string().into_boxed_str()
}

fn route_header(provider: &str, model: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("{provider}/{model}"))
        .or_else(|_| HeaderValue::from_str(provider))
        .unwrap_or_else(|_| HeaderValue::from_static("-"))
}

impl Routes {
    /// The routes of `config`. `catalog_namespaces` gives how many models of
    /// the default provider's catalog live under a namespace (`meta` of
    /// `meta/llama-…`), when known: a provider may not take such a name.
    ///
    /// # Errors
    /// [`BuildError::Routes`] naming the field.
    pub(crate) fn new(
        config: &GatewayConfig,
        catalog_namespaces: &dyn Fn(&str) -> usize,
    ) -> Result<Self, BuildError> {
        let invalid = |field: String, reason: String| BuildError::Routes { field, reason };
        if config.providers.is_empty() {
            return Err(invalid("providers".into(), "at least one provider is needed".into()));
        }
        if config.providers.len() > MAX_PROVIDERS {
            return Err(invalid("providers".into(), format!("at most {MAX_PROVIDERS} providers")));
        }
        let mut providers = HashMap::new();
        for (i, p) in config.providers.iter().enumerate() {
            if p.name.is_empty() || p.name.contains('/') || p.name.trim() != p.name {
                return Err(invalid(
                    format!("providers.{}", p.name),
                    "a provider's name must be non-empty, without '/' or surrounding spaces".into(),
                ));
            }
            if providers.insert(Box::<str>::from(p.name.as_str()), i).is_some() {
                return Err(invalid(format!("providers.{}", p.name), "two providers have this name".into()));
            }
        }
        let default = match &config.routing.default_provider {
            None => 0,
            Some(name) => *providers.get(name.as_str()).ok_or_else(|| {
                invalid("routing.default_provider".into(), format!("no provider {name:?} in providers"))
            })?,
        };
        let nvidia_default = config.providers[default].dialect == crate::dialect::Dialect::Nvidia;
        for (name, _) in providers.iter().filter(|(_, i)| **i != default) {
            if nvidia_default && crate::preset::NVIDIA_NAMESPACES.contains(&&**name) {
                return Err(invalid(
                    format!("providers.{name}"),
                    format!(
                        "NVIDIA's catalog names models \"{name}/…\" and NVIDIA is the default provider: a provider of that name would take their requests; rename it"
                    ),
                ));
            }
            let n = catalog_namespaces(name);
            if n > 0 {
                return Err(invalid(
                    format!("providers.{name}"),
                    format!(
                        "the default provider lists {n} models under \"{name}/\": a provider of that name would take their requests; rename it"
                    ),
                ));
            }
        }
        let mut aliases = HashMap::new();
        for (name, alias) in &config.models {
            let field = |rest: &str| format!("models.{name}{rest}");
            if alias.targets.is_empty() {
                return Err(invalid(field(".targets"), "an alias needs at least one target".into()));
            }
            if alias.targets.len() > MAX_TARGETS {
                return Err(invalid(field(".targets"), format!("at most {MAX_TARGETS} targets")));
            }
            let mut targets = Vec::with_capacity(alias.targets.len());
            for (i, t) in alias.targets.iter().enumerate() {
                let provider = *providers.get(t.provider.as_str()).ok_or_else(|| {
                    invalid(
                        field(&format!(".targets[{i}].provider")),
                        format!("no provider {:?} in providers", t.provider),
                    )
                })?;
                if t.model.is_empty() {
                    return Err(invalid(field(&format!(".targets[{i}].model")), "must not be empty".into()));
                }
                if !(1..=MAX_WEIGHT).contains(&t.weight) {
                    return Err(invalid(
                        field(&format!(".targets[{i}].weight")),
                        format!("{} is not in 1..={MAX_WEIGHT}", t.weight),
                    ));
                }
                targets.push(Target {
                    provider,
                    model: Some(Arc::from(t.model.as_str())),
                    model_json: Some(json_string(&t.model)),
                    tier: t.tier,
                    weight: t.weight,
                    route: route_header(&t.provider, &t.model),
                });
            }
            // Stable: within a tier, the configured order.
            targets.sort_by_key(|t| t.tier);
            let mut tiers = Vec::new();
            let mut start = 0;
            while start < targets.len() {
                let tier = targets[start].tier;
                let end = start + targets[start..].iter().take_while(|t| t.tier == tier).count();
                let weights: Vec<u32> = targets[start..end].iter().map(|t| t.weight).collect();
                tiers.push(Tier {
                    targets: start..end,
                    schedule: schedule(&weights),
                    next: AtomicUsize::new(0),
                });
                start = end;
            }
            let alias =
                Alias { name: Arc::from(name.as_str()), targets: targets.into(), tiers: tiers.into() };
            aliases.insert(Box::<str>::from(name.as_str()), Arc::new(alias));
        }
        let pin = config.providers.len() > 1 || !config.models.is_empty();
        Ok(Self { aliases, providers, default, pin })
    }

    /// The route of a request naming `model` (`None`: the body names none),
    /// with `names` the providers' names by position.
    pub(crate) fn resolve(&self, model: Option<&str>, names: &[Arc<crate::provider::Provider>]) -> Route {
        let header = |provider: usize, model: &str| match names.get(provider) {
            Some(p) => p.route_header(model),
            None => HeaderValue::from_static("-"),
        };
        let Some(model) = model else {
            return Route::Direct(Target {
                provider: self.default,
                model: None,
                model_json: None,
                tier: 1,
                weight: 1,
                route: header(self.default, ""),
            });
        };
        if let Some(alias) = self.aliases.get(model) {
            return Route::Alias(Arc::clone(alias));
        }
        if self.pin {
            if let Some((provider, rest)) = model.split_once('/') {
                if let Some(&index) = self.providers.get(provider).filter(|_| !rest.is_empty()) {
                    return Route::Direct(Target {
                        provider: index,
                        model: Some(Arc::from(rest)),
                        model_json: Some(json_string(rest)),
                        tier: 1,
                        weight: 1,
                        route: header(index, rest),
                    });
                }
            }
        }
        Route::Direct(Target {
            provider: self.default,
            model: None,
            model_json: None,
            tier: 1,
            weight: 1,
            route: header(self.default, model),
        })
    }

    /// Every alias.
    pub(crate) fn aliases(&self) -> impl Iterator<Item = &Arc<Alias>> {
        self.aliases.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_weighted_round_robin_spreads_picks_by_weight() {
        assert_eq!(&*schedule(&[1, 2]), &[1, 0, 1]);
        assert_eq!(&*schedule(&[5, 1, 1]), &[0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(&*schedule(&[1]), &[0]);
        let s = schedule(&[3, 7]);
        assert_eq!(s.iter().filter(|i| **i == 0).count(), 3);
        assert_eq!(s.len(), 10);
    }
}
