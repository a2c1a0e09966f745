//! The typed reading of a suite's results file, `target/bench/<suite>.json`
//! (written by the runner, read back by the report, possibly by a later
//! xtask). A key the report needs that a file lacks is an error naming it, not
//! an empty table.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::stats::Summary;
use crate::vmm::stats::present;

/// One suite's results.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Results {
    pub suite: String,
    /// The suite's paragraph for the report.
    pub about: String,
    /// The command line that reproduces the file.
    pub command: String,
    pub finished_utc: String,
    pub repeats: u64,
    pub rounds_ok: u64,
    pub round_errors: Vec<String>,
    pub machine: Machine,
    /// The scenario the others are divided by; `null` for none.
    #[serde(deserialize_with = "present")]
    pub baseline: Option<String>,
    /// The (scenario, metric) ratios the headline quotes.
    pub headline: Vec<HeadlinePair>,
    pub scenarios: Vec<ScenarioDef>,
    pub metrics: Vec<MetricDef>,
    /// `summary[scenario][metric]` over rounds.
    pub summary: BTreeMap<String, BTreeMap<String, Summary>>,
    /// `ratios[scenario][metric]` to the baseline, pair by pair.
    pub ratios: BTreeMap<String, BTreeMap<String, Summary>>,
    /// `distributions[scenario][name]`: samples pooled over rounds, thinned.
    pub distributions: BTreeMap<String, BTreeMap<String, Vec<f64>>>,
    pub plots: Vec<PlotDef>,
    pub notes: Vec<String>,
}

impl Results {
    /// Parses a results file; the error names the key that did not fit.
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// `table[scenario][metric]` (`table` is [`Self::summary`] or [`Self::ratios`]).
    #[must_use]
    pub fn at<'a>(
        table: &'a BTreeMap<String, BTreeMap<String, Summary>>,
        scenario: &str,
        metric: &str,
    ) -> Option<&'a Summary> {
        table.get(scenario)?.get(metric)
    }

    /// The label of scenario `id` (the id itself when it has none).
    #[must_use]
    pub fn scenario_label<'a>(&'a self, id: &'a str) -> &'a str {
        self.scenarios
            .iter()
            .find(|s| s.id == id)
            .map_or(id, |s| s.label.as_str())
    }

    /// The metric with `id`.
    #[must_use]
    pub fn metric(&self, id: &str) -> Option<&MetricDef> {
        self.metrics.iter().find(|m| m.id == id)
    }
}

/// `machine`: where the suite ran.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: u64,
    pub memory: String,
    pub kernel: String,
    pub kvm_backend: String,
    pub hardware_virtualization_flag: bool,
    pub qemu: String,
}

/// One entry of `headline`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct HeadlinePair {
    pub scenario: String,
    pub metric: String,
}

/// One entry of `scenarios`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ScenarioDef {
    pub id: String,
    pub label: String,
}

/// One entry of `metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MetricDef {
    pub id: String,
    pub label: String,
    pub unit: String,
}

/// One entry of `plots`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum PlotDef {
    /// One bar per scenario for a metric.
    Bars { metric: String },
    /// A cumulative distribution per scenario of the samples `distribution`.
    Cdf {
        distribution: String,
        label: String,
        unit: String,
    },
    /// One bar per scenario stacked from the medians of `metrics`.
    Stacked {
        metrics: Vec<String>,
        label: String,
        unit: String,
    },
}
