//! Webhook signatures, checked over the raw body bytes before anything parses them.
//!
//! Two header schemes (contract section 3):
//! - AuthVital: `X-AuthVital-Timestamp`, `X-AuthVital-Signature` (base64), optional
//!   `X-AuthVital-Key-Id`; signed bytes `<ts>.<body>`; HMAC-SHA256 under a configured secret or
//!   RSA-SHA256 under a JWKS key.
//! - Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature` (space-separated
//!   `v1,<base64>`); signed bytes `<id>.<ts>.<body>`; HMAC-SHA256 under any configured secret.
//!
//! A request that carries any AuthVital signature header is judged by the AuthVital scheme
//! alone, so one request never gets two chances under two rule sets.

use axum::http::HeaderMap;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use futures_util::future::BoxFuture;
use ring::hmac;
use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;

pub const AUTHVITAL_TIMESTAMP: &str = "x-authvital-timestamp";
pub const AUTHVITAL_SIGNATURE: &str = "x-authvital-signature";
pub const AUTHVITAL_KEY_ID: &str = "x-authvital-key-id";
pub const WEBHOOK_ID: &str = "webhook-id";
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";

/// Unix seconds stay within 11 digits until the year 5138.
const MAX_TIMESTAMP_DIGITS: usize = 11;

/// Senders pad their base64; hand-made test tools often do not. Both decode the same.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a signature was refused; also the `reason` label of
/// `avsync_ingress_signature_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum SignatureFailure {
    #[error("signature headers are missing: send X-AuthVital-Timestamp and X-AuthVital-Signature (with X-AuthVital-Key-Id for RSA), or webhook-id, webhook-timestamp and webhook-signature")]
    Missing,
    #[error("signature headers are malformed: the timestamp must be unix seconds and the signature base64")]
    Malformed,
    #[error("signature does not match the body under any configured key")]
    Mismatch,
    #[error("the key id names no configured secret and no key of the JWKS")]
    UnknownKey,
    #[error("signature timestamp is outside the allowed clock distance; check the sender's clock")]
    Stale,
}

impl SignatureFailure {
    pub const ALL: [Self; 5] = [
        Self::Missing,
        Self::Malformed,
        Self::Mismatch,
        Self::UnknownKey,
        Self::Stale,
    ];

    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::Mismatch => "mismatch",
            Self::UnknownKey => "unknown_key",
            Self::Stale => "stale",
        }
    }

    /// The `error` code of the 401 body.
    pub fn code(self) -> &'static str {
        match self {
            Self::Missing => "missing_signature",
            Self::Malformed => "malformed_signature",
            Self::Mismatch => "bad_signature",
            Self::UnknownKey => "unknown_key",
            Self::Stale => "stale_timestamp",
        }
    }
}

/// One configured HMAC secret: `<key-id>=<secret>` entries are named, `whsec_` ones are not.
#[derive(Clone)]
pub struct HmacKey {
    id: Option<String>,
    secret: Vec<u8>,
    key: hmac::Key,
}

impl HmacKey {
    pub fn named(id: &str, secret: Vec<u8>) -> Self {
        Self::build(Some(id.to_owned()), secret)
    }

    pub fn unnamed(secret: Vec<u8>) -> Self {
        Self::build(None, secret)
    }

    fn build(id: Option<String>, secret: Vec<u8>) -> Self {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &secret);
        Self { id, secret, key }
    }

    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    /// Constant-time comparison of the tag over `parts` (concatenated) with each candidate.
    fn matches_any(&self, parts: &[&[u8]], candidates: &[Vec<u8>]) -> bool {
        let mut context = hmac::Context::with_key(&self.key);
        for part in parts {
            context.update(part);
        }
        let tag = context.sign();
        candidates
            .iter()
            .fold(false, |found, c| found | bool::from(tag.as_ref().ct_eq(c)))
    }
}

impl fmt::Debug for HmacKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HmacKey")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// The time source of the timestamp check, so that tests can pin it.
pub trait Clock: Send + Sync + 'static {
    fn now_unix(&self) -> i64;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
        }
    }
}

/// A clock that always reads the same second (tests and fuzz targets pin it).
#[cfg(any(test, feature = "test-support"))]
#[derive(Debug, Clone, Copy)]
pub struct FixedClock(pub i64);

#[cfg(any(test, feature = "test-support"))]
impl Clock for FixedClock {
    fn now_unix(&self) -> i64 {
        self.0
    }
}

/// An RSA public key that verifies RSASSA-PKCS1-v1_5 SHA-256 signatures.
pub trait RsaKey: Send + Sync {
    fn verify(&self, message: &[u8], signature: &[u8]) -> bool;
}

/// Where RSA keys come from: the JWKS. `find` may refetch the set once for an unknown id but
/// must always finish promptly.
pub trait RsaKeys: Send + Sync {
    fn find<'a>(&'a self, kid: &'a str) -> BoxFuture<'a, Option<Arc<dyn RsaKey>>>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    AuthVitalHmac,
    AuthVitalRsa,
    StandardWebhooks,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AuthVitalHmac => "authvital-hmac",
            Self::AuthVitalRsa => "authvital-rsa",
            Self::StandardWebhooks => "standard-webhooks",
        }
    }
}

/// How a request proved itself; safe to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub scheme: Scheme,
    pub key_id: Option<String>,
}

#[derive(Clone)]
pub struct Verifier {
    hmac: Arc<[HmacKey]>,
    rsa: Option<Arc<dyn RsaKeys>>,
    tolerance_secs: i64,
    clock: Arc<dyn Clock>,
}

impl Verifier {
    pub fn new(
        hmac: Vec<HmacKey>,
        rsa: Option<Arc<dyn RsaKeys>>,
        tolerance_secs: i64,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            hmac: hmac.into(),
            rsa,
            tolerance_secs,
            clock,
        }
    }

    pub async fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Verified, SignatureFailure> {
        let authvital = [AUTHVITAL_SIGNATURE, AUTHVITAL_TIMESTAMP, AUTHVITAL_KEY_ID]
            .iter()
            .any(|h| headers.contains_key(*h));
        if authvital {
            self.verify_authvital(headers, body).await
        } else if headers.contains_key(WEBHOOK_SIGNATURE) {
            self.verify_standard(headers, body)
        } else {
            Err(SignatureFailure::Missing)
        }
    }

    async fn verify_authvital(
        &self,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Verified, SignatureFailure> {
        let timestamp = header(headers, AUTHVITAL_TIMESTAMP)?;
        let signature = header(headers, AUTHVITAL_SIGNATURE)?;
        let key_id = match headers.get(AUTHVITAL_KEY_ID) {
            Some(v) => Some(v.to_str().map_err(|_| SignatureFailure::Malformed)?),
            None => None,
        };
        self.check_timestamp(timestamp)?;
        let signature = LENIENT_BASE64
            .decode(signature)
            .map_err(|_| SignatureFailure::Malformed)?;
        let parts: [&[u8]; 3] = [timestamp.as_bytes(), b".", body];
        let candidates = [signature];
        match key_id {
            Some(kid) => {
                if let Some(key) = self.hmac.iter().find(|k| k.id() == Some(kid)) {
                    return if key.matches_any(&parts, &candidates) {
                        Ok(Verified {
                            scheme: Scheme::AuthVitalHmac,
                            key_id: Some(kid.to_owned()),
                        })
                    } else {
                        Err(SignatureFailure::Mismatch)
                    };
                }
                let rsa = self.rsa.as_ref().ok_or(SignatureFailure::UnknownKey)?;
                let key = rsa.find(kid).await.ok_or(SignatureFailure::UnknownKey)?;
                if key.verify(&parts.concat(), &candidates[0]) {
                    Ok(Verified {
                        scheme: Scheme::AuthVitalRsa,
                        key_id: Some(kid.to_owned()),
                    })
                } else {
                    Err(SignatureFailure::Mismatch)
                }
            }
            // RSA keys are only ever chosen by key id, so without one only secrets can match.
            None if self.hmac.is_empty() => Err(SignatureFailure::Missing),
            None => self.hmac_match(&parts, &candidates).map(|key_id| Verified {
                scheme: Scheme::AuthVitalHmac,
                key_id,
            }),
        }
    }

    fn verify_standard(
        &self,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Verified, SignatureFailure> {
        let id = header(headers, WEBHOOK_ID)?;
        let timestamp = header(headers, WEBHOOK_TIMESTAMP)?;
        let signatures = header(headers, WEBHOOK_SIGNATURE)?;
        self.check_timestamp(timestamp)?;
        // Entries of other versions (e.g. `v1a` for asymmetric keys) are not ours to check.
        let candidates: Vec<Vec<u8>> = signatures
            .split_whitespace()
            .filter_map(|entry| entry.strip_prefix("v1,"))
            .filter_map(|b64| LENIENT_BASE64.decode(b64).ok())
            .collect();
        if candidates.is_empty() {
            return Err(SignatureFailure::Malformed);
        }
        let parts: [&[u8]; 5] = [id.as_bytes(), b".", timestamp.as_bytes(), b".", body];
        self.hmac_match(&parts, &candidates).map(|key_id| Verified {
            scheme: Scheme::StandardWebhooks,
            key_id,
        })
    }

    /// Tries every secret, so that rotation works with two configured at once.
    fn hmac_match(
        &self,
        parts: &[&[u8]],
        candidates: &[Vec<u8>],
    ) -> Result<Option<String>, SignatureFailure> {
        self.hmac
            .iter()
            .find(|key| key.matches_any(parts, candidates))
            .map(|key| key.id().map(str::to_owned))
            .ok_or(SignatureFailure::Mismatch)
    }

    /// `|now - ts| <= tolerance` passes, in either direction. Checked before any signature
    /// work, and only `^[0-9]{1,11}$` is a timestamp: AuthVital signs its JWTs with the same
    /// JWKS keys over `<header>.<payload>`, so a verifier that took any text as the timestamp
    /// would accept a JWT's header as timestamp and its payload as body.
    fn check_timestamp(&self, timestamp: &str) -> Result<(), SignatureFailure> {
        if !(1..=MAX_TIMESTAMP_DIGITS).contains(&timestamp.len())
            || !timestamp.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(SignatureFailure::Malformed);
        }
        let ts: i64 = timestamp.parse().map_err(|_| SignatureFailure::Malformed)?;
        let distance = i128::from(self.clock.now_unix()) - i128::from(ts);
        if distance.abs() <= i128::from(self.tolerance_secs) {
            Ok(())
        } else {
            Err(SignatureFailure::Stale)
        }
    }
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Result<&'h str, SignatureFailure> {
    let value = headers.get(name).ok_or(SignatureFailure::Missing)?;
    let text = value
        .to_str()
        .map_err(|_| SignatureFailure::Malformed)?
        .trim();
    if text.is_empty() {
        Err(SignatureFailure::Missing)
    } else {
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::parse_hmac_secrets;
    use axum::http::{HeaderName, HeaderValue};
    use proptest::prelude::*;
    use serde_json::Value;

    const FIXTURE: &str = include_str!("../../tests/fixtures/signatures.json");
    const NOW: i64 = 1_790_000_000;

    fn fixture() -> Value {
        serde_json::from_str(FIXTURE).expect("fixture is JSON")
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn verifier(secrets: &str, tolerance: i64) -> Verifier {
        Verifier::new(
            parse_hmac_secrets(secrets).unwrap(),
            None,
            tolerance,
            Arc::new(FixedClock(NOW)),
        )
    }

    fn sign(secret: &[u8], parts: &[&[u8]]) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let mut ctx = hmac::Context::with_key(&key);
        for p in parts {
            ctx.update(p);
        }
        base64::engine::general_purpose::STANDARD.encode(ctx.sign().as_ref())
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// The fixture's secrets as the operator would configure them.
    fn fixture_secrets(fx: &Value) -> String {
        let mut entries: Vec<String> = fx["secrets"]["standard"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect();
        for (id, secret) in fx["secrets"]["authvital_hmac"].as_object().unwrap() {
            entries.push(format!("{id}={}", secret.as_str().unwrap()));
        }
        entries.join(",")
    }

    #[tokio::test]
    async fn fixture_hmac_cases_come_out_as_they_say() {
        let fx = fixture();
        assert_eq!(fx["now_unix"].as_i64(), Some(NOW));
        let v = verifier(
            &fixture_secrets(&fx),
            fx["tolerance_secs"].as_i64().unwrap(),
        );
        let mut checked = 0;
        for case in fx["cases"].as_array().unwrap() {
            let scheme = case["scheme"].as_str().unwrap();
            if scheme == "authvital-rsa" {
                continue;
            }
            let pairs: Vec<(String, String)> = case["headers"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str().unwrap().to_owned()))
                .collect();
            let pairs: Vec<(&str, &str)> = pairs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let body = case["body"].as_str().unwrap().as_bytes();
            let got = v.verify(&headers(&pairs), body).await;
            let name = case["name"].as_str().unwrap();
            match case["expect"].as_str().unwrap() {
                "valid" => assert!(got.is_ok(), "{name}: {got:?}"),
                _ => assert!(got.is_err(), "{name}: accepted"),
            }
            checked += 1;
        }
        assert_eq!(checked, 13, "every standard and authvital-hmac case");
    }

    #[tokio::test]
    async fn fixture_failures_have_the_right_reason() {
        let fx = fixture();
        let v = verifier(&fixture_secrets(&fx), 300);
        let reason = |name: &str| {
            let case = fx["cases"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name)
                .unwrap()
                .clone();
            let v = v.clone();
            async move {
                let pairs: Vec<(String, String)> = case["headers"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str().unwrap().to_owned()))
                    .collect();
                let pairs: Vec<(&str, &str)> = pairs
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                v.verify(&headers(&pairs), case["body"].as_str().unwrap().as_bytes())
                    .await
                    .unwrap_err()
            }
        };
        assert_eq!(reason("standard: stale").await, SignatureFailure::Stale);
        assert_eq!(reason("standard: future").await, SignatureFailure::Stale);
        assert_eq!(
            reason("standard: wrong secret").await,
            SignatureFailure::Mismatch
        );
        assert_eq!(
            reason("authvital-hmac: unknown key id").await,
            SignatureFailure::UnknownKey
        );
        assert_eq!(
            reason("authvital-hmac: key id names the other secret").await,
            SignatureFailure::Mismatch
        );
    }

    #[tokio::test]
    async fn tolerance_is_inclusive_both_ways() {
        let v = verifier("k1=s", 300);
        let body = b"{}";
        for (offset, ok) in [
            (-301, false),
            (-300, true),
            (0, true),
            (300, true),
            (301, false),
        ] {
            let ts = (NOW + offset).to_string();
            let sig = sign(b"s", &[ts.as_bytes(), b".", body]);
            let got = v
                .verify(
                    &headers(&[(AUTHVITAL_TIMESTAMP, &ts), (AUTHVITAL_SIGNATURE, &sig)]),
                    body,
                )
                .await;
            if ok {
                assert!(got.is_ok(), "{offset}");
            } else {
                assert_eq!(got, Err(SignatureFailure::Stale), "{offset}");
            }
        }
    }

    #[tokio::test]
    async fn missing_and_malformed_headers() {
        let v = verifier("k1=s", 300);
        let now = NOW.to_string();
        let cases: &[(&[(&str, &str)], SignatureFailure)] = &[
            (&[], SignatureFailure::Missing),
            (&[(AUTHVITAL_TIMESTAMP, &now)], SignatureFailure::Missing),
            (&[(AUTHVITAL_SIGNATURE, "AAAA")], SignatureFailure::Missing),
            (
                &[(AUTHVITAL_TIMESTAMP, "soon"), (AUTHVITAL_SIGNATURE, "AAAA")],
                SignatureFailure::Malformed,
            ),
            (
                &[(AUTHVITAL_TIMESTAMP, "-5"), (AUTHVITAL_SIGNATURE, "AAAA")],
                SignatureFailure::Malformed,
            ),
            (
                &[
                    (AUTHVITAL_TIMESTAMP, &now),
                    (AUTHVITAL_SIGNATURE, "not base64!"),
                ],
                SignatureFailure::Malformed,
            ),
            (
                &[
                    (AUTHVITAL_TIMESTAMP, "99999999999999999999"),
                    (AUTHVITAL_SIGNATURE, "AAAA"),
                ],
                SignatureFailure::Malformed,
            ),
            (
                &[
                    (AUTHVITAL_TIMESTAMP, "99999999999"),
                    (AUTHVITAL_SIGNATURE, "AAAA"),
                ],
                SignatureFailure::Stale,
            ),
            (
                &[
                    (AUTHVITAL_TIMESTAMP, "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0"),
                    (AUTHVITAL_SIGNATURE, "AAAA"),
                ],
                SignatureFailure::Malformed,
            ),
            (
                &[(WEBHOOK_ID, "m"), (WEBHOOK_TIMESTAMP, &now)],
                SignatureFailure::Missing,
            ),
            (
                &[(WEBHOOK_TIMESTAMP, &now), (WEBHOOK_SIGNATURE, "v1,AAAA")],
                SignatureFailure::Missing,
            ),
            (
                &[(WEBHOOK_ID, "m"), (WEBHOOK_SIGNATURE, "v1,AAAA")],
                SignatureFailure::Missing,
            ),
            (
                &[
                    (WEBHOOK_ID, "m"),
                    (WEBHOOK_TIMESTAMP, &now),
                    (WEBHOOK_SIGNATURE, "v2,AAAA"),
                ],
                SignatureFailure::Malformed,
            ),
            (
                &[
                    (WEBHOOK_ID, "m"),
                    (WEBHOOK_TIMESTAMP, &now),
                    (WEBHOOK_SIGNATURE, "v1,AAAA"),
                ],
                SignatureFailure::Mismatch,
            ),
        ];
        for (pairs, want) in cases {
            assert_eq!(
                v.verify(&headers(pairs), b"{}").await,
                Err(*want),
                "{pairs:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_key_id_outside_the_secrets_is_unknown_without_a_jwks() {
        let v = verifier("k1=s,whsec_AAECAw==", 300);
        let ts = NOW.to_string();
        let sig = sign(b"s", &[ts.as_bytes(), b".", b"{}"]);
        let got = v
            .verify(
                &headers(&[
                    (AUTHVITAL_TIMESTAMP, &ts),
                    (AUTHVITAL_SIGNATURE, &sig),
                    (AUTHVITAL_KEY_ID, "key_123"),
                ]),
                b"{}",
            )
            .await;
        assert_eq!(got, Err(SignatureFailure::UnknownKey));
    }

    #[tokio::test]
    async fn unnamed_secrets_verify_authvital_headers_without_a_key_id() {
        let v = verifier("k1=s,whsec_AAECAw==", 300);
        let ts = NOW.to_string();
        let sig = sign(&[0, 1, 2, 3], &[ts.as_bytes(), b".", b"{}"]);
        let got = v
            .verify(
                &headers(&[(AUTHVITAL_TIMESTAMP, &ts), (AUTHVITAL_SIGNATURE, &sig)]),
                b"{}",
            )
            .await
            .unwrap();
        assert_eq!(got.scheme, Scheme::AuthVitalHmac);
        assert_eq!(got.key_id, None);
    }

    proptest! {
        #[test]
        fn standard_signatures_verify_and_any_changed_byte_fails(
            secret in proptest::collection::vec(any::<u8>(), 1..64),
            body in proptest::collection::vec(any::<u8>(), 1..512),
            offset in -300i64..=300,
            flip in any::<prop::sample::Index>(),
        ) {
            let whsec = format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(&secret));
            let v = verifier(&whsec, 300);
            let ts = (NOW + offset).to_string();
            let sig = format!("v1,{}", sign(&secret, &[b"msg_1.", ts.as_bytes(), b".", &body]));
            let h = headers(&[(WEBHOOK_ID, "msg_1"), (WEBHOOK_TIMESTAMP, &ts), (WEBHOOK_SIGNATURE, &sig)]);
            prop_assert!(block_on(v.verify(&h, &body)).is_ok());
            let mut changed = body.clone();
            let i = flip.index(changed.len());
            changed[i] ^= 0x01;
            prop_assert_eq!(block_on(v.verify(&h, &changed)), Err(SignatureFailure::Mismatch));
        }

        #[test]
        fn authvital_hmac_picks_the_named_secret(
            body in proptest::collection::vec(any::<u8>(), 0..256),
            use_second in any::<bool>(),
        ) {
            let v = verifier("k1=first-secret,k2=second-secret", 300);
            let ts = NOW.to_string();
            let (kid, secret, other): (&str, &[u8], &str) = if use_second {
                ("k2", b"second-secret", "k1")
            } else {
                ("k1", b"first-secret", "k2")
            };
            let sig = sign(secret, &[ts.as_bytes(), b".", &body]);
            let good = headers(&[(AUTHVITAL_TIMESTAMP, &ts), (AUTHVITAL_SIGNATURE, &sig), (AUTHVITAL_KEY_ID, kid)]);
            prop_assert!(block_on(v.verify(&good, &body)).is_ok());
            let wrong = headers(&[(AUTHVITAL_TIMESTAMP, &ts), (AUTHVITAL_SIGNATURE, &sig), (AUTHVITAL_KEY_ID, other)]);
            prop_assert_eq!(block_on(v.verify(&wrong, &body)), Err(SignatureFailure::Mismatch));
            let unnamed = headers(&[(AUTHVITAL_TIMESTAMP, &ts), (AUTHVITAL_SIGNATURE, &sig)]);
            prop_assert!(block_on(v.verify(&unnamed, &body)).is_ok());
        }
    }
}
