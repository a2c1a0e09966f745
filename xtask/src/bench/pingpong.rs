//! `cargo xtask bench pingpong`: the same UDP ping-pong guest image, two guests,
//! under QEMU/KVM (q35, socket netdev) and under the host shim with trapping and
//! with doorbell notification.

use std::collections::BTreeMap;
use std::time::Duration;

use super::probe::{Probe, Seen};
use super::suite::{Better, Metric, Plot, RoundResult, Scenario, Suite};
use crate::error::{Error, Result};
use crate::scenario::pingpong::{self, Notify, Report};
use crate::{infra::build, vmm::shim};

/// Pings per round: enough that boot is a small share of the CPU and exit
/// totals, few enough that a round takes seconds.
const PINGS: u64 = 5000;
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
            timeout: Duration::from_secs(90),
            extra_cmdline: format!("pingpong.linger_ms={LINGER_MS} pingpong.quantiles=1"),
            ..pingpong::Options::default()
        }
    }

    fn run_qemu(&mut self, r: &mut RoundResult) -> Result<()> {
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
        opts.qmp_dir = Some(dir);
        // A fresh port each round: a socket netdev port can linger in TIME_WAIT.
        self.port = if self.port >= 17_499 {
            17_400
        } else {
            self.port + 1
        };
        let probe = Probe::start(&["qemu-system-x86"], socks);
        let report = pingpong::on_qemu(&opts, "bench-pingpong-qemu", self.port);
        let seen = probe.finish();
        let report = report?;
        let kvm: Vec<BTreeMap<String, u64>> = seen.kvm.values().cloned().collect();
        if kvm.len() != 2 {
            r.note("QEMU: KVM statistics over QMP were not readable for both VMs in some round; exits are missing there.");
        }
        record(r, "qemu", &report, &kvm, &seen)
    }

    fn run_shim(r: &mut RoundResult, id: &str, notify: Notify, args: &[&str]) -> Result<()> {
        let mut opts = Self::options(notify);
        opts.shim_args = args.iter().map(|a| (*a).to_owned()).collect();
        let probe = Probe::start(&["host-shim"], Vec::new());
        let report = pingpong::on_shim(&opts, &format!("bench-pingpong-{id}"), |_| {});
        let seen = probe.finish();
        let report = report?;
        let kvm: Vec<BTreeMap<String, u64>> = report
            .guests
            .iter()
            .filter_map(|g| g.numbers.as_ref().map(|n| n.kvm.clone()))
            .collect();
        record(r, id, &report, &kvm, &seen)
    }
}

/// Fills `r` for scenario `id` from a finished run.
#[allow(clippy::cast_precision_loss)] // counts far below 2^52
fn record(
    r: &mut RoundResult,
    id: &str,
    report: &Report,
    kvm: &[BTreeMap<String, u64>],
    seen: &Seen,
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
    Ok(())
}

impl Suite for Pingpong {
    fn name(&self) -> &'static str {
        "pingpong"
    }

    fn about(&self) -> String {
        format!(
            "Guest-to-guest UDP ping-pong, the same `udp-pingpong` image (2 vCPUs, 256 MiB, interrupt-driven RX) as server and client: {PINGS} pings of 64 B per round after 10 warm-up pings. QEMU/KVM: two `-M q35` VMs joined by a `socket` netdev, virtio-net-pci. Host shim: both guests in one shim process on its virtual switch, with the virtio notify register (`--notify trap`, an ioeventfd) or exitless doorbells (`--notify doorbell`, M1) — with the monitors' defaults (an adaptive spin budget, 50 µs growing to 1 ms while events keep coming, spun at idle priority: `SCHED_IDLE`, `--doorbell-spin-class idle`), and with the budget held at 50 µs (`--doorbell-spin-max-us 50`), so that they park sooner. RTT and pps are timed in the client guest by its TSC. Exits are KVM's own binary statistics summed over vCPUs for the whole run (boot included), read directly by the shim and through QMP `query-stats` for QEMU, divided per guest by the packets through its NIC (2 per ping). Host CPU is utime+stime of the VMM processes (two QEMUs, or the one shim) for the whole run per 100k packets; RSS is their peak resident set (`VmHWM`) per guest. Guests linger {LINGER_MS} ms after the last packet so the 100 ms sampler sees final counters."
        )
    }

    fn scenarios(&self) -> Vec<Scenario> {
        vec![
            Scenario::new("qemu", "QEMU/KVM q35"),
            Scenario::new("trap", "shim, notify trap"),
            Scenario::new("doorbell", "shim, notify doorbell"),
            Scenario::new("doorbell50", "shim, doorbell, spin ≤50 µs"),
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
                "cpu_s_per_100k",
                "host CPU per 100k packets",
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
            ("trap", "rtt_p50_us"),
            ("trap", "pps"),
            ("doorbell50", "pps"),
            ("trap", "exits_per_packet"),
            ("doorbell", "exits_per_packet"),
            ("trap", "cpu_s_per_100k"),
            ("trap", "rss_mib_per_guest"),
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
                metric: "exits_per_packet",
            },
            Plot::Bars { metric: "pps" },
            Plot::Bars {
                metric: "cpu_s_per_100k",
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
        r.note("KVM here is the paravirtual kvm_pvm backend, which never increments io_exits; ring-0 guest code is emulated (DESIGN §7), so absolute times are inflated for every VMM alike.");
        for s in order {
            match s.id {
                "qemu" => self.run_qemu(&mut r)?,
                "trap" => Self::run_shim(&mut r, "trap", Notify::Trap, &[])?,
                "doorbell" => Self::run_shim(&mut r, "doorbell", Notify::Doorbell, &[])?,
                _ => Self::run_shim(
                    &mut r,
                    "doorbell50",
                    Notify::Doorbell,
                    &["--doorbell-spin-max-us", "50"],
                )?,
            }
        }
        Ok(r)
    }
}
