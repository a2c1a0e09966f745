//! Counters: the exits the shim sees by reason, the inputs it rejected, and KVM's own
//! binary statistics (`KVM_GET_STATS_FD`, Linux `Documentation/virt/kvm/api.rst` §4.133).
//!
//! On this machine's KVM `io_exits` never moves (DESIGN §7), so the shim counts the
//! exits it handles itself; KVM's `exits` and `insn_emulation` are read alongside.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! counter_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident => $s:literal,)* }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name { $($(#[$vm])* $v,)* }
        impl $name {
            pub const ALL: &[$name] = &[$($name::$v,)*];
            #[must_use]
            pub const fn name(self) -> &'static str { match self { $($name::$v => $s,)* } }
        }
    };
}

counter_enum! {
    /// Why a vCPU came back to the shim.
    Exit {
        IoIn => "io_in",
        IoOut => "io_out",
        MmioRead => "mmio_read",
        MmioWrite => "mmio_write",
        Hypercall => "hypercall",
        IrqWindow => "irq_window_open",
        Hlt => "hlt",
        Shutdown => "shutdown",
        Intr => "intr",
        Eagain => "eagain",
        SystemEvent => "system_event",
        InternalError => "internal_error",
        Other => "other",
    }
}

counter_enum! {
    /// Guest inputs the shim refused or ignored (DESIGN §6: every one counted).
    Reject {
        UnknownHypercall => "unknown_hypercall",
        UnknownPort => "unknown_port",
        UnmappedMmio => "unmapped_mmio",
        LegacyPic => "legacy_pic_access",
        LegacyPit => "legacy_pit_access",
        PciConfigReadOnly => "pci_config_ro_write",
        PciConfigBadAccess => "pci_config_bad_access",
        BarRelocation => "pci_bar_relocation",
        MsixBadAccess => "msix_bad_access",
        VirtioBadRegister => "virtio_bad_register",
        VirtioBadQueue => "virtio_bad_queue_config",
        VirtioBadDescriptor => "virtio_bad_descriptor",
        VirtioNoRxBuffer => "virtio_rx_dropped_no_buffer",
        FrameTooBig => "frame_too_big",
    }
}

/// A fixed set of named atomic counters.
#[derive(Debug)]
pub struct Counters<const N: usize>([AtomicU64; N]);

impl<const N: usize> Default for Counters<N> {
    fn default() -> Self {
        Self(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl<const N: usize> Counters<N> {
    pub fn add(&self, i: usize, n: u64) {
        if let Some(c) = self.0.get(i) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }
    #[must_use]
    pub fn get(&self, i: usize) -> u64 {
        self.0.get(i).map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

pub type ExitCounters = Counters<{ Exit::ALL.len() }>;
pub type RejectCounters = Counters<{ Reject::ALL.len() }>;

impl ExitCounters {
    pub fn bump(&self, e: Exit) {
        self.add(e as usize, 1);
    }
    #[must_use]
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        Exit::ALL
            .iter()
            .map(|&e| (e.name(), self.get(e as usize)))
            .filter(|(_, v)| *v > 0)
            .collect()
    }
    #[must_use]
    pub fn total(&self) -> u64 {
        Exit::ALL.iter().map(|&e| self.get(e as usize)).sum()
    }
}

impl RejectCounters {
    pub fn bump(&self, r: Reject) {
        self.add(r as usize, 1);
    }
    #[must_use]
    pub fn count(&self, r: Reject) -> u64 {
        self.get(r as usize)
    }
    #[must_use]
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        Reject::ALL
            .iter()
            .map(|&r| (r.name(), self.get(r as usize)))
            .filter(|(_, v)| *v > 0)
            .collect()
    }
}

vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);

/// One vCPU's KVM binary statistics file.
#[derive(Debug)]
pub struct KvmStats {
    file: File,
    /// (name, byte offset of the value in the file) for the 64-bit counters we know.
    fields: Vec<(String, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("KVM_GET_STATS_FD failed: {0}")]
    Ioctl(std::io::Error),
    #[error("reading the KVM stats file failed: {0}")]
    Read(std::io::Error),
    #[error("KVM stats header is malformed")]
    Malformed,
}

/// `struct kvm_stats_header` is six u32 (api.rst "`KVM_GET_STATS_FD`").
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

impl KvmStats {
    /// Opens the statistics of the vCPU behind `fd` (a KVM vCPU file descriptor).
    pub fn open(fd: &impl AsRawFd) -> Result<Self, StatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd or -1.
        let raw = unsafe { vmm_sys_util::ioctl::ioctl(&fd.as_raw_fd(), KVM_GET_STATS_FD()) };
        if raw < 0 {
            return Err(StatsError::Ioctl(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh fd that nothing else owns.
        let file = unsafe { File::from_raw_fd(raw) };
        let mut hdr = [0u8; 24];
        file.read_exact_at(&mut hdr, 0).map_err(StatsError::Read)?;
        let (name_size, num_desc, desc_off, data_off) = (
            u32_at(&hdr, 4).ok_or(StatsError::Malformed)? as usize,
            u32_at(&hdr, 8).ok_or(StatsError::Malformed)? as usize,
            u32_at(&hdr, 16).ok_or(StatsError::Malformed)? as u64,
            u32_at(&hdr, 20).ok_or(StatsError::Malformed)? as u64,
        );
        if num_desc > 4096 || name_size > 4096 {
            return Err(StatsError::Malformed);
        }
        // struct kvm_stats_desc: flags u32, exponent s16, size u16, offset u32, bucket_size u32, name[].
        let desc_len = 16 + name_size;
        let mut descs = vec![0u8; desc_len * num_desc];
        file.read_exact_at(&mut descs, desc_off)
            .map_err(StatsError::Read)?;
        let fields = descs
            .chunks_exact(desc_len)
            .filter_map(|d| {
                let offset = u32_at(d, 8)?;
                let name = d[16..].split(|&b| b == 0).next()?;
                Some((
                    String::from_utf8_lossy(name).into_owned(),
                    data_off + u64::from(offset),
                ))
            })
            .collect();
        Ok(Self { file, fields })
    }

    /// Reads the current value of the named statistic (the first u64 of it).
    #[must_use]
    pub fn read(&self, name: &str) -> Option<u64> {
        let (_, off) = self.fields.iter().find(|(n, _)| n == name)?;
        let mut b = [0u8; 8];
        self.file.read_exact_at(&mut b, *off).ok()?;
        Some(u64::from_le_bytes(b))
    }
}

/// The KVM statistics the report carries.
pub const KVM_FIELDS: &[&str] = &[
    "exits",
    "insn_emulation",
    "io_exits",
    "mmio_exits",
    "irq_window_exits",
    "halt_exits",
    "irq_injections",
    "signal_exits",
];

#[derive(Debug, Default, Serialize)]
pub struct VcpuReport {
    pub index: u32,
    pub host_cpu: i32,
    pub exits: BTreeMap<&'static str, u64>,
    pub shim_exits_total: u64,
    pub kvm: BTreeMap<&'static str, u64>,
    pub interrupts_injected: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct NicReport {
    pub name: String,
    pub mac: String,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub queue_notifications: BTreeMap<String, u64>,
    pub interrupts: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct GuestReport {
    pub name: String,
    pub outcome: String,
    pub exit_status: Option<u32>,
    pub boot_ms: Option<f64>,
    pub run_ms: f64,
    pub vcpus: Vec<VcpuReport>,
    pub rejected: BTreeMap<&'static str, u64>,
    pub nics: Vec<NicReport>,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub guests: Vec<GuestReport>,
    pub shim_max_rss_kib: u64,
    pub switch: BTreeMap<&'static str, u64>,
}

/// The shim's peak resident set size, from `getrusage` (kilobytes on Linux).
#[must_use]
pub fn max_rss_kib() -> u64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut ru) };
    if rc == 0 {
        u64::try_from(ru.ru_maxrss).unwrap_or(0)
    } else {
        0
    }
}

impl Report {
    /// The human table printed at exit.
    #[must_use]
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "=== host-shim summary (max RSS {} KiB) ===",
            self.shim_max_rss_kib
        );
        for g in &self.guests {
            let boot = g
                .boot_ms
                .map_or_else(|| "-".into(), |b| format!("{b:.1} ms"));
            let _ = writeln!(
                s,
                "guest {}: {} | boot {} | ran {:.1} ms",
                g.name, g.outcome, boot, g.run_ms
            );
            let _ = writeln!(
                s,
                "  {:<5} {:>5} {:>10} {:>10} {:>12} {:>8}  shim exits by reason",
                "vcpu", "cpu", "shim", "kvm exits", "insn_emul", "irqs"
            );
            for v in &g.vcpus {
                let reasons: Vec<String> =
                    v.exits.iter().map(|(k, n)| format!("{k}={n}")).collect();
                let _ = writeln!(
                    s,
                    "  {:<5} {:>5} {:>10} {:>10} {:>12} {:>8}  {}",
                    v.index,
                    v.host_cpu,
                    v.shim_exits_total,
                    v.kvm.get("exits").copied().unwrap_or(0),
                    v.kvm.get("insn_emulation").copied().unwrap_or(0),
                    v.interrupts_injected,
                    reasons.join(" ")
                );
            }
            for n in &g.nics {
                let notes: u64 = n.queue_notifications.values().sum();
                let _ = writeln!(
                    s,
                    "  nic {} {}: tx {} pkts/{} B, rx {} pkts/{} B, notifications {}, interrupts {}",
                    n.name,
                    n.mac,
                    n.tx_packets,
                    n.tx_bytes,
                    n.rx_packets,
                    n.rx_bytes,
                    notes,
                    n.interrupts
                );
            }
            if !g.rejected.is_empty() {
                let r: Vec<String> = g.rejected.iter().map(|(k, n)| format!("{k}={n}")).collect();
                let _ = writeln!(s, "  rejected/ignored guest input: {}", r.join(" "));
            }
        }
        if !self.switch.is_empty() {
            let r: Vec<String> = self
                .switch
                .iter()
                .map(|(k, n)| format!("{k}={n}"))
                .collect();
            let _ = writeln!(s, "switch: {}", r.join(" "));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_count_and_snapshot_skips_zero() {
        let c = ExitCounters::default();
        c.bump(Exit::IoOut);
        c.bump(Exit::IoOut);
        c.bump(Exit::Hlt);
        assert_eq!(c.total(), 3);
        let s = c.snapshot();
        assert_eq!(s.get("io_out"), Some(&2));
        assert_eq!(s.get("hlt"), Some(&1));
        assert!(!s.contains_key("mmio_read"));
        let r = RejectCounters::default();
        r.bump(Reject::UnknownHypercall);
        assert_eq!(r.count(Reject::UnknownHypercall), 1);
        assert_eq!(r.count(Reject::UnmappedMmio), 0);
    }

    #[test]
    fn names_are_unique() {
        let mut n: Vec<_> = Exit::ALL
            .iter()
            .map(|e| e.name())
            .chain(Reject::ALL.iter().map(|r| r.name()))
            .collect();
        let len = n.len();
        n.sort_unstable();
        n.dedup();
        assert_eq!(n.len(), len);
    }

    #[test]
    fn rss_is_known() {
        assert!(max_rss_kib() > 0);
    }

    #[test]
    fn summary_mentions_guest_and_rss() {
        let r = Report {
            guests: vec![GuestReport {
                name: "a".into(),
                outcome: "exit 0".into(),
                boot_ms: Some(1.5),
                ..Default::default()
            }],
            shim_max_rss_kib: 1234,
            ..Default::default()
        };
        let s = r.summary();
        assert!(s.contains("guest a: exit 0 | boot 1.5 ms"), "{s}");
        assert!(s.contains("1234 KiB"));
    }
}
