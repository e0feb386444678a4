//! Applying a tenant's events: one executor for a batch and a single event alike. It takes a
//! session through the tenant connection door ([`crate::tenant_db`]), applies the events in one
//! statement, and settles each message; when the attempt fails, the one decision
//! ([`crate::failure::decide`]) says what follows, fed what was seen: whether PostgreSQL is down
//! (`outage`), whether the budget is contended, whether the schema was migrated again. Each
//! tenant's standing in this worker (`standing`) keeps one tenant's trouble its own.

pub(crate) mod outage;
pub(crate) mod standing;

use crate::failure::decide::{decide, Seen, Step};
use crate::failure::Failure;
use crate::metrics::SetAsideReason;
use crate::settle::Message;
use crate::tenant_db::{TenantConnection, TenantDbs};
use avsync_shared::event::{Effect, PackedEffect};
use avsync_shared::TenantId;
use outage::Outage;
use standing::{Held, Standings};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// What applying needs, shared by every task of the worker: the tenant databases, every tenant's
/// standing, and the view of a PostgreSQL outage.
pub(crate) struct Applying {
    pub dbs: Arc<TenantDbs>,
    pub standings: Standings,
    pub outage: Outage,
}

/// One received event waiting to be applied: its message (which settles itself), its effect
/// (packed while it waits, see [`PackedEffect`]), and its place in its tenant's standing (given
/// back when it is settled).
pub(crate) struct Pending {
    pub message: Message,
    pub effect: PackedEffect,
    pub held: Held,
}

/// Why an attempt did not commit.
enum NotCommitted {
    /// The tenant was marked slow while the attempt waited for a connection.
    MarkedSlow,
    Failed(Failure),
}

impl From<Failure> for NotCommitted {
    fn from(failure: Failure) -> Self {
        NotCommitted::Failed(failure)
    }
}

/// Where an executor finds more of its tenant's events once a batch has committed: the batch
/// that gathered behind it, if any.
pub(crate) type More<'a> = &'a (dyn Fn() -> Option<Vec<Pending>> + Send + Sync);

/// Longest one executor keeps its tenant's session for the batches that gather behind the one
/// it applied: long enough to apply what a backlog holds of its tenant on the session it opened
/// (opening one costs more than applying a hundred events), short enough that a tenant with a
/// steady stream gives its session back to the budget's rotation.
const WARM_TURN: Duration = Duration::from_secs(1);

impl Applying {
    /// Applies `events` of `tenant` together and settles every message, whatever happens; then,
    /// on the same session, the batches `more` gives, for at most [`WARM_TURN`].
    pub fn run<'a>(
        &'a self,
        tenant: TenantId,
        events: Vec<Pending>,
        more: More<'a>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let mut warm = self.run_batch(&tenant, events, None).await;
            // The turn counts from the first commit: a batch that waited long for its session
            // has the most gathered behind it.
            let started = Instant::now();
            while let Some(conn) = warm {
                if started.elapsed() >= WARM_TURN {
                    return;
                }
                let Some(events) = more() else { return };
                warm = self.run_batch(&tenant, events, Some(conn)).await;
            }
        })
    }

    /// Applies one batch, on `warm` when given, and settles every message; returns the session
    /// when the batch committed.
    async fn run_batch(
        &self,
        tenant: &TenantId,
        events: Vec<Pending>,
        mut warm: Option<TenantConnection>,
    ) -> Option<TenantConnection> {
        let tenant = tenant.clone();
        let marked = self.standings.marked(&tenant);
        let probe = events.iter().any(|e| e.held.is_probe());
        if !probe && self.standings.is_slow(&tenant) {
            self.set_aside(&tenant, events, SetAsideReason::Slow).await;
            return None;
        }
        let mut remigrated = false;
        let mut held = outage::Backoff::default();
        loop {
            let failure = match self.attempt(&tenant, &events, &marked, warm.take()).await {
                Ok(conn) => {
                    self.applied(&tenant, events).await;
                    return Some(conn);
                }
                Err(NotCommitted::MarkedSlow) => {
                    self.set_aside(&tenant, events, SetAsideReason::Slow).await;
                    return None;
                }
                Err(NotCommitted::Failed(failure)) => failure,
            };
            let seen = self.seen(&tenant, &failure, events.len(), remigrated).await;
            match decide(&failure, seen) {
                Step::Remigrate => remigrated = true,
                Step::HoldForOutage => {
                    if !self
                        .outage
                        .hold(&mut held, &failure, self.dbs.shutdown())
                        .await
                    {
                        settle_each(events, |m, _| m.hand_back()).await;
                        return None;
                    }
                }
                // Only the door waits for a connection; one that gives up while the worker
                // stops hands the work back.
                Step::WaitForSlot | Step::BackOff | Step::HandBack => {
                    settle_each(events, |m, _| m.hand_back()).await;
                    return None;
                }
                Step::MarkSlow => {
                    tracing::warn!(error = %failure, "tenant marked slow; its events are set aside until a probe succeeds");
                    self.mark_slow(&tenant, &failure, events, SetAsideReason::Slow)
                        .await;
                    return None;
                }
                Step::WaitOutServer => {
                    tracing::warn!(error = %failure, "the tenant's PostgreSQL server does not answer; its events are set aside until a probe finds it back");
                    self.mark_slow(&tenant, &failure, events, SetAsideReason::ServerDown)
                        .await;
                    return None;
                }
                Step::Split => {
                    tracing::warn!(error = %failure, "batch failed permanently; applying its events one by one");
                    let alone = events
                        .into_iter()
                        .map(|e| self.run(tenant.clone(), vec![e], &|| None));
                    futures_util::future::join_all(alone).await;
                    return None;
                }
                Step::Retry => {
                    settle_each(events, |m, _| m.retry(&tenant, &failure)).await;
                    return None;
                }
                Step::DeadLetter => {
                    settle_each(events, |m, _| m.permanent(&failure)).await;
                    return None;
                }
            }
        }
    }

    /// What the decision about `failure` of a batch of `events` needs to know.
    async fn seen(
        &self,
        tenant: &TenantId,
        failure: &Failure,
        events: usize,
        remigrated: bool,
    ) -> Seen {
        Seen {
            events,
            reach: self.outage.reach(&self.dbs, tenant, failure).await,
            // The door kept waiting while the budget was contended: what reaches here is the
            // tenant's own pool, busy with nobody else waiting.
            budget_contended: false,
            remigrated,
            stopping: self.dbs.shutdown().is_cancelled(),
        }
    }

    /// One try: a session (`warm`, or one from the door), then the events in one statement.
    /// The wait for a session is given up when the tenant is marked slow meanwhile.
    async fn attempt(
        &self,
        tenant: &TenantId,
        events: &[Pending],
        marked: &Notify,
        warm: Option<TenantConnection>,
    ) -> Result<TenantConnection, NotCommitted> {
        let conn = match warm {
            Some(conn) => conn,
            None => {
                let marked = marked.notified();
                tokio::pin!(marked);
                marked.as_mut().enable();
                tokio::select! {
                    conn = self.dbs.connection(tenant) => conn?,
                    _ = marked.as_mut() => return Err(NotCommitted::MarkedSlow),
                }
            }
        };
        let _statement = self.standings.statement(tenant);
        let effects: Vec<Effect> = events.iter().map(|e| e.effect.unpack()).collect();
        Ok(conn.apply(&effects).await?)
    }

    async fn applied(&self, tenant: &TenantId, events: Vec<Pending>) {
        self.standings.committed(tenant);
        settle_each(events, |m, effect| m.applied(effect.time().to_utc())).await;
    }

    /// Marks the tenant slow for `failure`, so that its new events are set aside too, and sets
    /// these aside.
    async fn mark_slow(
        &self,
        tenant: &TenantId,
        failure: &Failure,
        events: Vec<Pending>,
        reason: SetAsideReason,
    ) {
        self.standings.mark_slow(tenant, failure.to_string());
        self.set_aside(tenant, events, reason).await;
    }

    /// Sets every message aside, to come back after about the time its tenant stays marked slow.
    async fn set_aside(&self, tenant: &TenantId, events: Vec<Pending>, reason: SetAsideReason) {
        let wait = self.standings.set_aside_wait(tenant);
        settle_each(events, |m, _| m.set_aside(tenant, reason, wait)).await;
    }
}

/// Settles every message with `settle`, all at once; each gives its place in its tenant's
/// standing back once it is settled.
async fn settle_each<F, Fut>(events: Vec<Pending>, settle: F)
where
    F: Fn(Message, &PackedEffect) -> Fut,
    Fut: Future<Output = ()>,
{
    let each = events.into_iter().map(
        |Pending {
             message,
             effect,
             held,
         }| {
            let settled = settle(message, &effect);
            async move {
                settled.await;
                drop(held);
            }
        },
    );
    futures_util::future::join_all(each).await;
}
