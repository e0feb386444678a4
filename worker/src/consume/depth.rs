//! The depth of every queue of the topology, for `avsync_worker_queue_messages{queue}`: the
//! partitions, the retry tiers of `AVSYNC_RETRY_DELAYS` and the dead letters. Every worker
//! reports every queue, so dashboards take the maximum per queue, never the sum.
//!
//! Depths come from passive declares on a connection of the poller's own, so that a slow or
//! broken poll never touches consuming. A passive declare of a missing queue makes the broker
//! close the channel (and the client log an error), so the poller first declares what it polls,
//! as every process does, idempotently and with the same arguments; a queue deleted later reads
//! as empty and is declared again at the next poll.

use crate::consume::session::{reconnect_backoff, MAX_RECONNECT};
use avsync_shared::broker;
use avsync_shared::topology::Topology;
use lapin::options::QueueDeclareOptions;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ErrorKind};
use prometheus::IntGaugeVec;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often every queue is polled.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);
/// Longest wait for one declare, so a broker that accepts TCP but never answers
/// cannot stall the poller.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// Every queue whose depth is reported: the label values of `avsync_worker_queue_messages`.
pub fn queues(topology: &Topology, tiers: &[Duration]) -> Vec<String> {
    let partitions = (0..topology.partitions()).map(|p| topology.partition_queue(p));
    let tiers = tiers.iter().map(|d| topology.retry_tier(*d));
    partitions
        .chain(tiers)
        .chain([topology.dead_queue()])
        .collect()
}

/// Why the poller lost its connection.
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

/// Polls queue depths into `gauge` until shutdown, reconnecting with backoff. While the broker
/// is unreachable the series are removed rather than left at a stale value.
pub struct DepthPoller {
    pub amqp_url: String,
    pub topology: Topology,
    /// Every retry tier ([`crate::retry::RetryPolicy::tiers`]).
    pub tiers: Arc<[Duration]>,
    pub gauge: IntGaugeVec,
}

/// The poller's channel, opened again whenever the broker closed it.
struct Probe<'a> {
    conn: &'a Connection,
    channel: Option<Channel>,
}

impl Probe<'_> {
    async fn channel(&mut self) -> Result<Channel, PollError> {
        match self.channel.take() {
            Some(ch) if ch.status().connected() => Ok(ch),
            _ => bounded(self.conn.create_channel()).await,
        }
    }

    /// Closes the channel before its connection: lapin reports a channel that is still closing
    /// when its connection closes as a connection error.
    async fn close(&mut self) {
        if let Some(channel) = self.channel.take() {
            let _ = tokio::time::timeout(BROKER_TIMEOUT, channel.close(200, "done".into())).await;
        }
    }
}

impl DepthPoller {
    pub async fn run(self, shutdown: CancellationToken) {
        let name = format!("avsync-worker {} depth", self.topology.prefix());
        let queues = queues(&self.topology, &self.tiers);
        let mut delays = reconnect_backoff();
        loop {
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                connected = broker::connect(&self.amqp_url, &name) => connected.map_err(PollError::from),
            };
            let failure = match connected {
                Ok(conn) => {
                    delays = reconnect_backoff();
                    let mut probe = Probe {
                        conn: &conn,
                        channel: None,
                    };
                    let failure = self
                        .poll_until_failure(&mut probe, &queues, &shutdown)
                        .await;
                    probe.close().await;
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
            for queue in &queues {
                let _ = self.gauge.remove_label_values(&[queue.as_str()]);
            }
            let delay = delays.next().unwrap_or(MAX_RECONNECT);
            tracing::debug!(error = %failure, retry_in = ?delay, "queue depths unknown");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Polls every `POLL_INTERVAL` until a poll fails (returned) or shutdown (None).
    async fn poll_until_failure(
        &self,
        probe: &mut Probe<'_>,
        queues: &[String],
        shutdown: &CancellationToken,
    ) -> Option<PollError> {
        let mut declare = true;
        loop {
            if declare {
                if let Err(e) = self.declare(probe).await {
                    return Some(e);
                }
            }
            match self.poll_once(probe, queues).await {
                Ok(all_found) => declare = !all_found,
                Err(e) => return Some(e),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
            }
        }
    }

    /// Declares every polled queue. A refusal (another process declared a queue with other
    /// arguments) is that process's to report; the poll then reads what exists.
    async fn declare(&self, probe: &mut Probe<'_>) -> Result<(), PollError> {
        let channel = probe.channel().await?;
        let mut declared = bounded(self.topology.declare(&channel)).await;
        for delay in self.tiers.iter() {
            if declared.is_ok() {
                declared = bounded(self.topology.declare_retry_tier(&channel, *delay)).await;
            }
        }
        match declared {
            Ok(()) => {
                probe.channel = Some(channel);
                Ok(())
            }
            Err(e) if probe.conn.status().connected() => {
                tracing::debug!(error = %e, "declaring the polled queues failed");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Reads every queue's depth; false when a queue was missing (it reads as empty).
    async fn poll_once(&self, probe: &mut Probe<'_>, queues: &[String]) -> Result<bool, PollError> {
        let mut all_found = true;
        for queue in queues {
            let channel = probe.channel().await?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let declared = bounded(channel.queue_declare(
                queue.as_str().into(),
                passive,
                FieldTable::default(),
            ))
            .await;
            let messages = match declared {
                Ok(q) => {
                    probe.channel = Some(channel);
                    i64::from(q.message_count())
                }
                Err(PollError::Broker(e)) if is_not_found(&e) => {
                    all_found = false;
                    0
                }
                Err(e) => return Err(e),
            };
            self.gauge
                .with_label_values(&[queue.as_str()])
                .set(messages);
        }
        Ok(all_found)
    }
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
