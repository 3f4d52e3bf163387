//! Key paths as they may be shown in messages: `keys[1].burst`, with any
//! segment that could be a secret masked. Shared by the error renderer and
//! the YAML layer.

use super::secret::mask_key;

/// Whether an unknown field's name can be shown: typos of field names look
/// like field names; a secret used as a map key (`- nvapi-…: team-b`) does not.
pub(crate) fn is_plain_field_name(name: &str) -> bool {
    name.len() <= 32 && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

/// A key-path segment as it may be shown: field names and list indices as
/// they are, anything else (a secret used as a map key?) masked.
pub(crate) fn safe_segment(segment: &str) -> String {
    if is_plain_field_name(segment) || segment.bytes().all(|b| b.is_ascii_digit()) {
        segment.to_owned()
    } else {
        mask_key(segment)
    }
}

/// `["keys", "1", "burst"]` → `keys[1].burst`.
pub(crate) fn field_path(path: &[String]) -> String {
    let mut out = String::new();
    for segment in path {
        if !segment.is_empty() && segment.chars().all(|c| c.is_ascii_digit()) {
            out.push('[');
            out.push_str(segment);
            out.push(']');
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(segment);
        }
    }
    out
}
