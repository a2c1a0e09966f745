//! `cargo xtask bench vmq`: the three-guest VM-queue pipeline (M5) under each
//! delivery policy and transfer, at 4 KiB, 64 KiB and 2 MiB messages.

use std::time::Duration;

use super::suite::{Better, Metric, RoundResult, Scenario, Suite};
use crate::error::{Error, Result};
use crate::scenario::pipeline::{self, Policy, Transfer};

/// MiB each run moves: enough for hundreds of 64 KiB messages, short enough
/// that 12 scenarios × a few rounds stay well under 15 minutes.
const MIB: u64 = 16;

const SCENARIOS: &[(&str, Policy, Transfer, u32)] = &[
    (
        "immediate-copy-4k",
        Policy::Immediate,
        Transfer::Copy,
        4 << 10,
    ),
    (
        "immediate-remap-4k",
        Policy::Immediate,
        Transfer::Remap,
        4 << 10,
    ),
    ("lazy-copy-4k", Policy::Lazy, Transfer::Copy, 4 << 10),
    ("lazy-remap-4k", Policy::Lazy, Transfer::Remap, 4 << 10),
    (
        "doorbell-copy-4k",
        Policy::Doorbell,
        Transfer::Copy,
        4 << 10,
    ),
    (
        "immediate-copy-64k",
        Policy::Immediate,
        Transfer::Copy,
        64 << 10,
    ),
    (
        "immediate-remap-64k",
        Policy::Immediate,
        Transfer::Remap,
        64 << 10,
    ),
    ("lazy-copy-64k", Policy::Lazy, Transfer::Copy, 64 << 10),
    ("lazy-remap-64k", Policy::Lazy, Transfer::Remap, 64 << 10),
    (
        "doorbell-copy-64k",
        Policy::Doorbell,
        Transfer::Copy,
        64 << 10,
    ),
    (
        "doorbell-remap-64k",
        Policy::Doorbell,
        Transfer::Remap,
        64 << 10,
    ),
    (
        "immediate-copy-2m",
        Policy::Immediate,
        Transfer::Copy,
        2 << 20,
    ),
    (
        "immediate-remap-2m",
        Policy::Immediate,
        Transfer::Remap,
        2 << 20,
    ),
    ("lazy-copy-2m", Policy::Lazy, Transfer::Copy, 2 << 20),
    ("lazy-remap-2m", Policy::Lazy, Transfer::Remap, 2 << 20),
    (
        "doorbell-copy-2m",
        Policy::Doorbell,
        Transfer::Copy,
        2 << 20,
    ),
    (
        "doorbell-remap-2m",
        Policy::Doorbell,
        Transfer::Remap,
        2 << 20,
    ),
];

#[derive(Default)]
pub struct Vmq;

impl Suite for Vmq {
    fn name(&self) -> &'static str {
        "vmq"
    }

    fn about(&self) -> String {
        format!(
            "VM queues (M5): three guests under the shim, read → transform → write, \
             {MIB} MiB per run with every byte verified by the writer. The transform \
             XORs each message in place in its receive window and forwards the same \
             pages. Immediate: every send is followed by a flush hypercall; lazy: \
             messages wait in the outbox for the sender's next exit (a flush only \
             when the outbox is full or the guest would otherwise idle); doorbell: \
             an M1 doorbell event per send, the shim's monitor thread has a worker \
             drain the outbox. Copy: the \
             shim copies into the receiver's window; remap: the shim exchanges the \
             pages with mmap(MAP_FIXED). MiB/s is the writer's (TSC, first to last \
             arrival); exits/message is KVM's exits of all three guests over the \
             messages moved; flushes/message counts the senders' hypercalls. \
             `cargo xtask bench vmq`."
        )
    }

    fn scenarios(&self) -> Vec<Scenario> {
        SCENARIOS
            .iter()
            .map(|(id, p, t, msg)| {
                Scenario::new(id, format!("{} {} {} KiB", p.name(), t.name(), msg >> 10))
            })
            .collect()
    }

    fn metrics(&self) -> Vec<Metric> {
        vec![
            Metric::new("mib_per_s", "throughput", "MiB/s", Better::Higher),
            Metric::new(
                "exits_per_msg",
                "KVM exits per message",
                "exits/msg",
                Better::Lower,
            ),
            Metric::new(
                "flushes_per_msg",
                "flush hypercalls per send",
                "flushes/send",
                Better::Lower,
            ),
        ]
    }

    fn baseline(&self) -> Option<&'static str> {
        Some("immediate-copy-64k")
    }

    fn headline(&self) -> Vec<(&'static str, &'static str)> {
        vec![
            ("lazy-copy-64k", "mib_per_s"),
            ("lazy-copy-64k", "exits_per_msg"),
        ]
    }

    fn prepare(&mut self) -> Result<()> {
        crate::vmm::shim::build()?;
        crate::infra::build::build_guest(crate::infra::build::find_image("pipeline")?)?;
        Ok(())
    }

    fn round(&mut self, round: u32, order: &[Scenario]) -> Result<RoundResult> {
        let mut r = RoundResult::default();
        for s in order {
            let Some(&(id, policy, transfer, msg)) = SCENARIOS.iter().find(|x| x.0 == s.id) else {
                continue;
            };
            let o = pipeline::Options {
                policy,
                transfer,
                mib: MIB,
                msg,
                timeout: Duration::from_mins(3),
            };
            let out = pipeline::on_shim(&o, &format!("bench-vmq-{id}-{round}"), |_| {})?;
            if let Some((what, _)) = out.checks.iter().find(|(_, ok)| !ok) {
                return Err(Error::failed(format!("vmq {id}: {what}")));
            }
            let msgs = f64::from(u32::try_from((MIB << 20) / u64::from(msg)).unwrap_or(u32::MAX));
            let exits: u64 = out.guests.iter().map(|g| g.exits).sum();
            let sends: u64 = out.guests.iter().map(|g| g.sends).sum();
            let flushes: u64 = out.guests.iter().map(|g| g.flushes).sum();
            let f = |n: u64| f64::from(u32::try_from(n).unwrap_or(u32::MAX));
            r.set(id, "mib_per_s", out.mib_per_s);
            r.set(id, "exits_per_msg", f(exits) / msgs);
            r.set(id, "flushes_per_msg", f(flushes) / f(sends.max(1)));
        }
        Ok(r)
    }
}
