//! What operators run beside the consuming worker: the dead-letter queue commands (`dlq_cli`,
//! with `dlq_select` and `dlq_summary`), `migrate`, `reconcile_cli` (with `reconcile` and
//! AuthVital's API, `authvital`), and `status` (the worker's `/status` and the command that reads
//! it); `progress` draws their bars on a terminal.

pub mod authvital;
pub mod dlq_cli;
pub mod dlq_select;
pub mod dlq_summary;
pub mod migrate;
pub(crate) mod progress;
pub mod reconcile;
pub mod reconcile_cli;
pub mod status;
