//! The real `avsync-worker` and `avsync-ingress` binaries as child processes, with their stderr
//! (JSON log lines) collected. The binaries are the ones the test command builds (see [`binary`]).

use crate::support::{self, wait_until};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The worker's drain limit (`avsync_worker::DRAIN_LIMIT`) and some.
pub const EXIT_DEADLINE: Duration = Duration::from_secs(45);

/// Paths of the workspace's binaries, in the profile of the test itself, asked of cargo once
/// per test binary. The command is the README's test command with `--no-run`: the same package
/// selection resolves the same features, so after `cargo test --workspace` it compiles nothing
/// and only reports the binaries that run already built. Any other selection (`cargo build -p
/// avsync-worker`) resolves fewer features and rebuilds the TLS stack and every workspace crate.
/// Cargo runs without the variables it set for this test (`CARGO_MANIFEST_DIR` and the like):
/// ring's build script reruns when one of them appears, which would rebuild ring, rustls and all
/// above them here and again in the next outer `cargo test`.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<BTreeMap<String, PathBuf>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut command = std::process::Command::new(cargo);
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if set_by_cargo_for_this_test(&key) {
                command.env_remove(&*key);
            }
        }
        command.args([
            "test",
            "--workspace",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ]);
        if !cfg!(debug_assertions) {
            command.arg("--release");
        }
        let out = command
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("run cargo to build the binaries");
        assert!(
            out.status.success(),
            "cargo test --workspace --no-run failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["profile"]["test"] == false)
            .filter(|m| {
                m["target"]["kind"]
                    .as_array()
                    .is_some_and(|kinds| kinds.iter().any(|k| k == "bin"))
            })
            .filter_map(|m| {
                let name = m["target"]["name"].as_str()?.to_owned();
                Some((name, PathBuf::from(m["executable"].as_str()?)))
            })
            .collect()
    });
    built
        .get(name)
        .unwrap_or_else(|| panic!("cargo built no {name}"))
        .clone()
}

/// The variables cargo sets for the crate it runs, as opposed to the ones that configure cargo
/// (`CARGO_HOME`, `CARGO_TARGET_DIR`, `CARGO_PROFILE_*`, ...), which the inner cargo must share.
fn set_by_cargo_for_this_test(key: &str) -> bool {
    const PREFIXES: [&str; 3] = ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_"];
    const NAMES: [&str; 5] = [
        "CARGO_CRATE_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    PREFIXES.iter().any(|p| key.starts_with(p)) || NAMES.contains(&key)
}

/// One child process with its stderr (JSON log lines) collected as they come.
pub struct Process {
    pub child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Process {
    pub fn spawn(name: &str, env: &[(&str, String)]) -> Process {
        let mut command = Command::new(binary(name));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("AVSYNC_") {
                command.env_remove(key);
            }
        }
        command
            .env("AVSYNC_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("spawn the binary");
        let stderr = child.stderr.take().expect("piped stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        Process { child, logs }
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// The fields of the first log line with this message, once it is written.
    pub async fn wait_for_log(&self, message: &str) -> Value {
        let what = format!("log line `{message}`");
        wait_until(&what, Duration::from_secs(30), || async {
            self.logs()
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| v["message"] == message)
        })
        .await
    }

    pub async fn sigterm(&self) {
        self.signal("-TERM").await;
    }

    pub async fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("still running").to_string();
        let sent = Command::new("kill")
            .args([signal, &pid])
            .status()
            .await
            .expect("kill");
        assert!(sent.success());
    }

    /// Waits for the exit; panics after `EXIT_DEADLINE`. Returns the exit code.
    pub async fn exit_code(&mut self) -> Option<i32> {
        let status = tokio::time::timeout(EXIT_DEADLINE, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("still running {EXIT_DEADLINE:?} after SIGTERM"))
            .expect("wait for the child");
        status.code()
    }
}

/// `avsync-ingress` on topology `prefix` with this `AVSYNC_HMAC_SECRETS` and `extra` settings,
/// both listeners on 127.0.0.1:0; returns once `/readyz` is 200, with the public address and the
/// metrics base URL.
pub async fn spawn_ingress(
    prefix: &str,
    partitions: u16,
    secret: &str,
    extra: &[(&str, String)],
) -> (Process, String, String) {
    let mut env = vec![
        ("AVSYNC_AMQP_URL", support::AMQP_URL.to_owned()),
        ("AVSYNC_TOPOLOGY", prefix.to_owned()),
        ("AVSYNC_PARTITIONS", partitions.to_string()),
        ("AVSYNC_LISTEN", "127.0.0.1:0".to_owned()),
        ("AVSYNC_METRICS_LISTEN", "127.0.0.1:0".to_owned()),
        ("AVSYNC_HMAC_SECRETS", secret.to_owned()),
    ];
    env.extend(extra.iter().cloned());
    let ingress = Process::spawn("avsync-ingress", &env);
    let listening = ingress.wait_for_log("ingress listening").await;
    let addr = listening["addr"].as_str().expect("addr").to_owned();
    let metrics = format!(
        "http://{}",
        listening["metrics_addr"].as_str().expect("metrics_addr")
    );
    let ready = format!("{metrics}/readyz");
    wait_until("ingress /readyz 200", Duration::from_secs(30), || async {
        let status = reqwest::get(&ready).await.ok()?.status();
        status.is_success().then_some(())
    })
    .await;
    (ingress, addr, metrics)
}
