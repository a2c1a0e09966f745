//! How a guest finds out that it runs under the Exitless host shim.
//!
//! The shim answers the hypervisor CPUID range (Intel SDM vol 2A, CPUID: leaves
//! `0x4000_0000–0x4FFF_FFFF` are reserved for hypervisor use). It replaces KVM's own
//! paravirtual leaves there: the guest must not mistake the shim for plain KVM.

/// CPUID leaf with the maximum hypervisor leaf in EAX and the signature in EBX, ECX, EDX.
pub const LEAF_SIGNATURE: u32 = 0x4000_0000;
/// CPUID leaf whose EAX carries [`features`] bits.
pub const LEAF_FEATURES: u32 = 0x4000_0001;
/// CPUID leaf saying where the para region ([`crate::region`]) is: EAX = its
/// guest-physical address bits 0..32, EBX = bits 32..64, ECX = its size in bytes,
/// EDX = [`crate::region::VERSION`]. All zero when the shim offers no para region.
pub const LEAF_PARA_REGION: u32 = 0x4000_0002;
/// CPUID leaves of the mechanisms after M1, each answered only when its feature
/// bit is set: EAX = guest-physical address bits 0..32, EBX = bits 32..64, ECX =
/// size in bytes, EDX = the mechanism's layout version. Addresses are those of
/// [`crate::layout::area`].
pub const LEAF_HINTS: u32 = 0x4000_0003;
/// M3 upcall mailboxes (see [`LEAF_HINTS`] for the register convention).
pub const LEAF_UPCALLS: u32 = 0x4000_0004;
/// M4 control blocks (see [`LEAF_HINTS`]).
pub const LEAF_CTRL: u32 = 0x4000_0005;
/// M5 VM queues (see [`LEAF_HINTS`]).
pub const LEAF_VMQ: u32 = 0x4000_0006;
/// Direct channels between guests ([`crate::direct`]; see [`LEAF_HINTS`]).
pub const LEAF_DIRECT: u32 = 0x4000_0007;
/// Debug traps forwarded to an attached debugger ([`features::DEBUG_TRAPS`]):
/// EAX = [`crate::hypercall::debug_frame::VERSION`], EBX = the frame's size
/// in bytes ([`crate::hypercall::debug_frame::BYTES`]), ECX = EDX = 0.
pub const LEAF_DEBUG: u32 = 0x4000_0008;
/// CPUID leaf with timing information, following the convention `VMware` and KVM
/// guests already know: EAX = TSC frequency in kHz, EBX = LAPIC timer frequency in kHz.
pub const LEAF_TIMING: u32 = 0x4000_0010;
/// The highest hypervisor leaf the shim answers.
pub const MAX_LEAF: u32 = LEAF_TIMING;

/// The 12-byte signature in EBX, ECX, EDX of [`LEAF_SIGNATURE`].
pub const SIGNATURE: [u8; 12] = *b"ExitlessShim";

/// Splits [`SIGNATURE`] into the (EBX, ECX, EDX) values CPUID returns.
#[must_use]
pub const fn signature_registers() -> (u32, u32, u32) {
    let s = SIGNATURE;
    (
        u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        u32::from_le_bytes([s[4], s[5], s[6], s[7]]),
        u32::from_le_bytes([s[8], s[9], s[10], s[11]]),
    )
}

/// True when (EBX, ECX, EDX) of [`LEAF_SIGNATURE`] spell [`SIGNATURE`].
#[must_use]
pub const fn is_exitless(ebx: u32, ecx: u32, edx: u32) -> bool {
    let (b, c, d) = signature_registers();
    ebx == b && ecx == c && edx == d
}

/// Feature bits in EAX of [`LEAF_FEATURES`].
pub mod features {
    /// The exit hypercall of [`crate::hypercall`] is available.
    pub const EXIT_HYPERCALL: u32 = 1 << 0;
    /// [`super::LEAF_PARA_REGION`] names a para region.
    pub const PARA_REGION: u32 = 1 << 1;
    /// The para region's designation table offers doorbell ranges (M1,
    /// [`crate::doorbell`]). Implies [`PARA_REGION`].
    pub const DOORBELLS: u32 = 1 << 2;
    /// M2 interrupt-vCPU hints ([`super::LEAF_HINTS`]).
    pub const HINTS: u32 = 1 << 3;
    /// M3 upcalls delivered at the open interrupt window ([`super::LEAF_UPCALLS`]).
    pub const UPCALLS: u32 = 1 << 4;
    /// M4 shadowed control flags ([`super::LEAF_CTRL`]).
    pub const SHADOW_FLAGS: u32 = 1 << 5;
    /// M5 VM queues ([`super::LEAF_VMQ`]).
    pub const VM_QUEUES: u32 = 1 << 6;
    /// Direct channels to other guests ([`super::LEAF_DIRECT`]); implies
    /// [`VM_QUEUES`], whose directory says which peers have one.
    pub const DIRECT_CHANNELS: u32 = 1 << 7;
    /// A debugger is attached to this guest (`--gdb`): ring 3's #DB and #BP
    /// go to the shim through [`crate::hypercall::Call::DebugTrap`]
    /// ([`super::LEAF_DEBUG`]).
    pub const DEBUG_TRAPS: u32 = 1 << 8;
}

/// The (EAX, EBX, ECX, EDX) of a mechanism leaf ([`LEAF_HINTS`]...).
#[must_use]
pub const fn area_registers(gpa: u64, size: u32, version: u32) -> [u32; 4] {
    [gpa as u32, (gpa >> 32) as u32, size, version]
}

/// Decodes a mechanism leaf: `Some((gpa, size, version))`, `None` when size is 0.
#[must_use]
pub const fn area_from_registers(r: [u32; 4]) -> Option<(u64, u32, u32)> {
    if r[2] == 0 {
        return None;
    }
    Some(((r[1] as u64) << 32 | r[0] as u64, r[2], r[3]))
}

/// The (EAX, EBX, ECX, EDX) of [`LEAF_PARA_REGION`] for a region at `gpa` of `size`
/// bytes.
#[must_use]
pub const fn para_region_registers(gpa: u64, size: u32) -> (u32, u32, u32, u32) {
    (gpa as u32, (gpa >> 32) as u32, size, crate::region::VERSION)
}

/// Decodes [`LEAF_PARA_REGION`]: `Some((gpa, size, version))`, or `None` when the
/// size is zero (no region).
#[must_use]
pub const fn para_region_from_registers(
    eax: u32,
    ebx: u32,
    ecx: u32,
    edx: u32,
) -> Option<(u64, u32, u32)> {
    if ecx == 0 {
        return None;
    }
    Some(((ebx as u64) << 32 | eax as u64, ecx, edx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_round_trips_through_registers() {
        let (b, c, d) = signature_registers();
        assert!(is_exitless(b, c, d));
        let mut bytes = [0u8; 12];
        bytes[..4].copy_from_slice(&b.to_le_bytes());
        bytes[4..8].copy_from_slice(&c.to_le_bytes());
        bytes[8..].copy_from_slice(&d.to_le_bytes());
        assert_eq!(&bytes, b"ExitlessShim");
    }

    #[test]
    fn para_region_leaf_round_trips() {
        let (a, b, c, d) = para_region_registers(0x1_2345_6000, 0x4_0000);
        assert_eq!(
            para_region_from_registers(a, b, c, d),
            Some((0x1_2345_6000, 0x4_0000, crate::region::VERSION))
        );
        assert_eq!(para_region_from_registers(0, 0, 0, 0), None);
    }

    #[test]
    fn kvm_signature_is_not_ours() {
        // "KVMKVMKVM\0\0\0" as KVM reports it.
        assert!(!is_exitless(0x4b4d_564b, 0x564b_4d56, 0x0000_004d));
    }
}
