//! Many tasks publishing at once on one confirming channel, as the worker does with retries,
//! dead letters and replays: every confirm and every return must reach the publish it belongs
//! to. lapin numbers a publish (its delivery tag) and queues its frames in two steps; two tasks
//! on two threads can interleave them, so the broker would number the publishes in another order
//! than lapin and answer each one with the other's confirm or return.

use avsync_tests::support;
use avsync_worker::dlq::{publish_confirmed, RepublishError};
use lapin::options::{
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
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
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
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
                let ch = ch.clone();
                let exchange = exchange.clone();
                // Every third one goes nowhere: mandatory, so the broker returns it.
                let routed = i % 3 != 0;
                tokio::spawn(async move {
                    let key = if routed { "routed" } else { "nowhere" };
                    let body = format!("{round}-{i}");
                    let result = publish_confirmed(
                        &ch,
                        &exchange,
                        key,
                        body.as_bytes(),
                        BasicProperties::default().with_message_id(body.as_str().into()),
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
                Err(RepublishError::Unroutable(_)) => !routed,
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
