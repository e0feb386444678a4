//! The depth of every queue of the topology, for `avsync_worker_queue_messages{queue}`: the
//! partitions, the retry tiers of `AVSYNC_RETRY_DELAYS` and the dead letters. Every worker
//! reports every queue, so dashboards take the maximum per queue, never the sum.
//!
//! Depths come from passive declares on a connection of the poller's own, so that a slow or
//! broken poll never touches consuming. A passive declare of a missing queue makes the broker
//! close the channel, so the channel is opened again after any failed declare.

use avsync_shared::topology::Topology;
use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::options::QueueDeclareOptions;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, ErrorKind};
use prometheus::IntGaugeVec;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often every queue is polled.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);
/// Longest wait for a connection or one declare, so a broker that accepts TCP but never answers
/// cannot stall the poller.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_RECONNECT: Duration = Duration::from_secs(30);

/// Every queue whose depth is reported: the label values of `avsync_worker_queue_messages`.
pub fn queues(topology: &Topology, retry_delays: &[Duration]) -> Vec<String> {
    let partitions = (0..topology.partitions()).map(|p| topology.partition_queue(p));
    let tiers = retry_delays.iter().map(|d| topology.retry_tier(*d));
    partitions
        .chain(tiers)
        .chain([topology.dead_queue()])
        .collect()
}

/// Why a poll stopped before every queue was read.
#[derive(Debug, thiserror::Error)]
enum PollError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker did not answer within {0:?}")]
    Timeout(Duration),
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
    )
}

async fn bounded<T>(
    future: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, PollError> {
    tokio::time::timeout(BROKER_TIMEOUT, future)
        .await
        .map_err(|_| PollError::Timeout(BROKER_TIMEOUT))?
        .map_err(PollError::from)
}

/// Polls queue depths into `gauge` until `shutdown`, reconnecting with backoff. While the broker
/// is unreachable the series are removed rather than left at a stale value.
pub struct DepthPoller {
    pub amqp_url: String,
    pub connection_name: String,
    pub queues: Vec<String>,
    pub gauge: IntGaugeVec,
}

impl DepthPoller {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut delays = backoff();
        loop {
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                connected = bounded(Connection::connect(
                    &self.amqp_url,
                    ConnectionProperties::default()
                        .with_connection_name(self.connection_name.as_str().into()),
                )) => connected,
            };
            let failure = match connected {
                Ok(conn) => {
                    delays = backoff();
                    let failure = self.poll_until_failure(&conn, &shutdown).await;
                    let _ = tokio::time::timeout(
                        BROKER_TIMEOUT,
                        conn.close(200, "depth poller stopping".into()),
                    )
                    .await;
                    match failure {
                        Some(failure) => failure,
                        None => return,
                    }
                }
                Err(e) => e,
            };
            self.forget();
            let delay = delays.next().unwrap_or(MAX_RECONNECT);
            tracing::debug!(error = %failure, retry_in = ?delay, "queue depths unknown");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Polls every `POLL_INTERVAL` until a poll fails (returned) or `shutdown` (None).
    async fn poll_until_failure(
        &self,
        conn: &Connection,
        shutdown: &CancellationToken,
    ) -> Option<PollError> {
        let mut channel = None;
        loop {
            if let Err(e) = self.poll_once(conn, &mut channel).await {
                return Some(e);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
            }
        }
    }

    async fn poll_once(
        &self,
        conn: &Connection,
        channel: &mut Option<Channel>,
    ) -> Result<(), PollError> {
        for queue in &self.queues {
            let open = match channel.take() {
                Some(ch) if ch.status().connected() => ch,
                _ => bounded(conn.create_channel()).await?,
            };
            let messages = match bounded(open.queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ))
            .await
            {
                Ok(q) => {
                    *channel = Some(open);
                    i64::from(q.message_count())
                }
                // A queue that does not exist (yet) holds nothing; a retry tier, for one, may
                // be declared only when it is first used.
                Err(PollError::Broker(e)) if is_not_found(&e) => 0,
                Err(e) => return Err(e),
            };
            self.gauge
                .with_label_values(&[queue.as_str()])
                .set(messages);
        }
        Ok(())
    }

    fn forget(&self) {
        for queue in &self.queues {
            let _ = self.gauge.remove_label_values(&[queue.as_str()]);
        }
    }
}

fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(MAX_RECONNECT)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_queue_of_the_topology_is_polled() {
        let topology = Topology::new("avsync", 3).unwrap();
        let delays = [Duration::from_secs(1), Duration::from_secs(120)];
        assert_eq!(
            queues(&topology, &delays),
            [
                "avsync.events.p0",
                "avsync.events.p1",
                "avsync.events.p2",
                "avsync.retry.1s",
                "avsync.retry.2m",
                "avsync.dead",
            ]
        );
    }

    #[test]
    fn only_a_missing_queue_counts_as_not_found() {
        use lapin::protocol::{AMQPError, AMQPHardError};
        let soft = |kind| {
            lapin::Error::from(ErrorKind::ProtocolError(AMQPError::new(
                AMQPErrorKind::Soft(kind),
                "x".into(),
            )))
        };
        assert!(is_not_found(&soft(AMQPSoftError::NOTFOUND)));
        assert!(!is_not_found(&soft(AMQPSoftError::ACCESSREFUSED)));
        let hard = lapin::Error::from(ErrorKind::ProtocolError(AMQPError::new(
            AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
            "x".into(),
        )));
        assert!(!is_not_found(&hard));
    }
}
