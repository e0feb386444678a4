//! The public listener: `POST /webhooks/authvital`, and the one error type that turns every
//! refusal into its status and JSON body.
//!
//! Checks run in the contract's order: body size (413), signature (401), content (400),
//! publish (202 or 503). Nothing that fails a check is published.
//!
//! Beyond the contract's list, hostile input is refused in the same stages: a body that takes
//! longer than [`BODY_READ_TIMEOUT`] to arrive is 408; a signature header sent twice is 401
//! (two values would let the order of headers decide which one is checked); content must be
//! JSON that the worker's parser reads back (UTF-8, at most 128 levels deep, numbers within
//! range, no lone surrogates), and the event id must fit an AMQP `message_id`.

use crate::metrics::{Metrics, Outcome};
use crate::publish::{PublishError, Publisher};
use crate::verify::{
    SignatureFailure, Verifier, AUTHVITAL_KEY_ID, AUTHVITAL_SIGNATURE, AUTHVITAL_TIMESTAMP,
    WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP,
};
use avsync_shared::{Envelope, EnvelopeError};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

pub const WEBHOOK_PATH: &str = "/webhooks/authvital";
/// What a 503 asks the sender to wait before retrying, in seconds.
pub const RETRY_AFTER_SECS: u32 = 5;
/// Longest time from the request's headers to the last byte of its body. Not a setting (the
/// contract fixes the settings): AuthVital sends at most `AVSYNC_MAX_BODY_BYTES` (256 KiB by
/// default) at once, so 10 s only ever cuts off a stalled or deliberately slow sender, which
/// would otherwise hold a connection and its buffer for as long as it likes.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// An AMQP `message_id` is a short string: at most 255 bytes.
pub const MAX_EVENT_ID_BYTES: usize = 255;

/// The headers a signature is read from; each may appear at most once.
const SIGNATURE_HEADERS: [&str; 6] = [
    AUTHVITAL_TIMESTAMP,
    AUTHVITAL_SIGNATURE,
    AUTHVITAL_KEY_ID,
    WEBHOOK_ID,
    WEBHOOK_TIMESTAMP,
    WEBHOOK_SIGNATURE,
];

pub struct AppState {
    /// One permit per request past its headers (`AVSYNC_MAX_CONCURRENT_REQUESTS`): the bound on
    /// bodies in memory, now that connections are many.
    pub requests: Arc<Semaphore>,
    pub verifier: Verifier,
    pub publisher: Publisher,
    pub metrics: Metrics,
    pub max_body_bytes: usize,
    /// [`BODY_READ_TIMEOUT`] in production; tests shorten it.
    pub body_read_timeout: Duration,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(WEBHOOK_PATH, post(receive))
        .method_not_allowed_fallback(|| async { IngressError::MethodNotAllowed })
        .fallback(|| async { IngressError::NotFound })
        .with_state(Arc::new(state))
}

/// Every answer other than 202.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("body is larger than {limit} bytes (AVSYNC_MAX_BODY_BYTES)")]
    PayloadTooLarge { limit: usize },
    #[error("the request body could not be read: {0}")]
    UnreadableBody(String),
    #[error("the request body did not arrive within {limit:?}; send the whole body at once")]
    BodyTimeout { limit: Duration },
    #[error("header {0} appears more than once; send each signature header exactly once")]
    DuplicateSignatureHeader(&'static str),
    #[error(transparent)]
    Signature(#[from] SignatureFailure),
    #[error(transparent)]
    Content(#[from] EnvelopeError),
    #[error(
        "`id` is {len} bytes long; an event id must be at most 255 bytes (an AMQP message id)"
    )]
    EventIdTooLong { len: usize },
    #[error("the event was not queued ({0}); retry later")]
    Unavailable(#[from] PublishError),
    #[error(
        "as many requests as AVSYNC_MAX_CONCURRENT_REQUESTS allows are being handled; retry later"
    )]
    TooManyRequests,
    #[error("no such route: webhooks go to POST /webhooks/authvital")]
    NotFound,
    #[error("method not allowed: webhooks go to POST /webhooks/authvital")]
    MethodNotAllowed,
}

impl IngressError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnreadableBody(_) | Self::Content(_) | Self::EventIdTooLong { .. } => {
                StatusCode::BAD_REQUEST
            }
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::Signature(_) | Self::DuplicateSignatureHeader(_) => StatusCode::UNAUTHORIZED,
            Self::Unavailable(_) | Self::TooManyRequests => StatusCode::SERVICE_UNAVAILABLE,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::UnreadableBody(_) => "unreadable_body",
            Self::BodyTimeout { .. } => "body_timeout",
            Self::DuplicateSignatureHeader(_) => "duplicate_signature_header",
            Self::Signature(failure) => failure.code(),
            Self::Content(EnvelopeError::NotJson(_)) => "invalid_json",
            Self::Content(EnvelopeError::NotObject) => "not_an_object",
            Self::Content(EnvelopeError::MissingField(_)) => "missing_field",
            Self::Content(EnvelopeError::InvalidTenantId(_)) => "invalid_tenant_id",
            Self::EventIdTooLong { .. } => "invalid_event_id",
            Self::Unavailable(e) => e.code(),
            Self::TooManyRequests => "overloaded",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
        }
    }

    /// The `reason` label of `avsync_ingress_signature_failures_total`, for 401s.
    fn signature_failure(&self) -> Option<SignatureFailure> {
        match self {
            Self::Signature(failure) => Some(*failure),
            Self::DuplicateSignatureHeader(_) => Some(SignatureFailure::Malformed),
            _ => None,
        }
    }

    /// True when the body may still be arriving: the connection cannot carry another request.
    fn body_unread(&self) -> bool {
        matches!(
            self,
            Self::PayloadTooLarge { .. }
                | Self::BodyTimeout { .. }
                | Self::UnreadableBody(_)
                | Self::TooManyRequests
        )
    }

    /// The `outcome` label, for the answers to webhook requests.
    fn outcome(&self) -> Option<Outcome> {
        match self {
            Self::PayloadTooLarge { .. } => Some(Outcome::PayloadTooLarge),
            Self::UnreadableBody(_)
            | Self::BodyTimeout { .. }
            | Self::Content(_)
            | Self::EventIdTooLong { .. } => Some(Outcome::BadRequest),
            Self::Signature(_) | Self::DuplicateSignatureHeader(_) => Some(Outcome::Unauthorized),
            Self::Unavailable(_) | Self::TooManyRequests => Some(Outcome::Unavailable),
            Self::NotFound | Self::MethodNotAllowed => None,
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: String,
}

impl IntoResponse for IngressError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code(),
            message: self.to_string(),
        };
        let mut response = (self.status(), Json(body)).into_response();
        if matches!(self, Self::Unavailable(_) | Self::TooManyRequests) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        if self.body_unread() {
            // Otherwise hyper would go on reading the refused body to find the next request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

#[derive(Debug, Serialize)]
pub struct Queued {
    pub id: String,
    pub status: &'static str,
}

async fn receive(State(app): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    match accept(&app, &headers, body).await {
        Ok(queued) => {
            app.metrics.request(Outcome::Accepted);
            (StatusCode::ACCEPTED, Json(queued)).into_response()
        }
        Err(e) => {
            if let Some(outcome) = e.outcome() {
                app.metrics.request(outcome);
            }
            if let Some(failure) = e.signature_failure() {
                app.metrics.signature_failure(failure);
            }
            e.into_response()
        }
    }
}

async fn accept(app: &AppState, headers: &HeaderMap, body: Body) -> Result<Queued, IngressError> {
    // Held until the answer: the body is in memory until then.
    let _permit = app
        .requests
        .try_acquire()
        .map_err(|_| IngressError::TooManyRequests)?;
    let body = tokio::time::timeout(
        app.body_read_timeout,
        read_limited(headers, body, app.max_body_bytes),
    )
    .await
    .map_err(|_| IngressError::BodyTimeout {
        limit: app.body_read_timeout,
    })??;
    single_signature_headers(headers).inspect_err(|e| {
        tracing::info!(error = %e, "webhook refused: signature");
    })?;
    let verified = app
        .verifier
        .verify(headers, &body)
        .await
        .inspect_err(|failure| {
            tracing::info!(reason = failure.reason(), "webhook refused: signature");
        })?;
    let envelope = decode_content(&body).inspect_err(|e| {
        tracing::info!(error = %e, "webhook refused: content");
    })?;
    let tenant = envelope.tenant_id.as_str();
    app.publisher
        .publish(&envelope, &body)
        .await
        .inspect_err(|e| {
            tracing::warn!(
                event_id = %envelope.id,
                tenant,
                "type" = %envelope.event_type,
                error = %e,
                cause = e.cause().as_deref(),
                "webhook not queued; answering 503"
            );
        })?;
    tracing::info!(
        event_id = %envelope.id,
        tenant,
        "type" = %envelope.event_type,
        scheme = verified.scheme.as_str(),
        key_id = verified.key_id.as_deref().unwrap_or(""),
        "webhook queued"
    );
    Ok(Queued {
        id: envelope.id,
        status: "queued",
    })
}

/// Refuses a request that repeats a signature header.
pub fn single_signature_headers(headers: &HeaderMap) -> Result<(), IngressError> {
    match SIGNATURE_HEADERS
        .iter()
        .find(|name| headers.get_all(**name).iter().nth(1).is_some())
    {
        Some(name) => Err(IngressError::DuplicateSignatureHeader(name)),
        None => Ok(()),
    }
}

/// The envelope of a verified body, once the whole body is known to be JSON the worker can read
/// and its id fits the message id.
pub fn decode_content(body: &[u8]) -> Result<Envelope, IngressError> {
    let envelope = Envelope::decode(body)?;
    check_json(body)?;
    if envelope.id.len() > MAX_EVENT_ID_BYTES {
        return Err(IngressError::EventIdTooLong {
            len: envelope.id.len(),
        });
    }
    Ok(envelope)
}

/// Accepts exactly what `serde_json` can read into a `Value`, without building one.
/// [`Envelope::decode`] skips `data` unchecked (invalid UTF-8, unlimited nesting, lone
/// surrogates and numbers out of range pass there), so without this a body the worker cannot
/// read would be queued and end in the dead-letter queue instead of being refused to the sender.
pub fn check_json(body: &[u8]) -> Result<(), EnvelopeError> {
    serde_json::from_slice::<WellFormed>(body)
        .map(|_| ())
        .map_err(|e| EnvelopeError::NotJson(e.to_string()))
}

/// Any JSON value, read through `deserialize_any` so that serde_json checks every string,
/// number and nesting level, as it does when it builds a `Value`.
struct WellFormed;

impl<'de> Deserialize<'de> for WellFormed {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(WellFormedVisitor)
    }
}

struct WellFormedVisitor;

impl<'de> Visitor<'de> for WellFormedVisitor {
    type Value = WellFormed;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<WellFormed, E> {
        Ok(WellFormed)
    }

    fn visit_i64<E>(self, _: i64) -> Result<WellFormed, E> {
        Ok(WellFormed)
    }

    fn visit_u64<E>(self, _: u64) -> Result<WellFormed, E> {
        Ok(WellFormed)
    }

    fn visit_f64<E>(self, _: f64) -> Result<WellFormed, E> {
        Ok(WellFormed)
    }

    fn visit_str<E>(self, _: &str) -> Result<WellFormed, E> {
        Ok(WellFormed)
    }

    fn visit_unit<E>(self) -> Result<WellFormed, E> {
        Ok(WellFormed)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<WellFormed, A::Error> {
        while seq.next_element::<WellFormed>()?.is_some() {}
        Ok(WellFormed)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WellFormed, A::Error> {
        while map.next_entry::<WellFormed, WellFormed>()?.is_some() {}
        Ok(WellFormed)
    }
}

/// Refuses by Content-Length before reading, then reads at most `max` bytes, so an oversized
/// body is never held whole.
async fn read_limited(headers: &HeaderMap, body: Body, max: usize) -> Result<Bytes, IngressError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return Err(IngressError::PayloadTooLarge { limit: max });
    }
    axum::body::to_bytes(body, max).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            IngressError::PayloadTooLarge { limit: max }
        } else {
            IngressError::UnreadableBody(e.to_string())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    fn with_data(data: &[u8]) -> Vec<u8> {
        let mut body =
            br#"{"id":"e1","type":"subject.created","timestamp":"2026-08-21T01:40:03.512Z","tenant_id":"t1","data":"#
                .to_vec();
        body.extend_from_slice(data);
        body.push(b'}');
        body
    }

    fn nested(depth: usize) -> Vec<u8> {
        let mut data = vec![b'['; depth];
        data.extend(std::iter::repeat_n(b']', depth));
        data
    }

    fn reads_as_value(body: &[u8]) -> bool {
        serde_json::from_slice::<Value>(body).is_ok()
    }

    #[test]
    fn content_the_worker_cannot_read_is_invalid_json() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "invalid UTF-8 inside data",
                with_data(b"{\"sub\":\"\xff\"}"),
            ),
            ("invalid UTF-8 as a key", with_data(b"{\"\xc3\x28\":1}")),
            ("overlong UTF-8", with_data(b"\"\xc0\xaf\"")),
            ("lone surrogate", with_data(br#""\ud800""#)),
            ("number out of range", with_data(b"1e400")),
            ("100,000 levels", with_data(&nested(100_000))),
            ("128 levels with the envelope", with_data(&nested(127))),
        ];
        for (name, body) in cases {
            assert!(
                Envelope::decode(&body).is_ok(),
                "{name}: the envelope alone passes"
            );
            assert!(!reads_as_value(&body), "{name}: the worker cannot read it");
            let err = decode_content(&body).unwrap_err();
            assert_eq!(err.code(), "invalid_json", "{name}");
            assert_eq!(err.status(), StatusCode::BAD_REQUEST, "{name}");
        }
    }

    #[test]
    fn the_deepest_nesting_the_worker_reads_passes() {
        let body = with_data(&nested(126));
        assert!(reads_as_value(&body));
        assert!(decode_content(&body).is_ok());
    }

    #[test]
    fn event_ids_must_fit_a_message_id() {
        let body = |id: &str| {
            format!(r#"{{"id":"{id}","type":"a","timestamp":"t","tenant_id":"x"}}"#).into_bytes()
        };
        assert!(decode_content(&body(&"i".repeat(MAX_EVENT_ID_BYTES))).is_ok());
        let err = decode_content(&body(&"i".repeat(MAX_EVENT_ID_BYTES + 1))).unwrap_err();
        assert_eq!(err.code(), "invalid_event_id");
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        // 128 two-byte characters: the limit is in bytes, as AMQP counts it.
        let err = decode_content(&body(&"é".repeat(128))).unwrap_err();
        assert!(
            matches!(err, IngressError::EventIdTooLong { len: 256 }),
            "{err:?}"
        );
    }

    #[test]
    fn a_repeated_signature_header_is_refused_by_name() {
        for name in SIGNATURE_HEADERS {
            let mut headers = HeaderMap::new();
            for other in SIGNATURE_HEADERS {
                headers.insert(other, HeaderValue::from_static("1"));
            }
            assert!(single_signature_headers(&headers).is_ok());
            headers.append(name, HeaderValue::from_static("2"));
            let err = single_signature_headers(&headers).unwrap_err();
            assert!(
                matches!(err, IngressError::DuplicateSignatureHeader(n) if n == name),
                "{err:?}"
            );
            assert_eq!(err.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(err.code(), "duplicate_signature_header");
            assert_eq!(err.signature_failure(), Some(SignatureFailure::Malformed));
        }
        let mut headers = HeaderMap::new();
        headers.append("x-forwarded-for", HeaderValue::from_static("a"));
        headers.append("x-forwarded-for", HeaderValue::from_static("b"));
        assert!(
            single_signature_headers(&headers).is_ok(),
            "other headers may repeat"
        );
    }

    #[test]
    fn refusals_that_leave_the_body_unread_close_the_connection() {
        let cases = [
            (
                IngressError::BodyTimeout {
                    limit: BODY_READ_TIMEOUT,
                },
                408,
                true,
            ),
            (IngressError::PayloadTooLarge { limit: 10 }, 413, true),
            (IngressError::UnreadableBody("reset".into()), 400, true),
            (
                IngressError::Signature(SignatureFailure::Mismatch),
                401,
                false,
            ),
            (IngressError::EventIdTooLong { len: 300 }, 400, false),
        ];
        for (error, status, closes) in cases {
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(
                response.headers().get(header::CONNECTION).is_some(),
                closes,
                "{status}"
            );
        }
    }

    #[test]
    fn too_many_requests_at_once_is_a_503_to_retry_that_closes_the_connection() {
        let error = IngressError::TooManyRequests;
        assert_eq!(error.code(), "overloaded");
        assert!(error.to_string().contains("AVSYNC_MAX_CONCURRENT_REQUESTS"));
        let response = error.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "5");
        assert_eq!(response.headers()[header::CONNECTION], "close");
    }

    #[test]
    fn too_many_pending_publishes_is_a_503_to_retry_in_five_seconds() {
        let error = IngressError::from(PublishError::Overloaded(512));
        assert_eq!(error.code(), "overloaded");
        assert!(error.to_string().contains("AVSYNC_MAX_PENDING_PUBLISHES"));
        let response = error.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "5");
    }

    /// JSON-looking text: mostly the characters JSON is made of, so that valid and nearly
    /// valid documents both come up often.
    fn jsonish() -> impl Strategy<Value = Vec<u8>> {
        let token = prop_oneof![
            Just(b"{".to_vec()),
            Just(b"}".to_vec()),
            Just(b"[".to_vec()),
            Just(b"]".to_vec()),
            Just(b",".to_vec()),
            Just(b":".to_vec()),
            Just(b"\"k\"".to_vec()),
            Just(b"\"\\ud800\"".to_vec()),
            Just(b"\"\\u00e9\"".to_vec()),
            Just(b"\"\xff\"".to_vec()),
            Just(b"1e400".to_vec()),
            Just(b"-0.5".to_vec()),
            Just(b"18446744073709551616".to_vec()),
            Just(b"null".to_vec()),
            Just(b"true".to_vec()),
            Just(b" ".to_vec()),
            any::<u8>().prop_map(|b| vec![b]),
        ];
        proptest::collection::vec(token, 0..64).prop_map(|t| t.concat())
    }

    proptest! {
        #[test]
        fn check_json_accepts_exactly_what_a_value_reads(body in jsonish()) {
            prop_assert_eq!(check_json(&body).is_ok(), reads_as_value(&body));
        }

        #[test]
        fn check_json_accepts_every_value_serde_writes(
            depth in 0usize..120,
            text in "\\PC{0,20}",
            number in any::<f64>().prop_filter("finite", |n| n.is_finite()),
        ) {
            let mut value = serde_json::json!({"s": text, "n": number, "i": i64::MIN, "u": u64::MAX});
            for _ in 0..depth {
                value = Value::Array(vec![value]);
            }
            let body = serde_json::to_vec(&value).unwrap();
            prop_assert!(check_json(&body).is_ok());
        }
    }
}
