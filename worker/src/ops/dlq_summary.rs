//! `dlq summary`: what a dead-letter queue too long to list holds, counted by error class, by
//! tenant and by type, with the oldest and newest last failure.

use crate::dlq::Listed;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;

/// The count of a letter without the field (a letter the broker dead-lettered, or one whose body
/// is not an event), in every breakdown.
const NONE: &str = "-";

/// Counts of dead letters; `--json` prints it as one object.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub total: u64,
    pub by_class: BTreeMap<String, u64>,
    pub by_tenant: BTreeMap<String, u64>,
    pub by_type: BTreeMap<String, u64>,
    #[serde(serialize_with = "rfc3339")]
    pub oldest_last_failure: Option<DateTime<Utc>>,
    #[serde(serialize_with = "rfc3339")]
    pub newest_last_failure: Option<DateTime<Utc>>,
}

fn rfc3339<S: serde::Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true)),
        None => s.serialize_none(),
    }
}

impl Summary {
    pub fn add(&mut self, letter: &Listed) {
        self.total += 1;
        let count = |breakdown: &mut BTreeMap<String, u64>, key: Option<&str>| {
            *breakdown.entry(key.unwrap_or(NONE).to_owned()).or_default() += 1;
        };
        count(&mut self.by_class, Some(letter.error_class.as_str()));
        count(&mut self.by_tenant, letter.tenant_id.as_deref());
        count(&mut self.by_type, letter.event_type.as_deref());
        let Some(failed) = letter.last_failed_at() else {
            return;
        };
        self.oldest_last_failure = Some(self.oldest_last_failure.map_or(failed, |t| t.min(failed)));
        self.newest_last_failure = Some(self.newest_last_failure.map_or(failed, |t| t.max(failed)));
    }
}

/// A breakdown, largest count first (then by name), as the text shows it.
fn largest_first(breakdown: &BTreeMap<String, u64>) -> Vec<(&str, u64)> {
    let mut rows: Vec<(&str, u64)> = breakdown.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    rows
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let time = |t: Option<DateTime<Utc>>| {
            t.map_or_else(
                || NONE.to_owned(),
                |t| t.to_rfc3339_opts(SecondsFormat::Millis, true),
            )
        };
        writeln!(f, "{} dead letter(s)", self.total)?;
        writeln!(
            f,
            "last failure: oldest {}, newest {}",
            time(self.oldest_last_failure),
            time(self.newest_last_failure)
        )?;
        for (title, breakdown) in [
            ("by class", &self.by_class),
            ("by tenant", &self.by_tenant),
            ("by type", &self.by_type),
        ] {
            writeln!(f, "{title}:")?;
            for (key, count) in largest_first(breakdown) {
                writeln!(f, "  {count:>8}  {key}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(tenant: Option<&str>, class: &str, event_type: &str, at: Option<&str>) -> Listed {
        Listed {
            event_id: Some("e".to_owned()),
            tenant_id: tenant.map(str::to_owned),
            event_type: Some(event_type.to_owned()),
            error_class: class.to_owned(),
            error: None,
            attempts: None,
            first_failure: None,
            last_failure: at.map(str::to_owned),
        }
    }

    #[test]
    fn counts_by_class_tenant_and_type_with_the_oldest_and_newest_failure() {
        let mut summary = Summary::default();
        for l in [
            letter(
                Some("acme"),
                "permanent",
                "member.joined",
                Some("2026-12-06T10:00:00Z"),
            ),
            letter(
                Some("acme"),
                "exhausted",
                "member.joined",
                Some("2026-12-06T09:00:00+02:00"),
            ),
            letter(
                Some("globex"),
                "permanent",
                "subject.created",
                Some("2026-12-06T11:00:00Z"),
            ),
            letter(None, "unknown", "x", None),
        ] {
            summary.add(&l);
        }
        assert_eq!(summary.total, 4);
        assert_eq!(summary.by_class["permanent"], 2);
        assert_eq!(summary.by_class["unknown"], 1);
        assert_eq!(summary.by_tenant["acme"], 2);
        assert_eq!(summary.by_tenant[NONE], 1);
        assert_eq!(summary.by_type["member.joined"], 2);
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(json["oldest_last_failure"], "2026-12-06T07:00:00.000Z");
        assert_eq!(json["newest_last_failure"], "2026-12-06T11:00:00.000Z");
        assert_eq!(json["by_tenant"]["globex"], 1);
        let text = summary.to_string();
        assert!(text.starts_with("4 dead letter(s)\n"), "{text}");
        let acme = text.find("       2  acme").expect("acme first");
        let globex = text.find("       1  globex").expect("then globex");
        assert!(acme < globex, "{text}");
    }

    #[test]
    fn an_empty_summary_has_no_failure_times() {
        let json = serde_json::to_value(Summary::default()).unwrap();
        assert_eq!(json["total"], 0);
        assert!(json["oldest_last_failure"].is_null());
        assert!(Summary::default()
            .to_string()
            .contains("oldest -, newest -"));
    }
}
