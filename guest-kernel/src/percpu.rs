//! Per-CPU data shared by the ring-0 core and ring 3.
//!
//! Ring 3 reaches its CPU's block through the GS base (set by ring 0; ring 3
//! cannot change it without FSGSBASE, which stays off). Ring-0 entry code does
//! not trust GS — ring 3 may load a selector into it — and finds the block in
//! the top quadword of the kernel stack it runs on instead.

use crate::abi::MAX_CPUS;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// What ring 0 saw when ring 3 faulted inside a recovery scope.
#[repr(C)]
#[derive(Debug, Default)]
pub struct FaultRecord {
    pub vector: AtomicU64,
    pub error: AtomicU64,
    pub rip: AtomicU64,
    pub cr2: AtomicU64,
}

#[repr(C, align(64))]
#[derive(Debug)]
pub struct PerCpu {
    /// Address of this block (`gs:[0]`).
    pub self_ptr: AtomicU64,
    /// Index of this CPU (0 = boot CPU).
    pub cpu_id: AtomicU32,
    /// Local APIC id.
    pub apic_id: AtomicU32,
    /// Interrupt vectors recorded by ring 0 and not yet handled by ring 3: bit
    /// `v` of the 256-bit string. Ring 0 sets bits; ring 3 swaps words to zero.
    pub pending: [AtomicU64; 4],
    /// The virtual interrupt flag: 1 lets ring 0 divert into the upcall entry,
    /// 0 makes it only record the vector.
    pub vif: AtomicU32,
    /// Set by the CPU itself once it runs in ring 3.
    pub online: AtomicU32,
    /// The ring-3 stack ring 0 starts this CPU on (application processors).
    pub user_stack_top: AtomicU64,
    /// Address of the active recovery buffer (`rt::fault::JmpBuf`), or 0.
    pub recover: AtomicU64,
    /// Filled by ring 0 before it diverts a faulting ring-3 context to recovery.
    pub fault: FaultRecord,
    /// Upcalls this CPU has run (ring-3 bookkeeping).
    pub upcalls: AtomicU64,
    /// Interrupts counted per vector by the ring-3 dispatcher would be too
    /// large here; this counts all of them.
    pub interrupts: AtomicU64,
}

impl PerCpu {
    const fn new() -> Self {
        Self {
            self_ptr: AtomicU64::new(0),
            cpu_id: AtomicU32::new(0),
            apic_id: AtomicU32::new(0),
            pending: [const { AtomicU64::new(0) }; 4],
            vif: AtomicU32::new(0),
            online: AtomicU32::new(0),
            user_stack_top: AtomicU64::new(0),
            recover: AtomicU64::new(0),
            fault: FaultRecord {
                vector: AtomicU64::new(0),
                error: AtomicU64::new(0),
                rip: AtomicU64::new(0),
                cr2: AtomicU64::new(0),
            },
            upcalls: AtomicU64::new(0),
            interrupts: AtomicU64::new(0),
        }
    }

    /// True when any vector is recorded pending.
    pub fn any_pending(&self) -> bool {
        self.pending.iter().any(|w| w.load(Ordering::Acquire) != 0)
    }

    pub fn id(&self) -> usize {
        self.cpu_id.load(Ordering::Relaxed) as usize
    }
}

/// Offsets the assembly uses.
pub const PENDING_OFFSET: usize = core::mem::offset_of!(PerCpu, pending);
pub const VIF_OFFSET: usize = core::mem::offset_of!(PerCpu, vif);
pub const RECOVER_OFFSET: usize = core::mem::offset_of!(PerCpu, recover);

/// Every CPU's block. Lives in ring-3-visible memory: ring 3 owns most of it.
pub static CPUS: [PerCpu; MAX_CPUS] = [const { PerCpu::new() }; MAX_CPUS];

/// Number of CPUs that the platform described (set once during bring-up).
pub static CPU_COUNT: AtomicU32 = AtomicU32::new(1);

/// This CPU's block, through the GS base. Valid in ring 3 and ring 0 alike,
/// as long as ring 3 has not reloaded GS.
#[inline]
#[must_use]
pub fn current() -> &'static PerCpu {
    let p: u64;
    // SAFETY: ring 0 pointed the GS base at this CPU's entry in `CPUS` before
    // any code that calls this ran; reading gs:[0] has no side effects.
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) p, options(nostack, readonly, preserves_flags));
    }
    // SAFETY: the self pointer is the address of a `'static` element of `CPUS`.
    unsafe { &*(p as *const PerCpu) }
}

/// This CPU's index.
#[inline]
#[must_use]
pub fn cpu_id() -> usize {
    current().id()
}
