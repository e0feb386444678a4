//! Collects applicable events per tenant so that each tenant's events are applied many at a time
//! in one statement: a tenant's batch goes when it is full, when it has waited its linger, or at
//! once when its partition's consumer holds its whole prefetch (the broker sends that partition
//! nothing more until something is settled, so waiting longer would only idle it).
//!
//! Opening a session costs far more than applying an event, so a tenant that is cold (has
//! committed nothing lately, so likely has no open session) lingers longer: one open then
//! serves more of its events.
//!
//! **The largest go first.** The batches that have lingered go to the executors only while
//! fewer than the connection budget can serve are in flight (`room`), largest first: the rest
//! keep gathering their tenants' events here, where the next free session goes to the batch
//! that shares its open among the most events, instead of queueing for a session in the order
//! they lingered out. A batch that has waited [`Limits::overdue`] past its linger goes before
//! any larger one, so a small tenant is not passed over for as long as others are busier.
//!
//! **One batch in flight per tenant.** While a tenant's batch waits for a session or is being
//! applied, the tenant's new events gather in its next batch instead of starting another one,
//! which would only queue behind the first for a session of its own; neither its linger nor a
//! stalled partition sends that batch. It goes the moment the batch in flight settles, on the
//! session that batch leaves warm. Only a full batch goes beside one in flight, as it cannot
//! grow any more.

use avsync_shared::TenantId;
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// When a tenant's batch is applied.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most events in one batch.
    pub max_events: usize,
    /// Longest an event waits for others of its tenant.
    pub linger: Duration,
    /// The same, for a cold tenant.
    pub cold_linger: Duration,
    /// The same, for any tenant while the worker works through a backlog: a batch then waits
    /// for more of its tenant's events, which are coming, rather than take a session for a few
    /// (in a backlog of many tenants a session that committed lately is likely closed by now,
    /// to make room for others). A busy tenant's batch fills up and goes long before.
    pub backlog_linger: Duration,
    /// How long past its linger a batch may be passed over for larger ones.
    pub overdue: Duration,
}

struct Pending<T> {
    partition: u16,
    due: Instant,
    /// Gathered behind a batch of its tenant in flight: it goes when that one settles, not at
    /// its linger. A batch is taken out whenever its tenant's batch goes, so this never changes.
    behind: bool,
    items: Vec<T>,
}

/// A tenant's events, ready to apply.
pub struct Batch<T> {
    pub tenant: TenantId,
    pub items: Vec<T>,
}

/// A tenant's batches in flight.
struct InFlight {
    batches: usize,
    partition: u16,
}

pub struct Batcher<T> {
    limits: Limits,
    pending: HashMap<TenantId, Pending<T>>,
    /// The tenants with batches handed out and not yet [`Batcher::settled`], and how many each
    /// has (more than one only when full batches went beside the first).
    in_flight: HashMap<TenantId, InFlight>,
    /// How many batches each partition has in flight.
    partition_in_flight: HashMap<u16, usize>,
    /// The worker holds a backlog: batches linger for [`Limits::backlog_linger`].
    backlog: bool,
}

impl<T> Batcher<T> {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            pending: HashMap::new(),
            in_flight: HashMap::new(),
            partition_in_flight: HashMap::new(),
            backlog: false,
        }
    }

    /// Whether the worker holds a backlog now; read by the batches that start after.
    pub fn set_backlog(&mut self, backlog: bool) {
        self.backlog = backlog;
    }

    /// Adds an event of `tenant` (`cold` when it has committed nothing lately). Returns a batch
    /// to apply now: the tenant's when full, or, when `partition_stalled` with none of its
    /// batches in flight (whose settling would let the broker send more), the largest one
    /// waiting in that partition. Every batch handed out counts as in flight until it is
    /// [`Batcher::settled`].
    pub fn push(
        &mut self,
        tenant: &TenantId,
        partition: u16,
        item: T,
        now: Instant,
        partition_stalled: bool,
        cold: bool,
    ) -> Option<Batch<T>> {
        let linger = if self.backlog {
            self.limits.backlog_linger
        } else if cold {
            self.limits.cold_linger
        } else {
            self.limits.linger
        };
        let pending = match self.pending.get_mut(tenant) {
            Some(pending) => pending,
            None => {
                let behind = self.in_flight.contains_key(tenant);
                self.pending.entry(tenant.clone()).or_insert(Pending {
                    partition,
                    due: now + linger,
                    behind,
                    items: Vec::with_capacity(self.limits.max_events.min(64)),
                })
            }
        };
        pending.items.push(item);
        if pending.items.len() >= self.limits.max_events {
            return self.take(tenant);
        }
        let idle = self
            .partition_in_flight
            .get(&partition)
            .is_none_or(|n| *n == 0);
        if partition_stalled && idle {
            let largest = self
                .pending
                .iter()
                .filter(|(_, p)| p.partition == partition && !p.behind)
                .max_by_key(|(_, p)| p.items.len())
                .map(|(t, _)| t.clone())?;
            return self.take(&largest);
        }
        None
    }

    /// Hands out `tenant`'s waiting batch, counting it in flight.
    fn take(&mut self, tenant: &TenantId) -> Option<Batch<T>> {
        let (tenant, p) = self.pending.remove_entry(tenant)?;
        self.in_flight
            .entry(tenant.clone())
            .or_insert(InFlight {
                batches: 0,
                partition: p.partition,
            })
            .batches += 1;
        *self.partition_in_flight.entry(p.partition).or_insert(0) += 1;
        Some(Batch {
            tenant,
            items: p.items,
        })
    }

    /// A batch of `tenant` handed out earlier has settled. When it was the tenant's last one in
    /// flight, returns the batch that gathered meanwhile, to apply at once.
    pub fn settled(&mut self, tenant: &TenantId) -> Option<Batch<T>> {
        let flight = self.in_flight.get_mut(tenant)?;
        if let Some(n) = self.partition_in_flight.get_mut(&flight.partition) {
            *n = n.saturating_sub(1);
        }
        if flight.batches > 1 {
            flight.batches -= 1;
            return None;
        }
        self.in_flight.remove(tenant);
        self.take(tenant)
    }

    /// The batch that gathered behind `tenant`'s batch in flight, for the executor of that batch
    /// to apply on the session it holds. The tenant stays in flight: its executor goes on.
    pub fn take_behind(&mut self, tenant: &TenantId) -> Option<Vec<T>> {
        if !self.pending.get(tenant).is_some_and(|p| p.behind) {
            return None;
        }
        self.pending.remove(tenant).map(|p| p.items)
    }

    /// How many batches are in flight.
    pub fn running(&self) -> usize {
        self.partition_in_flight.values().sum()
    }

    /// Up to `room` of the batches that have waited their linger by `now`, of tenants with none
    /// in flight: those overdue first, oldest first, then the largest, which share an open
    /// among the most events.
    pub fn due(&mut self, now: Instant, room: usize) -> Vec<Batch<T>> {
        let overdue = self.limits.overdue;
        let mut due: Vec<(Option<Instant>, usize, TenantId)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.due <= now && !p.behind)
            .map(|(t, p)| {
                let late = (p.due + overdue <= now).then_some(p.due);
                (late, p.items.len(), t.clone())
            })
            .collect();
        due.sort_by(
            |(a_late, a_len, _), (b_late, b_len, _)| match (a_late, b_late) {
                (Some(a), Some(b)) => a.cmp(b),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => b_len.cmp(a_len),
            },
        );
        due.iter()
            .take(room)
            .filter_map(|(_, _, t)| self.take(t))
            .collect()
    }

    /// When the next batch's linger ends, if one waits whose tenant has none in flight (the
    /// others go when theirs settles) and there is `room` for it (without room, the next
    /// batch goes when one in flight settles).
    pub fn next_deadline(&self, room: usize) -> Option<Instant> {
        if room == 0 {
            return None;
        }
        self.pending
            .values()
            .filter(|p| !p.behind)
            .map(|p| p.due)
            .min()
    }

    /// Every waiting batch, at once, in flight or not (shutdown, or the session ending).
    pub fn drain(&mut self) -> Vec<Batch<T>> {
        let tenants: Vec<TenantId> = self.pending.keys().cloned().collect();
        tenants.iter().filter_map(|t| self.take(t)).collect()
    }

    /// Nothing is pending: what the property tests check after a final flush.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tenant(i: u32) -> TenantId {
        TenantId::parse(&format!("t{i}")).expect("valid tenant id")
    }

    const LIMITS: Limits = Limits {
        max_events: 3,
        linger: Duration::from_millis(5),
        cold_linger: Duration::from_millis(50),
        backlog_linger: Duration::from_millis(500),
        overdue: Duration::from_millis(1000),
    };

    #[test]
    fn a_full_batch_goes_at_once_and_holds_only_its_tenant() {
        let mut b = Batcher::new(LIMITS);
        let now = Instant::now();
        assert!(b.push(&tenant(1), 0, 1, now, false, false).is_none());
        assert!(b.push(&tenant(2), 0, 2, now, false, false).is_none());
        assert!(b.push(&tenant(1), 0, 3, now, false, false).is_none());
        let full = b.push(&tenant(1), 0, 4, now, false, false).expect("full");
        assert_eq!(full.tenant, tenant(1));
        assert_eq!(full.items, vec![1, 3, 4]);
        assert_eq!(b.drain().len(), 1);
    }

    #[test]
    fn due_batches_go_largest_first() {
        let mut b = Batcher::new(LIMITS);
        let now = Instant::now();
        b.push(&tenant(1), 0, 1, now, false, false);
        for i in 0..2 {
            b.push(&tenant(2), 0, i, now, false, false);
        }
        b.push(&tenant(3), 1, 7, now, false, false);
        b.push(&tenant(3), 1, 8, now, false, false);
        b.push(&tenant(4), 1, 9, now, false, false);
        let sizes: Vec<usize> = b
            .due(now + LIMITS.linger, usize::MAX)
            .iter()
            .map(|batch| batch.items.len())
            .collect();
        assert_eq!(sizes, [2, 2, 1, 1]);
    }

    /// With room for fewer than are due, the largest go and the others keep gathering; one
    /// passed over past [`Limits::overdue`] goes before any larger one; with no room, nothing
    /// goes and no deadline wakes the scheduler (a batch settling does).
    #[test]
    fn without_room_for_all_the_largest_go_and_an_overdue_one_first() {
        let mut b = Batcher::new(LIMITS);
        let now = Instant::now();
        b.push(&tenant(1), 0, 1, now, false, false);
        for i in 0..2 {
            b.push(&tenant(2), 0, i, now, false, false);
        }
        let ready = now + LIMITS.linger;
        let first = b.due(ready, 1);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].tenant, tenant(2));
        assert_eq!(b.running(), 1);
        assert_eq!(b.next_deadline(0), None);
        assert!(b.due(ready, 0).is_empty());
        for i in 0..2 {
            b.push(&tenant(3), 1, i, ready, false, false);
        }
        assert!(b.settled(&tenant(2)).is_none());
        let late = ready + LIMITS.overdue;
        let next: Vec<TenantId> = b.due(late, 1).into_iter().map(|b| b.tenant).collect();
        assert_eq!(
            next,
            [tenant(1)],
            "tenant 1 waited past overdue, tenant 3 did not"
        );
        assert_eq!(b.due(late, 1)[0].tenant, tenant(3));
    }

    #[test]
    fn a_batch_waits_for_company_in_a_backlog_only() {
        let mut b = Batcher::new(LIMITS);
        let now = Instant::now();
        b.set_backlog(true);
        b.push(&tenant(1), 0, 1, now, false, true);
        b.push(&tenant(2), 0, 2, now, false, false);
        assert!(b.due(now + LIMITS.cold_linger, usize::MAX).is_empty());
        assert_eq!(
            b.next_deadline(usize::MAX),
            Some(now + LIMITS.backlog_linger)
        );
        assert_eq!(b.due(now + LIMITS.backlog_linger, usize::MAX).len(), 2);
        b.push(&tenant(4), 0, 4, now, false, false);
        b.set_backlog(false);
        b.push(&tenant(3), 0, 3, now, false, true);
        assert_eq!(
            b.due(now + LIMITS.cold_linger, usize::MAX)[0].tenant,
            tenant(3)
        );
        assert_eq!(
            b.due(now + LIMITS.backlog_linger, usize::MAX)[0].tenant,
            tenant(4)
        );
    }

    #[test]
    fn what_gathers_behind_a_batch_goes_to_its_executor() {
        let mut b = Batcher::new(LIMITS);
        let now = Instant::now();
        b.push(&tenant(1), 0, 1, now, false, false);
        assert!(b.take_behind(&tenant(1)).is_none(), "not behind anything");
        let _first = b.due(now + LIMITS.linger, usize::MAX).pop().expect("due");
        b.push(&tenant(1), 0, 2, now, false, false);
        b.push(&tenant(1), 0, 3, now, false, false);
        assert_eq!(b.take_behind(&tenant(1)), Some(vec![2, 3]));
        assert!(b.take_behind(&tenant(1)).is_none());
        b.push(&tenant(1), 0, 4, now, false, false);
        let next = b
            .settled(&tenant(1))
            .expect("the rest goes when its executor ends");
        assert_eq!(next.items, vec![4]);
    }

    #[test]
    fn a_batch_goes_after_its_linger() {
        let mut b = Batcher::new(LIMITS);
        let now = Instant::now();
        b.push(&tenant(1), 0, 1, now, false, false);
        b.push(
            &tenant(2),
            0,
            2,
            now + Duration::from_millis(3),
            false,
            false,
        );
        assert_eq!(b.next_deadline(usize::MAX), Some(now + LIMITS.linger));
        assert!(b.due(now + Duration::from_millis(4), usize::MAX).is_empty());
        let due = b.due(now + LIMITS.linger, usize::MAX);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].tenant, tenant(1));
        assert_eq!(
            b.next_deadline(usize::MAX),
            Some(now + Duration::from_millis(3) + LIMITS.linger)
        );
    }

    #[test]
    fn a_cold_tenant_lingers_longer() {
        let mut b = Batcher::new(LIMITS);
        let now = Instant::now();
        b.push(&tenant(1), 0, 1, now, false, true);
        b.push(&tenant(2), 0, 2, now, false, false);
        let due = b.due(now + LIMITS.linger, usize::MAX);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].tenant, tenant(2));
        assert_eq!(b.next_deadline(usize::MAX), Some(now + LIMITS.cold_linger));
        // More events of the cold tenant join its batch until it is due or full.
        assert!(b.push(&tenant(1), 0, 3, now, false, true).is_none());
        assert_eq!(
            b.due(now + LIMITS.cold_linger, usize::MAX)[0].items,
            vec![1, 3]
        );
    }

    #[test]
    fn a_stalled_partition_sends_its_largest_batch() {
        let mut b = Batcher::new(LIMITS);
        let now = Instant::now();
        b.push(&tenant(1), 0, 1, now, false, false);
        b.push(&tenant(1), 0, 2, now, false, false);
        b.push(&tenant(3), 1, 9, now, false, false);
        b.push(&tenant(3), 1, 8, now, false, false);
        let batch = b.push(&tenant(2), 0, 3, now, true, false).expect("stalled");
        assert_eq!(batch.tenant, tenant(1));
        assert_eq!(batch.items, vec![1, 2]);
    }

    #[test]
    fn a_tenant_in_flight_gathers_its_next_batch_until_it_settles() {
        let mut b = Batcher::new(LIMITS);
        let now = Instant::now();
        b.push(&tenant(1), 0, 1, now, false, false);
        let first = b.due(now + LIMITS.linger, usize::MAX).pop().expect("due");
        assert_eq!(first.items, vec![1]);
        // Neither its linger nor a stalled partition sends what arrives meanwhile.
        let later = now + LIMITS.linger;
        assert!(b.push(&tenant(1), 0, 2, later, false, false).is_none());
        assert!(b.push(&tenant(1), 0, 3, later, true, false).is_none());
        assert!(b
            .due(later + LIMITS.cold_linger * 10, usize::MAX)
            .is_empty());
        assert_eq!(b.next_deadline(usize::MAX), None);
        let next = b.settled(&tenant(1)).expect("goes at once");
        assert_eq!(next.items, vec![2, 3]);
        assert!(b.settled(&tenant(1)).is_none());
        assert!(b.is_empty());
        // Settled with nothing in flight (never handed out) changes nothing.
        assert!(b.settled(&tenant(2)).is_none());
    }

    /// Tenant 1 with its first batch (event 1) handed out and events 2 and 3 gathering behind it.
    fn one_in_flight_two_waiting() -> (Batcher<u32>, Instant) {
        let mut b = Batcher::new(LIMITS);
        let now = Instant::now();
        b.push(&tenant(1), 0, 1, now, false, false);
        let _first = b.due(now + LIMITS.linger, usize::MAX).pop().expect("due");
        b.push(&tenant(1), 0, 2, now, false, false);
        b.push(&tenant(1), 0, 3, now, false, false);
        (b, now)
    }

    #[test]
    fn a_stalled_partition_waits_for_its_batches_in_flight() {
        let (mut b, now) = one_in_flight_two_waiting();
        assert!(
            b.push(&tenant(2), 0, 4, now, true, false).is_none(),
            "tenant 1's batch in flight will settle and let the broker send more"
        );
        let batch = b
            .push(&tenant(3), 1, 5, now, true, false)
            .expect("stalled, idle");
        assert_eq!(batch.tenant, tenant(3));
        assert!(b.push(&tenant(1), 0, 6, now, true, false).is_some(), "full");
    }

    #[test]
    fn only_a_full_batch_goes_beside_one_in_flight() {
        let (mut b, now) = one_in_flight_two_waiting();
        let full = b.push(&tenant(1), 0, 4, now, false, false).expect("full");
        assert_eq!(full.items, vec![2, 3, 4]);
        b.push(&tenant(1), 0, 5, now, false, false);
        assert!(
            b.settled(&tenant(1)).is_none(),
            "the full one is still in flight"
        );
        assert_eq!(b.settled(&tenant(1)).expect("last settled").items, vec![5]);
    }

    /// What a scheduler does with the batcher, step by step.
    #[derive(Debug, Clone)]
    enum Step {
        /// An event of tenant `t` arrives `ms` after the previous step.
        Event { t: u32, stalled: bool, ms: u64 },
        /// The `k`-th (modulo) batch in flight settles.
        Settle { k: usize },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0..4u32, any::<bool>(), 0..8u64).prop_map(|(t, stalled, ms)| Step::Event { t, stalled, ms }),
            1 => any::<usize>().prop_map(|k| Step::Settle { k }),
        ]
    }

    /// How many batches the property test lets be in flight at once, as the budget would.
    const ROOM: usize = 2;

    proptest! {
        /// Nothing is lost or duplicated; each batch holds one tenant's events, and a tenant's
        /// batches leave in arrival order; none exceeds the limit; a tenant never has two
        /// batches in flight of which one could still have grown; and once every batch in
        /// flight has settled, nothing waits beyond its linger (no tenant is wedged), though
        /// only [`ROOM`] go at a time.
        #[test]
        fn every_event_leaves_exactly_once(steps in proptest::collection::vec(step(), 0..300)) {
            let mut b = Batcher::new(LIMITS);
            let mut now = Instant::now();
            let mut flying: Vec<Batch<(u32, usize)>> = Vec::new();
            let mut out: Vec<Vec<(u32, usize)>> = Vec::new();
            let mut events = 0;
            let mut hand_out = |flying: &mut Vec<Batch<(u32, usize)>>, batches: Vec<Batch<(u32, usize)>>| {
                for batch in batches {
                    out.push(batch.items.clone());
                    flying.push(batch);
                }
            };
            for step in &steps {
                match step {
                    Step::Event { t, stalled, ms } => {
                        now += Duration::from_millis(*ms);
                        let full = b.push(&tenant(*t), (*t % 2) as u16, (*t, events), now, *stalled, *t == 3);
                        events += 1;
                        hand_out(&mut flying, full.into_iter().collect());
                        let room = ROOM.saturating_sub(b.running());
                        hand_out(&mut flying, b.due(now, room));
                    }
                    Step::Settle { k } if !flying.is_empty() => {
                        let done = flying.remove(k % flying.len());
                        hand_out(&mut flying, b.settled(&done.tenant).into_iter().collect());
                    }
                    Step::Settle { .. } => {}
                }
                for t in 0..4 {
                    let growable = flying
                        .iter()
                        .filter(|f| f.tenant == tenant(t) && f.items.len() < LIMITS.max_events)
                        .count();
                    prop_assert!(growable <= 1, "tenant {} has {} growable batches in flight", t, growable);
                }
            }
            loop {
                while let Some(done) = flying.pop() {
                    hand_out(&mut flying, b.settled(&done.tenant).into_iter().collect());
                }
                prop_assert_eq!(b.running(), 0);
                let last = b.due(now + LIMITS.cold_linger, ROOM);
                if last.is_empty() {
                    break;
                }
                hand_out(&mut flying, last);
            }
            prop_assert!(b.is_empty());
            hand_out(&mut flying, b.drain());
            let mut seen = Vec::new();
            for items in &out {
                prop_assert!(!items.is_empty() && items.len() <= LIMITS.max_events);
                prop_assert!(items.iter().all(|(t, _)| *t == items[0].0));
                seen.extend(items.iter().copied());
            }
            for t in 0..4 {
                let order: Vec<usize> = seen.iter().filter(|(u, _)| *u == t).map(|(_, i)| *i).collect();
                prop_assert!(order.windows(2).all(|w| w[0] < w[1]), "tenant {} out of order: {:?}", t, order);
            }
            let mut all: Vec<usize> = seen.iter().map(|(_, i)| *i).collect();
            all.sort_unstable();
            prop_assert_eq!(all, (0..events).collect::<Vec<_>>());
        }
    }
}
