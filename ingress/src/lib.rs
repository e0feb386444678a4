//! avsync's ingress: verifies each AuthVital webhook and publishes it, byte for byte, to the
//! tenant's RabbitMQ partition; 202 only once the broker has confirmed it.
//!
//! Data flows one way: `http` (size, then `verify`, then the envelope) → `publish` → queue.
//! [`start`] builds and runs exactly what the binary runs, so tests start the real thing.

pub mod http;
pub(crate) mod jwks;
pub mod metrics;
pub(crate) mod publish;
pub mod server;
pub mod settings;
pub mod verify;
pub mod waiting;

use crate::http::AppState;
use crate::jwks::Jwks;
use crate::metrics::Metrics;
use crate::publish::Publisher;
use crate::server::Limits;
use crate::settings::Checked;
use crate::verify::{Clock, RsaKeys, SystemClock, Verifier};
use anyhow::Context as _;
use avsync_shared::admin;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A started ingress. `handle` ends once shutdown has finished every in-flight request and
/// closed the broker connection.
pub struct Running {
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub handle: JoinHandle<anyhow::Result<()>>,
}

/// What production fixes and tests may change: the clock that signature timestamps are checked
/// against, and the bound on reading a request body ([`http::BODY_READ_TIMEOUT`]).
#[derive(Clone)]
pub struct Tuning {
    pub clock: Arc<dyn Clock>,
    pub body_read_timeout: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            clock: Arc::new(SystemClock),
            body_read_timeout: http::BODY_READ_TIMEOUT,
        }
    }
}

impl std::fmt::Debug for Tuning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tuning")
            .field("body_read_timeout", &self.body_read_timeout)
            .finish_non_exhaustive()
    }
}

/// Binds both listeners and starts serving; the broker connection is made in the background,
/// so this returns even while the broker is down. Cancel `shutdown` to stop gracefully.
pub async fn start(checked: Checked, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let Checked {
        settings,
        hmac,
        jwks_url,
        topology,
        tuning,
    } = checked;
    server::reserve_descriptors(settings.max_http_connections)?;
    let registry = admin::new_registry();
    let metrics = Metrics::register(&registry).context("registering metrics")?;

    let public = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on AVSYNC_LISTEN={}", settings.listen))?;
    let private = TcpListener::bind(settings.common.metrics_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on AVSYNC_METRICS_LISTEN={}",
                settings.common.metrics_listen
            )
        })?;
    let addr = public.local_addr()?;
    let metrics_addr = private.local_addr()?;

    // The broker connection and the JWKS outlive the listeners: they stop only after the last
    // in-flight request has its answer.
    let publisher_stop = CancellationToken::new();
    let (publisher, supervisor) = Publisher::start(
        settings.common.amqp_url.clone(),
        topology.clone(),
        settings.publish_timeout,
        settings.max_pending_publishes,
        metrics.clone(),
        publisher_stop.clone(),
    );
    let jwks = match jwks_url {
        Some(url) => Some(Arc::new(
            Jwks::new(url, metrics.clone(), jwks::REFETCH_INTERVAL)
                .context("building the JWKS client")?,
        )),
        None => None,
    };
    let jwks_task = jwks
        .as_ref()
        .map(|j| j.keep_fresh(settings.jwks_refresh_interval, publisher_stop.clone()));
    // With secrets configured, HMAC requests can be verified before the JWKS loads.
    let needs_jwks = hmac.is_empty();
    let tolerance = i64::try_from(settings.timestamp_tolerance_secs).unwrap_or(i64::MAX);
    let verifier = Verifier::new(
        hmac,
        jwks.clone().map(|j| j as Arc<dyn RsaKeys>),
        tolerance,
        tuning.clock,
    );

    let ready_publisher = publisher.clone();
    let ready: admin::ReadyCheck = Arc::new(move || {
        ready_publisher.is_ready() && (!needs_jwks || jwks.as_ref().is_some_and(|j| j.has_keys()))
    });
    metrics::register_ready(&registry, ready.clone()).context("registering metrics")?;
    let connection_metrics = metrics.connections();
    let app = http::router(AppState {
        requests: Arc::new(tokio::sync::Semaphore::new(
            settings.max_concurrent_requests,
        )),
        verifier,
        publisher,
        metrics,
        max_body_bytes: settings.max_body_bytes,
        body_read_timeout: tuning.body_read_timeout,
    });
    let admin_app = admin::router(registry, ready);
    let public_limits = Limits {
        header_read_timeout: settings.header_read_timeout,
        max_connections: settings.max_http_connections,
        max_headers: settings.max_headers,
        max_header_bytes: settings.max_header_bytes,
    };
    let admin_limits = Limits {
        max_connections: server::ADMIN_MAX_CONNECTIONS,
        ..public_limits
    };

    tracing::info!(
        %addr,
        %metrics_addr,
        topology = topology.prefix(),
        partitions = topology.partitions(),
        "ingress listening"
    );
    let handle = tokio::spawn(async move {
        tokio::join!(
            server::serve(
                public,
                app,
                public_limits,
                Some(connection_metrics),
                shutdown.clone()
            ),
            server::serve(private, admin_app, admin_limits, None, shutdown),
        );
        publisher_stop.cancel();
        supervisor.handle.await.context("broker supervisor task")?;
        if let Some(task) = jwks_task {
            task.await.context("JWKS task")?;
        }
        tracing::info!("ingress stopped");
        Ok(())
    });
    Ok(Running {
        addr,
        metrics_addr,
        handle,
    })
}
