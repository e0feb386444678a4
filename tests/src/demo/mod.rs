//! The demo a new user runs with one command (`cargo run -p avsync-tests --bin demo`):
//! avsync end to end on the local PostgreSQL and RabbitMQ, explained by its own output.
//!
//! - `story`: the events, and the order and duplication they are delivered in;
//! - `run`: the services, the sending, the waiting, the report and the cleanup;
//! - `table` and `prom`: the report's tables and the `/metrics` text they come from.

pub mod prom;
pub mod run;
pub mod story;
pub mod table;

pub use run::{run, DemoArgs, DemoError, Summary};
