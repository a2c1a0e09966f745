//! The image's boot-time data and entry code, all precomputed in the image.
//!
//! Ring-0 code runs through an instruction emulator on this platform, so every
//! table that can be constant is: the page tables (identity map of the low 4 GiB),
//! the GDT with one TSS descriptor per CPU, the TSSes with their stack pointers,
//! and the IDT pointing at entry stubs placed at a fixed address. Boot then
//! only loads registers.
//!
//! Memory map of the image (see `link.ld`):
//! - `0x10_0000–0x1F_FFFF`, supervisor-only 4 KiB pages: this code, the stubs,
//!   the tables and the kernel stacks.
//! - `0x20_0000` and up, user-accessible 2 MiB pages: everything else (ring-3
//!   code, data, the heap and all RAM above the image).

use crate::abi::{IST_SIZE, KSTACK_SIZE, KSTUBS_BASE, KTSS_BASE, MAX_CPUS, TSS_STRIDE};
use para_abi::layout::{AP_TRAMPOLINE, MMIO_HOLE_START};

unsafe extern "C" {
    /// Start of the AP start-up code that is copied to [`AP_TRAMPOLINE`].
    pub static exitless_ap_trampoline: u8;
    /// End of that code.
    pub static exitless_ap_trampoline_end: u8;
    /// Bottom of the per-CPU kernel stacks (`MAX_CPUS * KSTACK_SIZE`).
    pub static exitless_kstacks: u8;
    /// The IDT pseudo-descriptor (`lidt` operand).
    pub static exitless_idt_ptr: u8;
}

/// Top of CPU `cpu`'s kernel stack (exclusive).
#[must_use]
pub fn kstack_top(cpu: usize) -> u64 {
    let base = core::ptr::addr_of!(exitless_kstacks) as u64;
    base + (cpu as u64 + 1) * KSTACK_SIZE as u64
}

// PVH entry note (Xen public `elfnote.h`: XEN_ELFNOTE_PHYS32_ENTRY = 18). QEMU 7.2
// reads the descriptor of an ELF64 note as 8 bytes, hence `.quad` in a note
// aligned to 4 (DESIGN §7).
core::arch::global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad exitless_pvh_start
    .balign 4
    "#,
    options(att_syntax)
);

// Page tables: PML4 -> one PDPT -> four page directories of 2 MiB pages
// (SDM vol 3 §4.5). The first 2 MiB use a page table of 4 KiB pages so the
// kernel-private megabyte can be supervisor-only. Flags: P=1 RW=2 US=4 PWT=8
// PCD=0x10 PS=0x80. The MMIO hole (from 0xB000_0000) is uncached; the
// IOAPIC/LAPIC area (from 0xFEC0_0000) is uncached and supervisor-only.
core::arch::global_asm!(
    r#"
    .section .kdata.pagetables, "aw"
    .balign 4096
    .global exitless_boot_pml4
exitless_boot_pml4:
    .quad exitless_boot_pdpt + 0x7
    .fill 511, 8, 0

    .balign 4096
exitless_boot_pdpt:
    .quad exitless_boot_pd + 0x0000 + 0x7
    .quad exitless_boot_pd + 0x1000 + 0x7
    .quad exitless_boot_pd + 0x2000 + 0x7
    .quad exitless_boot_pd + 0x3000 + 0x7
    .fill 508, 8, 0

    .balign 4096
exitless_boot_pd:
    .quad exitless_boot_pt0 + 0x7
    .set pd_i, 1
    .rept 2047
      .if pd_i >= 0x7F6
        .quad (pd_i << 21) | 0x9B
      .else
        .if pd_i >= ({mmio} >> 21)
          .quad (pd_i << 21) | 0x9F
        .else
          .quad (pd_i << 21) | 0x87
        .endif
      .endif
      .set pd_i, pd_i + 1
    .endr

    .balign 4096
exitless_boot_pt0:
    .quad 0x3
    .set pt_i, 1
    .rept 511
      .if pt_i >= 256
        .quad (pt_i << 12) | 0x3
      .else
        .if pt_i == ({tramp} >> 12)
          .quad (pt_i << 12) | 0x3
        .else
          .quad (pt_i << 12) | 0x7
        .endif
      .endif
      .set pt_i, pt_i + 1
    .endr
    "#,
    mmio = const MMIO_HOLE_START,
    tramp = const AP_TRAMPOLINE,
    options(att_syntax)
);

// GDT (SDM vol 3 §3.4.5, §8.2.3): null, kernel code/data, user data/code, then
// one 16-byte TSS descriptor per CPU. The TSS bases are constants because the
// TSS array sits at KTSS_BASE. The pseudo-descriptor serves both `lgdt` in
// 32-bit mode (which reads 6 bytes) and in 64-bit mode (10 bytes).
core::arch::global_asm!(
    r#"
    .section .kdata.gdt, "aw"
    .balign 16
exitless_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF
    .quad 0x00CF92000000FFFF
    .quad 0x00CFF2000000FFFF
    .quad 0x00AFFA000000FFFF
    .set tss_i, 0
    .rept {max_cpus}
      .set tss_b, {ktss} + tss_i * {stride}
      .quad 0x67 | ((tss_b & 0xFFFFFF) << 16) | (0x89 << 40) | (((tss_b >> 24) & 0xFF) << 56)
      .quad tss_b >> 32
      .set tss_i, tss_i + 1
    .endr
exitless_gdt_end:
    .balign 8
    .global exitless_gdt_ptr
exitless_gdt_ptr:
    .word exitless_gdt_end - exitless_gdt - 1
    .quad exitless_gdt

    .section .ktss, "aw"
    .set tss_i, 0
    .rept {max_cpus}
      .long 0
      .quad exitless_kstacks + (tss_i + 1) * {kstack} - 16
      .quad 0, 0, 0
      .quad exitless_ist_stacks + (tss_i * 3 + 1) * {ist}
      .quad exitless_ist_stacks + (tss_i * 3 + 2) * {ist}
      .quad exitless_ist_stacks + (tss_i * 3 + 3) * {ist}
      .quad 0, 0, 0, 0
      .quad 0
      .word 0
      .word 104
      .fill {stride} - 104, 1, 0
      .set tss_i, tss_i + 1
    .endr

    .section .kbss, "aw", @nobits
    .balign {kstack}
    .global exitless_kstacks
exitless_kstacks:
    .skip {kstack} * {max_cpus}
exitless_ist_stacks:
    .skip {ist} * 3 * {max_cpus}
    "#,
    max_cpus = const MAX_CPUS,
    ktss = const KTSS_BASE,
    stride = const TSS_STRIDE,
    kstack = const KSTACK_SIZE,
    ist = const IST_SIZE,
    options(att_syntax)
);

// IDT (SDM vol 3 §6.14.1): entry v points at stub v, KSTUBS_BASE + 16 * v.
// Interrupt gates (0x8E) everywhere so ring 0 always starts with IF = 0; the
// kernel-call vector is a DPL-3 gate (0xEE). NMI, #DF and #MC run on their own
// IST stacks so a broken kernel stack cannot turn them into a triple fault.
core::arch::global_asm!(
    r#"
    .section .kdata.idt, "aw"
    .balign 4096
exitless_idt:
    .set v, 0
    .rept 256
      .set h, {stubs} + v * 16
      .set ist, 0
      .if v == 2
        .set ist, 2
      .endif
      .if v == 8
        .set ist, 1
      .endif
      .if v == 18
        .set ist, 3
      .endif
      .set attr, 0x8E
      .if v == {syscall}
        .set attr, 0xEE
      .endif
      .quad (h & 0xFFFF) | (0x08 << 16) | (ist << 32) | (attr << 40) | (((h >> 16) & 0xFFFF) << 48)
      .quad h >> 32
      .set v, v + 1
    .endr
    .balign 8
    .global exitless_idt_ptr
exitless_idt_ptr:
    .word 256 * 16 - 1
    .quad exitless_idt
    "#,
    stubs = const KSTUBS_BASE,
    syscall = const crate::abi::vector::SYSCALL,
    options(att_syntax)
);

// The PVH entry (32-bit protected mode, paging off, EBX = hvm_start_info) and
// the switch to long mode (SDM vol 3 §9.8.5): PAE, CR3, EFER.LME, CR0.PG, far
// jump into the 64-bit code segment. About twenty instructions.
core::arch::global_asm!(
    r#"
    // From 32-bit protected mode to long mode on the boot page tables (SDM vol 3
    // §9.8.5): CR4.PAE, CR3, EFER.LME, then CR0.PG (with PE and WP). The caller
    // far-jumps into a 64-bit code segment next. Used by the boot CPU and by
    // the AP trampoline, which must carry its own copy below 1 MiB.
    .macro long_mode_on
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $exitless_boot_pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80010001, %eax
    movl %eax, %cr0
    .endm

    .section .boot, "awx"
    .code32
    .global exitless_pvh_start
exitless_pvh_start:
    rdtsc
    movl %eax, exitless_tsc_at_entry
    movl %edx, exitless_tsc_at_entry + 4
    movl %ebx, %esi
    lgdt exitless_gdt_ptr
    long_mode_on
    ljmp $0x08, $1f
    .code64
1:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    leaq exitless_kstacks + {kstack} - 16(%rip), %rsp
    movl %esi, %edi
    call exitless_kmain_bsp
2:  hlt
    jmp 2b

    // Application-processor start-up (SDM vol 3 §9.4.4.2). Copied to
    // AP_TRAMPOLINE and entered in real mode at CS:IP = 0x0800:0000 by a SIPI
    // with vector 8; every address inside is computed for that copy.
    .code16
    .global exitless_ap_trampoline
exitless_ap_trampoline:
    cli
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (ap_gdt_ptr - exitless_ap_trampoline)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, ${tramp} + (ap_prot - exitless_ap_trampoline)
    .code32
ap_prot:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    long_mode_on
    ljmp $0x18, $exitless_ap_long_mode
    .balign 8
ap_gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF
    .quad 0x00CF92000000FFFF
    .quad 0x00AF9A000000FFFF
ap_gdt_ptr:
    .word ap_gdt_ptr - ap_gdt - 1
    .long {tramp} + (ap_gdt - exitless_ap_trampoline)
    .global exitless_ap_trampoline_end
exitless_ap_trampoline_end:

    .code64
exitless_ap_long_mode:
    movl exitless_ap_boot_cpu(%rip), %edi
    leal 1(%edi), %eax
    shlq ${kstack_shift}, %rax
    leaq exitless_kstacks(%rip), %rsp
    addq %rax, %rsp
    subq $16, %rsp
    lgdt exitless_gdt_ptr(%rip)
    pushq $0x08
    leaq 3f(%rip), %rax
    pushq %rax
    lretq
3:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    call exitless_kmain_ap
4:  hlt
    jmp 4b
    "#,
    kstack = const KSTACK_SIZE,
    kstack_shift = const KSTACK_SIZE.trailing_zeros(),
    tramp = const AP_TRAMPOLINE,
    options(att_syntax)
);
