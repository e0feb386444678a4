//! Event decoding for the apply rules: `avsync_shared::event::Effect::decode` on every body
//! whose envelope decodes, as the worker runs it.
//!
//! Properties:
//! - nothing panics, and decoding the same bytes twice gives the same answer;
//! - an effect has a non-empty `sub` without NUL, sets at least one field, sets each field at
//!   most once, and always sets `tenant_id` to the envelope's tenant;
//! - no string it would store holds a NUL (PostgreSQL text cannot).

#![no_main]

use avsync_shared::event::{Change, Effect};
use avsync_shared::Envelope;
use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;

fn strings(change: &Change) -> Vec<&str> {
    match change {
        Change::Email(v)
        | Change::GivenName(v)
        | Change::FamilyName(v)
        | Change::AppRole(v)
        | Change::AppRoleId(v)
        | Change::AppRoleName(v) => v.as_deref().into_iter().collect(),
        Change::SubjectType(v) | Change::MembershipId(v) => vec![v.as_str()],
        Change::TenantRoles(roles) => roles.iter().map(String::as_str).collect(),
        Change::TenantId(t) => vec![t.as_str()],
        Change::IsActive(_)
        | Change::DeletedAt(_)
        | Change::MembershipStatus(_)
        | Change::HasAppAccess(_) => Vec::new(),
    }
}

fuzz_target!(|body: &[u8]| {
    let Ok(envelope) = Envelope::decode(body) else {
        return;
    };
    let first = Effect::decode(&envelope, body);
    assert_eq!(first, Effect::decode(&envelope, body), "deterministic");
    let Ok(Some(effect)) = first else {
        return;
    };
    assert!(!effect.sub.is_empty() && !effect.sub.contains('\0'));
    assert!(!effect.changes.is_empty());
    let mut fields = HashSet::new();
    for change in &effect.changes {
        assert!(
            fields.insert(change.field()),
            "{:?} set twice",
            change.field()
        );
        for text in strings(change) {
            assert!(!text.contains('\0'), "NUL in {:?}", change.field());
        }
    }
    assert!(effect
        .changes
        .contains(&Change::TenantId(envelope.tenant_id.clone())));
});
