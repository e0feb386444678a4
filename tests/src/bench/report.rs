//! The run's result: every figure with its repetitions and CPU, the checks against the issue's
//! targets, printed as a table and written as JSON.

use crate::bench::args::TenantCounts;
use crate::bench::cpu::CpuShare;
use crate::bench::stats::Summary;
use crate::bench::BenchError;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// The live-traffic lag both lag series are held to: issue 23's run measured p99 178 ms at
/// 7,054 events/s, then half the drain rate, now near `--lag-fixed-rate`'s default.
const LIVE_LAG_P99_MS: f64 = 178.0;

/// The figures, by the key the JSON report and the checks use.
pub mod keys {
    pub const BROKER: &str = "broker_publish";
    pub const BROKER_ONE_QUEUE: &str = "broker_publish_one_queue";
    pub const INGRESS: &str = "ingress_accepted";
    pub const INGRESS_P50: &str = "ingress_latency_p50";
    pub const INGRESS_P99: &str = "ingress_latency_p99";
    pub const PIPELINE_BATCHED: &str = "pipeline_batched";
    pub const PIPELINE_NAIVE: &str = "pipeline_naive";
    pub const PG_SINGLE: &str = "postgres_upsert_1_row_per_tx";
    pub const PG_BATCH: &str = "postgres_upsert_100_rows_per_statement";
    pub const WORKER: &str = "worker_drain";
    pub const WORKER_RSS: &str = "worker_peak_rss";
    pub const WORKER_SESSIONS: &str = "worker_sessions_per_1k_events";
    pub const WORKER_LOWEST_FREE: &str = "worker_lowest_free_slots";
    /// The free slots a worker leaves on a server: AVSYNC_PG_FREE_CONNECTIONS's default, a
    /// fifth of `max_connections`.
    pub const FREE_SLOTS_FLOOR: &str = "free_slots_floor";
    pub const COLD_TOTAL: &str = "cold_session_open_and_first_batch";
    pub const COLD_OPEN: &str = "cold_session_open";
    pub const COLD_FIRST_BATCH: &str = "cold_session_first_batch";
    pub const COLD_MIGRATION_CHECK: &str = "cold_session_migration_check";
    pub const LAG_RATE: &str = "worker_lag_publish_rate";
    pub const LAG_P50: &str = "worker_lag_p50";
    pub const LAG_P99: &str = "worker_lag_p99";
    pub const LAG_FIXED_RATE: &str = "worker_lag_fixed_publish_rate";
    pub const LAG_FIXED_P50: &str = "worker_lag_fixed_p50";
    pub const LAG_FIXED_P99: &str = "worker_lag_fixed_p99";
    pub const NEIGHBOUR_P50: &str = "neighbour_lag_p50";
    pub const NEIGHBOUR_P99: &str = "neighbour_lag_p99";
    pub const OTHERS_P99: &str = "neighbour_other_partitions_lag_p99";
    pub const NEIGHBOUR_SET_ASIDE: &str = "neighbour_locked_tenant_set_aside";
    pub const NEIGHBOUR_CATCH_UP: &str = "neighbour_locked_tenant_catch_up";

    /// What a scale drain reports of itself.
    #[derive(Debug, Clone, Copy)]
    pub enum Scale {
        Drain,
        Retried,
        DeadLettered,
        PeakConnections,
        SessionsPer1k,
        /// New sessions per 1,000 events with one open per tenant that has events.
        SessionsBound,
        /// The drain rate the model allows with one open per tenant (see `drain`).
        RateBound,
        PeakRss,
        /// Fewest free connection slots on the server while it drained.
        LowestFree,
    }

    /// `scale_<tenants>_<uniform|zipf>_<measure>`, e.g. `scale_1000_zipf_drain`.
    pub fn scale(tenants: u32, zipf: bool, measure: Scale) -> String {
        let activity = if zipf { "zipf" } else { "uniform" };
        format!("scale_{tenants}_{activity}_{}", measure_name(measure))
    }

    /// `scale_<tenants>_uniform_<workers>_workers_<measure>`: a uniform drain by more workers
    /// than the others.
    pub fn scale_workers(tenants: u32, workers: u16, measure: Scale) -> String {
        format!(
            "scale_{tenants}_uniform_{workers}_workers_{}",
            measure_name(measure)
        )
    }

    fn measure_name(measure: Scale) -> &'static str {
        match measure {
            Scale::Drain => "drain",
            Scale::Retried => "retried",
            Scale::DeadLettered => "dead_lettered",
            Scale::PeakConnections => "peak_connections",
            Scale::SessionsPer1k => "sessions_per_1k_events",
            Scale::SessionsBound => "sessions_per_1k_events_bound",
            Scale::RateBound => "drain_bound",
            Scale::PeakRss => "peak_rss",
            Scale::LowestFree => "lowest_free_slots",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub key: String,
    /// The section (1 to 5) this figure answers.
    pub section: u8,
    pub title: String,
    pub unit: &'static str,
    pub samples: Vec<f64>,
    /// Median, min and max of `samples`; absent when no repetition produced a value.
    pub summary: Option<Summary>,
    /// Median cores each part used while the figure was measured.
    pub cpu: Option<CpuShare>,
}

impl Figure {
    pub fn new(
        key: impl Into<String>,
        section: u8,
        title: impl Into<String>,
        unit: &'static str,
        samples: Vec<f64>,
        cpu: &[CpuShare],
    ) -> Self {
        Self {
            key: key.into(),
            section,
            title: title.into(),
            unit,
            summary: Summary::of(&samples),
            samples,
            cpu: CpuShare::median(cpu),
        }
    }

    pub fn median(&self) -> Option<f64> {
        self.summary.map(|s| s.median)
    }
}

/// Which way a target points.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    AtLeast,
    AtMost,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    Pass,
    Miss,
    /// A figure it needs was not measured in this run.
    #[serde(rename = "N/A")]
    NotMeasured,
}

/// One of the targets, reported and never asserted.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub value: Option<f64>,
    pub bound: Bound,
    pub target: f64,
    pub unit: &'static str,
    pub verdict: Verdict,
    /// What one open per tenant allows, beside a many-tenant figure (see `drain`).
    pub one_open_per_tenant: Option<f64>,
}

impl Check {
    fn new(name: impl Into<String>, value: Option<f64>, bound: Bound, target: f64) -> Self {
        Self::with_unit(name, value, bound, target, "x")
    }

    fn with_unit(
        name: impl Into<String>,
        value: Option<f64>,
        bound: Bound,
        target: f64,
        unit: &'static str,
    ) -> Self {
        let verdict = match (value, bound) {
            (None, _) => Verdict::NotMeasured,
            (Some(v), Bound::AtLeast) if v >= target => Verdict::Pass,
            (Some(v), Bound::AtMost) if v <= target => Verdict::Pass,
            (Some(_), _) => Verdict::Miss,
        };
        Self {
            name: name.into(),
            value,
            bound,
            target,
            unit,
            verdict,
            one_open_per_tenant: None,
        }
    }

    fn beside(mut self, bound: Option<f64>) -> Self {
        self.one_open_per_tenant = bound;
        self
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: Option<String>,
    pub memory_mb: Option<u64>,
    pub postgres: Option<String>,
}

impl Machine {
    /// This machine, as `/proc` describes it; the PostgreSQL version is asked by the caller.
    pub fn this(postgres: Option<String>) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            cpu_model: cpuinfo
                .lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned()),
            memory_mb: meminfo
                .lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
                .map(|kib| kib / 1024),
            postgres,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub machine: Machine,
    /// The command line of the run, to repeat it.
    pub command: String,
    /// Every size and setting the run used, defaults included.
    pub settings: serde_json::Value,
    pub started_at: String,
    pub wall_seconds: f64,
    pub repetitions: u32,
    pub figures: Vec<Figure>,
    pub checks: Vec<Check>,
    /// What a reader needs to interpret the figures: choices made, anomalies seen.
    pub notes: Vec<String>,
    /// Why the run stopped early, when it did; the figures before it are kept.
    pub error: Option<String>,
}

impl Report {
    pub fn new(machine: Machine, command: String, repetitions: u32) -> Self {
        Self {
            machine,
            command,
            settings: serde_json::Value::Null,
            started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            wall_seconds: 0.0,
            repetitions,
            figures: Vec::new(),
            checks: Vec::new(),
            notes: Vec::new(),
            error: None,
        }
    }

    pub fn add(&mut self, figure: Figure) {
        self.figures.push(figure);
    }

    pub fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        eprintln!("note: {note}");
        self.notes.push(note);
    }

    pub fn median(&self, key: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|f| f.key == key)
            .and_then(Figure::median)
    }

    fn ratio(&self, numerator: &str, denominator: &str) -> Option<f64> {
        match (self.median(numerator), self.median(denominator)) {
            (Some(n), Some(d)) if d > 0.0 => Some(n / d),
            _ => None,
        }
    }

    /// Computes the checks from the figures measured so far; `scale` is the run's tenant counts,
    /// the first the baseline, the last the most.
    pub fn check(&mut self, scale: &TenantCounts) {
        use keys::Scale;
        let peak_rss = self
            .figures
            .iter()
            .filter(|f| f.unit == "MB" && f.key.ends_with("rss"))
            .filter_map(Figure::median)
            .reduce(f64::max);
        let base = scale.baseline();
        let most = scale.most();
        let rate = |tenants, zipf| keys::scale(tenants, zipf, Scale::Drain);
        let mut checks = vec![
            Check::new(
                "worker / batched pipeline",
                self.ratio(keys::WORKER, keys::PIPELINE_BATCHED),
                Bound::AtLeast,
                0.5,
            ),
            Check::new(
                "worker / naive pipeline",
                self.ratio(keys::WORKER, keys::PIPELINE_NAIVE),
                Bound::AtLeast,
                5.0,
            ),
            Check::new(
                "ingress / broker limit",
                self.ratio(keys::INGRESS, keys::BROKER),
                Bound::AtLeast,
                0.4,
            ),
        ];
        for &tenants in &scale.all()[1..scale.all().len() - 1] {
            checks.push(Check::new(
                format!("{tenants} / {base} tenants"),
                self.ratio(&rate(tenants, false), &rate(base, false)),
                Bound::AtLeast,
                0.8,
            ));
            let retried = self.median(&keys::scale(tenants, false, Scale::Retried));
            let dead = self.median(&keys::scale(tenants, false, Scale::DeadLettered));
            checks.push(Check::with_unit(
                format!("{tenants} tenants retried+dead"),
                retried.zip(dead).map(|(r, d)| r + d),
                Bound::AtMost,
                0.0,
                "count",
            ));
        }
        let rate_bound = |zipf| {
            self.ratio(
                &keys::scale(most, zipf, Scale::RateBound),
                &rate(base, false),
            )
        };
        checks.push(
            Check::new(
                format!("{most} / {base} tenants"),
                self.ratio(&rate(most, false), &rate(base, false)),
                Bound::AtLeast,
                0.25,
            )
            .beside(rate_bound(false)),
        );
        checks.push(
            Check::new(
                format!("{most} Zipf / {base} tenants"),
                self.ratio(&rate(most, true), &rate(base, false)),
                Bound::AtLeast,
                0.4,
            )
            .beside(rate_bound(true)),
        );
        for zipf in [false, true] {
            checks.push(
                Check::with_unit(
                    format!(
                        "sessions/1k, {most} {}",
                        if zipf { "Zipf" } else { "uniform" }
                    ),
                    self.median(&keys::scale(most, zipf, Scale::SessionsPer1k)),
                    Bound::AtMost,
                    15.0,
                    "count",
                )
                .beside(self.median(&keys::scale(
                    most,
                    zipf,
                    Scale::SessionsBound,
                ))),
            );
        }
        let more_workers = self
            .figures
            .iter()
            .find(|f| {
                f.key.starts_with(&format!("scale_{most}_uniform_"))
                    && f.key.ends_with("_workers_drain")
            })
            .map(|f| f.key.clone());
        checks.push(Check::new(
            format!("{most} tenants, more / 1 worker(s)"),
            more_workers.and_then(|key| self.ratio(&key, &rate(most, false))),
            Bound::AtLeast,
            1.0,
        ));
        checks.push(Check::with_unit(
            "cold session open+batch",
            self.median(keys::COLD_TOTAL),
            Bound::AtMost,
            6.5,
            "ms",
        ));
        let lowest_free = self
            .figures
            .iter()
            .filter(|f| f.key.ends_with("lowest_free_slots"))
            .filter_map(|f| f.summary.map(|s| s.min))
            .reduce(f64::min);
        let floor = self.median(keys::FREE_SLOTS_FLOOR);
        checks.push(Check::with_unit(
            "lowest free slots, drains",
            lowest_free.filter(|_| floor.is_some()),
            Bound::AtLeast,
            floor.unwrap_or(0.0),
            "count",
        ));
        let lost = self
            .figures
            .iter()
            .filter(|f| f.key.ends_with("_retried") || f.key.ends_with("_dead_lettered"))
            .filter_map(|f| f.summary.map(|s| s.max))
            .reduce(|a, b| a + b);
        checks.push(Check::with_unit(
            "drains retried+dead",
            lost,
            Bound::AtMost,
            0.0,
            "count",
        ));
        checks.push(Check::with_unit(
            "neighbours' lag p99",
            self.median(keys::NEIGHBOUR_P99),
            Bound::AtMost,
            2_000.0,
            "ms",
        ));
        for (name, key) in [
            ("worker lag p99", keys::LAG_P99),
            ("worker lag p99, fixed rate", keys::LAG_FIXED_P99),
        ] {
            checks.push(Check::with_unit(
                name,
                self.median(key),
                Bound::AtMost,
                LIVE_LAG_P99_MS,
                "ms",
            ));
        }
        checks.push(Check::with_unit(
            "worker peak RSS",
            peak_rss,
            Bound::AtMost,
            150.0,
            "MB",
        ));
        self.checks = checks;
    }

    /// The human-readable table for stdout.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "avsync benchmark: {} cores{}{}, PostgreSQL {}; median of {} repetitions [min, max]",
            m.cores,
            m.cpu_model
                .as_deref()
                .map(|c| format!(" ({c})"))
                .unwrap_or_default(),
            m.memory_mb
                .map(|mb| format!(", {mb} MB"))
                .unwrap_or_default(),
            m.postgres.as_deref().unwrap_or("?"),
            self.repetitions,
        );
        let _ = writeln!(out, "command: {}", self.command);
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<2} {:<58} {:>10} {:>10} {:>10}  {:<9} {:>7} {:>7} {:>7} {:>7} {:>7}",
            "#",
            "figure",
            "median",
            "min",
            "max",
            "unit",
            "bench",
            "worker",
            "rabbit",
            "pg",
            "other"
        );
        let _ = writeln!(out, "{:>119}", "(CPU cores used while measuring)");
        for f in &self.figures {
            let (median, min, max) = match f.summary {
                Some(s) => (
                    number(s.median, f.unit),
                    number(s.min, f.unit),
                    number(s.max, f.unit),
                ),
                None => ("n/a".to_owned(), String::new(), String::new()),
            };
            let cpu = f
                .cpu
                .map(|c| {
                    format!(
                        " {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2}",
                        c.bench, c.worker, c.rabbitmq, c.postgres, c.other
                    )
                })
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "{:<2} {:<58} {:>10} {:>10} {:>10}  {:<9}{cpu}",
                f.section, f.title, median, min, max, f.unit
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "checks (targets are reported, never asserted)");
        for c in &self.checks {
            let value = c
                .value
                .map(|v| number(v, c.unit))
                .unwrap_or_else(|| "n/a".to_owned());
            let bound = match c.bound {
                Bound::AtLeast => ">=",
                Bound::AtMost => "<=",
            };
            let verdict = match c.verdict {
                Verdict::Pass => "PASS",
                Verdict::Miss => "MISS",
                Verdict::NotMeasured => "N/A",
            };
            let beside = c
                .one_open_per_tenant
                .map(|b| format!("   bound, one open per tenant: {}", number(b, c.unit)))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {:<28} {:>9} {:<5}  target {bound} {:<6} {verdict}{beside}",
                c.name,
                value,
                c.unit,
                number(c.target, c.unit)
            );
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(out, "notes");
            for n in &self.notes {
                let _ = writeln!(out, "  - {n}");
            }
        }
        if let Some(e) = &self.error {
            let _ = writeln!(out);
            let _ = writeln!(out, "stopped early: {e}");
        }
        out
    }

    pub fn write_json(&self, path: &Path) -> Result<(), BenchError> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| BenchError::Internal(format!("report to JSON: {e}")))?;
        std::fs::write(path, text + "\n").map_err(|source| BenchError::Report {
            path: path.to_owned(),
            source,
        })
    }
}

/// Rates as whole numbers with thousands separators, everything else with two decimals.
fn number(value: f64, unit: &str) -> String {
    if unit.ends_with("/s") {
        let whole = value.round() as i64;
        let digits = whole.unsigned_abs().to_string();
        let mut grouped = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                grouped.push(',');
            }
            grouped.push(c);
        }
        if whole < 0 {
            format!("-{grouped}")
        } else {
            grouped
        }
    } else if unit == "MB" || unit == "ms" || unit == "count" {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figure(key: impl Into<String>, unit: &'static str, samples: &[f64]) -> Figure {
        let key = key.into();
        Figure::new(key.clone(), 1, key, unit, samples.to_vec(), &[])
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(number(12345.6, "msg/s"), "12,346");
        assert_eq!(number(999.0, "msg/s"), "999");
        assert_eq!(number(1000.0, "events/s"), "1,000");
        assert_eq!(number(0.4567, "x"), "0.46");
        assert_eq!(number(41.26, "MB"), "41.3");
    }

    #[test]
    fn checks_compare_medians_against_the_targets() {
        let mut r = Report::new(Machine::this(None), "bench".into(), 3);
        r.add(figure(keys::WORKER, "events/s", &[900.0, 1000.0, 1100.0]));
        r.add(figure(keys::PIPELINE_BATCHED, "msg/s", &[2000.0]));
        r.add(figure(keys::PIPELINE_NAIVE, "msg/s", &[250.0]));
        r.add(figure(
            keys::scale(1000, false, keys::Scale::PeakRss),
            "MB",
            &[151.0],
        ));
        r.add(figure(
            keys::scale(5, false, keys::Scale::Drain),
            "events/s",
            &[1000.0],
        ));
        r.add(figure(
            keys::scale(50, false, keys::Scale::Drain),
            "events/s",
            &[950.0],
        ));
        r.add(figure(
            keys::scale(1000, true, keys::Scale::Drain),
            "events/s",
            &[300.0],
        ));
        r.add(figure(
            keys::scale_workers(1000, 2, keys::Scale::Drain),
            "events/s",
            &[800.0],
        ));
        r.add(figure(
            keys::scale(1000, true, keys::Scale::RateBound),
            "events/s",
            &[450.0],
        ));
        r.add(figure(
            keys::scale(1000, true, keys::Scale::LowestFree),
            "count",
            &[30.0, 12.0, 40.0],
        ));
        r.add(figure(keys::FREE_SLOTS_FLOOR, "count", &[20.0]));
        r.check(&TenantCounts::parse("5,50,1000").unwrap());
        let check = |name: &str| r.checks.iter().find(|c| c.name == name).unwrap();
        let verdict = |name: &str| check(name).verdict;
        assert_eq!(
            check("1000 Zipf / 5 tenants").one_open_per_tenant,
            Some(0.45)
        );
        assert_eq!(
            verdict("1000 tenants, more / 1 worker(s)"),
            Verdict::NotMeasured
        );
        // The fewest free slots of any repetition, not the median, is held against the floor.
        assert_eq!(check("lowest free slots, drains").value, Some(12.0));
        assert_eq!(verdict("lowest free slots, drains"), Verdict::Miss);
        assert_eq!(verdict("worker / batched pipeline"), Verdict::Pass);
        assert_eq!(verdict("worker / naive pipeline"), Verdict::Miss);
        assert_eq!(verdict("ingress / broker limit"), Verdict::NotMeasured);
        assert_eq!(verdict("worker peak RSS"), Verdict::Miss);
        assert_eq!(verdict("50 / 5 tenants"), Verdict::Pass);
        assert_eq!(verdict("1000 Zipf / 5 tenants"), Verdict::Miss);
        assert_eq!(verdict("1000 / 5 tenants"), Verdict::NotMeasured);
        let table = r.table();
        assert!(table.contains("worker / batched pipeline"), "{table}");
        assert!(table.contains("0.50") && table.contains("PASS"), "{table}");
        assert!(table.contains("MISS") && table.contains("N/A"), "{table}");
    }

    #[test]
    fn a_figure_without_samples_prints_not_available() {
        let mut r = Report::new(Machine::this(None), "bench".into(), 1);
        r.add(figure(keys::BROKER, "msg/s", &[]));
        assert!(r
            .table()
            .lines()
            .any(|l| l.contains(keys::BROKER) && l.contains("n/a")));
    }
}
