//! The typed event, decoded once from the body: which types exist and what each does
//! (`catalogue`), its place in the event order (`order`), what it sets (`effect`), and how the
//! `data` object is read (`data`), and how an effect is held compactly (`packed`).

mod catalogue;
mod data;
mod effect;
mod order;
mod packed;

pub use catalogue::{
    effectful_types, ignored_types, type_label, EventKind, CATALOGUE, KNOWN_TYPES,
};
pub use effect::{Change, Effect, EventError, Field, MembershipStatus};
pub use order::{EventKey, EventTime, InvalidTimestamp};
pub use packed::PackedEffect;
