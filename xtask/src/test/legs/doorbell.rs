//! Leg `shim-doorbell`: the ping-pong under the shim with the virtio notify
//! register and with doorbells, guest by guest. Asserted: every packet
//! arrives both ways, doorbells replace the trapping notifications, and each
//! guest's median steady-state exits per packet drop by a set amount.

use std::collections::BTreeMap;

use para_abi::report::percentile;

use crate::scenario::pingpong;
use crate::test::leg::{Images, Leg, LegRun, Options};
use crate::test::verdict;
use crate::vmm::shim::GuestNumbers;

/// Interleaved pairs of `--notify trap` and `--notify doorbell` runs.
pub struct ShimDoorbell;

impl Leg for ShimDoorbell {
    fn name(&self) -> &'static str {
        "shim-doorbell"
    }

    fn about(&self) -> &'static str {
        "ping-pong under the shim, 3 interleaved pairs of --notify trap and doorbell runs: all packets delivered, no trapping notifications with doorbells, and each guest's median steady-state KVM exits per packet drop by at least 0.3 (the register write of every frame sent; RX refills ask for no notification in either)"
    }

    fn run(&self, _: &mut Images, opts: &Options) -> LegRun {
        run_notify_comparison(self.name(), opts)
    }
}

/// Trap/doorbell run pairs of the `shim-doorbell` leg. Exits per packet move
/// from run to run on a loaded machine, so the goal "drop by at least
/// [`NOTIFY_DROP`]" is judged on the medians of interleaved runs, not on one
/// pair.
const NOTIFY_PAIRS: usize = 3;
/// The exits per packet the doorbells must save per guest: with trap, every
/// frame sent is a register write that exits (0.5 per packet in a ping-pong),
/// less the waits a reply that comes before the wait saves (measured drop
/// 0.42); with doorbells the wait's exit carries the notification. RX
/// refills need no notification in either (the device asks only when frames
/// wait for buffers).
const NOTIFY_DROP: f64 = 0.3;

/// The nearest-rank median (the definition the guests use too).
fn median(v: &mut [f64]) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    percentile(v, 50)
}

/// The exit goal, per guest: the median of its doorbell runs' steady
/// exits per packet lies at least [`NOTIFY_DROP`] below the median of its trap runs.
fn judge_drops(steady: BTreeMap<String, (Vec<f64>, Vec<f64>)>, checks: &mut Vec<(String, bool)>) {
    for (name, (mut t, mut d)) in steady {
        let n = (t.len(), d.len());
        match (median(&mut t), median(&mut d)) {
            (Some(tm), Some(dm)) if n == (NOTIFY_PAIRS, NOTIFY_PAIRS) => checks.push((
                format!(
                    "{name}: median steady-state exits/packet drop by >= {NOTIFY_DROP} over {NOTIFY_PAIRS} pairs: {tm:.2} (trap) -> {dm:.2} (doorbell) = {:.2}",
                    tm - dm
                ),
                tm - dm >= NOTIFY_DROP,
            )),
            _ => checks.push((format!("{name}: steady-state figures from every pair ({n:?})"), false)),
        }
    }
}

/// One trap/doorbell pair, guest by guest: the notification checks, a report
/// line, and the steady exits per packet kept for [`judge_drops`].
fn compare_guests(
    round: usize,
    trap: &pingpong::Report,
    doorbell: &pingpong::Report,
    checks: &mut Vec<(String, bool)>,
    reports: &mut Vec<String>,
    steady: &mut BTreeMap<String, (Vec<f64>, Vec<f64>)>,
) {
    for (t, d) in trap.guests.iter().zip(&doorbell.guests) {
        let (Some(tn), Some(dn)) = (&t.numbers, &d.numbers) else {
            checks.push((
                format!("pair {}: {}: counts from both runs", round + 1, t.name),
                false,
            ));
            continue;
        };
        #[allow(clippy::cast_precision_loss)] // packet counts far below 2^52
        let traps_per_packet = |n: &GuestNumbers| {
            n.notifications.trap as f64 / (n.tx_packets + n.rx_packets).max(1) as f64
        };
        let (trap_traps, door_traps) = (traps_per_packet(tn), traps_per_packet(dn));
        checks.push((
            format!(
                "pair {}: {}: trap run notifies every frame sent through the register ({} of {})",
                round + 1,
                t.name,
                tn.notifications.trap,
                tn.tx_packets
            ),
            tn.tx_packets > 0 && tn.notifications.trap >= tn.tx_packets,
        ));
        checks.push((
            format!(
                "pair {}: {}: doorbell run has near-zero trapping notifications ({door_traps:.3}/packet)",
                round + 1,
                t.name
            ),
            door_traps < 0.05,
        ));
        match (t.steady_exits_per_packet, d.steady_exits_per_packet) {
            (Some(ts), Some(ds)) => {
                reports.push(format!(
                    "pair {}: {}: steady-state exits/packet {ts:.2} (trap) -> {ds:.2} (doorbell), whole run {:.2} -> {:.2}; trapping notifications/packet {trap_traps:.3} -> {door_traps:.3}",
                    round + 1,
                    t.name,
                    t.exits_per_packet().unwrap_or(f64::NAN),
                    d.exits_per_packet().unwrap_or(f64::NAN),
                ));
                let e = steady.entry(t.name.clone()).or_default();
                e.0.push(ts);
                e.1.push(ds);
            }
            _ => checks.push((
                format!(
                    "pair {}: {}: steady-state marks from both runs",
                    round + 1,
                    t.name
                ),
                false,
            )),
        }
    }
}

fn run_notify_comparison(leg: &str, opts: &Options) -> LegRun {
    let run = |notify, round: usize| {
        let o = pingpong::Options {
            count: 1000,
            timeout: opts.timeout,
            notify,
            ..pingpong::Options::default()
        };
        pingpong::on_shim(
            &o,
            &format!("{leg}-{notify:?}-{round}").to_lowercase(),
            |_| {},
        )
    };
    let mut checks: Vec<(String, bool)> = Vec::new();
    let mut reports = Vec::new();
    // Per guest name: steady exits/packet of each trap run, of each doorbell run.
    let mut steady: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    let mut log = None;
    for round in 0..NOTIFY_PAIRS {
        let (trap, doorbell) = match (
            run(pingpong::Notify::Trap, round),
            run(pingpong::Notify::Doorbell, round),
        ) {
            (Ok(t), Ok(d)) => (t, d),
            (Err(e), _) | (_, Err(e)) => {
                return LegRun {
                    reports,
                    log,
                    ..LegRun::broken(e.to_string())
                };
            }
        };
        let tag = |mode: &str| format!("pair {}: {mode} run", round + 1);
        checks.extend(
            trap.checks
                .iter()
                .map(|(n, ok)| (format!("{}: {n}", tag("trap")), *ok)),
        );
        checks.extend(
            doorbell
                .checks
                .iter()
                .map(|(n, ok)| (format!("{}: {n}", tag("doorbell")), *ok)),
        );
        compare_guests(
            round,
            &trap,
            &doorbell,
            &mut checks,
            &mut reports,
            &mut steady,
        );
        for (label, r) in [("trap", &trap), ("doorbell", &doorbell)] {
            for c in &r.clients {
                reports.push(format!(
                    "pair {}: {label}: {} rtt p50 {} us, p99 {} us, {} pps",
                    round + 1,
                    c.name,
                    c.p50_ns / 1000,
                    c.p99_ns / 1000,
                    c.pps
                ));
            }
        }
        log = Some(doorbell.log);
    }
    judge_drops(steady, &mut checks);
    LegRun {
        outcome: verdict::judge_checks(&checks),
        reports,
        log,
    }
}
