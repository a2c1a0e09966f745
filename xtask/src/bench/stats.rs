//! Order statistics for benchmark rounds and samples.

use para_abi::report::percentile;
use serde_json::{Value, json};

/// Median with min–max over a set of values. The median is the nearest-rank
/// 50th percentile (`para_abi::report::percentile`, the definition the guests
/// use): always one of the values, the lower middle one of an even count.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    /// `None` for an empty set.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(Self {
            median: percentile(&v, 50)?,
            min: v[0],
            max: v[v.len() - 1],
            n: v.len(),
        })
    }

    pub fn to_json(self) -> Value {
        json!({"median": self.median, "min": self.min, "max": self.max, "n": self.n})
    }
}

/// At most `max` values, evenly spaced in sorted order (keeps a CDF's shape while
/// bounding the JSON's size).
#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
pub fn thin(values: &[f64], max: usize) -> Vec<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.len() <= max || max < 2 {
        return v;
    }
    (0..max)
        .map(|i| v[(i as f64 * (v.len() - 1) as f64 / (max - 1) as f64).round() as usize])
        .collect()
}

/// A number with precision fit for a table: 3 significant digits, no exponent
/// for everyday magnitudes.
pub fn fmt_num(x: f64) -> String {
    let a = x.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1000.0 {
        format!("{x:.0}")
    } else if a >= 100.0 {
        format!("{x:.1}")
    } else if a >= 10.0 {
        format!("{x:.2}")
    } else if a >= 0.01 {
        format!("{x:.3}")
    } else if a >= 0.001 {
        format!("{x:.4}")
    } else {
        format!("{x:.2e}")
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)] // exact values by construction
mod tests {
    use super::*;

    #[test]
    fn median_and_range() {
        let s = Summary::of(&[5.0, 1.0, 3.0, f64::NAN]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (3.0, 1.0, 5.0, 3));
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(s.median, 2.0, "nearest rank: the lower middle value");
        assert!(Summary::of(&[]).is_none());
        assert_eq!(serde_json::from_value::<Summary>(s.to_json()).unwrap(), s);
    }

    #[test]
    fn thinning_keeps_ends() {
        let v: Vec<f64> = (0..10_000).map(f64::from).collect();
        let t = thin(&v, 100);
        assert_eq!(t.len(), 100);
        assert_eq!(t[0], 0.0);
        assert_eq!(t[99], 9999.0);
        assert_eq!(thin(&[3.0, 1.0], 100), [1.0, 3.0]);
    }

    #[test]
    fn numbers_format_for_tables() {
        assert_eq!(fmt_num(1234.4), "1234");
        assert_eq!(fmt_num(12.345), "12.35");
        assert_eq!(fmt_num(0.5), "0.500");
        assert_eq!(fmt_num(0.0), "0");
    }
}
