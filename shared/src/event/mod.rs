//! The typed event, decoded once from the body: which types exist and what each does
//! (`catalogue`), its place in the event order (`order`), what it sets (`effect`), and how the
//! `data` object is read (`data`).

mod catalogue;
mod data;
mod effect;
mod order;

pub use catalogue::{
    effectful_types, ignored_types, type_label, EventKind, CATALOGUE, KNOWN_TYPES,
};
pub use effect::{Change, Effect, EventError, Field, MembershipStatus};
pub use order::{EventKey, EventTime, InvalidTimestamp};
