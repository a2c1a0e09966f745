//! The NICs under a stack, behind one trait: a virtio-net device on the PCI
//! bus with its MSI-X vectors, or VM queues to one peer guest (M5). The stack
//! (`Net`) sees only [`Nic`]; what differs between the two — where frames
//! come from, what a lazy link must flush, whether there is an interrupt to
//! move — stays here.

use super::config::{NetConfig, Notify};
use super::error::NetError;
use super::sockets::Sockets;
use super::wake;
use crate::abi::vector;
use crate::rt::direct_link::{DirectLink, DirectStats};
use crate::rt::start::system;
use crate::rt::virtio::{KernelHal, KernelPciAccess, find_net_devices};
use crate::rt::vmq_link::{LinkPolicy, LinkStats, VmqLink};
use crate::rt::{doorbell, smp};
use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec;
use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};
use drivers::msix::{ApicId, MsiMessage, Vector};
use drivers::net::{NetDevice, NetStats, TX_QUEUE};
use drivers::virtio_pci::{MsixControl, MsixPciTransport, QueueNotifier, VectorPlan};
use drivers::vmq_net::{FrameLink, VmqNet};
use para_abi::doorbell::record::{Event, Op};
use smoltcp::iface::{Config, Interface, PollResult};
use smoltcp::time::Instant;
use smoltcp::wire::EthernetAddress;

/// What a stack needs from the device under it.
pub trait Nic: fmt::Debug {
    /// The device's MAC address.
    fn mac(&self) -> EthernetAddress;
    /// A smoltcp interface over this device.
    fn interface(&mut self, config: Config, now: Instant) -> Interface;
    /// Runs `iface` once over whatever arrived (one frame at a time, see
    /// [`Sockets::poll_device`]) and sends what it produces.
    fn poll(&mut self, iface: &mut Interface, now: Instant, sockets: &mut Sockets) -> PollResult;
    /// A received frame is waiting.
    fn rx_pending(&self) -> bool;
    /// Hands frames queued but not yet delivered to the VMM; called before
    /// the stack halts, which is no exit a VMM sees.
    fn flush(&mut self) {}
    /// From `true` until `false`: TX notifications are held back, for the
    /// wait that follows to carry ([`super::Net::poll_wait`]); false when
    /// this NIC cannot hold them (then nothing changes).
    fn hold_tx(&mut self, _on: bool) -> bool {
        false
    }
    /// Takes the TX notification held back: true when one is owed.
    fn take_held_tx(&mut self) -> bool {
        false
    }
    /// Sends a TX notification now (one held back that no wait carried).
    fn notify_tx(&mut self) {}
    /// Waits by one exit the VMM sees (which also delivers queued frames)
    /// instead of halting, for at most `max_us` µs (0: the VMM's longest);
    /// false when the NIC has no such wait (then the stack halts).
    fn wait_exit(&mut self, _max_us: u32) -> bool {
        false
    }
    fn stats(&self) -> NetStats;
    /// The vector whose per-CPU counts are this NIC's RX interrupts.
    fn rx_vector(&self) -> u8;
    /// The MSI-X table, for NICs with interrupts of their own.
    fn msix(&self) -> Option<&MsixControl> {
        None
    }
    fn msix_mut(&mut self) -> Option<&mut MsixControl> {
        None
    }
    /// About to halt until an interrupt: true when the stack may (the NIC
    /// will be woken), false when frames arrived meanwhile. NICs whose
    /// arrivals always interrupt need nothing.
    fn prepare_sleep(&mut self) -> bool {
        true
    }
    /// The halt [`Nic::prepare_sleep`] allowed has ended.
    fn end_sleep(&mut self) {}
    /// A direct link's own counters (what it refused or asked of the host).
    fn direct_stats(&self) -> Option<DirectStats> {
        None
    }
    /// The VM-queue link's outcomes and flush exits, for a VM-queue NIC.
    fn vmq_link_stats(&mut self) -> Option<(LinkStats, u64)> {
        None
    }
}

type Device = NetDevice<KernelHal, MsixPciTransport>;

/// A virtio-net device with the MSI-X table of its PCI function.
pub struct VirtioNic {
    dev: Device,
    msix: MsixControl,
    rx_vector: u8,
    /// PCI device number: how doorbell events name this device.
    device: u8,
    /// Where notifications are doorbells: TX notifications held back.
    hold: Option<Arc<TxHold>>,
}

/// TX notifications held back while a stack polls right before it waits:
/// the wait's exit carries them instead of a doorbell each.
#[derive(Debug, Default)]
struct TxHold {
    holding: AtomicBool,
    owed: AtomicBool,
}

/// What opening a virtio-net NIC found, for its log line and hint follower.
pub struct VirtioOpened {
    pub nic: VirtioNic,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
    /// APIC id the queue interrupts go to.
    pub apic: u32,
    /// Queue vectors the device accepted.
    pub accepted: u16,
    /// Queue notifications travel as doorbell events.
    pub doorbells: bool,
}

/// Queue notifications as doorbell events (device = PCI device number),
/// TX ones held back while [`TxHold`] says so.
struct DoorbellNotifier {
    hold: Arc<TxHold>,
}

impl QueueNotifier for DoorbellNotifier {
    fn notify(&self, device: u8, queue: u16) -> bool {
        if queue == TX_QUEUE && self.hold.holding.load(Ordering::Relaxed) {
            crate::rt::ctrl::stamp_notify(crate::rt::time::Instant::now().0);
            self.hold.owed.store(true, Ordering::Relaxed);
            return true;
        }
        send_doorbell(device, queue)
    }
}

/// One doorbell event for `queue` of PCI device `device`; false when the
/// shim withholds writing (it moves or stops a monitor): then the notify
/// register must carry the notification.
fn send_doorbell(device: u8, queue: u16) -> bool {
    match doorbell::get() {
        Ok(d) => {
            let event = Event {
                device,
                queue,
                op: Op::Notify,
                arg: 0,
            };
            crate::rt::ctrl::stamp_notify(crate::rt::time::Instant::now().0);
            d.try_send(event).is_some()
        }
        Err(_) => false,
    }
}

impl VirtioNic {
    /// Opens virtio-net device number `index` (bus order) with `cfg`: its
    /// queue interrupts go to `cfg.irq_cpu`, RX and TX on two vectors.
    pub fn open(index: usize, cfg: &NetConfig) -> Result<VirtioOpened, NetError> {
        let access = system().pci;
        let df = *find_net_devices(access)
            .get(index)
            .ok_or(NetError::NoDevice(index))?;
        let apic = smp::apic_id(cfg.irq_cpu).ok_or(NetError::NoSuchCpu(cfg.irq_cpu))?;
        let rx = wake::attach_virtio(index);
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
        let doorbells = match (cfg.notify, doorbell::get()) {
            (Notify::Trap, _) | (Notify::Auto, Err(_)) => false,
            (Notify::Doorbell | Notify::Auto, Ok(_)) => true,
            (Notify::Doorbell, Err(e)) => return Err(NetError::Doorbell(e)),
        };
        // Held TX notifications need a wait that carries them: the shim's
        // exitless wait.
        let hold = (doorbells && cfg.tx_at_wait && crate::rt::ctrl::wait_page().is_some())
            .then(|| Arc::new(TxHold::default()));
        if doorbells {
            transport.set_notifier(Box::new(DoorbellNotifier {
                hold: hold.clone().unwrap_or_default(),
            }));
        }
        let dev = NetDevice::new(transport, cfg.rx_mode).map_err(NetError::Driver)?;
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
        Ok(VirtioOpened {
            nic: Self {
                dev,
                msix,
                rx_vector: rx,
                device: df.device,
                hold,
            },
            bus: df.bus,
            device: df.device,
            function: df.function,
            apic,
            accepted: status.accepted,
            doorbells,
        })
    }
}

impl VirtioNic {
    /// The virtio-net device itself, for frames no stack would send (the
    /// `hostile` demo forges and floods through it).
    pub fn device(&mut self) -> &mut NetDevice<KernelHal, MsixPciTransport> {
        &mut self.dev
    }
}

impl fmt::Debug for VirtioNic {
    /// The device alone: the MSI-X table has nothing to say in a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.dev, f)
    }
}

impl Nic for VirtioNic {
    fn mac(&self) -> EthernetAddress {
        EthernetAddress(self.dev.mac())
    }

    fn interface(&mut self, config: Config, now: Instant) -> Interface {
        Interface::new(config, &mut self.dev, now)
    }

    fn poll(&mut self, iface: &mut Interface, now: Instant, sockets: &mut Sockets) -> PollResult {
        sockets.poll_device(iface, now, &mut self.dev)
    }

    fn rx_pending(&self) -> bool {
        self.dev.rx_pending()
    }

    fn hold_tx(&mut self, on: bool) -> bool {
        let Some(h) = &self.hold else {
            return false;
        };
        h.holding.store(on, Ordering::Relaxed);
        true
    }

    fn take_held_tx(&mut self) -> bool {
        self.hold
            .as_ref()
            .is_some_and(|h| h.owed.swap(false, Ordering::Relaxed))
    }

    fn notify_tx(&mut self) {
        // Doorbell writing withheld: a wait of no time carries it instead
        // (one exit; holding is only on where that wait exists).
        if !send_doorbell(self.device, TX_QUEUE) {
            let _ = crate::rt::ctrl::wait_exitless(0, Some(0), true);
        }
    }

    fn stats(&self) -> NetStats {
        self.dev.stats()
    }

    fn rx_vector(&self) -> u8 {
        self.rx_vector
    }

    fn msix(&self) -> Option<&MsixControl> {
        Some(&self.msix)
    }

    fn msix_mut(&mut self) -> Option<&mut MsixControl> {
        Some(&mut self.msix)
    }
}

/// A link to one peer guest under the VM-queue NIC: what the stack needs
/// from it beyond carrying frames. VM queues and direct channels differ only
/// here.
pub trait PeerLink: FrameLink + fmt::Debug {
    /// See [`Nic::prepare_sleep`].
    fn prepare_sleep(&mut self) -> bool {
        true
    }
    /// See [`Nic::end_sleep`].
    fn end_sleep(&mut self) {}
    /// See [`Nic::wait_exit`].
    fn wait_exit(&mut self, _max_us: u32) -> bool {
        false
    }
    fn vmq_link_stats(&mut self) -> Option<(LinkStats, u64)> {
        None
    }
    fn direct_stats(&self) -> Option<DirectStats> {
        None
    }
}

impl PeerLink for VmqLink {
    fn wait_exit(&mut self, max_us: u32) -> bool {
        self.idle(max_us);
        true
    }

    fn vmq_link_stats(&mut self) -> Option<(LinkStats, u64)> {
        Some((self.stats(), self.flushes()))
    }
}

impl PeerLink for DirectLink {
    fn prepare_sleep(&mut self) -> bool {
        DirectLink::prepare_sleep(self)
    }

    fn end_sleep(&mut self) {
        self.wake();
    }

    fn direct_stats(&self) -> Option<DirectStats> {
        Some(self.stats())
    }
}

/// Opens the VM-queue NIC to the guest called `peer`.
pub fn open_vmq(peer: &str, policy: LinkPolicy) -> Result<VmqNet<VmqLink>, NetError> {
    let link = VmqLink::open(peer, policy).map_err(NetError::Vmq)?;
    let me = link.my_id();
    Ok(VmqNet::new(link, drivers::vmq_net::mac_for(me)))
}

/// Opens the VM-queue NIC over a direct channel to the guest called `peer`.
pub fn open_direct(peer: &str) -> Result<VmqNet<DirectLink>, NetError> {
    let link = DirectLink::open(peer).map_err(NetError::Direct)?;
    let me = link.my_id();
    Ok(VmqNet::new(link, drivers::vmq_net::mac_for(me)))
}

impl<L: PeerLink> Nic for VmqNet<L> {
    fn wait_exit(&mut self, max_us: u32) -> bool {
        self.link_mut().wait_exit(max_us)
    }

    fn mac(&self) -> EthernetAddress {
        EthernetAddress(VmqNet::mac(self))
    }

    fn interface(&mut self, config: Config, now: Instant) -> Interface {
        Interface::new(config, self, now)
    }

    fn poll(&mut self, iface: &mut Interface, now: Instant, sockets: &mut Sockets) -> PollResult {
        // What this poll sent lazily leaves with the stack's next exit: at
        // the latest the kick-page wait of `Net::wait` (or its flush before
        // spinning in poll mode), so no flush of its own here.
        sockets.poll_device(iface, now, self)
    }

    fn rx_pending(&self) -> bool {
        // Pairs with the shim's fence between storing the inbox's `produced`
        // and loading `consumed` (see `Vmq::wait`): no lost wake-up before a
        // halt. (A direct link fences in its own sleep announcement.)
        core::sync::atomic::fence(Ordering::SeqCst);
        VmqNet::rx_pending(self)
    }

    fn prepare_sleep(&mut self) -> bool {
        self.link_mut().prepare_sleep()
    }

    fn end_sleep(&mut self) {
        self.link_mut().end_sleep();
    }

    fn flush(&mut self) {
        VmqNet::flush(self);
    }

    fn stats(&self) -> NetStats {
        VmqNet::stats(self)
    }

    fn rx_vector(&self) -> u8 {
        vector::VMQ_ARRIVAL
    }

    fn direct_stats(&self) -> Option<DirectStats> {
        self.link().direct_stats()
    }

    fn vmq_link_stats(&mut self) -> Option<(LinkStats, u64)> {
        self.link_mut().vmq_link_stats()
    }
}
