//! Phoenix Channels V2 JSON framing. The frames themselves (decoding, pushes, replies) live in
//! [`ferry_codec::phoenix`], which the fuzz targets build without the node; this module adds the
//! error replies, which carry the node's error codes ([`ApiError`]).

use serde_json::{json, Value};

pub use ferry_codec::phoenix::*;

use crate::http::error::ApiError;

/// `phx_reply` `{status: "error", response: {reason: CODE, message, ...}}`.
pub fn reply_error(to: &Address, error: &ApiError) -> String {
    let payload = json!({ "status": "error", "response": error_response(error) });
    encode(&to.join_ref, &to.ref_, &to.topic, REPLY, &payload)
}

/// The HTTP error body with `error` renamed `reason`, as Phoenix clients expect.
pub fn error_response(error: &ApiError) -> Value {
    let mut body = error.body();
    if let Value::Object(map) = &mut body {
        if let Some(code) = map.remove("error") {
            map.insert("reason".to_owned(), code);
        }
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_replies_carry_the_code_as_reason() {
        let to = Address {
            join_ref: json!("1"),
            ref_: json!("2"),
            topic: "conversation:c".into(),
        };
        let mut err = ApiError::try_again(ferry_shards::node::TryAgainReason::WalFull, 20);
        err.message = "busy".into();
        let v: Value = serde_json::from_str(&reply_error(&to, &err)).unwrap();
        assert_eq!(
            (&v[0], &v[1], &v[2], &v[3]),
            (
                &json!("1"),
                &json!("2"),
                &json!("conversation:c"),
                &json!(REPLY)
            )
        );
        assert_eq!(v[4]["status"], "error");
        assert_eq!(v[4]["response"]["reason"], "try_again");
        assert_eq!(v[4]["response"]["retry_after_ms"], 20);
        assert_eq!(v[4]["response"]["message"], "busy");
        assert!(v[4]["response"].get("error").is_none());
    }
}
