//! The COM1 16550A console, driven from ring 0 (ring 3 has no port I/O here).
//!
//! Each port access exits to the VMM, so output is written in FIFO-sized
//! bursts: once LSR.THRE reports the transmit FIFO empty, 16 bytes may be
//! written without checking again (16550A datasheet, FIFO mode).

use super::cpu::{inb, outb};
use core::sync::atomic::{AtomicBool, Ordering};
use para_abi::layout::SERIAL_PORT as BASE;

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

/// # Safety
/// Ring 0, once, before any output.
pub unsafe fn init() {
    // SAFETY: programs the UART: no interrupts, 115200 8N1, FIFOs on and cleared.
    unsafe {
        outb(IER, 0x00);
        outb(LCR, 0x80);
        outb(THR, 0x01);
        outb(IER, 0x00);
        outb(LCR, 0x03);
        outb(FCR, 0xC7);
        outb(MCR, 0x03);
    }
}

/// Writes `bytes` as one unit (no other CPU's output interleaves).
/// Ring 0 only, with interrupts disabled (every ring-0 path runs so).
pub fn write(bytes: &[u8]) {
    while LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    for chunk in bytes.chunks(FIFO_DEPTH) {
        // SAFETY: LSR reads and THR writes only move console bytes.
        unsafe {
            while inb(LSR) & LSR_THRE == 0 {
                core::hint::spin_loop();
            }
            for &b in chunk {
                outb(THR, b);
            }
        }
    }
    LOCK.store(false, Ordering::Release);
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
