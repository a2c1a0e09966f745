//! The marker pattern of the `hostile` leg's isolation check.
//!
//! Victim guests fill pages of their memory with a pattern derived from a
//! 64-bit marker that only the test knows (it is on their command lines and
//! on the attacker's), and check the pages are intact at the end; the
//! attacking guest scans every page it can read and every frame it receives
//! for the pattern. The pattern is a whole page, word `i` being
//! `marker ^ (i * STRIDE)`, so a stray copy of the marker itself (the
//! attacker's own variables hold it) never looks like a victim's page; a
//! frame, which need not be aligned, matches on [`PROBE_WORDS`] consecutive
//! words at any offset.

/// Words of a 4 KiB page.
pub const PAGE_WORDS: usize = 512;
/// Consecutive pattern words that make a match in unaligned data.
pub const PROBE_WORDS: usize = 4;
const STRIDE: u64 = 0x9E37_79B9_7F4A_7C15;

/// Word `i` of the pattern.
#[must_use]
pub const fn word(marker: u64, i: usize) -> u64 {
    marker ^ (i as u64).wrapping_mul(STRIDE)
}

/// Writes the pattern into `page`.
pub fn fill(page: &mut [u64; PAGE_WORDS], marker: u64) {
    for (i, w) in page.iter_mut().enumerate() {
        *w = word(marker, i);
    }
}

/// True when `page` holds the whole pattern.
#[must_use]
pub fn intact(page: &[u64; PAGE_WORDS], marker: u64) -> bool {
    page.iter().enumerate().all(|(i, &w)| w == word(marker, i))
}

/// True when a page read word by word through `read` starts with the
/// pattern (its first [`PROBE_WORDS`] words): enough to tell a victim's page
/// from anything else.
pub fn page_matches(marker: u64, mut read: impl FnMut(usize) -> u64) -> bool {
    (0..PROBE_WORDS).all(|i| read(i) == word(marker, i))
}

/// Where in `bytes` (any alignment) [`PROBE_WORDS`] consecutive words of the
/// pattern start, beginning with any word of it; `None` when nowhere.
#[must_use]
pub fn find_in_bytes(bytes: &[u8], marker: u64) -> Option<usize> {
    let need = PROBE_WORDS * 8;
    if bytes.len() < need {
        return None;
    }
    let at = |off: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[off..off + 8]);
        u64::from_le_bytes(b)
    };
    (0..=bytes.len() - need).find(|&off| {
        let first = at(off);
        // Which word of the pattern is this (if any)? Then the next ones follow.
        (0..PAGE_WORDS).any(|k| {
            first == word(marker, k)
                && (1..PROBE_WORDS).all(|j| at(off + 8 * j) == word(marker, (k + j) % PAGE_WORDS))
        })
    })
}

/// Parses a marker given as hexadecimal (`0x` optional).
#[must_use]
pub fn parse(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 0x1234_5678_9ABC_DEF0;

    #[test]
    fn a_filled_page_is_intact_and_matches_and_a_changed_one_is_not() {
        let mut p = [0u64; PAGE_WORDS];
        assert!(!intact(&p, M));
        fill(&mut p, M);
        assert!(intact(&p, M));
        assert!(page_matches(M, |i| p[i]));
        assert!(!page_matches(M ^ 1, |i| p[i]), "another marker");
        p[300] ^= 1;
        assert!(!intact(&p, M));
    }

    #[test]
    fn the_bare_marker_is_not_a_match() {
        let mut b = std::vec![0u8; 256];
        b[40..48].copy_from_slice(&M.to_le_bytes());
        b[48..56].copy_from_slice(&M.to_le_bytes());
        assert_eq!(find_in_bytes(&b, M), None);
        assert!(!page_matches(M, |i| if i == 0 { M } else { 0 }));
    }

    #[test]
    fn a_piece_of_a_page_is_found_at_any_offset() {
        let mut p = [0u64; PAGE_WORDS];
        fill(&mut p, M);
        let bytes: std::vec::Vec<u8> = p.iter().flat_map(|w| w.to_le_bytes()).collect();
        for (start, shift) in [(0usize, 0usize), (8 * 100, 3), (8 * 509, 7)] {
            let mut frame = std::vec![0xAAu8; shift];
            frame.extend_from_slice(&bytes[start..(start + 64).min(bytes.len())]);
            let len = frame.len();
            let found = find_in_bytes(&frame, M);
            if len - shift >= PROBE_WORDS * 8 {
                assert_eq!(found, Some(shift), "piece at word {}", start / 8);
            }
        }
        assert_eq!(find_in_bytes(&bytes[..31], M), None, "too short");
    }

    #[test]
    fn markers_parse_with_or_without_0x() {
        assert_eq!(parse("0xff"), Some(255));
        assert_eq!(parse("DEADbeef"), Some(0xDEAD_BEEF));
        assert_eq!(parse("zz"), None);
    }
}
