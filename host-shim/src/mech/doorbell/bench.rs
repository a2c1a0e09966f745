//! The notification benchmark's host half (`--notify-bench`; contract in
//! `para_abi::doorbell::bench`): one observer for the four paths — the MMIO
//! exit (called from [`super::ParaMmio`] on the vCPU thread), the ioeventfd
//! (a thread of its own blocked on the eventfd), and doorbell events for
//! `device::BENCH` (called from the monitor thread).
//!
//! Latency = host TSC at observation − (guest send TSC − KVM's TSC offset).
//! The offset is read at the `NotifyBench` hypercall on the guest's vCPU
//! thread: `KVM_GET_MSRS` of IA32_TSC (MSR 0x10, SDM vol 4 table 2-2; KVM
//! api.rst §4.18 — the value read is the guest's view, host TSC scaled and
//! offset) bracketed by two host `rdtsc`s, best of several tries, so its error
//! is half the shortest bracket (reported as `offset_error_cycles`).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use kvm_bindings::{Msrs, kvm_msr_entry};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VcpuFd, VmFd};
use para_abi::doorbell::bench::{
    ACK, IOEVENTFD_GPA, MAILBOX_BYTES, PATH, SEND_TSC, SEQ, TSC_KHZ, WORDS, count_word,
    cycles_word, path,
};
use para_abi::hypercall::Status;
use serde::Serialize;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::kvm::memory::GuestMem;
use crate::sync::lock;

/// IA32_TIME_STAMP_COUNTER (SDM vol 4, table 2-2).
const MSR_IA32_TSC: u32 = 0x10;
/// Samples kept per path (more are counted, not stored).
const MAX_SAMPLES: usize = 200_000;

/// The guest's mailbox page, seen from the host.
struct Mailbox {
    words: *const AtomicU64,
}

// SAFETY: the pointer is into guest RAM that `NotifyBench::mem` keeps mapped
// for the bench's life; it is only used through atomics.
unsafe impl Send for Mailbox {}
// SAFETY: as above.
unsafe impl Sync for Mailbox {}

impl Mailbox {
    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < WORDS);
        // SAFETY: `words` points at a whole 8-byte-aligned page of guest RAM
        // (checked in `setup`) and `i` is inside it.
        unsafe { &*self.words.add(i) }
    }
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no preconditions in user mode on x86_64 Linux.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// What the benchmark measured, for the stats JSON (`doorbell.notify_bench`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct BenchReport {
    /// Guest TSC − host TSC, from KVM_GET_MSRS at the set-up hypercall.
    pub tsc_offset: i64,
    /// Half the host-rdtsc bracket around the MSR read (the offset's uncertainty).
    pub offset_error_cycles: u64,
    /// The guest's calibrated TSC rate, used for every ns figure.
    pub tsc_khz: u64,
    /// Notifications observed that the guest had not set up (no mailbox yet).
    pub stray: u64,
    pub paths: std::collections::BTreeMap<&'static str, PathReport>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PathReport {
    /// Notifications the guest measured (from the mailbox).
    pub guest_count: u64,
    /// Guest-side cost per notification in ns (guest TSC around the notify).
    pub guest_ns: f64,
    /// Observations the host timed.
    pub observed: u64,
    /// Notify → host observation, ns, in order.
    pub latency_ns: Vec<f64>,
}

/// One guest's benchmark observer.
pub struct NotifyBench {
    name: String,
    mem: GuestMem,
    mailbox: OnceLock<Mailbox>,
    tsc_offset: AtomicI64,
    offset_error: AtomicU64,
    stray: AtomicU64,
    samples: Mutex<[Vec<i64>; 5]>,
    observed: [AtomicU64; 5],
    ioevent: EventFd,
}

impl NotifyBench {
    /// Binds the ioeventfd path's address and starts its observer thread.
    pub fn start(name: &str, mem: GuestMem, vm: &VmFd) -> std::io::Result<Arc<Self>> {
        let ioevent = EventFd::new(0)?;
        vm.register_ioevent(&ioevent, &IoEventAddress::Mmio(IOEVENTFD_GPA), NoDatamatch)
            .map_err(|e| std::io::Error::other(format!("KVM_IOEVENTFD: {e}")))?;
        let me = Arc::new(Self {
            name: name.to_owned(),
            mem,
            mailbox: OnceLock::new(),
            tsc_offset: AtomicI64::new(0),
            offset_error: AtomicU64::new(0),
            stray: AtomicU64::new(0),
            samples: Mutex::new(Default::default()),
            observed: Default::default(),
            ioevent,
        });
        let weak = Arc::downgrade(&me);
        let fd = me.ioevent.try_clone()?;
        std::thread::Builder::new()
            .name(format!("{name}-benchfd"))
            .spawn(move || {
                crate::seccomp::install_or_exit(crate::seccomp::Kind::Helper);
                ioevent_loop(&fd, &weak);
            })?;
        Ok(me)
    }

    /// The `NotifyBench` hypercall: checks the mailbox address and measures the
    /// TSC offset of the calling vCPU.
    pub fn setup(&self, fd: &VcpuFd, gpa: u64) -> Status {
        let ok = gpa.is_multiple_of(MAILBOX_BYTES)
            && gpa != 0
            && self
                .mem
                .check_range(GuestAddress(gpa), MAILBOX_BYTES as usize);
        let Some(host) = ok
            .then(|| self.mem.get_host_address(GuestAddress(gpa)).ok())
            .flatten()
        else {
            crate::guest_log!(warn, guest = %self.name, "notify bench: mailbox at {gpa:#x} refused");
            return Status::BadArgument;
        };
        let mut best: Option<(u64, i64)> = None;
        for _ in 0..16 {
            let Ok(mut msrs) = Msrs::from_entries(&[kvm_msr_entry {
                index: MSR_IA32_TSC,
                ..Default::default()
            }]) else {
                return Status::BadArgument;
            };
            let h0 = rdtsc();
            let n = fd.get_msrs(&mut msrs);
            let h1 = rdtsc();
            if n.ok() != Some(1) {
                continue;
            }
            let guest = msrs.as_slice()[0].data;
            let bracket = h1.wrapping_sub(h0);
            let mid = h0 + bracket / 2;
            let offset = guest.wrapping_sub(mid).cast_signed();
            if best.is_none_or(|(b, _)| bracket < b) {
                best = Some((bracket, offset));
            }
        }
        let Some((bracket, offset)) = best else {
            crate::guest_log!(warn, guest = %self.name, "notify bench: KVM_GET_MSRS(IA32_TSC) failed");
            return Status::BadArgument;
        };
        self.tsc_offset.store(offset, Ordering::Relaxed);
        self.offset_error.store(bracket / 2, Ordering::Relaxed);
        // Page-aligned guest-physical page of a page-aligned mapping.
        #[allow(clippy::cast_ptr_alignment)]
        let words = host.cast::<AtomicU64>().cast_const();
        if self.mailbox.set(Mailbox { words }).is_err() {
            crate::guest_log!(warn, guest = %self.name, "notify bench: a second mailbox refused");
            return Status::BadArgument;
        }
        crate::guest_log!(info, guest = %self.name, mailbox = format_args!("{gpa:#x}"), offset, bracket, "notify bench ready");
        Status::Ok
    }

    /// One notification reached the host by any path: time it and acknowledge.
    pub fn observe(&self) {
        let now = rdtsc();
        let Some(mb) = self.mailbox.get() else {
            self.stray.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let seq = mb.word(SEQ).load(Ordering::Acquire);
        let sent = mb.word(SEND_TSC).load(Ordering::Acquire);
        // Hostile values only make a wrong sample: the index is clamped.
        let p = usize::try_from(mb.word(PATH).load(Ordering::Acquire).min(4)).unwrap_or(0);
        let offset = self.tsc_offset.load(Ordering::Relaxed);
        let sent_host = sent.wrapping_sub(offset.cast_unsigned());
        let latency = now.wrapping_sub(sent_host).cast_signed();
        self.observed[p].fetch_add(1, Ordering::Relaxed);
        if p as u64 != path::WARMUP {
            let mut s = lock(&self.samples);
            if s[p].len() < MAX_SAMPLES {
                s[p].push(latency);
            }
        }
        mb.word(ACK).store(seq, Ordering::Release);
    }

    /// The figures, converted with the guest's TSC rate.
    #[must_use]
    #[allow(clippy::cast_precision_loss)] // cycle counts far below 2^52
    pub fn report(&self) -> BenchReport {
        let mut r = BenchReport {
            tsc_offset: self.tsc_offset.load(Ordering::Relaxed),
            offset_error_cycles: self.offset_error.load(Ordering::Relaxed),
            stray: self.stray.load(Ordering::Relaxed),
            ..Default::default()
        };
        let Some(mb) = self.mailbox.get() else {
            return r;
        };
        r.tsc_khz = mb.word(TSC_KHZ).load(Ordering::Relaxed);
        if r.tsc_khz == 0 {
            return r;
        }
        let ns = |cycles: f64| cycles * 1e6 / r.tsc_khz as f64;
        let s = lock(&self.samples);
        for p in path::ALL {
            let count = mb.word(count_word(p)).load(Ordering::Relaxed);
            let cycles = mb.word(cycles_word(p)).load(Ordering::Relaxed);
            r.paths.insert(
                path::name(p),
                PathReport {
                    guest_count: count,
                    guest_ns: if count > 0 {
                        ns(cycles as f64) / count as f64
                    } else {
                        0.0
                    },
                    observed: self.observed[p as usize].load(Ordering::Relaxed),
                    latency_ns: s[p as usize].iter().map(|&c| ns(c as f64)).collect(),
                },
            );
        }
        r
    }
}

/// The ioeventfd path's observer: blocks on the eventfd; ends once the bench
/// is gone (checked every 100 ms).
fn ioevent_loop(fd: &EventFd, bench: &std::sync::Weak<NotifyBench>) {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&raw mut pfd, 1, 100) };
        let Some(b) = bench.upgrade() else { return };
        if rc > 0 {
            // Each notification waits for its acknowledgement, so the count
            // read is 1; a larger one would be several writes observed at once.
            if let Ok(n) = fd.read() {
                for _ in 0..n {
                    b.observe();
                }
            }
        } else if rc < 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
