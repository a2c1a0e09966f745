//! The in-guest test framework: tests register themselves in the `.ktests`
//! linker section (stable Rust has no custom test frameworks), the runner in
//! `rt::ktest_runner` executes them in ring 3, one output line each, and a
//! closing `N passed, M failed` line that the xtask runner parses.

use alloc::string::String;

/// What a test returns: `Err` carries the failure message.
pub type TestResult = Result<(), String>;

/// One registered test. Lives in the `.ktests` section as a `static`.
#[repr(C)]
pub struct TestCase {
    /// `module::path::name` (no spaces: the runner's output format relies on it).
    pub name: &'static str,
    pub run: fn() -> TestResult,
}

/// Declares an in-guest test. The body returns [`TestResult`].
///
/// ```ignore
/// guest_kernel::ktest!(fn heap_grows() {
///     guest_kernel::check!(1 + 1 == 2, "arithmetic");
///     Ok(())
/// });
/// ```
#[macro_export]
macro_rules! ktest {
    ($(#[$meta:meta])* fn $name:ident() $body:block) => {
        $(#[$meta])*
        fn $name() -> $crate::ktest::TestResult $body
        const _: () = {
            #[used]
            #[unsafe(link_section = ".ktests")]
            static CASE: $crate::ktest::TestCase = $crate::ktest::TestCase {
                name: concat!(module_path!(), "::", stringify!($name)),
                run: $name,
            };
        };
    };
}

/// Fails the enclosing test with the location and a message unless `cond` holds.
#[macro_export]
macro_rules! check {
    ($cond:expr) => {
        $crate::check!($cond, "{}", stringify!($cond))
    };
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err($crate::ktest::__format!("{}:{}: {}", file!(), line!(), $crate::ktest::__format!($($arg)+)));
        }
    };
}

/// Fails the enclosing test unless the two values are equal, showing both
/// (and an optional context message).
#[macro_export]
macro_rules! check_eq {
    ($left:expr, $right:expr $(,)?) => {
        $crate::check_eq!($left, $right, "{} == {}", stringify!($left), stringify!($right))
    };
    ($left:expr, $right:expr, $($arg:tt)+) => {{
        let (l, r) = (&$left, &$right);
        $crate::check!(*l == *r, "{}: {:?} != {:?}", $crate::ktest::__format!($($arg)+), l, r);
    }};
}

#[doc(hidden)]
pub use alloc::format as __format;

/// Counts results and formats the lines the xtask runner parses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub passed: u32,
    pub failed: u32,
}

impl Tally {
    pub fn record(&mut self, ok: bool) {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
    }

    #[must_use]
    pub const fn all_passed(&self) -> bool {
        self.failed == 0
    }
}

impl core::fmt::Display for Tally {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} passed, {} failed", self.passed, self.failed)
    }
}

/// The display name of a test: its module path without the crate name.
#[must_use]
pub fn display_name(full: &str) -> &str {
    full.split_once("::").map_or(full, |(_, rest)| rest)
}

/// One result line: `test NAME ... ok` or `test NAME ... FAILED: REASON`
/// (the reason is folded onto one line).
pub fn write_result_line(
    out: &mut impl core::fmt::Write,
    name: &str,
    result: &Result<(), String>,
) -> core::fmt::Result {
    match result {
        Ok(()) => writeln!(out, "test {name} ... ok"),
        Err(reason) => {
            write!(out, "test {name} ... FAILED: ")?;
            for c in reason.chars() {
                out.write_char(if c == '\n' || c == '\r' { ' ' } else { c })?;
            }
            out.write_char('\n')
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn tally_formats_the_closing_line() {
        let mut t = Tally::default();
        t.record(true);
        t.record(true);
        t.record(false);
        assert_eq!(t.to_string(), "2 passed, 1 failed");
        assert!(!t.all_passed());
    }

    #[test]
    fn result_lines_stay_on_one_line() {
        let mut s = String::new();
        write_result_line(&mut s, "heap::vec", &Ok(())).unwrap();
        write_result_line(&mut s, "irq::vif", &Err("line one\nline two".to_string())).unwrap();
        assert_eq!(
            s,
            "test heap::vec ... ok\ntest irq::vif ... FAILED: line one line two\n"
        );
    }

    #[test]
    fn names_lose_the_crate() {
        assert_eq!(display_name("ktest::heap::vec_box"), "heap::vec_box");
        assert_eq!(display_name("plain"), "plain");
    }

    fn passes() -> TestResult {
        let (a, b) = (2, 4);
        check!(a < b);
        check_eq!(a * 2, b);
        Ok(())
    }

    fn fails() -> TestResult {
        let four = 4;
        check_eq!(four, 5);
        Ok(())
    }

    fn fails_with_context() -> TestResult {
        check_eq!(1, 2, "context {}", 7);
        Ok(())
    }

    #[test]
    fn check_macros_return_errors_with_location() {
        assert_eq!(passes(), Ok(()));
        let err = fails().unwrap_err();
        assert!(err.contains("ktest.rs:"), "{err}");
        assert!(err.contains("4 != 5"), "{err}");
        let err = fails_with_context().unwrap_err();
        assert!(err.contains("context 7: 1 != 2"), "{err}");
    }
}
