//! The event catalogue: every event type AuthVital sends today and what it does (contract
//! section 6), in one table that the decoder, the metrics and the tests all read.

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

/// Every known event type with its kind. Metrics carry one label value per entry plus `other`.
pub const CATALOGUE: [(&str, EventKind); 19] = [
    ("subject.created", EventKind::SubjectCreated),
    ("subject.updated", EventKind::SubjectUpdated),
    ("subject.deleted", EventKind::SubjectDeleted),
    ("subject.deactivated", EventKind::SubjectDeactivated),
    ("member.joined", EventKind::MemberJoined),
    ("member.left", EventKind::MemberLeft),
    ("member.role_changed", EventKind::MemberRoleChanged),
    ("member.suspended", EventKind::MemberSuspended),
    ("member.activated", EventKind::MemberActivated),
    ("app_access.granted", EventKind::AppAccessGranted),
    ("app_access.revoked", EventKind::AppAccessRevoked),
    ("app_access.role_changed", EventKind::AppAccessRoleChanged),
    ("invite.created", EventKind::SetsNothing),
    ("invite.accepted", EventKind::InviteAccepted),
    ("invite.deleted", EventKind::SetsNothing),
    ("invite.expired", EventKind::SetsNothing),
    ("license.assigned", EventKind::SetsNothing),
    ("license.revoked", EventKind::SetsNothing),
    ("license.changed", EventKind::SetsNothing),
];

/// The names of [`CATALOGUE`], in its order.
pub const KNOWN_TYPES: [&str; CATALOGUE.len()] = {
    let mut names = [""; CATALOGUE.len()];
    let mut i = 0;
    while i < CATALOGUE.len() {
        names[i] = CATALOGUE[i].0;
        i += 1;
    }
    names
};

impl EventKind {
    /// The kind of `event_type`: [`EventKind::SetsNothing`] for types not in the catalogue.
    pub fn of(event_type: &str) -> Self {
        CATALOGUE
            .iter()
            .find(|(name, _)| *name == event_type)
            .map_or(Self::SetsNothing, |(_, kind)| *kind)
    }

    pub fn sets_something(self) -> bool {
        self != Self::SetsNothing
    }
}

/// The known types that set something, in catalogue order.
pub fn effectful_types() -> impl Iterator<Item = &'static str> {
    CATALOGUE
        .iter()
        .filter(|(_, kind)| kind.sets_something())
        .map(|(name, _)| *name)
}

/// The known types that are acknowledged and never applied, in catalogue order.
pub fn ignored_types() -> impl Iterator<Item = &'static str> {
    CATALOGUE
        .iter()
        .filter(|(_, kind)| !kind.sets_something())
        .map(|(name, _)| *name)
}

/// The metric label of an event type: the type itself when known, else `other`, so that a
/// sender inventing types cannot grow the label set.
pub fn type_label(event_type: &str) -> &'static str {
    KNOWN_TYPES
        .iter()
        .find(|known| **known == event_type)
        .copied()
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(type_label("member.joined"), "member.joined");
        assert_eq!(type_label("tenant.created"), "other");
    }

    #[test]
    fn kinds_follow_the_table() {
        assert_eq!(EventKind::of("invite.accepted"), EventKind::InviteAccepted);
        assert_eq!(EventKind::of("license.assigned"), EventKind::SetsNothing);
        assert_eq!(EventKind::of("tenant.created"), EventKind::SetsNothing);
        assert_eq!(effectful_types().count(), 13);
        assert_eq!(ignored_types().count() + 13, KNOWN_TYPES.len());
    }
}
