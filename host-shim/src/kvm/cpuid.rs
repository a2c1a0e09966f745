//! The CPUID a guest vCPU sees: KVM's supported set, filtered.
//!
//! Per vCPU we set the APIC id (leaf 1 EBX\[31:24\], leaves 0xB/0x1F EDX), a flat
//! topology of one core per vCPU, the hypervisor bit, and we replace KVM's own
//! paravirtual range `0x4000_0000`.. with the Exitless leaves (para-abi discovery).

use std::sync::OnceLock;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2};
use kvm_ioctls::Kvm;
use para_abi::discovery::{self, features};

/// KVM's supported CPUID, asked once per process and shared by every guest:
/// `KVM_GET_SUPPORTED_CPUID` runs the host's CPUID instruction for every
/// leaf, each a trap to the outer hypervisor on a nested host (0.4 ms here).
static SUPPORTED: OnceLock<Result<Vec<kvm_cpuid_entry2>, i32>> = OnceLock::new();

/// KVM's supported CPUID entries (asked of `kvm` unless [`prefetch`] or an
/// earlier guest already did).
pub fn supported(kvm: &Kvm) -> Result<&'static [kvm_cpuid_entry2], kvm_ioctls::Error> {
    SUPPORTED
        .get_or_init(|| ask(kvm))
        .as_deref()
        .map_err(|&e| kvm_ioctls::Error::new(e))
}

fn ask(kvm: &Kvm) -> Result<Vec<kvm_cpuid_entry2>, i32> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map(|c| c.as_slice().to_vec())
        .map_err(kvm_ioctls::Error::errno)
}

/// Asks KVM for its supported CPUID on a thread of its own, while the caller
/// goes on setting up (the first [`supported`] waits for it). The thread ends
/// at once; it starts before any seccomp filter and makes two calls: open
/// `/dev/kvm` and the ioctl.
pub fn prefetch() {
    let _ = std::thread::Builder::new()
        .name("cpuid-prefetch".into())
        .spawn(|| {
            if let Ok(kvm) = Kvm::new() {
                let _ = SUPPORTED.get_or_init(|| ask(&kvm));
            }
        });
}

/// Leaf 1 ECX bits (SDM vol 2A, CPUID, table 3-10).
#[cfg(test)]
const LEAF1_ECX_X2APIC: u32 = 1 << 21;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: HTT, "max logical processors" field valid.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`: the entry depends on ECX.
const FLAG_INDEXED: u32 = 1;
/// The LAPIC timer frequency the guest should assume: KVM's APIC bus runs at 1 GHz.
pub const LAPIC_TIMER_KHZ: u32 = 1_000_000;

/// What the filter needs to know about the VM.
#[derive(Clone, Debug, Default)]
pub struct CpuidParams {
    pub vcpus: u32,
    pub tsc_khz: u32,
    /// KVM can emulate the TSC-deadline timer (`KVM_CAP_TSC_DEADLINE_TIMER`).
    pub tsc_deadline: bool,
    /// The mechanisms offered: feature bits OR-ed into [`discovery::LEAF_FEATURES`],
    /// and the hypervisor leaves that describe them.
    pub offers: Vec<Offer>,
}

/// One paravirtual mechanism the shim offers: its feature bits and its CPUID leaf
/// (EAX, EBX, ECX, EDX), given by the mechanism when it is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offer {
    pub feature: u32,
    pub leaf: u32,
    pub regs: [u32; 4],
}

/// Number of bits needed to give each of `n` items a distinct id.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn entry(function: u32, index: u32, flags: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function,
        index,
        flags,
        eax: regs[0],
        ebx: regs[1],
        ecx: regs[2],
        edx: regs[3],
        ..Default::default()
    }
}

/// Builds vCPU `apic_id`'s CPUID from KVM's supported entries.
#[must_use]
pub fn filter(
    supported: &[kvm_cpuid_entry2],
    apic_id: u32,
    p: &CpuidParams,
) -> Vec<kvm_cpuid_entry2> {
    let mut out = Vec::with_capacity(supported.len() + 4);
    for e in supported {
        let mut e = *e;
        match e.function {
            // Drop KVM's hypervisor range: the guest must see the Exitless leaves only.
            0x4000_0000..=0x4FFF_FFFF => continue,
            1 => {
                e.ebx = (e.ebx & 0x0000_FFFF) | (apic_id << 24) | ((p.vcpus.min(255)) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if p.tsc_deadline {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !LEAF1_ECX_TSC_DEADLINE;
                }
                // x2APIC (bit 21) stays as KVM reports it: the in-kernel LAPIC emulates it.
                if p.vcpus > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                }
            }
            // Deterministic cache parameters: EAX[31:26] = cores per package - 1.
            4 => {
                let cores = p.vcpus.clamp(1, 64) - 1;
                e.eax = (e.eax & 0x03FF_FFFF) | (cores << 26);
            }
            // Extended topology (SDM vol 2A, CPUID leaf 0Bh/1Fh): one thread per core,
            // every vCPU a core of one package.
            0xB | 0x1F => {
                let (eax, ebx, ecx) = match e.index {
                    0 => (0, 1, 1 << 8),
                    1 => (id_bits(p.vcpus), p.vcpus, (2 << 8) | 1),
                    i => (0, 0, i & 0xFF),
                };
                e.eax = eax;
                e.ebx = ebx;
                e.ecx = ecx;
                e.edx = apic_id;
                e.flags |= FLAG_INDEXED;
            }
            _ => {}
        }
        out.push(e);
    }
    let (b, c, d) = discovery::signature_registers();
    out.push(entry(
        discovery::LEAF_SIGNATURE,
        0,
        0,
        [discovery::MAX_LEAF, b, c, d],
    ));
    let feat = p
        .offers
        .iter()
        .fold(features::EXIT_HYPERCALL, |f, o| f | o.feature);
    for o in &p.offers {
        out.push(entry(o.leaf, 0, 0, o.regs));
    }
    out.push(entry(discovery::LEAF_FEATURES, 0, 0, [feat, 0, 0, 0]));
    // The para region's leaf reads zero without doorbells: the guest is told
    // there is none rather than left to guess from an absent leaf.
    if !p
        .offers
        .iter()
        .any(|o| o.leaf == discovery::LEAF_PARA_REGION)
    {
        out.push(entry(discovery::LEAF_PARA_REGION, 0, 0, [0; 4]));
    }
    out.push(entry(
        discovery::LEAF_TIMING,
        0,
        0,
        [p.tsc_khz, LAPIC_TIMER_KHZ, 0, 0],
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *v.iter()
            .find(|e| e.function == f && e.index == i)
            .expect("leaf present")
    }

    fn kvm_like() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, 0, [0x1F, 1, 2, 3]),
            entry(1, 0, 0, [0x806F8, 0xFF00_0800, LEAF1_ECX_X2APIC, 0]),
            entry(0xB, 0, FLAG_INDEXED, [1, 1, 0x100, 7]),
            entry(0xB, 1, FLAG_INDEXED, [4, 4, 0x201, 7]),
            entry(0x1F, 2, FLAG_INDEXED, [0, 0, 0x502, 7]),
            entry(
                0x4000_0000,
                0,
                0,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            entry(0x4000_0001, 0, 0, [0xFFFF, 0, 0, 0]),
        ]
    }

    const P: CpuidParams = CpuidParams {
        vcpus: 3,
        tsc_khz: 2_500_000,
        tsc_deadline: true,
        offers: Vec::new(),
    };

    #[test]
    fn apic_ids_and_topology_per_vcpu() {
        let v = filter(&kvm_like(), 2, &P);
        let l1 = find(&v, 1, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xFF, 3);
        assert_eq!(l1.ebx & 0xFFFF, 0x0800, "brand/clflush bits kept");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_X2APIC, 0, "x2APIC passed through");
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        let smt = find(&v, 0xB, 0);
        let core = find(&v, 0xB, 1);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        assert_eq!(find(&v, 0x1F, 2).edx, 2);
    }

    #[test]
    fn hypervisor_range_is_ours_only() {
        let v = filter(&kvm_like(), 0, &P);
        let sig = find(&v, 0x4000_0000, 0);
        assert_eq!(sig.eax, discovery::MAX_LEAF);
        assert!(discovery::is_exitless(sig.ebx, sig.ecx, sig.edx));
        assert_eq!(v.iter().filter(|e| e.function == 0x4000_0000).count(), 1);
        assert_eq!(find(&v, 0x4000_0001, 0).eax, features::EXIT_HYPERCALL);
        let t = find(&v, 0x4000_0010, 0);
        assert_eq!((t.eax, t.ebx), (2_500_000, LAPIC_TIMER_KHZ));
    }

    #[test]
    fn para_region_leaf_follows_the_doorbells() {
        let v = filter(&kvm_like(), 0, &P);
        let r = find(&v, discovery::LEAF_PARA_REGION, 0);
        assert_eq!((r.eax, r.ebx, r.ecx, r.edx), (0, 0, 0, 0));
        assert_eq!(
            find(&v, discovery::LEAF_FEATURES, 0).eax & features::DOORBELLS,
            0
        );
        let (eax, ebx, ecx, edx) = discovery::para_region_registers(0xA000_0000, 0x7000);
        let on = CpuidParams {
            offers: vec![Offer {
                feature: features::PARA_REGION | features::DOORBELLS,
                leaf: discovery::LEAF_PARA_REGION,
                regs: [eax, ebx, ecx, edx],
            }],
            ..P
        };
        let v = filter(&kvm_like(), 1, &on);
        let f = find(&v, discovery::LEAF_FEATURES, 0).eax;
        assert_eq!(
            f,
            features::EXIT_HYPERCALL | features::PARA_REGION | features::DOORBELLS
        );
        assert_eq!(
            v.iter()
                .filter(|e| e.function == discovery::LEAF_PARA_REGION)
                .count(),
            1
        );
        let r = find(&v, discovery::LEAF_PARA_REGION, 0);
        assert_eq!(
            discovery::para_region_from_registers(r.eax, r.ebx, r.ecx, r.edx),
            Some((0xA000_0000, 0x7000, para_abi::region::VERSION))
        );
        const { assert!(discovery::LEAF_PARA_REGION <= discovery::MAX_LEAF) };
    }

    #[test]
    fn offers_add_feature_bits_and_leaves() {
        let p = CpuidParams {
            offers: vec![Offer {
                feature: features::SHADOW_FLAGS,
                leaf: discovery::LEAF_CTRL,
                regs: [0xA801_0000, 0, 0x1000, 1],
            }],
            ..P
        };
        let v = filter(&kvm_like(), 0, &p);
        assert_eq!(
            find(&v, discovery::LEAF_FEATURES, 0).eax,
            features::EXIT_HYPERCALL | features::SHADOW_FLAGS
        );
        let l = find(&v, discovery::LEAF_CTRL, 0);
        assert_eq!((l.eax, l.ecx, l.edx), (0xA801_0000, 0x1000, 1));
    }

    #[test]
    fn no_tsc_deadline_when_kvm_lacks_it() {
        let mut src = kvm_like();
        src[1].ecx |= LEAF1_ECX_TSC_DEADLINE;
        let v = filter(
            &src,
            0,
            &CpuidParams {
                tsc_deadline: false,
                ..P
            },
        );
        assert_eq!(find(&v, 1, 0).ecx & LEAF1_ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn id_bits_cover_counts() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
    }
}
