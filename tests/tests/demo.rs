//! The demo (`cargo run -p avsync-tests --bin demo`), run in-process: it reports every
//! tenant's rows and the key metrics, stops cleanly, and leaves nothing behind but, with
//! `--keep`, its databases.

use avsync_shared::Topology;
use avsync_tests::demo::story::TENANTS;
use avsync_tests::demo::{run, DemoArgs, Summary};
use avsync_tests::support;
use clap::Parser;

async fn demo(flags: &[&str]) -> (Summary, String) {
    let args = DemoArgs::parse_from(std::iter::once("demo").chain(flags.iter().copied()));
    let mut out = Vec::new();
    let summary = run(&args, &mut out).await.expect("the demo succeeds");
    (summary, String::from_utf8(out).expect("UTF-8 report"))
}

async fn existing(databases: &[String]) -> Vec<String> {
    let mut admin = support::pg_admin().await;
    sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname = ANY($1) ORDER BY datname")
        .bind(databases)
        .fetch_all(&mut admin)
        .await
        .expect("list databases")
}

async fn topology_exists(prefix: &str) -> bool {
    let (_conn, ch) = support::channel().await;
    let topology = Topology::new(prefix, 1).expect("the demo's prefix");
    support::queue_depth(&ch, &topology.dead_queue())
        .await
        .is_some()
}

fn assert_reports_everything(report: &str) {
    for (tenant, users) in TENANTS {
        let heading = format!("tenant {tenant}: database ");
        let line = report
            .lines()
            .find(|l| l.starts_with(&heading))
            .unwrap_or_else(|| panic!("no table for {tenant}:\n{report}"));
        assert!(line.ends_with(&format!("({users} rows)")), "{line}");
    }
    for expected in [
        "× 202 Accepted",
        "401 Unauthorized, not queued",
        "every tenant database equals the state the events define",
        "Stopped the ingress and both workers gracefully",
    ] {
        assert!(report.contains(expected), "`{expected}` missing:\n{report}");
    }
    let rows_of =
        |metric: &str| -> Vec<&str> { report.lines().filter(|l| l.contains(metric)).collect() };
    let requests = rows_of("avsync_ingress_requests_total");
    assert!(
        requests.len() == 1 && requests[0].contains("unauthorized 1"),
        "{requests:?}"
    );
    let events = rows_of("avsync_worker_events_total");
    assert_eq!(events.len(), 2, "one line per worker: {events:?}");
    let queues = rows_of("avsync_worker_queue_messages");
    assert_eq!(queues.len(), 2, "{queues:?}");
    for line in queues {
        assert!(
            line.ends_with("partitions 0, retry tiers 0, dead letters 0"),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_reports_and_removes_everything_it_created() {
    let (summary, report) = demo(&["--seed", "11"]).await;
    assert_reports_everything(&report);
    assert!(report.contains("Removed the demo's queues, exchanges and databases"));
    assert!(!summary.kept);
    assert_eq!(summary.databases.len(), TENANTS.len());
    assert!(existing(&summary.databases).await.is_empty());
    assert!(!topology_exists(&summary.topology).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_keep_the_databases_stay() {
    let (summary, report) = demo(&["--keep"]).await;
    let kept = existing(&summary.databases).await;
    for database in &summary.databases {
        support::drop_database(database).await;
    }
    assert_reports_everything(&report);
    assert!(report.contains("Kept the databases"), "{report}");
    assert_eq!(kept.len(), TENANTS.len());
    assert!(!topology_exists(&summary.topology).await);
}
