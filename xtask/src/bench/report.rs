//! `docs/benchmarks.md` and its plots, generated from `target/bench/*.json`, and
//! the headline block of the README. Nothing here is typed by hand: every number
//! comes from a suite's results file.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use super::results::{PlotDef, Results};
use super::stats::{Summary, fmt_num};
use super::suite::results_dir;
use super::svg;
use crate::error::{Error, Result};
use crate::infra::workspace;

/// Suites in report order; any other results file follows alphabetically.
const ORDER: [&str; 9] = [
    "pingpong",
    "breakdown",
    "boot",
    "footprint",
    "notify",
    "hints",
    "upcall",
    "ctrl",
    "vmq",
];

const README_START: &str = "<!-- bench:headline:start -->";
const README_END: &str = "<!-- bench:headline:end -->";

fn cell(s: Option<&Summary>) -> String {
    match s {
        None => "—".into(),
        Some(s) if s.n == 1 || (s.min - s.max).abs() < f64::EPSILON => fmt_num(s.median),
        Some(s) => format!(
            "{} ({}–{})",
            fmt_num(s.median),
            fmt_num(s.min),
            fmt_num(s.max)
        ),
    }
}

/// Markdown rows: one per scenario, one column per metric.
fn value_table(doc: &Results) -> Vec<String> {
    let mut head = String::from("| scenario |");
    let mut rule = String::from("|---|");
    for m in &doc.metrics {
        let _ = write!(head, " {} ({}) |", m.label, m.unit);
        rule.push_str("---:|");
    }
    let mut out = vec![head, rule];
    for s in &doc.scenarios {
        let mut row = format!("| {} |", s.label);
        for m in &doc.metrics {
            let _ = write!(row, " {} |", cell(Results::at(&doc.summary, &s.id, &m.id)));
        }
        out.push(row);
    }
    out
}

/// Markdown rows of ratios to the baseline (pair by pair within rounds).
fn ratio_table(doc: &Results) -> Vec<String> {
    let Some(base) = &doc.baseline else {
        return Vec::new();
    };
    if doc.ratios.is_empty() {
        return Vec::new();
    }
    let mut head = format!("| ratio to {} |", doc.scenario_label(base));
    let mut rule = String::from("|---|");
    for m in &doc.metrics {
        let _ = write!(head, " {} |", m.label);
        rule.push_str("---:|");
    }
    let mut out = vec![head, rule];
    for s in &doc.scenarios {
        if !doc.ratios.contains_key(&s.id) {
            continue;
        }
        let mut row = format!("| {} |", s.label);
        for m in &doc.metrics {
            let c = cell(Results::at(&doc.ratios, &s.id, &m.id));
            let _ = write!(row, " {}{} |", c, if c == "—" { "" } else { "×" });
        }
        out.push(row);
    }
    out
}

/// The aggregate as plain text (what `cargo xtask bench` prints after a suite).
pub fn text_table(doc: &Results) -> Vec<String> {
    let mut out = vec![format!(
        "bench {}: median (min–max) over {} round(s)",
        doc.suite, doc.rounds_ok
    )];
    out.extend(value_table(doc));
    let r = ratio_table(doc);
    if !r.is_empty() {
        out.push(String::new());
        out.extend(r);
    }
    out
}

fn plot_files(doc: &Results, dir: &Path) -> Result<Vec<(String, String)>> {
    let suite = &doc.suite;
    let mut made = Vec::new();
    for (i, p) in doc.plots.iter().enumerate() {
        let (title, text) = match p {
            PlotDef::Bars { metric: id } => {
                let Some(m) = doc.metric(id) else {
                    continue;
                };
                let rows: Vec<(String, f64, f64, f64)> = doc
                    .scenarios
                    .iter()
                    .filter_map(|s| {
                        let v = Results::at(&doc.summary, &s.id, id)?;
                        Some((s.label.clone(), v.median, v.min, v.max))
                    })
                    .collect();
                if rows.is_empty() {
                    continue;
                }
                let title = format!("{suite}: {}", m.label);
                let t = svg::bars(&title, &m.unit, &rows);
                (title, t)
            }
            PlotDef::Cdf {
                distribution,
                label,
                unit,
            } => {
                let series: Vec<(String, Vec<f64>)> = doc
                    .scenarios
                    .iter()
                    .filter_map(|s| {
                        let mut xs = doc.distributions.get(&s.id)?.get(distribution)?.clone();
                        xs.sort_by(f64::total_cmp);
                        Some((s.label.clone(), xs))
                    })
                    .collect();
                if series.is_empty() {
                    continue;
                }
                let title = format!("{suite}: {label} distribution");
                let t = svg::cdf(&title, unit, &series);
                (title, t)
            }
            PlotDef::Stacked {
                metrics,
                label,
                unit,
            } => {
                let parts: Vec<String> = metrics
                    .iter()
                    .map(|id| {
                        doc.metric(id)
                            .map_or_else(|| id.clone(), |m| m.label.clone())
                    })
                    .collect();
                let rows: Vec<(String, Vec<f64>)> = doc
                    .scenarios
                    .iter()
                    .filter_map(|s| {
                        let v: Vec<f64> = metrics
                            .iter()
                            .map(|id| {
                                Results::at(&doc.summary, &s.id, id).map_or(0.0, |x| x.median)
                            })
                            .collect();
                        v.iter().any(|x| *x > 0.0).then(|| (s.label.clone(), v))
                    })
                    .collect();
                if rows.is_empty() {
                    continue;
                }
                let title = format!("{suite}: {label}");
                let t = svg::stacked(&title, unit, &parts, &rows);
                (title, t)
            }
        };
        let name = format!("{suite}-{i}.svg");
        let path = dir.join(&name);
        std::fs::write(&path, text)
            .map_err(|e| Error::failed(format!("cannot write {}: {e}", path.display())))?;
        made.push((title, format!("bench/{name}")));
    }
    Ok(made)
}

fn machine_section(doc: &Results) -> Vec<String> {
    let m = &doc.machine;
    vec![
        format!("- CPU: {} ({} cores visible)", m.cpu, m.cores),
        format!("- Memory: {}", m.memory),
        format!("- Kernel: {}", m.kernel),
        format!(
            "- KVM backend: {} (hardware virtualization flag in /proc/cpuinfo: {})",
            m.kvm_backend, m.hardware_virtualization_flag
        ),
        format!("- QEMU: {}", m.qemu),
    ]
}

fn load_results() -> Result<Vec<Results>> {
    let dir = results_dir()?;
    let mut docs = Vec::new();
    let entries = std::fs::read_dir(&dir)
        .map_err(|e| Error::failed(format!("cannot read {}: {e}", dir.display())))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::failed(format!("cannot read {}: {e}", path.display())))?;
        let doc: Value = serde_json::from_str(&text)
            .map_err(|e| Error::failed(format!("{} is not valid JSON: {e}", path.display())))?;
        // Other JSON in the folder (no `suite` key) is not a results file.
        if doc.get("suite").is_none() {
            continue;
        }
        docs.push(Results::parse(&text).map_err(|e| {
            Error::failed(format!("{} is not a results file: {e}", path.display()))
        })?);
    }
    let rank = |d: &Results| {
        (
            ORDER
                .iter()
                .position(|o| *o == d.suite)
                .unwrap_or(ORDER.len()),
            d.suite.clone(),
        )
    };
    docs.sort_by_key(rank);
    Ok(docs)
}

/// Headline lines: the ratios to the baseline of the (scenario, metric) pairs
/// each suite names as its headline.
fn headline(docs: &[Results]) -> Vec<String> {
    let mut out = Vec::new();
    for doc in docs {
        let Some(base) = &doc.baseline else {
            continue;
        };
        for pair in &doc.headline {
            let (id, metric) = (pair.scenario.as_str(), pair.metric.as_str());
            let Some(m) = doc.metric(metric) else {
                continue;
            };
            if let Some(r) = Results::at(&doc.ratios, id, metric) {
                out.push(format!(
                    "- `{}` {}: {} / {} = **{}×** (median of per-round ratios, {}–{})",
                    doc.suite,
                    m.label,
                    doc.scenario_label(id),
                    doc.scenario_label(base),
                    fmt_num(r.median),
                    fmt_num(r.min),
                    fmt_num(r.max)
                ));
            }
        }
    }
    out
}

/// Regenerates `docs/benchmarks.md`, `docs/bench/*.svg` and the README headline.
pub fn write_report() -> Result<()> {
    let docs = load_results()?;
    if docs.is_empty() {
        return Err(Error::failed(format!(
            "no results in {}: run `cargo xtask bench` first",
            results_dir()?.display()
        )));
    }
    let root = workspace::root();
    let plot_dir = root.join("docs").join("bench");
    std::fs::create_dir_all(&plot_dir)
        .map_err(|e| Error::failed(format!("cannot create {}: {e}", plot_dir.display())))?;
    // Plots of suites no longer present would mislead: start from an empty folder.
    if let Ok(old) = std::fs::read_dir(&plot_dir) {
        for e in old.flatten() {
            if e.path().extension().and_then(|x| x.to_str()) == Some("svg") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let mut md = vec![
        "# Benchmarks".to_owned(),
        String::new(),
        "Generated by `cargo xtask bench` (or `cargo xtask bench --report` from the last results in `target/bench/`); do not edit by hand. Every figure is the **median with min–max over rounds**; the rounds interleave the scenarios (A, B, C, then B, C, A, ...) so that drift on this shared machine hits all of them, and each ratio is computed pair by pair within a round before taking the median. Times measured in a guest use its TSC (calibrated by the shim's timing leaf or the PIT); host times use `Instant`; exits come from the shim's own per-reason counters and KVM's binary statistics.".to_owned(),
        String::new(),
        "## Machine".to_owned(),
        String::new(),
    ];
    md.extend(machine_section(&docs[0]));
    let head = headline(&docs);
    if !head.is_empty() {
        md.push(String::new());
        md.push("## Headline ratios".to_owned());
        md.push(String::new());
        md.extend(head.iter().cloned());
    }
    for doc in &docs {
        md.push(String::new());
        md.push(format!("## `{}`", doc.suite));
        md.push(String::new());
        md.push(doc.about.clone());
        md.push(String::new());
        md.push(format!(
            "Command: `{}` — finished {} UTC, {} of {} rounds succeeded.",
            doc.command, doc.finished_utc, doc.rounds_ok, doc.repeats
        ));
        md.push(String::new());
        md.extend(value_table(doc));
        let r = ratio_table(doc);
        if !r.is_empty() {
            md.push(String::new());
            md.extend(r);
        }
        for n in &doc.notes {
            md.push(String::new());
            md.push(format!("Note: {n}"));
        }
        for e in &doc.round_errors {
            md.push(String::new());
            md.push(format!("Failed round: {e}"));
        }
        for (title, file) in plot_files(doc, &plot_dir)? {
            md.push(String::new());
            md.push(format!("![{title}]({file})"));
        }
    }
    let path = root.join("docs").join("benchmarks.md");
    std::fs::write(&path, md.join("\n") + "\n")
        .map_err(|e| Error::failed(format!("cannot write {}: {e}", path.display())))?;
    println!("bench: wrote {}", path.display());
    update_readme(&root.join("README.md"), &head)?;
    Ok(())
}

/// Replaces the README's headline block (between the two markers) when present.
fn update_readme(path: &Path, head: &[String]) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let (Some(a), Some(b)) = (text.find(README_START), text.find(README_END)) else {
        return Ok(());
    };
    if b < a {
        return Ok(());
    }
    let mut block = String::from(README_START);
    block.push('\n');
    for l in head {
        block.push_str(l);
        block.push('\n');
    }
    let new = format!("{}{}{}", &text[..a], block, &text[b..]);
    if new != text {
        std::fs::write(path, new)
            .map_err(|e| Error::failed(format!("cannot write {}: {e}", path.display())))?;
        println!("bench: updated the headline in {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc() -> Results {
        let s = |median: f64, min: f64, max: f64| json!({"median": median, "min": min, "max": max, "n": 2});
        serde_json::from_value(json!({
            "suite": "x", "about": "x things", "command": "cargo xtask bench x",
            "finished_utc": "2026-12-04 12:00:00", "repeats": 2, "rounds_ok": 2,
            "round_errors": [], "notes": [], "plots": [{"kind": "bars", "metric": "t"}],
            "machine": {"cpu": "c", "cores": 2, "memory": "m", "kernel": "k",
                        "kvm_backend": "kvm_pvm", "hardware_virtualization_flag": false, "qemu": "q"},
            "baseline": "a",
            "headline": [{"scenario": "b", "metric": "t"}],
            "scenarios": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}],
            "metrics": [{"id": "t", "label": "time", "unit": "µs", "better": "lower"}],
            "summary": {"a": {"t": s(2.0, 1.0, 3.0)}, "b": {"t": s(1.0, 1.0, 1.0)}},
            "ratios": {"b": {"t": s(0.5, 0.4, 0.6)}},
            "distributions": {},
        }))
        .unwrap()
    }

    #[test]
    fn tables_show_median_and_range() {
        let t = value_table(&doc());
        assert_eq!(t[0], "| scenario | time (µs) |");
        assert_eq!(t[2], "| A | 2.000 (1.000–3.000) |");
        assert_eq!(t[3], "| B | 1.000 |");
        let r = ratio_table(&doc());
        assert_eq!(r[2], "| B | 0.500 (0.400–0.600)× |");
        let h = headline(&[doc()]);
        assert_eq!(h.len(), 1);
        assert!(h[0].contains("B / A = **0.500×**"));
        assert_eq!(
            machine_section(&doc())[3],
            "- KVM backend: kvm_pvm (hardware virtualization flag in /proc/cpuinfo: false)"
        );
    }
}
