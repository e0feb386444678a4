//! The ingress's Prometheus series. Each instance has its own registry (tests run many in one
//! process), and every labelled series exists from start so dashboards never see a gap.

use crate::server::ConnectionMetrics;
use crate::verify::SignatureFailure;
use avsync_shared::admin::{ReadyCheck, LATENCY_BUCKETS};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// The `outcome` label of `avsync_ingress_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    PayloadTooLarge,
    Unauthorized,
    BadRequest,
    Unavailable,
}

impl Outcome {
    pub const ALL: [Self; 5] = [
        Self::Accepted,
        Self::PayloadTooLarge,
        Self::Unauthorized,
        Self::BadRequest,
        Self::Unavailable,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::PayloadTooLarge => "payload_too_large",
            Self::Unauthorized => "unauthorized",
            Self::BadRequest => "bad_request",
            Self::Unavailable => "unavailable",
        }
    }
}

/// The `outcome` label of `avsync_ingress_jwks_fetches_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOutcome {
    Success,
    Failure,
}

impl FetchOutcome {
    pub fn label(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
        }
    }
}

#[derive(Clone)]
pub struct Metrics {
    requests: IntCounterVec,
    publish_seconds: Histogram,
    signature_failures: IntCounterVec,
    jwks_fetches: IntCounterVec,
    connections_open: IntGauge,
    connections_refused: IntCounter,
    connections_evicted: IntCounter,
    connections_waiting: IntGauge,
    pending_publishes: IntGauge,
}

impl Metrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "avsync_ingress_requests_total",
                "Webhook requests by outcome",
            ),
            &["outcome"],
        )?;
        let publish_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "avsync_ingress_publish_seconds",
                "Time from publish to the broker's confirm (or failure)",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let signature_failures = IntCounterVec::new(
            Opts::new(
                "avsync_ingress_signature_failures_total",
                "Refused signatures by reason",
            ),
            &["reason"],
        )?;
        let jwks_fetches = IntCounterVec::new(
            Opts::new(
                "avsync_ingress_jwks_fetches_total",
                "JWKS fetches by outcome",
            ),
            &["outcome"],
        )?;
        let connections_open = IntGauge::new(
            "avsync_ingress_connections_open",
            "Open connections on the public listener",
        )?;
        let connections_refused = IntCounter::new(
            "avsync_ingress_connections_refused_total",
            "Connections to the public listener closed at once because AVSYNC_MAX_HTTP_CONNECTIONS were open, each busy with a request",
        )?;
        let connections_evicted = IntCounter::new(
            "avsync_ingress_connections_evicted_total",
            "Connections to the public listener closed while they waited for a request head, to make room for a new one when AVSYNC_MAX_HTTP_CONNECTIONS were open",
        )?;
        let connections_waiting = IntGauge::new(
            "avsync_ingress_connections_waiting",
            "Open connections on the public listener waiting for a request head (new, or idle between requests): those a full listener closes, longest waiting first, to make room",
        )?;
        let pending_publishes = IntGauge::new(
            "avsync_ingress_pending_publishes",
            "Webhooks waiting for the broker's confirm (at most AVSYNC_MAX_PENDING_PUBLISHES)",
        )?;
        registry.register(Box::new(pending_publishes.clone()))?;
        registry.register(Box::new(connections_open.clone()))?;
        registry.register(Box::new(connections_refused.clone()))?;
        registry.register(Box::new(connections_evicted.clone()))?;
        registry.register(Box::new(connections_waiting.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(publish_seconds.clone()))?;
        registry.register(Box::new(signature_failures.clone()))?;
        registry.register(Box::new(jwks_fetches.clone()))?;
        for outcome in Outcome::ALL {
            requests.with_label_values(&[outcome.label()]);
        }
        for failure in SignatureFailure::ALL {
            signature_failures.with_label_values(&[failure.reason()]);
        }
        for outcome in [FetchOutcome::Success, FetchOutcome::Failure] {
            jwks_fetches.with_label_values(&[outcome.label()]);
        }
        Ok(Self {
            requests,
            publish_seconds,
            signature_failures,
            jwks_fetches,
            connections_open,
            connections_refused,
            connections_evicted,
            connections_waiting,
            pending_publishes,
        })
    }

    /// Counts one webhook waiting for its confirm until the returned guard is dropped.
    pub fn pending_publish(&self) -> PendingPublish {
        self.pending_publishes.inc();
        PendingPublish(self.pending_publishes.clone())
    }

    /// What the public listener reports about its connections.
    pub fn connections(&self) -> ConnectionMetrics {
        ConnectionMetrics {
            open: self.connections_open.clone(),
            refused: self.connections_refused.clone(),
            evicted: self.connections_evicted.clone(),
            waiting: self.connections_waiting.clone(),
        }
    }

    pub fn request(&self, outcome: Outcome) {
        self.requests.with_label_values(&[outcome.label()]).inc();
    }

    pub fn signature_failure(&self, failure: SignatureFailure) {
        self.signature_failures
            .with_label_values(&[failure.reason()])
            .inc();
    }

    pub fn publish_seconds(&self, seconds: f64) {
        self.publish_seconds.observe(seconds);
    }

    pub fn jwks_fetch(&self, outcome: FetchOutcome) {
        self.jwks_fetches
            .with_label_values(&[outcome.label()])
            .inc();
    }
}

/// One webhook counted in `avsync_ingress_pending_publishes`, until dropped.
pub struct PendingPublish(IntGauge);

impl Drop for PendingPublish {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// `avsync_ingress_ready`: 1 while `/readyz` would answer 200, read at each scrape so it is
/// never stale.
struct ReadyGauge {
    gauge: IntGauge,
    ready: ReadyCheck,
}

impl Collector for ReadyGauge {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.gauge.set(i64::from((self.ready)()));
        self.gauge.collect()
    }
}

pub fn register_ready(registry: &Registry, ready: ReadyCheck) -> Result<(), prometheus::Error> {
    let gauge = IntGauge::new(
        "avsync_ingress_ready",
        "1 while the ingress can queue webhooks (a confirming broker channel is open and, with only a JWKS, a key is loaded)",
    )?;
    registry.register(Box::new(ReadyGauge { gauge, ready }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, TextEncoder};

    #[test]
    fn every_labelled_series_exists_from_start() {
        let registry = Registry::new();
        Metrics::register(&registry).unwrap();
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut text)
            .unwrap();
        let text = String::from_utf8(text).unwrap();
        for outcome in Outcome::ALL {
            let line = format!(
                "avsync_ingress_requests_total{{outcome=\"{}\"}} 0",
                outcome.label()
            );
            assert!(text.contains(&line), "{line}");
        }
        for failure in SignatureFailure::ALL {
            let line = format!(
                "avsync_ingress_signature_failures_total{{reason=\"{}\"}} 0",
                failure.reason()
            );
            assert!(text.contains(&line), "{line}");
        }
        for outcome in ["success", "failure"] {
            let line = format!("avsync_ingress_jwks_fetches_total{{outcome=\"{outcome}\"}} 0");
            assert!(text.contains(&line), "{line}");
        }
        assert!(text.contains("avsync_ingress_publish_seconds_bucket{le=\"0.001\"} 0"));
        assert!(text.contains("\navsync_ingress_connections_open 0\n"));
        assert!(text.contains("\navsync_ingress_pending_publishes 0\n"));
        assert!(text.contains("\navsync_ingress_connections_refused_total 0\n"));
        assert!(text.contains("\navsync_ingress_connections_evicted_total 0\n"));
        assert!(text.contains("\navsync_ingress_connections_waiting 0\n"));
    }

    #[test]
    fn the_ready_gauge_follows_the_check_at_each_scrape() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let registry = Registry::new();
        let flag = Arc::new(AtomicBool::new(false));
        let check = flag.clone();
        register_ready(&registry, Arc::new(move || check.load(Ordering::SeqCst))).unwrap();
        let text = || {
            let mut out = Vec::new();
            TextEncoder::new()
                .encode(&registry.gather(), &mut out)
                .unwrap();
            String::from_utf8(out).unwrap()
        };
        assert!(text().contains("\navsync_ingress_ready 0\n"));
        flag.store(true, Ordering::SeqCst);
        assert!(text().contains("\navsync_ingress_ready 1\n"));
    }
}
