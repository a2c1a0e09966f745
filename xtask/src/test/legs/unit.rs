//! Leg `unit`: the host unit tests, and the runner of `cargo test` that the
//! shim's TAP leg uses too.

use std::path::Path;
use std::time::Duration;

use crate::infra::logfile::LogFile;
use crate::infra::process::{self, Ending, Stderr};
use crate::infra::{cargo_test, workspace};
use crate::test::leg::{Images, Leg, LegRun, Options};
use crate::test::verdict;
use crate::vmm::qemu;

/// Wall-clock limit for the host unit tests (they build the workspace first).
const UNIT_TIMEOUT: Duration = Duration::from_mins(30);

/// `cargo test --workspace` on the host.
pub struct Unit;

impl Leg for Unit {
    fn name(&self) -> &'static str {
        "unit"
    }

    fn about(&self) -> &'static str {
        "host unit tests (cargo test --workspace)"
    }

    fn run(&self, _: &mut Images, opts: &Options) -> LegRun {
        run_cargo_test(self.name(), opts, &["--workspace"], &[])
    }
}

/// Runs `cargo test ARGS` with `env` and judges it from its result lines.
pub fn run_cargo_test(leg: &str, opts: &Options, args: &[&str], env: &[(&str, &Path)]) -> LegRun {
    let mut log = match LogFile::create(leg) {
        Ok(log) => log,
        Err(e) => return LegRun::broken(e.to_string()),
    };
    log.line(&format!("# xtask: cargo test {}", args.join(" ")));
    let mut cmd = workspace::cargo();
    cmd.arg("test").args(args);
    for (key, value) in env {
        cmd.env(key, value);
    }
    let finished = process::run(&mut cmd, UNIT_TIMEOUT, Stderr::Merge, |line| {
        log.line(&line.text);
        let text = line.text.trim();
        let failing_test = text.starts_with("test ") && text.contains("FAILED");
        if opts.verbose
            || cargo_test::parse_result_line(text).is_some_and(|s| s.passed + s.failed > 0)
            || failing_test
            || text.starts_with("error")
        {
            println!("{leg}: {text}");
        }
    });
    let path = log.path().to_path_buf();
    let finished = match finished {
        Ok(finished) => finished,
        Err(e) => {
            return LegRun {
                log: Some(path),
                ..LegRun::broken(e.to_string())
            };
        }
    };
    let totals = cargo_test::sum(finished.lines.iter().map(|l| l.text.as_str()));
    let outcome = verdict::judge_unit(finished.ending, totals.summary, totals.result_lines);
    if !outcome.ok() {
        let tail = process::tail(&finished.lines, qemu::TAIL_LINES);
        println!(
            "---- last {} lines of cargo test's output ({}) ----",
            tail.len(),
            path.display()
        );
        for line in tail {
            println!("{}", line.text);
        }
        println!("---- end ----");
    }
    if finished.ending == Ending::TimedOut {
        println!(
            "{leg}: cargo test ran longer than {} s",
            UNIT_TIMEOUT.as_secs()
        );
    }
    LegRun {
        outcome,
        reports: Vec::new(),
        log: Some(path),
    }
}
