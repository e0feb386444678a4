//! Everything a run creates on the broker and the database server, registered before it is
//! created, so that one cleanup removes it after success, failure or Ctrl-C.

use crate::support;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use sqlx::{Connection as _, PgConnection};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Databases dropped at once. Each drop waits for a checkpoint and concurrent drops share one:
/// with other writers on the server, 16 at once dropped 100 databases twelve times faster than 4.
/// Few enough connections to leave PostgreSQL's default 100 for everyone else.
const DROP_CONCURRENCY: usize = 16;

#[derive(Debug, Default)]
struct Created {
    /// Topology prefixes with their partition count and retry tier names.
    topologies: Vec<(String, u16, Vec<String>)>,
    queues: Vec<String>,
    /// Every database whose name starts with `<prefix>_`.
    database_prefixes: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Resources {
    created: Arc<Mutex<Created>>,
}

impl Resources {
    fn with<T>(&self, f: impl FnOnce(&mut Created) -> T) -> T {
        f(&mut self.created.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn topology(&self, prefix: &str, partitions: u16, retry_tiers: &[String]) {
        self.with(|c| {
            c.topologies
                .push((prefix.to_owned(), partitions, retry_tiers.to_vec()))
        });
    }

    pub fn queue(&self, name: &str) {
        self.with(|c| c.queues.push(name.to_owned()));
    }

    pub fn databases(&self, prefix: &str) {
        self.with(|c| c.database_prefixes.push(prefix.to_owned()));
    }

    /// Deletes every registered queue, topology and database; returns how many databases were
    /// dropped. Failures are reported on stderr and do not stop the rest.
    pub async fn clean(&self) -> usize {
        let created = self.with(std::mem::take);
        let mut broker = Broker::default();
        for queue in broker_queues(&created) {
            broker.delete(Kind::Queue, &queue).await;
        }
        for exchange in broker_exchanges(&created) {
            broker.delete(Kind::Exchange, &exchange).await;
        }
        broker.close().await;
        let mut dropped = 0;
        for prefix in &created.database_prefixes {
            match drop_databases(prefix).await {
                Ok(n) => dropped += n,
                Err(e) => eprintln!("could not drop the databases {prefix}_*: {e}"),
            }
        }
        dropped
    }
}

fn broker_queues(created: &Created) -> Vec<String> {
    let mut queues = created.queues.clone();
    for (prefix, partitions, tiers) in &created.topologies {
        queues.extend((0..*partitions).map(|p| format!("{prefix}.events.p{p}")));
        queues.push(format!("{prefix}.dead"));
        queues.extend(tiers.iter().map(|t| format!("{prefix}.retry.{t}")));
    }
    queues
}

fn broker_exchanges(created: &Created) -> Vec<String> {
    let mut exchanges = Vec::new();
    for (prefix, _, tiers) in &created.topologies {
        exchanges.push(format!("{prefix}.events"));
        exchanges.extend(tiers.iter().map(|t| format!("{prefix}.retry.{t}")));
    }
    exchanges
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Queue,
    Exchange,
}

/// Deletes broker objects one channel each, reconnecting after a failure: a worker killed a
/// moment earlier can make RabbitMQ answer a quorum queue's deletion with a connection error.
#[derive(Default)]
struct Broker {
    connection: Option<Connection>,
}

impl Broker {
    const ATTEMPTS: u32 = 3;
    const PAUSE: Duration = Duration::from_millis(500);

    async fn delete(&mut self, kind: Kind, name: &str) {
        for attempt in 1..=Self::ATTEMPTS {
            match self.try_delete(kind, name).await {
                Ok(()) => return,
                // Already gone (a retry tier no worker declared): nothing to do.
                Err(e) if is_not_found(&e) => return,
                Err(e) if attempt == Self::ATTEMPTS => {
                    eprintln!("could not delete {kind:?} {name} (remove it by hand): {e}");
                }
                Err(_) => {
                    self.connection = None;
                    tokio::time::sleep(Self::PAUSE).await;
                }
            }
        }
    }

    async fn try_delete(&mut self, kind: Kind, name: &str) -> Result<(), lapin::Error> {
        let connection = match self.connection.take() {
            Some(c) if c.status().connected() => c,
            _ => Connection::connect(support::AMQP_URL, ConnectionProperties::default()).await?,
        };
        let channel = connection.create_channel().await;
        self.connection = Some(connection);
        let channel = channel?;
        match kind {
            Kind::Queue => channel
                .queue_delete(name.into(), QueueDeleteOptions::default())
                .await
                .map(|_| ())?,
            Kind::Exchange => {
                channel
                    .exchange_delete(name.into(), ExchangeDeleteOptions::default())
                    .await?
            }
        }
        // Closed here, not on drop: a channel still closing when its connection closes is an
        // error.
        let _ = channel.close(200, "bench cleanup".into()).await;
        Ok(())
    }

    async fn close(self) {
        if let Some(connection) = self.connection {
            let _ = connection.close(200, "bench cleanup".into()).await;
        }
    }
}

fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404)
}

/// Drops every database named `<prefix>_…`, closing whatever still uses it, several at once.
async fn drop_databases(prefix: &str) -> Result<usize, sqlx::Error> {
    let mut admin = PgConnection::connect(support::PG_ADMIN_URL).await?;
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE starts_with(datname, $1)")
            .bind(format!("{prefix}_"))
            .fetch_all(&mut admin)
            .await?;
    let _ = admin.close().await;
    let count = names.len();
    let shares: Vec<Vec<String>> = (0..DROP_CONCURRENCY)
        .map(|k| {
            names
                .iter()
                .skip(k)
                .step_by(DROP_CONCURRENCY)
                .cloned()
                .collect()
        })
        .collect();
    futures_util::future::try_join_all(shares.into_iter().map(drop_each)).await?;
    Ok(count)
}

async fn drop_each(names: Vec<String>) -> Result<(), sqlx::Error> {
    if names.is_empty() {
        return Ok(());
    }
    let mut admin = PgConnection::connect(support::PG_ADMIN_URL).await?;
    for name in &names {
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            avsync_worker::tenant_db::provision::quote_identifier(name)
        ))
        .execute(&mut admin)
        .await?;
    }
    let _ = admin.close().await;
    Ok(())
}
