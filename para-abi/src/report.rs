//! Summaries of what guests measure and report to the host, computed the same
//! way on both sides: a guest's `rtt p99` and the host's p99 over the samples
//! it collected mean the same thing.

/// Console lines a measuring guest prints just outside its steady state (its
/// timed work, without boot and teardown), for a host that times them: a VMM
/// with no stats marks (QEMU) is sampled between them.
pub const STEADY_BEGIN: &str = "steady-state: begin";
pub const STEADY_END: &str = "steady-state: end";

/// The `p`-th percentile (0–100) of `sorted` (ascending), by the nearest-rank
/// method: the value at 1-based rank ⌈p·n/100⌉ (rank 1 for `p` = 0), i.e. the
/// smallest sample that at least `p` % of the samples do not exceed.
///
/// The result is always one of the samples, never an interpolation between
/// two: the median of an even number of samples is the lower middle one, and
/// p99 of fewer than 100 samples is the largest. `None` for no samples or a
/// `p` above 100.
#[must_use]
pub fn percentile<T: Copy>(sorted: &[T], p: u32) -> Option<T> {
    if sorted.is_empty() || p > 100 {
        return None;
    }
    let n = sorted.len() as u64;
    let rank = (u64::from(p) * n).div_ceil(100).max(1);
    sorted.get(usize::try_from(rank - 1).ok()?).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    #[test]
    fn nearest_rank_on_a_hundred_samples() {
        let s: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&s, 0), Some(1));
        assert_eq!(percentile(&s, 1), Some(1));
        assert_eq!(percentile(&s, 50), Some(50));
        assert_eq!(percentile(&s, 99), Some(99));
        assert_eq!(percentile(&s, 100), Some(100));
    }

    #[test]
    fn small_sets_give_a_sample_never_an_interpolation() {
        assert_eq!(percentile(&[7u64], 99), Some(7));
        assert_eq!(percentile(&[7u64], 0), Some(7));
        // Even count: the lower middle sample.
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 50), Some(2.0));
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 50), Some(2.0));
        // p99 of fewer than 100 samples is the largest.
        assert_eq!(percentile(&[1u32, 2, 3, 4, 5], 99), Some(5));
        assert_eq!(percentile(&[1u32, 2, 3, 4, 5], 80), Some(4));
        assert_eq!(percentile(&[1u32, 2, 3, 4, 5], 81), Some(5));
    }

    #[test]
    fn nothing_to_summarise_or_a_bad_p_is_none() {
        assert_eq!(percentile::<u64>(&[], 50), None);
        assert_eq!(percentile(&[1u64, 2], 101), None);
    }

    #[test]
    fn the_rank_does_not_overflow_for_large_sets() {
        let s: Vec<u32> = (0..100_000).collect();
        assert_eq!(percentile(&s, 99), Some(98_999));
        assert_eq!(percentile(&s, 100), Some(99_999));
    }
}
