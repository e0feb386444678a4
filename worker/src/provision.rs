//! Tenant databases themselves: creating a missing one (when allowed), migrating its schema,
//! and quoting identifiers for the SQL that names them. `pools` keeps the sessions.

use crate::failure::{cause, Failure};
use crate::pools::APPLICATION_NAME;
use crate::tenants::TenantDb;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use std::sync::Arc;
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The tenant schema. A worker older than a database's schema keeps working during a rolling
/// upgrade instead of refusing migrations it does not know.
pub fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("../migrations");
    migrator.set_ignore_missing(true);
    migrator
}

/// The migrator's statements may run long and wait on locks (its own advisory lock included):
/// the session timeouts are lifted while it runs.
pub(crate) async fn migrate_untimed(conn: &mut PgConnection) -> Result<(), Failure> {
    for lift in ["SET statement_timeout = 0", "SET lock_timeout = 0"] {
        sqlx::query(lift).execute(&mut *conn).await?;
    }
    // `run` goes through `Acquire`, whose future is not Send for every lifetime, which a
    // spawned task needs; `run_direct` is the same migration (advisory lock included).
    migrator().run_direct(&mut *conn).await?;
    for reset in ["RESET statement_timeout", "RESET lock_timeout"] {
        sqlx::query(reset).execute(&mut *conn).await?;
    }
    Ok(())
}

fn is_missing_database(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("3D000"))
}

fn is_already_created(e: &sqlx::Error) -> bool {
    // 42P04 duplicate_database; 23505 when two servers race on pg_database's unique index.
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("42P04" | "23505")))
}

/// Whether a refused connection is the server's lack of slots (too many clients, the reserved
/// slots, a role's limit, not accepting connections now) or one database's own
/// `CONNECTION LIMIT`. PostgreSQL gives both SQLSTATE 53300; only the text tells them apart.
fn connect_failure(e: sqlx::Error, database: &str) -> Failure {
    if let sqlx::Error::Database(db) = &e {
        match db.code().as_deref() {
            Some("53300")
                if db
                    .message()
                    .starts_with("too many connections for database") =>
            {
                return Failure::DatabaseRefused {
                    database: database.to_owned(),
                };
            }
            Some("53300" | "57P03") => return Failure::Refused(Arc::new(e)),
            _ => {}
        }
    }
    Failure::Unreachable(cause(e))
}

async fn connect_once(options: &PgConnectOptions, database: &str) -> Result<PgConnection, Failure> {
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(options)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) if is_missing_database(&e) => Err(Failure::NotProvisioned {
            database: database.to_owned(),
        }),
        Ok(Err(e)) => Err(connect_failure(e, database)),
        Err(_) => Err(Failure::NoAnswer(CONNECT_TIMEOUT)),
    }
}

/// A connection to the tenant database, creating the database first when it is missing and
/// `create` allows it; tagged like every tenant session, without the session timeouts.
pub async fn connect(db: &TenantDb, create: bool) -> Result<PgConnection, Failure> {
    let tagged = db.options().clone().application_name(APPLICATION_NAME);
    open_session(db, &tagged, create).await.map(|o| o.conn)
}

/// A session, and whether its database had to be created for it.
pub(crate) struct Opened {
    pub conn: PgConnection,
    pub created: bool,
}

/// As [`connect`], with `options` (the tenant's, tagged) for the session and for the
/// maintenance session that creates the database.
pub(crate) async fn open_session(
    db: &TenantDb,
    options: &PgConnectOptions,
    create: bool,
) -> Result<Opened, Failure> {
    match connect_once(options, db.database()).await {
        Err(Failure::NotProvisioned { .. }) if create => {
            create_database(db, options).await?;
            let conn = connect_once(options, db.database()).await?;
            Ok(Opened {
                conn,
                created: true,
            })
        }
        other => other.map(|conn| Opened {
            conn,
            created: false,
        }),
    }
}

/// Quotes an identifier for SQL: the name may hold any character but NUL.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

async fn create_database(db: &TenantDb, options: &PgConnectOptions) -> Result<(), Failure> {
    let mut admin = connect_once(&options.clone().database("postgres"), "postgres").await?;
    let created = sqlx::query(&format!(
        "CREATE DATABASE {}",
        quote_identifier(db.database())
    ))
    .execute(&mut admin)
    .await;
    let _ = admin.close().await;
    match created {
        Ok(_) => {
            tracing::info!(database = db.database(), "created tenant database");
            Ok(())
        }
        Err(e) if is_already_created(&e) => Ok(()),
        Err(e) => Err(Failure::from(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_identifier("tenant_a"), "\"tenant_a\"");
        assert_eq!(quote_identifier("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn the_schema_is_embedded() {
        assert!(migrator().iter().count() >= 1);
    }
}
