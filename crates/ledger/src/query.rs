//! What `/usage` asks for ([`UsageQuery`]), what it gets back ([`UsageRow`],
//! [`to_csv`]), and the aggregation both backends feed their pages to
//! ([`Aggregation`]).
//!
//! Buckets are integer arithmetic on unix milliseconds (UTC).

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::str::FromStr;

use serde::Serialize;

use crate::error::ParseError;
use crate::pages;

/// Milliseconds in an hour.
pub(crate) const HOUR_MS: i64 = 3_600_000;
/// Milliseconds in a UTC day (unix time has no leap seconds).
const DAY_MS: i64 = 86_400_000;

/// One aggregation over a time range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    /// Start of the range, unix ms, inclusive.
    pub from_ms: i64,
    /// End of the range, unix ms, exclusive.
    pub to_ms: i64,
    /// The columns rows are grouped by; the others are `null` in the result.
    pub group_by: GroupBy,
    /// The time slices rows are grouped by.
    pub bucket: Bucket,
    /// Only this client's records: a non-admin caller sees its own usage.
    pub client: Option<String>,
}

/// A set of the columns [`UsageQuery`] groups by. Empty: one total.
///
/// Parsed from a comma-separated list, e.g. `"client,model"`:
///
/// ```
/// use proxypal_ledger::GroupBy;
/// let g: GroupBy = "client, model".parse().unwrap();
/// assert!(g.client && g.model && !g.provider && !g.key);
/// assert!("client,region".parse::<GroupBy>().unwrap_err().to_string().contains("'region'"));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct GroupBy {
    /// By client name.
    pub client: bool,
    /// By public model name.
    pub model: bool,
    /// By provider.
    pub provider: bool,
    /// By key name (label).
    pub key: bool,
}

impl GroupBy {
    /// No grouping: one row per bucket.
    pub const NONE: Self = Self { client: false, model: false, provider: false, key: false };
}

impl FromStr for GroupBy {
    type Err = ParseError;

    /// Names separated by commas (spaces around them and empty items are
    /// ignored, repeats are harmless); an unknown name is an error naming it.
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let mut group = Self::NONE;
        for name in s.split(',').map(str::trim).filter(|name| !name.is_empty()) {
            match name {
                "client" => group.client = true,
                "model" => group.model = true,
                "provider" => group.provider = true,
                "key" => group.key = true,
                other => {
                    return Err(ParseError {
                        what: "group_by",
                        value: other.to_owned(),
                        expected: "client, model, provider, key",
                    });
                }
            }
        }
        Ok(group)
    }
}

impl fmt::Display for GroupBy {
    /// The names, comma separated, in column order (`""` for none).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names =
            [(self.client, "client"), (self.model, "model"), (self.provider, "provider"), (self.key, "key")];
        let mut first = true;
        for (_, name) in names.iter().filter(|(on, _)| *on) {
            if !first {
                f.write_str(",")?;
            }
            f.write_str(name)?;
            first = false;
        }
        Ok(())
    }
}

/// The time slice [`UsageQuery`] buckets by, in UTC.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Bucket {
    /// Per clock hour.
    Hour,
    /// Per UTC day.
    Day,
    /// The whole range as one bucket (`bucket` is `null` in the rows).
    #[default]
    None,
}

impl Bucket {
    /// The bucket's length in ms, `None` for the whole range.
    fn millis(self) -> Option<i64> {
        match self {
            Self::Hour => Some(HOUR_MS),
            Self::Day => Some(DAY_MS),
            Self::None => None,
        }
    }
}

impl FromStr for Bucket {
    type Err = ParseError;

    /// `hour`, `day` or `none`.
    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s.trim() {
            "hour" => Ok(Self::Hour),
            "day" => Ok(Self::Day),
            "none" => Ok(Self::None),
            other => Err(ParseError { what: "bucket", value: other.to_owned(), expected: "hour, day, none" }),
        }
    }
}

impl fmt::Display for Bucket {
    /// `hour`, `day` or `none`, as parsed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Hour => "hour",
            Self::Day => "day",
            Self::None => "none",
        })
    }
}

/// One aggregated row. Columns not grouped by are `None` (`null` in JSON,
/// empty in CSV).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    /// Start of the bucket in RFC 3339 UTC, e.g. `2026-12-01T13:00:00Z`.
    pub bucket: Option<String>,
    /// Client name.
    pub client: Option<String>,
    /// Public model name.
    pub model: Option<String>,
    /// Provider.
    pub provider: Option<String>,
    /// Key name (label).
    pub key: Option<String>,
    /// Finished requests.
    pub requests: u64,
    /// Requests that ended with a status of 400 or more.
    pub errors: u64,
    /// Sum of prompt tokens (records without a count add nothing).
    pub prompt_tokens: u64,
    /// Sum of completion tokens.
    pub completion_tokens: u64,
    /// Sum of total tokens.
    pub total_tokens: u64,
}

/// The CSV header, the [`UsageRow`] JSON names in order.
const CSV_HEADER: &str =
    "bucket,client,model,provider,key,requests,errors,prompt_tokens,completion_tokens,total_tokens";

/// `rows` as CSV (RFC 4180): a header line with [`UsageRow`]'s field names,
/// CRLF line ends, fields quoted when they hold `,`, `"`, CR or LF (quotes
/// doubled), `None` as an empty field.
///
/// ```
/// use proxypal_ledger::{to_csv, UsageRow};
/// let row = UsageRow { client: Some("a,b".into()), requests: 2, ..UsageRow::default() };
/// assert_eq!(
///     to_csv(&[row]),
///     "bucket,client,model,provider,key,requests,errors,prompt_tokens,completion_tokens,total_tokens\r\n\
///      ,\"a,b\",,,,2,0,0,0,0\r\n"
/// );
/// ```
pub fn to_csv(rows: &[UsageRow]) -> String {
    let mut out = String::with_capacity(CSV_HEADER.len() + 2 + rows.len() * 64);
    out.push_str(CSV_HEADER);
    out.push_str("\r\n");
    for row in rows {
        for text in [&row.bucket, &row.client, &row.model, &row.provider, &row.key] {
            push_field(&mut out, text.as_deref().unwrap_or(""));
            out.push(',');
        }
        let _ = write!(
            out,
            "{},{},{},{},{}\r\n",
            row.requests, row.errors, row.prompt_tokens, row.completion_tokens, row.total_tokens
        );
    }
    out
}

fn push_field(out: &mut String, field: &str) {
    if field.contains([',', '"', '\r', '\n']) {
        out.push('"');
        out.push_str(&field.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(field);
    }
}

/// Whose records [`Aggregation`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Clients {
    /// Everyone's.
    All,
    /// One client's, by name id.
    Id(i64),
    /// None: [`UsageQuery::client`] names a client that has no records.
    Nobody,
}

/// A group's key: the bucket's start (0 when not bucketed), then the ids
/// of the client, model, provider and key (0 when not grouped by them).
type GroupKey = [i64; 5];

/// A group's sums: requests, errors, prompt, completion and total tokens.
type Sums = [u64; 5];

/// `/usage`'s aggregation, fed the pages (see `pages.rs`) that can hold
/// the range, then given the names of the ids it used.
///
/// The stores read `proxypal_ledger_pages` and hand each page's text to
/// [`Aggregation::add_page`]; the records are read and summed here, the
/// same for both backends. Unpacking the pages with the databases' own
/// JSON functions (the `proxypal_ledger` view) took SQLite 3.4–6.6 s per
/// million records (`examples/usage_cost`).
#[derive(Debug)]
pub(crate) struct Aggregation<'q> {
    query: &'q UsageQuery,
    clients: Clients,
    groups: HashMap<GroupKey, Sums>,
}

impl<'q> Aggregation<'q> {
    /// An empty aggregation for `query`, counting `clients`' records.
    pub(crate) fn new(query: &'q UsageQuery, clients: Clients) -> Self {
        Self { query, clients, groups: HashMap::new() }
    }

    /// Adds the records of one page in the query's range.
    ///
    /// # Errors
    /// A page that is not one (see [`pages::read`]).
    pub(crate) fn add_page(&mut self, data: &str) -> Result<(), pages::BadPage> {
        let (from, to) = (self.query.from_ms, self.query.to_ms);
        let bucket = self.query.bucket.millis();
        let group = self.query.group_by;
        let client = match self.clients {
            Clients::All => None,
            Clients::Id(id) => Some(id),
            Clients::Nobody => return Ok(()),
        };
        let groups = &mut self.groups;
        pages::read(data, |v| {
            let Some(at) = v[AT] else { return };
            if at < from || at >= to || client.is_some_and(|id| v[CLIENT] != Some(id)) {
                return;
            }
            let id = |on: bool, field: usize| if on { v[field].unwrap_or(0) } else { 0 };
            let key = [
                bucket.map_or(0, |ms| at - at.rem_euclid(ms)),
                id(group.client, CLIENT),
                id(group.model, MODEL),
                id(group.provider, PROVIDER),
                id(group.key, KEY),
            ];
            let count = |field: usize| v[field].map_or(0, |n| u64::try_from(n).unwrap_or(0));
            let sums = groups.entry(key).or_default();
            sums[0] += 1;
            sums[1] += u64::from(v[STATUS].is_some_and(|status| status >= 400));
            for (sum, field) in sums[2..].iter_mut().zip([PROMPT, COMPLETION, TOTAL]) {
                *sum = sum.saturating_add(count(field));
            }
        })
    }

    /// The name ids the groups hold, each once, to be looked up for
    /// [`Aggregation::rows`].
    pub(crate) fn ids(&self) -> Vec<i64> {
        let mut ids: Vec<i64> =
            self.groups.keys().flat_map(|key| key[1..].iter().copied()).filter(|id| *id != 0).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// The result rows, ordered by bucket, then by the grouped names (byte
    /// order). A group whose id has no name is left out (it cannot happen
    /// unless the dictionary was edited by hand). Without grouping or
    /// buckets there is always exactly one row, zeros if nothing matched.
    pub(crate) fn rows(self, names: &HashMap<i64, String>) -> Vec<UsageRow> {
        let group = self.query.group_by;
        let bucketed = self.query.bucket.millis().is_some();
        if !bucketed && group == GroupBy::NONE && self.groups.is_empty() {
            return vec![UsageRow::default()];
        }
        let mut rows: Vec<(i64, UsageRow)> = Vec::with_capacity(self.groups.len());
        'groups: for (key, sums) in self.groups {
            let mut row = UsageRow {
                bucket: bucketed.then(|| format_ms(key[0])),
                requests: sums[0],
                errors: sums[1],
                prompt_tokens: sums[2],
                completion_tokens: sums[3],
                total_tokens: sums[4],
                ..UsageRow::default()
            };
            for (on, slot, id) in [
                (group.client, &mut row.client, key[1]),
                (group.model, &mut row.model, key[2]),
                (group.provider, &mut row.provider, key[3]),
                (group.key, &mut row.key, key[4]),
            ] {
                if on {
                    let Some(name) = names.get(&id) else { continue 'groups };
                    *slot = Some(name.clone());
                }
            }
            rows.push((key[0], row));
        }
        rows.sort_unstable_by(|(a_ms, a), (b_ms, b)| {
            (a_ms, &a.client, &a.model, &a.provider, &a.key).cmp(&(
                b_ms,
                &b.client,
                &b.model,
                &b.provider,
                &b.key,
            ))
        });
        rows.into_iter().map(|(_, row)| row).collect()
    }
}

/// Positions in a record's values (see `pages::FIELDS`).
const AT: usize = 0;
const CLIENT: usize = 1;
const MODEL: usize = 2;
const PROVIDER: usize = 3;
const KEY: usize = 5;
const STATUS: usize = 6;
const PROMPT: usize = 11;
const COMPLETION: usize = 12;
const TOTAL: usize = 13;

/// Unix ms as RFC 3339 UTC (`2026-12-01T13:00:00Z`); the raw number if out of jiff's range.
fn format_ms(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map_or_else(|_| ms.to_string(), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_by_parses_and_names_the_unknown() {
        assert_eq!("".parse::<GroupBy>(), Ok(GroupBy::NONE));
        let all: GroupBy = "key,provider , model,client,client".parse().unwrap();
        assert_eq!(all, GroupBy { client: true, model: true, provider: true, key: true });
        assert_eq!(all.to_string(), "client,model,provider,key");
        let err = "client,Model".parse::<GroupBy>().unwrap_err();
        assert_eq!(err.value, "Model");
        assert_eq!(
            err.to_string(),
            "unknown group_by 'Model' (expected one of: client, model, provider, key)"
        );
    }

    #[test]
    fn bucket_parses() {
        assert_eq!("hour".parse(), Ok(Bucket::Hour));
        assert_eq!("day".parse(), Ok(Bucket::Day));
        assert_eq!("none".parse(), Ok(Bucket::None));
        assert_eq!("week".parse::<Bucket>().unwrap_err().value, "week");
        for b in [Bucket::Hour, Bucket::Day, Bucket::None] {
            assert_eq!(b.to_string().parse(), Ok(b));
        }
    }

    #[test]
    fn csv_quotes_per_rfc_4180() {
        let rows = [
            UsageRow {
                bucket: Some("2026-12-01T13:00:00Z".into()),
                client: Some("say \"hi\"".into()),
                model: Some("line\nbreak".into()),
                provider: Some("plain".into()),
                key: None,
                requests: 3,
                errors: 1,
                prompt_tokens: 10,
                completion_tokens: 20,
                total_tokens: 30,
            },
            UsageRow::default(),
        ];
        assert_eq!(
            to_csv(&rows),
            format!(
                "{CSV_HEADER}\r\n2026-12-01T13:00:00Z,\"say \"\"hi\"\"\",\"line\nbreak\",plain,,3,1,10,20,30\r\n,,,,,0,0,0,0,0\r\n"
            )
        );
    }

    #[test]
    fn csv_header_matches_the_json_names() {
        let json = serde_json::to_value(UsageRow::default()).unwrap();
        let names: Vec<&str> = CSV_HEADER.split(',').collect();
        let object = json.as_object().unwrap();
        assert_eq!(object.len(), names.len());
        for name in names {
            assert!(object.contains_key(name), "{name}");
        }
        assert!(object["bucket"].is_null());
    }

    #[test]
    fn buckets_format_as_rfc3339_utc() {
        assert_eq!(format_ms(1_796_130_000_000), "2026-12-01T13:00:00Z");
        assert_eq!(format_ms(0), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn field_positions_match_the_pages() {
        for (position, field) in [
            (AT, "at_ms"),
            (CLIENT, "client_id"),
            (MODEL, "model_id"),
            (PROVIDER, "provider_id"),
            (KEY, "key_id"),
            (STATUS, "status"),
            (PROMPT, "prompt_tokens"),
            (COMPLETION, "completion_tokens"),
            (TOTAL, "total_tokens"),
        ] {
            assert_eq!(pages::position(field), Some(position), "{field}");
        }
    }
}
