//! Frame-pointer backtraces for the panic handler. Guest images are built
//! with frame pointers (`-C force-frame-pointers=yes` in the workspace's
//! `.cargo/config.toml`, and in every app made by `cargo xtask new`): each
//! frame starts with the caller's RBP, followed by the return address. The
//! walk prints return addresses only; the host, which has the ELF,
//! turns them into function names and lines (`cargo xtask` does for the
//! guests it runs).
//!
//! Code built without frame pointers (the precompiled `core`) may use RBP
//! as a plain register, so every frame pointer is checked before it is read:
//! aligned, inside memory the caller says is readable, and above the
//! previous one (stacks grow down, so callers' frames lie higher).

use core::fmt::Write;

/// Frames printed at most.
pub const MAX_FRAMES: usize = 24;

/// The prefix of each line the walk prints: `backtrace: #N 0xADDR`.
pub const LINE_PREFIX: &str = "backtrace: #";

/// Walks the chain that starts at frame pointer `fp`; `readable(addr)` says
/// whether the 16 bytes at `addr` may be read. Calls `each` with the depth
/// and return address of every frame, innermost first; returns how many.
///
/// # Safety
///
/// `readable` must only accept addresses whose 16 bytes are mapped and
/// readable by the caller.
pub unsafe fn walk(
    mut fp: u64,
    readable: impl Fn(u64) -> bool,
    mut each: impl FnMut(usize, u64),
) -> usize {
    for depth in 0..MAX_FRAMES {
        if fp == 0 || !fp.is_multiple_of(8) || !readable(fp) {
            return depth;
        }
        // SAFETY: `fp` is 8-byte aligned and the caller vouches (through
        // `readable`) that its 16 bytes are mapped and readable.
        let (next, ret) = unsafe {
            (
                core::ptr::read_volatile(fp as *const u64),
                core::ptr::read_volatile((fp + 8) as *const u64),
            )
        };
        if ret == 0 {
            return depth;
        }
        each(depth, ret);
        if next <= fp {
            return depth + 1;
        }
        fp = next;
    }
    MAX_FRAMES
}

/// Writes the backtrace from `fp` to `out`, one `backtrace: #N 0xADDR` line
/// per frame (nothing when there is no usable frame).
///
/// # Safety
///
/// As for [`walk`].
pub unsafe fn write(out: &mut impl Write, fp: u64, readable: impl Fn(u64) -> bool) {
    // SAFETY: passed through from the caller.
    unsafe {
        walk(fp, readable, |depth, ret| {
            let _ = writeln!(out, "{LINE_PREFIX}{depth} {ret:#x}");
        });
    }
}

/// The frame pointer (RBP) of the function this is inlined into.
#[cfg(target_arch = "x86_64")]
// Always inlined: a call of its own would make it return its own frame.
#[allow(clippy::inline_always)]
#[inline(always)]
#[must_use]
pub fn frame_pointer() -> u64 {
    let fp: u64;
    // SAFETY: reads RBP into a register; no memory access, no side effect.
    unsafe {
        core::arch::asm!("mov {}, rbp", out(reg) fp, options(nomem, nostack, preserves_flags));
    }
    fp
}

#[cfg(test)]
mod tests {
    use super::{MAX_FRAMES, walk, write};
    use std::string::String;
    use std::vec::Vec;

    /// A fake stack: frame i at `base + 32 * i`, pointing at frame i + 1.
    fn stack(frames: usize) -> Vec<u64> {
        let mut s = std::vec![0u64; 4 * (frames + 1)];
        let base = s.as_ptr() as u64;
        for i in 0..frames {
            let next = if i + 1 < frames {
                base + 32 * (i as u64 + 1)
            } else {
                0
            };
            s[4 * i] = next;
            s[4 * i + 1] = 0x20_1000 + i as u64;
        }
        s
    }

    #[test]
    fn the_walk_follows_the_chain_and_stops_at_its_end() {
        let s = stack(3);
        let (lo, hi) = (s.as_ptr() as u64, s.as_ptr() as u64 + 8 * s.len() as u64);
        let mut got = Vec::new();
        // SAFETY: `readable` accepts only addresses inside `s`.
        let n = unsafe { walk(lo, |a| a >= lo && a + 16 <= hi, |d, r| got.push((d, r))) };
        assert_eq!(n, 3);
        assert_eq!(got, [(0, 0x20_1000), (1, 0x20_1001), (2, 0x20_1002)]);
    }

    #[test]
    fn a_frame_pointer_outside_readable_memory_or_going_down_ends_the_walk() {
        let mut s = stack(3);
        let (lo, hi) = (s.as_ptr() as u64, s.as_ptr() as u64 + 8 * s.len() as u64);
        // Frame 1 points back at frame 0: a loop a corrupt stack could make.
        s[4] = lo;
        let mut out = String::new();
        // SAFETY: `readable` accepts only addresses inside `s`.
        unsafe { write(&mut out, lo, |a| a >= lo && a + 16 <= hi) };
        assert_eq!(out, "backtrace: #0 0x201000\nbacktrace: #1 0x201001\n");
        // Nothing is read where `readable` says no, misaligned or null.
        for fp in [0, lo + 4, hi] {
            // SAFETY: as above; the walk must not read at all here.
            let n = unsafe { walk(fp, |a| a >= lo && a + 16 <= hi, |_, _| panic!("read")) };
            assert_eq!(n, 0);
        }
    }

    #[test]
    fn a_chain_longer_than_the_cap_prints_the_cap() {
        let s = stack(MAX_FRAMES + 5);
        let (lo, hi) = (s.as_ptr() as u64, s.as_ptr() as u64 + 8 * s.len() as u64);
        // SAFETY: `readable` accepts only addresses inside `s`.
        let n = unsafe { walk(lo, |a| a >= lo && a + 16 <= hi, |_, _| {}) };
        assert_eq!(n, MAX_FRAMES);
    }
}
