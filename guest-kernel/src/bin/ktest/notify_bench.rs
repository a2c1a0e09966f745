//! The notification benchmark's guest half (`cargo xtask bench notify`; the
//! contract is `para_abi::doorbell::bench`). Runs only with `notify.bench=N` on
//! the command line and the shim started with `--notify-bench`; otherwise it
//! checks that a bad mailbox address is refused.
//!
//! From ring 3 it notifies the host N times by each path — (a) an MMIO write
//! that exits to the shim, (b) an MMIO write bound to an ioeventfd, (c) a
//! doorbell event while the monitor spins, (d) a doorbell event after a pause
//! longer than the monitor's spin budget (`notify.pause_us`, default 500), so
//! that the monitor has parked and the send kicks — each notification
//! acknowledged by the host before the next one. Stats marks bracket each
//! path's measured notifications so the xtask can count KVM exits per one.

use alloc::alloc::{Layout, alloc_zeroed};
use core::sync::atomic::{AtomicU64, Ordering};
use guest_kernel::arch::cpu::rdtsc;
use guest_kernel::rt::doorbell;
use guest_kernel::rt::ktest_runner::require_asked;
use guest_kernel::rt::sys;
use guest_kernel::rt::time::tsc_khz;
use guest_kernel::{check, ktest, println};
use para_abi::doorbell::bench::{
    ACK, EXIT_GPA, IOEVENTFD_GPA, MAILBOX_BYTES, PATH, SEND_TSC, SEQ, TSC_KHZ, WORDS, count_word,
    cycles_word, mark_after, mark_before, path,
};
use para_abi::doorbell::device::BENCH;
use para_abi::doorbell::record::{Event, Op};
use para_abi::hypercall::Call;

/// Unmeasured notifications before each path's measured ones.
const WARMUP: u64 = 16;
/// Longest wait for one acknowledgement.
const ACK_TIMEOUT_MS: u64 = 2000;

struct Mailbox(&'static [AtomicU64; WORDS]);

impl Mailbox {
    fn new() -> Result<Self, &'static str> {
        let layout = Layout::from_size_align(MAILBOX_BYTES as usize, MAILBOX_BYTES as usize)
            .map_err(|_| "layout")?;
        // SAFETY: a non-zero-sized layout; the page is leaked (the host keeps
        // writing to it for the rest of the run).
        let p = unsafe { alloc_zeroed(layout) };
        if p.is_null() {
            return Err("no memory for the mailbox");
        }
        #[allow(clippy::cast_ptr_alignment)] // allocated page-aligned above
        let words = p.cast::<[AtomicU64; WORDS]>();
        // SAFETY: page-aligned, zeroed, WORDS * 8 <= 4096 bytes, never freed;
        // AtomicU64 has the layout of u64 and zero is a valid value.
        Ok(Self(unsafe { &*words }))
    }

    fn gpa(&self) -> u64 {
        // The guest identity-maps its RAM: the address is the guest-physical one.
        self.0.as_ptr() as u64
    }
}

fn mark(label: u64) -> Result<(), alloc::string::String> {
    sys::hypercall(Call::StatsMark, label)
        .map(|_| ())
        .map_err(|e| alloc::format!("mark {label:#x}: {e:?}"))
}

/// Notifies `n` times by `notify` under tag `tag`, each acknowledged before the
/// next; returns the guest cycles spent in `notify` in total.
fn run_path(
    mb: &Mailbox,
    tag: u64,
    n: u64,
    pause_cycles: u64,
    notify: &dyn Fn(),
) -> Result<u64, alloc::string::String> {
    let w = mb.0;
    let timeout = ACK_TIMEOUT_MS * tsc_khz();
    let mut cycles = 0;
    w[PATH].store(tag, Ordering::Relaxed);
    for _ in 0..n {
        let seq = w[SEQ].load(Ordering::Relaxed) + 1;
        w[SEQ].store(seq, Ordering::Relaxed);
        let t0 = rdtsc();
        w[SEND_TSC].store(t0, Ordering::Release);
        notify();
        let t1 = rdtsc();
        cycles += t1 - t0;
        while w[ACK].load(Ordering::Acquire) != seq {
            if rdtsc() - t1 > timeout {
                return Err(alloc::format!(
                    "path {}: notification {seq} not acknowledged within {ACK_TIMEOUT_MS} ms",
                    path::name(tag)
                ));
            }
            core::hint::spin_loop();
        }
        let t2 = rdtsc();
        while rdtsc() - t2 < pause_cycles {
            core::hint::spin_loop();
        }
    }
    Ok(cycles)
}

ktest!(
    fn notify_bench_refuses_a_mailbox_at_zero() {
        // Wherever the call exists (and under QEMU it does not).
        let r = sys::hypercall(Call::NotifyBench, 0);
        check!(!matches!(r, Ok(0)), "a mailbox at GPA 0 was accepted");
        Ok(())
    }
);

ktest!(
    fn notify_bench_four_paths() {
        require_asked("notify.bench")?;
        let cmdline = &guest_kernel::rt::start::system().cmdline;
        let n = cmdline
            .get("notify.bench")
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or("notify.bench=N takes a number of notifications")?;
        let pause_us = cmdline
            .get("notify.pause_us")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(500);
        let d = doorbell::get().map_err(|e| alloc::format!("notify bench needs doorbells: {e}"))?;
        let mb = Mailbox::new()?;
        mb.0[TSC_KHZ].store(tsc_khz(), Ordering::Relaxed);
        let r = sys::hypercall(Call::NotifyBench, mb.gpa());
        check!(
            matches!(r, Ok(0)),
            "the shim refused the benchmark ({r:?}): start it with --notify-bench"
        );
        let mmio = || {
            // SAFETY: the benchmark's exit address in the kick window (mapped
            // uncached for ring 3); a store is the whole protocol.
            unsafe { core::ptr::write_volatile(EXIT_GPA as *mut u32, 1) };
        };
        let ioeventfd = || {
            // SAFETY: as above, the ioeventfd address.
            unsafe { core::ptr::write_volatile(IOEVENTFD_GPA as *mut u32, 1) };
        };
        let bell = || {
            let _ = d.send(Event {
                device: BENCH,
                queue: 0,
                op: Op::Notify,
                arg: 0,
            });
        };
        let pause = pause_us * tsc_khz() / 1000;
        let paths: [(u64, &dyn Fn(), u64, u64); 4] = [
            (path::MMIO_EXIT, &mmio, n, 0),
            (path::IOEVENTFD, &ioeventfd, n, 0),
            (path::DOORBELL_SPIN, &bell, n, 0),
            // Paced: fewer, so the pause does not dominate the run.
            (path::DOORBELL_PARKED, &bell, (n / 4).max(1), pause),
        ];
        for (tag, notify, count, pace) in paths {
            run_path(&mb, path::WARMUP, WARMUP, pace, notify)?;
            let (_, _, kicks0) = d.counters();
            mark(mark_before(tag))?;
            let cycles = run_path(&mb, tag, count, pace, notify)?;
            mark(mark_after(tag))?;
            let (_, _, kicks1) = d.counters();
            mb.0[cycles_word(tag)].store(cycles, Ordering::Relaxed);
            mb.0[count_word(tag)].store(count, Ordering::Release);
            println!(
                "report: notify bench {}: {count} notifications, {} ns each from ring 3, {} doorbell kicks",
                path::name(tag),
                cycles * 1_000_000 / tsc_khz() / count,
                kicks1 - kicks0
            );
            if tag == path::DOORBELL_PARKED {
                check!(
                    kicks1 - kicks0 > 0,
                    "after {pause_us} us pauses the monitor had parked at least once"
                );
            }
        }
        Ok(())
    }
);
