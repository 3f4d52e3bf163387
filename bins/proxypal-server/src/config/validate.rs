//! [`Config::validate`]: range and consistency checks that types cannot express.

use std::{collections::HashMap, time::Duration};

use http::{HeaderValue, Uri};

use super::{Config, ConfigError, KeyEntry, KeyOrigin, Secret};

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
        self.validate_keys(dev)?;
        self.validate_limits()?;
        self.validate_retry()?;
        self.validate_cors()?;
        self.validate_auth()?;
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
        let url = &self.upstream.base_url;
        let field = "upstream.base_url";
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
            return Err(ConfigError::invalid(
                field,
                format!("must not contain a query string (got {url:?})"),
            ));
        }
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(ConfigError::invalid(
                field,
                "must not contain credentials (user:password@); keys go in `keys`",
            ));
        }
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

    fn validate_keys(&self, dev: bool) -> Result<(), ConfigError> {
        if self.keys.is_empty() && !dev {
            return Err(ConfigError::NoKeys);
        }
        let mut seen: HashMap<&str, String> = HashMap::new();
        let mut names: HashMap<&str, String> = HashMap::new();
        for (index, entry) in self.keys.iter().enumerate() {
            let at = key_field(index, entry);
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
                if !self.accounts.contains_key(account) {
                    let declared: Vec<&str> = self.accounts.keys().map(String::as_str).collect();
                    return Err(ConfigError::invalid(
                        format!("{at}.account"),
                        format!(
                            "no account {account:?} in `accounts` (declared: {}); add `accounts: {{ {account}: {{}} }}` to share rate_limit's limits",
                            if declared.is_empty() { "none".to_owned() } else { declared.join(", ") }
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `rate_limit`, every account and every key's own limits make budgets,
    /// and no key allows more than its account. Errors name the field:
    /// `rate_limit.burst`, `accounts.alice.requests_per_day`, `keys[2].day_reset`.
    fn validate_limits(&self) -> Result<(), ConfigError> {
        use proxypal_gateway::{BuildError, GatewayConfig, KeyConfig, keypool::KeySpec};
        fn scoped(scope: &str) -> impl FnOnce((String, String)) -> ConfigError + '_ {
            move |(field, reason)| ConfigError::invalid(format!("{scope}.{field}"), reason)
        }
        let mut gateway = GatewayConfig::default();
        gateway.limits = self.default_limit_fields().to_limits().map_err(scoped("rate_limit"))?;
        for (name, fields) in &self.accounts {
            if name.trim().is_empty() || name.trim() != name {
                return Err(ConfigError::invalid(
                    "accounts",
                    format!("account name {name:?} must be non-empty, without leading or trailing spaces"),
                ));
            }
            let limits = fields.to_limits().map_err(scoped(&format!("accounts.{name}")))?;
            gateway.accounts.insert(name.clone(), limits);
        }
        let mut fields = Vec::with_capacity(self.keys.len());
        for (index, entry) in self.keys.iter().enumerate() {
            let at = key_field(index, entry);
            let limits = entry.limits.to_limits().map_err(scoped(&at))?;
            let mut key = KeyConfig::new(KeySpec::new(entry.key.expose())).with_limits(limits);
            key.account.clone_from(&entry.account);
            gateway.keys.push(key);
            fields.push(at);
        }
        let scope_field = |scope: &str| -> String {
            if scope == "limits" {
                return "rate_limit".to_owned();
            }
            scope
                .strip_prefix("keys[")
                .and_then(|rest| rest.strip_suffix(']'))
                .and_then(|i| i.parse::<usize>().ok())
                .and_then(|i| fields.get(i).cloned())
                .unwrap_or_else(|| scope.to_owned())
        };
        match gateway.check_limits() {
            Ok(()) => Ok(()),
            Err(BuildError::Limits { scope, source }) => Err(ConfigError::invalid(
                format!("{}.{}", scope_field(&scope), source.field()),
                source.reason(),
            )),
            Err(BuildError::AboveAccount { index, account, what, own, shared }) => Err(ConfigError::invalid(
                fields.get(index).cloned().unwrap_or_default(),
                format!(
                    "its {what} limit ({own}) is above account {account:?}'s ({shared}); a key cannot allow more than the account it shares"
                ),
            )),
            Err(other) => Err(ConfigError::invalid("keys", other.to_string())),
        }
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
        if !self.listen.ip().is_loopback() && self.auth.tokens.is_empty() && !self.auth.allow_unauthenticated
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

/// How errors name a key: `keys[2]`, or `keys_file line 4` for file keys.
fn key_field(index: usize, entry: &KeyEntry) -> String {
    match entry.origin {
        KeyOrigin::Config => format!("keys[{index}]"),
        KeyOrigin::KeysFile { line } => format!("keys_file line {line}"),
    }
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
