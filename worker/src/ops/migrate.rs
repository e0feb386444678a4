//! `avsync-worker migrate (--tenant T | --all)`: apply the tenant schema ahead of traffic, for
//! deployments that run with AVSYNC_AUTO_MIGRATE=false.

use crate::settings::Checked;
use crate::tenant_db::provision::{connect, migrator};
use crate::tenant_db::resolve::{Resolver, TenantDb};
use avsync_shared::TenantId;
use clap::Args;
use std::io::Write;

/// Which tenant databases to migrate; exactly one is required.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct MigrateArgs {
    /// This tenant's database.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Every enabled tenant of the registry (needs AVSYNC_TENANT_REGISTRY_URL).
    #[arg(long)]
    pub all: bool,
}

/// Migrates the chosen databases, printing one line per migrated tenant on `out`. Every tenant
/// is tried; the result is an error when any failed.
pub async fn run<W: Write>(
    args: &MigrateArgs,
    checked: &Checked,
    out: &mut W,
) -> anyhow::Result<()> {
    let resolver = Resolver::new(&checked.tenants);
    let mut targets: Vec<(String, Result<TenantDb, crate::failure::Failure>)> = Vec::new();
    if let Some(tenant) = &args.tenant {
        let id = TenantId::parse(tenant)?;
        targets.push((tenant.clone(), resolver.resolve(&id).await));
    } else {
        let Some(entries) = resolver.registry_entries().await? else {
            anyhow::bail!(
                "--all needs AVSYNC_TENANT_REGISTRY_URL: the URL template has no list of tenants; use --tenant"
            );
        };
        for entry in entries {
            if entry.enabled {
                let db = TenantDb::from_url(&entry.database_url);
                targets.push((entry.tenant_id, db));
            } else {
                eprintln!("skipped disabled tenant {}", entry.tenant_id);
            }
        }
    }
    resolver.close().await;
    let mut failed = 0usize;
    for (tenant, db) in targets {
        let result = match db {
            Ok(db) => migrate_one(&db, checked.pools.create_databases)
                .await
                .map(|()| db.database().to_owned()),
            Err(e) => Err(e),
        };
        match result {
            Ok(database) => writeln!(out, "migrated {tenant} ({database})")?,
            Err(e) => {
                failed += 1;
                eprintln!("tenant {tenant}: {e}");
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} tenant database(s) could not be migrated");
    }
    Ok(())
}

async fn migrate_one(db: &TenantDb, create: bool) -> Result<(), crate::failure::Failure> {
    let mut conn = connect(db, create).await?;
    let result = migrator().run_direct(&mut conn).await;
    let _ = sqlx::Connection::close(conn).await;
    result.map_err(Into::into)
}
