//! Devices: the virtio-net backend, the COM1 console, the in-process L2 switch
//! the guests' NICs share, and the host TAP port on that switch.

pub mod net;
pub mod serial;
pub mod switch;
pub mod tap;
