//! One small connection pool per tenant database, at most `AVSYNC_TENANT_POOL_CAPACITY` of them.
//!
//! - Pools live in a moka cache with LRU eviction; its eviction listener closes an evicted pool's
//!   idle connections. A pool is held by `Arc` by every task using it, so eviction never cuts a
//!   running query: the connection in use is closed when it is handed back.
//! - The bound is strict: opening a pool takes one of `capacity` slots, and a slot is given back
//!   only when its pool is gone (evicted and no longer in use). With every slot taken, the least
//!   recently used idle pool is evicted first.
//! - Two tasks that need the same new tenant at once open one pool (`try_get_with` is
//!   single-flight). The first opening of a database creates it (when allowed) and migrates it.
//! - A pool's sessions wait for room in their server's budget; when it is their tenant's turn
//!   and there is none, [`Pools::connection`] closes an idle session of another tenant: the
//!   owner of every pool does that, never one pool reaching for the others.
//! - An `auto` budget is sized on a session the worker holds: a new one, one taken back from
//!   its pool, or, while the worker is idle there, an idle one that [`size_and_trim`] takes for
//!   that; a session given back over the budget is closed, and so are idle ones.

use crate::failure::{cause, Failure};
use crate::metrics::PoolMetrics;
use crate::tenant_db::budget::{BudgetGauges, Budgets, ServerBudget, Slot, LOOK_EVERY};
use crate::tenant_db::provision::{session_options, worker_name, Provisioning};
use crate::tenant_db::resolve::TenantDb;
use crate::tenant_db::sizing::{MaxConnections, Sizing};
use deadpool::managed::{self, Metrics, PoolError, RecycleError, RecycleResult};
use deadpool::Runtime;
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

const WAIT_TIMEOUT: Duration = Duration::from_secs(10);
const RECYCLE_TIMEOUT: Duration = Duration::from_secs(5);
/// An idle tenant pool is closed after this long without use, even below the capacity.
const IDLE_POOL_TTI: Duration = Duration::from_secs(600);
/// Marks a pool that was chosen for eviction: no new lease may take it.
const EVICTING: usize = usize::MAX;
/// How often a session waiting for room in its server's budget looks again (besides being woken
/// when a slot comes back), since a lowered budget grows back without waking anyone.
const BUDGET_POLL: Duration = Duration::from_millis(50);
/// While other tenants wait for room in the budget, a session this old is closed when next
/// taken, so that the budget goes round the tenants instead of staying with the busiest.
const FAIR_SHARE: Duration = Duration::from_millis(1000);
/// The budget of [`Pools::new`], which only tests use.
#[cfg(any(test, feature = "test-support"))]
const TEST_MAX_CONNECTIONS: u32 = 20;

/// The `server` label and budget key of a tenant database: `host:port`.
pub fn server_of(db: &TenantDb) -> String {
    format!("{}:{}", db.options().get_host(), db.options().get_port())
}

/// One tenant session and its place in its server's budget.
pub struct Session {
    conn: PgConnection,
    slot: Slot,
}

impl Deref for Session {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl DerefMut for Session {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

pub struct PgManager {
    db: TenantDb,
    /// The tenant's options, tagged and with the session timeouts.
    options: PgConnectOptions,
    budget: Arc<ServerBudget>,
    provisioning: Arc<Provisioning>,
    metrics: PoolMetrics,
}

impl managed::Manager for PgManager {
    type Type = Session;
    type Error = Failure;

    async fn create(&self) -> Result<Session, Failure> {
        let slot = self.slot().await;
        match self.provisioning.session(&self.db, &self.options).await {
            Ok(mut conn) => {
                self.budget.reachable(true);
                if let Some(look) = self.budget.look_due() {
                    // A failed look is logged and tried again; the session itself may be fine.
                    let _ = look.run(&mut conn).await;
                }
                Ok(Session { conn, slot })
            }
            Err(failure) => {
                match &failure {
                    Failure::Refused(_) => {
                        self.metrics.refusals.with_label_values(&["server"]).inc();
                        tracing::warn!(
                            server = self.budget.server(),
                            "PostgreSQL refused a connection for lack of slots; lowering this worker's budget"
                        );
                        self.budget.refused(slot);
                    }
                    Failure::DatabaseRefused { .. } => {
                        self.metrics.refusals.with_label_values(&["database"]).inc();
                    }
                    _ => {}
                }
                Err(failure)
            }
        }
    }

    async fn recycle(&self, session: &mut Session, metrics: &Metrics) -> RecycleResult<Failure> {
        if self.budget.contended() && metrics.age() >= FAIR_SHARE {
            // Sessions of other tenants wait for room: this one's place goes to the next of
            // them, and this tenant queues for a new one behind them.
            return Err(RecycleError::message(
                "its place in the connection budget goes to a waiting tenant",
            ));
        }
        // The look is a round trip as the ping is: it proves the session alive as well.
        let checked = match self.budget.look_due() {
            Some(look) => look.run(&mut session.conn).await,
            None => session.conn.ping().await,
        };
        checked.map_err(|e| RecycleError::Backend(Failure::from(e)))?;
        if self.budget.shed(&mut session.slot) {
            return Err(RecycleError::message(
                "the worker holds more sessions than its budget on the server now allows",
            ));
        }
        Ok(())
    }
}

impl PgManager {
    /// Room in the server's budget for one more session: when it is full, the tenants waiting
    /// take turns (see [`crate::tenant_db::budget::Rotation`]), and [`Pools::connection`] makes
    /// room on this tenant's turn. Never fails; the wait ends when a session closes (or the
    /// budget grows back).
    async fn slot(&self) -> Slot {
        if !self.budget.contended() {
            if let Some(slot) = self.budget.try_take() {
                return slot;
            }
        }
        let mut line = self.budget.wait_in_line(self.db.key());
        loop {
            let freed = self.budget.freed();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(slot) = line.try_take() {
                return slot;
            }
            tokio::select! {
                _ = freed => {}
                _ = tokio::time::sleep(BUDGET_POLL) => {}
            }
        }
    }
}

/// A pooled tenant session, used as a `PgConnection`.
pub struct PooledConnection(managed::Object<PgManager>);

impl Deref for PooledConnection {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.0.conn
    }
}

impl DerefMut for PooledConnection {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.0.conn
    }
}

impl PooledConnection {
    /// The session found the tenant schema gone (the database was recreated empty under the
    /// worker, which kept its sessions): the database is no longer known migrated, and this
    /// session and the pool's idle ones are closed instead of used again, so that the next
    /// session migrates.
    pub(crate) fn schema_missing(self) {
        if let Some(pool) = managed::Object::pool(&self.0) {
            let manager = pool.manager();
            manager.provisioning.forget(&manager.db);
            pool.retain(|_, _| false);
        }
        drop(managed::Object::take(self.0));
    }
}

/// One tenant database's pool and the slot it holds.
pub struct TenantPool {
    pool: managed::Pool<PgManager>,
    busy: AtomicUsize,
    last_used_ms: AtomicU64,
    epoch: Instant,
    metrics: PoolMetrics,
    idle: Arc<Notify>,
    server: String,
    _slot: OwnedSemaphorePermit,
}

impl TenantPool {
    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_used_ms.store(ms, Ordering::Relaxed);
    }

    /// Marks the pool for eviction if nobody uses it; true when it was idle.
    fn claim_idle(&self) -> bool {
        self.busy
            .compare_exchange(0, EVICTING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

impl Drop for TenantPool {
    fn drop(&mut self) {
        self.pool.close();
        self.metrics.open.dec();
    }
}

/// A task's use of a tenant pool; while it lives the pool is not evicted on purpose, and even if
/// the cache drops it the pool stays usable.
pub struct Lease {
    pool: Arc<TenantPool>,
}

impl Lease {
    fn take(pool: Arc<TenantPool>) -> Option<Self> {
        pool.busy
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n != EVICTING).then_some(n + 1)
            })
            .ok()?;
        pool.touch();
        Some(Self { pool })
    }

    /// A session of the tenant's pool: an idle one, or a new one once its server's budget has
    /// room (the first of a database not yet known migrated also migrates it).
    pub async fn connection(&self) -> Result<PooledConnection, Failure> {
        let started = Instant::now();
        let connection = self.pool.pool.get().await;
        self.pool
            .metrics
            .wait_seconds
            .observe(started.elapsed().as_secs_f64());
        connection.map(PooledConnection).map_err(|e| match e {
            PoolError::Timeout(_) => Failure::PoolTimeout(WAIT_TIMEOUT),
            PoolError::Backend(failure) => failure,
            other => Failure::Unreachable(cause(other.to_string())),
        })
    }

    /// Whether sessions of this tenant's server wait for room in the budget: then a wait for
    /// the tenant's own pool is the budget's backpressure, not the tenant's failure.
    pub fn budget_contended(&self) -> bool {
        self.pool.pool.manager().budget.contended()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.touch();
        if self.pool.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Someone may be waiting to evict an idle pool for a slot.
            self.pool.idle.notify_waiters();
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub capacity: u32,
    pub size: u32,
    pub create_databases: bool,
    pub auto_migrate: bool,
}

/// Every pool, by database, and what the pools are opened with.
struct Shared {
    cache: Cache<String, Arc<TenantPool>>,
    settings: PoolSettings,
    metrics: PoolMetrics,
    provisioning: Arc<Provisioning>,
}

impl Shared {
    /// The pools on `server`, least recently used first. Sorted by a snapshot of each pool's
    /// last use: the clocks move while we sort, and a sort whose keys change under it may panic.
    fn pools_on(&self, server: &str) -> Vec<Arc<TenantPool>> {
        let mut pools: Vec<(u64, Arc<TenantPool>)> = self
            .cache
            .iter()
            .filter(|(_, pool)| pool.server == server)
            .map(|(_, pool)| (pool.last_used_ms.load(Ordering::Relaxed), pool))
            .collect();
        pools.sort_unstable_by_key(|(last_used, _)| *last_used);
        pools.into_iter().map(|(_, pool)| pool).collect()
    }

    /// Closes one idle session of the least recently used pool on `server` that has one; false
    /// when none is idle. A session in use is never touched.
    fn close_least_recently_used_idle(&self, server: &str) -> bool {
        for pool in self.pools_on(server) {
            // An idle session may sit in a pool whose other users wait for room themselves.
            let mut first = true;
            let removed = pool
                .pool
                .retain(|_, _| !std::mem::replace(&mut first, false))
                .removed;
            if removed.is_empty() {
                continue;
            }
            self.metrics.budget_closes.inc();
            for session in removed {
                let Session { conn, mut slot } = session;
                slot.closing();
                tokio::spawn(async move {
                    let _ = conn.close().await;
                    drop(slot);
                });
            }
            return true;
        }
        false
    }
}

/// Keeps every `auto` budget sized and kept, until the pools are gone. Every [`LOOK_EVERY`], on
/// each server where the worker holds sessions but none was taken or opened since the last
/// look (so none looked), an idle one is taken from its pool, which looks; then, while the
/// worker holds more than its budget there, its idle sessions are closed.
async fn size_and_trim(shared: Weak<Shared>, budgets: Budgets) {
    let mut tick = tokio::time::interval(LOOK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        for budget in budgets.all() {
            if budget.holds_sessions() && budget.look_is_due() {
                look_on_an_idle_session(&shared, budget.server()).await;
            }
            while budget.over() && shared.close_least_recently_used_idle(budget.server()) {}
        }
    }
}

/// Takes an idle session of the most recently used pool on `server` that has one, and gives it
/// back: taking it recycles it, which looks at the server when a look is due.
async fn look_on_an_idle_session(shared: &Shared, server: &str) {
    let Some(pool) = shared
        .pools_on(server)
        .into_iter()
        .rev()
        .find(|pool| pool.pool.status().available > 0)
    else {
        return;
    };
    let Some(lease) = Lease::take(pool) else {
        return;
    };
    // Should the session have been taken meanwhile, the pool would open one within the budget;
    // the look does not wait for that.
    let _ = tokio::time::timeout(LOOK_EVERY, lease.connection()).await;
}

#[derive(Clone)]
pub struct Pools {
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    budgets: Budgets,
    /// The clock of every pool's last use, so that uses compare across pools.
    epoch: Instant,
    idle: Arc<Notify>,
}

impl Pools {
    /// `metrics` are the `avsync_worker_tenant_pool*` and connection series. The connection
    /// budget is pinned at 20 sessions per server; see [`Pools::with_max_connections`].
    #[cfg(any(test, feature = "test-support"))]
    pub fn new(settings: PoolSettings, metrics: PoolMetrics) -> Self {
        Self::with_max_connections(
            settings,
            MaxConnections::Fixed(TEST_MAX_CONNECTIONS),
            None,
            metrics,
        )
    }

    /// As [`Pools::new`], with the budget per server that `max_connections` and `free`
    /// (`AVSYNC_MAX_CONNECTIONS`, `AVSYNC_PG_FREE_CONNECTIONS`) say. An `auto` budget is sized
    /// by a task of the current runtime, which ends with the pools.
    pub fn with_max_connections(
        settings: PoolSettings,
        max_connections: MaxConnections,
        free: Option<u32>,
        metrics: PoolMetrics,
    ) -> Self {
        let evictions = metrics.evictions.clone();
        let cache = Cache::builder()
            .max_capacity(u64::from(settings.capacity))
            .eviction_policy(EvictionPolicy::lru())
            .time_to_idle(IDLE_POOL_TTI)
            .eviction_listener(move |_key, pool: Arc<TenantPool>, cause| {
                // Explicit removals are shutdown, or an eviction already counted when claimed.
                if matches!(cause, RemovalCause::Expired | RemovalCause::Size) {
                    evictions.inc();
                }
                // Idle connections go now; one in use is closed when it is handed back.
                if pool.claim_idle() {
                    pool.pool.close();
                }
            })
            .build();
        let permits = usize::try_from(settings.capacity).unwrap_or(usize::MAX);
        let me = worker_name();
        let sizing = Sizing::new(max_connections, free);
        let budgets = Budgets::new(
            sizing,
            &me,
            BudgetGauges {
                open: metrics.connections.clone(),
                budget: metrics.connection_budget.clone(),
                reachable: metrics.server_reachable.clone(),
            },
        );
        let shared = Arc::new(Shared {
            cache,
            settings,
            provisioning: Arc::new(Provisioning::new(
                settings.create_databases,
                settings.auto_migrate,
                me,
                metrics.clone(),
            )),
            metrics,
        });
        if matches!(sizing, Sizing::Auto { .. }) {
            tokio::spawn(size_and_trim(Arc::downgrade(&shared), budgets.clone()));
        }
        Self {
            shared,
            slots: Arc::new(Semaphore::new(permits)),
            budgets,
            epoch: Instant::now(),
            idle: Arc::new(Notify::new()),
        }
    }

    /// Every server this worker has used: its sessions, budget and whether it answers.
    pub(crate) fn servers(&self) -> Vec<super::budget::ServerView> {
        self.budgets.view()
    }

    /// How many sessions this worker may hold now, over every server it has used.
    pub(crate) fn budget(&self) -> usize {
        self.budgets.total()
    }

    /// Records whether `server` answers, as the outage probe found it.
    pub(crate) fn server_reachable(&self, server: &str, answers: bool) {
        self.budgets.server(server).reachable(answers);
    }

    /// Creates the connection series of `db`'s server now, so they exist before its first use.
    pub fn announce_server(&self, db: &TenantDb) {
        self.budgets.server(&server_of(db));
    }

    /// A lease on the pool of `db`, opening the pool on first use.
    pub async fn lease(&self, db: &TenantDb) -> Result<Lease, Failure> {
        loop {
            let pool = self
                .shared
                .cache
                .try_get_with(db.key().to_owned(), self.open(db))
                .await
                .map_err(|shared| (*shared).clone())?;
            if let Some(lease) = Lease::take(pool) {
                return Ok(lease);
            }
            // Chosen for eviction between lookup and lease: drop it from the cache, open anew.
            self.shared.cache.invalidate(db.key()).await;
        }
    }

    /// A pool opens no session yet: its first `connection` does, within the budget.
    async fn open(&self, db: &TenantDb) -> Result<Arc<TenantPool>, Failure> {
        let slot = self.slot().await?;
        let server = server_of(db);
        let pool = managed::Pool::builder(PgManager {
            db: db.clone(),
            options: session_options(db, &self.shared.provisioning.name),
            budget: self.budgets.server(&server),
            provisioning: self.shared.provisioning.clone(),
            metrics: self.shared.metrics.clone(),
        })
        .max_size(usize::try_from(self.shared.settings.size).unwrap_or(usize::MAX))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(WAIT_TIMEOUT))
        .recycle_timeout(Some(RECYCLE_TIMEOUT))
        .build()
        .map_err(|e| Failure::Unreachable(cause(e)))?;
        let metrics = self.shared.metrics.clone();
        metrics.open.inc();
        metrics.opens.inc();
        let pool = TenantPool {
            pool,
            busy: AtomicUsize::new(0),
            last_used_ms: AtomicU64::new(0),
            epoch: self.epoch,
            metrics,
            idle: self.idle.clone(),
            server,
            _slot: slot,
        };
        pool.touch();
        Ok(Arc::new(pool))
    }

    /// A free slot for a new pool, evicting the least recently used idle pool while none is free.
    /// Waiting is never a failure: every pool is busy only while its tenants' events are being
    /// applied, and the wait is bounded by the prefetch like the connection budget's.
    async fn slot(&self) -> Result<OwnedSemaphorePermit, Failure> {
        loop {
            if let Ok(permit) = self.slots.clone().try_acquire_owned() {
                return Ok(permit);
            }
            let became_idle = self.idle.notified();
            self.evict_least_recently_used_idle().await;
            tokio::select! {
                permit = self.slots.clone().acquire_owned() => {
                    return permit.map_err(|_| Failure::Unreachable(cause("the worker is stopping")));
                }
                _ = became_idle => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    /// The idle pool used least recently, claimed for eviction.
    fn claim_least_recently_used_idle(&self) -> Option<Arc<String>> {
        let (key, pool) = self
            .shared
            .cache
            .iter()
            .filter(|(_, pool)| pool.busy.load(Ordering::Acquire) == 0)
            .min_by_key(|(_, pool)| pool.last_used_ms.load(Ordering::Relaxed))?;
        let claimed = pool.claim_idle();
        if claimed {
            self.shared.metrics.evictions.inc();
        }
        claimed.then_some(key)
    }

    async fn evict_least_recently_used_idle(&self) {
        if let Some(key) = self.claim_least_recently_used_idle() {
            self.shared.cache.invalidate(key.as_str()).await;
        }
        self.shared.cache.run_pending_tasks().await;
    }

    /// A session of `lease`'s pool (see [`Lease::connection`]). While it waits in its server's
    /// budget line and its tenant's turn finds no room, an idle session of the least recently
    /// used tenant on that server is closed to make some.
    pub(crate) async fn connection(&self, lease: &Lease) -> Result<PooledConnection, Failure> {
        let budget = lease.pool.pool.manager().budget.clone();
        let tenant = lease.pool.pool.manager().db.key();
        let connection = lease.connection();
        tokio::pin!(connection);
        loop {
            let freed = budget.freed();
            tokio::select! {
                connection = &mut connection => return connection,
                _ = freed => {}
                _ = tokio::time::sleep(BUDGET_POLL) => {}
            }
            if budget.needs_room(tenant) {
                self.shared.close_least_recently_used_idle(budget.server());
            }
        }
    }

    /// Open pools, as the gauge counts them.
    pub fn open_pools(&self) -> i64 {
        self.shared.metrics.open.get()
    }

    /// Closes every pool; connections in use are closed when handed back.
    pub async fn close_all(&self) {
        let keys: Vec<Arc<String>> = self.shared.cache.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.shared.cache.invalidate(key.as_str()).await;
        }
        self.shared.cache.run_pending_tasks().await;
    }
}
