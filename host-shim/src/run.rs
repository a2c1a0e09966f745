//! Running the guests of one command line to completion.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use tracing::{error, info, warn};

use std::sync::{Arc, Mutex};

use crate::acpi::EcamInfo;
use crate::cli::Cli;
use crate::devices::net::Net;
use crate::doorbell::manager::{ManagerError, Plan, Request, plan};
use crate::doorbell::monitor::{Monitors, RingTask};
use crate::doorbell::{GuestDoorbells, Target};
use crate::hints::IoPlacement;
use crate::pci::bus::PciBus;
use crate::pci::ecam;
use crate::pci::irq::KvmMsiRouter;
use crate::pci::msix::Msix;
use crate::pci::virtio_pci::{self, VirtioPci};
use crate::serial::Sink;
use crate::stats::{self, Report};
use crate::switch::Switch;
use crate::tap::{Tap, TapError};
use crate::vm::{Guest, IOAPIC_PINS, NicInfo, VmError};
use para_abi::doorbell::SourceType;
use para_abi::doorbell::designation::ANY_SOURCE;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot open /dev/kvm: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error("guest {name}: {source}")]
    Guest { name: String, source: VmError },
    #[error("writing {path}: {source}")]
    StatsJson {
        path: String,
        source: std::io::Error,
    },
    #[error("blocking signals failed: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("starting the doorbell monitors failed: {0}")]
    Monitors(std::io::Error),
    #[error("VM queues: {0}")]
    Vmq(#[from] crate::vmq::AttachError),
    #[error("starting the --vcpu-quantum ticker failed: {0}")]
    Quantum(std::io::Error),
}

/// SIGINT and SIGTERM, blocked in every thread and taken synchronously by the main loop.
fn stop_signals() -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is a valid argument for sigemptyset to initialise.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, libc::SIGINT);
        libc::sigaddset(&raw mut set, libc::SIGTERM);
    }
    set
}

fn block_stop_signals() -> std::io::Result<()> {
    let set = stop_signals();
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc =
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::from_raw_os_error(rc))
    }
}

/// Waits up to `timeout` for SIGINT/SIGTERM; true when one arrived.
fn stop_signal_within(timeout: Duration) -> bool {
    let set = stop_signals();
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    // SAFETY: `set` and `ts` are valid; a null siginfo pointer is allowed.
    let sig = unsafe { libc::sigtimedwait(&raw const set, std::ptr::null_mut(), &raw const ts) };
    sig > 0
}

fn host_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// The MAC of guest `i`: locally administered, unicast (IEEE 802 §8.2.2), "EX" + index.
#[must_use]
pub fn guest_mac(i: usize) -> [u8; 6] {
    [0x02, b'E', b'X', 0, (i >> 8) as u8, i as u8]
}

/// Gives guest `g` a virtio-net NIC on `switch`, plugged into `bus`.
fn attach_net(
    g: &mut Guest,
    bus: &mut PciBus,
    switch: &Arc<Switch>,
    index: usize,
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
    let device_hints = g.hints.clone().map(crate::hints::DeviceHints::new);
    net.hints.clone_from(&device_hints);
    if let Some(c) = g.ctrl.clone() {
        net.quiet = Some(Arc::new(move |q| c.nic0_quiet(q)));
    }
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
    let slot = bus
        .add(Arc::new(Mutex::new(dev)))
        .ok_or_else(|| VmError::Device("PCI bus full".into()))?;
    if let Some(h) = &device_hints {
        let _ = h.device.set(slot);
    }
    info!(guest = %g.name, slot, bar = format_args!("{bar:#x}"), "virtio-net attached");
    Ok(NicInfo {
        name: format!("{}-net0", g.name),
        mac,
        counters,
        msix,
        pci_device: slot,
        doorbell_fds,
    })
}

/// Places guest `g`'s I/O threads and counts their interrupts, and with
/// `--hints on` offers it the M2 hints page; returns the threads' placement.
fn offer_hints(g: &mut Guest, cli: &Cli) -> Result<Arc<IoPlacement>, VmError> {
    let io = Arc::new(match (cli.io_cpu_move_after_irqs, cli.io_cpu_move_to) {
        (Some(n), Some(to)) => IoPlacement::with_move_after_irqs(cli.io_cpu, n, to),
        _ => IoPlacement::new(cli.io_cpu),
    });
    let dev = |e: crate::hints::HintsError| VmError::Device(e.to_string());
    let h = crate::hints::GuestHints::new(&g.name, g.vcpus.clone(), io.clone()).map_err(dev)?;
    if cli.hints {
        h.register(&g.vm).map_err(dev)?;
        g.offer(crate::hints::GuestHints::offer())?;
    }
    g.hints = Some(Arc::new(h));
    Ok(io)
}

/// The host CPU whose monitor serves a guest whose boot vCPU runs on `vcpu0`: the
/// next CPU, so that the monitor does not share a CPU with the guest's busiest
/// vCPU (the last CPU when unpinned).
#[must_use]
pub fn monitor_cpu(vcpu0: Option<usize>, ncpus: usize) -> usize {
    let n = ncpus.max(1);
    vcpu0.map_or(n - 1, |c| (c + 1) % n)
}

/// The guest's one designation: any of its vCPUs to the monitor on `cpu`.
/// With `spare`, also a spare range on that CPU (`--doorbell-redesignate`).
fn doorbell_plan(cpu: usize, spare: Option<usize>) -> Result<Plan, ManagerError> {
    if let Some(s) = spare {
        return plan(&crate::doorbell::redesignate::requests(cpu, s));
    }
    plan(&[Request {
        source: SourceType::GuestVcpu,
        source_id: ANY_SOURCE,
        host_cpu: cpu as u32,
    }])
}

/// Connects guest `g`'s doorbell events to its NICs and hands its rings to the
/// monitors of the CPUs its designations name.
fn wire_doorbells(
    g: &mut Guest,
    per_cpu: &mut BTreeMap<usize, Vec<RingTask>>,
    name: &str,
    extra: Vec<Target>,
) -> std::io::Result<()> {
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
        })
        .collect();
    targets.extend(extra);
    let doorbells = Arc::new(GuestDoorbells::new(name, targets));
    g.attach_doorbells(doorbells.clone());
    if let Some(region) = &g.para {
        for (i, d) in region.plan.designations.iter().enumerate() {
            let mut task = RingTask::new(region.clone(), i, doorbells.clone())?;
            if let Some(c) = g.ctrl.clone() {
                task.keep_polling = Some(Arc::new(move || {
                    c.flag_set_anywhere(para_abi::ctrl::Flag::PollDoorbells)
                }));
            }
            per_cpu.entry(d.host_cpu as usize).or_default().push(task);
        }
    }
    Ok(())
}

/// The doorbell test facilities the command line asks for (re-designation,
/// the notification benchmark), after guest `g`'s doorbells are wired.
fn doorbell_tests(cli: &Cli, g: &Guest, vcpus: u32) -> std::io::Result<()> {
    if let (true, Some(d), Some(r)) = (cli.doorbell_redesignate, &g.doorbells, &g.para) {
        let _ = d
            .redesignation
            .set(crate::doorbell::redesignate::Redesignation::new(
                r.clone(),
                Some((g.vm.clone(), vcpus)),
            ));
    }
    if cli.notify_bench {
        crate::doorbell::bench::attach(g)?;
    }
    Ok(())
}

/// Builds, boots and runs every guest; returns the report once all have ended.
#[allow(clippy::too_many_lines)] // one linear set-up: each guest, then each mechanism it is offered
pub fn run(cli: &Cli, shim_start: Instant) -> Result<Report, RunError> {
    block_stop_signals().map_err(RunError::Signals)?;
    let kvm = Kvm::new().map_err(RunError::Kvm)?;
    let ncpus = host_cpus();
    let switch = Arc::new(Switch::default());
    let tap = cli
        .tap
        .as_deref()
        .map(|name| Tap::attach(name, &switch))
        .transpose()?;
    let mut guests = Vec::with_capacity(cli.guests.len());
    let counts: Vec<u32> = cli.guests.iter().map(|g| g.vcpus).collect();
    let mut placement = cli.pin.placement(&counts, ncpus).into_iter();
    let mut per_cpu: BTreeMap<usize, Vec<RingTask>> = BTreeMap::new();
    let mut io_placements = Vec::new();
    let mut vmq = crate::vmq::Setup::default();
    for cfg in &cli.guests {
        let err = |source| RunError::Guest {
            name: cfg.name.clone(),
            source,
        };
        let pins: Vec<Option<usize>> = placement.next().unwrap_or_default();
        let cpu = monitor_cpu(pins.first().copied().flatten(), ncpus);
        let para = if cli.doorbells {
            let spare = cli.doorbell_redesignate.then_some((cpu + 1) % ncpus.max(1));
            Some(doorbell_plan(cpu, spare).map_err(|e| err(e.into()))?)
        } else {
            None
        };
        let mut g =
            Guest::new(&kvm, &cfg.name, cfg.mem, cfg.vcpus, Sink::Stdout, para).map_err(err)?;
        if let Some(ns) = cli.halt_poll_ns {
            g.set_halt_poll_ns(ns);
        }
        io_placements.push(offer_hints(&mut g, cli).map_err(err)?);
        if cli.shadow_flags {
            match crate::ctrl::attach(&kvm, &mut g) {
                Ok(c) => g.ctrl = Some(c),
                Err(e) => warn!(guest = %cfg.name, "shadowed control flags not offered: {e}"),
            }
        }
        let mut bus = PciBus::new(&cfg.name, g.rejects.clone());
        if !cli.no_net {
            let nic = attach_net(&mut g, &mut bus, &switch, guests.len()).map_err(err)?;
            g.nics.push(nic);
        }
        let bus = Arc::new(bus);
        if let Some(p) = g.platform_mut() {
            p.add_pio(bus.clone());
            p.add_mmio(bus.clone());
        }
        // Upcalls first: VM-queue arrivals are delivered through them when offered.
        if cli.upcalls != crate::pending::Delivery::Off {
            g.offer_upcalls(cli.upcalls).map_err(err)?;
        }
        let extra = if cli.vmq {
            vmq.attach(&mut g, cli.doorbells)?
        } else {
            Vec::new()
        };
        wire_doorbells(&mut g, &mut per_cpu, &cfg.name, extra).map_err(RunError::Monitors)?;
        doorbell_tests(cli, &g, cfg.vcpus).map_err(RunError::Monitors)?;
        let ecam = EcamInfo {
            base: ecam::ECAM_BASE,
            start_bus: 0,
            end_bus: (ecam::BUSES - 1) as u8,
        };
        g.boot_pvh(cfg, Some(ecam)).map_err(err)?;
        guests.push((g, pins));
    }
    let monitors = Monitors::start(
        per_cpu.into_iter().collect(),
        crate::doorbell::monitor::SpinBudget::new(
            Duration::from_micros(cli.doorbell_spin_us),
            Duration::from_micros(cli.doorbell_spin_max_us),
        ),
        cli.doorbell_spin_class,
    )
    .map_err(RunError::Monitors)?;
    let mut running = Vec::with_capacity(guests.len());
    for (mut g, pins) in guests {
        g.start(&pins).map_err(|source| RunError::Guest {
            name: g.name.clone(),
            source,
        })?;
        running.push(g);
    }
    info!(guests = running.len(), "all guests started");
    let ticker = match cli.vcpu_quantum {
        Some(ms) => {
            let vcpus: Vec<_> = running.iter().flat_map(|g| g.vcpus.clone()).collect();
            if vcpus.len() <= ncpus {
                warn!(
                    vcpus = vcpus.len(),
                    host_cpus = ncpus,
                    "--vcpu-quantum with no more vCPUs than host CPUs: the slices only cost exits"
                );
            }
            Some(
                crate::quantum::Ticker::start(Duration::from_millis(ms), vcpus)
                    .map_err(RunError::Quantum)?,
            )
        }
        None => None,
    };
    if let (Some(ms), Some(cpu)) = (cli.io_cpu_move_after_ms, cli.io_cpu_move_to) {
        crate::hints::schedule_move(io_placements, Duration::from_millis(ms), cpu);
    }

    let deadline = (cli.timeout > 0).then(|| Instant::now() + Duration::from_secs(cli.timeout));
    loop {
        if running.iter().all(Guest::finished) {
            break;
        }
        if stop_signal_within(Duration::from_millis(50)) {
            info!("stop signal: shutting all guests down");
            running.iter().for_each(Guest::interrupt);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            error!("--timeout {}s reached: stopping all guests", cli.timeout);
            running.iter().for_each(Guest::interrupt);
        }
    }
    if let Some(t) = ticker {
        t.stop();
    }
    // The monitors' last pass and kick counts land before the guests report.
    let monitors = monitors.shutdown();
    let mut guests: Vec<_> = running.into_iter().map(|g| g.join(shim_start)).collect();
    vmq.finish(&mut guests);
    let report = Report {
        guests,
        shim_max_rss_kib: stats::max_rss_kib(),
        switch: switch.counters(),
        tap: tap.map(Tap::finish),
        monitors,
    };
    if let Some(path) = &cli.stats_json {
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        std::fs::write(path, text).map_err(|source| RunError::StatsJson {
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(report)
}

/// The process exit code for a finished run: 0 when every guest exited with 0.
#[must_use]
pub fn exit_code(report: &Report) -> i32 {
    i32::from(!report.guests.iter().all(|g| g.exit_status == Some(0)))
}
