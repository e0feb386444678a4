//! PostgreSQL outage, the I/O half: whether a failure means that no tenant database can be
//! reached at all (rather than one tenant's database: dropped, not provisioned, or on a server
//! of its own), asked of the server itself, and how work waits out such an outage. What follows
//! from the answer is decided in [`crate::failure::decide`]; while any work is held, no tenant is
//! singled out as stalled.

use crate::failure::Failure;
use crate::tenant_db::resolve::{ProbeTarget, Resolver};
use avsync_shared::backoff::jittered;
use avsync_shared::TenantId;
use backon::BackoffBuilder;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Backoff between attempts while PostgreSQL cannot be reached at all.
const OUTAGE_MIN: Duration = Duration::from_secs(1);
const OUTAGE_MAX: Duration = Duration::from_secs(30);
/// How long one answer to "is PostgreSQL reachable at all?" is reused: a batch of failures asks
/// once, not once per message.
const PROBE_FRESH: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// One worker's view of an outage: its last probe and the messages it holds.
#[derive(Default)]
pub struct Outage {
    last_probe: tokio::sync::Mutex<Option<(Instant, bool)>>,
    holds: AtomicUsize,
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
    /// Whether `failure` means PostgreSQL cannot be reached at all. Only a connection-level
    /// failure can; then the resolver's server is asked (see [`Resolver::probe_target`]), at most
    /// once per [`PROBE_FRESH`].
    pub async fn confirms(
        &self,
        resolver: &Resolver,
        tenant: &TenantId,
        failure: &Failure,
    ) -> bool {
        if !failure.is_connection_level() {
            return false;
        }
        let mut last = self.last_probe.lock().await;
        if let Some((at, unreachable)) = *last {
            if at.elapsed() < PROBE_FRESH {
                return unreachable;
            }
        }
        let unreachable = match resolver.probe_target(tenant) {
            ProbeTarget::Nothing => false,
            ProbeTarget::Server(options) => server_unreachable(&options).await,
            // The registry itself failed: no tenant can be resolved.
            ProbeTarget::Registry(_) if matches!(failure, Failure::Registry(_)) => true,
            ProbeTarget::Registry(pool) => {
                let probe = sqlx::query("SELECT 1").execute(&pool);
                !matches!(tokio::time::timeout(PROBE_TIMEOUT, probe).await, Ok(Ok(_)))
            }
        };
        *last = Some((Instant::now(), unreachable));
        unreachable
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

/// Whether the server of `options` gives no answer: its maintenance database `postgres` is asked,
/// and any answer, even a refusal, means it is up.
async fn server_unreachable(options: &sqlx::postgres::PgConnectOptions) -> bool {
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
            false
        }
        // The server answered: a refused login, a missing database or "too many connections"
        // all mean it is up.
        Ok(Err(sqlx::Error::Database(_))) => false,
        _ => true,
    }
}
