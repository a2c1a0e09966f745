//! KVM's binary statistics of a vCPU (`KVM_GET_STATS_FD`, Linux
//! `Documentation/virt/kvm/api.rst` §4.133).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

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
    "halt_attempted_poll",
    "halt_successful_poll",
    // On this platform's KVM most exits are instructions its emulator gives
    // up on (`iretq`, `int 0x80` at CPL 3 as #UD), and trapping
    // MMIO writes are page faults it takes.
    "insn_emulation_fail",
    "pf_taken",
    // Host interrupts taken while the vCPU ran guest code.
    "irq_exits",
];
