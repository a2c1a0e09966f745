//! `host-shim`: the command-line front of the Exitless VMM.

use std::time::Instant;

use clap::Parser;
use clap::error::ErrorKind;
use host_shim::cli::Cli;
use host_shim::run;

/// A clap error as one line: its first paragraph (the message and what it
/// names), without the usage and the help hint that follow.
fn one_line(text: &str) -> String {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if !line.is_empty() {
            out.push(line.trim_start_matches("error: "));
        }
    }
    if out.is_empty() {
        "bad arguments".to_owned()
    } else {
        out.join(" ")
    }
}

/// `EXITLESS_PARENT_PID=PID` in the environment: the shim ends (SIGKILL)
/// when that process does, and refuses to start if it is already gone. For
/// tools that run the shim and must never leave it behind (xtask), without
/// forking themselves to arrange it (a fork of a large parent cost
/// 0.5–0.7 ms of every start `bench boot` measured).
fn die_with_parent() {
    let Some(want) = std::env::var("EXITLESS_PARENT_PID")
        .ok()
        .and_then(|v| v.parse::<libc::pid_t>().ok())
    else {
        return;
    };
    // SAFETY: prctl with PR_SET_PDEATHSIG and a valid signal number.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        eprintln!("host-shim: EXITLESS_PARENT_PID: cannot arrange to end with the parent");
        std::process::exit(1);
    }
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != want {
        eprintln!("host-shim: EXITLESS_PARENT_PID={want}: that process is gone; not starting");
        std::process::exit(1);
    }
}

fn main() {
    let start = Instant::now();
    die_with_parent();
    host_shim::kvm::cpuid::prefetch();
    // A --config file's flags go before the command line's own, which win.
    let args = match host_shim::config::expand(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("host-shim: {e}");
            std::process::exit(2);
        }
    };
    let mut cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            std::process::exit(0);
        }
        Err(e) => {
            // One line, as scripts expect, but with what clap names on the
            // lines after its first (the missing or offending arguments);
            // --help has the rest.
            eprintln!("host-shim: {} (see --help)", one_line(&e.to_string()));
            std::process::exit(2);
        }
    };
    if let Err(e) = cli.finish() {
        eprintln!("host-shim: {e} (see --help)");
        std::process::exit(2);
    }
    host_shim::seccomp::set_enabled(cli.seccomp);
    if let Some(kind) = &cli.seccomp_selftest {
        host_shim::seccomp::selftest(kind);
    }
    // RUST_LOG as every Rust program reads it; SHIM_LOG, the older name,
    // wins when both are set. Colour only on a terminal: a log file gets
    // plain text.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHIM_LOG")
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| "host_shim=info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match run::run(&cli, start) {
        Ok(report) => {
            if !cli.quiet {
                eprint!("{}", report.summary());
            }
            std::process::exit(run::exit_code(&report, cli.api_sock.is_some()));
        }
        Err(e) => {
            eprintln!("host-shim: {e}");
            std::process::exit(if e.is_usage() { 2 } else { 1 });
        }
    }
}
