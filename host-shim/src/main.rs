//! `host-shim`: the command-line front of the Exitless VMM.

use std::time::Instant;

use clap::Parser;
use clap::error::ErrorKind;
use host_shim::cli::Cli;
use host_shim::run;

fn main() {
    let start = Instant::now();
    let mut cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            std::process::exit(0);
        }
        Err(e) => {
            // One line, as scripts expect; --help has the rest.
            let text = e.to_string();
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("bad arguments");
            eprintln!(
                "host-shim: {} (see --help)",
                first.trim_start_matches("error: ")
            );
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SHIM_LOG")
                .unwrap_or_else(|_| "host_shim=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run::run(&cli, start) {
        Ok(report) => {
            if !cli.quiet {
                eprint!("{}", report.summary());
            }
            std::process::exit(run::exit_code(&report));
        }
        Err(e) => {
            eprintln!("host-shim: {e}");
            std::process::exit(if e.is_usage() { 2 } else { 1 });
        }
    }
}
