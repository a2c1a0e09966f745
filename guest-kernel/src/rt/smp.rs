//! Application processors from ring 3: start them (the INIT/SIPI itself is a
//! kernel call), give each a ring-3 stack, and run closures on a chosen CPU.

use super::platform::Cpu;
use super::time::{Instant, duration_to_cycles};
use super::{irq, sys, wait};
use crate::abi::{MAX_CPUS, USER_STACK_SIZE, vector};
use crate::percpu::{self, CPU_COUNT, CPUS};
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, Ordering};
use core::time::Duration;

type Job = Box<dyn FnOnce() + Send>;

static MAILBOX: [spin::Mutex<VecDeque<Job>>; MAX_CPUS] =
    [const { spin::Mutex::new(VecDeque::new()) }; MAX_CPUS];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmpError {
    NoSuchCpu(usize),
    Offline(usize),
    Timeout,
}

/// How long a CPU may take to reach ring 3 after INIT + SIPI before a second
/// SIPI is sent, and before it is given up on (ring 0 is emulated here, and the
/// AP runs real-mode and ring-0 code first).
const FIRST_SIPI_WAIT: Duration = Duration::from_millis(200);
const SECOND_SIPI_WAIT: Duration = Duration::from_secs(3);

fn wake(_: u8) {}

/// Starts every usable CPU in `cpus` other than this one, running
/// `meanwhile` on this CPU once, while the first of them comes up (its ring-0
/// start is emulated: hundreds of µs this CPU would otherwise spin away).
/// Returns how many CPUs are online afterwards (this one included).
pub fn start_aps(cpus: &[Cpu], meanwhile: impl FnOnce()) -> usize {
    let mut meanwhile = Some(meanwhile);
    irq::register(vector::WAKE, wake);
    let me = percpu::current().apic_id.load(Ordering::Relaxed);
    let mut next = 1;
    for cpu in cpus.iter().filter(|c| c.usable && c.apic_id != me) {
        if next >= MAX_CPUS {
            log::warn!(
                "smp: more than {MAX_CPUS} CPUs described; ignoring APIC id {}",
                cpu.apic_id
            );
            continue;
        }
        let pc = &CPUS[next];
        let stack = Box::leak(alloc::vec![0u8; USER_STACK_SIZE].into_boxed_slice());
        let top = (stack.as_ptr() as u64 + USER_STACK_SIZE as u64) & !0xF;
        pc.user_stack_top.store(top, Ordering::Release);
        pc.apic_id.store(cpu.apic_id, Ordering::Relaxed);
        let t0 = Instant::now();
        let sent = sys::start_ap(next, cpu.apic_id, false).is_ok();
        if sent && let Some(f) = meanwhile.take() {
            f();
        }
        let ok = sent
            && (wait_online(next, FIRST_SIPI_WAIT)
                || (sys::start_ap(next, cpu.apic_id, true).is_ok()
                    && wait_online(next, SECOND_SIPI_WAIT)));
        if ok {
            // Debug: under the shim each console line costs a kernel call.
            log::debug!(
                "smp: cpu{next} (APIC id {}) online after {} us",
                cpu.apic_id,
                t0.elapsed().as_micros()
            );
            next += 1;
        } else {
            log::error!(
                "smp: APIC id {} did not come up; continuing without it",
                cpu.apic_id
            );
        }
    }
    CPU_COUNT.store(next as u32, Ordering::Release);
    if let Some(f) = meanwhile {
        f();
    }
    next
}

fn wait_online(cpu: usize, limit: Duration) -> bool {
    let deadline = Instant::now().0 + duration_to_cycles(limit);
    while Instant::now().0 < deadline {
        if CPUS[cpu].online.load(Ordering::Acquire) != 0 {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

/// Ring-3 entry of an application processor: take upcalls where offered,
/// report in, then serve its mailbox.
#[unsafe(no_mangle)]
extern "C" fn exitless_user_ap(cpu: u64) -> ! {
    let cpu = cpu as usize;
    super::upcall::init_ap();
    CPUS[cpu].online.store(1, Ordering::Release);
    irq::enable();
    loop {
        wait::wait_until(|| !MAILBOX[cpu].lock().is_empty());
        loop {
            let job = MAILBOX[cpu].lock().pop_front();
            match job {
                Some(job) => job(),
                None => break,
            }
        }
    }
}

/// Number of CPUs online.
#[must_use]
pub fn online() -> usize {
    CPU_COUNT.load(Ordering::Acquire) as usize
}

/// The APIC id of CPU `cpu`.
#[must_use]
pub fn apic_id(cpu: usize) -> Option<u32> {
    (cpu < online()).then(|| CPUS[cpu].apic_id.load(Ordering::Relaxed))
}

/// Sends `vector` to CPU `cpu`.
pub fn send_ipi(cpu: usize, vector: u8) -> Result<(), SmpError> {
    let apic = apic_id(cpu).ok_or(SmpError::NoSuchCpu(cpu))?;
    sys::send_ipi(apic, vector).map_err(|_| SmpError::NoSuchCpu(cpu))
}

/// Queues `f` to run on CPU `cpu` (in its ring-3 idle loop) and wakes it.
pub fn run_on(cpu: usize, f: impl FnOnce() + Send + 'static) -> Result<(), SmpError> {
    if cpu >= online() {
        return Err(SmpError::NoSuchCpu(cpu));
    }
    if cpu != 0 && CPUS[cpu].online.load(Ordering::Acquire) == 0 {
        return Err(SmpError::Offline(cpu));
    }
    MAILBOX[cpu].lock().push_back(Box::new(f));
    send_ipi(cpu, vector::WAKE)
}

/// Runs `f` on CPU `cpu` and returns its result; this CPU halts meanwhile.
pub fn run_on_wait<R: Send + 'static>(
    cpu: usize,
    timeout: Duration,
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, SmpError> {
    if cpu == percpu::cpu_id() {
        return Ok(f());
    }
    let slot = Arc::new(spin::Mutex::new(None));
    let done = Arc::new(AtomicBool::new(false));
    let me = percpu::cpu_id();
    let (slot2, done2) = (slot.clone(), done.clone());
    run_on(cpu, move || {
        let r = f();
        *slot2.lock() = Some(r);
        done2.store(true, Ordering::Release);
        let _ = send_ipi(me, vector::WAKE);
    })?;
    irq::register(vector::WAKE, wake);
    let deadline = Instant::now()
        .checked_add(timeout)
        .unwrap_or(Instant(u64::MAX));
    wait::wait_until_or(Some(deadline), || done.load(Ordering::Acquire));
    sys::set_timer(0);
    slot.lock().take().ok_or(SmpError::Timeout)
}
