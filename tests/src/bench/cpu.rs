//! Who used the CPU while a figure was measured: this process (load generator, raw clients and,
//! in phase 2, the ingress), the worker processes, RabbitMQ, PostgreSQL and everything else on
//! the machine. Read from `/proc`, so it works where `perf` does not. A part that used close to
//! all cores, or one core when it is single-threaded, is what limited the figure.

use serde::Serialize;
use std::time::Instant;

/// The kernel reports process times in USER_HZ ticks, 100 per second on every Linux ABI.
const TICKS_PER_SECOND: f64 = 100.0;

/// Cumulative CPU seconds of each part at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    at: Instant,
    bench: f64,
    workers: f64,
    rabbitmq: f64,
    postgres: f64,
    machine: f64,
}

/// Cores each part kept busy on average between two snapshots (1.0 = one core all the time).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct CpuShare {
    pub bench: f64,
    pub worker: f64,
    pub rabbitmq: f64,
    pub postgres: f64,
    /// The rest of the machine: other processes, including other people's builds and tests.
    pub other: f64,
}

/// `utime + stime`, and with `children` also the times of reaped children, of `/proc/<pid>/stat`.
pub(super) fn process_seconds(stat: &str, children: bool) -> Option<f64> {
    // The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let own = tick(11)? + tick(12)?;
    let reaped = if children { tick(13)? + tick(14)? } else { 0 };
    Some((own + reaped) as f64 / TICKS_PER_SECOND)
}

fn pid_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| process_seconds(&s, false))
        .unwrap_or(0.0)
}

/// Busy seconds of all cores together, from the first line of `/proc/stat`.
fn machine_busy_seconds(proc_stat: &str) -> Option<f64> {
    let line = proc_stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already inside user).
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7)?;
    Some(busy as f64 / TICKS_PER_SECOND)
}

/// CPU seconds of every process named `beam.smp` (RabbitMQ) and `postgres`. PostgreSQL's
/// backends come and go; their time stays in the postmaster's reaped-children times.
fn services_seconds() -> (f64, f64) {
    let mut rabbitmq = 0.0;
    let mut postgres = 0.0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return (0.0, 0.0);
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        let target = match comm.trim_end() {
            "beam.smp" => &mut rabbitmq,
            "postgres" => &mut postgres,
            _ => continue,
        };
        if let Some(s) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| process_seconds(&s, true))
        {
            *target += s;
        }
    }
    (rabbitmq, postgres)
}

impl Snapshot {
    /// Now; `workers` are the worker processes' ids (ones not started yet count zero).
    pub fn take(workers: &[u32]) -> Self {
        let (rabbitmq, postgres) = services_seconds();
        Self {
            at: Instant::now(),
            bench: pid_seconds(std::process::id()),
            workers: workers.iter().map(|pid| pid_seconds(*pid)).sum(),
            rabbitmq,
            postgres,
            machine: std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|s| machine_busy_seconds(&s))
                .unwrap_or(0.0),
        }
    }

    /// The cores each part used from `self` to `later`.
    pub fn share_until(&self, later: &Snapshot) -> CpuShare {
        let wall = later.at.duration_since(self.at).as_secs_f64();
        if wall <= 0.0 {
            return CpuShare::default();
        }
        let cores = |a: f64, b: f64| ((b - a) / wall).max(0.0);
        let bench = cores(self.bench, later.bench);
        let worker = cores(self.workers, later.workers);
        let rabbitmq = cores(self.rabbitmq, later.rabbitmq);
        let postgres = cores(self.postgres, later.postgres);
        let machine = cores(self.machine, later.machine);
        CpuShare {
            bench,
            worker,
            rabbitmq,
            postgres,
            other: (machine - bench - worker - rabbitmq - postgres).max(0.0),
        }
    }
}

impl CpuShare {
    /// The median of each part over repetitions.
    pub fn median(shares: &[CpuShare]) -> Option<CpuShare> {
        let part = |f: fn(&CpuShare) -> f64| {
            crate::bench::stats::Summary::of(&shares.iter().map(f).collect::<Vec<_>>())
                .map(|s| s.median)
        };
        Some(CpuShare {
            bench: part(|s| s.bench)?,
            worker: part(|s| s.worker)?,
            rabbitmq: part(|s| s.rabbitmq)?,
            postgres: part(|s| s.postgres)?,
            other: part(|s| s.other)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_times_skip_a_command_name_with_spaces() {
        let stat = "1234 (my (odd) proc) S 1 1234 1234 0 -1 4194304 100 0 0 0 250 50 30 20 20 0 4 0 100 0 0";
        assert_eq!(process_seconds(stat, false), Some(3.0));
        assert_eq!(process_seconds(stat, true), Some(3.5));
        assert_eq!(process_seconds("garbage", false), None);
    }

    #[test]
    fn machine_busy_time_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 10 50 9000 40 5 5 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n";
        assert_eq!(machine_busy_seconds(stat), Some(1.7));
        assert_eq!(machine_busy_seconds("intr 1 2 3"), None);
    }

    #[test]
    fn this_process_is_seen_using_cpu() {
        let before = Snapshot::take(&[]);
        let own = pid_seconds(std::process::id());
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let mut x = 0u64;
        // Spin until the kernel has counted some of our time, however busy the machine is.
        while pid_seconds(std::process::id()) - own < 0.1 && Instant::now() < deadline {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        }
        let share = before.share_until(&Snapshot::take(&[]));
        assert!(share.bench > 0.0, "{share:?}");
    }
}
