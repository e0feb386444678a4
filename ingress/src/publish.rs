//! The broker side: one long-lived connection with one confirming channel, shared by every
//! request. A request gets its 202 only after the broker confirmed its own message.
//!
//! A publish that the channel could not get confirmed (a nack, a lost channel or connection) is
//! sent again on the channel that replaces it, within the publish timeout: the broker did not
//! take it, and a copy that it did take after all is one more delivery of an idempotent event.
//! A channel closed under a live connection (the shared publisher closes one that nacks or
//! stalls) is replaced on that connection at once; a lost connection moves on to the next node.

use crate::metrics::Metrics;
use avsync_shared::backoff::jittered;
use avsync_shared::broker::headers::{long, EVENT_TYPE_HEADER, PERSISTENT, TENANT_HEADER};
use avsync_shared::broker::{self, ConfirmedPublisher, FailureLog, CONNECT_TIMEOUT};
use avsync_shared::{Envelope, Topology};
use backon::Retryable;
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Connection};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
/// How often the supervisor looks at the connection's state.
const HEALTH_POLL: Duration = Duration::from_millis(200);
/// A request that finds no healthy channel within this long after there was one waits for the
/// replacement (a channel reopened, a connection moved to the next node: tens of milliseconds)
/// rather than answering 503; without a channel for longer, it answers 503 at once.
const RECONNECT_GRACE: Duration = Duration::from_secs(2);
/// Least time between two channel replacements: right after a quorum queue's leader changed, a
/// few fresh channels in a row may still be refused, and a broker that keeps refusing (a length
/// limit someone set) must not be sent a new channel in a tight loop.
const REPLACE_EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("not connected to the broker; reconnecting in the background")]
    NotConnected,
    #[error("the broker did not confirm the message within {0:?}")]
    Timeout(Duration),
    /// The sender is told this much; what lapin said is logged (see [`PublishError::cause`]).
    #[error("the broker connection failed")]
    Broker(#[source] broker::PublishError),
    #[error("the broker refused the message (nack or unroutable)")]
    Rejected(#[source] broker::PublishError),
    #[error(
        "{0} webhooks are already waiting for the broker's confirm (AVSYNC_MAX_PENDING_PUBLISHES)"
    )]
    Overloaded(usize),
}

impl From<broker::PublishError> for PublishError {
    fn from(e: broker::PublishError) -> Self {
        match e {
            broker::PublishError::Broker(_) | broker::PublishError::Stopped => Self::Broker(e),
            broker::PublishError::Nacked | broker::PublishError::Unroutable(_) => Self::Rejected(e),
        }
    }
}

impl PublishError {
    /// The `error` code of the 503 body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotConnected | Self::Broker(_) => "broker_unavailable",
            Self::Timeout(_) => "publish_timeout",
            Self::Rejected(_) => "publish_rejected",
            Self::Overloaded(_) => "overloaded",
        }
    }

    /// What the broker or lapin said, for the log only.
    pub fn cause(&self) -> Option<String> {
        std::error::Error::source(self).map(ToString::to_string)
    }
}

#[derive(Clone)]
struct Link {
    connection: Arc<Connection>,
    publisher: ConfirmedPublisher,
}

impl Link {
    fn same(&self, other: &Link) -> bool {
        Arc::ptr_eq(&self.connection, &other.connection)
            && self.publisher.channel().id() == other.publisher.channel().id()
    }

    fn healthy(&self) -> bool {
        let channel = self.publisher.channel();
        self.connection.status().connected()
            && channel.status().connected()
            && channel.status().confirm()
    }
}

struct Inner {
    topology: Topology,
    timeout: Duration,
    metrics: Metrics,
    link: RwLock<Option<Link>>,
    /// When the supervisor last saw a healthy link.
    last_healthy: RwLock<Option<Instant>>,
    /// Wakes the publishes waiting for a new link.
    replaced: Notify,
    /// A publish failed on the current link: the supervisor looks at it now.
    suspect: Notify,
    redeclare: Notify,
    /// One permit per webhook waiting for its confirm, so that a slow broker makes the ingress
    /// answer 503 instead of holding ever more bodies.
    pending: Semaphore,
    max_pending: usize,
}

impl Inner {
    fn current(&self) -> Option<Link> {
        self.link
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|l| l.healthy())
            .cloned()
    }

    fn set(&self, link: Option<Link>) {
        let replaced = link.is_some();
        *self.link.write().unwrap_or_else(|e| e.into_inner()) = link;
        if replaced {
            self.saw_healthy();
            self.replaced.notify_waiters();
        }
    }

    fn saw_healthy(&self) {
        *self.last_healthy.write().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// A healthy link now, or, within [`RECONNECT_GRACE`] of the last one, the one replacing it.
    async fn usable(&self) -> Option<Link> {
        let replaced = self.replaced.notified();
        if let Some(link) = self.current() {
            return Some(link);
        }
        let last = (*self.last_healthy.read().unwrap_or_else(|e| e.into_inner()))?;
        let until = tokio::time::Instant::from_std(last + RECONNECT_GRACE);
        tokio::pin!(replaced);
        loop {
            tokio::select! {
                _ = &mut replaced => {}
                _ = tokio::time::sleep_until(until) => return None,
            }
            replaced.set(self.replaced.notified());
            if let Some(link) = self.current() {
                return Some(link);
            }
        }
    }

    /// The first healthy link other than `failed`, however long that takes (callers bound it).
    async fn next_link(&self, failed: &Link) -> Link {
        loop {
            let replaced = self.replaced.notified();
            if let Some(link) = self.current().filter(|l| !l.same(failed)) {
                return link;
            }
            replaced.await;
        }
    }
}

#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

/// Stops the background connection when cancelled; the returned handle ends after it closed.
pub struct Supervisor {
    pub handle: JoinHandle<()>,
}

impl Publisher {
    /// Starts the background task that connects, declares the topology and reconnects with
    /// backoff whenever the connection drops, until `stop` is cancelled.
    pub fn start(
        amqp_url: String,
        topology: Topology,
        timeout: Duration,
        max_pending: usize,
        metrics: Metrics,
        stop: CancellationToken,
    ) -> (Self, Supervisor) {
        let inner = Arc::new(Inner {
            topology,
            timeout,
            metrics,
            link: RwLock::new(None),
            last_healthy: RwLock::new(None),
            replaced: Notify::new(),
            suspect: Notify::new(),
            redeclare: Notify::new(),
            pending: Semaphore::new(max_pending),
            max_pending,
        });
        let handle = tokio::spawn(supervise(inner.clone(), amqp_url, stop));
        (Self { inner }, Supervisor { handle })
    }

    /// True while a confirming channel is open.
    pub fn is_ready(&self) -> bool {
        self.inner.current().is_some()
    }

    /// Publishes the body verbatim to the tenant's partition and waits for this message's
    /// confirm, at most the publish timeout; refuses at once while `max_pending` others wait.
    pub async fn publish(&self, envelope: &Envelope, body: &[u8]) -> Result<(), PublishError> {
        let Ok(_pending) = self.inner.pending.try_acquire() else {
            return Err(PublishError::Overloaded(self.inner.max_pending));
        };
        let _counted = self.inner.metrics.pending_publish();
        let started = Instant::now();
        let result =
            tokio::time::timeout(self.inner.timeout, self.publish_confirmed(envelope, body))
                .await
                .unwrap_or(Err(PublishError::Timeout(self.inner.timeout)));
        self.inner
            .metrics
            .publish_seconds(started.elapsed().as_secs_f64());
        if matches!(
            result,
            Err(PublishError::Rejected(broker::PublishError::Unroutable(_)))
        ) {
            self.inner.redeclare.notify_one();
        }
        result
    }

    async fn publish_confirmed(
        &self,
        envelope: &Envelope,
        body: &[u8],
    ) -> Result<(), PublishError> {
        let mut link = self
            .inner
            .usable()
            .await
            .ok_or(PublishError::NotConnected)?;
        let topology = &self.inner.topology;
        let routing_key = Topology::routing_key(topology.partition_of(&envelope.tenant_id));
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from(TENANT_HEADER),
            long(envelope.tenant_id.as_str()),
        );
        headers.insert(
            ShortString::from(EVENT_TYPE_HEADER),
            long(envelope.event_type.as_str()),
        );
        let properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type("application/json".into())
            .with_message_id(envelope.id.as_str().into())
            .with_headers(headers);
        let exchange = topology.events_exchange();
        loop {
            match link
                .publisher
                .publish(&exchange, &routing_key, body, properties.clone())
                .await
            {
                Ok(()) => return Ok(()),
                Err(e @ broker::PublishError::Unroutable(_)) => return Err(e.into()),
                Err(e) => {
                    tracing::debug!(error = %e, "publish not confirmed; sending it again on the next channel");
                    self.inner.suspect.notify_one();
                    link = self.inner.next_link(&link).await;
                }
            }
        }
    }
}

async fn supervise(inner: Arc<Inner>, amqp_url: String, stop: CancellationToken) {
    let backoff = jittered(Duration::from_millis(200), Duration::from_secs(5));
    let mut failures = FailureLog::default();
    let mut first = true;
    loop {
        let declare_first = std::mem::replace(&mut first, false);
        let connect = (|| connect(&amqp_url, &inner.topology, declare_first))
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .notify(|e: &lapin::Error, wait: Duration| {
                failures.failed("cannot reach the broker", e, wait);
            });
        let mut link = tokio::select! {
            _ = stop.cancelled() => return,
            link = connect => match link {
                Ok(link) => link,
                Err(e) => {
                    tracing::error!(error = %e, "gave up connecting to the broker");
                    return;
                }
            },
        };
        failures.connected();
        let mut last_replaced = tokio::time::Instant::now();
        inner.set(Some(link.clone()));
        // A declaration belongs to the connection it runs on: it is aborted when that connection
        // ends, so that the next connection's own declaration is never skipped behind it.
        let mut declaring =
            (!declare_first).then(|| declare_beside(&link.connection, &inner.topology));
        tracing::info!(
            topology = inner.topology.prefix(),
            "connected to the broker; publishing"
        );
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    inner.set(None);
                    if let Some(declaring) = declaring.take() {
                        declaring.abort();
                    }
                    let _ = tokio::time::timeout(
                        CONNECT_TIMEOUT,
                        link.connection.close(200, "ingress shutting down".into()),
                    )
                    .await;
                    tracing::info!("broker connection closed");
                    return;
                }
                _ = inner.redeclare.notified() => {
                    if declaring.as_ref().is_none_or(JoinHandle::is_finished) {
                        declaring = Some(declare_beside(&link.connection, &inner.topology));
                    }
                }
                _ = inner.suspect.notified() => {}
                _ = tokio::time::sleep(HEALTH_POLL) => {}
            }
            if link.healthy() {
                inner.saw_healthy();
                continue;
            }
            tokio::time::sleep_until(last_replaced + REPLACE_EVERY).await;
            last_replaced = tokio::time::Instant::now();
            match replace_channel(&link).await {
                Some(replaced) => {
                    tracing::info!("replaced the publishing channel");
                    link = replaced;
                    inner.set(Some(link.clone()));
                }
                None => break,
            }
        }
        inner.set(None);
        if let Some(declaring) = declaring {
            declaring.abort();
        }
        tracing::warn!("lost the broker connection; reconnecting");
        // Closing also frees the server side when only the channel died.
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            link.connection.close(200, "reconnecting".into()),
        )
        .await;
    }
}

/// Declares the topology again on a channel of its own. Publishing never waits for it: on a
/// cluster that just lost a node, declaring an existing quorum queue asks its leader for its
/// counts, which may wait while leaders move, and a channel to publish on is all a reconnect
/// needs (the topology outlives connections; a return says when it did not, and asks for this
/// again).
fn declare_beside(connection: &Arc<Connection>, topology: &Topology) -> JoinHandle<()> {
    let (connection, topology) = (connection.clone(), topology.clone());
    tokio::spawn(async move {
        let declare = async {
            let channel = connection.create_channel().await?;
            topology.declare(&channel).await?;
            channel.close(200, "declared".into()).await
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, declare).await {
            Ok(Ok(())) => tracing::debug!("declared the topology again"),
            Ok(Err(e)) => tracing::warn!(error = %e, "re-declaring the topology failed"),
            Err(_) => {
                tracing::warn!("re-declaring the topology took over {CONNECT_TIMEOUT:?}; given up")
            }
        }
    })
}

/// A new confirming channel on `link`'s connection, while that connection is open.
async fn replace_channel(link: &Link) -> Option<Link> {
    if !link.connection.status().connected() {
        return None;
    }
    let open = async { ConfirmedPublisher::open(link.connection.create_channel().await?).await };
    match tokio::time::timeout(CONNECT_TIMEOUT, open).await {
        Ok(Ok(publisher)) => Some(Link {
            connection: link.connection.clone(),
            publisher,
        }),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot open a new publishing channel; reconnecting");
            None
        }
        Err(_) => {
            tracing::warn!("no new publishing channel within {CONNECT_TIMEOUT:?}; reconnecting");
            None
        }
    }
}

/// A connection with a confirming channel; on the first connection the topology is declared
/// before the ingress is ready, so that a publish finds its queue.
async fn connect(amqp_url: &str, topology: &Topology, declare: bool) -> Result<Link, lapin::Error> {
    let name = format!("avsync-ingress@{}", topology.prefix());
    let connection = broker::connect(amqp_url, &name).await?;
    let attempt = async {
        let publisher = ConfirmedPublisher::open(connection.create_channel().await?).await?;
        if declare {
            topology.declare(publisher.channel()).await?;
        }
        Ok::<_, lapin::Error>(publisher)
    };
    let publisher = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(opened) => opened?,
        Err(_) => {
            return Err(lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "opening a publishing channel (and declaring the topology) timed out",
            )))
        }
    };
    Ok(Link {
        connection: Arc::new(connection),
        publisher,
    })
}
