//! figment providers for the two layers above the defaults: a YAML document
//! (parsed with `yaml_serde`, not figment's `yaml` feature) and an explicit
//! list of environment variables (so tests never touch the process env).

use std::path::{Path, PathBuf};

use figment::{
    Error, Metadata, Profile, Provider,
    value::{Dict, Map, Value},
};

/// Prefix of every environment variable that configures ProxyPal.
pub(crate) const ENV_PREFIX: &str = "PROXYPAL_";

/// Separator that nests an environment variable's name: `UPSTREAM__BASE_URL`.
const ENV_NESTING: &str = "__";

/// Name of the environment layer in figment's metadata; errors from it are
/// rendered with the variable's name instead of a key path.
pub(crate) const ENV_LAYER_NAME: &str = "environment variable";

/// Fields that are lists but are given in the environment as one
/// comma-separated string, e.g. `PROXYPAL_KEYS=nvapi-a,nvapi-b`. figment's own
/// `Env` would hand such a string to a list field and fail; these are split
/// here instead, and the resulting list replaces the YAML one.
const ENV_LIST_FIELDS: &[&str] = &["keys", "auth.tokens", "cors.allowed_origins"];

/// `PROXYPAL_*` variables that are not config fields, so the env layer skips
/// them: `PROXYPAL_CONFIG` (the `--config` path, read by the CLI) and the
/// test-only `PROXYPAL_HISTORY_INTERVAL_MS` (read by `history::interval_from_env`).
const ENV_NOT_FIELDS: &[&str] = &["config", "history_interval_ms"];

/// A YAML document: a file (kept as the error source) or inline text.
pub(crate) struct YamlLayer {
    text: String,
    path: Option<PathBuf>,
}

impl YamlLayer {
    pub(crate) fn file(path: &Path, text: String) -> Self {
        Self { text, path: Some(path.to_owned()) }
    }

    pub(crate) fn text(text: &str) -> Self {
        Self { text: text.to_owned(), path: None }
    }
}

impl Provider for YamlLayer {
    fn metadata(&self) -> Metadata {
        match &self.path {
            Some(path) => Metadata::from("YAML file", path.as_path()),
            None => Metadata::named("YAML text"),
        }
    }

    fn data(&self) -> Result<Map<Profile, Dict>, Error> {
        let doc: yaml_serde::Value = yaml_serde::from_str(&self.text)
            .map_err(|e| Error::from(format!("invalid YAML: {}", mask_quoted(&e.to_string()))))?;
        let dict = match doc {
            // An empty (or all-comments) document.
            yaml_serde::Value::Null => Dict::new(),
            yaml_serde::Value::Mapping(map) => yaml_mapping(map, &mut Vec::new()).map_err(Error::from)?,
            // Not quoted: the document might be nothing but a key.
            other => {
                return Err(Error::from(format!(
                    "the document must be a map of fields such as `listen:` and `keys:` (found {})",
                    yaml_kind(&other)
                )));
            }
        };
        Ok(Profile::Default.collect(dict))
    }
}

/// Masks every `"quoted"` span of a YAML parser message: some quote the
/// document (`duplicate entry with key "nvapi-…"`), and that may be a secret.
fn mask_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find('"') {
        out.push_str(&rest[..=start]);
        let after = &rest[start + 1..];
        // The closing quote is the first one not escaped by a backslash.
        let mut escaped = false;
        let end = after.char_indices().find_map(|(i, c)| {
            let closes = c == '"' && !escaped;
            escaped = c == '\\' && !escaped;
            closes.then_some(i)
        });
        match end {
            Some(end) => {
                out.push_str(&super::secret::mask_key(&after[..end]));
                out.push('"');
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&super::secret::mask_key(after));
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Converts YAML to figment's values ourselves rather than through serde, so
/// that no error message can quote a value (which may be a secret).
fn yaml_value(value: yaml_serde::Value, path: &mut Vec<String>) -> Result<Value, String> {
    use yaml_serde::Value as Y;
    Ok(match value {
        Y::Null => Value::from(figment::value::Empty::Unit),
        Y::Bool(b) => Value::from(b),
        Y::Number(n) => {
            if let Some(u) = n.as_u64() {
                Value::from(u)
            } else if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(f) = n.as_f64() {
                Value::from(f)
            } else {
                return Err(yaml_error(path, "unsupported number"));
            }
        }
        Y::String(s) => Value::from(s),
        Y::Sequence(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                path.push(i.to_string());
                out.push(yaml_value(item, path)?);
                path.pop();
            }
            Value::from(out)
        }
        Y::Mapping(map) => Value::from(yaml_mapping(map, path)?),
        Y::Tagged(_) => return Err(yaml_error(path, "YAML tags (`!tag`) are not supported")),
    })
}

fn yaml_mapping(map: yaml_serde::Mapping, path: &mut Vec<String>) -> Result<Dict, String> {
    let mut dict = Dict::new();
    for (key, value) in map {
        let yaml_serde::Value::String(key) = key else {
            return Err(yaml_error(path, &format!("map keys must be strings (found {})", yaml_kind(&key))));
        };
        path.push(key);
        let value = yaml_value(value, path)?;
        if let Some(key) = path.pop() {
            dict.insert(key, value);
        }
    }
    Ok(dict)
}

fn yaml_kind(value: &yaml_serde::Value) -> &'static str {
    use yaml_serde::Value as Y;
    match value {
        Y::Null => "null",
        Y::Bool(_) => "a boolean",
        Y::Number(_) => "a number",
        Y::String(_) => "a string",
        Y::Sequence(_) => "a list",
        Y::Mapping(_) => "a map",
        Y::Tagged(_) => "a tagged value",
    }
}

/// A structural YAML error; the path (made of field names and indices, never
/// values) is named in the message because provider errors carry no path.
fn yaml_error(path: &[String], problem: &str) -> String {
    if path.is_empty() {
        problem.to_owned()
    } else {
        let path: Vec<String> = path.iter().map(|segment| super::path::safe_segment(segment)).collect();
        format!("{}: {problem}", super::path::field_path(&path))
    }
}

/// `PROXYPAL_*` environment variables, given explicitly.
///
/// Names are matched case-insensitively, lower-cased, and `__` nests:
/// `PROXYPAL_RATE_LIMIT__BURST=2` becomes `rate_limit.burst = 2`. Values are
/// parsed as figment's `Env` does (so `30` is a number and `true` a bool),
/// except the list fields in [`ENV_LIST_FIELDS`], which are comma-separated.
///
/// The layer remembers which variable set which key path, so that a path the
/// config does not know can be [dropped](Self::drop_unknown_fields) with a
/// warning naming the variable instead of failing the whole load.
pub(crate) struct EnvLayer {
    dict: Dict,
    /// Every variable that went into `dict`, in the order given.
    vars: Vec<EnvVar>,
}

/// One `PROXYPAL_*` variable: the key path it sets and its name as given.
/// Its value is deliberately not kept: it may be a secret.
struct EnvVar {
    path: Vec<String>,
    name: String,
}

impl EnvLayer {
    pub(crate) fn new<I, K, V>(vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut dict = Dict::new();
        let mut seen = Vec::new();
        for (name, value) in vars {
            let name = name.as_ref().trim();
            let Some(prefix) = name.get(..ENV_PREFIX.len()) else {
                continue;
            };
            if !prefix.eq_ignore_ascii_case(ENV_PREFIX) {
                continue;
            }
            let key = name[ENV_PREFIX.len()..].to_ascii_lowercase().replace(ENV_NESTING, ".");
            let path: Vec<&str> = key.split('.').collect();
            if path.iter().any(|segment| segment.is_empty()) || ENV_NOT_FIELDS.contains(&key.as_str()) {
                continue;
            }
            let value = value.as_ref();
            let value = if ENV_LIST_FIELDS.contains(&key.as_str()) {
                Value::from(split_list(value))
            } else {
                match value.parse::<Value>() {
                    Ok(v) => v,
                    Err(never) => match never {},
                }
            };
            insert_nested(&mut dict, &path, value);
            seen.push(EnvVar { path: path.iter().map(|s| (*s).to_owned()).collect(), name: name.to_owned() });
        }
        Self { dict, vars: seen }
    }

    /// How many variables the layer holds: a bound on how often
    /// [`drop_unknown_fields`](Self::drop_unknown_fields) can remove one.
    pub(crate) fn len(&self) -> usize {
        self.vars.len()
    }

    /// Removes every path this layer sets that `error` (a chain of figment
    /// errors from extracting the config) reports as an unknown field, and
    /// returns one warning per variable removed, naming it (and, if it looks
    /// like a typo, the variable it probably meant), never its value.
    ///
    /// Returns no warnings when nothing was removed: then the error is a real
    /// one (a bad value, or an unknown field that only the YAML sets). A path
    /// that the YAML sets as well is removed here too, so that extracting
    /// again reports the YAML's unknown field as the YAML's.
    pub(crate) fn drop_unknown_fields(&mut self, error: &figment::Error) -> Vec<String> {
        let mut warnings = Vec::new();
        // `figment::Error` only iterates by value.
        for e in error.clone() {
            let figment::error::Kind::UnknownField(field, expected) = &e.kind else {
                continue;
            };
            // figment puts the unknown key itself at the end of the path
            // (`retry.max_atempts`); accept a parent path too, in case that
            // changes.
            let mut path = e.path.clone();
            if path.last() != Some(field) {
                path.push(field.clone());
            }
            if !remove_nested(&mut self.dict, &path) {
                continue;
            }
            let suggestion = closest(field, expected);
            let (removed, kept) =
                std::mem::take(&mut self.vars).into_iter().partition(|var| var.path.starts_with(&path));
            self.vars = kept;
            for var in removed {
                warnings.push(unknown_var_warning(&var, path.len() - 1, suggestion));
            }
        }
        warnings
    }
}

/// The warning for a variable that sets no config field. `segment` is the
/// index of the unknown segment in its path, `suggestion` the field that
/// segment probably meant.
fn unknown_var_warning(var: &EnvVar, segment: usize, suggestion: Option<&str>) -> String {
    let name = display_name(&var.name);
    match suggestion {
        Some(field) => {
            let mut path: Vec<&str> = var.path.iter().map(String::as_str).collect();
            if let Some(unknown) = path.get_mut(segment) {
                *unknown = field;
            }
            let meant = format!("{ENV_PREFIX}{}", path.join(ENV_NESTING).to_ascii_uppercase());
            format!("ignored unknown environment variable {name} (did you mean {meant}?)")
        }
        None => format!("ignored unknown environment variable {name} (not a config field)"),
    }
}

/// A variable's name as it may be logged: as given if it is made of
/// letters, digits and `_` (as names are), otherwise quoted and escaped so
/// that it cannot forge a log line.
fn display_name(name: &str) -> String {
    if name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        name.to_owned()
    } else {
        format!("{name:?}")
    }
}

/// The field in `expected` that `unknown` is most likely a typo of: the
/// nearest by edit distance, if it is within a third of `unknown`'s length
/// (at most 2). So `rate_limt` → `rate_limit`, but `port` suggests nothing.
pub(crate) fn closest<'a>(unknown: &str, expected: &[&'a str]) -> Option<&'a str> {
    let limit = (unknown.chars().count() / 3).min(2);
    expected
        .iter()
        .map(|candidate| (edit_distance(unknown, candidate), *candidate))
        .filter(|&(distance, _)| distance <= limit)
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, candidate)| candidate)
}

/// Edit distance counting insertions, deletions, substitutions and swaps of
/// two neighbours (optimal string alignment), over characters.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // Three rows of the classic table: two back, one back, current.
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current: Vec<usize> = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        current[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (previous[j] + 1).min(current[j - 1] + 1).min(previous[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(before[j - 2] + 1);
            }
            current[j] = best;
        }
        std::mem::swap(&mut before, &mut previous);
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

/// Splits a comma-separated list, trimming items and dropping empty ones (so a
/// trailing comma is harmless and an empty variable is an empty list).
pub(crate) fn split_list(value: &str) -> Vec<String> {
    value.split(',').map(str::trim).filter(|item| !item.is_empty()).map(str::to_owned).collect()
}

fn insert_nested(dict: &mut Dict, path: &[&str], value: Value) {
    match path {
        [] => {}
        [last] => {
            dict.insert((*last).to_owned(), value);
        }
        [first, rest @ ..] => {
            let entry = dict.entry((*first).to_owned()).or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                // `PROXYPAL_UPSTREAM=x` and `PROXYPAL_UPSTREAM__BASE_URL=y`:
                // the nested one wins, as with figment's `Env`.
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert_nested(inner, rest, value);
            }
        }
    }
}

/// Removes the value at `path` (and everything under it); whether it was there.
fn remove_nested(dict: &mut Dict, path: &[String]) -> bool {
    match path {
        [] => false,
        [last] => dict.remove(last).is_some(),
        [first, rest @ ..] => match dict.get_mut(first) {
            Some(Value::Dict(_, inner)) => {
                let removed = remove_nested(inner, rest);
                // Leave no empty map behind, as if the variable had never been set.
                if removed && inner.is_empty() {
                    dict.remove(first);
                }
                removed
            }
            _ => false,
        },
    }
}

impl Provider for EnvLayer {
    fn metadata(&self) -> Metadata {
        Metadata::named(ENV_LAYER_NAME).interpolater(|_profile: &Profile, keys: &[&str]| env_var_name(keys))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, Error> {
        Ok(Profile::Default.collect(self.dict.clone()))
    }
}

/// The variable that sets a key path: `["upstream", "base_url"]` →
/// `PROXYPAL_UPSTREAM__BASE_URL`. Indices into a list (`keys.1`) map to the
/// list's variable, since lists are given whole.
pub(crate) fn env_var_name(keys: &[&str]) -> String {
    let named: Vec<&str> =
        keys.iter().copied().take_while(|k| !k.chars().all(|c| c.is_ascii_digit())).collect();
    format!("{ENV_PREFIX}{}", named.join(ENV_NESTING).to_ascii_uppercase())
}

/// One secret read from a keys or tokens file, with its 1-based line number.
pub(crate) struct ListLine {
    pub(crate) line: usize,
    pub(crate) value: String,
}

/// Parses a keys/tokens file: one value per line, blank lines and lines that
/// start with `#` ignored, and an optional trailing ` # comment`. Returns the
/// 1-based number of a line that holds more than one word as the error.
pub(crate) fn parse_list_file(text: &str) -> Result<Vec<ListLine>, usize> {
    let mut out = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let mut line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // A comment starts at a `#` preceded by whitespace; a `#` inside a
        // value (no space before it) is part of the value.
        if let Some(pos) = line
            .char_indices()
            .find(|&(i, c)| c == '#' && line[..i].ends_with(char::is_whitespace))
            .map(|(i, _)| i)
        {
            line = line[..pos].trim_end();
        }
        if line.contains(char::is_whitespace) {
            return Err(index + 1);
        }
        out.push(ListLine { line: index + 1, value: line.to_owned() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{closest, display_name, edit_distance};

    #[test]
    fn edit_distance_counts_edits_and_swaps() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("log", "log"), 0);
        assert_eq!(edit_distance("", "log"), 3);
        assert_eq!(edit_distance("rate_limt", "rate_limit"), 1);
        assert_eq!(edit_distance("base_uri", "base_url"), 1);
        assert_eq!(edit_distance("lgo", "log"), 1);
        assert_eq!(edit_distance("port", "cors"), 2);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn closest_allows_a_third_of_the_length_and_at_most_two() {
        let top = ["listen", "keys", "keys_file", "rate_limit", "retry", "cors", "log", "workers"];
        assert_eq!(closest("rate_limt", &top), Some("rate_limit"));
        assert_eq!(closest("key", &top), Some("keys"));
        assert_eq!(closest("lgo", &top), Some("log"));
        assert_eq!(closest("worker", &top), Some("workers"));
        // Two edits in four letters is not a typo.
        assert_eq!(closest("port", &top), None);
        assert_eq!(closest("lo", &top), None);
        assert_eq!(closest("service_host", &top), None);
        assert_eq!(closest("anything", &[]), None);
    }

    #[test]
    fn odd_names_are_quoted_so_they_cannot_forge_a_log_line() {
        assert_eq!(display_name("PROXYPAL_PORT_8080_TCP"), "PROXYPAL_PORT_8080_TCP");
        assert_eq!(display_name("PROXYPAL_X\nINFO forged"), "\"PROXYPAL_X\\nINFO forged\"");
    }
}
