//! The COM1 16550A console, driven from ring 0 (ring 3 has no port I/O here).
//!
//! Each port access exits to the VMM, so output is written in FIFO-sized
//! bursts: once LSR.THRE reports the transmit FIFO empty, 16 bytes may be
//! written without checking again (16550A datasheet, FIFO mode).

use core::sync::atomic::{AtomicBool, Ordering};
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
    let (mut lsr, mut thr) = (PortReadOnly::<u8>::new(LSR), PortWriteOnly::<u8>::new(THR));
    for chunk in bytes.chunks(FIFO_DEPTH) {
        // SAFETY: LSR reads and THR writes only move console bytes.
        unsafe {
            while lsr.read() & LSR_THRE == 0 {
                core::hint::spin_loop();
            }
            for &b in chunk {
                thr.write(b);
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
