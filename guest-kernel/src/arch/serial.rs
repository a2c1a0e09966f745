//! The COM1 16550A console, driven from ring 0 (ring 3 has no port I/O here).
//!
//! Each port access exits to the VMM, so output is written in bursts with one
//! string output (`rep outsb`) each: KVM hands the VMM every byte of a string
//! I/O instruction in one exit (SDM vol. 2B, OUTS/OUTSB). On a 16550A a burst
//! is the FIFO's 16 bytes, written once LSR.THRE reports it empty (16550A
//! datasheet, FIFO mode). KVM still exits once per byte of a string output,
//! but the loop around it is gone (every ring-0 instruction is emulated here).
//! Under the Exitless shim a line goes out in one `ConsoleWrite` hypercall
//! instead (the shim reads it from RAM: the low 4 GiB are identity-mapped),
//! one exit per line where the UART takes one per byte.

use core::sync::atomic::{AtomicBool, Ordering};
use para_abi::hypercall::{CONSOLE_MAX, Call, Status, console_arg};
use para_abi::layout::SERIAL_PORT as BASE;
use x86_64::instructions::port::{Port, PortReadOnly, PortWriteOnly};

pub use crate::linebuf::LineBuf;

const THR: u16 = BASE;
const IER: u16 = BASE + 1;
const FCR: u16 = BASE + 2;
const LCR: u16 = BASE + 3;
const MCR: u16 = BASE + 4;
const LSR: u16 = BASE + 5;
const LSR_THRE: u8 = 1 << 5;
const FIFO_DEPTH: usize = 16;

/// Serialises lines from different CPUs. Kernel-private memory.
#[unsafe(link_section = ".kdata")]
static LOCK: AtomicBool = AtomicBool::new(false);

/// Set once the boot code knows the VMM is the Exitless shim: lines go out by
/// hypercall.
#[unsafe(link_section = ".kdata")]
static BY_HYPERCALL: AtomicBool = AtomicBool::new(false);

/// Under the Exitless shim, writes lines with its `ConsoleWrite` hypercall.
pub fn use_hypercall(on: bool) {
    BY_HYPERCALL.store(on, Ordering::Relaxed);
}

/// # Safety
/// Ring 0, once, before any output.
pub unsafe fn init() {
    let (mut ier, mut lcr) = (Port::<u8>::new(IER), Port::<u8>::new(LCR));
    // SAFETY: programs the UART: no interrupts, 115200 8N1 (divisor latch 1
    // while LCR.DLAB is set, THR then being the divisor's low byte), FIFOs on
    // and cleared.
    unsafe {
        ier.write(0x00);
        lcr.write(0x80);
        PortWriteOnly::<u8>::new(THR).write(0x01);
        ier.write(0x00);
        lcr.write(0x03);
        PortWriteOnly::<u8>::new(FCR).write(0xC7);
        PortWriteOnly::<u8>::new(MCR).write(0x03);
    }
}

/// Writes `bytes` as one unit (no other CPU's output interleaves).
/// Ring 0 only, with interrupts disabled (every ring-0 path runs so).
/// Inlined so that the write kernel call does not pay a call and its register
/// shuffling on top of the emulated port accesses.
#[inline]
pub fn write(bytes: &[u8]) {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    if BY_HYPERCALL.load(Ordering::Relaxed) {
        for chunk in bytes.chunks(CONSOLE_MAX) {
            // A buffer the shim refuses (it is not RAM) still gets printed.
            if !by_hypercall(chunk) {
                to_uart(chunk);
            }
        }
    } else {
        to_uart(bytes);
    }
    LOCK.store(false, Ordering::Release);
}

/// One `ConsoleWrite` hypercall; false if the shim refused it.
fn by_hypercall(chunk: &[u8]) -> bool {
    let (Ok(gpa), Ok(len)) = (
        u32::try_from(chunk.as_ptr() as u64),
        u16::try_from(chunk.len()),
    ) else {
        return false;
    };
    super::exit::hypercall(Call::ConsoleWrite, console_arg(gpa, len)) == Status::Ok as u64
}

/// FIFO-sized bursts to the UART.
fn to_uart(bytes: &[u8]) {
    let mut lsr = PortReadOnly::<u8>::new(LSR);
    for chunk in bytes.chunks(FIFO_DEPTH) {
        // SAFETY: an LSR read only reports the transmitter's state.
        while unsafe { lsr.read() } & LSR_THRE == 0 {
            core::hint::spin_loop();
        }
        out_string(THR, chunk);
    }
}

/// `rep outsb`: every byte of `bytes` to `port` in one instruction (KVM still
/// exits once per byte, but the byte loop's own instructions, each emulated
/// in ring 0 here, are gone).
#[inline]
fn out_string(port: u16, bytes: &[u8]) {
    // SAFETY: reads exactly `bytes.len()` bytes from `bytes` and writes them to
    // the console's THR; no memory is written and the flags are untouched
    // (DF is clear, as the ABI guarantees at every Rust function boundary).
    unsafe {
        core::arch::asm!(
            "rep outsb",
            in("dx") port,
            inout("rsi") bytes.as_ptr() => _,
            inout("rcx") bytes.len() => _,
            options(nostack, preserves_flags, readonly),
        );
    }
}

/// A `core::fmt::Write` sink for ring-0 reports. Writes per `write_str` call,
/// so callers format a whole line into a buffer first where atomicity matters.
pub struct Ring0Writer;

impl core::fmt::Write for Ring0Writer {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        write(s.as_bytes());
        Ok(())
    }
}
