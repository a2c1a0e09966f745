//! The guest's virtio-net driver (`drivers::net::NetDevice`) reading used
//! rings a hostile or broken device writes: completions of buffers it was
//! never given, lengths beyond the buffer, frames of any size, interleaved
//! with the driver's own sends, receives and reaping.
//!
//! Input: 8-byte operations: kind, queue, id (u16), length (u32).
#![no_main]

use drivers::fake_device::replay_lying_device;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((dev, _device)) = replay_lying_device(data) {
        let _ = dev.stats();
    }
});
