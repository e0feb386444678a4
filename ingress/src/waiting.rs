//! The connections of a listener that wait for a request head, oldest first, so that a full
//! listener closes the one that has waited longest rather than refusing a newcomer: a stalled
//! connection (a slowloris) would otherwise keep its slot until the header read timeout, and
//! enough of them keep every sender out, while a sender that is still there sends its head at
//! once and stops waiting within a round trip.
//!
//! A connection waits from its accept until its first request head has arrived, and again from
//! the end of each answer until its next head (an idle keep-alive connection). While a request is
//! read, verified, published and answered it does not wait, and is never closed to make room.

use hyper::body::{Body, Frame, SizeHint};
use hyper::{Request, Response};
use prometheus::IntGauge;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use tokio_util::sync::CancellationToken;

/// The waiting connections of one listener, by the order in which they began to wait.
#[derive(Default)]
pub struct Waiting {
    queue: Mutex<Queue>,
    /// How many wait, on a listener that reports it.
    gauge: Option<IntGauge>,
}

#[derive(Default)]
struct Queue {
    next: u64,
    by_age: BTreeMap<u64, CancellationToken>,
}

/// A poisoned lock only means another connection's task panicked; the queue is still whole.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Waiting {
    /// Waiting connections counted by `gauge`.
    pub fn reported_by(gauge: IntGauge) -> Self {
        Self {
            queue: Mutex::default(),
            gauge: Some(gauge),
        }
    }

    fn report(&self, queue: &Queue) {
        if let Some(gauge) = &self.gauge {
            gauge.set(i64::try_from(queue.by_age.len()).unwrap_or(i64::MAX));
        }
    }

    /// Tells the connection that has waited longest for its head to close; false when none waits.
    pub fn close_oldest(&self) -> bool {
        let oldest = {
            let mut queue = lock(&self.queue);
            let oldest = queue.by_age.pop_first();
            self.report(&queue);
            oldest
        };
        match oldest {
            Some((_, close)) => {
                close.cancel();
                true
            }
            None => false,
        }
    }

    fn enter(&self, close: &CancellationToken) -> u64 {
        let mut queue = lock(&self.queue);
        let key = queue.next;
        queue.next += 1;
        queue.by_age.insert(key, close.clone());
        self.report(&queue);
        key
    }

    fn leave(&self, key: u64) {
        let mut queue = lock(&self.queue);
        queue.by_age.remove(&key);
        self.report(&queue);
    }
}

/// One connection's place among the waiting.
pub struct Place {
    waiting: Arc<Waiting>,
    close: CancellationToken,
    state: Mutex<State>,
}

enum State {
    Waiting(u64),
    Busy,
    Ended,
}

impl Place {
    /// A connection just accepted: it waits for its first head.
    pub fn new(waiting: Arc<Waiting>) -> Arc<Self> {
        let close = CancellationToken::new();
        let key = waiting.enter(&close);
        Arc::new(Self {
            waiting,
            close,
            state: Mutex::new(State::Waiting(key)),
        })
    }

    /// Cancelled when the connection is to be closed to make room for a new one.
    pub fn closing(&self) -> CancellationToken {
        self.close.clone()
    }

    /// The connection has ended: it no longer waits, whatever it was doing.
    pub fn end(&self) {
        let mut state = lock(&self.state);
        if let State::Waiting(key) = *state {
            self.waiting.leave(key);
        }
        *state = State::Ended;
    }

    /// Whether the connection waits for a request head (it has no request to finish).
    pub fn is_waiting(&self) -> bool {
        matches!(*lock(&self.state), State::Waiting(_))
    }

    fn busy(&self) {
        let mut state = lock(&self.state);
        if let State::Waiting(key) = *state {
            self.waiting.leave(key);
            *state = State::Busy;
        }
    }

    fn wait(&self) {
        let mut state = lock(&self.state);
        if let State::Busy = *state {
            *state = State::Waiting(self.waiting.enter(&self.close));
        }
    }
}

/// A connection's service: once a request's head has arrived the connection stops waiting, and
/// it waits again once the answer's body is sent.
pub struct Watched<S> {
    inner: S,
    place: Arc<Place>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, place: Arc<Place>) -> Self {
        Self { inner, place }
    }
}

impl<S, B, R> hyper::service::Service<Request<B>> for Watched<S>
where
    S: hyper::service::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
{
    type Response = Response<Answered<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn call(&self, request: Request<B>) -> Self::Future {
        self.place.busy();
        let place = self.place.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|body| Answered {
                body,
                place: Some(place),
            }))
        })
    }
}

/// An answer's body that puts its connection back among the waiting once it is sent (or
/// dropped unsent, when the connection is closing anyway).
pub struct Answered<B> {
    body: B,
    place: Option<Arc<Place>>,
}

impl<B> Answered<B> {
    fn sent(&mut self) {
        if let Some(place) = self.place.take() {
            place.wait();
        }
    }
}

impl<B> Drop for Answered<B> {
    fn drop(&mut self) {
        self.sent();
    }
}

impl<B: Body + Unpin> Body for Answered<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.sent();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_that_waited_longest_is_closed_first_and_busy_ones_never() {
        let gauge = IntGauge::new("waiting", "waiting").unwrap();
        let waiting = Arc::new(Waiting::reported_by(gauge.clone()));
        let first = Place::new(waiting.clone());
        let second = Place::new(waiting.clone());
        let third = Place::new(waiting.clone());
        assert_eq!(gauge.get(), 3);
        // The first one's head arrives: it is busy, then waits again behind the others.
        first.busy();
        assert_eq!(gauge.get(), 2);
        assert!(!first.is_waiting() && second.is_waiting());
        assert!(waiting.close_oldest());
        assert_eq!(gauge.get(), 1);
        assert!(second.closing().is_cancelled());
        assert!(!first.closing().is_cancelled() && !third.closing().is_cancelled());
        first.wait();
        assert_eq!(gauge.get(), 2);
        assert!(waiting.close_oldest());
        assert!(third.closing().is_cancelled());
        assert!(waiting.close_oldest());
        assert!(first.closing().is_cancelled());
        assert!(!waiting.close_oldest(), "nobody waits any more");
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn an_ended_or_busy_connection_is_not_closed_to_make_room() {
        let waiting = Arc::new(Waiting::default());
        let ended = Place::new(waiting.clone());
        let busy = Place::new(waiting.clone());
        ended.end();
        busy.busy();
        ended.wait();
        assert!(!waiting.close_oldest());
        assert!(!busy.closing().is_cancelled());
    }
}
