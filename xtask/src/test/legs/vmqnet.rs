//! Leg `shim-vmqnet`: udp-pingpong, unchanged, over the VM-queue NIC under
//! each delivery policy: every ping back, every frame a VM-queue message, and
//! the hypercall exits each policy allows.

use crate::infra::process::Ending;
use crate::scenario::pingpong;
use crate::scenario::vmqnet::{self, GuestFigures, Outcome};
use crate::test::leg::{Images, Leg, LegRun, Options};
use crate::test::verdict;

/// The ping-pong over VM queues, once per policy.
pub struct ShimVmqNet;

impl Leg for ShimVmqNet {
    fn name(&self) -> &'static str {
        "shim-vmqnet"
    }

    fn about(&self) -> &'static str {
        "udp-pingpong, unchanged, over the VM-queue NIC (net.dev=vmq, no virtio-net) under lazy, immediate and doorbell delivery: every ping back, every frame a VM-queue message"
    }

    fn run(&self, _: &mut Images, opts: &Options) -> LegRun {
        run_vmqnet(self.name(), opts)
    }
}

fn run_vmqnet(leg: &str, opts: &Options) -> LegRun {
    let mut checks = Vec::new();
    let mut reports = Vec::new();
    let mut log = None;
    for policy in vmqnet::POLICIES {
        let count = 1000;
        let r = match vmqnet::on_shim(
            policy,
            count,
            opts.timeout,
            &format!("{leg}-{policy}"),
            |_| {},
        ) {
            Ok(r) => r,
            Err(e) => {
                checks.push((format!("{policy}: {e}"), false));
                continue;
            }
        };
        let run_checks = judge(policy, count, opts, &r);
        if !run_checks.iter().all(|(_, ok)| *ok) {
            r.run.print_post_mortem();
        }
        checks.extend(
            run_checks
                .into_iter()
                .map(|(n, ok)| (format!("{policy}: {n}"), ok)),
        );
        reports.extend(report_line(&r, policy));
        log = Some(r.run.log);
    }
    LegRun {
        outcome: verdict::judge_checks(&checks),
        reports,
        log,
    }
}

/// One run's checks: each guest exited 0 and its shim-counted figures fit
/// `policy`, every ping came back, the run ended in time.
fn judge(policy: &str, count: u64, opts: &Options, r: &Outcome) -> Vec<(String, bool)> {
    let mut checks = Vec::new();
    for f in &r.guests {
        checks.push(r.run.exit_check(&f.name));
        guest_checks(policy, count, f, &mut checks);
        // The stack does not ask for quiet arrivals: a frame that finds it
        // running comes as an M3 upcall, each delivered exactly once.
        let u = r.run.guest_stats(&f.name).and_then(|g| g.upcalls.as_ref());
        let (req, del) = u.map_or((0, 0), |u| {
            (u.requested.vmq_arrival, u.delivered.vmq_arrival)
        });
        checks.push((
            format!(
                "{}: VM-queue arrival upcalls each delivered once ({del} of {req})",
                f.name
            ),
            u.is_some() && del == req,
        ));
    }
    match &r.client {
        Some(c) => checks.push((
            format!(
                "client1: all {count} pings came back (received {})",
                c.received
            ),
            c.sent == count && c.received == count,
        )),
        None => checks.push((
            format!("client1 printed its {}line", pingpong::RESULT_PREFIX),
            false,
        )),
    }
    if r.run.ending == Ending::TimedOut {
        checks.push((
            format!("the run ended within {} s", opts.timeout.as_secs()),
            false,
        ));
    }
    checks
}

/// The leg's report line: RTT, rate and exits per frame of both guests.
#[must_use]
fn report_line(r: &Outcome, policy: &str) -> Option<String> {
    let c = r.client.as_ref()?;
    let per = |name: &str| {
        r.guests.iter().find(|g| g.name == name).map_or_else(
            || "?".to_owned(),
            |g| {
                #[allow(clippy::cast_precision_loss)] // counts far below 2^52
                let fl = g.flush_exits as f64 / g.sends.max(1) as f64;
                #[allow(clippy::cast_precision_loss)] // counts far below 2^52
                let hc = g.hypercall_exits as f64 / g.sends.max(1) as f64;
                format!(
                    "{:.2} KVM exits/frame, {fl:.2} flush exits/send, {hc:.2} hypercall exits/send, {} waits, {} kicks",
                    g.exits_per_frame(),
                    g.waits,
                    g.kicks
                )
            },
        )
    };
    #[allow(clippy::cast_precision_loss)] // nanoseconds far below 2^52
    let us = |ns: u64| ns as f64 / 1000.0;
    Some(format!(
        "vmqnet {policy}: {} pings, rtt p50 {:.1} us p99 {:.1} us, {} pps; client {}; server {}",
        c.received,
        us(c.p50_ns),
        us(c.p99_ns),
        c.pps,
        per("client1"),
        per("server"),
    ))
}

/// The checks on one guest's shim-counted figures under `policy`.
fn guest_checks(policy: &str, count: u64, f: &GuestFigures, checks: &mut Vec<(String, bool)>) {
    let name = &f.name;
    // Every ping and every echo is a frame; ARP and the byes come on top.
    checks.push((
        format!(
            "{name}: ≥ {count} frames sent as VM-queue messages ({}), ≥ {count} received ({})",
            f.sends, f.received
        ),
        f.sends >= count && f.received >= count,
    ));
    checks.push((
        format!(
            "{name}: no VM-queue send refused but for a gone peer ({})",
            f.errors
        ),
        f.errors == 0,
    ));
    // The client sends its bye three times and the server leaves after the
    // first: the repeats may find it gone. Nothing else may.
    let gone = if name == "client1" { 2 } else { 0 };
    checks.push((
        format!(
            "{name}: ≤ {gone} sends found the peer exited ({})",
            f.vm_exited
        ),
        f.vm_exited <= gone,
    ));
    checks.push((
        format!(
            "{name}: no frame went through virtio-net ({})",
            f.virtio_packets
        ),
        f.virtio_packets == 0,
    ));
    match policy {
        // Each frame makes its own flush exit.
        "immediate" => checks.push((
            format!(
                "{name}: immediate: flush exits {} ≥ sends {}",
                f.flush_exits, f.sends
            ),
            f.flush_exits >= f.sends,
        )),
        // Frames leave with the exit the stack's wait makes anyway: no
        // flush but for a full outbox, and not one per 100 frames.
        "lazy" => checks.push((
            format!(
                "{name}: lazy: flush exits {} all for a full outbox ({}) and ≤ sends {} / 100",
                f.flush_exits, f.full_flushes, f.sends
            ),
            f.flush_exits == f.full_flushes && f.flush_exits * 100 <= f.sends,
        )),
        // The shim's monitor delivers: no flush exits at all.
        _ => checks.push((
            format!(
                "{name}: doorbell: sends {} ≥ 8 × flush exits {}",
                f.sends, f.flush_exits
            ),
            f.sends >= 8 * f.flush_exits.max(1),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::vmqnet::figures;
    use crate::vmm::stats;
    use crate::vmm::stats::GuestStats;

    fn stats(sent: u64, received: u64, hypercalls: u64, gone: u64, full: u64) -> GuestStats {
        let mut g = stats::sample("ktest");
        g.exits = 5000;
        g.vcpus.truncate(1);
        g.vcpus[0].exits.hypercall = hypercalls + 4;
        g.vcpus[0].exits.intr = 9;
        g.doorbell.fallback_kicks = 3;
        g.nics.clear();
        let v = g.vmq.as_mut().unwrap();
        (v.sent_lazy, v.sent_immediate, v.sent_doorbell) = (sent, 0, 0);
        v.received = received;
        v.kick_flushes = hypercalls;
        v.errors.vm_exited = gone;
        v.errors.others = [
            ("queue_full".to_owned(), full),
            ("outside_ram".to_owned(), 0),
        ]
        .into_iter()
        .collect();
        g
    }

    fn failed(policy: &str, f: &GuestFigures) -> Vec<String> {
        let mut c = Vec::new();
        guest_checks(policy, 1000, f, &mut c);
        c.into_iter()
            .filter(|(_, ok)| !ok)
            .map(|(n, _)| n)
            .collect()
    }

    #[test]
    fn figures_come_from_the_shims_vmq_counters() {
        let f = figures("client1", Some(&stats(1012, 1011, 1016, 2, 0)));
        assert_eq!(
            (f.sends, f.received, f.flush_exits, f.hypercall_exits),
            (1012, 1011, 1016, 1020)
        );
        assert_eq!(
            (f.errors, f.vm_exited, f.kicks, f.virtio_packets),
            (0, 2, 3, 0)
        );
        assert!((f.exits_per_frame() - 5000.0 / 2023.0).abs() < 1e-9);
        assert_eq!(
            figures("x", None),
            GuestFigures {
                name: "x".into(),
                ..GuestFigures::default()
            }
        );
    }

    #[test]
    fn the_checks_catch_refusals_missing_frames_and_extra_exits() {
        let flushing = figures("client1", Some(&stats(1012, 1011, 1014, 2, 0)));
        assert!(failed("immediate", &flushing).is_empty());
        // Doorbell and lazy delivery must not flush per frame.
        assert_eq!(failed("doorbell", &flushing).len(), 1);
        assert_eq!(failed("lazy", &flushing).len(), 1);
        let quiet = figures("client1", Some(&stats(1012, 1011, 0, 2, 0)));
        assert!(
            failed("lazy", &quiet).is_empty(),
            "{:?}",
            failed("lazy", &quiet)
        );
        assert!(failed("doorbell", &quiet).is_empty());
        assert_eq!(failed("immediate", &quiet).len(), 1);
        // A lazy flush of a full outbox is allowed, rarely.
        let mut full = figures("client1", Some(&stats(1012, 1011, 3, 2, 0)));
        assert_eq!(failed("lazy", &full).len(), 1);
        full.full_flushes = 3;
        assert!(failed("lazy", &full).is_empty());
        // A dropped frame, a server seeing its peer gone, too few frames.
        assert_eq!(
            failed(
                "lazy",
                &figures("client1", Some(&stats(1012, 1011, 0, 0, 1)))
            )
            .len(),
            1
        );
        assert_eq!(
            failed(
                "lazy",
                &figures("server", Some(&stats(1011, 1012, 0, 1, 0)))
            )
            .len(),
            1
        );
        assert_eq!(
            failed("lazy", &figures("server", Some(&stats(999, 1012, 0, 0, 0)))).len(),
            1
        );
    }
}
