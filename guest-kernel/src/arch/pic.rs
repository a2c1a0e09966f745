//! The legacy 8259 PICs: remapped away from the exception vectors, then masked.
//! `SeaBIOS` leaves the master's timer unmasked on vector 8; a
//! spurious IRQ 7 could still arrive even when masked, so the remap matters.

use crate::abi::vector::PIC_BASE;
use x86_64::instructions::port::PortWriteOnly;

/// # Safety
/// Ring 0, once, on the boot CPU, before interrupts are enabled.
pub unsafe fn remap_and_mask() {
    let (mut master_cmd, mut master_data) = (
        PortWriteOnly::<u8>::new(0x20),
        PortWriteOnly::<u8>::new(0x21),
    );
    let (mut slave_cmd, mut slave_data) = (
        PortWriteOnly::<u8>::new(0xA0),
        PortWriteOnly::<u8>::new(0xA1),
    );
    // SAFETY: the standard initialisation sequence (8259A datasheet, ICW1–ICW4):
    // edge-triggered, cascaded, vector bases PIC_BASE and PIC_BASE + 8, 8086
    // mode; then OCW1 masks every line.
    unsafe {
        master_cmd.write(0x11);
        slave_cmd.write(0x11);
        master_data.write(PIC_BASE);
        slave_data.write(PIC_BASE + 8);
        master_data.write(0x04);
        slave_data.write(0x02);
        master_data.write(0x01);
        slave_data.write(0x01);
        master_data.write(0xFF);
        slave_data.write(0xFF);
    }
}
