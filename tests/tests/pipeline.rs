//! The whole pipe over real services: ingress → RabbitMQ → two workers → PostgreSQL. Events of
//! two tenants are posted shuffled with duplicates; every tenant's rows end equal to the model
//! of its events applied in order, once each.

use avsync_shared::topology::Topology;
use avsync_tests::ingress_harness::TestIngress;
use avsync_tests::support::{self, queue_depth, wait_until, TopologyCleanup};
use avsync_tests::worker_harness::{
    model_of, random_history, settings, shuffled_with_duplicates, take_dead_letters, TestDatabases,
    TestWorker,
};
use futures_util::stream::{self, StreamExt};
use std::time::Duration;

const PARTITIONS: u16 = 4;

#[tokio::test]
async fn posted_events_end_as_the_ordered_model_in_each_tenant_database() {
    let prefix = support::unique("pipe");
    let _topology_cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("pipe");
    let ingress = TestIngress::start(&prefix, PARTITIONS).await;
    let one = TestWorker::start(settings(&prefix, PARTITIONS, &dbs, &[])).await;
    let two = TestWorker::start(settings(&prefix, PARTITIONS, &dbs, &[])).await;

    let tenants = ["north", "south"];
    let histories: Vec<Vec<Vec<u8>>> = tenants
        .iter()
        .enumerate()
        .map(|(i, t)| random_history(200 + i as u64, t, 4, 60))
        .collect();
    let all: Vec<Vec<u8>> = histories.iter().flatten().cloned().collect();
    let posted = shuffled_with_duplicates(201, &all, 40);
    let statuses: Vec<u16> = stream::iter(&posted)
        .map(|body| async { ingress.post(body).await.status().as_u16() })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 202), "{statuses:?}");

    for (tenant, history) in tenants.iter().zip(&histories) {
        dbs.wait_for_rows(
            tenant,
            &model_of(history).identities(),
            Duration::from_secs(60),
        )
        .await;
    }
    let (conn, ch) = support::channel().await;
    wait_until("every message settled", Duration::from_secs(20), || async {
        let mut depth = 0;
        for p in 0..PARTITIONS {
            depth += queue_depth(&ch, &topology.partition_queue(p))
                .await
                .unwrap_or(0);
        }
        (depth == 0).then_some(())
    })
    .await;
    assert!(take_dead_letters(&ch, &topology).await.is_empty());
    let _ = conn.close(200, "done".into()).await;

    one.stop().await;
    two.stop().await;
    ingress.stop().await;
}
