//! Each tenant's standing in this worker (its held messages and its circuit), so that one tenant's trouble stays its own.
//!
//! - **The bound.** A tenant may hold at most `AVSYNC_TENANT_MAX_UNSETTLED` unsettled messages
//!   while it is stalled (nothing committed for [`STALL`]); what it receives beyond that is set
//!   aside through the broker. A tenant is stalled only while a statement of it runs on a session
//!   and has not committed for [`STALL`]: a tenant whose batch waits for a session within the
//!   worker's budget, or lingers for company in a backlog, may hold more (in a backlog of many
//!   tenants those waits are long and nobody's trouble, contract section 7, and what the tenant
//!   gathers meanwhile is what its session, once opened, applies together); so may a tenant
//!   that keeps committing (a bulk import).
//! - **The circuit.** A tenant whose statements time out, whose database does not answer, or
//!   whose database refuses it connections (its own `CONNECTION LIMIT`) is marked slow: its new
//!   events are set aside at once, and its batches still waiting for a connection give up theirs.
//!   After a backoff (from [`FIRST_BACKOFF`], doubling to [`MAX_BACKOFF`]) one message is let
//!   through as a probe; its commit closes the circuit, another slow failure opens it for longer.

use crate::metrics::SetAsideReason;
use avsync_shared::TenantId;
use prometheus::{IntCounter, IntGauge};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// A tenant that has committed nothing for this long, while holding messages, is stalled.
pub const STALL: Duration = Duration::from_secs(1);
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A tenant that committed within this long likely still has an open session: it is warm.
pub const WARM: Duration = Duration::from_secs(5);
/// How long a probe may take to tell that its tenant is still stuck: a statement waiting for a
/// held lock gives up after the lock timeout. A message set aside comes back no sooner than the
/// probe after its tenant's backoff could have told, so that a stuck tenant's backlog does not
/// pass through its partition again and again in front of its neighbours.
const PROBE: Duration = crate::tenant_db::provision::LOCK_TIMEOUT;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Circuit {
    Closed,
    Open { until: Instant, backoff: Duration },
    Probing { backoff: Duration },
}

impl Circuit {
    /// How long a message set aside now should stay away: until the probe after the time its
    /// tenant stays marked could have told (at once when it is not marked, or a probe runs).
    fn set_aside_wait(self, now: Instant) -> Duration {
        match self {
            Circuit::Open { until, .. } => until.saturating_duration_since(now) + PROBE,
            Circuit::Closed | Circuit::Probing { .. } => PROBE,
        }
    }
}

/// A newly received message: held (counted until the guard is dropped), or to be set aside.
pub enum Admitted {
    Hold(Held),
    SetAside {
        reason: SetAsideReason,
        wait: Duration,
    },
}

/// What to do with a tenant's newly received message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admission {
    /// Keep it; `probe` when it is the one message let through to test a slow tenant.
    Hold { probe: bool },
    /// Set it aside; the tenant is not expected to take it for about `wait`.
    SetAside {
        reason: SetAsideReason,
        wait: Duration,
    },
}

/// The pure state of one tenant.
#[derive(Debug, Clone)]
struct Standing {
    held: usize,
    /// When it last committed, or a statement of it started, whichever is later.
    progress: Instant,
    /// Its statements running on a session now.
    applying: usize,
    circuit: Circuit,
}

impl Standing {
    fn new(now: Instant) -> Self {
        Self {
            held: 0,
            progress: now,
            applying: 0,
            circuit: Circuit::Closed,
        }
    }

    fn admit(&mut self, bound: usize, now: Instant, calm: bool) -> Admission {
        match self.circuit {
            Circuit::Open { until, .. } if now < until => {
                return Admission::SetAside {
                    reason: SetAsideReason::Slow,
                    wait: self.circuit.set_aside_wait(now),
                }
            }
            Circuit::Open { backoff, .. } => {
                self.circuit = Circuit::Probing { backoff };
                self.hold(now);
                return Admission::Hold { probe: true };
            }
            Circuit::Probing { .. } => {
                return Admission::SetAside {
                    reason: SetAsideReason::Slow,
                    wait: self.circuit.set_aside_wait(now),
                }
            }
            Circuit::Closed => {}
        }
        let stalled = self.applying > 0 && now.saturating_duration_since(self.progress) >= STALL;
        if calm && self.held >= bound && stalled {
            return Admission::SetAside {
                reason: SetAsideReason::Backlog,
                wait: self.circuit.set_aside_wait(now),
            };
        }
        self.hold(now);
        Admission::Hold { probe: false }
    }

    fn hold(&mut self, now: Instant) {
        if self.held == 0 {
            self.progress = now;
        }
        self.held += 1;
    }

    /// A statement of it starts on a session: the stall clock counts from here.
    fn statement_started(&mut self, now: Instant) {
        self.applying += 1;
        self.progress = now;
    }

    fn statement_ended(&mut self) {
        self.applying = self.applying.saturating_sub(1);
    }

    fn committed(&mut self, now: Instant) {
        self.progress = now;
        self.circuit = Circuit::Closed;
    }

    /// Returns true when this opened a closed circuit.
    fn slow(&mut self, now: Instant) -> bool {
        match self.circuit {
            Circuit::Closed => {
                self.circuit = Circuit::Open {
                    until: now + FIRST_BACKOFF,
                    backoff: FIRST_BACKOFF,
                };
                true
            }
            Circuit::Probing { backoff } => {
                let backoff = (backoff * 2).min(MAX_BACKOFF);
                self.circuit = Circuit::Open {
                    until: now + backoff,
                    backoff,
                };
                false
            }
            Circuit::Open { .. } => false,
        }
    }

    /// A probe settled without telling whether the tenant is well: let another through.
    fn probe_ended(&mut self, now: Instant) {
        if let Circuit::Probing { backoff } = self.circuit {
            self.circuit = Circuit::Open {
                until: now,
                backoff,
            };
        }
    }

    fn is_slow(&self) -> bool {
        self.circuit != Circuit::Closed
    }
}

struct Entry {
    standing: Standing,
    /// Wakes the tenant's batches that wait for a connection when it is marked slow.
    marked: Arc<Notify>,
    /// What marked it slow last, for the status view.
    why: Option<String>,
}

struct Inner {
    bound: usize,
    tenants: Mutex<HashMap<TenantId, Entry>>,
    /// When each tenant last committed, for those that did within [`WARM`] (older ones are
    /// pruned from time to time).
    commits: Mutex<Commits>,
    marked_slow: IntCounter,
    slow_now: IntGauge,
}

impl Inner {
    fn with<T>(&self, tenant: &TenantId, f: impl FnOnce(&mut Entry, Instant) -> T) -> T {
        let now = Instant::now();
        let mut tenants = self.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let entry = tenants.entry(tenant.clone()).or_insert_with(|| Entry {
            standing: Standing::new(now),
            marked: Arc::new(Notify::new()),
            why: None,
        });
        let was_slow = entry.standing.is_slow();
        let out = f(entry, now);
        let is_slow = entry.standing.is_slow();
        if entry.standing.held == 0 && !is_slow {
            tenants.remove(tenant);
        }
        match (was_slow, is_slow) {
            (false, true) => self.slow_now.inc(),
            (true, false) => self.slow_now.dec(),
            _ => {}
        }
        out
    }
}

#[derive(Default)]
struct Commits {
    last: HashMap<TenantId, Instant>,
    since_prune: usize,
}

impl Commits {
    fn record(&mut self, tenant: &TenantId, now: Instant) {
        self.last.insert(tenant.clone(), now);
        self.since_prune += 1;
        if self.since_prune >= self.last.len().max(1024) {
            self.since_prune = 0;
            self.last
                .retain(|_, at| now.saturating_duration_since(*at) < WARM);
        }
    }

    fn is_warm(&self, tenant: &TenantId, now: Instant) -> bool {
        self.last
            .get(tenant)
            .is_some_and(|at| now.saturating_duration_since(*at) < WARM)
    }
}

/// A statement running; see [`Standings::statement`].
pub struct Statement {
    standings: Standings,
    tenant: TenantId,
}

impl Drop for Statement {
    fn drop(&mut self) {
        self.standings
            .inner
            .with(&self.tenant, |e, _| e.standing.statement_ended());
    }
}

/// Every tenant's standing in this worker.
#[derive(Clone)]
pub struct Standings {
    inner: Arc<Inner>,
}

impl Standings {
    /// `bound` is the most unsettled messages a stalled tenant holds; `marked_slow` and
    /// `slow_now` are `avsync_worker_tenants_marked_slow_total` and `avsync_worker_tenants_slow`.
    pub fn new(bound: usize, marked_slow: IntCounter, slow_now: IntGauge) -> Self {
        Self {
            inner: Arc::new(Inner {
                bound: bound.max(1),
                tenants: Mutex::new(HashMap::new()),
                commits: Mutex::new(Commits::default()),
                marked_slow,
                slow_now,
            }),
        }
    }

    /// Decides about a newly received message of `tenant`. `calm` is false while PostgreSQL is
    /// unreachable altogether: then every tenant is stalled and the worker holds what it has.
    /// A held message keeps its place until its guard is dropped.
    pub fn admit(&self, tenant: &TenantId, calm: bool) -> Admitted {
        let bound = self.inner.bound;
        match self
            .inner
            .with(tenant, |e, now| e.standing.admit(bound, now, calm))
        {
            Admission::Hold { probe } => Admitted::Hold(Held {
                standings: self.clone(),
                tenant: tenant.clone(),
                probe,
            }),
            Admission::SetAside { reason, wait } => Admitted::SetAside { reason, wait },
        }
    }

    /// A statement of `tenant` runs on a session until the guard is dropped: only meanwhile
    /// can the tenant be stalled.
    pub fn statement(&self, tenant: &TenantId) -> Statement {
        self.inner
            .with(tenant, |e, now| e.standing.statement_started(now));
        Statement {
            standings: self.clone(),
            tenant: tenant.clone(),
        }
    }

    /// How long a message of `tenant`, marked slow, should be set aside: until a probe after
    /// its backoff could have told that it is well again.
    pub fn set_aside_wait(&self, tenant: &TenantId) -> Duration {
        self.inner
            .with(tenant, |e, now| e.standing.circuit.set_aside_wait(now))
    }

    pub fn committed(&self, tenant: &TenantId) {
        let now = self.inner.with(tenant, |e, now| {
            e.standing.committed(now);
            now
        });
        self.inner
            .commits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(tenant, now);
    }

    /// Whether `tenant` has committed nothing within [`WARM`], so its next batch likely opens
    /// a session.
    pub fn is_cold(&self, tenant: &TenantId) -> bool {
        !self
            .inner
            .commits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_warm(tenant, Instant::now())
    }

    /// Marks `tenant` slow (`why` says what its failure was); its batches waiting for a
    /// connection are told to give up.
    pub fn mark_slow(&self, tenant: &TenantId, why: String) {
        let opened = self.inner.with(tenant, |e, now| {
            let opened = e.standing.slow(now);
            e.marked.notify_waiters();
            e.why = Some(why);
            opened
        });
        if opened {
            self.inner.marked_slow.inc();
        }
    }

    /// The tenants marked slow now, and the messages all tenants hold.
    pub fn view(&self) -> (Vec<SlowTenant>, usize) {
        let now = Instant::now();
        let wall = chrono::Utc::now();
        let tenants = self.inner.tenants.lock().unwrap_or_else(|e| e.into_inner());
        let slow = tenants
            .iter()
            .filter(|(_, e)| e.standing.is_slow())
            .map(|(tenant, e)| SlowTenant {
                tenant: tenant.to_string(),
                why: e.why.clone().unwrap_or_default(),
                until: match e.standing.circuit {
                    Circuit::Open { until, .. } => {
                        chrono::Duration::from_std(until.saturating_duration_since(now))
                            .ok()
                            .map(|left| {
                                (wall + left).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                            })
                    }
                    Circuit::Closed | Circuit::Probing { .. } => None,
                },
                probing: matches!(e.standing.circuit, Circuit::Probing { .. }),
            })
            .collect();
        let held = tenants.values().map(|e| e.standing.held).sum();
        (slow, held)
    }

    pub fn is_slow(&self, tenant: &TenantId) -> bool {
        self.inner.with(tenant, |e, _| e.standing.is_slow())
    }

    /// Resolves when `tenant` is marked slow.
    pub fn marked(&self, tenant: &TenantId) -> Arc<Notify> {
        self.inner.with(tenant, |e, _| e.marked.clone())
    }
}

/// A tenant marked slow, as the status view shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlowTenant {
    pub tenant: String,
    /// The failure that marked it.
    pub why: String,
    /// Until when (RFC 3339) its new events are set aside before one is let through as a
    /// probe; none while a probe runs.
    pub until: Option<String>,
    pub probing: bool,
}

/// A held message's place in its tenant's count.
pub struct Held {
    standings: Standings,
    tenant: TenantId,
    probe: bool,
}

impl Held {
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let probe = self.probe;
        self.standings.inner.with(&self.tenant, |e, now| {
            e.standing.held = e.standing.held.saturating_sub(1);
            if probe {
                e.standing.probe_ended(now);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(s: &mut Standing, bound: usize, now: Instant) -> Admission {
        s.admit(bound, now, true)
    }

    #[test]
    fn a_stalled_tenant_holds_only_its_bound() {
        let t0 = Instant::now();
        let mut s = Standing::new(t0);
        s.statement_started(t0);
        for _ in 0..3 {
            assert_eq!(hold(&mut s, 3, t0), Admission::Hold { probe: false });
        }
        // Not stalled yet: a fresh burst is held.
        assert_eq!(hold(&mut s, 3, t0), Admission::Hold { probe: false });
        let later = t0 + STALL;
        assert!(matches!(
            hold(&mut s, 3, later),
            Admission::SetAside {
                reason: SetAsideReason::Backlog,
                ..
            }
        ));
        // While PostgreSQL is away altogether, the worker holds.
        assert_eq!(s.admit(3, later, false), Admission::Hold { probe: false });
    }

    #[test]
    fn only_a_statement_that_does_not_commit_stalls_its_tenant() {
        let t0 = Instant::now();
        let mut s = Standing::new(t0);
        // Waiting for a session, or lingering for company: not stalled, however long.
        for i in 0..10u64 {
            let now = t0 + STALL * 3 + Duration::from_millis(i);
            assert_eq!(hold(&mut s, 2, now), Admission::Hold { probe: false });
        }
        let started = t0 + STALL * 4;
        s.statement_started(started);
        assert_eq!(hold(&mut s, 2, started), Admission::Hold { probe: false });
        assert!(matches!(
            hold(&mut s, 2, started + STALL),
            Admission::SetAside {
                reason: SetAsideReason::Backlog,
                ..
            }
        ));
        s.statement_ended();
        assert_eq!(
            hold(&mut s, 2, started + STALL * 2),
            Admission::Hold { probe: false }
        );
    }

    #[test]
    fn a_tenant_that_keeps_committing_may_hold_more() {
        let t0 = Instant::now();
        let mut s = Standing::new(t0);
        for i in 0..10u64 {
            let now = t0 + Duration::from_millis(400 * i);
            s.committed(now);
            assert_eq!(hold(&mut s, 2, now), Admission::Hold { probe: false });
        }
    }

    #[test]
    fn a_slow_tenant_is_set_aside_then_probed_then_closed() {
        let t0 = Instant::now();
        let mut s = Standing::new(t0);
        assert!(s.slow(t0));
        assert!(!s.slow(t0), "already open");
        assert!(matches!(
            hold(&mut s, 100, t0),
            Admission::SetAside {
                reason: SetAsideReason::Slow,
                wait
            } if wait == FIRST_BACKOFF + PROBE
        ));
        let after = t0 + FIRST_BACKOFF;
        assert_eq!(hold(&mut s, 100, after), Admission::Hold { probe: true });
        assert!(matches!(
            hold(&mut s, 100, after),
            Admission::SetAside {
                reason: SetAsideReason::Slow,
                ..
            }
        ));
        // The probe failed slow again: open for twice as long.
        s.slow(after);
        assert!(matches!(
            hold(&mut s, 100, after),
            Admission::SetAside { wait, .. } if wait == FIRST_BACKOFF * 2 + PROBE
        ));
        let again = after + FIRST_BACKOFF * 2;
        assert_eq!(hold(&mut s, 100, again), Admission::Hold { probe: true });
        s.committed(again);
        assert!(!s.is_slow());
        assert_eq!(hold(&mut s, 100, again), Admission::Hold { probe: false });
    }

    #[test]
    fn a_probe_that_ends_otherwise_lets_another_through() {
        let t0 = Instant::now();
        let mut s = Standing::new(t0);
        s.slow(t0);
        let after = t0 + FIRST_BACKOFF;
        assert_eq!(hold(&mut s, 100, after), Admission::Hold { probe: true });
        s.probe_ended(after);
        assert_eq!(hold(&mut s, 100, after), Admission::Hold { probe: true });
    }

    #[test]
    fn backoff_stops_growing_at_its_maximum() {
        let mut now = Instant::now();
        let mut s = Standing::new(now);
        s.slow(now);
        for _ in 0..20 {
            now += MAX_BACKOFF;
            assert_eq!(hold(&mut s, 100, now), Admission::Hold { probe: true });
            s.slow(now);
        }
        assert_eq!(
            s.circuit,
            Circuit::Open {
                until: now + MAX_BACKOFF,
                backoff: MAX_BACKOFF
            }
        );
    }

    #[test]
    fn warmth_fades_and_old_commits_are_pruned() {
        let t0 = Instant::now();
        let mut c = Commits::default();
        let a = TenantId::parse("a").unwrap();
        c.record(&a, t0);
        assert!(c.is_warm(&a, t0 + WARM / 2));
        assert!(!c.is_warm(&a, t0 + WARM));
        for i in 0..2000 {
            c.record(&TenantId::parse(&format!("t{i}")).unwrap(), t0 + WARM * 2);
        }
        assert!(!c.last.contains_key(&a), "pruned");
        assert!(c.last.len() <= 2000);
    }

    #[tokio::test]
    async fn guards_count_and_forget_a_well_tenant() {
        let tenants = Standings::new(
            2,
            IntCounter::new("m", "m").unwrap(),
            IntGauge::new("g", "g").unwrap(),
        );
        let t = TenantId::parse("a").unwrap();
        let a = tenants.admit(&t, true);
        let b = tenants.admit(&t, true);
        assert!(matches!((&a, &b), (Admitted::Hold(_), Admitted::Hold(_))));
        assert_eq!(tenants.inner.tenants.lock().unwrap()[&t].standing.held, 2);
        drop((a, b));
        assert!(tenants.inner.tenants.lock().unwrap().is_empty());
        assert!(tenants.is_cold(&t));
        tenants.committed(&t);
        assert!(!tenants.is_cold(&t));
        tenants.mark_slow(&t, "locked".into());
        assert!(tenants.is_slow(&t));
        let wait = tenants.set_aside_wait(&t);
        assert!(wait > PROBE && wait <= FIRST_BACKOFF + PROBE, "{wait:?}");
        assert!(matches!(
            tenants.admit(&t, true),
            Admitted::SetAside {
                reason: SetAsideReason::Slow,
                ..
            }
        ));
        assert_eq!(tenants.inner.slow_now.get(), 1);
        assert_eq!(tenants.inner.marked_slow.get(), 1);
    }
}
