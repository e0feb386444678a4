//! Many tenants on a bounded number of connections: the budget is never exceeded, a server or
//! database refusing connections is backpressure, and a stuck tenant holds neither the
//! partition nor the budget hostage.

use avsync_shared::event::KNOWN_TYPES;
use avsync_shared::topology::Topology;
use avsync_shared::TenantId;
use avsync_tests::support::{self, queue_depth, wait_until, TopologyCleanup};
use avsync_tests::worker_harness::{
    model_of, publish_all, publisher, random_history, settings, shuffled_with_duplicates,
    TestDatabases, TestWorker,
};
use avsync_worker::metrics::Outcome;
use avsync_worker::metrics::SetAsideReason;
use lapin::Channel;
use sqlx::{Connection, PgConnection};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Every event type's count of `outcome` in this worker.
fn total(worker: &TestWorker, outcome: Outcome) -> u64 {
    KNOWN_TYPES
        .iter()
        .copied()
        .chain(["other"])
        .map(|t| worker.events(t, outcome))
        .sum()
}

/// The worker retried and dead-lettered nothing, and nothing waits in the dead-letter queue.
async fn nothing_retried_or_dead_lettered(worker: &TestWorker, ch: &Channel, topology: &Topology) {
    assert_eq!(total(worker, Outcome::Retried), 0);
    assert_eq!(total(worker, Outcome::DeadLettered), 0);
    assert_eq!(queue_depth(ch, &topology.dead_queue()).await, Some(0));
}

/// Samples, until dropped, how many sessions the worker holds to this test's databases.
struct SessionSampler {
    most: Arc<AtomicI64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl SessionSampler {
    async fn start(database_prefix: &str) -> Self {
        let most = Arc::new(AtomicI64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut conn = support::pg_admin().await;
        let pattern = format!("{database_prefix}_");
        let (m, s) = (most.clone(), stop.clone());
        let task = tokio::spawn(async move {
            while !s.load(Ordering::SeqCst) {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE starts_with(application_name, 'avsync-worker') AND starts_with(datname, $1)",
                )
                .bind(&pattern)
                .fetch_one(&mut conn)
                .await
                .expect("sample pg_stat_activity");
                m.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = conn.close().await;
        });
        Self { most, stop, task }
    }

    async fn finish(self) -> i64 {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        self.most.load(Ordering::SeqCst)
    }
}

/// 40 tenants through a budget of 8: PostgreSQL never sees more than 8 of the worker's
/// sessions, every event is applied, nothing is retried or dead-lettered.
#[tokio::test]
async fn the_budget_is_never_exceeded() {
    const PARTITIONS: u16 = 4;
    const TENANTS: usize = 40;
    let prefix = support::unique("wbud");
    let _cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("wbud");
    let tenants: Vec<String> = (0..TENANTS).map(|i| format!("t{i}")).collect();
    // Created beforehand, so that every session of the worker is one the sampler can see; the
    // worker migrates each on first use.
    for tenant in &tenants {
        support::create_database(&dbs.name(tenant)).await;
    }
    let sampler = SessionSampler::start(dbs.prefix()).await;
    let worker = TestWorker::start(settings(
        &prefix,
        PARTITIONS,
        &dbs,
        &[
            "--max-connections",
            "8",
            "--create-tenant-databases",
            "false",
            "--prefetch",
            "256",
        ],
    ))
    .await;
    let (_conn, ch) = publisher(&topology).await;
    let histories: Vec<Vec<Vec<u8>>> = tenants
        .iter()
        .enumerate()
        .map(|(i, t)| random_history(700 + i as u64, t, 4, 30))
        .collect();
    let all: Vec<Vec<u8>> = histories.iter().flatten().cloned().collect();
    publish_all(&ch, &topology, &shuffled_with_duplicates(71, &all, 50)).await;
    for (tenant, history) in tenants.iter().zip(&histories) {
        dbs.wait_for_rows(
            tenant,
            &model_of(history).identities(),
            Duration::from_secs(60),
        )
        .await;
    }
    let most = sampler.finish().await;
    assert!(
        most <= 8,
        "{most} sessions of the worker at once, over its budget of 8"
    );
    assert!(most >= 1, "the sampler saw the worker's sessions");
    nothing_retried_or_dead_lettered(&worker, &ch, &topology).await;
    let metrics = worker.running().metrics();
    assert!(
        metrics.tenant_pools.budget_closes.get() > 0,
        "idle sessions were closed to make room"
    );
    assert!(
        metrics.tenant_pools.migrations_skipped.get() > 0,
        "reopened sessions did not check migrations again"
    );
    let text = worker.metrics_text().await;
    assert!(
        text.contains("avsync_worker_connection_budget{server=\"127.0.0.1:5432\"} 8\n"),
        "{text}"
    );
    worker.stop().await;
}

/// A login role without superuser (PostgreSQL exempts superusers from a database's connection
/// limit), dropped with the test's databases.
struct TestRole {
    name: String,
}

impl TestRole {
    async fn create(name: &str) -> Self {
        Self::limited(name, -1).await
    }

    /// A role that PostgreSQL lets hold at most `limit` sessions (-1: no limit).
    async fn limited(name: &str, limit: i32) -> Self {
        let mut admin = support::pg_admin().await;
        sqlx::query(&format!(
            "CREATE ROLE \"{name}\" LOGIN CONNECTION LIMIT {limit}"
        ))
        .execute(&mut admin)
        .await
        .expect("create role");
        let _ = admin.close().await;
        Self {
            name: name.to_owned(),
        }
    }

    /// A database owned by the role (so that it may migrate it), limited to `limit` sessions.
    async fn database(&self, name: &str, limit: i32) {
        let mut admin = support::pg_admin().await;
        sqlx::query(&format!(
            "CREATE DATABASE \"{name}\" OWNER \"{}\" CONNECTION LIMIT {limit}",
            self.name
        ))
        .execute(&mut admin)
        .await
        .expect("create database");
        let _ = admin.close().await;
    }
}

impl Drop for TestRole {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    let mut admin = support::pg_admin().await;
                    let _ = sqlx::query(&format!("DROP ROLE IF EXISTS \"{name}\""))
                        .execute(&mut admin)
                        .await;
                });
            }
        })
        .join();
    }
}

/// A database at its own CONNECTION LIMIT (the test holds its one session): its events wait
/// (set aside, no attempt counted) while another tenant's are applied, and all are applied
/// once the test lets go; nothing is retried or dead-lettered.
#[tokio::test]
async fn a_refused_connection_is_backpressure() {
    const PARTITIONS: u16 = 2;
    let prefix = support::unique("wref");
    const RETRY_DELAYS: &str = "200ms,400ms";
    let _cleanup = TopologyCleanup::new(&prefix, PARTITIONS).with_retry_delays(RETRY_DELAYS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let role = TestRole::create(&format!("{prefix}_role")).await;
    let dbs = TestDatabases::new("wref");
    role.database(&dbs.name("limited"), 1).await;
    role.database(&dbs.name("free"), -1).await;
    let holder = PgConnection::connect(&support::database_url(&dbs.name("limited")))
        .await
        .expect("hold the limited database's one session");
    let template = dbs.template_as(&role.name);
    let worker = TestWorker::start(settings(
        &prefix,
        PARTITIONS,
        &dbs,
        &[
            "--tenant-database-url",
            &template,
            "--create-tenant-databases",
            "false",
            "--retry-delays",
            RETRY_DELAYS,
        ],
    ))
    .await;
    let (_conn, ch) = publisher(&topology).await;
    let limited = random_history(81, "limited", 3, 20);
    let free = random_history(82, "free", 3, 20);
    let all: Vec<Vec<u8>> = limited.iter().chain(&free).cloned().collect();
    publish_all(&ch, &topology, &all).await;
    dbs.wait_for_rows(
        "free",
        &model_of(&free).identities(),
        Duration::from_secs(30),
    )
    .await;
    let metrics = worker.running().metrics();
    wait_until(
        "the limited database's refusal to be counted and its events set aside",
        Duration::from_secs(20),
        || async {
            (metrics
                .tenant_pools
                .refusals
                .with_label_values(&["database"])
                .get()
                > 0
                && metrics.set_aside_total(SetAsideReason::Slow) > 0)
                .then_some(())
        },
    )
    .await;
    holder.close().await.expect("let go of the session");
    dbs.wait_for_rows(
        "limited",
        &model_of(&limited).identities(),
        Duration::from_secs(60),
    )
    .await;
    nothing_retried_or_dead_lettered(&worker, &ch, &topology).await;
    worker.stop().await;
    drop(dbs);
    drop(role);
}

/// A server that refuses connections for lack of slots (here the role's own CONNECTION LIMIT of
/// 3, below the worker's budget of 20): the worker lowers its budget and its work waits; every
/// event is applied, nothing is retried or dead-lettered.
#[tokio::test]
async fn a_server_out_of_slots_is_backpressure() {
    const PARTITIONS: u16 = 2;
    const TENANTS: usize = 10;
    let prefix = support::unique("wsrv");
    const RETRY_DELAYS: &str = "200ms,400ms";
    let _cleanup = TopologyCleanup::new(&prefix, PARTITIONS).with_retry_delays(RETRY_DELAYS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let role = TestRole::limited(&format!("{prefix}_role"), 3).await;
    let dbs = TestDatabases::new("wsrv");
    let tenants: Vec<String> = (0..TENANTS).map(|i| format!("t{i}")).collect();
    for tenant in &tenants {
        role.database(&dbs.name(tenant), -1).await;
    }
    let template = dbs.template_as(&role.name);
    let worker = TestWorker::start(settings(
        &prefix,
        PARTITIONS,
        &dbs,
        &[
            "--tenant-database-url",
            &template,
            "--create-tenant-databases",
            "false",
            "--max-connections",
            "20",
            "--retry-delays",
            RETRY_DELAYS,
        ],
    ))
    .await;
    let (_conn, ch) = publisher(&topology).await;
    let histories: Vec<Vec<Vec<u8>>> = tenants
        .iter()
        .enumerate()
        .map(|(i, t)| random_history(500 + i as u64, t, 3, 20))
        .collect();
    let all: Vec<Vec<u8>> = histories.iter().flatten().cloned().collect();
    publish_all(&ch, &topology, &shuffled_with_duplicates(51, &all, 20)).await;
    for (tenant, history) in tenants.iter().zip(&histories) {
        dbs.wait_for_rows(
            tenant,
            &model_of(history).identities(),
            Duration::from_secs(60),
        )
        .await;
    }
    let metrics = worker.running().metrics();
    assert!(
        metrics
            .tenant_pools
            .refusals
            .with_label_values(&["server"])
            .get()
            > 0,
        "the role's limit was reached"
    );
    nothing_retried_or_dead_lettered(&worker, &ch, &topology).await;
    worker.stop().await;
    drop(dbs);
    drop(role);
}

/// One tenant's table locked by a held transaction and a burst of its events larger than the
/// worker's prefetch: the other tenants of its partition are applied within a few seconds; once
/// the lock is released the stuck tenant catches up, equal to the model; nothing is
/// dead-lettered.
#[tokio::test]
async fn a_stuck_tenant_holds_neither_its_partition_nor_the_budget() {
    const PARTITIONS: u16 = 1;
    let prefix = support::unique("wstk");
    const RETRY_DELAYS: &str = "200ms,1s";
    let _cleanup = TopologyCleanup::new(&prefix, PARTITIONS).with_retry_delays(RETRY_DELAYS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("wstk");
    let mut locker = dbs.migrated("stuck").await;
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("LOCK TABLE av_identities IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    let worker = TestWorker::start(settings(
        &prefix,
        PARTITIONS,
        &dbs,
        &["--prefetch", "32", "--retry-delays", RETRY_DELAYS],
    ))
    .await;
    let (_conn, ch) = publisher(&topology).await;
    let stuck = random_history(91, "stuck", 20, 300);
    publish_all(&ch, &topology, &stuck).await;
    let others: Vec<(String, Vec<Vec<u8>>)> = (0..3)
        .map(|i| {
            let tenant = format!("other{i}");
            let history = random_history(92 + i, &tenant, 3, 15);
            (tenant, history)
        })
        .collect();
    let all_others: Vec<Vec<u8>> = others.iter().flat_map(|(_, h)| h.clone()).collect();
    publish_all(&ch, &topology, &all_others).await;
    for (tenant, history) in &others {
        dbs.wait_for_rows(
            tenant,
            &model_of(history).identities(),
            Duration::from_secs(8),
        )
        .await;
    }
    let metrics = worker.running().metrics();
    assert!(
        metrics.standings.marked_slow.get() >= 1,
        "the stuck tenant was marked slow"
    );
    assert!(metrics.set_aside_total(SetAsideReason::Slow) > 0);

    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    let _ = locker.close().await;
    dbs.wait_for_rows(
        "stuck",
        &model_of(&stuck).identities(),
        Duration::from_secs(90),
    )
    .await;
    nothing_retried_or_dead_lettered(&worker, &ch, &topology).await;
    worker.stop().await;
}

/// A busy tenant with a large backlog and a budget of 2: the tenants waiting for a connection
/// take turns, so a few small tenants (in other partitions, so that only the budget is shared)
/// are all applied while the busy one still has most of its backlog to go. The test makes and
/// migrates every database before the worker starts, so that what is measured is the turns at
/// the budget, not how long PostgreSQL takes to create six databases beside the other tests'
/// dozens.
#[tokio::test]
async fn a_busy_tenant_does_not_starve_small_ones() {
    const PARTITIONS: u16 = 4;
    let prefix = support::unique("wfair");
    let _cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("wfair");
    let busy_partition = topology.partition_of(&TenantId::parse("busy").unwrap());
    let small: Vec<String> = (0..)
        .map(|i| format!("small{i}"))
        .filter(|t| topology.partition_of(&TenantId::parse(t).unwrap()) != busy_partition)
        .take(6)
        .collect();
    let busy = random_history(301, "busy", 2_000, 8_000);
    let smalls: Vec<Vec<Vec<u8>>> = small
        .iter()
        .zip(302..)
        .map(|(t, seed)| random_history(seed, t, 3, 10))
        .collect();
    for tenant in std::iter::once("busy").chain(small.iter().map(String::as_str)) {
        let _ = sqlx::Connection::close(dbs.migrated(tenant).await).await;
    }
    let (_conn, ch) = publisher(&topology).await;
    let worker = TestWorker::start(settings(
        &prefix,
        PARTITIONS,
        &dbs,
        &["--max-connections", "2", "--prefetch", "32"],
    ))
    .await;
    publish_all(&ch, &topology, &busy).await;
    publish_all(&ch, &topology, &smalls.concat()).await;
    for (tenant, history) in small.iter().zip(&smalls) {
        dbs.wait_for_rows(
            tenant,
            &model_of(history).identities(),
            Duration::from_secs(30),
        )
        .await;
    }
    let busy_model = model_of(&busy).identities();
    let busy_rows = dbs.rows("busy").await.unwrap_or_default();
    assert_ne!(
        busy_rows, busy_model,
        "the busy tenant finished before the small ones were served"
    );
    dbs.wait_for_rows("busy", &busy_model, Duration::from_secs(180))
        .await;
    nothing_retried_or_dead_lettered(&worker, &ch, &topology).await;
    worker.stop().await;
}

/// A tenant database emptied under the worker (its schema dropped and made again while the
/// worker keeps its sessions and remembers the database as migrated): the worker forgets that
/// memory and migrates it again, instead of retrying its events into the dead-letter queue.
#[tokio::test]
async fn a_database_emptied_under_the_worker_is_migrated_again() {
    const PARTITIONS: u16 = 1;
    let prefix = support::unique("wgone");
    let _cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("wgone");
    let worker = TestWorker::start(settings(&prefix, PARTITIONS, &dbs, &[])).await;
    let (_conn, ch) = publisher(&topology).await;
    let before = random_history(401, "gone", 3, 20);
    publish_all(&ch, &topology, &before).await;
    dbs.wait_for_rows(
        "gone",
        &model_of(&before).identities(),
        Duration::from_secs(30),
    )
    .await;

    let mut conn = dbs.connect(&dbs.name("gone")).await;
    sqlx::query("DROP SCHEMA public CASCADE")
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::query("CREATE SCHEMA public")
        .execute(&mut conn)
        .await
        .unwrap();
    let _ = conn.close().await;

    let after = random_history(402, "gone", 3, 20);
    publish_all(&ch, &topology, &after).await;
    dbs.wait_for_rows(
        "gone",
        &model_of(&after).identities(),
        Duration::from_secs(30),
    )
    .await;
    nothing_retried_or_dead_lettered(&worker, &ch, &topology).await;
    worker.stop().await;
}
