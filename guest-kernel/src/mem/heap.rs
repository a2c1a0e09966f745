//! The frame allocator over the boot memory map, and the heap on top of it.
//! Both are ring-3 bookkeeping; the memory is user-accessible.

use super::FRAME_SIZE;
use super::frames::{FrameAllocator, bitmap_words};
use crate::abi::USER_END;
use crate::pvh::{MemmapEntry, PhysRange, usable_ranges};
use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Physical frames for everyone after boot (DMA rings, buffers, stacks).
pub static FRAMES: spin::Mutex<Option<FrameAllocator<'static>>> = spin::Mutex::new(None);

/// What [`init`] set up.
#[derive(Clone, Copy, Debug)]
pub struct MemoryInfo {
    pub usable_bytes: u64,
    pub heap_start: u64,
    pub heap_bytes: u64,
    pub frames_free: usize,
    pub ranges_dropped: usize,
}

/// Builds the frame allocator from the RAM above `image_end`, then takes
/// `heap_bytes` (or a default: a quarter of RAM, at most 64 MiB) for the heap.
pub fn init(
    memmap: &[MemmapEntry],
    image_end: u64,
    heap_bytes: Option<u64>,
) -> Result<MemoryInfo, &'static str> {
    let (ranges, dropped) = usable_ranges::<32>(memmap, image_end, USER_END);
    let ranges = ranges.as_slice();
    let (first, last) = match (ranges.first(), ranges.last()) {
        (Some(f), Some(l)) => (f.start, l.end),
        _ => return Err("the memory map has no RAM above the kernel image"),
    };
    let frames = ((last - first) / FRAME_SIZE) as usize;
    let words = bitmap_words(frames);
    let bitmap_bytes = (words as u64 * 8).next_multiple_of(FRAME_SIZE);
    let home = ranges
        .iter()
        .find(|r| r.len() >= bitmap_bytes)
        .ok_or("no RAM range can hold the frame bitmap")?;
    // SAFETY: `home` is usable RAM nobody else owns yet, identity-mapped and
    // writable from ring 3, and large enough for `words` u64s.
    let bitmap = unsafe { core::slice::from_raw_parts_mut(home.start as *mut u64, words) };
    let mut fa =
        FrameAllocator::new(first, frames, bitmap).map_err(|_| "frame allocator set-up failed")?;
    for r in ranges {
        let r = if r.start == home.start {
            PhysRange {
                start: r.start + bitmap_bytes,
                end: r.end,
            }
        } else {
            *r
        };
        fa.release(r)
            .map_err(|_| "memory map range outside the allocator span")?;
    }
    let usable: u64 = ranges.iter().map(PhysRange::len).sum();
    let heap_bytes = heap_bytes
        .unwrap_or((usable / 4).min(64 << 20))
        .next_multiple_of(FRAME_SIZE);
    let heap_frames = (heap_bytes / FRAME_SIZE) as usize;
    let heap_start = fa
        .alloc(heap_frames, 1)
        .ok_or("not enough contiguous RAM for the heap")?;
    // SAFETY: the frames were just allocated for the heap and are never used otherwise.
    unsafe { HEAP.lock().init(heap_start as *mut u8, heap_bytes as usize) };
    let info = MemoryInfo {
        usable_bytes: usable,
        heap_start,
        heap_bytes,
        frames_free: fa.free_frames(),
        ranges_dropped: dropped,
    };
    *FRAMES.lock() = Some(fa);
    Ok(info)
}

/// Allocates `count` contiguous frames aligned to `align` frames.
#[must_use]
pub fn alloc_frames(count: usize, align: usize) -> Option<u64> {
    FRAMES.lock().as_mut()?.alloc(count, align)
}

/// Returns frames from [`alloc_frames`].
pub fn free_frames(addr: u64, count: usize) -> Result<(), super::frames::FrameError> {
    match FRAMES.lock().as_mut() {
        Some(fa) => fa.free(addr, count),
        None => Err(super::frames::FrameError::OutOfRange { addr, count }),
    }
}

/// Free and total frames.
#[must_use]
pub fn frame_stats() -> (usize, usize) {
    FRAMES
        .lock()
        .as_ref()
        .map_or((0, 0), |fa| (fa.free_frames(), fa.total_frames()))
}

/// Heap bytes in use and free.
#[must_use]
pub fn heap_stats() -> (usize, usize) {
    let h = HEAP.lock();
    (h.used(), h.free())
}
