//! `cargo xtask bench notify`: what one notification of the
//! host costs by each path, in one shim run of the ktest image's
//! `notify_bench` test (`guest-kernel/src/bin/ktest/notify_bench.rs`; contract
//! `para_abi::doorbell::bench`, host half `host-shim/src/doorbell/bench.rs`).
//!
//! Per path the guest's own cost comes from its TSC around the notifying
//! instruction(s), the latency from the host's observer (host TSC at
//! observation minus the guest's send TSC corrected by KVM's TSC offset), and
//! the exits from KVM's `exits` counter at the stats marks around the path's
//! measured notifications.

use std::path::PathBuf;
use std::time::Duration;

use para_abi::report::percentile;

use super::suite::{Better, Metric, Plot, RoundResult, Scenario, Suite};
use crate::error::{Error, Result};
use crate::vmm::stats::GuestStats;
use crate::{infra::build, vmm::shim};

/// Notifications per path and round (the parked path sends a quarter of these,
/// each after a pause).
const NOTIFICATIONS: u64 = 2000;
/// Pause before each parked-path notification: ten times the monitor's spin budget.
const PAUSE_US: u64 = 500;
const SPIN_US: u64 = 50;

const PATHS: [(&str, &str, u64); 4] = [
    ("mmio_exit", "MMIO write, exit to the shim", 1),
    ("ioeventfd", "MMIO write, ioeventfd", 2),
    ("doorbell_spin", "doorbell, monitor spinning", 3),
    ("doorbell_parked", "doorbell, monitor parked (kick)", 4),
];

#[derive(Default)]
pub struct Notify {
    shim: Option<PathBuf>,
    image: Option<PathBuf>,
}

impl Suite for Notify {
    fn name(&self) -> &'static str {
        "notify"
    }

    fn about(&self) -> String {
        format!(
            "One shim run of the ktest image (`ktest.filter=notify_bench notify.bench={NOTIFICATIONS}`, \
             shim `--no-net --notify-bench --doorbell-spin-us {SPIN_US} --doorbell-spin-max-us {SPIN_US}`, 1 vCPU) notifies the host from \
             ring 3 {NOTIFICATIONS} times per path, one at a time (the host acknowledges each in a \
             mailbox before the next): (a) a 4-byte MMIO write that exits to the shim's user space, \
             (b) one bound to an ioeventfd that KVM signals, (c) a doorbell event to a monitor that \
             is spinning, (d) a doorbell event after a {PAUSE_US} µs pause, so the monitor has parked \
             and the guest adds the trapping kick ({} of them). Guest cost: guest TSC around the \
             notifying store(s), in ns by the guest's TSC rate. Latency: host TSC when the shim's \
             observer (vCPU thread / eventfd thread / monitor thread) sees it, minus the guest's send \
             TSC corrected by KVM's TSC offset (KVM_GET_MSRS of IA32_TSC bracketed by host rdtsc at \
             the set-up hypercall). Exits: KVM `exits` delta between stats marks around each path's \
             measured notifications, divided by their number.",
            NOTIFICATIONS / 4
        )
    }

    fn scenarios(&self) -> Vec<Scenario> {
        PATHS
            .iter()
            .map(|(id, label, _)| Scenario::new(id, *label))
            .collect()
    }

    fn metrics(&self) -> Vec<Metric> {
        vec![
            Metric::new("guest_ns", "guest cost", "ns/notification", Better::Lower),
            Metric::new("latency_p50_us", "latency p50", "µs", Better::Lower),
            Metric::new("latency_p99_us", "latency p99", "µs", Better::Lower),
            Metric::new(
                "exits_per_notification",
                "KVM exits",
                "exits/notification",
                Better::Lower,
            ),
        ]
    }

    fn baseline(&self) -> Option<&'static str> {
        Some("mmio_exit")
    }

    fn headline(&self) -> Vec<(&'static str, &'static str)> {
        vec![
            ("doorbell_spin", "guest_ns"),
            ("doorbell_spin", "latency_p50_us"),
            ("doorbell_spin", "exits_per_notification"),
        ]
    }

    fn plots(&self) -> Vec<Plot> {
        let mut p: Vec<Plot> = self
            .metrics()
            .iter()
            .map(|m| Plot::Bars { metric: m.id })
            .collect();
        p.push(Plot::Cdf {
            distribution: "latency_us",
            label: "notify → host observation",
            unit: "µs",
        });
        p
    }

    fn prepare(&mut self) -> Result<()> {
        self.image = Some(build::build_guest(build::find_image("ktest")?)?);
        self.shim = Some(shim::build()?);
        Ok(())
    }

    fn round(&mut self, round: u32, _order: &[Scenario]) -> Result<RoundResult> {
        let (Some(shim_path), Some(image)) = (&self.shim, &self.image) else {
            return Err(Error::failed("notify bench: not prepared"));
        };
        let guest = shim::Guest {
            name: "ktest".into(),
            image: image.clone(),
            vcpus: 1,
            mem_mib: 256,
            cmdline: format!(
                "ktest.filter=notify_bench notify.bench={NOTIFICATIONS} notify.pause_us={PAUSE_US}"
            ),
        };
        let extra: Vec<String> = [
            "--no-net",
            "--notify-bench",
            "--doorbell-spin-us",
            &SPIN_US.to_string(),
            // A fixed budget: an adaptive one would learn to out-wait (d)'s pauses.
            "--doorbell-spin-max-us",
            &SPIN_US.to_string(),
            "--quiet",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let run = shim::run(
            shim_path,
            &[guest],
            &extra,
            Duration::from_mins(1),
            &format!("bench-notify-{round}"),
            |_| {},
        )?;
        let passed = run.lines.iter().any(|l| {
            l.text
                .contains("test notify_bench::notify_bench_four_paths ... ok")
        });
        if !passed {
            return Err(Error::failed(format!(
                "the guest's notify_bench test did not pass ({}); log {}",
                run.guest_outcome("ktest"),
                run.log.display()
            )));
        }
        let g = run
            .guest_stats("ktest")
            .ok_or_else(|| Error::failed("no shim stats for the guest"))?;
        let mut r = RoundResult::default();
        parse(g, &mut r)?;
        Ok(r)
    }
}

#[allow(clippy::cast_precision_loss)] // counts far below 2^52
/// Fills `r` from the guest's stats entry (`doorbell.notify_bench` and `marks`).
fn parse(g: &GuestStats, r: &mut RoundResult) -> Result<()> {
    let Some(nb) = &g.doorbell.notify_bench else {
        return Err(Error::failed(
            "the shim's stats have no doorbell.notify_bench",
        ));
    };
    let mark = |label: u64| Some(g.mark(label)?.exits);
    for (id, _, tag) in PATHS {
        let Some(p) = nb.paths.get(id) else {
            return Err(Error::failed(format!(
                "path {id}: no notifications measured"
            )));
        };
        let count = p.guest_count;
        if count == 0 {
            return Err(Error::failed(format!(
                "path {id}: no notifications measured"
            )));
        }
        let observed = p.observed;
        if observed != count {
            return Err(Error::failed(format!(
                "path {id}: the host observed {observed} of {count} notifications"
            )));
        }
        r.set(id, "guest_ns", p.guest_ns);
        let mut lat: Vec<f64> = p.latency_ns.iter().map(|ns| ns / 1e3).collect();
        lat.sort_by(f64::total_cmp);
        r.set(
            id,
            "latency_p50_us",
            percentile(&lat, 50).unwrap_or(f64::NAN),
        );
        r.set(
            id,
            "latency_p99_us",
            percentile(&lat, 99).unwrap_or(f64::NAN),
        );
        r.samples(id, "latency_us", &lat);
        // para_abi::doorbell::bench::mark_before / mark_after.
        let before = 0x100 + 2 * tag;
        if let (Some(a), Some(b)) = (mark(before), mark(before + 1)) {
            r.set(
                id,
                "exits_per_notification",
                b.saturating_sub(a) as f64 / count as f64,
            );
        }
    }
    let err = nb.offset_error_cycles;
    let khz = nb.tsc_khz.max(1);
    r.note(format!(
        "KVM TSC offset measured to within ±{:.1} µs (half the host-rdtsc bracket around KVM_GET_MSRS)",
        err as f64 / khz as f64 * 1e3
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::float_cmp)] // exact small values
    use super::*;
    use crate::vmm::stats::{self, NotifyPath, mark};

    #[test]
    fn parses_the_shims_figures() {
        let path = |n: u64, lat: &[f64]| NotifyPath {
            guest_count: n,
            observed: n,
            guest_ns: 200.0,
            latency_ns: lat.to_vec(),
        };
        let mut g = stats::sample("ktest");
        let nb = g.doorbell.notify_bench.as_mut().unwrap();
        (nb.offset_error_cycles, nb.tsc_khz) = (2000, 2_000_000);
        nb.paths = [
            ("mmio_exit", path(4, &[9000.0, 8000.0, 10000.0, 11000.0])),
            ("ioeventfd", path(2, &[1.0, 2.0])),
            ("doorbell_spin", path(2, &[1.0, 2.0])),
            ("doorbell_parked", path(2, &[1.0, 2.0])),
        ]
        .into_iter()
        .map(|(k, p)| (k.to_owned(), p))
        .collect();
        g.marks = vec![mark(0x102, 10, 0, 0), mark(0x103, 18, 0, 0)];
        let mut r = RoundResult::default();
        parse(&g, &mut r).unwrap();
        let a = &r.values["mmio_exit"];
        assert_eq!(a["exits_per_notification"], 2.0);
        // Nearest rank over 8, 9, 10, 11 µs.
        assert_eq!(a["latency_p50_us"], 9.0);
        assert_eq!(a["latency_p99_us"], 11.0);
        assert_eq!(a["guest_ns"], 200.0);
        assert!(!r.values["ioeventfd"].contains_key("exits_per_notification"));
        assert_eq!(r.distributions["mmio_exit"]["latency_us"].len(), 4);
        // A path the host did not see in full fails the round.
        let mut bad = g.clone();
        let nb = bad.doorbell.notify_bench.as_mut().unwrap();
        nb.paths.get_mut("ioeventfd").unwrap().observed = 1;
        assert!(parse(&bad, &mut RoundResult::default()).is_err());
        // So does one it did not see at all.
        let mut gone = g;
        let nb = gone.doorbell.notify_bench.as_mut().unwrap();
        nb.paths.remove("doorbell_parked");
        assert!(parse(&gone, &mut RoundResult::default()).is_err());
    }
}
