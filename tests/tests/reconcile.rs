//! `avsync-worker reconcile` and its schedule against a fake AuthVital (axum on a random port)
//! and the real PostgreSQL: backfill, drift repair, guard rails, `--dry-run`, two reconciles at
//! once, and the periodic schedule inside `run`.

use avsync_shared::event::{Effect, EventTime};
use avsync_shared::TenantId;
use avsync_tests::fake_authvital::{FakeAuthVital, FakeMember, APPLICATION_ID, CLIENT_SECRET};
use avsync_tests::support::{delete_topology, unique};
use avsync_tests::worker_harness::{
    effect_of, random_history, settings, TestDatabases, TestWorker,
};
use avsync_worker::apply::{self, Identity, Model};
use avsync_worker::metrics::{ReconcileMetrics, RunOutcome};
use avsync_worker::ops::authvital::{MemberStatus, Membership, Role, User};
use avsync_worker::ops::reconcile::{plan, LeftBound, Mode};
use avsync_worker::ops::reconcile_cli::{self, ReconcileArgs};
use avsync_worker::settings::Settings;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sqlx::{Connection as _, PgConnection};
use std::time::Duration;

const TENANT: &str = "acme";
const USERS: [&str; 5] = ["u1", "u2", "u3", "u4", "u5"];
/// A departure guard that never refuses: the model comparisons are about the fold, not the guard.
const NO_BOUND: LeftBound = LeftBound {
    max_percent: 100,
    max_count: 0,
};

fn reconcile_settings(dbs: &TestDatabases, fake: &FakeAuthVital, extra: &[&str]) -> Settings {
    // The fake's flags come in pairs; a flag of `extra` replaces the fake's.
    let mut flags: Vec<String> = fake
        .flags()
        .chunks(2)
        .filter(|pair| !extra.contains(&pair[0].as_str()))
        .flatten()
        .cloned()
        .collect();
    flags.extend(extra.iter().map(|s| (*s).to_owned()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    settings(&unique("rc"), 1, dbs, &flags)
}

#[derive(Default, Clone, Copy)]
struct Flags {
    dry_run: bool,
    force: bool,
}

/// Runs the command for one tenant (or `--all`), with `--json` or not: its result and its output.
async fn run_command(
    settings: &Settings,
    tenant: Option<&str>,
    flags: Flags,
    json: bool,
) -> (anyhow::Result<()>, String) {
    let args = ReconcileArgs {
        tenant: tenant.map(str::to_owned),
        all: tenant.is_none(),
        dry_run: flags.dry_run,
        json,
        force: flags.force,
    };
    let mut out = Vec::new();
    let checked = settings.clone().check().expect("usable worker settings");
    let result = reconcile_cli::run(&args, &checked, &mut out).await;
    (result, String::from_utf8(out).expect("utf-8"))
}

/// Runs the command for one tenant (or `--all`) with `--json`: its result and its reports.
async fn reconcile(
    settings: &Settings,
    tenant: Option<&str>,
    flags: Flags,
) -> (anyhow::Result<()>, Vec<Value>) {
    let (result, out) = run_command(settings, tenant, flags, true).await;
    let reports = out
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    (result, reports)
}

/// A member's row as a snapshot of [`FakeMember::active`] makes it.
fn listed_row(user: &str) -> Identity {
    Identity {
        tenant_id: Some(TENANT.to_owned()),
        email: Some(format!("{user}@example.com")),
        given_name: Some(format!("Given {user}")),
        membership_id: Some(format!("mem-{user}")),
        membership_status: Some("active".to_owned()),
        has_app_access: true,
        app_role: Some("viewer".to_owned()),
        app_role_id: Some("role-viewer".to_owned()),
        app_role_name: Some("VIEWER".to_owned()),
        ..Identity::new(user)
    }
}

async fn rows(conn: &mut PgConnection) -> Vec<Identity> {
    apply::load_all(conn).await.expect("rows")
}

async fn versions(conn: &mut PgConnection) -> Vec<String> {
    sqlx::query_scalar("SELECT field_versions::text FROM av_identities ORDER BY id")
        .fetch_all(conn)
        .await
        .expect("versions")
}

fn webhook(id: &str, event_type: &str, timestamp: &str, data: Value) -> Vec<u8> {
    json!({
        "id": id, "type": event_type, "tenant_id": TENANT, "timestamp": timestamp,
        "application_id": APPLICATION_ID, "data": data,
    })
    .to_string()
    .into_bytes()
}

/// Five members made by webhooks of the past, as a snapshot of [`FakeMember::active`] would
/// also say, plus a revoke of u5's access far in the future (newer than any snapshot).
async fn rows_made_by_webhooks(conn: &mut PgConnection) {
    let mut bodies = Vec::new();
    for user in USERS {
        bodies.push(webhook(
            &format!("joined-{user}"),
            "member.joined",
            "2026-08-21T01:00:00Z",
            json!({"sub": user, "membership_id": format!("mem-{user}"), "tenant_roles": ["member"],
                   "email": format!("{user}@example.com"), "given_name": format!("Given {user}")}),
        ));
        bodies.push(webhook(
            &format!("granted-{user}"),
            "app_access.granted",
            "2026-08-21T01:00:01Z",
            json!({"sub": user, "role_slug": "viewer", "role_id": "role-viewer", "role_name": "VIEWER"}),
        ));
    }
    bodies.push(webhook(
        "revoked-u5",
        "app_access.revoked",
        "2099-01-01T00:00:00Z",
        json!({"sub": "u5"}),
    ));
    let effects: Vec<_> = bodies.iter().filter_map(|b| effect_of(b)).collect();
    apply::apply_batch(conn, &effects)
        .await
        .expect("webhooks apply");
}

/// The fake's view after drift: u1 renamed, u2 removed, u3 suspended, u4's app role taken away.
fn drifted() -> Vec<FakeMember> {
    let mut u1 = FakeMember::active("u1");
    u1.given_name = Some("Renamed".to_owned());
    let mut u3 = FakeMember::active("u3");
    u3.status = "SUSPENDED";
    let mut u4 = FakeMember::active("u4");
    u4.roles.push(("boss".to_owned(), "another_app".to_owned()));
    u4.roles.retain(|(_, app)| app != APPLICATION_ID);
    vec![u1, u3, u4, FakeMember::active("u5")]
}

/// The rows after one reconcile of [`drifted`] over [`rows_made_by_webhooks`].
fn repaired() -> Vec<Identity> {
    let with_roles = |user| Identity {
        tenant_roles: vec!["member".to_owned()],
        ..listed_row(user)
    };
    vec![
        Identity {
            given_name: Some("Renamed".to_owned()),
            ..with_roles("u1")
        },
        Identity {
            membership_status: Some("left".to_owned()),
            has_app_access: false,
            app_role: None,
            app_role_id: None,
            app_role_name: None,
            ..with_roles("u2")
        },
        Identity {
            membership_status: Some("suspended".to_owned()),
            ..with_roles("u3")
        },
        Identity {
            has_app_access: false,
            app_role: None,
            app_role_id: None,
            app_role_name: None,
            ..with_roles("u4")
        },
        // The revoke is newer than the snapshot: the snapshot's role does not undo it.
        Identity {
            has_app_access: false,
            app_role: None,
            app_role_id: None,
            app_role_name: None,
            ..with_roles("u5")
        },
    ]
}

#[tokio::test]
async fn backfill_creates_every_member_of_an_empty_tenant() {
    let dbs = TestDatabases::new("rcfill");
    let fake = FakeAuthVital::start().await;
    let mut suspended = FakeMember::active("u4");
    suspended.status = "SUSPENDED";
    suspended.roles.clear();
    let mut invited = FakeMember::active("u5");
    invited.status = "INVITED";
    fake.set_members(
        TENANT,
        vec![
            FakeMember::active("u1"),
            FakeMember::active("u2"),
            FakeMember::active("u3"),
            suspended,
            invited,
        ],
    );
    // AuthVital's quirks on the way: a 429 with Retry-After, then a 500.
    fake.rate_limit_next(1);
    fake.fail_next(1);
    let settings = reconcile_settings(&dbs, &fake, &[]);

    let (result, reports) = reconcile(&settings, Some(TENANT), Flags::default()).await;
    result.expect("backfill succeeds");
    assert_eq!(reports.len(), 1);
    let report = &reports[0];
    assert_eq!(report["outcome"], "applied", "{report}");
    assert_eq!(report["listed"], 4);
    assert_eq!(report["created"], 4);
    assert_eq!(fake.membership_requests(), 3, "429, 500, then the answer");
    assert_eq!(fake.basic_auth_requests(), 0, "client_secret_post only");
    assert_eq!(fake.requests_without_roles(), 0, "includeRoles=true always");

    let mut conn = dbs.connect(&dbs.name(TENANT)).await;
    let mut expected: Vec<Identity> = ["u1", "u2", "u3"].map(listed_row).to_vec();
    expected.push(Identity {
        membership_status: Some("suspended".to_owned()),
        has_app_access: false,
        app_role: None,
        app_role_id: None,
        app_role_name: None,
        ..listed_row("u4")
    });
    assert_eq!(
        rows(&mut conn).await,
        expected,
        "the invited member is not created"
    );

    // A second reconcile finds nothing to do.
    let (result, reports) = reconcile(&settings, Some(TENANT), Flags::default()).await;
    result.expect("second reconcile");
    assert_eq!(reports[0]["unchanged"], 4, "{}", reports[0]);
    assert_eq!(reports[0]["created"], 0);
    let _ = conn.close().await;
    dbs.drop_all().await;
}

#[tokio::test]
async fn one_reconcile_repairs_drift_and_never_deletes_rows() {
    let dbs = TestDatabases::new("rcdrift");
    let fake = FakeAuthVital::start().await;
    let mut conn = dbs.migrated(TENANT).await;
    rows_made_by_webhooks(&mut conn).await;
    fake.set_members(TENANT, drifted());
    let settings = reconcile_settings(&dbs, &fake, &[]);

    let (result, reports) = reconcile(&settings, Some(TENANT), Flags::default()).await;
    result.expect("reconcile");
    let report = &reports[0];
    assert_eq!(report["outcome"], "applied", "{report}");
    assert_eq!(report["created"], 0);
    assert_eq!(report["changed"], 3, "{report}");
    assert_eq!(report["marked_left"], 1);
    assert_eq!(report["unchanged"], 1);
    assert_eq!(report["changed_fields"]["given_name"], 1);
    assert_eq!(report["changed_fields"]["membership_status"], 2);
    assert_eq!(rows(&mut conn).await, repaired());

    // Again: nothing more to repair, and still every row.
    let (result, reports) = reconcile(&settings, Some(TENANT), Flags::default()).await;
    result.expect("second reconcile");
    assert_eq!(reports[0]["unchanged"], 5, "{}", reports[0]);
    assert_eq!(rows(&mut conn).await, repaired());

    // A webhook newer than the snapshots wins again: the user rejoined.
    let rejoined = webhook(
        "rejoined-u2",
        "member.joined",
        "2099-01-01T00:00:00Z",
        json!({"sub": "u2", "membership_id": "mem-u2b"}),
    );
    let effect = effect_of(&rejoined).expect("sets something");
    apply::apply(&mut conn, &effect).await.expect("apply");
    let (result, _) = reconcile(&settings, Some(TENANT), Flags::default()).await;
    result.expect("third reconcile");
    let u2 = apply::load(&mut conn, "u2")
        .await
        .expect("load")
        .expect("row");
    assert_eq!(u2.membership_status.as_deref(), Some("active"));
    let _ = conn.close().await;
    dbs.drop_all().await;
}

#[tokio::test]
async fn guard_rails_refuse_and_force_overrides() {
    let dbs = TestDatabases::new("rcguard");
    let fake = FakeAuthVital::start().await;
    let mut conn = dbs.migrated(TENANT).await;
    rows_made_by_webhooks(&mut conn).await;
    let before = rows(&mut conn).await;
    let before_versions = versions(&mut conn).await;
    let settings = reconcile_settings(&dbs, &fake, &[]);

    let refused = |reports: &[Value]| {
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0]["outcome"], "refused", "{}", reports[0]);
        reports[0]["refusals"].clone()
    };

    fake.set_members(TENANT, vec![]);
    let (result, reports) = reconcile(&settings, Some(TENANT), Flags::default()).await;
    assert!(result.is_err(), "a refusal exits non-zero");
    assert_eq!(
        refused(&reports),
        json!([{"rule": "empty_snapshot", "active_in_db": 5}])
    );

    let roleless: Vec<FakeMember> = USERS
        .iter()
        .map(|u| FakeMember {
            roles: vec![],
            ..FakeMember::active(u)
        })
        .collect();
    fake.set_members(TENANT, roleless);
    let (result, reports) = reconcile(&settings, Some(TENANT), Flags::default()).await;
    assert!(result.is_err());
    assert_eq!(
        refused(&reports),
        json!([{"rule": "no_roles", "listed": 5, "with_app_role_in_db": 4}])
    );

    // Two of five is 40 %: over the share, but the default count (10) lets it pass, so the
    // share is tested with a count of 1.
    let three: Vec<FakeMember> = ["u1", "u2", "u3"].map(FakeMember::active).to_vec();
    fake.set_members(TENANT, three);
    let strict = reconcile_settings(&dbs, &fake, &["--reconcile-max-left", "1"]);
    let (result, reports) = reconcile(&strict, Some(TENANT), Flags::default()).await;
    assert!(result.is_err());
    assert_eq!(
        refused(&reports),
        json!([{"rule": "too_many_left", "flipping": 2, "active_in_db": 5, "max_percent": 20, "max_left": 1}])
    );
    assert_eq!(rows(&mut conn).await, before, "a refusal writes nothing");
    assert_eq!(versions(&mut conn).await, before_versions);

    // Both bounds are settings.
    let lenient = reconcile_settings(
        &dbs,
        &fake,
        &[
            "--reconcile-max-left-percent",
            "40",
            "--reconcile-max-left",
            "1",
        ],
    );
    let (result, reports) = reconcile(
        &lenient,
        Some(TENANT),
        Flags {
            dry_run: true,
            force: false,
        },
    )
    .await;
    result.expect("within 40%");
    assert_eq!(reports[0]["outcome"], "dry_run");

    let (result, reports) = reconcile(
        &strict,
        Some(TENANT),
        Flags {
            dry_run: false,
            force: true,
        },
    )
    .await;
    result.expect("--force applies");
    assert_eq!(reports[0]["outcome"], "applied", "{}", reports[0]);
    assert_eq!(reports[0]["marked_left"], 2);
    let left: Vec<String> = rows(&mut conn)
        .await
        .into_iter()
        .filter(|r| r.membership_status.as_deref() == Some("left"))
        .map(|r| r.id)
        .collect();
    assert_eq!(left, ["u4", "u5"]);
    assert_eq!(rows(&mut conn).await.len(), 5, "rows are never deleted");
    let _ = conn.close().await;
    dbs.drop_all().await;
}

#[tokio::test]
async fn authvital_refusals_name_what_to_fix() {
    let dbs = TestDatabases::new("rcdeny");
    let fake = FakeAuthVital::start().await;
    let mut conn = dbs.migrated("nogrant").await;
    let settings = reconcile_settings(&dbs, &fake, &[]);

    let (result, reports) = reconcile(&settings, Some("nogrant"), Flags::default()).await;
    assert!(result.is_err());
    assert_eq!(reports[0]["outcome"], "failed");
    let error = reports[0]["error"].as_str().expect("error text");
    assert!(
        error.contains("403") && error.contains("tenant grant"),
        "{error}"
    );

    let wrong_secret = "not-the-secret-xyz";
    let bad = reconcile_settings(&dbs, &fake, &["--authvital-client-secret", wrong_secret]);
    let (result, reports) = reconcile(&bad, Some("nogrant"), Flags::default()).await;
    assert!(result.is_err());
    let error = reports[0]["error"].as_str().expect("error text");
    assert!(error.contains("AVSYNC_AUTHVITAL_CLIENT_SECRET"), "{error}");
    assert!(!error.contains(wrong_secret) && !error.contains(CLIENT_SECRET));
    assert!(rows(&mut conn).await.is_empty());
    let _ = conn.close().await;
    dbs.drop_all().await;
}

/// `n` active members `m00`, `m01`, …
fn members(n: usize) -> Vec<FakeMember> {
    (0..n)
        .map(|i| FakeMember::active(&format!("m{i:02}")))
        .collect()
}

fn left_rows(rows: &[Identity]) -> usize {
    rows.iter()
        .filter(|r| r.membership_status.as_deref() == Some("left"))
        .count()
}

/// A tenant whose `n` active members (`m00`, …) a reconcile at the default settings created.
async fn backfilled(
    name: &str,
    n: usize,
) -> (TestDatabases, FakeAuthVital, PgConnection, Settings) {
    let dbs = TestDatabases::new(name);
    let fake = FakeAuthVital::start().await;
    let conn = dbs.migrated(TENANT).await;
    let settings = reconcile_settings(&dbs, &fake, &[]);
    fake.set_members(TENANT, members(n));
    let (result, _) = reconcile(&settings, Some(TENANT), Flags::default()).await;
    result.expect("backfill");
    (dbs, fake, conn, settings)
}

#[tokio::test]
async fn a_small_tenants_routine_departure_passes_the_guard_at_the_defaults() {
    let (dbs, fake, mut conn, settings) = backfilled("rcsmall", 3).await;
    // One of three leaves: 33 %, over the 20 % share, but not over 10 members.
    fake.set_members(TENANT, members(2));
    let (result, reports) = reconcile(&settings, Some(TENANT), Flags::default()).await;
    result.expect("one departure of three is applied");
    assert_eq!(reports[0]["outcome"], "applied", "{}", reports[0]);
    assert_eq!(reports[0]["marked_left"], 1);
    assert_eq!(reports[0]["refusals"], json!([]));
    assert_eq!(left_rows(&rows(&mut conn).await), 1);
    let _ = conn.close().await;
    dbs.drop_all().await;
}

#[tokio::test]
async fn a_departure_over_both_bounds_is_refused_and_dry_run_names_the_guard() {
    let (dbs, fake, mut conn, settings) = backfilled("rcmass", 15).await;
    let before = rows(&mut conn).await;

    // Twelve of fifteen leave: 80 % and 12, over both 20 % and 10.
    fake.set_members(TENANT, members(3));
    let dry = Flags {
        dry_run: true,
        force: false,
    };
    let (result, text) = run_command(&settings, Some(TENANT), dry, false).await;
    assert!(
        result.is_err(),
        "a refusal exits non-zero, also in a dry run"
    );
    println!("{text}");
    assert!(
        text.contains(
            "would be refused by too many left: 12 of 15 active members would become left"
        ),
        "{text}"
    );
    assert!(
        text.contains("AVSYNC_RECONCILE_MAX_LEFT_PERCENT=20%")
            && text.contains("AVSYNC_RECONCILE_MAX_LEFT=10"),
        "{text}"
    );

    let (result, reports) = reconcile(&settings, Some(TENANT), Flags::default()).await;
    assert!(result.is_err());
    assert_eq!(reports[0]["outcome"], "refused");
    assert_eq!(
        reports[0]["refusals"],
        json!([{"rule": "too_many_left", "flipping": 12, "active_in_db": 15, "max_percent": 20, "max_left": 10}])
    );
    assert_eq!(rows(&mut conn).await, before, "a refusal writes nothing");

    // The empty-snapshot guard stays, whatever the bounds.
    fake.set_members(TENANT, vec![]);
    let (result, text) = run_command(&settings, Some(TENANT), dry, false).await;
    assert!(result.is_err());
    assert!(
        text.contains(
            "would be refused by empty snapshot: AuthVital lists no member, the database has 15 active"
        ),
        "{text}"
    );
    assert_eq!(rows(&mut conn).await, before);
    let _ = conn.close().await;
    dbs.drop_all().await;
}

#[tokio::test]
async fn dry_run_reports_and_writes_nothing() {
    let dbs = TestDatabases::new("rcdry");
    let fake = FakeAuthVital::start().await;
    let mut conn = dbs.migrated(TENANT).await;
    rows_made_by_webhooks(&mut conn).await;
    let before = rows(&mut conn).await;
    let before_versions = versions(&mut conn).await;
    fake.set_members(TENANT, drifted());
    let settings = reconcile_settings(&dbs, &fake, &[]);

    let dry = Flags {
        dry_run: true,
        force: false,
    };
    let (result, reports) = reconcile(&settings, Some(TENANT), dry).await;
    result.expect("dry run");
    let report = &reports[0];
    assert_eq!(report["outcome"], "dry_run");
    assert_eq!(report["changed"], 3, "{report}");
    assert_eq!(report["marked_left"], 1);
    assert_eq!(rows(&mut conn).await, before);
    assert_eq!(versions(&mut conn).await, before_versions);
    let _ = conn.close().await;
    dbs.drop_all().await;
}

#[tokio::test]
async fn two_reconciles_of_one_tenant_at_once_run_one() {
    let dbs = TestDatabases::new("rctwo");
    let fake = FakeAuthVital::start().await;
    let mut conn = dbs.migrated(TENANT).await;
    rows_made_by_webhooks(&mut conn).await;
    fake.set_members(TENANT, drifted());
    fake.set_delay(Duration::from_millis(1500));
    let settings = reconcile_settings(&dbs, &fake, &[]);

    let ((a, reports_a), (b, reports_b)) = tokio::join!(
        reconcile(&settings, Some(TENANT), Flags::default()),
        reconcile(&settings, Some(TENANT), Flags::default()),
    );
    a.expect("first");
    b.expect("second");
    let mut outcomes = vec![
        reports_a[0]["outcome"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        reports_b[0]["outcome"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    ];
    outcomes.sort();
    assert_eq!(outcomes, ["applied", "busy"]);
    assert_eq!(
        fake.membership_requests(),
        1,
        "the busy one never asked AuthVital"
    );
    assert_eq!(rows(&mut conn).await, repaired());
    let _ = conn.close().await;
    dbs.drop_all().await;
}

#[tokio::test]
async fn all_reconciles_every_tenant_database_with_one_token() {
    let dbs = TestDatabases::new("rcall");
    let fake = FakeAuthVital::start().await;
    let mut a = dbs.migrated("ta").await;
    let mut b = dbs.migrated("tb").await;
    fake.set_members("ta", vec![FakeMember::active("u1")]);
    fake.set_members(
        "tb",
        vec![FakeMember::active("u2"), FakeMember::active("u3")],
    );
    let settings = reconcile_settings(&dbs, &fake, &[]);

    let (result, reports) = reconcile(&settings, None, Flags::default()).await;
    result.expect("--all");
    let tenants: Vec<&str> = reports
        .iter()
        .filter_map(|r| r["tenant"].as_str())
        .collect();
    assert_eq!(tenants, ["ta", "tb"]);
    assert_eq!(fake.token_requests(), 1, "the token is cached");
    assert_eq!(rows(&mut a).await.len(), 1);
    assert_eq!(rows(&mut b).await.len(), 2);
    let _ = a.close().await;
    let _ = b.close().await;
    dbs.drop_all().await;
}

#[tokio::test]
async fn the_schedule_reconciles_every_tenant_and_stops_on_shutdown() {
    let dbs = TestDatabases::new("rcsched");
    let fake = FakeAuthVital::start().await;
    let conn = dbs.migrated(TENANT).await;
    let _ = conn.close().await;
    fake.set_members(
        TENANT,
        vec![FakeMember::active("u1"), FakeMember::active("u2")],
    );
    let settings = reconcile_settings(&dbs, &fake, &["--reconcile-interval", "1s"]);
    let prefix = settings.common.topology.clone();

    let worker = TestWorker::start(settings).await;
    dbs.wait_for_rows(
        TENANT,
        &["u1", "u2"].map(listed_row),
        Duration::from_secs(20),
    )
    .await;
    // Drift is repaired on a later round.
    let mut renamed = FakeMember::active("u2");
    renamed.given_name = Some("Renamed".to_owned());
    fake.set_members(TENANT, vec![FakeMember::active("u1"), renamed]);
    let expected = vec![
        listed_row("u1"),
        Identity {
            given_name: Some("Renamed".to_owned()),
            ..listed_row("u2")
        },
    ];
    dbs.wait_for_rows(TENANT, &expected, Duration::from_secs(20))
        .await;
    let reconcile = &worker.running().metrics().reconcile;
    assert!(reconcile.runs_total(RunOutcome::Applied) >= 2);
    let text = worker.metrics_text().await;
    assert!(text.contains("avsync_worker_reconcile_runs_total{outcome=\"refused\"} 0"));
    assert!(text.contains("avsync_worker_authvital_requests_total{status=\"2xx\"}"));
    worker.stop().await;
    delete_topology(&prefix, 1, &[]).await;
    dbs.drop_all().await;
}

#[tokio::test]
async fn the_schedule_skips_a_tenant_another_worker_just_reconciled() {
    let dbs = TestDatabases::new("rcdue");
    let fake = FakeAuthVital::start().await;
    let mut conn = dbs.migrated(TENANT).await;
    fake.set_members(TENANT, vec![FakeMember::active("u1")]);
    let settings = reconcile_settings(&dbs, &fake, &[]);
    let metrics = ReconcileMetrics::register(&prometheus::Registry::new()).expect("metrics");
    let reconciler = reconcile_cli::reconciler(&settings, metrics.clone()).expect("reconciler");
    let tenant = TenantId::parse(TENANT).expect("tenant id");
    let scheduled = Mode {
        not_within: Some(Duration::from_secs(3600)),
        ..Mode::default()
    };

    let first = reconciler.reconcile(&mut conn, &tenant, scheduled).await;
    assert_eq!(first.outcome, "applied", "{first}");
    let second = reconciler.reconcile(&mut conn, &tenant, scheduled).await;
    assert_eq!(second.outcome, "not_due", "{second}");
    assert_eq!(fake.membership_requests(), 1);
    assert_eq!(metrics.runs_total(RunOutcome::NotDue), 1);
    // The command is never "not due".
    let third = reconciler
        .reconcile(&mut conn, &tenant, Mode::default())
        .await;
    assert_eq!(third.outcome, "applied", "{third}");
    let _ = conn.close().await;
    dbs.drop_all().await;
}

/// Random members of `users` users as a snapshot lists them: some absent, some invited or
/// suspended, with or without a role of the application.
fn random_snapshot(rng: &mut StdRng, users: usize) -> Vec<Membership> {
    let listed: Vec<usize> = (0..users).filter(|_| rng.random_bool(0.7)).collect();
    listed
        .into_iter()
        .map(|u| {
            let status = [
                MemberStatus::Active,
                MemberStatus::Suspended,
                MemberStatus::Invited,
            ][rng.random_range(0..3)];
            let roles = (0..rng.random_range(0..3))
                .map(|r| Role {
                    id: format!("role-{r}"),
                    name: Some(format!("Role {r}")),
                    slug: Some(["admin", "viewer"][r % 2].to_owned()),
                    application_id: Some(
                        [APPLICATION_ID, "another_app"][rng.random_range(0..2)].to_owned(),
                    ),
                })
                .collect();
            Membership {
                id: format!("mem-{u}-{}", rng.random_range(0..2)),
                status,
                user: User {
                    id: format!("user{u}"),
                    email: [None, Some(String::new()), Some(format!("s{u}@x"))]
                        [rng.random_range(0..3)]
                    .clone(),
                    given_name: Some(format!("Snap {}", rng.random_range(0..2))),
                    family_name: None,
                },
                roles,
            }
        })
        .collect()
}

/// Over real SQL, a few random cases: webhooks and snapshots (with instants among the events')
/// arriving in random order end exactly where the model does (whose order-insensitivity the
/// worker's property test shows), versions included.
#[tokio::test]
async fn random_webhooks_and_snapshots_in_random_order_match_the_model_in_sql() {
    let dbs = TestDatabases::new("rcprop");
    let mut conn = dbs.migrated(TENANT).await;
    let tenant = TenantId::parse(TENANT).expect("tenant id");
    const USERS_N: usize = 4;
    for seed in 0..8u64 {
        sqlx::query("TRUNCATE av_identities")
            .execute(&mut conn)
            .await
            .expect("truncate");
        let mut rng = StdRng::seed_from_u64(seed);
        let bodies = random_history(seed, TENANT, USERS_N, 30);
        let mut arrivals: Vec<Result<Effect, (EventTime, Vec<Membership>)>> =
            bodies.iter().filter_map(|b| effect_of(b)).map(Ok).collect();
        for _ in 0..3 {
            let ms: i64 = rng.random_range(0..16);
            let at = EventTime::from_micros((1_787_276_403_000 + ms) * 1_000).expect("time");
            arrivals.push(Err((at, random_snapshot(&mut rng, USERS_N))));
        }
        arrivals.shuffle(&mut rng);

        let mut model = Model::default();
        for arrival in &arrivals {
            match arrival {
                Ok(effect) => {
                    model.apply(effect);
                    apply::apply(&mut conn, effect).await.expect("apply");
                }
                Err((at, members)) => {
                    let expected = plan(
                        &tenant,
                        Some(APPLICATION_ID),
                        members,
                        *at,
                        model.stored_rows(),
                        NO_BOUND,
                    );
                    for e in &expected.effects {
                        model.apply_versioned(&e.sub, &e.version, &e.changes);
                    }
                    let stored = apply::load_tenant(&mut conn, TENANT).await.expect("load");
                    let p = plan(
                        &tenant,
                        Some(APPLICATION_ID),
                        members,
                        *at,
                        stored,
                        NO_BOUND,
                    );
                    assert_eq!(
                        p.counts, expected.counts,
                        "seed {seed}: the database and the model agree before"
                    );
                    apply::apply_versioned(&mut conn, &p.effects)
                        .await
                        .expect("apply snapshot");
                }
            }
        }
        assert_eq!(rows(&mut conn).await, model.identities(), "seed {seed}");
        for row in model.identities() {
            let stored: String =
                sqlx::query_scalar("SELECT field_versions::text FROM av_identities WHERE id = $1")
                    .bind(&row.id)
                    .fetch_one(&mut conn)
                    .await
                    .expect("versions");
            let stored: std::collections::BTreeMap<String, String> =
                serde_json::from_str(&stored).expect("json");
            assert_eq!(stored, model.versions(&row.id), "seed {seed}, {}", row.id);
        }
    }
    let _ = conn.close().await;
    dbs.drop_all().await;
}

#[tokio::test]
async fn with_app_access_ignored_the_app_fields_stay_as_webhooks_set_them() {
    let dbs = TestDatabases::new("rcnoapp");
    let fake = FakeAuthVital::start().await;
    let mut conn = dbs.migrated(TENANT).await;
    rows_made_by_webhooks(&mut conn).await;
    let before = rows(&mut conn).await;
    fake.set_members(TENANT, drifted());
    let settings = reconcile_settings(&dbs, &fake, &["--reconcile-app-access", "ignore"]);

    let (result, reports) = reconcile(&settings, Some(TENANT), Flags::default()).await;
    result.expect("reconcile");
    assert_eq!(reports[0]["outcome"], "applied", "{}", reports[0]);
    let after = rows(&mut conn).await;
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(
            (
                old.has_app_access,
                &old.app_role,
                &old.app_role_id,
                &old.app_role_name
            ),
            (
                new.has_app_access,
                &new.app_role,
                &new.app_role_id,
                &new.app_role_name
            ),
            "{}",
            old.id
        );
    }
    let statuses: Vec<Option<&str>> = after
        .iter()
        .map(|r| r.membership_status.as_deref())
        .collect();
    assert_eq!(
        statuses,
        [
            Some("active"),
            Some("left"),
            Some("suspended"),
            Some("active"),
            Some("active")
        ]
    );
    let _ = conn.close().await;
    dbs.drop_all().await;
}
