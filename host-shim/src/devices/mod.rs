//! Device backends behind the virtio-pci transport.

pub mod net;
