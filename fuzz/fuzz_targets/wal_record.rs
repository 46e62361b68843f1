//! WAL record payloads (`ferry_shards::record`): decoding any kind byte and any payload never
//! panics; a payload that decodes re-encodes to the same bytes (up to whitespace around the JSON
//! fields) and then to itself; and the decoded message renders as JSON, its id and time as the
//! archive stores them.

#![no_main]

use ferry_shards::record::{Message, Record, KIND_MESSAGE, KIND_MESSAGE_V1};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, payload)) = data.split_first() else {
        return;
    };
    // Mostly the two real kinds; now and then any byte, which must be refused cleanly.
    let kind = match selector % 4 {
        0 | 1 => KIND_MESSAGE,
        2 => KIND_MESSAGE_V1,
        _ => selector / 4,
    };
    let Ok(Record::Message(message)) = Record::decode(kind, payload) else {
        return;
    };
    // Re-encoding gives the payload back, except that whitespace around `content` and
    // `metadata` is dropped (a `RawValue` does not keep it; the node never writes any): the
    // re-encoded payload is then a fixed point.
    let canonical = message.encode_as(kind);
    assert_eq!(message.encoded_len(kind), canonical.len());
    assert!(canonical.len() <= payload.len());
    if canonical != payload {
        let again = Message::decode_as(kind, &canonical).expect("the canonical payload decodes");
        assert_eq!(again.encode_as(kind), canonical);
    }
    if kind == KIND_MESSAGE {
        assert_eq!(message.encode(), canonical);
    } else {
        assert_eq!(message.epoch, 0);
    }
    // Rendering: the timestamp formatter and the JSON of a message must not panic either.
    let json = message.to_json();
    assert!(json.starts_with('{') && json.ends_with('}'));
    assert_eq!(json.len(), message.json_len());
    // What the archive borrows from the rendering is what it would otherwise format.
    let (id, time) = message.rendered_id_and_time().expect("rendered");
    assert_eq!(id, message.id.to_string());
    assert_eq!(time, message.created_at());
    let _ = message.approx_bytes();
});
