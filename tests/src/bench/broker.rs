//! Raw lapin publishing, as the ingress publishes (persistent, `mandatory`, message id and the
//! tenant and type headers) but without HTTP: many publishes in flight, each confirm checked.

use crate::bench::workload::Event;
use crate::bench::BenchError;
use avsync_shared::broker::headers::{EVENT_TYPE_HEADER, TENANT_HEADER};
use avsync_shared::topology::Topology;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::PublisherConfirm;
use lapin::{BasicProperties, Channel, Confirmation};
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Publishes awaiting their confirm at once. Far more than one round trip's worth, so the
/// broker, not the wait, sets the pace.
pub const CONFIRM_WINDOW: usize = 1_000;

/// Where raw publishes go.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// The events exchange, routed to the tenant's partition queue, exactly as the ingress does.
    Partitions(&'a Topology),
    /// One queue, through the default exchange.
    Queue(&'a str),
}

impl Target<'_> {
    fn exchange_and_key(&self, event: &Event) -> (String, String) {
        match self {
            Target::Partitions(topology) => (
                topology.events_exchange(),
                Topology::routing_key(topology.partition_of(&event.tenant)),
            ),
            Target::Queue(queue) => (String::new(), (*queue).to_owned()),
        }
    }
}

/// The properties the ingress gives a message.
pub fn properties(event: &Event) -> BasicProperties {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from(TENANT_HEADER),
        AMQPValue::LongString(LongString::from(event.tenant.as_str())),
    );
    headers.insert(
        ShortString::from(EVENT_TYPE_HEADER),
        AMQPValue::LongString(LongString::from(event.event_type)),
    );
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(event.id.as_str().into())
        .with_headers(headers)
}

async fn send(
    channel: &Channel,
    target: Target<'_>,
    event: &Event,
) -> Result<PublisherConfirm, BenchError> {
    let (exchange, key) = target.exchange_and_key(event);
    Ok(channel
        .basic_publish(
            exchange.as_str().into(),
            key.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            &event.body,
            properties(event),
        )
        .await?)
}

async fn confirmed(confirm: PublisherConfirm) -> Result<(), BenchError> {
    match confirm.await? {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(BenchError::PublishRejected("unroutable")),
        Confirmation::Nack(_) => Err(BenchError::PublishRejected("nack")),
        Confirmation::NotRequested => Err(BenchError::PublishRejected(
            "the channel is not in confirm mode",
        )),
    }
}

/// Publishes every event with up to [`CONFIRM_WINDOW`] confirms outstanding; returns the time
/// from the first publish to the last confirm. `channel` must be in confirm mode.
pub async fn publish_all(
    channel: &Channel,
    target: Target<'_>,
    events: &[Event],
) -> Result<Duration, BenchError> {
    let started = Instant::now();
    let mut pending = VecDeque::with_capacity(CONFIRM_WINDOW);
    for event in events {
        if pending.len() >= CONFIRM_WINDOW {
            if let Some(oldest) = pending.pop_front() {
                confirmed(oldest).await?;
            }
        }
        pending.push_back(send(channel, target, event).await?);
    }
    for confirm in pending {
        confirmed(confirm).await?;
    }
    Ok(started.elapsed())
}

/// What a paced publish sent: each event with the instant it was stamped and published.
pub struct Paced {
    pub sent: Vec<Event>,
    pub elapsed: Duration,
}

/// Publishes `make(serial, now)` events at `rate` per second for `duration`, each stamped just
/// before its publish; every confirm is checked before this returns.
pub async fn publish_paced<F>(
    channel: &Channel,
    topology: &Topology,
    rate: f64,
    duration: Duration,
    mut make: F,
) -> Result<Paced, BenchError>
where
    F: FnMut(u64, chrono::DateTime<chrono::Utc>) -> Event,
{
    let (confirms, mut pending) = mpsc::unbounded_channel::<PublisherConfirm>();
    let checker = tokio::spawn(async move {
        while let Some(confirm) = pending.recv().await {
            confirmed(confirm).await?;
        }
        Ok::<(), BenchError>(())
    });
    let started = Instant::now();
    let mut sent = Vec::new();
    let mut ticks = tokio::time::interval(Duration::from_millis(5));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while started.elapsed() < duration {
        ticks.tick().await;
        let due = (rate * started.elapsed().min(duration).as_secs_f64()) as u64;
        while (sent.len() as u64) < due {
            let event = make(sent.len() as u64, chrono::Utc::now());
            let confirm = send(channel, Target::Partitions(topology), &event).await?;
            // The checker only stops early after a failed confirm, which it reports below.
            let _ = confirms.send(confirm);
            sent.push(event);
        }
    }
    drop(confirms);
    checker
        .await
        .map_err(|e| BenchError::Internal(format!("confirm checker: {e}")))??;
    Ok(Paced {
        sent,
        elapsed: started.elapsed(),
    })
}

/// Declares a durable quorum queue of its own (the pipeline's input).
pub async fn declare_quorum_queue(channel: &Channel, name: &str) -> Result<(), BenchError> {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await?;
    Ok(())
}

/// Empties every partition queue, so the next repetition starts from the same depth.
pub async fn purge_partitions(channel: &Channel, topology: &Topology) -> Result<(), BenchError> {
    for p in 0..topology.partitions() {
        channel
            .queue_purge(
                topology.partition_queue(p).as_str().into(),
                QueuePurgeOptions::default(),
            )
            .await?;
    }
    Ok(())
}

/// Messages ready in the partition queues now.
pub async fn partition_depth(channel: &Channel, topology: &Topology) -> Result<u64, BenchError> {
    let mut total = 0;
    for p in 0..topology.partitions() {
        let q = channel
            .queue_declare(
                topology.partition_queue(p).as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        total += u64::from(q.message_count());
    }
    Ok(total)
}
