//! PostgreSQL outage: whether a failure means that no tenant database can be reached at all
//! (rather than one tenant's database: dropped, not provisioned, or on a server of its own), and
//! how a message waits out such an outage. Retrying through the tiers would only burn every
//! message's retries, so a message is held with backoff instead; while any is held, no tenant is
//! singled out as stalled.

use crate::failure::Failure;
use crate::tenants::{ProbeTarget, Resolver};
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
    /// failure can; then the resolver's server is asked (see [`Resolver::probe_target`]).
    pub async fn confirms(
        &self,
        resolver: &Resolver,
        tenant: &TenantId,
        failure: &Failure,
    ) -> bool {
        if !connection_level(failure) {
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

    /// Holds a message through its next wait; false when shutdown came first (it cannot be
    /// finished while the database is down, so it goes back to its queue).
    pub async fn hold(
        &self,
        backoff: &mut Backoff,
        failure: &Failure,
        shutdown: &CancellationToken,
    ) -> bool {
        let delay = backoff.next();
        tracing::warn!(error = %failure, retry_in = ?delay, "PostgreSQL unreachable; holding the message and backing off");
        self.holds.fetch_add(1, Ordering::AcqRel);
        let waited = tokio::select! {
            _ = tokio::time::sleep(delay) => true,
            _ = shutdown.cancelled() => false,
        };
        self.holds.fetch_sub(1, Ordering::AcqRel);
        waited
    }
}

/// The database server itself could not be reached or talked to, as opposed to a tenant
/// that is not provisioned, not registered or busy.
fn connection_level(failure: &Failure) -> bool {
    match failure {
        Failure::Unreachable(_) | Failure::Registry(_) | Failure::NoAnswer(_) => true,
        Failure::Database(e) => match e.as_ref() {
            // 08: connection exception; 57P0x: the server is shutting down or starting up.
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            _ => false,
        },
        _ => false,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn only_connection_level_failures_can_be_an_outage() {
        let refused = || {
            Arc::new(sqlx::Error::Io(
                std::io::ErrorKind::ConnectionRefused.into(),
            ))
        };
        assert!(connection_level(&Failure::Database(refused())));
        assert!(!connection_level(&Failure::TenantUnknown));
        assert!(!connection_level(&Failure::NotProvisioned {
            database: "tenant_a".into()
        }));
    }
}
