//! What becomes of a delivery, decided once when it is received: every later step (batching,
//! settling alone after a failed batch, dead-lettering) carries this decision instead of
//! decoding the message again.

use avsync_shared::event::{type_label, Effect, EventError};
use avsync_shared::{Envelope, EnvelopeError};

/// A delivery's fate: applied (in its tenant's batch), or settled without applying anything.
#[derive(Debug)]
pub enum Fate {
    /// An event to apply to its tenant's row.
    Apply(Envelope, Effect),
    Unapplied(Unapplied),
}

/// What a message that applies nothing is, in the order the questions are asked.
#[derive(Debug)]
pub enum Unapplied {
    /// Delivered too often without being settled (it crashed or hung a consumer each time):
    /// dead-lettered without processing. Its envelope, when it has one, names it in the logs.
    Poison(Option<Envelope>),
    /// Not an envelope: dead-lettered as permanent.
    Undecodable(EnvelopeError),
    /// Another application's event, or one that changes nothing: acked.
    Ignored(Envelope),
    /// An envelope whose event is malformed: dead-lettered as permanent.
    Invalid(Envelope, EventError),
}

impl Fate {
    /// Decides the fate of a message with `body`. `poison` says whether its history makes it
    /// poison; `application_id`, when set, is the only application whose events apply.
    pub fn decide(poison: bool, body: &[u8], application_id: Option<&str>) -> Fate {
        let unapplied = match Envelope::decode(body) {
            Err(_) if poison => Unapplied::Poison(None),
            Err(e) => Unapplied::Undecodable(e),
            Ok(envelope) if poison => Unapplied::Poison(Some(envelope)),
            Ok(envelope)
                if application_id
                    .is_some_and(|ours| envelope.application_id.as_deref() != Some(ours)) =>
            {
                Unapplied::Ignored(envelope)
            }
            Ok(envelope) => match Effect::decode(&envelope, body) {
                Ok(Some(effect)) => return Fate::Apply(envelope, effect),
                Ok(None) => Unapplied::Ignored(envelope),
                Err(e) => Unapplied::Invalid(envelope, e),
            },
        };
        Fate::Unapplied(unapplied)
    }
}

impl Fate {
    /// The message's envelope, when it has one.
    pub fn envelope(&self) -> Option<&Envelope> {
        match self {
            Fate::Apply(envelope, _) => Some(envelope),
            Fate::Unapplied(unapplied) => unapplied.envelope(),
        }
    }

    /// The `type` label its outcome is counted under.
    pub fn label(&self) -> &'static str {
        self.envelope()
            .map_or("other", |envelope| type_label(&envelope.event_type))
    }
}

impl Unapplied {
    /// The message's envelope, when it has one.
    pub fn envelope(&self) -> Option<&Envelope> {
        match self {
            Unapplied::Poison(envelope) => envelope.as_ref(),
            Unapplied::Undecodable(_) => None,
            Unapplied::Ignored(envelope) | Unapplied::Invalid(envelope, _) => Some(envelope),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(value: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&value).expect("json")
    }

    fn created(application_id: Option<&str>) -> Vec<u8> {
        let mut event = json!({"id": "e1", "type": "subject.created", "tenant_id": "t",
            "timestamp": "2026-08-21T01:00:00Z", "data": {"sub": "u", "email": "a@x"}});
        if let Some(app) = application_id {
            event["application_id"] = json!(app);
        }
        body(event)
    }

    #[test]
    fn poison_is_decided_before_anything_else() {
        assert!(matches!(
            Fate::decide(true, &created(None), None),
            Fate::Unapplied(Unapplied::Poison(Some(_)))
        ));
        assert!(matches!(
            Fate::decide(true, b"not json", None),
            Fate::Unapplied(Unapplied::Poison(None))
        ));
    }

    #[test]
    fn what_is_not_an_envelope_is_undecodable() {
        let Fate::Unapplied(unapplied) = Fate::decide(false, b"not json", None) else {
            panic!("applies");
        };
        assert!(matches!(unapplied, Unapplied::Undecodable(_)));
        assert_eq!(Fate::Unapplied(unapplied).label(), "other");
    }

    #[test]
    fn another_applications_event_is_ignored_even_when_malformed() {
        assert!(matches!(
            Fate::decide(false, &created(Some("theirs")), Some("ours")),
            Fate::Unapplied(Unapplied::Ignored(_))
        ));
        let malformed = body(
            json!({"id": "e2", "type": "subject.created", "tenant_id": "t",
            "timestamp": "2026-08-21T01:00:00Z", "application_id": "theirs", "data": {}}),
        );
        assert!(matches!(
            Fate::decide(false, &malformed, Some("ours")),
            Fate::Unapplied(Unapplied::Ignored(_))
        ));
    }

    #[test]
    fn a_malformed_event_is_invalid_and_a_good_one_applies() {
        let malformed = body(
            json!({"id": "e2", "type": "subject.created", "tenant_id": "t",
            "timestamp": "2026-08-21T01:00:00Z", "data": {}}),
        );
        assert!(matches!(
            Fate::decide(false, &malformed, None),
            Fate::Unapplied(Unapplied::Invalid(..))
        ));
        assert!(matches!(
            Fate::decide(false, &created(Some("ours")), Some("ours")),
            Fate::Apply(..)
        ));
    }
}
