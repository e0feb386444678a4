//! No secret ever leaves the `avsync-ingress` binary: not in its logs (text or JSON, at
//! `RUST_LOG=debug`), not on stdout, not in an HTTP answer, not in `/metrics`, not when a setting
//! is bad. The secrets are HMAC secrets of both kinds and the password in `AVSYNC_AMQP_URL`,
//! looked for as written and in the forms a careless format would print them: the base64
//! inside a `whsec_` secret, its decoded key as text, hex and `Debug` bytes.
//!
//! The broker is the real local RabbitMQ; a user with a secret password is made for the test
//! (and removed after it), so the password is also exercised on a working connection.

use avsync_shared::Topology;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use ring::hmac;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BIN: &str = env!("CARGO_BIN_EXE_avsync-ingress");
const PARTITIONS: u16 = 2;
const GUEST_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Decodes to printable text, so a leak of the decoded key would be readable in a log.
const WHSEC_KEY_TEXT: &str = "printable-whsec-key-7Qz";
const NAMED_SECRET: &str = "av-named-secret-Xy9";
/// A secret holding `=`: the entry splits at the first one.
const NAMED_SECRET_WITH_EQUALS: &str = "pa=ss-word-Q7w";
const DEADLINE: Duration = Duration::from_secs(20);
/// Small, so that the 413 case sends little.
const MAX_BODY_BYTES: usize = 4096;

/// Unique across processes and reruns.
fn unique(tag: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{tag}_{:x}{:x}", std::process::id(), nanos)
}

struct Secrets {
    /// `AVSYNC_HMAC_SECRETS` as configured.
    setting: String,
    whsec_printable: String,
    whsec_random: String,
    amqp_password: String,
}

impl Secrets {
    fn new() -> Self {
        // Bytes above 0x7F: a key that no log could print as text.
        let random: Vec<u8> = unique("k").bytes().map(|b| b | 0x80).collect();
        let whsec_printable = format!("whsec_{}", STANDARD.encode(WHSEC_KEY_TEXT));
        let whsec_random = format!("whsec_{}", STANDARD.encode(random));
        Self {
            setting: format!(
                "{whsec_printable},{whsec_random},k1={NAMED_SECRET},k2={NAMED_SECRET_WITH_EQUALS}"
            ),
            whsec_printable,
            whsec_random,
            amqp_password: unique("amqp-pass"),
        }
    }

    /// Every form in which a secret must not appear.
    fn needles(&self) -> Vec<String> {
        let mut keys: Vec<Vec<u8>> = vec![
            WHSEC_KEY_TEXT.as_bytes().to_vec(),
            NAMED_SECRET.as_bytes().to_vec(),
            NAMED_SECRET_WITH_EQUALS.as_bytes().to_vec(),
            self.amqp_password.as_bytes().to_vec(),
        ];
        let mut needles = vec![
            self.setting.clone(),
            self.whsec_printable.clone(),
            self.whsec_random.clone(),
        ];
        for whsec in [&self.whsec_printable, &self.whsec_random] {
            let encoded = &whsec["whsec_".len()..];
            needles.push(encoded.trim_end_matches('=').to_owned());
            keys.push(STANDARD.decode(encoded).expect("base64"));
        }
        for key in keys {
            if let Ok(text) = std::str::from_utf8(&key) {
                if text.chars().all(|c| c.is_ascii_graphic()) {
                    needles.push(text.to_owned());
                }
            }
            needles.push(key.iter().map(|b| format!("{b:02x}")).collect());
            // What `{:?}` of the key bytes would print, from its start.
            let debug = format!("{:?}", &key[..8]);
            needles.push(debug.trim_end_matches(']').to_owned());
        }
        needles
    }

    fn whsec_key(&self) -> Vec<u8> {
        WHSEC_KEY_TEXT.as_bytes().to_vec()
    }
}

/// Everything a run showed the outside world.
#[derive(Default)]
struct Seen {
    stderr: String,
    stdout: String,
    answers: Vec<String>,
}

/// Fails naming where a secret appeared and in which form.
fn assert_no_secret(run: &str, seen: &Seen, secrets: &Secrets) {
    let places = [
        ("stderr", strip_ansi(&seen.stderr)),
        ("stdout", strip_ansi(&seen.stdout)),
        ("HTTP answers", seen.answers.join("\n")),
    ];
    for needle in secrets.needles() {
        for (place, text) in &places {
            assert!(
                !text.contains(&needle),
                "{run}: {place} shows a secret (as {needle:?}):\n{text}"
            );
        }
    }
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for end in chars.by_ref() {
                if end.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The binary with no AVSYNC_* or RUST_LOG variables from the environment running the tests.
fn ingress() -> Command {
    let mut command = Command::new(BIN);
    for (name, _) in std::env::vars() {
        if name.starts_with("AVSYNC_") || name == "RUST_LOG" {
            command.env_remove(name);
        }
    }
    command.env("RUST_LOG", "debug");
    command
}

/// A running binary whose stderr and stdout are collected line by line; killed if dropped.
struct Running {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    stdout: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start avsync-ingress");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let stdout = Arc::new(Mutex::new(String::new()));
        let err_pipe = child.stderr.take().expect("stderr");
        let mut out_pipe = child.stdout.take().expect("stdout");
        let lines = stderr.clone();
        let text = stdout.clone();
        let readers = vec![
            std::thread::spawn(move || {
                for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
                    lines.lock().expect("lines").push(line);
                }
            }),
            std::thread::spawn(move || {
                let mut all = String::new();
                let _ = out_pipe.read_to_string(&mut all);
                text.lock().expect("stdout").push_str(&all);
            }),
        ];
        Self {
            child,
            stderr,
            stdout,
            readers,
        }
    }

    /// Waits for a stderr line that `pick` accepts and returns what it picked.
    async fn wait_for_line<T>(&self, what: &str, pick: impl Fn(&str) -> Option<T>) -> T {
        let started = Instant::now();
        loop {
            let found = self
                .stderr
                .lock()
                .expect("lines")
                .iter()
                .find_map(|l| pick(&strip_ansi(l)));
            if let Some(found) = found {
                return found;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "timed out waiting for {what}; stderr so far:\n{}",
                self.stderr.lock().expect("lines").join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The public and metrics addresses from the "ingress listening" line, text or JSON.
    async fn addresses(&self) -> (String, String) {
        self.wait_for_line("the ingress listening", |line| {
            if !line.contains("ingress listening") {
                return None;
            }
            if let Ok(json) = serde_json::from_str::<serde_json::Value>(line) {
                return Some((
                    json["addr"].as_str()?.to_owned(),
                    json["metrics_addr"].as_str()?.to_owned(),
                ));
            }
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                    .map(str::to_owned)
            };
            Some((field("addr")?, field("metrics_addr")?))
        })
        .await
    }

    /// SIGTERM, then everything it wrote; it must exit cleanly within the deadline.
    async fn stop(mut self) -> Seen {
        let killed = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(killed.success());
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            assert!(started.elapsed() < DEADLINE, "no exit after SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.success(), "{status:?}");
        self.collect()
    }

    /// Waits for the process to exit by itself.
    fn finish(mut self) -> (std::process::ExitStatus, Seen) {
        let status = self.child.wait().expect("wait");
        (status, self.collect())
    }

    fn collect(&mut self) -> Seen {
        for reader in self.readers.drain(..) {
            reader.join().expect("reader thread");
        }
        Seen {
            stderr: self.stderr.lock().expect("lines").join("\n"),
            stdout: self.stdout.lock().expect("stdout").clone(),
            answers: Vec::new(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A RabbitMQ user with the test's secret password, removed when dropped.
struct BrokerUser {
    name: String,
}

impl BrokerUser {
    fn create(password: &str) -> Self {
        let name = unique("avsync_secret");
        let user = Self { name };
        for args in [
            vec!["add_user", &user.name, password],
            vec!["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"],
        ] {
            let out = Command::new("rabbitmqctl")
                .arg("-q")
                .args(&args)
                .output()
                .expect("rabbitmqctl (installed with RabbitMQ)");
            assert!(out.status.success(), "rabbitmqctl {}", args[0]);
        }
        user
    }

    fn url(&self, password: &str) -> String {
        format!("amqp://{}:{password}@127.0.0.1:5672/%2f", self.name)
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_user", &self.name])
            .output();
    }
}

/// Deletes the topology a run declared, also when the test panics.
struct TopologyCleanup(Topology);

impl Drop for TopologyCleanup {
    fn drop(&mut self) {
        let topology = self.0.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let conn = lapin::Connection::connect(GUEST_URL, Default::default())
                    .await
                    .ok()?;
                let ch = conn.create_channel().await.ok()?;
                let mut queues = vec![topology.dead_queue()];
                queues.extend((0..topology.partitions()).map(|p| topology.partition_queue(p)));
                for q in queues {
                    let _ = ch
                        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                let _ = ch
                    .exchange_delete(
                        topology.events_exchange().as_str().into(),
                        ExchangeDeleteOptions::default(),
                    )
                    .await;
                conn.close(200, "cleanup".into()).await.ok()
            })
        })
        .join();
    }
}

fn event(id: &str) -> Vec<u8> {
    format!(
        r#"{{"id":"{id}","data":{{"sub":"usr_1"}},"type":"subject.created","tenant_id":"tnt_acme","timestamp":"2026-08-21T01:40:03.512Z"}}"#
    )
    .into_bytes()
}

fn hmac_b64(key: &[u8], parts: &[&[u8]]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&key);
    for part in parts {
        ctx.update(part);
    }
    STANDARD.encode(ctx.sign().as_ref())
}

fn now() -> String {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
        .to_string()
}

type Headers = Vec<(&'static str, String)>;

fn standard(key: &[u8], body: &[u8]) -> Headers {
    let (id, ts) = ("msg_1".to_owned(), now());
    let sig = hmac_b64(key, &[id.as_bytes(), b".", ts.as_bytes(), b".", body]);
    vec![
        ("webhook-id", id),
        ("webhook-timestamp", ts),
        ("webhook-signature", format!("v1,{sig}")),
    ]
}

fn authvital(key_id: Option<&str>, key: &[u8], body: &[u8]) -> Headers {
    let ts = now();
    let mut headers = vec![
        (
            "x-authvital-signature",
            hmac_b64(key, &[ts.as_bytes(), b".", body]),
        ),
        ("x-authvital-timestamp", ts),
    ];
    if let Some(kid) = key_id {
        headers.push(("x-authvital-key-id", kid.to_owned()));
    }
    headers
}

/// Sends every kind of request, valid and not, and records each answer's status, headers and
/// body, and the `/metrics`, `/healthz` and `/readyz` pages.
async fn drive(secrets: &Secrets, addr: &str, metrics_addr: &str, answers: &mut Vec<String>) {
    let client = reqwest::Client::builder()
        .timeout(DEADLINE)
        .build()
        .expect("client");
    let url = format!("http://{addr}/webhooks/authvital");
    let body = event("evt-secrets");
    let mut stale = standard(&secrets.whsec_key(), &body);
    stale[1].1 = "1000000000".into();
    let mut doubled = standard(&secrets.whsec_key(), &body);
    doubled.push(("webhook-signature", "v1,AAAA".into()));
    let not_json = b"{not json".to_vec();
    let big = vec![b' '; MAX_BODY_BYTES + 1];
    let requests: Vec<(Headers, Vec<u8>)> = vec![
        (standard(&secrets.whsec_key(), &body), body.clone()),
        (
            authvital(Some("k1"), NAMED_SECRET.as_bytes(), &body),
            body.clone(),
        ),
        (
            authvital(Some("k2"), NAMED_SECRET_WITH_EQUALS.as_bytes(), &body),
            body.clone(),
        ),
        (
            authvital(None, NAMED_SECRET.as_bytes(), &body),
            body.clone(),
        ),
        (standard(b"another key", &body), body.clone()),
        (authvital(Some("k1"), b"wrong", &body), body.clone()),
        (
            authvital(Some("k9"), NAMED_SECRET.as_bytes(), &body),
            body.clone(),
        ),
        (stale, body.clone()),
        (doubled, body.clone()),
        (Vec::new(), body.clone()),
        (standard(&secrets.whsec_key(), &not_json), not_json),
        (Vec::new(), big),
    ];
    for (headers, body) in requests {
        let mut request = client.post(&url).body(body);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let response = request.send().await.expect("POST");
        answers.push(format!("{:?}", response.headers()));
        answers.push(response.text().await.expect("answer body"));
    }
    for page in [
        format!("http://{addr}/other"),
        format!("http://{metrics_addr}/metrics"),
        format!("http://{metrics_addr}/healthz"),
        format!("http://{metrics_addr}/readyz"),
    ] {
        let response = client.get(&page).send().await.expect("GET");
        answers.push(format!("{:?}", response.headers()));
        answers.push(response.text().await.expect("page"));
    }
}

fn serve(format: &str, amqp_url: &str, topology: &Topology, secrets: &Secrets) -> Command {
    let mut command = ingress();
    command
        .env("AVSYNC_AMQP_URL", amqp_url)
        .env("AVSYNC_HMAC_SECRETS", &secrets.setting)
        .env("AVSYNC_TOPOLOGY", topology.prefix())
        .env("AVSYNC_PARTITIONS", PARTITIONS.to_string())
        .env("AVSYNC_LISTEN", "127.0.0.1:0")
        .env("AVSYNC_METRICS_LISTEN", "127.0.0.1:0")
        .env("AVSYNC_MAX_BODY_BYTES", MAX_BODY_BYTES.to_string())
        .env("AVSYNC_LOG_FORMAT", format);
    command
}

#[tokio::test]
async fn a_connected_ingress_never_shows_a_secret() {
    let secrets = Secrets::new();
    let user = BrokerUser::create(&secrets.amqp_password);
    let url = user.url(&secrets.amqp_password);
    // A cluster's list whose other node is down: the failed attempt is logged too.
    let list = format!(
        "amqp://guest:{}@127.0.0.1:{}/%2f,{url}",
        secrets.amqp_password,
        closed_port()
    );
    for (format, url) in [
        ("text", &url),
        ("json", &url),
        ("text", &list),
        ("json", &list),
    ] {
        let topology = Topology::new(&unique("t"), PARTITIONS).expect("topology");
        let _cleanup = TopologyCleanup(topology.clone());
        let running = Running::spawn(serve(format, url, &topology, &secrets));
        let (addr, metrics_addr) = running.addresses().await;
        running
            .wait_for_line("connected to the broker", |l| {
                l.contains("connected to the broker").then_some(())
            })
            .await;
        let mut answers = Vec::new();
        drive(&secrets, &addr, &metrics_addr, &mut answers).await;
        assert!(
            answers.iter().filter(|a| a.contains("\"queued\"")).count() == 4,
            "{format}: the four valid requests are queued: {answers:?}"
        );
        let mut seen = running.stop().await;
        seen.answers = answers;
        assert!(
            seen.stderr.contains("DEBUG"),
            "{format}: debug logging is on"
        );
        assert!(seen.stdout.is_empty(), "{format}: logs go to stderr only");
        assert_no_secret(&format!("{format}, connected"), &seen, &secrets);
    }
}

#[tokio::test]
async fn an_unreachable_or_refusing_broker_never_shows_the_password() {
    let secrets = Secrets::new();
    let closed_port = closed_port();
    let password = &secrets.amqp_password;
    let urls = [
        (
            "closed port",
            format!("amqp://guest:{password}@127.0.0.1:{closed_port}/%2f"),
        ),
        (
            "wrong password",
            format!("amqp://guest:{password}@127.0.0.1:5672/%2f"),
        ),
        (
            "unknown user",
            format!("amqp://{}:{password}@127.0.0.1:5672/%2f", unique("nobody")),
        ),
        (
            "unknown vhost",
            format!("amqp://guest:{password}@127.0.0.1:5672/{}", unique("vhost")),
        ),
        (
            "a cluster's nodes, one down and one refusing",
            format!(
                "amqp://guest:{password}@127.0.0.1:{closed_port}/%2f,amqp://guest:{password}@127.0.0.1:5672/%2f"
            ),
        ),
    ];
    for format in ["text", "json"] {
        for (name, url) in &urls {
            let topology = Topology::new(&unique("t"), PARTITIONS).expect("topology");
            let running = Running::spawn(serve(format, url, &topology, &secrets));
            let (addr, metrics_addr) = running.addresses().await;
            running
                .wait_for_line("a failed broker connection", |l| {
                    l.contains("cannot reach the broker").then_some(())
                })
                .await;
            let mut answers = Vec::new();
            drive(&secrets, &addr, &metrics_addr, &mut answers).await;
            assert!(
                answers.iter().any(|a| a.contains("broker_unavailable")),
                "{format}, {name}: valid requests are 503"
            );
            let mut seen = running.stop().await;
            seen.answers = answers;
            assert_no_secret(&format!("{format}, {name}"), &seen, &secrets);
        }
    }
}

#[tokio::test]
async fn a_bad_setting_or_help_never_shows_a_secret() {
    let secrets = Secrets::new();
    let url = format!("amqp://guest:{}@127.0.0.1:5672/%2f", secrets.amqp_password);
    let whsec_bad_base64 = format!("{}!", secrets.whsec_printable);
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        (
            "an entry that is neither kind",
            vec![(
                "AVSYNC_HMAC_SECRETS",
                format!("{},{NAMED_SECRET}", secrets.setting),
            )],
        ),
        (
            "a whsec_ secret that is not base64",
            vec![("AVSYNC_HMAC_SECRETS", whsec_bad_base64)],
        ),
        (
            "a repeated key id",
            vec![(
                "AVSYNC_HMAC_SECRETS",
                format!("k1={NAMED_SECRET},k1={NAMED_SECRET_WITH_EQUALS}"),
            )],
        ),
        (
            "an empty entry among secrets",
            vec![("AVSYNC_HMAC_SECRETS", format!("{},,", secrets.setting))],
        ),
        (
            "a bad partition count beside the secrets",
            vec![
                ("AVSYNC_HMAC_SECRETS", secrets.setting.clone()),
                ("AVSYNC_AMQP_URL", url.clone()),
                ("AVSYNC_PARTITIONS", "0".into()),
            ],
        ),
        (
            "a bad duration beside the secrets",
            vec![
                ("AVSYNC_HMAC_SECRETS", secrets.setting.clone()),
                ("AVSYNC_AMQP_URL", url.clone()),
                ("AVSYNC_PUBLISH_TIMEOUT", "soon".into()),
            ],
        ),
        (
            // The broker client's own parse error would quote the URL whole.
            "an AMQP URL that is not a URL",
            vec![
                ("AVSYNC_HMAC_SECRETS", secrets.setting.clone()),
                (
                    "AVSYNC_AMQP_URL",
                    format!("guest:{}@127.0.0.1", secrets.amqp_password),
                ),
            ],
        ),
        (
            "an AMQP URL with a port out of range",
            vec![
                ("AVSYNC_HMAC_SECRETS", secrets.setting.clone()),
                (
                    "AVSYNC_AMQP_URL",
                    format!("amqp://guest:{}@127.0.0.1:99999/%2f", secrets.amqp_password),
                ),
            ],
        ),
        (
            "a cluster's list with a URL that is not one",
            vec![
                ("AVSYNC_HMAC_SECRETS", secrets.setting.clone()),
                (
                    "AVSYNC_AMQP_URL",
                    format!("{url},guest:{}@127.0.0.1", secrets.amqp_password),
                ),
            ],
        ),
        (
            "a cluster's list with an empty entry",
            vec![
                ("AVSYNC_HMAC_SECRETS", secrets.setting.clone()),
                ("AVSYNC_AMQP_URL", format!("{url},,{url}")),
            ],
        ),
        (
            "an unknown log format beside the secrets",
            vec![
                ("AVSYNC_HMAC_SECRETS", secrets.setting.clone()),
                ("AVSYNC_AMQP_URL", url.clone()),
                ("AVSYNC_LOG_FORMAT", "xml".into()),
            ],
        ),
    ];
    for (name, env) in &cases {
        let mut command = ingress();
        command.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        let (status, seen) = Running::spawn(command).finish();
        assert_eq!(status.code(), Some(2), "{name}: {}", seen.stderr);
        assert_eq!(seen.stderr.lines().count(), 1, "{name}: {}", seen.stderr);
        assert!(
            seen.stderr.contains("bad setting"),
            "{name}: {}",
            seen.stderr
        );
        assert_no_secret(name, &seen, &secrets);
    }

    let mut command = ingress();
    command
        .arg("--help")
        .env("AVSYNC_HMAC_SECRETS", &secrets.setting)
        .env("AVSYNC_AMQP_URL", &url);
    let (status, seen) = Running::spawn(command).finish();
    assert!(status.success());
    assert!(seen.stdout.contains("AVSYNC_HMAC_SECRETS"));
    assert_no_secret("--help", &seen, &secrets);
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}
