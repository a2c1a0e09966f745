//! What the kernel command line says about networking: addresses, DHCP, the
//! RX mode, where interrupts go, how the device is notified, and which NIC
//! type carries the frames.

use super::error::NetError;
use crate::cmdline::Cmdline;
use crate::percpu;
use crate::rt::vmq_link::LinkPolicy;
use drivers::net::RxMode;
use smoltcp::wire::{Ipv4Address, Ipv4Cidr};

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
    /// How the stack sleeps (`net.wait=`).
    pub wait: WaitMode,
    /// Poll mode: microseconds to spin on the used ring before sleeping
    /// (`net.poll_us=`; default 0: on a host with fewer cores than busy
    /// threads a spinning vCPU holds the core the frame needs).
    pub poll_us: u32,
    /// Frames sent right before an exitless wait ride on its exit instead of
    /// a doorbell each (`net.tx_at_wait=on|off`, default on; see
    /// `Net::poll_wait`).
    pub tx_at_wait: bool,
}

/// How a stack with nothing to do sleeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitMode {
    /// The shim's exitless wait where offered (NIC 0 under the shim), with RX
    /// interrupts withheld; a halt until the RX interrupt elsewhere.
    Auto,
    /// Always the halt kernel call and the RX interrupt.
    Halt,
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
    /// Reads `ip=`, `gw=`, `dhcp`, `net.rx=`, `net.irq_cpu=`, `net.notify=`,
    /// `net.tx_irq`, `net.wait=`, `net.poll_us=` and `net.tx_at_wait=`.
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
        let wait = match c.get("net.wait") {
            None | Some("exitless") => WaitMode::Auto,
            Some("halt") => WaitMode::Halt,
            Some(_) => return Err(NetError::Config("net.wait= takes exitless or halt")),
        };
        let poll_us = match c.get("net.poll_us") {
            None => 0,
            Some(s) => s
                .parse()
                .map_err(|_| NetError::Config("net.poll_us= takes microseconds"))?,
        };
        let tx_at_wait = match c.get("net.tx_at_wait") {
            None | Some("on") => true,
            Some("off") => false,
            Some(_) => return Err(NetError::Config("net.tx_at_wait= takes on or off")),
        };
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
            wait,
            poll_us,
            tx_at_wait,
        })
    }
}

/// Which NIC type carries NIC `index`'s frames (`net.dev=`).
#[derive(Clone, Copy, Debug)]
pub enum NicChoice<'a> {
    /// A virtio-net device on the PCI bus (the default).
    Virtio,
    /// VM queues to the guest the shim calls `peer` (`net.vmq_peer=`), with
    /// `net.vmq_policy=`'s delivery.
    Vmq { peer: &'a str, policy: LinkPolicy },
    /// A direct channel to the guest the shim calls `peer`
    /// (`net.vmq_policy=direct`): frames cross shared memory, no exit.
    Direct { peer: &'a str },
}

impl<'a> NicChoice<'a> {
    /// Reads `net.dev=`, and for `vmq` also `net.vmq_peer=` and
    /// `net.vmq_policy=`. There is one VM-queue NIC, index 0.
    pub fn from_cmdline(c: &Cmdline<'a>, index: usize) -> Result<Self, NetError> {
        match c.get("net.dev") {
            None | Some("virtio") => Ok(Self::Virtio),
            Some("vmq") if index == 0 => {
                let peer = c.get("net.vmq_peer").ok_or(NetError::Config(
                    "net.dev=vmq needs net.vmq_peer=NAME of the other guest",
                ))?;
                let policy = match c.get("net.vmq_policy") {
                    None => LinkPolicy::Lazy,
                    Some("direct") => return Ok(Self::Direct { peer }),
                    Some(p) => LinkPolicy::parse(p).ok_or(NetError::Config(
                        "net.vmq_policy= takes lazy, immediate, doorbell or direct",
                    ))?,
                };
                Ok(Self::Vmq { peer, policy })
            }
            Some("vmq") => Err(NetError::NoDevice(index)),
            Some(_) => Err(NetError::Config("net.dev= takes virtio or vmq")),
        }
    }
}
