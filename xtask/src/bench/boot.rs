//! `cargo xtask bench boot`: time from starting the VMM to the guest's main,
//! for the same PVH image under QEMU `-M q35` (SeaBIOS), QEMU `-M microvm`
//! (qboot) and the host shim.

use std::time::Duration;

use super::suite::{Better, Metric, RoundResult, Scenario, Suite};
use crate::error::{Error, Result};
use crate::infra::process::Line;
use crate::infra::serial::SerialLog;
use crate::vmm::qemu::{self, Accel, Echo, Machine, Net};
use crate::{infra::build, vmm::shim};

/// ktest reaches main, runs no test and exits 0.
const APPEND: &str = "ktest.boot_only";
const TIMEOUT: Duration = Duration::from_mins(1);

pub struct Boot;

/// (wall ms from VMM start to the marker line, guest µs from PVH entry).
fn from_lines(lines: &[Line]) -> Option<(f64, Option<f64>)> {
    let log = SerialLog::parse(lines.iter().map(|l| l.text.as_str()));
    let (i, tsc_us) = log.boot?;
    Some((lines[i].at.as_secs_f64() * 1e3, tsc_us))
}

fn record(r: &mut RoundResult, id: &str, got: Option<(f64, Option<f64>)>) -> Result<()> {
    let Some((wall_ms, tsc_us)) = got else {
        return Err(Error::failed(format!(
            "{id}: the guest never printed its boot marker"
        )));
    };
    r.set(id, "wall_ms", wall_ms);
    if let Some(us) = tsc_us {
        r.set(id, "guest_ms", us / 1e3);
    }
    Ok(())
}

fn on_qemu(r: &mut RoundResult, id: &str, machine: Machine) -> Result<()> {
    let image = build::build_guest(build::find_image("ktest")?)?;
    let cfg = qemu::Config {
        accel: Accel::Kvm,
        machine,
        smp: 2,
        mem_mib: 256,
        image,
        append: APPEND.into(),
        // The same device set as the shim gives: one virtio-net NIC.
        net: Net::User,
        hostfwd: Vec::new(),
        netdev: None,
        mac: None,
        nic_options: Vec::new(),
        extra_args: Vec::new(),
        timeout: TIMEOUT,
    };
    let run = qemu::boot(&cfg, &format!("bench-boot-{id}"), &Echo::Quiet)?;
    record(r, id, from_lines(&run.lines))
}

fn on_shim(r: &mut RoundResult) -> Result<()> {
    let path = shim::build()?;
    let image = build::build_guest(build::find_image("ktest")?)?;
    let guest = shim::Guest {
        name: "boot".into(),
        image,
        vcpus: 2,
        mem_mib: 256,
        cmdline: APPEND.into(),
    };
    let run = shim::run(&path, &[guest], &[], TIMEOUT, "bench-boot-shim", |_| {})?;
    // The shim prefixes guest lines with `NAME| `; timestamps stay the line's.
    let lines: Vec<Line> = run
        .lines
        .iter()
        .filter_map(|l| {
            l.text.strip_prefix("boot| ").map(|t| Line {
                at: l.at,
                text: t.to_owned(),
            })
        })
        .collect();
    record(r, "shim", from_lines(&lines))
}

impl Suite for Boot {
    fn name(&self) -> &'static str {
        "boot"
    }

    fn about(&self) -> String {
        format!(
            "Boot time to the guest's main for the same PVH image (`ktest` with `{APPEND}`, so it reaches main and exits), 2 vCPUs, 256 MiB, one virtio-net NIC. *Wall* is measured by xtask from spawning the VMM process to reading the guest's `boot: main reached` serial line (includes VMM start-up, firmware, and the serial path); *guest* is the guest's own TSC time from its PVH entry to main (ring-0 set-up, emulated here, plus ring-3 bring-up: ACPI, PCI, timer calibration unless the VMM gives the TSC frequency)."
        )
    }

    fn scenarios(&self) -> Vec<Scenario> {
        vec![
            Scenario::new("q35", "QEMU/KVM -M q35 (SeaBIOS)"),
            Scenario::new("microvm", "QEMU/KVM -M microvm (qboot)"),
            Scenario::new("shim", "host shim"),
        ]
    }

    fn metrics(&self) -> Vec<Metric> {
        vec![
            Metric::new("wall_ms", "VMM start to main (wall)", "ms", Better::Lower),
            Metric::new(
                "guest_ms",
                "PVH entry to main (guest TSC)",
                "ms",
                Better::Lower,
            ),
        ]
    }

    fn baseline(&self) -> Option<&'static str> {
        Some("q35")
    }

    fn headline(&self) -> Vec<(&'static str, &'static str)> {
        vec![("shim", "wall_ms"), ("microvm", "wall_ms")]
    }

    fn prepare(&mut self) -> Result<()> {
        crate::infra::setup::ensure_tool("qemu-system-x86_64", "qemu-system-x86")?;
        shim::build()?;
        build::build_guest(build::find_image("ktest")?)?;
        Ok(())
    }

    fn round(&mut self, _round: u32, order: &[Scenario]) -> Result<RoundResult> {
        let mut r = RoundResult::default();
        for s in order {
            match s.id {
                "q35" => on_qemu(&mut r, "q35", Machine::Q35)?,
                "microvm" => on_qemu(&mut r, "microvm", Machine::Microvm)?,
                _ => on_shim(&mut r)?,
            }
        }
        Ok(r)
    }
}
