//! The broker mechanics the retry path relies on, over the real RabbitMQ: a message published to a
//! retry tier comes back to its own partition after the delay with its history in its headers, and
//! the quorum queue's delivery count tells the worker how often a message went unsettled.

use avsync_shared::broker::headers::TENANT_HEADER;
use avsync_shared::broker::ConfirmedPublisher;
use avsync_shared::topology::Topology;
use avsync_shared::TenantId;
use avsync_tests::support::{self, wait_until};
use avsync_worker::test_support::{publish_retry, History, Retry};
use chrono::Utc;
use lapin::options::{BasicGetOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const PARTITIONS: u16 = 4;
const DELAY: Duration = Duration::from_millis(700);

async fn get(ch: &Channel, queue: &str) -> lapin::message::Delivery {
    wait_until(
        &format!("a message in {queue}"),
        Duration::from_secs(15),
        || async {
            ch.basic_get(queue.into(), BasicGetOptions { no_ack: false })
                .await
                .unwrap()
                .map(|m| m.delivery)
        },
    )
    .await
}

async fn publish_event(
    publisher: &ConfirmedPublisher,
    topology: &Topology,
    tenant: &TenantId,
    body: &[u8],
) {
    let mut headers = BTreeMap::new();
    headers.insert(
        ShortString::from(TENANT_HEADER),
        AMQPValue::LongString(LongString::from(tenant.as_str())),
    );
    publisher
        .publish(
            &topology.events_exchange(),
            &Topology::routing_key(topology.partition_of(tenant)),
            body,
            BasicProperties::default()
                .with_message_id("ev-1".into())
                .with_delivery_mode(2)
                .with_headers(FieldTable::from(headers)),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_retried_message_returns_to_its_partition_after_the_delay_with_its_history() {
    let prefix = support::unique("tier");
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let (conn, ch) = support::channel().await;
    let publisher = ConfirmedPublisher::open(ch.clone()).await.unwrap();
    topology.declare(&ch).await.unwrap();
    topology.declare_retry_tier(&ch, DELAY).await.unwrap();

    let tenant = TenantId::parse("acme").unwrap();
    let queue = topology.partition_queue(topology.partition_of(&tenant));
    let body = br#"{"id":"ev-1","type":"member.joined","tenant_id":"acme","timestamp":"2026-11-27T10:00:00Z","data":{"sub":"u"}}"#;
    publish_event(&publisher, &topology, &tenant, body).await;

    let first = get(&ch, &queue).await;
    let history = History::of(&first);
    assert_eq!(history.unsettled_deliveries, 0);
    assert_eq!(history.failed_attempts, 0);
    let failed_at = Utc::now();
    let sent = Instant::now();
    publish_retry(
        &publisher,
        &topology,
        &first.properties,
        &first.data,
        &Retry {
            tenant: &tenant,
            delay: DELAY,
            failed_attempts: 1,
            first_failure: failed_at,
            error: "tenant database not provisioned",
        },
    )
    .await
    .unwrap();
    first
        .acker
        .ack(lapin::options::BasicAckOptions::default())
        .await
        .unwrap();

    let back = get(&ch, &queue).await;
    let waited = sent.elapsed();
    assert!(
        waited >= DELAY * 4 / 5,
        "came back after {waited:?}, before its delay"
    );
    assert_eq!(back.data, body, "body byte for byte");
    assert_eq!(
        back.properties.message_id().as_ref().unwrap().as_str(),
        "ev-1"
    );
    let history = History::of(&back);
    assert_eq!(history.failed_attempts, 1);
    assert_eq!(
        history.first_failure.map(|t| t.timestamp_millis()),
        Some(failed_at.timestamp_millis())
    );
    assert_eq!(
        history.unsettled_deliveries, 0,
        "a fresh message in the partition"
    );

    back.acker
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let again = get(&ch, &queue).await;
    assert_eq!(
        History::of(&again).unsettled_deliveries,
        1,
        "one delivery was handed back"
    );

    let _ = conn.close(200, "done".into()).await;
    support::delete_topology(&prefix, PARTITIONS, &["700ms"]).await;
}
