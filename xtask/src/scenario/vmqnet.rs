//! The udp-pingpong demo, unchanged, over the VM-queue NIC (leg
//! `shim-vmqnet`): the guests get `net.dev=vmq net.vmq_peer=OTHER` and
//! the shim `--vmq on --no-net`, so there is no virtio-net device at all and
//! every frame is a VM-queue message the shim counts.

use std::time::Duration;

use crate::error::Result;
use crate::infra::build;
use crate::scenario::pingpong;
use crate::vmm::shim;
use crate::vmm::stats::{GuestStats, VmqStats};

/// `net.vmq_policy=` values the leg runs.
pub const POLICIES: [&str; 3] = ["lazy", "immediate", "doorbell"];

/// The guests, server first.
pub const NAMES: [&str; 2] = ["server", "client1"];

/// One guest's numbers from the shim's stats.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestFigures {
    pub name: String,
    /// Frames sent as VM-queue messages (the shim's count, any policy).
    pub sends: u64,
    pub received: u64,
    /// Refused sends other than `vm_exited`.
    pub errors: u64,
    /// Sends refused because the peer had exited.
    pub vm_exited: u64,
    /// KVM exits of all kinds (in-kernel ones included).
    pub exits: u64,
    /// Hypercall exits the shim handled (flushes, plus boot and exit calls).
    pub hypercall_exits: u64,
    /// Its flush exits as the shim counted them (hypercall or kick page),
    /// of which `full_flushes` because its outbox was full; `waits`: the
    /// kick-page waits it made in place of halting.
    pub flush_exits: u64,
    pub full_flushes: u64,
    pub waits: u64,
    pub kicks: u64,
    /// Frames through a virtio-net device (must stay 0: there is none).
    pub virtio_packets: u64,
}

impl GuestFigures {
    /// KVM exits per frame sent or received.
    #[must_use]
    pub fn exits_per_frame(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)] // counts far below 2^52
        let r = self.exits as f64 / (self.sends + self.received).max(1) as f64;
        r
    }
}

/// What one run gave.
#[derive(Debug)]
pub struct Outcome {
    pub client: Option<pingpong::ClientResult>,
    /// `server`, then `client1`.
    pub guests: Vec<GuestFigures>,
    /// The shim's run: exits, console lines, log.
    pub run: shim::Run,
}

pub fn figures(name: &str, g: Option<&GuestStats>) -> GuestFigures {
    let vmq = g.and_then(|g| g.vmq.as_ref());
    GuestFigures {
        name: name.to_owned(),
        sends: vmq.map_or(0, VmqStats::sends),
        received: vmq.map_or(0, |v| v.received),
        errors: vmq.map_or(0, |v| v.errors.not_vm_exited()),
        vm_exited: vmq.map_or(0, |v| v.errors.vm_exited),
        exits: g.map_or(0, |g| g.exits),
        hypercall_exits: g.map_or(0, GuestStats::hypercall_exits),
        flush_exits: vmq.map_or(0, |v| v.flush_calls + v.kick_flushes + v.full_flushes),
        full_flushes: vmq.map_or(0, |v| v.full_flushes),
        waits: vmq.map_or(0, |v| v.waits),
        kicks: g.map_or(0, |g| g.doorbell.fallback_kicks),
        virtio_packets: g.map_or(0, |g| g.tx_packets() + g.rx_packets()),
    }
}

/// Runs one server and one client over VM queues with delivery `policy`.
pub fn on_shim(
    policy: &str,
    count: u64,
    timeout: Duration,
    label: &str,
    mut echo: impl FnMut(&str),
) -> Result<Outcome> {
    let opts = pingpong::Options {
        guests: 2,
        count,
        vcpus: 1,
        timeout,
        ..pingpong::Options::default()
    };
    let shim_path = shim::build()?;
    let image = build::build_guest(build::find_image("udp-pingpong")?)?;
    let guests: Vec<shim::Guest> = NAMES
        .iter()
        .zip(0..)
        .map(|(name, i)| shim::Guest {
            name: (*name).to_owned(),
            image: image.clone(),
            vcpus: opts.vcpus,
            mem_mib: 256,
            cmdline: format!(
                "{} net.dev=vmq net.vmq_peer={} net.vmq_policy={policy}",
                pingpong::cmdline(&opts, i),
                NAMES[1 - i as usize]
            ),
        })
        .collect();
    let extra = ["--vmq", "on", "--no-net"].map(str::to_owned);
    let run = shim::run(&shim_path, &guests, &extra, timeout, label, &mut echo)?;
    Ok(Outcome {
        client: pingpong::parse_result("client1", shim::guest_lines(&run.lines, "client1")),
        guests: NAMES
            .iter()
            .map(|name| figures(name, run.guest_stats(name)))
            .collect(),
        run,
    })
}
