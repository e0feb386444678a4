//! The dead-letter queue and its operator commands over the real broker: dead letters keep body
//! and message id and carry their reason; `list` removes nothing; `replay` and `purge` take exactly
//! what they are told to, and refuse without a selection; filters combine, also over a queue of
//! 10,000 mixed letters, which `summary` counts.

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
use avsync_worker::ops::dlq_cli::{self, DlqCommand};
use chrono::{DateTime, SecondsFormat, Utc};
use clap::Parser;
use futures_util::stream::{self, StreamExt};
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const PARTITIONS: u16 = 4;

#[derive(Parser)]
struct Dlq {
    #[command(subcommand)]
    command: DlqCommand,
}

/// A `dlq` command as the operator types it (without `avsync-worker dlq`).
fn command(args: &[&str]) -> DlqCommand {
    Dlq::try_parse_from(std::iter::once("dlq").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
        .command
}

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
        dlq::publish_dead_letter(
            &self.publisher,
            &self.topology,
            &delivery.properties,
            &delivery.data,
            &letter,
        )
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
        let out = self.run(command(&["list", "--json"])).await;
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
        .run(command(&["list", "--tenant", "acme", "--json"]))
        .await;
    assert_eq!(only_acme.lines().count(), 1);
    let exhausted = f
        .run(command(&["list", "--class", "exhausted", "--json"]))
        .await;
    assert_eq!(exhausted.lines().count(), 1);
    assert!(exhausted.contains("\"ev-b\""), "{exhausted}");
    let none = f
        .run(command(&[
            "list",
            "--tenant",
            "acme",
            "--class",
            "exhausted",
            "--json",
        ]))
        .await;
    assert_eq!(none, "", "filters combine: acme's letter is permanent");
    let limited = f.run(command(&["list", "--limit", "1", "--json"])).await;
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
    assert!(Dlq::try_parse_from(["dlq", "purge"]).is_err());
    assert!(Dlq::try_parse_from(["dlq", "replay"]).is_err());
    assert!(Dlq::try_parse_from(["dlq", "purge", "--all", "--tenant", "x"]).is_err());
    assert!(Dlq::try_parse_from(["dlq", "purge", "--event-id", "x"]).is_ok());

    let f = Fixture::new().await;
    for id in ["p-1", "p-2", "p-3"] {
        f.dead_letter(id, "acme", ErrorClass::Permanent).await;
    }
    wait_until("three dead letters", Duration::from_secs(10), || async {
        (f.dead_depth().await == 3).then_some(())
    })
    .await;
    let out = f.run(command(&["purge", "--event-id", "p-2"])).await;
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

    let out = f.run(command(&["purge", "--all"])).await;
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

    let out = f.run(command(&["replay", "--tenant", "acme"])).await;
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

const TENANTS: [&str; 4] = ["acme", "globex", "initech", "umbrella"];
const CLASSES: [ErrorClass; 3] = [
    ErrorClass::Permanent,
    ErrorClass::Exhausted,
    ErrorClass::Poison,
];
const TYPES: [&str; 5] = [
    "member.joined",
    "member.left",
    "subject.created",
    "subject.updated",
    "app_access.granted",
];

/// The filters of the replay of the mixed queue.
const REPLAYED: [&str; 6] = [
    "--class",
    "exhausted",
    "--type",
    "member.joined",
    "--since",
    "24h",
];

/// One letter of a mixed queue, as published.
#[derive(Clone)]
struct Mixed {
    id: String,
    tenant: &'static str,
    class: ErrorClass,
    event_type: &'static str,
    last_failure: DateTime<Utc>,
}

/// The `i`-th letter of a mixed queue, its last failure spread over the two days before `base`,
/// each half an hour off the hour, so that `--since 24h` is not decided by the seconds the test
/// takes.
fn mixed(i: usize, base: DateTime<Utc>) -> Mixed {
    let hours_ago = i64::try_from((i / 7) % 48).expect("small");
    Mixed {
        id: format!("mix-{i:05}"),
        tenant: TENANTS[i % TENANTS.len()],
        class: CLASSES[i % CLASSES.len()],
        event_type: TYPES[i % TYPES.len()],
        last_failure: base - chrono::Duration::hours(hours_ago) - chrono::Duration::minutes(30),
    }
}

impl Fixture {
    /// Publishes a letter straight into the dead-letter queue, with the headers the worker sets.
    async fn publish_dead(&self, letter: Mixed) {
        let Mixed {
            id,
            tenant,
            class,
            event_type,
            last_failure,
        } = letter;
        let text = |s: &str| AMQPValue::LongString(LongString::from(s));
        let at = last_failure.to_rfc3339_opts(SecondsFormat::Millis, true);
        let headers: BTreeMap<ShortString, AMQPValue> = [
            (TENANT_HEADER, text(tenant)),
            (EVENT_TYPE_HEADER, text(event_type)),
            (ERROR_CLASS_HEADER, text(class.as_str())),
            (ERROR_HEADER, text("test failure")),
            (ATTEMPTS_HEADER, AMQPValue::LongLongInt(3)),
            (FIRST_FAILURE_HEADER, text(&at)),
            (LAST_FAILURE_HEADER, text(&at)),
        ]
        .into_iter()
        .map(|(k, v)| (ShortString::from(k), v))
        .collect();
        let properties = BasicProperties::default()
            .with_message_id(id.as_str().into())
            .with_delivery_mode(2)
            .with_headers(FieldTable::from(headers));
        self.publisher
            .publish(
                "",
                &self.topology.dead_queue(),
                &Self::body(&id, tenant),
                properties,
            )
            .await
            .expect("confirmed");
    }

    /// The ids of every message in the partition queues, taken off them.
    async fn drain_partitions(&self) -> Vec<String> {
        let mut ids = Vec::new();
        for p in 0..PARTITIONS {
            let queue = self.topology.partition_queue(p);
            while let Some(m) = self
                .ch
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                let headers = m.delivery.properties.headers().clone().unwrap_or_default();
                assert!(!headers.contains_key(ERROR_CLASS_HEADER), "{headers:?}");
                let id = m.delivery.properties.message_id().as_ref().unwrap();
                ids.push(id.to_string());
            }
        }
        ids
    }

    async fn summary(&self, args: &[&str]) -> serde_json::Value {
        let args = [&["summary"], args, &["--json"]].concat();
        serde_json::from_str(&self.run(command(&args)).await).expect("one JSON object")
    }
}

/// 10,000 mixed dead letters (4 tenants, 3 classes, 5 types, last failures over two days): a
/// replay filtered by class, type and `--since` moves exactly the matching letters into their
/// partitions, attempts reset, and leaves every other letter in the dead-letter queue; nothing
/// is lost or doubled, and `summary` counts what is left by class, tenant and type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_replay_of_ten_thousand_mixed_letters_moves_exactly_the_matching_ones() {
    const LETTERS: usize = 10_000;
    let f = Fixture::new().await;
    let base = Utc::now();
    let letters: Vec<_> = (0..LETTERS).map(|i| mixed(i, base)).collect();
    let started = std::time::Instant::now();
    // Many publishes in flight on one confirming channel: pipelined confirms.
    stream::iter(letters.iter().cloned())
        .for_each_concurrent(512, |letter| f.publish_dead(letter))
        .await;
    println!(
        "published {LETTERS} dead letters in {:?}",
        started.elapsed()
    );
    wait_until("10,000 dead letters", Duration::from_secs(30), || async {
        (f.dead_depth().await == LETTERS as u32).then_some(())
    })
    .await;
    let before = f.summary(&[]).await;
    assert_eq!(before["total"], LETTERS);
    assert_eq!(before["by_tenant"]["acme"], LETTERS / 4);
    assert_eq!(before["by_type"]["member.left"], LETTERS / 5);

    let since = base - chrono::Duration::hours(24);
    let matching: BTreeSet<String> = letters
        .iter()
        .filter(|l| {
            l.class == ErrorClass::Exhausted
                && l.event_type == "member.joined"
                && l.last_failure >= since
        })
        .map(|l| l.id.clone())
        .collect();
    assert!(matching.len() > 100 && matching.len() < LETTERS / 10);
    let started = std::time::Instant::now();
    let out = f.run(command(&[&["replay"][..], &REPLAYED].concat())).await;
    println!(
        "replayed {} of {LETTERS} in {:?}",
        matching.len(),
        started.elapsed()
    );
    assert_eq!(out.trim(), format!("replayed {}", matching.len()));

    let remaining = LETTERS - matching.len();
    wait_until(
        "the rest back in place",
        Duration::from_secs(30),
        || async { (f.dead_depth().await == remaining as u32).then_some(()) },
    )
    .await;
    let moved = f.drain_partitions().await;
    assert_eq!(moved.len(), matching.len(), "each matching letter once");
    assert_eq!(moved.into_iter().collect::<BTreeSet<_>>(), matching);

    let after = f.summary(&[]).await;
    assert_eq!(after["total"], remaining);
    let left_of = |pick: &dyn Fn(&Mixed) -> bool| {
        letters
            .iter()
            .filter(|l| !matching.contains(&l.id) && pick(l))
            .count()
    };
    for class in CLASSES {
        let want = left_of(&|l| l.class == class);
        assert_eq!(after["by_class"][class.as_str()], want, "{class:?}");
    }
    for tenant in TENANTS {
        assert_eq!(after["by_tenant"][tenant], left_of(&|l| l.tenant == tenant));
    }
    for event_type in TYPES {
        assert_eq!(
            after["by_type"][event_type],
            left_of(&|l| l.event_type == event_type)
        );
    }
    let none_left = f.summary(&REPLAYED).await;
    assert_eq!(none_left["total"], 0);
    let until = (base - chrono::Duration::hours(40)).to_rfc3339();
    let old = f.summary(&["--tenant", "acme", "--until", &until]).await;
    let want =
        left_of(&|l| l.tenant == "acme" && l.last_failure <= base - chrono::Duration::hours(40));
    assert_eq!(old["total"], want);
    f.cleanup().await;
}
