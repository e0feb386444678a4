//! A PostgreSQL server of the test's own beside the shared one: a cluster made with
//! `pg_createcluster` on a free port, which the test may stop and start under load, and which is
//! dropped whole (data, configuration, log) when its guard goes, also when the test fails.

use super::{describe_difference, free_port, pg_version};
use avsync_worker::apply::{self, Identity};
use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Every cluster a test makes is named `<PREFIX><pid>_<hex>`. One whose process is gone is the
/// leftover of a run killed before its guard could drop it; a running test's is left alone.
const PREFIX: &str = "avsyncsrv_";
/// Small, so that the cluster costs the shared machine little.
const SETTINGS: &[&str] = &["-o", "max_connections=50", "-o", "shared_buffers=16MB"];
/// A started server answers within this, even on a busy machine.
const STARTED_WITHIN: Duration = Duration::from_secs(60);

/// Runs a PostgreSQL maintenance command; on failure, what it said.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program} could not run: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "`{program} {}` failed ({}): {}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

/// Drops the clusters of earlier runs whose process no longer exists.
fn drop_leftovers(version: &str) {
    let Ok(entries) = std::fs::read_dir(Path::new("/etc/postgresql").join(version)) else {
        return;
    };
    for name in entries.filter_map(|e| e.ok()?.file_name().into_string().ok()) {
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('_').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            if let Err(e) = run("pg_dropcluster", &["--stop", version, &name]) {
                eprintln!("could not drop the leftover cluster {name}: {e}");
            }
        }
    }
}

/// A PostgreSQL cluster owned by one test, trust auth on 127.0.0.1. Its methods block (they run
/// `pg_ctlcluster`): call them through `spawn_blocking`.
pub struct PgCluster {
    version: String,
    name: String,
    port: u16,
}

impl PgCluster {
    /// Creates the cluster on a free port and starts it; drops leftovers of killed runs first.
    pub fn create() -> PgCluster {
        let version = pg_version();
        drop_leftovers(&version);
        let id = uuid::Uuid::new_v4().simple().to_string();
        let cluster = PgCluster {
            name: format!("{PREFIX}{}_{}", std::process::id(), &id[..8]),
            port: free_port(),
            version,
        };
        let port = cluster.port.to_string();
        let mut args = vec![cluster.version.as_str(), &cluster.name, "--port", &port];
        args.extend_from_slice(SETTINGS);
        args.extend(["--", "--auth=trust", "--no-sync"]);
        if let Err(e) = run("pg_createcluster", &args) {
            panic!("{e}");
        }
        cluster.start();
        cluster
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Runs `pg_ctlcluster` on this cluster; on failure, what it said and the end of the
    /// server's log (which goes with the cluster when the guard drops it).
    fn ctl(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["--skip-systemctl-redirect", &self.version, &self.name];
        all.extend_from_slice(args);
        run("pg_ctlcluster", &all).map_err(|e| format!("{e}\n{}", self.log_tail()))
    }

    fn log_tail(&self) -> String {
        let log = format!(
            "/var/log/postgresql/postgresql-{}-{}.log",
            self.version, self.name
        );
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "end of {log}:\n{}",
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }

    fn answers(&self) -> bool {
        let port = self.port.to_string();
        run("pg_isready", &["-q", "-h", "127.0.0.1", "-p", &port]).is_ok()
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&self) {
        if let Err(e) = self.ctl(&["start"]) {
            panic!("{e}");
        }
        let started = Instant::now();
        while !self.answers() {
            assert!(
                started.elapsed() < STARTED_WITHIN,
                "cluster {} does not answer on port {} within {STARTED_WITHIN:?}\n{}",
                self.name,
                self.port,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server as an operator's maintenance does (`-m fast`): every session is cut,
    /// new ones are refused with SQLSTATE 57P03 while it writes its shutdown checkpoint, and
    /// then its port is closed. Returns once it is down.
    pub fn stop(&self) {
        if let Err(e) = self.ctl(&["stop", "-m", "fast"]) {
            panic!("{e}");
        }
    }

    /// Client sessions open on the server now, other than the one asking.
    pub async fn sessions(&self) -> Option<i64> {
        let mut conn = PgConnection::connect(&self.url("postgres")).await.ok()?;
        let n = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
        )
        .fetch_one(&mut conn)
        .await
        .ok();
        let _ = conn.close().await;
        n
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Its data goes with it: no shutdown checkpoint to wait for. Stopping a stopped
        // cluster fails harmlessly.
        let _ = self.ctl(&["stop", "-m", "immediate"]);
        if let Err(e) = run("pg_dropcluster", &["--stop", &self.version, &self.name]) {
            eprintln!(
                "{e}; drop it with `pg_dropcluster --stop {} {}`",
                self.version, self.name
            );
        }
    }
}

/// The rows of the tenant database at `url`, or None when it cannot be read (yet).
pub async fn rows_at(url: &str) -> Option<Vec<Identity>> {
    let mut conn = PgConnection::connect(url).await.ok()?;
    let rows = apply::load_all(&mut conn).await.ok();
    let _ = conn.close().await;
    rows
}

/// Whether the tenant database at `url` holds exactly `expected`; if not, how it differs.
pub async fn compare_rows(tenant: &str, url: &str, expected: &[Identity]) -> Result<(), String> {
    match rows_at(url).await {
        Some(rows) if rows == expected => Ok(()),
        Some(rows) => Err(describe_difference(tenant, expected, &rows)),
        None => Err(format!("tenant {tenant}: database not readable at {url}")),
    }
}

/// When each row of `ids` was last written (`synced_at`, the start of the writing
/// transaction), by row id; rows that do not exist are left out.
pub async fn synced_at(url: &str, ids: &[String]) -> BTreeMap<String, DateTime<Utc>> {
    let Ok(mut conn) = PgConnection::connect(url).await else {
        return BTreeMap::new();
    };
    let rows: Vec<(String, DateTime<Utc>)> =
        sqlx::query_as("SELECT id, synced_at FROM av_identities WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(&mut conn)
            .await
            .unwrap_or_default();
    let _ = conn.close().await;
    rows.into_iter().collect()
}
