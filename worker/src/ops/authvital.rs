//! The client of AuthVital's integration API that `reconcile` reads: the machine token and the
//! tenant-memberships snapshot (see `reference/authvital-integration-api.md`).
//!
//! - The token is asked for with `client_secret_post` only (AuthVital ignores HTTP Basic,
//!   although its discovery document advertises it) and reused until shortly before it expires:
//!   every token request costs AuthVital a bcrypt and is limited to 30 a minute.
//! - Requests are spaced by a client-side rate limit; a `429` holds every request back for its
//!   `Retry-After`. A `5xx` or a transport failure is retried with backoff (AuthVital answers
//!   500 when a member is deleted while it builds the snapshot).
//! - `401`/`403`/`404` are not retried: their errors name the setting or grant to fix.

use crate::metrics::{status_label, ReconcileMetrics};
use avsync_shared::backoff::jittered;
use backon::BackoffBuilder;
use reqwest::StatusCode;
use serde::Deserialize;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// The scope a reconcile needs.
pub const SCOPE: &str = "integration:read";
/// A token is renewed this long before AuthVital says it expires (or at half its life when that
/// is shorter), so that no request goes out with a token that expires on the way.
const TOKEN_MARGIN: Duration = Duration::from_secs(60);
/// The longest a `Retry-After` is obeyed; a longer one is taken as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(120);
/// `429`s in a row before a request gives up.
const MAX_RATE_LIMITED: usize = 5;
/// Attempts of one request that fails with a `5xx` or in transport.
const MAX_ATTEMPTS: usize = 4;
/// How much of an error body is kept in an error message.
const BODY_EXCERPT: usize = 300;

/// The machine client's secret: never shown by `Debug`, logs or errors.
#[derive(Clone)]
pub struct ClientSecret(String);

impl ClientSecret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientSecret(<hidden>)")
    }
}

impl FromStr for ClientSecret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err("is empty".to_owned());
        }
        Ok(Self(s.to_owned()))
    }
}

/// Where and as whom the client reads.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// AuthVital's base URL, without a trailing slash.
    pub base_url: String,
    pub client_id: String,
    pub client_secret: ClientSecret,
    pub timeout: Duration,
    pub requests_per_minute: u32,
}

/// Why a read from AuthVital failed. Each text says what to fix; none holds the secret.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("AuthVital refused the machine client's credentials ({status}: {message}); check AVSYNC_AUTHVITAL_CLIENT_ID and AVSYNC_AUTHVITAL_CLIENT_SECRET, and that the client and its application are active")]
    Credentials { status: u16, message: String },
    #[error("AuthVital refused the scope {SCOPE} ({status}: {message}); add {SCOPE} to the machine client's allowed scopes (m2mAllowedScopes)")]
    Scope { status: u16, message: String },
    #[error("AuthVital does not let the machine client read tenant {tenant} (403: {message}); add an M2M tenant grant for this tenant or mark the client trusted for all tenants")]
    TenantGrant { tenant: String, message: String },
    #[error("AuthVital has no tenant {tenant} (404: {message}); the tenant id is wrong or the tenant was deleted")]
    TenantNotFound { tenant: String, message: String },
    #[error("AuthVital answered {status} to {what}: {message}")]
    Status {
        what: &'static str,
        status: u16,
        message: String,
    },
    #[error("AuthVital kept answering 429 to {what} (the rate limit of AVSYNC_AUTHVITAL_REQUESTS_PER_MINUTE is above what it allows this address)")]
    RateLimited { what: &'static str },
    #[error("AuthVital's answer to {what} does not parse: {source}")]
    Unparsable {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot reach AuthVital at AVSYNC_AUTHVITAL_URL for {what}: {source}")]
    Transport {
        what: &'static str,
        #[source]
        source: reqwest::Error,
    },
}

/// A member as `tenant-memberships` lists it; fields the reconcile does not use are skipped.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Membership {
    pub id: String,
    pub status: MemberStatus,
    pub user: User,
    #[serde(default)]
    pub roles: Vec<Role>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MemberStatus {
    Active,
    Invited,
    Suspended,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    pub id: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub given_name: Option<String>,
    #[serde(default)]
    pub family_name: Option<String>,
}

/// An app role of the membership (AuthVital lists the roles of every app).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Role {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub slug: Option<String>,
    #[serde(default)]
    pub application_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TenantMemberships {
    tenant_id: String,
    memberships: Vec<Membership>,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: u64,
}

/// Nest's error body: `message` is a string or a list of strings.
#[derive(Deserialize)]
struct ErrorBody {
    message: serde_json::Value,
}

fn error_message(body: &str) -> String {
    let message = match serde_json::from_str::<ErrorBody>(body) {
        Ok(ErrorBody {
            message: serde_json::Value::String(s),
        }) => s,
        Ok(ErrorBody { message }) => message.to_string(),
        Err(_) => body.to_owned(),
    };
    message.chars().take(BODY_EXCERPT).collect()
}

struct Token {
    value: String,
    renew_at: Instant,
}

/// One answer: the status and the body, read whole (AuthVital builds the snapshot in memory).
struct Answer {
    status: StatusCode,
    body: String,
}

pub struct AuthVital {
    http: reqwest::Client,
    settings: ApiSettings,
    token: Mutex<Option<Token>>,
    /// The earliest instant the next request may go out.
    next_request: Mutex<Instant>,
    metrics: ReconcileMetrics,
}

impl AuthVital {
    pub fn new(settings: ApiSettings, metrics: ReconcileMetrics) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            http,
            settings,
            token: Mutex::new(None),
            next_request: Mutex::new(Instant::now()),
            metrics,
        })
    }

    fn spacing(&self) -> Duration {
        Duration::from_secs(60) / self.settings.requests_per_minute.max(1)
    }

    /// Waits for this request's turn under the client-side rate limit.
    async fn turn(&self) {
        let wait_until = {
            let mut next = self.next_request.lock().await;
            let now = Instant::now();
            let at = (*next).max(now);
            *next = at + self.spacing();
            at
        };
        tokio::time::sleep_until(wait_until).await;
    }

    /// Holds every request back until `until` (a `429`'s `Retry-After`).
    async fn hold_until(&self, until: Instant) {
        let mut next = self.next_request.lock().await;
        *next = (*next).max(until);
    }

    /// Sends one request built by `build`, under the rate limit, retrying `429` (after its
    /// `Retry-After`), `5xx` and transport failures.
    async fn send(
        &self,
        what: &'static str,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<Answer, ApiError> {
        let mut backoff = jittered(Duration::from_millis(200), Duration::from_secs(5))
            .with_max_times(MAX_ATTEMPTS - 1)
            .build();
        let mut rate_limited = 0;
        loop {
            self.turn().await;
            let result = match build().send().await {
                Ok(response) => {
                    let status = response.status();
                    let retry_after = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    match response.text().await {
                        Ok(body) => Ok((Answer { status, body }, retry_after)),
                        Err(source) => Err(source),
                    }
                }
                Err(source) => Err(source),
            };
            let status = result.as_ref().ok().map(|(answer, _)| answer.status);
            self.metrics.api_call(status_label(status));
            let retryable_after = match result {
                Ok((answer, retry_after)) if answer.status == StatusCode::TOO_MANY_REQUESTS => {
                    rate_limited += 1;
                    if rate_limited >= MAX_RATE_LIMITED {
                        return Err(ApiError::RateLimited { what });
                    }
                    let wait = retry_after.unwrap_or(Duration::from_secs(1));
                    let wait = wait.min(MAX_RETRY_AFTER);
                    tracing::warn!(
                        what,
                        retry_after_secs = wait.as_secs(),
                        "AuthVital rate limit hit; waiting"
                    );
                    self.hold_until(Instant::now() + wait).await;
                    continue;
                }
                Ok((answer, _)) if answer.status.is_server_error() => {
                    let err = ApiError::Status {
                        what,
                        status: answer.status.as_u16(),
                        message: error_message(&answer.body),
                    };
                    (err, backoff.next())
                }
                Ok((answer, _)) => return Ok(answer),
                Err(source) => (ApiError::Transport { what, source }, backoff.next()),
            };
            match retryable_after {
                (err, Some(delay)) => {
                    tracing::warn!(what, error = %err, ?delay, "AuthVital request failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                (err, None) => return Err(err),
            }
        }
    }

    /// A valid access token: the cached one, or a new one.
    async fn token(&self) -> Result<String, ApiError> {
        let mut cached = self.token.lock().await;
        if let Some(token) = cached.as_ref() {
            if Instant::now() < token.renew_at {
                return Ok(token.value.clone());
            }
        }
        let what = "the token request";
        let url = format!("{}/oauth/token", self.settings.base_url);
        let answer = self
            .send(what, || {
                self.http.post(&url).form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", self.settings.client_id.as_str()),
                    ("client_secret", self.settings.client_secret.expose()),
                    ("scope", SCOPE),
                ])
            })
            .await?;
        let status = answer.status.as_u16();
        if !answer.status.is_success() {
            let message = error_message(&answer.body);
            return Err(match status {
                401 => ApiError::Credentials { status, message },
                400 if message.contains("invalid_scope") => ApiError::Scope { status, message },
                // AuthVital answers 400 "client_id and client_secret are required" to a request
                // it cannot read the credentials of.
                400 => ApiError::Credentials { status, message },
                _ => ApiError::Status {
                    what,
                    status,
                    message,
                },
            });
        }
        let token: TokenAnswer = serde_json::from_str(&answer.body)
            .map_err(|source| ApiError::Unparsable { what, source })?;
        let life = Duration::from_secs(token.expires_in);
        let renew_at = Instant::now() + life.saturating_sub(TOKEN_MARGIN.min(life / 2));
        *cached = Some(Token {
            value: token.access_token.clone(),
            renew_at,
        });
        Ok(token.access_token)
    }

    async fn forget_token(&self) {
        *self.token.lock().await = None;
    }

    /// Every membership of `tenant`, with app roles (`includeRoles=true`: without it AuthVital
    /// lists every member with no roles). The answer is one unpaginated list.
    pub async fn tenant_memberships(&self, tenant: &str) -> Result<Vec<Membership>, ApiError> {
        let what = "tenant-memberships";
        let url = format!(
            "{}/api/integration/tenant-memberships",
            self.settings.base_url
        );
        let mut renewed = false;
        loop {
            let token = self.token().await?;
            let answer = self
                .send(what, || {
                    self.http
                        .get(&url)
                        .query(&[("tenantId", tenant), ("includeRoles", "true")])
                        .bearer_auth(&token)
                })
                .await?;
            let status = answer.status.as_u16();
            let message = || error_message(&answer.body);
            match status {
                200..=299 => {
                    let parsed: TenantMemberships = serde_json::from_str(&answer.body)
                        .map_err(|source| ApiError::Unparsable { what, source })?;
                    if parsed.tenant_id != tenant {
                        return Err(ApiError::Status {
                            what,
                            status,
                            message: format!(
                                "the answer is about tenant {:?}, not {tenant:?}",
                                parsed.tenant_id
                            ),
                        });
                    }
                    return Ok(parsed.memberships);
                }
                // A token AuthVital no longer accepts (its signing key was rotated away, or it
                // expired early): ask for a new one, once.
                401 if !renewed => {
                    renewed = true;
                    self.forget_token().await;
                }
                401 => {
                    return Err(ApiError::Credentials {
                        status,
                        message: message(),
                    })
                }
                403 if message().contains("insufficient_scope") => {
                    return Err(ApiError::Scope {
                        status,
                        message: message(),
                    })
                }
                403 => {
                    return Err(ApiError::TenantGrant {
                        tenant: tenant.to_owned(),
                        message: message(),
                    })
                }
                404 => {
                    return Err(ApiError::TenantNotFound {
                        tenant: tenant.to_owned(),
                        message: message(),
                    })
                }
                _ => {
                    return Err(ApiError::Status {
                        what,
                        status,
                        message: message(),
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_is_never_shown() {
        let secret: ClientSecret = "s3cret".parse().unwrap();
        assert!(!format!("{secret:?}").contains("s3cret"));
        assert!("".parse::<ClientSecret>().is_err());
    }

    #[test]
    fn the_snapshot_parses_as_authvital_sends_it() {
        let body = r#"{"tenantId":"t1","tenantName":"T","tenantSlug":"t","initiateLoginUri":null,
            "memberships":[{"id":"m1","status":"ACTIVE","joinedAt":"2026-08-21T01:40:03.512Z",
            "createdAt":"2026-08-21T01:40:03.512Z","user":{"id":"u1","email":"a@x","givenName":null,
            "familyName":"F"},"roles":[{"id":"r1","name":"Admin","slug":"admin","applicationId":"app",
            "applicationName":"App"}]}],"totalCount":1}"#;
        let parsed: TenantMemberships = serde_json::from_str(body).unwrap();
        assert_eq!(parsed.memberships.len(), 1);
        let m = &parsed.memberships[0];
        assert_eq!(m.status, MemberStatus::Active);
        assert_eq!(m.user.given_name, None);
        assert_eq!(m.roles[0].application_id.as_deref(), Some("app"));
        let unknown = body.replace("ACTIVE", "PENDING");
        assert!(serde_json::from_str::<TenantMemberships>(&unknown).is_err());
    }

    #[test]
    fn nest_error_messages() {
        assert_eq!(
            error_message(r#"{"statusCode":403,"message":"nope","error":"Forbidden"}"#),
            "nope"
        );
        assert_eq!(
            error_message(r#"{"statusCode":400,"message":["a","b"]}"#),
            r#"["a","b"]"#
        );
        assert_eq!(error_message("plain"), "plain");
    }
}
