//! What an event sets: the rules of contract section 6 that say *which* fields an event sets
//! live here, as data: an [`Effect`] lists [`Change`]s. How those changes merge into a stored row
//! (the invariant) lives in the worker's `apply` module.

use super::catalogue::EventKind;
use super::data::{no_nul, Data};
use super::order::{EventKey, EventTime, InvalidTimestamp};
use crate::envelope::Envelope;
use crate::tenant::TenantId;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum MembershipStatus {
    Active,
    Suspended,
    Left,
}

impl MembershipStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Suspended => "suspended",
            Self::Left => "left",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "active" => Some(Self::Active),
            "suspended" => Some(Self::Suspended),
            "left" => Some(Self::Left),
            _ => None,
        }
    }
}

/// A column of `av_identities` that events set. Each has its own version in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    TenantId,
    Email,
    GivenName,
    FamilyName,
    SubjectType,
    IsActive,
    DeletedAt,
    MembershipId,
    MembershipStatus,
    TenantRoles,
    HasAppAccess,
    AppRole,
    AppRoleId,
    AppRoleName,
}

impl Field {
    pub const ALL: [Field; 14] = [
        Field::TenantId,
        Field::Email,
        Field::GivenName,
        Field::FamilyName,
        Field::SubjectType,
        Field::IsActive,
        Field::DeletedAt,
        Field::MembershipId,
        Field::MembershipStatus,
        Field::TenantRoles,
        Field::HasAppAccess,
        Field::AppRole,
        Field::AppRoleId,
        Field::AppRoleName,
    ];

    /// The column name, which is also the field's key in the stored versions.
    pub fn column(self) -> &'static str {
        match self {
            Field::TenantId => "tenant_id",
            Field::Email => "email",
            Field::GivenName => "given_name",
            Field::FamilyName => "family_name",
            Field::SubjectType => "subject_type",
            Field::IsActive => "is_active",
            Field::DeletedAt => "deleted_at",
            Field::MembershipId => "membership_id",
            Field::MembershipStatus => "membership_status",
            Field::TenantRoles => "tenant_roles",
            Field::HasAppAccess => "has_app_access",
            Field::AppRole => "app_role",
            Field::AppRoleId => "app_role_id",
            Field::AppRoleName => "app_role_name",
        }
    }
}

/// One field set to one value. The variant fixes the value's type to the column's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    TenantId(TenantId),
    Email(Option<String>),
    GivenName(Option<String>),
    FamilyName(Option<String>),
    SubjectType(String),
    IsActive(bool),
    DeletedAt(Option<EventTime>),
    MembershipId(String),
    MembershipStatus(MembershipStatus),
    TenantRoles(Vec<String>),
    HasAppAccess(bool),
    AppRole(Option<String>),
    AppRoleId(Option<String>),
    AppRoleName(Option<String>),
}

impl Change {
    pub fn field(&self) -> Field {
        match self {
            Change::TenantId(_) => Field::TenantId,
            Change::Email(_) => Field::Email,
            Change::GivenName(_) => Field::GivenName,
            Change::FamilyName(_) => Field::FamilyName,
            Change::SubjectType(_) => Field::SubjectType,
            Change::IsActive(_) => Field::IsActive,
            Change::DeletedAt(_) => Field::DeletedAt,
            Change::MembershipId(_) => Field::MembershipId,
            Change::MembershipStatus(_) => Field::MembershipStatus,
            Change::TenantRoles(_) => Field::TenantRoles,
            Change::HasAppAccess(_) => Field::HasAppAccess,
            Change::AppRole(_) => Field::AppRole,
            Change::AppRoleId(_) => Field::AppRoleId,
            Change::AppRoleName(_) => Field::AppRoleName,
        }
    }
}

/// Why an event that should set something cannot be applied. Each is permanent: redelivering
/// the same bytes cannot fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error(transparent)]
    InvalidTimestamp(#[from] InvalidTimestamp),
    #[error("`data.sub` is missing or not a non-empty string; AuthVital must send the subject of a `{0}` event")]
    MissingSub(String),
    #[error("`{0}` holds a NUL character, which PostgreSQL text cannot store")]
    NulCharacter(&'static str),
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
}

/// What one event does to the row of `sub`: its place in the event order and the fields it sets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Effect {
    pub key: EventKey,
    pub sub: String,
    /// Never empty, at most one change per field, and always including `tenant_id`.
    pub changes: Vec<Change>,
}

#[derive(Deserialize)]
struct DataOnly {
    #[serde(default)]
    data: Option<Value>,
}

impl Effect {
    /// What the event in `body` (whose envelope is `envelope`) sets, or `None` when it sets nothing.
    /// Types that set nothing are recognised before anything else is read, so their timestamp and
    /// data are never checked.
    pub fn decode(envelope: &Envelope, body: &[u8]) -> Result<Option<Self>, EventError> {
        let kind = EventKind::of(&envelope.event_type);
        if !kind.sets_something() {
            return Ok(None);
        }
        let time = EventTime::parse(&envelope.timestamp)?;
        let id = no_nul("id", &envelope.id)?;
        let raw: DataOnly =
            serde_json::from_slice(body).map_err(|e| EventError::NotJson(e.to_string()))?;
        let data = Data(raw.data.as_ref().and_then(Value::as_object));
        let sub = match data.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => no_nul("data.sub", s)?,
            _ => return Err(EventError::MissingSub(envelope.event_type.clone())),
        };
        let mut changes = Vec::new();
        match kind {
            EventKind::SubjectCreated => {
                data.profile_present(&mut changes)?;
                if let Some(t) = data.present("subject_type")? {
                    changes.push(Change::SubjectType(t));
                }
                changes.push(Change::IsActive(true));
                changes.push(Change::DeletedAt(None));
            }
            EventKind::SubjectUpdated => data.profile_changed(&mut changes)?,
            EventKind::SubjectDeleted => changes.push(Change::DeletedAt(Some(time))),
            EventKind::SubjectDeactivated => changes.push(Change::IsActive(false)),
            EventKind::MemberJoined => {
                if let Some(m) = data.present("membership_id")? {
                    changes.push(Change::MembershipId(m));
                }
                changes.push(Change::MembershipStatus(MembershipStatus::Active));
                changes.push(Change::TenantRoles(data.roles("tenant_roles")?));
                data.profile_present(&mut changes)?;
            }
            EventKind::MemberLeft => {
                changes.push(Change::MembershipStatus(MembershipStatus::Left));
                changes.push(Change::TenantRoles(Vec::new()));
            }
            EventKind::MemberRoleChanged => {
                changes.push(Change::TenantRoles(data.roles("tenant_roles")?));
            }
            EventKind::MemberSuspended => {
                changes.push(Change::MembershipStatus(MembershipStatus::Suspended));
            }
            EventKind::MemberActivated => {
                changes.push(Change::MembershipStatus(MembershipStatus::Active));
            }
            EventKind::AppAccessGranted => {
                changes.push(Change::HasAppAccess(true));
                data.app_role_present(&mut changes)?;
                data.profile_present(&mut changes)?;
            }
            EventKind::AppAccessRevoked => {
                changes.push(Change::HasAppAccess(false));
                changes.push(Change::AppRole(None));
                changes.push(Change::AppRoleId(None));
                changes.push(Change::AppRoleName(None));
            }
            EventKind::AppAccessRoleChanged => data.app_role_present(&mut changes)?,
            EventKind::InviteAccepted => data.profile_present(&mut changes)?,
            EventKind::SetsNothing => {}
        }
        if changes.is_empty() {
            return Ok(None);
        }
        changes.push(Change::TenantId(envelope.tenant_id.clone()));
        Ok(Some(Self {
            key: EventKey { time, id },
            sub,
            changes,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn effect(event_type: &str, data: Value) -> Result<Option<Effect>, EventError> {
        let body = json!({
            "id": "e1", "type": event_type, "tenant_id": "t1",
            "timestamp": "2026-08-21T01:40:03.512Z", "data": data,
        })
        .to_string();
        let envelope = Envelope::decode(body.as_bytes()).expect("envelope");
        Effect::decode(&envelope, body.as_bytes())
    }

    fn changes(event_type: &str, data: Value) -> Vec<Change> {
        effect(event_type, data)
            .expect("decodes")
            .expect("sets something")
            .changes
    }

    fn tenant() -> Change {
        Change::TenantId(TenantId::parse("t1").unwrap())
    }

    fn s(v: &str) -> Option<String> {
        Some(v.to_owned())
    }

    #[test]
    fn subject_created_sets_present_profile_fields_and_revives() {
        assert_eq!(
            changes(
                "subject.created",
                json!({"sub": "u", "email": "a@x", "given_name": "", "family_name": null, "subject_type": "user", "extra": 1})
            ),
            vec![
                Change::Email(s("a@x")),
                Change::SubjectType("user".into()),
                Change::IsActive(true),
                Change::DeletedAt(None),
                tenant()
            ]
        );
    }

    #[test]
    fn subject_updated_with_changed_fields_clears_only_listed_nulls() {
        assert_eq!(
            changes(
                "subject.updated",
                json!({"sub": "u", "changed_fields": ["email", "given_name", "locale"],
                       "email": null, "given_name": "", "family_name": null})
            ),
            vec![Change::Email(None), tenant()]
        );
        assert_eq!(
            changes(
                "subject.updated",
                json!({"sub": "u", "changed_fields": ["family_name"], "email": "a@x", "family_name": "D"})
            ),
            vec![Change::FamilyName(s("D")), tenant()]
        );
    }

    #[test]
    fn subject_updated_without_changed_fields_sets_every_present_field() {
        for listed in [json!(null), json!([]), json!("email")] {
            assert_eq!(
                changes(
                    "subject.updated",
                    json!({"sub": "u", "changed_fields": listed, "email": null, "given_name": "G", "family_name": "F"})
                ),
                vec![
                    Change::GivenName(s("G")),
                    Change::FamilyName(s("F")),
                    tenant()
                ]
            );
        }
    }

    #[test]
    fn an_event_that_ends_up_setting_nothing_is_none() {
        assert_eq!(
            effect(
                "subject.updated",
                json!({"sub": "u", "changed_fields": ["locale"], "email": "a@x"})
            ),
            Ok(None)
        );
        assert_eq!(
            effect("invite.accepted", json!({"sub": "u", "email": ""})),
            Ok(None)
        );
        assert_eq!(
            effect(
                "app_access.role_changed",
                json!({"sub": "u", "role_slug": ""})
            ),
            Ok(None)
        );
    }

    #[test]
    fn member_events() {
        assert_eq!(
            changes(
                "member.joined",
                json!({"sub": "u", "membership_id": "m1", "tenant_roles": ["owner", 3, "admin"], "given_name": "G"})
            ),
            vec![
                Change::MembershipId("m1".into()),
                Change::MembershipStatus(MembershipStatus::Active),
                Change::TenantRoles(vec!["owner".into(), "admin".into()]),
                Change::GivenName(s("G")),
                tenant()
            ]
        );
        assert_eq!(
            changes(
                "member.joined",
                json!({"sub": "u", "tenant_roles": "owner"})
            ),
            vec![
                Change::MembershipStatus(MembershipStatus::Active),
                Change::TenantRoles(vec![]),
                tenant()
            ]
        );
        assert_eq!(
            changes("member.left", json!({"sub": "u", "tenant_roles": ["x"]})),
            vec![
                Change::MembershipStatus(MembershipStatus::Left),
                Change::TenantRoles(vec![]),
                tenant()
            ]
        );
        assert_eq!(
            changes(
                "member.role_changed",
                json!({"sub": "u", "tenant_roles": null})
            ),
            vec![Change::TenantRoles(vec![]), tenant()]
        );
        assert_eq!(
            changes("member.suspended", json!({"sub": "u"})),
            vec![
                Change::MembershipStatus(MembershipStatus::Suspended),
                tenant()
            ]
        );
        assert_eq!(
            changes("member.activated", json!({"sub": "u"})),
            vec![Change::MembershipStatus(MembershipStatus::Active), tenant()]
        );
    }

    #[test]
    fn app_access_events() {
        assert_eq!(
            changes(
                "app_access.granted",
                json!({"sub": "u", "role_slug": "admin", "role_id": "", "role_name": null, "email": "a@x"})
            ),
            vec![
                Change::HasAppAccess(true),
                Change::AppRole(s("admin")),
                Change::Email(s("a@x")),
                tenant()
            ]
        );
        assert_eq!(
            changes("app_access.revoked", json!({"sub": "u", "role_slug": "x"})),
            vec![
                Change::HasAppAccess(false),
                Change::AppRole(None),
                Change::AppRoleId(None),
                Change::AppRoleName(None),
                tenant()
            ]
        );
        assert_eq!(
            changes(
                "app_access.role_changed",
                json!({"sub": "u", "role_slug": "s", "role_id": "i", "role_name": "n"})
            ),
            vec![
                Change::AppRole(s("s")),
                Change::AppRoleId(s("i")),
                Change::AppRoleName(s("n")),
                tenant()
            ]
        );
    }

    #[test]
    fn subject_deleted_and_deactivated() {
        let time = EventTime::parse("2026-08-21T01:40:03.512Z").unwrap();
        assert_eq!(
            changes("subject.deleted", json!({"sub": "u"})),
            vec![Change::DeletedAt(Some(time)), tenant()]
        );
        assert_eq!(
            changes("subject.deactivated", json!({"sub": "u"})),
            vec![Change::IsActive(false), tenant()]
        );
    }

    #[test]
    fn types_that_set_nothing_are_not_read_further() {
        for t in ["invite.created", "license.assigned", "tenant.created", "x"] {
            let body = format!(
                r#"{{"id":"e","type":"{t}","tenant_id":"t","timestamp":"yesterday","data":5}}"#
            );
            let envelope = Envelope::decode(body.as_bytes()).unwrap();
            assert_eq!(Effect::decode(&envelope, body.as_bytes()), Ok(None), "{t}");
        }
    }

    #[test]
    fn bad_events_are_errors() {
        for data in [
            json!({}),
            json!({"sub": ""}),
            json!({"sub": 7}),
            json!(null),
        ] {
            assert_eq!(
                effect("member.left", data),
                Err(EventError::MissingSub("member.left".into()))
            );
        }
        assert_eq!(
            effect("subject.created", json!({"sub": "u", "email": "a\u{0}b"})),
            Err(EventError::NulCharacter("email"))
        );
        let body = r#"{"id":"e","type":"member.left","tenant_id":"t","timestamp":"2026-08-21T01:40:03","data":{"sub":"u"}}"#;
        let envelope = Envelope::decode(body.as_bytes()).unwrap();
        assert!(matches!(
            Effect::decode(&envelope, body.as_bytes()),
            Err(EventError::InvalidTimestamp(_))
        ));
    }
}
