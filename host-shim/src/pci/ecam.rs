//! ECAM address decoding (PCI Express Base 4.0 §7.2.2): one 4 KiB configuration
//! page per function, bus << 20 | device << 15 | function << 12 | register.

/// Where the ECAM window is (the bottom of the MMIO hole) and how many buses it spans.
pub const ECAM_BASE: u64 = para_abi::layout::MMIO_HOLE_START;
/// The shim has one bus (0), so the window is 1 MiB.
pub const BUSES: u64 = 1;
pub const ECAM_SIZE: u64 = BUSES << 20;

/// A decoded configuration access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigAddress {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
    pub offset: u16,
}

/// Decodes a guest-physical address in the ECAM window; `None` outside it.
#[must_use]
pub fn decode(addr: u64) -> Option<ConfigAddress> {
    let off = addr.checked_sub(ECAM_BASE)?;
    if off >= ECAM_SIZE {
        return None;
    }
    Some(ConfigAddress {
        bus: (off >> 20) as u8,
        device: ((off >> 15) & 0x1F) as u8,
        function: ((off >> 12) & 0x7) as u8,
        offset: (off & 0xFFF) as u16,
    })
}

/// Decodes a 0xCF8 CONFIG_ADDRESS value plus the byte offset into 0xCFC..0xCFF
/// (PCI Local Bus 3.0 §3.2.2.3.2). `None` when the enable bit (31) is clear.
#[must_use]
pub fn decode_cf8(cf8: u32, byte: u16) -> Option<ConfigAddress> {
    if cf8 & (1 << 31) == 0 {
        return None;
    }
    Some(ConfigAddress {
        bus: (cf8 >> 16) as u8,
        device: ((cf8 >> 11) & 0x1F) as u8,
        function: ((cf8 >> 8) & 0x7) as u8,
        // Bits 7:2 select the dword; bits 27:24 extend it to 4 KiB (the AMD/QEMU
        // extension); 1:0 are reserved and read as 0.
        offset: ((cf8 & 0xFC) as u16 | (((cf8 >> 24) & 0xF) as u16) << 8) + byte,
    })
}

/// True when an access of `len` bytes at `offset` is one the PCI spec allows for
/// configuration space: 1, 2 or 4 bytes, naturally aligned, inside 4 KiB.
#[must_use]
pub fn access_ok(offset: u16, len: usize) -> bool {
    matches!(len, 1 | 2 | 4)
        && (offset as usize).is_multiple_of(len)
        && (offset as usize) + len <= 4096
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecam_decodes_bdf_and_register() {
        assert_eq!(
            decode(ECAM_BASE + (3 << 15) + (2 << 12) + 0x44),
            Some(ConfigAddress {
                bus: 0,
                device: 3,
                function: 2,
                offset: 0x44
            })
        );
        assert_eq!(decode(ECAM_BASE - 1), None);
        assert_eq!(decode(ECAM_BASE + ECAM_SIZE), None);
    }

    #[test]
    fn cf8_decodes_and_needs_enable() {
        let a = decode_cf8(0x8000_1810, 2).unwrap();
        assert_eq!((a.bus, a.device, a.function, a.offset), (0, 3, 0, 0x12));
        assert_eq!(decode_cf8(0x0000_1810, 0), None);
        // Low two bits are ignored; extended register bits 27:24 are honoured.
        assert_eq!(decode_cf8(0x8100_0013, 0).unwrap().offset, 0x110);
    }

    #[test]
    fn odd_config_accesses_are_refused() {
        assert!(access_ok(4, 4));
        assert!(access_ok(6, 2));
        assert!(!access_ok(6, 4));
        assert!(!access_ok(1, 2));
        assert!(!access_ok(0, 8));
        assert!(!access_ok(4094, 4));
    }
}
