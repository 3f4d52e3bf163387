//! Config loading and validation, through the public API only. No test touches
//! the process environment: env layers are passed explicitly.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use proxypal_server::config::{Config, ConfigError, KeyEntry, KeyOrigin, LogFormat, YamlSource, mask_key};

/// Secrets used below; none may appear in any Debug or Display output.
const KEY_A: &str = "nvapi-AAAAaaaaAAAAaaaaAAAA0001";
const KEY_B: &str = "nvapi-BBBBbbbbBBBBbbbbBBBB0002";
const KEY_C: &str = "nvapi-CCCCccccCCCCccccCCCC0003";
const TOKEN: &str = "client-token-SECRETsecret-9999";

const NO_ENV: [(&str, &str); 0] = [];

fn from_yaml(yaml: &str) -> Result<Config, ConfigError> {
    Config::from_sources(Some(YamlSource::Text(yaml)), NO_ENV, false)
}

fn with_env(yaml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_sources(Some(YamlSource::Text(yaml)), env.iter().copied(), false)
}

#[track_caller]
fn err(result: Result<Config, ConfigError>) -> ConfigError {
    match result {
        Ok(config) => panic!("expected an error, got {config:?}"),
        Err(e) => e,
    }
}

/// The error's Display must start with `field: ` and contain `needle`.
#[track_caller]
fn assert_error(result: Result<Config, ConfigError>, field: &str, needle: &str) {
    let e = err(result);
    let msg = e.to_string();
    assert!(msg.starts_with(&format!("{field}: ")), "error should name {field:?}: {msg}");
    assert!(msg.contains(needle), "error should contain {needle:?}: {msg}");
    assert_no_secrets(&msg);
    assert_no_secrets(&format!("{e:?}"));
}

#[track_caller]
fn assert_no_secrets(text: &str) {
    for secret in [KEY_A, KEY_B, KEY_C, TOKEN] {
        assert!(!text.contains(secret), "secret {secret} leaked in: {text}");
        // Not even the part after the vendor prefix.
        assert!(!text.contains(&secret[6..]), "secret {secret} leaked in: {text}");
    }
}

/// A fresh file under the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "proxypal-config-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/proxypal.example.yaml")
}

// ---------------------------------------------------------------- defaults

#[test]
fn defaults_match_the_contract() {
    let c = with_env("", &[("PROXYPAL_KEYS", KEY_A)]).unwrap();
    assert_eq!(c.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.upstream.base_url, "https://integrate.api.nvidia.com/v1");
    assert_eq!(c.upstream.connect_timeout, Duration::from_secs(5));
    assert_eq!(c.upstream.response_timeout, Duration::from_secs(300));
    assert_eq!(c.upstream.idle_timeout, Duration::from_secs(180));
    assert_eq!(c.upstream.user_agent, format!("proxypal/{}", env!("CARGO_PKG_VERSION")));
    assert_eq!(c.upstream.ca_file, None);
    assert_eq!(c.keys_file, None);
    let d = c.default_limit_fields();
    assert_eq!(d.requests_per_minute, Some(40));
    assert_eq!(d.burst, None, "default burst: the whole window may go at once");
    assert_eq!(d.margin, Some(Duration::from_millis(500)));
    assert_eq!((d.requests_per_day, d.tokens_per_minute, d.max_concurrent), (None, None, None));
    assert!(c.accounts.is_empty());
    assert_eq!(c.retry.max_attempts, 3);
    assert_eq!(c.retry.queue_timeout, Duration::from_secs(30));
    assert_eq!(c.retry.rate_limit_cooldown, Duration::from_secs(60));
    assert_eq!(c.retry.failure_cooldown, Duration::from_secs(2));
    assert_eq!(c.retry.max_failure_cooldown, Duration::from_secs(60));
    assert!(c.cors.allowed_origins.is_empty());
    assert!(!c.cors.enabled());
    assert!(c.auth.tokens.is_empty());
    assert_eq!(c.auth.tokens_file, None);
    assert!(!c.auth.allow_unauthenticated);
    assert_eq!(c.limits.max_body_bytes, 32 * 1024 * 1024);
    assert_eq!(c.limits.max_inflight, 1024);
    assert_eq!(c.log.level, "info");
    assert_eq!(c.log.format, LogFormat::Text);
    assert_eq!(c.shutdown_grace, Duration::from_secs(30));

    // Apart from the key, that is exactly `Config::default()`.
    let mut expected = Config::default();
    expected.keys.push(KeyEntry::new(KEY_A));
    assert_eq!(c, expected);
}

#[test]
fn dev_defaults_agree_with_dev_loading_and_need_no_keys() {
    let dev = Config::dev();
    assert_eq!(dev.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(dev.rate_limit.requests_per_minute, Some(600));
    assert_eq!(dev.rate_limit.burst, None);
    assert!(dev.cache.enabled, "--dev shows the response cache");
    assert!(dev.keys.is_empty());
    dev.validate(true).unwrap();
    assert!(matches!(dev.validate(false), Err(ConfigError::NoKeys)));

    let loaded = Config::from_sources(None, NO_ENV, true).unwrap();
    assert_eq!(loaded, dev);
    // Dev mode still takes the YAML and env layers.
    let loaded = Config::from_sources(
        Some(YamlSource::Text("rate_limit: { burst: 3 }")),
        [("PROXYPAL_LISTEN", "127.0.0.1:9999")],
        true,
    )
    .unwrap();
    assert_eq!(loaded.rate_limit.requests_per_minute, Some(600));
    assert_eq!(loaded.rate_limit.burst, Some(3));
    assert_eq!(loaded.listen.port(), 9999);
}

#[test]
fn zero_keys_is_an_error_outside_dev() {
    let e = err(from_yaml("listen: 127.0.0.1:8080"));
    assert!(matches!(e, ConfigError::NoKeys), "{e:?}");
    assert_eq!(e.to_string(), "keys: no API keys configured — set keys, keys_file or PROXYPAL_KEYS");
    assert_eq!(e.field(), Some("keys"));
}

#[test]
fn empty_and_comment_only_yaml_is_all_defaults() {
    let c = with_env("# nothing here\n", &[("PROXYPAL_KEYS", KEY_A)]).unwrap();
    assert_eq!(c.keys.len(), 1);
    assert_eq!(c.default_limit_fields().requests_per_minute, Some(40));
}

// ---------------------------------------------------------------- files

#[test]
fn example_file_parses_and_it_and_the_docs_name_every_variable() {
    let path = example_path();
    let c = Config::from_sources(Some(YamlSource::File(&path)), NO_ENV, false).unwrap();
    assert_eq!(c.keys.len(), 2);
    assert_eq!(c.keys[0], KeyEntry::new("nvapi-REPLACE-ME-1"));
    assert_eq!(c.keys[1].name.as_deref(), Some("team-b"));
    assert_eq!(c.keys[1].limits.requests_per_minute, Some(20));
    assert_eq!(c.keys[1].limits.burst, Some(2));
    // The state file sits beside the config file.
    let state = c.state.path.clone().unwrap();
    assert_eq!(state, path.parent().unwrap().join("proxypal-state.db"));
    // Everything else in the example is the default.
    let mut expected = Config::default();
    expected.keys = c.keys.clone();
    expected.state = c.state.clone();
    assert_eq!(c, expected);

    // The example documents every field and its variable.
    let text = std::fs::read_to_string(&path).unwrap();
    let docs =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/configuration.md"))
            .unwrap();
    for var in [
        "PROXYPAL_LISTEN",
        "PROXYPAL_UPSTREAM__BASE_URL",
        "PROXYPAL_UPSTREAM__CONNECT_TIMEOUT",
        "PROXYPAL_UPSTREAM__RESPONSE_TIMEOUT",
        "PROXYPAL_UPSTREAM__IDLE_TIMEOUT",
        "PROXYPAL_UPSTREAM__USER_AGENT",
        "PROXYPAL_UPSTREAM__CA_FILE",
        "PROXYPAL_KEYS=",
        "PROXYPAL_KEYS_FILE",
        "PROXYPAL_RATE_LIMIT__REQUESTS_PER_MINUTE",
        "PROXYPAL_RATE_LIMIT__BURST",
        "PROXYPAL_RATE_LIMIT__REQUESTS_PER_DAY",
        "PROXYPAL_RATE_LIMIT__DAY_RESET",
        "PROXYPAL_RATE_LIMIT__TOKENS_PER_MINUTE",
        "PROXYPAL_RATE_LIMIT__TOKENS_PER_DAY",
        "PROXYPAL_RATE_LIMIT__MAX_CONCURRENT",
        "PROXYPAL_RATE_LIMIT__MARGIN",
        "PROXYPAL_STATE__PATH",
        "PROXYPAL_RETRY__MAX_ATTEMPTS",
        "PROXYPAL_RETRY__QUEUE_TIMEOUT",
        "PROXYPAL_RETRY__RATE_LIMIT_COOLDOWN",
        "PROXYPAL_RETRY__FAILURE_COOLDOWN",
        "PROXYPAL_RETRY__MAX_FAILURE_COOLDOWN",
        "PROXYPAL_CORS__ALLOWED_ORIGINS",
        "PROXYPAL_AUTH__TOKENS=",
        "PROXYPAL_AUTH__TOKENS_FILE",
        "PROXYPAL_AUTH__ALLOW_UNAUTHENTICATED",
        "PROXYPAL_LIMITS__MAX_BODY_BYTES",
        "PROXYPAL_LIMITS__MAX_INFLIGHT",
        "PROXYPAL_LOG__LEVEL",
        "PROXYPAL_LOG__FORMAT",
        "PROXYPAL_SHUTDOWN_GRACE",
        "PROXYPAL_WORKERS",
    ] {
        assert!(text.contains(var), "example does not mention {var}");
        assert!(docs.contains(var.trim_end_matches('=')), "docs/configuration.md does not mention {var}");
    }
}

#[test]
fn missing_config_file_is_an_error_naming_it() {
    let path = std::env::temp_dir().join("proxypal-config-test-does-not-exist.yaml");
    let e = err(Config::from_sources(Some(YamlSource::File(&path)), NO_ENV, false));
    assert!(matches!(e, ConfigError::ReadConfigFile { .. }), "{e:?}");
    assert!(e.to_string().contains("does-not-exist.yaml"), "{e}");
}

#[test]
fn errors_from_a_file_name_the_file() {
    let file = TempFile::new("bad.yaml", &format!("keys: [{KEY_A}]\nretry: {{ max_attempts: many }}\n"));
    let e = err(Config::from_sources(Some(YamlSource::File(file.path())), NO_ENV, false));
    let msg = e.to_string();
    assert!(msg.starts_with("retry.max_attempts: "), "{msg}");
    assert!(msg.contains(&file.path().display().to_string()), "{msg}");
    assert!(msg.contains("YAML file"), "{msg}");
}

#[test]
fn keys_file_with_comments_is_appended_and_relative_to_the_yaml_file() {
    let keys = TempFile::new(
        "keys.txt",
        &format!("# team keys\n\n{KEY_B}\n   \n{KEY_C}   # rotated 2025-01\n  # indented comment\n"),
    );
    // The config file sits in another directory and names keys.txt by a
    // path relative to itself.
    let dir = keys.path().parent().unwrap();
    let yaml = TempFile::new(
        "proxypal.yaml",
        &format!("keys: [{KEY_A}]\nkeys_file: ../{}/keys.txt\n", dir.file_name().unwrap().to_str().unwrap()),
    );
    let c = Config::from_sources(Some(YamlSource::File(yaml.path())), NO_ENV, false).unwrap();
    let got: Vec<&str> = c.keys.iter().map(|k| k.key.expose()).collect();
    assert_eq!(got, [KEY_A, KEY_B, KEY_C]);
    assert_eq!(c.keys[0].origin, KeyOrigin::Config);
    assert_eq!(c.keys[1].origin, KeyOrigin::KeysFile { line: 3 });
    assert_eq!(c.keys[2].origin, KeyOrigin::KeysFile { line: 5 });
    assert!(c.keys_file.as_deref().unwrap().ends_with("keys.txt"));
    assert!(c.keys_file.as_deref().unwrap().is_file());
}

#[test]
fn keys_file_from_env_with_absolute_path() {
    let keys = TempFile::new("keys.txt", &format!("{KEY_A}\n"));
    let c = with_env("", &[("PROXYPAL_KEYS_FILE", keys.path().to_str().unwrap())]).unwrap();
    assert_eq!(c.keys.len(), 1);
    assert_eq!(c.keys[0].key.expose(), KEY_A);
}

#[test]
fn keys_file_errors() {
    let e = err(from_yaml("keys_file: /nonexistent/proxypal/keys.txt"));
    assert!(matches!(e, ConfigError::ReadListFile { .. }), "{e:?}");
    assert!(e.to_string().starts_with("keys_file: cannot read /nonexistent/proxypal/keys.txt"), "{e}");

    let keys = TempFile::new("keys.txt", &format!("{KEY_A}\n{KEY_B} team-b\n"));
    let yaml = format!("keys_file: {}", keys.path().display());
    assert_error(from_yaml(&yaml), "keys_file line 2", "one value per line");

    let keys = TempFile::new("keys.txt", &format!("{KEY_A}\n{KEY_B}\n{KEY_A}\n"));
    let yaml = format!("keys_file: {}", keys.path().display());
    assert_error(from_yaml(&yaml), "keys_file line 3", "duplicate of keys_file line 1 (nvapi-…0001)");

    // A file key that repeats an inline key.
    let keys = TempFile::new("keys.txt", &format!("{KEY_B}\n"));
    let yaml = format!("keys: [{KEY_B}]\nkeys_file: {}", keys.path().display());
    assert_error(from_yaml(&yaml), "keys_file line 1", "duplicate of keys[0]");
}

/// A CA certificate (public part only; its key was thrown away), valid until 2126.
const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBqjCCAVGgAwIBAgIUXklQadzjy/Uetk4bspuV60ZdoN0wCgYIKoZIzj0EAwIw
IjEgMB4GA1UEAwwXUHJveHlQYWwgY29uZmlnIHRlc3QgQ0EwIBcNMjYxMTI3MTk0
NDI5WhgPMjEyNjExMDMxOTQ0MjlaMCIxIDAeBgNVBAMMF1Byb3h5UGFsIGNvbmZp
ZyB0ZXN0IENBMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEKiVZERmWglyOeSRF
NIb1oZzsch60F2y+CuijDQD0pXMCSZdfcDzhRAbUrfWjSrsBwnYEMa1Doh3fXyhG
SiciOaNjMGEwHQYDVR0OBBYEFFdhYO8ZN8I+Px4guJTpYOIyXzEKMB8GA1UdIwQY
MBaAFFdhYO8ZN8I+Px4guJTpYOIyXzEKMA8GA1UdEwEB/wQFMAMBAf8wDgYDVR0P
AQH/BAQDAgEGMAoGCCqGSM49BAMCA0cAMEQCIAXhqyPdF93seO1OU/Oi1rfVDlPm
LZUbAHbW6vUWN33XAiA6mznatVMMX11/D2IgN9O97VuXYJs029z6A9Vm4oW7jQ==
-----END CERTIFICATE-----
";

#[test]
fn ca_file_is_relative_to_the_yaml_file_and_loads_its_certificates() {
    let ca = TempFile::new("ca.pem", &format!("# corporate CA\n{CA_PEM}"));
    let dir = ca.path().parent().unwrap();
    let yaml = TempFile::new(
        "proxypal.yaml",
        &format!(
            "keys: [{KEY_A}]\nupstream: {{ ca_file: ../{}/ca.pem }}\n",
            dir.file_name().unwrap().to_str().unwrap()
        ),
    );
    let c = Config::from_sources(Some(YamlSource::File(yaml.path())), NO_ENV, false).unwrap();
    let path = c.upstream.ca_file.as_deref().unwrap();
    assert!(path.ends_with("ca.pem") && path.is_file(), "{}", path.display());
    assert_eq!(c.upstream.extra_root_certificates().unwrap().len(), 1);
    assert!(c.summary().contains("extra root certificates from "), "{}", c.summary());

    let c = with_env(
        "",
        &[("PROXYPAL_KEYS", KEY_A), ("PROXYPAL_UPSTREAM__CA_FILE", ca.path().to_str().unwrap())],
    )
    .unwrap();
    assert_eq!(c.upstream.ca_file.as_deref(), Some(ca.path()));
}

#[test]
fn ca_file_errors() {
    let yaml = format!("keys: [{KEY_A}]\nupstream: {{ ca_file: /nonexistent/proxypal/ca.pem }}");
    assert_error(from_yaml(&yaml), "upstream.ca_file", "cannot read /nonexistent/proxypal/ca.pem");

    let not_pem = TempFile::new("ca.pem", "just some text\n");
    let yaml = format!("keys: [{KEY_A}]\nupstream: {{ ca_file: {} }}", not_pem.path().display());
    assert_error(from_yaml(&yaml), "upstream.ca_file", "no PEM certificate");

    let not_x509 =
        TempFile::new("ca.pem", "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n");
    let yaml = format!("keys: [{KEY_A}]\nupstream: {{ ca_file: {} }}", not_x509.path().display());
    assert_error(from_yaml(&yaml), "upstream.ca_file", "certificate #1 is not a usable X.509 certificate");
}

#[test]
fn tokens_file_is_appended_to_tokens() {
    let tokens = TempFile::new("tokens.txt", "# clients\ntok-from-file-0001 # ci\n");
    let yaml =
        format!("keys: [{KEY_A}]\nauth: {{ tokens: [{TOKEN}], tokens_file: {} }}", tokens.path().display());
    let c = from_yaml(&yaml).unwrap();
    let got: Vec<&str> = c.auth.tokens.iter().map(|t| t.expose()).collect();
    assert_eq!(got, [TOKEN, "tok-from-file-0001"]);
}

// ---------------------------------------------------------------- keys

#[test]
fn mixed_key_forms() {
    let yaml = format!(
        "keys:\n  - {KEY_A}\n  - {{ key: {KEY_B}, name: team-b, requests_per_minute: 20, burst: 2 }}\n  - key: {KEY_C}\n    name: team-c\n"
    );
    let c = from_yaml(&yaml).unwrap();
    assert_eq!(c.keys.len(), 3);
    assert_eq!(c.keys[0], KeyEntry::new(KEY_A));
    assert_eq!(c.keys[1].key.expose(), KEY_B);
    assert_eq!(c.keys[1].name.as_deref(), Some("team-b"));
    let limit = &c.keys[1].limits;
    assert_eq!((limit.requests_per_minute, limit.burst), (Some(20), Some(2)));
    assert!(c.keys[2].limits.is_empty(), "no own fields: the defaults apply");
    assert_eq!(c.keys[2].label(), "team-c");
    assert_eq!(c.keys[0].label(), "nvapi-…0001");
}

#[test]
fn proxypal_keys_is_a_comma_list_that_replaces_the_yaml_list() {
    let yaml = format!("keys: [{KEY_A}]");
    let c = with_env(&yaml, &[("PROXYPAL_KEYS", &format!(" {KEY_B}, {KEY_C},"))]).unwrap();
    let got: Vec<&str> = c.keys.iter().map(|k| k.key.expose()).collect();
    assert_eq!(got, [KEY_B, KEY_C]);

    // ...and keys_file still appends to it.
    let keys = TempFile::new("keys.txt", &format!("{KEY_A}\n"));
    let c = with_env("", &[("PROXYPAL_KEYS", KEY_B), ("PROXYPAL_KEYS_FILE", keys.path().to_str().unwrap())])
        .unwrap();
    let got: Vec<&str> = c.keys.iter().map(|k| k.key.expose()).collect();
    assert_eq!(got, [KEY_B, KEY_A]);
}

#[test]
fn numeric_looking_env_keys_and_tokens_stay_strings() {
    let c = with_env(
        "",
        &[("PROXYPAL_KEYS", "123456789012345"), ("PROXYPAL_AUTH__TOKENS", "98765432109876,true")],
    )
    .unwrap();
    assert_eq!(c.keys[0].key.expose(), "123456789012345");
    let tokens: Vec<&str> = c.auth.tokens.iter().map(|t| t.expose()).collect();
    assert_eq!(tokens, ["98765432109876", "true"]);
}

// ---------------------------------------------------------------- env

#[test]
fn env_overrides_nested_fields() {
    let yaml = format!(
        "keys: [{KEY_A}]\nupstream: {{ base_url: http://yaml.example/v1, connect_timeout: 1s }}\nrate_limit: {{ requests_per_minute: 10 }}"
    );
    let c = with_env(
        &yaml,
        &[
            ("PROXYPAL_UPSTREAM__BASE_URL", "http://127.0.0.1:9000/v1/"),
            ("PROXYPAL_RATE_LIMIT__REQUESTS_PER_MINUTE", "25"),
            ("proxypal_log__format", "json"),
            ("PROXYPAL_LISTEN", "0.0.0.0:9090"),
            ("PROXYPAL_AUTH__ALLOW_UNAUTHENTICATED", "true"),
            ("PROXYPAL_CORS__ALLOWED_ORIGINS", "https://a.example,http://localhost:3000"),
            ("PROXYPAL_LIMITS__MAX_BODY_BYTES", "1 MiB"),
            ("PROXYPAL_UPSTREAM__USER_AGENT", "acme-gateway/2.0"),
            // Not ours: ignored.
            ("PATH", "/usr/bin"),
            ("PROXYPALX_LISTEN", "garbage"),
        ],
    )
    .unwrap();
    // Trailing slash removed.
    assert_eq!(c.upstream.base_url, "http://127.0.0.1:9000/v1");
    // Untouched YAML sibling survives.
    assert_eq!(c.upstream.connect_timeout, Duration::from_secs(1));
    assert_eq!(c.rate_limit.requests_per_minute, Some(25));
    assert_eq!(c.rate_limit.burst, None);
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(c.listen, "0.0.0.0:9090".parse().unwrap());
    assert!(c.auth.allow_unauthenticated);
    assert_eq!(c.cors.allowed_origins, ["https://a.example", "http://localhost:3000"]);
    assert_eq!(c.limits.max_body_bytes, 1024 * 1024);
    assert_eq!(c.upstream.user_agent, "acme-gateway/2.0");
}

#[test]
fn env_errors_name_the_variable() {
    let e = err(with_env("", &[("PROXYPAL_KEYS", KEY_A), ("PROXYPAL_RATE_LIMIT__BURST", "lots")]));
    let msg = e.to_string();
    assert!(msg.starts_with("rate_limit.burst: "), "{msg}");
    assert!(msg.contains("environment variable PROXYPAL_RATE_LIMIT__BURST"), "{msg}");
}

/// The variables Kubernetes puts in every pod of a namespace that has a
/// Service named `proxypal` with a port named `http` on 8080.
const KUBERNETES_SERVICE_LINKS: [(&str, &str); 8] = [
    ("PROXYPAL_PORT", "tcp://10.0.0.7:8080"),
    ("PROXYPAL_SERVICE_HOST", "10.0.0.7"),
    ("PROXYPAL_SERVICE_PORT", "8080"),
    ("PROXYPAL_SERVICE_PORT_HTTP", "8080"),
    ("PROXYPAL_PORT_8080_TCP", "tcp://10.0.0.7:8080"),
    ("PROXYPAL_PORT_8080_TCP_PROTO", "tcp"),
    ("PROXYPAL_PORT_8080_TCP_PORT", "8080"),
    ("PROXYPAL_PORT_8080_TCP_ADDR", "10.0.0.7"),
];

/// The warnings that name `var` as the ignored variable (`PROXYPAL_PORT` is a
/// prefix of `PROXYPAL_PORT_8080_TCP`, so a plain `contains` would not do).
fn warnings_naming<'a>(config: &'a Config, var: &str) -> Vec<&'a str> {
    let needle = format!("variable {var} (");
    config.warnings.iter().map(String::as_str).filter(|w| w.contains(&needle)).collect()
}

#[test]
fn kubernetes_service_links_are_ignored_with_a_warning_each() {
    let mut env = KUBERNETES_SERVICE_LINKS.to_vec();
    env.push(("PROXYPAL_KEYS", KEY_A));
    let c = with_env("", &env).unwrap();
    let keys: Vec<&str> = c.keys.iter().map(|k| k.key.expose()).collect();
    assert_eq!(keys, [KEY_A]);
    // Nothing else changed: the links set no field.
    let mut expected = Config::default();
    expected.keys.push(KeyEntry::new(KEY_A));
    expected.warnings = c.warnings.clone();
    assert_eq!(c, expected);

    assert_eq!(c.warnings.len(), KUBERNETES_SERVICE_LINKS.len(), "{:#?}", c.warnings);
    for (var, _) in KUBERNETES_SERVICE_LINKS {
        let naming = warnings_naming(&c, var);
        assert_eq!(naming.len(), 1, "one warning should name {var}: {:#?}", c.warnings);
        // None of them is near a real field: no suggestion.
        assert_eq!(naming[0], format!("ignored unknown environment variable {var} (not a config field)"));
    }
    for warning in &c.warnings {
        for value in ["10.0.0.7", "tcp://"] {
            assert!(!warning.contains(value), "a warning quotes a value: {warning}");
        }
        assert_no_secrets(warning);
    }
    // A clean environment gives no warnings, and the skipped variables stay silent.
    let c = with_env(
        "",
        &[
            ("PROXYPAL_KEYS", KEY_A),
            ("PROXYPAL_CONFIG", "/etc/proxypal.yaml"),
            ("PROXYPAL_HISTORY_INTERVAL_MS", "5"),
        ],
    )
    .unwrap();
    assert!(c.warnings.is_empty(), "{:#?}", c.warnings);
}

#[test]
fn unknown_variables_suggest_the_field_they_look_like_a_typo_of() {
    let yaml = format!("keys: [{KEY_A}]\nrate_limit: {{ burst: 3 }}");
    let clean = with_env(&yaml, &[]).unwrap();
    assert!(clean.warnings.is_empty());

    let c = with_env(
        &yaml,
        &[
            ("PROXYPAL_RATE_LIMT__BURST", "7"),
            ("PROXYPAL_UPSTREAM__BASE_URI", "http://typo.example/v1"),
            ("PROXYPAL_UPSTREAM__USER_AGENT", "acme/1.0"),
        ],
    )
    .unwrap();
    assert_eq!(
        warnings_naming(&c, "PROXYPAL_RATE_LIMT__BURST"),
        [
            "ignored unknown environment variable PROXYPAL_RATE_LIMT__BURST (did you mean PROXYPAL_RATE_LIMIT__BURST?)"
        ]
    );
    assert_eq!(
        warnings_naming(&c, "PROXYPAL_UPSTREAM__BASE_URI"),
        [
            "ignored unknown environment variable PROXYPAL_UPSTREAM__BASE_URI (did you mean PROXYPAL_UPSTREAM__BASE_URL?)"
        ]
    );
    assert_eq!(c.warnings.len(), 2, "{:#?}", c.warnings);
    assert!(c.warnings.iter().all(|w| !w.contains("typo.example") && !w.contains('7')), "{:#?}", c.warnings);

    // The typos changed nothing; the real variable beside them still applies.
    assert_eq!(c.rate_limit.burst, Some(3));
    assert_eq!(c.upstream.base_url, "https://integrate.api.nvidia.com/v1");
    assert_eq!(c.upstream.user_agent, "acme/1.0");
    let mut expected = clean.clone();
    expected.upstream.user_agent = "acme/1.0".to_owned();
    expected.warnings = c.warnings.clone();
    assert_eq!(c, expected);

    // Every variable under an unknown section gets its own warning, and a
    // name given in lower case is named as given.
    let c = with_env(
        &yaml,
        &[("PROXYPAL_RATE_LIMT__BURST", "7"), ("proxypal_rate_limt__requests_per_minute", "9")],
    )
    .unwrap();
    assert_eq!(
        c.warnings,
        [
            "ignored unknown environment variable PROXYPAL_RATE_LIMT__BURST (did you mean PROXYPAL_RATE_LIMIT__BURST?)",
            "ignored unknown environment variable proxypal_rate_limt__requests_per_minute (did you mean PROXYPAL_RATE_LIMIT__REQUESTS_PER_MINUTE?)",
        ]
    );
    assert_eq!(c.rate_limit, clean.rate_limit);
}

#[test]
fn unknown_yaml_fields_stay_errors_even_when_an_env_variable_sets_them_too() {
    let yaml = format!("keys: [{KEY_A}]\nbogus_field: 1");
    assert_error(from_yaml(&yaml), "bogus_field", "unknown field");
    let e = err(with_env(&yaml, &[("PROXYPAL_BOGUS_FIELD", "2")]));
    let msg = e.to_string();
    assert!(msg.starts_with("bogus_field: unknown field"), "{msg}");
    assert!(msg.contains("YAML text"), "the error is the YAML's: {msg}");

    // Nested, and with the env variable under the same unknown section.
    let yaml = format!("keys: [{KEY_A}]\nretry: {{ max_atempts: 2 }}");
    let e = err(with_env(&yaml, &[("PROXYPAL_RETRY__MAX_ATEMPTS", "4")]));
    let msg = e.to_string();
    assert!(msg.starts_with("retry.max_atempts: unknown field"), "{msg}");
    assert!(msg.contains("YAML text"), "{msg}");
    let yaml = format!("keys: [{KEY_A}]\nrate_limt: {{ burst: 2 }}");
    let e = err(with_env(&yaml, &[("PROXYPAL_RATE_LIMT__REQUESTS_PER_MINUTE", "4")]));
    assert!(e.to_string().starts_with("rate_limt: unknown field"), "{e}");
}

#[test]
fn a_bad_value_stays_an_error_beside_unknown_variables() {
    let mut env = KUBERNETES_SERVICE_LINKS.to_vec();
    env.extend([("PROXYPAL_KEYS", KEY_A), ("PROXYPAL_RATE_LIMIT__BURST", "lots"), ("PROXYPAL_LISTEN", "x")]);
    let e = err(with_env("", &env));
    let msg = e.to_string();
    assert!(msg.starts_with("listen: "), "{msg}");
    assert!(msg.contains("environment variable PROXYPAL_LISTEN"), "{msg}");
    assert!(!msg.contains("PROXYPAL_PORT"), "{msg}");
    let env: Vec<_> = env.into_iter().filter(|(name, _)| *name != "PROXYPAL_LISTEN").collect();
    let msg = err(with_env("", &env)).to_string();
    assert!(msg.starts_with("rate_limit.burst: "), "{msg}");
    assert!(msg.contains("environment variable PROXYPAL_RATE_LIMIT__BURST"), "{msg}");
}

#[test]
fn summary_lists_the_warnings() {
    let c = with_env("", &[("PROXYPAL_KEYS", KEY_A), ("PROXYPAL_SERVICE_HOST", "10.0.0.7")]).unwrap();
    let summary = c.summary();
    assert!(
        summary.contains(
            "warning:    ignored unknown environment variable PROXYPAL_SERVICE_HOST (not a config field)\n"
        ),
        "{summary}"
    );
    assert!(!summary.contains("10.0.0.7"), "{summary}");
    assert_no_secrets(&summary);
    let clean = with_env("", &[("PROXYPAL_KEYS", KEY_A)]).unwrap().summary();
    assert!(!clean.contains("warning"), "{clean}");
}

// ---------------------------------------------------------------- durations and sizes

#[test]
fn durations_accept_humantime_and_bare_seconds() {
    let yaml = format!(
        "keys: [{KEY_A}]\nretry: {{ rate_limit_cooldown: 1m 30s, failure_cooldown: 250ms, max_failure_cooldown: 90 }}\nshutdown_grace: 1.5"
    );
    let c = with_env(&yaml, &[("PROXYPAL_RETRY__QUEUE_TIMEOUT", "30")]).unwrap();
    assert_eq!(c.retry.queue_timeout, Duration::from_secs(30));
    assert_eq!(c.retry.rate_limit_cooldown, Duration::from_secs(90));
    assert_eq!(c.retry.failure_cooldown, Duration::from_millis(250));
    assert_eq!(c.retry.max_failure_cooldown, Duration::from_secs(90));
    assert_eq!(c.shutdown_grace, Duration::from_millis(1500));

    assert_error(
        with_env("", &[("PROXYPAL_KEYS", KEY_A), ("PROXYPAL_RETRY__QUEUE_TIMEOUT", "soon")]),
        "retry.queue_timeout",
        "invalid duration \"soon\"",
    );
    assert_error(from_yaml(&format!("keys: [{KEY_A}]\nshutdown_grace: -5")), "shutdown_grace", "duration");
}

#[test]
fn body_size_accepts_units() {
    for (text, bytes) in [
        ("1024", 1024),
        ("\"10MB\"", 10_000_000),
        ("\"32 MiB\"", 32 << 20),
        ("512KiB", 512 << 10),
        ("100B", 100),
    ] {
        let c = from_yaml(&format!("keys: [{KEY_A}]\nlimits: {{ max_body_bytes: {text} }}")).unwrap();
        assert_eq!(c.limits.max_body_bytes, bytes, "{text}");
    }
    assert_error(
        from_yaml(&format!("keys: [{KEY_A}]\nlimits: {{ max_body_bytes: 12 parsecs }}")),
        "limits.max_body_bytes",
        "invalid size",
    );
}

// ---------------------------------------------------------------- validation

#[test]
fn each_validation_error_names_its_field() {
    let k = |extra: &str| format!("keys: [{KEY_A}]\n{extra}");
    let cases: &[(String, &str, &str)] = &[
        (
            k("rate_limit: { requests_per_minute: 0 }"),
            "rate_limit.requests_per_minute",
            "must be at least 1 (got 0)",
        ),
        (k("rate_limit: { burst: 0 }"), "rate_limit.burst", "must be at least 1 (got 0)"),
        (
            k("rate_limit: { burst: 41 }"),
            "rate_limit.burst",
            "41 is more than the windows allow at once (40)",
        ),
        (
            k("rate_limit: { requests_per_day: 0 }"),
            "rate_limit.requests_per_day",
            "must be at least 1 (got 0)",
        ),
        (k("rate_limit: { tokens_per_minute: 0 }"), "rate_limit.tokens_per_minute", "must be at least 1"),
        (k("rate_limit: { max_concurrent: 0 }"), "rate_limit.max_concurrent", "must be at least 1"),
        (k("rate_limit: { day_reset: \"25:00 UTC\" }"), "rate_limit.day_reset", "HH:MM"),
        (k("rate_limit: { day_reset: \"00:00 Mars/Base\" }"), "rate_limit.day_reset", "unknown time zone"),
        (
            k("rate_limit: { margin: 1m }"),
            "rate_limit.margin",
            "not shorter than the shortest rolling period",
        ),
        (
            k("rate_limit: { windows: [{ requests: 5, per: 0s }] }"),
            "rate_limit.windows[0].per",
            "longer than zero",
        ),
        (
            k("rate_limit: { windows: [{ requests: 5, tokens: 5, per: 1m }] }"),
            "rate_limit.windows[0]",
            "exactly one",
        ),
        (
            k("rate_limit: { windows: [{ tokens: 5, per: 1h, reset: \"00:00 UTC\" }] }"),
            "rate_limit.windows[0].reset",
            "needs `per: 24h`",
        ),
        (k("accounts: { alice: { requests_per_day: 0 } }"), "accounts.alice.requests_per_day", "at least 1"),
        (
            format!(
                "accounts: {{ alice: {{ requests_per_minute: 10 }} }}\nkeys: [{KEY_A}, {{ key: {KEY_B}, account: alice, requests_per_minute: 20 }}]"
            ),
            "keys[1]",
            "above account \"alice\"'s (10)",
        ),
        (
            format!("keys: [{{ key: {KEY_B}, account: alic }}]"),
            "keys[0].account",
            "no account \"alic\" in `accounts` (declared: none)",
        ),
        (k("accounts: { \" alice\": {} }"), "accounts", "without leading or trailing spaces"),
        (format!("keys: [{{ key: {KEY_B}, day_reset: noon }}]"), "keys[0].day_reset", "HH:MM"),
        (
            k("upstream: { base_url: \"ftp://x\" }"),
            "upstream.base_url",
            "must start with http:// or https:// (got \"ftp://x\")",
        ),
        (k("upstream: { base_url: \"https://x/v1?a=b\" }"), "upstream.base_url", "query"),
        (k("upstream: { base_url: \"https://user:pw@x/v1\" }"), "upstream.base_url", "credentials"),
        (k("upstream: { connect_timeout: 0s }"), "upstream.connect_timeout", "greater than 0"),
        (k("upstream: { response_timeout: 0 }"), "upstream.response_timeout", "greater than 0"),
        (k("upstream: { idle_timeout: 0 }"), "upstream.idle_timeout", "greater than 0"),
        (k("upstream: { user_agent: \"\" }"), "upstream.user_agent", "header value"),
        (k("listen: localhost:80x"), "listen", "invalid socket address \"localhost:80x\""),
        (k("retry: { max_attempts: 0 }"), "retry.max_attempts", "must be between 1 and 10"),
        (k("retry: { max_attempts: 11 }"), "retry.max_attempts", "must be between 1 and 10 (got 11)"),
        (
            k("retry: { failure_cooldown: 2m, max_failure_cooldown: 1m }"),
            "retry.failure_cooldown",
            "must not exceed retry.max_failure_cooldown",
        ),
        (k("log: { format: xml }"), "log.format", "`text` or `json`"),
        (k("log: { level: \" \" }"), "log.level", "must not be empty"),
        (k("limits: { max_body_bytes: 0 }"), "limits.max_body_bytes", "must be at least 1"),
        (k("limits: { max_inflight: 0 }"), "limits.max_inflight", "must be at least 1"),
        (k("workers: 0"), "workers", "must be between 1 and 256 (got 0)"),
        (k("workers: 257"), "workers", "must be between 1 and 256 (got 257)"),
        (k("workers: some"), "workers", "some"),
        (
            k("cors: { allowed_origins: [\"*\", \"https://a.example\"] }"),
            "cors.allowed_origins[0]",
            "only entry",
        ),
        (
            k("cors: { allowed_origins: [\"https://a.example/\"] }"),
            "cors.allowed_origins[0]",
            "no path or trailing /",
        ),
        (k("cors: { allowed_origins: [\"a.example\"] }"), "cors.allowed_origins[0]", "(got \"a.example\")"),
        (
            k("cors: { allowed_origins: [\"https://a.example\", \"https://a.example\"] }"),
            "cors.allowed_origins[1]",
            "duplicate of cors.allowed_origins[0]",
        ),
        (k("auth: { tokens: [\"\"] }"), "auth.tokens[0]", "empty token"),
        (
            k(&format!("auth: {{ tokens: [{TOKEN}, {TOKEN}] }}")),
            "auth.tokens[1]",
            "duplicate of auth.tokens[0] (client-…9999)",
        ),
        (format!("keys: [{KEY_A}, {KEY_B}, \"\"]"), "keys[2]", "empty key"),
        (format!("keys: [{KEY_A}, {{ key: {KEY_B}, burst: 0 }}]"), "keys[1].burst", "must be at least 1"),
        (
            format!("keys: [{{ key: {KEY_B}, requests_per_minute: 0 }}]"),
            "keys[0].requests_per_minute",
            "must be at least 1",
        ),
        (format!("keys: [{{ key: {KEY_B}, name: \"\" }}]"), "keys[0].name", "must not be empty"),
        (
            format!("keys: [{{ key: {KEY_A}, name: x }}, {{ key: {KEY_B}, name: x }}]"),
            "keys[1].name",
            "duplicate of keys[0].name (\"x\")",
        ),
        (
            format!("keys: [{KEY_A}, {KEY_B}, {KEY_C}, {KEY_A}]"),
            "keys[3]",
            "duplicate of keys[0] (nvapi-…0001)",
        ),
        (format!("keys: [\"{KEY_A} \"]"), "keys[0]", "whitespace"),
        (format!("keys: [{KEY_A}]\nbogus_field: 1"), "bogus_field", "unknown field"),
        (
            format!("keys: [{KEY_A}]\nretry: {{ max_atempts: 2 }}"),
            "retry.max_atempts",
            "unknown field: found `max_atempts`",
        ),
        (format!("keys: [{{ key: {KEY_A}, nmae: x }}]"), "keys[0].nmae", "unknown field"),
        ("keys: [{ name: x }]".to_owned(), "keys[0]", "missing field `key`"),
    ];
    for (yaml, field, needle) in cases {
        let e = err(from_yaml(yaml));
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!("{field}: ")),
            "error should start with {field:?}:\n  yaml: {yaml}\n  got:  {msg}"
        );
        assert!(msg.contains(needle), "error should contain {needle:?}:\n  yaml: {yaml}\n  got:  {msg}");
        assert_no_secrets(&msg);
        assert_no_secrets(&format!("{e:?}"));
    }
}

#[test]
fn validate_can_be_rerun_after_adding_keys() {
    let mut c = Config::dev();
    c.keys.push(KeyEntry::new(KEY_A));
    c.keys.push(KeyEntry::new(KEY_A));
    let e = c.validate(true).unwrap_err();
    assert_eq!(e.to_string(), "keys[1]: duplicate of keys[0] (nvapi-…0001)");
    assert_eq!(e.field(), Some("keys[1]"));
}

// ---------------------------------------------------------------- secrets

#[test]
fn secrets_never_appear_in_debug_summary_or_errors() {
    let yaml = format!(
        "keys:\n  - {KEY_A}\n  - {{ key: {KEY_B}, name: team-b, burst: 2 }}\nauth: {{ tokens: [{TOKEN}] }}"
    );
    let c = with_env(&yaml, &[]).unwrap();
    assert_no_secrets(&format!("{c:?}"));
    assert_no_secrets(&format!("{c:#?}"));
    let summary = c.summary();
    assert_no_secrets(&summary);
    assert!(summary.contains("nvapi-…0001"), "{summary}");
    assert!(summary.contains("team-b"), "{summary}");
    assert!(summary.contains("burst 2"), "{summary}");
    assert!(summary.contains("rate limit: 40/min, margin 500ms per key (default)"), "{summary}");
    assert!(summary.contains("listen:     127.0.0.1:8080"), "{summary}");
    assert!(summary.contains("https://integrate.api.nvidia.com/v1"), "{summary}");

    // Badly shaped entries whose error would naturally quote the secret.
    let bad = [
        format!("keys: {KEY_A}"),
        format!("keys: [{{ key: {KEY_A}, burst: fast }}]"),
        format!("keys: [{KEY_A}: team-a]"),
        format!("keys: {{ {KEY_A}: 1 }}"),
        "keys: [123456789012345678]".to_owned(),
        format!("keys: [{{ key: [{KEY_A}] }}]"),
        format!("keys: [{KEY_A}]\nauth: {{ tokens: {TOKEN} }}"),
        format!("keys: [{KEY_A}]\nauth: {{ {TOKEN}: 1 }}"),
        KEY_A.to_owned(),
        format!("- {KEY_A}"),
        format!("keys: [\"{KEY_A}\n{KEY_B}\"]"),
        format!("keys: [{{ {KEY_A}: 1, {KEY_A}: 2 }}]"),
        format!("keys: [{{ {KEY_A}: !secret x }}]"),
        format!("keys: [{{ key: {KEY_A}, {KEY_B}: [1, {{ 7: x }}] }}]"),
        format!("keys: [{KEY_A}, {KEY_A}]"),
    ];
    for yaml in &bad {
        let e = err(from_yaml(yaml));
        assert_no_secrets(&e.to_string());
        assert_no_secrets(&format!("{e:?}"));
        assert_no_secrets(&format!("{e:#?}"));
    }
    // The numeric key too.
    let e = err(from_yaml("keys: [123456789012345678]"));
    assert!(!e.to_string().contains("123456789012345678"), "{e}");
    let e = err(from_yaml("keys: [{ key: 123456789012345678 }]"));
    assert!(!e.to_string().contains("123456789012345678"), "{e}");
}

#[test]
fn mask_key_rules() {
    assert_eq!(mask_key("nvapi-0123456789abcdefwxyz"), "nvapi-…wxyz");
    assert_eq!(mask_key("sk-0123456789abcdefwxyz"), "sk-…wxyz");
    // A long or late prefix is not kept.
    assert_eq!(mask_key("verylongprefix-0123456789wxyz"), "…wxyz");
    assert_eq!(mask_key("0123456789abcdefwxyz"), "…wxyz");
    // Short keys show less.
    assert_eq!(mask_key("abcdefghijk"), "…jk");
    assert_eq!(mask_key("abcdefgh"), "…gh");
    assert_eq!(mask_key("abcdefg"), "…");
    assert_eq!(mask_key(""), "…");
    // A prefix is kept only if enough secret follows it.
    assert_eq!(mask_key("nvapi-abcdefg"), "…defg");
    // Multi-byte characters are counted as characters.
    assert_eq!(mask_key("nvapi-ééééééééééééwxyz"), "nvapi-…wxyz");
    // Never more than the last 4 characters of what follows the prefix.
    for key in [KEY_A, KEY_B, TOKEN] {
        let masked = mask_key(key);
        let shown = masked.rsplit('…').next().unwrap();
        assert!(shown.chars().count() <= 4, "{masked}");
    }
}

#[test]
fn refuses_a_public_listen_address_without_client_tokens() {
    let yaml = format!("keys: [{KEY_A}]\nlisten: 0.0.0.0:8080");
    let err = with_env(&yaml, &[]).unwrap_err();
    assert_eq!(err.field(), Some("auth.tokens"));
    let text = err.to_string();
    assert!(text.contains("not a loopback address") && text.contains("allow_unauthenticated"), "{text}");
    // Tokens, or an explicit opt-out, make it acceptable; loopback never needs one.
    assert!(with_env(&yaml, &[("PROXYPAL_AUTH__TOKENS", "client-token-0123456789")]).is_ok());
    assert!(with_env(&yaml, &[("PROXYPAL_AUTH__ALLOW_UNAUTHENTICATED", "true")]).is_ok());
    assert!(with_env(&format!("keys: [{KEY_A}]\nlisten: 127.0.0.1:8080"), &[]).is_ok());
    assert!(with_env(&format!("keys: [{KEY_A}]\nlisten: \"[::1]:8080\""), &[]).is_ok());
}

mod providers {
    //! `providers`, `models` and `routing` (issue 12): what a file may say,
    //! and the field named when it says something wrong.

    use proxypal_server::config::{Config, ConfigError, YamlSource};

    fn load(yaml: &str) -> Result<Config, ConfigError> {
        Config::from_sources(Some(YamlSource::Text(yaml)), std::iter::empty::<(&str, &str)>(), false)
    }

    const TWO: &str = "providers:
  nvidia:
    preset: nvidia
    keys: [nvapi-REPLACE-ME-000000000001]
  groq:
    preset: groq
    base_url: https://api.groq.com/openai/v1
    keys: [gsk_REPLACE_ME_00000000000001]
    rate_limit: { requests_per_minute: 30, requests_per_day: 1000, tokens_per_minute: 6000 }
    quota_scope: account
  local:
    base_url: http://127.0.0.1:11434/v1
    auth: none
models:
  llama-70b:
    targets:
      - { provider: nvidia, model: meta/llama-3.3-70b-instruct, tier: 1 }
      - { provider: groq, model: llama-3.3-70b-versatile, tier: 1, weight: 2 }
      - { provider: local, model: 'llama3.3:70b', tier: 2 }
routing:
  default_provider: nvidia
";

    #[test]
    fn the_issue_s_example_loads_and_converts() {
        let config = load(TWO).unwrap();
        assert_eq!(config.providers.len(), 3);
        let gateway = proxypal_server::convert::gateway_config(&config).unwrap();
        let groq = gateway.providers.iter().find(|p| p.name == "groq").unwrap();
        assert_eq!(groq.limits.requests_per_minute, Some(30));
        assert_eq!(groq.limits.tokens_per_minute, Some(6000));
        assert_eq!(groq.preset, Some("groq"));
        assert!(groq.strip.contains(&"logit_bias".to_owned()), "the preset's stripped fields");
        let local = gateway.providers.iter().find(|p| p.name == "local").unwrap();
        assert_eq!(local.auth, proxypal_gateway::Auth::None);
        assert_eq!(local.upstream.base_url, "http://127.0.0.1:11434/v1");
        assert_eq!(gateway.models["llama-70b"].targets[1].weight, 2);
        gateway.check_limits().unwrap();
        let summary = config.summary();
        assert!(summary.contains("groq: https://api.groq.com/openai/v1, preset groq"), "{summary}");
        assert!(summary.contains("tier 2 weight 1: local/llama3.3:70b"), "{summary}");
        assert!(!summary.contains("REPLACE-ME-000000000001"), "keys are masked: {summary}");
    }

    #[test]
    fn mistakes_name_their_field() {
        let cases: [(&str, &str, &str); 9] = [
            ("nvidia:\n    preset: nvidia", "nvidia:\n    preset: nvidai", "providers.nvidia.preset"),
            (
                "provider: groq, model: llama-3.3",
                "provider: grok, model: llama-3.3",
                "models.llama-70b.targets[1].provider",
            ),
            ("tier: 1, weight: 2", "tier: 1, weight: 0", "models.llama-70b.targets[1].weight"),
            ("  default_provider: nvidia\n", "  default_provider: nvidai\n", "routing.default_provider"),
            ("routing:\n  default_provider: nvidia\n", "", "routing.default_provider"),
            ("    auth: none\n", "    auth: none\n    keys: [x-key-000000000001]\n", "providers.local.keys"),
            ("    base_url: http://127.0.0.1:11434/v1\n", "", "providers.local.base_url"),
            (
                "requests_per_minute: 30,",
                "requests_per_minute: 30, burst: 31,",
                "providers.groq.rate_limit.burst",
            ),
            ("quota_scope: account", "quota_scope: organisation", ""),
        ];
        for (from, to, field) in cases {
            assert!(TWO.contains(from), "{from}");
            let yaml = TWO.replace(from, to);
            let err = load(&yaml).expect_err(to);
            if field.is_empty() {
                assert!(err.to_string().contains("quota_scope"), "{err}");
            } else {
                assert_eq!(err.field(), Some(field), "{err}");
            }
        }
        // The single-provider fields beside `providers`: a mistake, not silently ignored.
        let err = load(&format!("keys: [nvapi-REPLACE-ME-000000000009]\n{TWO}")).unwrap_err();
        assert_eq!(err.field(), Some("keys"), "{err}");
        assert!(err.to_string().contains("providers.<name>.keys"), "{err}");
        let err = load(&format!("rate_limit: {{ requests_per_minute: 5 }}\n{TWO}")).unwrap_err();
        assert_eq!(err.field(), Some("rate_limit"), "{err}");
        // A provider named like a namespace of NVIDIA's catalog would take its models' requests.
        let err = load(&TWO.replace("  local:\n", "  meta:\n").replace("provider: local", "provider: meta"))
            .unwrap_err();
        assert_eq!(err.field(), Some("providers.meta"), "{err}");
    }

    #[test]
    fn a_bad_providers_file_exits_64_naming_the_field() {
        let dir = tempfile_dir("exit-64");
        let path = dir.join("proxypal.yaml");
        std::fs::write(&path, TWO.replace("provider: groq, model", "provider: grok, model")).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_proxypal-server"))
            .args(["--config", path.to_str().unwrap(), "--check"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("models.llama-70b.targets[1].provider"), "{stderr}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_providers_keys_file_is_read_beside_the_config_and_watched_for_reload() {
        let dir = tempfile_dir("keys-file");
        std::fs::write(dir.join("groq.keys"), "# groq\ngsk_FILE_KEY_000000000001\n").unwrap();
        let path = dir.join("proxypal.yaml");
        std::fs::write(&path, TWO.replace("keys: [gsk_REPLACE_ME_00000000000001]", "keys_file: groq.keys"))
            .unwrap();
        let config =
            Config::from_sources(Some(YamlSource::File(&path)), std::iter::empty::<(&str, &str)>(), false)
                .unwrap();
        let groq = &config.providers["groq"];
        assert_eq!(groq.keys.len(), 1);
        assert_eq!(groq.keys[0].key.expose(), "gsk_FILE_KEY_000000000001");
        let watched = proxypal_server::reload::watched_files(Some(&path), &config);
        assert!(watched.contains(&dir.join("groq.keys")), "{watched:?}");
        // A key file line names the provider's file in errors.
        std::fs::write(dir.join("groq.keys"), "gsk_FILE_KEY_000000000001\ngsk_FILE_KEY_000000000001\n")
            .unwrap();
        let err =
            Config::from_sources(Some(YamlSource::File(&path)), std::iter::empty::<(&str, &str)>(), false)
                .unwrap_err();
        assert_eq!(err.field(), Some("providers.groq.keys_file line 2"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A directory of this test process for the test `tag`.
    fn tempfile_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("proxypal-providers-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}

mod shared {
    use super::*;

    const KEYS: &str = "keys: [nvapi-shared-config-test-000000000001]\n";

    #[test]
    fn the_shared_section_reads_its_fields_and_env_and_never_shows_a_password() {
        let yaml = format!(
            "{KEYS}shared:\n  redis_url: redis://:s3cret-pass@10.0.0.7:6379/2\n  timeout: 25ms\n  replicas: 3\n  lease: 2s\n  heartbeat: 500ms\n  max_degraded: 5m\n"
        );
        let config = from_yaml(&yaml).unwrap();
        let shared = config.shared.clone().unwrap();
        assert_eq!(
            (shared.timeout, shared.replicas, shared.lease, shared.max_degraded),
            (Duration::from_millis(25), 3, Duration::from_secs(2), Duration::from_secs(300))
        );
        assert_eq!(shared.key_prefix, "proxypal");
        assert!(!format!("{config:?}").contains("s3cret-pass"), "the URL's password never shows");
        let gateway = proxypal_server::convert::gateway_config(&config).unwrap();
        assert!(!format!("{:?}", gateway.shared).contains("s3cret-pass"));
        // The environment sets it too, as documented.
        let env = with_env(KEYS, &[("PROXYPAL_SHARED__REDIS_URL", "redis://127.0.0.1:6390/0")]).unwrap();
        assert_eq!(env.shared.unwrap().redis_url, "redis://127.0.0.1:6390/0");
    }

    #[test]
    fn shared_mistakes_name_their_field() {
        for (body, field, needle) in [
            ("  redis_url: http://127.0.0.1:6379\n", "shared.redis_url", "redis:// or rediss://"),
            ("  redis_url: redis://h:6379\n  key_prefix: \"a{b}\"\n", "shared.key_prefix", "hash tag"),
            ("  redis_url: redis://h:6379\n  timeout: 0s\n", "shared.timeout", ""),
            ("  redis_url: redis://h:6379\n  lease: 1s\n", "shared.lease", "twice"),
        ] {
            assert_error(from_yaml(&format!("{KEYS}shared:\n{body}")), field, needle);
        }
        let missing = from_yaml(&format!(
            "{KEYS}shared:\n  redis_url: rediss://h:6380\n  ca_file: /nonexistent/ca.pem\n"
        ));
        assert_error(missing, "shared.ca_file", "cannot read /nonexistent/ca.pem");
    }
}

mod clients_ledger_webhooks {
    use super::*;

    const KEYS: &str = "keys: [nvapi-clients-config-test-00000000001]\n";

    #[test]
    fn clients_webhooks_and_the_ledger_read_their_fields() {
        let yaml = format!(
            "{KEYS}clients:\n  - name: alice\n    token: {TOKEN}\n    requests_per_minute: 20\n    tokens_per_day: 200000\n    models: [llama-70b, \"meta/*\"]\n    weight: 2\n    admin: true\n\
             webhooks:\n  - url: https://hooks.example.com/T000/B000/XXXXsecretpath\n    events: [key.disabled, pool.exhausted]\n    secret: whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n\
             ledger:\n  backend: postgres\n  url: postgres://pp:pg-s3cret@127.0.0.1:5432/test\n  retention: 30d\n"
        );
        let config = from_yaml(&yaml).unwrap();
        let alice = &config.clients[0];
        assert_eq!((alice.name.as_str(), alice.weight, alice.admin), ("alice", 2, true));
        assert_eq!(alice.models, ["llama-70b", "meta/*"]);
        assert_eq!(config.ledger.retention, Duration::from_secs(30 * 86_400));
        let debug = format!("{config:?}");
        for secret in [TOKEN, "pg-s3cret", "MfKQ9r8G", "XXXXsecretpath"] {
            assert!(!debug.contains(secret), "{secret} shows in {debug}");
        }
        let gateway = proxypal_server::convert::gateway_config(&config).unwrap();
        assert_eq!(gateway.clients.len(), 1);
        let hooks = proxypal_server::convert::webhook_config(&config).unwrap();
        assert_eq!(hooks.endpoints[0].events.len(), 2);
    }

    #[test]
    fn mistakes_name_their_field() {
        let client = |extra: &str| format!("{KEYS}clients:\n  - name: alice\n    token: {TOKEN}\n{extra}");
        for (yaml, field, needle) in [
            (client("    weight: 0\n"), "clients[0].weight", "between 1 and 1000"),
            (client("    requests_per_minute: 0\n"), "clients[0].requests_per_minute", "at least 1"),
            (client("    day_reset: \"25:00 UTC\"\n"), "clients[0].day_reset", ""),
            (client("    models: [\"\"]\n"), "clients[0].models[0]", "empty"),
            (format!("{KEYS}clients:\n  - name: alice\n"), "clients[0].token", "required"),
            (
                format!("{KEYS}auth:\n  tokens: [{TOKEN}]\nclients:\n  - name: alice\n    token: {TOKEN}\n"),
                "clients[0].token",
                "",
            ),
            (
                format!(
                    "{KEYS}clients:\n  - {{name: a, token: {TOKEN}}}\n  - {{name: a, token: other-token-0000000001}}\n"
                ),
                "clients[1].name",
                "already",
            ),
            (format!("{KEYS}webhooks:\n  - url: ftp://x\n"), "webhooks[0].url", "http"),
            (
                format!("{KEYS}webhooks:\n  - url: http://h/x\n    events: [key.melted]\n"),
                "webhooks[0].events[0]",
                "key.melted",
            ),
            (
                format!("{KEYS}webhooks:\n  - url: http://h/x\n    secret: \"whsec_%%%\"\n"),
                "webhooks[0].secret",
                "",
            ),
            (format!("{KEYS}ledger:\n  backend: postgres\n"), "ledger.url", "required"),
            (format!("{KEYS}ledger:\n  retention: 5m\n"), "ledger.retention", "1h"),
        ] {
            assert_error(from_yaml(&yaml), field, needle);
        }
    }

    #[test]
    fn the_ledger_is_set_from_the_environment_too() {
        let env = [
            ("PROXYPAL_LEDGER__BACKEND", "postgres"),
            ("PROXYPAL_LEDGER__URL", "postgres://pp:env-s3cret@127.0.0.1:5432/test"),
            ("PROXYPAL_LEDGER__RETENTION", "7d"),
        ];
        let config = with_env(KEYS, &env).unwrap();
        assert_eq!(config.ledger.backend, proxypal_server::config::LedgerBackend::Postgres);
        assert_eq!(config.ledger.retention, Duration::from_secs(7 * 86_400));
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
        assert!(!format!("{config:?}").contains("env-s3cret"));
    }

    #[test]
    fn a_client_token_from_a_file() {
        let file = TempFile::new("client-token", &format!("# alice's token\n{TOKEN}\n"));
        let yaml = format!("{KEYS}clients:\n  - name: alice\n    token_file: {}\n", file.0.display());
        let config = from_yaml(&yaml).unwrap();
        assert_eq!(config.clients[0].token.as_ref().unwrap().expose(), TOKEN);
    }
}
