//! TCP the way `std::net` offers it, on a poll-driven stack: a
//! [`TcpListener`] that accepts many connections on one port and the
//! [`TcpStream`]s it hands out. Nothing blocks: where std would wait,
//! these return [`SocketError::WouldBlock`] and the caller polls the stack
//! (`Net::poll`, `Net::wait`) and tries again.
//!
//! Every method takes the stack (`&mut net`, anything that is
//! `AsMut<Sockets>`): the sockets live in it, and a handle cannot borrow it
//! for its whole life while the application holds many of them.

use super::error::{NetError, SocketError};
use super::sockets::{
    ConnectFailure, ListenFailure, ListenerId, ListenerStats, Sockets, TcpOptions,
};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use smoltcp::wire::IpEndpoint;

/// A TCP port accepting connections: a backlog of listening sockets that the
/// stack re-arms after every received frame, so that a burst of clients is
/// not refused (see [`TcpOptions`] for sizes and limits).
///
/// ```ignore
/// let listener = TcpListener::bind(&mut net, 7, TcpOptions::default())?;
/// let mut streams = Vec::new();
/// loop {
///     net.poll();
///     while let Ok(s) = listener.accept(&mut net) {
///         streams.push(s);
///     }
///     // ... read and write each stream, close the finished ones ...
///     net.poll_wait(None);
/// }
/// ```
#[derive(Debug)]
#[must_use = "a listener keeps its sockets until closed"]
pub struct TcpListener {
    id: ListenerId,
    port: u16,
}

impl TcpListener {
    /// Listens on `port` of every address of the stack.
    ///
    /// # Errors
    /// [`NetError::Config`] for options that cannot work or port 0,
    /// [`NetError::OutOfMemory`] when the heap cannot hold the backlog.
    pub fn bind(
        net: &mut impl AsMut<Sockets>,
        port: u16,
        opts: TcpOptions,
    ) -> Result<Self, NetError> {
        match net.as_mut().listen(port, opts) {
            Ok(id) => Ok(Self { id, port }),
            Err(ListenFailure::Options(why)) => Err(NetError::Config(why)),
            Err(ListenFailure::Port) => Err(NetError::Config("cannot listen on TCP port 0")),
            Err(ListenFailure::OutOfMemory) => {
                net.as_mut().count_out_of_memory();
                Err(NetError::OutOfMemory {
                    what: "a listener's backlog",
                })
            }
        }
    }

    /// The oldest established connection not yet accepted.
    ///
    /// # Errors
    /// [`SocketError::WouldBlock`] when none is waiting.
    pub fn accept(&self, net: &mut impl AsMut<Sockets>) -> Result<TcpStream, SocketError> {
        let a = net
            .as_mut()
            .accept(self.id)
            .ok_or(SocketError::WouldBlock)?;
        Ok(TcpStream {
            handle: a.handle,
            listener: Some(self.id),
            local: a.local,
            peer: a.peer,
        })
    }

    #[must_use]
    pub fn local_port(&self) -> u16 {
        self.port
    }

    /// What the listener did so far and holds now.
    #[must_use]
    pub fn stats(&self, net: &mut impl AsMut<Sockets>) -> ListenerStats {
        net.as_mut().listener_stats(self.id).unwrap_or_default()
    }

    /// Stops listening: SYNs to the port get RST from now on, connections
    /// not yet accepted are reset. Streams already accepted are not touched.
    pub fn close(self, net: &mut impl AsMut<Sockets>) {
        net.as_mut().unlisten(self.id);
    }
}

/// One TCP connection. Reading and writing never block; `close` ends it
/// with a FIN after whatever is still queued.
///
/// A stream's socket stays in the stack until [`close`](Self::close) or
/// [`abort`](Self::abort) (then until the connection has ended): dropping a
/// `TcpStream` without either keeps its memory and its place in its
/// listener's `max_connections`.
#[derive(Debug)]
#[must_use = "a stream keeps its socket until closed"]
pub struct TcpStream {
    handle: SocketHandle,
    listener: Option<ListenerId>,
    local: Option<IpEndpoint>,
    peer: Option<IpEndpoint>,
}

impl TcpStream {
    /// Starts a connection to `to` over the interface whose context `cx` is.
    /// `Net::connect` is the usual way; this is for [`Sockets`] driven over
    /// another smoltcp device.
    ///
    /// # Errors
    /// As `Net::connect`.
    pub fn connect(
        sockets: &mut Sockets,
        cx: &mut smoltcp::iface::Context,
        to: IpEndpoint,
        opts: &TcpOptions,
    ) -> Result<Self, NetError> {
        let handle = sockets.connect(cx, to, opts).map_err(|e| match e {
            ConnectFailure::Options(why) => NetError::Config(why),
            ConnectFailure::NoPort => NetError::Config("every local port 49152-65535 is in use"),
            ConnectFailure::Unaddressable => NetError::Config(
                "cannot connect: unspecified address, port 0, or the stack has no address yet",
            ),
            ConnectFailure::OutOfMemory => NetError::OutOfMemory {
                what: "a connection's buffers",
            },
        })?;
        let local = sockets.set.get::<tcp::Socket>(handle).local_endpoint();
        Ok(Self {
            handle,
            listener: None,
            local,
            peer: Some(to),
        })
    }

    fn socket<'a>(&self, net: &'a mut impl AsMut<Sockets>) -> &'a mut tcp::Socket<'static> {
        net.as_mut().set.get_mut::<tcp::Socket>(self.handle)
    }

    /// Reads what has arrived into `buf`.
    ///
    /// Returns `Ok(0)` at the end of the stream: the peer closed its side
    /// (or the connection is gone) and everything it sent has been read.
    ///
    /// # Errors
    /// [`SocketError::WouldBlock`] when nothing is there yet.
    pub fn read(
        &mut self,
        net: &mut impl AsMut<Sockets>,
        buf: &mut [u8],
    ) -> Result<usize, SocketError> {
        let s = self.socket(net);
        if matches!(s.state(), tcp::State::SynSent | tcp::State::SynReceived) {
            return Err(SocketError::WouldBlock);
        }
        if buf.is_empty() {
            return Ok(0);
        }
        match s.recv_slice(buf) {
            Ok(n) if n > 0 => Ok(n),
            Ok(_) if s.may_recv() => Err(SocketError::WouldBlock),
            Ok(_) | Err(_) => Ok(0),
        }
    }

    /// Queues as much of `buf` as the send buffer has room for; it leaves
    /// with the stack's next poll.
    ///
    /// # Errors
    /// [`SocketError::WouldBlock`] when the send buffer is full,
    /// [`SocketError::NotConnected`] once this side was closed or the
    /// connection is gone.
    pub fn write(
        &mut self,
        net: &mut impl AsMut<Sockets>,
        buf: &[u8],
    ) -> Result<usize, SocketError> {
        let s = self.socket(net);
        if matches!(s.state(), tcp::State::SynSent | tcp::State::SynReceived) {
            return Err(SocketError::WouldBlock);
        }
        if !s.may_send() {
            return Err(SocketError::NotConnected);
        }
        if buf.is_empty() {
            return Ok(0);
        }
        match s.send_slice(buf) {
            Ok(0) => Err(SocketError::WouldBlock),
            Ok(n) => Ok(n),
            Err(_) => Err(SocketError::NotConnected),
        }
    }

    /// Bytes `write` would take now.
    #[must_use]
    pub fn write_room(&self, net: &mut impl AsMut<Sockets>) -> usize {
        let s = self.socket(net);
        if s.may_send() {
            s.send_capacity() - s.send_queue()
        } else {
            0
        }
    }

    /// Bytes written and not yet acknowledged by the peer.
    #[must_use]
    pub fn unacknowledged(&self, net: &mut impl AsMut<Sockets>) -> usize {
        self.socket(net).send_queue()
    }

    /// True once the peer can send nothing more: it closed its side, or the
    /// connection is gone (reads then drain what is left and return 0).
    #[must_use]
    pub fn peer_closed(&self, net: &mut impl AsMut<Sockets>) -> bool {
        !self.socket(net).may_recv()
    }

    /// True while an outgoing connection's handshake is under way.
    #[must_use]
    pub fn is_connecting(&self, net: &mut impl AsMut<Sockets>) -> bool {
        matches!(
            self.socket(net).state(),
            tcp::State::SynSent | tcp::State::SynReceived
        )
    }

    /// False once the connection can move no more data either way: both
    /// sides closed, or it was reset or refused (then only `close` is left
    /// to do); also false while [connecting](Self::is_connecting).
    #[must_use]
    pub fn is_connected(&self, net: &mut impl AsMut<Sockets>) -> bool {
        let s = self.socket(net);
        s.may_send() || s.may_recv()
    }

    /// The connection's TCP state (for logs and tests).
    #[must_use]
    pub fn state(&self, net: &mut impl AsMut<Sockets>) -> tcp::State {
        self.socket(net).state()
    }

    /// The peer's address and port (as it was at accept).
    #[must_use]
    pub fn peer_addr(&self) -> Option<IpEndpoint> {
        self.peer
    }

    /// This side's address and port.
    #[must_use]
    pub fn local_addr(&self) -> Option<IpEndpoint> {
        self.local
    }

    /// Ends the connection in order: what is queued is sent, then a FIN.
    /// The stack frees the socket once the peer has closed too, or aborts
    /// it after `CLOSE_LINGER` if the peer never does.
    pub fn close(self, net: &mut impl AsMut<Sockets>) {
        net.as_mut()
            .close_stream(self.handle, self.listener, super::stack::now(), false);
    }

    /// Resets the connection (RST) and frees the socket once the RST left.
    pub fn abort(self, net: &mut impl AsMut<Sockets>) {
        net.as_mut()
            .close_stream(self.handle, self.listener, super::stack::now(), true);
    }

    /// The smoltcp socket under this stream, for what this type does not
    /// offer (Nagle, keep-alive, timeouts).
    pub fn smoltcp<'a>(&self, net: &'a mut impl AsMut<Sockets>) -> &'a mut tcp::Socket<'static> {
        self.socket(net)
    }
}
