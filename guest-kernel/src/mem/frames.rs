//! A bitmap physical-frame allocator. One bit per 4 KiB frame (set = in use),
//! so 256 MiB of RAM costs 8 KiB of bitmap. It hands out runs of contiguous,
//! aligned frames because virtqueues and DMA buffers need them.

use super::FRAME_SIZE;
use crate::pvh::PhysRange;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The bitmap is too small for the frames it must describe.
    BitmapTooSmall {
        needed_words: usize,
        have_words: usize,
    },
    /// An address or count outside the managed span, or not frame-aligned.
    OutOfRange { addr: u64, count: usize },
    /// Freeing a frame that is not allocated.
    DoubleFree { addr: u64 },
}

pub struct FrameAllocator<'a> {
    base: u64,
    frames: usize,
    bitmap: &'a mut [u64],
    free: usize,
    hint: usize,
}

impl core::fmt::Debug for FrameAllocator<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FrameAllocator")
            .field("base", &format_args!("{:#x}", self.base))
            .field("frames", &self.frames)
            .field("free", &self.free)
            .finish_non_exhaustive()
    }
}

/// Words of bitmap needed for `frames` frames.
#[must_use]
pub const fn bitmap_words(frames: usize) -> usize {
    frames.div_ceil(64)
}

impl<'a> FrameAllocator<'a> {
    /// Manages `frames` frames starting at `base` (frame-aligned), all in use
    /// until [`Self::release`] marks ranges free.
    pub fn new(base: u64, frames: usize, bitmap: &'a mut [u64]) -> Result<Self, FrameError> {
        let needed_words = bitmap_words(frames);
        if bitmap.len() < needed_words {
            return Err(FrameError::BitmapTooSmall {
                needed_words,
                have_words: bitmap.len(),
            });
        }
        if !base.is_multiple_of(FRAME_SIZE) {
            return Err(FrameError::OutOfRange {
                addr: base,
                count: frames,
            });
        }
        bitmap.fill(u64::MAX);
        Ok(Self {
            base,
            frames,
            bitmap,
            free: 0,
            hint: 0,
        })
    }

    #[must_use]
    pub const fn free_frames(&self) -> usize {
        self.free
    }

    #[must_use]
    pub const fn total_frames(&self) -> usize {
        self.frames
    }

    /// The managed span.
    #[must_use]
    pub const fn span(&self) -> PhysRange {
        PhysRange {
            start: self.base,
            end: self.base + self.frames as u64 * FRAME_SIZE,
        }
    }

    fn index_of(&self, addr: u64, count: usize) -> Result<usize, FrameError> {
        let err = FrameError::OutOfRange { addr, count };
        if !addr.is_multiple_of(FRAME_SIZE) || addr < self.base {
            return Err(err);
        }
        let idx = usize::try_from((addr - self.base) / FRAME_SIZE).map_err(|_| err)?;
        match idx.checked_add(count) {
            Some(end) if end <= self.frames => Ok(idx),
            _ => Err(err),
        }
    }

    fn is_used(&self, i: usize) -> bool {
        self.bitmap[i / 64] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, i: usize, used: bool) {
        if used {
            self.bitmap[i / 64] |= 1 << (i % 64);
        } else {
            self.bitmap[i / 64] &= !(1 << (i % 64));
        }
    }

    /// Marks the frames of `range` (rounded inwards to frames) free.
    pub fn release(&mut self, range: PhysRange) -> Result<(), FrameError> {
        let start = range.start.next_multiple_of(FRAME_SIZE);
        let end = range.end & !(FRAME_SIZE - 1);
        if end <= start {
            return Ok(());
        }
        let count = ((end - start) / FRAME_SIZE) as usize;
        let first = self.index_of(start, count)?;
        for i in first..first + count {
            if self.is_used(i) {
                self.set(i, false);
                self.free += 1;
            }
        }
        Ok(())
    }

    /// Allocates `count` contiguous frames whose first frame number is a
    /// multiple of `align` (a power of two, in frames). First fit from a moving
    /// hint, then once more from the bottom.
    pub fn alloc(&mut self, count: usize, align: usize) -> Option<u64> {
        if count == 0 || count > self.free || !align.is_power_of_two() {
            return None;
        }
        let hint = self.hint.min(self.frames);
        let first = self
            .find_run(hint, self.frames, count, align)
            .or_else(|| self.find_run(0, hint, count, align))?;
        for j in first..first + count {
            self.set(j, true);
        }
        self.free -= count;
        self.hint = first + count;
        Some(self.base + first as u64 * FRAME_SIZE)
    }

    /// The first free, aligned run of `count` frames starting in `[from, to)`.
    fn find_run(&self, from: usize, to: usize, count: usize, align: usize) -> Option<usize> {
        let align_base = (self.base / FRAME_SIZE) as usize;
        let mut i = from;
        while i < to && i + count <= self.frames {
            let aligned = (align_base + i).next_multiple_of(align) - align_base;
            if aligned != i {
                i = aligned;
                continue;
            }
            match (i..i + count).find(|&j| self.is_used(j)) {
                Some(used) => i = used + 1,
                None => return Some(i),
            }
        }
        None
    }

    /// Returns `count` frames starting at `addr`. Every frame must be allocated.
    pub fn free(&mut self, addr: u64, count: usize) -> Result<(), FrameError> {
        let first = self.index_of(addr, count)?;
        if let Some(i) = (first..first + count).find(|&i| !self.is_used(i)) {
            return Err(FrameError::DoubleFree {
                addr: self.base + i as u64 * FRAME_SIZE,
            });
        }
        for i in first..first + count {
            self.set(i, false);
        }
        self.free += count;
        self.hint = self.hint.min(first);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::vec;
    use std::vec::Vec;

    const BASE: u64 = 0x40_0000;

    fn allocator(bitmap: &mut [u64], frames: usize) -> FrameAllocator<'_> {
        let mut a = FrameAllocator::new(BASE, frames, bitmap).unwrap();
        a.release(PhysRange {
            start: BASE,
            end: BASE + frames as u64 * FRAME_SIZE,
        })
        .unwrap();
        a
    }

    #[test]
    fn starts_all_used_and_release_counts_frames() {
        let mut bm = vec![0u64; 2];
        let mut a = FrameAllocator::new(BASE, 100, &mut bm).unwrap();
        assert_eq!(a.free_frames(), 0);
        assert_eq!(a.alloc(1, 1), None);
        a.release(PhysRange {
            start: BASE + 0x800,
            end: BASE + 0x5000,
        })
        .unwrap();
        assert_eq!(a.free_frames(), 4, "partial first frame is not released");
    }

    #[test]
    fn allocations_are_distinct_aligned_and_inside() {
        let mut bm = vec![0u64; 4];
        let mut a = allocator(&mut bm, 200);
        let mut seen = HashSet::new();
        for _ in 0..50 {
            let f = a.alloc(1, 1).unwrap();
            assert!((BASE..BASE + 200 * FRAME_SIZE).contains(&f));
            assert!(seen.insert(f), "frame {f:#x} handed out twice");
        }
        let run = a.alloc(8, 8).unwrap();
        assert_eq!(run % (8 * FRAME_SIZE), 0, "8-frame alignment");
        for k in 0..8 {
            assert!(!seen.contains(&(run + k * FRAME_SIZE)));
        }
        assert_eq!(a.free_frames(), 200 - 58);
    }

    #[test]
    fn free_then_reuse_and_double_free_is_caught() {
        let mut bm = vec![0u64; 1];
        let mut a = allocator(&mut bm, 10);
        let all: Vec<u64> = (0..10).map(|_| a.alloc(1, 1).unwrap()).collect();
        assert_eq!(a.alloc(1, 1), None, "exhausted");
        a.free(all[3], 1).unwrap();
        assert_eq!(a.alloc(1, 1), Some(all[3]));
        a.free(all[5], 1).unwrap();
        assert_eq!(
            a.free(all[5], 1),
            Err(FrameError::DoubleFree { addr: all[5] })
        );
        assert!(matches!(
            a.free(BASE + 10 * FRAME_SIZE, 1),
            Err(FrameError::OutOfRange { .. })
        ));
        assert!(matches!(
            a.free(BASE + 1, 1),
            Err(FrameError::OutOfRange { .. })
        ));
    }

    #[test]
    fn contiguous_run_skips_holes_and_wraps() {
        let mut bm = vec![0u64; 1];
        let mut a = allocator(&mut bm, 16);
        let frames: Vec<u64> = (0..16).map(|_| a.alloc(1, 1).unwrap()).collect();
        // Free frames 2..5 and 9..13: a run of 4 must come from 9..13 if 2..5 has a hole.
        for i in [2, 3, 4, 9, 10, 11, 12] {
            a.free(frames[i], 1).unwrap();
        }
        let run = a.alloc(4, 1).unwrap();
        assert_eq!(run, frames[9]);
        let run3 = a.alloc(3, 1).unwrap();
        assert_eq!(run3, frames[2], "wrapped back to the hole below the hint");
        assert_eq!(a.alloc(1, 1), None);
    }

    #[test]
    fn bitmap_too_small_and_unaligned_base_are_errors() {
        let mut bm = vec![0u64; 1];
        assert_eq!(
            FrameAllocator::new(BASE, 65, &mut bm).unwrap_err(),
            FrameError::BitmapTooSmall {
                needed_words: 2,
                have_words: 1
            }
        );
        assert!(FrameAllocator::new(BASE + 1, 10, &mut bm).is_err());
    }

    #[test]
    fn bad_requests_return_none() {
        let mut bm = vec![0u64; 1];
        let mut a = allocator(&mut bm, 8);
        assert_eq!(a.alloc(0, 1), None);
        assert_eq!(a.alloc(9, 1), None);
        assert_eq!(a.alloc(1, 3), None, "alignment must be a power of two");
    }
}
