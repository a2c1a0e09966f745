//! How a guest ended, in the same terms whichever VMM ran it.

use std::fmt;

use crate::infra::process::Ending;

/// What the guest's exit means. The guest writes status `s` to
/// isa-debug-exit and QEMU exits with `2*s + 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest wrote this status to isa-debug-exit.
    Status(u32),
    /// QEMU exited 0: a triple fault or reset under `-no-reboot`, or a
    /// shutdown, never a status the guest reported.
    QemuZero,
    /// An even exit code: QEMU itself failed (not the guest).
    QemuError(i32),
    Signalled(i32),
    TimedOut,
}

impl GuestExit {
    #[must_use]
    pub fn from_ending(ending: Ending) -> Self {
        match ending {
            Ending::Exited(0) => Self::QemuZero,
            Ending::Exited(code) if code > 0 && code % 2 == 1 => {
                Self::Status(code.unsigned_abs() / 2)
            }
            Ending::Exited(code) => Self::QemuError(code),
            Ending::Signalled(signal) => Self::Signalled(signal),
            Ending::TimedOut => Self::TimedOut,
        }
    }

    #[must_use]
    pub const fn passed(self) -> bool {
        matches!(self, Self::Status(0))
    }
}

impl fmt::Display for GuestExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Status(0) => f.write_str("status 0 (success)"),
            Self::Status(1) => f.write_str("status 1 (failure: tests failed)"),
            Self::Status(2) => f.write_str("status 2 (guest panicked)"),
            Self::Status(3) => f.write_str("status 3 (fatal exception)"),
            Self::Status(4) => f.write_str("status 4 (the application refused its configuration or device)"),
            Self::Status(s) => write!(f, "status {s} (not a status the guest defines)"),
            Self::QemuZero => {
                f.write_str("QEMU exited 0 without a guest status (triple fault/reset under -no-reboot, or shutdown)")
            }
            Self::QemuError(code) => write!(f, "QEMU failed with exit code {code}"),
            Self::Signalled(signal) => write!(f, "QEMU was killed by signal {signal}"),
            Self::TimedOut => f.write_str("timed out: QEMU was still running at the time limit and was killed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_exit_codes() {
        assert_eq!(
            GuestExit::from_ending(Ending::Exited(1)),
            GuestExit::Status(0)
        );
        assert_eq!(
            GuestExit::from_ending(Ending::Exited(3)),
            GuestExit::Status(1)
        );
        assert_eq!(
            GuestExit::from_ending(Ending::Exited(5)),
            GuestExit::Status(2)
        );
        assert_eq!(
            GuestExit::from_ending(Ending::Exited(7)),
            GuestExit::Status(3)
        );
        assert_eq!(
            GuestExit::from_ending(Ending::Exited(0)),
            GuestExit::QemuZero
        );
        assert_eq!(
            GuestExit::from_ending(Ending::Exited(2)),
            GuestExit::QemuError(2)
        );
        assert_eq!(
            GuestExit::from_ending(Ending::Exited(-1)),
            GuestExit::QemuError(-1)
        );
        assert_eq!(
            GuestExit::from_ending(Ending::Signalled(9)),
            GuestExit::Signalled(9)
        );
        assert_eq!(
            GuestExit::from_ending(Ending::TimedOut),
            GuestExit::TimedOut
        );
        assert!(GuestExit::Status(0).passed());
        for bad in [
            GuestExit::Status(1),
            GuestExit::QemuZero,
            GuestExit::TimedOut,
            GuestExit::QemuError(2),
        ] {
            assert!(!bad.passed(), "{bad}");
        }
        assert!(GuestExit::Status(2).to_string().contains("panicked"));
        assert!(GuestExit::Status(3).to_string().contains("fatal exception"));
        assert!(GuestExit::QemuZero.to_string().contains("triple fault"));
    }
}
