//! The broker's nodes as `AVSYNC_AMQP_URL` names them: one URL, or the comma-separated URLs of
//! one cluster's nodes, and the order in which a process tries them.
//!
//! A process starts at a random node, so that many workers given the same list spread over the
//! cluster instead of all landing on the first node; after a connection, the next attempt starts
//! at the node after the one it reached, so a lost connection moves on instead of going back to a
//! node that just went away.

use lapin::uri::AMQPUri;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Why `AVSYNC_AMQP_URL` is unusable. The text never quotes the setting, which holds passwords.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodesError {
    #[error("is not an AMQP URL like amqp://user:password@host:5672/%2f (not shown: it may hold a password)")]
    NotAUrl,
    #[error("lists {count} URLs, and URL {position} is not an AMQP URL like amqp://user:password@host:5672/%2f (not shown: it may hold a password)")]
    NotAUrlInList { position: usize, count: usize },
    #[error("lists {count} URLs, and URL {position} is empty (a comma too many?)")]
    EmptyInList { position: usize, count: usize },
}

/// The parsed node URLs and where the next connection attempt starts.
pub struct Nodes {
    uris: Vec<AMQPUri>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Nodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let nodes: Vec<String> = self.uris.iter().map(address).collect();
        f.debug_struct("Nodes").field("nodes", &nodes).finish()
    }
}

/// `host:port` of a node: what logs may say about it (never the user or password).
pub fn address(uri: &AMQPUri) -> String {
    format!("{}:{}", uri.authority.host, uri.authority.port)
}

impl Nodes {
    /// Parses the setting; the first attempt will start at a random node.
    pub fn parse(setting: &str) -> Result<Self, NodesError> {
        let entries: Vec<&str> = setting.split(',').map(str::trim).collect();
        let count = entries.len();
        let uris = entries
            .iter()
            .enumerate()
            .map(|(i, entry)| match (entry.is_empty(), count) {
                (true, 2..) => Err(NodesError::EmptyInList {
                    position: i + 1,
                    count,
                }),
                _ => entry.parse::<AMQPUri>().map_err(|_| match count {
                    1 => NodesError::NotAUrl,
                    _ => NodesError::NotAUrlInList {
                        position: i + 1,
                        count,
                    },
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            next: AtomicUsize::new(rand::random_range(0..uris.len())),
            uris,
        })
    }

    pub fn len(&self) -> usize {
        self.uris.len()
    }

    pub fn is_empty(&self) -> bool {
        self.uris.is_empty()
    }

    /// Every node once, starting where the last connection left off, each with its index.
    pub fn in_turn(&self) -> impl Iterator<Item = (usize, &AMQPUri)> {
        let start = self.next.load(Ordering::Relaxed);
        let n = self.uris.len();
        (0..n).map(move |k| {
            let i = (start + k) % n;
            (i, &self.uris[i])
        })
    }

    /// A connection to node `i` opened: the next attempt starts at the node after it.
    pub fn reached(&self, i: usize) {
        self.next
            .store((i + 1) % self.uris.len().max(1), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports(nodes: &Nodes) -> Vec<u16> {
        nodes.in_turn().map(|(_, u)| u.authority.port).collect()
    }

    const THREE: &str = "amqp://u:p@a:5671/%2f, amqp://u:p@b:5672/%2f,amqp://u:p@c:5673/%2f";

    #[test]
    fn one_url_is_one_node() {
        let nodes = Nodes::parse("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(ports(&nodes), [5672]);
        nodes.reached(0);
        assert_eq!(ports(&nodes), [5672]);
    }

    #[test]
    fn every_node_is_tried_once_and_a_lost_connection_moves_on() {
        let nodes = Nodes::parse(THREE).unwrap();
        let first = ports(&nodes);
        assert_eq!(first.len(), 3);
        let mut sorted = first.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [5671, 5672, 5673]);
        nodes.reached(1);
        assert_eq!(ports(&nodes), [5673, 5671, 5672]);
        nodes.reached(2);
        assert_eq!(ports(&nodes), [5671, 5672, 5673]);
    }

    #[test]
    fn processes_start_at_different_nodes() {
        let starts: std::collections::BTreeSet<u16> = (0..64)
            .map(|_| ports(&Nodes::parse(THREE).unwrap())[0])
            .collect();
        assert_eq!(starts.len(), 3, "64 processes all started at {starts:?}");
    }

    #[test]
    fn a_bad_entry_is_named_by_position_and_never_shown() {
        let bad = Nodes::parse("amqp://u:secret@a:5672/%2f,u:secret@b").unwrap_err();
        assert_eq!(
            bad,
            NodesError::NotAUrlInList {
                position: 2,
                count: 2
            }
        );
        let empty = Nodes::parse("amqp://u:secret@a:5672/%2f,").unwrap_err();
        assert_eq!(
            empty,
            NodesError::EmptyInList {
                position: 2,
                count: 2
            }
        );
        assert_eq!(Nodes::parse("u:secret@a").unwrap_err(), NodesError::NotAUrl);
        for e in [bad, empty] {
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }

    #[test]
    fn debug_shows_addresses_only() {
        let nodes = Nodes::parse("amqp://u:secret@a:5672/%2f").unwrap();
        let shown = format!("{nodes:?}");
        assert!(
            shown.contains("a:5672") && !shown.contains("secret"),
            "{shown}"
        );
    }
}
