//! Legs `shim-pingpong` and `qemu-pingpong`: the UDP ping-pong between two
//! guests, through the shim's switch or over a QEMU socket netdev.

use crate::scenario::pingpong;
use crate::test::leg::{Images, Leg, LegRun, Options, check_reports};
use crate::test::verdict;

/// Two guests through the host shim's switch.
pub struct ShimPingpong;

impl Leg for ShimPingpong {
    fn name(&self) -> &'static str {
        "shim-pingpong"
    }

    fn about(&self) -> &'static str {
        "two guests exchange 500 UDP pings through the host shim's switch, configured as `cargo xtask run` (doorbells, exitless wait, run to completion); every ping back, at most 0.6 steady-state KVM exits per packet per guest, queue notifications carried by the waits (at most 1 doorbell per 10 frames sent); again with `--rx-handoff monitor`: every frame a guest received announced to its monitor through its host-written range; and with TX by doorbell (`net.tx_at_wait=off`) and `--doorbell-nic-cpu 0`: every NIC notification written into the range its queue's route names, consumed by the monitor on CPU 0, none by the guests' own monitor on CPU 1"
    }

    fn run(&self, _: &mut Images, opts: &Options) -> LegRun {
        let mut checks = Vec::new();
        let mut reports = Vec::new();
        let mut log = None;
        for variant in [Variant::Default, Variant::RxHandoff, Variant::NicCpu] {
            let tag = variant.tag();
            match demo_checks(self.name(), opts, true, variant) {
                Ok(run) => {
                    checks.extend(
                        run.checks
                            .into_iter()
                            .map(|(n, ok)| (format!("{tag}{n}"), ok)),
                    );
                    reports.extend(run.reports.into_iter().map(|r| format!("{tag}{r}")));
                    log = log.or(run.log);
                }
                Err(e) => checks.push((format!("{tag}{e}"), false)),
            }
        }
        let mut all = check_reports(&checks);
        all.extend(reports);
        LegRun {
            outcome: verdict::judge_checks(&checks),
            reports: all,
            log,
        }
    }
}

/// Two QEMU/KVM guests over a socket netdev.
pub struct QemuPingpong;

impl Leg for QemuPingpong {
    fn name(&self) -> &'static str {
        "qemu-pingpong"
    }

    fn about(&self) -> &'static str {
        "two QEMU KVM guests exchange 500 UDP pings over a socket netdev; the client's RX interrupts must land on its CPU 1"
    }

    fn run(&self, _: &mut Images, opts: &Options) -> LegRun {
        run_demo(self.name(), opts, false)
    }
}

/// Steady-state KVM exits per packet a guest may take on the default path:
/// one exitless wait per received frame is 0.5 (the wait also carries the
/// guest's TX notification); measured 0.503–0.507 (`cargo xtask run`), the
/// rest being host interrupts that land while the vCPU runs. The margin
/// (0.1) covers more of those on a loaded machine. The path before (halt
/// call and RX interrupt) took 1.55.
pub const STEADY_EXITS_MAX: f64 = 0.6;

/// Which configuration a shim ping-pong run checks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// `cargo xtask run`'s.
    Default,
    /// `--rx-handoff monitor`: frames handed to the guests' monitors.
    RxHandoff,
    /// TX by doorbell and `--doorbell-nic-cpu 0`: NIC events routed to CPU 0.
    NicCpu,
}

/// The monitor `--doorbell-nic-cpu` names in [`Variant::NicCpu`]; the
/// guests' own is on the last CPU (`--pin sidecore`).
const NIC_CPU: usize = 0;

impl Variant {
    fn tag(self) -> &'static str {
        match self {
            Self::Default => "",
            Self::RxHandoff => "rx-handoff monitor: ",
            Self::NicCpu => "doorbell-nic-cpu 0: ",
        }
    }

    fn shim_args(self) -> Vec<String> {
        match self {
            Self::Default => Vec::new(),
            Self::RxHandoff => vec!["--rx-handoff".into(), "monitor".into()],
            Self::NicCpu => vec!["--doorbell-nic-cpu".into(), NIC_CPU.to_string()],
        }
    }
}

/// One ping-pong run as a leg.
fn run_demo(leg: &str, opts: &Options, on_shim: bool) -> LegRun {
    match demo_checks(leg, opts, on_shim, Variant::Default) {
        Ok(run) => {
            let mut reports = check_reports(&run.checks);
            reports.extend(run.reports);
            LegRun {
                outcome: verdict::judge_checks(&run.checks),
                reports,
                log: run.log,
            }
        }
        Err(e) => LegRun::broken(e),
    }
}

/// What one ping-pong run found: its named checks, report lines, log.
struct DemoRun {
    checks: Vec<(String, bool)>,
    reports: Vec<String>,
    log: Option<std::path::PathBuf>,
}

/// One ping-pong run in configuration `variant` (shim runs only; QEMU's is
/// always the default).
fn demo_checks(
    leg: &str,
    opts: &Options,
    on_shim: bool,
    variant: Variant,
) -> Result<DemoRun, String> {
    // Under QEMU the client's NIC interrupts go to its CPU 1: the run also
    // checks that its RX interrupts were all taken there. Under the shim the
    // run is `cargo xtask run`'s: the exitless wait takes no RX interrupt.
    let demo_opts = pingpong::Options {
        count: 500,
        timeout: opts.timeout,
        client_irq_cpu: (!on_shim).then_some(1),
        shim_args: variant.shim_args(),
        // TX by doorbell: every frame sent is a notification to route.
        extra_cmdline: if variant == Variant::NicCpu {
            " net.tx_at_wait=off".into()
        } else {
            String::new()
        },
        ..pingpong::Options::default()
    };
    let prefix = leg.to_owned();
    let verbose = opts.verbose;
    let report = if on_shim {
        pingpong::on_shim(&demo_opts, leg, |line| {
            if verbose || line.contains("report:") {
                println!("{prefix}: {line}");
            }
        })
    } else {
        pingpong::on_qemu(&demo_opts, leg, free_port())
    };
    let mut r = report.map_err(|e| e.to_string())?;
    if on_shim {
        for g in &r.guests {
            let steady = g.steady_exits_per_packet;
            r.checks.push((
                format!(
                    "{}: steady-state KVM exits per packet {} <= {STEADY_EXITS_MAX}",
                    g.name,
                    steady.map_or_else(|| "missing".to_owned(), |s| format!("{s:.3}"))
                ),
                steady.is_some_and(|s| s <= STEADY_EXITS_MAX),
            ));
            match variant {
                Variant::Default => r.checks.push(notified_by_waits(g)),
                Variant::RxHandoff => {
                    r.checks.push(notified_by_waits(g));
                    r.checks.push(handed_to_monitor(g));
                }
                Variant::NicCpu => {}
            }
        }
        if variant == Variant::NicCpu {
            r.checks.extend(routed_to_nic_cpu(&r));
        }
    }
    let mut reports: Vec<String> = r
        .clients
        .iter()
        .map(|c| {
            format!(
                "{}: rtt p50 {} us, p99 {} us, {} pps",
                c.name,
                c.p50_ns / 1000,
                c.p99_ns / 1000,
                c.pps
            )
        })
        .collect();
    reports.extend(r.guests.iter().filter_map(|g| {
        g.exits_per_packet()
            .map(|e| format!("{}: {e:.2} KVM exits per packet", g.name))
    }));
    let log = (!r.log.as_os_str().is_empty()).then(|| r.log.clone());
    Ok(DemoRun {
        checks: r.checks,
        reports,
        log,
    })
}

/// Frames sent per queue notification that was not a wait's: a sender about
/// to wait hands its frames over with the wait's exit, and a guest whose RX
/// ring stays stocked is not asked for refill notifications, so doorbells
/// (and register writes) are only the few around start and end.
pub const FRAMES_PER_NOTIFICATION_MIN: u64 = 10;

/// The default path's notifications ride on the waits: at most one doorbell
/// or register write per [`FRAMES_PER_NOTIFICATION_MIN`] frames sent, and at
/// least 9 in 10 frames sent by a wait that carried the notification.
fn notified_by_waits(g: &crate::scenario::pingpong::GuestReport) -> (String, bool) {
    let Some(n) = &g.numbers else {
        return (format!("{}: no stats", g.name), false);
    };
    let notes = n.notifications.total();
    (
        format!(
            "{}: {} frames sent, {} queue notifications, {} waits carrying TX \
             (notifications <= 1 per {FRAMES_PER_NOTIFICATION_MIN} frames, carried >= 9 in 10)",
            g.name, n.tx_packets, notes, n.tx_carried_by_waits
        ),
        n.tx_packets > 0
            && notes * FRAMES_PER_NOTIFICATION_MIN <= n.tx_packets
            && n.tx_carried_by_waits * 10 >= n.tx_packets * 9,
    )
}

/// With `--rx-handoff monitor` every frame the switch hands the guest becomes
/// an event its monitor consumes from the guest's host-written range: the
/// monitor, not the sender, pushes it into the RX ring. (A frame whose event
/// found the ring full is coalesced, so events may be a few fewer.)
fn handed_to_monitor(g: &crate::scenario::pingpong::GuestReport) -> (String, bool) {
    let Some(n) = &g.numbers else {
        return (format!("{}: no stats", g.name), false);
    };
    (
        format!(
            "{}: {} frames received, {} host events from its host-written range (>= 99 in 100)",
            g.name, n.rx_packets, n.host_events
        ),
        n.rx_packets > 0 && n.host_events * 100 >= n.rx_packets * 99,
    )
}

/// With `--doorbell-nic-cpu 0` each guest has a vCPU range on CPU 0's
/// monitor besides its own on the last CPU's, and the queue routes name CPU 0
/// for its NIC queues: the guest writes every NIC notification into the
/// CPU 0 range. So CPU 0's monitor consumes at least the doorbell
/// notifications both guests made, and the other monitor nothing.
fn routed_to_nic_cpu(r: &crate::scenario::pingpong::Report) -> Vec<(String, bool)> {
    if r.monitors.is_empty() {
        return vec![("the shim reported its monitors".into(), false)];
    }
    let notes = r.doorbell_notifications();
    let nic = r
        .monitors
        .iter()
        .find(|m| m.cpu == NIC_CPU)
        .map(|m| m.served);
    let others: u64 = r
        .monitors
        .iter()
        .filter(|m| m.cpu != NIC_CPU)
        .map(|m| m.served)
        .sum();
    vec![
        (
            format!(
                "{notes} doorbell notifications by both guests, {nic:?} records consumed by the monitor on CPU {NIC_CPU} (at least as many)"
            ),
            notes >= 500 && nic.is_some_and(|n| n >= notes),
        ),
        (
            format!(
                "the guests' own monitor consumed {others} records: none (every event was a NIC's)"
            ),
            others == 0,
        ),
    ]
}

/// A free loopback port for QEMU's socket netdev.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(17_001, |a| a.port())
}
