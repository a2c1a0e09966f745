//! The heap and the frame allocator.

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use guest_kernel::mem::{FRAME_SIZE, heap};
use guest_kernel::pvh::E820_RAM;
use guest_kernel::{check, check_eq, ktest};

ktest!(
    fn heap_vec_box_btreemap() {
        let mut v: Vec<u64> = (0..10_000).collect();
        v.retain(|x| x % 3 == 0);
        check_eq!(v.len(), 3334);
        check_eq!(
            v.iter().sum::<u64>(),
            (0..10_000u64).filter(|x| x % 3 == 0).sum::<u64>()
        );
        let b = Box::new([7u8; 4096]);
        check!(b.iter().all(|&x| x == 7));
        let mut m = BTreeMap::new();
        for i in 0..1000u32 {
            m.insert(i.wrapping_mul(2_654_435_761), i);
        }
        check_eq!(m.len(), 1000);
        check!(
            m.keys().zip(m.keys().skip(1)).all(|(a, b)| a < b),
            "BTreeMap keys are ordered"
        );
        Ok(())
    }
);

ktest!(
    fn heap_large_allocation_and_reuse() {
        let (used_before, _) = heap::heap_stats();
        let big = alloc::vec![0xA5u8; 8 << 20];
        check!(big.iter().step_by(4096).all(|&x| x == 0xA5));
        let (used_during, _) = heap::heap_stats();
        check!(
            used_during >= used_before + (8 << 20),
            "8 MiB shows up as used"
        );
        drop(big);
        let (used_after, _) = heap::heap_stats();
        check_eq!(used_after, used_before);
        Ok(())
    }
);

/// True when every byte of `[addr, addr+len)` is RAM in the boot memory map.
fn in_ram(addr: u64, len: u64) -> bool {
    let blob = guest_kernel::arch::bootinfo::get();
    blob.memmap()
        .iter()
        .any(|e| e.kind == E820_RAM && e.addr <= addr && addr + len <= e.addr + e.size)
}

ktest!(
    fn frames_distinct_aligned_in_ram_and_reusable() {
        let (free0, total) = heap::frame_stats();
        check!(total > 0 && free0 > 64, "free {free0} of {total}");
        let frames: Vec<u64> = (0..64)
            .map(|_| heap::alloc_frames(1, 1))
            .collect::<Option<_>>()
            .ok_or("out of frames")?;
        let mut sorted = frames.clone();
        sorted.sort_unstable();
        sorted.dedup();
        check_eq!(sorted.len(), 64);
        for &f in &frames {
            check!(
                f % FRAME_SIZE == 0 && in_ram(f, FRAME_SIZE),
                "frame {f:#x} aligned and in RAM"
            );
            // The frame is usable memory: write and read it back.
            // SAFETY: the frame was just allocated to this test.
            unsafe {
                core::ptr::write_volatile(f as *mut u64, f);
                check_eq!(core::ptr::read_volatile(f as *const u64), f);
            }
        }
        let run = heap::alloc_frames(16, 16).ok_or("no 16-frame run")?;
        check!(
            run % (16 * FRAME_SIZE) == 0 && in_ram(run, 16 * FRAME_SIZE),
            "run {run:#x}"
        );
        check_eq!(heap::frame_stats().0, free0 - 80);
        for &f in &frames {
            heap::free_frames(f, 1).map_err(|e| alloc::format!("{e:?}"))?;
        }
        heap::free_frames(run, 16).map_err(|e| alloc::format!("{e:?}"))?;
        check!(heap::free_frames(run, 1).is_err(), "double free is refused");
        check_eq!(heap::frame_stats().0, free0);
        Ok(())
    }
);
