//! The socket layer of `rt::net` without a NIC: a listener, its clients and
//! a UDP pair on one smoltcp interface over smoltcp's loopback device, so the
//! accept/re-arm/reclaim logic is checked under every VMM the same way.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use guest_kernel::rt::net::{
    NetError, SocketError, Sockets, TcpListener, TcpOptions, TcpStream, UdpOptions, UdpSocket,
};
use guest_kernel::rt::time::{self, Instant};
use guest_kernel::{check, check_eq, ktest};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Loopback, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{
    EthernetAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint, Ipv4Address,
};

const ADDR: Ipv4Address = Ipv4Address::LOCALHOST;
/// Polls a test may take before it calls the stack stuck (a guard against
/// hanging, not a measurement: each poll moves at least one frame or timer).
const MAX_POLLS: usize = 200_000;

fn now() -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(i64::try_from(time::now_ns() / 1000).unwrap_or(i64::MAX))
}

/// One interface over a loopback device, with the socket layer `Net` uses.
struct Stack {
    dev: Loopback,
    iface: Interface,
    sockets: Sockets,
}

impl AsMut<Sockets> for Stack {
    fn as_mut(&mut self) -> &mut Sockets {
        &mut self.sockets
    }
}

impl Stack {
    fn new() -> Self {
        let mut dev = Loopback::new(Medium::Ethernet);
        let config = Config::new(EthernetAddress([0x02, 0, 0, 0, 0, 1]).into());
        let mut iface = Interface::new(config, &mut dev, now());
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(ADDR), 8));
        });
        Self {
            dev,
            iface,
            sockets: Sockets::new(SocketSet::new(Vec::new())),
        }
    }

    fn poll(&mut self) {
        self.sockets
            .poll_device(&mut self.iface, now(), &mut self.dev);
    }

    /// A client socket connecting to `port` from `local_port`.
    fn connect(&mut self, port: u16, local_port: u16) -> Result<SocketHandle, String> {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(alloc::vec![0; 16 * 1024]),
            tcp::SocketBuffer::new(alloc::vec![0; 16 * 1024]),
        );
        s.set_ack_delay(None);
        s.connect(
            self.iface.context(),
            IpEndpoint::new(ADDR.into(), port),
            local_port,
        )
        .map_err(|e| format!("client connect: {e:?}"))?;
        Ok(self.sockets.add(s))
    }

    fn client(&mut self, h: SocketHandle) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(h)
    }

    /// Polls until `done` holds; Err after `within` (a guard against
    /// hanging for tests that wait on the stack's timers, not a measurement).
    fn poll_within(
        &mut self,
        what: &str,
        within: core::time::Duration,
        mut done: impl FnMut(&mut Self) -> bool,
    ) -> Result<(), String> {
        let until = Instant::now()
            .checked_add(within)
            .ok_or("deadline overflow")?;
        while Instant::now() < until {
            self.poll();
            if done(self) {
                return Ok(());
            }
        }
        Err(format!("stuck waiting for {what}"))
    }

    /// Polls until `done` holds; Err after [`MAX_POLLS`].
    fn poll_until(
        &mut self,
        what: &str,
        mut done: impl FnMut(&mut Self) -> bool,
    ) -> Result<(), String> {
        for _ in 0..MAX_POLLS {
            self.poll();
            if done(self) {
                return Ok(());
            }
        }
        Err(format!("stuck waiting for {what}"))
    }
}

/// Client `i`'s payload: a few KiB, its own length and bytes.
fn payload(i: usize) -> Vec<u8> {
    (0..1500 + i * 61)
        .map(|j| u8::try_from((j * 13 + i * 7) % 251).unwrap_or(0))
        .collect()
}

ktest!(
    fn sixty_four_clients_at_once_are_all_accepted_and_echoed() {
        const N: usize = 64;
        let mut st = Stack::new();
        let listener =
            TcpListener::bind(&mut st, 7, TcpOptions::default()).map_err(|err| err.to_string())?;
        // Every SYN leaves in the same poll: the listener must re-arm
        // between frames to take them all.
        let clients: Vec<SocketHandle> = (0..N)
            .map(|i| st.connect(7, 40_000 + u16::try_from(i).unwrap_or(0)))
            .collect::<Result<_, _>>()?;
        let mut streams: Vec<TcpStream> = Vec::new();
        st.poll_until("64 accepts", |st| {
            while let Ok(s) = listener.accept(st) {
                streams.push(s);
            }
            streams.len() == N
        })?;
        for &c in &clients {
            check_eq!(
                st.client(c).state(),
                tcp::State::Established,
                "client connected"
            );
        }
        let stats = listener.stats(&mut st);
        check_eq!(stats.accepted, N as u64, "accepted");
        check_eq!(stats.open, N, "open streams");
        check_eq!(stats.full, 0, "never full");
        check!(stats.listening >= 1, "still listening: {stats:?}");

        // Each client sends its own payload and closes; the server echoes
        // and closes once the client has.
        let mut sent = alloc::vec![0usize; N];
        let mut back: Vec<Vec<u8>> = alloc::vec![Vec::new(); N];
        let mut streams: Vec<Option<TcpStream>> = streams.into_iter().map(Some).collect();
        let mut buf = [0u8; 2048];
        st.poll_until("every echo", |st| {
            for (i, &c) in clients.iter().enumerate() {
                let data = payload(i);
                let s = st.client(c);
                if sent[i] < data.len() {
                    sent[i] += s.send_slice(&data[sent[i]..]).unwrap_or(0);
                    if sent[i] == data.len() {
                        s.close();
                    }
                }
                while let Ok(n @ 1..) = s.recv_slice(&mut buf) {
                    back[i].extend_from_slice(&buf[..n]);
                }
            }
            for slot in &mut streams {
                let Some(stream) = slot.as_mut() else {
                    continue;
                };
                loop {
                    let room = stream.write_room(st).min(buf.len());
                    if room == 0 {
                        break;
                    }
                    match stream.read(st, &mut buf[..room]) {
                        Ok(0) => {
                            if let Some(s) = slot.take() {
                                s.close(st);
                            }
                            break;
                        }
                        Ok(n) => {
                            let _ = stream.write(st, &buf[..n]);
                        }
                        Err(_) => break,
                    }
                }
            }
            (0..N).all(|i| back[i].len() == payload(i).len()) && streams.iter().all(Option::is_none)
        })?;
        for (i, b) in back.iter().enumerate() {
            check!(*b == payload(i), "client {i}: echo differs");
        }
        // Closed streams are reclaimed once their FIN exchange ends.
        st.poll_until("reclaim", |st| st.sockets.stats().closing == 0)?;
        check_eq!(st.sockets.stats().reclaimed, N as u64, "reclaimed");
        check_eq!(listener.stats(&mut st).open, 0, "open after close");
        listener.close(&mut st);
        Ok(())
    }
);

ktest!(
    fn a_full_listener_refuses_counts_and_takes_clients_again_after_a_close() {
        let mut st = Stack::new();
        let opts = TcpOptions {
            backlog: 2,
            max_connections: 4,
            ..TcpOptions::default()
        };
        let listener = TcpListener::bind(&mut st, 80, opts).map_err(|err| err.to_string())?;
        let clients: Vec<SocketHandle> = (0..8)
            .map(|i| st.connect(80, 41_000 + i))
            .collect::<Result<_, _>>()?;
        // Four get in; the other four are answered with RST and end Closed.
        let mut streams = Vec::new();
        st.poll_until("4 accepted, 4 refused", |st| {
            while let Ok(s) = listener.accept(st) {
                streams.push(s);
            }
            let closed = clients
                .iter()
                .filter(|&&c| st.client(c).state() == tcp::State::Closed)
                .count();
            streams.len() == 4 && closed == 4
        })?;
        let stats = listener.stats(&mut st);
        check_eq!(stats.open, 4, "open");
        check_eq!(stats.listening, 0, "no socket left listening at the limit");
        check!(stats.full >= 1, "the limit was counted: {stats:?}");
        check_eq!(
            listener.accept(&mut st).map(|_| ()),
            Err(SocketError::WouldBlock),
            "nothing more to accept"
        );

        // Closing one frees a place: the next client is accepted.
        let first = streams.remove(0);
        first.abort(&mut st);
        let late = st.connect(80, 42_000)?;
        let mut got = None;
        st.poll_until("a late accept", |st| {
            got = listener.accept(st).ok();
            got.is_some()
        })?;
        check_eq!(
            st.client(late).state(),
            tcp::State::Established,
            "late client"
        );
        let got = got.ok_or("no stream")?;
        check_eq!(
            got.peer_addr().map(|p| p.port),
            Some(42_000),
            "the late client's stream"
        );
        got.close(&mut st);
        for s in streams {
            s.abort(&mut st);
        }
        listener.close(&mut st);
        Ok(())
    }
);

ktest!(
    fn buffers_the_heap_cannot_hold_are_an_error_not_a_panic() {
        let mut st = Stack::new();
        let huge = TcpOptions {
            rx_buffer: usize::MAX / 4,
            ..TcpOptions::default()
        };
        check!(
            matches!(
                TcpListener::bind(&mut st, 7, huge),
                Err(NetError::OutOfMemory { .. })
            ),
            "a listener too large for the heap"
        );
        check!(
            matches!(
                UdpSocket::bind(
                    &mut st,
                    9,
                    UdpOptions {
                        packets: 1 << 20,
                        max_datagram: 1 << 20
                    }
                ),
                Err(NetError::OutOfMemory { .. })
            ),
            "a UDP socket too large for the heap"
        );
        check_eq!(st.sockets.stats().out_of_memory, 2, "both counted");
        check!(
            matches!(
                TcpListener::bind(
                    &mut st,
                    7,
                    TcpOptions {
                        backlog: 0,
                        ..TcpOptions::default()
                    }
                ),
                Err(NetError::Config(_))
            ),
            "backlog 0 refused"
        );
        // The stack still works afterwards.
        let l =
            TcpListener::bind(&mut st, 7, TcpOptions::default()).map_err(|err| err.to_string())?;
        l.close(&mut st);
        Ok(())
    }
);

ktest!(
    fn udp_sockets_exchange_datagrams() {
        let mut st = Stack::new();
        let mut a =
            UdpSocket::bind(&mut st, 5000, UdpOptions::default()).map_err(|err| err.to_string())?;
        let mut b =
            UdpSocket::bind(&mut st, 5001, UdpOptions::default()).map_err(|err| err.to_string())?;
        let to_b = IpEndpoint::new(ADDR.into(), 5001);
        for i in 0..8u8 {
            a.send_to(&mut st, &[i; 100], to_b)
                .map_err(|err| format!("send {i}: {err}"))?;
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        st.poll_until("8 datagrams", |st| {
            while let Ok((n, from)) = b.recv_from(st, &mut buf) {
                got.push((buf[..n].to_vec(), from.port));
            }
            got.len() == 8
        })?;
        for (i, (d, port)) in got.iter().enumerate() {
            check_eq!(*port, 5000, "sender port");
            check!(
                d.len() == 100 && d.iter().all(|&x| usize::from(x) == i),
                "datagram {i}"
            );
        }
        check_eq!(
            b.recv_from(&mut st, &mut buf).map(|_| ()),
            Err(SocketError::WouldBlock),
            "empty"
        );
        a.close(&mut st);
        b.close(&mut st);
        Ok(())
    }
);

ktest!(
    fn a_second_syn_for_a_known_connection_starts_no_second_handshake() {
        let mut st = Stack::new();
        // smoltcp gives a SYN to the first socket that takes it, in slot
        // order, and a socket mid-handshake takes its own client's SYN: the
        // case arises when a re-armed listening socket sits in a lower slot
        // (freed by an earlier connection). A UDP socket holds slot 0 for
        // that and is closed before the SYNs arrive.
        let placeholder =
            UdpSocket::bind(&mut st, 9, UdpOptions::default()).map_err(|err| err.to_string())?;
        let listener =
            TcpListener::bind(&mut st, 7, TcpOptions::default()).map_err(|err| err.to_string())?;
        // Two client sockets with the same port send SYNs for the same
        // connection with different sequence numbers: what a listener sees
        // when a client's SYN is retransmitted.
        let a = st.connect(7, 43_000)?;
        let _b = st.connect(7, 43_000)?;
        placeholder.close(&mut st);
        let mut got = None;
        st.poll_until("the connection accepted", |st| {
            if got.is_none() {
                got = listener.accept(st).ok();
            }
            got.is_some() && st.client(a).state() == tcp::State::Established
        })?;
        let stats = listener.stats(&mut st);
        check_eq!(stats.duplicate_syns, 1, "the second SYN dropped: {stats:?}");
        check_eq!(stats.half_open, 0, "no second handshake: {stats:?}");
        check_eq!(stats.accepted, 1, "one connection");
        let got = got.ok_or("no stream")?;
        check_eq!(got.peer_addr().map(|p| p.port), Some(43_000), "its peer");
        got.abort(&mut st);
        listener.close(&mut st);
        Ok(())
    }
);

ktest!(
    fn outgoing_streams_connect_talk_and_see_a_refusal() {
        let mut st = Stack::new();
        let listener = TcpListener::bind(&mut st, 8080, TcpOptions::default())
            .map_err(|err| err.to_string())?;
        let to = IpEndpoint::new(ADDR.into(), 8080);
        let mut out = Vec::new();
        for _ in 0..3 {
            let s = TcpStream::connect(
                &mut st.sockets,
                st.iface.context(),
                to,
                &TcpOptions::default(),
            )
            .map_err(|err| err.to_string())?;
            check!(s.is_connecting(&mut st), "connecting at first");
            out.push(s);
        }
        let ports: Vec<_> = out
            .iter()
            .filter_map(|s| s.local_addr().map(|e| e.port))
            .collect();
        check!(
            ports.len() == 3 && ports[0] != ports[1] && ports[1] != ports[2],
            "distinct local ports: {ports:?}"
        );
        let mut inbound = Vec::new();
        st.poll_until("3 accepts", |st| {
            while let Ok(s) = listener.accept(st) {
                inbound.push(s);
            }
            inbound.len() == 3 && out.iter().all(|s| s.is_connected(st))
        })?;
        for (i, s) in out.iter_mut().enumerate() {
            let msg = format!("hello {i}");
            check_eq!(s.write(&mut st, msg.as_bytes()), Ok(msg.len()), "write {i}");
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        st.poll_until("3 messages", |st| {
            for s in &mut inbound {
                if let Ok(n @ 1..) = s.read(st, &mut buf) {
                    got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                }
            }
            got.len() == 3
        })?;
        got.sort();
        check_eq!(
            got,
            ["hello 0", "hello 1", "hello 2"],
            "what the server read"
        );

        // Nobody listens on 8081: RST, and the stream reads as ended.
        let mut refused = TcpStream::connect(
            &mut st.sockets,
            st.iface.context(),
            IpEndpoint::new(ADDR.into(), 8081),
            &TcpOptions::default(),
        )
        .map_err(|err| err.to_string())?;
        st.poll_until("the refusal", |st| !refused.is_connecting(st))?;
        check!(!refused.is_connected(&mut st), "refused");
        check_eq!(refused.read(&mut st, &mut buf), Ok(0), "end of stream");
        refused.close(&mut st);
        for s in out.into_iter().chain(inbound) {
            s.abort(&mut st);
        }
        listener.close(&mut st);
        Ok(())
    }
);

ktest!(
    fn handshakes_that_never_finish_give_their_sockets_back() {
        let mut st = Stack::new();
        let quick = TcpOptions {
            handshake_timeout: core::time::Duration::from_secs(1),
            ..TcpOptions::default()
        };
        let listener = TcpListener::bind(&mut st, 7, quick).map_err(|err| err.to_string())?;
        // A client that sends its SYN from an address nobody answers ARP
        // for, so the SYN-ACK never leaves, and then falls silent (going
        // back to listening forgets its connection without an RST).
        let mut client = tcp::Socket::new(
            tcp::SocketBuffer::new(alloc::vec![0; 1024]),
            tcp::SocketBuffer::new(alloc::vec![0; 1024]),
        );
        client
            .connect(
                st.iface.context(),
                IpEndpoint::new(ADDR.into(), 7),
                IpListenEndpoint {
                    addr: Some(Ipv4Address::new(127, 0, 0, 3).into()),
                    port: 44_000,
                },
            )
            .map_err(|err| format!("client connect: {err:?}"))?;
        let c = st.sockets.add(client);
        st.poll_until("the SYN", |st| listener.stats(st).half_open == 1)?;
        st.client(c).abort();
        st.client(c)
            .listen(44_001)
            .map_err(|err| format!("{err:?}"))?;
        st.poll_within(
            "the handshake timeout",
            core::time::Duration::from_secs(30),
            |st| listener.stats(st).dropped_half_open == 1,
        )?;
        let stats = listener.stats(&mut st);
        check_eq!(stats.half_open, 0, "no half-open left: {stats:?}");
        check_eq!(
            stats.listening,
            quick.backlog + 1,
            "the socket listens again"
        );
        check_eq!(stats.accepted, 0, "nothing accepted");

        // An outgoing connection to an address nobody has ends the same way.
        let mut out = TcpStream::connect(
            &mut st.sockets,
            st.iface.context(),
            IpEndpoint::new(Ipv4Address::new(127, 0, 0, 2).into(), 7),
            &quick,
        )
        .map_err(|err| err.to_string())?;
        st.poll_within(
            "the connect timeout",
            core::time::Duration::from_secs(30),
            |st| !out.is_connecting(st),
        )?;
        check!(!out.is_connected(&mut st), "never connected");
        let mut buf = [0u8; 8];
        check_eq!(out.read(&mut st, &mut buf), Ok(0), "end of stream");
        out.close(&mut st);
        listener.close(&mut st);
        Ok(())
    }
);
