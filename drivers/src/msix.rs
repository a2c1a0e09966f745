//! MSI-X (PCI Local Bus 3.0 §6.8.2) and the MSI message format (SDM vol 3 §11.11).

use core::fmt;

/// Capability ID of MSI-X.
pub const CAP_ID: u8 = 0x11;

/// A local APIC id (the destination of an interrupt).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ApicId(pub u32);

/// An interrupt vector the CPU will see (32–254).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Vector(pub u8);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsixError {
    /// The device has no MSI-X capability.
    NoCapability,
    /// The table lives in a BAR that is not a memory BAR or is not assigned.
    BadTableBar(u8),
    /// The entry index is beyond the table.
    NoSuchEntry { entry: u16, table_size: u16 },
    /// Plain MSI addresses reach APIC ids up to 255 only (no interrupt remapping).
    DestinationOutOfRange(ApicId),
    /// Vectors 0–31 are exceptions and 255 is the spurious vector.
    BadVector(u8),
    /// The table entry did not hold what was written.
    ReadBack { entry: u16 },
}

impl fmt::Display for MsixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoCapability => write!(f, "device has no MSI-X capability"),
            Self::BadTableBar(b) => write!(f, "MSI-X table BAR {b} is not an assigned memory BAR"),
            Self::NoSuchEntry { entry, table_size } => {
                write!(f, "MSI-X entry {entry} beyond a table of {table_size}")
            }
            Self::DestinationOutOfRange(id) => {
                write!(f, "APIC id {} cannot be reached by an MSI address", id.0)
            }
            Self::BadVector(v) => write!(f, "vector {v} cannot be used for a device interrupt"),
            Self::ReadBack { entry } => {
                write!(f, "MSI-X entry {entry} did not read back as written")
            }
        }
    }
}

/// An MSI message: what the device writes, and where, to interrupt a CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

impl MsiMessage {
    /// Fixed delivery, edge-triggered, physical destination `dest`
    /// (SDM vol 3 §11.11.1 address: 0xFEE, destination id in bits 19:12, RH = DM = 0;
    /// §11.11.2 data: vector in bits 7:0, delivery mode 000, trigger mode 0).
    pub fn fixed(dest: ApicId, vector: Vector) -> Result<Self, MsixError> {
        if dest.0 > 0xFF {
            return Err(MsixError::DestinationOutOfRange(dest));
        }
        if vector.0 < 32 || vector.0 == 0xFF {
            return Err(MsixError::BadVector(vector.0));
        }
        Ok(Self {
            address: 0xFEE0_0000 | (u64::from(dest.0) << 12),
            data: u32::from(vector.0),
        })
    }

    /// The destination APIC id encoded in the address.
    #[must_use]
    pub const fn destination(&self) -> ApicId {
        ApicId(((self.address >> 12) & 0xFF) as u32)
    }

    /// The vector encoded in the data.
    #[must_use]
    pub const fn vector(&self) -> Vector {
        Vector(self.data as u8)
    }
}

/// The MSI-X capability's registers, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCapability {
    /// Offset of the capability in configuration space.
    pub offset: u8,
    pub table_size: u16,
    pub table_bar: u8,
    pub table_offset: u32,
    pub pba_bar: u8,
    pub pba_offset: u32,
}

impl MsixCapability {
    /// Decodes Message Control (bits 10:0 = size − 1), Table Offset/BIR and
    /// PBA Offset/BIR (BIR in bits 2:0, offset in 31:3).
    #[must_use]
    pub const fn decode(offset: u8, message_control: u16, table: u32, pba: u32) -> Self {
        Self {
            offset,
            table_size: (message_control & 0x7FF) + 1,
            table_bar: (table & 7) as u8,
            table_offset: table & !7,
            pba_bar: (pba & 7) as u8,
            pba_offset: pba & !7,
        }
    }

    /// Message Control with MSI-X enabled and the function mask clear.
    #[must_use]
    pub const fn enabled_control(message_control: u16) -> u16 {
        (message_control | (1 << 15)) & !(1 << 14)
    }
}

/// The table of one function, mapped. Each entry is four dwords: message
/// address low, high, data, vector control (bit 0 = masked).
pub struct MsixTable {
    base: *mut u32,
    size: u16,
}

// SAFETY: the table is device memory reached through volatile accesses only;
// the owner serialises use (entries are retargeted under a mask, see `program`).
unsafe impl Send for MsixTable {}

impl fmt::Debug for MsixTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MsixTable")
            .field("base", &self.base)
            .field("size", &self.size)
            .finish()
    }
}

const MASK_BIT: u32 = 1;

impl MsixTable {
    /// # Safety
    /// `base` must point at `size` mapped 16-byte entries that nothing else
    /// writes, and stay valid for the table's life.
    #[must_use]
    pub const unsafe fn new(base: *mut u32, size: u16) -> Self {
        Self { base, size }
    }

    #[must_use]
    pub const fn size(&self) -> u16 {
        self.size
    }

    fn word(&self, entry: u16, index: usize) -> Result<*mut u32, MsixError> {
        if entry >= self.size {
            return Err(MsixError::NoSuchEntry {
                entry,
                table_size: self.size,
            });
        }
        // SAFETY: inside the table (checked), per `new`'s contract.
        Ok(unsafe { self.base.add(entry as usize * 4 + index) })
    }

    fn read(&self, entry: u16, index: usize) -> Result<u32, MsixError> {
        // SAFETY: a valid entry word (checked by `word`).
        self.word(entry, index)
            .map(|p| unsafe { p.read_volatile() })
    }

    fn write(&self, entry: u16, index: usize, v: u32) -> Result<(), MsixError> {
        // SAFETY: a valid entry word (checked by `word`).
        self.word(entry, index)
            .map(|p| unsafe { p.write_volatile(v) })
    }

    /// Points `entry` at `msg`, then unmasks it. The entry is masked while it
    /// changes: an interrupt raised meanwhile sets the pending bit and is sent,
    /// to the new destination, on unmask (PCI 3.0 §6.8.3.4) — none is lost and
    /// none goes to a half-written address. Reads the entry back.
    pub fn program(&self, entry: u16, msg: MsiMessage) -> Result<(), MsixError> {
        let control = self.read(entry, 3)?;
        self.write(entry, 3, control | MASK_BIT)?;
        self.write(entry, 0, msg.address as u32)?;
        self.write(entry, 1, (msg.address >> 32) as u32)?;
        self.write(entry, 2, msg.data)?;
        self.write(entry, 3, control & !MASK_BIT)?;
        if self.message(entry)? != msg || self.masked(entry)? {
            return Err(MsixError::ReadBack { entry });
        }
        Ok(())
    }

    /// The message an entry holds now.
    pub fn message(&self, entry: u16) -> Result<MsiMessage, MsixError> {
        let lo = self.read(entry, 0)?;
        let hi = self.read(entry, 1)?;
        Ok(MsiMessage {
            address: (u64::from(hi) << 32) | u64::from(lo),
            data: self.read(entry, 2)?,
        })
    }

    pub fn masked(&self, entry: u16) -> Result<bool, MsixError> {
        Ok(self.read(entry, 3)? & MASK_BIT != 0)
    }

    pub fn set_masked(&self, entry: u16, masked: bool) -> Result<(), MsixError> {
        let control = self.read(entry, 3)?;
        self.write(
            entry,
            3,
            if masked {
                control | MASK_BIT
            } else {
                control & !MASK_BIT
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;

    #[test]
    fn fixed_messages_encode_destination_and_vector() {
        let m = MsiMessage::fixed(ApicId(3), Vector(0x41)).unwrap();
        assert_eq!(m.address, 0xFEE0_3000);
        assert_eq!(m.data, 0x41);
        assert_eq!(m.destination(), ApicId(3));
        assert_eq!(m.vector(), Vector(0x41));
        assert_eq!(
            MsiMessage::fixed(ApicId(256), Vector(0x41)),
            Err(MsixError::DestinationOutOfRange(ApicId(256)))
        );
        assert_eq!(
            MsiMessage::fixed(ApicId(0), Vector(14)),
            Err(MsixError::BadVector(14))
        );
        assert_eq!(
            MsiMessage::fixed(ApicId(0), Vector(0xFF)),
            Err(MsixError::BadVector(0xFF))
        );
    }

    #[test]
    fn capability_decodes() {
        let c = MsixCapability::decode(0x98, 0x0002, 0x0000_2001, 0x0000_3801);
        assert_eq!(c.table_size, 3);
        assert_eq!((c.table_bar, c.table_offset), (1, 0x2000));
        assert_eq!((c.pba_bar, c.pba_offset), (1, 0x3800));
        assert_eq!(MsixCapability::enabled_control(0x4002), 0x8002);
    }

    #[test]
    fn program_masks_writes_unmasks_and_reads_back() {
        let mut mem = vec![0u32; 3 * 4];
        mem[4 + 3] = 1; // entry 1's vector control: masked, as after reset
        // SAFETY: `mem` outlives the table and holds 3 entries.
        let t = unsafe { MsixTable::new(mem.as_mut_ptr(), 3) };
        let msg = MsiMessage::fixed(ApicId(1), Vector(0x50)).unwrap();
        t.program(1, msg).unwrap();
        assert_eq!(t.message(1).unwrap(), msg);
        assert!(!t.masked(1).unwrap());
        assert_eq!(
            t.program(3, msg),
            Err(MsixError::NoSuchEntry {
                entry: 3,
                table_size: 3
            })
        );
        t.set_masked(0, true).unwrap();
        assert!(t.masked(0).unwrap());
    }
}
