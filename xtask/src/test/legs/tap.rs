//! Leg `shim-tap`: the shim's `--tap` test (host-shim/tests/tap.rs, ignored
//! by default: it needs root, `ip` and the tcp-echo image). The file's
//! parallel test is leg `parallel-tcp`.

use crate::infra::setup;
use crate::test::leg::{Images, Leg, LegRun, Options};
use crate::test::legs::unit::run_cargo_test;

/// Linux in a network namespace reaching a tcp-echo guest through the TAP.
pub struct ShimTap;

impl Leg for ShimTap {
    fn name(&self) -> &'static str {
        "shim-tap"
    }

    fn about(&self) -> &'static str {
        "Linux in a network namespace reaches a tcp-echo guest through the shim's TAP (HTTP + TCP echo)"
    }

    fn run(&self, images: &mut Images, opts: &Options) -> LegRun {
        tap_test(
            self.name(),
            images,
            opts,
            "host_linux_talks_http_and_tcp_echo_to_a_guest_through_the_tap",
            &[],
        )
    }
}

/// Runs one test of host-shim/tests/tap.rs (ignored by default) with the
/// tcp-echo image, `extra` arguments after the test's name.
pub fn tap_test(
    leg: &str,
    images: &mut Images,
    opts: &Options,
    test: &str,
    extra: &[&str],
) -> LegRun {
    if let Err(why) = setup::check_kvm() {
        return LegRun::broken(format!("cannot use KVM: {why}"));
    }
    let image = match images.get("tcp-echo") {
        Ok(image) => image,
        Err(e) => return LegRun::broken(e),
    };
    let mut args = vec![
        "-p",
        "host-shim",
        "--test",
        "tap",
        "--",
        "--ignored",
        "--exact",
        test,
    ];
    args.extend_from_slice(extra);
    run_cargo_test(
        leg,
        opts,
        &args,
        &[("EXITLESS_TCP_ECHO_IMAGE", image.as_path())],
    )
}
