//! Waking the main thread: it sleeps in `sigtimedwait` for the stop signals
//! and for [`SIGNAL`], which a vCPU thread sends when its guest ends and the
//! API thread when it queues a command, so neither waits for the main
//! loop's next tick (a guest's end used to be noticed up to 50 ms late).

use std::sync::OnceLock;

/// The wake-up signal, blocked in every thread (the mask is inherited from
/// the main thread, which blocks it before starting any) and only ever
/// taken by the main thread's `sigtimedwait`.
pub const SIGNAL: libc::c_int = libc::SIGUSR2;

static MAIN: OnceLock<libc::pthread_t> = OnceLock::new();

/// Records the calling thread as the one [`wake`] signals.
pub fn register_main() {
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    let _ = MAIN.set(me);
}

/// Wakes the main thread if it is registered; harmless otherwise (tests).
pub fn wake() {
    if let Some(&t) = MAIN.get() {
        // SAFETY: `t` is the main thread, which lives as long as the process;
        // SIGNAL is blocked everywhere, so it is only ever queued, never run.
        unsafe {
            libc::pthread_kill(t, SIGNAL);
        }
    }
}
