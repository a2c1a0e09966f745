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

use crate::abi::{IST_SIZE, KSTACK_SIZE, KSTUBS_BASE, KTSS_BASE, MAX_CPUS, TSS_STRIDE, selector};
use core::mem::{offset_of, size_of};
use para_abi::layout::{AP_TRAMPOLINE, MMIO_HOLE_START};
use x86_64::PrivilegeLevel::Ring0;
use x86_64::registers::control::{Cr0Flags, Cr4Flags};
use x86_64::registers::model_specific::EferFlags;
use x86_64::registers::segmentation::SegmentSelector;
use x86_64::structures::DescriptorTablePointer;
use x86_64::structures::gdt::DescriptorFlags as Seg;
use x86_64::structures::paging::PageTableFlags as Page;
use x86_64::structures::tss::TaskStateSegment;

unsafe extern "C" {
    /// Start of the AP start-up code that is copied to [`AP_TRAMPOLINE`].
    pub static exitless_ap_trampoline: u8;
    /// End of that code.
    pub static exitless_ap_trampoline_end: u8;
    /// Bottom of the per-CPU kernel stacks (`MAX_CPUS * KSTACK_SIZE`).
    pub static exitless_kstacks: u8;
    /// The IDT pseudo-descriptor (`lidt` operand): a 16-bit limit and a
    /// 64-bit base, the layout of the crate's `DescriptorTablePointer`.
    pub static exitless_idt_ptr: DescriptorTablePointer;
}

/// Top of CPU `cpu`'s kernel stack (exclusive).
#[must_use]
pub fn kstack_top(cpu: usize) -> u64 {
    let base = core::ptr::addr_of!(exitless_kstacks) as u64;
    base + (cpu as u64 + 1) * KSTACK_SIZE as u64
}

// PVH entry note (Xen public `elfnote.h`: XEN_ELFNOTE_PHYS32_ENTRY = 18). QEMU 7.2
// reads the descriptor of an ELF64 note as 8 bytes, hence `.quad` in a note
// aligned to 4.
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

// Entry bits of the boot page tables (SDM vol 3 §4.5, table 4-15 ff.), as
// constants for the assembler: the tables stay data in the image.
/// A table entry, or a page, that ring 3 may use.
const PT_USER: u64 = Page::PRESENT
    .union(Page::WRITABLE)
    .union(Page::USER_ACCESSIBLE)
    .bits();
/// A supervisor-only page.
const PT_KERNEL: u64 = Page::PRESENT.union(Page::WRITABLE).bits();
/// PWT + PCD: uncached, for MMIO.
const PT_UNCACHED: u64 = Page::WRITE_THROUGH.union(Page::NO_CACHE).bits();
/// A 2 MiB page in a page directory (PS).
const PT_HUGE: u64 = Page::HUGE_PAGE.bits();

// Page tables: PML4 -> one PDPT -> four page directories of 2 MiB pages
// (SDM vol 3 §4.5). The first 2 MiB use a page table of 4 KiB pages so the
// kernel-private megabyte can be supervisor-only. The MMIO hole (from
// 0xB000_0000) is uncached; the IOAPIC/LAPIC area (from 0xFEC0_0000) is
// uncached and supervisor-only.
core::arch::global_asm!(
    r#"
    .section .kdata.pagetables, "aw"
    .balign 4096
    .global exitless_boot_pml4
exitless_boot_pml4:
    .quad exitless_boot_pdpt + {user}
    .fill 511, 8, 0

    .balign 4096
exitless_boot_pdpt:
    .quad exitless_boot_pd + 0x0000 + {user}
    .quad exitless_boot_pd + 0x1000 + {user}
    .quad exitless_boot_pd + 0x2000 + {user}
    .quad exitless_boot_pd + 0x3000 + {user}
    .fill 508, 8, 0

    .balign 4096
exitless_boot_pd:
    .quad exitless_boot_pt0 + {user}
    .set pd_i, 1
    .rept 2047
      .if pd_i >= 0x7F6
        .quad (pd_i << 21) | {kernel} | {uncached} | {huge}
      .else
        .if pd_i >= ({mmio} >> 21)
          .quad (pd_i << 21) | {user} | {uncached} | {huge}
        .else
          .quad (pd_i << 21) | {user} | {huge}
        .endif
      .endif
      .set pd_i, pd_i + 1
    .endr

    .balign 4096
exitless_boot_pt0:
    .quad {kernel}
    .set pt_i, 1
    .rept 511
      .if pt_i >= 256
        .quad (pt_i << 12) | {kernel}
      .else
        .if pt_i == ({tramp} >> 12)
          .quad (pt_i << 12) | {kernel}
        .else
          .quad (pt_i << 12) | {user}
        .endif
      .endif
      .set pt_i, pt_i + 1
    .endr
    "#,
    mmio = const MMIO_HOLE_START,
    tramp = const AP_TRAMPOLINE,
    user = const PT_USER,
    kernel = const PT_KERNEL,
    uncached = const PT_UNCACHED,
    huge = const PT_HUGE,
    options(att_syntax)
);

// Segment descriptors (SDM vol 3 §3.4.5): flat 4 GiB segments, code and data.
// The accessed bit is left clear, as the CPU sets it on first load.
const SEG_FLAT: u64 = Seg::USER_SEGMENT
    .union(Seg::PRESENT)
    .union(Seg::WRITABLE)
    .union(Seg::LIMIT_0_15)
    .union(Seg::LIMIT_16_19)
    .union(Seg::GRANULARITY)
    .bits();
/// 64-bit code (L = 1).
const SEG_CODE64: u64 = SEG_FLAT | Seg::EXECUTABLE.union(Seg::LONG_MODE).bits();
/// 32-bit code (D = 1), for the AP trampoline's way through protected mode.
const SEG_CODE32: u64 = SEG_FLAT | Seg::EXECUTABLE.union(Seg::DEFAULT_SIZE).bits();
/// Data (B = 1).
const SEG_DATA: u64 = SEG_FLAT | Seg::DEFAULT_SIZE.bits();
const SEG_USER: u64 = Seg::DPL_RING_3.bits();
/// System-segment type "64-bit TSS (available)" (SDM vol 3 §3.5, table 3-2),
/// present, DPL 0: the type/attribute bits of a TSS descriptor's low word.
const TSS_ATTRIBUTES: u64 = Seg::PRESENT.bits() | (0b1001 << 40);
/// The TSS limit: no I/O permission bitmap follows it.
const TSS_LIMIT: usize = size_of::<TaskStateSegment>() - 1;

// The `.ktss` data below writes each TSS field by hand; these are the offsets
// it assumes (SDM vol 3 §8.7, figure 8-11).
const _: () = {
    assert!(size_of::<TaskStateSegment>() == 104);
    assert!(offset_of!(TaskStateSegment, privilege_stack_table) == 4);
    assert!(offset_of!(TaskStateSegment, interrupt_stack_table) == 36);
    assert!(offset_of!(TaskStateSegment, iomap_base) == 102);
};

// GDT (SDM vol 3 §3.4.5, §8.2.3): null, kernel code/data, user data/code (in
// the order of `abi::selector`), then one 16-byte TSS descriptor per CPU. The
// TSS bases are constants because the TSS array sits at KTSS_BASE. The
// pseudo-descriptor serves both `lgdt` in 32-bit mode (which reads 6 bytes)
// and in 64-bit mode (10 bytes).
core::arch::global_asm!(
    r#"
    .section .kdata.gdt, "aw"
    .balign 16
exitless_gdt:
    .quad 0
    .quad {code64}
    .quad {data}
    .quad {data} | {user}
    .quad {code64} | {user}
    .set tss_i, 0
    .rept {max_cpus}
      .set tss_b, {ktss} + tss_i * {stride}
      .quad {tss_limit} | ((tss_b & 0xFFFFFF) << 16) | {tss_attr} | (((tss_b >> 24) & 0xFF) << 56)
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
      .word {tss_size}
      .fill {stride} - {tss_size}, 1, 0
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
    code64 = const SEG_CODE64,
    data = const SEG_DATA,
    user = const SEG_USER,
    tss_limit = const TSS_LIMIT,
    tss_attr = const TSS_ATTRIBUTES,
    tss_size = const size_of::<TaskStateSegment>(),
    options(att_syntax)
);

/// An IDT gate's attribute byte (SDM vol 3 §6.14.1, figure 6-8): present,
/// DPL 0, type 0xE (64-bit interrupt gate). The `x86_64` crate builds gate
/// options only at run time, so the bits are spelled out here.
const GATE_INTERRUPT: u64 = 0x8E;
/// The same with DPL 3, so that ring 3 may raise the vector with `int`.
const GATE_INTERRUPT_USER: u64 = GATE_INTERRUPT | (3 << 5);

// IDT (SDM vol 3 §6.14.1): entry v points at stub v, KSTUBS_BASE + 16 * v.
// Interrupt gates everywhere so ring 0 always starts with IF = 0; the
// kernel-call vector's gate is DPL 3. NMI, #DF and #MC run on their own IST
// stacks so a broken kernel stack cannot turn them into a triple fault.
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
      .set attr, {gate}
      .if v == {syscall}
        .set attr, {gate_user}
      .endif
      .quad (h & 0xFFFF) | ({kcode} << 16) | (ist << 32) | (attr << 40) | (((h >> 16) & 0xFFFF) << 48)
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
    gate = const GATE_INTERRUPT,
    gate_user = const GATE_INTERRUPT_USER,
    kcode = const selector::KERNEL_CODE,
    options(att_syntax)
);

/// IA32_EFER (SDM vol 4, table 2-2). The `x86_64` crate keeps MSR numbers private.
const IA32_EFER: u32 = 0xC000_0080;
/// CR0 in long mode: protection, write protection in ring 0, paging.
const CR0_LONG_MODE: u64 = Cr0Flags::PROTECTED_MODE_ENABLE
    .union(Cr0Flags::WRITE_PROTECT)
    .union(Cr0Flags::PAGING)
    .bits();

// The AP trampoline's own GDT (it runs below 1 MiB, before it can reach the
// kernel's): 32-bit code, data, 64-bit code.
const AP_CODE32: u16 = SegmentSelector::new(1, Ring0).0;
const AP_DATA: u16 = SegmentSelector::new(2, Ring0).0;
const AP_CODE64: u16 = SegmentSelector::new(3, Ring0).0;

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
    orl ${cr4_pae}, %eax
    movl %eax, %cr4
    movl $exitless_boot_pml4, %eax
    movl %eax, %cr3
    movl ${efer}, %ecx
    rdmsr
    orl ${efer_lme}, %eax
    wrmsr
    movl %cr0, %eax
    orl ${cr0_long}, %eax
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
    ljmp ${kcode}, $1f
    .code64
1:
    movw ${kdata}, %ax
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
    orl ${cr0_pe}, %eax
    movl %eax, %cr0
    ljmpl ${ap_code32}, ${tramp} + (ap_prot - exitless_ap_trampoline)
    .code32
ap_prot:
    movw ${ap_data}, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    long_mode_on
    ljmp ${ap_code64}, $exitless_ap_long_mode
    .balign 8
ap_gdt:
    .quad 0
    .quad {code32}
    .quad {data}
    .quad {code64}
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
    pushq ${kcode}
    leaq 3f(%rip), %rax
    pushq %rax
    lretq
3:
    movw ${kdata}, %ax
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
    cr4_pae = const Cr4Flags::PHYSICAL_ADDRESS_EXTENSION.bits(),
    efer = const IA32_EFER,
    efer_lme = const EferFlags::LONG_MODE_ENABLE.bits(),
    cr0_long = const CR0_LONG_MODE,
    cr0_pe = const Cr0Flags::PROTECTED_MODE_ENABLE.bits(),
    kcode = const selector::KERNEL_CODE,
    kdata = const selector::KERNEL_DATA,
    ap_code32 = const AP_CODE32,
    ap_data = const AP_DATA,
    ap_code64 = const AP_CODE64,
    code32 = const SEG_CODE32,
    data = const SEG_DATA,
    code64 = const SEG_CODE64,
    options(att_syntax)
);
