//! The benchmark: avsync measured against the limits of its own broker and database, in one run
//! against the local RabbitMQ and PostgreSQL.
//!
//! Each phase puts a figure of avsync beside the limit it cannot beat:
//! 1. `broker`: raw confirmed, persistent publishes (the ingress's ceiling);
//! 2. `ingress`: signed webhooks over HTTP, accepted per second, with latency;
//! 3. `pipeline`: a raw consumer applying batches of 100 in one transaction, and the naive one
//!    upsert and one ack per message (the worker's ceiling and floor), plus raw upsert rates;
//! 4. `worker`: the real worker binary draining a pre-filled queue, and its lag at half that rate;
//! 5. `scale`: what one new tenant session costs the server (`cold`); the same drain, with the
//!    worker's defaults, over a few, some and many tenants equally busy, over the many with
//!    Zipf-distributed activity and with two workers; drawn as a chart;
//! 6. `neighbour`: one tenant's table locked under a burst of its events, and the lag of the
//!    other tenants, its partition's neighbours above all.
//!
//! Every figure is the median of several repetitions, with the CPU each part of the system used
//! while it was measured, so a reader can tell what limited it.

pub mod args;
pub mod broker;
mod chart;
mod cold;
pub mod cpu;
mod drain;
pub mod loadgen;
mod neighbour;
pub mod pipeline;
pub mod report;
pub mod resources;
pub mod run;
pub mod stats;
pub mod worker;
pub mod workload;

pub use args::{BenchArgs, Phase};
pub use report::Report;
pub use resources::Resources;

use std::path::PathBuf;
use std::time::Duration;

/// Why a benchmark run stopped. Each says what the operator can do about it.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("RabbitMQ at 127.0.0.1:5672: {0} (is it running? see the README)")]
    Broker(#[from] lapin::Error),
    #[error("RabbitMQ refused a publish ({0}); check the broker's disk and memory alarms")]
    PublishRejected(&'static str),
    #[error(
        "PostgreSQL: {0} (is it running on 127.0.0.1:5432 with trust auth for user postgres?)"
    )]
    Database(#[from] sqlx::Error),
    #[error("the ingress under test: {0}")]
    Ingress(String),
    #[error("no worker binary at {}: build it first with `cargo build --release -p avsync-worker`, or point --worker-bin at one", path.display())]
    WorkerBinaryMissing { path: PathBuf },
    #[error("worker {index} could not be started from {}: {source}", path.display())]
    WorkerSpawn {
        index: usize,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("worker {index} exited early ({status}); its log lines are above")]
    WorkerExited { index: usize, status: String },
    #[error(
        "timed out after {after:?} waiting for {what}; the run's figures so far are in the report"
    )]
    Timeout { what: String, after: Duration },
    #[error("a task of the benchmark failed: {0} (a bug in the benchmark; report it with the output above)")]
    Internal(String),
    #[error("interrupted; the benchmark's queues and databases were removed")]
    Interrupted,
    #[error("writing the report {}: {source}", path.display())]
    Report {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}
