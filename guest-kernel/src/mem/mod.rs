//! Physical memory: the frame allocator (pure logic, host-tested) and, in the
//! guest, the kernel heap built on it.

pub mod frames;
#[cfg(target_os = "none")]
pub mod heap;

/// The size of a page frame.
pub const FRAME_SIZE: u64 = 4096;
