//! The real `avsync-worker` and `avsync-ingress` binaries, run as child processes: SIGTERM stops
//! them gracefully (exit status 0, nothing lost, nothing handed back), and their JSON logs carry
//! the event fields and never a secret or a payload.

use avsync_shared::Topology;
use avsync_tests::ingress_harness::{new_whsec_secret, sign_standard};
use avsync_tests::processes::{self, Process};
use avsync_tests::support::{self, wait_until, TopologyCleanup};
use avsync_tests::worker_harness::{self, publish_all, publisher, TestDatabases};
use serde_json::{json, Value};
use sqlx::Connection as _;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PARTITIONS: u16 = 4;

async fn spawn_worker(prefix: &str, template: &str, extra: &[(&str, &str)]) -> (Process, String) {
    let mut env = vec![
        ("AVSYNC_AMQP_URL", support::AMQP_URL.to_owned()),
        ("AVSYNC_TOPOLOGY", prefix.to_owned()),
        ("AVSYNC_PARTITIONS", PARTITIONS.to_string()),
        ("AVSYNC_METRICS_LISTEN", "127.0.0.1:0".to_owned()),
        ("AVSYNC_TENANT_DATABASE_URL", template.to_owned()),
        ("AVSYNC_CREATE_TENANT_DATABASES", "true".to_owned()),
        (
            "AVSYNC_MAX_CONNECTIONS",
            worker_harness::TEST_MAX_CONNECTIONS.to_owned(),
        ),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    let worker = Process::spawn("avsync-worker", &env);
    let listening = worker.wait_for_log("worker listening").await;
    let addr = listening["metrics_addr"].as_str().expect("metrics_addr");
    let metrics = format!("http://{addr}");
    let ready = format!("{metrics}/readyz");
    wait_until("worker /readyz 200", Duration::from_secs(30), || async {
        let status = reqwest::get(&ready).await.ok()?.status();
        status.is_success().then_some(())
    })
    .await;
    (worker, metrics)
}

/// `avsync_worker_events_total{outcome="applied"}`, summed over types.
async fn applied(metrics: &str) -> u64 {
    let Ok(response) = reqwest::get(format!("{metrics}/metrics")).await else {
        return 0;
    };
    let text = response.text().await.unwrap_or_default();
    let scrape = avsync_tests::demo::prom::Scrape::parse(&text).unwrap_or_default();
    scrape.sum("avsync_worker_events_total", &[("outcome", "applied")]) as u64
}

const TENANTS: [&str; 3] = ["t0", "t1", "t2"];

fn joined(n: usize) -> Vec<u8> {
    let tenant = TENANTS[n % TENANTS.len()];
    json!({
        "id": format!("s-{n}"),
        "type": "member.joined",
        "timestamp": "2026-08-21T01:00:00.000Z",
        "tenant_id": tenant,
        "application_id": "app_test",
        "data": {"sub": format!("u{n}"), "tenant_roles": ["member"]},
    })
    .to_string()
    .into_bytes()
}

/// Rows in every tenant database of the test (a database not created yet counts 0).
async fn rows(dbs: &TestDatabases) -> i64 {
    let mut total = 0;
    for tenant in TENANTS {
        let url = support::database_url(&dbs.name(tenant));
        if let Ok(mut conn) = sqlx::PgConnection::connect(&url).await {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM av_identities")
                .fetch_one(&mut conn)
                .await
                .unwrap_or(0);
            total += n;
            let _ = conn.close().await;
        }
    }
    total
}

/// SIGTERM to a worker in the middle of 5,000 events: it stops consuming, finishes and acks
/// everything it holds, exits 0; a restarted worker applies the rest. Every event is applied,
/// none dead-lettered, and none twice but for deliveries still under way when the broker
/// confirmed the first worker's cancel (a quorum queue may send some, which lapin drops and
/// the broker hands back): at most the first worker's prefetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_finishes_in_flight_messages_and_exits_zero() {
    const EVENTS: usize = 5_000;
    const PREFETCH: u64 = 64;
    let prefix = support::unique("shut");
    let _cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("shut");
    let (_conn, ch) = publisher(&topology).await;
    let bodies: Vec<Vec<u8>> = (0..EVENTS).map(joined).collect();
    publish_all(&ch, &topology, &bodies[..1_000]).await;

    let prefetch = PREFETCH.to_string();
    let (mut first, metrics) = spawn_worker(
        &prefix,
        &dbs.template(),
        &[("AVSYNC_PREFETCH", prefetch.as_str())],
    )
    .await;
    // The stream goes on while the first worker stops: a thousand more right after SIGTERM,
    // the last thousand once it has exited.
    let chunk = |range: std::ops::Range<usize>| bodies[range].to_vec();
    let (before, during) = (chunk(1_000..3_000), chunk(3_000..4_000));
    let signalled = Arc::new(tokio::sync::Notify::new());
    let (stream_topology, after_signal) = (topology.clone(), signalled.clone());
    let stream = tokio::spawn(async move {
        let (_conn, ch) = publisher(&stream_topology).await;
        for chunk in before.chunks(500) {
            publish_all(&ch, &stream_topology, chunk).await;
        }
        after_signal.notified().await;
        for chunk in during.chunks(500) {
            publish_all(&ch, &stream_topology, chunk).await;
        }
    });
    wait_until(
        "the first worker applies 200",
        Duration::from_secs(60),
        || async { (applied(&metrics).await >= 200).then_some(()) },
    )
    .await;
    let stopping = Instant::now();
    first.sigterm().await;
    signalled.notify_one();
    assert_eq!(first.exit_code().await, Some(0), "{:#?}", first.logs());
    let stopped_in = stopping.elapsed();
    assert!(
        first
            .logs()
            .iter()
            .any(|l| l.contains("\"worker stopped\"")),
        "{:#?}",
        first.logs()
    );
    stream.await.expect("the stream publishes every event");

    let by_first = rows(&dbs).await;
    assert!(
        by_first > 0 && by_first < EVENTS as i64,
        "the first worker applied {by_first} before it stopped"
    );

    publish_all(&ch, &topology, &bodies[4_000..]).await;

    let (mut second, metrics) = spawn_worker(&prefix, &dbs.template(), &[]).await;
    wait_until("all 5,000 applied", Duration::from_secs(180), || async {
        (rows(&dbs).await == EVENTS as i64).then_some(())
    })
    .await;
    // Counted once acknowledged, so a moment after the commit; a message handed back by the
    // first worker would have been delivered before the queues ran empty.
    let rest = EVENTS as u64 - by_first as u64;
    let by_second = wait_until("the queues drained", Duration::from_secs(30), || async {
        let n = applied(&metrics).await;
        for p in 0..PARTITIONS {
            if support::queue_depth(&ch, &topology.partition_queue(p)).await != Some(0) {
                return None;
            }
        }
        (n >= rest).then_some(n)
    })
    .await;
    assert!(
        by_second >= rest && by_second <= rest + PREFETCH,
        "the second worker applied what the first had not ({rest}), and at most the first's \
         prefetch ({PREFETCH}) again: it applied {by_second}"
    );
    assert_eq!(
        support::queue_depth(&ch, &topology.dead_queue()).await,
        Some(0),
        "nothing was dead-lettered"
    );
    second.sigterm().await;
    assert_eq!(second.exit_code().await, Some(0), "{:#?}", second.logs());
    assert!(
        stopped_in < Duration::from_secs(35),
        "the first worker took {stopped_in:?} to stop"
    );
}

/// The fields of a log line: the event's own and those of the spans it was logged in.
fn fields(line: &Value) -> BTreeMap<String, Value> {
    let mut all = BTreeMap::new();
    for span in line["spans"].as_array().into_iter().flatten() {
        if let Some(map) = span.as_object() {
            all.extend(map.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }
    if let Some(map) = line.as_object() {
        all.extend(map.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    all
}

/// Sends one request over a raw connection and returns the status line's code.
async fn post_raw(addr: &str, headers: &[(&str, String)], body: &[u8]) -> u16 {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(&request_head(headers, body.len()))
        .await
        .expect("write head");
    stream.write_all(body).await.expect("write body");
    read_status(&mut stream).await
}

fn request_head(headers: &[(&str, String)], length: usize) -> Vec<u8> {
    let mut head = format!(
        "POST /webhooks/authvital HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n"
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// The status code of the next final (non-1xx) response on `stream`.
async fn read_status(stream: &mut TcpStream) -> u16 {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&seen).into_owned();
        let finals = text
            .split("\r\n\r\n")
            .filter(|part| part.starts_with("HTTP/1.1 ") && !part.starts_with("HTTP/1.1 1"))
            .filter_map(|part| part.get(9..12)?.parse().ok())
            .next();
        if let Some(code) = finals {
            return code;
        }
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf))
            .await
            .expect("an answer within 30 s")
            .expect("read");
        assert!(n > 0, "connection closed without an answer: {text}");
        seen.extend_from_slice(&buf[..n]);
    }
}

fn standard_headers(secret: &str, id: &str, body: &[u8]) -> Vec<(&'static str, String)> {
    let ts = chrono::Utc::now().timestamp();
    vec![
        ("webhook-id", id.to_owned()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", sign_standard(secret, id, ts, body)),
    ]
}

async fn spawn_ingress(prefix: &str, secret: &str) -> (Process, String, String) {
    processes::spawn_ingress(prefix, PARTITIONS, secret, &[]).await
}

/// SIGTERM while a request is in flight: the ingress stops accepting connections, answers the
/// request in hand (202, published), and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_ingress_finish_a_request_in_flight() {
    let prefix = support::unique("shut");
    let _cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let secret = new_whsec_secret();
    let (mut ingress, addr, _) = spawn_ingress(&prefix, &secret).await;

    let body = json!({
        "id": "in-flight-1",
        "type": "member.joined",
        "timestamp": "2026-08-21T01:00:00.000Z",
        "tenant_id": "acme",
        "data": {"sub": "u1"},
    })
    .to_string()
    .into_bytes();
    let mut headers = standard_headers(&secret, "in-flight-1", &body);
    // The server answers `100 Continue` once the handler reads the body: then it is in flight.
    headers.push(("expect", "100-continue".to_owned()));
    let mut stream = TcpStream::connect(&addr).await.expect("connect");
    stream
        .write_all(&request_head(&headers, body.len()))
        .await
        .expect("write head");
    let mut interim = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut interim))
        .await
        .expect("100 Continue within 10 s")
        .expect("read");
    assert!(
        interim[..n].starts_with(b"HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&interim[..n])
    );

    ingress.sigterm().await;
    wait_until(
        "the listener to refuse new connections",
        Duration::from_secs(10),
        || async { TcpStream::connect(&addr).await.is_err().then_some(()) },
    )
    .await;
    stream.write_all(&body).await.expect("write the body");
    assert_eq!(read_status(&mut stream).await, 202);
    assert_eq!(ingress.exit_code().await, Some(0), "{:#?}", ingress.logs());

    let (_conn, ch) = support::channel().await;
    let partition = topology.partition_queue(topology.partition_of(&"acme".parse().unwrap()));
    assert_eq!(support::queue_depth(&ch, &partition).await, Some(1));
}

/// JSON logs of both binaries: every line is JSON; a queued webhook names its event id, tenant
/// and type; a worker's failure lines name event id, tenant, type and partition, and a retry its
/// attempt; no line holds the database password, the webhook secret or anything of a payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_carry_event_fields_and_never_a_secret_or_payload() {
    let prefix = support::unique("shut");
    let _cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let dbs = TestDatabases::new("shut");
    dbs.migrated("ready").await;
    let password = format!("db-pw-{}", support::unique("canary"));
    let template = format!(
        "postgres://postgres:{password}@127.0.0.1:5432/{}_{{tenant_id}}",
        dbs.prefix()
    );
    let secret = new_whsec_secret();
    let (mut worker, _) = spawn_worker(
        &prefix,
        &template,
        &[
            ("AVSYNC_CREATE_TENANT_DATABASES", "false"),
            ("AVSYNC_RETRY_DELAYS", "1s"),
        ],
    )
    .await;
    let (mut ingress, addr, _) = spawn_ingress(&prefix, &secret).await;

    let payload_marker = "payload-canary-Qx7";
    let events = [
        ("ok-1", "ready", "2026-08-21T01:00:00.000Z"),
        ("bad-time-1", "ready", "yesterday"),
        ("no-db-1", "missing", "2026-08-21T01:00:00.000Z"),
    ];
    for (id, tenant, timestamp) in events {
        let body = json!({
            "id": id,
            "type": "member.joined",
            "timestamp": timestamp,
            "tenant_id": tenant,
            "data": {"sub": "u1", "email": format!("{payload_marker}@x.test"), "given_name": payload_marker},
        })
        .to_string()
        .into_bytes();
        let headers = standard_headers(&secret, id, &body);
        assert_eq!(post_raw(&addr, &headers, &body).await, 202);
    }
    worker
        .wait_for_log("permanent failure; dead-lettered")
        .await;
    worker
        .wait_for_log("transient failure outlasted every retry; dead-lettered")
        .await;
    ingress.sigterm().await;
    worker.sigterm().await;
    assert_eq!(ingress.exit_code().await, Some(0));
    assert_eq!(worker.exit_code().await, Some(0));

    let parse = |lines: Vec<String>| -> Vec<Value> {
        lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
            .collect()
    };
    let ingress_lines = parse(ingress.logs());
    let worker_lines = parse(worker.logs());
    let queued: Vec<_> = ingress_lines
        .iter()
        .filter(|l| l["message"] == "webhook queued")
        .map(fields)
        .collect();
    assert_eq!(queued.len(), 3);
    for f in &queued {
        for key in ["event_id", "tenant", "type"] {
            assert!(f.contains_key(key), "{key} missing: {f:?}");
        }
    }
    let failures: Vec<_> = worker_lines
        .iter()
        .filter(|l| l["level"] == "ERROR" || l["level"] == "WARN")
        .map(fields)
        .filter(|f| f.contains_key("event_id"))
        .collect();
    for id in ["bad-time-1", "no-db-1"] {
        let of_event: Vec<_> = failures.iter().filter(|f| f["event_id"] == id).collect();
        assert!(
            !of_event.is_empty(),
            "no failure line names {id}: {worker_lines:#?}"
        );
        for f in of_event {
            for key in ["tenant", "type", "partition"] {
                assert!(f.contains_key(key), "{key} missing: {f:?}");
            }
        }
    }
    assert!(
        failures
            .iter()
            .any(|f| f["event_id"] == "no-db-1" && f.contains_key("attempt")),
        "a retry names its attempt: {failures:#?}"
    );
    let decoded_secret = secret.trim_start_matches("whsec_");
    for line in ingress.logs().iter().chain(&worker.logs()) {
        for leak in [password.as_str(), decoded_secret, payload_marker] {
            assert!(!line.contains(leak), "`{leak}` in a log line: {line}");
        }
    }
}

/// SIGINT (Ctrl-C in a terminal) stops both binaries as SIGTERM does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_both_binaries_gracefully() {
    let prefix = support::unique("shut");
    let _cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let dbs = TestDatabases::new("shut");
    let (mut worker, _) = spawn_worker(&prefix, &dbs.template(), &[]).await;
    let (mut ingress, _, _) = spawn_ingress(&prefix, &new_whsec_secret()).await;
    worker.signal("-INT").await;
    ingress.signal("-INT").await;
    assert_eq!(worker.exit_code().await, Some(0), "{:#?}", worker.logs());
    assert_eq!(ingress.exit_code().await, Some(0), "{:#?}", ingress.logs());
    worker.wait_for_log("worker stopped").await;
    ingress.wait_for_log("ingress stopped").await;
}

/// One whole response on a keep-alive connection: its status and whether it says
/// `Connection: close`; None when the connection ended (closed or reset) before a whole one.
async fn read_answer(stream: &mut TcpStream) -> Option<(u16, bool)> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    };
    let head = String::from_utf8_lossy(&seen[..head_end]).to_ascii_lowercase();
    let status = head.get(9..12)?.parse().ok()?;
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    };
    let length: usize = header("content-length")?.parse().ok()?;
    while seen.len() < head_end + length {
        match tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
    Some((status, header("connection").as_deref() == Some("close")))
}

/// A whole signed request for event `id` of tenant `acme`.
fn signed_request(secret: &str, id: &str) -> Vec<u8> {
    let body = json!({
        "id": id, "type": "member.joined", "timestamp": "2026-08-21T01:00:00.000Z",
        "tenant_id": "acme", "data": {"sub": "u1"},
    })
    .to_string()
    .into_bytes();
    let mut bytes = request_head(&standard_headers(secret, id, &body), body.len());
    bytes.extend_from_slice(&body);
    bytes
}

/// SIGTERM while eight keep-alive connections each send request after request: every request
/// that was sent gets a whole answer (202 or 503), never a reset or a close without one; the
/// answers from the signal on say `Connection: close`, so each connection ends right after its
/// current answer; a keep-alive connection idle at the signal is closed cleanly (FIN, no reset).
/// Every 202 is in the queue, and the ingress exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_keep_alive_streams_answers_every_request_sent() {
    const CONNECTIONS: usize = 8;
    let prefix = support::unique("shut");
    let _cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let secret = new_whsec_secret();
    let (mut ingress, addr, _) = spawn_ingress(&prefix, &secret).await;
    let mut idle = TcpStream::connect(&addr).await.expect("connect");
    idle.write_all(&signed_request(&secret, "ka-idle"))
        .await
        .expect("write");
    assert_eq!(
        read_answer(&mut idle).await,
        Some((202, false)),
        "kept alive"
    );

    let sent = Arc::new(AtomicUsize::new(0));
    let streams: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let addr = addr.clone();
            let sent = sent.clone();
            let secret = secret.clone();
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(&addr).await.expect("connect");
                let mut statuses = Vec::new();
                for n in 0.. {
                    let id = format!("ka-{c}-{n}");
                    stream
                        .write_all(&signed_request(&secret, &id))
                        .await
                        .map_err(|e| format!("{id}: could not be sent: {e}"))?;
                    sent.fetch_add(1, Ordering::SeqCst);
                    match read_answer(&mut stream).await {
                        Some((status, close)) => {
                            statuses.push(status);
                            if close {
                                break;
                            }
                        }
                        None => return Err(format!("{id}: sent, but no whole answer")),
                    }
                }
                Ok::<_, String>(statuses)
            })
        })
        .collect();
    wait_until("a stream of requests", Duration::from_secs(30), || async {
        (sent.load(Ordering::SeqCst) >= CONNECTIONS * 5).then_some(())
    })
    .await;
    ingress.sigterm().await;
    let signalled = Instant::now();

    let mut sink = [0u8; 64];
    let idle_end = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut sink))
        .await
        .expect("the idle connection is closed");
    assert!(
        matches!(idle_end, Ok(0)),
        "the idle connection ends with a clean close: {idle_end:?}"
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "{:?}",
        signalled.elapsed()
    );

    let mut accepted = 1;
    let mut answered = 0;
    for stream in streams {
        let statuses = stream
            .await
            .expect("stream task")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            statuses.iter().all(|s| *s == 202 || *s == 503),
            "{statuses:?}"
        );
        accepted += statuses.iter().filter(|s| **s == 202).count();
        answered += statuses.len();
    }
    assert_eq!(answered, sent.load(Ordering::SeqCst));
    assert_eq!(ingress.exit_code().await, Some(0), "{:#?}", ingress.logs());

    let (_conn, ch) = support::channel().await;
    let partition = topology.partition_queue(topology.partition_of(&"acme".parse().unwrap()));
    assert_eq!(
        support::queue_depth(&ch, &partition).await,
        Some(u32::try_from(accepted).unwrap()),
        "every 202 is in the queue"
    );
}

/// A listen address already taken stops the ingress with one plain line on stderr naming the
/// setting, and a non-zero exit, as the worker does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_port_in_use_is_one_line_naming_the_setting() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("address").to_string();
    for setting in ["AVSYNC_LISTEN", "AVSYNC_METRICS_LISTEN"] {
        let mut env = vec![
            ("AVSYNC_AMQP_URL", support::AMQP_URL.to_owned()),
            ("AVSYNC_TOPOLOGY", support::unique("shut")),
            ("AVSYNC_LISTEN", "127.0.0.1:0".to_owned()),
            ("AVSYNC_METRICS_LISTEN", "127.0.0.1:0".to_owned()),
            ("AVSYNC_HMAC_SECRETS", new_whsec_secret()),
        ];
        env.retain(|(k, _)| *k != setting);
        env.push((setting, taken_addr.clone()));
        let mut ingress = Process::spawn("avsync-ingress", &env);
        assert_eq!(ingress.exit_code().await, Some(1), "{setting}");
        let logs = wait_until("the stderr line", Duration::from_secs(5), || async {
            let logs = ingress.logs();
            (!logs.is_empty()).then_some(logs)
        })
        .await;
        assert_eq!(logs.len(), 1, "{setting}: {logs:#?}");
        let want = format!("avsync-ingress: cannot listen on {setting}={taken_addr}: ");
        assert!(logs[0].starts_with(&want), "{setting}: {}", logs[0]);
    }
}
