//! Envelope decoding: `avsync_shared::Envelope::decode` and the ingress's content stage
//! (`avsync_ingress::http::decode_content`, `check_json`) on arbitrary bytes.
//!
//! Properties:
//! - nothing panics;
//! - `check_json` accepts exactly what `serde_json` reads into a `Value` (the worker's parser);
//! - what the content stage accepts, the envelope decodes, its tenant id is valid, its id fits
//!   an AMQP message id, and its fields are the body's own string fields.

#![no_main]

use avsync_ingress::http::{check_json, decode_content, MAX_EVENT_ID_BYTES};
use avsync_shared::{Envelope, TenantId};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|body: &[u8]| {
    let decoded = Envelope::decode(body);
    let value = serde_json::from_slice::<Value>(body);
    assert_eq!(
        check_json(body).is_ok(),
        value.is_ok(),
        "check_json and serde_json disagree: {value:?}"
    );
    if let Ok(envelope) = &decoded {
        assert_eq!(
            TenantId::parse(envelope.tenant_id.as_str()).as_ref(),
            Ok(&envelope.tenant_id)
        );
        assert!(envelope.application_id.as_deref() != Some(""));
    }
    let Ok(accepted) = decode_content(body) else {
        return;
    };
    assert_eq!(decoded.as_ref().ok(), Some(&accepted));
    assert!(accepted.id.len() <= MAX_EVENT_ID_BYTES);
    let value = value.expect("accepted content is a JSON value");
    let object = value.as_object().expect("accepted content is an object");
    let field = |name: &str| object.get(name).and_then(Value::as_str);
    assert_eq!(field("id"), Some(accepted.id.as_str()));
    assert_eq!(field("type"), Some(accepted.event_type.as_str()));
    assert_eq!(field("timestamp"), Some(accepted.timestamp.as_str()));
    assert_eq!(field("tenant_id"), Some(accepted.tenant_id.as_str()));
});
