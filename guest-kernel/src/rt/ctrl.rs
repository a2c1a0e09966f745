//! M4 shadowed control flags, guest half (`para_abi::ctrl`).
//!
//! [`write_flag`] follows the masks the shim publishes for this vCPU: an owned
//! flag goes to the real register (CR0 through a kernel call), a shadowed one is
//! stored into the shadow word (a locked `or`/`and` in ring 3: no exit, no ring
//! change), any other asks the shim (`CtrlWrite`, one exit). [`read_flag`] reads
//! a shadowed flag from the shadow, a hardware one from CR0, a virtual one from
//! the shim.
//!
//! Without the shim's offer (QEMU) the hardware flags still work through the
//! kernel call and the virtual ones are [`CtrlError::Unavailable`].
//!
//! A shadowed hardware flag takes effect at the vCPU's next exit, not at once:
//! shadow only flags whose late effect is harmless (CR0.MP here); CR0.TS for a
//! lazy FPU switch must be owned (docs/m4-shadow-flags.md).

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use para_abi::ctrl::{self, Flag, Masks, Rule};
use para_abi::discovery::{self, features};
use para_abi::hypercall::{Call, Status};

use super::sys;
use crate::abi::SysError;
use crate::arch::BOOT;
use crate::percpu;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtrlError {
    /// The shim does not offer shadowed flags (QEMU), and the flag is virtual.
    Unavailable,
    /// A kernel call or hypercall failed.
    Sys(SysError),
    /// The shim refused the request (its status in RAX).
    Refused(u64),
}

impl core::fmt::Display for CtrlError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Unavailable => write!(f, "shadowed control flags are not offered here"),
            Self::Sys(e) => write!(f, "kernel call failed: {e:?}"),
            Self::Refused(s) => write!(f, "the shim refused: {s:#x}"),
        }
    }
}

/// Writes by the path they took on this guest (all vCPUs), for reports.
pub static OWNED_WRITES: AtomicU64 = AtomicU64::new(0);
pub static SHADOW_WRITES: AtomicU64 = AtomicU64::new(0);
pub static TRAP_WRITES: AtomicU64 = AtomicU64::new(0);
/// Writes redone because the masks changed under them.
pub static RETRIES: AtomicU64 = AtomicU64::new(0);

/// [`area`]'s answer once known: 0 unknown, 1 none, else the base.
static AREA: AtomicU64 = AtomicU64::new(0);

/// The control area's base, when the shim offers it. Discovered once: CPUID
/// exits, and writes must not.
#[must_use]
pub fn area() -> Option<u64> {
    match AREA.load(Ordering::Relaxed) {
        0 => {
            let a = discover();
            AREA.store(a.unwrap_or(1), Ordering::Relaxed);
            a
        }
        1 => None,
        base => Some(base),
    }
}

fn discover() -> Option<u64> {
    if BOOT.under_shim.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let feat = crate::arch::cpu::cpuid(discovery::LEAF_FEATURES, 0).eax;
    if feat & features::SHADOW_FLAGS == 0 {
        return None;
    }
    let r = crate::arch::cpu::cpuid(discovery::LEAF_CTRL, 0);
    let (gpa, size, ver) = discovery::area_from_registers([r.eax, r.ebx, r.ecx, r.edx])?;
    (ver == ctrl::VERSION && u64::from(size) >= ctrl::AREA_BYTES).then_some(gpa)
}

/// True when the shim offers shadowed flags.
#[must_use]
pub fn available() -> bool {
    area().is_some()
}

fn vcpu() -> u32 {
    percpu::current().apic_id.load(Ordering::Relaxed)
}

fn u64_at(gpa: u64) -> &'static AtomicU64 {
    // SAFETY: `gpa` lies in the control area the shim mapped (cacheable,
    // user-accessible, identity-mapped at boot), 8-byte aligned by the layout.
    unsafe { &*(gpa as *const AtomicU64) }
}

fn masks(base: u64, cpu: u32) -> Option<(u32, Masks)> {
    use ctrl::Port;
    let mut b = Block { base, cpu };
    ctrl::read_masks(|off| b.mask_load(off), ctrl::MASK_TRIES)
}

fn shadow(base: u64, cpu: u32) -> &'static AtomicU64 {
    u64_at(ctrl::shadow_record(base, cpu) + ctrl::shadow::VALUES)
}

/// Kernel call: CR0.
pub fn cr0() -> Result<u64, CtrlError> {
    sys::cr0_read().map_err(CtrlError::Sys)
}

fn cr0_write(flag: Flag, value: bool) -> Result<(), CtrlError> {
    let Some(bit) = flag.cr0_bit() else {
        return Err(CtrlError::Unavailable);
    };
    sys::cr0_write(bit, if value { bit } else { 0 })
        .map(|_| ())
        .map_err(CtrlError::Sys)
}

/// A hypercall through the kernel, its RAX read raw: the shim's statuses share
/// values with kernel-call errors (`UnknownCall` = `NoSys`, `BadArgument` = `Fault`).
fn hypercall(call: Call, arg: u64) -> Result<u64, CtrlError> {
    let r = sys::raw_call(crate::abi::Sys::Hypercall as u64, call as u64, arg);
    if r == Status::BadArgument as u64 || r == Status::UnknownCall as u64 {
        return Err(CtrlError::Refused(r));
    }
    SysError::from_result(r).map_or(Ok(r), |e| Err(CtrlError::Sys(e)))
}

/// Sets `flag` to `value`; returns the path the write took.
pub fn write_flag(flag: Flag, value: bool) -> Result<Rule, CtrlError> {
    let Some(base) = area() else {
        cr0_write(flag, value)?;
        OWNED_WRITES.fetch_add(1, Ordering::Relaxed);
        return Ok(Rule::Owned);
    };
    write_with(base, vcpu(), flag, value)
}

/// This vCPU's control block as [`ctrl::write`] reaches it.
struct Block {
    base: u64,
    cpu: u32,
}

impl ctrl::Port for Block {
    type Error = CtrlError;

    fn mask_load(&mut self, offset: u64) -> u64 {
        let rec = ctrl::mask_record(self.base, self.cpu);
        if offset == ctrl::mask::VERSION {
            // SAFETY: as `u64_at`; the version is a u32 at the record's start.
            u64::from(unsafe { &*(rec as *const AtomicU32) }.load(Ordering::Acquire))
        } else {
            u64_at(rec + offset).load(Ordering::Acquire)
        }
    }

    fn shadow_set(&mut self, flag: Flag, value: bool) {
        // Locked RMW: an upcall on this CPU may write another flag meanwhile.
        let w = shadow(self.base, self.cpu);
        if value {
            w.fetch_or(flag.bit(), Ordering::Release);
        } else {
            w.fetch_and(!flag.bit(), Ordering::Release);
        }
        SHADOW_WRITES.fetch_add(1, Ordering::Relaxed);
    }

    fn owned_write(&mut self, flag: Flag, value: bool) -> Result<(), CtrlError> {
        cr0_write(flag, value)?;
        u64_at(ctrl::shadow_record(self.base, self.cpu) + ctrl::shadow::OWNED_WRITES)
            .fetch_add(1, Ordering::Relaxed);
        OWNED_WRITES.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn trap_write(&mut self, flag: Flag, value: bool) -> Result<(), CtrlError> {
        trap(flag, value).map(|_| ())
    }

    fn retried(&mut self) {
        RETRIES.fetch_add(1, Ordering::Relaxed);
    }
}

fn write_with(base: u64, cpu: u32, flag: Flag, value: bool) -> Result<Rule, CtrlError> {
    ctrl::write(&mut Block { base, cpu }, flag, value)
}

fn trap(flag: Flag, value: bool) -> Result<Rule, CtrlError> {
    hypercall(Call::CtrlWrite, ctrl::encode_write(flag, value))?;
    TRAP_WRITES.fetch_add(1, Ordering::Relaxed);
    Ok(Rule::Trap)
}

/// Reads `flag`: shadowed from the shadow, hardware from CR0, others from the shim.
pub fn read_flag(flag: Flag) -> Result<bool, CtrlError> {
    let Some(base) = area() else {
        let bit = flag.cr0_bit().ok_or(CtrlError::Unavailable)?;
        return Ok(cr0()? & bit != 0);
    };
    let cpu = vcpu();
    let m = masks(base, cpu).map(|(_, m)| m).unwrap_or_default();
    if m.shadowed & flag.bit() != 0 {
        return Ok(shadow(base, cpu).load(Ordering::Acquire) & flag.bit() != 0);
    }
    if let Some(bit) = flag.cr0_bit() {
        return Ok(cr0()? & bit != 0);
    }
    Ok(hypercall(Call::CtrlRead, flag as u64)? != 0)
}

/// This vCPU's masks as the shim publishes them.
pub fn current_masks() -> Result<Masks, CtrlError> {
    let base = area().ok_or(CtrlError::Unavailable)?;
    masks(base, vcpu())
        .map(|(_, m)| m)
        .ok_or(CtrlError::Refused(0))
}

/// Asks the shim to change this vCPU's masks (published at this very exit).
pub fn set_masks(m: Masks) -> Result<(), CtrlError> {
    area().ok_or(CtrlError::Unavailable)?;
    hypercall(Call::CtrlSetMasks, m.encode()).map(|_| ())
}

/// A shim counter ([`para_abi::ctrl::query`]).
pub fn query(selector: u64) -> Result<u64, CtrlError> {
    area().ok_or(CtrlError::Unavailable)?;
    hypercall(Call::CtrlQuery, selector)
}

/// This vCPU's shadow word, raw (tests and benchmarks).
#[must_use]
pub fn shadow_word() -> Option<&'static AtomicU64> {
    area().map(|b| shadow(b, vcpu()))
}

/// The mask word of this vCPU, raw: the shim maps it read-only, so a store
/// exits and is refused (tests of that).
#[must_use]
pub fn mask_word_addr() -> Option<u64> {
    area().map(|b| ctrl::mask_record(b, vcpu()) + ctrl::mask::OWNED)
}

/// Exitless waits this guest made (all vCPUs), for reports.
pub static WAITS: AtomicU64 = AtomicU64::new(0);

/// The wait page ([`para_abi::ctrl::wait`]), when the shim offers it.
#[must_use]
pub fn wait_page() -> Option<u64> {
    area().map(|b| b + ctrl::WAIT_PAGE)
}

/// The wait token: the low half of the shim's NIC 0 RX sequence. Read it
/// **before** looking at the RX ring, then pass it to [`wait_exitless`].
#[must_use]
pub fn rx_token() -> Option<u32> {
    #[allow(clippy::cast_possible_truncation)]
    wait_page().map(|p| u64_at(p + ctrl::wait::RX_SEQ).load(Ordering::Acquire) as u32)
}

/// Sleeps with one exit and no ring-0 code until NIC 0's RX ring has work
/// after `token` was read, this vCPU is kicked (an upcall), or `timeout_us`
/// passes (`None`: the shim's bound). With `tx`, the exit is also NIC 0's
/// TX notification: the shim takes the frames queued but not notified before
/// it holds the vCPU. Returns false at once where not offered.
pub fn wait_exitless(token: u32, timeout_us: Option<u32>, tx: bool) -> bool {
    let Some(p) = wait_page() else {
        return false;
    };
    let v = ctrl::wait::encode_request(token, timeout_us);
    WAITS.fetch_add(1, Ordering::Relaxed);
    let word = p + ctrl::wait::request_offset(tx);
    // SAFETY: the request word lies in the wait page the shim mapped
    // (identity-mapped, user-accessible, 8-byte aligned); the page is
    // read-only to the guest, so this one store is the MMIO exit that waits.
    unsafe { core::ptr::write_volatile(word as *mut u64, v) };
    true
}

/// Stores a hostile value into the wait page at `offset` (tests of the
/// shim's validation): one exit, refused and counted by the shim.
#[must_use]
pub fn wait_page_store(offset: u64, value: u64) -> bool {
    let Some(p) = wait_page() else {
        return false;
    };
    // SAFETY: as `wait_exitless`: inside the wait page, aligned.
    unsafe { core::ptr::write_volatile((p + (offset & !7 & (ctrl::PAGE - 1))) as *mut u64, value) };
    true
}

/// Latency breakdown: this vCPU's application hands a frame to its stack now.
pub fn stamp_app_tx(tsc: u64) {
    if let Some(b) = area() {
        u64_at(ctrl::shadow_record(b, vcpu()) + ctrl::shadow::STAMP_APP_TX)
            .store(tsc, Ordering::Relaxed);
    }
}

/// Latency breakdown: this vCPU notifies its TX queue now.
pub fn stamp_notify(tsc: u64) {
    if let Some(b) = area() {
        u64_at(ctrl::shadow_record(b, vcpu()) + ctrl::shadow::STAMP_NOTIFY)
            .store(tsc, Ordering::Relaxed);
    }
}

/// Latency breakdown: the stamps of the last frame the shim put in NIC 0's
/// RX ring, on this guest's TSC ([`para_abi::ctrl::wait::Stamp`] order).
#[must_use]
pub fn rx_stamps() -> Option<[u64; 5]> {
    let p = wait_page()?;
    let mut out = [0u64; 5];
    for (o, s) in out.iter_mut().zip(ctrl::wait::Stamp::ALL) {
        *o = u64_at(p + s.offset()).load(Ordering::Relaxed);
    }
    Some(out)
}
