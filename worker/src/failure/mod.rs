//! Every way applying an event can fail, as a type, and what each is: whether trying again can
//! help (`Transient`) or not (`Permanent`), and which facts about it the decision
//! ([`decide`]) reads. Texts say what the operator can do and never hold a database URL or
//! other secret.

pub(crate) mod decide;

use avsync_shared::event::EventError;
use avsync_shared::EnvelopeError;
use std::sync::Arc;
use std::time::Duration;

/// What the driver or the pool reported, kept whole (chain and SQLSTATE) for the log and the
/// retry logic; shared, because one failure answers every message of a batch.
pub type Cause = Arc<dyn std::error::Error + Send + Sync>;

/// `e` as a [`Cause`].
pub fn cause(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Cause {
    Arc::from(e.into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    Transient,
    Permanent,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Failure {
    #[error("undecodable payload: {0}")]
    Envelope(#[from] EnvelopeError),

    #[error("{0}")]
    Event(#[from] EventError),

    #[error("database name {database:?} is {len} bytes, over PostgreSQL's 63-byte limit (it would be cut and could be shared with another tenant); use a shorter AVSYNC_TENANT_DATABASE_URL or map the tenant in the registry, then replay")]
    DatabaseNameTooLong { database: String, len: usize },

    #[error("the tenant database URL is unusable: {0}; fix AVSYNC_TENANT_DATABASE_URL or the tenant's registry entry, then replay")]
    BadDatabaseUrl(String),

    #[error("tenant is disabled in the tenant registry; enable it in avsync_tenants, then replay its dead letters")]
    TenantDisabled,

    #[error("tenant is not in the tenant registry (yet); add it to avsync_tenants")]
    TenantUnknown,

    #[error("tenant registry unreachable: {0}")]
    Registry(#[source] Arc<sqlx::Error>),

    #[error("tenant database {database:?} does not exist (not yet provisioned); create and migrate it, or set AVSYNC_CREATE_TENANT_DATABASES=true")]
    NotProvisioned { database: String },

    #[error("tenant database unreachable: {0}")]
    Unreachable(#[source] Cause),

    #[error("the PostgreSQL server refused a connection for lack of slots ({reply}); the work waits and this worker holds fewer connections there for a while; with a pinned AVSYNC_MAX_CONNECTIONS, keep workers × it below the server's max_connections (auto sizes it from the server)", reply = server_reply(.0))]
    Refused(#[source] Arc<sqlx::Error>),

    #[error("tenant database {database:?} refused a connection: its own CONNECTION LIMIT is reached; its events are set aside until it accepts one (raise the limit with ALTER DATABASE … CONNECTION LIMIT)")]
    DatabaseRefused { database: String },

    #[error("tenant database did not answer within {0:?}")]
    NoAnswer(Duration),

    #[error("no connection to the tenant database within {0:?}: its pool (AVSYNC_TENANT_POOL_SIZE) stayed busy")]
    PoolTimeout(Duration),

    #[error("tenant database migration failed: {reason}", reason = migration_reason(.0))]
    Migration(#[source] Arc<sqlx::migrate::MigrateError>),

    #[error("tenant database migration needs an operator: {0}; repair the database's _sqlx_migrations, then replay")]
    MigrationConflict(#[source] Arc<sqlx::migrate::MigrateError>),

    #[error("tenant database error: {0}")]
    Database(#[source] Arc<sqlx::Error>),
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        Failure::Database(Arc::new(e))
    }
}

impl Failure {
    pub fn class(&self) -> FailureClass {
        match self {
            Failure::Envelope(_)
            | Failure::Event(_)
            | Failure::DatabaseNameTooLong { .. }
            | Failure::BadDatabaseUrl(_)
            | Failure::TenantDisabled
            | Failure::MigrationConflict(_) => FailureClass::Permanent,
            Failure::TenantUnknown
            | Failure::Registry(_)
            | Failure::NotProvisioned { .. }
            | Failure::Unreachable(_)
            | Failure::Refused(_)
            | Failure::DatabaseRefused { .. }
            | Failure::NoAnswer(_)
            | Failure::PoolTimeout(_)
            | Failure::Migration(_) => FailureClass::Transient,
            Failure::Database(e) => database_class(e),
        }
    }
}

impl Failure {
    /// A statement found no tenant table (SQLSTATE 42P01 `undefined_table`): the database lost
    /// its schema, so migrating it again helps where retrying would not.
    pub fn is_schema_missing(&self) -> bool {
        matches!(self, Failure::Database(e) if matches!(&**e, sqlx::Error::Database(db) if db.code().as_deref() == Some("42P01")))
    }
}

impl Failure {
    /// The database server itself could not be reached or talked to, as opposed to a tenant
    /// that is not provisioned, not registered or busy: only such a failure can be an outage.
    pub fn is_connection_level(&self) -> bool {
        match self {
            Failure::Unreachable(_) | Failure::Registry(_) | Failure::NoAnswer(_) => true,
            Failure::Database(e) => match e.as_ref() {
                // 08: connection exception; 57P0x: the server is shutting down or starting up.
                sqlx::Error::Database(db) => db
                    .code()
                    .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                _ => false,
            },
            _ => false,
        }
    }

    /// The server refused a connection for lack of slots: backpressure, never an attempt.
    pub fn is_server_refusal(&self) -> bool {
        matches!(self, Failure::Refused(_))
    }

    /// The tenant's database is in trouble of its own (its statements time out, it does not
    /// answer, or it refuses this worker): the tenant is marked slow and its events set aside.
    pub fn marks_slow(&self) -> bool {
        match self {
            Failure::DatabaseRefused { .. } | Failure::NoAnswer(_) => true,
            // 57014 query_canceled (statement_timeout), 55P03 lock_not_available (lock_timeout).
            Failure::Database(e) => matches!(
                e.as_ref(),
                sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("57014" | "55P03"))
            ),
            _ => false,
        }
    }
}

/// A statement failed. Values the database can never store (SQLSTATE class 22, data exception,
/// and 23, integrity violation) are permanent; everything else (connection loss, 40001
/// serialization failure, 40P01 deadlock, shutdown, a table not migrated yet, resource limits)
/// may pass, and retrying loses nothing.
fn database_class(e: &sqlx::Error) -> FailureClass {
    match e {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) if code.starts_with("22") || code.starts_with("23") => {
                FailureClass::Permanent
            }
            _ => FailureClass::Transient,
        },
        _ => FailureClass::Transient,
    }
}

impl From<sqlx::migrate::MigrateError> for Failure {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        use sqlx::migrate::MigrateError;
        match e {
            MigrateError::VersionMismatch(_) | MigrateError::Dirty(_) => {
                Failure::MigrationConflict(Arc::new(e))
            }
            other => Failure::Migration(Arc::new(other)),
        }
    }
}

/// The server's own words for a refusal, without the driver's preamble.
fn server_reply(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db.message().to_owned(),
        other => other.to_string(),
    }
}

/// What failed in a migration: for a failed statement, the database's error itself.
fn migration_reason(e: &sqlx::migrate::MigrateError) -> String {
    match e {
        sqlx::migrate::MigrateError::Execute(inner) => inner.to_string(),
        other => other.to_string(),
    }
}

/// Failures as the driver reports them, for the tests of what they mean.
#[cfg(test)]
pub(crate) mod fake {
    use super::Failure;
    use sqlx::error::{DatabaseError, ErrorKind};
    use std::borrow::Cow;
    use std::fmt;
    use std::sync::Arc;

    #[derive(Debug)]
    struct FakeDbError(&'static str);

    impl fmt::Display for FakeDbError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "sqlstate {}", self.0)
        }
    }

    impl std::error::Error for FakeDbError {}

    impl DatabaseError for FakeDbError {
        fn message(&self) -> &str {
            "fake"
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> ErrorKind {
            ErrorKind::Other
        }
    }

    /// A statement that failed with SQLSTATE `code`.
    pub fn sqlstate(code: &'static str) -> Failure {
        Failure::from(sqlx::Error::Database(Box::new(FakeDbError(code))))
    }

    /// A connection the server refused for lack of slots.
    pub fn too_many_clients() -> Failure {
        Failure::Refused(Arc::new(sqlx::Error::Database(Box::new(FakeDbError(
            "53300",
        )))))
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{sqlstate, too_many_clients};
    use super::*;
    use avsync_shared::event::InvalidTimestamp;

    fn refused_io() -> Arc<sqlx::Error> {
        Arc::new(sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )))
    }

    #[test]
    fn permanent_failures() {
        for f in [
            Failure::Envelope(EnvelopeError::NotObject),
            Failure::Event(EventError::InvalidTimestamp(InvalidTimestamp("x".into()))),
            Failure::Event(EventError::MissingSub("member.joined".into())),
            Failure::Event(EventError::NulCharacter("email")),
            Failure::DatabaseNameTooLong {
                database: "x".repeat(71),
                len: 71,
            },
            Failure::BadDatabaseUrl("no database name".into()),
            Failure::TenantDisabled,
            Failure::from(sqlx::migrate::MigrateError::Dirty(3)),
            sqlstate("22021"),
            sqlstate("23514"),
        ] {
            assert_eq!(f.class(), FailureClass::Permanent, "{f}");
        }
    }

    #[test]
    fn transient_failures() {
        for f in [
            Failure::TenantUnknown,
            Failure::Registry(refused_io()),
            Failure::NotProvisioned {
                database: "tenant_a".into(),
            },
            Failure::Unreachable(refused_io()),
            Failure::PoolTimeout(Duration::from_secs(10)),
            Failure::from(sqlx::migrate::MigrateError::Execute(sqlx::Error::Io(
                std::io::Error::from(std::io::ErrorKind::ConnectionReset),
            ))),
            Failure::from(sqlx::Error::PoolTimedOut),
            Failure::from(sqlx::Error::Io(std::io::Error::from(
                std::io::ErrorKind::ConnectionReset,
            ))),
            sqlstate("40001"),
            sqlstate("40P01"),
            sqlstate("57P01"),
            sqlstate("42P01"),
            sqlstate("08006"),
            too_many_clients(),
            Failure::DatabaseRefused {
                database: "tenant_a".into(),
            },
            Failure::NoAnswer(Duration::from_secs(10)),
        ] {
            assert_eq!(f.class(), FailureClass::Transient, "{f}");
        }
    }

    #[test]
    fn timeouts_and_a_database_of_its_own_refusing_mark_a_tenant_slow() {
        for f in [
            sqlstate("57014"),
            sqlstate("55P03"),
            Failure::NoAnswer(Duration::from_secs(10)),
            Failure::DatabaseRefused {
                database: "tenant_a".into(),
            },
        ] {
            assert!(f.marks_slow(), "{f}");
            assert!(!f.is_server_refusal(), "{f}");
        }
        for f in [
            sqlstate("40001"),
            Failure::Unreachable(refused_io()),
            Failure::NotProvisioned {
                database: "tenant_a".into(),
            },
        ] {
            assert!(!f.marks_slow(), "{f}");
        }
        assert!(too_many_clients().is_server_refusal());
    }

    #[test]
    fn only_connection_level_failures_can_be_an_outage() {
        assert!(Failure::Database(refused_io()).is_connection_level());
        assert!(Failure::Unreachable(cause("refused")).is_connection_level());
        assert!(!Failure::TenantUnknown.is_connection_level());
        assert!(!too_many_clients().is_connection_level());
        assert!(!Failure::NotProvisioned {
            database: "tenant_a".into()
        }
        .is_connection_level());
    }

    #[test]
    fn texts_tell_the_operator_what_to_do() {
        let f = Failure::NotProvisioned {
            database: "tenant_a".into(),
        };
        assert!(f.to_string().contains("AVSYNC_CREATE_TENANT_DATABASES"));
        assert!(Failure::TenantDisabled.to_string().contains("enable it"));
    }
}
