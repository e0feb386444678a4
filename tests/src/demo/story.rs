//! The demo's events: the lives of forty-two users of three tenants as AuthVital reports them, then
//! delivered the way AuthVital delivers them: in no particular order, some more than once.

use crate::worker_harness::model_of;
use avsync_worker::apply::Model;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::collections::HashMap;

/// The demo's tenants and how many users each has.
pub const TENANTS: [(&str, usize); 3] = [("acme", 18), ("globex", 14), ("initech", 10)];
const APPLICATION_ID: &str = "app_demo";
/// About this share of the events is delivered a second time.
const DUPLICATE_PERCENT: usize = 15;

const GIVEN: [&str; 16] = [
    "Ada", "Alan", "Barbara", "Claude", "Donald", "Edsger", "Frances", "Grace", "John", "Ken",
    "Leslie", "Margaret", "Niklaus", "Radia", "Shafi", "Tony",
];
const FAMILY: [&str; 16] = [
    "Allen",
    "Backus",
    "Cerf",
    "Dijkstra",
    "Floyd",
    "Goldwasser",
    "Hamilton",
    "Hopper",
    "Knuth",
    "Lamport",
    "Liskov",
    "Lovelace",
    "Perlman",
    "Ritchie",
    "Turing",
    "Wirth",
];

/// One webhook as AuthVital sends it.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: String,
    pub event_type: &'static str,
    pub tenant: &'static str,
    /// The user it is about; `invite.created` has none yet.
    pub sub: Option<String>,
    /// Event time, unix milliseconds.
    pub at_ms: i64,
    pub body: Vec<u8>,
}

impl Event {
    /// The event order: time, then id bytewise.
    fn key(&self) -> (i64, &str) {
        (self.at_ms, self.id.as_str())
    }
}

pub struct Story {
    pub events: Vec<Event>,
    /// Indexes into `events` in delivery order; a duplicate delivery repeats an index.
    pub deliveries: Vec<usize>,
}

/// Builds one user's events, each a little after the one before.
struct Life<'a> {
    rng: &'a mut StdRng,
    tenant: &'static str,
    sub: String,
    at_ms: i64,
    events: Vec<Event>,
}

impl Life<'_> {
    fn later(&mut self, min_ms: i64, max_ms: i64) -> i64 {
        self.at_ms += self.rng.random_range(min_ms..=max_ms);
        self.at_ms
    }

    fn emit(&mut self, event_type: &'static str, at_ms: i64, mut data: Value, about_user: bool) {
        if about_user {
            data["sub"] = json!(self.sub);
        }
        let id = uuid::Builder::from_random_bytes(self.rng.random())
            .into_uuid()
            .to_string();
        let timestamp = chrono::DateTime::from_timestamp_millis(at_ms)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let body = json!({
            "id": id,
            "type": event_type,
            "timestamp": timestamp,
            "tenant_id": self.tenant,
            "application_id": APPLICATION_ID,
            "data": data,
        });
        self.events.push(Event {
            id,
            event_type,
            tenant: self.tenant,
            sub: about_user.then(|| self.sub.clone()),
            at_ms,
            body: body.to_string().into_bytes(),
        });
    }
}

struct Person {
    tenant: &'static str,
    index: usize,
    given: &'static str,
    family: &'static str,
}

fn live(rng: &mut StdRng, person: &Person, start_ms: i64) -> Vec<Event> {
    let Person {
        tenant,
        index,
        given,
        family,
    } = *person;
    let email = format!(
        "{}.{}@{tenant}.example",
        given.to_lowercase(),
        family.to_lowercase()
    );
    let membership_id = format!("mem_{tenant}_{index:02}");
    let mut life = Life {
        rng,
        tenant,
        sub: format!("usr_{index:02}"),
        at_ms: start_ms,
        events: Vec::new(),
    };
    let profile = json!({"email": email, "given_name": given, "family_name": family});
    let invited = life.rng.random_bool(0.3);
    if invited {
        let at = life.at_ms - 60_000;
        let data = json!({"invite_id": format!("inv_{tenant}_{index:02}"), "membership_id": membership_id, "email": email, "tenant_roles": ["member"]});
        life.emit("invite.created", at, data, false);
    }
    let at = life.at_ms;
    let mut created = profile.clone();
    created["subject_type"] = json!("user");
    life.emit("subject.created", at, created, true);
    // AuthVital starts both events of a signup at once: they often share a millisecond.
    let at = life.later(0, 1);
    let mut joined = profile.clone();
    joined["membership_id"] = json!(membership_id);
    joined["tenant_roles"] = json!(["member"]);
    life.emit("member.joined", at, joined, true);
    if invited {
        let at = life.later(0, 2);
        let mut accepted = profile.clone();
        accepted["membership_id"] = json!(membership_id);
        life.emit("invite.accepted", at, accepted, true);
    }
    let granted = life.rng.random_bool(0.8);
    if granted {
        let at = life.later(50, 500);
        // The members page sends "" for names it does not know; "" must never clear a name.
        let name = if life.rng.random_bool(0.5) { "" } else { given };
        let data = json!({"membership_id": membership_id, "email": email, "given_name": name, "family_name": "", "role_id": "role_editor", "role_name": "Editor", "role_slug": "editor"});
        life.emit("app_access.granted", at, data, true);
        if life.rng.random_bool(0.3) {
            let at = life.later(100, 900);
            let data = json!({"membership_id": membership_id, "role_id": "role_admin", "role_name": "Admin", "role_slug": "admin", "previous_role_slug": "editor"});
            life.emit("app_access.role_changed", at, data, true);
        }
    }
    if life.rng.random_bool(0.25) {
        let at = life.later(10, 200);
        let data = json!({"assignment_id": format!("lic_{tenant}_{index:02}"), "license_type_id": "lt_pro", "license_type_name": "Pro"});
        life.emit("license.assigned", at, data, true);
    }
    for _ in 0..life.rng.random_range(0..=2) {
        let at = life.later(100, 1500);
        match life.rng.random_range(0..5) {
            0 => life.emit(
                "member.role_changed",
                at,
                json!({"membership_id": membership_id, "tenant_roles": ["admin", "member"], "previous_roles": ["member"]}),
                true,
            ),
            1 => {
                let new_email = format!(
                    "{}.{}@mail.example",
                    given.to_lowercase(),
                    family.to_lowercase()
                );
                life.emit(
                    "subject.updated",
                    at,
                    json!({"email": new_email, "given_name": given, "changed_fields": ["email"]}),
                    true,
                );
            }
            2 => {
                let data = json!({"membership_id": membership_id});
                life.emit("member.suspended", at, data.clone(), true);
                if life.rng.random_bool(0.5) {
                    let at = life.later(100, 900);
                    life.emit("member.activated", at, data, true);
                }
            }
            3 if granted => life.emit(
                "app_access.revoked",
                at,
                json!({"membership_id": membership_id}),
                true,
            ),
            _ => life.emit(
                "member.left",
                at,
                json!({"membership_id": membership_id}),
                true,
            ),
        }
    }
    if life.rng.random_bool(0.1) {
        let at = life.later(100, 900);
        life.emit("subject.deleted", at, json!({"email": email}), true);
    }
    life.events
}

impl Story {
    /// The same seed gives the same events, delivered in the same order. Users sign up in the
    /// quarter minute before `now_ms`; no event is dated after it.
    pub fn generate(seed: u64, now_ms: i64) -> Story {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut events = Vec::new();
        for (tenant, users) in TENANTS {
            // Every user of a tenant has a name of their own.
            let mut names: Vec<(&str, &str)> = GIVEN
                .iter()
                .flat_map(|g| FAMILY.iter().map(move |f| (*g, *f)))
                .collect();
            names.shuffle(&mut rng);
            for (index, (given, family)) in (1..=users).zip(names) {
                let person = Person {
                    tenant,
                    index,
                    given,
                    family,
                };
                let start = now_ms - 15_000 + rng.random_range(0..5_000);
                events.extend(live(&mut rng, &person, start));
            }
        }
        let mut deliveries: Vec<usize> = (0..events.len()).collect();
        deliveries.shuffle(&mut rng);
        // A retried delivery comes after the first one, anywhere later.
        for _ in 0..events.len() * DUPLICATE_PERCENT / 100 {
            let first = rng.random_range(0..deliveries.len());
            let again = deliveries[first];
            let at = rng.random_range(first + 1..=deliveries.len());
            deliveries.insert(at, again);
        }
        Story { events, deliveries }
    }

    pub fn duplicates(&self) -> usize {
        self.deliveries.len() - self.events.len()
    }

    /// First deliveries that arrive after a newer event about the same user.
    pub fn late_deliveries(&self) -> usize {
        let mut newest: HashMap<(&str, &str), (i64, &str)> = HashMap::new();
        let mut seen = vec![false; self.events.len()];
        let mut late = 0;
        for &i in &self.deliveries {
            let event = &self.events[i];
            let Some(sub) = event.sub.as_deref() else {
                continue;
            };
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            let slot = newest.entry((event.tenant, sub)).or_insert(event.key());
            if *slot > event.key() {
                late += 1;
            } else {
                *slot = event.key();
            }
        }
        late
    }

    /// What a tenant's database must hold once every event is applied.
    pub fn model(&self, tenant: &str) -> Model {
        let bodies: Vec<Vec<u8>> = self
            .events
            .iter()
            .filter(|e| e.tenant == tenant)
            .map(|e| e.body.clone())
            .collect();
        model_of(&bodies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use avsync_shared::Envelope;

    const NOW: i64 = 1_787_276_403_000;

    #[test]
    fn a_few_hundred_deliveries_out_of_order_and_twice() {
        let story = Story::generate(7, NOW);
        assert!((200..=500).contains(&story.deliveries.len()));
        assert!(story.duplicates() >= story.events.len() / 10);
        assert!(story.late_deliveries() > 10);
        let mut counts = vec![0; story.events.len()];
        for &i in &story.deliveries {
            counts[i] += 1;
        }
        assert!(counts.iter().all(|&n| n >= 1), "every event is delivered");
    }

    #[test]
    fn every_event_is_valid_and_of_its_tenant() {
        let story = Story::generate(7, NOW);
        for event in &story.events {
            let envelope = Envelope::decode(&event.body).unwrap();
            assert_eq!(envelope.id, event.id);
            assert_eq!(envelope.tenant_id.as_str(), event.tenant);
            assert_eq!(envelope.event_type, event.event_type);
            assert!(event.at_ms <= NOW && event.at_ms > NOW - 120_000);
        }
        for (tenant, users) in TENANTS {
            assert_eq!(story.model(tenant).identities().len(), users);
        }
    }

    #[test]
    fn the_seed_fixes_the_story() {
        let a = Story::generate(3, NOW);
        let b = Story::generate(3, NOW);
        let c = Story::generate(4, NOW);
        let bodies = |s: &Story| -> Vec<Vec<u8>> {
            s.deliveries
                .iter()
                .map(|&i| s.events[i].body.clone())
                .collect()
        };
        assert_eq!(bodies(&a), bodies(&b));
        assert_ne!(bodies(&a), bodies(&c));
    }
}
