//! The avsync worker: consumes identity events from RabbitMQ and applies them to each tenant's
//! PostgreSQL database, order-insensitive and idempotent.
//!
//! Data flows one way:
//! `consume::session` (the broker: connect, declare, consume, reconnect) →
//! `consume::schedule` (each delivery's `fate`, decided once; batches per tenant, `batch`; the
//! tenant's `execute::standing` admits or sets aside) → `execute` (one executor for a batch and
//! a single event) → `tenant_db` (the one door to a tenant's session: `resolve`, `pools` within
//! each server's `budget`, `provision`) → `apply` (the event rules, one statement) → `settle`
//! (the message settles itself: ack, retry, set aside, dead letter, hand back; `acks` sends a
//! channel's acks in order, runs of them as one). What a failure
//! means is decided once, in `failure::decide`, fed what `execute::outage` probed. The operator
//! commands (`ops`: `dlq_cli`, `migrate`, `reconcile_cli` with `reconcile` and `authvital`, `status`) use
//! `tenant_db` and the broker directly.

pub(crate) mod acks;
pub mod apply;
pub mod cli;
pub(crate) mod consume;
pub mod dlq;
pub(crate) mod execute;
pub mod failure;
pub mod metrics;
pub mod ops;
pub(crate) mod retry;
pub mod settings;
pub(crate) mod settle;
pub mod tenant_db;

/// What only `avsync-tests` (the tests, the benchmark and the demo) reach inside the worker.
#[cfg(feature = "test-support")]
pub mod test_support {
    pub use crate::consume::depth::POLL_INTERVAL;
    pub use crate::retry::{publish_retry, History, Retry};
}

use crate::consume::depth::DepthPoller;
use crate::consume::schedule::tenant_bound;
use crate::consume::session::{self, Consuming};
use crate::execute::outage::Outage;
use crate::execute::standing::Standings;
use crate::execute::Applying;
use crate::metrics::Metrics;
use crate::settings::Checked;
use crate::tenant_db::pools::Pools;
use crate::tenant_db::resolve::{Resolver, TenantSource};
use crate::tenant_db::TenantDbs;
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
    worker: Arc<Consuming>,
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
        self.worker.applying.dbs.pools.open_pools()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.worker.metrics
    }
}

/// Starts the private listener and the consumer, exactly as the binary does. Needs neither the
/// broker nor PostgreSQL: it serves `/healthz` at once and connects in the background.
pub async fn start(checked: Checked, shutdown: CancellationToken) -> anyhow::Result<Running> {
    let registry = admin::new_registry();
    let metrics = Metrics::register_with_retry_delays(&registry, &checked.retry.delays)?;
    let listener = tokio::net::TcpListener::bind(checked.settings.common.metrics_listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on AVSYNC_METRICS_LISTEN={}",
                checked.settings.common.metrics_listen
            )
        })?;
    let metrics_addr = listener.local_addr()?;
    let Checked {
        settings,
        topology,
        tenants: source,
        retry,
        pools,
        reconcile,
    } = checked;
    let dbs = tenant_dbs(&source, &retry, pools, &settings, &metrics, &shutdown)?;
    let bound = tenant_bound(
        settings.tenant_max_unsettled,
        settings.prefetch,
        topology.partitions(),
    );
    let standings = Standings::new(
        bound,
        metrics.standings.marked_slow.clone(),
        metrics.standings.slow_now.clone(),
    );
    let worker = Arc::new(Consuming {
        topology,
        amqp_url: settings.common.amqp_url.clone(),
        prefetch: settings.prefetch,
        prefetch_bytes: settings.prefetch_bytes,
        application_id: settings.application_id.clone(),
        retry,
        metrics,
        ready: Arc::new(AtomicBool::new(false)),
        window: std::sync::Mutex::new(None),
        applying: Arc::new(Applying {
            dbs: Arc::new(dbs),
            standings,
            outage: Outage::default(),
        }),
    });
    tracing::info!(
        %metrics_addr,
        topology = worker.topology.prefix(),
        partitions = worker.topology.partitions(),
        "worker listening"
    );
    let tasks = Tasks::spawn(
        &worker,
        &settings,
        (listener, registry),
        reconcile,
        &shutdown,
    );
    let handle = tokio::spawn(tasks.until_stopped(worker.applying.dbs.clone(), shutdown));
    Ok(Running {
        metrics_addr,
        worker,
        handle,
    })
}

/// The tenant databases as the settings name them, with the connection budget per server.
fn tenant_dbs(
    source: &TenantSource,
    retry: &retry::RetryPolicy,
    pools: tenant_db::pools::PoolSettings,
    settings: &settings::Settings,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> anyhow::Result<TenantDbs> {
    let mut resolver = Resolver::new(source);
    if let Some(soonest) = retry.soonest_return() {
        resolver = resolver.unknown_for(soonest);
    }
    let pools = Pools::with_max_connections(
        pools,
        settings.max_connections,
        settings.pg_free_connections,
        metrics.tenant_pools.clone(),
    );
    if let TenantSource::Template(template) = source {
        // Template mode names one server: its connection series exist from the start.
        let any = TenantId::parse("x").context("a placeholder tenant id")?;
        pools.announce_server(&template.database(&any)?);
    }
    Ok(TenantDbs::new(resolver, pools, shutdown.clone()))
}

/// The worker's long-running tasks.
struct Tasks {
    admin: JoinHandle<std::io::Result<()>>,
    depth: JoinHandle<()>,
    reconcile: Option<JoinHandle<anyhow::Result<()>>>,
    consumer: JoinHandle<()>,
}

impl Tasks {
    /// Starts the private listener (`admin`, with its registry), the queue depth poller, the
    /// reconcile schedule when one is set, and the consumer.
    fn spawn(
        worker: &Arc<Consuming>,
        settings: &settings::Settings,
        (listener, registry): (tokio::net::TcpListener, prometheus::Registry),
        reconcile: Option<settings::ReconcileSchedule>,
        shutdown: &CancellationToken,
    ) -> Self {
        let ready = worker.ready.clone();
        let ready_check: admin::ReadyCheck = Arc::new(move || ready.load(Ordering::SeqCst));
        Tasks {
            admin: tokio::spawn(
                axum::serve(
                    listener,
                    admin::router(registry, ready_check).merge(ops::status::router(worker.clone())),
                )
                .with_graceful_shutdown(shutdown.clone().cancelled_owned())
                .into_future(),
            ),
            depth: tokio::spawn(
                DepthPoller {
                    amqp_url: settings.common.amqp_url.clone(),
                    topology: worker.topology.clone(),
                    tiers: worker.retry.tiers.clone(),
                    gauge: worker.metrics.queue_messages.clone(),
                }
                .run(shutdown.clone()),
            ),
            reconcile: reconcile.map(|schedule| {
                tokio::spawn(ops::reconcile_cli::schedule(
                    worker.applying.dbs.clone(),
                    worker.metrics.reconcile.clone(),
                    schedule,
                    settings.reconcile_max_left_percent,
                    shutdown.clone(),
                ))
            }),
            consumer: tokio::spawn(session::run(worker.clone(), shutdown.clone())),
        }
    }

    /// Waits for the consumer to finish after `shutdown` (at most [`DRAIN_LIMIT`] once it is
    /// asked to stop), then for the others, then closes the tenant databases.
    async fn until_stopped(
        mut self,
        dbs: Arc<TenantDbs>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let drain_limit = async {
            shutdown.cancelled().await;
            tokio::time::sleep(DRAIN_LIMIT).await;
        };
        tokio::select! {
            finished = &mut self.consumer => finished.context("consumer task panicked")?,
            _ = drain_limit => {
                self.consumer.abort();
                tracing::warn!(
                    limit = ?DRAIN_LIMIT,
                    "in-flight messages not finished within the drain limit; the broker hands them back"
                );
            }
        }
        self.depth.await.context("queue depth poller panicked")?;
        if let Some(reconcile) = self.reconcile {
            if let Err(e) = reconcile.await.context("reconcile schedule panicked")? {
                tracing::warn!(error = %format!("{e:#}"), "reconcile schedule stopped");
            }
        }
        dbs.close().await;
        self.admin
            .await
            .context("admin listener panicked")?
            .context("admin listener failed")?;
        tracing::info!("worker stopped");
        Ok(())
    }
}
