//! The one path for log lines a guest can trigger: a rate limit with a count
//! of what it held back.
//!
//! A hostile guest can repeat a refused action millions of times a second;
//! each refusal is counted where it is refused, but logging each one would
//! flood the shim's output and cost the other guests CPU. A [`LogLimit`] lets
//! a burst of [`BURST`] lines through, then one per [`INTERVAL`] (a token
//! bucket, kept as the generic cell rate algorithm's one timestamp, so a
//! check is a few atomic operations and never blocks), and the next line it
//! lets through carries `suppressed`: how many it held back since the last.
//! Every limiter adds what it holds back to a process-wide count,
//! [`suppressed_total`], which the stats JSON reports as
//! `log_lines_suppressed`.
//!
//! Log through [`guest_log!`](crate::guest_log): with `limit = EXPR` it uses a
//! limiter of the caller's (one per guest and reason, say); without, one of
//! its own per call site.
//!
//! A leaf: it names no other module of the crate.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Lines a limiter lets through at once.
pub const BURST: u64 = 8;
/// Then one line per this long.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Lines held back by every limiter of the process.
static SUPPRESSED: AtomicU64 = AtomicU64::new(0);

/// Log lines held back so far, over all limiters.
#[must_use]
pub fn suppressed_total() -> u64 {
    SUPPRESSED.load(Ordering::Relaxed)
}

/// Nanoseconds since the first call (at least 1).
fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// At most `burst` lines at once, then one per `interval`.
#[derive(Debug)]
pub struct LogLimit {
    /// When the bucket will be full again (the theoretical arrival time), ns.
    full_at: AtomicU64,
    /// Held back since the last line let through.
    suppressed: AtomicU64,
    burst: u64,
    interval_ns: u64,
}

impl LogLimit {
    #[must_use]
    pub const fn new(burst: u64, interval: Duration) -> Self {
        let ns = interval.as_nanos();
        Self {
            full_at: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            burst: if burst == 0 { 1 } else { burst },
            interval_ns: if ns == 0 || ns > u64::MAX as u128 {
                1
            } else {
                ns as u64
            },
        }
    }

    /// `Some(n)` when the caller may log now (`n` lines were held back since
    /// the last one let through); `None`, counted, when it must stay quiet.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(now_ns())
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        let tolerance = (self.burst - 1).saturating_mul(self.interval_ns);
        let mut full_at = self.full_at.load(Ordering::Relaxed);
        loop {
            let from = full_at.max(now);
            if from - now > tolerance {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                SUPPRESSED.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            match self.full_at.compare_exchange_weak(
                full_at,
                from.saturating_add(self.interval_ns),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(self.suppressed.swap(0, Ordering::Relaxed)),
                Err(seen) => full_at = seen,
            }
        }
    }
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new(BURST, INTERVAL)
    }
}

/// Logs a guest-triggered line at `level` (`warn`, `info`...) through a
/// [`LogLimit`](crate::loglimit::LogLimit), with the held-back count as the
/// field `suppressed`:
///
/// ```ignore
/// guest_log!(warn, limit = self.limits[i], guest = %name, "refused {what}");
/// guest_log!(info, dev = %self.name, "device reset by driver"); // per call site
/// ```
#[macro_export]
macro_rules! guest_log {
    ($level:ident, limit = $limit:expr, $($arg:tt)+) => {
        if let Some(suppressed) = $limit.allow() {
            ::tracing::$level!(suppressed, $($arg)+);
        }
    };
    ($level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::loglimit::LogLimit =
            $crate::loglimit::LogLimit::new($crate::loglimit::BURST, $crate::loglimit::INTERVAL);
        $crate::guest_log!($level, limit = LIMIT, $($arg)+);
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_burst_goes_through_then_one_a_second_reporting_what_was_held_back() {
        let l = LogLimit::new(2, Duration::from_secs(1));
        let t = 10 * S;
        let before = suppressed_total();
        assert_eq!(l.allow_at(t), Some(0));
        assert_eq!(l.allow_at(t), Some(0));
        assert_eq!(l.allow_at(t), None);
        assert_eq!(l.allow_at(t + S / 2), None);
        assert_eq!(
            l.allow_at(t + S),
            Some(2),
            "the next line says two were held back"
        );
        assert_eq!(l.allow_at(t + S), None);
        assert!(suppressed_total() >= before + 3);
        // Quiet for long: the whole burst again.
        assert_eq!(l.allow_at(t + 60 * S), Some(1));
        assert_eq!(l.allow_at(t + 60 * S), Some(0));
        assert_eq!(l.allow_at(t + 60 * S), None);
    }

    #[test]
    fn a_flood_logs_a_bounded_number_of_lines() {
        let l = LogLimit::default();
        let mut logged = 0;
        // A million attempts over ten seconds.
        for i in 0..1_000_000u64 {
            if l.allow_at(S + i * 10_000).is_some() {
                logged += 1;
            }
        }
        assert!(logged <= BURST + 10, "{logged} lines");
        assert!(logged >= BURST, "{logged} lines");
    }

    #[test]
    fn the_macro_logs_through_a_limiter() {
        let l = LogLimit::new(1, Duration::from_hours(1));
        for _ in 0..3 {
            crate::guest_log!(warn, limit = l, guest = "t", "refused {}", 1);
            crate::guest_log!(info, "per call site");
        }
        assert_eq!(l.allow(), None, "the one line of the burst went");
        assert!(l.suppressed.load(Ordering::Relaxed) >= 2);
    }
}
