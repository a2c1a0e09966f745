//! Unikernel applications on the Exitless guest kernel, and the pieces of
//! them that are plain logic (tested on the host).
#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

/// Exit status of a demo that refuses its configuration or device (it says
/// why on the console first).
pub const APP_ERROR: i32 = guest_kernel::abi::status::APP_ERROR as i32;

#[cfg(target_os = "none")]
pub mod hostile;
pub mod http;
pub mod marker;
pub mod pingpong;
