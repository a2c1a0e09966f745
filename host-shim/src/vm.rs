//! One guest: its KVM VM, memory, vCPUs and devices, from creation to report.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use kvm_bindings::{CpuId, KVM_CAP_SPLIT_IRQCHIP, Msrs, kvm_enable_cap, kvm_msr_entry};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use tracing::info;
use vm_memory::{Bytes, GuestAddress};

use crate::counters::RejectCounters;
use crate::devices::net::NetCounters;
use crate::devices::serial::{LineWriter, Sink, new_uart};
use crate::kvm::acpi::{self, EcamInfo};
use crate::kvm::boot;
use crate::kvm::cpuid::{self, CpuidParams};
use crate::kvm::memory::{self, GuestMem};
use crate::kvm::stats::KvmStats;
use crate::mech::Mechanism;
use crate::pci::msix::Msix;
use crate::platform::Platform;
use crate::report::{GuestReport, NicReport, VcpuReport};
use crate::sync::lock;
use crate::vcpu::handle::{self, VcpuShared};
use crate::vcpu::{GuestCtx, Outcome};

/// IOAPIC pins reserved for the user-space side of the split irqchip (the routes
/// below this GSI belong to it; MSI routes start here).
pub const IOAPIC_PINS: u32 = 24;
/// Most vCPUs per guest: the MADT's Local APIC entries carry 8-bit APIC ids.
pub const MAX_VCPUS: u32 = 254;

/// `IA32_MISC_ENABLE` and `IA32_MTRR_DEF_TYPE` (SDM vol 4, table 2-2).
const MSR_IA32_MISC_ENABLE: u32 = 0x1A0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2FF;
/// Fast-string operations enabled (SDM vol 4, `IA32_MISC_ENABLE` bit 0).
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back (SDM vol 3 §11.11.2.1).
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

#[derive(Clone, Debug)]
pub struct GuestConfig {
    pub name: String,
    pub kernel: PathBuf,
    pub vcpus: u32,
    pub mem: u64,
    pub cmdline: String,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("vCPU count {0} is outside 1..={MAX_VCPUS}")]
    BadVcpuCount(u32),
    #[error("writing to guest memory failed: {0}")]
    GuestWrite(String),
    #[error("starting a vCPU thread failed: {0}")]
    Thread(std::io::Error),
    #[error("device setup failed: {0}")]
    Device(String),
    #[error("installing the vCPU kick handler failed: {0}")]
    Signal(std::io::Error),
    #[error("{0}")]
    Mechanism(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// What the report needs from one NIC.
pub struct NicInfo {
    pub name: String,
    pub mac: [u8; 6],
    pub counters: Arc<NetCounters>,
    pub msix: Arc<Msix>,
    /// PCI device number on bus 0 (what doorbell events name).
    pub pci_device: u8,
    /// Per queue: the eventfd a doorbell notification rings.
    pub doorbell_fds: Vec<vmm_sys_util::eventfd::EventFd>,
    /// The NIC's queue work for the doorbell monitor to run itself (run to
    /// completion), when asked for.
    pub inline: Option<Arc<crate::devices::net::Inline>>,
    /// Its port on the switch, given back when the guest is removed at run time.
    pub switch_port: usize,
    /// What the switch's sender runs for this NIC in place of its RX work
    /// (`--rx-handoff monitor`), set once; see `devices::net::Net::rx_post`.
    pub rx_post: Arc<std::sync::OnceLock<crate::devices::switch::DirectRx>>,
}

/// A guest before and while it runs.
pub struct Guest {
    pub name: String,
    /// The running guest's shared state; `None` until [`Guest::start`].
    pub ctx: Option<Arc<GuestCtx>>,
    pub vcpus: Vec<Arc<VcpuShared>>,
    pub vm: Arc<VmFd>,
    pub mem: GuestMem,
    pub rejects: Arc<RejectCounters>,
    vcpu_fds: Vec<VcpuFd>,
    threads: Vec<JoinHandle<()>>,
    started: Option<Instant>,
    first_output: Arc<OnceLock<Instant>>,
    /// The guest's NICs, for the report.
    pub nics: Vec<NicInfo>,
    /// Set once the platform is shared with running vCPUs; devices can no longer be added.
    platform: Option<Platform>,
    /// What KVM supports and what the shim offers, to rebuild CPUID on [`Guest::attach`].
    cpuid_supported: &'static [kvm_bindings::kvm_cpuid_entry2],
    cpuid_params: CpuidParams,
    /// The mechanisms attached ([`Guest::attach`]), handed to the vCPU threads at start.
    mechs: Vec<Arc<dyn Mechanism>>,
    /// An offer came since the vCPUs' CPUID was last set.
    cpuid_stale: bool,
    /// vCPU threads whose run loop has returned.
    vcpus_returned: Arc<std::sync::atomic::AtomicUsize>,
}

/// Sets vCPU `apic_id`'s CPUID from what KVM supports filtered by `params`.
fn set_cpuid(
    fd: &VcpuFd,
    supported: &[kvm_bindings::kvm_cpuid_entry2],
    apic_id: u32,
    params: &CpuidParams,
) -> Result<(), VmError> {
    let entries = cpuid::filter(supported, apic_id, params);
    let cpuid = CpuId::from_entries(&entries).map_err(|_| VmError::Kvm {
        what: "CPUID table",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))
}

impl Guest {
    /// Caps KVM's halt polling for this VM at `ns` (api.rst, "KVM_CAP_HALT_POLL");
    /// logs and goes on when the kernel lacks the capability.
    pub fn set_halt_poll_ns(&self, ns: u32) {
        let mut cap = kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_HALT_POLL,
            ..Default::default()
        };
        cap.args[0] = u64::from(ns);
        if let Err(e) = self.vm.enable_cap(&cap) {
            tracing::warn!(guest = %self.name, "KVM_CAP_HALT_POLL refused ({e}): the host's default halt polling stays");
        }
    }

    /// Creates the VM, its memory and vCPUs, but loads nothing and offers no
    /// mechanism ([`Guest::attach`] does).
    pub fn new(
        kvm: &Kvm,
        name: &str,
        mem_size: u64,
        vcpus: u32,
        sink: Sink,
    ) -> Result<Self, VmError> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(VmError::BadVcpuCount(vcpus));
        }
        handle::install_kick_handler().map_err(VmError::Signal)?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        // Needed by Intel VMX for real-mode emulation; three pages just below the BIOS.
        vm.set_tss_address(0xFFFB_D000)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        // Split irqchip: in-kernel LAPICs, PIC/IOAPIC in user space (api.rst §7.18).
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_SPLIT_IRQCHIP,
            ..Default::default()
        };
        cap.args[0] = u64::from(IOAPIC_PINS);
        vm.enable_cap(&cap)
            .map_err(kvm_err("KVM_ENABLE_CAP(SPLIT_IRQCHIP)"))?;

        let mem = memory::create(name, mem_size)?;
        memory::register(&vm, &mem)?;

        let mut fds = Vec::with_capacity(vcpus as usize);
        for i in 0..vcpus {
            fds.push(
                vm.create_vcpu(u64::from(i))
                    .map_err(kvm_err("KVM_CREATE_VCPU"))?,
            );
        }
        let tsc_khz = fds[0].get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
        let supported = cpuid::supported(kvm).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let params = CpuidParams {
            vcpus,
            tsc_khz,
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
            offers: Vec::new(),
        };
        // CPUID is set once, at start, with every mechanism's offer
        // (`apply_offers`): not here as well.
        for fd in &fds {
            let msrs = Msrs::from_entries(&[
                kvm_msr_entry {
                    index: MSR_IA32_MISC_ENABLE,
                    data: MISC_ENABLE_FAST_STRING,
                    ..Default::default()
                },
                kvm_msr_entry {
                    index: MSR_MTRR_DEF_TYPE,
                    data: MTRR_ENABLE_WB,
                    ..Default::default()
                },
            ])
            .map_err(|_| VmError::Kvm {
                what: "MSR list",
                source: kvm_ioctls::Error::new(libc::E2BIG),
            })?;
            fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        }
        info!(
            guest = name,
            vcpus,
            mem_mib = mem_size >> 20,
            tsc_khz,
            "VM created"
        );

        let writer = LineWriter::new(name, sink);
        let first_output = writer.first_output.clone();
        let rejects = Arc::new(RejectCounters::default());
        let platform = Platform::new(name, new_uart(writer), rejects.clone());
        let shared: Vec<Arc<VcpuShared>> =
            (0..vcpus).map(|i| Arc::new(VcpuShared::new(i))).collect();
        for (v, fd) in shared.iter().zip(&fds) {
            match KvmStats::open(fd) {
                Ok(s) => {
                    let _ = v.kvm_stats.set(s);
                }
                Err(e) => tracing::warn!(guest = name, vcpu = v.index, "no KVM stats: {e}"),
            }
        }
        Ok(Self {
            name: name.to_owned(),
            ctx: None,
            vcpus: shared,
            vm: Arc::new(vm),
            mem,
            rejects,
            vcpu_fds: fds,
            threads: Vec::new(),
            started: None,
            first_output,
            platform: Some(platform),
            nics: Vec::new(),
            cpuid_supported: supported,
            cpuid_params: params,
            mechs: Vec::new(),
            cpuid_stale: true,
            vcpus_returned: Arc::default(),
        })
    }

    /// Attaches a paravirtual mechanism, the one way every mechanism reaches a
    /// guest: offers it in CPUID (its feature bits OR-ed into the features leaf,
    /// its leaf answered, on every vCPU), routes its exiting MMIO to it, and
    /// hands it to the vCPU loop. Only before [`Guest::start`] (KVM takes CPUID
    /// changes before the first run).
    pub fn attach(&mut self, mech: Arc<dyn Mechanism>) -> Result<(), VmError> {
        if self.started.is_some() || self.platform.is_none() {
            return Err(VmError::Mechanism(format!(
                "{}: mechanisms can only be attached before the guest starts",
                mech.name()
            )));
        }
        if let Some(offer) = mech.offer() {
            self.offer(offer);
        }
        if let (Some(dev), Some(p)) = (mech.clone().mmio(), self.platform.as_mut()) {
            p.add_mmio(dev);
        }
        self.mechs.push(mech);
        Ok(())
    }

    /// Rebuilds every vCPU's CPUID with `offer` added.
    /// Records a mechanism's CPUID leaf; [`Guest::start`] sets the vCPUs' CPUID
    /// once with every offer (each KVM_SET_CPUID2 costs about 0.15 ms per
    /// vCPU, and a guest gets half a dozen offers).
    fn offer(&mut self, offer: cpuid::Offer) {
        self.cpuid_params.offers.retain(|o| o.leaf != offer.leaf);
        self.cpuid_params.offers.push(offer);
        self.cpuid_stale = true;
    }

    /// Sets every vCPU's CPUID if it was never set or an offer came since.
    fn apply_offers(&mut self) -> Result<(), VmError> {
        if std::mem::take(&mut self.cpuid_stale) {
            for (i, fd) in self.vcpu_fds.iter().enumerate() {
                set_cpuid(fd, self.cpuid_supported, i as u32, &self.cpuid_params)?;
            }
        }
        Ok(())
    }

    /// The platform, for adding devices before the guest starts.
    pub fn platform_mut(&mut self) -> Option<&mut Platform> {
        self.platform.as_mut()
    }

    /// Loads a PVH kernel, its boot information and ACPI tables; sets up the BSP.
    pub fn boot_pvh(&mut self, cfg: &GuestConfig, ecam: Option<EcamInfo>) -> Result<(), VmError> {
        let loaded = boot::load_kernel(&self.mem, &cfg.kernel)?;
        let ids: Vec<u8> = (0..self.vcpu_fds.len()).map(|i| i as u8).collect();
        let tables = acpi::build(boot::ACPI_BASE, &ids, ecam);
        self.mem
            .write_slice(&tables.bytes, GuestAddress(tables.base))
            .map_err(|e| VmError::GuestWrite(e.to_string()))?;
        boot::write_start_info(&self.mem, &cfg.cmdline, tables.base)?;
        let bsp = &self.vcpu_fds[0];
        let mut sregs = bsp.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        boot::pvh_sregs(&mut sregs);
        bsp.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        bsp.set_regs(&boot::pvh_regs(loaded.entry))
            .map_err(kvm_err("KVM_SET_REGS"))?;
        info!(guest = %cfg.name, entry = format_args!("{:#x}", loaded.entry), end = format_args!("{:#x}", loaded.kernel_end), "kernel loaded");
        Ok(())
    }

    /// The boot processor's fd, for tests that set up their own CPU state.
    #[must_use]
    pub fn bsp(&self) -> Option<&VcpuFd> {
        self.vcpu_fds.first()
    }

    /// Starts one thread per vCPU. `pins[i]`: the host CPU for vCPU i, if pinned.
    pub fn start(&mut self, pins: &[Option<usize>]) -> Result<(), VmError> {
        if self.platform.is_none() {
            return Ok(()); // already started
        }
        self.apply_offers()?;
        let Some(platform) = self.platform.take() else {
            return Ok(());
        };
        for m in &self.mechs {
            m.start(&self.vcpus).map_err(VmError::Thread)?;
        }
        let ctx = Arc::new(GuestCtx::new(
            &self.name,
            Arc::new(platform),
            self.vcpus.clone(),
            self.mechs.clone(),
            self.mem.clone(),
        ));
        self.ctx = Some(ctx.clone());
        self.started = Some(Instant::now());
        for (i, fd) in std::mem::take(&mut self.vcpu_fds).into_iter().enumerate() {
            let me = self.vcpus[i].clone();
            let ctx = ctx.clone();
            let pin = pins.get(i).copied().flatten();
            let returned = self.vcpus_returned.clone();
            let h = std::thread::Builder::new()
                .name(format!("{}-vcpu{i}", self.name))
                .spawn(move || {
                    crate::seccomp::install_or_exit(crate::seccomp::Kind::Vcpu);
                    crate::vcpu::exit::run(fd, &me, &ctx, pin);
                    // Counted before the wake-up: the main loop must see this
                    // vCPU done when the signal wakes it, which the thread's
                    // JoinHandle says only a little later.
                    returned.fetch_add(1, std::sync::atomic::Ordering::Release);
                    // The main loop notices the guest's end now, not at its next tick.
                    crate::mainwake::wake();
                })
                .map_err(VmError::Thread)?;
            self.threads.push(h);
        }
        Ok(())
    }

    /// True once every vCPU thread has returned from its run loop (its
    /// thread may still be ending: [`Guest::join`] waits for that).
    #[must_use]
    pub fn finished(&self) -> bool {
        // A thread that ended without returning (a panic) counts as well.
        self.vcpus_returned
            .load(std::sync::atomic::Ordering::Acquire)
            >= self.threads.len()
            || self.threads.iter().all(JoinHandle::is_finished)
    }

    /// Ends the guest from outside (SIGINT).
    pub fn interrupt(&self) {
        if let Some(ctx) = &self.ctx {
            ctx.end(Outcome::Interrupted);
        }
    }

    /// Ends the guest from outside because of `why` (another guest failed).
    pub fn stop(&self, why: &str) {
        if let Some(ctx) = &self.ctx {
            ctx.end(Outcome::Stopped(why.to_owned()));
        }
    }

    /// Waits for the vCPU threads and reports.
    pub fn join(mut self, shim_start: Instant) -> GuestReport {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for m in &self.mechs {
            m.joined();
        }
        if let Some(ctx) = &self.ctx {
            ctx.platform.finish();
        }
        self.report(shim_start)
    }

    /// The report so far: every counter as it stands (a running guest's
    /// KVM statistics are filled in only when its vCPUs end). `outcome` is
    /// "running" until the guest ends.
    #[must_use]
    pub fn report(&self, shim_start: Instant) -> GuestReport {
        let outcome = match self.outcome() {
            Some(o) => Some(o),
            None if self.started.is_some() && !self.threads.is_empty() => None,
            None => Some(Outcome::Failed("never started".into())),
        };
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| VcpuReport {
                index: v.index,
                host_cpu: v.host_cpu.load(Ordering::Relaxed),
                exits: v.exits.snapshot(),
                shim_exits_total: v.exits.total(),
                kvm: lock(&v.kvm_final).iter().copied().collect(),
                interrupts_injected: v.injected.load(Ordering::Relaxed),
                preempted: v.preempted.load(Ordering::Relaxed),
                preempt_deferred: v.preempt_deferred.load(Ordering::Relaxed),
            })
            .collect();
        let since = |from: Instant, to: Instant| to.duration_since(from).as_secs_f64() * 1e3;
        let main = self
            .ctx
            .as_ref()
            .and_then(|c| c.main_reached.get().copied());
        let first_run = self.ctx.as_ref().and_then(|c| c.first_run.get().copied());
        let mut report = GuestReport {
            name: self.name.clone(),
            exit_status: match outcome {
                Some(Outcome::Exited(s)) => Some(s),
                _ => None,
            },
            outcome: outcome.map_or_else(|| "running".to_owned(), |o| o.to_string()),
            boot_ms: self.first_output.get().map(|&t| since(shim_start, t)),
            boot_to_main_ms: main.map(|(t, _)| since(shim_start, t)),
            boot_to_main_from_run_ms: main.zip(first_run).map(|((t, _), r)| since(r, t)),
            guest_main_us: main.map(|(_, us)| us),
            run_ms: self
                .started
                .map_or(0.0, |s| s.elapsed().as_secs_f64() * 1e3),
            vcpus,
            rejected: self.rejects.snapshot(),
            nics: self.nics.iter().map(nic_report).collect(),
            marks: self.ctx.as_ref().map_or_else(Vec::new, |c| c.marks.kept()),
            marks_dropped: self.ctx.as_ref().map_or(0, |c| c.marks.dropped()),
            ..Default::default()
        };
        for m in &self.mechs {
            m.report(&mut report);
        }
        report.derive_totals();
        report
    }

    /// The outcome so far.
    #[must_use]
    pub fn outcome(&self) -> Option<Outcome> {
        let ctx = self.ctx.as_ref()?;
        lock(&ctx.outcome).clone()
    }
}

fn nic_report(n: &NicInfo) -> NicReport {
    let c = &n.counters;
    NicReport {
        name: n.name.clone(),
        mac: n
            .mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
        tx_packets: c.tx_packets.load(Ordering::Relaxed),
        tx_bytes: c.tx_bytes.load(Ordering::Relaxed),
        rx_packets: c.rx_packets.load(Ordering::Relaxed),
        rx_bytes: c.rx_bytes.load(Ordering::Relaxed),
        queue_notifications: [("rx", 0), ("tx", 1)]
            .iter()
            .map(|&(q, i)| (q.to_owned(), c.notifications[i].load(Ordering::Relaxed)))
            .collect(),
        interrupts: n.msix.delivered.load(Ordering::Relaxed),
        msix_route_changes: n.msix.route_changes.load(Ordering::Relaxed),
        msix_route_changes_deferred: n.msix.route_changes_deferred.load(Ordering::Relaxed),
    }
}
