//! The acks and requeues of one consume channel: sent by one task, so that they reach the broker
//! in the order they were decided, and gathered, so that deliveries settled in the order the
//! broker sent them go as one `multiple` ack.
//!
//! A stuck tenant's burst is set aside message by message, and each of its acks costs the
//! broker a walk of the channel's unacked deliveries (RabbitMQ 3.10) and a command to the quorum
//! queue; acked together, a run of a few hundred costs one of each, so the partition's other
//! tenants behind the burst are reached sooner. A multiple ack covers every unacked delivery up
//! to its tag, so it is sent only for an unbroken run of tags from the lowest one not yet
//! settled: the broker numbers a channel's deliveries 1, 2, 3, ..., and a tag below the run that
//! was received but not settled, or not yet received, would be acked with it and could be lost.
//! A settled delivery whose run is held up by an earlier one is acked on its own after
//! [`GATHER`].

use crate::metrics::Metrics;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::Channel;
use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Longest an ack waits for the deliveries before it on its channel to be settled, so that one
/// multiple ack covers them all. Short against the time a delivery spends in the worker, and
/// acks do not hold the tenant's session.
const GATHER: Duration = Duration::from_millis(20);

/// Tags settled on their own above the lowest unsettled one that the ledger keeps before it
/// stops gathering for the channel: a delivery that is never settled (its task panicked, or it
/// was abandoned at the drain limit) holds the run back for good, and the set would grow for
/// the channel's life.
const MAX_TRACKED: usize = 1 << 17;

/// A channel's delivery tag, numbered by the broker from 1.
pub(crate) type DeliveryTag = u64;

/// The acks of one consume channel. Clones share the task; it ends once the last clone is
/// dropped and everything queued was sent.
#[derive(Clone)]
pub(crate) struct Acks {
    channel: Channel,
    requests: mpsc::UnboundedSender<Request>,
}

enum Request {
    Ack(DeliveryTag),
    Requeue(DeliveryTag),
    Flush(oneshot::Sender<()>),
}

impl Acks {
    /// Starts the task that acks on `channel`, counting its acks in `metrics`.
    pub fn start(channel: Channel, metrics: Metrics) -> Self {
        let (requests, queue) = mpsc::unbounded_channel();
        tokio::spawn(send_frames(channel.clone(), metrics, queue));
        Self { channel, requests }
    }

    /// The channel it acks on.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Queues the ack of `tag`; false when its channel is gone (the broker hands the delivery
    /// back, and it is applied again, which changes nothing).
    pub fn ack(&self, tag: DeliveryTag) -> bool {
        self.channel.status().connected() && self.requests.send(Request::Ack(tag)).is_ok()
    }

    /// Queues `tag` to go back to its queue; it is sent after every ack queued before it.
    pub fn requeue(&self, tag: DeliveryTag) -> bool {
        self.channel.status().connected() && self.requests.send(Request::Requeue(tag)).is_ok()
    }

    /// Returns once everything queued before has been sent, gathered or not.
    pub async fn flush(&self) {
        let (done, sent) = oneshot::channel();
        if self.requests.send(Request::Flush(done)).is_ok() {
            let _ = sent.await;
        }
    }
}

async fn send_frames(
    channel: Channel,
    metrics: Metrics,
    mut queue: mpsc::UnboundedReceiver<Request>,
) {
    let mut ledger = Ledger::default();
    let mut open = true;
    let mut flushed = Vec::new();
    while open || !ledger.is_empty() {
        let gathered = ledger.next_deadline();
        tokio::select! {
            request = queue.recv(), if open => match request {
                Some(request) => {
                    ledger.take(request, Instant::now(), &mut flushed);
                    while let Ok(request) = queue.try_recv() {
                        ledger.take(request, Instant::now(), &mut flushed);
                    }
                }
                None => open = false,
            },
            () = sleep_until(gathered) => {}
        }
        let all = !open || !flushed.is_empty();
        let frames = ledger.frames(Instant::now(), all);
        send(&channel, &metrics, &frames).await;
        for done in flushed.drain(..) {
            let _ = done.send(());
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Sends `frames` in order: every frame is queued on the channel when its future is first
/// polled, and `join_all` polls them in order, then waits for them together.
async fn send(channel: &Channel, metrics: &Metrics, frames: &[Frame]) {
    if frames.is_empty() {
        return;
    }
    let sent = futures_util::future::join_all(frames.iter().map(|frame| async move {
        match *frame {
            Frame::Ack { tag, covers } => {
                let multiple = covers > 1;
                let sent = channel.basic_ack(tag, BasicAckOptions { multiple }).await;
                if sent.is_ok() {
                    metrics.acks.acked(covers, multiple);
                }
                sent
            }
            Frame::Requeue(tag) => {
                let options = BasicNackOptions {
                    requeue: true,
                    multiple: false,
                };
                channel.basic_nack(tag, options).await
            }
        }
    }))
    .await;
    if let Some(Err(e)) = sent.into_iter().find(Result::is_err) {
        tracing::warn!(
            channel = channel.id(),
            error = %e,
            "acks not sent (the channel is gone); the broker hands those messages back and they are applied again"
        );
    }
}

/// What goes to the broker for a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// Acks `tag` and, when it `covers` more than one, every unacked delivery before it.
    Ack {
        tag: DeliveryTag,
        covers: u64,
    },
    Requeue(DeliveryTag),
}

/// Which of a channel's deliveries are settled, and what to send for them: pure, so that the
/// rule that no multiple ack covers a delivery not meant to be acked is property-tested.
#[derive(Default)]
struct Ledger {
    /// Every tag up to here is settled, or was never received (the run starts above it).
    floor: DeliveryTag,
    /// Tags above the floor to be acked.
    waiting: BTreeSet<DeliveryTag>,
    /// When each waiting tag was settled, oldest first; tags acked since are skipped.
    arrivals: VecDeque<(Instant, DeliveryTag)>,
    /// Tags above the floor already acked or requeued on their own.
    sent: BTreeSet<DeliveryTag>,
    /// Frames decided as requests arrive (requeues), sent before the next acks.
    now: Vec<Frame>,
    /// The channel's run is held up for good: every ack goes on its own.
    single: bool,
}

impl Ledger {
    fn take(&mut self, request: Request, at: Instant, flushed: &mut Vec<oneshot::Sender<()>>) {
        match request {
            Request::Ack(tag) if self.single => self.now.push(Frame::Ack { tag, covers: 1 }),
            Request::Ack(tag) => {
                if self.waiting.insert(tag) {
                    self.arrivals.push_back((at, tag));
                }
            }
            Request::Requeue(tag) => {
                self.now.push(Frame::Requeue(tag));
                if !self.single {
                    self.sent.insert(tag);
                }
            }
            Request::Flush(done) => flushed.push(done),
        }
    }

    fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.now.is_empty()
    }

    /// When the longest-waiting ack stops waiting for its run. Requeues wait for nothing: the
    /// task sends them with the next [`Ledger::frames`], right after taking them.
    fn next_deadline(&mut self) -> Option<Instant> {
        self.oldest().map(|at| at + GATHER)
    }

    /// When the longest-waiting ack was settled, dropping the arrivals of tags acked since.
    fn oldest(&mut self) -> Option<Instant> {
        while let Some(&(at, tag)) = self.arrivals.front() {
            if self.waiting.contains(&tag) {
                return Some(at);
            }
            self.arrivals.pop_front();
        }
        None
    }

    /// What to send at `now`, in order: requeues decided since the last call; the unbroken run
    /// of settled tags from the floor, as one multiple ack at its highest tag still unacked;
    /// then every ack that waited [`GATHER`] (or, with `all`, every one), on its own.
    fn frames(&mut self, now: Instant, all: bool) -> Vec<Frame> {
        let mut frames = std::mem::take(&mut self.now);
        let mut highest = None;
        let mut covers = 0;
        loop {
            let next = self.floor + 1;
            if self.waiting.remove(&next) {
                highest = Some(next);
                covers += 1;
            } else if !self.sent.remove(&next) {
                break;
            }
            self.floor = next;
        }
        if let Some(tag) = highest {
            frames.push(Frame::Ack { tag, covers });
        }
        while let Some(at) = self.oldest() {
            if !all && now.saturating_duration_since(at) < GATHER {
                break;
            }
            if let Some((_, tag)) = self.arrivals.pop_front() {
                self.waiting.remove(&tag);
                self.sent.insert(tag);
                frames.push(Frame::Ack { tag, covers: 1 });
            }
        }
        if self.sent.len() > MAX_TRACKED {
            self.single = true;
            self.sent.clear();
            self.arrivals.clear();
            for tag in std::mem::take(&mut self.waiting) {
                frames.push(Frame::Ack { tag, covers: 1 });
            }
        }
        frames
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The broker's side: a channel's unacked deliveries, settled by frames as RabbitMQ does,
    /// failing where RabbitMQ closes the channel (an unknown tag).
    #[derive(Default)]
    struct Broker {
        unacked: BTreeSet<DeliveryTag>,
        acked: BTreeSet<DeliveryTag>,
        requeued: BTreeSet<DeliveryTag>,
    }

    impl Broker {
        fn deliver(&mut self, tag: DeliveryTag) {
            self.unacked.insert(tag);
        }

        fn receive(&mut self, frames: &[Frame]) {
            for frame in frames {
                match *frame {
                    Frame::Ack { tag, covers } => {
                        assert!(self.unacked.contains(&tag), "unknown delivery tag {tag}");
                        let covered: Vec<_> = if covers > 1 {
                            self.unacked.range(..=tag).copied().collect()
                        } else {
                            vec![tag]
                        };
                        for t in covered {
                            self.unacked.remove(&t);
                            self.acked.insert(t);
                        }
                    }
                    Frame::Requeue(tag) => {
                        assert!(self.unacked.remove(&tag), "unknown delivery tag {tag}");
                        self.requeued.insert(tag);
                    }
                }
            }
        }
    }

    #[derive(Debug, Clone, Copy)]
    enum Fate {
        Ack,
        Requeue,
        /// Never settled: its task died with it.
        Lost,
    }

    fn fate() -> impl Strategy<Value = Fate> {
        prop_oneof![8 => Just(Fate::Ack), 1 => Just(Fate::Requeue), 1 => Just(Fate::Lost)]
    }

    /// Whatever order deliveries are settled in, and however the sends interleave with it, the
    /// broker sees each acked delivery acked once, each requeued one requeued, and a delivery
    /// never settled never acked; once flushed, nothing settled waits.
    /// Deliveries 1..=n with their fates, in the order they are settled.
    fn settlements() -> impl Strategy<Value = Vec<(DeliveryTag, Fate)>> {
        proptest::collection::vec(fate(), 1..200)
            .prop_flat_map(|fates| Just((1..).zip(fates).collect::<Vec<_>>()).prop_shuffle())
    }

    /// Whatever order deliveries are settled in, and however the sends interleave with it, the
    /// broker sees each acked delivery acked once, each requeued one requeued, and a delivery
    /// never settled never acked; once flushed, nothing settled waits.
    #[test]
    fn no_multiple_ack_covers_a_delivery_not_meant_to_be_acked() {
        proptest!(|(
            settled in settlements(),
            steps in proptest::collection::vec((0u64..40, any::<bool>()), 1..400),
        )| {
            let mut ledger = Ledger::default();
            let mut broker = Broker::default();
            for (tag, _) in &settled {
                broker.deliver(*tag);
            }
            let mut clock = Instant::now();
            for ((tag, fate), (ms, send)) in settled.iter().zip(steps.into_iter().cycle()) {
                clock += Duration::from_millis(ms);
                let request = match fate {
                    Fate::Ack => Request::Ack(*tag),
                    Fate::Requeue => Request::Requeue(*tag),
                    Fate::Lost => continue,
                };
                ledger.take(request, clock, &mut Vec::new());
                if send {
                    broker.receive(&ledger.frames(clock, false));
                }
            }
            broker.receive(&ledger.frames(clock, true));
            prop_assert!(ledger.is_empty());
            for (tag, fate) in &settled {
                match fate {
                    Fate::Ack => prop_assert!(broker.acked.contains(tag), "{tag} not acked"),
                    Fate::Requeue => prop_assert!(broker.requeued.contains(tag)),
                    Fate::Lost => prop_assert!(broker.unacked.contains(tag), "{tag} was acked"),
                }
            }
        });
    }

    #[test]
    fn a_run_settled_in_order_goes_as_one_multiple_ack() {
        let now = Instant::now();
        let mut ledger = Ledger::default();
        for tag in [3, 1, 2, 5] {
            ledger.take(Request::Ack(tag), now, &mut Vec::new());
        }
        assert_eq!(
            ledger.frames(now, false),
            [Frame::Ack { tag: 3, covers: 3 }]
        );
        assert_eq!(ledger.next_deadline(), Some(now + GATHER));
        assert_eq!(
            ledger.frames(now + GATHER, false),
            [Frame::Ack { tag: 5, covers: 1 }]
        );
        ledger.take(Request::Ack(4), now + GATHER, &mut Vec::new());
        assert_eq!(
            ledger.frames(now + GATHER, false),
            [Frame::Ack { tag: 4, covers: 1 }]
        );
        assert_eq!(ledger.floor, 5);
    }

    #[test]
    fn a_requeue_goes_at_once_and_breaks_no_run() {
        let now = Instant::now();
        let mut ledger = Ledger::default();
        ledger.take(Request::Ack(2), now, &mut Vec::new());
        ledger.take(Request::Requeue(1), now, &mut Vec::new());
        ledger.take(Request::Ack(3), now, &mut Vec::new());
        assert_eq!(
            ledger.frames(now, false),
            [Frame::Requeue(1), Frame::Ack { tag: 3, covers: 2 }]
        );
    }
}
