//! What a fresh machine needs before we can build and boot guests: the
//! `x86_64-unknown-none` Rust target, QEMU, and (for KVM legs) `/dev/kvm`.

use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

use crate::error::{Error, Result};
use crate::infra::sys;
use crate::infra::workspace;

pub const GUEST_TARGET: &str = "x86_64-unknown-none";
pub const QEMU: &str = "qemu-system-x86_64";
/// The Debian package that provides [`QEMU`].
pub const QEMU_PACKAGE: &str = "qemu-system-x86";
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Installs the guest target with rustup unless it is there already.
pub fn ensure_guest_target() -> Result<()> {
    let listed = rustup(&["target", "list", "--installed"])?;
    if listed.lines().any(|line| line.trim() == GUEST_TARGET) {
        return Ok(());
    }
    println!(
        "setup: the {GUEST_TARGET} target is missing; running `rustup target add {GUEST_TARGET}`"
    );
    rustup(&["target", "add", GUEST_TARGET])?;
    Ok(())
}

fn rustup(args: &[&str]) -> Result<String> {
    let shown = format!("rustup {}", args.join(" "));
    let output = Command::new("rustup")
        .args(args)
        .current_dir(workspace::root())
        .output()
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => Error::failed(format!(
                "rustup is not on PATH: it is needed to install the {GUEST_TARGET} target (see https://rustup.rs)"
            )),
            _ => Error::failed(format!("cannot run `{shown}`: {e}")),
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let why = stderr
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        return Err(Error::failed(format!(
            "`{shown}` failed ({}): {why}",
            output.status
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The QEMU binary; installed with apt-get when missing and we are root.
pub fn ensure_qemu() -> Result<PathBuf> {
    ensure_tool(QEMU, QEMU_PACKAGE)
}

/// `binary` from PATH; when missing and we are root, Debian's `package` is
/// installed with apt-get. Otherwise the error names the package.
pub fn ensure_tool(binary: &str, package: &str) -> Result<PathBuf> {
    if let Some(path) = find_on_path(binary) {
        return Ok(path);
    }
    if !sys::is_root() {
        return Err(Error::failed(format!(
            "{binary} is not on PATH: install Debian's `{package}` package (as root: apt-get install -y {package})"
        )));
    }
    if find_on_path("apt-get").is_none() {
        return Err(Error::failed(format!(
            "{binary} is not on PATH and there is no apt-get to install it: install the `{package}` package"
        )));
    }
    println!("setup: {binary} is missing; running `apt-get update`");
    apt_get(&["update"], package)?;
    println!("setup: running `apt-get install -y {package}`");
    apt_get(&["install", "-y", package], package)?;
    find_on_path(binary).ok_or_else(|| {
        Error::failed(format!(
            "installed `{package}` but {binary} is still not on PATH"
        ))
    })
}

fn apt_get(args: &[&str], package: &str) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map_err(|e| Error::failed(format!("cannot run apt-get: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::failed(format!(
            "`apt-get {}` failed ({status}); install `{package}` by hand",
            args.join(" ")
        )))
    }
}

/// Why KVM cannot be used, if it cannot: `/dev/kvm` must be readable and
/// writable by us.
pub fn check_kvm() -> Result<(), String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(KVM_DEVICE)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Err(format!(
            "{KVM_DEVICE} does not exist: this machine offers no KVM"
        )),
        Err(e) if e.kind() == ErrorKind::PermissionDenied => Err(format!(
            "{KVM_DEVICE} is not readable and writable by this user (add the user to the `kvm` group): {e}"
        )),
        Err(e) => Err(format!("cannot open {KVM_DEVICE} read-write: {e}")),
    }
}

/// The first executable file called `name` in `PATH`.
#[must_use]
pub fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_lookup_finds_executables_only() {
        assert!(find_on_path("sh").is_some());
        assert!(find_on_path("surely-no-such-program-xtask").is_none());
    }
}
