//! The ring-3 state of a vCPU stopped in a forwarded debug trap
//! (`Call::DebugTrap`): the guest kernel's saved trap frame in guest
//! memory ([`para_abi::hypercall::debug_frame`]), and how it maps to gdb's
//! x86-64 registers. While such a stop lasts, KVM's registers hold the guest
//! kernel's trap handler; gdb is shown and may change the frame instead.

use gdbstub_arch::x86::reg::X86_64CoreRegs;
use para_abi::hypercall::debug_frame as w;
use vm_memory::{Bytes, GuestAddress};

use crate::kvm::memory::GuestMem;

/// RFLAGS.TF: trap after the next instruction (SDM vol 3 §18.3.1.4).
pub const TF: u64 = 1 << 8;
/// RFLAGS.RF: no instruction breakpoint on the next instruction (§18.3.1.1).
pub const RF: u64 = 1 << 16;
/// The RFLAGS bits gdb may change in a frame: the arithmetic flags, TF, DF,
/// RF and AC. IF, IOPL, NT and the rest stay as the guest had them: the
/// guest kernel returns to ring 3 with this RFLAGS.
const GDB_WRITABLE: u64 = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | TF | 0x400 | 0x800 | RF | (1 << 18);

/// One trap frame, as the guest saved it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame(pub [u64; w::WORDS]);

/// The general registers in gdb's order (RAX, RBX, RCX, RDX, RSI, RDI,
/// RBP, RSP, R8-R15) as frame word indices.
const GDB_ORDER: [usize; 16] = [
    w::RAX,
    w::RBX,
    w::RCX,
    w::RDX,
    w::RSI,
    w::RDI,
    w::RBP,
    w::RSP,
    w::R8,
    w::R9,
    w::R10,
    w::R11,
    w::R12,
    w::R13,
    w::R14,
    w::R15,
];

impl Frame {
    #[must_use]
    pub fn from_bytes(b: &[u8; w::BYTES]) -> Self {
        let mut words = [0u64; w::WORDS];
        for (word, chunk) in words.iter_mut().zip(b.chunks_exact(8)) {
            let mut q = [0u8; 8];
            q.copy_from_slice(chunk);
            *word = u64::from_le_bytes(q);
        }
        Self(words)
    }

    #[must_use]
    pub fn to_bytes(&self) -> [u8; w::BYTES] {
        let mut b = [0u8; w::BYTES];
        for (chunk, word) in b.chunks_exact_mut(8).zip(self.0) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        b
    }

    #[must_use]
    pub const fn rip(&self) -> u64 {
        self.0[w::RIP]
    }

    pub const fn set_rip(&mut self, rip: u64) {
        self.0[w::RIP] = rip;
    }

    #[must_use]
    pub const fn vector(&self) -> u64 {
        self.0[w::VECTOR]
    }

    /// The trap came from ring 3 (CS's RPL).
    #[must_use]
    pub const fn from_ring3(&self) -> bool {
        self.0[w::CS] & 3 == 3
    }

    /// Fills gdb's general registers, RIP, RFLAGS, CS and SS from the frame;
    /// the other segment, x87 and SSE registers are left as they are (the
    /// trap path does not change them).
    pub fn to_gdb(&self, out: &mut X86_64CoreRegs) {
        for (r, &i) in out.regs.iter_mut().zip(&GDB_ORDER) {
            *r = self.0[i];
        }
        out.rip = self.0[w::RIP];
        out.eflags = self.0[w::RFLAGS] as u32;
        out.segments.cs = self.0[w::CS] as u32;
        out.segments.ss = self.0[w::SS] as u32;
    }

    /// Takes gdb's general registers, RIP and the RFLAGS bits it may change
    /// (`GDB_WRITABLE`); CS and SS stay: the trap returns to ring 3.
    pub fn set_from_gdb(&mut self, regs: &X86_64CoreRegs) {
        for (&r, &i) in regs.regs.iter().zip(&GDB_ORDER) {
            self.0[i] = r;
        }
        self.0[w::RIP] = regs.rip;
        let old = self.0[w::RFLAGS];
        self.0[w::RFLAGS] = (old & !GDB_WRITABLE) | (u64::from(regs.eflags) & GDB_WRITABLE);
    }

    /// Prepares the return to ring 3: TF for a step, none for a continue;
    /// RF when RIP is on an instruction breakpoint, so that it does not hit
    /// again before the instruction runs.
    pub const fn resume(&mut self, step: bool, on_breakpoint: bool) {
        let mut f = self.0[w::RFLAGS] & !(TF | RF);
        if step {
            f |= TF;
        }
        if on_breakpoint {
            f |= RF;
        }
        self.0[w::RFLAGS] = f;
    }

    /// Clears TF: a step the debugger asked for ends at this stop.
    pub const fn end_step(&mut self) {
        self.0[w::RFLAGS] &= !TF;
    }
}

/// The frame a `DebugTrap` hypercall names, or why it is refused: it must
/// be 8-aligned and all in RAM, and say #DB or #BP taken in ring 3.
pub fn checked(mem: &GuestMem, gpa: u64) -> Result<Frame, String> {
    let f = read(mem, gpa).ok_or("not 8-aligned in RAM")?;
    if !f.from_ring3() || !matches!(f.vector(), 1 | 3) {
        return Err(format!(
            "vector {}, cs {:#x} (wants #DB or #BP from ring 3)",
            f.vector(),
            f.0[w::CS]
        ));
    }
    Ok(f)
}

/// The trap frame at guest-physical `gpa`, if 8-aligned and all in RAM.
#[must_use]
pub fn read(mem: &GuestMem, gpa: u64) -> Option<Frame> {
    if !gpa.is_multiple_of(8) {
        return None;
    }
    let mut b = [0u8; w::BYTES];
    mem.read_slice(&mut b, GuestAddress(gpa)).ok()?;
    Some(Frame::from_bytes(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_debug_trap_frame_must_be_aligned_in_ram_and_from_ring_3() {
        let mem = crate::kvm::memory::create("g", 4 << 20).unwrap();
        let mut f = Frame([0; w::WORDS]);
        f.0[w::VECTOR] = 3;
        f.0[w::CS] = 0x23;
        f.0[w::RIP] = 0x20_1001;
        mem.write_slice(&f.to_bytes(), GuestAddress(0x8000))
            .unwrap();
        assert_eq!(checked(&mem, 0x8000), Ok(f));
        assert!(checked(&mem, 0x8004).is_err(), "misaligned");
        assert!(checked(&mem, (4 << 20) - 8).is_err(), "runs past RAM");
        assert!(checked(&mem, u64::MAX - 7).is_err(), "wraps");
        // A ring-0 frame, and a page fault's, are not the debugger's.
        f.0[w::CS] = 0x08;
        mem.write_slice(&f.to_bytes(), GuestAddress(0x8000))
            .unwrap();
        assert!(checked(&mem, 0x8000).unwrap_err().contains("ring 3"));
        f.0[w::CS] = 0x23;
        f.0[w::VECTOR] = 14;
        mem.write_slice(&f.to_bytes(), GuestAddress(0x8000))
            .unwrap();
        assert!(checked(&mem, 0x8000).is_err());
    }

    fn sample() -> Frame {
        let mut f = Frame([0; w::WORDS]);
        for (i, v) in f.0.iter_mut().enumerate() {
            *v = 0x1000 + i as u64;
        }
        f.0[w::CS] = 0x23;
        f.0[w::SS] = 0x1b;
        f.0[w::RFLAGS] = 0x202 | TF;
        f
    }

    #[test]
    fn bytes_round_trip_little_endian() {
        let f = sample();
        let b = f.to_bytes();
        assert_eq!(&b[..8], &0x1000u64.to_le_bytes());
        assert_eq!(
            &b[8 * w::RIP..8 * w::RIP + 8],
            &(0x1000 + w::RIP as u64).to_le_bytes()
        );
        assert_eq!(Frame::from_bytes(&b), f);
    }

    #[test]
    fn gdb_sees_each_register_from_its_own_frame_word() {
        let f = sample();
        let mut g = X86_64CoreRegs::default();
        g.segments.fs = 7;
        f.to_gdb(&mut g);
        // gdb's order: RAX RBX RCX RDX RSI RDI RBP RSP R8..R15.
        assert_eq!(g.regs[0], f.0[w::RAX]);
        assert_eq!(g.regs[1], f.0[w::RBX]);
        assert_eq!(g.regs[5], f.0[w::RDI]);
        assert_eq!(g.regs[6], f.0[w::RBP]);
        assert_eq!(g.regs[7], f.0[w::RSP], "RSP is the ring-3 stack, word 20");
        assert_eq!(g.regs[8], f.0[w::R8]);
        assert_eq!(g.regs[15], f.0[w::R15]);
        assert_eq!(g.rip, f.0[w::RIP]);
        assert_eq!(u64::from(g.eflags), f.0[w::RFLAGS]);
        assert_eq!((g.segments.cs, g.segments.ss), (0x23, 0x1b));
        assert_eq!(g.segments.fs, 7, "untouched");
        assert!(f.from_ring3());
    }

    #[test]
    fn gdb_writes_land_in_the_frame_but_not_the_ring_or_system_flags() {
        let mut f = sample();
        let mut g = X86_64CoreRegs::default();
        f.to_gdb(&mut g);
        g.regs[7] = 0xdead_0000;
        g.regs[11] = 0x5a5a;
        g.rip = 0x20_1234;
        g.segments.cs = 0x08;
        // Carry on, IF off and IOPL 3 asked: only the carry is taken.
        g.eflags = 0x3001 | 0x2;
        let vector = f.vector();
        f.set_from_gdb(&g);
        assert_eq!(f.0[w::RSP], 0xdead_0000);
        assert_eq!(f.0[w::R11], 0x5a5a);
        assert_eq!(f.rip(), 0x20_1234);
        assert_eq!(f.0[w::CS], 0x23, "CS stays ring 3");
        assert_eq!(f.vector(), vector);
        assert_eq!(
            f.0[w::RFLAGS],
            0x203,
            "IF kept, IOPL refused, TF cleared as gdb asked, CF set"
        );
    }

    #[test]
    fn resume_sets_tf_only_for_a_step_and_rf_only_on_a_breakpoint() {
        let mut f = sample();
        f.resume(false, false);
        assert_eq!(f.0[w::RFLAGS], 0x202);
        f.resume(true, false);
        assert_eq!(f.0[w::RFLAGS], 0x202 | TF);
        f.resume(false, true);
        assert_eq!(f.0[w::RFLAGS], 0x202 | RF);
        f.resume(true, true);
        assert_eq!(f.0[w::RFLAGS], 0x202 | TF | RF);
        f.end_step();
        assert_eq!(f.0[w::RFLAGS], 0x202 | RF);
    }
}
