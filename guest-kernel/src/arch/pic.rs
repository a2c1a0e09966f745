//! The legacy 8259 PICs: remapped away from the exception vectors, then masked.
//! `SeaBIOS` leaves the master's timer unmasked on vector 8 (DESIGN §7); a
//! spurious IRQ 7 could still arrive even when masked, so the remap matters.

use super::cpu::outb;
use crate::abi::vector::PIC_BASE;

/// # Safety
/// Ring 0, once, on the boot CPU, before interrupts are enabled.
pub unsafe fn remap_and_mask() {
    // SAFETY: the standard initialisation sequence (8259A datasheet, ICW1–ICW4):
    // edge-triggered, cascaded, vector bases PIC_BASE and PIC_BASE + 8, 8086 mode.
    unsafe {
        outb(0x20, 0x11);
        outb(0xA0, 0x11);
        outb(0x21, PIC_BASE);
        outb(0xA1, PIC_BASE + 8);
        outb(0x21, 0x04);
        outb(0xA1, 0x02);
        outb(0x21, 0x01);
        outb(0xA1, 0x01);
        outb(0x21, 0xFF);
        outb(0xA1, 0xFF);
    }
}
