//! Two workers apply events of one user at the same moment: row locks of the upsert serialise
//! them and the per-field versions make the order irrelevant, so the row equals the model.

use avsync_shared::topology::Topology;
use avsync_tests::support::{self, TopologyCleanup};
use avsync_tests::worker_harness::{
    model_of, publish_all, publisher, random_history, settings, take_dead_letters, TestDatabases,
    TestWorker,
};
use std::time::Duration;

const PARTITIONS: u16 = 2;

#[tokio::test]
async fn two_workers_racing_on_one_user_give_the_model() {
    let prefix = support::unique("wrace");
    let _topology_cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("wrace");
    let (_conn, ch) = publisher(&topology).await;
    // Small prefetch per worker, so both take messages of the one partition queue at once.
    let flags = ["--prefetch", "8"];
    let one = TestWorker::start(settings(&prefix, PARTITIONS, &dbs, &flags)).await;
    let two = TestWorker::start(settings(&prefix, PARTITIONS, &dbs, &flags)).await;

    for round in 0..3u64 {
        let tenant = format!("race{round}");
        // 20 events for one user, different fields and timestamps, all published at once.
        let bodies = random_history(100 + round, &tenant, 1, 20);
        publish_all(&ch, &topology, &bodies).await;
        dbs.wait_for_rows(
            &tenant,
            &model_of(&bodies).identities(),
            Duration::from_secs(30),
        )
        .await;
    }
    let applied = |w: &TestWorker| -> u64 {
        avsync_shared::event::KNOWN_TYPES
            .iter()
            .map(|t| w.events(t, avsync_worker::metrics::Outcome::Applied))
            .sum()
    };
    assert!(
        applied(&one) > 0 && applied(&two) > 0,
        "both workers applied events"
    );
    assert!(take_dead_letters(&ch, &topology).await.is_empty());
    one.stop().await;
    two.stop().await;
}
