//! `cargo xtask bench vmq`: the three-guest VM-queue pipeline (M5) under each
//! delivery policy and transfer, at 4 KiB, 64 KiB and 2 MiB messages.

use std::time::Duration;

use super::suite::{Better, Metric, RoundResult, Scenario, Suite};
use crate::error::{Error, Result};
use crate::scenario::pipeline::{self, Policy, Transfer};

/// MiB each run moves, by message size: enough messages past the warm-up
/// (a quarter of the stream, at least the reader's 16 MiB of send buffers)
/// for steady-state counts, few enough that a round stays short. 2 MiB
/// messages move 512 MiB: at 128 MiB only 32 of them were timed, a
/// fraction of a second in which one host hiccup moved the figure by half.
const fn mib_for(msg: u32) -> u64 {
    match msg {
        0..=4095 => 2,
        4096..=65536 => 16,
        _ => 512,
    }
}

/// Every policy with every transfer, at 64 B (copy only: a remap moves whole
/// pages), 4 KiB, 64 KiB and 2 MiB.
const SCENARIOS: &[(&str, Policy, Transfer, u32)] = &[
    ("immediate-copy-64b", Policy::Immediate, Transfer::Copy, 64),
    ("lazy-copy-64b", Policy::Lazy, Transfer::Copy, 64),
    ("doorbell-copy-64b", Policy::Doorbell, Transfer::Copy, 64),
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
        "doorbell-remap-4k",
        Policy::Doorbell,
        Transfer::Remap,
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
        "VM queues (M5): three guests under the shim, read → transform → write, \
             2 MiB (64 B messages), 16 MiB (4 and 64 KiB) or 512 MiB (2 MiB) per run \
             with every byte verified by the writer. The transform \
             XORs each message in place in its receive window and forwards the same \
             pages. Every role asks for no arrival upcall while it runs (it idles only \
             in kick-page waits). Immediate: every send is followed by a flush exit \
             (kick page); the transform's flush also waits for its next arrival when \
             none is there yet (one exit, not two); lazy: \
             messages wait in the outbox for the sender's next exit, at the latest \
             the kick-page wait it makes instead of halting (a flush only when the \
             outbox is full); doorbell: \
             an M1 doorbell event per send, the shim's monitor thread has a worker \
             drain the outbox. Copy: the \
             shim copies into the receiver's window; remap: the shim exchanges the \
             pages with mmap(MAP_FIXED). MiB/s and messages/s are the writer's (TSC, \
             first to last arrival); exits/message is KVM's exits of all three guests \
             between each guest's warm-up and end marks over the messages in between \
             (boot and first touches excluded); flushes/message is the senders' flush \
             exits as the shim counts them over their sends. `cargo xtask bench vmq`."
            .to_owned()
    }

    fn scenarios(&self) -> Vec<Scenario> {
        SCENARIOS
            .iter()
            .map(|(id, p, t, msg)| {
                let size = if *msg < 1024 {
                    format!("{msg} B")
                } else {
                    format!("{} KiB", msg >> 10)
                };
                Scenario::new(id, format!("{} {} {size}", p.name(), t.name()))
            })
            .collect()
    }

    fn metrics(&self) -> Vec<Metric> {
        vec![
            Metric::new("mib_per_s", "throughput", "MiB/s", Better::Higher),
            Metric::new("msgs_per_s", "message rate", "msgs/s", Better::Higher),
            Metric::new(
                "exits_per_msg",
                "steady KVM exits per message, all guests",
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
            ("lazy-copy-2m", "mib_per_s"),
            ("lazy-copy-4k", "msgs_per_s"),
            ("lazy-copy-2m", "exits_per_msg"),
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
            let mib = mib_for(msg);
            let o = pipeline::Options {
                policy,
                transfer,
                mib,
                msg,
                timeout: Duration::from_mins(3),
            };
            let out = pipeline::on_shim(&o, &format!("bench-vmq-{id}-{round}"), |_| {})?;
            if let Some((what, _)) = out.checks.iter().find(|(_, ok)| !ok) {
                return Err(Error::failed(format!("vmq {id}: {what}")));
            }
            let sends: u64 = out.guests.iter().map(|g| g.sends).sum();
            let flushes: u64 = out.guests.iter().map(|g| g.flush_exits).sum();
            let f = |n: u64| f64::from(u32::try_from(n).unwrap_or(u32::MAX));
            r.set(id, "mib_per_s", out.mib_per_s);
            r.set(
                id,
                "msgs_per_s",
                out.mib_per_s * 1_048_576.0 / f64::from(msg),
            );
            if let Some(x) = out.steady_exits_per_msg() {
                r.set(id, "exits_per_msg", x);
            }
            r.set(id, "flushes_per_msg", f(flushes) / f(sends.max(1)));
        }
        Ok(r)
    }
}
