//! Every `x-avsync-*` header, what the broker adds on its own, and how their values are read.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use std::collections::BTreeMap;

/// The tenant of the event, set by the ingress (contract section 4).
pub const TENANT_HEADER: &str = "x-avsync-tenant-id";
/// The event's `type`, set by the ingress.
pub const EVENT_TYPE_HEADER: &str = "x-avsync-event-type";
/// Why a message was dead-lettered: `permanent`, `exhausted` or `poison`.
pub const ERROR_CLASS_HEADER: &str = "x-avsync-error-class";
/// The last failure, in the operator's words.
pub const ERROR_HEADER: &str = "x-avsync-error";
/// Failed attempts so far.
pub const ATTEMPTS_HEADER: &str = "x-avsync-attempts";
pub const FIRST_FAILURE_HEADER: &str = "x-avsync-first-failure";
pub const LAST_FAILURE_HEADER: &str = "x-avsync-last-failure";
/// The failure history a retry or dead letter carries; a replay starts it afresh.
pub const FAILURE_HEADERS: [&str; 5] = [
    ERROR_CLASS_HEADER,
    ERROR_HEADER,
    ATTEMPTS_HEADER,
    FIRST_FAILURE_HEADER,
    LAST_FAILURE_HEADER,
];
/// The quorum queue's count of earlier deliveries that were not settled.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// Headers the broker sets on delivery or dead-lettering. Copied onto a new message they would
/// lie: a stale `x-delivery-count` would make a replayed message look like poison.
const BROKER_HEADERS: &[&str] = &[
    DELIVERY_COUNT_HEADER,
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// AMQP's `delivery_mode` for a message the broker keeps on disk.
pub const PERSISTENT: u8 = 2;

/// A long-string header value.
pub fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

pub fn header<'a>(properties: &'a BasicProperties, key: &str) -> Option<&'a AMQPValue> {
    properties.headers().as_ref()?.inner().get(key)
}

/// A text header value, long or short string.
pub fn value_str(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// An integer header value, whichever integer type the sender chose.
pub fn value_int(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

pub fn header_str(properties: &BasicProperties, key: &str) -> Option<String> {
    header(properties, key).and_then(value_str)
}

pub fn header_int(properties: &BasicProperties, key: &str) -> Option<i64> {
    header(properties, key).and_then(value_int)
}

/// The properties of a persistent copy of a message that had `properties`, carrying `headers`.
pub fn republished(
    properties: &BasicProperties,
    headers: BTreeMap<ShortString, AMQPValue>,
) -> BasicProperties {
    properties
        .clone()
        .with_headers(FieldTable::from(headers))
        .with_delivery_mode(PERSISTENT)
}

/// The message's headers without the broker's own and without the keys in `drop`.
pub fn carried_headers(
    properties: &BasicProperties,
    drop: &[&str],
) -> BTreeMap<ShortString, AMQPValue> {
    properties
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .filter(|(k, _)| {
                    !BROKER_HEADERS.contains(&k.as_str()) && !drop.contains(&k.as_str())
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}
