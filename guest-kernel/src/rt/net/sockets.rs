//! The stack's sockets: smoltcp's socket set plus what smoltcp leaves to its
//! user — listeners that keep several sockets listening on one port and
//! re-arm after every received frame, the queue of connections waiting for
//! `accept`, closed streams whose sockets are reclaimed once their FIN
//! exchange ends, and socket buffers allocated without panicking when the
//! heap runs out.
//!
//! Why re-arm after every frame: smoltcp matches a SYN to the first socket in
//! `Listen` on its port and answers with RST when there is none. A burst of
//! SYNs arrives in one batch of frames, so a listener that only re-armed in
//! `accept` (or after a whole poll) would refuse all but its first few
//! clients. [`Sockets::poll_device`] therefore runs smoltcp one frame at a
//! time and tops every listener up between frames.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use smoltcp::iface::{
    Context, Interface, PollIngressSingleResult, PollResult, SocketHandle, SocketSet,
};
use smoltcp::phy::Device;
use smoltcp::socket::{AnySocket, tcp, udp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::IpEndpoint;

/// How long a closed stream may take to finish its FIN exchange before its
/// socket is aborted and reclaimed: a peer that never acknowledges our FIN
/// must not keep the memory forever.
pub const CLOSE_LINGER: core::time::Duration = core::time::Duration::from_secs(10);

/// How a [`TcpListener`](super::TcpListener) sizes and limits its sockets.
///
/// Every socket — listening, half-open, waiting for `accept`, or accepted and
/// not yet closed — owns `rx_buffer + tx_buffer` bytes of heap from the moment
/// it starts listening, so a listener at its limit holds
/// `max_connections × (rx_buffer + tx_buffer)` bytes (4 MiB with the defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpOptions {
    /// Sockets kept in `Listen`, each ready to take one SYN (at least 1). The
    /// listener tops them up after every received frame, so this only needs
    /// to cover the SYNs of a single frame batch that meet an empty listener
    /// — in practice one; more costs memory and buys little.
    pub backlog: usize,
    /// Receive buffer per connection, bytes (the largest window advertised).
    pub rx_buffer: usize,
    /// Send buffer per connection, bytes (what `write` accepts before it
    /// returns `WouldBlock`).
    pub tx_buffer: usize,
    /// Sockets this listener may own at once, listening ones included. At
    /// the limit it stops re-arming: further SYNs are answered with RST by
    /// smoltcp, and [`ListenerStats::full`] counts each time it got there.
    pub max_connections: usize,
    /// How long a half-open connection (SYN received, SYN-ACK sent) may wait
    /// for the client's ACK before it is reset and its socket listens again:
    /// without it, SYNs from clients that never answer (a SYN flood) would
    /// hold `max_connections` sockets for good. Accepted connections have no
    /// such limit.
    pub handshake_timeout: core::time::Duration,
}

impl Default for TcpOptions {
    /// 8 listening, 16 KiB each way, 128 sockets (4 MiB of heap at most),
    /// 10 s for a handshake.
    fn default() -> Self {
        Self {
            backlog: 8,
            rx_buffer: 16 * 1024,
            tx_buffer: 16 * 1024,
            max_connections: 128,
            handshake_timeout: core::time::Duration::from_secs(10),
        }
    }
}

impl TcpOptions {
    /// Why these options cannot work, if they cannot.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.backlog == 0 {
            return Err("backlog must be at least 1");
        }
        if self.rx_buffer == 0 || self.tx_buffer == 0 {
            return Err("socket buffers must not be empty");
        }
        if self.max_connections < self.backlog {
            return Err("max_connections must be at least the backlog");
        }
        if self.handshake_timeout.is_zero() {
            return Err("handshake_timeout must not be zero");
        }
        Ok(())
    }
}

/// What a listener did so far, and what it holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListenerStats {
    /// Connections handed out by `accept`.
    pub accepted: u64,
    /// Sockets in `Listen` now.
    pub listening: usize,
    /// Sockets that received a SYN and wait for the handshake's last ACK.
    pub half_open: usize,
    /// Established connections waiting for `accept`.
    pub pending: usize,
    /// Accepted streams not yet closed.
    pub open: usize,
    /// Times the listener was left with no socket in `Listen` because it
    /// owned `max_connections` sockets (SYNs meanwhile get RST).
    pub full: u64,
    /// Socket allocations that failed for want of heap (retried after the
    /// next frame; SYNs meanwhile may get RST).
    pub out_of_memory: u64,
    /// Half-open connections that ended (RST, `handshake_timeout`) before
    /// they were established; their sockets listen again.
    pub dropped_half_open: u64,
    /// SYNs for a connection another socket already has (a client's
    /// retransmission), dropped instead of starting a second handshake.
    pub duplicate_syns: u64,
}

/// The stack's own counters over all sockets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketStats {
    /// Closed streams whose FIN exchange ended and whose socket was freed.
    pub reclaimed: u64,
    /// Closed streams aborted after [`CLOSE_LINGER`] without finishing.
    pub linger_aborts: u64,
    /// Socket allocations (listeners, UDP sockets) that failed for want of heap.
    pub out_of_memory: u64,
    /// Closed streams whose connection has not ended yet (now).
    pub closing: usize,
}

/// Listener `n` of a stack (an index into [`Sockets`]' table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerId(usize);

struct Listener {
    port: u16,
    opts: TcpOptions,
    /// Sockets in `Listen` or `SynReceived`, each with whether its
    /// handshake was already checked against the other connections.
    armed: Vec<(SocketHandle, bool)>,
    /// Established, waiting for `accept`, oldest first.
    ready: VecDeque<SocketHandle>,
    /// Accepted and not yet closed.
    open: usize,
    /// Left with no listening socket at `max_connections` (and counted in
    /// `stats.full`) since it last armed one.
    at_limit: bool,
    stats: ListenerStats,
}

impl Listener {
    fn owned(&self) -> usize {
        self.armed.len() + self.ready.len() + self.open
    }
}

/// A stream closed by its owner, kept until its connection ends.
struct Closing {
    handle: SocketHandle,
    deadline: Instant,
}

/// A new accepted connection: its socket, where it came from, and its listener.
pub(super) struct Accepted {
    pub(super) handle: SocketHandle,
    pub(super) local: Option<IpEndpoint>,
    pub(super) peer: Option<IpEndpoint>,
}

/// smoltcp's socket set with listeners and closing streams; see the module docs.
pub struct Sockets {
    pub(super) set: SocketSet<'static>,
    listeners: Vec<Option<Listener>>,
    closing: Vec<Closing>,
    stats: SocketStats,
    /// Where the search for a free local port for `connect` starts.
    next_port: u16,
    /// Outgoing connections still in their handshake (their socket carries
    /// the handshake timeout until it ends).
    connecting: Vec<SocketHandle>,
}

/// The local ports outgoing connections take (IANA's dynamic range).
const EPHEMERAL: core::ops::RangeInclusive<u16> = 49152..=65535;

/// Buffer of `len` zero bytes, or `None` when the heap cannot give it.
fn try_buffer(len: usize) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).ok()?;
    v.resize(len, 0);
    Some(v)
}

/// A TCP socket with buffers of these sizes, or `None` when the heap is short.
pub(super) fn try_tcp_socket(rx: usize, tx: usize) -> Option<tcp::Socket<'static>> {
    let rx = try_buffer(rx)?;
    let tx = try_buffer(tx)?;
    Some(tcp::Socket::new(
        tcp::SocketBuffer::new(rx),
        tcp::SocketBuffer::new(tx),
    ))
}

/// A UDP socket with `packets` datagrams of at most `max_datagram` bytes of
/// buffering each way, or `None` when the heap is short.
pub(super) fn try_udp_socket(packets: usize, max_datagram: usize) -> Option<udp::Socket<'static>> {
    let buffer = || {
        let mut meta = Vec::new();
        meta.try_reserve_exact(packets).ok()?;
        meta.resize(packets, udp::PacketMetadata::EMPTY);
        let data = try_buffer(packets.checked_mul(max_datagram)?)?;
        Some(udp::PacketBuffer::new(meta, data))
    };
    Some(udp::Socket::new(buffer()?, buffer()?))
}

/// Why a listener could not be opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ListenFailure {
    Options(&'static str),
    /// Port 0, or smoltcp refused the endpoint.
    Port,
    OutOfMemory,
}

/// Why an outgoing connection could not be started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ConnectFailure {
    Options(&'static str),
    /// Every port of the ephemeral range is taken.
    NoPort,
    /// Unspecified address or port 0, or no address of our own yet.
    Unaddressable,
    OutOfMemory,
}

impl Sockets {
    /// Sockets over `set`. `Net` makes its own; this is for a stack over
    /// another smoltcp device (a loopback in tests), driven by
    /// [`poll_device`](Self::poll_device).
    #[must_use]
    pub fn new(set: SocketSet<'static>) -> Self {
        Self {
            set,
            listeners: Vec::new(),
            closing: Vec::new(),
            stats: SocketStats::default(),
            next_port: *EPHEMERAL.start(),
            connecting: Vec::new(),
        }
    }

    /// Adds a smoltcp socket this module does not wrap (a TCP client, a raw
    /// socket); it stays until the stack is dropped.
    pub fn add<T: AnySocket<'static>>(&mut self, socket: T) -> SocketHandle {
        self.set.add(socket)
    }

    /// A socket [`add`](Self::add) returned.
    ///
    /// # Panics
    /// When `handle` is not of type `T` (smoltcp's rule).
    pub fn get_mut<T: AnySocket<'static>>(&mut self, handle: SocketHandle) -> &mut T {
        self.set.get_mut::<T>(handle)
    }

    #[must_use]
    pub fn stats(&self) -> SocketStats {
        SocketStats {
            closing: self.closing.len(),
            ..self.stats
        }
    }

    /// Counts a failed socket allocation made outside a listener.
    pub(super) fn count_out_of_memory(&mut self) {
        self.stats.out_of_memory += 1;
    }

    /// Runs smoltcp over `device` one received frame at a time, re-arming
    /// the listeners after each, then sends what the sockets have queued and
    /// reclaims closed streams that are done.
    pub fn poll_device<D: Device + ?Sized>(
        &mut self,
        iface: &mut Interface,
        now: Instant,
        device: &mut D,
    ) -> PollResult {
        let mut result = PollResult::None;
        loop {
            match iface.poll_ingress_single(now, device, &mut self.set) {
                PollIngressSingleResult::None => break,
                PollIngressSingleResult::PacketProcessed => {}
                PollIngressSingleResult::SocketStateChanged => {
                    result = PollResult::SocketStateChanged;
                }
            }
            self.rearm();
        }
        if iface.poll_egress(now, device, &mut self.set) == PollResult::SocketStateChanged {
            result = PollResult::SocketStateChanged;
        }
        // Egress can move a socket too (a SYN-ACK's retransmission timing out).
        self.rearm();
        self.settle_connects();
        self.reap(now);
        result
    }

    /// A TCP socket connecting to `to` from a free local port; its SYN
    /// leaves with the next poll.
    pub(super) fn connect(
        &mut self,
        cx: &mut Context,
        to: IpEndpoint,
        opts: &TcpOptions,
    ) -> Result<SocketHandle, ConnectFailure> {
        opts.check().map_err(ConnectFailure::Options)?;
        let port = self.free_port().ok_or(ConnectFailure::NoPort)?;
        let Some(mut s) = try_tcp_socket(opts.rx_buffer, opts.tx_buffer) else {
            self.stats.out_of_memory += 1;
            return Err(ConnectFailure::OutOfMemory);
        };
        if self.connecting.try_reserve(1).is_err() {
            self.stats.out_of_memory += 1;
            return Err(ConnectFailure::OutOfMemory);
        }
        // A peer that never answers must not keep the stream connecting
        // for good: the handshake gets the listeners' limit.
        s.set_timeout(Some(opts.handshake_timeout.into()));
        s.connect(cx, to, port)
            .map_err(|_| ConnectFailure::Unaddressable)?;
        let h = self.set.add(s);
        self.connecting.push(h);
        Ok(h)
    }

    /// Outgoing connections whose handshake ended (connected, refused or
    /// timed out) lose the handshake timeout.
    fn settle_connects(&mut self) {
        let set = &mut self.set;
        self.connecting.retain(|&h| {
            let s = set.get_mut::<tcp::Socket>(h);
            let done = s.state() != tcp::State::SynSent;
            if done {
                s.set_timeout(None);
            }
            !done
        });
    }

    /// The next local port of the ephemeral range no TCP socket uses.
    fn free_port(&mut self) -> Option<u16> {
        let (first, last) = (*EPHEMERAL.start(), *EPHEMERAL.end());
        for _ in EPHEMERAL {
            let port = self.next_port;
            self.next_port = if port >= last { first } else { port + 1 };
            let used = self.set.iter().any(|(_, socket)| {
                tcp::Socket::downcast(socket)
                    .is_some_and(|t| t.local_endpoint().is_some_and(|e| e.port == port))
            });
            if !used {
                return Some(port);
            }
        }
        None
    }

    /// Opens a listener on `port`: `opts.backlog` sockets in `Listen`.
    pub(super) fn listen(
        &mut self,
        port: u16,
        opts: TcpOptions,
    ) -> Result<ListenerId, ListenFailure> {
        opts.check().map_err(ListenFailure::Options)?;
        if port == 0 {
            return Err(ListenFailure::Port);
        }
        let mut l = Listener {
            port,
            opts,
            armed: Vec::new(),
            ready: VecDeque::new(),
            open: 0,
            at_limit: false,
            stats: ListenerStats::default(),
        };
        if l.armed.try_reserve(opts.backlog).is_err() || self.listeners.try_reserve(1).is_err() {
            return Err(ListenFailure::OutOfMemory);
        }
        for _ in 0..opts.backlog {
            match Self::arm_one(&mut self.set, port, &opts) {
                Ok(h) => l.armed.push((h, false)),
                Err(e) => {
                    for (h, _) in l.armed.drain(..) {
                        self.set.remove(h);
                    }
                    return Err(e);
                }
            }
        }
        // Ids are never reused: a stream closed after its listener must not
        // count against a newer listener that took the same slot.
        self.listeners.push(Some(l));
        let id = self.listeners.len() - 1;
        Ok(ListenerId(id))
    }

    fn arm_one(
        set: &mut SocketSet<'static>,
        port: u16,
        opts: &TcpOptions,
    ) -> Result<SocketHandle, ListenFailure> {
        let mut s =
            try_tcp_socket(opts.rx_buffer, opts.tx_buffer).ok_or(ListenFailure::OutOfMemory)?;
        s.set_timeout(Some(opts.handshake_timeout.into()));
        s.listen(port).map_err(|_| ListenFailure::Port)?;
        Ok(set.add(s))
    }

    /// Moves established connections to the accept queue, lets sockets whose
    /// handshake failed listen again, and tops every listener up to its
    /// backlog within its `max_connections`.
    fn rearm(&mut self) {
        for l in self.listeners.iter_mut().flatten() {
            let mut listening = 0;
            let mut i = 0;
            while i < l.armed.len() {
                let (h, checked) = l.armed[i];
                let state = self.set.get::<tcp::Socket>(h).state();
                match state {
                    tcp::State::Listen => {
                        // Back from a handshake smoltcp gave up (an RST
                        // from the client): counted like a timed-out one.
                        if checked {
                            l.stats.dropped_half_open += 1;
                        }
                        l.armed[i].1 = false;
                        listening += 1;
                        i += 1;
                    }
                    tcp::State::SynReceived if checked => i += 1,
                    tcp::State::SynReceived => {
                        // A SYN the client sent again (its first SYN-ACK
                        // late or lost) reaches the first listening socket
                        // smoltcp finds, not the one already answering that
                        // client: the second handshake would reset the first.
                        // Its SYN-ACK has not left yet (egress comes after
                        // the frame), so it listens again without a trace.
                        if Self::is_duplicate(&self.set, h) {
                            let s = self.set.get_mut::<tcp::Socket>(h);
                            s.abort();
                            if s.listen(l.port).is_ok() {
                                listening += 1;
                            }
                            l.stats.duplicate_syns += 1;
                        } else {
                            l.armed[i].1 = true;
                        }
                        i += 1;
                    }
                    // A handshake that ended before it completed (RST,
                    // retransmissions exhausted): the socket listens again.
                    tcp::State::Closed | tcp::State::TimeWait => {
                        let s = self.set.get_mut::<tcp::Socket>(h);
                        s.abort();
                        if s.listen(l.port).is_ok() {
                            listening += 1;
                            i += 1;
                        } else {
                            self.set.remove(h);
                            l.armed.swap_remove(i);
                        }
                        l.stats.dropped_half_open += 1;
                    }
                    // Established, or already further (the peer sent its
                    // data and FIN at once): ready for accept.
                    _ => {
                        if l.ready.try_reserve(1).is_ok() {
                            // The handshake's limit is not the connection's.
                            self.set.get_mut::<tcp::Socket>(h).set_timeout(None);
                            l.ready.push_back(h);
                            l.armed.swap_remove(i);
                        } else {
                            l.stats.out_of_memory += 1;
                            i += 1;
                        }
                    }
                }
            }
            while listening < l.opts.backlog {
                if l.owned() >= l.opts.max_connections {
                    // Counted once per exhaustion: when the last listening
                    // socket is taken and none may replace it.
                    if listening == 0 && !l.at_limit {
                        l.stats.full += 1;
                        l.at_limit = true;
                    }
                    break;
                }
                if l.armed.try_reserve(1).is_err() {
                    l.stats.out_of_memory += 1;
                    break;
                }
                let Ok(h) = Self::arm_one(&mut self.set, l.port, &l.opts) else {
                    l.stats.out_of_memory += 1;
                    break;
                };
                l.armed.push((h, false));
                listening += 1;
                l.at_limit = false;
            }
        }
    }

    /// True when another TCP socket already has `h`'s connection (same
    /// local port, same peer address and port).
    fn is_duplicate(set: &SocketSet<'static>, h: SocketHandle) -> bool {
        let me = set.get::<tcp::Socket>(h);
        let (Some(local), Some(remote)) = (me.local_endpoint(), me.remote_endpoint()) else {
            return false;
        };
        set.iter().any(|(other, socket)| {
            other != h
                && tcp::Socket::downcast(socket).is_some_and(|t| {
                    t.remote_endpoint() == Some(remote)
                        && t.local_endpoint().map(|e| e.port) == Some(local.port)
                })
        })
    }

    /// The oldest established connection of listener `id`, if any.
    pub(super) fn accept(&mut self, id: ListenerId) -> Option<Accepted> {
        let l = self.listeners.get_mut(id.0)?.as_mut()?;
        let handle = l.ready.pop_front()?;
        l.open += 1;
        l.stats.accepted += 1;
        let s = self.set.get::<tcp::Socket>(handle);
        let accepted = Accepted {
            handle,
            local: s.local_endpoint(),
            peer: s.remote_endpoint(),
        };
        // A slot freed: listen again now rather than at the next frame.
        self.rearm();
        Some(accepted)
    }

    /// Listener `id`'s counters and current sockets.
    #[must_use]
    pub(super) fn listener_stats(&self, id: ListenerId) -> Option<ListenerStats> {
        let l = self.listeners.get(id.0)?.as_ref()?;
        let half_open = l
            .armed
            .iter()
            .filter(|(h, _)| self.set.get::<tcp::Socket>(*h).state() == tcp::State::SynReceived)
            .count();
        Some(ListenerStats {
            listening: l.armed.len() - half_open,
            half_open,
            pending: l.ready.len(),
            open: l.open,
            ..l.stats
        })
    }

    /// Closes listener `id`: its listening and half-open sockets are freed,
    /// connections not yet accepted are reset. Accepted streams live on.
    pub(super) fn unlisten(&mut self, id: ListenerId) {
        let Some(l) = self.listeners.get_mut(id.0).and_then(Option::take) else {
            return;
        };
        for h in l.armed.into_iter().map(|(h, _)| h).chain(l.ready) {
            self.set.get_mut::<tcp::Socket>(h).abort();
            // The RST still has to leave: reclaim through the closing list.
            self.reclaim_later(h, Instant::from_micros(i64::MAX));
        }
    }

    /// Puts `handle` on the closing list, to be freed once its connection
    /// has ended or by `deadline`; when even that list cannot grow, frees it
    /// now (its FIN or RST is lost, the peer times out) and counts it.
    fn reclaim_later(&mut self, handle: SocketHandle, deadline: Instant) {
        if self.closing.try_reserve(1).is_ok() {
            self.closing.push(Closing { handle, deadline });
        } else {
            self.set.remove(handle);
            self.stats.out_of_memory += 1;
        }
    }

    /// Starts an orderly close (FIN after the queued data) of stream
    /// `handle`, accepted from `listener`, and frees its socket once the
    /// connection has ended (at the latest after [`CLOSE_LINGER`]).
    pub(super) fn close_stream(
        &mut self,
        handle: SocketHandle,
        listener: Option<ListenerId>,
        now: Instant,
        abort: bool,
    ) {
        let s = self.set.get_mut::<tcp::Socket>(handle);
        if abort {
            s.abort();
        } else {
            s.close();
        }
        if let Some(l) = listener.and_then(|id| self.listeners.get_mut(id.0)?.as_mut()) {
            l.open = l.open.saturating_sub(1);
        }
        // Its socket is freed once closed: no later look at it.
        self.connecting.retain(|&h| h != handle);
        self.reclaim_later(handle, now + Duration::from(CLOSE_LINGER));
        // A slot freed: a listener at its limit may listen again.
        self.rearm();
    }

    /// Frees the sockets of closed streams whose connection has ended, and
    /// aborts those past their deadline (their RST leaves with the next poll).
    fn reap(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.closing.len() {
            let c = &self.closing[i];
            let s = self.set.get_mut::<tcp::Socket>(c.handle);
            // TimeWait would only wait 2 MSL for a stray segment: a new
            // client comes from a new port anyway. A Closed socket with a
            // peer still has its RST to send (smoltcp then forgets the peer).
            let done = match s.state() {
                tcp::State::TimeWait => true,
                tcp::State::Closed => s.remote_endpoint().is_none(),
                _ => false,
            };
            if done {
                self.set.remove(c.handle);
                self.closing.swap_remove(i);
                self.stats.reclaimed += 1;
            } else if now >= c.deadline {
                s.abort();
                self.stats.linger_aborts += 1;
                // Reclaimed once the RST has gone out.
                self.closing[i].deadline = Instant::from_micros(i64::MAX);
                i += 1;
            } else {
                i += 1;
            }
        }
    }
}
