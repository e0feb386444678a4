//! Tenants never write into each other's database: not through shared user ids, not through a
//! hostile tenant id, not through PostgreSQL cutting a long database name.

use avsync_shared::topology::Topology;
use avsync_tests::support::{self, wait_until, TopologyCleanup};
use avsync_tests::worker_harness::{
    model_of, parse_settings, publish, publish_all, publisher, random_history, settings,
    shuffled_with_duplicates, take_dead_letters, wait_for_dead_letters, TestDatabases, TestWorker,
};
use avsync_worker::apply::Identity;
use serde_json::json;
use std::time::Duration;

const PARTITIONS: u16 = 4;

#[tokio::test]
async fn events_of_two_tenants_land_only_in_their_own_databases() {
    let prefix = support::unique("wiso");
    let _topology_cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("wiso");
    let (_conn, ch) = publisher(&topology).await;
    let worker = TestWorker::start(settings(&prefix, PARTITIONS, &dbs, &[])).await;

    // The same user ids in both tenants.
    let a = random_history(21, "tenant-a", 3, 50);
    let b = random_history(22, "tenant_b", 3, 50);
    let mut all = a.clone();
    all.extend(b.clone());
    publish_all(&ch, &topology, &shuffled_with_duplicates(23, &all, 20)).await;
    dbs.wait_for_rows(
        "tenant-a",
        &model_of(&a).identities(),
        Duration::from_secs(30),
    )
    .await;
    dbs.wait_for_rows(
        "tenant_b",
        &model_of(&b).identities(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        dbs.existing().await,
        vec![dbs.name("tenant-a"), dbs.name("tenant_b")]
    );
    worker.stop().await;
}

#[tokio::test]
async fn a_hostile_tenant_id_reaches_no_database() {
    let prefix = support::unique("whost");
    let _topology_cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("whost");
    let (_conn, ch) = publisher(&topology).await;
    let worker = TestWorker::start(settings(&prefix, PARTITIONS, &dbs, &[])).await;

    // A database the hostile ids aim at.
    let victim = dbs.migrated("victim").await;
    let hostile = [
        "../victim".to_owned(),
        "victim?dbname=postgres".to_owned(),
        "x\"; DROP DATABASE postgres; --".to_owned(),
        "victim/../postgres".to_owned(),
        "%76ictim".to_owned(),
        "victim ".to_owned(),
        "".to_owned(),
        "a".repeat(65),
    ];
    for (i, tenant) in hostile.iter().enumerate() {
        let body = json!({"id": format!("h{i}"), "type": "member.joined", "tenant_id": tenant,
            "timestamp": "2026-08-21T01:00:00Z", "data": {"sub": "intruder"}})
        .to_string();
        publish(&ch, &topology, body.as_bytes()).await;
    }
    let letters =
        wait_for_dead_letters(&ch, &topology, hostile.len(), Duration::from_secs(20)).await;
    assert!(letters
        .iter()
        .all(|l| l.class == "permanent" && l.error.contains("tenant_id")));
    assert_eq!(
        dbs.existing().await,
        vec![dbs.name("victim")],
        "no database was created"
    );
    assert_eq!(
        dbs.rows("victim").await,
        Some(vec![]),
        "nothing reached the victim"
    );
    let _ = sqlx::Connection::close(victim).await;
    worker.stop().await;
}

/// With the default template, `tenant_` + 64 characters is 71 bytes: PostgreSQL would cut both
/// names to the same 63 bytes. Both events are permanent failures and no database is touched.
#[tokio::test]
async fn two_long_tenant_ids_sharing_a_prefix_never_share_a_database() {
    let prefix = support::unique("wlong");
    let _topology_cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("wlong");
    let (_conn, ch) = publisher(&topology).await;
    let partitions = PARTITIONS.to_string();
    let worker = TestWorker::start(parse_settings(&[
        "--amqp-url",
        support::AMQP_URL,
        "--topology",
        &prefix,
        "--partitions",
        &partitions,
        "--metrics-listen",
        "127.0.0.1:0",
        "--create-tenant-databases",
        "true",
    ]))
    .await;

    let shared = format!("{}{}", prefix.replace('_', "x"), "s".repeat(56));
    let shared = &shared[..56];
    let one = format!("{shared}aaaaaaaa");
    let two = format!("{shared}bbbbbbbb");
    assert_eq!((one.len(), two.len()), (64, 64));
    for (id, tenant) in [("l1", &one), ("l2", &two)] {
        let body = json!({"id": id, "type": "member.joined", "tenant_id": tenant,
            "timestamp": "2026-08-21T01:00:00Z", "data": {"sub": "u1"}})
        .to_string();
        publish(&ch, &topology, body.as_bytes()).await;
    }
    let letters = wait_for_dead_letters(&ch, &topology, 2, Duration::from_secs(20)).await;
    let mut ids: Vec<&str> = letters.iter().map(|l| l.message_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["l1", "l2"]);
    for l in &letters {
        assert_eq!(l.class, "permanent");
        assert!(l.error.contains("63-byte"), "{}", l.error);
    }
    let mut admin = support::pg_admin().await;
    let touched: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname LIKE $1")
        .bind(format!("tenant_{}%", &shared[..40]))
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(touched, 0, "no database of either tenant exists");
    assert!(dbs.existing().await.is_empty());
    worker.stop().await;
}

/// A template without `{tenant_id}` is one database for all tenants: a user in two tenants has
/// one row, whose tenant_id is that of the newest event that set it.
#[tokio::test]
async fn one_database_for_all_tenants_keeps_one_row_per_user() {
    let prefix = support::unique("wone");
    let _topology_cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("wone");
    let (_conn, ch) = publisher(&topology).await;
    let single = support::database_url(&dbs.name("shared"));
    let worker = TestWorker::start(settings(
        &prefix,
        PARTITIONS,
        &dbs,
        &["--tenant-database-url", &single],
    ))
    .await;
    let joined = |id: &str, tenant: &str, ts: &str, role: &str| {
        json!({"id": id, "type": "member.joined", "tenant_id": tenant, "timestamp": ts,
               "data": {"sub": "u1", "tenant_roles": [role]}})
        .to_string()
        .into_bytes()
    };
    let bodies = [
        joined("j2", "beta", "2026-08-21T02:00:00Z", "member"),
        joined("j1", "alpha", "2026-08-21T01:00:00Z", "owner"),
    ];
    for b in &bodies {
        publish(&ch, &topology, b).await;
    }
    let expected = vec![Identity {
        tenant_id: Some("beta".into()),
        membership_status: Some("active".into()),
        tenant_roles: vec!["member".into()],
        ..Identity::new("u1")
    }];
    dbs.wait_for_rows("shared", &expected, Duration::from_secs(20))
        .await;
    assert_eq!(model_of(&bodies).identities(), expected);
    assert!(take_dead_letters(&ch, &topology).await.is_empty());
    wait_until("one database", Duration::from_secs(5), || async {
        (dbs.existing().await == vec![dbs.name("shared")]).then_some(())
    })
    .await;
    worker.stop().await;
}
