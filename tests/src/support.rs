//! Unique names, service connections, cleanup and deadline-bound waiting.

use avsync_shared::config::parse_duration;
use avsync_shared::topology::format_duration;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Channel, Connection, ConnectionProperties};
use sqlx::{Connection as _, PgConnection};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

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
    channel_at(AMQP_URL).await
}

/// A connection and channel to the broker at `url` (a test's own cluster node, say).
pub async fn channel_at(url: &str) -> (Connection, Channel) {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .expect("the test's broker answers");
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

/// The retry tiers of the default `AVSYNC_RETRY_DELAYS`: among them the set-aside tiers (5s, 30s)
/// every worker declares whatever its ladder.
pub const DEFAULT_RETRY_TIERS: &[&str] = &["1s", "5s", "30s", "2m", "10m", "1h"];

/// Deletes every exchange and queue of a topology prefix that the tests may have made: the
/// partitions (and a few beyond), the dead-letter queue, the default retry tiers and `retry_tiers`.
pub async fn delete_topology(prefix: &str, partitions: u16, retry_tiers: &[&str]) {
    let retry_tiers: Vec<&str> = DEFAULT_RETRY_TIERS
        .iter()
        .chain(retry_tiers)
        .copied()
        .collect();
    let (conn, ch) = channel().await;
    let mut queues = vec![format!("{prefix}.dead")];
    for p in 0..partitions + 4 {
        queues.push(format!("{prefix}.events.p{p}"));
    }
    for tier in &retry_tiers {
        queues.push(format!("{prefix}.retry.{tier}"));
    }
    for q in &queues {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let mut exchanges = vec![format!("{prefix}.events")];
    for tier in &retry_tiers {
        exchanges.push(format!("{prefix}.retry.{tier}"));
    }
    for e in &exchanges {
        let _ = ch
            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "cleanup".into()).await;
}

/// The delays of a `--retry-delays <delays>` value, one retry tier each.
pub fn retry_delays_of(delays: &str) -> Vec<Duration> {
    delays
        .split(',')
        .map(|d| parse_duration(d.trim()).expect("a valid retry delay"))
        .collect()
}

/// Deletes a topology when dropped, also when the test panics, so reruns start clean: its
/// partitions, dead-letter queue, the default retry tiers and those of [`Self::with_retry_delays`].
pub struct TopologyCleanup {
    prefix: String,
    partitions: u16,
    retry_tiers: Vec<String>,
}

impl TopologyCleanup {
    pub fn new(prefix: &str, partitions: u16) -> Self {
        Self {
            prefix: prefix.to_owned(),
            partitions,
            retry_tiers: Vec::new(),
        }
    }

    /// Also deletes the tiers of the test's workers' `--retry-delays`, named as the worker names
    /// them (`1000ms` is the tier `1s`).
    pub fn with_retry_delays(mut self, delays: &str) -> Self {
        self.retry_tiers = retry_delays_of(delays)
            .into_iter()
            .map(format_duration)
            .collect();
        self
    }
}

impl Drop for TopologyCleanup {
    fn drop(&mut self) {
        let prefix = self.prefix.clone();
        let partitions = self.partitions;
        let retry_tiers = self.retry_tiers.clone();
        // Drop cannot await, and the test's runtime may be unwinding: use a runtime of our own.
        let cleaned = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let tiers: Vec<&str> = retry_tiers.iter().map(String::as_str).collect();
                rt.block_on(delete_topology(&prefix, partitions, &tiers));
            }
        })
        .join();
        if cleaned.is_err() {
            eprintln!("could not delete topology {}", self.prefix);
        }
    }
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
    database_url_as("postgres", name)
}

/// The URL of database `name` for the login role `user` (trust auth: no password).
pub fn database_url_as(user: &str, name: &str) -> String {
    format!("postgres://{user}@127.0.0.1:5432/{name}")
}

pub async fn create_database(name: &str) {
    let mut admin = pg_admin().await;
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut admin)
        .await
        .expect("create database");
}

/// Drops database `name`, tried again for up to 10 s: a worker still running beside a test that
/// failed can open a session while the drop waits for those it ended to go, and the drop fails.
pub async fn drop_database(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut admin = pg_admin().await;
    while let Err(e) = try_drop_database(&mut admin, name).await {
        if Instant::now() > deadline {
            eprintln!("test database {name} left behind: {e}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One attempt to drop database `name` over `admin` (see [`pg_admin`]), ending the sessions it
/// has.
pub async fn try_drop_database(admin: &mut PgConnection, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(admin)
        .await
        .map(drop)
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

/// A TCP proxy the test can cut (every connection dropped, new ones closed at once) and restore:
/// takes the broker or PostgreSQL away from a process without touching the shared service.
pub struct TcpProxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    generation: Mutex<CancellationToken>,
    stop: CancellationToken,
}

impl TcpProxy {
    pub async fn start(target: &str) -> Arc<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let proxy = Arc::new(Self {
            port: listener.local_addr().expect("proxy address").port(),
            up: Arc::new(AtomicBool::new(true)),
            generation: Mutex::new(CancellationToken::new()),
            stop: CancellationToken::new(),
        });
        let me = proxy.clone();
        let target = target.to_owned();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = me.stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut client, _)) = accepted else {
                    continue;
                };
                if !me.up.load(Ordering::SeqCst) {
                    continue;
                }
                let cut = me.generation.lock().expect("proxy lock").clone();
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut upstream) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                    }
                });
            }
        });
        proxy
    }

    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut generation = self.generation.lock().expect("proxy lock");
        generation.cancel();
        *generation = CancellationToken::new();
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Ok(generation) = self.generation.lock() {
            generation.cancel();
        }
    }
}
