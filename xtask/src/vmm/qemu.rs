//! Booting a guest image under QEMU with a time limit, the serial console
//! streamed and kept in a log file.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use clap::ValueEnum;

use crate::error::{Error, Result};
use crate::infra::logfile::LogFile;
use crate::infra::process::{self, Ending, Line, Stderr};
use crate::infra::serial::{self, LineKind, SerialLog};
use crate::infra::setup;
use crate::infra::symbols::Symbols;
use crate::vmm::exit::GuestExit;

/// Default wall-clock limit for one QEMU run. Generous on purpose: under this
/// machine's KVM, SeaBIOS alone takes ~6 s and every guest ring-0
/// instruction is emulated.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_mins(2);

/// Serial lines shown when a run fails.
pub const TAIL_LINES: usize = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Accel {
    /// QEMU's instruction translator (`-accel tcg -cpu max`).
    Tcg,
    /// KVM (`-accel kvm -cpu host,-arch-capabilities`); needs read-write /dev/kvm.
    Kvm,
}

impl Accel {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Tcg => "tcg",
            Self::Kvm => "kvm",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Machine {
    /// PC with PCIe, ACPI and SeaBIOS (slow firmware under this KVM).
    Q35,
    /// Minimal machine with qboot (fast); PCI only through ECAM.
    Microvm,
}

impl Machine {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Q35 => "q35",
            Self::Microvm => "microvm",
        }
    }
}

/// The guest's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Net {
    /// A virtio-net-pci NIC on QEMU user networking (DHCP at 10.0.2.2).
    User,
    /// No NIC.
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub accel: Accel,
    pub machine: Machine,
    pub smp: u32,
    pub mem_mib: u32,
    pub image: PathBuf,
    /// Kernel command line (`-append`), omitted when empty.
    pub append: String,
    pub net: Net,
    /// QEMU `hostfwd` rules for user networking, e.g. `tcp::8080-:80`.
    pub hostfwd: Vec<String>,
    /// A whole `-netdev` value (its id must be `net0`) used instead of `net`,
    /// e.g. `socket,id=net0,listen=127.0.0.1:17001` to join two guests.
    pub netdev: Option<String>,
    /// The NIC's MAC address (QEMU picks 52:54:00:12:34:56 otherwise, the
    /// same for every guest).
    pub mac: Option<String>,
    /// More `virtio-net-pci` properties, e.g. `vectors=0` (no MSI-X).
    pub nic_options: Vec<String>,
    /// More QEMU arguments, appended last (e.g. `-qmp unix:PATH,server=on,wait=off`
    /// for a benchmark that reads KVM statistics).
    pub extra_args: Vec<String>,
    pub timeout: Duration,
}

/// QEMU's gdb stub on 127.0.0.1:`port`, the guest stopped before its first
/// instruction until gdb continues (`-S`).
#[must_use]
pub fn gdb_args(port: u16) -> Vec<String> {
    vec!["-gdb".into(), format!("tcp:127.0.0.1:{port}"), "-S".into()]
}

/// QEMU's arguments for `cfg`. Checked against Debian's QEMU 7.2:
/// - `-nodefaults -display none`: no default devices or window; the only
///   serial port is the one we add, on stdio.
/// - `-no-reboot`: a triple fault ends QEMU (exit 0) instead of rebooting
///   forever, so it fails the run at once.
/// - isa-debug-exit at port 0xf4: the guest's status `s` becomes exit
///   code `2*s + 1`. microvm keeps an ISA bus, so it works there too.
/// - microvm needs `pcie=on` for PCI (ECAM only) and `acpi=on` for the MADT
///   the guest uses to find its CPUs; `rtc=on` keeps the CMOS clock.
/// - The NIC is virtio-net-pci (modern on a PCIe slot) on user networking.
#[must_use]
pub fn args(cfg: &Config) -> Vec<OsString> {
    let machine = match cfg.machine {
        Machine::Q35 => "q35",
        Machine::Microvm => "microvm,pcie=on,acpi=on,rtc=on",
    };
    let cpu = match cfg.accel {
        Accel::Tcg => "max",
        // Some KVM hosts (seen on a nested `kvm_pvm` machine) refuse the
        // IA32_ARCH_CAPABILITIES MSR (0x10a) QEMU 7.2 writes for `-cpu host`,
        // and QEMU aborts on an assertion before the guest runs. The guest
        // never reads that MSR, so it is left out everywhere.
        Accel::Kvm => "host,-arch-capabilities",
    };
    let mut args: Vec<OsString> = [
        "-M",
        machine,
        "-m",
        &format!("{}M", cfg.mem_mib),
        "-smp",
        &cfg.smp.to_string(),
        "-accel",
        cfg.accel.name(),
        "-cpu",
        cpu,
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let netdev = cfg.netdev.clone().or_else(|| {
        (cfg.net == Net::User).then(|| {
            let mut netdev = "user,id=net0".to_owned();
            for rule in &cfg.hostfwd {
                netdev.push_str(",hostfwd=");
                netdev.push_str(rule);
            }
            netdev
        })
    });
    if let Some(netdev) = netdev {
        let mut device = "virtio-net-pci,netdev=net0".to_owned();
        if let Some(mac) = &cfg.mac {
            device.push_str(",mac=");
            device.push_str(mac);
        }
        for option in &cfg.nic_options {
            device.push(',');
            device.push_str(option);
        }
        args.extend([
            "-netdev".into(),
            netdev.into(),
            "-device".into(),
            device.into(),
        ]);
    }
    args.push("-kernel".into());
    args.push(cfg.image.clone().into_os_string());
    if !cfg.append.is_empty() {
        args.push("-append".into());
        args.push(cfg.append.clone().into());
    }
    args.extend(cfg.extra_args.iter().map(OsString::from));
    args
}

/// What to show on the terminal while the guest runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Echo {
    /// Every serial line, as is.
    All,
    /// Only protocol lines (tests, summary, reports, boot), prefixed.
    Protocol { prefix: String },
    /// Nothing (the log file still has every line).
    Quiet,
}

#[derive(Debug)]
pub struct Run {
    pub exit: GuestExit,
    pub lines: Vec<Line>,
    pub stderr: String,
    pub log: PathBuf,
    pub elapsed: Duration,
}

impl Run {
    #[must_use]
    pub fn serial(&self) -> SerialLog {
        SerialLog::parse(self.lines.iter().map(|l| l.text.as_str()))
    }

    /// Wall time from QEMU start to the boot marker.
    #[must_use]
    pub fn boot_wall(&self) -> Option<Duration> {
        self.serial().boot.map(|(index, _)| self.lines[index].at)
    }

    /// The tail of the serial log, QEMU's stderr and the log path, for a
    /// failed run.
    pub fn print_post_mortem(&self) {
        let tail = process::tail(&self.lines, TAIL_LINES);
        println!(
            "---- last {} serial lines ({}) ----",
            tail.len(),
            self.log.display()
        );
        for line in tail {
            println!("{}", line.text);
        }
        if !self.stderr.trim().is_empty() {
            println!("---- QEMU stderr ----");
            println!("{}", self.stderr.trim_end());
        }
        println!("---- end (full serial log: {}) ----", self.log.display());
    }
}

/// Boots `cfg.image` and waits for QEMU to exit or the time limit.
/// `label` names the log file (it should say leg/accel).
pub fn boot(cfg: &Config, label: &str, echo: &Echo) -> Result<Run> {
    if cfg.accel == Accel::Kvm {
        setup::check_kvm().map_err(|why| Error::failed(format!("cannot use KVM: {why}")))?;
    }
    let qemu = setup::ensure_qemu()?;
    if !cfg.image.is_file() {
        return Err(Error::failed(format!(
            "guest image {} does not exist",
            cfg.image.display()
        )));
    }
    let args = args(cfg);
    let mut log = LogFile::create(label)?;
    let shown: Vec<String> = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    log.line(&format!("# xtask: {} {}", qemu.display(), shown.join(" ")));

    let mut cmd = Command::new(&qemu);
    cmd.args(&args);
    // A panic's backtrace, symbolised from the image as it arrives.
    let mut symbols = Symbols::new(&cfg.image);
    let mut finished = process::run(&mut cmd, cfg.timeout, Stderr::Capture, |line| {
        let shown = symbols.annotate(&line.text);
        let text = shown.as_deref().unwrap_or(&line.text);
        log.line(text);
        show(echo, text);
    })?;
    for line in &mut finished.lines {
        if let Some(text) = symbols.annotate(&line.text) {
            line.text = text;
        }
    }

    let exit = match finished.ending {
        // QEMU's own start-up errors also exit 1, which would read as guest
        // status 0: the console never said anything but QEMU complained.
        Ending::Exited(1) if finished.lines.is_empty() && !finished.stderr.trim().is_empty() => {
            GuestExit::QemuError(1)
        }
        ending => GuestExit::from_ending(ending),
    };
    for line in finished.stderr.lines() {
        log.line(&format!("# qemu stderr: {line}"));
    }
    log.line(&format!(
        "# xtask: {exit} after {:.1} s",
        finished.elapsed.as_secs_f64()
    ));
    Ok(Run {
        exit,
        lines: finished.lines,
        stderr: finished.stderr,
        log: log.path().to_path_buf(),
        elapsed: finished.elapsed,
    })
}

fn show(echo: &Echo, text: &str) {
    match echo {
        Echo::All => println!("{text}"),
        Echo::Quiet => {}
        Echo::Protocol { prefix } => {
            if !matches!(serial::classify(text), LineKind::Other) {
                println!("{prefix}: {}", text.trim());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(accel: Accel, machine: Machine, append: &str) -> Config {
        Config {
            accel,
            machine,
            smp: 2,
            mem_mib: 256,
            image: PathBuf::from("/t/ktest"),
            append: append.into(),
            net: Net::User,
            hostfwd: vec![],
            netdev: None,
            mac: None,
            nic_options: vec![],
            extra_args: vec![],
            timeout: DEFAULT_TIMEOUT,
        }
    }

    fn joined(cfg: &Config) -> String {
        args(cfg)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn q35_tcg_command_line() {
        assert_eq!(
            joined(&cfg(Accel::Tcg, Machine::Q35, "log=debug")),
            "-M q35 -m 256M -smp 2 -accel tcg -cpu max -nodefaults -display none -no-reboot -serial stdio \
             -device isa-debug-exit,iobase=0xf4,iosize=0x04 -netdev user,id=net0 -device virtio-net-pci,netdev=net0 \
             -kernel /t/ktest -append log=debug"
        );
    }

    #[test]
    fn network_options() {
        let mut with_fwd = cfg(Accel::Tcg, Machine::Q35, "");
        with_fwd.hostfwd = vec!["tcp::8080-:80".into(), "udp::5555-:7".into()];
        let line = joined(&with_fwd);
        assert!(
            line.contains("-netdev user,id=net0,hostfwd=tcp::8080-:80,hostfwd=udp::5555-:7 -device virtio-net-pci,netdev=net0 -kernel"),
            "{line}"
        );
        let mut no_nic = cfg(Accel::Tcg, Machine::Q35, "");
        no_nic.net = Net::None;
        let line = joined(&no_nic);
        assert!(!line.contains("net"), "{line}");
        assert!(line.ends_with("iosize=0x04 -kernel /t/ktest"), "{line}");
    }

    #[test]
    fn a_raw_netdev_and_mac_replace_user_networking() {
        let mut c = cfg(Accel::Kvm, Machine::Q35, "");
        c.netdev = Some("socket,id=net0,listen=127.0.0.1:17001".into());
        c.mac = Some("52:54:00:00:00:01".into());
        c.nic_options = vec!["vectors=0".into()];
        let line = joined(&c);
        assert!(
            line.contains("-netdev socket,id=net0,listen=127.0.0.1:17001 -device virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01,vectors=0 -kernel"),
            "{line}"
        );
        assert!(!line.contains("user,"), "{line}");
    }

    #[test]
    fn kvm_uses_the_host_cpu_and_microvm_its_options() {
        let line = joined(&cfg(Accel::Kvm, Machine::Microvm, ""));
        assert!(
            line.starts_with("-M microvm,pcie=on,acpi=on,rtc=on "),
            "{line}"
        );
        assert!(
            line.contains("-accel kvm -cpu host,-arch-capabilities"),
            "{line}"
        );
        assert!(!line.contains("-append"), "{line}");
    }
}
