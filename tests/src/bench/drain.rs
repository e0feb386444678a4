//! Phases 4 and 5: the real worker binary draining pre-filled partition queues, its lag at half
//! that rate, and the same drain over more and more tenants with the worker's defaults. The
//! noisy-neighbour phase 6 is in `neighbour`.

use crate::bench::args::TenantCounts;
use crate::bench::broker::{self, Target};
use crate::bench::cpu::{CpuShare, Snapshot};
use crate::bench::report::keys::Scale;
use crate::bench::report::{keys, Figure, Report};
use crate::bench::run::{migrated_database, seed, Bench, Runs};
use crate::bench::stats::{percentile, sorted};
use crate::bench::worker::{self, Counts, WorkerConfig, Workers};
use crate::bench::workload::{tenant_ids, Activity, Event, Generator};
use crate::bench::BenchError;
use crate::support;
use avsync_worker::tenant_db::sizing::DEFAULT_FREE_SHARE;
use chrono::{DateTime, Utc};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use lapin::options::QueuePurgeOptions;
use sqlx::{Connection as _, PgConnection};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How often a drain is sampled through the workers' `/metrics`.
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// A drain that settled nothing new for this long has stopped: what is left waits on a retry or
/// was dead-lettered by the broker.
const STALL: Duration = Duration::from_secs(20);
/// A worker's graceful stop slower than this is worth a note: restarts would be that slow.
const SLOW_STOP: Duration = Duration::from_secs(5);
/// How often the tenant sessions in `pg_stat_activity` are counted during a drain.
const CONNECTION_SAMPLE: Duration = Duration::from_millis(100);
/// Tenant databases created at once: enough to overlap their round trips and WAL writes, few
/// enough not to crowd two cores.
const CREATE_CONCURRENCY: usize = 4;

/// The result of draining a pre-filled queue with fresh workers, per repetition.
#[derive(Debug, Clone, Default)]
pub(super) struct Drain {
    rates: Vec<f64>,
    retried: Vec<f64>,
    dead_lettered: Vec<f64>,
    /// Most sessions of the workers (by `application_name`) to the run's databases at once.
    peak_connections: Vec<f64>,
    peak_rss_mb: Vec<f64>,
    /// New PostgreSQL sessions in the tenant databases per 1,000 settled events.
    sessions_per_1k: Vec<f64>,
    /// The same with one session per tenant that has events in the queue: the fewest a drain
    /// can open, over the events it settled.
    sessions_bound: Vec<f64>,
    /// Fewest free connection slots on the server seen while draining.
    lowest_free: Vec<f64>,
    cpu: Vec<CpuShare>,
}

impl Bench<'_> {
    /// The migrated database every tenant database of the run is copied from, made on first use.
    pub(super) async fn template(&mut self) -> Result<String, BenchError> {
        let template = format!("{}_template", self.prefix);
        if !self.template {
            let conn = migrated_database(&template).await?;
            let _ = conn.close().await;
            self.template = true;
        }
        Ok(template)
    }

    /// Creates (from one migrated template) the databases of tenants `0..count` not made yet,
    /// so that neither creation nor migration is measured.
    pub(super) async fn tenant_databases(&mut self, count: u32) -> Result<(), BenchError> {
        if count <= self.tenant_databases {
            return Ok(());
        }
        let template = self.template().await?;
        let started = Instant::now();
        let names: Vec<String> = tenant_ids(count)
            .into_iter()
            .skip(self.tenant_databases as usize)
            .map(|t| format!("{}_{}", self.prefix, t.as_str()))
            .collect();
        eprintln!(
            "  creating {} tenant database(s) from a migrated template",
            names.len()
        );
        let chunks: Vec<Vec<String>> = (0..CREATE_CONCURRENCY)
            .map(|k| {
                names
                    .iter()
                    .skip(k)
                    .step_by(CREATE_CONCURRENCY)
                    .cloned()
                    .collect()
            })
            .collect();
        stream::iter(chunks)
            .map(|chunk| create_from_template(&template, chunk))
            .buffer_unordered(CREATE_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        eprintln!("  created in {:.1} s", started.elapsed().as_secs_f64());
        self.tenant_databases = count;
        Ok(())
    }

    /// Pre-fills the partition queues with `n` events over `tenants`, then drains them with
    /// `workers` fresh workers, `repetitions` times.
    async fn drain(
        &mut self,
        report: &mut Report,
        config: &WorkerConfig,
        (tenants, activity, workers): (u32, Activity, u16),
        tag: char,
    ) -> Result<Drain, BenchError> {
        self.tenant_databases(tenants).await?;
        let ids = tenant_ids(tenants);
        let n = self.args.events;
        let mut drain = Drain::default();
        let mut log_lines = 0;
        for rep in 0..self.reps() {
            let events =
                Generator::with_activity(seed(6, rep), &format!("{tag}{rep}"), &ids, n, activity)
                    .events(n);
            let filled = Instant::now();
            broker::publish_all(&self.publish, Target::Partitions(&self.topology), &events).await?;
            let busy_tenants = events
                .iter()
                .map(|e| e.tenant.as_str())
                .collect::<std::collections::HashSet<_>>()
                .len() as u64;
            drop(events);
            eprintln!(
                "  repetition {}: pre-filled {n} events over {tenants} tenants in {:.1} s",
                rep + 1,
                filled.elapsed().as_secs_f64()
            );
            let sessions_before = tenant_sessions(&self.prefix).await?;
            let mut workers = Workers::start(config, workers, &self.http).await?;
            let pids = workers.pids();
            let before = Snapshot::take(&pids);
            let sampler = ConnectionSampler::start(&self.prefix).await?;
            // The workers are new: what they settled before this first look is part of the n.
            let waited = match workers.counts(&self.http).await {
                Ok(start) => {
                    let rest = n.saturating_sub(start.settled());
                    self.wait_settled(&mut workers, start, rest).await
                }
                Err(e) => Err(e),
            };
            let cpu = before.share_until(&Snapshot::take(&pids));
            let sampled = sampler.stop().await;
            let peak_rss = workers.peak_rss();
            let stopped = workers.stop().await;
            log_lines += stopped.log_lines;
            if stopped.killed > 0 {
                report.note(format!(
                    "{tenants} tenants, repetition {}: {} worker(s) did not stop within 45 s of SIGTERM and were killed",
                    rep + 1,
                    stopped.killed
                ));
            } else if stopped.slowest > SLOW_STOP {
                report.note(format!(
                    "{tenants} tenants, repetition {}: a graceful stop took {:.1} s",
                    rep + 1,
                    stopped.slowest.as_secs_f64()
                ));
            }
            let progress = waited?;
            let rate = progress.applied_per_second();
            let sessions = tenant_sessions(&self.prefix).await? - sessions_before;
            let settled = progress.counts.settled().max(1);
            eprintln!(
                "  repetition {}: {rate:.0} events/s, peak RSS {:.1} MB",
                rep + 1,
                peak_rss.map_or(f64::NAN, mb)
            );
            let c = progress.counts;
            match progress.ending {
                Ending::Complete => {}
                Ending::Window => report.note(format!(
                    "{tenants} tenants, repetition {}: measured over the {:?} window, in which {} of {n} events were settled; the rest was purged",
                    rep + 1,
                    self.args.drain_window,
                    c.settled()
                )),
                Ending::Stalled => report.note(format!(
                    "{tenants} tenants, repetition {}: the drain stopped progressing with {} of {n} events settled ({} retried); its rate counts until the last progress, and the rest was purged",
                    rep + 1,
                    c.settled(),
                    c.retried
                )),
            }
            if progress.ending != Ending::Complete {
                self.purge_leftovers().await;
            }
            if c.retried > 0 || c.dead_lettered > 0 || c.ignored > 0 {
                report.note(format!(
                    "{tenants} tenants, repetition {}: {} retried, {} dead-lettered, {} ignored of {n}",
                    rep + 1,
                    c.retried,
                    c.dead_lettered,
                    c.ignored
                ));
            }
            drain.rates.push(rate);
            drain.retried.push(c.retried as f64);
            drain.dead_lettered.push(c.dead_lettered as f64);
            drain.peak_connections.push(sampled.peak_sessions as f64);
            drain
                .lowest_free
                .push(sampled.lowest_free.map_or(f64::NAN, |f| f as f64));
            if let Some(floor) = sampled.floor {
                if report.median(keys::FREE_SLOTS_FLOOR).is_none() {
                    report.add(Figure::new(
                        keys::FREE_SLOTS_FLOOR,
                        4,
                        "free-slot floor: AVSYNC_PG_FREE_CONNECTIONS default (max_connections / 5)",
                        "count",
                        vec![floor as f64],
                        &[],
                    ));
                }
            }
            drain.peak_rss_mb.push(peak_rss.map_or(f64::NAN, mb));
            drain
                .sessions_per_1k
                .push(sessions as f64 * 1_000.0 / settled as f64);
            drain
                .sessions_bound
                .push(busy_tenants.min(settled) as f64 * 1_000.0 / settled as f64);
            drain.cpu.push(cpu);
        }
        if log_lines > 0 {
            report.note(format!(
                "{tenants} tenants: the workers wrote {log_lines} warning/error log line(s) over {} repetition(s) (the first ones are on stderr)",
                self.reps()
            ));
        }
        Ok(drain)
    }

    /// Polls the workers until they settled `n` more messages than `start` counted, or until
    /// nothing moved for [`STALL`] or the drain window passed.
    pub(super) async fn wait_settled(
        &self,
        workers: &mut Workers,
        start: Counts,
        n: u64,
    ) -> Result<Progress, BenchError> {
        self.wait_settled_within(workers, start, n, self.args.drain_window, STALL)
            .await
    }

    /// [`Self::wait_settled`] with its own window and stall.
    pub(super) async fn wait_settled_within(
        &self,
        workers: &mut Workers,
        start: Counts,
        n: u64,
        window: Duration,
        stall: Duration,
    ) -> Result<Progress, BenchError> {
        let mut progress = Progress::new(start, Instant::now());
        loop {
            let counts = workers.counts(&self.http).await?;
            let now = Instant::now();
            progress.observe(counts, now);
            if counts.settled() >= start.settled() + n {
                progress.ending = Ending::Complete;
                return Ok(progress);
            }
            if now.duration_since(progress.last_change.0) > stall {
                progress.ending = Ending::Stalled;
                return Ok(progress);
            }
            if now.duration_since(progress.started) > window {
                progress.ending = Ending::Window;
                return Ok(progress);
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }

    /// Empties the partition, retry and dead-letter queues after a drain that did not finish,
    /// so the next repetition starts from the same state.
    pub(super) async fn purge_leftovers(&self) {
        let mut queues: Vec<String> = (0..self.topology.partitions())
            .map(|p| self.topology.partition_queue(p))
            .collect();
        queues.push(self.topology.dead_queue());
        queues.extend(
            worker::retry_tiers()
                .into_iter()
                .map(|d| self.topology.retry_tier(d)),
        );
        for queue in queues {
            // Purging a queue that does not exist closes the channel: one channel per queue.
            if let Ok(channel) = self.amqp.create_channel().await {
                let _ = channel
                    .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
                    .await;
                let _ = channel.close(200, "purged".into()).await;
            }
        }
    }

    pub(super) async fn worker(
        &mut self,
        report: &mut Report,
        config: &WorkerConfig,
    ) -> Result<(), BenchError> {
        let (t, w) = (self.args.tenants, self.args.workers);
        eprintln!(
            "[4] worker: {w} worker process(es) drain {} events over {t} tenants",
            self.args.events
        );
        let drain = self
            .drain(report, config, (t, Activity::Uniform, w), 'w')
            .await?;
        report.add(Figure::new(
            keys::WORKER,
            4,
            format!("worker: drain, {t} tenants, {w} worker(s)"),
            "events/s",
            drain.rates.clone(),
            &drain.cpu,
        ));
        report.add(Figure::new(
            keys::WORKER_RSS,
            4,
            format!("worker: peak RSS, {t} tenants"),
            "MB",
            drain.peak_rss_mb.clone(),
            &[],
        ));
        report.add(Figure::new(
            keys::WORKER_SESSIONS,
            4,
            format!("worker: new PostgreSQL sessions per 1k events, {t} tenants"),
            "count",
            drain.sessions_per_1k.clone(),
            &[],
        ));
        report.add(Figure::new(
            keys::WORKER_LOWEST_FREE,
            4,
            format!("worker: lowest free slots on the server, {t} tenants"),
            "count",
            drain.lowest_free.clone(),
            &[],
        ));
        let max_rate = report.median(keys::WORKER).unwrap_or(0.0);
        self.lag(report, config, max_rate / 2.0).await
    }

    /// Publishes fresh users' events at `rate` to running workers, stamping each with its
    /// publish time; lag is the commit (`synced_at` of its row) minus that stamp.
    async fn lag(
        &mut self,
        report: &mut Report,
        config: &WorkerConfig,
        rate: f64,
    ) -> Result<(), BenchError> {
        if rate <= 0.0 {
            report.note("no worker rate was measured, so lag was not");
            return Ok(());
        }
        let fixed = f64::from(self.args.lag_fixed_rate);
        let d = self.args.lag_duration;
        eprintln!(
            "[4] worker lag: {rate:.0} events/s (half the drain rate), then {fixed:.0} events/s, for {d:?} per repetition"
        );
        let mut workers = Workers::start(config, self.args.workers, &self.http).await?;
        let half = self.lag_runs(report, &mut workers, "l", rate).await;
        let fixed_runs = match &half {
            Ok(_) => Some(self.lag_runs(report, &mut workers, "f", fixed).await),
            Err(_) => None,
        };
        let stopped = workers.stop().await;
        if stopped.log_lines > 0 {
            report.note(format!(
                "lag: the workers wrote {} warning/error log line(s) (first ones on stderr)",
                stopped.log_lines
            ));
        }
        if stopped.killed > 0 {
            report.note(format!(
                "lag: {} worker(s) did not stop within 45 s of SIGTERM and were killed",
                stopped.killed
            ));
        }
        lag_figures(
            report,
            [keys::LAG_RATE, keys::LAG_P50, keys::LAG_P99],
            "(half the drain rate)",
            "",
            half?,
        );
        if let Some(runs) = fixed_runs {
            lag_figures(
                report,
                [
                    keys::LAG_FIXED_RATE,
                    keys::LAG_FIXED_P50,
                    keys::LAG_FIXED_P99,
                ],
                "(fixed)",
                &format!(", {fixed:.0} events/s"),
                runs?,
            );
        }
        Ok(())
    }

    async fn lag_runs(
        &mut self,
        report: &mut Report,
        workers: &mut Workers,
        series: &str,
        rate: f64,
    ) -> Result<Runs, BenchError> {
        let mut runs = Runs::default();
        let pids = workers.pids();
        for rep in 0..self.reps() {
            let mut generator = Generator::new(
                seed(7, rep),
                &format!("{series}{rep}"),
                &self.tenants,
                self.args.events,
            );
            let settled_before = workers.counts(&self.http).await?;
            let before = Snapshot::take(&pids);
            let paced = broker::publish_paced(
                &self.publish,
                &self.topology,
                rate,
                self.args.lag_duration,
                |serial, at| generator.fresh_user_event(serial, at),
            )
            .await?;
            let sent = paced.sent.len() as u64;
            let progress = self.wait_settled(workers, settled_before, sent).await?;
            if progress.ending != Ending::Complete {
                report.note(format!(
                    "lag repetition {}: only {} of {sent} events settled within the drain window",
                    rep + 1,
                    progress
                        .counts
                        .settled()
                        .saturating_sub(settled_before.settled())
                ));
            }
            runs.cpu.push(before.share_until(&Snapshot::take(&pids)));
            let (lags, missing) = lags_ms(&self.prefix, &paced.sent).await?;
            if missing > 0 {
                report.note(format!(
                    "lag repetition {}: {missing} of {sent} events left no row (dead-lettered?)",
                    rep + 1
                ));
            }
            let lags = sorted(lags);
            let achieved = sent as f64 / paced.elapsed.as_secs_f64();
            eprintln!(
                "  repetition {}: {achieved:.0} events/s, lag p50 {:.1} ms, p99 {:.1} ms",
                rep + 1,
                percentile(&lags, 0.5).unwrap_or(f64::NAN),
                percentile(&lags, 0.99).unwrap_or(f64::NAN)
            );
            if achieved < 0.9 * rate {
                report.note(format!(
                    "lag repetition {}: the publisher reached {achieved:.0} of the {rate:.0} events/s asked; its lag is at that rate",
                    rep + 1
                ));
            }
            runs.rates.push(achieved);
            runs.p50.push(percentile(&lags, 0.5).unwrap_or(f64::NAN));
            runs.p99.push(percentile(&lags, 0.99).unwrap_or(f64::NAN));
        }
        Ok(runs)
    }

    /// The cost of a new session on the server; the drain over each tenant count, uniform, then
    /// over the most with Zipf activity and, uniform, with `--scale-workers` workers.
    pub(super) async fn scale(
        &mut self,
        report: &mut Report,
        config: &WorkerConfig,
    ) -> Result<(), BenchError> {
        let counts = self.args.scale_tenants.clone();
        let zipf = self.args.zipf_exponent;
        let (one, more) = (self.args.workers, self.args.scale_workers);
        eprintln!(
            "[5] scale: {} events over {:?} tenants, and over {} with Zipf activity (s = {zipf}) and with {more} workers, worker defaults",
            self.args.events,
            counts.all(),
            counts.most()
        );
        self.cold_sessions(report).await?;
        let mut runs: Vec<(u32, Activity, u16)> = counts
            .all()
            .iter()
            .map(|&t| (t, Activity::Uniform, one))
            .collect();
        if zipf > 0.0 {
            runs.push((counts.most(), Activity::Zipf(zipf), one));
        }
        if more != one {
            runs.push((counts.most(), Activity::Uniform, more));
        }
        for (tenants, activity, workers) in runs {
            let is_zipf = matches!(activity, Activity::Zipf(_));
            let label = match (is_zipf, workers == one) {
                (true, _) => format!("{tenants} tenants, Zipf s={zipf}"),
                (false, true) => format!("{tenants} tenants, uniform"),
                (false, false) => format!("{tenants} tenants, uniform, {workers} workers"),
            };
            eprintln!("  {label}");
            let tag = match (is_zipf, workers == one) {
                (true, _) => 'z',
                (false, true) => 's',
                (false, false) => 'm',
            };
            let drain = self
                .drain(report, config, (tenants, activity, workers), tag)
                .await?;
            let key = |measure| {
                if workers == one {
                    keys::scale(tenants, is_zipf, measure)
                } else {
                    keys::scale_workers(tenants, workers, measure)
                }
            };
            report.add(Figure::new(
                key(Scale::Drain),
                5,
                format!("scale: drain, {label}"),
                "events/s",
                drain.rates,
                &drain.cpu,
            ));
            for (measure, title, unit, samples) in [
                (Scale::Retried, "retried", "count", drain.retried),
                (
                    Scale::DeadLettered,
                    "dead-lettered",
                    "count",
                    drain.dead_lettered,
                ),
                (
                    Scale::PeakConnections,
                    "peak tenant sessions (pg_stat_activity)",
                    "count",
                    drain.peak_connections,
                ),
                (
                    Scale::LowestFree,
                    "lowest free slots on the server",
                    "count",
                    drain.lowest_free,
                ),
                (
                    Scale::SessionsPer1k,
                    "new PostgreSQL sessions per 1k events",
                    "count",
                    drain.sessions_per_1k,
                ),
                (
                    Scale::SessionsBound,
                    "bound, one open per tenant: sessions per 1k events",
                    "count",
                    drain.sessions_bound,
                ),
                (Scale::PeakRss, "worker peak RSS", "MB", drain.peak_rss_mb),
            ] {
                report.add(Figure::new(
                    key(measure),
                    5,
                    format!("  {title}, {label}"),
                    unit,
                    samples,
                    &[],
                ));
            }
        }
        for is_zipf in [false, true] {
            if let Some(bound) = rate_bound(report, &counts, is_zipf) {
                report.add(bound);
            }
        }
        Ok(())
    }
}

/// The drain rate over the most tenants that one open per tenant allows, by the physical model:
/// each event costs what it costs at the baseline count (1 / its rate), plus its share of one
/// new session (opens per event × the cold session's PostgreSQL CPU, counted on one core). It
/// is computed from the medians of this run's baseline drain, sessions bound and cold-session
/// figure, not measured.
fn rate_bound(report: &Report, counts: &TenantCounts, is_zipf: bool) -> Option<Figure> {
    let base = report.median(&keys::scale(counts.baseline(), false, Scale::Drain))?;
    let opens_per_event =
        report.median(&keys::scale(counts.most(), is_zipf, Scale::SessionsBound))? / 1_000.0;
    let cold_seconds = report.median(keys::COLD_TOTAL)? / 1_000.0;
    if base <= 0.0 {
        return None;
    }
    let bound = 1.0 / (1.0 / base + opens_per_event * cold_seconds);
    Some(Figure::new(
        keys::scale(counts.most(), is_zipf, Scale::RateBound),
        5,
        format!(
            "  bound, one open per tenant (model: 1/(1/rate at {} + opens/event x cold session)), {} tenants{}",
            counts.baseline(),
            counts.most(),
            if is_zipf { ", Zipf" } else { ", uniform" }
        ),
        "events/s",
        vec![bound],
        &[],
    ))
}

/// Counts the workers' sessions to the run's databases in `pg_stat_activity` until stopped,
/// on a connection of its own, and keeps the most seen at once; also the fewest free slots on
/// the server (`max_connections`, less the reserved ones and every client backend, its own
/// included).
struct ConnectionSampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Sampled>,
}

/// What the sampler saw over one drain.
#[derive(Debug, Clone, Copy, Default)]
struct Sampled {
    peak_sessions: i64,
    lowest_free: Option<i64>,
    /// A fifth of `max_connections`: AVSYNC_PG_FREE_CONNECTIONS's default.
    floor: Option<i64>,
}

impl ConnectionSampler {
    async fn start(prefix: &str) -> Result<Self, BenchError> {
        let mut admin = PgConnection::connect(support::PG_ADMIN_URL).await?;
        let pattern = format!("{prefix}_");
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut seen = Sampled::default();
            // One last count after the stop: a drain shorter than one interval still shows the
            // sessions it left open in its pools.
            let mut last = false;
            loop {
                let counts: Result<(i64, i64, i64), _> = sqlx::query_as(
                    "SELECT count(*) FILTER (WHERE starts_with(application_name, $1) AND starts_with(datname, $2)), \
                     current_setting('max_connections')::int \
                     - current_setting('superuser_reserved_connections')::int \
                     - COALESCE(current_setting('reserved_connections', true)::int, 0) \
                     - count(*) FILTER (WHERE backend_type = 'client backend'), \
                     current_setting('max_connections')::bigint \
                     FROM pg_stat_activity",
                )
                .bind(avsync_worker::tenant_db::provision::APPLICATION_NAME)
                .bind(&pattern)
                .fetch_one(&mut admin)
                .await;
                if let Ok((sessions, free, max)) = counts {
                    seen.peak_sessions = seen.peak_sessions.max(sessions);
                    seen.lowest_free = Some(seen.lowest_free.map_or(free, |l| l.min(free)));
                    seen.floor = Some(max / DEFAULT_FREE_SHARE);
                }
                if last {
                    break;
                }
                tokio::select! {
                    _ = &mut stopped => last = true,
                    _ = tokio::time::sleep(CONNECTION_SAMPLE) => {}
                }
            }
            let _ = admin.close().await;
            seen
        });
        Ok(Self { stop, task })
    }

    async fn stop(self) -> Sampled {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

/// What a drain looked like through the workers' counters.
#[derive(Debug, Clone)]
pub(super) struct Progress {
    pub(super) started: Instant,
    initial: Counts,
    /// The first sample that saw a message settled, with the events applied by then.
    first: Option<(Instant, u64)>,
    /// The last sample at which the settled count moved, with the events applied by then.
    pub(super) last_change: (Instant, u64),
    pub(super) counts: Counts,
    pub(super) ending: Ending,
}

/// Why a wait for settled messages ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    /// Every message expected was settled.
    Complete,
    /// Nothing was settled for [`STALL`].
    Stalled,
    /// The drain window passed first.
    Window,
}

impl Progress {
    fn new(initial: Counts, now: Instant) -> Self {
        Self {
            started: now,
            initial,
            first: None,
            last_change: (now, initial.applied),
            counts: initial,
            ending: Ending::Window,
        }
    }

    fn observe(&mut self, counts: Counts, now: Instant) {
        if self.first.is_none() && counts.settled() > self.initial.settled() {
            self.first = Some((now, counts.applied));
        }
        if counts.settled() != self.counts.settled() {
            self.last_change = (now, counts.applied);
        }
        self.counts = counts;
    }

    /// Events applied per second from the first sample that saw progress to the last that saw
    /// any: the workers' start-up and the polling after a stall are left out.
    fn applied_per_second(&self) -> f64 {
        let (end, applied) = self.last_change;
        match self.first {
            Some((start, at_start)) if end > start && applied > at_start => {
                (applied - at_start) as f64 / end.duration_since(start).as_secs_f64()
            }
            _ => {
                let seconds = end.duration_since(self.started).as_secs_f64().max(1e-3);
                applied.saturating_sub(self.initial.applied) as f64 / seconds
            }
        }
    }
}

/// Sessions ever opened to the run's databases (PostgreSQL counts each new connection). A
/// backend reports its session when it exits or within seconds while idle, so this reads until
/// two reads 200 ms apart agree (at most 5 s).
async fn tenant_sessions(prefix: &str) -> Result<i64, BenchError> {
    let mut admin = PgConnection::connect(support::PG_ADMIN_URL).await?;
    let started = Instant::now();
    let mut last = None;
    let total = loop {
        // A fresh snapshot each time: within a transaction the statistics would stay frozen.
        let sessions: Option<i64> = sqlx::query_scalar(
            "SELECT sum(sessions)::bigint FROM pg_stat_database WHERE starts_with(datname, $1)",
        )
        .bind(format!("{prefix}_"))
        .fetch_one(&mut admin)
        .await?;
        let sessions = sessions.unwrap_or(0);
        if last == Some(sessions) || started.elapsed() > Duration::from_secs(5) {
            break sessions;
        }
        last = Some(sessions);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = admin.close().await;
    Ok(total)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

pub(super) async fn create_from_template(
    template: &str,
    names: Vec<String>,
) -> Result<(), BenchError> {
    let mut admin = PgConnection::connect(support::PG_ADMIN_URL).await?;
    for name in names {
        sqlx::query(&format!(
            "CREATE DATABASE {} TEMPLATE {}",
            avsync_worker::tenant_db::provision::quote_identifier(&name),
            avsync_worker::tenant_db::provision::quote_identifier(template)
        ))
        .execute(&mut admin)
        .await?;
    }
    let _ = admin.close().await;
    Ok(())
}

/// The publish rate and lag percentiles of one series of lag runs; `rate_label` tells how its
/// rate was chosen, `suffix` names the series in the lag figures.
fn lag_figures(report: &mut Report, keys: [&str; 3], rate_label: &str, suffix: &str, runs: Runs) {
    let [rate, p50, p99] = keys;
    report.add(Figure::new(
        rate,
        4,
        format!("worker lag: publish rate {rate_label}"),
        "events/s",
        runs.rates,
        &runs.cpu,
    ));
    report.add(Figure::new(
        p50,
        4,
        format!("worker lag p50: accepted to committed{suffix}"),
        "ms",
        runs.p50,
        &runs.cpu,
    ));
    report.add(Figure::new(
        p99,
        4,
        format!("worker lag p99: accepted to committed{suffix}"),
        "ms",
        runs.p99,
        &runs.cpu,
    ));
}

/// Each sent event's lag in milliseconds, read from its row; also how many rows were missing.
pub(super) async fn lags_ms(prefix: &str, sent: &[Event]) -> Result<(Vec<f64>, usize), BenchError> {
    let mut by_tenant: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in sent {
        by_tenant.entry(e.tenant.as_str()).or_default().push(e);
    }
    let mut lags = Vec::with_capacity(sent.len());
    let mut missing = 0;
    for (tenant, events) in by_tenant {
        let mut conn =
            PgConnection::connect(&support::database_url(&format!("{prefix}_{tenant}"))).await?;
        let subs: Vec<&str> = events.iter().map(|e| e.sub.as_str()).collect();
        let rows: Vec<(String, DateTime<Utc>)> =
            sqlx::query_as("SELECT id, synced_at FROM av_identities WHERE id = ANY($1)")
                .bind(&subs)
                .fetch_all(&mut conn)
                .await?;
        let _ = conn.close().await;
        let committed: BTreeMap<String, DateTime<Utc>> = rows.into_iter().collect();
        for e in events {
            match committed.get(&e.sub) {
                Some(at) => lags.push((*at - e.timestamp).as_seconds_f64() * 1e3),
                None => missing += 1,
            }
        }
    }
    Ok((lags, missing))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(applied: u64, retried: u64) -> Counts {
        Counts {
            applied,
            retried,
            ..Counts::default()
        }
    }

    #[test]
    fn the_rate_runs_from_first_to_last_progress() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut p = Progress::new(Counts::default(), t0);
        p.observe(counts(0, 0), at(500));
        p.observe(counts(100, 0), at(1_000));
        p.observe(counts(1_100, 0), at(2_000));
        p.observe(counts(2_100, 3), at(3_000));
        // Retries alone are not progress: the stall that follows does not count.
        p.observe(counts(2_100, 9), at(9_000));
        assert_eq!(p.last_change.0, at(3_000));
        assert!((p.applied_per_second() - 1_000.0).abs() < 1e-6);
    }

    #[test]
    fn a_drain_seen_once_counts_from_the_start() {
        let t0 = Instant::now();
        let mut p = Progress::new(counts(50, 0), t0);
        p.observe(counts(250, 0), t0 + Duration::from_millis(100));
        assert!((p.applied_per_second() - 2_000.0).abs() < 1e-6);
        let still = Progress::new(counts(50, 0), t0);
        assert_eq!(still.applied_per_second(), 0.0);
    }
}
