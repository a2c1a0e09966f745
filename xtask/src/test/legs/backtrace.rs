//! Leg `backtrace`: a guest that panics on purpose (`ktest.panic`, two
//! never-inlined calls deep) prints a frame-pointer backtrace, and xtask
//! symbolises it from the image: the lines must name both functions of the
//! purpose-built chain and the guest's entry, with their source lines.

use crate::infra::symbols;
use crate::test::leg::{Images, Leg, LegRun, Options};
use crate::vmm::exit::GuestExit;
use crate::vmm::shim;

pub struct Backtrace;

const GUEST: &str = "panicky";

impl Leg for Backtrace {
    fn name(&self) -> &'static str {
        "backtrace"
    }

    fn about(&self) -> &'static str {
        "ktest.panic under the shim: the guest's panic prints a frame-pointer backtrace that xtask symbolises, naming the panicking function, its caller and the app's main with file:line"
    }

    fn run(&self, images: &mut Images, opts: &Options) -> LegRun {
        let image = match images.get("ktest") {
            Ok(p) => p,
            Err(e) => return LegRun::broken(format!("building ktest: {e}")),
        };
        let shim_bin = match shim::build() {
            Ok(p) => p,
            Err(e) => return LegRun::broken(e.to_string()),
        };
        let guest = shim::Guest {
            name: GUEST.into(),
            image,
            vcpus: 1,
            mem_mib: 256,
            cmdline: "ktest.panic".into(),
        };
        let verbose = opts.verbose;
        let run = match shim::run(&shim_bin, &[guest], &[], opts.timeout, "backtrace", |l| {
            if verbose {
                println!("{l}");
            }
        }) {
            Ok(r) => r,
            Err(e) => return LegRun::broken(format!("the shim: {e}")),
        };
        let lines = shim::guest_lines(&run.lines, GUEST);
        let trace: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.contains(symbols::PREFIX))
            .collect();
        let exit = run.guest_exit(GUEST);
        let checks = judge(&lines, &trace, exit);
        let reports = trace.iter().map(|l| format!("guest: {l}")).collect();
        LegRun::from_checks(&checks, reports, Some(run.log.clone()))
    }
}

/// The checks on the guest's console (`lines`), its backtrace lines
/// (`trace`) and its exit.
fn judge(lines: &[&str], trace: &[&str], exit: GuestExit) -> Vec<(String, bool)> {
    let frame_with = |name: &str| {
        trace
            .iter()
            .any(|l| l.contains(name) && l.contains(" at ") && l.contains(".rs:"))
    };
    let position = |name: &str| trace.iter().position(|l| l.contains(name));
    vec![
        (
            format!("the guest panicked: exit status 2 ({exit})"),
            exit == GuestExit::Status(2),
        ),
        (
            "the panic line names the message".into(),
            lines.iter().any(|l| l.contains("on purpose (ktest.panic)")),
        ),
        (
            format!("a backtrace of at least 3 frames ({})", trace.len()),
            trace.len() >= 3,
        ),
        (
            "a frame names panic_on_purpose_inner with its file:line".into(),
            frame_with("panic_on_purpose_inner"),
        ),
        (
            "a frame names panic_on_purpose_outer with its file:line".into(),
            frame_with("panic_on_purpose_outer"),
        ),
        (
            "the inner function's frame comes before its caller's".into(),
            position("panic_on_purpose_inner")
                .zip(position("panic_on_purpose_outer"))
                .is_some_and(|(i, o)| i < o),
        ),
        (
            "a frame names the app's main".into(),
            trace.iter().any(|l| l.contains("::main")),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::judge;
    use crate::vmm::exit::GuestExit;

    #[test]
    fn an_unsymbolised_trace_fails_the_name_checks() {
        let trace = [
            "g| backtrace: #0 0x201000",
            "g| backtrace: #1 0x201010",
            "g| backtrace: #2 0x2",
        ];
        let checks = judge(&["on purpose (ktest.panic)"], &trace, GuestExit::Status(2));
        let failed: Vec<_> = checks.iter().filter(|(_, ok)| !ok).collect();
        assert_eq!(failed.len(), 4, "{checks:?}");
    }
}
