//! What a test leg is: the one trait every leg implements, what it hands
//! back, and the guest images the legs of one run share.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use crate::infra::build;
use crate::test::verdict::{self, LegOutcome};

/// How `cargo xtask test` was asked to run the legs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Limit for each QEMU or shim run.
    pub timeout: Duration,
    /// Show every line of output, not just the protocol lines.
    pub verbose: bool,
}

/// What one leg found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegRun {
    pub outcome: LegOutcome,
    /// Lines for the summary (the guest's `report:` lines, named checks...).
    pub reports: Vec<String>,
    /// The log to read when the leg failed.
    pub log: Option<PathBuf>,
}

impl LegRun {
    /// A leg that could not run at all.
    pub fn broken(why: impl Into<String>) -> Self {
        Self {
            outcome: LegOutcome::broken(why),
            reports: Vec::new(),
            log: None,
        }
    }

    /// A leg made of named host-side checks, each one test and each echoed
    /// as a report line after `reports`.
    #[must_use]
    pub fn from_checks(
        checks: &[(String, bool)],
        mut reports: Vec<String>,
        log: Option<PathBuf>,
    ) -> Self {
        reports.extend(check_reports(checks));
        Self {
            outcome: verdict::judge_checks(checks),
            reports,
            log,
        }
    }
}

/// The named checks of a host-side leg, as report lines.
#[must_use]
pub fn check_reports(checks: &[(String, bool)]) -> Vec<String> {
    checks
        .iter()
        .map(|(name, ok)| format!("{} {name}", if *ok { "ok:" } else { "FAILED:" }))
        .collect()
}

/// Guest images built so far in this run: each is built once, and a failed
/// build is reported by every leg that needs it.
#[derive(Debug, Default)]
pub struct Images(HashMap<&'static str, Result<PathBuf, String>>);

impl Images {
    /// The image `name`, built on first use.
    pub fn get(&mut self, name: &'static str) -> Result<PathBuf, String> {
        self.0
            .entry(name)
            .or_insert_with(|| {
                let image = build::find_image(name).map_err(|e| e.to_string())?;
                build::build_guest(image).map_err(|e| e.to_string())
            })
            .clone()
    }
}

/// One leg of `cargo xtask test`.
pub trait Leg: Sync {
    /// The name `--leg` selects it by.
    fn name(&self) -> &'static str;
    /// One line for `--list` and the leg's header: what it runs and what it asserts.
    fn about(&self) -> &'static str;
    /// Runs the leg and judges it.
    fn run(&self, images: &mut Images, opts: &Options) -> LegRun;
}
