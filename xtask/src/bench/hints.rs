//! `cargo xtask bench hints`: the ping-pong with interrupt-vCPU hints (M2) off
//! and on, placed so the default is wrong for them: each guest's vCPU n pinned to
//! host CPU n, the NIC I/O threads pinned to host CPU 1, and the guests' stacks
//! (and by default their RX interrupts) on vCPU 0, i.e. host CPU 0.

use std::path::PathBuf;
use std::time::Duration;

use super::suite::{Better, Metric, RoundResult, Scenario, Suite};
use crate::error::{Error, Result};
use crate::scenario::hints::{self, Outcome, Setup};

const PINGS: u64 = 1000;

#[derive(Default)]
pub struct Hints {
    built: Option<(PathBuf, PathBuf)>,
}

/// The host CPU of the I/O threads, which is also the number of the vCPU that
/// shares it (`--pin 0,1`).
fn io_cpu(scenario: &str) -> usize {
    usize::from(scenario.starts_with("io1"))
}

fn setup(scenario: &str) -> Setup {
    let irq1 = scenario.starts_with("irq1");
    Setup {
        hints: scenario.ends_with("_on"),
        io_cpu: io_cpu(scenario),
        irq_cpu: irq1.then_some(1),
        move_after_irqs: None,
        count: PINGS,
        timeout: Duration::from_mins(2),
    }
}

#[allow(clippy::cast_precision_loss)] // counts far below 2^52
fn record(r: &mut RoundResult, id: &str, o: &Outcome) -> Result<()> {
    let Some(c) = &o.client else {
        return Err(Error::failed(format!(
            "{id}: the client printed no result (log {})",
            o.log.display()
        )));
    };
    if !o.exited_ok || c.received != c.sent {
        return Err(Error::failed(format!(
            "{id}: {} of {} pings came back (log {})",
            c.received,
            c.sent,
            o.log.display()
        )));
    }
    r.set(id, "rtt_p50_us", c.p50_ns as f64 / 1e3);
    r.set(id, "rtt_p99_us", c.p99_ns as f64 / 1e3);
    r.set(id, "pps", c.pps as f64);
    let total = o.irqs_total() as f64;
    // The vCPU with the I/O thread's number shares its host CPU (`--pin 0,1`).
    let io = io_cpu(id);
    r.set(id, "colocated_pct", 100.0 * o.irqs_on(io) as f64 / total);
    // on_rx wakes the stack's vCPU (0) with an IPI for every RX interrupt taken
    // elsewhere; KVM's binary stats have no IPI counter, so this is the guest's.
    r.set(
        id,
        "wake_ipis_per_packet",
        (total - o.irqs_on(0) as f64) / total,
    );
    let packets = (2 * c.received) as f64;
    r.set(id, "exits_per_packet", o.client_exits as f64 / packets);
    Ok(())
}

impl Suite for Hints {
    fn name(&self) -> &'static str {
        "hints"
    }

    fn about(&self) -> String {
        format!(
            "UDP ping-pong ({PINGS} × 64 B) between two 2-vCPU guests under the shim, \
             `--pin 0,1` (vCPU n on host CPU n), both NIC I/O threads pinned by `--io-cpu`; \
             the guests' stacks run on vCPU 0. Scenarios come in pairs, `<case>_off` (guests \
             booted with `hints=off`) and `<case>_on` (hints offered and followed where they \
             name the vCPU that runs the stack, declined elsewhere: an interrupt away from the \
             stack costs a wake IPI). `io1`: I/O threads on host CPU 1, interrupts by default \
             on vCPU 0 — the hint names vCPU 1; `io0`: I/O threads on host CPU 0, co-located \
             with the stack's vCPU — the hint names vCPU 0, where the interrupts already are; \
             `irq1`: I/O threads on host CPU 0 and the NIC interrupts first placed on vCPU 1 \
             (`net.irq_cpu=1`), away from the stack (the wrong default) — the hint names \
             vCPU 0 and brings them back. On / off = the pair's RTT p50 ratio within each \
             round. Co-located = RX \
             interrupts the client took on the vCPU sharing the I/O thread's host CPU (guest \
             per-CPU counters); wake IPIs = \
             guest IPIs to the stack's vCPU (one per RX interrupt taken elsewhere; KVM has \
             no IPI statistic); exits per packet = client KVM exits / (sent + received)."
        )
    }

    fn scenarios(&self) -> Vec<Scenario> {
        vec![
            Scenario::new("io1_off", "I/O thread on host CPU 1, hints=off"),
            Scenario::new("io1_on", "I/O thread on host CPU 1, hints on"),
            Scenario::new("io0_off", "I/O thread on host CPU 0, hints=off"),
            Scenario::new("io0_on", "I/O thread on host CPU 0, hints on"),
            Scenario::new(
                "irq1_off",
                "I/O thread on host CPU 0, interrupts placed on vCPU 1, hints=off",
            ),
            Scenario::new(
                "irq1_on",
                "I/O thread on host CPU 0, interrupts placed on vCPU 1, hints on",
            ),
        ]
    }

    fn metrics(&self) -> Vec<Metric> {
        vec![
            Metric::new("rtt_p50_us", "RTT p50", "µs", Better::Lower),
            Metric::new("rtt_p99_us", "RTT p99", "µs", Better::Lower),
            Metric::new(
                "on_over_off",
                "RTT p50 on / off (same round)",
                "×",
                Better::Lower,
            ),
            Metric::new("pps", "Ping-pongs per second", "pps", Better::Higher),
            Metric::new(
                "colocated_pct",
                "RX interrupts on the I/O thread's vCPU",
                "%",
                Better::Neither,
            ),
            Metric::new(
                "wake_ipis_per_packet",
                "Guest wake IPIs per RX interrupt",
                "IPIs/irq",
                Better::Lower,
            ),
            Metric::new(
                "exits_per_packet",
                "Client exits per packet",
                "exits/packet",
                Better::Lower,
            ),
        ]
    }

    fn baseline(&self) -> Option<&'static str> {
        Some("io1_off")
    }

    fn prepare(&mut self) -> Result<()> {
        self.built = Some(hints::prepare()?);
        Ok(())
    }

    fn round(&mut self, round: u32, order: &[Scenario]) -> Result<RoundResult> {
        let (shim_path, image) = match &self.built {
            Some(b) => b.clone(),
            None => hints::prepare()?,
        };
        let mut r = RoundResult::default();
        let mut p50 = std::collections::BTreeMap::new();
        for s in order {
            let o = hints::run(
                &shim_path,
                &image,
                &setup(s.id),
                &format!("bench-hints-{}-{round}", s.id),
                |_| {},
            )?;
            record(&mut r, s.id, &o)?;
            if let Some(c) = &o.client {
                p50.insert(s.id, c.p50_ns);
            }
        }
        #[allow(clippy::cast_precision_loss)] // nanoseconds far below 2^52
        for (id, on) in &p50 {
            let Some(case) = id.strip_suffix("_on") else {
                continue;
            };
            if let Some(&off) = p50.get(format!("{case}_off").as_str())
                && off > 0
            {
                r.set(id, "on_over_off", *on as f64 / off as f64);
            }
        }
        r.note("KVM's binary statistics have no IPI counter; IPIs are the guest's own wake IPIs.");
        Ok(r)
    }
}
