//! The scheduler: which received events are applied when, and together with which. Each
//! delivery's fate is decided once ([`crate::consume::fate`]); events are gathered per tenant
//! into batches ([`crate::consume::batch`]; a cold tenant lingers longer so one session serves
//! more of them), and a tenant holds a bounded share of its partition
//! ([`crate::execute::standing`]). A tenant has one batch in flight at a time: what arrives
//! while it waits for a session or is applied joins the next one, which goes when it settles
//! ([`InFlight`]). Each batch is handed to the executor ([`crate::execute`]) in a task of its
//! own; the scheduler keeps the clock of lingering batches itself ([`Scheduler::tick`]), and
//! hands out no more at once than the connection budget can serve (`room`): the rest wait in
//! the batcher, where the largest goes first when a place frees.

use crate::consume::batch::{Batch, Batcher, Limits};
use crate::consume::fate::{Fate, Unapplied};
use crate::execute::standing::Admitted;
use crate::execute::{Applying, Pending};
use crate::failure::Failure;
use crate::metrics::SetAsideReason;
use crate::retry::History;
use crate::settle::{Message, Origin, Settling};
use avsync_shared::event::PackedEffect;
use avsync_shared::TenantId;
use lapin::message::Delivery;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::task::JoinSet;
use tracing::Instrument;

/// A tenant's events are applied together, up to this many in one statement: larger batches
/// gain little once a commit's cost is shared by a few hundred rows.
const MAX_BATCH: usize = 250;
/// Longest an event waits for others of its tenant while its partition's consumer holds a
/// backlog (half its prefetch or more): they are in the queue already, and one session opened
/// for many of them costs the server far less than one for each few.
const BACKLOG_LINGER: Duration = Duration::from_secs(2);
/// How long past its linger a batch may be passed over for larger ones, while the budget
/// serves no more at once: in a backlog the largest go first, but a small tenant's events are
/// not left behind for as long as others are busier.
const OVERDUE: Duration = Duration::from_secs(10);
/// Longest an event waits for others of its tenant: a few milliseconds add little to the lag and
/// let busy tenants fill their batches.
const LINGER: Duration = Duration::from_millis(5);
/// The same for a cold tenant (see `standing::WARM`), whose batch likely opens a session: one
/// open then serves more of its events.
const COLD_LINGER: Duration = Duration::from_millis(250);

/// The broker's limit on one consumer's unacknowledged deliveries (an AMQP short).
const MAX_PER_CONSUMER: u32 = u16::MAX as u32;

/// One partition queue's share of AVSYNC_PREFETCH: quorum queues have no channel-wide prefetch.
pub fn per_queue_prefetch(prefetch: u32, partitions: u16) -> u16 {
    let share = (prefetch / u32::from(partitions.max(1))).clamp(1, MAX_PER_CONSUMER);
    u16::try_from(share).unwrap_or(u16::MAX)
}

/// The prefetch window of a worker: every partition queue's share of AVSYNC_PREFETCH.
pub fn window_size(prefetch: u32, partitions: u16) -> usize {
    usize::from(per_queue_prefetch(prefetch, partitions)) * usize::from(partitions)
}

/// Whether a partition whose consumer holds `to_apply` messages waiting to be applied, of a
/// prefetch of `per_queue`, is in a backlog, where batches linger for company. It is per
/// partition and counts what waits to be applied: a burst in one partition, or a stuck tenant's
/// burst on its way to a tier, leaves lingers short. A window too small to hold more than one
/// full batch is never a backlog: lingering could not gather more, and every lone event of a
/// quiet partition would wait the long linger.
fn is_backlog(to_apply: usize, per_queue: usize) -> bool {
    to_apply * 2 >= per_queue && to_apply > MAX_BATCH
}

/// The most unsettled messages a stalled tenant holds: `AVSYNC_TENANT_MAX_UNSETTLED`, but never
/// more than half its partition's prefetch, so its neighbours always have room.
pub fn tenant_bound(max_unsettled: u32, prefetch: u32, partitions: u16) -> usize {
    let half = usize::from(per_queue_prefetch(prefetch, partitions) / 2).max(1);
    usize::try_from(max_unsettled)
        .unwrap_or(usize::MAX)
        .min(half)
}

/// One session's scheduling: the batches waiting per tenant, and the tasks applying and
/// settling what was received.
pub struct Scheduler {
    applying: Arc<Applying>,
    settling: Arc<Settling>,
    /// When set, the only application whose events apply.
    application_id: Option<String>,
    /// A partition's whole prefetch: a consumer holding this many receives nothing more.
    per_queue: usize,
    /// AVSYNC_PREFETCH_BYTES: what the window's messages may weigh.
    window_bytes: usize,
    /// Shared with the executors, which take what gathers behind their batch
    /// ([`Batcher::take_behind`]); locked only for a push or a take, never across an await.
    batcher: Arc<Mutex<Batcher<Pending>>>,
    /// Where each batch's [`InFlight`] mark reports that its task has ended.
    settled_tx: mpsc::UnboundedSender<TenantId>,
    settled_rx: mpsc::UnboundedReceiver<TenantId>,
    /// Tenants whose batch in flight has settled, taken from `settled_rx` by [`Scheduler::tick`].
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

impl Scheduler {
    pub fn new(
        applying: Arc<Applying>,
        settling: Arc<Settling>,
        application_id: Option<String>,
        per_queue: usize,
        window_bytes: usize,
    ) -> Self {
        let (settled_tx, settled_rx) = mpsc::unbounded_channel();
        Self {
            applying,
            settling,
            application_id,
            per_queue,
            window_bytes,
            batcher: Arc::new(Mutex::new(Batcher::new(Limits {
                max_events: MAX_BATCH,
                linger: LINGER,
                cold_linger: COLD_LINGER,
                backlog_linger: BACKLOG_LINGER,
                overdue: OVERDUE,
            }))),
            settled_tx,
            settled_rx,
            settled: Vec::new(),
            tasks: JoinSet::new(),
        }
    }

    /// Waits until a waiting batch may go (its linger has ended, or a batch of its tenant in
    /// flight has settled) and sends it. Cancel-safe: a settled tenant taken before the end
    /// is kept for the next call.
    pub async fn tick(&mut self) {
        let room = self.room();
        let deadline = self.batcher().next_deadline(room);
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
        self.flush_settled();
        let room = self.room();
        let due = self.batcher().due(tokio::time::Instant::now(), room);
        self.flush(due);
    }

    /// How many more batches may go to the executors now: what the connection budget can serve
    /// at once, and a quarter more so that a session coming free finds a batch waiting for it.
    fn room(&self) -> usize {
        let budget = self.applying.dbs.budget();
        let bound = budget + budget / 4 + 1;
        bound.saturating_sub(self.batcher().running())
    }

    /// Applies the batches that gathered behind a batch that has settled.
    fn flush_settled(&mut self) {
        while let Ok(tenant) = self.settled_rx.try_recv() {
            self.settled.push(tenant);
        }
        let mut ready = Vec::new();
        let settled = std::mem::take(&mut self.settled);
        let mut batcher = self.batcher();
        for tenant in settled {
            ready.extend(batcher.settled(&tenant));
        }
        drop(batcher);
        self.flush(ready);
    }

    /// Takes a received message (and its place in the prefetch, `permit`): decides its fate
    /// once, then batches it, sets it aside or settles it on its own.
    pub fn receive(&mut self, origin: Origin, delivery: Delivery, permit: OwnedSemaphorePermit) {
        // A batch behind one that settled goes before this event can join it.
        self.flush_settled();
        let history = History::of(&delivery);
        let poison = self.settling.retry.is_poison(&history);
        let fate = Fate::decide(poison, &delivery.data, self.application_id.as_deref());
        let message = Message::new(
            &self.settling,
            origin,
            delivery,
            history,
            fate.envelope(),
            fate.label(),
            permit,
        );
        match fate {
            Fate::Apply(envelope, effect) => {
                let tenant = envelope.tenant_id;
                let calm = self.applying.outage.calm();
                let admitted = if self.window_too_heavy_for(message.weight()) {
                    Admitted::SetAside {
                        reason: SetAsideReason::WindowFull,
                        wait: Duration::ZERO,
                    }
                } else {
                    self.applying.standings.admit(&tenant, calm)
                };
                match admitted {
                    Admitted::Hold(held) => {
                        let mut message = message;
                        message.weigh_in();
                        self.batch(
                            tenant,
                            origin.partition,
                            Pending {
                                message,
                                effect: PackedEffect::pack(&effect),
                                held,
                            },
                        );
                    }
                    Admitted::SetAside { reason, wait } => {
                        self.tasks
                            .spawn(async move { message.set_aside(&tenant, reason, wait).await });
                    }
                }
            }
            Fate::Unapplied(unapplied) => {
                self.tasks.spawn(settle_unapplied(message, unapplied));
            }
        }
        while self.tasks.try_join_next().is_some() {}
    }

    /// A message of `weight` would take the window beyond its bound in bytes. Into an empty
    /// window a message always goes, however large, so that each is applied in the end.
    fn window_too_heavy_for(&self, weight: usize) -> bool {
        let held = self.settling.gate.bytes();
        held > 0 && held.saturating_add(weight) > self.window_bytes
    }

    fn batch(&mut self, tenant: TenantId, partition: u16, pending: Pending) {
        let stalled = self.settling.gate.holds(partition) >= self.per_queue;
        let cold = self.applying.standings.is_cold(&tenant);
        let now = tokio::time::Instant::now();
        let backlog = is_backlog(self.settling.gate.to_apply(partition), self.per_queue);
        let mut batcher = self.batcher();
        batcher.set_backlog(backlog);
        let full = batcher.push(&tenant, partition, pending, now, stalled, cold);
        drop(batcher);
        if let Some(batch) = full {
            self.flush(vec![batch]);
        }
    }

    /// Applies every waiting batch at once and finishes what is in flight, waiting at most
    /// `bound`: what is abandoned then is handed back by the broker.
    pub async fn finish(mut self, bound: Duration) {
        let waiting = self.batcher().drain();
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

    fn batcher(&self) -> MutexGuard<'_, Batcher<Pending>> {
        lock(&self.batcher)
    }

    fn flush(&mut self, batches: Vec<Batch<Pending>>) {
        for Batch { tenant, items } in batches {
            let applying = self.applying.clone();
            let in_flight = InFlight {
                tenant: Some(tenant.clone()),
                settled: self.settled_tx.clone(),
            };
            let span = tracing::info_span!("batch", tenant = %tenant, events = items.len());
            let batcher = self.batcher.clone();
            self.tasks.spawn(
                async move {
                    let _in_flight = in_flight;
                    let behind = tenant.clone();
                    let more = move || lock(&batcher).take_behind(&behind);
                    applying.run(tenant, items, &more).await;
                }
                .instrument(span),
            );
        }
    }
}

/// A panic while the batcher was locked cannot leave it half-changed (each change is one map
/// operation), so a poisoned lock is taken as it is.
fn lock(batcher: &Mutex<Batcher<Pending>>) -> MutexGuard<'_, Batcher<Pending>> {
    batcher.lock().unwrap_or_else(|e| e.into_inner())
}

/// Settles a message that applies nothing, as its fate says.
async fn settle_unapplied(message: Message, unapplied: Unapplied) {
    match unapplied {
        Unapplied::Poison(_) => message.poison().await,
        Unapplied::Undecodable(e) => message.permanent(&Failure::from(e)).await,
        Unapplied::Invalid(_, e) => message.permanent(&Failure::from(e)).await,
        Unapplied::Ignored(_) => message.ignored().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_is_split_over_partitions() {
        assert_eq!(per_queue_prefetch(64, 16), 4);
        assert_eq!(per_queue_prefetch(8, 16), 1);
        assert_eq!(per_queue_prefetch(10, 1), 10);
        assert_eq!(per_queue_prefetch(65_536, 16), 4096);
        assert_eq!(per_queue_prefetch(1_000_000, 1), u16::MAX);
    }

    #[test]
    fn a_stalled_tenant_leaves_half_its_partition_to_others() {
        assert_eq!(tenant_bound(64, 4096, 16), 64);
        assert_eq!(tenant_bound(500, 4096, 16), 128);
        assert_eq!(tenant_bound(64, 32, 4), 4);
        assert_eq!(tenant_bound(64, 1, 1), 1);
    }

    #[test]
    fn a_backlog_is_half_a_partitions_prefetch_and_more_than_a_batch() {
        assert!(is_backlog(2048, 4096));
        assert!(!is_backlog(2047, 4096));
        // AVSYNC_PREFETCH=32 over 16 partitions: a lone event never waits the long linger.
        assert!(!is_backlog(1, 2));
        assert!(!is_backlog(2, 2));
        assert!(!is_backlog(MAX_BATCH, MAX_BATCH));
        assert!(is_backlog(MAX_BATCH + 1, MAX_BATCH + 1));
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
