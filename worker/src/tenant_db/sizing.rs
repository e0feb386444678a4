//! `AVSYNC_MAX_CONNECTIONS=auto`: how many sessions this worker may hold to one PostgreSQL
//! server, sized from what the server allows and what `pg_stat_activity` shows in use, so that
//! avsync's workers, all together, leave `AVSYNC_PG_FREE_CONNECTIONS` slots free for the other
//! clients.
//!
//! Every worker tags its sessions with an application name of its own that starts with
//! [`APPLICATION_NAME`](super::provision::APPLICATION_NAME), so each one sees on every server how
//! many avsync workers hold sessions there, how many sessions they hold, and its own. [`share`]
//! turns what it sees into its budget: an equal share of the room left by the other clients and
//! the free slots, never more than its own sessions plus its share of the room nobody uses yet
//! (so that a worker does not take what another still holds, and two workers that see the same
//! unused slots take half each), and that room only once the other workers have sized their
//! budgets for as many workers as it sees: before they have, a session another worker is
//! turning over (closed, not yet reopened) looks unused for an instant but is still that
//! worker's to take. One slot of the room stays unused: the first session of a worker that
//! arrives, which it needs before it can see the server at all.

use std::fmt;
use std::str::FromStr;

/// The most `AVSYNC_MAX_CONNECTIONS` may pin.
pub const FIXED_MAX: u32 = 10_000;

/// `AVSYNC_MAX_CONNECTIONS`: sized from the server (`auto`), or pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxConnections {
    Auto,
    Fixed(u32),
}

impl FromStr for MaxConnections {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        if value.eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        value
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=FIXED_MAX).contains(n))
            .map(Self::Fixed)
            .ok_or_else(|| {
                format!("must be `auto` or a whole number of sessions from 1 to {FIXED_MAX}")
            })
    }
}

impl fmt::Display for MaxConnections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Fixed(n) => write!(f, "{n}"),
        }
    }
}

/// How the budgets are sized: pinned, or from each server with the free slots to leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sizing {
    Fixed(usize),
    /// `free`: `AVSYNC_PG_FREE_CONNECTIONS`, or a fifth of each server's `max_connections`.
    Auto {
        free: Option<u32>,
    },
}

impl Sizing {
    pub fn new(max: MaxConnections, free: Option<u32>) -> Self {
        match max {
            MaxConnections::Auto => Self::Auto { free },
            MaxConnections::Fixed(n) => Self::Fixed(usize::try_from(n).unwrap_or(usize::MAX)),
        }
    }
}

/// One server as a worker sees it, on one of its own sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct Seen {
    /// `max_connections`.
    pub max_connections: i64,
    /// Slots ordinary roles cannot take: `superuser_reserved_connections` and, from PostgreSQL
    /// 16, `reserved_connections`.
    pub reserved: i64,
    /// Client backends: every session that takes one of `max_connections`.
    pub clients: i64,
    /// The sessions of every avsync worker, this one's included.
    pub avsync_sessions: i64,
    /// avsync workers holding sessions there, this one included.
    pub workers: i64,
    /// This worker's sessions.
    pub own: i64,
    /// The most sessions any other avsync worker holds there.
    pub most_by_another: i64,
}

/// What one look at a server reads. A role without `pg_read_all_stats` sees neither the
/// `backend_type` nor the `application_name` of other roles' sessions: those with a role (the
/// server's own processes have none) are taken for other clients, which errs on the side of
/// leaving more free.
const LOOK: &str = "\
WITH activity AS (
  SELECT application_name,
         coalesce(backend_type = 'client backend', usesysid IS NOT NULL) AS is_client
    FROM pg_stat_activity)
SELECT current_setting('max_connections')::bigint AS max_connections,
       current_setting('superuser_reserved_connections')::bigint
         + coalesce(current_setting('reserved_connections', true)::bigint, 0) AS reserved,
       count(*) FILTER (WHERE is_client) AS clients,
       count(*) FILTER (WHERE is_client AND starts_with(application_name, $1)) AS avsync_sessions,
       count(DISTINCT application_name)
         FILTER (WHERE is_client AND starts_with(application_name, $1)) AS workers,
       count(*) FILTER (WHERE is_client AND application_name = $2) AS own,
       (SELECT coalesce(max(held), 0)
          FROM (SELECT count(*) AS held FROM activity
                 WHERE is_client AND starts_with(application_name, $1) AND application_name <> $2
                 GROUP BY application_name) AS others) AS most_by_another
  FROM activity";

/// Looks at the server of `conn`, a session of the worker named `me`.
pub async fn look(conn: &mut sqlx::PgConnection, me: &str) -> Result<Seen, sqlx::Error> {
    sqlx::query_as(LOOK)
        .bind(super::provision::APPLICATION_NAME)
        .bind(me)
        .fetch_one(conn)
        .await
}

/// Without `AVSYNC_PG_FREE_CONNECTIONS`, a server's `max_connections` divided by this is left free.
pub const DEFAULT_FREE_SHARE: i64 = 5;

/// The free slots to leave on a server: `free`, or a fifth of its `max_connections`.
pub fn free_target(seen: &Seen, free: Option<u32>) -> i64 {
    free.map_or(seen.max_connections / DEFAULT_FREE_SHARE, i64::from)
}

/// Looks in a row that saw as many workers, after which every other worker has sized its budget
/// for them even when its looks come late: one that still holds more than an equal share then is
/// pinned (`AVSYNC_MAX_CONNECTIONS` a number) or waits for sessions in use to come back, and is
/// not waited for.
pub const STEADY_LOOKS: u32 = 3;

/// This worker's budget on the server it saw, leaving `free` slots (or a fifth) to others;
/// `held_open` is what the worker counts open there as it looks, `steady` how many of its looks
/// just before this one, back to back, saw as many workers (None at its first since it came to
/// the server).
pub fn share(seen: &Seen, free: Option<u32>, held_open: usize, steady: Option<u32>) -> usize {
    let others = seen.clients - seen.avsync_sessions;
    // One slot stays unused for the first session of an arriving worker (see the module).
    let room = seen.max_connections - seen.reserved - free_target(seen, free) - others - 1;
    let workers = seen.workers.max(1);
    let fair = room.div_euclid(workers);
    let unused = room - seen.avsync_sessions;
    // Room nobody uses at this instant is free to take only once every other worker has sized
    // its budget for as many workers as this one sees: when it is alone at its first look, or
    // saw as many at its previous look, a look or more ago (each looks about once a second while
    // it holds sessions), and no other holds more than an equal share, which one still sized for
    // fewer workers does while it wants more than that (a look comes late on a busy machine:
    // seen, a second worker growing at its second look beside a first still at its budget for
    // one); or after [`STEADY_LOOKS`] with as many. Before that, a session another is turning
    // over (closed, its next not yet open) is still its to take; and a worker that seems gone
    // may only be turning over its one session.
    let others_sized = match steady {
        None => workers == 1,
        Some(0) => false,
        Some(looks) => looks >= STEADY_LOOKS || seen.most_by_another <= fair,
    };
    let grown = if others_sized {
        seen.own + unused.div_euclid(workers)
    } else {
        seen.own
    };
    // Sessions of its own the server shows beyond those the worker holds open were closed, and
    // their backends have not exited yet: on a busy server that takes longer than the slot's
    // grace (`budget::CLOSE_GRACE`), and while sessions turn over fast they take slots all the
    // same (seen: two workers left 14 free of a target of 20).
    let lingering = (seen.own - i64::try_from(held_open).unwrap_or(i64::MAX)).max(0);
    usize::try_from(fair.min(grown) - lingering)
        .unwrap_or(0)
        .max(1)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A default server: 100 slots, 3 reserved, the free target a fifth (20).
    /// The other workers hold the sessions that are not its own in equal parts.
    pub(crate) fn seen(clients_else: i64, workers: i64, avsync_sessions: i64, own: i64) -> Seen {
        let others = (workers - 1).max(1);
        Seen {
            max_connections: 100,
            reserved: 3,
            clients: clients_else + avsync_sessions,
            avsync_sessions,
            workers,
            own,
            most_by_another: (avsync_sessions - own).max(0).div_euclid(others)
                + i64::from((avsync_sessions - own).max(0) % others != 0),
        }
    }

    #[test]
    fn auto_and_numbers_parse_and_anything_else_is_refused() {
        assert_eq!("auto".parse(), Ok(MaxConnections::Auto));
        assert_eq!("AUTO".parse(), Ok(MaxConnections::Auto));
        assert_eq!("12".parse(), Ok(MaxConnections::Fixed(12)));
        for bad in ["0", "-1", "10001", "", "many", "2.5"] {
            let e = bad.parse::<MaxConnections>().unwrap_err();
            assert!(e.contains("`auto`"), "{bad}: {e}");
        }
        assert_eq!(MaxConnections::Fixed(7).to_string(), "7");
        assert_eq!(MaxConnections::Auto.to_string(), "auto");
    }

    #[test]
    fn a_pinned_number_pins() {
        assert_eq!(
            Sizing::new(MaxConnections::Fixed(9), Some(50)),
            Sizing::Fixed(9)
        );
        assert_eq!(
            Sizing::new(MaxConnections::Auto, None),
            Sizing::Auto { free: None }
        );
    }

    /// (what is seen, `AVSYNC_PG_FREE_CONNECTIONS`, the budget, why).
    #[test]
    fn shares() {
        // Room on a default server with 5 other clients: 100 − 3 − 20 − 5 − 1 (arrivals) = 71.
        let cases: &[(Seen, Option<u32>, usize, &str)] = &[
            (seen(5, 1, 1, 1), None, 71, "alone: all the room"),
            (seen(5, 1, 71, 71), None, 71, "alone and full: stays"),
            (
                seen(5, 2, 72, 1),
                None,
                1,
                "a second arrives: it waits for the first to shrink",
            ),
            (
                seen(5, 2, 72, 71),
                None,
                35,
                "the first, told of the second, shrinks to its share",
            ),
            (
                seen(5, 2, 36, 1),
                None,
                18,
                "the first shrank to 35: half the unused 35",
            ),
            (seen(5, 2, 70, 35), None, 35, "both at their share"),
            (seen(5, 2, 2, 1), None, 35, "two idle workers, equal shares"),
            (seen(5, 4, 4, 1), None, 17, "four: 71 / 4"),
            (
                seen(5, 4, 70, 35),
                None,
                17,
                "four, one over its share: back to it",
            ),
            (seen(5, 4, 68, 17), None, 17, "four at their shares"),
            (
                seen(5, 4, 60, 10),
                None,
                12,
                "four, 11 unused: a quarter of them",
            ),
            (
                seen(90, 1, 1, 1),
                None,
                1,
                "others take everything: room negative, one to progress",
            ),
            (seen(76, 1, 1, 1), None, 1, "room exactly 0"),
            (seen(5, 0, 0, 0), None, 71, "nothing of its own seen yet"),
            (seen(5, 1, 1, 1), Some(0), 91, "no free target"),
            (seen(5, 1, 1, 1), Some(80), 11, "a larger free target"),
            (seen(5, 1, 1, 1), Some(200), 1, "a target beyond the server"),
        ];
        for (seen, free, budget, why) in cases {
            assert_eq!(
                share(seen, *free, holding_all_seen(seen), Some(1)),
                *budget,
                "{why}: {seen:?}"
            );
        }
    }

    /// What a worker holds open when the server shows all of it and nothing more.
    fn holding_all_seen(seen: &Seen) -> usize {
        usize::try_from(seen.own).unwrap_or(0)
    }

    #[test]
    fn closed_sessions_the_server_still_counts_take_from_the_budget() {
        // Alone, 71 sessions seen of which it holds 66 open: 5 backends are still exiting.
        assert_eq!(share(&seen(5, 1, 71, 71), None, 66, Some(1)), 66);
        // Two at their shares, one with 3 exiting.
        assert_eq!(share(&seen(5, 2, 70, 35), None, 32, Some(1)), 32);
        // Sessions being opened that the server does not show yet change nothing.
        assert_eq!(share(&seen(5, 1, 60, 60), None, 64, Some(1)), 71);
        // Never below one, so that something keeps going.
        assert_eq!(share(&seen(5, 1, 71, 71), None, 0, Some(1)), 1);
    }

    /// The failure this rule is for: a second worker arrives while the first, still at a budget
    /// of 71, turns three sessions over; at the second's looks they seem unused.
    #[test]
    fn room_nobody_uses_is_taken_once_the_count_of_workers_held_for_a_look() {
        let arrival = seen(5, 2, 69, 1);
        assert_eq!(share(&arrival, None, 1, None), 1, "first look");
        assert_eq!(
            share(&arrival, None, 1, Some(1)),
            1,
            "second look, the first not shrunk yet (its look came late)"
        );
        assert_eq!(
            share(&arrival, None, 1, Some(STEADY_LOOKS)),
            2,
            "the first still above its share after looks enough: pinned, not waited for"
        );
        let shrunk = seen(5, 2, 34, 1);
        assert_eq!(
            share(&shrunk, None, 1, Some(1)),
            19,
            "second look, the first at 33"
        );
        assert_eq!(
            share(&shrunk, None, 1, Some(0)),
            1,
            "the count changed since"
        );
        // The first, seeing the arrival, shrinks to its share all the same.
        assert_eq!(share(&seen(5, 2, 72, 71), None, 71, Some(0)), 35);
        // Alone at its first look, there is nobody to wait for.
        assert_eq!(share(&seen(5, 1, 1, 1), None, 1, None), 71);
        // The other seems gone (its one session turned over as this looked): keep what it holds
        // until it looks again.
        assert_eq!(share(&seen(5, 1, 35, 35), None, 35, Some(0)), 35);
        assert_eq!(share(&seen(5, 1, 35, 35), None, 35, Some(1)), 71);
    }

    #[test]
    fn reserved_slots_are_never_counted_as_room() {
        let mut s = seen(0, 1, 1, 1);
        s.reserved = 3 + 10;
        assert_eq!(share(&s, Some(0), 1, Some(1)), 100 - 13 - 1);
    }

    /// Workers that all see one server take no more, together, than the room, whatever they
    /// hold when they look; so the free slots stay free once each has looked again.
    #[test]
    fn together_within_the_room() {
        for workers in [1_i64, 2, 4] {
            for held in [0, 10, 40, 71, 90] {
                let own = held / workers;
                let s = seen(5, workers, held, own);
                for steady in [1, STEADY_LOOKS] {
                    let each = share(&s, None, holding_all_seen(&s), Some(steady));
                    let total = each as i64 * workers;
                    assert!(
                        total <= 71 || each == 1,
                        "{workers} workers, {held} held, {steady} steady looks: {total}"
                    );
                }
            }
        }
    }
}
