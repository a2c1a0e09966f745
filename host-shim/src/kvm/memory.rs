//! Guest RAM: one memfd-backed region starting at guest-physical 0.
//!
//! memfd, not anonymous memory, because later mechanisms (M5, VM queues) replace
//! single guest pages with pages of another file by `mmap(MAP_FIXED)`; vm-memory maps
//! a file region `MAP_SHARED`, which keeps such remaps coherent for the guest.

use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use para_abi::layout::{KERNEL_LOAD, PARA_REGION_BASE};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Guest memory as the rest of the shim sees it.
pub type GuestMem = GuestMemoryMmap<()>;

/// The smallest RAM we accept: the kernel loads at 1 MiB and needs room above it.
pub const MIN_RAM: u64 = 4 << 20;
/// The largest RAM we accept: it must end below the para region (para-abi layout:
/// the region sits at `PARA_REGION_BASE`, just below the MMIO hole), 2560 MiB.
pub const MAX_RAM: u64 = PARA_REGION_BASE;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error(
        "guest RAM size {0:#x} is outside [{MIN_RAM:#x}, {MAX_RAM:#x}] (RAM must end below the para region) or not 4 KiB aligned"
    )]
    BadSize(u64),
    #[error("memfd_create failed: {0}")]
    Memfd(std::io::Error),
    #[error("sizing the memfd failed: {0}")]
    Truncate(std::io::Error),
    #[error("mapping guest RAM failed: {0}")]
    Map(String),
    #[error("KVM_SET_USER_MEMORY_REGION failed: {0}")]
    Slot(kvm_ioctls::Error),
}

/// Creates a memfd named after the guest and sizes it.
pub(crate) fn memfd(name: &str, size: u64) -> Result<File, MemoryError> {
    let cname = std::ffi::CString::new(format!("exitless-{name}"))
        .unwrap_or_else(|_| c"exitless-guest".to_owned());
    // SAFETY: `cname` is a valid NUL-terminated string; the flags are valid constants.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(MemoryError::Truncate)?;
    Ok(file)
}

/// Allocates `size` bytes of guest RAM at guest-physical 0, backed by a memfd.
pub fn create(name: &str, size: u64) -> Result<GuestMem, MemoryError> {
    if !(MIN_RAM..=MAX_RAM).contains(&size) || !size.is_multiple_of(4096) || size <= KERNEL_LOAD {
        return Err(MemoryError::BadSize(size));
    }
    let file = memfd(name, size)?;
    let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
    let mapping = MmapRegion::from_file(FileOffset::new(file, 0), len)
        .map_err(|e| MemoryError::Map(e.to_string()))?;
    let region = GuestRegionMmap::new(mapping, GuestAddress(0))
        .ok_or_else(|| MemoryError::Map("region overflows the address space".into()))?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|e| MemoryError::Map(e.to_string()))
}

/// Host memory the shim shares with a guest through a memslot of its own (the
/// para region, the hint page, the control blocks): an anonymous `MAP_SHARED`
/// read-write mapping, unmapped on drop. Its users reach it only through
/// para-abi's atomic types, because the guest writes it concurrently.
pub struct SharedMapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory owned by this value; every access after construction goes
// through atomics (see the type's documentation), so sharing it is sound.
unsafe impl Send for SharedMapping {}
// SAFETY: as above.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// `len` bytes, zeroed, page aligned.
    pub fn new(len: usize) -> std::io::Result<Self> {
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The first byte (page aligned).
    #[must_use]
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned; borrows of the memory
        // are tied to `&self` (or to owners that drop the VM's memslot first).
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// KVM memslot numbers. RAM takes slots from 0, the para region (M1) follows it;
/// each later mechanism has its own fixed range so they can be added in any order.
pub mod slot {
    /// M2 hint page.
    pub const HINTS: u32 = 100;
    /// M3 upcall mailboxes.
    pub const UPCALLS: u32 = 101;
    /// M4 control blocks: 102–105.
    pub const CTRL_FIRST: u32 = 102;
    pub const CTRL_LAST: u32 = 105;
    /// M5 VM queues: 110–199.
    pub const VMQ_FIRST: u32 = 110;
    pub const VMQ_LAST: u32 = 199;
    /// Direct channels: two per peer id (own endpoint, the peer's), 200–263.
    pub const DIRECT_FIRST: u32 = 200;
    pub const DIRECT_LAST: u32 = DIRECT_FIRST + 2 * para_abi::vmq::DIR_ENTRIES as u32 - 1;
}

/// Registers every region of `mem` with KVM, slot numbers from 0.
pub fn register(vm: &VmFd, mem: &GuestMem) -> Result<(), MemoryError> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        let desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        set_slot(vm, desc)?;
    }
    Ok(())
}

fn set_slot(vm: &VmFd, desc: kvm_userspace_memory_region) -> Result<(), MemoryError> {
    // SAFETY: the host range belongs to a mapping owned by the `GuestMem` that the VM
    // keeps alive for as long as the VM fd exists (both live in `vm::Vm`).
    unsafe { vm.set_user_memory_region(desc) }.map_err(MemoryError::Slot)
}

/// Parses sizes like `256M`, `1G`, `65536K` or plain bytes.
#[must_use]
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let (digits, shift) = match t.as_bytes().last()? {
        b'k' | b'K' => (&t[..t.len() - 1], 10),
        b'm' | b'M' => (&t[..t.len() - 1], 20),
        b'g' | b'G' => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("256M"), Some(256 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999999999G"), None);
    }

    #[test]
    fn ram_must_fit_below_the_hole() {
        assert!(matches!(
            create("t", MAX_RAM + 4096),
            Err(MemoryError::BadSize(_))
        ));
        assert!(matches!(
            create("t", MIN_RAM + 1),
            Err(MemoryError::BadSize(_))
        ));
    }

    #[test]
    fn memfd_ram_is_readable_and_writable() {
        let mem = create("t", 8 << 20).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x7f_fffc))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x7f_fffc)).unwrap(),
            0xdead_beef
        );
        assert!(mem.read_obj::<u32>(GuestAddress(8 << 20)).is_err());
        assert_eq!(mem.num_regions(), 1);
    }
}
