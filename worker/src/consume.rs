//! Consuming every partition queue and settling each message: ack only after its effect is
//! committed, it was ignored, or its retry or dead letter was confirmed. Reconnects with backoff
//! whenever the broker goes away; ready only while consuming.
//!
//! A transient failure of one tenant sends the message to a retry tier (it waits in the broker,
//! not here, so the partition keeps flowing); after the last delay it is dead-lettered as
//! `exhausted`. When PostgreSQL itself cannot be reached, retrying would only burn every
//! message's retries: the worker holds what it has and tries again with backoff, and since it
//! holds its whole prefetch, it takes nothing new until the database answers.

use crate::apply;
use crate::batch::{Batch, Batcher, Limits};
use crate::breaker::{Admitted, Held, SetAsideReason, Tenants};
use crate::dlq::{self, DeadLetter, ErrorClass};
use crate::failure::{Failure, FailureClass};
use crate::metrics::{Metrics, Outcome};
use crate::pools::Pools;
use crate::retry::{self, History, NextStep, Retry, RetryPolicy};
use crate::tenants::Resolver;
use avsync_shared::broker::{self, ConfirmedPublisher, FailureLog};
use avsync_shared::event::{type_label, Effect};
use avsync_shared::topology::Topology;
use avsync_shared::{Envelope, TenantId};
use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use futures_util::stream::{self, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How long a message whose retry or dead letter could not be published waits before it is
/// handed back, so that a broker in trouble slows the worker down instead of spinning.
const TRANSIENT_PAUSE: Duration = Duration::from_secs(1);
/// Backoff between attempts while PostgreSQL cannot be reached at all.
const OUTAGE_MIN: Duration = Duration::from_secs(1);
const OUTAGE_MAX: Duration = Duration::from_secs(30);
/// Backoff between connection attempts while a server refuses them for lack of slots.
const REFUSAL_MIN: Duration = Duration::from_millis(100);
const REFUSAL_MAX: Duration = Duration::from_secs(5);
const MIN_RECONNECT: Duration = Duration::from_millis(250);
const MAX_RECONNECT: Duration = Duration::from_secs(30);
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

/// How long to wait for the broker to answer a close.
fn close_bound<T, E>(outcome: &Result<T, E>) -> Duration {
    if outcome.is_err() {
        CLOSE_TIMEOUT
    } else {
        Duration::MAX
    }
}
/// On shutdown, the longest wait for the broker to use up its credit before cancelling: a
/// delivery still under way when the cancel is confirmed is dropped by lapin and handed back,
/// and on a loaded machine the broker takes more than a moment to send what it may.
const QUIESCE: Duration = Duration::from_secs(2);
/// A tenant's events are applied together, up to this many in one statement: larger batches
/// gain little once a commit's cost is shared by a few hundred rows.
const MAX_BATCH: usize = 250;
/// Longest an event waits for others of its tenant: a few milliseconds add little to the lag and
/// let busy tenants fill their batches.
const LINGER: Duration = Duration::from_millis(5);
/// The same for a cold tenant (see `breaker::WARM`), whose batch likely opens a session: one
/// open then serves more of its events.
const COLD_LINGER: Duration = Duration::from_millis(100);

/// Everything a consuming worker shares between its tasks.
pub struct Worker {
    pub topology: Topology,
    pub amqp_url: String,
    pub prefetch: u16,
    pub application_id: Option<String>,
    pub resolver: Resolver,
    pub pools: Pools,
    pub retry: RetryPolicy,
    pub metrics: Metrics,
    pub ready: Arc<AtomicBool>,
    pub tenants: Tenants,
    /// Messages held because PostgreSQL cannot be reached at all: while any is, no tenant is
    /// singled out as stalled.
    pub outage_holds: AtomicUsize,
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

impl Worker {
    fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.metrics.ready.set(i64::from(ready));
    }
}

fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(MIN_RECONNECT)
        .with_max_delay(MAX_RECONNECT)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Consumes until `shutdown`, reconnecting with backoff. On shutdown, stops consuming, finishes
/// every message already received, and returns.
pub async fn run(worker: Arc<Worker>, shutdown: CancellationToken) {
    let mut delays = backoff();
    let mut failures = FailureLog::default();
    while !shutdown.is_cancelled() {
        let mut consumed = false;
        let result = session(&worker, &shutdown, &mut consumed).await;
        worker.set_ready(false);
        match result {
            Ok(()) => break,
            Err(e) => {
                if consumed {
                    delays = backoff();
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

/// One partition queue's share of AVSYNC_PREFETCH: quorum queues have no channel-wide prefetch.
fn per_queue_prefetch(prefetch: u16, partitions: u16) -> u16 {
    (prefetch / partitions.max(1)).max(1)
}

/// The most unsettled messages a stalled tenant holds: `AVSYNC_TENANT_MAX_UNSETTLED`, but never
/// more than half its partition's prefetch, so its neighbours always have room.
pub fn tenant_bound(max_unsettled: u32, prefetch: u16, partitions: u16) -> usize {
    let half = usize::from(per_queue_prefetch(prefetch, partitions) / 2).max(1);
    usize::try_from(max_unsettled)
        .unwrap_or(usize::MAX)
        .min(half)
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
    worker: &Arc<Worker>,
    shutdown: &CancellationToken,
    consumed: &mut bool,
) -> Result<(), SessionError> {
    let name = format!("avsync-worker {}", worker.topology.prefix());
    let conn = tokio::time::timeout(SETUP_TIMEOUT, broker::connect(&worker.amqp_url, &name))
        .await
        .map_err(|_| SessionError::SetupTimeout(SETUP_TIMEOUT))??;
    let result = consume_on(&conn, worker, shutdown, consumed).await;
    let _ = tokio::time::timeout(
        close_bound(&result),
        conn.close(200, "worker stopping".into()),
    )
    .await;
    result
}

/// The channels a session consumes and publishes on, set up on one connection.
struct Channels {
    setup: Channel,
    publish: ConfirmedPublisher,
    consume: Channel,
}

impl Channels {
    /// Declares the topology and starts one consumer per partition queue.
    async fn open(
        conn: &Connection,
        worker: &Worker,
    ) -> Result<(Channels, Vec<lapin::Consumer>), SessionError> {
        let setup = conn.create_channel().await?;
        worker.topology.declare(&setup).await?;
        for delay in &worker.retry.delays {
            worker.topology.declare_retry_tier(&setup, *delay).await?;
        }
        check_partitions(conn, &worker.topology).await?;
        let publish = ConfirmedPublisher::open(conn.create_channel().await?).await?;
        let consume = conn.create_channel().await?;
        consume
            .basic_qos(
                per_queue_prefetch(worker.prefetch, worker.topology.partitions()),
                BasicQosOptions::default(),
            )
            .await?;
        let mut consumers = Vec::new();
        for partition in 0..worker.topology.partitions() {
            consumers.push(
                consume
                    .basic_consume(
                        worker.topology.partition_queue(partition).as_str().into(),
                        "".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?,
            );
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

    fn all_open(&self) -> bool {
        [&self.setup, self.publish.channel(), &self.consume]
            .iter()
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
    worker: &Arc<Worker>,
    shutdown: &CancellationToken,
    consumed: &mut bool,
) -> Result<(), SessionError> {
    let (channels, consumers) = tokio::time::timeout(SETUP_TIMEOUT, Channels::open(conn, worker))
        .await
        .map_err(|_| SessionError::SetupTimeout(SETUP_TIMEOUT))??;
    let Channels {
        setup,
        publish,
        consume,
    } = &channels;
    let tags: Vec<_> = consumers.iter().map(lapin::Consumer::tag).collect();
    let mut deliveries = Deliveries {
        consumers: stream::select_all(
            consumers
                .into_iter()
                .zip(0..)
                .map(|(consumer, partition)| consumer.map(move |delivery| (partition, delivery))),
        ),
        lost: Box::pin(channel_lost(&channels)),
    };
    worker.set_ready(true);
    *consumed = true;
    tracing::info!(
        topology = worker.topology.prefix(),
        partitions = worker.topology.partitions(),
        "consuming"
    );

    // The broker never has more than this many unsettled deliveries out to this worker, so
    // this also bounds how many messages are applied at once.
    let per_queue = per_queue_prefetch(worker.prefetch, worker.topology.partitions());
    let bound = Arc::new(Semaphore::new(
        usize::from(per_queue) * usize::from(worker.topology.partitions()),
    ));
    let gate = SettleGate {
        shutdown: shutdown.clone(),
        consumers_stopped: CancellationToken::new(),
        held: Arc::new(
            (0..worker.topology.partitions())
                .map(|_| AtomicUsize::new(0))
                .collect(),
        ),
    };
    let mut batcher = Batcher::new(Limits {
        max_events: MAX_BATCH,
        linger: LINGER,
        cold_linger: COLD_LINGER,
    });
    let mut tasks = JoinSet::new();
    let mut outcome = Ok(());
    let mut phase = Phase::Consuming;
    loop {
        let linger = batcher.next_deadline();
        let lingered = async {
            match linger {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        let next = match phase {
            Phase::Consuming => tokio::select! {
                next = deliveries.next() => next,
                _ = lingered => {
                    flush(&mut tasks, batcher.due(tokio::time::Instant::now()), worker, publish, &gate);
                    continue;
                }
                _ = shutdown.cancelled() => {
                    worker.set_ready(false);
                    phase = Phase::Quiescing(tokio::time::Instant::now() + QUIESCE);
                    continue;
                }
            },
            Phase::Quiescing(deadline) => {
                if gate.all_full(usize::from(per_queue)) {
                    phase = Phase::Cancelling;
                    continue;
                }
                tokio::select! {
                    next = deliveries.next() => next,
                    _ = lingered => {
                        flush(&mut tasks, batcher.due(tokio::time::Instant::now()), worker, publish, &gate);
                        continue;
                    }
                    _ = tokio::time::sleep_until(deadline) => {
                        phase = Phase::Cancelling;
                        continue;
                    }
                }
            }
            Phase::Cancelling => {
                // Those already received still arrive; then each consumer's stream ends.
                for tag in &tags {
                    let _ = consume
                        .basic_cancel(tag.clone(), BasicCancelOptions::default())
                        .await;
                }
                gate.consumers_stopped.cancel();
                phase = Phase::Draining;
                continue;
            }
            Phase::Draining => tokio::select! {
                next = deliveries.next() => next,
                _ = lingered => {
                    flush(&mut tasks, batcher.due(tokio::time::Instant::now()), worker, publish, &gate);
                    continue;
                }
            },
        };
        match next {
            Some((partition, Ok(delivery))) => {
                let permit = tokio::select! {
                    permit = bound.clone().acquire_owned() => permit,
                    () = &mut deliveries.lost => {
                        outcome = Err(SessionError::ChannelLost);
                        break;
                    }
                };
                let Ok(permit) = permit else {
                    break;
                };
                gate.received(partition);
                match triage(worker, &delivery) {
                    Some((envelope, effect)) => {
                        let tenant = envelope.tenant_id.clone();
                        let calm = worker.outage_holds.load(Ordering::Acquire) == 0;
                        let held = match worker.tenants.admit(&tenant, calm) {
                            Admitted::Hold(held) => held,
                            Admitted::SetAside { reason, wait } => {
                                let worker = worker.clone();
                                let publish = publish.clone();
                                let gate = gate.clone();
                                let label = type_label(&envelope.event_type);
                                let span = tracing::info_span!("event", event_id = envelope.id, tenant = %tenant, r#type = label, partition);
                                tasks.spawn(
                                    async move {
                                        let settler = Settler {
                                            worker: &worker,
                                            publish: &publish,
                                            partition,
                                            delivery: &delivery,
                                            label,
                                            gate: &gate,
                                        };
                                        settler.set_aside(&tenant, reason, wait).await;
                                        drop(permit);
                                    }
                                    .instrument(span),
                                );
                                while tasks.try_join_next().is_some() {}
                                continue;
                            }
                        };
                        let item = Item {
                            partition,
                            label: type_label(&envelope.event_type),
                            delivery,
                            envelope,
                            effect,
                            received: Instant::now(),
                            held,
                            _permit: permit,
                        };
                        let stalled = gate.holds(partition) >= usize::from(per_queue);
                        let now = tokio::time::Instant::now();
                        let cold = worker.tenants.is_cold(&tenant);
                        if let Some(batch) =
                            batcher.push(&tenant, partition, item, now, stalled, cold)
                        {
                            flush(&mut tasks, vec![batch], worker, publish, &gate);
                        }
                    }
                    None => {
                        let worker = worker.clone();
                        let publish = publish.clone();
                        let gate = gate.clone();
                        tasks.spawn(async move {
                            handle(worker, publish, partition, delivery, gate).await;
                            drop(permit);
                        });
                    }
                }
            }
            Some((_, Err(e))) => {
                outcome = Err(e);
                break;
            }
            None if phase == Phase::Draining => break,
            None => {
                outcome = Err(SessionError::ConsumerCancelled);
                break;
            }
        }
        while tasks.try_join_next().is_some() {}
    }
    worker.set_ready(false);
    gate.consumers_stopped.cancel();
    // What was received is finished, not handed back (contract section 7).
    flush(&mut tasks, batcher.drain(), worker, publish, &gate);
    // With the broker gone, nothing in flight can be acked any more; it is not waited on for
    // ever, since the broker hands every unacked message back.
    let bound = if outcome.is_err() {
        ABANDON_AFTER
    } else {
        Duration::MAX
    };
    let finished =
        tokio::time::timeout(bound, async { while tasks.join_next().await.is_some() {} }).await;
    if finished.is_err() {
        tracing::warn!(
            tasks = tasks.len(),
            "broker lost; abandoning in-flight messages, which the broker hands back"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    // The broker answers a channel's close only after it has processed every frame sent on it
    // before, so once these return, every ack above has reached it; closing the connection
    // straight away could drop acks still queued and hand applied messages back.
    for channel in [consume, publish.channel(), setup] {
        let _ = tokio::time::timeout(
            close_bound(&outcome),
            channel.close(200, "worker stopping".into()),
        )
        .await;
    }
    outcome
}

/// Every partition's deliveries, ended by an error as soon as a channel of the session is lost.
struct Deliveries<C, L> {
    consumers: C,
    lost: std::pin::Pin<Box<L>>,
}

impl<C, L> Deliveries<C, L>
where
    C: futures_util::Stream<Item = (u16, lapin::Result<Delivery>)> + Unpin,
    L: std::future::Future<Output = ()>,
{
    async fn next(&mut self) -> Option<(u16, Result<Delivery, SessionError>)> {
        tokio::select! {
            next = self.consumers.next() => next.map(|(p, d)| (p, d.map_err(SessionError::Broker))),
            () = &mut self.lost => Some((0, Err(SessionError::ChannelLost))),
        }
    }
}

/// One received message whose effect waits in its tenant's batch.
struct Item {
    partition: u16,
    delivery: Delivery,
    envelope: Envelope,
    effect: Effect,
    label: &'static str,
    received: Instant,
    /// Its place in its tenant's count; dropped when the message is settled.
    held: Held,
    _permit: OwnedSemaphorePermit,
}

/// Decides, per message and before any batching, whether the message applies something; what
/// does not (poison, undecodable, ignored, another application's) is settled on its own.
fn triage(worker: &Worker, delivery: &Delivery) -> Option<(Envelope, Effect)> {
    if worker.retry.is_poison(&History::of(delivery)) {
        return None;
    }
    let envelope = Envelope::decode(&delivery.data).ok()?;
    if let Some(ours) = &worker.application_id {
        if envelope.application_id.as_deref() != Some(ours.as_str()) {
            return None;
        }
    }
    let effect = Effect::decode(&envelope, &delivery.data).ok()??;
    Some((envelope, effect))
}

fn flush(
    tasks: &mut JoinSet<()>,
    batches: Vec<Batch<Item>>,
    worker: &Arc<Worker>,
    publish: &ConfirmedPublisher,
    gate: &SettleGate,
) {
    for batch in batches {
        let worker = worker.clone();
        let publish = publish.clone();
        let gate = gate.clone();
        let span = tracing::info_span!("batch", tenant = %batch.tenant, events = batch.items.len());
        tasks.spawn(apply_batch(worker, publish, gate, batch).instrument(span));
    }
}

/// Why a batch was not committed.
enum NotCommitted {
    /// Its tenant was marked slow while the batch waited for a connection.
    MarkedSlow,
    Failed(Failure),
}

impl From<Failure> for NotCommitted {
    fn from(failure: Failure) -> Self {
        NotCommitted::Failed(failure)
    }
}

/// Resolves the tenant once and applies its batch in one statement. While the server refuses
/// connections for lack of slots the batch waits here, with backoff, counting no attempt; it
/// gives up its wait for a connection when its tenant is marked slow.
async fn commit(
    worker: &Worker,
    batch: &Batch<Item>,
    marked_slow: &Notify,
    shutdown: &CancellationToken,
) -> Result<(), NotCommitted> {
    let marked = marked_slow.notified();
    tokio::pin!(marked);
    marked.as_mut().enable();
    let probe = batch.items.iter().any(|item| item.held.is_probe());
    if !probe && worker.tenants.is_slow(&batch.tenant) {
        return Err(NotCommitted::MarkedSlow);
    }
    let db = worker.resolver.resolve(&batch.tenant).await?;
    let mut refused: Option<Box<dyn Iterator<Item = Duration> + Send>> = None;
    loop {
        let lease = worker.pools.lease(&db).await?;
        let connection = tokio::select! {
            connection = lease.connection() => connection,
            _ = marked.as_mut() => return Err(NotCommitted::MarkedSlow),
        };
        match connection {
            Ok(mut conn) => {
                apply::apply_batch(&mut conn, batch.items.iter().map(|item| &item.effect))
                    .await
                    .map_err(Failure::from)?;
                return Ok(());
            }
            Err(Failure::PoolTimeout(_))
                if lease.budget_contended() && !shutdown.is_cancelled() =>
            {
                tracing::debug!("the connection budget is contended; the batch keeps waiting");
            }
            Err(failure) if failure.is_server_refusal() && !shutdown.is_cancelled() => {
                let delays = refused.get_or_insert_with(|| Box::new(refusal_backoff()));
                let delay = delays.next().unwrap_or(REFUSAL_MAX);
                tracing::info!(error = %failure, retry_in = ?delay, "no connection slot on the server; the batch waits");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return Err(NotCommitted::Failed(failure)),
                }
            }
            Err(failure) => return Err(NotCommitted::Failed(failure)),
        }
    }
}

/// Applies a batch and acks it after the commit. When the batch fails, every message goes its own
/// way: after a permanent failure each is applied alone (so one bad event cannot dead-letter the
/// others), after a transient one each takes the retry path (or the outage hold) by itself.
async fn apply_batch(
    worker: Arc<Worker>,
    publish: ConfirmedPublisher,
    gate: SettleGate,
    batch: Batch<Item>,
) {
    let marked_slow = worker.tenants.marked(&batch.tenant);
    let outcome = match commit(&worker, &batch, &marked_slow, &gate.shutdown).await {
        Ok(()) => Ok(()),
        Err(NotCommitted::MarkedSlow) => {
            set_aside_all(&worker, &publish, &gate, batch).await;
            return;
        }
        Err(NotCommitted::Failed(failure))
            if failure.marks_slow()
                && !worker
                    .resolver
                    .postgres_unreachable(&batch.tenant, &failure)
                    .await =>
        {
            tracing::warn!(error = %failure, "tenant marked slow; its events are set aside until a probe succeeds");
            worker.tenants.mark_slow(&batch.tenant);
            set_aside_all(&worker, &publish, &gate, batch).await;
            return;
        }
        Err(NotCommitted::Failed(failure)) => Err(failure),
    };
    match outcome {
        Ok(()) => {
            worker.tenants.committed(&batch.tenant);
            let now = Utc::now();
            let acked = gate
                .ack_all(
                    batch
                        .items
                        .iter()
                        .map(|item| (item.partition, &item.delivery)),
                )
                .await;
            for (item, acked) in batch.items.iter().zip(acked) {
                if !acked {
                    continue;
                }
                worker.metrics.count(item.label, Outcome::Applied);
                worker
                    .metrics
                    .apply_seconds
                    .observe(item.received.elapsed().as_secs_f64());
                let lag = (now - item.effect.key.time.to_utc())
                    .as_seconds_f64()
                    .max(0.0);
                worker.metrics.lag_seconds.observe(lag);
                tracing::debug!(event_id = item.envelope.id, tenant = %batch.tenant, r#type = item.label, "applied");
            }
        }
        Err(failure) => {
            let retry_each = failure.class() == FailureClass::Transient;
            if !retry_each {
                tracing::warn!(error = %failure, "batch failed permanently; applying its events one by one");
            }
            let alone = batch.items.into_iter().map(|item| {
                let span = tracing::info_span!(
                    "event",
                    event_id = item.envelope.id,
                    tenant = %item.envelope.tenant_id,
                    r#type = item.label,
                    partition = item.partition
                );
                let start = if retry_each {
                    Start::Failed(item.envelope, failure.clone())
                } else {
                    Start::Decoded(Ok(item.envelope))
                };
                let worker = &worker;
                let publish = &publish;
                let gate = &gate;
                let held = item.held;
                async move {
                    let _held = held;
                    settle(
                        worker,
                        publish,
                        item.partition,
                        &item.delivery,
                        start,
                        item.label,
                        gate,
                    )
                    .await;
                }
                .instrument(span)
            });
            futures_util::future::join_all(alone).await;
        }
    }
}

/// Sets every message of a slow tenant's batch aside, to come back after about the time its
/// tenant stays marked slow.
async fn set_aside_all(
    worker: &Worker,
    publish: &ConfirmedPublisher,
    gate: &SettleGate,
    batch: Batch<Item>,
) {
    let wait = worker.tenants.open_for(&batch.tenant);
    let tenant = &batch.tenant;
    let aside = batch.items.iter().map(|item| {
        let span = tracing::info_span!(
            "event",
            event_id = item.envelope.id,
            tenant = %tenant,
            r#type = item.label,
            partition = item.partition
        );
        let settler = Settler {
            worker,
            publish,
            partition: item.partition,
            delivery: &item.delivery,
            label: item.label,
            gate,
        };
        async move { settler.set_aside(tenant, SetAsideReason::Slow, wait).await }.instrument(span)
    });
    futures_util::future::join_all(aside).await;
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

/// What became of a message that did not fail.
enum Handled {
    Applied { lag: f64 },
    Ignored,
}

/// Decides and applies; never settles the message.
async fn process(worker: &Worker, envelope: &Envelope, body: &[u8]) -> Result<Handled, Failure> {
    if let Some(ours) = &worker.application_id {
        if envelope.application_id.as_deref() != Some(ours.as_str()) {
            return Ok(Handled::Ignored);
        }
    }
    let Some(effect) = Effect::decode(envelope, body)? else {
        return Ok(Handled::Ignored);
    };
    let db = worker.resolver.resolve(&envelope.tenant_id).await?;
    let lease = worker.pools.lease(&db).await?;
    let mut conn = lease.connection().await?;
    apply::apply(&mut conn, &effect).await?;
    let lag = (Utc::now() - effect.key.time.to_utc())
        .as_seconds_f64()
        .max(0.0);
    Ok(Handled::Applied { lag })
}

async fn handle(
    worker: Arc<Worker>,
    publish: ConfirmedPublisher,
    partition: u16,
    delivery: Delivery,
    gate: SettleGate,
) {
    let decoded = Envelope::decode(&delivery.data);
    let (event_id, tenant, label) = match &decoded {
        Ok(e) => (
            e.id.clone(),
            e.tenant_id.to_string(),
            type_label(&e.event_type),
        ),
        Err(_) => (
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned())
                .unwrap_or_default(),
            String::new(),
            "other",
        ),
    };
    let span = tracing::info_span!("event", event_id, tenant, r#type = label, partition);
    settle(
        &worker,
        &publish,
        partition,
        &delivery,
        Start::Decoded(decoded),
        label,
        &gate,
    )
    .instrument(span)
    .await;
}

/// Where settling a message starts: from its decoded envelope, or from the failure its batch met.
enum Start {
    Decoded(Result<Envelope, avsync_shared::EnvelopeError>),
    Failed(Envelope, Failure),
}

async fn settle(
    worker: &Worker,
    publish: &ConfirmedPublisher,
    partition: u16,
    delivery: &Delivery,
    start: Start,
    label: &'static str,
    gate: &SettleGate,
) {
    let started = Instant::now();
    let history = History::of(delivery);
    let settler = Settler {
        worker,
        publish,
        partition,
        delivery,
        label,
        gate,
    };
    if worker.retry.is_poison(&history) {
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
        settler.dead_letter(&letter).await;
        return;
    }
    let (envelope, initial) = match start {
        Start::Decoded(Ok(envelope)) => (envelope, None),
        Start::Failed(envelope, failure) => (envelope, Some(Err(failure))),
        Start::Decoded(Err(e)) => {
            settler.permanent(&Failure::from(e), &history).await;
            return;
        }
    };
    let mut result = match initial {
        Some(result) => result,
        None => process(worker, &envelope, &delivery.data).await,
    };
    let mut outage: Option<Box<dyn Iterator<Item = Duration> + Send>> = None;
    let mut refused: Option<Box<dyn Iterator<Item = Duration> + Send>> = None;
    loop {
        let failure = match result {
            Ok(Handled::Applied { lag }) => {
                worker.tenants.committed(&envelope.tenant_id);
                if gate.ack(partition, delivery).await {
                    worker.metrics.count(label, Outcome::Applied);
                    worker
                        .metrics
                        .apply_seconds
                        .observe(started.elapsed().as_secs_f64());
                    worker.metrics.lag_seconds.observe(lag);
                    tracing::debug!("applied");
                }
                return;
            }
            Ok(Handled::Ignored) => {
                if gate.ack(partition, delivery).await {
                    worker.metrics.count(label, Outcome::Ignored);
                    tracing::debug!("ignored");
                }
                return;
            }
            Err(failure) => failure,
        };
        match failure.class() {
            FailureClass::Permanent => {
                settler.permanent(&failure, &history).await;
                return;
            }
            FailureClass::Transient
                if worker
                    .resolver
                    .postgres_unreachable(&envelope.tenant_id, &failure)
                    .await =>
            {
                let delays = outage.get_or_insert_with(|| Box::new(outage_backoff()));
                let delay = delays.next().unwrap_or(OUTAGE_MAX);
                tracing::warn!(error = %failure, retry_in = ?delay, "PostgreSQL unreachable; holding the message and backing off");
                worker.outage_holds.fetch_add(1, Ordering::AcqRel);
                let stopping = tokio::select! {
                    _ = tokio::time::sleep(delay) => false,
                    _ = gate.shutdown.cancelled() => true,
                };
                worker.outage_holds.fetch_sub(1, Ordering::AcqRel);
                if stopping {
                    // It cannot be finished while the database is down; another worker
                    // (or this one, restarted) takes it when it is back.
                    gate.requeue(partition, delivery).await;
                    return;
                }
                result = process(worker, &envelope, &delivery.data).await;
            }
            FailureClass::Transient if failure.is_server_refusal() => {
                let delays = refused.get_or_insert_with(|| Box::new(refusal_backoff()));
                let delay = delays.next().unwrap_or(REFUSAL_MAX);
                tracing::info!(error = %failure, retry_in = ?delay, "no connection slot on the server; the message waits");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = gate.shutdown.cancelled() => {
                        gate.requeue(partition, delivery).await;
                        return;
                    }
                }
                result = process(worker, &envelope, &delivery.data).await;
            }
            FailureClass::Transient if failure.marks_slow() => {
                tracing::warn!(error = %failure, "tenant marked slow; its events are set aside until a probe succeeds");
                worker.tenants.mark_slow(&envelope.tenant_id);
                let wait = worker.tenants.open_for(&envelope.tenant_id);
                settler
                    .set_aside(&envelope.tenant_id, SetAsideReason::Slow, wait)
                    .await;
                return;
            }
            FailureClass::Transient => {
                settler
                    .transient(&envelope.tenant_id, &failure, &history)
                    .await;
                return;
            }
        }
    }
}

fn outage_backoff() -> impl Iterator<Item = Duration> + Send {
    ExponentialBuilder::default()
        .with_min_delay(OUTAGE_MIN)
        .with_max_delay(OUTAGE_MAX)
        .with_jitter()
        .without_max_times()
        .build()
}

fn refusal_backoff() -> impl Iterator<Item = Duration> + Send {
    ExponentialBuilder::default()
        .with_min_delay(REFUSAL_MIN)
        .with_max_delay(REFUSAL_MAX)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The retry tier a set-aside message waits in: the longest configured delay within `wait`
/// (how long its tenant stays marked slow), else the shortest.
fn set_aside_delay(delays: &[Duration], wait: Duration) -> Duration {
    delays
        .iter()
        .copied()
        .filter(|d| *d <= wait)
        .max()
        .or_else(|| delays.iter().copied().min())
        .unwrap_or(wait)
}

/// Settles one failed message: into a retry tier or the dead-letter queue, confirmed, then acked.
struct Settler<'a> {
    worker: &'a Worker,
    publish: &'a ConfirmedPublisher,
    partition: u16,
    delivery: &'a Delivery,
    label: &'static str,
    gate: &'a SettleGate,
}

impl Settler<'_> {
    async fn permanent(&self, failure: &Failure, history: &History) {
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

    async fn transient(&self, tenant: &TenantId, failure: &Failure, history: &History) {
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
    async fn set_aside(&self, tenant: &TenantId, reason: SetAsideReason, wait: Duration) {
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
struct SettleGate {
    shutdown: CancellationToken,
    consumers_stopped: CancellationToken,
    held: Arc<Vec<AtomicUsize>>,
}

impl SettleGate {
    fn received(&self, partition: u16) {
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
    fn holds(&self, partition: u16) -> usize {
        self.held
            .get(usize::from(partition))
            .map_or(0, |n| n.load(Ordering::Acquire))
    }

    fn all_full(&self, per_queue: usize) -> bool {
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
    async fn ack(&self, partition: u16, delivery: &Delivery) -> bool {
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
    async fn ack_all<'a>(
        &self,
        deliveries: impl Iterator<Item = (u16, &'a Delivery)>,
    ) -> Vec<bool> {
        futures_util::future::join_all(
            deliveries.map(|(partition, delivery)| self.ack(partition, delivery)),
        )
        .await
    }

    async fn requeue(&self, partition: u16, delivery: &Delivery) -> bool {
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
    fn a_stalled_tenant_leaves_half_its_partition_to_others() {
        assert_eq!(tenant_bound(64, 4096, 16), 64);
        assert_eq!(tenant_bound(500, 4096, 16), 128);
        assert_eq!(tenant_bound(64, 32, 4), 4);
        assert_eq!(tenant_bound(64, 1, 1), 1);
    }

    #[test]
    fn set_aside_waits_in_the_longest_tier_within_the_wait() {
        let delays = [1, 5, 30].map(Duration::from_secs);
        assert_eq!(set_aside_delay(&delays, Duration::ZERO), delays[0]);
        assert_eq!(set_aside_delay(&delays, Duration::from_secs(7)), delays[1]);
        assert_eq!(set_aside_delay(&delays, Duration::from_secs(60)), delays[2]);
    }

    #[test]
    fn prefetch_is_split_over_partitions() {
        assert_eq!(per_queue_prefetch(64, 16), 4);
        assert_eq!(per_queue_prefetch(8, 16), 1);
        assert_eq!(per_queue_prefetch(10, 1), 10);
    }
}
