//! The pipeline's limits without avsync: a raw lapin consumer that writes what each event sets
//! into `av_identities` (batched: 100 messages, one multi-row upsert, one transaction, one ack
//! with `multiple`; naive: one upsert and one ack per message), and raw upsert rates.
//!
//! These upserts are last-writer-wins without per-field versions: the least work a correct
//! apply can do, so a bound for the worker, not a replacement for it.

use crate::bench::BenchError;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::Channel;
use serde::Deserialize;
use sqlx::{Connection, PgConnection, Postgres, QueryBuilder};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Messages per transaction and per acknowledgement of the batched consumer.
pub const BATCH: usize = 100;
/// Longest wait for the next message of a pre-filled queue.
const DELIVERY_WAIT: Duration = Duration::from_secs(30);

/// What one event writes to its row; `None` leaves the stored value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpsertRow {
    pub id: String,
    pub tenant_id: String,
    pub email: Option<String>,
    pub given_name: Option<String>,
    pub family_name: Option<String>,
    pub subject_type: Option<String>,
    pub membership_id: Option<String>,
    pub membership_status: Option<&'static str>,
    pub tenant_roles: Option<Vec<String>>,
    pub has_app_access: Option<bool>,
    pub app_role: Option<String>,
    pub app_role_id: Option<String>,
    pub app_role_name: Option<String>,
}

#[derive(Deserialize)]
struct RawBody {
    #[serde(rename = "type")]
    event_type: String,
    tenant_id: String,
    data: RawData,
}

#[derive(Deserialize)]
struct RawData {
    sub: String,
    email: Option<String>,
    given_name: Option<String>,
    family_name: Option<String>,
    subject_type: Option<String>,
    membership_id: Option<String>,
    tenant_roles: Option<Vec<String>>,
    role_id: Option<String>,
    role_name: Option<String>,
    role_slug: Option<String>,
}

/// AuthVital sends `""` for unknown values: they set nothing.
fn present(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

/// The row an event writes, or None for a body or type that writes nothing.
pub fn row_of(body: &[u8]) -> Option<UpsertRow> {
    let raw: RawBody = serde_json::from_slice(body).ok()?;
    let d = raw.data;
    let mut row = UpsertRow {
        id: d.sub,
        tenant_id: raw.tenant_id,
        ..UpsertRow::default()
    };
    let profile = |row: &mut UpsertRow| {
        row.email = present(d.email.clone());
        row.given_name = present(d.given_name.clone());
        row.family_name = present(d.family_name.clone());
    };
    match raw.event_type.as_str() {
        "subject.created" => {
            profile(&mut row);
            row.subject_type = present(d.subject_type.clone());
        }
        "member.joined" => {
            profile(&mut row);
            row.membership_id = present(d.membership_id.clone());
            row.membership_status = Some("active");
            row.tenant_roles = Some(d.tenant_roles.clone().unwrap_or_default());
        }
        "app_access.granted" => {
            profile(&mut row);
            row.has_app_access = Some(true);
            row.app_role = present(d.role_slug.clone());
            row.app_role_id = present(d.role_id.clone());
            row.app_role_name = present(d.role_name.clone());
        }
        "app_access.role_changed" => {
            row.app_role = present(d.role_slug.clone());
            row.app_role_id = present(d.role_id.clone());
            row.app_role_name = present(d.role_name.clone());
        }
        "invite.accepted" => profile(&mut row),
        "member.suspended" => row.membership_status = Some("suspended"),
        "member.activated" => row.membership_status = Some("active"),
        _ => return None,
    }
    Some(row)
}

/// One row per id, later values over earlier ones: one statement may not upsert a row twice.
pub fn merge(rows: impl IntoIterator<Item = UpsertRow>) -> Vec<UpsertRow> {
    let mut merged: Vec<UpsertRow> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for row in rows {
        match index.get(&row.id) {
            Some(&i) => {
                let m = &mut merged[i];
                m.tenant_id = row.tenant_id;
                m.email = row.email.or(m.email.take());
                m.given_name = row.given_name.or(m.given_name.take());
                m.family_name = row.family_name.or(m.family_name.take());
                m.subject_type = row.subject_type.or(m.subject_type.take());
                m.membership_id = row.membership_id.or(m.membership_id.take());
                m.membership_status = row.membership_status.or(m.membership_status);
                m.tenant_roles = row.tenant_roles.or(m.tenant_roles.take());
                m.has_app_access = row.has_app_access.or(m.has_app_access);
                m.app_role = row.app_role.or(m.app_role.take());
                m.app_role_id = row.app_role_id.or(m.app_role_id.take());
                m.app_role_name = row.app_role_name.or(m.app_role_name.take());
            }
            None => {
                index.insert(row.id.clone(), merged.len());
                merged.push(row);
            }
        }
    }
    merged
}

/// One `INSERT … ON CONFLICT DO UPDATE` of `rows` (distinct ids, see [`merge`]).
pub async fn upsert(conn: &mut PgConnection, rows: &[UpsertRow]) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut query = QueryBuilder::<Postgres>::new(
        "INSERT INTO av_identities AS t (id, tenant_id, email, given_name, family_name, \
         subject_type, membership_id, membership_status, tenant_roles, has_app_access, app_role, \
         app_role_id, app_role_name) ",
    );
    query.push_values(rows, |mut v, row| {
        v.push_bind(&row.id)
            .push_bind(&row.tenant_id)
            .push_bind(&row.email)
            .push_bind(&row.given_name)
            .push_bind(&row.family_name)
            .push_bind(&row.subject_type)
            .push_bind(&row.membership_id)
            .push_bind(row.membership_status)
            .push("COALESCE(")
            .push_bind_unseparated(&row.tenant_roles)
            .push_unseparated("::text[], '{}')")
            .push("COALESCE(")
            .push_bind_unseparated(row.has_app_access)
            .push_unseparated("::boolean, false)")
            .push_bind(&row.app_role)
            .push_bind(&row.app_role_id)
            .push_bind(&row.app_role_name);
    });
    query.push(
        " ON CONFLICT (id) DO UPDATE SET tenant_id = EXCLUDED.tenant_id, \
         email = COALESCE(EXCLUDED.email, t.email), \
         given_name = COALESCE(EXCLUDED.given_name, t.given_name), \
         family_name = COALESCE(EXCLUDED.family_name, t.family_name), \
         subject_type = COALESCE(EXCLUDED.subject_type, t.subject_type), \
         membership_id = COALESCE(EXCLUDED.membership_id, t.membership_id), \
         membership_status = COALESCE(EXCLUDED.membership_status, t.membership_status), \
         tenant_roles = CASE WHEN cardinality(EXCLUDED.tenant_roles) > 0 \
             THEN EXCLUDED.tenant_roles ELSE t.tenant_roles END, \
         has_app_access = EXCLUDED.has_app_access OR t.has_app_access, \
         app_role = COALESCE(EXCLUDED.app_role, t.app_role), \
         app_role_id = COALESCE(EXCLUDED.app_role_id, t.app_role_id), \
         app_role_name = COALESCE(EXCLUDED.app_role_name, t.app_role_name), \
         updated_at = now(), synced_at = now()",
    );
    query.build().execute(conn).await.map(|_| ())
}

async fn next_delivery(
    consumer: &mut lapin::Consumer,
    queue: &str,
) -> Result<lapin::message::Delivery, BenchError> {
    match tokio::time::timeout(DELIVERY_WAIT, consumer.next()).await {
        Ok(Some(Ok(delivery))) => Ok(delivery),
        Ok(Some(Err(e))) => Err(e.into()),
        Ok(None) | Err(_) => Err(BenchError::Timeout {
            what: format!("the next message of queue {queue}"),
            after: DELIVERY_WAIT,
        }),
    }
}

async fn start_consuming(
    channel: &Channel,
    queue: &str,
    prefetch: u16,
) -> Result<lapin::Consumer, BenchError> {
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    Ok(channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?)
}

async fn stop_consuming(channel: &Channel, consumer: &lapin::Consumer) -> Result<(), BenchError> {
    channel
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await?;
    Ok(())
}

/// Takes `messages` from a pre-filled `queue` in batches: one multi-row upsert in one
/// transaction per batch, then one ack with `multiple` for the whole batch. Returns the time
/// from subscribing to the last ack.
pub async fn consume_batched(
    channel: &Channel,
    queue: &str,
    messages: u64,
    pg: &mut PgConnection,
) -> Result<Duration, BenchError> {
    // Two batches in flight: the next one arrives while this one commits.
    let mut consumer = start_consuming(channel, queue, (2 * BATCH) as u16).await?;
    let started = Instant::now();
    let mut done = 0u64;
    while done < messages {
        let want = (messages - done).min(BATCH as u64) as usize;
        let mut batch = Vec::with_capacity(want);
        while batch.len() < want {
            batch.push(next_delivery(&mut consumer, queue).await?);
        }
        let rows = merge(batch.iter().filter_map(|d| row_of(&d.data)));
        let mut tx = pg.begin().await?;
        upsert(&mut tx, &rows).await?;
        tx.commit().await?;
        if let Some(last) = batch.last() {
            last.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
        done += want as u64;
    }
    let elapsed = started.elapsed();
    stop_consuming(channel, &consumer).await?;
    Ok(elapsed)
}

/// Takes `messages` from a pre-filled `queue` one at a time: one upsert (its own transaction)
/// and one ack each.
pub async fn consume_naive(
    channel: &Channel,
    queue: &str,
    messages: u64,
    pg: &mut PgConnection,
) -> Result<Duration, BenchError> {
    let mut consumer = start_consuming(channel, queue, BATCH as u16).await?;
    let started = Instant::now();
    for _ in 0..messages {
        let delivery = next_delivery(&mut consumer, queue).await?;
        if let Some(row) = row_of(&delivery.data) {
            upsert(pg, std::slice::from_ref(&row)).await?;
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
    let elapsed = started.elapsed();
    stop_consuming(channel, &consumer).await?;
    Ok(elapsed)
}

/// Upserts rows for `duration`, `per_statement` rows per statement, each statement its own
/// transaction; returns rows written per second. Every pass over `templates` writes new ids.
pub async fn upsert_rate(
    pg: &mut PgConnection,
    templates: &[UpsertRow],
    per_statement: usize,
    duration: Duration,
    tag: &str,
) -> Result<f64, BenchError> {
    let mut written = 0u64;
    let mut pass = 0u64;
    let started = Instant::now();
    'outer: loop {
        for chunk in templates.chunks(per_statement.max(1)) {
            if started.elapsed() >= duration {
                break 'outer;
            }
            let rows = merge(chunk.iter().map(|r| UpsertRow {
                id: format!("{}_{tag}{pass}", r.id),
                ..r.clone()
            }));
            upsert(pg, &rows).await?;
            written += rows.len() as u64;
        }
        pass += 1;
    }
    Ok(written as f64 / started.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(event_type: &str, data: &str) -> Vec<u8> {
        format!(
            r#"{{"id":"e","data":{data},"type":"{event_type}","tenant_id":"t1","timestamp":"2026-08-21T01:40:03.512Z"}}"#
        )
        .into_bytes()
    }

    #[test]
    fn rows_carry_what_each_type_sets() {
        let joined = row_of(&body(
            "member.joined",
            r#"{"sub":"u1","email":"","given_name":"Ada","membership_id":"m","tenant_roles":["owner"]}"#,
        ))
        .unwrap();
        assert_eq!(joined.id, "u1");
        assert_eq!(joined.tenant_id, "t1");
        assert_eq!(joined.email, None, "\"\" sets nothing");
        assert_eq!(joined.given_name.as_deref(), Some("Ada"));
        assert_eq!(joined.membership_status, Some("active"));
        assert_eq!(joined.tenant_roles, Some(vec!["owner".to_owned()]));
        let granted = row_of(&body(
            "app_access.granted",
            r#"{"sub":"u1","role_slug":"admin","role_id":"r1","role_name":"Admin"}"#,
        ))
        .unwrap();
        assert_eq!(granted.has_app_access, Some(true));
        assert_eq!(granted.app_role.as_deref(), Some("admin"));
        assert_eq!(row_of(&body("license.assigned", r#"{"sub":"u1"}"#)), None);
        assert_eq!(row_of(b"not json"), None);
        assert_eq!(row_of(&body("member.joined", r#"{"email":"x"}"#)), None);
    }

    #[test]
    fn merging_keeps_one_row_per_id_with_the_later_values() {
        let a = UpsertRow {
            id: "u1".into(),
            email: Some("old".into()),
            given_name: Some("Ada".into()),
            ..UpsertRow::default()
        };
        let b = UpsertRow {
            id: "u2".into(),
            ..UpsertRow::default()
        };
        let c = UpsertRow {
            id: "u1".into(),
            email: Some("new".into()),
            has_app_access: Some(true),
            ..UpsertRow::default()
        };
        let merged = merge([a, b, c]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].email.as_deref(), Some("new"));
        assert_eq!(merged[0].given_name.as_deref(), Some("Ada"));
        assert_eq!(merged[0].has_app_access, Some(true));
        assert_eq!(merged[1].id, "u2");
    }
}
