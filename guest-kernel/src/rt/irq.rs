//! Interrupt handling in ring 3: the vector-dispatch table, the upcall
//! dispatcher ring 0 diverts into, and the virtual interrupt flag. Ring 3
//! never executes `cli`/`sti`: it masks delivery with that per-CPU flag in
//! memory, and ring 0's interrupt stub only diverts into the upcall entry
//! while the flag is set. Sleeping until something happens is [`super::wait`].
//!
//! Handlers run like Unix signal handlers: at any point of the interrupted
//! code, with delivery masked. They must not take locks the interrupted code
//! might hold (the heap's included): record, count, wake — and return.

use crate::abi::MAX_CPUS;
use crate::percpu::{self, PerCpu};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// A handler gets the vector it was registered for.
pub type Handler = fn(u8);

static HANDLERS: [AtomicUsize; 256] = [const { AtomicUsize::new(0) }; 256];
static COUNTS: [[AtomicU64; 256]; MAX_CPUS] =
    [const { [const { AtomicU64::new(0) }; 256] }; MAX_CPUS];
static UNHANDLED: AtomicU64 = AtomicU64::new(0);

/// Installs `handler` for `vector`, replacing any previous one.
pub fn register(vector: u8, handler: Handler) {
    HANDLERS[vector as usize].store(handler as usize, Ordering::Release);
}

/// Removes the handler of `vector`.
pub fn unregister(vector: u8) {
    HANDLERS[vector as usize].store(0, Ordering::Release);
}

/// Interrupts with `vector` handled so far on `cpu`.
#[must_use]
pub fn count(cpu: usize, vector: u8) -> u64 {
    COUNTS[cpu][vector as usize].load(Ordering::Relaxed)
}

/// Interrupts that arrived with no handler registered.
#[must_use]
pub fn unhandled() -> u64 {
    UNHANDLED.load(Ordering::Relaxed)
}

fn drain(pc: &PerCpu) {
    let cpu = pc.id();
    for word in 0..4 {
        let mut bits = pc.pending[word].swap(0, Ordering::AcqRel);
        while bits != 0 {
            let bit = bits.trailing_zeros();
            bits &= bits - 1;
            let vector = (word as u32 * 64 + bit) as u8;
            COUNTS[cpu][vector as usize].fetch_add(1, Ordering::Relaxed);
            pc.interrupts.fetch_add(1, Ordering::Relaxed);
            let h = HANDLERS[vector as usize].load(Ordering::Acquire);
            if h == 0 {
                UNHANDLED.fetch_add(1, Ordering::Relaxed);
            } else {
                // SAFETY: only `register` stores non-zero values, and it stores `Handler`s.
                let h: Handler = unsafe { core::mem::transmute::<usize, Handler>(h) };
                h(vector);
            }
        }
    }
}

/// Runs every pending handler, then sets the virtual interrupt flag; loops if
/// something became pending between the last drain and the flag going up
/// (ring 0 only diverts into an upcall while the flag is set).
fn drain_and_enable(pc: &PerCpu) {
    loop {
        drain(pc);
        pc.vif.store(1, Ordering::Release);
        if !pc.any_pending() {
            return;
        }
        pc.vif.store(0, Ordering::Release);
    }
}

/// Ring 0 diverts here (through `exitless_upcall_entry`) with the flag cleared.
#[unsafe(no_mangle)]
extern "C" fn exitless_upcall_dispatch() {
    let pc = percpu::current();
    pc.upcalls.fetch_add(1, Ordering::Relaxed);
    drain_and_enable(pc);
}

/// Masks delivery on this CPU; returns whether it was enabled.
#[must_use]
pub fn disable() -> bool {
    percpu::current().vif.swap(0, Ordering::AcqRel) != 0
}

/// Undoes [`disable`]: when `was_enabled`, runs what became pending and unmasks.
pub fn restore(was_enabled: bool) {
    if was_enabled {
        drain_and_enable(percpu::current());
    }
}

/// Unmasks delivery on this CPU, running anything pending first.
pub fn enable() {
    drain_and_enable(percpu::current());
}

/// True when this CPU delivers interrupts to handlers now.
#[must_use]
pub fn enabled() -> bool {
    percpu::current().vif.load(Ordering::Relaxed) != 0
}

/// Runs `f` with delivery masked.
pub fn without<R>(f: impl FnOnce() -> R) -> R {
    let was = disable();
    let r = f();
    restore(was);
    r
}
