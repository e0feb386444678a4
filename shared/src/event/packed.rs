//! An [`Effect`] held compactly while its event waits to be applied.

use super::effect::Effect;
use super::order::EventTime;

/// An effect as one block of bytes (serde's postcard form). A worker holds tens of thousands of
/// events in its window; decoded, an effect is a vector of changes with a block of its own for
/// every string (some 700 bytes in a dozen allocations for a `member.joined`), packed some 200
/// in one. Unpacking costs no JSON parsing, only the allocations of the effect it gives back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedEffect {
    time: EventTime,
    form: Form,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Form {
    Packed(Box<[u8]>),
    /// What the encoder refused (it takes every effect; kept whole rather than lost).
    Whole(Box<Effect>),
}

impl PackedEffect {
    pub fn pack(effect: &Effect) -> Self {
        let form = match postcard::to_allocvec(effect) {
            Ok(bytes) => Form::Packed(bytes.into_boxed_slice()),
            Err(_) => Form::Whole(Box::new(effect.clone())),
        };
        Self {
            time: effect.key.time,
            form,
        }
    }

    /// The effect as it was packed.
    pub fn unpack(&self) -> Effect {
        match &self.form {
            Form::Packed(bytes) => postcard::from_bytes(bytes)
                .unwrap_or_else(|e| panic!("an effect packed by this process reads back: {e}")),
            Form::Whole(effect) => (**effect).clone(),
        }
    }

    /// When its event happened.
    pub fn time(&self) -> EventTime {
        self.time
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Change, EventKey, MembershipStatus};
    use crate::TenantId;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), "[a-z@. ]{1,12}", "\\PC{0,40}"]
    }

    fn change() -> impl Strategy<Value = Change> {
        let maybe = || proptest::option::of(text());
        prop_oneof![
            "[A-Za-z0-9_-]{1,64}".prop_map(|t| Change::TenantId(TenantId::parse(&t).unwrap())),
            maybe().prop_map(Change::Email),
            maybe().prop_map(Change::GivenName),
            maybe().prop_map(Change::FamilyName),
            text().prop_map(Change::SubjectType),
            any::<bool>().prop_map(Change::IsActive),
            proptest::option::of(time()).prop_map(Change::DeletedAt),
            text().prop_map(Change::MembershipId),
            prop_oneof![
                Just(MembershipStatus::Active),
                Just(MembershipStatus::Suspended),
                Just(MembershipStatus::Left)
            ]
            .prop_map(Change::MembershipStatus),
            proptest::collection::vec(text(), 0..4).prop_map(Change::TenantRoles),
            any::<bool>().prop_map(Change::HasAppAccess),
            maybe().prop_map(Change::AppRole),
            maybe().prop_map(Change::AppRoleId),
            maybe().prop_map(Change::AppRoleName),
        ]
    }

    fn time() -> impl Strategy<Value = EventTime> {
        (-62_167_219_200_000_000i64..=253_402_300_799_999_999)
            .prop_map(|micros| EventTime::from_micros(micros).unwrap())
    }

    proptest! {
        #[test]
        fn an_effect_unpacks_as_it_was_packed(
            time in time(),
            id in text(),
            sub in text(),
            changes in proptest::collection::vec(change(), 1..15),
        ) {
            let effect = Effect { key: EventKey { time, id }, sub, changes };
            let packed = PackedEffect::pack(&effect);
            prop_assert!(matches!(packed.form, Form::Packed(_)));
            prop_assert_eq!(packed.time(), effect.key.time);
            prop_assert_eq!(packed.unpack(), effect);
        }
    }

    #[test]
    fn a_tenant_id_or_time_out_of_range_does_not_read_back() {
        let bytes = postcard::to_allocvec(&"not a tenant!").unwrap();
        assert!(postcard::from_bytes::<TenantId>(&bytes).is_err());
        let bytes = postcard::to_allocvec(&i64::MAX).unwrap();
        assert!(postcard::from_bytes::<EventTime>(&bytes).is_err());
    }
}
