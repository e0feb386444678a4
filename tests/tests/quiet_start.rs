//! A normal start says nothing alarming. The real worker binary, under the default log filter,
//! starts, opens a tenant database that is already migrated and applies events: its log holds
//! no ERROR, none of the broker client's own lines (such as the partition probe's `NOT_FOUND`)
//! and no PostgreSQL NOTICE (such as `_sqlx_migrations already exists, skipping`).

use avsync_shared::telemetry::DEFAULT_FILTER;
use avsync_shared::Topology;
use avsync_tests::faults::{self, observable_events, ChildWorker, WorkerSpec};
use avsync_tests::support::{self, TopologyCleanup};
use avsync_tests::worker_harness::{model_of, publish_all, publisher, TestDatabases};
use std::time::Duration;

const PARTITIONS: u16 = 2;

#[tokio::test]
async fn a_worker_that_starts_and_applies_events_logs_no_error() {
    let prefix = support::unique("quiet");
    let _topology =
        TopologyCleanup::new(&prefix, PARTITIONS).with_retry_delays(faults::RETRY_DELAYS);
    let dbs = TestDatabases::new("quiet");
    let _ = sqlx::Connection::close(dbs.migrated("acme").await).await;
    let mut spec = WorkerSpec::new(&prefix, PARTITIONS, &dbs);
    spec.extra_env
        .push(("RUST_LOG".to_owned(), DEFAULT_FILTER.to_owned()));
    let worker = ChildWorker::start(&spec, "quiet").await;
    let log = worker.log.clone();

    let topology = Topology::new(&prefix, PARTITIONS).expect("topology");
    let (conn, ch) = publisher(&topology).await;
    let bodies = observable_events(1, "acme", 20);
    publish_all(&ch, &topology, &bodies).await;
    let _ = conn.close(200, "published".into()).await;
    dbs.wait_for_rows(
        "acme",
        &model_of(&bodies).identities(),
        Duration::from_secs(30),
    )
    .await;
    assert!(worker.terminate(Duration::from_secs(40)).await.success());

    let text = std::fs::read_to_string(&log).expect("the worker's log");
    assert!(
        text.contains("consuming"),
        "the log is the worker's:\n{text}"
    );
    for line in text.lines() {
        for alarming in [
            "ERROR",
            "lapin",
            "NOT_FOUND",
            "_sqlx_migrations",
            "skipping",
        ] {
            assert!(
                !line.contains(alarming),
                "{alarming:?} in a normal start:\n{text}"
            );
        }
    }
    dbs.drop_all().await;
    faults::remove_logs(&prefix);
}
