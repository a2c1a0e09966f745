//! The command line as a user meets it: errors name what to fix.

use std::process::Command;

fn shim(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_host-shim"))
        .args(args)
        .output()
        .expect("run host-shim");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn no_arguments_name_the_missing_guest() {
    let (code, err) = shim(&[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--guest"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn an_unknown_flag_is_named() {
    let (code, err) = shim(&["--no-such-flag"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--no-such-flag"), "{err}");
}

#[test]
fn help_teaches_the_log_variable_and_an_example() {
    let out = Command::new(env!("CARGO_BIN_EXE_host-shim"))
        .arg("--help")
        .output()
        .expect("run host-shim --help");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(help.contains("RUST_LOG"), "{help}");
    assert!(help.contains("--guest name=server,kernel=$K"), "{help}");
}
