//! Hostile input against the real ingress and RabbitMQ: header injection, repeated signature
//! headers, huge headers, invalid UTF-8, deep nesting, wrong JSON types, oversized and slow
//! bodies, slow and stalled headers, more connections than the bound (the one that has waited
//! longest for its head makes room), 5,000 stalled connections at the default bounds, and a flood
//! of forged signatures. Every refusal gets its status (and its JSON error
//! code where the ingress, not the HTTP stack, answers), and nothing refused is ever published.
//!
//! Requests the HTTP client refuses to send (CR/LF in a header, conflicting lengths, bodies
//! that never finish) go over a plain `TcpStream`.

use avsync_ingress::http::BODY_READ_TIMEOUT;
use avsync_ingress::settings::Settings;
use avsync_ingress::Tuning;
use avsync_shared::Topology;
use avsync_tests::ingress_harness::{
    new_whsec_secret, settings, sign_authvital_hmac, sign_standard, TestIngress,
};
use avsync_tests::processes;
use avsync_tests::support::{self, TopologyCleanup};
use futures_util::stream::{self, StreamExt};
use lapin::options::BasicGetOptions;
use lapin::Channel;
use reqwest::header::{HeaderName, HeaderValue};
use serde_json::Value;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const PARTITIONS: u16 = 2;
const TENANT: &str = "tnt_acme";
const KEY_ID: &str = "k1";
const KEY_SECRET: &[u8] = b"av-secret-one";
/// Longest wait for any single answer; every refusal here should come far sooner.
const ANSWER_DEADLINE: Duration = Duration::from_secs(10);

/// Taken by the tests that open thousands of connections, so that they run one at a time: side
/// by side on a loaded 2-core machine, each would measure the other's flood.
static FLOODS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn event(id: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"{id}","data":{{"sub":"usr_1","email":"jane@acme.test"}},"type":"subject.created","tenant_id":"{TENANT}","timestamp":"2026-08-21T01:40:03.512Z","application_id":"app_crm"}}"#
    )
    .into_bytes()
}

/// A body with the given raw JSON text for each envelope field.
fn envelope(id: &str, event_type: &str, timestamp: &str, tenant: &str) -> Vec<u8> {
    format!(
        r#"{{"id":{id},"type":{event_type},"timestamp":{timestamp},"tenant_id":{tenant},"data":{{"sub":"usr_1"}}}}"#
    )
    .into_bytes()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

type Headers = Vec<(&'static str, Vec<u8>)>;

/// An HTTP client that waits at most [`ANSWER_DEADLINE`] for an answer.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(ANSWER_DEADLINE)
        .build()
        .expect("http client")
}
/// A status and, where the ingress wrote the body, its JSON error code.
type Refusal = (u16, Option<String>);

/// The real ingress, started as production starts it but with `tuning`, on its own topology
/// (deleted when dropped, also on panic), configured with a `whsec_` secret and `k1`.
struct Scene {
    ingress: TestIngress,
    /// `127.0.0.1:<port>` of the webhook listener, for raw TCP.
    addr: String,
    whsec: String,
    topology: Topology,
    client: reqwest::Client,
    _cleanup: TopologyCleanup,
}

impl Scene {
    async fn start() -> Scene {
        Self::start_tuned(Tuning::default(), |_| {}).await
    }

    async fn start_tuned(tuning: Tuning, adjust: impl FnOnce(&mut Settings)) -> Scene {
        let prefix = support::unique("t");
        let cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
        let whsec = new_whsec_secret();
        let key = String::from_utf8(KEY_SECRET.to_vec()).expect("text secret");
        let mut s = settings(&prefix, PARTITIONS, &format!("{whsec},{KEY_ID}={key}"));
        adjust(&mut s);
        let ingress = TestIngress::start_tuned(s, tuning).await;
        ingress.wait_ready().await;
        Scene {
            addr: ingress
                .base_url
                .strip_prefix("http://")
                .expect("an http base URL")
                .to_owned(),
            ingress,
            whsec,
            topology: Topology::new(&prefix, PARTITIONS).expect("topology"),
            client: client(),
            _cleanup: cleanup,
        }
    }

    fn webhook_url(&self) -> String {
        format!("http://{}/webhooks/authvital", self.addr)
    }

    /// Standard Webhooks headers that sign `body` correctly, timestamp now.
    fn standard(&self, body: &[u8]) -> Headers {
        let id = uuid::Uuid::new_v4().to_string();
        let ts = now();
        vec![
            ("webhook-id", id.clone().into_bytes()),
            ("webhook-timestamp", ts.to_string().into_bytes()),
            (
                "webhook-signature",
                sign_standard(&self.whsec, &id, ts, body).into_bytes(),
            ),
        ]
    }

    /// AuthVital headers that sign `body` correctly under `k1`, timestamp now.
    fn authvital(&self, body: &[u8]) -> Headers {
        let ts = now();
        vec![
            ("x-authvital-timestamp", ts.to_string().into_bytes()),
            (
                "x-authvital-signature",
                sign_authvital_hmac(KEY_SECRET, ts, body).into_bytes(),
            ),
            ("x-authvital-key-id", KEY_ID.as_bytes().to_vec()),
        ]
    }

    /// POSTs with exactly these headers, each appended (so a name may repeat), plus
    /// `Content-Type: application/json`.
    async fn post(&self, headers: &[(&str, Vec<u8>)], body: &[u8]) -> Answer {
        let mut request = self
            .client
            .post(self.webhook_url())
            .header("content-type", "application/json")
            .body(body.to_vec());
        for (name, value) in headers {
            request = request.header(
                HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                HeaderValue::from_bytes(value).expect("the client sends this value"),
            );
        }
        let response = request.send().await.expect("POST /webhooks/authvital");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = response.bytes().await.expect("response body").to_vec();
        Answer {
            status,
            content_type,
            body,
            closed: false,
        }
    }

    /// Every message in the partition queues and the dead-letter queue.
    async fn published(&self, ch: &Channel) -> u32 {
        let mut total = support::queue_depth(ch, &self.topology.dead_queue())
            .await
            .unwrap_or(0);
        for p in 0..self.topology.partitions() {
            total += support::queue_depth(ch, &self.topology.partition_queue(p))
                .await
                .unwrap_or(0);
        }
        total
    }

    async fn assert_nothing_published(&self, what: &str) {
        let (conn, ch) = support::channel().await;
        assert_eq!(self.published(&ch).await, 0, "{what}: nothing is published");
        let _ = conn.close(200, "checked".into()).await;
    }

    /// The ids of every message in the partition queues, taken off them.
    async fn drain_ids(&self) -> Vec<String> {
        let (conn, ch) = support::channel().await;
        let mut ids = Vec::new();
        for p in 0..self.topology.partitions() {
            let queue = self.topology.partition_queue(p);
            while let Some(m) = ch
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .expect("basic.get")
            {
                let id = m.delivery.properties.message_id().as_ref();
                ids.push(id.map(|i| i.to_string()).unwrap_or_default());
            }
        }
        let _ = conn.close(200, "drained".into()).await;
        ids
    }

    async fn metric(&self, series: &str) -> f64 {
        let text = self.ingress.metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no series {series}"))
            .trim()
            .parse()
            .expect("a number")
    }

    async fn stop(self) {
        self.ingress.stop().await;
    }
}

/// One HTTP answer, however it was sent.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: Option<String>,
    body: Vec<u8>,
    /// The server closed the connection after answering (raw requests only).
    closed: bool,
}

impl Answer {
    /// The status and, when the ingress wrote the body, its JSON error code. The HTTP stack's
    /// own refusals (malformed requests) have an empty body, so no code.
    fn refusal(&self) -> Refusal {
        if self.body.is_empty() {
            return (self.status, None);
        }
        assert_eq!(
            self.content_type.as_deref(),
            Some("application/json"),
            "{self:?}"
        );
        let body: Value = serde_json::from_slice(&self.body).expect("a JSON error body");
        let message = body["message"].as_str().expect("a message");
        assert!(!message.is_empty());
        let code = body["error"].as_str().expect("an error code").to_owned();
        (self.status, Some(code))
    }
}

fn refused(status: u16, code: &str) -> Refusal {
    (status, Some(code.to_owned()))
}

/// A request head for `POST /webhooks/authvital`: `framing` is the Content-Length or
/// Transfer-Encoding line(s); `extra` is raw header bytes, each line ending in CRLF.
fn head(framing: &str, extra: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "POST /webhooks/authvital HTTP/1.1\r\nHost: ingress\r\nContent-Type: application/json\r\n{framing}"
    )
    .into_bytes();
    out.extend_from_slice(extra);
    out.extend_from_slice(b"\r\n");
    out
}

/// `headers` as raw header lines.
fn lines(headers: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A whole request with a correct Content-Length.
fn request(extra: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = head(&format!("Content-Length: {}\r\n", body.len()), extra);
    out.extend_from_slice(body);
    out
}

/// Reads one HTTP/1.1 response with a Content-Length body; None when the connection closed
/// before a whole response arrived.
async fn read_response(stream: &mut (impl AsyncRead + Unpin)) -> Option<Answer> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    };
    let length: usize = header("content-length")?.parse().ok()?;
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    body.truncate(length);
    Some(Answer {
        status,
        content_type: header("content-type"),
        body,
        closed: header("connection").as_deref() == Some("close"),
    })
}

/// True when the peer closes (or resets) the connection within the deadline.
async fn closed_by_peer(stream: &mut (impl AsyncRead + Unpin)) -> bool {
    let mut sink = [0u8; 1024];
    let deadline = Instant::now() + ANSWER_DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut sink)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// Sends raw bytes on a new connection and reads the answer; the connection stays open for
/// the caller to look at.
async fn exchange(addr: &str, bytes: &[u8]) -> (Answer, TcpStream) {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to the ingress");
    // The server may answer and close before it has read everything; that is allowed.
    let _ = stream.write_all(bytes).await;
    let answer = tokio::time::timeout(ANSWER_DEADLINE, read_response(&mut stream))
        .await
        .expect("an answer within the deadline")
        .expect("a whole HTTP response");
    (answer, stream)
}

#[tokio::test]
async fn header_injection_is_refused_by_the_parser_or_by_the_signature_check() {
    let scene = Scene::start().await;
    let body = event("evt-injected");
    let genuine = lines(&scene.standard(&body));
    let with = |injected: &[u8]| [genuine.as_slice(), injected].concat();
    let ts = now();
    // A complete, correctly signed request hidden inside another request's body.
    let smuggled = {
        let inner = event("evt-smuggled");
        request(&lines(&scene.standard(&inner)), &inner)
    };
    let mut smuggling_body = b"0\r\n\r\n".to_vec();
    smuggling_body.extend_from_slice(&smuggled);

    let cases: Vec<(&str, Vec<u8>, Refusal)> = vec![
        (
            "bare CR inside a header value",
            request(&with(b"X-Note: a\rwebhook-signature: v1,AAAA\r\n"), &body),
            (400, None),
        ),
        (
            "bare CR inside the signature value",
            request(
                format!("webhook-id: m1\r\nwebhook-timestamp: {ts}\r\nwebhook-signature: v1,AAAA\rX-Note: a\r\n")
                    .as_bytes(),
                &body,
            ),
            (400, None),
        ),
        (
            "a folded (obs-fold) continuation line",
            request(&with(b"X-Note: a\r\n webhook-signature: v1,AAAA\r\n"), &body),
            (400, None),
        ),
        (
            "NUL inside a header value",
            request(&with(b"X-Note: a\0webhook-signature: v1,AAAA\r\n"), &body),
            (400, None),
        ),
        (
            "whitespace between a header name and its colon",
            request(&with(b"webhook-signature : v1,AAAA\r\n"), &body),
            (400, None),
        ),
        (
            "CRLF inside the request line",
            [
                b"POST /webhooks/authvital\r\nX-Injected: 1 HTTP/1.1\r\n".as_slice(),
                &request(&genuine, &body)[b"POST /webhooks/authvital HTTP/1.1\r\n".len()..],
            ]
            .concat(),
            (400, None),
        ),
        (
            "percent-encoded CRLF in the path",
            [
                b"POST /webhooks/authvital%0d%0aX-Injected:%201 HTTP/1.1\r\n".as_slice(),
                &request(&genuine, &body)[b"POST /webhooks/authvital HTTP/1.1\r\n".len()..],
            ]
            .concat(),
            refused(404, "not_found"),
        ),
        (
            // A bare LF ends a header line, so this is a second, forged webhook-signature.
            "a forged signature header injected after a bare LF",
            request(&with(b"X-Note: a\nwebhook-signature: v1,AAAA\r\n"), &body),
            refused(401, "duplicate_signature_header"),
        ),
        (
            "an AuthVital key id injected after a bare LF",
            request(&with(b"X-Note: a\nX-AuthVital-Key-Id: k1\r\n"), &body),
            refused(401, "missing_signature"),
        ),
        (
            "two different Content-Length headers",
            [
                head(
                    &format!("Content-Length: {}\r\nContent-Length: 5\r\n", body.len()),
                    &genuine,
                ),
                body.clone(),
            ]
            .concat(),
            (400, None),
        ),
        (
            // hyper reads the body by Transfer-Encoding alone (an empty chunked body, so the
            // signature fails) and closes the connection after answering, as RFC 9112 section
            // 6.3 requires: the smuggled request is never read.
            "Content-Length and chunked together, smuggling a signed request",
            [
                head(
                    &format!(
                        "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
                        smuggling_body.len()
                    ),
                    &genuine,
                ),
                smuggling_body.clone(),
            ]
            .concat(),
            refused(401, "bad_signature"),
        ),
    ];
    for (name, bytes, want) in &cases {
        let (answer, mut stream) = exchange(&scene.addr, bytes).await;
        assert_eq!(&answer.refusal(), want, "{name}");
        if answer.status == 400 || name.contains("smuggling") {
            assert!(
                closed_by_peer(&mut stream).await,
                "{name}: the connection is closed"
            );
        }
    }
    scene
        .assert_nothing_published("injected headers and smuggled requests")
        .await;
    // The same signed request without the injection is accepted: the injections, not the
    // signature, were refused.
    let (answer, _) = exchange(&scene.addr, &request(&genuine, &body)).await;
    assert_eq!(answer.status, 202);
    assert_eq!(scene.drain_ids().await, ["evt-injected"]);
    scene.stop().await;
}

#[tokio::test]
async fn a_repeated_signature_header_is_refused_whichever_copy_is_genuine() {
    let scene = Scene::start().await;
    let mut sent = 0.0;
    for scheme in ["standard", "authvital"] {
        let body = event(&format!("evt-{scheme}"));
        let genuine = match scheme {
            "standard" => scene.standard(&body),
            _ => scene.authvital(&body),
        };
        for (name, value) in genuine.clone() {
            let forged = match name {
                "webhook-signature" => b"v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".to_vec(),
                "x-authvital-key-id" => b"k9".to_vec(),
                _ => b"1".to_vec(),
            };
            for (order, extra) in [
                ("genuine first", (name, forged.clone())),
                ("forged first", (name, forged)),
                ("the same value twice", (name, value.clone())),
            ] {
                let mut headers = genuine.clone();
                if order == "forged first" {
                    headers.insert(0, extra);
                } else {
                    headers.push(extra);
                }
                let answer = scene.post(&headers, &body).await;
                assert_eq!(
                    answer.refusal(),
                    refused(401, "duplicate_signature_header"),
                    "{scheme}: {name} twice, {order}"
                );
                sent += 1.0;
            }
        }
    }
    // A repeated header the signature does not use changes nothing.
    let body = event("evt-control");
    let mut headers = scene.standard(&body);
    headers.push(("x-forwarded-for", b"10.0.0.1".to_vec()));
    headers.push(("x-forwarded-for", b"10.0.0.2".to_vec()));
    assert_eq!(scene.post(&headers, &body).await.status, 202);

    assert_eq!(scene.drain_ids().await, ["evt-control"]);
    scene
        .assert_nothing_published("repeated signature headers")
        .await;
    assert_eq!(
        scene
            .metric("avsync_ingress_signature_failures_total{reason=\"malformed\"}")
            .await,
        sent
    );
    scene.stop().await;
}

#[tokio::test]
async fn huge_headers_get_a_4xx_or_a_closed_connection_never_a_server_error() {
    // Raised bounds, so that 64 KiB headers reach the ingress's own checks.
    let scene = Scene::start_tuned(Tuning::default(), |s| {
        s.max_header_bytes = 512 * 1024;
        s.max_headers = 100;
    })
    .await;
    let body = event("evt-huge");
    let big = "A".repeat(64 * 1024).into_bytes();
    let digits = "9".repeat(64 * 1024).into_bytes();
    let ts = now().to_string().into_bytes();
    let replace = |headers: Headers, name: &str, value: &[u8]| -> Headers {
        headers
            .into_iter()
            .map(|(n, v)| {
                if n == name {
                    (n, value.to_vec())
                } else {
                    (n, v)
                }
            })
            .collect()
    };
    let standard = scene.standard(&body);
    let authvital = scene.authvital(&body);
    let mut v1_big = b"v1,".to_vec();
    v1_big.extend_from_slice(&big);
    let many_entries = "v1,AAAA ".repeat(8 * 1024).into_bytes();
    let cases: Vec<(&str, Headers, Refusal)> = vec![
        (
            "64 KiB webhook-signature",
            replace(standard.clone(), "webhook-signature", &v1_big),
            refused(401, "bad_signature"),
        ),
        (
            "8,192 webhook-signature entries",
            replace(standard.clone(), "webhook-signature", &many_entries),
            refused(401, "bad_signature"),
        ),
        (
            "64 KiB webhook-id",
            replace(standard.clone(), "webhook-id", &big),
            refused(401, "bad_signature"),
        ),
        (
            "64 KiB of digits as webhook-timestamp",
            replace(standard.clone(), "webhook-timestamp", &digits),
            refused(401, "malformed_signature"),
        ),
        (
            "64 KiB X-AuthVital-Signature",
            replace(authvital.clone(), "x-authvital-signature", &big),
            refused(401, "bad_signature"),
        ),
        (
            "64 KiB X-AuthVital-Key-Id",
            replace(authvital.clone(), "x-authvital-key-id", &big),
            refused(401, "unknown_key"),
        ),
        (
            "64 KiB X-AuthVital-Timestamp",
            vec![
                ("x-authvital-timestamp", digits.clone()),
                ("x-authvital-signature", b"AAAA".to_vec()),
            ],
            refused(401, "malformed_signature"),
        ),
        (
            "64 KiB header besides no signature",
            vec![("x-note", big.clone())],
            refused(401, "missing_signature"),
        ),
        (
            "64 KiB header besides a forged signature",
            vec![
                ("x-note", big.clone()),
                ("webhook-id", b"m1".to_vec()),
                ("webhook-timestamp", ts.clone()),
                ("webhook-signature", b"v1,AAAA".to_vec()),
            ],
            refused(401, "bad_signature"),
        ),
    ];
    for (name, headers, want) in &cases {
        assert_eq!(&scene.post(headers, &body).await.refusal(), want, "{name}");
    }

    // Beyond the bounds (here 512 KiB of head, 100 headers) the HTTP stack answers 431 itself
    // and closes the connection: by design, before any handler runs.
    let genuine = lines(&scene.standard(&body));
    let mut one_mib = genuine.clone();
    one_mib.extend_from_slice(b"X-Note: ");
    one_mib.extend(std::iter::repeat_n(b'a', 1 << 20));
    one_mib.extend_from_slice(b"\r\n");
    let mut many = genuine.clone();
    for i in 0..200 {
        many.extend_from_slice(format!("X-Note-{i}: v\r\n").as_bytes());
    }
    let mut long_path = b"POST /webhooks/authvital?".to_vec();
    long_path.extend(std::iter::repeat_n(b'a', 1 << 20));
    long_path.extend_from_slice(&request(&genuine, &body)[b"POST /webhooks/authvital".len()..]);
    for (name, bytes) in [
        ("a 1 MiB header", request(&one_mib, &body)),
        ("200 headers", request(&many, &body)),
        ("a 1 MiB request target", long_path),
    ] {
        let mut stream = TcpStream::connect(&scene.addr).await.unwrap();
        let _ = stream.write_all(&bytes).await;
        let answer = tokio::time::timeout(ANSWER_DEADLINE, read_response(&mut stream))
            .await
            .expect("an answer or a close within the deadline");
        if let Some(answer) = answer {
            assert_eq!(answer.refusal(), (431, None), "{name}");
        }
        assert!(closed_by_peer(&mut stream).await, "{name}: closed");
    }
    scene.assert_nothing_published("huge headers").await;
    scene.stop().await;
}

#[tokio::test]
async fn invalid_utf8_in_a_header_or_a_signed_body_is_refused() {
    let scene = Scene::start().await;
    let body = event("evt-utf8");
    let mut cases: Vec<(String, Headers, Vec<u8>, Refusal)> = Vec::new();
    for genuine in [scene.standard(&body), scene.authvital(&body)] {
        for i in 0..genuine.len() {
            let mut headers = genuine.clone();
            headers[i].1.extend_from_slice(b"\xff\xfe");
            cases.push((
                format!("{} ends in 0xFF 0xFE", headers[i].0),
                headers,
                body.clone(),
                refused(401, "malformed_signature"),
            ));
        }
    }
    let mut unrelated = vec![("x-note", b"caf\xe9".to_vec())];
    unrelated.extend(vec![
        ("webhook-id", b"m1".to_vec()),
        ("webhook-timestamp", now().to_string().into_bytes()),
        ("webhook-signature", b"v1,AAAA".to_vec()),
    ]);
    cases.push((
        "a Latin-1 byte in another header".into(),
        unrelated,
        body.clone(),
        refused(401, "bad_signature"),
    ));

    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("a body that starts with 0xFF", b"\xff{\"id\":\"e\"}".to_vec()),
        (
            "0xFF inside the event id",
            b"{\"id\":\"e\xff\",\"type\":\"subject.created\",\"timestamp\":\"t\",\"tenant_id\":\"tnt_acme\"}".to_vec(),
        ),
        (
            "0xFF inside data",
            b"{\"id\":\"e\",\"type\":\"subject.created\",\"timestamp\":\"t\",\"tenant_id\":\"tnt_acme\",\"data\":{\"sub\":\"u\xff\"}}".to_vec(),
        ),
        (
            "an invalid UTF-8 key inside data",
            b"{\"id\":\"e\",\"type\":\"subject.created\",\"timestamp\":\"t\",\"tenant_id\":\"tnt_acme\",\"data\":{\"\xc3\x28\":1}}".to_vec(),
        ),
        (
            "an overlong encoding of '/'",
            b"{\"id\":\"e\",\"type\":\"subject.created\",\"timestamp\":\"t\",\"tenant_id\":\"tnt_acme\",\"data\":\"\xc0\xaf\"}".to_vec(),
        ),
        (
            "a UTF-16 surrogate encoded as UTF-8 (CESU-8)",
            b"{\"id\":\"e\",\"type\":\"subject.created\",\"timestamp\":\"t\",\"tenant_id\":\"tnt_acme\",\"data\":\"\xed\xa0\x80\"}".to_vec(),
        ),
        (
            "a lone surrogate escape inside data",
            br#"{"id":"e","type":"subject.created","timestamp":"t","tenant_id":"tnt_acme","data":"\ud800"}"#.to_vec(),
        ),
        ("a truncated multi-byte character at the end", {
            let mut b = event("evt-cut");
            b.truncate(b.len() - 1);
            b.extend_from_slice(b",\"x\":\"\xe2\x82");
            b
        }),
        ("a UTF-8 byte order mark", [b"\xef\xbb\xbf".as_slice(), &event("evt-bom")].concat()),
        ("UTF-16LE", {
            let text = String::from_utf8(event("evt-utf16")).unwrap();
            let mut b = vec![0xff, 0xfe];
            b.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
            b
        }),
    ];
    for (name, bad) in bodies {
        let headers = scene.standard(&bad);
        cases.push((
            format!("signed body: {name}"),
            headers,
            bad,
            refused(400, "invalid_json"),
        ));
    }
    for (name, headers, body, want) in &cases {
        assert_eq!(&scene.post(headers, body).await.refusal(), want, "{name}");
    }
    scene.assert_nothing_published("invalid UTF-8").await;
    scene.stop().await;
}

#[tokio::test]
async fn deeply_nested_json_is_refused_quickly_without_overflowing_the_stack() {
    // Room for 100,000 levels of `{"a":` (500 kB), so that the nesting, not the size, is judged.
    let max_body_bytes = 1024 * 1024;
    let scene = Scene::start_tuned(Tuning::default(), |s| s.max_body_bytes = max_body_bytes).await;
    let levels = 100_000;
    let inside_data = |open: &[u8], close: &[u8], leaf: &[u8]| {
        let mut b = br#"{"id":"evt-deep","type":"subject.created","timestamp":"2026-08-21T01:40:03.512Z","tenant_id":"tnt_acme","data":"#.to_vec();
        b.extend(open.repeat(levels));
        b.extend_from_slice(leaf);
        b.extend(close.repeat(levels));
        b.push(b'}');
        b
    };
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("100,000 '['", b"[".repeat(levels)),
        ("100,000 '{\"a\":'", b"{\"a\":".repeat(levels)),
        (
            "100,000 unclosed '[' inside data",
            inside_data(b"[", b"", b""),
        ),
        (
            "100,000 balanced arrays inside data",
            inside_data(b"[", b"]", b""),
        ),
        (
            "100,000 balanced objects inside data",
            inside_data(b"{\"a\":", b"}", b"1"),
        ),
        (
            "100,000 levels inside the id",
            [br#"{"id":"#.as_slice(), &b"[".repeat(levels)].concat(),
        ),
    ];
    for (name, body) in &bodies {
        assert!(body.len() <= max_body_bytes, "{name} fits the limit");
        let headers = scene.standard(body);
        let started = Instant::now();
        let answer = scene.post(&headers, body).await;
        let took = started.elapsed();
        assert_eq!(answer.refusal(), refused(400, "invalid_json"), "{name}");
        assert!(took < Duration::from_secs(5), "{name} took {took:?}");
    }
    // Unsigned, the same bodies are refused before anything parses them.
    for (name, body) in &bodies {
        let answer = scene.post(&[], body).await;
        assert_eq!(
            answer.refusal(),
            refused(401, "missing_signature"),
            "{name}"
        );
    }
    scene.assert_nothing_published("deep nesting").await;
    // The process is still serving.
    let body = event("evt-after-deep");
    assert_eq!(scene.post(&scene.standard(&body), &body).await.status, 202);
    assert_eq!(scene.drain_ids().await, ["evt-after-deep"]);
    scene.stop().await;
}

#[tokio::test]
async fn numbers_objects_and_arrays_where_strings_belong_are_refused() {
    let scene = Scene::start().await;
    let s = |v: &str| format!("\"{v}\"");
    let (id, ty, ts, tenant) = (
        s("evt-types"),
        s("subject.created"),
        s("2026-08-21T01:40:03.512Z"),
        s(TENANT),
    );
    let wrong = [
        ("an object", r#"{"value":"x"}"#),
        ("an array of strings", r#"["x"]"#),
        ("an empty array", "[]"),
        ("true", "true"),
        ("a float", "1.5"),
        ("a negative integer", "-1"),
        ("an integer beyond u64", "18446744073709551616"),
    ];
    let mut cases: Vec<(String, Vec<u8>, &str)> = Vec::new();
    for (what, json) in wrong {
        cases.push((
            format!("id is {what}"),
            envelope(json, &ty, &ts, &tenant),
            "missing_field",
        ));
        cases.push((
            format!("type is {what}"),
            envelope(&id, json, &ts, &tenant),
            "missing_field",
        ));
        cases.push((
            format!("timestamp is {what}"),
            envelope(&id, &ty, json, &tenant),
            "missing_field",
        ));
        cases.push((
            format!("tenant_id is {what}"),
            envelope(&id, &ty, &ts, json),
            "missing_field",
        ));
    }
    for (what, json) in [("1e400", "1e400"), ("-1e400", "-1e400")] {
        cases.push((
            format!("id is {what}"),
            envelope(json, &ty, &ts, &tenant),
            "invalid_json",
        ));
        cases.push((
            format!("data holds {what}"),
            format!(
                r#"{{"id":{id},"type":{ty},"timestamp":{ts},"tenant_id":{tenant},"data":{{"sub":"u","n":{json}}}}}"#
            )
            .into_bytes(),
            "invalid_json",
        ));
    }
    cases.push((
        "tenant_id is a number-like string with a dot".into(),
        envelope(&id, &ty, &ts, "\"1.5\""),
        "invalid_tenant_id",
    ));
    cases.push((
        "tenant_id holds an escaped NUL".into(),
        envelope(&id, &ty, &ts, "\"tnt\\u0000\""),
        "invalid_tenant_id",
    ));
    cases.push((
        "tenant_id holds an escaped slash".into(),
        envelope(&id, &ty, &ts, "\"..\\u002fx\""),
        "invalid_tenant_id",
    ));
    for (name, body, code) in &cases {
        let answer = scene.post(&scene.standard(body), body).await;
        assert_eq!(answer.refusal(), refused(400, code), "{name}");
    }
    scene.assert_nothing_published("wrong JSON types").await;
    scene.stop().await;
}

#[tokio::test]
async fn an_event_id_too_long_for_an_amqp_message_id_is_refused() {
    let scene = Scene::start().await;
    for id in ["i".repeat(256), "é".repeat(128), "i".repeat(70_000)] {
        let body = event(&id);
        let answer = scene.post(&scene.standard(&body), &body).await;
        assert_eq!(
            answer.refusal(),
            refused(400, "invalid_event_id"),
            "{} bytes",
            id.len()
        );
    }
    scene.assert_nothing_published("over-long event ids").await;
    let longest = "i".repeat(255);
    let body = event(&longest);
    assert_eq!(scene.post(&scene.standard(&body), &body).await.status, 202);
    assert_eq!(scene.drain_ids().await, [longest]);
    scene.stop().await;
}

/// Sends a request head announcing a 10 MiB body, then `before_answer` bytes of the body, and
/// waits for the answer before trying to send the rest, which must fail. Returns the answer
/// and whether the server closed the connection.
async fn send_ten_mib(
    addr: &str,
    framing: &str,
    extra: &[u8],
    chunked: bool,
    before_answer: usize,
) -> (Answer, bool) {
    const TEN_MIB: usize = 10 * 1024 * 1024;
    const PIECE: usize = 64 * 1024;
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let sent = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicBool::new(false));
    let sender = {
        let sent = sent.clone();
        let answered = answered.clone();
        let head = head(framing, extra);
        tokio::spawn(async move {
            if writer.write_all(&head).await.is_err() {
                return false;
            }
            let piece = if chunked {
                [format!("{PIECE:x}\r\n").as_bytes(), &[b'x'; PIECE], b"\r\n"].concat()
            } else {
                vec![b'x'; PIECE]
            };
            let started = Instant::now();
            while sent.load(Ordering::SeqCst) < TEN_MIB {
                if sent.load(Ordering::SeqCst) >= before_answer {
                    // The rest goes only once the ingress has answered.
                    while !answered.load(Ordering::SeqCst) {
                        if started.elapsed() > ANSWER_DEADLINE {
                            return false;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                if writer.write_all(&piece).await.is_err() {
                    return false;
                }
                sent.fetch_add(PIECE, Ordering::SeqCst);
            }
            writer
                .write_all(if chunked { b"0\r\n\r\n" } else { b"" })
                .await
                .is_ok()
        })
    };
    let answer = tokio::time::timeout(ANSWER_DEADLINE, read_response(&mut reader))
        .await
        .expect("an answer before the body is sent")
        .expect("a whole HTTP response");
    answered.store(true, Ordering::SeqCst);
    let closed = closed_by_peer(&mut reader).await;
    let sent_everything = tokio::time::timeout(Duration::from_secs(30), sender)
        .await
        .expect("the sender stops")
        .expect("sender task");
    assert!(!sent_everything, "the ingress must not take all 10 MiB");
    (answer, closed)
}

#[tokio::test]
async fn a_ten_megabyte_body_is_refused_before_it_is_read_whole() {
    let scene = Scene::start().await;
    let genuine = lines(&scene.standard(b"{}"));
    let announced = format!("Content-Length: {}\r\n", 10 * 1024 * 1024);
    for (name, framing, extra, chunked, before_answer) in [
        (
            "Content-Length, signed",
            announced.as_str(),
            genuine.as_slice(),
            false,
            0,
        ),
        (
            "Content-Length, unsigned",
            announced.as_str(),
            b"".as_slice(),
            false,
            0,
        ),
        (
            "chunked, signed",
            "Transfer-Encoding: chunked\r\n",
            genuine.as_slice(),
            true,
            1024 * 1024,
        ),
        (
            "chunked, unsigned",
            "Transfer-Encoding: chunked\r\n",
            b"".as_slice(),
            true,
            1024 * 1024,
        ),
    ] {
        // The sender waits for the answer before sending more than `before_answer` bytes, so
        // an ingress that read the whole body would never have answered.
        let (answer, closed) =
            send_ten_mib(&scene.addr, framing, extra, chunked, before_answer).await;
        assert_eq!(
            answer.refusal(),
            refused(413, "payload_too_large"),
            "{name}"
        );
        assert!(answer.closed && closed, "{name}: the connection is closed");
    }
    scene.assert_nothing_published("10 MiB bodies").await;
    assert_eq!(
        scene
            .metric("avsync_ingress_requests_total{outcome=\"payload_too_large\"}")
            .await,
        4.0
    );
    scene.stop().await;
}

/// Sends a request head (then counts it in `sent_heads`), then `body` a few bytes at a time
/// every `pace` until it is all sent or the server stops the connection; returns the answer,
/// how long it took, and whether the server closed the connection.
async fn send_slowly(
    addr: &str,
    framing: &str,
    extra: &[u8],
    body: Vec<u8>,
    pace: Duration,
    sent_heads: Arc<AtomicUsize>,
) -> (Answer, Duration, bool) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let head = head(framing, extra);
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        if writer.write_all(&head).await.is_err() {
            return;
        }
        sent_heads.fetch_add(1, Ordering::SeqCst);
        for piece in body.chunks(8) {
            tokio::time::sleep(pace).await;
            if writer.write_all(piece).await.is_err() {
                return;
            }
        }
        // Keep the connection open without sending more, as a stalled client does.
        tokio::time::sleep(ANSWER_DEADLINE).await;
    });
    let answer = tokio::time::timeout(ANSWER_DEADLINE, read_response(&mut reader))
        .await
        .expect("an answer within the deadline")
        .expect("a whole HTTP response");
    let took = started.elapsed();
    let closed = answer.status != 202 && closed_by_peer(&mut reader).await;
    sender.abort();
    (answer, took, closed)
}

#[tokio::test]
async fn slow_bodies_are_cut_off_with_408_and_do_not_hold_up_others() {
    assert_eq!(
        BODY_READ_TIMEOUT,
        Duration::from_secs(10),
        "the documented bound"
    );
    assert_eq!(Tuning::default().body_read_timeout, BODY_READ_TIMEOUT);
    let bound = Duration::from_secs(2);
    let tuning = Tuning {
        body_read_timeout: bound,
        ..Tuning::default()
    };
    let scene = Scene::start_tuned(tuning, |_| {}).await;

    let slow_body = event("evt-slow");
    let signed = lines(&scene.standard(&slow_body));
    let length = format!("Content-Length: {}\r\n", slow_body.len());
    let chunked_body: Vec<u8> = slow_body
        .chunks(8)
        .flat_map(|c| [format!("{:x}\r\n", c.len()).as_bytes(), c, b"\r\n"].concat())
        .collect();
    let slow = Duration::from_millis(100);
    let cases: Vec<(&str, String, Vec<u8>)> = vec![
        ("8 bytes every 100 ms", length.clone(), slow_body.clone()),
        ("a body that never comes", length.clone(), Vec::new()),
        (
            "half a body, then nothing",
            length.clone(),
            slow_body[..slow_body.len() / 2].to_vec(),
        ),
        (
            "8-byte chunks every 100 ms",
            "Transfer-Encoding: chunked\r\n".into(),
            chunked_body,
        ),
    ];
    // Fifty slow senders at once, and a valid event meanwhile.
    const SLOW_SENDERS: usize = 50;
    let sent_heads = Arc::new(AtomicUsize::new(0));
    let mut slow_tasks = Vec::new();
    for i in 0..SLOW_SENDERS {
        let (name, framing, body) = cases[i % cases.len()].clone();
        let addr = scene.addr.clone();
        let signed = signed.clone();
        let sent_heads = sent_heads.clone();
        slow_tasks.push(tokio::spawn(async move {
            let (answer, took, closed) =
                send_slowly(&addr, &framing, &signed, body, slow, sent_heads).await;
            (name, answer, took, closed)
        }));
    }
    support::wait_until("every slow sender connected", ANSWER_DEADLINE, || {
        let sent_heads = sent_heads.clone();
        async move { (sent_heads.load(Ordering::SeqCst) == SLOW_SENDERS).then_some(()) }
    })
    .await;
    let fast = event("evt-fast");
    let answer = scene.post(&scene.standard(&fast), &fast).await;
    assert_eq!(answer.status, 202);
    assert!(
        slow_tasks.iter().all(|t| !t.is_finished()),
        "the valid event was answered while every slow sender still held its connection"
    );

    for task in slow_tasks {
        let (name, answer, took, closed) = task.await.expect("slow sender");
        assert_eq!(answer.refusal(), refused(408, "body_timeout"), "{name}");
        assert!(took >= bound, "{name}: cut off after {took:?}");
        assert!(took < bound * 5, "{name}: cut off only after {took:?}");
        assert!(answer.closed && closed, "{name}: the connection is closed");
    }

    // A slow body that arrives within the bound is accepted.
    let in_time = event("evt-slow-but-in-time");
    let (answer, took, _) = send_slowly(
        &scene.addr,
        &format!("Content-Length: {}\r\n", in_time.len()),
        &lines(&scene.standard(&in_time)),
        in_time,
        Duration::from_millis(1),
        Arc::new(AtomicUsize::new(0)),
    )
    .await;
    assert_eq!(answer.status, 202, "{took:?}");

    assert_eq!(
        scene.drain_ids().await,
        ["evt-fast", "evt-slow-but-in-time"],
        "only the events that arrived in time are published"
    );
    scene.assert_nothing_published("slow bodies").await;
    scene.stop().await;
}

#[tokio::test]
async fn ten_thousand_forged_signatures_publish_nothing_and_do_not_delay_a_valid_event() {
    const FORGED: usize = 10_000;
    let scene = Arc::new(Scene::start().await);
    let done = Arc::new(AtomicUsize::new(0));
    let flood = {
        let scene = scene.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let answers: Vec<Refusal> = stream::iter(0..FORGED)
                .map(|i| {
                    let scene = scene.clone();
                    let done = done.clone();
                    async move {
                        let body = event(&format!("evt-forged-{i}"));
                        let mut headers = if i % 2 == 0 {
                            scene.standard(&body)
                        } else {
                            scene.authvital(&body)
                        };
                        // Same headers, wrong signature bytes.
                        for (name, value) in &mut headers {
                            if *name == "webhook-signature" {
                                *value = format!("v1,{}", "A".repeat(43) + "=").into_bytes();
                            } else if *name == "x-authvital-signature" {
                                *value = sign_authvital_hmac(b"not-the-secret", now(), &body)
                                    .into_bytes();
                            }
                        }
                        let answer = scene.post(&headers, &body).await.refusal();
                        done.fetch_add(1, Ordering::SeqCst);
                        answer
                    }
                })
                .buffer_unordered(32)
                .collect()
                .await;
            answers
        })
    };
    support::wait_until(
        "1,000 forged requests answered",
        Duration::from_secs(60),
        || {
            let done = done.clone();
            async move { (done.load(Ordering::SeqCst) >= 1_000).then_some(()) }
        },
    )
    .await;
    let valid = event("evt-valid-in-flood");
    let started = Instant::now();
    let answer = scene.post(&scene.standard(&valid), &valid).await;
    let took = started.elapsed();
    let done_then = done.load(Ordering::SeqCst);
    assert_eq!(answer.status, 202);
    assert!(
        took < Duration::from_secs(5),
        "the valid event took {took:?}"
    );
    assert!(
        done_then < FORGED,
        "the valid event was answered during the flood"
    );

    let answers = tokio::time::timeout(Duration::from_secs(120), flood)
        .await
        .expect("the flood ends")
        .expect("flood task");
    assert_eq!(answers.len(), FORGED);
    assert!(
        answers.iter().all(|a| *a == refused(401, "bad_signature")),
        "every forged request is 401 bad_signature"
    );
    assert_eq!(scene.drain_ids().await, ["evt-valid-in-flood"]);
    scene.assert_nothing_published("forged signatures").await;
    assert_eq!(
        scene
            .metric("avsync_ingress_signature_failures_total{reason=\"mismatch\"}")
            .await,
        FORGED as f64
    );
    assert_eq!(
        scene
            .metric("avsync_ingress_requests_total{outcome=\"unauthorized\"}")
            .await,
        FORGED as f64
    );
    match Arc::try_unwrap(scene) {
        Ok(scene) => scene.stop().await,
        Err(_) => panic!("every request task has ended"),
    }
}

/// A request line and half a header line, then nothing: what a stalled or slowloris client
/// leaves on a connection.
const STALLED_HEAD: &[u8] = b"POST /webhooks/authvital HTTP/1.1\r\nHost: ingress\r\nX-AuthVital-Ti";

async fn stall(addr: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(STALLED_HEAD).await.expect("write");
    stream
}

/// How long after `since` the peer closed (or reset) the connection, or None if it is still
/// open after `deadline`. Whatever the peer sends first (an error answer) is read past.
async fn closed_after(
    stream: &mut (impl AsyncRead + Unpin),
    since: Instant,
    deadline: Duration,
) -> Option<Duration> {
    let mut sink = [0u8; 1024];
    loop {
        let left = deadline.saturating_sub(since.elapsed());
        match tokio::time::timeout(left, stream.read(&mut sink)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(since.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn slow_headers_are_closed_within_the_header_read_timeout_and_publish_nothing() {
    let bound = Duration::from_secs(1);
    let scene = Scene::start_tuned(Tuning::default(), |s| s.header_read_timeout = bound).await;
    let body = event("evt-slow-head");
    let whole = request(&lines(&scene.standard(&body)), &body);
    let head_only = whole[..whole.len() - body.len() - 2].to_vec();
    let cases: Vec<(&str, Vec<u8>, Option<Duration>)> = vec![
        ("nothing at all", Vec::new(), None),
        ("half a request line", b"POST /webhooks/auth".to_vec(), None),
        ("half a header line", STALLED_HEAD.to_vec(), None),
        ("every header but the blank line", head_only, None),
        // A byte every 100 ms: each byte is progress, but the bound is on the whole head.
        (
            "the signed head a byte every 100 ms",
            whole.clone(),
            Some(Duration::from_millis(100)),
        ),
    ];
    let mut tasks = Vec::new();
    for (name, bytes, pace) in cases {
        let addr = scene.addr.clone();
        tasks.push(tokio::spawn(async move {
            let stream = TcpStream::connect(&addr).await.expect("connect");
            let opened = Instant::now();
            let (mut reader, mut writer) = stream.into_split();
            let sender = tokio::spawn(async move {
                match pace {
                    None => {
                        let _ = writer.write_all(&bytes).await;
                    }
                    Some(pace) => {
                        for byte in bytes.chunks(1) {
                            if writer.write_all(byte).await.is_err() {
                                break;
                            }
                            tokio::time::sleep(pace).await;
                        }
                    }
                }
                // Hold the connection open, as a stalled client does.
                tokio::time::sleep(ANSWER_DEADLINE).await;
                drop(writer);
            });
            let closed = closed_after(&mut reader, opened, ANSWER_DEADLINE).await;
            sender.abort();
            (name, closed)
        }));
    }
    for task in tasks {
        let (name, closed) = task.await.expect("slow header task");
        let took = closed.unwrap_or_else(|| panic!("{name}: still open after {ANSWER_DEADLINE:?}"));
        assert!(
            took >= bound - Duration::from_millis(100),
            "{name}: closed after {took:?}"
        );
        assert!(
            took < bound + Duration::from_secs(2),
            "{name}: closed only after {took:?}"
        );
    }

    // The same bound is the idle timeout: a keep-alive connection that carries no next request
    // is closed once it has waited that long.
    let (answer, mut stream) =
        exchange(&scene.addr, &request(&lines(&scene.standard(&body)), &body)).await;
    assert_eq!(answer.status, 202);
    assert!(!answer.closed, "kept alive");
    let answered = Instant::now();
    let took = closed_after(&mut stream, answered, ANSWER_DEADLINE)
        .await
        .expect("an idle keep-alive connection is closed");
    assert!(took < bound + Duration::from_secs(2), "idle for {took:?}");

    assert_eq!(
        scene.drain_ids().await,
        ["evt-slow-head"],
        "only the whole request is published"
    );
    scene.assert_nothing_published("slow headers").await;
    scene.stop().await;
}

/// 2,000 connections stalled mid-header are all closed within the header read timeout (5 s
/// here) plus a margin, and while they are open, valid requests on fresh connections get 202
/// with a 99th percentile under a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_connections_stalled_mid_header_are_closed_while_valid_requests_pass() {
    const STALLED: usize = 2_000;
    const VALID: usize = 100;
    let _turn = FLOODS.lock().await;
    // Long enough that every stalled connection is still open once the last one is: opening
    // 2,000 takes seconds on a loaded 2-core machine.
    let bound = Duration::from_secs(15);
    let margin = Duration::from_secs(3);
    // This process holds both ends of every connection, besides what parallel tests hold.
    avsync_ingress::server::reserve_descriptors(2 * STALLED + 1_024)
        .expect("file descriptors for both ends of 2,000 connections");
    let scene = Arc::new(
        Scene::start_tuned(Tuning::default(), |s| {
            s.header_read_timeout = bound;
            s.max_http_connections = 4_096;
        })
        .await,
    );
    let mut stalled = Vec::with_capacity(STALLED);
    for _ in 0..STALLED {
        let mut stream = stall(&scene.addr).await;
        let opened = Instant::now();
        stalled.push(tokio::spawn(async move {
            closed_after(&mut stream, opened, bound + margin * 2).await
        }));
    }
    // A connect returns once the kernel queued the connection; the ingress counts it when it
    // accepts it, a moment later.
    support::wait_until("every stalled connection is open", bound / 2, || async {
        (scene.metric("avsync_ingress_connections_open").await >= STALLED as f64).then_some(())
    })
    .await;

    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(ANSWER_DEADLINE)
        .build()
        .expect("http client");
    let mut latencies: Vec<Duration> = stream::iter(0..VALID)
        .map(|i| {
            let scene = scene.clone();
            let fresh = fresh.clone();
            async move {
                let body = event(&format!("evt-valid-{i}"));
                let mut request = fresh
                    .post(scene.webhook_url())
                    .header("content-type", "application/json")
                    .body(body.clone());
                for (name, value) in scene.standard(&body) {
                    request = request.header(name, value);
                }
                let started = Instant::now();
                let status = request.send().await.expect("POST").status().as_u16();
                assert_eq!(status, 202);
                started.elapsed()
            }
        })
        .buffer_unordered(4)
        .collect()
        .await;
    latencies.sort();
    let p99 = latencies[VALID * 99 / 100 - 1];
    assert!(
        p99 < Duration::from_secs(1),
        "p99 {p99:?}, all {latencies:?}"
    );
    assert!(
        stalled.iter().filter(|t| t.is_finished()).count() < STALLED,
        "the valid requests were answered while stalled connections were open"
    );

    for task in stalled {
        let took = task
            .await
            .expect("stalled connection task")
            .expect("every stalled connection is closed by the ingress");
        assert!(
            took >= bound - Duration::from_secs(1),
            "closed after {took:?}"
        );
        assert!(took < bound + margin, "closed only after {took:?}");
    }
    let mut ids = scene.drain_ids().await;
    ids.sort();
    let mut want: Vec<String> = (0..VALID).map(|i| format!("evt-valid-{i}")).collect();
    want.sort();
    assert_eq!(ids, want, "exactly the valid events are published");
    match Arc::try_unwrap(scene) {
        Ok(scene) => scene.stop().await,
        Err(_) => panic!("every request task has ended"),
    }
}

/// The real ingress binary, as a child process on its own topology, with the given settings
/// beside the harness's: what its descriptors and memory are can be read from `/proc`.
struct Child {
    process: processes::Process,
    pid: u32,
    addr: String,
    metrics_url: String,
    whsec: String,
    topology: Topology,
    client: reqwest::Client,
    _cleanup: TopologyCleanup,
}

/// What the child holds: open descriptors and resident memory.
#[derive(Debug, Clone, Copy)]
struct Usage {
    descriptors: usize,
    rss_kib: u64,
}

impl Child {
    async fn spawn(env: &[(&str, String)]) -> Child {
        let prefix = support::unique("t");
        let cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
        let whsec = new_whsec_secret();
        let (process, addr, metrics_url) =
            processes::spawn_ingress(&prefix, PARTITIONS, &whsec, env).await;
        let pid = process.child.id().expect("running");
        Child {
            process,
            pid,
            addr,
            metrics_url,
            whsec,
            topology: Topology::new(&prefix, PARTITIONS).expect("topology"),
            client: client(),
            _cleanup: cleanup,
        }
    }

    fn usage(&self) -> Usage {
        let descriptors = std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .expect("the child's descriptors")
            .count();
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid)).expect("its status");
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS");
        Usage {
            descriptors,
            rss_kib,
        }
    }

    /// A series of its `/metrics`, or None while it does not answer.
    async fn gauge(&self, series: &str) -> Option<f64> {
        let url = format!("{}/metrics", self.metrics_url);
        let text = self.client.get(url).send().await.ok()?.text().await.ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
    }

    async fn wait_for_gauge(&self, what: &str, series: &str, want: impl Fn(f64) -> bool) {
        support::wait_until(what, Duration::from_secs(60), || async {
            self.gauge(series).await.filter(|v| want(*v)).map(|_| ())
        })
        .await;
    }

    /// POSTs a valid signed event with `id` on a fresh connection: its status and how long the
    /// answer took.
    async fn post_valid(&self, fresh: &reqwest::Client, id: &str) -> (u16, Duration) {
        let body = event(id);
        let message_id = uuid::Uuid::new_v4().to_string();
        let ts = now();
        let request = fresh
            .post(format!("http://{}/webhooks/authvital", self.addr))
            .header("content-type", "application/json")
            .header("webhook-id", &message_id)
            .header("webhook-timestamp", ts.to_string())
            .header(
                "webhook-signature",
                sign_standard(&self.whsec, &message_id, ts, &body),
            )
            .body(body);
        let started = Instant::now();
        let status = request.send().await.expect("POST").status().as_u16();
        (status, started.elapsed())
    }

    async fn published(&self) -> u32 {
        let (conn, ch) = support::channel().await;
        let mut published = 0;
        for p in 0..PARTITIONS {
            published += support::queue_depth(&ch, &self.topology.partition_queue(p))
                .await
                .unwrap_or(0);
        }
        let _ = conn.close(200, "checked".into()).await;
        published
    }

    async fn stop(mut self) {
        self.process.sigterm().await;
        assert_eq!(self.process.exit_code().await, Some(0));
    }
}

/// An HTTP client that opens a new connection for every request.
fn fresh_connections() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(ANSWER_DEADLINE)
        .build()
        .expect("http client")
}

/// Reads until the peer closes (or resets) the connection.
async fn until_closed(stream: &mut TcpStream) {
    let mut sink = [0u8; 1024];
    while let Ok(n) = stream.read(&mut sink).await {
        if n == 0 {
            return;
        }
    }
}

/// One slowloris connection, for ever: a stalled head, and a new one as soon as the ingress
/// closes it, until `stop`. At most `connecting.permits` connects are in flight at once.
async fn keep_stalled(
    addr: String,
    connecting: Arc<tokio::sync::Semaphore>,
    reconnects: Arc<AtomicUsize>,
    stop: CancellationToken,
) {
    loop {
        let mut stream = {
            let _turn = connecting.acquire().await.expect("never closed");
            tokio::select! {
                () = stop.cancelled() => return,
                stream = stall(&addr) => stream,
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = until_closed(&mut stream) => reconnects.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// The real binary with every default bound (10 s header read timeout, 8,192 connections) while
/// 5,000 connections are kept stalled mid-header (each reconnects once the ingress closes it, as a
/// slowloris does): valid signed webhooks on fresh connections all get 202 while the stalled ones
/// are open, and the ingress's open connections, descriptors and memory stay bounded. Latency
/// and memory are printed; only an answer within the client's deadline is asserted (speed is
/// the benchmark's to measure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_connections_stalled_at_the_defaults_keep_no_valid_sender_out() {
    const STALLED: usize = 5_000;
    const VALID: usize = 200;
    /// Connects in flight at once, well within the listen backlog (1,024).
    const CONNECTING: usize = 256;
    /// Descriptors the child holds besides its connections: listeners, broker, runtime.
    const BESIDES: usize = 64;
    /// Generous: a stalled connection costs a few KiB; a body buffer each would be 256 KiB.
    const MOST_KIB_PER_CONNECTION: u64 = 64;
    let _turn = FLOODS.lock().await;
    // This process holds the client end of every connection, besides what parallel tests hold.
    avsync_ingress::server::reserve_descriptors(STALLED + 2_048)
        .expect("file descriptors for 5,000 client ends");
    let child = Child::spawn(&[]).await;
    let at_rest = child.usage();

    let stop = CancellationToken::new();
    let connecting = Arc::new(tokio::sync::Semaphore::new(CONNECTING));
    let reconnects = Arc::new(AtomicUsize::new(0));
    let attackers: Vec<JoinHandle<()>> = (0..STALLED)
        .map(|_| {
            tokio::spawn(keep_stalled(
                child.addr.clone(),
                connecting.clone(),
                reconnects.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let opening = Instant::now();
    child
        .wait_for_gauge(
            "5,000 stalled connections open",
            "avsync_ingress_connections_open",
            |open| open >= STALLED as f64,
        )
        .await;
    let opened_in = opening.elapsed();
    let under_attack = child.usage();

    let fresh = fresh_connections();
    let mut answers: Vec<(u16, Duration)> = stream::iter(0..VALID)
        .map(|i| {
            let (child, fresh) = (&child, &fresh);
            async move { child.post_valid(fresh, &format!("evt-valid-{i}")).await }
        })
        .buffer_unordered(4)
        .collect()
        .await;
    let open_after = child
        .gauge("avsync_ingress_connections_open")
        .await
        .expect("open connections");
    let peak = child.usage();
    stop.cancel();
    for attacker in attackers {
        attacker.await.expect("stalled connection task");
    }

    answers.sort_by_key(|(_, took)| *took);
    let statuses: Vec<u16> = answers.iter().map(|(status, _)| *status).collect();
    let at = |q: usize| answers[(VALID * q / 100).min(VALID - 1)].1;
    let grown_kib = peak.rss_kib.saturating_sub(at_rest.rss_kib);
    println!(
        "{STALLED} stalled connections open after {opened_in:?} ({} reconnects); {VALID} valid webhooks: p50 {:?}, p99 {:?}, max {:?}; ingress at rest {at_rest:?}, under attack {under_attack:?}, peak {peak:?}: {} KiB per stalled connection; {open_after} open at the end",
        reconnects.load(Ordering::Relaxed),
        at(50),
        answers[VALID * 99 / 100 - 1].1,
        answers[VALID - 1].1,
        grown_kib / STALLED as u64,
    );
    assert!(
        statuses.iter().all(|s| *s == 202),
        "every valid webhook is accepted: {statuses:?}"
    );
    assert!(
        open_after >= (STALLED - CONNECTING) as f64,
        "the stalled connections were still open: {open_after}"
    );
    assert!(open_after <= avsync_ingress::settings::DEFAULT_MAX_HTTP_CONNECTIONS as f64);
    assert!(
        peak.descriptors <= at_rest.descriptors + STALLED + CONNECTING + BESIDES,
        "{peak:?}, at rest {at_rest:?}"
    );
    assert!(
        grown_kib <= STALLED as u64 * MOST_KIB_PER_CONNECTION,
        "memory grew by {grown_kib} KiB for {STALLED} stalled connections"
    );
    assert_eq!(
        child.published().await,
        VALID as u32,
        "exactly the valid events"
    );
    child.stop().await;
}

/// The real binary with `AVSYNC_MAX_HTTP_CONNECTIONS=100`. Full of requests whose bodies have not
/// arrived (busy connections), it closes a new connection at once. Full of stalled connections,
/// each of 400 more takes the place of the one that has waited longest for its head: the first
/// 100 are closed long before the (60 s) header read timeout, a valid event is accepted while the
/// bound is still full, the descriptors (`/proc/<pid>/fd`) stay under the bound plus a small
/// constant, and the metrics listener keeps answering. Nothing else is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_bound_makes_room_by_closing_the_longest_waiting_connection() {
    const BOUND: usize = 100;
    const EXCESS: usize = 400;
    /// Descriptors a connection may hold for a moment beyond the bound: one being accepted while
    /// the one it replaces closes, and the metrics requests of this test.
    const SLACK: usize = 8;
    let child = Child::spawn(&[
        ("AVSYNC_MAX_HTTP_CONNECTIONS", BOUND.to_string()),
        ("AVSYNC_HEADER_READ_TIMEOUT", "60s".to_owned()),
    ])
    .await;
    let at_rest = child.usage().descriptors;
    let open = "avsync_ingress_connections_open";

    // A head that promises a body which never comes: the request is being handled.
    let mut busy = Vec::with_capacity(BOUND);
    for _ in 0..BOUND {
        let mut stream = TcpStream::connect(&child.addr).await.expect("connect");
        stream
            .write_all(&head("Content-Length: 10\r\n", b""))
            .await
            .expect("write");
        busy.push(stream);
    }
    child
        .wait_for_gauge("the bound full of busy connections", open, |v| {
            v == BOUND as f64
        })
        .await;
    // A connection counts as open from its accept, and waits until its head is read: one whose
    // head is not read yet would be closed to make room for the next.
    child
        .wait_for_gauge(
            "every busy head read",
            "avsync_ingress_connections_waiting",
            |v| v == 0.0,
        )
        .await;
    let mut refused = stall(&child.addr).await;
    let opened = Instant::now();
    let took = closed_after(&mut refused, opened, ANSWER_DEADLINE)
        .await
        .expect("closed at once: no connection waits for a head");
    assert_eq!(
        child
            .gauge("avsync_ingress_connections_refused_total")
            .await,
        Some(1.0),
        "closed after {took:?}"
    );
    drop(busy);
    child
        .wait_for_gauge("the busy connections closed", open, |v| v == 0.0)
        .await;

    let mut held = Vec::with_capacity(BOUND);
    for _ in 0..BOUND {
        held.push(stall(&child.addr).await);
    }
    child
        .wait_for_gauge("the bound full of stalled connections", open, |v| {
            v == BOUND as f64
        })
        .await;
    let mut flood = Vec::with_capacity(EXCESS);
    let mut most = child.usage().descriptors;
    for _ in 0..EXCESS / 50 {
        for _ in 0..50 {
            flood.push(stall(&child.addr).await);
        }
        most = most.max(child.usage().descriptors);
        let healthz = child
            .client
            .get(format!("{}/healthz", child.metrics_url))
            .send()
            .await
            .expect("the metrics listener answers during the flood");
        assert_eq!(healthz.status(), 200);
    }
    for stream in &mut held {
        assert!(
            closed_by_peer(stream).await,
            "a connection that waited longest is closed to make room"
        );
    }
    child
        .wait_for_gauge("every newcomer took a place", open, |v| v == BOUND as f64)
        .await;
    assert_eq!(
        child
            .gauge("avsync_ingress_connections_evicted_total")
            .await,
        Some(EXCESS as f64)
    );
    assert!(
        most <= at_rest + BOUND + SLACK,
        "{most} descriptors, {at_rest} at rest, bound {BOUND}"
    );
    assert!(
        most as u64
            <= (BOUND + avsync_ingress::server::ADMIN_MAX_CONNECTIONS) as u64
                + avsync_ingress::server::RESERVED_DESCRIPTORS,
        "{most} descriptors exceed the budget the ingress reserves"
    );

    // The bound is still full of stalled connections; a sender gets in at once all the same.
    let (status, _) = child
        .post_valid(&fresh_connections(), "evt-while-full")
        .await;
    assert_eq!(status, 202);
    assert_eq!(
        child
            .gauge("avsync_ingress_connections_refused_total")
            .await,
        Some(1.0)
    );
    assert_eq!(
        child.published().await,
        1,
        "only the valid event is published"
    );
    // The client ends close, so that shutdown need not wait for the header read timeout.
    drop(flood);
    child.stop().await;
}

/// On shutdown a connection stalled mid-header is closed once the drain grace has passed, not
/// kept until its (here 60 s) header read timeout: the ingress stops well within that.
#[tokio::test]
async fn shutdown_closes_connections_stalled_mid_header_without_waiting_for_the_timeout() {
    let header_read_timeout = Duration::from_secs(60);
    let scene = Scene::start_tuned(Tuning::default(), |s| {
        s.header_read_timeout = header_read_timeout
    })
    .await;
    let mut stalled = stall(&scene.addr).await;
    support::wait_until("the stalled connection open", ANSWER_DEADLINE, || async {
        (scene.metric("avsync_ingress_connections_open").await == 1.0).then_some(())
    })
    .await;
    let signalled = Instant::now();
    scene.stop().await;
    let stopped_after = signalled.elapsed();
    assert!(
        stopped_after < header_read_timeout / 2,
        "stopped only after {stopped_after:?}"
    );
    assert!(
        closed_by_peer(&mut stalled).await,
        "the stalled connection is closed"
    );
}

/// With `AVSYNC_MAX_CONCURRENT_REQUESTS=2` and two requests whose bodies have not arrived, a
/// third request is answered 503 `overloaded` with `Retry-After` at once (its body unread, so
/// its connection closes) and nothing is published; once they are gone, a webhook gets 202.
#[tokio::test]
async fn requests_beyond_the_concurrent_bound_get_503_overloaded_and_publish_nothing() {
    let scene = Scene::start_tuned(Tuning::default(), |s| s.max_concurrent_requests = 2).await;
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(&scene.addr).await.expect("connect");
        stream
            .write_all(&head("Content-Length: 10\r\n", b""))
            .await
            .expect("write");
        busy.push(stream);
    }
    // An unsigned probe: 401 while a permit is free (it cannot be published), 503 once both are
    // taken, since the bound is checked before anything else.
    let body = event("evt-over-bound");
    support::wait_until(
        "the two bodies being waited for",
        ANSWER_DEADLINE,
        || async { (scene.post(&[], &body).await.status == 503).then_some(()) },
    )
    .await;
    let answer = scene.post(&scene.standard(&body), &body).await;
    assert_eq!(answer.refusal(), refused(503, "overloaded"));
    scene
        .assert_nothing_published("over the request bound")
        .await;
    drop(busy);
    let body = event("evt-after-bound");
    let answer = support::wait_until("the bound free again", ANSWER_DEADLINE, || async {
        let answer = scene.post(&scene.standard(&body), &body).await;
        (answer.status == 202).then_some(answer)
    })
    .await;
    assert_eq!(answer.status, 202);
    assert_eq!(scene.drain_ids().await, ["evt-after-bound"]);
    scene.stop().await;
}

#[tokio::test]
async fn the_default_header_bounds_answer_431_before_any_handler_runs() {
    let scene = Scene::start().await;
    let body = event("evt-bounds");
    let signed = lines(&scene.standard(&body));
    let with_notes = |count: usize, each: usize| {
        let mut extra = signed.clone();
        for i in 0..count {
            extra.extend_from_slice(format!("X-Note-{i}: {}\r\n", "a".repeat(each)).as_bytes());
        }
        request(&extra, &body)
    };
    // Host, Content-Type, Content-Length and three signature headers are six of the 64.
    for (name, bytes, want) in [
        ("64 headers", with_notes(58, 1), 202_u16),
        ("65 headers", with_notes(59, 1), 431),
        ("a 15 KiB head", with_notes(1, 15 * 1024), 0),
        ("a 17 KiB head", with_notes(1, 17 * 1024), 431),
    ] {
        let mut stream = TcpStream::connect(&scene.addr).await.expect("connect");
        let _ = stream.write_all(&bytes).await;
        let answer = tokio::time::timeout(ANSWER_DEADLINE, read_response(&mut stream))
            .await
            .expect("an answer within the deadline");
        match want {
            431 => {
                if let Some(answer) = answer {
                    assert_eq!(answer.refusal(), (431, None), "{name}");
                }
                assert!(closed_by_peer(&mut stream).await, "{name}: closed");
            }
            _ => assert_eq!(answer.expect("an answer").status, 202, "{name}"),
        }
    }
    assert_eq!(scene.drain_ids().await, ["evt-bounds", "evt-bounds"]);
    scene.assert_nothing_published("header bounds").await;
    scene.stop().await;
}
