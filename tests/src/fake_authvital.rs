//! A fake of AuthVital's integration API for reconcile tests: the token endpoint and
//! `tenant-memberships`, with the shapes and quirks of `reference/authvital-integration-api.md`.
//!
//! - `POST /oauth/token` reads only form (or JSON) fields: HTTP Basic gets 400, as AuthVital's
//!   controller never reads the header; a wrong secret gets 401.
//! - `GET /api/integration/tenant-memberships` needs a token it issued (401), a tenant grant
//!   (403 naming the tenant), and lists roles only with `includeRoles=true` literally.
//! - The test can make the next answers `429` with `Retry-After: 1` or `500`, and slow answers.

use axum::extract::rejection::FormRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub const CLIENT_ID: &str = "avsync-reconcile-test";
pub const CLIENT_SECRET: &str = "fake-machine-secret";
pub const APPLICATION_ID: &str = "app_cuid_1";

/// One member as the fake lists it.
#[derive(Debug, Clone)]
pub struct FakeMember {
    pub user: String,
    /// `ACTIVE`, `SUSPENDED` or `INVITED`.
    pub status: &'static str,
    pub email: Option<String>,
    pub given_name: Option<String>,
    pub family_name: Option<String>,
    /// `(slug, application id)` of each role.
    pub roles: Vec<(String, String)>,
}

impl FakeMember {
    /// An active member with an email, a given name and the `viewer` role of [`APPLICATION_ID`].
    pub fn active(user: &str) -> Self {
        Self {
            user: user.to_owned(),
            status: "ACTIVE",
            email: Some(format!("{user}@example.com")),
            given_name: Some(format!("Given {user}")),
            family_name: None,
            roles: vec![("viewer".to_owned(), APPLICATION_ID.to_owned())],
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "id": format!("mem-{}", self.user),
            "status": self.status,
            "joinedAt": "2026-08-21T01:40:03.512Z",
            "createdAt": "2026-08-21T01:40:03.512Z",
            "user": {
                "id": self.user,
                "email": self.email,
                "givenName": self.given_name,
                "familyName": self.family_name,
            },
            "roles": self.roles.iter().map(|(slug, app)| json!({
                "id": format!("role-{slug}"),
                "name": slug.to_uppercase(),
                "slug": slug,
                "applicationId": app,
                "applicationName": "App",
            })).collect::<Vec<_>>(),
        })
    }
}

#[derive(Default)]
struct Fake {
    members: Mutex<BTreeMap<String, Vec<FakeMember>>>,
    grants: Mutex<BTreeSet<String>>,
    tokens: Mutex<BTreeSet<String>>,
    delay: Mutex<Duration>,
    rate_limit_next: AtomicUsize,
    fail_next: AtomicUsize,
    token_requests: AtomicUsize,
    basic_auth_requests: AtomicUsize,
    membership_requests: AtomicUsize,
    without_include_roles: AtomicUsize,
}

pub struct FakeAuthVital {
    pub url: String,
    fake: Arc<Fake>,
    stop: CancellationToken,
}

fn nest_error(status: StatusCode, message: &str) -> Response {
    let body = json!({
        "statusCode": status.as_u16(),
        "message": message,
        "error": status.canonical_reason().unwrap_or(""),
    });
    (status, Json(body)).into_response()
}

async fn token(
    State(fake): State<Arc<Fake>>,
    headers: HeaderMap,
    form: Result<Form<HashMap<String, String>>, FormRejection>,
) -> Response {
    fake.token_requests.fetch_add(1, Ordering::SeqCst);
    let basic = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Basic "));
    if basic {
        fake.basic_auth_requests.fetch_add(1, Ordering::SeqCst);
    }
    let form = form.map(|Form(f)| f).unwrap_or_default();
    let (Some(id), Some(secret)) = (form.get("client_id"), form.get("client_secret")) else {
        return nest_error(
            StatusCode::BAD_REQUEST,
            "client_id and client_secret are required for client_credentials grant",
        );
    };
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return nest_error(StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    if id != CLIENT_ID {
        return nest_error(StatusCode::UNAUTHORIZED, "Invalid client_id");
    }
    if secret != CLIENT_SECRET {
        return nest_error(StatusCode::UNAUTHORIZED, "Invalid client_secret");
    }
    if let Some(scope) = form.get("scope") {
        if scope.split(' ').any(|s| s != "integration:read") {
            return nest_error(StatusCode::BAD_REQUEST, "invalid_scope: not allowed");
        }
    }
    let value = format!("tok-{}", uuid::Uuid::new_v4().simple());
    fake.tokens.lock().expect("lock").insert(value.clone());
    Json(json!({
        "access_token": value,
        "token_type": "Bearer",
        "expires_in": 3600,
        "scope": "integration:read",
    }))
    .into_response()
}

async fn memberships(
    State(fake): State<Arc<Fake>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    fake.membership_requests.fetch_add(1, Ordering::SeqCst);
    if take_one(&fake.rate_limit_next) {
        let mut response = nest_error(
            StatusCode::TOO_MANY_REQUESTS,
            "ThrottlerException: Too Many Requests",
        );
        response
            .headers_mut()
            .insert("retry-after", "1".parse().expect("header value"));
        return response;
    }
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let known = bearer.is_some_and(|t| fake.tokens.lock().expect("lock").contains(&t));
    if !known {
        return nest_error(StatusCode::UNAUTHORIZED, "Invalid or expired access token");
    }
    let Some(tenant) = query.get("tenantId").cloned() else {
        return nest_error(StatusCode::BAD_REQUEST, "tenantId is required");
    };
    if !fake.grants.lock().expect("lock").contains(&tenant) {
        return nest_error(
            StatusCode::FORBIDDEN,
            &format!("M2M client is not authorized for tenant '{tenant}'"),
        );
    }
    let delay = *fake.delay.lock().expect("lock");
    tokio::time::sleep(delay).await;
    if take_one(&fake.fail_next) {
        return nest_error(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error");
    }
    let include_roles = query.get("includeRoles").map(String::as_str) == Some("true");
    if !include_roles {
        fake.without_include_roles.fetch_add(1, Ordering::SeqCst);
    }
    let Some(members) = fake.members.lock().expect("lock").get(&tenant).cloned() else {
        return nest_error(StatusCode::NOT_FOUND, "Tenant not found");
    };
    let memberships: Vec<Value> = members
        .iter()
        .map(|m| {
            let mut m = m.to_json();
            if !include_roles {
                m["roles"] = json!([]);
            }
            m
        })
        .collect();
    Json(json!({
        "tenantId": tenant,
        "tenantName": format!("Tenant {tenant}"),
        "tenantSlug": tenant,
        "initiateLoginUri": null,
        "totalCount": memberships.len(),
        "memberships": memberships,
    }))
    .into_response()
}

fn take_one(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl FakeAuthVital {
    pub async fn start() -> Self {
        let fake = Arc::new(Fake::default());
        let app = Router::new()
            .route("/oauth/token", post(token))
            .route("/api/integration/tenant-memberships", get(memberships))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake AuthVital");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(stopped.cancelled_owned())
                .await;
        });
        Self { url, fake, stop }
    }

    /// The tenant's members; also grants the machine client the tenant.
    pub fn set_members(&self, tenant: &str, members: Vec<FakeMember>) {
        self.grant(tenant);
        self.fake
            .members
            .lock()
            .expect("lock")
            .insert(tenant.to_owned(), members);
    }

    pub fn grant(&self, tenant: &str) {
        self.fake
            .grants
            .lock()
            .expect("lock")
            .insert(tenant.to_owned());
    }

    /// The next `n` membership requests get 429 with `Retry-After: 1`.
    pub fn rate_limit_next(&self, n: usize) {
        self.fake.rate_limit_next.store(n, Ordering::SeqCst);
    }

    /// The next `n` membership requests (past the rate limit) get 500.
    pub fn fail_next(&self, n: usize) {
        self.fake.fail_next.store(n, Ordering::SeqCst);
    }

    /// Every membership answer waits this long first.
    pub fn set_delay(&self, delay: Duration) {
        *self.fake.delay.lock().expect("lock") = delay;
    }

    pub fn token_requests(&self) -> usize {
        self.fake.token_requests.load(Ordering::SeqCst)
    }

    pub fn basic_auth_requests(&self) -> usize {
        self.fake.basic_auth_requests.load(Ordering::SeqCst)
    }

    pub fn membership_requests(&self) -> usize {
        self.fake.membership_requests.load(Ordering::SeqCst)
    }

    /// Membership requests that did not ask for roles (`includeRoles=true`).
    pub fn requests_without_roles(&self) -> usize {
        self.fake.without_include_roles.load(Ordering::SeqCst)
    }

    /// The worker flags that point a reconcile at this fake.
    pub fn flags(&self) -> Vec<String> {
        [
            "--authvital-url",
            &self.url,
            "--authvital-client-id",
            CLIENT_ID,
            "--authvital-client-secret",
            CLIENT_SECRET,
            "--application-id",
            APPLICATION_ID,
            "--authvital-requests-per-minute",
            "6000",
            "--authvital-timeout",
            "10s",
        ]
        .map(str::to_owned)
        .to_vec()
    }
}

impl Drop for FakeAuthVital {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
