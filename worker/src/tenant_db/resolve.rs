//! Which database a tenant's events go to: from the URL template, or from the tenant registry.
//!
//! Never another or a default database: a tenant that cannot be resolved is a failure, and a
//! database name PostgreSQL would truncate is refused.

use crate::failure::Failure;
use avsync_shared::TenantId;
use moka::future::Cache;
use moka::Expiry;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// PostgreSQL's NAMEDATALEN - 1: longer identifiers are silently cut.
pub const MAX_DATABASE_NAME_BYTES: usize = 63;

pub const PLACEHOLDER: &str = "{tenant_id}";
const FOUND_TTL: Duration = Duration::from_secs(30);
/// The longest an unknown tenant is remembered; a consuming worker remembers it for less, so
/// that a retried event always asks the registry again (see [`Resolver::unknown_for`]).
const UNKNOWN_TTL: Duration = Duration::from_secs(5);
const REGISTRY_TIMEOUT: Duration = Duration::from_secs(5);

/// A resolved tenant database. Its URL may hold a password: it is never logged or shown.
#[derive(Clone)]
pub struct TenantDb {
    url: String,
    database: String,
    options: PgConnectOptions,
}

impl std::fmt::Debug for TenantDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantDb")
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

/// The path of a URL: what follows the authority, without query or fragment.
fn url_path(url: &str) -> &str {
    let rest = url.split_once("://").map_or("", |(_, rest)| rest);
    let path = rest.split_once('/').map_or("", |(_, path)| path);
    path.split(['?', '#']).next().unwrap_or("")
}

impl TenantDb {
    pub fn from_url(url: &str) -> Result<Self, Failure> {
        let scheme_ok = url.starts_with("postgres://") || url.starts_with("postgresql://");
        if !scheme_ok {
            return Err(Failure::BadDatabaseUrl(
                "not a postgres:// or postgresql:// URL".to_owned(),
            ));
        }
        // Without a database in the URL the driver would pick a default one (PGDATABASE or the
        // user's name); a tenant must name its own.
        if url_path(url).is_empty() {
            return Err(Failure::BadDatabaseUrl("it names no database".to_owned()));
        }
        let options = PgConnectOptions::from_str(url)
            .map_err(|_| Failure::BadDatabaseUrl("it does not parse".to_owned()))?;
        let database = options.get_database().unwrap_or_default().to_owned();
        if database.is_empty() {
            return Err(Failure::BadDatabaseUrl("it names no database".to_owned()));
        }
        Self::named(url.to_owned(), database, options)
    }

    /// A database named `database` with `options`, refused (never cut) when the name is too
    /// long for PostgreSQL.
    fn named(url: String, database: String, options: PgConnectOptions) -> Result<Self, Failure> {
        if database.len() > MAX_DATABASE_NAME_BYTES {
            return Err(Failure::DatabaseNameTooLong {
                len: database.len(),
                database,
            });
        }
        let options = options.database(&database);
        Ok(Self {
            url,
            database,
            options,
        })
    }

    /// What pools are keyed by: tenants that share a database share its pool.
    pub fn key(&self) -> &str {
        &self.url
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    pub fn options(&self) -> &PgConnectOptions {
        &self.options
    }
}

/// `url` as a usable PostgreSQL URL naming a database, or why not, said for the setting that
/// holds it (the failure's own text is for dead letters). The reason never repeats the URL.
pub fn setting_url(url: &str) -> Result<TenantDb, String> {
    match TenantDb::from_url(url) {
        Ok(db) => Ok(db),
        Err(Failure::BadDatabaseUrl(reason)) => Err(format!(
            "is not a usable PostgreSQL URL: {reason} (not shown: it may hold a password)"
        )),
        Err(Failure::DatabaseNameTooLong { len, .. }) => Err(format!(
            "names a database of {len} bytes, over PostgreSQL's {MAX_DATABASE_NAME_BYTES}-byte limit"
        )),
        Err(other) => Err(other.to_string()),
    }
}

/// What `{tenant_id}` is replaced by to find where in the template it stands.
const MARKER: &str = "AVSYNCxTENANTxMARKER";

/// `AVSYNC_TENANT_DATABASE_URL`, parsed once: resolving a tenant then costs no URL parse where
/// the placeholder stands only in the database name, as it does in the default.
#[derive(Clone, Debug)]
pub struct Template {
    text: String,
    form: Form,
}

#[derive(Clone)]
enum Form {
    /// No placeholder: every tenant shares this database.
    Shared(TenantDb),
    /// The placeholder once, in the database name only: a tenant's options are these with its
    /// own database name.
    InDatabaseName {
        options: PgConnectOptions,
        prefix: String,
        suffix: String,
    },
    /// The placeholder elsewhere (user, host, query): each tenant's URL is parsed on its own.
    Elsewhere,
}

impl std::fmt::Debug for Form {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Form::Shared(_) => "Shared",
            Form::InDatabaseName { .. } => "InDatabaseName",
            Form::Elsewhere => "Elsewhere",
        })
    }
}

impl Template {
    /// Whether the template gives a usable URL for a tenant (said for the setting, as
    /// [`setting_url`] says it). Lengths are checked per tenant.
    pub fn parse(text: &str) -> Result<Self, String> {
        let example = setting_url(&text.replace(PLACEHOLDER, "x"))?;
        let form = if !text.contains(PLACEHOLDER) {
            Form::Shared(example)
        } else {
            let marked = PgConnectOptions::from_str(&text.replace(PLACEHOLDER, MARKER)).ok();
            let parts = marked.as_ref().and_then(|options| {
                let (prefix, suffix) = options.get_database()?.split_once(MARKER)?;
                Some((prefix.to_owned(), suffix.to_owned()))
            });
            match (marked, parts) {
                (Some(options), Some((prefix, suffix)))
                    if text.matches(PLACEHOLDER).count() == 1 =>
                {
                    Form::InDatabaseName {
                        options,
                        prefix,
                        suffix,
                    }
                }
                _ => Form::Elsewhere,
            }
        };
        Ok(Self {
            text: text.to_owned(),
            form,
        })
    }

    pub fn url(&self, tenant: &TenantId) -> String {
        self.text.replace(PLACEHOLDER, tenant.as_str())
    }

    /// The tenant's database, refused (never cut) when its name is too long for PostgreSQL.
    pub fn database(&self, tenant: &TenantId) -> Result<TenantDb, Failure> {
        match &self.form {
            Form::Shared(db) => Ok(db.clone()),
            Form::InDatabaseName {
                options,
                prefix,
                suffix,
            } => {
                let database = format!("{prefix}{}{suffix}", tenant.as_str());
                TenantDb::named(self.url(tenant), database, options.clone())
            }
            Form::Elsewhere => TenantDb::from_url(&self.url(tenant)),
        }
    }

    /// The database every tenant shares, when the template has no placeholder.
    pub fn shared(&self) -> Option<&TenantDb> {
        match &self.form {
            Form::Shared(db) => Some(db),
            _ => None,
        }
    }

    /// What a tenant's database name is made of, around its id, with the server's options,
    /// when the placeholder stands once and only in the database name.
    pub fn database_name_parts(&self) -> Option<(&str, &str, &PgConnectOptions)> {
        match &self.form {
            Form::InDatabaseName {
                options,
                prefix,
                suffix,
            } => Some((prefix, suffix, options)),
            _ => None,
        }
    }
}

/// Where tenants' databases come from: the URL template, or the registry database.
#[derive(Clone, Debug)]
pub enum TenantSource {
    Template(Template),
    Registry(TenantDb),
}

/// What the registry said about a tenant, cached briefly.
#[derive(Clone, Debug)]
enum Lookup {
    Found { url: String, enabled: bool },
    Unknown,
}

struct LookupExpiry {
    unknown: Duration,
}

impl Expiry<TenantId, Lookup> for LookupExpiry {
    fn expire_after_create(&self, _: &TenantId, value: &Lookup, _: Instant) -> Option<Duration> {
        Some(match value {
            Lookup::Found { .. } => FOUND_TTL,
            Lookup::Unknown => self.unknown,
        })
    }
}

fn lookup_cache(unknown: Duration) -> Cache<TenantId, Lookup> {
    Cache::builder()
        .max_capacity(100_000)
        .expire_after(LookupExpiry { unknown })
        .build()
}

enum Mode {
    Template(Box<Template>),
    Registry {
        pool: PgPool,
        cache: Cache<TenantId, Lookup>,
    },
}

/// A registry entry, as `migrate --all` walks them.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RegistryEntry {
    pub tenant_id: String,
    pub database_url: String,
    pub enabled: bool,
}

pub struct Resolver {
    mode: Mode,
}

impl Resolver {
    /// Template mode, or registry mode. Connects to nothing yet.
    pub fn new(source: &TenantSource) -> Self {
        let mode = match source {
            TenantSource::Template(template) => Mode::Template(Box::new(template.clone())),
            TenantSource::Registry(db) => {
                let pool = PgPoolOptions::new()
                    .max_connections(2)
                    .acquire_timeout(REGISTRY_TIMEOUT)
                    .connect_lazy_with(db.options().clone());
                Mode::Registry {
                    pool,
                    cache: lookup_cache(UNKNOWN_TTL),
                }
            }
        };
        Self { mode }
    }

    /// Remembers an unknown tenant for at most `soonest_retry / 2`, where `soonest_retry` is the
    /// soonest a retried event comes back: a tenant added to the registry meanwhile is found by
    /// the event's next retry instead of being taken for unknown again and sent down the ladder.
    pub fn unknown_for(mut self, soonest_retry: Duration) -> Self {
        if let Mode::Registry { cache, .. } = &mut self.mode {
            *cache = lookup_cache(UNKNOWN_TTL.min(soonest_retry / 2));
        }
        self
    }

    pub async fn resolve(&self, tenant: &TenantId) -> Result<TenantDb, Failure> {
        match &self.mode {
            Mode::Template(template) => template.database(tenant),
            Mode::Registry { pool, cache } => {
                let lookup = cache
                    .try_get_with(tenant.clone(), look_up(pool, tenant))
                    .await
                    .map_err(|e| Failure::Registry((*e).clone()))?;
                match lookup {
                    Lookup::Unknown => Err(Failure::TenantUnknown),
                    Lookup::Found { enabled: false, .. } => Err(Failure::TenantDisabled),
                    Lookup::Found { url, .. } => TenantDb::from_url(&url),
                }
            }
        }
    }

    /// The registry's pool, in registry mode: whether it answers tells a whole outage from one
    /// tenant server's.
    pub fn registry(&self) -> Option<&PgPool> {
        match &self.mode {
            Mode::Template(_) => None,
            Mode::Registry { pool, .. } => Some(pool),
        }
    }

    /// The template, in template mode.
    pub fn template(&self) -> Option<&Template> {
        match &self.mode {
            Mode::Template(template) => Some(template),
            Mode::Registry { .. } => None,
        }
    }

    /// Every registry entry, or None in template mode (which has no list of tenants).
    pub async fn registry_entries(&self) -> Result<Option<Vec<RegistryEntry>>, Failure> {
        match &self.mode {
            Mode::Template(_) => Ok(None),
            Mode::Registry { pool, .. } => sqlx::query_as(
                "SELECT tenant_id, database_url, enabled FROM avsync_tenants ORDER BY tenant_id",
            )
            .fetch_all(pool)
            .await
            .map(Some)
            .map_err(|e| Failure::Registry(Arc::new(e))),
        }
    }

    pub async fn close(&self) {
        if let Mode::Registry { pool, .. } = &self.mode {
            pool.close().await;
        }
    }
}

async fn look_up(pool: &PgPool, tenant: &TenantId) -> Result<Lookup, Arc<sqlx::Error>> {
    let row: Option<(String, bool)> =
        sqlx::query_as("SELECT database_url, enabled FROM avsync_tenants WHERE tenant_id = $1")
            .bind(tenant.as_str())
            .fetch_optional(pool)
            .await
            .map_err(Arc::new)?;
    Ok(match row {
        Some((url, enabled)) => Lookup::Found { url, enabled },
        None => Lookup::Unknown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failure::FailureClass;

    fn tenant(s: &str) -> TenantId {
        TenantId::parse(s).unwrap()
    }

    fn template(text: &str) -> Template {
        Template::parse(text).unwrap()
    }

    #[test]
    fn template_keeps_the_tenant_id_as_is() {
        let db = template(crate::settings::DEFAULT_TENANT_DATABASE_URL)
            .database(&tenant("AcMe_1"))
            .unwrap();
        assert_eq!(db.database(), "tenant_AcMe_1");
        assert_eq!(db.key(), "postgres://postgres@127.0.0.1:5432/tenant_AcMe_1");
    }

    #[test]
    fn long_names_are_refused_never_cut() {
        let template = template(crate::settings::DEFAULT_TENANT_DATABASE_URL);
        let ok = "a".repeat(MAX_DATABASE_NAME_BYTES - "tenant_".len());
        assert!(template.database(&tenant(&ok)).is_ok());
        let long = format!("{ok}b");
        let err = template.database(&tenant(&long)).unwrap_err();
        assert!(matches!(err, Failure::DatabaseNameTooLong { len: 64, .. }));
        assert_eq!(err.class(), FailureClass::Permanent);
    }

    #[test]
    fn a_parsed_template_gives_what_parsing_each_url_gives() {
        for text in [
            crate::settings::DEFAULT_TENANT_DATABASE_URL,
            "postgres://u:p@h:5433/pre_{tenant_id}_post?sslmode=disable",
            "postgres://{tenant_id}@h:5432/db_{tenant_id}",
            "postgres://{tenant_id}@h:5432/db",
        ] {
            let parsed = template(text);
            let id = tenant("Acme-1");
            let once = parsed.database(&id).unwrap();
            let each = TenantDb::from_url(&text.replace(PLACEHOLDER, "Acme-1")).unwrap();
            assert_eq!(once.key(), each.key(), "{text}");
            assert_eq!(once.database(), each.database(), "{text}");
            assert_eq!(
                format!("{:?}", once.options()),
                format!("{:?}", each.options()),
                "{text}"
            );
        }
    }

    #[test]
    fn urls_without_a_database_are_refused() {
        for url in [
            "postgres://postgres@127.0.0.1:5432",
            "postgres://postgres@127.0.0.1:5432/",
            "postgres://postgres@127.0.0.1:5432/?sslmode=disable",
            "mysql://h/db",
            "tenant_x",
        ] {
            let err = TenantDb::from_url(url).unwrap_err();
            assert_eq!(err.class(), FailureClass::Permanent, "{url}");
        }
    }

    #[test]
    fn errors_never_repeat_the_url() {
        let err = setting_url("postgres://user:s3cret@h:5432/").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
        let db = TenantDb::from_url("postgres://user:s3cret@h:5432/db").unwrap();
        assert!(!format!("{db:?}").contains("s3cret"));
    }

    #[test]
    fn a_template_without_placeholder_is_one_database() {
        let template = template("postgres://postgres@127.0.0.1:5432/shared");
        let a = template.database(&tenant("a")).unwrap();
        let b = template.database(&tenant("b")).unwrap();
        assert_eq!(a.key(), b.key());
    }
}
