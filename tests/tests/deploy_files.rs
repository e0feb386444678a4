//! The deployment files agree with the contract and with each other: every YAML and JSON file
//! parses, only the contract's settings appear, ports 8080 and 9090 line up across compose,
//! Kubernetes, the Dockerfile and Prometheus, and the RabbitMQ definitions declare exactly the
//! topology the processes declare. No Docker needed; one test asks the local RabbitMQ whether
//! the processes can redeclare what the definitions create.

use avsync_shared::config::parse_duration;
use avsync_shared::topology::{Topology, BROKER_DELIVERY_LIMIT};
use avsync_tests::support;
use base64::Engine as _;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::ExchangeKind;
use serde::Deserialize as _;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Contract section 2, plus the log format both processes accept.
const CONTRACT_SETTINGS: &[&str] = &[
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
    "AVSYNC_APPLICATION_ID",
    "AVSYNC_TENANT_DATABASE_URL",
    "AVSYNC_TENANT_REGISTRY_URL",
    "AVSYNC_AUTO_MIGRATE",
    "AVSYNC_CREATE_TENANT_DATABASES",
    "AVSYNC_TENANT_POOL_CAPACITY",
    "AVSYNC_TENANT_POOL_SIZE",
    "AVSYNC_RETRY_DELAYS",
    "AVSYNC_POISON_DELIVERIES",
    "AVSYNC_PREFETCH",
    "AVSYNC_MAX_CONNECTIONS",
    "AVSYNC_PG_FREE_CONNECTIONS",
    "AVSYNC_AUTHVITAL_URL",
    "AVSYNC_AUTHVITAL_CLIENT_ID",
    "AVSYNC_AUTHVITAL_CLIENT_SECRET",
    "AVSYNC_RECONCILE_INTERVAL",
    "AVSYNC_LOG_FORMAT",
];

/// Settings that hold credentials: in Kubernetes they come from a Secret, never a literal.
const SECRET_SETTINGS: &[&str] = &[
    "AVSYNC_AMQP_URL",
    "AVSYNC_HMAC_SECRETS",
    "AVSYNC_TENANT_DATABASE_URL",
];

/// What the processes export; histograms also as `_bucket`, `_sum` and `_count`.
const METRICS: &[&str] = &[
    "avsync_ingress_requests_total",
    "avsync_ingress_signature_failures_total",
    "avsync_ingress_jwks_fetches_total",
    "avsync_ingress_ready",
    "avsync_worker_events_total",
    "avsync_worker_tenant_pools",
    "avsync_worker_queue_messages",
    "avsync_worker_ready",
    "avsync_worker_server_reachable",
];
const HISTOGRAMS: &[&str] = &[
    "avsync_ingress_publish_seconds",
    "avsync_worker_apply_seconds",
    "avsync_worker_lag_seconds",
];

const PUBLIC_PORT: u64 = 8080;
const PRIVATE_PORT: u64 = 9090;
const PREFIX: &str = "avsync";
const PARTITIONS: u16 = 16;
const RETRY_DELAYS: &str = "1s,5s,30s,2m,10m,1h";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace root")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Every file the checks read: all of deploy/ and the compose file.
fn deployment_files() -> Vec<PathBuf> {
    let mut files = files_under(&root().join("deploy"));
    files.push(root().join("docker-compose.yml"));
    files
}

fn has_extension(path: &Path, extensions: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| extensions.contains(&e))
}

/// The documents of a YAML file (merge keys applied) or the one value of a JSON file.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if has_extension(path, &["json"]) {
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()));
        return vec![value];
    }
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            let mut value = serde_norway::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
            value
                .apply_merge()
                .unwrap_or_else(|e| panic!("{}: bad merge key: {e}", path.display()));
            serde_json::to_value(value)
                .unwrap_or_else(|e| panic!("{}: not representable as JSON: {e}", path.display()))
        })
        .filter(|doc| !doc.is_null())
        .collect()
}

fn yaml(rel: &str) -> Value {
    let mut docs = documents(&root().join(rel));
    assert_eq!(docs.len(), 1, "{rel} should hold one document");
    docs.remove(0)
}

fn k8s_objects() -> Vec<Value> {
    files_under(&root().join("deploy/k8s"))
        .iter()
        .filter(|p| has_extension(p, &["yaml", "yml"]))
        .flat_map(|p| documents(p))
        .collect()
}

fn k8s(kind: &str, name: &str) -> Value {
    k8s_objects()
        .into_iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("deploy/k8s has no {kind} {name}"))
}

fn at<'a>(value: &'a Value, pointer: &str) -> &'a Value {
    value
        .pointer(pointer)
        .unwrap_or_else(|| panic!("missing {pointer} in {value:#}"))
}

fn text_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    at(value, pointer)
        .as_str()
        .unwrap_or_else(|| panic!("{pointer} is not a string in {value:#}"))
}

fn list_at<'a>(value: &'a Value, pointer: &str) -> &'a Vec<Value> {
    at(value, pointer)
        .as_array()
        .unwrap_or_else(|| panic!("{pointer} is not a list in {value:#}"))
}

/// Words that start with `prefix` (not inside a longer word) and continue with `more`.
fn words_with_prefix(text: &str, prefix: &str, more: fn(char) -> bool) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (start, _) in text.match_indices(prefix) {
        let inside_word = text[..start]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if inside_word {
            continue;
        }
        let rest = &text[start + prefix.len()..];
        let end = rest.find(|c: char| !more(c)).unwrap_or(rest.len());
        found.insert(format!("{prefix}{}", &rest[..end]));
    }
    found
}

fn port_of_address(address: &str) -> u64 {
    address
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("`{address}` has no port"))
}

/// A probe's or Service's port: a number, or the name of one of the container's ports.
fn resolve_port(container: &Value, port: &Value) -> u64 {
    if let Some(number) = port.as_u64() {
        return number;
    }
    let name = port.as_str().expect("a port is a number or a name");
    list_at(container, "/ports")
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("container has no port named {name}"))
}

fn only_container(deployment: &Value) -> &Value {
    let containers = list_at(deployment, "/spec/template/spec/containers");
    assert_eq!(containers.len(), 1, "one container per pod");
    &containers[0]
}

fn compose() -> Value {
    yaml("docker-compose.yml")
}

fn compose_env(compose: &Value, service: &str) -> Map<String, Value> {
    at(compose, &format!("/services/{service}/environment"))
        .as_object()
        .unwrap_or_else(|| panic!("compose {service}: environment should be a map"))
        .clone()
}

fn compose_healthcheck_url(compose: &Value, service: &str) -> String {
    let test = list_at(compose, &format!("/services/{service}/healthcheck/test"));
    test.iter()
        .filter_map(Value::as_str)
        .find(|s| s.starts_with("http://"))
        .unwrap_or_else(|| panic!("compose {service}: healthcheck probes no URL"))
        .to_owned()
}

#[test]
fn every_yaml_and_json_file_parses() {
    let parsed: Vec<String> = deployment_files()
        .iter()
        .filter(|p| has_extension(p, &["yaml", "yml", "json"]))
        .map(|p| {
            assert!(!documents(p).is_empty(), "{} is empty", p.display());
            p.strip_prefix(root())
                .expect("under the root")
                .display()
                .to_string()
        })
        .collect();
    for expected in [
        "docker-compose.yml",
        "deploy/rabbitmq/definitions.json",
        "deploy/prometheus/prometheus.yml",
        "deploy/prometheus/alerts.yml",
        "deploy/grafana/avsync-dashboard.json",
        "deploy/k8s/kustomization.yaml",
        "deploy/k8s/ingress.yaml",
        "deploy/k8s/worker.yaml",
        "deploy/k8s/secret.example.yaml",
    ] {
        assert!(
            parsed.iter().any(|p| p == expected),
            "{expected} is missing; parsed {parsed:?}"
        );
    }
}

#[test]
fn only_contract_settings_are_used() {
    let mut used = BTreeSet::new();
    for path in deployment_files() {
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for name in words_with_prefix(&text, "AVSYNC_", |c| {
            c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'
        }) {
            assert!(
                CONTRACT_SETTINGS.contains(&name.as_str()),
                "{} uses {name}, which is not a contract setting",
                path.display()
            );
            used.insert(name);
        }
    }
    for name in SECRET_SETTINGS {
        assert!(used.contains(*name), "no deployment file sets {name}");
    }
}

#[test]
fn kubernetes_takes_credentials_from_secrets_only() {
    let objects = k8s_objects();
    let example_secrets: Vec<&Value> = objects.iter().filter(|o| o["kind"] == "Secret").collect();
    for secret in &example_secrets {
        for (key, value) in at(secret, "/stringData")
            .as_object()
            .expect("stringData map")
        {
            let value = value.as_str().expect("string values");
            assert!(
                value.contains("REPLACE_ME"),
                "example secret value {key} must be a marked placeholder"
            );
        }
    }
    for config in objects.iter().filter(|o| o["kind"] == "ConfigMap") {
        for name in SECRET_SETTINGS {
            assert!(config["data"].get(name).is_none(), "{name} in a ConfigMap");
        }
    }
    for deployment in objects.iter().filter(|o| o["kind"] == "Deployment") {
        let name = text_at(deployment, "/metadata/name");
        for env in list_at(only_container(deployment), "/env") {
            let setting = text_at(env, "/name");
            if !SECRET_SETTINGS.contains(&setting) {
                continue;
            }
            assert!(env.get("value").is_none(), "{name}: {setting} is a literal");
            let secret = text_at(env, "/valueFrom/secretKeyRef/name");
            let key = text_at(env, "/valueFrom/secretKeyRef/key");
            assert!(
                example_secrets
                    .iter()
                    .any(|s| s["metadata"]["name"] == secret && s["stringData"].get(key).is_some()),
                "{name}: {setting} refers to {secret}/{key}, which secret.example.yaml lacks"
            );
        }
    }
    for (deployment, setting) in [
        ("avsync-ingress", "AVSYNC_HMAC_SECRETS"),
        ("avsync-worker", "AVSYNC_TENANT_DATABASE_URL"),
    ] {
        let deployment = k8s("Deployment", deployment);
        let env = list_at(only_container(&deployment), "/env");
        assert!(env.iter().any(|e| e["name"] == setting), "{setting} unset");
    }

    let hmac = compose_env(&compose(), "ingress")["AVSYNC_HMAC_SECRETS"].clone();
    assert!(
        hmac.as_str()
            .is_some_and(|v| v.starts_with("${AVSYNC_HMAC_SECRETS:-")),
        "compose must take the HMAC secret from the environment, with a dev default: {hmac}"
    );
}

#[test]
fn ports_line_up_everywhere() {
    let compose = compose();
    let ingress_ports = list_at(&compose, "/services/ingress/ports");
    assert!(
        ingress_ports.iter().any(|p| p
            .as_str()
            .is_some_and(|p| port_of_address(p.trim_end_matches("/tcp")) == PUBLIC_PORT)),
        "compose publishes the ingress's port {PUBLIC_PORT}: {ingress_ports:?}"
    );
    for service in ["ingress", "worker"] {
        let env = compose_env(&compose, service);
        let metrics = env["AVSYNC_METRICS_LISTEN"].as_str().expect("string");
        assert_eq!(port_of_address(metrics), PRIVATE_PORT, "compose {service}");
        let url = compose_healthcheck_url(&compose, service);
        assert!(
            url.contains(&format!(":{PRIVATE_PORT}/")),
            "compose {service}: {url}"
        );
    }
    let listen = compose_env(&compose, "ingress")["AVSYNC_LISTEN"].clone();
    assert_eq!(
        port_of_address(listen.as_str().expect("string")),
        PUBLIC_PORT
    );

    let config = k8s("ConfigMap", "avsync-config");
    assert_eq!(
        port_of_address(text_at(&config, "/data/AVSYNC_METRICS_LISTEN")),
        PRIVATE_PORT
    );
    for name in ["avsync-ingress", "avsync-worker"] {
        let deployment = k8s("Deployment", name);
        let container = only_container(&deployment);
        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = at(container, &format!("/{probe}/httpGet"));
            assert_eq!(get["path"], path, "{name} {probe}");
            assert_eq!(
                resolve_port(container, &get["port"]),
                PRIVATE_PORT,
                "{name} {probe}"
            );
        }
        let annotations = at(&deployment, "/spec/template/metadata/annotations");
        assert_eq!(annotations["prometheus.io/scrape"], "true", "{name}");
        assert_eq!(
            annotations["prometheus.io/port"],
            PRIVATE_PORT.to_string(),
            "{name}"
        );
    }
    let ingress = k8s("Deployment", "avsync-ingress");
    let container = only_container(&ingress);
    let listen = list_at(container, "/env")
        .iter()
        .find(|e| e["name"] == "AVSYNC_LISTEN")
        .expect("the ingress Deployment sets AVSYNC_LISTEN");
    assert_eq!(port_of_address(text_at(listen, "/value")), PUBLIC_PORT);
    let service = k8s("Service", "avsync-ingress");
    let mut exposed = BTreeSet::new();
    for port in list_at(&service, "/spec/ports") {
        let target = resolve_port(container, &port["targetPort"]);
        assert_eq!(port["port"].as_u64(), Some(target), "Service port {port}");
        exposed.insert(target);
    }
    assert_eq!(exposed, BTreeSet::from([PUBLIC_PORT, PRIVATE_PORT]));

    let prometheus = yaml("deploy/prometheus/prometheus.yml");
    let jobs = list_at(&prometheus, "/scrape_configs");
    let job = |name: &str| {
        jobs.iter()
            .find(|j| j["job_name"] == name)
            .unwrap_or_else(|| panic!("prometheus.yml has no job {name}"))
    };
    let ingress_target = format!("ingress:{PRIVATE_PORT}");
    assert_eq!(
        job("avsync-ingress")["static_configs"][0]["targets"],
        json!([ingress_target])
    );
    let dns = &job("avsync-worker")["dns_sd_configs"][0];
    assert_eq!(dns["names"], json!(["worker"]));
    assert_eq!(dns["type"], "A");
    assert_eq!(dns["port"].as_u64(), Some(PRIVATE_PORT));
    for service in ["ingress", "worker"] {
        assert!(compose["services"].get(service).is_some());
    }

    let dockerfile = read("deploy/Dockerfile");
    for port in [PUBLIC_PORT, PRIVATE_PORT] {
        assert!(
            dockerfile.contains(&format!("EXPOSE {port}")),
            "the Dockerfile exposes {port}"
        );
    }
    assert!(dockerfile.contains(&format!("127.0.0.1:{PRIVATE_PORT}/healthz")));
}

#[test]
fn workers_drain_before_they_are_killed_and_never_run_alone() {
    for name in ["avsync-ingress", "avsync-worker"] {
        let deployment = k8s("Deployment", name);
        let grace = at(
            &deployment,
            "/spec/template/spec/terminationGracePeriodSeconds",
        );
        assert!(
            grace.as_u64().is_some_and(|g| g > 30),
            "{name}: terminationGracePeriodSeconds {grace} must exceed the 30 s drain"
        );
    }
    let scaled = k8s("ScaledObject", "avsync-worker");
    assert!(at(&scaled, "/spec/minReplicaCount").as_u64() >= Some(2));

    let compose = compose();
    for service in ["ingress", "worker"] {
        let grace = text_at(&compose, &format!("/services/{service}/stop_grace_period"));
        assert!(
            parse_duration(grace).expect("a duration") > Duration::from_secs(30),
            "compose {service}: stop_grace_period {grace} must exceed the 30 s drain"
        );
    }
    assert!(at(&compose, "/services/worker/deploy/replicas").as_u64() >= Some(2));
}

#[test]
fn kubernetes_pods_are_locked_down_probed_and_sized() {
    for name in ["avsync-ingress", "avsync-worker"] {
        let deployment = k8s("Deployment", name);
        let pod = at(&deployment, "/spec/template/spec");
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        let container = only_container(&deployment);
        let security = at(container, "/securityContext");
        assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
        for kind in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                at(container, &format!("/resources/{kind}/{resource}"));
            }
        }
        let selector = at(&deployment, "/spec/selector/matchLabels");
        let pdb = k8s("PodDisruptionBudget", name);
        assert_eq!(
            at(&pdb, "/spec/selector/matchLabels"),
            selector,
            "{name} PDB"
        );
    }
    let hpa = k8s("HorizontalPodAutoscaler", "avsync-ingress");
    assert_eq!(text_at(&hpa, "/spec/scaleTargetRef/name"), "avsync-ingress");
    assert!(at(&hpa, "/spec/minReplicas").as_u64() >= Some(2));
}

#[test]
fn keda_scales_workers_on_the_partition_queues() {
    let scaled = k8s("ScaledObject", "avsync-worker");
    assert_eq!(text_at(&scaled, "/spec/scaleTargetRef/kind"), "Deployment");
    assert_eq!(
        text_at(&scaled, "/spec/scaleTargetRef/name"),
        "avsync-worker"
    );
    let triggers = list_at(&scaled, "/spec/triggers");
    assert_eq!(triggers.len(), 1);
    let trigger = &triggers[0];
    assert_eq!(trigger["type"], "rabbitmq");
    let metadata = at(trigger, "/metadata").as_object().expect("metadata map");
    for (key, value) in metadata {
        assert!(
            value.is_string(),
            "KEDA takes only strings: {key} is {value}"
        );
    }
    assert_eq!(
        metadata["protocol"], "http",
        "regex matching needs the HTTP API"
    );
    assert_eq!(metadata["useRegex"], "true");
    assert_eq!(metadata["operation"], "sum");
    assert_eq!(metadata["mode"], "QueueLength");
    let partitions_policy = list_at(&definitions(), "/policies")
        .iter()
        .find(|p| p["name"] == "avsync-partitions")
        .map(|p| p["pattern"].clone())
        .expect("the broker's partition policy");
    assert_eq!(
        metadata["queueName"], partitions_policy,
        "KEDA counts exactly the queues the broker's partition policy applies to"
    );
    let pattern = metadata["queueName"].as_str().unwrap_or_default();
    assert!(
        pattern.starts_with('^') && pattern.ends_with('$'),
        "anchored: {pattern}"
    );
    let readme = read("deploy/README.md");
    assert!(
        readme.contains("KEDA 2.5 or newer"),
        "deploy/README.md names the KEDA version the regex trigger needs"
    );

    let auth_name = text_at(trigger, "/authenticationRef/name");
    let auth = k8s("TriggerAuthentication", auth_name);
    let targets = list_at(&auth, "/spec/secretTargetRef");
    let host = targets
        .iter()
        .find(|t| t["parameter"] == "host")
        .expect("the management API address comes from a Secret");
    let secret = k8s("Secret", text_at(host, "/name"));
    let address = text_at(&secret, &format!("/stringData/{}", text_at(host, "/key")));
    assert!(
        address.starts_with("http"),
        "KEDA's host is the management API: {address}"
    );

    let kustomization = yaml("deploy/k8s/kustomization.yaml");
    let listed: BTreeSet<String> = list_at(&kustomization, "/resources")
        .iter()
        .map(|r| r.as_str().expect("a file name").to_owned())
        .collect();
    let manifests: BTreeSet<String> = files_under(&root().join("deploy/k8s"))
        .iter()
        .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .filter(|f| f != "secret.example.yaml")
        .collect();
    assert_eq!(
        listed, manifests,
        "kustomization lists every manifest but the example secret"
    );
}

/// An autoscaler owns its Deployment's replica count: a `replicas` in the Deployment would
/// reset it at every apply.
#[test]
fn autoscaled_deployments_leave_the_replica_count_to_their_autoscaler() {
    let scaled: Vec<String> = k8s_objects()
        .iter()
        .filter(|o| o["kind"] == "HorizontalPodAutoscaler" || o["kind"] == "ScaledObject")
        .map(|o| {
            assert_eq!(text_at(o, "/spec/scaleTargetRef/kind"), "Deployment");
            text_at(o, "/spec/scaleTargetRef/name").to_owned()
        })
        .collect();
    for name in ["avsync-ingress", "avsync-worker"] {
        assert!(scaled.iter().any(|s| s == name), "{name} is autoscaled");
        let deployment = k8s("Deployment", name);
        assert!(
            deployment.pointer("/spec/replicas").is_none(),
            "{name}: `replicas` fights its autoscaler"
        );
    }
}

/// CPU in millicores from a Kubernetes quantity (`500m`, `1`, `0.5`).
fn millicores(quantity: &str) -> u64 {
    match quantity.strip_suffix('m') {
        Some(milli) => milli.parse().expect("millicores"),
        None => (quantity.parse::<f64>().expect("cores") * 1000.0).round() as u64,
    }
}

/// The ingress adds pods only once they are busy: the CPU it scales at (utilization target ×
/// request) is at least a quarter core, and below the limit so that it is ever reached.
#[test]
fn the_ingress_scales_out_when_its_pods_are_busy() {
    let hpa = k8s("HorizontalPodAutoscaler", "avsync-ingress");
    let metrics = list_at(&hpa, "/spec/metrics");
    let cpu = metrics
        .iter()
        .find(|m| m["resource"]["name"] == "cpu")
        .expect("the HPA scales on CPU");
    assert_eq!(text_at(cpu, "/resource/target/type"), "Utilization");
    let target = at(cpu, "/resource/target/averageUtilization")
        .as_u64()
        .expect("a percentage");
    let deployment = k8s("Deployment", "avsync-ingress");
    let container = only_container(&deployment);
    let request = millicores(text_at(container, "/resources/requests/cpu"));
    let limit = millicores(text_at(container, "/resources/limits/cpu"));
    let scales_at = request * target / 100;
    assert!(
        (250..limit).contains(&scales_at),
        "scales out at {scales_at}m per pod ({target}% of {request}m), limit {limit}m"
    );
}

#[test]
fn compose_waits_for_healthy_dependencies_and_builds_both_targets() {
    let compose = compose();
    let services = at(&compose, "/services").as_object().expect("services map");
    for (name, service) in services {
        assert!(
            service.get("healthcheck").is_some(),
            "compose {name} has no healthcheck"
        );
    }
    for (service, target) in [("ingress", "ingress"), ("worker", "worker")] {
        let build = at(&compose, &format!("/services/{service}/build"));
        assert_eq!(build["dockerfile"], "deploy/Dockerfile");
        assert_eq!(build["target"], target);
        for (dependency, condition) in at(&compose, &format!("/services/{service}/depends_on"))
            .as_object()
            .expect("depends_on map")
        {
            assert_eq!(
                condition["condition"], "service_healthy",
                "compose {service} must wait for {dependency} to be healthy"
            );
        }
    }
    let dockerfile = read("deploy/Dockerfile");
    for target in ["AS ingress", "AS worker"] {
        assert!(
            dockerfile.contains(target),
            "the Dockerfile lacks `{target}`"
        );
    }
    let user = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the Dockerfile sets a USER");
    assert!(
        user.split(':')
            .all(|id| id.parse::<u32>().is_ok_and(|id| id != 0)),
        "USER {user} must be numeric and not root"
    );
}

/// `--locked` resolves the whole workspace, so the builder stage needs every member's sources,
/// and the worker embeds migrations/ at compile time.
#[test]
fn the_image_build_copies_every_workspace_member() {
    let manifest = read("Cargo.toml");
    let members_line = manifest
        .lines()
        .find(|l| l.trim_start().starts_with("members"))
        .expect("the workspace lists its members");
    let members: Vec<&str> = members_line.split('"').skip(1).step_by(2).collect();
    assert!(members.contains(&"worker"), "parsed members {members:?}");
    let dockerfile = read("deploy/Dockerfile");
    let copied: BTreeSet<&str> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("COPY "))
        .filter(|l| !l.starts_with("--from"))
        .flat_map(|l| l.split_whitespace())
        .collect();
    for path in members
        .iter()
        .copied()
        .chain(["Cargo.toml", "Cargo.lock", "migrations"])
    {
        assert!(
            copied.contains(path),
            "the builder stage does not copy {path}"
        );
    }
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Declared {
    name: String,
    kind: String,
    /// Argument name to its JSON text, so that the set can be ordered.
    arguments: BTreeMap<String, String>,
}

fn by_name(definitions: &Value, section: &str, kind_key: &str) -> BTreeSet<Declared> {
    list_at(definitions, &format!("/{section}"))
        .iter()
        .map(|o| {
            assert_eq!(o["vhost"], "/", "{o}");
            assert_eq!(o["durable"], true, "{o} must be durable");
            assert_eq!(o["auto_delete"], false, "{o}");
            Declared {
                name: text_at(o, "/name").to_owned(),
                kind: o[kind_key].as_str().unwrap_or_default().to_owned(),
                arguments: at(o, "/arguments")
                    .as_object()
                    .expect("arguments map")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_string()))
                    .collect(),
            }
        })
        .collect()
}

/// Equal sets, or a failure that names only the differences.
fn assert_same<T: Ord + std::fmt::Debug>(what: &str, actual: &BTreeSet<T>, expected: &BTreeSet<T>) {
    let missing: Vec<&T> = expected.difference(actual).collect();
    let unexpected: Vec<&T> = actual.difference(expected).collect();
    assert!(
        missing.is_empty() && unexpected.is_empty(),
        "definitions.json {what} differ from the topology\nmissing: {missing:#?}\nunexpected: {unexpected:#?}"
    );
}

fn args(entries: &[(&str, Value)]) -> BTreeMap<String, String> {
    entries
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.to_string()))
        .collect()
}

fn retry_delays() -> Vec<Duration> {
    RETRY_DELAYS
        .split(',')
        .map(|d| parse_duration(d).expect("a duration"))
        .collect()
}

fn definitions() -> Value {
    yaml("deploy/rabbitmq/definitions.json")
}

#[test]
fn rabbitmq_definitions_declare_exactly_the_topology() {
    let definitions = definitions();
    let topology = Topology::new(PREFIX, PARTITIONS).expect("valid");
    let events = topology.events_exchange();
    let dead = topology.dead_queue();

    let mut exchanges = BTreeSet::from([Declared {
        name: events.clone(),
        kind: "direct".into(),
        arguments: BTreeMap::new(),
    }]);
    let mut queues = BTreeSet::from([Declared {
        name: dead.clone(),
        kind: String::new(),
        arguments: args(&[("x-queue-type", json!("quorum"))]),
    }]);
    let mut bindings = BTreeSet::new();
    let partition_arguments = args(&[
        ("x-queue-type", json!("quorum")),
        ("x-delivery-limit", json!(BROKER_DELIVERY_LIMIT)),
        ("x-dead-letter-exchange", json!("")),
        ("x-dead-letter-routing-key", json!(dead)),
        ("x-dead-letter-strategy", json!("at-least-once")),
        ("x-overflow", json!("reject-publish")),
    ]);
    for partition in 0..PARTITIONS {
        let queue = topology.partition_queue(partition);
        queues.insert(Declared {
            name: queue.clone(),
            kind: String::new(),
            arguments: partition_arguments.clone(),
        });
        bindings.insert((events.clone(), queue, Topology::routing_key(partition)));
    }
    for delay in retry_delays() {
        let tier = topology.retry_tier(delay);
        exchanges.insert(Declared {
            name: tier.clone(),
            kind: "fanout".into(),
            arguments: BTreeMap::new(),
        });
        queues.insert(Declared {
            name: tier.clone(),
            kind: String::new(),
            arguments: args(&[
                ("x-queue-type", json!("quorum")),
                (
                    "x-message-ttl",
                    json!(u64::try_from(delay.as_millis()).expect("fits")),
                ),
                ("x-dead-letter-exchange", json!(events)),
                ("x-dead-letter-strategy", json!("at-least-once")),
                ("x-overflow", json!("reject-publish")),
            ]),
        });
        bindings.insert((tier.clone(), tier, String::new()));
    }

    assert_same(
        "exchanges",
        &by_name(&definitions, "exchanges", "type"),
        &exchanges,
    );
    assert_same("queues", &by_name(&definitions, "queues", "type"), &queues);
    for exchange in list_at(&definitions, "/exchanges") {
        assert_eq!(exchange["internal"], false, "{exchange}");
    }
    let declared_bindings: BTreeSet<(String, String, String)> = list_at(&definitions, "/bindings")
        .iter()
        .map(|b| {
            assert_eq!(b["vhost"], "/");
            assert_eq!(b["destination_type"], "queue", "{b}");
            assert_eq!(b["arguments"], json!({}), "{b}");
            (
                text_at(b, "/source").to_owned(),
                text_at(b, "/destination").to_owned(),
                text_at(b, "/routing_key").to_owned(),
            )
        })
        .collect();
    assert_same("bindings", &declared_bindings, &bindings);
}

/// A policy is a backstop: where it applies it must say what the queue's own arguments say.
#[test]
fn rabbitmq_policies_repeat_the_queue_arguments() {
    let definitions = definitions();
    let policies = list_at(&definitions, "/policies");
    let find = |name: &str| {
        policies
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("definitions.json has no policy {name}"))
    };
    let queues = list_at(&definitions, "/queues");
    let queue = |name: &str| {
        queues
            .iter()
            .find(|q| q["name"] == name)
            .unwrap_or_else(|| panic!("no queue {name}"))
    };
    for (policy, example) in [
        ("avsync-partitions", "avsync.events.p0"),
        ("avsync-retry-tiers", "avsync.retry.1s"),
    ] {
        let policy = find(policy);
        assert_eq!(policy["apply-to"], "queues");
        assert_eq!(policy["vhost"], "/");
        let arguments = &queue(example)["arguments"];
        for (key, value) in at(policy, "/definition")
            .as_object()
            .expect("definition map")
        {
            assert_eq!(&arguments[format!("x-{key}")], value, "{key} of {example}");
        }
    }
    assert_eq!(
        find("avsync-partitions")["pattern"],
        r"^avsync\.events\.p[0-9]+$"
    );
    assert_eq!(
        find("avsync-retry-tiers")["pattern"],
        r"^avsync\.retry\.[0-9]+(ms|s|m|h)$"
    );
}

/// The compose stack logs in with a user the definitions create, with the password their
/// salted SHA-256 hash stands for, on a vhost they create.
#[test]
fn compose_connects_as_a_user_the_definitions_create() {
    let definitions = definitions();
    let url = compose_env(&compose(), "ingress")["AVSYNC_AMQP_URL"]
        .as_str()
        .expect("string")
        .to_owned();
    assert_eq!(compose_env(&compose(), "worker")["AVSYNC_AMQP_URL"], url);
    let rest = url.strip_prefix("amqp://").expect("an amqp:// URL");
    let (credentials, location) = rest.split_once('@').expect("credentials in the URL");
    let (user, password) = credentials.split_once(':').expect("user:password");
    let vhost = match location.split_once('/').map(|(_, v)| v) {
        Some("%2f") | Some("%2F") => "/",
        other => panic!("unexpected vhost {other:?}"),
    };

    let account = list_at(&definitions, "/users")
        .iter()
        .find(|u| u["name"] == user)
        .unwrap_or_else(|| panic!("definitions.json has no user {user}"));
    assert_eq!(
        account["hashing_algorithm"],
        "rabbit_password_hashing_sha256"
    );
    let hash = base64::engine::general_purpose::STANDARD
        .decode(text_at(account, "/password_hash"))
        .expect("base64");
    let (salt, digest) = hash.split_at(4);
    let expected = Sha256::new()
        .chain_update(salt)
        .chain_update(password.as_bytes())
        .finalize();
    assert_eq!(
        digest,
        expected.as_slice(),
        "the compose password of {user}"
    );

    assert!(list_at(&definitions, "/vhosts")
        .iter()
        .any(|v| v["name"] == vhost));
    let permission = list_at(&definitions, "/permissions")
        .iter()
        .find(|p| p["user"] == user && p["vhost"] == vhost)
        .unwrap_or_else(|| panic!("{user} has no permissions on {vhost}"));
    for access in ["configure", "write", "read"] {
        assert_eq!(permission[access], ".*", "{user} {access}");
    }
}

#[test]
fn alerts_and_dashboard_name_only_exported_metrics() {
    let known = |name: &str| {
        METRICS.contains(&name)
            || HISTOGRAMS.iter().any(|h| {
                name.strip_prefix(h)
                    .is_some_and(|s| ["", "_bucket", "_sum", "_count"].contains(&s))
            })
    };
    let mut used = BTreeSet::new();
    for rel in [
        "deploy/prometheus/alerts.yml",
        "deploy/prometheus/alerts.test.yml",
        "deploy/grafana/avsync-dashboard.json",
    ] {
        for name in words_with_prefix(&read(rel), "avsync_", |c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'
        }) {
            assert!(known(&name), "{rel} names {name}, which no process exports");
            used.insert(name);
        }
    }
    for needed in [
        "avsync_ingress_requests_total",
        "avsync_ingress_publish_seconds_bucket",
        "avsync_ingress_signature_failures_total",
        "avsync_worker_events_total",
        "avsync_worker_apply_seconds_bucket",
        "avsync_worker_lag_seconds_bucket",
        "avsync_worker_queue_messages",
        "avsync_worker_tenant_pools",
        "avsync_ingress_ready",
        "avsync_worker_ready",
    ] {
        assert!(
            used.contains(needed),
            "neither alerts nor dashboard use {needed}"
        );
    }

    let alerts = yaml("deploy/prometheus/alerts.yml");
    let mut names = BTreeSet::new();
    for group in list_at(&alerts, "/groups") {
        for rule in list_at(group, "/rules") {
            let name = text_at(rule, "/alert");
            assert!(names.insert(name.to_owned()), "alert {name} twice");
            assert!(!text_at(rule, "/expr").trim().is_empty(), "{name}");
            assert!(
                ["critical", "warning"].contains(&text_at(rule, "/labels/severity")),
                "{name}"
            );
            text_at(rule, "/annotations/summary");
        }
    }
    let prometheus = yaml("deploy/prometheus/prometheus.yml");
    assert_eq!(prometheus["rule_files"], json!(["alerts.yml"]));
}

#[test]
fn grafana_dashboard_is_importable() {
    let dashboard = yaml("deploy/grafana/avsync-dashboard.json");
    text_at(&dashboard, "/uid");
    text_at(&dashboard, "/title");
    assert!(at(&dashboard, "/schemaVersion").as_u64().is_some());
    assert!(list_at(&dashboard, "/templating/list")
        .iter()
        .any(|v| v["name"] == "datasource" && v["type"] == "datasource"));
    let mut ids = BTreeSet::new();
    for panel in list_at(&dashboard, "/panels") {
        let id = at(panel, "/id").as_u64().expect("numeric id");
        assert!(ids.insert(id), "panel id {id} twice");
        for key in ["h", "w", "x", "y"] {
            assert!(at(panel, &format!("/gridPos/{key}")).is_u64(), "{panel}");
        }
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        let targets = list_at(panel, "/targets");
        assert!(!targets.is_empty(), "{} has no query", panel["title"]);
        for target in targets {
            assert!(!text_at(target, "/expr").is_empty());
        }
    }
}

fn amqp_table(arguments: &Value, rename: &dyn Fn(&str) -> String) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in arguments.as_object().expect("arguments map") {
        let value = match value {
            Value::String(s) => AMQPValue::LongString(LongString::from(rename(s).as_str())),
            Value::Number(n) => AMQPValue::LongLongInt(n.as_i64().expect("an integer")),
            other => panic!("unexpected argument {key}: {other}"),
        };
        table.insert(ShortString::from(key.as_str()), value);
    }
    table
}

/// RabbitMQ refuses a redeclaration whose arguments differ, so a process that starts after the
/// definitions were loaded would never become ready. Load the definitions under a fresh prefix,
/// then declare what the processes declare.
#[tokio::test]
async fn processes_can_redeclare_what_the_definitions_create() {
    let definitions = definitions();
    let prefix = support::unique("t");
    let rename = |name: &str| match name.strip_prefix("avsync.") {
        Some(rest) => format!("{prefix}.{rest}"),
        None => name.to_owned(),
    };
    let (conn, channel) = support::channel().await;

    let outcome: Result<(), String> = async {
        for exchange in list_at(&definitions, "/exchanges") {
            channel
                .exchange_declare(
                    rename(text_at(exchange, "/name")).as_str().into(),
                    ExchangeKind::Custom(text_at(exchange, "/type").to_owned()),
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    amqp_table(&exchange["arguments"], &rename),
                )
                .await
                .map_err(|e| format!("definitions' exchange {exchange}: {e}"))?;
        }
        for queue in list_at(&definitions, "/queues") {
            channel
                .queue_declare(
                    rename(text_at(queue, "/name")).as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    amqp_table(&queue["arguments"], &rename),
                )
                .await
                .map_err(|e| format!("definitions' queue {queue}: {e}"))?;
        }
        for binding in list_at(&definitions, "/bindings") {
            channel
                .queue_bind(
                    rename(text_at(binding, "/destination")).as_str().into(),
                    rename(text_at(binding, "/source")).as_str().into(),
                    text_at(binding, "/routing_key").into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("definitions' binding {binding}: {e}"))?;
        }
        let topology = Topology::new(&prefix, PARTITIONS).map_err(|e| e.to_string())?;
        topology
            .declare(&channel)
            .await
            .map_err(|e| format!("the processes' declaration was refused: {e}"))?;
        for delay in retry_delays() {
            topology
                .declare_retry_tier(&channel, delay)
                .await
                .map_err(|e| format!("retry tier {delay:?} was refused: {e}"))?;
        }
        Ok(())
    }
    .await;

    let _ = conn.close(200, "done".into()).await;
    let tiers: Vec<&str> = RETRY_DELAYS.split(',').collect();
    support::delete_topology(&prefix, PARTITIONS, &tiers).await;
    outcome.expect("definitions and processes agree");
}
