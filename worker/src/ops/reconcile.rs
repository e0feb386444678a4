//! Folding an AuthVital snapshot of a tenant's members into its database, under the per-field
//! order of events (contract section 6), and the guard rails that refuse a suspicious snapshot.
//!
//! - A snapshot is a fact as of the moment its request was sent: its instant is taken before
//!   sending, minus [`CLOCK_SKEW`], and every field it sets carries
//!   [`apply::snapshot_version`] of that instant. So a newer webhook always wins over an older
//!   snapshot, a newer snapshot over an older webhook, and a tie goes to the webhook.
//! - Listed members (`ACTIVE`, `SUSPENDED`) set `tenant_id`, the profile fields present,
//!   `membership_id`, `membership_status` and the app fields of `AVSYNC_APPLICATION_ID` (by the
//!   app's roles). `INVITED` members have not joined: they count as not listed. A row of the
//!   tenant that is not listed becomes `left` without app access or app role. Rows are never
//!   deleted, and a snapshot never sets `tenant_roles`, `is_active`, `subject_type` or
//!   `deleted_at` (AuthVital's API exposes none of them).
//! - One reconcile per tenant at a time: a transaction-scoped advisory lock in the tenant
//!   database, taken before AuthVital is asked, so a second reconcile skips (`busy`) instead of
//!   asking again; the lock goes with the transaction, also when a run is cut short. The
//!   schedule also skips a tenant that was reconciled less than half an interval ago (table
//!   `avsync_reconcile_runs`), so that many workers ask AuthVital once per tenant and interval.

use crate::apply::{self, Identity, Model, Stored, VersionedEffect};
use crate::metrics::{ReconcileMetrics, RunOutcome};
use crate::ops::authvital::{ApiError, AuthVital, MemberStatus, Membership};
use avsync_shared::event::{Change, EventTime, Field, MembershipStatus};
use avsync_shared::TenantId;
use chrono::Utc;
use serde::Serialize;
use sqlx::{Acquire, PgConnection};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

/// Subtracted from the instant a snapshot request is sent: AuthVital's clock (which stamps
/// webhooks) may be behind ours, and a snapshot must not pass for newer than a change it may not
/// have seen.
pub const CLOCK_SKEW: Duration = Duration::from_secs(2);
/// Rows written per statement.
const CHUNK: usize = 1_000;
/// The advisory lock class of reconciles (the first key of `pg_try_advisory_xact_lock(int, int)`;
/// the second is the tenant's hash, since tenants may share a database).
const LOCK_CLASS: i32 = 0x6176_7263; // "avrc"

/// What a reconcile may do.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mode {
    /// Compute and report, write nothing.
    pub dry_run: bool,
    /// Apply even when a guard rail refuses.
    pub force: bool,
    /// Skip the tenant (`not_due`) when a snapshot of it was applied less than this long ago.
    pub not_within: Option<Duration>,
}

/// A guard rail that refused a snapshot, with the counts that made it refuse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum Refusal {
    /// AuthVital listed no member while the database has active members.
    EmptySnapshot { active_in_db: usize },
    /// Every listed member has no role at all while the database has app roles: the answer
    /// looks like one without `includeRoles`.
    NoRoles {
        listed: usize,
        with_app_role_in_db: usize,
    },
    /// More active members would become `left` than both bounds of [`LeftBound`] allow.
    TooManyLeft {
        flipping: usize,
        active_in_db: usize,
        max_percent: u8,
        max_left: u32,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::EmptySnapshot { active_in_db } => write!(
                f,
                "empty snapshot: AuthVital lists no member, the database has {active_in_db} active"
            ),
            Refusal::NoRoles {
                listed,
                with_app_role_in_db,
            } => write!(
                f,
                "no roles: none of the {listed} listed members has a role, the database has {with_app_role_in_db} rows with an app role"
            ),
            Refusal::TooManyLeft {
                flipping,
                active_in_db,
                max_percent,
                max_left,
            } => write!(
                f,
                "too many left: {flipping} of {active_in_db} active members would become left, over both AVSYNC_RECONCILE_MAX_LEFT_PERCENT={max_percent}% and AVSYNC_RECONCILE_MAX_LEFT={max_left}"
            ),
        }
    }
}

/// What a snapshot does (or did) to one tenant's rows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Members AuthVital listed (`ACTIVE` and `SUSPENDED`).
    pub listed: usize,
    pub created: usize,
    /// Existing rows with at least one field changed, other than those marked left.
    pub changed: usize,
    /// Per field, how many existing rows it changes in (marked-left rows included).
    pub changed_fields: BTreeMap<&'static str, usize>,
    pub marked_left: usize,
    pub unchanged: usize,
}

/// The effects of a snapshot, what they change, and the guard rails' verdict.
#[derive(Debug, Clone)]
pub struct Plan {
    pub effects: Vec<VersionedEffect>,
    pub counts: Counts,
    pub refusals: Vec<Refusal>,
}

/// Whether a field's value differs between two versions of a row.
fn differs(a: &Identity, b: &Identity, field: Field) -> bool {
    match field {
        Field::TenantId => a.tenant_id != b.tenant_id,
        Field::Email => a.email != b.email,
        Field::GivenName => a.given_name != b.given_name,
        Field::FamilyName => a.family_name != b.family_name,
        Field::SubjectType => a.subject_type != b.subject_type,
        Field::IsActive => a.is_active != b.is_active,
        Field::DeletedAt => a.deleted_at != b.deleted_at,
        Field::MembershipId => a.membership_id != b.membership_id,
        Field::MembershipStatus => a.membership_status != b.membership_status,
        Field::TenantRoles => a.tenant_roles != b.tenant_roles,
        Field::HasAppAccess => a.has_app_access != b.has_app_access,
        Field::AppRole => a.app_role != b.app_role,
        Field::AppRoleId => a.app_role_id != b.app_role_id,
        Field::AppRoleName => a.app_role_name != b.app_role_name,
    }
}

/// "Present", as for events: a non-empty string (and one PostgreSQL can store).
fn present(value: &Option<String>) -> Option<String> {
    value
        .as_ref()
        .filter(|v| !v.is_empty() && !v.contains('\0'))
        .cloned()
}

/// The status a membership stores, or None for one that has not joined (`INVITED`).
fn joined_status(status: MemberStatus) -> Option<MembershipStatus> {
    match status {
        MemberStatus::Active => Some(MembershipStatus::Active),
        MemberStatus::Suspended => Some(MembershipStatus::Suspended),
        MemberStatus::Invited => None,
    }
}

/// What one listed member, whose membership has `status`, sets. The app fields are taken from
/// the roles of `application_id`, or left untouched without one.
fn member_changes(
    tenant: &TenantId,
    application_id: Option<&str>,
    member: &Membership,
    status: MembershipStatus,
) -> Vec<Change> {
    let mut changes = vec![Change::TenantId(tenant.clone())];
    for (value, set) in [
        (
            &member.user.email,
            Change::Email as fn(Option<String>) -> Change,
        ),
        (&member.user.given_name, Change::GivenName),
        (&member.user.family_name, Change::FamilyName),
    ] {
        if let Some(v) = present(value) {
            changes.push(set(Some(v)));
        }
    }
    if let Some(id) = present(&Some(member.id.clone())) {
        changes.push(Change::MembershipId(id));
    }
    changes.push(Change::MembershipStatus(status));
    let Some(application_id) = application_id else {
        return changes;
    };
    // One role per row: when a member holds several of the app's roles, the one with the
    // smallest slug (then id), so that repeated snapshots agree.
    let role = member
        .roles
        .iter()
        .filter(|r| r.application_id.as_deref() == Some(application_id))
        .min_by(|a, b| (&a.slug, &a.id).cmp(&(&b.slug, &b.id)));
    changes.push(Change::HasAppAccess(role.is_some()));
    changes.push(Change::AppRole(role.and_then(|r| present(&r.slug))));
    changes.push(Change::AppRoleId(
        role.and_then(|r| present(&Some(r.id.clone()))),
    ));
    changes.push(Change::AppRoleName(role.and_then(|r| present(&r.name))));
    changes
}

/// What a row of the tenant that the snapshot does not list gets.
fn left_changes(app_fields: bool) -> Vec<Change> {
    let mut changes = vec![Change::MembershipStatus(MembershipStatus::Left)];
    if app_fields {
        changes.extend([
            Change::HasAppAccess(false),
            Change::AppRole(None),
            Change::AppRoleId(None),
            Change::AppRoleName(None),
        ]);
    }
    changes
}

/// The guard rail on departures: a snapshot is refused when it would turn more than
/// `max_percent` of a tenant's active members **and** more than `max_count` of them into `left`.
/// The share alone would refuse every departure of a small tenant (one of three is 33 %), the
/// count alone every departure wave of a large one; a mass departure is both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeftBound {
    /// `AVSYNC_RECONCILE_MAX_LEFT_PERCENT`.
    pub max_percent: u8,
    /// `AVSYNC_RECONCILE_MAX_LEFT`.
    pub max_count: u32,
}

impl LeftBound {
    /// Whether `flipping` of `active` active members becoming `left` is beyond both bounds.
    pub fn refuses(self, flipping: usize, active: usize) -> bool {
        let over_share = flipping * 100 > usize::from(self.max_percent) * active;
        let over_count = u64::try_from(flipping).unwrap_or(u64::MAX) > u64::from(self.max_count);
        over_share && over_count
    }
}

/// The members a snapshot lists, by `sub`, with the status their membership stores; `INVITED`
/// ones and unusable ids are left out.
fn listed_members(memberships: &[Membership]) -> BTreeMap<&str, (&Membership, MembershipStatus)> {
    memberships
        .iter()
        .filter(|m| !m.user.id.is_empty() && !m.user.id.contains('\0'))
        .filter_map(|m| Some((m.user.id.as_str(), (m, joined_status(m.status)?))))
        .collect()
}

/// What the snapshot sets: each listed member's fields, and `left` for every stored row it does
/// not list.
fn snapshot_effects(
    tenant: &TenantId,
    application_id: Option<&str>,
    listed: &BTreeMap<&str, (&Membership, MembershipStatus)>,
    version: &str,
    stored: &[Stored],
) -> Vec<VersionedEffect> {
    let mut effects: Vec<VersionedEffect> = listed
        .iter()
        .map(|(sub, (member, status))| VersionedEffect {
            sub: (*sub).to_owned(),
            version: version.to_owned(),
            changes: member_changes(tenant, application_id, member, *status),
        })
        .collect();
    let existing: BTreeSet<&str> = stored.iter().map(|s| s.identity.id.as_str()).collect();
    effects.extend(
        existing
            .into_iter()
            .filter(|id| !listed.contains_key(id))
            .map(|id| VersionedEffect {
                sub: id.to_owned(),
                version: version.to_owned(),
                changes: left_changes(application_id.is_some()),
            }),
    );
    effects
}

fn is_active(row: &Identity) -> bool {
    row.membership_status.as_deref() == Some("active")
}

/// What `effects` change in `stored`, predicted through [`Model`] (the same rule the database
/// applies), and how many active members they turn `left`.
fn predict(stored: Vec<Stored>, effects: &[VersionedEffect], listed: usize) -> (Counts, usize) {
    let mut before = Model::default();
    for row in stored {
        before.insert_stored(row);
    }
    let mut after = before.clone();
    for effect in effects {
        after.apply_versioned(&effect.sub, &effect.version, &effect.changes);
    }
    let mut counts = Counts {
        listed,
        ..Counts::default()
    };
    let mut flipping = 0;
    for effect in effects {
        let new = after.get(&effect.sub).expect("every effect has its row");
        let Some(old) = before.get(&effect.sub) else {
            counts.created += 1;
            continue;
        };
        let fields: Vec<Field> = Field::ALL
            .into_iter()
            .filter(|f| differs(old, new, *f))
            .collect();
        for field in &fields {
            *counts.changed_fields.entry(field.column()).or_default() += 1;
        }
        let now_left = new.membership_status.as_deref() == Some("left")
            && old.membership_status.as_deref() != Some("left");
        if now_left {
            counts.marked_left += 1;
            if is_active(old) {
                flipping += 1;
            }
        } else if fields.is_empty() {
            counts.unchanged += 1;
        } else {
            counts.changed += 1;
        }
    }
    (counts, flipping)
}

/// What the database held before the snapshot, as the guard rails weigh it.
struct Before {
    active: usize,
    with_app_role: usize,
}

/// The guard rails' verdict on a snapshot that lists `listed` and turns `flipping` active
/// members `left`.
fn guard_rails(
    application_id: Option<&str>,
    listed: &BTreeMap<&str, (&Membership, MembershipStatus)>,
    before: &Before,
    flipping: usize,
    left: LeftBound,
) -> Vec<Refusal> {
    let mut refusals = Vec::new();
    if listed.is_empty() && before.active > 0 {
        refusals.push(Refusal::EmptySnapshot {
            active_in_db: before.active,
        });
    }
    if application_id.is_some()
        && !listed.is_empty()
        && listed.values().all(|(m, _)| m.roles.is_empty())
        && before.with_app_role > 0
    {
        refusals.push(Refusal::NoRoles {
            listed: listed.len(),
            with_app_role_in_db: before.with_app_role,
        });
    }
    if !listed.is_empty() && left.refuses(flipping, before.active) {
        refusals.push(Refusal::TooManyLeft {
            flipping,
            active_in_db: before.active,
            max_percent: left.max_percent,
            max_left: left.max_count,
        });
    }
    refusals
}

/// The effects of a snapshot taken at `taken_at` on the tenant's `stored` rows, their predicted
/// outcome and the guard rails' verdict.
pub fn plan(
    tenant: &TenantId,
    application_id: Option<&str>,
    memberships: &[Membership],
    taken_at: EventTime,
    stored: Vec<Stored>,
    left: LeftBound,
) -> Plan {
    let version = apply::snapshot_version(taken_at);
    let listed = listed_members(memberships);
    let effects = snapshot_effects(tenant, application_id, &listed, &version, &stored);
    let before = Before {
        active: stored.iter().filter(|s| is_active(&s.identity)).count(),
        with_app_role: stored
            .iter()
            .filter(|s| s.identity.app_role.is_some())
            .count(),
    };
    let (counts, flipping) = predict(stored, &effects, listed.len());
    let refusals = guard_rails(application_id, &listed, &before, flipping, left);
    Plan {
        effects,
        counts,
        refusals,
    }
}

/// Why a reconcile of a tenant could not finish.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("tenant database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// How one tenant's reconcile ended, as printed and as `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub tenant: String,
    pub outcome: &'static str,
    #[serde(flatten)]
    pub counts: Counts,
    pub refusals: Vec<Refusal>,
    pub error: Option<String>,
    /// `--dry-run`: a refusal is told as what would happen.
    #[serde(skip)]
    pub dry_run: bool,
}

impl Report {
    pub fn new(tenant: &str, outcome: RunOutcome) -> Self {
        Self {
            tenant: tenant.to_owned(),
            outcome: outcome.as_str(),
            counts: Counts::default(),
            refusals: Vec::new(),
            error: None,
            dry_run: false,
        }
    }

    pub fn failed(tenant: &str, error: &dyn fmt::Display) -> Self {
        Self {
            error: Some(error.to_string()),
            ..Self::new(tenant, RunOutcome::Failed)
        }
    }

    /// Whether the run ended as asked: not refused, not failed.
    pub fn ok(&self) -> bool {
        self.outcome != RunOutcome::Refused.as_str() && self.outcome != RunOutcome::Failed.as_str()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tenant {}: {}", self.tenant, self.outcome)?;
        if let Some(error) = &self.error {
            return write!(f, ": {error}");
        }
        if self.outcome == RunOutcome::Busy.as_str() {
            return write!(f, " (another reconcile of this tenant is running)");
        }
        if self.outcome == RunOutcome::NotDue.as_str() {
            return write!(f, " (reconciled recently)");
        }
        let c = &self.counts;
        write!(
            f,
            ": {} listed, {} created, {} changed, {} marked left, {} unchanged",
            c.listed, c.created, c.changed, c.marked_left, c.unchanged
        )?;
        if !c.changed_fields.is_empty() {
            let fields: Vec<String> = c
                .changed_fields
                .iter()
                .map(|(field, n)| format!("{field} {n}"))
                .collect();
            write!(f, " (fields: {})", fields.join(", "))?;
        }
        let refused = if self.dry_run {
            "would be refused by"
        } else {
            "refused by"
        };
        for refusal in &self.refusals {
            write!(f, "\n  {refused} {refusal}")?;
        }
        if self.outcome == RunOutcome::Refused.as_str() {
            write!(
                f,
                "\n  nothing written; check AuthVital, or use --force to apply anyway"
            )?;
        } else if self.dry_run && !self.refusals.is_empty() {
            write!(f, "\n  --force would apply it anyway")?;
        }
        Ok(())
    }
}

/// Reads snapshots from AuthVital and folds them into tenant databases.
pub struct Reconciler {
    pub api: AuthVital,
    /// Whose app access and roles a snapshot sets; None leaves the app fields to webhooks.
    pub application_id: Option<String>,
    pub left: LeftBound,
    pub metrics: ReconcileMetrics,
}

impl Reconciler {
    /// Reconciles `tenant` in the database `conn` is connected to, and counts the run.
    pub async fn reconcile(
        &self,
        conn: &mut PgConnection,
        tenant: &TenantId,
        mode: Mode,
    ) -> Report {
        match self.run(conn, tenant, mode).await {
            Ok((report, outcome)) => {
                self.metrics.run(outcome);
                if outcome == RunOutcome::Applied {
                    let c = &report.counts;
                    self.metrics.rows("created", c.created as u64);
                    self.metrics.rows("changed", c.changed as u64);
                    self.metrics.rows("marked_left", c.marked_left as u64);
                }
                report
            }
            Err(e) => self.failed(tenant.as_str(), &e),
        }
    }

    /// The report of a run that could not finish (also before it began: no database), counted.
    pub fn failed(&self, tenant: &str, error: &dyn fmt::Display) -> Report {
        tracing::warn!(tenant, error = %error, "reconcile failed");
        self.metrics.run(RunOutcome::Failed);
        Report::failed(tenant, error)
    }

    async fn run(
        &self,
        conn: &mut PgConnection,
        tenant: &TenantId,
        mode: Mode,
    ) -> Result<(Report, RunOutcome), ReconcileError> {
        let mut tx = conn.begin().await?;
        if let Some(skipped) = skip(&mut tx, tenant, mode).await? {
            tx.rollback().await?;
            return Ok((Report::new(tenant.as_str(), skipped), skipped));
        }
        let (memberships, taken_at) = match self.snapshot(tenant).await {
            Ok(snapshot) => snapshot,
            Err(e) => {
                // Now, not when the connection is next used: it may go back to a pool.
                let _ = tx.rollback().await;
                return Err(e.into());
            }
        };
        let stored = apply::load_tenant(&mut tx, tenant.as_str()).await?;
        let plan = plan(
            tenant,
            self.application_id.as_deref(),
            &memberships,
            taken_at,
            stored,
            self.left,
        );
        let outcome = if !plan.refusals.is_empty() && !mode.force {
            RunOutcome::Refused
        } else if mode.dry_run {
            RunOutcome::DryRun
        } else {
            RunOutcome::Applied
        };
        if outcome == RunOutcome::Applied {
            write(&mut tx, tenant, &plan.effects).await?;
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        let report = Report {
            counts: plan.counts,
            refusals: plan.refusals,
            dry_run: mode.dry_run,
            ..Report::new(tenant.as_str(), outcome)
        };
        tracing::info!(
            tenant = tenant.as_str(),
            outcome = report.outcome,
            listed = report.counts.listed,
            created = report.counts.created,
            changed = report.counts.changed,
            marked_left = report.counts.marked_left,
            unchanged = report.counts.unchanged,
            "reconciled"
        );
        Ok((report, outcome))
    }

    /// The tenant's members as AuthVital lists them, and the instant the snapshot stands for
    /// (taken before the request is sent, see the module doc).
    async fn snapshot(&self, tenant: &TenantId) -> Result<(Vec<Membership>, EventTime), ApiError> {
        let sent = Utc::now() - CLOCK_SKEW;
        let taken_at = EventTime::from_micros(sent.timestamp_micros())
            .expect("the clock is within years 0000 to 9999");
        let memberships = self.api.tenant_memberships(tenant.as_str()).await?;
        Ok((memberships, taken_at))
    }
}

/// Why a run stops before asking AuthVital, if it does: another reconcile of the tenant holds the
/// lock (`busy`), or `mode.not_within` finds it reconciled recently (`not_due`). Takes the lock
/// otherwise, for the rest of `tx`.
async fn skip(
    tx: &mut PgConnection,
    tenant: &TenantId,
    mode: Mode,
) -> Result<Option<RunOutcome>, sqlx::Error> {
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, hashtext($2))")
        .bind(LOCK_CLASS)
        .bind(tenant.as_str())
        .fetch_one(&mut *tx)
        .await?;
    if !locked {
        tracing::info!(
            tenant = tenant.as_str(),
            "another reconcile of this tenant is running; skipped"
        );
        return Ok(Some(RunOutcome::Busy));
    }
    let Some(within) = mode.not_within else {
        return Ok(None);
    };
    let recent: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM avsync_reconcile_runs WHERE tenant_id = $1 \
         AND applied_at > now() - make_interval(secs => $2))",
    )
    .bind(tenant.as_str())
    .bind(within.as_secs_f64())
    .fetch_one(&mut *tx)
    .await?;
    Ok(recent.then_some(RunOutcome::NotDue))
}

/// Writes a snapshot's effects and records when the tenant was last reconciled.
async fn write(
    tx: &mut PgConnection,
    tenant: &TenantId,
    effects: &[VersionedEffect],
) -> Result<(), sqlx::Error> {
    for chunk in effects.chunks(CHUNK) {
        apply::apply_versioned(&mut *tx, chunk).await?;
    }
    sqlx::query(
        "INSERT INTO avsync_reconcile_runs (tenant_id, applied_at) VALUES ($1, now()) \
         ON CONFLICT (tenant_id) DO UPDATE SET applied_at = EXCLUDED.applied_at",
    )
    .bind(tenant.as_str())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::authvital::{Role, User};
    use avsync_shared::event::{Effect, EventKey};
    use proptest::prelude::*;

    const DEFAULT_BOUND: LeftBound = LeftBound {
        max_percent: 20,
        max_count: 10,
    };
    const NO_BOUND: LeftBound = LeftBound {
        max_percent: 100,
        max_count: 0,
    };

    fn tenant() -> TenantId {
        TenantId::parse("t1").unwrap()
    }

    fn at(s: &str) -> EventTime {
        EventTime::parse(s).unwrap()
    }

    fn member(user: &str, status: MemberStatus, roles: &[(&str, &str)]) -> Membership {
        Membership {
            id: format!("m-{user}"),
            status,
            user: User {
                id: user.to_owned(),
                email: Some(format!("{user}@x")),
                given_name: Some(String::new()),
                family_name: None,
            },
            roles: roles
                .iter()
                .map(|(slug, app)| Role {
                    id: format!("r-{slug}"),
                    name: Some(slug.to_uppercase()),
                    slug: Some((*slug).to_owned()),
                    application_id: Some((*app).to_owned()),
                })
                .collect(),
        }
    }

    fn stored(model: &Model, sub: &str) -> Stored {
        Stored {
            identity: model.get(sub).unwrap().clone(),
            versions: model
                .versions(sub)
                .into_iter()
                .map(|(c, v)| (apply::field_of_column(&c).unwrap(), v))
                .collect(),
        }
    }

    #[test]
    fn a_listed_member_sets_profile_membership_and_app_fields() {
        let m = member(
            "u",
            MemberStatus::Suspended,
            &[("viewer", "app"), ("admin", "app"), ("boss", "other")],
        );
        assert_eq!(
            member_changes(&tenant(), Some("app"), &m, MembershipStatus::Suspended),
            vec![
                Change::TenantId(tenant()),
                Change::Email(Some("u@x".into())),
                Change::MembershipId("m-u".into()),
                Change::MembershipStatus(MembershipStatus::Suspended),
                Change::HasAppAccess(true),
                Change::AppRole(Some("admin".into())),
                Change::AppRoleId(Some("r-admin".into())),
                Change::AppRoleName(Some("ADMIN".into())),
            ]
        );
        let none = member_changes(
            &tenant(),
            Some("app"),
            &member("u", MemberStatus::Active, &[("boss", "other")]),
            MembershipStatus::Active,
        );
        assert!(none.contains(&Change::HasAppAccess(false)));
        assert!(none.contains(&Change::AppRole(None)));
        for change in none {
            assert!(!matches!(
                change.field(),
                Field::TenantRoles | Field::IsActive | Field::SubjectType | Field::DeletedAt
            ));
        }
    }

    #[test]
    fn without_an_application_the_app_fields_are_left_to_webhooks() {
        let m = member("u", MemberStatus::Active, &[("admin", "app")]);
        for change in member_changes(&tenant(), None, &m, MembershipStatus::Active)
            .into_iter()
            .chain(left_changes(false))
        {
            assert!(!matches!(
                change.field(),
                Field::HasAppAccess | Field::AppRole | Field::AppRoleId | Field::AppRoleName
            ));
        }
    }

    #[test]
    fn a_refused_report_names_the_rule_and_counts() {
        let report = Report {
            refusals: vec![Refusal::TooManyLeft {
                flipping: 13,
                active_in_db: 50,
                max_percent: 20,
                max_left: 10,
            }],
            ..Report::new("t1", RunOutcome::Refused)
        };
        let text = report.to_string();
        assert!(text.starts_with("tenant t1: refused: 0 listed"), "{text}");
        assert!(
            text.contains("refused by too many left: 13 of 50 active members"),
            "{text}"
        );
        assert!(
            text.contains("AVSYNC_RECONCILE_MAX_LEFT_PERCENT=20% and AVSYNC_RECONCILE_MAX_LEFT=10"),
            "{text}"
        );
        assert!(text.contains("--force"), "{text}");
        assert!(!report.ok());
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["refusals"][0]["rule"], "too_many_left");
        assert_eq!(json["refusals"][0]["max_left"], 10);
        let dry = Report {
            dry_run: true,
            ..report.clone()
        };
        assert!(
            dry.to_string()
                .contains("would be refused by too many left"),
            "{dry}"
        );
        assert!(Report::new("t1", RunOutcome::Busy).ok());
    }

    #[test]
    fn departures_are_refused_only_beyond_both_the_share_and_the_count() {
        let bound = LeftBound {
            max_percent: 20,
            max_count: 10,
        };
        for (flipping, active, refused) in [
            (1, 3, false),   // 33 % but one member: a small tenant's routine departure
            (10, 10, false), // every member, but not more than 10
            (11, 11, true),
            (11, 100, false), // more than 10, but 11 %
            (20, 100, false), // exactly 20 %
            (21, 100, true),
            (0, 0, false),
        ] {
            assert_eq!(
                bound.refuses(flipping, active),
                refused,
                "{flipping} of {active}"
            );
        }
        let by_share_alone = LeftBound {
            max_percent: 20,
            max_count: 0,
        };
        assert!(by_share_alone.refuses(1, 3));
        let never = LeftBound {
            max_percent: 100,
            max_count: 0,
        };
        assert!(!never.refuses(5, 5));
    }

    #[test]
    fn backfill_creates_every_listed_member_but_the_invited() {
        let members = [
            member("a", MemberStatus::Active, &[("admin", "app")]),
            member("b", MemberStatus::Suspended, &[]),
            member("c", MemberStatus::Invited, &[]),
        ];
        let p = plan(
            &tenant(),
            Some("app"),
            &members,
            at("2026-08-21T01:00:00Z"),
            vec![],
            DEFAULT_BOUND,
        );
        assert_eq!(p.counts.created, 2);
        assert_eq!(p.counts.listed, 2);
        assert!(p.refusals.is_empty());
        assert_eq!(p.effects.len(), 2);
    }

    #[test]
    fn unlisted_rows_become_left_and_guard_rails_count() {
        let mut model = Model::default();
        for (i, sub) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            model.apply_versioned(
                sub,
                &format!("2026-08-21T00:00:0{i}.000000Z|e{i}"),
                &[
                    Change::TenantId(tenant()),
                    Change::MembershipStatus(MembershipStatus::Active),
                    Change::AppRole(Some("admin".into())),
                ],
            );
        }
        let rows = || {
            ["a", "b", "c", "d", "e"]
                .map(|s| stored(&model, s))
                .to_vec()
        };
        let keep = |subs: &[&str]| -> Vec<Membership> {
            subs.iter()
                .map(|s| member(s, MemberStatus::Active, &[("admin", "app")]))
                .collect()
        };
        let t = at("2026-08-21T01:00:00Z");
        // The share alone, as a count of 0 makes it.
        let share = LeftBound {
            max_percent: 20,
            max_count: 0,
        };
        let planned =
            |members: &[Membership], bound| plan(&tenant(), Some("app"), members, t, rows(), bound);
        // One of five leaving is 20%: allowed.
        let p = planned(&keep(&["a", "b", "c", "d"]), share);
        assert_eq!(p.counts.marked_left, 1);
        assert!(p.refusals.is_empty(), "{:?}", p.refusals);
        // Two of five is 40%.
        let p = planned(&keep(&["a", "b", "c"]), share);
        assert_eq!(
            p.refusals,
            vec![Refusal::TooManyLeft {
                flipping: 2,
                active_in_db: 5,
                max_percent: 20,
                max_left: 0,
            }]
        );
        // At the defaults two departures of five pass: not more than 10.
        let p = planned(&keep(&["a", "b", "c"]), DEFAULT_BOUND);
        assert!(p.refusals.is_empty(), "{:?}", p.refusals);
        let p = planned(&[], DEFAULT_BOUND);
        assert_eq!(p.refusals, vec![Refusal::EmptySnapshot { active_in_db: 5 }]);
        let roleless: Vec<Membership> = ["a", "b", "c", "d", "e"]
            .iter()
            .map(|s| member(s, MemberStatus::Active, &[]))
            .collect();
        let p = planned(&roleless, DEFAULT_BOUND);
        assert_eq!(
            p.refusals,
            vec![Refusal::NoRoles {
                listed: 5,
                with_app_role_in_db: 5
            }]
        );
        // A snapshot older than every row's events changes nothing and refuses nothing.
        let old = at("2026-08-20T00:00:00Z");
        let p = plan(&tenant(), Some("app"), &[], old, rows(), DEFAULT_BOUND);
        assert_eq!(p.counts.marked_left, 0);
        assert_eq!(p.counts.unchanged, 5);
        assert_eq!(p.refusals, vec![Refusal::EmptySnapshot { active_in_db: 5 }]);
    }

    const USERS: [&str; 3] = ["u0", "u1", "u2"];
    const BASE: i64 = 1_787_276_400_000_000; // 2026-08-21T01:40:00Z

    fn time(ms: u8) -> EventTime {
        EventTime::from_micros(BASE + i64::from(ms) * 1_000).unwrap()
    }

    /// A webhook's effect on a field a snapshot also sets (or `tenant_roles`, which it never does).
    fn webhook_change() -> impl Strategy<Value = Change> {
        let text = || prop_oneof![Just(None), "[ab]".prop_map(Some)];
        prop_oneof![
            text().prop_map(Change::Email),
            text().prop_map(Change::GivenName),
            "m[ab]".prop_map(Change::MembershipId),
            prop_oneof![
                Just(MembershipStatus::Active),
                Just(MembershipStatus::Suspended),
                Just(MembershipStatus::Left)
            ]
            .prop_map(Change::MembershipStatus),
            any::<bool>().prop_map(Change::HasAppAccess),
            text().prop_map(Change::AppRole),
            text().prop_map(Change::AppRoleName),
            proptest::collection::vec("[rs]", 0..2).prop_map(Change::TenantRoles),
        ]
    }

    fn webhook(index: usize) -> impl Strategy<Value = Effect> {
        (
            0..USERS.len(),
            0..6u8,
            "[a-c]",
            proptest::collection::vec(webhook_change(), 1..4),
        )
            .prop_map(move |(user, ms, prefix, mut changes)| {
                changes.sort_by_key(Change::field);
                changes.dedup_by_key(|c| c.field());
                changes.push(Change::TenantId(tenant()));
                Effect {
                    key: EventKey {
                        time: time(ms),
                        id: format!("{prefix}{index}"),
                    },
                    sub: USERS[user].to_owned(),
                    changes,
                }
            })
    }

    fn snapshot_member() -> impl Strategy<Value = Option<Membership>> {
        let status = prop_oneof![
            Just(MemberStatus::Active),
            Just(MemberStatus::Suspended),
            Just(MemberStatus::Invited)
        ];
        let roles =
            proptest::collection::vec(("[ab]", prop_oneof![Just("app"), Just("other")]), 0..2);
        proptest::option::of((status, roles, proptest::option::of("[ab]"))).prop_map(|m| {
            m.map(|(status, roles, email)| {
                let mut member = member("", status, &[]);
                member.user.email = email;
                member.roles = roles
                    .into_iter()
                    .map(|(slug, app)| Role {
                        id: format!("r-{slug}"),
                        name: Some(slug.to_uppercase()),
                        slug: Some(slug),
                        application_id: Some(app.to_owned()),
                    })
                    .collect();
                member
            })
        })
    }

    /// A snapshot: its instant and, per user, the membership it lists (or none).
    type Snapshot = (EventTime, Vec<Membership>);

    fn snapshots() -> impl Strategy<Value = Vec<Snapshot>> {
        // Distinct instants: two snapshots of one microsecond would tie with each other.
        proptest::sample::subsequence((0..6u8).collect::<Vec<_>>(), 0..4).prop_flat_map(|times| {
            times
                .into_iter()
                .map(|ms| {
                    proptest::collection::vec(snapshot_member(), USERS.len()).prop_map(
                        move |members| {
                            let listed = members
                                .into_iter()
                                .zip(USERS)
                                .filter_map(|(m, user)| {
                                    let mut m = m?;
                                    m.user.id = user.to_owned();
                                    m.id = format!("m-{user}");
                                    Some(m)
                                })
                                .collect();
                            (time(ms), listed)
                        },
                    )
                })
                .collect::<Vec<_>>()
        })
    }

    enum Arrival<'a> {
        Webhook(&'a Effect),
        Snapshot(&'a Snapshot),
    }

    /// Every field's setter: `(instant, kind, id)` with kind 0 for a snapshot and 1 for a
    /// webhook, so a tie of instants goes to the webhook.
    fn spec(seeds: &[Effect], webhooks: &[Effect], snapshots: &[Snapshot]) -> Vec<Identity> {
        let mut setters: Vec<((EventTime, u8, String), &str, Change)> = Vec::new();
        for e in seeds.iter().chain(webhooks) {
            for c in &e.changes {
                setters.push(((e.key.time, 1, e.key.id.clone()), &e.sub, c.clone()));
            }
        }
        for (at, members) in snapshots {
            for user in USERS {
                let changes = match members.iter().find(|m| m.user.id == user) {
                    Some(m) => match joined_status(m.status) {
                        Some(status) => member_changes(&tenant(), Some("app"), m, status),
                        None => left_changes(true),
                    },
                    None => left_changes(true),
                };
                for c in changes {
                    setters.push(((*at, 0, String::new()), user, c));
                }
            }
        }
        setters.sort_by(|a, b| a.0.cmp(&b.0));
        let mut model = Model::default();
        for (i, (_, sub, change)) in setters.into_iter().enumerate() {
            // Sorted ascending, so each later setter is the greater one.
            model.apply_versioned(sub, &format!("{i:08}"), &[change]);
        }
        model.identities()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn webhooks_and_snapshots_in_any_order_give_the_greatest_setter_of_each_field(
            (webhooks, snapshots, order) in (
                (0..12usize).prop_flat_map(|n| (0..n).map(webhook).collect::<Vec<_>>()),
                snapshots(),
            )
                .prop_flat_map(|(webhooks, snapshots)| {
                    let order: Vec<usize> = (0..webhooks.len() + snapshots.len()).collect();
                    (Just(webhooks), Just(snapshots), Just(order).prop_shuffle())
                })
        ) {
            // Every row exists before the first snapshot (a snapshot marks left only the rows it
            // finds), made by the oldest event of all.
            let seeds: Vec<Effect> = USERS
                .iter()
                .map(|user| Effect {
                    key: EventKey { time: time(0), id: format!("!seed-{user}") },
                    sub: (*user).to_owned(),
                    changes: vec![Change::TenantId(tenant())],
                })
                .collect();
            let mut model = Model::default();
            for seed in &seeds {
                model.apply(seed);
            }
            let arrivals: Vec<Arrival> = order
                .iter()
                .map(|&i| match webhooks.get(i) {
                    Some(e) => Arrival::Webhook(e),
                    None => Arrival::Snapshot(&snapshots[i - webhooks.len()]),
                })
                .collect();
            for arrival in arrivals {
                match arrival {
                    Arrival::Webhook(e) => model.apply(e),
                    Arrival::Snapshot((at, members)) => {
                        let p = plan(&tenant(), Some("app"), members, *at, model.stored_rows(), NO_BOUND);
                        for e in &p.effects {
                            model.apply_versioned(&e.sub, &e.version, &e.changes);
                        }
                    }
                }
            }
            prop_assert_eq!(model.identities(), spec(&seeds, &webhooks, &snapshots));
        }
    }
}
