//! RSA-SHA256 signatures through AuthVital's JWKS, against a local JWKS server whose keys are
//! generated here, with the ingress publishing to the real RabbitMQ.

use avsync_ingress::verify::FixedClock;
use avsync_shared::{TenantId, Topology};
use avsync_tests::ingress_harness::{new_whsec_secret, settings, sign_authvital_hmac, TestIngress};
use avsync_tests::support::{self, TopologyCleanup};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use futures_util::future::join_all;
use lapin::options::BasicGetOptions;
use rsa::pkcs1v15::SigningKey;
use rsa::signature::{SignatureEncoding, Signer};
use rsa::traits::PublicKeyParts;
use rsa::RsaPrivateKey;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const FIXTURE: &str = include_str!("../fixtures/signatures.json");

/// Two throwaway 2048-bit keys, generated once per test binary.
fn keys() -> &'static [RsaPrivateKey; 2] {
    static KEYS: OnceLock<[RsaPrivateKey; 2]> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut rng = rsa::rand_core::OsRng;
        let mut make = || RsaPrivateKey::new(&mut rng, 2048).expect("RSA key");
        [make(), make()]
    })
}

fn jwk(kid: &str, key: &RsaPrivateKey) -> Value {
    json!({
        "kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
        "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
        "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
    })
}

/// Base64 RSASSA-PKCS1-v1_5 SHA-256 over `<ts>.<body>`, as AuthVital signs.
fn sign_rsa(key: &RsaPrivateKey, ts: i64, body: &[u8]) -> String {
    let mut message = format!("{ts}.").into_bytes();
    message.extend_from_slice(body);
    let signature = SigningKey::<Sha256>::new(key.clone()).sign(&message);
    STANDARD.encode(signature.to_vec())
}

fn rsa_headers(kid: &str, signature: String, ts: i64, body: &[u8]) -> Vec<(&'static str, String)> {
    let event: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    vec![
        ("X-AuthVital-Timestamp", ts.to_string()),
        ("X-AuthVital-Signature", signature),
        ("X-AuthVital-Key-Id", kid.to_owned()),
        (
            "X-AuthVital-Event-Id",
            event["id"].as_str().unwrap_or("").to_owned(),
        ),
        (
            "X-AuthVital-Event-Type",
            event["type"].as_str().unwrap_or("").to_owned(),
        ),
    ]
}

fn event(id: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"{id}","data":{{"sub":"usr_7d2f","email":"jane@acme.test"}},"type":"member.joined","tenant_id":"tnt_acme","timestamp":"2026-08-21T01:40:03.512Z","application_id":"app_crm"}}"#
    )
    .into_bytes()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// AuthVital's `/.well-known/jwks.json` on 127.0.0.1:0: counts fetches, can fail with 500,
/// and can be stopped (connections refused from then on).
struct JwksServer {
    url: String,
    keys: Arc<Mutex<Vec<Value>>>,
    failing: Arc<AtomicBool>,
    fetches: Arc<AtomicUsize>,
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(keys: Vec<Value>) -> JwksServer {
        let keys = Arc::new(Mutex::new(keys));
        let failing = Arc::new(AtomicBool::new(false));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (k, f, n) = (keys.clone(), failing.clone(), fetches.clone());
        let app = axum::Router::new().route(
            "/.well-known/jwks.json",
            axum::routing::get(move || {
                let (k, f, n) = (k.clone(), f.clone(), n.clone());
                async move {
                    n.fetch_add(1, Ordering::SeqCst);
                    // Slow enough that concurrent requests for a new key overlap one fetch.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if f.load(Ordering::SeqCst) {
                        return Err(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
                    }
                    let keys = k.lock().unwrap().clone();
                    Ok(axum::Json(json!({ "keys": keys })))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let shutdown = stop.clone();
        let handle = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await;
        });
        JwksServer {
            url: format!("http://{addr}/.well-known/jwks.json"),
            keys,
            failing,
            fetches,
            stop,
            handle,
        }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// Stops serving; the port then refuses connections.
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.handle.await;
    }
}

/// An ingress that verifies with the JWKS only (no HMAC secrets), ready once a key is loaded.
async fn jwks_ingress(prefix: &str, url: &str, clock: Option<i64>) -> TestIngress {
    jwks_ingress_refreshing(prefix, url, clock, Duration::from_secs(300)).await
}

/// [`jwks_ingress`] with this `AVSYNC_JWKS_REFRESH_INTERVAL`.
async fn jwks_ingress_refreshing(
    prefix: &str,
    url: &str,
    clock: Option<i64>,
    refresh_interval: Duration,
) -> TestIngress {
    let mut s = settings(prefix, 2, "");
    s.hmac_secrets = None;
    s.jwks_url = Some(url.to_owned());
    s.jwks_refresh_interval = refresh_interval;
    let clock =
        clock.map(|now| Arc::new(FixedClock(now)) as Arc<dyn avsync_ingress::verify::Clock>);
    let ingress = TestIngress::start_with(s, clock).await;
    ingress.wait_ready().await;
    ingress
}

async fn error_code(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("JSON error body");
    (status, body["error"].as_str().unwrap_or("").to_owned())
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series}"))
        .trim()
        .parse()
        .unwrap()
}

fn acme_queue(prefix: &str) -> String {
    let topology = Topology::new(prefix, 2).unwrap();
    topology.partition_queue(topology.partition_of(&TenantId::parse("tnt_acme").unwrap()))
}

async fn drain(queue: &str) -> Vec<lapin::message::Delivery> {
    let (_conn, ch) = support::channel().await;
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        out.push(m.delivery);
    }
    out
}

#[tokio::test]
async fn a_valid_rsa_signature_passes_and_other_keys_bodies_or_kids_are_401() {
    let [k1, k2] = keys();
    let prefix = support::unique("t");
    let _cleanup = TopologyCleanup::new(&prefix, 2);
    let server = JwksServer::start(vec![jwk("key_1", k1)]).await;
    let ingress = jwks_ingress(&prefix, &server.url, None).await;

    let body = event("evt-rsa");
    let ts = now();
    let response = ingress
        .post_with(
            &rsa_headers("key_1", sign_rsa(k1, ts, &body), ts, &body),
            &body,
        )
        .await;
    assert_eq!(response.status().as_u16(), 202);

    let mut changed = body.clone();
    changed[12] ^= 0x01;
    let refused = [
        (
            "other key",
            rsa_headers("key_1", sign_rsa(k2, ts, &body), ts, &body),
            body.clone(),
            "bad_signature",
        ),
        (
            "changed body",
            rsa_headers("key_1", sign_rsa(k1, ts, &body), ts, &body),
            changed,
            "bad_signature",
        ),
        (
            "wrong kid",
            rsa_headers("key_nope", sign_rsa(k1, ts, &body), ts, &body),
            body.clone(),
            "unknown_key",
        ),
        (
            "stale",
            rsa_headers("key_1", sign_rsa(k1, ts - 301, &body), ts - 301, &body),
            body.clone(),
            "stale_timestamp",
        ),
        (
            "no key id and no secrets",
            vec![
                ("X-AuthVital-Timestamp", ts.to_string()),
                ("X-AuthVital-Signature", sign_rsa(k1, ts, &body)),
            ],
            body.clone(),
            "missing_signature",
        ),
    ];
    for (name, headers, body, code) in refused {
        let response = ingress.post_with(&headers, &body).await;
        assert_eq!(error_code(response).await, (401, code.to_owned()), "{name}");
    }

    let got = drain(&acme_queue(&prefix)).await;
    assert_eq!(got.len(), 1, "only the valid request is published");
    assert_eq!(got[0].data, body);
    ingress.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn a_rotated_key_passes_after_exactly_one_refetch_even_for_a_burst_of_100() {
    let [k1, k2] = keys();
    let prefix = support::unique("t");
    let _cleanup = TopologyCleanup::new(&prefix, 2);
    let server = JwksServer::start(vec![jwk("key_1", k1)]).await;
    let ingress = jwks_ingress(&prefix, &server.url, None).await;
    assert_eq!(server.fetches(), 1, "the start-up fetch");

    server.keys.lock().unwrap().push(jwk("key_2", k2));
    // One signed request sent 100 times at once, as a sender's retries would (signing is slow
    // in unoptimised builds).
    let body = event("evt-burst");
    let ts = now();
    let headers = rsa_headers("key_2", sign_rsa(k2, ts, &body), ts, &body);
    let burst = (0..100).map(|_| ingress.post_with(&headers, &body));
    let statuses: Vec<u16> = join_all(burst)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert!(statuses.iter().all(|s| *s == 202), "{statuses:?}");
    assert_eq!(server.fetches(), 2, "one refetch for the whole burst");

    // Another new key within 30 s of that refetch is not fetched for.
    let body = event("evt-k3");
    let ts = now();
    let response = ingress
        .post_with(
            &rsa_headers("key_3", sign_rsa(k1, ts, &body), ts, &body),
            &body,
        )
        .await;
    assert_eq!(error_code(response).await, (401, "unknown_key".to_owned()));
    assert_eq!(server.fetches(), 2, "refetches are throttled");

    let text = ingress.metrics().await;
    assert_eq!(
        metric(
            &text,
            "avsync_ingress_jwks_fetches_total{outcome=\"success\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            "avsync_ingress_jwks_fetches_total{outcome=\"failure\"}"
        ),
        0.0
    );
    assert_eq!(drain(&acme_queue(&prefix)).await.len(), 100);
    ingress.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn with_the_jwks_down_after_start_known_keys_verify_and_unknown_kids_are_401_quickly() {
    let [k1, k2] = keys();
    let prefix = support::unique("t");
    let _cleanup = TopologyCleanup::new(&prefix, 2);
    let server = JwksServer::start(vec![jwk("key_1", k1)]).await;
    let ingress = jwks_ingress(&prefix, &server.url, None).await;
    server.stop().await;

    let post_k1 = |id: &'static str| {
        let body = event(id);
        let ts = now();
        let headers = rsa_headers("key_1", sign_rsa(k1, ts, &body), ts, &body);
        let ingress = &ingress;
        async move { ingress.post_with(&headers, &body).await.status().as_u16() }
    };
    assert_eq!(post_k1("evt-known-1").await, 202);

    let body = event("evt-unknown");
    let ts = now();
    let started = Instant::now();
    let response = ingress
        .post_with(
            &rsa_headers("key_2", sign_rsa(k2, ts, &body), ts, &body),
            &body,
        )
        .await;
    assert_eq!(error_code(response).await, (401, "unknown_key".to_owned()));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    assert_eq!(
        post_k1("evt-known-2").await,
        202,
        "the last good key set is kept"
    );
    assert_eq!(ingress.readyz().await, 200);
    let text = ingress.metrics().await;
    assert_eq!(
        metric(
            &text,
            "avsync_ingress_jwks_fetches_total{outcome=\"failure\"}"
        ),
        1.0
    );
    assert_eq!(drain(&acme_queue(&prefix)).await.len(), 2);
    ingress.stop().await;
}

#[tokio::test]
async fn jwks_alone_is_not_ready_until_a_key_loads_and_hmac_key_ids_win_over_the_jwks() {
    let [k1, _] = keys();
    let prefix = support::unique("t");
    let _cleanup = TopologyCleanup::new(&prefix, 2);
    let server = JwksServer::start(vec![jwk("key_1", k1), jwk("k1", k1)]).await;
    server.failing.store(true, Ordering::SeqCst);

    let mut s = settings(&prefix, 2, "");
    s.hmac_secrets = None;
    s.jwks_url = Some(server.url.clone());
    let jwks_only = TestIngress::start_with(s, None).await;
    support::wait_until(
        "two failed JWKS fetches",
        Duration::from_secs(10),
        || async { (server.fetches() >= 2).then_some(()) },
    )
    .await;
    assert_eq!(jwks_only.readyz().await, 503, "no key loaded yet");
    server.failing.store(false, Ordering::SeqCst);
    jwks_only.wait_ready().await;
    jwks_only.stop().await;

    // With HMAC secrets too, the ingress is ready without the JWKS, and a key id that names a
    // configured secret is checked as HMAC even when the JWKS has a key of that id.
    server.failing.store(true, Ordering::SeqCst);
    let mut s = settings(
        &prefix,
        2,
        &format!("{},k1=av-secret-one", new_whsec_secret()),
    );
    s.jwks_url = Some(server.url.clone());
    let both = TestIngress::start_with(s, None).await;
    both.wait_ready().await;
    let body = event("evt-hmac");
    let ts = now();
    let hmac_headers = vec![
        ("X-AuthVital-Timestamp", ts.to_string()),
        (
            "X-AuthVital-Signature",
            sign_authvital_hmac(b"av-secret-one", ts, &body),
        ),
        ("X-AuthVital-Key-Id", "k1".to_owned()),
    ];
    assert_eq!(
        both.post_with(&hmac_headers, &body).await.status().as_u16(),
        202
    );
    let rsa_as_k1 = rsa_headers("k1", sign_rsa(k1, ts, &body), ts, &body);
    let response = both.post_with(&rsa_as_k1, &body).await;
    assert_eq!(
        error_code(response).await,
        (401, "bad_signature".to_owned())
    );
    both.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn the_fixture_rsa_cases_come_out_as_they_say() {
    let fixture: Value = serde_json::from_str(FIXTURE).unwrap();
    let prefix = support::unique("t");
    let _cleanup = TopologyCleanup::new(&prefix, 2);
    let keys: Vec<Value> = fixture["jwks"]["keys"].as_array().unwrap().clone();
    let server = JwksServer::start(keys).await;
    let ingress = jwks_ingress(&prefix, &server.url, fixture["now_unix"].as_i64()).await;

    let mut valid = 0;
    for case in fixture["cases"].as_array().unwrap() {
        if case["scheme"] != "authvital-rsa" {
            continue;
        }
        let headers: Vec<(&str, String)> = case["headers"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str().unwrap().to_owned()))
            .collect();
        let name = case["name"].as_str().unwrap();
        let response = ingress
            .post_with(&headers, case["body"].as_str().unwrap().as_bytes())
            .await;
        if case["expect"] == "valid" {
            assert_eq!(response.status().as_u16(), 202, "{name}");
            valid += 1;
        } else {
            assert_eq!(response.status().as_u16(), 401, "{name}");
        }
    }
    assert_eq!(valid, 2);
    assert_eq!(drain(&acme_queue(&prefix)).await.len(), valid);
    ingress.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn the_references_worked_example_verifies_byte_for_byte() {
    let body: &[u8] = br#"{"id":"3f6c2a9e-8d41-4b7a-9c3e-2f1d5a7b8c90","data":{"sub":"usr_7d2f","email":"jane@acme.test","given_name":"Jane","family_name":"Doe","subject_type":"user"},"type":"subject.created","tenant_id":"tnt_acme","timestamp":"2026-08-21T01:40:03.512Z","application_id":"app_crm"}"#;
    let ts: i64 = 1_787_276_405;
    assert_eq!(body.len(), 272);
    let mut input = format!("{ts}.").into_bytes();
    input.extend_from_slice(body);
    assert_eq!(input.len(), 283);
    let digest: String = Sha256::digest(&input)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        digest,
        "2f2f13c803c2f9600ab56abc624ff16d9217f1c7bd632339e3b9e45c68487957"
    );

    let [k1, _] = keys();
    let kid = "key_1787276000000_0badc0de";
    let prefix = support::unique("t");
    let _cleanup = TopologyCleanup::new(&prefix, 2);
    let server = JwksServer::start(vec![jwk(kid, k1)]).await;
    let ingress = jwks_ingress(&prefix, &server.url, Some(ts)).await;
    let response = ingress
        .post_with(&rsa_headers(kid, sign_rsa(k1, ts, body), ts, body), body)
        .await;
    assert_eq!(response.status().as_u16(), 202);
    let got = drain(&acme_queue(&prefix)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].data, body, "published byte for byte");
    ingress.stop().await;
    server.stop().await;
}

/// AuthVital revokes a key by removing it from its JWKS: with a 1 s refresh interval, a key
/// taken out of the set stops verifying within that interval (plus a margin for the fetch),
/// without any unknown key id to trigger a refetch, and stays refused.
#[tokio::test]
async fn a_key_removed_from_the_jwks_stops_verifying_within_one_refresh_interval() {
    const REFRESH: Duration = Duration::from_secs(1);
    let [k1, k2] = keys();
    let prefix = support::unique("t");
    let _cleanup = TopologyCleanup::new(&prefix, 2);
    let server = JwksServer::start(vec![jwk("key_1", k1), jwk("key_2", k2)]).await;
    let ingress = jwks_ingress_refreshing(&prefix, &server.url, None, REFRESH).await;
    let post = |kid: &'static str, key: &'static RsaPrivateKey, id: String| {
        let ingress = &ingress;
        async move {
            let body = event(&id);
            let ts = now();
            let response = ingress
                .post_with(
                    &rsa_headers(kid, sign_rsa(key, ts, &body), ts, &body),
                    &body,
                )
                .await;
            error_code_or_accepted(response).await
        }
    };
    assert_eq!(
        post("key_2", k2, "evt-before".into()).await,
        (202, String::new())
    );

    server.keys.lock().unwrap().retain(|k| k["kid"] != "key_2");
    let removed = Instant::now();
    let mut accepted_after_removal = 0;
    let mut probe = 0;
    let refused_at = loop {
        probe += 1;
        match post("key_2", k2, format!("evt-probe-{probe}")).await {
            (202, _) => accepted_after_removal += 1,
            (401, code) => {
                assert_eq!(code, "unknown_key");
                break removed.elapsed();
            }
            other => panic!("unexpected answer {other:?}"),
        }
        assert!(
            removed.elapsed() < REFRESH * 5,
            "key_2 still verifies {:?} after its removal",
            removed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        refused_at < REFRESH + Duration::from_secs(2),
        "refused only after {refused_at:?}"
    );
    assert_eq!(
        post("key_2", k2, "evt-after".into()).await,
        (401, "unknown_key".to_owned()),
        "a removed key stays refused"
    );
    assert_eq!(
        post("key_1", k1, "evt-kept".into()).await,
        (202, String::new())
    );
    assert_eq!(
        drain(&acme_queue(&prefix)).await.len(),
        2 + accepted_after_removal,
        "exactly the accepted events are queued"
    );
    ingress.stop().await;
    server.stop().await;
}

/// Periodic refreshes that fail (the JWKS answers 500) keep the last good set: known keys go on
/// verifying through several failed refreshes, and the ingress stays ready.
#[tokio::test]
async fn failed_periodic_refreshes_keep_the_last_good_key_set() {
    let [k1, _] = keys();
    let prefix = support::unique("t");
    let _cleanup = TopologyCleanup::new(&prefix, 2);
    let server = JwksServer::start(vec![jwk("key_1", k1)]).await;
    let ingress =
        jwks_ingress_refreshing(&prefix, &server.url, None, Duration::from_millis(300)).await;
    server.failing.store(true, Ordering::SeqCst);
    support::wait_until(
        "three failed refreshes",
        Duration::from_secs(10),
        || async {
            let text = ingress.metrics().await;
            (metric(
                &text,
                "avsync_ingress_jwks_fetches_total{outcome=\"failure\"}",
            ) >= 3.0)
                .then_some(())
        },
    )
    .await;
    let body = event("evt-outage");
    let ts = now();
    let response = ingress
        .post_with(
            &rsa_headers("key_1", sign_rsa(k1, ts, &body), ts, &body),
            &body,
        )
        .await;
    assert_eq!(response.status().as_u16(), 202);
    assert_eq!(ingress.readyz().await, 200);
    assert_eq!(drain(&acme_queue(&prefix)).await.len(), 1);
    ingress.stop().await;
    server.stop().await;
}

/// AuthVital signs its JWTs with the same JWKS keys, RS256 over `<header>.<payload>`. Anyone
/// holding such a JWT could paste its header in as `X-AuthVital-Timestamp` and its payload as
/// the body: the signature is genuine over exactly the bytes the verifier would check. Only the
/// rule that a timestamp is `^[0-9]{1,11}$` stops it: 401, nothing published.
#[tokio::test]
async fn a_jwt_pasted_in_as_timestamp_and_body_is_401_and_publishes_nothing() {
    use rsa::pkcs1v15::{Signature, VerifyingKey};
    use rsa::signature::Verifier as _;
    let [k1, _] = keys();
    let prefix = support::unique("t");
    let _cleanup = TopologyCleanup::new(&prefix, 2);
    let server = JwksServer::start(vec![jwk("key_1", k1)]).await;
    let ingress = jwks_ingress(&prefix, &server.url, None).await;

    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT","kid":"key_1"}"#);
    let payload = URL_SAFE_NO_PAD.encode(
        json!({
            "iss": "https://auth.example.com", "sub": "usr_attacker", "aud": "app_crm",
            "tenant_id": "tnt_acme", "iat": now(), "exp": now() + 3600,
        })
        .to_string(),
    );
    let signing_input = format!("{header}.{payload}");
    let jwt_signature = SigningKey::<Sha256>::new(k1.clone()).sign(signing_input.as_bytes());
    VerifyingKey::<Sha256>::new(k1.to_public_key())
        .verify(
            signing_input.as_bytes(),
            &Signature::try_from(jwt_signature.to_vec().as_slice()).unwrap(),
        )
        .expect("the JWT's signature is genuine over `<header>.<payload>`");

    let forged = [
        ("X-AuthVital-Timestamp", header.clone()),
        (
            "X-AuthVital-Signature",
            STANDARD.encode(jwt_signature.to_vec()),
        ),
        ("X-AuthVital-Key-Id", "key_1".to_owned()),
    ];
    let response = ingress.post_with(&forged, payload.as_bytes()).await;
    assert_eq!(
        error_code(response).await,
        (401, "malformed_signature".to_owned())
    );
    let text = ingress.metrics().await;
    assert_eq!(
        metric(
            &text,
            "avsync_ingress_signature_failures_total{reason=\"malformed\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "avsync_ingress_signature_failures_total{reason=\"mismatch\"}"
        ),
        0.0,
        "refused before any signature work"
    );
    assert!(drain(&acme_queue(&prefix)).await.is_empty());
    ingress.stop().await;
    server.stop().await;
}

/// The status and, for a refusal, its error code.
async fn error_code_or_accepted(response: reqwest::Response) -> (u16, String) {
    if response.status().as_u16() == 202 {
        return (202, String::new());
    }
    error_code(response).await
}
