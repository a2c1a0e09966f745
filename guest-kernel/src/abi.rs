//! The contract between the ring-0 core and ring 3: kernel-call numbers, their
//! error values, the interrupt vectors the kernel reserves, and the sizes the
//! assembly and the Rust code must agree on.

/// The most CPUs the kernel supports; the descriptor tables are precomputed for this many.
pub const MAX_CPUS: usize = 16;
/// Each CPU's ring-0 stack. Aligned to its size: ring-0 entry code finds the
/// CPU's [`crate::percpu`] block in the top quadword of the stack it runs on.
pub const KSTACK_SIZE: usize = 0x4000;
/// Each interrupt-stack-table stack (double fault, NMI, machine check).
pub const IST_SIZE: usize = 0x1000;
/// Each CPU's ring-3 stack.
pub const USER_STACK_SIZE: usize = 0x1_0000;

/// Fixed address of the 256 interrupt entry stubs (16 bytes each). Fixed so that
/// the IDT can be written as constant data in the image (no fill loop at boot).
pub const KSTUBS_BASE: u64 = 0x10_4000;
/// Fixed address of the per-CPU TSS array, so the GDT's TSS descriptors are constant.
pub const KTSS_BASE: u64 = 0x10_5000;
/// Bytes between consecutive TSSes.
pub const TSS_STRIDE: u64 = 128;

// The stubs fill their page, the TSS array fits its page, and each TSS slot
// holds a 64-bit TSS (104 bytes, SDM vol 3 §8.7).
const _: () = assert!(KTSS_BASE >= KSTUBS_BASE + 256 * 16);
const _: () = assert!(TSS_STRIDE * MAX_CPUS as u64 <= 0x1000);
const _: () =
    assert!(TSS_STRIDE as usize >= size_of::<x86_64::structures::tss::TaskStateSegment>());

/// Lowest address ring 3 may hand to the kernel (its image starts here; below
/// lie the kernel-private megabyte and firmware areas).
pub const USER_MIN: u64 = 0x20_0000;
/// Ring-3 buffers must end at or below this address (the start of the MMIO hole).
pub const USER_END: u64 = para_abi::layout::MMIO_HOLE_START;

/// Segment selectors of the kernel's GDT (its entries in this order: null,
/// kernel code, kernel data, user data, user code, then the TSSes). User data
/// precedes user code as SYSRET would need; nothing here uses SYSRET, but the
/// order costs nothing.
pub mod selector {
    use x86_64::PrivilegeLevel::{Ring0, Ring3};
    use x86_64::registers::segmentation::SegmentSelector;

    pub const KERNEL_CODE: u16 = SegmentSelector::new(1, Ring0).0;
    pub const KERNEL_DATA: u16 = SegmentSelector::new(2, Ring0).0;
    /// User data, RPL 3.
    pub const USER_DATA: u16 = SegmentSelector::new(3, Ring3).0;
    /// User 64-bit code, RPL 3.
    pub const USER_CODE: u16 = SegmentSelector::new(4, Ring3).0;
    /// TSS of CPU 0; CPU `n` uses `TSS0 + 16 * n` (64-bit TSS descriptors are
    /// 16 bytes: two GDT entries each).
    pub const TSS0: u16 = SegmentSelector::new(5, Ring0).0;
}

/// Interrupt vectors the kernel assigns (SDM vol 3 §6.2: 0–31 are exceptions).
pub mod vector {
    /// The legacy PICs are remapped here (and masked) so a spurious IRQ 7 cannot
    /// masquerade as an exception.
    pub const PIC_BASE: u8 = 0x20;
    /// The local APIC timer of each CPU.
    pub const TIMER: u8 = 0x30;
    /// "Look at your mailbox": wakes a CPU to run work queued for it.
    pub const WAKE: u8 = 0x31;
    /// Free for tests and benchmarks to bounce between CPUs.
    pub const TEST_IPI: u8 = 0x32;
    /// M3 upcalls from the shim (`KVM_INTERRUPT` through LINT0 `ExtINT`).
    pub const UPCALL: u8 = 0x33;
    /// M1 designation / writing notifications.
    pub const DOORBELL_NOTIFY: u8 = 0x34;
    /// M5 VM-queue arrivals (inbox empty → non-empty; `para_abi::vmq::ARRIVAL_VECTOR`).
    pub const VMQ_ARRIVAL: u8 = para_abi::vmq::ARRIVAL_VECTOR;
    /// First vector handed to device drivers.
    pub const DEVICE_BASE: u8 = 0x40;
    /// Kernel calls (a DPL-3 gate).
    pub const SYSCALL: u8 = 0x80;
    /// Local APIC error interrupt.
    pub const APIC_ERROR: u8 = 0xFE;
    /// Local APIC spurious vector: never acknowledged with an EOI (SDM vol 3 §11.9).
    pub const SPURIOUS: u8 = 0xFF;
}

/// Kernel-call numbers (RAX), arguments in RDI, RSI, RDX; the result comes back in RAX.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sys {
    /// Write bytes (RDI = pointer, RSI = length) to the console; returns the length.
    Write = 0,
    /// End the guest with status RDI. Does not return.
    Exit = 1,
    /// Sleep until an interrupt is pending on this CPU; returns at once if one already is.
    /// RDI = a TSC deadline to arm this CPU's timer for first (0 leaves the timer
    /// as it is); a deadline already passed fires the timer at once, so the call
    /// returns. One call instead of `SetTimer` + `Halt` saves a kernel call's
    /// two exits per sleep.
    Halt = 2,
    /// Arm this CPU's timer for TSC value RDI (0 disarms).
    SetTimer = 3,
    /// Send vector RSI to the CPU with APIC id RDI.
    SendIpi = 4,
    /// Start CPU index RDI with APIC id RSI; RDX = 0 sends INIT + SIPI, 1 a second SIPI.
    StartAp = 5,
    /// Read PCI configuration dword: RDI = bus/device/function (`b << 8 | d << 3 | f`), RSI = offset.
    PciRead = 6,
    /// Write PCI configuration dword RDX at bus/device/function RDI, offset RSI.
    PciWrite = 7,
    /// Run the reference arithmetic loop RDI times in ring 0; returns TSC cycles taken.
    Ring0Loop = 8,
    /// Pass hypercall RDI (a `para_abi::hypercall::Call` ring 3 may make) with
    /// argument RSI to the Exitless shim; `NoSys` elsewhere.
    Hypercall = 9,
    /// M3: program this CPU's LAPIC LINT0 for `ExtINT`, so that the shim's
    /// `KVM_INTERRUPT` upcalls reach it (SDM vol 3 §11.5.1).
    UpcallLint0 = 14,
    /// M3 tests: in ring 0 with IF = 0, post RDX ping upcalls to the shim (0 =
    /// none), spin RDI TSC cycles, then `sti` (RSI = 0) or `sti; mov ss` (RSI = 1)
    /// and spin with IF = 1 for R10 further cycles before `cli` again. Returns the
    /// TSC at `sti`; RDX = [`upcall_probe`] bits.
    UpcallMaskedSpin = 15,
    /// M4: read CR0; returns it.
    Cr0Read = 10,
    /// M4: set the CR0 bits in mask RDI (only MP and TS may be named) to those
    /// of RSI; returns the new CR0 (`Invalid` for other bits).
    Cr0Write = 11,
    /// Tests of the VMM only (the `hostile` leg): one port access from ring
    /// 3, with every operand the caller's. RDI = port, RSI = size (1, 2 or
    /// 4), plus [`PORT_IO_OUT`] for an `out`; RDX = RAX during the access
    /// (what an `out` writes; a hypercall's number), R10 = RBX (a
    /// hypercall's argument). Returns RAX after it: what an `in` read, what
    /// the VMM answered a hypercall. `NoSys` unless the command line has
    /// `kernel.port_io=1`.
    PortIo = 26,
    // Numbers reserved per mechanism: 10–13 M4 (control registers), 14–17 M3
    // (upcalls), 18–21 M5 (VM queues), 22–25 M2 (hints).
}

impl Sys {
    #[must_use]
    pub const fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw {
            0 => Self::Write,
            1 => Self::Exit,
            2 => Self::Halt,
            3 => Self::SetTimer,
            4 => Self::SendIpi,
            5 => Self::StartAp,
            6 => Self::PciRead,
            7 => Self::PciWrite,
            8 => Self::Ring0Loop,
            9 => Self::Hypercall,
            14 => Self::UpcallLint0,
            15 => Self::UpcallMaskedSpin,
            10 => Self::Cr0Read,
            11 => Self::Cr0Write,
            26 => Self::PortIo,
            _ => return None,
        })
    }
}

/// [`Sys::PortIo`]: the access is an `out` (else an `in`).
pub const PORT_IO_OUT: u64 = 1 << 8;

/// What [`Sys::UpcallMaskedSpin`] saw of the upcall vector's pending bit.
pub mod upcall_probe {
    /// Already pending when the call began (the caller had not drained it).
    pub const AT_ENTRY: u64 = 1 << 0;
    /// Pending at the end of the masked spin, before `sti`.
    pub const WHILE_MASKED: u64 = 1 << 1;
    /// Pending as read by the instruction in the interrupt shadow.
    pub const IN_SHADOW: u64 = 1 << 2;
    /// Pending as read by the first instruction after the shadow.
    pub const AFTER_SHADOW: u64 = 1 << 3;
    /// The ping hypercall was refused (or not under the shim).
    pub const PING_FAILED: u64 = 1 << 4;
    /// Pending during a further spin with IF = 1 after the shadow (before `cli`).
    pub const LATER: u64 = 1 << 5;
    /// Pending only after the final `cli` (IF = 1 was never seen by the VMM).
    pub const AFTER_CLI: u64 = 1 << 6;
}

/// Kernel-call error results, returned in RAX as these (huge) values.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SysError {
    /// No such kernel call.
    NoSys = u64::MAX,
    /// A pointer argument leaves ring 3's memory.
    Fault = u64::MAX - 1,
    /// Another argument is out of range.
    Invalid = u64::MAX - 2,
}

impl SysError {
    /// Interprets a raw kernel-call result.
    #[must_use]
    pub const fn from_result(raw: u64) -> Option<Self> {
        match raw {
            u64::MAX => Some(Self::NoSys),
            r if r == u64::MAX - 1 => Some(Self::Fault),
            r if r == u64::MAX - 2 => Some(Self::Invalid),
            _ => None,
        }
    }
}

/// Guest exit statuses (the xtask runner and the shim read these).
pub mod status {
    pub const SUCCESS: u64 = 0;
    pub const TESTS_FAILED: u64 = 1;
    pub const PANIC: u64 = 2;
    pub const FATAL_EXCEPTION: u64 = 3;
    /// The application refused its configuration or its devices (a bad
    /// command line, a NIC without MSI-X, ...) and said why on the console.
    pub const APP_ERROR: u64 = 4;
}

/// True when `[ptr, ptr + len)` lies inside memory ring 3 may name to the kernel.
#[must_use]
pub const fn is_user_range(ptr: u64, len: u64) -> bool {
    match ptr.checked_add(len) {
        Some(end) => ptr >= USER_MIN && end <= USER_END,
        None => false,
    }
}

/// The reference arithmetic loop timed in both rings (the data plane runs
/// natively on this platform's KVM, the emulated core does not). A xorshift keeps the compiler from
/// folding it; both rings call this very function, so they run identical code.
#[inline(never)]
#[must_use]
pub fn arith_loop(iterations: u64) -> u64 {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut acc: u64 = 0;
    let mut i = 0;
    while i < iterations {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        acc = acc.wrapping_add(x);
        i += 1;
    }
    core::hint::black_box(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sys_numbers_round_trip() {
        for raw in 0..10 {
            let sys = Sys::from_raw(raw).expect("defined call");
            assert_eq!(sys as u64, raw);
        }
        assert_eq!(Sys::from_raw(10), Some(Sys::Cr0Read));
        assert_eq!(Sys::from_raw(11), Some(Sys::Cr0Write));
        assert_eq!(Sys::from_raw(12), None);
        for raw in [14, 15] {
            assert_eq!(Sys::from_raw(raw).map(|s| s as u64), Some(raw));
        }
        assert_eq!(Sys::from_raw(16), None);
        assert_eq!(Sys::from_raw(26), Some(Sys::PortIo));
        assert_eq!(Sys::from_raw(27), None);
        assert_eq!(Sys::from_raw(u64::MAX), None);
    }

    #[test]
    fn errors_are_recognised_and_lengths_are_not() {
        assert_eq!(SysError::from_result(u64::MAX), Some(SysError::NoSys));
        assert_eq!(SysError::from_result(u64::MAX - 1), Some(SysError::Fault));
        assert_eq!(SysError::from_result(u64::MAX - 2), Some(SysError::Invalid));
        assert_eq!(SysError::from_result(4096), None);
    }

    #[test]
    fn user_ranges_exclude_kernel_and_mmio_and_overflow() {
        assert!(is_user_range(USER_MIN, 16));
        assert!(!is_user_range(0x10_0000, 16), "kernel-private megabyte");
        assert!(!is_user_range(USER_END - 8, 16), "runs into the MMIO hole");
        assert!(!is_user_range(u64::MAX - 4, 16), "wraps around");
        assert!(is_user_range(USER_END - 16, 16));
    }

    #[test]
    fn arith_loop_is_deterministic_and_depends_on_count() {
        assert_eq!(arith_loop(1000), arith_loop(1000));
        assert_ne!(arith_loop(1000), arith_loop(1001));
        assert_eq!(arith_loop(0), 0);
    }
}
