//! One benchmark run: the phases in order, each figure's repetitions, then the checks, the table
//! on stdout, the JSON report, and removal of everything the run made. Phases 1 to 3 (raw broker,
//! ingress, raw pipeline) are here; the worker's phases 4 and 5 are in `drain`.

use crate::bench::args::{BenchArgs, Phase};
use crate::bench::broker::{self, Target};
use crate::bench::chart;
use crate::bench::cpu::{CpuShare, Snapshot};
use crate::bench::loadgen;
use crate::bench::pipeline;
use crate::bench::report::{keys, Figure, Machine, Report};
use crate::bench::resources::Resources;
use crate::bench::worker::{self, WorkerConfig};
use crate::bench::workload::{tenant_ids, Generator};
use crate::bench::BenchError;
use crate::{ingress_harness, support};
use avsync_shared::topology::{format_duration, Topology};
use avsync_shared::TenantId;
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use sqlx::{Connection as _, PgConnection};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Longest wait for the in-process ingress to connect to the broker.
const READY_WAIT: Duration = Duration::from_secs(30);
/// Distinct signed webhooks the load generator cycles through.
const INGRESS_REQUEST_POOL: u64 = 20_000;
/// Rows the raw PostgreSQL upserts are made from.
const UPSERT_TEMPLATES: u64 = 10_000;

/// Runs the benchmark: every requested phase, then cleanup, the table and the report, also
/// after a failure or Ctrl-C (figures measured before then are kept).
pub async fn bench(args: BenchArgs, command: String) -> Result<(), BenchError> {
    let started = Instant::now();
    let machine = Machine::this(postgres_version().await);
    let mut report = Report::new(machine, command, args.repetitions);
    report.settings = settings(&args);
    let resources = Resources::default();
    let outcome = tokio::select! {
        outcome = phases(&args, &resources, &mut report) => outcome,
        _ = tokio::signal::ctrl_c() => Err(BenchError::Interrupted),
    };
    eprintln!("cleaning up the benchmark's queues and databases");
    let dropped = resources.clean().await;
    eprintln!("dropped {dropped} database(s)");
    report.wall_seconds = started.elapsed().as_secs_f64();
    if let Err(e) = &outcome {
        report.error = Some(e.to_string());
    }
    report.check(&args.scale_tenants);
    print!("{}", report.table());
    report.write_json(&args.report)?;
    eprintln!("report written to {}", args.report.display());
    let chart_path = args.report.with_extension("svg");
    match chart::scale_chart(
        &report,
        &args.scale_tenants,
        args.zipf_exponent,
        &chart_path,
    ) {
        Ok(true) => eprintln!("chart written to {}", chart_path.display()),
        Ok(false) => {}
        Err(e) => eprintln!("no chart: {e}"),
    }
    outcome
}

fn settings(args: &BenchArgs) -> serde_json::Value {
    let worker_env: BTreeMap<&str, &str> = args
        .worker_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    serde_json::json!({
        "phases": args.only.iter().map(|p| format!("{p:?}").to_lowercase()).collect::<Vec<_>>(),
        "repetitions": args.repetitions,
        "partitions": args.partitions,
        "tenants": args.tenants,
        "broker_messages": args.broker_messages,
        "confirm_window": broker::CONFIRM_WINDOW,
        "ingress_duration_seconds": args.ingress_duration.as_secs_f64(),
        "ingress_concurrency": args.concurrency,
        "pipeline_messages": args.pipeline_messages,
        "pipeline_batch": pipeline::BATCH,
        "naive_messages": args.naive_messages,
        "pg_duration_seconds": args.pg_duration.as_secs_f64(),
        "events": args.events,
        "workers": args.workers,
        "lag_duration_seconds": args.lag_duration.as_secs_f64(),
        "scale_tenants": args.scale_tenants.all(),
        "zipf_exponent": args.zipf_exponent,
        "scale_workers": args.scale_workers,
        "cold_sessions": args.cold_sessions,
        "cold_batch": crate::bench::cold::COLD_BATCH,
        "neighbour_burst": args.neighbour_burst,
        "neighbour_tenants": args.neighbour_tenants,
        "neighbour_rate": args.neighbour_rate,
        "drain_window_seconds": args.drain_window.as_secs_f64(),
        "worker_retry_delays": worker::RETRY_DELAYS,
        "worker_env": worker_env,
    })
}

async fn postgres_version() -> Option<String> {
    let mut conn = PgConnection::connect(support::PG_ADMIN_URL).await.ok()?;
    let version = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut conn)
        .await
        .ok();
    let _ = conn.close().await;
    version
}

/// What every phase shares.
pub(super) struct Bench<'a> {
    pub(super) args: &'a BenchArgs,
    pub(super) resources: &'a Resources,
    /// Unique to this run: the topology prefix and the start of every database name.
    pub(super) prefix: String,
    pub(super) topology: Topology,
    pub(super) tenants: Vec<TenantId>,
    pub(super) amqp: Connection,
    /// In confirm mode, with the topology declared.
    pub(super) publish: Channel,
    pub(super) http: reqwest::Client,
    /// Tenant databases created so far (`tnt_0000` up to this count).
    pub(super) tenant_databases: u32,
    /// Whether the migrated template the tenant databases are copied from exists.
    pub(super) template: bool,
}

async fn phases(
    args: &BenchArgs,
    resources: &Resources,
    report: &mut Report,
) -> Result<(), BenchError> {
    let worker_binary = args
        .worker_bin
        .clone()
        .unwrap_or_else(worker::default_binary);
    if args.runs(Phase::Worker) || args.runs(Phase::Scale) || args.runs(Phase::Neighbour) {
        if let Some(warning) = worker::check_binary(&worker_binary)? {
            report.note(warning);
        }
    }
    let prefix = support::unique("bench");
    let topology = Topology::new(&prefix, args.partitions)
        .map_err(|e| BenchError::Internal(format!("topology: {e}")))?;
    let tiers: Vec<String> = worker::retry_tiers()
        .into_iter()
        .map(format_duration)
        .collect();
    resources.topology(&prefix, args.partitions, &tiers);
    resources.databases(&prefix);
    eprintln!(
        "benchmark {prefix}: topology and databases {prefix}*, {} repetitions",
        args.repetitions
    );

    let amqp = Connection::connect(support::AMQP_URL, ConnectionProperties::default()).await?;
    let publish = amqp.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    topology.declare(&publish).await?;
    let mut bench = Bench {
        args,
        resources,
        tenants: tenant_ids(args.tenants),
        prefix,
        topology,
        amqp,
        publish,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| BenchError::Internal(format!("HTTP client: {e}")))?,
        tenant_databases: 0,
        template: false,
    };
    let config = WorkerConfig {
        binary: worker_binary,
        topology: bench.prefix.clone(),
        partitions: args.partitions,
        database_template: support::database_url(&format!("{}_{{tenant_id}}", bench.prefix)),
        extra_env: args.worker_env.clone(),
    };
    if args.runs(Phase::Broker) {
        bench.broker(report).await?;
    }
    if args.runs(Phase::Ingress) {
        bench.ingress(report).await?;
    }
    if args.runs(Phase::Pipeline) {
        bench.pipeline(report).await?;
    }
    if args.runs(Phase::Worker) {
        bench.worker(report, &config).await?;
    }
    if args.runs(Phase::Scale) {
        bench.scale(report, &config).await?;
    }
    if args.runs(Phase::Neighbour) {
        bench.neighbour(report, &config).await?;
    }
    let _ = bench.publish.close(200, "bench done".into()).await;
    let _ = bench.amqp.close(200, "bench done".into()).await;
    Ok(())
}

fn pipeline_queue(prefix: &str) -> String {
    format!("{prefix}.pipeline")
}

/// A seed per phase and repetition, so that runs are comparable.
pub(super) fn seed(phase: u64, rep: u32) -> u64 {
    phase * 1_000 + u64::from(rep)
}

impl Bench<'_> {
    pub(super) fn reps(&self) -> u32 {
        self.args.repetitions
    }

    async fn broker(&mut self, report: &mut Report) -> Result<(), BenchError> {
        let n = self.args.broker_messages;
        eprintln!("[1] broker: {n} confirmed persistent publishes per repetition");
        let (mut samples, mut cpu) = (Vec::new(), Vec::new());
        for rep in 0..self.reps() {
            let events =
                Generator::new(seed(1, rep), &format!("b{rep}"), &self.tenants, n).events(n);
            let before = Snapshot::take(&[]);
            let elapsed =
                broker::publish_all(&self.publish, Target::Partitions(&self.topology), &events)
                    .await?;
            cpu.push(before.share_until(&Snapshot::take(&[])));
            let rate = n as f64 / elapsed.as_secs_f64();
            eprintln!("  repetition {}: {rate:.0} msg/s", rep + 1);
            samples.push(rate);
            broker::purge_partitions(&self.publish, &self.topology).await?;
        }
        report.add(Figure::new(
            keys::BROKER,
            1,
            format!(
                "broker limit: publish, confirms pipelined, {} quorum queues",
                self.args.partitions
            ),
            "msg/s",
            samples,
            &cpu,
        ));
        Ok(())
    }

    async fn ingress(&mut self, report: &mut Report) -> Result<(), BenchError> {
        let concurrency = usize::from(self.args.concurrency);
        eprintln!(
            "[2] ingress: signed webhooks from {concurrency} connections for {:?} per repetition",
            self.args.ingress_duration
        );
        let secret = ingress_harness::new_whsec_secret();
        let settings = ingress_harness::settings(&self.prefix, self.args.partitions, &secret);
        let shutdown = CancellationToken::new();
        let checked = settings
            .check()
            .map_err(|e| BenchError::Ingress(e.to_string()))?;
        let running = avsync_ingress::start(checked, shutdown.clone())
            .await
            .map_err(|e| BenchError::Ingress(format!("{e:#}")))?;
        let measured = self.ingress_runs(report, &running, &secret).await;
        // Stopped and awaited whatever happened, so no request is in flight during cleanup.
        shutdown.cancel();
        let _ = running.handle.await;
        let runs = measured?;
        report.add(Figure::new(
            keys::INGRESS,
            2,
            format!("ingress: webhooks accepted (202), {concurrency} connections"),
            "req/s",
            runs.rates,
            &runs.cpu,
        ));
        report.add(Figure::new(
            keys::INGRESS_P50,
            2,
            "ingress: latency p50",
            "ms",
            runs.p50,
            &runs.cpu,
        ));
        report.add(Figure::new(
            keys::INGRESS_P99,
            2,
            "ingress: latency p99",
            "ms",
            runs.p99,
            &runs.cpu,
        ));
        Ok(())
    }

    async fn ingress_runs(
        &self,
        report: &mut Report,
        running: &avsync_ingress::Running,
        secret: &str,
    ) -> Result<Runs, BenchError> {
        let concurrency = usize::from(self.args.concurrency);
        let ready_url = format!("http://{}/readyz", running.metrics_addr);
        let ready = Instant::now();
        while !self
            .http
            .get(&ready_url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            if ready.elapsed() > READY_WAIT {
                return Err(BenchError::Timeout {
                    what: "the ingress to be ready (/readyz 200)".to_owned(),
                    after: READY_WAIT,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let base_url = format!("http://{}", running.addr);
        let client = loadgen::client(concurrency)?;
        let mut runs = Runs::default();
        for rep in 0..self.reps() {
            let pool = INGRESS_REQUEST_POOL;
            let events =
                Generator::new(seed(2, rep), &format!("i{rep}"), &self.tenants, pool).events(pool);
            let requests = Arc::new(loadgen::sign_all(secret, &events));
            let before = Snapshot::take(&[]);
            let outcome = loadgen::run(
                &client,
                &base_url,
                requests,
                concurrency,
                self.args.ingress_duration,
            )
            .await;
            runs.cpu.push(before.share_until(&Snapshot::take(&[])));
            let rate = outcome.accepted_per_second();
            let (p50, p99) = (
                outcome.latency_ms(0.5).unwrap_or(f64::NAN),
                outcome.latency_ms(0.99).unwrap_or(f64::NAN),
            );
            eprintln!(
                "  repetition {}: {rate:.0} accepted/s, p50 {p50:.1} ms, p99 {p99:.1} ms",
                rep + 1
            );
            if outcome.not_accepted() > 0 {
                report.note(format!(
                    "ingress repetition {}: {} request(s) not accepted (statuses {:?}, {} without an answer)",
                    rep + 1,
                    outcome.not_accepted(),
                    outcome.statuses,
                    outcome.transport_errors
                ));
            }
            runs.rates.push(rate);
            runs.p50.push(p50);
            runs.p99.push(p99);
            broker::purge_partitions(&self.publish, &self.topology).await?;
        }
        Ok(runs)
    }

    async fn pipeline(&mut self, report: &mut Report) -> Result<(), BenchError> {
        let (batched_n, naive_n) = (self.args.pipeline_messages, self.args.naive_messages);
        eprintln!(
            "[3] pipeline: raw consumer, {batched_n} messages in batches of {} and {naive_n} one by one per repetition",
            pipeline::BATCH
        );
        let database = format!("{}_pipeline", self.prefix);
        let mut pg = migrated_database(&database).await?;
        let queue = pipeline_queue(&self.prefix);
        self.resources.queue(&queue);
        broker::declare_quorum_queue(&self.publish, &queue).await?;
        let consume = self.amqp.create_channel().await?;
        let mut one_queue = (Vec::new(), Vec::new());
        let mut batched = (Vec::new(), Vec::new());
        let mut naive = (Vec::new(), Vec::new());
        for rep in 0..self.reps() {
            let events = Generator::new(seed(3, rep), &format!("p{rep}"), &self.tenants, batched_n)
                .events(batched_n);
            let before = Snapshot::take(&[]);
            let elapsed =
                broker::publish_all(&self.publish, Target::Queue(&queue), &events).await?;
            one_queue.1.push(before.share_until(&Snapshot::take(&[])));
            one_queue.0.push(batched_n as f64 / elapsed.as_secs_f64());

            let before = Snapshot::take(&[]);
            let elapsed = pipeline::consume_batched(&consume, &queue, batched_n, &mut pg).await?;
            batched.1.push(before.share_until(&Snapshot::take(&[])));
            batched.0.push(batched_n as f64 / elapsed.as_secs_f64());

            let events = Generator::new(seed(4, rep), &format!("n{rep}"), &self.tenants, naive_n)
                .events(naive_n);
            broker::publish_all(&self.publish, Target::Queue(&queue), &events).await?;
            let before = Snapshot::take(&[]);
            let elapsed = pipeline::consume_naive(&consume, &queue, naive_n, &mut pg).await?;
            naive.1.push(before.share_until(&Snapshot::take(&[])));
            naive.0.push(naive_n as f64 / elapsed.as_secs_f64());
            eprintln!(
                "  repetition {}: batched {:.0} msg/s, naive {:.0} msg/s (publish to one queue {:.0} msg/s)",
                rep + 1,
                batched.0[rep as usize],
                naive.0[rep as usize],
                one_queue.0[rep as usize]
            );
        }
        let _ = consume.close(200, "pipeline done".into()).await;
        report.add(Figure::new(
            keys::BROKER_ONE_QUEUE,
            1,
            "broker: publish, confirms pipelined, one quorum queue",
            "msg/s",
            one_queue.0,
            &one_queue.1,
        ));
        report.add(Figure::new(
            keys::PIPELINE_BATCHED,
            3,
            format!(
                "pipeline limit: batches of {}, one tx, one multiple ack",
                pipeline::BATCH
            ),
            "msg/s",
            batched.0,
            &batched.1,
        ));
        report.add(Figure::new(
            keys::PIPELINE_NAIVE,
            3,
            "pipeline naive: one upsert and one ack per message",
            "msg/s",
            naive.0,
            &naive.1,
        ));

        let d = self.args.pg_duration;
        eprintln!("[3] postgres: raw upserts, {d:?} per repetition and form");
        let templates: Vec<pipeline::UpsertRow> =
            Generator::new(seed(5, 0), "pg", &self.tenants, UPSERT_TEMPLATES)
                .events(UPSERT_TEMPLATES)
                .iter()
                .filter_map(|e| pipeline::row_of(&e.body))
                .collect();
        let mut single = (Vec::new(), Vec::new());
        let mut hundred = (Vec::new(), Vec::new());
        for rep in 0..self.reps() {
            let before = Snapshot::take(&[]);
            single
                .0
                .push(pipeline::upsert_rate(&mut pg, &templates, 1, d, &format!("s{rep}_")).await?);
            single.1.push(before.share_until(&Snapshot::take(&[])));
            let before = Snapshot::take(&[]);
            hundred.0.push(
                pipeline::upsert_rate(&mut pg, &templates, pipeline::BATCH, d, &format!("h{rep}_"))
                    .await?,
            );
            hundred.1.push(before.share_until(&Snapshot::take(&[])));
            eprintln!(
                "  repetition {}: {:.0} rows/s one per transaction, {:.0} rows/s 100 per statement",
                rep + 1,
                single.0[rep as usize],
                hundred.0[rep as usize]
            );
        }
        let _ = pg.close().await;
        report.add(Figure::new(
            keys::PG_SINGLE,
            3,
            "postgres: upsert, one row per transaction",
            "rows/s",
            single.0,
            &single.1,
        ));
        report.add(Figure::new(
            keys::PG_BATCH,
            3,
            "postgres: upsert, 100 rows per statement",
            "rows/s",
            hundred.0,
            &hundred.1,
        ));
        Ok(())
    }
}

/// Repetitions of a rate measured with latency percentiles (the ingress, the worker's lag).
#[derive(Debug, Default)]
pub(super) struct Runs {
    pub(super) rates: Vec<f64>,
    pub(super) p50: Vec<f64>,
    pub(super) p99: Vec<f64>,
    pub(super) cpu: Vec<CpuShare>,
}

/// Creates the database and applies the tenant schema; returns a connection to it.
pub(super) async fn migrated_database(name: &str) -> Result<PgConnection, BenchError> {
    let mut admin = PgConnection::connect(support::PG_ADMIN_URL).await?;
    sqlx::query(&format!(
        "CREATE DATABASE {}",
        avsync_worker::tenant_db::provision::quote_identifier(name)
    ))
    .execute(&mut admin)
    .await?;
    let _ = admin.close().await;
    let mut conn = PgConnection::connect(&support::database_url(name)).await?;
    avsync_worker::tenant_db::provision::migrator()
        .run_direct(&mut conn)
        .await
        .map_err(|e| BenchError::Database(e.into()))?;
    Ok(conn)
}
