//! The guest's serial protocol, line by line:
//!
//! - `test NAME ... ok` / `test NAME ... FAILED: REASON`: one in-guest test;
//! - `N passed, M failed` alone on a line: the end of the in-guest suite;
//! - `report: ...`: a measurement the guest wants shown;
//! - a line containing `boot: main reached`, e.g. `... 1234 us after entry (TSC)`.
//!
//! Each of these may follow a log prefix such as `[cpu0 INFO ] `; everything
//! else is ordinary console output.

pub const BOOT_MARKER: &str = "boot: main reached";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestLine {
    pub name: String,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub passed: u32,
    pub failed: u32,
}

/// What one serial line means.
#[derive(Debug, Clone, PartialEq)]
pub enum LineKind {
    Test(TestLine),
    Summary(Summary),
    /// The text after `report: `.
    Report(String),
    /// The boot marker, with the guest's own microseconds figure if present.
    Boot {
        tsc_us: Option<f64>,
    },
    Other,
}

/// Everything of interest in a whole serial log.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SerialLog {
    pub tests: Vec<TestLine>,
    /// The last summary line seen.
    pub summary: Option<Summary>,
    pub reports: Vec<String>,
    /// Index of the first boot-marker line and the guest's TSC figure.
    pub boot: Option<(usize, Option<f64>)>,
}

impl SerialLog {
    pub fn parse<'a>(lines: impl IntoIterator<Item = &'a str>) -> Self {
        let mut log = Self::default();
        for (index, line) in lines.into_iter().enumerate() {
            match classify(line) {
                LineKind::Test(test) => log.tests.push(test),
                LineKind::Summary(summary) => log.summary = Some(summary),
                LineKind::Report(text) => log.reports.push(text),
                LineKind::Boot { tsc_us } => {
                    if log.boot.is_none() {
                        log.boot = Some((index, tsc_us));
                    }
                }
                LineKind::Other => {}
            }
        }
        log
    }

    /// Counts of `ok` and `FAILED` test lines.
    #[must_use]
    pub fn counted(&self) -> Summary {
        let passed = self
            .tests
            .iter()
            .filter(|t| t.outcome == Outcome::Ok)
            .count();
        let failed = self.tests.len() - passed;
        Summary {
            passed: saturate(passed),
            failed: saturate(failed),
        }
    }
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Classifies one serial line (line ending already removed).
#[must_use]
pub fn classify(line: &str) -> LineKind {
    if let Some(at) = line.find(BOOT_MARKER) {
        return LineKind::Boot {
            tsc_us: micros_after(&line[at + BOOT_MARKER.len()..]),
        };
    }
    let body = strip_log_prefix(line.trim_end());
    if let Some(text) = body.strip_prefix("report: ") {
        return LineKind::Report(text.trim().to_owned());
    }
    if let Some(test) = parse_test_line(body) {
        return LineKind::Test(test);
    }
    if let Some(summary) = parse_summary(body) {
        return LineKind::Summary(summary);
    }
    LineKind::Other
}

/// Drops one leading `[...]` log prefix, if any.
fn strip_log_prefix(line: &str) -> &str {
    let line = line.trim_start();
    if line.starts_with('[')
        && let Some(end) = line.find(']')
    {
        return line[end + 1..].trim_start();
    }
    line
}

fn parse_test_line(body: &str) -> Option<TestLine> {
    let rest = body.strip_prefix("test ")?;
    let (name, result) = rest.split_once(" ... ")?;
    if name.is_empty() || name.contains(char::is_whitespace) {
        return None;
    }
    let outcome = if result == "ok" {
        Outcome::Ok
    } else if let Some(reason) = result.strip_prefix("FAILED") {
        let reason = reason.strip_prefix(':').unwrap_or(reason).trim();
        Outcome::Failed(reason.to_owned())
    } else {
        return None;
    };
    Some(TestLine {
        name: name.to_owned(),
        outcome,
    })
}

/// `N passed, M failed` and nothing else.
fn parse_summary(body: &str) -> Option<Summary> {
    let (passed, failed) = body.split_once(" passed, ")?;
    let failed = failed.strip_suffix(" failed")?;
    Some(Summary {
        passed: parse_count(passed)?,
        failed: parse_count(failed)?,
    })
}

fn parse_count(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// The first `<number> us` in `text`.
fn micros_after(text: &str) -> Option<f64> {
    let words: Vec<&str> = text.split_whitespace().collect();
    words.windows(2).find_map(|pair| {
        let unit = pair[1].trim_end_matches([',', ';', '.']);
        if unit == "us" || unit == "µs" {
            pair[0].parse::<f64>().ok().filter(|v| v.is_finite())
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ok_and_failed_test_lines() {
        assert_eq!(
            classify("test heap::vec_box ... ok"),
            LineKind::Test(TestLine {
                name: "heap::vec_box".into(),
                outcome: Outcome::Ok
            })
        );
        assert_eq!(
            classify("test irq::vif ... FAILED: irq.rs:40: no interrupt after 10 ms"),
            LineKind::Test(TestLine {
                name: "irq::vif".into(),
                outcome: Outcome::Failed("irq.rs:40: no interrupt after 10 ms".into())
            })
        );
        // Through the log facade, with a Windows line ending left over.
        assert_eq!(
            classify("[cpu1 INFO ] test smp::ipi ... ok \r"),
            LineKind::Test(TestLine {
                name: "smp::ipi".into(),
                outcome: Outcome::Ok
            })
        );
        assert_eq!(
            classify("test x ... FAILED"),
            LineKind::Test(TestLine {
                name: "x".into(),
                outcome: Outcome::Failed(String::new())
            })
        );
    }

    #[test]
    fn lines_that_only_look_like_tests_are_ordinary_output() {
        assert_eq!(classify("test two words ... ok"), LineKind::Other);
        assert_eq!(classify("test heap ... ignored"), LineKind::Other);
        assert_eq!(classify("test heap ok"), LineKind::Other);
        assert_eq!(classify("running test heap ... ok"), LineKind::Other);
    }

    #[test]
    fn the_summary_line_must_stand_alone() {
        assert_eq!(
            classify("20 passed, 0 failed"),
            LineKind::Summary(Summary {
                passed: 20,
                failed: 0
            })
        );
        assert_eq!(
            classify("[cpu0 INFO ] 3 passed, 1 failed"),
            LineKind::Summary(Summary {
                passed: 3,
                failed: 1
            })
        );
        assert_eq!(classify("so far 3 passed, 1 failed"), LineKind::Other);
        assert_eq!(classify("3 passed, 1 failed tests"), LineKind::Other);
        assert_eq!(classify("-3 passed, 1 failed"), LineKind::Other);
        // cargo's own summary is not the guest's.
        assert_eq!(
            classify("test result: ok. 3 passed; 0 failed; 0 ignored"),
            LineKind::Other
        );
    }

    #[test]
    fn report_lines_keep_their_text() {
        assert_eq!(
            classify("report: loop 10^6 iterations: ring3 0.6 ms, ring0 4100 ms"),
            LineKind::Report("loop 10^6 iterations: ring3 0.6 ms, ring0 4100 ms".into())
        );
        assert_eq!(
            classify("[cpu0 INFO ] report: x"),
            LineKind::Report("x".into())
        );
        assert_eq!(classify("reporting: x"), LineKind::Other);
    }

    #[test]
    fn boot_marker_with_and_without_tsc_figure() {
        assert_eq!(
            classify("[cpu0 INFO ] boot: main reached 1234 us after entry (TSC)"),
            LineKind::Boot {
                tsc_us: Some(1234.0)
            }
        );
        assert_eq!(
            classify("boot: main reached, 17.5 us after entry (TSC)"),
            LineKind::Boot { tsc_us: Some(17.5) }
        );
        assert_eq!(
            classify("boot: main reached"),
            LineKind::Boot { tsc_us: None }
        );
        assert_eq!(
            classify("boot: main reached at 99 ms"),
            LineKind::Boot { tsc_us: None }
        );
    }

    #[test]
    fn a_whole_log() {
        let log = SerialLog::parse([
            "[cpu0 INFO ] pvh: 256 MiB",
            "[cpu0 INFO ] boot: main reached 800 us after entry (TSC)",
            "test a ... ok",
            "test b ... FAILED: boom",
            "report: r1",
            "test c ... ok",
            "2 passed, 1 failed",
        ]);
        assert_eq!(log.tests.len(), 3);
        assert_eq!(
            log.counted(),
            Summary {
                passed: 2,
                failed: 1
            }
        );
        assert_eq!(
            log.summary,
            Some(Summary {
                passed: 2,
                failed: 1
            })
        );
        assert_eq!(log.reports, ["r1"]);
        assert_eq!(log.boot, Some((1, Some(800.0))));
    }

    #[test]
    fn a_log_without_summary_or_marker() {
        let log = SerialLog::parse(["test a ... ok", "PANIC at x.rs:1"]);
        assert_eq!(log.summary, None);
        assert_eq!(log.boot, None);
        assert_eq!(
            log.counted(),
            Summary {
                passed: 1,
                failed: 0
            }
        );
    }
}
