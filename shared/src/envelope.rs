//! The webhook envelope, decoded once at the edge. The raw bytes stay the message body; this is
//! only what routing and logging need.

use crate::tenant::{InvalidTenantId, TenantId};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub id: String,
    pub event_type: String,
    pub timestamp: String,
    pub tenant_id: TenantId,
    /// AuthVital sends `""` for events without an application; both mean "none".
    pub application_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    #[error("body is not a JSON object")]
    NotObject,
    #[error("`{0}` is missing or not a string")]
    MissingField(&'static str),
    #[error(transparent)]
    InvalidTenantId(#[from] InvalidTenantId),
}

/// Only the envelope's keys are decoded; `data` and unknown keys are skipped without building
/// values for them. Duplicate keys are an error (serde rejects them), so no two readers of the
/// same body can disagree on its id or tenant.
#[derive(Deserialize)]
struct RawEnvelope {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default, rename = "type")]
    event_type: Option<Value>,
    #[serde(default)]
    timestamp: Option<Value>,
    #[serde(default)]
    tenant_id: Option<Value>,
    #[serde(default)]
    application_id: Option<Value>,
}

fn string_field(value: Option<Value>, name: &'static str) -> Result<String, EnvelopeError> {
    match value {
        Some(Value::String(s)) => Ok(s),
        _ => Err(EnvelopeError::MissingField(name)),
    }
}

impl Envelope {
    pub fn decode(body: &[u8]) -> Result<Self, EnvelopeError> {
        // serde_json would also build a struct from a JSON array; the contract wants an object.
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                Ok(_) => Err(EnvelopeError::NotObject),
                Err(e) => Err(EnvelopeError::NotJson(e.to_string())),
            };
        }
        let raw: RawEnvelope =
            serde_json::from_slice(body).map_err(|e| EnvelopeError::NotJson(e.to_string()))?;
        let id = string_field(raw.id, "id")?;
        let event_type = string_field(raw.event_type, "type")?;
        let timestamp = string_field(raw.timestamp, "timestamp")?;
        let tenant_id = TenantId::parse(&string_field(raw.tenant_id, "tenant_id")?)?;
        let application_id = match raw.application_id {
            Some(Value::String(s)) if !s.is_empty() => Some(s),
            _ => None,
        };
        Ok(Self {
            id,
            event_type,
            timestamp,
            tenant_id,
            application_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"id":"e1","data":{"sub":"u"},"type":"subject.created","tenant_id":"t1","timestamp":"2026-08-21T01:40:03.512Z","application_id":"app"}"#;

    #[test]
    fn decodes_a_valid_envelope() {
        let e = Envelope::decode(GOOD.as_bytes()).unwrap();
        assert_eq!(e.id, "e1");
        assert_eq!(e.event_type, "subject.created");
        assert_eq!(e.tenant_id.as_str(), "t1");
        assert_eq!(e.application_id.as_deref(), Some("app"));
    }

    #[test]
    fn rejects_each_kind_of_bad_body() {
        let cases: &[(&str, EnvelopeError)] = &[
            ("not json", EnvelopeError::NotJson(String::new())),
            ("[1,2]", EnvelopeError::NotObject),
            ("\"s\"", EnvelopeError::NotObject),
            (
                r#"{"type":"a","timestamp":"t","tenant_id":"x"}"#,
                EnvelopeError::MissingField("id"),
            ),
            (
                r#"{"id":1,"type":"a","timestamp":"t","tenant_id":"x"}"#,
                EnvelopeError::MissingField("id"),
            ),
            (
                r#"{"id":"1","type":null,"timestamp":"t","tenant_id":"x"}"#,
                EnvelopeError::MissingField("type"),
            ),
            (
                r#"{"id":"1","type":"a","timestamp":5,"tenant_id":"x"}"#,
                EnvelopeError::MissingField("timestamp"),
            ),
            (
                r#"{"id":"1","type":"a","timestamp":"t"}"#,
                EnvelopeError::MissingField("tenant_id"),
            ),
            (
                r#"{"id":"1","type":"a","timestamp":"t","tenant_id":"../x"}"#,
                EnvelopeError::InvalidTenantId(InvalidTenantId),
            ),
            (
                r#"{"id":"1","id":"2","type":"a","timestamp":"t","tenant_id":"x"}"#,
                EnvelopeError::NotJson(String::new()),
            ),
        ];
        for (body, want) in cases {
            let got = Envelope::decode(body.as_bytes()).unwrap_err();
            match (want, &got) {
                (EnvelopeError::NotJson(_), EnvelopeError::NotJson(_)) => {}
                _ => assert_eq!(&got, want, "{body}"),
            }
        }
    }

    #[test]
    fn empty_application_id_means_none() {
        let body = r#"{"id":"1","type":"a","timestamp":"t","tenant_id":"x","application_id":""}"#;
        assert_eq!(
            Envelope::decode(body.as_bytes()).unwrap().application_id,
            None
        );
    }
}
