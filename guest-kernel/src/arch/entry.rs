//! Interrupt and exception entry.
//!
//! Vectors 0–31 and the kernel-call vector take the *trap path*: save every
//! register into a [`TrapFrame`] and call `super::trap::exitless_trap`. They
//! are rare (faults) or deliberate (kernel calls). The one frequent kernel
//! call, the halt, is run before that by `exitless_kcall_entry` (47
//! instructions from ring 3 and back with a deadline and nothing pending).
//!
//! Every other vector takes the *interrupt path*, which never calls Rust: it
//! sets the vector's bit in the CPU's pending word, sends EOI, and — if it
//! interrupted ring 3 with the virtual interrupt flag set — rewrites the return
//! frame so that `iretq` lands in ring 3's upcall entry with the interrupted
//! RIP and RFLAGS pushed on the user stack, like a signal frame. That is the
//! whole ring-0 cost of an interrupt. Instructions executed in
//! `exitless_irq_common` (counted in `objdump -d` of the built image between
//! it and `exitless_irq_common_end`), with the xAPIC EOI: 37 when an upcall is
//! delivered, 22 when ring 3 has delivery masked, 20 when ring 0 was
//! interrupted; the x2APIC EOI adds 3; the per-vector stub adds 2.

use crate::abi::{KSTACK_SIZE, KSTUBS_BASE, USER_END, USER_MIN, vector};
use crate::percpu::{PENDING_OFFSET, RECOVER_OFFSET, VIF_OFFSET};

/// The registers saved by the trap path, lowest address first.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct TrapFrame {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

// The layout the shim reads for a ring-3 debug trap (`Call::DebugTrap`).
const _: () = {
    use core::mem::{offset_of, size_of};
    use para_abi::hypercall::debug_frame as w;
    assert!(size_of::<TrapFrame>() == w::BYTES);
    assert!(offset_of!(TrapFrame, rax) == 8 * w::RAX);
    assert!(offset_of!(TrapFrame, rbx) == 8 * w::RBX);
    assert!(offset_of!(TrapFrame, rcx) == 8 * w::RCX);
    assert!(offset_of!(TrapFrame, rdx) == 8 * w::RDX);
    assert!(offset_of!(TrapFrame, rsi) == 8 * w::RSI);
    assert!(offset_of!(TrapFrame, rdi) == 8 * w::RDI);
    assert!(offset_of!(TrapFrame, rbp) == 8 * w::RBP);
    assert!(offset_of!(TrapFrame, r8) == 8 * w::R8);
    assert!(offset_of!(TrapFrame, r15) == 8 * w::R15);
    assert!(offset_of!(TrapFrame, vector) == 8 * w::VECTOR);
    assert!(offset_of!(TrapFrame, rip) == 8 * w::RIP);
    assert!(offset_of!(TrapFrame, cs) == 8 * w::CS);
    assert!(offset_of!(TrapFrame, rflags) == 8 * w::RFLAGS);
    assert!(offset_of!(TrapFrame, rsp) == 8 * w::RSP);
    assert!(offset_of!(TrapFrame, ss) == 8 * w::SS);
};

impl TrapFrame {
    /// True when the trap came from ring 3.
    #[must_use]
    pub const fn from_user(&self) -> bool {
        self.cs & 3 == 3
    }
}

// The stubs: 256 slots of 16 bytes at KSTUBS_BASE (the IDT is built from that
// address). Exceptions that push no error code get a zero pushed so the trap
// frame has one shape (SDM vol 3 §6.13: 8, 10–14, 17, 21, 29, 30 push one).
// The spurious vector only returns: no EOI for it (SDM vol 3 §11.9).
core::arch::global_asm!(
    r#"
    .section .kstubs, "ax"
    .global exitless_stubs
exitless_stubs:
    .set v, 0
    .rept 256
      .balign 16
      .if v < 32 || v == {syscall}
        .if v != 8 && v != 10 && v != 11 && v != 12 && v != 13 && v != 14 && v != 17 && v != 21 && v != 29 && v != 30
          pushq $0
        .endif
        pushq $v
        .if v == 6 || v == {syscall}
          jmp exitless_kcall_entry
        .else
          jmp exitless_trap_common
        .endif
      .else
        .if v == {spurious}
          iretq
        .else
          pushq $v
          jmp exitless_irq_common
        .endif
      .endif
      .set v, v + 1
    .endr
    .balign 16
    .global exitless_stubs_end
exitless_stubs_end:
    "#,
    syscall = const vector::SYSCALL,
    spurious = const vector::SPURIOUS,
    options(att_syntax)
);

// The interrupt path. Stack on entry: vector, then the CPU's frame (RIP, CS,
// RFLAGS, RSP, SS). The CPU's per-CPU block pointer is the top quadword of its
// kernel stack (stacks are KSTACK_SIZE-aligned). EOI: xAPIC writes the EOI
// register (SDM vol 3 §11.8.5), x2APIC writes MSR 0x80B (§11.12.1.2).
core::arch::global_asm!(
    r#"
    .section .boot, "awx"
    .code64
    .global exitless_irq_common
exitless_irq_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    movq %rsp, %rbx
    orq ${kstack_mask}, %rbx
    movq -7(%rbx), %rbx
    movl 24(%rsp), %eax
    lock btsq %rax, {pending}(%rbx)
    cmpb $0, exitless_x2apic_mode(%rip)
    jne 1f
    movl $0xFEE000B0, %eax
    movl %eax, (%rax)
    jmp 2f
1:  pushq %rdx
    movl $0x80B, %ecx
    xorl %eax, %eax
    xorl %edx, %edx
    wrmsr
    popq %rdx
2:  testb $3, 40(%rsp)
    jz 9f
    cmpl $0, {vif}(%rbx)
    je 9f
    movq 56(%rsp), %rax
    movl ${user_end}, %ecx
    cmpq %rcx, %rax
    jae 9f
    cmpq ${user_min_plus}, %rax
    jb 9f
    movl $0, {vif}(%rbx)
    subq $16, %rax
    movq %rax, 56(%rsp)
    movq 32(%rsp), %rcx
    movq %rcx, 8(%rax)
    movq 48(%rsp), %rcx
    movq %rcx, (%rax)
    leaq exitless_upcall_entry(%rip), %rcx
    movq %rcx, 32(%rsp)
9:  popq %rcx
    popq %rbx
    popq %rax
    addq $8, %rsp
    iretq
    .global exitless_irq_common_end
exitless_irq_common_end:

    // The trap path: save all general registers, call Rust with the frame.
    .global exitless_trap_common
exitless_trap_common:
    pushq %r15
    pushq %r14
    pushq %r13
    pushq %r12
    pushq %r11
    pushq %r10
    pushq %r9
    pushq %r8
    pushq %rbp
    pushq %rdi
    pushq %rsi
    pushq %rdx
    pushq %rcx
    pushq %rbx
    pushq %rax
    movq %rsp, %rdi
    movq %rsp, %rbx
    andq $-16, %rsp
    cld
    call exitless_trap
    movq %rbx, %rsp
    popq %rax
    popq %rbx
    popq %rcx
    popq %rdx
    popq %rsi
    popq %rdi
    popq %rbp
    popq %r8
    popq %r9
    popq %r10
    popq %r11
    popq %r12
    popq %r13
    popq %r14
    popq %r15
    addq $16, %rsp
    iretq

    // The kernel-call vector and #UD come here first (on this platform's KVM
    // `int 0x80` at CPL 3 arrives as #UD). The halt call, the one
    // ring 3 makes per sleep, is run here in 47 instructions instead of the
    // trap path's ~130 (KVM's emulated instructions per ping fell by 83): ring
    // 0 is emulated at ~1 µs an instruction, and the vCPU keeps its host CPU
    // (and the device threads waiting for it) all that time. Anything else, and a halt call with a deadline when the
    // timer is not in TSC-deadline mode, takes the trap path unchanged.
    // Stack on entry: vector, error code, then the CPU's frame.
    .global exitless_kcall_entry
exitless_kcall_entry:
    testb $3, 24(%rsp)
    jz exitless_trap_common
    cmpq ${halt}, %rax
    jne exitless_trap_common
    testq %rdi, %rdi
    jz 1f
    cmpb $0, exitless_tsc_deadline_mode(%rip)
    je exitless_trap_common
1:  pushq %rcx
    pushq %rdx
    pushq %rbx
    // rbx, rdx, rcx, vector (24), error, RIP (40), CS, RFLAGS, RSP, SS.
    cmpq $6, 24(%rsp)
    jne 2f
    // Through #UD: only the two bytes CD 80 inside ring 3's range make it the
    // call; anything else is a real #UD for the trap path.
    movq 40(%rsp), %rcx
    cmpq ${user_min}, %rcx
    jb 8f
    movl ${user_end_minus_2}, %edx
    cmpq %rdx, %rcx
    ja 8f
    cmpw $0x80CD, (%rcx)
    jne 8f
    addq $2, %rcx
    movq %rcx, 40(%rsp)
    // RDI: the TSC deadline to arm first, 0 to leave the timer. A deadline
    // already passed makes the timer fire at once (SDM vol 3 §11.5.4.1), so
    // the halt below returns straight away.
2:  testq %rdi, %rdi
    jz 3f
    movl $0x6E0, %ecx
    movl %edi, %eax
    movq %rdi, %rdx
    shrq $32, %rdx
    wrmsr
    // Sleep unless an interrupt ring 3 had masked is already pending.
3:  movq %rsp, %rbx
    orq ${kstack_mask}, %rbx
    movq -7(%rbx), %rbx
    movq {pending}(%rbx), %rax
    orq {pending}+8(%rbx), %rax
    orq {pending}+16(%rbx), %rax
    orq {pending}+24(%rbx), %rax
    jnz 4f
    sti
    hlt
    cli
4:  popq %rbx
    popq %rdx
    popq %rcx
    xorl %eax, %eax
    addq $16, %rsp
    iretq
8:  popq %rbx
    popq %rdx
    popq %rcx
    jmp exitless_trap_common
    "#,
    halt = const crate::abi::Sys::Halt as u64,
    user_min = const USER_MIN,
    user_end_minus_2 = const USER_END - 2,
    kstack_mask = const KSTACK_SIZE - 1,
    pending = const PENDING_OFFSET,
    vif = const VIF_OFFSET,
    user_end = const USER_END,
    user_min_plus = const USER_MIN + 16,
    options(att_syntax)
);

// Ring-3 side of interrupt delivery and fault recovery; lives in user-visible
// text. The upcall entry finds [RFLAGS][RIP] on its stack (pushed by ring 0),
// saves the caller-saved registers, runs the dispatcher and returns to the
// interrupted code with `popfq; ret` (ring 3 cannot change IF, so popfq only
// restores the arithmetic flags). The red zone is off on this target, so
// nothing below the interrupted RSP was live.
core::arch::global_asm!(
    r#"
    .section .text.exitless_rt, "ax"
    .global exitless_upcall_entry
exitless_upcall_entry:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %rbx
    movq %rsp, %rbx
    andq $-16, %rsp
    cld
    call exitless_upcall_dispatch
    movq %rbx, %rsp
    popq %rbx
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    popfq
    ret

    // fn(f: extern "C" fn(*mut u8), arg: *mut u8, buf: *mut JmpBuf) -> u64
    // Returns 0 after f returns, 1 when a fault or panic jumped back.
    .global exitless_call_with_recovery
exitless_call_with_recovery:
    subq $8, %rsp
    movq %rbx, 0(%rdx)
    movq %rbp, 8(%rdx)
    movq %r12, 16(%rdx)
    movq %r13, 24(%rdx)
    movq %r14, 32(%rdx)
    movq %r15, 40(%rdx)
    movq %rsp, 48(%rdx)
    leaq 1f(%rip), %rax
    movq %rax, 56(%rdx)
    movq %rdi, %rax
    movq %rsi, %rdi
    call *%rax
    addq $8, %rsp
    xorl %eax, %eax
    ret
1:  addq $8, %rsp
    movl $1, %eax
    ret

    // fn(buf: *const JmpBuf) -> !
    .global exitless_longjmp
exitless_longjmp:
    movq 0(%rdi), %rbx
    movq 8(%rdi), %rbp
    movq 16(%rdi), %r12
    movq 24(%rdi), %r13
    movq 32(%rdi), %r14
    movq 40(%rdi), %r15
    movq 48(%rdi), %rsp
    jmpq *56(%rdi)

    // Ring 0 sends a faulting ring-3 context here when a recovery buffer is
    // armed. The faulting stack may be unusable, so nothing is pushed.
    .global exitless_fault_landing
exitless_fault_landing:
    movq %gs:{recover}, %rdi
    jmp exitless_longjmp
    "#,
    recover = const RECOVER_OFFSET,
    options(att_syntax)
);

unsafe extern "C" {
    pub static exitless_stubs: u8;
    pub static exitless_stubs_end: u8;
    pub static exitless_irq_common: u8;
    pub static exitless_irq_common_end: u8;
    pub fn exitless_fault_landing();
}

/// Checks, at run time, what the linker script asserts at link time: the stubs
/// start at the address the IDT was computed for.
#[must_use]
pub fn stubs_where_idt_expects() -> bool {
    let (start, end) = {
        (
            core::ptr::addr_of!(exitless_stubs) as u64,
            core::ptr::addr_of!(exitless_stubs_end) as u64,
        )
    };
    start == KSTUBS_BASE && end - start == 256 * 16
}
