//! The udp-pingpong demo, unchanged, over the VM-queue NIC (issue 9 item 5,
//! leg `shim-vmqnet`): the guests get `net.dev=vmq net.vmq_peer=OTHER` and
//! the shim `--vmq on --no-net`, so there is no virtio-net device at all and
//! every frame is a VM-queue message the shim counts.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::Result;
use crate::infra::build;
use crate::scenario::pingpong;
use crate::vmm::shim;
use crate::vmm::stats::{GuestStats, VmqStats};

/// `net.vmq_policy=` values the leg runs.
pub const POLICIES: [&str; 3] = ["lazy", "immediate", "doorbell"];

/// Slack for a guest's hypercalls that are not flushes (boot, upcall
/// enabling, exit): twice the 4 one vCPU makes now.
const OTHER_HYPERCALLS: u64 = 8;

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

#[derive(Debug, Default)]
pub struct Outcome {
    pub checks: Vec<(String, bool)>,
    pub client: Option<pingpong::ClientResult>,
    pub guests: Vec<GuestFigures>,
    pub log: PathBuf,
}

impl Outcome {
    /// The leg's report line: RTT, rate and exits per frame of both guests.
    #[must_use]
    pub fn report_line(&self, policy: &str) -> Option<String> {
        let c = self.client.as_ref()?;
        let per = |name: &str| {
            self.guests.iter().find(|g| g.name == name).map_or_else(
                || "?".to_owned(),
                |g| {
                    #[allow(clippy::cast_precision_loss)] // counts far below 2^52
                    let hc = g.hypercall_exits as f64 / g.sends.max(1) as f64;
                    format!(
                        "{:.2} KVM exits/frame, {hc:.2} hypercall exits/send, {} kicks",
                        g.exits_per_frame(),
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
}

fn figures(name: &str, g: Option<&GuestStats>) -> GuestFigures {
    let vmq = g.and_then(|g| g.vmq.as_ref());
    GuestFigures {
        name: name.to_owned(),
        sends: vmq.map_or(0, VmqStats::sends),
        received: vmq.map_or(0, |v| v.received),
        errors: vmq.map_or(0, |v| v.errors.not_vm_exited()),
        vm_exited: vmq.map_or(0, |v| v.errors.vm_exited),
        exits: g.map_or(0, |g| g.exits),
        hypercall_exits: g.map_or(0, GuestStats::hypercall_exits),
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
    let names = ["server", "client1"];
    let guests: Vec<shim::Guest> = names
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
                names[1 - i as usize]
            ),
        })
        .collect();
    let extra = ["--vmq", "on", "--no-net"].map(str::to_owned);
    let run = shim::run(&shim_path, &guests, &extra, timeout, label, &mut echo)?;
    let mut out = Outcome {
        log: run.log.clone(),
        ..Outcome::default()
    };
    for name in names {
        out.checks.push(run.exit_check(name));
        let f = figures(name, run.guest_stats(name));
        guest_checks(policy, count, &f, &mut out.checks);
        out.guests.push(f);
    }
    let client = pingpong::parse_result("client1", shim::guest_lines(&run.lines, "client1"));
    match &client {
        Some(r) => out.checks.push((
            format!(
                "client1: all {count} pings came back (received {})",
                r.received
            ),
            r.sent == count && r.received == count,
        )),
        None => out.checks.push((
            format!("client1 printed its {}line", pingpong::RESULT_PREFIX),
            false,
        )),
    }
    out.client = client;
    if run.ending == crate::infra::process::Ending::TimedOut {
        out.checks.push((
            format!("the run ended within {} s", timeout.as_secs()),
            false,
        ));
    }
    if !out.checks.iter().all(|(_, ok)| *ok) {
        run.print_post_mortem();
    }
    Ok(out)
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
                "{name}: immediate: hypercall exits {} ≥ sends {}",
                f.hypercall_exits, f.sends
            ),
            f.hypercall_exits >= f.sends,
        )),
        // At most one flush per stack poll that sent: never more than one
        // per frame posted (refused ones included), plus the guest's few
        // other hypercalls (main reached, upcall enable, exit: 4 seen).
        "lazy" => {
            let posted = f.sends + f.errors + f.vm_exited;
            checks.push((
                format!(
                    "{name}: lazy: hypercall exits {} ≤ frames posted {posted} + {OTHER_HYPERCALLS}",
                    f.hypercall_exits
                ),
                f.hypercall_exits <= posted + OTHER_HYPERCALLS,
            ));
        }
        // The shim's monitor delivers: no flush exits at all.
        _ => checks.push((
            format!(
                "{name}: doorbell: sends {} ≥ 8 × hypercall exits {}",
                f.sends, f.hypercall_exits
            ),
            f.sends >= 8 * f.hypercall_exits.max(1),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::stats;

    fn stats(sent: u64, received: u64, hypercalls: u64, gone: u64, full: u64) -> GuestStats {
        let mut g = stats::sample("ktest");
        g.exits = 5000;
        g.vcpus.truncate(1);
        g.vcpus[0].exits.hypercall = hypercalls;
        g.vcpus[0].exits.intr = 9;
        g.doorbell.fallback_kicks = 3;
        g.nics.clear();
        let v = g.vmq.as_mut().unwrap();
        (v.sent_lazy, v.sent_immediate, v.sent_doorbell) = (sent, 0, 0);
        v.received = received;
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
        assert_eq!((f.sends, f.received, f.hypercall_exits), (1012, 1011, 1016));
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
        let ok = figures("client1", Some(&stats(1012, 1011, 1014, 2, 0)));
        assert!(failed("lazy", &ok).is_empty(), "{:?}", failed("lazy", &ok));
        assert!(failed("immediate", &ok).is_empty());
        // Doorbell delivery must not flush per frame.
        assert_eq!(failed("doorbell", &ok).len(), 1);
        let quiet = figures("client1", Some(&stats(1012, 1011, 3, 0, 0)));
        assert!(failed("doorbell", &quiet).is_empty());
        assert_eq!(failed("immediate", &quiet).len(), 1);
        // A dropped frame, a server seeing its peer gone, too few frames.
        assert_eq!(
            failed(
                "lazy",
                &figures("client1", Some(&stats(1012, 1011, 1014, 0, 1)))
            )
            .len(),
            1
        );
        assert_eq!(
            failed(
                "lazy",
                &figures("server", Some(&stats(1011, 1012, 1013, 1, 0)))
            )
            .len(),
            1
        );
        assert_eq!(
            failed(
                "lazy",
                &figures("server", Some(&stats(999, 1012, 999, 0, 0)))
            )
            .len(),
            1
        );
        // Lazy making more flushes than frames.
        assert_eq!(
            failed(
                "lazy",
                &figures("server", Some(&stats(1011, 1012, 2000, 0, 0)))
            )
            .len(),
            1
        );
    }
}
