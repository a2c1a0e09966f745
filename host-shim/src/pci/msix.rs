//! MSI-X (PCI Local Bus 3.0 §6.8.2): the vector table, the pending bit array, and
//! delivery through one irqfd per vector whose GSI routes to the entry's message.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use vmm_sys_util::eventfd::EventFd;

use super::irq::{IrqError, MsiMessage, MsiRouter};
use super::{le_value, put_le};
use crate::counters::Reject;
use crate::sync::lock;

/// Bytes per table entry: address low, address high, data, vector control (§6.8.2.6–9).
pub const ENTRY_SIZE: u64 = 16;
/// Vector control bit 0: this vector is masked.
const VECTOR_MASKED: u32 = 1;
/// Message control bits (§6.8.2.3): 15 MSI-X enable, 14 function mask.
pub const CONTROL_ENABLE: u16 = 1 << 15;
pub const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// x86 MSI addresses lie in 0xFEEx_xxxx (SDM vol 3 §11.11.1).
const MSI_ADDRESS_MASK: u64 = 0xFFF0_0000;
const MSI_ADDRESS_BASE: u64 = 0xFEE0_0000;
/// Route changes (each a `KVM_SET_GSI_ROUTING` of the whole VM) a function may make
/// in a burst, and how often one more is allowed: a guest rewriting its table in a
/// loop gets its changes applied late (at its next interrupt or write once the
/// budget refills), not a host CPU spent re-routing.
pub const ROUTE_BURST: u32 = 32;
pub const ROUTE_REFILL: std::time::Duration = std::time::Duration::from_millis(1);

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl Entry {
    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.addr_lo) | (u64::from(self.addr_hi) << 32),
            data: self.data,
        }
    }
    fn masked(&self) -> bool {
        self.control & VECTOR_MASKED != 0
    }
}

struct State {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    routed: Vec<Option<MsiMessage>>,
    enabled: bool,
    function_mask: bool,
    /// Entries whose message changed but whose route waits for budget.
    stale: Vec<bool>,
    route_tokens: u32,
    refilled: std::time::Instant,
}

impl State {
    /// Takes one route change from the budget, refilling it by elapsed time.
    fn take_route_token(&mut self) -> bool {
        let now = std::time::Instant::now();
        let gained = now.duration_since(self.refilled).as_nanos() / ROUTE_REFILL.as_nanos();
        if gained > 0 {
            self.route_tokens =
                (u128::from(self.route_tokens) + gained).min(u128::from(ROUTE_BURST)) as u32;
            self.refilled = now;
        }
        if self.route_tokens == 0 {
            return false;
        }
        self.route_tokens -= 1;
        true
    }
}

/// One function's MSI-X vectors.
pub struct Msix {
    state: Mutex<State>,
    vectors: Vec<(u32, EventFd)>,
    router: Arc<dyn MsiRouter>,
    /// Interrupts sent to the guest.
    pub delivered: AtomicU64,
    /// Interrupts held back by a mask (their pending bit set).
    pub held: AtomicU64,
    /// Route changes applied after the guest reprogrammed an entry's message.
    pub route_changes: AtomicU64,
    /// Route changes put off because the guest exceeded [`ROUTE_BURST`].
    pub route_changes_deferred: AtomicU64,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Msix({} vectors)", self.vectors.len())
    }
}

impl Msix {
    /// `n` vectors, each with a GSI and irqfd from `router`; all masked, as at reset.
    pub fn new(n: u16, router: Arc<dyn MsiRouter>) -> Result<Self, IrqError> {
        let vectors = (0..n)
            .map(|_| router.allocate())
            .collect::<Result<Vec<_>, _>>()?;
        let n = n as usize;
        Ok(Self {
            state: Mutex::new(State {
                entries: vec![
                    Entry {
                        control: VECTOR_MASKED,
                        ..Entry::default()
                    };
                    n
                ],
                pending: vec![false; n],
                routed: vec![None; n],
                enabled: false,
                function_mask: false,
                stale: vec![false; n],
                route_tokens: ROUTE_BURST,
                refilled: std::time::Instant::now(),
            }),
            vectors,
            router,
            delivered: AtomicU64::new(0),
            held: AtomicU64::new(0),
            route_changes: AtomicU64::new(0),
            route_changes_deferred: AtomicU64::new(0),
        })
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// Size of the table in bytes.
    #[must_use]
    pub fn table_size(&self) -> u64 {
        self.len() as u64 * ENTRY_SIZE
    }

    /// Size of the PBA in bytes (whole QWORDs, §6.8.2.5).
    #[must_use]
    pub fn pba_size(&self) -> u64 {
        self.len().div_ceil(64) as u64 * 8
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Table and PBA accesses must be aligned DWORDs or QWORDs (§6.8.2: "For all
    /// accesses to MSI-X Table and MSI-X PBA fields, software must use aligned full
    /// DWORD or aligned full QWORD transactions").
    fn access_ok(offset: u64, len: usize, size: u64) -> bool {
        matches!(len, 4 | 8)
            && offset.is_multiple_of(len as u64)
            && offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= size)
    }

    pub fn table_read(&self, offset: u64, data: &mut [u8]) -> Option<Reject> {
        if !Self::access_ok(offset, data.len(), self.table_size()) {
            data.fill(0xFF);
            return Some(Reject::MsixBadAccess);
        }
        let s = self.lock();
        let mut v = 0u64;
        for (i, chunk) in (0..data.len() as u64 / 4).map(|k| (k, offset + 4 * k)) {
            let e = &s.entries[(chunk / ENTRY_SIZE) as usize];
            let dw = match chunk % ENTRY_SIZE {
                0 => e.addr_lo,
                4 => e.addr_hi,
                8 => e.data,
                _ => e.control,
            };
            v |= u64::from(dw) << (32 * i);
        }
        put_le(data, v);
        None
    }

    pub fn table_write(&self, offset: u64, data: &[u8]) -> Option<Reject> {
        if !Self::access_ok(offset, data.len(), self.table_size()) {
            return Some(Reject::MsixBadAccess);
        }
        let v = le_value(data);
        let idx = (offset / ENTRY_SIZE) as usize;
        let mut s = self.lock();
        for k in 0..data.len() as u64 / 4 {
            let dw = (v >> (32 * k)) as u32;
            let e = &mut s.entries[idx];
            match (offset + 4 * k) % ENTRY_SIZE {
                0 => e.addr_lo = dw & !0x3, // bits 1:0 reserved, read as 0
                4 => e.addr_hi = dw,
                8 => e.data = dw,
                // Only the mask bit is defined; the rest is reserved.
                _ => e.control = dw & VECTOR_MASKED,
            }
        }
        let reject = self.sync_route(&mut s, idx);
        self.flush_pending(&mut s);
        reject
    }

    /// Installs the entry's message as the vector's route when it changed.
    fn sync_route(&self, s: &mut State, idx: usize) -> Option<Reject> {
        let msg = s.entries[idx].message();
        if s.routed[idx] == Some(msg) || (msg.address == 0 && msg.data == 0) {
            s.stale[idx] = false;
            return None;
        }
        if !s.take_route_token() {
            if !s.stale[idx] {
                self.route_changes_deferred.fetch_add(1, Ordering::Relaxed);
            }
            s.stale[idx] = true;
            return None;
        }
        s.stale[idx] = false;
        self.route_changes.fetch_add(1, Ordering::Relaxed);
        if msg.address & MSI_ADDRESS_MASK != MSI_ADDRESS_BASE {
            // Not an interrupt message on x86: never route it (it would be a DMA write).
            if s.routed[idx].take().is_some() {
                let _ = self.router.set_route(self.vectors[idx].0, None);
            }
            return Some(Reject::MsixBadAccess);
        }
        match self.router.set_route(self.vectors[idx].0, Some(msg)) {
            Ok(()) => {
                s.routed[idx] = Some(msg);
                None
            }
            Err(e) => {
                crate::guest_log!(warn, vector = idx, "MSI route update failed: {e}");
                Some(Reject::MsixBadAccess)
            }
        }
    }

    pub fn pba_read(&self, offset: u64, data: &mut [u8]) -> Option<Reject> {
        if !Self::access_ok(offset, data.len(), self.pba_size()) {
            data.fill(0xFF);
            return Some(Reject::MsixBadAccess);
        }
        let s = self.lock();
        let first = offset as usize * 8;
        let v = (0..data.len() * 8)
            .filter(|b| s.pending.get(first + b).copied().unwrap_or(false))
            .fold(0u64, |acc, b| acc | (1 << b));
        put_le(data, v);
        None
    }

    /// The PBA is read-only (§6.8.2.10).
    #[must_use]
    pub fn pba_write(&self, _offset: u64, _data: &[u8]) -> Option<Reject> {
        Some(Reject::MsixBadAccess)
    }

    /// The message control register changed (enable / function mask).
    pub fn set_control(&self, control: u16) {
        let mut s = self.lock();
        s.enabled = control & CONTROL_ENABLE != 0;
        s.function_mask = control & CONTROL_FUNCTION_MASK != 0;
        self.flush_pending(&mut s);
    }

    fn deliverable(s: &State, v: usize) -> bool {
        s.enabled && !s.function_mask && !s.entries[v].masked() && s.routed[v].is_some()
    }

    /// Sends held interrupts whose masks were lifted (§6.8.2.9).
    fn flush_pending(&self, s: &mut State) {
        for v in 0..s.pending.len() {
            if s.pending[v] && Self::deliverable(s, v) {
                s.pending[v] = false;
                self.fire(v);
            }
        }
    }

    fn fire(&self, v: usize) {
        if self.vectors[v].1.write(1).is_ok() {
            self.delivered.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Raises vector `v`: delivered now, or held in the PBA while masked.
    /// Returns false when `v` does not exist or MSI-X is off (nothing to do).
    pub fn trigger(&self, v: u16) -> bool {
        let v = v as usize;
        let mut s = self.lock();
        if v >= s.entries.len() || !s.enabled {
            return false;
        }
        if s.stale[v] {
            let _ = self.sync_route(&mut s, v);
        }
        if Self::deliverable(&s, v) {
            drop(s);
            self.fire(v);
        } else {
            s.pending[v] = true;
            self.held.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    /// The destination APIC id of vector `v`'s current route (SDM vol 3
    /// §11.11.1: address bits 19:12), `None` while it has none.
    #[must_use]
    pub fn destination(&self, v: u16) -> Option<u32> {
        let s = self.lock();
        let msg = s.routed.get(usize::from(v)).copied().flatten()?;
        Some(((msg.address >> 12) & 0xFF) as u32)
    }

    /// Back to reset state (device reset): all masked, nothing pending, disabled.
    pub fn reset(&self) {
        let mut s = self.lock();
        s.entries.iter_mut().for_each(|e| {
            *e = Entry {
                control: VECTOR_MASKED,
                ..Entry::default()
            }
        });
        s.pending.iter_mut().for_each(|p| *p = false);
        s.stale.iter_mut().for_each(|p| *p = false);
        s.enabled = false;
        s.function_mask = false;
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// Records routes instead of calling KVM.
    #[derive(Default)]
    pub struct FakeRouter {
        pub routes: Mutex<Vec<(u32, Option<MsiMessage>)>>,
        next: std::sync::atomic::AtomicU32,
    }

    impl MsiRouter for FakeRouter {
        fn allocate(&self) -> Result<(u32, EventFd), IrqError> {
            Ok((
                24 + self.next.fetch_add(1, Ordering::Relaxed),
                EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            ))
        }
        fn set_route(&self, gsi: u32, msg: Option<MsiMessage>) -> Result<(), IrqError> {
            self.routes.lock().unwrap().push((gsi, msg));
            Ok(())
        }
    }

    fn msix(n: u16) -> (Msix, Arc<FakeRouter>) {
        let r = Arc::new(FakeRouter::default());
        (Msix::new(n, r.clone()).unwrap(), r)
    }

    fn program(m: &Msix, v: u64, addr: u32, data: u32) {
        assert_eq!(m.table_write(v * 16, &addr.to_le_bytes()), None);
        assert_eq!(m.table_write(v * 16 + 4, &0u32.to_le_bytes()), None);
        assert_eq!(m.table_write(v * 16 + 8, &data.to_le_bytes()), None);
    }

    fn irqfd_count(m: &Msix, v: usize) -> u64 {
        m.vectors[v].1.read().unwrap_or(0)
    }

    #[test]
    fn a_guest_rewriting_its_table_in_a_loop_is_rate_limited_not_lost() {
        let (m, r) = msix(1);
        m.set_control(CONTROL_ENABLE);
        for i in 0..1000u32 {
            program(&m, 0, 0xFEE0_0000 | ((i % 2) << 12), 0x40);
        }
        let routes = r.routes.lock().unwrap().len();
        assert!(
            routes <= ROUTE_BURST as usize + 100,
            "{routes} route updates for 1000 rewrites"
        );
        assert!(m.route_changes_deferred.load(Ordering::Relaxed) > 0);
        // The last message still takes effect: at the next interrupt once budget is back.
        program(&m, 0, 0xFEE0_1000, 0x41);
        std::thread::sleep(ROUTE_REFILL * 2);
        let _ = m.trigger(0);
        let last = r.routes.lock().unwrap().last().copied().unwrap();
        assert_eq!(last.1.map(|msg| msg.data), Some(0x41));
        assert_eq!(m.destination(0), Some(1));
    }

    #[test]
    fn entries_start_masked_and_route_on_programming() {
        let (m, r) = msix(2);
        let mut d = [0u8; 4];
        m.table_read(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), VECTOR_MASKED);
        program(&m, 1, 0xFEE0_1000, 0x41);
        assert_eq!(
            r.routes.lock().unwrap().last(),
            Some(&(
                25,
                Some(MsiMessage {
                    address: 0xFEE0_1000,
                    data: 0x41
                })
            ))
        );
        let mut q = [0u8; 8];
        m.table_read(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0xFEE0_1000);
    }

    #[test]
    fn masked_vector_is_held_in_pba_and_sent_on_unmask() {
        let (m, _) = msix(3);
        program(&m, 2, 0xFEE0_0000, 0x50);
        m.set_control(CONTROL_ENABLE);
        assert!(m.trigger(2));
        assert_eq!(irqfd_count(&m, 2), 0, "masked: not delivered");
        let mut p = [0u8; 8];
        m.pba_read(0, &mut p);
        assert_eq!(u64::from_le_bytes(p), 1 << 2);
        m.table_write(2 * 16 + 12, &0u32.to_le_bytes()); // unmask
        assert_eq!(irqfd_count(&m, 2), 1, "pending vector delivered on unmask");
        m.pba_read(0, &mut p);
        assert_eq!(u64::from_le_bytes(p), 0);
        assert!(m.trigger(2));
        assert_eq!(irqfd_count(&m, 2), 1);
    }

    #[test]
    fn function_mask_holds_everything() {
        let (m, _) = msix(1);
        program(&m, 0, 0xFEE0_0000, 0x30);
        m.table_write(12, &0u32.to_le_bytes());
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        m.trigger(0);
        assert_eq!(irqfd_count(&m, 0), 0);
        m.set_control(CONTROL_ENABLE);
        assert_eq!(irqfd_count(&m, 0), 1);
    }

    #[test]
    fn odd_accesses_are_refused() {
        let (m, _) = msix(2);
        let mut b = [0u8; 2];
        assert_eq!(m.table_read(0, &mut b), Some(Reject::MsixBadAccess));
        assert_eq!(b, [0xFF; 2]);
        assert_eq!(m.table_write(2, &[0; 4]), Some(Reject::MsixBadAccess));
        assert_eq!(
            m.table_write(4, &[0; 8]),
            Some(Reject::MsixBadAccess),
            "misaligned qword"
        );
        assert_eq!(
            m.table_write(32, &[0; 4]),
            Some(Reject::MsixBadAccess),
            "past the table"
        );
        assert_eq!(m.table_write(1, &[0]), Some(Reject::MsixBadAccess));
        assert_eq!(m.pba_write(0, &[0; 8]), Some(Reject::MsixBadAccess));
        // Nothing changed: still masked, no routes.
        let mut d = [0u8; 4];
        m.table_read(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), VECTOR_MASKED);
    }

    /// Every access size and offset a guest can produce (PCI Local Bus 3.0 §6.8.2:
    /// software uses aligned dword or qword accesses only); nothing else may change an
    /// entry or install a route.
    #[test]
    fn every_odd_size_and_offset_is_refused_without_effect() {
        let (m, r) = msix(2);
        let table = 2 * 16;
        for len in [1usize, 2, 3, 5, 6, 7, 16] {
            for off in 0..table {
                assert_eq!(
                    m.table_write(off, &vec![0xAB; len]),
                    Some(Reject::MsixBadAccess),
                    "{len} bytes at {off}"
                );
            }
        }
        for off in (0..table).filter(|o| o % 4 != 0) {
            assert_eq!(m.table_write(off, &[0; 4]), Some(Reject::MsixBadAccess));
        }
        for off in (0..table).filter(|o| o % 8 != 0) {
            assert_eq!(m.table_write(off, &[0; 8]), Some(Reject::MsixBadAccess));
        }
        // Straddling the end, and far beyond it (no overflow in the bound check).
        assert_eq!(
            m.table_write(table - 4, &[0; 8]),
            Some(Reject::MsixBadAccess)
        );
        assert_eq!(
            m.table_write(u64::MAX - 3, &[0; 4]),
            Some(Reject::MsixBadAccess)
        );
        for len in [1usize, 2, 4, 8] {
            assert_eq!(m.pba_write(0, &vec![0; len]), Some(Reject::MsixBadAccess));
        }
        assert!(r.routes.lock().unwrap().is_empty(), "no route installed");
        for v in 0..2 {
            let mut d = [0u8; 4];
            assert_eq!(m.table_read(v * 16 + 12, &mut d), None);
            assert_eq!(
                u32::from_le_bytes(d),
                VECTOR_MASKED,
                "vector {v} still masked"
            );
            assert_eq!(m.table_read(v * 16 + 8, &mut d), None);
            assert_eq!(u32::from_le_bytes(d), 0, "vector {v} data untouched");
        }
    }

    #[test]
    fn non_msi_addresses_are_never_routed() {
        let (m, r) = msix(1);
        assert_eq!(
            m.table_write(0, &0x1234_0000u32.to_le_bytes()),
            Some(Reject::MsixBadAccess)
        );
        assert!(r.routes.lock().unwrap().is_empty());
        m.set_control(CONTROL_ENABLE);
        m.table_write(12, &0u32.to_le_bytes());
        m.trigger(0);
        assert_eq!(irqfd_count(&m, 0), 0);
    }

    #[test]
    fn out_of_range_vector_and_disabled_msix_do_nothing() {
        let (m, _) = msix(1);
        assert!(!m.trigger(0), "MSI-X disabled");
        m.set_control(CONTROL_ENABLE);
        assert!(!m.trigger(7));
    }
}
