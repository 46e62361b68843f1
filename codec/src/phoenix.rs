//! Phoenix Channels V2 JSON framing: every frame is a JSON array
//! `[join_ref, ref, topic, event, payload]`.
//!
//! Decoding sorts a text frame into one of four outcomes so the session can answer each the way
//! the protocol says: a well-formed [`Frame`]; a frame that is wrong but whose `ref` can be read
//! (answered with an error reply, the socket stays open); a frame whose `ref` cannot be read
//! (logged and ignored: there is nobody to answer); and valid JSON that is not an array at all
//! (a protocol violation that closes the socket). Encoding never fails: everything written is a
//! `serde_json::Value`, a `RawValue` or a type whose `Serialize` cannot fail.
//!
//! Refs are kept as the JSON values the client sent (strings from the phoenix clients, numbers
//! from some hand-written ones) and echoed back unchanged.
//!
//! Error replies, which carry the node's error codes, are built in the node's `ws::frame`.

use std::borrow::Cow;

use ferry_shards::record::push_json_str;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::send::{parse_send, Scan, SendFields, SEND};

/// The socket-level topic (heartbeats).
pub const PHOENIX_TOPIC: &str = "phoenix";
pub const HEARTBEAT: &str = "heartbeat";
pub const JOIN: &str = "phx_join";
pub const LEAVE: &str = "phx_leave";
pub const REPLY: &str = "phx_reply";
pub const CLOSE: &str = "phx_close";
pub const ERROR: &str = "phx_error";

/// A decoded client frame, borrowing from the frame's text where it can.
#[derive(Debug)]
pub struct Frame<'a> {
    /// Identifies the join this frame belongs to (`null` for heartbeats); echoed in replies.
    pub join_ref: Value,
    /// Identifies the request; echoed in its reply. `null` means nobody waits for a reply.
    pub ref_: Value,
    pub topic: Cow<'a, str>,
    pub event: Cow<'a, str>,
    /// The payload's JSON text, as sent: message `content` reaches the log byte for byte.
    pub payload: &'a str,
    /// A `send`'s fields, when [`parse_send`] took its payload; `None` for any other event, and
    /// for a `send` whose payload is read the serde way ([`AppendBody`]).
    ///
    /// [`AppendBody`]: crate::send::AppendBody
    pub send: Option<SendFields<'a>>,
}

impl<'a> Frame<'a> {
    fn new(
        join_ref: Value,
        ref_: Value,
        topic: Cow<'a, str>,
        event: Cow<'a, str>,
        payload: &'a str,
    ) -> Self {
        let send = if event == SEND {
            parse_send(payload)
        } else {
            None
        };
        Frame {
            join_ref,
            ref_,
            topic,
            event,
            payload,
            send,
        }
    }

    /// The frame's `[join_ref, ref, topic]`, for answering it.
    pub fn address(&self) -> Address {
        Address {
            join_ref: self.join_ref.clone(),
            ref_: self.ref_.clone(),
            topic: self.topic.clone().into_owned(),
        }
    }
}

/// Where a reply goes: the request's refs and topic.
#[derive(Debug, Clone)]
pub struct Address {
    pub join_ref: Value,
    pub ref_: Value,
    pub topic: String,
}

/// What a text frame turned out to be.
#[derive(Debug)]
pub enum Decoded<'a> {
    Frame(Frame<'a>),
    /// Malformed, but the ref is known: answer with an `invalid` error reply.
    Invalid {
        address: Address,
        message: String,
    },
    /// Malformed and no ref to answer: log and ignore.
    Unanswerable(String),
    /// Valid JSON that is not an array: the peer does not speak this protocol; close.
    Violation(String),
}

fn is_ref(v: &Value) -> bool {
    matches!(v, Value::Null | Value::String(_) | Value::Number(_))
}

/// Decodes a text frame. Three readings, each taking what the one before left: one pass over
/// the text ([`one_pass`]: the frames clients send, a `send`'s payload read as it goes), serde's
/// reading of the frame as a tuple (escapes, unusual refs), and [`decode_carefully`], which
/// says what is wrong. They give the same answer for every text they take (the `phoenix_frame`
/// fuzz target and the tests below check it).
pub fn decode(text: &str) -> Decoded<'_> {
    if let Some(frame) = one_pass(text) {
        return Decoded::Frame(frame);
    }
    if let Ok((join_ref, ref_, topic, event, payload)) =
        serde_json::from_str::<(Value, Value, String, String, &RawValue)>(text)
    {
        if is_ref(&join_ref) && is_ref(&ref_) {
            return Decoded::Frame(Frame::new(
                join_ref,
                ref_,
                Cow::Owned(topic),
                Cow::Owned(event),
                payload.get(),
            ));
        }
    }
    decode_carefully(text)
}

/// The frames clients send, in one pass over the text: refs that are `null`, strings without
/// escapes or numbers; a topic and an event without escapes; a payload that is valid JSON and
/// storable ([`crate::send`]'s scan). `None` for anything else, which the slower readings take.
pub fn one_pass(text: &str) -> Option<Frame<'_>> {
    let mut scan = Scan::new(text);
    scan.skip_ws();
    scan.eat(b'[')?;
    scan.skip_ws();
    let join_ref = reference(&mut scan)?;
    comma(&mut scan)?;
    let ref_ = reference(&mut scan)?;
    comma(&mut scan)?;
    let topic = scan.plain_string()?;
    comma(&mut scan)?;
    let event = scan.plain_string()?;
    comma(&mut scan)?;
    let start = scan.position();
    let send = if event == SEND {
        scan.send_payload()
    } else {
        None
    };
    if send.is_none() {
        scan.rewind(start);
        scan.value()?;
    }
    let payload = scan.since(start);
    scan.skip_ws();
    scan.eat(b']')?;
    if !scan.at_end() {
        return None;
    }
    Some(Frame {
        join_ref,
        ref_,
        topic: Cow::Borrowed(topic),
        event: Cow::Borrowed(event),
        payload,
        send,
    })
}

fn comma(scan: &mut Scan<'_>) -> Option<()> {
    scan.skip_ws();
    scan.eat(b',')?;
    scan.skip_ws();
    Some(())
}

/// A join_ref or ref: `null`, a string without escapes, or a number.
fn reference(scan: &mut Scan<'_>) -> Option<Value> {
    match scan.peek()? {
        b'n' => scan.literal("null").map(|()| Value::Null),
        b'"' => scan.plain_string().map(|s| Value::String(s.to_owned())),
        b'-' | b'0'..=b'9' => {
            let start = scan.position();
            scan.number()?;
            serde_json::from_str(scan.since(start)).ok()
        }
        _ => None,
    }
}

/// The slow path of [`decode`] on its own. [`decode`] must give the same answer for every text
/// (the `phoenix_frame` fuzz target checks it); it is public for that check.
pub fn decode_carefully(text: &str) -> Decoded<'_> {
    let items: Vec<&RawValue> = match serde_json::from_str(text) {
        Ok(items) => items,
        Err(e) => {
            return match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                Ok(_) => Decoded::Violation(
                    "a frame must be a JSON array [join_ref, ref, topic, event, payload]".into(),
                ),
                Err(_) => Decoded::Unanswerable(format!("frame is not valid JSON: {e}")),
            };
        }
    };
    let value = |i: usize| -> Option<Value> {
        items
            .get(i)
            .and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok())
    };
    let ref_ = value(1).unwrap_or(Value::Null);
    let join_ref = value(0).filter(is_ref).unwrap_or(Value::Null);
    let topic = value(2);
    let address = Address {
        join_ref: join_ref.clone(),
        ref_: ref_.clone(),
        topic: topic
            .as_ref()
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
    };
    let problem = if items.len() != 5 {
        Some(format!(
            "a frame must have 5 elements [join_ref, ref, topic, event, payload], got {}",
            items.len()
        ))
    } else if !is_ref(&ref_) || !value(0).as_ref().is_some_and(is_ref) {
        Some("join_ref and ref must be strings, numbers or null".to_owned())
    } else if !topic.as_ref().is_some_and(Value::is_string) {
        Some("topic must be a string".to_owned())
    } else if !value(3).as_ref().is_some_and(Value::is_string) {
        Some("event must be a string".to_owned())
    } else {
        None
    };
    if let Some(message) = problem {
        // A reply needs a ref to be matched by the client; without one nobody is waiting.
        return match ref_ {
            Value::String(_) | Value::Number(_) => Decoded::Invalid { address, message },
            _ => Decoded::Unanswerable(message),
        };
    }
    let event = match value(3) {
        Some(Value::String(s)) => s,
        _ => unreachable!("event checked above"),
    };
    let payload = items[4].get();
    Decoded::Frame(Frame::new(
        join_ref,
        ref_,
        Cow::Owned(address.topic),
        Cow::Owned(event),
        payload,
    ))
}

/// `[join_ref, ref, topic, event, payload]` as text.
pub fn encode(
    join_ref: &Value,
    ref_: &Value,
    topic: &str,
    event: &str,
    payload: &impl Serialize,
) -> String {
    // Serializing JSON values, raw JSON and messages cannot fail (no maps with non-string keys).
    serde_json::to_string(&(join_ref, ref_, topic, event, payload)).expect("frame serializes")
}

/// `phx_reply` `{status: "ok", response}`.
pub fn reply_ok(to: &Address, response: &impl Serialize) -> String {
    #[derive(Serialize)]
    struct Reply<'a, T> {
        status: &'static str,
        response: &'a T,
    }
    let payload = Reply {
        status: "ok",
        response,
    };
    encode(&to.join_ref, &to.ref_, &to.topic, REPLY, &payload)
}

/// `phx_reply` `{status: "ok", response}` around a response already rendered as JSON text: the
/// same frame as [`reply_ok`] without a serializer (a `send`'s reply, one per message).
pub fn reply_ok_json(to: &Address, response_json: &str) -> String {
    let mut out = String::with_capacity(64 + to.topic.len() + response_json.len());
    out.push('[');
    push_ref(&mut out, &to.join_ref);
    out.push(',');
    push_ref(&mut out, &to.ref_);
    out.push(',');
    push_json_str(&mut out, &to.topic);
    out.push_str(",\"phx_reply\",{\"status\":\"ok\",\"response\":");
    out.push_str(response_json);
    out.push_str("}]");
    out
}

/// A join_ref or ref as JSON: nearly always a string.
fn push_ref(out: &mut String, value: &Value) {
    match value {
        Value::String(s) => push_json_str(out, s),
        Value::Null => out.push_str("null"),
        other => out.push_str(&other.to_string()),
    }
}

/// A server push on a joined topic: `[join_ref, null, topic, event, payload]`. Carrying the
/// join_ref lets the client drop pushes of an earlier join of the same topic.
pub fn push(join_ref: &Value, topic: &str, event: &str, payload: &impl Serialize) -> String {
    encode(join_ref, &Value::Null, topic, event, payload)
}

/// The part of a push frame before its payload (`[join_ref,null,topic,event,`), for a sender
/// that pushes many payloads on one topic and renders this once.
pub fn push_head(join_ref: &Value, topic: &str, event: &str) -> String {
    let mut head = encode_head(join_ref, topic, event);
    // `head` is a 4-element JSON array; reopen it for the fifth.
    head.pop();
    head.push(',');
    head
}

/// A push from its [`push_head`] and its payload's JSON text, given in pieces written one after
/// the other (a message's cached rendering around its content): the same frame as [`push`]
/// without serializing the payload again.
pub fn push_with_head(head: &str, payload_json: &[&str]) -> String {
    let len = payload_json.iter().map(|p| p.len()).sum::<usize>();
    let mut out = String::with_capacity(head.len() + len + 1);
    out.push_str(head);
    for part in payload_json {
        out.push_str(part);
    }
    out.push(']');
    out
}

fn encode_head(join_ref: &Value, topic: &str, event: &str) -> String {
    serde_json::to_string(&(join_ref, Value::Null, topic, event)).expect("frame head serializes")
}

/// `phx_close` / `phx_error` for a join, as Phoenix sends them: both refs are the join_ref.
pub fn lifecycle(join_ref: &Value, topic: &str, event: &str) -> String {
    encode(join_ref, join_ref, topic, event, &json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prerendered_reply_is_the_serialized_one() {
        let response = r#"{"seq":7,"id":"x","deduped":false}"#;
        let raw = RawValue::from_string(response.to_owned()).unwrap();
        for (join_ref, ref_, topic) in [
            (json!("1"), json!("2"), "conversation:c-1"),
            (json!(null), json!(12), "conversation:\"q\"\\\u{1}"),
            (json!({"a": [1]}), json!("r\n"), "t"),
        ] {
            let to = Address {
                join_ref,
                ref_,
                topic: topic.to_owned(),
            };
            assert_eq!(reply_ok_json(&to, response), reply_ok(&to, &raw));
        }
    }

    #[test]
    fn the_one_pass_decoder_agrees_with_the_careful_one() {
        for text in [
            r#"["1","2","conversation:c","send",{"content":{"text":"hi"}}]"#,
            r#"[null,"7","phoenix","heartbeat",{}]"#,
            r#"[1,2,"t","e",null]"#,
            r#"["1","2","t","e",[1,2,{"a":"]"}]]"#,
            r#"["1","2","t","e",{},"extra"]"#,
            r#"["1","2","t","e"]"#,
            r#"[{"x":1},"2","t","e",{}]"#,
            r#"["1",true,"t","e",{}]"#,
            r#"["1","2",3,"e",{}]"#,
            r#"["1","2","t",4,{}]"#,
            r#"{"topic":"t"}"#,
            r#"["1","2","t","e",{}"#,
            r#"  ["1" , "2" , "t" , "e" , { } ]  "#,
        ] {
            assert_eq!(
                format!("{:?}", decode(text)),
                format!("{:?}", decode_carefully(text)),
                "{text}"
            );
        }
    }

    #[test]
    fn the_frames_clients_send_take_one_pass() {
        for text in [
            r#"["1","2","conversation:c","send",{"content":{"text":"hi"},"kind":"text"}]"#,
            r#"[null,"7","phoenix","heartbeat",{}]"#,
            r#"["3","3","conversation:c","phx_join",{"after_seq":12}]"#,
            r#"[1,-2.5,"t","typing",null]"#,
            r#" [ "1" , "2" , "t" , "e" , { } ] "#,
        ] {
            let Some(fast) = one_pass(text) else {
                panic!("{text} did not take one pass");
            };
            assert_eq!(
                format!("{:?}", Decoded::Frame(fast)),
                format!("{:?}", decode_carefully(text)),
                "{text}"
            );
        }
        // Escapes, unusual refs, storable trouble: left to the slower readings, which agree.
        for text in [
            r#"["1","2","conversation:\u0063","send",{"content":1}]"#,
            r#"["1\n","2","t","e",{}]"#,
            r#"["1","2","t","send",{"content":"\u0000"}]"#,
            r#"["1","2","t","e",1e131072]"#,
            r#"["1","2","t","e",{}]x"#,
            r#"["1","2","t","e",{},]"#,
        ] {
            assert!(one_pass(text).is_none(), "{text}");
            assert_eq!(
                format!("{:?}", decode(text)),
                format!("{:?}", decode_carefully(text)),
                "{text}"
            );
        }
    }

    #[test]
    fn a_send_the_one_pass_does_not_read_is_still_a_frame() {
        // A repeated field: valid JSON, refused by serde's reading of the payload, which is the
        // one that must answer it.
        let text = r#"["1","2","t","send",{"content":1,"content":2}]"#;
        let frame = one_pass(text).expect("a frame");
        assert_eq!(frame.payload, r#"{"content":1,"content":2}"#);
        assert_eq!(frame.send, None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]

        /// Frames of every shape, and the same with a byte changed: every reading agrees with
        /// the careful one.
        #[test]
        fn every_reading_agrees_with_the_careful_one(
            join_ref in reference(),
            ref_ in reference(),
            topic in proptest::prop_oneof![
                proptest::prelude::Just("conversation:c-1"),
                proptest::prelude::Just("phoenix"),
                proptest::prelude::Just(r"conversation:\u0063"),
            ],
            event in proptest::prop_oneof![
                proptest::prelude::Just("send"),
                proptest::prelude::Just("typing"),
                proptest::prelude::Just("phx_join"),
            ],
            payload in crate::send::tests::payload(),
            at in proptest::prelude::any::<proptest::sample::Index>(),
            byte in proptest::prelude::any::<u8>(),
        ) {
            let text = format!(r#"[{join_ref}, {ref_},"{topic}","{event}",{payload}]"#);
            let careful = format!("{:?}", decode_carefully(&text));
            proptest::prop_assert_eq!(format!("{:?}", decode(&text)), careful);
            if let Decoded::Frame(frame) = decode(&text) {
                // What the one pass took of a send is what parse_send takes of its payload.
                if frame.event == SEND {
                    proptest::prop_assert_eq!(frame.send, parse_send(frame.payload));
                }
            }
            let mut bytes = text.into_bytes();
            let i = at.index(bytes.len());
            bytes[i] = byte;
            if let Ok(damaged) = String::from_utf8(bytes) {
                proptest::prop_assert_eq!(
                    format!("{:?}", decode(&damaged)),
                    format!("{:?}", decode_carefully(&damaged))
                );
            }
        }
    }

    fn reference() -> impl proptest::strategy::Strategy<Value = &'static str> {
        proptest::prop_oneof![
            proptest::prelude::Just("null"),
            proptest::prelude::Just(r#""12""#),
            proptest::prelude::Just(r#""a\"b""#),
            proptest::prelude::Just("7"),
            proptest::prelude::Just("-0.5e3"),
            proptest::prelude::Just("true"),
            proptest::prelude::Just("{}"),
        ]
    }

    fn frame(text: &str) -> Frame<'_> {
        match decode(text) {
            Decoded::Frame(f) => f,
            other => panic!("expected a frame from {text}, got {other:?}"),
        }
    }

    #[test]
    fn decodes_what_the_phoenix_client_sends() {
        let f = frame(r#"["3","4","conversation:c1","send",{"content":{"a": 1.50}}]"#);
        assert_eq!(f.join_ref, json!("3"));
        assert_eq!(f.ref_, json!("4"));
        assert_eq!(f.topic, "conversation:c1");
        assert_eq!(f.event, "send");
        // Raw payload: number formatting and spacing survive.
        assert_eq!(f.payload, r#"{"content":{"a": 1.50}}"#);
        assert_eq!(f.send.and_then(|s| s.content), Some(r#"{"a": 1.50}"#));

        let hb = frame(r#"[null,"5","phoenix","heartbeat",{}]"#);
        assert_eq!(hb.join_ref, Value::Null);
        assert_eq!(hb.topic, PHOENIX_TOPIC);
        assert_eq!(hb.event, HEARTBEAT);

        let numeric = frame(r#"[1,2,"phoenix","heartbeat",{}]"#);
        assert_eq!(numeric.ref_, json!(2));
    }

    #[test]
    fn sorts_bad_frames_by_whether_they_can_be_answered() {
        match decode(r#"[null,"7","phoenix","heartbeat"]"#) {
            Decoded::Invalid { address, message } => {
                assert_eq!(address.ref_, json!("7"));
                assert_eq!(address.topic, "phoenix");
                assert!(message.contains("5 elements"), "{message}");
            }
            other => panic!("wrong arity with a ref must be answerable: {other:?}"),
        }
        match decode(r#"["1","8","t",42,{}]"#) {
            Decoded::Invalid { address, message } => {
                assert_eq!(address.join_ref, json!("1"));
                assert!(message.contains("event"), "{message}");
            }
            other => panic!("non-string event: {other:?}"),
        }
        match decode(r#"["1","8",{},"x",{}]"#) {
            Decoded::Invalid { address, .. } => assert_eq!(address.topic, ""),
            other => panic!("non-string topic: {other:?}"),
        }
        match decode(r#"[{},"9","t","x",{}]"#) {
            Decoded::Invalid { message, .. } => assert!(message.contains("join_ref")),
            other => panic!("object join_ref: {other:?}"),
        }
        assert!(matches!(
            decode(r#"[null,null,"t"]"#),
            Decoded::Unanswerable(_)
        ));
        assert!(matches!(decode("[1,2,"), Decoded::Unanswerable(_)));
        assert!(matches!(decode("not json"), Decoded::Unanswerable(_)));
        assert!(matches!(decode(r#"{"topic":"t"}"#), Decoded::Violation(_)));
        assert!(matches!(decode("42"), Decoded::Violation(_)));
    }

    #[test]
    fn encodes_replies_and_pushes_like_phoenix() {
        let to = Address {
            join_ref: json!("1"),
            ref_: json!("2"),
            topic: "conversation:c".into(),
        };
        assert_eq!(
            reply_ok(&to, &json!({})),
            r#"["1","2","conversation:c","phx_reply",{"status":"ok","response":{}}]"#
        );
        let payload = json!({"seq": 3, "content": {"text": "a \"quoted\" ]"}});
        let text = payload.to_string();
        let (a, rest) = text.split_at(8);
        let (b, c) = rest.split_at(10);
        for join_ref in [json!("1"), json!(null), json!("j\"2")] {
            let head = push_head(&join_ref, "conversation:c\"", "message");
            let expected = push(&join_ref, "conversation:c\"", "message", &payload);
            assert_eq!(push_with_head(&head, &[&text]), expected);
            assert_eq!(push_with_head(&head, &[a, b, c]), expected);
        }
        assert_eq!(
            push(&json!("1"), "t", "typing", &json!({"participant": "p"})),
            r#"["1",null,"t","typing",{"participant":"p"}]"#
        );
        assert_eq!(
            lifecycle(&json!("4"), "t", CLOSE),
            r#"["4","4","t","phx_close",{}]"#
        );
    }
}
