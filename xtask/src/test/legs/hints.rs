//! Leg `shim-hints`: interrupt-vCPU hints (M2) on the ping-pong, with the NIC
//! I/O thread pinned and moved at run time.

use std::time::Duration;

use crate::error::Result;
use crate::scenario::hints::{Outcome, Setup, prepare, run};
use crate::test::leg::{Images, Leg, LegRun, Options};

/// Hints on, hints off, and the I/O thread moved.
pub struct ShimHints;

impl Leg for ShimHints {
    fn name(&self) -> &'static str {
        "shim-hints"
    }

    fn about(&self) -> &'static str {
        "ping-pong with pinned NIC I/O threads: a hint naming a vCPU other than the stack's is declined (interrupts stay on vCPU 0), one naming the stack's vCPU moves interrupts placed on vCPU 1 back to it, also when the I/O thread moves mid-run; hints=off leaves placement alone"
    }

    fn run(&self, _: &mut Images, opts: &Options) -> LegRun {
        match leg_checks(opts.timeout, |_| {}) {
            Ok(checks) => LegRun::from_checks(&checks, Vec::new(), None),
            Err(e) => LegRun::broken(e.to_string()),
        }
    }
}

/// Every hint the shim published was also announced by an M3 `HintUpdate`
/// upcall, which the guest acknowledged and handed to its NIC's hint follower.
fn hint_upcall_check(o: &Outcome, what: &str, hints: u64) -> (String, bool) {
    let (req, del) = o.hint_upcalls();
    let announced = o.shim_rx().map_or(0, |q| q.hints_announced);
    let handled = o.guest_hints().map_or(0, |h| h.upcalls);
    (
        format!(
            "{what}: each of the {hints} hint(s) announced by a HintUpdate upcall ({announced} announced, {req} requested, {del} delivered, {handled} handled by the guest)"
        ),
        announced == hints && req == hints && del == hints && handled == hints,
    )
}

/// The `shim-hints` leg: hints on (I/O thread on host CPU 1: interrupts move
/// to vCPU 1 after the first), hints off (they stay on vCPU 0), and a run-time
/// move of the I/O thread to host CPU 0 (a new hint; they come back to vCPU 0).
#[allow(clippy::too_many_lines)] // four runs, each with its checks in order
pub fn leg_checks(timeout: Duration, mut echo: impl FnMut(&str)) -> Result<Vec<(String, bool)>> {
    let (shim_path, image) = prepare()?;
    let base = Setup {
        hints: true,
        io_cpu: 1,
        irq_cpu: None,
        move_after_irqs: None,
        count: 300,
        timeout,
    };
    let mut checks = Vec::new();
    let common = |o: &Outcome, what: &str, checks: &mut Vec<(String, bool)>| {
        let c = o.client.as_ref();
        checks.push((
            format!(
                "{what}: both guests exited 0 and all {} pings came back (log {})",
                base.count,
                o.log.display()
            ),
            o.exited_ok && c.is_some_and(|c| c.received == base.count),
        ));
    };

    // The hint names vCPU 1 (the I/O thread's), the stack runs on vCPU 0: an
    // interrupt there would need a wake IPI, so the guest declines it.
    let on = run(&shim_path, &image, &base, "shim-hints-on", &mut echo)?;
    common(&on, "hints on", &mut checks);
    checks.push((
        format!(
            "hints on, hint away from the stack: declined, RX interrupts stay on the stack's vCPU 0 (per CPU {:?}; guest {})",
            on.client.as_ref().map(|c| c.rx_irqs_by_cpu.clone()),
            on.guest_hints_text()
        ),
        on.irqs_on(1) == 0
            && on.irqs_on(0) >= base.count
            && on.retargeted() == 0
            && on.guest_hints().is_some_and(|h| h.declined == 1),
    ));
    checks.push((
        format!(
            "hints on: the shim sent one hint naming vCPU 1 ({})",
            on.shim_rx_text()
        ),
        on.shim_rx()
            .is_some_and(|q| q.hints_sent == 1 && q.hints_honoured == 0 && q.last_vcpus == [1]),
    ));
    checks.push(hint_upcall_check(&on, "hints on", 1));

    let off = run(
        &shim_path,
        &image,
        &Setup {
            hints: false,
            ..base.clone()
        },
        "shim-hints-off",
        &mut echo,
    )?;
    common(&off, "hints=off", &mut checks);
    checks.push((
        format!(
            "hints=off: RX interrupts stay on vCPU 0 (per CPU {:?}; guest {})",
            off.client.as_ref().map(|c| c.rx_irqs_by_cpu.clone()),
            off.guest_hints_text()
        ),
        off.irqs_on(1) == 0
            && off.irqs_on(0) >= base.count
            && off.guest_hints().is_some_and(|h| h.state == "off")
            && off.retargeted() == 0,
    ));

    // Interrupts first placed on vCPU 1 (net.irq_cpu=1), the I/O thread on
    // host CPU 0: the hint names vCPU 0, where the stack runs, and is followed.
    let back = run(
        &shim_path,
        &image,
        &Setup {
            io_cpu: 0,
            irq_cpu: Some(1),
            ..base.clone()
        },
        "shim-hints-back",
        &mut echo,
    )?;
    common(&back, "hint to the stack", &mut checks);
    checks.push((
        format!(
            "hint to the stack's vCPU: RX interrupts move from vCPU 1 to vCPU 0 after the first (per CPU {:?}; guest {})",
            back.client.as_ref().map(|c| c.rx_irqs_by_cpu.clone()),
            back.guest_hints_text()
        ),
        back.irqs_on(1) <= 2 && back.irqs_on(0) >= base.count && back.retargeted() == 1,
    ));
    checks.push((
        format!(
            "hint to the stack's vCPU: the shim sent a hint naming vCPU 0 and saw it honoured ({})",
            back.shim_rx_text()
        ),
        back.shim_rx()
            .is_some_and(|q| q.hints_sent == 1 && q.hints_honoured == 1 && q.last_vcpus == [0]),
    ));
    checks.push(hint_upcall_check(&back, "hint to the stack", 1));

    // Interrupts on vCPU 1 with the I/O thread on host CPU 1 (already where the
    // hint says), then the I/O thread moves to host CPU 0: the second hint
    // names the stack's vCPU and the interrupts follow it there.
    let moved = run(
        &shim_path,
        &image,
        &Setup {
            irq_cpu: Some(1),
            move_after_irqs: Some((150, 0)),
            ..base.clone()
        },
        "shim-hints-move",
        &mut echo,
    )?;
    common(&moved, "I/O thread moved", &mut checks);
    checks.push((
        format!(
            "I/O thread moved to host CPU 0 after 150 interrupts: a second hint names vCPU 0 ({})",
            moved.shim_rx_text()
        ),
        moved
            .shim_rx()
            .is_some_and(|q| q.hints_sent == 2 && q.last_vcpus == [0])
            && moved.shim_hints.as_ref().is_some_and(|h| h.io_moves == 2),
    ));
    checks.push((
        format!(
            "I/O thread moved: the interrupts stayed on vCPU 1 (already hinted), then followed the second hint to vCPU 0 (per CPU {:?}; guest {})",
            moved.client.as_ref().map(|c| c.rx_irqs_by_cpu.clone()),
            moved.guest_hints_text()
        ),
        moved.retargeted() == 1
            && moved.guest_hints().is_some_and(|h| h.already == 1)
            && moved.irqs_on(1) >= 100
            && moved.irqs_on(0) >= 100,
    ));
    checks.push(hint_upcall_check(&moved, "I/O thread moved", 2));
    Ok(checks)
}
