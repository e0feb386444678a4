//! The `avsync-worker` binary's command line: bad settings stop it with one line naming the
//! setting (and never echoing a secret), `--help` documents every setting.

use std::process::{Command, Output};

fn worker(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_avsync-worker"));
    cmd.args(args);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("AVSYNC_")) {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run avsync-worker")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_lists_every_worker_setting() {
    let out = worker(&["--help"], &[]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for name in [
        "AVSYNC_AMQP_URL",
        "AVSYNC_TOPOLOGY",
        "AVSYNC_PARTITIONS",
        "AVSYNC_METRICS_LISTEN",
        "AVSYNC_APPLICATION_ID",
        "AVSYNC_TENANT_DATABASE_URL",
        "AVSYNC_TENANT_REGISTRY_URL",
        "AVSYNC_AUTO_MIGRATE",
        "AVSYNC_CREATE_TENANT_DATABASES",
        "AVSYNC_TENANT_POOL_CAPACITY",
        "AVSYNC_TENANT_POOL_SIZE",
        "AVSYNC_RETRY_DELAYS",
        "AVSYNC_POISON_DELIVERIES",
        "AVSYNC_PREFETCH",
        "migrate",
        "dlq",
    ] {
        assert!(help.contains(name), "{name} missing from --help:\n{help}");
    }
    assert!(
        help.contains("tenant_{tenant_id}"),
        "the default template is shown"
    );
}

#[test]
fn a_bad_setting_stops_the_worker_with_one_line() {
    for (env, setting) in [
        (("AVSYNC_POISON_DELIVERIES", "4"), "poison"),
        (("AVSYNC_RETRY_DELAYS", "1s,soon"), "retry"),
        (
            (
                "AVSYNC_TENANT_DATABASE_URL",
                "mysql://root:hunter2@db/tenant_{tenant_id}",
            ),
            "AVSYNC_TENANT_DATABASE_URL",
        ),
        (
            (
                "AVSYNC_TENANT_REGISTRY_URL",
                "postgres://u:hunter2@db:5432/",
            ),
            "AVSYNC_TENANT_REGISTRY_URL",
        ),
        (("AVSYNC_PARTITIONS", "0"), "AVSYNC_PARTITIONS"),
    ] {
        let out = worker(&[], &[env]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{env:?}: {err}");
        assert!(
            err.to_lowercase().contains(&setting.to_lowercase()),
            "{env:?}: {err}"
        );
        assert!(!err.contains("hunter2"), "a secret was printed: {err}");
    }
}

#[test]
fn migrate_all_needs_the_registry() {
    let out = worker(&["migrate", "--all"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("AVSYNC_TENANT_REGISTRY_URL"),
        "{}",
        stderr(&out)
    );
    let out = worker(&["migrate"], &[]);
    assert_eq!(out.status.code(), Some(2), "a target is required");
}
