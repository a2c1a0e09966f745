//! Building what the other commands run: guest images for
//! `x86_64-unknown-none` (always release, see the root `Cargo.toml`) and the
//! host binaries.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::infra::setup::{self, GUEST_TARGET};
use crate::infra::workspace;

/// A bootable guest image: one binary of one guest package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestImage {
    /// What `--image` calls it.
    pub name: &'static str,
    pub package: &'static str,
    pub bin: &'static str,
    /// Kernel command line it gets under QEMU unless `--append` says
    /// otherwise (QEMU always gives it a virtio-net NIC on user networking).
    pub qemu_append: &'static str,
}

/// Every guest image. Demos add theirs here.
pub const GUEST_IMAGES: &[GuestImage] = &[
    GuestImage {
        name: "ktest",
        package: "guest-kernel",
        bin: "ktest",
        // ktest.dhcp: the MSI-X test also waits for DHCP replies from QEMU's user
        // network, so RX interrupts are exercised as well as TX completions.
        qemu_append: "ktest.dhcp",
    },
    GuestImage {
        name: "udp-pingpong",
        package: "demos",
        bin: "udp-pingpong",
        // Alone under QEMU's user network it can only serve: 10.0.2.15 is
        // the address slirp expects; reach it with --hostfwd udp::PORT-:7777.
        qemu_append: "pingpong.role=server ip=10.0.2.15/24 gw=10.0.2.2",
    },
    GuestImage {
        name: "tcp-echo",
        package: "demos",
        bin: "tcp-echo",
        // Reach it with --hostfwd tcp::8080-:80 --hostfwd tcp::8007-:7.
        qemu_append: "ip=10.0.2.15/24 gw=10.0.2.2",
    },
    GuestImage {
        name: "hostile",
        package: "demos",
        bin: "hostile",
        // Attacks the shim's interfaces; under QEMU it finds no victim and says so.
        qemu_append: "ip=10.0.2.15/24 hostile.victim=10.0.2.2 hostile.marker=1",
    },
    GuestImage {
        name: "pipeline",
        package: "demos",
        bin: "pipeline",
        // Needs the shim's VM queues; under QEMU it says so and exits.
        qemu_append: "pipeline.role=write",
    },
];

/// Host packages built by `cargo xtask build` (release).
pub const HOST_PACKAGES: &[&str] = &["host-shim"];

impl GuestImage {
    /// Where cargo puts the built image.
    #[must_use]
    pub fn path(&self) -> PathBuf {
        workspace::target_dir()
            .join(GUEST_TARGET)
            .join("release")
            .join(self.bin)
    }
}

/// Looks up an image by name (a usage error names the ones that exist).
pub fn find_image(name: &str) -> Result<&'static GuestImage> {
    GUEST_IMAGES
        .iter()
        .find(|image| image.name == name)
        .ok_or_else(|| {
            let known: Vec<&str> = GUEST_IMAGES.iter().map(|image| image.name).collect();
            Error::usage(format!(
                "unknown guest image `{name}`: give a path to an ELF file or one of: {}",
                known.join(", ")
            ))
        })
}

/// Builds the given guest images (after making sure the target exists).
pub fn build_guests(images: &[&GuestImage]) -> Result<()> {
    if images.is_empty() {
        return Ok(());
    }
    setup::ensure_guest_target()?;
    let mut args = vec!["build", "--release", "--target", GUEST_TARGET];
    for image in images {
        args.extend(["-p", image.package, "--bin", image.bin]);
    }
    cargo(&args)?;
    for image in images {
        if !image.path().is_file() {
            return Err(Error::failed(format!(
                "cargo built {} but the image {} is missing",
                image.name,
                image.path().display()
            )));
        }
    }
    Ok(())
}

/// Builds one guest image and returns its path.
pub fn build_guest(image: &GuestImage) -> Result<PathBuf> {
    build_guests(&[image])?;
    Ok(image.path())
}

/// `cargo xtask build`: setup, every guest image, the host binaries.
pub fn build_all() -> Result<()> {
    setup::ensure_guest_target()?;
    setup::ensure_qemu()?;
    let images: Vec<&GuestImage> = GUEST_IMAGES.iter().collect();
    build_guests(&images)?;
    let mut args = vec!["build", "--release"];
    for package in HOST_PACKAGES {
        args.extend(["-p", package]);
    }
    cargo(&args)?;
    for image in GUEST_IMAGES {
        println!(
            "build: guest image {}: {}",
            image.name,
            image.path().display()
        );
    }
    for package in HOST_PACKAGES {
        println!(
            "build: host binary {package}: {}",
            workspace::target_dir()
                .join("release")
                .join(package)
                .display()
        );
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    let shown = format!("cargo {}", args.join(" "));
    eprintln!("build: {shown}");
    let status = workspace::cargo()
        .args(args)
        .status()
        .map_err(|e| Error::failed(format!("cannot run `{shown}`: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::failed(format!("`{shown}` failed ({status})")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_found_by_name() {
        let ktest = find_image("ktest").unwrap();
        assert_eq!((ktest.package, ktest.bin), ("guest-kernel", "ktest"));
        assert!(ktest.path().ends_with("x86_64-unknown-none/release/ktest"));
        let err = find_image("nope").unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string()
                .contains("one of: ktest, udp-pingpong, tcp-echo"),
            "{err}"
        );
    }
}
