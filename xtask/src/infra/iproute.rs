//! iproute2's `ip`, for the legs and benchmarks that set up TAP devices,
//! bridges and network namespaces (all of which need root).

use std::process::Command;

/// Runs `ip ARGS`; Err names the command and carries its stderr.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip {} (iproute2): {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
