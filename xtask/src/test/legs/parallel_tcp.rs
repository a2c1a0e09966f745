//! Leg `parallel-tcp`: 64 Linux clients at once against one tcp-echo guest
//! through the shim's TAP, echo and HTTP (the `sixty_four_parallel_…` test
//! of host-shim/tests/tap.rs, ignored by default: it needs root, `ip` and
//! the tcp-echo image).

use crate::test::leg::{Images, Leg, LegRun, Options};
use crate::test::legs::tap::tap_test;

/// The test's name in host-shim/tests/tap.rs.
const TEST: &str = "sixty_four_parallel_echo_and_http_clients_are_all_served";

/// Many concurrent TCP connections to one guest.
pub struct ParallelTcp;

impl Leg for ParallelTcp {
    fn name(&self) -> &'static str {
        "parallel-tcp"
    }

    fn about(&self) -> &'static str {
        "64 Linux TCP echo clients, all connected at once, then 64 HTTP clients, against one 32 MiB tcp-echo guest through the shim's TAP: every byte back, every page served, none refused or reset"
    }

    fn run(&self, images: &mut Images, opts: &Options) -> LegRun {
        tap_test(self.name(), images, opts, TEST, &["--nocapture"])
    }
}
