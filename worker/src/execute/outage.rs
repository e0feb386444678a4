//! PostgreSQL outage, the I/O half: whether a failure means that the tenant's server cannot be
//! reached (while others, and the registry, can), or that no tenant database can be reached at
//! all, asked of the servers themselves; and how work waits out a whole outage. What follows
//! from the answer is decided in [`crate::failure::decide`]; while any work is held, no tenant is
//! singled out as stalled.

use crate::failure::decide::Reach;
use crate::failure::Failure;
use crate::tenant_db::pools::server_of;
use crate::tenant_db::TenantDbs;
use avsync_shared::backoff::jittered;
use avsync_shared::TenantId;
use backon::BackoffBuilder;
use moka::future::Cache;
use sqlx::PgPool;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Backoff between attempts while PostgreSQL cannot be reached at all.
const OUTAGE_MIN: Duration = Duration::from_secs(1);
const OUTAGE_MAX: Duration = Duration::from_secs(30);
/// How long one server's answer to "do you answer at all?" is reused: a batch of failures asks
/// once, not once per message.
const PROBE_FRESH: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The key of the registry's answer beside the servers' `host:port` keys.
const REGISTRY: &str = "registry";

/// One worker's view of outages: each server's last answer, and the work it holds.
pub struct Outage {
    answers: Cache<String, bool>,
    holds: AtomicUsize,
}

impl Default for Outage {
    fn default() -> Self {
        Self {
            answers: Cache::builder()
                .time_to_live(PROBE_FRESH)
                .max_capacity(10_000)
                .build(),
            holds: AtomicUsize::new(0),
        }
    }
}

/// The waits of one held message, growing with jitter to [`OUTAGE_MAX`].
#[derive(Default)]
pub struct Backoff(Option<Box<dyn Iterator<Item = Duration> + Send>>);

impl Backoff {
    fn next(&mut self) -> Duration {
        self.0
            .get_or_insert_with(|| {
                Box::new(BackoffBuilder::build(jittered(OUTAGE_MIN, OUTAGE_MAX)))
            })
            .next()
            .unwrap_or(OUTAGE_MAX)
    }
}

impl Outage {
    /// Whether the PostgreSQL behind `tenant`'s `failure` answers. Only a connection-level
    /// failure can mean it does not; then `tenant`'s own server is asked, and when it does not
    /// answer, the registry (in registry mode): tenants on other servers may still be reached.
    /// Each is asked at most once per [`PROBE_FRESH`], and what a server answered shows in its
    /// `avsync_worker_server_reachable` series.
    pub async fn reach(&self, dbs: &TenantDbs, tenant: &TenantId, failure: &Failure) -> Reach {
        if !failure.is_connection_level() {
            return Reach::Answers;
        }
        // The registry itself failed: no tenant can be resolved.
        if matches!(failure, Failure::Registry(_)) {
            return Reach::AllDown;
        }
        let Ok(db) = dbs.resolver.resolve(tenant).await else {
            return Reach::Answers;
        };
        let server = server_of(&db);
        let options = db.options().clone();
        let answers = self
            .answers
            .get_with(
                server.clone(),
                async move { server_answers(&options).await },
            )
            .await;
        dbs.pools.server_reachable(&server, answers);
        if answers {
            return Reach::Answers;
        }
        let Some(registry) = dbs.resolver.registry().cloned() else {
            // Template mode: every tenant lives on this one server.
            return Reach::AllDown;
        };
        let registry_answers = self
            .answers
            .get_with(REGISTRY.to_owned(), async move {
                registry_answers(&registry).await
            })
            .await;
        if registry_answers {
            Reach::ServerDown
        } else {
            Reach::AllDown
        }
    }

    /// Work held for a whole outage right now (each a batch or one event).
    pub fn held(&self) -> usize {
        self.holds.load(Ordering::Acquire)
    }

    /// No message is held for an outage right now.
    pub fn calm(&self) -> bool {
        self.holds.load(Ordering::Acquire) == 0
    }

    /// Holds work through its next wait; false when shutdown came first (it cannot be finished
    /// while the database is down, so it goes back to its queue).
    pub async fn hold(
        &self,
        backoff: &mut Backoff,
        failure: &Failure,
        shutdown: &CancellationToken,
    ) -> bool {
        let delay = backoff.next();
        tracing::warn!(error = %failure, retry_in = ?delay, "PostgreSQL unreachable; holding the work and backing off");
        self.holds.fetch_add(1, Ordering::AcqRel);
        let waited = tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = shutdown.cancelled() => false,
        };
        self.holds.fetch_sub(1, Ordering::AcqRel);
        waited
    }
}

async fn registry_answers(registry: &PgPool) -> bool {
    let probe = sqlx::query("SELECT 1").execute(registry);
    matches!(tokio::time::timeout(PROBE_TIMEOUT, probe).await, Ok(Ok(_)))
}

/// Whether the server of `options` answers: its maintenance database `postgres` is asked, and
/// any answer but "starting up" or "shutting down", even a refusal, means it is up.
async fn server_answers(options: &sqlx::postgres::PgConnectOptions) -> bool {
    use sqlx::Connection as _;
    let maintenance = options.clone().database("postgres");
    match tokio::time::timeout(
        PROBE_TIMEOUT,
        sqlx::PgConnection::connect_with(&maintenance),
    )
    .await
    {
        Ok(Ok(conn)) => {
            let _ = conn.close().await;
            true
        }
        // Starting up or shutting down (57P03): it gives no session to anyone for a while.
        Ok(Err(sqlx::Error::Database(db))) if db.code().as_deref() == Some("57P03") => false,
        // The server answered: a refused login, a missing database or "too many connections"
        // all mean it is up.
        Ok(Err(sqlx::Error::Database(_))) => true,
        _ => false,
    }
}
