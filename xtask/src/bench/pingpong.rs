//! `cargo xtask bench pingpong`: the same UDP ping-pong guest image, two guests,
//! under QEMU/KVM (q35, socket netdev: the best QEMU configuration here) and
//! under the host shim: `default` (exactly what `cargo xtask run` does), the
//! notify register (`trap`), and `fastest` (a direct channel, polling).

use std::collections::BTreeMap;
use std::time::Duration;

use super::probe::{Probe, Seen};
use super::suite::{Better, Metric, Plot, RoundResult, Scenario, Suite};
use crate::error::{Error, Result};
use crate::scenario::pingpong::{self, Link, Notify, QemuLink, Report, Rx};
use crate::{infra::build, vmm::shim};

/// Pings per round: enough that boot is a small share of the CPU and exit
/// totals, few enough that a round takes seconds.
const PINGS: u64 = 5000;
/// Pings of the `fastest` scenario: its round trips take a few µs, so 5,000
/// would make a steady window of milliseconds, where a timer tick or one
/// preemption decides every figure. This many give it a window as long as
/// the other scenarios' (a fraction of a second); every figure is per ping,
/// per packet or per second, so they stay comparable.
const FASTEST_PINGS: u64 = 200_000;
/// Guests stay up this long after their last packet so the probe's last sample
/// (every 100 ms) holds the final counters.
const LINGER_MS: u32 = 400;
/// The counters reported per packet, by KVM's names (both VMMs read the same
/// binary statistics: the shim directly, QEMU through QMP `query-stats`).
const REASONS: [(&str, &str); 3] = [
    ("exits", "exits_per_packet"),
    ("mmio_exits", "mmio_exits_per_packet"),
    ("halt_exits", "halt_exits_per_packet"),
];

pub struct Pingpong {
    port: u16,
}

impl Pingpong {
    pub fn new() -> Self {
        Self { port: 17_400 }
    }

    fn options(notify: Notify) -> pingpong::Options {
        pingpong::Options {
            count: PINGS,
            notify,
            // The same vCPU count for every VMM and scenario: `cargo xtask run`'s.
            timeout: Duration::from_secs(90),
            extra_cmdline: format!("pingpong.linger_ms={LINGER_MS} pingpong.quantiles=1"),
            ..pingpong::Options::default()
        }
    }

    fn run_qemu(&mut self, r: &mut RoundResult, id: &str, rx: Rx, link: QemuLink) -> Result<()> {
        let dir = super::suite::results_dir()?.join("qmp");
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::failed(format!("cannot create {}: {e}", dir.display())))?;
        let socks: Vec<_> = ["server", "client1"]
            .iter()
            .map(|n| dir.join(format!("{n}.sock")))
            .collect();
        for s in &socks {
            let _ = std::fs::remove_file(s);
        }
        let mut opts = Self::options(Notify::Trap);
        opts.rx = rx;
        opts.qemu_link = link;
        opts.qmp_dir = Some(dir);
        // A fresh port each round: a socket netdev port can linger in TIME_WAIT.
        self.port = if self.port >= 17_499 {
            17_400
        } else {
            self.port + 1
        };
        let probe = Probe::start(&["qemu-system-x86"], socks);
        let report = pingpong::on_qemu(&opts, &format!("bench-pingpong-{id}"), self.port);
        let seen = probe.finish();
        let report = report?;
        let kvm: Vec<BTreeMap<String, u64>> = seen.kvm.values().cloned().collect();
        if kvm.len() != 2 {
            r.note("QEMU: KVM statistics over QMP were not readable for both VMs in some round; exits are missing there.");
        }
        record(r, id, &report, &kvm, &seen, None)
    }

    fn run_shim(r: &mut RoundResult, id: &str, opts: &pingpong::Options) -> Result<()> {
        let probe = Probe::start(&["host-shim"], Vec::new());
        let report = pingpong::on_shim(opts, &format!("bench-pingpong-{id}"), |_| {});
        let seen = probe.finish();
        let report = report?;
        let kvm: Vec<BTreeMap<String, u64>> = report
            .guests
            .iter()
            .filter_map(|g| g.numbers.as_ref().map(|n| n.kvm.clone()))
            .collect();
        // Exits in the steady state come from the guests' own marks here.
        let marks: Vec<f64> = report
            .guests
            .iter()
            .filter_map(|g| g.steady_exits_per_packet)
            .collect();
        let steady = (marks.len() == report.guests.len() && marks.len() == 2)
            .then(|| marks.iter().sum::<f64>() / 2.0);
        let irqs: Vec<f64> = report
            .guests
            .iter()
            .filter_map(|g| g.steady_host_irq_exits_per_packet)
            .collect();
        if irqs.len() == 2 {
            r.set(
                id,
                "steady_host_irq_exits_per_packet",
                irqs.iter().sum::<f64>() / 2.0,
            );
        }
        record(r, id, &report, &kvm, &seen, steady)
    }
}

/// Fills `r` for scenario `id` from a finished run. `steady_exits`: KVM exits
/// per packet per guest between the guests' marks, where the VMM keeps marks;
/// otherwise they come from the probe's samples over the client's
/// steady-state window, like the host CPU of every scenario.
#[allow(clippy::cast_precision_loss)] // counts far below 2^52
fn record(
    r: &mut RoundResult,
    id: &str,
    report: &Report,
    kvm: &[BTreeMap<String, u64>],
    seen: &Seen,
    steady_exits: Option<f64>,
) -> Result<()> {
    crate::test::verdict::require_all(&format!("{id}: the ping-pong failed"), &report.checks)?;
    let Some(c) = report.clients.first() else {
        return Err(Error::failed(format!("{id}: no client result")));
    };
    r.set(id, "rtt_p50_us", c.p50_ns as f64 / 1e3);
    r.set(id, "rtt_p99_us", c.p99_ns as f64 / 1e3);
    r.set(id, "pps", c.pps as f64);
    r.samples(id, "rtt_us", &c.quantiles_us);
    // Every guest moves each ping twice (client: ping out, pong in; server: in, out).
    let per_guest_packets = 2.0 * c.received as f64;
    let guests = report.guests.len() as f64;
    if kvm.len() == report.guests.len() && per_guest_packets > 0.0 {
        for (name, metric) in REASONS {
            let total: u64 = kvm.iter().filter_map(|m| m.get(name)).sum();
            r.set(id, metric, total as f64 / guests / per_guest_packets);
        }
    }
    if !seen.procs.is_empty() && per_guest_packets > 0.0 {
        let cpu: f64 = seen.procs.values().map(|p| p.cpu_s).sum();
        r.set(
            id,
            "cpu_s_per_100k",
            cpu / (guests * per_guest_packets) * 100_000.0,
        );
        let rss_kib: u64 = seen.procs.values().map(|p| p.hwm_kib).sum();
        r.set(id, "rss_mib_per_guest", rss_kib as f64 / 1024.0 / guests);
    }
    // The steady state: the client's timed pings (both guests move 2 packets
    // per ping), boot and teardown left out for every VMM alike.
    let steady_packets = 2.0 * c.sent as f64;
    let window = report.steady.and_then(|(a, b)| seen.window(a, b));
    if let (Some((cpu, exits)), true) = (window, steady_packets > 0.0) {
        r.set(
            id,
            "steady_cpu_s_per_100k",
            cpu / (guests * steady_packets) * 100_000.0,
        );
        let sampled = (!seen.kvm.is_empty()).then(|| exits / guests / steady_packets);
        if let Some(e) = steady_exits.or(sampled) {
            r.set(id, "steady_exits_per_packet", e);
        }
    } else {
        r.note("A scenario's steady-state window was not seen in some round (its steady_* figures are missing there).");
    }
    Ok(())
}

impl Suite for Pingpong {
    fn name(&self) -> &'static str {
        "pingpong"
    }

    fn about(&self) -> String {
        format!(
            "Guest-to-guest UDP ping-pong, the same `udp-pingpong` image (2 vCPUs, 256 MiB) as server and client: {PINGS} pings of 64 B per round after 10 warm-up pings ({FASTEST_PINGS} for `fastest`, whose round trips take microseconds, so that its steady window lasts about as long as the others'). `qemu` (the baseline): two QEMU/KVM `-M q35` VMs, each with a TAP device on one Linux bridge, virtio-net-pci, interrupt-driven RX: QEMU's best configuration here by RTT and round trips/s; `qemu_socket` joins them by a `socket` netdev instead, `qemu_poll` the same with busy-polling RX (`vhost-net` is not available here, and `-M microvm` gives this guest no PCI bus, so q35 it is). Host shim, both guests in one shim process: `default` is exactly `cargo xtask run` (its defaults: the shim's switch, doorbell notifications, the exitless wait, run to completion, the monitor core); `tx_doorbell` is `default` with `net.tx_at_wait=off`: every TX notification a doorbell the spinning monitor takes on the other core, instead of the sender's wait carrying it (lower RTT, a core's worth of monitor CPU); `trap` uses the virtio notify register (an ioeventfd) instead of doorbells; `fastest` joins the two guests by a direct channel (`--link direct`: shared rings the shim maps at start-up, no NIC, no switch) with busy-polling RX. RTT and pps are timed in the client guest by its TSC. Whole-run exits are KVM's own binary statistics summed over vCPUs (boot included), read directly by the shim and through QMP `query-stats` for QEMU, per guest and packet (2 per ping). Steady-state figures cover only the client's timed pings: the shim's exits between the guests' stats marks; QEMU's exits and every VMM's host CPU from 100 ms samples interpolated at the instants the host saw the client's `steady-state:` lines. Host CPU is utime+stime of the VMM processes (two QEMUs, or the one shim) per 100k packets; RSS is their peak resident set (`VmHWM`) per guest. Guests linger {LINGER_MS} ms after the last packet so the sampler sees final counters."
        )
    }

    fn scenarios(&self) -> Vec<Scenario> {
        vec![
            Scenario::new("qemu", "QEMU/KVM q35, TAP + bridge"),
            Scenario::new("qemu_socket", "QEMU/KVM q35, socket netdev"),
            Scenario::new("qemu_poll", "QEMU/KVM q35, socket, RX poll"),
            Scenario::new("default", "shim, cargo xtask run"),
            Scenario::new("tx_doorbell", "shim, TX by doorbell"),
            Scenario::new("trap", "shim, notify trap"),
            Scenario::new("fastest", "shim, direct channel, poll"),
        ]
    }

    fn metrics(&self) -> Vec<Metric> {
        vec![
            Metric::new("rtt_p50_us", "RTT p50", "µs", Better::Lower),
            Metric::new("rtt_p99_us", "RTT p99", "µs", Better::Lower),
            Metric::new("pps", "round trips/s", "1/s", Better::Higher),
            Metric::new(
                "exits_per_packet",
                "KVM exits/packet",
                "per guest",
                Better::Lower,
            ),
            Metric::new(
                "mmio_exits_per_packet",
                "MMIO exits/packet",
                "per guest",
                Better::Lower,
            ),
            Metric::new(
                "halt_exits_per_packet",
                "HLT exits/packet",
                "per guest",
                Better::Lower,
            ),
            Metric::new(
                "steady_exits_per_packet",
                "steady KVM exits/packet",
                "per guest",
                Better::Lower,
            ),
            Metric::new(
                "steady_host_irq_exits_per_packet",
                "of which host interrupts",
                "per guest",
                Better::Lower,
            ),
            Metric::new(
                "cpu_s_per_100k",
                "host CPU per 100k packets",
                "s",
                Better::Lower,
            ),
            Metric::new(
                "steady_cpu_s_per_100k",
                "steady host CPU per 100k packets",
                "s",
                Better::Lower,
            ),
            Metric::new("rss_mib_per_guest", "RSS per guest", "MiB", Better::Lower),
        ]
    }

    fn baseline(&self) -> Option<&'static str> {
        Some("qemu")
    }

    fn headline(&self) -> Vec<(&'static str, &'static str)> {
        vec![
            ("default", "rtt_p50_us"),
            ("default", "pps"),
            ("default", "steady_exits_per_packet"),
            ("default", "steady_cpu_s_per_100k"),
            ("fastest", "rtt_p50_us"),
            ("fastest", "pps"),
            ("fastest", "steady_exits_per_packet"),
            ("default", "rss_mib_per_guest"),
        ]
    }

    fn plots(&self) -> Vec<Plot> {
        vec![
            Plot::Cdf {
                distribution: "rtt_us",
                label: "RTT",
                unit: "µs",
            },
            Plot::Bars {
                metric: "rtt_p50_us",
            },
            Plot::Bars {
                metric: "steady_exits_per_packet",
            },
            Plot::Bars { metric: "pps" },
            Plot::Bars {
                metric: "steady_cpu_s_per_100k",
            },
        ]
    }

    fn prepare(&mut self) -> Result<()> {
        crate::infra::setup::ensure_tool("qemu-system-x86_64", "qemu-system-x86")?;
        shim::build()?;
        build::build_guest(build::find_image("udp-pingpong")?)?;
        Ok(())
    }

    fn round(&mut self, _round: u32, order: &[Scenario]) -> Result<RoundResult> {
        let mut r = RoundResult::default();
        r.note("KVM here is the paravirtual kvm_pvm backend, which never increments io_exits; ring-0 guest code is run by KVM's instruction emulator, so absolute times are inflated for every VMM alike.");
        for s in order {
            match s.id {
                "qemu" => self.run_qemu(&mut r, "qemu", Rx::Irq, QemuLink::TapBridge)?,
                "qemu_socket" => self.run_qemu(&mut r, "qemu_socket", Rx::Irq, QemuLink::Socket)?,
                "qemu_poll" => self.run_qemu(&mut r, "qemu_poll", Rx::Poll, QemuLink::Socket)?,
                // Exactly `cargo xtask run`: its defaults, nothing added.
                "default" => Self::run_shim(&mut r, "default", &Self::options(Notify::Auto))?,
                "trap" => Self::run_shim(&mut r, "trap", &Self::options(Notify::Trap))?,
                "tx_doorbell" => {
                    let mut opts = Self::options(Notify::Auto);
                    opts.extra_cmdline.push_str(" net.tx_at_wait=off");
                    Self::run_shim(&mut r, "tx_doorbell", &opts)?;
                }
                _ => {
                    let opts = pingpong::Options {
                        link: Link::Direct,
                        rx: Rx::Poll,
                        count: FASTEST_PINGS,
                        ..Self::options(Notify::Auto)
                    };
                    Self::run_shim(&mut r, "fastest", &opts)?;
                }
            }
        }
        Ok(r)
    }
}
