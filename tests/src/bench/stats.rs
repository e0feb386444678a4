//! Medians over repetitions and percentiles over latency samples.

use serde::Serialize;

/// A figure over its repetitions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    /// None without samples; NaN samples are left out (they come from empty measurements).
    pub fn of(samples: &[f64]) -> Option<Self> {
        let mut sorted: Vec<f64> = samples.iter().copied().filter(|s| !s.is_nan()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
        })
    }
}

/// The nearest-rank `q`-quantile (0 < q ≤ 1) of samples sorted ascending: the smallest sample
/// with at least `q` of all samples at or below it.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Samples sorted ascending, for [`percentile`].
pub fn sorted(mut samples: Vec<f64>) -> Vec<f64> {
    samples.sort_by(f64::total_cmp);
    samples
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn medians_of_odd_and_even_counts() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Summary::of(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[f64::NAN]), None);
        assert_eq!(Summary::of(&[f64::NAN, 5.0]).unwrap().median, 5.0);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&s, 0.5), Some(50.0));
        assert_eq!(percentile(&s, 0.99), Some(99.0));
        assert_eq!(percentile(&s, 1.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
    }

    proptest! {
        #[test]
        fn a_summary_lies_within_its_samples(samples in prop::collection::vec(-1e9f64..1e9, 1..50)) {
            let s = Summary::of(&samples).unwrap();
            prop_assert!(s.min <= s.median && s.median <= s.max);
            prop_assert!(samples.iter().all(|x| s.min <= *x && *x <= s.max));
            prop_assert!(samples.contains(&s.min) && samples.contains(&s.max));
        }

        #[test]
        fn percentiles_are_samples_and_grow_with_q(
            samples in prop::collection::vec(0f64..1e6, 1..200),
            a in 0.01f64..1.0,
            b in 0.01f64..1.0,
        ) {
            let s = sorted(samples.clone());
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            let (p_lo, p_hi) = (percentile(&s, lo).unwrap(), percentile(&s, hi).unwrap());
            prop_assert!(samples.contains(&p_lo));
            prop_assert!(p_lo <= p_hi);
            let at_or_below = s.iter().filter(|x| **x <= p_hi).count() as f64;
            prop_assert!(at_or_below >= hi * s.len() as f64 - 1e-9);
        }
    }
}
