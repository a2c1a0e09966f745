//! M4's control blocks: the mask and shadow pages of every vCPU, and what the
//! shim does with them at an exit (contract in `para_abi::ctrl`).
//!
//! The shim owns every vCPU's masks. It maps the mask page read-only
//! (`KVM_MEM_READONLY`, KVM api.rst §4.35: a guest store is an MMIO exit, refused
//! and counted here) and the shadow page writable. At each exit of a vCPU
//! (`GuestCtrl::at_exit`) it reads that vCPU's shadow word, applies changed hardware flags
//! to CR0 (`KVM_GET/SET_SREGS`) and records the virtual ones; then it publishes
//! mask changes that were asked for. Mask changes happen only there, on the
//! vCPU's own thread while the vCPU is out of the guest, after the shadow was
//! consumed: that ordering is what lets the guest's version re-check lose no write.
//!
//! Virtual flags act on the shim without waiting for an exit: the NIC's worker
//! reads a shadowed quiet flag live from the shadow page before it raises an MSI.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use kvm_bindings::{KVM_MEM_READONLY, kvm_userspace_memory_region};
use kvm_ioctls::{VcpuFd, VmFd};
use para_abi::ctrl::{self, Flag, HARDWARE, KNOWN, MaskError, Masks};
use para_abi::discovery::{self, features};
use para_abi::layout::area;
use tracing::debug;

use super::report::{CtrlReport, WaitReport};
use super::wait::Waits;
use crate::counters::Tally;
use crate::kvm::cpuid::Offer;
use crate::kvm::memory::{SharedMapping, slot};
use crate::reasons;
use crate::sync::lock;

/// The masks every vCPU starts with. CR0.TS is owned: a lazy-FPU switch needs a
/// TS set to take effect before the next task's first FPU instruction, which a
/// shadow applied at the next exit cannot promise (docs/m4-shadow-flags.md).
/// CR0.MP and the quiet/poll flags are shadowed; trace traps (rare, and the
/// trapping path needs a user).
pub const DEFAULT_MASKS: Masks = Masks {
    owned: Flag::Cr0Ts.bit(),
    shadowed: Flag::Cr0Mp.bit()
        | Flag::Nic0RxQuiet.bit()
        | Flag::Nic0TxQuiet.bit()
        | Flag::PollDoorbells.bit(),
};

#[derive(Debug, thiserror::Error)]
pub enum CtrlError {
    #[error("mapping the control area: {0}")]
    Map(std::io::Error),
    #[error("KVM_SET_USER_MEMORY_REGION slot {slot}: {source}")]
    Slot {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("{0} vCPUs: the control area describes at most {max}", max = ctrl::MAX_VCPUS)]
    TooManyVcpus(u32),
    #[error("KVM lacks KVM_CAP_READONLY_MEM")]
    NoReadonlyMem,
}

reasons! {
    /// Why guest input to M4 was refused (`ctrl.rejected`).
    pub(super) Rejected {
        MaskPageWrite => "mask_page_write",
        BadMasks => "bad_masks",
        UnknownFlag => "unknown_flag",
        BadValue => "bad_value",
        StrayShadowBits => "stray_shadow_bits",
        WaitBadStore => "wait_bad_store",
        WaitBadTimeout => "wait_bad_timeout",
        WaitTxNoNic => "wait_tx_no_nic",
    }
}

/// Three pages of anonymous shared memory behind the area, zero filled.
struct Mapping {
    mem: SharedMapping,
}

const MAP_LEN: usize = ctrl::AREA_BYTES as usize;

impl Mapping {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            mem: SharedMapping::new(MAP_LEN)?,
        })
    }

    fn ptr(&self) -> *mut u8 {
        self.mem.as_ptr()
    }

    /// The u64 at `offset` (8-byte aligned, inside the mapping).
    fn u64_at(&self, offset: u64) -> &AtomicU64 {
        assert!(offset.is_multiple_of(8) && offset + 8 <= ctrl::AREA_BYTES);
        // SAFETY: in bounds and aligned (checked above; mmap is page aligned);
        // the memory lives as long as `self`; AtomicU64 has u64's layout.
        #[allow(clippy::cast_ptr_alignment)]
        unsafe {
            &*self.ptr().add(offset as usize).cast::<AtomicU64>()
        }
    }

    fn u32_at(&self, offset: u64) -> &AtomicU32 {
        assert!(offset.is_multiple_of(4) && offset + 4 <= ctrl::AREA_BYTES);
        // SAFETY: as `u64_at`.
        #[allow(clippy::cast_ptr_alignment)]
        unsafe {
            &*self.ptr().add(offset as usize).cast::<AtomicU32>()
        }
    }
}

/// The shim's view of one vCPU's flags.
#[derive(Default)]
pub(super) struct VcpuCtrl {
    /// Flag values as the shim holds them (bits per [`Flag`]).
    pub(super) values: AtomicU64,
    owned: AtomicU64,
    shadowed: AtomicU64,
    /// The shadow word as last consumed or written by the shim.
    last_shadow: AtomicU64,
    pending: Mutex<Option<Masks>>,
    has_pending: AtomicBool,
    pub(super) hypercall_writes: AtomicU64,
    pub(super) shadow_changes: AtomicU64,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) shadow_changes: AtomicU64,
    pub(super) hypercall_writes: AtomicU64,
    pub(super) hypercall_reads: AtomicU64,
    pub(super) applied_at_exit: AtomicU64,
    pub(super) mask_changes: AtomicU64,
    pub(super) msis_suppressed: AtomicU64,
    pub(super) traced_exits: AtomicU64,
    pub(super) rejected: Tally<Rejected>,
}

/// One guest's control blocks.
pub struct GuestCtrl {
    pub(super) name: String,
    mem: Mapping,
    pub(super) vcpus: Vec<VcpuCtrl>,
    pub(super) counters: Counters,
    /// The exitless wait ([`super::wait`]).
    pub(super) waits: Waits,
    /// The guest's TSC minus the host's (latency breakdown), measured on
    /// vCPU 0's thread before its first entry.
    tsc_offset: OnceLock<Option<i64>>,
    /// Latency-breakdown stamps are taken and handed on (`--latency-stamps`).
    /// Off by default: they carry one guest's timing into another's page.
    pub latency_stamps: AtomicBool,
    /// NIC 0's TX notification, for a wait that carries one
    /// (`ctrl::wait::REQUEST_TX`); unset when the guest has no virtio NIC.
    nic0_tx: OnceLock<TxWork>,
}

/// Runs (or wakes the thread that runs) a NIC's TX queue work.
pub type TxWork = Arc<dyn Fn() + Send + Sync>;

impl GuestCtrl {
    /// Control blocks for `vcpus` vCPUs with [`DEFAULT_MASKS`].
    pub fn new(name: &str, vcpus: u32) -> Result<Self, CtrlError> {
        if vcpus > ctrl::MAX_VCPUS {
            return Err(CtrlError::TooManyVcpus(vcpus));
        }
        let c = Self {
            name: name.to_owned(),
            mem: Mapping::new().map_err(CtrlError::Map)?,
            vcpus: (0..vcpus).map(|_| VcpuCtrl::default()).collect(),
            counters: Counters::default(),
            waits: Waits::default(),
            tsc_offset: OnceLock::new(),
            latency_stamps: AtomicBool::new(false),
            nic0_tx: OnceLock::new(),
        };
        for i in 0..vcpus {
            c.publish(i, DEFAULT_MASKS);
        }
        Ok(c)
    }

    /// Maps the area into `vm`: the mask and wait pages read-only, the shadow
    /// page writable.
    pub fn register(&self, vm: &VmFd) -> Result<(), CtrlError> {
        for (slot, offset, flags) in [
            (slot::CTRL_FIRST, ctrl::MASK_PAGE, KVM_MEM_READONLY),
            (slot::CTRL_FIRST + 1, ctrl::SHADOW_PAGE, 0),
            (slot::CTRL_FIRST + 2, ctrl::WAIT_PAGE, KVM_MEM_READONLY),
        ] {
            let desc = kvm_userspace_memory_region {
                slot,
                flags,
                guest_phys_addr: area::CTRL + offset,
                memory_size: ctrl::PAGE,
                userspace_addr: self.mem.ptr() as u64 + offset,
            };
            // SAFETY: the host page lies in `self.mem`, which the guest keeps alive
            // (Arc in `Guest` and `GuestCtx`) for as long as the VM fd.
            unsafe { vm.set_user_memory_region(desc) }
                .map_err(|source| CtrlError::Slot { slot, source })?;
        }
        Ok(())
    }

    /// The CPUID offer that tells the guest where the area is.
    #[must_use]
    pub fn cpuid_offer() -> Offer {
        Offer {
            feature: features::SHADOW_FLAGS,
            leaf: discovery::LEAF_CTRL,
            regs: discovery::area_registers(area::CTRL, ctrl::AREA_BYTES as u32, ctrl::VERSION),
        }
    }

    fn mask_off(vcpu: u32, field: u64) -> u64 {
        ctrl::mask_record(0, vcpu) + field
    }

    fn shadow_word(&self, vcpu: u32) -> &AtomicU64 {
        self.mem
            .u64_at(ctrl::shadow_record(0, vcpu) + ctrl::shadow::VALUES)
    }

    pub(super) fn reject(&self, r: Rejected, what: std::fmt::Arguments<'_>) {
        self.counters.rejected.reject(r, &self.name, "ctrl", what);
    }

    /// Writes masks under the seqlock (odd version while writing). Only on the
    /// vCPU's own thread while it is out of the guest, or before the guest runs.
    fn publish(&self, vcpu: u32, m: Masks) {
        let Some(v) = self.vcpus.get(vcpu as usize) else {
            return;
        };
        let ver = self.mem.u32_at(Self::mask_off(vcpu, ctrl::mask::VERSION));
        ver.fetch_add(1, Ordering::AcqRel);
        self.mem
            .u64_at(Self::mask_off(vcpu, ctrl::mask::OWNED))
            .store(m.owned, Ordering::Release);
        self.mem
            .u64_at(Self::mask_off(vcpu, ctrl::mask::SHADOWED))
            .store(m.shadowed, Ordering::Release);
        ver.fetch_add(1, Ordering::Release);
        v.owned.store(m.owned, Ordering::Release);
        v.shadowed.store(m.shadowed, Ordering::Release);
    }

    /// Asks for new masks on `vcpu`, published at its next exit.
    pub fn request_masks(&self, vcpu: u32, m: Masks) -> Result<(), MaskError> {
        let m = m.validate()?;
        let Some(v) = self.vcpus.get(vcpu as usize) else {
            return Ok(());
        };
        *lock(&v.pending) = Some(m);
        v.has_pending.store(true, Ordering::Release);
        Ok(())
    }

    /// Reads `vcpu`'s shadow word and takes over what changed in shadowed flags.
    /// Returns the hardware bits that changed (to apply to CR0).
    pub(super) fn consume_shadow(&self, vcpu: u32) -> u64 {
        let Some(v) = self.vcpus.get(vcpu as usize) else {
            return 0;
        };
        let word = self.shadow_word(vcpu);
        let w = word.load(Ordering::Acquire);
        let last = v.last_shadow.load(Ordering::Relaxed);
        let changed = w ^ last;
        if changed == 0 {
            return 0;
        }
        let sh = v.shadowed.load(Ordering::Relaxed);
        let stray = changed & !sh;
        let mut now = w;
        if stray != 0 {
            // Bits the guest may not write there (unknown, or not shadowed now):
            // ignored, counted, and put back so the word keeps mirroring the shim.
            self.reject(
                Rejected::StrayShadowBits,
                format_args!("vCPU {vcpu} shadow bits {stray:#x}"),
            );
            now = (w & !stray) | (last & stray);
            // Only this vCPU writes its word legitimately, and it is out of the guest.
            let _ = word.compare_exchange(w, now, Ordering::AcqRel, Ordering::Relaxed);
        }
        v.last_shadow.store(now, Ordering::Relaxed);
        let take = changed & sh & KNOWN;
        if take == 0 {
            return 0;
        }
        let vals = v.values.load(Ordering::Relaxed);
        v.values
            .store((vals & !take) | (now & take), Ordering::Release);
        let n = u64::from(take.count_ones());
        v.shadow_changes.fetch_add(n, Ordering::Relaxed);
        self.counters.shadow_changes.fetch_add(n, Ordering::Relaxed);
        take & HARDWARE
    }

    /// Writes the hardware flags in `bits` (values from the shim's view) into CR0.
    pub(super) fn apply_cr0(&self, cpu: &dyn Cr0, vcpu: u32, bits: u64) {
        if bits == 0 {
            return;
        }
        let vals = self
            .vcpus
            .get(vcpu as usize)
            .map_or(0, |v| v.values.load(Ordering::Relaxed));
        let Some(mut cr0) = cpu.cr0() else {
            crate::guest_log!(warn, guest = %self.name, vcpu, "ctrl: cannot read CR0");
            return;
        };
        for f in [Flag::Cr0Mp, Flag::Cr0Ts] {
            if bits & f.bit() != 0
                && let Some(b) = f.cr0_bit()
            {
                cr0 = if vals & f.bit() != 0 {
                    cr0 | b
                } else {
                    cr0 & !b
                };
            }
        }
        if cpu.set_cr0(cr0) {
            self.counters
                .applied_at_exit
                .fetch_add(u64::from(bits.count_ones()), Ordering::Relaxed);
        } else {
            crate::guest_log!(warn, guest = %self.name, vcpu, "ctrl: cannot write CR0");
        }
    }

    /// The real CR0 bits of the hardware flags, as flag bits.
    pub(super) fn cr0_flags(cpu: &dyn Cr0) -> Option<u64> {
        let cr0 = cpu.cr0()?;
        Some(
            [Flag::Cr0Mp, Flag::Cr0Ts]
                .iter()
                .filter(|f| f.cr0_bit().is_some_and(|b| cr0 & b != 0))
                .fold(0, |a, f| a | f.bit()),
        )
    }

    /// Publishes a pending mask change. Flags that become shadowed get their
    /// current value in the shadow word first, so guest reads stay right.
    fn publish_pending(&self, cpu: &dyn Cr0, vcpu: u32) {
        let Some(v) = self.vcpus.get(vcpu as usize) else {
            return;
        };
        if !v.has_pending.swap(false, Ordering::AcqRel) {
            return;
        }
        let Some(m) = lock(&v.pending).take() else {
            return;
        };
        let mut vals = v.values.load(Ordering::Relaxed);
        if let Some(hw) = Self::cr0_flags(cpu) {
            // Owned hardware flags change behind the shim's back: refresh them.
            vals = (vals & !HARDWARE) | hw;
            v.values.store(vals, Ordering::Release);
        }
        let word = self.shadow_word(vcpu);
        word.store(vals, Ordering::Release);
        v.last_shadow.store(vals, Ordering::Relaxed);
        self.publish(vcpu, m);
        self.counters.mask_changes.fetch_add(1, Ordering::Relaxed);
        debug!(guest = %self.name, vcpu, owned = m.owned, shadowed = m.shadowed, "ctrl: masks changed");
    }

    /// Sets `flag` to `value` on the trapping path.
    pub(super) fn trap_write(&self, cpu: &dyn Cr0, vcpu: u32, flag: Flag, value: bool) {
        let Some(v) = self.vcpus.get(vcpu as usize) else {
            return;
        };
        let vals = ctrl::with_flag(v.values.load(Ordering::Relaxed), flag, value);
        v.values.store(vals, Ordering::Release);
        // Mirror into the shadow word so a later shadowed read (after a mask
        // change) and the stray check agree with the shim.
        let word = self.shadow_word(vcpu);
        let w = ctrl::with_flag(word.load(Ordering::Acquire), flag, value);
        word.store(w, Ordering::Release);
        v.last_shadow.store(w, Ordering::Relaxed);
        if flag.is_hardware() {
            self.apply_cr0(cpu, vcpu, flag.bit());
        }
        v.hypercall_writes.fetch_add(1, Ordering::Relaxed);
        self.counters
            .hypercall_writes
            .fetch_add(1, Ordering::Relaxed);
    }

    /// True when any vCPU has `flag` set, read live from the shadow where the
    /// flag is shadowed (no exit needed for it to act).
    #[must_use]
    pub fn flag_set_anywhere(&self, flag: Flag) -> bool {
        self.vcpus.iter().enumerate().any(|(i, v)| {
            let src = if v.shadowed.load(Ordering::Acquire) & flag.bit() != 0 {
                self.shadow_word(i as u32).load(Ordering::Acquire)
            } else {
                v.values.load(Ordering::Acquire)
            };
            src & flag.bit() != 0
        })
    }

    /// Called by NIC 0 before it raises the MSI of queue `q` (0 RX, 1 TX): true
    /// means withhold it (counted).
    #[must_use]
    pub fn nic0_quiet(&self, q: usize) -> bool {
        let f = if q == 0 {
            Flag::Nic0RxQuiet
        } else {
            Flag::Nic0TxQuiet
        };
        let quiet = self.flag_set_anywhere(f);
        if quiet {
            self.counters
                .msis_suppressed
                .fetch_add(1, Ordering::Relaxed);
        }
        quiet
    }

    /// The counters for the stats JSON.
    #[must_use]
    pub fn report(&self) -> CtrlReport {
        let c = &self.counters;
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CtrlReport {
            offered: true,
            shadow_changes: ld(&c.shadow_changes),
            hypercall_writes: ld(&c.hypercall_writes),
            hypercall_reads: ld(&c.hypercall_reads),
            owned_writes_reported: (0..self.vcpus.len() as u32)
                .map(|i| {
                    ld(self
                        .mem
                        .u64_at(ctrl::shadow_record(0, i) + ctrl::shadow::OWNED_WRITES))
                })
                .fold(0u64, u64::saturating_add),
            applied_at_exit: ld(&c.applied_at_exit),
            mask_changes: ld(&c.mask_changes),
            msis_suppressed: ld(&c.msis_suppressed),
            traced_exits: ld(&c.traced_exits),
            rejected: c.rejected.snapshot(),
            wait: {
                let w = &self.waits.counters;
                WaitReport {
                    waits: ld(&w.waits),
                    ready: ld(&w.ready),
                    woken: ld(&w.woken),
                    timeouts: ld(&w.timeouts),
                    held_us: ld(&w.held_ns) / 1000,
                    rx_batches: ld(&w.rx_batches),
                    tx_carried: ld(&w.tx_carried),
                }
            },
        }
    }

    /// The wait page's u64 at `offset`.
    pub(super) fn wait_word(&self, offset: u64) -> &AtomicU64 {
        self.mem.u64_at(ctrl::WAIT_PAGE + offset)
    }

    /// NIC 0 put frames into its RX used ring: hands the guest the frame's
    /// breakdown stamps, then wakes a vCPU held in a wait.
    pub fn nic0_rx_work(&self) {
        if let Some(&Some(off)) = self.tsc_offset.get()
            && self.latency_stamps.load(Ordering::Relaxed)
        {
            let stamps = crate::breakdown::rx_pushed(|h| h.wrapping_add_signed(off));
            for (s, v) in ctrl::wait::Stamp::ALL.iter().zip(stamps) {
                self.wait_word(s.offset()).store(v, Ordering::Relaxed);
            }
        }
        self.waits.rx_work(self.wait_word(ctrl::wait::RX_SEQ));
    }

    /// What a wait carrying a TX notification runs (set once, when NIC 0 is
    /// attached).
    pub fn set_nic0_tx(&self, work: TxWork) {
        let _ = self.nic0_tx.set(work);
    }

    /// A wait request carried NIC 0's TX notification: the queue's work runs
    /// now, on the waiting vCPU's thread, before the vCPU is held. A guest
    /// without a virtio NIC is refused and counted (the wait still happens).
    pub(super) fn nic0_tx_at_wait(&self) {
        let Some(work) = self.nic0_tx.get() else {
            self.reject(
                Rejected::WaitTxNoNic,
                format_args!("a wait carried a TX notification, but the guest has no NIC"),
            );
            return;
        };
        crate::breakdown::NOTIFY_SEEN.store(crate::breakdown::now(), Ordering::Relaxed);
        self.waits
            .counters
            .tx_carried
            .fetch_add(1, Ordering::Relaxed);
        work();
    }

    /// NIC 0 took a frame off its TX ring: records the sender's own stamps
    /// (the vCPU that notified last), on the host's TSC, for the breakdown.
    /// The guest wrote them: numbers for a report, never acted on.
    pub fn nic0_tx_popped(&self) {
        let Some(&Some(off)) = self.tsc_offset.get() else {
            crate::breakdown::tx_popped([0, 0]);
            return;
        };
        let (mut app, mut notify) = (0u64, 0u64);
        for i in 0..self.vcpus.len() as u32 {
            let rec = ctrl::shadow_record(0, i);
            let n = self
                .mem
                .u64_at(rec + ctrl::shadow::STAMP_NOTIFY)
                .load(Ordering::Relaxed);
            if n > notify {
                notify = n;
                app = self
                    .mem
                    .u64_at(rec + ctrl::shadow::STAMP_APP_TX)
                    .load(Ordering::Relaxed);
            }
        }
        let host = |g: u64| {
            if g == 0 {
                0
            } else {
                g.wrapping_add_signed(-off)
            }
        };
        crate::breakdown::tx_popped([host(app), host(notify)]);
    }

    /// Measures the guest's TSC offset once, on a vCPU thread before it runs:
    /// `IA32_TSC` (MSR 0x10, SDM vol 4 table 2-2) read through `KVM_GET_MSRS`
    /// between two host TSC reads.
    pub(super) fn measure_tsc_offset(&self, fd: &VcpuFd) {
        if self.tsc_offset.get().is_some() || !self.latency_stamps.load(Ordering::Relaxed) {
            return;
        }
        // Tried once: a KVM that refuses leaves the breakdown without stamps.
        let _ = self.tsc_offset.set(Self::read_tsc_offset(fd));
    }

    fn read_tsc_offset(fd: &VcpuFd) -> Option<i64> {
        let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: 0x10,
            ..Default::default()
        }])
        .ok()?;
        let t0 = crate::breakdown::now();
        let got = fd.get_msrs(&mut msrs).ok()?;
        let t1 = crate::breakdown::now();
        let guest = msrs.as_slice().first().filter(|_| got == 1)?.data;
        let host = t0 / 2 + t1 / 2;
        #[allow(clippy::cast_possible_wrap)]
        Some(guest.wrapping_sub(host) as i64)
    }

    /// An exiting store into the wait page: a valid request is left for this
    /// thread's exit hook; anything else is refused and counted (the vCPU
    /// resumes at once).
    pub(super) fn wait_store(&self, offset: u64, data: &[u8]) {
        match ctrl::wait::decode_request(offset, data) {
            Ok(r) => super::wait::post(r),
            Err(e) => {
                let reason = match e {
                    ctrl::wait::WaitError::BadStore => Rejected::WaitBadStore,
                    ctrl::wait::WaitError::BadTimeout => Rejected::WaitBadTimeout,
                };
                self.reject(
                    reason,
                    format_args!("wait page store of {data:x?} at offset {offset:#x}"),
                );
            }
        }
    }
}

impl GuestCtrl {
    /// The per-exit work: take the shadow, then publish a pending mask change.
    pub(super) fn at_exit(&self, cpu: &dyn Cr0, vcpu: u32) {
        let hw = self.consume_shadow(vcpu);
        self.apply_cr0(cpu, vcpu, hw);
        self.publish_pending(cpu, vcpu);
    }
}

/// Entry points for the fuzz targets (feature `fuzzing`): the guest's side of
/// the shadow page, and what a vCPU thread does with it, without KVM.
#[cfg(feature = "fuzzing")]
impl GuestCtrl {
    /// Stores `value` at the 8-byte-aligned `offset` of the shadow page, as a
    /// guest may at any time (offsets outside the page are ignored).
    pub fn fuzz_guest_store(&self, offset: u64, value: u64) {
        let offset = offset & !7;
        if offset + 8 <= ctrl::PAGE {
            self.mem
                .u64_at(ctrl::SHADOW_PAGE + offset)
                .store(value, Ordering::Release);
        }
    }

    /// The work of one exit of `vcpu`, against `cpu`'s CR0.
    pub fn fuzz_exit(&self, cpu: &dyn Cr0, vcpu: u32) {
        self.at_exit(cpu, vcpu);
    }
}

/// A vCPU's CR0 as the shim reaches it (`KVM_GET/SET_SREGS`; a fake in tests).
pub trait Cr0 {
    fn cr0(&self) -> Option<u64>;
    /// True when written.
    fn set_cr0(&self, cr0: u64) -> bool;
}

impl Cr0 for VcpuFd {
    fn cr0(&self) -> Option<u64> {
        self.get_sregs().ok().map(|s| s.cr0)
    }

    fn set_cr0(&self, cr0: u64) -> bool {
        // KVM api.rst §4.14: the whole special-register set is written back.
        let Ok(mut s) = self.get_sregs() else {
            return false;
        };
        s.cr0 = cr0;
        self.set_sregs(&s).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_carrying_tx_runs_the_nics_tx_work_once_and_counts_it() {
        let c = GuestCtrl::new("t", 1).unwrap();
        // No NIC yet: refused and counted, nothing runs.
        c.wait_store(
            ctrl::wait::REQUEST_TX,
            &ctrl::wait::encode_request(0, Some(0)).to_le_bytes(),
        );
        let r = super::super::wait::take().expect("a valid request is posted");
        assert!(r.tx);
        c.nic0_tx_at_wait();
        assert_eq!(c.counters.rejected.snapshot()["wait_tx_no_nic"], 1);
        let ran = Arc::new(AtomicU64::new(0));
        let r2 = ran.clone();
        c.set_nic0_tx(Arc::new(move || {
            r2.fetch_add(1, Ordering::Relaxed);
        }));
        c.nic0_tx_at_wait();
        assert_eq!(ran.load(Ordering::Relaxed), 1);
        assert_eq!(c.waits.counters.tx_carried.load(Ordering::Relaxed), 1);
        // A plain request carries nothing.
        c.wait_store(
            ctrl::wait::REQUEST,
            &ctrl::wait::encode_request(0, Some(0)).to_le_bytes(),
        );
        assert!(!super::super::wait::take().unwrap().tx);
    }

    #[test]
    fn defaults_are_valid_and_ts_is_not_shadowed() {
        assert_eq!(DEFAULT_MASKS.validate(), Ok(DEFAULT_MASKS));
        assert_eq!(
            ctrl::write_rule(DEFAULT_MASKS.owned, DEFAULT_MASKS.shadowed, Flag::Cr0Ts),
            ctrl::Rule::Owned
        );
    }

    #[test]
    fn published_masks_read_back_through_the_seqlock() {
        let c = GuestCtrl::new("t", 2).unwrap();
        let m = Masks {
            owned: 0,
            shadowed: Flag::Trace.bit(),
        };
        c.publish(1, m);
        let read = |off| {
            c.mem
                .u64_at(ctrl::mask_record(0, 1) + off)
                .load(Ordering::Relaxed)
        };
        let (ver, got) = ctrl::read_masks(read, 3).unwrap();
        assert_eq!(got, m);
        assert_eq!(ver, 4, "two publishes, two bumps each");
        let (_, v0) = ctrl::read_masks(
            |off| {
                c.mem
                    .u64_at(ctrl::mask_record(0, 0) + off)
                    .load(Ordering::Relaxed)
            },
            3,
        )
        .unwrap();
        assert_eq!(v0, DEFAULT_MASKS);
    }

    #[test]
    fn shadowed_changes_are_taken_and_stray_bits_refused() {
        let c = GuestCtrl::new("t", 1).unwrap();
        let w = c.shadow_word(0);
        w.store(
            Flag::Cr0Mp.bit() | Flag::Nic0RxQuiet.bit(),
            Ordering::Relaxed,
        );
        assert_eq!(
            c.consume_shadow(0),
            Flag::Cr0Mp.bit(),
            "MP changed: apply to CR0"
        );
        assert_eq!(c.vcpus[0].values.load(Ordering::Relaxed), 0b101);
        assert_eq!(c.vcpus[0].shadow_changes.load(Ordering::Relaxed), 2);
        // Trace is not shadowed, bit 40 names nothing: both refused and put back.
        w.fetch_or(Flag::Trace.bit() | 1 << 40, Ordering::Relaxed);
        assert_eq!(c.consume_shadow(0), 0);
        assert_eq!(w.load(Ordering::Relaxed), 0b101);
        assert_eq!(c.report().rejected.get("stray_shadow_bits"), Some(&1));
        // Nothing changed: nothing counted.
        assert_eq!(c.consume_shadow(0), 0);
        assert_eq!(c.report().shadow_changes, 2);
    }

    #[test]
    fn quiet_flags_act_live_from_the_shadow() {
        let c = GuestCtrl::new("t", 2).unwrap();
        assert!(!c.nic0_quiet(0));
        c.shadow_word(1)
            .store(Flag::Nic0RxQuiet.bit(), Ordering::Relaxed);
        assert!(c.nic0_quiet(0), "no exit needed");
        assert!(!c.nic0_quiet(1));
        assert_eq!(c.report().msis_suppressed, 1);
        c.shadow_word(1).store(0, Ordering::Relaxed);
        assert!(!c.nic0_quiet(0));
    }

    #[test]
    fn bad_mask_requests_are_refused() {
        let c = GuestCtrl::new("t", 1).unwrap();
        assert_eq!(
            c.request_masks(
                0,
                Masks {
                    owned: Flag::Trace.bit(),
                    shadowed: 0
                }
            ),
            Err(MaskError::OwnedVirtual)
        );
        assert!(!c.vcpus[0].has_pending.load(Ordering::Relaxed));
        assert!(GuestCtrl::new("t", ctrl::MAX_VCPUS + 1).is_err());
    }

    /// A vCPU's CR0 for the model: what `mov cr0` and `KVM_SET_SREGS` change.
    struct FakeCpu(std::cell::Cell<u64>);

    impl Cr0 for FakeCpu {
        fn cr0(&self) -> Option<u64> {
            Some(self.0.get())
        }
        fn set_cr0(&self, cr0: u64) -> bool {
            self.0.set(cr0);
            true
        }
    }

    /// The guest's write protocol (`para_abi::ctrl::write`, the very code the
    /// guest runs) against the real `GuestCtrl`, with vCPU exits — where the
    /// shim takes the shadow and publishes mask changes — injected before any
    /// step the schedule names.
    struct Model<'a> {
        ctrl: &'a GuestCtrl,
        cpu: &'a FakeCpu,
        schedule: &'a [bool],
        step: usize,
        changes: Vec<Masks>,
    }

    impl Model<'_> {
        fn maybe_exit(&mut self) {
            let exit = self.schedule.get(self.step).copied().unwrap_or(false);
            self.step += 1;
            if exit {
                if let Some(m) = self.changes.pop() {
                    self.ctrl.request_masks(0, m).unwrap();
                }
                self.ctrl.at_exit(self.cpu, 0);
            }
        }
    }

    impl ctrl::Port for Model<'_> {
        type Error = ();
        fn mask_load(&mut self, offset: u64) -> u64 {
            self.maybe_exit();
            self.ctrl
                .mem
                .u64_at(ctrl::mask_record(0, 0) + offset)
                .load(Ordering::Acquire)
        }
        fn shadow_set(&mut self, flag: Flag, value: bool) {
            self.maybe_exit();
            let w = self.ctrl.shadow_word(0);
            if value {
                w.fetch_or(flag.bit(), Ordering::Release);
            } else {
                w.fetch_and(!flag.bit(), Ordering::Release);
            }
        }
        fn owned_write(&mut self, flag: Flag, value: bool) -> Result<(), ()> {
            self.maybe_exit();
            let b = flag.cr0_bit().ok_or(())?;
            let c = self.cpu.0.get();
            self.cpu.0.set(if value { c | b } else { c & !b });
            Ok(())
        }
        fn trap_write(&mut self, flag: Flag, value: bool) -> Result<(), ()> {
            self.maybe_exit();
            // The hypercall exit: shadow first, then the write, then the hook.
            let hw = self.ctrl.consume_shadow(0);
            self.ctrl.apply_cr0(self.cpu, 0, hw);
            self.ctrl.trap_write(self.cpu, 0, flag, value);
            self.ctrl.at_exit(self.cpu, 0);
            Ok(())
        }
    }

    /// What the guest would read for `f` now (`rt::ctrl::read_flag`'s rule).
    fn guest_reads(c: &GuestCtrl, cpu: &FakeCpu, f: Flag) -> bool {
        let sh = c.vcpus[0].shadowed.load(Ordering::Relaxed);
        if sh & f.bit() != 0 {
            c.shadow_word(0).load(Ordering::Relaxed) & f.bit() != 0
        } else if let Some(b) = f.cr0_bit() {
            cpu.0.get() & b != 0
        } else {
            c.vcpus[0].values.load(Ordering::Relaxed) & f.bit() != 0
        }
    }

    /// What is in effect for `f` after an exit: CR0 for hardware flags, the
    /// shim's value for virtual ones.
    fn in_effect(c: &GuestCtrl, cpu: &FakeCpu, f: Flag) -> bool {
        match f.cr0_bit() {
            Some(b) => cpu.0.get() & b != 0,
            None => c.vcpus[0].values.load(Ordering::Relaxed) & f.bit() != 0,
        }
    }

    fn masks_strategy() -> impl proptest::strategy::Strategy<Value = Masks> {
        use proptest::prelude::*;
        (0u64..4, 0u64..64).prop_map(|(owned, shadowed)| Masks {
            owned,
            shadowed: shadowed & !owned,
        })
    }

    proptest::proptest! {
        #[test]
        fn no_write_is_lost_whatever_the_exits_and_mask_changes(
            writes in proptest::collection::vec((0u64..6, proptest::bool::ANY), 1..40),
            schedule in proptest::collection::vec(proptest::bool::ANY, 0..400),
            changes in proptest::collection::vec(masks_strategy(), 0..20),
        ) {
            let c = GuestCtrl::new("model", 1).unwrap();
            let cpu = FakeCpu(std::cell::Cell::new(0x8000_0011));
            let mut m = Model { ctrl: &c, cpu: &cpu, schedule: &schedule, step: 0, changes };
            let mut last = [None; 6];
            for &(id, v) in &writes {
                let f = Flag::from_id(id).unwrap();
                let rule = ctrl::write(&mut m, f, v).unwrap();
                last[id as usize] = Some(v);
                // Right after a write, the guest reads back what it wrote.
                proptest::prop_assert_eq!(guest_reads(&c, &cpu, f), v, "{:?} by {:?}", f, rule);
            }
            c.at_exit(&cpu, 0);
            for (id, v) in last.iter().enumerate() {
                let Some(v) = *v else { continue };
                let f = Flag::from_id(id as u64).unwrap();
                proptest::prop_assert_eq!(in_effect(&c, &cpu, f), v, "{:?} after the next exit", f);
                proptest::prop_assert_eq!(guest_reads(&c, &cpu, f), v);
            }
            proptest::prop_assert_eq!(cpu.0.get() & !(CR0_BITS), 0x8000_0011 & !CR0_BITS, "no other CR0 bit");
        }
    }

    const CR0_BITS: u64 = ctrl::CR0_MP | ctrl::CR0_TS;
}
