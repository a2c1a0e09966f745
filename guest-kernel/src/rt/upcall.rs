//! M3 upcalls in ring 3: the shim's own events to this guest,
//! injected on [`vector::UPCALL`] only when a vCPU's interrupt window is open.
//!
//! The vector says only "look at your mailbox". The mailbox of this CPU (slot =
//! APIC id, which the shim numbers like its vCPU indices) carries per-class
//! counters ([`para_abi::upcall`]); the dispatcher takes the new upcalls of
//! each class in priority order, acknowledges them by storing the count it
//! took, and runs the class handler once with how many there were. Counts,
//! not interrupts, carry the events: an interrupt that finds nothing new is
//! counted as empty, and nothing is lost or run twice.
//!
//! Bring-up ([`super::start`]) calls [`bring_up`], which runs [`init`] on
//! every online CPU when the shim offers upcalls; [`init`] may be called
//! again (the tests do): it only re-does the same set-up. Under QEMU (or with
//! `--upcalls off`) the feature bit is absent and [`init`] reports
//! [`UpcallError::Unavailable`].

use crate::abi::{MAX_CPUS, vector};
use crate::arch::BOOT;
use crate::percpu;
use core::fmt;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use para_abi::discovery::{self, features};
use para_abi::layout::area;
use para_abi::upcall::{self, CLASSES};

pub use para_abi::upcall::Class;

/// An upcall handler gets its class and how many upcalls of it arrived (≥ 1).
/// It runs in interrupt context (see [`super::irq`]): record, count, wake.
pub type UpcallHandler = fn(Class, u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpcallError {
    /// Not under the Exitless shim, or it offers no upcalls.
    Unavailable,
    /// The shim's leaf names an area this guest cannot use (says why).
    BadArea(&'static str),
    /// This CPU has no mailbox.
    NoMailbox,
    /// The kernel refused to program LINT0.
    Kernel,
}

impl fmt::Display for UpcallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unavailable => write!(
                f,
                "no upcalls here (not under the Exitless shim, or turned off)"
            ),
            Self::BadArea(why) => write!(f, "upcall area unusable: {why}"),
            Self::NoMailbox => write!(f, "this CPU has no upcall mailbox"),
            Self::Kernel => write!(f, "the kernel refused to route LINT0"),
        }
    }
}

static HANDLERS: [AtomicUsize; CLASSES] = [const { AtomicUsize::new(0) }; CLASSES];
/// Upcalls taken per CPU and class.
static TAKEN: [[AtomicU64; CLASSES]; MAX_CPUS] =
    [const { [const { AtomicU64::new(0) }; CLASSES] }; MAX_CPUS];
/// Interrupts on the vector that found no new upcall.
static EMPTY: AtomicU64 = AtomicU64::new(0);
/// Upcall vector interrupts handled.
static INTERRUPTS: AtomicU64 = AtomicU64::new(0);
/// CPUs (bit per CPU index) whose LINT0 takes upcalls.
static ENABLED_CPUS: AtomicU32 = AtomicU32::new(0);

/// True when the shim offers upcalls (the area is checked by [`init`]).
#[must_use]
pub fn offered() -> bool {
    BOOT.under_shim.load(Ordering::Relaxed) != 0
        && crate::arch::cpu::cpuid(discovery::LEAF_FEATURES, 0).eax & features::UPCALLS != 0
}

fn check_area() -> Result<(), UpcallError> {
    if !offered() {
        return Err(UpcallError::Unavailable);
    }
    let l = crate::arch::cpu::cpuid(discovery::LEAF_UPCALLS, 0);
    let (gpa, size, version) = discovery::area_from_registers([l.eax, l.ebx, l.ecx, l.edx])
        .ok_or(UpcallError::BadArea("the leaf is empty"))?;
    // The guest maps only the fixed area (para_abi::layout::area) for ring 3.
    if gpa != area::UPCALLS || u64::from(size) != area::UPCALLS_SIZE {
        return Err(UpcallError::BadArea("not the fixed upcall area"));
    }
    if version != upcall::VERSION {
        return Err(UpcallError::BadArea("unknown layout version"));
    }
    Ok(())
}

/// Makes this CPU take upcalls: checks the shim's offer, installs the vector
/// handler, routes LINT0 as `ExtINT` (the kernel then tells the shim, which
/// from then on may send this CPU the guest-wide classes). Call on each CPU
/// that should take them; calling it again is harmless.
pub fn init() -> Result<(), UpcallError> {
    check_area()?;
    let apic_id = percpu::current().apic_id.load(Ordering::Relaxed);
    if upcall::posted_offset(apic_id, Class::Ping).is_none() {
        return Err(UpcallError::NoMailbox);
    }
    super::irq::register(vector::UPCALL, on_vector);
    super::sys::upcall_lint0().map_err(|_| UpcallError::Kernel)?;
    ENABLED_CPUS.fetch_or(1 << percpu::cpu_id(), Ordering::AcqRel);
    Ok(())
}

/// At bring-up, on the boot CPU (while the others start): makes it take
/// upcalls when the shim offers them. Each application processor sets
/// itself up before it reports online (`init_ap`): no IPI round trip per
/// CPU, where every interrupt entry is emulated ring-0 code. A CPU that fails
/// is logged and left out (the shim then sends it nothing but the pings it
/// asks for itself); [`taking`] counts the others.
pub fn bring_up() -> Result<(), UpcallError> {
    check_area()?;
    init().inspect_err(|e| log::warn!("cpu{}: takes no upcalls: {e}", percpu::cpu_id()))
}

/// CPUs that take upcalls.
#[must_use]
pub fn taking() -> usize {
    ENABLED_CPUS.load(Ordering::Acquire).count_ones() as usize
}

/// An application processor's own set-up, before it reports online: as
/// [`init`], quiet where the shim offers no upcalls.
pub(super) fn init_ap() {
    match init() {
        Ok(()) | Err(UpcallError::Unavailable) => {}
        Err(e) => log::warn!("cpu{}: takes no upcalls: {e}", percpu::cpu_id()),
    }
}

/// True when this CPU takes upcalls.
#[must_use]
pub fn enabled_here() -> bool {
    ENABLED_CPUS.load(Ordering::Acquire) & (1 << percpu::cpu_id()) != 0
}

/// True when CPU `cpu` takes upcalls.
#[must_use]
pub fn enabled_on(cpu: usize) -> bool {
    cpu < 32 && ENABLED_CPUS.load(Ordering::Acquire) & (1 << cpu) != 0
}

/// Installs `handler` for `class` (replacing any). Upcalls of a class with no
/// handler are still acknowledged and counted.
pub fn register_upcall(class: Class, handler: UpcallHandler) {
    HANDLERS[class as usize].store(handler as usize, Ordering::Release);
}

/// Removes the handler of `class`.
pub fn unregister_upcall(class: Class) {
    HANDLERS[class as usize].store(0, Ordering::Release);
}

/// Upcalls of `class` taken on CPU `cpu` so far.
#[must_use]
pub fn taken(cpu: usize, class: Class) -> u64 {
    TAKEN[cpu][class as usize].load(Ordering::Acquire)
}

/// (upcall vector interrupts handled, those that found nothing new).
#[must_use]
pub fn interrupts() -> (u64, u64) {
    (
        INTERRUPTS.load(Ordering::Relaxed),
        EMPTY.load(Ordering::Relaxed),
    )
}

fn mailbox_word(offset: u64) -> &'static AtomicU32 {
    // SAFETY: `offset` comes from para_abi::upcall's bounded helpers; the area is
    // identity-mapped for ring 3 and the shim keeps it for the VM's life; the
    // shim writes it concurrently, hence an atomic.
    unsafe { &*((area::UPCALLS + offset) as *const AtomicU32) }
}

/// Takes the new upcalls of this CPU, class by class in priority order.
fn on_vector(_: u8) {
    let pc = percpu::current();
    let (cpu, slot) = (pc.id(), pc.apic_id.load(Ordering::Relaxed));
    INTERRUPTS.fetch_add(1, Ordering::Relaxed);
    let mut any = false;
    for class in Class::ALL {
        let (Some(p), Some(a)) = (
            upcall::posted_offset(slot, class),
            upcall::acked_offset(slot, class),
        ) else {
            return;
        };
        let posted = mailbox_word(p).load(Ordering::Acquire);
        let acked = mailbox_word(a).load(Ordering::Relaxed);
        let n = posted.wrapping_sub(acked);
        if n == 0 {
            continue;
        }
        any = true;
        mailbox_word(a).store(posted, Ordering::Release);
        TAKEN[cpu][class as usize].fetch_add(u64::from(n), Ordering::AcqRel);
        let h = HANDLERS[class as usize].load(Ordering::Acquire);
        if h != 0 {
            // SAFETY: only `register_upcall` stores non-zero values, all `UpcallHandler`s.
            let h: UpcallHandler = unsafe { core::mem::transmute::<usize, UpcallHandler>(h) };
            h(class, n);
        }
    }
    if !any {
        EMPTY.fetch_add(1, Ordering::Relaxed);
    }
}
