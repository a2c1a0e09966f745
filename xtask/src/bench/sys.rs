//! What machine a benchmark ran on, for the report.

use std::process::Command;

use serde_json::{Value, json};

fn first_line_with(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The KVM module(s) loaded: `kvm_intel`, `kvm_amd`, or this kind's `kvm_pvm`.
fn kvm_backend() -> String {
    let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    let found: Vec<&str> = modules
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|m| m.starts_with("kvm_"))
        .collect();
    if !found.is_empty() {
        return found.join(", ");
    }
    for m in ["kvm_pvm", "kvm_intel", "kvm_amd"] {
        if std::path::Path::new(&format!("/sys/module/{m}")).exists() {
            return m.to_owned();
        }
    }
    if std::path::Path::new("/dev/kvm").exists() {
        "/dev/kvm present, backend module not visible".into()
    } else {
        "no /dev/kvm".into()
    }
}

/// CPU model, core count, kernel, KVM backend, QEMU version.
pub fn machine() -> Value {
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let vmx = std::fs::read_to_string("/proc/cpuinfo")
        .is_ok_and(|t| t.contains(" vmx") || t.contains(" svm"));
    json!({
        "cpu": first_line_with("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown".into()),
        "cores": cores,
        "kernel": command_output("uname", &["-sr"]).unwrap_or_else(|| "unknown".into()),
        "kvm_backend": kvm_backend(),
        "hardware_virtualization_flag": vmx,
        "memory": first_line_with("/proc/meminfo", "MemTotal").unwrap_or_else(|| "unknown".into()),
        "qemu": command_output("qemu-system-x86_64", &["--version"])
            .and_then(|s| s.lines().next().map(str::to_owned))
            .unwrap_or_else(|| "not installed".into()),
    })
}
