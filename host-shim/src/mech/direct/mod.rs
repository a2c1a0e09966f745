//! Direct channels between guests, host half (`para_abi::direct`): at set-up
//! the shim gives every pair of guests with VM queues a ring pair and then
//! stays out of the per-frame path.
//!
//! Each guest of a pair owns one endpoint: host memory of
//! `direct::ENDPOINT_SIZE` bytes mapped into its owner read-write and into
//! the peer through a `KVM_MEM_READONLY` memslot. A guest therefore reads the
//! other's producer index, consumer index and frames, and can write only its
//! own; its write to the peer's endpoint exits as MMIO and is refused and
//! counted here ([`Refused::WriteToPeer`]). Receivers validate what they read
//! (para-abi's `Receiver`), so a hostile peer spoils only its own frames.
//!
//! The one host action on a channel is a wake-up: a receiver about to halt
//! announces it in its endpoint; the sender that sees the announcement sends
//! one M1 doorbell event (device `direct::DOORBELL_DEVICE`, queue = the
//! sleeper's VM-queue id), which the monitor runs on its own thread: it posts
//! the sleeper an arrival notification (an M3 upcall, or an MSI without
//! upcalls), the same "look again" VM-queue arrivals use.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{KVM_MEM_READONLY, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use para_abi::direct;
use para_abi::discovery::{LEAF_DIRECT, area_registers, features};
use para_abi::layout::area;
use para_abi::vmq::DIR_ENTRIES;
use serde::Serialize;

use crate::counters::Tally;
use crate::kvm::cpuid::Offer;
use crate::kvm::memory::{SharedMapping, slot};
use crate::mech::Mechanism;
use crate::mech::doorbell::CallTarget;
use crate::platform::MmioDevice;
use crate::report::GuestReport;
use crate::sync::lock;

#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    #[error("guest {0}: VM-queue id {1} has no channel slot (at most {DIR_ENTRIES} guests)")]
    TooMany(String, u32),
    #[error("endpoint memory: {0}")]
    Memory(std::io::Error),
    #[error("KVM_SET_USER_MEMORY_REGION for a direct channel: {0}")]
    Slot(kvm_ioctls::Error),
}

crate::reasons! {
    /// Why a guest's access around its direct channels was refused.
    pub Refused {
        /// A write to the peer's endpoint (mapped read-only).
        WriteToPeer => "write_to_peer_endpoint",
        /// An access to the channel area where no channel is mapped.
        Unmapped => "unmapped_channel_access",
        /// A wake-up request naming no guest it has a channel with.
        WakeUnknownPeer => "wake_unknown_peer",
    }
}

/// Tells a guest to look at its channels again (an upcall or an MSI).
pub type Wake = Box<dyn Fn() + Send + Sync>;

/// One guest that joined the run's channels.
struct Member {
    id: u32,
    wake: Wake,
    counters: Arc<Counters>,
}

/// A guest's counters.
#[derive(Debug, Default)]
pub struct Counters {
    /// Channels this guest has.
    channels: AtomicU64,
    /// Wake-ups this guest asked for its peers (through doorbell events).
    wakes_sent: AtomicU64,
    /// Wake-ups posted to this guest.
    wakes_received: AtomicU64,
    refused: Tally<Refused>,
}

/// This guest's part of the stats JSON, under `direct`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DirectReport {
    pub channels: u64,
    pub wakes_sent: u64,
    pub wakes_received: u64,
    pub refused: std::collections::BTreeMap<&'static str, u64>,
}

/// Every channel of one shim run.
#[derive(Default)]
pub struct Channels {
    members: Mutex<Vec<Member>>,
    /// The endpoints' memory: each is mapped into two VMs, so it lives as
    /// long as the run (dropped after every VM).
    endpoints: Mutex<Vec<Arc<SharedMapping>>>,
}

/// Maps `mem` into `vm` at `gpa` as memslot `slot`.
fn map(
    vm: &VmFd,
    mem: &SharedMapping,
    slot: u32,
    gpa: u64,
    readonly: bool,
) -> Result<(), DirectError> {
    let desc = kvm_userspace_memory_region {
        slot,
        flags: if readonly { KVM_MEM_READONLY } else { 0 },
        guest_phys_addr: gpa,
        memory_size: mem.len() as u64,
        userspace_addr: mem.as_ptr() as u64,
    };
    // SAFETY: `mem` is kept in `Channels::endpoints`, which every joined
    // guest's mechanism keeps alive and which drops its members (and with
    // them their VM handles) before its endpoints, so the host range stays
    // mapped while a vCPU of either VM can run.
    unsafe { vm.set_user_memory_region(desc) }.map_err(DirectError::Slot)
}

/// Memslots of guest-side channel `peer`: its own endpoint, then the peer's.
fn slots(peer: u32) -> (u32, u32) {
    (
        slot::DIRECT_FIRST + 2 * peer,
        slot::DIRECT_FIRST + 2 * peer + 1,
    )
}

impl Channels {
    /// Joins guest `name` (VM-queue id `id`, VM `vm`) and gives it a channel
    /// to every guest that joined before; `wake` makes it look again.
    pub fn join(
        self: &Arc<Self>,
        name: &str,
        id: u32,
        vm: &VmFd,
        peers: &[(u32, &VmFd)],
        wake: Wake,
    ) -> Result<GuestDirect, DirectError> {
        if direct::channel(id).is_none() {
            return Err(DirectError::TooMany(name.into(), id));
        }
        let counters = Arc::new(Counters::default());
        for &(peer, peer_vm) in peers {
            let (Some((own_at, theirs_at)), Some((their_own_at, their_view_of_me))) =
                (direct::channel(peer), direct::channel(id))
            else {
                return Err(DirectError::TooMany(name.into(), peer));
            };
            let mine =
                Arc::new(SharedMapping::new(direct::ENDPOINT_SIZE).map_err(DirectError::Memory)?);
            let theirs =
                Arc::new(SharedMapping::new(direct::ENDPOINT_SIZE).map_err(DirectError::Memory)?);
            let (my_slot, my_view_slot) = slots(peer);
            let (their_slot, their_view_slot) = slots(id);
            map(vm, &mine, my_slot, own_at, false)?;
            map(vm, &theirs, my_view_slot, theirs_at, true)?;
            map(peer_vm, &theirs, their_slot, their_own_at, false)?;
            map(peer_vm, &mine, their_view_slot, their_view_of_me, true)?;
            lock(&self.endpoints).extend([mine, theirs]);
            counters.channels.fetch_add(1, Ordering::Relaxed);
            if let Some(m) = lock(&self.members).iter().find(|m| m.id == peer) {
                m.counters.channels.fetch_add(1, Ordering::Relaxed);
            }
        }
        lock(&self.members).push(Member {
            id,
            wake,
            counters: counters.clone(),
        });
        Ok(GuestDirect {
            name: name.into(),
            id,
            channels: self.clone(),
            counters,
        })
    }

    /// Guest `from` asks to wake guest `to`: true when they share a channel.
    fn wake(&self, from: u32, to: u32) -> bool {
        let members = lock(&self.members);
        let has = |id| members.iter().any(|m| m.id == id);
        if from == to || !has(from) {
            return false;
        }
        match members.iter().find(|m| m.id == to) {
            Some(m) => {
                m.counters.wakes_received.fetch_add(1, Ordering::Relaxed);
                (m.wake)();
                true
            }
            None => false,
        }
    }
}

/// One guest's direct channels, as a mechanism: the offer, the refusal of
/// exiting accesses to the channel area, the wake-up target, the report.
pub struct GuestDirect {
    name: String,
    id: u32,
    channels: Arc<Channels>,
    counters: Arc<Counters>,
}

impl GuestDirect {
    /// The doorbell device its wake-up requests arrive on (run by the monitor).
    #[must_use]
    pub fn wake_target(self: &Arc<Self>) -> CallTarget {
        let me = self.clone();
        CallTarget {
            device: direct::DOORBELL_DEVICE,
            queues: DIR_ENTRIES as u16,
            call: Arc::new(move |to| {
                let ok = me.channels.wake(me.id, u32::from(to));
                if ok {
                    me.counters.wakes_sent.fetch_add(1, Ordering::Relaxed);
                } else {
                    me.counters.refused.reject(
                        Refused::WakeUnknownPeer,
                        &me.name,
                        "direct channel",
                        format_args!("wake-up for guest {to}"),
                    );
                }
                ok
            }),
        }
    }

    #[must_use]
    pub fn report(&self) -> DirectReport {
        let c = &self.counters;
        DirectReport {
            channels: c.channels.load(Ordering::Relaxed),
            wakes_sent: c.wakes_sent.load(Ordering::Relaxed),
            wakes_received: c.wakes_received.load(Ordering::Relaxed),
            refused: c.refused.snapshot(),
        }
    }

    fn refuse(&self, addr: u64, write: bool) {
        // Inside a channel that exists, only the peer's (read-only) endpoint
        // exits on a write; the gap after each endpoint, and channels to
        // guests that are not peers, are holes.
        let off = addr - area::DIRECT;
        let peer = u32::try_from(off / direct::CHANNEL_STRIDE).ok();
        let in_peer_endpoint = (direct::ENDPOINT_STRIDE
            ..direct::ENDPOINT_STRIDE + direct::ENDPOINT_SIZE as u64)
            .contains(&(off % direct::CHANNEL_STRIDE));
        let is_peer = peer.is_some_and(|p| {
            p != self.id && lock(&self.channels.members).iter().any(|m| m.id == p)
        });
        let r = if write && is_peer && in_peer_endpoint {
            Refused::WriteToPeer
        } else {
            Refused::Unmapped
        };
        self.counters.refused.reject(
            r,
            &self.name,
            "direct channel",
            format_args!("{} at {addr:#x}", if write { "write" } else { "read" }),
        );
    }
}

impl Mechanism for GuestDirect {
    fn name(&self) -> &'static str {
        "direct"
    }

    fn offer(&self) -> Option<Offer> {
        Some(Offer {
            feature: features::DIRECT_CHANNELS,
            leaf: LEAF_DIRECT,
            regs: area_registers(area::DIRECT, area::DIRECT_SIZE as u32, direct::VERSION),
        })
    }

    fn mmio(self: Arc<Self>) -> Option<Arc<dyn MmioDevice>> {
        Some(self)
    }

    fn report(&self, r: &mut GuestReport) {
        let d = GuestDirect::report(self);
        r.other_summary.push(format!(
            "direct channels: {}, wake-ups sent {}, received {}, refused {}",
            d.channels,
            d.wakes_sent,
            d.wakes_received,
            d.refused.values().sum::<u64>()
        ));
        if let Ok(v) = serde_json::to_value(d) {
            r.other.insert("direct", v);
        }
    }
}

impl MmioDevice for GuestDirect {
    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        if !(area::DIRECT..area::DIRECT + area::DIRECT_SIZE).contains(&addr) {
            return false;
        }
        self.refuse(addr, false);
        data.fill(0);
        true
    }

    fn mmio_write(&self, addr: u64, _data: &[u8]) -> bool {
        if !(area::DIRECT..area::DIRECT + area::DIRECT_SIZE).contains(&addr) {
            return false;
        }
        self.refuse(addr, true);
        true
    }
}

#[cfg(test)]
mod tests;
