//! The few OS calls xtask needs, each wrapped once: who we are, and making
//! sure a child process group (QEMU, `cargo test`) never outlives us.
//!
//! Every child runs in its own process group so that a timeout can kill it
//! with everything it started. Because that group is not the terminal's
//! foreground group, Ctrl-C reaches only xtask: the handler installed by
//! [`kill_children_on_signal`] kills the current child group and then lets the
//! signal terminate xtask as usual. If xtask dies some other way (`SIGKILL`),
//! the child's parent-death signal kills it.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

/// Process group id of the child currently running, 0 if none.
static CHILD_GROUP: AtomicI32 = AtomicI32::new(0);

/// Whether we run as root (effective uid 0).
#[must_use]
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The environment variable by which the host shim arranges itself to end
/// with xtask (see `host-shim`'s `die_with_parent`).
pub const PARENT_PID_ENV: &str = "EXITLESS_PARENT_PID";

/// Puts the command's process in a new process group and arranges for it to
/// get `SIGKILL` when xtask dies: by the child itself when the command
/// carries [`PARENT_PID_ENV`] (no fork here then: std can spawn without
/// one, which keeps a measured start free of xtask's fork), else between
/// fork and exec.
pub fn contain(cmd: &mut Command) {
    let parent = std::process::id();
    cmd.process_group(0);
    if cmd.get_envs().any(|(k, v)| {
        k == PARENT_PID_ENV && v.is_some_and(|v| v.to_str() == Some(&parent.to_string()))
    }) {
        return;
    }
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe calls (prctl, getppid) and builds errors without
    // allocating.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // xtask may have died before prctl took effect: then we have been
            // re-parented and must not start.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Records the running child's process group (its pid, see [`contain`]) so
/// the signal handler can kill it.
pub fn set_child_group(pid: u32) {
    CHILD_GROUP.store(i32::try_from(pid).unwrap_or(0), Ordering::SeqCst);
}

/// The child has been reaped: nothing for the signal handler to kill.
pub fn clear_child_group() {
    CHILD_GROUP.store(0, Ordering::SeqCst);
}

/// Sends `SIGKILL` to every process in the group.
pub fn kill_group(pid: u32) {
    if let Ok(pgid) = i32::try_from(pid)
        && pgid > 0
    {
        // SAFETY: kill has no memory-safety preconditions; a stale group id
        // at worst yields ESRCH.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

extern "C" fn on_terminating_signal(signal: libc::c_int) {
    let pgid = CHILD_GROUP.load(Ordering::SeqCst);
    // SAFETY: kill, waitpid, signal and raise are async-signal-safe. The
    // group leader is our child: reaping it here leaves no zombie behind (if
    // the main thread reaps it first, waitpid just fails with ECHILD). Then
    // we restore the default action and re-raise so xtask terminates the way
    // the signal asks.
    unsafe {
        if pgid > 0 {
            libc::kill(-pgid, libc::SIGKILL);
            libc::waitpid(pgid, std::ptr::null_mut(), 0);
        }
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}

/// Installs the handler that kills the current child group on Ctrl-C,
/// `SIGTERM` and `SIGHUP` before xtask exits.
pub fn kill_children_on_signal() {
    let handler = on_terminating_signal as extern "C" fn(libc::c_int);
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler is an `extern "C" fn(c_int)` that only makes
        // async-signal-safe calls.
        unsafe {
            libc::signal(signal, handler as libc::sighandler_t);
        }
    }
}
