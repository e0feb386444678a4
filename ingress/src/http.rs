//! The public listener: `POST /webhooks/authvital`, and the one error type that turns every
//! refusal into its status and JSON body.
//!
//! Checks run in the contract's order: body size (413), signature (401), content (400),
//! publish (202 or 503). Nothing that fails a check is published.

use crate::metrics::{Metrics, Outcome};
use crate::publish::{PublishError, Publisher};
use crate::verify::{SignatureFailure, Verifier};
use avsync_shared::{Envelope, EnvelopeError};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Serialize;
use std::sync::Arc;

pub const WEBHOOK_PATH: &str = "/webhooks/authvital";
/// What a 503 asks the sender to wait before retrying, in seconds.
pub const RETRY_AFTER_SECS: u32 = 5;

pub struct AppState {
    pub verifier: Verifier,
    pub publisher: Publisher,
    pub metrics: Metrics,
    pub max_body_bytes: usize,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(WEBHOOK_PATH, post(receive))
        .method_not_allowed_fallback(|| async { IngressError::MethodNotAllowed })
        .fallback(|| async { IngressError::NotFound })
        .with_state(Arc::new(state))
}

/// Every answer other than 202.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("body is larger than {limit} bytes (AVSYNC_MAX_BODY_BYTES)")]
    PayloadTooLarge { limit: usize },
    #[error("the request body could not be read: {0}")]
    UnreadableBody(String),
    #[error(transparent)]
    Signature(#[from] SignatureFailure),
    #[error(transparent)]
    Content(#[from] EnvelopeError),
    #[error("the event was not queued ({0}); retry later")]
    Unavailable(#[from] PublishError),
    #[error("no such route: webhooks go to POST /webhooks/authvital")]
    NotFound,
    #[error("method not allowed: webhooks go to POST /webhooks/authvital")]
    MethodNotAllowed,
}

impl IngressError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnreadableBody(_) | Self::Content(_) => StatusCode::BAD_REQUEST,
            Self::Signature(_) => StatusCode::UNAUTHORIZED,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::UnreadableBody(_) => "unreadable_body",
            Self::Signature(failure) => failure.code(),
            Self::Content(EnvelopeError::NotJson(_)) => "invalid_json",
            Self::Content(EnvelopeError::NotObject) => "not_an_object",
            Self::Content(EnvelopeError::MissingField(_)) => "missing_field",
            Self::Content(EnvelopeError::InvalidTenantId(_)) => "invalid_tenant_id",
            Self::Unavailable(e) => e.code(),
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
        }
    }

    /// The `outcome` label, for the answers to webhook requests.
    fn outcome(&self) -> Option<Outcome> {
        match self {
            Self::PayloadTooLarge { .. } => Some(Outcome::PayloadTooLarge),
            Self::UnreadableBody(_) | Self::Content(_) => Some(Outcome::BadRequest),
            Self::Signature(_) => Some(Outcome::Unauthorized),
            Self::Unavailable(_) => Some(Outcome::Unavailable),
            Self::NotFound | Self::MethodNotAllowed => None,
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: String,
}

impl IntoResponse for IngressError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code(),
            message: self.to_string(),
        };
        let mut response = (self.status(), Json(body)).into_response();
        if matches!(self, Self::Unavailable(_)) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}

#[derive(Debug, Serialize)]
pub struct Queued {
    pub id: String,
    pub status: &'static str,
}

async fn receive(State(app): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    match accept(&app, &headers, body).await {
        Ok(queued) => {
            app.metrics.request(Outcome::Accepted);
            (StatusCode::ACCEPTED, Json(queued)).into_response()
        }
        Err(e) => {
            if let Some(outcome) = e.outcome() {
                app.metrics.request(outcome);
            }
            if let IngressError::Signature(failure) = &e {
                app.metrics.signature_failure(*failure);
            }
            e.into_response()
        }
    }
}

async fn accept(app: &AppState, headers: &HeaderMap, body: Body) -> Result<Queued, IngressError> {
    let body = read_limited(headers, body, app.max_body_bytes).await?;
    let verified = app
        .verifier
        .verify(headers, &body)
        .await
        .inspect_err(|failure| {
            tracing::info!(reason = failure.reason(), "webhook refused: signature");
        })?;
    let envelope = Envelope::decode(&body).inspect_err(|e| {
        tracing::info!(error = %e, "webhook refused: content");
    })?;
    let tenant = envelope.tenant_id.as_str();
    app.publisher
        .publish(&envelope, &body)
        .await
        .inspect_err(|e| {
            tracing::warn!(
                event_id = %envelope.id,
                tenant,
                "type" = %envelope.event_type,
                error = %e,
                "webhook not queued; answering 503"
            );
        })?;
    tracing::info!(
        event_id = %envelope.id,
        tenant,
        "type" = %envelope.event_type,
        scheme = verified.scheme.as_str(),
        key_id = verified.key_id.as_deref().unwrap_or(""),
        "webhook queued"
    );
    Ok(Queued {
        id: envelope.id,
        status: "queued",
    })
}

/// Refuses by Content-Length before reading, then reads at most `max` bytes, so an oversized
/// body is never held whole.
async fn read_limited(headers: &HeaderMap, body: Body, max: usize) -> Result<Bytes, IngressError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max as u64) {
        return Err(IngressError::PayloadTooLarge { limit: max });
    }
    axum::body::to_bytes(body, max).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            IngressError::PayloadTooLarge { limit: max }
        } else {
            IngressError::UnreadableBody(e.to_string())
        }
    })
}
