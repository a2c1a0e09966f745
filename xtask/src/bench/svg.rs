//! Plots as hand-written SVG: horizontal bars with min–max whiskers, and
//! cumulative distributions. Small enough to need no plotting crate, and the
//! files diff well in review.

use std::fmt::Write as _;

use para_abi::report::percentile;

use super::stats::fmt_num;

const WIDTH: f64 = 720.0;
const PALETTE: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn header(height: f64, title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"14\" font-weight=\"bold\">{}</text>\n",
        WIDTH / 2.0,
        esc(title)
    )
}

/// A "nice" upper bound for an axis (1, 2 or 5 × 10^k at or above `x`).
fn nice_ceiling(x: f64) -> f64 {
    if x <= 0.0 || !x.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(x.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * p >= x {
            return m * p;
        }
    }
    10.0 * p
}

/// One bar per row: (label, median, min, max).
#[allow(clippy::cast_precision_loss)]
pub fn bars(title: &str, unit: &str, rows: &[(String, f64, f64, f64)]) -> String {
    let left = 230.0;
    let right = 80.0;
    let row_h = 28.0;
    let top = 36.0;
    let height = top + row_h * rows.len() as f64 + 40.0;
    let max = nice_ceiling(rows.iter().map(|r| r.3.max(r.1)).fold(0.0, f64::max));
    let scale = |v: f64| left + (WIDTH - left - right) * (v / max).clamp(0.0, 1.0);
    let mut s = header(height, title);
    for (i, (label, med, lo, hi)) in rows.iter().enumerate() {
        let y = top + row_h * i as f64;
        let colour = PALETTE[i % PALETTE.len()];
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            left - 8.0,
            y + row_h / 2.0 + 4.0,
            esc(label)
        );
        let _ = writeln!(
            s,
            "<rect x=\"{left}\" y=\"{}\" width=\"{:.1}\" height=\"{}\" fill=\"{colour}\"/>",
            y + 4.0,
            scale(*med) - left,
            row_h - 8.0
        );
        let (x0, x1, ym) = (scale(*lo), scale(*hi), y + row_h / 2.0);
        let _ = writeln!(
            s,
            "<path d=\"M{x0:.1} {ym} H{x1:.1} M{x0:.1} {:.1} V{:.1} M{x1:.1} {:.1} V{:.1}\" stroke=\"black\" fill=\"none\"/>",
            ym - 5.0,
            ym + 5.0,
            ym - 5.0,
            ym + 5.0
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\">{}</text>",
            x1.max(scale(*med)) + 6.0,
            ym + 4.0,
            esc(&fmt_num(*med))
        );
    }
    let axis_y = top + row_h * rows.len() as f64 + 4.0;
    axis(
        &mut s,
        (left, right, axis_y, max),
        scale,
        &format!("{unit} (median, whiskers min–max over rounds)"),
    );
    s.push_str("</svg>\n");
    s
}

/// The value axis under the rows: a line, five ticks from 0 to `max` at
/// `x(v)`, and `caption` below. `frame`: (left, right margins, axis y, max).
fn axis(s: &mut String, frame: (f64, f64, f64, f64), x: impl Fn(f64) -> f64, caption: &str) {
    let (left, right, axis_y, max) = frame;
    let _ = writeln!(
        s,
        "<path d=\"M{left} {axis_y} H{}\" stroke=\"#888\"/>",
        WIDTH - right
    );
    for k in 0..=4 {
        let v = max * f64::from(k) / 4.0;
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" fill=\"#555\">{}</text>",
            x(v),
            axis_y + 16.0,
            esc(&fmt_num(v))
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#555\">{}</text>",
        (left + WIDTH - right) / 2.0,
        axis_y + 32.0,
        esc(caption)
    );
}

/// One horizontal bar per row, stacked from its parts (same order and
/// colours in every row, named in a legend): (row label, part values).
#[allow(clippy::cast_precision_loss)]
pub fn stacked(title: &str, unit: &str, parts: &[String], rows: &[(String, Vec<f64>)]) -> String {
    let (left, right, top, row_h) = (230.0, 80.0, 36.0, 30.0);
    let legend_h = 18.0 * parts.len() as f64;
    let height = top + row_h * rows.len() as f64 + 44.0 + legend_h;
    let max = nice_ceiling(
        rows.iter()
            .map(|(_, v)| v.iter().filter(|x| **x > 0.0).sum::<f64>())
            .fold(0.0, f64::max),
    );
    let scale = |v: f64| (WIDTH - left - right) * (v / max).clamp(0.0, 1.0);
    let mut s = header(height, title);
    for (i, (label, values)) in rows.iter().enumerate() {
        let y = top + row_h * i as f64;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            left - 8.0,
            y + row_h / 2.0 + 4.0,
            esc(label)
        );
        let mut x = left;
        for (k, v) in values.iter().enumerate() {
            let w = scale(v.max(0.0));
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{}\" width=\"{w:.1}\" height=\"{}\" fill=\"{}\"><title>{}: {}</title></rect>",
                y + 4.0,
                row_h - 8.0,
                PALETTE[k % PALETTE.len()],
                esc(parts.get(k).map_or("", String::as_str)),
                esc(&fmt_num(*v))
            );
            x += w;
        }
        let total: f64 = values.iter().filter(|x| **x > 0.0).sum();
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\">{}</text>",
            x + 6.0,
            y + row_h / 2.0 + 4.0,
            esc(&fmt_num(total))
        );
    }
    let axis_y = top + row_h * rows.len() as f64 + 4.0;
    axis(
        &mut s,
        (left, right, axis_y, max),
        |v| left + scale(v),
        &format!("{unit} (medians over rounds, stacked)"),
    );
    for (k, p) in parts.iter().enumerate() {
        let y = axis_y + 44.0 + 18.0 * k as f64;
        let _ = writeln!(
            s,
            "<rect x=\"{left}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{:.1}\">{}</text>",
            y - 10.0,
            PALETTE[k % PALETTE.len()],
            left + 18.0,
            y,
            esc(p)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// Cumulative distributions: one line per (label, sorted samples). The x axis
/// ends at the largest p99 so that a long tail does not flatten the rest.
#[allow(clippy::cast_precision_loss)]
pub fn cdf(title: &str, unit: &str, series: &[(String, Vec<f64>)]) -> String {
    let (left, right, top, bottom) = (60.0, 20.0, 36.0, 70.0);
    let height = 360.0;
    let plot_h = height - top - bottom;
    let x_max = nice_ceiling(
        series
            .iter()
            .filter_map(|(_, v)| percentile(v, 99))
            .filter(|x| x.is_finite())
            .fold(0.0, f64::max),
    );
    let sx = |v: f64| left + (WIDTH - left - right) * (v / x_max).clamp(0.0, 1.0);
    let sy = |p: f64| top + plot_h * (1.0 - p);
    let mut s = header(height, title);
    let _ = writeln!(
        s,
        "<path d=\"M{left} {top} V{} H{}\" stroke=\"#888\" fill=\"none\"/>",
        top + plot_h,
        WIDTH - right
    );
    for k in 0..=4 {
        let p = f64::from(k) / 4.0;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#555\">{}</text>",
            left - 6.0,
            sy(p) + 4.0,
            p
        );
        let v = x_max * p;
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\" fill=\"#555\">{}</text>",
            sx(v),
            top + plot_h + 16.0,
            esc(&fmt_num(v))
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#555\">{} (fraction of samples at or below)</text>",
        (left + WIDTH - right) / 2.0,
        top + plot_h + 32.0,
        esc(unit)
    );
    for (i, (label, v)) in series.iter().enumerate() {
        if v.is_empty() {
            continue;
        }
        let colour = PALETTE[i % PALETTE.len()];
        // Plotting position (k+1)/(n+1): right for raw samples and for evenly
        // spaced quantiles alike (19 quantiles p5..p95 land on 0.05..0.95).
        let n = v.len() as f64 + 1.0;
        let mut d = String::new();
        for (k, x) in v.iter().enumerate() {
            let p = (k + 1) as f64 / n;
            let _ = write!(
                d,
                "{}{:.1} {:.1} ",
                if k == 0 { "M" } else { "L" },
                sx(*x),
                sy(p)
            );
        }
        let _ = writeln!(
            s,
            "<path d=\"{}\" stroke=\"{colour}\" stroke-width=\"2\" fill=\"none\"/>",
            d.trim_end()
        );
        let ly = top + plot_h + 50.0;
        let lx = left + 220.0 * i as f64;
        let _ = writeln!(
            s,
            "<rect x=\"{lx}\" y=\"{}\" width=\"14\" height=\"4\" fill=\"{colour}\"/><text x=\"{}\" y=\"{}\">{} (n={})</text>",
            ly - 4.0,
            lx + 18.0,
            ly,
            esc(label),
            v.len()
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // exact values by construction
mod tests {
    use super::*;

    #[test]
    fn axis_ceilings_are_round() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(7.0), 10.0);
        assert_eq!(nice_ceiling(120.0), 200.0);
        assert_eq!(nice_ceiling(0.3), 0.5);
    }

    #[test]
    fn stacked_bars_name_every_part() {
        let parts = vec!["a".to_owned(), "b".to_owned()];
        let t = stacked("t", "µs", &parts, &[("x".into(), vec![1.0, 2.0])]);
        assert!(t.starts_with("<svg") && t.ends_with("</svg>\n"));
        assert_eq!(t.matches("<title>").count(), 2);
        assert!(t.contains(">a</text>") && t.contains(">b</text>"));
    }

    #[test]
    fn plots_are_svg_with_every_series() {
        let b = bars(
            "t <1>",
            "µs",
            &[("a".into(), 1.0, 0.5, 2.0), ("b".into(), 3.0, 3.0, 3.0)],
        );
        assert!(b.starts_with("<svg") && b.trim_end().ends_with("</svg>"));
        assert!(b.contains("t &lt;1&gt;"));
        assert_eq!(b.matches("<rect x=\"230\"").count(), 2);
        let c = cdf("c", "µs", &[("x".into(), vec![1.0, 2.0, 3.0])]);
        assert!(c.contains("(n=3)"));
    }
}
