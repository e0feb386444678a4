//! The broker closes the processes' connections, as on a node restart or an operator's
//! `rabbitmqctl close_connection`: the ingress and the worker notice, are not ready while they
//! cannot reconnect, recover by themselves, and no event that got a 202 is lost.
//!
//! Each test runs in a RabbitMQ vhost of its own, named by its topology prefix. Only connections
//! whose name holds that prefix are closed, and clearing the vhost's permissions keeps the
//! processes from reconnecting for a moment without touching any other test. A sender posts
//! throughout and, as AuthVital does, retries every 503.

use avsync_tests::ingress_harness::{self, TestIngress};
use avsync_tests::support::{self, wait_until};
use avsync_tests::worker_harness::{
    model_of, publish_all, random_history, settings, TestDatabases, TestWorker,
};
use lapin::{Connection, ConnectionProperties};
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;

const PARTITIONS: u16 = 2;
const TENANTS: [&str; 2] = ["acme", "bolt"];

async fn rabbitmqctl(args: &[&str]) -> String {
    let out = tokio::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .await
        .expect("rabbitmqctl (installed with RabbitMQ)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A vhost of this test's own, deleted (with every queue in it) when dropped.
struct Vhost {
    name: String,
}

impl Vhost {
    async fn create(name: &str) -> Vhost {
        rabbitmqctl(&["add_vhost", name]).await;
        let vhost = Vhost {
            name: name.to_owned(),
        };
        vhost.allow().await;
        vhost
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.name)
    }

    /// New connections to the vhost are refused; open ones go on.
    async fn deny(&self) {
        rabbitmqctl(&["clear_permissions", "-p", &self.name, "guest"]).await;
    }

    async fn allow(&self) {
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &self.name,
            "guest",
            ".*",
            ".*",
            ".*",
        ])
        .await;
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let deleted = std::process::Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.name])
            .output();
        if !deleted.is_ok_and(|o| o.status.success()) {
            eprintln!("could not delete vhost {}", self.name);
        }
    }
}

/// The broker's id and client-given name of every open connection whose name holds `prefix`.
async fn connections_of(prefix: &str) -> Vec<(String, String)> {
    rabbitmqctl(&["list_connections", "pid", "client_properties"])
        .await
        .lines()
        .filter_map(|line| {
            let (pid, properties) = line.split_once('\t')?;
            let (_, rest) = properties.split_once("{\"connection_name\",\"")?;
            let (name, _) = rest.split_once('"')?;
            name.contains(prefix)
                .then(|| (pid.to_owned(), name.to_owned()))
        })
        .collect()
}

/// Closes, from the broker's side, every connection whose name holds `prefix`; returns their
/// names. Never any other connection: other tests share the broker.
async fn close_connections_of(prefix: &str) -> Vec<(String, String)> {
    let found = connections_of(prefix).await;
    futures_util::future::join_all(found.iter().map(|(pid, _)| async move {
        rabbitmqctl(&["close_connection", pid, "broker_cut test closes it"]).await
    }))
    .await;
    found
}

fn joined(tenant: &str, n: usize) -> Vec<u8> {
    json!({
        "id": format!("cut-{tenant}-{n}"),
        "type": "member.joined",
        "timestamp": "2026-08-21T01:00:00.000Z",
        "tenant_id": tenant,
        "application_id": "app_test",
        "data": {"sub": format!("u{n}"), "email": format!("u{n}@{tenant}.test"), "tenant_roles": ["member"]},
    })
    .to_string()
    .into_bytes()
}

/// Posts events one after another until stopped, retrying each 503 as AuthVital does.
struct Sender {
    accepted: Arc<Mutex<Vec<Vec<u8>>>>,
    unavailable: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Sender {
    fn start(ingress: Arc<TestIngress>) -> Sender {
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let unavailable = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, u, s) = (accepted.clone(), unavailable.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut n = 0;
            while !s.load(Ordering::SeqCst) {
                let body = joined(TENANTS[n % TENANTS.len()], n);
                loop {
                    match ingress.post(&body).await.status().as_u16() {
                        202 => break,
                        503 => {
                            u.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        other => panic!("the ingress answered {other} to a valid event"),
                    }
                }
                a.lock().unwrap().push(body);
                n += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Sender {
            accepted,
            unavailable,
            stop,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.lock().unwrap().len()
    }

    async fn wait_for_more(&self, more: usize) {
        let target = self.accepted() + more;
        wait_until("more events accepted", Duration::from_secs(30), || async {
            (self.accepted() >= target).then_some(())
        })
        .await;
    }

    /// Stops after the event in hand is accepted; returns every accepted body.
    async fn stop(self) -> (Vec<Vec<u8>>, usize) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("sender task");
        let accepted = self.accepted.lock().unwrap().clone();
        (accepted, self.unavailable.load(Ordering::SeqCst))
    }
}

struct Stack {
    vhost: Vhost,
    dbs: TestDatabases,
    ingress: Arc<TestIngress>,
    worker: TestWorker,
}

async fn start(prefix: &str) -> Stack {
    let vhost = Vhost::create(prefix).await;
    let dbs = TestDatabases::new("cut");
    let secret = ingress_harness::new_whsec_secret();
    let mut ingress_settings = ingress_harness::settings(prefix, PARTITIONS, &secret);
    ingress_settings.common.amqp_url = vhost.url();
    let ingress = TestIngress::start_with(ingress_settings, None).await;
    ingress.wait_ready().await;
    let url = vhost.url();
    let worker = TestWorker::start(settings(prefix, PARTITIONS, &dbs, &["--amqp-url", &url])).await;
    Stack {
        vhost,
        dbs,
        ingress: Arc::new(ingress),
        worker,
    }
}

impl Stack {
    async fn readyz(&self) -> (u16, u16) {
        (
            self.ingress.readyz().await,
            self.worker.status("/readyz").await,
        )
    }

    /// Every accepted event is applied, none was dead-lettered, and both stop cleanly.
    async fn finish(self, accepted: &[Vec<u8>]) {
        for tenant in TENANTS {
            let bodies: Vec<Vec<u8>> = accepted
                .iter()
                .filter(|b| {
                    let needle = format!("\"tenant_id\":\"{tenant}\"");
                    String::from_utf8_lossy(b).contains(&needle)
                })
                .cloned()
                .collect();
            self.dbs
                .wait_for_rows(
                    tenant,
                    &model_of(&bodies).identities(),
                    Duration::from_secs(60),
                )
                .await;
        }
        let conn = Connection::connect(&self.vhost.url(), ConnectionProperties::default())
            .await
            .expect("connect to the test's vhost");
        let ch = conn.create_channel().await.expect("channel");
        let topology = avsync_shared::Topology::new(self.vhost.name.as_str(), PARTITIONS).unwrap();
        assert_eq!(
            support::queue_depth(&ch, &topology.dead_queue()).await,
            Some(0),
            "nothing was dead-lettered"
        );
        let _ = conn.close(200, "checked".into()).await;
        self.worker.stop().await;
        match Arc::try_unwrap(self.ingress) {
            Ok(ingress) => ingress.stop().await,
            Err(_) => panic!("the sender still holds the ingress"),
        }
    }
}

/// Connections closed by the broker while it refuses new ones: both processes report not ready
/// for as long as that lasts, then come back by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_recover_by_themselves_and_no_accepted_event_is_lost() {
    let prefix = support::unique("cut");
    let stack = start(&prefix).await;
    assert_eq!(stack.readyz().await, (200, 200));
    let sender = Sender::start(stack.ingress.clone());
    sender.wait_for_more(20).await;

    stack.vhost.deny().await;
    let closed = close_connections_of(&prefix).await;
    let names: Vec<&str> = closed.iter().map(|(_, n)| n.as_str()).collect();
    assert!(
        names.contains(&format!("avsync-ingress@{prefix}").as_str()),
        "{names:?}"
    );
    assert!(
        names.contains(&format!("avsync-worker {prefix}").as_str()),
        "{names:?}"
    );
    wait_until(
        "both /readyz non-200 while the broker refuses them",
        Duration::from_secs(20),
        || async {
            let (ingress, worker) = stack.readyz().await;
            (ingress != 200 && worker != 200).then_some(())
        },
    )
    .await;
    let during = sender.unavailable.load(Ordering::SeqCst);
    wait_until(
        "the sender to be answered 503 while the ingress is not ready",
        Duration::from_secs(20),
        || async { (sender.unavailable.load(Ordering::SeqCst) > during).then_some(()) },
    )
    .await;

    stack.vhost.allow().await;
    wait_until(
        "both /readyz 200 again",
        Duration::from_secs(60),
        || async { (stack.readyz().await == (200, 200)).then_some(()) },
    )
    .await;
    let reconnected = connections_of(&prefix).await;
    assert!(
        reconnected
            .iter()
            .all(|(pid, _)| closed.iter().all(|(old, _)| old != pid)),
        "only new connections: {reconnected:?} after closing {closed:?}"
    );
    let text = stack.worker.metrics_text().await;
    assert!(text.contains("\navsync_worker_ready 1\n"), "{text}");
    let text = stack.ingress.metrics().await;
    assert!(text.contains("\navsync_ingress_ready 1\n"), "{text}");

    sender.wait_for_more(20).await;
    let (accepted, unavailable) = sender.stop().await;
    assert!(unavailable > 0);
    stack.finish(&accepted).await;
}

/// Connections closed twice in a row under a steady stream, reconnecting at once each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_cuts_under_load_lose_nothing() {
    let prefix = support::unique("cut");
    let stack = start(&prefix).await;
    let sender = Sender::start(stack.ingress.clone());
    for _ in 0..2 {
        sender.wait_for_more(20).await;
        let closed = close_connections_of(&prefix).await;
        assert!(closed.len() >= 2, "{closed:?}");
        wait_until(
            "new connections, both ready",
            Duration::from_secs(30),
            || async {
                let now = connections_of(&prefix).await;
                let renewed = closed
                    .iter()
                    .all(|(pid, name)| now.iter().any(|(p, n)| n == name && p != pid));
                (renewed && stack.readyz().await == (200, 200)).then_some(())
            },
        )
        .await;
    }
    sender.wait_for_more(20).await;
    let (accepted, _) = sender.stop().await;
    stack.finish(&accepted).await;
}

/// A tenant whose table is locked gets a burst of events in the one partition it shares with a
/// neighbour: the worker sets the burst aside, its acks gathered into `multiple` acks, and the
/// broker closes the worker's connection while it does. The neighbour's events are applied
/// while the lock holds, and once it goes every event of the stuck tenant is applied: nothing
/// was acked that was not set aside, and nothing was dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_set_aside_in_bulk_under_a_cut_loses_nothing() {
    const ONE_PARTITION: u16 = 1;
    let prefix = support::unique("bulk");
    let vhost = Vhost::create(&prefix).await;
    let dbs = TestDatabases::new("bulk");
    let url = vhost.url();
    let worker = TestWorker::start(settings(
        &prefix,
        ONE_PARTITION,
        &dbs,
        &["--amqp-url", &url, "--prefetch", "1000"],
    ))
    .await;
    let topology = avsync_shared::Topology::new(&prefix, ONE_PARTITION).unwrap();
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("connect to the test's vhost");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .expect("confirms");

    let mut stuck_db = dbs.migrated("stuck").await;
    let mut lock = sqlx::Connection::begin(&mut stuck_db).await.expect("begin");
    sqlx::query("LOCK TABLE av_identities IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock the stuck tenant's table");
    let burst = random_history(41, "stuck", 200, 3_000);
    let neighbour = random_history(42, "calm", 20, 100);
    publish_all(&ch, &topology, &burst).await;
    publish_all(&ch, &topology, &neighbour).await;

    let metrics = worker.running().metrics().clone();
    let set_aside = || {
        avsync_worker::metrics::SetAsideReason::ALL
            .iter()
            .map(|r| metrics.set_aside_total(*r))
            .sum::<u64>()
    };
    wait_until(
        "the burst set aside, runs of it acked together",
        Duration::from_secs(30),
        || async { (set_aside() >= 1_000 && metrics.acks.in_runs().1 > 0).then_some(()) },
    )
    .await;
    let closed = close_connections_of(&prefix).await;
    assert!(
        closed
            .iter()
            .any(|(_, name)| name == &format!("avsync-worker {prefix}")),
        "{closed:?}"
    );
    let before = set_aside();
    wait_until(
        "setting aside again after the cut",
        Duration::from_secs(30),
        || async { (set_aside() > before + 500).then_some(()) },
    )
    .await;
    dbs.wait_for_rows(
        "calm",
        &model_of(&neighbour).identities(),
        Duration::from_secs(30),
    )
    .await;
    let (in_runs, runs) = metrics.acks.in_runs();
    assert!(
        in_runs >= 2 * runs,
        "runs of acks averaged fewer than two messages: {in_runs} in {runs}"
    );

    lock.commit().await.expect("release the lock");
    dbs.wait_for_rows(
        "stuck",
        &model_of(&burst).identities(),
        Duration::from_secs(90),
    )
    .await;
    assert_eq!(
        support::queue_depth(&ch, &topology.dead_queue()).await,
        Some(0),
        "nothing was dead-lettered"
    );
    let _ = sqlx::Connection::close(stuck_db).await;
    let _ = conn.close(200, "checked".into()).await;
    worker.stop().await;
}
