//! Settling a message: the one door through which a received message leaves the worker. A
//! [`Message`] owns its delivery, its retry history (read once, when it arrives), its span and
//! its place in the prefetch window, and settles itself exactly once: every way out takes it by
//! value. It is acked only after its effect is committed, it was ignored, or its retry, set-aside
//! or dead letter was confirmed by the broker (contract section 7).

use crate::acks::{Acks, DeliveryTag};
use crate::dlq::{self, DeadLetter, ErrorClass};
use crate::failure::Failure;
use crate::metrics::{Metrics, Outcome, SetAsideReason};
use crate::retry::{self, History, NextStep, Retry, RetryPolicy};
use amq_protocol::frame::WriteContext;
use amq_protocol::protocol::basic::{gen_properties, parse_properties};
use avsync_shared::broker::ConfirmedPublisher;
use avsync_shared::topology::Topology;
use avsync_shared::{Envelope, TenantId};
use chrono::{DateTime, Utc};
use lapin::message::Delivery;
use lapin::BasicProperties;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How long a message whose retry or dead letter could not be published waits before it is
/// handed back, so that a broker in trouble slows the worker down instead of spinning.
const TRANSIENT_PAUSE: Duration = Duration::from_secs(1);

/// What settling needs, for one broker session: where retries and dead letters go, the retry
/// ladder, the counters, the gate that holds settlements back while the session stops, and each
/// consumer's acks (consumers that share a consume channel share them).
pub(crate) struct Settling {
    pub publish: ConfirmedPublisher,
    pub acks: Vec<Acks>,
    pub topology: Topology,
    pub retry: RetryPolicy,
    pub metrics: Metrics,
    pub gate: SettleGate,
}

/// A received message, until it is settled. It keeps only what settling needs (the bytes and
/// properties to republish, its delivery tag, what names it in the logs), because the prefetch window
/// holds tens of thousands of them: lapin's whole delivery and a span per message cost several
/// kilobytes each. All of it sits behind one box: a tenant's batch is a vector that grows by
/// doubling, and at 1,000 tenants a thousand of them are half empty, so its slots hold a pointer
/// rather than the whole message (measured with heaptrack: those slots took 93 MB of 255 MB).
pub(crate) struct Message {
    parts: Box<Parts>,
}

struct Parts {
    tag: DeliveryTag,
    properties: HeldProperties,
    data: Box<[u8]>,
    history: History,
    label: &'static str,
    event_id: Box<str>,
    tenant: Box<str>,
    received: Instant,
    settling: Arc<Settling>,
    place: Place,
    _permit: OwnedSemaphorePermit,
}

/// A message's properties while it is held, in the form they came off the wire. Parsed, they take
/// 296 bytes in place and a block of their own for each string, header name and header value:
/// some 650 bytes for what an event carries (a content type, its id, three headers), against 136
/// encoded. They are parsed again only when the message is republished (a retry, a set-aside, a
/// dead letter).
enum HeldProperties {
    Encoded(Box<[u8]>),
    /// What the encoder refused (it takes anything that was parsed off the wire), kept whole.
    Parsed(Box<BasicProperties>),
}

impl HeldProperties {
    fn new(properties: BasicProperties) -> Self {
        let encoded = gen_properties(&properties)(WriteContext::from(Vec::new()));
        match encoded {
            Ok(context) => Self::Encoded(context.write.into_boxed_slice()),
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode a message's properties; kept parsed");
                Self::Parsed(Box::new(properties))
            }
        }
    }

    /// The properties as received, to republish from.
    fn as_received(&self) -> BasicProperties {
        match self {
            Self::Encoded(bytes) => match parse_properties(&bytes[..]) {
                Ok((_, properties)) => properties,
                Err(e) => {
                    tracing::error!(error = %e, "cannot parse a message's own encoded properties");
                    BasicProperties::default()
                }
            },
            Self::Parsed(properties) => (**properties).clone(),
        }
    }
}

/// Where a delivery came from: its partition queue, and which of the session's consumers (whose
/// channel acks it) delivered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Origin {
    pub partition: u16,
    /// Index into `Settling::acks`.
    pub consumer: u16,
}

/// A message's place among what its partition's consumers hold unsettled, and its weight in the
/// window's bytes once it is held to be applied ([`Message::weigh_in`]). It is given back to its
/// session's gate (`Settling::gate`) when the message goes.
struct Place {
    origin: Origin,
    bytes: usize,
}

impl Drop for Parts {
    fn drop(&mut self) {
        self.settling
            .gate
            .settled(self.place.origin.partition, self.place.bytes);
    }
}

/// What holding a message costs beside its body: its properties, its packed effect and the
/// bookkeeping around it (measured: see the README's Performance section).
pub(crate) const HELD_OVERHEAD: usize = 512;

/// What a delivery of `body_len` bytes weighs in the window.
pub(crate) fn held_bytes(body_len: usize) -> usize {
    body_len.saturating_add(HELD_OVERHEAD)
}

impl Message {
    /// `history` is read from `delivery` once, by whoever decided its fate; `envelope` names the
    /// message in its logs when it has one; `label` is the `type` label its outcome is counted
    /// under; `permit` is its place in the prefetch window.
    pub fn new(
        settling: &Arc<Settling>,
        origin: Origin,
        delivery: Delivery,
        history: History,
        envelope: Option<&Envelope>,
        label: &'static str,
        permit: OwnedSemaphorePermit,
    ) -> Self {
        let (event_id, tenant) = match envelope {
            Some(e) => (e.id.as_str().into(), e.tenant_id.as_str().into()),
            None => (
                delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map_or_else(Default::default, |m| m.as_str().into()),
                Default::default(),
            ),
        };
        settling.gate.received(origin.partition);
        let parts = Parts {
            tag: delivery.delivery_tag,
            properties: HeldProperties::new(delivery.properties),
            data: delivery.data.into_boxed_slice(),
            history,
            label,
            event_id,
            tenant,
            received: Instant::now(),
            place: Place { origin, bytes: 0 },
            settling: settling.clone(),
            _permit: permit,
        };
        Self {
            parts: Box::new(parts),
        }
    }

    /// What it would weigh in the window ([`held_bytes`]).
    pub fn weight(&self) -> usize {
        held_bytes(self.parts.data.len())
    }

    /// It is held to be applied: its weight counts in the window's bytes until it is settled.
    pub fn weigh_in(&mut self) {
        if self.parts.place.bytes == 0 {
            let place = &mut self.parts.place;
            place.bytes = held_bytes(self.parts.data.len());
            self.parts
                .settling
                .gate
                .weighed(place.origin.partition, place.bytes);
        }
    }

    /// Its effect is committed: acked, and counted with its time in the worker and its lag
    /// behind the event's own time.
    pub async fn applied(self, event_time: DateTime<Utc>) {
        self.in_span(async {
            if self.ack().await {
                let metrics = &self.parts.settling.metrics;
                metrics.count(self.parts.label, Outcome::Applied);
                metrics
                    .apply_seconds
                    .observe(self.parts.received.elapsed().as_secs_f64());
                let lag = (Utc::now() - event_time).as_seconds_f64().max(0.0);
                metrics.lag_seconds.observe(lag);
                tracing::debug!("applied");
            }
        })
        .await;
    }

    /// It changes nothing here (another application's event, or a type that applies nothing).
    pub async fn ignored(self) {
        self.in_span(async {
            if self.ack().await {
                self.parts
                    .settling
                    .metrics
                    .count(self.parts.label, Outcome::Ignored);
                tracing::debug!("ignored");
            }
        })
        .await;
    }

    /// Dead-letters a poison message without processing it.
    pub async fn poison(self) {
        self.in_span(async {
            let history = &self.parts.history;
            tracing::error!(
                deliveries = history.unsettled_deliveries,
                "poison message; dead-lettered without processing"
            );
            let now = Utc::now();
            let letter = DeadLetter {
                class: ErrorClass::Poison,
                error: format!(
                    "delivered {} times without being settled: it crashed or hung a consumer each time",
                    history.unsettled_deliveries
                ),
                attempts: history.failed_attempts + history.unsettled_deliveries,
                first_failure: history.first_failure.unwrap_or(now),
                last_failure: now,
            };
            self.dead_letter(&letter).await;
        })
        .await;
    }

    /// A failure that trying again cannot mend: dead-lettered as `permanent` at once.
    pub async fn permanent(self, failure: &Failure) {
        self.in_span(async {
            tracing::error!(error = %failure, "permanent failure; dead-lettered");
            let now = Utc::now();
            let letter = DeadLetter {
                class: ErrorClass::Permanent,
                error: failure.to_string(),
                attempts: self.parts.history.failed_attempts + 1,
                first_failure: self.parts.history.first_failure.unwrap_or(now),
                last_failure: now,
            };
            self.dead_letter(&letter).await;
        })
        .await;
    }

    /// A transient failure: into the retry tier of its next attempt, or, after the last,
    /// dead-lettered as `exhausted`.
    pub async fn retry(self, tenant: &TenantId, failure: &Failure) {
        self.in_span(async {
            let failed = self.parts.history.failed_attempts.saturating_add(1);
            let now = Utc::now();
            let first_failure = self.parts.history.first_failure.unwrap_or(now);
            match self.parts.settling.retry.next_step(failed) {
                NextStep::Retry { delay, attempt } => {
                    let error = failure.to_string();
                    let retry = Retry {
                        tenant,
                        delay,
                        failed_attempts: failed,
                        first_failure,
                        error: &error,
                    };
                    if self.to_tier(&retry).await {
                        tracing::warn!(error = %failure, attempt, retry_in = ?delay, "transient failure; retrying later");
                        self.parts.settling.metrics.count(self.parts.label, Outcome::Retried);
                        self.parts.settling.metrics.retried(delay);
                    }
                }
                NextStep::Exhausted => {
                    tracing::error!(error = %failure, attempts = failed, "transient failure outlasted every retry; dead-lettered");
                    let letter = DeadLetter {
                        class: ErrorClass::Exhausted,
                        error: failure.to_string(),
                        attempts: failed,
                        first_failure,
                        last_failure: now,
                    };
                    self.dead_letter(&letter).await;
                }
            }
        })
        .await;
    }

    /// Into a delay tier, counting no attempt: it comes back to its partition after about `wait`
    /// (see [`set_aside_delay`]), when its tenant can likely take it.
    pub async fn set_aside(self, tenant: &TenantId, reason: SetAsideReason, wait: Duration) {
        self.in_span(async {
            let delay = set_aside_delay(&self.parts.settling.retry.tiers, wait);
            let error = format!(
                "set aside ({}): its tenant cannot take it now",
                reason.as_str()
            );
            let retry = Retry {
                tenant,
                delay,
                failed_attempts: self.parts.history.failed_attempts,
                first_failure: self.parts.history.first_failure.unwrap_or_else(Utc::now),
                error: &error,
            };
            if self.to_tier(&retry).await {
                tracing::debug!(reason = reason.as_str(), back_in = ?delay, "set aside");
                self.parts.settling.metrics.set_aside(reason);
            }
        })
        .await;
    }

    /// Back to its queue, unapplied and counting no attempt: the worker stops while it waits.
    pub async fn hand_back(self) {
        self.in_span(async {
            tracing::debug!("handed back to the broker");
            self.requeue().await;
        })
        .await;
    }

    /// `settle`, run inside the message's span, so that every line it logs names the event. The
    /// span is made here, not when the message arrives, so that a held message costs none.
    fn in_span<F: std::future::Future>(&self, settle: F) -> tracing::instrument::Instrumented<F> {
        let span = tracing::info_span!(
            "event",
            event_id = &*self.parts.event_id,
            tenant = &*self.parts.tenant,
            r#type = self.parts.label,
            partition = self.parts.place.origin.partition
        );
        settle.instrument(span)
    }

    /// Publishes the message, confirmed, into the tier of `retry` and acks it; true when the
    /// broker took the ack. An unconfirmed publish hands the message back instead.
    async fn to_tier(&self, retry: &Retry<'_>) -> bool {
        let settling = &self.parts.settling;
        match retry::publish_retry(
            &settling.publish,
            &settling.topology,
            &self.parts.properties.as_received(),
            &self.parts.data,
            retry,
        )
        .await
        {
            Ok(()) => self.ack().await,
            Err(e) => {
                self.publish_failed(&e.to_string()).await;
                false
            }
        }
    }

    async fn dead_letter(&self, letter: &DeadLetter) {
        let settling = &self.parts.settling;
        match dlq::publish_dead_letter(
            &settling.publish,
            &settling.topology,
            &self.parts.properties.as_received(),
            &self.parts.data,
            letter,
        )
        .await
        {
            Ok(()) => {
                if self.ack().await {
                    settling
                        .metrics
                        .count(self.parts.label, Outcome::DeadLettered);
                }
            }
            Err(e) => self.publish_failed(&e.to_string()).await,
        }
    }

    /// The retry or dead letter was not confirmed, so the message must not be acked: it goes
    /// back to its queue after a pause and is tried again.
    async fn publish_failed(&self, publish_error: &str) {
        tracing::warn!(
            publish_error,
            "could not publish the message onward; handing it back"
        );
        tokio::select! {
            _ = tokio::time::sleep(TRANSIENT_PAUSE) => {}
            _ = self.parts.settling.gate.shutdown.cancelled() => {}
        }
        self.requeue().await;
    }

    /// True when the ack was queued on its channel (see [`crate::acks`]). When the channel is
    /// gone the message comes back and is applied again, which changes nothing.
    async fn ack(&self) -> bool {
        self.parts.settling.gate.open().await;
        let queued = self.acks().ack(self.parts.tag);
        if !queued {
            tracing::warn!("ack not sent (its channel is gone); the message will be redelivered");
        }
        queued
    }

    async fn requeue(&self) {
        self.parts.settling.gate.open().await;
        if !self.acks().requeue(self.parts.tag) {
            tracing::warn!(
                "requeue not sent (its channel is gone); the message will be redelivered"
            );
        }
    }

    fn acks(&self) -> &Acks {
        &self.parts.settling.acks[usize::from(self.parts.place.origin.consumer)]
    }
}

/// The retry tier a set-aside message waits in: the shortest tier at least `wait`
/// (until its tenant could take it), else the longest. Coming back late costs only its own
/// tenant; coming back early costs its partition's neighbours another pass of the backlog.
fn set_aside_delay(delays: &[Duration], wait: Duration) -> Duration {
    delays
        .iter()
        .copied()
        .filter(|d| *d >= wait)
        .min()
        .or_else(|| delays.iter().copied().max())
        .unwrap_or(wait)
}

/// Holds settlements back from shutdown until the consumers are cancelled, and counts what each
/// partition's consumer holds unsettled.
#[derive(Clone)]
pub(crate) struct SettleGate {
    pub shutdown: CancellationToken,
    pub consumers_stopped: CancellationToken,
    held: Arc<Vec<AtomicUsize>>,
    /// Per partition, the messages held to be applied (not those on their way to a tier).
    to_apply: Arc<Vec<AtomicUsize>>,
    bytes: Arc<AtomicUsize>,
}

impl SettleGate {
    /// A gate for a session consuming `partitions` queues until `shutdown`.
    pub fn new(shutdown: CancellationToken, partitions: u16) -> Self {
        Self {
            shutdown,
            consumers_stopped: CancellationToken::new(),
            held: Arc::new((0..partitions).map(|_| AtomicUsize::new(0)).collect()),
            to_apply: Arc::new((0..partitions).map(|_| AtomicUsize::new(0)).collect()),
            bytes: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn received(&self, partition: u16) {
        if let Some(n) = self.held.get(usize::from(partition)) {
            n.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn weighed(&self, partition: u16, bytes: usize) {
        if let Some(n) = self.to_apply.get(usize::from(partition)) {
            n.fetch_add(1, Ordering::AcqRel);
        }
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
    }

    fn settled(&self, partition: u16, bytes: usize) {
        if let Some(n) = self.held.get(usize::from(partition)) {
            n.fetch_sub(1, Ordering::AcqRel);
        }
        if bytes > 0 {
            if let Some(n) = self.to_apply.get(usize::from(partition)) {
                n.fetch_sub(1, Ordering::AcqRel);
            }
            self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        }
    }

    /// Messages of `partition` held to be applied: waiting in a batch or being applied.
    pub fn to_apply(&self, partition: u16) -> usize {
        self.to_apply
            .get(usize::from(partition))
            .map_or(0, |n| n.load(Ordering::Acquire))
    }

    /// What the messages held to be applied weigh ([`held_bytes`]).
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Acquire)
    }

    /// Messages of `partition` received and not yet settled.
    pub fn holds(&self, partition: u16) -> usize {
        self.held
            .get(usize::from(partition))
            .map_or(0, |n| n.load(Ordering::Acquire))
    }

    /// Messages received and not yet settled, over every partition.
    pub fn in_window(&self) -> usize {
        self.held.iter().map(|n| n.load(Ordering::Acquire)).sum()
    }

    pub fn all_full(&self, per_queue: usize) -> bool {
        self.held
            .iter()
            .all(|n| n.load(Ordering::Acquire) >= per_queue)
    }

    async fn open(&self) {
        if self.shutdown.is_cancelled() {
            self.consumers_stopped.cancelled().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use avsync_shared::broker::headers::{ATTEMPTS_HEADER, TENANT_HEADER};
    use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};

    #[test]
    fn held_properties_come_back_as_received() {
        let mut death = FieldTable::default();
        death.insert("count".into(), AMQPValue::LongLongInt(3));
        death.insert("queue".into(), AMQPValue::LongString("t.retry.1s".into()));
        let mut headers = FieldTable::default();
        headers.insert(
            TENANT_HEADER.into(),
            AMQPValue::LongString(LongString::from("acme")),
        );
        headers.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongInt(2));
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_message_id("evt-1".into())
            .with_timestamp(1_765_000_000)
            .with_headers(headers);
        let held = HeldProperties::new(properties.clone());
        assert!(matches!(held, HeldProperties::Encoded(_)));
        assert_eq!(held.as_received(), properties);
        let bare = HeldProperties::new(BasicProperties::default());
        assert_eq!(bare.as_received(), BasicProperties::default());
    }

    #[test]
    fn set_aside_waits_in_the_shortest_tier_covering_the_wait() {
        let delays = [1, 5, 30].map(Duration::from_secs);
        assert_eq!(set_aside_delay(&delays, Duration::ZERO), delays[0]);
        assert_eq!(set_aside_delay(&delays, Duration::from_secs(1)), delays[0]);
        assert_eq!(set_aside_delay(&delays, Duration::from_secs(3)), delays[1]);
        assert_eq!(set_aside_delay(&delays, Duration::from_secs(7)), delays[2]);
        assert_eq!(set_aside_delay(&delays, Duration::from_secs(60)), delays[2]);
    }
}
