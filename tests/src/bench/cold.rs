//! What one new tenant session costs the PostgreSQL server: opening it with the worker's session
//! settings, its first batch upsert (the worker's own statement, on caches that session has not
//! warmed), and the migration check a worker's first session of each database runs. With many
//! tenants and one session per tenant, this is most of what the server does.
//!
//! A session's cost is what the server spends on it from the postmaster's fork to the backend's
//! exit, as `opencost.py` counts it, but of this session alone: the postmaster's own CPU while
//! the session connects (the fork), plus the backend's whole life as the postmaster's
//! reaped-children time grows when it is reaped. Those times come in 10 ms ticks, exact only in
//! the mean over many sessions; a session during whose fork or exit another session of the
//! server started or ended (whose time would be counted too) is left out of the mean. The first batch and the migration check are exact: the
//! backend's own nanoseconds on the CPU (`/proc/<pid>/schedstat`, its pid from
//! `pg_backend_pid()`) around them. The open is the rest (the pid query included).

use crate::bench::cpu::process_seconds;
use crate::bench::report::{keys, Figure, Report};
use crate::bench::run::{seed, Bench};
use crate::bench::workload::{tenant_ids, Generator};
use crate::bench::BenchError;
use crate::support;
use avsync_shared::event::Effect;
use avsync_shared::Envelope;
use avsync_worker::tenant_db::provision;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use sqlx::postgres::PgConnectOptions;
use sqlx::PgConnection;
use sqlx::{ConnectOptions as _, Connection as _};
use std::collections::HashSet;
use std::str::FromStr;
use std::time::{Duration, Instant};

/// Events of the first batch: about what one tenant's batch holds when 1,000 tenants share a
/// 100,000-event queue.
pub const COLD_BATCH: u64 = 20;

/// Nanoseconds a process has spent on a CPU, from `/proc/<pid>/schedstat` text.
pub fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// What one measured session cost the server, in milliseconds of CPU.
#[derive(Debug, Clone, Copy)]
struct Cost {
    /// Fork to exit.
    whole: f64,
    /// What the session did once open.
    then: f64,
    /// No other session started or ended during this one's fork and exit.
    alone: bool,
}

/// How long to wait for the postmaster to reap a closed session's backend.
const REAP_WAIT: Duration = Duration::from_secs(2);

fn unreadable(what: String, e: impl std::fmt::Display) -> BenchError {
    BenchError::Internal(format!(
        "reading {what} ({e}): the cold-session figure needs the PostgreSQL server on this machine"
    ))
}

/// Milliseconds of CPU the session's backend has used so far.
fn backend_cpu_ms(pid: i32) -> Result<f64, BenchError> {
    let path = format!("/proc/{pid}/schedstat");
    let text = std::fs::read_to_string(&path).map_err(|e| unreadable(path.clone(), e))?;
    parse_schedstat(&text)
        .map(|ns| ns as f64 / 1e6)
        .ok_or_else(|| unreadable(path, text))
}

/// The postmaster's own and its reaped children's CPU so far, in milliseconds.
fn postmaster_cpu_ms(postmaster: u32) -> Result<(f64, f64), BenchError> {
    let path = format!("/proc/{postmaster}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| unreadable(path.clone(), e))?;
    let own = process_seconds(&stat, false).ok_or_else(|| unreadable(path.clone(), &stat))?;
    let with_children = process_seconds(&stat, true).ok_or_else(|| unreadable(path, &stat))?;
    Ok((own * 1e3, (with_children - own) * 1e3))
}

/// The processes whose parent is `postmaster`: its backends and helpers.
fn children(postmaster: u32) -> HashSet<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return HashSet::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| parent_of(*pid).is_ok_and(|parent| parent == postmaster))
        .filter_map(|pid| u32::try_from(pid).ok())
        .collect()
}

/// The parent of a backend: the postmaster.
fn parent_of(pid: i32) -> Result<u32, BenchError> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| unreadable(path.clone(), e))?;
    stat.rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().nth(1))
        .and_then(|ppid| ppid.parse().ok())
        .ok_or_else(|| unreadable(path, stat))
}

/// What a measured session does after it is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    FirstBatch,
    MigrationCheck,
}

/// Opens a session of `database` as the worker does, does `then` and closes it; returns what it
/// cost the server.
async fn measure(
    database: &str,
    postmaster: u32,
    then: Then,
    batch: &[Effect],
) -> Result<Cost, BenchError> {
    let options = provision::with_session_settings(
        PgConnectOptions::from_str(&support::database_url(database))?,
        provision::APPLICATION_NAME,
    );
    let before_fork = children(postmaster);
    let (forking, _) = postmaster_cpu_ms(postmaster)?;
    let mut conn = options.connect().await?;
    let (forked, _) = postmaster_cpu_ms(postmaster)?;
    let after_fork = children(postmaster);
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await?;
    let before = backend_cpu_ms(pid)?;
    match then {
        Then::FirstBatch => avsync_worker::apply::apply_batch(&mut conn, batch).await?,
        Then::MigrationCheck => provision::migrate_if_behind(&mut conn)
            .await
            .map_err(|e| BenchError::Internal(format!("migration check: {e}")))?,
    }
    let after = backend_cpu_ms(pid)?;
    let before_exit = children(postmaster);
    let (_, reaped_before) = postmaster_cpu_ms(postmaster)?;
    let _ = conn.close().await;
    let closed = Instant::now();
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        if closed.elapsed() > REAP_WAIT {
            return Err(BenchError::Timeout {
                what: format!("the backend {pid} of a closed session to exit"),
                after: REAP_WAIT,
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (_, reaped) = postmaster_cpu_ms(postmaster)?;
    let after_exit = children(postmaster);
    let ours = u32::try_from(pid).ok();
    let others_forked = after_fork
        .difference(&before_fork)
        .any(|p| Some(*p) != ours);
    let others_exited = before_exit
        .difference(&after_exit)
        .any(|p| Some(*p) != ours);
    Ok(Cost {
        whole: (forked - forking) + (reaped - reaped_before),
        then: after - before,
        alone: !others_forked && !others_exited,
    })
}

/// A first batch for the session of `rep`, `index`: one tenant's events, some for users the
/// database already holds.
fn batch(rep: u32, index: usize) -> Vec<Effect> {
    let tenant = tenant_ids(1);
    Generator::new(
        seed(9, rep * 1_000 + index as u32),
        &format!("c{rep}_{index}"),
        &tenant,
        COLD_BATCH * 3,
    )
    .events(COLD_BATCH)
    .iter()
    .filter_map(|e| {
        let envelope = Envelope::decode(&e.body).ok()?;
        Effect::decode(&envelope, &e.body).ok().flatten()
    })
    .collect()
}

/// The server's postmaster: the parent of a backend.
async fn postmaster() -> Result<u32, BenchError> {
    let mut admin = PgConnection::connect(support::PG_ADMIN_URL).await?;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut admin)
        .await?;
    let parent = parent_of(pid);
    let _ = admin.close().await;
    parent
}

impl Bench<'_> {
    /// Measures `--cold-sessions` new sessions per repetition, each of a database not used
    /// since its previous repetition (cycling, as the worker does over many tenants); each
    /// database served once before, as every tenant is after its first session.
    pub(super) async fn cold_sessions(&mut self, report: &mut Report) -> Result<(), BenchError> {
        let count = self.args.cold_sessions;
        eprintln!(
            "  cold sessions: PostgreSQL CPU of {count} new sessions each with a first batch of {COLD_BATCH} events, and of the migration check"
        );
        let template = self.template().await?;
        let names: Vec<String> = (0..count)
            .map(|i| format!("{}_cold_{i:03}", self.prefix))
            .collect();
        crate::bench::drain::create_from_template(&template, names.clone()).await?;
        let postmaster = postmaster().await?;
        // The priming batches are of a repetition of their own, after the measured ones.
        let priming = self.reps();
        stream::iter(names.iter().enumerate())
            .map(|(i, name)| async move {
                measure(name, postmaster, Then::FirstBatch, &batch(priming, i))
                    .await
                    .map(|_| ())
            })
            .buffer_unordered(2)
            .try_collect::<Vec<()>>()
            .await?;
        let (mut open, mut first, mut total, mut migration) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for rep in 0..self.reps() {
            let mut costs = Vec::new();
            let mut checks = Vec::new();
            for (i, name) in names.iter().enumerate() {
                costs.push(measure(name, postmaster, Then::FirstBatch, &batch(rep, i)).await?);
                checks.push(measure(name, postmaster, Then::MigrationCheck, &[]).await?);
            }
            // The postmaster's times come in 10 ms ticks: only their mean over many sessions is
            // exact. Sessions whose fork or exit shared its moments with another's are left out.
            let clean: Vec<&Cost> = costs.iter().filter(|c| c.alone).collect();
            let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
            let (opened, batched) = (
                mean(clean.iter().map(|c| c.whole - c.then).collect()),
                mean(costs.iter().map(|c| c.then).collect()),
            );
            open.push(opened);
            first.push(batched);
            total.push(opened + batched);
            migration.push(mean(checks.iter().map(|c| c.then).collect()));
            if clean.len() * 2 < costs.len() {
                report.note(format!(
                    "cold sessions, repetition {}: only {} of {} sessions forked and exited while no other session did; the open is their mean",
                    rep + 1,
                    clean.len(),
                    costs.len()
                ));
            }
            eprintln!(
                "  repetition {}: open {:.2} ms + first batch {:.2} ms = {:.2} ms PostgreSQL CPU; migration check {:.2} ms",
                rep + 1,
                open[rep as usize],
                first[rep as usize],
                total[rep as usize],
                migration[rep as usize]
            );
        }
        for (key, title, samples) in [
            (
                keys::COLD_TOTAL,
                format!("cold session: open + first batch ({COLD_BATCH} events), PostgreSQL CPU"),
                total,
            ),
            (
                keys::COLD_OPEN,
                "  open and close (worker's session settings; fork to exit)".to_owned(),
                open,
            ),
            (
                keys::COLD_FIRST_BATCH,
                "  first batch upsert, PostgreSQL CPU".to_owned(),
                first,
            ),
            (
                keys::COLD_MIGRATION_CHECK,
                "  migration check (a worker's first session of a database)".to_owned(),
                migration,
            ),
        ] {
            report.add(Figure::new(key, 5, title, "ms", samples, &[]));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_gives_nanoseconds_on_the_cpu() {
        assert_eq!(parse_schedstat("8457311 120331 17\n"), Some(8_457_311));
        assert_eq!(parse_schedstat(""), None);
        assert_eq!(parse_schedstat("x 1 2"), None);
    }

    #[test]
    fn this_process_has_a_parent() {
        let me = i32::try_from(std::process::id()).unwrap();
        assert!(parent_of(me).unwrap() > 0);
        assert!(parent_of(-1).is_err());
    }

    #[test]
    fn a_first_batch_sets_something_for_each_event() {
        assert_eq!(batch(0, 0).len() as u64, COLD_BATCH);
    }
}
