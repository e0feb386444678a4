//! The `/metrics` of a running ingress and worker: every labelled counter of contract section 9
//! exists at 0 from the start, a known set of events shows up in exactly the counters it should,
//! and every series the deploy files query (alerts, dashboard) is one the processes export, with
//! the labels and label values the queries expect.

use avsync_ingress::metrics::Outcome as IngressOutcome;
use avsync_ingress::verify::SignatureFailure;
use avsync_shared::event::KNOWN_TYPES;
use avsync_tests::demo::prom::Scrape;
use avsync_tests::ingress_harness::{self, TestIngress};
use avsync_tests::support::{self, wait_until, TopologyCleanup};
use avsync_tests::worker_harness::{settings, TestDatabases, TestWorker};
use avsync_worker::metrics::Outcome;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

const PARTITIONS: u16 = 2;
async fn scrape(base: &str) -> Scrape {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    Scrape::parse(&text).expect("Prometheus text")
}

fn event(id: &str, event_type: &str, tenant: &str, timestamp: &str, data: Value) -> Vec<u8> {
    json!({
        "id": id,
        "type": event_type,
        "timestamp": timestamp,
        "tenant_id": tenant,
        "application_id": "app_test",
        "data": data,
    })
    .to_string()
    .into_bytes()
}

#[tokio::test]
async fn every_labelled_counter_exists_at_zero_right_after_start() {
    let prefix = support::unique("tmet");
    let _cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let dbs = TestDatabases::new("tmet");
    let ingress = TestIngress::start_with(
        ingress_harness::settings(&prefix, PARTITIONS, &ingress_harness::new_whsec_secret()),
        None,
    )
    .await;
    let worker = TestWorker::start_unready(settings(&prefix, PARTITIONS, &dbs, &[])).await;

    // Before either has reached the broker.
    let i = scrape(&ingress.metrics_url).await;
    for outcome in IngressOutcome::ALL {
        let labels = [("outcome", outcome.label())];
        assert_eq!(
            i.get("avsync_ingress_requests_total", &labels),
            Some(0.0),
            "{outcome:?}"
        );
    }
    for failure in SignatureFailure::ALL {
        let labels = [("reason", failure.reason())];
        let value = i.get("avsync_ingress_signature_failures_total", &labels);
        assert_eq!(value, Some(0.0), "{failure:?}");
    }
    for outcome in ["success", "failure"] {
        let labels = [("outcome", outcome)];
        assert_eq!(
            i.get("avsync_ingress_jwks_fetches_total", &labels),
            Some(0.0)
        );
    }
    assert_eq!(
        i.get("avsync_ingress_publish_seconds_count", &[]),
        Some(0.0)
    );
    assert!(i.get("avsync_ingress_ready", &[]).is_some());

    let w = scrape(&worker.metrics_url).await;
    for event_type in KNOWN_TYPES.iter().copied().chain(["other"]) {
        for outcome in Outcome::ALL {
            let labels = [("type", event_type), ("outcome", outcome.as_str())];
            let value = w.get("avsync_worker_events_total", &labels);
            assert_eq!(value, Some(0.0), "{labels:?}");
        }
    }
    assert_eq!(
        w.matching("avsync_worker_events_total", &[]).count(),
        (KNOWN_TYPES.len() + 1) * Outcome::ALL.len(),
        "no other series"
    );
    for delay in support::DEFAULT_RETRY_TIERS {
        let value = w.get("avsync_worker_retries_total", &[("delay", delay)]);
        assert_eq!(value, Some(0.0), "retry tier {delay}");
    }
    for name in [
        "avsync_worker_tenant_pool_opens_total",
        "avsync_worker_tenant_pool_evictions_total",
        "avsync_worker_tenant_pools",
        "avsync_worker_apply_seconds_count",
        "avsync_worker_lag_seconds_count",
        "avsync_worker_tenant_pool_wait_seconds_count",
        "avsync_worker_ready",
    ] {
        assert_eq!(w.get(name, &[]), Some(0.0), "{name}");
    }
    for (scrape, histogram) in [
        (&i, "avsync_ingress_publish_seconds"),
        (&w, "avsync_worker_apply_seconds"),
        (&w, "avsync_worker_tenant_pool_wait_seconds"),
    ] {
        let bounds: Vec<&str> = scrape
            .matching(&format!("{histogram}_bucket"), &[])
            .map(|s| s.labels["le"].as_str())
            .collect();
        assert_eq!(bounds.first(), Some(&"0.001"), "{histogram} starts at 1 ms");
        assert!(bounds.contains(&"30"), "{histogram} reaches 30 s");
    }

    ingress.wait_ready().await;
    wait_until("worker ready", Duration::from_secs(20), || async {
        worker.running().is_ready().then_some(())
    })
    .await;
    let i = scrape(&ingress.metrics_url).await;
    let w = scrape(&worker.metrics_url).await;
    assert_eq!(i.get("avsync_ingress_ready", &[]), Some(1.0));
    assert_eq!(w.get("avsync_worker_ready", &[]), Some(1.0));
    worker.stop().await;
    ingress.stop().await;
}

/// Scrapes until `ok` holds, at most 30 s.
async fn scrape_until(base: &str, what: &str, ok: impl Fn(&Scrape) -> bool) -> Scrape {
    wait_until(what, Duration::from_secs(30), || async {
        let s = scrape(base).await;
        ok(&s).then_some(s)
    })
    .await
}

/// Waits until the worker has settled `n` messages (applied, ignored or dead-lettered).
async fn settled(worker: &TestWorker, n: f64) -> Scrape {
    let what = format!("{n} messages settled");
    scrape_until(&worker.metrics_url, &what, |s| {
        let done: f64 = ["applied", "ignored", "dead_lettered"]
            .iter()
            .map(|o| s.sum("avsync_worker_events_total", &[("outcome", o)]))
            .sum();
        done >= n
    })
    .await
}

#[tokio::test]
async fn a_known_set_of_events_shows_in_both_processes_counters() {
    let prefix = support::unique("tmet");
    let _cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let dbs = TestDatabases::new("tmet");
    let ingress = TestIngress::start(&prefix, PARTITIONS).await;
    // One pool at a time: the second tenant's pool evicts the first one's.
    let worker = TestWorker::start(settings(
        &prefix,
        PARTITIONS,
        &dbs,
        &["--tenant-pool-capacity", "1"],
    ))
    .await;
    let at = "2026-08-21T01:00:00.000Z";
    let mut first_tenant = Vec::new();
    for n in 0..4 {
        let data = json!({"sub": format!("u{n}"), "tenant_roles": ["member"]});
        first_tenant.push(event(&format!("j{n}"), "member.joined", "alpha", at, data));
    }
    first_tenant.push(first_tenant[0].clone());
    for n in 0..2 {
        let data = json!({"sub": "u0", "assignment_id": format!("l{n}")});
        first_tenant.push(event(
            &format!("l{n}"),
            "license.assigned",
            "alpha",
            at,
            data,
        ));
    }
    let invite = json!({"invite_id": "i0", "email": "x@alpha.test"});
    first_tenant.push(event("i0", "invite.created", "alpha", at, invite));
    first_tenant.push(event(
        "t0",
        "tenant.renamed",
        "alpha",
        at,
        json!({"name": "A"}),
    ));
    let bad_time = json!({"sub": "u9"});
    first_tenant.push(event(
        "bad",
        "member.joined",
        "alpha",
        "yesterday",
        bad_time,
    ));
    for body in &first_tenant {
        assert_eq!(ingress.post(body).await.status(), 202);
    }
    settled(&worker, 10.0).await;
    let second = event("s0", "subject.created", "beta", at, json!({"sub": "v0"}));
    assert_eq!(ingress.post(&second).await.status(), 202);

    let refused = [
        (ingress.post(b"not json").await.status(), 400),
        (ingress.post(&vec![b' '; 300_000]).await.status(), 413),
        (
            ingress
                .post_with(
                    &[
                        ("webhook-id", "forged".to_owned()),
                        (
                            "webhook-timestamp",
                            chrono::Utc::now().timestamp().to_string(),
                        ),
                        ("webhook-signature", "v1,Zm9yZ2Vk".to_owned()),
                    ],
                    &second,
                )
                .await
                .status(),
            401,
        ),
    ];
    for (got, want) in refused {
        assert_eq!(got.as_u16(), want);
    }

    let w = settled(&worker, 11.0).await;
    let count =
        |t: &str, o: &str| w.get("avsync_worker_events_total", &[("type", t), ("outcome", o)]);
    assert_eq!(
        count("member.joined", "applied"),
        Some(5.0),
        "a duplicate is applied again"
    );
    assert_eq!(count("subject.created", "applied"), Some(1.0));
    assert_eq!(count("license.assigned", "ignored"), Some(2.0));
    assert_eq!(count("invite.created", "ignored"), Some(1.0));
    assert_eq!(
        count("other", "ignored"),
        Some(1.0),
        "unknown types are `other`"
    );
    assert_eq!(count("member.joined", "dead_lettered"), Some(1.0));
    assert_eq!(
        w.sum("avsync_worker_events_total", &[]),
        11.0,
        "nothing else"
    );
    assert_eq!(w.sum("avsync_worker_retries_total", &[]), 0.0);
    assert_eq!(w.get("avsync_worker_apply_seconds_count", &[]), Some(6.0));
    assert_eq!(w.get("avsync_worker_lag_seconds_count", &[]), Some(6.0));
    // One wait per connection taken: per batch of a tenant's events, at least one per tenant.
    let waits = w.get("avsync_worker_tenant_pool_wait_seconds_count", &[]);
    assert!(waits.is_some_and(|n| (2.0..=6.0).contains(&n)), "{waits:?}");
    assert_eq!(
        w.get("avsync_worker_tenant_pool_opens_total", &[]),
        Some(2.0)
    );
    assert_eq!(
        w.get("avsync_worker_tenant_pool_evictions_total", &[]),
        Some(1.0)
    );
    assert_eq!(w.get("avsync_worker_tenant_pools", &[]), Some(1.0));

    let i = scrape(&ingress.metrics_url).await;
    let requests = |o: &str| i.get("avsync_ingress_requests_total", &[("outcome", o)]);
    assert_eq!(requests("accepted"), Some(11.0));
    assert_eq!(requests("bad_request"), Some(1.0));
    assert_eq!(requests("payload_too_large"), Some(1.0));
    assert_eq!(requests("unauthorized"), Some(1.0));
    assert_eq!(requests("unavailable"), Some(0.0));
    assert_eq!(i.sum("avsync_ingress_signature_failures_total", &[]), 1.0);
    assert_eq!(
        i.get("avsync_ingress_publish_seconds_count", &[]),
        Some(11.0)
    );

    // The depth poller reports the one dead letter and empty partitions and tiers.
    let dead = format!("{prefix}.dead");
    let w = scrape_until(&worker.metrics_url, "the dead letter in the gauge", |s| {
        s.get("avsync_worker_queue_messages", &[("queue", &dead)]) == Some(1.0)
    })
    .await;
    let depths: Vec<(String, f64)> = w
        .matching("avsync_worker_queue_messages", &[])
        .map(|s| (s.labels["queue"].clone(), s.value))
        .collect();
    assert_eq!(
        depths.len(),
        usize::from(PARTITIONS) + support::DEFAULT_RETRY_TIERS.len() + 1,
        "{depths:?}"
    );
    for (queue, value) in &depths {
        if *queue != dead {
            assert_eq!(*value, 0.0, "{queue}");
        }
    }

    for s in i.samples.iter().chain(&w.samples) {
        for value in s.labels.values() {
            assert!(
                !value.contains("alpha") && !value.contains("beta"),
                "a tenant id in a label: {s:?}"
            );
        }
    }
    worker.stop().await;
    ingress.stop().await;
}

/// A tenant whose database does not exist (and may not be created) fails transiently: each
/// retry is counted under its tier's delay, then the message is dead-lettered as exhausted.
#[tokio::test]
async fn retries_are_counted_by_delay_tier() {
    let prefix = support::unique("tmet");
    const RETRY_DELAYS: &str = "200ms,400ms";
    let _cleanup = TopologyCleanup::new(&prefix, PARTITIONS).with_retry_delays(RETRY_DELAYS);
    let dbs = TestDatabases::new("tmet");
    let ingress = TestIngress::start(&prefix, PARTITIONS).await;
    let worker = TestWorker::start(settings(
        &prefix,
        PARTITIONS,
        &dbs,
        &[
            "--create-tenant-databases",
            "false",
            "--retry-delays",
            RETRY_DELAYS,
        ],
    ))
    .await;
    let body = event(
        "r0",
        "member.joined",
        "nodb",
        "2026-08-21T01:00:00.000Z",
        json!({"sub": "u0"}),
    );
    assert_eq!(ingress.post(&body).await.status(), 202);
    let w = settled(&worker, 1.0).await;
    assert_eq!(
        w.get("avsync_worker_retries_total", &[("delay", "200ms")]),
        Some(1.0)
    );
    assert_eq!(
        w.get("avsync_worker_retries_total", &[("delay", "400ms")]),
        Some(1.0)
    );
    assert_eq!(w.matching("avsync_worker_retries_total", &[]).count(), 2);
    let labels = [("type", "member.joined"), ("outcome", "retried")];
    assert_eq!(w.get("avsync_worker_events_total", &labels), Some(2.0));
    let labels = [("type", "member.joined"), ("outcome", "dead_lettered")];
    assert_eq!(w.get("avsync_worker_events_total", &labels), Some(1.0));
    assert!(dbs.existing().await.is_empty(), "no database was created");
    worker.stop().await;
    ingress.stop().await;
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace root")
        .to_path_buf()
}

/// Every PromQL expression of the alert rules and the Grafana dashboards.
fn deploy_expressions() -> Vec<(String, String)> {
    let mut found = Vec::new();
    let alerts =
        std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).expect("alerts.yml");
    let alerts: serde_norway::Value = serde_norway::from_str(&alerts).expect("alerts.yml parses");
    for group in alerts["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let expr = rule["expr"].as_str().expect("expr").to_owned();
            found.push(("alerts.yml".to_owned(), expr));
        }
    }
    let dashboards = std::fs::read_dir(root().join("deploy/grafana")).expect("deploy/grafana");
    for entry in dashboards {
        let path = entry.expect("dir entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("dashboard");
        let json: Value = serde_json::from_str(&text).expect("dashboard parses");
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        collect_exprs(&json, &name, &mut found);
    }
    found
}

fn collect_exprs(value: &Value, file: &str, found: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr", Value::String(expr)) => found.push((file.to_owned(), expr.clone())),
                    _ => collect_exprs(v, file, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, file, found)),
        _ => {}
    }
}

/// One `name{label op "value", …}` of an expression.
#[derive(Debug)]
struct Selector {
    metric: String,
    matchers: Vec<(String, String, String)>,
}

/// The metric names (ours: `avsync_` and `process_`), selectors and `by (…)` labels of an
/// expression. Quoted strings are skipped, so label values are never taken for names.
fn analyse(expr: &str) -> (Vec<Selector>, Vec<String>) {
    let chars: Vec<char> = expr.chars().collect();
    let mut selectors = Vec::new();
    let mut by_labels = Vec::new();
    let mut i = 0;
    let word = |i: usize| chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':';
    while i < chars.len() {
        if chars[i] == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            continue;
        }
        if !word(i) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && word(i) {
            i += 1;
        }
        let token: String = chars[start..i].iter().collect();
        if token == "by" || token == "without" {
            let rest: String = chars[i..].iter().collect();
            if let Some(inner) = rest.trim_start().strip_prefix('(') {
                let inner = &inner[..inner.find(')').unwrap_or(0)];
                by_labels.extend(inner.split(',').map(|l| l.trim().to_owned()));
            }
            continue;
        }
        if !(token.starts_with("avsync_") || token.starts_with("process_")) {
            continue;
        }
        let mut matchers = Vec::new();
        if chars.get(i) == Some(&'{') {
            let end = (i..chars.len())
                .find(|&j| chars[j] == '}')
                .expect("closing brace");
            let inner: String = chars[i + 1..end].iter().collect();
            for part in inner.split(',').filter(|p| !p.trim().is_empty()) {
                let op_at = part.find(['=', '!']).expect("a label matcher");
                let label = part[..op_at].trim().to_owned();
                let rest = &part[op_at..];
                let op_len =
                    if rest.starts_with("=~") || rest.starts_with("!~") || rest.starts_with("!=") {
                        2
                    } else {
                        1
                    };
                let value = rest[op_len..].trim().trim_matches('"').to_owned();
                matchers.push((label, rest[..op_len].to_owned(), value));
            }
            i = end + 1;
        }
        selectors.push(Selector {
            metric: token,
            matchers,
        });
    }
    (selectors, by_labels)
}

/// A full match of the regular expressions the deploy files use: literals, `.`, classes like
/// `[.]` or `[0-9]`, and `+`, `*`, `?`. Anything else is refused so the test cannot pass
/// vacuously.
fn full_match(pattern: &str, text: &str) -> bool {
    #[derive(Debug, Clone)]
    enum Atom {
        Any,
        Char(char),
        Class(Vec<(char, char)>),
    }
    let p: Vec<char> = pattern.chars().collect();
    let mut atoms: Vec<(Atom, char)> = Vec::new();
    let mut i = 0;
    while i < p.len() {
        let atom = match p[i] {
            '.' => Atom::Any,
            '[' => {
                let end = (i..p.len()).find(|&j| p[j] == ']').expect("closing ]");
                let mut ranges = Vec::new();
                let mut k = i + 1;
                while k < end {
                    if k + 2 < end && p[k + 1] == '-' {
                        ranges.push((p[k], p[k + 2]));
                        k += 3;
                    } else {
                        ranges.push((p[k], p[k]));
                        k += 1;
                    }
                }
                i = end;
                Atom::Class(ranges)
            }
            c if c.is_alphanumeric() || c == '_' || c == '-' => Atom::Char(c),
            c => panic!("the test's regex matcher does not know `{c}` in {pattern}; extend it"),
        };
        i += 1;
        let quantifier = match p.get(i) {
            Some(q @ ('+' | '*' | '?')) => {
                i += 1;
                *q
            }
            _ => '1',
        };
        atoms.push((atom, quantifier));
    }
    fn matches(atom: &Atom, c: char) -> bool {
        match atom {
            Atom::Any => true,
            Atom::Char(x) => *x == c,
            Atom::Class(ranges) => ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c)),
        }
    }
    fn go(atoms: &[(Atom, char)], text: &[char]) -> bool {
        let Some(((atom, quantifier), rest)) = atoms.split_first() else {
            return text.is_empty();
        };
        let (min, max) = match quantifier {
            '+' => (1, usize::MAX),
            '*' => (0, usize::MAX),
            '?' => (0, 1),
            _ => (1, 1),
        };
        let run = text
            .iter()
            .take_while(|c| matches(atom, **c))
            .count()
            .min(max);
        (min..=run).rev().any(|n| go(rest, &text[n..]))
    }
    let text: Vec<char> = text.chars().collect();
    go(&atoms, &text)
}

#[test]
fn the_regex_matcher_matches_whole_names() {
    assert!(full_match(".+[.]dead", "avsync.dead"));
    assert!(!full_match(".+[.]dead", "avsync.deadx"));
    assert!(full_match(".+[.]events[.]p[0-9]+", "t_1.events.p12"));
    assert!(!full_match(".+[.]events[.]p[0-9]+", "t_1.events.p"));
    assert!(full_match(".+[.]retry[.].+", "a.retry.1500ms"));
    assert!(full_match("avsync-.+", "avsync-worker"));
    assert!(!full_match("avsync-.+", "avsync-"));
}

#[tokio::test]
async fn every_series_the_deploy_files_query_is_exported() {
    let prefix = support::unique("tmet");
    let _cleanup = TopologyCleanup::new(&prefix, PARTITIONS);
    let dbs = TestDatabases::new("tmet");
    let ingress = TestIngress::start(&prefix, PARTITIONS).await;
    let worker = TestWorker::start(settings(&prefix, PARTITIONS, &dbs, &[])).await;
    let i = scrape(&ingress.metrics_url).await;
    let w = scrape_until(&worker.metrics_url, "the first queue depths", |s| {
        s.matching("avsync_worker_queue_messages", &[]).count() > 0
    })
    .await;
    let samples: Vec<_> = i.samples.iter().chain(&w.samples).collect();
    // Prometheus adds these to every scraped series.
    let target_labels = ["job", "instance"];

    let expressions = deploy_expressions();
    assert!(expressions.len() >= 10, "{expressions:?}");
    let mut checked = BTreeSet::new();
    for (file, expr) in &expressions {
        let (selectors, by_labels) = analyse(expr);
        if selectors.is_empty() {
            // Only Prometheus' own series: `up` of the scrape jobs.
            assert!(expr.contains("up{"), "{file}: no avsync metric in `{expr}`");
            continue;
        }
        for selector in &selectors {
            let of_metric: Vec<_> = samples
                .iter()
                .filter(|s| s.name == selector.metric)
                .collect();
            assert!(
                !of_metric.is_empty(),
                "{file}: `{}` is not exported (in `{expr}`)",
                selector.metric
            );
            for (label, op, value) in &selector.matchers {
                if target_labels.contains(&label.as_str()) {
                    continue;
                }
                let values: Vec<&str> = of_metric
                    .iter()
                    .filter_map(|s| s.labels.get(label).map(String::as_str))
                    .collect();
                assert!(
                    !values.is_empty(),
                    "{file}: `{}` has no label `{label}`",
                    selector.metric
                );
                match op.as_str() {
                    "=" => assert!(
                        values.contains(&value.as_str()),
                        "{file}: no `{}{{{label}=\"{value}\"}}`; values: {values:?}",
                        selector.metric
                    ),
                    "=~" => assert!(
                        values.iter().any(|v| full_match(value, v)),
                        "{file}: `{value}` matches no `{label}` of `{}`: {values:?}",
                        selector.metric
                    ),
                    _ => {}
                }
            }
            checked.insert(selector.metric.clone());
        }
        for label in &by_labels {
            let known = label == "le"
                || target_labels.contains(&label.as_str())
                || selectors.iter().any(|sel| {
                    samples
                        .iter()
                        .any(|s| s.name == sel.metric && s.labels.contains_key(label))
                });
            assert!(
                known,
                "{file}: `by ({label})` names a label none of its series has: `{expr}`"
            );
        }
    }
    for needed in [
        "avsync_worker_queue_messages",
        "avsync_ingress_ready",
        "avsync_worker_ready",
    ] {
        assert!(
            checked.contains(needed),
            "the deploy files no longer query {needed}"
        );
    }
    worker.stop().await;
    ingress.stop().await;
}
