//! Leg `hostile`: a guest of ours (`demos/src/bin/hostile.rs`) attacks the
//! shim's guest-facing interfaces while a udp-pingpong server and client run
//! in the same shim. The shim must survive, the pair must get every ping
//! back and keep its memory to itself, and every attack must be refused and
//! show up in the stats JSON under its counted reason. A fourth guest, the
//! same image as a sink, takes the VM-queue remaps until the shim refuses
//! one at the sender's bound, and must never see the refused page.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use crate::infra::process::Ending;
use crate::scenario::pingpong::parse_result;
use crate::test::leg::{Images, Leg, LegRun, Options};
use crate::vmm::shim::{self, Guest};
use crate::vmm::stats::{GuestStats, ShimStats};

/// Pings the client sends while the attacks run.
const PINGS: u64 = 3000;
/// How long the hostile guest floods the switch (its frames are counted, not timed).
const FLOOD_MS: u64 = 3000;
/// How long the client waits for each echo. The floods load the host's CPUs
/// on purpose (on a small machine the server's vCPU may wait its turn for
/// hundreds of ms): a ping counts as lost only when it never comes back,
/// not when it is late.
const REPLY_TIMEOUT_MS: u64 = 10_000;
/// Pages each victim fills with the marker pattern (`MARKER_PAGES` of udp-pingpong).
const MARKER_PAGES: u64 = 256;
/// The least the hostile guest must scan for its "nothing found" to mean
/// something: 16 MiB (it scans every frame it can allocate, about 190 MiB
/// of its 256 MiB).
const MIN_SCANNED_PAGES: u64 = 4096;

pub struct Hostile;

impl Leg for Hostile {
    fn name(&self) -> &'static str {
        "hostile"
    }

    fn about(&self) -> &'static str {
        "a hostile guest attacks the switch (forged and random source MACs, broadcast and unicast floods), its NIC's TX and RX queues, hypercalls (undefined numbers and sizes included), read-only pages, the doorbell ring, its upcall mailboxes, VM queues, PCI/MSI-X, port I/O and MMIO of odd sizes and offsets, and the console while a udp-pingpong pair runs: the shim survives, every ping comes back, no marker page of a victim is seen or changed, and each attack is counted under its reason in the stats JSON"
    }

    fn run(&self, images: &mut Images, opts: &Options) -> LegRun {
        let (pingpong, hostile) = match (images.get("udp-pingpong"), images.get("hostile")) {
            (Ok(p), Ok(h)) => (p, h),
            (Err(e), _) | (_, Err(e)) => return LegRun::broken(e),
        };
        let shim_path = match shim::build() {
            Ok(p) => p,
            Err(e) => return LegRun::broken(e.to_string()),
        };
        // A marker nobody can guess ahead of the run (std's hasher keys are random).
        let marker = RandomState::new().hash_one(std::process::id()) | 1;
        let guest = |name: &str, image: &std::path::Path, cmdline: String| Guest {
            name: name.to_owned(),
            image: image.to_path_buf(),
            vcpus: 1,
            mem_mib: 256,
            cmdline,
        };
        let guests = [
            guest(
                "server",
                &pingpong,
                format!(
                    "pingpong.role=server ip=10.0.0.1/24 pingpong.clients=1 net.rx=irq pingpong.marker={marker:x}"
                ),
            ),
            guest(
                "client1",
                &pingpong,
                format!(
                    "pingpong.role=client ip=10.0.0.2/24 pingpong.peer=10.0.0.1 pingpong.count={PINGS} pingpong.timeout_ms={REPLY_TIMEOUT_MS} net.rx=irq pingpong.marker={marker:x}"
                ),
            ),
            guest(
                "hostile",
                &hostile,
                format!(
                    "ip=10.0.0.3/24 net.rx=poll hostile.victim=10.0.0.1 hostile.victim_name=server hostile.marker={marker:x} hostile.flood_ms={FLOOD_MS} kernel.port_io=1 hostile.sink=sink"
                ),
            ),
            // The hostile guest's partner in the remap attack: it only
            // consumes, then looks for the page the shim refused to move.
            guest(
                "sink",
                &hostile,
                format!("hostile.role=sink hostile.marker={marker:x}"),
            ),
        ];
        // VM queues on, so that they can be attacked; no test-only hypercalls.
        let args = ["--vmq".to_owned(), "on".to_owned()];
        let timeout = opts.timeout.max(Duration::from_mins(2));
        let run = match shim::run(&shim_path, &guests, &args, timeout, self.name(), |_| {}) {
            Ok(r) => r,
            Err(e) => return LegRun::broken(e.to_string()),
        };
        let mut checks = vec![(
            format!("the shim ran to its end ({:?})", run.ending),
            run.ending == Ending::Exited(0),
        )];
        for g in &guests {
            checks.push(run.exit_check(&g.name));
        }
        let lines = |name| shim::guest_lines(&run.lines, name);
        match parse_result("client1", lines("client1")) {
            Some(r) => checks.push((
                format!(
                    "client1: {} of {} pings came back ({PINGS} asked for)",
                    r.received, r.sent
                ),
                r.sent == PINGS && r.received == PINGS,
            )),
            None => checks.push(("client1 printed its result".into(), false)),
        }
        for victim in ["server", "client1"] {
            checks.push(marker_intact(victim, &lines(victim)));
        }
        let hostile_lines = lines("hostile");
        checks.push(scan_check(&hostile_lines));
        checks.push(sink_check(&lines("sink")));
        let attacks = parse_attacks(&hostile_lines);
        let mut reports = vec![format!("marker {marker:x}")];
        match &run.stats {
            Some(stats) => {
                checks.extend(judge_attacks(&attacks, stats));
                checks.extend(victims_unharmed(stats));
                reports.extend(figures(stats));
            }
            None => checks.push(("the shim wrote its stats JSON".into(), false)),
        }
        checks.extend(console_checks(&run.lines));
        LegRun::from_checks(&checks, reports, Some(run.log))
    }
}

/// One `hostile-attack:` line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Attack {
    sent: u64,
    refused: bool,
    line: String,
}

fn parse_attacks(lines: &[&str]) -> BTreeMap<String, Attack> {
    lines
        .iter()
        .filter_map(|l| {
            let rest = l.trim().strip_prefix("hostile-attack: ")?;
            let mut words = rest.split_whitespace();
            let name = words.next()?.to_owned();
            let sent = words.next()?.strip_prefix("sent=")?.parse().ok()?;
            let refused = words.next()?.strip_prefix("refused=")? == "yes";
            Some((
                name,
                Attack {
                    sent,
                    refused,
                    line: rest.to_owned(),
                },
            ))
        })
        .collect()
}

/// `hostile-scan: planted=P foreign=F pages=N frames=M` as numbers by key.
fn parse_scan(lines: &[&str]) -> Option<BTreeMap<String, u64>> {
    let rest = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("hostile-scan: "))?;
    rest.split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

fn scan_check(lines: &[&str]) -> (String, bool) {
    match parse_scan(lines) {
        Some(s) => {
            let get = |k: &str| s.get(k).copied().unwrap_or(u64::MAX);
            (
                format!(
                    "hostile: found its own planted marker page ({}) and no victim's in {} pages and {} frames ({} found)",
                    get("planted"),
                    get("pages"),
                    get("frames"),
                    get("foreign")
                ),
                get("planted") == 1 && get("foreign") == 0 && get("pages") >= MIN_SCANNED_PAGES,
            )
        }
        None => ("hostile printed its scan".into(), false),
    }
}

/// `hostile-sink: received=N pages=P found=F`: the sink got the remapped
/// pages and never saw the one the shim refused to move.
fn sink_check(lines: &[&str]) -> (String, bool) {
    let Some(rest) = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("hostile-sink: "))
    else {
        return ("the sink printed what it received".into(), false);
    };
    let kv: BTreeMap<&str, u64> = rest
        .split_whitespace()
        .filter_map(|w| {
            let (k, v) = w.split_once('=')?;
            Some((k, v.parse().ok()?))
        })
        .collect();
    let get = |k| kv.get(k).copied();
    (
        format!(
            "sink: received {:?} remapped pages, the refused page found in {:?} of {:?} window pages",
            get("received"),
            get("found"),
            get("pages")
        ),
        get("received").is_some_and(|n| n > 0)
            && get("found") == Some(0)
            && get("pages").is_some_and(|n| n > 0),
    )
}

fn marker_intact(victim: &str, lines: &[&str]) -> (String, bool) {
    let want = format!("report: marker pages intact: {MARKER_PAGES} of {MARKER_PAGES}");
    let line = lines
        .iter()
        .find(|l| l.contains("report: marker pages intact"))
        .map(|l| l.trim().to_owned());
    (
        format!(
            "{victim}: marker pages untouched ({})",
            line.as_deref().unwrap_or("no report")
        ),
        line.is_some_and(|l| l == want),
    )
}

/// What must be counted for an attack: a description and the count found.
type Counter = fn(&ShimStats, &GuestStats) -> u64;

fn port_drop(s: &ShimStats, reason: &str) -> u64 {
    s.switch_ports
        .iter()
        .find(|p| p.name.starts_with("hostile"))
        .and_then(|p| p.dropped.get(reason).copied())
        .unwrap_or(0)
}

fn get(m: &BTreeMap<String, u64>, k: &str) -> u64 {
    m.get(k).copied().unwrap_or(0)
}

/// The hostile guest's count of top-level reason `k` above the server's:
/// both run the same kernel and NIC driver, so what they both do at boot
/// cancels out and the rest is the attack's.
fn beyond_server(s: &ShimStats, g: &GuestStats, k: &str) -> u64 {
    let server = s.guest("server").map_or(u64::MAX, |v| get(&v.rejected, k));
    get(&g.rejected, k).saturating_sub(server)
}

fn upcall_rejected(g: &GuestStats, k: &str) -> u64 {
    g.upcalls.as_ref().map_or(0, |u| get(&u.rejected, k))
}

fn vmq_error(g: &GuestStats, k: &str) -> u64 {
    g.vmq
        .as_ref()
        .map_or(0, |v| v.errors.others.get(k).copied().unwrap_or(0))
}

/// Attacks by name, the counter that must show them and the least it must
/// read (`Some`), or that it must equal the frames sent (`None`).
const EXPECTED: &[(&[&str], &str, Counter)] = &[
    (
        &["switch_forged_source", "switch_random_source_flood"],
        "switch_ports[hostile].dropped.forged_source",
        |s, _| port_drop(s, "forged_source"),
    ),
    (
        &["switch_broadcast_flood"],
        "switch_ports[hostile].dropped.flood_budget",
        |s, _| port_drop(s, "flood_budget"),
    ),
    (
        &["hypercall_upcall_ping", "hypercall_upcall_storm"],
        "upcalls.rejected.test_call_off",
        |_, g| {
            g.upcalls
                .as_ref()
                .map_or(0, |u| get(&u.rejected, "test_call_off"))
        },
    ),
    (
        &[
            "hypercall_notify_bench",
            "hypercall_redesignate",
            "hypercall_undefined",
            "hypercall_bad_arguments",
        ],
        "rejected.unknown_hypercall beyond the server's",
        |s, g| beyond_server(s, g, "unknown_hypercall"),
    ),
    (
        &["hypercall_ctrl_unknown_flag", "hypercall_ctrl_read_unknown"],
        "ctrl.rejected.unknown_flag",
        |_, g| get(&g.ctrl.rejected, "unknown_flag"),
    ),
    (
        &["hypercall_ctrl_bad_value"],
        "ctrl.rejected.bad_value",
        |_, g| get(&g.ctrl.rejected, "bad_value"),
    ),
    (
        &["hypercall_ctrl_own_virtual"],
        "ctrl.rejected.bad_masks",
        |_, g| get(&g.ctrl.rejected, "bad_masks"),
    ),
    (
        &["stats_mark_flood"],
        "marks_dropped + marks kept",
        |_, g| g.marks_dropped + g.marks.len() as u64,
    ),
    (
        &["store_hints_page"],
        "hints.rejected.page_write",
        |_, g| {
            g.hints
                .as_ref()
                .map_or(0, |h| get(&h.rejected, "page_write"))
        },
    ),
    (
        &["store_para_region_header", "store_designation_table"],
        "doorbell.protected_writes",
        |_, g| g.doorbell.protected_writes,
    ),
    (
        &["store_ctrl_mask_page"],
        "ctrl.rejected.mask_page_write",
        |_, g| get(&g.ctrl.rejected, "mask_page_write"),
    ),
    (
        &["ctrl_stray_shadow_bits"],
        "ctrl.rejected.stray_shadow_bits",
        |_, g| get(&g.ctrl.rejected, "stray_shadow_bits"),
    ),
    (
        &["ctrl_wait_page_stores"],
        "ctrl.rejected.wait_bad_store + wait_bad_timeout",
        |_, g| get(&g.ctrl.rejected, "wait_bad_store") + get(&g.ctrl.rejected, "wait_bad_timeout"),
    ),
    (
        &["doorbell_garbage"],
        "doorbell.rejected (every reason)",
        |_, g| g.doorbell.rejected.values().sum(),
    ),
    (&["vmq_no_such_vm"], "vmq.errors.no_such_vm", |_, g| {
        vmq_error(g, "no_such_vm")
    }),
    (
        &["vmq_to_itself", "vmq_misaligned_remap", "vmq_zero_length"],
        "vmq.errors.bad_descriptor",
        |_, g| vmq_error(g, "bad_descriptor"),
    ),
    (&["vmq_outside_ram"], "vmq.errors.outside_ram", |_, g| {
        vmq_error(g, "outside_ram")
    }),
    (
        &["vmq_remap_bound"],
        "vmq.errors.remap_limit (the sender's share of vm.max_map_count)",
        |_, g| vmq_error(g, "remap_limit"),
    ),
    (
        &["virtqueue_bad_chains", "virtqueue_rx_bad_chains"],
        "rejected.virtio_bad_descriptor + frame_too_big",
        |_, g| get(&g.rejected, "virtio_bad_descriptor") + get(&g.rejected, "frame_too_big"),
    ),
    (
        &["virtqueue_avail_jump", "virtqueue_rx_avail_jump"],
        "rejected.virtio_avail_index_jump (once per queue)",
        |_, g| get(&g.rejected, "virtio_avail_index_jump"),
    ),
    (
        &["port_unassigned"],
        "rejected.unknown_port beyond the server's",
        |s, g| beyond_server(s, g, "unknown_port"),
    ),
    (
        &["port_pci_config_odd", "mmio_ecam_odd"],
        "rejected.pci_config_bad_access beyond the server's",
        |s, g| beyond_server(s, g, "pci_config_bad_access"),
    ),
    (
        &["port_uart_wide"],
        "rejected.serial_bad_access beyond the server's",
        |s, g| beyond_server(s, g, "serial_bad_access"),
    ),
    (
        &["mmio_virtio_odd_width"],
        "rejected.virtio_bad_register beyond the server's",
        |s, g| beyond_server(s, g, "virtio_bad_register"),
    ),
    (
        &["mmio_unmapped"],
        "rejected.unmapped_mmio beyond the server's",
        |s, g| beyond_server(s, g, "unmapped_mmio"),
    ),
    (
        &["upcall_ack_ahead"],
        "upcalls.rejected.ack_ahead",
        |_, g| upcall_rejected(g, "ack_ahead"),
    ),
    (
        &["upcall_stray_writes"],
        "upcalls.rejected.stray_write",
        |_, g| upcall_rejected(g, "stray_write"),
    ),
    (
        &["pci_read_only_write"],
        "rejected.pci_config_ro_write",
        |_, g| get(&g.rejected, "pci_config_ro_write"),
    ),
    (&["msix_bad_size"], "rejected.msix_bad_access", |_, g| {
        get(&g.rejected, "msix_bad_access")
    }),
    (
        &["pci_bar_relocation"],
        "rejected.pci_bar_relocation beyond the server's (its driver sizes the BAR too)",
        |s, g| {
            let server = s
                .guest("server")
                .map_or(u64::MAX, |v| get(&v.rejected, "pci_bar_relocation"));
            get(&g.rejected, "pci_bar_relocation").saturating_sub(server)
        },
    ),
];

/// Attacks whose every attempt is counted once, so the counter equals what
/// the guest sent (the rest count at least one per attack).
const EXACT: &[&str] = &[
    "switch_forged_source",
    "switch_random_source_flood",
    "stats_mark_flood",
    "store_hints_page",
    "store_para_region_header",
    "store_designation_table",
    "store_ctrl_mask_page",
    "virtqueue_bad_chains",
    "virtqueue_rx_bad_chains",
    "virtqueue_avail_jump",
    "virtqueue_rx_avail_jump",
    "ctrl_wait_page_stores",
    "hypercall_notify_bench",
    "hypercall_redesignate",
    "hypercall_undefined",
    "hypercall_bad_arguments",
    "port_unassigned",
    "port_pci_config_odd",
    "mmio_ecam_odd",
    "port_uart_wide",
    "mmio_virtio_odd_width",
    "mmio_unmapped",
    "upcall_ack_ahead",
    "upcall_stray_writes",
];

fn judge_attacks(attacks: &BTreeMap<String, Attack>, stats: &ShimStats) -> Vec<(String, bool)> {
    let mut checks = Vec::new();
    let Some(g) = stats.guest("hostile") else {
        return vec![("the stats JSON has the hostile guest".into(), false)];
    };
    for (names, counter, read) in EXPECTED {
        let found: Vec<&Attack> = names.iter().filter_map(|n| attacks.get(*n)).collect();
        if found.len() != names.len() {
            let missing: Vec<&&str> = names
                .iter()
                .filter(|n| !attacks.contains_key(**n))
                .collect();
            checks.push((format!("hostile reported attacks {missing:?}"), false));
            continue;
        }
        let sent: u64 = found.iter().map(|a| a.sent).sum();
        let refused = found.iter().all(|a| a.refused);
        let count = read(stats, g);
        let exact = names.iter().all(|n| EXACT.contains(n));
        let ok = refused && sent > 0 && if exact { count == sent } else { count > 0 };
        checks.push((
            format!(
                "{}: {sent} sent, refused as the guest saw it: {refused}; {counter} = {count} ({})",
                names.join(" + "),
                if exact {
                    "must equal what was sent"
                } else {
                    "must be > 0"
                }
            ),
            ok,
        ));
    }
    // Floods that need no counter of their own: they must just have run.
    for name in ["switch_unicast_flood", "console_escapes"] {
        let a = attacks.get(name);
        checks.push((
            format!("{name} ran: {}", a.map_or("no report", |a| a.line.as_str())),
            a.is_some_and(|a| a.sent > 0),
        ));
    }
    checks
}

/// The victims' own frames were never dropped by the switch on their
/// account, whatever the flood did.
fn victims_unharmed(stats: &ShimStats) -> Vec<(String, bool)> {
    ["server", "client1"]
        .iter()
        .map(|victim| {
            match stats
                .switch_ports
                .iter()
                .find(|p| p.name.starts_with(&format!("{victim}-")))
            {
                Some(p) => (
                    format!(
                        "{}: none of its frames dropped by the switch ({:?})",
                        p.name, p.dropped
                    ),
                    p.dropped.is_empty(),
                ),
                None => (format!("{victim}: has a switch port in the stats"), false),
            }
        })
        .collect()
}

/// The guest's console may not reach the terminal raw, nor pose as another guest.
fn console_checks(lines: &[crate::infra::process::Line]) -> Vec<(String, bool)> {
    let raw = lines
        .iter()
        .filter(|l| l.text.contains('\x1b') || l.text.contains('\u{202e}'))
        .count();
    let forged = lines
        .iter()
        .filter(|l| {
            l.text
                .starts_with("server| report: pingpong server echoed 999999")
        })
        .count();
    let escaped = lines
        .iter()
        .any(|l| l.text.starts_with("hostile| ") && l.text.contains("\\x1b[2J"));
    vec![
        (
            format!(
                "no raw escape or bidi character reached the shim's output ({raw} lines had one)"
            ),
            raw == 0,
        ),
        (
            format!(
                "the hostile guest's forged server line did not pass as the server's ({forged})"
            ),
            forged == 0,
        ),
        (
            "the hostile guest's escape sequence shows as text (\\x1b[2J)".into(),
            escaped,
        ),
    ]
}

/// Figures for the summary and docs/security.md.
fn figures(stats: &ShimStats) -> Vec<String> {
    let mut out = vec![format!("switch: {:?}", stats.switch)];
    out.extend(stats.switch_ports.iter().map(|p| {
        format!(
            "port {}: dropped {:?}, inbox dropped {}",
            p.name, p.dropped, p.inbox_dropped
        )
    }));
    if let Some(g) = stats.guest("hostile") {
        out.push(format!("hostile rejected: {:?}", g.rejected));
        out.push(format!("hostile ctrl.rejected: {:?}", g.ctrl.rejected));
        out.push(format!(
            "hostile doorbell.rejected: {:?}",
            g.doorbell.rejected
        ));
        if let Some(v) = &g.vmq {
            out.push(format!("hostile vmq.errors: {:?}", v.errors.others));
        }
    }
    out.push(format!("shim max RSS {} KiB", stats.shim_max_rss_kib));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attack_and_scan_lines_parse() {
        let lines = [
            "hostile-attack: switch_forged_source sent=1000 refused=yes (source MAC of the server)",
            "hostile-attack: store_hints_page sent=3 refused=no (page 0x1: 1 before, 2 after)",
            "hostile-attack: broken",
            "hostile-scan: planted=1 foreign=0 pages=40000 frames=12",
        ];
        let a = parse_attacks(&lines);
        assert_eq!(a.len(), 2);
        assert_eq!(a["switch_forged_source"].sent, 1000);
        assert!(a["switch_forged_source"].refused);
        assert!(!a["store_hints_page"].refused);
        assert!(scan_check(&lines).1);
        let found = ["hostile-scan: planted=1 foreign=2 pages=40000 frames=12"];
        assert!(!scan_check(&found).1, "a victim's page seen");
        let blind = ["hostile-scan: planted=0 foreign=0 pages=40000 frames=12"];
        assert!(
            !scan_check(&blind).1,
            "a scan that misses its own plant proves nothing"
        );
    }

    #[test]
    fn the_sink_must_have_received_and_never_seen_the_refused_page() {
        assert!(sink_check(&["hostile-sink: received=9000 pages=16384 found=0"]).1);
        assert!(!sink_check(&["hostile-sink: received=9000 pages=16384 found=1"]).1);
        assert!(
            !sink_check(&["hostile-sink: received=0 pages=16384 found=0"]).1,
            "nothing remapped: the bound was never approached"
        );
        assert!(!sink_check(&[]).1);
    }

    #[test]
    fn marker_report_must_be_whole() {
        let ok = format!("report: marker pages intact: {MARKER_PAGES} of {MARKER_PAGES}");
        assert!(marker_intact("s", &[ok.as_str()]).1);
        assert!(!marker_intact("s", &["report: marker pages intact: 255 of 256"]).1);
        assert!(!marker_intact("s", &[]).1);
    }

    #[test]
    fn an_uncounted_attack_fails_its_check() {
        let mut stats = ShimStats::parse(crate::vmm::stats::SAMPLE).unwrap();
        let mut g = stats.guest("server").unwrap().clone();
        g.name = "hostile".into();
        stats.guests.push(g);
        let attacks = parse_attacks(&["hostile-attack: store_hints_page sent=3 refused=yes (x)"]);
        let checks = judge_attacks(&attacks, &stats);
        let hints = checks
            .iter()
            .find(|(n, _)| n.starts_with("store_hints_page"))
            .unwrap();
        assert!(!hints.1, "the sample counts no page_write: {hints:?}");
        assert!(
            checks
                .iter()
                .any(|(n, ok)| n.contains("reported attacks") && !ok)
        );
    }
}
