//! [`check_storable_json`]: what a JSON value must not hold to be stored in a JSONB column and
//! served back — no `\u0000`, no unpaired surrogate escape, no number beyond Postgres
//! `numeric`'s range, no nesting deeper than [`MAX_JSON_DEPTH`]. The gateway applies it on
//! every backend alike, so a message that could not be archived never enters the WAL.

/// Largest number of digits a JSON number may have before and after the decimal point (after
/// applying its exponent). Postgres `numeric`, which JSONB uses, allows 131072 and 16383; these
/// stay a little below.
const MAX_INTEGER_DIGITS: i64 = 131_000;
const MAX_FRACTION_DIGITS: i64 = 16_000;

/// Deepest nesting of arrays and objects a stored JSON value (a message's `content`, a
/// `metadata` object) may have. Every place the value is served wraps it a few levels deeper (a
/// page, a push, an inbox entry), and common JSON parsers, serde_json among them, stop at 128
/// levels: past that a stored message could be written but no longer read back.
pub const MAX_JSON_DEPTH: usize = 64;

/// Checks that a JSON text (already known to be valid JSON) holds nothing a JSONB column refuses:
/// the escape `\u0000`, an unpaired surrogate escape, or a number beyond `numeric`'s range; and
/// that it nests no deeper than [`MAX_JSON_DEPTH`]. Such a message would be accepted into the
/// WAL and then fail every archive attempt or every read, so the gateway refuses it up front, on
/// every backend alike.
pub fn check_storable_json(text: &str) -> Result<(), String> {
    let b = text.as_bytes();
    let mut i = 0;
    let mut depth = 0usize;
    while i < b.len() {
        match b[i] {
            b'"' => i = scan_string(b, i + 1)?,
            b'-' | b'0'..=b'9' => match scan_json_number(b, i) {
                Some((end, true)) => i = end,
                Some((_, false)) => return Err("number out of the storable range".into()),
                None => return Err("malformed number".into()),
            },
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Err(format!(
                        "nested deeper than {MAX_JSON_DEPTH} levels of arrays and objects"
                    ));
                }
                i += 1;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

/// From just after an opening quote to just after the closing one.
fn scan_string(b: &[u8], mut i: usize) -> Result<usize, String> {
    // A high surrogate escape seen just before, waiting for its low half.
    let mut pending_high = false;
    while i < b.len() {
        if !pending_high {
            // Plain text up to the next quote or escape needs no look byte by byte.
            match memchr::memchr2(b'"', b'\\', &b[i..]) {
                Some(n) => i += n,
                None => break,
            }
        }
        match b[i] {
            b'"' if !pending_high => return Ok(i + 1),
            b'\\' if b.get(i + 1) == Some(&b'u') => {
                let hex = b
                    .get(i + 2..i + 6)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u16::from_str_radix(h, 16).ok())
                    .ok_or("malformed \\u escape")?;
                match hex {
                    0 => return Err("strings may not contain \\u0000".into()),
                    0xD800..=0xDBFF if !pending_high => pending_high = true,
                    0xDC00..=0xDFFF if pending_high => pending_high = false,
                    _ if pending_high => return Err("unpaired surrogate escape".into()),
                    0xDC00..=0xDFFF => return Err("unpaired surrogate escape".into()),
                    _ => {}
                }
                i += 6;
            }
            _ if pending_high => return Err("unpaired surrogate escape".into()),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    Err("unterminated string".into())
}

/// A number in JSON's grammar at `at`: where it ends, and whether a JSONB column stores it (the
/// count of digits before and after its decimal point, after applying its exponent, within
/// `numeric`'s range). `None`: no number in JSON's grammar starts there.
pub(crate) fn scan_json_number(b: &[u8], at: usize) -> Option<(usize, bool)> {
    let digits = |at: &mut usize| {
        let start = *at;
        while b.get(*at).is_some_and(u8::is_ascii_digit) {
            *at += 1;
        }
        (*at - start) as i64
    };
    let mut at = at;
    if b.get(at) == Some(&b'-') {
        at += 1;
    }
    let int_digits = match b.get(at)? {
        b'0' => {
            at += 1;
            1
        }
        b'1'..=b'9' => digits(&mut at),
        _ => return None,
    };
    let mut frac_digits = 0;
    if b.get(at) == Some(&b'.') {
        at += 1;
        frac_digits = digits(&mut at);
        if frac_digits == 0 {
            return None;
        }
    }
    let mut exponent: i64 = 0;
    if matches!(b.get(at), Some(b'e' | b'E')) {
        at += 1;
        let negative = b.get(at) == Some(&b'-');
        if matches!(b.get(at), Some(b'-' | b'+')) {
            at += 1;
        }
        let start = at;
        if digits(&mut at) == 0 {
            return None;
        }
        exponent = exponent_value(&b[start..at], negative);
    }
    Some((at, number_in_range(int_digits, frac_digits, exponent)))
}

/// An exponent's decimal digits as a number, saturating (no JSONB number comes near the ends).
fn exponent_value(digits: &[u8], negative: bool) -> i64 {
    let magnitude = digits.iter().fold(0i64, |e, d| {
        e.saturating_mul(10).saturating_add(i64::from(d - b'0'))
    });
    if negative {
        -magnitude
    } else {
        magnitude
    }
}

/// Whether a number with these counts of digits before and after its decimal point, and this
/// exponent, is within what a JSONB column stores.
fn number_in_range(int_digits: i64, frac_digits: i64, exponent: i64) -> bool {
    int_digits.saturating_add(exponent) <= MAX_INTEGER_DIGITS
        && frac_digits.saturating_sub(exponent) <= MAX_FRACTION_DIGITS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storable_json_accepts_ordinary_values() {
        for ok in [
            r#"{"a": [1, -2.5e3, 0.001, true, null, "x\"y\\u0000"]}"#,
            r#""\ud83d\ude00 and \u00e9 and \\""#,
            "1e130000",
            "1e-15999",
            "123456789012345678901234567890.5",
            r#"{"k": "1e999999"}"#,
            "-0",
        ] {
            assert_eq!(check_storable_json(ok), Ok(()), "{ok}");
        }
        let deepest = format!(
            "{}{}",
            "[".repeat(MAX_JSON_DEPTH),
            "]".repeat(MAX_JSON_DEPTH)
        );
        assert_eq!(check_storable_json(&deepest), Ok(()));
        // Brackets inside strings are text, not nesting.
        let quoted = format!(r#"{{"a": "{}"}}"#, "[{".repeat(200));
        assert_eq!(check_storable_json(&quoted), Ok(()));
        // Depth is nesting, not the number of containers.
        let wide = format!("[{}[]]", "[[]],".repeat(500));
        assert_eq!(check_storable_json(&wide), Ok(()));
    }

    #[test]
    fn storable_json_refuses_nesting_past_the_limit() {
        let d = MAX_JSON_DEPTH + 1;
        for bad in [
            format!("{}{}", "[".repeat(d), "]".repeat(d)),
            format!("{}1{}", r#"{"a":"#.repeat(d), "}".repeat(d)),
            format!(
                r#"{{"x": "]]]", "y": {}{}}}"#,
                "[".repeat(d - 1),
                "]".repeat(d - 1)
            ),
        ] {
            let err = check_storable_json(&bad).unwrap_err();
            assert!(err.contains("nested deeper than 64"), "{err}");
        }
    }

    #[test]
    fn storable_json_refuses_what_jsonb_refuses() {
        for bad in [
            r#""a\u0000b""#,
            r#"{"k": ["\u0000"]}"#,
            r#""\ud800""#,
            r#""\ud800x""#,
            r#""\udc00""#,
            r#""\ud800\u0041""#,
            "1e131072",
            "1e-16384",
            "0.5e-16000",
            "1e99999999999999999999999",
            r#"{"n": -1E+200000}"#,
        ] {
            assert!(check_storable_json(bad).is_err(), "{bad}");
        }
    }
}
