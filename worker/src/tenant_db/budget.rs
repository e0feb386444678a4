//! The connection budget: how many sessions this worker may hold to one PostgreSQL server
//! (host:port), across all its tenant databases (`AVSYNC_MAX_CONNECTIONS`): pinned, or sized
//! from the server (`auto`, see [`super::sizing`]) at most every [`LOOK_EVERY`], on one of the
//! worker's own sessions. A sized budget holds only while the worker holds sessions there (the
//! other workers see it by them): once it holds none, it is back to one session until it has
//! looked again. A worker over its budget closes its idle sessions, never one in use.
//!
//! A server that refuses a connection for lack of slots (too many clients, the reserved slots, a
//! role's connection limit, or not accepting connections now) lowers its budget to what this
//! worker holds there, and the budget grows back by one every [`GROW_EVERY`] without a refusal.
//! A session's slot comes back [`CLOSE_GRACE`] after it is closed: the server counts a backend
//! against `max_connections` until it has exited, which takes a moment after the client goes.
//!
//! When the budget is full, the tenants waiting for room on a server are served round-robin
//! ([`Rotation`]): one session per turn, so a busy tenant with many batches waiting takes one
//! turn like any other and cannot take the whole budget.

use super::sizing::{self, Sizing};
use prometheus::{IntGauge, IntGaugeVec};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

/// A lowered budget regains one connection this long after the last refusal, and one more every
/// such interval after that.
pub const GROW_EVERY: Duration = Duration::from_secs(2);
/// How long a closed session's slot stays taken.
pub const CLOSE_GRACE: Duration = Duration::from_millis(25);
/// How often an `auto` budget is sized again while the worker holds sessions on the server: often
/// enough that a worker arriving gets its share within seconds, seldom enough that the look (one
/// query on a session the worker holds anyway) costs the server nothing to speak of.
pub const LOOK_EVERY: Duration = Duration::from_secs(1);

/// The pure arithmetic of one server's budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    max: usize,
    open: usize,
    /// Of `open`, sessions closed whose slot has not come back yet.
    closing: usize,
    lowered: Option<(usize, Instant)>,
}

impl Limit {
    pub fn new(max: usize) -> Self {
        Self {
            max: max.max(1),
            open: 0,
            closing: 0,
            lowered: None,
        }
    }

    /// A new maximum (at least one), as the server was found.
    pub fn size(&mut self, max: usize) {
        self.max = max.max(1);
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

    /// A slot whose attempt made no session comes back at once.
    pub fn give_back(&mut self) {
        self.open = self.open.saturating_sub(1);
        self.closing = self.closing.min(self.open);
    }

    /// A session is being closed: its slot comes back with [`Limit::closed`].
    pub fn closing(&mut self) {
        self.closing = (self.closing + 1).min(self.open);
    }

    /// The slot of a session counted with [`Limit::closing`] comes back.
    pub fn closed(&mut self) {
        self.closing = self.closing.saturating_sub(1);
        self.give_back();
    }

    /// Whether more sessions stay open than the budget at `now` allows (after it was sized down).
    pub fn over(&self, now: Instant) -> bool {
        self.open - self.closing > self.at(now)
    }

    /// Counts one session as closing when the budget is over: the caller closes it.
    pub fn shed(&mut self, now: Instant) -> bool {
        let over = self.over(now);
        if over {
            self.closing();
        }
        over
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

/// The order in which the tenants waiting for room in one server's budget are served:
/// round-robin over tenants, one session per turn. A tenant joins the back when its first
/// session starts waiting, and goes to the back again after each turn while it has more waiting.
#[derive(Debug, Default)]
pub struct Rotation {
    order: VecDeque<String>,
    waiting: HashMap<String, usize>,
}

impl Rotation {
    /// One more session of `tenant` waits.
    pub fn join(&mut self, tenant: &str) {
        let n = self.waiting.entry(tenant.to_owned()).or_insert(0);
        if *n == 0 {
            self.order.push_back(tenant.to_owned());
        }
        *n += 1;
    }

    /// Whether the next slot is `tenant`'s.
    pub fn is_turn(&self, tenant: &str) -> bool {
        self.order.front().is_some_and(|t| t == tenant)
    }

    /// `tenant`, whose turn it was, took a slot for one of its sessions.
    pub fn served(&mut self, tenant: &str) {
        if !self.is_turn(tenant) {
            return;
        }
        self.order.pop_front();
        if self.remove_one(tenant) {
            self.order.push_back(tenant.to_owned());
        }
    }

    /// A session of `tenant` stopped waiting without a slot.
    pub fn leave(&mut self, tenant: &str) {
        if !self.remove_one(tenant) {
            self.order.retain(|t| t != tenant);
        }
    }

    /// Counts one session of `tenant` out; true while others of it still wait.
    fn remove_one(&mut self, tenant: &str) -> bool {
        match self.waiting.get_mut(tenant) {
            Some(n) if *n > 1 => {
                *n -= 1;
                true
            }
            _ => {
                self.waiting.remove(tenant);
                false
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// One server's budget, shared by every tenant pool on that server. Sessions waiting for room
/// are served round-robin over their tenants.
pub struct ServerBudget {
    server: String,
    limit: Mutex<Limit>,
    freed: Notify,
    line: Mutex<Rotation>,
    /// Set with `AVSYNC_MAX_CONNECTIONS=auto`.
    auto: Option<Auto>,
    open_gauge: IntGauge,
    budget_gauge: IntGauge,
    reachable_gauge: IntGauge,
}

/// An `auto` budget's sizing on one server.
struct Auto {
    /// `AVSYNC_PG_FREE_CONNECTIONS`, or None for a fifth of the server's `max_connections`.
    free: Option<u32>,
    /// This worker's application name, by which it finds its own sessions.
    me: Arc<str>,
    /// When the budget was last sized; None while it must be before it grows (the worker held
    /// nothing there, or the server refused a session).
    sized_at: Mutex<Option<Instant>>,
    /// A look is running: one at a time.
    looking: AtomicBool,
    /// What the last look saw, None before its first since it came to the server: the workers
    /// it saw are the ones the others size their budgets for within a look (see
    /// [`sizing::share`]).
    seen: Mutex<Option<Looked>>,
    /// Since when it holds no session there.
    gone_since: Mutex<Option<Instant>>,
}

/// One look at a server, and how many looks before it, back to back, saw as many workers.
#[derive(Debug, Clone, Copy)]
struct Looked {
    seen: sizing::Seen,
    steady: u32,
}

impl Auto {
    fn sized_at(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.sized_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Option<Looked>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ServerBudget {
    /// `host:port`, as the `server` label shows it.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Whether the server answers, as a probe or a new session last found it.
    pub fn reachable(&self, answers: bool) {
        self.reachable_gauge.set(i64::from(answers));
    }

    fn with_limit<T>(&self, f: impl FnOnce(&mut Limit) -> T) -> T {
        let mut limit = self.limit.lock().unwrap_or_else(|e| e.into_inner());
        let out = f(&mut limit);
        if let Some(auto) = &self.auto {
            let mut gone = auto.gone_since.lock().unwrap_or_else(|e| e.into_inner());
            if limit.open() == 0 {
                // The other workers no longer see this one here: what it was sized to may be
                // theirs by now.
                limit.size(1);
                *auto.sized_at() = None;
                gone.get_or_insert_with(Instant::now);
            } else if gone
                .take()
                .is_some_and(|since| since.elapsed() >= LOOK_EVERY)
            {
                // Gone long enough for the others to have looked twice without it (not just
                // turning over its one session): it comes back as a worker that arrives.
                *auto.seen() = None;
            }
        }
        self.open_gauge
            .set(i64::try_from(limit.open()).unwrap_or(i64::MAX));
        self.budget_gauge
            .set(i64::try_from(limit.at(Instant::now())).unwrap_or(i64::MAX));
        out
    }

    /// A slot for one new session, if the budget has room now.
    pub fn try_take(self: &Arc<Self>) -> Option<Slot> {
        self.with_limit(|l| l.take(Instant::now()))
            .then(|| Slot::new(self.clone()))
    }

    /// Whether it is `tenant`'s turn in the line and the budget has no room for it: only then
    /// may room be made by closing another tenant's idle session.
    pub fn needs_room(&self, tenant: &str) -> bool {
        self.with_line(|line| line.is_turn(tenant))
            && self.with_limit(|l| l.open() >= l.at(Instant::now()))
    }

    /// Whether sessions wait for room now.
    pub fn contended(&self) -> bool {
        !self.with_line(|line| line.is_empty())
    }

    /// Whether more sessions are open than the budget allows now (it was sized down).
    pub fn over(&self) -> bool {
        self.with_limit(|l| l.over(Instant::now()))
    }

    /// Whether this worker holds sessions there.
    pub fn holds_sessions(&self) -> bool {
        self.with_limit(|l| l.open() > 0)
    }

    /// The session of `slot` is to be closed when the budget is over: true when it was counted
    /// closing, and its owner closes it.
    pub fn shed(&self, slot: &mut Slot) -> bool {
        if slot.counted_closing {
            return false;
        }
        let shed = self.with_limit(|l| l.shed(Instant::now()));
        slot.counted_closing = shed;
        shed
    }

    /// Whether an `auto` budget is due to be sized (and nobody looks now).
    pub fn look_is_due(&self) -> bool {
        self.auto.as_ref().is_some_and(|auto| {
            !auto.looking.load(Ordering::Acquire)
                && auto.sized_at().is_none_or(|at| at.elapsed() >= LOOK_EVERY)
        })
    }

    /// The turn to size an `auto` budget, when it is due and nobody else looks now.
    pub fn look_due(self: &Arc<Self>) -> Option<Look> {
        let auto = self.auto.as_ref()?;
        let claimed = self.look_is_due()
            && auto
                .looking
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
        claimed.then(|| Look {
            budget: self.clone(),
        })
    }

    /// The budget sized from what the server showed.
    fn sized(&self, seen: &sizing::Seen) {
        let Some(auto) = &self.auto else {
            return;
        };
        let steady = {
            let mut last = auto.seen();
            let steady = last.map(|before| {
                if before.seen.workers.max(1) == seen.workers.max(1) {
                    before.steady.saturating_add(1)
                } else {
                    0
                }
            });
            *last = Some(Looked {
                seen: *seen,
                steady: steady.unwrap_or(0),
            });
            steady
        };
        let (before, share) = self.with_limit(|l| {
            let before = l.at(Instant::now());
            let share = sizing::share(seen, auto.free, l.open(), steady);
            l.size(share);
            (before, share)
        });
        *auto.sized_at() = Some(Instant::now());
        if before != share {
            tracing::debug!(
                server = self.server,
                budget = share,
                workers = seen.workers,
                clients = seen.clients,
                avsync_sessions = seen.avsync_sessions,
                free_target = sizing::free_target(seen, auto.free),
                "connection budget sized from the server"
            );
        }
        self.freed.notify_waiters();
    }

    fn with_line<T>(&self, f: impl FnOnce(&mut Rotation) -> T) -> T {
        f(&mut self.line.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A place in the line of sessions waiting for room, for a session of `tenant`.
    pub fn wait_in_line(self: &Arc<Self>, tenant: &str) -> InLine {
        self.with_line(|line| line.join(tenant));
        InLine {
            budget: self.clone(),
            tenant: tenant.to_owned(),
            served: false,
        }
    }

    /// Resolves when a slot may have come free; take it before trying, to miss no wake-up.
    pub fn freed(&self) -> Notified<'_> {
        self.freed.notified()
    }

    /// The attempt that held `slot` was refused: no session was made, so the slot comes back
    /// at once, and the budget is lowered to what is open without it. An `auto` budget is
    /// sized again by the next session: the server has less room than it was sized for.
    pub fn refused(&self, mut slot: Slot) {
        slot.budget = None;
        self.with_limit(|l| {
            l.give_back();
            l.refused(Instant::now());
        });
        if let Some(auto) = &self.auto {
            *auto.sized_at() = None;
        }
        self.freed.notify_waiters();
    }

    fn closing(&self) {
        self.with_limit(Limit::closing);
    }

    fn closed(&self) {
        self.with_limit(Limit::closed);
        self.freed.notify_waiters();
    }
}

/// The turn to size an `auto` budget: [`Look::run`] it on a session of the server.
pub struct Look {
    budget: Arc<ServerBudget>,
}

impl Look {
    /// Sizes the budget from what `conn`, a session of this worker on the server, shows. A
    /// failed look keeps the budget and is tried again after [`LOOK_EVERY`].
    pub async fn run(self, conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        let Some(auto) = &self.budget.auto else {
            return Ok(());
        };
        match sizing::look(conn, &auto.me).await {
            Ok(seen) => {
                self.budget.sized(&seen);
                Ok(())
            }
            Err(e) => {
                *auto.sized_at() = Some(Instant::now());
                tracing::warn!(server = self.budget.server, error = %e, "cannot size the connection budget from the server's pg_stat_activity; keeping it");
                Err(e)
            }
        }
    }
}

impl Drop for Look {
    fn drop(&mut self) {
        if let Some(auto) = &self.budget.auto {
            auto.looking.store(false, Ordering::Release);
        }
    }
}

/// A waiting session's place in line; leaving it without a slot lets the next tenant try.
pub struct InLine {
    budget: Arc<ServerBudget>,
    tenant: String,
    served: bool,
}

impl InLine {
    /// A slot, when it is this tenant's turn and the budget has room now.
    pub fn try_take(&mut self) -> Option<Slot> {
        if self.served {
            return None;
        }
        let budget = &self.budget;
        let tenant = &self.tenant;
        self.served = budget.with_line(|line| {
            let taken = line.is_turn(tenant) && budget.with_limit(|l| l.take(Instant::now()));
            if taken {
                line.served(tenant);
            }
            taken
        });
        if !self.served {
            return None;
        }
        // The next tenant in line may find room too.
        budget.freed.notify_waiters();
        Some(Slot::new(budget.clone()))
    }
}

impl Drop for InLine {
    fn drop(&mut self) {
        if !self.served {
            self.budget.with_line(|line| line.leave(&self.tenant));
            self.budget.freed.notify_waiters();
        }
    }
}

/// One session's place in its server's budget; given back (after [`CLOSE_GRACE`]) when dropped.
pub struct Slot {
    budget: Option<Arc<ServerBudget>>,
    /// Already counted closing (shed by an over budget, or marked by [`Slot::closing`]).
    counted_closing: bool,
}

impl Slot {
    fn new(budget: Arc<ServerBudget>) -> Self {
        Self {
            budget: Some(budget),
            counted_closing: false,
        }
    }

    /// Its session is being closed: the budget no longer counts it as staying open.
    pub fn closing(&mut self) {
        if let (Some(budget), false) = (&self.budget, self.counted_closing) {
            budget.closing();
            self.counted_closing = true;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.closing();
        let Some(budget) = self.budget.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    tokio::time::sleep(CLOSE_GRACE).await;
                    budget.closed();
                });
            }
            Err(_) => budget.closed(),
        }
    }
}

/// One server, as the status view shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServerView {
    /// `host:port`.
    pub server: String,
    /// Sessions this worker holds there.
    pub sessions: usize,
    /// The most it may hold there now: pinned or sized from the server (`auto`), lowered for a
    /// while after a refusal.
    pub budget: usize,
    /// Free slots in that budget.
    pub free: usize,
    /// Whether it answered the last probe or new session.
    pub reachable: bool,
    /// With `auto`: what the budget was last sized from (None before the first look, and with
    /// a pinned budget).
    #[serde(default)]
    pub sized_from: Option<SizedFrom>,
}

/// What an `auto` budget was sized from, as the status view shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SizedFrom {
    /// avsync workers holding sessions on the server, this one included.
    pub workers: i64,
    /// Slots of `max_connections` not taken by client backends nor reserved.
    pub server_free: i64,
    /// The slots all workers together leave free there (`AVSYNC_PG_FREE_CONNECTIONS`).
    pub free_target: i64,
}

/// Every server's budget, created on first use.
#[derive(Clone)]
pub struct Budgets {
    sizing: Sizing,
    /// This worker's application name.
    me: Arc<str>,
    servers: Arc<Mutex<HashMap<String, Arc<ServerBudget>>>>,
    open: IntGaugeVec,
    budget: IntGaugeVec,
    reachable: IntGaugeVec,
}

/// The `avsync_worker_connections{server}`, `avsync_worker_connection_budget{server}` and
/// `avsync_worker_server_reachable{server}` gauges.
pub struct BudgetGauges {
    pub open: IntGaugeVec,
    pub budget: IntGaugeVec,
    pub reachable: IntGaugeVec,
}

impl Budgets {
    /// Budgets sized as `sizing` says, for the worker whose sessions are named `me`.
    pub fn new(sizing: Sizing, me: &str, gauges: BudgetGauges) -> Self {
        Self {
            sizing,
            me: Arc::from(me),
            servers: Arc::new(Mutex::new(HashMap::new())),
            open: gauges.open,
            budget: gauges.budget,
            reachable: gauges.reachable,
        }
    }

    /// Every server this worker has used, as the status view shows it.
    pub fn view(&self) -> Vec<ServerView> {
        let mut view: Vec<ServerView> = self
            .all()
            .iter()
            .map(|b| {
                let (sessions, budget) = b.with_limit(|l| (l.open(), l.at(Instant::now())));
                let sized_from = b.auto.as_ref().and_then(|auto| {
                    let seen = auto.seen().as_ref()?.seen;
                    Some(SizedFrom {
                        workers: seen.workers,
                        server_free: seen.max_connections - seen.reserved - seen.clients,
                        free_target: sizing::free_target(&seen, auto.free),
                    })
                });
                ServerView {
                    server: b.server.clone(),
                    sessions,
                    budget,
                    free: budget.saturating_sub(sessions),
                    reachable: b.reachable_gauge.get() == 1,
                    sized_from,
                }
            })
            .collect();
        view.sort_by(|a, b| a.server.cmp(&b.server));
        view
    }

    /// How many sessions this worker may hold now, over every server it has used.
    pub fn total(&self) -> usize {
        let now = Instant::now();
        let servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        servers
            .values()
            .map(|b| b.limit.lock().unwrap_or_else(|e| e.into_inner()).at(now))
            .sum()
    }

    /// Every server's budget.
    pub fn all(&self) -> Vec<Arc<ServerBudget>> {
        let servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        servers.values().cloned().collect()
    }

    pub fn server(&self, server: &str) -> Arc<ServerBudget> {
        let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        servers
            .entry(server.to_owned())
            .or_insert_with(|| {
                let (max, auto) = match self.sizing {
                    Sizing::Fixed(max) => (max, None),
                    // One session, which looks at the server before the budget grows.
                    Sizing::Auto { free } => (
                        1,
                        Some(Auto {
                            free,
                            me: self.me.clone(),
                            sized_at: Mutex::new(None),
                            looking: AtomicBool::new(false),
                            seen: Mutex::new(None),
                            gone_since: Mutex::new(None),
                        }),
                    ),
                };
                let budget_gauge = self.budget.with_label_values(&[server]);
                budget_gauge.set(i64::try_from(max).unwrap_or(i64::MAX));
                let reachable_gauge = self.reachable.with_label_values(&[server]);
                reachable_gauge.set(1);
                Arc::new(ServerBudget {
                    server: server.to_owned(),
                    limit: Mutex::new(Limit::new(max)),
                    freed: Notify::new(),
                    line: Mutex::new(Rotation::default()),
                    auto,
                    open_gauge: self.open.with_label_values(&[server]),
                    budget_gauge,
                    reachable_gauge,
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

    fn gauges() -> BudgetGauges {
        let gauge = || IntGaugeVec::new(prometheus::Opts::new("g", "g"), &["server"]).unwrap();
        BudgetGauges {
            open: gauge(),
            budget: gauge(),
            reachable: gauge(),
        }
    }

    /// An `auto` budget on one server, and the one session it allows before its first look.
    fn auto_with_one_session() -> (Budgets, Arc<ServerBudget>, Slot) {
        let budgets = Budgets::new(Sizing::Auto { free: None }, "avsync-worker test", gauges());
        let server = budgets.server("db:5432");
        let first = server.try_take().expect("one session to look with");
        (budgets, server, first)
    }

    #[test]
    fn a_budget_sized_down_sheds_what_it_holds_over_it_once() {
        let now = Instant::now();
        let mut l = Limit::new(6);
        for _ in 0..6 {
            assert!(l.take(now));
        }
        l.size(4);
        assert!(l.over(now));
        assert!(l.shed(now));
        assert!(l.shed(now));
        assert!(!l.shed(now), "two closing: the four left fit");
        assert!(
            !l.take(now),
            "closing sessions hold their slots until they are closed"
        );
        l.closed();
        l.closed();
        assert_eq!(l.open(), 4);
        assert!(!l.over(now) && !l.take(now));
        l.size(5);
        assert!(l.take(now));
    }

    #[test]
    fn an_auto_budget_is_one_session_until_it_looked_and_again_once_it_holds_none() {
        let (budgets, server, first) = auto_with_one_session();
        assert!(server.try_take().is_none());
        assert!(server.look_is_due());
        let seen = sizing::tests::seen(5, 1, 1, 1);
        let look = server.look_due().expect("due");
        assert!(server.look_due().is_none(), "one look at a time");
        server.sized(&seen);
        drop(look);
        assert!(!server.look_is_due(), "sized just now");
        assert_eq!(budgets.view()[0].budget, 71);
        assert_eq!(budgets.view()[0].sized_from.as_ref().unwrap().workers, 1);
        let second = server.try_take().expect("room after the look");
        drop((first, second));
        assert_eq!(budgets.view()[0].budget, 1, "holds none: back to one");
        assert!(server.look_is_due());
    }

    /// A worker that finds another on the server keeps its one session at its first look and
    /// takes unused room at its next one, when the count of workers has held (the other has
    /// sized its budget for two by then); turning its one session over does not make it new.
    #[test]
    fn an_arriving_auto_budget_grows_at_its_second_look() {
        let (budgets, server, first) = auto_with_one_session();
        let other_at_35 = sizing::tests::seen(5, 2, 36, 1);
        server.sized(&other_at_35);
        assert_eq!(
            budgets.view()[0].budget,
            1,
            "the other may not have sized for two yet"
        );
        server.sized(&other_at_35);
        assert_eq!(budgets.view()[0].budget, 18, "half the 35 nobody uses");
        // Its one session turned over: back to one until it looks, then its share at once.
        drop(first);
        assert_eq!(budgets.view()[0].budget, 1);
        let first = server.try_take().expect("a new session");
        assert!(server.look_is_due());
        server.sized(&other_at_35);
        assert_eq!(
            budgets.view()[0].budget,
            18,
            "not gone long enough to count as arriving"
        );
        let three = sizing::tests::seen(5, 3, 36, 1);
        server.sized(&three);
        assert_eq!(
            budgets.view()[0].budget,
            1,
            "a third arrived: keeps what it holds"
        );
        // Gone for a look or longer, the others have sized without it: it arrives again.
        drop(first);
        let auto = server.auto.as_ref().expect("auto");
        *auto.gone_since.lock().unwrap() = Instant::now().checked_sub(LOOK_EVERY);
        let first = server.try_take().expect("a new session");
        assert!(budgets.view()[0].sized_from.is_none(), "nothing seen since");
        server.sized(&three);
        assert_eq!(budgets.view()[0].budget, 1, "an arrival's first look");
        server.sized(&three);
        assert_eq!(
            budgets.view()[0].budget,
            12,
            "a third of the 35 nobody uses"
        );
        drop(first);
    }

    /// Another worker above the equal share (pinned, or sized for fewer workers because its look
    /// came late) keeps an arrival at what it holds, for [`sizing::STEADY_LOOKS`] looks only.
    #[test]
    fn a_worker_above_its_share_is_waited_for_a_few_looks() {
        let (budgets, server, first) = auto_with_one_session();
        let other_at_50 = sizing::tests::seen(5, 2, 51, 1);
        for look in 0..sizing::STEADY_LOOKS {
            server.sized(&other_at_50);
            assert_eq!(budgets.view()[0].budget, 1, "look {look}");
        }
        server.sized(&other_at_50);
        assert_eq!(budgets.view()[0].budget, 11, "half the 20 nobody uses");
        drop(first);
    }

    #[test]
    fn a_pinned_budget_is_the_number_from_the_start() {
        let budgets = Budgets::new(Sizing::Fixed(7), "avsync-worker test", gauges());
        let server = budgets.server("db:5432");
        assert!(!server.look_is_due() && server.look_due().is_none());
        let slots: Vec<Slot> = (0..7).filter_map(|_| server.try_take()).collect();
        assert_eq!(slots.len(), 7);
        assert!(server.try_take().is_none());
        drop(slots);
        assert_eq!(budgets.view()[0].budget, 7);
    }

    /// Serves the line until it is empty; the tenants in the order they got slots.
    fn serve_all(line: &mut Rotation) -> Vec<String> {
        let mut served = Vec::new();
        while let Some(next) = line.order.front().cloned() {
            line.served(&next);
            served.push(next);
        }
        served
    }

    #[test]
    fn a_busy_tenant_takes_one_turn_like_any_other() {
        let mut line = Rotation::default();
        for _ in 0..4 {
            line.join("busy");
        }
        line.join("a");
        line.join("b");
        line.join("busy");
        line.join("a");
        assert!(line.is_turn("busy"));
        assert_eq!(
            serve_all(&mut line),
            ["busy", "a", "b", "busy", "a", "busy", "busy", "busy"]
        );
        assert!(line.is_empty());
    }

    #[test]
    fn a_tenant_that_stops_waiting_leaves_its_turn_to_the_next() {
        let mut line = Rotation::default();
        line.join("a");
        line.join("b");
        line.join("b");
        line.leave("a");
        assert!(line.is_turn("b"));
        line.leave("b");
        assert!(line.is_turn("b"), "one session of b still waits");
        line.leave("b");
        assert!(line.is_empty());
    }

    #[test]
    fn only_the_tenant_whose_turn_it_is_is_served() {
        let mut line = Rotation::default();
        line.join("a");
        line.join("b");
        line.served("b");
        assert!(line.is_turn("a"));
        assert_eq!(serve_all(&mut line), ["a", "b"]);
    }

    proptest! {
        /// However sessions join, are served and leave, no tenant is served twice while another
        /// waited the whole time in between, and the line empties exactly when nobody waits.
        #[test]
        fn round_robin_never_skips_a_waiting_tenant(steps in proptest::collection::vec((0..3u8, 0..4u8), 0..300)) {
            let mut line = Rotation::default();
            let mut waiting: HashMap<String, usize> = HashMap::new();
            // Per tenant, the tenants served since it last joined or was served.
            let mut since: HashMap<String, Vec<String>> = HashMap::new();
            for (op, t) in steps {
                let tenant = format!("t{t}");
                match op {
                    0 => {
                        if waiting.get(&tenant).copied().unwrap_or(0) == 0 {
                            since.insert(tenant.clone(), Vec::new());
                        }
                        line.join(&tenant);
                        *waiting.entry(tenant).or_insert(0) += 1;
                    }
                    1 => {
                        if let Some(next) = line.order.front().cloned() {
                            prop_assert!(waiting.get(&next).copied().unwrap_or(0) > 0);
                            line.served(&next);
                            *waiting.get_mut(&next).unwrap() -= 1;
                            for (other, served) in since.iter_mut() {
                                if *other != next && waiting.get(other).copied().unwrap_or(0) > 0 {
                                    prop_assert!(
                                        !served.contains(&next),
                                        "{next} served twice while {other} waited"
                                    );
                                    served.push(next.clone());
                                }
                            }
                            since.insert(next, Vec::new());
                        }
                    }
                    _ => {
                        if waiting.get(&tenant).copied().unwrap_or(0) > 0 {
                            line.leave(&tenant);
                            *waiting.get_mut(&tenant).unwrap() -= 1;
                        }
                    }
                }
                prop_assert_eq!(line.is_empty(), waiting.values().all(|n| *n == 0));
            }
        }
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
