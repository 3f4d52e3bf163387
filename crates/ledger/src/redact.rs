//! Masking a PostgreSQL password in a connection string before it reaches a
//! `Debug`, a log line or an error.
//!
//! Both of tokio-postgres' forms are covered: the URL
//! (`postgres://user:secret@host/db`, also `?password=secret`) and libpq's
//! key=value conninfo (`host=db password=secret`, `password='a b'`). When a
//! string is ambiguous the mask takes more rather than less: everything
//! between the first `:` after the scheme and the last `@` goes.

/// What replaces a password.
const MASK: &str = "***";

/// `conn` with any password replaced by `***`.
pub(crate) fn redact(conn: &str) -> String {
    mask_password_params(&mask_url_userinfo(conn))
}

/// `scheme://user:secret@host…` → `scheme://user:***@host…`.
fn mask_url_userinfo(conn: &str) -> String {
    let Some(scheme_end) = conn.find("://") else {
        return conn.to_owned();
    };
    let rest_start = scheme_end + 3;
    let rest = &conn[rest_start..];
    // The last `@`: a password with an unencoded `@` stays masked whole.
    let Some(at) = rest.rfind('@') else {
        return conn.to_owned();
    };
    let Some(colon) = rest[..at].find(':') else {
        return conn.to_owned();
    };
    let (start, end) = (rest_start + colon + 1, rest_start + at);
    format!("{}{MASK}{}", &conn[..start], &conn[end..])
}

/// Every `password = value` (key=value conninfo, or a URL's query) → `password=***`.
fn mask_password_params(conn: &str) -> String {
    const KEY: &[u8] = b"password";
    let bytes = conn.as_bytes();
    let mut out = String::with_capacity(conn.len());
    let mut copied = 0; // bytes of `conn` already in `out`
    let mut i = 0;
    while i + KEY.len() <= bytes.len() {
        if !bytes[i..i + KEY.len()].eq_ignore_ascii_case(KEY) {
            i += 1;
            continue;
        }
        let mut j = i + KEY.len();
        while j < bytes.len() && bytes[j].is_ascii_whitespace() {
            j += 1;
        }
        if j >= bytes.len() || bytes[j] != b'=' {
            i += KEY.len();
            continue;
        }
        j += 1;
        while j < bytes.len() && bytes[j].is_ascii_whitespace() {
            j += 1;
        }
        let value_start = j;
        if j < bytes.len() && bytes[j] == b'\'' {
            // A quoted conninfo value: up to the closing quote; `\'` and `\\` are escapes.
            j += 1;
            while j < bytes.len() && bytes[j] != b'\'' {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            j = (j + 1).min(bytes.len());
        } else {
            while j < bytes.len() && !bytes[j].is_ascii_whitespace() && bytes[j] != b'&' {
                j += 1;
            }
        }
        // Every index here sits next to an ASCII byte, so on a char boundary.
        out.push_str(&conn[copied..value_start]);
        out.push_str(MASK);
        copied = j;
        i = j;
    }
    out.push_str(&conn[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn masks_every_form() {
        let cases = [
            ("postgres://u:secretpw@host/db", "postgres://u:***@host/db"),
            (
                "postgresql://u:secretpw@host:5432/db?sslmode=disable",
                "postgresql://u:***@host:5432/db?sslmode=disable",
            ),
            ("postgres://u:se@cr:et@host/db", "postgres://u:***@host/db"),
            ("postgres://u@host/db", "postgres://u@host/db"),
            ("postgres://host/db?user=u&password=secretpw&x=1", "postgres://host/db?user=u&password=***&x=1"),
            ("host=h user=u password=secretpw dbname=d", "host=h user=u password=*** dbname=d"),
            ("host=h password = 'secret pw\\' x' dbname=d", "host=h password = *** dbname=d"),
            ("host=h PASSWORD=secretpw", "host=h PASSWORD=***"),
            ("host=h password=", "host=h password=***"),
            ("host=h password='unterminated", "host=h password=***"),
            ("/var/lib/ledger.db", "/var/lib/ledger.db"),
        ];
        for (input, want) in cases {
            assert_eq!(redact(input), want, "input: {input}");
        }
    }

    #[test]
    fn non_ascii_passwords_are_masked_on_char_boundaries() {
        assert_eq!(redact("postgres://ü:päss@h/d"), "postgres://ü:***@h/d");
        assert_eq!(redact("password=päss host=ü"), "password=*** host=ü");
    }
}
