//! Running guests under the host shim: build it, start it with guests under a
//! time limit, split its console output by guest (each line is prefixed with
//! `NAME| `), and read its `--stats-json` (typed in [`crate::vmm::stats`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::infra::logfile::LogFile;
use crate::infra::process::{self, Ending, Line, Stderr};
use crate::infra::serial::SerialLog;
use crate::infra::setup;
use crate::infra::symbols::Symbols;
use crate::infra::workspace;
use crate::vmm::exit::GuestExit;
use crate::vmm::stats::{DirectStats, ExitsByReason, GuestStats, Notifications, ShimStats};

/// One guest on the shim's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guest {
    pub name: String,
    pub image: PathBuf,
    pub vcpus: u32,
    pub mem_mib: u32,
    pub cmdline: String,
}

impl Guest {
    /// The `--guest` value (cmdline last: it may contain commas).
    #[must_use]
    pub fn spec(&self) -> String {
        let mut s = format!(
            "name={},kernel={},vcpus={},mem={}M",
            self.name,
            self.image.display(),
            self.vcpus,
            self.mem_mib
        );
        if !self.cmdline.is_empty() {
            s.push_str(",cmdline=");
            s.push_str(&self.cmdline);
        }
        s
    }
}

#[derive(Debug)]
pub struct Run {
    pub ending: Ending,
    /// Every stdout line of the shim (guest consoles and its summary).
    pub lines: Vec<Line>,
    pub stderr: String,
    /// The shim's `--stats-json`; `None` when it wrote none.
    pub stats: Option<ShimStats>,
    pub log: PathBuf,
    pub elapsed: Duration,
}

/// Builds the shim (release) and returns its path.
pub fn build() -> Result<PathBuf> {
    let status = workspace::cargo()
        .args(["build", "--release", "-p", "host-shim"])
        .status()
        .map_err(|e| Error::failed(format!("cannot run cargo build -p host-shim: {e}")))?;
    if !status.success() {
        return Err(Error::failed(format!(
            "building host-shim failed ({status})"
        )));
    }
    let path = workspace::target_dir().join("release").join("host-shim");
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::failed(format!(
            "cargo built host-shim but {} is missing",
            path.display()
        )))
    }
}

/// Runs `shim` with `guests` (and `extra` flags) until it exits or `timeout`.
/// `echo` sees every stdout line as it arrives.
pub fn run(
    shim: &PathBuf,
    guests: &[Guest],
    extra: &[String],
    timeout: Duration,
    label: &str,
    mut echo: impl FnMut(&str),
) -> Result<Run> {
    setup::check_kvm().map_err(|why| Error::failed(format!("cannot use KVM: {why}")))?;
    for g in guests {
        if !g.image.is_file() {
            return Err(Error::failed(format!(
                "guest image {} does not exist",
                g.image.display()
            )));
        }
    }
    let mut log = LogFile::create(label)?;
    let stats_path = log.path().with_extension("stats.json");
    let _ = std::fs::remove_file(&stats_path);
    let mut cmd = Command::new(shim);
    for g in guests {
        cmd.arg("--guest").arg(g.spec());
    }
    // The shim's own limit comes first so it can report; ours is the backstop.
    cmd.arg("--timeout")
        .arg(timeout.as_secs().max(1).to_string());
    // A guest that fails ends the run at once: nobody waits for the time
    // limit next to a dead peer.
    cmd.arg("--end-on-failure");
    cmd.arg("--stats-json").arg(&stats_path);
    cmd.args(extra);
    cmd.env("NO_COLOR", "1");
    // The shim arranges its own end with xtask: no fork here (see `contain`).
    cmd.env(
        crate::infra::sys::PARENT_PID_ENV,
        std::process::id().to_string(),
    );
    let shown: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    log.line(&format!("# xtask: {} {}", shim.display(), shown.join(" ")));
    // A guest's panic backtrace, symbolised from its image as it arrives.
    let mut symbols: Vec<(String, Symbols)> = guests
        .iter()
        .map(|g| (format!("{}| ", g.name), Symbols::new(&g.image)))
        .collect();
    let mut symbolise = |text: &str| {
        symbols
            .iter_mut()
            .find(|(prefix, _)| text.starts_with(prefix.as_str()))
            .and_then(|(_, s)| s.annotate(text))
    };
    let mut finished = process::run(
        &mut cmd,
        timeout + Duration::from_secs(15),
        Stderr::Capture,
        |line| {
            let shown = symbolise(&line.text);
            let text = shown.as_deref().unwrap_or(&line.text);
            log.line(text);
            echo(text);
        },
    )?;
    for line in &mut finished.lines {
        if let Some(text) = symbolise(&line.text) {
            line.text = text;
        }
    }
    for line in finished.stderr.lines() {
        log.line(&format!("# shim stderr: {line}"));
    }
    // A file that does not parse (a key renamed in the shim) fails the run:
    // read as zeros, its counters would pass checks they should fail.
    let stats = ShimStats::read(&stats_path).map_err(Error::failed)?;
    log.line(&format!(
        "# xtask: shim ended {:?} after {:.1} s",
        finished.ending,
        finished.elapsed.as_secs_f64()
    ));
    Ok(Run {
        ending: finished.ending,
        lines: finished.lines,
        stderr: finished.stderr,
        stats,
        log: log.path().to_path_buf(),
        elapsed: finished.elapsed,
    })
}

/// Whether a line of the shim's stdout tells of a failure: the shim's word
/// that a guest failed, or a guest's panic or fatal exception. Demos show
/// these the moment they arrive.
#[must_use]
pub fn is_alarm(line: &str) -> bool {
    line.starts_with("host-shim: ") || line.contains("PANIC") || line.contains("EXCEPTION ")
}

/// The guest's own account of a crash: its panic or exception line.
#[must_use]
pub fn crash_line<'a>(lines: &[&'a str]) -> Option<&'a str> {
    lines
        .iter()
        .map(|l| l.trim())
        .find(|l| l.contains("PANIC") || l.contains("EXCEPTION "))
}

/// How guest `name` ended, in words: `exit` as xtask reads it, `outcome` as
/// the shim said it, `lines` its console (for a panic message).
#[must_use]
pub fn what_happened(name: &str, exit: GuestExit, outcome: &str, lines: &[&str]) -> String {
    let crash = crash_line(lines).map_or_else(String::new, |l| format!(": {l}"));
    match exit {
        GuestExit::Status(0) => format!("{name} exited with status 0"),
        GuestExit::Status(2) => format!("{name} panicked (exit status 2){crash}"),
        GuestExit::Status(3) => format!("{name} died of a fatal exception (exit status 3){crash}"),
        GuestExit::Status(s) => format!("{name} exited with status {s}, not 0 ({exit})"),
        GuestExit::TimedOut => format!("{name} was still running at the time limit"),
        _ if outcome.starts_with("stopped") => format!("{name} was {outcome}"),
        _ => format!("{name} ended without an exit status: {outcome}{crash}"),
    }
}

/// The console lines of guest `name`, without the `NAME| ` prefix.
#[must_use]
pub fn guest_lines<'a>(lines: &'a [Line], name: &str) -> Vec<&'a str> {
    let prefix = format!("{name}| ");
    lines
        .iter()
        .filter_map(|l| l.text.strip_prefix(prefix.as_str()))
        .collect()
}

impl Run {
    #[must_use]
    pub fn serial(&self, name: &str) -> SerialLog {
        SerialLog::parse(guest_lines(&self.lines, name))
    }

    /// Guest `name`'s entry in the stats JSON.
    #[must_use]
    pub fn guest_stats(&self, name: &str) -> Option<&GuestStats> {
        self.stats.as_ref()?.guest(name)
    }

    /// How guest `name` ended, in the same terms as a QEMU run.
    #[must_use]
    pub fn guest_exit(&self, name: &str) -> GuestExit {
        if self.ending == Ending::TimedOut {
            return GuestExit::TimedOut;
        }
        match self.guest_stats(name).and_then(|g| g.exit_status) {
            Some(s) => GuestExit::Status(s),
            // No status: the guest faulted, was stopped, or the shim failed.
            None => match self.ending {
                Ending::Exited(2) => GuestExit::QemuError(2),
                Ending::Signalled(sig) => GuestExit::Signalled(sig),
                _ => GuestExit::QemuZero,
            },
        }
    }

    /// The shim's account of guest `name` when it has no exit status.
    #[must_use]
    pub fn guest_outcome(&self, name: &str) -> String {
        self.guest_stats(name).map_or_else(
            || "no stats from the shim".to_owned(),
            |g| g.outcome.clone(),
        )
    }

    /// The check every shim demo makes of each guest: it exited with status
    /// 0. Named by what happened: a failed check reads as the fact it is
    /// ("client1 panicked: ...", "server was stopped: guest client1 failed").
    #[must_use]
    pub fn exit_check(&self, name: &str) -> (String, bool) {
        let exit = self.guest_exit(name);
        let lines = guest_lines(&self.lines, name);
        (
            what_happened(name, exit, &self.guest_outcome(name), &lines),
            exit.passed(),
        )
    }

    /// Prints the tail of the run's output and the log path.
    pub fn print_post_mortem(&self) {
        let tail = process::tail(&self.lines, crate::vmm::qemu::TAIL_LINES);
        println!(
            "---- host-shim ran {:.1} s; last {} lines of its output ({}) ----",
            self.elapsed.as_secs_f64(),
            tail.len(),
            self.log.display()
        );
        for line in tail {
            println!("{}", line.text);
        }
        let err_tail: Vec<&str> = self.stderr.lines().rev().take(10).collect();
        if !err_tail.is_empty() {
            println!("---- host-shim stderr (last {} lines) ----", err_tail.len());
            for l in err_tail.iter().rev() {
                println!("{l}");
            }
        }
        println!("---- end ----");
    }
}

/// Numbers the demo summary needs from one guest's stats entry.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestNumbers {
    pub exits: u64,
    pub exits_by_reason: ExitsByReason,
    pub notifications: Notifications,
    pub tx_packets: u64,
    pub rx_packets: u64,
    pub interrupts: u64,
    pub boot_to_main_ms: Option<f64>,
    /// KVM's binary statistics summed over the guest's vCPUs.
    pub kvm: BTreeMap<String, u64>,
    /// Direct-channel counters, when the shim offered direct channels.
    pub direct: Option<DirectStats>,
    /// Exitless waits that carried a TX notification.
    pub tx_carried_by_waits: u64,
    /// Doorbell events host threads posted through its host-written range
    /// (`--rx-handoff monitor`), as its monitor consumed them.
    pub host_events: u64,
}

impl GuestNumbers {
    #[must_use]
    pub fn of(guest: &GuestStats) -> Self {
        Self {
            exits: guest.exits,
            exits_by_reason: guest.exits_by_reason,
            notifications: guest.notifications,
            tx_packets: guest.tx_packets(),
            rx_packets: guest.rx_packets(),
            interrupts: guest.interrupts(),
            boot_to_main_ms: guest.boot_to_main_ms,
            kvm: guest.kvm_sums(),
            direct: guest.direct.clone(),
            tx_carried_by_waits: guest.ctrl.wait.tx_carried,
            host_events: guest.doorbell.host_events,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::stats;

    fn line(text: &str) -> Line {
        Line {
            at: Duration::ZERO,
            text: text.into(),
        }
    }

    #[test]
    fn guest_spec_puts_cmdline_last() {
        let g = Guest {
            name: "cli".into(),
            image: PathBuf::from("/t/udp-pingpong"),
            vcpus: 2,
            mem_mib: 256,
            cmdline: "ip=10.0.0.2/24 pingpong.peer=10.0.0.1".into(),
        };
        assert_eq!(
            g.spec(),
            "name=cli,kernel=/t/udp-pingpong,vcpus=2,mem=256M,cmdline=ip=10.0.0.2/24 pingpong.peer=10.0.0.1"
        );
    }

    #[test]
    fn console_lines_are_split_by_guest() {
        let lines = [
            line("a| test x ... ok"),
            line("b| test y ... ok"),
            line("=== summary"),
            line("a| 1 passed, 0 failed"),
        ];
        assert_eq!(
            guest_lines(&lines, "a"),
            ["test x ... ok", "1 passed, 0 failed"]
        );
        assert_eq!(guest_lines(&lines, "b"), ["test y ... ok"]);
        assert!(guest_lines(&lines, "ab").is_empty());
    }

    #[test]
    fn endings_are_worded_by_what_happened() {
        let panic = [
            "[cpu0 INFO ] x",
            "PANIC on cpu0: memory allocation of 80000000 bytes failed",
        ];
        assert_eq!(
            what_happened("client1", GuestExit::Status(2), "exit status 2", &panic),
            "client1 panicked (exit status 2): PANIC on cpu0: memory allocation of 80000000 bytes failed"
        );
        assert_eq!(
            what_happened("c", GuestExit::Status(0), "exit status 0", &[]),
            "c exited with status 0"
        );
        let failed = what_happened("c", GuestExit::Status(1), "exit status 1", &[]);
        assert!(
            failed.starts_with("c exited with status 1, not 0"),
            "{failed}"
        );
        assert_eq!(
            what_happened(
                "server",
                GuestExit::QemuZero,
                "stopped: guest client1 failed",
                &[]
            ),
            "server was stopped: guest client1 failed"
        );
        assert_eq!(
            what_happened("s", GuestExit::TimedOut, "interrupted", &[]),
            "s was still running at the time limit"
        );
        assert_eq!(
            what_happened(
                "t",
                GuestExit::QemuZero,
                "triple fault on vCPU 0 at rip 0x0",
                &[]
            ),
            "t ended without an exit status: triple fault on vCPU 0 at rip 0x0"
        );
    }

    #[test]
    fn exits_and_statuses_come_from_the_stats() {
        let mut b = stats::sample("ktest");
        b.name = "b".into();
        b.exit_status = None;
        b.outcome = "triple fault".into();
        let mut stats = ShimStats::parse(stats::SAMPLE).unwrap();
        stats.guests = vec![stats::sample("server"), b];
        let run = Run {
            ending: Ending::Exited(1),
            lines: vec![],
            stderr: String::new(),
            stats: Some(stats),
            log: PathBuf::new(),
            elapsed: Duration::ZERO,
        };
        assert_eq!(run.guest_exit("server"), GuestExit::Status(0));
        assert_eq!(run.guest_exit("b"), GuestExit::QemuZero);
        assert_eq!(run.guest_outcome("b"), "triple fault");
        assert_eq!(run.guest_outcome("c"), "no stats from the shim");
        let g = run.guest_stats("server").unwrap();
        let n = GuestNumbers::of(g);
        assert_eq!(
            (n.exits, n.tx_packets, n.rx_packets, n.interrupts),
            (
                g.exits,
                g.nics[0].tx_packets,
                g.nics[0].rx_packets,
                g.nics[0].interrupts
            )
        );
        assert_eq!(n.exits_by_reason.in_kernel, g.exits_by_reason.in_kernel);
    }
}
