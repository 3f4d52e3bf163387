//! Records packed into pages: one database row per batch.
//!
//! A batch's records are stored as one row of `proxypal_ledger_pages`: the
//! least and greatest `at_ms` of its records, how many there are, and the
//! records themselves as one JSON array (`data`), each record an array of
//! the 16 values of [`FIELDS`] (integers, `null` for none; booleans as 0 or
//! 1). The view `proxypal_ledger` unpacks them into one row per record with
//! the columns of the same names (`json_each` in SQLite,
//! `json_array_elements` in PostgreSQL), and `proxypal_ledger_named` joins
//! the names: the ledger still reads as one row per request with plain
//! SQL.
//!
//! Why: with one SQL row per record, the database's own work per row (16
//! values through SQLite's VDBE and B-tree, or PostgreSQL's COPY parser,
//! heap, WAL and index) was most of the ledger's cost, which on the proxy's
//! own machine came straight out of requests per second: SQLite's writer
//! spent ~5.0k instructions per record and PostgreSQL's server 3.7–4.2 µs
//! (docs/performance.md, "Fourth round"). A page costs the database one
//! row per batch; writing a record is appending ~60 bytes of text here.
//!
//! What it costs: ad-hoc SQL over the view unpacks JSON (the page's time
//! range is indexed, a record's fields are not), and retention trims the
//! one page that straddles the cutoff by rewriting it ([`trim`]).

use std::fmt;

use crate::Record;
use crate::names::RowIds;

/// The stored values of a record, in order: the columns of the view
/// `proxypal_ledger`.
pub(crate) const FIELDS: [&str; 16] = [
    "at_ms",
    "client_id",
    "model_id",
    "provider_id",
    "upstream_model_id",
    "key_id",
    "status",
    "attempts",
    "ttfb_ms",
    "total_ms",
    "stream",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "error_id",
    "cache_hit",
];

/// One record's stored values, in [`FIELDS`] order (`None` is `null`).
pub(crate) type Values = [Option<i64>; FIELDS.len()];

/// The position of a field in [`FIELDS`] (a JSON array index).
#[cfg(test)]
pub(crate) fn position(field: &str) -> Option<usize> {
    FIELDS.iter().position(|f| *f == field)
}

/// `r`'s values, its names given as `ids` (0: none, stored as `null`).
pub(crate) fn values(r: &Record, ids: &RowIds) -> Values {
    let [client, model, provider, upstream_model, key, error] = *ids;
    [
        Some(r.at_ms),
        Some(client),
        Some(model),
        Some(provider),
        Some(upstream_model),
        Some(key),
        Some(i64::from(r.status)),
        Some(i64::from(r.attempts)),
        r.ttfb_ms.map(i64::from),
        Some(i64::from(r.total_ms)),
        Some(i64::from(r.stream)),
        r.prompt_tokens.map(clamp),
        r.completion_tokens.map(clamp),
        r.total_tokens.map(clamp),
        (error != 0).then_some(error),
        Some(i64::from(r.cache_hit)),
    ]
}

/// Token counts beyond `i64::MAX` cannot happen; saturate rather than fail a batch.
fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// One page being built or read: a row of `proxypal_ledger_pages`.
///
/// The writer keeps one and refills it per batch, so its buffers are
/// allocated once.
pub(crate) struct Page {
    /// The least `at_ms` of its records.
    pub(crate) first_ms: i64,
    /// The greatest `at_ms` of its records.
    pub(crate) last_ms: i64,
    /// How many records.
    pub(crate) rows: i64,
    /// The records: a JSON array of [`Values`] arrays once finished; ASCII.
    data: Vec<u8>,
    /// Whether `data` ends with the array's closing `]`.
    closed: bool,
    /// Where one record's text is put together.
    scratch: [u8; ROW_BYTES],
    /// The digits of the last record's time but its last three.
    time: TimeDigits,
}

impl Default for Page {
    fn default() -> Self {
        let mut page = Self {
            first_ms: i64::MAX,
            last_ms: i64::MIN,
            rows: 0,
            data: Vec::new(),
            closed: false,
            scratch: [0; ROW_BYTES],
            time: TimeDigits::default(),
        };
        page.clear();
        page
    }
}

impl fmt::Debug for Page {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Page")
            .field("first_ms", &self.first_ms)
            .field("last_ms", &self.last_ms)
            .field("rows", &self.rows)
            .field("data_bytes", &self.data.len())
            .finish()
    }
}

/// The most one record's text takes: the comma before it, 16 values of at
/// most 20 characters (`-9223372036854775808`), 15 commas and the
/// brackets.
const ROW_BYTES: usize = 1 + 16 * 20 + 15 + 2;

/// `"00"` to `"99"`: integers are written two digits at a time.
const DIGIT_PAIRS: &[u8; 200] = b"\
    0001020304050607080910111213141516171819\
    2021222324252627282930313233343536373839\
    4041424344454647484950515253545556575859\
    6061626364656667686970717273747576777879\
    8081828384858687888990919293949596979899";

impl Page {
    /// Empties the page (keeping its buffer).
    pub(crate) fn clear(&mut self) {
        self.first_ms = i64::MAX;
        self.last_ms = i64::MIN;
        self.rows = 0;
        self.data.clear();
        self.data.push(b'[');
        self.closed = false;
    }

    /// Appends one record's values.
    pub(crate) fn push(&mut self, values: &Values) {
        if self.closed {
            self.data.pop(); // the closing `]`
            self.closed = false;
        }
        // The record is put together in `scratch`, then appended with one
        // copy: a `push_str` per value (a capacity check and a `memcpy`
        // call each) made this ~900 instructions per record.
        let row = &mut self.scratch;
        let mut at = 0;
        if self.rows > 0 {
            row[at] = b',';
            at += 1;
        }
        row[at] = b'[';
        at += 1;
        for (i, value) in values.iter().enumerate() {
            if i > 0 {
                row[at] = b',';
                at += 1;
            }
            at = match *value {
                // Most values (ids, status, attempts, flags, milliseconds,
                // token counts) are below 1000: four bytes from a table.
                Some(v @ 0..SMALL_LIMIT) => {
                    let text = &SMALL[v as usize];
                    row[at..at + 4].copy_from_slice(text);
                    at + usize::from(text[3])
                }
                // The time: its leading digits repeat from record to record.
                Some(v) if i == 0 && v >= 0 => self.time.write(row, at, v),
                Some(v) => write_int(row, at, v),
                None => {
                    row[at..at + 4].copy_from_slice(b"null");
                    at + 4
                }
            };
        }
        row[at] = b']';
        self.data.extend_from_slice(&row[..=at]);
        if let Some(at_ms) = values[0] {
            self.first_ms = self.first_ms.min(at_ms);
            self.last_ms = self.last_ms.max(at_ms);
        }
        self.rows += 1;
    }

    /// The page's `data`, closed: a JSON array until the next
    /// [`Page::push`] or [`Page::clear`].
    pub(crate) fn finish(&mut self) -> &str {
        if !self.closed {
            self.data.push(b']');
            self.closed = true;
        }
        self.text()
    }

    /// The text so far (see [`Page::finish`]).
    #[allow(clippy::expect_used)] // the invariant below
    pub(crate) fn text(&self) -> &str {
        // Invariant: `data` only ever receives the ASCII bytes written
        // above (brackets, commas, digits, `-`, `null`), so this cannot
        // fail; one check per page costs a fraction of an instruction per
        // byte.
        std::str::from_utf8(&self.data).expect("a page's text is ASCII")
    }

    /// The page of `records`, whose names have the ids `ids`.
    pub(crate) fn fill(&mut self, records: &[Record], ids: &[RowIds]) -> &str {
        self.clear();
        for (r, ids) in records.iter().zip(ids) {
            self.push(&values(r, ids));
        }
        self.finish()
    }
}

/// Values below this are written from [`SMALL`].
const SMALL_LIMIT: i64 = 1000;

/// `0` to `999` in decimal, each padded to four bytes with its length in
/// the last byte (a value is copied as four bytes, then `at` advances by
/// the length: the next write overwrites the rest). The same table with
/// every number zero-padded to three digits is [`PADDED`].
static SMALL: [[u8; 4]; SMALL_LIMIT as usize] = small_table(false);
/// `000` to `999` (length byte 3): a time's last three digits.
static PADDED: [[u8; 4]; SMALL_LIMIT as usize] = small_table(true);

const fn small_table(padded: bool) -> [[u8; 4]; SMALL_LIMIT as usize] {
    let mut table = [[0u8; 4]; SMALL_LIMIT as usize];
    let mut n = 0;
    while n < SMALL_LIMIT as usize {
        let digits = [(n / 100) as u8, (n / 10 % 10) as u8, (n % 10) as u8];
        let len = if padded || n >= 100 {
            3
        } else if n >= 10 {
            2
        } else {
            1
        };
        let mut i = 0;
        while i < len {
            table[n][i] = b'0' + digits[3 - len + i];
            i += 1;
        }
        table[n][3] = len as u8;
        n += 1;
    }
    table
}

/// The decimal digits of a time (unix ms) but its last three, kept from
/// one record to the next: records of a batch are usually within a second
/// of each other, so only the last three digits are written anew.
#[derive(Debug, Clone, Copy, Default)]
struct TimeDigits {
    /// `at_ms / 1000` of the time the digits are of (none while `len` is 0).
    seconds: i64,
    /// Its digits (`len` of them), left-aligned.
    digits: [u8; 20],
    len: usize,
}

impl TimeDigits {
    /// Writes `ms` (not negative) at `row[at..]`; returns the index after it.
    fn write(&mut self, row: &mut [u8; ROW_BYTES], at: usize, ms: i64) -> usize {
        let seconds = ms / 1000;
        if seconds == 0 {
            return write_int(row, at, ms);
        }
        if seconds != self.seconds || self.len == 0 {
            let mut scratch = [0u8; ROW_BYTES];
            let len = write_int(&mut scratch, 0, seconds);
            self.digits[..len].copy_from_slice(&scratch[..len]);
            self.len = len;
            self.seconds = seconds;
        }
        // A fixed-size copy (no `memcpy` call); only `len` bytes count.
        row[at..at + 20].copy_from_slice(&self.digits);
        let at = at + self.len;
        row[at..at + 4].copy_from_slice(&PADDED[(ms % 1000) as usize]);
        at + 3
    }
}

/// Writes `v` in decimal at `row[at..]`; returns the index after it.
fn write_int(row: &mut [u8; ROW_BYTES], at: usize, v: i64) -> usize {
    let mut at = at;
    if v < 0 {
        row[at] = b'-';
        at += 1;
    }
    let mut n = v.unsigned_abs();
    let len = n.checked_ilog10().map_or(1, |log| log as usize + 1);
    let end = at + len;
    let mut i = end;
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        i -= 2;
        row[i..i + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    }
    if n >= 10 {
        let pair = n as usize * 2;
        row[i - 2..i].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    } else {
        row[i - 1] = b'0' + n as u8;
    }
    end
}

/// A stored page's `data` that is not an array of records (someone edited
/// the table by hand).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not an array of 16-integer records at byte {at}: expected {expected}")]
pub(crate) struct BadPage {
    /// Where reading stopped.
    at: usize,
    /// What should have been there.
    expected: &'static str,
}

/// Calls `each` with the values of every record of the page `data`, in
/// order.
///
/// Reads what [`Page`] writes and what the migration's `json_agg` wrote
/// (whitespace between tokens); integers and `null` only, 16 per record.
/// Much faster than the databases' JSON functions, which unpack every
/// value as a JSON value: `/usage` reads pages with this.
///
/// # Errors
/// [`BadPage`] at the first thing that is not part of such an array.
pub(crate) fn read(data: &str, mut each: impl FnMut(&Values)) -> Result<(), BadPage> {
    let mut c = Cursor { bytes: data.as_bytes(), at: 0 };
    c.expect(b'[', "`[`")?;
    if c.peek() == Some(b']') {
        c.at += 1;
    } else {
        let mut values: Values = [None; FIELDS.len()];
        loop {
            c.expect(b'[', "`[`")?;
            for (i, value) in values.iter_mut().enumerate() {
                if i > 0 {
                    c.expect(b',', "`,` (16 values per record)")?;
                }
                *value = c.value()?;
            }
            c.expect(b']', "`]` (16 values per record)")?;
            each(&values);
            match c.peek() {
                Some(b',') => c.at += 1,
                Some(b']') => {
                    c.at += 1;
                    break;
                }
                _ => return Err(c.bad("`,` or `]`")),
            }
        }
    }
    c.skip_space();
    if c.at == c.bytes.len() { Ok(()) } else { Err(c.bad("the end")) }
}

/// A stored page's `data` read back.
///
/// # Errors
/// As [`read`].
#[cfg(test)]
pub(crate) fn decode(data: &str) -> Result<Vec<Values>, BadPage> {
    let mut records = Vec::new();
    read(data, |values| records.push(*values))?;
    Ok(records)
}

/// [`read`]'s position in the text.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn bad(&self, expected: &'static str) -> BadPage {
        BadPage { at: self.at, expected }
    }

    fn skip_space(&mut self) {
        while matches!(self.bytes.get(self.at), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.at += 1;
        }
    }

    /// The next byte after any whitespace (not consumed).
    fn peek(&mut self) -> Option<u8> {
        self.skip_space();
        self.bytes.get(self.at).copied()
    }

    fn expect(&mut self, byte: u8, expected: &'static str) -> Result<(), BadPage> {
        if self.peek() == Some(byte) {
            self.at += 1;
            Ok(())
        } else {
            Err(self.bad(expected))
        }
    }

    /// An integer that fits `i64`, or `null`.
    fn value(&mut self) -> Result<Option<i64>, BadPage> {
        const NUMBER: &str = "an integer or null";
        self.skip_space();
        let rest = &self.bytes[self.at.min(self.bytes.len())..];
        if rest.starts_with(b"null") {
            self.at += 4;
            return Ok(None);
        }
        let negative = rest.first() == Some(&b'-');
        if negative {
            self.at += 1;
        }
        let start = self.at;
        let mut n: i64 = 0;
        while let Some(&digit @ b'0'..=b'9') = self.bytes.get(self.at) {
            let digit = i64::from(digit - b'0');
            // Accumulated with the sign, so i64::MIN fits.
            n = n
                .checked_mul(10)
                .and_then(|n| if negative { n.checked_sub(digit) } else { n.checked_add(digit) })
                .ok_or_else(|| self.bad("an integer that fits 64 bits"))?;
            self.at += 1;
        }
        if self.at == start {
            return Err(self.bad(NUMBER));
        }
        Ok(Some(n))
    }
}

/// What retention leaves of a page that holds records from before a cutoff.
#[derive(Debug)]
pub(crate) struct Trimmed {
    /// The records kept.
    pub(crate) page: Page,
    /// How many records were before the cutoff.
    pub(crate) removed: u64,
}

/// The page `data` without its records from before `cutoff_ms`.
///
/// # Errors
/// As [`read`].
pub(crate) fn trim(data: &str, cutoff_ms: i64) -> Result<Trimmed, BadPage> {
    let mut page = Page::default();
    let mut removed = 0;
    read(data, |values| {
        // A record without a time (only a hand-edited page has one) is
        // past any retention.
        if values[0].is_none_or(|at| at < cutoff_ms) {
            removed += 1;
        } else {
            page.push(values);
        }
    })?;
    page.finish();
    Ok(Trimmed { page, removed })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn record(at_ms: i64) -> Record {
        Record {
            at_ms,
            client: Arc::from("alice"),
            status: 429,
            attempts: 3,
            ttfb_ms: None,
            total_ms: 12,
            stream: true,
            prompt_tokens: Some(7),
            completion_tokens: None,
            total_tokens: Some(u64::MAX),
            cache_hit: false,
            ..Record::default()
        }
    }

    #[test]
    fn a_page_is_json_that_reads_back_to_the_values() {
        let records = [record(5), record(-3), record(9)];
        let ids = [[1, 2, 3, 4, 5, 0], [1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 0]];
        let mut page = Page::default();
        let data = page.fill(&records, &ids).to_owned();
        assert_eq!(
            &data[..data.find("],").unwrap() + 1],
            "[[5,1,2,3,4,5,429,3,null,12,1,7,null,9223372036854775807,null,0]"
        );
        let _: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert_eq!((page.first_ms, page.last_ms, page.rows), (-3, 9, 3));
        let back = decode(&data).unwrap();
        let expected: Vec<Values> = records.iter().zip(&ids).map(|(r, ids)| values(r, ids)).collect();
        assert_eq!(back, expected);
        assert_eq!(back[1][14], Some(6), "an error's id");

        // Refilled: nothing of the previous batch is left.
        let data = page.fill(&records[..1], &ids[..1]).to_owned();
        assert_eq!(decode(&data).unwrap(), expected[..1]);
        assert_eq!((page.first_ms, page.last_ms, page.rows), (5, 5, 1));
        assert_eq!(page.fill(&[], &[]), "[]");
        assert_eq!(page.rows, 0);
    }

    #[test]
    fn finish_is_idempotent() {
        let mut page = Page::default();
        page.push(&values(&record(1), &[1; 6]));
        let once = page.finish().to_owned();
        assert_eq!(page.finish(), once);
        assert_eq!(decode(&once).unwrap().len(), 1);
    }

    #[test]
    fn trim_keeps_the_records_from_the_cutoff_on() {
        let records: Vec<Record> = [40, 10, 30, 20].map(record).to_vec();
        let ids = [[1, 1, 1, 1, 1, 0]; 4];
        let mut page = Page::default();
        let data = page.fill(&records, &ids).to_owned();
        let trimmed = trim(&data, 25).unwrap();
        assert_eq!(trimmed.removed, 2);
        let kept = &trimmed.page;
        assert_eq!((kept.first_ms, kept.last_ms, kept.rows), (30, 40, 2));
        let at: Vec<Option<i64>> = decode(kept.text()).unwrap().iter().map(|v| v[0]).collect();
        assert_eq!(at, [Some(40), Some(30)]);

        let all = trim(&data, 41).unwrap();
        assert_eq!((all.removed, all.page.rows), (4, 0));
        assert_eq!(all.page.text(), "[]");
        assert_eq!(trim(&data, 10).unwrap().removed, 0);
        // A record without a time (a hand-edited page) is past any retention.
        let untimed = format!("[[null{}],{}", ",1".repeat(15), &data[1..]);
        let trimmed = trim(&untimed, 10).unwrap();
        assert_eq!((trimmed.removed, trimmed.page.rows, trimmed.page.first_ms), (1, 4, 10));
        assert!(trim("[[1,2]", 0).is_err());
        assert!(trim("[[1,2]]", 0).is_err(), "16 values per record");
    }

    #[test]
    fn the_reader_agrees_with_serde_json_and_takes_whitespace() {
        let records: Vec<Record> = (0..50).map(|i| record(1_796_130_000_000 + i * 7 - 300)).collect();
        let ids: Vec<RowIds> = (0..50).map(|i| [i + 1, 2, 3, 4, 5 + i % 3, i % 2]).collect();
        let mut page = Page::default();
        let data = page.fill(&records, &ids).to_owned();
        let expected: Vec<Values> = serde_json::from_str(&data).unwrap();
        assert_eq!(decode(&data).unwrap(), expected);
        // As PostgreSQL's json_agg writes it.
        let spaced = data.replace(",", ", ").replace("],", "], \n ").replace("[[", " [ [");
        assert_eq!(decode(&spaced).unwrap(), expected);
        assert!(decode("[]").unwrap().is_empty());
        assert!(decode(" [ ] \n").unwrap().is_empty());
        let min_max = format!("[[{}{}]]", i64::MIN, ",9223372036854775807".repeat(15));
        assert_eq!(decode(&min_max).unwrap()[0][..2], [Some(i64::MIN), Some(i64::MAX)]);
    }

    #[test]
    fn the_reader_refuses_what_is_not_a_page() {
        let row = "[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16]";
        assert!(decode(&format!("[{row}]")).is_ok());
        for (bad, at) in [
            (String::new(), 0),
            ("{}".to_owned(), 0),
            (format!("[{row}"), 41),
            (format!("[{row}]x"), 42),
            (format!("[{row},]"), 42),
            ("[[1,2]]".to_owned(), 5),
            (format!("[{}]", row.replace("16", "16,17")), 40),
            (format!("[{}]", row.replace("3", "3.5")), 7),
            (format!("[{}]", row.replace("4", "\"4\"")), 8),
            (format!("[{}]", row.replace("5", "-")), 11),
            (format!("[{}]", row.replace("6", "nul")), 12),
            (format!("[{}]", row.replace("7", "9223372036854775808")), 32),
        ] {
            let error = decode(&bad).unwrap_err();
            assert_eq!(error.at, at, "{bad:?}: {error}");
        }
    }

    #[test]
    fn integers_are_written_like_serde_json_writes_them() {
        let mut row = [0u8; ROW_BYTES];
        for v in [0, 1, 9, 10, 99, 429, -1, -10, 1_796_130_000_000, i64::MAX, i64::MIN, i64::MIN + 1] {
            let end = write_int(&mut row, 3, v);
            assert_eq!(std::str::from_utf8(&row[3..end]).unwrap(), v.to_string());
        }
        // The tables and the time's digits write what `to_string` does.
        let mut page = Page::default();
        let times =
            [0, 7, 999, 1_000, 1_001, 59_999, 1_796_130_000_000, 1_796_130_000_999, 1_796_130_001_000];
        for v in (0..2_000).chain(times).chain(times.map(|t| t + 1)).chain([i64::MAX, i64::MAX - 500]) {
            let mut values = [Some(v); 16];
            values[1] = Some(-v);
            page.clear();
            page.push(&values);
            let expected = format!("[[{v},{}{}]]", -v, format!(",{v}").repeat(14));
            assert_eq!(page.finish(), expected);
        }
        // Times out of order and repeated within a page.
        let at = [
            1_796_130_000_123,
            1_796_130_000_124,
            1_796_129_999_999,
            1_796_130_000_005,
            5,
            1_796_130_000_005,
        ];
        page.clear();
        for t in at {
            page.push(&[Some(t); 16]);
        }
        let back: Vec<Option<i64>> = decode(page.finish()).unwrap().iter().map(|v| v[0]).collect();
        assert_eq!(back, at.map(Some));
        // The longest record fits, also after a first one (its comma).
        let mut page = Page::default();
        page.push(&[Some(i64::MIN); 16]);
        page.push(&[Some(i64::MIN); 16]);
        assert_eq!(decode(page.finish()).unwrap(), vec![[Some(i64::MIN); 16]; 2]);
    }
}
