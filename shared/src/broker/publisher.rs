//! Confirmed publishing, the one way both processes publish: `mandatory`, so a message no queue
//! takes comes back instead of vanishing, and each publish learns its own confirm and return.
//!
//! lapin 4 numbers a publish and queues its frames in two steps, so publishes from several tasks
//! must be sent one at a time. Its confirms stay in step, but a message the broker returned is
//! handed to whichever confirm lapin completes next, and an ack that covers several publishes
//! completes them in hash order: the return can land on another publish's confirm
//! (`tests/tests/publish_confirms.rs` shows both). So one task per channel sends, and it settles
//! the publishes itself: the broker sends a return before the ack of the same message, and lapin
//! attaches every return to a confirm that completes no later than the returned message's own,
//! so once a publish's confirm completed, every return that may be its own sits on a completed
//! confirm. The task gathers the returns of all completed confirms and gives each to the
//! outstanding publish whose exchange, routing key, message id and body it carries.
//!
//! A publish whose caller stopped waiting before its turn came is not sent: it was refused (the
//! ingress answers 503 once its publish timeout passes) and will be retried by its sender.
//!
//! A channel that nacks, or that confirms nothing for [`CONFIRM_STALL`] while publishes wait, is
//! closed by that task, so that its owner (which watches the channel's state) opens another. On
//! RabbitMQ 3.10 a channel's first publish to a quorum queue asks the node that the queue's record
//! names as leader; a channel opened while that node is down, before a new leader updated the
//! record, keeps asking the dead node and nacks every publish to that queue until the node is
//! back. A channel opened a moment later asks the new leader. avsync never sets a queue length
//! limit, so a nack means such a stuck channel, and a new channel is the cure.

use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};

use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, Sleep};

/// Longest time without any confirm while publishes wait, after which the channel is taken for
/// stuck and closed. A loaded broker confirms something every few hundred milliseconds.
const CONFIRM_STALL: Duration = Duration::from_secs(5);

/// Why a confirmed publish did not reach a queue.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("broker error: {0}")]
    Broker(#[source] lapin::Error),
    #[error("the broker refused the message (nack); the channel is being replaced")]
    Nacked,
    #[error("the broker returned the message as unroutable to `{0}`")]
    Unroutable(String),
    #[error("the channel's publisher stopped")]
    Stopped,
}

/// A confirming channel that many tasks publish on at once. Clones share the channel.
#[derive(Clone)]
pub struct ConfirmedPublisher {
    channel: Channel,
    jobs: mpsc::UnboundedSender<Job>,
}

struct Job {
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    properties: BasicProperties,
    done: oneshot::Sender<Result<(), PublishError>>,
}

impl ConfirmedPublisher {
    /// Puts `channel` in confirm mode and starts the task that publishes on it. The task ends
    /// when the last clone is dropped and every publish was settled.
    pub async fn open(channel: Channel) -> Result<Self, lapin::Error> {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let (jobs, queue) = mpsc::unbounded_channel();
        tokio::spawn(settle_publishes(channel.clone(), queue));
        Ok(Self { channel, jobs })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes `body` with `properties`, `mandatory`, and waits for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let (done, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                body: body.to_vec(),
                properties,
                done,
            })
            .map_err(|_| PublishError::Stopped)?;
        answer.await.unwrap_or(Err(PublishError::Stopped))
    }
}

/// A publish sent and not yet settled.
struct Outstanding {
    exchange: String,
    routing_key: String,
    body: Vec<u8>,
    message_id: Option<ShortString>,
    confirm: PublisherConfirm,
    completed: Option<Result<Confirmation, lapin::Error>>,
    done: oneshot::Sender<Result<(), PublishError>>,
}

impl Outstanding {
    fn owns(&self, returned: &BasicReturnMessage) -> bool {
        let d = &returned.delivery;
        d.exchange.as_str() == self.exchange
            && d.routing_key.as_str() == self.routing_key
            && d.properties.message_id() == &self.message_id
            && d.data == self.body
    }
}

enum Next {
    Job(Option<Job>),
    FrontCompleted(Result<Confirmation, lapin::Error>),
    Stalled,
}

/// Closes a channel that nacked or stalled, once; its owner sees it closed and opens another.
fn retire(channel: &Channel, retired: &mut bool, why: &'static str) {
    if std::mem::replace(retired, true) {
        return;
    }
    tracing::warn!(
        channel = channel.id(),
        "{why}; closing the channel so that a new one is opened"
    );
    let channel = channel.clone();
    tokio::spawn(async move {
        let _ = channel.close(200, why.into()).await;
    });
}

async fn settle_publishes(channel: Channel, mut queue: mpsc::UnboundedReceiver<Job>) {
    let mut outstanding: VecDeque<Outstanding> = VecDeque::new();
    let mut returned: Vec<BasicReturnMessage> = Vec::new();
    let mut open = true;
    let mut retired = false;
    let stall = tokio::time::sleep(CONFIRM_STALL);
    tokio::pin!(stall);
    while open || !outstanding.is_empty() {
        let next =
            poll_fn(|cx| poll_next(cx, &mut outstanding, &mut queue, open, stall.as_mut())).await;
        match next {
            Next::Job(None) => open = false,
            Next::Stalled => {
                retire(
                    &channel,
                    &mut retired,
                    "the broker confirmed nothing for a while",
                );
                stall.as_mut().reset(Instant::now() + CONFIRM_STALL);
            }
            Next::Job(Some(job)) => {
                // Its publisher stopped waiting (the ingress answered 503 when its publish timeout
                // passed): sending it would only lengthen the line that a slow broker's confirms
                // come behind, until no publish is confirmed within its timeout any more and
                // every retry of the refused ones joins the line.
                if job.done.is_closed() {
                    continue;
                }
                if outstanding.is_empty() {
                    stall.as_mut().reset(Instant::now() + CONFIRM_STALL);
                }
                let message_id = job.properties.message_id().clone();
                let sent = channel
                    .basic_publish(
                        job.exchange.as_str().into(),
                        job.routing_key.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        &job.body,
                        job.properties,
                    )
                    .await;
                match sent {
                    Ok(confirm) => outstanding.push_back(Outstanding {
                        exchange: job.exchange,
                        routing_key: job.routing_key,
                        body: job.body,
                        message_id,
                        confirm,
                        completed: None,
                        done: job.done,
                    }),
                    Err(e) => {
                        let _ = job.done.send(Err(PublishError::Broker(e)));
                    }
                }
            }
            Next::FrontCompleted(result) => {
                stall.as_mut().reset(Instant::now() + CONFIRM_STALL);
                if let Some(front) = outstanding.front_mut() {
                    front.completed = Some(result);
                }
                // The front and every publish after it that one look finds completed, in order.
                // A return sits on a confirm that completes no later than its own message's, so
                // a return of theirs is on a confirm settled before (the return kept in
                // `returned`) or on one this look finds completed, before or after its owner.
                // One look per wake-up, not one per publish: an ack that covers thousands of
                // publishes would cost thousands of looks at thousands of confirms (the worker
                // spent most of its CPU there setting a stuck tenant's burst aside).
                let ready = look(&mut outstanding, &mut returned);
                for front in outstanding.drain(..ready) {
                    if settle(front, &mut returned) {
                        retire(&channel, &mut retired, "the broker nacked a publish");
                    }
                }
                if outstanding.is_empty() && !returned.is_empty() {
                    tracing::warn!(
                        returned = returned.len(),
                        "the broker returned messages that no publish sent; dropped"
                    );
                    returned.clear();
                }
            }
        }
    }
}

fn poll_next(
    cx: &mut Context<'_>,
    outstanding: &mut VecDeque<Outstanding>,
    queue: &mut mpsc::UnboundedReceiver<Job>,
    open: bool,
    stall: Pin<&mut Sleep>,
) -> Poll<Next> {
    if let Some(front) = outstanding.front_mut() {
        if let Poll::Ready(result) = Pin::new(&mut front.confirm).poll(cx) {
            return Poll::Ready(Next::FrontCompleted(result));
        }
        if stall.poll(cx).is_ready() {
            return Poll::Ready(Next::Stalled);
        }
    }
    if open {
        if let Poll::Ready(job) = queue.poll_recv(cx) {
            return Poll::Ready(Next::Job(job));
        }
    }
    Poll::Pending
}

/// Polls every confirm not yet completed and takes the returned message off each completed one;
/// how many at the front have completed.
fn look(outstanding: &mut VecDeque<Outstanding>, returned: &mut Vec<BasicReturnMessage>) -> usize {
    let mut cx = Context::from_waker(Waker::noop());
    for o in outstanding.iter_mut() {
        if o.completed.is_none() {
            if let Poll::Ready(result) = Pin::new(&mut o.confirm).poll(&mut cx) {
                o.completed = Some(result);
            }
        }
        if let Some(Ok(Confirmation::Ack(message) | Confirmation::Nack(message))) = &mut o.completed
        {
            returned.extend(message.take());
        }
    }
    outstanding
        .iter()
        .take_while(|o| o.completed.is_some())
        .count()
}

/// Answers the publish; true when the broker nacked it.
fn settle(publish: Outstanding, returned: &mut Vec<BasicReturnMessage>) -> bool {
    let own_return = returned.iter().position(|r| publish.owns(r));
    let result = match publish.completed {
        Some(Err(e)) => Err(PublishError::Broker(e)),
        Some(Ok(Confirmation::Nack(_))) => Err(PublishError::Nacked),
        Some(Ok(_)) => match own_return {
            Some(i) => {
                returned.swap_remove(i);
                Err(PublishError::Unroutable(format!(
                    "{}/{}",
                    publish.exchange, publish.routing_key
                )))
            }
            None => Ok(()),
        },
        None => Err(PublishError::Stopped),
    };
    let nacked = matches!(result, Err(PublishError::Nacked));
    if nacked {
        if let Some(i) = own_return {
            returned.swap_remove(i);
        }
    }
    let _ = publish.done.send(result);
    nacked
}
