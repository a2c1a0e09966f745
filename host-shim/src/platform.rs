//! One guest's port and MMIO address space: which device answers which access.
//!
//! Everything here runs on a vCPU thread after an exit and treats the access as
//! hostile: unknown ports and unmapped MMIO are counted, logged (rate-limited) and
//! answered like an empty bus (reads all ones), never fatal.

use std::sync::{Arc, Mutex};

use para_abi::layout::SERIAL_PORT;

use crate::counters::{Reject, RejectCounters};
use crate::devices::serial::{self, Uart};
use crate::sync::lock;

/// A device reachable through guest-physical MMIO.
pub trait MmioDevice: Send + Sync {
    /// Handles a read at `addr`; returns false when nothing lives there.
    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool;
    /// Handles a write at `addr`; returns false when nothing lives there.
    fn mmio_write(&self, addr: u64, data: &[u8]) -> bool;
}

/// A device reachable through port I/O.
pub trait PioDevice: Send + Sync {
    fn pio_read(&self, port: u16, data: &mut [u8]) -> bool;
    fn pio_write(&self, port: u16, data: &[u8]) -> bool;
}

/// 8259A PIC command/data ports, master and slave (8259A data sheet; PC/AT map).
const PIC_PORTS: [u16; 4] = [0x20, 0x21, 0xA0, 0xA1];
/// 8254 PIT channels and control, and the PC/AT "port B" speaker/gate register.
const PIT_PORTS: [u16; 5] = [0x40, 0x41, 0x42, 0x43, 0x61];

pub struct Platform {
    pub name: String,
    pub uart: Mutex<Uart>,
    pub rejects: Arc<RejectCounters>,
    mmio: Vec<Arc<dyn MmioDevice>>,
    pio: Vec<Arc<dyn PioDevice>>,
}

impl Platform {
    #[must_use]
    pub fn new(name: &str, uart: Uart, rejects: Arc<RejectCounters>) -> Self {
        Self {
            name: name.to_owned(),
            uart: Mutex::new(uart),
            rejects,
            mmio: Vec::new(),
            pio: Vec::new(),
        }
    }

    pub fn add_mmio(&mut self, d: Arc<dyn MmioDevice>) {
        self.mmio.push(d);
    }

    pub fn add_pio(&mut self, d: Arc<dyn PioDevice>) {
        self.pio.push(d);
    }

    /// Counts a rejected access and logs the first few of its reason.
    pub fn reject(&self, r: Reject, what: std::fmt::Arguments<'_>) {
        self.rejects.reject(r, &self.name, "guest access", what);
    }

    fn uart(&self) -> std::sync::MutexGuard<'_, Uart> {
        lock(&self.uart)
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if (SERIAL_PORT..SERIAL_PORT + serial::PORT_COUNT).contains(&port) {
            // The UART's registers are bytes (16550A data sheet).
            if data.len() != 1 {
                data.fill(0xFF);
                self.reject(
                    Reject::SerialBadAccess,
                    format_args!("{}-byte in from UART port {port:#x}", data.len()),
                );
                return;
            }
            data[0] = self.uart().read((port - SERIAL_PORT) as u8);
            return;
        }
        if PIC_PORTS.contains(&port) {
            self.rejects.bump(Reject::LegacyPic);
            data.fill(0xFF); // every line masked
            return;
        }
        if PIT_PORTS.contains(&port) {
            self.rejects.bump(Reject::LegacyPit);
            data.fill(0);
            return;
        }
        if self.pio.iter().any(|d| d.pio_read(port, data)) {
            return;
        }
        data.fill(0xFF);
        self.reject(
            Reject::UnknownPort,
            format_args!("in from port {port:#x} ({} bytes)", data.len()),
        );
    }

    /// Console bytes from a `ConsoleWrite` hypercall: written to the THR one by
    /// one, so they reach the same line splitting and escaping as port output.
    pub fn console_write(&self, bytes: &[u8]) {
        let mut uart = self.uart();
        for &b in bytes {
            // The error type is Infallible: the UART cannot fail to write.
            let _ = uart.write(0, b);
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        if (SERIAL_PORT..SERIAL_PORT + serial::PORT_COUNT).contains(&port) {
            let &[b] = data else {
                self.reject(
                    Reject::SerialBadAccess,
                    format_args!("out of {data:x?} to UART port {port:#x}"),
                );
                return;
            };
            // The error type is Infallible: the UART cannot fail to write.
            let _ = self.uart().write((port - SERIAL_PORT) as u8, b);
            return;
        }
        // With the split irqchip there is no in-kernel PIC; the guest only masks it.
        if PIC_PORTS.contains(&port) {
            self.rejects.bump(Reject::LegacyPic);
            return;
        }
        if PIT_PORTS.contains(&port) {
            self.rejects.bump(Reject::LegacyPit);
            return;
        }
        if self.pio.iter().any(|d| d.pio_write(port, data)) {
            return;
        }
        self.reject(
            Reject::UnknownPort,
            format_args!("out to port {port:#x} = {data:x?}"),
        );
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if self.mmio.iter().any(|d| d.mmio_read(addr, data)) {
            return;
        }
        data.fill(0xFF);
        self.reject(
            Reject::UnmappedMmio,
            format_args!("read of {} bytes at {addr:#x}", data.len()),
        );
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if self.mmio.iter().any(|d| d.mmio_write(addr, data)) {
            return;
        }
        self.reject(
            Reject::UnmappedMmio,
            format_args!("write of {data:x?} at {addr:#x}"),
        );
    }

    /// Flushes the console's last partial line.
    pub fn finish(&self) {
        self.uart().writer_mut().finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::{LineWriter, Sink, new_uart};

    fn platform() -> (Platform, Arc<Mutex<Vec<String>>>) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let p = Platform::new(
            "t",
            new_uart(LineWriter::new("t", Sink::Buffer(buf.clone()))),
            Arc::default(),
        );
        (p, buf)
    }

    #[test]
    fn unmapped_mmio_reads_ones_and_is_counted() {
        let (p, _) = platform();
        let mut d = [0u8; 4];
        p.mmio_read(0xDEAD_0000, &mut d);
        assert_eq!(d, [0xFF; 4]);
        p.mmio_write(0xDEAD_0000, &[1, 2]);
        assert_eq!(p.rejects.count(Reject::UnmappedMmio), 2);
    }

    #[test]
    fn legacy_pic_and_pit_are_accepted_and_counted() {
        let (p, _) = platform();
        p.pio_write(0x21, &[0xFF]);
        p.pio_write(0xA1, &[0xFF]);
        p.pio_write(0x20, &[0x11]);
        p.pio_write(0x43, &[0x34]);
        let mut d = [0u8; 1];
        p.pio_read(0x61, &mut d);
        assert_eq!(p.rejects.count(Reject::LegacyPic), 3);
        assert_eq!(p.rejects.count(Reject::LegacyPit), 2);
        assert_eq!(p.rejects.count(Reject::UnknownPort), 0);
    }

    #[test]
    fn serial_bytes_reach_the_console() {
        let (p, buf) = platform();
        for &b in b"ok\n" {
            p.pio_write(SERIAL_PORT, &[b]);
        }
        assert_eq!(*buf.lock().unwrap(), vec!["ok".to_owned()]);
        let mut d = [0u8; 4];
        p.pio_read(0x1234, &mut d);
        assert_eq!(p.rejects.count(Reject::UnknownPort), 1);
    }

    #[test]
    fn uart_accesses_wider_than_a_byte_are_refused_and_counted() {
        let (p, buf) = platform();
        p.pio_write(SERIAL_PORT, b"AB");
        p.pio_write(SERIAL_PORT + 7, &[1, 2, 3, 4]);
        let mut d = [0u8; 4];
        p.pio_read(SERIAL_PORT + 5, &mut d);
        assert_eq!(d, [0xFF; 4]);
        let mut w = [0u8; 2];
        p.pio_read(SERIAL_PORT, &mut w);
        assert_eq!(p.rejects.count(Reject::SerialBadAccess), 4);
        p.pio_write(SERIAL_PORT, b"\n");
        assert!(
            buf.lock().unwrap().iter().all(|l| !l.contains('A')),
            "nothing of the refused write reached the console"
        );
        assert_eq!(p.rejects.count(Reject::UnknownPort), 0);
    }
}
