//! The connection budget: how many sessions this worker may hold to one PostgreSQL server
//! (host:port), across all its tenant databases (`AVSYNC_MAX_CONNECTIONS`).
//!
//! A server that refuses a connection for lack of slots (too many clients, the reserved slots, a
//! role's connection limit, or not accepting connections now) lowers its budget to what this
//! worker holds there, and the budget grows back by one every [`GROW_EVERY`] without a refusal.
//! A session's slot comes back [`CLOSE_GRACE`] after it is closed: the server counts a backend
//! against `max_connections` until it has exited, which takes a moment after the client goes.

use prometheus::{IntGauge, IntGaugeVec};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::futures::Notified;
use tokio::sync::{Notify, Semaphore, SemaphorePermit};

/// A lowered budget regains one connection this long after the last refusal, and one more every
/// such interval after that.
pub const GROW_EVERY: Duration = Duration::from_secs(2);
/// How long a closed session's slot stays taken.
pub const CLOSE_GRACE: Duration = Duration::from_millis(25);

/// The pure arithmetic of one server's budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    max: usize,
    open: usize,
    lowered: Option<(usize, Instant)>,
}

impl Limit {
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            open: 0,
            lowered: None,
        }
    }

    /// The budget at `now`: the maximum, or the lowered value plus what it has grown back.
    pub fn at(&self, now: Instant) -> usize {
        match self.lowered {
            None => self.max,
            Some((lowered, since)) => {
                let grown = now.saturating_duration_since(since).as_millis()
                    / GROW_EVERY.as_millis().max(1);
                let grown = usize::try_from(grown).unwrap_or(usize::MAX);
                lowered.saturating_add(grown).min(self.max)
            }
        }
    }

    /// Takes a slot when the budget at `now` has room.
    pub fn take(&mut self, now: Instant) -> bool {
        if self.lowered.is_some() && self.at(now) >= self.max {
            self.lowered = None;
        }
        if self.open < self.at(now) {
            self.open += 1;
            true
        } else {
            false
        }
    }

    pub fn give_back(&mut self) {
        self.open = self.open.saturating_sub(1);
    }

    /// The server refused a connection: the budget becomes what is open now (at least one, so
    /// that something keeps trying).
    pub fn refused(&mut self, now: Instant) {
        self.lowered = Some((self.open.max(1), now));
    }

    pub fn open(&self) -> usize {
        self.open
    }
}

/// One server's budget, shared by every tenant pool on that server. Sessions waiting for room
/// are served first come, first served.
pub struct ServerBudget {
    server: String,
    limit: Mutex<Limit>,
    freed: Notify,
    /// One waiter at a time tries for a slot; the others queue here in order.
    turnstile: Semaphore,
    waiting: AtomicUsize,
    open_gauge: IntGauge,
    budget_gauge: IntGauge,
}

impl ServerBudget {
    /// `host:port`, as the `server` label shows it.
    pub fn server(&self) -> &str {
        &self.server
    }

    fn with_limit<T>(&self, f: impl FnOnce(&mut Limit) -> T) -> T {
        let mut limit = self.limit.lock().unwrap_or_else(|e| e.into_inner());
        let out = f(&mut limit);
        self.open_gauge
            .set(i64::try_from(limit.open()).unwrap_or(i64::MAX));
        self.budget_gauge
            .set(i64::try_from(limit.at(Instant::now())).unwrap_or(i64::MAX));
        out
    }

    /// A slot for one new session, if the budget has room now.
    pub fn try_take(self: &Arc<Self>) -> Option<Slot> {
        self.with_limit(|l| l.take(Instant::now())).then(|| Slot {
            budget: Some(self.clone()),
        })
    }

    /// Whether sessions wait for room now.
    pub fn contended(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }

    /// A place at the head of the line of sessions waiting for room: while it is held, nobody
    /// else takes a slot ahead of it.
    pub async fn wait_in_line(&self) -> InLine<'_> {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let mut line = InLine {
            budget: self,
            _turn: None,
        };
        line._turn = self.turnstile.acquire().await.ok();
        line
    }

    /// Resolves when a slot may have come free; take it before trying, to miss no wake-up.
    pub fn freed(&self) -> Notified<'_> {
        self.freed.notified()
    }

    /// The attempt that held `slot` was refused: no session was made, so the slot comes back
    /// at once, and the budget is lowered to what is open without it.
    pub fn refused(&self, mut slot: Slot) {
        slot.budget = None;
        self.with_limit(|l| {
            l.give_back();
            l.refused(Instant::now());
        });
        self.freed.notify_waiters();
    }

    fn give_back(&self) {
        self.with_limit(Limit::give_back);
        self.freed.notify_waiters();
    }
}

/// A waiter's place in line; leaving it (with a slot or not) lets the next one try.
pub struct InLine<'a> {
    budget: &'a ServerBudget,
    _turn: Option<SemaphorePermit<'a>>,
}

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.budget.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One session's place in its server's budget; given back (after [`CLOSE_GRACE`]) when dropped.
pub struct Slot {
    budget: Option<Arc<ServerBudget>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let Some(budget) = self.budget.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    tokio::time::sleep(CLOSE_GRACE).await;
                    budget.give_back();
                });
            }
            Err(_) => budget.give_back(),
        }
    }
}

/// Every server's budget, created on first use.
#[derive(Clone)]
pub struct Budgets {
    max: usize,
    servers: Arc<Mutex<HashMap<String, Arc<ServerBudget>>>>,
    open: IntGaugeVec,
    budget: IntGaugeVec,
}

impl Budgets {
    /// `open` and `budget` are the `avsync_worker_connections{server}` and
    /// `avsync_worker_connection_budget{server}` gauges.
    pub fn new(max: usize, open: IntGaugeVec, budget: IntGaugeVec) -> Self {
        Self {
            max: max.max(1),
            servers: Arc::new(Mutex::new(HashMap::new())),
            open,
            budget,
        }
    }

    pub fn server(&self, server: &str) -> Arc<ServerBudget> {
        let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        servers
            .entry(server.to_owned())
            .or_insert_with(|| {
                let budget_gauge = self.budget.with_label_values(&[server]);
                budget_gauge.set(i64::try_from(self.max).unwrap_or(i64::MAX));
                Arc::new(ServerBudget {
                    server: server.to_owned(),
                    limit: Mutex::new(Limit::new(self.max)),
                    freed: Notify::new(),
                    turnstile: Semaphore::new(1),
                    waiting: AtomicUsize::new(0),
                    open_gauge: self.open.with_label_values(&[server]),
                    budget_gauge,
                })
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_budget_bounds_what_is_open() {
        let now = Instant::now();
        let mut l = Limit::new(2);
        assert!(l.take(now));
        assert!(l.take(now));
        assert!(!l.take(now));
        l.give_back();
        assert!(l.take(now));
    }

    #[test]
    fn a_refusal_lowers_the_budget_to_what_is_open_then_it_grows_back() {
        let now = Instant::now();
        let mut l = Limit::new(8);
        for _ in 0..3 {
            assert!(l.take(now));
        }
        l.refused(now);
        assert_eq!(l.at(now), 3);
        assert!(!l.take(now));
        assert_eq!(l.at(now + GROW_EVERY), 4);
        assert!(l.take(now + GROW_EVERY));
        assert_eq!(l.at(now + GROW_EVERY * 100), 8);
    }

    #[test]
    fn a_refusal_with_nothing_open_keeps_one_slot() {
        let now = Instant::now();
        let mut l = Limit::new(8);
        l.refused(now);
        assert_eq!(l.at(now), 1);
        assert!(l.take(now));
        assert!(!l.take(now));
    }

    proptest! {
        /// Whatever happens, what is open never exceeds the budget in force when it was taken,
        /// nor the maximum.
        #[test]
        fn never_above_the_maximum(steps in proptest::collection::vec((0..3u8, 0..3000u64), 0..200)) {
            let start = Instant::now();
            let mut l = Limit::new(5);
            let mut elapsed = 0;
            for (op, ms) in steps {
                elapsed += ms;
                let now = start + Duration::from_millis(elapsed);
                match op {
                    0 => {
                        if l.take(now) {
                            prop_assert!(l.open() <= l.at(now));
                        }
                    }
                    1 => l.give_back(),
                    _ => l.refused(now),
                }
                prop_assert!(l.open() <= 5);
                prop_assert!(l.at(now) <= 5 && l.at(now) >= 1);
            }
        }
    }
}
