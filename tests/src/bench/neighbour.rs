//! Phase 6, the noisy neighbour: one tenant's `av_identities` is locked (as a long migration or
//! transaction would) while a burst of its events arrives, and the other tenants keep sending.
//! What matters is the lag of the tenants that share its partition queue: a worker that held the
//! stuck tenant's messages would stop their partition. Then the lock goes and the stuck tenant
//! must catch up, nothing lost.

use crate::bench::broker::{self, Target};
use crate::bench::cpu::{CpuShare, Snapshot};
use crate::bench::drain::{lags_ms, Ending};
use crate::bench::report::{keys, Figure, Report};
use crate::bench::run::{seed, Bench};
use crate::bench::stats::{percentile, sorted};
use crate::bench::worker::{WorkerConfig, Workers};
use crate::bench::workload::{tenant_ids, Generator};
use crate::bench::BenchError;
use crate::support;
use avsync_shared::TenantId;
use sqlx::{Connection as _, PgConnection};
use std::time::{Duration, Instant};

/// How long the stuck tenant may take to catch up once its lock is gone: its set-aside events
/// wait in delay tiers of up to 30 s (the bench's retry ladder) before they come back.
const CATCH_UP_WINDOW: Duration = Duration::from_secs(180);
/// Set-aside events come back after up to the longest tier; quiet until then is not a stall.
const CATCH_UP_STALL: Duration = Duration::from_secs(45);

/// One repetition's figures.
struct Run {
    neighbours: Vec<f64>,
    others: Vec<f64>,
    set_aside: u64,
    catch_up: Option<f64>,
    cpu: CpuShare,
}

impl Bench<'_> {
    pub(super) async fn neighbour(
        &mut self,
        report: &mut Report,
        config: &WorkerConfig,
    ) -> Result<(), BenchError> {
        let count = self.args.neighbour_tenants;
        self.tenant_databases(count).await?;
        let ids = tenant_ids(count);
        let (locked, rest) = ids
            .split_first()
            .expect("at least two tenants (--neighbour-tenants)");
        let partition = self.topology.partition_of(locked);
        let neighbours = rest
            .iter()
            .filter(|t| self.topology.partition_of(t) == partition)
            .count();
        eprintln!(
            "[6] neighbour: {} locked under a burst of {} events; {} events/s to the other {} tenants ({neighbours} share its partition {partition})",
            locked.as_str(),
            self.args.neighbour_burst,
            self.args.neighbour_rate,
            rest.len()
        );
        if neighbours == 0 {
            report.note(format!(
                "neighbour: no other of the {count} tenants shares the locked tenant's partition; raise --neighbour-tenants"
            ));
        }
        let (mut p50, mut p99, mut others_p99) = (Vec::new(), Vec::new(), Vec::new());
        let (mut set_aside, mut catch_up, mut cpu) = (Vec::new(), Vec::new(), Vec::new());
        for rep in 0..self.reps() {
            let mut workers = Workers::start(config, self.args.workers, &self.http).await?;
            let result = self
                .neighbour_run(report, &mut workers, rep, locked, rest)
                .await;
            let stopped = workers.stop().await;
            if stopped.killed > 0 {
                report.note(format!(
                    "neighbour, repetition {}: {} worker(s) did not stop within 45 s of SIGTERM and were killed",
                    rep + 1,
                    stopped.killed
                ));
            }
            let run = result?;
            let neighbours = sorted(run.neighbours);
            let others = sorted(run.others);
            eprintln!(
                "  repetition {}: neighbours' lag p50 {:.0} ms, p99 {:.0} ms; other partitions' p99 {:.0} ms; {} set aside; caught up {}",
                rep + 1,
                percentile(&neighbours, 0.5).unwrap_or(f64::NAN),
                percentile(&neighbours, 0.99).unwrap_or(f64::NAN),
                percentile(&others, 0.99).unwrap_or(f64::NAN),
                run.set_aside,
                run.catch_up
                    .map_or("not within the window".to_owned(), |s| format!("{s:.1} s after the lock went"))
            );
            p50.extend(percentile(&neighbours, 0.5));
            p99.extend(percentile(&neighbours, 0.99));
            others_p99.extend(percentile(&others, 0.99));
            set_aside.push(run.set_aside as f64);
            catch_up.extend(run.catch_up);
            cpu.push(run.cpu);
        }
        let burst = self.args.neighbour_burst;
        for (key, title, unit, samples) in [
            (
                keys::NEIGHBOUR_P50,
                format!(
                    "neighbour: partition neighbours' lag p50, one tenant locked under {burst}"
                ),
                "ms",
                p50,
            ),
            (
                keys::NEIGHBOUR_P99,
                "neighbour: partition neighbours' lag p99".to_owned(),
                "ms",
                p99,
            ),
            (
                keys::OTHERS_P99,
                "neighbour: other partitions' lag p99".to_owned(),
                "ms",
                others_p99,
            ),
            (
                keys::NEIGHBOUR_SET_ASIDE,
                "neighbour: locked tenant's events set aside (no attempt)".to_owned(),
                "count",
                set_aside,
            ),
            (
                keys::NEIGHBOUR_CATCH_UP,
                "neighbour: locked tenant caught up, after the lock went".to_owned(),
                "s",
                catch_up,
            ),
        ] {
            report.add(Figure::new(key, 6, title, unit, samples, &cpu));
        }
        Ok(())
    }

    async fn neighbour_run(
        &mut self,
        report: &mut Report,
        workers: &mut Workers,
        rep: u32,
        locked: &TenantId,
        rest: &[TenantId],
    ) -> Result<Run, BenchError> {
        let pids = workers.pids();
        let mut lock = PgConnection::connect(&support::database_url(&format!(
            "{}_{}",
            self.prefix,
            locked.as_str()
        )))
        .await?;
        let mut held = lock.begin().await?;
        sqlx::query("LOCK TABLE av_identities IN ACCESS EXCLUSIVE MODE")
            .execute(&mut *held)
            .await?;
        let before = workers.counts(&self.http).await?;
        let cpu_before = Snapshot::take(&pids);
        let burst_size = self.args.neighbour_burst;
        let burst = Generator::new(
            seed(8, rep),
            &format!("b{rep}"),
            std::slice::from_ref(locked),
            burst_size,
        )
        .events(burst_size);
        broker::publish_all(&self.publish, Target::Partitions(&self.topology), &burst).await?;
        let mut generator = Generator::new(seed(9, rep), &format!("n{rep}"), rest, 1_000);
        let paced = broker::publish_paced(
            &self.publish,
            &self.topology,
            f64::from(self.args.neighbour_rate),
            self.args.lag_duration * 2,
            |serial, at| generator.fresh_user_event(serial, at),
        )
        .await?;
        let sent = paced.sent.len() as u64;
        let progress = self.wait_settled(workers, before, sent).await?;
        if progress.ending != Ending::Complete {
            report.note(format!(
                "neighbour repetition {}: only {} of the other tenants' {sent} events (or the locked tenant's) settled within the drain window",
                rep + 1,
                progress.counts.settled().saturating_sub(before.settled())
            ));
        }
        let cpu = cpu_before.share_until(&Snapshot::take(&pids));
        let partition = self.topology.partition_of(locked);
        let (neighbours, others): (Vec<_>, Vec<_>) = paced
            .sent
            .into_iter()
            .partition(|e| self.topology.partition_of(&e.tenant) == partition);
        let (neighbour_lags, missing_n) = lags_ms(&self.prefix, &neighbours).await?;
        let (other_lags, missing_o) = lags_ms(&self.prefix, &others).await?;
        if missing_n + missing_o > 0 {
            report.note(format!(
                "neighbour repetition {}: {} of the other tenants' {sent} events left no row when they were counted settled",
                rep + 1,
                missing_n + missing_o
            ));
        }
        let set_aside = workers.counts(&self.http).await?.set_aside - before.set_aside;
        held.commit().await?;
        let released = Instant::now();
        let _ = lock.close().await;
        let caught_up = self
            .wait_settled_within(
                workers,
                before,
                sent + burst_size,
                CATCH_UP_WINDOW,
                CATCH_UP_STALL,
            )
            .await?;
        let c = caught_up.counts;
        let catch_up = (caught_up.ending == Ending::Complete).then(|| {
            caught_up
                .last_change
                .0
                .duration_since(released)
                .as_secs_f64()
        });
        if caught_up.ending != Ending::Complete {
            report.note(format!(
                "neighbour repetition {}: the locked tenant had not caught up {:?} after the lock went ({} of {} events settled); the rest was purged",
                rep + 1,
                CATCH_UP_WINDOW,
                c.settled().saturating_sub(before.settled()),
                sent + burst_size
            ));
            self.purge_leftovers().await;
        } else {
            let (_, missing) = lags_ms(&self.prefix, &burst).await?;
            if missing > 0 {
                // The counts reach their total early when a message was applied twice (one handed
                // back after its set-aside copy reached the broker unconfirmed): wait for the rows
                // before calling an event lost.
                let waited = Instant::now();
                let mut still = missing;
                while still > 0 && waited.elapsed() < CATCH_UP_STALL {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    still = lags_ms(&self.prefix, &burst).await?.1;
                }
                report.note(format!(
                    "neighbour repetition {}: {missing} of the locked tenant's {burst_size} events had no row when the counts said it caught up; {still} still had none {:.1} s later",
                    rep + 1,
                    waited.elapsed().as_secs_f64()
                ));
            }
        }
        let retried = c.retried - before.retried;
        let dead = c.dead_lettered - before.dead_lettered;
        if retried > 0 || dead > 0 {
            report.note(format!(
                "neighbour repetition {}: {retried} retried and {dead} dead-lettered (a locked tenant's events should only be set aside)",
                rep + 1
            ));
        }
        Ok(Run {
            neighbours: neighbour_lags,
            others: other_lags,
            set_aside,
            catch_up,
            cpu,
        })
    }
}
