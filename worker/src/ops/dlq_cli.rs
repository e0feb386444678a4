//! The operator commands `dlq list`, `dlq summary`, `dlq replay` and `dlq purge`: one walk over
//! the dead-letter queue, each command deciding what to do with the letters it meets, which the
//! filters of [`crate::ops::dlq_select`] choose.
//!
//! Every move is confirmed before the source is removed: a dead letter is acknowledged away only
//! after its republish was confirmed, so an interrupted replay or a broker restart loses nothing.
//! A replay keeps up to [`REPLAY_WINDOW`] republishes waiting for their confirms at once (each
//! letter is still acknowledged only after its own confirm), so that a queue of many thousands
//! is replayed at the broker's pace rather than one round trip at a time.

use crate::dlq::Listed;
use crate::ops::dlq_select::{Filter, Filters, Selection};
use crate::ops::dlq_summary::Summary;
use crate::ops::progress;
use avsync_shared::broker::headers::{
    carried_headers, header_str, long, republished, FAILURE_HEADERS, TENANT_HEADER,
};
use avsync_shared::broker::{self, setting_problem, ConfirmedPublisher};
use avsync_shared::config::CommonArgs;
use avsync_shared::topology::Topology;
use avsync_shared::{Envelope, TenantId};
use chrono::Utc;
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use indicatif::ProgressBar;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use std::io::Write;
use tokio::task::JoinSet;

/// Republishes of a replay waiting for their confirms at once.
pub const REPLAY_WINDOW: usize = 256;
/// Letters one walking consumer may hold unacknowledged: the most `basic.qos` allows.
const CONSUMER_WINDOW: u16 = u16::MAX;
/// How long a walk waits for the next letter before it takes the queue for empty.
const WALK_IDLE: std::time::Duration = std::time::Duration::from_secs(5);
/// Longest a walk waits for the queue to count the letters it handed back, and how often it
/// looks.
const RETURN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
const RETURN_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// `avsync-worker dlq …`
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Show dead letters without removing them.
    List(ListArgs),
    /// Count dead letters by error class, tenant and type, with the oldest and newest failure.
    Summary(SummaryArgs),
    /// Move dead letters back into the events exchange, attempts reset.
    Replay(Selection),
    /// Delete dead letters.
    Purge(Selection),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub filters: Filters,
    /// Show at most this many.
    #[arg(long)]
    pub limit: Option<usize>,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct SummaryArgs {
    #[command(flatten)]
    pub filters: Filters,
    /// One JSON object.
    #[arg(long)]
    pub json: bool,
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

/// One dead letter a walk met: the message and what `dlq list` shows of it.
struct Letter {
    delivery: Delivery,
    listed: Listed,
}

/// A walk that has met its letters; its channels still hold the ones nobody acknowledged.
struct Walked {
    /// The letters in the queue when the walk began.
    total: u32,
    channels: Vec<Channel>,
}

impl Walked {
    /// Closes the walk's channels, each after the acknowledgements sent on it (the broker takes
    /// a channel's frames in order), so the letters nobody acknowledged go back to the queue and
    /// no acknowledgement is lost to a connection closing first. A quorum queue counts a letter
    /// handed back only once its log has applied the return, a moment after the close: the walk
    /// ends when the queue counts them again (the `taken` ones aside), for at most
    /// [`RETURN_WAIT`], so that a command right after this one finds every letter. Returns the
    /// walk's total.
    async fn close(self, channel: &Channel, topology: &Topology, taken: u64) -> u32 {
        for channel in self.channels {
            let _ = channel.close(200, "walked".into()).await;
        }
        let back = u64::from(self.total).saturating_sub(taken);
        let deadline = tokio::time::Instant::now() + RETURN_WAIT;
        while tokio::time::Instant::now() < deadline {
            match dead_count(channel, topology).await {
                Ok(count) if u64::from(count) < back => {
                    tokio::time::sleep(RETURN_POLL).await;
                }
                _ => break,
            }
        }
        self.total
    }
}

/// Whether a walk goes on after a letter.
enum Walk {
    On,
    Stop,
}

/// Takes each letter that was in the queue when the walk began, once, without acknowledging it,
/// and hands it to `visit`, counting it on `progress`. Returns the count it began with.
///
/// The letters come from consumers, one per [`CONSUMER_WINDOW`] letters, each on a channel of its
/// own: a `basic.get` per letter costs a quorum-queue round trip (minutes for a queue of many
/// thousands), and a consumer holds at most its prefetch unacknowledged (2,000 when unbounded, on
/// a quorum queue). The caller closes the walk ([`Walked::close`]) once every acknowledgement it
/// started was sent: closing a channel hands every letter nobody acknowledged back to the queue,
/// which is what makes `list` non-destructive. A queue that gives nothing for [`WALK_IDLE`]
/// (emptied by someone else meanwhile) ends the walk early.
async fn walk(
    connection: &Connection,
    channel: &Channel,
    topology: &Topology,
    progress: &ProgressBar,
    mut visit: impl AsyncFnMut(Letter) -> anyhow::Result<Walk>,
) -> anyhow::Result<Walked> {
    let total = dead_count(channel, topology).await?;
    progress.set_length(u64::from(total));
    let mut consumers = Vec::new();
    let mut channels = Vec::new();
    for _ in 0..total.div_ceil(u32::from(CONSUMER_WINDOW)) {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(CONSUMER_WINDOW, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                topology.dead_queue().as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        consumers.push(consumer);
        channels.push(channel);
    }
    let mut letters = futures_util::stream::select_all(consumers);
    for seen in 0..total {
        let delivery = match tokio::time::timeout(WALK_IDLE, letters.next()).await {
            Ok(Some(delivery)) => delivery?,
            Ok(None) => break,
            Err(_) => {
                tracing::warn!(
                    seen,
                    total,
                    "the dead-letter queue gave no more letters; stopping early"
                );
                break;
            }
        };
        progress.inc(1);
        let listed = Listed::from_delivery(&delivery);
        if let Walk::Stop = visit(Letter { delivery, listed }).await? {
            break;
        }
    }
    Ok(Walked { total, channels })
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
    // The filter first: a window that ends before it begins needs no broker to be refused.
    let now = Utc::now();
    let filter = match &command {
        DlqCommand::List(ListArgs { filters, .. })
        | DlqCommand::Summary(SummaryArgs { filters, .. }) => filters.at(now),
        DlqCommand::Replay(selection) | DlqCommand::Purge(selection) => selection.at(now),
    }
    .map_err(anyhow::Error::msg)?;
    let (connection, publisher, topology) = connect(common).await?;
    let channel = publisher.channel();
    let result = match command {
        DlqCommand::List(args) => list(&connection, channel, &topology, &filter, &args, out).await,
        DlqCommand::Summary(args) => {
            summary(&connection, channel, &topology, &filter, args.json, out).await
        }
        DlqCommand::Replay(_) => replay(&connection, &publisher, &topology, &filter, out).await,
        DlqCommand::Purge(_) => purge(&connection, channel, &topology, &filter, out).await,
    };
    let _ = channel.close(200, "done".into()).await;
    let _ = connection.close(200, "done".into()).await;
    result
}

async fn list<W: Write>(
    connection: &Connection,
    channel: &Channel,
    topology: &Topology,
    filter: &Filter,
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
    let total = walk(
        connection,
        channel,
        topology,
        &ProgressBar::hidden(),
        async |letter: Letter| {
            if args.limit.is_some_and(|limit| shown >= limit) {
                return Ok(Walk::Stop);
            }
            let listed = letter.listed;
            if !filter.matches(&listed) {
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
        },
    )
    .await?
    .close(channel, topology, 0)
    .await;
    if !args.json {
        eprintln!("{shown} dead letter(s) shown of {total}");
    }
    Ok(())
}

async fn summary<W: Write>(
    connection: &Connection,
    channel: &Channel,
    topology: &Topology,
    filter: &Filter,
    json: bool,
    out: &mut W,
) -> anyhow::Result<()> {
    let mut summary = Summary::default();
    walk(
        connection,
        channel,
        topology,
        &ProgressBar::hidden(),
        async |letter: Letter| {
            if filter.matches(&letter.listed) {
                summary.add(&letter.listed);
            }
            Ok(Walk::On)
        },
    )
    .await?
    .close(channel, topology, 0)
    .await;
    if json {
        writeln!(out, "{}", serde_json::to_string(&summary)?)?;
    } else {
        write!(out, "{summary}")?;
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
    connection: &Connection,
    publisher: &ConfirmedPublisher,
    topology: &Topology,
    filter: &Filter,
    out: &mut W,
) -> anyhow::Result<()> {
    let mut replayed = 0u64;
    let mut skipped = 0u64;
    let mut confirming: JoinSet<anyhow::Result<()>> = JoinSet::new();
    let progress = progress::bar("replay", 0, false);
    let walked = walk(
        connection,
        publisher.channel(),
        topology,
        &progress,
        async |letter: Letter| {
            let Letter { delivery, listed } = letter;
            if !filter.matches(&listed) {
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
            while confirming.len() >= REPLAY_WINDOW {
                settled(confirming.join_next().await, &mut replayed)?;
            }
            let mut headers = carried_headers(&delivery.properties, &FAILURE_HEADERS);
            headers.insert(TENANT_HEADER.into(), long(tenant.as_str()));
            let properties = republished(&delivery.properties, headers);
            let publisher = publisher.clone();
            let exchange = topology.events_exchange();
            confirming.spawn(async move {
                publisher
                    .publish(&exchange, &routing_key, &delivery.data, properties)
                    .await?;
                delivery.acker.ack(BasicAckOptions::default()).await?;
                Ok(())
            });
            progress.set_message(format!("{replayed} replayed"));
            Ok(Walk::On)
        },
    )
    .await?;
    while let Some(done) = confirming.join_next().await {
        settled(Some(done), &mut replayed)?;
    }
    walked.close(publisher.channel(), topology, replayed).await;
    progress.finish_and_clear();
    if skipped > 0 {
        eprintln!("{skipped} dead letter(s) without a valid tenant id were left in place");
    }
    writeln!(out, "replayed {replayed}")?;
    Ok(())
}

/// Counts a republish whose confirm came and whose dead letter was acknowledged; its failure
/// ends the replay (the letters not yet acknowledged stay in the dead-letter queue).
fn settled(
    done: Option<Result<anyhow::Result<()>, tokio::task::JoinError>>,
    replayed: &mut u64,
) -> anyhow::Result<()> {
    if let Some(done) = done {
        done??;
        *replayed += 1;
    }
    Ok(())
}

async fn purge<W: Write>(
    connection: &Connection,
    channel: &Channel,
    topology: &Topology,
    filter: &Filter,
    out: &mut W,
) -> anyhow::Result<()> {
    let mut purged = 0u64;
    let progress = progress::bar("purge", 0, false);
    walk(
        connection,
        channel,
        topology,
        &progress,
        async |letter: Letter| {
            if filter.matches(&letter.listed) {
                letter
                    .delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await?;
                purged += 1;
                progress.set_message(format!("{purged} purged"));
            }
            Ok(Walk::On)
        },
    )
    .await?
    .close(channel, topology, purged)
    .await;
    progress.finish_and_clear();
    writeln!(out, "purged {purged}")?;
    Ok(())
}
