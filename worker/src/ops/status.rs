//! What a running worker is doing now: its private listener's `/status` (JSON), and
//! `avsync-worker status`, which reads it and prints it as tables. Metrics carry no tenant label;
//! this view names the tenants, so that during an incident an operator sees which one is stuck.

use crate::consume::session::Consuming;
use crate::execute::standing::SlowTenant;
use crate::metrics::SetAsideReason;
use crate::tenant_db::budget::ServerView;
#[cfg(test)]
use crate::tenant_db::budget::SizedFrom;
use anyhow::Context as _;
use avsync_shared::config::CommonArgs;
use axum::routing::get;
use axum::{Json, Router};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Longest `avsync-worker status` waits for the worker's answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// The worker's `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Consuming every partition queue.
    pub ready: bool,
    /// Every PostgreSQL server this worker has used.
    pub servers: Vec<ServerView>,
    /// Tenants marked slow, whose new events are set aside.
    pub slow_tenants: Vec<SlowTenant>,
    pub messages: Messages,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Messages {
    /// Received and not yet settled.
    pub in_window: usize,
    /// The most the worker receives before settling (`AVSYNC_PREFETCH`, split over partitions).
    pub window: usize,
    /// What the messages held to be applied weigh: bodies plus what holding each costs.
    pub window_bytes: usize,
    /// The most they may weigh (`AVSYNC_PREFETCH_BYTES`).
    pub window_bytes_bound: usize,
    /// Held by their tenants: waiting in a batch or being applied.
    pub held: usize,
    /// Batches or events held because PostgreSQL cannot be reached at all.
    pub held_for_outage: usize,
    /// Set aside through a retry tier since the worker started, by reason.
    pub set_aside: BTreeMap<String, u64>,
}

impl Status {
    fn of(worker: &Consuming) -> Self {
        let applying = &worker.applying;
        let (slow_tenants, held) = applying.standings.view();
        let window = worker.window();
        Status {
            ready: worker.ready.load(Ordering::SeqCst),
            servers: applying.dbs.pools.servers(),
            slow_tenants,
            messages: Messages {
                in_window: window.messages,
                window: window.size,
                window_bytes: window.bytes,
                window_bytes_bound: worker.prefetch_bytes,
                held,
                held_for_outage: applying.outage.held(),
                set_aside: SetAsideReason::ALL
                    .iter()
                    .map(|r| (r.as_str().to_owned(), worker.metrics.set_aside_total(*r)))
                    .collect(),
            },
        }
    }
}

/// `/status` on the private listener.
pub(crate) fn router(worker: Arc<Consuming>) -> Router {
    Router::new().route(
        "/status",
        get(move || {
            let worker = worker.clone();
            async move { Json(Status::of(&worker)) }
        }),
    )
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The worker's private listener; by default this machine's, on the port of
    /// AVSYNC_METRICS_LISTEN.
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Print the worker's JSON as it is.
    #[arg(long)]
    pub json: bool,
}

/// `avsync-worker status`: asks a running worker and prints what it does.
pub async fn run<W: Write>(
    args: &StatusArgs,
    common: &CommonArgs,
    out: &mut W,
) -> anyhow::Result<()> {
    let base = args
        .url
        .clone()
        .unwrap_or_else(|| local_url(common.metrics_listen));
    let url = format!("{}/status", base.trim_end_matches('/'));
    let answer = reqwest::Client::builder()
        .timeout(ASK_TIMEOUT)
        .build()?
        .get(&url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| {
            format!("no status from {url} (is a worker listening there? --url names another)")
        })?;
    let status: Status = answer
        .json()
        .await
        .with_context(|| format!("{url} did not answer with a worker's status"))?;
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&status)?)?;
    } else {
        print_tables(&status, out)?;
    }
    Ok(())
}

/// The private listener on this machine: a wildcard listen address is asked on loopback.
fn local_url(listen: SocketAddr) -> String {
    let host = if listen.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        listen.ip().to_string()
    };
    format!("http://{host}:{}", listen.port())
}

fn print_tables<W: Write>(status: &Status, out: &mut W) -> std::io::Result<()> {
    let m = &status.messages;
    writeln!(
        out,
        "worker {}; window {} of {} ({} of {} bytes), held by tenants {}, held for an outage {}",
        if status.ready {
            "consuming"
        } else {
            "not consuming"
        },
        m.in_window,
        m.window,
        m.window_bytes,
        m.window_bytes_bound,
        m.held,
        m.held_for_outage
    )?;
    let set_aside: Vec<String> = m
        .set_aside
        .iter()
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    writeln!(out, "set aside since start: {}", set_aside.join(", "))?;
    writeln!(out)?;
    writeln!(
        out,
        "{:<32} {:>9} {:>7} {:>5}  {:<8} budget sized from",
        "server", "sessions", "budget", "free", "answers"
    )?;
    for s in &status.servers {
        let sized_from = match &s.sized_from {
            Some(f) => format!(
                "{} worker(s); {} slots free on the server, {} to leave free",
                f.workers, f.server_free, f.free_target
            ),
            None => String::new(),
        };
        writeln!(
            out,
            "{:<32} {:>9} {:>7} {:>5}  {:<8} {}",
            s.server,
            s.sessions,
            s.budget,
            s.free,
            if s.reachable { "yes" } else { "NO" },
            sized_from
        )?;
    }
    writeln!(out)?;
    if status.slow_tenants.is_empty() {
        return writeln!(out, "no tenant is marked slow");
    }
    writeln!(
        out,
        "{:<32} {:<26} why",
        "tenant marked slow", "set aside until"
    )?;
    for t in &status.slow_tenants {
        let until = match (&t.until, t.probing) {
            (_, true) => "a probe runs now".to_owned(),
            (Some(until), false) => until.clone(),
            (None, false) => String::new(),
        };
        writeln!(out, "{:<32} {:<26} {}", t.tenant, until, t.why)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listener_is_asked_on_loopback() {
        assert_eq!(
            local_url("0.0.0.0:9090".parse().unwrap()),
            "http://127.0.0.1:9090"
        );
        assert_eq!(
            local_url("10.1.2.3:9191".parse().unwrap()),
            "http://10.1.2.3:9191"
        );
    }

    #[test]
    fn the_tables_name_servers_and_slow_tenants() {
        let status = Status {
            ready: true,
            servers: vec![ServerView {
                server: "db2:5432".into(),
                sessions: 0,
                budget: 20,
                free: 20,
                reachable: false,
                sized_from: Some(SizedFrom {
                    workers: 3,
                    server_free: 41,
                    free_target: 20,
                }),
            }],
            slow_tenants: vec![SlowTenant {
                tenant: "acme".into(),
                why: "lock timeout".into(),
                until: Some("2026-12-06T10:00:00.000Z".into()),
                probing: false,
            }],
            messages: Messages {
                in_window: 3,
                window: 4096,
                window_bytes: 2048,
                window_bytes_bound: 65536,
                held: 2,
                held_for_outage: 0,
                set_aside: BTreeMap::from([("slow".to_owned(), 7)]),
            },
        };
        let mut out = Vec::new();
        print_tables(&status, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("window 3 of 4096"), "{text}");
        assert!(text.contains("db2:5432") && text.contains("NO"), "{text}");
        assert!(
            text.contains("3 worker(s); 41 slots free on the server, 20 to leave free"),
            "{text}"
        );
        assert!(
            text.contains("acme") && text.contains("lock timeout"),
            "{text}"
        );
        assert!(text.contains("slow 7"), "{text}");
    }
}
