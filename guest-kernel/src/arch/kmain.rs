//! Ring-0 bring-up of each CPU, then the drop into ring 3.

use super::cpu::{cpuid, rdtsc};
use super::{BOOT, apic, boot, bootinfo, pic, serial, time};
use crate::abi::{USER_STACK_SIZE, is_user_range, selector};
use crate::percpu::CPUS;
use core::sync::atomic::{AtomicU64, Ordering};
use para_abi::discovery;
use x86_64::instructions::tables::{lidt, load_tss};
use x86_64::instructions::{hlt, interrupts};
use x86_64::registers::model_specific::GsBase;
use x86_64::registers::rflags::RFlags;
use x86_64::registers::segmentation::SegmentSelector;

/// TSC at the very first instruction (written by the 32-bit entry code).
#[unsafe(export_name = "exitless_tsc_at_entry")]
#[unsafe(link_section = ".kdata")]
static TSC_AT_ENTRY: AtomicU64 = AtomicU64::new(0);

#[repr(C, align(16))]
struct Stack([u8; USER_STACK_SIZE]);

/// The boot CPU's ring-3 stack (application processors get theirs from the heap).
static mut BSP_USER_STACK: Stack = Stack([0; USER_STACK_SIZE]);

unsafe extern "C" {
    fn exitless_user_bsp() -> !;
    fn exitless_user_ap(cpu: u64) -> !;
}

/// Loads this CPU's IDT and TSS, points GS and the kernel-stack slot at its
/// per-CPU block, and enables its local APIC.
///
/// # Safety
/// Ring 0, once per CPU, on CPU `cpu` itself, before its first interrupt.
unsafe fn cpu_init(cpu: usize) {
    let pc = &CPUS[cpu];
    let addr = core::ptr::from_ref(pc) as u64;
    pc.self_ptr.store(addr, Ordering::Relaxed);
    pc.cpu_id.store(cpu as u32, Ordering::Relaxed);
    // SAFETY: the IDT and GDT are the image's precomputed tables; the TSS
    // selector is this CPU's; the top quadword of its kernel stack is reserved
    // for the per-CPU pointer (TSS.RSP0 points 16 bytes below the top).
    unsafe {
        lidt(&*core::ptr::addr_of!(boot::exitless_idt_ptr));
        load_tss(SegmentSelector(selector::TSS0 + 16 * cpu as u16));
        core::ptr::write((boot::kstack_top(cpu) - 8) as *mut u64, addr);
        let mut gs_base = GsBase::MSR;
        gs_base.write(addr);
        let apic_id = apic::init_local();
        pc.apic_id.store(apic_id, Ordering::Relaxed);
    }
}

/// RFLAGS in ring 3: interrupts enabled; bit 1 is reserved and always set
/// (SDM vol 1 §3.4.3).
const USER_RFLAGS: u64 = RFlags::INTERRUPT_FLAG.bits() | (1 << 1);

/// Enters ring 3 at `rip` with stack `rsp`, interrupts enabled, `arg` in RDI.
///
/// # Safety
/// Ring 0, with this CPU set up (`cpu_init`); `rip` is ring-3 code and `rsp`
/// the top of a ring-3 stack nothing else uses.
unsafe fn enter_user(rip: u64, rsp: u64, arg: u64) -> ! {
    // SAFETY: builds an interrupt-return frame for CPL 3 (SDM vol 3 §6.14.3);
    // the target is ring-3 code and the stack is ring-3 memory.
    unsafe {
        core::arch::asm!(
            "push {ss}",
            "push {rsp}",
            "push {rflags}",
            "push {cs}",
            "push {rip}",
            "iretq",
            rflags = const USER_RFLAGS,
            ss = const selector::USER_DATA as u64,
            cs = const selector::USER_CODE as u64,
            rsp = in(reg) rsp,
            rip = in(reg) rip,
            in("rdi") arg,
            options(noreturn),
        )
    }
}

/// Whether the shim forwards ring 3's debug traps to a debugger, with the
/// frame layout this kernel saves (one CPUID, two with a debugger).
fn debug_traps_offered() -> bool {
    use para_abi::hypercall::debug_frame;
    if cpuid(discovery::LEAF_FEATURES, 0).eax & discovery::features::DEBUG_TRAPS == 0 {
        return false;
    }
    let leaf = cpuid(discovery::LEAF_DEBUG, 0);
    leaf.eax == debug_frame::VERSION && leaf.ebx as usize == debug_frame::BYTES
}

#[unsafe(no_mangle)]
extern "C" fn exitless_kmain_bsp(start_info: u32) -> ! {
    let tsc_kmain = rdtsc();
    let hv = cpuid(discovery::LEAF_SIGNATURE, 0);
    let shim = discovery::is_exitless(hv.ebx, hv.ecx, hv.edx);
    // Under the shim there is no 8259 to mask (its interrupt controller is
    // the local APIC alone) and the console goes by hypercall, so the 17
    // port writes (each an exit) that set both up are left out.
    serial::use_hypercall(shim);
    if !shim {
        // SAFETY: first ring-0 code on the boot CPU, interrupts disabled.
        unsafe {
            serial::init();
            pic::remap_and_mask();
        }
    }
    let leaf1 = cpuid(1, 0);
    let x2 = leaf1.ecx & (1 << 21) != 0;
    let deadline = leaf1.ecx & (1 << 24) != 0;
    apic::set_mode(x2);
    // SAFETY: CPU 0, once; then calibration on the enabled APIC.
    let (tsc_khz, lapic_khz, source) = unsafe {
        cpu_init(0);
        time::calibrate(hv.eax, !deadline)
    };
    // SAFETY: after calibration, as `setup_timer` requires; the boot copy is
    // made before ring 3 runs.
    unsafe {
        apic::setup_timer(deadline);
        bootinfo::capture(u64::from(start_info));
    }
    BOOT.start_info
        .store(u64::from(start_info), Ordering::Relaxed);
    BOOT.tsc_at_entry
        .store(TSC_AT_ENTRY.load(Ordering::Relaxed), Ordering::Relaxed);
    BOOT.tsc_at_kmain.store(tsc_kmain, Ordering::Relaxed);
    BOOT.tsc_khz.store(tsc_khz, Ordering::Relaxed);
    BOOT.lapic_khz.store(lapic_khz, Ordering::Relaxed);
    BOOT.x2apic.store(u8::from(x2), Ordering::Relaxed);
    BOOT.tsc_deadline
        .store(u8::from(deadline), Ordering::Relaxed);
    BOOT.under_shim.store(u8::from(shim), Ordering::Relaxed);
    BOOT.debug_traps
        .store(u8::from(shim && debug_traps_offered()), Ordering::Relaxed);
    BOOT.tsc_source.store(source as u8, Ordering::Relaxed);
    BOOT.tsc_at_user.store(rdtsc(), Ordering::Relaxed);
    let stack_top = core::ptr::addr_of!(BSP_USER_STACK) as u64 + USER_STACK_SIZE as u64;
    // SAFETY: ring-3 entry point and the boot CPU's ring-3 stack.
    unsafe { enter_user(exitless_user_bsp as *const () as u64, stack_top, 0) }
}

#[unsafe(no_mangle)]
extern "C" fn exitless_kmain_ap(cpu: u32) -> ! {
    let cpu = cpu as usize;
    // SAFETY: this AP's first ring-0 code; one AP starts at a time.
    unsafe {
        cpu_init(cpu);
        apic::setup_timer(BOOT.tsc_deadline.load(Ordering::Relaxed) != 0);
    }
    let rsp = CPUS[cpu].user_stack_top.load(Ordering::Acquire);
    if !rsp.is_multiple_of(16) || !is_user_range(rsp - 64, 64) {
        serial::write(b"AP start-up: ring 3 gave no usable stack; parking this CPU\n");
        // Park the CPU for good.
        loop {
            interrupts::disable();
            hlt();
        }
    }
    // SAFETY: ring-3 AP entry and the stack ring 3 prepared for this CPU.
    unsafe { enter_user(exitless_user_ap as *const () as u64, rsp, cpu as u64) }
}
