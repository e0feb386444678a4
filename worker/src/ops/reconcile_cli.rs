//! `avsync-worker reconcile (--tenant T | --all) [--dry-run] [--json] [--force]`, which tenants
//! `--all` means, and the same as a schedule inside `run` (`AVSYNC_RECONCILE_INTERVAL`).
//!
//! `--all` is every enabled tenant of the registry. In template mode there is no list of
//! tenants, so it is every database on the template's server whose name the template gives for
//! some tenant id (e.g. `tenant_acme` for `.../tenant_{tenant_id}`); with a template without
//! `{tenant_id}` (one database for all tenants) it is every tenant that has a row in it. A tenant
//! with no database (or no row) yet is reconciled with `--tenant`, which creates and migrates its
//! database as the worker would.

use crate::failure::Failure;
use crate::metrics::{ReconcileMetrics, RunOutcome};
use crate::ops::authvital::ApiSettings;
use crate::ops::progress;
use crate::ops::reconcile::{LeftBound, Mode, Reconciler, Report};
use crate::settings::{Checked, ReconcileSchedule, Settings};
use crate::tenant_db::provision::{connect, migrator, quote_identifier};
use crate::tenant_db::resolve::{Resolver, TenantDb, PLACEHOLDER};
use crate::tenant_db::TenantDbs;
use anyhow::Context as _;
use avsync_shared::TenantId;
use clap::{ArgGroup, Args};
use rand::Rng;
use sqlx::Connection as _;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Which tenants to reconcile (exactly one of `--tenant`, `--all`), and how.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).multiple(false)))]
pub struct ReconcileArgs {
    /// This tenant (its database is created and migrated as the worker would).
    #[arg(long, group = "target")]
    pub tenant: Option<String>,
    /// Every tenant: the enabled registry tenants, or in template mode every tenant database on
    /// the template's server.
    #[arg(long, group = "target")]
    pub all: bool,
    /// Show what would change without writing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// One JSON object per tenant on stdout.
    #[arg(long)]
    pub json: bool,
    /// Apply a snapshot that a guard rail refuses.
    #[arg(long)]
    pub force: bool,
}

/// A tenant to reconcile and its database, or why it has none.
type Target = (String, Result<TenantDb, Failure>);

/// Every tenant `--all` names (see the module doc).
pub async fn every_tenant(resolver: &Resolver) -> anyhow::Result<Vec<Target>> {
    let Some(template) = resolver.template() else {
        let entries = resolver.registry_entries().await?.unwrap_or_default();
        return Ok(entries
            .into_iter()
            .filter(|entry| {
                if !entry.enabled {
                    tracing::info!(tenant = entry.tenant_id, "skipped disabled tenant");
                }
                entry.enabled
            })
            .map(|entry| {
                let db = TenantDb::from_url(&entry.database_url);
                (entry.tenant_id, db)
            })
            .collect());
    };
    if let Some(shared) = template.shared() {
        return tenants_in_shared_database(shared).await;
    }
    let Some((prefix, suffix, options)) = template.database_name_parts() else {
        anyhow::bail!(
            "--all in template mode needs {PLACEHOLDER} exactly once, in the database name of AVSYNC_TENANT_DATABASE_URL; use --tenant, or a tenant registry"
        );
    };
    let mut admin = sqlx::PgConnection::connect_with(&options.clone().database("postgres"))
        .await
        .context("cannot list the databases on the server of AVSYNC_TENANT_DATABASE_URL")?;
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datallowconn ORDER BY datname")
            .fetch_all(&mut admin)
            .await?;
    let _ = admin.close().await;
    Ok(names
        .iter()
        .filter_map(|name| name.strip_prefix(prefix)?.strip_suffix(suffix))
        .filter_map(|id| TenantId::parse(id).ok())
        .map(|id| {
            let db = template.database(&id);
            (id.as_str().to_owned(), db)
        })
        .collect())
}

async fn tenants_in_shared_database(db: &TenantDb) -> anyhow::Result<Vec<Target>> {
    let mut conn = connect(db, false).await?;
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('av_identities') IS NOT NULL")
        .fetch_one(&mut conn)
        .await?;
    let ids: Vec<String> = if exists {
        sqlx::query_scalar(&format!(
            "SELECT DISTINCT tenant_id FROM {} WHERE tenant_id IS NOT NULL ORDER BY 1",
            quote_identifier("av_identities")
        ))
        .fetch_all(&mut conn)
        .await?
    } else {
        Vec::new()
    };
    let _ = conn.close().await;
    Ok(ids.into_iter().map(|id| (id, Ok(db.clone()))).collect())
}

/// A reconciler as the command builds it: the command needs AuthVital whether or not a schedule
/// is set, so it checks those settings here.
pub fn reconciler(settings: &Settings, metrics: ReconcileMetrics) -> anyhow::Result<Reconciler> {
    let (api, application_id) = settings.reconcile_settings()?;
    let left = LeftBound {
        max_percent: settings.reconcile_max_left_percent,
        max_count: settings.reconcile_max_left,
    };
    build(api, application_id, left, metrics)
}

fn build(
    api: ApiSettings,
    application_id: Option<String>,
    left: LeftBound,
    metrics: ReconcileMetrics,
) -> anyhow::Result<Reconciler> {
    let api = crate::ops::authvital::AuthVital::new(api, metrics.clone())
        .context("cannot build the HTTP client for AuthVital")?;
    Ok(Reconciler {
        api,
        application_id,
        left,
        metrics,
    })
}

/// Runs the command, one report per tenant on `out`, progress of `--all` on stderr (a bar on a
/// terminal, none with `--json`). Every tenant is tried; the result is an error when any was
/// refused or failed.
pub async fn run<W: Write>(
    args: &ReconcileArgs,
    checked: &Checked,
    out: &mut W,
) -> anyhow::Result<()> {
    let settings = &checked.settings;
    let metrics = ReconcileMetrics::register(&prometheus::Registry::new())?;
    let reconciler = reconciler(settings, metrics)?;
    let resolver = Resolver::new(&checked.tenants);
    let targets = match &args.tenant {
        Some(tenant) => {
            let id = TenantId::parse(tenant)?;
            vec![(tenant.clone(), resolver.resolve(&id).await)]
        }
        None => every_tenant(&resolver).await?,
    };
    resolver.close().await;
    let mode = Mode {
        dry_run: args.dry_run,
        force: args.force,
        not_within: None,
    };
    let total = targets.len();
    let mut not_ok = 0usize;
    let progress = progress::bar(
        "reconcile",
        u64::try_from(total).unwrap_or(u64::MAX),
        args.json || !args.all,
    );
    for (tenant, db) in targets {
        progress.set_message(tenant.clone());
        let report = match (TenantId::parse(&tenant), db) {
            (Ok(id), Ok(db)) => reconcile_direct(&reconciler, settings, &db, &id, mode).await,
            (Err(e), _) => reconciler.failed(&tenant, &e),
            (_, Err(e)) => reconciler.failed(&tenant, &e),
        };
        if !report.ok() {
            not_ok += 1;
        }
        let line = if args.json {
            serde_json::to_string(&report)?
        } else {
            report.to_string()
        };
        // Stdout and the bar may share a terminal: the line goes out while the bar is off it.
        progress.suspend(|| writeln!(out, "{line}"))?;
        progress.inc(1);
    }
    progress.finish_and_clear();
    if args.all {
        eprintln!("reconciled {total} tenant(s), {not_ok} refused or failed");
    }
    if not_ok > 0 {
        anyhow::bail!("{not_ok} tenant(s) refused or failed");
    }
    Ok(())
}

/// One tenant on a connection of its own, created and migrated as the worker's pools would.
async fn reconcile_direct(
    reconciler: &Reconciler,
    settings: &Settings,
    db: &TenantDb,
    tenant: &TenantId,
    mode: Mode,
) -> Report {
    let opened = async {
        let mut conn = connect(db, settings.create_tenant_databases).await?;
        if settings.auto_migrate {
            migrator().run_direct(&mut conn).await?;
        }
        Ok::<_, Failure>(conn)
    };
    match opened.await {
        Ok(mut conn) => {
            let report = reconciler.reconcile(&mut conn, tenant, mode).await;
            let _ = conn.close().await;
            report
        }
        Err(e) => reconciler.failed(tenant.as_str(), &e),
    }
}

/// A wait of about `interval`: between three quarters and five quarters of it, so that workers
/// started together spread out.
fn jittered(interval: Duration) -> Duration {
    interval.mul_f64(rand::rng().random_range(0.75..1.25))
}

/// The schedule inside `run`: every tenant, about every `interval`, through the worker's own
/// pools. On shutdown a run in progress is dropped: its transaction rolls back, so it writes
/// nothing half.
pub(crate) async fn schedule(
    dbs: Arc<TenantDbs>,
    metrics: ReconcileMetrics,
    schedule: ReconcileSchedule,
    max_left_percent: u8,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let ReconcileSchedule {
        interval,
        api,
        application_id,
        max_left,
    } = schedule;
    let left = LeftBound {
        max_percent: max_left_percent,
        max_count: max_left,
    };
    let reconciler = build(api, application_id, left, metrics)?;
    // The first round comes at a random point of the first interval.
    let mut wait = interval.mul_f64(rand::rng().random_range(0.0..1.0));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(wait) => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = round(&dbs, &reconciler, interval) => {}
        }
        wait = jittered(interval);
    }
}

async fn round(dbs: &TenantDbs, reconciler: &Reconciler, interval: Duration) {
    let targets = match every_tenant(&dbs.resolver).await {
        Ok(targets) => targets,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "cannot list the tenants to reconcile");
            return;
        }
    };
    // Another worker's round of this interval may have come first.
    let mode = Mode {
        not_within: Some(interval / 2),
        ..Mode::default()
    };
    for (tenant, db) in targets {
        let id = match TenantId::parse(&tenant) {
            Ok(id) => id,
            Err(e) => {
                reconciler.failed(&tenant, &e);
                continue;
            }
        };
        let report = async {
            let mut conn = dbs.connection_to(&db?).await?;
            Ok::<_, Failure>(reconciler.reconcile(&mut conn, &id, mode).await)
        }
        .await
        .unwrap_or_else(|e| reconciler.failed(&tenant, &e));
        if report.outcome == RunOutcome::Refused.as_str() {
            let refusals: Vec<String> = report.refusals.iter().map(ToString::to_string).collect();
            tracing::warn!(
                tenant,
                refusals = refusals.join("; "),
                "reconcile refused; run `avsync-worker reconcile --tenant` to look, --force to apply"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_near_the_interval() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(100));
            assert!(d >= Duration::from_secs(75) && d < Duration::from_secs(125));
        }
    }
}
