//! The retry path: a transiently failed message waits in a TTL tier queue in the broker (never in
//! the worker's memory), then returns to its own partition; after the last delay it is dead-lettered
//! as `exhausted`. The attempt count and the first failure time travel with the message.

use avsync_shared::broker::headers::{
    carried_headers, header, header_int, republished, ATTEMPTS_HEADER, DELIVERY_COUNT_HEADER,
    ERROR_HEADER, FIRST_FAILURE_HEADER, LAST_FAILURE_HEADER,
};
use avsync_shared::broker::{ConfirmedPublisher, PublishError};
use avsync_shared::topology::Topology;
use avsync_shared::TenantId;
use chrono::{DateTime, SecondsFormat, Utc};
use lapin::message::Delivery;
use lapin::types::{AMQPValue, LongString};
use lapin::BasicProperties;
use rand::Rng;
use std::sync::Arc;
use std::time::Duration;

/// What the broker has told us about earlier deliveries of a message, and what earlier failures
/// wrote into its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// Earlier deliveries that were not settled (the quorum queue's `x-delivery-count`).
    pub unsettled_deliveries: u32,
    /// Failed attempts before this delivery (`x-avsync-attempts`).
    pub failed_attempts: u32,
    pub first_failure: Option<DateTime<Utc>>,
}

fn header_time(delivery: &Delivery, key: &str) -> Option<DateTime<Utc>> {
    match header(&delivery.properties, key)? {
        AMQPValue::LongString(s) => DateTime::parse_from_rfc3339(&s.to_string())
            .ok()
            .map(|t| t.with_timezone(&Utc)),
        _ => None,
    }
}

fn clamp(n: Option<i64>) -> u32 {
    n.map(|n| u32::try_from(n.max(0)).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

impl History {
    pub fn of(delivery: &Delivery) -> Self {
        History {
            unsettled_deliveries: clamp(header_int(&delivery.properties, DELIVERY_COUNT_HEADER)),
            failed_attempts: clamp(header_int(&delivery.properties, ATTEMPTS_HEADER)),
            first_failure: header_time(delivery, FIRST_FAILURE_HEADER),
        }
    }
}

/// Tiers a set-aside message may wait in whatever the ladder: a slow or unreachable tenant stays
/// marked for up to a minute, and a ladder shorter than that (an operator's `1s,2s`) would bring
/// its events back through their partition, in front of their neighbours, every few seconds for
/// as long as the mark lasts. The default ladder has both.
pub const SET_ASIDE_DELAYS: [Duration; 2] = [Duration::from_secs(5), Duration::from_secs(30)];

/// The retry schedule (`AVSYNC_RETRY_DELAYS`) and the poison limit (`AVSYNC_POISON_DELIVERIES`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The ladder a failed message walks. Shared, not copied, by the settling of a delivery.
    pub delays: Arc<[Duration]>,
    /// Every tier queue, shortest first: the ladder's delays and [`SET_ASIDE_DELAYS`]. What the
    /// worker declares, polls and sets messages aside into.
    pub tiers: Arc<[Duration]>,
    pub poison_deliveries: u32,
}

/// What to do with a message after a transient failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Wait `delay` in the tier for that delay; this will be attempt number `attempt`.
    Retry { delay: Duration, attempt: u32 },
    /// Every delay was used: dead-letter as `exhausted`.
    Exhausted,
}

impl RetryPolicy {
    pub fn new(delays: Vec<Duration>, poison_deliveries: u32) -> Self {
        let mut tiers: Vec<Duration> = delays.iter().copied().chain(SET_ASIDE_DELAYS).collect();
        tiers.sort_unstable();
        tiers.dedup();
        RetryPolicy {
            delays: delays.into(),
            tiers: tiers.into(),
            poison_deliveries,
        }
    }

    /// A message delivered this many times without being settled crashed or hung a consumer each
    /// time: it is dead-lettered as poison without being processed again.
    pub fn is_poison(&self, history: &History) -> bool {
        history.unsettled_deliveries >= self.poison_deliveries
    }

    /// The soonest any retried message comes back (none without delays).
    pub fn soonest_return(&self) -> Option<Duration> {
        self.delays.iter().copied().map(soonest_return).min()
    }

    /// `failed_attempts` counts the failure that just happened.
    pub fn next_step(&self, failed_attempts: u32) -> NextStep {
        let index = usize::try_from(failed_attempts.saturating_sub(1)).unwrap_or(usize::MAX);
        match self.delays.get(index) {
            Some(delay) => NextStep::Retry {
                delay: *delay,
                attempt: failed_attempts + 1,
            },
            None => NextStep::Exhausted,
        }
    }
}

/// The message's own expiry inside its tier: the tier's delay less up to a fifth, at random, so
/// that events which failed together (a tenant database that went away) do not all come back in
/// the same instant. The tier queue's TTL is the upper bound.
pub fn jittered(delay: Duration) -> Duration {
    let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    let cut = rand::rng().random_range(0..=ms / 5);
    Duration::from_millis(ms - cut)
}

/// The soonest a message sent to the tier of `delay` comes back: [`jittered`]'s lower bound.
pub fn soonest_return(delay: Duration) -> Duration {
    let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(ms - ms / 5)
}

fn rfc3339(t: DateTime<Utc>) -> LongString {
    LongString::from(t.to_rfc3339_opts(SecondsFormat::Millis, true).as_str())
}

/// One scheduled retry of a message.
#[derive(Debug, Clone)]
pub struct Retry<'a> {
    pub tenant: &'a TenantId,
    pub delay: Duration,
    /// Failed attempts so far, the one that just failed included.
    pub failed_attempts: u32,
    pub first_failure: DateTime<Utc>,
    pub error: &'a str,
}

/// Publishes a message (its `properties` and body `data`) into the retry tier for `retry.delay`, confirmed, carrying the number of
/// failed attempts so far and the failure times. The caller acknowledges the original only after
/// this returns Ok.
pub async fn publish_retry(
    publisher: &ConfirmedPublisher,
    topology: &Topology,
    properties: &BasicProperties,
    data: &[u8],
    retry: &Retry<'_>,
) -> Result<(), PublishError> {
    let Retry {
        tenant,
        delay,
        failed_attempts,
        first_failure,
        error,
    } = *retry;
    let mut headers = carried_headers(properties, &[]);
    headers.insert(
        ATTEMPTS_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(failed_attempts)),
    );
    headers.insert(
        FIRST_FAILURE_HEADER.into(),
        AMQPValue::LongString(rfc3339(first_failure)),
    );
    headers.insert(
        LAST_FAILURE_HEADER.into(),
        AMQPValue::LongString(rfc3339(Utc::now())),
    );
    headers.insert(
        ERROR_HEADER.into(),
        AMQPValue::LongString(LongString::from(error)),
    );
    let expiration = jittered(delay).as_millis().to_string();
    let properties = republished(properties, headers).with_expiration(expiration.as_str().into());
    // The tier is a fanout exchange; the routing key is kept on the message so that, when it
    // expires back into the events exchange, it lands in its tenant's partition again.
    let routing_key = Topology::routing_key(topology.partition_of(tenant));
    publisher
        .publish(&topology.retry_tier(delay), &routing_key, data, properties)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy::new(
            vec![
                Duration::from_secs(1),
                Duration::from_secs(5),
                Duration::from_secs(30),
            ],
            10,
        )
    }

    #[test]
    fn each_failure_takes_the_next_delay_then_exhausts() {
        let p = policy();
        assert_eq!(
            p.next_step(1),
            NextStep::Retry {
                delay: Duration::from_secs(1),
                attempt: 2
            }
        );
        assert_eq!(
            p.next_step(3),
            NextStep::Retry {
                delay: Duration::from_secs(30),
                attempt: 4
            }
        );
        assert_eq!(p.next_step(4), NextStep::Exhausted);
        assert_eq!(p.next_step(u32::MAX), NextStep::Exhausted);
    }

    #[test]
    fn an_empty_schedule_exhausts_at_once() {
        let p = RetryPolicy::new(Vec::new(), 5);
        assert_eq!(p.next_step(1), NextStep::Exhausted);
    }

    #[test]
    fn the_set_aside_tiers_stand_beside_any_ladder_once() {
        let secs = |s: &[u64]| {
            s.iter()
                .copied()
                .map(Duration::from_secs)
                .collect::<Vec<_>>()
        };
        assert_eq!(*policy().tiers, *secs(&[1, 5, 30]));
        let short = RetryPolicy::new(secs(&[2, 1]), 10);
        assert_eq!(*short.delays, *secs(&[2, 1]));
        assert_eq!(*short.tiers, *secs(&[1, 2, 5, 30]));
        assert_eq!(*RetryPolicy::new(Vec::new(), 10).tiers, *secs(&[5, 30]));
    }

    #[test]
    fn poison_at_the_configured_count() {
        let p = policy();
        let h = |n| History {
            unsettled_deliveries: n,
            failed_attempts: 0,
            first_failure: None,
        };
        assert!(!p.is_poison(&h(0)));
        assert!(!p.is_poison(&h(9)));
        assert!(p.is_poison(&h(10)));
    }

    #[test]
    fn jitter_stays_within_a_fifth_below_the_delay() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(30));
            assert!(
                d <= Duration::from_secs(30) && d >= Duration::from_secs(24),
                "{d:?}"
            );
            let odd = Duration::from_millis(1_234);
            assert!(jittered(odd) >= soonest_return(odd));
        }
        assert_eq!(
            soonest_return(Duration::from_secs(30)),
            Duration::from_secs(24)
        );
        assert_eq!(jittered(Duration::ZERO), Duration::ZERO);
    }
}
