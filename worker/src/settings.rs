//! Every worker setting: a flag with an environment fallback; `--help` lists them with defaults.

use avsync_shared::config::{parse_duration, BadSetting, CommonArgs};
use avsync_shared::topology::BROKER_DELIVERY_LIMIT;
use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args};
use std::time::Duration;

pub const DEFAULT_TENANT_DATABASE_URL: &str =
    "postgres://postgres@127.0.0.1:5432/tenant_{tenant_id}";

#[derive(Args, Debug, Clone)]
pub struct Settings {
    #[command(flatten)]
    pub common: CommonArgs,

    /// When set, events of other AuthVital applications (or of none) are acknowledged and
    /// counted `ignored`.
    #[arg(long, env = "AVSYNC_APPLICATION_ID", value_name = "ID")]
    pub application_id: Option<String>,

    /// Tenant database URL template; `{tenant_id}` is replaced by the tenant id as is. Without
    /// `{tenant_id}`, every tenant shares one database.
    #[arg(long, env = "AVSYNC_TENANT_DATABASE_URL", value_name = "URL", default_value = DEFAULT_TENANT_DATABASE_URL, hide_env_values = true)]
    pub tenant_database_url: String,

    /// When set, tenants are looked up in table `avsync_tenants` of this database instead of
    /// the template.
    #[arg(
        long,
        env = "AVSYNC_TENANT_REGISTRY_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub tenant_registry_url: Option<String>,

    /// Apply pending migrations to a tenant database the first time this worker opens it.
    #[arg(long, env = "AVSYNC_AUTO_MIGRATE", value_name = "BOOL", default_value_t = true, action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub auto_migrate: bool,

    /// Create a missing tenant database instead of waiting for it to be provisioned.
    #[arg(long, env = "AVSYNC_CREATE_TENANT_DATABASES", value_name = "BOOL", default_value_t = false, action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub create_tenant_databases: bool,

    /// Most tenant pools this worker keeps open; the least recently used idle one is closed first.
    #[arg(long, env = "AVSYNC_TENANT_POOL_CAPACITY", value_name = "N", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub tenant_pool_capacity: u32,

    /// Most connections in one tenant's pool.
    #[arg(long, env = "AVSYNC_TENANT_POOL_SIZE", value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub tenant_pool_size: u32,

    /// Most sessions this worker holds to any one PostgreSQL server, across all its tenant
    /// databases; when full, an idle session of the least recently used tenant is closed.
    #[arg(long, env = "AVSYNC_MAX_CONNECTIONS", value_name = "N", default_value_t = crate::pools::DEFAULT_MAX_CONNECTIONS, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_connections: u32,

    /// Most unsettled messages a tenant that commits nothing holds in this worker (at most half
    /// a partition's prefetch); what it receives beyond that is set aside through a delay tier.
    #[arg(long, env = "AVSYNC_TENANT_MAX_UNSETTLED", value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub tenant_max_unsettled: u32,

    /// Wait before each retry of a transient failure (comma-separated durations); after the
    /// last, the message is dead-lettered.
    #[arg(long, env = "AVSYNC_RETRY_DELAYS", value_name = "DURATIONS", default_value = "1s,5s,30s,2m,10m,1h", value_parser = parse_retry_delays)]
    pub retry_delays: RetryDelays,

    /// A message delivered this many times without being settled is dead-lettered as `poison`.
    #[arg(long, env = "AVSYNC_POISON_DELIVERIES", value_name = "N", default_value_t = 10, value_parser = clap::value_parser!(u32).range(5..BROKER_DELIVERY_LIMIT))]
    pub poison_deliveries: u32,

    /// Unacknowledged messages this worker holds, split evenly over the partition queues (at
    /// least one each); also the number of messages applied at once.
    #[arg(long, env = "AVSYNC_PREFETCH", value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u16).range(1..=10_000))]
    pub prefetch: u16,
}

/// The retry ladder: at least one delay, each above zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryDelays(Vec<Duration>);

impl RetryDelays {
    pub fn delays(&self) -> &[Duration] {
        &self.0
    }
}

fn parse_retry_delays(value: &str) -> Result<RetryDelays, String> {
    let delays = value
        .split(',')
        .map(|part| parse_duration(part.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    if delays.is_empty() || delays.iter().any(Duration::is_zero) {
        return Err("give at least one delay, each above zero (e.g. `1s,5s,30s`)".to_owned());
    }
    Ok(RetryDelays(delays))
}

impl Settings {
    /// Checks what clap cannot: the topology and the tenant database template.
    pub fn validate(&self) -> Result<(), BadSetting> {
        self.common.check()?;
        crate::tenants::check_template(&self.tenant_database_url)
            .map_err(|reason| BadSetting::new("AVSYNC_TENANT_DATABASE_URL", reason))?;
        if let Some(url) = &self.tenant_registry_url {
            crate::tenants::check_url(url)
                .map_err(|reason| BadSetting::new("AVSYNC_TENANT_REGISTRY_URL", reason))?;
        }
        if self.application_id.as_deref() == Some("") {
            return Err(BadSetting::new(
                "AVSYNC_APPLICATION_ID",
                "is empty; unset it to accept every application",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings,
    }

    fn parse(args: &[&str]) -> Result<Settings, clap::Error> {
        Cli::try_parse_from(std::iter::once("avsync-worker").chain(args.iter().copied()))
            .map(|c| c.settings)
    }

    #[test]
    fn defaults_follow_the_contract() {
        let s = parse(&[]).unwrap();
        assert_eq!(s.tenant_database_url, DEFAULT_TENANT_DATABASE_URL);
        assert!(s.auto_migrate);
        assert!(!s.create_tenant_databases);
        assert_eq!(s.tenant_pool_capacity, 256);
        assert_eq!(s.tenant_pool_size, 4);
        assert_eq!(s.poison_deliveries, 10);
        assert_eq!(
            s.retry_delays.delays(),
            [1, 5, 30, 120, 600, 3600].map(Duration::from_secs)
        );
        s.validate().unwrap();
    }

    #[test]
    fn bad_values_are_refused() {
        for args in [
            &["--poison-deliveries", "4"][..],
            &["--poison-deliveries", "50"],
            &["--retry-delays", ""],
            &["--retry-delays", "1s,0s"],
            &["--retry-delays", "1s,5"],
            &["--auto-migrate", "maybe"],
            &["--tenant-pool-capacity", "0"],
            &["--prefetch", "0"],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
        assert!(!parse(&["--auto-migrate", "false"]).unwrap().auto_migrate);
    }

    #[test]
    fn validate_names_the_setting() {
        let s = parse(&["--tenant-database-url", "mysql://x/{tenant_id}"]).unwrap();
        assert_eq!(s.validate().unwrap_err().name, "AVSYNC_TENANT_DATABASE_URL");
        let s = parse(&["--tenant-database-url", "postgres://h:5432/"]).unwrap();
        assert_eq!(s.validate().unwrap_err().name, "AVSYNC_TENANT_DATABASE_URL");
        let s = parse(&["--tenant-registry-url", "nope"]).unwrap();
        assert_eq!(s.validate().unwrap_err().name, "AVSYNC_TENANT_REGISTRY_URL");
        let s = parse(&["--partitions", "0"]).unwrap();
        assert_eq!(s.validate().unwrap_err().name, "AVSYNC_PARTITIONS");
    }
}
