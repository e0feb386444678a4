
pub mod dlq;
