//! The worker's Prometheus metrics. Every labelled counter exists from the start (at 0 for each
//! label value it can take); no label holds a tenant id.

use avsync_shared::admin::LATENCY_BUCKETS;
use avsync_shared::event::KNOWN_TYPES;
use avsync_shared::topology::format_duration;
use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use reqwest::StatusCode;
use std::time::Duration;

/// Lag spans retries and outages: from 10 ms to a day.
const LAG_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0,
    86400.0,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Ignored,
    Retried,
    DeadLettered,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Outcome::Applied,
        Outcome::Ignored,
        Outcome::Retried,
        Outcome::DeadLettered,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Ignored => "ignored",
            Outcome::Retried => "retried",
            Outcome::DeadLettered => "dead_lettered",
        }
    }
}

/// A gauge per PostgreSQL server (`host:port`), registered in `registry`.
fn per_server(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntGaugeVec> {
    let gauge = IntGaugeVec::new(Opts::new(name, help), &["server"])?;
    registry.register(Box::new(gauge.clone()))?;
    Ok(gauge)
}

/// Why a message was set aside; the `reason` label of `avsync_worker_events_set_aside_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetAsideReason {
    /// Its tenant is marked slow.
    Slow,
    /// Its tenant holds its bound of messages and is stalled.
    Backlog,
    /// Its tenant's PostgreSQL server does not answer.
    ServerDown,
    /// The window held its bound in bytes (`AVSYNC_PREFETCH_BYTES`) when it arrived.
    WindowFull,
}

impl SetAsideReason {
    pub const ALL: [SetAsideReason; 4] = [
        SetAsideReason::Slow,
        SetAsideReason::Backlog,
        SetAsideReason::ServerDown,
        SetAsideReason::WindowFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SetAsideReason::Slow => "slow",
            SetAsideReason::Backlog => "backlog",
            SetAsideReason::ServerDown => "server_down",
            SetAsideReason::WindowFull => "window_full",
        }
    }
}

/// The status label of `avsync_worker_authvital_requests_total`: a bounded set.
pub fn status_label(status: Option<StatusCode>) -> &'static str {
    match status.map(|s| s.as_u16()) {
        None => "error",
        Some(200..=299) => "2xx",
        Some(400) => "400",
        Some(401) => "401",
        Some(403) => "403",
        Some(404) => "404",
        Some(429) => "429",
        Some(500..=599) => "5xx",
        Some(_) => "other",
    }
}

pub const STATUS_LABELS: [&str; 9] = [
    "2xx", "400", "401", "403", "404", "429", "5xx", "other", "error",
];

/// The tenant pool series: how many pools are open, how often one is opened or evicted, and how
/// long an event waits for a connection.
#[derive(Clone)]
pub struct PoolMetrics {
    pub open: IntGauge,
    pub opens: IntCounter,
    pub evictions: IntCounter,
    pub wait_seconds: Histogram,
    /// Sessions open per server (`host:port`), the budget in force there, and whether it
    /// answers.
    pub connections: IntGaugeVec,
    pub connection_budget: IntGaugeVec,
    pub server_reachable: IntGaugeVec,
    /// Connections refused, by `scope`: `server` (lack of slots) or `database` (its own limit).
    pub refusals: IntCounterVec,
    /// New tenant sessions opened (cold opens).
    pub sessions: IntCounter,
    /// Idle sessions closed to make room in a server's budget for another tenant.
    pub budget_closes: IntCounter,
    pub migrations_skipped: IntCounter,
}

/// The `scope` label values of `avsync_worker_connection_refusals_total`.
pub const REFUSAL_SCOPES: [&str; 2] = ["server", "database"];

impl PoolMetrics {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let open = IntGauge::new(
            "avsync_worker_tenant_pools",
            "Tenant database pools open in this worker.",
        )?;
        let opens = IntCounter::new(
            "avsync_worker_tenant_pool_opens_total",
            "Tenant database pools opened (first use of a tenant, or again after an eviction).",
        )?;
        let evictions = IntCounter::new(
            "avsync_worker_tenant_pool_evictions_total",
            "Tenant database pools closed to make room (AVSYNC_TENANT_POOL_CAPACITY) or after idling.",
        )?;
        let wait_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "avsync_worker_tenant_pool_wait_seconds",
                "Time an event waited for a connection from its tenant's pool.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let connections = per_server(
            registry,
            "avsync_worker_connections",
            "Tenant sessions this worker holds open, by PostgreSQL server (host:port).",
        )?;
        let connection_budget = per_server(
            registry,
            "avsync_worker_connection_budget",
            "Most tenant sessions this worker may hold to the server now: AVSYNC_MAX_CONNECTIONS pinned, or sized from the server (auto: an equal share of what it allows beyond its other clients and AVSYNC_PG_FREE_CONNECTIONS), less for a while after a refusal.",
        )?;
        let server_reachable = per_server(
            registry,
            "avsync_worker_server_reachable",
            "1 while the PostgreSQL server (host:port) answers this worker, 0 since a probe after a failed connection found it unreachable (its tenants' events are set aside meanwhile).",
        )?;
        let refusals = IntCounterVec::new(
            Opts::new(
                "avsync_worker_connection_refusals_total",
                "Tenant connections refused: scope `server` for lack of slots (the budget is lowered, the work waits), `database` for a database's own CONNECTION LIMIT (its tenant's events are set aside).",
            ),
            &["scope"],
        )?;
        for scope in REFUSAL_SCOPES {
            refusals.with_label_values(&[scope]);
        }
        let sessions = IntCounter::new(
            "avsync_worker_connection_opens_total",
            "New tenant sessions opened (cold opens).",
        )?;
        let budget_closes = IntCounter::new(
            "avsync_worker_connection_budget_closes_total",
            "Idle tenant sessions closed to make room in a server's budget (AVSYNC_MAX_CONNECTIONS) for another tenant, or because the budget was sized down.",
        )?;
        let migrations_skipped = IntCounter::new(
            "avsync_worker_migrations_skipped_total",
            "New tenant sessions that skipped the migration check: this worker already migrated their database.",
        )?;
        registry.register(Box::new(open.clone()))?;
        registry.register(Box::new(opens.clone()))?;
        registry.register(Box::new(evictions.clone()))?;
        registry.register(Box::new(wait_seconds.clone()))?;
        registry.register(Box::new(refusals.clone()))?;
        registry.register(Box::new(sessions.clone()))?;
        registry.register(Box::new(budget_closes.clone()))?;
        registry.register(Box::new(migrations_skipped.clone()))?;
        Ok(Self {
            open,
            opens,
            evictions,
            wait_seconds,
            connections,
            connection_budget,
            server_reachable,
            refusals,
            sessions,
            budget_closes,
            migrations_skipped,
        })
    }
}

/// How a reconcile of one tenant ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// The snapshot was folded in.
    Applied,
    /// `--dry-run`: computed, nothing written.
    DryRun,
    /// A guard rail refused the snapshot.
    Refused,
    /// Another worker was reconciling the tenant.
    Busy,
    /// The schedule found the tenant reconciled recently (by another worker).
    NotDue,
    /// AuthVital or the tenant database failed.
    Failed,
}

impl RunOutcome {
    pub const ALL: [RunOutcome; 6] = [
        RunOutcome::Applied,
        RunOutcome::DryRun,
        RunOutcome::Refused,
        RunOutcome::Busy,
        RunOutcome::NotDue,
        RunOutcome::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RunOutcome::Applied => "applied",
            RunOutcome::DryRun => "dry_run",
            RunOutcome::Refused => "refused",
            RunOutcome::Busy => "busy",
            RunOutcome::NotDue => "not_due",
            RunOutcome::Failed => "failed",
        }
    }
}

/// The kinds of rows a reconcile writes.
pub const ROW_KINDS: [&str; 3] = ["created", "changed", "marked_left"];

/// The reconcile series: runs by outcome, rows written by kind, AuthVital requests by status.
#[derive(Clone)]
pub struct ReconcileMetrics {
    runs: IntCounterVec,
    rows: IntCounterVec,
    api_calls: IntCounterVec,
}

impl ReconcileMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let runs = IntCounterVec::new(
            Opts::new(
                "avsync_worker_reconcile_runs_total",
                "Reconciles of one tenant, by outcome.",
            ),
            &["outcome"],
        )?;
        for outcome in RunOutcome::ALL {
            runs.with_label_values(&[outcome.as_str()]);
        }
        let rows = IntCounterVec::new(
            Opts::new(
                "avsync_worker_reconcile_rows_total",
                "Rows a reconcile created, changed or marked left (applied runs only).",
            ),
            &["kind"],
        )?;
        for kind in ROW_KINDS {
            rows.with_label_values(&[kind]);
        }
        let api_calls = IntCounterVec::new(
            Opts::new(
                "avsync_worker_authvital_requests_total",
                "Requests to AuthVital's API, by answer status (`error`: no answer).",
            ),
            &["status"],
        )?;
        for status in STATUS_LABELS {
            api_calls.with_label_values(&[status]);
        }
        registry.register(Box::new(runs.clone()))?;
        registry.register(Box::new(rows.clone()))?;
        registry.register(Box::new(api_calls.clone()))?;
        Ok(Self {
            runs,
            rows,
            api_calls,
        })
    }

    pub fn run(&self, outcome: RunOutcome) {
        self.runs.with_label_values(&[outcome.as_str()]).inc();
    }

    pub fn runs_total(&self, outcome: RunOutcome) -> u64 {
        self.runs.with_label_values(&[outcome.as_str()]).get()
    }

    /// `kind` is one of [`ROW_KINDS`].
    pub fn rows(&self, kind: &str, n: u64) {
        self.rows.with_label_values(&[kind]).inc_by(n);
    }

    /// `status` is one of [`STATUS_LABELS`].
    pub fn api_call(&self, status: &str) {
        self.api_calls.with_label_values(&[status]).inc();
    }

    pub fn api_calls_total(&self, status: &str) -> u64 {
        self.api_calls.with_label_values(&[status]).get()
    }
}

/// The series of tenants' standings: messages set aside, and tenants marked slow.
#[derive(Clone)]
pub struct StandingMetrics {
    set_aside: IntCounterVec,
    /// `avsync_worker_tenants_marked_slow_total`.
    pub marked_slow: IntCounter,
    /// `avsync_worker_tenants_slow`.
    pub slow_now: IntGauge,
}

impl StandingMetrics {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let set_aside = IntCounterVec::new(
            Opts::new(
                "avsync_worker_events_set_aside_total",
                "Events set aside through a delay tier without counting an attempt, by reason: `slow` (its tenant is marked slow), `backlog` (its stalled tenant holds AVSYNC_TENANT_MAX_UNSETTLED), `server_down` (its tenant's PostgreSQL server does not answer).",
            ),
            &["reason"],
        )?;
        for reason in SetAsideReason::ALL {
            set_aside.with_label_values(&[reason.as_str()]);
        }
        let marked_slow = IntCounter::new(
            "avsync_worker_tenants_marked_slow_total",
            "Times a tenant was marked slow (statements timed out, its database did not answer or refused it).",
        )?;
        let slow_now = IntGauge::new(
            "avsync_worker_tenants_slow",
            "Tenants marked slow right now, whose new events are set aside until a probe succeeds.",
        )?;
        registry.register(Box::new(set_aside.clone()))?;
        registry.register(Box::new(marked_slow.clone()))?;
        registry.register(Box::new(slow_now.clone()))?;
        Ok(Self {
            set_aside,
            marked_slow,
            slow_now,
        })
    }
}

/// The acks sent (see `acks`): messages by the kind of ack that carried them, and the
/// multiple acks.
#[derive(Clone)]
pub struct AckMetrics {
    acks: IntCounterVec,
    multiple_acks: IntCounter,
}

impl AckMetrics {
    fn register(registry: &Registry) -> prometheus::Result<Self> {
        let acks = IntCounterVec::new(
            Opts::new(
                "avsync_worker_acks_total",
                "Messages acked, by the ack that carried them: `single`, or `multiple` (one ack for a run of a channel's deliveries settled in the order they came).",
            ),
            &["frame"],
        )?;
        for frame in ["single", "multiple"] {
            acks.with_label_values(&[frame]);
        }
        let multiple_acks = IntCounter::new(
            "avsync_worker_multiple_acks_total",
            "Acks sent for a run of deliveries at once (`multiple`).",
        )?;
        registry.register(Box::new(acks.clone()))?;
        registry.register(Box::new(multiple_acks.clone()))?;
        Ok(Self {
            acks,
            multiple_acks,
        })
    }

    /// An ack sent for `messages`, as one `multiple` ack or on its own.
    pub fn acked(&self, messages: u64, multiple: bool) {
        let frame = if multiple { "multiple" } else { "single" };
        self.acks.with_label_values(&[frame]).inc_by(messages);
        if multiple {
            self.multiple_acks.inc();
        }
    }

    /// Messages acked by `multiple` acks, and those acks.
    pub fn in_runs(&self) -> (u64, u64) {
        (
            self.acks.with_label_values(&["multiple"]).get(),
            self.multiple_acks.get(),
        )
    }
}

#[derive(Clone)]
pub struct Metrics {
    events: IntCounterVec,
    retries: IntCounterVec,
    pub apply_seconds: Histogram,
    pub lag_seconds: Histogram,
    pub tenant_pools: PoolMetrics,
    pub standings: StandingMetrics,
    /// `avsync_worker_queue_messages{queue}`, kept by the queue depth poller (`depth`).
    pub queue_messages: IntGaugeVec,
    pub ready: IntGauge,
    pub reconcile: ReconcileMetrics,
    pub acks: AckMetrics,
}

impl Metrics {
    /// The worker's series, with `avsync_worker_retries_total` created for no delay yet; see
    /// [`Metrics::register_with_retry_delays`].
    #[cfg(any(test, feature = "test-support"))]
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        Self::register_with_retry_delays(registry, &[])
    }

    /// The worker's series, with `avsync_worker_retries_total{delay}` at 0 for each delay of
    /// `AVSYNC_RETRY_DELAYS`.
    pub fn register_with_retry_delays(
        registry: &Registry,
        retry_delays: &[Duration],
    ) -> prometheus::Result<Self> {
        let events = IntCounterVec::new(
            Opts::new(
                "avsync_worker_events_total",
                "Events handled, by type (`other` for unknown types) and outcome.",
            ),
            &["type", "outcome"],
        )?;
        for event_type in KNOWN_TYPES.iter().copied().chain(["other"]) {
            for outcome in Outcome::ALL {
                events.with_label_values(&[event_type, outcome.as_str()]);
            }
        }
        let retries = IntCounterVec::new(
            Opts::new(
                "avsync_worker_retries_total",
                "Transient failures sent to wait in a retry tier, by the tier's delay (AVSYNC_RETRY_DELAYS).",
            ),
            &["delay"],
        )?;
        for delay in retry_delays {
            retries.with_label_values(&[format_duration(*delay)]);
        }
        let apply_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "avsync_worker_apply_seconds",
                "Time to resolve the tenant and apply one event, until its commit.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let lag_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "avsync_worker_lag_seconds",
                "From the event's timestamp to the commit of its effect.",
            )
            .buckets(LAG_BUCKETS.to_vec()),
        )?;
        let queue_messages = IntGaugeVec::new(
            Opts::new(
                "avsync_worker_queue_messages",
                "Messages ready in each queue of the topology (partitions, retry tiers, dead letters), polled every few seconds; absent while the broker is unreachable.",
            ),
            &["queue"],
        )?;
        let ready = IntGauge::new(
            "avsync_worker_ready",
            "1 while this worker consumes every partition queue, else 0.",
        )?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(apply_seconds.clone()))?;
        registry.register(Box::new(lag_seconds.clone()))?;
        registry.register(Box::new(queue_messages.clone()))?;
        registry.register(Box::new(ready.clone()))?;
        let tenant_pools = PoolMetrics::register(registry)?;
        let standings = StandingMetrics::register(registry)?;
        let reconcile = ReconcileMetrics::register(registry)?;
        let acks = AckMetrics::register(registry)?;
        Ok(Self {
            events,
            retries,
            apply_seconds,
            lag_seconds,
            tenant_pools,
            standings,
            queue_messages,
            ready,
            reconcile,
            acks,
        })
    }

    /// One message set aside (published, confirmed, to a delay tier) with no attempt counted.
    pub fn set_aside(&self, reason: SetAsideReason) {
        self.standings
            .set_aside
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    pub fn set_aside_total(&self, reason: SetAsideReason) -> u64 {
        self.standings
            .set_aside
            .with_label_values(&[reason.as_str()])
            .get()
    }

    /// `type_label` is one of `KNOWN_TYPES` or `other` (see `event::type_label`).
    pub fn count(&self, type_label: &str, outcome: Outcome) {
        self.events
            .with_label_values(&[type_label, outcome.as_str()])
            .inc();
    }

    pub fn events_total(&self, type_label: &str, outcome: Outcome) -> u64 {
        self.events
            .with_label_values(&[type_label, outcome.as_str()])
            .get()
    }

    /// One message published (confirmed) into the retry tier for `delay`.
    pub fn retried(&self, delay: Duration) {
        self.retries
            .with_label_values(&[format_duration(delay)])
            .inc();
    }

    pub fn retries_total(&self, delay: Duration) -> u64 {
        self.retries
            .with_label_values(&[format_duration(delay)])
            .get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_labels_are_bounded() {
        for code in [200, 204, 400, 401, 403, 404, 418, 429, 500, 503] {
            let label = status_label(Some(StatusCode::from_u16(code).unwrap()));
            assert!(STATUS_LABELS.contains(&label), "{code}");
        }
        assert_eq!(status_label(None), "error");
    }
    use prometheus::{Encoder, TextEncoder};

    fn text(registry: &Registry) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn every_series_exists_from_the_start() {
        let registry = Registry::new();
        let delays = [1, 5, 30, 120, 600, 3600].map(Duration::from_secs);
        Metrics::register_with_retry_delays(&registry, &delays).unwrap();
        let families = registry.gather();
        let events = families
            .iter()
            .find(|f| f.name() == "avsync_worker_events_total")
            .unwrap();
        assert_eq!(events.get_metric().len(), (KNOWN_TYPES.len() + 1) * 4);
        for name in [
            "avsync_worker_apply_seconds",
            "avsync_worker_lag_seconds",
            "avsync_worker_tenant_pools",
            "avsync_worker_tenant_pool_opens_total",
            "avsync_worker_tenant_pool_evictions_total",
            "avsync_worker_tenant_pool_wait_seconds",
            "avsync_worker_ready",
            "avsync_worker_connection_opens_total",
            "avsync_worker_connection_budget_closes_total",
            "avsync_worker_migrations_skipped_total",
            "avsync_worker_tenants_marked_slow_total",
            "avsync_worker_tenants_slow",
        ] {
            assert!(families.iter().any(|f| f.name() == name), "{name}");
        }
        let text = text(&registry);
        for line in [
            "avsync_worker_connection_refusals_total{scope=\"server\"} 0\n",
            "avsync_worker_connection_refusals_total{scope=\"database\"} 0\n",
            "avsync_worker_events_set_aside_total{reason=\"slow\"} 0\n",
            "avsync_worker_events_set_aside_total{reason=\"backlog\"} 0\n",
        ] {
            assert!(text.contains(line), "{line}");
        }
        for delay in ["1s", "5s", "30s", "2m", "10m", "1h"] {
            let line = format!("avsync_worker_retries_total{{delay=\"{delay}\"}} 0\n");
            assert!(text.contains(&line), "{line}");
        }
        assert!(text.contains("avsync_worker_tenant_pool_wait_seconds_bucket{le=\"30\"} 0\n"));
        for line in [
            "avsync_worker_reconcile_runs_total{outcome=\"refused\"} 0\n",
            "avsync_worker_reconcile_rows_total{kind=\"marked_left\"} 0\n",
            "avsync_worker_authvital_requests_total{status=\"429\"} 0\n",
        ] {
            assert!(text.contains(line), "{line}");
        }
    }

    #[test]
    fn retries_are_counted_by_their_configured_delay() {
        let registry = Registry::new();
        let delays = [Duration::from_millis(1500), Duration::from_secs(120)];
        let metrics = Metrics::register_with_retry_delays(&registry, &delays).unwrap();
        metrics.retried(Duration::from_secs(120));
        metrics.retried(Duration::from_secs(120));
        metrics.retried(Duration::from_millis(1500));
        assert_eq!(metrics.retries_total(Duration::from_secs(120)), 2);
        let text = text(&registry);
        assert!(text.contains("avsync_worker_retries_total{delay=\"2m\"} 2\n"));
        assert!(text.contains("avsync_worker_retries_total{delay=\"1500ms\"} 1\n"));
    }
}
