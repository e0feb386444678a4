//! The avsync worker: consumes identity events from RabbitMQ and applies them to each tenant's
//! PostgreSQL database, order-insensitive and idempotent.
//!
//! Data flows: `session` (queue) → `fate` (what a delivery is) → `schedule` (batches per
//! tenant) → `tenants` (which database) → `pools` + `budget` (a connection) → `apply` (the event
//! rules) → `settle` (ack, retry, set aside, dead letter). `failure` decides what a failure means,
//! `outage` whether PostgreSQL as a whole is down.

pub mod apply;
pub mod authvital;
pub(crate) mod batch;
pub mod breaker;
pub(crate) mod budget;
pub mod cli;
pub mod depth;
pub mod dlq;
pub mod dlq_cli;
pub mod dlq_select;
pub mod dlq_summary;
pub mod failure;
pub(crate) mod fate;
pub mod metrics;
pub mod migrate;
pub(crate) mod outage;
pub mod pools;
pub(crate) mod progress;
pub mod provision;
pub mod reconcile;
pub mod reconcile_cli;
pub mod retry;
pub(crate) mod schedule;
pub(crate) mod session;
pub mod settings;
pub(crate) mod settle;
pub mod tenants;

use crate::breaker::Tenants;
use crate::depth::DepthPoller;
use crate::metrics::Metrics;
use crate::outage::Outage;
use crate::pools::Pools;
use crate::session::Worker;
use crate::settings::Checked;
use crate::tenants::{Resolver, TenantSource};
use anyhow::Context as _;
use avsync_shared::admin;
use avsync_shared::TenantId;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The longest a stopping worker spends finishing its in-flight messages; the deploy files give
/// it longer than this before they kill it. What is still unfinished then goes back to its
/// queue when the connection closes, and is applied again by another worker.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// A started worker: its private listener's address and the task that ends after shutdown.
pub struct Running {
    pub metrics_addr: SocketAddr,
    worker: Arc<Worker>,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Waits until the worker has stopped (after its shutdown token was cancelled).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.handle.await.context("worker task panicked")?
    }

    pub fn is_ready(&self) -> bool {
        self.worker.ready.load(Ordering::SeqCst)
    }

    /// Tenant pools open right now (the `avsync_worker_tenant_pools` gauge).
    pub fn open_pools(&self) -> i64 {
        self.worker.pools.open_pools()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.worker.metrics
    }
}

/// Starts the private listener and the consumer, exactly as the binary does. Needs neither the
/// broker nor PostgreSQL: it serves `/healthz` at once and connects in the background.
pub async fn start(checked: Checked, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let Checked {
        settings,
        topology,
        tenants: source,
        retry,
        pools,
        reconcile,
    } = checked;
    let registry = admin::new_registry();
    let metrics = Metrics::register_with_retry_delays(&registry, &retry.delays)?;
    let mut resolver = Resolver::new(&source);
    if let Some(soonest) = retry.soonest_return() {
        resolver = resolver.unknown_for(soonest);
    }
    let pools = Pools::with_max_connections(
        pools,
        settings.max_connections,
        metrics.tenant_pools.clone(),
    );
    if let TenantSource::Template(template) = &source {
        // Template mode names one server: its connection series exist from the start.
        let any = TenantId::parse("x").context("a placeholder tenant id")?;
        pools.announce_server(&template.database(&any)?);
    }
    let tenants = Tenants::new(
        schedule::tenant_bound(
            settings.tenant_max_unsettled,
            settings.prefetch,
            topology.partitions(),
        ),
        metrics.tenants_marked_slow.clone(),
        metrics.tenants_slow.clone(),
    );
    let ready = Arc::new(AtomicBool::new(false));
    let worker = Arc::new(Worker {
        topology,
        amqp_url: settings.common.amqp_url.clone(),
        prefetch: settings.prefetch,
        application_id: settings.application_id.clone(),
        resolver,
        pools,
        retry,
        metrics,
        ready: ready.clone(),
        tenants,
        outage: Outage::default(),
    });

    let listener = tokio::net::TcpListener::bind(settings.common.metrics_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on AVSYNC_METRICS_LISTEN={}",
                settings.common.metrics_listen
            )
        })?;
    let metrics_addr = listener.local_addr()?;
    tracing::info!(
        %metrics_addr,
        topology = worker.topology.prefix(),
        partitions = worker.topology.partitions(),
        "worker listening"
    );
    let ready_check: admin::ReadyCheck = Arc::new(move || ready.load(Ordering::SeqCst));
    let admin_server = tokio::spawn(
        axum::serve(listener, admin::router(registry, ready_check))
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .into_future(),
    );
    let depth = tokio::spawn(
        DepthPoller {
            amqp_url: settings.common.amqp_url.clone(),
            topology: worker.topology.clone(),
            retry_delays: worker.retry.delays.clone(),
            gauge: worker.metrics.queue_messages.clone(),
        }
        .run(shutdown.clone()),
    );
    let reconcile = reconcile.map(|schedule| {
        tokio::spawn(reconcile_cli::schedule(
            worker.clone(),
            schedule,
            settings.reconcile_max_left_percent,
            shutdown.clone(),
        ))
    });
    let mut consumer = tokio::spawn(session::run(worker.clone(), shutdown.clone()));
    let stopping = worker.clone();
    let handle = tokio::spawn(async move {
        let drain_limit = async {
            shutdown.cancelled().await;
            tokio::time::sleep(DRAIN_LIMIT).await;
        };
        tokio::select! {
            finished = &mut consumer => finished.context("consumer task panicked")?,
            _ = drain_limit => {
                consumer.abort();
                tracing::warn!(
                    limit = ?DRAIN_LIMIT,
                    "in-flight messages not finished within the drain limit; the broker hands them back"
                );
            }
        }
        depth.await.context("queue depth poller panicked")?;
        if let Some(reconcile) = reconcile {
            if let Err(e) = reconcile.await.context("reconcile schedule panicked")? {
                tracing::warn!(error = %format!("{e:#}"), "reconcile schedule stopped");
            }
        }
        stopping.pools.close_all().await;
        stopping.resolver.close().await;
        admin_server
            .await
            .context("admin listener panicked")?
            .context("admin listener failed")?;
        tracing::info!("worker stopped");
        Ok(())
    });
    Ok(Running {
        metrics_addr,
        worker,
        handle,
    })
}
