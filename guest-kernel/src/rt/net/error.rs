//! Why a NIC could not be opened or driven.

use crate::rt::direct_link::DirectOpenError;
use crate::rt::doorbell::DoorbellError;
use crate::rt::vmq_link::LinkOpenError;
use core::fmt;
use drivers::virtio_pci::TransportError;

#[derive(Debug)]
pub enum NetError {
    NoDevice(usize),
    Config(&'static str),
    Transport(TransportError),
    Driver(drivers::net::NetError),
    /// The device answered NO_VECTOR for a queue vector (virtio 1.2 §4.1.5.1.2).
    VectorRejected {
        rejected: u16,
    },
    NoSuchCpu(usize),
    /// Doorbells were asked for and cannot be had.
    Doorbell(DoorbellError),
    /// `net.dev=vmq`: the VM-queue link could not be opened.
    Vmq(LinkOpenError),
    /// `net.vmq_policy=direct`: the direct channel could not be opened.
    Direct(DirectOpenError),
    /// The heap could not hold `what` (counted in `Net::socket_stats`).
    OutOfMemory {
        what: &'static str,
    },
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoDevice(i) => write!(f, "no virtio-net device #{i} on the PCI bus"),
            Self::Config(m) => write!(f, "network configuration: {m}"),
            Self::Transport(e) => write!(f, "{e}"),
            Self::Driver(e) => write!(f, "{e}"),
            Self::VectorRejected { rejected } => {
                write!(f, "the device rejected {rejected} MSI-X queue vector(s)")
            }
            Self::NoSuchCpu(c) => write!(f, "no CPU {c} is online to take the NIC's interrupts"),
            Self::Doorbell(e) => write!(f, "net.notify=doorbell: {e}"),
            Self::Vmq(e) => write!(f, "net.dev=vmq: {e}"),
            Self::Direct(e) => write!(f, "net.vmq_policy=direct: {e}"),
            Self::OutOfMemory { what } => write!(
                f,
                "the heap has no room for {what}: give the guest more memory (or heap=) or use smaller buffers"
            ),
        }
    }
}

/// Why a socket operation did nothing; the `std::io::ErrorKind`s they match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketError {
    /// Nothing to read or no room to write now: poll the stack and retry
    /// (`WouldBlock`).
    WouldBlock,
    /// This side was closed, or the connection is gone (`NotConnected`).
    NotConnected,
    /// A datagram longer than the buffer given; it was dropped.
    Truncated,
    /// No usable destination: unspecified address or port 0 (`InvalidInput`).
    Unaddressable,
}

impl fmt::Display for SocketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::WouldBlock => "the operation would block: poll the stack and retry",
            Self::NotConnected => "the connection is closed",
            Self::Truncated => "the datagram was longer than the buffer and was dropped",
            Self::Unaddressable => "no usable destination address or port",
        })
    }
}
