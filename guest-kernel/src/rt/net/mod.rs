//! Networking in the guest: a smoltcp interface on a NIC, fed from ring 3.
//! The NIC's RX vector wakes the stack (interrupt mode) or the stack
//! busy-polls the used ring (poll mode); a timer at smoltcp's `poll_at`
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
//!
//! # The parts
//!
//! - `config`: the command line's network keys ([`NetConfig`], [`Notify`]).
//! - `error`: [`NetError`].
//! - `wake`: the RX and `HintUpdate` handlers, the counters a sleeping stack
//!   waits on, and the RX queue's hint follower.
//! - `nic`: the `Nic` trait and its two NICs, virtio-net and
//!   VM queues.
//! - `stack`: the smoltcp interface, sockets and DHCP lease, NIC-independent.
//! - `sockets`: [`Sockets`], smoltcp's socket set plus listeners with a
//!   backlog, closed streams reclaimed when done, buffers that never panic.
//! - `stream`, `datagram`: the std-like socket types [`TcpListener`], [`TcpStream`],
//!   [`UdpSocket`].
//! - this file: [`Net`], which ties one NIC to its stack: polling, sleeping,
//!   following hints, sockets.
//!
//! # Sockets
//!
//! [`TcpListener::bind`] listens with a backlog of sockets that the stack
//! re-arms after every received frame, so many clients connecting at once
//! are all accepted (up to [`TcpOptions::max_connections`]); `accept` hands
//! out [`TcpStream`]s with non-blocking `read`/`write` and `close`.
//! [`UdpSocket`] sends and receives datagrams. Every socket's buffers are
//! taken from the heap at bind or when its listener re-arms; when the heap
//! is short the call fails with [`NetError::OutOfMemory`] or the listener
//! counts it and retries, never a panic. The older handle-based calls
//! (`tcp_listen`, `udp_bind`, `tcp(h)`, `udp(h)`) still give smoltcp's
//! sockets directly.

pub mod breakdown;
mod config;
mod datagram;
mod error;
mod nic;
mod sockets;
mod stack;
mod stream;
mod wake;

pub use config::{NetConfig, Notify, WaitMode};
pub use datagram::{UdpOptions, UdpSocket};
pub use error::{NetError, SocketError};
pub use nic::{VirtioNic, VirtioOpened};
pub use sockets::{CLOSE_LINGER, ListenerStats, SocketStats, Sockets, TcpOptions};
pub use stream::{TcpListener, TcpStream};
pub use wake::{MAX_NICS, hint_upcalls};

use crate::rt::direct_link::DirectStats;
use crate::rt::hints::{self, Follower};
use crate::rt::start::system;
use crate::rt::time::{self, Instant};
use crate::rt::vmq_link::{LinkPolicy, LinkStats};
use crate::rt::{ctrl, smp, wait};
use alloc::boxed::Box;
use config::NicChoice;
use core::fmt;
use drivers::msix::{ApicId, MsixError};
use drivers::net::{NetStats, RX_QUEUE, RxMode, TX_QUEUE};
use nic::Nic;
use smoltcp::iface::{Interface, PollResult, SocketHandle};
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::{IpEndpoint, Ipv4Address};
use stack::now;

/// One NIC with its smoltcp interface and sockets.
pub struct Net {
    index: usize,
    nic: Box<dyn Nic>,
    iface: Interface,
    sockets: Sockets,
    dhcp: Option<SocketHandle>,
    mode: RxMode,
    /// Follows the shim's interrupt-vCPU hints for the RX queue (M2).
    hints: Option<Follower>,
    /// RX interrupts when the hints were last checked: they are checked after interrupts.
    hint_signal: u64,
    /// `HintUpdate` upcalls when the hints were last checked: and after the
    /// shim's `HintUpdate` upcalls (M3).
    hint_upcalls: u64,
    /// Sleeps with the shim's exitless wait (M4's wait page), RX interrupts withheld.
    exitless: bool,
    /// Poll mode: spin this long (TSC ticks) before sleeping.
    poll_ticks: u64,
    /// When a poll last found a received frame (guest TSC; latency breakdown).
    last_rx_poll: u64,
}

impl fmt::Debug for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Net")
            .field("index", &self.index)
            .field("dev", &self.nic)
            .finish_non_exhaustive()
    }
}

fn describe_address(cfg: &NetConfig) -> alloc::string::String {
    cfg.address
        .map_or(alloc::string::String::from("DHCP"), |a| {
            alloc::format!("{a}")
        })
}

/// Withholds NIC 0's RX interrupt (M4 quiet flag, shadowed: no exit) where
/// the shim offers the exitless wait; true when the stack may use it.
fn quiet_rx() -> bool {
    ctrl::wait_page().is_some() && ctrl::write_flag(para_abi::ctrl::Flag::Nic0RxQuiet, true).is_ok()
}

fn poll_ticks(cfg: &NetConfig) -> u64 {
    u64::from(cfg.poll_us) * time::tsc_khz() / 1000
}

impl Net {
    /// Opens virtio-net device number `index` (bus order) with `cfg`.
    pub fn open(index: usize, cfg: &NetConfig) -> Result<Self, NetError> {
        if index >= MAX_NICS {
            return Err(NetError::NoDevice(index));
        }
        let opened = VirtioNic::open(index, cfg)?;
        let mut nic: Box<dyn Nic> = Box::new(opened.nic);
        let (iface, set, dhcp) = stack::build(nic.as_mut(), cfg);
        let rx = nic.rx_vector();
        let exitless = index == 0 && cfg.wait == WaitMode::Auto && quiet_rx();
        log::info!(
            "net{index}: virtio-net at {:02x}:{:02x}.{} MAC {}, {}, RX {:?}, interrupts to cpu{} (vectors {:#x}/{:#x}, {} accepted), notify by {}, sleeps by {}",
            opened.bus,
            opened.device,
            opened.function,
            nic.mac(),
            describe_address(cfg),
            cfg.rx_mode,
            cfg.irq_cpu,
            rx,
            rx + 1,
            opened.accepted,
            if opened.doorbells { "doorbell" } else { "trap" },
            if exitless {
                "exitless wait"
            } else {
                "halt + RX interrupt"
            }
        );
        Ok(Self {
            index,
            nic,
            iface,
            sockets: Sockets::new(set),
            dhcp,
            mode: cfg.rx_mode,
            hints: wake::hint_follower(index, opened.device, opened.apic),
            hint_signal: 0,
            hint_upcalls: 0,
            exitless,
            poll_ticks: poll_ticks(cfg),
            last_rx_poll: 0,
        })
    }

    /// Opens NIC `index` configured by the kernel command line (see the module docs).
    pub fn from_cmdline(index: usize) -> Result<Self, NetError> {
        let c = &system().cmdline;
        let cfg = NetConfig::from_cmdline(c)?;
        match NicChoice::from_cmdline(c, index)? {
            NicChoice::Virtio => Self::open(index, &cfg),
            NicChoice::Vmq { peer, policy } => Self::open_vmq(peer, policy, &cfg),
            NicChoice::Direct { peer } => Self::open_direct(peer, &cfg),
        }
    }

    /// Opens the VM-queue NIC (there is one, index 0) to the guest called `peer`.
    /// `cfg`'s addresses, DHCP and RX mode apply; its interrupt placement and
    /// notification path do not (arrivals interrupt vCPU 0; sends are messages).
    pub fn open_vmq(peer: &str, policy: LinkPolicy, cfg: &NetConfig) -> Result<Self, NetError> {
        let dev = nic::open_vmq(peer, policy)?;
        let (me, peer_id) = (dev.link().my_id(), dev.link().peer());
        let net = Self::on_peer_link(Box::new(dev), cfg);
        log::info!(
            "net0: VM-queue NIC, guest {me} -> {peer} (id {peer_id}), MAC {}, {}, RX {:?}, {policy:?} delivery",
            net.nic.mac(),
            describe_address(cfg),
            cfg.rx_mode,
        );
        Ok(net)
    }

    /// Opens the VM-queue NIC over a direct channel to the guest called
    /// `peer` (index 0): frames cross memory the two guests share, the shim
    /// only wakes a peer that halted. `cfg`'s addresses, DHCP and RX mode apply.
    pub fn open_direct(peer: &str, cfg: &NetConfig) -> Result<Self, NetError> {
        let dev = nic::open_direct(peer)?;
        let (me, peer_id) = (dev.link().my_id(), dev.link().peer());
        let net = Self::on_peer_link(Box::new(dev), cfg);
        log::info!(
            "net0: VM-queue NIC, guest {me} -> {peer} (id {peer_id}), MAC {}, {}, RX {:?}, direct channel",
            net.nic.mac(),
            describe_address(cfg),
            cfg.rx_mode,
        );
        Ok(net)
    }

    /// The stack over a NIC that links to one peer guest (index 0; arrivals
    /// wake vCPU 0, where the stack runs).
    fn on_peer_link(mut nic: Box<dyn Nic>, cfg: &NetConfig) -> Self {
        let (iface, set, dhcp) = stack::build(nic.as_mut(), cfg);
        wake::set_stack_cpu(0);
        Self {
            index: 0,
            nic,
            iface,
            sockets: Sockets::new(set),
            dhcp,
            mode: cfg.rx_mode,
            hints: None,
            hint_signal: 0,
            hint_upcalls: 0,
            exitless: false,
            poll_ticks: poll_ticks(cfg),
            last_rx_poll: 0,
        }
    }

    /// Runs smoltcp once over whatever arrived; true when anything happened.
    pub fn poll(&mut self) -> bool {
        let signal = wake::rx_signals(self.index);
        let upcalls = wake::hint_upcalls();
        if signal != self.hint_signal || upcalls != self.hint_upcalls {
            self.hint_signal = signal;
            self.hint_upcalls = upcalls;
            self.follow_hints();
        }
        if self.nic.rx_pending() {
            self.last_rx_poll = Instant::now().0;
        }
        let r = self.nic.poll(&mut self.iface, now(), &mut self.sockets);
        if let Some(h) = self.dhcp {
            stack::follow_dhcp(self.index, &mut self.iface, &mut self.sockets.set, h);
        }
        r != PollResult::None
    }

    /// [`Net::poll`], then [`Net::wait`] unless a frame had arrived (the app
    /// has something to read then): the loop's two calls in one, and the
    /// cheaper pair under the shim's exitless wait, where the frames this
    /// poll sends ride on the wait's exit instead of a doorbell each (the
    /// sender is about to sleep: one exit does both). Returns what the poll
    /// returned.
    pub fn poll_wait(&mut self, until: Option<Instant>) -> bool {
        let arrived = self.nic.rx_pending();
        let hold = self.exitless && !arrived && self.nic.hold_tx(true);
        let r = self.poll();
        if hold {
            self.nic.hold_tx(false);
        }
        if arrived {
            return r;
        }
        self.wait(until);
        r
    }

    /// Sends a TX notification held back by [`Net::poll_wait`] that no wait
    /// carries.
    fn notify_held_tx(&mut self, held: &mut bool) {
        if core::mem::take(held) {
            self.nic.notify_tx();
        }
    }

    /// Sleeps until a frame arrives, smoltcp wants polling, or `until` passes.
    /// Poll mode spins on the used ring instead of sleeping.
    pub fn wait(&mut self, until: Option<Instant>) {
        // TX notifications `poll_wait` held back: the exitless wait's exit
        // carries them; every other way out sends them first.
        let mut held = self.nic.take_held_tx();
        let poll_at = self.iface.poll_at(now(), &self.sockets.set).map(|t| {
            let us = u64::try_from(t.total_micros()).unwrap_or(0);
            Instant(us * time::tsc_khz() / 1000)
        });
        let wake = match (poll_at, until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // Read before the ring is checked: a frame that lands after the check
        // moves it, and the wait then returns at once.
        let token = if self.exitless {
            ctrl::rx_token()
        } else {
            None
        };
        if self.nic.rx_pending() || wake.is_some_and(|w| Instant::now() >= w) {
            self.notify_held_tx(&mut held);
            return;
        }
        // A VM-queue NIC waits by an exit the shim sees, which also delivers
        // lazily posted frames: no flush of its own.
        if self.mode == RxMode::Interrupt {
            let max_us = wake.map_or(0, |w| {
                let ticks = w.0.saturating_sub(Instant::now().0);
                u32::try_from(ticks * 1000 / time::tsc_khz().max(1))
                    .unwrap_or(u32::MAX)
                    .max(1)
            });
            if !held && self.nic.wait_exit(max_us) {
                return;
            }
        }
        // A halt is no exit the shim sees: lazily posted frames go now.
        self.nic.flush();
        if let Some(token) = token {
            self.wait_exitless(token, wake, held);
            return;
        }
        self.notify_held_tx(&mut held);
        match self.mode {
            RxMode::Poll => {
                while !self.nic.rx_pending() && wake.is_none_or(|w| Instant::now() < w) {
                    core::hint::spin_loop();
                }
            }
            RxMode::Interrupt => {
                if !self.nic.prepare_sleep() {
                    return;
                }
                let index = self.index;
                let seen = wake::rx_signals(index);
                let hints_seen = self.hint_upcalls;
                let nic = &self.nic;
                wait::wait_until_or(wake, || {
                    wake::rx_signals(index) != seen
                        || wake::hint_upcalls() != hints_seen
                        || nic.rx_pending()
                });
                self.nic.end_sleep();
            }
        }
    }

    /// Sleeps with one exit until the RX ring has work (after `token`), an
    /// upcall, or `wake`; poll mode spins its budget first. No RX interrupt
    /// comes (the quiet flag withholds it), no halt call, no ring-0 code.
    fn wait_exitless(&mut self, token: u32, wake: Option<Instant>, mut tx: bool) {
        if self.mode == RxMode::Poll && self.poll_ticks > 0 {
            // The frames go before the spin that waits for their answers.
            self.notify_held_tx(&mut tx);
            let until = Instant::now().0.saturating_add(self.poll_ticks);
            while Instant::now().0 < until {
                if self.nic.rx_pending() || wake.is_some_and(|w| Instant::now() >= w) {
                    return;
                }
                core::hint::spin_loop();
            }
        }
        let timeout_us = wake.map(|w| {
            let ticks = w.0.saturating_sub(Instant::now().0);
            u32::try_from(ticks.saturating_mul(1000) / time::tsc_khz().max(1)).unwrap_or(u32::MAX)
        });
        if !ctrl::wait_exitless(token, timeout_us, tx) {
            self.notify_held_tx(&mut tx);
        }
    }

    /// True when this stack sleeps with the shim's exitless wait.
    #[must_use]
    pub fn exitless(&self) -> bool {
        self.exitless
    }

    /// Latency breakdown: the application hands a frame to the stack now.
    pub fn stamp_app_tx(&self) {
        ctrl::stamp_app_tx(Instant::now().0);
    }

    /// Latency breakdown: when a poll last found a received frame (guest TSC).
    #[must_use]
    pub fn last_rx_poll(&self) -> u64 {
        self.last_rx_poll
    }

    /// The interface's IPv4 address, once it has one.
    #[must_use]
    pub fn ipv4(&self) -> Option<Ipv4Address> {
        self.iface.ipv4_addr()
    }

    #[must_use]
    pub fn stats(&self) -> NetStats {
        self.nic.stats()
    }

    /// A direct link's counters (`None` for other NICs): the peer's frames it
    /// dropped by reason, and the wake-ups it asked of the host.
    #[must_use]
    pub fn direct_stats(&self) -> Option<DirectStats> {
        self.nic.direct_stats()
    }

    /// The VM-queue link's outcomes (`None` for virtio-net): frames the shim
    /// delivered or refused, and this guest's flush exits.
    pub fn vmq_link_stats(&mut self) -> Option<(LinkStats, u64)> {
        self.nic.vmq_link_stats()
    }

    /// After an RX interrupt or a `HintUpdate` upcall: moves the RX vector to the
    /// vCPU a new hint names, where that is the vCPU polling this NIC (the
    /// follower decides each generation once, and says why it declines).
    fn follow_hints(&mut self) {
        let (Some(f), Ok(h)) = (self.hints.as_mut(), hints::get()) else {
            return;
        };
        if let Some(cpu) = f.check(&h, crate::percpu::cpu_id()) {
            match self.retarget(RX_QUEUE, cpu) {
                Ok(()) => log::info!("net{}: RX interrupts to cpu{cpu} (hint)", self.index),
                Err(e) => log::warn!("net{}: following the hint to cpu{cpu}: {e}", self.index),
            }
        }
    }

    /// Points queue `queue` (0 = RX, 1 = TX)'s interrupt at CPU `cpu`.
    pub fn retarget(&mut self, queue: u16, cpu: usize) -> Result<(), NetError> {
        let apic = smp::apic_id(cpu).ok_or(NetError::NoSuchCpu(cpu))?;
        let Some(msix) = self.nic.msix_mut() else {
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
        self.nic.rx_vector()
    }

    /// Binds a UDP socket to `port` with `packets` datagrams of 1,536 bytes
    /// of buffering each way; [`UdpSocket`] is the std-like way.
    ///
    /// # Errors
    /// [`NetError::Config`] for port 0 or smoltcp's refusal,
    /// [`NetError::OutOfMemory`] when the heap cannot hold the buffers.
    pub fn udp_bind(&mut self, port: u16, packets: usize) -> Result<SocketHandle, NetError> {
        let Some(mut s) = sockets::try_udp_socket(packets, 1536) else {
            self.sockets.count_out_of_memory();
            return Err(NetError::OutOfMemory {
                what: "a UDP socket's buffers",
            });
        };
        s.bind(port)
            .map_err(|_| NetError::Config("cannot bind UDP port 0 or an unusable address"))?;
        Ok(self.sockets.set.add(s))
    }

    /// One TCP socket listening on `port`, with `buffer` bytes each way. It
    /// takes one connection at a time; [`TcpListener`] takes many.
    ///
    /// # Errors
    /// [`NetError::Config`] for port 0, [`NetError::OutOfMemory`] when the
    /// heap cannot hold the buffers.
    pub fn tcp_listen(&mut self, port: u16, buffer: usize) -> Result<SocketHandle, NetError> {
        let Some(mut s) = sockets::try_tcp_socket(buffer, buffer) else {
            self.sockets.count_out_of_memory();
            return Err(NetError::OutOfMemory {
                what: "a TCP socket's buffers",
            });
        };
        s.listen(port)
            .map_err(|_| NetError::Config("cannot listen on TCP port 0"))?;
        Ok(self.sockets.set.add(s))
    }

    /// The UDP socket `h` from [`udp_bind`](Self::udp_bind).
    pub fn udp(&mut self, h: SocketHandle) -> &mut udp::Socket<'static> {
        self.sockets.set.get_mut::<udp::Socket>(h)
    }

    /// The TCP socket `h` from [`tcp_listen`](Self::tcp_listen).
    pub fn tcp(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.set.get_mut::<tcp::Socket>(h)
    }

    /// Starts a TCP connection to `to` from a free local port (49152–65535).
    /// The stream is usable once [`TcpStream::is_connecting`] turns false:
    /// connected when [`TcpStream::is_connected`], refused otherwise.
    ///
    /// # Errors
    /// [`NetError::Config`] for an unusable address or options, or when
    /// every local port is taken; [`NetError::OutOfMemory`].
    pub fn connect(&mut self, to: IpEndpoint, opts: TcpOptions) -> Result<TcpStream, NetError> {
        TcpStream::connect(&mut self.sockets, self.iface.context(), to, &opts)
    }

    /// The stack's socket counters (streams reclaimed, allocations that failed).
    #[must_use]
    pub fn socket_stats(&self) -> SocketStats {
        self.sockets.stats()
    }
}

/// The sockets of this stack: what [`TcpListener`], [`TcpStream`] and
/// [`UdpSocket`] take as `net`.
impl AsMut<Sockets> for Net {
    fn as_mut(&mut self) -> &mut Sockets {
        &mut self.sockets
    }
}
