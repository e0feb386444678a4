//! Names and declarations of every exchange and queue, and the tenant → partition hash.
//!
//! With prefix `avsync`:
//! - `avsync.events`: durable direct exchange; routing key `p<i>`.
//! - `avsync.events.p<i>`: quorum queue per partition, bound with `p<i>`; a broker-level delivery
//!   limit dead-letters (at least once) into `avsync.dead` as a backstop to the worker's own
//!   poison check.
//! - `avsync.retry.<delay>`: one fanout exchange and one quorum queue per retry delay. A message
//!   waits there for `<delay>` (queue TTL) and is then dead-lettered back into `avsync.events`
//!   with its original routing key `p<i>`, so it returns to its own partition.
//! - `avsync.dead`: the dead-letter queue.

use crate::tenant::TenantId;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};
use std::time::Duration;

/// The partition queues' `x-delivery-limit`. Fixed, so that every process declares the queues
/// with identical arguments (RabbitMQ refuses a redeclaration with other arguments); the worker's
/// `AVSYNC_POISON_DELIVERIES` must stay below it.
pub const BROKER_DELIVERY_LIMIT: i64 = 50;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
    partitions: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyError {
    #[error("AVSYNC_TOPOLOGY must be 1 to 100 characters of A-Z, a-z, 0-9, '.', '_' or '-'")]
    BadPrefix,
    #[error("AVSYNC_PARTITIONS must be between 1 and 1024")]
    BadPartitions,
}

/// FNV-1a, 32 bits, over the tenant id's bytes. This is part of the wire contract: changing it
/// would move tenants to other partitions while events of theirs are still queued.
pub fn tenant_hash(tenant: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in tenant.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// `30s`, `2m`, `1h`, `1500ms`: the largest unit that divides the duration exactly.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 || !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = ms / 1000;
    if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(ShortString::from(k), v);
    }
    t
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

impl Topology {
    pub fn new(prefix: &str, partitions: u16) -> Result<Self, TopologyError> {
        let prefix_ok = !prefix.is_empty()
            && prefix.len() <= 100
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if !prefix_ok {
            return Err(TopologyError::BadPrefix);
        }
        if !(1..=1024).contains(&partitions) {
            return Err(TopologyError::BadPartitions);
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            partitions,
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    pub fn partition_queue(&self, partition: u16) -> String {
        format!("{}.events.p{partition}", self.prefix)
    }

    pub fn routing_key(partition: u16) -> String {
        format!("p{partition}")
    }

    pub fn partition_of(&self, tenant: &TenantId) -> u16 {
        (tenant_hash(tenant.as_str()) % u32::from(self.partitions)) as u16
    }

    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// Exchange and queue of the retry tier that holds messages for `delay`.
    pub fn retry_tier(&self, delay: Duration) -> String {
        format!("{}.retry.{}", self.prefix, format_duration(delay))
    }

    /// Declares the exchange, every partition queue and the dead-letter queue. Idempotent, so the
    /// ingress and the workers can start in any order.
    pub async fn declare(&self, channel: &Channel) -> Result<(), lapin::Error> {
        channel
            .queue_declare(
                self.dead_queue().as_str().into(),
                durable(),
                table(vec![("x-queue-type", long("quorum"))]),
            )
            .await?;
        channel
            .exchange_declare(
                self.events_exchange().as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        for partition in 0..self.partitions {
            let queue = self.partition_queue(partition);
            channel
                .queue_declare(
                    queue.as_str().into(),
                    durable(),
                    table(vec![
                        ("x-queue-type", long("quorum")),
                        (
                            "x-delivery-limit",
                            AMQPValue::LongLongInt(BROKER_DELIVERY_LIMIT),
                        ),
                        ("x-dead-letter-exchange", long("")),
                        ("x-dead-letter-routing-key", long(&self.dead_queue())),
                        ("x-dead-letter-strategy", long("at-least-once")),
                        ("x-overflow", long("reject-publish")),
                    ]),
                )
                .await?;
            channel
                .queue_bind(
                    queue.as_str().into(),
                    self.events_exchange().as_str().into(),
                    Self::routing_key(partition).as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }

    /// Declares one retry tier: a fanout exchange and a quorum queue whose messages expire after
    /// `delay` back into the events exchange, keeping their `p<i>` routing key.
    pub async fn declare_retry_tier(
        &self,
        channel: &Channel,
        delay: Duration,
    ) -> Result<(), lapin::Error> {
        let name = self.retry_tier(delay);
        channel
            .exchange_declare(
                name.as_str().into(),
                ExchangeKind::Fanout,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let ttl = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
        channel
            .queue_declare(
                name.as_str().into(),
                durable(),
                table(vec![
                    ("x-queue-type", long("quorum")),
                    ("x-message-ttl", AMQPValue::LongLongInt(ttl)),
                    ("x-dead-letter-exchange", long(&self.events_exchange())),
                    ("x-dead-letter-strategy", long("at-least-once")),
                    ("x-overflow", long("reject-publish")),
                ]),
            )
            .await?;
        channel
            .queue_bind(
                name.as_str().into(),
                name.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        let t = Topology::new("avsync", 16).unwrap();
        assert_eq!(t.events_exchange(), "avsync.events");
        assert_eq!(t.partition_queue(3), "avsync.events.p3");
        assert_eq!(Topology::routing_key(3), "p3");
        assert_eq!(t.dead_queue(), "avsync.dead");
        assert_eq!(t.retry_tier(Duration::from_secs(120)), "avsync.retry.2m");
    }

    #[test]
    fn hash_is_pinned() {
        // These values are the contract between versions: they must never change.
        assert_eq!(tenant_hash(""), 0x811c_9dc5);
        assert_eq!(tenant_hash("a"), 0xe40c_292c);
        assert_eq!(tenant_hash("tnt_acme") % 16, tenant_hash("tnt_acme") & 15);
        let t = Topology::new("avsync", 16).unwrap();
        let acme = TenantId::parse("tnt_acme").unwrap();
        assert_eq!(t.partition_of(&acme), t.partition_of(&acme));
    }

    #[test]
    fn durations_format_in_their_largest_exact_unit() {
        assert_eq!(format_duration(Duration::from_secs(1)), "1s");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(600)), "10m");
        assert_eq!(format_duration(Duration::from_secs(3600)), "1h");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn rejects_bad_prefixes_and_partition_counts() {
        assert_eq!(Topology::new("", 1), Err(TopologyError::BadPrefix));
        assert_eq!(Topology::new("a b", 1), Err(TopologyError::BadPrefix));
        assert_eq!(Topology::new("a", 0), Err(TopologyError::BadPartitions));
        assert_eq!(Topology::new("a", 1025), Err(TopologyError::BadPartitions));
    }
}
