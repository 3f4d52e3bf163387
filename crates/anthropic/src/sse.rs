//! Writing one server-sent event.

use serde::Serialize;

/// Appends `event: <name>\ndata: <json>\n\n` to `out`.
pub(crate) fn write_event<T: Serialize + ?Sized>(out: &mut Vec<u8>, name: &str, data: &T) {
    let start = out.len();
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    if serde_json::to_writer(&mut *out, data).is_err() {
        // Unreachable for this crate's event types (strings, numbers and JSON
        // values into a Vec): never send half an event.
        out.truncate(start);
        return;
    }
    out.extend_from_slice(b"\n\n");
}
