//! Unique names, service connections, cleanup and deadline-bound waiting.

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Channel, Connection, ConnectionProperties};
use sqlx::{Connection as _, PgConnection};
use std::future::Future;
use std::time::{Duration, Instant};

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A short name unique across processes and reruns: `<tag>_<12 hex>`, lowercase.
pub fn unique(tag: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{tag}_{}", &id[..12])
}

pub async fn amqp() -> Connection {
    Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .expect("RabbitMQ at 127.0.0.1:5672 (see README: start it with rabbitmq-server -detached)")
}

pub async fn channel() -> (Connection, Channel) {
    let conn = amqp().await;
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

/// Deletes every exchange and queue of a topology prefix that the tests may have made.
pub async fn delete_topology(prefix: &str, partitions: u16, retry_tiers: &[&str]) {
    let (conn, ch) = channel().await;
    let mut queues = vec![format!("{prefix}.dead")];
    for p in 0..partitions + 4 {
        queues.push(format!("{prefix}.events.p{p}"));
    }
    for tier in retry_tiers {
        queues.push(format!("{prefix}.retry.{tier}"));
    }
    for q in &queues {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let mut exchanges = vec![format!("{prefix}.events")];
    for tier in retry_tiers {
        exchanges.push(format!("{prefix}.retry.{tier}"));
    }
    for e in &exchanges {
        let _ = ch
            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "cleanup".into()).await;
}

/// The number of ready messages in a queue (passive declare), or None when it does not exist.
pub async fn queue_depth(ch: &Channel, queue: &str) -> Option<u32> {
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .ok()
    .map(|q| q.message_count())
}

pub async fn pg_admin() -> PgConnection {
    PgConnection::connect(PG_ADMIN_URL)
        .await
        .expect("PostgreSQL at 127.0.0.1:5432 (see README)")
}

pub fn database_url(name: &str) -> String {
    format!("postgres://postgres@127.0.0.1:5432/{name}")
}

pub async fn create_database(name: &str) {
    let mut admin = pg_admin().await;
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut admin)
        .await
        .expect("create database");
}

pub async fn drop_database(name: &str) {
    let mut admin = pg_admin().await;
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(&mut admin)
        .await;
}

/// Polls `check` until it returns Some or `deadline` passes; panics naming `what` on timeout.
pub async fn wait_until<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
