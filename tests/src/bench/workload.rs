//! The events every phase sends: AuthVital bodies as the sender emits them (compact JSON, keys in
//! PostgreSQL jsonb order, millisecond UTC timestamps, UUID ids), mostly the signup and access
//! flow (`subject.created`, `member.joined`, `app_access.granted`) over many users per tenant.

use avsync_shared::TenantId;
use chrono::{DateTime, SecondsFormat, Utc};
use rand::distr::weighted::WeightedIndex;
use rand::distr::Distribution;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// One webhook body and what routing, headers and the lag measurement need to know of it.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: String,
    pub tenant: TenantId,
    pub event_type: &'static str,
    pub sub: String,
    /// The body's `timestamp`, as the worker reads it (milliseconds).
    pub timestamp: DateTime<Utc>,
    pub body: bytes::Bytes,
}

/// Event types by weight (out of 100): what AuthVital emits on signup, invitation and access
/// changes. Every one sets something, so the worker applies each (none is merely ignored).
const MIX: [(&str, u32); 6] = [
    ("member.joined", 32),
    ("app_access.granted", 32),
    ("subject.created", 26),
    ("app_access.role_changed", 4),
    ("invite.accepted", 3),
    ("member.suspended", 3),
];

const GIVEN: [&str; 10] = [
    "Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Tim",
];
const FAMILY: [&str; 10] = [
    "Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Perlman",
    "Lee",
];
/// App roles as (id, name, slug).
const APP_ROLES: [(&str, &str, &str); 3] = [
    ("role_01h8admin", "Administrator", "admin"),
    ("role_01h8editor", "Editor", "editor"),
    ("role_01h8viewer", "Viewer", "viewer"),
];
const TENANT_ROLES: [&[&str]; 3] = [&["member"], &["admin", "member"], &["owner"]];

/// Events of one user per event on average about three: `users = events / tenants / 3`.
const EVENTS_PER_USER: u64 = 3;

/// `tnt_0000`, `tnt_0001`, …: short enough for any database name prefix the benchmark makes.
pub fn tenant_ids(count: u32) -> Vec<TenantId> {
    (0..count)
        .map(|i| TenantId::parse(&format!("tnt_{i:04}")).expect("tnt_NNNN is a valid tenant id"))
        .collect()
}

/// Serialized JSON of a value that is always serializable (strings, string slices).
fn json<T: Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).expect("strings serialize")
}

/// A JSON object with its keys in jsonb order (shorter first, then bytewise), as AuthVital's
/// sender emits the bodies it reads back from a jsonb column. Values are JSON text already.
fn jsonb_object(mut entries: Vec<(&str, String)>) -> String {
    entries.sort_by(|(a, _), (b, _)| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
    let fields: Vec<String> = entries
        .into_iter()
        .map(|(key, value)| format!("{}:{value}", json(key)))
        .collect();
    format!("{{{}}}", fields.join(","))
}

/// How activity spreads over the tenants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activity {
    /// Every tenant equally busy.
    Uniform,
    /// The k-th tenant gets a share proportional to 1/k^s, as real SaaS tenants do (s ≈ 1.1).
    Zipf(f64),
}

/// Builds bodies from a seeded generator, so that every run sends the same kind of traffic.
pub struct Generator {
    rng: StdRng,
    /// Makes subs unique to one batch of events, so that every repetition inserts new rows.
    run: String,
    tenants: Vec<TenantId>,
    /// Which tenant each event goes to; `None` is uniform.
    weights: Option<WeightedIndex<f64>>,
    /// Users of each tenant, in proportion to its share of the events.
    users: Vec<u64>,
}

impl Generator {
    /// Events of `run` over `tenants`, equally busy, about three per user, for
    /// `expected_events` events.
    pub fn new(seed: u64, run: &str, tenants: &[TenantId], expected_events: u64) -> Self {
        Self::with_activity(seed, run, tenants, expected_events, Activity::Uniform)
    }

    pub fn with_activity(
        seed: u64,
        run: &str,
        tenants: &[TenantId],
        expected_events: u64,
        activity: Activity,
    ) -> Self {
        let shares: Vec<f64> = match activity {
            Activity::Uniform => vec![1.0; tenants.len()],
            Activity::Zipf(s) => (1..=tenants.len()).map(|k| (k as f64).powf(-s)).collect(),
        };
        let total: f64 = shares.iter().sum();
        let users = shares
            .iter()
            .map(|share| ((expected_events as f64 * share / total) as u64 / EVENTS_PER_USER).max(1))
            .collect();
        let weights = match activity {
            Activity::Uniform => None,
            Activity::Zipf(_) => WeightedIndex::new(&shares).ok(),
        };
        Self {
            rng: StdRng::seed_from_u64(seed),
            run: run.to_owned(),
            tenants: tenants.to_vec(),
            weights,
            users,
        }
    }

    /// `n` events, each for a tenant picked by the activity and a random one of its users,
    /// timestamps a millisecond apart from now.
    pub fn events(&mut self, n: u64) -> Vec<Event> {
        let start = Utc::now();
        (0..n)
            .map(|i| {
                let at = start + chrono::Duration::milliseconds(i as i64);
                let k = self.random_tenant();
                let user = self.rng.random_range(0..self.users[k]);
                let tenant = self.tenants[k].clone();
                self.event(&tenant, user, at)
            })
            .collect()
    }

    /// One event for a user no other event names, stamped `at`: its row is its alone, so the
    /// row's commit time is this event's commit time.
    pub fn fresh_user_event(&mut self, serial: u64, at: DateTime<Utc>) -> Event {
        let k = self.random_tenant();
        let user = self.users[k] + serial;
        let tenant = self.tenants[k].clone();
        self.event(&tenant, user, at)
    }

    fn random_tenant(&mut self) -> usize {
        assert!(
            !self.tenants.is_empty(),
            "a generator has at least one tenant (--tenants is at least 1)"
        );
        match &self.weights {
            Some(weights) => weights.sample(&mut self.rng),
            None => self.rng.random_range(0..self.tenants.len()),
        }
    }

    fn random_type(&mut self) -> &'static str {
        let mut pick = self.rng.random_range(0..100);
        for (event_type, weight) in MIX {
            if pick < weight {
                return event_type;
            }
            pick -= weight;
        }
        MIX[0].0
    }

    fn event(&mut self, tenant: &TenantId, user: u64, at: DateTime<Utc>) -> Event {
        let event_type = self.random_type();
        let sub = format!("usr_{}_{}_{user:x}", self.run, tenant.as_str());
        let id = uuid::Uuid::new_v4().to_string();
        let data = self.data(event_type, tenant, user, &sub);
        let timestamp = at.to_rfc3339_opts(SecondsFormat::Millis, true);
        let body = jsonb_object(vec![
            ("id", json(&id)),
            ("data", data),
            ("type", json(event_type)),
            ("tenant_id", json(tenant.as_str())),
            ("timestamp", json(&timestamp)),
            ("application_id", json("app_crm")),
        ]);
        Event {
            id,
            tenant: tenant.clone(),
            event_type,
            sub,
            timestamp: DateTime::from_timestamp_millis(at.timestamp_millis()).unwrap_or(at),
            body: bytes::Bytes::from(body),
        }
    }

    fn data(&mut self, event_type: &str, tenant: &TenantId, user: u64, sub: &str) -> String {
        let given = GIVEN[(user % 10) as usize];
        let family = FAMILY[((user / 10) % 10) as usize];
        let email = format!(
            "{}.{}.{user}@{}.example",
            given.to_lowercase(),
            family.to_lowercase(),
            tenant.as_str().replace('_', "-")
        );
        let membership_id = format!("mbr_{}_{user:x}", self.run);
        let (role_id, role_name, role_slug) = *APP_ROLES.choose(&mut self.rng).expect("roles");
        let tenant_roles = *TENANT_ROLES.choose(&mut self.rng).expect("roles");
        let mut fields = vec![("sub", json(sub)), ("email", json(&email))];
        let profile = [("given_name", json(given)), ("family_name", json(family))];
        match event_type {
            "subject.created" => {
                fields.extend(profile);
                fields.push(("subject_type", json("user")));
            }
            "member.joined" => {
                fields.extend(profile);
                fields.push(("membership_id", json(&membership_id)));
                fields.push(("tenant_roles", json(tenant_roles)));
            }
            "app_access.granted" | "app_access.role_changed" => {
                fields.extend(profile);
                fields.push(("membership_id", json(&membership_id)));
                fields.push(("role_id", json(role_id)));
                fields.push(("role_name", json(role_name)));
                fields.push(("role_slug", json(role_slug)));
                if event_type == "app_access.role_changed" {
                    fields.push(("previous_role_id", json(APP_ROLES[2].0)));
                    fields.push(("previous_role_name", json(APP_ROLES[2].1)));
                    fields.push(("previous_role_slug", json(APP_ROLES[2].2)));
                }
            }
            "invite.accepted" => {
                fields.extend(profile);
                fields.push(("invite_id", json(&format!("inv_{}_{user:x}", self.run))));
                fields.push(("membership_id", json(&membership_id)));
                fields.push(("tenant_roles", json(tenant_roles)));
            }
            _ => fields.push(("membership_id", json(&membership_id))),
        }
        jsonb_object(fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use avsync_shared::event::Effect;
    use avsync_shared::Envelope;
    use std::collections::BTreeSet;

    #[test]
    fn keys_are_in_jsonb_order() {
        let body = jsonb_object(vec![
            ("timestamp", json("t")),
            ("id", json("1")),
            ("tenant_id", json("x")),
            ("type", json("a")),
            ("data", json("d")),
        ]);
        assert_eq!(
            body,
            r#"{"id":"1","data":"d","type":"a","tenant_id":"x","timestamp":"t"}"#
        );
    }

    #[test]
    fn every_event_is_a_valid_webhook_that_sets_something() {
        let tenants = tenant_ids(3);
        let events = Generator::new(7, "r1", &tenants, 600).events(600);
        let mut types = BTreeSet::new();
        for e in &events {
            let envelope = Envelope::decode(&e.body).unwrap();
            assert_eq!(envelope.id, e.id);
            assert_eq!(envelope.tenant_id, e.tenant);
            assert_eq!(envelope.event_type, e.event_type);
            let effect = Effect::decode(&envelope, &e.body).unwrap().unwrap();
            assert_eq!(effect.sub, e.sub);
            types.insert(e.event_type);
        }
        assert_eq!(types.len(), MIX.len(), "every type of the mix occurs");
        let users: BTreeSet<_> = events.iter().map(|e| &e.sub).collect();
        assert!(users.len() > 100 && users.len() < 300, "{}", users.len());
    }

    #[test]
    fn the_same_seed_gives_the_same_traffic_and_runs_never_share_users() {
        let tenants = tenant_ids(2);
        let subs = |run: &str| -> Vec<String> {
            Generator::new(1, run, &tenants, 30)
                .events(30)
                .into_iter()
                .map(|e| e.sub)
                .collect()
        };
        assert_eq!(subs("a"), subs("a"));
        let a: BTreeSet<_> = subs("a").into_iter().collect();
        assert!(subs("b").iter().all(|s| !a.contains(s)));
    }

    #[test]
    fn fresh_user_events_never_name_a_generated_user() {
        let tenants = tenant_ids(2);
        let mut generator = Generator::new(1, "r", &tenants, 60);
        let generated: BTreeSet<_> = generator.events(60).into_iter().map(|e| e.sub).collect();
        let fresh: Vec<_> = (0..20)
            .map(|i| generator.fresh_user_event(i, Utc::now()).sub)
            .collect();
        assert!(fresh.iter().all(|s| !generated.contains(s)));
        assert_eq!(fresh.iter().collect::<BTreeSet<_>>().len(), 20);
    }

    #[test]
    fn zipf_activity_makes_the_first_tenants_the_busiest() {
        let tenants = tenant_ids(100);
        let events =
            Generator::with_activity(3, "z", &tenants, 20_000, Activity::Zipf(1.1)).events(20_000);
        let of = |t: &TenantId| events.iter().filter(|e| &e.tenant == t).count();
        let (first, tenth, last) = (of(&tenants[0]), of(&tenants[9]), of(&tenants[99]));
        // Shares 1/k^1.1 over 100 tenants: about 23%, 1.8% and 0.15%.
        assert!((3_800..5_400).contains(&first), "{first}");
        assert!(
            first > 8 * tenth && tenth > 5 * last,
            "{first} {tenth} {last}"
        );
        let uniform = Generator::new(3, "u", &tenants, 20_000).events(20_000);
        let busiest = tenants
            .iter()
            .map(|t| uniform.iter().filter(|e| &e.tenant == t).count())
            .max();
        assert!(busiest < Some(400), "{busiest:?}");
    }
}
