//! The shim's seccomp filters stop a thread that makes a call outside its
//! allow-list, and the shim says which thread and which call.

use std::process::Command;

const SHIM: &str = env!("CARGO_BIN_EXE_host-shim");

/// Runs the hidden self-test of filter `kind` (the "guest" is never started:
/// the self-test runs before; any existing file passes the argument check).
fn selftest(kind: &str, seccomp: &str) -> std::process::Output {
    Command::new(SHIM)
        .args(["--guest", &format!("kernel={SHIM}")])
        .args(["--seccomp", seccomp, "--seccomp-selftest", kind])
        .output()
        .expect("the shim runs")
}

#[test]
fn a_call_outside_the_list_stops_the_shim_and_is_reported() {
    for kind in [
        "main", "vcpu", "monitor", "net", "tap", "vmq", "helper", "gdb", "api", "control",
    ] {
        let out = selftest(kind, "on");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(159),
            "{kind}: {:?}, stderr: {stderr}",
            out.status
        );
        assert!(
            stderr.contains(&format!(
                "thread selftest ({kind} filter) made system call socket (41)"
            )),
            "{kind}: {stderr}"
        );
        assert!(
            out.stdout.is_empty(),
            "{kind}: the call must not have returned"
        );
    }
}

#[test]
fn with_seccomp_off_the_same_call_goes_through() {
    let out = selftest("vcpu", "off");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("no filter stopped it"), "{stdout}");
}
