//! A fixed-size line buffer for formatting without a heap (ring 0 has none,
//! and ring-3 interrupt handlers must not allocate).

/// A fixed buffer to format a line into before writing it in one go. Bytes
/// rather than a `heapless::String`: a line cut at the capacity keeps every
/// byte that fits, even if that splits a character.
pub struct LineBuf<const N: usize>(heapless::Vec<u8, N>);

impl<const N: usize> LineBuf<N> {
    #[must_use]
    pub const fn new() -> Self {
        Self(heapless::Vec::new())
    }

    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl<const N: usize> Default for LineBuf<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> core::fmt::Write for LineBuf<N> {
    /// Truncates instead of failing: a clipped log line beats a lost one.
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(N - self.0.len());
        // Cannot fail: `n` bytes fit by construction.
        self.0
            .extend_from_slice(&s.as_bytes()[..n])
            .map_err(|_| core::fmt::Error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    #[test]
    fn formats_and_truncates() {
        let mut b = LineBuf::<8>::new();
        write!(b, "{}-{}", 12, 345_678).unwrap();
        assert_eq!(b.as_bytes(), b"12-34567");
    }
}
