//! Tenant databases themselves: the options every tenant session opens with, creating a
//! missing database (when allowed), migrating its schema and remembering which databases this
//! worker has migrated, and quoting identifiers for the SQL that names them. `pools` keeps the
//! sessions.

use crate::failure::{cause, Failure};
use crate::metrics::PoolMetrics;
use crate::tenant_db::resolve::TenantDb;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions as _, Connection, PgConnection};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Every tenant session says who it is, so operators find them in `pg_stat_activity`: the
/// sessions of a running worker are named this, a space and the worker's own id (see
/// [`worker_name`]); those of the operator commands are named this alone.
pub const APPLICATION_NAME: &str = "avsync-worker";

/// A running worker's application name: [`APPLICATION_NAME`] and a random id, so that each
/// worker tells its own sessions, and the number of workers, from the others' on a server
/// (`AVSYNC_MAX_CONNECTIONS=auto`). Well within PostgreSQL's 63 bytes.
pub fn worker_name() -> String {
    format!("{APPLICATION_NAME} {:016x}", rand::random::<u64>())
}
/// Longest one statement of a tenant session may run: an apply of a full batch takes
/// milliseconds, so this only ends statements of a database in trouble.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest a statement waits for a lock another session holds (a long migration or
/// transaction): then its tenant is marked slow and its events are set aside. Our statements
/// wait milliseconds for each other's row locks; each second waited longer is a second the
/// tenant's backlog stands in front of its partition's neighbours.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(1);

/// The options of a pooled tenant session: tagged with the worker's `name`, with the session
/// timeouts.
pub(crate) fn session_options(db: &TenantDb, name: &str) -> PgConnectOptions {
    with_session_settings(db.options().clone(), name)
}

/// `options` as every pooled tenant session of the worker called `name` opens with them (the
/// benchmark measures such a session's cost on the server).
pub fn with_session_settings(options: PgConnectOptions, name: &str) -> PgConnectOptions {
    options
        .application_name(name)
        .options([
            ("statement_timeout", millis(STATEMENT_TIMEOUT)),
            ("lock_timeout", millis(LOCK_TIMEOUT)),
        ])
        // sqlx warns of a slow statement with its whole text (some 10 kB for the batch upsert)
        // each time a locked table makes one wait; the worker's own warning that marks the
        // tenant slow says what the operator needs.
        .log_slow_statements(log::LevelFilter::Debug, LOCK_TIMEOUT)
}

/// A duration as PostgreSQL reads a setting in milliseconds.
fn millis(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// How this worker opens tenant sessions: whether it creates missing databases and migrates
/// them, and which databases it has already migrated to the current schema (so that a new
/// session of a known database skips the migration check).
pub(crate) struct Provisioning {
    create_databases: bool,
    auto_migrate: bool,
    /// The worker's application name ([`worker_name`]).
    pub(crate) name: String,
    migrated: Mutex<HashSet<String>>,
    metrics: PoolMetrics,
}

impl Provisioning {
    pub(crate) fn new(
        create_databases: bool,
        auto_migrate: bool,
        name: String,
        metrics: PoolMetrics,
    ) -> Self {
        Self {
            create_databases,
            auto_migrate,
            name,
            migrated: Mutex::new(HashSet::new()),
            metrics,
        }
    }

    /// A new session of `db` with `options`, its database created and migrated as the settings
    /// allow.
    pub(crate) async fn session(
        &self,
        db: &TenantDb,
        options: &PgConnectOptions,
    ) -> Result<PgConnection, Failure> {
        let opened = open_session(db, options, self.create_databases).await;
        let mut conn = match opened {
            // A database created now (first use, or dropped under the worker and made again)
            // has none of the schema it may have had when it was remembered.
            Ok(Opened {
                conn,
                created: true,
            }) => {
                self.forget(db);
                conn
            }
            Ok(Opened { conn, .. }) => conn,
            Err(failure) => {
                if matches!(failure, Failure::NotProvisioned { .. }) {
                    self.forget(db);
                }
                return Err(failure);
            }
        };
        self.metrics.sessions.inc();
        if self.auto_migrate {
            if self.is_migrated(db) {
                self.metrics.migrations_skipped.inc();
            } else {
                migrate_if_behind(&mut conn).await?;
                self.remember(db);
            }
        }
        Ok(conn)
    }

    /// The database lost its schema (recreated empty under the worker): its next session
    /// migrates it again.
    pub(crate) fn forget(&self, db: &TenantDb) {
        self.migrated().remove(db.key());
    }

    fn is_migrated(&self, db: &TenantDb) -> bool {
        self.migrated().contains(db.key())
    }

    fn remember(&self, db: &TenantDb) {
        self.migrated().insert(db.key().to_owned());
    }

    fn migrated(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.migrated.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The tenant schema. A worker older than a database's schema keeps working during a rolling
/// upgrade instead of refusing migrations it does not know.
pub fn migrator() -> Migrator {
    let mut migrator = sqlx::migrate!("../migrations");
    migrator.set_ignore_missing(true);
    migrator
}

/// What a worker's first session of each database does before its first statement: migrates the
/// database unless [`is_current`] finds it up to date.
pub async fn migrate_if_behind(conn: &mut PgConnection) -> Result<(), Failure> {
    if is_current(conn).await {
        return Ok(());
    }
    migrate_untimed(conn).await
}

/// Whether the database has every migration of this worker applied, as the migrator would find
/// it, read in one statement, so that the migrator, whose ten statements (timeouts lifted, the lock, the table, two reads, the
/// unlock, timeouts reset) cost the server some 2 ms of CPU on a new session, runs only when
/// there is something to do. Anything else (no
/// migrations table yet, one missing, failed or changed, the read failing) leaves the answer,
/// and the error, to the migrator.
async fn is_current(conn: &mut PgConnection) -> bool {
    let Ok(applied) = sqlx::query_as::<_, (i64, Vec<u8>, bool)>(
        "SELECT version, checksum, success FROM _sqlx_migrations",
    )
    .fetch_all(&mut *conn)
    .await
    else {
        return false;
    };
    applied.iter().all(|(_, _, success)| *success)
        && migrator()
            .iter()
            .filter(|m| !m.migration_type.is_down_migration())
            .all(|m| {
                applied
                    .iter()
                    .any(|(version, checksum, _)| *version == m.version && *checksum == *m.checksum)
            })
}

/// The migrator's statements may run long and wait on locks (its own advisory lock included):
/// the session timeouts are lifted while it runs.
async fn migrate_untimed(conn: &mut PgConnection) -> Result<(), Failure> {
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
/// slots, a role's limit) or one database's own `CONNECTION LIMIT`: PostgreSQL gives both
/// SQLSTATE 53300, only the text tells them apart. A server that is starting up or shutting
/// down (57P03) has no session to give anyone for a while: that is the server being away, as
/// when it refuses the connection outright, not a lack of slots to wait for.
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
            Some("53300") => return Failure::Refused(Arc::new(e)),
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
struct Opened {
    conn: PgConnection,
    created: bool,
}

/// As [`connect`], with `options` (the tenant's, tagged) for the session and for the
/// maintenance session that creates the database.
async fn open_session(
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
    // Another worker creating the same database holds its name until it commits, which on a
    // busy server takes longer than a tenant session's lock_timeout: that wait is the database
    // being made, not its tenant being slow, so it is not cut short (statement_timeout still
    // bounds it). Once the other commits, this one finds the database made.
    let maintenance = options
        .clone()
        .database("postgres")
        .options([("lock_timeout", "0")]);
    let mut admin = connect_once(&maintenance, "postgres").await?;
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
    fn a_worker_name_is_its_own_and_fits_postgresql() {
        let (one, two) = (worker_name(), worker_name());
        assert_ne!(one, two);
        assert!(
            one.starts_with(APPLICATION_NAME) && one.len() <= 63,
            "{one}"
        );
    }

    #[test]
    fn the_schema_is_embedded() {
        assert!(migrator().iter().count() >= 1);
    }
}
