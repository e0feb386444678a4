//! Everything both processes do with RabbitMQ besides the topology: connecting, confirmed
//! publishing (`publisher`), the message headers and their readers (`headers`), and broker
//! failures in the operator's words. A refused login or virtual host does not heal by retrying:
//! it is said once, at ERROR, naming AVSYNC_AMQP_URL (never its text, which holds the password),
//! while the process keeps retrying in case the broker's users are being fixed.

pub mod headers;
mod publisher;

pub use publisher::{ConfirmedPublisher, PublishError};

use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::{Connection, ConnectionProperties};
use std::time::Duration;

/// Longest wait for a connection to open, so that a broker that accepts TCP but never answers
/// cannot stall reconnection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a connection named `name` (shown in the broker's management UI), within
/// [`CONNECT_TIMEOUT`].
pub async fn connect(amqp_url: &str, name: &str) -> Result<Connection, lapin::Error> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(amqp_url, properties)).await {
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
