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

use crate::failure::Failure;
use crate::metrics::PoolMetrics;
use crate::tenants::TenantDb;
use deadpool::managed::{self, Metrics, PoolError, RecycleError, RecycleResult};
use deadpool::Runtime;
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const WAIT_TIMEOUT: Duration = Duration::from_secs(10);
const RECYCLE_TIMEOUT: Duration = Duration::from_secs(5);
const SLOT_WAIT: Duration = Duration::from_secs(30);
/// An idle tenant pool is closed after this long without use, even below the capacity.
const IDLE_POOL_TTI: Duration = Duration::from_secs(600);
/// Marks a pool that was chosen for eviction: no new lease may take it.
const EVICTING: usize = usize::MAX;

/// The tenant schema. A worker older than a database's schema keeps working during a rolling
/// upgrade instead of refusing migrations it does not know.
pub fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("../migrations");
    migrator.set_ignore_missing(true);
    migrator
}

pub struct PgManager {
    options: PgConnectOptions,
}

impl managed::Manager for PgManager {
    type Type = PgConnection;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<PgConnection, sqlx::Error> {
        PgConnection::connect_with(&self.options).await
    }

    async fn recycle(&self, conn: &mut PgConnection, _: &Metrics) -> RecycleResult<sqlx::Error> {
        conn.ping().await.map_err(RecycleError::Backend)
    }
}

pub type PooledConnection = managed::Object<PgManager>;

/// One tenant database's pool and the slot it holds.
pub struct TenantPool {
    pool: managed::Pool<PgManager>,
    busy: AtomicUsize,
    last_used_ms: AtomicU64,
    epoch: Instant,
    metrics: PoolMetrics,
    idle: Arc<Notify>,
    /// Its database is gone (dropped under it): the next lease opens the pool anew, which
    /// creates (when allowed) and migrates the database again.
    stale: AtomicBool,
    database: String,
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

    pub async fn connection(&self) -> Result<PooledConnection, Failure> {
        let started = Instant::now();
        let connection = self.pool.pool.get().await;
        self.pool
            .metrics
            .wait_seconds
            .observe(started.elapsed().as_secs_f64());
        connection.map_err(|e| match e {
            PoolError::Timeout(_) => Failure::PoolTimeout(WAIT_TIMEOUT),
            PoolError::Backend(e) if is_missing_database(&e) => {
                self.pool.stale.store(true, Ordering::Release);
                Failure::NotProvisioned {
                    database: self.pool.database.clone(),
                }
            }
            PoolError::Backend(e) => Failure::Unreachable(e.to_string()),
            other => Failure::Unreachable(other.to_string()),
        })
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

#[derive(Clone)]
pub struct Pools {
    cache: Cache<String, Arc<TenantPool>>,
    slots: Arc<Semaphore>,
    settings: PoolSettings,
    metrics: PoolMetrics,
    /// The clock of every pool's last use, so that uses compare across pools.
    epoch: Instant,
    idle: Arc<Notify>,
}

impl Pools {
    /// `metrics` are the `avsync_worker_tenant_pool*` series.
    pub fn new(settings: PoolSettings, metrics: PoolMetrics) -> Self {
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
        Self {
            cache,
            slots: Arc::new(Semaphore::new(permits)),
            settings,
            metrics,
            epoch: Instant::now(),
            idle: Arc::new(Notify::new()),
        }
    }

    /// A lease on the pool of `db`, opening the pool on first use.
    pub async fn lease(&self, db: &TenantDb) -> Result<Lease, Failure> {
        loop {
            let pool = self
                .cache
                .try_get_with(db.key().to_owned(), self.open(db))
                .await
                .map_err(|shared| (*shared).clone())?;
            if pool.stale.load(Ordering::Acquire) {
                self.cache.invalidate(db.key()).await;
                continue;
            }
            if let Some(lease) = Lease::take(pool) {
                return Ok(lease);
            }
            // Chosen for eviction between lookup and lease: drop it from the cache, open anew.
            self.cache.invalidate(db.key()).await;
        }
    }

    async fn open(&self, db: &TenantDb) -> Result<Arc<TenantPool>, Failure> {
        let slot = self.slot().await?;
        let mut conn = connect(db, self.settings.create_databases).await?;
        if self.settings.auto_migrate {
            // `run` goes through `Acquire`, whose future is not Send for every lifetime, which a
            // spawned task needs; `run_direct` is the same migration (advisory lock included).
            migrator().run_direct(&mut conn).await?;
        }
        let _ = conn.close().await;
        let pool = managed::Pool::builder(PgManager {
            options: db.options().clone(),
        })
        .max_size(usize::try_from(self.settings.size).unwrap_or(usize::MAX))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(WAIT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(RECYCLE_TIMEOUT))
        .build()
        .map_err(|e| Failure::Unreachable(e.to_string()))?;
        self.metrics.open.inc();
        self.metrics.opens.inc();
        let pool = TenantPool {
            pool,
            busy: AtomicUsize::new(0),
            last_used_ms: AtomicU64::new(0),
            epoch: self.epoch,
            metrics: self.metrics.clone(),
            idle: self.idle.clone(),
            stale: AtomicBool::new(false),
            database: db.database().to_owned(),
            _slot: slot,
        };
        pool.touch();
        Ok(Arc::new(pool))
    }

    /// A free slot for a new pool, evicting the least recently used idle pool while none is free.
    async fn slot(&self) -> Result<OwnedSemaphorePermit, Failure> {
        let deadline = Instant::now() + SLOT_WAIT;
        loop {
            if let Ok(permit) = self.slots.clone().try_acquire_owned() {
                return Ok(permit);
            }
            let became_idle = self.idle.notified();
            self.evict_least_recently_used_idle().await;
            tokio::select! {
                permit = self.slots.clone().acquire_owned() => {
                    return permit.map_err(|_| Failure::NoPoolSlot(SLOT_WAIT));
                }
                _ = became_idle => {}
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            if Instant::now() >= deadline {
                return Err(Failure::NoPoolSlot(SLOT_WAIT));
            }
        }
    }

    /// The idle pool used least recently, claimed for eviction.
    fn claim_least_recently_used_idle(&self) -> Option<Arc<String>> {
        let (key, pool) = self
            .cache
            .iter()
            .filter(|(_, pool)| pool.busy.load(Ordering::Acquire) == 0)
            .min_by_key(|(_, pool)| pool.last_used_ms.load(Ordering::Relaxed))?;
        let claimed = pool.claim_idle();
        if claimed {
            self.metrics.evictions.inc();
        }
        claimed.then_some(key)
    }

    async fn evict_least_recently_used_idle(&self) {
        if let Some(key) = self.claim_least_recently_used_idle() {
            self.cache.invalidate(key.as_str()).await;
        }
        self.cache.run_pending_tasks().await;
    }

    /// Open pools, as the gauge counts them.
    pub fn open_pools(&self) -> i64 {
        self.metrics.open.get()
    }

    /// Closes every pool; connections in use are closed when handed back.
    pub async fn close_all(&self) {
        let keys: Vec<Arc<String>> = self.cache.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.cache.invalidate(key.as_str()).await;
        }
        self.cache.run_pending_tasks().await;
    }
}

fn is_missing_database(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("3D000"))
}

fn is_already_created(e: &sqlx::Error) -> bool {
    // 42P04 duplicate_database; 23505 when two servers race on pg_database's unique index.
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("42P04" | "23505")))
}

async fn connect_once(options: &PgConnectOptions) -> Result<PgConnection, sqlx::Error> {
    tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(options))
        .await
        .unwrap_or(Err(sqlx::Error::PoolTimedOut))
}

/// A connection to the tenant database, creating the database first when it is missing and
/// `create` allows it.
pub async fn connect(db: &TenantDb, create: bool) -> Result<PgConnection, Failure> {
    match connect_once(db.options()).await {
        Ok(conn) => Ok(conn),
        Err(e) if is_missing_database(&e) => {
            if !create {
                return Err(Failure::NotProvisioned {
                    database: db.database().to_owned(),
                });
            }
            create_database(db).await?;
            connect_once(db.options())
                .await
                .map_err(|e| Failure::Unreachable(e.to_string()))
        }
        Err(e) => Err(Failure::Unreachable(e.to_string())),
    }
}

/// Quotes an identifier for SQL: the name may hold any character but NUL.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn create_database(db: &TenantDb) -> Result<(), Failure> {
    let mut admin = connect_once(&db.options().clone().database("postgres"))
        .await
        .map_err(|e| Failure::Unreachable(e.to_string()))?;
    let created = sqlx::query(&format!(
        "CREATE DATABASE {}",
        quote_identifier(db.database())
    ))
    .execute(&mut admin)
    .await;
    let _ = admin.close().await;
    match created {
        Ok(_) => {
            tracing::info!(database = db.database(), "created tenant database");
            Ok(())
        }
        Err(e) if is_already_created(&e) => Ok(()),
        Err(e) => Err(Failure::from(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_identifier("tenant_a"), "\"tenant_a\"");
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn the_schema_is_embedded() {
        assert!(migrator().iter().count() >= 1);
    }
}
