//! `cargo xtask bench upcall` (M3): upcall delivery through KVM's
//! interrupt-window exit against the naive polling path, in one shim binary
//! (`--upcalls window` / `--upcalls poll`), on the ktest image's three upcall
//! tests (masked 2 ms with a ping posted inside, twice; a 4000-ping storm at one
//! per 100 µs to a CPU that masks often).

use std::path::PathBuf;
use std::time::Duration;

use super::suite::{Better, Metric, RoundResult, Scenario, Suite};
use crate::error::{Error, Result};
use crate::vmm::shim;
use crate::vmm::stats::GuestStats;

/// The storm's size and the labels of the marks around it (ktest `upcall.rs`).
const STORM_PINGS: f64 = 4000.0;
const MARK_BEFORE: u64 = 0x3301;
const MARK_AFTER: u64 = 0x3302;

#[derive(Default)]
pub struct UpcallSuite {
    shim: Option<PathBuf>,
    image: Option<PathBuf>,
}

impl UpcallSuite {
    fn run_one(&self, mode: &str, result: &mut RoundResult) -> Result<()> {
        let (Some(shim_path), Some(image)) = (&self.shim, &self.image) else {
            return Err(Error::failed("upcall bench: not prepared"));
        };
        let guest = shim::Guest {
            name: "ktest".into(),
            image: image.clone(),
            vcpus: 1,
            mem_mib: 256,
            cmdline: "ktest.filter=upcall::upcall_".into(),
        };
        let extra = [
            "--upcalls".to_owned(),
            mode.to_owned(),
            "--no-net".to_owned(),
            // The ping and the storm are test-only hypercalls.
            "--test-hypercalls".to_owned(),
        ];
        let label = format!("bench-upcall-{mode}");
        let run = shim::run(
            shim_path,
            &[guest],
            &extra,
            Duration::from_mins(2),
            &label,
            |_| {},
        )?;
        let serial = run.serial("ktest");
        let failed = serial
            .tests
            .iter()
            .filter(|t| t.outcome != crate::infra::serial::Outcome::Ok)
            .count();
        if failed > 0 || serial.tests.len() != 3 {
            return Err(Error::failed(format!(
                "upcall tests under --upcalls {mode}: {} ran, {failed} failed (log {})",
                serial.tests.len(),
                run.log.display()
            )));
        }
        let g = run
            .guest_stats("ktest")
            .ok_or_else(|| Error::failed("no stats for the guest"))?;
        stats_metrics(mode, g, result);
        let handler: Vec<f64> = serial
            .reports
            .iter()
            .filter(|r| r.starts_with("upcall masked"))
            .filter_map(|r| {
                let tail = r.split("sti -> handler ").nth(1)?;
                tail.trim_end_matches(" us").trim().parse().ok()
            })
            .collect();
        if !handler.is_empty() {
            #[allow(clippy::cast_precision_loss)]
            let mean = handler.iter().sum::<f64>() / handler.len() as f64;
            result.set(mode, "masked_sti_to_handler_us", mean);
        }
        if let Some(ms) = serial
            .reports
            .iter()
            .find(|r| r.starts_with("upcall storm"))
            .and_then(|r| {
                r.split(": ")
                    .nth(1)?
                    .split(" ms")
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
        {
            result.set(mode, "storm_ms", ms);
        }
        Ok(())
    }
}

/// The figures the shim's stats JSON gives for one run.
#[allow(clippy::cast_precision_loss)] // counts and ns far below 2^52
fn stats_metrics(mode: &str, g: &GuestStats, result: &mut RoundResult) {
    let u = g.upcalls.as_ref();
    let us = |ns: Option<u64>| ns.map_or(f64::NAN, |ns| ns as f64 / 1000.0);
    result.set(
        mode,
        "open_latency_us",
        us(u.map(|u| u.latency_open.mean_ns)),
    );
    result.set(
        mode,
        "deferred_latency_us",
        us(u.map(|u| u.latency_deferred.mean_ns)),
    );
    let mark = |label: u64| Some(g.mark(label)?.exits as f64);
    if let (Some(a), Some(b)) = (mark(MARK_BEFORE), mark(MARK_AFTER)) {
        result.set(mode, "storm_exits_per_upcall", (b - a) / STORM_PINGS);
    }
    // Exits the upcall path itself causes: kicks (EINTR) and window exits.
    let kicks = g.intr_exits() as f64;
    let requested = u.map_or(0, |u| u.requested.total()) as f64;
    let window = u.map_or(0, |u| u.irq_window_exits) as f64;
    if requested > 0.0 {
        result.set(
            mode,
            "upcall_exits_per_upcall",
            (kicks + window) / requested,
        );
    }
}

impl Suite for UpcallSuite {
    fn name(&self) -> &'static str {
        "upcall"
    }

    fn about(&self) -> String {
        "M3 upcalls: the ktest image's upcall tests under the shim, once with \
         KVM's interrupt-window exit (`--upcalls window`) and once with the naive \
         path that kicks the vCPU every 20 µs and looks at IF at each exit \
         (`--upcalls poll`). Latencies are the shim's, from the post to the \
         `KVM_INTERRUPT` (mean over the run; `open` = the window was open at the \
         post, `deferred` = it was not); sti→handler is the guest's TSC from its \
         `sti` after a 2 ms masked spin (a ping posted inside it) to the ring-3 \
         handler; exits per upcall (storm) are all KVM exits between the stats \
         marks around the 4000-ping storm divided by 4000 (they include the \
         guest's own emulated ring-0 masked phases); kick + window exits per \
         upcall are the shim's `intr` exits plus its interrupt-window exits over \
         the run, divided by the upcalls posted."
            .into()
    }

    fn scenarios(&self) -> Vec<Scenario> {
        vec![
            Scenario::new("window", "shim, interrupt-window exit"),
            Scenario::new("poll", "shim, naive polling"),
        ]
    }

    fn metrics(&self) -> Vec<Metric> {
        vec![
            Metric::new(
                "open_latency_us",
                "post → injection, window open",
                "µs",
                Better::Lower,
            ),
            Metric::new(
                "deferred_latency_us",
                "post → injection, window opens later",
                "µs",
                Better::Lower,
            ),
            Metric::new(
                "masked_sti_to_handler_us",
                "sti → handler after a masked spin",
                "µs",
                Better::Lower,
            ),
            Metric::new(
                "storm_exits_per_upcall",
                "exits per upcall (storm)",
                "exits/upcall",
                Better::Lower,
            ),
            Metric::new(
                "upcall_exits_per_upcall",
                "kick + window exits per upcall",
                "exits/upcall",
                Better::Lower,
            ),
            Metric::new("storm_ms", "storm of 4000 pings", "ms", Better::Lower),
        ]
    }

    fn baseline(&self) -> Option<&'static str> {
        Some("poll")
    }

    fn headline(&self) -> Vec<(&'static str, &'static str)> {
        vec![
            ("window", "deferred_latency_us"),
            ("window", "upcall_exits_per_upcall"),
        ]
    }

    fn prepare(&mut self) -> Result<()> {
        let image = crate::infra::build::build_guest(crate::infra::build::find_image("ktest")?)?;
        self.shim = Some(shim::build()?);
        self.image = Some(image);
        Ok(())
    }

    fn round(&mut self, _round: u32, order: &[Scenario]) -> Result<RoundResult> {
        let mut result = RoundResult::default();
        for s in order {
            self.run_one(s.id, &mut result)?;
        }
        Ok(result)
    }
}
