//! Tenant databases: which database a tenant's events go to (`resolve`), the sessions to them
//! (`pools`, within each server's `budget`), and the databases themselves: session options,
//! creation, migration (`provision`).
//!
//! One door, [`TenantDbs::connection`], returns a session of a tenant's database or a typed
//! failure. It owns the lease on the tenant's pool, the wait for room in the server's budget and
//! the backoff while the server refuses connections for lack of slots: none of them is ever an
//! attempt (contract section 7). A statement that finds the tenant's tables gone is answered by
//! [`TenantConnection::apply`], which has the database migrated again by its next session.

pub(crate) mod budget;
pub mod pools;
pub mod provision;
pub mod resolve;
pub mod sizing;

use crate::apply;
use crate::failure::decide::{decide, Seen, Step};
use crate::failure::Failure;
use avsync_shared::backoff::jittered;
use avsync_shared::event::Effect;
use avsync_shared::TenantId;
use backon::BackoffBuilder;
use pools::{Lease, PooledConnection, Pools};
use resolve::{Resolver, TenantDb};
use sqlx::Connection as _;
use std::ops::{Deref, DerefMut};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Backoff between connection attempts while a server refuses them for lack of slots.
const REFUSAL_MIN: Duration = Duration::from_millis(100);
const REFUSAL_MAX: Duration = Duration::from_secs(5);

/// Every tenant database this worker reaches, and how.
pub(crate) struct TenantDbs {
    pub resolver: Resolver,
    pub pools: Pools,
    /// The worker's: a wait for a connection ends when it stops.
    shutdown: CancellationToken,
}

/// A session of one tenant's database, with the lease that keeps its pool open while it is used.
pub(crate) struct TenantConnection {
    conn: PooledConnection,
    _lease: Lease,
}

impl Deref for TenantConnection {
    type Target = sqlx::PgConnection;
    fn deref(&self) -> &sqlx::PgConnection {
        &self.conn
    }
}

impl DerefMut for TenantConnection {
    fn deref_mut(&mut self) -> &mut sqlx::PgConnection {
        &mut self.conn
    }
}

impl TenantConnection {
    /// Applies `effects` in one statement and gives the session back for more. When the
    /// statement finds the tenant's tables gone (its database recreated under the worker), this
    /// session and its pool's idle ones are closed and the database is no longer known migrated,
    /// so that the next session migrates.
    pub async fn apply<'a>(
        mut self,
        effects: impl IntoIterator<Item = &'a Effect>,
    ) -> Result<TenantConnection, Failure> {
        match apply::apply_batch(&mut self.conn, effects).await {
            Ok(()) => {
                // A batch of hundreds of events grows the session's buffers to its size, and sqlx
                // keeps them: held idle by every session of the budget, that was some 0.3 MB of
                // the worker's memory a session (75 sessions at 50 tenants). After every batch, not
                // only when the session goes back to its pool: under a backlog every session of the
                // budget is in a warm turn of up to a second at once, and the next batch grows them
                // again for a fraction of what it costs PostgreSQL to apply it.
                self.conn.shrink_buffers();
                Ok(self)
            }
            Err(e) => {
                let failure = Failure::from(e);
                if failure.is_schema_missing() {
                    tracing::warn!(error = %failure, "the tenant schema is gone (database recreated?); migrating it again");
                    let TenantConnection { conn, _lease } = self;
                    conn.schema_missing();
                }
                Err(failure)
            }
        }
    }
}

impl TenantDbs {
    pub fn new(resolver: Resolver, pools: Pools, shutdown: CancellationToken) -> Self {
        Self {
            resolver,
            pools,
            shutdown,
        }
    }

    /// The worker's shutdown, which ends every wait for a connection.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// How many sessions this worker may hold now, over every server it has used.
    pub fn budget(&self) -> usize {
        self.pools.budget()
    }

    /// A session of `tenant`'s database.
    pub async fn connection(&self, tenant: &TenantId) -> Result<TenantConnection, Failure> {
        let db = self.resolver.resolve(tenant).await?;
        self.connection_to(&db).await
    }

    /// A session of `db`, waiting for as long as its server's budget or slots make it.
    pub async fn connection_to(&self, db: &TenantDb) -> Result<TenantConnection, Failure> {
        let mut refused: Option<Box<dyn Iterator<Item = Duration> + Send>> = None;
        loop {
            let lease = self.pools.lease(db).await?;
            let failure = match self.pools.connection(&lease).await {
                Ok(conn) => {
                    return Ok(TenantConnection {
                        conn,
                        _lease: lease,
                    })
                }
                Err(failure) => failure,
            };
            let seen = Seen {
                budget_contended: lease.budget_contended(),
                stopping: self.shutdown.is_cancelled(),
                ..Seen::default()
            };
            match decide(&failure, seen) {
                Step::WaitForSlot => {
                    tracing::debug!("the connection budget is contended; the work keeps waiting");
                }
                Step::BackOff => {
                    let delay = refused
                        .get_or_insert_with(|| Box::new(jittered(REFUSAL_MIN, REFUSAL_MAX).build()))
                        .next()
                        .unwrap_or(REFUSAL_MAX);
                    tracing::info!(error = %failure, retry_in = ?delay, "no connection slot on the server; the work waits");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.cancelled() => return Err(failure),
                    }
                }
                _ => return Err(failure),
            }
        }
    }

    /// Closes every pool and the registry's connections.
    pub async fn close(&self) {
        self.pools.close_all().await;
        self.resolver.close().await;
    }
}
