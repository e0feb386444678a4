//! The broker session: connect, declare the topology, consume every partition queue, and
//! reconnect with backoff whenever the broker goes away; ready only while consuming. What a
//! session receives goes to the [`Scheduler`]; how it stops keeps every ack (see [`Phase`]).

use crate::acks::Acks;
use crate::consume::schedule::{per_queue_prefetch, window_size, Scheduler};
use crate::execute::Applying;
use crate::metrics::Metrics;
use crate::retry::RetryPolicy;
use crate::settle::{Origin, SettleGate, Settling};
use avsync_shared::backoff::jittered;
use avsync_shared::broker::{self, ConfirmedPublisher, FailureLog};
use avsync_shared::topology::Topology;
use backon::BackoffBuilder;
use futures_util::stream::{self, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

const MIN_RECONNECT: Duration = Duration::from_millis(250);
pub(crate) const MAX_RECONNECT: Duration = Duration::from_secs(30);
/// Longest a connection attempt, or the declarations and consumers set up on it, may take: a
/// broker that accepts TCP while it is still starting must not hold a session forever.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a consuming session checks that its channels are still open. lapin does not
/// always end a consumer's stream when the connection under it dies (seen on RabbitMQ
/// restarts: the channels were closed, the consumers stayed silent), so the session does not
/// rely on the stream alone to notice.
const LIVENESS_CHECK: Duration = Duration::from_millis(500);
/// After the broker went away, the longest wait for in-flight work before it is abandoned:
/// what was not acked comes back from the broker anyway.
const ABANDON_AFTER: Duration = Duration::from_secs(30);
/// Bound on closing a channel or the connection of a session whose broker went away, which may
/// never answer. A session that stops because the worker stops waits for the answers instead:
/// they tell that every ack sent before reached the broker.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// On shutdown, the longest wait for the broker to use up its credit before cancelling: a
/// delivery still under way when the cancel is confirmed is dropped by lapin and handed back,
/// and on a loaded machine the broker takes more than a moment to send what it may.
const QUIESCE: Duration = Duration::from_secs(2);
/// How long the end of a session waits for the broker (or for the work in flight): at most
/// `failed` when the session failed, since a broker that went away may never answer; else for
/// as long as it takes, since the answers tell that every ack sent before reached the broker.
fn end_bound<T, E>(outcome: &Result<T, E>, failed: Duration) -> Duration {
    if outcome.is_err() {
        failed
    } else {
        Duration::MAX
    }
}

/// What the broker session needs: where and what to consume, what settling and applying take
/// from it, and the readiness it reports.
pub(crate) struct Consuming {
    pub topology: Topology,
    pub amqp_url: String,
    pub prefetch: u32,
    /// AVSYNC_PREFETCH_BYTES: what the window's messages may weigh.
    pub prefetch_bytes: usize,
    pub application_id: Option<String>,
    pub retry: RetryPolicy,
    pub metrics: Metrics,
    pub ready: Arc<AtomicBool>,
    pub applying: Arc<Applying>,
    /// The gate of the session consuming now, whose count is the window in use.
    pub window: std::sync::Mutex<Option<SettleGate>>,
}

/// The prefetch window of the session consuming now.
pub(crate) struct Window {
    /// Messages received and not yet settled.
    pub messages: usize,
    /// The most it holds.
    pub size: usize,
    /// What its messages held to be applied weigh.
    pub bytes: usize,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("queue {queue} exists beyond AVSYNC_PARTITIONS={partitions}: the ingress publishes to more partitions than this worker consumes; give every process of this topology the same AVSYNC_PARTITIONS")]
    TooFewPartitions { queue: String, partitions: u16 },
    #[error("the broker cancelled a consumer (was a partition queue deleted?)")]
    ConsumerCancelled,
    #[error("a channel to the broker closed under the session")]
    ChannelLost,
    #[error("no answer from the broker within {0:?} while connecting and setting up")]
    SetupTimeout(Duration),
}

impl Consuming {
    /// What the window holds now, and the most it holds.
    pub fn window(&self) -> Window {
        let size = window_size(self.prefetch, self.topology.partitions());
        let gate = self.window.lock().unwrap_or_else(|e| e.into_inner());
        Window {
            messages: gate.as_ref().map_or(0, SettleGate::in_window),
            size,
            bytes: gate.as_ref().map_or(0, SettleGate::bytes),
        }
    }

    fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.metrics.ready.set(i64::from(ready));
    }
}

/// How every broker connection of the worker (the session's and the depth poller's) waits
/// between attempts.
pub(crate) fn reconnect_backoff() -> impl Iterator<Item = Duration> + Send {
    jittered(MIN_RECONNECT, MAX_RECONNECT).build()
}

/// Consumes until `shutdown`, reconnecting with backoff. On shutdown, stops consuming, finishes
/// every message already received, and returns.
pub async fn run(worker: Arc<Consuming>, shutdown: CancellationToken) {
    let mut delays = reconnect_backoff();
    let mut failures = FailureLog::default();
    while !shutdown.is_cancelled() {
        let mut consumed = false;
        let result = session(&worker, &shutdown, &mut consumed).await;
        worker.set_ready(false);
        match result {
            Ok(()) => break,
            Err(e) => {
                if consumed {
                    delays = reconnect_backoff();
                    failures.connected();
                }
                let delay = delays.next().unwrap_or(MAX_RECONNECT);
                match &e {
                    SessionError::TooFewPartitions { .. } => tracing::error!(
                        retry_in = ?delay,
                        topology = worker.topology.prefix(),
                        "{e}"
                    ),
                    SessionError::Broker(e) => failures.failed("not consuming", e, delay),
                    _ => tracing::warn!(retry_in = ?delay, "not consuming: {e}"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
}

async fn check_partitions(conn: &Connection, topology: &Topology) -> Result<(), SessionError> {
    // A passive declare of a missing queue closes its channel: use a throwaway one. lapin logs
    // that expected close at ERROR; `telemetry::DEFAULT_FILTER` keeps lapin's own lines out.
    let probe = conn.create_channel().await?;
    let beyond = topology.partition_queue(topology.partitions());
    let found = probe
        .queue_declare(
            beyond.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok();
    if found {
        let _ = probe.close(200, "probe".into()).await;
        return Err(SessionError::TooFewPartitions {
            queue: beyond,
            partitions: topology.partitions(),
        });
    }
    Ok(())
}

async fn session(
    worker: &Consuming,
    shutdown: &CancellationToken,
    consumed: &mut bool,
) -> Result<(), SessionError> {
    let name = format!("avsync-worker {}", worker.topology.prefix());
    let conn = tokio::time::timeout(SETUP_TIMEOUT, broker::connect(&worker.amqp_url, &name))
        .await
        .map_err(|_| SessionError::SetupTimeout(SETUP_TIMEOUT))??;
    let result = consume_on(&conn, worker, shutdown, consumed).await;
    let _ = tokio::time::timeout(
        end_bound(&result, CLOSE_TIMEOUT),
        conn.close(200, "worker stopping".into()),
    )
    .await;
    result
}

/// Most unacked deliveries one consume channel holds. RabbitMQ 3.10 finds the message an ack
/// names by walking its channel's unacked deliveries from the oldest, and a tenant's events are
/// acked out of arrival order, so an ack costs a walk of about half of what the channel holds:
/// 65,536 held on one channel drained 5 tenants at 2,000 events/s, the broker's CPU busy, against
/// 14,000 with 4,096; draining 1,000 tenants (whose acks are single) the broker spent 0.20 cores
/// with 1,024 a channel against 0.30-0.41 with 4,096.
const MAX_UNACKED_PER_CHANNEL: usize = 1024;

/// One consumer of a session: the partition queue it consumes, its prefetch, and whether it
/// opens a channel of its own or shares the one of the consumer before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Planned {
    partition: u16,
    prefetch: u16,
    new_channel: bool,
}

/// The consumers of a session over `partitions` queues of `per_queue` unacked each, so that no
/// channel holds more than [`MAX_UNACKED_PER_CHANNEL`]: a larger share is split between several
/// consumers of its queue, each on a channel of its own (with the default window, four per
/// partition), and small shares share channels (a small window keeps them all on one).
fn plan(per_queue: u16, partitions: u16) -> Vec<Planned> {
    let share = usize::from(per_queue.max(1));
    let split = share.div_ceil(MAX_UNACKED_PER_CHANNEL);
    let mut planned = Vec::new();
    let mut on_channel = 0;
    for partition in 0..partitions {
        for part in 0..split {
            let prefetch = share / split + usize::from(part < share % split);
            let new_channel = planned.is_empty() || on_channel + prefetch > MAX_UNACKED_PER_CHANNEL;
            if new_channel {
                on_channel = 0;
            }
            on_channel += prefetch;
            planned.push(Planned {
                partition,
                prefetch: u16::try_from(prefetch).unwrap_or(u16::MAX),
                new_channel,
            });
        }
    }
    planned
}

/// The channels a session consumes and publishes on, set up on one connection (see [`plan`]).
struct Channels {
    setup: Channel,
    publish: ConfirmedPublisher,
    /// Each consumer's consume channel, by its acks, in the order of the consumers (consumers
    /// that share a channel share them).
    consume: Vec<Acks>,
}

impl Channels {
    /// Declares the topology and starts the consumers of every partition queue, each with the
    /// partition it consumes.
    async fn open(
        conn: &Connection,
        worker: &Consuming,
    ) -> Result<(Channels, Vec<(u16, lapin::Consumer)>), SessionError> {
        let setup = conn.create_channel().await?;
        worker.topology.declare(&setup).await?;
        for delay in worker.retry.tiers.iter() {
            worker.topology.declare_retry_tier(&setup, *delay).await?;
        }
        check_partitions(conn, &worker.topology).await?;
        let publish = ConfirmedPublisher::open(conn.create_channel().await?).await?;
        let partitions = worker.topology.partitions();
        let per_queue = per_queue_prefetch(worker.prefetch, partitions);
        let mut consume: Vec<Acks> = Vec::new();
        let mut consumers = Vec::new();
        for planned in plan(per_queue, partitions) {
            let acks = match consume.last() {
                Some(acks) if !planned.new_channel => acks.clone(),
                _ => Acks::start(conn.create_channel().await?, worker.metrics.clone()),
            };
            // A consumer's prefetch is the channel's at the moment it starts.
            acks.channel()
                .basic_qos(planned.prefetch, BasicQosOptions::default())
                .await?;
            let consumer = acks
                .channel()
                .basic_consume(
                    worker
                        .topology
                        .partition_queue(planned.partition)
                        .as_str()
                        .into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            consumers.push((planned.partition, consumer));
            consume.push(acks);
        }
        Ok((
            Channels {
                setup,
                publish,
                consume,
            },
            consumers,
        ))
    }

    /// Closes every channel, each waiting at most `bound`. The broker answers a channel's close
    /// only after it has processed every frame sent on it before, so once these return, every
    /// ack sent before has reached it; closing the connection straight away could drop acks
    /// still queued and hand applied messages back.
    async fn close(&self, bound: Duration) {
        let mut consume: Vec<&Acks> = self.consume.iter().collect();
        consume.dedup_by_key(|acks| acks.channel().id());
        let _ = tokio::time::timeout(
            bound,
            futures_util::future::join_all(consume.iter().map(|acks| acks.flush())),
        )
        .await;
        for channel in consume
            .into_iter()
            .map(Acks::channel)
            .chain([self.publish.channel(), &self.setup])
        {
            let _ = tokio::time::timeout(bound, channel.close(200, "worker stopping".into())).await;
        }
    }

    fn all_open(&self) -> bool {
        [&self.setup, self.publish.channel()]
            .into_iter()
            .chain(self.consume.iter().map(Acks::channel))
            .all(|c| c.status().connected())
    }
}

/// Resolves once a channel of the session is no longer open.
async fn channel_lost(channels: &Channels) {
    let mut every = tokio::time::interval(LIVENESS_CHECK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if !channels.all_open() {
            return;
        }
    }
}

async fn consume_on(
    conn: &Connection,
    worker: &Consuming,
    shutdown: &CancellationToken,
    consumed: &mut bool,
) -> Result<(), SessionError> {
    let (channels, consumers) = tokio::time::timeout(SETUP_TIMEOUT, Channels::open(conn, worker))
        .await
        .map_err(|_| SessionError::SetupTimeout(SETUP_TIMEOUT))??;
    let tags: Vec<_> = consumers.iter().map(|(_, c)| c.tag()).collect();
    let mut deliveries = Deliveries {
        consumers: stream::select_all(consumers.into_iter().zip(0..).map(
            |((partition, consumer), index)| {
                let origin = Origin {
                    partition,
                    consumer: index,
                };
                consumer.map(move |delivery| (origin, delivery))
            },
        )),
        lost: Box::pin(channel_lost(&channels)),
    };
    worker.set_ready(true);
    *consumed = true;
    tracing::info!(
        topology = worker.topology.prefix(),
        partitions = worker.topology.partitions(),
        "consuming"
    );
    let partitions = worker.topology.partitions();
    let per_queue = usize::from(per_queue_prefetch(worker.prefetch, partitions));
    let gate = SettleGate::new(shutdown.clone(), partitions);
    *worker.window.lock().unwrap_or_else(|e| e.into_inner()) = Some(gate.clone());
    let settling = Arc::new(Settling {
        publish: channels.publish.clone(),
        acks: channels.consume.clone(),
        topology: worker.topology.clone(),
        retry: worker.retry.clone(),
        metrics: worker.metrics.clone(),
        gate: gate.clone(),
    });
    let mut receiving = Receiving {
        scheduler: Scheduler::new(
            worker.applying.clone(),
            settling,
            worker.application_id.clone(),
            per_queue,
            worker.prefetch_bytes,
        ),
        // The broker never has more than this many unsettled deliveries out to this worker, so
        // this also bounds how many messages are applied at once.
        window: Arc::new(Semaphore::new(window_size(worker.prefetch, partitions))),
        gate,
        per_queue,
    };
    let outcome = receiving
        .until_stopped(&mut deliveries, worker, shutdown, &channels.consume, &tags)
        .await;
    worker.set_ready(false);
    receiving.gate.consumers_stopped.cancel();
    // What was received is finished, not handed back (contract section 7). With the broker
    // gone, nothing in flight can be acked any more; it is not waited on for ever, since the
    // broker hands every unacked message back.
    receiving
        .scheduler
        .finish(end_bound(&outcome, ABANDON_AFTER))
        .await;
    channels.close(end_bound(&outcome, CLOSE_TIMEOUT)).await;
    outcome
}

/// What a consuming session hands its deliveries to.
struct Receiving {
    scheduler: Scheduler,
    /// The prefetch window: a delivery takes a place before it is scheduled.
    window: Arc<Semaphore>,
    gate: SettleGate,
    per_queue: usize,
}

impl Receiving {
    /// Hands every delivery to the scheduler until the session ends: the broker goes away, a
    /// consumer is cancelled, or `shutdown` has taken the session through its [`Phase`]s.
    async fn until_stopped<C, L>(
        &mut self,
        deliveries: &mut Deliveries<C, L>,
        worker: &Consuming,
        shutdown: &CancellationToken,
        consume: &[Acks],
        tags: &[lapin::types::ShortString],
    ) -> Result<(), SessionError>
    where
        C: futures_util::Stream<Item = (Origin, lapin::Result<Delivery>)> + Unpin,
        L: std::future::Future<Output = ()>,
    {
        let mut phase = Phase::Consuming;
        loop {
            if matches!(phase, Phase::Quiescing(_)) && self.gate.all_full(self.per_queue) {
                phase = Phase::Cancelling;
            }
            if phase == Phase::Cancelling {
                // Those already received still arrive; then each consumer's stream ends.
                for (acks, tag) in consume.iter().zip(tags) {
                    let _ = acks
                        .channel()
                        .basic_cancel(tag.clone(), BasicCancelOptions::default())
                        .await;
                }
                self.gate.consumers_stopped.cancel();
                phase = Phase::Draining;
            }
            let quiesced = match phase {
                Phase::Quiescing(deadline) => deadline,
                _ => tokio::time::Instant::now() + QUIESCE,
            };
            let next = tokio::select! {
                next = deliveries.next() => next,
                () = self.scheduler.tick() => continue,
                _ = shutdown.cancelled(), if phase == Phase::Consuming => {
                    worker.set_ready(false);
                    phase = Phase::Quiescing(tokio::time::Instant::now() + QUIESCE);
                    continue;
                }
                _ = tokio::time::sleep_until(quiesced), if matches!(phase, Phase::Quiescing(_)) => {
                    phase = Phase::Cancelling;
                    continue;
                }
            };
            match next {
                Some((origin, Ok(delivery))) => {
                    let permit = tokio::select! {
                        permit = self.window.clone().acquire_owned() => permit,
                        () = &mut deliveries.lost => return Err(SessionError::ChannelLost),
                    };
                    let Ok(permit) = permit else {
                        return Ok(());
                    };
                    self.scheduler.receive(origin, delivery, permit);
                }
                Some((_, Err(e))) => return Err(e),
                None if phase == Phase::Draining => return Ok(()),
                None => return Err(SessionError::ConsumerCancelled),
            }
        }
    }
}

/// Every partition's deliveries, ended by an error as soon as a channel of the session is lost.
struct Deliveries<C, L> {
    consumers: C,
    lost: std::pin::Pin<Box<L>>,
}

impl<C, L> Deliveries<C, L>
where
    C: futures_util::Stream<Item = (Origin, lapin::Result<Delivery>)> + Unpin,
    L: std::future::Future<Output = ()>,
{
    async fn next(&mut self) -> Option<(Origin, Result<Delivery, SessionError>)> {
        tokio::select! {
            next = self.consumers.next() => next.map(|(o, d)| (o, d.map_err(SessionError::Broker))),
            () = &mut self.lost => Some((Origin { partition: 0, consumer: 0 }, Err(SessionError::ChannelLost))),
        }
    }
}

/// How a session stops. Settling a message gives the broker credit to deliver another, and a
/// quorum queue may still deliver after confirming a consumer's cancel; the client drops such a
/// delivery and the broker hands it back on close, counting a delivery. So on shutdown the
/// worker first stops settling and lets the broker use up its credit (every consumer holds its
/// full prefetch, or `QUIESCE` passed), then cancels, then settles and finishes everything it
/// received. A delivery the broker still sends after confirming the cancel cannot be helped: it
/// goes back with one more delivery counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Consuming,
    Quiescing(tokio::time::Instant),
    Cancelling,
    Draining,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks a plan: every partition's consumers together hold its whole share, and no
    /// channel more than its bound.
    fn check(per_queue: u16, partitions: u16) -> Vec<Planned> {
        let planned = plan(per_queue, partitions);
        for partition in 0..partitions {
            let share: usize = planned
                .iter()
                .filter(|p| p.partition == partition)
                .map(|p| usize::from(p.prefetch))
                .sum();
            assert_eq!(share, usize::from(per_queue), "partition {partition}");
        }
        let mut channels: Vec<usize> = Vec::new();
        for p in &planned {
            match channels.last_mut() {
                Some(on) if !p.new_channel => *on += usize::from(p.prefetch),
                _ => channels.push(usize::from(p.prefetch)),
            }
        }
        assert!(channels.iter().all(|&on| on <= MAX_UNACKED_PER_CHANNEL));
        assert!(planned.first().is_none_or(|p| p.new_channel));
        planned
    }

    #[test]
    fn a_consume_channel_holds_at_most_its_bound_of_unacked() {
        // The default window: four consumers of 1,024 per partition, each on its own channel.
        let planned = check(4096, 16);
        assert_eq!(planned.len(), 64);
        assert!(planned.iter().all(|p| p.prefetch == 1024 && p.new_channel));
        // The most a queue's consumers may hold, split as evenly as it goes.
        let planned = check(u16::MAX, 2);
        assert_eq!(planned.len(), 128);
        assert!(planned.iter().all(|p| (1023..=1024).contains(&p.prefetch)));
        // Small shares share channels: 4 partitions of 256, 512 of 2.
        let planned = check(256, 16);
        assert_eq!(planned.iter().filter(|p| p.new_channel).count(), 4);
        let planned = check(2, 2048);
        assert_eq!(planned.iter().filter(|p| p.new_channel).count(), 4);
        // A share a little over the bound: two consumers, never on one channel.
        let planned = check(1500, 3);
        assert_eq!(planned.len(), 6);
        assert!(planned.iter().all(|p| p.new_channel));
    }

    #[test]
    fn only_a_failed_session_bounds_its_end() {
        let failed: Result<(), ()> = Err(());
        assert_eq!(end_bound(&failed, CLOSE_TIMEOUT), CLOSE_TIMEOUT);
        assert_eq!(end_bound(&Ok::<(), ()>(()), ABANDON_AFTER), Duration::MAX);
    }
}
