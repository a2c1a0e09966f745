//! What wakes a stack: its NIC's RX interrupt and the shim's interrupt-vCPU
//! hints (M2) announced by `HintUpdate` upcalls (M3). The handlers run in
//! upcall context, so they only count and send a wake-up IPI to the CPU that
//! polls the stack; the counters they bump are what a sleeping stack waits on.

use crate::abi::vector;
use crate::percpu;
use crate::rt::hints::{self, Follower};
use crate::rt::start::system;
use crate::rt::upcall::{self, Class};
use crate::rt::{irq, smp};
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use drivers::net::RX_QUEUE;

/// NICs this kernel drives at most (two vectors each from `DEVICE_BASE`).
pub const MAX_NICS: usize = 8;

/// Bumped by a NIC's RX interrupt handler; the stack sleeps until it moves.
static RX_SIGNAL: [AtomicU64; MAX_NICS] = [const { AtomicU64::new(0) }; MAX_NICS];
/// The CPU polling each NIC's stack: an interrupt taken elsewhere wakes it.
static STACK_CPU: [AtomicUsize; MAX_NICS] = [const { AtomicUsize::new(0) }; MAX_NICS];
/// Bumped by the M3 `HintUpdate` upcall: the shim published a new hint.
static HINT_UPCALLS: AtomicU64 = AtomicU64::new(0);
/// NICs (bit per index) whose RX queue follows hints.
static HINT_NICS: AtomicUsize = AtomicUsize::new(0);

/// The RX vector of virtio-net NIC `nic`; its TX vector is the next one.
pub fn rx_vector(nic: usize) -> u8 {
    vector::DEVICE_BASE + 2 * nic as u8
}

fn nic_of(v: u8) -> usize {
    usize::from((v - vector::DEVICE_BASE) / 2)
}

/// Takes virtio-net NIC `index`'s RX and TX interrupts, with this CPU as the
/// one its stack runs on; returns the RX vector.
pub fn attach_virtio(index: usize) -> u8 {
    let rx = rx_vector(index);
    irq::register(rx, on_rx);
    irq::register(rx + 1, on_tx);
    set_stack_cpu(index);
    rx
}

/// Makes this CPU the one NIC `index`'s stack is polled on.
pub fn set_stack_cpu(index: usize) {
    STACK_CPU[index].store(percpu::cpu_id(), Ordering::Relaxed);
}

/// RX interrupts NIC `index` has taken so far.
pub fn rx_signals(index: usize) -> u64 {
    RX_SIGNAL[index].load(Ordering::Acquire)
}

/// `HintUpdate` upcalls taken so far (the shim announcing new hints).
#[must_use]
pub fn hint_upcalls() -> u64 {
    HINT_UPCALLS.load(Ordering::Acquire)
}

/// Runs in upcall context: count, and wake the stack's CPU if that is not us.
fn on_rx(v: u8) {
    let nic = nic_of(v);
    RX_SIGNAL[nic].fetch_add(1, Ordering::Release);
    let target = STACK_CPU[nic].load(Ordering::Relaxed);
    if target != percpu::cpu_id() {
        let _ = smp::send_ipi(target, vector::WAKE);
    }
}

/// TX completions are reaped on the send path; their interrupts only count.
fn on_tx(_: u8) {}

/// Runs in upcall context: the shim announced a new hint, so the stacks that
/// follow hints look at it now rather than at their queue's next interrupt.
fn on_hint_update(_: Class, n: u32) {
    HINT_UPCALLS.fetch_add(u64::from(n), Ordering::Release);
    let (me, nics) = (percpu::cpu_id(), HINT_NICS.load(Ordering::Acquire));
    let mut woken = 0u64;
    for nic in (0..MAX_NICS).filter(|i| nics & (1 << i) != 0) {
        let target = STACK_CPU[nic].load(Ordering::Relaxed);
        if target != me && target < 64 && woken & (1 << target) == 0 {
            woken |= 1 << target;
            let _ = smp::send_ipi(target, vector::WAKE);
        }
    }
}

/// The RX queue's hint follower for NIC `index` (PCI device `device`, RX
/// interrupts at APIC id `apic`), unless hints are off or not offered.
pub fn hint_follower(index: usize, device: u8, apic: u32) -> Option<Follower> {
    match hints::get() {
        // An explicit net.irq_cpu= is a placement asked for: hints do not
        // move it, unless hints=on says they should.
        Ok(_)
            if system().cmdline.get("net.irq_cpu").is_some()
                && system().cmdline.get("hints") != Some("on") =>
        {
            log::info!("net{index}: net.irq_cpu= given; interrupt hints not followed");
            None
        }
        Ok(_) => {
            HINT_NICS.fetch_or(1 << index, Ordering::AcqRel);
            upcall::register_upcall(Class::HintUpdate, on_hint_update);
            Some(Follower::new(device, RX_QUEUE, apic))
        }
        Err(e) => {
            log::info!("net{index}: default interrupt placement: {e}");
            None
        }
    }
}
