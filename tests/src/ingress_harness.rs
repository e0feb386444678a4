//! Starts the real ingress in-process (exactly as `avsync-ingress` does) on 127.0.0.1:0, and
//! signs requests the way senders do, with an HMAC implementation independent of the ingress's.

use crate::support;
use avsync_ingress::settings::{SecretString, Settings};
use avsync_ingress::verify::Clock;
use avsync_ingress::Tuning;
use avsync_shared::config::CommonArgs;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WEBHOOK_PATH: &str = "/webhooks/authvital";

pub struct TestIngress {
    /// `http://127.0.0.1:<port>`; webhooks go to `{base_url}/webhooks/authvital`.
    pub base_url: String,
    /// `http://127.0.0.1:<port>` of `/metrics`, `/healthz`, `/readyz`.
    pub metrics_url: String,
    /// The configured Standard Webhooks secret (`whsec_…`); empty when started with other secrets.
    pub secret: String,
    client: reqwest::Client,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Settings for a test instance: both listeners on 127.0.0.1:0, the local broker, a 2 s publish
/// timeout, the given `AVSYNC_HMAC_SECRETS` value, room for a thousand concurrent requests
/// (connection, request and pending-publish bounds of 2,048, 1,024 and 1,024), and the
/// production defaults otherwise.
pub fn settings(prefix: &str, partitions: u16, hmac_secrets: &str) -> Settings {
    Settings {
        common: CommonArgs {
            amqp_url: support::AMQP_URL.to_owned(),
            topology: prefix.to_owned(),
            partitions,
            metrics_listen: "127.0.0.1:0".parse().expect("address"),
            log_format: "text".to_owned(),
        },
        listen: "127.0.0.1:0".parse().expect("address"),
        hmac_secrets: Some(SecretString::new(hmac_secrets)),
        jwks_url: None,
        timestamp_tolerance_secs: 300,
        max_body_bytes: 262_144,
        publish_timeout: Duration::from_secs(2),
        max_pending_publishes: 1024,
        header_read_timeout: Duration::from_secs(10),
        max_http_connections: 2048,
        max_concurrent_requests: 1024,
        max_headers: 64,
        max_header_bytes: 16_384,
        jwks_refresh_interval: Duration::from_secs(300),
    }
}

/// A fresh random Standard Webhooks secret.
pub fn new_whsec_secret() -> String {
    format!("whsec_{}", STANDARD.encode(rand::random::<[u8; 32]>()))
}

impl TestIngress {
    /// An ingress on topology `prefix` with a generated `whsec_` secret; returns once `/readyz`
    /// is 200 (connected, topology declared).
    pub async fn start(prefix: &str, partitions: u16) -> TestIngress {
        let secret = new_whsec_secret();
        let mut ingress = Self::start_with(settings(prefix, partitions, &secret), None).await;
        ingress.secret = secret;
        ingress.wait_ready().await;
        ingress
    }

    /// Starts with any settings (and optionally a pinned clock) without waiting for readiness.
    pub async fn start_with(settings: Settings, clock: Option<Arc<dyn Clock>>) -> TestIngress {
        let mut tuning = Tuning::default();
        if let Some(clock) = clock {
            tuning.clock = clock;
        }
        Self::start_tuned(settings, tuning).await
    }

    /// [`Self::start_with`] with any of what only tests tune (the clock, the body read timeout).
    pub async fn start_tuned(settings: Settings, tuning: Tuning) -> TestIngress {
        // Quiet by default: a thousand-request test would print a thousand lines.
        if std::env::var_os("RUST_LOG").is_some() {
            avsync_shared::telemetry::init("text");
        }
        let secret = match &settings.hmac_secrets {
            Some(s) if s.expose().starts_with("whsec_") && !s.expose().contains(',') => {
                s.expose().to_owned()
            }
            _ => String::new(),
        };
        let idle_client = settings.header_read_timeout / 2;
        let shutdown = CancellationToken::new();
        let mut checked = settings.check().expect("usable ingress settings");
        checked.tuning = tuning;
        let running = avsync_ingress::start(checked, shutdown.clone())
            .await
            .expect("ingress starts");
        TestIngress {
            base_url: format!("http://{}", running.addr),
            metrics_url: format!("http://{}", running.metrics_addr),
            secret,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                // Below the ingress's idle timeout (its header read timeout), as a client's must
                // be: a request sent on a connection the server is closing for idleness at that
                // moment fails with a reset, not an answer.
                .pool_idle_timeout(idle_client)
                .build()
                .expect("http client"),
            shutdown,
            handle: Some(running.handle),
        }
    }

    pub fn webhook_url(&self) -> String {
        format!("{}{WEBHOOK_PATH}", self.base_url)
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Waits (at most 30 s) for `/readyz` to answer 200.
    pub async fn wait_ready(&self) {
        support::wait_until("ingress /readyz 200", Duration::from_secs(30), || async {
            (self.readyz().await == 200).then_some(())
        })
        .await;
    }

    /// The status of `/readyz`.
    pub async fn readyz(&self) -> u16 {
        match self
            .client
            .get(format!("{}/readyz", self.metrics_url))
            .send()
            .await
        {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.metrics_url))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Posts `body` signed with Standard Webhooks headers under `self.secret`, timestamp now.
    pub async fn post(&self, body: &[u8]) -> reqwest::Response {
        self.try_post(body).await.expect("POST /webhooks/authvital")
    }

    /// [`post`](Self::post), with a connection that failed (the ingress closed it, for one) as
    /// an error, as a sender that retries network errors sees it.
    pub async fn try_post(&self, body: &[u8]) -> reqwest::Result<reqwest::Response> {
        let id = uuid::Uuid::new_v4().to_string();
        let ts = chrono::Utc::now().timestamp();
        let signature = sign_standard(&self.secret, &id, ts, body);
        self.try_post_with(
            &[
                ("webhook-id", id),
                ("webhook-timestamp", ts.to_string()),
                ("webhook-signature", signature),
            ],
            body,
        )
        .await
    }

    /// Posts `body` with exactly these headers (plus `Content-Type: application/json`).
    pub async fn post_with(&self, headers: &[(&str, String)], body: &[u8]) -> reqwest::Response {
        self.try_post_with(headers, body)
            .await
            .expect("POST /webhooks/authvital")
    }

    async fn try_post_with(
        &self,
        headers: &[(&str, String)],
        body: &[u8],
    ) -> reqwest::Result<reqwest::Response> {
        let mut request = self
            .client
            .post(self.webhook_url())
            .header("content-type", "application/json")
            .body(body.to_vec());
        for (name, value) in headers {
            request = request.header(*name, value.as_str());
        }
        request.send().await
    }

    /// Graceful stop: in-flight requests finish, then the broker connection closes.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(30), handle)
                .await
                .expect("ingress stops within 30 s")
                .expect("ingress task")
                .expect("ingress stops cleanly");
        }
    }
}

impl Drop for TestIngress {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `v1,<base64>` of HMAC-SHA256 over `<msg_id>.<ts>.<body>` under a `whsec_` secret.
pub fn sign_standard(whsec_secret: &str, msg_id: &str, ts: i64, body: &[u8]) -> String {
    let encoded = whsec_secret
        .strip_prefix("whsec_")
        .expect("a whsec_ secret");
    let key = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(encoded.trim_end_matches('='))
        .expect("whsec_ secret is base64");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(format!("{msg_id}.{ts}.").as_bytes());
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// Base64 HMAC-SHA256 over `<ts>.<body>`, for `X-AuthVital-Signature`.
pub fn sign_authvital_hmac(secret: &[u8], ts: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(format!("{ts}.").as_bytes());
    mac.update(body);
    STANDARD.encode(mac.finalize().into_bytes())
}
