//! What a benchmark suite is: its scenarios, its metrics, its plots, and what
//! one round of it measured. Every suite implements [`Suite`]; the runner and
//! the report read these types and nothing else of a suite.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::infra::workspace;

/// Rounds per suite unless `--repeats` says otherwise (at least 5, so that a median means something).
pub const DEFAULT_REPEATS: u32 = 5;

/// One thing a suite compares.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Short stable id, used as JSON key (`trap`, `doorbell`, `qemu`).
    pub id: &'static str,
    /// What the report calls it.
    pub label: String,
}

impl Scenario {
    pub fn new(id: &'static str, label: impl Into<String>) -> Self {
        Self {
            id,
            label: label.into(),
        }
    }
}

/// Which way a metric improves (the report marks the better side of a ratio).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Lower,
    Higher,
    /// A count or a property, not a score.
    Neither,
}

impl Better {
    /// The word the results JSON uses.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Lower => "lower",
            Self::Higher => "higher",
            Self::Neither => "neither",
        }
    }
}

/// One number a suite measures per scenario per round.
#[derive(Debug, Clone)]
pub struct Metric {
    /// Stable id, used as JSON key (`rtt_p50_us`).
    pub id: &'static str,
    /// What the report calls it (`RTT p50`).
    pub label: &'static str,
    /// Unit shown after the value (`µs`, `exits/packet`, `ms`).
    pub unit: &'static str,
    pub better: Better,
}

impl Metric {
    pub const fn new(
        id: &'static str,
        label: &'static str,
        unit: &'static str,
        better: Better,
    ) -> Self {
        Self {
            id,
            label,
            unit,
            better,
        }
    }
}

/// A plot the report draws from a suite's results.
#[derive(Debug, Clone)]
pub enum Plot {
    /// One bar per scenario (median, min–max whisker) for a metric.
    Bars { metric: &'static str },
    /// Cumulative distribution per scenario of the samples named `distribution`
    /// (pooled over rounds), e.g. every RTT measured.
    Cdf {
        distribution: &'static str,
        label: &'static str,
        unit: &'static str,
    },
    /// One bar per scenario, stacked from the medians of `metrics` (all in
    /// `unit`), e.g. the stages of one round trip.
    Stacked {
        metrics: Vec<&'static str>,
        label: &'static str,
        unit: &'static str,
    },
}

/// What one round measured: `values[scenario][metric]`, and optionally raw
/// samples per scenario for distribution plots, plus free-form notes (e.g. "QEMU
/// exposes no exit counters").
#[derive(Debug, Default)]
pub struct RoundResult {
    pub values: BTreeMap<String, BTreeMap<String, f64>>,
    pub distributions: BTreeMap<String, BTreeMap<String, Vec<f64>>>,
    pub notes: Vec<String>,
}

impl RoundResult {
    /// Records `value` for `metric` of `scenario`; non-finite values are dropped
    /// (a metric that could not be computed is absent, never NaN in the report).
    pub fn set(&mut self, scenario: &str, metric: &str, value: f64) {
        if value.is_finite() {
            self.values
                .entry(scenario.to_owned())
                .or_default()
                .insert(metric.to_owned(), value);
        }
    }

    /// Appends raw samples for a distribution plot.
    pub fn samples(&mut self, scenario: &str, distribution: &str, samples: &[f64]) {
        self.distributions
            .entry(scenario.to_owned())
            .or_default()
            .entry(distribution.to_owned())
            .or_default()
            .extend(samples.iter().copied().filter(|v| v.is_finite()));
    }

    /// Adds a note once.
    pub fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        if !self.notes.contains(&note) {
            self.notes.push(note);
        }
    }
}

/// A benchmark suite.
pub trait Suite {
    /// The name `cargo xtask bench NAME` selects it by.
    fn name(&self) -> &'static str;
    /// A paragraph for the report: what is measured, on what, and how.
    fn about(&self) -> String;
    fn scenarios(&self) -> Vec<Scenario>;
    fn metrics(&self) -> Vec<Metric>;
    /// The scenario the others are divided by (pair by pair per round).
    fn baseline(&self) -> Option<&'static str> {
        None
    }
    /// (scenario, metric) pairs whose ratio to the baseline the report's
    /// headline (and the README) quote; default: none.
    fn headline(&self) -> Vec<(&'static str, &'static str)> {
        Vec::new()
    }
    /// Plots for the report; default: one bar chart per metric.
    fn plots(&self) -> Vec<Plot> {
        self.metrics()
            .iter()
            .map(|m| Plot::Bars { metric: m.id })
            .collect()
    }
    /// Builds what the rounds need (images, binaries); runs once before them.
    fn prepare(&mut self) -> Result<()> {
        Ok(())
    }
    /// Measures every scenario once. `order` is the scenario order to use this
    /// round (rotated by the runner); suites that measure all scenarios in one
    /// guest run may ignore it.
    fn round(&mut self, round: u32, order: &[Scenario]) -> Result<RoundResult>;
}

/// `target/bench`, created if needed.
pub fn results_dir() -> Result<PathBuf> {
    let dir = workspace::target_dir().join("bench");
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::failed(format!("cannot create {}: {e}", dir.display())))?;
    Ok(dir)
}
