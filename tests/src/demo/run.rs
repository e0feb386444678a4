//! One demo run: the real ingress and two real workers in this process, on a topology and
//! databases of the run's own, fed signed webhooks over HTTP; then a report on stdout, a graceful
//! stop, and nothing left behind.

use super::prom::Scrape;
use super::story::{Story, TENANTS};
use super::table;
use crate::ingress_harness::{self, sign_authvital_hmac, sign_standard, WEBHOOK_PATH};
use crate::support;
use avsync_shared::event::KNOWN_TYPES;
use avsync_shared::topology::{format_duration, Topology};
use avsync_worker::metrics::Outcome;
use clap::Parser;
use futures_util::stream::{self, StreamExt};
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use sqlx::{Connection as _, PgConnection};
use std::io::Write;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const PARTITIONS: u16 = 4;
const RETRY_DELAYS: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
];
const WORKERS: usize = 2;
/// Longest wait for a service to become ready, and for every event to be applied.
const DEADLINE: Duration = Duration::from_secs(60);
const SEND_CONCURRENCY: usize = 8;
const HMAC_KEY_ID: &str = "demo";
/// A worker may take its whole drain limit; the ingress waits at most a publish timeout.
const STOP_DEADLINE: Duration = Duration::from_secs(40);

#[derive(Parser, Debug, Clone)]
#[command(
    name = "demo",
    about = "Runs avsync end to end on the local PostgreSQL and RabbitMQ: one ingress and two \
             workers in this process, a few hundred signed webhooks for three tenants, then each \
             tenant's rows and the key metrics. It removes everything it created. AVSYNC_* \
             settings of the environment do not apply: the demo configures its own services."
)]
pub struct DemoArgs {
    /// Leave the tenant databases in place afterwards (the demo's queues are always removed).
    #[arg(long)]
    pub keep: bool,

    /// Seed of the generated events: the same seed sends the same events in the same order.
    #[arg(long, value_name = "N", default_value_t = 2026)]
    pub seed: u64,

    /// The RabbitMQ broker.
    #[arg(long, value_name = "URL", default_value = support::AMQP_URL)]
    pub amqp_url: String,

    /// The PostgreSQL server, as a URL without a database name: the demo creates its tenant
    /// databases there.
    #[arg(
        long,
        value_name = "URL",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    pub postgres_url: String,
}

/// Why a demo run stopped; each says what to do about it. None repeats a URL, which may hold a
/// password.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("--amqp-url is not an AMQP URL like amqp://user:password@host:5672/%2f")]
    BadAmqpUrl,
    #[error("cannot reach RabbitMQ: {0}; start it (see the README) or point --amqp-url at it")]
    Broker(String),
    #[error(
        "cannot reach PostgreSQL: {0}; start it (see the README) or point --postgres-url at it"
    )]
    Postgres(String),
    #[error("could not start {what}: {reason}")]
    Start { what: String, reason: String },
    #[error("{what} was not ready after {DEADLINE:?}; its log lines are above")]
    NotReady { what: String },
    #[error("the ingress answered {status} to event {event_id}: {body}")]
    Refused {
        status: u16,
        event_id: String,
        body: String,
    },
    #[error("sending a webhook failed: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the database of tenant {tenant} did not reach the expected state within {DEADLINE:?}; the workers' log lines are above")]
    NotApplied { tenant: String },
    #[error("{what} did not stop cleanly: {reason}")]
    Stop { what: String, reason: String },
    #[error("writing the report: {0}")]
    Output(#[from] std::io::Error),
    #[error("interrupted; everything the demo created was removed")]
    Interrupted,
}

/// What a finished run created and whether it was kept.
#[derive(Debug, Clone)]
pub struct Summary {
    pub topology: String,
    pub databases: Vec<String>,
    pub kept: bool,
}

/// The services started so far; whatever is still running when the run ends is stopped.
#[derive(Default)]
struct Stack {
    ingress: Option<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
    workers: Vec<(CancellationToken, avsync_worker::Running)>,
}

impl Stack {
    /// Stops the ingress first, so nothing new arrives, then every worker at once.
    async fn stop(&mut self) -> Result<(), DemoError> {
        let failed = |what: &str, reason: String| DemoError::Stop {
            what: what.to_owned(),
            reason,
        };
        if let Some((token, handle)) = self.ingress.take() {
            token.cancel();
            match tokio::time::timeout(STOP_DEADLINE, handle).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => return Err(failed("the ingress", format!("{e:#}"))),
                Ok(Err(e)) => return Err(failed("the ingress", e.to_string())),
                Err(_) => {
                    return Err(failed(
                        "the ingress",
                        format!("still running after {STOP_DEADLINE:?}"),
                    ))
                }
            }
        }
        let workers: Vec<_> = self.workers.drain(..).collect();
        for (token, _) in &workers {
            token.cancel();
        }
        for (n, (_, running)) in workers.into_iter().enumerate() {
            let what = format!("worker {}", n + 1);
            match tokio::time::timeout(STOP_DEADLINE, running.wait()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(failed(&what, format!("{e:#}"))),
                Err(_) => {
                    return Err(failed(
                        &what,
                        format!("still running after {STOP_DEADLINE:?}"),
                    ))
                }
            }
        }
        Ok(())
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some((token, _)) = &self.ingress {
            token.cancel();
        }
        for (token, _) in &self.workers {
            token.cancel();
        }
    }
}

/// Names of everything one run creates.
struct Names {
    topology: Topology,
    server: String,
}

impl Names {
    fn database(&self, tenant: &str) -> String {
        format!("{}_{tenant}", self.topology.prefix())
    }

    fn database_url(&self, database: &str) -> String {
        format!("{}/{database}", self.server)
    }

    fn template(&self) -> String {
        self.database_url(&self.database("{tenant_id}"))
    }
}

/// Runs the demo, writing its report to `out`. Whatever happens, the services are stopped and
/// the topology removed; the databases too unless `--keep`.
pub async fn run(args: &DemoArgs, out: &mut dyn Write) -> Result<Summary, DemoError> {
    if args.amqp_url.parse::<lapin::uri::AMQPUri>().is_err() {
        return Err(DemoError::BadAmqpUrl);
    }
    let prefix = support::unique("avsync_demo");
    let names = Names {
        topology: Topology::new(&prefix, PARTITIONS).map_err(|e| DemoError::Start {
            what: "the topology".into(),
            reason: e.to_string(),
        })?,
        server: args.postgres_url.trim_end_matches('/').to_owned(),
    };
    preflight(args, &names).await?;
    let mut stack = Stack::default();
    let result = tokio::select! {
        result = demo(args, &names, &mut stack, out) => result,
        _ = tokio::signal::ctrl_c() => Err(DemoError::Interrupted),
    };
    let stopped = stack.stop().await;
    let databases: Vec<String> = TENANTS.iter().map(|(t, _)| names.database(t)).collect();
    delete_topology(&args.amqp_url, &names.topology).await;
    if args.keep {
        writeln!(
            out,
            "\nKept the databases {}; look inside with e.g.\n  psql {} -c 'select * from av_identities'",
            databases.join(", "),
            names.database_url(&databases[0])
        )?;
    } else {
        for database in &databases {
            drop_database(&names, database).await;
        }
        writeln!(
            out,
            "\nRemoved the demo's queues, exchanges and databases (run with --keep to keep the databases)."
        )?;
    }
    result.and(stopped)?;
    Ok(Summary {
        topology: prefix,
        databases,
        kept: args.keep,
    })
}

async fn preflight(args: &DemoArgs, names: &Names) -> Result<(), DemoError> {
    let broker = tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(&args.amqp_url, ConnectionProperties::default()),
    )
    .await
    .map_err(|_| DemoError::Broker("no answer within 10 s".into()))?
    .map_err(|e| DemoError::Broker(e.to_string()))?;
    let _ = broker.close(200, "demo preflight".into()).await;
    let postgres = tokio::time::timeout(
        Duration::from_secs(10),
        PgConnection::connect(&names.database_url("postgres")),
    )
    .await
    .map_err(|_| DemoError::Postgres("no answer within 10 s".into()))?
    .map_err(|e| DemoError::Postgres(e.to_string()))?;
    let _ = postgres.close().await;
    Ok(())
}

#[derive(Parser)]
struct WorkerFlags {
    #[command(flatten)]
    settings: avsync_worker::settings::Settings,
}

fn worker_settings(
    args: &DemoArgs,
    names: &Names,
) -> Result<avsync_worker::settings::Settings, DemoError> {
    let delays: Vec<String> = RETRY_DELAYS.iter().map(|d| format_duration(*d)).collect();
    let partitions = PARTITIONS.to_string();
    let template = names.template();
    let flags = [
        "avsync-worker",
        "--amqp-url",
        &args.amqp_url,
        "--topology",
        names.topology.prefix(),
        "--partitions",
        &partitions,
        "--metrics-listen",
        "127.0.0.1:0",
        "--tenant-database-url",
        &template,
        "--create-tenant-databases",
        "true",
        "--retry-delays",
        &delays.join(","),
        // Pinned: the demo runs beside the test suite, which shares its PostgreSQL.
        "--max-connections",
        crate::worker_harness::TEST_MAX_CONNECTIONS,
    ];
    WorkerFlags::try_parse_from(flags)
        .map(|f| f.settings)
        .map_err(|e| DemoError::Start {
            what: "a worker".into(),
            reason: e.to_string(),
        })
}

/// The secrets the ingress accepts and the demo signs with: one Standard Webhooks secret and one
/// AuthVital HMAC key, both fresh for each run.
struct Secrets {
    whsec: String,
    hmac: String,
}

impl Secrets {
    fn generate() -> Self {
        let hmac: String = rand::random::<[u8; 24]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Self {
            whsec: ingress_harness::new_whsec_secret(),
            hmac,
        }
    }

    fn setting(&self) -> String {
        format!("{},{HMAC_KEY_ID}={}", self.whsec, self.hmac)
    }

    /// Even deliveries are signed the Standard Webhooks way, odd ones the AuthVital way.
    fn headers(
        &self,
        n: usize,
        event_id: &str,
        event_type: &str,
        body: &[u8],
    ) -> Vec<(&'static str, String)> {
        let ts = chrono::Utc::now().timestamp();
        if n.is_multiple_of(2) {
            vec![
                ("webhook-id", event_id.to_owned()),
                ("webhook-timestamp", ts.to_string()),
                (
                    "webhook-signature",
                    sign_standard(&self.whsec, event_id, ts, body),
                ),
            ]
        } else {
            vec![
                ("x-authvital-timestamp", ts.to_string()),
                ("x-authvital-key-id", HMAC_KEY_ID.to_owned()),
                (
                    "x-authvital-signature",
                    sign_authvital_hmac(self.hmac.as_bytes(), ts, body),
                ),
                ("x-authvital-event-id", event_id.to_owned()),
                ("x-authvital-event-type", event_type.to_owned()),
            ]
        }
    }
}

async fn start(
    args: &DemoArgs,
    names: &Names,
    secrets: &Secrets,
    stack: &mut Stack,
) -> Result<(String, String, Vec<String>), DemoError> {
    let mut worker_metrics = Vec::new();
    for n in 1..=WORKERS {
        let token = CancellationToken::new();
        let checked = worker_settings(args, names)?
            .check()
            .map_err(|e| DemoError::Start {
                what: format!("worker {n}"),
                reason: e.to_string(),
            })?;
        let running = avsync_worker::start(checked, token.clone())
            .await
            .map_err(|e| DemoError::Start {
                what: format!("worker {n}"),
                reason: format!("{e:#}"),
            })?;
        worker_metrics.push(format!("http://{}", running.metrics_addr));
        stack.workers.push((token, running));
    }
    let mut settings =
        ingress_harness::settings(names.topology.prefix(), PARTITIONS, &secrets.setting());
    settings.common.amqp_url = args.amqp_url.clone();
    let token = CancellationToken::new();
    let checked = settings.check().map_err(|e| DemoError::Start {
        what: "the ingress".into(),
        reason: e.to_string(),
    })?;
    let running = avsync_ingress::start(checked, token.clone())
        .await
        .map_err(|e| DemoError::Start {
            what: "the ingress".into(),
            reason: format!("{e:#}"),
        })?;
    let webhooks = format!("http://{}{WEBHOOK_PATH}", running.addr);
    let ingress_metrics = format!("http://{}", running.metrics_addr);
    stack.ingress = Some((token, running.handle));

    let client = reqwest::Client::new();
    let ready_by = Instant::now() + DEADLINE;
    for (n, (_, worker)) in stack.workers.iter().enumerate() {
        while !worker.is_ready() {
            if Instant::now() > ready_by {
                return Err(DemoError::NotReady {
                    what: format!("worker {}", n + 1),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    loop {
        let status = client.get(format!("{ingress_metrics}/readyz")).send().await;
        if status.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        if Instant::now() > ready_by {
            return Err(DemoError::NotReady {
                what: "the ingress".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((webhooks, ingress_metrics, worker_metrics))
}

async fn demo(
    args: &DemoArgs,
    names: &Names,
    stack: &mut Stack,
    out: &mut dyn Write,
) -> Result<(), DemoError> {
    let users: Vec<String> = TENANTS
        .iter()
        .map(|(t, n)| format!("{t} ({n} users)"))
        .collect();
    writeln!(
        out,
        "avsync demo: topology `{}` ({PARTITIONS} partitions), tenants {}",
        names.topology.prefix(),
        users.join(", ")
    )?;
    let secrets = Secrets::generate();
    let (webhooks, ingress_metrics, worker_metrics) = start(args, names, &secrets, stack).await?;
    writeln!(
        out,
        "  ingress   POST {webhooks}   metrics {ingress_metrics}/metrics"
    )?;
    for (n, url) in worker_metrics.iter().enumerate() {
        writeln!(out, "  worker {}  metrics {url}/metrics", n + 1)?;
    }
    writeln!(
        out,
        "  each tenant's database is created on its first event: {}",
        names.database("<tenant>")
    )?;
    out.flush()?;

    let story = Story::generate(args.seed, chrono::Utc::now().timestamp_millis());
    writeln!(
        out,
        "\nSending {} webhooks for {} events: {} delivered twice, {} arriving after a newer event about the same user;\nhalf signed with Standard Webhooks headers, half with X-AuthVital-Signature (HMAC).",
        story.deliveries.len(),
        story.events.len(),
        story.duplicates(),
        story.late_deliveries()
    )?;
    out.flush()?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let sent = Instant::now();
    let answers: Vec<Result<(), DemoError>> = stream::iter(story.deliveries.iter().enumerate())
        .map(|(n, &i)| {
            let event = &story.events[i];
            let headers = secrets.headers(n, &event.id, event.event_type, &event.body);
            post(
                &client,
                &webhooks,
                headers,
                event.body.clone(),
                &event.id,
                202,
            )
        })
        .buffered(SEND_CONCURRENCY)
        .collect()
        .await;
    answers.into_iter().collect::<Result<Vec<()>, _>>()?;
    writeln!(
        out,
        "  {} × 202 Accepted in {} ms",
        story.deliveries.len(),
        sent.elapsed().as_millis()
    )?;
    let forged = &story.events[0];
    let headers = Secrets::generate().headers(0, &forged.id, forged.event_type, &forged.body);
    post(
        &client,
        &webhooks,
        headers,
        forged.body.clone(),
        &forged.id,
        401,
    )
    .await?;
    writeln!(
        out,
        "  and 1 webhook signed with a wrong secret: 401 Unauthorized, not queued"
    )?;
    out.flush()?;

    let applying = Instant::now();
    wait_until_applied(names, &story, stack).await?;
    writeln!(
        out,
        "\nAll applied {} ms after the last 202: every tenant database equals the state the events define,\nwhatever order they arrived in and however often.",
        applying.elapsed().as_millis()
    )?;
    for (tenant, _) in TENANTS {
        let database = names.database(tenant);
        let rows = load(names, &database).await.unwrap_or_default();
        writeln!(
            out,
            "\ntenant {tenant}: database {database}, table av_identities ({} rows)",
            rows.len()
        )?;
        write!(out, "{}", table::identities(&rows))?;
    }

    let scrapes = scrape_all(&client, &ingress_metrics, &worker_metrics).await;
    writeln!(out, "\nKey metrics, from each process's /metrics:")?;
    write!(out, "{}", metrics_table(&scrapes))?;
    out.flush()?;

    let stopping = Instant::now();
    stack.stop().await?;
    writeln!(
        out,
        "\nStopped the ingress and both workers gracefully in {} ms: in-flight requests and messages finished, pools closed.",
        stopping.elapsed().as_millis()
    )?;
    Ok(())
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    event_id: &str,
    expected: u16,
) -> Result<(), DemoError> {
    let mut request = client
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    if status == expected {
        return Ok(());
    }
    Err(DemoError::Refused {
        status,
        event_id: event_id.to_owned(),
        body: response.text().await.unwrap_or_default(),
    })
}

async fn load(names: &Names, database: &str) -> Option<Vec<avsync_worker::apply::Identity>> {
    let mut conn = PgConnection::connect(&names.database_url(database))
        .await
        .ok()?;
    let rows = avsync_worker::apply::load_all(&mut conn).await.ok();
    let _ = conn.close().await;
    rows
}

/// Messages the workers have finished with: applied, ignored or dead-lettered.
fn settled(stack: &Stack) -> u64 {
    let outcomes = [Outcome::Applied, Outcome::Ignored, Outcome::DeadLettered];
    stack
        .workers
        .iter()
        .flat_map(|(_, w)| {
            KNOWN_TYPES
                .iter()
                .copied()
                .chain(["other"])
                .flat_map(move |t| outcomes.map(|o| w.metrics().events_total(t, o)))
        })
        .sum()
}

/// Until every tenant's rows equal the model and every delivery is settled.
async fn wait_until_applied(names: &Names, story: &Story, stack: &Stack) -> Result<(), DemoError> {
    let deadline = Instant::now() + DEADLINE;
    for (tenant, _) in TENANTS {
        let expected = story.model(tenant).identities();
        let database = names.database(tenant);
        while load(names, &database).await.as_deref() != Some(expected.as_slice()) {
            if Instant::now() > deadline {
                return Err(DemoError::NotApplied {
                    tenant: tenant.to_owned(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let deliveries = u64::try_from(story.deliveries.len()).unwrap_or(u64::MAX);
    while settled(stack) < deliveries {
        if Instant::now() > deadline {
            return Err(DemoError::NotApplied {
                tenant: "every tenant".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Scrapes every process. Every delivery is settled by now, so the queues are empty; a worker
/// whose depth poller last read them in the middle of the run (it reads every few seconds) is
/// scraped again after its next read, so the report does not show a stale backlog.
async fn scrape_all(
    client: &reqwest::Client,
    ingress: &str,
    workers: &[String],
) -> Vec<(String, Scrape)> {
    let mut scrapes = vec![("ingress".to_owned(), scrape(client, ingress).await)];
    let by =
        Instant::now() + avsync_worker::test_support::POLL_INTERVAL * 2 + Duration::from_secs(1);
    for (n, url) in workers.iter().enumerate() {
        let mut last = scrape(client, url).await;
        while last.matching("avsync_worker_queue_messages", &[]).count() == 0
            || last.sum("avsync_worker_queue_messages", &[]) > 0.0
        {
            if Instant::now() > by {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            last = scrape(client, url).await;
        }
        scrapes.push((format!("worker {}", n + 1), last));
    }
    scrapes
}

async fn scrape(client: &reqwest::Client, base: &str) -> Scrape {
    let text = match client.get(format!("{base}/metrics")).send().await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    Scrape::parse(&text).unwrap_or_default()
}

fn count(value: f64) -> String {
    format!("{value:.0}")
}

/// A histogram of seconds as it measured it: the exact mean, and the bucket bounds that the
/// median and the 99th percentile fall under (a histogram knows no finer).
fn percentiles(scrape: &Scrape, histogram: &str) -> String {
    let seconds = |s: f64| {
        if s >= 1.0 {
            format!("{s:.1} s")
        } else {
            format!("{:.1} ms", s * 1000.0)
        }
    };
    let bound = |q: f64| match scrape.quantile_bound(histogram, q) {
        Some(b) if b.is_infinite() => "over the last bucket".to_owned(),
        Some(b) => format!("≤ {}", seconds(b)),
        None => "-".to_owned(),
    };
    match scrape.mean(histogram) {
        Some(mean) => format!(
            "mean {}, p50 {}, p99 {}",
            seconds(mean),
            bound(0.5),
            bound(0.99)
        ),
        None => "-".to_owned(),
    }
}

fn metrics_table(scrapes: &[(String, Scrape)]) -> String {
    let mut rows = Vec::new();
    let mut add = |process: &str, metric: &str, value: String| {
        rows.push(vec![process.to_owned(), metric.to_owned(), value]);
    };
    for (process, s) in scrapes {
        if process == "ingress" {
            let by_outcome: Vec<String> = s
                .matching("avsync_ingress_requests_total", &[])
                .filter(|x| x.value > 0.0)
                .map(|x| format!("{} {}", x.labels["outcome"], count(x.value)))
                .collect();
            add(
                process,
                "avsync_ingress_requests_total",
                by_outcome.join(", "),
            );
            add(
                process,
                "avsync_ingress_publish_seconds",
                format!(
                    "{} to the broker's confirm",
                    percentiles(s, "avsync_ingress_publish_seconds")
                ),
            );
            add(
                process,
                "avsync_ingress_ready",
                count(s.sum("avsync_ingress_ready", &[])),
            );
            continue;
        }
        let outcomes: Vec<String> = Outcome::ALL
            .iter()
            .map(|o| {
                let n = s.sum("avsync_worker_events_total", &[("outcome", o.as_str())]);
                format!("{} {}", o.as_str(), count(n))
            })
            .collect();
        add(process, "avsync_worker_events_total", outcomes.join(", "));
        add(
            process,
            "avsync_worker_apply_seconds",
            format!(
                "{} (a tenant's first events wait while its database is created)",
                percentiles(s, "avsync_worker_apply_seconds")
            ),
        );
        add(
            process,
            "avsync_worker_lag_seconds",
            format!(
                "{} from event time to commit (the events are dated up to 15 s before sending)",
                percentiles(s, "avsync_worker_lag_seconds")
            ),
        );
        add(
            process,
            "avsync_worker_tenant_pool*",
            format!(
                "{} open, {} opened, {} evicted; wait for a connection {}",
                count(s.sum("avsync_worker_tenant_pools", &[])),
                count(s.sum("avsync_worker_tenant_pool_opens_total", &[])),
                count(s.sum("avsync_worker_tenant_pool_evictions_total", &[])),
                percentiles(s, "avsync_worker_tenant_pool_wait_seconds")
            ),
        );
        let queues = |pattern: &str| -> f64 {
            s.matching("avsync_worker_queue_messages", &[])
                .filter(|x| x.labels.get("queue").is_some_and(|q| q.contains(pattern)))
                .map(|x| x.value)
                .sum()
        };
        add(
            process,
            "avsync_worker_queue_messages",
            format!(
                "partitions {}, retry tiers {}, dead letters {}",
                count(queues(".events.p")),
                count(queues(".retry.")),
                count(queues(".dead"))
            ),
        );
        add(
            process,
            "avsync_worker_ready",
            count(s.sum("avsync_worker_ready", &[])),
        );
    }
    table::render(&["process", "metric", "value"], &rows)
}

async fn delete_topology(amqp_url: &str, topology: &Topology) {
    let Ok(Ok(conn)) = tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(amqp_url, ConnectionProperties::default()),
    )
    .await
    else {
        return;
    };
    let mut queues: Vec<String> = (0..topology.partitions())
        .map(|p| topology.partition_queue(p))
        .collect();
    queues.push(topology.dead_queue());
    let mut exchanges = vec![topology.events_exchange()];
    for delay in RETRY_DELAYS {
        queues.push(topology.retry_tier(delay));
        exchanges.push(topology.retry_tier(delay));
    }
    // A failed delete closes its channel: each delete gets a channel of its own, closed before
    // the connection (lapin reports a channel still open at that point as a connection error).
    for queue in &queues {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = ch.close(200, "deleted".into()).await;
        }
    }
    for exchange in &exchanges {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
            let _ = ch.close(200, "deleted".into()).await;
        }
    }
    let _ = conn.close(200, "demo done".into()).await;
}

async fn drop_database(names: &Names, database: &str) {
    let Ok(mut admin) = PgConnection::connect(&names.database_url("postgres")).await else {
        return;
    };
    let _ = sqlx::query(&format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        avsync_worker::tenant_db::provision::quote_identifier(database)
    ))
    .execute(&mut admin)
    .await;
    let _ = admin.close().await;
}
