pub mod dlq;
pub mod retry;
