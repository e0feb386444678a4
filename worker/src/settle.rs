//! Settling a message: ack only after its effect is committed, it was ignored, or its retry,
//! set-aside or dead letter was confirmed by the broker. What settles it is decided by its
//! [`crate::fate::Fate`] and, for an event that failed, by [`crate::failure`].

use crate::breaker::SetAsideReason;
use crate::dlq::{self, DeadLetter, ErrorClass};
use crate::failure::Failure;
use crate::fate::Unapplied;
use crate::metrics::Outcome;
use crate::retry::{self, History, NextStep, Retry};
use crate::session::Worker;
use avsync_shared::broker::ConfirmedPublisher;
use avsync_shared::TenantId;
use chrono::{DateTime, Utc};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How long a message whose retry or dead letter could not be published waits before it is
/// handed back, so that a broker in trouble slows the worker down instead of spinning.
const TRANSIENT_PAUSE: Duration = Duration::from_secs(1);

/// Settles, on its own, a message that applies nothing.
pub async fn settle_unapplied(
    worker: Arc<Worker>,
    publish: ConfirmedPublisher,
    partition: u16,
    delivery: Delivery,
    fate: Unapplied,
    gate: SettleGate,
) {
    let (event_id, tenant) = match fate.envelope() {
        Some(e) => (e.id.clone(), e.tenant_id.to_string()),
        None => (
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned())
                .unwrap_or_default(),
            String::new(),
        ),
    };
    let label = fate.label();
    let span = tracing::info_span!("event", event_id, tenant, r#type = label, partition);
    let settler = Settler {
        worker: &worker,
        publish: &publish,
        partition,
        delivery: &delivery,
        label,
        gate: &gate,
    };
    async {
        let history = History::of(&delivery);
        match fate {
            Unapplied::Poison(_) => settler.poison(&history).await,
            Unapplied::Undecodable(e) => settler.permanent(&Failure::from(e), &history).await,
            Unapplied::Invalid(_, e) => settler.permanent(&Failure::from(e), &history).await,
            Unapplied::Ignored(_) => {
                if gate.ack(partition, &delivery).await {
                    worker.metrics.count(label, Outcome::Ignored);
                    tracing::debug!("ignored");
                }
            }
        }
    }
    .instrument(span)
    .await;
}

/// The retry tier a set-aside message waits in: the shortest configured delay at least `wait`
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

/// Settles one failed message: into a retry tier or the dead-letter queue, confirmed, then acked.
pub struct Settler<'a> {
    pub worker: &'a Worker,
    pub publish: &'a ConfirmedPublisher,
    pub partition: u16,
    pub delivery: &'a Delivery,
    pub label: &'static str,
    pub gate: &'a SettleGate,
}

impl Settler<'_> {
    /// Dead-letters a poison message without processing it.
    pub async fn poison(&self, history: &History) {
        let now = Utc::now();
        let error = format!(
            "delivered {} times without being settled: it crashed or hung a consumer each time",
            history.unsettled_deliveries
        );
        tracing::error!(
            deliveries = history.unsettled_deliveries,
            "poison message; dead-lettered without processing"
        );
        let letter = DeadLetter {
            class: ErrorClass::Poison,
            error,
            attempts: history.failed_attempts + history.unsettled_deliveries,
            first_failure: history.first_failure.unwrap_or(now),
            last_failure: now,
        };
        self.dead_letter(&letter).await;
    }

    pub async fn permanent(&self, failure: &Failure, history: &History) {
        let now = Utc::now();
        tracing::error!(error = %failure, "permanent failure; dead-lettered");
        let letter = DeadLetter {
            class: ErrorClass::Permanent,
            error: failure.to_string(),
            attempts: history.failed_attempts + 1,
            first_failure: history.first_failure.unwrap_or(now),
            last_failure: now,
        };
        self.dead_letter(&letter).await;
    }

    pub async fn transient(&self, tenant: &TenantId, failure: &Failure, history: &History) {
        let failed = history.failed_attempts.saturating_add(1);
        let now = Utc::now();
        let first_failure: DateTime<Utc> = history.first_failure.unwrap_or(now);
        match self.worker.retry.next_step(failed) {
            NextStep::Retry { delay, attempt } => {
                let error = failure.to_string();
                let retry = Retry {
                    tenant,
                    delay,
                    failed_attempts: failed,
                    first_failure,
                    error: &error,
                };
                match retry::publish_retry(
                    self.publish,
                    &self.worker.topology,
                    self.delivery,
                    &retry,
                )
                .await
                {
                    Ok(()) => {
                        tracing::warn!(error = %failure, attempt, retry_in = ?delay, "transient failure; retrying later");
                        if self.gate.ack(self.partition, self.delivery).await {
                            self.worker.metrics.count(self.label, Outcome::Retried);
                            self.worker.metrics.retried(delay);
                        }
                    }
                    Err(e) => self.hand_back(&e.to_string()).await,
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
    }

    /// Publishes the message, confirmed, into a delay tier and acks it, counting no attempt: it
    /// comes back to its partition after about `wait` (see [`set_aside_delay`]).
    pub async fn set_aside(&self, tenant: &TenantId, reason: SetAsideReason, wait: Duration) {
        let history = History::of(self.delivery);
        let delay = set_aside_delay(&self.worker.retry.delays, wait);
        let error = format!(
            "set aside ({}): its tenant cannot take it now",
            reason.as_str()
        );
        let retry = Retry {
            tenant,
            delay,
            failed_attempts: history.failed_attempts,
            first_failure: history.first_failure.unwrap_or_else(Utc::now),
            error: &error,
        };
        match retry::publish_retry(self.publish, &self.worker.topology, self.delivery, &retry).await
        {
            Ok(()) => {
                tracing::debug!(reason = reason.as_str(), back_in = ?delay, "set aside");
                if self.gate.ack(self.partition, self.delivery).await {
                    self.worker.metrics.set_aside(reason);
                }
            }
            Err(e) => self.hand_back(&e.to_string()).await,
        }
    }

    async fn dead_letter(&self, letter: &DeadLetter) {
        match dlq::publish_dead_letter(self.publish, &self.worker.topology, self.delivery, letter)
            .await
        {
            Ok(()) => {
                if self.gate.ack(self.partition, self.delivery).await {
                    self.worker.metrics.count(self.label, Outcome::DeadLettered);
                }
            }
            Err(e) => self.hand_back(&e.to_string()).await,
        }
    }

    /// The retry or dead letter was not confirmed, so the message must not be acked: it goes
    /// back to its queue after a pause and is tried again.
    async fn hand_back(&self, publish_error: &str) {
        tracing::warn!(
            publish_error,
            "could not publish the message onward; handing it back"
        );
        tokio::select! {
            _ = tokio::time::sleep(TRANSIENT_PAUSE) => {}
            _ = self.gate.shutdown.cancelled() => {}
        }
        self.gate.requeue(self.partition, self.delivery).await;
    }
}

/// Holds settlements back from shutdown until the consumers are cancelled, and counts what each
/// partition's consumer holds unsettled.
#[derive(Clone)]
pub struct SettleGate {
    pub shutdown: CancellationToken,
    pub consumers_stopped: CancellationToken,
    held: Arc<Vec<AtomicUsize>>,
}

impl SettleGate {
    /// A gate for a session consuming `partitions` queues until `shutdown`.
    pub fn new(shutdown: CancellationToken, partitions: u16) -> Self {
        Self {
            shutdown,
            consumers_stopped: CancellationToken::new(),
            held: Arc::new((0..partitions).map(|_| AtomicUsize::new(0)).collect()),
        }
    }

    pub fn received(&self, partition: u16) {
        if let Some(n) = self.held.get(usize::from(partition)) {
            n.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn settled(&self, partition: u16) {
        if let Some(n) = self.held.get(usize::from(partition)) {
            n.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Messages of `partition` received and not yet settled.
    pub fn holds(&self, partition: u16) -> usize {
        self.held
            .get(usize::from(partition))
            .map_or(0, |n| n.load(Ordering::Acquire))
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

    /// True when the broker took the ack. When the channel is gone the message comes back and
    /// is applied again, which changes nothing.
    pub async fn ack(&self, partition: u16, delivery: &Delivery) -> bool {
        self.open().await;
        self.settled(partition);
        match delivery.acker.ack(BasicAckOptions::default()).await {
            Ok(true) => true,
            Ok(false) => {
                tracing::warn!(
                    "ack not sent (its channel is gone); the message will be redelivered"
                );
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "ack failed; the message will be redelivered");
                false
            }
        }
    }

    /// Acks every message of a committed batch; per message, true when the broker took it.
    pub async fn ack_all<'a>(
        &self,
        deliveries: impl Iterator<Item = (u16, &'a Delivery)>,
    ) -> Vec<bool> {
        futures_util::future::join_all(
            deliveries.map(|(partition, delivery)| self.ack(partition, delivery)),
        )
        .await
    }

    pub async fn requeue(&self, partition: u16, delivery: &Delivery) -> bool {
        self.open().await;
        self.settled(partition);
        let options = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        match delivery.acker.nack(options).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "requeue failed; the message will be redelivered");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
