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
    match scenario {
        "on_io0" | "irq1_off" | "irq1_on" => 0,
        _ => 1,
    }
}

fn setup(scenario: &str) -> Setup {
    let irq1 = scenario.starts_with("irq1");
    Setup {
        hints: !scenario.ends_with("off"),
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
             `--pin 0,1` (vCPU n on host CPU n) and `--io-cpu 1` (both NIC I/O threads on \
             host CPU 1), so the default RX interrupt placement (vCPU 0, host CPU 0) is not \
             co-located with the thread that raises the interrupts. `off`: guests booted \
             with `hints=off`; `on`: they follow the shim's hint to vCPU 1; `on_io0` (control): \
             I/O threads on host CPU 0, where the hint names vCPU 0, the default; `irq1_off` / \
             `irq1_on`: I/O threads on host CPU 0 and the NIC interrupts first placed on \
             vCPU 1 (`net.irq_cpu=1`), away from both the stack and the I/O thread; with \
             `hints=on` the hint moves them to vCPU 0. Co-located = RX \
             interrupts the client took on the vCPU sharing the I/O thread's host CPU (guest \
             per-CPU counters); wake IPIs = \
             guest IPIs to the stack's vCPU (one per RX interrupt taken elsewhere; KVM has \
             no IPI statistic); exits per packet = client KVM exits / (sent + received)."
        )
    }

    fn scenarios(&self) -> Vec<Scenario> {
        vec![
            Scenario::new("off", "hints=off (default placement)"),
            Scenario::new("on", "hints on"),
            Scenario::new("on_io0", "hints on, I/O thread on host CPU 0 (control)"),
            Scenario::new(
                "irq1_off",
                "I/O thread on host CPU 0, interrupts placed on vCPU 1, hints=off",
            ),
            Scenario::new(
                "irq1_on",
                "I/O thread on host CPU 0, interrupts placed on vCPU 1, hints=on",
            ),
        ]
    }

    fn metrics(&self) -> Vec<Metric> {
        vec![
            Metric::new("rtt_p50_us", "RTT p50", "µs", Better::Lower),
            Metric::new("rtt_p99_us", "RTT p99", "µs", Better::Lower),
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
        Some("off")
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
        for s in order {
            let o = hints::run(
                &shim_path,
                &image,
                &setup(s.id),
                &format!("bench-hints-{}-{round}", s.id),
                |_| {},
            )?;
            record(&mut r, s.id, &o)?;
        }
        r.note("KVM's binary statistics have no IPI counter; IPIs are the guest's own wake IPIs.");
        Ok(r)
    }
}
