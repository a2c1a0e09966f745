//! The guest's reading of what peers send over VM queues (M5): inbox entries
//! (`vmq::Arrival::decode`), the shim-written header and directory
//! (`Header::decode`, `DirRecord::decode`), and the frames a peer's messages
//! carry as the VM-queue NIC (`drivers::vmq_net::VmqNet::receive`) takes them.
//!
//! Input: 2-byte frame lengths and frame bytes, read in turn; the whole input
//! is also decoded as inbox entries, header and directory records.
#![no_main]

use std::collections::VecDeque;

use drivers::vmq_net::{FrameLink, LinkError, VmqNet};
use libfuzzer_sys::fuzz_target;
use para_abi::vmq::{Arrival, DIR_RECORD_SIZE, DirRecord, ENTRY_SIZE, HEADER_SIZE, Header};

/// Frames as a peer left them in the inbox, in order.
struct Inbox(VecDeque<Vec<u8>>);

impl FrameLink for Inbox {
    fn send(&mut self, _: &[u8]) -> Result<(), LinkError> {
        Err(LinkError::Full)
    }
    fn recv<R>(&mut self, take: impl FnOnce(&[u8]) -> R) -> Option<R> {
        self.0.pop_front().map(|f| take(&f))
    }
    fn rx_pending(&self) -> bool {
        !self.0.is_empty()
    }
}

fuzz_target!(|data: &[u8]| {
    for chunk in data.chunks_exact(ENTRY_SIZE) {
        let a = Arrival::decode(chunk.try_into().unwrap());
        assert_eq!(
            Arrival::decode(&a.encode()),
            a,
            "arrival encoding round trip"
        );
    }
    for chunk in data.chunks_exact(DIR_RECORD_SIZE) {
        let r = DirRecord::decode(chunk.try_into().unwrap());
        let _ = r.is(std::str::from_utf8(r.name_bytes()).unwrap_or("x"));
    }
    if let Some(h) = data.first_chunk::<HEADER_SIZE>() {
        let _ = Header::decode(h);
    }
    let mut frames = VecDeque::new();
    let mut rest = data;
    while let Some((len, tail)) = rest.split_first_chunk::<2>() {
        // Lengths up to 64 KiB: beyond any frame the NIC accepts.
        let n = usize::from(u16::from_le_bytes(*len)).min(tail.len());
        frames.push_back(tail[..n].to_vec());
        rest = &tail[n..];
    }
    let count = frames.len();
    let mut nic = VmqNet::new(Inbox(frames), [2, 0x51, 0, 0, 0, 1]);
    let mut taken = 0;
    while let Some(frame) = nic.receive() {
        assert!(
            (14..=1514).contains(&frame.len()),
            "frame of {} bytes",
            frame.len()
        );
        taken += 1;
    }
    let s = nic.stats();
    assert_eq!(
        taken + s.rx_dropped_short + s.rx_dropped_oversize,
        count as u64,
        "every arrival is taken or counted"
    );
});
