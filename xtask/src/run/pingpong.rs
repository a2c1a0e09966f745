//! `cargo xtask run`: the project's main job — the host shim running a UDP
//! ping-pong between guests, with a summary of packets, round-trip times and
//! VM exits per packet.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::error::Result;
use crate::infra::setup;
use crate::scenario::pingpong::{self, Link, Options, Report};
use crate::vmm::exit::GuestExit;

pub fn run(opts: &Options, json_path: Option<&Path>, verbose: bool) -> Result<()> {
    setup::ensure_guest_target()?;
    println!(
        "cargo xtask run: building host-shim and the udp-pingpong guest, then starting {} guests under the shim",
        opts.guests
    );
    let report = pingpong::on_shim(opts, "run-pingpong", |line| {
        if verbose || shown_at_once(line) {
            println!("{line}");
        }
    })?;
    for line in summary(opts, &report) {
        println!("{line}");
    }
    if let Some(path) = json_path {
        crate::infra::workspace::write_json(path, &json(opts, &report))?;
        println!("results written to {}", path.display());
    }
    println!("full log: {}", report.log.display());
    crate::test::verdict::require_all("the demo did not complete", &report.checks)
}

/// Whether a line of the shim's output is shown as it arrives: progress,
/// and at once, a guest's crash and the shim's word that a guest failed.
#[must_use]
pub fn shown_at_once(line: &str) -> bool {
    crate::vmm::shim::is_alarm(line)
        || ["report:", "udp-pingpong:", "net0:", "boot: main reached"]
            .iter()
            .any(|k| line.contains(k))
}

/// The path the guests' notifications took, from the shim's counters.
#[must_use]
pub fn notify_path_used(r: &Report) -> &'static str {
    if r.doorbell_notifications() > 0 {
        "doorbell"
    } else {
        "trap"
    }
}

fn us(ns: u64) -> String {
    format!("{:.0}", Duration::from_nanos(ns).as_secs_f64() * 1e6)
}

/// The summary table `cargo xtask run` prints.
#[must_use]
pub fn summary(opts: &Options, r: &Report) -> Vec<String> {
    let mut out = vec![format!(
        "== pingpong under the host shim: {} guests ({} vCPUs each), {} pings of {} B per client, RX {}, {}",
        opts.guests,
        opts.vcpus,
        opts.count,
        opts.size,
        opts.rx.cmdline(),
        match opts.link {
            Link::Switch => format!("notify {}", notify_path_used(r)),
            Link::Direct => "over a direct channel (no switch, no NIC)".to_owned(),
        }
    )];
    for c in &r.clients {
        out.push(format!(
            "{:<9} sent {} received {} lost {}   rtt p50 {} us  p99 {} us   {} pps",
            c.name,
            c.sent,
            c.received,
            c.sent.saturating_sub(c.received),
            us(c.p50_ns),
            us(c.p99_ns),
            c.pps
        ));
    }
    out.push(format!(
        "{:<9} {:<10} {:>11} {:>9} {:>9} {:>6} {:>6} {:>6} {:>5} {:>7} {:>6} {:>9} {:>6} {:>6}",
        "guest",
        "status",
        "pkts tx/rx",
        "exits",
        "exits/pkt",
        "steady",
        "io",
        "mmio",
        "halt",
        "irq_win",
        "other",
        "in_kernel",
        "notify",
        "irqs"
    ));
    for g in &r.guests {
        let status = match g.exit {
            GuestExit::Status(s) => format!("exit {s}"),
            other => format!("{other}").chars().take(10).collect(),
        };
        match &g.numbers {
            Some(n) => {
                let reason = n.exits_by_reason;
                out.push(format!(
                    "{:<9} {:<10} {:>11} {:>9} {:>9} {:>6} {:>6} {:>6} {:>5} {:>7} {:>6} {:>9} {:>6} {:>6}",
                    g.name,
                    status,
                    format!("{}/{}", n.tx_packets, n.rx_packets),
                    n.exits,
                    g.exits_per_packet().map_or_else(|| "-".into(), |e| format!("{e:.2}")),
                    g.steady_exits_per_packet
                        .map_or_else(|| "-".into(), |e| format!("{e:.2}")),
                    reason.io,
                    reason.mmio,
                    reason.halt,
                    reason.irq_window,
                    reason.other,
                    reason.in_kernel,
                    n.notifications.total(),
                    n.interrupts
                ));
            }
            None => out.push(format!("{:<9} {:<10} (no shim statistics)", g.name, status)),
        }
    }
    out.push("exits: KVM's count for the guest's vCPUs; io/mmio/halt/irq_win/other: exits the shim handled; in_kernel: the rest (KVM handled them, e.g. ioeventfd); exits/pkt: exits / (packets sent + received by the guest's NIC); steady: the same between the guest's marks around the pings (no boot, no teardown)".to_owned());
    out
}

/// The `--json` document (its keys are kept stable; more are welcome).
#[must_use]
pub fn json(opts: &Options, r: &Report) -> Value {
    let first = r.clients.first();
    json!({
        "schema_version": super::JSON_SCHEMA_VERSION,
        "demo": "pingpong",
        "notify": notify_path_used(r),
        "rx": opts.rx.cmdline(),
        "size": opts.size,
        "vcpus": opts.vcpus,
        "packets_sent": r.clients.iter().map(|c| c.sent).sum::<u64>(),
        "packets_received": r.clients.iter().map(|c| c.received).sum::<u64>(),
        "rtt_ns": {"p50": first.map(|c| c.p50_ns), "p99": first.map(|c| c.p99_ns)},
        "pps": r.clients.iter().map(|c| c.pps).sum::<u64>(),
        "clients": r.clients.iter().map(|c| json!({"name": c.name, "packets_sent": c.sent, "packets_received": c.received, "rtt_ns": {"p50": c.p50_ns, "p99": c.p99_ns}, "pps": c.pps})).collect::<Vec<_>>(),
        "guests": r.guests.iter().map(|g| {
            let n = g.numbers.as_ref();
            json!({
                "name": g.name,
                "exit": g.exit.to_string(),
                "exits": n.map(|n| n.exits),
                "exits_by_reason": n.map_or_else(|| json!({}), |n| json!(n.exits_by_reason)),
                "exits_per_packet": g.exits_per_packet(),
                "steady_exits_per_packet": g.steady_exits_per_packet,
                "notifications": n.map(|n| n.notifications).unwrap_or_default(),
                "packets": n.map(|n| json!({"tx": n.tx_packets, "rx": n.rx_packets})),
                "interrupts": n.map(|n| n.interrupts),
                "boot_to_main_ms": n.and_then(|n| n.boot_to_main_ms),
            })
        }).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crashes_and_failures_show_at_once() {
        assert!(shown_at_once(
            "client1| PANIC on cpu0: memory allocation of 80000000 bytes failed"
        ));
        assert!(shown_at_once(
            "host-shim: guest client1 failed: exit status 2 (the guest panicked)"
        ));
        assert!(shown_at_once(
            "server| EXCEPTION #PF (vector 14) error=0x4 rip=0x200000"
        ));
        assert!(!shown_at_once("server| [cpu0 DEBUG] smoltcp poll"));
    }
}
