//! Everything both processes do with RabbitMQ besides the topology: connecting to a node of the
//! broker (`nodes`), confirmed publishing (`publisher`), the message headers and their readers
//! (`headers`), and broker failures in the operator's words. A refused login or virtual host does not heal by retrying:
//! it is said once, at ERROR, naming AVSYNC_AMQP_URL (never its text, which holds the password),
//! while the process keeps retrying in case the broker's users are being fixed.

pub mod headers;
mod nodes;
mod publisher;

pub use nodes::{address, Nodes, NodesError};
pub use publisher::{ConfirmedPublisher, PublishError};

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Longest wait for a connection to one node to open, so that a node that accepts TCP but never
/// answers cannot stall reconnection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The nodes of one `AVSYNC_AMQP_URL` value, kept for the life of the process so that every
/// connection of it (the ingress's, a worker's session and depth poller) moves on through the
/// same list from where the last one left off.
fn nodes_of(amqp_url: &str) -> Result<Arc<Nodes>, NodesError> {
    static PARSED: OnceLock<Mutex<HashMap<String, Arc<Nodes>>>> = OnceLock::new();
    let mut parsed = PARSED
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(nodes) = parsed.get(amqp_url) {
        return Ok(nodes.clone());
    }
    let nodes = Arc::new(Nodes::parse(amqp_url)?);
    parsed.insert(amqp_url.to_owned(), nodes.clone());
    Ok(nodes)
}

/// Opens a connection named `name` (shown in the broker's management UI) to a node of
/// `amqp_url`: each node in turn (see [`Nodes`]), each within [`CONNECT_TIMEOUT`], until one
/// answers; the error is the last node's.
pub async fn connect(amqp_url: &str, name: &str) -> Result<Connection, lapin::Error> {
    let nodes = nodes_of(amqp_url).map_err(|e| {
        lapin::Error::from(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("AVSYNC_AMQP_URL {e}"),
        ))
    })?;
    let mut failed = None;
    for (i, uri) in nodes.in_turn() {
        match connect_node(uri, name).await {
            Ok(connection) => {
                nodes.reached(i);
                if nodes.len() > 1 {
                    tracing::info!(node = %address(uri), "connected to a broker node");
                }
                return Ok(connection);
            }
            Err(e) => {
                if nodes.len() > 1 {
                    tracing::warn!(node = %address(uri), error = %e, "cannot reach a broker node; trying the next");
                }
                failed = Some(e);
            }
        }
    }
    Err(failed.unwrap_or_else(|| {
        lapin::Error::from(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "AVSYNC_AMQP_URL names no node",
        ))
    }))
}

async fn connect_node(uri: &AMQPUri, name: &str) -> Result<Connection, lapin::Error> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        Connection::connect_uri(uri.clone(), properties),
    )
    .await
    {
        Ok(connected) => connected,
        Err(_) => Err(lapin::Error::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connecting to the broker timed out",
        ))),
    }
}

/// What is wrong with the broker setting, when `e` says so; `None` for failures that retrying
/// can cure (broker down, connection lost, a timeout).
pub fn setting_problem(e: &lapin::Error) -> Option<String> {
    let lapin::ErrorKind::ProtocolError(amqp) = e.kind() else {
        return None;
    };
    let reply = amqp.get_message().as_str();
    match amqp.kind() {
        // RabbitMQ answers a wrong user name or password with "Login was refused".
        AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) if reply.contains("Login") => Some(
            "the broker refused the user name or password in AVSYNC_AMQP_URL".to_owned(),
        ),
        AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => Some(format!(
            "the user in AVSYNC_AMQP_URL lacks a permission on the virtual host ({reply})"
        )),
        AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => Some(
            "the broker refused the virtual host in AVSYNC_AMQP_URL: check that it exists (`%2f` is the default `/`) and that the user may use it".to_owned(),
        ),
        _ => None,
    }
}

/// Logs the failures of a reconnecting loop: a setting problem once until it changes or a
/// connection succeeds (then at debug), any other failure as a warning each time.
#[derive(Debug, Default)]
pub struct FailureLog {
    said: Option<String>,
}

impl FailureLog {
    /// `what` says what the process cannot do meanwhile ("not consuming").
    pub fn failed(&mut self, what: &str, e: &lapin::Error, retry_in: Duration) {
        match setting_problem(e) {
            Some(problem) if self.said.as_ref() == Some(&problem) => {
                tracing::debug!(retry_in = ?retry_in, "{what}: {problem}");
            }
            Some(problem) => {
                tracing::error!("{what}: {problem}; retrying until that is fixed");
                self.said = Some(problem);
            }
            None => {
                self.said = None;
                tracing::warn!(error = %e, retry_in = ?retry_in, "{what}");
            }
        }
    }

    /// A connection succeeded: the next setting problem is news again.
    pub fn connected(&mut self) {
        self.said = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::protocol::AMQPError;

    fn amqp(kind: AMQPErrorKind, reply: &str) -> lapin::Error {
        lapin::ErrorKind::ProtocolError(AMQPError::new(kind, reply.into())).into()
    }

    #[test]
    fn a_refused_login_permission_or_vhost_names_the_setting() {
        let refused = AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED);
        let login = setting_problem(&amqp(
            refused.clone(),
            "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN",
        ))
        .expect("a setting problem");
        assert!(login.contains("user name or password"), "{login}");
        let permission = setting_problem(&amqp(
            refused,
            "ACCESS_REFUSED - access to queue 'q' in vhost '/' refused for user 'u'",
        ))
        .expect("a setting problem");
        assert!(permission.contains("permission"), "{permission}");
        let vhost = setting_problem(&amqp(
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED),
            "NOT_ALLOWED - vhost v not found",
        ))
        .expect("a setting problem");
        for problem in [login, permission, vhost] {
            assert!(problem.contains("AVSYNC_AMQP_URL"), "{problem}");
        }
    }

    #[test]
    fn what_retrying_cures_is_no_setting_problem() {
        let refused =
            lapin::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(setting_problem(&refused), None);
        assert_eq!(
            setting_problem(&amqp(
                AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED),
                "CONNECTION_FORCED - broker forced connection closure"
            )),
            None
        );
    }
}
