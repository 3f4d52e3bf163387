//! RFC 3339 timestamps in UTC, just what the payload and the dedup expiry need (no
//! calendar crate for two conversions). Civil-date arithmetic after Howard Hinnant's
//! `days_from_civil` / `civil_from_days`.

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for Unix milliseconds (years 0000–9999 keep the format).
pub(crate) fn format_rfc3339_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z", sod / 3600, sod % 3600 / 60, sod % 60)
}

/// Unix milliseconds of an RFC 3339 date-time (`2026-11-04T00:00:00Z`, fractions and
/// `±HH:MM` offsets accepted); `None` if it is not one.
pub(crate) fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        let part = s.get(from..to)?;
        if part.bytes().all(|c| c.is_ascii_digit()) { part.parse().ok() } else { None }
    };
    let (y, mo, d) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (h, mi, sec) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut millis = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        for (i, c) in frac.bytes().take(3).take_while(u8::is_ascii_digit).enumerate() {
            millis += i64::from(c - b'0') * [100, 10, 1][i];
        }
        rest = &frac[digits..];
    }
    let offset_s = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            let off = oh * 3600 + om * 60;
            if *sign == b'+' { off } else { -off }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_s;
    Some(secs * 1000 + millis)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values from `date -u -d @<secs>`.
    const CASES: &[(i64, &str)] = &[
        (0, "1970-01-01T00:00:00.000Z"),
        (1_614_265_330_000, "2021-02-25T15:02:10.000Z"),
        (1_700_000_000_123, "2023-11-14T22:13:20.123Z"),
        (951_868_799_999, "2000-02-29T23:59:59.999Z"),
        (-1_500, "1969-12-31T23:59:58.500Z"),
    ];

    #[test]
    fn formats_and_parses_known_instants() {
        for &(ms, text) in CASES {
            assert_eq!(format_rfc3339_ms(ms), text, "ms {ms}");
            assert_eq!(parse_rfc3339_ms(text), Some(ms), "text {text}");
        }
    }

    #[test]
    fn parses_offsets_and_fraction_lengths() {
        assert_eq!(parse_rfc3339_ms("2021-02-25T16:02:10+01:00"), Some(1_614_265_330_000));
        assert_eq!(parse_rfc3339_ms("2021-02-25T10:02:10.5-05:00"), Some(1_614_265_330_500));
        assert_eq!(parse_rfc3339_ms("2021-02-25T15:02:10.123456789Z"), Some(1_614_265_330_123));
    }

    #[test]
    fn refuses_what_is_not_rfc3339() {
        for bad in
            ["", "2021-02-25", "2021-02-25T15:02:10", "2021-13-01T00:00:00Z", "day", "2021-02-25T15:02:10.Z"]
        {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }
}
