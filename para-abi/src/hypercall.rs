//! Hypercalls: the guest's explicit requests to the shim.
//!
//! A hypercall is a 32-bit `out` to [`PORT`] from ring 0 with the call number in
//! EAX and arguments in RBX, RCX, RDX, RSI (the order KVM's own hypercalls use). It
//! always exits to the shim, which reads the registers, acts, and writes a
//! [`Status`] back into RAX before resuming. Port I/O, not `vmcall`: under KVM a
//! `vmcall` is answered inside the kernel and never reaches a user-space VMM.

/// The I/O port hypercalls are issued on. Outside every legacy PC device range.
pub const PORT: u16 = 0x0510;

/// Hypercall numbers (EAX).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// End this guest with the exit status in RBX (0 = success), the same
    /// semantics as QEMU's isa-debug-exit: the guest's outcome, not the shim's.
    Exit = 1,
    /// The guest reached its application's main (RBX = microseconds since its
    /// PVH entry by its own TSC). Lets the VMM report boot time to main.
    MainReached = 2,
    /// Snapshot the guest's counters (KVM exits over all its vCPUs, doorbell
    /// events) under label RBX, so a test can measure what happened between
    /// two marks. The VMM reports the marks in its statistics.
    StatsMark = 3,
    /// M1 benchmark (`cargo xtask bench notify`): RBX = the guest-physical
    /// address of a page-aligned mailbox ([`crate::doorbell::bench`]). The shim,
    /// when started with `--notify-bench`, measures KVM's TSC offset for this
    /// vCPU and from then on answers each benchmark notification through the
    /// mailbox; refused (`UnknownCall`) otherwise.
    NotifyBench = 20,
    /// M1 test: move this guest's vCPU doorbell range to the spare range of
    /// another host CPU's monitor (shim `--doorbell-redesignate`), bump the
    /// table generation and raise the region's notify vector; refused
    /// (`UnknownCall`) otherwise.
    DoorbellRedesignate = 21,
    /// M3: post RBX (1..=`upcall::PING_MAX`) ping upcalls to the calling vCPU now;
    /// they arrive when its interrupt window opens.
    UpcallPing = 8,
    /// M3: post `count` pings to the calling vCPU, one every `interval_us` µs,
    /// from a shim thread (RBX = `upcall::storm_arg(count, interval_us)`).
    UpcallStorm = 9,
    /// M3: the calling vCPU's LAPIC now takes `ExtINT` on LINT0, so the shim may
    /// send it the guest-wide upcall classes (re-designations, hint updates).
    /// The guest kernel issues it when it programs LINT0. RBX is ignored.
    UpcallEnable = 10,
    /// M4: write control flag (RBX = [`crate::ctrl::encode_write`]) that is
    /// neither owned nor shadowed.
    CtrlWrite = 4,
    /// M4: read a trapping control flag (RBX = flag id); RAX = 0 or 1.
    CtrlRead = 5,
    /// M4: ask the shim to change this vCPU's masks (RBX = [`crate::ctrl::Masks::encode`]);
    /// applied at this exit. For tests and benchmarks.
    CtrlSetMasks = 6,
    /// M4: a counter ([`crate::ctrl::query`], RBX) in RAX.
    CtrlQuery = 7,
    /// M5: deliver this guest's outbox now, before it resumes (the immediate
    /// policy, and the lazy policy's way out when its outbox is full).
    VmqFlush = 12,
    /// Console output: write the bytes at guest-physical RBX\[31:0\], RBX\[47:32\]
    /// of them (at most [`CONSOLE_MAX`]), to this guest's console, as if
    /// written to its COM1 THR one by one ([`console_arg`]). One exit for a
    /// whole line where the UART costs one per byte.
    ConsoleWrite = 28,
    /// A debug trap (#DB, vector 1, or #BP, vector 3) taken in ring 3 while
    /// a debugger is attached ([`crate::discovery::features::DEBUG_TRAPS`]):
    /// RBX = the guest-physical address of the saved ring-3 state, laid out
    /// as [`debug_frame`]. The shim stops the guest there for its debugger,
    /// which reads and writes the ring-3 registers in that frame; the call
    /// returns when the debugger resumes the vCPU, and the guest then
    /// returns from the trap with the frame as it stands (RIP, RFLAGS.TF
    /// for a step, RF past a breakpoint). Refused (`UnknownCall`, counted)
    /// without an attached debugger; a frame outside RAM, misaligned, not
    /// from ring 3 or of another vector is refused (`BadArgument`, counted).
    DebugTrap = 29,
    // Numbers reserved per mechanism so that they can grow independently:
    // 4–7 M4 (control flags), 8–11 M3 (upcalls), 12–19 M5 (VM queues),
    // 20–23 M1 (doorbells), 24–27 M2 (hints), 28–31 the platform (console, debug traps).
}

/// The most bytes one [`Call::ConsoleWrite`] takes.
pub const CONSOLE_MAX: usize = 4096;

/// [`Call::ConsoleWrite`]'s argument: `len` bytes at guest-physical `gpa`.
#[must_use]
pub const fn console_arg(gpa: u32, len: u16) -> u64 {
    (gpa as u64) | ((len as u64) << 32)
}

/// [`console_arg`] read back: (gpa, len), or `None` when bits above 47 are set
/// or `len` exceeds [`CONSOLE_MAX`].
#[must_use]
pub const fn console_decode(arg: u64) -> Option<(u32, usize)> {
    let len = ((arg >> 32) & 0xffff) as usize;
    if arg >> 48 != 0 || len > CONSOLE_MAX {
        return None;
    }
    Some((arg as u32, len))
}

/// The ring-3 state a [`Call::DebugTrap`] hands over: 22 little-endian
/// quadwords at the address in RBX, lowest address first, the general
/// registers the guest's trap entry saved followed by the vector, the error
/// code and the frame the CPU pushed (SDM vol 3 §6.14.2). Word indices.
pub mod debug_frame {
    pub const RAX: usize = 0;
    pub const RBX: usize = 1;
    pub const RCX: usize = 2;
    pub const RDX: usize = 3;
    pub const RSI: usize = 4;
    pub const RDI: usize = 5;
    pub const RBP: usize = 6;
    pub const R8: usize = 7;
    pub const R9: usize = 8;
    pub const R10: usize = 9;
    pub const R11: usize = 10;
    pub const R12: usize = 11;
    pub const R13: usize = 12;
    pub const R14: usize = 13;
    pub const R15: usize = 14;
    pub const VECTOR: usize = 15;
    pub const ERROR: usize = 16;
    pub const RIP: usize = 17;
    pub const CS: usize = 18;
    pub const RFLAGS: usize = 19;
    pub const RSP: usize = 20;
    pub const SS: usize = 21;
    /// Quadwords in the frame.
    pub const WORDS: usize = 22;
    /// Bytes in the frame.
    pub const BYTES: usize = WORDS * 8;
    /// The frame's layout version, in EAX of
    /// [`crate::discovery::LEAF_DEBUG`].
    pub const VERSION: u32 = 1;
}

impl Call {
    /// Decodes a hypercall number; `None` for numbers this ABI does not define.
    #[must_use]
    pub const fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            1 => Some(Self::Exit),
            2 => Some(Self::MainReached),
            3 => Some(Self::StatsMark),
            20 => Some(Self::NotifyBench),
            21 => Some(Self::DoorbellRedesignate),
            8 => Some(Self::UpcallPing),
            9 => Some(Self::UpcallStorm),
            10 => Some(Self::UpcallEnable),
            4 => Some(Self::CtrlWrite),
            5 => Some(Self::CtrlRead),
            6 => Some(Self::CtrlSetMasks),
            7 => Some(Self::CtrlQuery),
            12 => Some(Self::VmqFlush),
            28 => Some(Self::ConsoleWrite),
            29 => Some(Self::DebugTrap),
            _ => None,
        }
    }
}

/// Values the shim returns in RAX.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    /// The call number is unknown; the call was counted and ignored.
    UnknownCall = u64::MAX,
    /// An argument was out of range; the call was counted and ignored.
    BadArgument = u64::MAX - 1,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_argument_round_trips_and_bounds_the_length() {
        assert_eq!(
            console_decode(console_arg(0x12_3000, 80)),
            Some((0x12_3000, 80))
        );
        assert_eq!(
            console_decode(console_arg(u32::MAX, 4096)),
            Some((u32::MAX, 4096))
        );
        assert_eq!(console_decode(console_arg(0, 4097)), None);
        assert_eq!(console_decode(1 << 48), None);
    }

    #[test]
    fn call_numbers_decode() {
        assert_eq!(Call::from_raw(1), Some(Call::Exit));
        assert_eq!(Call::from_raw(2), Some(Call::MainReached));
        assert_eq!(Call::from_raw(3), Some(Call::StatsMark));
        assert_eq!(Call::from_raw(20), Some(Call::NotifyBench));
        assert_eq!(Call::from_raw(8), Some(Call::UpcallPing));
        assert_eq!(Call::from_raw(9), Some(Call::UpcallStorm));
        assert_eq!(Call::from_raw(10), Some(Call::UpcallEnable));
        assert_eq!(Call::from_raw(12), Some(Call::VmqFlush));
        assert_eq!(Call::from_raw(28), Some(Call::ConsoleWrite));
        assert_eq!(Call::from_raw(29), Some(Call::DebugTrap));
        assert_eq!(Call::from_raw(0), None);
        assert_eq!(Call::from_raw(u32::MAX), None);
    }
}
