//! A running worker over the real broker and PostgreSQL: applies and acks, ignores what sets
//! nothing without touching a database, dead-letters permanent failures at once, retries
//! transient ones, serves health without the broker, refuses a short partition count, resolves
//! through the registry, and finishes its in-flight messages on shutdown.

use avsync_shared::topology::Topology;
use avsync_tests::support::{self, queue_depth, wait_until, TopologyCleanup};
use avsync_tests::worker_harness::{
    model_of, publish, publish_all, publisher, random_history, settings, take_dead_letters,
    wait_for_dead_letters, TestDatabases, TestWorker,
};
use avsync_worker::metrics::Outcome;
use serde_json::json;
use sqlx::Connection;
use std::time::Duration;

const PARTITIONS: u16 = 4;

fn event(
    id: &str,
    event_type: &str,
    tenant: &str,
    timestamp: &str,
    data: serde_json::Value,
) -> Vec<u8> {
    json!({"id": id, "type": event_type, "tenant_id": tenant, "timestamp": timestamp,
           "application_id": "app_test", "data": data})
    .to_string()
    .into_bytes()
}

async fn total_depth(ch: &lapin::Channel, topology: &Topology) -> u32 {
    let mut total = 0;
    for p in 0..topology.partitions() {
        total += queue_depth(ch, &topology.partition_queue(p))
            .await
            .unwrap_or(0);
    }
    total
}

#[tokio::test]
async fn applies_a_history_and_settles_every_message() {
    let prefix = support::unique("wcon");
    let _topology_cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("wcon");
    let (_conn, ch) = publisher(&topology).await;
    let worker = TestWorker::start(settings(&prefix, PARTITIONS, &dbs, &[])).await;
    assert_eq!(worker.status("/readyz").await, 200);

    let bodies = random_history(7, "acme", 3, 40);
    publish_all(&ch, &topology, &bodies).await;
    dbs.wait_for_rows(
        "acme",
        &model_of(&bodies).identities(),
        Duration::from_secs(30),
    )
    .await;
    wait_until("every message settled", Duration::from_secs(10), || async {
        (total_depth(&ch, &topology).await == 0).then_some(())
    })
    .await;
    let metrics = worker.metrics_text().await;
    for line in [
        "avsync_worker_events_total{outcome=\"applied\",type=\"member.joined\"}",
        "avsync_worker_events_total{outcome=\"dead_lettered\",type=\"other\"} 0",
        "avsync_worker_apply_seconds_count",
        "avsync_worker_lag_seconds_count",
        "avsync_worker_tenant_pools 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    assert!(take_dead_letters(&ch, &topology).await.is_empty());
    worker.stop().await;
}

#[tokio::test]
async fn what_sets_nothing_is_ignored_without_resolving_the_tenant() {
    let prefix = support::unique("wign");
    let _topology_cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("wign");
    let (_conn, ch) = publisher(&topology).await;
    let worker = TestWorker::start(settings(
        &prefix,
        PARTITIONS,
        &dbs,
        &["--application-id", "app_test"],
    ))
    .await;

    let ts = "2026-08-21T01:00:00Z";
    let mut foreign = event("e5", "member.joined", "acme", ts, json!({"sub": "u1"}));
    foreign = String::from_utf8(foreign)
        .unwrap()
        .replace("app_test", "app_other")
        .into_bytes();
    let without_app = br#"{"id":"e6","type":"member.joined","tenant_id":"acme","timestamp":"2026-08-21T01:00:00Z","data":{"sub":"u1"}}"#.to_vec();
    let bodies = [
        event("e1", "invite.created", "acme", ts, json!({"email": "a@x"})),
        event(
            "e2",
            "license.assigned",
            "acme",
            "not a time",
            json!({"sub": "u1"}),
        ),
        event("e3", "tenant.created", "acme", ts, json!(null)),
        event(
            "e4",
            "subject.updated",
            "acme",
            ts,
            json!({"sub": "u1", "changed_fields": ["locale"]}),
        ),
        foreign,
        without_app,
    ];
    for b in &bodies {
        publish(&ch, &topology, b).await;
    }
    wait_until("six ignored events", Duration::from_secs(20), || async {
        let n: u64 = [
            "invite.created",
            "license.assigned",
            "other",
            "subject.updated",
            "member.joined",
        ]
        .iter()
        .map(|t| worker.events(t, Outcome::Ignored))
        .sum();
        (n == 6).then_some(())
    })
    .await;
    assert_eq!(worker.events("other", Outcome::Ignored), 1);
    assert_eq!(worker.events("member.joined", Outcome::Ignored), 2);
    assert!(
        dbs.existing().await.is_empty(),
        "no tenant database was even created"
    );
    assert_eq!(total_depth(&ch, &topology).await, 0);
    assert!(take_dead_letters(&ch, &topology).await.is_empty());
    worker.stop().await;
}

#[tokio::test]
async fn permanent_failures_are_dead_lettered_at_once_and_write_nothing() {
    let prefix = support::unique("wperm");
    let _topology_cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("wperm");
    let (_conn, ch) = publisher(&topology).await;
    let worker = TestWorker::start(settings(&prefix, PARTITIONS, &dbs, &[])).await;

    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not json".to_vec(), "undecodable payload"),
        (b"[1,2,3]".to_vec(), "not a JSON object"),
        (br#"{"id":"x1","type":"member.joined","timestamp":"2026-08-21T01:00:00Z","data":{"sub":"u"}}"#.to_vec(), "tenant_id"),
        (br#"{"id":"x2","type":"member.joined","tenant_id":"../acme","timestamp":"2026-08-21T01:00:00Z","data":{"sub":"u"}}"#.to_vec(), "tenant_id must be"),
        (event("x3", "member.joined", "acme", "2026-08-21 01:00:00", json!({"sub": "u"})), "timestamp"),
        (event("x4", "member.joined", "acme", "1787276405", json!({"sub": "u"})), "timestamp"),
        (event("x5", "app_access.revoked", "acme", "2026-08-21T01:00:00Z", json!({"email": "a@x"})), "data.sub"),
        (event("x6", "subject.created", "acme", "2026-08-21T01:00:00Z", json!({"sub": "u", "email": "a\u{0}b"})), "NUL"),
    ];
    for (body, _) in &cases {
        publish(&ch, &topology, body).await;
    }
    let letters = wait_for_dead_letters(&ch, &topology, cases.len(), Duration::from_secs(20)).await;
    assert_eq!(letters.len(), cases.len());
    for (body, expected) in &cases {
        let letter = letters
            .iter()
            .find(|l| &l.body == body)
            .unwrap_or_else(|| panic!("no dead letter for {}", String::from_utf8_lossy(body)));
        assert_eq!(letter.class, "permanent");
        assert!(
            letter.error.contains(expected),
            "{:?} should mention {expected:?}",
            letter.error
        );
    }
    assert!(
        dbs.existing().await.is_empty(),
        "nothing reached a database"
    );
    assert_eq!(total_depth(&ch, &topology).await, 0);
    wait_until("dead-letter counters", Duration::from_secs(5), || async {
        let n: u64 = [
            "other",
            "member.joined",
            "app_access.revoked",
            "subject.created",
        ]
        .iter()
        .map(|t| worker.events(t, Outcome::DeadLettered))
        .sum();
        (n == cases.len() as u64).then_some(())
    })
    .await;
    worker.stop().await;
}

#[tokio::test]
async fn a_missing_database_is_retried_until_it_is_provisioned() {
    let prefix = support::unique("wprov");
    let _topology_cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("wprov");
    let (_conn, ch) = publisher(&topology).await;
    let worker = TestWorker::start(settings(
        &prefix,
        PARTITIONS,
        &dbs,
        &["--create-tenant-databases", "false"],
    ))
    .await;
    let body = event(
        "p1",
        "member.joined",
        "late",
        "2026-08-21T01:00:00Z",
        json!({"sub": "u1"}),
    );
    publish(&ch, &topology, &body).await;
    wait_until("a retry", Duration::from_secs(20), || async {
        (worker.events("member.joined", Outcome::Retried) >= 1).then_some(())
    })
    .await;
    assert!(
        dbs.existing().await.is_empty(),
        "never created without the setting"
    );
    assert!(take_dead_letters(&ch, &topology).await.is_empty());

    let conn = dbs.migrated("late").await;
    let _ = conn.close().await;
    let expected = model_of(&[body]).identities();
    dbs.wait_for_rows("late", &expected, Duration::from_secs(20))
        .await;
    worker.stop().await;
}

#[tokio::test]
async fn healthz_without_the_broker_and_ready_only_while_consuming() {
    let prefix = support::unique("whealth");
    let dbs = TestDatabases::new("whealth");
    // Nothing listens on port 1: the broker is down.
    let worker = TestWorker::start_unready(settings(
        &prefix,
        PARTITIONS,
        &dbs,
        &["--amqp-url", "amqp://guest:guest@127.0.0.1:1/%2f"],
    ))
    .await;
    assert_eq!(worker.status("/healthz").await, 200);
    assert_eq!(worker.status("/readyz").await, 503);
    assert!(worker
        .metrics_text()
        .await
        .contains("avsync_worker_events_total{outcome=\"ignored\",type=\"license.changed\"} 0"));
    worker.stop().await;
}

#[tokio::test]
async fn a_partition_queue_beyond_the_count_keeps_the_worker_unready() {
    let prefix = support::unique("wpart");
    let _topology_cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let dbs = TestDatabases::new("wpart");
    // The ingress side declared four partitions; this worker believes in two.
    let (_conn, _ch) = publisher(&Topology::new(&prefix, PARTITIONS).unwrap()).await;
    let short = TestWorker::start_unready(settings(&prefix, 2, &dbs, &[])).await;
    let right = TestWorker::start(settings(&prefix, PARTITIONS, &dbs, &[])).await;
    // The broker answers (the right worker consumes); the short one must stay unready.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        assert_eq!(short.status("/readyz").await, 503);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!short.running().is_ready());
    short.stop().await;
    right.stop().await;
}

/// Shutdown stops consuming and finishes what it received: nothing goes back to the queue
/// unsettled, so no message moves toward the poison limit because a worker restarted.
#[tokio::test]
async fn shutdown_finishes_in_flight_messages_instead_of_handing_them_back() {
    let prefix = support::unique("wstop");
    let _topology_cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("wstop");
    let (_conn, ch) = publisher(&topology).await;
    let bodies = random_history(11, "acme", 5, 400);
    publish_all(&ch, &topology, &bodies).await;
    let first = TestWorker::start(settings(&prefix, PARTITIONS, &dbs, &[])).await;
    wait_until("some events applied", Duration::from_secs(20), || async {
        let n: u64 = avsync_shared::event::KNOWN_TYPES
            .iter()
            .chain(&["other"])
            .map(|t| first.events(t, Outcome::Applied) + first.events(t, Outcome::Ignored))
            .sum();
        (n >= 20).then_some(())
    })
    .await;
    first.stop().await;

    // What is left was never delivered: not one message is marked redelivered.
    let (probe_conn, probe) = support::channel().await;
    let queue = topology.partition_queue(topology.partition_of(&"acme".parse().unwrap()));
    let mut left = 0;
    while let Some(m) = probe
        .basic_get(
            queue.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: false },
        )
        .await
        .unwrap()
    {
        assert!(
            !m.delivery.redelivered,
            "a message was handed back on shutdown"
        );
        left += 1;
    }
    let _ = probe_conn.close(200, "probe done".into()).await;
    assert!(left < bodies.len(), "the first worker applied some");

    // A second worker finishes; the result is as if nothing had stopped.
    let second = TestWorker::start(settings(&prefix, PARTITIONS, &dbs, &[])).await;
    dbs.wait_for_rows(
        "acme",
        &model_of(&bodies).identities(),
        Duration::from_secs(60),
    )
    .await;
    second.stop().await;
}

/// The broker closes the worker's connection; the worker reconnects by itself and goes on.
#[tokio::test]
async fn reconnects_after_the_broker_drops_the_connection() {
    let prefix = support::unique("wrecon");
    let _topology_cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("wrecon");
    let (_conn, ch) = publisher(&topology).await;
    let worker = TestWorker::start(settings(&prefix, PARTITIONS, &dbs, &[])).await;

    let name = format!("avsync-worker {prefix}");
    let pid = connection_of(&name).expect("the worker's connection");
    let closed = std::process::Command::new("rabbitmqctl")
        .args([
            "close_connection",
            &pid,
            "test closes the worker's connection",
        ])
        .output()
        .expect("rabbitmqctl close_connection");
    assert!(closed.status.success());

    wait_until(
        "a new connection, consuming",
        Duration::from_secs(20),
        || async {
            let new = connection_of(&name).is_some_and(|p| p != pid);
            (new && worker.running().is_ready()).then_some(())
        },
    )
    .await;
    let body = event(
        "r1",
        "member.joined",
        "acme",
        "2026-08-21T01:00:00Z",
        json!({"sub": "u1"}),
    );
    publish(&ch, &topology, &body).await;
    dbs.wait_for_rows(
        "acme",
        &model_of(&[body]).identities(),
        Duration::from_secs(20),
    )
    .await;
    worker.stop().await;
}

/// The broker's id of the open connection with this name, if any.
fn connection_of(name: &str) -> Option<String> {
    let listed = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&listed.stdout)
        .lines()
        .find(|l| l.contains(&format!("\"{name}\"")))
        .and_then(|l| l.split('\t').next())
        .map(str::to_owned)
}
