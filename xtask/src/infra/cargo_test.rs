//! Summing the `test result:` lines that `cargo test` prints, one per test
//! binary and doc-test run.

use crate::infra::serial::Summary;

/// Sum over all result lines, and how many there were.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub summary: Summary,
    pub result_lines: usize,
}

/// Parses `test result: ok. 12 passed; 0 failed; 1 ignored; ...` (or
/// `FAILED.`); `None` for any other line. Ignored tests did not run: they
/// are counted as skipped.
#[must_use]
pub fn parse_result_line(line: &str) -> Option<Summary> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let (_verdict, counts) = rest.split_once(". ")?;
    let mut passed = None;
    let mut failed = None;
    let mut skipped = 0;
    for field in counts.split(';') {
        let mut words = field.split_whitespace();
        let (Some(number), Some(what)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(number) = number.parse::<u32>() else {
            continue;
        };
        match what {
            "passed" => passed = Some(number),
            "failed" => failed = Some(number),
            "ignored" => skipped = number,
            _ => {}
        }
    }
    Some(Summary {
        passed: passed?,
        failed: failed?,
        skipped,
    })
}

#[must_use]
pub fn sum<'a>(lines: impl IntoIterator<Item = &'a str>) -> Totals {
    lines
        .into_iter()
        .filter_map(parse_result_line)
        .fold(Totals::default(), |acc, s| Totals {
            summary: Summary {
                passed: acc.summary.passed.saturating_add(s.passed),
                failed: acc.summary.failed.saturating_add(s.failed),
                skipped: acc.summary.skipped.saturating_add(s.skipped),
            },
            result_lines: acc.result_lines + 1,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_parse() {
        assert_eq!(
            parse_result_line(
                "test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s"
            ),
            Some(Summary {
                passed: 12,
                failed: 0,
                skipped: 1
            })
        );
        assert_eq!(
            parse_result_line(
                "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out"
            ),
            Some(Summary::new(3, 2))
        );
        assert_eq!(parse_result_line("test foo ... ok"), None);
        assert_eq!(parse_result_line("test result: ok. lots passed"), None);
        assert_eq!(parse_result_line("3 passed, 0 failed"), None);
    }

    #[test]
    fn a_workspace_run_sums_every_binary() {
        let output = "\
running 2 tests
test a ... ok
test b ... ok

test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s

running 3 tests
test c ... FAILED
test d ... ok
test e ... ok

failures:
    c

test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s

   Doc-tests para_abi

running 0 tests

test result: ok. 0 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s
";
        assert_eq!(
            sum(output.lines()),
            Totals {
                summary: Summary {
                    passed: 4,
                    failed: 1,
                    skipped: 1
                },
                result_lines: 3
            }
        );
        assert_eq!(
            sum("error[E0425]: cannot find value `x`".lines()),
            Totals::default()
        );
    }
}
