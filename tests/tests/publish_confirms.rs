//! Many tasks publishing at once on one confirming channel, as the ingress does with webhooks and
//! the worker with retries, dead letters and replays: every confirm and every return must reach
//! the publish it belongs to. On a bare lapin 4 channel neither holds: lapin numbers a publish
//! (its delivery tag) and queues its frames in two steps, so two tasks can interleave them, and
//! it hands a returned message to whichever confirm it completes next, so even publishes sent one
//! at a time can get another's return. Both processes publish through `ConfirmedPublisher`.

use avsync_shared::broker::{ConfirmedPublisher, PublishError};
use avsync_tests::support;
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, ExchangeKind};

const ROUNDS: usize = 5;
const PUBLISHES: usize = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishes_on_one_channel_each_get_their_own_confirm_or_return() {
    let prefix = support::unique("pconf");
    let (exchange, queue) = (format!("{prefix}.x"), format!("{prefix}.q"));
    let (conn, ch) = support::channel().await;
    let publisher = ConfirmedPublisher::open(ch.clone()).await.unwrap();
    ch.exchange_declare(
        exchange.as_str().into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "routed".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    let mut mismatches = Vec::new();
    for round in 0..ROUNDS {
        let tasks: Vec<_> = (0..PUBLISHES)
            .map(|i| {
                let publisher = publisher.clone();
                let exchange = exchange.clone();
                // Every third one goes nowhere: mandatory, so the broker returns it.
                let routed = i % 3 != 0;
                tokio::spawn(async move {
                    let key = if routed { "routed" } else { "nowhere" };
                    let body = format!("{round}-{i}");
                    let result = publisher
                        .publish(
                            &exchange,
                            key,
                            body.as_bytes(),
                            BasicProperties::default()
                                .with_message_id(body.as_str().into())
                                .with_delivery_mode(2),
                        )
                        .await;
                    (i, routed, result)
                })
            })
            .collect();
        for task in tasks {
            let (i, routed, result) = task.await.expect("publishing task");
            let fits = match &result {
                Ok(()) => routed,
                Err(PublishError::Unroutable(_)) => !routed,
                Err(e) => panic!("publish {round}-{i}: {e}"),
            };
            if !fits {
                mismatches.push(format!(
                    "{round}-{i} ({}): {result:?}",
                    if routed { "routed" } else { "unroutable" }
                ));
            }
        }
    }
    let depth = support::queue_depth(&ch, &queue).await;
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
    assert!(
        mismatches.is_empty(),
        "{} publishes got another's answer: {mismatches:?}",
        mismatches.len()
    );
    let routed_total = ROUNDS * (0..PUBLISHES).filter(|i| i % 3 != 0).count();
    assert_eq!(depth, Some(u32::try_from(routed_total).unwrap()));
}

/// A nack means a channel the broker will keep refusing (on RabbitMQ 3.10, one that asks a dead
/// quorum queue leader), so the publisher closes it and its owner opens another. Here a queue
/// full to its length limit nacks; the publish is answered `Nacked` and the channel is closed.
#[tokio::test]
async fn a_nack_closes_the_channel_so_that_its_owner_opens_another() {
    let queue = support::unique("pnack");
    let (conn, ch) = support::channel().await;
    let mut full = FieldTable::default();
    full.insert(
        "x-max-length".into(),
        lapin::types::AMQPValue::LongLongInt(0),
    );
    full.insert(
        "x-overflow".into(),
        lapin::types::AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), full)
        .await
        .unwrap();
    let publishing = conn.create_channel().await.unwrap();
    let publisher = ConfirmedPublisher::open(publishing.clone()).await.unwrap();
    let result = publisher
        .publish("", &queue, b"refused", BasicProperties::default())
        .await;
    support::wait_until(
        "the nacking channel closed",
        std::time::Duration::from_secs(10),
        || async { (!publishing.status().connected()).then_some(()) },
    )
    .await;
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
    assert!(matches!(result, Err(PublishError::Nacked)), "{result:?}");
}

/// A publish whose caller stopped waiting before the channel's task reached it (the ingress's
/// publish timeout, while a slow broker's confirms lag) is not sent: kept, such publishes grow
/// the line until no confirm comes within any caller's timeout. On this single-threaded runtime
/// the task cannot take a job before the caller below drops it.
#[tokio::test]
async fn a_publish_its_caller_gave_up_on_is_not_sent() {
    use futures_util::FutureExt;
    const ABANDONED: usize = 200;
    let queue = support::unique("pgone");
    let (conn, ch) = support::channel().await;
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let publisher = ConfirmedPublisher::open(ch.clone()).await.unwrap();
    for i in 0..ABANDONED {
        let body = format!("abandoned {i}");
        let polled_once = publisher
            .publish("", &queue, body.as_bytes(), BasicProperties::default())
            .now_or_never();
        assert!(polled_once.is_none(), "no confirm before the task ran");
    }
    let kept = publisher
        .publish("", &queue, b"kept", BasicProperties::default())
        .await;
    let depth = support::queue_depth(&ch, &queue).await;
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
    assert!(kept.is_ok(), "{kept:?}");
    assert_eq!(
        depth,
        Some(1),
        "only the publish still awaited reached the queue"
    );
}
