//! What a cached answer is filed under: the endpoint, the public model, the
//! client and the canonical request body, hashed.

use ring::digest::SHA256;
use std::io::Write;

use serde_json::{Map, Number, Value};

use crate::CacheError;

/// Bumped whenever what goes into the hash (or how) changes: entries filed
/// under the old scheme (in Redis, say) are then never found and expire.
const VERSION_TAG: &[u8] = b"proxypal-cache/1\0";

/// An endpoint whose answers may be cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/embeddings`.
    Embeddings,
}

impl Endpoint {
    /// The endpoint at `path` (exactly `/v1/chat/completions`,
    /// `/v1/completions` or `/v1/embeddings`, without a query), or `None`:
    /// nothing else is cached.
    pub fn from_path(path: &str) -> Option<Self> {
        match path {
            "/v1/chat/completions" => Some(Self::ChatCompletions),
            "/v1/completions" => Some(Self::Completions),
            "/v1/embeddings" => Some(Self::Embeddings),
            _ => None,
        }
    }

    /// Its path.
    pub fn path(self) -> &'static str {
        match self {
            Self::ChatCompletions => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
            Self::Embeddings => "/v1/embeddings",
        }
    }

    /// Its byte in the key (stable: changing one needs a new [`VERSION_TAG`]).
    fn tag(self) -> u8 {
        match self {
            Self::ChatCompletions => 1,
            Self::Completions => 2,
            Self::Embeddings => 3,
        }
    }
}

/// Whose entry: every client has its own unless entries are shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner<'a> {
    /// Shared between clients (`cache.shared_between_clients: true`).
    Shared,
    /// The named client's own. Its *name*, never its token: the name only
    /// goes into the hash.
    Client(&'a str),
    /// Requests from no configured client (a deployment without client
    /// tokens): one owner for all of them.
    Anonymous,
}

/// The 32-byte SHA-256 an answer is filed under.
///
/// It hashes, in order: a version tag, the [`Endpoint`], the public model
/// name, the [`Owner`] and the canonical JSON of the request body. Every
/// variable-length part is length-prefixed, so no two different inputs
/// produce the same hashed bytes.
///
/// # Canonical JSON
///
/// The body is parsed with `serde_json` and written back:
///
/// - object keys sorted by their bytes (UTF-8, so by code point), at every
///   depth; when a key appears twice the last one counts, as in
///   Python's `json`, which is what most upstreams parse with;
/// - no whitespace outside strings;
/// - strings re-escaped the one way `serde_json` writes them, so `"\u00e9"`
///   and `"é"` are the same string;
/// - **numbers keep their kind**: an integer (`1`, `-3`) is written as an
///   integer and anything with a fraction or an exponent as the shortest
///   `f64` that reads back the same (`1.0`, `1.00` and `1e0` are all `1.0`,
///   `0.50` is `0.5`), but `1` and `1.0` are **different** keys. An upstream
///   may tell them apart (a strict validator refuses `"max_tokens": 1.0`),
///   and treating them as one could serve a cached success to a request the
///   upstream would have refused; keeping them apart costs only a miss.
///   Integers beyond 64 bits are read as `f64` by `serde_json`.
///
/// Sorting does not rely on `serde_json::Map` being a `BTreeMap` (it is an
/// `IndexMap` if any crate in the build turns on `preserve_order`): keys are
/// sorted here when they are not in order already.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// The key of a request to `endpoint` for `public_model` by `owner`,
    /// with JSON `body`.
    ///
    /// # Errors
    /// [`CacheError::NotJson`] when `body` is not a JSON object.
    pub fn for_request(
        endpoint: Endpoint,
        public_model: &str,
        owner: Owner<'_>,
        body: &[u8],
    ) -> Result<Self, CacheError> {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => Ok(Self::from_object(endpoint, public_model, owner, &map)),
            Ok(_) => Err(CacheError::NotJson { reason: "the body is JSON but not an object".to_owned() }),
            Err(e) => Err(CacheError::NotJson { reason: e.to_string() }),
        }
    }

    /// The key of an already parsed body.
    pub(crate) fn from_object(
        endpoint: Endpoint,
        public_model: &str,
        owner: Owner<'_>,
        body: &Map<String, Value>,
    ) -> Self {
        let mut hasher = Hasher(Vec::with_capacity(256));
        hasher.raw(VERSION_TAG);
        hasher.raw(&[endpoint.tag()]);
        hasher.prefixed(public_model.as_bytes());
        match owner {
            Owner::Shared => hasher.raw(&[0]),
            Owner::Client(name) => {
                hasher.raw(&[1]);
                hasher.prefixed(name.as_bytes());
            }
            Owner::Anonymous => hasher.raw(&[2]),
        }
        write_object(&mut hasher, body);
        let digest = ring::digest::digest(&SHA256, &hasher.0);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        Self(out)
    }

    /// The key from its 32 bytes (as [`as_bytes`](Self::as_bytes) gave them).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Its 32 bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Its 64 lowercase hex digits: the name of its Redis key.
    pub fn hex(&self) -> String {
        let mut out = String::with_capacity(64);
        for b in self.0 {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        out
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl std::fmt::Debug for CacheKey {
    /// The first 6 bytes in hex: enough to tell keys apart in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hex = self.hex();
        write!(f, "CacheKey({}…)", &hex[..12])
    }
}

/// The bytes to hash, gathered first and hashed in one call: the canonical
/// writer emits many pieces of a few bytes, and feeding each to SHA-256's
/// context cost more than the hashing itself (callgrind: 6.9k instructions
/// per small request).
struct Hasher(Vec<u8>);

impl Hasher {
    fn raw(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    /// `bytes` after their length (u64, little endian).
    fn prefixed(&mut self, bytes: &[u8]) {
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        self.0.extend_from_slice(&len.to_le_bytes());
        self.0.extend_from_slice(bytes);
    }
}

impl std::io::Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes `value`'s canonical form into `out` (a hasher, or a buffer in
/// tests). Recursion is bounded by `serde_json`'s own nesting limit (128)
/// on the parse that produced it. Neither sink can fail, so write errors
/// are ignored.
fn write_value<W: Write>(out: &mut W, value: &Value) {
    match value {
        Value::Null => raw(out, b"null"),
        Value::Bool(true) => raw(out, b"true"),
        Value::Bool(false) => raw(out, b"false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            raw(out, b"[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    raw(out, b",");
                }
                write_value(out, item);
            }
            raw(out, b"]");
        }
        Value::Object(map) => write_object(out, map),
    }
}

fn write_object<W: Write>(out: &mut W, map: &Map<String, Value>) {
    raw(out, b"{");
    let mut write_entry = |i: usize, key: &str, value: &Value| {
        if i > 0 {
            raw(out, b",");
        }
        write_string(out, key);
        raw(out, b":");
        write_value(out, value);
    };
    // A BTreeMap (serde_json's default) is in order already: no allocation.
    if map.keys().is_sorted() {
        for (i, (key, value)) in map.iter().enumerate() {
            write_entry(i, key, value);
        }
    } else {
        let mut entries: Vec<(&String, &Value)> = map.iter().collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (i, (key, value)) in entries.into_iter().enumerate() {
            write_entry(i, key, value);
        }
    }
    raw(out, b"}");
}

fn raw<W: Write>(out: &mut W, bytes: &[u8]) {
    let _ = out.write_all(bytes);
}

fn write_string<W: Write>(out: &mut W, s: &str) {
    let _ = serde_json::to_writer(out, s);
}

/// Integers as integers, everything else as the shortest round-trip `f64`
/// (see [`CacheKey`]); the same with serde_json's `arbitrary_precision`.
fn write_number<W: Write>(out: &mut W, n: &Number) {
    if let Some(u) = n.as_u64() {
        raw(out, u.to_string().as_bytes());
    } else if let Some(i) = n.as_i64() {
        raw(out, i.to_string().as_bytes());
    } else {
        // JSON has no NaN: every other number reads as some f64.
        let f = n.as_f64().unwrap_or(0.0);
        let _ = serde_json::to_writer(out, &f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(body: &str) -> CacheKey {
        CacheKey::for_request(Endpoint::ChatCompletions, "llama", Owner::Client("team-a"), body.as_bytes())
            .unwrap_or_else(|e| panic!("{body}: {e}"))
    }

    /// The canonical text itself, as the real writer makes it.
    fn canonical(body: &str) -> String {
        let Ok(value) = serde_json::from_str::<Value>(body) else { panic!("{body}") };
        let mut out = Vec::new();
        write_value(&mut out, &value);
        String::from_utf8(out).unwrap_or_default()
    }

    #[test]
    fn key_order_and_whitespace_do_not_matter() {
        let a = key(r#"{"b":1,"a":{"d":2,"c":3}}"#);
        let b = key(r#"{ "a" : {"c":3,"d":2}, "b":1 }"#);
        let c = key("{\n\t\"b\": 1,\r\n \"a\": { \"d\" : 2 , \"c\" : 3 }\n}");
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(canonical(r#"{ "a" : {"c":3,"d":2}, "b":1 }"#), r#"{"a":{"c":3,"d":2},"b":1}"#);
        assert_eq!(
            canonical(r#"{"z":[1, 1.0, 1.50, -2, 1e3, "\u00e9\n", null, true, {"y":{}, "x":[]}]}"#),
            r#"{"z":[1,1.0,1.5,-2,1000.0,"é\n",null,true,{"x":[],"y":{}}]}"#
        );
    }

    #[test]
    fn serde_json_map_is_sorted_in_this_build() {
        // Not relied on (write_object sorts when needed), but the fast path
        // is taken only if it holds: a BTreeMap, no `preserve_order`.
        let Ok(Value::Object(map)) = serde_json::from_str::<Value>(r#"{"b":1,"a":2,"c":3}"#) else {
            panic!("an object")
        };
        assert_eq!(map.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
    }

    #[test]
    fn integers_and_fractions_are_different_numbers_spelled_consistently() {
        // 1 and 1.0 are kept apart (see CacheKey's docs)…
        assert_ne!(key(r#"{"temperature":1}"#), key(r#"{"temperature":1.0}"#));
        // …but one float has one spelling, whatever the client wrote.
        assert_eq!(key(r#"{"temperature":1.0}"#), key(r#"{"temperature":1.00}"#));
        assert_eq!(key(r#"{"temperature":1.0}"#), key(r#"{"temperature":1e0}"#));
        assert_eq!(key(r#"{"top_p":0.50}"#), key(r#"{"top_p":5e-1}"#));
        assert_eq!(key(r#"{"top_p":0.5}"#), key(r#"{"top_p":0.50}"#));
        assert_ne!(key(r#"{"top_p":0.5}"#), key(r#"{"top_p":0.25}"#));
    }

    #[test]
    fn strings_have_one_spelling_and_arrays_keep_their_order() {
        assert_eq!(key(r#"{"p":"caf\u00e9"}"#), key(r#"{"p":"café"}"#));
        assert_eq!(key(r#"{"p":"a\/b"}"#), key(r#"{"p":"a/b"}"#));
        assert_ne!(key(r#"{"p":["a","b"]}"#), key(r#"{"p":["b","a"]}"#));
        assert_ne!(key(r#"{"p":"a"}"#), key(r#"{"p":"A"}"#));
    }

    #[test]
    fn a_repeated_member_counts_once_the_last_one() {
        assert_eq!(key(r#"{"a":1,"a":2}"#), key(r#"{"a":2}"#));
    }

    #[test]
    fn every_part_of_the_key_matters() {
        let body = br#"{"messages":[{"role":"user","content":"hi"}]}"#;
        let k = |e, m: &str, o| CacheKey::for_request(e, m, o, body).unwrap_or_else(|e| panic!("{e}"));
        let base = k(Endpoint::ChatCompletions, "llama", Owner::Client("a"));
        assert_eq!(base, k(Endpoint::ChatCompletions, "llama", Owner::Client("a")));
        assert_ne!(base, k(Endpoint::Completions, "llama", Owner::Client("a")));
        assert_ne!(base, k(Endpoint::ChatCompletions, "llama-2", Owner::Client("a")));
        assert_ne!(base, k(Endpoint::ChatCompletions, "llama", Owner::Client("b")));
        assert_ne!(base, k(Endpoint::ChatCompletions, "llama", Owner::Shared));
        assert_ne!(base, k(Endpoint::ChatCompletions, "llama", Owner::Anonymous));
        assert_ne!(
            k(Endpoint::ChatCompletions, "llama", Owner::Shared),
            k(Endpoint::ChatCompletions, "llama", Owner::Anonymous)
        );
        // Length prefixes: moving a byte from the model to the client changes the key.
        assert_ne!(
            k(Endpoint::ChatCompletions, "ab", Owner::Client("c")),
            k(Endpoint::ChatCompletions, "a", Owner::Client("bc"))
        );
    }

    #[test]
    fn only_json_objects_have_keys() {
        for body in ["", "[]", "\"x\"", "{", "{\"a\":}", "nul"] {
            let got = CacheKey::for_request(Endpoint::Embeddings, "m", Owner::Shared, body.as_bytes());
            assert!(matches!(got, Err(CacheError::NotJson { .. })), "{body:?}: {got:?}");
        }
    }

    #[test]
    fn hex_is_64_lowercase_digits_and_debug_a_short_prefix() {
        let k = CacheKey::from_bytes([0xab; 32]);
        assert_eq!(k.hex(), "ab".repeat(32));
        assert_eq!(format!("{k:?}"), "CacheKey(abababababab…)");
        assert_eq!(CacheKey::from_bytes(*k.as_bytes()), k);
    }

    #[test]
    fn the_client_name_is_hashed_never_kept() {
        let k = key(r#"{"a":1}"#);
        let shown = format!("{k:?} {}", k.hex());
        assert!(!shown.contains("team-a"), "{shown}");
    }

    #[test]
    fn endpoints_come_from_their_exact_paths() {
        for e in [Endpoint::ChatCompletions, Endpoint::Completions, Endpoint::Embeddings] {
            assert_eq!(Endpoint::from_path(e.path()), Some(e));
        }
        for other in ["/v1/models", "/v1/chat/completions/", "/v1/embeddings?x=1", "", "/V1/completions"] {
            assert_eq!(Endpoint::from_path(other), None, "{other}");
        }
    }
}
