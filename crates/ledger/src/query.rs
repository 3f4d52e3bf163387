//! What `/usage` asks for ([`UsageQuery`]), what it gets back ([`UsageRow`],
//! [`to_csv`]), and the one SQL statement both backends run for it.
//!
//! Buckets are integer arithmetic on unix milliseconds, so the statement is
//! the same for SQLite and PostgreSQL except for placeholders and collation.

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

/// The differences between the backends' SQL.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    fn placeholder(self, n: usize) -> String {
        match self {
            Self::Sqlite => format!("?{n}"),
            Self::Postgres => format!("${n}"),
        }
    }

    /// The records whose page can hold a time in `[from, to)`, unpacked
    /// (see `pages.rs`), as a subquery with [`USAGE_FIELDS`] for columns;
    /// `at_ms` is checked by the caller. The pages are found by their time
    /// range (`last_ms` is indexed).
    fn records(self, from: &str, to: &str) -> String {
        let (pages, value) = match self {
            Self::Sqlite => ("proxypal_ledger_pages p, json_each(p.data) r", "r.value ->> "),
            Self::Postgres => {
                ("proxypal_ledger_pages p CROSS JOIN LATERAL json_array_elements(p.data::json) r", "r ->> ")
            }
        };
        let columns: Vec<String> = USAGE_FIELDS
            .iter()
            .map(|field| {
                // Every field of USAGE_FIELDS is one of pages::FIELDS.
                let index = pages::position(field).unwrap_or(usize::MAX);
                match self {
                    Self::Sqlite => format!("{value}{index} AS {field}"),
                    Self::Postgres => format!("CAST({value}{index} AS BIGINT) AS {field}"),
                }
            })
            .collect();
        format!(
            "(SELECT {} FROM {pages} WHERE p.last_ms >= {from} AND p.first_ms < {to}) l",
            columns.join(", ")
        )
    }

    /// Byte order for text, so both backends sort rows alike.
    fn collate(self) -> &'static str {
        match self {
            Self::Sqlite => "",
            Self::Postgres => " COLLATE \"C\"",
        }
    }
}

/// The fields of a record the aggregation reads.
const USAGE_FIELDS: [&str; 9] = [
    "at_ms",
    "client_id",
    "model_id",
    "provider_id",
    "key_id",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
];

/// The grouped name columns in output order: (id column, selected).
fn name_columns(group: GroupBy) -> [(&'static str, bool); 4] {
    [
        ("client_id", group.client),
        ("model_id", group.model),
        ("provider_id", group.provider),
        ("key_id", group.key),
    ]
}

/// The aggregation for `query`. Parameters: `from_ms`, `to_ms`, then the
/// client when [`UsageQuery::client`] is set. Columns: the bucket (unix ms)
/// if bucketed, the grouped names in [`UsageRow`] order, then requests,
/// errors and the three token sums (all BIGINT).
///
/// Rows hold name ids (see `names.rs`): the rows are grouped by ids, and
/// only the groups are joined to `proxypal_ledger_names` for their names.
/// A name has one id and an id one name, so the groups are the same as
/// grouping by the names themselves.
pub(crate) fn usage_sql(query: &UsageQuery, dialect: Dialect) -> String {
    let mut keys = Vec::new();
    if let Some(ms) = query.bucket.millis() {
        // floor(at_ms / ms) * ms, also right for negative at_ms (% keeps the dividend's sign).
        keys.push(format!("at_ms - (((at_ms % {ms}) + {ms}) % {ms}) AS bucket"));
    }
    let names: Vec<&str> =
        name_columns(query.group_by).iter().filter(|(_, on)| *on).map(|(column, _)| *column).collect();
    keys.extend(names.iter().map(|column| (*column).to_owned()));
    let sums = [
        ("requests", "COUNT(*)"),
        ("errors", "SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END)"),
        ("prompt_tokens", "SUM(prompt_tokens)"),
        ("completion_tokens", "SUM(completion_tokens)"),
        ("total_tokens", "SUM(total_tokens)"),
    ]
    // PostgreSQL's SUM(BIGINT) is NUMERIC; NULL over no rows.
    .map(|(name, sum)| format!("CAST(COALESCE({sum}, 0) AS BIGINT) AS {name}"));
    let (from, to) = (dialect.placeholder(1), dialect.placeholder(2));
    let mut aggregate = format!(
        "SELECT {} FROM {} WHERE at_ms >= {from} AND at_ms < {to}",
        keys.iter().map(String::as_str).chain(sums.iter().map(String::as_str)).collect::<Vec<_>>().join(", "),
        dialect.records(&from, &to),
    );
    if query.client.is_some() {
        // No such name: no id, no rows.
        let _ = write!(
            aggregate,
            " AND client_id = (SELECT id FROM proxypal_ledger_names WHERE name = {})",
            dialect.placeholder(3)
        );
    }
    if keys.is_empty() {
        return aggregate; // one total row
    }
    let positions: Vec<String> = (1..=keys.len()).map(|i| i.to_string()).collect();
    let _ = write!(aggregate, " GROUP BY {}", positions.join(", "));
    if names.is_empty() {
        return format!("{aggregate} ORDER BY bucket");
    }
    let mut select = Vec::new();
    let mut order = Vec::new();
    if query.bucket.millis().is_some() {
        select.push("g.bucket".to_owned());
        order.push("g.bucket".to_owned());
    }
    let mut joins = String::new();
    for (i, column) in names.iter().enumerate() {
        select.push(format!("n{i}.name"));
        order.push(format!("n{i}.name{}", dialect.collate()));
        let _ = write!(joins, " JOIN proxypal_ledger_names n{i} ON n{i}.id = g.{column}");
    }
    select.extend(
        ["requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens"]
            .map(|sum| format!("g.{sum}")),
    );
    format!("SELECT {} FROM ({aggregate}) g{joins} ORDER BY {}", select.join(", "), order.join(", "))
}

/// Builds [`UsageRow`]s from the columns [`usage_sql`] selects, read by
/// `get(index)` (as BIGINT or TEXT) from one database row.
pub(crate) fn usage_row<E>(
    query: &UsageQuery,
    mut int: impl FnMut(usize) -> Result<i64, E>,
    mut text: impl FnMut(usize) -> Result<String, E>,
) -> Result<UsageRow, E> {
    let mut row = UsageRow::default();
    let mut index = 0;
    if query.bucket.millis().is_some() {
        row.bucket = Some(format_ms(int(index)?));
        index += 1;
    }
    let group = query.group_by;
    for (selected, slot) in [
        (group.client, &mut row.client),
        (group.model, &mut row.model),
        (group.provider, &mut row.provider),
        (group.key, &mut row.key),
    ] {
        if selected {
            *slot = Some(text(index)?);
            index += 1;
        }
    }
    let mut count = || -> Result<u64, E> {
        let value = int(index)?;
        index += 1;
        Ok(u64::try_from(value).unwrap_or(0))
    };
    row.requests = count()?;
    row.errors = count()?;
    row.prompt_tokens = count()?;
    row.completion_tokens = count()?;
    row.total_tokens = count()?;
    Ok(row)
}

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
    fn sql_per_dialect() {
        let query = UsageQuery {
            from_ms: 0,
            to_ms: 1,
            group_by: "client,key".parse().unwrap(),
            bucket: Bucket::Hour,
            client: Some("c".into()),
        };
        let pg = usage_sql(&query, Dialect::Postgres);
        assert!(
            pg.contains(
                "at_ms >= $1 AND at_ms < $2 AND client_id = (SELECT id FROM proxypal_ledger_names WHERE name = $3)"
            ),
            "{pg}"
        );
        assert!(
            pg.contains("GROUP BY 1, 2, 3) g JOIN proxypal_ledger_names n0 ON n0.id = g.client_id"),
            "{pg}"
        );
        assert!(pg.ends_with("ORDER BY g.bucket, n0.name COLLATE \"C\", n1.name COLLATE \"C\""), "{pg}");
        assert!(
            pg.contains(
                "FROM (SELECT CAST(r ->> 0 AS BIGINT) AS at_ms, CAST(r ->> 1 AS BIGINT) AS client_id, "
            ) && pg.contains(
                "CAST(r ->> 13 AS BIGINT) AS total_tokens FROM proxypal_ledger_pages p CROSS JOIN LATERAL \
                 json_array_elements(p.data::json) r WHERE p.last_ms >= $1 AND p.first_ms < $2) l WHERE "
            ),
            "records are unpacked from the pages that can hold the range: {pg}"
        );
        let total =
            UsageQuery { group_by: GroupBy::NONE, bucket: Bucket::None, client: None, ..query.clone() };
        let lite = usage_sql(&total, Dialect::Sqlite);
        assert!(
            lite.ends_with(
                "r.value ->> 13 AS total_tokens FROM proxypal_ledger_pages p, json_each(p.data) r \
                 WHERE p.last_ms >= ?1 AND p.first_ms < ?2) l WHERE at_ms >= ?1 AND at_ms < ?2"
            ),
            "SQLite unpacks the pages that can hold the range: {lite}"
        );
        let hourly = UsageQuery { group_by: GroupBy::NONE, client: None, ..query };
        let lite = usage_sql(&hourly, Dialect::Sqlite);
        assert!(lite.ends_with("GROUP BY 1 ORDER BY bucket") && !lite.contains("JOIN"), "{lite}");
    }
}
