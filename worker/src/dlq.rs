//! The dead-letter queue: publishing dead letters with their reason, and the operator commands
//! `dlq list`, `dlq replay` and `dlq purge`.
//!
//! Every move is confirmed before the source is removed: a dead letter is acknowledged away only
//! after its republish was confirmed, so an interrupted replay or a broker restart loses nothing.

use avsync_shared::broker::setting_problem;
use avsync_shared::config::CommonArgs;
use avsync_shared::topology::{Topology, EVENT_TYPE_HEADER, TENANT_HEADER};
use avsync_shared::{Envelope, TenantId};
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Subcommand};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::collections::BTreeMap;
use std::io::Write;

pub const ERROR_CLASS_HEADER: &str = "x-avsync-error-class";
pub const ERROR_HEADER: &str = "x-avsync-error";
pub const ATTEMPTS_HEADER: &str = "x-avsync-attempts";
pub const FIRST_FAILURE_HEADER: &str = "x-avsync-first-failure";
pub const LAST_FAILURE_HEADER: &str = "x-avsync-last-failure";

/// Headers the broker sets on delivery or dead-lettering. Copied onto a new message they would
/// lie: a stale `x-delivery-count` would make a replayed message look like poison.
const BROKER_HEADERS: &[&str] = &[
    "x-delivery-count",
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
];

/// Why a message was dead-lettered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

#[derive(Debug, thiserror::Error)]
pub enum RepublishError {
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    #[error("the broker did not confirm the message (nack)")]
    Nacked,
    #[error("the broker returned the message as unroutable to `{0}`")]
    Unroutable(String),
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
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

/// Publishes `body` with `properties` and waits for the broker's confirm. The channel must be in
/// confirm mode.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), RepublishError> {
    let confirmation = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        )
        .await?
        .await?;
    if confirmation.is_nack() {
        return Err(RepublishError::Nacked);
    }
    if confirmation.take_message().is_some() {
        return Err(RepublishError::Unroutable(format!(
            "{exchange}/{routing_key}"
        )));
    }
    Ok(())
}

/// Publishes a dead letter for `delivery` into the topology's dead-letter queue and waits for the
/// confirm. The body and `message_id` stay as they were; the reason goes into headers. The caller
/// acknowledges the original only after this returns Ok.
pub async fn publish_dead_letter(
    channel: &Channel,
    topology: &Topology,
    delivery: &Delivery,
    letter: &DeadLetter,
) -> Result<(), RepublishError> {
    let mut headers = carried_headers(&delivery.properties, &[]);
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
    let properties = delivery
        .properties
        .clone()
        .with_headers(FieldTable::from(headers))
        .with_delivery_mode(2);
    publish_confirmed(
        channel,
        "",
        &topology.dead_queue(),
        &delivery.data,
        properties,
    )
    .await
}

/// `avsync-worker dlq …`
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Show dead letters without removing them.
    List(ListArgs),
    /// Move dead letters back into the events exchange, attempts reset.
    Replay(Selection),
    /// Delete dead letters.
    Purge(Selection),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this tenant's dead letters.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Show at most this many.
    #[arg(long)]
    pub limit: Option<usize>,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

/// Which dead letters a replay or purge takes; one of the three is required, so nothing is ever
/// replayed or purged by accident.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct Selection {
    /// Every dead letter of this tenant.
    #[arg(long)]
    pub tenant: Option<String>,
    /// The dead letter with this event id.
    #[arg(long = "event-id")]
    pub event_id: Option<String>,
    /// Every dead letter.
    #[arg(long)]
    pub all: bool,
}

impl Selection {
    fn matches(&self, letter: &Listed) -> bool {
        if self.all {
            return true;
        }
        if let Some(t) = &self.tenant {
            return letter.tenant_id.as_deref() == Some(t.as_str());
        }
        if let Some(id) = &self.event_id {
            return letter.event_id.as_deref() == Some(id.as_str());
        }
        false
    }
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

fn header<'a>(properties: &'a BasicProperties, key: &str) -> Option<&'a AMQPValue> {
    properties.headers().as_ref()?.inner().get(key)
}

fn value_str(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// An integer header value, whichever integer type the sender chose.
pub(crate) fn value_int(value: &AMQPValue) -> Option<i64> {
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
    pub fn from_delivery(delivery: &Delivery) -> Self {
        let p = &delivery.properties;
        let envelope = Envelope::decode(&delivery.data).ok();
        let text = |key: &str| header(p, key).and_then(value_str);
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
            attempts: header(p, ATTEMPTS_HEADER).and_then(value_int),
            first_failure: text(FIRST_FAILURE_HEADER),
            last_failure: text(LAST_FAILURE_HEADER),
        }
    }
}

async fn connect(common: &CommonArgs) -> anyhow::Result<(Connection, Channel, Topology)> {
    let topology = common.topology()?;
    let connection = Connection::connect(
        &common.amqp_url,
        ConnectionProperties::default().with_connection_name("avsync-worker dlq".into()),
    )
    .await
    .map_err(|e| match setting_problem(&e) {
        Some(problem) => anyhow::anyhow!("cannot connect to the broker: {problem}"),
        None => anyhow::anyhow!("cannot connect to the broker (AVSYNC_AMQP_URL): {e}"),
    })?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((connection, channel, topology))
}

/// The number of dead letters now. Bounds every walk over the queue, so letters that come back
/// during a replay are not taken twice.
async fn dead_count(channel: &Channel, topology: &Topology) -> anyhow::Result<u32> {
    let queue = channel
        .queue_declare(
            topology.dead_queue().as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!("dead-letter queue {} not found: {e}", topology.dead_queue())
        })?;
    Ok(queue.message_count())
}

/// Takes the next dead letter without acknowledging it. Closing the channel hands every letter
/// that was not acknowledged back to the queue, which is what makes `list` non-destructive.
async fn next_letter(channel: &Channel, topology: &Topology) -> anyhow::Result<Option<Delivery>> {
    Ok(channel
        .basic_get(
            topology.dead_queue().as_str().into(),
            BasicGetOptions { no_ack: false },
        )
        .await?
        .map(|m| m.delivery))
}

/// Runs a `dlq` command; its output (and only its output) goes to stdout.
pub async fn run(command: DlqCommand, common: &CommonArgs) -> anyhow::Result<()> {
    run_to(command, common, &mut std::io::stdout()).await
}

/// Runs a `dlq` command, writing its output to `out`; progress goes to stderr.
pub async fn run_to<W: Write>(
    command: DlqCommand,
    common: &CommonArgs,
    out: &mut W,
) -> anyhow::Result<()> {
    let (connection, channel, topology) = connect(common).await?;
    let result = match command {
        DlqCommand::List(args) => list(&channel, &topology, &args, out).await,
        DlqCommand::Replay(selection) => replay(&channel, &topology, &selection, out).await,
        DlqCommand::Purge(selection) => purge(&channel, &topology, &selection, out).await,
    };
    let _ = channel.close(200, "done".into()).await;
    let _ = connection.close(200, "done".into()).await;
    result
}

async fn list<W: Write>(
    channel: &Channel,
    topology: &Topology,
    args: &ListArgs,
    out: &mut W,
) -> anyhow::Result<()> {
    let total = dead_count(channel, topology).await?;
    let mut shown = 0usize;
    if !args.json {
        writeln!(
            out,
            "{:<38} {:<20} {:<24} {:<10} {:>8} {:<24} error",
            "event_id", "tenant_id", "type", "class", "attempts", "last_failure"
        )?;
    }
    for _ in 0..total {
        if args.limit.is_some_and(|limit| shown >= limit) {
            break;
        }
        let Some(delivery) = next_letter(channel, topology).await? else {
            break;
        };
        let listed = Listed::from_delivery(&delivery);
        if args
            .tenant
            .as_deref()
            .is_some_and(|t| listed.tenant_id.as_deref() != Some(t))
        {
            continue;
        }
        shown += 1;
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&listed)?)?;
        } else {
            let dash = || "-".to_owned();
            writeln!(
                out,
                "{:<38} {:<20} {:<24} {:<10} {:>8} {:<24} {}",
                listed.event_id.clone().unwrap_or_else(dash),
                listed.tenant_id.clone().unwrap_or_else(dash),
                listed.event_type.clone().unwrap_or_else(dash),
                listed.error_class,
                listed.attempts.map(|a| a.to_string()).unwrap_or_else(dash),
                listed.last_failure.clone().unwrap_or_else(dash),
                listed.error.clone().unwrap_or_default(),
            )?;
        }
    }
    if !args.json {
        eprintln!("{shown} dead letter(s) shown of {total}");
    }
    Ok(())
}

/// Where a replayed letter goes: its tenant's partition. The tenant comes from the header the
/// ingress set or, for a letter without it, from the body.
fn replay_route(topology: &Topology, delivery: &Delivery) -> Option<(TenantId, String)> {
    let tenant = header(&delivery.properties, TENANT_HEADER)
        .and_then(value_str)
        .and_then(|t| TenantId::parse(&t).ok())
        .or_else(|| Envelope::decode(&delivery.data).ok().map(|e| e.tenant_id))?;
    let key = Topology::routing_key(topology.partition_of(&tenant));
    Some((tenant, key))
}

async fn replay<W: Write>(
    channel: &Channel,
    topology: &Topology,
    selection: &Selection,
    out: &mut W,
) -> anyhow::Result<()> {
    let total = dead_count(channel, topology).await?;
    let mut replayed = 0u64;
    let mut skipped = 0u64;
    for seen in 1..=total {
        let Some(delivery) = next_letter(channel, topology).await? else {
            break;
        };
        if !selection.matches(&Listed::from_delivery(&delivery)) {
            continue;
        }
        let Some((tenant, routing_key)) = replay_route(topology, &delivery) else {
            skipped += 1;
            tracing::warn!(
                event_id = ?delivery.properties.message_id(),
                "dead letter has no valid tenant id; left in the dead-letter queue"
            );
            continue;
        };
        let mut headers = carried_headers(
            &delivery.properties,
            &[
                ERROR_CLASS_HEADER,
                ERROR_HEADER,
                ATTEMPTS_HEADER,
                FIRST_FAILURE_HEADER,
                LAST_FAILURE_HEADER,
            ],
        );
        headers.insert(TENANT_HEADER.into(), long(tenant.as_str()));
        let properties = delivery
            .properties
            .clone()
            .with_headers(FieldTable::from(headers))
            .with_delivery_mode(2);
        publish_confirmed(
            channel,
            &topology.events_exchange(),
            &routing_key,
            &delivery.data,
            properties,
        )
        .await?;
        delivery.acker.ack(BasicAckOptions::default()).await?;
        replayed += 1;
        if seen % 1000 == 0 {
            eprintln!("replay: {seen} of {total} dead letters examined, {replayed} replayed");
        }
    }
    if skipped > 0 {
        eprintln!("{skipped} dead letter(s) without a valid tenant id were left in place");
    }
    writeln!(out, "replayed {replayed}")?;
    Ok(())
}

async fn purge<W: Write>(
    channel: &Channel,
    topology: &Topology,
    selection: &Selection,
    out: &mut W,
) -> anyhow::Result<()> {
    let total = dead_count(channel, topology).await?;
    let mut purged = 0u64;
    for _ in 0..total {
        let Some(delivery) = next_letter(channel, topology).await? else {
            break;
        };
        if selection.matches(&Listed::from_delivery(&delivery)) {
            delivery.acker.ack(BasicAckOptions::default()).await?;
            purged += 1;
        }
    }
    writeln!(out, "purged {purged}")?;
    Ok(())
}
