//! Each event type against a fresh migrated database, checked against contract section 6; the
//! schema against section 5; the real SQL against the model over random shuffled histories; and
//! racing migrations.

use avsync_shared::event::EventTime;
use avsync_tests::worker_harness::{
    effect_of, model_of, random_history, shuffled_with_duplicates, TestDatabases,
};
use avsync_worker::apply::{self, Identity};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection, Row};
use std::collections::BTreeMap;

fn body(id: &str, event_type: &str, timestamp: &str, data: Value) -> Vec<u8> {
    json!({"id": id, "type": event_type, "tenant_id": "acme", "timestamp": timestamp,
           "application_id": "app", "data": data})
    .to_string()
    .into_bytes()
}

async fn apply_body(conn: &mut PgConnection, body: &[u8]) {
    let effect = effect_of(body).expect("the event sets something");
    apply::apply(conn, &effect).await.expect("apply");
}

async fn row(conn: &mut PgConnection, sub: &str) -> Identity {
    apply::load(conn, sub)
        .await
        .expect("load")
        .expect("row exists")
}

fn s(v: &str) -> Option<String> {
    Some(v.to_owned())
}

fn at(ts: &str) -> DateTime<Utc> {
    EventTime::parse(ts).unwrap().to_utc()
}

const T1: &str = "2026-08-21T01:00:00.000Z";
const T2: &str = "2026-08-21T02:00:00.000Z";
const T3: &str = "2026-08-21T03:00:00.000Z";

fn fresh(id: &str) -> Identity {
    Identity {
        tenant_id: s("acme"),
        ..Identity::new(id)
    }
}

#[tokio::test]
async fn subject_created_sets_present_fields_only() {
    let dbs = TestDatabases::new("wapply");
    let mut conn = dbs.migrated("a").await;
    apply_body(
        &mut conn,
        &body(
            "e1",
            "subject.created",
            T1,
            json!({"sub": "u1", "email": "jane@acme.test", "given_name": "", "family_name": null,
                   "subject_type": "user", "unknown": {"x": 1}}),
        ),
    )
    .await;
    assert_eq!(
        row(&mut conn, "u1").await,
        Identity {
            email: s("jane@acme.test"),
            subject_type: s("user"),
            ..fresh("u1")
        }
    );
    // The columns no event sets keep their defaults.
    let r = sqlx::query("SELECT username, email_verified, phone_verified, groups, created_at <= updated_at AS ordered FROM av_identities WHERE id = 'u1'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(r.get::<Option<String>, _>("username"), None);
    assert!(!r.get::<bool, _>("email_verified"));
    assert!(!r.get::<bool, _>("phone_verified"));
    assert!(r.get::<Vec<String>, _>("groups").is_empty());
    assert!(r.get::<bool, _>("ordered"));
}

#[tokio::test]
async fn subject_updated_with_and_without_changed_fields() {
    let dbs = TestDatabases::new("wapply");
    let mut conn = dbs.migrated("a").await;
    let created = json!({"sub": "u1", "email": "a@x", "given_name": "Ann", "family_name": "Lee"});
    apply_body(&mut conn, &body("e1", "subject.created", T1, created)).await;

    // Listed: explicit null clears, "" sets nothing, unlisted fields are untouched even if sent.
    apply_body(
        &mut conn,
        &body(
            "e2",
            "subject.updated",
            T2,
            json!({"sub": "u1", "changed_fields": ["email", "given_name"], "email": null,
                   "given_name": "", "family_name": "Other"}),
        ),
    )
    .await;
    let r = row(&mut conn, "u1").await;
    assert_eq!(
        (r.email, r.given_name, r.family_name),
        (None, s("Ann"), s("Lee"))
    );

    // Without changed_fields: every profile field present; null and "" set nothing.
    apply_body(
        &mut conn,
        &body(
            "e3",
            "subject.updated",
            T3,
            json!({"sub": "u1", "email": "new@x", "given_name": null, "family_name": ""}),
        ),
    )
    .await;
    let r = row(&mut conn, "u1").await;
    assert_eq!(
        (r.email, r.given_name, r.family_name),
        (s("new@x"), s("Ann"), s("Lee"))
    );

    // An empty changed_fields counts as absent.
    apply_body(
        &mut conn,
        &body(
            "e4",
            "subject.updated",
            "2026-08-21T04:00:00Z",
            json!({"sub": "u1", "changed_fields": [], "family_name": "Kim", "email": null}),
        ),
    )
    .await;
    let r = row(&mut conn, "u1").await;
    assert_eq!(
        (r.email, r.given_name, r.family_name),
        (s("new@x"), s("Ann"), s("Kim"))
    );

    // An update arriving before the create still creates the row.
    apply_body(
        &mut conn,
        &body(
            "e5",
            "subject.updated",
            T1,
            json!({"sub": "u2", "changed_fields": ["email"], "email": "b@x"}),
        ),
    )
    .await;
    assert_eq!(
        row(&mut conn, "u2").await,
        Identity {
            email: s("b@x"),
            ..fresh("u2")
        }
    );
}

#[tokio::test]
async fn deletion_is_a_tombstone_only_a_newer_create_lifts() {
    let dbs = TestDatabases::new("wapply");
    let mut conn = dbs.migrated("a").await;
    apply_body(
        &mut conn,
        &body(
            "d",
            "subject.deleted",
            T2,
            json!({"sub": "u1", "email": "x@y"}),
        ),
    )
    .await;
    assert_eq!(
        row(&mut conn, "u1").await,
        Identity {
            deleted_at: Some(at(T2)),
            ..fresh("u1")
        }
    );
    // Late create and late update: still deleted (the update's profile change still lands).
    apply_body(
        &mut conn,
        &body(
            "c",
            "subject.created",
            T1,
            json!({"sub": "u1", "email": "old@x"}),
        ),
    )
    .await;
    apply_body(
        &mut conn,
        &body(
            "u",
            "subject.updated",
            T1,
            json!({"sub": "u1", "given_name": "G"}),
        ),
    )
    .await;
    let r = row(&mut conn, "u1").await;
    assert_eq!(r.deleted_at, Some(at(T2)));
    assert_eq!(r.given_name, s("G"));
    // A create newer than the delete revives.
    apply_body(
        &mut conn,
        &body("c2", "subject.created", T3, json!({"sub": "u1"})),
    )
    .await;
    assert_eq!(row(&mut conn, "u1").await.deleted_at, None);

    apply_body(
        &mut conn,
        &body("x", "subject.deactivated", T3, json!({"sub": "u3"})),
    )
    .await;
    assert_eq!(
        row(&mut conn, "u3").await,
        Identity {
            is_active: false,
            ..fresh("u3")
        }
    );
}

#[tokio::test]
async fn member_events() {
    let dbs = TestDatabases::new("wapply");
    let mut conn = dbs.migrated("a").await;
    apply_body(
        &mut conn,
        &body(
            "j",
            "member.joined",
            T1,
            json!({"sub": "u1", "membership_id": "m1", "tenant_roles": ["owner", "admin"],
                   "email": "a@x", "given_name": "", "family_name": null}),
        ),
    )
    .await;
    assert_eq!(
        row(&mut conn, "u1").await,
        Identity {
            membership_id: s("m1"),
            membership_status: s("active"),
            tenant_roles: vec!["owner".into(), "admin".into()],
            email: s("a@x"),
            ..fresh("u1")
        }
    );
    apply_body(
        &mut conn,
        &body(
            "r",
            "member.role_changed",
            T2,
            json!({"sub": "u1", "tenant_roles": "admin"}),
        ),
    )
    .await;
    assert!(row(&mut conn, "u1").await.tenant_roles.is_empty());
    apply_body(
        &mut conn,
        &body(
            "r2",
            "member.role_changed",
            "2026-08-21T02:30:00Z",
            json!({"sub": "u1", "tenant_roles": ["member"]}),
        ),
    )
    .await;
    assert_eq!(row(&mut conn, "u1").await.tenant_roles, vec!["member"]);
    apply_body(
        &mut conn,
        &body("s", "member.suspended", T3, json!({"sub": "u1"})),
    )
    .await;
    assert_eq!(row(&mut conn, "u1").await.membership_status, s("suspended"));
    apply_body(
        &mut conn,
        &body(
            "a",
            "member.activated",
            "2026-08-21T04:00:00Z",
            json!({"sub": "u1"}),
        ),
    )
    .await;
    assert_eq!(row(&mut conn, "u1").await.membership_status, s("active"));
    apply_body(
        &mut conn,
        &body(
            "l",
            "member.left",
            "2026-08-21T05:00:00Z",
            json!({"sub": "u1", "membership_id": "m9", "tenant_roles": ["x"]}),
        ),
    )
    .await;
    let r = row(&mut conn, "u1").await;
    assert_eq!(r.membership_status, s("left"));
    assert!(r.tenant_roles.is_empty());
    assert_eq!(
        r.membership_id,
        s("m1"),
        "member.left keeps the membership id"
    );
    // A joined older than the left, arriving late, changes nothing it shares with the left.
    apply_body(
        &mut conn,
        &body(
            "j0",
            "member.joined",
            T1,
            json!({"sub": "u1", "tenant_roles": ["late"]}),
        ),
    )
    .await;
    let r = row(&mut conn, "u1").await;
    assert_eq!(r.membership_status, s("left"));
    assert!(r.tenant_roles.is_empty());
}

#[tokio::test]
async fn app_access_events() {
    let dbs = TestDatabases::new("wapply");
    let mut conn = dbs.migrated("a").await;
    apply_body(
        &mut conn,
        &body(
            "g",
            "app_access.granted",
            T1,
            json!({"sub": "u1", "role_slug": "admin", "role_id": "r1", "role_name": "",
                   "given_name": "Ann"}),
        ),
    )
    .await;
    assert_eq!(
        row(&mut conn, "u1").await,
        Identity {
            has_app_access: true,
            app_role: s("admin"),
            app_role_id: s("r1"),
            given_name: s("Ann"),
            ..fresh("u1")
        }
    );
    apply_body(
        &mut conn,
        &body(
            "c",
            "app_access.role_changed",
            T2,
            json!({"sub": "u1", "role_slug": "viewer", "role_id": "", "role_name": "Viewer"}),
        ),
    )
    .await;
    let r = row(&mut conn, "u1").await;
    assert_eq!(
        (r.app_role, r.app_role_id, r.app_role_name),
        (s("viewer"), s("r1"), s("Viewer"))
    );
    apply_body(
        &mut conn,
        &body("v", "app_access.revoked", T3, json!({"sub": "u1"})),
    )
    .await;
    // A grant older than the revoke, redelivered late, never undoes it.
    apply_body(
        &mut conn,
        &body(
            "g0",
            "app_access.granted",
            T2,
            json!({"sub": "u1", "role_slug": "admin"}),
        ),
    )
    .await;
    let r = row(&mut conn, "u1").await;
    assert!(!r.has_app_access);
    assert_eq!(
        (r.app_role, r.app_role_id, r.app_role_name),
        (None, None, None)
    );
    assert_eq!(r.given_name, s("Ann"));
}

#[tokio::test]
async fn invite_accepted_sets_present_profile_fields() {
    let dbs = TestDatabases::new("wapply");
    let mut conn = dbs.migrated("a").await;
    apply_body(
        &mut conn,
        &body(
            "i",
            "invite.accepted",
            T1,
            json!({"sub": "u1", "invite_id": "i1", "email": "a@x", "given_name": "", "family_name": "Lee",
                   "tenant_roles": ["owner"]}),
        ),
    )
    .await;
    assert_eq!(
        row(&mut conn, "u1").await,
        Identity {
            email: s("a@x"),
            family_name: s("Lee"),
            ..fresh("u1")
        }
    );
}

#[tokio::test]
async fn ties_are_broken_by_id_bytewise() {
    let dbs = TestDatabases::new("wapply");
    let mut conn = dbs.migrated("a").await;
    // Same instant, written in two offsets; "B" < "a" bytewise, so "a" wins whatever the order.
    let a = body(
        "a",
        "subject.updated",
        "2026-08-21T03:00:00.000+02:00",
        json!({"sub": "u1", "email": "from-a"}),
    );
    let b = body(
        "B",
        "subject.updated",
        "2026-08-21T01:00:00.000Z",
        json!({"sub": "u1", "email": "from-B"}),
    );
    apply_body(&mut conn, &a).await;
    apply_body(&mut conn, &b).await;
    assert_eq!(row(&mut conn, "u1").await.email, s("from-a"));
    let dbs2 = TestDatabases::new("wapply");
    let mut conn2 = dbs2.migrated("a").await;
    apply_body(&mut conn2, &b).await;
    apply_body(&mut conn2, &a).await;
    assert_eq!(row(&mut conn2, "u1").await.email, s("from-a"));
}

async fn stamps(conn: &mut PgConnection, sub: &str) -> (DateTime<Utc>, DateTime<Utc>) {
    sqlx::query_as("SELECT updated_at, synced_at FROM av_identities WHERE id = $1")
        .bind(sub)
        .fetch_one(conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_redelivery_changes_nothing_but_synced_at() {
    let dbs = TestDatabases::new("wapply");
    let mut conn = dbs.migrated("a").await;
    let joined = body(
        "j",
        "member.joined",
        T2,
        json!({"sub": "u1", "tenant_roles": ["a"]}),
    );
    apply_body(&mut conn, &joined).await;
    let before = row(&mut conn, "u1").await;
    let (updated, synced) = stamps(&mut conn, "u1").await;

    // now() is the transaction start: later statements see a later now().
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    apply_body(&mut conn, &joined).await;
    // An older event that would change values changes nothing either.
    apply_body(
        &mut conn,
        &body(
            "old",
            "member.role_changed",
            T1,
            json!({"sub": "u1", "tenant_roles": ["b"]}),
        ),
    )
    .await;
    assert_eq!(row(&mut conn, "u1").await, before);
    let (updated2, synced2) = stamps(&mut conn, "u1").await;
    assert_eq!(
        updated2, updated,
        "updated_at moves only when a value changes"
    );
    assert!(synced2 > synced, "synced_at moves on every applied event");

    // A newer event that sets the same value: synced, not updated.
    apply_body(
        &mut conn,
        &body("same", "member.activated", T3, json!({"sub": "u1"})),
    )
    .await;
    assert_eq!(stamps(&mut conn, "u1").await.0, updated);
    apply_body(
        &mut conn,
        &body(
            "new",
            "member.suspended",
            "2026-08-21T04:00:00Z",
            json!({"sub": "u1"}),
        ),
    )
    .await;
    assert!(stamps(&mut conn, "u1").await.0 > updated);
}

#[tokio::test]
async fn the_schema_is_the_contracts() {
    let dbs = TestDatabases::new("wapply");
    let mut conn = dbs.migrated("a").await;
    let columns: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT column_name::text, udt_name::text, is_nullable::text, column_default::text
         FROM information_schema.columns WHERE table_name = 'av_identities' ORDER BY column_name",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let got: BTreeMap<String, (String, String, Option<String>)> = columns
        .into_iter()
        .map(|(n, t, null, d)| (n, (t, null, d)))
        .collect();
    let text_null = ("text", "YES", None);
    let mut want: BTreeMap<&str, (&str, &str, Option<&str>)> = BTreeMap::new();
    for c in [
        "email",
        "given_name",
        "family_name",
        "subject_type",
        "tenant_id",
        "membership_id",
        "membership_status",
        "app_role",
        "app_role_id",
        "app_role_name",
        "username",
        "display_name",
        "middle_name",
        "nickname",
        "picture_url",
        "website",
        "gender",
        "birthdate",
        "zoneinfo",
        "locale",
        "phone",
    ] {
        want.insert(c, text_null);
    }
    want.insert("id", ("text", "NO", None));
    want.insert("tenant_roles", ("_text", "NO", Some("'{}'::text[]")));
    want.insert("groups", ("_text", "NO", Some("'{}'::text[]")));
    want.insert("has_app_access", ("bool", "NO", Some("false")));
    want.insert("is_active", ("bool", "NO", Some("true")));
    want.insert("email_verified", ("bool", "NO", Some("false")));
    want.insert("phone_verified", ("bool", "NO", Some("false")));
    want.insert("deleted_at", ("timestamptz", "YES", None));
    for c in ["created_at", "updated_at", "synced_at"] {
        want.insert(c, ("timestamptz", "NO", Some("now()")));
    }
    want.insert("field_versions", ("jsonb", "NO", Some("'{}'::jsonb")));
    let want: BTreeMap<String, (String, String, Option<String>)> = want
        .into_iter()
        .map(|(k, (t, n, d))| {
            (
                k.to_owned(),
                (t.to_owned(), n.to_owned(), d.map(str::to_owned)),
            )
        })
        .collect();
    assert_eq!(got, want);

    let unique: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE tablename = 'av_identities'
         AND indexdef LIKE 'CREATE UNIQUE%'",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(unique, vec!["av_identities_pkey"]);
}

/// The real SQL equals the model for random histories applied shuffled with duplicates, from one
/// connection and from four racing connections.
#[tokio::test]
async fn random_histories_applied_shuffled_equal_the_model() {
    let dbs = TestDatabases::new("wprop");
    for seed in 0..12u64 {
        let bodies = random_history(seed, "acme", 4, 60);
        let arrived = shuffled_with_duplicates(seed, &bodies, 30);
        let model = model_of(&bodies);
        let name = format!("s{seed}");
        let mut conn = dbs.migrated(&name).await;
        if seed % 2 == 0 {
            for b in &arrived {
                if let Some(e) = effect_of(b) {
                    apply::apply(&mut conn, &e).await.expect("apply");
                }
            }
        } else {
            let url = avsync_tests::support::database_url(&dbs.name(&name));
            let mut tasks = Vec::new();
            for lane in 0..4usize {
                let mine: Vec<Vec<u8>> = arrived
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i % 4 == lane)
                    .map(|(_, b)| b.clone())
                    .collect();
                let url = url.clone();
                tasks.push(tokio::spawn(async move {
                    let mut c = PgConnection::connect(&url).await.expect("connect");
                    for b in &mine {
                        if let Some(e) = effect_of(b) {
                            apply::apply(&mut c, &e).await.expect("apply");
                        }
                    }
                    let _ = c.close().await;
                }));
            }
            for t in tasks {
                t.await.expect("lane");
            }
        }
        assert_eq!(
            apply::load_all(&mut conn).await.unwrap(),
            model.identities(),
            "seed {seed}"
        );
        for identity in model.identities() {
            let stored: sqlx::types::Json<BTreeMap<String, String>> =
                sqlx::query_scalar("SELECT field_versions FROM av_identities WHERE id = $1")
                    .bind(&identity.id)
                    .fetch_one(&mut conn)
                    .await
                    .unwrap();
            assert_eq!(stored.0, model.versions(&identity.id), "seed {seed}");
        }
        let _ = conn.close().await;
        avsync_tests::support::drop_database(&dbs.name(&name)).await;
    }
}

/// sqlx's migrator takes an advisory lock: workers racing on a new database all succeed and
/// the schema is applied once.
#[tokio::test]
async fn racing_migrations_of_one_new_database_all_succeed() {
    let dbs = TestDatabases::new("wmig");
    let name = dbs.name("race");
    avsync_tests::support::create_database(&name).await;
    let url = avsync_tests::support::database_url(&name);
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut conn = PgConnection::connect(&url).await.expect("connect");
                avsync_worker::tenant_db::provision::migrator()
                    .run_direct(&mut conn)
                    .await
                    .expect("migrate");
                let _ = conn.close().await;
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let mut conn = dbs.connect(&name).await;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        applied,
        avsync_worker::tenant_db::provision::migrator()
            .iter()
            .count() as i64
    );
    let _ = conn.close().await;
}
