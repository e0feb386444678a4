//! The tenant id: the one value from a webhook that reaches a database name or a queue header.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A tenant id that matches `^[A-Za-z0-9_-]{1,64}$`. Holding one means it was checked: it can be
/// put into a database name, a header or a log field without escaping.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct TenantId(String);

pub const MAX_TENANT_ID_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tenant_id must be 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-'")]
pub struct InvalidTenantId;

impl TenantId {
    pub fn parse(value: &str) -> Result<Self, InvalidTenantId> {
        let valid = !value.is_empty()
            && value.len() <= MAX_TENANT_ID_LEN
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if valid {
            Ok(Self(value.to_owned()))
        } else {
            Err(InvalidTenantId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for TenantId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TenantId {
    type Error = InvalidTenantId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl std::str::FromStr for TenantId {
    type Err = InvalidTenantId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_the_contract_alphabet() {
        for ok in ["a", "tnt_acme", "A-b_9", &"x".repeat(64)] {
            assert_eq!(TenantId::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_hostile_ids() {
        for bad in [
            "",
            "../x",
            "a b",
            "x;drop",
            "a.b",
            "a/b",
            "é",
            "a\0b",
            "tenant\"x",
            &"x".repeat(65),
        ] {
            assert_eq!(TenantId::parse(bad), Err(InvalidTenantId), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn parse_agrees_with_the_pattern(s in "\\PC{0,70}") {
            let expected = !s.is_empty() && s.len() <= 64
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            prop_assert_eq!(TenantId::parse(&s).is_ok(), expected);
        }
    }
}
