//! Watching VMM processes while a benchmark runs: their CPU time and peak RSS
//! from `/proc`, and (for QEMU) KVM's statistics through QMP `query-stats`.
//!
//! Both vanish with the process, so a background thread samples every
//! [`PERIOD`] and keeps the last sample; guests linger a little after their last
//! packet (`pingpong.linger_ms`) so that the last sample holds the final counts.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

const PERIOD: Duration = Duration::from_millis(100);

/// The last sample of one child process.
#[derive(Debug, Clone, Default)]
pub struct ProcSample {
    /// utime + stime, all threads, in seconds.
    pub cpu_s: f64,
    /// Peak resident set (`VmHWM`), KiB.
    pub hwm_kib: u64,
}

/// The watched processes' totals at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    /// utime + stime over the matched processes, seconds.
    pub cpu_s: f64,
    /// KVM `exits` over the QMP sockets' VMs (0 without sockets).
    pub exits: u64,
}

/// What the probe saw by the time it was stopped.
#[derive(Debug, Default)]
pub struct Seen {
    /// By pid, children of this process whose `comm` matched.
    pub procs: BTreeMap<u32, ProcSample>,
    /// By QMP socket stem (`server`, `client1`): cumulative KVM stats summed over vCPUs.
    pub kvm: BTreeMap<String, BTreeMap<String, u64>>,
    /// Every sample, in time order.
    pub timeline: Vec<Sample>,
}

impl Seen {
    /// Host CPU seconds and KVM exits spent between `from` and `to`, each
    /// edge interpolated between the samples around it; `None` when the
    /// timeline does not cover the window.
    #[must_use]
    pub fn window(&self, from: Instant, to: Instant) -> Option<(f64, f64)> {
        let a = interpolate(&self.timeline, from)?;
        let b = interpolate(&self.timeline, to)?;
        (to > from).then_some((b.0 - a.0, b.1 - a.1))
    }
}

/// (CPU s, exits) at `t`, linear between the samples around it.
#[allow(clippy::cast_precision_loss)] // counts far below 2^52
fn interpolate(timeline: &[Sample], t: Instant) -> Option<(f64, f64)> {
    let after = timeline.iter().position(|s| s.at >= t)?;
    let b = timeline[after];
    if after == 0 {
        return (b.at == t).then_some((b.cpu_s, b.exits as f64));
    }
    let a = timeline[after - 1];
    let span = (b.at - a.at).as_secs_f64();
    let f = if span > 0.0 {
        (t - a.at).as_secs_f64() / span
    } else {
        1.0
    };
    Some((
        a.cpu_s + f * (b.cpu_s - a.cpu_s),
        a.exits as f64 + f * (b.exits as f64 - a.exits as f64),
    ))
}

pub struct Probe {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Seen>,
}

impl Probe {
    /// Starts sampling children named in `comms` and the QMP sockets `qmp`.
    pub fn start(comms: &'static [&'static str], qmp: Vec<PathBuf>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut seen = Seen::default();
            let me = std::process::id();
            while !flag.load(Ordering::Acquire) {
                // A process that just ended (a zombie until reaped) has no VmHWM
                // any more: keep the largest figures seen.
                for (pid, s) in children(me, comms) {
                    let e = seen.procs.entry(pid).or_default();
                    e.cpu_s = e.cpu_s.max(s.cpu_s);
                    e.hwm_kib = e.hwm_kib.max(s.hwm_kib);
                }
                for path in &qmp {
                    if let Some(stats) = qmp_kvm_stats(path) {
                        let stem = path
                            .file_stem()
                            .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
                        seen.kvm.insert(stem, stats);
                    }
                }
                seen.timeline.push(Sample {
                    at: Instant::now(),
                    cpu_s: seen.procs.values().map(|p| p.cpu_s).sum(),
                    exits: seen.kvm.values().filter_map(|k| k.get("exits")).sum(),
                });
                std::thread::sleep(PERIOD);
            }
            seen
        });
        Self { stop, handle }
    }

    pub fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Release);
        self.handle.join().unwrap_or_default()
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    #[allow(clippy::cast_precision_loss)]
    if t > 0 { t as f64 } else { 100.0 }
}

/// Children of `parent` whose comm is in `comms`, sampled now.
fn children(parent: u32, comms: &[&str]) -> Vec<(u32, ProcSample)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some(s) = parse_stat(&stat, parent, comms) {
            let hwm = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|t| vm_hwm_kib(&t))
                .unwrap_or(0);
            out.push((pid, ProcSample { hwm_kib: hwm, ..s }));
        }
    }
    out
}

/// `/proc/PID/stat` (proc(5)): comm in parentheses, then state, ppid, ...;
/// utime and stime are fields 14 and 15.
fn parse_stat(stat: &str, parent: u32, comms: &[&str]) -> Option<ProcSample> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = &stat[open + 1..close];
    if !comms.contains(&comm) {
        return None;
    }
    let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // rest[0] = state (field 3), rest[1] = ppid (4), rest[11] = utime (14), rest[12] = stime (15).
    let ppid: u32 = rest.get(1)?.parse().ok()?;
    if ppid != parent {
        return None;
    }
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    #[allow(clippy::cast_precision_loss)]
    Some(ProcSample {
        cpu_s: (utime + stime) as f64 / clock_ticks(),
        hwm_kib: 0,
    })
}

fn vm_hwm_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// One QMP exchange: greeting, `qmp_capabilities`, then `query-stats` for the
/// vCPUs' KVM statistics (QEMU ≥ 7.1), summed over vCPUs.
fn qmp_kvm_stats(path: &Path) -> Option<BTreeMap<String, u64>> {
    let stream = UnixStream::connect(path).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    let mut w = stream.try_clone().ok()?;
    let mut r = BufReader::new(stream);
    let mut greeting = String::new();
    r.read_line(&mut greeting).ok()?;
    if !greeting.contains("\"QMP\"") {
        return None;
    }
    let mut reply = |cmd: &str| -> Option<Value> {
        w.write_all(cmd.as_bytes()).ok()?;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).ok()? == 0 {
                return None;
            }
            let v: Value = serde_json::from_str(&line).ok()?;
            if v.get("return").is_some() || v.get("error").is_some() {
                return Some(v);
            }
        }
    };
    reply("{\"execute\": \"qmp_capabilities\"}\n")?;
    let v = reply(
        "{\"execute\": \"query-stats\", \"arguments\": {\"target\": \"vcpu\", \"providers\": [{\"provider\": \"kvm\"}]}}\n",
    )?;
    sum_vcpu_stats(&v)
}

fn sum_vcpu_stats(v: &Value) -> Option<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for vcpu in v.get("return")?.as_array()? {
        for s in vcpu.get("stats")?.as_array()? {
            if let (Some(n), Some(x)) = (
                s.get("name").and_then(Value::as_str),
                s.get("value").and_then(Value::as_u64),
            ) {
                *out.entry(n.to_owned()).or_insert(0) += x;
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stat_lines_parse_with_spaces_in_comm() {
        let line = "4242 (qemu-system-x86) S 100 4242 100 0 -1 4194560 1 0 0 0 250 50 0 0 20 0 3 0";
        let s = parse_stat(line, 100, &["qemu-system-x86"]).unwrap();
        assert!((s.cpu_s - 300.0 / clock_ticks()).abs() < 1e-9);
        assert!(
            parse_stat(line, 101, &["qemu-system-x86"]).is_none(),
            "not our child"
        );
        assert!(parse_stat(line, 100, &["host-shim"]).is_none());
        let odd = "7 (a) b) R 100 7 7 0 -1 0 0 0 0 0 1 2 0 0 20 0 1 0";
        assert!(parse_stat(odd, 100, &["a) b"]).is_some());
    }

    #[test]
    fn windows_interpolate_between_samples() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let seen = Seen {
            timeline: vec![
                Sample {
                    at: at(0),
                    cpu_s: 1.0,
                    exits: 100,
                },
                Sample {
                    at: at(100),
                    cpu_s: 2.0,
                    exits: 200,
                },
                Sample {
                    at: at(200),
                    cpu_s: 2.0,
                    exits: 400,
                },
            ],
            ..Seen::default()
        };
        let (cpu, exits) = seen.window(at(50), at(150)).unwrap();
        assert!((cpu - 0.5).abs() < 1e-9, "{cpu}");
        assert!((exits - 150.0).abs() < 1e-6, "{exits}");
        assert!(
            seen.window(at(50), at(250)).is_none(),
            "past the last sample"
        );
        assert!(seen.window(at(150), at(50)).is_none(), "backwards");
    }

    #[test]
    fn hwm_and_vcpu_sums() {
        assert_eq!(vm_hwm_kib("Name:\tx\nVmHWM:\t  12345 kB\n"), Some(12345));
        let v = json!({"return": [
            {"provider": "kvm", "stats": [{"name": "exits", "value": 10}, {"name": "guest_mode", "value": true}]},
            {"provider": "kvm", "stats": [{"name": "exits", "value": 5}]}
        ]});
        assert_eq!(sum_vcpu_stats(&v).unwrap()["exits"], 15);
    }
}
