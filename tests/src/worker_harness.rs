//! Worker instances for tests, started exactly as the binary starts them; per-test tenant
//! databases; random event histories and the model they must produce.

use crate::support::{self, wait_until};
use avsync_shared::broker::headers::{
    ERROR_CLASS_HEADER, ERROR_HEADER, EVENT_TYPE_HEADER, TENANT_HEADER,
};
use avsync_shared::event::{Effect, KNOWN_TYPES};
use avsync_shared::topology::Topology;
use avsync_shared::Envelope;
use avsync_worker::apply::{self, Identity, Model};
use avsync_worker::settings::Settings;
use avsync_worker::Running;
use clap::Parser;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use sqlx::{Connection, PgConnection};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio_util::sync::{CancellationToken, DropGuard};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    settings: Settings,
}

/// `AVSYNC_MAX_CONNECTIONS` of the tests' workers unless a test gives its own: the whole suite
/// shares one PostgreSQL, where `auto` would let every worker take a share of all its slots.
pub const TEST_MAX_CONNECTIONS: &str = "20";

/// Worker settings parsed from flags, as an operator would give them; the budget is pinned at
/// [`TEST_MAX_CONNECTIONS`] unless `args` set `--max-connections`.
pub fn parse_settings(args: &[&str]) -> Settings {
    let pin: &[&str] = if args.contains(&"--max-connections") {
        &[]
    } else {
        &["--max-connections", TEST_MAX_CONNECTIONS]
    };
    let args = std::iter::once("avsync-worker")
        .chain(pin.iter().copied())
        .chain(args.iter().copied());
    Args::try_parse_from(args).expect("worker flags").settings
}

/// Settings for a worker on topology `prefix` writing to the databases of `dbs`, creating them
/// on demand; `extra` flags are appended and replace these defaults.
pub fn settings(prefix: &str, partitions: u16, dbs: &TestDatabases, extra: &[&str]) -> Settings {
    let partitions = partitions.to_string();
    let template = dbs.template();
    let defaults = [
        ("--amqp-url", support::AMQP_URL),
        ("--topology", prefix),
        ("--partitions", &partitions),
        ("--metrics-listen", "127.0.0.1:0"),
        ("--tenant-database-url", &template),
        ("--create-tenant-databases", "true"),
        ("--prefetch", "32"),
    ];
    let mut args = Vec::new();
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    parse_settings(&args)
}

pub struct TestWorker {
    running: Running,
    /// A worker dropped without [`TestWorker::stop`] (its test failed) is told to stop, so
    /// that it takes no more work while the test's databases are dropped.
    shutdown: DropGuard,
    pub metrics_url: String,
}

impl TestWorker {
    /// Starts a worker and waits until it consumes every partition queue.
    pub async fn start(settings: Settings) -> TestWorker {
        let worker = Self::start_unready(settings).await;
        wait_until("worker ready", Duration::from_secs(20), || async {
            worker.running.is_ready().then_some(())
        })
        .await;
        worker
    }

    /// Starts a worker without waiting for it to connect.
    pub async fn start_unready(settings: Settings) -> TestWorker {
        let shutdown = CancellationToken::new();
        let checked = settings.check().expect("usable worker settings");
        let running = avsync_worker::start(checked, shutdown.clone())
            .await
            .expect("worker starts");
        let metrics_url = format!("http://{}", running.metrics_addr);
        TestWorker {
            running,
            shutdown: shutdown.drop_guard(),
            metrics_url,
        }
    }

    pub fn running(&self) -> &Running {
        &self.running
    }

    pub async fn status(&self, path: &str) -> u16 {
        reqwest::get(format!("{}{path}", self.metrics_url))
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    pub async fn metrics_text(&self) -> String {
        reqwest::get(format!("{}/metrics", self.metrics_url))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// `avsync_worker_events_total{type,outcome}` right now.
    pub fn events(&self, event_type: &str, outcome: avsync_worker::metrics::Outcome) -> u64 {
        self.running.metrics().events_total(event_type, outcome)
    }

    /// Graceful stop: finishes in-flight messages, closes pools.
    pub async fn stop(self) {
        drop(self.shutdown);
        tokio::time::timeout(Duration::from_secs(30), self.running.wait())
            .await
            .expect("worker stops within 30 s")
            .expect("worker stops cleanly");
    }
}

/// The tenant databases of one test: every name starts with a unique lowercase prefix, and all
/// are dropped when this is dropped (also when the test panics).
pub struct TestDatabases {
    prefix: String,
}

/// Adds a tenant to the registry table that `conn` is connected to.
pub async fn add_to_registry(conn: &mut PgConnection, tenant: &str, url: &str, enabled: bool) {
    sqlx::query("INSERT INTO avsync_tenants VALUES ($1, $2, $3)")
        .bind(tenant)
        .bind(url)
        .bind(enabled)
        .execute(conn)
        .await
        .unwrap();
}

impl TestDatabases {
    /// A registry database of this test (dropped with the others) with the contract's table
    /// and the given `(tenant, database URL, enabled)` entries; its URL.
    pub async fn registry(&self, entries: &[(&str, String, bool)]) -> String {
        let name = self.name("registry");
        support::create_database(&name).await;
        let mut conn = self.connect(&name).await;
        sqlx::query(
            "CREATE TABLE avsync_tenants (tenant_id text primary key, database_url text not null, enabled boolean not null default true)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        for (tenant, url, enabled) in entries {
            add_to_registry(&mut conn, tenant, url, *enabled).await;
        }
        let _ = conn.close().await;
        support::database_url(&name)
    }

    pub fn new(tag: &str) -> Self {
        Self {
            prefix: support::unique(tag),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `postgres://…/<prefix>_{tenant_id}`
    pub fn template(&self) -> String {
        self.template_as("postgres")
    }

    /// [`Self::template`] for the login role `user`.
    pub fn template_as(&self, user: &str) -> String {
        support::database_url_as(user, &format!("{}_{{tenant_id}}", self.prefix))
    }

    pub fn name(&self, tenant: &str) -> String {
        format!("{}_{tenant}", self.prefix)
    }

    /// Connects to an existing database of this test.
    pub async fn connect(&self, name: &str) -> PgConnection {
        PgConnection::connect(&support::database_url(name))
            .await
            .expect("connect to test database")
    }

    /// Creates and migrates the database `<prefix>_<suffix>`.
    pub async fn migrated(&self, suffix: &str) -> PgConnection {
        let name = self.name(suffix);
        support::create_database(&name).await;
        let mut conn = self.connect(&name).await;
        avsync_worker::tenant_db::provision::migrator()
            .run_direct(&mut conn)
            .await
            .expect("migrations apply");
        conn
    }

    /// Every database of this test that exists now.
    pub async fn existing(&self) -> Vec<String> {
        databases_with_prefix(&mut support::pg_admin().await, &self.prefix).await
    }

    /// A tenant's rows, or None when its database does not exist (yet).
    pub async fn rows(&self, tenant: &str) -> Option<Vec<Identity>> {
        let conn = PgConnection::connect(&support::database_url(&self.name(tenant))).await;
        let mut conn = conn.ok()?;
        let rows = apply::load_all(&mut conn).await.ok();
        let _ = conn.close().await;
        rows
    }

    /// Waits until a tenant's rows equal `expected`.
    pub async fn wait_for_rows(&self, tenant: &str, expected: &[Identity], deadline: Duration) {
        let what = format!("rows of tenant {tenant} to equal the model");
        let mut last = None;
        let found = tokio::time::timeout(deadline, async {
            loop {
                let rows = self.rows(tenant).await;
                if rows.as_deref() == Some(expected) {
                    return;
                }
                last = rows;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        if found.is_err() {
            panic!("timed out waiting for {what}\nexpected: {expected:#?}\nlast seen: {last:#?}");
        }
    }

    pub async fn drop_all(&self) {
        drop_databases_with_prefix(&self.prefix).await;
    }
}

async fn databases_with_prefix(admin: &mut sqlx::PgConnection, prefix: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT datname FROM pg_database WHERE starts_with(datname, $1) ORDER BY datname",
    )
    .bind(format!("{prefix}_"))
    .fetch_all(admin)
    .await
    .expect("list databases")
}

/// Drops every database of `prefix`, and again while any is listed, for up to 10 s: a worker of
/// a failed test, told to stop when it was dropped, may still create one for work it had begun.
async fn drop_databases_with_prefix(prefix: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut admin = support::pg_admin().await;
    let mut errors = Vec::new();
    loop {
        let names = databases_with_prefix(&mut admin, prefix).await;
        if names.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            eprintln!(
                "test databases left behind: {}; last errors: {}",
                names.join(", "),
                errors.join(", ")
            );
            return;
        }
        errors.clear();
        for name in names {
            if let Err(e) = support::try_drop_database(&mut admin, &name).await {
                errors.push(format!("{name}: {e}"));
            }
        }
        if !errors.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for TestDatabases {
    fn drop(&mut self) {
        let prefix = self.prefix.clone();
        // Drop cannot await, and the test's runtime may be unwinding: use a runtime of our own.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(drop_databases_with_prefix(&prefix));
            }
        })
        .join();
    }
}

/// A channel in confirm mode with the topology declared, for publishing as the ingress does.
pub async fn publisher(topology: &Topology) -> (lapin::Connection, Channel) {
    let (conn, ch) = support::channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    topology.declare(&ch).await.expect("declare topology");
    (conn, ch)
}

/// Publishes a body the way the ingress does (persistent, confirmed, routed by tenant). A body
/// whose envelope does not decode (which the ingress would refuse) goes to partition 0.
pub async fn publish(ch: &Channel, topology: &Topology, body: &[u8]) {
    let (id, tenant, event_type, partition) = match Envelope::decode(body) {
        Ok(e) => {
            let p = topology.partition_of(&e.tenant_id);
            (e.id, e.tenant_id.to_string(), e.event_type, p)
        }
        Err(_) => (String::new(), String::new(), String::new(), 0),
    };
    let mut headers = BTreeMap::new();
    headers.insert(
        ShortString::from(TENANT_HEADER),
        AMQPValue::LongString(LongString::from(tenant.as_str())),
    );
    headers.insert(
        ShortString::from(EVENT_TYPE_HEADER),
        AMQPValue::LongString(LongString::from(event_type.as_str())),
    );
    // Not the worker's one-at-a-time publish: a partition is always routable, so nothing can be
    // returned, and the tests publish thousands of events with their confirms pipelined.
    let confirmation = ch
        .basic_publish(
            topology.events_exchange().as_str().into(),
            Topology::routing_key(partition).as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_delivery_mode(2)
                .with_headers(FieldTable::from(headers)),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirmation.is_ack(), "the broker confirmed {id}");
    assert!(
        confirmation.take_message().is_none(),
        "{id} reached its partition"
    );
}

/// One dead letter as the worker wrote it: message id, error class and text, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterSeen {
    pub message_id: String,
    pub class: String,
    pub error: String,
    pub body: Vec<u8>,
}

fn header_text(properties: &BasicProperties, key: &str) -> String {
    match properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(key).cloned())
    {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        _ => String::new(),
    }
}

/// Takes (acknowledges) every dead letter currently in the topology's dead-letter queue.
pub async fn take_dead_letters(ch: &Channel, topology: &Topology) -> Vec<DeadLetterSeen> {
    let mut seen = Vec::new();
    while let Some(m) = ch
        .basic_get(
            topology.dead_queue().as_str().into(),
            BasicGetOptions { no_ack: false },
        )
        .await
        .expect("basic_get")
    {
        let d = m.delivery;
        seen.push(DeadLetterSeen {
            message_id: d
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned())
                .unwrap_or_default(),
            class: header_text(&d.properties, ERROR_CLASS_HEADER),
            error: header_text(&d.properties, ERROR_HEADER),
            body: d.data.clone(),
        });
        d.acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack dead letter");
    }
    seen
}

/// Waits until `n` dead letters were taken from the dead-letter queue.
pub async fn wait_for_dead_letters(
    ch: &Channel,
    topology: &Topology,
    n: usize,
    deadline: Duration,
) -> Vec<DeadLetterSeen> {
    let start = std::time::Instant::now();
    let mut all = Vec::new();
    loop {
        all.extend(take_dead_letters(ch, topology).await);
        if all.len() >= n {
            return all;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {n} dead letter(s); got {all:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a body does, or None when it sets nothing.
pub fn effect_of(body: &[u8]) -> Option<Effect> {
    let envelope = Envelope::decode(body).expect("test bodies have a valid envelope");
    Effect::decode(&envelope, body).expect("test bodies decode")
}

/// The state the bodies must produce: applied in event order, each once.
pub fn model_of(bodies: &[Vec<u8>]) -> Model {
    let mut effects: Vec<Effect> = bodies.iter().filter_map(|b| effect_of(b)).collect();
    effects.sort_by(|a, b| a.key.cmp(&b.key));
    let mut model = Model::default();
    for e in &effects {
        model.apply(e);
    }
    model
}

/// Every type in the catalogue and one it does not know.
fn every_type() -> Vec<&'static str> {
    KNOWN_TYPES
        .iter()
        .copied()
        .chain(["tenant.something_new"])
        .collect()
}

fn random_text(rng: &mut StdRng) -> Option<Value> {
    match rng.random_range(0..5) {
        0 => None,
        1 => Some(Value::Null),
        2 => Some(json!("")),
        _ => Some(json!(["ann", "bob", "cy"]
            .choose(rng)
            .copied()
            .unwrap_or("ann"))),
    }
}

/// `n` random events of every type for `users` users of `tenant`, with timestamps a few
/// milliseconds apart (so ties and id tie-breaks happen) in random offsets, and unique ids.
pub fn random_history(seed: u64, tenant: &str, users: usize, n: usize) -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let types = every_type();
            let event_type = types.choose(&mut rng).copied().unwrap_or(types[0]);
            let mut data = Map::new();
            data.insert(
                "sub".into(),
                json!(format!("user{}", rng.random_range(0..users.max(1)))),
            );
            for key in [
                "email",
                "given_name",
                "family_name",
                "subject_type",
                "membership_id",
                "role_slug",
                "role_id",
                "role_name",
            ] {
                if let Some(v) = random_text(&mut rng) {
                    data.insert(key.into(), v);
                }
            }
            match rng.random_range(0..3) {
                0 => {}
                1 => {
                    data.insert("tenant_roles".into(), Value::Null);
                }
                _ => {
                    let mut roles = vec!["owner", "admin", "member"];
                    roles.shuffle(&mut rng);
                    roles.truncate(rng.random_range(0..3));
                    data.insert("tenant_roles".into(), json!(roles));
                }
            }
            if rng.random_bool(0.5) {
                let mut fields = vec!["email", "given_name", "family_name", "locale"];
                fields.shuffle(&mut rng);
                fields.truncate(rng.random_range(0..4));
                data.insert("changed_fields".into(), json!(fields));
            }
            let ms = rng.random_range(0..(n as i64 / 2).max(2));
            let utc = chrono::DateTime::from_timestamp_millis(1_787_276_403_000 + ms)
                .expect("time in range");
            let offset_minutes = [0, 60, -300, 330].choose(&mut rng).copied().unwrap_or(0);
            let zone = chrono::FixedOffset::east_opt(offset_minutes * 60).expect("offset");
            let timestamp = if offset_minutes == 0 && rng.random_bool(0.5) {
                utc.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            } else {
                utc.with_timezone(&zone)
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, false)
            };
            let prefix = ["a", "b", "c"].choose(&mut rng).copied().unwrap_or("a");
            json!({
                "id": format!("{prefix}-{seed}-{i}"),
                "type": event_type,
                "tenant_id": tenant,
                "timestamp": timestamp,
                "application_id": "app_test",
                "data": data,
            })
            .to_string()
            .into_bytes()
        })
        .collect()
}

/// The bodies in a random order, each at least once and some several times.
pub fn shuffled_with_duplicates(seed: u64, bodies: &[Vec<u8>], duplicates: usize) -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut out: Vec<Vec<u8>> = bodies.to_vec();
    for _ in 0..duplicates {
        if let Some(b) = bodies.choose(&mut rng) {
            out.push(b.clone());
        }
    }
    out.shuffle(&mut rng);
    out
}

/// Publishes every body as [`publish`] does, all confirms awaited together (a quorum queue
/// confirms after its log is synced, so one at a time is slow).
pub async fn publish_all(ch: &Channel, topology: &Topology, bodies: &[Vec<u8>]) {
    futures_util::future::join_all(bodies.iter().map(|b| publish(ch, topology, b))).await;
}
