//! Time from ring 3: the TSC (not trapped here, ~25 ns to read) converted with
//! the frequency ring 0 found at boot. Sleeping on the per-CPU timer is
//! [`super::wait::sleep`].

use crate::arch::{BOOT, cpu::rdtsc};
use core::sync::atomic::Ordering;
use core::time::Duration;

/// TSC ticks per millisecond.
#[must_use]
pub fn tsc_khz() -> u64 {
    BOOT.tsc_khz.load(Ordering::Relaxed).max(1)
}

/// A point in time, in TSC ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Instant(pub u64);

impl Instant {
    #[must_use]
    pub fn now() -> Self {
        Self(rdtsc())
    }

    #[must_use]
    pub fn elapsed(self) -> Duration {
        Self::now().duration_since(self)
    }

    #[must_use]
    pub fn duration_since(self, earlier: Self) -> Duration {
        cycles_to_duration(self.0.saturating_sub(earlier.0))
    }

    #[must_use]
    pub fn checked_add(self, d: Duration) -> Option<Self> {
        self.0.checked_add(duration_to_cycles(d)).map(Self)
    }
}

/// Nanoseconds since the TSC was reset (roughly: since the VM started).
#[must_use]
pub fn now_ns() -> u64 {
    cycles_to_duration(rdtsc()).as_nanos() as u64
}

#[must_use]
pub fn cycles_to_duration(cycles: u64) -> Duration {
    let ns = u128::from(cycles) * 1_000_000 / u128::from(tsc_khz());
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
}

#[must_use]
pub fn duration_to_cycles(d: Duration) -> u64 {
    let c = d.as_nanos() * u128::from(tsc_khz()) / 1_000_000;
    u64::try_from(c).unwrap_or(u64::MAX)
}
