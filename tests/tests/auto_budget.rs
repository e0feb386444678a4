//! `AVSYNC_MAX_CONNECTIONS=auto` on the shared PostgreSQL: workers arriving one by one under load
//! share what the server has beyond its other clients and `AVSYNC_PG_FREE_CONNECTIONS`, and the
//! free slots stay free all along.
//!
//! The check compares the server's free slots with what was in use when the test began, so it
//! needs the server to itself: it is ignored by `cargo test --workspace` and runs in the fault
//! suite, alone (`cargo test -p avsync-tests --test auto_budget -- --ignored --test-threads=1`).

use avsync_shared::event::KNOWN_TYPES;
use avsync_shared::topology::Topology;
use avsync_shared::Envelope;
use avsync_tests::faults::observable_events;
use avsync_tests::support::{self, queue_depth, wait_until, TopologyCleanup};
use avsync_tests::worker_harness::{
    effect_of, publish_all, publisher, settings, TestDatabases, TestWorker,
};
use avsync_worker::metrics::{Metrics, Outcome};
use sqlx::{Connection, PgConnection};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::task::AbortOnDropHandle;

const PARTITIONS: u16 = 4;
const TENANTS: usize = 40;
/// What the workers may hold all together: the test leaves the server this many slots beyond
/// what was in use when it began, and asks the workers to leave the rest free.
const FOR_THE_WORKERS: i64 = 12;
/// The `server` label of the shared PostgreSQL.
const SERVER: &str = "127.0.0.1:5432";
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// Samples taken in each stage once its workers hold their shares: some three seconds, so some
/// three looks of each worker.
const STAGE_SAMPLES: usize = 60;

/// One look at the server's client backends.
#[derive(sqlx::FromRow)]
struct Sample {
    /// `max_connections` less the reserved slots.
    slots: i64,
    clients: i64,
    /// Client backends that are not avsync workers'.
    others: i64,
    /// The client backends by application name and state, in the same snapshot: what a failure
    /// shows of the sample that saw the fewest free slots.
    by_name: String,
}

/// What the workers see, and the client backends by name.
async fn sample(conn: &mut PgConnection) -> Sample {
    sqlx::query_as(
        "SELECT current_setting('max_connections')::bigint
                  - current_setting('superuser_reserved_connections')::bigint
                  - coalesce(current_setting('reserved_connections', true)::bigint, 0) AS slots,
                coalesce(sum(n), 0)::bigint AS clients,
                coalesce(sum(n) FILTER (WHERE NOT starts_with(name, 'avsync-worker')), 0)::bigint
                  AS others,
                coalesce(string_agg(format('%s (%s): %s', name, state, n), ', '), '') AS by_name
           FROM (SELECT application_name AS name, coalesce(state, '-') AS state, count(*) AS n
                   FROM pg_stat_activity WHERE backend_type = 'client backend'
                  GROUP BY 1, 2 ORDER BY 1, 2) AS clients",
    )
    .fetch_one(conn)
    .await
    .expect("read the server's slots")
}

/// Per stage: the lowest free slots, the most other clients (not avsync workers) and the
/// samples taken.
#[derive(Debug, Clone)]
struct Stage {
    lowest_free: i64,
    most_others: i64,
    samples: usize,
    /// At the sample with the fewest free slots: the client backends by name, and each running
    /// worker's (budget, sessions) as its own gauges said just after.
    lowest_seen: String,
}

/// The lowest number of free slots (`max_connections` − reserved − client backends) seen in
/// each stage, sampled every [`SAMPLE_EVERY`] on a session of its own until stopped.
struct FreeSlots {
    stage: Arc<AtomicUsize>,
    stages: Arc<Mutex<Vec<Stage>>>,
    /// The metrics of the workers running now.
    workers: Arc<Mutex<Vec<Metrics>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl FreeSlots {
    fn start(mut conn: PgConnection, stages: usize) -> Self {
        let stage = Arc::new(AtomicUsize::new(0));
        let stage_zero = Stage {
            lowest_free: i64::MAX,
            most_others: 0,
            samples: 0,
            lowest_seen: String::new(),
        };
        let all = Arc::new(Mutex::new(vec![stage_zero; stages]));
        let workers = Arc::new(Mutex::new(Vec::<Metrics>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, lo, ws, sp) = (stage.clone(), all.clone(), workers.clone(), stop.clone());
        let task = tokio::spawn(async move {
            while !sp.load(Ordering::SeqCst) {
                let seen = sample(&mut conn).await;
                let held: Vec<(i64, i64)> =
                    ws.lock().unwrap().iter().map(budget_and_sessions).collect();
                let now = st.load(Ordering::SeqCst);
                {
                    let stage = &mut lo.lock().unwrap()[now];
                    let free = seen.slots - seen.clients;
                    if free < stage.lowest_free {
                        stage.lowest_free = free;
                        stage.lowest_seen =
                            format!("{}; workers' (budget, sessions) {held:?}", seen.by_name);
                    }
                    stage.most_others = stage.most_others.max(seen.others);
                    stage.samples += 1;
                }
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
            let _ = conn.close().await;
        });
        Self {
            stage,
            stages: all,
            workers,
            stop,
            task,
        }
    }

    /// The workers running from now on.
    fn running(&self, workers: &[TestWorker]) {
        *self.workers.lock().unwrap() = workers
            .iter()
            .map(|w| w.running().metrics().clone())
            .collect();
    }

    fn enter(&self, stage: usize) {
        self.stage.store(stage, Ordering::SeqCst);
    }

    /// The current stage so far.
    fn now(&self) -> Stage {
        self.stages.lock().unwrap()[self.stage.load(Ordering::SeqCst)].clone()
    }

    async fn finish(self) -> Vec<Stage> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("sampler");
        self.stages.lock().unwrap().clone()
    }
}

/// A worker's budget on the shared server and the sessions it holds there, by its gauges.
fn budget_and_sessions(metrics: &Metrics) -> (i64, i64) {
    let pools = &metrics.tenant_pools;
    (
        pools.connection_budget.with_label_values(&[SERVER]).get(),
        pools.connections.with_label_values(&[SERVER]).get(),
    )
}

fn budget(worker: &TestWorker) -> i64 {
    budget_and_sessions(worker.running().metrics()).0
}

/// Waits until every worker's budget is `share` and it holds that many sessions.
async fn settle(workers: &[TestWorker], share: i64, sampler: &FreeSlots, in_use: i64) {
    let settled = tokio::time::timeout(Duration::from_secs(60), async {
        while !workers
            .iter()
            .all(|w| budget(w) == share && sessions(w) == share)
        {
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    })
    .await;
    if settled.is_err() {
        let seen: Vec<(i64, i64)> = workers.iter().map(|w| (budget(w), sessions(w))).collect();
        panic!(
            "{} worker(s) not at a budget of {share} holding it within 60 s: (budget, sessions) \
             {seen:?}; other clients up to {} in this stage, {in_use} at the start (the test \
             needs the server to itself)",
            workers.len(),
            sampler.now().most_others
        );
    }
}

fn sessions(worker: &TestWorker) -> i64 {
    budget_and_sessions(worker.running().metrics()).1
}

/// Every event type's count of `outcome`, over the workers' metrics.
fn total(counts: &[Metrics], outcome: Outcome) -> u64 {
    counts
        .iter()
        .flat_map(|m| {
            KNOWN_TYPES
                .iter()
                .copied()
                .chain(["other"])
                .map(move |t| m.events_total(t, outcome))
        })
        .sum()
}

/// Workers arrive one at a time (1, 2, 3, 4), then all but one leave, while events of 40 tenants
/// keep coming, each worker wanting far more sessions than its share. With
/// AVSYNC_PG_FREE_CONNECTIONS set so that the workers together may hold 12 sessions (one of them
/// kept for an arriving worker's first session): every worker's budget settles at 11 / workers
/// and it holds that many, the one left grows back to 11, the server's free slots never fall
/// below the target, every event is applied and nothing is dead-lettered.
///
/// Workers arrive here one at a time, each once the others have settled, as the slot kept for an
/// arrival allows: two workers whose first sessions race with a look of a third can each take
/// one session beyond it for up to a second (see the README, Pools).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the shared PostgreSQL to itself: run alone, see the module"]
async fn auto_leaves_the_free_slots_as_workers_arrive() {
    const WORKERS: usize = 4;
    let prefix = support::unique("fauto");
    let _cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let topology = Topology::new(&prefix, PARTITIONS).unwrap();
    let dbs = TestDatabases::new("fauto");
    let tenants: Vec<String> = (0..TENANTS).map(|i| format!("t{i}")).collect();

    let mut sampler_conn = PgConnection::connect(support::PG_ADMIN_URL)
        .await
        .expect("connect the sampler");
    let Sample {
        slots,
        clients: in_use,
        ..
    } = sample(&mut sampler_conn).await;
    let target = slots - in_use - FOR_THE_WORKERS;
    assert!(
        target >= 0,
        "{in_use} client backends of {slots} slots: too busy for this test"
    );
    let free = target.to_string();
    let room = FOR_THE_WORKERS - 1;
    eprintln!("{slots} slots, {in_use} in use: the workers leave {target} free and share {room}");
    // Stages 0..WORKERS: that many workers (plus one) run; then back to one; then the drain.
    let sampler = FreeSlots::start(sampler_conn, WORKERS + 2);

    let (_amqp, ch) = publisher(&topology).await;
    let published = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
    let publishing = Arc::new(AtomicBool::new(true));
    // Aborted if the test fails: it would go on publishing to a topology already deleted.
    let feeder = {
        let (published, publishing) = (published.clone(), publishing.clone());
        let (ch, topology, tenants) = (ch.clone(), topology.clone(), tenants.clone());
        AbortOnDropHandle::new(tokio::spawn(async move {
            let mut wave = 0u64;
            while publishing.load(Ordering::SeqCst) {
                let bodies: Vec<Vec<u8>> = tenants
                    .iter()
                    .enumerate()
                    .flat_map(|(i, t)| observable_events(wave * 1_000 + i as u64, t, 2))
                    .collect();
                publish_all(&ch, &topology, &bodies).await;
                published.lock().unwrap().extend(bodies);
                wave += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }))
    };

    let started = Instant::now();
    let mut workers: Vec<TestWorker> = Vec::new();
    // The counts of the workers that stopped, beside those still running.
    let mut counts: Vec<Metrics> = Vec::new();
    for n in 1..=WORKERS {
        sampler.enter(n - 1);
        workers.push(
            TestWorker::start(settings(
                &prefix,
                PARTITIONS,
                &dbs,
                &[
                    "--max-connections",
                    "auto",
                    "--pg-free-connections",
                    &free,
                    "--prefetch",
                    "256",
                ],
            ))
            .await,
        );
        sampler.running(&workers);
        let share = room / n as i64;
        settle(&workers, share, &sampler, in_use).await;
        eprintln!(
            "{n} worker(s): each at a budget of {share} after {:?}",
            started.elapsed()
        );
        // The stage runs on for a while, its workers sizing themselves again every second.
        let samples = sampler.now().samples + STAGE_SAMPLES;
        wait_until("the stage sampled", Duration::from_secs(30), || async {
            (sampler.now().samples >= samples).then_some(())
        })
        .await;
    }

    // Then all but the first stop: it grows back into their shares.
    sampler.enter(WORKERS);
    for worker in workers.drain(1..) {
        counts.push(worker.running().metrics().clone());
        worker.stop().await;
    }
    sampler.running(&workers);
    settle(&workers, room, &sampler, in_use).await;
    eprintln!(
        "back to 1 worker: at a budget of {room} after {:?}",
        started.elapsed()
    );

    sampler.enter(WORKERS + 1);
    publishing.store(false, Ordering::SeqCst);
    feeder.await.expect("feeder");
    let published = published.lock().unwrap().clone();
    let settled = published.len() as u64;
    counts.push(workers[0].running().metrics().clone());
    wait_until("every event settled", Duration::from_secs(120), || async {
        let done = total(&counts, Outcome::Applied) + total(&counts, Outcome::Ignored);
        (done >= settled).then_some(())
    })
    .await;
    eprintln!("drained after {:?}", started.elapsed());
    let stages = sampler.finish().await;
    for (stage, seen) in stages.iter().enumerate() {
        let when = match stage {
            s if s < WORKERS => format!("with {} worker(s)", s + 1),
            s if s == WORKERS => "back to 1 worker".to_owned(),
            _ => "while the last events drained".to_owned(),
        };
        eprintln!(
            "lowest free slots {when}: {} (target {target}; other clients at most {}, {in_use} at the start); then: {}",
            seen.lowest_free, seen.most_others, seen.lowest_seen
        );
    }
    for (stage, seen) in stages.iter().enumerate() {
        assert!(
            seen.lowest_free >= target,
            "free slots fell to {} in stage {stage}, below the {target} the workers leave free \
             (other clients: {in_use} at the start, up to {} then; the test needs the server to itself); \
             client backends then: {}",
            seen.lowest_free,
            seen.most_others,
            seen.lowest_seen
        );
    }

    assert_eq!(total(&counts, Outcome::DeadLettered), 0);
    assert_eq!(queue_depth(&ch, &topology.dead_queue()).await, Some(0));
    eprintln!(
        "{} events, {} applied, {} retried",
        published.len(),
        total(&counts, Outcome::Applied),
        total(&counts, Outcome::Retried)
    );
    // Each event that sets something leaves a row of its own (see `observable_events`).
    let mut expected: BTreeMap<String, usize> = BTreeMap::new();
    for body in published.iter().filter(|b| effect_of(b).is_some()) {
        let envelope = Envelope::decode(body).expect("an envelope");
        *expected.entry(envelope.tenant_id.to_string()).or_default() += 1;
    }
    for tenant in &tenants {
        let rows = dbs.rows(tenant).await.map_or(0, |r| r.len());
        assert_eq!(rows, expected[tenant], "rows of tenant {tenant}");
    }
    eprintln!("rows checked after {:?}", started.elapsed());
    for worker in workers {
        worker.stop().await;
    }
    eprintln!("stopped after {:?}", started.elapsed());
    dbs.drop_all().await;
    eprintln!("dropped after {:?}", started.elapsed());
}
