//! `docs/benchmarks.md` and its plots, generated from `target/bench/*.json`, and
//! the headline block of the README. Nothing here is typed by hand: every number
//! comes from a suite's results file.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use super::stats::{Summary, fmt_num};
use super::suite::results_dir;
use super::svg;
use crate::error::{Error, Result};
use crate::infra::workspace;

/// Suites in report order; any other results file follows alphabetically.
const ORDER: [&str; 8] = [
    "pingpong",
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

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn items(v: &Value, key: &str) -> Vec<Value> {
    v.get(key)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn cell(s: Option<Summary>) -> String {
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

fn summary_at(doc: &Value, table: &str, scenario: &str, metric: &str) -> Option<Summary> {
    Summary::from_json(doc.get(table)?.get(scenario)?.get(metric)?)
}

/// Markdown rows: one per scenario, one column per metric.
fn value_table(doc: &Value) -> Vec<String> {
    let metrics = items(doc, "metrics");
    let mut head = String::from("| scenario |");
    let mut rule = String::from("|---|");
    for m in &metrics {
        let _ = write!(head, " {} ({}) |", str_of(m, "label"), str_of(m, "unit"));
        rule.push_str("---:|");
    }
    let mut out = vec![head, rule];
    for s in items(doc, "scenarios") {
        let mut row = format!("| {} |", str_of(&s, "label"));
        for m in &metrics {
            let _ = write!(
                row,
                " {} |",
                cell(summary_at(
                    doc,
                    "summary",
                    str_of(&s, "id"),
                    str_of(m, "id")
                ))
            );
        }
        out.push(row);
    }
    out
}

/// Markdown rows of ratios to the baseline (pair by pair within rounds).
fn ratio_table(doc: &Value) -> Vec<String> {
    let Some(base) = doc.get("baseline").and_then(Value::as_str) else {
        return Vec::new();
    };
    let ratios = match doc.get("ratios").and_then(Value::as_object) {
        Some(r) if !r.is_empty() => r,
        _ => return Vec::new(),
    };
    let base_label = items(doc, "scenarios")
        .iter()
        .find(|s| str_of(s, "id") == base)
        .map_or_else(|| base.to_owned(), |s| str_of(s, "label").to_owned());
    let metrics = items(doc, "metrics");
    let mut head = format!("| ratio to {base_label} |");
    let mut rule = String::from("|---|");
    for m in &metrics {
        let _ = write!(head, " {} |", str_of(m, "label"));
        rule.push_str("---:|");
    }
    let mut out = vec![head, rule];
    for s in items(doc, "scenarios") {
        let id = str_of(&s, "id");
        if !ratios.contains_key(id) {
            continue;
        }
        let mut row = format!("| {} |", str_of(&s, "label"));
        for m in &metrics {
            let c = cell(summary_at(doc, "ratios", id, str_of(m, "id")));
            let _ = write!(row, " {}{} |", c, if c == "—" { "" } else { "×" });
        }
        out.push(row);
    }
    out
}

/// The aggregate as plain text (what `cargo xtask bench` prints after a suite).
pub fn text_table(doc: &Value) -> Vec<String> {
    let mut out = vec![format!(
        "bench {}: median (min–max) over {} round(s)",
        str_of(doc, "suite"),
        doc.get("rounds_ok").and_then(Value::as_u64).unwrap_or(0)
    )];
    out.extend(value_table(doc));
    let r = ratio_table(doc);
    if !r.is_empty() {
        out.push(String::new());
        out.extend(r);
    }
    out
}

fn plot_files(doc: &Value, dir: &Path) -> Result<Vec<(String, String)>> {
    let suite = str_of(doc, "suite");
    let scenarios = items(doc, "scenarios");
    let metrics = items(doc, "metrics");
    let mut made = Vec::new();
    for (i, p) in items(doc, "plots").iter().enumerate() {
        let (title, text) = match str_of(p, "kind") {
            "bars" => {
                let id = str_of(p, "metric");
                let Some(m) = metrics.iter().find(|m| str_of(m, "id") == id) else {
                    continue;
                };
                let rows: Vec<(String, f64, f64, f64)> = scenarios
                    .iter()
                    .filter_map(|s| {
                        let v = summary_at(doc, "summary", str_of(s, "id"), id)?;
                        Some((str_of(s, "label").to_owned(), v.median, v.min, v.max))
                    })
                    .collect();
                if rows.is_empty() {
                    continue;
                }
                let title = format!("{suite}: {}", str_of(m, "label"));
                let t = svg::bars(&title, str_of(m, "unit"), &rows);
                (title, t)
            }
            "cdf" => {
                let d = str_of(p, "distribution");
                let series: Vec<(String, Vec<f64>)> = scenarios
                    .iter()
                    .filter_map(|s| {
                        let v = doc
                            .get("distributions")?
                            .get(str_of(s, "id"))?
                            .get(d)?
                            .as_array()?;
                        let mut xs: Vec<f64> = v.iter().filter_map(Value::as_f64).collect();
                        xs.sort_by(f64::total_cmp);
                        Some((str_of(s, "label").to_owned(), xs))
                    })
                    .collect();
                if series.is_empty() {
                    continue;
                }
                let title = format!("{suite}: {} distribution", str_of(p, "label"));
                let t = svg::cdf(&title, str_of(p, "unit"), &series);
                (title, t)
            }
            _ => continue,
        };
        let name = format!("{suite}-{i}.svg");
        let path = dir.join(&name);
        std::fs::write(&path, text)
            .map_err(|e| Error::failed(format!("cannot write {}: {e}", path.display())))?;
        made.push((title, format!("bench/{name}")));
    }
    Ok(made)
}

fn machine_section(doc: &Value) -> Vec<String> {
    let m = doc.get("machine").cloned().unwrap_or(Value::Null);
    let g = |k: &str| {
        m.get(k).map_or_else(
            || "unknown".to_owned(),
            |v| v.as_str().map_or_else(|| v.to_string(), str::to_owned),
        )
    };
    vec![
        format!("- CPU: {} ({} cores visible)", g("cpu"), g("cores")),
        format!("- Memory: {}", g("memory")),
        format!("- Kernel: {}", g("kernel")),
        format!(
            "- KVM backend: {} (hardware virtualization flag in /proc/cpuinfo: {})",
            g("kvm_backend"),
            g("hardware_virtualization_flag")
        ),
        format!("- QEMU: {}", g("qemu")),
    ]
}

fn load_results() -> Result<Vec<Value>> {
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
        if doc.get("suite").and_then(Value::as_str).is_some() {
            docs.push(doc);
        }
    }
    let rank = |d: &Value| {
        let s = str_of(d, "suite");
        (
            ORDER.iter().position(|o| *o == s).unwrap_or(ORDER.len()),
            s.to_owned(),
        )
    };
    docs.sort_by_key(rank);
    Ok(docs)
}

/// Headline lines: the ratios to the baseline of the (scenario, metric) pairs
/// each suite names as its headline.
fn headline(docs: &[Value]) -> Vec<String> {
    let mut out = Vec::new();
    for doc in docs {
        let Some(base) = doc.get("baseline").and_then(Value::as_str) else {
            continue;
        };
        let scen = items(doc, "scenarios");
        let label = |id: &str| {
            scen.iter()
                .find(|s| str_of(s, "id") == id)
                .map_or_else(|| id.to_owned(), |s| str_of(s, "label").to_owned())
        };
        let metrics = items(doc, "metrics");
        for pair in items(doc, "headline") {
            let (id, metric) = (str_of(&pair, "scenario"), str_of(&pair, "metric"));
            let Some(m) = metrics.iter().find(|m| str_of(m, "id") == metric) else {
                continue;
            };
            if let Some(r) = summary_at(doc, "ratios", id, metric) {
                out.push(format!(
                    "- `{}` {}: {} / {} = **{}×** (median of per-round ratios, {}–{})",
                    str_of(doc, "suite"),
                    str_of(m, "label"),
                    label(id),
                    label(base),
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
        md.push(format!("## `{}`", str_of(doc, "suite")));
        md.push(String::new());
        md.push(str_of(doc, "about").to_owned());
        md.push(String::new());
        md.push(format!(
            "Command: `{}` — finished {} UTC, {} of {} rounds succeeded.",
            str_of(doc, "command"),
            str_of(doc, "finished_utc"),
            doc.get("rounds_ok").and_then(Value::as_u64).unwrap_or(0),
            doc.get("repeats").and_then(Value::as_u64).unwrap_or(0)
        ));
        md.push(String::new());
        md.extend(value_table(doc));
        let r = ratio_table(doc);
        if !r.is_empty() {
            md.push(String::new());
            md.extend(r);
        }
        for n in items(doc, "notes") {
            if let Some(n) = n.as_str() {
                md.push(String::new());
                md.push(format!("Note: {n}"));
            }
        }
        for e in items(doc, "round_errors") {
            if let Some(e) = e.as_str() {
                md.push(String::new());
                md.push(format!("Failed round: {e}"));
            }
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

    fn doc() -> Value {
        json!({
            "suite": "x", "baseline": "a", "rounds_ok": 2,
            "headline": [{"scenario": "b", "metric": "t"}],
            "scenarios": [{"id": "a", "label": "A"}, {"id": "b", "label": "B"}],
            "metrics": [{"id": "t", "label": "time", "unit": "µs", "better": "lower"}],
            "summary": {"a": {"t": {"median": 2.0, "min": 1.0, "max": 3.0, "n": 2}},
                        "b": {"t": {"median": 1.0, "min": 1.0, "max": 1.0, "n": 2}}},
            "ratios": {"b": {"t": {"median": 0.5, "min": 0.4, "max": 0.6, "n": 2}}},
        })
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
    }
}
