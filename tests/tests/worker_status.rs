//! `/status` and `avsync-worker status` against a running worker with one tenant locked and one
//! tenant whose PostgreSQL server is down: the view names both tenants and the server, and the
//! events of neither are retried or dead-lettered meanwhile.

use avsync_shared::topology::Topology;
use avsync_tests::support::{self, wait_until, TopologyCleanup};
use avsync_tests::worker_harness::{
    model_of, publish, publisher, random_history, settings, take_dead_letters, TestDatabases,
    TestWorker,
};
use avsync_worker::metrics::Outcome;
use avsync_worker::ops::status::{self, Status, StatusArgs};
use std::time::Duration;

const PARTITIONS: u16 = 2;
const RETRY_DELAYS: &str = "200ms,1s";

/// A loopback port where nothing listens: connections to it are refused, like a server that is
/// down.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address").port()
}

async fn status_of(worker: &TestWorker) -> Status {
    reqwest::get(format!("{}/status", worker.metrics_url))
        .await
        .expect("/status answers")
        .json()
        .await
        .expect("/status is a worker's status")
}

#[tokio::test]
async fn status_names_the_locked_tenant_and_the_server_that_is_down() {
    let prefix = support::unique("wstat");
    let _cleanup = TopologyCleanup::new(&prefix, PARTITIONS).with_retry_delays(RETRY_DELAYS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("wstat");
    let down_port = closed_port();
    let down_server = format!("127.0.0.1:{down_port}");
    let mut locker = dbs.migrated("locked").await;
    sqlx::query("BEGIN").execute(&mut locker).await.unwrap();
    sqlx::query("LOCK TABLE av_identities IN ACCESS EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();
    let registry_url = dbs
        .registry(&[
            ("fine", support::database_url(&dbs.name("fine")), true),
            ("locked", support::database_url(&dbs.name("locked")), true),
            (
                "gone",
                format!("postgres://postgres@{down_server}/tenant_gone"),
                true,
            ),
        ])
        .await;
    let worker = TestWorker::start(settings(
        &prefix,
        PARTITIONS,
        &dbs,
        &[
            "--tenant-registry-url",
            &registry_url,
            "--retry-delays",
            RETRY_DELAYS,
        ],
    ))
    .await;
    let (_conn, ch) = publisher(&topology).await;
    let fine = random_history(31, "fine", 3, 20);
    for (i, tenant) in ["fine", "locked", "gone"].into_iter().enumerate() {
        let history = random_history(31 + i as u64, tenant, 3, 20);
        for body in &history {
            publish(&ch, &topology, body).await;
        }
    }
    dbs.wait_for_rows(
        "fine",
        &model_of(&fine).identities(),
        Duration::from_secs(20),
    )
    .await;

    let seen = wait_until(
        "the status shows the locked tenant and the server that is down",
        Duration::from_secs(30),
        || async {
            let status = status_of(&worker).await;
            let slow: Vec<&str> = status
                .slow_tenants
                .iter()
                .map(|t| t.tenant.as_str())
                .collect();
            let down = status
                .servers
                .iter()
                .any(|s| s.server == down_server && !s.reachable);
            (down && slow.contains(&"locked") && slow.contains(&"gone")).then_some(status)
        },
    )
    .await;
    let locked = seen
        .slow_tenants
        .iter()
        .find(|t| t.tenant == "locked")
        .expect("the locked tenant");
    assert!(locked.why.contains("lock"), "{locked:?}");
    assert!(seen.ready);
    assert!(seen.messages.window > 0);
    let local = seen
        .servers
        .iter()
        .find(|s| s.server == "127.0.0.1:5432")
        .expect("the local server");
    assert!(
        local.reachable && local.budget >= local.sessions,
        "{local:?}"
    );

    let mut table = Vec::new();
    let common = settings(&prefix, PARTITIONS, &dbs, &[]).common;
    status::run(
        &StatusArgs {
            url: Some(worker.metrics_url.clone()),
            json: false,
        },
        &common,
        &mut table,
    )
    .await
    .expect("avsync-worker status");
    let table = String::from_utf8(table).unwrap();
    eprintln!("{table}");
    assert!(
        table.contains(&down_server) && table.contains("NO"),
        "{table}"
    );
    assert!(
        table.contains("locked") && table.contains("gone"),
        "{table}"
    );

    let asked_nowhere = status::run(
        &StatusArgs {
            url: Some(format!("http://127.0.0.1:{}", closed_port())),
            json: true,
        },
        &common,
        &mut Vec::new(),
    )
    .await
    .expect_err("nobody listens there");
    assert!(
        format!("{asked_nowhere:#}").contains("no status from"),
        "{asked_nowhere:#}"
    );

    assert_eq!(worker.events("other", Outcome::Retried), 0);
    for t in avsync_shared::event::KNOWN_TYPES {
        assert_eq!(worker.events(t, Outcome::Retried), 0, "{t}");
        assert_eq!(worker.events(t, Outcome::DeadLettered), 0, "{t}");
    }
    assert!(take_dead_letters(&ch, &topology).await.is_empty());
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    let _ = sqlx::Connection::close(locker).await;
    worker.stop().await;
}
