//! The typed event decoded once, for the apply rules.
