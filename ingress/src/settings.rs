//! Every ingress setting: a flag with an environment fallback, then the checks clap cannot do
//! without echoing a secret.

use crate::verify::HmacKey;
use crate::Tuning;
use avsync_shared::config::{parse_duration, BadSetting, CommonArgs};
use avsync_shared::topology::Topology;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use clap::Parser;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "avsync-ingress",
    version,
    about = "Verifies AuthVital webhooks and queues them, byte for byte, on RabbitMQ by tenant"
)]
pub struct Settings {
    #[command(flatten)]
    pub common: CommonArgs,

    /// The public listener: POST /webhooks/authvital only.
    #[arg(
        long,
        env = "AVSYNC_LISTEN",
        value_name = "ADDR",
        default_value = "0.0.0.0:8080"
    )]
    pub listen: SocketAddr,

    /// Comma-separated secrets: `whsec_<base64>` (Standard Webhooks) or `<key-id>=<secret>`.
    #[arg(long, env = "AVSYNC_HMAC_SECRETS", value_name = "SECRETS", hide_env_values = true, value_parser = secret_value)]
    pub hmac_secrets: Option<SecretString>,

    /// AuthVital's /.well-known/jwks.json, for RSA-SHA256 signatures.
    #[arg(long, env = "AVSYNC_JWKS_URL", value_name = "URL")]
    pub jwks_url: Option<String>,

    /// Allowed clock distance, either way, of a signature timestamp.
    #[arg(
        long,
        env = "AVSYNC_TIMESTAMP_TOLERANCE_SECS",
        value_name = "SECS",
        default_value_t = 300
    )]
    pub timestamp_tolerance_secs: u64,

    /// Larger bodies get 413.
    #[arg(
        long,
        env = "AVSYNC_MAX_BODY_BYTES",
        value_name = "BYTES",
        default_value_t = 262_144
    )]
    pub max_body_bytes: usize,

    /// Longest wait for the broker's confirm before answering 503 (e.g. 500ms, 10s).
    #[arg(long, env = "AVSYNC_PUBLISH_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub publish_timeout: Duration,

    /// Most webhooks waiting for the broker's confirm at once; beyond it 503 `overloaded`.
    #[arg(
        long,
        env = "AVSYNC_MAX_PENDING_PUBLISHES",
        value_name = "COUNT",
        default_value_t = 256
    )]
    pub max_pending_publishes: usize,

    /// Time for a request line and its headers to arrive, from the connection's start or from
    /// the previous answer on a keep-alive connection (so also the idle timeout).
    #[arg(long, env = "AVSYNC_HEADER_READ_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,

    /// Most open connections on AVSYNC_LISTEN. When all are open, a new one takes the place of
    /// the one that has waited longest for its request head; when every one is busy with a
    /// request, the new one is closed at once.
    #[arg(
        long,
        env = "AVSYNC_MAX_HTTP_CONNECTIONS",
        value_name = "COUNT",
        default_value_t = DEFAULT_MAX_HTTP_CONNECTIONS
    )]
    pub max_http_connections: usize,

    /// Most requests past their headers at once (body being read, verified or published); more
    /// get 503 `overloaded`. Bounds the memory of bodies to this × AVSYNC_MAX_BODY_BYTES.
    #[arg(
        long,
        env = "AVSYNC_MAX_CONCURRENT_REQUESTS",
        value_name = "COUNT",
        default_value_t = DEFAULT_MAX_CONCURRENT_REQUESTS
    )]
    pub max_concurrent_requests: usize,

    /// Most headers in one request; more get 431.
    #[arg(
        long,
        env = "AVSYNC_MAX_HEADERS",
        value_name = "COUNT",
        default_value_t = 64
    )]
    pub max_headers: usize,

    /// Most bytes of a request line and its headers together; more get 431.
    #[arg(
        long,
        env = "AVSYNC_MAX_HEADER_BYTES",
        value_name = "BYTES",
        default_value_t = 16_384
    )]
    pub max_header_bytes: usize,

    /// How often the JWKS is fetched again, so that a key AuthVital withdrew stops verifying.
    #[arg(long, env = "AVSYNC_JWKS_REFRESH_INTERVAL", value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub jwks_refresh_interval: Duration,
}

/// A connection that waits for its head costs a descriptor and about 16 KiB (hyper's 8 KiB read
/// buffer is half of it), so thousands cost little; what makes a sender wait is a cap that stalled
/// connections can fill. 8,192 of them are about 128 MiB.
pub const DEFAULT_MAX_HTTP_CONNECTIONS: usize = 8_192;
/// 256 bodies of the default 256 KiB are 64 MiB at most; with the connections, within the
/// Kubernetes manifest's 256 MiB.
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 256;

/// Beyond this many connections or pending publishes a bound protects nothing.
const MAX_COUNT: usize = 1_000_000;
/// hyper reads headers into a buffer of at least 8 KiB and at most this.
const MAX_HEADER_BYTES: usize = 1 << 20;

/// A setting's raw text that must never be printed: its `Debug` is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(<redacted>)")
    }
}

fn secret_value(value: &str) -> Result<SecretString, String> {
    Ok(SecretString::new(value))
}

const HMAC_SECRETS: &str = "AVSYNC_HMAC_SECRETS";
const JWKS_URL: &str = "AVSYNC_JWKS_URL";

/// The Standard Webhooks prefix of a secret whose key is the base64-decoded rest.
pub const WHSEC_PREFIX: &str = "whsec_";

/// Standard alphabet; the padding may be there or not, as secrets are copied by hand.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// The settings once checked: what [`crate::start`] takes, with what needed more than clap
/// parsed into its typed value.
#[derive(Debug, Clone)]
pub struct Checked {
    pub settings: Settings,
    pub hmac: Vec<HmacKey>,
    pub jwks_url: Option<reqwest::Url>,
    pub topology: Topology,
    pub tuning: Tuning,
}

impl Settings {
    /// Everything clap cannot check: the secrets, the JWKS URL, the topology and the limits. A
    /// failure names the setting and, for a secret, only the entry's position.
    pub fn check(self) -> Result<Checked, BadSetting> {
        let topology = self.common.check()?;
        let hmac = match &self.hmac_secrets {
            Some(raw) if !raw.expose().trim().is_empty() => parse_hmac_secrets(raw.expose())?,
            _ => Vec::new(),
        };
        let jwks_url = match self.jwks_url.as_deref().map(str::trim) {
            Some(url) if !url.is_empty() => Some(parse_jwks_url(url)?),
            _ => None,
        };
        if hmac.is_empty() && jwks_url.is_none() {
            return Err(BadSetting::new(
                HMAC_SECRETS,
                "set AVSYNC_HMAC_SECRETS or AVSYNC_JWKS_URL (or both); without either no webhook can be verified",
            ));
        }
        if self.max_body_bytes == 0 {
            return Err(BadSetting::new(
                "AVSYNC_MAX_BODY_BYTES",
                "must be at least 1",
            ));
        }
        if self.publish_timeout.is_zero() {
            return Err(BadSetting::new(
                "AVSYNC_PUBLISH_TIMEOUT",
                "must be longer than 0ms",
            ));
        }
        for (name, value, least, most) in [
            (
                "AVSYNC_MAX_PENDING_PUBLISHES",
                self.max_pending_publishes,
                1,
                MAX_COUNT,
            ),
            (
                "AVSYNC_MAX_HTTP_CONNECTIONS",
                self.max_http_connections,
                1,
                MAX_COUNT,
            ),
            (
                "AVSYNC_MAX_CONCURRENT_REQUESTS",
                self.max_concurrent_requests,
                1,
                MAX_COUNT,
            ),
            ("AVSYNC_MAX_HEADERS", self.max_headers, 8, 1024),
            (
                "AVSYNC_MAX_HEADER_BYTES",
                self.max_header_bytes,
                1024,
                MAX_HEADER_BYTES,
            ),
        ] {
            if !(least..=most).contains(&value) {
                return Err(BadSetting::new(
                    name,
                    format!("must be from {least} to {most}"),
                ));
            }
        }
        for (name, value) in [
            ("AVSYNC_HEADER_READ_TIMEOUT", self.header_read_timeout),
            ("AVSYNC_JWKS_REFRESH_INTERVAL", self.jwks_refresh_interval),
        ] {
            if value.is_zero() {
                return Err(BadSetting::new(name, "must be longer than 0ms"));
            }
        }
        if i64::try_from(self.timestamp_tolerance_secs).is_err() {
            return Err(BadSetting::new(
                "AVSYNC_TIMESTAMP_TOLERANCE_SECS",
                "is too large",
            ));
        }
        Ok(Checked {
            settings: self,
            hmac,
            jwks_url,
            topology,
            tuning: Tuning::default(),
        })
    }
}

fn parse_jwks_url(url: &str) -> Result<reqwest::Url, BadSetting> {
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| BadSetting::new(JWKS_URL, format!("not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(BadSetting::new(JWKS_URL, "must be an http or https URL"));
    }
    Ok(parsed)
}

/// Parses `AVSYNC_HMAC_SECRETS` by the contract's rules. Surrounding whitespace of an entry is
/// ignored so that `a=x, b=y` works; inside an entry every byte counts.
pub fn parse_hmac_secrets(raw: &str) -> Result<Vec<HmacKey>, BadSetting> {
    let mut keys: Vec<HmacKey> = Vec::new();
    for (index, entry) in raw.split(',').map(str::trim).enumerate() {
        let position = index + 1;
        let key = if let Some(encoded) = entry.strip_prefix(WHSEC_PREFIX) {
            let secret = LENIENT_BASE64.decode(encoded).map_err(|_| {
                BadSetting::new(
                    HMAC_SECRETS,
                    format!("entry {position} starts with `whsec_` but the rest is not base64"),
                )
            })?;
            if secret.is_empty() {
                return Err(BadSetting::new(
                    HMAC_SECRETS,
                    format!("entry {position} is an empty `whsec_` secret"),
                ));
            }
            HmacKey::unnamed(secret)
        } else if let Some((id, secret)) = entry.split_once('=') {
            if id.is_empty() || secret.is_empty() {
                return Err(BadSetting::new(
                    HMAC_SECRETS,
                    format!("entry {position} needs a key id and a secret: `<key-id>=<secret>`"),
                ));
            }
            if keys.iter().any(|k| k.id() == Some(id)) {
                return Err(BadSetting::new(
                    HMAC_SECRETS,
                    format!("entry {position} repeats key id `{id}`"),
                ));
            }
            HmacKey::named(id, secret.as_bytes().to_vec())
        } else {
            return Err(BadSetting::new(
                HMAC_SECRETS,
                format!("entry {position} is neither `whsec_<base64>` nor `<key-id>=<secret>`"),
            ));
        };
        keys.push(key);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn settings(args: &[&str]) -> Settings {
        let mut all = vec!["avsync-ingress"];
        all.extend_from_slice(args);
        Settings::try_parse_from(all).expect("parses")
    }

    #[test]
    fn parses_both_kinds_of_secret() {
        let keys = parse_hmac_secrets(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw, k1=av-secret-one,k2=a=b,whsec_AAEC",
        )
        .unwrap();
        assert_eq!(keys.len(), 4);
        assert_eq!(keys[0].id(), None);
        assert_eq!(keys[1].id(), Some("k1"));
        assert_eq!(keys[1].secret(), b"av-secret-one");
        assert_eq!(keys[2].id(), Some("k2"));
        assert_eq!(keys[2].secret(), b"a=b", "split at the first `=`");
        assert_eq!(keys[3].secret(), &[0, 1, 2]);
    }

    #[test]
    fn whsec_padding_is_optional() {
        let padded =
            parse_hmac_secrets("whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=").unwrap();
        let bare = parse_hmac_secrets("whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8").unwrap();
        assert_eq!(padded[0].secret(), bare[0].secret());
        assert_eq!(padded[0].secret(), (0u8..32).collect::<Vec<_>>().as_slice());
    }

    #[test]
    fn bad_entries_name_the_setting_and_never_the_secret() {
        for (raw, secret) in [
            ("plainsecretvalue", "plainsecretvalue"),
            ("whsec_not*base64!", "not*base64!"),
            ("whsec_", "no secret to leak"),
            ("=hiddenvalue", "hiddenvalue"),
            ("kid=", "kid="),
            ("k1=hiddenone,k1=hiddentwo", "hiddentwo"),
            ("k1=hiddenone,,k2=x", "hiddenone"),
        ] {
            let err = parse_hmac_secrets(raw).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("AVSYNC_HMAC_SECRETS"), "{text}");
            assert!(!text.contains(secret), "{text} leaks {secret}");
        }
    }

    #[test]
    fn refuses_to_start_without_any_key() {
        let err = settings(&[]).check().unwrap_err();
        assert!(err.to_string().contains("AVSYNC_JWKS_URL"), "{err}");
        let err = settings(&["--hmac-secrets", " "]).check().unwrap_err();
        assert_eq!(err.name, "AVSYNC_HMAC_SECRETS");
    }

    #[test]
    fn either_kind_of_key_is_enough() {
        let keys = settings(&["--hmac-secrets", "k=v"]).check().unwrap();
        assert_eq!(keys.hmac.len(), 1);
        assert!(keys.jwks_url.is_none());
        let keys = settings(&["--jwks-url", "http://127.0.0.1:1/.well-known/jwks.json"])
            .check()
            .unwrap();
        assert!(keys.hmac.is_empty());
        assert!(keys.jwks_url.is_some());
    }

    #[test]
    fn rejects_unusable_limits_and_urls() {
        let bad = |args: &[&str]| settings(args).check().unwrap_err().name;
        assert_eq!(
            bad(&["--hmac-secrets", "k=v", "--max-body-bytes", "0"]),
            "AVSYNC_MAX_BODY_BYTES"
        );
        assert_eq!(
            bad(&["--hmac-secrets", "k=v", "--publish-timeout", "0s"]),
            "AVSYNC_PUBLISH_TIMEOUT"
        );
        assert_eq!(bad(&["--jwks-url", "not a url"]), "AVSYNC_JWKS_URL");
        assert_eq!(
            bad(&["--jwks-url", "ftp://host/jwks.json"]),
            "AVSYNC_JWKS_URL"
        );
        for (flag, value, name) in [
            (
                "--max-pending-publishes",
                "0",
                "AVSYNC_MAX_PENDING_PUBLISHES",
            ),
            ("--max-http-connections", "0", "AVSYNC_MAX_HTTP_CONNECTIONS"),
            (
                "--max-concurrent-requests",
                "0",
                "AVSYNC_MAX_CONCURRENT_REQUESTS",
            ),
            ("--max-headers", "2", "AVSYNC_MAX_HEADERS"),
            ("--max-header-bytes", "100", "AVSYNC_MAX_HEADER_BYTES"),
            ("--header-read-timeout", "0s", "AVSYNC_HEADER_READ_TIMEOUT"),
            (
                "--jwks-refresh-interval",
                "0m",
                "AVSYNC_JWKS_REFRESH_INTERVAL",
            ),
        ] {
            assert_eq!(bad(&["--hmac-secrets", "k=v", flag, value]), name);
        }
        assert!(Settings::try_parse_from(["x", "--publish-timeout", "10"]).is_err());
    }

    #[test]
    fn an_unparseable_amqp_url_is_a_bad_setting_that_never_shows_it() {
        for url in [
            "guest:hidden-pass@127.0.0.1",
            "amqp://guest:hidden-pass@127.0.0.1:99999/%2f",
            "http://guest:hidden-pass@127.0.0.1/",
            "amqp://guest:hidden-pass@127.0.0.1/%2f?heartbeat=often",
        ] {
            let err = settings(&["--hmac-secrets", "k=v", "--amqp-url", url])
                .check()
                .unwrap_err();
            assert_eq!(err.name, "AVSYNC_AMQP_URL", "{url}");
            assert!(!err.to_string().contains("hidden-pass"), "{err}");
        }
        for url in [
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "amqps://user:p%40ss@broker.internal/vhost",
            "amqp://localhost",
        ] {
            assert!(
                settings(&["--hmac-secrets", "k=v", "--amqp-url", url])
                    .check()
                    .is_ok(),
                "{url}"
            );
        }
    }

    #[test]
    fn defaults_follow_the_contract() {
        let s = settings(&[]);
        assert_eq!(s.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(s.common.metrics_listen.to_string(), "0.0.0.0:9090");
        assert_eq!(s.timestamp_tolerance_secs, 300);
        assert_eq!(s.max_body_bytes, 262_144);
        assert_eq!(s.publish_timeout, Duration::from_secs(10));
        assert_eq!(s.max_pending_publishes, 256);
        assert_eq!(s.header_read_timeout, Duration::from_secs(10));
        assert_eq!(s.max_http_connections, 8_192);
        assert_eq!(s.max_concurrent_requests, 256);
        assert_eq!(s.max_headers, 64);
        assert_eq!(s.max_header_bytes, 16_384);
        assert_eq!(s.jwks_refresh_interval, Duration::from_secs(300));
    }

    #[test]
    fn help_lists_every_setting_with_its_default() {
        let help = Settings::command().render_long_help().to_string();
        for name in [
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
            "AVSYNC_MAX_PENDING_PUBLISHES",
            "AVSYNC_HEADER_READ_TIMEOUT",
            "AVSYNC_MAX_HTTP_CONNECTIONS",
            "AVSYNC_MAX_CONCURRENT_REQUESTS",
            "AVSYNC_MAX_HEADERS",
            "AVSYNC_MAX_HEADER_BYTES",
            "AVSYNC_JWKS_REFRESH_INTERVAL",
        ] {
            assert!(help.contains(name), "--help lacks {name}");
        }
        for default in [
            "0.0.0.0:8080",
            "0.0.0.0:9090",
            "[default: 300]",
            "262144",
            "[default: 10s]",
            "[default: 256]",
            "[default: 8192]",
            "[default: 64]",
            "[default: 16384]",
            "[default: 5m]",
        ] {
            assert!(help.contains(default), "--help lacks {default}");
        }
    }

    #[test]
    fn debug_never_shows_the_secrets() {
        let s = settings(&["--hmac-secrets", "k1=topsecretvalue"]);
        assert!(!format!("{s:?}").contains("topsecretvalue"));
        let keys = s.check().unwrap();
        assert!(!format!("{keys:?}").contains("topsecretvalue"));
    }
}
