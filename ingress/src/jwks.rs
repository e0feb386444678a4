//! AuthVital's own RSA keys, from its JWKS (`AVSYNC_JWKS_URL`), for `X-AuthVital-Key-Id`
//! signatures: RSASSA-PKCS1-v1_5 with SHA-256.
//!
//! - The set is fetched at start, retried with backoff until it loads, and refreshed every
//!   `AVSYNC_JWKS_REFRESH_INTERVAL` (5 min by default): AuthVital revokes a key by removing it
//!   from its JWKS, and a removed key stops verifying at the next refresh.
//! - An unknown key id triggers one refetch: concurrent requests for new ids wait for the same
//!   fetch (single flight), and such refetches are at least [`REFETCH_INTERVAL`] apart, so
//!   forged key ids cannot turn the ingress into a load generator against AuthVital.
//! - A failed fetch keeps the last good set; known keys never wait for the JWKS.

use crate::metrics::{FetchOutcome, Metrics};
use crate::verify::{RsaKey, RsaKeys};
use avsync_shared::backoff::jittered;
use backon::Retryable;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use futures_util::future::BoxFuture;
use ring::signature::{RsaPublicKeyComponents, RSA_PKCS1_2048_8192_SHA256};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Least time between two refetches caused by unknown key ids.
pub const REFETCH_INTERVAL: Duration = Duration::from_secs(30);
/// Longest a fetch may take, so an unknown key id is answered promptly even when the JWKS hangs.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A key set is a few kilobytes; anything this large is not one.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// JWK `n` and `e` are base64url without padding; padding is tolerated.
const BASE64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// An RSA public key of 2048 to 8192 bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RsaPublicKey {
    n: Vec<u8>,
    e: Vec<u8>,
}

impl RsaKey for RsaPublicKey {
    fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        RsaPublicKeyComponents {
            n: &self.n,
            e: &self.e,
        }
        .verify(&RSA_PKCS1_2048_8192_SHA256, message, signature)
        .is_ok()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("JWKS request failed: {0}")]
    Http(String),
    #[error("JWKS answered HTTP {0}")]
    Status(u16),
    #[error("JWKS is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("JWKS is not a JSON key set: {0}")]
    NotJson(String),
    #[error("JWKS holds no usable key (RSA, `use` absent or `sig`, with `kid`, n and e)")]
    NoUsableKey,
}

#[derive(Deserialize)]
struct RawSet {
    keys: Vec<RawKey>,
}

#[derive(Deserialize)]
struct RawKey {
    kty: Option<String>,
    kid: Option<String>,
    #[serde(rename = "use")]
    key_use: Option<String>,
    alg: Option<String>,
    n: Option<String>,
    e: Option<String>,
}

pub type KeySet = HashMap<String, Arc<RsaPublicKey>>;

/// The usable keys of a JWKS document, by `kid`. Keys of other types, other uses or other
/// algorithms, and malformed keys, are skipped.
pub fn parse_jwks(bytes: &[u8]) -> Result<KeySet, FetchError> {
    let set: RawSet =
        serde_json::from_slice(bytes).map_err(|e| FetchError::NotJson(e.to_string()))?;
    let mut keys = KeySet::new();
    for raw in set.keys {
        let kid = raw.kid.clone().unwrap_or_default();
        match usable_key(raw) {
            Ok(key) => {
                keys.insert(kid, Arc::new(key));
            }
            Err(reason) => tracing::debug!(kid, reason, "JWKS key skipped"),
        }
    }
    if keys.is_empty() {
        Err(FetchError::NoUsableKey)
    } else {
        Ok(keys)
    }
}

fn usable_key(raw: RawKey) -> Result<RsaPublicKey, &'static str> {
    if raw.kty.as_deref() != Some("RSA") {
        return Err("not an RSA key");
    }
    if raw.key_use.as_deref().is_some_and(|u| u != "sig") {
        return Err("not a signing key");
    }
    if raw.alg.as_deref().is_some_and(|a| a != "RS256") {
        return Err("algorithm is not RS256");
    }
    if raw.kid.as_deref().is_none_or(str::is_empty) {
        return Err("no kid");
    }
    let n = decode_unsigned(raw.n.as_deref()).ok_or("n is missing or not base64url")?;
    let e = decode_unsigned(raw.e.as_deref()).ok_or("e is missing or not base64url")?;
    if !(256..=1024).contains(&n.len()) {
        return Err("modulus is not 2048 to 8192 bits");
    }
    Ok(RsaPublicKey { n, e })
}

/// Big-endian bytes without leading zeros, as ring wants them.
fn decode_unsigned(value: Option<&str>) -> Option<Vec<u8>> {
    let bytes = BASE64URL.decode(value?).ok()?;
    let first = bytes.iter().position(|b| *b != 0)?;
    Some(bytes[first..].to_vec())
}

pub struct Jwks {
    url: reqwest::Url,
    client: reqwest::Client,
    keys: RwLock<Arc<KeySet>>,
    /// Held during a refetch caused by an unknown key id (single flight); holds when the last
    /// one started.
    refetch: tokio::sync::Mutex<Option<Instant>>,
    refetch_interval: Duration,
    metrics: Metrics,
}

impl Jwks {
    pub fn new(
        url: reqwest::Url,
        metrics: Metrics,
        refetch_interval: Duration,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            .build()?;
        Ok(Self {
            url,
            client,
            keys: RwLock::new(Arc::new(KeySet::new())),
            refetch: tokio::sync::Mutex::new(None),
            refetch_interval,
            metrics,
        })
    }

    /// Loads the set in the background, retrying with backoff until it loads, then refreshes
    /// it every `refresh_interval` until `stop`.
    pub fn keep_fresh(
        self: &Arc<Self>,
        refresh_interval: Duration,
        stop: CancellationToken,
    ) -> JoinHandle<()> {
        let jwks = self.clone();
        tokio::spawn(async move {
            let backoff = jittered(Duration::from_millis(250), Duration::from_secs(30));
            let initial = (|| jwks.fetch())
                .retry(backoff)
                .sleep(tokio::time::sleep)
                .notify(|e: &FetchError, wait: Duration| {
                    tracing::warn!(error = %e, retry_in = ?wait, "cannot load the JWKS; RSA signatures fail until it loads");
                });
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = initial => {}
            }
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(refresh_interval) => {
                        if let Err(e) = jwks.fetch().await {
                            tracing::warn!(error = %e, "JWKS refresh failed; keeping the last good key set");
                        }
                    }
                }
            }
        })
    }

    pub fn has_keys(&self) -> bool {
        !self.current().is_empty()
    }

    fn current(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn lookup(&self, kid: &str) -> Option<Arc<RsaPublicKey>> {
        self.current().get(kid).cloned()
    }

    /// Fetches the set and, when it holds a usable key, replaces the cached one.
    pub async fn fetch(&self) -> Result<usize, FetchError> {
        let result = self.download().await.and_then(|bytes| parse_jwks(&bytes));
        match result {
            Ok(keys) => {
                self.metrics.jwks_fetch(FetchOutcome::Success);
                let count = keys.len();
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
                tracing::info!(keys = count, "JWKS loaded");
                Ok(count)
            }
            Err(e) => {
                self.metrics.jwks_fetch(FetchOutcome::Failure);
                Err(e)
            }
        }
    }

    async fn download(&self) -> Result<Vec<u8>, FetchError> {
        let mut response = self
            .client
            .get(self.url.clone())
            .send()
            .await
            .map_err(http_error)?;
        if !response.status().is_success() {
            return Err(FetchError::Status(response.status().as_u16()));
        }
        if response
            .content_length()
            .is_some_and(|len| len > MAX_JWKS_BYTES as u64)
        {
            return Err(FetchError::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(http_error)? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(FetchError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// The key with this id; an unknown id refetches the set once, unless a refetch started
    /// less than the refetch interval ago.
    pub async fn find_key(&self, kid: &str) -> Option<Arc<RsaPublicKey>> {
        if let Some(key) = self.lookup(kid) {
            return Some(key);
        }
        let mut last = self.refetch.lock().await;
        // Whoever held the lock before may have fetched exactly this key.
        if let Some(key) = self.lookup(kid) {
            return Some(key);
        }
        if last.is_some_and(|at| at.elapsed() < self.refetch_interval) {
            tracing::info!(
                kid,
                "unknown JWKS key id; refetched recently, not again yet"
            );
            return None;
        }
        *last = Some(Instant::now());
        tracing::info!(kid, "unknown JWKS key id; refetching the key set");
        if let Err(e) = self.fetch().await {
            tracing::warn!(error = %e, "JWKS refetch failed; keeping the last good key set");
        }
        self.lookup(kid)
    }
}

/// The error with its causes (reqwest's own text is only "error sending request"), without the
/// URL, which the operator knows.
fn http_error(e: reqwest::Error) -> FetchError {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    FetchError::Http(text)
}

impl RsaKeys for Jwks {
    fn find<'a>(&'a self, kid: &'a str) -> BoxFuture<'a, Option<Arc<dyn RsaKey>>> {
        Box::pin(async move { self.find_key(kid).await.map(|key| key as Arc<dyn RsaKey>) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::parse_hmac_secrets;
    use crate::verify::{FixedClock, SignatureFailure, Verifier};
    use axum::http::{HeaderMap, HeaderName, HeaderValue};
    use rsa::pkcs1v15::SigningKey;
    use rsa::signature::{SignatureEncoding, Signer};
    use rsa::traits::PublicKeyParts;
    use serde_json::{json, Value};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Mutex, OnceLock};

    const FIXTURE: &str = include_str!("../../tests/fixtures/signatures.json");

    fn metrics() -> Metrics {
        Metrics::register(&prometheus::Registry::new()).unwrap()
    }

    /// Two throwaway keys, generated once per test binary (key generation is slow unoptimised).
    fn test_keys() -> &'static [rsa::RsaPrivateKey; 2] {
        static KEYS: OnceLock<[rsa::RsaPrivateKey; 2]> = OnceLock::new();
        KEYS.get_or_init(|| {
            let mut rng = rsa::rand_core::OsRng;
            [
                rsa::RsaPrivateKey::new(&mut rng, 2048).unwrap(),
                rsa::RsaPrivateKey::new(&mut rng, 2048).unwrap(),
            ]
        })
    }

    fn jwk(kid: &str, key: &rsa::RsaPrivateKey) -> Value {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        json!({
            "kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
            "n": b64.encode(key.n().to_bytes_be()),
            "e": b64.encode(key.e().to_bytes_be()),
        })
    }

    fn sign(key: &rsa::RsaPrivateKey, message: &[u8]) -> Vec<u8> {
        SigningKey::<rsa::sha2::Sha256>::new(key.clone())
            .sign(message)
            .to_vec()
    }

    /// A JWKS server on 127.0.0.1:0 that counts its fetches and can be told to fail.
    struct Server {
        url: reqwest::Url,
        keys: Arc<Mutex<Vec<Value>>>,
        fail: Arc<std::sync::atomic::AtomicBool>,
        fetches: Arc<AtomicUsize>,
    }

    async fn server(keys: Vec<Value>) -> Server {
        let keys = Arc::new(Mutex::new(keys));
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (k, f, n) = (keys.clone(), fail.clone(), fetches.clone());
        let app = axum::Router::new().route(
            "/.well-known/jwks.json",
            axum::routing::get(move || {
                let (k, f, n) = (k.clone(), f.clone(), n.clone());
                async move {
                    n.fetch_add(1, Ordering::SeqCst);
                    // Slow enough that a burst of requests overlaps one fetch.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if f.load(Ordering::SeqCst) {
                        return Err(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
                    }
                    Ok(axum::Json(json!({ "keys": *k.lock().unwrap() })))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Server {
            url: format!("http://{addr}/.well-known/jwks.json")
                .parse()
                .unwrap(),
            keys,
            fail,
            fetches,
        }
    }

    #[test]
    fn parses_the_fixture_key_set() {
        let fixture: Value = serde_json::from_str(FIXTURE).unwrap();
        let keys = parse_jwks(fixture["jwks"].to_string().as_bytes()).unwrap();
        let mut kids: Vec<_> = keys.keys().cloned().collect();
        kids.sort();
        assert_eq!(
            kids,
            ["key_1789990000000_a1b2c3d4", "key_1790000000000_e5f6a7b8"]
        );
    }

    #[test]
    fn skips_keys_it_must_not_use() {
        let [key, _] = test_keys();
        let mut enc = jwk("enc", key);
        enc["use"] = json!("enc");
        let mut ec = jwk("ec", key);
        ec["kty"] = json!("EC");
        let mut rs512 = jwk("rs512", key);
        rs512["alg"] = json!("RS512");
        let mut no_kid = jwk("", key);
        no_kid.as_object_mut().unwrap().remove("kid");
        let mut bad_n = jwk("bad_n", key);
        bad_n["n"] = json!("***");
        let mut short = jwk("short", key);
        short["n"] = json!("AQAB");
        let mut no_use = jwk("no_use", key);
        no_use.as_object_mut().unwrap().remove("use");
        no_use.as_object_mut().unwrap().remove("alg");
        let set =
            json!({ "keys": [enc, ec, rs512, no_kid, bad_n, short, no_use, jwk("good", key)] });
        let keys = parse_jwks(set.to_string().as_bytes()).unwrap();
        let mut kids: Vec<_> = keys.keys().cloned().collect();
        kids.sort();
        assert_eq!(kids, ["good", "no_use"]);

        let only_bad = json!({ "keys": [jwk("x", key).as_object().map(|o| {
            let mut o = o.clone();
            o.insert("kty".into(), json!("oct"));
            o
        })] });
        assert!(matches!(
            parse_jwks(only_bad.to_string().as_bytes()),
            Err(FetchError::NoUsableKey)
        ));
        assert!(matches!(parse_jwks(b"[]"), Err(FetchError::NotJson(_))));
        assert!(matches!(parse_jwks(b"<html>"), Err(FetchError::NotJson(_))));
    }

    #[test]
    fn verifies_pkcs1_sha256_and_nothing_else() {
        let [key, other] = test_keys();
        let keys = parse_jwks(json!({ "keys": [jwk("k", key)] }).to_string().as_bytes()).unwrap();
        let public = &keys["k"];
        let message = b"1787276405.{\"id\":\"1\"}";
        let signature = sign(key, message);
        assert!(public.verify(message, &signature));
        assert!(!public.verify(b"1787276405.{\"id\":\"2\"}", &signature));
        assert!(!public.verify(message, &sign(other, message)));
        assert!(!public.verify(message, &signature[1..]));
    }

    struct Static(KeySet);

    impl RsaKeys for Static {
        fn find<'a>(&'a self, kid: &'a str) -> BoxFuture<'a, Option<Arc<dyn RsaKey>>> {
            let key = self.0.get(kid).cloned().map(|k| k as Arc<dyn RsaKey>);
            Box::pin(async move { key })
        }
    }

    #[tokio::test]
    async fn fixture_rsa_cases_come_out_as_they_say() {
        let fixture: Value = serde_json::from_str(FIXTURE).unwrap();
        let keys = parse_jwks(fixture["jwks"].to_string().as_bytes()).unwrap();
        let verifier = Verifier::new(
            parse_hmac_secrets("k1=av-secret-one").unwrap(),
            Some(Arc::new(Static(keys))),
            fixture["tolerance_secs"].as_i64().unwrap(),
            Arc::new(FixedClock(fixture["now_unix"].as_i64().unwrap())),
        );
        let mut checked = 0;
        for case in fixture["cases"].as_array().unwrap() {
            if case["scheme"] != "authvital-rsa" {
                continue;
            }
            let mut headers = HeaderMap::new();
            for (name, value) in case["headers"].as_object().unwrap() {
                headers.insert(
                    HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).unwrap(),
                    HeaderValue::from_str(value.as_str().unwrap()).unwrap(),
                );
            }
            let got = verifier
                .verify(&headers, case["body"].as_str().unwrap().as_bytes())
                .await;
            let name = case["name"].as_str().unwrap();
            if case["expect"] == "valid" {
                assert!(got.is_ok(), "{name}: {got:?}");
            } else {
                assert!(got.is_err(), "{name}: accepted");
            }
            checked += 1;
        }
        assert_eq!(checked, 5);
    }

    #[tokio::test]
    async fn a_burst_of_requests_for_a_new_key_fetches_once_and_the_throttle_holds() {
        let [first, second] = test_keys();
        let server = server(vec![jwk("first", first)]).await;
        let jwks = Arc::new(Jwks::new(server.url.clone(), metrics(), REFETCH_INTERVAL).unwrap());
        jwks.fetch().await.unwrap();
        assert_eq!(server.fetches.load(Ordering::SeqCst), 1);
        assert!(jwks.find_key("first").await.is_some());
        assert_eq!(
            server.fetches.load(Ordering::SeqCst),
            1,
            "known keys need no fetch"
        );

        server.keys.lock().unwrap().push(jwk("second", second));
        let burst = (0..100).map(|_| {
            let jwks = jwks.clone();
            tokio::spawn(async move { jwks.find_key("second").await.is_some() })
        });
        for found in futures_util::future::join_all(burst).await {
            assert!(found.unwrap());
        }
        assert_eq!(
            server.fetches.load(Ordering::SeqCst),
            2,
            "one refetch for the burst"
        );

        assert!(jwks.find_key("third").await.is_none());
        assert_eq!(
            server.fetches.load(Ordering::SeqCst),
            2,
            "no second refetch within the interval"
        );
    }

    #[tokio::test]
    async fn refetches_again_after_the_interval_and_keeps_the_last_good_set_on_failure() {
        let [first, second] = test_keys();
        let server = server(vec![jwk("first", first)]).await;
        let interval = Duration::from_millis(300);
        let jwks = Jwks::new(server.url.clone(), metrics(), interval).unwrap();
        jwks.fetch().await.unwrap();

        server.fail.store(true, Ordering::SeqCst);
        assert!(jwks.find_key("second").await.is_none());
        assert_eq!(server.fetches.load(Ordering::SeqCst), 2);
        assert!(jwks.has_keys(), "a failed fetch keeps the last good set");
        assert!(jwks.find_key("first").await.is_some());

        server.fail.store(false, Ordering::SeqCst);
        server.keys.lock().unwrap().push(jwk("second", second));
        assert!(jwks.find_key("second").await.is_none(), "throttled");
        tokio::time::sleep(interval).await;
        assert!(jwks.find_key("second").await.is_some());
        assert_eq!(server.fetches.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn an_unreachable_jwks_answers_unknown_keys_promptly() {
        let closed = {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap()
        };
        let url = format!("http://{closed}/.well-known/jwks.json")
            .parse()
            .unwrap();
        let jwks = Jwks::new(url, metrics(), REFETCH_INTERVAL).unwrap();
        let started = Instant::now();
        assert!(jwks.find_key("any").await.is_none());
        assert!(started.elapsed() < FETCH_TIMEOUT);
        assert!(!jwks.has_keys());
        let verifier = Verifier::new(
            Vec::new(),
            Some(Arc::new(jwks)),
            300,
            Arc::new(FixedClock(1_790_000_000)),
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-authvital-timestamp",
            HeaderValue::from_static("1790000000"),
        );
        headers.insert("x-authvital-signature", HeaderValue::from_static("AAAA"));
        headers.insert("x-authvital-key-id", HeaderValue::from_static("key_x"));
        assert_eq!(
            verifier.verify(&headers, b"{}").await,
            Err(SignatureFailure::UnknownKey)
        );
    }
}
