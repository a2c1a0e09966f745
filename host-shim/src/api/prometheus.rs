//! The stats document in Prometheus' text exposition format (version
//! 0.0.4): every number of the JSON becomes a sample named by its path
//! (`exitless_switch_forwarded`), with the guest, NIC or vCPU it belongs to
//! as labels, so the JSON stays the one definition of what is counted.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::Value;

type Families = BTreeMap<String, Vec<(String, f64)>>;

/// A metric name: `[a-zA-Z0-9_]`, lower case.
fn metric_name(parts: &[String]) -> String {
    let mut out = String::from("exitless");
    for p in parts {
        out.push('_');
        out.extend(p.chars().map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        }));
    }
    out
}

/// A label value with `\`, `"` and newlines escaped.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The label an array element is known by: its `name` or `index` field,
/// else its position; the label's name is the array's, singular.
fn element_label(array_key: &str, i: usize, v: &Value) -> (String, String) {
    let key = array_key.strip_suffix('s').unwrap_or(array_key).to_owned();
    let id = v
        .get("name")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| v.get("index").map(ToString::to_string))
        .or_else(|| v.get("cpu").map(ToString::to_string))
        .unwrap_or_else(|| i.to_string());
    (key, id)
}

fn walk(v: &Value, path: &mut Vec<String>, labels: &[(String, String)], out: &mut Families) {
    match v {
        Value::Number(n) => {
            let Some(x) = n.as_f64() else { return };
            let l = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", label_value(v)))
                .collect::<Vec<_>>()
                .join(",");
            out.entry(metric_name(path)).or_default().push((l, x));
        }
        Value::Bool(b) => {
            walk(&Value::from(u8::from(*b)), path, labels, out);
        }
        Value::Object(map) => {
            for (k, v) in map {
                path.push(k.clone());
                walk(v, path, labels, out);
                path.pop();
            }
        }
        Value::Array(items) => {
            let key = path.last().cloned().unwrap_or_default();
            for (i, item) in items.iter().enumerate() {
                let mut l = labels.to_vec();
                let (name, id) = element_label(&key, i, item);
                // Two levels named alike (a NIC's queues in a guest's list)
                // keep both labels apart.
                let name = if l.iter().any(|(k, _)| *k == name) {
                    format!("{name}_{}", l.len())
                } else {
                    name
                };
                l.push((name, id));
                walk(item, path, &l, out);
            }
        }
        Value::Null | Value::String(_) => {}
    }
}

/// The samples of `doc`, one family per metric name, each with its `# TYPE`.
#[must_use]
pub fn render(doc: &Value) -> String {
    let mut families = Families::new();
    walk(doc, &mut Vec::new(), &[], &mut families);
    let mut out = String::new();
    for (name, samples) in families {
        let _ = writeln!(out, "# TYPE {name} untyped");
        for (labels, x) in samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {x}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {x}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_become_samples_labelled_by_their_guest() {
        let doc = serde_json::json!({
            "shim_max_rss_kib": 100,
            "switch": {"forwarded": 3},
            "guests": [
                {"name": "a\"b", "outcome": "running", "vcpus": [{"index": 0, "exits": {"io": 5}}]},
                {"name": "c", "vcpus": [{"index": 1, "exits": {"io": 7}}]}
            ]
        });
        let text = render(&doc);
        assert!(text.contains("exitless_shim_max_rss_kib 100\n"), "{text}");
        assert!(text.contains("exitless_switch_forwarded 3\n"), "{text}");
        assert!(
            text.contains("exitless_guests_vcpus_exits_io{guest=\"a\\\"b\",vcpu=\"0\"} 5\n"),
            "{text}"
        );
        assert!(
            text.contains("exitless_guests_vcpus_exits_io{guest=\"c\",vcpu=\"1\"} 7\n"),
            "{text}"
        );
        // One family, one TYPE line, its samples together.
        assert_eq!(
            text.matches("# TYPE exitless_guests_vcpus_exits_io ")
                .count(),
            1
        );
        assert!(!text.contains("outcome"));
    }
}
