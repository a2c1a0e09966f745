//! Guest drivers. The virtio-pci transport, virtio-net and the smoltcp adapter
//! arrive with the driver-stack issue; this crate holds their place in the
//! dependency graph (`guest-kernel` → `drivers` → `para-abi`).
#![no_std]
