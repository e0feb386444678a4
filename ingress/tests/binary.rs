//! The `avsync-ingress` binary as an operator runs it: settings errors, `--help`, serving
//! `/healthz` without a broker, and a clean exit on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_avsync-ingress");

type Env = &'static [(&'static str, &'static str)];

/// The binary with no AVSYNC_* variables from the environment running the tests.
fn ingress() -> Command {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars() {
        if name.starts_with("AVSYNC_") {
            command.env_remove(name);
        }
    }
    command
}

#[test]
fn help_lists_every_setting_with_its_default() {
    let out = ingress().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "AVSYNC_AMQP_URL",
        "AVSYNC_TOPOLOGY",
        "AVSYNC_PARTITIONS",
        "AVSYNC_LISTEN",
        "AVSYNC_METRICS_LISTEN",
        "AVSYNC_HMAC_SECRETS",
        "AVSYNC_JWKS_URL",
        "AVSYNC_TIMESTAMP_TOLERANCE_SECS",
        "AVSYNC_MAX_BODY_BYTES",
        "AVSYNC_PUBLISH_TIMEOUT",
        "[default: 0.0.0.0:8080]",
        "[default: 300]",
        "[default: 262144]",
        "[default: 10s]",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
}

#[test]
fn a_bad_setting_stops_it_with_one_line_naming_the_setting_and_no_secret() {
    // (environment, what the line must name, what it must not show)
    let cases: &[(Env, &str, &str)] = &[
        (&[], "AVSYNC_HMAC_SECRETS", ""),
        (
            &[("AVSYNC_HMAC_SECRETS", "k1=topsecret-one,topsecret-two")],
            "AVSYNC_HMAC_SECRETS",
            "topsecret",
        ),
        (
            &[("AVSYNC_HMAC_SECRETS", "whsec_!!topsecret!!")],
            "AVSYNC_HMAC_SECRETS",
            "topsecret",
        ),
        (
            &[
                ("AVSYNC_HMAC_SECRETS", "k=v"),
                ("AVSYNC_PUBLISH_TIMEOUT", "10"),
            ],
            "publish-timeout",
            "",
        ),
        (
            &[("AVSYNC_HMAC_SECRETS", "k=v"), ("AVSYNC_TOPOLOGY", "a b")],
            "AVSYNC_TOPOLOGY",
            "",
        ),
        (&[("AVSYNC_JWKS_URL", "not a url")], "AVSYNC_JWKS_URL", ""),
    ];
    for (env, names, secret) in cases {
        let mut command = ingress();
        for (k, v) in *env {
            command.env(k, v);
        }
        let out = command.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{env:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains(names), "{stderr}");
        if !secret.is_empty() {
            assert!(!stderr.contains(secret), "{stderr}");
        }
        assert!(out.stdout.is_empty());
    }
}

#[tokio::test]
async fn serves_healthz_without_a_broker_and_exits_cleanly_on_sigterm() {
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = ingress()
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--amqp-url",
            &format!("amqp://guest:guest@127.0.0.1:{closed_port}/%2f"),
        ])
        .env("AVSYNC_HMAC_SECRETS", "k1=topsecret-value")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let metrics_addr = loop {
        let line = lines_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the ingress logs its listeners");
        let log: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
        if log["message"] == "ingress listening" {
            break log["metrics_addr"].as_str().unwrap().to_owned();
        }
    };

    let client = reqwest::Client::new();
    let health = client
        .get(format!("http://{metrics_addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let ready = client
        .get(format!("http://{metrics_addr}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 503);

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    let logs: Vec<String> = lines_rx.try_iter().collect();
    assert!(logs.iter().all(|l| !l.contains("topsecret")), "{logs:?}");
}

#[test]
fn a_bad_value_names_the_variable_and_the_flag() {
    let out = ingress()
        .env("AVSYNC_HMAC_SECRETS", "k=v")
        .env("AVSYNC_MAX_BODY_BYTES", "many")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("AVSYNC_MAX_BODY_BYTES (--max-body-bytes)"),
        "{stderr}"
    );
}

#[test]
fn a_refused_broker_login_is_said_once_naming_the_setting() {
    // Repeats are logged at debug: three of them show the ingress retried without saying it
    // again at ERROR.
    let mut child = ingress()
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .env("AVSYNC_HMAC_SECRETS", "k1=topsecret-value")
        .env(
            "AVSYNC_AMQP_URL",
            "amqp://guest:hunter2-wrong@127.0.0.1:5672/%2f",
        )
        .env("RUST_LOG", "info,lapin=off,avsync_shared::broker=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = Vec::new();
    while seen
        .iter()
        .filter(|l: &&String| l.contains("AVSYNC_AMQP_URL"))
        .count()
        < 3
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines_rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("three refused logins not seen:\n{}", seen.join("\n")),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let all = seen.join("\n");
    let errors: Vec<_> = seen.iter().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{all}");
    assert!(
        errors[0].contains("user name or password in AVSYNC_AMQP_URL"),
        "{all}"
    );
    assert!(!all.contains("hunter2"), "the password was printed: {all}");
}
