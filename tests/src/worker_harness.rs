//! Starts worker instances for tests.
