//! The event order (contract section 6): an event's instant, and the key that orders events and
//! versions the fields they set.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;

/// An event's instant in UTC, truncated to microseconds (PostgreSQL's `timestamptz` precision).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64")]
pub struct EventTime {
    micros: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("timestamp {0:?} is not RFC 3339 with `Z` or an offset between years 0000 and 9999 UTC (e.g. 2026-08-21T01:40:03.512Z)")]
pub struct InvalidTimestamp(pub String);

/// `YYYY-MM-DDTHH:MM:SS(.fraction)?(Z|±HH:MM)`, with `T`/`Z` in either case as RFC 3339 allows.
/// chrono alone would also take a space for the `T` and other near misses.
fn has_rfc3339_shape(s: &[u8]) -> bool {
    fn digits(s: &[u8]) -> bool {
        !s.is_empty() && s.iter().all(u8::is_ascii_digit)
    }
    if s.len() < 20 {
        return false;
    }
    let (date_time, rest) = s.split_at(19);
    let shape_ok = digits(&date_time[0..4])
        && date_time[4] == b'-'
        && digits(&date_time[5..7])
        && date_time[7] == b'-'
        && digits(&date_time[8..10])
        && matches!(date_time[10], b'T' | b't')
        && digits(&date_time[11..13])
        && date_time[13] == b':'
        && digits(&date_time[14..16])
        && date_time[16] == b':'
        && digits(&date_time[17..19]);
    if !shape_ok {
        return false;
    }
    let rest = match rest.strip_prefix(b".") {
        Some(fraction) => {
            let n = fraction.iter().take_while(|b| b.is_ascii_digit()).count();
            if n == 0 {
                return false;
            }
            &fraction[n..]
        }
        None => rest,
    };
    match rest {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => digits(&[*h1, *h2, *m1, *m2]),
        _ => false,
    }
}

impl EventTime {
    const MIN_MICROS: i64 = -62_167_219_200_000_000; // 0000-01-01T00:00:00Z
    const MAX_MICROS: i64 = 253_402_300_799_999_999; // 9999-12-31T23:59:59.999999Z

    pub fn parse(value: &str) -> Result<Self, InvalidTimestamp> {
        let invalid = || InvalidTimestamp(value.to_owned());
        if !has_rfc3339_shape(value.as_bytes()) {
            return Err(invalid());
        }
        let parsed = DateTime::parse_from_rfc3339(value).map_err(|_| invalid())?;
        Self::from_micros(parsed.with_timezone(&Utc).timestamp_micros()).ok_or_else(invalid)
    }

    /// Only instants whose UTC year has four digits: their fixed-width text sorts like the instant.
    pub fn from_micros(micros: i64) -> Option<Self> {
        (Self::MIN_MICROS..=Self::MAX_MICROS)
            .contains(&micros)
            .then_some(Self { micros })
    }

    pub fn as_micros(self) -> i64 {
        self.micros
    }

    pub fn to_utc(self) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(self.micros).unwrap_or_default()
    }
}

/// Fixed width, always six fraction digits and `Z`: `2026-08-21T01:40:03.512000Z`. Bytewise order
/// of this text equals the order of the instants.
impl fmt::Display for EventTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_utc().to_rfc3339_opts(SecondsFormat::Micros, true))
    }
}

impl TryFrom<i64> for EventTime {
    type Error = InvalidTimestamp;
    fn try_from(micros: i64) -> Result<Self, Self::Error> {
        Self::from_micros(micros).ok_or_else(|| InvalidTimestamp(format!("{micros} µs")))
    }
}

/// The event order: by instant, ties broken by event id compared bytewise.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EventKey {
    pub time: EventTime,
    pub id: String,
}

impl EventKey {
    /// `<time>|<id>`: bytewise (`COLLATE "C"`) order of this text equals the order of the keys,
    /// because the time part has a fixed width. Stored as a field's version in the database.
    pub fn version(&self) -> String {
        format!("{}|{}", self.time, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn timestamps_are_instants_truncated_to_microseconds() {
        let a = EventTime::parse("2026-08-21T01:40:03.512Z").unwrap();
        let b = EventTime::parse("2026-08-21T03:40:03.512+02:00").unwrap();
        let c = EventTime::parse("2026-08-21T01:40:03.5120009z").unwrap();
        let d = EventTime::parse("2026-08-20t20:40:03.512-05:00").unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        assert_eq!(a, d);
        assert_eq!(a.to_string(), "2026-08-21T01:40:03.512000Z");
        assert_eq!(
            EventTime::parse("2026-08-21T01:40:03Z")
                .unwrap()
                .to_string(),
            "2026-08-21T01:40:03.000000Z"
        );
    }

    #[test]
    fn other_timestamp_forms_are_invalid() {
        for bad in [
            "",
            "2026-08-21",
            "2026-08-21T01:40:03",
            "2026-08-21 01:40:03Z",
            "2026-08-21T01:40:03.Z",
            "2026-08-21T01:40:03+0200",
            "2026-08-21T01:40:03+02",
            "2026-13-21T01:40:03Z",
            "2026-02-30T01:40:03Z",
            "2026-08-21T25:40:03Z",
            "1787276405",
            "Fri, 21 Aug 2026 01:40:03 GMT",
            "+12026-08-21T01:40:03Z",
            "0000-01-01T00:30:00+01:00",
            " 2026-08-21T01:40:03Z",
        ] {
            assert!(EventTime::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn keys_order_by_time_then_id_bytewise() {
        let t = |s| EventTime::parse(s).unwrap();
        let k = |time, id: &str| EventKey {
            time,
            id: id.to_owned(),
        };
        let early = t("2026-08-21T01:40:03.512Z");
        let late = t("2026-08-21T01:40:03.513Z");
        assert!(k(early, "z") < k(late, "a"));
        assert!(k(early, "B") < k(early, "a"));
        assert!(k(early, "a") < k(early, "ab"));
        assert!(k(early, "z").version() < k(late, "a").version());
    }

    proptest! {
        #[test]
        fn version_text_sorts_like_the_key(
            a in EventTime::MIN_MICROS..=EventTime::MAX_MICROS,
            b in EventTime::MIN_MICROS..=EventTime::MAX_MICROS,
            ida in "[ -~]{0,6}",
            idb in "[ -~]{0,6}",
            same_time in any::<bool>(),
        ) {
            let b = if same_time { a } else { b };
            let ka = EventKey { time: EventTime::from_micros(a).unwrap(), id: ida };
            let kb = EventKey { time: EventTime::from_micros(b).unwrap(), id: idb };
            prop_assert_eq!(ka.cmp(&kb), ka.version().as_bytes().cmp(kb.version().as_bytes()));
            prop_assert_eq!(EventTime::parse(&ka.time.to_string()).unwrap(), ka.time);
        }
    }
}
