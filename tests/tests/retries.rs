//! Retries, exhaustion, poison and PostgreSQL outages over the real broker and database: a
//! failing tenant never holds up a healthy one, every event ends applied or in `avsync.dead` with
//! its reason, and the operator can fix the cause and replay without losing or doubling anything.

use avsync_shared::config::CommonArgs;
use avsync_shared::topology::Topology;
use avsync_shared::TenantId;
use avsync_tests::support::{self, queue_depth, wait_until, TcpProxy, TopologyCleanup};
use avsync_tests::worker_harness::{
    model_of, publish, publisher, settings, take_dead_letters, TestDatabases, TestWorker,
};
use avsync_worker::metrics::Outcome;
use avsync_worker::ops::dlq_cli::{self, DlqCommand, ListArgs};
use avsync_worker::ops::dlq_select::{Filters, Selection};
use lapin::options::{BasicGetOptions, BasicNackOptions};
use std::time::Duration;

const PARTITIONS: u16 = 1;

fn event(id: &str, tenant: &str, sub: &str, ms: u32) -> Vec<u8> {
    format!(
        r#"{{"id":"{id}","type":"member.joined","tenant_id":"{tenant}","timestamp":"2026-11-27T10:00:00.{ms:03}Z","application_id":"app","data":{{"sub":"{sub}","membership_id":"m-{sub}","tenant_roles":["r{ms}"],"email":"{sub}@x.test"}}}}"#
    )
    .into_bytes()
}

fn history(tenant: &str, n: u32) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| event(&format!("{tenant}-{i}"), tenant, &format!("u{}", i % 3), i))
        .collect()
}

fn common(prefix: &str) -> CommonArgs {
    CommonArgs {
        amqp_url: support::AMQP_URL.to_owned(),
        topology: prefix.to_owned(),
        partitions: PARTITIONS,
        metrics_listen: "127.0.0.1:0".parse().expect("address"),
        log_format: "text".to_owned(),
    }
}

async fn list_json(prefix: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    dlq_cli::run_to(
        DlqCommand::List(ListArgs {
            filters: Filters::default(),
            limit: None,
            json: true,
        }),
        &common(prefix),
        &mut out,
    )
    .await
    .expect("dlq list");
    String::from_utf8(out)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

/// With a 30 s first retry delay, the healthy tenant's events are all committed while the
/// failing tenant's wait in the retry tier: the partition they share is not blocked.
#[tokio::test]
async fn a_failing_tenant_waits_in_the_broker_while_its_partition_flows() {
    let prefix = support::unique("rt");
    const RETRY_DELAYS: &str = "30s,1m";
    let _cleanup = TopologyCleanup::new(&prefix, PARTITIONS).with_retry_delays(RETRY_DELAYS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("rt");
    dbs.migrated("good").await;
    let worker = TestWorker::start(settings(
        &prefix,
        PARTITIONS,
        &dbs,
        &[
            "--create-tenant-databases",
            "false",
            "--retry-delays",
            RETRY_DELAYS,
        ],
    ))
    .await;
    let (_conn, ch) = publisher(&topology).await;
    let bad = history("bad", 10);
    let good = history("good", 30);
    for (b, g) in bad.iter().zip(good.chunks(3)) {
        publish(&ch, &topology, b).await;
        for body in g {
            publish(&ch, &topology, body).await;
        }
    }

    let expected = model_of(&good).identities();
    dbs.wait_for_rows("good", &expected, Duration::from_secs(30))
        .await;
    let tier = topology.retry_tier(Duration::from_secs(30));
    wait_until(
        "the failing tenant's events in the 30 s tier",
        Duration::from_secs(20),
        || async { (queue_depth(&ch, &tier).await == Some(10)).then_some(()) },
    )
    .await;
    assert_eq!(queue_depth(&ch, &topology.dead_queue()).await, Some(0));
    assert!(
        dbs.rows("bad").await.is_none(),
        "nothing reached a database for the failing tenant"
    );
    assert_eq!(worker.events("member.joined", Outcome::Retried), 10);
    worker.stop().await;
}

/// Every retry, then `exhausted` with the contract's headers; the operator provisions the
/// database and replays: every event applied once in effect, the dead-letter queue empty.
#[tokio::test]
async fn exhausted_events_are_dead_lettered_with_their_history_and_replay_after_the_fix() {
    let prefix = support::unique("rx");
    const RETRY_DELAYS: &str = "100ms,200ms,300ms";
    let _cleanup = TopologyCleanup::new(&prefix, PARTITIONS).with_retry_delays(RETRY_DELAYS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("rx");
    dbs.migrated("good").await;
    let worker = TestWorker::start(settings(
        &prefix,
        PARTITIONS,
        &dbs,
        &[
            "--create-tenant-databases",
            "false",
            "--retry-delays",
            RETRY_DELAYS,
        ],
    ))
    .await;
    let (_conn, ch) = publisher(&topology).await;
    let bad = history("bad", 6);
    let good = history("good", 6);
    for body in bad.iter().chain(&good) {
        publish(&ch, &topology, body).await;
    }
    dbs.wait_for_rows(
        "good",
        &model_of(&good).identities(),
        Duration::from_secs(30),
    )
    .await;

    let rows = wait_until(
        "six exhausted dead letters",
        Duration::from_secs(30),
        || async {
            let rows = list_json(&prefix).await;
            (rows.len() == 6).then_some(rows)
        },
    )
    .await;
    for row in &rows {
        assert_eq!(row["tenant_id"], "bad");
        assert_eq!(row["error_class"], "exhausted");
        assert_eq!(row["attempts"], 4, "the first try and three retries: {row}");
        assert!(
            row["error"]
                .as_str()
                .unwrap()
                .contains("not yet provisioned"),
            "{row}"
        );
        let first = chrono::DateTime::parse_from_rfc3339(row["first_failure"].as_str().unwrap())
            .expect("first_failure is RFC 3339");
        let last = chrono::DateTime::parse_from_rfc3339(row["last_failure"].as_str().unwrap())
            .expect("last_failure is RFC 3339");
        assert!(
            last - first >= chrono::Duration::milliseconds(450),
            "the retries waited their delays (less jitter): {row}"
        );
    }
    assert_eq!(worker.events("member.joined", Outcome::DeadLettered), 6);

    dbs.migrated("bad").await;
    let mut out = Vec::new();
    dlq_cli::run_to(
        DlqCommand::Replay(Selection {
            filters: Filters {
                tenant: Some("bad".into()),
                ..Filters::default()
            },
            all: false,
        }),
        &common(&prefix),
        &mut out,
    )
    .await
    .unwrap();
    assert_eq!(String::from_utf8(out).unwrap().trim(), "replayed 6");
    dbs.wait_for_rows("bad", &model_of(&bad).identities(), Duration::from_secs(30))
        .await;
    wait_until(
        "an empty dead-letter queue",
        Duration::from_secs(10),
        || async { (queue_depth(&ch, &topology.dead_queue()).await == Some(0)).then_some(()) },
    )
    .await;
    dbs.wait_for_rows(
        "good",
        &model_of(&good).identities(),
        Duration::from_secs(5),
    )
    .await;
    worker.stop().await;
}

/// A message that was delivered the poison number of times without being settled (each time its
/// consumer died) is dead-lettered as `poison` without being applied, and the partition flows on.
#[tokio::test]
async fn a_poison_message_is_dead_lettered_and_the_partition_keeps_flowing() {
    let prefix = support::unique("rp");
    let _cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("rp");
    let (_conn, ch) = publisher(&topology).await;
    let poison = event("poison-1", "acme", "u-poison", 1);
    publish(&ch, &topology, &poison).await;
    let queue = topology.partition_queue(topology.partition_of(&TenantId::parse("acme").unwrap()));
    for _ in 0..5 {
        let delivery = wait_until("the poison message", Duration::from_secs(10), || async {
            ch.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .unwrap()
                .map(|m| m.delivery)
        })
        .await;
        delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let healthy = history("acme", 5);
    for body in &healthy {
        publish(&ch, &topology, body).await;
    }
    let worker = TestWorker::start(settings(
        &prefix,
        PARTITIONS,
        &dbs,
        &["--poison-deliveries", "5"],
    ))
    .await;
    dbs.wait_for_rows(
        "acme",
        &model_of(&healthy).identities(),
        Duration::from_secs(30),
    )
    .await;
    let letters = wait_until(
        "the poison dead letter",
        Duration::from_secs(10),
        || async {
            let letters = take_dead_letters(&ch, &topology).await;
            (!letters.is_empty()).then_some(letters)
        },
    )
    .await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].message_id, "poison-1");
    assert_eq!(letters[0].class, "poison");
    assert_eq!(letters[0].body, poison, "body byte for byte");
    assert!(
        dbs.rows("acme")
            .await
            .unwrap()
            .iter()
            .all(|r| r.id != "u-poison"),
        "the poison message was not applied"
    );
    worker.stop().await;
}

/// PostgreSQL unreachable for every tenant (the worker reaches it through a proxy the test cuts):
/// the worker holds its messages and backs off, nothing is retried or dead-lettered in that
/// window, and everything applies by itself once the database is back.
#[tokio::test]
async fn a_postgres_outage_pauses_the_worker_and_loses_nothing() {
    let prefix = support::unique("ro");
    const RETRY_DELAYS: &str = "100ms";
    let _cleanup = TopologyCleanup::new(&prefix, PARTITIONS).with_retry_delays(RETRY_DELAYS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("ro");
    let proxy = TcpProxy::start("127.0.0.1:5432").await;
    let template = format!(
        "postgres://postgres@127.0.0.1:{}/{}_{{tenant_id}}",
        proxy.port,
        dbs.prefix()
    );
    let worker = TestWorker::start(settings(
        &prefix,
        PARTITIONS,
        &dbs,
        &[
            "--tenant-database-url",
            &template,
            "--retry-delays",
            RETRY_DELAYS,
        ],
    ))
    .await;
    let (_conn, ch) = publisher(&topology).await;
    let warmup = history("one", 1);
    publish(&ch, &topology, &warmup[0]).await;
    dbs.wait_for_rows(
        "one",
        &model_of(&warmup).identities(),
        Duration::from_secs(30),
    )
    .await;

    proxy.cut();
    let one = history("one", 12);
    let two = history("two", 12);
    for body in one.iter().chain(&two) {
        publish(&ch, &topology, body).await;
    }
    // A bounded window of observation: the worker must keep every message (none retried, none
    // dead-lettered) for as long as the database is away.
    let window = std::time::Instant::now();
    while window.elapsed() < Duration::from_secs(4) {
        assert_eq!(queue_depth(&ch, &topology.dead_queue()).await, Some(0));
        assert_eq!(
            queue_depth(&ch, &topology.retry_tier(Duration::from_millis(100))).await,
            Some(0)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(worker.events("member.joined", Outcome::Retried), 0);
    assert_eq!(worker.events("member.joined", Outcome::DeadLettered), 0);

    proxy.restore();
    let all_one: Vec<Vec<u8>> = warmup.iter().chain(&one).cloned().collect();
    dbs.wait_for_rows(
        "one",
        &model_of(&all_one).identities(),
        Duration::from_secs(60),
    )
    .await;
    dbs.wait_for_rows("two", &model_of(&two).identities(), Duration::from_secs(30))
        .await;
    assert_eq!(queue_depth(&ch, &topology.dead_queue()).await, Some(0));
    worker.stop().await;
}
