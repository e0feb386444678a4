//! Tenant resolution through the registry (known, unknown until added, disabled), and the
//! `migrate` command in template and registry mode.

use avsync_shared::topology::Topology;
use avsync_tests::support::{self, wait_until, TopologyCleanup};
use avsync_tests::worker_harness::{
    add_to_registry, model_of, publish, publisher, settings, take_dead_letters,
    wait_for_dead_letters, TestDatabases, TestWorker,
};
use avsync_worker::metrics::Outcome;
use avsync_worker::ops::migrate::{self, MigrateArgs};
use avsync_worker::settings::{Checked, Settings};
use serde_json::json;
use sqlx::Connection;
use std::time::Duration;

const PARTITIONS: u16 = 2;
/// Short retry delays, so that an event of a tenant not yet in the registry comes back quickly.
const RETRY_DELAYS: [Duration; 5] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];

fn retry_delays_flag() -> String {
    RETRY_DELAYS
        .iter()
        .map(|d| format!("{}ms", d.as_millis()))
        .collect::<Vec<_>>()
        .join(",")
}

fn joined(id: &str, tenant: &str) -> Vec<u8> {
    json!({"id": id, "type": "member.joined", "tenant_id": tenant,
           "timestamp": "2026-08-21T01:00:00Z", "data": {"sub": "u1", "tenant_roles": ["owner"]}})
    .to_string()
    .into_bytes()
}

#[tokio::test]
async fn the_registry_decides_each_tenants_database() {
    let prefix = support::unique("wreg");
    let delays = retry_delays_flag();
    let _topology_cleanup = TopologyCleanup::new(&prefix, PARTITIONS).with_retry_delays(&delays);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("wreg");
    // "known" lives in a database whose name has nothing to do with the tenant id.
    let registry_url = dbs
        .registry(&[
            ("known", support::database_url(&dbs.name("elsewhere")), true),
            ("off", support::database_url(&dbs.name("off")), false),
        ])
        .await;
    let (_conn, ch) = publisher(&topology).await;
    let worker = TestWorker::start(settings(
        &prefix,
        PARTITIONS,
        &dbs,
        &[
            "--tenant-registry-url",
            &registry_url,
            "--retry-delays",
            &delays,
        ],
    ))
    .await;

    let known = joined("k1", "known");
    publish(&ch, &topology, &known).await;
    dbs.wait_for_rows(
        "elsewhere",
        &model_of(&[known]).identities(),
        Duration::from_secs(20),
    )
    .await;

    let off = joined("o1", "off");
    publish(&ch, &topology, &off).await;
    let letters = wait_for_dead_letters(&ch, &topology, 1, Duration::from_secs(20)).await;
    assert_eq!(letters[0].message_id, "o1");
    assert_eq!(letters[0].class, "permanent");
    assert!(
        letters[0].error.contains("disabled"),
        "{}",
        letters[0].error
    );

    // Unknown: retried (not dead-lettered) until the registry has it.
    let later = joined("l1", "later");
    publish(&ch, &topology, &later).await;
    wait_until(
        "a retry of the unknown tenant",
        Duration::from_secs(20),
        || async { (worker.events("member.joined", Outcome::Retried) >= 1).then_some(()) },
    )
    .await;
    let mut conn = dbs.connect(&dbs.name("registry")).await;
    add_to_registry(
        &mut conn,
        "later",
        &support::database_url(&dbs.name("later")),
        true,
    )
    .await;
    let retried_at_add = worker.events("member.joined", Outcome::Retried);
    let _ = conn.close().await;
    // Whatever tier the event waits in, it is back within the longest delay; one that was being
    // resolved while the tenant was added may go round once more.
    let longest = RETRY_DELAYS.iter().max().copied().unwrap_or_default();
    dbs.wait_for_rows(
        "later",
        &model_of(&[later]).identities(),
        2 * longest + Duration::from_secs(10),
    )
    .await;
    let retried_after = worker.events("member.joined", Outcome::Retried) - retried_at_add;
    assert!(
        retried_after <= 1,
        "a tenant added to the registry is found by the event's next retry, not taken for unknown again ({retried_after} more retries)"
    );

    assert!(take_dead_letters(&ch, &topology).await.is_empty());
    let mut existing = dbs.existing().await;
    existing.sort();
    let mut expected = vec![
        dbs.name("elsewhere"),
        dbs.name("later"),
        dbs.name("registry"),
    ];
    expected.sort();
    assert_eq!(existing, expected, "no database for the disabled tenant");
    worker.stop().await;
}

fn migrate_args(tenant: Option<&str>) -> MigrateArgs {
    MigrateArgs {
        tenant: tenant.map(str::to_owned),
        all: tenant.is_none(),
    }
}

async fn has_table(dbs: &TestDatabases, name: &str) -> bool {
    let mut conn = dbs.connect(name).await;
    let found: bool = sqlx::query_scalar("SELECT to_regclass('av_identities') IS NOT NULL")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let _ = conn.close().await;
    found
}

#[tokio::test]
async fn migrate_in_template_mode() {
    let dbs = TestDatabases::new("wmigt");
    let s = settings("unused", 1, &dbs, &[]);
    let mut out = Vec::new();
    migrate::run(&migrate_args(Some("acme")), &checked(&s), &mut out)
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("migrated acme ({})\n", dbs.name("acme"))
    );
    assert!(has_table(&dbs, &dbs.name("acme")).await);

    let err = migrate::run(&migrate_args(None), &checked(&s), &mut Vec::new())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("AVSYNC_TENANT_REGISTRY_URL"),
        "{err}"
    );

    // Without creating databases, a missing one is an error naming the way out.
    let s = settings("unused", 1, &dbs, &["--create-tenant-databases", "false"]);
    let err = migrate::run(&migrate_args(Some("nope")), &checked(&s), &mut Vec::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("could not be migrated"), "{err}");
    assert!(!dbs.existing().await.contains(&dbs.name("nope")));
}

#[tokio::test]
async fn migrate_all_registry_tenants() {
    let dbs = TestDatabases::new("wmigr");
    let registry_url = dbs
        .registry(&[
            ("t1", support::database_url(&dbs.name("one")), true),
            ("t2", support::database_url(&dbs.name("two")), true),
            ("t3", support::database_url(&dbs.name("three")), false),
        ])
        .await;
    let s = settings("unused", 1, &dbs, &["--tenant-registry-url", &registry_url]);
    let mut out = Vec::new();
    migrate::run(&migrate_args(None), &checked(&s), &mut out)
        .await
        .unwrap();
    let out = String::from_utf8(out).unwrap();
    assert!(
        out.contains("migrated t1") && out.contains("migrated t2"),
        "{out}"
    );
    assert!(!out.contains("t3"));
    assert!(has_table(&dbs, &dbs.name("one")).await);
    assert!(has_table(&dbs, &dbs.name("two")).await);
    assert!(!dbs.existing().await.contains(&dbs.name("three")));
}

fn checked(settings: &Settings) -> Checked {
    settings.clone().check().expect("usable worker settings")
}

/// A database another worker is creating holds its name until that worker commits, which on a
/// busy server takes longer than a tenant session's lock_timeout. Waiting for it is waiting for
/// the database, not a slow tenant: nothing is set aside or retried, and the event is applied
/// once the database exists. The other worker is played by a session that renames a spare
/// database to the tenant's name in a transaction held open past the lock_timeout.
#[tokio::test]
async fn a_database_another_worker_is_creating_is_waited_for_not_marked_slow() {
    let prefix = support::unique("wmade");
    let _topology_cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("wmade");
    let spare = dbs.name("spare");
    support::create_database(&spare).await;
    let mut other_worker = support::pg_admin().await;
    sqlx::query("BEGIN")
        .execute(&mut other_worker)
        .await
        .unwrap();
    sqlx::query(&format!(
        "ALTER DATABASE \"{spare}\" RENAME TO \"{}\"",
        dbs.name("t1")
    ))
    .execute(&mut other_worker)
    .await
    .unwrap();

    let (_conn, ch) = publisher(&topology).await;
    let worker = TestWorker::start(settings(
        &prefix,
        PARTITIONS,
        &dbs,
        &["--max-connections", "4"],
    ))
    .await;
    let event = joined("e1", "t1");
    publish(&ch, &topology, &event).await;
    wait_until(
        "the worker's CREATE DATABASE to wait for the other session",
        Duration::from_secs(20),
        || async {
            let mut admin = support::pg_admin().await;
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'CREATE DATABASE%' AND query LIKE $1",
            )
            .bind(format!("%{}%", dbs.name("t1")))
            .fetch_one(&mut admin)
            .await
            .unwrap();
            (waiting > 0).then_some(())
        },
    )
    .await;
    // The other worker takes longer than a tenant session may wait for a lock.
    tokio::time::sleep(avsync_worker::tenant_db::provision::LOCK_TIMEOUT * 2).await;
    sqlx::query("COMMIT")
        .execute(&mut other_worker)
        .await
        .unwrap();
    let _ = other_worker.close().await;

    dbs.wait_for_rows(
        "t1",
        &model_of(&[event]).identities(),
        Duration::from_secs(30),
    )
    .await;
    let metrics = worker.running().metrics();
    assert_eq!(
        metrics.set_aside_total(avsync_worker::metrics::SetAsideReason::Slow),
        0,
        "no event was set aside for a slow tenant"
    );
    assert_eq!(worker.events("member.joined", Outcome::Retried), 0);
    assert_eq!(worker.events("member.joined", Outcome::Applied), 1);
    worker.stop().await;
    dbs.drop_all().await;
}
