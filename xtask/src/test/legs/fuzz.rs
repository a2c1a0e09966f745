//! Leg `fuzz`: every cargo-fuzz target of `host-shim/fuzz` (the parsers of
//! guest-, host- and peer-written data) for a few seconds each, starting from
//! its committed corpus. One test per target: it passes when libFuzzer ran
//! the target to the end of its time without a crash, a leak of the time
//! limit or an exit of its own.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::infra::logfile::LogFile;
use crate::infra::process::{self, Ending, Stderr};
use crate::infra::workspace;
use crate::test::leg::{Images, Leg, LegRun, Options};

/// Seconds of fuzzing per target (libFuzzer's `-max_total_time`).
const SECONDS_PER_TARGET: u64 = 7;
/// The wall-clock limit of one target's run: its fuzzing time plus loading
/// the corpus and starting up.
const RUN_TIMEOUT: Duration = Duration::from_mins(2);
/// The first build of the fuzz workspace compiles the shim and libFuzzer.
const BUILD_TIMEOUT: Duration = Duration::from_mins(20);
/// The cargo-fuzz release the targets are written for.
const CARGO_FUZZ_VERSION: &str = "0.13.1";

/// The fuzz targets, each for a few seconds.
pub struct Fuzz;

impl Leg for Fuzz {
    fn name(&self) -> &'static str {
        "fuzz"
    }

    fn about(&self) -> &'static str {
        "each cargo-fuzz target of host-shim/fuzz for a few seconds on its committed corpus: no crash"
    }

    fn run(&self, _: &mut Images, opts: &Options) -> LegRun {
        let mut log = match LogFile::create(self.name()) {
            Ok(log) => log,
            Err(e) => return LegRun::broken(e.to_string()),
        };
        let path = log.path().to_path_buf();
        let broken = |why: String| LegRun {
            log: Some(path.clone()),
            ..LegRun::broken(why)
        };
        if let Err(why) = ensure_cargo_fuzz(&mut log) {
            return broken(why);
        }
        let dir = fuzz_dir();
        let targets = match list_targets(&dir) {
            Ok(targets) if targets.is_empty() => {
                return broken("`cargo fuzz list` names no target".into());
            }
            Ok(targets) => targets,
            Err(why) => return broken(why),
        };
        println!("fuzz: building {} targets", targets.len());
        if let Err(why) = build(&dir, &mut log, opts) {
            return broken(why);
        }
        let mut checks = Vec::new();
        let mut reports = Vec::new();
        for target in &targets {
            let result = run_target(&dir, target, &mut log, opts);
            let ok = result.is_ok();
            let line = match result {
                Ok(stats) | Err(stats) => format!("fuzz {target}: {stats}"),
            };
            println!("{line}");
            reports.push(line);
            checks.push((format!("fuzz target {target}"), ok));
        }
        LegRun::from_checks(&checks, reports, Some(path))
    }
}

/// `host-shim/fuzz`, the fuzz workspace.
fn fuzz_dir() -> PathBuf {
    workspace::root().join("host-shim").join("fuzz")
}

fn cargo_fuzz(dir: &Path) -> Command {
    let mut cmd = workspace::cargo();
    cmd.arg("fuzz").current_dir(dir);
    cmd
}

/// Runs `cmd` to the end, logging its output; its lines, or why it failed.
fn run_logged(
    cmd: &mut Command,
    what: &str,
    timeout: Duration,
    log: &mut LogFile,
    verbose: bool,
) -> Result<Vec<String>, String> {
    log.line(&format!("# xtask: {what}"));
    let finished = process::run(cmd, timeout, Stderr::Merge, |line| {
        log.line(&line.text);
        if verbose {
            println!("fuzz: {}", line.text);
        }
    })
    .map_err(|e| format!("{what}: {e}"))?;
    let lines: Vec<String> = finished.lines.into_iter().map(|l| l.text).collect();
    match finished.ending {
        Ending::Exited(0) => Ok(lines),
        Ending::TimedOut => Err(format!("{what} ran longer than {} s", timeout.as_secs())),
        ending => {
            let last = lines
                .iter()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map_or("no output", String::as_str);
            Err(format!("{what} ended with {ending:?}: {last}"))
        }
    }
}

/// Installs cargo-fuzz with `cargo install` when `cargo fuzz` is missing.
fn ensure_cargo_fuzz(log: &mut LogFile) -> Result<(), String> {
    let mut probe = workspace::cargo();
    probe.args(["fuzz", "--version"]);
    if run_logged(&mut probe, "cargo fuzz --version", RUN_TIMEOUT, log, false).is_ok() {
        return Ok(());
    }
    println!(
        "fuzz: cargo-fuzz is missing; running `cargo install cargo-fuzz --version {CARGO_FUZZ_VERSION} --locked`"
    );
    let mut install = workspace::cargo();
    install.args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
    ]);
    run_logged(
        &mut install,
        "cargo install cargo-fuzz",
        BUILD_TIMEOUT,
        log,
        false,
    )
    .map(drop)
    .map_err(|why| {
        format!(
            "cargo-fuzz is missing and could not be installed ({why}); install it with \
             `cargo install cargo-fuzz` (it needs crates.io and a C++ compiler)"
        )
    })
}

fn list_targets(dir: &Path) -> Result<Vec<String>, String> {
    let output = cargo_fuzz(dir)
        .arg("list")
        .output()
        .map_err(|e| format!("cannot run `cargo fuzz list`: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "`cargo fuzz list` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// The flags every build and run uses: no sanitizer (AddressSanitizer needs
/// a nightly compiler), optimised, as the committed corpora were grown.
const FLAGS: [&str; 3] = ["--sanitizer", "none", "-O"];

fn build(dir: &Path, log: &mut LogFile, opts: &Options) -> Result<(), String> {
    let mut cmd = cargo_fuzz(dir);
    cmd.arg("build").args(FLAGS);
    run_logged(
        &mut cmd,
        "cargo fuzz build",
        BUILD_TIMEOUT,
        log,
        opts.verbose,
    )
    .map(drop)
}

/// libFuzzer's closing statistics: `#RUNS DONE cov: N ft: N corp: ...`.
fn final_stats(lines: &[String]) -> Option<String> {
    let line = lines
        .iter()
        .rev()
        .find(|l| l.starts_with('#') && l.split_whitespace().nth(1) == Some("DONE"))?;
    let runs = line.strip_prefix('#')?.split_whitespace().next()?;
    let field = |name: &str| {
        let mut words = line.split_whitespace();
        words.find(|w| *w == name)?;
        words.next()
    };
    Some(format!(
        "{runs} runs, cov {}, ft {}",
        field("cov:")?,
        field("ft:")?
    ))
}

/// Fuzzes `target` for [`SECONDS_PER_TARGET`] s from its committed corpus.
/// New inputs go to a scratch corpus under the target directory, so the
/// committed one changes only when someone merges into it on purpose.
fn run_target(
    dir: &Path,
    target: &str,
    log: &mut LogFile,
    opts: &Options,
) -> Result<String, String> {
    let corpus = dir.join("corpus").join(target);
    let seeds = std::fs::read_dir(&corpus).map_or(0, Iterator::count);
    if seeds == 0 {
        return Err(format!("no committed corpus in {}", corpus.display()));
    }
    let scratch = workspace::target_dir().join("fuzz-leg").join(target);
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)
        .map_err(|e| format!("cannot create {}: {e}", scratch.display()))?;
    let artifacts = workspace::target_dir().join("fuzz-leg").join("artifacts");
    std::fs::create_dir_all(&artifacts)
        .map_err(|e| format!("cannot create {}: {e}", artifacts.display()))?;
    let mut cmd = cargo_fuzz(dir);
    cmd.arg("run")
        .args(FLAGS)
        .arg(target)
        .arg(&scratch)
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={SECONDS_PER_TARGET}"))
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .arg(format!(
            "-artifact_prefix={}/{target}-",
            artifacts.display()
        ));
    let lines = run_logged(
        &mut cmd,
        &format!("cargo fuzz run {target}"),
        RUN_TIMEOUT,
        log,
        opts.verbose,
    )
    .map_err(|why| {
        format!(
            "{why} (a crashing input is kept in {})",
            artifacts.display()
        )
    })?;
    // A run that exited 0 without libFuzzer's closing line did not fuzz.
    final_stats(&lines)
        .map(|stats| format!("{stats} in {SECONDS_PER_TARGET} s from {seeds} inputs"))
        .ok_or_else(|| "libFuzzer printed no closing statistics: the target did not run".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzers_closing_line() {
        let lines: Vec<String> = [
            "#2\tINITED cov: 5 ft: 5 corp: 1/1b exec/s: 0 rss: 30Mb",
            "#815889\tDONE   cov: 201 ft: 770 corp: 135/528Kb lim: 16514 exec/s: 50993 rss: 43Mb",
            "Done 815889 runs in 16 second(s)",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            final_stats(&lines).as_deref(),
            Some("815889 runs, cov 201, ft 770")
        );
        assert_eq!(final_stats(&lines[..1]), None, "no DONE line: not run");
    }
}
