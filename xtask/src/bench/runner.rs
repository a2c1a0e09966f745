//! The runner: every selected suite, `repeats` rounds each in rotating
//! scenario order, aggregated into `target/bench/<suite>.json`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use serde_json::{Value, json};

use super::results::Results;
use super::suite::{DEFAULT_REPEATS, Metric, Plot, RoundResult, Scenario, Suite, results_dir};
use super::{boot, breakdown, ctrl, hints, notify, pingpong, report, stats, sys, upcall, vmq};
use crate::error::{Error, Result};
use crate::infra::workspace;

/// Every suite, in the order `cargo xtask bench` runs them.
fn all_suites() -> Vec<Box<dyn Suite>> {
    vec![
        Box::new(pingpong::Pingpong::new()),
        Box::new(breakdown::Breakdown),
        Box::new(boot::Boot),
        Box::new(notify::Notify::default()),
        Box::new(hints::Hints::default()),
        Box::new(upcall::UpcallSuite::default()),
        Box::new(ctrl::Ctrl::new()),
        Box::new(vmq::Vmq),
    ]
}

/// The suite names, for `--help` and errors.
pub fn suite_names() -> Vec<&'static str> {
    all_suites().iter().map(|s| s.name()).collect()
}

/// What `cargo xtask bench` was asked to do.
#[derive(Debug)]
pub struct Options {
    /// Suites by name; empty = all.
    pub suites: Vec<String>,
    pub repeats: u32,
    /// Only regenerate `docs/benchmarks.md` from existing results.
    pub report_only: bool,
    /// Do not regenerate the report after running.
    pub no_report: bool,
}

/// Runs the selected suites, writes their JSON, and regenerates the report.
pub fn run(opts: &Options) -> Result<()> {
    if opts.report_only {
        return report::write_report();
    }
    let mut suites = all_suites();
    if suites.is_empty() {
        return Err(Error::failed(
            "no benchmark suites are built into this xtask",
        ));
    }
    if !opts.suites.is_empty() {
        for want in &opts.suites {
            if !suites.iter().any(|s| s.name() == want) {
                return Err(Error::usage(format!(
                    "no benchmark suite named `{want}`; there are: {}",
                    suite_names().join(", ")
                )));
            }
        }
        suites.retain(|s| opts.suites.iter().any(|w| w == s.name()));
    }
    crate::infra::setup::ensure_guest_target()?;
    let started = Instant::now();
    let mut failed = Vec::new();
    for suite in &mut suites {
        match run_suite(suite.as_mut(), opts.repeats) {
            Ok(path) => println!("bench {}: results in {}", suite.name(), path.display()),
            Err(e) => {
                println!("bench {}: FAILED: {e}", suite.name());
                failed.push(suite.name());
            }
        }
    }
    println!(
        "bench: {} suite(s) in {:.0} s",
        suites.len(),
        started.elapsed().as_secs_f64()
    );
    if !opts.no_report {
        report::write_report()?;
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::failed(format!(
            "benchmark suite(s) failed: {}",
            failed.join(", ")
        )))
    }
}

/// The command line that reproduces one suite's results.
fn command_for(suite: &str, repeats: u32) -> String {
    if repeats == DEFAULT_REPEATS {
        format!("cargo xtask bench {suite}")
    } else {
        format!("cargo xtask bench {suite} --repeats {repeats}")
    }
}

/// `rounds` rotated by `round`: A,B,C then B,C,A then C,A,B...
fn rotated(scenarios: &[Scenario], round: u32) -> Vec<Scenario> {
    let mut v = scenarios.to_vec();
    if !v.is_empty() {
        let k = round as usize % v.len();
        v.rotate_left(k);
    }
    v
}

fn run_suite(suite: &mut dyn Suite, repeats: u32) -> Result<PathBuf> {
    let name = suite.name();
    println!("==== bench {name}: {repeats} round(s)");
    let started = Instant::now();
    suite.prepare()?;
    let scenarios = suite.scenarios();
    let metrics = suite.metrics();
    let mut rounds = Vec::new();
    let mut errors = Vec::new();
    for r in 0..repeats {
        let order = rotated(&scenarios, r);
        let t = Instant::now();
        match suite.round(r, &order) {
            Ok(result) => {
                println!(
                    "bench {name}: round {}/{repeats} in {:.1} s",
                    r + 1,
                    t.elapsed().as_secs_f64()
                );
                print_round(&scenarios, &metrics, &result);
                rounds.push(result);
            }
            Err(e) => {
                println!("bench {name}: round {} failed: {e}", r + 1);
                errors.push(format!("round {}: {e}", r + 1));
            }
        }
    }
    if rounds.is_empty() {
        return Err(Error::failed(format!(
            "every round failed ({})",
            errors.join("; ")
        )));
    }
    let doc = aggregate(suite, &scenarios, &metrics, &rounds, &errors, repeats);
    print_table(&doc);
    let path = results_dir()?.join(format!("{name}.json"));
    workspace::write_json(&path, &doc)?;
    println!(
        "bench {name}: done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if errors.is_empty() {
        Ok(path)
    } else {
        Err(Error::failed(format!(
            "{} of {repeats} rounds failed ({}); the others are in {}",
            errors.len(),
            errors.join("; "),
            path.display()
        )))
    }
}

fn print_round(scenarios: &[Scenario], metrics: &[Metric], r: &RoundResult) {
    for s in scenarios {
        let Some(vals) = r.values.get(s.id) else {
            continue;
        };
        let parts: Vec<String> = metrics
            .iter()
            .filter_map(|m| {
                vals.get(m.id)
                    .map(|v| format!("{} {} {}", m.label, stats::fmt_num(*v), m.unit))
            })
            .collect();
        println!("  {:<28} {}", s.label, parts.join(", "));
    }
}

/// The suite's JSON document: definitions, every round, and the aggregate.
fn aggregate(
    suite: &dyn Suite,
    scenarios: &[Scenario],
    metrics: &[Metric],
    rounds: &[RoundResult],
    errors: &[String],
    repeats: u32,
) -> Value {
    let baseline = suite.baseline();
    let mut summary = serde_json::Map::new();
    let mut ratios = serde_json::Map::new();
    for s in scenarios {
        let mut per_metric = serde_json::Map::new();
        let mut per_ratio = serde_json::Map::new();
        for m in metrics {
            let vals: Vec<f64> = rounds
                .iter()
                .filter_map(|r| r.values.get(s.id)?.get(m.id).copied())
                .collect();
            if let Some(sum) = stats::Summary::of(&vals) {
                per_metric.insert(m.id.into(), sum.to_json());
            }
            if let Some(b) = baseline
                && b != s.id
            {
                // Pair by pair: the ratio within each round, then summarised.
                let rs: Vec<f64> = rounds
                    .iter()
                    .filter_map(|r| {
                        let x = *r.values.get(s.id)?.get(m.id)?;
                        let y = *r.values.get(b)?.get(m.id)?;
                        (y != 0.0).then_some(x / y)
                    })
                    .collect();
                if let Some(sum) = stats::Summary::of(&rs) {
                    per_ratio.insert(m.id.into(), sum.to_json());
                }
            }
        }
        summary.insert(s.id.into(), Value::Object(per_metric));
        if !per_ratio.is_empty() {
            ratios.insert(s.id.into(), Value::Object(per_ratio));
        }
    }
    let mut distributions = serde_json::Map::new();
    for s in scenarios {
        let mut per = BTreeMap::<String, Vec<f64>>::new();
        for r in rounds {
            if let Some(d) = r.distributions.get(s.id) {
                for (k, v) in d {
                    per.entry(k.clone()).or_default().extend(v);
                }
            }
        }
        if !per.is_empty() {
            let obj: serde_json::Map<String, Value> = per
                .into_iter()
                .map(|(k, v)| (k, json!(stats::thin(&v, 2000))))
                .collect();
            distributions.insert(s.id.into(), Value::Object(obj));
        }
    }
    let mut notes: Vec<String> = Vec::new();
    for r in rounds {
        for n in &r.notes {
            if !notes.contains(n) {
                notes.push(n.clone());
            }
        }
    }
    let plots: Vec<Value> = suite
        .plots()
        .iter()
        .map(|p| match p {
            Plot::Bars { metric } => json!({"kind": "bars", "metric": metric}),
            Plot::Cdf {
                distribution,
                label,
                unit,
            } => json!({"kind": "cdf", "distribution": distribution, "label": label, "unit": unit}),
            Plot::Stacked {
                metrics,
                label,
                unit,
            } => json!({"kind": "stacked", "metrics": metrics, "label": label, "unit": unit}),
        })
        .collect();
    json!({
        "suite": suite.name(),
        "about": suite.about(),
        "command": command_for(suite.name(), repeats),
        "finished_utc": now_utc(),
        "repeats": repeats,
        "rounds_ok": rounds.len(),
        "round_errors": errors,
        "machine": sys::machine(),
        "baseline": baseline,
        "headline": suite.headline().iter().map(|(s, m)| json!({"scenario": s, "metric": m})).collect::<Vec<_>>(),
        "scenarios": scenarios.iter().map(|s| json!({"id": s.id, "label": s.label})).collect::<Vec<_>>(),
        "metrics": metrics.iter().map(|m| json!({"id": m.id, "label": m.label, "unit": m.unit, "better": m.better.name()})).collect::<Vec<_>>(),
        "rounds": rounds.iter().map(|r| json!(r.values)).collect::<Vec<_>>(),
        "summary": summary,
        "ratios": ratios,
        "distributions": distributions,
        "plots": plots,
        "notes": notes,
    })
}

fn now_utc() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    workspace::utc_timestamp(now.as_secs(), now.subsec_millis())
}

/// Prints the aggregate as a text table (the same numbers the report shows),
/// read back as the report reads it.
fn print_table(doc: &Value) {
    match serde_json::from_value::<Results>(doc.clone()) {
        Ok(results) => {
            for line in report::text_table(&results) {
                println!("{line}");
            }
        }
        Err(e) => println!("bench: the results do not read back: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::suite::Better;

    struct Fake {
        calls: u32,
    }

    impl Suite for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn about(&self) -> String {
            "a fake suite".into()
        }
        fn scenarios(&self) -> Vec<Scenario> {
            vec![Scenario::new("a", "A"), Scenario::new("b", "B")]
        }
        fn metrics(&self) -> Vec<Metric> {
            vec![Metric::new("t", "time", "µs", Better::Lower)]
        }
        fn baseline(&self) -> Option<&'static str> {
            Some("a")
        }
        fn round(&mut self, round: u32, _order: &[Scenario]) -> Result<RoundResult> {
            self.calls += 1;
            let mut r = RoundResult::default();
            // Drift: both sides slow down together; B is always half of A.
            let a = 10.0 * f64::from(round + 1);
            r.set("a", "t", a);
            r.set("b", "t", a / 2.0);
            r.set("b", "nan", f64::NAN);
            Ok(r)
        }
    }

    #[test]
    fn rotation_interleaves_scenarios() {
        let s = vec![
            Scenario::new("a", "A"),
            Scenario::new("b", "B"),
            Scenario::new("c", "C"),
        ];
        let ids = |r| rotated(&s, r).iter().map(|x| x.id).collect::<Vec<_>>();
        assert_eq!(ids(0), ["a", "b", "c"]);
        assert_eq!(ids(1), ["b", "c", "a"]);
        assert_eq!(ids(3), ["a", "b", "c"]);
    }

    #[test]
    fn ratios_are_pairwise_so_drift_cancels() {
        let mut f = Fake { calls: 0 };
        let sc = f.scenarios();
        let ms = f.metrics();
        let rounds: Vec<RoundResult> = (0..5).map(|r| f.round(r, &sc).unwrap()).collect();
        let doc = aggregate(&f, &sc, &ms, &rounds, &[], 5);
        // Medians drift with the rounds, but every per-round ratio is exactly 0.5.
        assert_eq!(doc["summary"]["a"]["t"]["median"], json!(30.0));
        assert_eq!(doc["ratios"]["b"]["t"]["median"], json!(0.5));
        assert_eq!(doc["ratios"]["b"]["t"]["min"], json!(0.5));
        assert_eq!(doc["ratios"]["b"]["t"]["max"], json!(0.5));
        assert!(doc["ratios"].get("a").is_none());
        assert!(doc["summary"]["b"].get("nan").is_none());
        assert_eq!(doc["command"], json!("cargo xtask bench fake"));
    }

    /// What the runner writes, the report reads: every key the typed reader
    /// names is written; a renamed one is an error naming it.
    #[test]
    fn the_written_results_read_back() {
        let mut f = Fake { calls: 0 };
        let sc = f.scenarios();
        let ms = f.metrics();
        let rounds: Vec<RoundResult> = (0..3).map(|r| f.round(r, &sc).unwrap()).collect();
        let doc = aggregate(&f, &sc, &ms, &rounds, &["round 4: boom".into()], 4);
        let text = serde_json::to_string_pretty(&doc).unwrap();
        let r = Results::parse(&text).unwrap();
        assert_eq!((r.suite.as_str(), r.rounds_ok, r.repeats), ("fake", 3, 4));
        assert_eq!(r.baseline.as_deref(), Some("a"));
        assert!((Results::at(&r.ratios, "b", "t").unwrap().median - 0.5).abs() < 1e-12);
        assert_eq!(r.round_errors, ["round 4: boom"]);
        for key in [
            "rounds_ok",
            "baseline",
            "median",
            "label",
            "kvm_backend",
            "metric",
        ] {
            let renamed = text.replace(&format!("\"{key}\":"), &format!("\"{key}_old\":"));
            let err = Results::parse(&renamed).unwrap_err().to_string();
            assert!(
                err.contains(&format!("missing field `{key}`")),
                "{key}: {err}"
            );
        }
    }
}
