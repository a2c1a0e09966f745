//! A rate limit for log lines a guest can trigger.
//!
//! A hostile guest can repeat a refused action millions of times a second; each
//! refusal is counted, but logging each one would flood the shim's output and cost
//! the other guests CPU. A [`LogLimit`] lets a few lines through per window and
//! reports how many it held back in the next line it lets through.

use crate::sync::lock;
use std::sync::Mutex;
use std::time::{Duration, Instant};

struct Window {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

/// At most `per_window` lines per `window`; the rest are counted, not logged.
pub struct LogLimit {
    per_window: u32,
    window: Duration,
    state: Mutex<Window>,
}

impl LogLimit {
    #[must_use]
    pub const fn new(per_window: u32, window: Duration) -> Self {
        Self {
            per_window,
            window,
            state: Mutex::new(Window {
                start: None,
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` when the caller may log now (`n` lines were held back since the
    /// last one logged); `None` when it must stay quiet.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut w = lock(&self.state);
        if w.start.is_none_or(|s| now.duration_since(s) >= self.window) {
            w.start = Some(now);
            w.logged = 0;
        }
        if w.logged < self.per_window {
            w.logged += 1;
            return Some(std::mem::take(&mut w.suppressed));
        }
        w.suppressed += 1;
        None
    }
}

impl Default for LogLimit {
    /// Ten lines a second.
    fn default() -> Self {
        Self::new(10, Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_cut_and_the_next_window_reports_what_was_held_back() {
        let l = LogLimit::new(2, Duration::from_secs(1));
        let t = Instant::now();
        assert_eq!(l.allow_at(t), Some(0));
        assert_eq!(l.allow_at(t), Some(0));
        assert_eq!(l.allow_at(t), None);
        assert_eq!(l.allow_at(t + Duration::from_millis(500)), None);
        assert_eq!(l.allow_at(t + Duration::from_secs(1)), Some(2));
        assert_eq!(l.allow_at(t + Duration::from_secs(1)), Some(0));
    }
}
