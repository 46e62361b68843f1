//! A `send`'s payload read in one pass (`ferry_codec::send::parse_send`): it never panics on any
//! text, and whatever it takes, the serde reading (`AppendBody`, whose errors clients see)
//! reads the same fields from the same text, and both `content` and `metadata` pass the
//! storable check. A frame around the payload takes the same reading in `phoenix::decode`.

#![no_main]

use ferry_codec::phoenix::{self, Decoded};
use ferry_codec::send::{parse_send, AppendBody};
use ferry_codec::storable::check_storable_json;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let fields = parse_send(text);
    let frame = format!(r#"["1","2","conversation:c","send",{text}]"#);
    if let Decoded::Frame(frame) = phoenix::decode(&frame) {
        assert_eq!(
            frame.send,
            parse_send(frame.payload),
            "the frame read the payload apart"
        );
    }
    let Some(fields) = fields else {
        return;
    };
    let body: AppendBody = match serde_json::from_str(text) {
        Ok(body) => body,
        Err(e) => panic!("one pass took {text:?}; serde says {e}"),
    };
    assert_eq!(body.sender.as_deref(), fields.sender);
    assert_eq!(body.kind.as_deref(), fields.kind);
    assert_eq!(body.content.as_ref().map(|v| v.get()), fields.content);
    assert_eq!(body.metadata.as_ref().map(|v| v.get()), fields.metadata);
    assert_eq!(body.idempotency_key.as_deref(), fields.idempotency_key);
    for value in [fields.content, fields.metadata].into_iter().flatten() {
        assert_eq!(check_storable_json(value), Ok(()), "{value}");
    }
    let owned = fields.to_body().expect("the fields are JSON");
    assert_eq!(format!("{owned:?}"), format!("{body:?}"));
});
