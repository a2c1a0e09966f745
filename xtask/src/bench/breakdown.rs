//! `cargo xtask bench breakdown`: where one ping's round trip goes, stage by
//! stage on one clock. The same `udp-pingpong` pair as `cargo xtask run`,
//! with `pingpong.breakdown=1`: every datagram carries the stamps the sender
//! and the shim took (the shim converts them to the receiver's TSC through
//! each guest's measured TSC offset) and the receiver adds its own; the
//! server reports the pings' trips, the client the echoes'. A round trip is
//! the two halves' medians added, and what they do not cover (the server
//! application's turnaround, the difference between a sum of medians and the
//! median of sums) is `rest`.
//!
//! Scenarios: `cargo xtask run`'s default (doorbells, exitless wait, run to
//! completion on the monitor, a monitor core), the same with the shim's own
//! spread placement, the same with the NIC worker threads, the
//! halt call and RX interrupt with worker threads (the path before), and
//! poll mode (`--rx poll`).

use std::time::Duration;

use serde::Deserialize;

use super::suite::{Better, Metric, Plot, RoundResult, Scenario, Suite};
use crate::error::{Error, Result};
use crate::scenario::pingpong::{self, Rx};
use crate::{infra::build, vmm::shim};

/// Pings per round.
const PINGS: u64 = 3000;

/// The stages in trip order: (guest key, metric id, label).
const STAGES: [(&str, &str, &str); 6] = [
    (
        "sender_app_to_notify",
        "app_to_notify_us",
        "sender: app to notify",
    ),
    (
        "notify_to_host_saw",
        "notify_to_host_us",
        "notify to host sees it",
    ),
    (
        "host_saw_to_tx_popped",
        "host_to_tx_pop_us",
        "host: to TX popped",
    ),
    (
        "tx_popped_to_rx_ring",
        "tx_pop_to_rx_ring_us",
        "switch to peer RX ring",
    ),
    (
        "rx_ring_to_stack_poll",
        "rx_ring_to_poll_us",
        "RX ring to peer polls",
    ),
    ("stack_poll_to_app", "poll_to_app_us", "peer: poll to app"),
];

/// A guest's `pingpong-breakdown:` line (the keys read here).
#[derive(Debug, Deserialize)]
struct Line {
    frames: u64,
    skipped: u64,
    p50_ns: std::collections::BTreeMap<String, u64>,
}

pub struct Breakdown;

impl Breakdown {
    fn options(rx: Rx, extra: &str) -> pingpong::Options {
        pingpong::Options {
            count: PINGS,
            rx,
            timeout: Duration::from_secs(90),
            extra_cmdline: format!("pingpong.breakdown=1 {extra}").trim().to_owned(),
            ..pingpong::Options::default()
        }
    }

    #[allow(clippy::cast_precision_loss)] // counts far below 2^52
    fn run(r: &mut RoundResult, id: &str, rx: Rx, extra: &str, shim_args: &[&str]) -> Result<()> {
        let mut opts = Self::options(rx, extra);
        opts.shim_args = ["--latency-stamps", "on"]
            .iter()
            .chain(shim_args)
            .map(|a| (*a).to_owned())
            .collect();
        let report = pingpong::on_shim(&opts, &format!("bench-breakdown-{id}"), |_| {})?;
        crate::test::verdict::require_all(&format!("{id}: the ping-pong failed"), &report.checks)?;
        let Some(c) = report.clients.first() else {
            return Err(Error::failed(format!("{id}: no client result")));
        };
        let rtt = c.p50_ns as f64 / 1e3;
        r.set(id, "rtt_p50_us", rtt);
        r.set(id, "pps", c.pps as f64);
        let steady: Vec<f64> = report
            .guests
            .iter()
            .filter_map(|g| g.steady_exits_per_packet)
            .collect();
        if !steady.is_empty() {
            r.set(
                id,
                "steady_exits_per_packet",
                steady.iter().sum::<f64>() / steady.len() as f64,
            );
        }
        let lines: Vec<Line> = report
            .breakdowns
            .iter()
            .filter_map(|(_, j)| serde_json::from_str(j).ok())
            .collect();
        if lines.len() != 2 {
            return Err(Error::failed(format!(
                "{id}: expected a breakdown line from both guests, got {}",
                lines.len()
            )));
        }
        let mut covered = 0.0;
        for (key, metric, _) in STAGES {
            let us: f64 = lines
                .iter()
                .map(|l| l.p50_ns.get(key).copied().unwrap_or(0) as f64 / 1e3)
                .sum();
            covered += us;
            r.set(id, metric, us);
        }
        r.set(id, "rest_us", (rtt - covered).max(0.0));
        let frames: u64 = lines.iter().map(|l| l.frames).sum();
        let skipped: u64 = lines.iter().map(|l| l.skipped).sum();
        r.set(
            id,
            "stamped_share",
            frames as f64 / (frames + skipped).max(1) as f64,
        );
        Ok(())
    }
}

impl Suite for Breakdown {
    fn name(&self) -> &'static str {
        "breakdown"
    }

    fn about(&self) -> String {
        format!(
            "Where one ping's round trip goes, stage by stage, on one clock: the `udp-pingpong` pair of `cargo xtask run` (2 guests, 2 vCPUs, doorbell notifications) with `pingpong.breakdown=1`, {PINGS} pings of 64 B per round. The shim takes and hands on the stamps only with `--latency-stamps on` (off by default: they would carry one guest's timing into another's page). The sender stamps (guest TSC, plain stores into its M4 shadow record) when its application hands the datagram to the stack and when it notifies its TX queue; the shim stamps (host TSC) when it sees the notification (the sender's wait exit that carries it, or a doorbell monitor consuming it), when the NIC worker pops the frame off the TX ring and when it puts it into the peer's RX ring, converts all of them to the receiver's TSC with each guest's offset (`IA32_TSC` read through `KVM_GET_MSRS` between two host TSC reads) and leaves them in the receiver's M4 wait page; the receiver adds when its stack first polled the ring after that and when the application got the datagram. Each stage is the sum of the median of both directions (the server reports the pings, the client the echoes); `rest` is the client's RTT p50 minus the stages (the server application's turnaround, and the difference between a sum of medians and the median of the sums). Offsets between two guests' clocks are good to a few µs: a stage up to 20 µs negative counts as 0, a larger one drops the frame (`stamped_share` is the share kept). Every scenario runs with `cargo xtask run`'s placement (`--pin sidecore`: both guests' vCPU 0 on host CPU 0, the doorbell monitors on CPU 1) unless it names another. Scenarios: the default (`cargo xtask run`: exitless wait, the sender's wait exit carries its TX notification and the waiting vCPU's thread runs the queue work to completion), the same with TX notified by doorbell (`net.tx_at_wait=off`: the spinning monitor on the other core runs it), the same with each guest's vCPU 0 on a CPU of its own and each guest's monitor on the other guest's CPU (`--pin spread`, the shim's own default), the same with the receiver's monitor pushing the frame into its RX ring (`--rx-handoff monitor`: the sender posts an event into the receiver's host-written range instead), the same with the NIC worker threads doing it (`--run-to-completion off`: doorbell -> monitor -> eventfd -> worker -> switch -> peer's worker), the path before both (halt call and RX interrupt, `net.wait=halt`, worker threads) and poll mode (`--rx poll`, default `net.poll_us=0`)."
        )
    }

    fn scenarios(&self) -> Vec<Scenario> {
        vec![
            Scenario::new("default", "default (exitless wait)"),
            Scenario::new("tx_doorbell", "default, TX by doorbell"),
            Scenario::new("spread", "default, --pin spread"),
            Scenario::new("rx_monitor", "default, RX work by the receiver's monitor"),
            Scenario::new("worker_threads", "exitless wait, NIC worker threads"),
            Scenario::new("halt", "halt + RX interrupt"),
            Scenario::new("poll", "--rx poll"),
        ]
    }

    fn metrics(&self) -> Vec<Metric> {
        let mut m = vec![
            Metric::new("rtt_p50_us", "RTT p50", "µs", Better::Lower),
            Metric::new("pps", "round trips/s", "1/s", Better::Higher),
            Metric::new(
                "steady_exits_per_packet",
                "steady exits/packet",
                "per guest",
                Better::Lower,
            ),
        ];
        for (_, id, label) in STAGES {
            m.push(Metric::new(id, label, "µs", Better::Lower));
        }
        m.push(Metric::new("rest_us", "rest", "µs", Better::Lower));
        m.push(Metric::new(
            "stamped_share",
            "frames stamped",
            "share",
            Better::Neither,
        ));
        m
    }

    fn baseline(&self) -> Option<&'static str> {
        Some("halt")
    }

    fn plots(&self) -> Vec<Plot> {
        let mut metrics: Vec<&'static str> = STAGES.iter().map(|(_, id, _)| *id).collect();
        metrics.push("rest_us");
        vec![
            Plot::Stacked {
                metrics,
                label: "one round trip, stage by stage",
                unit: "µs",
            },
            Plot::Bars {
                metric: "rtt_p50_us",
            },
        ]
    }

    fn prepare(&mut self) -> Result<()> {
        shim::build()?;
        build::build_guest(build::find_image("udp-pingpong")?)?;
        Ok(())
    }

    fn round(&mut self, _round: u32, order: &[Scenario]) -> Result<RoundResult> {
        let mut r = RoundResult::default();
        for s in order {
            match s.id {
                "default" => Self::run(&mut r, "default", Rx::Irq, "", &[])?,
                "tx_doorbell" => {
                    Self::run(&mut r, "tx_doorbell", Rx::Irq, "net.tx_at_wait=off", &[])?;
                }
                "spread" => Self::run(&mut r, "spread", Rx::Irq, "", &["--pin", "spread"])?,
                "rx_monitor" => Self::run(
                    &mut r,
                    "rx_monitor",
                    Rx::Irq,
                    "",
                    &["--rx-handoff", "monitor"],
                )?,
                "worker_threads" => Self::run(
                    &mut r,
                    "worker_threads",
                    Rx::Irq,
                    "",
                    &["--run-to-completion", "off"],
                )?,
                "halt" => Self::run(
                    &mut r,
                    "halt",
                    Rx::Irq,
                    "net.wait=halt",
                    &["--run-to-completion", "off"],
                )?,
                _ => Self::run(&mut r, "poll", Rx::Poll, "", &[])?,
            }
        }
        Ok(r)
    }
}
