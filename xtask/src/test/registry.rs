//! The legs of `cargo xtask test`, in the order they run, and the selection
//! `--leg` makes. Add a leg by writing its file under `legs/` and listing it
//! here.

use crate::error::{Error, Result};
use crate::test::leg::Leg;
use crate::test::legs::api::ShimApi;
use crate::test::legs::backtrace::Backtrace;
use crate::test::legs::containerd::Containerd;
use crate::test::legs::direct::ShimDirect;
use crate::test::legs::doorbell::ShimDoorbell;
use crate::test::legs::flood::ShimFlood;
use crate::test::legs::fuzz::Fuzz;
use crate::test::legs::gdb::Gdb;
use crate::test::legs::guest::QemuGuest;
use crate::test::legs::guest_shim::ShimGuest;
use crate::test::legs::hints::ShimHints;
use crate::test::legs::hostile::Hostile;
use crate::test::legs::interop::QemuInterop;
use crate::test::legs::parallel_tcp::ParallelTcp;
use crate::test::legs::pingpong::{QemuPingpong, ShimPingpong};
use crate::test::legs::pipeline::ShimPipeline;
use crate::test::legs::redesignate::ShimRedesignate;
use crate::test::legs::soak::Soak;
use crate::test::legs::tap::ShimTap;
use crate::test::legs::template::Template;
use crate::test::legs::unit::Unit;
use crate::test::legs::vmqnet::ShimVmqNet;
use crate::vmm::qemu::Accel;

/// Every leg, in run order.
pub const LEGS: &[&dyn Leg] = &[
    &Unit,
    &Fuzz,
    &QemuGuest {
        name: "guest-tcg",
        about: "in-guest tests, QEMU TCG q35 -smp 2",
        image: "ktest",
        accel: Accel::Tcg,
        smp: 2,
    },
    &QemuGuest {
        name: "guest-kvm",
        about: "in-guest tests, QEMU KVM q35 -smp 2",
        image: "ktest",
        accel: Accel::Kvm,
        smp: 2,
    },
    &ShimGuest { vcpus: 2 },
    &ShimPingpong,
    &ShimDoorbell,
    &ShimFlood,
    &ShimRedesignate,
    &ShimHints,
    &ShimPipeline,
    &ShimVmqNet,
    &ShimDirect,
    &Hostile,
    &Gdb,
    &Backtrace,
    &QemuPingpong,
    &ShimTap,
    &ParallelTcp,
    &Soak,
    &ShimApi,
    &Template,
    &QemuInterop,
    &Containerd,
];

/// The legs named (all of them when none is), in the order of [`LEGS`].
pub fn select(names: &[String]) -> Result<Vec<&'static dyn Leg>> {
    if let Some(unknown) = names
        .iter()
        .find(|name| !LEGS.iter().any(|leg| leg.name() == name.as_str()))
    {
        let known: Vec<&str> = LEGS.iter().map(|leg| leg.name()).collect();
        return Err(Error::usage(format!(
            "unknown leg `{unknown}`: the legs are {}",
            known.join(", ")
        )));
    }
    Ok(LEGS
        .iter()
        .copied()
        .filter(|leg| names.is_empty() || names.iter().any(|name| name == leg.name()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leg_selection() {
        let all: Vec<&str> = select(&[]).unwrap().iter().map(|l| l.name()).collect();
        assert_eq!(
            all,
            [
                "unit",
                "fuzz",
                "guest-tcg",
                "guest-kvm",
                "guest-shim",
                "shim-pingpong",
                "shim-doorbell",
                "shim-flood",
                "shim-redesignate",
                "shim-hints",
                "shim-pipeline",
                "shim-vmqnet",
                "shim-direct",
                "hostile",
                "gdb",
                "backtrace",
                "qemu-pingpong",
                "shim-tap",
                "parallel-tcp",
                "soak",
                "api",
                "template",
                "interop",
                "containerd",
            ]
        );
        let some: Vec<&str> = select(&["guest-kvm".into(), "unit".into()])
            .unwrap()
            .iter()
            .map(|l| l.name())
            .collect();
        assert_eq!(some, ["unit", "guest-kvm"]);
        let Err(err) = select(&["guest".into()]) else {
            panic!("`guest` is no leg");
        };
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("unknown leg `guest`"), "{err}");
    }
}
