//! The in-guest test framework: tests register themselves in the `.ktests`
//! linker section (stable Rust has no custom test frameworks), the runner in
//! `rt::ktest_runner` executes them in ring 3, one output line each, and a
//! closing `N passed, M failed, K skipped` line that the xtask runner parses.
//!
//! A test passes by returning `Ok(())` after checking what it is about. It
//! skips only through a `require*` helper of `rt::ktest_runner`, which reads
//! what the host offers (CPUID, ACPI, the para region) or what the command
//! line asks for: a [`Skip`] cannot be built anywhere else, so a test cannot
//! end early and still be counted as anything but skipped.

use alloc::string::String;

/// What a test returns: `Err` says it failed (with the message) or skipped.
pub type TestResult = Result<(), Stop>;

/// Why a test did not pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// A check failed; the message says which and where.
    Failed(String),
    /// The test could not run here (see [`Skip`]).
    Skipped(Skip),
}

impl From<String> for Stop {
    fn from(why: String) -> Self {
        Self::Failed(why)
    }
}

impl From<&str> for Stop {
    fn from(why: &str) -> Self {
        Self::Failed(why.into())
    }
}

/// Why a test did not run. Its field is private: only this crate's
/// `require*` helpers make one, from what the host offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Skip(Why);

// The constructors are used by the runtime, which builds for the guest only.
#[cfg_attr(not(target_os = "none"), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    /// The host does not offer what the test exercises.
    NotOffered(&'static str),
    /// The host offers what the test checks the absence of.
    Offered(&'static str),
    /// An optional facility the host or the command line did not ask for.
    NotAsked(&'static str),
}

#[cfg_attr(not(target_os = "none"), allow(dead_code))]
impl Skip {
    pub(crate) const fn not_offered(what: &'static str) -> Self {
        Self(Why::NotOffered(what))
    }
    pub(crate) const fn offered(what: &'static str) -> Self {
        Self(Why::Offered(what))
    }
    pub(crate) const fn not_asked(what: &'static str) -> Self {
        Self(Why::NotAsked(what))
    }
}

/// The prefix of a skip reason that says the host lacks what the test
/// exercises (xtask fails a leg whose host offers everything on it).
pub const NOT_OFFERED: &str = "not offered: ";

impl core::fmt::Display for Skip {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Why::NotOffered(what) => write!(f, "{NOT_OFFERED}{what}"),
            Why::Offered(what) => write!(f, "offered: {what} (the test checks its absence)"),
            Why::NotAsked(what) => write!(f, "not asked for: {what}"),
        }
    }
}

/// The name of one feature bit of CPUID 0x4000_0001 (for skip reasons).
#[must_use]
pub const fn feature_name(bit: u32) -> &'static str {
    use para_abi::discovery::features;
    match bit {
        features::EXIT_HYPERCALL => "the exit hypercall (CPUID 0x40000001 bit 0)",
        features::PARA_REGION => "the para region (CPUID 0x40000001 bit 1)",
        features::DOORBELLS => "M1 doorbells (CPUID 0x40000001 bit 2)",
        features::HINTS => "M2 interrupt-vCPU hints (CPUID 0x40000001 bit 3)",
        features::UPCALLS => "M3 upcalls (CPUID 0x40000001 bit 4)",
        features::SHADOW_FLAGS => "M4 shadowed control flags (CPUID 0x40000001 bit 5)",
        features::VM_QUEUES => "M5 VM queues (CPUID 0x40000001 bit 6)",
        features::DIRECT_CHANNELS => "direct channels (CPUID 0x40000001 bit 7)",
        _ => "a feature of CPUID 0x40000001",
    }
}

/// `Ok` when `features` (CPUID 0x4000_0001 EAX, meaningful only under the
/// shim) offers every bit of `bit`; else the skip naming it.
#[cfg_attr(not(target_os = "none"), allow(dead_code))]
pub(crate) fn offer_required(features: u32, under_shim: bool, bit: u32) -> TestResult {
    if under_shim && features & bit == bit {
        Ok(())
    } else {
        Err(Stop::Skipped(Skip::not_offered(feature_name(bit))))
    }
}

/// `Ok` when `bit` is not offered; else the skip of a test of its absence.
#[cfg_attr(not(target_os = "none"), allow(dead_code))]
pub(crate) fn absence_required(features: u32, under_shim: bool, bit: u32) -> TestResult {
    if under_shim && features & bit == bit {
        Err(Stop::Skipped(Skip::offered(feature_name(bit))))
    } else {
        Ok(())
    }
}

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
            // `From` so that helpers returning `Result<_, String>` check too.
            return Err(::core::convert::From::from($crate::ktest::__format!("{}:{}: {}", file!(), line!(), $crate::ktest::__format!($($arg)+))));
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
    pub skipped: u32,
}

impl Tally {
    pub fn record(&mut self, result: &TestResult) {
        match result {
            Ok(()) => self.passed += 1,
            Err(Stop::Failed(_)) => self.failed += 1,
            Err(Stop::Skipped(_)) => self.skipped += 1,
        }
    }

    /// Tests that ran (passed or failed); skipped ones did not.
    #[must_use]
    pub const fn ran(&self) -> u32 {
        self.passed + self.failed
    }

    /// True when nothing failed and at least one test ran: a suite that ran
    /// nothing proves nothing.
    #[must_use]
    pub const fn all_passed(&self) -> bool {
        self.failed == 0 && self.ran() > 0
    }
}

impl core::fmt::Display for Tally {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )
    }
}

/// The display name of a test: its module path without the crate name.
#[must_use]
pub fn display_name(full: &str) -> &str {
    full.split_once("::").map_or(full, |(_, rest)| rest)
}

/// One result line: `test NAME ... ok`, `test NAME ... FAILED: REASON` or
/// `test NAME ... skipped: REASON` (the reason folded onto one line).
pub fn write_result_line(
    out: &mut impl core::fmt::Write,
    name: &str,
    result: &TestResult,
) -> core::fmt::Result {
    match result {
        Ok(()) => writeln!(out, "test {name} ... ok"),
        Err(Stop::Skipped(why)) => writeln!(out, "test {name} ... skipped: {why}"),
        Err(Stop::Failed(reason)) => {
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
        t.record(&Ok(()));
        t.record(&Ok(()));
        t.record(&Err("no".into()));
        t.record(&Err(Stop::Skipped(Skip::not_offered("x"))));
        assert_eq!(t.to_string(), "2 passed, 1 failed, 1 skipped");
        assert!(!t.all_passed());
    }

    #[test]
    fn a_suite_that_ran_nothing_did_not_pass() {
        let mut t = Tally::default();
        assert!(!t.all_passed(), "nothing ran");
        t.record(&Err(Stop::Skipped(Skip::not_offered("x"))));
        assert!(!t.all_passed(), "only skips");
        assert_eq!(t.ran(), 0);
        t.record(&Ok(()));
        assert!(t.all_passed());
    }

    #[test]
    fn result_lines_stay_on_one_line() {
        let mut s = String::new();
        write_result_line(&mut s, "heap::vec", &Ok(())).unwrap();
        write_result_line(&mut s, "irq::vif", &Err("line one\nline two".into())).unwrap();
        let skip = Err(Stop::Skipped(Skip::not_offered(feature_name(
            para_abi::discovery::features::SHADOW_FLAGS,
        ))));
        write_result_line(&mut s, "ctrl::x", &skip).unwrap();
        assert_eq!(
            s,
            "test heap::vec ... ok\ntest irq::vif ... FAILED: line one line two\n\
             test ctrl::x ... skipped: not offered: M4 shadowed control flags (CPUID 0x40000001 bit 5)\n"
        );
    }

    #[test]
    fn requirements_skip_only_when_the_host_lacks_the_offer() {
        use para_abi::discovery::features::{DOORBELLS, PARA_REGION, UPCALLS};
        let both = DOORBELLS | PARA_REGION;
        assert_eq!(offer_required(both, true, DOORBELLS), Ok(()));
        // CPUID bits mean nothing outside the shim (QEMU's leaf is KVM's).
        let Err(Stop::Skipped(why)) = offer_required(both, false, DOORBELLS) else {
            panic!("skips outside the shim");
        };
        assert!(why.to_string().starts_with(NOT_OFFERED), "{why}");
        assert!(offer_required(both, true, UPCALLS).is_err());
        assert!(offer_required(DOORBELLS, true, DOORBELLS | PARA_REGION).is_err());
        assert_eq!(absence_required(both, true, UPCALLS), Ok(()));
        assert_eq!(absence_required(both, false, DOORBELLS), Ok(()));
        let Err(Stop::Skipped(why)) = absence_required(both, true, DOORBELLS) else {
            panic!("a test of the absence skips where it is offered");
        };
        assert!(why.to_string().starts_with("offered: "), "{why}");
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

    fn string_helper() -> Result<(), String> {
        check!(1 > 2, "helpers with String errors check too");
        Ok(())
    }

    fn failure(r: TestResult) -> String {
        match r {
            Err(Stop::Failed(why)) => why,
            other => panic!("not a failure: {other:?}"),
        }
    }

    #[test]
    fn check_macros_return_errors_with_location() {
        assert_eq!(passes(), Ok(()));
        assert!(string_helper().unwrap_err().contains("helpers"));
        let err = failure(fails());
        assert!(err.contains("ktest.rs:"), "{err}");
        assert!(err.contains("4 != 5"), "{err}");
        let err = failure(fails_with_context());
        assert!(err.contains("context 7: 1 != 2"), "{err}");
    }
}
