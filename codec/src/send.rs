//! A `send`'s payload, `{sender?, kind?, content, metadata?, idempotency_key?}`, read two ways:
//!
//! - [`AppendBody`], the serde reading: the reference, used by HTTP appends and by any `send`
//!   the one pass below does not take. Its errors are the ones clients see.
//! - [`parse_send`], one pass over the text that finds the five fields, checks the whole payload
//!   is valid JSON and checks `content` and `metadata` the way
//!   [`check_storable_json`](crate::storable::check_storable_json) does, borrowing every field
//!   from the text. It takes only what it is sure of: anything unusual (an escape in a key or in
//!   `sender`/`kind`/`idempotency_key`, a repeated or unknown field, a value that is not storable, nesting
//!   past [`MAX_JSON_DEPTH`], invalid JSON, a payload that is not an object) gives `None`, and
//!   the caller reads the payload the serde way, which says what is wrong.
//!
//! The promise, checked by the property tests below and the `send_payload` fuzz target: whenever
//! [`parse_send`] gives fields, [`AppendBody`] reads the same fields from the same text and both
//! values pass the storable check. [`Scan`] also serves [`crate::phoenix::decode`], which reads a
//! whole frame in the same pass.

use ferry_shards::record::plain_json_prefix;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::storable::{scan_json_number, MAX_JSON_DEPTH};

/// The event whose payload [`parse_send`] reads.
pub const SEND: &str = "send";

/// A `send` payload (and an HTTP append's body) as serde reads it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppendBody {
    /// Required with an API key; ignored for a user (who always sends as itself).
    #[serde(default)]
    pub sender: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    /// Required; an explicit `null` is valid content (absent is not).
    #[serde(default, deserialize_with = "present")]
    pub content: Option<Box<RawValue>>,
    #[serde(default)]
    pub metadata: Option<Box<RawValue>>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// Keeps an explicit JSON `null` as `Some(null)`; only an absent field is `None`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// The fields of a `send` payload, borrowed from its text: what [`AppendBody`] holds, with
/// `content` and `metadata` as their JSON text. A `null` `sender`, `kind`, `metadata` or
/// `idempotency_key` is `None`, as in [`AppendBody`]; a `null` `content` is `Some("null")`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendFields<'a> {
    pub sender: Option<&'a str>,
    pub kind: Option<&'a str>,
    pub content: Option<&'a str>,
    pub metadata: Option<&'a str>,
    pub idempotency_key: Option<&'a str>,
}

impl SendFields<'_> {
    /// The same payload as an owned [`AppendBody`]. `None` only if `content` or `metadata` were
    /// not JSON after all, which [`parse_send`] never lets through; the caller then reads the
    /// payload the serde way rather than trusting these fields.
    pub fn to_body(&self) -> Option<AppendBody> {
        let raw = |text: &str| RawValue::from_string(text.to_owned()).ok();
        Some(AppendBody {
            sender: self.sender.map(str::to_owned),
            kind: self.kind.map(str::to_owned),
            content: match self.content {
                Some(text) => Some(raw(text)?),
                None => None,
            },
            metadata: match self.metadata {
                Some(text) => Some(raw(text)?),
                None => None,
            },
            idempotency_key: self.idempotency_key.map(str::to_owned),
        })
    }
}

/// Reads a `send` payload in one pass; see the module's documentation for what it refuses.
pub fn parse_send(payload: &str) -> Option<SendFields<'_>> {
    let mut scan = Scan::new(payload);
    scan.skip_ws();
    let fields = scan.send_payload()?;
    scan.at_end().then_some(fields)
}

/// A cursor over JSON text that only moves forward and only accepts JSON that is valid and
/// storable. Every method that reads something returns `None` at the first byte it is not sure
/// of, with the cursor left wherever it stopped.
pub(crate) struct Scan<'a> {
    text: &'a str,
    at: usize,
}

/// Field bits for [`Scan::send_payload`]'s repeat check.
const SENDER: u8 = 1;
const KIND: u8 = 2;
const CONTENT: u8 = 4;
const METADATA: u8 = 8;
const IDEMPOTENCY_KEY: u8 = 16;

impl<'a> Scan<'a> {
    pub(crate) fn new(text: &'a str) -> Self {
        Scan { text, at: 0 }
    }

    pub(crate) fn position(&self) -> usize {
        self.at
    }

    /// Back to `at`, a position this scan was at before.
    pub(crate) fn rewind(&mut self, at: usize) {
        self.at = at;
    }

    /// The text from `start`, a position this scan was at before, to where it is now.
    pub(crate) fn since(&self, start: usize) -> &'a str {
        &self.text[start..self.at]
    }

    pub(crate) fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    pub(crate) fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    /// The byte `c`, stepped over.
    pub(crate) fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.at += 1)
    }

    /// Whitespace, then the end of the text.
    pub(crate) fn at_end(&mut self) -> bool {
        self.skip_ws();
        self.at == self.text.len()
    }

    /// A JSON value, valid and storable, nested at most [`MAX_JSON_DEPTH`] deep: the text it
    /// spans.
    pub(crate) fn value(&mut self) -> Option<&'a str> {
        let start = self.at;
        self.value_at(0)?;
        Some(self.since(start))
    }

    /// `depth`: how many arrays and objects are open around this value.
    fn value_at(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'{' => {
                self.open(depth)?;
                if self.eat(b'}').is_some() {
                    return Some(());
                }
                loop {
                    self.string()?;
                    self.skip_ws();
                    self.eat(b':')?;
                    self.skip_ws();
                    self.value_at(depth + 1)?;
                    if self.next_member(b'}')? {
                        return Some(());
                    }
                }
            }
            b'[' => {
                self.open(depth)?;
                if self.eat(b']').is_some() {
                    return Some(());
                }
                loop {
                    self.value_at(depth + 1)?;
                    if self.next_member(b']')? {
                        return Some(());
                    }
                }
            }
            b'"' => self.string(),
            b'-' | b'0'..=b'9' => self.number(),
            b't' => self.literal("true"),
            b'f' => self.literal("false"),
            b'n' => self.literal("null"),
            _ => None,
        }
    }

    /// Steps into an array or object opened at `depth`, and over the whitespace after it.
    fn open(&mut self, depth: usize) -> Option<()> {
        if depth >= MAX_JSON_DEPTH {
            return None;
        }
        self.at += 1;
        self.skip_ws();
        Some(())
    }

    /// After a member: `,` (`false`, another follows) or `close` (`true`, the container ends),
    /// with the whitespace around it.
    fn next_member(&mut self, close: u8) -> Option<bool> {
        self.skip_ws();
        let c = self.peek()?;
        self.at += 1;
        if c == close {
            return Some(true);
        }
        if c != b',' {
            return None;
        }
        self.skip_ws();
        Some(false)
    }

    pub(crate) fn literal(&mut self, word: &str) -> Option<()> {
        self.text.as_bytes()[self.at..]
            .starts_with(word.as_bytes())
            .then(|| self.at += word.len())
    }

    /// A string with its escapes checked: only JSON's escapes, no `\u0000`, every surrogate
    /// escape paired; no raw control character.
    fn string(&mut self) -> Option<()> {
        let b = self.text.as_bytes();
        self.eat(b'"')?;
        loop {
            self.at = skip_plain(b, self.at);
            match *b.get(self.at)? {
                b'"' => {
                    self.at += 1;
                    return Some(());
                }
                b'\\' => self.escape()?,
                _ => return None,
            }
        }
    }

    fn escape(&mut self) -> Option<()> {
        let b = self.text.as_bytes();
        match *b.get(self.at + 1)? {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                self.at += 2;
                Some(())
            }
            b'u' => match self.hex_escape()? {
                0 | 0xDC00..=0xDFFF => None,
                0xD800..=0xDBFF => match self.hex_escape()? {
                    0xDC00..=0xDFFF => Some(()),
                    _ => None,
                },
                _ => Some(()),
            },
            _ => None,
        }
    }

    /// `\uXXXX` at the cursor, stepped over: its value.
    fn hex_escape(&mut self) -> Option<u16> {
        let b = self.text.as_bytes();
        if b.get(self.at..self.at + 2)? != b"\\u" {
            return None;
        }
        let hex = b.get(self.at + 2..self.at + 6)?;
        let mut value = 0u16;
        for &h in hex {
            value = value * 16 + (h as char).to_digit(16)? as u16;
        }
        self.at += 6;
        Some(value)
    }

    /// A string without escapes: its text between the quotes.
    pub(crate) fn plain_string(&mut self) -> Option<&'a str> {
        let b = self.text.as_bytes();
        self.eat(b'"')?;
        let start = self.at;
        self.at = skip_plain(b, self.at);
        self.eat(b'"')?;
        Some(&self.text[start..self.at - 1])
    }

    /// A number in JSON's grammar, within the range a JSONB column stores (the storable check's
    /// own rule, [`scan_json_number`]).
    pub(crate) fn number(&mut self) -> Option<()> {
        let (end, storable) = scan_json_number(self.text.as_bytes(), self.at)?;
        storable.then(|| self.at = end)
    }

    /// A `send` payload object at the cursor.
    pub(crate) fn send_payload(&mut self) -> Option<SendFields<'a>> {
        let mut fields = SendFields::default();
        let mut seen = 0u8;
        self.eat(b'{')?;
        self.skip_ws();
        if self.eat(b'}').is_some() {
            return Some(fields);
        }
        loop {
            let key = self.plain_string()?;
            self.skip_ws();
            self.eat(b':')?;
            self.skip_ws();
            let bit = match key {
                "sender" => SENDER,
                "kind" => KIND,
                "content" => CONTENT,
                "metadata" => METADATA,
                "idempotency_key" => IDEMPOTENCY_KEY,
                // serde refuses an unknown field.
                _ => return None,
            };
            if seen & bit != 0 {
                // serde refuses a repeated field.
                return None;
            }
            seen |= bit;
            match bit {
                SENDER => fields.sender = self.optional_string()?,
                KIND => fields.kind = self.optional_string()?,
                IDEMPOTENCY_KEY => fields.idempotency_key = self.optional_string()?,
                CONTENT => fields.content = Some(self.value()?),
                _ => fields.metadata = Some(self.value()?).filter(|v| *v != "null"),
            }
            if self.next_member(b'}')? {
                return Some(fields);
            }
        }
    }

    /// `null` or a string without escapes.
    fn optional_string(&mut self) -> Option<Option<&'a str>> {
        if self.peek()? == b'n' {
            self.literal("null")?;
            return Some(None);
        }
        self.plain_string().map(Some)
    }
}

/// From `at`, the position of the first byte that ends a string's plain text (a quote, a
/// backslash or a control character), or the text's length.
fn skip_plain(b: &[u8], at: usize) -> usize {
    at + plain_json_prefix(&b[at..])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::storable::check_storable_json;
    use proptest::prelude::*;

    /// What the serde path makes of a payload, as [`SendFields`] compare: the fields, or why not.
    fn reference(payload: &str) -> Result<(AppendBody, bool), String> {
        let body: AppendBody = serde_json::from_str(payload).map_err(|e| e.to_string())?;
        let storable = [&body.content, &body.metadata]
            .into_iter()
            .flatten()
            .all(|v| check_storable_json(v.get()).is_ok());
        Ok((body, storable))
    }

    /// The promise: fields from the one pass are the serde reading's, and storable.
    fn check(payload: &str) -> Option<SendFields<'_>> {
        let fields = parse_send(payload);
        if let Some(fields) = fields {
            let (body, storable) = reference(payload)
                .unwrap_or_else(|e| panic!("{payload}: one pass took it, serde says {e}"));
            assert!(storable, "{payload}: one pass took what is not storable");
            assert_eq!(body.sender.as_deref(), fields.sender, "{payload}");
            assert_eq!(body.kind.as_deref(), fields.kind, "{payload}");
            assert_eq!(body.content.as_ref().map(|v| v.get()), fields.content);
            assert_eq!(body.metadata.as_ref().map(|v| v.get()), fields.metadata);
            assert_eq!(body.idempotency_key.as_deref(), fields.idempotency_key);
            let owned = fields.to_body().expect("fields were JSON");
            assert_eq!(format!("{owned:?}"), format!("{body:?}"));
        }
        fields
    }

    #[test]
    fn plain_text_ends_at_the_first_quote_backslash_or_control_byte() {
        let slow = |b: &[u8], at: usize| {
            (at..b.len())
                .find(|&i| b[i] == b'"' || b[i] == b'\\' || b[i] < 0x20)
                .unwrap_or(b.len())
        };
        let mut texts: Vec<Vec<u8>> = vec![Vec::new(), b"abc".to_vec()];
        for len in [7, 8, 9, 16, 17, 40] {
            for stop in [b'"', b'\\', 0, 0x1f, b'\n'] {
                for at in 0..len {
                    let mut text = "é😀xyzw".repeat(8).into_bytes();
                    text.truncate(len);
                    text[at] = stop;
                    texts.push(text);
                }
            }
            // Bytes next to the ones sought, and high bytes, never stop it.
            texts.push(vec![b'!'; len]);
            texts.push(vec![b'#'; len]);
            texts.push(vec![b' '; len]);
            texts.push(vec![b']'; len]);
            texts.push(vec![0xff; len]);
            texts.push(vec![0x80; len]);
        }
        for text in &texts {
            for at in 0..=text.len() {
                assert_eq!(skip_plain(text, at), slow(text, at), "{text:?} from {at}");
            }
        }
    }

    #[test]
    fn reads_what_clients_send() {
        let p = r#"{"content":{"text":"hi \"there\" \u00e9 \ud83d\ude00"},"kind":"text","metadata":{"a":[1,2.5e3,-0,true,false,null]},"idempotency_key":"k-1","sender":"bot"}"#;
        assert_eq!(
            check(p),
            Some(SendFields {
                sender: Some("bot"),
                kind: Some("text"),
                content: Some(r#"{"text":"hi \"there\" \u00e9 \ud83d\ude00"}"#),
                metadata: Some(r#"{"a":[1,2.5e3,-0,true,false,null]}"#),
                idempotency_key: Some("k-1"),
            })
        );
        let spaced = check(" {\n\t\"content\" : [ 1 , \"x\" ] , \"kind\" : \"k\" } ").unwrap();
        assert_eq!(spaced.content, Some(r#"[ 1 , "x" ]"#));
        assert_eq!(check("{}"), Some(SendFields::default()));
        let nulls = check(
            r#"{"content":null,"metadata":null,"sender":null,"kind":null,"idempotency_key":null}"#,
        )
        .unwrap();
        assert_eq!(
            nulls,
            SendFields {
                content: Some("null"),
                ..SendFields::default()
            }
        );
    }

    #[test]
    fn leaves_the_unusual_to_the_serde_path() {
        for payload in [
            // Valid for serde, but not taken here.
            r#"{"content":1,"content":2}"#,
            r#"{"metadata":null,"metadata":{}}"#,
            r#"{"cont\u0065nt":1}"#,
            r#"{"content":1,"sender":"b\u006ft"}"#,
            r#"[null,"text",1]"#,
            r#"{"content":1,"x":2}"#,
            // Not storable: serde reads them, the storable check refuses them.
            r#"{"content":"\u0000"}"#,
            r#"{"content":"\ud800"}"#,
            r#"{"content":"\udc00\ud800"}"#,
            r#"{"content":1e131072}"#,
            r#"{"metadata":{"n":0.5e-16000}}"#,
            // Invalid JSON.
            r#"{"content":01}"#,
            r#"{"content":1.}"#,
            r#"{"content":.5}"#,
            r#"{"content":-}"#,
            r#"{"content":1e}"#,
            r#"{"content":+1}"#,
            r#"{"content":tru}"#,
            r#"{"content":"\x"}"#,
            r#"{"content":"\u12"}"#,
            "{\"content\":\"a\u{1}b\"}",
            r#"{"content":[1,]}"#,
            r#"{"content":{"a":1,}}"#,
            r#"{"content":1,}"#,
            r#"{"content" 1}"#,
            r#"{"content":1"#,
            r#"{"content":1} x"#,
            r#"{"sender":5,"content":1}"#,
            "",
            "null",
        ] {
            assert_eq!(check(payload), None, "{payload}");
        }
        let deepest = format!(
            r#"{{"content":{}{}}}"#,
            "[".repeat(MAX_JSON_DEPTH),
            "]".repeat(MAX_JSON_DEPTH)
        );
        assert!(check(&deepest).is_some());
        let deeper = format!(
            r#"{{"content":{}{}}}"#,
            "[".repeat(MAX_JSON_DEPTH + 1),
            "]".repeat(MAX_JSON_DEPTH + 1)
        );
        assert_eq!(check(&deeper), None);
    }

    /// JSON values of every shape, with the strings, escapes and numbers that matter here.
    fn json_value() -> impl Strategy<Value = String> {
        let string = prop::collection::vec(
            prop_oneof![
                Just("a".to_owned()),
                Just("é😀".to_owned()),
                Just(r#"\""#.to_owned()),
                Just(r"\\".to_owned()),
                Just(r"\/\b\f\n\r\t".to_owned()),
                Just(r"\u0041".to_owned()),
                Just(r"\u0000".to_owned()),
                Just(r"\ud83d\ude00".to_owned()),
                Just(r"\ud800".to_owned()),
                Just(r"\udc00".to_owned()),
                Just("]}[{,:".to_owned()),
            ],
            0..4,
        )
        .prop_map(|parts| format!("\"{}\"", parts.concat()));
        let number = prop_oneof![
            Just("0".to_owned()),
            Just("-0".to_owned()),
            Just("12.50".to_owned()),
            Just("-3e4".to_owned()),
            Just("1E+2".to_owned()),
            Just("1e130999".to_owned()),
            Just("1e131001".to_owned()),
            Just("5e-15999".to_owned()),
            Just("5e-16001".to_owned()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| serde_json::to_string(&f).unwrap()),
        ];
        let leaf = prop_oneof![
            string.clone(),
            number,
            Just("true".to_owned()),
            Just("false".to_owned()),
            Just("null".to_owned()),
        ];
        leaf.prop_recursive(4, 24, 4, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|items| format!("[{}]", items.join(","))),
                prop::collection::vec((string.clone(), inner), 0..4).prop_map(|members| {
                    let members: Vec<String> =
                        members.iter().map(|(k, v)| format!("{k} : {v}")).collect();
                    format!("{{ {} }}", members.join(", "))
                }),
            ]
        })
    }

    /// Payloads: known fields (maybe repeated, of any type), unknown ones, in any order.
    pub(crate) fn payload() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            Just("\"sender\"".to_owned()),
            Just("\"kind\"".to_owned()),
            Just("\"content\"".to_owned()),
            Just("\"metadata\"".to_owned()),
            Just("\"idempotency_key\"".to_owned()),
            Just("\"other\"".to_owned()),
            Just(r#""kin\u0064""#.to_owned()),
        ];
        let field_value = prop_oneof![
            json_value(),
            Just("\"bot-1\"".to_owned()),
            Just(r#""b\u00e9""#.to_owned()),
        ];
        prop::collection::vec((key, field_value), 0..6).prop_map(|members| {
            let members: Vec<String> = members.iter().map(|(k, v)| format!("{k}:{v}")).collect();
            format!("{{{}}}", members.join(","))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any payload: what the one pass takes, serde reads the same; and a payload serde
        /// reads, that is storable and has nothing the one pass leaves aside, the one pass takes.
        #[test]
        fn agrees_with_the_serde_reading(payload in payload()) {
            let fields = check(&payload);
            if let Ok((_, true)) = reference(&payload) {
                // Escapes are left to serde in keys and the string fields; the property
                // below covers escapes in content.
                let unusual = payload.contains('\\');
                let keys = ["sender", "kind", "content", "metadata", "idempotency_key"];
                let repeated = keys
                    .iter()
                    .any(|k| payload.matches(&format!("\"{k}\":")).count() > 1);
                if !unusual && !repeated {
                    prop_assert!(fields.is_some(), "{} was not taken", payload);
                }
            }
        }

        /// Any JSON value as content: taken exactly when it is storable.
        #[test]
        fn content_is_taken_when_storable(value in json_value()) {
            let payload = format!(r#"{{"content":{value}}}"#);
            let fields = check(&payload);
            let storable = check_storable_json(&value).is_ok()
                && serde_json::from_str::<serde::de::IgnoredAny>(&value).is_ok();
            // Lone surrogates in keys or strings are refused by both; `\u0000` too.
            prop_assert_eq!(fields.is_some(), storable, "{}", payload);
        }

        /// Any text at all, and any payload with a byte changed: never a field serde would not
        /// read (the check inside `check` panics on one).
        #[test]
        fn damaged_payloads_are_never_misread(
            payload in payload(),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut bytes = payload.clone().into_bytes();
            let i = at.index(bytes.len().max(1)).min(bytes.len().saturating_sub(1));
            if !bytes.is_empty() {
                bytes[i] = byte;
            }
            if let Ok(text) = String::from_utf8(bytes) {
                check(&text);
            }
            let mut cut = payload;
            let i = i.min(cut.len());
            if cut.is_char_boundary(i) {
                cut.truncate(i);
                check(&cut);
            }
        }
    }
}
