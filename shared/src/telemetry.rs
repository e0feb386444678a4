//! Logging: `tracing` events to stderr, as text or JSON, filtered by `RUST_LOG` (default
//! [`DEFAULT_FILTER`]).

use tracing_subscriber::EnvFilter;

/// Our own events from `info` up, without two libraries' inner workings. lapin logs every
/// channel or connection close at ERROR, also the expected ones (the partition probe's
/// `NOT_FOUND`, each refused login three times over), and each failure it reports there also
/// reaches our code, which says what it means in our words. sqlx logs PostgreSQL's NOTICEs at
/// INFO, such as the migrator's "relation _sqlx_migrations already exists, skipping" on every
/// new pool; warnings from PostgreSQL still show. `RUST_LOG` replaces all of it (for instance
/// `RUST_LOG=info,lapin=debug` to see the broker client).
pub const DEFAULT_FILTER: &str = "info,lapin=off,sqlx::postgres::notice=warn";

pub fn init(format: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests start several services in one process) keeps the first subscriber.
    let _ = if format == "json" {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
