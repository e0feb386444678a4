//! The dead-letter queue and its operator commands over the real broker: dead letters keep body
//! and message id and carry their reason; `list` removes nothing; `replay` and `purge` take exactly
//! what they are told to, and refuse without a selection.

use avsync_shared::broker::headers::{
    ATTEMPTS_HEADER, ERROR_CLASS_HEADER, ERROR_HEADER, EVENT_TYPE_HEADER, FIRST_FAILURE_HEADER,
    LAST_FAILURE_HEADER, TENANT_HEADER,
};
use avsync_shared::broker::ConfirmedPublisher;
use avsync_shared::config::CommonArgs;
use avsync_shared::topology::Topology;
use avsync_shared::TenantId;
use avsync_tests::support::{self, queue_depth, wait_until};
use avsync_worker::dlq::{self, DeadLetter, ErrorClass};
use avsync_worker::dlq_cli::{self, DlqCommand, ListArgs, Selection};
use chrono::Utc;
use clap::Parser;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};
use std::collections::BTreeMap;
use std::time::Duration;

const PARTITIONS: u16 = 4;

struct Fixture {
    prefix: String,
    topology: Topology,
    common: CommonArgs,
    _conn: lapin::Connection,
    ch: Channel,
    publisher: ConfirmedPublisher,
}

impl Fixture {
    async fn new() -> Self {
        let prefix = support::unique("dlq");
        let topology = Topology::new(&prefix, PARTITIONS).unwrap();
        let (conn, ch) = support::channel().await;
        let publisher = ConfirmedPublisher::open(ch.clone()).await.unwrap();
        topology.declare(&ch).await.unwrap();
        let common = CommonArgs {
            amqp_url: support::AMQP_URL.to_owned(),
            topology: prefix.clone(),
            partitions: PARTITIONS,
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            log_format: "text".to_owned(),
        };
        Fixture {
            prefix,
            topology,
            common,
            _conn: conn,
            ch,
            publisher,
        }
    }

    fn body(id: &str, tenant: &str) -> Vec<u8> {
        format!(
            r#"{{"id":"{id}","type":"member.joined","tenant_id":"{tenant}","timestamp":"2026-11-27T10:00:00Z","data":{{"sub":"u1"}}}}"#
        )
        .into_bytes()
    }

    /// Publishes an event as the ingress does, takes it from its partition queue, and dead-letters
    /// it the way the worker does.
    async fn dead_letter(&self, id: &str, tenant: &str, class: ErrorClass) {
        let tenant_id = TenantId::parse(tenant).unwrap();
        let partition = self.topology.partition_of(&tenant_id);
        let mut headers = BTreeMap::new();
        headers.insert(
            ShortString::from(TENANT_HEADER),
            AMQPValue::LongString(LongString::from(tenant)),
        );
        headers.insert(
            ShortString::from(EVENT_TYPE_HEADER),
            AMQPValue::LongString(LongString::from("member.joined")),
        );
        let properties = BasicProperties::default()
            .with_message_id(id.into())
            .with_delivery_mode(2)
            .with_headers(FieldTable::from(headers));
        self.publisher
            .publish(
                &self.topology.events_exchange(),
                &Topology::routing_key(partition),
                &Self::body(id, tenant),
                properties,
            )
            .await
            .unwrap();
        let queue = self.topology.partition_queue(partition);
        let delivery = wait_until(
            "the event in its partition",
            Duration::from_secs(10),
            || {
                let ch = self.ch.clone();
                let queue = queue.clone();
                async move {
                    ch.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                        .await
                        .unwrap()
                        .map(|m| m.delivery)
                }
            },
        )
        .await;
        let now = Utc::now();
        let letter = DeadLetter {
            class,
            error: format!("test failure of {id}"),
            attempts: 3,
            first_failure: now,
            last_failure: now,
        };
        dlq::publish_dead_letter(&self.publisher, &self.topology, &delivery, &letter)
            .await
            .unwrap();
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
    }

    async fn run(&self, command: DlqCommand) -> String {
        let mut out = Vec::new();
        dlq_cli::run_to(command, &self.common, &mut out)
            .await
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    async fn list_json(&self) -> Vec<serde_json::Value> {
        let out = self
            .run(DlqCommand::List(ListArgs {
                tenant: None,
                limit: None,
                json: true,
            }))
            .await;
        out.lines()
            .map(|l| serde_json::from_str(l).expect("every stdout line is one JSON object"))
            .collect()
    }

    async fn dead_depth(&self) -> u32 {
        queue_depth(&self.ch, &self.topology.dead_queue())
            .await
            .unwrap()
    }

    async fn cleanup(self) {
        support::delete_topology(&self.prefix, PARTITIONS, &[]).await;
    }
}

fn selection(tenant: Option<&str>, event_id: Option<&str>, all: bool) -> Selection {
    Selection {
        tenant: tenant.map(str::to_owned),
        event_id: event_id.map(str::to_owned),
        all,
    }
}

#[tokio::test]
async fn a_dead_letter_keeps_its_body_and_carries_its_reason() {
    let f = Fixture::new().await;
    f.dead_letter("ev-1", "acme", ErrorClass::Permanent).await;
    wait_until("one dead letter", Duration::from_secs(10), || async {
        (f.dead_depth().await == 1).then_some(())
    })
    .await;

    let got =
        f.ch.basic_get(
            f.topology.dead_queue().as_str().into(),
            BasicGetOptions { no_ack: false },
        )
        .await
        .unwrap()
        .unwrap()
        .delivery;
    assert_eq!(
        got.data,
        Fixture::body("ev-1", "acme"),
        "body byte for byte"
    );
    assert_eq!(
        got.properties.message_id().as_ref().unwrap().as_str(),
        "ev-1"
    );
    let headers = got.properties.headers().as_ref().unwrap().inner();
    for key in [
        ERROR_CLASS_HEADER,
        ERROR_HEADER,
        ATTEMPTS_HEADER,
        FIRST_FAILURE_HEADER,
        LAST_FAILURE_HEADER,
        TENANT_HEADER,
        EVENT_TYPE_HEADER,
    ] {
        assert!(headers.contains_key(key), "missing header {key}");
    }
    let first = match headers.get(FIRST_FAILURE_HEADER).unwrap() {
        AMQPValue::LongString(s) => s.to_string(),
        other => panic!("unexpected {other:?}"),
    };
    assert!(
        chrono::DateTime::parse_from_rfc3339(&first).is_ok(),
        "{first}"
    );
    got.acker
        .nack(lapin::options::BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    f.cleanup().await;
}

#[tokio::test]
async fn list_shows_every_letter_with_the_contract_keys_and_removes_nothing() {
    let f = Fixture::new().await;
    f.dead_letter("ev-a", "acme", ErrorClass::Permanent).await;
    f.dead_letter("ev-b", "globex", ErrorClass::Exhausted).await;
    wait_until("two dead letters", Duration::from_secs(10), || async {
        (f.dead_depth().await == 2).then_some(())
    })
    .await;

    let rows = f.list_json().await;
    assert_eq!(rows.len(), 2);
    for row in &rows {
        let obj = row.as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "attempts",
                "error",
                "error_class",
                "event_id",
                "first_failure",
                "last_failure",
                "tenant_id",
                "type"
            ]
        );
    }
    let a = rows.iter().find(|r| r["event_id"] == "ev-a").unwrap();
    assert_eq!(a["tenant_id"], "acme");
    assert_eq!(a["type"], "member.joined");
    assert_eq!(a["error_class"], "permanent");
    assert_eq!(a["attempts"], 3);
    let b = rows.iter().find(|r| r["event_id"] == "ev-b").unwrap();
    assert_eq!(b["error_class"], "exhausted");

    let only_acme = f
        .run(DlqCommand::List(ListArgs {
            tenant: Some("acme".into()),
            limit: None,
            json: true,
        }))
        .await;
    assert_eq!(only_acme.lines().count(), 1);
    let limited = f
        .run(DlqCommand::List(ListArgs {
            tenant: None,
            limit: Some(1),
            json: true,
        }))
        .await;
    assert_eq!(limited.lines().count(), 1);

    wait_until(
        "letters back after listing",
        Duration::from_secs(10),
        || async { (f.dead_depth().await == 2).then_some(()) },
    )
    .await;
    f.cleanup().await;
}

#[tokio::test]
async fn purge_refuses_without_a_selection_and_takes_exactly_one_by_event_id() {
    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: DlqCommand,
    }
    assert!(Cli::try_parse_from(["dlq", "purge"]).is_err());
    assert!(Cli::try_parse_from(["dlq", "replay"]).is_err());
    assert!(Cli::try_parse_from(["dlq", "purge", "--all", "--tenant", "x"]).is_err());
    assert!(Cli::try_parse_from(["dlq", "purge", "--event-id", "x"]).is_ok());

    let f = Fixture::new().await;
    for id in ["p-1", "p-2", "p-3"] {
        f.dead_letter(id, "acme", ErrorClass::Permanent).await;
    }
    wait_until("three dead letters", Duration::from_secs(10), || async {
        (f.dead_depth().await == 3).then_some(())
    })
    .await;
    let out = f
        .run(DlqCommand::Purge(selection(None, Some("p-2"), false)))
        .await;
    assert_eq!(out.trim(), "purged 1");
    let ids: Vec<String> = wait_until("two letters left", Duration::from_secs(10), || async {
        let rows = f.list_json().await;
        (rows.len() == 2).then(|| {
            rows.iter()
                .map(|r| r["event_id"].as_str().unwrap().to_owned())
                .collect()
        })
    })
    .await;
    assert!(!ids.contains(&"p-2".to_owned()));

    let out = f.run(DlqCommand::Purge(selection(None, None, true))).await;
    assert_eq!(out.trim(), "purged 2");
    wait_until(
        "empty dead-letter queue",
        Duration::from_secs(10),
        || async { (f.dead_depth().await == 0).then_some(()) },
    )
    .await;
    f.cleanup().await;
}

#[tokio::test]
async fn replay_moves_one_tenants_letters_back_with_attempts_reset() {
    let f = Fixture::new().await;
    f.dead_letter("r-1", "acme", ErrorClass::Exhausted).await;
    f.dead_letter("r-2", "acme", ErrorClass::Permanent).await;
    f.dead_letter("r-3", "globex", ErrorClass::Permanent).await;
    wait_until("three dead letters", Duration::from_secs(10), || async {
        (f.dead_depth().await == 3).then_some(())
    })
    .await;

    let out = f
        .run(DlqCommand::Replay(selection(Some("acme"), None, false)))
        .await;
    assert_eq!(out.trim(), "replayed 2");

    let acme = TenantId::parse("acme").unwrap();
    let queue = f.topology.partition_queue(f.topology.partition_of(&acme));
    let mut replayed = Vec::new();
    while replayed.len() < 2 {
        let delivery = wait_until("a replayed event", Duration::from_secs(10), || {
            let ch = f.ch.clone();
            let queue = queue.clone();
            async move {
                ch.basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
                    .await
                    .unwrap()
                    .map(|m| m.delivery)
            }
        })
        .await;
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        for key in [ERROR_CLASS_HEADER, ATTEMPTS_HEADER, "x-death"] {
            assert!(
                !headers.contains_key(key),
                "replayed message still has {key}"
            );
        }
        // The broker counts earlier deliveries itself; a copied count would make the replayed
        // message look like poison.
        if let Some(count) = headers.inner().get("x-delivery-count") {
            assert_eq!(count, &AMQPValue::LongLongInt(0), "{headers:?}");
        }
        assert!(headers.contains_key(TENANT_HEADER));
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .unwrap()
            .to_string();
        assert_eq!(delivery.data, Fixture::body(&id, "acme"));
        replayed.push(id);
    }
    replayed.sort();
    assert_eq!(replayed, ["r-1", "r-2"]);

    let rows = wait_until("globex's letter left", Duration::from_secs(10), || async {
        let rows = f.list_json().await;
        (rows.len() == 1).then_some(rows)
    })
    .await;
    assert_eq!(rows[0]["event_id"], "r-3");
    f.cleanup().await;
}
