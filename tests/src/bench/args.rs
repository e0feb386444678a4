//! The benchmark's flags. The defaults fit one run in under ten minutes on two cores.

use avsync_shared::config::parse_duration;
use clap::{Parser, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "bench",
    about = "Measures avsync against the limits of its own RabbitMQ and PostgreSQL; prints a table on stdout and writes a JSON report",
    after_help = "Build the worker first: cargo build --release -p avsync-worker && cargo run --release -p avsync-tests --bin bench"
)]
pub struct BenchArgs {
    /// Where the JSON report goes.
    #[arg(long, value_name = "PATH", default_value = "bench-report.json")]
    pub report: PathBuf,

    /// Repetitions of every measurement; each figure is their median, with min and max.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub repetitions: u32,

    /// Phases to run (all by default). Ratios that need a phase left out print n/a.
    #[arg(
        long,
        value_name = "PHASES",
        value_delimiter = ',',
        default_value = "broker,ingress,pipeline,worker,scale,neighbour"
    )]
    pub only: Vec<Phase>,

    /// Partition queues of the topology every phase but the pipeline uses.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub partitions: u16,

    /// (1) Messages per repetition of the raw broker publish.
    #[arg(long, value_name = "N", default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub broker_messages: u64,

    /// (2) How long each repetition of the HTTP load lasts (e.g. 5s, 1500ms).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = positive_duration)]
    pub ingress_duration: Duration,

    /// (2) Concurrent HTTP requests of the load generator.
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub concurrency: u16,

    /// (3) Messages per repetition of the batched raw consumer.
    #[arg(long, value_name = "N", default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub pipeline_messages: u64,

    /// (3) Messages per repetition of the naive raw consumer (one upsert, one ack each).
    #[arg(long, value_name = "N", default_value_t = 3_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub naive_messages: u64,

    /// (3) How long each raw PostgreSQL upsert measurement lasts.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = positive_duration)]
    pub pg_duration: Duration,

    /// (4, 5) Events in the pre-filled queue a worker run drains.
    #[arg(long, value_name = "N", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub events: u64,

    /// (1-4) Tenants the events are spread over.
    #[arg(long, value_name = "T", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub tenants: u32,

    /// (4, 5) Worker processes draining the queue together.
    #[arg(long, value_name = "W", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub workers: u16,

    /// (4) How long each repetition of the lag measurement publishes at half the worker's rate.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = positive_duration)]
    pub lag_duration: Duration,

    /// (4) The lag is also measured at this fixed rate, so that builds whose drain rates differ
    /// are compared under the same load (issue 23's run measured 178 ms at 7,054 events/s).
    #[arg(long, value_name = "EVENTS_PER_SECOND", default_value_t = 7_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub lag_fixed_rate: u32,

    /// (5) Tenant counts of the uniform drains, ascending; the first is the baseline the others'
    /// rates are compared with. The last is also drained with Zipf-distributed activity.
    #[arg(long, value_name = "T,T,...", default_value = "5,50,1000", value_parser = TenantCounts::parse)]
    pub scale_tenants: TenantCounts,

    /// (5) Exponent s of the Zipf-distributed drain over the most tenants (tenant k gets a share
    /// proportional to 1/k^s); 0 leaves that drain out.
    #[arg(long, value_name = "S", default_value_t = 1.1, value_parser = zipf_exponent)]
    pub zipf_exponent: f64,

    /// (5) Workers of one more uniform drain over the most tenants, compared with the drain by
    /// --workers; the same count as --workers leaves it out.
    #[arg(long, value_name = "W", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub scale_workers: u16,

    /// (5) New sessions measured per repetition for the cold-session cost (PostgreSQL CPU of
    /// open + first batch), each of its own database.
    #[arg(long, value_name = "N", default_value_t = 40, value_parser = clap::value_parser!(u32).range(1..=500))]
    pub cold_sessions: u32,

    /// (6) Events of the burst for the one tenant whose table is locked.
    #[arg(long, value_name = "N", default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub neighbour_burst: u64,

    /// (6) Tenants of the noisy-neighbour run: the locked one and the others, whose partition
    /// neighbours' lag is measured.
    #[arg(long, value_name = "T", default_value_t = 50, value_parser = clap::value_parser!(u32).range(2..=10_000))]
    pub neighbour_tenants: u32,

    /// (6) Events per second published to the other tenants while one is locked.
    #[arg(long, value_name = "N", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub neighbour_rate: u32,

    /// The worker binary; by default `avsync-worker` beside this one (target/release).
    #[arg(long, value_name = "PATH")]
    pub worker_bin: Option<PathBuf>,

    /// Extra environment for every worker process, e.g. `--worker-env AVSYNC_PREFETCH=256`.
    #[arg(long, value_name = "KEY=VALUE", value_parser = key_value)]
    pub worker_env: Vec<(String, String)>,

    /// (4, 5) Longest a drain repetition is measured. A slower drain's rate is taken over this
    /// window and the rest of its queue is purged (the report notes it).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = positive_duration)]
    pub drain_window: Duration,
}

/// The parts of one run, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
pub enum Phase {
    Broker,
    Ingress,
    Pipeline,
    Worker,
    Scale,
    Neighbour,
}

/// Tenant counts, ascending, at least two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantCounts(Vec<u32>);

impl TenantCounts {
    /// Counts like `5,50,1000`.
    pub fn parse(value: &str) -> Result<Self, String> {
        let usage = || {
            format!("`{value}` is not two or more ascending tenant counts between 1 and 10000 (e.g. 5,50,1000)")
        };
        let counts = value
            .split(',')
            .map(|c| c.trim().parse::<u32>().map_err(|_| usage()))
            .collect::<Result<Vec<u32>, String>>()?;
        let ascending = counts.windows(2).all(|w| w[0] < w[1]);
        if counts.len() < 2 || !ascending || counts[0] == 0 || counts[counts.len() - 1] > 10_000 {
            return Err(usage());
        }
        Ok(Self(counts))
    }

    pub fn all(&self) -> &[u32] {
        &self.0
    }

    /// The count every other one's rate is compared with.
    pub fn baseline(&self) -> u32 {
        self.0[0]
    }

    pub fn most(&self) -> u32 {
        self.0[self.0.len() - 1]
    }
}

impl BenchArgs {
    pub fn runs(&self, phase: Phase) -> bool {
        self.only.contains(&phase)
    }
}

fn positive_duration(value: &str) -> Result<Duration, String> {
    match parse_duration(value)? {
        d if d.is_zero() => Err("must be above zero".to_owned()),
        d => Ok(d),
    }
}

fn zipf_exponent(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(s) if (0.0..=5.0).contains(&s) => Ok(s),
        _ => Err(format!(
            "`{value}` is not an exponent between 0 and 5 (e.g. 1.1)"
        )),
    }
}

fn key_value(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((key, v)) if !key.is_empty() && !key.contains(char::is_whitespace) => {
            Ok((key.to_owned(), v.to_owned()))
        }
        _ => Err(format!("`{value}` is not KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<BenchArgs, clap::Error> {
        BenchArgs::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_run_every_phase_at_the_issue_sizes() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.events, 100_000);
        assert_eq!(a.scale_tenants.all(), [5, 50, 1000]);
        assert_eq!(a.scale_tenants.baseline(), 5);
        assert_eq!(a.scale_tenants.most(), 1000);
        assert_eq!(a.zipf_exponent, 1.1);
        assert_eq!(a.neighbour_burst, 20_000);
        assert_eq!(a.scale_workers, 2);
        assert_eq!(a.cold_sessions, 40);
        assert_eq!(a.report, PathBuf::from("bench-report.json"));
        for phase in Phase::value_variants() {
            assert!(a.runs(*phase), "{phase:?}");
        }
    }

    #[test]
    fn phases_and_worker_environment_parse() {
        let a = parse(&[
            "--only",
            "worker,scale",
            "--worker-env",
            "AVSYNC_PREFETCH=256",
            "--worker-env",
            "RUST_LOG=info,lapin=warn",
        ])
        .unwrap();
        assert!(!a.runs(Phase::Broker));
        assert!(a.runs(Phase::Scale));
        assert_eq!(
            a.worker_env,
            [
                ("AVSYNC_PREFETCH".to_owned(), "256".to_owned()),
                ("RUST_LOG".to_owned(), "info,lapin=warn".to_owned())
            ]
        );
    }

    #[test]
    fn bad_flags_are_refused() {
        for args in [
            &["--repetitions", "0"][..],
            &["--only", "everything"],
            &["--events", "0"],
            &["--tenants", "0"],
            &["--workers", "0"],
            &["--ingress-duration", "0s"],
            &["--ingress-duration", "5"],
            &["--lag-duration", "soon"],
            &["--scale-tenants", "1000,10"],
            &["--scale-tenants", "10"],
            &["--scale-tenants", "0,10"],
            &["--scale-tenants", "10,20000"],
            &["--scale-tenants", "5,50,50"],
            &["--zipf-exponent", "-1"],
            &["--neighbour-tenants", "1"],
            &["--worker-env", "NOEQUALS"],
            &["--worker-env", "=value"],
            &["--partitions", "0"],
            &["--scale-workers", "0"],
            &["--cold-sessions", "0"],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
    }
}
