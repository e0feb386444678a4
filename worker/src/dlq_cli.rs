//! The operator commands `dlq list`, `dlq replay` and `dlq purge`: one walk over the dead-letter
//! queue, each command deciding what to do with the letters it meets.
//!
//! Every move is confirmed before the source is removed: a dead letter is acknowledged away only
//! after its republish was confirmed, so an interrupted replay or a broker restart loses nothing.

use crate::dlq::Listed;
use avsync_shared::broker::headers::{
    carried_headers, header_str, long, republished, FAILURE_HEADERS, TENANT_HEADER,
};
use avsync_shared::broker::{self, setting_problem, ConfirmedPublisher};
use avsync_shared::config::CommonArgs;
use avsync_shared::topology::Topology;
use avsync_shared::{Envelope, TenantId};
use clap::{Args, Subcommand};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use std::io::Write;

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

async fn connect(
    common: &CommonArgs,
) -> anyhow::Result<(Connection, ConfirmedPublisher, Topology)> {
    let topology = common.topology()?;
    let connection = broker::connect(&common.amqp_url, "avsync-worker dlq")
        .await
        .map_err(|e| match setting_problem(&e) {
            Some(problem) => anyhow::anyhow!("cannot connect to the broker: {problem}"),
            None => anyhow::anyhow!("cannot connect to the broker (AVSYNC_AMQP_URL): {e}"),
        })?;
    let publisher = ConfirmedPublisher::open(connection.create_channel().await?).await?;
    Ok((connection, publisher, topology))
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

/// One dead letter a walk met: the message, what `dlq list` shows of it, and its place among the
/// `total` the walk takes.
struct Letter {
    delivery: Delivery,
    listed: Listed,
    seen: u32,
    total: u32,
}

/// Whether a walk goes on after a letter.
enum Walk {
    On,
    Stop,
}

/// Takes each letter that was in the queue when the walk began, once, without acknowledging it,
/// and hands it to `visit`. Closing the channel hands every letter `visit` did not acknowledge
/// back to the queue, which is what makes `list` non-destructive. Returns the count it began with.
async fn walk(
    channel: &Channel,
    topology: &Topology,
    mut visit: impl AsyncFnMut(Letter) -> anyhow::Result<Walk>,
) -> anyhow::Result<u32> {
    let total = dead_count(channel, topology).await?;
    for seen in 1..=total {
        let Some(got) = channel
            .basic_get(
                topology.dead_queue().as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await?
        else {
            break;
        };
        let delivery = got.delivery;
        let listed = Listed::from_delivery(&delivery);
        let letter = Letter {
            delivery,
            listed,
            seen,
            total,
        };
        if let Walk::Stop = visit(letter).await? {
            break;
        }
    }
    Ok(total)
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
    let (connection, publisher, topology) = connect(common).await?;
    let channel = publisher.channel();
    let result = match command {
        DlqCommand::List(args) => list(channel, &topology, &args, out).await,
        DlqCommand::Replay(selection) => replay(&publisher, &topology, &selection, out).await,
        DlqCommand::Purge(selection) => purge(channel, &topology, &selection, out).await,
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
    let mut shown = 0usize;
    if !args.json {
        writeln!(
            out,
            "{:<38} {:<20} {:<24} {:<10} {:>8} {:<24} error",
            "event_id", "tenant_id", "type", "class", "attempts", "last_failure"
        )?;
    }
    let total = walk(channel, topology, async |letter: Letter| {
        if args.limit.is_some_and(|limit| shown >= limit) {
            return Ok(Walk::Stop);
        }
        let listed = letter.listed;
        if args
            .tenant
            .as_deref()
            .is_some_and(|t| listed.tenant_id.as_deref() != Some(t))
        {
            return Ok(Walk::On);
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
        Ok(Walk::On)
    })
    .await?;
    if !args.json {
        eprintln!("{shown} dead letter(s) shown of {total}");
    }
    Ok(())
}

/// Where a replayed letter goes: its tenant's partition. The tenant comes from the header the
/// ingress set or, for a letter without it, from the body.
fn replay_route(topology: &Topology, delivery: &Delivery) -> Option<(TenantId, String)> {
    let tenant = header_str(&delivery.properties, TENANT_HEADER)
        .and_then(|t| TenantId::parse(&t).ok())
        .or_else(|| Envelope::decode(&delivery.data).ok().map(|e| e.tenant_id))?;
    let key = Topology::routing_key(topology.partition_of(&tenant));
    Some((tenant, key))
}

async fn replay<W: Write>(
    publisher: &ConfirmedPublisher,
    topology: &Topology,
    selection: &Selection,
    out: &mut W,
) -> anyhow::Result<()> {
    let mut replayed = 0u64;
    let mut skipped = 0u64;
    walk(publisher.channel(), topology, async |letter: Letter| {
        let Letter {
            delivery,
            listed,
            seen,
            total,
        } = letter;
        if !selection.matches(&listed) {
            return Ok(Walk::On);
        }
        let Some((tenant, routing_key)) = replay_route(topology, &delivery) else {
            skipped += 1;
            tracing::warn!(
                event_id = ?delivery.properties.message_id(),
                "dead letter has no valid tenant id; left in the dead-letter queue"
            );
            return Ok(Walk::On);
        };
        let mut headers = carried_headers(&delivery.properties, &FAILURE_HEADERS);
        headers.insert(TENANT_HEADER.into(), long(tenant.as_str()));
        let properties = republished(&delivery.properties, headers);
        publisher
            .publish(
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
        Ok(Walk::On)
    })
    .await?;
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
    let mut purged = 0u64;
    walk(channel, topology, async |letter: Letter| {
        if selection.matches(&letter.listed) {
            letter
                .delivery
                .acker
                .ack(BasicAckOptions::default())
                .await?;
            purged += 1;
        }
        Ok(Walk::On)
    })
    .await?;
    writeln!(out, "purged {purged}")?;
    Ok(())
}
