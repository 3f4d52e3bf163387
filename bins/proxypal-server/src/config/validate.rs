//! [`Config::validate`]: range and consistency checks that types cannot express.

use std::{collections::HashMap, time::Duration};

use http::{HeaderValue, Uri};

use super::{Config, ConfigError, ProviderView, Secret};

/// Most upstream attempts a client request may make: what the gateway's
/// per-request record holds.
const MAX_ATTEMPTS_LIMIT: u32 = proxypal_gateway::MAX_ATTEMPTS as u32;

/// # Validation
impl Config {
    /// Checks every field, returning the first problem found.
    ///
    /// With `dev = true` an empty key list is allowed: `--dev` supplies keys
    /// after loading. Call it again after adding keys by hand.
    pub fn validate(&self, dev: bool) -> Result<(), ConfigError> {
        self.validate_upstream()?;
        let views = self.provider_views()?;
        for view in &views {
            check_base_url(&view.base_url_field, view.base_url)?;
            self.validate_keys(view, dev && !self.has_providers())?;
        }
        if self.providers.len() > 1 && self.routing.default_provider.is_none() {
            let names: Vec<&str> = self.providers.keys().map(String::as_str).collect();
            return Err(ConfigError::invalid(
                "routing.default_provider",
                format!(
                    "required with several providers: which one serves model names that are neither an alias nor provider/model? (one of {})",
                    names.join(", ")
                ),
            ));
        }
        positive("routing.models_ttl", self.routing.models_ttl)?;
        self.validate_limits(&views)?;
        self.validate_retry()?;
        self.validate_cors()?;
        self.validate_auth()?;
        self.validate_clients()?;
        self.validate_ledger()?;
        self.validate_cache()?;
        crate::convert::webhook_config(self)
            .map_err(|(field, reason)| ConfigError::invalid(field, reason))?;
        self.validate_shared()?;
        at_least_one("limits.max_body_bytes", self.limits.max_body_bytes)?;
        at_least_one("limits.max_inflight", self.limits.max_inflight)?;
        if let Some(n) = self.workers.filter(|n| !(1..=super::MAX_WORKERS).contains(n)) {
            return Err(ConfigError::invalid(
                "workers",
                format!("must be between 1 and {} (got {n})", super::MAX_WORKERS),
            ));
        }
        if self.log.level.trim().is_empty() {
            return Err(ConfigError::invalid(
                "log.level",
                "must not be empty (e.g. info, or proxypal=debug,info)",
            ));
        }
        Ok(())
    }

    fn validate_upstream(&self) -> Result<(), ConfigError> {
        positive("upstream.connect_timeout", self.upstream.connect_timeout)?;
        positive("upstream.response_timeout", self.upstream.response_timeout)?;
        positive("upstream.idle_timeout", self.upstream.idle_timeout)?;
        let agent = &self.upstream.user_agent;
        if agent.trim().is_empty() || HeaderValue::from_str(agent).is_err() {
            return Err(ConfigError::invalid(
                "upstream.user_agent",
                format!("must be a non-empty header value of visible ASCII (got {agent:?})"),
            ));
        }
        self.upstream
            .extra_root_certificates()
            .map_err(|reason| ConfigError::invalid("upstream.ca_file", reason))?;
        Ok(())
    }

    fn validate_keys(&self, view: &ProviderView<'_>, dev: bool) -> Result<(), ConfigError> {
        use super::AuthMode;
        match view.auth {
            AuthMode::None if !view.keys.is_empty() => {
                return Err(ConfigError::invalid(
                    format!("{}keys", view.at),
                    "a provider with `auth: none` sends no keys: remove them, or use `auth: bearer`",
                ));
            }
            AuthMode::None => return Ok(()),
            AuthMode::Bearer if view.keys.is_empty() && !dev => {
                if view.at.is_empty() {
                    return Err(ConfigError::NoKeys);
                }
                return Err(ConfigError::invalid(
                    format!("{}keys", view.at),
                    "no API keys: set keys or keys_file (or `auth: none` for a server without keys)",
                ));
            }
            AuthMode::Bearer => {}
        }
        let mut seen: HashMap<&str, String> = HashMap::new();
        let mut names: HashMap<&str, String> = HashMap::new();
        for (index, entry) in view.keys.iter().enumerate() {
            let at = view.key_field(index, entry);
            check_secret(&at, "key", &entry.key)?;
            if let Some(first) = seen.get(entry.key.expose()) {
                return Err(ConfigError::Duplicate {
                    field: at,
                    first: first.clone(),
                    label: entry.key.masked(),
                });
            }
            seen.insert(entry.key.expose(), at.clone());
            if let Some(name) = &entry.name {
                let field = format!("{at}.name");
                if name.trim().is_empty() {
                    return Err(ConfigError::invalid(field, "must not be empty"));
                }
                if let Some(first) = names.get(name.as_str()) {
                    return Err(ConfigError::Duplicate {
                        field,
                        first: first.clone(),
                        label: format!("{name:?}"),
                    });
                }
                names.insert(name, field);
            }
            if let Some(account) = &entry.account {
                if !view.accounts.contains_key(account) {
                    let declared: Vec<&str> = view.accounts.keys().map(String::as_str).collect();
                    return Err(ConfigError::invalid(
                        format!("{at}.account"),
                        format!(
                            "no account {account:?} in `{}accounts` (declared: {}); add `accounts: {{ {account}: {{}} }}` to share rate_limit's limits",
                            view.at,
                            if declared.is_empty() { "none".to_owned() } else { declared.join(", ") }
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every provider's `rate_limit`, accounts and keys' own limits make
    /// budgets, no key allows more than its account, and the aliases and
    /// routing name real providers. Errors name the field:
    /// `rate_limit.burst`, `providers.groq.accounts.alice.requests_per_day`,
    /// `keys[2].day_reset`, `models.llama-70b.targets[1].provider`.
    fn validate_limits(&self, views: &[ProviderView<'_>]) -> Result<(), ConfigError> {
        for name in self.accounts.keys() {
            check_account_name("accounts", name)?;
        }
        for (provider, entry) in &self.providers {
            for name in entry.accounts.keys() {
                check_account_name(&format!("providers.{provider}.accounts"), name)?;
            }
        }
        let gateway = crate::convert::gateway_config(self).map_err(|e| match e {
            crate::convert::BuildError::Invalid { field, reason } => ConfigError::invalid(field, reason),
            other => ConfigError::invalid("providers", other.to_string()),
        })?;
        match gateway.check_limits() {
            Ok(()) => Ok(()),
            Err(e) => Err(build_error(e, views, views.first().filter(|_| views.len() == 1))),
        }
    }

    fn validate_shared(&self) -> Result<(), ConfigError> {
        let Some(shared) = &self.shared else { return Ok(()) };
        let url = shared.redis_url.trim();
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err(ConfigError::invalid(
                "shared.redis_url",
                format!(
                    "must be a redis:// or rediss:// URL, such as redis://127.0.0.1:6379/0 (got {:?})",
                    proxypal_gateway::replicas::redacted(url)
                ),
            ));
        }
        if shared.key_prefix.is_empty() || shared.key_prefix.contains(['{', '}', ' ']) {
            return Err(ConfigError::invalid(
                "shared.key_prefix",
                "must be non-empty, without spaces, '{' or '}' (the hash tag is the pool's)",
            ));
        }
        positive("shared.timeout", shared.timeout)?;
        positive("shared.heartbeat", shared.heartbeat)?;
        if shared.lease < shared.heartbeat * 2 {
            return Err(ConfigError::invalid(
                "shared.lease",
                "must be at least twice shared.heartbeat (one lost heartbeat must not make a replica a suspect)",
            ));
        }
        Ok(())
    }

    fn validate_retry(&self) -> Result<(), ConfigError> {
        let r = &self.retry;
        if !(1..=MAX_ATTEMPTS_LIMIT).contains(&r.max_attempts) {
            return Err(ConfigError::invalid(
                "retry.max_attempts",
                format!("must be between 1 and {MAX_ATTEMPTS_LIMIT} (got {})", r.max_attempts),
            ));
        }
        if r.failure_cooldown > r.max_failure_cooldown {
            return Err(ConfigError::invalid(
                "retry.failure_cooldown",
                format!(
                    "must not exceed retry.max_failure_cooldown ({} > {})",
                    humantime::format_duration(r.failure_cooldown),
                    humantime::format_duration(r.max_failure_cooldown)
                ),
            ));
        }
        Ok(())
    }

    fn validate_cors(&self) -> Result<(), ConfigError> {
        let origins = &self.cors.allowed_origins;
        let mut seen: HashMap<&str, String> = HashMap::new();
        for (i, origin) in origins.iter().enumerate() {
            let field = format!("cors.allowed_origins[{i}]");
            if origin == "*" {
                if origins.len() > 1 {
                    return Err(ConfigError::invalid(
                        field,
                        "\"*\" allows any origin and must be the only entry",
                    ));
                }
                continue;
            }
            if !is_origin(origin) {
                return Err(ConfigError::invalid(
                    field,
                    format!(
                        "must be \"*\" or an origin such as https://app.example.com \
                         (scheme and host, optional port, no path or trailing /) (got {origin:?})"
                    ),
                ));
            }
            if let Some(first) = seen.get(origin.as_str()) {
                return Err(ConfigError::Duplicate {
                    field,
                    first: first.clone(),
                    label: format!("{origin:?}"),
                });
            }
            seen.insert(origin, field);
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let mut seen: HashMap<&str, String> = HashMap::new();
        for (i, token) in self.auth.tokens.iter().enumerate() {
            let field = format!("auth.tokens[{i}]");
            check_secret(&field, "token", token)?;
            if let Some(first) = seen.get(token.expose()) {
                return Err(ConfigError::Duplicate { field, first: first.clone(), label: token.masked() });
            }
            seen.insert(token.expose(), field);
        }
        // An open proxy on a reachable address hands your keys and quota to
        // anyone who finds it: refuse unless the operator says so explicitly.
        if !self.listen.ip().is_loopback()
            && self.auth.tokens.is_empty()
            && self.clients.is_empty()
            && !self.auth.allow_unauthenticated
        {
            return Err(ConfigError::invalid(
                "auth.tokens",
                format!(
                    "required when listen is not a loopback address (listen is {}): without client tokens anyone \
                     who can reach the port uses your API keys and quota. Set auth.tokens (or \
                     PROXYPAL_AUTH__TOKENS), or set auth.allow_unauthenticated: true if something in front \
                     already authenticates clients",
                    self.listen
                ),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// The ledger: a PostgreSQL URL with `backend: postgres`, a retention
    /// of an hour or more, a buffer of at least one record.
    fn validate_ledger(&self) -> Result<(), ConfigError> {
        let l = &self.ledger;
        if !l.enabled {
            return Ok(());
        }
        if l.backend == super::LedgerBackend::Postgres {
            let Some(url) = &l.url else {
                return Err(ConfigError::invalid(
                    "ledger.url",
                    "required with backend: postgres (postgres://user@host:5432/database)",
                ));
            };
            let u = url.expose();
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://") || u.contains('=')) {
                return Err(ConfigError::invalid(
                    "ledger.url",
                    "must be a postgres:// URL or a key=value conninfo",
                ));
            }
        }
        if l.retention < Duration::from_secs(3600) {
            return Err(ConfigError::invalid("ledger.retention", "must be at least 1h"));
        }
        at_least_one("ledger.buffer", l.buffer)?;
        Ok(())
    }

    /// The cache: a TTL of a second or more, bounds that hold an entry,
    /// and Redis configured for `backend: redis`.
    fn validate_cache(&self) -> Result<(), ConfigError> {
        let c = &self.cache;
        if !c.enabled {
            return Ok(());
        }
        if c.ttl < Duration::from_secs(1) {
            return Err(ConfigError::invalid("cache.ttl", "must be at least 1s"));
        }
        at_least_one("cache.max_entry_bytes", c.max_entry_bytes)?;
        if c.max_bytes < c.max_entry_bytes {
            return Err(ConfigError::invalid("cache.max_bytes", "must be at least cache.max_entry_bytes"));
        }
        if c.backend == super::CacheBackend::Redis && self.shared.is_none() {
            return Err(ConfigError::invalid(
                "cache.backend",
                "redis needs shared.redis_url (the Redis the replicas share)",
            ));
        }
        Ok(())
    }

    /// Named clients: a name (unique), exactly one token (unique among
    /// clients and operator tokens), a weight in 1–1000, model globs that
    /// are not empty, and limits that make a budget.
    fn validate_clients(&self) -> Result<(), ConfigError> {
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut tokens: HashMap<&str, String> = self
            .auth
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.expose(), format!("auth.tokens[{i}]")))
            .collect();
        for (i, c) in self.clients.iter().enumerate() {
            let at = format!("clients[{i}]");
            let name = c.name.trim();
            if name.is_empty()
                || name.len() > 64
                || name.chars().any(|ch| ch.is_control() || ch.is_whitespace())
            {
                return Err(ConfigError::invalid(
                    format!("{at}.name"),
                    "must be 1–64 characters without spaces or control characters",
                ));
            }
            if let Some(first) = names.insert(name, i) {
                return Err(ConfigError::invalid(
                    format!("{at}.name"),
                    format!("{name:?} is already the name of clients[{first}]"),
                ));
            }
            let field = format!("{at}.token");
            let Some(token) = &c.token else {
                return Err(ConfigError::invalid(field, "required: set token (or token_file)"));
            };
            check_secret(&field, "token", token)?;
            if let Some(first) = tokens.get(token.expose()) {
                return Err(ConfigError::Duplicate { field, first: first.clone(), label: token.masked() });
            }
            tokens.insert(token.expose(), field);
            if !(1..=1000).contains(&c.weight) {
                return Err(ConfigError::invalid(
                    format!("{at}.weight"),
                    format!("must be between 1 and 1000 (got {})", c.weight),
                ));
            }
            if let Some(j) = c.models.iter().position(|m| m.trim().is_empty()) {
                return Err(ConfigError::invalid(format!("{at}.models[{j}]"), "must not be empty"));
            }
            let limits = c
                .limit_fields()
                .to_limits()
                .map_err(|(f, reason)| ConfigError::invalid(format!("{at}.{f}"), reason))?;
            if !limits.is_empty() {
                limits
                    .compile()
                    .map_err(|e| ConfigError::invalid(format!("{at}.{}", e.field()), e.reason()))?;
            }
        }
        Ok(())
    }
}

/// A base URL the upstream client takes: absolute http(s), a host, no query
/// string, no credentials.
fn check_base_url(field: &str, url: &str) -> Result<(), ConfigError> {
    let lower = url.to_ascii_lowercase();
    if !(lower.starts_with("http://") || lower.starts_with("https://")) {
        return Err(ConfigError::invalid(
            field,
            format!("must start with http:// or https:// (got {url:?})"),
        ));
    }
    let uri: Uri =
        url.parse().map_err(|e| ConfigError::invalid(field, format!("invalid URL {url:?}: {e}")))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(ConfigError::invalid(field, format!("has no host (got {url:?})")));
    }
    if uri.query().is_some() {
        return Err(ConfigError::invalid(field, format!("must not contain a query string (got {url:?})")));
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(ConfigError::invalid(
            field,
            "must not contain credentials (user:password@); keys go in `keys`",
        ));
    }
    Ok(())
}

/// A secret goes into an HTTP header: it must be non-empty visible ASCII.
fn check_secret(field: &str, what: &str, secret: &Secret) -> Result<(), ConfigError> {
    let value = secret.expose();
    if value.is_empty() {
        return Err(ConfigError::invalid(field, format!("empty {what}")));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::invalid(
            field,
            format!("{what} contains whitespace, control or non-ASCII characters ({})", secret.masked()),
        ));
    }
    Ok(())
}

fn at_least_one<T>(field: &str, value: T) -> Result<(), ConfigError>
where
    T: PartialOrd + From<u8> + std::fmt::Display,
{
    if value < T::from(1) {
        return Err(ConfigError::invalid(field, format!("must be at least 1 (got {value})")));
    }
    Ok(())
}

fn positive(field: &str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(ConfigError::invalid(field, "must be greater than 0"));
    }
    Ok(())
}

/// `scheme://host[:port]` with scheme http or https, as browsers send in the
/// `Origin` header (which is compared byte for byte).
fn is_origin(origin: &str) -> bool {
    let Some(rest) = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://")) else {
        return false;
    };
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) || rest.contains(char::is_whitespace) {
        return false;
    }
    origin.parse::<Uri>().is_ok_and(|uri| uri.host().is_some_and(|h| !h.is_empty()))
}

fn check_account_name(field: &str, name: &str) -> Result<(), ConfigError> {
    if name.trim().is_empty() || name.trim() != name {
        return Err(ConfigError::invalid(
            field,
            format!("account name {name:?} must be non-empty, without leading or trailing spaces"),
        ));
    }
    Ok(())
}

/// A gateway build error as a config error naming the field, within `view`
/// (the provider it is about; for a single-provider file, the only one).
fn build_error(
    e: proxypal_gateway::BuildError,
    views: &[ProviderView<'_>],
    view: Option<&ProviderView<'_>>,
) -> ConfigError {
    use proxypal_gateway::BuildError;
    let at = view.map_or("", |v| v.at.as_str());
    let key_field = |index: usize| match view.and_then(|v| v.keys.get(index).map(|k| v.key_field(index, k))) {
        Some(field) => field,
        None => format!("{at}keys[{index}]"),
    };
    match e {
        BuildError::Provider { provider, source } => {
            let inner = views.iter().find(|v| v.name == provider);
            build_error(*source, views, inner)
        }
        BuildError::Limits { scope, source } => {
            let scope = if scope == "limits" {
                view.map_or("rate_limit".to_owned(), |v| v.rate_limit_field.clone())
            } else if let Some(index) =
                scope.strip_prefix("keys[").and_then(|r| r.strip_suffix(']')).and_then(|i| i.parse().ok())
            {
                key_field(index)
            } else {
                format!("{at}{scope}")
            };
            ConfigError::invalid(format!("{scope}.{}", source.field()), source.reason())
        }
        BuildError::AboveAccount { index, account, what, own, shared } => ConfigError::invalid(
            key_field(index),
            format!(
                "its {what} limit ({own}) is above account {account:?}'s ({shared}); a key cannot allow more than the account it shares"
            ),
        ),
        BuildError::Routes { field, reason } => ConfigError::invalid(field, reason),
        BuildError::Upstream(e) => ConfigError::invalid(
            view.map_or("upstream.base_url".to_owned(), |v| v.base_url_field.clone()),
            e.to_string(),
        ),
        other => ConfigError::invalid(format!("{at}keys"), other.to_string()),
    }
}
