//! Networking in the guest: a smoltcp interface on a virtio-net NIC, fed
//! from ring 3. The NIC's RX vector wakes the stack (interrupt mode) or the
//! stack busy-polls the used ring (poll mode); a timer at smoltcp's `poll_at`
//! drives retransmissions and ARP.
//!
//! Kernel command line: `ip=10.0.0.2/24`, `gw=10.0.0.1`, `dhcp` (instead of
//! `ip=`), `net.rx=poll|irq` (default irq), `net.irq_cpu=N` (where the NIC's
//! interrupts go; default: the CPU that opens it), `net.notify=doorbell|trap`
//! (how the NIC learns of new buffers; default: doorbells when the shim
//! offers them, the virtio notify register otherwise), `net.tx_irq=on`
//! (take TX-completion interrupts; off by default: completions are reaped on
//! the send path, so the TX vector stays masked and costs no interrupt),
//! `hints=off|on` (interrupt-vCPU hints, M2: where offered they are followed
//! by default unless `net.irq_cpu=` is given; `on` follows them even then,
//! `off` never).
//!
//! A second NIC type (M5): `net.dev=vmq net.vmq_peer=NAME` carries the
//! Ethernet frames over VM queues to the guest the shim calls NAME
//! (`drivers::vmq_net` over `rt::vmq_link`) instead of a virtio-net device;
//! every frame, broadcasts included, goes to that one peer. `net.vmq_policy=
//! lazy|immediate|doorbell` (default lazy: one flush exit per stack poll
//! that sent anything). `net.dev=virtio` is the default.

use super::start::system;
use super::time::Instant;
use super::virtio::{KernelHal, KernelPciAccess, find_net_devices};
use super::{irq, smp};
use crate::abi::vector;
use crate::cmdline::Cmdline;
use crate::percpu;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use drivers::msix::{ApicId, MsiMessage, MsixError, Vector};
use drivers::net::{NetDevice, NetStats, RX_QUEUE, RxMode, TX_QUEUE};
use drivers::virtio_pci::{MsixControl, MsixPciTransport, TransportError, VectorPlan};
use drivers::vmq_net::VmqNet;
use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::socket::{dhcpv4, tcp, udp};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address, Ipv4Cidr};

/// NICs this kernel drives at most (two vectors each from `DEVICE_BASE`).
pub const MAX_NICS: usize = 8;

type Device = NetDevice<KernelHal, MsixPciTransport>;

#[derive(Debug)]
pub enum NetError {
    NoDevice(usize),
    Config(&'static str),
    Transport(TransportError),
    Driver(drivers::net::NetError),
    /// The device answered NO_VECTOR for a queue vector (virtio 1.2 §4.1.5.1.2).
    VectorRejected {
        rejected: u16,
    },
    NoSuchCpu(usize),
    /// Doorbells were asked for and cannot be had.
    Doorbell(super::doorbell::DoorbellError),
    /// `net.dev=vmq`: the VM-queue link could not be opened.
    Vmq(super::vmq_link::LinkOpenError),
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoDevice(i) => write!(f, "no virtio-net device #{i} on the PCI bus"),
            Self::Config(m) => write!(f, "network configuration: {m}"),
            Self::Transport(e) => write!(f, "{e}"),
            Self::Driver(e) => write!(f, "{e}"),
            Self::VectorRejected { rejected } => {
                write!(f, "the device rejected {rejected} MSI-X queue vector(s)")
            }
            Self::NoSuchCpu(c) => write!(f, "no CPU {c} is online to take the NIC's interrupts"),
            Self::Doorbell(e) => write!(f, "net.notify=doorbell: {e}"),
            Self::Vmq(e) => write!(f, "net.dev=vmq: {e}"),
        }
    }
}

/// How to configure a NIC.
#[derive(Clone, Copy, Debug)]
pub struct NetConfig {
    pub address: Option<Ipv4Cidr>,
    pub gateway: Option<Ipv4Address>,
    pub dhcp: bool,
    pub rx_mode: RxMode,
    /// CPU the NIC's interrupts are sent to.
    pub irq_cpu: usize,
    /// How queue notifications travel.
    pub notify: Notify,
    /// Take TX-completion interrupts (the TX vector is masked otherwise).
    pub tx_irq: bool,
}

/// How the driver tells the device about new buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notify {
    /// Doorbells when the shim offers them, the notify register otherwise.
    Auto,
    /// Exitless doorbells (M1); opening the NIC fails where there are none.
    Doorbell,
    /// The virtio notify register (a trap: ioeventfd or MMIO exit).
    Trap,
}

impl NetConfig {
    /// Reads `ip=`, `gw=`, `dhcp`, `net.rx=` and `net.irq_cpu=`.
    pub fn from_cmdline(c: &Cmdline<'_>) -> Result<Self, NetError> {
        let address = c
            .get("ip")
            .map(|s| {
                s.parse::<Ipv4Cidr>()
                    .map_err(|()| NetError::Config("ip= wants an IPv4 CIDR like 10.0.0.2/24"))
            })
            .transpose()?;
        let gateway = c
            .get("gw")
            .map(|s| {
                s.parse::<Ipv4Address>()
                    .map_err(|_| NetError::Config("gw= wants an IPv4 address"))
            })
            .transpose()?;
        let rx_mode = match c.get("net.rx") {
            None | Some("irq") => RxMode::Interrupt,
            Some("poll") => RxMode::Poll,
            Some(_) => return Err(NetError::Config("net.rx= takes poll or irq")),
        };
        let irq_cpu = match c.get("net.irq_cpu") {
            None => percpu::cpu_id(),
            Some(s) => s
                .parse()
                .map_err(|_| NetError::Config("net.irq_cpu= takes a CPU index"))?,
        };
        let notify = match c.get("net.notify") {
            None => Notify::Auto,
            Some("doorbell") => Notify::Doorbell,
            Some("trap") => Notify::Trap,
            Some(_) => return Err(NetError::Config("net.notify= takes doorbell or trap")),
        };
        let tx_irq = c.flag("net.tx_irq");
        let dhcp = c.flag("dhcp");
        if address.is_none() && !dhcp {
            return Err(NetError::Config(
                "give ip=ADDR/PREFIX or dhcp on the kernel command line",
            ));
        }
        Ok(Self {
            address,
            gateway,
            dhcp,
            rx_mode,
            irq_cpu,
            notify,
            tx_irq,
        })
    }
}

/// Bumped by a NIC's RX interrupt handler; the stack sleeps until it moves.
static RX_SIGNAL: [AtomicU64; MAX_NICS] = [const { AtomicU64::new(0) }; MAX_NICS];
/// The CPU polling each NIC's stack: an interrupt taken elsewhere wakes it.
static STACK_CPU: [AtomicUsize; MAX_NICS] = [const { AtomicUsize::new(0) }; MAX_NICS];

fn rx_vector(nic: usize) -> u8 {
    vector::DEVICE_BASE + 2 * nic as u8
}

fn nic_of(v: u8) -> usize {
    usize::from((v - vector::DEVICE_BASE) / 2)
}

/// Runs in upcall context: count, and wake the stack's CPU if that is not us.
fn on_rx(v: u8) {
    let nic = nic_of(v);
    RX_SIGNAL[nic].fetch_add(1, Ordering::Release);
    let target = STACK_CPU[nic].load(Ordering::Relaxed);
    if target != percpu::cpu_id() {
        let _ = smp::send_ipi(target, vector::WAKE);
    }
}

/// Bumped by the M3 `HintUpdate` upcall: the shim published a new hint.
static HINT_UPCALLS: AtomicU64 = AtomicU64::new(0);
/// NICs (bit per index) whose RX queue follows hints.
static HINT_NICS: AtomicUsize = AtomicUsize::new(0);

/// Runs in upcall context: the shim announced a new hint, so the stacks that
/// follow hints look at it now rather than at their queue's next interrupt.
fn on_hint_update(_: super::upcall::Class, n: u32) {
    HINT_UPCALLS.fetch_add(u64::from(n), Ordering::Release);
    let (me, nics) = (percpu::cpu_id(), HINT_NICS.load(Ordering::Acquire));
    let mut woken = 0u64;
    for nic in (0..MAX_NICS).filter(|i| nics & (1 << i) != 0) {
        let target = STACK_CPU[nic].load(Ordering::Relaxed);
        if target != me && target < 64 && woken & (1 << target) == 0 {
            woken |= 1 << target;
            let _ = smp::send_ipi(target, vector::WAKE);
        }
    }
}

/// The RX queue's hint follower for NIC `index` (PCI device `device`, RX
/// interrupts at APIC id `apic`), unless hints are off or not offered.
fn hint_follower(index: usize, device: u8, apic: u32) -> Option<super::hints::Follower> {
    match super::hints::get() {
        // An explicit net.irq_cpu= is a placement asked for: hints do not
        // move it, unless hints=on says they should.
        Ok(_)
            if system().cmdline.get("net.irq_cpu").is_some()
                && system().cmdline.get("hints") != Some("on") =>
        {
            log::info!("net{index}: net.irq_cpu= given; interrupt hints not followed");
            None
        }
        Ok(_) => {
            HINT_NICS.fetch_or(1 << index, Ordering::AcqRel);
            super::upcall::register_upcall(super::upcall::Class::HintUpdate, on_hint_update);
            Some(super::hints::Follower::new(device, RX_QUEUE, apic))
        }
        Err(e) => {
            log::info!("net{index}: default interrupt placement: {e}");
            None
        }
    }
}

/// `HintUpdate` upcalls taken so far (the shim announcing new hints).
#[must_use]
pub fn hint_upcalls() -> u64 {
    HINT_UPCALLS.load(Ordering::Acquire)
}

/// Queue notifications as doorbell events (device = PCI device number).
struct DoorbellNotifier;

impl drivers::virtio_pci::QueueNotifier for DoorbellNotifier {
    fn notify(&self, device: u8, queue: u16) -> bool {
        match super::doorbell::get() {
            Ok(d) => {
                let event = para_abi::doorbell::record::Event {
                    device,
                    queue,
                    op: para_abi::doorbell::record::Op::Notify,
                    arg: 0,
                };
                let _ = d.send(event);
                true
            }
            Err(_) => false,
        }
    }
}

/// TX completions are reaped on the send path; their interrupts only count.
fn on_tx(_: u8) {}

/// The smoltcp interface over `dev` with `cfg`'s static address, default route
/// and DHCP client: the same for every NIC type.
fn stack<D: smoltcp::phy::Device>(
    mac: EthernetAddress,
    dev: &mut D,
    cfg: &NetConfig,
) -> (Interface, SocketSet<'static>, Option<SocketHandle>) {
    let mut iface = Interface::new(Config::new(HardwareAddress::Ethernet(mac)), dev, now());
    if let Some(addr) = cfg.address {
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::Ipv4(addr));
        });
    }
    if let Some(gw) = cfg.gateway {
        let _ = iface.routes_mut().add_default_ipv4_route(gw);
    }
    let mut sockets = SocketSet::new(Vec::new());
    let dhcp = cfg.dhcp.then(|| sockets.add(dhcpv4::Socket::new()));
    (iface, sockets, dhcp)
}

fn now() -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(
        i64::try_from(super::time::now_ns() / 1000).unwrap_or(i64::MAX),
    )
}

/// The device under the interface: which NIC type.
// One per NIC, never moved after `open`: boxing the large variant would only
// add an indirection on every poll.
#[allow(clippy::large_enum_variant)]
enum Nic {
    Virtio { dev: Device, msix: MsixControl },
    Vmq(VmqNet<super::vmq_link::VmqLink>),
}

impl Nic {
    fn rx_pending(&self) -> bool {
        match self {
            Self::Virtio { dev, .. } => dev.rx_pending(),
            Self::Vmq(d) => {
                // Pairs with the shim's fence between storing the inbox's
                // `produced` and loading `consumed` (see `Vmq::wait`): no
                // lost wake-up before a halt.
                core::sync::atomic::fence(Ordering::SeqCst);
                d.rx_pending()
            }
        }
    }

    fn msix(&self) -> Option<&MsixControl> {
        match self {
            Self::Virtio { msix, .. } => Some(msix),
            Self::Vmq(_) => None,
        }
    }
}

/// One NIC with its smoltcp interface and sockets.
pub struct Net {
    index: usize,
    nic: Nic,
    iface: Interface,
    pub sockets: SocketSet<'static>,
    dhcp: Option<SocketHandle>,
    mode: RxMode,
    /// Follows the shim's interrupt-vCPU hints for the RX queue (M2).
    hints: Option<super::hints::Follower>,
    /// `RX_SIGNAL` when the hints were last checked: they are checked after interrupts.
    hint_signal: u64,
    /// `HINT_UPCALLS` when the hints were last checked: and after the shim's
    /// `HintUpdate` upcalls (M3).
    hint_upcalls: u64,
}

impl fmt::Debug for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Net");
        d.field("index", &self.index);
        match &self.nic {
            Nic::Virtio { dev, .. } => d.field("dev", dev),
            Nic::Vmq(v) => d.field("dev", v),
        };
        d.finish_non_exhaustive()
    }
}

impl Net {
    /// Opens virtio-net device number `index` (bus order) with `cfg`.
    pub fn open(index: usize, cfg: &NetConfig) -> Result<Self, NetError> {
        if index >= MAX_NICS {
            return Err(NetError::NoDevice(index));
        }
        let access = system().pci;
        let df = *find_net_devices(access)
            .get(index)
            .ok_or(NetError::NoDevice(index))?;
        let apic = smp::apic_id(cfg.irq_cpu).ok_or(NetError::NoSuchCpu(cfg.irq_cpu))?;
        let rx = rx_vector(index);
        irq::register(rx, on_rx);
        irq::register(rx + 1, on_tx);
        STACK_CPU[index].store(percpu::cpu_id(), Ordering::Relaxed);
        let msg = |v| {
            MsiMessage::fixed(ApicId(apic), Vector(v)).map_err(|e| NetError::Transport(e.into()))
        };
        let plan = VectorPlan {
            config: None,
            queues: vec![msg(rx)?, msg(rx + 1)?],
        };
        let (mut transport, mut msix) =
            MsixPciTransport::new::<KernelHal, _>(KernelPciAccess(access), df, plan)
                .map_err(NetError::Transport)?;
        let doorbells = match (cfg.notify, super::doorbell::get()) {
            (Notify::Trap, _) | (Notify::Auto, Err(_)) => false,
            (Notify::Doorbell | Notify::Auto, Ok(_)) => true,
            (Notify::Doorbell, Err(e)) => return Err(NetError::Doorbell(e)),
        };
        if doorbells {
            transport.set_notifier(alloc::boxed::Box::new(DoorbellNotifier));
        }
        let mut dev = NetDevice::new(transport, cfg.rx_mode).map_err(NetError::Driver)?;
        if !cfg.tx_irq {
            msix.set_queue_masked(TX_QUEUE, true)
                .map_err(|e| NetError::Transport(e.into()))?;
        }
        let status = msix.vector_status();
        if status.rejected > 0 {
            return Err(NetError::VectorRejected {
                rejected: status.rejected,
            });
        }
        let mac = EthernetAddress(dev.mac());
        let (iface, sockets, dhcp) = stack(mac, &mut dev, cfg);
        log::info!(
            "net{index}: virtio-net at {:02x}:{:02x}.{} MAC {mac}, {}, RX {:?}, interrupts to cpu{} (vectors {:#x}/{:#x}, {} accepted), notify by {}",
            df.bus,
            df.device,
            df.function,
            cfg.address
                .map_or(alloc::string::String::from("DHCP"), |a| alloc::format!(
                    "{a}"
                )),
            cfg.rx_mode,
            cfg.irq_cpu,
            rx,
            rx + 1,
            status.accepted,
            if doorbells { "doorbell" } else { "trap" }
        );
        Ok(Self {
            index,
            nic: Nic::Virtio { dev, msix },
            iface,
            sockets,
            dhcp,
            mode: cfg.rx_mode,
            hints: hint_follower(index, df.device, apic),
            hint_signal: 0,
            hint_upcalls: 0,
        })
    }

    /// Opens NIC `index` configured by the kernel command line (see the module docs).
    pub fn from_cmdline(index: usize) -> Result<Self, NetError> {
        let c = &system().cmdline;
        let cfg = NetConfig::from_cmdline(c)?;
        match c.get("net.dev") {
            None | Some("virtio") => Self::open(index, &cfg),
            Some("vmq") if index == 0 => {
                let peer = c.get("net.vmq_peer").ok_or(NetError::Config(
                    "net.dev=vmq needs net.vmq_peer=NAME of the other guest",
                ))?;
                let policy = match c.get("net.vmq_policy") {
                    None => super::vmq_link::LinkPolicy::Lazy,
                    Some(p) => super::vmq_link::LinkPolicy::parse(p).ok_or(NetError::Config(
                        "net.vmq_policy= takes lazy, immediate or doorbell",
                    ))?,
                };
                Self::open_vmq(peer, policy, &cfg)
            }
            Some("vmq") => Err(NetError::NoDevice(index)),
            Some(_) => Err(NetError::Config("net.dev= takes virtio or vmq")),
        }
    }

    /// Opens the VM-queue NIC (there is one, index 0) to the guest called `peer`.
    /// `cfg`'s addresses, DHCP and RX mode apply; its interrupt placement and
    /// notification path do not (arrivals interrupt vCPU 0; sends are messages).
    pub fn open_vmq(
        peer: &str,
        policy: super::vmq_link::LinkPolicy,
        cfg: &NetConfig,
    ) -> Result<Self, NetError> {
        let link = super::vmq_link::VmqLink::open(peer, policy).map_err(NetError::Vmq)?;
        let (me, peer_id) = (link.my_id(), link.peer());
        let mut dev = VmqNet::new(link, drivers::vmq_net::mac_for(me));
        let mac = EthernetAddress(dev.mac());
        let (iface, sockets, dhcp) = stack(mac, &mut dev, cfg);
        STACK_CPU[0].store(percpu::cpu_id(), Ordering::Relaxed);
        log::info!(
            "net0: VM-queue NIC, guest {me} -> {peer} (id {peer_id}), MAC {mac}, {}, RX {:?}, {policy:?} delivery",
            cfg.address
                .map_or(alloc::string::String::from("DHCP"), |a| alloc::format!(
                    "{a}"
                )),
            cfg.rx_mode,
        );
        Ok(Self {
            index: 0,
            nic: Nic::Vmq(dev),
            iface,
            sockets,
            dhcp,
            mode: cfg.rx_mode,
            hints: None,
            hint_signal: 0,
            hint_upcalls: 0,
        })
    }

    /// Runs smoltcp once over whatever arrived; true when anything happened.
    pub fn poll(&mut self) -> bool {
        let signal = RX_SIGNAL[self.index].load(Ordering::Acquire);
        let upcalls = HINT_UPCALLS.load(Ordering::Acquire);
        if signal != self.hint_signal || upcalls != self.hint_upcalls {
            self.hint_signal = signal;
            self.hint_upcalls = upcalls;
            self.follow_hints();
        }
        let r = match &mut self.nic {
            Nic::Virtio { dev, .. } => self.iface.poll(now(), dev, &mut self.sockets),
            Nic::Vmq(dev) => {
                let r = self.iface.poll(now(), dev, &mut self.sockets);
                // What this poll sent leaves in one exit (lazy links).
                dev.flush();
                r
            }
        };
        if let Some(h) = self.dhcp {
            match self.sockets.get_mut::<dhcpv4::Socket>(h).poll() {
                Some(dhcpv4::Event::Configured(c)) => {
                    self.iface.update_ip_addrs(|a| {
                        a.clear();
                        let _ = a.push(IpCidr::Ipv4(c.address));
                    });
                    if let Some(r) = c.router {
                        let _ = self.iface.routes_mut().add_default_ipv4_route(r);
                    }
                    log::info!(
                        "net{}: DHCP gave {} (router {:?})",
                        self.index,
                        c.address,
                        c.router
                    );
                }
                // smoltcp reports Deconfigured once at start as well; only a
                // lease that existed is worth a warning.
                Some(dhcpv4::Event::Deconfigured) if self.iface.ipv4_addr().is_some() => {
                    #[allow(clippy::redundant_closure_for_method_calls)]
                    // the Vec type is smoltcp-internal
                    self.iface.update_ip_addrs(|a| a.clear());
                    log::warn!("net{}: DHCP lease lost", self.index);
                }
                Some(dhcpv4::Event::Deconfigured) | None => {}
            }
        }
        r != PollResult::None
    }

    /// Sleeps until a frame arrives, smoltcp wants polling, or `until` passes.
    /// Poll mode spins on the used ring instead of sleeping.
    pub fn wait(&mut self, until: Option<Instant>) {
        let poll_at = self.iface.poll_at(now(), &self.sockets).map(|t| {
            let us = u64::try_from(t.total_micros()).unwrap_or(0);
            Instant(us * super::time::tsc_khz() / 1000)
        });
        let wake = match (poll_at, until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if self.nic.rx_pending() || wake.is_some_and(|w| Instant::now() >= w) {
            return;
        }
        if let Nic::Vmq(dev) = &mut self.nic {
            // A halt is no exit the shim sees: lazily posted frames go now.
            dev.flush();
        }
        match self.mode {
            RxMode::Poll => {
                while !self.nic.rx_pending() && wake.is_none_or(|w| Instant::now() < w) {
                    core::hint::spin_loop();
                }
            }
            RxMode::Interrupt => {
                let signal = &RX_SIGNAL[self.index];
                let seen = signal.load(Ordering::Acquire);
                let hints_seen = self.hint_upcalls;
                let nic = &self.nic;
                super::wait::wait_until_or(wake, || {
                    signal.load(Ordering::Acquire) != seen
                        || HINT_UPCALLS.load(Ordering::Acquire) != hints_seen
                        || nic.rx_pending()
                });
            }
        }
    }

    /// The interface's IPv4 address, once it has one.
    #[must_use]
    pub fn ipv4(&self) -> Option<Ipv4Address> {
        self.iface.ipv4_addr()
    }

    #[must_use]
    pub fn stats(&self) -> NetStats {
        match &self.nic {
            Nic::Virtio { dev, .. } => dev.stats(),
            Nic::Vmq(d) => d.stats(),
        }
    }

    /// The VM-queue link's outcomes (`None` for virtio-net): frames the shim
    /// delivered or refused, and this guest's flush exits.
    pub fn vmq_link_stats(&mut self) -> Option<(super::vmq_link::LinkStats, u64)> {
        match &mut self.nic {
            Nic::Virtio { .. } => None,
            Nic::Vmq(d) => Some((d.link_mut().stats(), d.link().flushes())),
        }
    }

    /// After an RX interrupt or a `HintUpdate` upcall: moves the RX vector to the
    /// vCPU a new hint names (the follower decides each generation once).
    fn follow_hints(&mut self) {
        let (Some(f), Ok(h)) = (self.hints.as_mut(), super::hints::get()) else {
            return;
        };
        if let Some(cpu) = f.check(&h) {
            match self.retarget(RX_QUEUE, cpu) {
                Ok(()) => log::info!("net{}: RX interrupts to cpu{cpu} (hint)", self.index),
                Err(e) => log::warn!("net{}: following the hint to cpu{cpu}: {e}", self.index),
            }
        }
    }

    /// Points queue `queue` (0 = RX, 1 = TX)'s interrupt at CPU `cpu`.
    pub fn retarget(&mut self, queue: u16, cpu: usize) -> Result<(), NetError> {
        let apic = smp::apic_id(cpu).ok_or(NetError::NoSuchCpu(cpu))?;
        let Nic::Virtio { msix, .. } = &mut self.nic else {
            return Err(NetError::Config("a VM-queue NIC has no MSI-X vectors"));
        };
        msix.retarget(queue, ApicId(apic))
            .map_err(|e| NetError::Transport(e.into()))?;
        if queue == RX_QUEUE
            && let Some(f) = &mut self.hints
        {
            f.set_current(apic);
        }
        Ok(())
    }

    /// Where the RX and TX queues interrupt now (APIC ids, read from the table).
    pub fn irq_destinations(&self) -> Result<(u32, u32), MsixError> {
        let msix = self.nic.msix().ok_or(MsixError::NoCapability)?;
        Ok((
            msix.queue_message(RX_QUEUE)?.destination().0,
            msix.queue_message(TX_QUEUE)?.destination().0,
        ))
    }

    /// RX vector of this NIC (for per-CPU interrupt counts).
    #[must_use]
    pub fn rx_vector(&self) -> u8 {
        match self.nic {
            Nic::Virtio { .. } => rx_vector(self.index),
            Nic::Vmq(_) => vector::VMQ_ARRIVAL,
        }
    }

    /// Binds a UDP socket to `port` with `packets` datagrams of buffering each way.
    pub fn udp_bind(&mut self, port: u16, packets: usize) -> Result<SocketHandle, udp::BindError> {
        let buf = || {
            udp::PacketBuffer::new(
                vec![udp::PacketMetadata::EMPTY; packets],
                vec![0u8; packets * 1536],
            )
        };
        let mut s = udp::Socket::new(buf(), buf());
        s.bind(port)?;
        Ok(self.sockets.add(s))
    }

    /// A TCP socket listening on `port`.
    pub fn tcp_listen(
        &mut self,
        port: u16,
        buffer: usize,
    ) -> Result<SocketHandle, tcp::ListenError> {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; buffer]),
            tcp::SocketBuffer::new(vec![0; buffer]),
        );
        s.listen(port)?;
        Ok(self.sockets.add(s))
    }

    pub fn udp(&mut self, h: SocketHandle) -> &mut udp::Socket<'static> {
        self.sockets.get_mut::<udp::Socket>(h)
    }

    pub fn tcp(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }
}
