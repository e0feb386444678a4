//! The HTTP load generator: a fixed number of connections, each posting signed webhooks back to
//! back for a while (a closed loop, so the ingress sets the pace); counts answers by status and
//! times every accepted one.

use crate::bench::stats::{percentile, sorted};
use crate::bench::workload::Event;
use crate::bench::BenchError;
use crate::ingress_harness::{sign_standard, WEBHOOK_PATH};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// A webhook ready to post: Standard Webhooks headers over the body.
#[derive(Debug, Clone)]
pub struct SignedRequest {
    pub headers: [(&'static str, String); 3],
    pub body: bytes::Bytes,
}

/// Signs every event now, under a `whsec_` secret. Signing ahead keeps the load generator's own
/// CPU off the ingress's two cores while it is measured; the signatures stay fresh for the
/// ingress's 300 s tolerance.
pub fn sign_all(whsec_secret: &str, events: &[Event]) -> Vec<SignedRequest> {
    let ts = chrono::Utc::now().timestamp();
    events
        .iter()
        .map(|e| {
            let msg_id = format!("msg_{}", e.id);
            let signature = sign_standard(whsec_secret, &msg_id, ts, &e.body);
            SignedRequest {
                headers: [
                    ("webhook-id", msg_id),
                    ("webhook-timestamp", ts.to_string()),
                    ("webhook-signature", signature),
                ],
                body: e.body.clone(),
            }
        })
        .collect()
}

/// What one load run saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadOutcome {
    /// From the first request to the last answer.
    pub elapsed: Duration,
    /// Answers by status code; 202 is accepted.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no answer (connection refused, reset, timeout).
    pub transport_errors: u64,
    /// Latency of every 202, in milliseconds, ascending.
    #[serde(skip)]
    pub accepted_ms: Vec<f64>,
}

impl LoadOutcome {
    pub fn accepted(&self) -> u64 {
        self.statuses.get(&202).copied().unwrap_or(0)
    }

    pub fn not_accepted(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(status, _)| **status != 202)
            .map(|(_, n)| n)
            .sum::<u64>()
            + self.transport_errors
    }

    pub fn accepted_per_second(&self) -> f64 {
        self.accepted() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A latency percentile of the accepted requests, in milliseconds.
    pub fn latency_ms(&self, q: f64) -> Option<f64> {
        percentile(&self.accepted_ms, q)
    }
}

/// A client that keeps one connection per concurrent request.
pub fn client(concurrency: usize) -> Result<reqwest::Client, BenchError> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| BenchError::Internal(format!("HTTP client: {e}")))
}

/// Posts `requests` (round robin) to `{base_url}/webhooks/authvital` from `concurrency` loops
/// until `duration` has passed, then waits for the answers in flight.
pub async fn run(
    client: &reqwest::Client,
    base_url: &str,
    requests: Arc<Vec<SignedRequest>>,
    concurrency: usize,
    duration: Duration,
) -> LoadOutcome {
    let url = Arc::new(format!("{base_url}{WEBHOOK_PATH}"));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut loops = JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (client, url, requests, next) =
            (client.clone(), url.clone(), requests.clone(), next.clone());
        loops.spawn(async move {
            let mut seen = LoadOutcome::default();
            while started.elapsed() < duration && !requests.is_empty() {
                let request = &requests[next.fetch_add(1, Ordering::Relaxed) % requests.len()];
                let mut builder = client
                    .post(url.as_str())
                    .header("content-type", "application/json")
                    .body(request.body.clone());
                for (name, value) in &request.headers {
                    builder = builder.header(*name, value.as_str());
                }
                let sent = Instant::now();
                match builder.send().await {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        // Read the body so the connection goes back to the pool.
                        let _ = response.bytes().await;
                        if status == 202 {
                            seen.accepted_ms.push(sent.elapsed().as_secs_f64() * 1e3);
                        }
                        *seen.statuses.entry(status).or_insert(0) += 1;
                    }
                    Err(_) => seen.transport_errors += 1,
                }
            }
            seen
        });
    }
    let mut total = LoadOutcome::default();
    while let Some(joined) = loops.join_next().await {
        // A loop only ends by returning; a panic would be a bug in this file, counted as lost.
        let Ok(seen) = joined else {
            total.transport_errors += 1;
            continue;
        };
        for (status, n) in seen.statuses {
            *total.statuses.entry(status).or_insert(0) += n;
        }
        total.transport_errors += seen.transport_errors;
        total.accepted_ms.extend(seen.accepted_ms);
    }
    total.elapsed = started.elapsed();
    total.accepted_ms = sorted(total.accepted_ms);
    total
}
