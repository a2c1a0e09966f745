//! The UDP ping-pong protocol (its RTT percentiles come from
//! `para_abi::report`, the definition the host uses too).
//!
//! A ping is `[magic u32][seq u64][padding]`; the server echoes it unchanged.
//! The client ends the run with a datagram holding [`BYE`], which makes the
//! server exit.

use alloc::vec::Vec;

pub const PORT: u16 = 7777;
pub const MAGIC: u32 = 0x5049_4E47; // "PING"
pub const HEADER_LEN: usize = 12;
/// Labels of the `StatsMark` hypercalls around the steady state (the shim
/// snapshots the guest's KVM exits at each): the client marks the start and the
/// end of its timed pings, the server its first datagram and the last bye.
/// Exits between them, per packet, leave out boot and teardown.
pub const MARK_BEGIN: u64 = 0x7070_0001;
pub const MARK_END: u64 = 0x7070_0002;

pub const BYE: &[u8] = b"exitless-pingpong-bye";

/// Builds a ping of `size` bytes (at least [`HEADER_LEN`]).
#[must_use]
pub fn encode(seq: u64, size: usize) -> Vec<u8> {
    let mut p = alloc::vec![0u8; size.max(HEADER_LEN)];
    p[..4].copy_from_slice(&MAGIC.to_le_bytes());
    p[4..12].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in p[HEADER_LEN..].iter_mut().enumerate() {
        *b = (i as u8) ^ (seq as u8);
    }
    p
}

/// The sequence number of a well-formed ping, `None` for anything else.
#[must_use]
pub fn decode(p: &[u8]) -> Option<u64> {
    if p.len() < HEADER_LEN || p[..4] != MAGIC.to_le_bytes() {
        return None;
    }
    let seq = u64::from_le_bytes(p[4..12].try_into().ok()?);
    let body_ok = p[HEADER_LEN..]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == (i as u8) ^ (seq as u8));
    body_ok.then_some(seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_round_trip_and_corruption_is_caught() {
        let p = encode(42, 64);
        assert_eq!(p.len(), 64);
        assert_eq!(decode(&p), Some(42));
        let mut bad = p.clone();
        bad[40] ^= 1;
        assert_eq!(decode(&bad), None, "payload corruption");
        assert_eq!(decode(&p[..8]), None, "short");
        assert_eq!(decode(BYE), None);
        assert_eq!(
            encode(1, 4).len(),
            HEADER_LEN,
            "size is at least the header"
        );
    }
}
