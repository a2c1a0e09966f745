//! UDP the way `std::net::UdpSocket` offers it, on a poll-driven stack:
//! `send_to` queues a datagram for the next poll, `recv_from` takes one that
//! arrived, and neither blocks ([`SocketError::WouldBlock`] instead).

use super::error::{NetError, SocketError};
use super::sockets::{Sockets, try_udp_socket};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::udp;
use smoltcp::wire::IpEndpoint;

/// How a [`UdpSocket`] sizes its buffers: `packets` datagrams of at most
/// `max_datagram` bytes each way, allocated at bind
/// (`2 × packets × max_datagram` bytes of heap; 96 KiB with the defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpOptions {
    pub packets: usize,
    pub max_datagram: usize,
}

impl Default for UdpOptions {
    /// 32 datagrams of up to 1,536 bytes (an Ethernet frame's worth) each way.
    fn default() -> Self {
        Self {
            packets: 32,
            max_datagram: 1536,
        }
    }
}

/// A UDP port.
#[derive(Debug)]
#[must_use = "a socket keeps its buffers until closed"]
pub struct UdpSocket {
    handle: SocketHandle,
    port: u16,
}

impl UdpSocket {
    /// Binds `port` on every address of the stack.
    ///
    /// # Errors
    /// [`NetError::Config`] for port 0 or empty buffers,
    /// [`NetError::OutOfMemory`] when the heap cannot hold the buffers.
    pub fn bind(
        net: &mut impl AsMut<Sockets>,
        port: u16,
        opts: UdpOptions,
    ) -> Result<Self, NetError> {
        if port == 0 {
            return Err(NetError::Config("cannot bind UDP port 0"));
        }
        if opts.packets == 0 || opts.max_datagram == 0 {
            return Err(NetError::Config("UDP buffers must not be empty"));
        }
        let sockets = net.as_mut();
        let Some(mut s) = try_udp_socket(opts.packets, opts.max_datagram) else {
            sockets.count_out_of_memory();
            return Err(NetError::OutOfMemory {
                what: "a UDP socket's buffers",
            });
        };
        s.bind(port)
            .map_err(|_| NetError::Config("smoltcp refused the UDP port"))?;
        Ok(Self {
            handle: sockets.set.add(s),
            port,
        })
    }

    fn socket<'a>(&self, net: &'a mut impl AsMut<Sockets>) -> &'a mut udp::Socket<'static> {
        net.as_mut().set.get_mut::<udp::Socket>(self.handle)
    }

    /// The oldest datagram that arrived, copied into `buf`, and its sender.
    ///
    /// # Errors
    /// [`SocketError::WouldBlock`] when none is waiting;
    /// [`SocketError::Truncated`] when it was longer than `buf` (it is
    /// dropped, as smoltcp does).
    pub fn recv_from(
        &mut self,
        net: &mut impl AsMut<Sockets>,
        buf: &mut [u8],
    ) -> Result<(usize, IpEndpoint), SocketError> {
        match self.socket(net).recv_slice(buf) {
            Ok((n, meta)) => Ok((n, meta.endpoint)),
            Err(udp::RecvError::Exhausted) => Err(SocketError::WouldBlock),
            Err(udp::RecvError::Truncated) => Err(SocketError::Truncated),
        }
    }

    /// Queues `buf` as one datagram to `to`; it leaves with the next poll.
    ///
    /// # Errors
    /// [`SocketError::WouldBlock`] when the send buffer is full (or `buf` is
    /// larger than the buffer can ever hold: check `max_datagram`),
    /// [`SocketError::Unaddressable`] for an unspecified address or port 0.
    pub fn send_to(
        &mut self,
        net: &mut impl AsMut<Sockets>,
        buf: &[u8],
        to: IpEndpoint,
    ) -> Result<(), SocketError> {
        match self.socket(net).send_slice(buf, to) {
            Ok(()) => Ok(()),
            Err(udp::SendError::BufferFull) => Err(SocketError::WouldBlock),
            Err(udp::SendError::Unaddressable) => Err(SocketError::Unaddressable),
        }
    }

    #[must_use]
    pub fn local_port(&self) -> u16 {
        self.port
    }

    /// Unbinds the port and frees the buffers (queued datagrams not yet sent are lost).
    pub fn close(self, net: &mut impl AsMut<Sockets>) {
        net.as_mut().set.remove(self.handle);
    }
}
