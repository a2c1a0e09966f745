//! The guest's virtio-net driver (`drivers::net::NetDevice`) reading used
//! rings a hostile or broken device writes: completions of buffers it was
//! never given, lengths beyond the buffer, frames of any size, interleaved
//! with the driver's own sends, receives and reaping.
//!
//! Input: 8-byte operations: kind, queue, id (u16), length (u32).
#![no_main]

use drivers::fake_device::{FakeNet, TestHal};
use drivers::net::{NetDevice, RxMode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (transport, device) = FakeNet::new();
    let mode = if data.first().is_some_and(|b| b & 1 == 0) {
        RxMode::Poll
    } else {
        RxMode::Interrupt
    };
    let Ok(mut dev) = NetDevice::<TestHal, _>::new(transport, mode) else {
        return;
    };
    let payload = [0xA5u8; 2048];
    for op in data.chunks_exact(8).take(512) {
        let id = u16::from_le_bytes([op[2], op[3]]);
        let len = u32::from_le_bytes([op[4], op[5], op[6], op[7]]);
        match op[0] % 6 {
            // A completion the device makes up.
            0 => device.push_used(usize::from(op[1] & 1), id, len),
            // A frame in the next posted RX buffer, claiming any length.
            1 => {
                let n = usize::from(id) % payload.len();
                let _ = device.deliver(&payload[..n], len as usize % 0x1_0000);
            }
            2 => {
                let _ = dev.receive();
            }
            3 => {
                let n = usize::from(id) % 1600;
                let _ = dev.send(&payload[..n]);
            }
            4 => {
                let _ = dev.reap_tx();
                let _ = dev.rx_pending();
            }
            _ => {
                let _ = device.complete_tx(usize::from(op[1]));
            }
        }
    }
    let _ = dev.stats();
});
