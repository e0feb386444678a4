//! The real `avsync-worker` binary in child processes, configured by its AVSYNC_* environment
//! like an operator would, observed through its `/metrics` and `/proc/<pid>/status`.

use crate::bench::BenchError;
use crate::support;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// Log lines of each worker passed on to the bench's stderr; the rest are only counted.
const LOG_LINES_SHOWN: u64 = 10;
/// Longest wait for a worker to consume (its `/readyz`).
const READY_WAIT: Duration = Duration::from_secs(30);
/// Longest wait for a graceful stop before the worker is killed: the worker's own bound on
/// finishing what it holds, and some.
const STOP_WAIT: Duration = avsync_worker::DRAIN_LIMIT.saturating_add(Duration::from_secs(15));
/// The retry ladder of the bench workers. Shorter than the default (up to 1h) so that a
/// transient failure delays a drain by seconds and shows up in the notes, instead of holding
/// the run for an hour; the happy path never retries.
pub const RETRY_DELAYS: &str = "1s,2s,5s,10s,20s,30s";

/// The delays of [`RETRY_DELAYS`], whose tier queues cleanup deletes.
pub fn retry_tiers() -> Vec<Duration> {
    RETRY_DELAYS
        .split(',')
        .filter_map(|d| avsync_shared::config::parse_duration(d).ok())
        .collect()
}

/// How every worker of one run is configured.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub binary: PathBuf,
    pub topology: String,
    pub partitions: u16,
    /// `AVSYNC_TENANT_DATABASE_URL`, with `{tenant_id}`.
    pub database_template: String,
    pub extra_env: Vec<(String, String)>,
}

/// The `avsync-worker` beside the running executable (both in `target/release` after the
/// documented build), unless the flag names one.
pub fn default_binary() -> PathBuf {
    std::env::current_exe()
        .map(|exe| exe.with_file_name("avsync-worker"))
        .unwrap_or_else(|_| PathBuf::from("target/release/avsync-worker"))
}

/// Checks the binary exists; returns a warning when it is older than the worker's sources, so
/// numbers are not taken from a stale build by mistake.
pub fn check_binary(binary: &Path) -> Result<Option<String>, BenchError> {
    let built = std::fs::metadata(binary)
        .and_then(|m| m.modified())
        .map_err(|_| BenchError::WorkerBinaryMissing {
            path: binary.to_owned(),
        })?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let newest_source = ["worker/src", "shared/src", "migrations"]
        .iter()
        .filter_map(|dir| std::fs::read_dir(workspace.join(dir)).ok())
        .flat_map(|entries| entries.flatten())
        .filter_map(|e| e.metadata().and_then(|m| m.modified()).ok())
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    Ok((newest_source > built).then(|| {
        format!(
            "{} is older than the worker's sources; rebuild it with `cargo build --release -p avsync-worker` for current numbers",
            binary.display()
        )
    }))
}

/// Counters of `avsync_worker_events_total`, summed over types.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub applied: u64,
    pub ignored: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    /// Set aside through a delay tier, no attempt counted (a stuck or slow tenant).
    pub set_aside: u64,
}

impl Counts {
    /// Messages settled for good: applied, ignored or dead-lettered.
    pub fn settled(&self) -> u64 {
        self.applied + self.ignored + self.dead_lettered
    }

    fn add(&mut self, other: Counts) {
        self.applied += other.applied;
        self.ignored += other.ignored;
        self.retried += other.retried;
        self.dead_lettered += other.dead_lettered;
        self.set_aside += other.set_aside;
    }
}

/// Reads the event counters out of Prometheus text.
pub fn parse_counts(metrics: &str) -> Counts {
    let mut counts = Counts::default();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("avsync_worker_events_set_aside_total{") {
            if let Some(value) = rest
                .rsplit_once('}')
                .and_then(|(_, v)| v.trim().parse::<f64>().ok())
            {
                counts.set_aside += value as u64;
            }
            continue;
        }
        let Some(rest) = line.strip_prefix("avsync_worker_events_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once('}') else {
            continue;
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let outcome = labels
            .split(',')
            .find_map(|l| l.trim().strip_prefix("outcome=\""))
            .and_then(|v| v.strip_suffix('"'));
        let slot = match outcome {
            Some("applied") => &mut counts.applied,
            Some("ignored") => &mut counts.ignored,
            Some("retried") => &mut counts.retried,
            Some("dead_lettered") => &mut counts.dead_lettered,
            _ => continue,
        };
        *slot += value as u64;
    }
    counts
}

/// Peak resident memory (`VmHWM`) from `/proc/<pid>/status` text, in bytes.
pub fn parse_peak_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// One running worker process.
pub struct WorkerProcess {
    index: usize,
    child: Child,
    pid: u32,
    metrics_url: String,
    log: JoinHandle<u64>,
}

/// A free local port for the worker's private listener. Another process could take it before
/// the worker binds it; the worker then exits at once naming AVSYNC_METRICS_LISTEN, and the
/// bench reports that.
fn free_port() -> Result<u16, BenchError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| BenchError::Internal(format!("no free local port: {e}")))
}

impl WorkerProcess {
    pub async fn spawn(config: &WorkerConfig, index: usize) -> Result<Self, BenchError> {
        let port = free_port()?;
        let mut command = Command::new(&config.binary);
        // The operator's own AVSYNC_* settings must not leak into the measured configuration.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("AVSYNC_") {
                command.env_remove(key);
            }
        }
        command
            .env("AVSYNC_AMQP_URL", support::AMQP_URL)
            .env("AVSYNC_TOPOLOGY", &config.topology)
            .env("AVSYNC_PARTITIONS", config.partitions.to_string())
            .env("AVSYNC_METRICS_LISTEN", format!("127.0.0.1:{port}"))
            .env("AVSYNC_TENANT_DATABASE_URL", &config.database_template)
            .env("AVSYNC_CREATE_TENANT_DATABASES", "true")
            .env("AVSYNC_RETRY_DELAYS", RETRY_DELAYS)
            // The product's filter at warn: what an operator would see go wrong.
            .env(
                "RUST_LOG",
                avsync_shared::telemetry::DEFAULT_FILTER.replacen("info", "warn", 1),
            );
        for (key, value) in &config.extra_env {
            command.env(key, value);
        }
        let mut child = command
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| BenchError::WorkerSpawn {
                index,
                path: config.binary.clone(),
                source,
            })?;
        let pid = child.id().unwrap_or(0);
        let stderr = child.stderr.take();
        let log = tokio::spawn(async move {
            let Some(stderr) = stderr else { return 0 };
            let mut lines = BufReader::new(stderr).lines();
            let mut seen = 0u64;
            while let Ok(Some(line)) = lines.next_line().await {
                seen += 1;
                if seen <= LOG_LINES_SHOWN {
                    eprintln!("  worker {index}: {line}");
                } else if seen == LOG_LINES_SHOWN + 1 {
                    eprintln!("  worker {index}: (further log lines are counted, not shown)");
                }
            }
            seen
        });
        Ok(Self {
            index,
            child,
            pid,
            metrics_url: format!("http://127.0.0.1:{port}"),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn exited(&mut self) -> Option<BenchError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(BenchError::WorkerExited {
                index: self.index,
                status: status.to_string(),
            }),
            _ => None,
        }
    }

    /// Waits until the worker consumes every partition queue.
    pub async fn wait_ready(&mut self, http: &reqwest::Client) -> Result<(), BenchError> {
        let started = Instant::now();
        loop {
            if let Some(e) = self.exited() {
                return Err(e);
            }
            let ready = http
                .get(format!("{}/readyz", self.metrics_url))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(());
            }
            if started.elapsed() > READY_WAIT {
                return Err(BenchError::Timeout {
                    what: format!("worker {} to be ready (/readyz 200)", self.index),
                    after: READY_WAIT,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn counts(&mut self, http: &reqwest::Client) -> Result<Counts, BenchError> {
        if let Some(e) = self.exited() {
            return Err(e);
        }
        let text = http
            .get(format!("{}/metrics", self.metrics_url))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| BenchError::Internal(format!("worker {} /metrics: {e}", self.index)))?
            .text()
            .await
            .map_err(|e| BenchError::Internal(format!("worker {} /metrics: {e}", self.index)))?;
        Ok(parse_counts(&text))
    }

    /// The most resident memory the process has used so far, in bytes.
    pub fn peak_rss(&self) -> Option<u64> {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .ok()
            .and_then(|s| parse_peak_rss(&s))
    }

    /// Graceful stop (SIGTERM: the worker finishes its in-flight messages), killed after
    /// [`STOP_WAIT`].
    pub async fn stop(mut self) -> Stopped {
        let started = Instant::now();
        let signalled = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        let stopped = signalled
            && tokio::time::timeout(STOP_WAIT, self.child.wait())
                .await
                .is_ok();
        if !stopped {
            let _ = self.child.kill().await;
        }
        Stopped {
            log_lines: self.log.await.unwrap_or(0),
            killed: u32::from(!stopped),
            slowest: started.elapsed(),
        }
    }
}

/// How stopping went.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stopped {
    /// Log lines written (at warn and above).
    pub log_lines: u64,
    /// Workers that did not stop within [`STOP_WAIT`] of SIGTERM and were killed.
    pub killed: u32,
    /// The longest time one worker took to stop.
    pub slowest: Duration,
}

/// Every worker of one run.
pub struct Workers {
    processes: Vec<WorkerProcess>,
}

impl Workers {
    /// Starts `count` workers and waits until each consumes.
    pub async fn start(
        config: &WorkerConfig,
        count: u16,
        http: &reqwest::Client,
    ) -> Result<Self, BenchError> {
        let mut processes = Vec::with_capacity(usize::from(count));
        for index in 0..usize::from(count) {
            processes.push(WorkerProcess::spawn(config, index).await?);
        }
        let mut workers = Self { processes };
        for p in &mut workers.processes {
            p.wait_ready(http).await?;
        }
        Ok(workers)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.processes.iter().map(WorkerProcess::pid).collect()
    }

    pub async fn counts(&mut self, http: &reqwest::Client) -> Result<Counts, BenchError> {
        let mut total = Counts::default();
        for p in &mut self.processes {
            total.add(p.counts(http).await?);
        }
        Ok(total)
    }

    /// The highest peak resident memory of any one worker, in bytes.
    pub fn peak_rss(&self) -> Option<u64> {
        self.processes
            .iter()
            .filter_map(WorkerProcess::peak_rss)
            .max()
    }

    /// Stops every worker, all at once.
    pub async fn stop(self) -> Stopped {
        let each = futures_util::future::join_all(self.processes.into_iter().map(|p| p.stop()));
        each.await
            .into_iter()
            .fold(Stopped::default(), |total, one| Stopped {
                log_lines: total.log_lines + one.log_lines,
                killed: total.killed + one.killed,
                slowest: total.slowest.max(one.slowest),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_sum_over_types_by_outcome() {
        let text = r#"# HELP avsync_worker_events_total Events handled.
# TYPE avsync_worker_events_total counter
avsync_worker_events_total{outcome="applied",type="member.joined"} 120
avsync_worker_events_total{outcome="applied",type="subject.created"} 80
avsync_worker_events_total{outcome="ignored",type="other"} 3
avsync_worker_events_total{outcome="retried",type="member.joined"} 2
avsync_worker_events_total{outcome="dead_lettered",type="other"} 1
avsync_worker_events_set_aside_total{reason="backlog"} 40
avsync_worker_events_set_aside_total{reason="slow"} 2
avsync_worker_apply_seconds_count 200
"#;
        let c = parse_counts(text);
        assert_eq!(
            c,
            Counts {
                applied: 200,
                ignored: 3,
                retried: 2,
                dead_lettered: 1,
                set_aside: 42,
            }
        );
        assert_eq!(c.settled(), 204);
        assert_eq!(
            parse_counts("garbage\navsync_worker_events_total{x} y"),
            Counts::default()
        );
    }

    #[test]
    fn peak_rss_is_read_in_bytes() {
        let status = "Name:\tavsync-worker\nVmPeak:\t  900000 kB\nVmHWM:\t   40960 kB\nVmRSS:\t   30000 kB\n";
        assert_eq!(parse_peak_rss(status), Some(40 * 1024 * 1024));
        assert_eq!(parse_peak_rss("Name: x\n"), None);
    }

    #[test]
    fn a_missing_binary_names_the_build_command() {
        let e = check_binary(Path::new("/nonexistent/avsync-worker")).unwrap_err();
        assert!(
            e.to_string()
                .contains("cargo build --release -p avsync-worker"),
            "{e}"
        );
    }
}
