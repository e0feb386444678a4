//! Types and plumbing shared by the avsync ingress and worker: the tenant id and envelope decoded
//! at the edge, the queue topology, settings, telemetry and the private admin listener.

pub mod admin;
pub mod broker;
pub mod config;
pub mod envelope;
pub mod event;
pub mod shutdown;
pub mod telemetry;
pub mod tenant;
pub mod topology;

pub use envelope::{Envelope, EnvelopeError};
pub use tenant::{InvalidTenantId, TenantId};
pub use topology::Topology;
