//! Signature headers and verification: `avsync_ingress::http::single_signature_headers` then
//! `avsync_ingress::verify::Verifier::verify`, as the ingress runs them.
//!
//! The fuzzer chooses the body, extra headers (any name, any bytes, repeated or not) and
//! whether the target adds a correct signature of either scheme. Properties:
//! - nothing panics, and verification finishes without waiting;
//! - without a correct signature from the target, nothing is ever accepted;
//! - a correct signature, inside the tolerance, with no other signature header in the way, is
//!   always accepted, under the scheme and key id it was made with;
//! - a repeated signature header is always refused before verification.

#![no_main]

use avsync_ingress::http::single_signature_headers;
use avsync_ingress::settings::parse_hmac_secrets;
use avsync_ingress::verify::{
    FixedClock, RsaKey, RsaKeys, Scheme, Verifier, AUTHVITAL_KEY_ID, AUTHVITAL_SIGNATURE,
    AUTHVITAL_TIMESTAMP, WEBHOOK_ID, WEBHOOK_SIGNATURE, WEBHOOK_TIMESTAMP,
};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use ring::hmac;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};

const NOW: i64 = 1_790_000_000;
const TOLERANCE: i64 = 300;
const WHSEC_KEY: &[u8] = b"fuzz-whsec-key-0123456789abcdef!";
const K1: &[u8] = b"fuzz-secret-one";
const K2: &[u8] = b"fuzz=secret-two";
/// A key id the fake JWKS knows; its key never verifies.
const RSA_KID: &str = "key_rsa";

const SIGNATURE_HEADERS: [&str; 6] = [
    AUTHVITAL_TIMESTAMP,
    AUTHVITAL_SIGNATURE,
    AUTHVITAL_KEY_ID,
    WEBHOOK_ID,
    WEBHOOK_TIMESTAMP,
    WEBHOOK_SIGNATURE,
];

struct NeverVerifies;

impl RsaKey for NeverVerifies {
    fn verify(&self, _: &[u8], _: &[u8]) -> bool {
        false
    }
}

struct FakeJwks;

impl RsaKeys for FakeJwks {
    fn find<'a>(
        &'a self,
        kid: &'a str,
    ) -> Pin<Box<dyn Future<Output = Option<Arc<dyn RsaKey>>> + Send + 'a>> {
        let key: Option<Arc<dyn RsaKey>> = (kid == RSA_KID).then(|| Arc::new(NeverVerifies) as _);
        Box::pin(std::future::ready(key))
    }
}

fn verifier() -> &'static Verifier {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let setting = format!(
            "whsec_{},k1={},k2={}",
            STANDARD.encode(WHSEC_KEY),
            String::from_utf8_lossy(K1),
            String::from_utf8_lossy(K2)
        );
        Verifier::new(
            parse_hmac_secrets(&setting).expect("the fuzz secrets parse"),
            Some(Arc::new(FakeJwks)),
            TOLERANCE,
            Arc::new(FixedClock(NOW)),
        )
    })
}

#[derive(Arbitrary, Debug)]
enum Name {
    AuthVitalTimestamp,
    AuthVitalSignature,
    AuthVitalKeyId,
    WebhookId,
    WebhookTimestamp,
    WebhookSignature,
    Other(String),
}

impl Name {
    fn header(&self) -> Option<HeaderName> {
        match self {
            Self::AuthVitalTimestamp => Some(HeaderName::from_static(AUTHVITAL_TIMESTAMP)),
            Self::AuthVitalSignature => Some(HeaderName::from_static(AUTHVITAL_SIGNATURE)),
            Self::AuthVitalKeyId => Some(HeaderName::from_static(AUTHVITAL_KEY_ID)),
            Self::WebhookId => Some(HeaderName::from_static(WEBHOOK_ID)),
            Self::WebhookTimestamp => Some(HeaderName::from_static(WEBHOOK_TIMESTAMP)),
            Self::WebhookSignature => Some(HeaderName::from_static(WEBHOOK_SIGNATURE)),
            Self::Other(name) => HeaderName::from_bytes(name.as_bytes()).ok(),
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Signer {
    Whsec,
    K1,
    K2,
}

#[derive(Arbitrary, Debug)]
enum Sign {
    Nothing,
    /// A correct `v1,` entry under the whsec key, among fuzzed entries.
    Standard {
        id: String,
        offset: i16,
        before: Vec<String>,
        after: Vec<String>,
    },
    /// A correct AuthVital HMAC signature; with a key id where the signer has one.
    AuthVital {
        signer: Signer,
        with_key_id: bool,
        offset: i16,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    sign: Sign,
    extra: Vec<(Name, Vec<u8>)>,
    extra_first: bool,
    body: Vec<u8>,
}

fn tag(key: &[u8], parts: &[&[u8]]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&key);
    for part in parts {
        ctx.update(part);
    }
    STANDARD.encode(ctx.sign().as_ref())
}

/// What the target expects when it signed: the headers it set and the outcome they earn.
struct Expected {
    headers: Vec<(&'static str, String)>,
    in_tolerance: bool,
    scheme: Scheme,
    key_id: Option<&'static str>,
}

fn genuine(sign: &Sign, body: &[u8]) -> Option<Expected> {
    match sign {
        Sign::Nothing => None,
        Sign::Standard {
            id,
            offset,
            before,
            after,
        } => {
            let ts = (NOW + i64::from(*offset)).to_string();
            let entry = format!(
                "v1,{}",
                tag(WHSEC_KEY, &[id.as_bytes(), b".", ts.as_bytes(), b".", body])
            );
            let value: Vec<&str> = before
                .iter()
                .map(String::as_str)
                .chain([entry.as_str()])
                .chain(after.iter().map(String::as_str))
                .collect();
            Some(Expected {
                headers: vec![
                    (WEBHOOK_ID, id.clone()),
                    (WEBHOOK_TIMESTAMP, ts),
                    (WEBHOOK_SIGNATURE, value.join(" ")),
                ],
                in_tolerance: i64::from(*offset).abs() <= TOLERANCE,
                scheme: Scheme::StandardWebhooks,
                key_id: None,
            })
        }
        Sign::AuthVital {
            signer,
            with_key_id,
            offset,
        } => {
            let ts = (NOW + i64::from(*offset)).to_string();
            let (key, kid) = match signer {
                Signer::Whsec => (WHSEC_KEY, None),
                Signer::K1 => (K1, Some("k1")),
                Signer::K2 => (K2, Some("k2")),
            };
            let kid = kid.filter(|_| *with_key_id);
            let mut headers = vec![
                (AUTHVITAL_TIMESTAMP, ts.clone()),
                (AUTHVITAL_SIGNATURE, tag(key, &[ts.as_bytes(), b".", body])),
            ];
            if let Some(kid) = kid {
                headers.push((AUTHVITAL_KEY_ID, kid.to_owned()));
            }
            // Without a key id every secret is tried, and the unnamed whsec one matches first.
            let key_id = kid.or(match signer {
                Signer::Whsec => None,
                Signer::K1 => Some("k1"),
                Signer::K2 => Some("k2"),
            });
            Some(Expected {
                headers,
                in_tolerance: i64::from(*offset).abs() <= TOLERANCE,
                scheme: Scheme::AuthVitalHmac,
                key_id,
            })
        }
    }
}

/// Polls once: with HMAC keys and a JWKS that answers at once, nothing may wait.
fn now_or_never<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("verification waited"),
    }
}

fuzz_target!(|input: Input| {
    let expected = genuine(&input.sign, &input.body);
    let mut headers = HeaderMap::new();
    let add_extra = |headers: &mut HeaderMap| {
        for (name, value) in &input.extra {
            if let (Some(name), Ok(value)) = (name.header(), HeaderValue::from_bytes(value)) {
                headers.append(name, value);
            }
        }
    };
    if input.extra_first {
        add_extra(&mut headers);
    }
    if let Some(expected) = &expected {
        for (name, value) in &expected.headers {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.append(*name, value);
            }
        }
    }
    if !input.extra_first {
        add_extra(&mut headers);
    }

    let repeated = SIGNATURE_HEADERS
        .iter()
        .any(|name| headers.get_all(*name).iter().count() > 1);
    let single = single_signature_headers(&headers);
    assert_eq!(single.is_err(), repeated, "repeated headers are refused");
    let verdict = now_or_never(verifier().verify(&headers, &input.body));

    let Some(expected) = expected else {
        assert!(
            verdict.is_err(),
            "accepted without a signature: {verdict:?}"
        );
        return;
    };
    // The signature is unobstructed when each header the target set arrived exactly as set,
    // and no header of the other scheme (AuthVital ones take precedence) is in the way.
    let exactly = |name: &str, value: &str| {
        let all: Vec<_> = headers.get_all(name).iter().collect();
        all.len() == 1 && all[0].as_bytes() == value.as_bytes()
    };
    let set: Vec<&str> = expected.headers.iter().map(|(n, _)| *n).collect();
    let unobstructed = expected.headers.iter().all(|(n, v)| exactly(n, v))
        && [AUTHVITAL_TIMESTAMP, AUTHVITAL_SIGNATURE, AUTHVITAL_KEY_ID]
            .iter()
            .all(|n| set.contains(n) || !headers.contains_key(*n));
    // Signature headers are ASCII text: a value with other bytes is refused as malformed.
    let readable = expected.headers.iter().all(|(_, v)| {
        HeaderValue::from_str(v)
            .ok()
            .is_some_and(|h| h.to_str().is_ok())
    });
    // Header values lose surrounding whitespace in HTTP; an id that has some, or none at
    // all, cannot be signed as is.
    let id_sendable = expected
        .headers
        .iter()
        .filter(|(n, _)| *n == WEBHOOK_ID)
        .all(|(_, id)| !id.is_empty() && id.trim() == id);
    if unobstructed && readable && id_sendable && expected.in_tolerance && single.is_ok() {
        match &verdict {
            Ok(verified) => {
                assert_eq!(verified.scheme, expected.scheme);
                assert_eq!(verified.key_id.as_deref(), expected.key_id);
            }
            Err(e) => panic!("a correct signature was refused: {e:?}"),
        }
    }
    if !expected.in_tolerance {
        assert!(verdict.is_err(), "accepted outside the tolerance");
    }
});
