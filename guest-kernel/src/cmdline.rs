//! The kernel command line: space-separated `key=value` words and bare flags.

/// A parsed view over the command-line string (no allocation).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cmdline<'a> {
    raw: &'a str,
}

impl<'a> Cmdline<'a> {
    #[must_use]
    pub const fn new(raw: &'a str) -> Self {
        Self { raw }
    }

    #[must_use]
    pub const fn as_str(&self) -> &'a str {
        self.raw
    }

    /// The value of the last `key=value` word for `key` (later words override earlier ones).
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.raw
            .split_ascii_whitespace()
            .filter_map(|w| w.split_once('='))
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .next_back()
    }

    /// True when `flag` appears as a bare word or as `flag=1|on|yes|true`.
    #[must_use]
    pub fn flag(&self, flag: &str) -> bool {
        self.raw.split_ascii_whitespace().any(|w| w == flag)
            || matches!(self.get(flag), Some("1" | "on" | "yes" | "true"))
    }

    /// A size like `64M`, `512K`, `1G` or plain bytes.
    #[must_use]
    pub fn size(&self, key: &str) -> Option<u64> {
        parse_size(self.get(key)?)
    }
}

/// Parses `123`, `64K`, `64M`, `2G` (binary multiples). `None` on junk or overflow.
#[must_use]
pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_flags_and_overrides() {
        let c = Cmdline::new("ip=10.0.0.2/24 verbose heap=8M ktest.filter=heap heap=16M hints=off");
        assert_eq!(c.get("ip"), Some("10.0.0.2/24"));
        assert_eq!(c.get("ktest.filter"), Some("heap"));
        assert_eq!(c.size("heap"), Some(16 << 20), "the last word wins");
        assert!(c.flag("verbose"));
        assert!(!c.flag("hints"), "hints=off is not a set flag");
        assert_eq!(c.get("missing"), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("12Q"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("99999999999999G"), None, "overflow is rejected");
    }
}
