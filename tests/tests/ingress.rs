//! The ingress against the real RabbitMQ: what is accepted lands byte for byte in its tenant's
//! partition; what is refused gets its status and JSON body and publishes nothing; the broker
//! can go away and come back.

use avsync_shared::{TenantId, Topology};
use avsync_tests::ingress_harness::{
    new_whsec_secret, settings, sign_authvital_hmac, sign_standard, TestIngress,
};
use avsync_tests::support::{self, TcpProxy, TopologyCleanup};
use futures_util::future::join_all;
use lapin::message::Delivery;
use lapin::options::{BasicGetOptions, QueueDeleteOptions};
use lapin::types::AMQPValue;
use lapin::Channel;
use serde_json::Value;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

type Headers = Vec<(&'static str, String)>;

fn event(id: &str, tenant: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"{id}","data":{{"sub":"usr_1","email":"jane@acme.test"}},"type":"subject.created","tenant_id":"{tenant}","timestamp":"2026-08-21T01:40:03.512Z","application_id":"app_crm"}}"#
    )
    .into_bytes()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn standard_headers(secret: &str, ts: i64, body: &[u8]) -> Headers {
    let id = uuid::Uuid::new_v4().to_string();
    let signature = sign_standard(secret, &id, ts, body);
    vec![
        ("webhook-id", id),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", signature),
    ]
}

fn authvital_headers(
    key_id: Option<&str>,
    secret: &[u8],
    ts: i64,
    body: &[u8],
) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        ("X-AuthVital-Timestamp", ts.to_string()),
        (
            "X-AuthVital-Signature",
            sign_authvital_hmac(secret, ts, body),
        ),
    ];
    if let Some(kid) = key_id {
        headers.push(("X-AuthVital-Key-Id", kid.to_owned()));
    }
    headers
}

/// Two tenant ids that hash to different partitions of `topology`.
fn tenants_apart(topology: &Topology) -> (String, String) {
    let first = "tnt_acme".to_owned();
    let p = topology.partition_of(&TenantId::parse(&first).unwrap());
    let second = (0..)
        .map(|i| format!("tnt_{i}"))
        .find(|t| topology.partition_of(&TenantId::parse(t).unwrap()) != p)
        .unwrap();
    (first, second)
}

fn partition_queue(topology: &Topology, tenant: &str) -> String {
    topology.partition_queue(topology.partition_of(&TenantId::parse(tenant).unwrap()))
}

/// Takes every message from a queue.
async fn drain(ch: &Channel, queue: &str) -> Vec<Delivery> {
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

async fn depths(ch: &Channel, topology: &Topology) -> Vec<u32> {
    let mut out = Vec::new();
    for p in 0..topology.partitions() {
        out.push(
            support::queue_depth(ch, &topology.partition_queue(p))
                .await
                .unwrap_or(0),
        );
    }
    out
}

async fn total_depth(ch: &Channel, topology: &Topology) -> u32 {
    depths(ch, topology).await.iter().sum()
}

fn header_text(delivery: &Delivery, name: &str) -> String {
    let headers = delivery.properties.headers().as_ref().expect("headers");
    match headers.inner().get(name) {
        Some(AMQPValue::LongString(s)) => String::from_utf8(s.as_bytes().to_vec()).unwrap(),
        other => panic!("header {name}: {other:?}"),
    }
}

async fn json_error(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(
        content_type.as_deref(),
        Some("application/json"),
        "{status}"
    );
    let body: Value = response.json().await.expect("JSON error body");
    let message = body["message"].as_str().expect("message");
    assert!(!message.is_empty());
    (
        status,
        body["error"].as_str().expect("error code").to_owned(),
    )
}

/// POSTs `body` with `Transfer-Encoding: chunked` (no Content-Length) over a plain socket;
/// returns the status and the response body.
async fn post_chunked(base_url: &str, body: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base_url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "POST /webhooks/authvital HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in body.chunks(1000) {
        request.extend(format!("{:x}\r\n", chunk.len()).into_bytes());
        request.extend(chunk);
        request.extend(b"\r\n");
    }
    request.extend(b"0\r\n\r\n");
    // The ingress may answer and close before it has read everything; that is the point.
    let _ = stream.write_all(&request).await;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn valid_events_land_byte_for_byte_in_their_tenants_partition() {
    let prefix = support::unique("t");
    let _cleanup = TopologyCleanup::new(&prefix, 8);
    let whsec = new_whsec_secret();
    let ingress = TestIngress::start_with(
        settings(&prefix, 8, &format!("{whsec},k1=av-secret-one")),
        None,
    )
    .await;
    ingress.wait_ready().await;
    let topology = Topology::new(&prefix, 8).unwrap();
    let (tenant_a, tenant_b) = tenants_apart(&topology);
    let (_conn, ch) = support::channel().await;

    let standard = event("evt-standard", &tenant_a);
    let response = ingress
        .post_with(&standard_headers(&whsec, now(), &standard), &standard)
        .await;
    assert_eq!(response.status().as_u16(), 202);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"id": "evt-standard", "status": "queued"})
    );

    let authvital = event("evt-authvital", &tenant_b);
    let response = ingress
        .post_with(
            &authvital_headers(Some("k1"), b"av-secret-one", now(), &authvital),
            &authvital,
        )
        .await;
    assert_eq!(response.status().as_u16(), 202);

    let queue_a = partition_queue(&topology, &tenant_a);
    let queue_b = partition_queue(&topology, &tenant_b);
    assert_ne!(queue_a, queue_b);
    let got_a = drain(&ch, &queue_a).await;
    let got_b = drain(&ch, &queue_b).await;
    assert_eq!(got_a.len(), 1);
    assert_eq!(got_b.len(), 1);
    for (delivery, body, id, tenant) in [
        (&got_a[0], &standard, "evt-standard", &tenant_a),
        (&got_b[0], &authvital, "evt-authvital", &tenant_b),
    ] {
        assert_eq!(&delivery.data, body, "body byte for byte");
        assert_eq!(
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str()),
            Some(id)
        );
        assert_eq!(*delivery.properties.delivery_mode(), Some(2), "persistent");
        assert_eq!(header_text(delivery, "x-avsync-tenant-id"), *tenant);
        assert_eq!(
            header_text(delivery, "x-avsync-event-type"),
            "subject.created"
        );
    }
    assert_eq!(
        total_depth(&ch, &topology).await,
        0,
        "nothing else published"
    );

    let text = ingress.metrics().await;
    assert_eq!(
        metric(&text, "avsync_ingress_requests_total{outcome=\"accepted\"}"),
        2.0
    );
    assert_eq!(metric(&text, "avsync_ingress_publish_seconds_count"), 2.0);
    assert_eq!(metric(&text, "avsync_ingress_ready"), 1.0);
    ingress.stop().await;
}

#[tokio::test]
async fn every_bad_input_is_refused_with_a_json_error_and_nothing_is_published() {
    let prefix = support::unique("t");
    let _cleanup = TopologyCleanup::new(&prefix, 4);
    let whsec = new_whsec_secret();
    let mut s = settings(&prefix, 4, &format!("{whsec},k1=av-secret-one"));
    s.max_body_bytes = 4096;
    let ingress = TestIngress::start_with(s, None).await;
    ingress.wait_ready().await;
    let topology = Topology::new(&prefix, 4).unwrap();
    let good = event("evt-1", "tnt_acme");
    let ts = now();

    let mut changed = good.clone();
    changed[10] ^= 0x01;
    let other_secret = new_whsec_secret();
    let mut cases: Vec<(&str, Headers, Vec<u8>, u16, &str)> = vec![
        (
            "no signature",
            vec![],
            good.clone(),
            401,
            "missing_signature",
        ),
        (
            "wrong signature",
            vec![
                ("webhook-id", "m1".into()),
                ("webhook-timestamp", ts.to_string()),
                (
                    "webhook-signature",
                    "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
                ),
            ],
            good.clone(),
            401,
            "bad_signature",
        ),
        (
            "wrong secret",
            standard_headers(&other_secret, ts, &good),
            good.clone(),
            401,
            "bad_signature",
        ),
        (
            "wrong authvital secret",
            authvital_headers(Some("k1"), b"not-the-secret", ts, &good),
            good.clone(),
            401,
            "bad_signature",
        ),
        (
            "unknown key id",
            authvital_headers(Some("k9"), b"av-secret-one", ts, &good),
            good.clone(),
            401,
            "unknown_key",
        ),
        (
            "timestamp too old",
            standard_headers(&whsec, ts - 400, &good),
            good.clone(),
            401,
            "stale_timestamp",
        ),
        (
            "timestamp too far ahead",
            authvital_headers(Some("k1"), b"av-secret-one", ts + 400, &good),
            good.clone(),
            401,
            "stale_timestamp",
        ),
        (
            "body changed by one byte",
            standard_headers(&whsec, ts, &good),
            changed,
            401,
            "bad_signature",
        ),
        (
            "signature checked before content",
            vec![],
            b"not json".to_vec(),
            401,
            "missing_signature",
        ),
    ];
    let bodies: Vec<(&str, String, &str)> = vec![
        ("non-JSON", "not json".into(), "invalid_json"),
        ("JSON array", r#"[{"id":"1"}]"#.into(), "not_an_object"),
        (
            "duplicate key",
            r#"{"id":"1","id":"2","type":"a","timestamp":"t","tenant_id":"x"}"#.into(),
            "invalid_json",
        ),
        (
            "missing id",
            r#"{"type":"a","timestamp":"t","tenant_id":"x"}"#.into(),
            "missing_field",
        ),
        (
            "non-string id",
            r#"{"id":7,"type":"a","timestamp":"t","tenant_id":"x"}"#.into(),
            "missing_field",
        ),
        (
            "missing type",
            r#"{"id":"1","timestamp":"t","tenant_id":"x"}"#.into(),
            "missing_field",
        ),
        (
            "non-string type",
            r#"{"id":"1","type":["a"],"timestamp":"t","tenant_id":"x"}"#.into(),
            "missing_field",
        ),
        (
            "missing timestamp",
            r#"{"id":"1","type":"a","tenant_id":"x"}"#.into(),
            "missing_field",
        ),
        (
            "non-string timestamp",
            r#"{"id":"1","type":"a","timestamp":1790000000,"tenant_id":"x"}"#.into(),
            "missing_field",
        ),
        (
            "missing tenant_id",
            r#"{"id":"1","type":"a","timestamp":"t"}"#.into(),
            "missing_field",
        ),
        (
            "non-string tenant_id",
            r#"{"id":"1","type":"a","timestamp":"t","tenant_id":null}"#.into(),
            "missing_field",
        ),
        (
            "tenant ../x",
            String::from_utf8(event("1", "../x")).unwrap(),
            "invalid_tenant_id",
        ),
        (
            "tenant a b",
            String::from_utf8(event("1", "a b")).unwrap(),
            "invalid_tenant_id",
        ),
        (
            "tenant x;drop",
            String::from_utf8(event("1", "x;drop")).unwrap(),
            "invalid_tenant_id",
        ),
        (
            "tenant of 65",
            String::from_utf8(event("1", &"x".repeat(65))).unwrap(),
            "invalid_tenant_id",
        ),
        (
            "empty tenant",
            String::from_utf8(event("1", "")).unwrap(),
            "invalid_tenant_id",
        ),
    ];
    for (name, body, code) in bodies {
        let body = body.into_bytes();
        cases.push((name, standard_headers(&whsec, ts, &body), body, 400, code));
    }
    let big = {
        let mut b = event("evt-big", "tnt_acme");
        b.truncate(b.len() - 1);
        b.extend(format!(r#","pad":"{}"}}"#, "x".repeat(5000)).into_bytes());
        b
    };
    cases.push((
        "body over the limit",
        standard_headers(&whsec, ts, &big),
        big.clone(),
        413,
        "payload_too_large",
    ));
    cases.push((
        "size checked before signature",
        vec![],
        big.clone(),
        413,
        "payload_too_large",
    ));

    let mut expected = std::collections::HashMap::new();
    for (name, headers, body, status, code) in &cases {
        let response = ingress.post_with(headers, body).await;
        let (got_status, got_code) = json_error(response).await;
        assert_eq!((got_status, got_code.as_str()), (*status, *code), "{name}");
        *expected.entry(*status).or_insert(0.0) += 1.0;
    }

    // Without Content-Length the limit holds while reading, too.
    let (status, response_body) = post_chunked(&ingress.base_url, &big).await;
    assert_eq!(status, 413);
    let response_body: Value = serde_json::from_str(&response_body).unwrap();
    assert_eq!(response_body["error"], "payload_too_large");
    *expected.entry(413).or_insert(0.0) += 1.0;

    let (_conn, ch) = support::channel().await;
    assert_eq!(
        total_depth(&ch, &topology).await,
        0,
        "nothing refused is published"
    );

    let text = ingress.metrics().await;
    for (status, outcome) in [
        (401, "unauthorized"),
        (400, "bad_request"),
        (413, "payload_too_large"),
    ] {
        let series = format!("avsync_ingress_requests_total{{outcome=\"{outcome}\"}}");
        assert_eq!(metric(&text, &series), expected[&status], "{series}");
    }
    assert_eq!(
        metric(&text, "avsync_ingress_requests_total{outcome=\"accepted\"}"),
        0.0
    );
    assert_eq!(
        metric(
            &text,
            "avsync_ingress_signature_failures_total{reason=\"missing\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            "avsync_ingress_signature_failures_total{reason=\"mismatch\"}"
        ),
        4.0
    );
    assert_eq!(
        metric(
            &text,
            "avsync_ingress_signature_failures_total{reason=\"unknown_key\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "avsync_ingress_signature_failures_total{reason=\"stale\"}"
        ),
        2.0
    );
    assert!(
        !text.contains(&whsec["whsec_".len()..]),
        "no secret in metrics"
    );

    let response = ingress
        .client()
        .get(ingress.webhook_url())
        .send()
        .await
        .unwrap();
    assert_eq!(
        json_error(response).await,
        (405, "method_not_allowed".to_owned())
    );
    let response = ingress
        .client()
        .post(format!("{}/other", ingress.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(json_error(response).await, (404, "not_found".to_owned()));
    ingress.stop().await;
}

#[tokio::test]
async fn rotation_accepts_events_signed_with_either_secret() {
    let prefix = support::unique("t");
    let _cleanup = TopologyCleanup::new(&prefix, 2);
    let (old, new) = (new_whsec_secret(), new_whsec_secret());
    let ingress = TestIngress::start_with(
        settings(
            &prefix,
            2,
            &format!("{old},{new},k1=old-secret,k2=new-secret"),
        ),
        None,
    )
    .await;
    ingress.wait_ready().await;
    let topology = Topology::new(&prefix, 2).unwrap();
    let requests: Vec<(Vec<u8>, Headers)> = vec![
        (
            event("r1", "tnt_a"),
            standard_headers(&old, now(), &event("r1", "tnt_a")),
        ),
        (
            event("r2", "tnt_a"),
            standard_headers(&new, now(), &event("r2", "tnt_a")),
        ),
        (
            event("r3", "tnt_a"),
            authvital_headers(Some("k1"), b"old-secret", now(), &event("r3", "tnt_a")),
        ),
        (
            event("r4", "tnt_a"),
            authvital_headers(Some("k2"), b"new-secret", now(), &event("r4", "tnt_a")),
        ),
        (
            event("r5", "tnt_a"),
            authvital_headers(None, b"new-secret", now(), &event("r5", "tnt_a")),
        ),
    ];
    for (body, headers) in &requests {
        let response = ingress.post_with(headers, body).await;
        assert_eq!(
            response.status().as_u16(),
            202,
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    let (_conn, ch) = support::channel().await;
    let got = drain(&ch, &partition_queue(&topology, "tnt_a")).await;
    let ids: Vec<_> = got
        .iter()
        .map(|d| d.properties.message_id().as_ref().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["r1", "r2", "r3", "r4", "r5"]);
    ingress.stop().await;
}

#[tokio::test]
async fn with_the_broker_down_it_serves_healthz_answers_503_and_is_not_ready() {
    let prefix = support::unique("t");
    let closed_port = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut s = settings(&prefix, 2, &new_whsec_secret());
    s.common.amqp_url = format!("amqp://guest:guest@127.0.0.1:{closed_port}/%2f");
    let secret = s.hmac_secrets.as_ref().unwrap().expose().to_owned();
    let ingress = TestIngress::start_with(s, None).await;

    let health = ingress
        .client()
        .get(format!("{}/healthz", ingress.metrics_url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    assert_eq!(ingress.readyz().await, 503);

    let body = event("evt-down", "tnt_acme");
    let response = ingress
        .post_with(&standard_headers(&secret, now(), &body), &body)
        .await;
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("5")
    );
    assert_eq!(
        json_error(response).await,
        (503, "broker_unavailable".to_owned())
    );
    let text = ingress.metrics().await;
    assert_eq!(
        metric(
            &text,
            "avsync_ingress_requests_total{outcome=\"unavailable\"}"
        ),
        1.0
    );
    assert_eq!(metric(&text, "avsync_ingress_ready"), 0.0);
    ingress.stop().await;
}

#[tokio::test]
async fn recovers_without_restart_when_the_broker_connection_comes_back() {
    let prefix = support::unique("t");
    let _cleanup = TopologyCleanup::new(&prefix, 2);
    let proxy = TcpProxy::start("127.0.0.1:5672").await;
    let secret = new_whsec_secret();
    let mut s = settings(&prefix, 2, &secret);
    s.common.amqp_url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    let ingress = TestIngress::start_with(s, None).await;
    ingress.wait_ready().await;
    let topology = Topology::new(&prefix, 2).unwrap();
    let post = |id: &'static str| {
        let body = event(id, "tnt_acme");
        let headers = standard_headers(&secret, now(), &body);
        let ingress = &ingress;
        async move { ingress.post_with(&headers, &body).await.status().as_u16() }
    };
    assert_eq!(post("before").await, 202);

    proxy.cut();
    support::wait_until(
        "readyz not 200 after the cut",
        Duration::from_secs(10),
        || async { (ingress.readyz().await != 200).then_some(()) },
    )
    .await;
    assert_eq!(post("during").await, 503);

    proxy.restore();
    ingress.wait_ready().await;
    assert_eq!(post("after").await, 202);

    let (_conn, ch) = support::channel().await;
    let got = drain(&ch, &partition_queue(&topology, "tnt_acme")).await;
    let ids: Vec<_> = got
        .iter()
        .map(|d| d.properties.message_id().as_ref().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["before", "after"]);
    ingress.stop().await;
}

/// The broker itself closes the ingress's connection (as on a node restart or an operator's
/// `close_connection`); the ingress notices and reconnects by itself.
#[tokio::test]
async fn reconnects_after_the_broker_closes_its_connection() {
    let prefix = support::unique("t");
    let _cleanup = TopologyCleanup::new(&prefix, 2);
    let ingress = TestIngress::start(&prefix, 2).await;
    let connection_name = format!("avsync-ingress@{prefix}");
    let pids = |name: String| async move {
        let out = tokio::process::Command::new("rabbitmqctl")
            .args(["-q", "list_connections", "pid", "client_properties"])
            .output()
            .await
            .expect("rabbitmqctl (installed with RabbitMQ) lists connections");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(&format!("\"{name}\"")))
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect::<Vec<_>>()
    };
    let pid = support::wait_until("the ingress's connection", Duration::from_secs(10), || {
        let name = connection_name.clone();
        async move { pids(name).await.into_iter().next() }
    })
    .await;
    let closed = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "close_connection", &pid, "test closes the connection"])
        .status()
        .await
        .unwrap();
    assert!(closed.success());

    support::wait_until("a new connection", Duration::from_secs(20), || {
        let name = connection_name.clone();
        let pid = pid.clone();
        async move { pids(name).await.into_iter().find(|p| *p != pid) }
    })
    .await;
    ingress.wait_ready().await;
    let response = ingress.post(&event("evt-after-close", "tnt_acme")).await;
    assert_eq!(response.status().as_u16(), 202);
    ingress.stop().await;
}

#[tokio::test]
async fn an_unroutable_publish_is_503_and_the_topology_is_declared_again() {
    let prefix = support::unique("t");
    let _cleanup = TopologyCleanup::new(&prefix, 2);
    let ingress = TestIngress::start(&prefix, 2).await;
    let topology = Topology::new(&prefix, 2).unwrap();
    let queue = partition_queue(&topology, "tnt_acme");
    let (_conn, ch) = support::channel().await;
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();

    let response = ingress.post(&event("evt-lost-queue", "tnt_acme")).await;
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(
        json_error(response).await,
        (503, "publish_rejected".to_owned())
    );
    support::wait_until(
        "the partition queue declared again",
        Duration::from_secs(10),
        // A passive declare of a missing queue closes its channel, so each look uses a new one.
        || {
            let queue = &queue;
            async move {
                let (conn, ch) = support::channel().await;
                let depth = support::queue_depth(&ch, queue).await;
                let _ = conn.close(200, "checked".into()).await;
                depth
            }
        },
    )
    .await;
    let response = ingress.post(&event("evt-lost-queue", "tnt_acme")).await;
    assert_eq!(response.status().as_u16(), 202);
    assert_eq!(drain(&ch, &queue).await.len(), 1);
    ingress.stop().await;
}

#[tokio::test]
async fn a_thousand_concurrent_requests_are_all_queued_exactly_once() {
    let prefix = support::unique("t");
    let _cleanup = TopologyCleanup::new(&prefix, 4);
    let ingress = TestIngress::start(&prefix, 4).await;
    let topology = Topology::new(&prefix, 4).unwrap();
    let requests = (0..1000).map(|i| {
        let body = event(&format!("evt-{i}"), &format!("tnt_{}", i % 37));
        let ingress = &ingress;
        async move { ingress.post(&body).await.status().as_u16() }
    });
    let statuses = join_all(requests).await;
    assert!(statuses.iter().all(|s| *s == 202), "{statuses:?}");

    let (_conn, ch) = support::channel().await;
    let total = support::wait_until(
        "1000 messages in the queues",
        Duration::from_secs(20),
        || {
            let ch = &ch;
            let topology = &topology;
            async move {
                let total = total_depth(ch, topology).await;
                (total >= 1000).then_some(total)
            }
        },
    )
    .await;
    assert_eq!(total, 1000);
    let mut ids = std::collections::HashSet::new();
    for p in 0..4 {
        for d in drain(&ch, &topology.partition_queue(p)).await {
            assert_eq!(
                header_text(&d, "x-avsync-tenant-id"),
                std::str::from_utf8(&d.data)
                    .unwrap()
                    .split("\"tenant_id\":\"")
                    .nth(1)
                    .unwrap()
                    .split('"')
                    .next()
                    .unwrap()
            );
            assert_eq!(
                topology.partition_queue(p),
                partition_queue(&topology, &header_text(&d, "x-avsync-tenant-id"))
            );
            ids.insert(d.properties.message_id().as_ref().unwrap().to_string());
        }
    }
    assert_eq!(ids.len(), 1000);
    ingress.stop().await;
}

#[tokio::test]
async fn graceful_stop_answers_every_request_it_took() {
    let prefix = support::unique("t");
    let _cleanup = TopologyCleanup::new(&prefix, 2);
    let ingress = TestIngress::start(&prefix, 2).await;
    let topology = Topology::new(&prefix, 2).unwrap();
    let sent: Vec<_> = (0..200)
        .map(|i| {
            let client = ingress.client().clone();
            let url = ingress.webhook_url();
            let secret = ingress.secret.clone();
            tokio::spawn(async move {
                let body = event(&format!("evt-{i}"), "tnt_acme");
                let mut request = client.post(url).body(body.clone());
                for (name, value) in standard_headers(&secret, now(), &body) {
                    request = request.header(name, value);
                }
                request.send().await.map(|r| r.status().as_u16())
            })
        })
        .collect();
    support::wait_until(
        "some requests accepted",
        Duration::from_secs(10),
        || async {
            let text = ingress.metrics().await;
            (metric(&text, "avsync_ingress_requests_total{outcome=\"accepted\"}") >= 1.0)
                .then_some(())
        },
    )
    .await;
    let stopper = tokio::spawn(ingress.stop());
    let mut accepted = 0;
    for handle in sent {
        // Requests that reached the ingress get an answer; later ones find the listener closed.
        if let Ok(status) = handle.await.unwrap() {
            assert!(status == 202 || status == 503, "{status}");
            if status == 202 {
                accepted += 1;
            }
        }
    }
    stopper.await.unwrap();
    let (_conn, ch) = support::channel().await;
    assert_eq!(
        total_depth(&ch, &topology).await,
        accepted,
        "every 202 is in the queue"
    );
}

/// A TCP proxy to the broker that can hold every byte (connections stay open, nothing moves), as
/// a broker that has slowed to a halt looks to the ingress.
struct StallingProxy {
    port: u16,
    held: tokio::sync::watch::Sender<bool>,
    stop: tokio_util::sync::CancellationToken,
}

impl StallingProxy {
    async fn start(target: &'static str) -> StallingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (held, _) = tokio::sync::watch::channel(false);
        let stop = tokio_util::sync::CancellationToken::new();
        let (gate, done) = (held.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = done.cancelled() => return,
                    accepted = listener.accept() => accepted.unwrap(),
                };
                let Ok(upstream) = TcpStream::connect(target).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (upstream_read, upstream_write) = upstream.into_split();
                for (from, to) in [
                    (
                        Box::new(client_read) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(upstream_write) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    ),
                    (Box::new(upstream_read), Box::new(client_write)),
                ] {
                    let gate = gate.subscribe();
                    let done = done.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = done.cancelled() => {}
                            _ = forward(from, to, gate) => {}
                        }
                    });
                }
            }
        });
        StallingProxy { port, held, stop }
    }

    fn hold(&self, held: bool) {
        self.held.send_replace(held);
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn forward(
    mut from: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    mut to: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    mut gate: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if gate.wait_for(|held| !*held).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// With the broker stalled, at most `AVSYNC_MAX_PENDING_PUBLISHES` (4 here) webhooks wait for a
/// confirm; every one beyond is answered at once with 503 `overloaded` and `Retry-After: 5`, and
/// never published. Once the broker moves again, the waiting ones get their answer and new
/// webhooks are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_pending_publish_bound_a_stalled_broker_gets_503_overloaded_at_once() {
    const BOUND: usize = 4;
    let prefix = support::unique("t");
    let _cleanup = TopologyCleanup::new(&prefix, 2);
    let topology = Topology::new(&prefix, 2).unwrap();
    let proxy = StallingProxy::start("127.0.0.1:5672").await;
    let mut s = settings(&prefix, 2, &new_whsec_secret());
    s.common.amqp_url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port);
    s.max_pending_publishes = BOUND;
    s.publish_timeout = Duration::from_secs(5);
    let secret = s.hmac_secrets.as_ref().unwrap().expose().to_owned();
    let ingress = std::sync::Arc::new(TestIngress::start_with(s, None).await);
    ingress.wait_ready().await;

    proxy.hold(true);
    let waiting: Vec<_> = (0..BOUND)
        .map(|i| {
            let ingress = ingress.clone();
            let secret = secret.clone();
            tokio::spawn(async move {
                let body = event(&format!("evt-waiting-{i}"), "tnt_acme");
                let headers = standard_headers(&secret, now(), &body);
                ingress.post_with(&headers, &body).await.status().as_u16()
            })
        })
        .collect();
    support::wait_until(
        "every slot waiting for a confirm",
        Duration::from_secs(5),
        || async {
            let text = ingress.metrics().await;
            (metric(&text, "avsync_ingress_pending_publishes") == BOUND as f64).then_some(())
        },
    )
    .await;
    for i in 0..3 {
        let body = event(&format!("evt-overloaded-{i}"), "tnt_acme");
        let started = std::time::Instant::now();
        let response = ingress
            .post_with(&standard_headers(&secret, now(), &body), &body)
            .await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap()),
            Some("5")
        );
        assert_eq!(json_error(response).await, (503, "overloaded".to_owned()));
    }
    proxy.hold(false);
    for task in waiting {
        let status = task.await.unwrap();
        assert!(status == 202 || status == 503, "{status}");
    }
    let body = event("evt-after", "tnt_acme");
    let response = ingress
        .post_with(&standard_headers(&secret, now(), &body), &body)
        .await;
    assert_eq!(response.status().as_u16(), 202, "the bound is free again");

    let (_conn, ch) = support::channel().await;
    let mut ids = Vec::new();
    for p in 0..2 {
        for d in drain(&ch, &topology.partition_queue(p)).await {
            ids.push(d.properties.message_id().as_ref().unwrap().to_string());
        }
    }
    assert!(ids.contains(&"evt-after".to_owned()), "{ids:?}");
    assert!(
        ids.iter().all(|id| !id.starts_with("evt-overloaded")),
        "nothing refused is published: {ids:?}"
    );
    let text = ingress.metrics().await;
    assert_eq!(metric(&text, "avsync_ingress_pending_publishes"), 0.0);
    match std::sync::Arc::try_unwrap(ingress) {
        Ok(ingress) => ingress.stop().await,
        Err(_) => panic!("every request task has ended"),
    }
}
