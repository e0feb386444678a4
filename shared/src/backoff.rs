//! How a long-running task paces its attempts against something that is down (the broker, the
//! JWKS host, PostgreSQL, AuthVital's API): exponential from a minimum to a maximum, with jitter
//! so that many processes that lost the same peer do not come back in step.

use backon::ExponentialBuilder;
use std::time::Duration;

/// Exponential backoff with jitter from `min` to `max`, without end; cap it with
/// `with_max_times` where the caller gives up.
pub fn jittered(min: Duration, max: Duration) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
}

#[cfg(test)]
mod tests {
    use super::*;
    use backon::BackoffBuilder;

    #[test]
    fn it_never_ends_and_never_passes_its_maximum() {
        let max = Duration::from_millis(80);
        let waits: Vec<Duration> = jittered(Duration::from_millis(10), max)
            .build()
            .take(50)
            .collect();
        assert_eq!(waits.len(), 50);
        // Jitter adds up to one more delay on top of the capped one.
        assert!(waits.iter().all(|w| *w <= max * 2), "{waits:?}");
    }

    #[test]
    fn a_cap_on_attempts_still_applies() {
        let waits = jittered(Duration::from_millis(1), Duration::from_millis(2))
            .with_max_times(3)
            .build()
            .count();
        assert_eq!(waits, 3);
    }
}
