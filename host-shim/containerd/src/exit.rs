//! How a host-shim child's end becomes the task's exit status.
//!
//! The host shim runs one guest here and writes `--stats-json` at exit, with
//! the guest's own exit status (the exit hypercall's argument) or `null` when
//! the guest ended otherwise (stopped by SIGTERM, a triple fault, an error of
//! the shim). Its process exit code only says 0 (every guest exited 0), 1
//! (otherwise) or 2 (usage error), so the JSON is read first.

use serde::Deserialize;

/// How the host-shim process ended, as `waitid` saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostEnd {
    Code(i32),
    Signal(i32),
}

/// The part of the host shim's `--stats-json` this shim reads; the rest of
/// the document is ignored.
#[derive(Debug, Deserialize)]
pub struct Stats {
    pub guests: Vec<GuestStats>,
}

#[derive(Debug, Deserialize)]
pub struct GuestStats {
    pub name: String,
    /// What happened, in words ("exit status 0", "triple fault ...").
    pub outcome: String,
    pub exit_status: Option<u32>,
}

/// What the task reports when the guest gave no status and the host shim
/// exited 0 anyway (it was stopped by a signal from someone else).
pub const NO_STATUS: u32 = 255;

/// The task's exit status.
/// - The host shim died of a signal: 128 + the signal, as a shell reports it.
/// - The guest gave an exit status: that status.
/// - The guest gave none and this shim had sent a signal (`ctr task kill`):
///   128 + that signal, so SIGTERM reads 143 as for any other container.
/// - Otherwise the host shim's exit code (1: triple fault or shim error,
///   2: it refused its command line), or [`NO_STATUS`].
#[must_use]
pub fn task_exit_status(end: HostEnd, guest: Option<&GuestStats>, signal_sent: Option<i32>) -> u32 {
    let from_signal = |s: i32| 128 + s.unsigned_abs();
    match (end, guest.and_then(|g| g.exit_status), signal_sent) {
        (HostEnd::Code(_), Some(status), _) => status,
        (HostEnd::Signal(s), _, _) | (HostEnd::Code(_), None, Some(s)) => from_signal(s),
        (HostEnd::Code(0), None, None) => NO_STATUS,
        (HostEnd::Code(c), None, None) => c.unsigned_abs(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(json: &str) -> Stats {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_guest_status_wins_then_the_signal_then_the_code() {
        let s = stats(
            r#"{"shim_max_rss_kib":1,"guests":[{"name":"g","outcome":"exit status 7","exit_status":7,"exits":3}]}"#,
        );
        assert_eq!(
            task_exit_status(HostEnd::Code(1), s.guests.first(), None),
            7
        );
        assert_eq!(
            task_exit_status(HostEnd::Code(1), s.guests.first(), Some(15)),
            7
        );
        let s = stats(r#"{"guests":[{"name":"g","outcome":"interrupted","exit_status":null}]}"#);
        assert_eq!(
            task_exit_status(HostEnd::Code(0), s.guests.first(), Some(15)),
            143
        );
        assert_eq!(
            task_exit_status(HostEnd::Code(0), s.guests.first(), None),
            NO_STATUS
        );
        assert_eq!(task_exit_status(HostEnd::Code(1), None, None), 1);
        assert_eq!(task_exit_status(HostEnd::Signal(9), None, Some(9)), 137);
    }

    #[test]
    fn a_renamed_key_fails_the_parse() {
        assert!(serde_json::from_str::<Stats>(r#"{"guests":[{"name":"g","status":0}]}"#).is_err());
    }
}
