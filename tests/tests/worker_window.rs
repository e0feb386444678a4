//! The prefetch window's bound in bytes (`AVSYNC_PREFETCH_BYTES`): large events from several
//! tenants arrive together; what the worker holds to apply never weighs more than the bound,
//! what arrives beyond it is set aside (reason `window_full`) and comes back, and in the end
//! every row equals the model with nothing retried or dead-lettered.

use avsync_shared::event::KNOWN_TYPES;
use avsync_shared::topology::Topology;
use avsync_tests::support::{self, wait_until, TopologyCleanup};
use avsync_tests::worker_harness::{
    model_of, publish_all, publisher, random_history, settings, take_dead_letters, TestDatabases,
    TestWorker,
};
use avsync_worker::metrics::{Outcome, SetAsideReason};
use avsync_worker::ops::status::Status;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const PARTITIONS: u16 = 2;
const TENANTS: usize = 6;
/// Each body carries this much padding beside the event, which the worker ignores.
const PADDING: usize = 3_000;
const BOUND: usize = 16 * 1024;

/// `body` with a top-level key the envelope and the event ignore, making it `PADDING` larger.
fn padded(body: &[u8]) -> Vec<u8> {
    let rest = body.strip_prefix(b"{").expect("a JSON object");
    let mut out = format!("{{\"padding\":\"{}\",", "x".repeat(PADDING)).into_bytes();
    out.extend_from_slice(rest);
    out
}

async fn status_of(url: &str) -> Option<Status> {
    reqwest::get(format!("{url}/status"))
        .await
        .ok()?
        .json()
        .await
        .ok()
}

#[tokio::test]
async fn the_window_never_weighs_more_than_its_bound_and_loses_nothing() {
    let prefix = support::unique("wwin");
    const RETRY_DELAYS: &str = "200ms,1s";
    let _cleanup = TopologyCleanup::new(&prefix, PARTITIONS).with_retry_delays(RETRY_DELAYS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("wwin");
    let bound = BOUND.to_string();
    let worker = TestWorker::start(settings(
        &prefix,
        PARTITIONS,
        &dbs,
        &[
            "--prefetch",
            "512",
            "--prefetch-bytes",
            &bound,
            "--retry-delays",
            RETRY_DELAYS,
        ],
    ))
    .await;

    let heaviest = Arc::new(AtomicUsize::new(0));
    let sampling = tokio::spawn({
        let url = worker.metrics_url.clone();
        let heaviest = heaviest.clone();
        async move {
            loop {
                if let Some(status) = status_of(&url).await {
                    assert_eq!(status.messages.window_bytes_bound, BOUND);
                    heaviest.fetch_max(status.messages.window_bytes, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });

    let (_conn, ch) = publisher(&topology).await;
    let mut histories = Vec::new();
    for t in 0..TENANTS {
        let tenant = format!("t{t}");
        let history = random_history(70 + t as u64, &tenant, 3, 30);
        let bodies: Vec<Vec<u8>> = history.iter().map(|b| padded(b)).collect();
        publish_all(&ch, &topology, &bodies).await;
        histories.push((tenant, history));
    }
    for (tenant, history) in &histories {
        dbs.wait_for_rows(
            tenant,
            &model_of(history).identities(),
            Duration::from_secs(60),
        )
        .await;
    }
    sampling.abort();

    let set_aside = worker
        .running()
        .metrics()
        .set_aside_total(SetAsideReason::WindowFull);
    assert!(
        set_aside > 0,
        "{} events of {PADDING}+ bytes arrived together: some must have met the bound",
        TENANTS * 30
    );
    let heaviest = heaviest.load(Ordering::Relaxed);
    assert!(
        heaviest <= BOUND,
        "the window weighed {heaviest} bytes, over its bound of {BOUND}"
    );
    assert!(heaviest > 0, "the sampler saw the window hold something");
    let retried: u64 = KNOWN_TYPES
        .iter()
        .map(|t| worker.events(t, Outcome::Retried))
        .sum();
    assert_eq!(retried, 0, "a set-aside message counts no attempt");
    wait_until("the window is empty", Duration::from_secs(10), || async {
        let status = status_of(&worker.metrics_url).await?;
        (status.messages.in_window == 0 && status.messages.window_bytes == 0).then_some(())
    })
    .await;
    assert!(take_dead_letters(&ch, &topology).await.is_empty());
    worker.stop().await;
}
