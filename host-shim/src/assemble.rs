//! Assembling the guests of one command line: each guest's VM, its NIC on the
//! shared switch, and every mechanism the command line offers it, built and
//! handed to the guest through `Guest::attach`; then the threads shared by
//! all guests (the doorbell monitors).
//!
//! The one place that knows which mechanism needs which other: M2 hints and
//! M4 quiet flags reach the NIC, M3 announces M1 re-designations, M2 hints and
//! M5 arrivals, M4's poll flag keeps the M1 monitors polling, and M5's outbox
//! is a doorbell target of M1.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::{Cap, Kvm};
use para_abi::doorbell::designation::ANY_SOURCE;
use para_abi::doorbell::{Event, Op, SourceType};
use para_abi::region::Route;
use tracing::{info, warn};
use vm_memory::GuestMemoryBackend;

use crate::cli::{Cli, RxHandoff};
use crate::devices::net::Net;
use crate::devices::serial::Sink;
use crate::devices::switch::{DirectRx, Switch};
use crate::devices::tap::TapError;
use crate::kvm::acpi::EcamInfo;
use crate::mech::Upcaller;
use crate::mech::ctrl::{CtrlError, GuestCtrl};
use crate::mech::direct::{Channels, DirectError};
use crate::mech::doorbell::bench::NotifyBench;
use crate::mech::doorbell::host_lane::HostLane;
use crate::mech::doorbell::manager::{ManagerError, ParaRegion, Plan, Request, plan};
use crate::mech::doorbell::monitor::{Monitors, RingTask, SpinBudget};
use crate::mech::doorbell::redesignate::{self, Redesignation};
use crate::mech::doorbell::{CallTarget, Doorbells, GuestDoorbells, InlineWork, Target};
use crate::mech::hints::{DeviceHints, GuestHints, HintsError, IoPlacement};
use crate::mech::quantum::Quantum;
use crate::mech::upcalls::{Delivery, GuestUpcalls, Upcalls};
use crate::mech::vmq::{self, AttachError};
use crate::pci::bus::PciBus;
use crate::pci::ecam;
use crate::pci::irq::KvmMsiRouter;
use crate::pci::msix::Msix;
use crate::pci::virtio_pci::{self, VirtioPci};
use crate::vm::{Guest, GuestConfig, IOAPIC_PINS, NicInfo, VmError};

/// Why a guest (or the threads shared by the guests) could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("guest {name}: {source}")]
    Guest { name: String, source: VmError },
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("starting the doorbell monitors failed: {0}")]
    Monitors(std::io::Error),
    #[error("VM queues: {0}")]
    Vmq(#[from] AttachError),
    #[error("direct channels: {0}")]
    Direct(#[from] DirectError),
    #[error(transparent)]
    Gdb(#[from] crate::gdb::GdbError),
}

/// The MAC of guest `i`: locally administered, unicast (IEEE 802 §8.2.2), "EX" + index.
#[must_use]
pub fn guest_mac(i: usize) -> [u8; 6] {
    [0x02, b'E', b'X', 0, (i >> 8) as u8, i as u8]
}

/// The host CPU whose monitor serves a guest whose boot vCPU runs on `vcpu0`: the
/// next CPU, so that the monitor does not share a CPU with the guest's busiest
/// vCPU (the last CPU when unpinned).
#[must_use]
pub fn monitor_cpu(vcpu0: Option<usize>, ncpus: usize) -> usize {
    let n = ncpus.max(1);
    vcpu0.map_or(n - 1, |c| (c + 1) % n)
}

/// The guest's designations: any of its vCPUs to the monitor on `cpu`. With
/// `spare`, also a spare range on that CPU (`--doorbell-redesignate`); with
/// `nic_cpu` (another CPU), a second vCPU range on that CPU's monitor for
/// its NIC queues (`--doorbell-nic-cpu`); with `host_range`, a range on `cpu`
/// for other host threads' events (`--rx-handoff monitor`), after the
/// guest's own.
fn doorbell_plan(
    cpu: usize,
    spare: Option<usize>,
    nic_cpu: Option<usize>,
    host_range: bool,
) -> Result<Plan, ManagerError> {
    let any = |cpu: usize| Request {
        source: SourceType::GuestVcpu,
        source_id: ANY_SOURCE,
        host_cpu: cpu as u32,
    };
    let mut requests = match spare {
        Some(s) => redesignate::requests(cpu, s),
        None => vec![any(cpu)],
    };
    if let Some(n) = nic_cpu.filter(|&n| n != cpu) {
        requests.push(any(n));
    }
    if host_range {
        requests.push(Request {
            source: SourceType::HostCpu,
            source_id: ANY_SOURCE,
            host_cpu: cpu as u32,
        });
    }
    plan(&requests)
}

/// Builds the para region of `plan` and maps it into guest `g` after its RAM's
/// slots; its kick addresses are bound later (`ParaRegion::bind_kicks`).
fn map_para(kvm: &Kvm, g: &Guest, plan: Plan) -> Result<Arc<ParaRegion>, VmError> {
    if !kvm.check_extension(Cap::ReadonlyMem) {
        return Err(VmError::Mechanism(
            "doorbells need KVM_CAP_READONLY_MEM, which this KVM lacks (use --doorbells off)"
                .into(),
        ));
    }
    let doorbells = |e: ManagerError| VmError::Mechanism(format!("doorbells: {e}"));
    let region = ParaRegion::new(plan).map_err(doorbells)?;
    // Guest RAM uses slots from 0, one per region (kvm::memory::register).
    region
        .register(&g.vm, g.mem.num_regions() as u32)
        .map_err(doorbells)?;
    Ok(Arc::new(region))
}

/// Gives guest `g` a virtio-net NIC on `switch`, plugged into `bus`, with M2
/// hints for its queues and, when offered, M4's quiet flags before its MSIs.
fn attach_net(
    g: &Guest,
    bus: &mut PciBus,
    switch: &Arc<Switch>,
    (index, inline_run): (usize, bool),
    hints: &Arc<GuestHints>,
    ctrl: Option<&Arc<GuestCtrl>>,
) -> Result<NicInfo, VmError> {
    let io = |e: std::io::Error| VmError::Device(e.to_string());
    let mac = guest_mac(index);
    let mut net = Net::new(
        &format!("{}-net0", g.name),
        mac,
        switch.clone(),
        g.rejects.clone(),
    )
    .map_err(io)?;
    let device_hints = DeviceHints::new(hints.clone());
    net.hints = Some(device_hints.clone());
    if let Some(c) = ctrl.cloned() {
        let (w, t) = (c.clone(), c.clone());
        let stamps = c.latency_stamps.load(std::sync::atomic::Ordering::Relaxed);
        net.quiet = Some(Arc::new(move |q| c.nic0_quiet(q)));
        net.rx_work = Some(Arc::new(move || w.nic0_rx_work()));
        if stamps {
            net.tx_popped = Some(Arc::new(move || t.nic0_tx_popped()));
        }
    }
    net.run_to_completion = inline_run;
    let rx_post = net.rx_post.clone();
    let switch_port = net.port_index();
    let inline = net.inline.clone();
    let counters = net.counters.clone();
    let router = Arc::new(KvmMsiRouter::new(g.vm.clone(), IOAPIC_PINS));
    // One vector per queue plus one for configuration changes.
    let msix = Arc::new(Msix::new(3, router).map_err(|e| VmError::Device(e.to_string()))?);
    let bar = bus
        .allocate_bar(virtio_pci::BAR_SIZE)
        .ok_or_else(|| VmError::Device("BAR window full".into()))?;
    let dev = VirtioPci::new(
        &format!("{}-net0", g.name),
        Box::new(net),
        msix.clone(),
        g.mem.clone(),
        Some(g.vm.clone()),
        bar,
    )
    .map_err(io)?;
    let doorbell_fds = dev.doorbell_fds();
    if let Some(c) = ctrl {
        // A wait that carries a TX notification: run the TX queue on the
        // waiting vCPU's thread when the NIC runs to completion, else wake its
        // worker as the queue's doorbell would.
        let wake = doorbell_fds.get(1).and_then(|f| f.try_clone().ok());
        let run = inline.clone();
        c.set_nic0_tx(Arc::new(move || {
            if !(inline_run && run.run(crate::devices::net::TX as u16))
                && let Some(fd) = &wake
            {
                let _ = fd.write(1);
            }
        }));
    }
    let slot = bus
        .add(Arc::new(Mutex::new(dev)))
        .ok_or_else(|| VmError::Device("PCI bus full".into()))?;
    let _ = device_hints.device.set(slot);
    info!(guest = %g.name, slot, bar = format_args!("{bar:#x}"), "virtio-net attached");
    Ok(NicInfo {
        name: format!("{}-net0", g.name),
        mac,
        counters,
        msix,
        pci_device: slot,
        doorbell_fds,
        inline: inline_run.then_some(inline),
        switch_port,
        rx_post,
    })
}

/// M2: places guest `g`'s I/O threads and counts their interrupts and, with
/// `--hints on`, maps the hints page (offered when attached).
fn hints(g: &Guest, cli: &Cli) -> Result<Arc<GuestHints>, VmError> {
    let io = Arc::new(match (cli.io_cpu_move_after_irqs, cli.io_cpu_move_to) {
        (Some(n), Some(to)) => IoPlacement::with_move_after_irqs(cli.io_cpu, n, to),
        _ => IoPlacement::new(cli.io_cpu),
    });
    let dev = |e: HintsError| VmError::Device(e.to_string());
    let h = GuestHints::new(&g.name, g.vcpus.clone(), io).map_err(dev)?;
    if cli.hints {
        h.register(&g.vm).map_err(dev)?;
    }
    Ok(Arc::new(h))
}

/// M4: maps guest `g`'s control blocks. Needs `KVM_CAP_READONLY_MEM`.
fn ctrl(kvm: &Kvm, g: &Guest, stamps: bool) -> Result<Arc<GuestCtrl>, CtrlError> {
    if !kvm.check_extension(Cap::ReadonlyMem) {
        return Err(CtrlError::NoReadonlyMem);
    }
    let c = GuestCtrl::new(&g.name, g.vcpus.len() as u32)?;
    c.register(&g.vm)?;
    c.latency_stamps
        .store(stamps, std::sync::atomic::Ordering::Relaxed);
    Ok(Arc::new(c))
}

/// M3: maps guest `g`'s upcall mailboxes, delivered the `delivery` way;
/// `test_calls` answers its test-only hypercalls (`--test-hypercalls`).
///
/// # Errors
/// When the mailboxes cannot be mapped or the guest has too many vCPUs.
pub fn upcalls(
    g: &mut Guest,
    delivery: Delivery,
    test_calls: bool,
) -> Result<Arc<GuestUpcalls>, VmError> {
    let u = GuestUpcalls::new(&g.name, &g.vm, g.vcpus.len(), delivery)
        .map_err(|e| VmError::Device(e.to_string()))?;
    if test_calls {
        u.allow_test_calls();
    }
    g.attach(Arc::new(Upcalls(u.clone())))?;
    Ok(u)
}

/// How another mechanism posts guest-wide upcalls through guest `g`'s M3.
fn upcaller(u: &Arc<GuestUpcalls>) -> Upcaller {
    Upcalls(u.clone()).upcaller()
}

/// The per-run state the guests' assembly shares.
pub struct Assembly {
    pub switch: Arc<Switch>,
    ncpus: usize,
    /// Each host CPU's doorbell rings, for its monitor.
    per_cpu: BTreeMap<usize, Vec<RingTask>>,
    /// Every guest's I/O-thread placement, for a run-time move.
    pub io_placements: Vec<Arc<IoPlacement>>,
    pub vmq: vmq::Setup,
    /// Direct channels, and the VM of every guest that joined them.
    direct: Arc<Channels>,
    direct_vms: Vec<(u32, Arc<kvm_ioctls::VmFd>)>,
}

impl Assembly {
    #[must_use]
    pub fn new(switch: Arc<Switch>, ncpus: usize) -> Self {
        Self {
            switch,
            ncpus,
            per_cpu: BTreeMap::new(),
            io_placements: Vec::new(),
            vmq: vmq::Setup::default(),
            direct: Arc::default(),
            direct_vms: Vec::new(),
        }
    }

    /// Builds guest `index` of the command line, attaches every mechanism the
    /// command line offers, and loads its kernel. `pins`: its vCPUs' host CPUs.
    #[allow(clippy::too_many_lines)] // one linear set-up: the guest, then each mechanism it is offered
    pub fn guest(
        &mut self,
        kvm: &Kvm,
        cli: &Cli,
        cfg: &GuestConfig,
        index: usize,
        pins: &[Option<usize>],
    ) -> Result<Guest, AssembleError> {
        let err = |source| AssembleError::Guest {
            name: cfg.name.clone(),
            source,
        };
        let cpu = if matches!(cli.pin, crate::cli::PinPolicy::Sidecore) {
            self.ncpus.max(1) - 1
        } else {
            monitor_cpu(pins.first().copied().flatten(), self.ncpus)
        };
        let plan = if cli.doorbells {
            let spare = cli
                .doorbell_redesignate
                .then_some((cpu + 1) % self.ncpus.max(1));
            let host_range = cli.run_to_completion && cli.rx_handoff == RxHandoff::Monitor;
            if let Some(n) = cli.doorbell_nic_cpu
                && n >= self.ncpus.max(1)
            {
                return Err(err(VmError::Mechanism(format!(
                    "--doorbell-nic-cpu {n}: this host has {} CPUs (0 to {})",
                    self.ncpus.max(1),
                    self.ncpus.max(1) - 1
                ))));
            }
            Some(
                doorbell_plan(cpu, spare, cli.doorbell_nic_cpu, host_range)
                    .map_err(|e| err(VmError::Mechanism(format!("doorbells: {e}"))))?,
            )
        } else {
            None
        };
        let mut g = Guest::new(kvm, &cfg.name, cfg.mem, cfg.vcpus, Sink::Stdout).map_err(err)?;
        if let Some(ns) = cli.halt_poll_ns {
            g.set_halt_poll_ns(ns);
        }
        let para = plan
            .map(|p| map_para(kvm, &g, p))
            .transpose()
            .map_err(err)?;

        // M2, M4: before the NIC, which uses both.
        let hints = hints(&g, cli).map_err(err)?;
        self.io_placements.push(hints.io.clone());
        g.attach(hints.clone()).map_err(err)?;
        let ctrl = if cli.shadow_flags {
            match ctrl(kvm, &g, cli.latency_stamps) {
                Ok(c) => {
                    g.attach(c.clone()).map_err(err)?;
                    Some(c)
                }
                Err(e) => {
                    warn!(guest = %cfg.name, "shadowed control flags not offered: {e}");
                    None
                }
            }
        } else {
            None
        };

        // M3 before M5 and M1: VM-queue arrivals, hints and re-designations are
        // announced through it when offered.
        let upcall = if cli.upcalls == Delivery::Off {
            None
        } else {
            let u = upcaller(&upcalls(&mut g, cli.upcalls, cli.test_hypercalls).map_err(err)?);
            hints.set_upcaller(u.clone());
            Some(u)
        };
        let mut calls = Vec::new();
        let extra = if cli.vmq {
            let (q, targets) =
                self.vmq
                    .attach(&cfg.name, &g.vm, &g.mem, upcall.clone(), cli.doorbells)?;
            if cli.direct {
                calls.push(self.direct(&mut g, q.id, upcall.clone())?);
            }
            g.attach(q).map_err(err)?;
            targets
        } else {
            Vec::new()
        };
        // Devices after every mechanism's memory slots: a slot added after an
        // irqfd or ioeventfd waits for an SRCU grace period (5-15 ms each).
        let mut bus = PciBus::new(&cfg.name, g.rejects.clone());
        if !cli.no_net {
            let nic = attach_net(
                &g,
                &mut bus,
                &self.switch,
                (index, cli.run_to_completion),
                &hints,
                ctrl.as_ref(),
            )
            .map_err(err)?;
            if let Some(r) = &para {
                // Claim 5: the guest picks, per NIC queue, the range of the
                // host CPU that serves it.
                let serves = cli.doorbell_nic_cpu.unwrap_or(cpu) as u32;
                let routes: Vec<Route> = [crate::devices::net::RX, crate::devices::net::TX]
                    .iter()
                    .map(|&q| Route {
                        device: nic.pci_device,
                        queue: q as u16,
                        host_cpu: serves,
                    })
                    .collect();
                r.control().set_routes(&routes);
            }
            if let Some(lane) = para
                .as_ref()
                .and_then(|r| HostLane::open(r, SourceType::HostCpu))
            {
                // `--rx-handoff monitor`: frames for this NIC become an event
                // for its RX queue in the host-written range.
                let lane = Arc::new(lane);
                let event = Event::new(nic.pci_device, crate::devices::net::RX as u16, Op::Notify);
                let post: DirectRx = Arc::new(move || lane.post(event));
                let _ = nic.rx_post.set(post);
            }
            g.nics.push(nic);
        }
        let bus = Arc::new(bus);
        if let Some(p) = g.platform_mut() {
            p.add_pio(bus.clone());
            p.add_mmio(bus.clone());
        }
        if let Some(r) = &para {
            r.bind_kicks(&g.vm)
                .map_err(|e| err(VmError::Mechanism(format!("doorbells: {e}"))))?;
        }
        let (doorbells, para) = self
            .doorbells(cli, &g, para, extra, calls, ctrl.as_ref())
            .map_err(AssembleError::Monitors)?;
        g.attach(Arc::new(Doorbells::new(doorbells, para, upcall)))
            .map_err(err)?;

        // `--gdb`: after the others, so that a stopped vCPU parks right
        // before its entry, once every other mechanism has looked.
        if let Some(spec) = &cli.gdb
            && spec
                .pick(cli.guests.iter().map(|c| c.name.as_str()))
                .map_err(crate::gdb::GdbError::Usage)?
                == index
        {
            let d = crate::gdb::Debugger::listen(
                &cfg.name,
                &cfg.kernel,
                spec.port,
                cfg.vcpus,
                g.mem.clone(),
            )?;
            g.attach(Arc::new(d)).map_err(err)?;
        }

        // Last: its yield comes after every other mechanism's exit hook.
        if cli.vcpu_quantum.is_some() {
            g.attach(Arc::new(Quantum)).map_err(err)?;
        }

        let ecam = EcamInfo {
            base: ecam::ECAM_BASE,
            start_bus: 0,
            end_bus: (ecam::BUSES - 1) as u8,
        };
        g.boot_pvh(cfg, Some(ecam)).map_err(err)?;
        Ok(g)
    }

    /// Direct channels: guest `g` (VM-queue id `id`) gets one to every guest
    /// that joined before it; returns the doorbell device its wake-up
    /// requests arrive on.
    fn direct(
        &mut self,
        g: &mut Guest,
        id: u32,
        upcall: Option<Upcaller>,
    ) -> Result<CallTarget, AssembleError> {
        let peers: Vec<(u32, &kvm_ioctls::VmFd)> =
            self.direct_vms.iter().map(|(i, vm)| (*i, &**vm)).collect();
        let wake = vmq::arrival_notify(&g.vm, upcall);
        let d = Arc::new(self.direct.join(&g.name, id, &g.vm, &peers, wake)?);
        self.direct_vms.push((id, g.vm.clone()));
        self.vmq.manager.set_direct(id);
        let target = d.wake_target();
        g.attach(d).map_err(|source| AssembleError::Guest {
            name: g.name.clone(),
            source,
        })?;
        Ok(target)
    }

    /// M1: guest `g`'s doorbell side for its NICs and `extra` targets, its rings
    /// handed to the monitors of the CPUs its designations name, and the test
    /// facilities the command line asks for (re-designation, the benchmark).
    fn doorbells(
        &mut self,
        cli: &Cli,
        g: &Guest,
        para: Option<Arc<ParaRegion>>,
        extra: Vec<Target>,
        calls: Vec<CallTarget>,
        ctrl: Option<&Arc<GuestCtrl>>,
    ) -> std::io::Result<(Arc<GuestDoorbells>, Option<Arc<ParaRegion>>)> {
        let mut targets: Vec<Target> = g
            .nics
            .iter()
            .map(|n| Target {
                device: n.pci_device,
                queues: n
                    .doorbell_fds
                    .iter()
                    .filter_map(|f| f.try_clone().ok())
                    .collect(),
                inline: n.inline.clone().map(|i| {
                    let run: InlineWork = Arc::new(move |q| i.run(q));
                    run
                }),
            })
            .collect();
        targets.extend(extra);
        let doorbells = Arc::new(GuestDoorbells::new(&g.name, targets).with_calls(calls));
        if let Some(region) = &para {
            for (i, d) in region.plan.designations.iter().enumerate() {
                let mut task = RingTask::new(region.clone(), i, doorbells.clone())?;
                if let Some(c) = ctrl.cloned() {
                    task.keep_polling = Some(Arc::new(move || {
                        c.flag_set_anywhere(para_abi::ctrl::Flag::PollDoorbells)
                    }));
                }
                self.per_cpu
                    .entry(d.host_cpu as usize)
                    .or_default()
                    .push(task);
            }
        }
        if let (true, Some(r)) = (cli.doorbell_redesignate, &para) {
            let _ = doorbells.redesignation.set(Redesignation::new(
                r.clone(),
                Some((g.vm.clone(), g.vcpus.len() as u32)),
            ));
        }
        if cli.notify_bench {
            if para.is_none() {
                return Err(std::io::Error::other("--notify-bench needs --doorbells on"));
            }
            let _ = doorbells
                .bench
                .set(NotifyBench::start(&g.name, g.mem.clone(), &g.vm)?);
        }
        Ok((doorbells, para))
    }

    /// Starts one doorbell monitor per host CPU that has rings (after every
    /// guest is assembled).
    pub fn start_monitors(&mut self, cli: &Cli) -> Result<Monitors, AssembleError> {
        Monitors::start(
            std::mem::take(&mut self.per_cpu).into_iter().collect(),
            SpinBudget::new(
                Duration::from_micros(cli.doorbell_spin_us),
                Duration::from_micros(cli.doorbell_spin_max_us),
            ),
            cli.doorbell_spin_class,
        )
        .map_err(AssembleError::Monitors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbell_plans_add_a_nic_range_and_a_host_range_after_the_guests_own() {
        let sources = |p: &Plan| -> Vec<(SourceType, u32, u32)> {
            p.designations
                .iter()
                .map(|d| (d.source, d.source_id, d.host_cpu))
                .collect()
        };
        let any = |cpu| (SourceType::GuestVcpu, ANY_SOURCE, cpu);
        assert_eq!(
            sources(&doorbell_plan(1, None, None, false).unwrap()),
            [any(1)]
        );
        // The NIC's CPU is the guest's own: one range serves both.
        assert_eq!(
            sources(&doorbell_plan(1, None, Some(1), false).unwrap()),
            [any(1)]
        );
        let p = doorbell_plan(1, None, Some(0), true).unwrap();
        assert_eq!(
            sources(&p),
            [any(1), any(0), (SourceType::HostCpu, ANY_SOURCE, 1)]
        );
        assert!(p.designations[2].kick_gpa == 0 && !p.designations[2].guest_writes());
        // With a spare range (re-designation) first: the ranges it swaps stay
        // at 0 and 1.
        let p = doorbell_plan(1, Some(0), Some(0), false).unwrap();
        assert_eq!(p.designations.len(), 3);
        assert_eq!(sources(&p)[0], any(1));
        assert_eq!(sources(&p)[2], any(0));
    }
}
