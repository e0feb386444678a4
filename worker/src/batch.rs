//! Collects applicable events per tenant so that each tenant's events are applied many at a time
//! in one statement: a tenant's batch goes when it is full, when it has waited its linger, or at
//! once when its partition's consumer holds its whole prefetch (the broker sends that partition
//! nothing more until something is settled, so waiting longer would only idle it).
//!
//! Opening a session costs far more than applying an event, so a tenant that is cold (has
//! committed nothing lately, so likely has no open session) lingers longer: one open then
//! serves more of its events.

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
}

struct Pending<T> {
    partition: u16,
    due: Instant,
    items: Vec<T>,
}

/// A tenant's events, ready to apply.
pub struct Batch<T> {
    pub tenant: TenantId,
    pub items: Vec<T>,
}

pub struct Batcher<T> {
    limits: Limits,
    pending: HashMap<TenantId, Pending<T>>,
}

impl<T> Batcher<T> {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            pending: HashMap::new(),
        }
    }

    /// Adds an event of `tenant` (`cold` when it has committed nothing lately). Returns a batch
    /// to apply now: the tenant's when full, or, when `partition_stalled`, the largest one
    /// waiting in that partition.
    pub fn push(
        &mut self,
        tenant: &TenantId,
        partition: u16,
        item: T,
        now: Instant,
        partition_stalled: bool,
        cold: bool,
    ) -> Option<Batch<T>> {
        let linger = if cold {
            self.limits.cold_linger
        } else {
            self.limits.linger
        };
        let pending = match self.pending.get_mut(tenant) {
            Some(pending) => pending,
            None => self.pending.entry(tenant.clone()).or_insert(Pending {
                partition,
                due: now + linger,
                items: Vec::with_capacity(self.limits.max_events.min(64)),
            }),
        };
        pending.items.push(item);
        if pending.items.len() >= self.limits.max_events {
            return self.take(tenant);
        }
        if partition_stalled {
            let largest = self
                .pending
                .iter()
                .filter(|(_, p)| p.partition == partition)
                .max_by_key(|(_, p)| p.items.len())
                .map(|(t, _)| t.clone())?;
            return self.take(&largest);
        }
        None
    }

    fn take(&mut self, tenant: &TenantId) -> Option<Batch<T>> {
        self.pending.remove_entry(tenant).map(|(tenant, p)| Batch {
            tenant,
            items: p.items,
        })
    }

    /// The batches that have waited their linger by `now`.
    pub fn due(&mut self, now: Instant) -> Vec<Batch<T>> {
        let due: Vec<TenantId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(t, _)| t.clone())
            .collect();
        due.iter().filter_map(|t| self.take(t)).collect()
    }

    /// When the next batch's linger ends, if any waits.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.due).min()
    }

    /// Every waiting batch, at once (shutdown, or the session ending).
    pub fn drain(&mut self) -> Vec<Batch<T>> {
        self.pending
            .drain()
            .map(|(tenant, p)| Batch {
                tenant,
                items: p.items,
            })
            .collect()
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
        assert_eq!(b.next_deadline(), Some(now + LIMITS.linger));
        assert!(b.due(now + Duration::from_millis(4)).is_empty());
        let due = b.due(now + LIMITS.linger);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].tenant, tenant(1));
        assert_eq!(
            b.next_deadline(),
            Some(now + Duration::from_millis(3) + LIMITS.linger)
        );
    }

    #[test]
    fn a_cold_tenant_lingers_longer() {
        let mut b = Batcher::new(LIMITS);
        let now = Instant::now();
        b.push(&tenant(1), 0, 1, now, false, true);
        b.push(&tenant(2), 0, 2, now, false, false);
        let due = b.due(now + LIMITS.linger);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].tenant, tenant(2));
        assert_eq!(b.next_deadline(), Some(now + LIMITS.cold_linger));
        // More events of the cold tenant join its batch until it is due or full.
        assert!(b.push(&tenant(1), 0, 3, now, false, true).is_none());
        assert_eq!(b.due(now + LIMITS.cold_linger)[0].items, vec![1, 3]);
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

    proptest! {
        /// Nothing is lost or duplicated, each batch holds one tenant's events in arrival order,
        /// and none exceeds the limit.
        #[test]
        fn every_event_leaves_exactly_once(events in proptest::collection::vec((0..4u32, any::<bool>(), 0..8u64), 0..200)) {
            let mut b = Batcher::new(LIMITS);
            let start = Instant::now();
            let mut out: Vec<Batch<(u32, usize)>> = Vec::new();
            for (i, (t, stalled, ms)) in events.iter().enumerate() {
                let now = start + Duration::from_millis(*ms + i as u64);
                out.extend(b.push(&tenant(*t), (*t % 2) as u16, (*t, i), now, *stalled, *t == 3));
                out.extend(b.due(now));
            }
            out.extend(b.drain());
            prop_assert!(b.is_empty());
            let mut seen = Vec::new();
            for batch in &out {
                prop_assert!(!batch.items.is_empty() && batch.items.len() <= LIMITS.max_events);
                prop_assert!(batch.items.iter().all(|(t, _)| tenant(*t) == batch.tenant));
                prop_assert!(batch.items.windows(2).all(|w| w[0].1 < w[1].1));
                seen.extend(batch.items.iter().map(|(_, i)| *i));
            }
            seen.sort_unstable();
            prop_assert_eq!(seen, (0..events.len()).collect::<Vec<_>>());
        }
    }
}
