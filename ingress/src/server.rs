//! Serves a router over HTTP/1.1 with hyper directly, because `axum::serve` bounds nothing at the
//! connection level: a client that opens a connection and never finishes its request line would
//! hold a descriptor for ever, and enough of them would leave none for AuthVital's deliveries.
//!
//! Per listener: at most `max_connections` open at once. When all are taken, a new connection
//! takes the place of the one that has waited longest for its request head (see [`waiting`]);
//! only when every connection is busy with a request is the new one closed as soon as it is
//! accepted. The request line and headers must arrive within `header_read_timeout`, which hyper
//! also starts whenever a keep-alive connection waits for its next request, so it is the idle
//! timeout too; at most `max_headers` headers of `max_header_bytes` in all (431 beyond).
//!
//! [`waiting`]: crate::waiting
//!
//! Shutdown, as a sender sees it: for [`DRAIN_GRACE`] after the signal the listener still
//! accepts and idle connections stay open, so a request already on its way is answered rather
//! than reset; every answer from the signal on carries `Connection: close`; then the listener
//! closes, connections waiting for a request head (idle or stalled) are closed, and the rest
//! close after their current answer.

use crate::waiting::{Place, Waiting, Watched};
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus::{IntCounter, IntGauge};
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// How long after the shutdown signal a request already on its way is still taken: a round trip
/// on any network a webhook crosses is far shorter.
pub const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// Connections the private listener (metrics, probes) holds at most: Prometheus and the kubelet.
pub const ADMIN_MAX_CONNECTIONS: usize = 16;
/// Descriptors besides the connections: stdio, both listeners, the runtime's epoll and wakers,
/// the broker connection, the JWKS client's pool, and headroom for a connection being accepted
/// and closed again.
pub const RESERVED_DESCRIPTORS: u64 = 64;
/// After a failed accept (for instance out of descriptors) the loop waits this long instead of
/// spinning on the error.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);
/// Longest wait for a connection told to make room to give its slot back; it only has to be
/// polled once, so this is reached only on a stalled runtime.
const MAKE_ROOM_WAIT: Duration = Duration::from_secs(1);

/// The connection-level bounds of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
    pub max_headers: usize,
    pub max_header_bytes: usize,
}

/// What the public listener reports; the private one reports nothing.
#[derive(Clone)]
pub struct ConnectionMetrics {
    pub open: IntGauge,
    pub refused: IntCounter,
    /// Connections closed, while they waited for a request head, to make room for a new one.
    pub evicted: IntCounter,
    /// Connections waiting for a request head now.
    pub waiting: IntGauge,
}

#[derive(Debug, thiserror::Error)]
#[error("AVSYNC_MAX_HTTP_CONNECTIONS needs {needed} file descriptors but the process may open only {allowed}; raise `ulimit -n` (the hard limit) or lower AVSYNC_MAX_HTTP_CONNECTIONS")]
pub struct DescriptorShortage {
    pub needed: u64,
    pub allowed: u64,
}

/// Makes sure the process may open a descriptor for every connection both listeners may hold,
/// plus [`RESERVED_DESCRIPTORS`]: raises the soft limit up to the hard one where needed, and
/// refuses to start when even the hard limit is too low, rather than failing accepts later.
pub fn reserve_descriptors(max_connections: usize) -> Result<u64, DescriptorShortage> {
    let needed = u64::try_from(max_connections + ADMIN_MAX_CONNECTIONS)
        .unwrap_or(u64::MAX)
        .saturating_add(RESERVED_DESCRIPTORS);
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_none_or(|soft| soft >= needed) {
        return Ok(needed);
    }
    if limit.maximum.is_some_and(|hard| hard < needed) {
        return Err(DescriptorShortage {
            needed,
            allowed: limit.maximum.unwrap_or(needed),
        });
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(needed),
            maximum: limit.maximum,
        },
    )
    .map_err(|_| DescriptorShortage {
        needed,
        allowed: limit.current.unwrap_or(0),
    })?;
    Ok(needed)
}

/// Serves `app` on `listener` under `limits` until `shutdown`, then drains as the module says;
/// returns once every connection is closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    metrics: Option<ConnectionMetrics>,
    shutdown: CancellationToken,
) {
    let app = app.layer(middleware::from_fn_with_state(
        shutdown.clone(),
        close_when_draining,
    ));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers)
        .max_header_size(limits.max_header_bytes)
        .keep_alive(true);
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let waiting = Arc::new(match &metrics {
        Some(m) => Waiting::reported_by(m.waiting.clone()),
        None => Waiting::default(),
    });
    let stop_accepting = async {
        shutdown.cancelled().await;
        tokio::time::sleep(DRAIN_GRACE).await;
    };
    tokio::pin!(stop_accepting);
    loop {
        let stream = tokio::select! {
            _ = &mut stop_accepting => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                    continue;
                }
            },
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => match make_room(&slots, &waiting, metrics.as_ref()).await {
                Some(slot) => slot,
                None => {
                    // Closing at once costs the descriptor for microseconds; holding it is the
                    // attack.
                    if let Some(m) = &metrics {
                        m.refused.inc();
                    }
                    drop(stream);
                    continue;
                }
            },
        };
        let place = Place::new(waiting.clone());
        let make_room = place.closing();
        let service = Watched::new(TowerToHyperService::new(app.clone()), place.clone());
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let draining = shutdown.clone();
        let open = metrics.as_ref().map(|m| m.open.clone());
        tokio::spawn(async move {
            if let Some(open) = &open {
                open.inc();
            }
            tokio::pin!(connection);
            // The connection first: an answer it is writing is written before a signal counts.
            let finished = tokio::select! {
                biased;
                _ = connection.as_mut() => true,
                // Dropping the connection closes it, with no answer: it had no request.
                () = make_room.cancelled() => true,
                () = draining.cancelled() => false,
            };
            if !finished {
                tokio::select! {
                    biased;
                    _ = connection.as_mut() => {}
                    () = make_room.cancelled() => {}
                    _ = tokio::time::sleep(DRAIN_GRACE) => {
                        // One still waiting for a request head has nothing to finish: hyper's
                        // graceful shutdown would keep it until the header read timeout.
                        if !place.is_waiting() {
                            connection.as_mut().graceful_shutdown();
                            let _ = connection.await;
                        }
                    }
                }
            }
            place.end();
            if let Some(open) = &open {
                open.dec();
            }
            drop(slot);
        });
    }
    drop(listener);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
}

/// When every slot is taken: tells the connection that has waited longest for its request head
/// to close and takes its slot. None when no connection waits (every one is busy with a request).
async fn make_room(
    slots: &Arc<Semaphore>,
    waiting: &Waiting,
    metrics: Option<&ConnectionMetrics>,
) -> Option<OwnedSemaphorePermit> {
    if !waiting.close_oldest() {
        return None;
    }
    if let Some(m) = metrics {
        m.evicted.inc();
    }
    tokio::time::timeout(MAKE_ROOM_WAIT, slots.clone().acquire_owned())
        .await
        .ok()?
        .ok()
}

/// From the shutdown signal on, every answer tells the client not to send another request on
/// its connection, so that keep-alive connections end right after their current answer.
async fn close_when_draining(
    axum::extract::State(shutdown): axum::extract::State<CancellationToken>,
    request: Request,
    next: Next,
) -> Response {
    let mut response = next.run(request).await;
    if shutdown.is_cancelled() {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_budget_counts_both_listeners_and_the_reserve() {
        let needed = reserve_descriptors(100).unwrap();
        assert_eq!(
            needed,
            100 + ADMIN_MAX_CONNECTIONS as u64 + RESERVED_DESCRIPTORS
        );
        let soft = getrlimit(Resource::Nofile).current;
        assert!(soft.is_none_or(|s| s >= needed));
    }

    #[test]
    fn more_connections_than_the_hard_limit_is_refused_with_both_numbers() {
        let Some(hard) = getrlimit(Resource::Nofile).maximum else {
            return;
        };
        let err = reserve_descriptors(usize::try_from(hard).unwrap()).unwrap_err();
        assert!(err.needed > hard);
        assert_eq!(err.allowed, hard);
        assert!(err.to_string().contains("AVSYNC_MAX_HTTP_CONNECTIONS"));
    }
}
