//! The storability check (`ferry_codec::storable::check_storable_json`): it never panics on any
//! text, and when it accepts a JSON value (as the gateway gets it, a `RawValue`) that value keeps
//! its promises: it parses as JSON with no lone surrogate, holds no U+0000 in a string or a key,
//! nests at most `MAX_JSON_DEPTH` deep, and still parses when wrapped deeper, as a page, a push
//! or an inbox entry wraps it.
//!
//! Numbers are zeroed before that parse (`1e130000` is storable in `numeric` though no f64 holds
//! it). That they stay within `numeric`'s range is not checked here (it would take a second
//! implementation of the same rule); the unit tests beside the check hold its edges.

#![no_main]

use ferry_codec::storable::{check_storable_json, MAX_JSON_DEPTH};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use serde_json::Value;

/// Levels a served value may be wrapped in: serde_json reads at most 127 levels, and an accepted
/// value has at most `MAX_JSON_DEPTH` (64) of its own.
const WRAP: usize = 127 - MAX_JSON_DEPTH;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Documented for valid JSON only, but it must not panic on anything.
    let verdict = check_storable_json(text);
    let Ok(raw) = serde_json::from_str::<Box<RawValue>>(text) else {
        return;
    };
    assert_eq!(check_storable_json(raw.get()), verdict);
    if verdict.is_err() {
        return;
    }
    // Numbers are the check's business only as far as `numeric` goes: `1e130000` is storable
    // though no f64 holds it, so they are zeroed before serde_json reads the value.
    let text = zero_numbers(raw.get());
    let value: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("accepted but does not parse: {e}"));
    assert!(
        depth(&value) <= MAX_JSON_DEPTH,
        "accepted nesting of {}",
        depth(&value)
    );
    assert!(!has_nul(&value), "accepted a U+0000");
    let wrapped = format!("{}{}{}", "[".repeat(WRAP), text, "]".repeat(WRAP));
    serde_json::from_str::<Value>(&wrapped)
        .unwrap_or_else(|e| panic!("accepted but cannot be served wrapped: {e}"));
});

/// `text` (valid JSON) with every number outside a string replaced by `0`.
fn zero_numbers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match c {
                '\\' => out.extend(chars.next()),
                '"' => in_string = false,
                _ => {}
            }
        } else if c == '-' || c.is_ascii_digit() {
            while chars
                .peek()
                .is_some_and(|n| n.is_ascii_digit() || matches!(n, '.' | 'e' | 'E' | '+' | '-'))
            {
                chars.next();
            }
            out.push('0');
        } else {
            in_string = c == '"';
            out.push(c);
        }
    }
    out
}

/// Levels of arrays and objects: a scalar is 0, `[]` is 1.
fn depth(v: &Value) -> usize {
    match v {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}
