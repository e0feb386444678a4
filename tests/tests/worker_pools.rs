//! The tenant pool bound: with AVSYNC_TENANT_POOL_CAPACITY=2 and five busy tenants, every event
//! is applied and never more than two pools are open.

use avsync_shared::topology::Topology;
use avsync_tests::support::{self, TopologyCleanup};
use avsync_tests::worker_harness::{
    model_of, publish_all, publisher, random_history, settings, shuffled_with_duplicates,
    take_dead_letters, TestDatabases, TestWorker,
};
use avsync_worker::metrics::Metrics;
use avsync_worker::tenant_db::pools::{PoolSettings, Pools};
use avsync_worker::tenant_db::resolve::TenantDb;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const PARTITIONS: u16 = 4;

#[tokio::test]
async fn five_tenants_through_two_pools() {
    let prefix = support::unique("wpool");
    let _topology_cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("wpool");
    let (_conn, ch) = publisher(&topology).await;
    let worker = Arc::new(
        TestWorker::start(settings(
            &prefix,
            PARTITIONS,
            &dbs,
            &["--tenant-pool-capacity", "2", "--tenant-pool-size", "2"],
        ))
        .await,
    );

    let tenants = ["p1", "p2", "p3", "p4", "p5"];
    let histories: Vec<Vec<Vec<u8>>> = tenants
        .iter()
        .enumerate()
        .map(|(i, t)| random_history(40 + i as u64, t, 3, 30))
        .collect();
    let all: Vec<Vec<u8>> = histories.iter().flatten().cloned().collect();

    let most = Arc::new(AtomicI64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (worker, most, done) = (worker.clone(), most.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                most.fetch_max(worker.running().open_pools(), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    publish_all(&ch, &topology, &shuffled_with_duplicates(45, &all, 10)).await;
    for (tenant, history) in tenants.iter().zip(&histories) {
        dbs.wait_for_rows(
            tenant,
            &model_of(history).identities(),
            Duration::from_secs(60),
        )
        .await;
    }
    done.store(true, Ordering::SeqCst);
    sampler.await.unwrap();
    let most = most.load(Ordering::SeqCst);
    assert!(most <= 2, "{most} pools were open at once");
    assert!(most >= 1);
    assert!(worker.running().open_pools() <= 2);
    assert!(take_dead_letters(&ch, &topology).await.is_empty());
    match Arc::try_unwrap(worker) {
        Ok(worker) => worker.stop().await,
        Err(_) => panic!("sampler still holds the worker"),
    }
}

fn pools(capacity: u32) -> Pools {
    let metrics = Metrics::register(&avsync_shared::admin::new_registry()).unwrap();
    Pools::new(
        PoolSettings {
            capacity,
            size: 2,
            create_databases: true,
            auto_migrate: true,
        },
        metrics.tenant_pools.clone(),
    )
}

fn tenant_db(dbs: &TestDatabases, tenant: &str) -> TenantDb {
    TenantDb::from_url(&support::database_url(&dbs.name(tenant))).unwrap()
}

/// Sixteen tasks that need the same new tenant at once open one pool (and one database).
#[tokio::test]
async fn concurrent_first_uses_open_one_pool() {
    let dbs = TestDatabases::new("wflight");
    let pools = pools(4);
    let db = tenant_db(&dbs, "fresh");
    let leases = futures_util::future::join_all((0..16).map(|_| pools.lease(&db))).await;
    assert!(leases.iter().all(Result::is_ok));
    // Every lease is still held: a second pool would still be open and counted.
    assert_eq!(pools.open_pools(), 1);
    drop(leases);
    pools.close_all().await;
    assert_eq!(pools.open_pools(), 0);
}

/// With one slot, a second tenant waits for the first pool to go idle: the query running on the
/// first pool completes, then the first pool is closed and the second opens.
#[tokio::test]
async fn a_pool_in_use_is_never_cut() {
    let dbs = TestDatabases::new("wcut");
    let pools = pools(1);
    let first = tenant_db(&dbs, "first");
    let second = tenant_db(&dbs, "second");
    let lease = pools.lease(&first).await.unwrap();
    let mut conn = lease.connection().await.unwrap();
    let slow = async move {
        let r: Result<(i32,), _> = sqlx::query_as("SELECT 1 FROM pg_sleep(0.5)")
            .fetch_one(&mut *conn)
            .await;
        drop(conn);
        drop(lease);
        r
    };
    let (slow, other) = tokio::join!(slow, pools.lease(&second));
    assert_eq!(slow.unwrap().0, 1, "the running query completed");
    let other = other.unwrap();
    assert_eq!(pools.open_pools(), 1);
    let mut conn = other.connection().await.unwrap();
    let one: (i32,) = sqlx::query_as("SELECT 1")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(one.0, 1);
    drop(conn);
    drop(other);
    pools.close_all().await;
}
