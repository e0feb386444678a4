//! Harness for avsync's end-to-end tests, benchmark and demo: every test gets its own topology
//! prefix and its own databases on the real local RabbitMQ and PostgreSQL, and removes them after.

pub mod bench;
pub mod demo;
pub mod fake_authvital;
pub mod faults;
pub mod ingress_harness;
pub mod processes;
pub mod rabbit_cluster;
pub mod support;
pub mod worker_harness;
