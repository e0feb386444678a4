//! The dead-letter format: why a message was dead-lettered, how that travels in its headers, and
//! how a dead letter reads back (what `dlq list` shows). The operator commands are in `dlq_cli`.

use avsync_shared::broker::headers::{
    carried_headers, header, header_int, header_str, long, republished, value_str, ATTEMPTS_HEADER,
    ERROR_CLASS_HEADER, ERROR_HEADER, EVENT_TYPE_HEADER, FIRST_FAILURE_HEADER, LAST_FAILURE_HEADER,
    TENANT_HEADER,
};
use avsync_shared::broker::{ConfirmedPublisher, PublishError};
use avsync_shared::topology::Topology;
use avsync_shared::Envelope;
use chrono::{DateTime, SecondsFormat, Utc};
use lapin::message::Delivery;
use lapin::types::AMQPValue;
use lapin::BasicProperties;

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ErrorClass {
    /// It can never be applied as it is: fix the payload, the tenant or the settings, then replay.
    Permanent,
    /// A transient failure outlasted every retry delay: fix the cause, then replay.
    Exhausted,
    /// It was delivered too often without being settled (it crashed or hung a consumer).
    Poison,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Permanent => "permanent",
            ErrorClass::Exhausted => "exhausted",
            ErrorClass::Poison => "poison",
        }
    }
}

/// The reason a dead letter carries in its headers.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub class: ErrorClass,
    pub error: String,
    pub attempts: u32,
    pub first_failure: DateTime<Utc>,
    pub last_failure: DateTime<Utc>,
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Publishes a dead letter of a message (its `properties` and body `data`) into the topology's dead-letter queue and waits for the
/// confirm. The body and `message_id` stay as they were; the reason goes into headers. The caller
/// acknowledges the original only after this returns Ok.
pub async fn publish_dead_letter(
    publisher: &ConfirmedPublisher,
    topology: &Topology,
    properties: &BasicProperties,
    data: &[u8],
    letter: &DeadLetter,
) -> Result<(), PublishError> {
    let mut headers = carried_headers(properties, &[]);
    headers.insert(ERROR_CLASS_HEADER.into(), long(letter.class.as_str()));
    headers.insert(ERROR_HEADER.into(), long(&letter.error));
    headers.insert(
        ATTEMPTS_HEADER.into(),
        AMQPValue::LongLongInt(i64::from(letter.attempts)),
    );
    headers.insert(
        FIRST_FAILURE_HEADER.into(),
        long(&rfc3339(letter.first_failure)),
    );
    headers.insert(
        LAST_FAILURE_HEADER.into(),
        long(&rfc3339(letter.last_failure)),
    );
    let properties = republished(properties, headers);
    publisher
        .publish("", &topology.dead_queue(), data, properties)
        .await
}

/// What `dlq list` shows of one dead letter.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Listed {
    pub event_id: Option<String>,
    pub tenant_id: Option<String>,
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    pub error_class: String,
    pub error: Option<String>,
    pub attempts: Option<i64>,
    pub first_failure: Option<String>,
    pub last_failure: Option<String>,
}

/// The first `x-death` entry's reason, set when the broker itself dead-lettered the message
/// (the partition queues' delivery limit).
fn broker_death_reason(properties: &BasicProperties) -> Option<String> {
    match header(properties, "x-death")? {
        AMQPValue::FieldArray(entries) => entries.as_slice().iter().find_map(|e| match e {
            AMQPValue::FieldTable(t) => t.inner().get("reason").and_then(value_str),
            _ => None,
        }),
        _ => None,
    }
}

impl Listed {
    /// The instant of `last_failure`, when it is readable RFC 3339.
    pub fn last_failed_at(&self) -> Option<DateTime<Utc>> {
        self.last_failure
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
    }

    pub fn from_delivery(delivery: &Delivery) -> Self {
        let p = &delivery.properties;
        let envelope = Envelope::decode(&delivery.data).ok();
        let text = |key: &str| header_str(p, key);
        let (error_class, error) = match text(ERROR_CLASS_HEADER) {
            Some(class) => (class, text(ERROR_HEADER)),
            None => match broker_death_reason(p).as_deref() {
                Some("delivery_limit") => (
                    ErrorClass::Poison.as_str().to_owned(),
                    Some("the broker's delivery limit was reached".to_owned()),
                ),
                Some(reason) => (
                    "unknown".to_owned(),
                    Some(format!("dead-lettered by the broker: {reason}")),
                ),
                None => ("unknown".to_owned(), None),
            },
        };
        Listed {
            event_id: p
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned())
                .or_else(|| envelope.as_ref().map(|e| e.id.clone())),
            tenant_id: text(TENANT_HEADER)
                .or_else(|| envelope.as_ref().map(|e| e.tenant_id.to_string())),
            event_type: text(EVENT_TYPE_HEADER)
                .or_else(|| envelope.as_ref().map(|e| e.event_type.clone())),
            error_class,
            error,
            attempts: header_int(p, ATTEMPTS_HEADER),
            first_failure: text(FIRST_FAILURE_HEADER),
            last_failure: text(LAST_FAILURE_HEADER),
        }
    }
}
