//! `cargo xtask run --app PATH`: builds an app crate (one made by `cargo
//! xtask new`, or any crate laid out like it) as a guest image and boots it
//! alone, under the host shim or under QEMU, showing its console.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::infra::setup::{self, GUEST_TARGET};
use crate::infra::workspace;
use crate::vmm::exit::GuestExit;
use crate::vmm::qemu::{self, Accel, Echo, Machine, Net};
use crate::vmm::shim;

/// Where an app boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmm {
    Shim,
    Qemu,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// The app crate's folder.
    pub path: PathBuf,
    pub vmm: Vmm,
    /// Kernel command line; `None`: a static address that fits the VMM's network.
    pub cmdline: Option<String>,
    /// QEMU only: host ports forwarded to the guest (`tcp::8007-:7`).
    pub hostfwd: Vec<String>,
    pub vcpus: u32,
    pub timeout: Duration,
    /// Print the console as it comes.
    pub show: bool,
    /// Wait for gdb on 127.0.0.1:PORT before the guest's first instruction.
    pub gdb: Option<u16>,
}

/// Tells the user how to attach gdb to a guest that waits for it.
pub fn print_gdb_hint(port: u16, elf: &Path, timeout: Duration) {
    println!(
        "gdb: the guest waits for gdb on 127.0.0.1:{port}; attach from another terminal with:"
    );
    println!(
        "  gdb -ex 'target remote 127.0.0.1:{port}' {}",
        elf.display()
    );
    println!(
        "gdb: the run still ends after {} s (--timeout SECS for a longer session); `detach` lets the guest run on",
        timeout.as_secs()
    );
}

/// The package name in `path/Cargo.toml` (its `[package]` `name`).
fn package_name(path: &Path) -> Result<String> {
    let manifest = path.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).map_err(|e| {
        Error::usage(format!(
            "{} is not an app crate ({e}); make one with `cargo xtask new NAME`",
            manifest.display()
        ))
    })?;
    let mut in_package = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_package = line == "[package]";
        } else if in_package
            && let Some(v) = line.strip_prefix("name").map(str::trim_start)
            && let Some(v) = v.strip_prefix('=')
        {
            return Ok(v.trim().trim_matches('"').to_owned());
        }
    }
    Err(Error::usage(format!(
        "{} has no [package] name",
        manifest.display()
    )))
}

/// Builds the app at `path` for the guest target; returns its ELF. Apps share
/// one target folder (`target/apps` of this checkout), so the guest kernel
/// and its dependencies are compiled once for all of them.
pub fn build(path: &Path) -> Result<PathBuf> {
    setup::ensure_guest_target()?;
    let name = package_name(path)?;
    let target_dir = workspace::target_dir().join("apps");
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // Run in the app's folder: its .cargo/config.toml picks the guest target.
    let status = Command::new(program)
        .current_dir(path)
        .args(["build", "--release", "--target", GUEST_TARGET])
        .env("CARGO_TARGET_DIR", &target_dir)
        .status()
        .map_err(|e| Error::failed(format!("cannot run cargo build in {}: {e}", path.display())))?;
    if !status.success() {
        return Err(Error::failed(format!(
            "building the app in {} failed ({status})",
            path.display()
        )));
    }
    let elf = target_dir.join(GUEST_TARGET).join("release").join(&name);
    if elf.is_file() {
        Ok(elf)
    } else {
        Err(Error::failed(format!(
            "cargo built {name} but {} is missing (is the binary named like the package?)",
            elf.display()
        )))
    }
}

/// Builds and boots the app; its exit and every console line it printed.
pub fn boot(opts: &Options) -> Result<(GuestExit, Vec<String>)> {
    let elf = build(&opts.path)?;
    let name = package_name(&opts.path)?;
    match opts.vmm {
        Vmm::Shim => {
            let guest = shim::Guest {
                name: name.clone(),
                image: elf,
                vcpus: opts.vcpus,
                mem_mib: 256,
                // The shim's switch has no gateway; any private address works.
                cmdline: opts
                    .cmdline
                    .clone()
                    .unwrap_or_else(|| "ip=10.0.0.2/24".into()),
            };
            let echo = |line: &str| {
                if opts.show {
                    println!("{line}");
                }
            };
            let label = format!("app-{name}");
            let shim_bin = shim::build()?;
            let extra: Vec<String> = opts
                .gdb
                .map(|port| vec!["--gdb".to_owned(), port.to_string()])
                .unwrap_or_default();
            if let Some(port) = opts.gdb {
                print_gdb_hint(port, &guest.image, opts.timeout);
            }
            let run = shim::run(&shim_bin, &[guest], &extra, opts.timeout, &label, echo)?;
            let lines = shim::guest_lines(&run.lines, &name)
                .into_iter()
                .map(str::to_owned)
                .collect();
            Ok((run.guest_exit(&name), lines))
        }
        Vmm::Qemu => {
            let cfg = qemu::Config {
                // With gdb, TCG: QEMU's breakpoints under KVM rely on the
                // host reporting the guest's int3 (KVM_GUESTDBG_USE_SW_BP),
                // which not every KVM does.
                accel: if opts.gdb.is_none() && setup::check_kvm().is_ok() {
                    Accel::Kvm
                } else {
                    Accel::Tcg
                },
                machine: Machine::Q35,
                smp: opts.vcpus,
                mem_mib: 256,
                image: elf,
                // QEMU's user network expects the guest at 10.0.2.15.
                append: opts
                    .cmdline
                    .clone()
                    .unwrap_or_else(|| "ip=10.0.2.15/24 gw=10.0.2.2".into()),
                net: Net::User,
                hostfwd: opts.hostfwd.clone(),
                netdev: None,
                mac: None,
                nic_options: Vec::new(),
                extra_args: opts.gdb.map(qemu::gdb_args).unwrap_or_default(),
                timeout: opts.timeout,
            };
            if let Some(port) = opts.gdb {
                print_gdb_hint(port, &cfg.image, opts.timeout);
            }
            let echo = if opts.show { Echo::All } else { Echo::Quiet };
            let run = qemu::boot(&cfg, &format!("app-{name}"), &echo)?;
            let lines = run.lines.iter().map(|l| l.text.clone()).collect();
            Ok((run.exit, lines))
        }
    }
}
