//! What a failure means, decided once: one pure function from a [`Failure`] and the facts seen
//! around it to the one [`Step`] that follows. A batch and a single event take the same
//! decision, so neither can miss a branch the other has. The connection door
//! (`tenant_db`) acts on the waits for a connection; the executor on everything else. Whether
//! PostgreSQL is down is I/O (`execute::outage`): it is asked first and handed in as a fact.

use crate::failure::{Failure, FailureClass};

/// Whether the PostgreSQL behind a failure answers, as a probe found it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Reach {
    /// It answers, or the failure is not one that a server's absence explains.
    #[default]
    Answers,
    /// The tenant's server does not answer while the registry does: that server's outage.
    ServerDown,
    /// No tenant database can be reached: the only server (template mode) or the registry is
    /// down.
    AllDown,
}

/// What was seen when an attempt failed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Seen {
    /// Events the attempt carried.
    pub events: usize,
    /// What a probe found of the PostgreSQL behind the failure (asked only after a
    /// connection-level failure).
    pub reach: Reach,
    /// Sessions of other tenants wait for room in the server's connection budget.
    pub budget_contended: bool,
    /// The tenant's schema was already migrated again for this work.
    pub remigrated: bool,
    /// The worker is stopping.
    pub stopping: bool,
}

/// What happens next to the work whose attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Wait for a connection again: the budget's backpressure, never an attempt (contract
    /// section 7).
    WaitForSlot,
    /// The server refused a connection for lack of slots: wait with backoff and try again,
    /// never an attempt.
    BackOff,
    /// The tenant's tables are gone (its database recreated under the worker): migrate it again
    /// and try once more.
    Remigrate,
    /// PostgreSQL cannot be reached at all: hold the messages, back off, try again; retrying
    /// through the tiers would only burn every message's attempts.
    HoldForOutage,
    /// The tenant's server cannot be reached while others can: an outage of that server, not a
    /// failure of its events (contract section 7). The tenant is marked slow and its messages
    /// set aside, counting no attempt however long it lasts, so that they hold nothing that
    /// other servers' tenants need; its probes find the server back.
    WaitOutServer,
    /// The tenant's own database is in trouble: mark it slow and set its messages aside, so that
    /// it holds neither the partition nor the budget.
    MarkSlow,
    /// One of several events failed for good: each is applied alone, so that one bad event
    /// cannot dead-letter the others.
    Split,
    /// Try again later through a retry tier (an attempt; after the last, dead-lettered as
    /// `exhausted`).
    Retry,
    /// Dead-letter as `permanent` at once.
    DeadLetter,
    /// The worker stops while the work waits: the broker gets the messages back.
    HandBack,
}

pub(crate) fn decide(failure: &Failure, seen: Seen) -> Step {
    let pool_timeout = matches!(failure, Failure::PoolTimeout(_));
    if failure.is_server_refusal() || (pool_timeout && seen.budget_contended) {
        return match (seen.stopping, failure.is_server_refusal()) {
            (true, _) => Step::HandBack,
            (false, true) => Step::BackOff,
            (false, false) => Step::WaitForSlot,
        };
    }
    if failure.is_schema_missing() && !seen.remigrated {
        return Step::Remigrate;
    }
    if failure.is_connection_level() {
        match (seen.reach, seen.stopping) {
            (Reach::AllDown, true) => return Step::HandBack,
            (Reach::AllDown, false) => return Step::HoldForOutage,
            (Reach::ServerDown, _) => return Step::WaitOutServer,
            (Reach::Answers, _) => {}
        }
    }
    // The tenant's own pool stayed busy with nobody else waiting: its sessions are held by
    // statements that do not end, which is the tenant's trouble, and no attempt either.
    if failure.marks_slow() || pool_timeout {
        return Step::MarkSlow;
    }
    match failure.class() {
        FailureClass::Permanent if seen.events > 1 => Step::Split,
        FailureClass::Permanent => Step::DeadLetter,
        FailureClass::Transient => Step::Retry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::cause;
    use crate::failure::fake::{sqlstate, too_many_clients as refused};
    use avsync_shared::event::EventError;
    use std::time::Duration;

    fn unreachable() -> Failure {
        Failure::Unreachable(cause("connection refused"))
    }

    fn pool_timeout() -> Failure {
        Failure::PoolTimeout(Duration::from_secs(10))
    }

    fn bad_event() -> Failure {
        Failure::Event(EventError::MissingSub("member.joined".into()))
    }

    const ONE: Seen = Seen {
        events: 1,
        reach: Reach::Answers,
        budget_contended: false,
        remigrated: false,
        stopping: false,
    };
    const BATCH: Seen = Seen { events: 3, ..ONE };
    const CONTENDED: Seen = Seen {
        budget_contended: true,
        ..ONE
    };
    const OUTAGE: Seen = Seen {
        reach: Reach::AllDown,
        ..ONE
    };
    const SERVER_DOWN: Seen = Seen {
        reach: Reach::ServerDown,
        ..ONE
    };
    const STOPPING: Seen = Seen {
        stopping: true,
        ..ONE
    };
    const REMIGRATED: Seen = Seen {
        remigrated: true,
        ..ONE
    };

    /// Every row: a failure, what was seen, the step. A batch and a single event share every
    /// row but the split, which is the regression the single-event path once had: under budget
    /// contention its wait for a connection spent a retry attempt.
    #[test]
    fn each_failure_has_one_step() {
        let rows: Vec<(Failure, Seen, Step)> = vec![
            (pool_timeout(), CONTENDED, Step::WaitForSlot),
            (
                pool_timeout(),
                Seen {
                    events: 3,
                    ..CONTENDED
                },
                Step::WaitForSlot,
            ),
            (pool_timeout(), ONE, Step::MarkSlow),
            (
                pool_timeout(),
                Seen {
                    stopping: true,
                    ..CONTENDED
                },
                Step::HandBack,
            ),
            (refused(), ONE, Step::BackOff),
            (refused(), BATCH, Step::BackOff),
            (refused(), OUTAGE, Step::BackOff),
            (refused(), STOPPING, Step::HandBack),
            (sqlstate("42P01"), ONE, Step::Remigrate),
            (sqlstate("42P01"), BATCH, Step::Remigrate),
            (sqlstate("42P01"), REMIGRATED, Step::Retry),
            (unreachable(), OUTAGE, Step::HoldForOutage),
            (
                unreachable(),
                Seen {
                    events: 3,
                    ..OUTAGE
                },
                Step::HoldForOutage,
            ),
            (
                unreachable(),
                Seen {
                    stopping: true,
                    ..OUTAGE
                },
                Step::HandBack,
            ),
            (unreachable(), ONE, Step::Retry),
            (unreachable(), SERVER_DOWN, Step::WaitOutServer),
            (
                unreachable(),
                Seen {
                    events: 3,
                    ..SERVER_DOWN
                },
                Step::WaitOutServer,
            ),
            (
                unreachable(),
                Seen {
                    stopping: true,
                    ..SERVER_DOWN
                },
                Step::WaitOutServer,
            ),
            (
                Failure::NoAnswer(Duration::from_secs(10)),
                SERVER_DOWN,
                Step::WaitOutServer,
            ),
            (sqlstate("08006"), SERVER_DOWN, Step::WaitOutServer),
            (refused(), SERVER_DOWN, Step::BackOff),
            (Failure::TenantUnknown, SERVER_DOWN, Step::Retry),
            (sqlstate("23514"), SERVER_DOWN, Step::DeadLetter),
            (
                Failure::NoAnswer(Duration::from_secs(10)),
                OUTAGE,
                Step::HoldForOutage,
            ),
            (
                Failure::NoAnswer(Duration::from_secs(10)),
                ONE,
                Step::MarkSlow,
            ),
            (sqlstate("57014"), ONE, Step::MarkSlow),
            (sqlstate("55P03"), BATCH, Step::MarkSlow),
            (sqlstate("55P03"), OUTAGE, Step::MarkSlow),
            (
                Failure::DatabaseRefused {
                    database: "tenant_a".into(),
                },
                ONE,
                Step::MarkSlow,
            ),
            (sqlstate("23514"), BATCH, Step::Split),
            (sqlstate("23514"), ONE, Step::DeadLetter),
            (bad_event(), ONE, Step::DeadLetter),
            (Failure::TenantDisabled, BATCH, Step::Split),
            (sqlstate("40001"), ONE, Step::Retry),
            (sqlstate("40001"), BATCH, Step::Retry),
            (Failure::TenantUnknown, OUTAGE, Step::Retry),
            (
                Failure::NotProvisioned {
                    database: "tenant_a".into(),
                },
                ONE,
                Step::Retry,
            ),
        ];
        for (failure, seen, step) in rows {
            assert_eq!(decide(&failure, seen), step, "{failure} with {seen:?}");
        }
    }

    /// Nothing that is only a wait for a connection ever comes out as an attempt or a dead
    /// letter, whatever else was seen and however many events the work carries.
    #[test]
    fn a_wait_for_a_connection_is_never_an_attempt() {
        for events in [1, 2, 250] {
            for reach in [Reach::Answers, Reach::ServerDown, Reach::AllDown] {
                for remigrated in [false, true] {
                    let seen = Seen {
                        events,
                        reach,
                        budget_contended: true,
                        remigrated,
                        stopping: false,
                    };
                    for failure in [pool_timeout(), refused()] {
                        let step = decide(&failure, seen);
                        assert!(
                            matches!(step, Step::WaitForSlot | Step::BackOff),
                            "{failure} with {seen:?}: {step:?}"
                        );
                    }
                }
            }
        }
    }
}
