//! The scheduler: which received events are applied when, and together with which. Events are
//! gathered per tenant into batches ([`crate::batch`]; a cold tenant lingers longer so one
//! session serves more of them), a tenant holds a bounded share of its partition
//! ([`crate::breaker`]), and a batch waits for its tenant's connection within the server's
//! budget ([`crate::budget`]). A tenant has one batch in flight at a time: what arrives while it
//! waits for a session or is applied joins the next one, which goes when it settles
//! ([`InFlight`]). A batch that fails is split: each event then goes its own way.
//!
//! A transient failure of one tenant sends the message to a retry tier (it waits in the broker,
//! not here, so the partition keeps flowing); after the last delay it is dead-lettered as
//! `exhausted`. When PostgreSQL itself cannot be reached, retrying would only burn every
//! message's retries: the worker holds what it has and tries again with backoff, and since it
//! holds its whole prefetch, it takes nothing new until the database answers.

use crate::apply;
use crate::batch::{Batch, Batcher, Limits};
use crate::breaker::{Admitted, Held, SetAsideReason};
use crate::failure::{Failure, FailureClass};
use crate::fate::Fate;
use crate::metrics::Outcome;
use crate::outage;
use crate::retry::History;
use crate::session::{per_queue_prefetch, Worker};
use crate::settle::{settle_unapplied, SettleGate, Settler};
use avsync_shared::backoff::jittered;
use avsync_shared::broker::ConfirmedPublisher;
use avsync_shared::event::{type_label, Effect};
use avsync_shared::{Envelope, TenantId};
use backon::BackoffBuilder;
use chrono::Utc;
use lapin::message::Delivery;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Backoff between connection attempts while a server refuses them for lack of slots.
const REFUSAL_MIN: Duration = Duration::from_millis(100);
const REFUSAL_MAX: Duration = Duration::from_secs(5);
/// A tenant's events are applied together, up to this many in one statement: larger batches
/// gain little once a commit's cost is shared by a few hundred rows.
const MAX_BATCH: usize = 250;
/// Longest an event waits for others of its tenant: a few milliseconds add little to the lag and
/// let busy tenants fill their batches.
const LINGER: Duration = Duration::from_millis(5);
/// The same for a cold tenant (see `breaker::WARM`), whose batch likely opens a session: one
/// open then serves more of its events.
const COLD_LINGER: Duration = Duration::from_millis(250);

/// The most unsettled messages a stalled tenant holds: `AVSYNC_TENANT_MAX_UNSETTLED`, but never
/// more than half its partition's prefetch, so its neighbours always have room.
pub fn tenant_bound(max_unsettled: u32, prefetch: u16, partitions: u16) -> usize {
    let half = usize::from(per_queue_prefetch(prefetch, partitions) / 2).max(1);
    usize::try_from(max_unsettled)
        .unwrap_or(usize::MAX)
        .min(half)
}

/// One session's scheduling: the batches waiting per tenant, and the tasks applying and
/// settling what was received.
pub struct Scheduler<'a> {
    worker: &'a Arc<Worker>,
    publish: &'a ConfirmedPublisher,
    gate: SettleGate,
    /// A partition's whole prefetch: a consumer holding this many receives nothing more.
    per_queue: usize,
    batcher: Batcher<Item>,
    /// Where each batch's [`InFlight`] mark reports that its task has ended.
    settled_tx: mpsc::UnboundedSender<TenantId>,
    settled_rx: mpsc::UnboundedReceiver<TenantId>,
    /// Tenants whose batch in flight has settled, taken from `settled_rx` by [`Scheduler::ready`].
    settled: Vec<TenantId>,
    tasks: JoinSet<()>,
}

/// Marks a tenant's batch in flight for as long as the task applying it runs: dropped when
/// the task ends however it ends (settled, panicked or aborted), it tells the scheduler, which
/// then sends the batch that gathered meanwhile. A lost wake-up would leave that tenant's events
/// waiting for ever, which is why it is a guard and not a call at the end of the task.
struct InFlight {
    tenant: Option<TenantId>,
    settled: mpsc::UnboundedSender<TenantId>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(tenant) = self.tenant.take() {
            // The scheduler is gone only once it has finished: nothing waits then.
            let _ = self.settled.send(tenant);
        }
    }
}

impl<'a> Scheduler<'a> {
    pub fn new(
        worker: &'a Arc<Worker>,
        publish: &'a ConfirmedPublisher,
        gate: SettleGate,
        per_queue: usize,
    ) -> Self {
        let (settled_tx, settled_rx) = mpsc::unbounded_channel();
        Self {
            worker,
            publish,
            gate,
            per_queue,
            batcher: Batcher::new(Limits {
                max_events: MAX_BATCH,
                linger: LINGER,
                cold_linger: COLD_LINGER,
            }),
            settled_tx,
            settled_rx,
            settled: Vec::new(),
            tasks: JoinSet::new(),
        }
    }

    /// Resolves when a waiting batch may go: its linger has ended, or a batch in flight has
    /// settled. Cancel-safe: a settled tenant taken here waits for [`Scheduler::flush_ready`].
    pub async fn ready(&mut self) {
        let deadline = self.batcher.next_deadline();
        let lingered = async {
            match deadline {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            Some(tenant) = self.settled_rx.recv() => self.settled.push(tenant),
            () = lingered => {}
        }
    }

    /// Applies the batches that gathered behind a batch that has settled, and those that have
    /// waited their linger.
    pub fn flush_ready(&mut self) {
        self.flush_settled();
        let due = self.batcher.due(tokio::time::Instant::now());
        self.flush(due);
    }

    /// Applies the batches that gathered behind a batch that has settled.
    fn flush_settled(&mut self) {
        while let Ok(tenant) = self.settled_rx.try_recv() {
            self.settled.push(tenant);
        }
        let mut ready = Vec::new();
        for tenant in std::mem::take(&mut self.settled) {
            ready.extend(self.batcher.settled(&tenant));
        }
        self.flush(ready);
    }

    /// Takes a received message (and its place in the prefetch, `permit`): decides its fate
    /// once, then batches it, sets it aside or settles it on its own.
    pub fn receive(&mut self, partition: u16, delivery: Delivery, permit: OwnedSemaphorePermit) {
        let worker = self.worker;
        self.gate.received(partition);
        // A batch behind one that settled goes before this event can join it.
        self.flush_settled();
        let poison = worker.retry.is_poison(&History::of(&delivery));
        match Fate::decide(poison, &delivery.data, worker.application_id.as_deref()) {
            Fate::Apply(envelope, effect) => {
                let tenant = envelope.tenant_id.clone();
                let calm = worker.outage.calm();
                match worker.tenants.admit(&tenant, calm) {
                    Admitted::Hold(held) => {
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
                        let stalled = self.gate.holds(partition) >= self.per_queue;
                        let now = tokio::time::Instant::now();
                        let cold = worker.tenants.is_cold(&tenant);
                        if let Some(batch) = self
                            .batcher
                            .push(&tenant, partition, item, now, stalled, cold)
                        {
                            self.flush(vec![batch]);
                        }
                    }
                    Admitted::SetAside { reason, wait } => {
                        let worker = worker.clone();
                        let publish = self.publish.clone();
                        let gate = self.gate.clone();
                        let label = type_label(&envelope.event_type);
                        let span = tracing::info_span!("event", event_id = envelope.id, tenant = %tenant, r#type = label, partition);
                        self.tasks.spawn(
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
                    }
                }
            }
            Fate::Unapplied(unapplied) => {
                let worker = worker.clone();
                let publish = self.publish.clone();
                let gate = self.gate.clone();
                self.tasks.spawn(async move {
                    settle_unapplied(worker, publish, partition, delivery, unapplied, gate).await;
                    drop(permit);
                });
            }
        }
        while self.tasks.try_join_next().is_some() {}
    }

    /// Applies every waiting batch at once and finishes what is in flight, waiting at most
    /// `bound`: what is abandoned then is handed back by the broker.
    pub async fn finish(mut self, bound: Duration) {
        let waiting = self.batcher.drain();
        self.flush(waiting);
        let tasks = &mut self.tasks;
        let finished =
            tokio::time::timeout(bound, async { while tasks.join_next().await.is_some() {} }).await;
        if finished.is_err() {
            tracing::warn!(
                tasks = self.tasks.len(),
                "broker lost; abandoning in-flight messages, which the broker hands back"
            );
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
    }

    fn flush(&mut self, batches: Vec<Batch<Item>>) {
        for batch in batches {
            let worker = self.worker.clone();
            let publish = self.publish.clone();
            let gate = self.gate.clone();
            let in_flight = InFlight {
                tenant: Some(batch.tenant.clone()),
                settled: self.settled_tx.clone(),
            };
            let span =
                tracing::info_span!("batch", tenant = %batch.tenant, events = batch.items.len());
            self.tasks.spawn(
                async move {
                    let _in_flight = in_flight;
                    apply_batch(worker, publish, gate, batch).await;
                }
                .instrument(span),
            );
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
/// gives up its wait for a connection when its tenant is marked slow. A batch that finds its
/// table gone has its database migrated again and tries once more.
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
    let mut remigrated = false;
    loop {
        let lease = worker.pools.lease(&db).await?;
        let connection = tokio::select! {
            connection = lease.connection() => connection,
            _ = marked.as_mut() => return Err(NotCommitted::MarkedSlow),
        };
        match connection {
            Ok(mut conn) => {
                let applied =
                    apply::apply_batch(&mut conn, batch.items.iter().map(|item| &item.effect))
                        .await
                        .map_err(Failure::from);
                match applied {
                    Ok(()) => return Ok(()),
                    Err(failure) if failure.is_schema_missing() && !remigrated => {
                        tracing::warn!(error = %failure, "the tenant schema is gone (database recreated?); migrating it again");
                        remigrated = true;
                        conn.schema_missing();
                    }
                    Err(failure) => return Err(NotCommitted::Failed(failure)),
                }
            }
            Err(Failure::PoolTimeout(_))
                if lease.budget_contended() && !shutdown.is_cancelled() =>
            {
                tracing::debug!("the connection budget is contended; the batch keeps waiting");
            }
            Err(failure) if failure.is_server_refusal() && !shutdown.is_cancelled() => {
                let delays = refused
                    .get_or_insert_with(|| Box::new(jittered(REFUSAL_MIN, REFUSAL_MAX).build()));
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
                    .outage
                    .confirms(&worker.resolver, &batch.tenant, &failure)
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
                let first = retry_each.then(|| failure.clone());
                apply_alone(&worker, &publish, &gate, item, first).instrument(span)
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
    let wait = worker.tenants.set_aside_wait(&batch.tenant);
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

/// Applies one event of a failed batch by itself and settles it; after a transient failure of
/// the batch (`first`) it starts from that failure instead of applying. While PostgreSQL cannot
/// be reached at all the message is held with backoff, and while its server refuses connections
/// for lack of slots it waits: neither counts an attempt.
async fn apply_alone(
    worker: &Worker,
    publish: &ConfirmedPublisher,
    gate: &SettleGate,
    item: Item,
    first: Option<Failure>,
) {
    let started = Instant::now();
    let Item {
        partition,
        delivery,
        envelope,
        effect,
        label,
        held: _held,
        _permit,
        ..
    } = item;
    let delivery = &delivery;
    let history = History::of(delivery);
    let settler = Settler {
        worker,
        publish,
        partition,
        delivery,
        label,
        gate,
    };
    let mut result = match first {
        Some(failure) => Err(failure),
        None => apply_one(worker, &envelope.tenant_id, &effect).await,
    };
    let mut outage = outage::Backoff::default();
    let mut refused: Option<Box<dyn Iterator<Item = Duration> + Send>> = None;
    loop {
        let failure = match result {
            Ok(lag) => {
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
            Err(failure) => failure,
        };
        match failure.class() {
            FailureClass::Permanent => {
                settler.permanent(&failure, &history).await;
                return;
            }
            FailureClass::Transient
                if worker
                    .outage
                    .confirms(&worker.resolver, &envelope.tenant_id, &failure)
                    .await =>
            {
                if !worker
                    .outage
                    .hold(&mut outage, &failure, &gate.shutdown)
                    .await
                {
                    gate.requeue(partition, delivery).await;
                    return;
                }
                result = apply_one(worker, &envelope.tenant_id, &effect).await;
            }
            FailureClass::Transient if failure.is_server_refusal() => {
                let delays = refused
                    .get_or_insert_with(|| Box::new(jittered(REFUSAL_MIN, REFUSAL_MAX).build()));
                let delay = delays.next().unwrap_or(REFUSAL_MAX);
                tracing::info!(error = %failure, retry_in = ?delay, "no connection slot on the server; the message waits");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = gate.shutdown.cancelled() => {
                        gate.requeue(partition, delivery).await;
                        return;
                    }
                }
                result = apply_one(worker, &envelope.tenant_id, &effect).await;
            }
            FailureClass::Transient if failure.marks_slow() => {
                tracing::warn!(error = %failure, "tenant marked slow; its events are set aside until a probe succeeds");
                worker.tenants.mark_slow(&envelope.tenant_id);
                let wait = worker.tenants.set_aside_wait(&envelope.tenant_id);
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

/// Applies one event on its own and returns its lag; never settles the message.
async fn apply_one(worker: &Worker, tenant: &TenantId, effect: &Effect) -> Result<f64, Failure> {
    let db = worker.resolver.resolve(tenant).await?;
    let lease = worker.pools.lease(&db).await?;
    let mut conn = lease.connection().await?;
    apply::apply(&mut conn, effect).await?;
    Ok((Utc::now() - effect.key.time.to_utc())
        .as_seconds_f64()
        .max(0.0))
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

    /// A batch's task that panics or is aborted still reports its tenant settled, so the
    /// batch gathered behind it is not left waiting.
    #[tokio::test]
    async fn a_batch_in_flight_settles_however_its_task_ends() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mark = |t: &str| InFlight {
            tenant: Some(TenantId::parse(t).expect("valid tenant id")),
            settled: tx.clone(),
        };
        let mut tasks = JoinSet::new();
        let panics = mark("panics");
        tasks.spawn(async move {
            let _in_flight = panics;
            panic!("a bug while applying");
        });
        let hangs = mark("hangs");
        tasks.spawn(async move {
            let _in_flight = hangs;
            std::future::pending::<()>().await;
        });
        assert!(tasks.join_next().await.expect("a task").is_err());
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        let mut settled = vec![
            rx.recv().await.expect("settled").to_string(),
            rx.recv().await.expect("settled").to_string(),
        ];
        settled.sort();
        assert_eq!(settled, ["hangs", "panics"]);
    }
}
