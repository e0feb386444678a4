//! Which dead letters a `dlq` command takes: the FILTERS of contract section 8, combinable (a
//! letter must match every one given), and `--all` for `replay` and `purge`, which refuse to run
//! without one or the other.
//!
//! `--since` and `--until` take RFC 3339 or a duration back from now (`90m`, `2h`), fixed once when
//! the command starts, so a long walk does not move its own window; both bounds are inclusive and
//! are compared with the letter's `x-avsync-last-failure`. A letter without a readable last
//! failure (one the broker dead-lettered itself) matches neither.

use crate::dlq::{ErrorClass, Listed};
use avsync_shared::config::parse_duration;
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{ArgGroup, Args};
use std::time::Duration;

/// The filters of `list`, `summary`, `replay` and `purge`.
#[derive(Debug, Clone, Default, Args)]
pub struct Filters {
    /// Only this tenant's dead letters.
    #[arg(long, value_name = "T")]
    pub tenant: Option<String>,
    /// Only the dead letter with this event id.
    #[arg(long = "event-id", value_name = "ID")]
    pub event_id: Option<String>,
    /// Only dead letters of this error class.
    #[arg(long, value_enum, value_name = "CLASS")]
    pub class: Option<ErrorClass>,
    /// Only dead letters of this event type (e.g. member.joined).
    #[arg(long = "type", value_name = "EVENT_TYPE")]
    pub event_type: Option<String>,
    /// Only dead letters whose last failure is at or after TIME: RFC 3339 or a duration back
    /// from now (90m, 2h).
    #[arg(long, value_name = "TIME", value_parser = TimeSpec::parse)]
    pub since: Option<TimeSpec>,
    /// Only dead letters whose last failure is at or before TIME: RFC 3339 or a duration back
    /// from now (90m, 2h).
    #[arg(long, value_name = "TIME", value_parser = TimeSpec::parse)]
    pub until: Option<TimeSpec>,
}

/// The ids of the filter arguments, for the groups and conflicts of [`Selection`].
const FILTER_IDS: [&str; 6] = [
    "tenant",
    "event_id",
    "class",
    "event_type",
    "since",
    "until",
];

/// What `replay` and `purge` take: filters or `--all`, never neither, so nothing is ever taken
/// by accident.
#[derive(Debug, Clone, Args)]
#[command(group(
    ArgGroup::new("selection")
        .required(true)
        .multiple(true)
        .args(FILTER_IDS)
        .arg("all")
))]
pub struct Selection {
    #[command(flatten)]
    pub filters: Filters,
    /// Every dead letter (instead of filters).
    #[arg(long, conflicts_with_all = FILTER_IDS)]
    pub all: bool,
}

/// A point in time as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSpec {
    At(DateTime<Utc>),
    /// This long before the command started.
    Ago(Duration),
}

impl TimeSpec {
    pub fn parse(value: &str) -> Result<Self, String> {
        if let Ok(at) = DateTime::parse_from_rfc3339(value) {
            return Ok(Self::At(at.with_timezone(&Utc)));
        }
        parse_duration(value).map(Self::Ago).map_err(|e| {
            format!(
                "`{value}` is neither an RFC 3339 time (2026-12-06T10:00:00Z) nor a duration back from now (90m, 2h): {e}"
            )
        })
    }

    fn at(self, now: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Self::At(at) => at,
            Self::Ago(back) => chrono::Duration::from_std(back)
                .ok()
                .and_then(|back| now.checked_sub_signed(back))
                .unwrap_or(DateTime::<Utc>::MIN_UTC),
        }
    }
}

/// Filters with their times fixed: what a letter is checked against.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    tenant: Option<String>,
    event_id: Option<String>,
    class: Option<ErrorClass>,
    event_type: Option<String>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
}

impl Filters {
    /// The filter these make when the command starts at `now`; a window that ends before it
    /// begins is refused rather than matching nothing in silence.
    pub fn at(&self, now: DateTime<Utc>) -> Result<Filter, String> {
        let since = self.since.map(|t| t.at(now));
        let until = self.until.map(|t| t.at(now));
        if let (Some(since), Some(until)) = (since, until) {
            if since > until {
                let show = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Secs, true);
                return Err(format!(
                    "--since ({}) is after --until ({}): no dead letter can match",
                    show(since),
                    show(until)
                ));
            }
        }
        Ok(Filter {
            tenant: self.tenant.clone(),
            event_id: self.event_id.clone(),
            class: self.class,
            event_type: self.event_type.clone(),
            since,
            until,
        })
    }
}

impl Filter {
    /// Whether `letter` matches every filter given (with none, every letter does).
    pub fn matches(&self, letter: &Listed) -> bool {
        let same = |want: &Option<String>, got: &Option<String>| {
            want.as_ref()
                .is_none_or(|want| got.as_deref() == Some(want.as_str()))
        };
        let in_window = || {
            if self.since.is_none() && self.until.is_none() {
                return true;
            }
            let Some(failed) = letter.last_failed_at() else {
                return false;
            };
            self.since.is_none_or(|since| failed >= since)
                && self.until.is_none_or(|until| failed <= until)
        };
        same(&self.tenant, &letter.tenant_id)
            && same(&self.event_id, &letter.event_id)
            && same(&self.event_type, &letter.event_type)
            && self
                .class
                .is_none_or(|class| letter.error_class == class.as_str())
            && in_window()
    }
}

impl Selection {
    /// The filter of this selection; `--all` is the filter that matches everything.
    pub fn at(&self, now: DateTime<Utc>) -> Result<Filter, String> {
        if self.all {
            return Ok(Filter::default());
        }
        self.filters.at(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        selection: Selection,
    }

    fn selection(args: &[&str]) -> Result<Selection, clap::Error> {
        Cli::try_parse_from(std::iter::once("purge").chain(args.iter().copied()))
            .map(|cli| cli.selection)
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-06T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn letter(tenant: &str, class: &str, event_type: &str, last_failure: Option<&str>) -> Listed {
        Listed {
            event_id: Some(format!("{tenant}-{class}-{event_type}")),
            tenant_id: Some(tenant.to_owned()),
            event_type: Some(event_type.to_owned()),
            error_class: class.to_owned(),
            error: None,
            attempts: Some(1),
            first_failure: last_failure.map(str::to_owned),
            last_failure: last_failure.map(str::to_owned),
        }
    }

    #[test]
    fn times_are_rfc3339_or_a_duration_back_from_now() {
        assert_eq!(
            TimeSpec::parse("2026-12-06T10:00:00+01:00")
                .unwrap()
                .at(now()),
            DateTime::parse_from_rfc3339("2026-12-06T09:00:00Z").unwrap()
        );
        assert_eq!(
            TimeSpec::parse("90m").unwrap().at(now()),
            DateTime::parse_from_rfc3339("2026-12-06T10:30:00Z").unwrap()
        );
        assert_eq!(
            TimeSpec::parse("2h").unwrap(),
            TimeSpec::Ago(Duration::from_secs(7_200))
        );
        assert_eq!(
            TimeSpec::parse("18446744073709551615ms").unwrap().at(now()),
            DateTime::<Utc>::MIN_UTC,
            "further back than time goes"
        );
        for bad in [
            "yesterday",
            "2h30m",
            "90",
            "2026-12-06",
            "2026-12-06 10:00:00",
            "",
        ] {
            let err = TimeSpec::parse(bad).unwrap_err();
            assert!(
                err.contains("RFC 3339") && err.contains("90m"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn a_letter_must_match_every_filter_given() {
        let filter = selection(&[
            "--tenant",
            "acme",
            "--class",
            "exhausted",
            "--type",
            "member.joined",
            "--since",
            "2h",
            "--until",
            "2026-12-06T11:00:00Z",
        ])
        .unwrap()
        .at(now())
        .unwrap();
        let at = Some("2026-12-06T10:30:00.000Z");
        assert!(filter.matches(&letter("acme", "exhausted", "member.joined", at)));
        for other in [
            letter("globex", "exhausted", "member.joined", at),
            letter("acme", "permanent", "member.joined", at),
            letter("acme", "exhausted", "member.left", at),
            letter(
                "acme",
                "exhausted",
                "member.joined",
                Some("2026-12-06T09:59:59Z"),
            ),
            letter(
                "acme",
                "exhausted",
                "member.joined",
                Some("2026-12-06T11:00:01Z"),
            ),
            letter("acme", "exhausted", "member.joined", None),
            letter("acme", "exhausted", "member.joined", Some("not a time")),
        ] {
            assert!(!filter.matches(&other), "{other:?}");
        }
        // Both bounds are inclusive.
        for edge in ["2026-12-06T10:00:00Z", "2026-12-06T11:00:00Z"] {
            assert!(filter.matches(&letter("acme", "exhausted", "member.joined", Some(edge))));
        }
    }

    #[test]
    fn all_matches_everything_and_one_filter_is_enough() {
        let all = selection(&["--all"]).unwrap().at(now()).unwrap();
        assert!(all.matches(&letter("x", "unknown", "t", None)));
        let poison = selection(&["--class", "poison"])
            .unwrap()
            .at(now())
            .unwrap();
        assert!(poison.matches(&letter("x", "poison", "t", None)));
        assert!(!poison.matches(&letter("x", "unknown", "t", None)));
        let by_id = selection(&["--event-id", "x-poison-t"]).unwrap();
        assert!(by_id
            .at(now())
            .unwrap()
            .matches(&letter("x", "poison", "t", None)));
    }

    #[test]
    fn replay_and_purge_refuse_neither_or_both_filters_and_all() {
        assert!(selection(&[]).is_err(), "a filter or --all is required");
        for filter in [
            &["--tenant", "x"][..],
            &["--event-id", "x"],
            &["--class", "poison"],
            &["--type", "member.joined"],
            &["--since", "1h"],
            &["--until", "1h"],
        ] {
            assert!(selection(filter).is_ok(), "{filter:?}");
            let with_all = [filter, &["--all"]].concat();
            assert!(selection(&with_all).is_err(), "{with_all:?}");
        }
        assert!(selection(&["--class", "sometimes"]).is_err());
        let err = selection(&["--since", "yesterday"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("RFC 3339"), "{err}");
    }

    #[test]
    fn a_window_that_ends_before_it_begins_is_refused() {
        let s = selection(&["--since", "1h", "--until", "2h"]).unwrap();
        let err = s.at(now()).unwrap_err();
        assert!(err.contains("--since") && err.contains("--until"), "{err}");
    }
}
