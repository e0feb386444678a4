//! The `data` object of an event body, read leniently: wrong types count as absent, `""` as
//! unknown, and no string that would be stored may hold a NUL.

use super::effect::{Change, EventError};
use serde_json::{Map, Value};

/// The profile fields, in the order events list them, with the change each one makes.
type Setter = fn(Option<String>) -> Change;
const PROFILE: [(&str, Setter); 3] = [
    ("email", Change::Email),
    ("given_name", Change::GivenName),
    ("family_name", Change::FamilyName),
];

/// The `data` object, read leniently.
pub(super) struct Data<'a>(pub(super) Option<&'a Map<String, Value>>);

impl<'a> Data<'a> {
    pub(super) fn get(&self, key: &str) -> Option<&'a Value> {
        self.0.and_then(|m| m.get(key))
    }

    /// "Present": the key holds a non-empty string.
    pub(super) fn present(&self, key: &'static str) -> Result<Option<String>, EventError> {
        match self.get(key) {
            Some(Value::String(s)) if !s.is_empty() => no_nul(key, s).map(Some),
            _ => Ok(None),
        }
    }

    /// The array of strings at `key` when it is an array (non-strings in it are skipped), else `{}`.
    pub(super) fn roles(&self, key: &'static str) -> Result<Vec<String>, EventError> {
        match self.get(key) {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .map(|s| no_nul(key, s))
                .collect(),
            _ => Ok(Vec::new()),
        }
    }

    pub(super) fn profile_present(&self, changes: &mut Vec<Change>) -> Result<(), EventError> {
        for (key, set) in PROFILE {
            if let Some(value) = self.present(key)? {
                changes.push(set(Some(value)));
            }
        }
        Ok(())
    }

    /// `subject.updated`: with a non-empty `changed_fields`, only the profile fields it names, where
    /// an explicit null clears; otherwise every profile field present.
    pub(super) fn profile_changed(&self, changes: &mut Vec<Change>) -> Result<(), EventError> {
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

pub(super) fn no_nul(key: &'static str, s: &str) -> Result<String, EventError> {
    if s.contains('\0') {
        Err(EventError::NulCharacter(key))
    } else {
        Ok(s.to_owned())
    }
}

impl Data<'_> {
    pub(super) fn app_role_present(&self, changes: &mut Vec<Change>) -> Result<(), EventError> {
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
