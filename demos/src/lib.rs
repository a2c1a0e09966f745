//! Unikernel applications on the Exitless guest kernel, and the pieces of
//! them that are plain logic (tested on the host).
#![no_std]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod http;
pub mod pingpong;
