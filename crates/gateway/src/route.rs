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

// A request's skipped providers and targets are bits of a `u64`.
const _: () = assert!(MAX_PROVIDERS <= 64 && MAX_TARGETS <= 64);

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
    /// Requests for this alias wait here when no target has room.
    pub(crate) queue: crate::lease::LeaseQueue,
}

/// Every alias, and where other names go.
#[derive(Debug)]
pub(crate) struct Routes {
    aliases: HashMap<Box<str>, Arc<Alias>>,
    /// Aliases whose names are globs (`claude-*-haiku*`), most specific
    /// first (more literal characters, then by name): a name no alias has
    /// exactly goes to the first that matches.
    patterns: Box<[Arc<Alias>]>,
    providers: HashMap<Box<str>, usize>,
    /// The default provider's position.
    pub(crate) default: usize,
    /// Whether `provider/model` pins a provider (off for a single-provider
    /// configuration: every name goes to it as it is).
    pin: bool,
    /// The default provider speaks NVIDIA's dialect: `nvidia/…`, `meta/…`
    /// are its own model ids, never a pin.
    nvidia_default: bool,
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
        self.in_order().find_map(|(at, t)| f(at, t))
    }

    /// [`find`](Self::find)'s order as an iterator: each target is taken
    /// (its tier's slot spent) only when the iterator reaches it, so a
    /// caller may look at one target (and wait for an answer about it)
    /// before it takes the next.
    pub(crate) fn in_order(&self) -> InOrder<'_> {
        InOrder { route: self, tier: 0, tried: 0, steps: 0, done: false }
    }
}

/// The targets of a [`Route`] in the order to try them (see [`Route::in_order`]).
pub(crate) struct InOrder<'a> {
    route: &'a Route,
    /// The tier being walked.
    tier: usize,
    /// Targets of the tier already given (bits by position in the tier).
    tried: u64,
    /// Slots of the tier taken so far.
    steps: usize,
    done: bool,
}

impl<'a> Iterator for InOrder<'a> {
    type Item = (usize, &'a Target);

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let alias = match self.route {
            Route::Direct(target) => {
                self.done = true;
                return Some((0, target));
            }
            Route::Alias(alias) => alias,
        };
        while let Some(tier) = alias.tiers.get(self.tier) {
            let count = tier.targets.len();
            if count == 1 {
                self.tier += 1;
                let at = tier.targets.start;
                return alias.targets.get(at).map(|t| (at, t));
            }
            // Slot by slot: a target without room gives up its slot (the slot is
            // spent, not passed to a neighbour), so the targets with room keep
            // their weights' shares among themselves. Each target is given once.
            let len = tier.schedule.len();
            while self.steps < len && (self.tried.count_ones() as usize) < count {
                self.steps += 1;
                let slot = tier.next.fetch_add(1, Ordering::Relaxed) % len;
                let i = usize::from(tier.schedule[slot]);
                let bit = 1u64 << i; // i < MAX_TARGETS <= 64
                if self.tried & bit != 0 {
                    continue;
                }
                self.tried |= bit;
                let at = tier.targets.start + i;
                return alias.targets.get(at).map(|t| (at, t));
            }
            self.tier += 1;
            self.tried = 0;
            self.steps = 0;
        }
        self.done = true;
        None
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
    /// The routes of `config`. While the default provider speaks NVIDIA's
    /// dialect, no other provider may take a namespace of its catalog
    /// ([`NVIDIA_NAMESPACES`](crate::preset::NVIDIA_NAMESPACES)).
    ///
    /// # Errors
    /// [`BuildError::Routes`] naming the field.
    pub(crate) fn new(config: &GatewayConfig) -> Result<Self, BuildError> {
        let invalid = |field: String, reason: String| BuildError::Routes { field, reason };
        if config.providers.is_empty() {
            return Err(invalid("providers".into(), "at least one provider is needed".into()));
        }
        if config.providers.len() > MAX_PROVIDERS {
            return Err(invalid("providers".into(), format!("at most {MAX_PROVIDERS} providers")));
        }
        let mut providers = HashMap::new();
        for (i, p) in config.providers.iter().enumerate() {
            // It goes into routes, metric labels, headers and saved state ids.
            let fine = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
            if p.name.is_empty() || !p.name.chars().all(fine) {
                return Err(invalid(
                    format!("providers.{}", p.name),
                    "a provider's name is letters, digits, '-', '_' and '.' (no '/', no spaces)".into(),
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
            let alias = Alias {
                name: Arc::from(name.as_str()),
                targets: targets.into(),
                tiers: tiers.into(),
                queue: crate::lease::LeaseQueue::new(),
            };
            aliases.insert(Box::<str>::from(name.as_str()), Arc::new(alias));
        }
        let mut patterns: Vec<Arc<Alias>> =
            aliases.values().filter(|a| is_pattern(&a.name)).map(Arc::clone).collect();
        patterns
            .sort_by(|a, b| literal_chars(&b.name).cmp(&literal_chars(&a.name)).then(a.name.cmp(&b.name)));
        let pin = config.providers.len() > 1 || !config.models.is_empty();
        Ok(Self { aliases, patterns: patterns.into(), providers, default, pin, nvidia_default })
    }

    /// The route of a request naming `model` (`None`: the body names none),
    /// with `names` the providers by position and `listed` telling whether a
    /// provider's cached catalog lists a model id.
    ///
    /// `<default provider>/<rest>` is the default provider's own id, sent
    /// whole, when its catalog lists it or it is one of NVIDIA's namespaces
    /// (`nvidia/…` with a default provider named `nvidia`); otherwise the
    /// prefix pins, like any provider's.
    pub(crate) fn resolve(
        &self,
        model: Option<&str>,
        names: &[Arc<crate::provider::Provider>],
        listed: &dyn Fn(&str, &str) -> bool,
    ) -> Route {
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
        if let Some(alias) = self.patterns.iter().find(|a| crate::clients::glob_match(&a.name, model)) {
            return Route::Alias(Arc::clone(alias));
        }
        if self.pin {
            if let Some((provider, rest)) = model.split_once('/') {
                let own_id = |index: usize| {
                    index == self.default
                        && ((self.nvidia_default && crate::preset::NVIDIA_NAMESPACES.contains(&provider))
                            || names.get(index).is_some_and(|p| listed(p.name(), model)))
                };
                if let Some(&index) =
                    self.providers.get(provider).filter(|i| !rest.is_empty() && !own_id(**i))
                {
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

/// Whether an alias name is a glob (`*` any run, `?` one character).
pub(crate) fn is_pattern(name: &str) -> bool {
    name.contains(['*', '?'])
}

/// How specific a pattern is: its characters other than `*`.
fn literal_chars(pattern: &str) -> usize {
    pattern.chars().filter(|&c| c != '*').count()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::config::{AliasConfig, ProviderConfig, TargetConfig};

    fn routes(weights: &[u32]) -> Routes {
        let names = ["p0", "p1", "p2", "p3"];
        let mut config = GatewayConfig::with_providers(names.iter().map(|n| ProviderConfig::new(*n)));
        let targets = weights.iter().enumerate().map(|(i, w)| TargetConfig::new(names[i], "m").weight(*w));
        config.models.insert("alias".into(), AliasConfig::new(targets));
        Routes::new(&config).unwrap()
    }

    /// Which target each of `n` leases picks when `full` targets have no room.
    fn picks(routes: &Routes, n: usize, full: &[usize]) -> Vec<usize> {
        let Route::Alias(alias) = routes.resolve(Some("alias"), &[], &|_, _| false) else {
            panic!("an alias")
        };
        let route = Route::Alias(alias);
        let mut counts = vec![0; route.targets().len()];
        for _ in 0..n {
            let at = route.find(|at, t| (!full.contains(&t.provider)).then_some(at)).unwrap();
            counts[at] += 1;
        }
        counts
    }

    #[test]
    fn a_target_without_room_passes_its_turn_along_the_schedule() {
        let r = routes(&[1, 2, 1]);
        assert_eq!(picks(&r, 400, &[]), [100, 200, 100]);
        // p1 (weight 2) full: the other two keep 1:1 between them.
        assert_eq!(picks(&r, 400, &[1]), [200, 0, 200]);
        let r = routes(&[1, 2, 3]);
        assert_eq!(picks(&r, 600, &[]), [100, 200, 300]);
        assert_eq!(picks(&r, 600, &[0]), [0, 240, 360], "2:3 kept without p0");
        assert_eq!(picks(&r, 600, &[0, 2]), [0, 600, 0]);
    }

    #[test]
    fn glob_aliases_take_names_no_alias_has_exactly_the_most_specific_first() {
        let mut config = GatewayConfig::with_providers(["p0", "p1"].map(ProviderConfig::new));
        for (name, model) in [
            ("claude-*", "main"),
            ("claude-*-haiku*", "fast"),
            ("claude-haiku-4-5", "exact"),
            ("claude-?-opus", "opus"),
        ] {
            config.models.insert(name.into(), AliasConfig::new([TargetConfig::new("p1", model)]));
        }
        let routes = Routes::new(&config).unwrap();
        let to = |name: &str| match routes.resolve(Some(name), &[], &|_, _| false) {
            Route::Alias(alias) => alias.targets[0].model.as_deref().unwrap_or("").to_owned(),
            Route::Direct(_) => "direct".to_owned(),
        };
        assert_eq!(to("claude-sonnet-4-5-20250929"), "main");
        assert_eq!(to("claude-3-5-haiku-20241022"), "fast", "more specific than claude-*");
        assert_eq!(to("claude-haiku-4-5"), "exact", "an exact name wins over every pattern");
        assert_eq!(to("claude-3-opus"), "opus", "? is one character");
        assert_eq!(to("claude-"), "main");
        assert_eq!(to("gpt-4o"), "direct");
        assert_eq!(to("p1/some-model"), "direct");
    }

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
