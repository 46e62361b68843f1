//! Phoenix Channels frames (`ferry_codec::phoenix`): decoding any text never panics; the
//! one-pass decoder gives the same answer as the careful one on every text; and a frame that
//! decodes, encoded again, decodes to the same frame.

#![no_main]

use ferry_codec::phoenix::{self, Decoded, Frame};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let decoded = phoenix::decode(text);
    assert_eq!(
        format!("{decoded:?}"),
        format!("{:?}", phoenix::decode_carefully(text)),
        "the two decoders disagree"
    );
    let Decoded::Frame(frame) = decoded else {
        return;
    };
    let payload = RawValue::from_string(frame.payload.to_owned()).expect("the payload is JSON");
    let encoded = phoenix::encode(
        &frame.join_ref,
        &frame.ref_,
        &frame.topic,
        &frame.event,
        &payload,
    );
    let Decoded::Frame(again) = phoenix::decode(&encoded) else {
        panic!("{encoded} does not decode as a frame");
    };
    assert_same(&frame, &again);
    // A push on the frame's topic is a frame too, with a null ref.
    let head = phoenix::push_head(&frame.join_ref, &frame.topic, &frame.event);
    let push_text = phoenix::push_with_head(&head, &[frame.payload]);
    let Decoded::Frame(push) = phoenix::decode(&push_text) else {
        panic!("a push does not decode as a frame");
    };
    assert_eq!(push.ref_, Value::Null);
    assert_eq!(push.payload, frame.payload);
});

fn assert_same(a: &Frame, b: &Frame) {
    assert!(
        same_ref(&a.join_ref, &b.join_ref),
        "{:?} {:?}",
        a.join_ref,
        b.join_ref
    );
    assert!(same_ref(&a.ref_, &b.ref_), "{:?} {:?}", a.ref_, b.ref_);
    assert_eq!(a.topic, b.topic);
    assert_eq!(a.event, b.event);
    // The payload is echoed as raw text: byte for byte.
    assert_eq!(a.payload, b.payload);
    assert_eq!(a.send, b.send);
}

/// Refs round-trip exactly, except that serde_json (without `float_roundtrip`) may read a float
/// back one unit in the last place off.
fn same_ref(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) if a.is_f64() || b.is_f64() => {
            x == y || (x - y).abs() <= f64::EPSILON * x.abs().max(y.abs())
        }
        _ => a == b,
    }
}
