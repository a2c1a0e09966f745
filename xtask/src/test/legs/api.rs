//! Leg `api`: the shim's API socket and config file with real guests
//! (host-shim/tests/api.rs, its tests that run guests, ignored by default:
//! they need /dev/kvm and the udp-pingpong and ktest images).

use crate::infra::setup;
use crate::test::leg::{Images, Leg, LegRun, Options};
use crate::test::legs::unit::run_cargo_test;

/// Guests created, pinged, counted and removed through `--api-sock`, and a
/// run from `--config`.
pub struct ShimApi;

impl Leg for ShimApi {
    fn name(&self) -> &'static str {
        "api"
    }

    fn about(&self) -> &'static str {
        "the shim's API socket: a udp-pingpong client created through the API pings a command-line \
         server (every ping back, stats and metrics count it), the in-guest suite passes in a guest \
         created through the API with M1-M4 offered, 12 create/delete cycles give back every \
         thread, file, shared mapping and switch port; a run from a --config file"
    }

    fn run(&self, images: &mut Images, opts: &Options) -> LegRun {
        if let Err(why) = setup::check_kvm() {
            return LegRun::broken(format!("cannot use KVM: {why}"));
        }
        let pingpong = match images.get("udp-pingpong") {
            Ok(image) => image,
            Err(e) => return LegRun::broken(e),
        };
        let ktest = match images.get("ktest") {
            Ok(image) => image,
            Err(e) => return LegRun::broken(e),
        };
        run_cargo_test(
            self.name(),
            opts,
            &["-p", "host-shim", "--test", "api", "--", "--ignored"],
            &[
                ("EXITLESS_PINGPONG_IMAGE", pingpong.as_path()),
                ("EXITLESS_KTEST_IMAGE", ktest.as_path()),
            ],
        )
    }
}
