//! Fault injection: real `avsync-worker` child processes (so SIGKILL is real), events whose
//! every effect is observable, a sender that retries 503s, guards that bring a stopped shared
//! service back, and the final ledger: every accepted event is applied or dead-lettered.

pub mod servers;

use crate::ingress_harness::TestIngress;
use crate::support::{self, queue_depth, wait_until};
use crate::worker_harness::{model_of, take_dead_letters, DeadLetterSeen, TestDatabases};
use avsync_shared::event::{effectful_types, ignored_types};
use avsync_shared::topology::Topology;
use avsync_shared::Envelope;
use avsync_worker::apply::Identity;
use futures_util::stream::{self, StreamExt};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Short retry delays, so a fault that outlasts a few attempts still ends within the test.
pub const RETRY_DELAYS: &str = "200ms,500ms,1s,2s,5s,10s";

/// `n` events of `tenant`, each about a user of its own (`sub` = `s-<event id>`): every event
/// that sets something leaves a row only it can have made, so a lost event is a missing row and
/// the rows count the applied events exactly. About one in twenty has an ignored type.
pub fn observable_events(seed: u64, tenant: &str, n: usize) -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let effectful: Vec<&str> = effectful_types().collect();
    let ignored: Vec<&str> = ignored_types().chain(["tenant.something_new"]).collect();
    (0..n)
        .map(|i| {
            let event_type = if rng.random_bool(0.05) {
                ignored.choose(&mut rng).copied().unwrap_or(ignored[0])
            } else {
                effectful.choose(&mut rng).copied().unwrap_or(effectful[0])
            };
            let id = format!("{tenant}-{seed}-{i}");
            let mut data = Map::new();
            data.insert("sub".into(), json!(format!("s-{id}")));
            // Always present, so subject.updated and invite.accepted set something too.
            data.insert("email".into(), json!(format!("{i}@{tenant}.test")));
            for (key, value) in [
                ("given_name", "Ann"),
                ("family_name", "Lee"),
                ("membership_id", "m-1"),
                ("role_slug", "admin"),
                ("role_id", "r-1"),
                ("role_name", "Admin"),
            ] {
                if rng.random_bool(0.5) {
                    data.insert(key.into(), json!(value));
                }
            }
            if rng.random_bool(0.5) {
                data.insert("tenant_roles".into(), json!(["member"]));
            }
            let ms = rng.random_range(0..600_000);
            let timestamp = chrono::DateTime::from_timestamp_millis(1_787_276_403_000 + ms)
                .expect("time in range")
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            json!({
                "id": id,
                "type": event_type,
                "tenant_id": tenant,
                "timestamp": timestamp,
                "application_id": "app_test",
                "data": data,
            })
            .to_string()
            .into_bytes()
        })
        .collect()
}

fn envelope(body: &[u8]) -> Envelope {
    Envelope::decode(body).expect("fault test bodies have a valid envelope")
}

/// What posting a batch through the ingress gave.
#[derive(Debug, Default, Clone)]
pub struct Posted {
    /// The bodies that got a 202 (each once, however many tries it took).
    pub accepted: Vec<Vec<u8>>,
    /// Bodies still refused when the sender gave up.
    pub given_up: usize,
    /// 503 answers (each retried, as AuthVital does).
    pub unavailable: usize,
    /// Every answer that was neither 202 nor 503.
    pub unexpected: Vec<u16>,
}

impl Posted {
    pub fn merge(&mut self, other: Posted) {
        self.accepted.extend(other.accepted);
        self.given_up += other.given_up;
        self.unavailable += other.unavailable;
        self.unexpected.extend(other.unexpected);
    }
}

/// Posts every body, `concurrency` at a time, retrying a 503 every 200 ms for at most `patience`.
pub async fn post_all(
    ingress: Arc<TestIngress>,
    bodies: Vec<Vec<u8>>,
    concurrency: usize,
    patience: Duration,
) -> Posted {
    let answers: Vec<(Option<Vec<u8>>, usize, Option<u16>)> = stream::iter(bodies)
        .map(move |body| {
            let ingress = ingress.clone();
            async move {
                let start = Instant::now();
                let mut unavailable = 0;
                loop {
                    match ingress.post(&body).await.status().as_u16() {
                        202 => return (Some(body), unavailable, None),
                        503 if start.elapsed() < patience => {
                            unavailable += 1;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        503 => return (None, unavailable + 1, None),
                        other => return (None, unavailable, Some(other)),
                    }
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut posted = Posted::default();
    for (accepted, unavailable, unexpected) in answers {
        posted.unavailable += unavailable;
        match (accepted, unexpected) {
            (Some(body), _) => posted.accepted.push(body),
            (None, Some(status)) => posted.unexpected.push(status),
            (None, None) => posted.given_up += 1,
        }
    }
    posted
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port()
}

/// Where the child workers of a scenario write their stderr; kept when the scenario fails.
pub fn log_dir(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(format!("avsync-faults-{prefix}"))
}

/// Removes a scenario's worker logs (call at the end of a passing scenario).
pub fn remove_logs(prefix: &str) {
    let _ = std::fs::remove_dir_all(log_dir(prefix));
}

/// The end of a passing scenario: every worker gets SIGTERM and exits 0, the ingress stops
/// gracefully, the worker logs go.
pub async fn stop_all(workers: Vec<ChildWorker>, ingress: Arc<TestIngress>, prefix: &str) {
    for w in workers {
        assert!(w.terminate(Duration::from_secs(30)).await.success());
    }
    if let Ok(ingress) = Arc::try_unwrap(ingress) {
        ingress.stop().await;
    }
    remove_logs(prefix);
}

/// How to start the child workers of one scenario.
#[derive(Clone)]
pub struct WorkerSpec {
    pub prefix: String,
    pub partitions: u16,
    pub template: String,
    pub extra_env: Vec<(String, String)>,
}

impl WorkerSpec {
    pub fn new(prefix: &str, partitions: u16, dbs: &TestDatabases) -> Self {
        Self {
            prefix: prefix.to_owned(),
            partitions,
            template: dbs.template(),
            extra_env: Vec::new(),
        }
    }
}

/// One `avsync-worker` child process, configured only through `AVSYNC_*` variables as an
/// operator would. Dropping it kills it, so a failing test leaves no consumer behind.
pub struct ChildWorker {
    child: tokio::process::Child,
    pub name: String,
    pub log: PathBuf,
    metrics_url: String,
    client: reqwest::Client,
}

impl ChildWorker {
    /// Starts a worker and waits (at most 30 s) until `/readyz` says it consumes.
    pub async fn start(spec: &WorkerSpec, name: &str) -> ChildWorker {
        let port = free_port();
        let dir = log_dir(&spec.prefix);
        std::fs::create_dir_all(&dir).expect("worker log directory");
        let log = dir.join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log).expect("worker log file");
        let mut command = tokio::process::Command::new(crate::processes::binary("avsync-worker"));
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("AVSYNC_AMQP_URL", support::AMQP_URL)
            .env("AVSYNC_TOPOLOGY", &spec.prefix)
            .env("AVSYNC_PARTITIONS", spec.partitions.to_string())
            .env("AVSYNC_METRICS_LISTEN", format!("127.0.0.1:{port}"))
            .env("AVSYNC_TENANT_DATABASE_URL", &spec.template)
            .env("AVSYNC_CREATE_TENANT_DATABASES", "true")
            .env("AVSYNC_RETRY_DELAYS", RETRY_DELAYS)
            .env("AVSYNC_PREFETCH", "32")
            .env(
                "AVSYNC_MAX_CONNECTIONS",
                crate::worker_harness::TEST_MAX_CONNECTIONS,
            )
            .envs(spec.extra_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true);
        let child = command.spawn().expect("spawn avsync-worker");
        let worker = ChildWorker {
            child,
            name: name.to_owned(),
            log,
            metrics_url: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .expect("http client"),
        };
        worker.wait_ready().await;
        worker
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("a running child has a pid")
    }

    async fn wait_ready(&self) {
        self.wait_readiness(true, Duration::from_secs(30)).await;
    }

    /// What `/readyz` answers now (no answer counts as not ready).
    pub async fn ready(&self) -> bool {
        self.client
            .get(format!("{}/readyz", self.metrics_url))
            .send()
            .await
            .is_ok_and(|r| r.status().as_u16() == 200)
    }

    /// Waits (at most `deadline`) until `/readyz` says `ready`; returns how long that took.
    pub async fn wait_readiness(&self, ready: bool, deadline: Duration) -> Duration {
        let started = Instant::now();
        let what = format!(
            "worker {} {}ready (log: {})",
            self.name,
            if ready { "" } else { "not " },
            self.log.display()
        );
        wait_until(&what, deadline, || async {
            (self.ready().await == ready).then_some(())
        })
        .await;
        started.elapsed()
    }

    /// SIGKILL: no chance to finish, ack or close anything.
    pub async fn kill9(mut self) {
        self.child.kill().await.expect("SIGKILL the worker");
    }

    /// SIGTERM, then waits (at most `deadline`) for the exit; returns its status.
    pub async fn terminate(mut self, deadline: Duration) -> ExitStatus {
        let sent = tokio::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .await
            .expect("run kill -TERM");
        assert!(sent.success(), "kill -TERM {}", self.pid());
        match tokio::time::timeout(deadline, self.child.wait()).await {
            Ok(status) => status.expect("wait for the worker"),
            Err(_) => panic!(
                "worker {} did not exit within {deadline:?} of SIGTERM (log: {})",
                self.name,
                self.log.display()
            ),
        }
    }
}

fn run_quietly(program: &str, args: &[&str]) -> bool {
    std::process::Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// How long a guard keeps trying to bring a stopped service back. A PostgreSQL server holding
/// many databases takes well over a minute to checkpoint and start.
const SERVICE_BACK: Duration = Duration::from_secs(300);

/// Runs `attempt` until `ready` holds or `deadline` passes; true when it holds. Never panics, so
/// a guard can call it from `Drop` while the test unwinds (a panic there aborts the process and
/// would leave the service down for every test after it).
fn bring_back(
    deadline: Duration,
    mut attempt: impl FnMut(),
    mut ready: impl FnMut() -> bool,
) -> bool {
    let start = Instant::now();
    loop {
        if ready() {
            return true;
        }
        if start.elapsed() > deadline {
            return false;
        }
        attempt();
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn rabbitmq_answers() -> bool {
    std::net::TcpStream::connect("127.0.0.1:5672").is_ok()
        && run_quietly("rabbitmqctl", &["-q", "await_startup"])
}

/// Stops the shared RabbitMQ application (the node stays up). Dropping the guard starts it
/// again and waits until it accepts connections, also when the test fails.
pub struct RabbitStopped(());

impl RabbitStopped {
    pub fn stop() -> RabbitStopped {
        let guard = RabbitStopped(());
        assert!(
            run_quietly("rabbitmqctl", &["-q", "stop_app"]),
            "rabbitmqctl stop_app"
        );
        guard
    }
}

impl Drop for RabbitStopped {
    fn drop(&mut self) {
        let back = bring_back(
            SERVICE_BACK,
            || {
                run_quietly("rabbitmqctl", &["-q", "start_app"]);
            },
            rabbitmq_answers,
        );
        if !back {
            eprintln!("RabbitMQ did not answer within {SERVICE_BACK:?} of start_app; start it with `rabbitmq-server -detached`");
        }
    }
}

/// The version directory of the local PostgreSQL cluster (`/etc/postgresql/<version>`).
fn pg_version() -> String {
    std::fs::read_dir("/etc/postgresql")
        .expect("/etc/postgresql (a Debian PostgreSQL cluster)")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .max()
        .expect("one PostgreSQL version in /etc/postgresql")
}

fn pg_ready() -> bool {
    run_quietly("pg_isready", &["-q", "-h", "127.0.0.1", "-p", "5432"])
}

/// Restarts the shared PostgreSQL cluster (`pg_ctlcluster … restart`: every connection is cut).
/// The guard makes sure, when dropped and also when the test fails, that the cluster runs and
/// answers.
pub struct PgRestart {
    version: String,
}

impl PgRestart {
    pub fn restart() -> PgRestart {
        let version = pg_version();
        let guard = PgRestart {
            version: version.clone(),
        };
        let timeout = SERVICE_BACK.as_secs().to_string();
        assert!(
            run_quietly(
                "pg_ctlcluster",
                &[
                    "--skip-systemctl-redirect",
                    &version,
                    "main",
                    "restart",
                    "--mode",
                    "fast",
                    "--",
                    "-t",
                    &timeout,
                ],
            ),
            "pg_ctlcluster {version} main restart"
        );
        guard
    }
}

impl Drop for PgRestart {
    fn drop(&mut self) {
        let version = &self.version;
        let timeout = SERVICE_BACK.as_secs().to_string();
        // `start` of a running cluster fails harmlessly; one that is still starting is waited on.
        let back = bring_back(
            SERVICE_BACK,
            || {
                run_quietly(
                    "pg_ctlcluster",
                    &[
                        "--skip-systemctl-redirect",
                        version,
                        "main",
                        "start",
                        "--",
                        "-t",
                        &timeout,
                    ],
                );
            },
            pg_ready,
        );
        if !back {
            eprintln!("PostgreSQL did not answer within {SERVICE_BACK:?}; start it with `pg_ctlcluster --skip-systemctl-redirect {version} main start`");
        }
    }
}

/// The end of a scenario: what was accepted, what is in the databases, what is dead.
#[derive(Debug)]
pub struct Ledger {
    /// Distinct events that got a 202 (or were published confirmed).
    pub accepted: usize,
    /// Accepted events whose row is in their tenant's database.
    pub applied: usize,
    /// Accepted events of an ignored type (acknowledged, no effect).
    pub ignored: usize,
    /// Dead letters, by error class.
    pub dead: BTreeMap<String, usize>,
    /// Dead-lettered events whose row exists too (applied, then dead-lettered on a redelivery).
    pub dead_and_applied: usize,
    /// Optional events (see [`settle_with_optional`]) whose row exists.
    pub optional_applied: usize,
}

impl Ledger {
    pub fn dead_total(&self) -> usize {
        self.dead.values().sum()
    }
}

impl std::fmt::Display for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "accepted {} = applied {} + ignored {} + dead-lettered {} {:?} (dead and also applied: {}; optional events applied: {})",
            self.accepted,
            self.applied,
            self.ignored,
            self.dead_total(),
            self.dead,
            self.dead_and_applied,
            self.optional_applied
        )
    }
}

/// Distinct bodies by event id, grouped by tenant.
fn by_tenant(accepted: &[Vec<u8>]) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<u8>>> = BTreeMap::new();
    for body in accepted {
        let e = envelope(body);
        out.entry(e.tenant_id.to_string())
            .or_default()
            .insert(e.id, body.clone());
    }
    out
}

async fn undrained(ch: &lapin::Channel, topology: &Topology) -> u32 {
    let mut queues: Vec<String> = (0..topology.partitions())
        .map(|p| topology.partition_queue(p))
        .collect();
    queues.extend(
        support::retry_delays_of(RETRY_DELAYS)
            .into_iter()
            .map(|d| topology.retry_tier(d)),
    );
    let mut depth = 0;
    for q in &queues {
        depth += queue_depth(ch, q).await.unwrap_or(0);
    }
    depth
}

fn describe_difference(tenant: &str, expected: &[Identity], rows: &[Identity]) -> String {
    let want: BTreeMap<&str, &Identity> = expected.iter().map(|r| (r.id.as_str(), r)).collect();
    let have: BTreeMap<&str, &Identity> = rows.iter().map(|r| (r.id.as_str(), r)).collect();
    let missing: Vec<&&str> = want.keys().filter(|k| !have.contains_key(*k)).collect();
    let extra: Vec<&&str> = have.keys().filter(|k| !want.contains_key(*k)).collect();
    let differing: Vec<&&str> = want
        .iter()
        .filter(|(k, v)| have.get(*k).is_some_and(|h| h != *v))
        .map(|(k, _)| k)
        .collect();
    format!(
        "tenant {tenant}: {} expected rows, {} found; missing {} (first {:?}), unexpected {} (first {:?}), differing {} (first {:?})",
        want.len(),
        have.len(),
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        extra.len(),
        extra.iter().take(5).collect::<Vec<_>>(),
        differing.len(),
        differing.iter().take(5).collect::<Vec<_>>(),
    )
}

/// Waits (at most `deadline`) until every queue of the topology is drained and every tenant's
/// rows equal the contract's model of its accepted events that were not dead-lettered; then
/// checks `applied + ignored + dead = accepted`. Rows of dead-lettered events are tolerated and
/// counted (a redelivery of an applied event may still exhaust its attempts).
pub async fn settle(
    topology: &Topology,
    dbs: &TestDatabases,
    accepted: &[Vec<u8>],
    deadline: Duration,
) -> Ledger {
    settle_with_optional(topology, dbs, accepted, &[], deadline).await
}

/// [`settle`], where the events of `optional` may each be applied or not (their rows are gone
/// with a dropped database, say); a row of theirs that exists must still equal its model, and
/// is counted in [`Ledger::optional_applied`], not in `accepted`.
pub async fn settle_with_optional(
    topology: &Topology,
    dbs: &TestDatabases,
    accepted: &[Vec<u8>],
    optional: &[Vec<u8>],
    deadline: Duration,
) -> Ledger {
    settle_at(
        support::AMQP_URL,
        topology,
        dbs,
        accepted,
        optional,
        deadline,
    )
    .await
}

/// [`settle_with_optional`] with the queues on the broker at `amqp_url`.
pub async fn settle_at(
    amqp_url: &str,
    topology: &Topology,
    dbs: &TestDatabases,
    accepted: &[Vec<u8>],
    optional: &[Vec<u8>],
    deadline: Duration,
) -> Ledger {
    let tenants = by_tenant(accepted);
    let optional = by_tenant(optional);
    let no_optional = BTreeMap::new();
    let (conn, ch) = support::channel_at(amqp_url).await;
    let mut dead: Vec<DeadLetterSeen> = Vec::new();
    let start = Instant::now();
    let ledger = loop {
        dead.extend(take_dead_letters(&ch, topology).await);
        let dead_ids: BTreeSet<&str> = dead.iter().map(|d| d.message_id.as_str()).collect();
        let depth = undrained(&ch, topology).await;
        let mut differences = Vec::new();
        let mut applied = 0;
        let mut ignored = 0;
        let mut dead_and_applied = 0;
        let mut optional_applied = 0;
        for (tenant, events) in &tenants {
            let maybe = optional.get(tenant).unwrap_or(&no_optional);
            let maybe_subs: BTreeSet<String> = maybe.keys().map(|id| format!("s-{id}")).collect();
            let live: Vec<Vec<u8>> = events
                .iter()
                .filter(|(id, _)| !dead_ids.contains(id.as_str()))
                .map(|(_, b)| b.clone())
                .collect();
            let dead_subs: BTreeSet<String> = events
                .keys()
                .filter(|id| dead_ids.contains(id.as_str()))
                .map(|id| format!("s-{id}"))
                .collect();
            ignored += events
                .values()
                .filter(|b| crate::worker_harness::effect_of(b).is_none())
                .count();
            let all_rows = dbs.rows(tenant).await.unwrap_or_default();
            dead_and_applied += all_rows
                .iter()
                .filter(|r| dead_subs.contains(&r.id))
                .count();
            let present_optional: Vec<Vec<u8>> = maybe
                .iter()
                .filter(|(id, _)| all_rows.iter().any(|r| r.id == format!("s-{id}")))
                .map(|(_, b)| b.clone())
                .collect();
            optional_applied += present_optional.len();
            let expected = model_of(&[live, present_optional].concat()).identities();
            let rows: Vec<Identity> = all_rows
                .into_iter()
                .filter(|r| !dead_subs.contains(&r.id))
                .collect();
            applied += rows.iter().filter(|r| !maybe_subs.contains(&r.id)).count();
            if rows != expected {
                differences.push(describe_difference(tenant, &expected, &rows));
            }
        }
        if depth == 0 && differences.is_empty() {
            // Dead-lettering is at least once: count each event once.
            let accepted_ids: BTreeSet<&str> = tenants
                .values()
                .flat_map(|events| events.keys().map(String::as_str))
                .collect();
            let mut classes = BTreeMap::new();
            let mut seen = BTreeSet::new();
            for d in &dead {
                let id = d.message_id.as_str();
                if accepted_ids.contains(id) && seen.insert(id) {
                    *classes.entry(d.class.clone()).or_insert(0) += 1;
                }
            }
            break Ledger {
                accepted: tenants.values().map(BTreeMap::len).sum(),
                applied,
                ignored,
                dead: classes,
                dead_and_applied,
                optional_applied,
            };
        }
        if start.elapsed() > deadline {
            panic!(
                "not settled after {deadline:?}: {depth} message(s) still queued; {differences:#?}\ndead letters: {:?}",
                dead.iter()
                    .map(|d| (&d.message_id, &d.class, &d.error))
                    .collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let _ = conn.close(200, "settled".into()).await;
    assert_eq!(
        ledger.applied + ledger.ignored + ledger.dead_total(),
        ledger.accepted,
        "every accepted event is applied, ignored or dead-lettered: {ledger}"
    );
    ledger
}
