//! Locking without poison.
//!
//! Every lock of the shim guards counters, queues or small tables that stay
//! usable after a panicking holder: a vCPU or device thread that panicked has
//! already ended its own work, and the rest of the guest (and the report) should
//! go on with what it left. So a poisoned lock is simply taken.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, taking it as it is when a holder panicked.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
