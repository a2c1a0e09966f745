//! One guest: its KVM VM, memory, vCPUs and devices, from creation to report.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use kvm_bindings::{
    CpuId, KVM_CAP_SPLIT_IRQCHIP, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_enable_cap, kvm_msr_entry,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use tracing::info;
use vm_memory::{Bytes, GuestAddress};

use crate::acpi::{self, EcamInfo};
use crate::boot;
use crate::cpuid::{self, CpuidParams};
use crate::doorbell::manager::{ManagerError, Plan};
use crate::doorbell::{GuestDoorbells, ParaMmio, ParaRegion};
use crate::memory::{self, GuestMem};
use crate::platform::Platform;
use crate::serial::{LineWriter, Sink, new_uart};
use crate::stats::{DoorbellReport, GuestReport, KvmStats, RejectCounters, VcpuReport};
use crate::vcpu::{self, GuestCtx, Outcome, VcpuShared};

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
    #[error("doorbells: {0}")]
    Doorbells(#[from] ManagerError),
    #[error("doorbells need KVM_CAP_READONLY_MEM, which this KVM lacks (use --doorbells off)")]
    NoReadonlyMem,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// What the report needs from one NIC.
pub struct NicInfo {
    pub name: String,
    pub mac: [u8; 6],
    pub counters: Arc<crate::devices::net::NetCounters>,
    pub msix: Arc<crate::pci::msix::Msix>,
    /// PCI device number on bus 0 (what doorbell events name).
    pub pci_device: u8,
    /// Per queue: the eventfd a doorbell notification rings.
    pub doorbell_fds: Vec<vmm_sys_util::eventfd::EventFd>,
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
    /// The para region (M1), when doorbells are offered.
    pub para: Option<Arc<ParaRegion>>,
    /// What the guest's doorbell events do, and their counters (M1).
    pub doorbells: Option<Arc<GuestDoorbells>>,
    /// M2 interrupt-vCPU hints, when offered.
    pub hints: Option<Arc<crate::hints::GuestHints>>,
    /// What KVM supports and what the shim offers, to rebuild CPUID on [`Guest::offer`].
    cpuid_supported: CpuId,
    cpuid_params: CpuidParams,
    /// Handed to the vCPU threads at start.
    exit_hooks: Vec<Arc<dyn vcpu::ExitHook>>,
    /// M3 upcalls, when offered ([`Guest::offer_upcalls`]).
    pub upcalls: Option<Arc<crate::pending::GuestUpcalls>>,
    /// M4 control blocks, when offered (`crate::ctrl::attach`).
    pub ctrl: Option<Arc<crate::ctrl::GuestCtrl>>,
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

    /// Creates the VM, its memory and vCPUs, but loads nothing; no para region.
    pub fn new_bare(
        kvm: &Kvm,
        name: &str,
        mem_size: u64,
        vcpus: u32,
        sink: Sink,
    ) -> Result<Self, VmError> {
        Self::new(kvm, name, mem_size, vcpus, sink, None)
    }

    /// As [`Guest::new_bare`], and with `para` the para region of M1 is mapped
    /// (read-only where the plan says), its kicks bound to ioeventfds, and CPUID
    /// tells the guest where it is.
    pub fn new(
        kvm: &Kvm,
        name: &str,
        mem_size: u64,
        vcpus: u32,
        sink: Sink,
        para: Option<Plan>,
    ) -> Result<Self, VmError> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(VmError::BadVcpuCount(vcpus));
        }
        vcpu::install_kick_handler().map_err(VmError::Signal)?;
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
        let para = para
            .map(|plan| map_para(kvm, &vm, &mem, plan))
            .transpose()?;

        let mut fds = Vec::with_capacity(vcpus as usize);
        for i in 0..vcpus {
            fds.push(
                vm.create_vcpu(u64::from(i))
                    .map_err(kvm_err("KVM_CREATE_VCPU"))?,
            );
        }
        let tsc_khz = fds[0].get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let params = CpuidParams {
            vcpus,
            tsc_khz,
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
            para_region: para.as_ref().map(|p| (p.plan.base, p.plan.size as u32)),
            offers: Vec::new(),
        };
        for (i, fd) in fds.iter().enumerate() {
            set_cpuid(fd, supported.as_slice(), i as u32, &params)?;
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
            para,
            doorbells: None,
            hints: None,
            cpuid_supported: supported,
            cpuid_params: params,
            exit_hooks: Vec::new(),
            upcalls: None,
            ctrl: None,
        })
    }

    /// Offers a further paravirtual mechanism (M2–M5) to the guest: ORs `feature`
    /// into the features leaf and answers `leaf` with `regs`, on every vCPU. Only
    /// before [`Guest::start`] (KVM takes CPUID changes before the first run).
    pub fn offer(&mut self, offer: cpuid::Offer) -> Result<(), VmError> {
        if self.started.is_some() {
            return Err(VmError::Device(
                "mechanisms can only be offered before the guest starts".into(),
            ));
        }
        self.cpuid_params.offers.retain(|o| o.leaf != offer.leaf);
        self.cpuid_params.offers.push(offer);
        for (i, fd) in self.vcpu_fds.iter().enumerate() {
            set_cpuid(
                fd,
                self.cpuid_supported.as_slice(),
                i as u32,
                &self.cpuid_params,
            )?;
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

    /// Connects the guest's doorbell events to `doorbells` and routes exiting
    /// writes to the para region (read-only pages, odd-sized kicks) to it.
    pub fn attach_doorbells(&mut self, doorbells: Arc<GuestDoorbells>) {
        if let (Some(region), Some(p)) = (self.para.clone(), self.platform.as_mut()) {
            p.add_mmio(Arc::new(ParaMmio {
                region,
                guest: doorbells.clone(),
            }));
        }
        self.doorbells = Some(doorbells);
    }

    /// Maps the M3 upcall mailboxes and offers them (before [`Guest::start`]).
    pub fn offer_upcalls(&mut self, delivery: crate::pending::Delivery) -> Result<(), VmError> {
        let (u, offer) =
            crate::pending::GuestUpcalls::new(&self.name, &self.vm, self.vcpus.len(), delivery)
                .map_err(|e| VmError::Device(e.to_string()))?;
        self.offer(offer)?;
        if let Some(h) = &self.hints {
            h.set_upcalls(u.clone());
        }
        self.upcalls = Some(u);
        Ok(())
    }

    /// Runs `hook` after every exit of every vCPU (before [`Guest::start`]).
    pub fn add_exit_hook(&mut self, hook: Arc<dyn vcpu::ExitHook>) {
        self.exit_hooks.push(hook);
    }

    /// The boot processor's fd, for tests that set up their own CPU state.
    #[must_use]
    pub fn bsp(&self) -> Option<&VcpuFd> {
        self.vcpu_fds.first()
    }

    /// Starts one thread per vCPU. `pins[i]`: the host CPU for vCPU i, if pinned.
    pub fn start(&mut self, pins: &[Option<usize>]) -> Result<(), VmError> {
        let Some(platform) = self.platform.take() else {
            return Ok(()); // already started
        };
        let mut ctx = GuestCtx::new(&self.name, Arc::new(platform), self.vcpus.clone());
        ctx.exit_hooks = std::mem::take(&mut self.exit_hooks);
        let ctx = Arc::new(ctx);
        if let Some(d) = &self.doorbells {
            let _ = ctx.doorbells.set(d.clone());
        }
        if let Some(u) = &self.upcalls {
            let _ = ctx.upcalls.set(u.clone());
            u.start(self.vcpus.clone()).map_err(VmError::Thread)?;
        }
        if let Some(c) = &self.ctrl {
            let _ = ctx.ctrl.set(c.clone());
        }
        self.ctx = Some(ctx.clone());
        self.started = Some(Instant::now());
        for (i, fd) in std::mem::take(&mut self.vcpu_fds).into_iter().enumerate() {
            let me = self.vcpus[i].clone();
            let ctx = ctx.clone();
            let pin = pins.get(i).copied().flatten();
            let h = std::thread::Builder::new()
                .name(format!("{}-vcpu{i}", self.name))
                .spawn(move || vcpu::run(fd, &me, &ctx, pin))
                .map_err(VmError::Thread)?;
            self.threads.push(h);
        }
        Ok(())
    }

    /// True once every vCPU thread has returned.
    #[must_use]
    pub fn finished(&self) -> bool {
        self.threads.iter().all(JoinHandle::is_finished)
    }

    /// Ends the guest from outside (SIGINT).
    pub fn interrupt(&self) {
        if let Some(ctx) = &self.ctx {
            ctx.end(Outcome::Interrupted);
        }
    }

    /// Waits for the vCPU threads and reports.
    pub fn join(mut self, shim_start: Instant) -> GuestReport {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(ctx) = &self.ctx {
            ctx.platform.finish();
        }
        let outcome = self
            .outcome()
            .unwrap_or_else(|| Outcome::Failed("never started".into()));
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| VcpuReport {
                index: v.index,
                host_cpu: v.host_cpu.load(Ordering::Relaxed),
                exits: v.exits.snapshot(),
                shim_exits_total: v.exits.total(),
                kvm: v
                    .kvm_final
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .iter()
                    .copied()
                    .collect(),
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
                Outcome::Exited(s) => Some(s),
                _ => None,
            },
            outcome: outcome.to_string(),
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
            doorbell: self.doorbell_report(),
            upcalls: self.upcalls.as_ref().map(|u| u.report()),
            hints: self.hints.as_ref().map(|h| h.report()),
            ctrl: self.ctrl.as_ref().map(|c| c.report()).unwrap_or_default(),
            marks: self.ctx.as_ref().map_or_else(Vec::new, |c| {
                c.marks
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone()
            }),
            ..Default::default()
        };
        report.derive_totals();
        report
    }

    fn doorbell_report(&self) -> DoorbellReport {
        let Some(d) = &self.doorbells else {
            return DoorbellReport::default();
        };
        let s = d.snapshot();
        DoorbellReport {
            offered: self.para.is_some(),
            events: s.events,
            sink_events: s.sink_events,
            fallback_kicks: s.fallback_kicks,
            overflow_drained: s.overflow_drained,
            overflow_notified: s.overflow_notified,
            rejected: s.rejected,
            protected_writes: s.protected_writes,
            notify_bench: d.bench.get().map(|b| b.report()),
        }
    }

    /// The outcome so far.
    #[must_use]
    pub fn outcome(&self) -> Option<Outcome> {
        let ctx = self.ctx.as_ref()?;
        ctx.outcome
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Builds the para region of `plan` and maps it into `vm` after guest RAM's slots.
fn map_para(kvm: &Kvm, vm: &VmFd, mem: &GuestMem, plan: Plan) -> Result<Arc<ParaRegion>, VmError> {
    if !kvm.check_extension(Cap::ReadonlyMem) {
        return Err(VmError::NoReadonlyMem);
    }
    let region = ParaRegion::new(plan)?;
    // Guest RAM uses slots from 0, one per region (memory::register).
    region.register(vm, vm_memory::GuestMemoryBackend::num_regions(mem) as u32)?;
    Ok(Arc::new(region))
}

fn nic_report(n: &NicInfo) -> crate::stats::NicReport {
    let c = &n.counters;
    crate::stats::NicReport {
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
