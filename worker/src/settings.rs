//! Every worker setting: a flag with an environment fallback; `--help` lists them with defaults.

use crate::ops::authvital::{ApiSettings, ClientSecret};
use crate::retry::RetryPolicy;
use crate::tenant_db::pools::PoolSettings;
use crate::tenant_db::resolve::{setting_url, Template, TenantSource};
use crate::tenant_db::sizing::MaxConnections;
use avsync_shared::config::{number_from_to, parse_bytes, parse_duration, BadSetting, CommonArgs};
use avsync_shared::topology::{Topology, BROKER_DELIVERY_LIMIT};
use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args};
use std::time::Duration;

/// The most deliveries `AVSYNC_POISON_DELIVERIES` may allow: one fewer than the broker's own
/// limit, so that the worker, not the broker, sees a poison message first.
const POISON_DELIVERIES_MAX: u32 = BROKER_DELIVERY_LIMIT as u32 - 1;

/// A window this size holds about 65 events of each of 1,000 busy tenants, so one session opened
/// for a tenant applies that many together.
pub const DEFAULT_PREFETCH: u32 = 65_536;

pub const DEFAULT_TENANT_DATABASE_URL: &str =
    "postgres://postgres@127.0.0.1:5432/tenant_{tenant_id}";

#[derive(Args, Debug, Clone)]
pub struct Settings {
    #[command(flatten)]
    pub common: CommonArgs,

    /// When set, events of other AuthVital applications (or of none) are acknowledged and
    /// counted `ignored`.
    #[arg(long, global = true, env = "AVSYNC_APPLICATION_ID", value_name = "ID")]
    pub application_id: Option<String>,

    /// Tenant database URL template; `{tenant_id}` is replaced by the tenant id as is. Without
    /// `{tenant_id}`, every tenant shares one database.
    #[arg(long, global = true, env = "AVSYNC_TENANT_DATABASE_URL", value_name = "URL", default_value = DEFAULT_TENANT_DATABASE_URL, hide_env_values = true)]
    pub tenant_database_url: String,

    /// When set, tenants are looked up in table `avsync_tenants` of this database instead of
    /// the template.
    #[arg(
        long,
        global = true,
        env = "AVSYNC_TENANT_REGISTRY_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub tenant_registry_url: Option<String>,

    /// Apply pending migrations to a tenant database the first time this worker opens it.
    #[arg(long, global = true, env = "AVSYNC_AUTO_MIGRATE", value_name = "BOOL", default_value_t = true, action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub auto_migrate: bool,

    /// Create a missing tenant database instead of waiting for it to be provisioned.
    #[arg(long, global = true, env = "AVSYNC_CREATE_TENANT_DATABASES", value_name = "BOOL", default_value_t = false, action = ArgAction::Set, value_parser = BoolishValueParser::new())]
    pub create_tenant_databases: bool,

    /// Most tenant pools this worker keeps open; the least recently used idle one is closed first.
    #[arg(long, global = true, env = "AVSYNC_TENANT_POOL_CAPACITY", value_name = "N", default_value_t = 256, value_parser = number_from_to(1u32, 100_000))]
    pub tenant_pool_capacity: u32,

    /// Most connections in one tenant's pool.
    #[arg(long, global = true, env = "AVSYNC_TENANT_POOL_SIZE", value_name = "N", default_value_t = 4, value_parser = number_from_to(1u32, 1_000))]
    pub tenant_pool_size: u32,

    /// Most sessions this worker holds to any one PostgreSQL server, across all its tenant
    /// databases: `auto` sizes it from what the server allows and has free, leaving
    /// AVSYNC_PG_FREE_CONNECTIONS to other clients; a number pins it. When full, an idle session
    /// of the least recently used tenant is closed.
    #[arg(long, env = "AVSYNC_MAX_CONNECTIONS", value_name = "auto|N", default_value = "auto", value_parser = clap::builder::ValueParser::new(str::parse::<MaxConnections>))]
    pub max_connections: MaxConnections,

    /// With AVSYNC_MAX_CONNECTIONS=auto: connection slots on each PostgreSQL server that avsync's
    /// workers, all together, leave free for other clients (the tenants' own applications,
    /// admins); by default a fifth of the server's max_connections.
    #[arg(long, env = "AVSYNC_PG_FREE_CONNECTIONS", value_name = "N", value_parser = number_from_to(0u32, 1_000_000))]
    pub pg_free_connections: Option<u32>,

    /// Most unsettled messages a tenant that commits nothing holds in this worker (at most half
    /// a partition's prefetch); what it receives beyond that is set aside through a delay tier.
    #[arg(long, env = "AVSYNC_TENANT_MAX_UNSETTLED", value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub tenant_max_unsettled: u32,

    /// Wait before each retry of a transient failure (comma-separated durations); after the
    /// last, the message is dead-lettered.
    #[arg(long, global = true, env = "AVSYNC_RETRY_DELAYS", value_name = "DURATIONS", default_value = "1s,5s,30s,2m,10m,1h", value_parser = parse_retry_delays)]
    pub retry_delays: RetryDelays,

    /// A message delivered this many times without being settled is dead-lettered as `poison`:
    /// 5 to 49, below the partition queues' fixed delivery limit of 50.
    #[arg(long, global = true, env = "AVSYNC_POISON_DELIVERIES", value_name = "N", default_value_t = 10, value_parser = number_from_to(5, POISON_DELIVERIES_MAX))]
    pub poison_deliveries: u32,

    /// Unacknowledged messages this worker holds (its window), split evenly over the partition
    /// queues (at least one, at most 65,535 each: the broker's limit per consumer). The larger
    /// the window, the more of each tenant's events one session applies together.
    #[arg(long, global = true, env = "AVSYNC_PREFETCH", value_name = "N", default_value_t = DEFAULT_PREFETCH, value_parser = number_from_to(1u32, 1_000_000))]
    pub prefetch: u32,

    /// Most bytes the messages in the window may weigh (bodies, plus what holding each costs);
    /// what arrives beyond is set aside through the shortest delay tier. A number of bytes, or
    /// with a `KiB`, `MiB` or `GiB` suffix.
    #[arg(long, global = true, env = "AVSYNC_PREFETCH_BYTES", value_name = "BYTES", default_value = "64MiB", value_parser = parse_bytes)]
    pub prefetch_bytes: usize,

    /// AuthVital's base URL (e.g. https://auth.example.com), for `reconcile`.
    #[arg(long, global = true, env = "AVSYNC_AUTHVITAL_URL", value_name = "URL")]
    pub authvital_url: Option<String>,

    /// Client id of the AuthVital machine client (scope integration:read), for `reconcile`.
    #[arg(
        long,
        global = true,
        env = "AVSYNC_AUTHVITAL_CLIENT_ID",
        value_name = "ID"
    )]
    pub authvital_client_id: Option<String>,

    /// Secret of the AuthVital machine client; never printed.
    #[arg(
        long,
        global = true,
        env = "AVSYNC_AUTHVITAL_CLIENT_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub authvital_client_secret: Option<ClientSecret>,

    /// Longest wait for one answer of AuthVital's API (connect included).
    #[arg(long, global = true, env = "AVSYNC_AUTHVITAL_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub authvital_timeout: Duration,

    /// Most requests a minute this process sends to AuthVital's API (AuthVital allows 100 a
    /// minute per endpoint and client address).
    #[arg(long, global = true, env = "AVSYNC_AUTHVITAL_REQUESTS_PER_MINUTE", value_name = "N", default_value_t = 60, value_parser = number_from_to(1u32, 60_000))]
    pub authvital_requests_per_minute: u32,

    /// When set, `run` also reconciles every tenant this often (jittered), one worker per
    /// tenant at a time.
    #[arg(long, global = true, env = "AVSYNC_RECONCILE_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    pub reconcile_interval: Option<Duration>,

    /// Where a reconcile takes `has_app_access` and `app_role*` from: `roles` (the member's roles
    /// of AVSYNC_APPLICATION_ID), or `ignore` (left to webhooks; for an application without roles).
    #[arg(long, global = true, env = "AVSYNC_RECONCILE_APP_ACCESS", value_name = "SOURCE", default_value = "roles", value_parser = ["roles", "ignore"])]
    pub reconcile_app_access: String,

    /// A reconcile refuses (unless --force) a snapshot that turns more than this percentage of
    /// a tenant's active members, and more than AVSYNC_RECONCILE_MAX_LEFT of them, to `left`.
    #[arg(long, global = true, env = "AVSYNC_RECONCILE_MAX_LEFT_PERCENT", value_name = "PERCENT", default_value_t = 20, value_parser = number_from_to(0u8, 100))]
    pub reconcile_max_left_percent: u8,

    /// A reconcile refuses (unless --force) a snapshot that turns more than this many of a
    /// tenant's active members, and more than AVSYNC_RECONCILE_MAX_LEFT_PERCENT of them, to
    /// `left`; so a small tenant's routine departures pass.
    #[arg(
        long,
        global = true,
        env = "AVSYNC_RECONCILE_MAX_LEFT",
        value_name = "COUNT",
        default_value_t = 10
    )]
    pub reconcile_max_left: u32,
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

/// The worker's settings once checked: what [`crate::start`] and the commands take, with each
/// setting that needed more than clap parsed into its typed value.
#[derive(Debug, Clone)]
pub struct Checked {
    pub settings: Settings,
    pub topology: Topology,
    pub tenants: TenantSource,
    pub retry: RetryPolicy,
    pub pools: PoolSettings,
    /// Set with `AVSYNC_RECONCILE_INTERVAL`: the schedule and what it reconciles with.
    pub reconcile: Option<ReconcileSchedule>,
}

/// A scheduled reconcile, checked with the other settings so that a worker never starts with a
/// schedule it cannot run.
#[derive(Debug, Clone)]
pub struct ReconcileSchedule {
    pub interval: Duration,
    pub api: ApiSettings,
    /// The application whose access and roles a reconcile takes (None with `ignore`).
    pub application_id: Option<String>,
    /// `AVSYNC_RECONCILE_MAX_LEFT`, beside the share that `reconcile_cli::schedule` takes.
    pub max_left: u32,
}

impl Settings {
    /// Checks what clap cannot: the topology and the tenant database template, among others.
    pub fn check(self) -> Result<Checked, BadSetting> {
        let topology = self.common.check()?;
        let template = Template::parse(&self.tenant_database_url)
            .map_err(|reason| BadSetting::new("AVSYNC_TENANT_DATABASE_URL", reason))?;
        let tenants = match &self.tenant_registry_url {
            None => TenantSource::Template(template),
            Some(url) => TenantSource::Registry(
                setting_url(url)
                    .map_err(|reason| BadSetting::new("AVSYNC_TENANT_REGISTRY_URL", reason))?,
            ),
        };
        if self.application_id.as_deref() == Some("") {
            return Err(BadSetting::new(
                "AVSYNC_APPLICATION_ID",
                "is empty; unset it to accept every application",
            ));
        }
        let reconcile = match self.reconcile_interval {
            None => None,
            Some(interval) if interval.is_zero() => {
                return Err(BadSetting::new(
                    "AVSYNC_RECONCILE_INTERVAL",
                    "must be above zero; unset it to reconcile only on command",
                ));
            }
            Some(interval) => {
                let (api, application_id) = self.reconcile_settings()?;
                Some(ReconcileSchedule {
                    interval,
                    api,
                    application_id,
                    max_left: self.reconcile_max_left,
                })
            }
        };
        if let (MaxConnections::Fixed(_), Some(_)) =
            (self.max_connections, self.pg_free_connections)
        {
            return Err(BadSetting::new(
                "AVSYNC_PG_FREE_CONNECTIONS",
                "only applies with AVSYNC_MAX_CONNECTIONS=auto (a number pins the budget); unset one of them",
            ));
        }
        if self.authvital_timeout.is_zero() {
            return Err(BadSetting::new(
                "AVSYNC_AUTHVITAL_TIMEOUT",
                "must be above zero",
            ));
        }
        let retry = RetryPolicy::new(self.retry_delays.0.clone(), self.poison_deliveries);
        let pools = PoolSettings {
            capacity: self.tenant_pool_capacity,
            size: self.tenant_pool_size,
            create_databases: self.create_tenant_databases,
            auto_migrate: self.auto_migrate,
        };
        Ok(Checked {
            settings: self,
            topology,
            tenants,
            retry,
            pools,
            reconcile,
        })
    }

    /// What a reconcile needs: AuthVital's URL, the machine client, and the application whose
    /// access and roles it takes (None with AVSYNC_RECONCILE_APP_ACCESS=ignore).
    pub fn reconcile_settings(&self) -> Result<(ApiSettings, Option<String>), BadSetting> {
        let missing = |name| BadSetting::new(name, "is needed to reconcile (see the README)");
        let url = self
            .authvital_url
            .as_deref()
            .ok_or_else(|| missing("AVSYNC_AUTHVITAL_URL"))?;
        let url_ok = (url.starts_with("https://") || url.starts_with("http://"))
            && url.parse::<reqwest::Url>().is_ok();
        if !url_ok {
            return Err(BadSetting::new(
                "AVSYNC_AUTHVITAL_URL",
                "is not an http(s) URL like https://auth.example.com",
            ));
        }
        let client_id = self
            .authvital_client_id
            .clone()
            .filter(|id| !id.is_empty())
            .ok_or_else(|| missing("AVSYNC_AUTHVITAL_CLIENT_ID"))?;
        let client_secret = self
            .authvital_client_secret
            .clone()
            .ok_or_else(|| missing("AVSYNC_AUTHVITAL_CLIENT_SECRET"))?;
        let application_id = match self.reconcile_app_access.as_str() {
            "ignore" => None,
            _ => Some(
                self.application_id
                    .clone()
                    .ok_or_else(|| missing("AVSYNC_APPLICATION_ID"))?,
            ),
        };
        Ok((
            ApiSettings {
                base_url: url.trim_end_matches('/').to_owned(),
                client_id,
                client_secret,
                timeout: self.authvital_timeout,
                requests_per_minute: self.authvital_requests_per_minute,
            },
            application_id,
        ))
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
        assert_eq!(s.max_connections, MaxConnections::Auto);
        assert_eq!(s.pg_free_connections, None);
        assert_eq!(s.poison_deliveries, 10);
        assert_eq!(
            s.retry_delays.delays(),
            [1, 5, 30, 120, 600, 3600].map(Duration::from_secs)
        );
        s.clone().check().unwrap();
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
            &["--max-connections", "0"],
            &["--max-connections", "some"],
            &["--pg-free-connections", "-1"],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
        assert!(!parse(&["--auto-migrate", "false"]).unwrap().auto_migrate);
    }

    #[test]
    fn max_connections_is_auto_or_a_pinned_number() {
        let pinned = parse(&["--max-connections", "12"]).unwrap();
        assert_eq!(pinned.max_connections, MaxConnections::Fixed(12));
        pinned.check().unwrap();
        let auto = parse(&["--max-connections", "auto", "--pg-free-connections", "30"]).unwrap();
        assert_eq!(auto.max_connections, MaxConnections::Auto);
        assert_eq!(auto.pg_free_connections, Some(30));
        auto.check().unwrap();
        let e = parse(&["--max-connections", "lots"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--max-connections") && e.contains("`auto`"),
            "{e}"
        );
        let both = parse(&["--max-connections", "12", "--pg-free-connections", "30"]).unwrap();
        assert_eq!(both.check().unwrap_err().name, "AVSYNC_PG_FREE_CONNECTIONS");
    }

    #[test]
    fn check_names_the_setting() {
        let s = parse(&["--tenant-database-url", "mysql://x/{tenant_id}"]).unwrap();
        assert_eq!(
            s.clone().check().unwrap_err().name,
            "AVSYNC_TENANT_DATABASE_URL"
        );
        let s = parse(&["--tenant-database-url", "postgres://h:5432/"]).unwrap();
        assert_eq!(
            s.clone().check().unwrap_err().name,
            "AVSYNC_TENANT_DATABASE_URL"
        );
        let s = parse(&["--tenant-registry-url", "nope"]).unwrap();
        assert_eq!(
            s.clone().check().unwrap_err().name,
            "AVSYNC_TENANT_REGISTRY_URL"
        );
        let s = parse(&["--partitions", "0"]).unwrap();
        assert_eq!(s.clone().check().unwrap_err().name, "AVSYNC_PARTITIONS");
    }

    #[test]
    fn a_reconcile_schedule_needs_authvital_and_never_shows_the_secret() {
        let s = parse(&["--reconcile-interval", "1h"]).unwrap();
        assert_eq!(s.clone().check().unwrap_err().name, "AVSYNC_AUTHVITAL_URL");
        let full = [
            "--reconcile-interval",
            "1h",
            "--authvital-url",
            "https://auth.example.com/",
            "--authvital-client-id",
            "c",
            "--authvital-client-secret",
            "hidden-secret",
            "--application-id",
            "app",
        ];
        let s = parse(&full).unwrap();
        let checked = s.clone().check().unwrap();
        assert!(!format!("{s:?}").contains("hidden-secret"));
        assert!(!format!("{checked:?}").contains("hidden-secret"));
        let schedule = checked.reconcile.expect("a checked schedule");
        assert_eq!(schedule.interval, Duration::from_secs(3600));
        assert_eq!(schedule.api.base_url, "https://auth.example.com");
        assert_eq!(schedule.application_id.as_deref(), Some("app"));
        assert!(parse(&[]).unwrap().check().unwrap().reconcile.is_none());
        let (api, app) = s.reconcile_settings().unwrap();
        assert_eq!(api.base_url, "https://auth.example.com");
        assert_eq!(app.as_deref(), Some("app"));
        let s = parse(&full[..8]).unwrap();
        assert_eq!(s.clone().check().unwrap_err().name, "AVSYNC_APPLICATION_ID");
        let s = parse(&[&full[..8], &["--reconcile-app-access", "ignore"]].concat()).unwrap();
        assert_eq!(s.reconcile_settings().unwrap().1, None);
        let mut bad_url = full;
        bad_url[3] = "auth.example.com";
        let s = parse(&bad_url).unwrap();
        assert_eq!(s.clone().check().unwrap_err().name, "AVSYNC_AUTHVITAL_URL");
        assert!(parse(&["--reconcile-max-left-percent", "101"]).is_err());
        assert_eq!(parse(&[]).unwrap().reconcile_max_left_percent, 20);
        assert_eq!(parse(&[]).unwrap().reconcile_max_left, 10);
        assert_eq!(
            parse(&["--reconcile-max-left", "3"])
                .unwrap()
                .reconcile_max_left,
            3
        );
        assert!(parse(&["--reconcile-max-left", "-1"]).is_err());
    }
}
