//! The typed event: its place in the event order and what it sets, decoded once from the body.
//!
//! The rules of contract section 6 that say *which* fields an event sets live here, as data: an
//! [`Effect`] lists [`Change`]s. How those changes merge into a stored row (the invariant) lives in
//! the worker's `apply` module.

use crate::envelope::Envelope;
use crate::tenant::TenantId;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::fmt;

/// Every event type AuthVital sends today. Metrics carry one label value per entry plus `other`.
pub const KNOWN_TYPES: [&str; 19] = [
    "subject.created",
    "subject.updated",
    "subject.deleted",
    "subject.deactivated",
    "member.joined",
    "member.left",
    "member.role_changed",
    "member.suspended",
    "member.activated",
    "app_access.granted",
    "app_access.revoked",
    "app_access.role_changed",
    "invite.created",
    "invite.accepted",
    "invite.deleted",
    "invite.expired",
    "license.assigned",
    "license.revoked",
    "license.changed",
];

/// The metric label of an event type: the type itself when known, else `other`, so that a
/// sender inventing types cannot grow the label set.
pub fn type_label(event_type: &str) -> &'static str {
    KNOWN_TYPES
        .iter()
        .find(|known| **known == event_type)
        .copied()
        .unwrap_or("other")
}

/// An event's instant in UTC, truncated to microseconds (PostgreSQL's `timestamptz` precision).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventTime {
    micros: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("timestamp {0:?} is not RFC 3339 with `Z` or an offset between years 0000 and 9999 UTC (e.g. 2026-08-21T01:40:03.512Z)")]
pub struct InvalidTimestamp(pub String);

/// `YYYY-MM-DDTHH:MM:SS(.fraction)?(Z|±HH:MM)`, with `T`/`Z` in either case as RFC 3339 allows.
/// chrono alone would also take a space for the `T` and other near misses.
fn has_rfc3339_shape(s: &[u8]) -> bool {
    fn digits(s: &[u8]) -> bool {
        !s.is_empty() && s.iter().all(u8::is_ascii_digit)
    }
    if s.len() < 20 {
        return false;
    }
    let (date_time, rest) = s.split_at(19);
    let shape_ok = digits(&date_time[0..4])
        && date_time[4] == b'-'
        && digits(&date_time[5..7])
        && date_time[7] == b'-'
        && digits(&date_time[8..10])
        && matches!(date_time[10], b'T' | b't')
        && digits(&date_time[11..13])
        && date_time[13] == b':'
        && digits(&date_time[14..16])
        && date_time[16] == b':'
        && digits(&date_time[17..19]);
    if !shape_ok {
        return false;
    }
    let rest = match rest.strip_prefix(b".") {
        Some(fraction) => {
            let n = fraction.iter().take_while(|b| b.is_ascii_digit()).count();
            if n == 0 {
                return false;
            }
            &fraction[n..]
        }
        None => rest,
    };
    match rest {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => digits(&[*h1, *h2, *m1, *m2]),
        _ => false,
    }
}

impl EventTime {
    const MIN_MICROS: i64 = -62_167_219_200_000_000; // 0000-01-01T00:00:00Z
    const MAX_MICROS: i64 = 253_402_300_799_999_999; // 9999-12-31T23:59:59.999999Z

    pub fn parse(value: &str) -> Result<Self, InvalidTimestamp> {
        let invalid = || InvalidTimestamp(value.to_owned());
        if !has_rfc3339_shape(value.as_bytes()) {
            return Err(invalid());
        }
        let parsed = DateTime::parse_from_rfc3339(value).map_err(|_| invalid())?;
        Self::from_micros(parsed.with_timezone(&Utc).timestamp_micros()).ok_or_else(invalid)
    }

    /// Only instants whose UTC year has four digits: their fixed-width text sorts like the instant.
    pub fn from_micros(micros: i64) -> Option<Self> {
        (Self::MIN_MICROS..=Self::MAX_MICROS)
            .contains(&micros)
            .then_some(Self { micros })
    }

    pub fn as_micros(self) -> i64 {
        self.micros
    }

    pub fn to_utc(self) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(self.micros).unwrap_or_default()
    }
}

/// Fixed width, always six fraction digits and `Z`: `2026-08-21T01:40:03.512000Z`. Bytewise order
/// of this text equals the order of the instants.
impl fmt::Display for EventTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_utc().to_rfc3339_opts(SecondsFormat::Micros, true))
    }
}

/// The event order: by instant, ties broken by event id compared bytewise.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventKey {
    pub time: EventTime,
    pub id: String,
}

impl EventKey {
    /// `<time>|<id>`: bytewise (`COLLATE "C"`) order of this text equals the order of the keys,
    /// because the time part has a fixed width. Stored as a field's version in the database.
    pub fn version(&self) -> String {
        format!("{}|{}", self.time, self.id)
    }
}

/// What an event type does, per contract section 6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    SubjectCreated,
    SubjectUpdated,
    SubjectDeleted,
    SubjectDeactivated,
    MemberJoined,
    MemberLeft,
    MemberRoleChanged,
    MemberSuspended,
    MemberActivated,
    AppAccessGranted,
    AppAccessRevoked,
    AppAccessRoleChanged,
    InviteAccepted,
    /// Other `invite.*`, `license.*` and unknown types: acknowledged, never applied.
    SetsNothing,
}

impl EventKind {
    pub fn of(event_type: &str) -> Self {
        match event_type {
            "subject.created" => Self::SubjectCreated,
            "subject.updated" => Self::SubjectUpdated,
            "subject.deleted" => Self::SubjectDeleted,
            "subject.deactivated" => Self::SubjectDeactivated,
            "member.joined" => Self::MemberJoined,
            "member.left" => Self::MemberLeft,
            "member.role_changed" => Self::MemberRoleChanged,
            "member.suspended" => Self::MemberSuspended,
            "member.activated" => Self::MemberActivated,
            "app_access.granted" => Self::AppAccessGranted,
            "app_access.revoked" => Self::AppAccessRevoked,
            "app_access.role_changed" => Self::AppAccessRoleChanged,
            "invite.accepted" => Self::InviteAccepted,
            _ => Self::SetsNothing,
        }
    }

    pub fn sets_something(self) -> bool {
        self != Self::SetsNothing
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// The profile fields, in the order events list them, with the change each one makes.
type Setter = fn(Option<String>) -> Change;
const PROFILE: [(&str, Setter); 3] = [
    ("email", Change::Email),
    ("given_name", Change::GivenName),
    ("family_name", Change::FamilyName),
];

/// The `data` object, read leniently: wrong types count as absent, `""` as unknown.
struct Data<'a>(Option<&'a Map<String, Value>>);

impl<'a> Data<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.and_then(|m| m.get(key))
    }

    /// "Present": the key holds a non-empty string.
    fn present(&self, key: &'static str) -> Result<Option<String>, EventError> {
        match self.get(key) {
            Some(Value::String(s)) if !s.is_empty() => no_nul(key, s).map(Some),
            _ => Ok(None),
        }
    }

    /// The array of strings at `key` when it is an array (non-strings in it are skipped), else `{}`.
    fn roles(&self, key: &'static str) -> Result<Vec<String>, EventError> {
        match self.get(key) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .map(|s| no_nul(key, s))
                .collect(),
            _ => Ok(Vec::new()),
        }
    }

    fn profile_present(&self, changes: &mut Vec<Change>) -> Result<(), EventError> {
        for (key, set) in PROFILE {
            if let Some(value) = self.present(key)? {
                changes.push(set(Some(value)));
            }
        }
        Ok(())
    }

    /// `subject.updated`: with a non-empty `changed_fields`, only the profile fields it names, where
    /// an explicit null clears; otherwise every profile field present.
    fn profile_changed(&self, changes: &mut Vec<Change>) -> Result<(), EventError> {
        let listed: Vec<&str> = match self.get("changed_fields") {
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if listed.is_empty() {
            return self.profile_present(changes);
        }
        for (key, set) in PROFILE {
            if !listed.contains(&key) {
                continue;
            }
            match self.get(key) {
                Some(Value::Null) => changes.push(set(None)),
                Some(Value::String(s)) if !s.is_empty() => changes.push(set(Some(no_nul(key, s)?))),
                _ => {}
            }
        }
        Ok(())
    }
}

fn no_nul(key: &'static str, s: &str) -> Result<String, EventError> {
    if s.contains('\0') {
        Err(EventError::NulCharacter(key))
    } else {
        Ok(s.to_owned())
    }
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

impl Data<'_> {
    fn app_role_present(&self, changes: &mut Vec<Change>) -> Result<(), EventError> {
        let roles: [(&'static str, Setter); 3] = [
            ("role_slug", Change::AppRole),
            ("role_id", Change::AppRoleId),
            ("role_name", Change::AppRoleName),
        ];
        for (key, set) in roles {
            if let Some(value) = self.present(key)? {
                changes.push(set(Some(value)));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
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
    fn timestamps_are_instants_truncated_to_microseconds() {
        let a = EventTime::parse("2026-08-21T01:40:03.512Z").unwrap();
        let b = EventTime::parse("2026-08-21T03:40:03.512+02:00").unwrap();
        let c = EventTime::parse("2026-08-21T01:40:03.5120009z").unwrap();
        let d = EventTime::parse("2026-08-20t20:40:03.512-05:00").unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(a, d);
        assert_eq!(a.to_string(), "2026-08-21T01:40:03.512000Z");
        assert_eq!(
            EventTime::parse("2026-08-21T01:40:03Z")
                .unwrap()
                .to_string(),
            "2026-08-21T01:40:03.000000Z"
        );
    }

    #[test]
    fn other_timestamp_forms_are_invalid() {
        for bad in [
            "",
            "2026-08-21",
            "2026-08-21T01:40:03",
            "2026-08-21 01:40:03Z",
            "2026-08-21T01:40:03.Z",
            "2026-08-21T01:40:03+0200",
            "2026-08-21T01:40:03+02",
            "2026-13-21T01:40:03Z",
            "2026-02-30T01:40:03Z",
            "2026-08-21T25:40:03Z",
            "1787276405",
            "Fri, 21 Aug 2026 01:40:03 GMT",
            "+12026-08-21T01:40:03Z",
            "0000-01-01T00:30:00+01:00",
            " 2026-08-21T01:40:03Z",
        ] {
            assert!(EventTime::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keys_order_by_time_then_id_bytewise() {
        let t = |s| EventTime::parse(s).unwrap();
        let k = |time, id: &str| EventKey {
            time,
            id: id.to_owned(),
        };
        let early = t("2026-08-21T01:40:03.512Z");
        let late = t("2026-08-21T01:40:03.513Z");
        assert!(k(early, "z") < k(late, "a"));
        assert!(k(early, "B") < k(early, "a"));
        assert!(k(early, "a") < k(early, "ab"));
        assert!(k(early, "z").version() < k(late, "a").version());
    }

    proptest! {
        #[test]
        fn version_text_sorts_like_the_key(
            a in EventTime::MIN_MICROS..=EventTime::MAX_MICROS,
            b in EventTime::MIN_MICROS..=EventTime::MAX_MICROS,
            ida in "[ -~]{0,6}",
            idb in "[ -~]{0,6}",
            same_time in any::<bool>(),
        ) {
            let b = if same_time { a } else { b };
            let ka = EventKey { time: EventTime::from_micros(a).unwrap(), id: ida };
            let kb = EventKey { time: EventTime::from_micros(b).unwrap(), id: idb };
            prop_assert_eq!(ka.cmp(&kb), ka.version().as_bytes().cmp(kb.version().as_bytes()));
            prop_assert_eq!(EventTime::parse(&ka.time.to_string()).unwrap(), ka.time);
        }
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

    #[test]
    fn labels() {
        assert_eq!(type_label("member.joined"), "member.joined");
        assert_eq!(type_label("tenant.created"), "other");
    }
}
