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

/// Guests the launch scenario starts through the API, one after another.
const LAUNCHED: usize = 16;

/// The shim's resident set now (`VmRSS`), in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A shim with `--api-sock` and no guests; [`LAUNCHED`] idle `tcp-echo`
/// guests (1 vCPU, 64 MiB) created through `PUT /guests/NAME` back to back.
/// Launch rate: guests per second from the first request until every guest
/// reached its main (polled through `GET /guests/NAME/stats`); memory: the
/// shim's RSS growth per idle guest once all wait for connections.
fn on_api(r: &mut RoundResult) -> Result<()> {
    use crate::infra::unix_http::request;
    use std::time::Instant;
    let path = shim::build()?;
    let image = build::build_guest(build::find_image("tcp-echo")?)?;
    let dir = std::env::temp_dir().join(format!("exitless-launch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::failed(format!("{}: {e}", dir.display())))?;
    let sock = dir.join("api.sock");
    let mut cmd = std::process::Command::new(&path);
    cmd.arg("--api-sock")
        .arg(&sock)
        .arg("--quiet")
        .env(
            crate::infra::sys::PARENT_PID_ENV,
            std::process::id().to_string(),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // Never left behind: it ends with xtask (the variable above) and is in
    // a process group of its own.
    crate::infra::sys::contain(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::failed(format!("cannot start {}: {e}", path.display())))?;
    let api = |method: &str, p: &str, body: &str| {
        request(&sock, method, p, body).map_err(|e| Error::failed(format!("API {method} {p}: {e}")))
    };
    let outcome = (|| -> Result<(f64, f64, f64)> {
        let t = Instant::now();
        while !sock.exists() {
            if t.elapsed() > TIMEOUT {
                return Err(Error::failed("the shim never created its API socket"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let before = rss_kib(child.id()).unwrap_or(0);
        let t0 = Instant::now();
        for i in 0..LAUNCHED {
            let body = format!(
                "{{\"kernel\": \"{}\", \"vcpus\": 1, \"mem\": \"64M\", \"cmdline\": \"ip=10.0.9.{}/24\"}}",
                image.display(),
                i + 1
            );
            let (code, text) = api("PUT", &format!("/guests/g{i}"), &body)?;
            if !(200..300).contains(&code) {
                return Err(Error::failed(format!("PUT /guests/g{i}: {code} {text}")));
            }
        }
        let mut waiting: Vec<usize> = (0..LAUNCHED).collect();
        while !waiting.is_empty() {
            if t0.elapsed() > TIMEOUT {
                return Err(Error::failed(format!(
                    "{} guests never reached main",
                    waiting.len()
                )));
            }
            waiting.retain(|i| {
                api("GET", &format!("/guests/g{i}/stats"), "").is_ok_and(|(_, text)| {
                    !serde_json::from_str::<serde_json::Value>(&text)
                        .is_ok_and(|v| v["boot_to_main_ms"].is_number())
                })
            });
        }
        let all_up = t0.elapsed().as_secs_f64();
        // Idle: every guest waits for a connection.
        std::thread::sleep(Duration::from_millis(200));
        let after = rss_kib(child.id()).unwrap_or(0);
        #[allow(clippy::cast_precision_loss)] // small counts
        let per_guest = after.saturating_sub(before) as f64 / 1024.0 / LAUNCHED as f64;
        #[allow(clippy::cast_precision_loss)]
        let rate = LAUNCHED as f64 / all_up;
        let (_, _) = api("PUT", "/actions", "{\"action\": \"shutdown\"}")?;
        Ok((rate, per_guest, all_up * 1e3))
    })();
    let ended = (0..500).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        child.try_wait().ok().flatten().is_some()
    });
    if !ended {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (rate, per_guest, all_ms) = outcome?;
    r.set("api", "launch_per_s", rate);
    r.set("api", "idle_rss_mib", per_guest);
    r.set("api", "launch_all_ms", all_ms);
    Ok(())
}

impl Suite for Boot {
    fn name(&self) -> &'static str {
        "boot"
    }

    fn about(&self) -> String {
        format!(
            "Boot time to the guest's main for the same PVH image (`ktest` with `{APPEND}`, so it reaches main and exits), 2 vCPUs, 256 MiB, one virtio-net NIC. *Wall* is measured by xtask from spawning the VMM process to reading the guest's `boot: main reached` serial line (includes VMM start-up, firmware, and the serial path); *guest* is the guest's own TSC time from its PVH entry to main (ring-0 set-up, emulated here, plus ring-3 bring-up: ACPI, PCI, timer calibration unless the VMM gives the TSC frequency). *Launch*: one shim started with `--api-sock` and no guest; {LAUNCHED} `tcp-echo` guests (1 vCPU, 64 MiB, each its own address) created with `PUT /guests/NAME` one after another; the rate is {LAUNCHED} over the time from the first request until every guest's stats show it reached main, and the memory is the shim's RSS growth over the {LAUNCHED} idle guests (waiting for connections), divided by {LAUNCHED}."
        )
    }

    fn scenarios(&self) -> Vec<Scenario> {
        vec![
            Scenario::new("q35", "QEMU/KVM -M q35 (SeaBIOS)"),
            Scenario::new("microvm", "QEMU/KVM -M microvm (qboot)"),
            Scenario::new("shim", "host shim"),
            Scenario::new(
                "api",
                "host shim, 16 tcp-echo guests created through its API",
            ),
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
            Metric::new(
                "launch_per_s",
                "guests started through the API per second (to main)",
                "guests/s",
                Better::Higher,
            ),
            Metric::new(
                "idle_rss_mib",
                "shim RSS per idle guest",
                "MiB",
                Better::Lower,
            ),
            Metric::new(
                "launch_all_ms",
                "first PUT to the last guest's main",
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
        build::build_guest(build::find_image("tcp-echo")?)?;
        Ok(())
    }

    fn round(&mut self, _round: u32, order: &[Scenario]) -> Result<RoundResult> {
        let mut r = RoundResult::default();
        for s in order {
            match s.id {
                "q35" => on_qemu(&mut r, "q35", Machine::Q35)?,
                "microvm" => on_qemu(&mut r, "microvm", Machine::Microvm)?,
                "api" => on_api(&mut r)?,
                _ => on_shim(&mut r)?,
            }
        }
        Ok(r)
    }
}
