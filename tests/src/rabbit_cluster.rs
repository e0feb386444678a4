//! A real three-node RabbitMQ cluster on this machine for the cluster fault scenarios, and a TCP
//! load balancer (haproxy) in front of it, as a Kubernetes Service would be.
//!
//! Each node has its own name, AMQP port, distribution port, data and log directories, and its own
//! Erlang cookie (the cluster directory is its `HOME`); the nodes are joined with `rabbitmqctl
//! join_cluster`. The scripts in `/usr/lib/rabbitmq/bin` are used rather than the `/usr/sbin`
//! wrappers, which switch to the `rabbitmq` user and share the cookie and settings of the shared
//! broker on 5672; that broker is never touched. Dropping the cluster SIGKILLs every node it
//! runs and removes its directory, and dropping the balancer kills haproxy, also when the test
//! fails.

use crate::support::wait_until;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const RABBITMQ_BIN: &str = "/usr/lib/rabbitmq/bin";
/// The ports RabbitMQ's command-line tools take for their own distribution (35672 + 0..10).
const CLI_DIST_PORTS: std::ops::RangeInclusive<u16> = 35672..=35682;
/// A node boots in a few seconds; a loaded CI machine may take several times that.
const NODE_START: Duration = Duration::from_secs(90);

/// A free loopback port, outside the range RabbitMQ's command-line tools use.
pub fn free_port() -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free local port")
            .port();
        if !CLI_DIST_PORTS.contains(&port) {
            return port;
        }
    }
}

/// One node: its settings, and its process while it runs.
pub struct Node {
    /// `<name>@localhost`
    pub name: String,
    /// The AMQP port on 127.0.0.1.
    pub port: u16,
    dist_port: u16,
    dir: PathBuf,
    process: Option<Child>,
}

impl Node {
    fn configure(&self) {
        std::fs::write(
            self.dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.1 = 127.0.0.1:{}\nlog.console = false\n",
                self.port
            ),
        )
        .expect("node config");
    }

    /// The exit status, once the node's process has ended by itself.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.process.as_mut()?.try_wait().ok().flatten()
    }

    fn start(&mut self, home: &Path) {
        let log = std::fs::File::create(self.dir.join("stdout.log")).expect("node stdout log");
        let child = Command::new(Path::new(RABBITMQ_BIN).join("rabbitmq-server"))
            .envs(node_env(home))
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq.conf"))
            .env("RABBITMQ_PID_FILE", self.dir.join("pid"))
            // The script then runs the VM in its own place, so the child's pid is the node's.
            .env("RUNNING_UNDER_SYSTEMD", "true")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start rabbitmq-server");
        self.process = Some(child);
    }

    pub fn running(&self) -> bool {
        self.process.is_some()
    }

    /// SIGKILL, and waits for the process to be gone.
    fn kill9(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

/// What every node and every command-line call shares: the cookie (via `HOME`), no global
/// `rabbitmq-env.conf` (it names the shared node), no plugins, loopback only.
fn node_env(home: &Path) -> Vec<(String, String)> {
    vec![
        ("HOME".into(), home.display().to_string()),
        (
            "RABBITMQ_CONF_ENV_FILE".into(),
            home.join("rabbitmq-env.conf").display().to_string(),
        ),
        (
            "RABBITMQ_ENABLED_PLUGINS_FILE".into(),
            home.join("enabled_plugins").display().to_string(),
        ),
        ("ERL_EPMD_ADDRESS".into(), "127.0.0.1".into()),
        (
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS".into(),
            "-kernel inet_dist_use_interface {127,0,0,1}".into(),
        ),
    ]
}

/// A partition queue as the cluster sees it.
#[derive(Debug, Clone)]
pub struct QueueInfo {
    pub name: String,
    pub leader: String,
    pub members: Vec<String>,
    pub online: Vec<String>,
}

pub struct RabbitCluster {
    home: PathBuf,
    pub nodes: Vec<Node>,
}

impl RabbitCluster {
    /// Starts `size` nodes named `<tag>-<i>@localhost` (tag unique to the test run) and joins
    /// them to the first; returns once each one runs as a member of the cluster.
    pub async fn start(tag: &str, size: usize) -> RabbitCluster {
        let home = std::env::temp_dir().join(format!("avsync-{tag}"));
        let _ = std::fs::remove_dir_all(&home);
        std::fs::create_dir_all(&home).expect("cluster directory");
        std::fs::write(home.join("rabbitmq-env.conf"), "").expect("env file");
        std::fs::write(home.join("enabled_plugins"), "[].\n").expect("plugins file");
        let mut cluster = RabbitCluster {
            home: home.clone(),
            nodes: Vec::new(),
        };
        for i in 0..size {
            let dir = home.join(format!("n{i}"));
            std::fs::create_dir_all(&dir).expect("node directory");
            let mut node = Node {
                name: format!("{tag}-{i}@localhost"),
                port: free_port(),
                dist_port: free_port(),
                dir,
                process: None,
            };
            node.configure();
            node.start(&home);
            cluster.nodes.push(node);
        }
        for i in 0..size {
            cluster.await_startup(i, true).await;
        }
        let first = cluster.nodes[0].name.clone();
        for i in 1..size {
            cluster.ctl(i, &["stop_app"]).await;
            cluster.ctl(i, &["join_cluster", &first]).await;
            cluster.ctl(i, &["start_app"]).await;
        }
        let status = cluster
            .ctl(0, &["cluster_status", "--formatter", "json"])
            .await;
        let status: Value = serde_json::from_str(&status).expect("cluster_status JSON");
        let running = status["running_nodes"].as_array().map_or(0, Vec::len);
        assert_eq!(running, size, "every node joined: {status}");
        cluster
    }

    /// Every node's URL, comma-separated: `AVSYNC_AMQP_URL` for the whole cluster.
    pub fn url_list(&self) -> String {
        self.nodes
            .iter()
            .map(Node::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A running node's URL, for the test's own connections.
    pub fn running_url(&self) -> String {
        self.nodes[self.running_node()].url()
    }

    fn running_node(&self) -> usize {
        self.nodes
            .iter()
            .position(Node::running)
            .expect("a running node")
    }

    /// `rabbitmqctl -q -n <node> <args>`; panics with its output when it fails.
    pub async fn ctl(&self, node: usize, args: &[&str]) -> String {
        self.try_ctl(node, args).await.unwrap_or_else(|failed| {
            panic!(
                "rabbitmqctl -n {} {args:?}: {failed} (node log: {})",
                self.nodes[node].name,
                self.nodes[node].dir.join("log").display()
            )
        })
    }

    async fn try_ctl(&self, node: usize, args: &[&str]) -> Result<String, String> {
        let out = tokio::process::Command::new(Path::new(RABBITMQ_BIN).join("rabbitmqctl"))
            .envs(node_env(&self.home))
            .args(["-q", "-n", &self.nodes[node].name])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run rabbitmqctl");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Waits until node `i` has booted; it is not known to the command-line tools before its
    /// VM registered its name. A node that exits while booting at the cluster's first start is
    /// started again on other ports (`may_move`): a free port chosen for it may have been taken
    /// by another process before the node bound it.
    async fn await_startup(&mut self, i: usize, may_move: bool) {
        let started = std::time::Instant::now();
        let mut moves = 0;
        loop {
            if self
                .try_ctl(i, &["await_startup", "--timeout", "5"])
                .await
                .is_ok()
            {
                return;
            }
            let node = &mut self.nodes[i];
            if let Some(status) = node.exited() {
                assert!(
                    may_move && moves < 3,
                    "{} exited while booting ({status}); log: {}",
                    node.name,
                    node.dir.join("log").display()
                );
                moves += 1;
                node.port = free_port();
                node.dist_port = free_port();
                node.configure();
                let home = self.home.clone();
                self.nodes[i].start(&home);
            }
            assert!(
                started.elapsed() < NODE_START,
                "{} did not start within {NODE_START:?} (log: {})",
                self.nodes[i].name,
                self.nodes[i].dir.join("log").display()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// SIGKILL to node `i`: no chance to hand anything over.
    pub fn kill9(&mut self, i: usize) {
        self.nodes[i].kill9();
    }

    /// Starts node `i` again on its data and waits until it runs and every queue of `prefix`
    /// has its replica on it online again.
    pub async fn restart(&mut self, i: usize, prefix: &str) {
        let home = self.home.clone();
        self.nodes[i].start(&home);
        self.await_startup(i, false).await;
        let name = self.nodes[i].name.clone();
        wait_until(
            &format!("every queue of {prefix} online on {name} again"),
            NODE_START,
            || async {
                let queues = self.queues(prefix).await;
                (!queues.is_empty() && queues.iter().all(|q| q.online.contains(&name)))
                    .then_some(())
            },
        )
        .await;
    }

    /// `rabbitmqctl <list_command> <columns…>` on a running node, as JSON objects.
    async fn list(&self, list_command: &[&str]) -> Vec<Value> {
        let args = [list_command, &["--formatter", "json"]].concat();
        let out = self.ctl(self.running_node(), &args).await;
        serde_json::from_str(&out).unwrap_or_default()
    }

    /// The partition queues of topology `prefix`: leader, members, members online.
    pub async fn queues(&self, prefix: &str) -> Vec<QueueInfo> {
        let listed = self
            .list(&["list_queues", "name", "leader", "members", "online"])
            .await;
        let names = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|n| n.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let partition = format!("{prefix}.events.p");
        listed
            .iter()
            .filter_map(|q| {
                let name = q["name"].as_str()?;
                name.starts_with(&partition).then(|| QueueInfo {
                    name: name.to_owned(),
                    leader: q["leader"].as_str().unwrap_or_default().to_owned(),
                    members: names(&q["members"]),
                    online: names(&q["online"]),
                })
            })
            .collect()
    }

    /// Every queue of topology `prefix` that holds messages, ready or unacknowledged, with
    /// those counts and its consumers, as `rabbitmqctl list_queues` shows them.
    pub async fn holding(&self, prefix: &str) -> Vec<Value> {
        self.list(&[
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ])
        .await
        .into_iter()
        .filter(|q| {
            q["name"].as_str().is_some_and(|n| n.starts_with(prefix))
                && q["messages_ready"].as_u64().unwrap_or(0)
                    + q["messages_unacknowledged"].as_u64().unwrap_or(0)
                    > 0
        })
        .collect()
    }

    /// The node leading the most partition queues of `prefix`, and how many it leads.
    pub async fn busiest_leader(&self, prefix: &str) -> (usize, usize) {
        let mut led: BTreeMap<String, usize> = BTreeMap::new();
        for q in self.queues(prefix).await {
            *led.entry(q.leader).or_default() += 1;
        }
        let (name, count) = led
            .into_iter()
            .max_by_key(|(_, n)| *n)
            .expect("partition queues with leaders");
        (self.index_of(&name), count)
    }

    fn index_of(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("{name} is not a node of this cluster"))
    }

    /// The node that the connection named `connection_name` is open on, once there is one.
    pub async fn node_of_connection(&self, connection_name: &str) -> usize {
        wait_until(
            &format!("a connection named {connection_name}"),
            Duration::from_secs(30),
            || async {
                let listed = self
                    .list(&["list_connections", "port", "client_properties"])
                    .await;
                let port = listed.iter().find_map(|c| {
                    let named = c["client_properties"].as_array()?.iter().any(|p| {
                        p[0] == "connection_name" && p[2].as_str() == Some(connection_name)
                    });
                    named.then(|| c["port"].as_u64())?
                })?;
                self.nodes.iter().position(|n| u64::from(n.port) == port)
            },
        )
        .await
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill9();
        }
        if std::thread::panicking() {
            eprintln!(
                "the cluster's node logs are kept in {}",
                self.home.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.home);
        }
    }
}

/// haproxy on a free loopback port, spreading TCP connections over the cluster's nodes and
/// leaving out a node whose port stops answering; killed when dropped.
pub struct Balancer {
    process: Child,
    pub port: u16,
    config: PathBuf,
}

impl Balancer {
    pub async fn start(cluster: &RabbitCluster) -> Balancer {
        let port = free_port();
        let servers: String = cluster
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("    server n{i} 127.0.0.1:{} check\n", n.port))
            .collect();
        let config = cluster.home.join("haproxy.cfg");
        std::fs::write(
            &config,
            format!(
                "global\n    maxconn 4096\n\
                 defaults\n    mode tcp\n    timeout connect 1s\n    timeout client 10m\n    timeout server 10m\n    retries 2\n    option redispatch\n\
                 listen amqp\n    bind 127.0.0.1:{port}\n    balance roundrobin\n    default-server inter 500ms fall 1 rise 2 on-marked-down shutdown-sessions\n{servers}"
            ),
        )
        .expect("haproxy config");
        let process = Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy (.ci/run installs it; apt-get install haproxy)");
        let balancer = Balancer {
            process,
            port,
            config,
        };
        wait_until("haproxy listening", Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        balancer
    }

    /// The one URL the processes are given.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// Seconds with one decimal, for the scenario's report.
pub fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}
