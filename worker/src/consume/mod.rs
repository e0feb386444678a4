//! The broker side of the worker: the session that consumes every partition queue (`session`),
//! what each delivery is (`fate`), the batches per tenant and when they go (`batch`,
//! `schedule`), and the queue depth series (`depth`).

pub(crate) mod batch;
pub mod depth;
pub(crate) mod fate;
pub(crate) mod schedule;
pub(crate) mod session;
