//! The net device's TX and RX paths (`devices::net::{pop_tx, push_rx}`) on a
//! split virtqueue whose descriptor table, available ring and buffers are all
//! fuzzer bytes: the guest controls every one of them.
//!
//! Input: byte 0 picks the queue size, byte 1 how many chains to pop and
//! whether they go to TX or RX; the rest is copied over guest memory from 0
//! (descriptor table at 0, available ring at 0x1000, used ring at 0x2000).
#![no_main]

use host_shim::devices::net::{MAX_FRAME, pop_tx, push_rx};
use host_shim::kvm::memory::GuestMem;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const MEM: usize = 0x1_0000;

fuzz_target!(|data: &[u8]| {
    let Some((&[size_sel, ops], rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM)]).expect("anonymous guest memory");
    let n = rest.len().min(MEM);
    mem.write_slice(&rest[..n], GuestAddress(0))
        .expect("in range");

    let mut q = Queue::new(256).expect("valid max size");
    q.set_size(1 << (size_sel % 9));
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x1000), Some(0));
    q.set_used_ring_address(Some(0x2000), Some(0));
    q.set_ready(true);
    if !q.is_valid(&mem) {
        return;
    }
    let frame = [0x5Au8; 1514];
    // Bounded: at most 64 chains per input, as the worker stops at an empty queue.
    for i in 0..(ops % 64) {
        let tx = (ops >> 6) & 1 == 0 || i % 2 == 0;
        let popped = if tx {
            pop_tx(&mut q, &mem).map(|(head, r)| {
                if let Ok(f) = &r {
                    assert!(f.len() <= MAX_FRAME, "frame longer than the device's bound");
                }
                (head, 0)
            })
        } else {
            push_rx(&mut q, &mem, &frame[..usize::from(size_sel) * 5 + 14])
                .map(|(head, r)| (head, r.unwrap_or(0)))
        };
        let Some((head, len)) = popped else { break };
        // The worker returns every chain, refused or not.
        let _ = q.add_used(&mem, head, len);
        let _ = q.needs_notification(&mem);
    }
});
