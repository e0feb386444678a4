//! Types and plumbing shared by the avsync ingress and worker: the tenant id and envelope decoded
//! at the edge (always), the event model (feature `event`), the queue topology and broker
//! plumbing (`broker`), settings, telemetry, shutdown, the backoff of
//! reconnects and the private admin listener (`process`).

#[cfg(feature = "process")]
pub mod admin;
#[cfg(feature = "process")]
pub mod backoff;
#[cfg(feature = "broker")]
pub mod broker;
#[cfg(feature = "process")]
pub mod config;
pub mod envelope;
#[cfg(feature = "event")]
pub mod event;
#[cfg(feature = "process")]
pub mod shutdown;
#[cfg(feature = "process")]
pub mod telemetry;
pub mod tenant;
#[cfg(feature = "broker")]
pub mod topology;

pub use envelope::{Envelope, EnvelopeError};
pub use tenant::{InvalidTenantId, TenantId};
#[cfg(feature = "broker")]
pub use topology::Topology;
