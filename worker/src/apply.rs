//! Applying an event to its row, and THE INVARIANT of contract section 6: for every row and every
//! field, the stored value is the one set by the greatest event (by timestamp, then id bytewise)
//! that set that field, whatever the arrival order and however many duplicates.
//!
//! Each field carries its own version: the [`EventKey`] of the event that last set it, stored as
//! text in `field_versions` whose bytewise order is the key order. An event overwrites a field
//! only when its key is greater than that field's version. Taking the maximum per field is
//! commutative and idempotent, so any order and any number of redeliveries give the same row.
//!
//! [`Model`] is the same rule in plain Rust (the property tests check it against shuffled,
//! duplicated histories); [`apply_batch`] is the rule as one SQL statement for many events of one
//! tenant, tested against the model, and [`apply`] one event as a batch of one.
//!
//! A reconcile snapshot sets fields under the same rule with a version of its own
//! ([`snapshot_version`]), written by [`apply_versioned`]: it wins over older events, loses to
//! newer ones, and loses a tie to an event of the same instant.

use avsync_shared::event::{Change, Effect, EventKey, EventTime, Field};
use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The columns of `av_identities` that events set, as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Identity {
    pub id: String,
    pub tenant_id: Option<String>,
    pub email: Option<String>,
    pub given_name: Option<String>,
    pub family_name: Option<String>,
    pub subject_type: Option<String>,
    pub is_active: bool,
    pub deleted_at: Option<DateTime<Utc>>,
    pub membership_id: Option<String>,
    pub membership_status: Option<String>,
    pub tenant_roles: Vec<String>,
    pub has_app_access: bool,
    pub app_role: Option<String>,
    pub app_role_id: Option<String>,
    pub app_role_name: Option<String>,
}

const IDENTITY_COLUMNS: &str = "id, tenant_id, email, given_name, family_name, subject_type, \
     is_active, deleted_at, membership_id, membership_status, tenant_roles, has_app_access, \
     app_role, app_role_id, app_role_name";

impl Identity {
    /// A row as the table's defaults create it.
    pub fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            tenant_id: None,
            email: None,
            given_name: None,
            family_name: None,
            subject_type: None,
            is_active: true,
            deleted_at: None,
            membership_id: None,
            membership_status: None,
            tenant_roles: Vec::new(),
            has_app_access: false,
            app_role: None,
            app_role_id: None,
            app_role_name: None,
        }
    }

    fn set(&mut self, change: &Change) {
        match change {
            Change::TenantId(v) => self.tenant_id = Some(v.as_str().to_owned()),
            Change::Email(v) => self.email.clone_from(v),
            Change::GivenName(v) => self.given_name.clone_from(v),
            Change::FamilyName(v) => self.family_name.clone_from(v),
            Change::SubjectType(v) => self.subject_type = Some(v.clone()),
            Change::IsActive(v) => self.is_active = *v,
            Change::DeletedAt(v) => self.deleted_at = v.map(|t| t.to_utc()),
            Change::MembershipId(v) => self.membership_id = Some(v.clone()),
            Change::MembershipStatus(v) => self.membership_status = Some(v.as_str().to_owned()),
            Change::TenantRoles(v) => self.tenant_roles.clone_from(v),
            Change::HasAppAccess(v) => self.has_app_access = *v,
            Change::AppRole(v) => self.app_role.clone_from(v),
            Change::AppRoleId(v) => self.app_role_id.clone_from(v),
            Change::AppRoleName(v) => self.app_role_name.clone_from(v),
        }
    }
}

/// What separates a snapshot's instant from the rest of its version. It sorts below the `|` of
/// [`EventKey::version`], and the instant's text has a fixed width, so bytewise: a snapshot is
/// newer than every event of an earlier instant, older than every event of a later one, and
/// older than every event of the same instant (a tie goes to the webhook), whatever its id.
const SNAPSHOT_MARK: &str = "!reconcile";

/// The version of the fields a reconcile snapshot taken at `time` sets.
pub fn snapshot_version(time: EventTime) -> String {
    format!("{time}{SNAPSHOT_MARK}")
}

/// The field whose column (and key in `field_versions`) is `column`.
pub fn field_of_column(column: &str) -> Option<Field> {
    Field::ALL.into_iter().find(|f| f.column() == column)
}

/// The pure model of one tenant database: rows and, per field, the version (as stored) of the
/// event or snapshot that set it. Versions compare bytewise, as `COLLATE "C"` does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    rows: BTreeMap<String, (Identity, BTreeMap<Field, String>)>,
}

impl Model {
    pub fn apply(&mut self, effect: &Effect) {
        self.apply_versioned(&effect.sub, &effect.key.version(), &effect.changes);
    }

    /// Sets each of `changes` on the row of `sub` where `version` is greater than that field's.
    pub fn apply_versioned(&mut self, sub: &str, version: &str, changes: &[Change]) {
        let (row, versions) = self
            .rows
            .entry(sub.to_owned())
            .or_insert_with(|| (Identity::new(sub), BTreeMap::new()));
        for change in changes {
            let field = change.field();
            if versions.get(&field).is_none_or(|v| version > v.as_str()) {
                row.set(change);
                versions.insert(field, version.to_owned());
            }
        }
    }

    /// Every row with its versions, as [`load_tenant`] reads them from the database.
    pub fn stored_rows(&self) -> Vec<Stored> {
        self.rows
            .values()
            .map(|(identity, versions)| Stored {
                identity: identity.clone(),
                versions: versions.clone(),
            })
            .collect()
    }

    /// A row as the database holds it, with its versions.
    pub fn insert_stored(&mut self, stored: Stored) {
        self.rows.insert(
            stored.identity.id.clone(),
            (stored.identity, stored.versions),
        );
    }

    /// Every row, ordered by id.
    pub fn identities(&self) -> Vec<Identity> {
        self.rows.values().map(|(row, _)| row.clone()).collect()
    }

    pub fn get(&self, sub: &str) -> Option<&Identity> {
        self.rows.get(sub).map(|(row, _)| row)
    }

    /// The stored `field_versions` the model predicts for a row.
    pub fn versions(&self, sub: &str) -> BTreeMap<String, String> {
        self.rows
            .get(sub)
            .map(|(_, versions)| {
                versions
                    .iter()
                    .map(|(field, version)| (field.column().to_owned(), version.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Applies one event to its row: a batch of one, so under the one statement of [`apply_batch`].
pub async fn apply(conn: &mut PgConnection, effect: &Effect) -> Result<(), sqlx::Error> {
    apply_batch(conn, std::iter::once(effect)).await
}

/// Per field (indexed like [`Field::ALL`]), the greatest event of a batch that set it and what it set.
type Merged<'a> = [Option<(&'a EventKey, &'a Change)>; Field::ALL.len()];

/// Per field, the version to store and the change to make.
type Versions<'a> = [Option<(String, &'a Change)>; Field::ALL.len()];

/// Merges a batch under the rule of [`Model::apply`]: per user and field, the change of the
/// greatest event that set it. Users come out ordered by id, so that concurrent batches lock rows
/// in the same order.
fn merge<'a>(effects: impl IntoIterator<Item = &'a Effect>) -> BTreeMap<&'a str, Merged<'a>> {
    let mut users: BTreeMap<&'a str, Merged<'a>> = BTreeMap::new();
    for effect in effects {
        let merged = users.entry(effect.sub.as_str()).or_insert([None; 14]);
        for change in &effect.changes {
            let slot = &mut merged[change.field() as usize];
            if slot.is_none_or(|(key, _)| effect.key > *key) {
                *slot = Some((&effect.key, change));
            }
        }
    }
    users
}

/// One statement for any batch size, so that each connection prepares it once. Every row's
/// versions hold only the fields the batch sets; a field's version compares as NULL otherwise,
/// so the row keeps its value. The rest is [`statement`]'s rule per field.
///
/// Most of what a new session spends on its first batch is this statement's parsing and planning
/// on cold caches, so it says each thing once: one `COLLATE "C"` per comparison (an explicit
/// collation on one side decides it), and `tenant_roles` compared as text (see [`distinct`]).
fn batch_statement() -> String {
    let newer = |column: &str| {
        format!(
            "((EXCLUDED.field_versions->>'{column}') COLLATE \"C\" \
             > COALESCE(t.field_versions->>'{column}', ''))"
        )
    };
    let mut sets = String::new();
    let mut new_versions = Vec::new();
    let mut changed = Vec::new();
    for field in Field::ALL {
        let column = field.column();
        let cond = newer(column);
        let _ = write!(
            sets,
            "{column} = CASE WHEN {cond} THEN EXCLUDED.{column} ELSE t.{column} END, "
        );
        new_versions.push(format!(
            "'{column}', CASE WHEN {cond} THEN EXCLUDED.field_versions->'{column}' END"
        ));
        changed.push(format!("({cond} AND {})", distinct(field)));
    }
    format!(
        "INSERT INTO av_identities AS t (id, field_versions, tenant_id, email, given_name, \
         family_name, subject_type, is_active, deleted_at, membership_id, membership_status, \
         tenant_roles, has_app_access, app_role, app_role_id, app_role_name) \
         SELECT b.id, b.versions::jsonb, b.tenant_id, b.email, b.given_name, b.family_name, \
         b.subject_type, COALESCE(b.is_active, true), b.deleted_at, b.membership_id, \
         b.membership_status, COALESCE(($18::text[])[b.roles_from:b.roles_to], '{{}}'), \
         COALESCE(b.has_app_access, false), b.app_role, b.app_role_id, b.app_role_name \
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
         $7::text[], $8::bool[], $9::timestamptz[], $10::text[], $11::text[], $12::int4[], \
         $13::int4[], $14::bool[], $15::text[], $16::text[], $17::text[]) \
         AS b(id, versions, tenant_id, email, given_name, family_name, subject_type, is_active, \
         deleted_at, membership_id, membership_status, roles_from, roles_to, has_app_access, \
         app_role, app_role_id, app_role_name) \
         ON CONFLICT (id) DO UPDATE SET {sets}\
         field_versions = t.field_versions || jsonb_strip_nulls(jsonb_build_object({new})), \
         updated_at = CASE WHEN {changed} THEN now() ELSE t.updated_at END, \
         synced_at = now()",
        new = new_versions.join(", "),
        changed = changed.join(" OR "),
    )
}

/// Whether the statement's new value of `field` differs from the stored one. An array is
/// compared as its text, which is equal exactly when the arrays are (same elements in the same
/// order, same bounds; NULL elements unquoted, a "NULL" string quoted): array equality would make
/// each new session look up its element type's operator classes, a third of a millisecond of
/// server CPU on its first batch.
fn distinct(field: Field) -> String {
    let column = field.column();
    match field {
        Field::TenantRoles => {
            format!("EXCLUDED.{column}::text IS DISTINCT FROM t.{column}::text")
        }
        _ => format!("EXCLUDED.{column} IS DISTINCT FROM t.{column}"),
    }
}

static BATCH_STATEMENT: std::sync::LazyLock<String> = std::sync::LazyLock::new(batch_statement);

/// The statement's parameters, one array element per user (`roles` is flat; each user's
/// `tenant_roles` is the slice `roles_from..=roles_to` of it, 1-based).
struct Columns<'a> {
    id: Vec<&'a str>,
    versions: Vec<String>,
    tenant_id: Vec<Option<&'a str>>,
    email: Vec<Option<&'a str>>,
    given_name: Vec<Option<&'a str>>,
    family_name: Vec<Option<&'a str>>,
    subject_type: Vec<Option<&'a str>>,
    is_active: Vec<Option<bool>>,
    deleted_at: Vec<Option<DateTime<Utc>>>,
    membership_id: Vec<Option<&'a str>>,
    membership_status: Vec<Option<&'static str>>,
    roles_from: Vec<Option<i32>>,
    roles_to: Vec<Option<i32>>,
    has_app_access: Vec<Option<bool>>,
    app_role: Vec<Option<&'a str>>,
    app_role_id: Vec<Option<&'a str>>,
    app_role_name: Vec<Option<&'a str>>,
    roles: Vec<&'a str>,
}

impl<'a> Columns<'a> {
    fn with_capacity(n: usize) -> Self {
        Self {
            id: Vec::with_capacity(n),
            versions: Vec::with_capacity(n),
            tenant_id: Vec::with_capacity(n),
            email: Vec::with_capacity(n),
            given_name: Vec::with_capacity(n),
            family_name: Vec::with_capacity(n),
            subject_type: Vec::with_capacity(n),
            is_active: Vec::with_capacity(n),
            deleted_at: Vec::with_capacity(n),
            membership_id: Vec::with_capacity(n),
            membership_status: Vec::with_capacity(n),
            roles_from: Vec::with_capacity(n),
            roles_to: Vec::with_capacity(n),
            has_app_access: Vec::with_capacity(n),
            app_role: Vec::with_capacity(n),
            app_role_id: Vec::with_capacity(n),
            app_role_name: Vec::with_capacity(n),
            roles: Vec::new(),
        }
    }

    fn push(&mut self, id: &'a str, merged: &Versions<'a>) {
        self.id.push(id);
        let mut versions = serde_json::Map::new();
        for (version, change) in merged.iter().flatten() {
            versions.insert(
                change.field().column().to_owned(),
                serde_json::Value::String(version.clone()),
            );
        }
        self.versions
            .push(serde_json::Value::Object(versions).to_string());
        let change = |field: Field| merged[field as usize].as_ref().map(|(_, change)| *change);
        let text = |field: Field| match change(field) {
            Some(
                Change::Email(v)
                | Change::GivenName(v)
                | Change::FamilyName(v)
                | Change::AppRole(v)
                | Change::AppRoleId(v)
                | Change::AppRoleName(v),
            ) => v.as_deref(),
            Some(Change::SubjectType(v) | Change::MembershipId(v)) => Some(v.as_str()),
            Some(Change::TenantId(v)) => Some(v.as_str()),
            _ => None,
        };
        self.tenant_id.push(text(Field::TenantId));
        self.email.push(text(Field::Email));
        self.given_name.push(text(Field::GivenName));
        self.family_name.push(text(Field::FamilyName));
        self.subject_type.push(text(Field::SubjectType));
        self.membership_id.push(text(Field::MembershipId));
        self.app_role.push(text(Field::AppRole));
        self.app_role_id.push(text(Field::AppRoleId));
        self.app_role_name.push(text(Field::AppRoleName));
        self.is_active.push(match change(Field::IsActive) {
            Some(Change::IsActive(v)) => Some(*v),
            _ => None,
        });
        self.has_app_access.push(match change(Field::HasAppAccess) {
            Some(Change::HasAppAccess(v)) => Some(*v),
            _ => None,
        });
        self.deleted_at.push(match change(Field::DeletedAt) {
            Some(Change::DeletedAt(v)) => v.map(|t| t.to_utc()),
            _ => None,
        });
        self.membership_status
            .push(match change(Field::MembershipStatus) {
                Some(Change::MembershipStatus(v)) => Some(v.as_str()),
                _ => None,
            });
        match change(Field::TenantRoles) {
            Some(Change::TenantRoles(roles)) => {
                let from = self.roles.len() + 1;
                self.roles.extend(roles.iter().map(String::as_str));
                self.roles_from.push(i32::try_from(from).ok());
                self.roles_to.push(i32::try_from(self.roles.len()).ok());
            }
            _ => {
                self.roles_from.push(None);
                self.roles_to.push(None);
            }
        }
    }
}

/// Applies a batch of one tenant's events in one statement (so in one transaction), ending
/// exactly where [`apply`] of each event in any order would: the batch is first merged per user
/// under the same rule, so each row is written once.
pub async fn apply_batch<'a>(
    conn: &mut PgConnection,
    effects: impl IntoIterator<Item = &'a Effect>,
) -> Result<(), sqlx::Error> {
    let users = merge(effects);
    let mut columns = Columns::with_capacity(users.len());
    for (id, merged) in &users {
        columns.push(
            id,
            &merged.map(|slot| slot.map(|(key, c)| (key.version(), c))),
        );
    }
    execute_batch(conn, columns).await
}

/// What to write on one row under one version: a reconcile snapshot's effect on a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionedEffect {
    pub sub: String,
    pub version: String,
    pub changes: Vec<Change>,
}

/// Writes versioned effects with [`apply_batch`]'s statement, so under the same per-field rule
/// (and ending where [`Model::apply_versioned`] of each in any order would).
pub async fn apply_versioned(
    conn: &mut PgConnection,
    effects: &[VersionedEffect],
) -> Result<(), sqlx::Error> {
    let mut users: BTreeMap<&str, Versions<'_>> = BTreeMap::new();
    for effect in effects {
        let merged = users
            .entry(effect.sub.as_str())
            .or_insert_with(|| std::array::from_fn(|_| None));
        for change in &effect.changes {
            let slot = &mut merged[change.field() as usize];
            if slot
                .as_ref()
                .is_none_or(|(version, _)| effect.version > *version)
            {
                *slot = Some((effect.version.clone(), change));
            }
        }
    }
    let mut columns = Columns::with_capacity(users.len());
    for (id, merged) in &users {
        columns.push(id, merged);
    }
    execute_batch(conn, columns).await
}

async fn execute_batch(conn: &mut PgConnection, columns: Columns<'_>) -> Result<(), sqlx::Error> {
    if columns.id.is_empty() {
        return Ok(());
    }
    sqlx::query(BATCH_STATEMENT.as_str())
        .bind(columns.id)
        .bind(columns.versions)
        .bind(columns.tenant_id)
        .bind(columns.email)
        .bind(columns.given_name)
        .bind(columns.family_name)
        .bind(columns.subject_type)
        .bind(columns.is_active)
        .bind(columns.deleted_at)
        .bind(columns.membership_id)
        .bind(columns.membership_status)
        .bind(columns.roles_from)
        .bind(columns.roles_to)
        .bind(columns.has_app_access)
        .bind(columns.app_role)
        .bind(columns.app_role_id)
        .bind(columns.app_role_name)
        .bind(columns.roles)
        .execute(conn)
        .await
        .map(|_| ())
}

/// One stored identity, for tests to read back what was applied.
#[cfg(any(test, feature = "test-support"))]
pub async fn load(conn: &mut PgConnection, sub: &str) -> Result<Option<Identity>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {IDENTITY_COLUMNS} FROM av_identities WHERE id = $1"
    ))
    .bind(sub)
    .fetch_optional(conn)
    .await
}

/// A stored row and, per field, its stored version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub identity: Identity,
    pub versions: BTreeMap<Field, String>,
}

#[derive(sqlx::FromRow)]
struct StoredRow {
    #[sqlx(flatten)]
    identity: Identity,
    field_versions: String,
}

/// The rows whose `tenant_id` is `tenant` (all of a tenant's rows, also in a database that
/// several tenants share), with their versions, ordered by id.
pub async fn load_tenant(
    conn: &mut PgConnection,
    tenant: &str,
) -> Result<Vec<Stored>, sqlx::Error> {
    let rows: Vec<StoredRow> = sqlx::query_as(&format!(
        "SELECT {IDENTITY_COLUMNS}, field_versions::text AS field_versions FROM av_identities \
         WHERE tenant_id = $1 ORDER BY id COLLATE \"C\""
    ))
    .bind(tenant)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let versions: BTreeMap<String, String> =
                serde_json::from_str(&row.field_versions).unwrap_or_default();
            Stored {
                identity: row.identity,
                versions: versions
                    .into_iter()
                    .filter_map(|(column, version)| Some((field_of_column(&column)?, version)))
                    .collect(),
            }
        })
        .collect())
}

/// Every row, ordered by id (bytewise, like [`Model::identities`]).
#[cfg(any(test, feature = "test-support"))]
pub async fn load_all(conn: &mut PgConnection) -> Result<Vec<Identity>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {IDENTITY_COLUMNS} FROM av_identities ORDER BY id COLLATE \"C\""
    ))
    .fetch_all(conn)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use avsync_shared::event::KNOWN_TYPES;
    use avsync_shared::Envelope;
    use proptest::prelude::*;
    use serde_json::{json, Map, Value};

    /// Every type in the catalogue and one it does not know.
    fn every_type() -> Vec<&'static str> {
        KNOWN_TYPES
            .iter()
            .copied()
            .chain(["tenant.unknown_type"])
            .collect()
    }

    /// A value for an optional string field: absent, null, "" or one of a few strings.
    fn text() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            Just(None),
            Just(Some(Value::Null)),
            Just(Some(json!(""))),
            "[ab]{1,2}".prop_map(|s| Some(json!(s))),
        ]
    }

    fn roles() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            Just(None),
            Just(Some(Value::Null)),
            proptest::collection::vec("[rs]", 0..3).prop_map(|v| Some(json!(v))),
        ]
    }

    fn changed_fields() -> impl Strategy<Value = Option<Value>> {
        prop_oneof![
            Just(None),
            Just(Some(Value::Null)),
            proptest::sample::subsequence(
                vec!["email", "given_name", "family_name", "locale"],
                0..4
            )
            .prop_map(|v| Some(json!(v))),
        ]
    }

    /// An event body: one of three users, a time within a few milliseconds (so ties happen) and
    /// a unique id whose first letter makes tie-breaks go either way.
    fn body(index: usize) -> impl Strategy<Value = Vec<u8>> {
        (
            proptest::sample::select(every_type()),
            0..3usize,
            0..6u32,
            "[a-c]",
            proptest::collection::vec(text(), 9),
            roles(),
            changed_fields(),
            "[+-]0[0-2]:[03]0",
        )
            .prop_map(
                move |(t, user, ms, prefix, texts, roles, changed, offset)| {
                    let mut data = Map::new();
                    data.insert("sub".into(), json!(format!("u{user}")));
                    let keys = [
                        "email",
                        "given_name",
                        "family_name",
                        "subject_type",
                        "membership_id",
                        "role_slug",
                        "role_id",
                        "role_name",
                        "previous_role_id",
                    ];
                    for (key, value) in keys.iter().zip(texts) {
                        if let Some(v) = value {
                            data.insert((*key).into(), v);
                        }
                    }
                    if let Some(r) = roles {
                        data.insert("tenant_roles".into(), r);
                    }
                    if let Some(c) = changed {
                        data.insert("changed_fields".into(), c);
                    }
                    // The same instant written in another offset must order the same.
                    let utc = chrono::DateTime::parse_from_rfc3339(&format!(
                        "2026-08-21T01:40:03.{ms:03}Z"
                    ))
                    .expect("fixed time");
                    let local = utc.with_timezone(
                        &chrono::DateTime::parse_from_rfc3339(&format!(
                            "2026-01-01T00:00:00{offset}"
                        ))
                        .expect("offset")
                        .timezone(),
                    );
                    json!({
                        "id": format!("{prefix}{index}"),
                        "type": t,
                        "tenant_id": "t1",
                        "timestamp": local.to_rfc3339_opts(chrono::SecondsFormat::Millis, false),
                        "data": data,
                    })
                    .to_string()
                    .into_bytes()
                },
            )
    }

    fn effects(bodies: &[Vec<u8>]) -> Vec<Effect> {
        bodies
            .iter()
            .filter_map(|b| {
                let envelope = Envelope::decode(b).expect("envelope");
                Effect::decode(&envelope, b).expect("decodes")
            })
            .collect()
    }

    fn history() -> impl Strategy<Value = (Vec<Vec<u8>>, Vec<usize>)> {
        (1..40usize)
            .prop_flat_map(|n| (0..n).map(body).collect::<Vec<_>>())
            .prop_flat_map(|bodies| {
                let n = bodies.len();
                // Arrival order: every event at least once, some several times, shuffled.
                let order = (
                    proptest::collection::vec(0..n, 0..n),
                    Just((0..n).collect::<Vec<_>>()),
                )
                    .prop_map(|(dups, mut all)| {
                        all.extend(dups);
                        all
                    })
                    .prop_shuffle();
                (Just(bodies), order)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_arrival_order_with_duplicates_gives_the_sorted_state((bodies, order) in history()) {
            let mut sorted = effects(&bodies);
            sorted.sort_by(|a, b| a.key.cmp(&b.key));
            let mut expected = Model::default();
            for e in &sorted {
                expected.apply(e);
            }

            let all = effects(&bodies.iter().map(Vec::clone).collect::<Vec<_>>());
            let arrived: Vec<Effect> = order
                .iter()
                .filter_map(|&i| {
                    let b = &bodies[i];
                    let envelope = Envelope::decode(b).expect("envelope");
                    Effect::decode(&envelope, b).expect("decodes")
                })
                .collect();
            prop_assert!(arrived.len() >= all.len());
            let mut got = Model::default();
            for e in &arrived {
                got.apply(e);
            }
            prop_assert_eq!(&got, &expected);

            // Applying everything once more changes nothing.
            for e in &arrived {
                got.apply(e);
            }
            prop_assert_eq!(&got, &expected);
        }

        #[test]
        fn each_field_holds_the_value_of_the_greatest_event_that_set_it((bodies, _) in history()) {
            let all = effects(&bodies);
            let mut model = Model::default();
            for e in all.iter().rev() {
                model.apply(e);
            }
            for row in model.identities() {
                let mut expected = Identity::new(&row.id);
                for field in Field::ALL {
                    let newest = all
                        .iter()
                        .filter(|e| e.sub == row.id)
                        .flat_map(|e| e.changes.iter().map(move |c| (&e.key, c)))
                        .filter(|(_, c)| c.field() == field)
                        .max_by(|a, b| a.0.cmp(b.0));
                    if let Some((_, change)) = newest {
                        expected.set(change);
                    }
                }
                prop_assert_eq!(&row, &expected);
            }
        }
    }

    fn effect(body: Value) -> Effect {
        let bytes = body.to_string().into_bytes();
        let envelope = Envelope::decode(&bytes).expect("envelope");
        Effect::decode(&envelope, &bytes)
            .expect("decodes")
            .expect("sets something")
    }

    proptest! {
        #[test]
        fn a_snapshot_loses_a_tie_and_otherwise_orders_by_instant(
            // Years 0000 to 9999, the instants an EventTime holds.
            a in -62_167_219_200_000_000i64..=253_402_300_799_999_999,
            b in -62_167_219_200_000_000i64..=253_402_300_799_999_999,
            id in "[ -~]{0,6}",
            same_time in any::<bool>(),
        ) {
            let b = if same_time { a } else { b };
            let snapshot = snapshot_version(EventTime::from_micros(a).unwrap());
            let event = EventKey { time: EventTime::from_micros(b).unwrap(), id }.version();
            let expected = if a == b { std::cmp::Ordering::Less } else { a.cmp(&b) };
            prop_assert_eq!(snapshot.as_bytes().cmp(event.as_bytes()), expected);
        }
    }

    #[test]
    fn a_late_grant_never_undoes_a_newer_revoke() {
        let grant = effect(
            json!({"id": "g", "type": "app_access.granted", "tenant_id": "t",
            "timestamp": "2026-08-21T01:00:00Z", "data": {"sub": "u", "role_slug": "admin"}}),
        );
        let revoke = effect(
            json!({"id": "r", "type": "app_access.revoked", "tenant_id": "t",
            "timestamp": "2026-08-21T02:00:00Z", "data": {"sub": "u"}}),
        );
        let mut model = Model::default();
        model.apply(&revoke);
        model.apply(&grant);
        let row = model.get("u").expect("row");
        assert!(!row.has_app_access);
        assert_eq!(row.app_role, None);
    }

    #[test]
    fn a_late_update_never_resurrects_but_a_newer_create_does() {
        let delete = effect(
            json!({"id": "d", "type": "subject.deleted", "tenant_id": "t",
            "timestamp": "2026-08-21T02:00:00Z", "data": {"sub": "u"}}),
        );
        let update = effect(
            json!({"id": "u", "type": "subject.updated", "tenant_id": "t",
            "timestamp": "2026-08-21T01:00:00Z", "data": {"sub": "u", "email": "old@x"}}),
        );
        let create = effect(
            json!({"id": "c", "type": "subject.created", "tenant_id": "t",
            "timestamp": "2026-08-21T03:00:00Z", "data": {"sub": "u"}}),
        );
        let mut model = Model::default();
        model.apply(&delete);
        model.apply(&update);
        let row = model.get("u").expect("row");
        assert!(row.deleted_at.is_some());
        assert_eq!(row.email.as_deref(), Some("old@x"));
        model.apply(&create);
        assert_eq!(model.get("u").expect("row").deleted_at, None);
    }

    #[test]
    fn the_statement_names_only_static_columns() {
        let sql = batch_statement();
        assert!(sql.contains("membership_status = CASE WHEN"));
        assert!(sql.contains("tenant_id = CASE WHEN"));
    }
}
